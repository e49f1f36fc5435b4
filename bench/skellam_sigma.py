"""The noise distributed DP's integer shares cost: σ for a target ε by the Skellam accountant (the sampled
Gaussian's RDP at integer orders only; privacy/skellam.py) next to Opacus' PRV and RDP for Gaussian noise, at the
recipe's schedules (30 full-batch rounds, or k rounds of one step at q = 1/k for each). Prints the ratios.

    python bench/skellam_sigma.py [--epsilon 8] [--delta 1e-5] [--rounds 30]
"""

from __future__ import annotations

import argparse
import time

from fedtune.privacy.budget import solve_noise_multiplier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print(f"σ for ε = {args.epsilon:g} at δ = {args.delta:g}, {args.rounds} full-batch rounds or k sampled rounds each")
    print("| k (q = 1/k) | steps | PRV σ | RDP σ | Skellam σ | Skellam / PRV | seconds (Skellam) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for k in (1, 2, 4, 8):
        q, steps = 1.0 / k, args.rounds * k
        prv = solve_noise_multiplier(args.epsilon, args.delta, q, steps, "prv")
        rdp = solve_noise_multiplier(args.epsilon, args.delta, q, steps, "rdp")
        start = time.perf_counter()
        skellam = solve_noise_multiplier(args.epsilon, args.delta, q, steps, "skellam")
        took = time.perf_counter() - start
        print(f"| {k} | {steps} | {prv:.3f} | {rdp:.3f} | {skellam:.3f} | {skellam / prv:.2f} | {took:.1f} |")


if __name__ == "__main__":
    main()
