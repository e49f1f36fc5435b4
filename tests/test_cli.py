"""`fedtune simulate` around the federation itself (in-process, with the Simulation Engine stubbed):
what it says and refuses before a federation would start."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedtune.cli import cli


@pytest.fixture
def no_federation(monkeypatch):
    started = []
    monkeypatch.setattr("fedtune.simulation.engine.simulate", lambda cfg, run, console: started.append(cfg))
    return started


@pytest.mark.parametrize("canaries, hint", [(12, True), (0, False)])
def test_a_run_with_canaries_says_how_to_score_them(tmp_path, no_federation, canaries, hint):
    config = tmp_path / "run.toml"
    config.write_text(f"clients = 2\nrounds = 1\n[data]\ndemo_examples = 60\ncanaries = {canaries}\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["simulate", "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert no_federation and no_federation[0].data.canaries == canaries
    said = " ".join(result.stderr.split())
    assert (f"fedtune audit --resume {out}` scores them" in said) == hint
    assert result.stdout.strip().splitlines()[-1] == str(out)  # the run directory stays the last line


def test_resuming_a_run_with_a_damaged_ledger_changes_nothing(tmp_path):
    """config.toml used to be rewritten before the damaged file crashed the resume."""
    from fedtune.config import FedtuneConfig
    from fedtune.server.run_dir import RunDirectory

    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    (run.path / "privacy_ledger.json").write_text('{"clients": {')
    before = (run.path / "config.toml").read_bytes()
    result = CliRunner().invoke(cli, ["simulate", "--resume", str(run.path), "--rounds", "5"])
    assert result.exit_code == 2 and "is damaged" in result.output and "Traceback" not in result.output
    assert (run.path / "config.toml").read_bytes() == before


def test_resuming_with_fewer_rounds_than_finished_is_refused_and_changes_nothing(tmp_path):
    """--rounds 1 on a run with 2 finished rounds used to rewrite config.toml, then call it finished."""
    from fedtune.config import FedtuneConfig
    from fedtune.privacy.ledger import PrivacyLedger
    from fedtune.server.run_dir import Checkpoint, RunDirectory

    run = RunDirectory.create(tmp_path / "run", FedtuneConfig(rounds=2))
    for round_ in (0, 1, 2):
        run.commit(Checkpoint(round_, {}, [], PrivacyLedger("prv", True).to_dict(), {}))
    before = (run.path / "config.toml").read_bytes()
    result = CliRunner().invoke(cli, ["simulate", "--resume", str(run.path), "--rounds", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "already finished 2 rounds" in " ".join(result.stderr.split())
    assert (run.path / "config.toml").read_bytes() == before


def test_an_out_directory_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, no_federation):
    """An --out under a file used to end in hundreds of lines of traceback with local variables."""
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "run"
    result = CliRunner().invoke(cli, ["simulate", "--clients", "2", "--examples", "40", "--out", str(out)])
    assert result.exit_code == 2 and not no_federation
    said = " ".join(result.stderr.split())
    assert f"Error: cannot use {out}" in said and "Traceback" not in result.output
    assert (tmp_path / "a-file").read_text() == "not a directory"


def test_a_message_with_markup_like_text_is_printed_as_it_is(tmp_path, no_federation):
    weird = tmp_path / "[bold]notes.csv"
    weird.write_text("text,label\nchest pain,urgent\ncough,routine\n")
    result = CliRunner().invoke(cli, ["simulate", "--data", str(weird), "--text-column", "[/b]",
                                      "--out", str(tmp_path / "run")])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "[bold]notes.csv" in said and "[/b]" in said, said


@pytest.mark.parametrize("args, says", [
    (["--model", "/no/such/model"], "the directory /no/such/model does not exist"),
    (["--clients", "50", "--examples", "20"], "50 clients but only 18 training examples"),
    (["--noise-multiplier", "-1"], "dp.noise_multiplier"),
    (["--strategy", "fedsgd"], "'fedsgd' is not one of 'fedavg'"),
    (["--delta", "0.5"], "dp.delta"),
    (["--lora-target-modules", "foo"], "lora.target_modules"),  # found in the model's architecture, before writing
    (["--ray-address", "foo"], "simulation.ray_address"),  # not HOST:PORT: no traceback from int()
    (["--noise-multiplier", "0.3", "--epsilon-budget", "1"], "below what one round spends"),  # all would decline
])
def test_bad_input_fails_cleanly_without_a_run_directory(tmp_path, no_federation, args, says):
    out = tmp_path / "never"
    result = CliRunner().invoke(cli, ["simulate", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert not out.exists() and not no_federation


def test_an_existing_run_directory_is_not_overwritten(tmp_path, no_federation):
    from fedtune.config import FedtuneConfig
    from fedtune.server.run_dir import RunDirectory

    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    before = {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()}
    result = CliRunner().invoke(cli, ["simulate", "--out", str(run.path)])
    assert result.exit_code == 2 and "--resume" in result.stderr
    assert not no_federation
    assert {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()} == before


def _spent_ledger(cfg, sites, name=lambda site: f"client-{site:04d}"):
    """Each client in `sites` trained cfg.rounds rounds at the σ solved for its target ε: all of it spent."""
    from fedtune.data.users import train_units
    from fedtune.privacy.accountant import epsilon
    from fedtune.privacy.budget import client_dp, poisson_schedule
    from fedtune.privacy.ledger import LedgerEntry, PrivacyLedger
    from fedtune.tasks.base import get_task

    units = train_units(get_task(cfg.model.task).federation(cfg.data, cfg.clients, cfg.seed), cfg.dp.unit)
    clients = {}
    for site in sites:
        n, train = units[site], cfg.train
        sigma = client_dp(cfg.dp, None, n, train.batch_size, train.local_epochs, cfg.rounds).noise_multiplier
        q, steps = poisson_schedule(n, train.batch_size, train.local_epochs)
        clients[name(site)] = [
            LedgerEntry(r, "trained", "prv", noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=q, steps=steps,
                        delta=cfg.dp.delta, epsilon=epsilon("prv", [(sigma, q, steps)] * r, cfg.dp.delta),
                        epsilon_other=0.0) for r in range(1, cfg.rounds + 1)]
    return PrivacyLedger("prv", True, clients)


def test_resuming_a_run_whose_every_client_spent_its_budget_is_refused(tmp_path):
    """It used to run every extra round, each client declining, and exit 0."""
    from fedtune.config import FedtuneConfig
    from fedtune.server.prepare import _check_budget_left
    from fedtune.server.run_dir import Checkpoint, RunDirectory

    cfg = FedtuneConfig.from_flat({"rounds": 2, "clients": 2, "data.demo_examples": 80, "dp.target_epsilon": 2.0})
    run = RunDirectory.create(tmp_path / "run", cfg)
    spent = _spent_ledger(cfg, sites=(0, 1))
    for round_ in (0, 1, 2):
        run.commit(Checkpoint(round_, {}, [], spent.to_dict(), {}))
    spent.save(run.path)
    before = (run.path / "config.toml").read_bytes()
    result = CliRunner().invoke(cli, ["simulate", "--resume", str(run.path), "--rounds", "4"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "Every client" in said and "spent its privacy budget" in said and "Rounds 3-4 would train nothing" in said
    assert (run.path / "config.toml").read_bytes() == before
    # one client with budget left: the run goes on
    _check_budget_left(cfg.with_overrides({"rounds": 4}), _spent_ledger(cfg, sites=(0,)), run.path, 2)


def test_a_deploy_local_run_whose_institutions_spent_their_budget_is_not_resumed(tmp_path):
    """A review: the check read the ledger under simulation's names (client-0000), so a deploy-local run's
    institutions (clinic-a, ...) always seemed to have budget left, and --resume started every process to
    decline every round."""
    import pytest

    from fedtune.config import FedtuneConfig
    from fedtune.errors import ConfigError
    from fedtune.server.audit import institution_name
    from fedtune.server.prepare import _check_budget_left
    from fedtune.server.run_dir import DEPLOY_LOCAL

    cfg = FedtuneConfig.from_flat({"rounds": 2, "clients": 2, "data.demo_examples": 80, "dp.target_epsilon": 2.0})
    spent = _spent_ledger(cfg, sites=(0, 1), name=institution_name)
    with pytest.raises(ConfigError, match="spent its privacy budget"):
        _check_budget_left(cfg.with_overrides({"rounds": 4}), spent, tmp_path, 2, DEPLOY_LOCAL)


def test_the_command_list_explains_each_command_in_one_line_and_version_is_an_option():
    from typer.testing import CliRunner

    from fedtune import __version__
    from fedtune.cli import cli

    listing = CliRunner().invoke(cli, ["--help"], terminal_width=200).output
    for command in ("simulate", "audit", "export", "privacy-report", "privacy-verify", "deploy-local"):
        line = next(row for row in listing.splitlines() if f" {command} " in row)
        assert len(line.split(command, 1)[1].strip(" │")) > 20, f"{command} has a one-line summary"
    assert "The last line printed" not in listing, "the list shows summaries, not whole docstrings"
    assert CliRunner().invoke(cli, ["--version"]).output.strip() == __version__


def test_auditing_a_run_without_canaries_is_refused_before_anything_resumes(tmp_path):
    from typer.testing import CliRunner

    from fedtune.cli import cli
    from fedtune.config import FedtuneConfig
    from fedtune.server.run_dir import RunDirectory

    run = RunDirectory.create(tmp_path / "run", FedtuneConfig(rounds=1, clients=2)).path
    before = sorted(p.name for p in run.iterdir())
    result = CliRunner().invoke(cli, ["audit", "--resume", str(run)])
    assert result.exit_code == 2 and "has no canaries" in result.output
    assert not result.output.strip().endswith(str(run)), "no run directory printed as if the run had gone on"
    assert sorted(p.name for p in run.iterdir()) == before, "nothing written"


@pytest.mark.parametrize("rounds", [0, 100_001])
def test_rounds_out_of_range_says_the_allowed_range(tmp_path, no_federation, rounds):
    """--rounds 100001 used to be told "use at least 1 round"."""
    out = tmp_path / "never"
    result = CliRunner().invoke(cli, ["simulate", "--rounds", str(rounds), "--out", str(out)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "`rounds`" in said and "use 1 to 100,000 rounds" in said, said
    assert not out.exists() and not no_federation


@pytest.fixture
def no_deployment(monkeypatch):
    """deploy-local starts no SuperLink, SuperNode or `flwr` command: a test that gets that far fails."""
    started = []

    def refuse(self, *args, **kwargs):
        started.append(args)
        raise AssertionError("deploy-local started a process")

    monkeypatch.setattr("fedtune.deploy.processes.ProcessSet.start", refuse)
    monkeypatch.setattr("fedtune.deploy.local.LocalFederation.flwr", refuse)
    return started


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_a_deployment_timeout_that_is_not_a_positive_finite_number_is_refused_before_anything(
        tmp_path, no_deployment, timeout):
    """--timeout 0, -1 or nan used to start the CA, the SuperLink and every SuperNode and submit the run,
    then fail with "did not finish within 0 s", leaving a partly filled run directory."""
    out = tmp_path / "never"
    result = CliRunner().invoke(cli, ["deploy-local", "--nodes", "2", "--rounds", "1", "--out", str(out),
                                      f"--timeout={timeout}"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "Invalid option `--timeout`" in said and "more than 0 and finite" in said, said
    assert not out.exists() and not no_deployment
    assert not result.stdout.strip(), "no run directory printed"


def test_a_deployment_out_directory_that_cannot_be_made_is_one_line_and_exit_2(tmp_path, no_deployment):
    """deploy-local --out under a file used to end in a traceback (NotADirectoryError) and exit 1."""
    (tmp_path / "a-file").write_text("not a directory")
    out = tmp_path / "a-file" / "run"
    result = CliRunner().invoke(cli, ["deploy-local", "--nodes", "2", "--rounds", "1", "--out", str(out)])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and f"Error: cannot use {out}" in said and "Traceback" not in result.output, said
    assert (tmp_path / "a-file").read_text() == "not a directory" and not no_deployment


@pytest.mark.parametrize("extra", [["--nodes", "3"], ["--examples", "200"], ["--node-config", "require-dp=true"],
                                   ["--out", "elsewhere"]])
def test_deploy_local_resume_takes_only_rounds_and_timeout(tmp_path, no_deployment, extra):
    """--resume goes on with the run's saved config and each institution's own node config; another
    option would change the recipe or the institutions under a run already spending."""
    result = CliRunner().invoke(cli, ["deploy-local", "--resume", str(tmp_path / "run"), *extra])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "only --rounds and --timeout may be given" in said and extra[0] in said, said
    assert not no_deployment and not (tmp_path / "run").exists()


def test_deploy_local_resume_refuses_a_simulation_run_before_starting_anything(tmp_path, no_deployment):
    """A simulation's clients are not the deployment's institutions: continued by deploy-local, each
    institution would start from ε = 0 with no state of its own."""
    from fedtune.config import FedtuneConfig
    from fedtune.server.run_dir import RunDirectory

    run = RunDirectory.create(tmp_path / "sim", FedtuneConfig())
    result = CliRunner().invoke(cli, ["deploy-local", "--resume", str(run.path), "--rounds", "4"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "not a `fedtune deploy-local` run" in said, said
    assert f"fedtune simulate --resume {run.path}" in said and not no_deployment


def test_a_resume_given_other_options_names_them_as_flags(tmp_path, no_federation):
    """A review: `simulate --resume RUN --clients 3` said "(got clients)", the config key, not the flag typed."""
    from fedtune.config import FedtuneConfig
    from fedtune.server.run_dir import RunDirectory

    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    result = CliRunner().invoke(cli, ["simulate", "--resume", str(run.path), "--clients", "3", "--delta", "1e-6"])
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "(got --clients, --delta)" in said and not no_federation, said


@pytest.mark.parametrize("made_by_user", [False, True])
def test_a_cluster_ray_cannot_join_leaves_no_run_behind_and_keeps_a_users_own_directory(tmp_path, monkeypatch,
                                                                                          made_by_user):
    """A review: with `--ray-address auto` only Ray can tell there is no cluster, once the run directory is written;
    a retry with the same --out was then refused as "not empty". The new run is removed, but an empty directory
    the user made for it stays."""
    from fedtune.errors import ClusterUnreachable

    def unreachable(cfg, run, console):
        raise ClusterUnreachable("Could not join the Ray cluster at simulation.ray_address = 'auto'")

    monkeypatch.setattr("fedtune.simulation.engine.simulate", unreachable)
    monkeypatch.setattr("fedtune.simulation.engine.check_cluster", lambda address: None)
    out = tmp_path / "run"
    if made_by_user:
        out.mkdir()
    result = CliRunner().invoke(cli, ["simulate", "--ray-address", "auto", "--clients", "2", "--rounds", "1",
                                      "--examples", "60", "--out", str(out)])
    assert result.exit_code == 2 and "Could not join" in result.stderr
    assert (out.is_dir() and not any(out.iterdir())) if made_by_user else not out.exists()
