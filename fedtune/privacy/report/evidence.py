"""The report's evidence: the spending table, the independent check, the empirical audit, the run's
settings and the per-round detail. Like prose.py, these take the typed numbers and return blocks.
"""

from __future__ import annotations

from typing import Any

from fedtune.privacy.ledger import LEDGER
from fedtune.privacy.report.figures import count, eps, g
from fedtune.privacy.report.numbers import INF, REPORT_JSON, AuditSummary, ReportData, as_float
from fedtune.privacy.report.render import Block, Table

DETAIL_CLIENTS = 50  # per-round tables for at most this many clients (the JSON has every entry)


def spent(r: ReportData) -> list[Block]:
    kind, other_kind = r.accountant.name.upper(), r.accountant.other.upper()
    interrupted = any(c.rounds_interrupted for c in r.clients)
    rejected = any(c.rounds_rejected for c in r.clients)
    refused = any(c.rounds_refused for c in r.clients)
    two = other_kind != kind  # the `skellam` accountant has no second analysis (report/prose.py::_method)
    earlier = [c.name for c in r.clients if c.holds_more_than_this_run]
    header = ["institution", f"ε ({kind})", *([f"ε ({other_kind})"] if two else []),
              *([f"ε of this run's steps ({kind})"] if earlier else []), "δ", "σ", "C", "n", "q", "n·q",
              "steps",
              "trained", *(["rejected"] if rejected else []), "declined", *(["refused"] if refused else []), "failed",
              *(["interrupted"] if interrupted else []), "within budget"]
    rows = [[f"`{c.name}`", eps(c.epsilon), *([eps(c.epsilon_other)] if two else []),
             *([eps(c.epsilon_this_run)] if earlier else []), g(c.delta),
             g(c.noise_multiplier) + ("*" if c.parameters_changed else ""), g(c.max_grad_norm),
             g(c.num_examples), g(c.sample_rate), g(c.expected_batch), str(c.steps),
             str(c.rounds_trained), *([str(c.rounds_rejected)] if rejected else []), str(c.rounds_declined),
             *([str(c.rounds_refused)] if refused else []),
             str(c.rounds_failed), *([str(c.rounds_interrupted)] if interrupted else []),
             {True: "yes", False: "**no**", None: "–"}[c.within_budget]] for c in r.clients]
    if not rows:
        return ["The ledger has no entries: no round has been trained yet."]
    blocks: list[Block] = [Table(header, rows)]
    if r.dp_enabled and r.epsilon_max_client:
        blocks.append(f"**Maximum across institutions: ε = {eps(r.epsilon_max)}** (`{r.epsilon_max_client}`) "
                      f"by the {kind} accountant" + (f"; the largest ε by the {other_kind} accountant is "
                                                     f"{eps(r.epsilon_max_other)}, "
                                                     + ("a looser bound on the same steps" if kind == "PRV" else
                                                        "a second figure for the same steps (PRV's is usually the "
                                                        "tighter)")
                                                     + f" (the budget is held by the {kind} accountant's ε, "
                                                     "the run's)." if two else "."))
    blocks.append(
        "ε is cumulative: all the spending the institution's own privacy state holds, as of its latest ledger "
        "entry. That is every round of this run it trained and, where its state directory serves several runs "
        "(a deployed institution's `state-dir`), the rounds of the runs before: its ε does not restart with a "
        "new run. (In simulation each run has a state directory of its own.) "
        + (f"For {', '.join(f'`{name}`' for name in earlier)} it is more than this run's recorded steps give "
           f"(the column of this run's steps, by the run's {kind} accountant): "
           f"{'its' if len(earlier) == 1 else 'their'} privacy state also holds spending this ledger does not "
           "(another run's in the same state directory, or a round whose reply never reached the server), or the "
           "ledger was written by an earlier fedtune whose accountant gave a larger ε for the same steps (before "
           "2026-12-07, distributed DP's steps at q < 1). The larger figure is the one that counts. "
           if earlier else "")
        + f"σ (noise multiplier), C (clipping norm), n (its training {'users' if r.unit == 'user' else 'records'}) "
        "and q (sampling rate) are from its "
        "latest trained round (* where they changed between rounds: see the per-round detail); n·q is the "
        "expected size of a Poisson batch; steps are all local DP-SGD steps it ran. Declined and refused rounds "
        "train nothing and cost nothing. A failed round may have cost ε: a client that failed after training "
        "(fail closed) or whose reply came too late took its steps and saved them in its own state before "
        "replying, so its next report includes them; a client that crashed before saving released nothing from "
        "that round."
        + (" Rejected rounds were trained, but the server refused the update (too large or malformed); "
           "they cost ε like any trained round." if rejected else "")
        + (" Interrupted rounds were trained and reported, but the run crashed before the server committed "
           "them; their steps count." if interrupted else ""))
    return blocks


def independent_check(r: ReportData) -> list[Block]:
    v = r.verification
    if v is None:
        return ["Not run: config.toml could not be read, and the check needs the run's batch size and budget."]
    how = ("with a second implementation of the Skellam bound (privacy/independent.py), converted to (ε, δ) by "
           "Google's dp-accounting" if r.accountant.name == "skellam" else
           "with Google's dp-accounting, an implementation independent of Opacus")
    intro = (f"`fedtune privacy-verify` recomputed every ε in the ledger ({v.entries} entries of {v.clients} "
             f"institutions) from its σ, q and steps {how}, and checked that no ε decreases, δ < 1/n, q and the "
             "steps match n and the batch size, no budget was exceeded, the statuses are coherent and the entries "
             "of committed rounds are as the newest checkpoint holds them.")
    if v.notes:
        intro += " " + " ".join(v.notes)
    if v.passed:
        return [intro + (" **Every check that could run passed.**" if v.notes else " **Every check passed.**")]
    shown = [item.line() for item in v.violations[:20]]
    more = len(v.violations) - len(shown)
    return [intro + f" **It found {count(len(v.violations), 'violation')}; do not rely on the figures above until "
            "each is explained:**", shown + ([f"… and {more} more (`fedtune privacy-verify`)"] if more else [])]


def empirical_audit(a: AuditSummary) -> list[Block]:
    if a.unit == "client":
        return _canary_institutions(a)
    m, members, theoretical, bound = a.canaries, a.canaries_in, a.epsilon_theoretical, a.epsilon_lower_bound
    copies = a.canary_repeats
    unit = "user" if a.unit == "user" else "record"
    rows = [["canaries (in training / left out)", f"{m} ({members} / {m - members})"],
            ["copies of each canary in training", str(copies)],
            ["guesses made (\"in\" / \"out\")", f"{a.guesses} ({a.guesses_in} / {a.guesses_out})"],
            ["correct guesses", str(a.correct)],
            [f"**ε lower bound** (at δ = {g(a.delta)}, {a.confidence:.0%} confidence)", f"**{bound:.2f}**"],
            ["**theoretical ε** (largest of any institution)", f"**{eps(theoretical)}**"],
            *([["largest bound this audit could show (every guess right)", f"{a.epsilon_largest_certifiable:.2f}"]]
              if a.epsilon_largest_certifiable is not None else []),
            ["membership-inference AUC", g(a.auc)],
            ["true-positive rate at 1% false-positive rate", g(a.tpr_at_fpr_001)],
            ["guess counts tried (Bonferroni correction)", str(a.hypotheses)]]
    gradient = a.canary_kind == "gradient"
    blocks: list[Block] = [
        f"`fedtune audit` checked this run empirically with the one-run method of Steinke, Nasr & Jagielski (2023). "
        f"{m} canary records that occur nowhere in the real data were each put into training with probability 1/2, at "
        f"a randomly chosen institution; " + (
            "each was a gradient canary (Nasr et al. 2023): in training its gradient was replaced by ten times the "
            "clipping norm C along a random direction of the trained weights, which DP-SGD clips to C like any "
            "record's; " if gradient else "") + (
            f"the auditor took the coordinator's view: every update the server received in rounds 1 to {a.round}. "
            "Each canary was scored by the t-statistic of its fitted weight in its institution's updates, along "
            "the canary's own gradient direction, summed over rounds (a larger score: more likely trained "
            "on)." if a.vantage == "server" else
            f"after round {a.round} each canary was scored by the cosine between its direction and the global "
            "adapter's change (a larger cosine: more likely trained on)." if gradient else
            f"after round {a.round} each canary was scored by the final global adapter's loss on it (a lower loss: "
            "more likely trained on).")
        + f" The auditor guessed \"in\" for the {a.guesses_in} most likely and \"out\" for the {a.guesses_out} "
        "least likely, abstaining on the rest; how many of those guesses are right bounds ε from below.",
        Table(["audit", "value"], rows),
        "**The lower bound must stay at or below the theoretical ε.** The theoretical ε is proven to bound what any "
        f"attack can learn about one {unit} from the model and the updates, with each institution's count n of "
        f"{unit}s public. A canary's coin changes its institution's n, so an attack that read the reported counts "
        "would not be bounded by it; this audit's score reads only the model and the updates, never n, and its "
        "bound holds with the stated confidence. A lower bound above the theoretical ε therefore signals a bug: in "
        "the DP-SGD code, in the accounting, or in an assumption the proof relies on.",
    ]
    if theoretical == INF:
        blocks.append("Here the theoretical ε is ∞ (DP-SGD was off, or an institution trained without noise), so any "
                      "lower bound is consistent with it; the audit "
                      + (f"shows ε ≥ {bound:.2f}: this run's training {unit}s are measurably exposed."
                         if bound > 0 else "found no significant leakage, which does not show there is none."))
    elif a.consistent:
        blocks.append(f"Here ε ≥ {bound:.2f} was shown against a theoretical ε = {eps(theoretical)}: consistent. "
                      "A lower bound well below the theoretical ε is expected and does not show that ε is loose: one "
                      "run and one attack reveal only part of what the guarantee covers.")
    else:
        blocks.append(f"**Here the lower bound, {bound:.2f}, is above the theoretical ε = {eps(theoretical)}: this "
                      "signals a bug.** Do not rely on this run's privacy guarantee until it is explained.")
    if a.epsilon_largest_certifiable is not None:
        blocks.append(_audit_power(a))
    if copies > 1 and a.unit == "user":
        blocks.append(f"Each canary was a canary user with {copies} records sharing one user id, in or out together, "
                      "so the audit measured the exposure of one person's records, as user-level DP protects them.")
    elif copies > 1:
        blocks.append(f"Each member canary was {copies} records (DP-SGD was off, as repeats require under "
                      "record-level DP), so the audit measured the exposure of a record seen that many times.")
    return blocks


def _canary_institutions(a: AuditSummary) -> list[Block]:
    """The audit of client-level DP: canary institutions, the one-run bound and the one-shot estimate."""
    m, members, theoretical, bound = a.canaries, a.canaries_in, a.epsilon_theoretical, a.epsilon_lower_bound
    low_high = a.epsilon_estimate_interval
    estimate = "–" if a.epsilon_estimate is None else f"{a.epsilon_estimate:.2f}" + (
        "" if low_high is None else f" ({low_high[0]:.2f}–{low_high[1]:.2f})")
    rows = [["canary institutions (in the population / left out)", f"{m} ({members} / {m - members})"],
            ["guesses made (\"in\" / \"out\")", f"{a.guesses} ({a.guesses_in} / {a.guesses_out})"],
            ["correct guesses", str(a.correct)],
            [f"**ε lower bound** (at δ = {g(a.delta)}, {a.confidence:.0%} confidence)", f"**{bound:.2f}**"],
            ["**theoretical ε** (client-level: one institution as a whole)", f"**{eps(theoretical)}**"],
            ["largest bound this audit could show (every guess right)", f"{a.epsilon_largest_certifiable:.2f}"],
            ["ε estimate (Andrew et al. 2024; not a bound; 95% sampling interval)", estimate],
            ["membership-inference AUC", g(a.auc)],
            ["true-positive rate at 1% false-positive rate", g(a.tpr_at_fpr_001)]]
    blocks: list[Block] = [
        f"`fedtune audit` checked the client-level DP of this run empirically with canary institutions (Andrew et "
        f"al. 2024, \"One-shot Empirical Privacy Estimation for Federated Learning\"). {m} institutions that hold no "
        "data were each added to the population with probability 1/2; one that was added joined each round's cohort "
        "by its own coin flip, with the same probability as every institution, and sent the largest update the "
        "clipping lets through, its own "
        f"random direction at the clipping norm. After round {a.round} each canary was scored by the cosine between "
        "its direction and the global adapter's change since round 0: what anyone given the initial and the final "
        "adapter can compute. The one-run method of Steinke, Nasr & Jagielski (2023) turns the guesses into a lower "
        "bound on ε; Andrew et al.'s estimate fits a Gaussian to the added and the left-out canaries' cosines.",
        Table(["audit", "value"], rows),
        "**The lower bound must stay at or below the theoretical ε**, which is proven to bound what any attack can "
        "learn about one institution; a bound above it signals a bug in the client-level DP code or its accounting. "
        "The estimate is no bound: it assumes Gaussian scores (which Andrew et al. prove for random canaries under the "
        "Gaussian mechanism in high dimension) and carries the sampling error shown. An estimate well above the "
        "theoretical ε, with its whole interval above it, points to less noise than accounted. The final adapter "
        "hides which rounds a canary joined, so with fewer than all institutions per round the estimate may fall "
        "below the theoretical ε, which covers every round's release.",
    ]
    if a.consistent:
        blocks.append(f"Here ε ≥ {bound:.2f} was shown against a theoretical ε = {eps(theoretical)}: consistent.")
    else:
        blocks.append(f"**Here the lower bound, {bound:.2f}, is above the theoretical ε = {eps(theoretical)}: this "
                      "signals a bug.** Do not rely on this run's client-level guarantee until it is explained.")
    return [*blocks, _audit_power(a)]


def _audit_power(a: AuditSummary) -> str:
    """How large a leak this audit could have shown at all, beside the theoretical ε."""
    ceiling, theoretical = a.epsilon_largest_certifiable, a.epsilon_theoretical
    needed = a.canaries_to_certify_theoretical
    text = (f"**The audit's power.** Even an attack that told every member canary from every non-member could show "
            f"no more than ε ≥ {ceiling:.2f} with {a.canaries} canaries at this δ and confidence. ")
    if theoretical == INF:
        return text + "The theoretical ε is infinite here, so no bound can contradict it."
    if ceiling > as_float(theoretical):
        return text + "That is enough to reveal a leak beyond the theoretical ε, had there been one."
    return text + (f"So this audit could not reveal a leak between {ceiling:.2f} and the theoretical ε = "
                   f"{eps(theoretical)}; a bound below the theoretical ε is no evidence that ε is tight or loose "
                   "there. "
                   + (f"An audit able to show the theoretical ε needs at least {needed} canaries."
                      if needed else "No number of canaries can show it with the one-run method at this δ: its "
                      "2·m·δ term grows with the number of canaries m and caps the bound."))


def settings_table(r: ReportData) -> Table:
    s = r.settings
    rows = [["run directory", f"`{r.run_dir}`"], ["report generated by", r.generated_by],
            ["DP-SGD (sample-level)", "on" if r.dp_enabled else "**off**"],
            ["accountant", r.accountant.name.upper()], ["δ", g(r.delta)],
            ["ε budget per institution",
             {INF: "none (∞)", None: "unknown"}.get(r.epsilon_budget, g(r.epsilon_budget))],
            ["target ε (σ solved per institution; also caps the budget)",
             "unknown" if s.config_error is not None else g(r.target_epsilon) if r.target_epsilon
             else "none (σ set directly)"],
            ["rounds (planned / in the ledger)", f"{g(r.rounds_planned)} / {r.rounds_in_ledger}"],
            ["institutions (configured / in the ledger)", f"{g(s.clients)} / {len(r.clients)}"]]
    if s.config_error is not None:
        rows.append(["config.toml", f"could not be read: {s.config_error}"])
    else:
        sigma = ("solved from the target ε (each institution's σ is in the table above)" if r.target_epsilon
                 else g(s.noise_multiplier))
        rows += [["σ / C (configured)", f"{sigma} / {g(s.max_grad_norm)}"],
                 ["batch size B (the expected Poisson batch is n·q, per institution above) / local epochs",
                  f"{s.batch_size} / {s.local_epochs}"],
                 ["fraction of institutions asked to train per round", g(s.fraction_train)],
                 ["client-level DP (configured)", s.client_dp],
                 ["secure aggregation (configured)", "on" if s.secagg else "off"], ["seed", str(s.seed)]]
    return Table(["setting", "value"], rows)


def detail(r: ReportData) -> list[Block]:
    clients = sorted(r.clients, key=lambda c: as_float(c.epsilon), reverse=True)
    shown = clients if len(clients) <= DETAIL_CLIENTS else clients[:10]
    blocks: list[Block] = []
    if len(shown) < len(clients):
        blocks.append(f"The {len(shown)} institutions with the highest ε; every entry of all {len(clients)} is in "
                      f"`{REPORT_JSON}` and `{LEDGER}`.")
    other_key = f"epsilon_{r.accountant.other}"
    two = r.accountant.other != r.accountant.name
    for c in sorted(shown, key=lambda c: c.name):
        rows = [[str(e["round"]), e["status"], g(e.get("noise_multiplier")), g(e.get("max_grad_norm")),
                 g(e.get("sample_rate")), g(e.get("steps")), eps(e.get("epsilon")),
                 *([eps(e.get(other_key))] if two else []), _note(e)] for e in c.entries]
        blocks += [f"**`{c.name}`**",
                   Table(["round", "status", "σ", "C", "q", "steps", "ε",
                          *([f"ε ({r.accountant.other.upper()})"] if two else []), "note"], rows)]
    return blocks or ["No entries."]


def _note(entry: dict[str, Any]) -> str:
    notes = ["interrupted before commit" if entry.get("interrupted") else "",
             "reported late: spent before the server recorded it (a reply it never got, or another run with "
             "the same state directory)" if entry.get("recorded_late") else "",
             "reported ε below the ledger's record (state lost)" if entry.get("state_lost") else "",
             "continued from the ledger's record (adopt-ledger-spending)"
             if entry.get("adopted_ledger_spending") else "",
             f"policy: {entry['policy']}" if entry.get("policy") else "", str(entry.get("reason", ""))]
    return "; ".join(n for n in notes if n)
