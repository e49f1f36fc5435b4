"""Every source format reads the same records; every kind of bad input is a DataError that says
where and what to do. Property tests feed the loaders malformed rows."""

from __future__ import annotations

import csv
import io
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.config import DataConfig
from fedtune.data.loaders import infer_format, load_labeled_texts
from fedtune.errors import ConfigError, DataError

ROWS = [("the cat sat", "pets"), ("stocks fell, sharply", "money"), ('she said "hi"', "pets"),
        ("rates rose", "money")]


def write_csv(path: Path, rows, header=("text", "label"), encoding="utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def load(path: Path, **options):
    return load_labeled_texts(DataConfig(path=str(path), **options))


def test_csv_jsonl_parquet_lines_and_hf_read_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = [t for t, _ in ROWS], [y for _, y in ROWS]
    write_csv(tmp_path / "d.csv", ROWS)
    write_jsonl(tmp_path / "d.jsonl", [{"text": t, "label": y, "extra": 1} for t, y in ROWS])
    (tmp_path / "d.json").write_text(json.dumps([{"text": t, "label": y} for t, y in ROWS]))
    pq.write_table(pa.table({"text": texts, "label": labels}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("".join(f"{t}@{y}\n" for t, y in ROWS))
    datasets.Dataset.from_dict({"text": texts, "label": labels}).save_to_disk(str(tmp_path / "hf"))
    for name, options in [("d.csv", {}), ("d.jsonl", {}), ("d.json", {}), ("d.parquet", {}),
                          ("d.txt", {"separator": "@"}), ("hf", {})]:
        got = load(tmp_path / name, **options)
        assert (got.texts, got.labels) == (tuple(texts), tuple(labels)), name


def test_format_is_inferred_from_the_suffix_or_refused(tmp_path):
    (tmp_path / "dir").mkdir()
    assert [infer_format(str(tmp_path / n)) for n in ("a.CSV", "a.jsonl", "a.json", "a.parquet", "a.txt", "dir")] == [
        "csv", "jsonl", "jsonl", "parquet", "lines", "hf"]
    assert infer_format("whatever.xyz", "csv") == "csv"
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"suffix `\.xlsx`.*data\.format"):
        infer_format(str(tmp_path / "a.xlsx"))


def test_lines_split_on_the_last_separator(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("mail me @ noon @ the office@neutral\r\n\nprofits up@positive\n")
    got = load(path, separator="@")
    assert got.texts == ("mail me @ noon @ the office", "profits up")
    assert got.labels == ("neutral", "positive")
    assert got.numbers == (1, 3)  # blank line 2 is skipped but still counted


def test_other_encodings_need_the_encoding_option(tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes("first ok@a\nCaf\u00e9 prices rose@b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.txt is not valid utf-8.*line 2.*data\.encoding.*latin-1"):
        load(path, separator="@")
    assert load(path, separator="@", encoding="latin-1").texts[1] == "Caf\u00e9 prices rose"
    with pytest.raises(ConfigError, match="data.encoding"):
        DataConfig(path=str(path), encoding="klingon-8")


def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path):
    path = write_csv(tmp_path / "excel.csv", ROWS, encoding="utf-8-sig")
    assert load(path).texts[0] == "the cat sat"


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv does not exist.*data.path"):
        load(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty \(0 bytes\)"):
        load(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("text,label\n\n")
    with pytest.raises(DataError, match="has no records"):
        load(tmp_path / "header.csv")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="has no records"):
        load(tmp_path / "blank.jsonl")


def test_missing_column_lists_the_columns_that_exist(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS, header=("sentence", "label"))
    with pytest.raises(DataError, match=r"no column `text`\. Its columns are: sentence, label\. .*data\.text_column"):
        load(path)
    assert load(path, text_column="sentence").texts[0] == "the cat sat"
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "y": 1}])
    with pytest.raises(DataError, match=r"no column `label`\. Its columns are: text, y\. .*data\.label_column"):
        load(jsonl)


def test_a_column_named_twice_in_the_header_is_refused(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "x", "b")] * 4, header=("text", "label", "text"))
    with pytest.raises(DataError, match=r"d\.csv's header names column `text` more than once"):
        load(path)


def test_a_json_true_is_not_a_text(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": "a"}, {"text": True, "label": "b"}])
    with pytest.raises(DataError, match=r"empty or missing text in column `text`.*line 2"):
        load(path)


def test_empty_and_nan_texts_name_their_lines(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("fine", "a"), ("", "b"), ("nan", "a"), ("  ", "b"), ("ok", "a")])
    with pytest.raises(DataError, match=r"3 lines with an empty or missing text in column `text` \(lines 3, 4, 5\)"):
        load(path)
    records = [{"text": None, "label": "a"}, {"label": "b"}, {"text": "x", "label": "a"},
               {"text": "y", "label": float("nan")}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    with pytest.raises(DataError, match=r"2 lines with an empty or missing text.*lines 1, 2.*1 line with an empty, "
                                        r"missing or non-scalar value in column `label` \(line 4\)"):
        load(jsonl)


def test_parquet_nulls_are_named_by_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "label": [1.0, 2.0, float("nan")]}), path)
    with pytest.raises(DataError, match=r"row 2\b.*row 3\b"):
        load(path)
    got = load(path, skip_invalid_rows=True)
    assert got.labels == ("1",) and got.skipped  # 1.0 is the label `1`


def test_misshapen_csv_rows_and_broken_json_lines(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello, world,a\nfine,b\n")
    with pytest.raises(DataError, match=r"line 2\).*double quotes"):
        load(path)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": \n[1, 2]\n')
    with pytest.raises(DataError, match=r"not valid JSON \(line 2\).*not a JSON object \(line 3\)"):
        load(jsonl)


def test_skip_invalid_rows_keeps_the_good_ones_and_says_what_it_dropped(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("good one@a\n1\nanother@b\n@a\n")
    got = load(path, separator="@", skip_invalid_rows=True)
    assert got.texts == ("good one", "another") and got.numbers == (1, 3)
    assert got.skipped == ("1 line with no separator '@' (line 2)",
                           "1 line with an empty or missing text in column `text` (line 4)")
    (tmp_path / "bad.txt").write_text("no separator here\n")
    with pytest.raises(DataError, match="no valid records"):
        load(tmp_path / "bad.txt", separator="@", skip_invalid_rows=True)


def test_numeric_and_class_label_labels_become_names(tmp_path):
    import datasets

    write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 0.0},
                                       {"text": "c", "label": True}])
    assert load(tmp_path / "d.jsonl").labels == ("1", "0", "true")
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.Dataset.from_dict({"text": ["x", "y"], "label": [1, 0]}, features=features).save_to_disk(
        str(tmp_path / "hf"))
    assert load(tmp_path / "hf").labels == ("pos", "neg")


def test_hf_sources_that_cannot_be_used(tmp_path, monkeypatch):
    import datasets

    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not a dataset written by save_to_disk"):
        load(tmp_path / "plain")
    split = datasets.Dataset.from_dict({"text": ["x"], "label": ["a"]})
    datasets.DatasetDict({"dev": split, "test": split}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match="splits dev, test and none is called `train`"):
        load(tmp_path / "dict")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        load_labeled_texts(DataConfig(path="someone/some-dataset", format="hf"))


def test_partition_column_is_read_and_checked(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("a", "x", "H1"), ("b", "y", ""), ("c", "x", "H2")],
                     header=("text", "label", "hospital_id"))
    with pytest.raises(DataError, match=r"value in column `hospital_id` \(line 3\)"):
        load(path, partition="column", partition_column="hospital_id")
    got = load(path, partition="column", partition_column="hospital_id", skip_invalid_rows=True)
    assert got.groups == ("H1", "H2")
    (tmp_path / "d.txt").write_text("a@x\n")
    with pytest.raises(DataError, match="no columns"):
        load(tmp_path / "d.txt", separator="@", partition="column", partition_column="hospital_id")


def test_a_record_without_a_user_id_is_refused_or_left_out_and_counted(tmp_path):
    """Under user-level DP a record whose user is unknown cannot be bounded per user: the file is
    refused naming the line, or (data.skip_invalid_rows) the record is left out and the skip counted."""
    path = write_csv(tmp_path / "notes.csv", [("a", "x", "p1"), ("b", "y", " "), ("c", "x", "p2")],
                     header=("text", "label", "patient_id"))
    with pytest.raises(DataError, match=r"value in column `patient_id` \(line 3\)"):
        load(path, user_column="patient_id")
    got = load(path, user_column="patient_id", skip_invalid_rows=True)
    assert got.users == ("p1", "p2") and got.texts == ("a", "c")
    assert len(got.skipped) == 1 and "patient_id" in got.skipped[0]


# ---- properties: malformed rows -----------------------------------------------------------------

MISSING = st.sampled_from(["", "   ", "nan", "NaN", None])
LABEL_NAMES = st.sampled_from(["pos", "neg", "3", "very good"])


def _valid(value) -> bool:
    return isinstance(value, str) and value.strip() != "" and value.strip().lower() not in {"nan", "null", "<na>"}


def _texts(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.text(alphabet, min_size=1, max_size=30)


CSV_TEXT = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
LINE_TEXT = st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"))
ROWS_CSV = st.lists(st.tuples(st.one_of(_texts(CSV_TEXT), MISSING), st.one_of(LABEL_NAMES, MISSING)),
                    min_size=1, max_size=12)
ROWS_LINES = st.lists(st.tuples(st.one_of(_texts(LINE_TEXT), MISSING), st.one_of(LABEL_NAMES, MISSING)),
                      min_size=1, max_size=12)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _first_named(message: str) -> int:
    return min(int(n) for group in re.findall(r"lines? ([\d, ]+)", message) for n in re.findall(r"\d+", group))


def _check(path: Path, rows, first_lines, options, expect_text=lambda t: t):
    """Strict loading fails exactly when a row is bad, naming the first bad line; skipping keeps exactly
    the good rows, in order."""
    good = [(expect_text(t), y) for t, y in rows if _valid(t) and _valid(y)]
    bad_lines = [line for line, (t, y) in zip(first_lines, rows, strict=True) if not (_valid(t) and _valid(y))]
    if bad_lines:
        with pytest.raises(DataError) as err:
            load(path, **options)
        assert _first_named(str(err.value)) == bad_lines[0], str(err.value)
        assert "data.skip_invalid_rows" in str(err.value)
    else:
        got = load(path, **options)
        assert list(zip(got.texts, got.labels, strict=True)) == good
    if good:
        got = load(path, skip_invalid_rows=True, **options)
        assert list(zip(got.texts, got.labels, strict=True)) == good
        assert list(got.numbers) == [n for n, (t, y) in zip(first_lines, rows, strict=True) if _valid(t) and _valid(y)]
    else:
        with pytest.raises(DataError, match="no valid records"):
            load(path, skip_invalid_rows=True, **options)


def _blank(value) -> bool:
    return value is None or value.strip() == ""


def _visible(rows):
    """Rows whose every cell is blank are skipped like blank lines, so they are not generated."""
    return [(t, y) for t, y in rows if not (_blank(t) and _blank(y))] or [("x", "pos")]


@SETTINGS
@given(rows=ROWS_CSV)
def test_csv_with_malformed_rows(rows):
    rows = _visible(rows)
    with tempfile.TemporaryDirectory() as tmp:
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        first_lines = []
        for text, label in rows:
            first_lines.append(len(re.findall(r"\r\n|\r|\n", out.getvalue())) + 1)
            writer.writerow(["" if text is None else text, "" if label is None else label])
        path = Path(tmp) / "d.csv"
        path.write_text(out.getvalue(), encoding="utf-8", newline="")
        _check(path, rows, first_lines, {})


@SETTINGS
@given(rows=ROWS_CSV)
def test_jsonl_with_malformed_rows(rows):
    rows = [*rows, ("x", "pos")]  # every column appears somewhere, or it is the "missing column" error
    # a missing value is sometimes null, sometimes an absent key
    records = [{k: v for k, v in (("text", t), ("label", y)) if v is not None or i % 2} for i, (t, y) in
               enumerate(rows)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        _check(path, rows, list(range(1, len(rows) + 1)), {})


@SETTINGS
@given(rows=ROWS_LINES, separator=st.sampled_from(["@", "\t", "||"]))
def test_lines_with_malformed_rows(rows, separator):
    rows = _visible(rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.txt"
        path.write_text("".join(f"{t or ''}{separator}{y or ''}\n" for t, y in rows), encoding="utf-8")
        _check(path, rows, list(range(1, len(rows) + 1)), {"separator": separator}, expect_text=str.strip)


def test_labels_read_the_same_from_csv_and_jsonl_and_mixed_types_are_warned_about(tmp_path):
    """CSV used to keep "2" and "2.0" as two classes where JSON Lines merged them, and a JSON true
    became a class without a word."""
    from fedtune.config import DataConfig
    from fedtune.data.loaders import load_labeled_texts

    csv_file = tmp_path / "notes.csv"
    csv_file.write_text("text,label\na,2\nb,2.0\nc,3\n")
    jsonl_file = tmp_path / "notes.jsonl"
    jsonl_file.write_text('{"text": "a", "label": 2}\n{"text": "b", "label": 2.0}\n{"text": "c", "label": "3"}\n'
                          '{"text": "d", "label": true}\n')
    from_csv = load_labeled_texts(DataConfig(path=str(csv_file)))
    from_jsonl = load_labeled_texts(DataConfig(path=str(jsonl_file)))
    assert from_csv.labels == ("2", "2", "3") and from_csv.notes == ()
    assert from_jsonl.labels == ("2", "2", "3", "true")
    assert len(from_jsonl.notes) == 1 and "mixes numbers and text and true/false" in from_jsonl.notes[0]


def test_a_label_list_saved_before_labels_were_normalised_still_encodes(tmp_path):
    """A run started when a CSV's "2.0" stayed "2.0" saved that name in data.labels; resuming it
    must still find the (now "2") labels."""
    from fedtune.config import DataConfig
    from fedtune.data.federated import encode_labels
    from fedtune.data.loaders import load_labeled_texts

    csv_file = tmp_path / "notes.csv"
    csv_file.write_text("text,label\na,2.0\nb,3.0\nc,2.0\n")
    assert encode_labels(load_labeled_texts(DataConfig(path=str(csv_file))), ("2.0", "3.0")) == [0, 1, 0]


@pytest.mark.parametrize("bad", ['{"text": "a", "label": ' + "1" * 5000 + "}", "[" * 100_000 + "]" * 100_000])
def test_json_past_pythons_limits_is_a_bad_line_not_a_crash(tmp_path, bad):
    """A review: an integer of more than 4,300 digits (ValueError) or a line nested 100,000 deep (RecursionError)
    ended `fedtune simulate` with a traceback instead of naming the line."""
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n' + bad + "\n")
    with pytest.raises(DataError, match=r"not valid JSON \(line 2\)"):
        load(jsonl)
    array = tmp_path / "d.json"
    array.write_text("[" + bad + "]")
    with pytest.raises(DataError, match="is not valid JSON"):
        load(array)


def test_an_encoding_that_is_no_text_encoding_is_refused_at_the_option():
    """A review: `--encoding base64` (a bytes-to-bytes codec) passed validation and failed reading with a traceback."""
    for codec in ("base64", "rot13", "zip", "no-such-codec"):
        with pytest.raises(ConfigError, match=r"`data.encoding`.*not a text encoding"):
            DataConfig(encoding=codec)
    assert DataConfig(encoding="utf-16").encoding == "utf-16"
