"""Length buckets: every example once per epoch, and much less padding than random batches."""

import random

import pytest

from fedtune.config import DPConfig, FedtuneConfig, TrainConfig
from fedtune.data.buckets import LengthBucketSampler
from fedtune.errors import ConfigError


def _padding(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("n, batch", [(1000, 16), (37, 8), (5, 16)])
def test_each_example_once_per_epoch_in_batches_of_at_most_batch_size(n, batch):
    rng = random.Random(0)
    sampler = LengthBucketSampler([rng.randint(3, 200) for _ in range(n)], batch, seed=1)
    for _ in range(2):
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert max(len(b) for b in batches) <= batch and len(batches) == len(sampler)


def test_buckets_pad_far_less_than_random_batches():
    rng = random.Random(0)
    lengths = [rng.randint(3, 200) for _ in range(2000)]
    order = list(range(2000))
    rng.shuffle(order)
    random_batches = [order[i:i + 16] for i in range(0, 2000, 16)]
    assert _padding(lengths, list(LengthBucketSampler(lengths, 16, seed=0))) < 0.1 * _padding(lengths, random_batches)


def test_refused_under_dp_sgd():
    with pytest.raises(ConfigError, match="train.length_buckets"):
        FedtuneConfig(train=TrainConfig(length_buckets=True))
    assert FedtuneConfig(train=TrainConfig(length_buckets=True), dp=DPConfig(enabled=False)).train.length_buckets
