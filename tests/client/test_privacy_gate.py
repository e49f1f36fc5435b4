"""Before training, a client checks the server's request against its own privacy policy and its
remembered spending against the ledger's record of it; it refuses, with the reason on record,
when either does not hold. After training, an update no optimizer step reached is not sent."""

from __future__ import annotations

import csv
import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune import constants as k
from fedtune.client import app as client_app
from fedtune.client.state import load_state
from fedtune.client.train import TrainResult
from fedtune.config import FedtuneConfig
from fedtune.data.demo import LABELS, make_demo_dataset
from fedtune.models.adapter import to_record
from fedtune.models.build import build_model

pytestmark = pytest.mark.usefixtures("flower_run")
RUN = {"clients": 2, "data.demo_examples": 80, "train.batch_size": 8, "lora.r": 2, "dp.delta": 1e-5}


def _cfg(**options) -> FedtuneConfig:
    return FedtuneConfig.from_flat({**RUN, "data.labels": list(LABELS), **options})


def _message(cfg: FedtuneConfig, server_dir: str = "", **extra) -> Message:
    model = build_model(cfg.model, cfg.lora, num_labels=len(LABELS), seed=cfg.seed)
    config = {**cfg.to_flat(), k.SERVER_ROUND: 1, k.CLIENT_STATE_DIR: server_dir, **extra}
    return Message(RecordDict({k.ARRAYS: to_record(model), k.CONFIG: ConfigRecord(config)}), dst_node_id=7,
                   message_type="train")


def _context(**node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def _institution(tmp_path, **node_config) -> Context:
    """An institution's node: its own data file, and whatever else its operator set."""
    path = tmp_path / "notes.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((e.text, LABELS[e.label]) for e in make_demo_dataset(40, seed=3))
    return _context(**{"client-name": "clinic-a", k.DATA_PATH: str(path), **node_config})


def _status(reply: Message) -> tuple[str, str]:
    info = reply.content[k.CLIENT_INFO]
    return info[k.STATUS], info.get(k.REASON, "")


def test_an_institution_refuses_a_run_without_dp_and_records_why(tmp_path):
    context = _institution(tmp_path, **{"state-dir": str(tmp_path / "state")})
    reply = client_app.train(_message(_cfg(**{"dp.enabled": False})), context)
    status, reason = _status(reply)
    assert status == k.STATUS_REFUSED and "require-dp" in reason
    assert k.ARRAYS not in reply.content and reply.content[k.METRICS][k.STEPS] == 0
    own = json.loads((tmp_path / "state" / "clinic-a.json").read_text())["ledger"]
    assert [(e["status"], "require-dp" in e["reason"]) for e in own] == [(k.STATUS_REFUSED, True)]


def test_an_institution_ignores_a_state_dir_the_server_names(tmp_path):
    reply = client_app.train(_message(_cfg(), server_dir=str(tmp_path / "server-chosen")), _institution(tmp_path))
    status, reason = _status(reply)
    assert status == k.STATUS_REFUSED and "state-dir" in reason
    assert not (tmp_path / "server-chosen").exists()


def test_a_node_that_lost_its_state_refuses_and_reports_no_lower_epsilon(tmp_path):
    """The review's case: a deleted state file made ε restart from nothing (4.39 -> 6.58 -> 4.39)."""
    cfg, node = _cfg(), {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}
    first = client_app.train(_message(cfg, str(tmp_path)), _context(**node))
    assert _status(first)[0] == k.STATUS_TRAINED
    spent = first.content[k.METRICS]
    ledger = [[spent[k.NOISE_MULTIPLIER], spent[k.SAMPLE_RATE], spent[k.STEPS]]]
    (tmp_path / "client-0000.json").unlink()  # a new process (fresh Context) without its file
    again = client_app.train(_message(cfg, str(tmp_path), **{k.LEDGER_SPENT: json.dumps(ledger)}), _context(**node))
    status, reason = _status(again)
    assert status == k.STATUS_REFUSED and "lost" in reason and k.NODE_ADOPT_LEDGER_SPENDING in reason
    assert again.content[k.METRICS][k.EPSILON] == pytest.approx(spent[k.EPSILON])


def test_the_operator_can_continue_from_the_ledgers_record(tmp_path):
    cfg = _cfg()
    node = {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2, k.NODE_ADOPT_LEDGER_SPENDING: True}
    ledger = [[1.0, 0.25, 4]]
    reply = client_app.train(_message(cfg, str(tmp_path), **{k.LEDGER_SPENT: json.dumps(ledger)}), _context(**node))
    assert _status(reply)[0] == k.STATUS_TRAINED
    assert reply.content[k.CLIENT_INFO][k.ADOPTED_LEDGER_SPENDING] == 1
    history = load_state(_context(**node), "client-0000", str(tmp_path)).history
    assert history[0] == (1.0, 0.25, 4) and sum(s for _, _, s in history) > 4, "continued from the ledger's record"


def test_training_that_moves_no_lora_weight_fails_closed_and_keeps_its_spending(tmp_path, monkeypatch):
    """Opacus #820: steps were taken (they count) but the optimizer never reached LoRA."""
    def no_op_round(model, data, cfg, history, proximal_mu, seed, canaries=None):
        return TrainResult(0.5, 4, 0.25, [*history, (1.0, 0.25, 4)])

    monkeypatch.setattr(client_app, "train_round", no_op_round)
    reply = client_app.train(_message(_cfg(), str(tmp_path)), _context(**{k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}))
    status, reason = _status(reply)
    assert status == k.STATUS_FAILED and "#820" in reason
    assert k.ARRAYS not in reply.content and reply.content[k.METRICS][k.STEPS] == 4
    assert load_state(_context(), "client-0000", str(tmp_path)).history == [(1.0, 0.25, 4)]


def test_spending_the_server_never_recorded_is_reported_and_recorded_late(tmp_path):
    """Issue: after a crash during training the ledger held 3 rounds' steps where 4 were run. The
    client now reports its own entries for what the ledger lacks, and the ledger records them."""
    from fedtune.privacy.ledger import PrivacyLedger
    from fedtune.server.rounds import record_privacy

    cfg, node = _cfg(), {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}
    lost = client_app.train(_message(cfg, str(tmp_path)), _context(**node))  # its reply never reaches the ledger
    assert _status(lost)[0] == k.STATUS_TRAINED and k.UNRECORDED not in lost.content[k.CLIENT_INFO]
    unnamed = client_app.train(_message(cfg, str(tmp_path), **{k.SERVER_ROUND: 2}), _context(**node))
    assert k.UNRECORDED not in unnamed.content[k.CLIENT_INFO], "a server that cannot name it sends no record"

    ledger = PrivacyLedger(cfg.dp.accounting, True)  # the server names it now, and holds nothing of it
    ledger.record_round("client-0000", 2, k.STATUS_TRAINED, unnamed.content[k.METRICS])
    again = client_app.train(_message(cfg, str(tmp_path), **{k.SERVER_ROUND: 3, **_record_of(ledger)}),
                             _context(**node))
    late = json.loads(again.content[k.CLIENT_INFO][k.UNRECORDED])
    assert [(e["round"], e["steps"]) for e in late] == [(1, lost.content[k.METRICS][k.STEPS])]

    again.metadata.__dict__["_src_node_id"] = 7
    record_privacy(ledger, 3, [again], {})
    entries = ledger.entries("client-0000")
    assert [(e.round, e.recorded_late, e.recorded_round) for e in entries] == [(2, False, None), (1, True, 3),
                                                                               (3, False, None)]
    history = load_state(_context(**node), "client-0000", str(tmp_path)).history
    assert sum(s for _, _, s in ledger.spent("client-0000")) == sum(s for _, _, s in history)

    # Once the ledger has it, nothing more is reported.
    fourth = client_app.train(_message(cfg, str(tmp_path), **{k.SERVER_ROUND: 4, **_record_of(ledger)}),
                              _context(**node))
    assert _status(fourth)[0] == k.STATUS_TRAINED and k.UNRECORDED not in fourth.content[k.CLIENT_INFO]


def _record_of(ledger) -> dict[str, str]:
    """What server/spending.py adds to a named client's train message."""
    from fedtune.privacy.accountant import merged

    return {k.LEDGER_SPENT: json.dumps(merged(ledger.spent("client-0000"))),
            k.LEDGER_ROUNDS: json.dumps(ledger.rounds_held("client-0000"))}


def test_a_damaged_state_file_is_named_refused_and_left_as_it_is(tmp_path):
    cfg, node = _cfg(), {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}
    damaged = tmp_path / "client-0000.json"
    damaged.write_text('{"history": [[1.0, 0.25')
    reply = client_app.train(_message(cfg, str(tmp_path)), _context(**node))
    status, reason = _status(reply)
    assert status == k.STATUS_REFUSED and str(damaged) in reason and "damaged" in reason
    assert damaged.read_text() == '{"history": [[1.0, 0.25' and k.ARRAYS not in reply.content


def test_under_distributed_dp_a_damaged_state_file_still_adds_a_full_noise_share(tmp_path, monkeypatch):
    """A refused institution submits a noise-only share that the others count on: with a damaged state
    file it must use the round's rate and the run's σ, as a client refused for any other reason does.
    The run's σ is that of one step a round at the run's q (here 1); it once came from the refused
    institution's own schedule, several steps of batch 8, which gave a smaller σ and a sum noised less
    than every institution's ε is stated for."""
    from fedtune.privacy.budget import solve_noise_multiplier

    shared = []
    monkeypatch.setattr(client_app, "_noise_share", lambda start, cfg, *rest: shared.append(cfg) or start)
    monkeypatch.setattr(client_app, "secagg_range", lambda context: 2**20)
    cfg = _cfg(**{"dp.target_epsilon": 3.0, "dp.secagg": True, "dp.distributed_min_honest": 2})
    node = {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "client-0000.json").write_text('{"history": [[1.0, 0.25')
    damaged = client_app.train(_message(cfg, str(tmp_path / "damaged"), **{k.LEARNING_RATE: 0.25}), _context(**node))
    # batch 8 < its records: refused after its σ is solved, for taking several steps
    intact = client_app.train(_message(cfg, str(tmp_path / "intact"), **{k.LEARNING_RATE: 0.25}), _context(**node))
    assert [_status(reply)[0] for reply in (damaged, intact)] == [k.STATUS_REFUSED] * 2
    assert "damaged" in _status(damaged)[1] and "one plain-SGD step of each institution" in _status(intact)[1]
    first, second = shared
    assert first.train.learning_rate == second.train.learning_rate == 0.25
    run_sigma = solve_noise_multiplier(3.0, cfg.dp.delta, 1.0, cfg.rounds_per_client(), cfg.dp.accounting)
    assert first.dp.noise_multiplier == second.dp.noise_multiplier == run_sigma


@pytest.mark.parametrize("dp, node, sent", [
    (True, {}, False),  # an institution under DP: its default
    (True, {k.NODE_RELEASE_SCORES: True}, True),  # its operator released them
    (False, {"require-dp": False}, True),  # no DP, no guarantee to keep them out of
])
def test_an_institution_under_dp_sends_no_loss_or_validation_scores_unless_released(tmp_path, dp, node, sent):
    """The training loss and the validation loss and accuracy are computed from the institution's records
    without noise, at weights the coordinator chose, and are outside ε."""
    import math

    context = _institution(tmp_path, **{"state-dir": str(tmp_path / "state"), k.DATA_VAL_FRACTION: 0.25, **node})
    cfg = _cfg(**{"dp.enabled": dp})
    trained = client_app.train(_message(cfg), context)
    assert _status(trained)[0] == k.STATUS_TRAINED and k.ARRAYS in trained.content
    scores = client_app.evaluate(Message(_message(cfg).content, dst_node_id=7, message_type="evaluate"),
                                 context).content[k.METRICS]
    figures = [trained.content[k.METRICS][k.TRAIN_LOSS], scores[k.EVAL_LOSS], scores[k.EVAL_ACCURACY]]
    assert [math.isfinite(f) for f in figures] == [sent] * 3, figures
    assert scores[k.NUM_EXAMPLES] > 0


def test_a_node_on_the_runs_own_data_sends_its_scores(tmp_path):
    """Simulation: the coordinator split the data itself, so the run's policy applies and releases them."""
    import math

    reply = client_app.train(_message(_cfg(), str(tmp_path)), _context(**{k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}))
    assert math.isfinite(reply.content[k.METRICS][k.TRAIN_LOSS])


def test_under_distributed_dp_an_institution_checks_it_is_asked_for_one_plain_sgd_step():
    """The sum carries σ only if each share is of one plain-SGD step (on every record, or on a Poisson sample
    at train.sample_rate); the server's
    preflight checks this, and the institution checks what it is actually sent."""
    from fedtune.privacy.distributed import not_one_sgd_step

    good = {"train.optimizer": "sgd", "train.local_epochs": 1, "train.batch_size": 64}
    assert not_one_sgd_step(_cfg(**good).train, 40) == ""
    assert not_one_sgd_step(_cfg(**{**good, "train.batch_size": 8, "train.sample_rate": 0.25}).train, 40) == "", \
        "one step on a Poisson sample at the rate every institution uses"
    for change, says in [({"train.batch_size": 8}, "take several"), ({"train.local_epochs": 2}, "local_epochs is 2"),
                         ({"train.optimizer": "adamw"}, "optimizer is adamw")]:
        assert says in not_one_sgd_step(_cfg(**{**good, **change}).train, 40)


@pytest.mark.parametrize("batch_size, status", [(8, k.STATUS_REFUSED), (4096, k.STATUS_TRAINED)])
def test_public_streams_are_refused_unless_every_record_is_in_every_step(tmp_path, batch_size, status):
    """dp.public_streams tells the server which records each step samples; the accounting's amplification
    by sampling needs that secret whenever q < 1, so a client trains under it only at q = 1."""
    reply = client_app.train(_message(_cfg(**{"dp.public_streams": True, "train.batch_size": batch_size}),
                                      str(tmp_path)), _context(**{k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}))
    got, reason = _status(reply)
    assert got == status, reason
    assert (k.ARRAYS in reply.content) == (status == k.STATUS_TRAINED)
    if status == k.STATUS_REFUSED:
        assert "dp.public_streams" in reason and "train.batch_size 8" in reason


def test_min_noise_multiplier_binds_the_sigma_a_target_epsilon_solves_for(tmp_path):
    """docs/privacy.md: `min-noise-multiplier` refuses a smaller σ "after solving a target ε". The
    run asks for ε = 8 (its σ option, 5, is then unused); the institution compares its floor of 2
    with the σ it solved for its own records, which is below it."""
    cfg = _cfg(**{"dp.target_epsilon": 8.0, "dp.noise_multiplier": 5.0, "rounds": 3})
    context = _institution(tmp_path, **{"state-dir": str(tmp_path / "state"), "min-noise-multiplier": 2.0})
    status, reason = _status(client_app.train(_message(cfg), context))
    assert status == k.STATUS_REFUSED and "min-noise-multiplier" in reason, reason
    compared = float(reason.split("noise multiplier ")[1].split()[0])
    assert 0 < compared < 2.0, f"refused for the solved σ, not the option's 5: {reason}"


def test_under_distributed_dp_an_institution_that_declines_still_adds_a_full_noise_share(tmp_path, monkeypatch):
    """docs/privacy.md: "An institution that declines or is refused submits a noise-only share": the
    others count on it for the sum's σ, so it is of the round's rate and the run's σ."""
    from fedtune.privacy.budget import solve_noise_multiplier

    shared = []
    monkeypatch.setattr(client_app, "_noise_share", lambda start, cfg, *rest: shared.append(cfg) or start)
    monkeypatch.setattr(client_app, "secagg_range", lambda context: 2**20)
    cfg = _cfg(**{"dp.target_epsilon": 3.0, "dp.secagg": True, "dp.distributed_min_honest": 2,
                  "train.batch_size": 4096, "train.optimizer": "sgd"})
    node = {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2, "epsilon-budget": 0.01}  # too little for one round
    reply = client_app.train(_message(cfg, str(tmp_path), **{k.LEARNING_RATE: 0.25}), _context(**node))
    assert _status(reply)[0] == k.STATUS_DECLINED and k.ARRAYS in reply.content
    (share,) = shared
    assert share.train.learning_rate == 0.25
    assert share.dp.noise_multiplier == solve_noise_multiplier(3.0, cfg.dp.delta, 1.0, cfg.rounds_per_client(),
                                                               cfg.dp.accounting)


def test_another_runs_spending_is_never_reported_late_and_stays_in_the_epsilon(tmp_path):
    """An institution's state directory outlives a run. Its spending in run A used to be reported
    late to run B's ledger under A's round numbers, q and δ, and, where a round and step count of
    both runs coincided, in place of B's own lost round (the wrong σ and q on B's ledger). Each
    client entry now names its run: B's ledger gets only B's lost spending, and the ε the client
    reports still counts A's."""
    from fedtune.privacy.ledger import PrivacyLedger
    from fedtune.server.rounds import record_privacy

    node, state_dir = {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}, str(tmp_path)
    in_a = client_app.train(_message(_cfg(**{"dp.noise_multiplier": 0.6}), state_dir, **{k.RUN_ID: "a"}),
                            _context(**node))
    cfg = _cfg()
    lost = client_app.train(_message(cfg, state_dir, **{k.RUN_ID: "b"}), _context(**node))  # B's round 1: lost
    ledger = PrivacyLedger(cfg.dp.accounting, True)
    second = client_app.train(_message(cfg, state_dir, **{k.RUN_ID: "b", k.SERVER_ROUND: 2, **_record_of(ledger)}),
                              _context(**node))
    late = json.loads(second.content[k.CLIENT_INFO][k.UNRECORDED])
    assert [(e["round"], e["noise_multiplier"], e["run"]) for e in late] == [(1, 1.0, "b")]
    second.metadata.__dict__["_src_node_id"] = 7
    record_privacy(ledger, 2, [second], {})
    assert [(e.round, e.recorded_late) for e in ledger.entries("client-0000")] == [(1, True), (2, False)]
    steps = [reply.content[k.METRICS][k.STEPS] for reply in (in_a, lost, second)]
    assert sum(s for _, _, s in ledger.spent("client-0000")) == steps[1] + steps[2], "B's steps, not A's"
    assert second.content[k.METRICS][k.EPSILON] > lost.content[k.METRICS][k.EPSILON] > \
        in_a.content[k.METRICS][k.EPSILON], "its ε counts every run that shared its state directory"


def test_a_history_holding_integer_shares_is_accounted_by_skellam_in_a_later_gaussian_run():
    """Skellam steps (an earlier distributed-DP run in the same state directory) are not Gaussian ones: PRV's
    exact Gaussian curve would understate them (σ 1.97 at q = 1/4 over 120 steps: ε 7.3 by PRV, 8.0 by the
    bound proven for them, the sampled Gaussian's RDP at integer orders)."""
    from flwr.app import ConfigRecord

    from fedtune.client.state import ClientState
    from fedtune.config import FedtuneConfig
    from fedtune.privacy.accountant import epsilon
    from fedtune.privacy.ledger import LedgerEntry

    entry = LedgerEntry(120, k.STATUS_TRAINED, "skellam", steps=1, noise_multiplier=1.97, sample_rate=0.25,
                        epsilon=8.0, epsilon_other=8.0)
    state = ClientState.from_dict(ClientState([(1.97, 0.25, 120)], None, [entry]).to_dict())  # through its file
    assert state.ledger[0].accountant == "skellam"
    cfg = FedtuneConfig.from_flat({"dp.noise_multiplier": 1.0, "clients": 2})
    assert client_app._round_config(cfg, ConfigRecord({}), state, 100).dp.accounting == "skellam"
    assert client_app._round_config(cfg, ConfigRecord({}), ClientState(), 100).dp.accounting == "prv"
    assert epsilon("prv", state.history, 1e-5) < 7.4 < 7.9 < epsilon("skellam", state.history, 1e-5)


def test_a_state_restored_from_an_older_copy_is_caught_though_other_runs_outnumber_its_loss(tmp_path):
    """A review's case: an institution's state directory also holds run A's spending; its state file is
    restored from a copy taken after run B's first round. Its history still held more steps than B's
    ledger records, so the old check (steps of the whole history against the ledger) let it train, and
    B's second round vanished from its ε. Its own entries of B now count against B's ledger; adopting
    the ledger's record adds only what they lack and keeps A's; spending lost after that is reported."""
    from fedtune.privacy.ledger import PrivacyLedger

    node, state_dir, cfg = {k.PARTITION_ID: 0, k.NUM_PARTITIONS: 2}, str(tmp_path), _cfg()
    state_file = tmp_path / "client-0000.json"
    for round_ in (1, 2):  # run A
        client_app.train(_message(cfg, state_dir, **{k.RUN_ID: "a", k.SERVER_ROUND: round_}), _context(**node))
    ledger = PrivacyLedger(cfg.dp.accounting, True)

    def b_round(round_: int, **node_config) -> Message:
        reply = client_app.train(_message(cfg, state_dir, **{k.RUN_ID: "b", k.SERVER_ROUND: round_,
                                                             **_record_of(ledger)}), _context(**node, **node_config))
        return reply

    ledger.record_round("client-0000", 1, k.STATUS_TRAINED, b_round(1).content[k.METRICS])
    backup = state_file.read_text()
    second = b_round(2)
    ledger.record_round("client-0000", 2, k.STATUS_TRAINED, second.content[k.METRICS])
    state_file.write_text(backup)  # restored from before run B's round 2

    refused = b_round(3)
    status, reason = _status(refused)
    assert status == k.STATUS_REFUSED and "older copy" in reason and k.NODE_ADOPT_LEDGER_SPENDING in reason
    assert refused.content[k.METRICS][k.EPSILON] >= second.content[k.METRICS][k.EPSILON] * (1 - 1e-9)

    adopted = b_round(3, **{k.NODE_ADOPT_LEDGER_SPENDING: True})
    assert _status(adopted)[0] == k.STATUS_TRAINED
    ledger.record_round("client-0000", 3, k.STATUS_TRAINED, adopted.content[k.METRICS])
    steps = second.content[k.METRICS][k.STEPS]
    history = load_state(_context(**node), "client-0000", state_dir).history
    assert sum(s for _, _, s in history) == 5 * steps, "A's two rounds, B's three: nothing dropped, nothing twice"

    lost = b_round(4)  # its reply never reaches the ledger
    assert _status(lost)[0] == k.STATUS_TRAINED
    fifth = b_round(5)
    assert _status(fifth)[0] == k.STATUS_TRAINED, "the adopted state is whole: not refused again"
    late = json.loads(fifth.content[k.CLIENT_INFO][k.UNRECORDED])
    assert [(e["round"], e["run"]) for e in late] == [(4, "b")], "spending lost after the adoption is reported"


def test_an_evaluate_message_saying_dp_is_off_gets_no_scores_from_an_institution_that_requires_it(tmp_path):
    """A review's case: the evaluate path read "DP off" from the coordinator's message and sent the exact
    loss and accuracy of an institution whose node config requires DP and withholds its scores."""
    import math

    context = _institution(tmp_path, **{"state-dir": str(tmp_path / "state"), k.DATA_VAL_FRACTION: 0.5})
    cfg = _cfg(**{"dp.enabled": False})
    scores = client_app.evaluate(Message(_message(cfg).content, dst_node_id=7, message_type="evaluate"),
                                 context).content[k.METRICS]
    assert scores[k.NUM_EXAMPLES] > 0, "it has validation records, and withholds their scores"
    assert math.isnan(scores[k.EVAL_LOSS]) and math.isnan(scores[k.EVAL_ACCURACY])


def test_a_user_level_round_refuses_a_state_holding_record_level_steps(tmp_path):
    """A review's case: an institution's state directory held a record-level run's steps, and a later
    user-level run composed them into a per-person ε as if each person had contributed at most C a step;
    a person with several records spent more in them (group privacy)."""
    def institution(state_dir: str) -> Context:
        context = _institution(tmp_path, **{"state-dir": str(tmp_path / state_dir), "user-column": "user"})
        with (tmp_path / "notes.csv").open("w", newline="") as handle:  # the same notes, two records a person
            writer = csv.writer(handle)
            writer.writerow(["text", "label", "user"])
            writer.writerows((e.text, LABELS[e.label], f"p{i // 2}")
                             for i, e in enumerate(make_demo_dataset(40, seed=3)))
        return context

    context = institution("state")
    own = {"data.path": str(tmp_path / "notes.csv"), "data.user_column": "user"}
    record_level = client_app.train(_message(_cfg(**own), **{k.RUN_ID: "a"}), context)
    assert _status(record_level)[0] == k.STATUS_TRAINED
    user_level = client_app.train(_message(_cfg(**own, **{"dp.unit": "user"}), **{k.RUN_ID: "b"}), context)
    status, reason = _status(user_level)
    assert status == k.STATUS_REFUSED and "group privacy" in reason
    assert load_state(context, "clinic-a", str(tmp_path / "state")).record_level
    context = institution("people")
    for run in ("b", "c"):  # user-level steps only: a per-person ε counts them
        reply = client_app.train(_message(_cfg(**own, **{"dp.unit": "user"}), **{k.RUN_ID: run}), context)
        assert _status(reply)[0] == k.STATUS_TRAINED
    assert not load_state(context, "clinic-a", str(tmp_path / "people")).record_level
    assert load_state(context, "clinic-a", str(tmp_path / "people")).user_level
    # and the other way (a review's case): under dp.user_gradient = "mean" one record more or less moves its
    # person's clipped mean by up to 2C, which a record-level ε composed at C understated (9.70 where the
    # true ε is at least 18.45 after 100 user-level steps at σ 1.5, q 0.25)
    record_level = client_app.train(_message(_cfg(**own), **{k.RUN_ID: "d"}), context)
    status, reason = _status(record_level)
    assert status == k.STATUS_REFUSED and "user-level DP-SGD steps" in reason and "2C" in reason


def test_a_sigma_solved_in_another_run_is_not_reused(tmp_path):
    """A review's case: the σ solved for a target ε was kept in the state for good, so a later run (another
    target) trained at the first run's σ; within a run it is kept, so every round is of one σ."""
    from fedtune.client.state import ClientState

    cfg = _cfg(**{"dp.target_epsilon": 8.0})
    state = ClientState(noise_multiplier=0.3, solved_in="a")
    same = client_app._round_config(cfg, ConfigRecord({k.RUN_ID: "a"}), state, 40).dp.noise_multiplier
    assert same == 0.3
    fresh = client_app._round_config(cfg, ConfigRecord({k.RUN_ID: "b"}), state, 40).dp.noise_multiplier
    assert fresh > 0.3 and state.solved_in == "b"
    assert client_app._round_config(cfg, ConfigRecord({k.RUN_ID: "b"}), state, 40).dp.noise_multiplier == fresh


def test_an_institutions_validation_split_is_its_own_whatever_the_messages_ask(tmp_path):
    """A review's attack: with the coordinator's seed and data.client_val_fraction deciding each record's side,
    two evaluate messages whose fractions straddle one text's hash told by the validation count whether that text
    was in the file, at no ε. The split is now keyed by a secret in the institution's state-dir, at the share its
    node config sets (`val-fraction`), so every message sees the same counts."""
    import stat

    from fedtune.client.data import SPLIT_SECRET, split_secret
    from fedtune.data.partition import in_validation

    context = _institution(tmp_path, **{"state-dir": str(tmp_path / "state"), k.DATA_VAL_FRACTION: 0.2,
                                        "require-dp": False})
    counts = set()
    for seed, fraction in ((0, 0.1), (7, 0.9), (123, 0.0), (7, 0.5)):
        cfg = _cfg(**{"dp.enabled": False, "seed": seed, "data.client_val_fraction": fraction})
        reply = client_app.evaluate(Message(_message(cfg).content, dst_node_id=7, message_type="evaluate"), context)
        counts.add(reply.content[k.METRICS][k.NUM_EXAMPLES])
    assert len(counts) == 1 and 0 < counts.pop() < 40
    secret_file = tmp_path / "state" / SPLIT_SECRET
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600 and len(secret_file.read_text()) == 64
    assert split_secret(context.node_config) == secret_file.read_text(), "made once, then read"
    # the coordinator's seed is not the key: a run seed of 0 would put other texts on the validation side
    texts = [f"text {i}" for i in range(200)]
    assert [in_validation(t, 0.2, secret_file.read_text()) for t in texts] != [in_validation(t, 0.2, 0) for t in texts]
    secret_file.write_text("short")  # damaged: refused, not used as a key the coordinator could guess
    with pytest.raises(Exception, match="damaged"):
        split_secret(context.node_config)
    (tmp_path / "bad").mkdir()
    bad = _institution(tmp_path / "bad", **{"state-dir": str(tmp_path / "s2"), k.DATA_VAL_FRACTION: 1.5})
    with pytest.raises(Exception, match="val-fraction"):
        client_app.evaluate(Message(_message(_cfg()).content, dst_node_id=7, message_type="evaluate"), bad)
