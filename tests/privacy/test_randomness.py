"""DP-SGD's analysis assumes the Gaussian noise is independent of which records were sampled.
Sampling and noise therefore come from separate generators (privacy/dpsgd.py): from the OS's
secure randomness by default, from two independently derived streams with reproducible noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from fedtune.client.train import train_round
from fedtune.config import DPConfig, FedtuneConfig, TrainConfig
from fedtune.data.text import TokenizedTexts
from tests.privacy.noise_only import NoiseOnly

SEEDS = range(1000)


def _cfg() -> FedtuneConfig:
    # Two records, batch size 1: q = 1/2 and two steps; plain SGD at rate 1 so a step moves the
    # weights by exactly the noise (divided by Opacus' expected batch size, 1).
    return FedtuneConfig(clients=1, train=TrainConfig(batch_size=1, optimizer="sgd", learning_rate=1.0),
                         dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3, reproducible_noise=True))


def test_noise_is_independent_of_which_records_were_sampled():
    """Over many rounds seeded like reproducible runs, the noise on every coordinate has the same
    distribution whether or not record 0 was sampled. When both came from one stream, a few
    coordinates' noise was about 0.4 smaller in magnitude in the rounds that sampled record 0."""
    data = TokenizedTexts(((0,), (1,)), (0, 0))
    cfg, model = _cfg(), NoiseOnly()
    start = model.embedding.weight.detach().clone()
    sampled, noise = [], []
    for seed in SEEDS:
        with torch.no_grad():
            model.embedding.weight.copy_(start)
        model.batches.clear()
        train_round(model, data, cfg, [], proximal_mu=0.0, seed=seed)
        sampled.append(any(0 in batch for batch in model.batches))  # an empty batch runs no forward
        noise.append((start - model.embedding.weight.detach()).numpy().ravel())
    sampled, noise = np.array(sampled), np.array(noise)
    assert 0.65 < sampled.mean() < 0.85, "record 0 joins one of the two steps with probability 3/4"
    assert noise.std() > 0.5, "the noise is there"
    # Each coordinate's noise, and its magnitude, compared between the two groups of rounds.
    views = {"value": noise, "magnitude": np.abs(noise)}
    p_values = {(view, i): mannwhitneyu(values[sampled, i], values[~sampled, i]).pvalue
                for view, values in views.items() for i in range(noise.shape[1])}
    (view, worst), p = min(p_values.items(), key=lambda item: item[1])
    assert p > 1e-3 / len(p_values), f"the {view} of noise coordinate {worst} depends on the sampling (p = {p:.2g})"


def test_public_streams_derive_only_the_streams_whose_knowledge_keeps_the_guarantee():
    """dp.public_streams: the server can derive the sampling stream from the round seed, as it can with
    reproducible noise. The noise, and the streams drawn record after record (dropout through the model's
    stream, which records of a user, the rounding of distributed DP), stay secret and fresh every round:
    known, one record's removal would shift every later record's draws."""
    from fedtune.privacy.dpsgd import RoundSeeds

    dp = DPConfig(public_streams=True)
    known, derived, again = RoundSeeds.of_round(dp, 7), RoundSeeds.derived(7), RoundSeeds.of_round(dp, 7)
    assert known.sampling == derived.sampling
    for stream in ("noise", "model", "records", "rounding"):
        assert getattr(known, stream) not in (getattr(derived, stream), getattr(again, stream)), stream
    assert RoundSeeds.of_round(DPConfig(), 7) == derived  # a seed is given only for reproducible runs


def test_under_user_level_dp_the_record_choice_has_its_own_stream(monkeypatch):
    """dp.unit = "user": which of a sampled user's records a step uses comes from its own generator,
    seeded apart from the Poisson sampling of users and from the noise (docs/privacy.md)."""
    from fedtune.data.users import UserRecords
    from fedtune.privacy import dpsgd

    seen = {}

    def capture(data, batch_size, collate, max_records, sampling, records, sample_rate):
        seen.update(sampling=sampling.initial_seed(), records=records.initial_seed())
        raise RuntimeError("captured")

    monkeypatch.setattr(dpsgd, "user_loader", capture)
    seeds = dpsgd.RoundSeeds.secret()
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="captured"):
        dpsgd.make_private(model, torch.optim.SGD(model.parameters(), lr=0.1), UserRecords([0, 1], ((0,), (1,))),
                           1, list, DPConfig(unit="user"), [], seeds)
    assert seen == {"sampling": seeds.sampling, "records": seeds.records}
    assert len({seeds.sampling, seeds.records, seeds.noise, seeds.model}) == 4


def test_round_seeds_of_many_rounds_and_clients_are_distinct_and_use_the_whole_seed():
    """A review: the round seed was a 32-bit CRC, so across about 10^5 (round, client) pairs two would
    share their streams, and with them identical, not independent, noise. It is now 63 bits of SHA-256."""
    from fedtune.privacy.dpsgd import round_seed

    seeds = [round_seed(0, r, f"client-{c:04d}") for r in range(1, 301) for c in range(400)]
    assert len(set(seeds)) == len(seeds) and max(seeds) >= 2 ** 32 and max(seeds) < 2 ** 63
    assert round_seed(2 ** 40, 1, "a") != round_seed(2 ** 40 + 1, 1, "a")
