"""Length-bucketed batches: examples of similar length share a batch, so dynamic padding adds
fewer pad tokens. Written here because torch has no such sampler and transformers' grouping
lives inside its Trainer.

Only for training without DP: DP-SGD's accounting assumes Poisson sampling, which this is not.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

POOL_BATCHES = 50  # sort within pools of this many batches: similar lengths, still a random order


class LengthBucketSampler(Sampler[list[int]]):
    """Each epoch: shuffle, cut into pools, sort each pool by length, batch it, shuffle the batches."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.rng = random.Random(seed)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(range(len(self.lengths)))
        self.rng.shuffle(order)
        pool = self.batch_size * POOL_BATCHES
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        self.rng.shuffle(batches)
        return iter(batches)

    def __len__(self) -> int:
        pool = self.batch_size * POOL_BATCHES
        pools = [min(pool, len(self.lengths) - start) for start in range(0, len(self.lengths), pool)]
        return sum(math.ceil(size / self.batch_size) for size in pools)
