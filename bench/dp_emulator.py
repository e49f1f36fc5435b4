"""A fast, in-process emulator of fedtune's private recipe, for choosing its rules (issue #19; not a test).

Why it is exact enough to tune on. Under the recipe every client takes one full-batch DP-SGD step a
round (Poisson q = 1) from the same global adapter, and FedAvg weights each client by its n_i records:

    client i:  θ_i = θ - lr · (Σ_{x ∈ D_i} clip_C(g_x) + z_i) / n_i,      z_i ~ N(0, σ² C² I)
    server:    θ'  = Σ_i (n_i / N) θ_i = θ - lr · (Σ_x clip_C(g_x) + Σ_i z_i) / N

so a round is one step of central full-batch DP-GD whose noise has std σ·C·√m (m clients; σ is the
same for every client, as each solves for the same q = 1 and number of steps). One client (m = 1) is
central DP, and distributed DP (each client adds σ/√m, the sum carries σ) is the same step as m = 1.
LoRA's naive averaging of A and of B is exact here: one step from a shared point is linear in it.

And why it is fast. The recipe trains LoRA in the last layer only, so the frozen layers below it
give every record the same input to that layer in every round: it is computed once and cached, and
a round runs only the last layer and the head (per-sample gradients by Opacus' GradSampleModule).

    python bench/dp_emulator.py --datasets phrasebank banking77 medical --lrs 1 3 --rounds 30
        [--clients 20] [--epsilon 8] [--seeds 0] [--mode validation]
        [--backoffs 0.5]        halve the rate when two successive noised steps have cosine below -0.5
        [--train all lora head] what is trained and noised: LoRA and the head, or one of them
        [--truncate-head 1 4 16] also score the head's summed update cut to its largest singular directions
        [--local-steps 1 4]     k DP-SGD steps a round on Poisson samples of rate 1/k (σ solved for them):
                                one client, central DP-SGD; several, each institution's own steps from
                                the global model, averaged by records (not one central step any more)
        [--sampled-rounds]      with several clients, each of the k steps is a round of its own: one
                                central step at rate 1/k with noise σ·C·√m (train.sample_rate)

Each DP run also reports the head's summed update's largest singular values next to the edge of its
noise's spectrum, σ·C·√m·√(Σ_t lr_t²)/n·(√rows + √cols): singular values at that edge are noise's.

Scores the validation split (utility.py's splits; never the test split unless --mode test) and prints
one JSON line per run with its accuracy curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from utility import mode_split, splits  # noqa: E402

from fedtune.config import LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from fedtune.data.federated import sort_labels  # noqa: E402
from fedtune.models.build import build_model, load_tokenizer  # noqa: E402
from fedtune.models.head_init import init_head_from_label_names  # noqa: E402

LAST = 5  # MiniLM-L6's last layer


class Tail(torch.nn.Module):
    """The last encoder layer (with its LoRA), masked mean pooling and the head of a PEFT classifier."""

    def __init__(self, peft_model: torch.nn.Module) -> None:
        super().__init__()
        inner = peft_model.base_model.model
        self.layer = inner.bert.encoder.layer[LAST]
        self.classifier = inner.classifier
        self.dropout = inner.dropout

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pooled(hidden, mask)))

    def pooled(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        out = self.layer(hidden, attention_mask=additive)
        out = out[0] if isinstance(out, tuple) else out
        weights = mask.to(out.dtype).unsqueeze(-1)
        return (out * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def cached_inputs(model, tokenizer, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of the last layer for every text (its frozen prefix run once), and the masks."""
    hidden, masks = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(texts), 256):
            enc = tokenizer(texts[start:start + 256], truncation=True, max_length=max_length,
                            padding="max_length", return_tensors="pt")
            out = model.base_model.model.bert(**enc, output_hidden_states=True)
            hidden.append(out.hidden_states[LAST])
            masks.append(enc["attention_mask"])
    return torch.cat(hidden), torch.cat(masks)


def chunks(hidden, mask, labels, size=512):
    for start in range(0, len(labels), size):
        m = mask[start:start + size]
        width = int(m.sum(1).max())
        yield hidden[start:start + size, :width], m[:, :width], labels[start:start + size]


def clipped_sum(tail: GradSampleModule, params, hidden, mask, labels, clip: float | None):
    """Σ_x clip_C(g_x) over every record (clip None: the plain gradient sum, no DP)."""
    total = [torch.zeros_like(p) for p in params]
    tail.train()
    for h, m, y in chunks(hidden, mask, labels):
        loss = torch.nn.functional.cross_entropy(tail(h, m), y, reduction="sum")
        loss.backward()
        grads = [p.grad_sample for p in params]
        if clip is not None:
            norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads]).norm(dim=0)
            factor = (clip / (norms + 1e-6)).clamp(max=1.0)
            grads = [g * factor.view(-1, *([1] * (g.dim() - 1))) for g in grads]
        for t, g in zip(total, grads, strict=True):
            t += g.sum(0)
        for p in params:
            p.grad_sample = None
            p.grad = None
    return total


def accuracy(tail, hidden, mask, labels) -> float:
    tail.eval()
    right = 0
    with torch.no_grad():
        for h, m, y in chunks(hidden, mask, labels, 1024):
            right += int((tail(h, m).argmax(-1) == y).sum())
    return right / len(labels)


def emulate(data: dict, lr: float, rounds: int, clients: int, epsilon: float | None, seed: int,
            clip: float = 1.0, delta: float = 1e-5, r: int = 2, train_fraction: float = 0.9,
            schedule: str = "constant", head_scale: float = 0.0, backoff: float = 0.0, train: str = "all",
            truncate_head: tuple[int, ...] = (), local_steps: int = 1, sampled_rounds: bool = False) -> dict:
    """One run: `clients` = m noise draws per round (1: central or distributed DP); epsilon None: no DP.
    local_steps k > 1: k DP-SGD steps a round, each on a Poisson sample of rate 1/k, σ solved for that
    rate and rounds x k steps, the noised sum divided by the expected batch (Opacus'). With m > 1 the
    steps no longer reduce to one central step: federated_local_steps() runs each institution's.
    sampled_rounds: each of the k steps is a round of its own (train.sample_rate = 1/k), every institution's
    one sampled step summed by FedAvg: one central step at rate 1/k whose noise is σ·C·√m (the union of the
    institutions' Poisson samples is one Poisson sample of every record)."""
    if local_steps > 1 and clients != 1 and not sampled_rounds:
        return federated_local_steps(data, lr, rounds, clients, epsilon, seed, clip, delta, r, train_fraction,
                                     schedule, head_scale, local_steps)
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, alpha=2.0 * r, modules_to_save=(),
                      target_modules=(f"layer.{LAST}.attention.self.query", f"layer.{LAST}.attention.self.value"))
    model = build_model(ModelConfig(pooling="mean"), lora, len(data["labels"]), seed)
    frozen = [p for name, p in Tail(model).named_parameters() if p.requires_grad and (
        (train == "lora" and "lora_" not in name) or (train == "head" and "lora_" in name))]
    for p in frozen:  # --train lora: the head stays at its start; head: LoRA stays at zero
        p.requires_grad_(False)
    tail = GradSampleModule(Tail(model))
    params = [p for p in tail.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in [*params, *frozen]]  # the head init below changes a frozen head too
    if head_scale:  # fedtune's model.head_init = "label-names", with rows of norm head_scale
        init_head_from_label_names(model, list(data["labels"]), load_tokenizer(""), 64, norm=head_scale)
    # fedtune clients keep data.client_val_fraction (10%) of their records aside: train on the rest
    n = int(len(data["train_y"]) * train_fraction)
    hidden, mask, labels = data["train_h"][:n], data["train_m"][:n], data["train_y"][:n]
    rate = 1.0 / local_steps
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate,
                                 steps=rounds * local_steps, accountant="prv") if epsilon else 0.0
    sampling = torch.Generator().manual_seed(20_000 + seed)
    noise = torch.Generator().manual_seed(10_000 + seed)
    curve = [accuracy(tail, data["val_h"], data["val_m"], data["val_y"])]
    head = next((p for name, p in tail.named_parameters()  # the head's weight: peft's trained copy
                 if p.requires_grad and ".classifier." in name and name.endswith(".weight")), None)
    head_start = head.detach().clone() if head is not None else None
    step_sizes = []  # lr_t · server rate / n: what scales each round's noise on the weights
    t0 = time.time()
    rates = TrainConfig(optimizer="sgd", learning_rate=lr, lr_schedule=schedule)
    server_rate, previous, cosines = 1.0, None, []
    for round_ in range(1, rounds + 1):
        lr_now = rates.learning_rate_at(round_, rounds)
        for _ in range(local_steps - 1):  # the round's first k - 1 steps; the last one runs below
            picked = torch.rand(n, generator=sampling) < rate
            grads = clipped_sum(tail, params, hidden[picked], mask[picked], labels[picked], clip if epsilon else None)
            with torch.no_grad():
                for p, g in zip(params, grads, strict=True):
                    if epsilon:
                        g += torch.randn(g.shape, generator=noise) * sigma * clip * math.sqrt(clients)
                    p -= lr_now * g / (n * rate)
        if local_steps > 1:
            picked = torch.rand(n, generator=sampling) < rate
            grads = clipped_sum(tail, params, hidden[picked], mask[picked], labels[picked], clip if epsilon else None)
        else:
            grads = clipped_sum(tail, params, hidden, mask, labels, clip if epsilon else None)
        with torch.no_grad():
            if epsilon:
                for g in grads:
                    g += torch.randn(g.shape, generator=noise) * sigma * clip * math.sqrt(clients)
            step = torch.cat([g.flatten() for g in grads])
            if previous is not None:  # post-processing of the noised steps: no privacy cost
                cosines.append(round(float(torch.nn.functional.cosine_similarity(step, previous, dim=0)), 3))
                if backoff and cosines[-1] < -backoff:
                    server_rate /= 2  # successive steps point against each other: the rate overshoots
            previous = step
            for p, g in zip(params, grads, strict=True):
                p -= server_rate * lr_now * g / (n * rate)
            step_sizes.append(server_rate * lr_now / (n * rate))
        curve.append(accuracy(tail, data["val_h"], data["val_m"], data["val_y"]))
    spectrum = head_spectrum(tail, data, head, head_start, sigma * clip * math.sqrt(clients), step_sizes,
                             truncate_head) if epsilon and head is not None else {}
    with torch.no_grad():
        for p, s in zip([*params, *frozen], start, strict=True):
            p.copy_(s)  # build_model's cache hands the same model to the next run
    tail._close()  # and its modules must not keep this wrapper's hooks
    for p in frozen:
        p.requires_grad_(True)
    late = curve[-5:]
    return {"lr": lr, "schedule": schedule, "rounds": rounds, "clients": clients, "epsilon": epsilon,
            "sigma": round(sigma, 3),
            "seed": seed, "r": r, "head_scale": head_scale, "backoff": backoff, "cosines": cosines,
            "train": train, "trained_values": sum(p.numel() for p in params), "local_steps": local_steps,
            "sampled_rounds": sampled_rounds,
            "server_rate": server_rate,
            **spectrum,
            "final": curve[-1], "best": max(curve), "late_spread": max(late) - min(late),
            "curve": [round(a, 3) for a in curve], "wall_s": round(time.time() - t0, 1)}


def federated_local_steps(data: dict, lr: float, rounds: int, clients: int, epsilon: float | None, seed: int,
                          clip: float, delta: float, r: int, train_fraction: float, schedule: str,
                          head_scale: float, local_steps: int, alpha: float = 0.5) -> dict:
    """FedAvg over `clients` institutions (Dirichlet α over the labels, fedtune's partitioner), each taking
    `local_steps` DP-SGD steps a round from the global model on Poisson samples of rate 1/k of its own
    records, with its own noise; the server averages the updates weighted by records. Trains LoRA and the head."""
    from fedtune.data.partition import partition_indices

    torch.manual_seed(seed)
    lora = LoraConfig(r=r, alpha=2.0 * r, modules_to_save=(),
                      target_modules=(f"layer.{LAST}.attention.self.query", f"layer.{LAST}.attention.self.value"))
    model = build_model(ModelConfig(pooling="mean"), lora, len(data["labels"]), seed)
    tail = GradSampleModule(Tail(model))
    params = [p for p in tail.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    if head_scale:
        init_head_from_label_names(model, list(data["labels"]), load_tokenizer(""), 64, norm=head_scale)
    n = int(len(data["train_y"]) * train_fraction)
    hidden, mask, labels = data["train_h"][:n], data["train_m"][:n], data["train_y"][:n]
    parts = [torch.tensor(sorted(part)) for part in
             partition_indices(labels.tolist(), list(range(n)), clients, "dirichlet", alpha, seed)]
    rate = 1.0 / local_steps
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate,
                                 steps=rounds * local_steps, accountant="prv") if epsilon else 0.0
    noise, sampling = torch.Generator().manual_seed(10_000 + seed), torch.Generator().manual_seed(20_000 + seed)
    rates = TrainConfig(optimizer="sgd", learning_rate=lr, lr_schedule=schedule)
    curve, t0 = [accuracy(tail, data["val_h"], data["val_m"], data["val_y"])], time.time()
    for round_ in range(1, rounds + 1):
        lr_now = rates.learning_rate_at(round_, rounds)
        global_ = [p.detach().clone() for p in params]
        update = [torch.zeros_like(p) for p in params]
        for part in parts:
            with torch.no_grad():
                for p, g in zip(params, global_, strict=True):
                    p.copy_(g)
            for _ in range(local_steps):
                picked = part[torch.rand(len(part), generator=sampling) < rate]
                grads = clipped_sum(tail, params, hidden[picked], mask[picked], labels[picked],
                                    clip if epsilon else None)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        if epsilon:
                            g += torch.randn(g.shape, generator=noise) * sigma * clip
                        p -= lr_now * g / (len(part) * rate)
            with torch.no_grad():
                for u, p, g in zip(update, params, global_, strict=True):
                    u += (p - g) * len(part) / n
        with torch.no_grad():
            for p, g, u in zip(params, global_, update, strict=True):
                p.copy_(g + u)
        curve.append(accuracy(tail, data["val_h"], data["val_m"], data["val_y"]))
    with torch.no_grad():
        for p, s in zip(params, start, strict=True):
            p.copy_(s)
    tail._close()
    late = curve[-5:]
    return {"lr": lr, "schedule": schedule, "rounds": rounds, "clients": clients, "epsilon": epsilon,
            "sigma": round(sigma, 3), "seed": seed, "r": r, "head_scale": head_scale, "train": "all",
            "local_steps": local_steps, "records": [len(part) for part in parts],
            "final": curve[-1], "best": max(curve), "late_spread": max(late) - min(late),
            "curve": [round(a, 3) for a in curve], "wall_s": round(time.time() - t0, 1)}


def head_spectrum(tail, data: dict, head, head_start, noise_std: float, step_sizes: list[float],
                  ranks: tuple[int, ...]) -> dict:
    """The head's summed update D = W_T − W_0: its largest singular values, the edge of its noise's
    spectrum (a rows x cols Gaussian matrix of entry std s has largest singular value about
    s·(√rows + √cols)), and the accuracy with D cut to each of `ranks` singular directions (post-processing
    of the released model: no privacy cost). Leaves the head at W_T."""
    with torch.no_grad():
        final = head.detach().clone()
        u, values, vh = torch.linalg.svd(final - head_start, full_matrices=False)
        entry_std = noise_std * math.sqrt(sum(size**2 for size in step_sizes))
        out = {"head_singular_values": [round(float(v), 3) for v in values[:8]],
               "head_noise_edge": round(entry_std * (math.sqrt(final.shape[0]) + math.sqrt(final.shape[1])), 3)}
        for k in ranks:
            head.copy_(head_start + (u[:, :k] * values[:k]) @ vh[:k])
            out[f"final_head_rank_{k}"] = accuracy(tail, data["val_h"], data["val_m"], data["val_y"])
        head.copy_(final)
    return out


def records(name: str, mode: str, demo_examples: int) -> tuple[list, list]:
    """(train, scored) records; `demo`: fedtune's generated demo set, 20% held out as in a run."""
    if name != "demo":
        return mode_split(splits(name), mode, quick=False)
    from fedtune.data.demo import make_demo_dataset
    from fedtune.data.partition import holdout_split

    examples = [(e.text, str(e.label)) for e in make_demo_dataset(demo_examples, seed=0)]
    train_idx, held_idx = holdout_split(len(examples), 0.2, 0)
    return [examples[i] for i in train_idx], [examples[i] for i in held_idx]


def load(name: str, mode: str, max_length: int, demo_examples: int = 6000) -> dict:
    train, scored = records(name, mode, demo_examples)
    labels = sort_labels({label for _, label in train + scored})
    index = {label: i for i, label in enumerate(labels)}
    model = build_model(ModelConfig(pooling="mean"), LoraConfig(r=2, alpha=4.0, modules_to_save=()), len(labels), 0)
    tokenizer = load_tokenizer("")
    th, tm = cached_inputs(model, tokenizer, [t for t, _ in train], max_length)
    vh, vm = cached_inputs(model, tokenizer, [t for t, _ in scored], max_length)
    return {"labels": labels, "train_h": th, "train_m": tm, "train_y": torch.tensor([index[y] for _, y in train]),
            "val_h": vh, "val_m": vm, "val_y": torch.tensor([index[y] for _, y in scored])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["phrasebank", "banking77", "medical"])
    parser.add_argument("--mode", default="validation", choices=["validation", "test"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[3.0])
    parser.add_argument("--rounds", nargs="+", type=int, default=[30])
    parser.add_argument("--clients", nargs="+", type=int, default=[20])
    parser.add_argument("--epsilon", nargs="+", type=float, default=[8.0], help="0: no DP")
    parser.add_argument("--r", nargs="+", type=int, default=[2])
    parser.add_argument("--schedules", nargs="+", default=["constant"])
    parser.add_argument("--head-scales", nargs="+", type=float, default=[0.0],
                        help="0: the head's random init; s > 0: rows from the label names' embeddings, norm s")
    parser.add_argument("--backoffs", nargs="+", type=float, default=[0.0],
                        help="0: off; b > 0: halve the rate whenever two successive (noised) steps have "
                             "cosine below -b")
    parser.add_argument("--train", nargs="+", choices=["all", "lora", "head"], default=["all"],
                        help="What is trained (and noised): LoRA and the head, LoRA alone, or the head alone")
    parser.add_argument("--truncate-head", nargs="*", type=int, default=[],
                        help="Also score the head's summed update cut to each of these numbers of singular directions")
    parser.add_argument("--local-steps", nargs="+", type=int, default=[1],
                        help="DP-SGD steps a round on Poisson samples of rate 1/k (one client only) [default: 1]")
    parser.add_argument("--sampled-rounds", action="store_true",
                        help="with several clients, each local step is a round of its own (train.sample_rate)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--demo-examples", type=int, default=6000)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("EMULATOR_THREADS", "2")))
    for name in args.datasets:
        data = load(name, args.mode, args.max_length, args.demo_examples)
        for eps in args.epsilon:
            for clients in args.clients:
                for rounds in args.rounds:
                    for lr in args.lrs:
                        for r in args.r:
                            for schedule in args.schedules:
                                for seed in args.seeds:
                                    for scale in args.head_scales:
                                        for backoff in args.backoffs:
                                            for train in args.train:
                                                for k in args.local_steps:
                                                    result = emulate(data, lr, rounds, clients, eps or None, seed,
                                                                     r=r, schedule=schedule, head_scale=scale,
                                                                     backoff=backoff, train=train,
                                                                     truncate_head=tuple(args.truncate_head),
                                                                     local_steps=k,
                                                                     sampled_rounds=args.sampled_rounds)
                                                    print(json.dumps({"dataset": name, **result}), flush=True)


if __name__ == "__main__":
    main()
