"""Instruction data for the causal-LM task: the built-in triage-advice demo, a user's JSON Lines file,
and the federation's splits of them.

A record is either `{"instruction": ..., "input": ... (optional), "response": ...}` (`output` is
accepted for `response`, and an optional `system` sets the system prompt) or
`{"messages": [{"role": "system" | "user" | "assistant", "content": ...}, ...]}` ending with an
assistant turn. Both become a Conversation; every bad record is a DataError naming its line.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from fedtune.config import DataConfig
from fedtune.data.canaries import CANARY_GROUP, Canaries, canary_records, place, plan_canaries
from fedtune.data.demo import COURSES, LABELS, SYMPTOMS, _urgency
from fedtune.data.federated import file_stamp, left_out
from fedtune.data.loaders import _check_file, _decode, _is_missing, as_label_name, infer_format, numbered
from fedtune.data.partition import ClientSplit, check_partitions, holdout_split, partition_indices, split_client
from fedtune.data.users import by_user, canary_user, own_split
from fedtune.errors import DataError

ROLES = ("system", "user", "assistant")
EXAMPLE = '{"instruction": "...", "input": "... (optional)", "response": "..."}'
CHAT_EXAMPLE = '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}'
NOT_JSON = object()  # what a line that does not parse reads as


@dataclass(frozen=True)
class Conversation:
    """(role, content) turns; the last is the assistant's answer. The loss falls on assistant turns."""

    turns: tuple[tuple[str, str], ...]

    def key(self) -> str:
        """The conversation as one string, which decides its side of a client's validation split."""
        return "\x1e".join(f"{role}\x1f{content}" for role, content in self.turns)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.turns]

    def prompt(self) -> list[dict[str, str]]:
        """Everything before the final answer: what a model is asked to continue."""
        return self.messages()[:-1]

    @property
    def response(self) -> str:
        return self.turns[-1][1]


def conversation(record: Any) -> Conversation:
    """A record in either format as a Conversation; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError("that is not a JSON object")
    if "messages" in record:
        return _from_messages(record["messages"])
    if "instruction" not in record:
        raise ValueError("with neither `instruction` nor `messages`")
    instruction, extra = record["instruction"], record.get("input") or ""
    response = record.get("response", record.get("output"))
    system = record.get("system") or ""
    for key, value in (("instruction", instruction), ("response", response)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"with an empty or missing `{key}`" + (" (or `output`)" if key == "response" else ""))
    if not isinstance(extra, str) or not isinstance(system, str):
        raise ValueError("whose `input` or `system` is not a string")
    user = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
    turns = ((("system", system.strip()),) if system.strip() else ()) + (("user", user), ("assistant", response))
    return Conversation(turns)


def _from_messages(messages: Any) -> Conversation:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages) or not messages:
        raise ValueError("whose `messages` is not a list of {role, content} objects")
    turns = tuple((m.get("role"), m.get("content")) for m in messages)
    if any(role not in ROLES for role, _ in turns):
        raise ValueError("whose `messages` has a role other than system, user and assistant")
    if any(not isinstance(content, str) or not content.strip() for _, content in turns):
        raise ValueError("whose `messages` has an empty or missing content")
    roles = [role for role, _ in turns]
    if "system" in roles[1:]:
        raise ValueError("whose `messages` has a system turn after the first turn")
    if roles[-1] != "assistant":
        raise ValueError("whose `messages` does not end with an assistant turn")
    if "user" not in roles[: roles.index("assistant")]:
        raise ValueError("whose `messages` has no user turn before the first assistant turn")
    return Conversation(turns)  # type: ignore[arg-type]


# ---- the demo -----------------------------------------------------------------------------------

DEMO_SYSTEM = "You are a triage nurse."
ADVICE = ("Self-care: rest at home and drink fluids.",
          "Routine: see your doctor this week.",
          "Urgent: go to urgent care today.",
          "Emergency: call an ambulance now.")
QUESTIONS = ("{Patient} has {symptom} {course}. What to do?",
             "Advice for {patient} with {symptom} {course}?",
             "Triage {patient}: {symptom} {course}.")
# Shorter than data/demo.py's, so that a whole conversation fits in model.max_length=64 tokens.
PEOPLE = (("a young man", 0), ("a young woman", 0), ("a teacher", 0), ("a student", 0), ("an elderly woman", 1),
          ("a man with heart disease", 1), ("a baby", 1), ("a pregnant woman", 1))
VITAL_SIGNS = (("Vitals normal.", 0), ("Oxygen 86%.", 2), ("Low blood pressure.", 2))  # given as the `input`


def make_demo_instructions(num_examples: int, seed: int = 0) -> list[tuple[dict[str, str], int]]:
    """(record, urgency level) pairs: a triage question and the advice for its urgency (see ADVICE).

    The urgency follows data/demo.py's rules (symptom, moved by age, course and vital signs), so
    the answer is learnable but not from the symptom alone; every answer has a fixed wording, so a
    model that learns the task is visibly less perplexed by the answers."""
    rng = random.Random(seed)
    out = []
    for i in range(num_examples):
        base = i % len(LABELS)
        symptom = rng.choice(SYMPTOMS[base])
        patient, p_shift = rng.choice(PEOPLE)
        course, c_shift = rng.choice(COURSES)
        vitals, v_shift = rng.choice(VITAL_SIGNS) if rng.random() < 0.3 else ("", 0)
        question = rng.choice(QUESTIONS).format(patient=patient, Patient=patient[0].upper() + patient[1:],
                                                symptom=symptom, course=course)
        level = _urgency(base, p_shift, c_shift, v_shift)
        record = {"system": DEMO_SYSTEM, "instruction": question, "response": ADVICE[level]}
        if vitals:
            record["input"] = vitals
        out.append((record, level))
    rng.shuffle(out)
    return out


# ---- a user's file --------------------------------------------------------------------------------

def load_instructions(data: DataConfig) -> tuple[tuple[Conversation, ...], tuple[str, ...], tuple[str, ...]]:
    """(conversations, skipped-record descriptions, each conversation's user: the value of its key
    data.user_column, or () when that is not set) from a JSON Lines file (or a .json array)."""
    fmt = infer_format(data.path, data.format)
    if fmt != "jsonl":
        raise DataError(f"{data.path}: the causal-lm task reads JSON Lines (one record a line, e.g. {EXAMPLE} or "
                        f"{CHAT_EXAMPLE}), not {fmt}. Convert the file, or set data.format to `jsonl` if it is JSON "
                        "Lines.")
    _check_file(data.path, fmt)
    text = _decode(data.path, data.encoding)
    unit = "record" if text.lstrip().startswith("[") else "line"
    chats, users, problems = [], [], {}
    for number, record in _records(data.path, text):
        try:
            if record is NOT_JSON:
                raise ValueError("that is not valid JSON")
            chat = conversation(record)
            if data.user_column:
                users.append(_user_of(record, data.user_column))
            chats.append(chat)
        except ValueError as err:
            problems.setdefault(str(err), []).append(number)
    found = [f"{len(numbers)} {unit}{'' if len(numbers) == 1 else 's'} {what} ({numbered(unit, numbers)})"
             for what, numbers in problems.items()]
    if found and not data.skip_invalid_rows:
        raise DataError(f"{data.path}: {'; '.join(found)}. Each record must look like {EXAMPLE} or {CHAT_EXAMPLE}. "
                        f"Or set data.skip_invalid_rows to true to leave such {unit}s out.")
    if not chats:
        raise DataError(f"{data.path} has no usable records{': ' + '; '.join(found) if found else ''}. Each record "
                        f"must look like {EXAMPLE} or {CHAT_EXAMPLE}.")
    return tuple(chats), tuple(found), tuple(users)


def _user_of(record: dict, key: str) -> str:
    """A record's user id (data.user_column); ValueError when it is missing or empty."""
    user = None if _is_missing(record.get(key)) else as_label_name(record.get(key))
    if not user:
        raise ValueError(f"with an empty or missing `{key}` (data.user_column)")
    return user


def _records(name: str, text: str) -> Iterable[tuple[int, Any]]:
    """(line or record number, parsed value); a line that is not JSON yields NOT_JSON, refused later."""
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except (ValueError, RecursionError) as err:  # ValueError: JSONDecodeError, or an integer of > 4300 digits
            raise DataError(f"{name} is not valid JSON ({str(err)[:200]}). Fix that line, or write one record a line "
                            "(JSON Lines).") from None
        yield from enumerate(records, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # also nested past Python's limit, or an integer of > 4300 digits
                record = NOT_JSON
            yield number, record


# ---- the federation's splits -------------------------------------------------------------------

@dataclass(frozen=True)
class InstructData:
    chats: tuple[Conversation, ...]
    groups: tuple[int, ...]  # what partitioners split by: the demo's urgency level; 0 for a file
    group_names: tuple[str, ...]
    partition: str  # the method used: data.partition for the demo; a file's records are split iid
    server_test: tuple[int, ...]
    clients: tuple[ClientSplit, ...]
    skipped: tuple[str, ...] = ()
    canaries: Canaries | None = None  # the privacy audit's canaries (data.canaries); members are in `chats`
    users: tuple[str, ...] = ()  # data.user_column: whose conversation each is; empty when not set

    def select(self, indices: Sequence[int]) -> list[Conversation]:
        return [self.chats[i] for i in indices]

    @property
    def client_ids(self) -> tuple[str, ...]:  # no partition by column for instruction records
        return ()

    @property
    def notes(self) -> tuple[str, ...]:  # no label column to warn about
        return ()


def federated_instructions(data: DataConfig, num_clients: int, seed: int) -> InstructData:
    """Build (once per process, and again if data.path changes) the server hold-out and the per-client
    splits; raises DataError."""
    return _federated_instructions(data, num_clients, seed, file_stamp(data.path))


@lru_cache(maxsize=4)
def _federated_instructions(data: DataConfig, num_clients: int, seed: int, stamp: Any) -> InstructData:
    if data.source == "demo":
        demo = make_demo_instructions(data.demo_examples, seed=seed)
        chats, groups, names, method, skipped = (tuple(conversation(r) for r, _ in demo), tuple(g for _, g in demo),
                                                 LABELS, data.partition, ())
    else:
        if data.partition in ("shard", "column"):
            raise DataError(f"Partition `{data.partition}` needs a label or column per record; instruction records "
                            "have neither, so the causal-lm task splits a file iid. Set data.partition to `iid`.")
        chats, skipped, users = load_instructions(data)
        groups, names, method = (0,) * len(chats), ("instruction",), "iid"
    if data.source == "file" and users:  # a person's conversations stay together (data/users.py)
        test, splits, _ = by_user(groups, users, (), data, num_clients, seed, method=method)
    else:
        users = ()
        pool, test = holdout_split(len(chats), data.test_fraction, seed)
        parts = partition_indices(groups, pool, num_clients, method, data.alpha, seed,
                                  shards_per_client=data.shards_per_client)
        keys = [chat.key() for chat in chats]
        splits = tuple(split_client(p, keys, data.client_val_fraction, seed + cid) for cid, p in enumerate(parts))
    check_partitions(splits)
    fed = InstructData(chats, groups, names, method, tuple(test), splits, skipped, users=users)
    return with_canary_chats(fed, data.canaries, data.canary_repeats, seed) if data.canaries else fed


def with_canary_chats(fed: InstructData, count: int, repeats: int, seed: int) -> InstructData:
    """The instruction federation with the audit's member canaries (a question naming a random key, a
    rare random phrase as the answer) in their clients' training data, after every split was made;
    they form their own group in the partition summary, and `fed.canaries` keeps all of them."""
    plan = plan_canaries(count, len(fed.clients), repeats, seed)
    taken = {content for chat in fed.chats for _, content in chat.turns}
    chats = tuple(Conversation((("user", question), ("assistant", answer)))
                  for question, answer in canary_records(count, seed, taken))
    members, splits = place(plan, len(fed.chats), fed.clients)
    taken_users = set(fed.users)
    users = fed.users + tuple(canary_user(i, taken_users) for i in members) if fed.users else ()
    return dataclasses.replace(fed, chats=fed.chats + tuple(chats[i] for i in members),
                               groups=fed.groups + (len(fed.group_names),) * len(members),
                               group_names=fed.group_names + (CANARY_GROUP,), clients=splits, users=users,
                               canaries=Canaries(plan, chats, len(fed.chats)))


def resolve_instructions(data: DataConfig) -> DataConfig:
    """The data config to save with a new causal-lm run: an absolute data.path, no label list."""
    if data.source == "file" and Path(data.path).exists():
        data = dataclasses.replace(data, path=str(Path(data.path).resolve()))
    return dataclasses.replace(data, labels=())


def local_instructions(data: DataConfig, secret: str) -> tuple[list[Conversation], list[Conversation], tuple[str, ...]]:
    """Deployment: (train, validation) conversations from this node's own file (they never leave the
    process), split by user when data.user_column is set, and the user of each training one."""
    chats, skipped, users = load_instructions(data)  # node_data_config leaves a record at fault out
    left_out(data.path, skipped)
    split = own_split([chat.key() for chat in chats], users, data.client_val_fraction, secret)
    return ([chats[i] for i in split.train], [chats[i] for i in split.val],
            tuple(users[i] for i in split.train) if users else ())
