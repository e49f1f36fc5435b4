"""Client-level ε and the ledger's `client_level` entry, checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from fedtune.privacy.client_level import (
    ClientLevelAccount,
    adaptive_noise_inputs,
    client_level_epsilon,
    combined_noise_multiplier,
)
from fedtune.privacy.independent import independent_epsilon
from fedtune.privacy.ledger import PrivacyLedger


@pytest.mark.parametrize("z, q, rounds, delta", [
    (1.0, 1.0, 3, 1e-5), (0.8, 0.3, 20, 1e-5), (1.5, 0.1, 200, 1e-6), (4.0, 1.0, 1, 1e-3),
])
def test_epsilon_matches_google_dp_accounting(z, q, rounds, delta):
    # dp_accounting's RDP code (not Opacus') for the same Poisson-subsampled Gaussian, at the same
    # orders; the two evaluate fractional orders differently, which moves ε by up to ~0.1%. And it is
    # never below dp_accounting's PLD, the near-exact ε privacy-verify checks it against.
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
    from opacus.accountants import RDPAccountant

    rdp = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    rdp.compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)
    reported = client_level_epsilon(z, q, rounds, delta)
    assert reported == pytest.approx(rdp.get_epsilon(delta), rel=2e-3)
    assert reported >= independent_epsilon("prv", [(z, q, rounds)], delta)


def test_epsilon_without_sampling_matches_the_gaussian_closed_form():
    # q = 1: R releases of a Gaussian with multiplier z have RDP R * a / (2 z^2) at order a;
    # Balle et al. (2020)'s conversion, minimised over a fine grid of orders, by hand
    z, rounds, delta = 1.2, 5, 1e-5
    orders = np.linspace(1.01, 200, 200_000)
    rdp = rounds * orders / (2 * z * z)
    eps = rdp + np.log((orders - 1) / orders) - (math.log(delta) + np.log(orders)) / (orders - 1)
    # Opacus searches a coarser grid of orders, so it can only be a little above the true minimum
    assert eps.min() <= client_level_epsilon(z, 1.0, rounds, delta) <= eps.min() * 1.01


def test_epsilon_edges():
    assert client_level_epsilon(1.0, 0.5, 0, 1e-5) == 0.0
    assert math.isinf(client_level_epsilon(0.0, 0.5, 3, 1e-5))
    assert client_level_epsilon(1.0, 1.0, 4, 1e-5) > client_level_epsilon(1.0, 1.0, 3, 1e-5)
    assert client_level_epsilon(1.0, 0.2, 3, 1e-5) < client_level_epsilon(1.0, 1.0, 3, 1e-5)


@pytest.mark.parametrize("z, m", [(1.0, 3), (0.5, 10), (2.0, 200), (1.0, 1000)])
def test_adaptive_inputs_make_flowers_mechanism_worth_z(z, m):
    z_in, count_noise = adaptive_noise_inputs(z, m)
    # what Flower's wrapper derives from them (it raises if they are infeasible)
    count_std, update_noise = compute_adaptive_noise_params(z_in, m, count_noise)
    assert count_std == count_noise >= m / 20
    # one Gaussian worth the update noise (sensitivity C) and the count noise (sensitivity 1), by hand
    assert (update_noise ** -2 + count_std ** -2) ** -0.5 == pytest.approx(z, rel=1e-9)
    assert combined_noise_multiplier(update_noise, count_std) == pytest.approx(z, rel=1e-9)


def test_adaptive_inputs_without_noise():
    assert adaptive_noise_inputs(0.0, 10)[0] == 0.0
    assert combined_noise_multiplier(0.0, 1.0) == 0.0


def test_account_to_dict_shape():
    account = ClientLevelAccount("adaptive", "client", 1.0, 0.3, 0.5, 2, 1e-5)
    assert account.to_dict() == {
        "clipping": "adaptive", "side": "client", "noise_multiplier": 1.0, "clipping_norm": 0.3,
        "sample_rate": 0.5, "rounds": 2, "delta": 1e-5, "epsilon": client_level_epsilon(1.0, 0.5, 2, 1e-5),
        "accountant": "rdp", "sampling": "poisson"}
    assert ClientLevelAccount("fixed", "server", 0.0, 1.0, 1.0, 2, 1e-5).to_dict()["epsilon"] is None  # unbounded


def test_ledger_carries_client_level_and_reads_older_ledgers():
    ledger = PrivacyLedger("rdp", True)
    assert ledger.to_dict()["client_level"] is None
    ledger.record_client_level(ClientLevelAccount("fixed", "server", 1.0, 1.0, 1.0, 1, 1e-5).to_dict())
    again = PrivacyLedger.from_dict(ledger.to_dict())
    assert again.client_level == ledger.client_level
    older = {k: v for k, v in ledger.to_dict().items() if k != "client_level"}
    assert PrivacyLedger.from_dict(older).client_level is None


def test_a_release_made_by_a_round_that_was_never_committed_still_counts(tmp_path):
    import torch

    from fedtune.config import FedtuneConfig
    from fedtune.server.run_dir import Checkpoint, RunDirectory

    run = RunDirectory.create(tmp_path / "run", FedtuneConfig())
    ledger = PrivacyLedger("rdp", True)
    ledger.record_client_level(ClientLevelAccount("fixed", "server", 1.0, 1.0, 1.0, 1, 1e-5).to_dict())
    run.commit(Checkpoint(1, {"w": torch.zeros(2)}, [], ledger.to_dict(), {}))
    ledger.record_client_level(ClientLevelAccount("fixed", "server", 1.0, 1.0, 1.0, 2, 1e-5).to_dict())
    ledger.save(run.path)  # round 2 released its aggregate, then the server died before committing
    assert run.ledger_to_resume(run.latest_checkpoint()).client_level["rounds"] == 2
