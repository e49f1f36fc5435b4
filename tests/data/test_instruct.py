"""Instruction data: records and chats, the demo, the JSONL loader's errors, and prompt masking."""

from __future__ import annotations

import json

import pytest

from fedtune.config import DataConfig
from fedtune.data.chat import encode_chat, tokenize_chats
from fedtune.data.instruct import (
    ADVICE,
    Conversation,
    conversation,
    federated_instructions,
    load_instructions,
    make_demo_instructions,
)
from fedtune.data.text import IGNORE_INDEX, pad_batch
from fedtune.errors import DataError


@pytest.fixture(scope="module")
def tokenizer():
    from fedtune.models.build import load_tokenizer
    from fedtune.models.default_lm import default_lm_dir

    return load_tokenizer(str(default_lm_dir()))  # SmolLM2's, with its ChatML template


def _labelled(ids: list[int], labels: list[int]) -> list[int]:
    return [token for token, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]


def test_prompt_tokens_carry_no_loss(tokenizer):
    chat = conversation({"system": "Be brief.", "instruction": "Triage: a sore throat.", "input": "Age 34.",
                         "response": "Self-care: rest at home."})
    ids, labels = encode_chat(tokenizer, chat)
    prompt = tokenizer.apply_chat_template(chat.prompt(), tokenize=True, return_dict=False, add_generation_prompt=True)
    assert ids[: len(prompt)] == list(prompt)
    assert set(labels[: len(prompt)]) == {IGNORE_INDEX}, "a prompt token carries loss"
    answer = tokenizer.decode(_labelled(ids, labels))
    assert answer == "Self-care: rest at home.<|im_end|>\n"  # the answer and its end-of-turn, nothing else
    assert "Triage" not in answer and "Be brief" not in answer


def test_every_assistant_turn_is_labelled_and_no_user_turn(tokenizer):
    chat = conversation({"messages": [
        {"role": "user", "content": "Fever?"}, {"role": "assistant", "content": "How high?"},
        {"role": "user", "content": "39 degrees."}, {"role": "assistant", "content": "See a doctor today."}]})
    ids, labels = encode_chat(tokenizer, chat)
    assert tokenizer.decode(_labelled(ids, labels)) == "How high?<|im_end|>\nSee a doctor today.<|im_end|>\n"


def test_padding_carries_no_loss_and_truncation_is_counted(tokenizer):
    short = conversation({"instruction": "Hi.", "response": "Hello."})
    long = conversation({"instruction": "Describe " + "a very long symptom " * 20, "response": "Urgent."})
    data = tokenize_chats(tokenizer, [short, long], max_length=40)
    assert data.num_truncated == 1
    assert set(data.labels[1]) == {IGNORE_INDEX}, "a conversation cut inside its prompt keeps no labelled token"
    batch = pad_batch([data[0], data[1]])
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 40)
    padded = batch["attention_mask"] == 0
    assert padded[0].any() and (batch["labels"][padded] == IGNORE_INDEX).all()


def test_instruction_and_chat_records_become_the_same_conversation():
    as_record = conversation({"instruction": "Triage this.", "input": "Sore throat.", "output": "Self-care."})
    as_chat = conversation({"messages": [{"role": "user", "content": "Triage this.\n\nSore throat."},
                                         {"role": "assistant", "content": "Self-care."}]})
    assert as_record == as_chat == Conversation((("user", "Triage this.\n\nSore throat."), ("assistant", "Self-care.")))
    assert as_record.response == "Self-care." and as_record.prompt()[-1]["role"] == "user"


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_bad_records_are_named_by_line(tmp_path):
    good = {"instruction": "Q?", "response": "A."}
    path = write_lines(tmp_path / "bad.jsonl", [
        good,
        "{not json",
        {"instruction": "Q?"},
        {"messages": [{"role": "user", "content": "Q?"}]},
        good,
        {"messages": [{"role": "doctor", "content": "Q?"}, {"role": "assistant", "content": "A."}]},
    ])
    with pytest.raises(DataError) as err:
        load_instructions(DataConfig(path=str(path)))
    message = str(err.value)
    for what in ("that is not valid JSON (line 2)", "empty or missing `response` (or `output`) (line 3)",
                 "does not end with an assistant turn (line 4)", "role other than system, user and assistant "
                 "(line 6)", "data.skip_invalid_rows"):
        assert what in message
    chats, skipped, _ = load_instructions(DataConfig(path=str(path), skip_invalid_rows=True))
    assert len(chats) == 2 and len(skipped) == 4


def test_a_file_that_is_not_json_lines_is_refused(tmp_path):
    path = tmp_path / "notes.csv"
    path.write_text("text,label\nhello,a\n")
    with pytest.raises(DataError, match="causal-lm task reads JSON Lines"):
        load_instructions(DataConfig(path=str(path)))


def test_demo_is_deterministic_learnable_and_fits_the_default_length(tokenizer):
    demo = make_demo_instructions(200, seed=3)
    assert demo == make_demo_instructions(200, seed=3) and demo != make_demo_instructions(200, seed=4)
    assert {level for _, level in demo} == {0, 1, 2, 3}
    assert all(record["response"] == ADVICE[level] for record, level in demo)  # one fixed answer per urgency
    assert any("input" in record for record, _ in demo) and len({r["instruction"] for r, _ in demo}) > 150
    lengths = [len(encode_chat(tokenizer, conversation(record))[0]) for record, _ in demo]
    assert max(lengths) <= 64  # model.max_length's default: nothing is truncated


def test_federated_split_is_disjoint_and_files_are_split_iid(tmp_path):
    fed = federated_instructions(DataConfig(demo_examples=100), num_clients=3, seed=0)
    seen = [*fed.server_test, *(i for split in fed.clients for i in (*split.train, *split.val))]
    assert sorted(seen) == list(range(100)) and fed.partition == "dirichlet"
    path = write_lines(tmp_path / "d.jsonl", [{"instruction": f"Q{i}?", "response": "A."} for i in range(30)])
    assert federated_instructions(DataConfig(path=str(path)), 2, 0).partition == "iid"
    with pytest.raises(DataError, match="data.partition to `iid`"):
        federated_instructions(DataConfig(path=str(path), partition="shard"), 2, 0)


def test_a_huge_turn_is_cut_before_the_chat_template_sees_it(tokenizer):
    """Memory follows max_length, not the text (issue: a 50 MB text took 11 GB in a worker): the
    tokenizer only ever sees max_length x CHARS_PER_TOKEN characters of a turn, and the tokens kept
    are exactly those of the whole conversation."""
    from fedtune.data.chat import _token_count, cut_turns
    from fedtune.data.text import CHARS_PER_TOKEN

    huge = Conversation((("user", "chest pain and fever " * 40_000), ("assistant", "Emergency: call now.")))
    seen: list[int] = []
    render = tokenizer.apply_chat_template

    class Watching:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def apply_chat_template(self, messages, **kwargs):
            seen.append(max(len(m["content"]) for m in messages))
            return render(messages, **kwargs)

    data = tokenize_chats(Watching(), [huge], max_length=32)
    assert max(seen) <= 32 * CHARS_PER_TOKEN < len(huge.turns[0][1])
    full_ids, full_labels = encode_chat(tokenizer, huge)
    assert data.input_ids[0] == tuple(full_ids[:32]) and data.labels[0] == tuple(full_labels[:32])
    assert data.num_truncated == 1 and _token_count(tokenizer, huge, 32) > 32
    short = Conversation((("user", "cough"), ("assistant", "Self-care.")))
    assert cut_turns(short, 32) is short


def test_a_users_conversations_stay_at_one_client_and_a_missing_id_is_named(tmp_path):
    from fedtune.data.instruct import federated_instructions, local_instructions

    rows = [{"instruction": f"Question {i} from patient {i % 25}?", "response": "Rest.", "patient": f"p{i % 25}"}
            for i in range(150)]
    path = write_lines(tmp_path / "chats.jsonl", rows)
    data = DataConfig(path=str(path), user_column="patient", test_fraction=0.2)
    fed = federated_instructions(data, 3, seed=0)
    sides = [fed.server_test] + [part for split in fed.clients for part in (split.train, split.val)]
    owners = [{fed.chats[i].turns[-2][1].split("patient ")[1].rstrip("?") for i in side} for side in sides]
    assert sum(len(o) for o in owners) == 25 and set().union(*owners) == {str(u) for u in range(25)}
    train, val, users = local_instructions(DataConfig(path=str(path), user_column="patient"), secret="0")
    assert val and len(users) == len(train) and not {c.turns[-2][1].split("patient ")[1].rstrip("?") for c in val} & \
        {u[1:] for u in users}
    rows[7].pop("patient")
    with pytest.raises(DataError, match="empty or missing `patient` \\(data.user_column\\) \\(line 8\\)"):
        load_instructions(DataConfig(path=str(write_lines(tmp_path / "gap.jsonl", rows)), user_column="patient"))


def test_instruction_json_past_pythons_limits_is_a_bad_line_not_a_crash(tmp_path):
    """A review: a line nested 100,000 deep or holding an integer of more than 4,300 digits raised out of the loader."""
    path = tmp_path / "deep.jsonl"
    path.write_text('{"instruction": "Q?", "response": "A."}\n' + "[" * 100_000 + "]" * 100_000 + "\n"
                    + '{"instruction": "Q?", "response": ' + "1" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"not valid JSON \(lines? 2"):
        load_instructions(DataConfig(path=str(path)))
    array = tmp_path / "deep.json"
    array.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="is not valid JSON"):
        load_instructions(DataConfig(path=str(array)))
