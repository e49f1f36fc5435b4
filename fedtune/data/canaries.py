"""Canaries for the empirical privacy audit (`fedtune audit`, privacy/audit.py).

`data.canaries` = m records that no real data holds: random-token texts with random labels
(classification), or a random key and a rare random phrase as its answer (causal LM). Each is put
into training independently with probability 1/2, at one client drawn uniformly, `data.canary_repeats`
times. Like every split, all of it follows from the config and the seed, so the server, which scores
the canaries after training, knows their membership exactly, and every simulation worker rebuilds the
same data. The canaries come after the data's own split, so the rest of the federation (hold-out,
partitions, validation splits) is the same as in a run without them.
"""

from __future__ import annotations

import dataclasses
import random
import string
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from fedtune.data.partition import ClientSplit

WORDS = 6  # random words per classification canary
KEY_WORDS, PHRASE_WORDS = 3, 4  # causal-LM canary: the key in the question, the phrase to recall
CANARY_GROUP = "canary"  # causal LM: the canaries' group in the partition summary
QUESTION = "What is the passphrase for {key}?"


@dataclass(frozen=True)
class CanaryPlan:
    """Which canaries went into training, and where. Canary i is in iff client[i] >= 0."""

    clients: tuple[int, ...]  # the client whose training data holds canary i; -1: left out
    repeats: int
    sites: tuple[int, ...] = ()  # the client drawn for canary i, in or out (the server-vantage audit reads its updates)

    @property
    def members(self) -> tuple[bool, ...]:
        return tuple(c >= 0 for c in self.clients)

    def at_client(self, client: int) -> list[int]:
        return [i for i, c in enumerate(self.clients) if c == client]


def plan_canaries(count: int, num_clients: int, repeats: int, seed: int) -> CanaryPlan:
    """Each canary in with probability 1/2, independently (the audit's theorem needs exactly that),
    at a uniformly drawn client. Its own random stream, so the data's split does not move."""
    rng = random.Random(f"fedtune-canary-plan:{seed}")
    clients, sites = [], []
    for _ in range(count):
        member = rng.random() < 0.5
        client = rng.randrange(num_clients)  # drawn either way, so membership alone decides the rest
        clients.append(client if member else -1)
        sites.append(client)
    return CanaryPlan(tuple(clients), repeats, tuple(sites))


def _word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(4, 8)))


def _phrases(count: int, words: int, rng: random.Random, taken: Collection[str]) -> list[str]:
    """`count` distinct strings of random lower-case words, none of them in `taken`."""
    out: list[str] = []
    seen = set(taken)
    while len(out) < count:
        phrase = " ".join(_word(rng) for _ in range(words))
        if phrase not in seen:  # a collision is all but impossible (26^4 words); checked anyway
            seen.add(phrase)
            out.append(phrase)
    return out


def canary_texts(count: int, num_labels: int, seed: int, taken: Collection[str]) -> tuple[list[str], list[int]]:
    """Classification canaries: random-word texts and uniformly random labels. Random text carries
    no signal about its label, so a model can only get a canary right by having trained on it."""
    rng = random.Random(f"fedtune-canary-texts:{seed}")
    texts = _phrases(count, WORDS, rng, taken)
    return texts, [rng.randrange(num_labels) for _ in texts]


def canary_records(count: int, seed: int, taken: Collection[str]) -> list[tuple[str, str]]:
    """Causal-LM canaries: (question, answer) pairs, a random key in the question and a rare random
    phrase as the answer; the LM loss on the answer can only be low if the model saw the pair."""
    rng = random.Random(f"fedtune-canary-records:{seed}")
    keys = _phrases(count, KEY_WORDS, rng, taken)
    answers = _phrases(count, PHRASE_WORDS, rng, taken)
    return [(QUESTION.format(key=key), answer) for key, answer in zip(keys, answers, strict=True)]


@dataclass(frozen=True)
class Canaries:
    """All m canaries, in and out, and where the members went: what the server scores after training."""

    plan: CanaryPlan
    records: tuple  # classification: (text, label id) pairs; causal LM: Conversations
    first: int = 0  # the index of the first member canary among the federation's records (place's `first`)

    @property
    def members(self) -> tuple[bool, ...]:
        return self.plan.members

    def at_rows(self, rows: Sequence[int]) -> tuple[int, ...]:
        """For each record index in `rows` (a client's training split), the canary it is, or -1."""
        members = [i for i, member in enumerate(self.plan.members) if member]
        return tuple(members[row - self.first] if row >= self.first else -1 for row in rows)


def gradient_direction(seed: int, canary: int, size: int):
    """Gradient canary `canary`'s unit direction over the `size` trained weights, in the order of the
    model's trainable parameters (data.canary_kind `gradient`). A Gaussian vector normalised: in d
    dimensions it is nearly orthogonal to any fixed direction (cosine about 1/√d), so ordinary data
    hardly moves along it. Public: the auditor rebuilds it from the seed, as it rebuilds the plan."""
    import numpy as np

    rng = np.random.default_rng([0x6361_6E61, seed, canary])  # its own stream: "cana", the run seed, the canary
    direction = rng.standard_normal(size)
    return (direction / np.linalg.norm(direction)).astype(np.float32)


def place(plan: CanaryPlan, first: int, clients: Sequence[ClientSplit]) -> tuple[list[int], tuple[ClientSplit, ...]]:
    """(the member canaries, in the order they are appended to the records from index `first` on; the
    client splits with those indices added to training, `plan.repeats` times each). Canaries left
    out are not appended at all, and validation splits stay as they were."""
    members = [i for i, member in enumerate(plan.members) if member]
    index = {canary: first + n for n, canary in enumerate(members)}
    splits = tuple(dataclasses.replace(split, train=split.train + tuple(
        index[i] for i in plan.at_client(cid) for _ in range(plan.repeats))) for cid, split in enumerate(clients))
    return members, splits
