"""An institution's own privacy policy: the weakest protection it will train under, whatever the
server's message asks for.

The run config reaches a client inside the server's message, so in a deployment the coordinator
chooses it. An institution that needs its guarantee to hold against the coordinator sets its
limits in its SuperNode's node config; a request that breaks them is refused (the client records
the refusal and replies `refused` with the reason) and no record is touched.

Whose policy applies (`node_policy`):
- A node that reads its own file (node config `data-path`) is an institution. Its defaults are
  strict: DP-SGD required, δ at most 10⁻⁵, reproducible noise refused, scores withheld, and a
  node-local `state-dir` required for its privacy state. Two limits have no default, since no value
  suits every institution: without `epsilon-budget` the coordinator's run config decides how much ε
  it spends, and without `min-noise-multiplier` how small σ may be (every round's ε is recorded
  either way, from what the client ran).
- A node that trains on a partition of the run's own dataset (`partition-id`, as `fedtune
  simulate` and Flower's simulation give every node) holds no data of its own: the data is the
  coordinator's. Keys its node config leaves out default to the run config, and its state goes
  where the server names if it sets no `state-dir`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedtune import constants as k
from fedtune.config import DPConfig, FedtuneConfig
from fedtune.errors import ConfigError
from fedtune.privacy.budget import solve_noise_multiplier

# Whose policy a client applied (ledger `policy`): an institution's own; the run's, for a node training on
# a partition of the run's own data; or the run's with limits the node's operator set in its node config.
SOURCES = ("node config", "run config", "run config and node config")

# Node config keys, their types and what each means (also the text of a refused value's error).
KEYS: dict[str, tuple[type, str]] = {
    k.NODE_STATE_DIR: (str, "a directory on this node for its privacy state, e.g. \"/secure/fedtune\""),
    k.NODE_REQUIRE_DP: (bool, "true (train only under DP-SGD with noise) or false"),
    k.NODE_EPSILON_BUDGET: (float, "a positive ε such as 8.0"),
    k.NODE_MAX_DELTA: (float, "a δ in (0, 1) such as 1e-5"),
    k.NODE_MIN_NOISE_MULTIPLIER: (float, "a noise multiplier >= 0 such as 0.8"),
    k.NODE_ALLOW_REPRODUCIBLE_NOISE: (bool, "false (the default) or true"),
    k.NODE_ADOPT_LEDGER_SPENDING: (bool, "true, once, after this node lost its privacy state"),
    k.NODE_PRIVACY_UNIT: (str, "\"user\" (train only under user-level DP) or \"record\" (either unit)"),
    k.NODE_RELEASE_SCORES: (bool, "false (the default: under DP, send no training loss and no validation scores) "
                                  "or true"),
    k.NODE_MAX_NOISE_SHARERS: (int, "0 (the default: add all of its noise itself) or the largest t of distributed "
                                    "DP it trusts, e.g. 4"),
}


@dataclass(frozen=True)
class PrivacyPolicy:
    """What an institution allows. `source` says where it came from, for refusals and the report."""

    state_dir: str = ""  # empty: no node-local place for the privacy state (an institution then refuses)
    require_dp: bool = True
    epsilon_budget: float = math.inf
    # An institution's default: the common choice, far below 1/n for any n up to 10⁴. Without a cap a coordinator
    # could ask for δ just under 1/n, where the mechanism may release about one record outright. δ < 1/n is
    # always checked as well.
    max_delta: float = 1e-5
    min_noise_multiplier: float = 0.0
    allow_reproducible_noise: bool = False
    adopt_ledger_spending: bool = False  # the operator's explicit reset after a lost state (client/app.py)
    privacy_unit: str = "record"  # the narrowest unit it accepts: `user` refuses record-level runs
    # Distributed DP: the largest t (institutions sharing the noise) it accepts; it then adds σ/√t and relies on
    # t − 1 others and on SecAgg+. 0: it adds all of σ itself and refuses distributed DP.
    max_noise_sharers: int = 0
    # Under DP, whether the client sends its training loss and its validation loss and accuracy. They are
    # computed from its records without noise, outside ε (docs/privacy.md); false sends NaN in their place.
    release_scores: bool = False
    named: bool = True  # the node config gives `client-name`, which its privacy state is filed under
    source: str = SOURCES[0]  # one of SOURCES

    def __post_init__(self) -> None:
        if not self.epsilon_budget > 0:
            raise ConfigError(f"Invalid node config `{k.NODE_EPSILON_BUDGET}`: {self.epsilon_budget!r}; use "
                              f"{KEYS[k.NODE_EPSILON_BUDGET][1]}.")
        if not 0 < self.max_delta <= 1:
            raise ConfigError(f"Invalid node config `{k.NODE_MAX_DELTA}`: {self.max_delta!r}; use "
                              f"{KEYS[k.NODE_MAX_DELTA][1]}.")
        if not 0 <= self.min_noise_multiplier < math.inf:
            raise ConfigError(f"Invalid node config `{k.NODE_MIN_NOISE_MULTIPLIER}`: {self.min_noise_multiplier!r}; "
                              f"use {KEYS[k.NODE_MIN_NOISE_MULTIPLIER][1]}.")
        if isinstance(self.max_noise_sharers, bool) or self.max_noise_sharers < 0:
            raise ConfigError(f"Invalid node config `{k.NODE_MAX_NOISE_SHARERS}`: {self.max_noise_sharers!r}; use "
                              f"{KEYS[k.NODE_MAX_NOISE_SHARERS][1]}.")
        if self.privacy_unit not in ("record", "user"):
            raise ConfigError(f"Invalid node config `{k.NODE_PRIVACY_UNIT}`: {self.privacy_unit!r}; use "
                              f"{KEYS[k.NODE_PRIVACY_UNIT][1]}.")

    @property
    def institution(self) -> bool:
        return self.source == SOURCES[0]

    @property
    def needs_dp(self) -> bool:
        """Whether it trains only with noise: `require-dp`, or an ε cap that a round without noise (ε = ∞)
        would break."""
        return self.require_dp or math.isfinite(self.epsilon_budget)

    def withholds_scores(self, dp: DPConfig) -> bool:
        """Whether this client sends NaN for its loss and accuracy figures: under DP (record-level or
        client-level, neither of which covers them), unless released. Decided by the policy as well as by the
        message: a coordinator that says DP is off in an evaluate message of an institution that trains only
        under DP gets no noise-free scores of its records either."""
        return (self.needs_dp or dp.enabled or dp.client_dp != "off") and not self.release_scores

    def refusal(self, dp: DPConfig, num_examples: int) -> str | None:
        """Why a round under `dp` (σ already resolved) breaks this policy, or None. One sentence
        naming the run option and the node config key, for the ledger and the operator.
        `num_examples`: n, the count of dp.unit (records, or users)."""
        if self.institution and not self.state_dir:
            return (f"no node-local `{k.NODE_STATE_DIR}` in the node config: this institution keeps its privacy "
                    "state only on its own disk; set state-dir to a private directory")
        if not self.state_dir and dp.enabled:  # a node on the run's data outside simulation (no server path)
            return (f"no `{k.NODE_STATE_DIR}` in the node config: without one this node's privacy history lives only "
                    "in its SuperNode's memory, and a restart would start its ε again from nothing; set state-dir "
                    "to a private directory")
        if self.institution and not self.named:
            return (f"no `{k.NODE_CLIENT_NAME}` in the node config: this institution's privacy state is filed under "
                    "its name, and without one it would be the node id, which changes when the node is registered "
                    "again, so its ε would restart from nothing; set client-name to the name it is registered under")
        if not dp.enabled or dp.noise_multiplier == 0:
            asked = "dp.enabled = false" if not dp.enabled else "dp.noise_multiplier = 0"
            if self.require_dp:
                return f"the run asks for training without noise ({asked}), but `{k.NODE_REQUIRE_DP}` is true"
            if self.needs_dp:
                return (f"the run asks for training without noise ({asked}), which spends an unbounded ε, but "
                        f"`{k.NODE_EPSILON_BUDGET}` caps it at {self.epsilon_budget:g}")
            return None
        if dp.reproducible_noise and not self.allow_reproducible_noise:
            return ("the run asks for dp.reproducible_noise, noise derived from a seed the server knows, but "
                    f"`{k.NODE_ALLOW_REPRODUCIBLE_NOISE}` is false")
        if self.privacy_unit == "user" and dp.unit != "user":
            return (f"the run protects single records (dp.unit = {dp.unit}), but `{k.NODE_PRIVACY_UNIT}` is "
                    "\"user\": this institution trains only under user-level DP")
        if dp.delta > self.max_delta:
            return f"the run asks for dp.delta = {dp.delta:g}, above `{k.NODE_MAX_DELTA}` = {self.max_delta:g}"
        if dp.delta * num_examples >= 1:
            return (f"the run asks for dp.delta = {dp.delta:g}, which is not below 1/n for this institution's "
                    f"n = {num_examples} training {dp.unit}s")
        if dp.distributed_min_honest > self.max_noise_sharers:
            return (f"the run asks each institution to add only 1/√{dp.distributed_min_honest} of the noise "
                    f"(dp.distributed_min_honest = {dp.distributed_min_honest}), relying on the others and on "
                    f"SecAgg+, but `{k.NODE_MAX_NOISE_SHARERS}` is {self.max_noise_sharers}")
        if dp.noise_multiplier < self.min_noise_multiplier:
            return (f"the run's noise multiplier {dp.noise_multiplier:.4g} is below `{k.NODE_MIN_NOISE_MULTIPLIER}` "
                    f"= {self.min_noise_multiplier:g}")
        return None

    def tighten(self, dp: DPConfig, rounds: int, sample_rate: float = 0.0) -> DPConfig:
        """The run's DP settings under this policy's ε budget: the lower budget applies, and a
        target ε above it is lowered to it, so the noise is solved for what the institution allows.
        Under distributed DP the σ stays the run's (solved for its target over the `rounds` each client
        trains, one step each, on every record or at train.sample_rate): a round's sum carries σ only if
        every share is of the same σ (docs/privacy.md), and a larger σ of one institution's own would not
        protect it, whose guarantee rests on the others' shares too. It declines rounds sooner instead."""
        if self.epsilon_budget >= dp.epsilon_budget:
            return dp
        budget = self.epsilon_budget
        if dp.distributed_min_honest and dp.target_epsilon > budget:
            sigma = solve_noise_multiplier(dp.target_epsilon, dp.delta, sample_rate or 1.0, rounds, dp.accounting)
            return dataclasses.replace(dp, epsilon_budget=budget, target_epsilon=0.0, noise_multiplier=sigma)
        return dataclasses.replace(dp, epsilon_budget=budget, target_epsilon=min(dp.target_epsilon, budget))


# Every node config key a fedtune ClientApp reads; a key that is a near miss of one is refused (misspelled).
READ_KEYS = (*KEYS, k.NODE_CLIENT_NAME, k.NODE_LORA_RANK, k.PARTITION_ID, k.NUM_PARTITIONS, k.DATA_PATH,
             k.DATA_FORMAT, k.DATA_TEXT_COLUMN, k.DATA_LABEL_COLUMN, k.DATA_SEPARATOR, k.DATA_ENCODING,
             k.DATA_USER_COLUMN, k.DATA_VAL_FRACTION)


def misspelled_key(node_config: Mapping[str, Any]) -> str | None:
    """Why one of the node config's keys looks like a misspelling of a key fedtune reads, or None. An
    `epsilon_budget` (the run config's spelling) would otherwise be ignored without a word, and the
    institution would train with no cap of its own. Other unknown keys (another app's) pass."""
    import difflib

    for key in node_config:
        if key in READ_KEYS:
            continue
        near = difflib.get_close_matches(key.lower().replace("_", "-").replace(".", "-"), READ_KEYS, n=1,
                                         cutoff=0.85)
        if near:
            return (f"Unknown node config key `{key}`: did you mean `{near[0]}`? A misspelled limit would be "
                    "ignored, so this node trains nothing until its node config is corrected.")
    return None


def node_policy(node_config: Mapping[str, Any], cfg: FedtuneConfig, server_state_dir: str) -> PrivacyPolicy:
    """The policy this node trains under (see the module docstring for whose it is)."""
    if problem := misspelled_key(node_config):
        raise ConfigError(problem)
    own = {key: _read(node_config, key) for key in KEYS if key in node_config}
    values = {key.replace("-", "_"): value for key, value in own.items()}
    if k.DATA_PATH in node_config or k.PARTITION_ID not in node_config:
        return PrivacyPolicy(**values, named=k.NODE_CLIENT_NAME in node_config, source=SOURCES[0])
    # Without DP the run's budget bounds nothing it asks for: it is no limit of the node's (needs_dp).
    budget = cfg.dp.epsilon_budget if cfg.dp.enabled else math.inf
    run = dict(state_dir=server_state_dir, require_dp=cfg.dp.enabled, epsilon_budget=budget,
               max_delta=cfg.dp.delta, allow_reproducible_noise=cfg.dp.reproducible_noise,
               max_noise_sharers=cfg.dp.distributed_min_honest, release_scores=True)
    limits = set(own) - {k.NODE_STATE_DIR}
    return PrivacyPolicy(**{**run, **values}, source=SOURCES[2] if limits else SOURCES[1])


def _read(node_config: Mapping[str, Any], key: str) -> Any:
    """One node config value, checked against its key's type (Flower parses TOML values)."""
    value, (kind, hint) = node_config[key], KEYS[key]
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is not str or value.strip()):
        return value
    raise ConfigError(f"Invalid node config `{key}`: {value!r}; use {hint}.")
