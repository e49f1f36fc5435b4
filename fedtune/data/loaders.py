"""Read a user's labelled texts: CSV (or TSV), JSONL, Parquet, `text<separator>label` lines, or a Hugging Face
dataset (a directory written by `save_to_disk`, or a hub id while online).

Every row is checked here, once: a problem becomes a DataError that names the file, the rows or
the column, and what to do. Past this module, texts are non-empty strings and labels are names.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fedtune.config import DataConfig
from fedtune.errors import DataError

SUFFIX_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
                  ".parquet": "parquet", ".pq": "parquet", ".txt": "lines"}
MISSING_TEXTS = frozenset({"", "nan", "<na>", "null"})  # how a missing value looks once it was written as text
SHOWN = 5  # row numbers quoted in a message
DELIMITER_NAMES = {",": "a comma", "\t": "a tab", ";": "`;`", "|": "`|`"}  # the likely ones, as a message words them


@dataclass(frozen=True)
class LabeledTexts:
    """The records of one source, in file order. `numbers[i]` is where record i is (see `unit`)."""

    name: str
    unit: str  # "line" (of the file, header included) or "row" (counted from 1)
    numbers: tuple[int, ...]
    texts: tuple[str, ...]
    labels: tuple[str, ...]
    groups: tuple[str, ...] = ()  # values of data.partition_column, when it is set
    skipped: tuple[str, ...] = ()  # invalid records left out (data.skip_invalid_rows), described
    notes: tuple[str, ...] = ()  # what the reader should know about the values (mixed label types)
    users: tuple[str, ...] = ()  # values of data.user_column (whose record each is), when it is set

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, positions: Sequence[int]) -> str:
        """'lines 3, 9, 12 and 4 more' for record positions."""
        return numbered(self.unit, [self.numbers[i] for i in positions])


def numbered(unit: str, numbers: Sequence[int]) -> str:
    """'line 7' or 'lines 3, 9, 12 and 4 more'."""
    return f"{unit}{'' if len(numbers) == 1 else 's'} {listed([str(n) for n in numbers])}"


def listed(items: Sequence[str], shown: int = SHOWN) -> str:
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"


def infer_format(path: str, fmt: str = "auto") -> str:
    """The format to read `path` with: `fmt` unless it is `auto`, else from the suffix."""
    if fmt != "auto":
        return fmt
    p = Path(path)
    if p.is_dir():
        return "hf"
    found = SUFFIX_FORMATS.get(p.suffix.lower())
    if found is None:
        if not p.exists():
            _missing(path)
        raise DataError(f"Cannot tell the format of {path} from its suffix `{p.suffix}`. Set data.format "
                        "to csv, jsonl, parquet, lines (one `text<separator>label` a line) or hf.")
    return found


def load_labeled_texts(cfg: DataConfig) -> LabeledTexts:
    """All records of `cfg.path`, checked; raises DataError naming the file, rows or column."""
    fmt = infer_format(cfg.path, cfg.format)
    if fmt != "hf" or Path(cfg.path).exists():
        _check_file(cfg.path, fmt)
    if fmt == "lines":
        for option, column in (("data.partition_column", cfg.partition_column), ("data.user_column", cfg.user_column)):
            if column:
                raise DataError(f"{cfg.path} is in `lines` format, which has no columns, so {option} `{column}` "
                                "cannot be read. Use a CSV, JSONL or Parquet file.")
    reader = {"lines": _read_lines, "csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet,
              "hf": _read_hf}[fmt]
    return _finish(cfg, reader(cfg))


# ---- checks shared by every format -----------------------------------------------------------

def _missing(path: str) -> NoReturn:
    raise DataError(f"Data file {path} does not exist (data.path). Check the path (relative paths start at "
                    f"{os.getcwd()}); for a Hugging Face hub id, set data.format to `hf`. A resumed run reads the "
                    "path from its run directory's config.toml: put the file back there, or correct data.path in "
                    "that file.")


def _check_file(path: str, fmt: str) -> None:
    p = Path(path)
    if not p.exists():
        _missing(path)
    if fmt == "hf":
        if not p.is_dir():
            raise DataError(f"{path} is a file, but format `hf` reads a directory written by "
                            "Dataset.save_to_disk. Pass that directory, or the file with its own data.format.")
        return
    if p.is_dir():
        raise DataError(f"{path} is a directory, not a {fmt} file. Pass the file itself, or data.format `hf` for a "
                        "dataset saved with save_to_disk.")
    if p.stat().st_size == 0:
        raise DataError(f"{path} is empty (0 bytes). Point data.path at a file that holds labelled texts.")


def _required(cfg: DataConfig) -> list[str]:
    return list(dict.fromkeys(c for c in (cfg.text_column, cfg.label_column, cfg.partition_column, cfg.user_column)
                              if c))


def _check_columns(name: str, columns: Sequence[str], cfg: DataConfig, fix: str = "") -> None:
    """Every required column is there; else a DataError that lists the columns and says `fix` (default:
    name the right column)."""
    options = {cfg.user_column: "data.user_column", cfg.partition_column: "data.partition_column",
               cfg.text_column: "data.text_column", cfg.label_column: "data.label_column"}
    for column in _required(cfg):
        if column not in columns:
            raise DataError(f"{name} has no column `{column}`. Its columns are: {', '.join(map(str, columns))}. "
                            f"{fix or f'Name the right one with {options[column]}.'}")


def _decode(path: str, encoding: str) -> str:
    raw = Path(path).read_bytes()
    # A byte-order mark (Excel writes one) is not part of the first column name.
    codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(f"{path} is not valid {encoding}: byte 0x{raw[err.start]:02x} on line {line} cannot be "
                        "decoded. Set data.encoding to the file's encoding, e.g. latin-1 (or cp1252, utf-16).") from err


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and value.strip().lower() in MISSING_TEXTS


def as_label_name(value: Any) -> str | None:
    """A label or group value as a name, the same whichever format it came in: 3, 3.0 and the text
    "3.0" (a CSV cell) all become '3'; None if it is not a scalar."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and WHOLE_NUMBER.fullmatch(value.strip()):
        return value.strip().split(".")[0]
    if isinstance(value, int | float | str):
        return str(value).strip()
    return None


WHOLE_NUMBER = re.compile(r"-?\d+\.0+")  # a whole number written with a decimal point, e.g. "2.0"


def _kinds(values: Sequence[Any]) -> list[str]:
    """The kinds of value in a column, in words, when it mixes them (true/false, numbers, text)."""
    kinds = {"true/false" if isinstance(v, bool) else "numbers" if isinstance(v, int | float) else "text"
             for v in values if not _is_missing(v)}
    return sorted(kinds) if len(kinds) > 1 else []


@dataclass
class _Table:
    """Records as read, before their values are checked; `problems` holds records already refused."""

    name: str
    unit: str
    columns: list[str]
    numbers: list[int] = field(default_factory=list)
    values: dict[str, list[Any]] = field(default_factory=dict)
    problems: dict[str, list[int]] = field(default_factory=dict)  # what is wrong -> record numbers
    fixes: dict[str, str] = field(default_factory=dict)  # what is wrong -> what to do

    def refuse(self, number: int, what: str, fix: str) -> None:
        self.problems.setdefault(what, []).append(number)
        self.fixes.setdefault(what, fix)


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}{'' if n == 1 else 's'}"


def _finish(cfg: DataConfig, table: _Table) -> LabeledTexts:
    """Check every record's values, then refuse the file or (data.skip_invalid_rows) leave the bad ones out."""
    name, unit = table.name, table.unit
    if not table.numbers and not table.problems:
        raise DataError(f"{name} has no records (only a header or blank lines). Point data.path at a file "
                        "that holds labelled texts.")
    if table.numbers:
        _check_columns(name, table.columns, cfg)
    fill = f"Fill them in or remove those {unit}s."
    kept: list[int] = []
    converted: dict[str, list[str | None]] = {}
    for column in _required(cfg)[1:]:
        converted[column] = [None if _is_missing(v) else as_label_name(v) for v in table.values[column]]
    texts = table.values[cfg.text_column]
    for i, number in enumerate(table.numbers):
        ok = not _is_missing(texts[i]) and isinstance(texts[i], str | int | float) and not isinstance(texts[i], bool)
        if not ok:
            table.refuse(number, f"with an empty or missing text in column `{cfg.text_column}`", fill)
        for column, values in converted.items():
            if not values[i]:
                ok = False
                table.refuse(number, f"with an empty, missing or non-scalar value in column `{column}`", fill)
        if ok:
            kept.append(i)
    skipped: tuple[str, ...] = ()
    if table.problems:
        found = [f"{_count(len(numbers), unit)} {what} ({numbered(unit, sorted(numbers))})"
                 for what, numbers in table.problems.items()]
        if not cfg.skip_invalid_rows:
            raise DataError(f"{name}: {'; '.join(found)}. {' '.join(dict.fromkeys(table.fixes.values()))} Or set "
                            f"data.skip_invalid_rows to true to leave such {unit}s out (the partition summary "
                            "counts them).")
        skipped = tuple(found)
    if not kept:
        raise DataError(f"{name} has no valid records: {'; '.join(skipped)}. Fix the file or point data.path "
                        "at another.")
    return LabeledTexts(name, unit, tuple(table.numbers[i] for i in kept), tuple(str(texts[i]) for i in kept),
                        tuple(converted[cfg.label_column][i] for i in kept),  # type: ignore[misc]
                        tuple(converted[cfg.partition_column][i] for i in kept) if cfg.partition_column else (),
                        skipped, _label_notes(cfg, table),
                        tuple(converted[cfg.user_column][i] for i in kept) if cfg.user_column else ())


def _label_notes(cfg: DataConfig, table: _Table) -> tuple[str, ...]:
    mixed = _kinds(table.values[cfg.label_column])
    if not mixed:
        return ()
    return (f"column `{cfg.label_column}` of {table.name} mixes {' and '.join(mixed)}; each value became a label "
            "name as written (true -> `true`, 2.0 -> `2`): check that the labels are the classes you meant",)


# ---- formats -------------------------------------------------------------------------------------

def _read_lines(cfg: DataConfig) -> _Table:
    table = _Table(cfg.path, "line", [cfg.text_column, cfg.label_column],
                   values={cfg.text_column: [], cfg.label_column: []})
    no_separator = f"with no separator {cfg.separator!r}"
    fix = (f"Each line must be `text{cfg.separator}label`; if the file uses another separator, set it in "
           "data.separator.")
    header = (cfg.text_column, cfg.label_column)
    for number, line in enumerate(io.StringIO(_decode(cfg.path, cfg.encoding), newline=None), start=1):
        if not line.strip():
            continue  # blank lines separate nothing
        body, sep, label = line.rstrip("\n").rpartition(cfg.separator)
        if not sep:
            table.refuse(number, no_separator, fix)
            continue
        if (body.strip(), label.strip()) == header and not (table.numbers or table.problems):
            continue  # a first line `text<separator>label` is a header naming the columns, not a record
        table.numbers.append(number)
        table.values[cfg.text_column].append(body.strip())
        table.values[cfg.label_column].append(label.strip())
    return table


def _csv_delimiter(cfg: DataConfig) -> str:
    """data.separator when it is set (not its default, a tab), else a tab for a .tsv file and a comma for others."""
    if cfg.separator == DataConfig.separator and Path(cfg.path).suffix.lower() != ".tsv":
        return ","
    if len(cfg.separator) != 1:
        raise DataError(f"data.separator {cfg.separator!r} cannot split the columns of {cfg.path}: in a CSV file "
                        "one character separates them. Set data.separator to that character (e.g. `;`), or "
                        "data.format to `lines` for one `text<separator>label` a line.")
    return cfg.separator


def _one_column_fix(header: Sequence[str], delimiter: str) -> str:
    """What to do when a CSV header read as one column holds another likely delimiter; '' if it does not."""
    found = [d for d in DELIMITER_NAMES if d != delimiter and len(header) == 1 and d in header[0]]
    if not found:
        return ""
    if found[0] == "\t":
        return ("That is one column whose name holds a tab: if tabs separate the columns, give the file the suffix "
                ".tsv, which is read with data.separator at its default (a tab).")
    return (f"That is one column whose name holds {DELIMITER_NAMES[found[0]]}: if it separates the columns, set "
            f"data.separator to `{found[0]}`.")


def _read_csv(cfg: DataConfig) -> _Table:
    name = cfg.path
    delimiter = _csv_delimiter(cfg)
    spelled = DELIMITER_NAMES.get(delimiter, f"`{delimiter}`")
    reader = csv.reader(io.StringIO(_decode(cfg.path, cfg.encoding), newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise DataError(f"{name} has no header line. Its first line must name the columns, e.g. "
                            "`text,label`.")
        header = [cell.strip() for cell in header]
        _check_columns(name, header, cfg, _one_column_fix(header, delimiter))
        twice = sorted(c for c in _required(cfg) if header.count(c) > 1)
        if twice:
            raise DataError(f"{name}'s header names column {', '.join(f'`{c}`' for c in twice)} more than once, so "
                            "which one to read is unclear. Rename or remove the other.")
        positions = {c: header.index(c) for c in _required(cfg)}
        table = _Table(name, "line", header, values={c: [] for c in positions})
        misshapen = f"with another number of fields than the header's {len(header)}"
        last_line = reader.line_num
        for row in reader:
            first_line, last_line = last_line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                table.refuse(first_line, misshapen, f"Put a text that contains {spelled} in double quotes.")
                continue
            table.numbers.append(first_line)
            for column, position in positions.items():
                table.values[column].append(row[position])
    except csv.Error as err:
        raise DataError(f"{name}: line {reader.line_num} is not valid CSV ({err}). Quote texts that contain "
                        f"{spelled}, quotes or line breaks.") from err
    return table


def _read_jsonl(cfg: DataConfig) -> _Table:
    name = cfg.path
    text = _decode(cfg.path, cfg.encoding)
    example = f'{{"{cfg.text_column}": "...", "{cfg.label_column}": "..."}}'
    if text.lstrip().startswith("["):  # a .json file holding one array of records
        try:
            records = json.loads(text)
        except (ValueError, RecursionError) as err:  # ValueError: JSONDecodeError, or an integer of > 4300 digits
            raise DataError(f"{name} is not valid JSON ({_short(err)}). Fix that line, or write one record a line "
                            "(JSON Lines).") from None
        table = _Table(name, "record", [], values={c: [] for c in _required(cfg)})
        numbered: Iterable[tuple[int, Any]] = enumerate(records, start=1)
    else:
        table = _Table(name, "line", [], values={c: [] for c in _required(cfg)})
        numbered = _json_lines(table, text, example)
    columns: dict[str, None] = {}
    for number, record in numbered:
        if not isinstance(record, dict):
            table.refuse(number, "that is not a JSON object", f"Each record must be an object like {example}.")
            continue
        columns.update(dict.fromkeys(record))
        table.numbers.append(number)
        for column, out in table.values.items():
            out.append(record.get(column))
    table.columns = list(columns)
    return table


def _json_lines(table: _Table, text: str, example: str) -> Iterable[tuple[int, Any]]:
    for number, line in enumerate(io.StringIO(text, newline=None), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except (ValueError, RecursionError) as err:  # nested past Python's limit, or an integer of > 4300 digits
            table.refuse(number, "that is not valid JSON", f"Each line must be one JSON object like {example} "
                                                           f"(line {number}: {_short(err)}).")


def _short(err: Exception) -> str:
    """What is wrong with a JSON text, in a few words: json's own message, or the kind of limit it passed."""
    return getattr(err, "msg", None) or str(err).split(":")[0][:200] or type(err).__name__


def _read_parquet(cfg: DataConfig) -> _Table:
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = cfg.path
    try:
        parquet = pq.ParquetFile(cfg.path)
        columns = list(parquet.schema_arrow.names)
        _check_columns(name, columns, cfg)
        table = parquet.read(columns=_required(cfg))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{name} is not a readable Parquet file ({err}). Check the file, or set its format "
                        "in data.format.") from err
    return _Table(name, "row", columns, list(range(1, table.num_rows + 1)), table.to_pydict())


def _read_hf(cfg: DataConfig) -> _Table:
    import datasets

    name = cfg.path
    if Path(cfg.path).is_dir():
        try:
            loaded = datasets.load_from_disk(cfg.path)
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{name} is a directory but not a dataset written by save_to_disk ({err}). Pass "
                            "such a directory, or a data file.") from err
    else:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise DataError(f"{name} is not a local directory, and this machine is offline (HF_HUB_OFFLINE=1), "
                            "so it cannot be fetched from the Hugging Face hub. Save it with save_to_disk on "
                            "a machine that is online and pass that directory.")
        try:
            loaded = datasets.load_dataset(cfg.path)
        except Exception as err:  # the hub raises many types; each means "cannot get this dataset"
            raise DataError(f"Cannot load the Hugging Face dataset `{name}` ({type(err).__name__}: {err}). Check "
                            "the id and the network, or pass a local file.") from err
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if "train" not in splits and len(splits) != 1:
            raise DataError(f"{name} has the splits {', '.join(splits)} and none is called `train`. Save the "
                            "one to use as a Dataset (save_to_disk) and pass that directory.")
        loaded = loaded["train" if "train" in splits else splits[0]]
    columns = list(loaded.column_names)
    _check_columns(name, columns, cfg)
    values = {}
    for column in _required(cfg):
        feature, column_values = loaded.features[column], loaded[column]
        if isinstance(feature, datasets.ClassLabel):  # integer ids with names: keep the names
            column_values = [None if v is None or v < 0 else feature.int2str(v) for v in column_values]
        values[column] = list(column_values)
    return _Table(name, "row", columns, list(range(1, loaded.num_rows + 1)), values)
