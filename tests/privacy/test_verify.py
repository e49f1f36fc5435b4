"""`fedtune privacy-verify`: every ledger figure is rechecked with dp-accounting and the run's config,
and each violation names the client, round and field."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedtune.cli import cli
from fedtune.config import DataConfig, DPConfig, FedtuneConfig, TrainConfig
from fedtune.privacy.accountant import epsilon, other
from fedtune.privacy.client_level import ClientLevelAccount
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtune.privacy.verify import verify_run
from fedtune.server.run_dir import RunDirectory

N, BATCH, DELTA = 64, 16, 1e-5  # q = 1/4, 4 steps a round


def entries(rounds: int, sigma: float = 1.0, status: str = "trained", kind: str = "prv") -> list[dict]:
    """A client's entries as fedtune writes them: ε from Opacus over the whole history so far."""
    rows, history = [], []
    for round_ in range(1, rounds + 1):
        history.append((sigma, 0.25, 4))
        rows.append({"round": round_, "status": status, "num_examples": N, "noise_multiplier": sigma,
                     "max_grad_norm": 1.0, "sample_rate": 0.25, "steps": 4, "delta": DELTA,
                     "epsilon": epsilon(kind, history, DELTA), f"epsilon_{other(kind)}": epsilon(other(kind), history,
                                                                                                  DELTA)})
    return rows


CLIENT_LEVEL = {"client_dp": "fixed", "client_dp_side": "server", "client_noise_multiplier": 1.0}


def run(tmp_path, clients: dict[str, list[dict]], budget: float = float("inf"), client_level=None,
        unit: str = "record", ledger_unit: str | None = None, kind: str = "prv", client_dp: dict | None = None,
        target: float = 0.0, ledger_dp: bool = True):
    cfg = FedtuneConfig(rounds=3, clients=len(clients), train=TrainConfig(batch_size=BATCH),
                        dp=DPConfig(delta=DELTA, epsilon_budget=budget, unit=unit, target_epsilon=target,
                                    **(client_dp or {})),
                        data=DataConfig(path="notes.csv", user_column="patient_id" if unit == "user" else ""))
    path = RunDirectory.create(tmp_path / "run", cfg).path
    ledger = PrivacyLedger(kind, ledger_dp, {name: [LedgerEntry.from_dict(row, kind) for row in rows]
                                              for name, rows in clients.items()}, client_level, ledger_unit or unit)
    ledger.save(path)
    return path


def found(path) -> list[tuple[str, int | None, str]]:
    return [(v.client, v.round, v.field) for v in verify_run(path).violations]


def test_a_ledger_as_fedtune_writes_it_passes(tmp_path):
    path = run(tmp_path, {"a": entries(3), "b": entries(2, sigma=1.4)}, target=8.0)  # each client solved its σ
    result = CliRunner().invoke(cli, ["privacy-verify", str(path)])
    assert result.exit_code == 0, result.output
    assert verify_run(path).passed


def test_a_user_level_ledger_verifies_and_must_claim_the_runs_unit(tmp_path):
    assert verify_run(run(tmp_path / "user", {"a": entries(3)}, unit="user")).passed  # n counts users
    assert found(run(tmp_path / "claims", {"a": entries(3)}, unit="record", ledger_unit="user")) == \
        [("ledger", None, "unit")]
    assert found(run(tmp_path / "hides", {"a": entries(3)}, unit="user", ledger_unit="record")) == \
        [("ledger", None, "unit")]


def test_an_epsilon_lowered_by_hand_is_named_with_client_and_round(tmp_path):
    rows = entries(3)
    rows[2]["epsilon"] *= 0.9  # still above round 2's, so only the recomputation sees it
    path = run(tmp_path, {"a": rows, "b": entries(3)})
    assert found(path) == [("a", 3, "epsilon")]
    result = CliRunner().invoke(cli, ["privacy-verify", str(path)])
    assert result.exit_code == 1
    assert result.stdout.splitlines()[0].startswith("a round 3: epsilon: expected ")


def test_an_epsilon_that_decreases_is_a_violation(tmp_path):
    """The review's lost state: 4.39 -> 6.58 -> 4.39."""
    rows = entries(3)
    rows[2]["epsilon"] = rows[0]["epsilon"]
    assert ("a", 3, "epsilon") in found(run(tmp_path, {"a": rows}))
    assert any("never decreases" in v.expected for v in verify_run(tmp_path / "run").violations)


@pytest.mark.parametrize("change, field", [
    (dict(num_examples=200_000), "delta"),  # δ = 1e-5 is not below 1/n
    (dict(sample_rate=0.2), "sample_rate"),  # n = 64, B = 16: q = 1/4
    (dict(steps=5), "steps"),
    (dict(num_examples=None), "num_examples"),
])
def test_inconsistent_sampling_figures_are_violations(tmp_path, change, field):
    rows = entries(2)
    rows[1].update(change)
    assert ("a", 2, field) in found(run(tmp_path, {"a": rows}))


@pytest.mark.parametrize("field", ["noise_multiplier", "sample_rate", "delta"])
def test_a_missing_figure_of_a_trained_round_is_a_violation_not_a_crash(tmp_path, field):
    """A trained entry without σ, q or δ (a damaged or hand-edited ledger): ε cannot be recomputed, which
    is a finding (exit 1 with the field named), not a traceback."""
    rows = entries(2)
    rows[1][field] = None
    assert found(run(tmp_path, {"a": rows})) == [("a", 2, field)]


def test_an_entry_with_steps_but_no_epsilon_is_a_violation_not_skipped(tmp_path):
    """A review's hand-edited ledger: three trained rounds, the later two without an ε. Such entries read
    as failures the server recorded, so their steps were never recomputed and verify passed."""
    rows = entries(3)
    for row in rows[1:]:
        del row["epsilon"]
    assert found(run(tmp_path, {"a": rows})) == [("a", 2, "epsilon"), ("a", 3, "epsilon")]


def test_a_budget_exceeded_and_incoherent_statuses_are_violations(tmp_path):
    over = entries(3)
    declined = entries(1) + [{**entries(2)[1], "status": "declined"}]  # a declined round with steps
    refused = [{**entries(1)[0], "status": "refused", "steps": 0}]  # refused without a reason
    path = run(tmp_path, {"a": over, "b": declined, "c": refused}, budget=over[1]["epsilon"] + 0.01)
    assert set(found(path)) >= {("a", 3, "epsilon"), ("b", 2, "steps"), ("c", 1, "reason")}


def test_the_client_level_account_is_rechecked_against_dp_accounting_and_the_config(tmp_path):
    """Its ε from dp-accounting, and its figures from config.toml: a ledger claiming more noise, a
    smaller q or fewer rounds than the run had, or no account at all, is caught (a review's ledger
    claiming z = 4, q = 0.01 for a run at z = 1, q = 1 passed before)."""
    two = {"a": entries(1), "b": entries(1)}  # both institutions in every round: q = 1
    account = ClientLevelAccount("fixed", "server", 1.0, 1.0, 1.0, 3, DELTA).to_dict()
    assert verify_run(run(tmp_path / "ok", two, client_level=account, client_dp=CLIENT_LEVEL)).passed
    lowered = {**account, "epsilon": account["epsilon"] / 2}
    assert found(run(tmp_path / "low", two, client_level=lowered, client_dp=CLIENT_LEVEL)) == \
        [("client-level", None, "epsilon")]
    claimed = ClientLevelAccount("fixed", "server", 4.0, 1.0, 0.01, 3, DELTA).to_dict()
    assert set(found(run(tmp_path / "claimed", two, client_level=claimed, client_dp=CLIENT_LEVEL))) == \
        {("client-level", None, "noise_multiplier"), ("client-level", None, "sample_rate")}
    assert found(run(tmp_path / "none", two, client_dp=CLIENT_LEVEL)) == [("client-level", None, "client_level")]
    account = ClientLevelAccount("fixed", "server", 1.0, 1.0, 1.0, 2, DELTA).to_dict()
    assert found(run(tmp_path / "unasked", two, client_level=account)) == [("client-level", None, "client_level")]


@pytest.mark.parametrize("line", ["{not json", "[1]"])
def test_a_damaged_metrics_file_exits_2_naming_it(tmp_path, line):
    path = run(tmp_path, {"a": entries(3)})
    (path / "metrics.jsonl").write_text(line + "\n")
    result = CliRunner().invoke(cli, ["privacy-verify", str(path)])
    assert result.exit_code == 2 and "metrics.jsonl is damaged" in " ".join(result.output.split()), result.output


def test_a_client_level_account_with_fewer_releases_than_rounds_committed_is_a_violation(tmp_path):
    """A review's case: the verifier recomputed ε from the account's own count of releases and only capped it,
    so an account that under-counted them (and under-reported ε) passed."""
    import json

    two = {"a": entries(1), "b": entries(1)}
    account = ClientLevelAccount("fixed", "server", 1.0, 1.0, 1.0, 2, DELTA).to_dict()
    path = run(tmp_path / "run", two, client_level=account, client_dp=CLIENT_LEVEL)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(3)))
    assert verify_run(path).passed, "two rounds committed, two releases"
    (path / "metrics.jsonl").write_text("".join(json.dumps({"round": r}) + "\n" for r in range(4)))
    assert found(path) == [("client-level", None, "rounds")]


def test_a_release_of_a_round_a_crash_cut_short_counts_beyond_the_runs_rounds(tmp_path):
    """A review's case: round 3's release was saved before the crash, and round 3 ran again, so the
    account holds 4 releases for a 3-round run. That is what happened (and conservative), not a
    violation; without an interrupted round it still is one."""
    two = {"a": entries(3), "b": entries(3)}
    account = ClientLevelAccount("fixed", "server", 1.0, 1.0, 1.0, 4, DELTA).to_dict()
    assert found(run(tmp_path / "plain", two, client_level=account, client_dp=CLIENT_LEVEL)) == \
        [("client-level", None, "rounds")]
    four = entries(4)  # the clients spent four rounds' steps: round 3 twice
    crashed = {name: [*four[:2], {**four[2], "interrupted": True}, {**four[3], "round": 3}] for name in two}
    assert verify_run(run(tmp_path / "crashed", crashed, client_level=account, client_dp=CLIENT_LEVEL)).passed
    five = entries(5)  # round 3 cut short twice: five releases
    cut = [{**row, "round": 3, "interrupted": True} for row in five[2:4]]
    twice = {name: [*five[:2], *cut, {**five[4], "round": 3}] for name in two}
    account = ClientLevelAccount("fixed", "server", 1.0, 1.0, 1.0, 5, DELTA).to_dict()
    assert verify_run(run(tmp_path / "twice", twice, client_level=account, client_dp=CLIENT_LEVEL)).passed


def spending(runs: list[tuple[float, float, int, int, float]], kind: str = "prv") -> list[dict]:
    """A client's entries for (round, sigma, q, steps, delta) runs in the order it spent them, each
    with n = N and the Opacus ε of everything spent so far at that entry's δ."""
    rows, history = [], []
    for round_, sigma, q, steps, delta in runs:
        history.append((sigma, q, steps))
        rows.append({"round": round_, "status": "trained", "num_examples": N, "noise_multiplier": sigma,
                     "max_grad_norm": 1.0, "sample_rate": q, "steps": steps, "delta": delta,
                     "epsilon": epsilon(kind, history, delta)})
    return rows


def late(row: dict, recorded_round: int) -> dict:
    return {**row, "recorded_late": True, "recorded_round": recorded_round}


def test_spending_recorded_late_is_verified_where_it_was_spent(tmp_path):
    """A reply lost in round 1 and reported late in round 3: its ε is the one the client had after
    round 1, below round 2's, and the ledger holds it after round 2's entry."""
    first, second, third = spending([(r, 1.0, 0.25, 4, DELTA) for r in (1, 2, 3)])
    assert verify_run(run(tmp_path / "ok", {"a": [second, late(first, 3), third]})).passed
    lowered = late({**first, "epsilon": first["epsilon"] * 0.5}, 3)
    assert found(run(tmp_path / "low", {"a": [second, lowered, third]})) == [("a", 1, "epsilon")]
    recorded_later = late(first, 4)  # recorded in round 4, yet before round 3's entry
    assert found(run(tmp_path / "order", {"a": [second, recorded_later, third]})) == [("a", 3, "round")]


def failed(round_: int) -> dict:
    """The server's record of a client whose reply never came: no figures."""
    return {"round": round_, "status": "failed", "reason": "no reply before the round's timeout"}


def test_another_runs_spending_recorded_late_keeps_its_own_schedule_and_delta_in_an_older_ledger(tmp_path):
    """A ledger from before client entries named their run: the client's reply in round 2 never came (the
    server recorded a failure), and in round 3 it reported late the spending its state directory held for
    round 2, another run's full-batch step (q = 1, one step, δ = 1e-6): its q, steps and δ are that run's,
    and this run's ε composes it with its own. An older fedtune also carried such spending in with no failure
    before it (a review found the narrower rule failing those ledgers). In a ledger whose entries name their
    run, the same late entry is this run's, held to its schedule."""
    rows = spending([(1, 1.0, 0.25, 4, DELTA), (2, 2.0, 1.0, 1, 1e-6), (3, 1.0, 0.25, 4, DELTA)])
    assert verify_run(run(tmp_path / "ok", {"a": [rows[0], failed(2), late(rows[1], 3), rows[2]]})).passed
    assert verify_run(run(tmp_path / "carried", {"a": [rows[0], late(rows[1], 3), rows[2]]})).passed
    named = run(tmp_path / "own", {"a": [{**row, "run": "this-run"} for row in (rows[0], late(rows[1], 3), rows[2])]})
    (named / "run_id").write_text("this-run")
    assert set(found(named)) >= {("a", 2, "sample_rate"), ("a", 2, "steps"), ("a", 2, "delta")}
    last = spending([(1, 1.0, 0.25, 4, DELTA), (2, 1.0, 0.25, 4, 1e-6)])  # nothing of this run follows it
    verdict = verify_run(run(tmp_path / "last", {"a": [last[0], failed(2), late(last[1], 2)]})).violations
    assert [(v.client, v.round, v.field) for v in verdict] == [("a", 2, "delta")]
    assert "last spending" in verdict[0].expected


def test_trained_without_steps_and_entries_out_of_order_are_violations(tmp_path):
    rows = entries(3)
    rows[1]["steps"] = 0
    assert ("a", 2, "steps") in found(run(tmp_path / "steps", {"a": rows}))
    swapped = entries(3)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    assert ("a", 2, "round") in found(run(tmp_path / "order", {"a": swapped}))


@pytest.mark.parametrize("kind", ["prv", "rdp"])
def test_a_report_may_sit_within_the_slack_below_dp_accounting_and_no_further(tmp_path, kind):
    """Each accountant's ledger is rechecked by its own dp-accounting counterpart (PLD for PRV, RDP
    for RDP), and a report up to 1% + 0.01 below that figure passes."""
    from fedtune.privacy.independent import independent_epsilon
    from fedtune.privacy.verify import ABSOLUTE_SLACK, RELATIVE_SLACK

    rows = entries(2, kind=kind)
    assert verify_run(run(tmp_path / "as-written", {"a": rows}, kind=kind)).passed
    floor = independent_epsilon(kind, [(1.0, 0.25, 4)] * 2, DELTA) * (1 - RELATIVE_SLACK) - ABSOLUTE_SLACK
    inside = [rows[0], {**rows[1], "epsilon": max(floor + 1e-4, rows[0]["epsilon"])}]
    assert verify_run(run(tmp_path / "inside", {"a": inside}, kind=kind)).passed
    outside = [rows[0], {**rows[1], "epsilon": floor - 1e-3}]
    assert ("a", 2, "epsilon") in found(run(tmp_path / "outside", {"a": outside}, kind=kind))


def test_a_late_entry_that_names_this_run_keeps_this_runs_schedule_and_one_naming_another_run_is_flagged(tmp_path):
    """Since entries name their run, one recorded late is this run's: it is checked against this run's q,
    steps and δ, and one that names another run never belongs on this ledger."""
    first, second, third = spending([(r, 1.0, 0.25, 4, DELTA) for r in (1, 2, 3)])
    path = run(tmp_path / "ok", {"a": [second, third]})
    run_id = RunDirectory(path).run_id
    ok = run(tmp_path / "named", {"a": [second, {**late(first, 3), "run": run_id}, third]})
    (ok / "run_id").write_text(run_id)
    assert verify_run(ok).passed
    other_schedule = spending([(1, 2.0, 1.0, 1, DELTA), (2, 1.0, 0.25, 4, DELTA)])
    odd = run(tmp_path / "odd", {"a": [{**late(other_schedule[0], 2), "run": run_id}, other_schedule[1]]})
    (odd / "run_id").write_text(run_id)
    assert {field for _, _, field in found(odd)} >= {"sample_rate", "steps"}
    elsewhere = run(tmp_path / "elsewhere", {"a": [second, {**late(first, 3), "run": "another"}, third]})
    (elsewhere / "run_id").write_text(run_id)
    assert found(elsewhere) == [("a", 1, "run")]


def test_a_distributed_dp_run_must_be_accounted_for_its_integer_shares(tmp_path):
    """Under distributed DP the shares are Skellam noise, which PRV and Opacus' RDP do not cover: a ledger
    that claims either is flagged (an earlier fedtune's Gaussian shares, or a wrong claim)."""
    from fedtune.privacy.skellam import solve_sigma

    sigma = solve_sigma(8.0, DELTA, 1.0, 3)
    rows = spending([(r, sigma, 1.0, 1, DELTA) for r in (1, 2, 3)], kind="skellam")
    cfg = FedtuneConfig(rounds=3, clients=4, train=TrainConfig(batch_size=4096, optimizer="sgd"),
                        dp=DPConfig(delta=DELTA, secagg=True, distributed_min_honest=2, target_epsilon=8.0))
    for kind, flagged in (("skellam", []), ("prv", [("ledger", None, "accountant")])):
        path = RunDirectory.create(tmp_path / kind, cfg).path
        PrivacyLedger(kind, True, {"a": [LedgerEntry.from_dict({**row, "num_examples": 64, "distributed_min_honest": 2},
                                                               kind) for row in rows]}).save(path)
        assert found(path) == flagged


def test_under_distributed_dp_every_share_of_a_round_must_be_of_one_sigma_and_the_runs_t(tmp_path):
    """A review's case: the coordinator sends one institution a target ε of 1 and the others 8. That one
    solves a larger σ and records ε 1, while the sum carries the mixture of the shares, about ε 4. No
    institution sees the others' messages; the ledger shows it, round by round."""
    from fedtune.privacy.skellam import solve_sigma

    cfg = FedtuneConfig(rounds=3, clients=3, train=TrainConfig(batch_size=4096, optimizer="sgd"),
                        dp=DPConfig(delta=DELTA, secagg=True, distributed_min_honest=3, target_epsilon=8.0))

    def client(target: float, t: int = 3) -> list[LedgerEntry]:
        sigma = solve_sigma(target, DELTA, 1.0, 3)
        return [LedgerEntry.from_dict({**row, "num_examples": 64, "distributed_min_honest": t}, "skellam")
                for row in spending([(r, sigma, 1.0, 1, DELTA) for r in (1, 2, 3)], kind="skellam")]

    for case, clients, flagged in (
            ("alike", {"a": client(8.0), "b": client(8.0), "c": client(8.0)}, []),
            ("one-apart", {"a": client(8.0), "b": client(8.0), "c": client(1.0)},
             [("c", r, "noise_multiplier") for r in (1, 2, 3)]),
            ("its-own-t", {"a": client(8.0), "b": client(8.0, t=1), "c": client(8.0)},
             [("b", r, "distributed_min_honest") for r in (1, 2, 3)])):
        path = RunDirectory.create(tmp_path / case, cfg).path
        PrivacyLedger("skellam", True, clients).save(path)
        assert found(path) == flagged, case


def test_one_sigma_a_round_keeps_a_try_cut_short_apart_from_its_retry(tmp_path):
    """A round a crash cut short was its own sum: its retry, in a run extended meanwhile, is rightly of another
    σ; a refused institution's noise-only share is of the round's σ too."""
    from fedtune.privacy.skellam import solve_sigma

    cfg = FedtuneConfig(rounds=3, clients=3, train=TrainConfig(batch_size=4096, optimizer="sgd"),
                        dp=DPConfig(delta=DELTA, secagg=True, distributed_min_honest=3, target_epsilon=8.0))
    first, extended = solve_sigma(8.0, DELTA, 1.0, 2), solve_sigma(8.0, DELTA, 1.0, 3)

    def share(sigma: float, q: float = 1.0, steps: int = 1, **notes) -> LedgerEntry:
        return LedgerEntry.from_dict({"round": 2, "status": "trained" if steps else "refused", "reason": "x",
                                      "num_examples": 64, "noise_multiplier": sigma, "sample_rate": q,
                                      "steps": steps, "delta": DELTA, "epsilon": 1.0, "epsilon_other": 1.0,
                                      "distributed_min_honest": 3, **notes}, "skellam")

    retried = {"a": [share(first, interrupted=True), share(extended)], "b": [share(first, interrupted=True),
               share(extended)], "c": [share(extended)]}
    path = RunDirectory.create(tmp_path / "retried", cfg).path
    PrivacyLedger("skellam", True, retried).save(path)
    assert [f for f in found(path) if f[2] == "noise_multiplier"] == []
    refused = {"a": [share(extended, q=0.0, steps=0)], "b": [share(first)], "c": [share(first)]}
    path = RunDirectory.create(tmp_path / "refused", cfg).path
    PrivacyLedger("skellam", True, refused).save(path)
    assert [f for f in found(path) if f[2] == "noise_multiplier"] == [("b", 2, "noise_multiplier"),
                                                                      ("c", 2, "noise_multiplier")]


def test_marking_an_entry_late_turns_off_no_check_of_this_runs_schedule(tmp_path):
    """A review's bypass: an entry marked recorded_late without a `run` was exempt from the schedule, so a
    ledger could claim q = 0.01 for a round at q = 1/4, with the low ε that goes with it. It may be another
    run's only in a ledger whose entries name no run (one from before they did)."""
    first, second, third = spending([(1, 1.0, 0.25, 4, DELTA), (2, 1.0, 0.01, 4, DELTA), (3, 1.0, 0.25, 4, DELTA)])
    named = spending([(1, 1.0, 0.25, 4, DELTA)])  # b's late entry names its run: this ledger is no older one
    path = run(tmp_path / "named", {"a": [first, failed(2), late(second, 3), third],
                                    "b": [{**late(named[0], 1), "run": "this-run"}]})
    (path / "run_id").write_text("this-run")
    assert found(path) == [("a", 2, "sample_rate")]


def test_an_entry_that_trained_without_its_figures_is_a_violation_and_every_entry_gets_the_status_checks(tmp_path):
    """A review's bypass: a trained entry stripped of its ε and steps read as a failure the server recorded
    and was skipped. Only the server's record of a failure or exclusion has no ε."""
    stripped = entries(3)
    del stripped[2]["epsilon"], stripped[2]["steps"]
    assert found(run(tmp_path / "stripped", {"a": stripped})) == [("a", 3, "epsilon"), ("a", 3, "steps")]
    stepless = entries(3)
    del stepless[2]["steps"]  # a finding, not a traceback
    assert found(run(tmp_path / "stepless", {"a": stepless})) == [("a", 3, "steps")]
    declined = entries(3)
    declined[2].update(status="declined", steps=0, sample_rate=0.0)
    del declined[2]["epsilon"]
    assert found(run(tmp_path / "declined", {"a": declined})) == [("a", 3, "epsilon")]
    server = entries(1) + [failed(2), {"round": 3, "status": "excluded", "reason": "its key changed"}]
    assert verify_run(run(tmp_path / "server", {"a": server})).passed


def test_a_delta_other_than_the_runs_is_a_violation_saying_the_two_differ(tmp_path):
    """A review's bypass: the ε of δ = 1e-5 claimed at δ = 1e-9. Every ε was recomputed at the run's δ, so
    it passed, and the report showed the ledger's stronger (ε, δ)."""
    rows = [{**row, "delta": 1e-9} for row in entries(2)]
    violations = verify_run(run(tmp_path, {"a": rows})).violations
    assert [(v.client, v.round, v.field) for v in violations] == [("a", 1, "delta"), ("a", 2, "delta")]
    assert all("δ differ" in v.expected and v.found == "1e-09" for v in violations)


@pytest.mark.parametrize("ledger_dp, config_dp", [(False, True), (True, False)])
def test_a_ledger_and_config_that_disagree_on_dp_are_one_violation(tmp_path, ledger_dp, config_dp):
    """Not one "expected inf" for every entry: the ledger as a whole is not of this config."""
    path = run(tmp_path, {"a": entries(3), "b": entries(2)}, ledger_dp=ledger_dp, client_dp={"enabled": config_dp})
    violations = verify_run(path).violations
    assert [(v.client, v.round, v.field) for v in violations] == [("ledger", None, "dp_enabled")]
    assert "disagree" in violations[0].found


@pytest.mark.parametrize("sigma", [1.2, 0.8])
def test_where_the_config_fixes_sigma_every_entry_carries_it_whatever_its_policy(tmp_path, sigma):
    """A review's bypass: σ was never compared with the config, so a run at dp.noise_multiplier = 1 could
    claim σ = 1.2 and the lower ε that goes with it. No node policy changes a fixed σ (min-noise-multiplier
    refuses), so an entry naming the node config's policy is held to it too. Under a target each solves its own."""
    rows = [{**row, "policy": "node config"} for row in entries(2, sigma=sigma)]
    assert found(run(tmp_path / "fixed", {"a": rows})) == [("a", 1, "noise_multiplier"), ("a", 2, "noise_multiplier")]
    assert verify_run(run(tmp_path / "target", {"a": rows}, target=10.0)).passed


def committed(path, clients: dict[str, list[dict]], round_: int) -> None:
    """checkpoints/round_NNNN.pt holding `clients`' entries, the ledger as round `round_` committed it."""
    from fedtune.server.run_dir import Checkpoint

    ledger = PrivacyLedger("prv", True, {name: [LedgerEntry.from_dict(row, "prv") for row in rows]
                                         for name, rows in clients.items()})
    (path / "checkpoints").mkdir(exist_ok=True)
    (path / "checkpoints" / f"round_{round_:04d}.pt").write_bytes(Checkpoint(round_, {}, ledger=ledger.to_dict())
                                                                   .to_bytes())


def test_an_entry_of_a_committed_round_dropped_or_changed_since_is_a_violation(tmp_path):
    """A review's bypass: dropping a client, or a round's entries, went unnoticed. The latest readable
    checkpoint's ledger copy is the committed record: each of its entries must still be in the ledger."""
    a, b = entries(3), entries(3)
    at_round_2 = {"a": a[:2], "b": b[:2]}
    path = run(tmp_path / "ok", {"a": a, "b": b})
    committed(path, at_round_2, 2)
    assert verify_run(path).passed, "later rounds only add to the committed record"
    dropped = run(tmp_path / "dropped", {"a": [a[0], a[2]]})  # a's round 2 and all of b gone
    committed(dropped, at_round_2, 2)
    assert found(dropped) == [("a", 2, "entry"), ("b", 1, "entry"), ("b", 2, "entry")]
    assert "round_0002.pt" in verify_run(dropped).violations[0].expected
    (dropped / "checkpoints" / "round_0003.pt").write_bytes(b"damaged")  # the newest unreadable: round 2's is read
    assert len(found(dropped)) == 3
    assert verify_run(dropped).notes == ("The newest checkpoint (round_0003.pt) did not load, so committed entries "
                                         "were checked against round 2's copy, the newest readable one.",)
    (dropped / "checkpoints" / "round_0002.pt").unlink()  # none readable: nothing to compare with, and it is said
    result = verify_run(dropped)
    assert result.passed and len(result.notes) == 1 and "did not run" in result.notes[0]
    assert not verify_run(path).notes, "a readable newest checkpoint: every check ran"
    changed = run(tmp_path / "changed", {"a": [a[0], {**a[1], "status": "declined", "steps": 0}, a[2]], "b": b})
    committed(changed, at_round_2, 2)
    assert found(changed) == [("a", 2, "entry")]
    # the policy the report words "against whom" from, rewritten after the commit (a review: it was not compared)
    policy = run(tmp_path / "policy", {"a": [{**row, "policy": "node config"} for row in a], "b": b})
    committed(policy, {"a": [{**row, "policy": "run config"} for row in a[:2]], "b": b[:2]}, 2)
    assert found(policy) == [("a", 1, "entry"), ("a", 2, "entry")]


def test_a_failure_filed_under_a_nodes_placeholder_may_since_be_its_clients(tmp_path):
    """The server records a failure of a node it cannot name yet as `node-N` and moves it to the client once
    it is known (PrivacyLedger.attribute): the committed entry is then under the client's name."""
    a = entries(3)
    path = run(tmp_path, {"a": [a[0], failed(2), a[2]]})
    committed(path, {"a": a[:1], "node-7": [failed(2)]}, 2)
    assert verify_run(path).passed
    # A review: a placeholder's entry was matched first, to another client's identical failure (`yak`, after
    # `node-` in sorted order), leaving that client's own committed entry unmatched: a false violation.
    both = run(tmp_path / "two", {"yak": [a[0], failed(2)], "zulu": [a[0], failed(2)]})
    committed(both, {"yak": [a[0], failed(2)], "zulu": a[:1], "node-7": [failed(2)]}, 2)
    assert verify_run(both).passed


def test_a_refusal_of_a_run_without_dp_reports_epsilon_zero_truly(tmp_path):
    """A review: with DP off, every entry was expected at ε = ∞, so an institution that refused the run
    (require-dp) and truly spent nothing failed verification. ε is ∞ from a client's first step on."""
    refusal = {"round": 1, "status": "refused", "steps": 0, "sample_rate": 0.0, "epsilon": 0.0,
               "reason": "require-dp: the run asked for no DP"}
    path = run(tmp_path, {"a": [refusal]}, ledger_dp=False)
    config = (path / "config.toml").read_text()
    (path / "config.toml").write_text(config.replace("enabled = true", "enabled = false", 1))
    assert verify_run(path).passed, verify_run(path).violations


def test_an_entry_marked_late_in_a_ledger_that_names_no_run_is_caught_by_the_committed_copy(tmp_path):
    """Only late entries name their run, so a ledger without one names none and its late entries are
    exempt from this run's schedule; marking a committed entry late (with the q it did not train at) is
    then caught by the checkpoint's copy, which lacks the mark."""
    first, second, third = spending([(1, 1.0, 0.25, 4, DELTA), (2, 1.0, 0.25, 4, DELTA), (3, 1.0, 0.25, 4, DELTA)])
    path = run(tmp_path, {"a": [first, {**late(second, 2), "sample_rate": 0.01}, third]})
    committed(path, {"a": [first, second, third]}, 3)
    assert ("a", 2, "entry") in found(path)
