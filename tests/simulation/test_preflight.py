"""Problems are caught before a run directory exists."""

import pytest

from fedtune.config import FedtuneConfig
from fedtune.errors import ConfigError, DataError
from fedtune.server.prepare import preflight
from fedtune.simulation.engine import backend_config, simulation_workers


def test_delta_must_be_below_one_over_n():
    cfg = FedtuneConfig().with_overrides({"dp.delta": 0.05, "data.demo_examples": 200, "clients": 3})
    with pytest.raises(ConfigError, match="dp.delta.*below 1/n"):
        preflight(cfg)


def test_more_clients_than_examples():
    with pytest.raises(DataError, match="clients but only"):
        preflight(FedtuneConfig().with_overrides({"clients": 40, "data.demo_examples": 30}))


def test_missing_model_path_names_the_option():
    with pytest.raises(ConfigError, match="model.name_or_path"):
        preflight(FedtuneConfig().with_overrides({"model.name_or_path": "/no/such/dir"}))


def test_backend_never_asks_for_more_cpus_than_the_machine_has():
    cfg = FedtuneConfig().with_overrides({"num_cpus_per_client": 512.0})
    resources = backend_config(cfg)
    assert resources["client_resources"]["num_cpus"] <= resources["init_args"]["num_cpus"]


def test_a_tiny_cpu_share_starts_no_more_workers_than_cpus_or_a_rounds_clients(monkeypatch):
    """A review: num_cpus_per_client = 0.001 would have started about 2,000 Ray workers on 2 cores, each
    loading the model."""
    monkeypatch.setattr("fedtune.simulation.engine.usable_cpus", lambda: 2)
    tiny = {"num_cpus_per_client": 0.001}
    assert simulation_workers(FedtuneConfig().with_overrides({**tiny, "clients": 3})) == 3
    assert simulation_workers(FedtuneConfig().with_overrides({**tiny, "clients": 1})) == 2
    monkeypatch.setattr("fedtune.simulation.engine.usable_cpus", lambda: 16)
    assert simulation_workers(FedtuneConfig().with_overrides({"num_cpus_per_client": 0.25, "clients": 40})) == 40
    assert simulation_workers(FedtuneConfig().with_overrides({"num_cpus_per_client": 0.25, "clients": 100})) == 64


def test_one_single_threaded_worker_per_core_by_default():
    assert backend_config(FedtuneConfig())["client_resources"]["num_cpus"] == 1


def test_cuda_without_a_visible_gpu_is_refused_before_anything_starts(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="`model.device`.*Set it to `cpu`"):
        preflight(FedtuneConfig().with_overrides({"model.device": "cuda"}))


def test_cuda_gives_each_worker_a_whole_gpu_and_no_more_workers_than_gpus(monkeypatch):
    monkeypatch.setattr("fedtune.simulation.engine.usable_cpus", lambda: 16)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    cuda = FedtuneConfig().with_overrides({"model.device": "cuda"})
    assert backend_config(cuda)["client_resources"] == {"num_cpus": 1, "num_gpus": 1.0, "max_restarts": -1}
    assert simulation_workers(cuda) == 2  # Ray fits 2 one-GPU workers, not 16 one-CPU ones
    cpu = FedtuneConfig()
    assert backend_config(cpu)["client_resources"]["num_gpus"] == 0.0 and simulation_workers(cpu) == 16


def test_on_an_existing_cluster_the_cluster_sizes_the_workers_not_this_machine(monkeypatch):
    """--ray-address: Ray is joined, not started, so no CPU count is passed to it (Ray refuses one when
    connecting), and a client asks for num_cpus_per_client whatever the driver has; Flower then sizes
    the pool from the cluster's nodes."""
    monkeypatch.setattr("fedtune.simulation.engine.usable_cpus", lambda: 2)
    cfg = FedtuneConfig().with_overrides({"simulation.ray_address": "10.0.0.5:6379", "num_cpus_per_client": 4.0})
    resources = backend_config(cfg)
    assert resources["init_args"]["address"] == "10.0.0.5:6379" and "num_cpus" not in resources["init_args"]
    assert resources["client_resources"]["num_cpus"] == 4.0


@pytest.mark.parametrize("address", ["x", "10.0.0.5", "10.0.0.5:port", "10.0.0.5:70000", ":6379"])
def test_a_ray_address_must_be_host_and_port_or_auto(address):
    with pytest.raises(ConfigError, match="simulation.ray_address.*HOST:PORT"):
        FedtuneConfig().with_overrides({"simulation.ray_address": address})
    for good in ("auto", "10.0.0.5:6379", "head.cluster.local:6379", ""):
        FedtuneConfig().with_overrides({"simulation.ray_address": good})


def test_the_idle_workers_preload_the_client_app_only_when_each_becomes_a_client_worker(monkeypatch):
    from fedtune.simulation import engine

    monkeypatch.setattr(engine, "usable_cpus", lambda: 4)
    assert engine.ray_system_config(FedtuneConfig()) == {"preload_python_modules": [engine.PRELOADED]}
    two_each = FedtuneConfig.from_flat({**FedtuneConfig().to_flat(), "num_cpus_per_client": 2})
    assert engine.simulation_workers(two_each) == 2 and engine.ray_system_config(two_each) == {}


def test_ray_address_auto_is_looked_up_and_checked_before_a_run_directory_exists(monkeypatch):
    """A review: `--ray-address auto` passed the check unread; with no cluster running (or only a stale one on
    record, where Ray's core ends the process) the run directory was already written, and a retry with the
    same --out was refused as "not empty"."""
    import socket

    import ray._private.services as services

    from fedtune.simulation.engine import check_cluster

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what `auto` resolves to: nothing listens there
    with pytest.raises(ConfigError, match=rf"simulation.ray_address = '[^']*:{port}' .*refused"):
        check_cluster("auto")
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: [])
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: None)
    with pytest.raises(ConfigError, match=r"Could not find a Ray cluster for simulation.ray_address = 'auto'"):
        check_cluster("auto")
