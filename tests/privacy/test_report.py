"""The privacy report: its numbers come from the right ledger entries, and its text says what it must."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re

import pytest
from typer.testing import CliRunner

from fedtune.cli import cli
from fedtune.config import DPConfig, FedtuneConfig, TrainConfig, dump_config
from fedtune.errors import FedtuneError
from fedtune.privacy.accountant import epsilon
from fedtune.privacy.ledger import LEDGER, LedgerEntry, PrivacyLedger
from fedtune.privacy.report import (
    PLOT_PNG,
    REPORT_HTML,
    REPORT_JSON,
    REPORT_MD,
    ClientRow,
    build_report,
    headline,
    markdown,
    plot_epsilon,
    report_contents,
)
from fedtune.server.run_dir import RunDirectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def trained(round_, eps, other=None, sigma=1.0, q=0.25, steps=4, **extra):
    return {"round": round_, "status": "trained", "noise_multiplier": sigma, "max_grad_norm": 1.0,
            "sample_rate": q, "steps": steps, "delta": 1e-5, "epsilon": eps,
            "epsilon_rdp": eps * 1.1 if other is None else other, **extra}


def declined(round_, eps):
    return {**trained(round_, eps, sample_rate=0.0), "status": "declined", "sample_rate": 0.0, "steps": 0}


def rejected(round_, eps, **extra):
    return {**trained(round_, eps, **extra), "status": "rejected", "reason": "update rejected: update norm 9"}


def failed(round_):
    return {"round": round_, "status": "failed", "reason": "worker died"}


def make_run(tmp_path, clients, dp_enabled=True, client_level=..., budget=8.0, delta=1e-5, target=0.0):
    """A run directory with config.toml and a ledger of `clients` ({name: [entries as on disk]})."""
    cfg = FedtuneConfig(rounds=3, clients=len(clients) or 1, train=TrainConfig(batch_size=16),
                        dp=DPConfig(enabled=dp_enabled, epsilon_budget=budget, delta=delta, target_epsilon=target))
    run = RunDirectory.create(tmp_path / "run", cfg)
    PrivacyLedger("prv", dp_enabled, {name: [LedgerEntry.from_dict(e, "prv") for e in entries]
                                      for name, entries in clients.items()},
                  None if client_level is ... else client_level).save(run.path)
    return run.path


@pytest.fixture
def three_clients(tmp_path):
    return make_run(tmp_path, {
        "a": [trained(1, 1.0), trained(2, 2.0), trained(3, 3.0)],
        "b": [trained(1, 2.5, steps=8, q=0.125), declined(2, 2.5), declined(3, 2.5)],
        "c": [trained(1, 1.5), failed(2), trained(3, 2.9, sigma=1.3)],
    })


def client(report, name):
    return next(c for c in report.clients if c.name == name)


def test_numbers_match_the_ledger(three_clients):
    report = build_report(three_clients)
    assert (report.epsilon_max, report.epsilon_max_client) == (3.0, "a")
    assert report.epsilon_max_other == pytest.approx(3.3)
    a, b, c = (client(report, n) for n in "abc")
    assert (a.steps, a.rounds_trained, a.rounds_declined, a.rounds_failed) == (12, 3, 0, 0)
    assert (b.noise_multiplier, b.sample_rate, b.steps, b.rounds_declined) == (1.0, 0.125, 8, 2)
    assert b.epsilon == 2.5 and b.epsilon_by_round == (0.0, 2.5, 2.5, 2.5)
    assert (c.noise_multiplier, c.parameters_changed, c.rounds_failed, c.steps) == (1.3, True, 1, 8)
    assert c.epsilon_by_round == (0.0, 1.5, 1.5, 2.9)
    assert report.clients_declined == ("b",) and report.rounds_declined == 2
    assert report.rounds_failed == 1 and report.clients_over_budget == ()
    assert report.epsilon_budget == 8.0 and report.rounds_in_ledger == 3
    assert report.client_level is None
    assert json.loads(json.dumps(report.to_dict(), allow_nan=False)) == report.to_dict()


def test_max_is_each_clients_latest_cumulative_epsilon_from_the_main_accountant(tmp_path):
    """Each wrong choice gives another answer: the other accountant's ε (9), skipping interrupted
    entries (4), the first entry of each client (4), only trained entries (z would have 2)."""
    run = make_run(tmp_path, {
        "x": [trained(1, 4.0, other=9.0)],
        "y": [trained(1, 3.0, other=3.2), trained(2, 6.0, other=6.4, interrupted=True)],
        "z": [trained(1, 2.0), declined(2, 5.0), failed(3)],  # a declined entry carries ε so far
    })
    report = build_report(run)
    assert (report.epsilon_max, report.epsilon_max_client) == (6.0, "y")
    y = client(report, "y")
    assert (y.rounds_trained, y.rounds_interrupted, y.steps) == (1, 1, 8)
    assert client(report, "z").epsilon == 5.0
    assert "interrupted before commit" in markdown(report)


def test_a_client_that_lost_its_state_is_reported_at_the_most_it_spent(tmp_path):
    """Its later entry reported less than an earlier one (its state was lost); the headline, its row and
    the budget check take the most any entry shows, the ledger's recomputation included."""
    run = make_run(tmp_path, {"w": [trained(1, 5.0), trained(2, 9.0), trained(3, 4.0, state_lost=True,
                                                                               epsilon_recomputed=9.5)]})
    report = build_report(run)
    assert (report.epsilon_max, client(report, "w").epsilon) == (9.5, 9.5)
    assert report.clients_over_budget == ("w",), "9.5 is over the budget of 8, though the last entry says 4"
    assert client(report, "w").epsilon_other == report.epsilon_max_other == 9.0 * 1.1, \
        "the other accountant's largest, not the lost state's last (4.4)"


def test_a_rejected_round_was_trained_and_counts(tmp_path):
    """The server refused r's round-2 update, but r ran DP-SGD for it: its ε (4.0, the maximum),
    steps and parameters count, and the text says the refused rounds cost ε."""
    run = make_run(tmp_path, {"r": [trained(1, 2.0), rejected(2, 4.0, sigma=1.2)], "s": [trained(1, 3.0)]})
    report = build_report(run)
    r = client(report, "r")
    assert (report.epsilon_max, report.epsilon_max_client, report.rounds_rejected) == (4.0, "r", 1)
    assert (r.rounds_trained, r.rounds_rejected, r.rounds_failed, r.steps) == (1, 1, 0, 8)
    assert (r.noise_multiplier, r.parameters_changed, r.epsilon_by_round) == (1.2, True, (0.0, 2.0, 4.0))
    text = markdown(report)
    assert "refused 1 trained update" in text and "their ε counts in full" in text
    assert "| rejected |" in text and "update rejected: update norm 9" in text


def test_a_target_epsilon_caps_the_budget(tmp_path):
    report = build_report(make_run(tmp_path, {"a": [trained(1, 4.5)]}, budget=math.inf, target=4.0))
    assert report.epsilon_budget == 4.0 and report.settings.epsilon_budget == "inf"
    assert report.clients_over_budget == ("a",) and client(report, "a").within_budget is False
    assert "went over the budget" in markdown(report)


def test_markdown_starts_with_a_plain_language_summary(three_clients):
    text = markdown(build_report(three_clients))
    lines = [line for line in text.splitlines() if line]
    assert lines[0].startswith("# Privacy report") and lines[1] == "## Summary"
    assert lines[2].startswith("Each institution's records are protected by sample-level differential privacy")
    assert "reached ε = 3.00 at δ = 1e-05 after 3 rounds" in lines[3]
    assert "the budget per institution was ε = 8" in lines[3]
    assert "1 institution declined 2 rounds" in lines[3]
    sections = re.findall(r"^## (.+)$", text, flags=re.M)
    assert sections[0] == "Summary" and "Privacy spent per institution" in sections
    for must in ("add/remove", "PRVAccountant", "eps_error=0.01", "Poisson", "train_loss", "eval_accuracy",
                 "Hyper-parameter tuning", "1/n", "Client-level DP was **off**"):
        assert must in text, must


def test_html_is_one_file_with_the_plot_embedded(three_clients):
    report = build_report(three_clients)
    page = report_contents(report).html
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert match and base64.b64decode(match.group(1)).startswith(PNG_MAGIC)
    assert "http" not in page.replace(report.run_dir, "") and "<script" not in page
    assert "<strong>Maximum across institutions: ε = 3.00</strong>" in page


def test_dp_off_says_there_is_no_guarantee(tmp_path):
    off = {"round": 1, "status": "trained", "noise_multiplier": 0.0, "max_grad_norm": 0.0, "sample_rate": 0.25,
           "steps": 4, "delta": 1e-5, "epsilon": math.inf, "epsilon_rdp": math.inf}
    report = build_report(make_run(tmp_path, {"a": [off]}, dp_enabled=False, budget=math.inf))
    assert report.epsilon_max == "inf" and client(report, "a").epsilon == "inf"
    assert client(report, "a").entries[0]["epsilon"] == "inf"  # the ledger's null, spelled out
    assert report.epsilon_budget == "inf"
    text = markdown(report)
    assert "There is no formal privacy guarantee (ε = ∞)" in text.split("## What is protected")[0]
    assert plot_epsilon(report).startswith(PNG_MAGIC)
    json.dumps(report.to_dict(), allow_nan=False)


def test_client_level_is_reported_when_present(tmp_path):
    level = {"clipping": "fixed", "side": "server", "noise_multiplier": 0.8, "clipping_norm": 1.0,
             "sample_rate": 1.0, "rounds": 3, "delta": 1e-3, "epsilon": 7.25, "accountant": "rdp"}
    report = build_report(make_run(tmp_path, {"a": [trained(1, 1.0)]}, client_level=level))
    assert report.client_level["epsilon"] == 7.25
    text = markdown(report)
    assert "Client-level DP was **on**" in text and "ε = 7.25 at δ = 0.001" in text


@pytest.mark.parametrize("level", [None, ...], ids=["null", "missing"])
def test_client_level_off_when_null_or_missing(tmp_path, level):
    report = build_report(make_run(tmp_path, {"a": [trained(1, 1.0)]}, client_level=level))
    assert report.client_level is None
    assert "Client-level differential privacy was off" in markdown(report)


def test_an_unreadable_config_leaves_the_budget_unknown_and_an_unnoised_client_unprotected(tmp_path):
    run = make_run(tmp_path, {"a": [trained(1, math.inf, other=math.inf, sigma=0.0)], "b": [trained(1, 2.0)]})
    (run / "config.toml").write_text("rounds = [")
    report = build_report(run)
    assert report.settings.config_error and report.epsilon_budget is None
    assert (report.epsilon_max, report.epsilon_max_client) == ("inf", "a")
    assert client(report, "b").within_budget is None
    summary = markdown(report).split("## What is protected")[0]
    assert "a trained without noise (ε = ∞)" in summary and "budget is unknown" in summary
    from fedtune.privacy.report import evidence

    settings = dict(evidence.settings_table(report).rows)
    assert settings["target ε (σ solved per institution; also caps the budget)"] == "unknown", "not 'σ set directly'"
    result = CliRunner().invoke(cli, ["privacy-report", str(run)])
    assert result.exit_code == 0 and "could not be read" in result.output


def test_delta_against_one_over_n_from_the_sampling_rate(tmp_path):
    """With B = 16 and q = 1/2 a client holds 17 to 32 records."""
    ok = build_report(make_run(tmp_path / "ok", {"a": [trained(1, 1.0, q=0.5)]}, delta=1e-5))
    assert client(ok, "a").records_at_most == 32 and client(ok, "a").delta_below_1_over_n is True
    bad = build_report(make_run(tmp_path / "bad", {"a": [trained(1, 1.0, q=0.5, delta=0.1)]}, delta=0.1))
    assert client(bad, "a").delta_below_1_over_n is False
    assert "**It does not hold** for a" in markdown(bad)
    unsure = build_report(make_run(tmp_path / "unsure", {"a": [trained(1, 1.0, q=0.5, delta=0.04)]}, delta=0.04))
    assert client(unsure, "a").delta_below_1_over_n is None


def test_many_clients_are_plotted_as_an_envelope_and_detailed_only_at_the_top(tmp_path):
    clients = {f"c{i:03d}": [trained(1, i / 10), trained(2, i / 5)] for i in range(60)}
    report = build_report(make_run(tmp_path, clients))
    assert plot_epsilon(report).startswith(PNG_MAGIC)
    detail = markdown(report).split("## Per-round detail")[1]
    assert "`c059`" in detail and "`c000`" not in detail and "every entry of all 60" in detail


def test_the_cli_writes_all_four_files(three_clients):
    result = CliRunner().invoke(cli, ["privacy-report", str(three_clients)])
    assert result.exit_code == 0, result.output
    unfinished = build_report(three_clients, run_finished=False)  # no round committed: not finished
    assert (three_clients / REPORT_MD).read_text() == markdown(unfinished)
    assert json.loads((three_clients / REPORT_JSON).read_text()) == unfinished.to_dict()
    assert (three_clients / PLOT_PNG).read_bytes().startswith(PNG_MAGIC)
    assert "data:image/png;base64," in (three_clients / REPORT_HTML).read_text()


def test_a_run_that_has_not_finished_says_its_figures_may_be_below_what_was_spent(three_clients):
    """A stopped run's ledger can lack the round it stopped in (the clients' own copies hold it): the
    report says so in its summary and headline, and privacy-verify notes it; a finished run's does not."""
    result = CliRunner().invoke(cli, ["privacy-report", str(three_clients)])  # no checkpoint, no summary
    assert result.exit_code == 0, result.output
    said = " ".join((three_clients / REPORT_MD).read_text().split())
    assert "This run has not finished" in said and "`state-dir`" in said and "--resume" in said
    assert "may be below what was spent" in " ".join(result.output.split())
    assert json.loads((three_clients / REPORT_JSON).read_text())["run_finished"] is False
    verified = CliRunner().invoke(cli, ["privacy-verify", str(three_clients)])
    assert "has not finished" in " ".join(verified.output.split())
    for known in (True, None):
        text = " ".join(markdown(build_report(three_clients, run_finished=known)).split())
        assert "has not finished" not in text and "may be below" not in text


def test_a_run_without_a_ledger_is_refused_and_nothing_is_written(tmp_path):
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig()).path
    made = sorted(p.name for p in run.iterdir())
    result = CliRunner().invoke(cli, ["privacy-report", str(run)])
    assert result.exit_code == 2 and LEDGER in result.output
    assert sorted(p.name for p in run.iterdir()) == made == ["config.toml", "engine", "run_id"]
    with pytest.raises(FedtuneError, match=re.escape(str(run / LEDGER))):
        build_report(run)


def test_cli_prints_the_markdown_path_last(three_clients):
    result = CliRunner().invoke(cli, ["privacy-report", str(three_clients)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(three_clients / REPORT_MD)


def test_cli_exits_2_with_a_clear_message_on_a_missing_directory(tmp_path):
    missing = tmp_path / "no-such-run"
    result = CliRunner().invoke(cli, ["privacy-report", str(missing)])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "no-such-run" in result.output
    assert not missing.exists()


def _text(tmp_path, entries, reproducible=False, **overrides):
    path = make_run(tmp_path, {"a": entries})
    if reproducible or overrides:
        overrides = {"dp.reproducible_noise": True} if reproducible else overrides
        cfg = RunDirectory.existing(path).config().with_overrides(overrides)
        (path / "config.toml").write_text(dump_config(cfg))
    return markdown(build_report(path))


def test_the_report_says_which_streams_the_server_knows_under_public_streams(tmp_path):
    text = _text(tmp_path, [trained(1, 2.0, q=1.0, steps=1)], **{"dp.public_streams": True})
    assert "`dp.public_streams`" in text and "Poisson q = 1" in text
    assert "the DP noise, dropout, which records of a sampled user a step uses (user-level DP) and distributed " \
           "DP's rounding came from the operating system's secure randomness" in text
    assert "separate seeds from the operating system" not in text


def test_where_a_step_sampled_the_report_states_the_secret_sample_and_its_side_channel(tmp_path):
    """Amplification by sampling assumes the sample is hidden; a reply's time grows with its size."""
    sampled = _text(tmp_path / "q", [trained(1, 2.0, q=0.25, steps=1)])
    assert "**Secret samples** (q = 0.25)" in sampled and "reply's time" in sampled
    assert "not cover that side channel" in sampled
    full = _text(tmp_path / "full", [trained(1, 2.0, q=1.0, steps=1)])
    assert "Secret samples" not in full, "a full-batch step has no sample to reveal"


def test_the_report_states_the_factor_not_almost_as_likely(tmp_path):
    """At ε = 8.4 the factor e^ε is about 4,400: "almost as likely" was not true."""
    text = _text(tmp_path, [trained(1, 8.4)])
    assert "almost as likely" not in text
    assert "at most a factor of e^ε" in text and "4,447" in text


@pytest.mark.parametrize("policy, reproducible, says, never", [
    ("node config", False, "**Against the server**", "Not against the server"),
    ("run config", False, "no institution enforced a policy of its own", "**Against the server**"),
    ("node config", True, "**Not against the server, nor the other institutions**", "**Against the server**"),
])
def test_against_whom_follows_the_policy_in_force(tmp_path, policy, reproducible, says, never):
    text = _text(tmp_path, [trained(1, 2.0, policy=policy)], reproducible=reproducible)
    assert says in text and never not in text
    assert "holds against the server and anyone" not in text  # the old unconditional sentence


def test_the_report_says_only_what_is_true_about_costs_inputs_and_n(tmp_path):
    text = _text(tmp_path, [trained(1, 2.0, num_examples=64), failed(2)])
    assert "Declined and failed rounds send no update and cost nothing" not in text
    assert "A failed round may have cost ε" in text
    for must in ("peak_rss_mb", "partition_summary.json", "when the reply arrived", "record count n treated as public",
                 "n·q", "separate seeds"):
        assert must in text, must
    assert "expected batch size B" not in text


def test_the_independent_check_is_embedded(tmp_path):
    history = [(1.0, 0.25, 4)]
    right = trained(1, epsilon("prv", history, 1e-5), num_examples=64)
    text = _text(tmp_path / "ok", [right])
    # this run directory has no checkpoint: the committed-record check could not run, and the report says so
    assert "**Every check that could run passed.**" in text and "with a ledger copy that loads" in text
    low = {**right, "epsilon": right["epsilon"] / 2}
    text = _text(tmp_path / "low", [low])
    assert "It found 1 violation" in text and "a round 1: epsilon: expected" in text


REPORT_KEYS = ("generated_by", "run_dir", "dp_enabled", "unit", "neighbouring_relation", "accountant", "sampling",
               "policies", "delta", "epsilon_budget", "target_epsilon", "rounds_planned", "rounds_in_ledger",
               "epsilon_max", "epsilon_max_client", "epsilon_max_other", "clients_declined", "rounds_declined",
               "rounds_failed", "rounds_rejected", "rounds_refused", "clients_state_lost", "clients_over_budget",
               "client_level", "settings", "audit", "verification", "clients", "distributed", "run_finished",
               "clients_awaiting_report")


def test_the_numbers_are_typed_and_their_dict_is_the_report_json(three_clients):
    """privacy_report.json keeps its keys and their order; every part is a frozen dataclass."""
    report = build_report(three_clients)
    assert isinstance(report.clients[0], ClientRow) and report.verification.passed is False  # ε made up here
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.epsilon_max = 0.0
    data = report.to_dict()
    assert tuple(data) == REPORT_KEYS
    assert data["clients_declined"] == ["b"] and data["clients"][0]["epsilon_by_round"] == [0.0, 1.0, 2.0, 3.0]
    assert list(data["accountant"]) == ["name", "other", "bound", "eps_error", "delta_error"]
    assert data["settings"]["epsilon_cap"] == 8.0 and "config_error" not in data["settings"]
    assert data["verification"] == report.verification.to_dict() and data["audit"] is None
    (three_clients / "config.toml").write_text("rounds = [")
    assert list(build_report(three_clients).to_dict()["settings"]) == ["config_error"]


def test_distributed_dp_prose_says_what_holds_against_the_coordinator_by_the_ledgers_mechanism(three_clients):
    """Integer shares with Skellam noise (accountant `skellam`) hold against the coordinator; a ledger of
    Gaussian shares (an earlier fedtune) keeps its caveat: the dithered rounding was not proven there."""
    from fedtune.privacy.report import prose
    from fedtune.privacy.report.numbers import _accountant

    report = dataclasses.replace(build_report(three_clients),
                                 distributed={"min_honest": 4, "epsilon_own_share": 19.1, "sample_rate": 1.0})
    assert "no bound on what that rounding adds is derived" in prose._distributed(report)
    skellam = prose._distributed(dataclasses.replace(report, accountant=_accountant("skellam", 1e-5)))
    assert "Nothing is rounded after the noise, so this holds against the coordinator too" in skellam
    assert "dither" not in skellam


def test_client_level_dp_without_dp_sgd_is_said_once_and_consistently(three_clients):
    """DP-SGD off, client-level DP on: the headline and summary say the record-level guarantee is absent
    and point at the client-level one, instead of "no formal guarantee" beside a client-level section."""
    from fedtune.privacy.report import prose

    account = {"clipping": "fixed", "side": "server", "clipping_norm": 1.0, "noise_multiplier": 1.0,
               "sample_rate": 1.0, "rounds": 3, "delta": 1e-5, "epsilon": 5.0, "accountant": "rdp"}
    report = dataclasses.replace(build_report(three_clients), dp_enabled=False, client_level=account)
    assert "client-level DP, below, covers institutions" in prose.headline(report)
    summary = prose._summary(report)[0]
    assert "no record-level guarantee" in summary and "Client-level DP was on" in summary
    assert "no formal privacy guarantee" in prose.headline(dataclasses.replace(report, client_level=None))


def test_a_failure_the_client_later_reported_counts_once_as_what_it_reported():
    """No reply in round 2 (the server records a failure), then the client's late report of round 2's training:
    one trained round, not a failed one and a trained one."""
    from fedtune import constants as k
    from fedtune.privacy.ledger import LedgerEntry
    from fedtune.privacy.report.numbers import Settings, _client

    def trained(round_: int, eps: float, **late) -> LedgerEntry:
        return LedgerEntry(round_, k.STATUS_TRAINED, "prv", num_examples=50, noise_multiplier=1.0, max_grad_norm=1.0,
                           sample_rate=1.0, steps=1, delta=1e-5, epsilon=eps, epsilon_other=eps, **late)

    entries = (trained(1, 1.0), LedgerEntry(2, k.STATUS_FAILED, "prv", reason="no reply"),
               trained(2, 2.0, recorded_late=True, recorded_round=3), trained(3, 3.0))
    row = _client("a", entries, True, 3, Settings(delta=1e-5, batch_size=64), "prv", 1e-5)
    assert (row.rounds_trained, row.rounds_failed, row.rounds_interrupted) == (3, 0, 0)
    unanswered = _client("a", entries[:2], True, 3, Settings(delta=1e-5, batch_size=64), "prv", 1e-5)
    assert (unanswered.rounds_trained, unanswered.rounds_failed) == (1, 1)


def test_the_epsilon_curve_never_falls_below_what_the_ledger_shows_spent():
    """A client that lost its state reports less in round 3; the ledger's recomputation beside it is what the
    curve shows, as the client's ε does."""
    from fedtune import constants as k
    from fedtune.privacy.ledger import LedgerEntry
    from fedtune.privacy.report.numbers import Settings, _client

    def trained(round_: int, eps: float, **more) -> LedgerEntry:
        return LedgerEntry(round_, k.STATUS_TRAINED, "prv", num_examples=50, noise_multiplier=1.0, max_grad_norm=1.0,
                           sample_rate=1.0, steps=1, delta=1e-5, epsilon=eps, epsilon_other=eps, **more)

    entries = (trained(1, 1.0), trained(2, 2.0), trained(3, 1.1, state_lost=True, epsilon_recomputed=3.0))
    row = _client("a", entries, True, 4, Settings(delta=1e-5, batch_size=64), "prv", 1e-5)
    assert row.epsilon_by_round == (0.0, 1.0, 2.0, 3.0, 3.0) and row.epsilon == 3.0


def test_the_skellam_accountant_has_no_second_column(three_clients):
    """Distributed DP's integer shares have one analysis: the tables show no duplicate "other" ε."""
    from fedtune.privacy.report import evidence
    from fedtune.privacy.report.numbers import _accountant

    report = build_report(three_clients)
    assert "ε (RDP)" in evidence.spent(report)[0].header
    skellam = dataclasses.replace(report, accountant=_accountant("skellam", 1e-5))
    table = evidence.spent(skellam)[0]
    assert table.header[:3] == ["institution", "ε (SKELLAM)", "δ"] and len(table.rows[0]) == len(table.header)
    detail = [b for b in evidence.detail(skellam) if not isinstance(b, str)][0]
    assert "ε (SKELLAM)" not in detail.header and len(detail.rows[0]) == len(detail.header)


def test_spending_from_other_runs_is_shown_beside_this_runs_steps(tmp_path):
    """A client reports all the spending its own state holds, another run's included: the report says that
    its ε is more than this run's steps give, and shows both. Where every ε is exactly this run's, it says
    nothing of it."""
    from fedtune.privacy.report import evidence

    own = epsilon("prv", [(1.0, 0.25, 4)], 1e-5)
    exact = make_run(tmp_path / "exact", {"a": [trained(1, own)], "b": [trained(1, own)]})
    table = evidence.spent(build_report(exact))[0]
    assert not any("this run's steps" in h for h in table.header)
    assert "more than this run's recorded steps give" not in markdown(build_report(exact))

    carried = make_run(tmp_path / "carried", {"a": [trained(1, own)], "b": [trained(1, own + 2.0)]})
    report = build_report(carried)
    assert client(report, "b").epsilon_this_run == pytest.approx(own)
    assert [c.name for c in report.clients if c.holds_more_than_this_run] == ["b"]
    table = evidence.spent(report)[0]
    column = table.header.index("ε of this run's steps (PRV)")
    assert [row[column] for row in table.rows] == [f"{own:.2f}", f"{own:.2f}"]
    text = markdown(report)
    assert "For `b` it is more than this run's recorded steps give" in text
    assert report.epsilon_max == pytest.approx(own + 2.0)  # the larger figure is the one that counts


@pytest.mark.parametrize("field", ["sample_rate", "noise_multiplier"])
def test_a_trained_entry_missing_a_figure_is_reported_not_a_crash(tmp_path, field):
    """A damaged or hand-edited ledger (privacy-verify names the entry): the report is still written."""
    rows = [trained(1, 1.0, distributed_min_honest=2), trained(2, 2.0, distributed_min_honest=2)]
    rows[1][field] = None
    report = build_report(make_run(tmp_path, {"a": rows, "b": [trained(1, 1.5, distributed_min_honest=2)]}))
    assert report.distributed["epsilon_own_share"] is None and client(report, "a").epsilon == 2.0
    assert "privacy report" in markdown(report).lower()


def test_a_finished_run_names_the_clients_whose_last_round_failed_without_a_reply(tmp_path):
    """A review: a client that timed out in the last round (and answered no question after it) may have
    trained; the finished run's report said "a failed round sends no update" and gave its ε without the
    round. It now names the client as possibly having spent more, in the summary and the headline."""
    run = make_run(tmp_path, {"a": [trained(1, 1.0), trained(2, 2.0), failed(3)],
                              "b": [trained(1, 1.0), failed(2), trained(3, 3.0)]})
    report = build_report(run, run_finished=True)
    assert report.clients_awaiting_report == ("a",), "b reported after its failure: its ε covers it"
    text = " ".join(markdown(report).split())
    assert "`a` may have spent more than shown" in text and "sends no update" not in text
    assert "1 institution may have spent more (a lost reply)" in headline(report)


def test_refusals_are_in_the_summary_and_a_run_with_lost_replies_does_not_claim_zero_spending(tmp_path):
    """An auditor's review: refused rounds were missing from the summary; a run whose every round failed
    without a reply said "no privacy was spent (ε = 0)" and "every institution stayed within the budget";
    and with a target ε the settings showed the configured σ, not that each institution solved its own."""
    refusal = {**declined(1, 0.0), "status": "refused", "reason": "require-dp: the run asked for no DP"}
    said = " ".join(markdown(build_report(make_run(tmp_path / "r", {"a": [refusal]}), run_finished=True)).split())
    assert "1 institution refused 1 round (its policy, or its privacy state" in said
    lost = build_report(make_run(tmp_path / "l", {"a": [failed(1)], "b": [failed(1)]}, target=8.0), run_finished=True)
    said = " ".join(markdown(lost).split())
    assert "so no privacy was spent" not in said and "No institution's spending is on record" in said
    assert "as far as this ledger shows" in said and "solved from the target ε" in said


def test_this_runs_epsilon_composes_a_run_of_one_sigma_as_one_segment(monkeypatch):
    """PRV composes one distribution per entry it is given: 200 rounds of one σ, passed entry by entry, took the
    report over two minutes a client (30 rounds: 2.3 s against 0.05 s joined), for the same ε."""
    from fedtune.privacy.ledger import LedgerEntry
    from fedtune.privacy.report import numbers

    given = []
    monkeypatch.setattr(numbers, "epsilon", lambda kind, history, delta: given.append(history) or 1.0)
    trained = [LedgerEntry(r, "trained", "prv", num_examples=64, noise_multiplier=1.2, max_grad_norm=1.0,
                           sample_rate=0.25, steps=4, delta=1e-5, epsilon=1.0) for r in range(1, 201)]
    numbers._this_run(trained, "prv", 1e-5)
    assert given == [[(1.2, 0.25, 800)]]


def _all_text(report) -> str:
    from fedtune.privacy.report import prose

    def flat(block) -> str:
        if isinstance(block, str):
            return block
        if isinstance(block, list):
            return " ".join(flat(b) for b in block)
        return ""
    return " ".join(flat(block) for _, blocks in prose.sections(report) for block in blocks)


def test_under_distributed_dp_the_guarantee_is_of_the_sum_and_the_threshold_of_the_sampled_institutions(three_clients):
    """A review: the report said each update an institution sent was protected at ε, but under distributed DP
    each carries 1/t of the noise; and it counted SecAgg+'s threshold over all institutions, not a round's m."""
    from fedtune.privacy.report.numbers import _accountant

    base = build_report(three_clients)
    settings = dataclasses.replace(base.settings, clients=30, clients_sampled=10)
    report = dataclasses.replace(base, accountant=_accountant("skellam", 1e-5), settings=settings,
                                 distributed={"min_honest": 4, "epsilon_own_share": 19.1, "sample_rate": 1.0})
    text = _all_text(report)
    assert "any update it sent" not in text and "that each institution sent to the server" not in text
    assert "each round's sum of the institutions' updates" in text
    assert ", 7 of the 10 this run samples a round when all take part" in text  # max(2, round(2·10/3))
    assert "second implementation of the Skellam bound" in text and "independent of Opacus" not in text
    assert "any update it sent" in _all_text(base)


def test_without_dp_sgd_but_with_client_level_dp_no_section_denies_the_client_level_guarantee(three_clients):
    """A review: "No accountant ran" and "Nothing ... for any release" beside a client-level ε an accountant
    computed."""
    account = {"clipping": "adaptive", "side": "client", "clipping_norm": 1.0, "noise_multiplier": 1.0,
               "sample_rate": 1.0, "rounds": 3, "delta": 1e-5, "epsilon": 5.0, "accountant": "rdp"}
    report = dataclasses.replace(build_report(three_clients), dp_enabled=False, client_level=account)
    text = _all_text(report)
    for denial in ("No accountant ran", "no formal guarantee for any release", "no guarantee to qualify"):
        assert denial not in text
    assert "The client-level ε is the RDP accountant's" in text and "Client-level DP covers each institution" in text
    assert "NumPy's global generator" in text and "`norm_bit`: whether each institution's update was clipped" in text
    assert "`norm_bit`" not in _all_text(dataclasses.replace(report, client_level={**account, "side": "server"}))


def test_the_method_and_the_policy_sentences_follow_the_run(three_clients):
    """A review: an RDP run called PRV's figure "a looser bound"; a user-level run's method clipped records;
    an institution that set require-dp = false was said to refuse runs without DP."""
    from fedtune.privacy.report import evidence, prose
    from fedtune.privacy.report.numbers import _accountant

    report = build_report(three_clients)
    assert "a looser bound on the same steps" in " ".join(b for b in evidence.spent(report) if isinstance(b, str))
    rdp = dataclasses.replace(report, accountant=_accountant("rdp", 1e-5))
    rdp_text = " ".join(b for b in evidence.spent(rdp) if isinstance(b, str))
    assert "looser" not in rdp_text and "PRV's is usually the tighter" in rdp_text
    assert "every record's gradient is clipped" in _all_text(report)
    users = _all_text(dataclasses.replace(report, unit="user"))
    assert "every sampled user's gradient" in users and "every record's gradient is clipped" not in users
    institution = prose._against_whom_by_policy(dataclasses.replace(report, policies=("node config",)))
    assert "no DP unless its node config set `require-dp = false`" in institution
