"""What does DP-SGD cost a client's LoRA training on a GPU, and which clipping mode should it use? (not a test)

Issue #23's GPU row, prepared to run in one short call when a GPU machine is lent (it also runs on
CPU, small, as a smoke check). One process, the causal-LM task on SmolLM2-135M (fedtune's offline
default LM) with fedtune's own LoRA, side by side for each sequence length T:
  nodp   fedtune's client training loop (client/train.py::train_round), DP off
  hooks  the same loop with DP-SGD on: Opacus materializes every per-sample gradient of every LoRA
         matrix (fedtune's only mode today)
  ghost  Opacus 1.6's ghost clipping on the same model and batches: per-sample gradient norms from
         activations and backprops (a T x T product per layer and sample), then a second backward
         pass with the clip factors; no per-sample gradient is stored. Wired here from Opacus'
         own parts (GradSampleHooksFastGradientClipping via make_private, DPTensorFastGradientClipping)
         because fedtune does not offer the mode.
Every mode trains on the same synthetic sequences of exactly T tokens (random ids; throughput does
not depend on what the tokens say), SGD, Poisson batches of expected size B for the DP modes. Tokens/s
counts every trained token; memory is the device's peak allocated memory in the mode's run (CPU:
not measured). The ratios hooks/nodp and ghost/nodp are the issue's target (>= 0.8 on the GPU).

Why the rule may favour materializing for LoRA (Li et al. 2022, "Large Language Models Can Be Strong
Differentially Private Learners", section 4, compares the two per layer): for a LoRA factor with
inputs a (T x d_in) and output gradients g (T x d_out), one factor being r wide, the per-sample
gradient g^T a costs T*d_in*d_out FLOPs and d_in*d_out memory per sample; ghost's a a^T and g g^T cost
T^2*(d_in + d_out) FLOPs and T^2 memory. With r*d of 8 x 576 = 4,608 values per factor, ghost is the
cheaper only below T of about 68 tokens. This script measures whether that holds on the device.

    python bench/gpu_throughput.py --device cuda --seq-lens 128 512 --batch-size 32 --steps 8
    python bench/gpu_throughput.py --device cpu --seq-lens 32 --batch-size 4 --steps 2 --ranks 4   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from opacus import PrivacyEngine  # noqa: E402
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fedtune.client.train import train_round  # noqa: E402
from fedtune.config import DPConfig, FedtuneConfig, LoraConfig, ModelConfig, TrainConfig  # noqa: E402
from fedtune.data.chat import TokenizedChats  # noqa: E402
from fedtune.data.text import pad_batch  # noqa: E402
from fedtune.models.causal import fresh_causal_model, sequence_losses  # noqa: E402
from fedtune.privacy.dpsgd import poisson_loader  # noqa: E402

MODES = ("nodp", "hooks", "ghost")


def synthetic(n: int, length: int, vocab: int, seed: int) -> TokenizedChats:
    """n sequences of exactly `length` random token ids, every token a training target."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (n, length), generator=g).tolist()
    return TokenizedChats(tuple(map(tuple, ids)), tuple(map(tuple, ids)))


def run_fedtune(cfg: FedtuneConfig, model: torch.nn.Module, data: TokenizedChats) -> None:
    train_round(model, data, cfg, history=[], proximal_mu=0.0, seed=0)


def run_ghost(cfg: FedtuneConfig, model: torch.nn.Module, data: TokenizedChats) -> None:
    device = torch.device(cfg.model.device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.train.learning_rate)
    loader = poisson_loader(data, cfg.train.batch_size, pad_batch, torch.Generator().manual_seed(0))
    engine = PrivacyEngine(accountant="prv")
    hooks, dp_optimizer, _, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, criterion=torch.nn.CrossEntropyLoss(),
        noise_multiplier=cfg.dp.noise_multiplier, max_grad_norm=cfg.dp.max_grad_norm, poisson_sampling=False,
        wrap_model=False, grad_sample_mode="ghost")
    try:
        for batch in loader:
            if batch is None:
                continue
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = DPTensorFastGradientClipping(hooks, dp_optimizer, sequence_losses(logits, batch["labels"]))
            loss.backward()
            dp_optimizer.step()
            dp_optimizer.zero_grad(set_to_none=True)
    finally:
        hooks.cleanup()


def measure(mode: str, cfg: FedtuneConfig, model: torch.nn.Module, data: TokenizedChats) -> tuple[float, float | None]:
    """(wall seconds, peak device memory in MiB or None on CPU) of one pass over `data`, the model
    already built (as a client's is, once per process)."""
    cuda = cfg.model.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    (run_ghost if mode == "ghost" else run_fedtune)(cfg, model, data)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, torch.cuda.max_memory_allocated() / 2**20 if cuda else None


def config(args: argparse.Namespace, rank: int, mode: str, length: int) -> FedtuneConfig:
    base = FedtuneConfig(model=ModelConfig(task="causal-lm", device=args.device, max_length=length),
                         lora=LoraConfig(r=rank, alpha=2.0 * rank),
                         train=TrainConfig(batch_size=args.batch_size, optimizer="sgd", learning_rate=0.1))
    return replace(base, dp=DPConfig(enabled=mode != "nodp", noise_multiplier=1.0, max_grad_norm=1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--batch-size", type=int, default=32, help="expected (Poisson) batch size B")
    parser.add_argument("--steps", type=int, default=8, help="steps per measured pass: n = B x steps sequences")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    args = parser.parse_args()
    console = Console()
    rows = []
    for rank in args.ranks:
        for length in args.seq_lens:
            data = synthetic(args.batch_size * args.steps, length, vocab=49_152, seed=length)
            warm = synthetic(args.batch_size, length, vocab=49_152, seed=1)
            for mode in args.modes:
                cfg = config(args, rank, mode, length)
                model = fresh_causal_model(cfg.model, cfg.lora, seed=0)
                measure(mode, cfg, model, warm)  # kernels and the allocator warmed, out of the clock
                seconds, memory = measure(mode, cfg, model, data)
                del model
                rows.append({"rank": rank, "seq_len": length, "mode": mode, "seconds": seconds,
                             "tokens_per_s": len(data) * length / seconds, "peak_mib": memory})
                console.print(f"r={rank} T={length} {mode}: {rows[-1]['tokens_per_s']:,.0f} tokens/s")
    for row in rows:
        plain = next(r for r in rows if r["mode"] == "nodp" and r["rank"] == row["rank"]
                     and r["seq_len"] == row["seq_len"]) if "nodp" in args.modes else None
        row["vs_nodp"] = row["tokens_per_s"] / plain["tokens_per_s"] if plain else None
    table = Table(title=f"LoRA training on {args.device}, B = {args.batch_size}, {args.steps} steps a pass")
    for column in ("r", "T", "mode", "tokens/s", "vs nodp", "peak MiB"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["rank"]), str(row["seq_len"]), row["mode"], f"{row['tokens_per_s']:,.0f}",
                      f"{row['vs_nodp']:.2f}" if row["vs_nodp"] else "",
                      f"{row['peak_mib']:,.0f}" if row["peak_mib"] is not None else "n/a")
    console.print(table)
    print(json.dumps({"benchmark": "gpu_throughput", "device": args.device,
                      "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                      "batch_size": args.batch_size, "steps": args.steps, "rows": rows}))


if __name__ == "__main__":
    main()
