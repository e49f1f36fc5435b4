"""How much does federation cost on top of the training itself? (not a test)

One workload, run four ways in this one process, side by side:
  100 clients x 16 examples of the built-in demo data, 2 rounds, every client sampled, LoRA r=8,
  batch size 8, one local epoch per round, no client-side evaluation.
  (a)    fedtune simulate, DP off            (a_dp) the same with DP-SGD on (sigma=1, C=1)
         (fedtune's default resources: one single-threaded worker per core)
  (b)    one central loop over the same examples, same model and batch size: the ceiling
  (c)    a plain Flower app written the way Flower's quickstarts are: the model is built inside
         the client function on every call, batches are padded to the fixed maximum length, and
         the Simulation Engine runs with Flower's default client resources (2 CPUs per client)
Throughput is examples trained per second of round time (Ray start-up excluded for (a) and
(c) alike: both are timed inside their ServerApp). (b) builds its model before its clock starts;
(a)'s workers load theirs while the server evaluates round 0 (server/warm_up.py), and whatever of
that round 1 still had to wait for (`warm_up_wait_s`) is reported beside the ratio, as
`fedtune_vs_central_with_warm_up`. Also reported: useful (non-padding) tokens per
second, and model-FLOP utilization (MFU) against a matrix-multiply peak measured in this run.
Model FLOPs count 4 x (non-embedding base parameters) per useful token: a forward pass (2N) and
the activation gradients of the backward pass (2N); the frozen base needs no weight gradients,
and LoRA's own FLOPs (<1% of N at r=8) and attention's (short texts) are left out, so MFU is a
slight underestimate. Prints a table, then the ratios, and as its last line one JSON object with
`fedtune_vs_central`, `fedtune_vs_stock_flower` and `dp_overhead`.

    python bench/simulation_throughput.py [--clients 100] [--examples-per-client 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from rich.console import Console  # noqa: E402

from fedtune.config import (  # noqa: E402
    DataConfig,
    FedtuneConfig,
    LoraConfig,
    ModelConfig,
    StrategyConfig,
    TrainConfig,
)
from fedtune.data.demo import LABELS  # noqa: E402
from fedtune.data.federated import federated_data  # noqa: E402
from fedtune.data.text import pad_batch, tokenize  # noqa: E402
from fedtune.models.build import build_model, default_model_dir, load_tokenizer  # noqa: E402
from fedtune.server.prepare import preflight  # noqa: E402
from fedtune.server.run_dir import RunDirectory  # noqa: E402
from fedtune.simulation.engine import simulate  # noqa: E402

ROUNDS, BATCH, RANK, MAX_LENGTH = 2, 8, 8, 64
PEAK_SIZE, PEAK_REPEATS = 1024, 20  # square fp32 matmuls for the peak; about a second on 2 cores


def workload(clients: int, per_client: int) -> FedtuneConfig:
    test_fraction = 0.05
    total = round(clients * per_client / (1 - test_fraction)) + 1
    return FedtuneConfig(
        rounds=ROUNDS, clients=clients, seed=0,
        lora=LoraConfig(r=RANK, alpha=2 * RANK),
        train=TrainConfig(batch_size=BATCH, learning_rate=3e-3, local_epochs=1),
        strategy=StrategyConfig(fraction_evaluate=0.0),
        data=DataConfig(demo_examples=total, test_fraction=test_fraction, client_val_fraction=0.0, partition="iid"),
        model=ModelConfig(max_length=MAX_LENGTH),
    )


# ---- (a) fedtune -------------------------------------------------------------------------------

def run_fedtune(cfg: FedtuneConfig, out: Path) -> tuple[int, float, float, float]:
    """Examples trained, seconds of round time, the last round's examples/s, and the seconds round 1
    waited for the workers' one-time imports and model load. Also prints the whole `simulate` call's
    wall time: Ray's start and stop, the server's set-up and round-0 evaluation, and the rounds."""
    preflight(cfg)
    run = RunDirectory.create(out, cfg)
    started = time.perf_counter()
    simulate(cfg, run, Console(stderr=True, quiet=True))
    whole = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    examples = sum(r["train_examples"] for r in rows)
    waited = json.loads((out / "summary.json").read_text())["warm_up_wait_s"]
    rounds = sum(r["train_s"] for r in rows)
    print(f"  simulate() took {whole:.1f} s in all: {rounds:.1f} s of rounds, round 1 waited {waited} s for the "
          f"workers, {whole - rounds - waited:.1f} s for the rest", file=sys.stderr, flush=True)
    return examples, rounds, rows[-1]["train_examples"] / rows[-1]["train_s"], waited


# ---- tokens, FLOPs and the peak --------------------------------------------------------------

def useful_tokens(cfg: FedtuneConfig) -> int:
    """Non-padding tokens in one pass over every client's training examples."""
    fed = federated_data(cfg.data, cfg.clients, cfg.seed)
    indices = [i for split in fed.clients for i in split.train]
    return tokenize(load_tokenizer(""), *fed.select(indices), MAX_LENGTH).num_tokens


def flops_per_token(cfg: FedtuneConfig) -> float:
    model = build_model(cfg.model, cfg.lora, num_labels=len(LABELS), seed=0)
    embeddings = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return 4.0 * (base - embeddings)


def matmul_peak_flops() -> float:
    """Best-of FLOP/s of square fp32 matmuls with torch's threads, as the training uses them."""
    a, b = torch.randn(PEAK_SIZE, PEAK_SIZE), torch.randn(PEAK_SIZE, PEAK_SIZE)
    best = float("inf")
    for _ in range(PEAK_REPEATS):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * PEAK_SIZE**3 / best


# ---- (b) the central ceiling -------------------------------------------------------------------

def run_central(cfg: FedtuneConfig) -> tuple[int, float, float, float]:
    fed = federated_data(cfg.data, cfg.clients, cfg.seed)
    indices = [i for split in fed.clients for i in split.train]
    data = tokenize(load_tokenizer(""), *fed.select(indices), MAX_LENGTH)
    model = build_model(cfg.model, cfg.lora, num_labels=len(LABELS), seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=True, collate_fn=pad_batch)
    model.train()
    started = time.monotonic()
    for _ in range(ROUNDS):
        epoch_started = time.monotonic()
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    last_epoch_s = time.monotonic() - epoch_started
    return len(data) * ROUNDS, time.monotonic() - started, len(data) / last_epoch_s, 0.0  # model built before


# ---- (c) a plain Flower app, quickstart style ------------------------------------------------

def plain_flower_apps(cfg: FedtuneConfig, timing: dict) -> tuple[ServerApp, ClientApp]:
    from peft import LoraConfig as PeftLora
    from peft import TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = str(default_model_dir())

    def net():
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(LABELS))
        lora = PeftLora(task_type=TaskType.SEQ_CLS, r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"])
        return get_peft_model(base, lora)

    def trainable(model) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        model = net()  # built on every call, as the quickstarts do
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict(), strict=False)
        fed = federated_data(cfg.data, cfg.clients, cfg.seed)
        texts, labels = fed.select(fed.clients[int(context.node_config["partition-id"])].train)
        enc = AutoTokenizer.from_pretrained(model_dir)(texts, padding="max_length", truncation=True,
                                                       max_length=MAX_LENGTH, return_tensors="pt")
        dataset = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        model.train()
        for ids, mask, y in torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True):
            model(input_ids=ids, attention_mask=mask, labels=y).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=trainable(model)),
                              "metrics": MetricRecord({"num-examples": len(texts)})})
        return Message(content, reply_to=msg)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        arrays = ArrayRecord(torch_state_dict=trainable(net()))
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=cfg.clients)
        started = time.monotonic()
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=ROUNDS, train_config=ConfigRecord({}))
        timing["seconds"] = time.monotonic() - started

    return server, client


def run_plain_flower(cfg: FedtuneConfig) -> tuple[int, float, None, float]:
    timing: dict = {}
    server, client = plain_flower_apps(cfg, timing)
    # Flower's default client resources (2 CPUs per virtual client), as a quickstart app gets them;
    # only Ray's log level is set, as for (a).
    run_simulation(server_app=server, client_app=client, num_supernodes=cfg.clients,
                   backend_config={"init_args": {"logging_level": "ERROR", "log_to_driver": True}})
    fed = federated_data(cfg.data, cfg.clients, cfg.seed)
    return sum(len(s.train) for s in fed.clients) * ROUNDS, timing["seconds"], None, 0.0  # no warm state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--examples-per-client", type=int, default=16)
    args = parser.parse_args()
    cfg = workload(args.clients, args.examples_per_client)
    off = FedtuneConfig.from_flat({**cfg.to_flat(), "dp.enabled": False})
    on = FedtuneConfig.from_flat({**cfg.to_flat(), "dp.enabled": True})
    results = {}
    peak, per_token, tokens_per_pass = matmul_peak_flops(), flops_per_token(cfg), useful_tokens(cfg)
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads); "
          f"{per_token / 1e6:.1f} MFLOP per useful token", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in [("b_central", lambda: run_central(cfg)),
                          ("a_fedtune", lambda: run_fedtune(off, Path(tmp) / "a")),
                          ("a_fedtune_dp", lambda: run_fedtune(on, Path(tmp) / "a_dp")),
                          ("c_plain_flower", lambda: run_plain_flower(cfg))]:
            examples, seconds, last_rate, waited = run()
            tokens = tokens_per_pass * ROUNDS  # every way trains every example once per round
            results[name] = {"examples": examples, "seconds": round(seconds, 2),
                             "examples_per_s": round(examples / seconds, 2),
                             "useful_tokens_per_s": round(tokens / seconds, 1),
                             "mfu": round(per_token * tokens / seconds / peak, 4),
                             "last_round_examples_per_s": None if last_rate is None else round(last_rate, 2),
                             "warm_up_wait_s": waited}
            print(f"{name:16s} {examples:6d} examples  {seconds:8.1f} s  {examples / seconds:7.2f} ex/s  "
                  f"{tokens / seconds:8.0f} useful tok/s  MFU {results[name]['mfu']:.1%}", file=sys.stderr, flush=True)
    rate = {k: v["examples_per_s"] for k, v in results.items()}
    ratios = {
        "fedtune_vs_central": round(rate["a_fedtune"] / rate["b_central"], 3),  # target >= 0.9
        "fedtune_vs_stock_flower": round(rate["a_fedtune"] / rate["c_plain_flower"], 3),  # target >= 2.0
        "dp_overhead": round(results["a_fedtune_dp"]["seconds"] / results["a_fedtune"]["seconds"], 3),  # <= 1.3
    }
    a = results["a_fedtune"]
    with_warm_up = a["examples"] / (a["seconds"] + a["warm_up_wait_s"]) / rate["b_central"]
    last = {k: v["last_round_examples_per_s"] for k, v in results.items()}
    steady = round(last["a_fedtune"] / last["b_central"], 3)
    print(f"(a)/(b) = {ratios['fedtune_vs_central']} (target >= 0.9)  (a)/(c) = {ratios['fedtune_vs_stock_flower']} "
          f"(target >= 2.0)  DP on / DP off time = {ratios['dp_overhead']} (target <= 1.3)", file=sys.stderr)
    print(f"last round only: (a)/(b) = {steady}; counting round 1's wait for the workers' start-up "
          f"({a['warm_up_wait_s']} s): (a)/(b) = {with_warm_up:.3f}", file=sys.stderr)
    ratios["fedtune_vs_central_last_round"] = steady
    ratios["fedtune_vs_central_with_warm_up"] = round(with_warm_up, 3)
    print(json.dumps({**ratios, "workload": {"clients": cfg.clients, "examples_per_client": args.examples_per_client,
                                             "rounds": ROUNDS, "batch_size": BATCH, "lora_r": RANK,
                                             "cpus": os.cpu_count(), "useful_tokens_per_pass": tokens_per_pass},
                      "matmul_peak_gflops": round(peak / 1e9, 1), "model_flops_per_token": per_token,
                      "results": results}))


if __name__ == "__main__":
    main()
