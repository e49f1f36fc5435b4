"""The report's prose: what was guaranteed, to whom, and under which assumptions.

Every sentence here is a claim an institution signs. The functions take the typed numbers
(numbers.py) and return blocks (render.py): written for a compliance reader first (a plain-language
summary) and an engineer second (the details, evidence.py). Nothing here reads or writes a file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedtune import constants as k
from fedtune.privacy.accountant import MAX_PRV_POINTS, MAX_PRV_SEGMENTS
from fedtune.privacy.policy import SOURCES
from fedtune.privacy.report import evidence
from fedtune.privacy.report.figures import count, eps, g, ratio
from fedtune.privacy.report.numbers import INF, PLOT_PNG, ReportData
from fedtune.privacy.report.render import Block, Plot, Section

INSTITUTION_POLICY, RUN_POLICY = SOURCES[0], SOURCES[1]


def title(r: ReportData) -> str:
    return f"Privacy report: {Path(r.run_dir).name}"


# A run still going, or stopped, may lack in its ledger what its clients spent in the round under way:
# each client's own copy (client/state.py) holds it, written before its reply, and a resumed run asks
# for it (server/rounds.py::_record_unreported; tests/integration/test_crash_resume.py).
UNFINISHED = ("**This run has not finished** (no final round and summary yet), so these figures may be below what "
              "was spent: an institution training in the round under way, or in the one the run stopped in, may "
              "have spent that round's budget without an entry here. Its own ledger copy (in its `state-dir`; in a "
              "simulation, the run's `client_state/`) holds that spending, and the server records it when the round "
              "ends or the run is resumed (`fedtune simulate --resume`; in a deployment, submitting the same run "
              "again).")


def headline(report: ReportData) -> str:
    """One line: the largest ε, the budget and the declines (also the CLI's summary)."""
    if not report.dp_enabled:
        if report.client_level is not None:  # the client-level section says what holds for institutions
            return "DP-SGD was off: no record-level guarantee (ε = ∞); client-level DP, below, covers institutions."
        return "DP-SGD was off: no formal privacy guarantee (ε = ∞)."
    budget = {INF: "no ε budget", None: "budget unknown"}.get(report.epsilon_budget,
                                                             f"budget ε = {g(report.epsilon_budget)}")
    top = report.epsilon_max_client
    spent = f"max ε = {eps(report.epsilon_max)} ({top})" if top else "no privacy spent (ε = 0)"
    return (f"{spent} at δ = {g(report.delta)}, {report.accountant.name.upper()} accountant; {budget}; "
            f"{count(len(report.clients_declined), 'institution')} declined rounds"
            + ("; the run has not finished, so this may be below what was spent." if report.run_finished is False
               else f"; {count(len(report.clients_awaiting_report), 'institution')} may have spent more (a lost "
               "reply)." if report.clients_awaiting_report else "."))


def sections(r: ReportData) -> list[Section]:
    return [
        ("Summary", _summary(r)),
        ("What is protected", _protected(r)),
        ("Privacy spent per institution", evidence.spent(r)),
        ("Independent check", evidence.independent_check(r)),
        *([("Empirical privacy audit", evidence.empirical_audit(r.audit))] if r.audit else []),
        ("Client-level differential privacy", _client_level(r)),
        ("How ε was computed", _method(r)),
        ("What the guarantee covers", _covers(r)),
        ("What the guarantee does not cover", _not_covered(r)),
        ("Assumptions and limits", _assumptions(r)),
        ("Run settings", [evidence.settings_table(r)]),
        ("ε per round", [Plot("Cumulative ε per institution and round", PLOT_PNG)]),
        ("Per-round detail", evidence.detail(r)),
    ]


def _summary(r: ReportData) -> list[Block]:
    n, rounds = len(r.clients), r.rounds_in_ledger
    if not r.dp_enabled:
        if r.client_level is not None:
            return [f"**Sample-level differential privacy (DP-SGD) was OFF for this run**: there is no record-level "
                    f"guarantee (ε = ∞), and the model updates that the {count(n, 'institution')} sent to the "
                    f"server in {count(rounds, 'round')} can reveal information about individual records. "
                    "**Client-level DP was on**: the released model hides any one institution as a whole, to the "
                    "degree the section on client-level differential privacy gives; that is the only formal "
                    "guarantee of this run."]
        return [f"**Differential privacy was OFF for this run.** There is no formal privacy guarantee "
                f"(ε = ∞). The model updates that the {count(n, 'institution')} sent to the server in "
                f"{count(rounds, 'round')} were computed from their records without clipping or noise, and "
                "can reveal information about individual records."]
    unprotected = [c.name for c in r.clients if c.epsilon == INF]
    paragraphs = [("DP-SGD was on, but **" + ", ".join(unprotected) + " trained without noise (ε = ∞): their "
                   "records have no formal protection.** The other institutions' records" if unprotected else
                   "Each institution's records")
                  + (" are protected by sample-level differential privacy (DP-SGD): adding or removing any one of "
                     "an institution's records changes" if r.unit != "user" else
                     " are protected person by person, by user-level differential privacy (user-level DP-SGD): "
                     "adding or removing any one person with all of their records at an institution changes")
                  + (" the probability of any update it sent" if not r.distributed else
                     " the probability of each round's sum of the institutions' updates, the only form in which "
                     "secure aggregation let the server read them (one institution's share alone is protected far "
                     "less: see the assumptions),")
                  + " by at most a factor of e^ε, except with probability δ"
                  + (f" (for the largest ε here, e^ε ≈ {ratio(r.epsilon_max)})."
                     if r.epsilon_max_client and r.epsilon_max != INF else ".")
                  + " Smaller ε is stronger protection; at the ε of most deployed systems (1 to 10) the factor is "
                  "large, and the protection is against learning much about one record, not against any inference.",
                  " ".join(_facts(r)), _against_whom(r)]
    cl = r.client_level
    paragraphs.append(
        "Client-level differential privacy was off: the guarantee is about individual records; it does not hide "
        "whether an institution took part, nor its data as a whole." if cl is None else
        f"Client-level differential privacy was on as well: the aggregated model also hides any one institution's "
        f"whole contribution, up to ε = {eps(cl.get('epsilon'))} at δ = {g(cl.get('delta'))}.")
    paragraphs.append("Not covered: the record counts that institutions reported to the server, and the training "
                      "losses and evaluation results of those that sent them (an institution's node config withholds "
                      "them under DP unless it sets `release-scores`), were sent without noise. See the sections "
                      "below.")
    return paragraphs


def _against_whom(r: ReportData) -> str:
    """Against whom the guarantee holds, from the privacy policies the clients applied (ledger
    `policy`, privacy/policy.py) and the run's noise seeding; under distributed DP, with the caveat
    that each client added only its share of the noise."""
    if not r.distributed:
        return _against_whom_by_policy(r)
    t = r.distributed["min_honest"]
    return (_against_whom_by_policy(r) + f" **Under distributed DP each client added only 1/{t} of that noise's "
            "variance**: "
            f"the ε holds only if at least {t} institutions a round added their share honestly, of the same σ "
            "(the coordinator sent every institution the same target ε, δ, q and rounds, which no institution can "
            "check of the others' messages), and secure aggregation hid each share (see the assumptions below).")


def _against_whom_by_policy(r: ReportData) -> str:
    if r.settings.noise_from_seed:
        return ("**Not against the server, nor the other institutions**: the run used `dp.reproducible_noise`, noise "
                "derived from a seed the server and every institution know (it is in the run config), which any of "
                "them could regenerate and subtract; research use only. Against anyone else it holds only while they "
                "can neither learn nor guess the run seed (the default seed 0, or any small number, is easily "
                "guessed).")
    policies = r.policies
    if policies == (INSTITUTION_POLICY,):
        return ("**Against the server**: the noise was added inside each institution before anything left it, under "
                "the privacy policy in that institution's own node config: whatever the server asked, an institution "
                "refused settings outside its limits (reproducible noise, δ or σ beyond them, and no DP unless its "
                "node config set `require-dp = false` and no `epsilon-budget`). This holds provided "
                "each institution runs unmodified fedtune with the node config its operator set. Within those limits "
                "the coordinator chose σ, q and the rounds, and so the ε reached: an institution whose node config "
                "set no `epsilon-budget` (nor `min-noise-multiplier`) accepted whatever ε the run asked for. The "
                "ledger does not record which limits each node config set; ask each institution for its own.")
    if policies == (RUN_POLICY,):
        return ("**Who set the parameters**: the institutions trained on partitions of the coordinator's own dataset "
                "(a simulation), under the run's config, so no institution enforced a policy of its own. The noise was "
                "added before any update left a client; the guarantee holds against anyone who sees the updates or "
                "the model, for the parameters recorded here.")
    if not policies:
        return ("**Against whom**: this ledger does not record whose privacy policy the clients applied (written by "
                "an older fedtune); the noise was added inside each client before anything left it.")
    return ("**Against whom**: not every client applied a policy of its own institution (see the per-round detail, "
            "policy): some followed the run's config, within whatever limits their node config set. The noise was "
            "added inside each client before anything left it; against the server, an institution is protected "
            "only as far as the limits in its own node config go.")


def _facts(r: ReportData) -> list[str]:
    """The summary's numbers in words: the largest ε, the budget, declines and failures."""
    rounds, budget = r.rounds_in_ledger, r.epsilon_budget
    budget_text = {INF: "no ε budget was set", None: "the ε budget is unknown (config.toml could not be read)"}.get(
        budget, f"the budget per institution was ε = {g(budget)}")
    top = next((c for c in r.clients if c.name == r.epsilon_max_client), None)
    if rounds == 0 and r.run_finished is False:
        facts = [f"No round is in the ledger yet; {budget_text}."]
    elif rounds == 0:
        facts = [f"No round has been trained yet, so no privacy was spent (ε = 0); {budget_text}."]
    elif top is None and (r.clients_awaiting_report or r.run_finished is False):
        facts = [f"No institution's spending is on record in {count(rounds, 'round')}: none sent a model update "
                 f"trained on its records that the server could read; {budget_text}."]
    elif top is None:
        facts = [f"No institution sent a model update trained on its records in {count(rounds, 'round')}, so no "
                 f"privacy was spent (ε = 0); {budget_text}."]
    else:
        ran = top.rounds_trained + top.rounds_rejected + top.rounds_interrupted
        facts = [f"The institution that spent the most privacy (`{top.name}`) reached "
                 f"ε = {eps(r.epsilon_max)} at δ = {g(r.delta)} after {count(rounds, 'round')} "
                 f"(it trained in {ran} of them); {budget_text}."]
    if r.clients_over_budget:
        facts.append(f"**{count(len(r.clients_over_budget), 'institution')} went over the budget**: "
                     f"{', '.join(r.clients_over_budget)}.")
    elif budget not in (INF, None) and r.clients:
        facts.append("Every institution stayed within the budget" + (
            ", as far as this ledger shows." if r.clients_awaiting_report or r.run_finished is False else "."))
    if r.rounds_refused:
        refusing = sum(c.rounds_refused > 0 for c in r.clients)
        facts.append(f"{count(refusing, 'institution')} refused {count(r.rounds_refused, 'round')} (its policy, "
                     "or its privacy state; the reasons are in the per-round detail); a refused round trains "
                     "nothing.")
    if r.clients_declined:
        facts.append(f"{count(len(r.clients_declined), 'institution')} declined "
                     f"{count(r.rounds_declined, 'round')} in total to stay within budget.")
    if r.rounds_failed:
        facts.append(f"{count(r.rounds_failed, 'training round')} failed at an institution; no update of a failed "
                     "round was aggregated.")
    if r.clients_awaiting_report:
        names = ", ".join(f"`{name}`" for name in r.clients_awaiting_report)
        facts.append(f"**{names} may have spent more than shown**: the last round of each failed without a reply "
                     "the server could read (a timeout, a lost reply or an error), and none has reported since. "
                     "If it trained before its reply was lost, that round's spending is not in this ledger; its own "
                     "ledger copy holds it, and it reports it when a resumed or extended run asks.")
    if r.rounds_rejected:
        facts.append(f"The server refused {count(r.rounds_rejected, 'trained update')} (the reasons are in the "
                     "per-round detail); those rounds ran DP-SGD, so their ε counts in full.")
    if r.run_finished is False:
        facts.append(UNFINISHED)
    return facts


def _protected(r: ReportData) -> list[Block]:
    if not r.dp_enabled:
        return ["Nothing is formally protected: DP-SGD was off (`dp.enabled = false`)."]
    if r.unit == "user":
        return [_protected_users(r)]
    return [[
        "**Unit of privacy**: one record (one training example) of one institution: sample-level DP. "
        f"Ledger: \"{r.unit}\".",
        "**Neighbouring datasets**: an institution's data with one record added or removed (add/remove-one), "
        "**with its record count n treated as public**. Each institution's sampling rate q = 1/⌈n/B⌉, its number "
        "of steps and the scaling of its update follow from n (where the run set `train.sample_rate`, q and the one "
        "step a round are the run's whatever n is), and n is sent to the server in the clear; the "
        "(ε, δ) holds between neighbouring datasets run with the recorded q and steps. Opacus' accountants analyse "
        "each DP-SGD step as a Poisson-subsampled Gaussian mechanism under this relation (RDP: Mironov, Talwar & "
        "Zhang 2019; PRV: Gopi, Lee & Wutschitz 2021). If you need *replace-one* neighbours, a replacement is a "
        "removal plus an addition, so group privacy gives (2ε, (1 + e^ε)·δ).",
        "**Each institution has its own guarantee**, from its own accounting; ε is not summed across "
        "institutions. The unit is a record, not a person: a person with several records, at one institution or "
        "at several, is protected less (composition / group privacy).",
        _against_whom(r),
    ]]


def _protected_users(r: ReportData) -> list[str]:
    """The guarantee under dp.unit `user` (privacy/dpsgd.py derives its sensitivity)."""
    s = r.settings
    column = f"`{s.user_column}`" if s.user_column else "the user column"
    how = {"mean": "the mean of the gradients of those records",
           "clipped_mean": "the mean of those records' gradients, each clipped to C first"}.get(
        s.user_gradient, "a mean over those records (config.toml could not be read to say which)")
    k = s.max_records_per_user if s.max_records_per_user is not None else "dp.max_records_per_user (unknown here)"
    return [
        f"**Unit of privacy**: one person: each patient's (or customer's) records together, at one institution "
        f"(user-level DP, `dp.unit = user`; a record's person is named by {column}). Ledger: \"{r.unit}\". This "
        "holds per id in that column: it assumes each person has one id at an institution (a person under two ids "
        "is two users, protected only as group privacy allows), and one person at two institutions is two users "
        "there, each protected at its own ε.",
        "**Neighbouring datasets**: an institution's data with one person added or removed, **with all of their "
        "records** (add/remove-one user), with its number of users n treated as public. Each DP-SGD step samples "
        "users, each independently with probability q = 1/⌈n/B⌉ (B: users a step; under `train.sample_rate`, the "
        "run's rate), and uses at most "
        f"k = {k} records of each sampled user (a random k of a user with more). A user's "
        f"gradient is {how}, clipped to C; the step adds Gaussian noise of standard deviation σC to the sum over "
        "users. Adding or removing one user therefore changes that sum by at most C however many records they "
        "have, and Opacus' accountants analyse each step as a Poisson-subsampled Gaussian mechanism over users "
        "(user-level sampling, Charles et al. 2024, \"Fine-Tuning Large Language Models with User-Level "
        "Differential Privacy\").",
        "**What one person can and cannot learn**: whoever sees the updates or the released model cannot tell, "
        "beyond the factor e^ε (except with probability δ), whether a given person's records, all of them, were "
        "in an institution's training data; so whatever is specific to that person, such as a rare diagnosis in "
        "their notes, is protected to that degree. It does not hide what holds across many people, which is what "
        "the model learns. **Each institution has its own guarantee**: a person with records at two institutions "
        "is protected at each, and their ε adds up across them (composition).",
        _against_whom(r),
    ]


def _client_level(r: ReportData) -> list[Block]:
    cl = r.client_level
    if cl is None:
        asked = r.settings.client_dp
        note = (f" The config asked for it (`dp.client_dp = {asked}`), but the ledger holds no client-level "
                "accounting, so no client-level guarantee is claimed." if asked not in (None, "off") else "")
        return ["Client-level DP was **off**: no guarantee hides an institution's participation or its whole "
                "dataset." + note]
    return [f"Client-level DP was **on**: each institution's whole update was clipped and Gaussian noise was "
            f"added to the aggregate, so the released global model hides any one institution's participation "
            f"up to **ε = {eps(cl.get('epsilon'))} at δ = {g(cl.get('delta'))}**. This is central DP: the server "
            "adds the noise and is trusted with the updates it sees (under secure aggregation, their sum before the "
            "noise)" + (", to flip each institution's coin for the cohort from its secure randomness as fedtune "
                        "does," if (cl.get("sample_rate") or 1.0) < 1 else "")
            + " and to draw the noise, which Flower takes from NumPy's global generator: seeded by the operating "
            "system, but not a cryptographic generator.",
            [f"clipping: {cl.get('clipping')} ({cl.get('side')} side), norm {g(cl.get('clipping_norm'))}",
             f"noise multiplier: {g(cl.get('noise_multiplier'))}",
             f"sampling of institutions: {_cohort(cl)}",
             f"rounds composed: {cl.get('rounds')}",
             f"accountant: {str(cl.get('accountant', '')).upper()}"]]


def _cohort(cl: dict[str, Any]) -> str:
    q = cl.get("sample_rate")
    if q is not None and q >= 1:
        return "every institution in every round (no amplification by sampling is claimed)"
    if cl.get("sampling") == "poisson":
        return (f"each institution joined each round by its own coin flip with probability q = {g(q)} (Poisson "
                "sampling, which the accounting assumes; the cohort size varied)")
    return (f"rate q = {g(q)}, by a fedtune older than Poisson sampling of institutions: it sampled a fixed number "
            "per round, for which the Poisson accounting is not a proof")


def _method(r: ReportData) -> list[Block]:
    if not r.dp_enabled:
        if r.client_level is not None:
            return ["No DP-SGD accountant ran: DP-SGD was off, so the record-level ε is infinite. The client-level ε "
                    f"is the {str(r.client_level.get('accountant', '')).upper()} accountant's, over the noised "
                    "releases of the aggregate (the section on client-level differential privacy)."]
        return ["No accountant ran: DP-SGD was off, so ε is infinite."]
    a = r.accountant
    if a.name == "prv":
        accountant = (f"**PRV accountant** (Opacus `PRVAccountant`, Gopi et al. 2021). It composes the privacy-loss "
                      f"distributions of all steps numerically (FFT on a discretised domain) and returns "
                      f"`get_epsilon(δ, eps_error={a.eps_error:g})`: the upper end of its error interval, that is "
                      f"ε computed at δ − δ/1000 (δ/1000 = {g(a.delta_error)}) plus {a.eps_error:g}. By the "
                      f"method's error analysis the exact ε at δ lies inside that interval, so the reported value "
                      f"does not understate it; it overstates it by at most the interval's width, about "
                      f"{2 * a.eps_error:g}. For a history PRV would take too long over (more than "
                      f"{MAX_PRV_SEGMENTS} segments of distinct σ and q, as an institution's state across many runs "
                      f"can hold, or a grid of more than {MAX_PRV_POINTS:.0e} points) ε is the RDP accountant's "
                      "instead, a looser upper bound of the same mechanism, by the same rule on client and server.")
    elif a.name == "skellam":
        accountant = (f"**Skellam accountant** (fedtune's privacy/skellam.py), for distributed DP's integer shares. "
                      f"Each step is the Skellam mechanism (Agarwal, Kairouz, Liu 2021) with a variance chosen so "
                      f"that its Rényi DP is at most the Gaussian's α/(2σ²) at each of {a.orders} integer orders "
                      f"from {a.order_min:g} to {a.order_max:g}. A step on a Poisson sample (q < 1) is bounded by "
                      f"the sampled Gaussian's Rényi DP at those orders (Mironov et al. 2019): the symmetric noise "
                      f"meets the condition of Zhu and Wang's tight subsampling theorem (2019, Theorem 8), "
                      f"derived in fedtune's docs/privacy.md. Steps add up in Rényi DP and convert to (ε, δ) at the "
                      f"best order (Balle et al. 2020). The result is an upper bound, a little above what PRV would "
                      f"give a Gaussian's.")
    else:
        accountant = (f"**RDP accountant** (Opacus `RDPAccountant`, Mironov et al. 2019). It adds up Rényi DP over "
                      f"all steps at {a.orders} orders from {a.order_min:g} to {a.order_max:g} and converts "
                      f"to (ε, δ) at the best of them (Balle et al. 2020). The result is an upper bound, "
                      f"conservative: the true ε is lower, and the PRV figure beside it is usually tighter.")
    return [[
        accountant,
        (f"**The other accountant** ({a.other.upper()}) was run on the same history; its ε is shown beside the "
         "main one as a cross-check. Budgets and declines use the main accountant." if a.other != a.name else
         "**No second accountant**: PRV and Opacus' RDP analyse Gaussian noise, not these integer shares. "
         "`fedtune privacy-verify` recomputes ε with a second implementation of the same bound, converted by "
         "dp-accounting."),
        "**Composition**: each institution keeps one accountant history of (σ, q, steps) across all rounds and "
        "restarts; ε is computed from the whole history, over every local step it ran. Rounds it sat out add "
        "nothing.",
        "**Sampling**: every institution trains with Poisson sampling (Opacus' `UniformWithReplacementSampler`): "
        "each record joins each step's batch independently with probability q, the schedule the accountant and "
        "the budget forecast use: q = 1/⌈n/B⌉ for exactly ⌈n/B⌉ steps per local epoch, or, where the run sets "
        "`train.sample_rate` (sampled rounds) or uses distributed DP, one step a round at that rate (q = 1 "
        "without it). Each round's q and steps are in the evidence below. A step whose Poisson batch is "
        "empty is still taken (noise only) and counted.",
        (f"**Each step**: every {_clipped(r)} is clipped to L2 norm C, and Gaussian noise of standard "
         "deviation σ·C is added to their sum." if a.name != "skellam" else
         f"**Each step**: every {_clipped(r)} is clipped to L2 norm C, scaled to integers and rounded at "
         "random to a vector of bounded norm, and each institution adds Skellam noise to the sum of its "
         "records' vectors; the shares' noise sums to Skellam noise whose Rényi DP is at most the Gaussian's at "
         "σ (docs/privacy.md, \"Distributed DP over SecAgg+\").")
        + " All trained tensors go through it: the LoRA matrices, the classification head and the other modules "
        "trained in full (`lora.modules_to_save`).",
    ]]


def _clipped(r: ReportData) -> str:
    """What one step clips: a record's gradient, or under user-level DP a sampled user's (prose's _protected_users)."""
    return ("sampled user's gradient (over at most k of their records, combined as \"What is protected\" says)"
            if r.unit == "user" else "record's gradient")


def _covers(r: ReportData) -> list[Block]:
    if not r.dp_enabled:
        if r.client_level is not None:
            return ["No record-level guarantee: DP-SGD was off. Client-level DP covers each institution as a whole "
                    "in the global adapter of every round and in what is computed from it alone (the checkpoints, "
                    "`adapter/`, the server's evaluation of them); not the updates the institutions sent, which the "
                    "server sees (the section on client-level differential privacy)."]
        return ["Nothing: without DP-SGD there is no formal guarantee for any release."]
    return [[
        ("every round's adapter update (LoRA matrices and trained head) that each institution sent to the server;"
         if not r.distributed else
         "every round's sum of the institutions' adapter updates (LoRA matrices and trained head), the only form in "
         "which secure aggregation revealed them to the server; one institution's share, were it exposed, only at "
         "the own-share ε under the assumptions below;"),
        "by post-processing, everything computed from those updates alone: the aggregated adapter of every round, "
        "the checkpoints, the final adapter in `adapter/`, and the server's evaluation of them on its held-out data;",
        "FedProx's proximal step, which only uses the previous global adapter (post-processing).",
    ]]


def _not_covered(r: ReportData) -> list[Block]:
    return [
        "These are sent to the server as they are, without noise, and are not covered by ε:",
        [f"after training, each round: `{k.NUM_EXAMPLES}` (size of the training set, in {_units(r)}), "
         f"`{k.TRAIN_LOSS}` (mean "
         f"loss over the round's batches, computed from the records), `{k.STEPS}`, `{k.SAMPLE_RATE}` (which "
         f"also reveals the training-set size roughly), `{k.NOISE_MULTIPLIER}`, `{k.MAX_GRAD_NORM}`, `{k.DELTA}`, "
         f"`{k.EPSILON}`, `{k.EPSILON_OTHER}`, `{k.BYTES_UP}`, `{k.POLICY}`, `{k.LORA_RANK}` (heterogeneous ranks), "
         f"`{k.DISTRIBUTED_MIN_HONEST}`, `{k.ADOPTED_LEDGER_SPENDING}`, `{k.UNRECORDED}` (the institution's own "
         "entries for spending the server's ledger lacks), and the institution's name and status "
         "(trained or declined);",
         *([f"under client-side adaptive clipping, `{k.NORM_BIT}`: whether each institution's update was "
            "clipped, which the server reads per institution (even under secure aggregation) to adapt the "
            "norm;"] if r.client_level is not None and r.client_level.get("clipping") == "adaptive"
           and r.client_level.get("side") == "client" else []),
         f"after evaluation, each round: `{k.NUM_EXAMPLES}`, `{k.EVAL_LOSS}` and `{k.EVAL_ACCURACY}` on the "
         "institution's local validation split. Validation records are never used in training, so DP-SGD gives "
         f"them no protection at all. Under DP an institution's node config withholds these losses and scores "
         f"(NaN in their place) unless it sets `{k.NODE_RELEASE_SCORES} = true`;",
         f"with every training reply: `{k.PEAK_RSS_MB}` and `{k.PID}` (the client process's peak memory and "
         f"process id; in simulation also `{k.RAY_NODE}`, the Ray node that ran it), "
         "when the reply arrived (how long the institution took to train, which grows with its data), and for a "
         "refused or failed round the reason it gave;",
         "in simulation, `partition_summary.json` and `partition.png`: each client's example count and label "
         "histogram, computed by the coordinator from the dataset it split (no institution's private data when "
         "institutions read their own files);",
         "whether an institution took part, declined or failed in each round: the server always sees it, and "
         "client-level DP, when on, only keeps it out of the released model;",
         "the server's held-out data used for server-side evaluation (in simulation, the share "
         "`data.test_fraction` set aside before the data is split among institutions) is no institution's "
         "training data and is outside the guarantee; so are the public base model and its pre-training data."],
    ]


def _assumptions(r: ReportData) -> list[Block]:
    items = [
        f"**δ must be well below 1/n** for an institution with n {_units(r)} (δ ≥ 1/n allows a mechanism that "
        f"publishes a whole {_units(r)[:-1]}). {_delta_sentence(r)}",
        "**Composition over all local steps**: the accounting assumes each institution's history was kept "
        "through the whole run (fedtune keeps it in the client's state file and in Flower's context). A client "
        "whose state holds less than the ledger records for it refuses to train until its operator adopts the "
        "ledger's record (`adopt-ledger-spending`), and the server recomputes every reported ε from the ledger "
        "and marks a lower one `state_lost`" + (f": **{', '.join(r.clients_state_lost)}** reported one."
                                                if r.clients_state_lost else "; none was."),
        "**Hyper-parameter tuning is not accounted**: if σ, C, the learning rate, the number of rounds or the "
        "budget were chosen by trying runs on the same private data, the real privacy cost is higher.",
        _randomness(r),
        *_secret_samples(r),
        "**Floating point**: the guarantee is for exact arithmetic; known floating-point attacks on the Gaussian "
        "mechanism are not mitigated (Opacus' `secure_mode` addresses them).",
        "**Budget checks** use the same accountant and the same schedule as training: an institution declines a "
        "round whose projected ε after that round would exceed the budget.",
        *([_distributed(r)] if r.distributed else []),
    ]
    if r.dp_enabled:
        return [items]
    if r.client_level is not None:
        return ["None of the record-level ones apply: DP-SGD was off. The client-level guarantee is central DP and "
                "assumes what its section says of the server."]
    return ["None apply: without DP-SGD there is no guarantee to qualify."]


def _distributed(r: ReportData) -> str:
    t, own = r.distributed["min_honest"], r.distributed["epsilon_own_share"]
    if r.accountant.name != "skellam":  # a ledger written before the integer shares
        return _gaussian_shares(t, own) + _sampled_sum(r)
    return (f"**Distributed DP: at least {t} honest institutions a round**. Each institution rounded every record's "
            "clipped gradient to integers at random, holding each to a fixed norm, and added "
            f"Skellam noise of 1/{t} of the variance; a sum of Skellam noise is Skellam, so the sum carries all of "
            f"it. The ε above holds for a record provided that, in every round its institution took part, at least "
            f"{t} institutions (its own included) added their share and kept it secret, and secure aggregation "
            "(SecAgg+) revealed only the sum, modulo its range. Nothing is rounded after the noise, so this holds "
            f"against the coordinator too. Each institution refused to help unmask a sum with fewer than {t} "
            "shares. SecAgg+ keeps one institution's share hidden from a coordinator that follows the protocol "
            "unless it colludes with enough of that round's m institutions to rebuild that institution's masks: "
            f"max(2, round(2m/3)) of them{_threshold_example(r.settings.clients_sampled)} (Flower's reconstruction "
            "threshold as fedtune sets it). Should it collude with that many, or the shares be exposed otherwise, "
            f"what holds is an institution's own share alone: ε = {eps(own)} at the same δ." + _sampled_sum(r))


def _threshold_example(m: int | None) -> str:
    """SecAgg+'s threshold for the m institutions the run samples a round, when every one of them takes part."""
    return f", {max(2, round(2 * m / 3))} of the {m} this run samples a round when all take part" if m else ""


def _gaussian_shares(t: int, own: Any) -> str:
    """What a run with Gaussian shares (an earlier fedtune) could claim: its rounding onto SecAgg+'s
    grid used a dither the coordinator knew, and no bound on it was derived."""
    return (f"**Distributed DP: at least {t} honest institutions a round**. Each institution added only 1/√{t} of "
            f"the noise's standard deviation, as Gaussian noise; the ε above holds for a record provided that, in "
            f"every round its institution took part, at least {t} institutions (its own included) added their "
            "share and kept it secret, and secure aggregation (SecAgg+) revealed only the sum. Against the "
            "coordinator the ε above also assumes that rounding each share onto SecAgg+'s integer grid adds "
            "nothing: the coordinator knew each rounding's dither, and no bound on what that rounding adds is "
            "derived (docs/privacy.md; fedtune now rounds before the noise instead). Against the "
            "coordinator, and should all the others collude with it, what is proven is an institution's own "
            f"share alone: ε = {eps(own)} at the same δ.")


def _sampled_sum(r: ReportData) -> str:
    q = r.distributed.get("sample_rate", 1.0)
    if q >= 1.0:
        return ""
    return (f" Each round every institution took one step on a Poisson sample of its records at rate q = {q:g}, so "
            "a round's sum was one DP-SGD step at that rate over the records of every institution in it (see "
            "Secret samples).")


def _secret_samples(r: ReportData) -> list[str]:
    """Where any step sampled (q < 1): what the amplification by sampling assumes, and the side channel
    it does not cover (docs/privacy.md, "Who is trusted for what")."""
    rates = sorted({c.sample_rate for c in r.clients if c.sample_rate and c.sample_rate < 1.0})
    if not rates:
        return []
    shown = f"q = {rates[0]:g}" if len(rates) == 1 else f"q from {rates[0]:g} to {rates[-1]:g}"
    return [f"**Secret samples** ({shown}): the ε above counts the amplification by Poisson sampling, which "
            "assumes that which records each step used stays secret. fedtune draws each sample from the "
            "institution's secure randomness (unless the run set `dp.reproducible_noise`, see Randomness) and "
            "reports only the institution's record count, never a sample's size. But a reply's time and the "
            "client's peak memory, which the coordinator sees, grow with the size of the samples it trained on; "
            "the accounting does not cover that side channel."]


def _randomness(r: ReportData) -> str:
    if r.settings.noise_from_seed:
        return ("**Randomness** (research only): this run set `dp.reproducible_noise`: the Poisson sampling, the DP "
                "noise, dropout, which records of a sampled user a step uses and distributed DP's rounding each "
                "came from their own stream, derived from the run seed, the round and the institution's name. "
                "The streams are independent of each other, but the server knows the seed, and so does every "
                "institution (it is in the run config each receives): any of them could regenerate an "
                "institution's noise from its name, so the guarantee does not hold against them; against anyone else "
                "it holds only while they can neither learn nor guess the seed (the default 0 is easily guessed).")
    if r.settings.public_streams:
        return ("**Randomness** (white-box audit): this run set `dp.public_streams`: the Poisson sampling's stream "
                "was derived from the run seed, the round and the institution's name, so the server knows it; the "
                "DP noise, dropout, which records of a sampled user a step uses (user-level DP) and distributed "
                "DP's rounding came from the operating system's secure randomness, never sent. Each institution "
                "trained only with every record in every step (Poisson q = 1), where the sampling takes every "
                "record whatever its stream holds: the guarantee holds for every value of it (the analysis "
                "conditions on it) and no amplification by sampling is claimed, so the guarantee holds against "
                "the server too.")
    return ("**Randomness**: in each round, each institution draws separate seeds from the operating "
            "system's secure randomness, one each for the Poisson sampling, the DP noise, dropout, (user-level "
            "DP) which records of a sampled user a step uses and (distributed DP) the random rounding of each "
            "record's scaled gradient to integers, and never sends them; the noise is therefore "
            "independent of which records were sampled, as the analysis assumes "
            "(`tests/privacy/test_randomness.py` checks it statistically). The generators these seeds start "
            "(PyTorch's, and NumPy's Philox for distributed DP's Skellam noise) are not themselves "
            "cryptographic (Opacus' `secure_mode` is off), which the standard analysis does not require but a "
            "formal deployment may.")


def _units(r: ReportData) -> str:
    """What n counts: the ledger's unit, in the plural."""
    return "users" if r.unit == "user" else "records"


def _delta_sentence(r: ReportData) -> str:
    checks = {c.name: c.delta_below_1_over_n for c in r.clients if c.steps}
    if not checks:
        return "No institution trained, so there is nothing to check."
    failed = [name for name, ok in checks.items() if ok is False]
    unknown = [name for name, ok in checks.items() if ok is None]
    if failed:
        return f"**It does not hold** for {', '.join(failed)}: their counts (or sampling rate) show n ≥ 1/δ."
    if unknown:
        return (f"The ledger cannot confirm it for {', '.join(unknown)}; check δ < 1/n against their "
                f"{_units(r)[:-1]} counts.")
    return (f"It holds for every institution that trained: δ = {g(r.delta)} < 1/n for the number n of {_units(r)} "
            "each reported training on (for a ledger from before counts were recorded, n ≤ B/q, from the batch size "
            "B and the rate q = 1/⌈n/B⌉ it trained at).")
