"""What a client's per-round ε costs, before and after caching one step's RDP (not a test).

Each round a client reports ε under both accountants for its whole history (privacy/accountant.py).
Under sampled rounds (train.sample_rate) the history grows by one step a round, so no two rounds share
an ε and every report composed the RDP series afresh. This prints, side by side in one run, the time of
a run's worth of RDP ε reports through Opacus' RDPAccountant and through fedtune's cache, and of the PRV
reports (the ledger's main accountant) through Opacus' PRVAccountant and through fedtune's, whose
discretisation domain is bounded with the same cache, and checks that every ε is equal to the bit.

    python bench/accounting_cost.py [--rounds 120] [--sample-rate 0.25] [--sigma 1.84]
"""

from __future__ import annotations

import argparse
import time

from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune.privacy.accountant import _epsilon


def opacus_epsilon(kind: type, history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = kind()
    accountant.history = history
    return float(accountant.get_epsilon(delta=delta))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=120)
    parser.add_argument("--sample-rate", type=float, default=0.25)
    parser.add_argument("--sigma", type=float, default=1.84)  # σ for ε = 8 over 120 steps at q = 1/4
    parser.add_argument("--delta", type=float, default=1e-5)
    args = parser.parse_args()
    histories = [[(args.sigma, args.sample_rate, r)] for r in range(1, args.rounds + 1)]
    timings = {}
    start = time.perf_counter()
    opacus_rdp = [opacus_epsilon(RDPAccountant, h, args.delta) for h in histories]
    timings["RDP, Opacus' RDPAccountant"] = time.perf_counter() - start
    start = time.perf_counter()
    cached_rdp = [_epsilon("rdp", tuple(h), args.delta) for h in histories]
    timings["RDP, fedtune (one step's RDP cached)"] = time.perf_counter() - start
    every = max(args.rounds // 10, 1)  # PRV is slow: every 10th round, its time scaled to all of them
    start = time.perf_counter()
    opacus_prv = [opacus_epsilon(PRVAccountant, h, args.delta) for h in histories[every - 1::every]]
    timings["PRV, Opacus' PRVAccountant"] = (time.perf_counter() - start) * every
    start = time.perf_counter()
    cached_prv = [_epsilon("prv", tuple(h), args.delta) for h in histories[every - 1::every]]
    timings["PRV, fedtune (domain from the cache)"] = (time.perf_counter() - start) * every
    assert cached_rdp == opacus_rdp and cached_prv == opacus_prv, "the cache must give Opacus' ε exactly"
    print(f"{args.rounds} rounds at q = {args.sample_rate}, σ = {args.sigma}: ε after the last round "
          f"{opacus_prv[-1]:.3f} (PRV), {opacus_rdp[-1]:.3f} (RDP), equal to the bit in every round computed")
    for name, seconds in timings.items():
        print(f"  {name:<40} {seconds:7.2f} s  ({seconds / args.rounds * 1000:6.1f} ms a round)")
    for kind, opacus, ours in [("RDP", "RDP, Opacus' RDPAccountant", "RDP, fedtune (one step's RDP cached)"),
                               ("PRV", "PRV, Opacus' PRVAccountant", "PRV, fedtune (domain from the cache)")]:
        print(f"  {kind} reports: {timings[opacus] / timings[ours]:.1f} times faster with the cache")


if __name__ == "__main__":
    main()
