"""The server's side of `fedtune audit`: canary losses from the final adapter, the theoretical ε from
the ledger, audit.json, and the command's exit statuses."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from fedtune.cli import cli
from fedtune.config import DataConfig, DPConfig, FedtuneConfig, TrainConfig
from fedtune.data.text import TokenizedTexts, tokenize
from fedtune.models.adapter import trainable_state
from fedtune.models.build import load_tokenizer
from fedtune.models.evaluate import evaluate, example_losses
from fedtune.privacy.audit import AUDIT_FILE, AuditResult, largest_certifiable
from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger
from fedtune.privacy.report import build_report, markdown
from fedtune.server.audit import _contributions, audit_record, holders_epsilon, run_audit, theoretical_epsilon
from fedtune.server.run_dir import Checkpoint, RunDirectory


def ledger(dp_enabled=True, **epsilons) -> PrivacyLedger:
    """Each named institution trained a round per ε given (None: unbounded)."""
    return PrivacyLedger("prv", dp_enabled, {name: [
        LedgerEntry(round_, "trained", "prv", noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=4,
                    delta=1e-5, epsilon=_eps(eps), epsilon_other=_eps(eps))
        for round_, eps in enumerate(values, start=1)] for name, values in epsilons.items()})


def _eps(value: float | None) -> float:
    return math.inf if value is None else value


def commit(run: RunDirectory, arrays: dict, book: PrivacyLedger) -> None:
    """Round 1 committed, its spending in the ledger (the round loop saves it before committing)."""
    book.save(run.path)
    run.commit(Checkpoint(1, arrays, [], book.to_dict()))


def test_theoretical_epsilon_is_the_largest_any_institution_spent():
    assert theoretical_epsilon(ledger(a=[1.0, 2.0], b=[2.5])) == 2.5
    assert theoretical_epsilon(ledger(dp_enabled=False, a=[None])) == math.inf
    assert theoretical_epsilon(ledger(a=[1.0], b=[None])) == math.inf  # one institution trained without noise
    assert theoretical_epsilon(ledger()) == 0.0


def test_each_canary_stands_under_its_holders_epsilon_and_a_lost_state_does_not_lower_it():
    from fedtune.data.canaries import Canaries, CanaryPlan

    spent = ledger(**{"client-0000": [1.0, 2.0], "client-0001": [0.5]}).clients
    # client-0001 lost its state: it reported 0.3 in round 2, and the server recomputed 1.5
    lost = LedgerEntry(2, "trained", "prv", noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, steps=4,
                       delta=1e-5, epsilon=0.3, epsilon_other=0.3, epsilon_recomputed=1.5)
    book = PrivacyLedger("prv", True, {**spent, "client-0001": [*spent["client-0001"], lost]})
    canaries = Canaries(CanaryPlan(clients=(0, -1, 1), repeats=1, sites=(0, 0, 1)), records=())
    assert holders_epsilon(book, canaries) == {"client-0000": {"canaries": 2, "epsilon": 2.0},
                                               "client-0001": {"canaries": 1, "epsilon": 1.5}}
    assert theoretical_epsilon(book) == 2.0
    assert holders_epsilon(ledger(dp_enabled=False, **{"client-0000": [None]}), canaries)["client-0001"] == {
        "canaries": 1, "epsilon": "inf"}


def test_example_losses_average_to_the_evaluation_loss(tiny_model, tokenized):
    data = TokenizedTexts(tokenized.input_ids[:12], tokenized.labels[:12])
    losses = example_losses(tiny_model, data, batch_size=5)  # batches of uneven padding
    assert len(losses) == len(data)
    assert sum(losses) / len(losses) == pytest.approx(evaluate(tiny_model, data)[0], rel=1e-5)


def test_run_audit_scores_every_canary_with_the_last_checkpoint(tmp_path, tiny_model):
    cfg = FedtuneConfig(rounds=1, clients=2, data=DataConfig(demo_examples=60, canaries=12))
    run = RunDirectory.create(tmp_path / "run", cfg)
    with torch.no_grad():  # a final adapter that differs from the model's current weights
        arrays = {name: value + 0.01 for name, value in trainable_state(tiny_model).items()}
    commit(run, arrays, ledger(a=[1.5], b=[3.25]))
    record = run_audit(run, confidence=0.9)
    assert json.loads((run.path / AUDIT_FILE).read_text()) == record
    assert (record["canaries"], record["epsilon_theoretical"], record["confidence"]) == (12, 3.25, 0.9)
    assert record["delta"] == cfg.dp.delta and record["round"] == 1
    assert record["consistent"] is (record["epsilon_lower_bound"] <= 3.25)
    from fedtune.data.federated import federated_data

    canaries = federated_data(cfg.data, 2, 0).canaries
    assert record["canary_members"] == list(canaries.members) and record["canaries_in"] == sum(canaries.members)
    # each loss is what the evaluation of that canary alone gives under the checkpoint's adapter
    tokenizer = load_tokenizer("")
    for i in (0, 5, 11):
        text, label = canaries.records[i]
        alone = evaluate(tiny_model, tokenize(tokenizer, [text], [label], 64))[0]
        assert record["canary_losses"][i] == pytest.approx(alone, rel=1e-5)
    report = build_report(run.path)  # the privacy report shows it beside the theoretical ε
    assert report.audit.epsilon_theoretical == 3.25 and "canary_losses" not in report.to_dict()["audit"]
    text = markdown(report)
    assert "## Empirical privacy audit" in text and "must stay at or below the theoretical ε" in text
    # a canary's coin changes its institution's n, which the guarantee treats as public: the report says what
    # the bound is compared against (a review: it claimed any attack, counts included, was bounded)
    assert "with each institution's count n of records public" in text and "never n" in text


def test_run_without_canaries_cannot_be_audited(tmp_path):
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig(data=DataConfig(demo_examples=60)))
    commit(run, {}, ledger(a=[1.0]))
    with pytest.raises(Exception, match="no canaries"):
        run_audit(run, 0.95)


def _result(bound: float) -> AuditResult:
    return AuditResult(canaries=100, members=52, guesses_in=25, guesses_out=25, correct=45,
                       epsilon_lower_bound=bound, confidence=0.95, delta=1e-5, hypotheses=13, auc=0.8,
                       tpr_at_fpr=0.1, fpr=0.01,
                       largest_certifiable=largest_certifiable([i < 52 for i in range(100)], 1e-5))


def test_the_audit_states_its_power_and_the_canaries_the_theoretical_epsilon_needs(monkeypatch, tmp_path):
    record = audit_record(_result(0.5), 3.0, FedtuneConfig(), 1)
    assert record["epsilon_largest_certifiable"] == pytest.approx(2.28, abs=0.01)  # 100 canaries, δ = 1e-5
    needed = record["canaries_to_certify_theoretical"]
    assert largest_certifiable([i % 2 == 0 for i in range(needed)], 1e-5) >= 3.0
    assert audit_record(_result(0.5), 8.0, FedtuneConfig(), 1)["canaries_to_certify_theoretical"] is None
    _fake_audit(monkeypatch, True, record)
    result = CliRunner().invoke(cli, ["audit", "--out", str(tmp_path / "run")])
    said = " ".join(result.stderr.split())
    assert "no outcome of this audit can show more than ε ≥ 2.28" in said
    assert f"that takes at least {needed} canaries (--canaries)" in said
    run = RunDirectory.create(tmp_path / "reported", FedtuneConfig(dp=DPConfig()))
    commit(run, {}, ledger(a=[3.0]))
    (run.path / AUDIT_FILE).write_text(json.dumps(record))
    text = " ".join(markdown(build_report(run.path)).split())
    assert "could not reveal a leak between 2.28" in text and f"needs at least {needed} canaries" in text


def test_a_bound_above_the_theoretical_epsilon_is_inconsistent_and_said_so(tmp_path):
    cfg = FedtuneConfig(data=DataConfig(canaries=100))
    assert audit_record(_result(0.9), 1.0, cfg, 3)["consistent"] is True
    assert audit_record(_result(1.2), 1.0, cfg, 3)["consistent"] is False
    assert audit_record(_result(5.0), math.inf, cfg, 3)["epsilon_theoretical"] == "inf"
    run = RunDirectory.create(tmp_path / "run", FedtuneConfig(dp=DPConfig()))
    commit(run, {}, ledger(a=[1.0]))
    (run.path / AUDIT_FILE).write_text(json.dumps(audit_record(_result(1.2), 1.0, cfg, 1)))
    text = " ".join(markdown(build_report(run.path)).split())
    assert "is above the theoretical ε = 1.00: this signals a bug" in text


def _fake_audit(monkeypatch, consistent: bool, record: dict | None = None) -> None:
    record = record or audit_record(_result(1.2 if not consistent else 0.5), 1.0, FedtuneConfig(), 1)
    monkeypatch.setattr("fedtune.cli._simulate", lambda *args, **kwargs: None)
    monkeypatch.setattr("fedtune.server.audit.run_audit", lambda run, confidence, vantage="final": record)
    monkeypatch.setattr("fedtune.cli._write_report", lambda run_dir: None)
    monkeypatch.setattr("fedtune.server.run_dir.RunDirectory.existing", classmethod(lambda cls, path: cls(path)))


@pytest.mark.parametrize("consistent, status", [(True, 0), (False, 1)])
def test_audit_exits_1_when_the_bound_exceeds_the_theoretical_epsilon(monkeypatch, tmp_path, consistent, status):
    _fake_audit(monkeypatch, consistent)
    result = CliRunner().invoke(cli, ["audit", "--out", str(tmp_path / "run")])
    assert result.exit_code == status, result.output
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "run" / AUDIT_FILE)
    assert ("ABOVE the theoretical ε" in result.stderr) is not consistent


@pytest.mark.parametrize("args, says", [
    (["--confidence", "1.5"], "--confidence"),
    (["--canaries", "1"], "--canaries"),
    (["--no-dp", "--noise-multiplier", "2"], "--no-dp and --noise-multiplier"),
    (["--canary-repeats", "4"], "data.canary_repeats"),
    (["--resume", "elsewhere"], "not both"),
    ([], "--out RUN_DIR"),
])
def test_bad_audit_options_exit_2_naming_the_option(tmp_path, args, says):
    out = ["--out", str(tmp_path / "never")] if args else []
    result = CliRunner().invoke(cli, ["audit", *out, *args])
    assert result.exit_code == 2
    assert says in " ".join(result.stderr.split())
    assert not (tmp_path / "never").exists()


def test_the_server_vantage_scores_each_canary_by_its_institutions_update(tmp_path, tiny_model):
    """Each institution's round-1 update is a step down the gradients of its member canaries (what
    DP-SGD without noise would add for them), plus a shared step every institution takes: the
    server's view must tell members from non-members."""
    from fedtune.data.federated import federated_data
    from fedtune.data.text import pad_batch
    from fedtune.server.audit import client_name

    # SGD: the update is a plain sum of steps (under AdamW the audit scales them per coordinate)
    cfg = FedtuneConfig(rounds=1, clients=2, data=DataConfig(demo_examples=60, canaries=40),
                        train=TrainConfig(optimizer="sgd"))
    run = RunDirectory.create(tmp_path / "run", cfg)
    canaries = federated_data(cfg.data, 2, 0).canaries
    tiny_model.eval()
    start = trainable_state(tiny_model)
    names = list(start)
    data = tokenize(load_tokenizer(""), [t for t, _ in canaries.records], [y for _, y in canaries.records], 64)

    def descent(i: int) -> dict[str, torch.Tensor]:  # −g_i / ‖g_i‖ at the round's start
        tiny_model.zero_grad(set_to_none=True)
        tiny_model(**pad_batch([data[i]])).loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in tiny_model.named_parameters() if n in start}
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        return {n: -g / norm for n, g in grads.items()}

    directions = [descent(i) for i in range(len(canaries.members))]
    shared = {n: 0.01 * torch.randn_like(t) for n, t in start.items()}
    held = {c: canaries.plan.at_client(c) for c in range(2)}  # its member canaries
    updates = {client_name(c): {n: start[n] + shared[n] + 0.05 * sum(directions[i][n] for i in held[c]) for n in names}
               for c in range(2)}
    book = ledger(dp_enabled=False, **{client_name(c): [None] for c in range(2)})
    book.save(run.path)
    run.commit(Checkpoint(0, start, [], book.to_dict()))
    run.save_observed(1, updates)
    run.commit(Checkpoint(1, updates[client_name(0)], [], book.to_dict()))

    record = run_audit(run, confidence=0.95, vantage="server")
    assert record["vantage"] == "server" and record["auc"] > 0.95
    assert record["epsilon_lower_bound"] > 1.0  # 40 canaries can show at most 1.17
    # Each score is the t-statistic of the canary's weight in its institution's update (0.05 for a
    # member, 0 for a non-member): positive for every member, about 0 on average for the non-members
    # (the residual here is only the shared step, so small misfits give non-members t of ±50 too).
    member = [x for x, m in zip(record["canary_scores"], canaries.members, strict=True) if m]
    outside = [x for x, m in zip(record["canary_scores"], canaries.members, strict=True) if not m]
    assert min(member) > 0 and sum(member) / len(member) > 5 * abs(sum(outside) / len(outside))


def test_adamws_update_follows_the_modelled_scale_not_the_raw_gradient():
    """The server-vantage audit models an AdamW update as −lr·Σ g/√v with v from records' gradients
    (_adam_scale). On gradients whose coordinates differ in scale by 100x, a real torch AdamW run's
    update is far better aligned with one record's gradient scaled so than with the gradient itself,
    which is why the audit fits the scaled directions."""
    from fedtune.server.audit import _adam_scale, _unit_descent

    torch.manual_seed(0)
    scales = torch.logspace(-2, 0, 400)  # per-coordinate gradient scale
    records = (torch.randn(512, 400) + 0.3) * scales  # per-record gradients with a shared mean
    weights = torch.zeros(400, requires_grad=True)
    optimizer = torch.optim.AdamW([weights], lr=1e-3, weight_decay=0.0)
    for step in range(32):  # mini-batches of 16, each record once
        optimizer.zero_grad()
        weights.grad = records[16 * step:16 * (step + 1)].mean(dim=0)
        optimizer.step()
    move = weights.detach()
    scale = _adam_scale(records[:256], batch_size=16)
    total = records.sum(dim=0, keepdim=True)  # what the records' steps add up to
    modelled = _unit_descent(total, scale)[0]
    raw = _unit_descent(total)[0]
    def cosine(direction: torch.Tensor) -> float:
        return float(direction @ move / move.norm())

    assert cosine(modelled) > 0.95 and cosine(raw) < 0.8  # measured: 0.99 and 0.65


def test_the_server_vantage_needs_the_record_of_updates(tmp_path, tiny_model):
    cfg = FedtuneConfig(rounds=1, clients=2, data=DataConfig(demo_examples=60, canaries=12))
    run = RunDirectory.create(tmp_path / "run", cfg)
    commit(run, trainable_state(tiny_model), ledger(a=[1.0]))
    with pytest.raises(Exception, match="--vantage final"):
        run_audit(run, 0.95, vantage="server")


def test_a_canary_nearly_spanned_by_others_does_not_outrank_the_members():
    """Two members stepped along their directions; of three non-members, the third's direction is
    almost the sum of the other two. Their fitted weights are then large by chance (the noise along
    the tiny part that sets them apart is divided by that tiny part), but so are their standard
    errors: ranked by t-statistic the members come first, ranked by weight they would not. The
    score also does not depend on the update's scale."""
    gen = torch.Generator().manual_seed(0)
    members, outside = torch.nn.functional.normalize(torch.randn(5, 400, generator=gen), dim=1).split([2, 3])
    outside[2] = torch.nn.functional.normalize(outside[0] + outside[1] + 0.01 * outside[2], dim=0)
    directions = torch.cat([members, outside])
    move = members.sum(dim=0) + 0.05 * torch.randn(400, generator=gen)
    weights = torch.linalg.lstsq(directions.T.double(), move.double().unsqueeze(1)).solution.squeeze(1)
    assert weights[2:].abs().max() > weights[:2].min(), "by weight, a non-member outranks a member"
    scores = torch.tensor(_contributions(move, directions, []))
    assert scores[:2].min() > scores[2:].abs().max()
    assert _contributions(3 * move, directions, []) == pytest.approx(scores.tolist())


def test_the_servers_vantage_is_refused_where_the_server_could_regenerate_the_noise(tmp_path):
    """A review's case: under dp.reproducible_noise the server's view has no finite ε, yet the audit compared the
    bound from the updates it saw with the ledger's ε and called it consistent."""
    from fedtune.config import FedtuneConfig
    from fedtune.errors import ConfigError
    from fedtune.server.audit import run_audit
    from fedtune.server.run_dir import RunDirectory

    cfg = FedtuneConfig.from_flat({"clients": 2, "dp.reproducible_noise": True, "data.canaries": 10})
    run = RunDirectory.create(tmp_path / "run", cfg)
    with pytest.raises(ConfigError, match="reproducible_noise.*--vantage final"):
        run_audit(run, 0.95, "server")


def test_the_cli_refuses_the_servers_vantage_under_reproducible_noise_before_training(tmp_path):
    from typer.testing import CliRunner

    from fedtune.cli import cli

    config = tmp_path / "run.toml"
    config.write_text("[dp]\nreproducible_noise = true\n")
    result = CliRunner().invoke(cli, ["audit", "--config", str(config), "--vantage", "server", "--out",
                                      str(tmp_path / "never")])
    assert result.exit_code == 2 and "reproducible_noise" in " ".join(result.output.split())
    assert not (tmp_path / "never").exists()
