"""data.separator splits a CSV file's columns, a .tsv file is read with tabs between them, a header
read as one column says which separator it seems to hold, and a `lines` file's header is no record."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedtune.cli import cli
from fedtune.config import DataConfig
from fedtune.data.federated import encode_labels, label_names
from fedtune.data.loaders import infer_format, load_labeled_texts
from fedtune.errors import DataError


def load(path: Path, **options):
    return load_labeled_texts(DataConfig(path=str(path), **options))


def test_csv_columns_are_split_on_data_separator(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text('text;label\nthe cat sat;pets\n"rates rose; stocks fell";money\n')
    got = load(path, separator=";")
    assert (got.texts, got.labels, got.numbers) == (("the cat sat", "rates rose; stocks fell"), ("pets", "money"),
                                                    (2, 3))
    path.write_text("text;label\nfine;a\nnot; quoted;b\n")
    with pytest.raises(DataError, match=r"line 3\).*contains `;` in double quotes"):
        load(path, separator=";")


def test_a_tsv_file_is_read_with_tabs_between_columns(tmp_path):
    path = tmp_path / "tabs.TSV"
    path.write_text("label\ttext\npets\tthe cat, the dog\nmoney\trates rose\n")
    assert infer_format(str(path)) == "csv"
    got = load(path)
    assert (got.texts, got.labels) == (("the cat, the dog", "rates rose"), ("pets", "money"))


@pytest.mark.parametrize("header, says", [
    ("text;label", "holds `;`: if it separates the columns, set data.separator to `;`"),
    ("text|label", "holds `|`: if it separates the columns, set data.separator to `|`"),
    ("text\tlabel", "holds a tab: if tabs separate the columns, give the file the suffix .tsv"),
])
def test_a_header_read_as_one_column_names_the_separator_it_holds(tmp_path, header, says):
    path = tmp_path / "d.csv"
    path.write_text(f"{header}\n{header.replace('text', 'x').replace('label', 'a')}\n")
    with pytest.raises(DataError, match=r"d\.csv has no column `text`") as err:
        load(path)
    assert says in str(err.value) and "data.text_column" not in str(err.value)


def test_a_comma_file_read_with_another_separator_suggests_the_comma(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nx,a\n")
    with pytest.raises(DataError, match="holds a comma: if it separates the columns, set data.separator to `,`"):
        load(path, separator=";")


def test_a_separator_longer_than_one_character_is_refused_for_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nx,a\n")
    with pytest.raises(DataError, match=r"data\.separator '@@' cannot split the columns of .*d\.csv.*data\.format"):
        load(path, separator="@@")


def test_cli_names_the_separator_flag_for_a_semicolon_csv(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("text;label\nx;a\ny;b\n")
    result = CliRunner().invoke(cli, ["simulate", "--data", str(path), "--out", str(tmp_path / "never")])
    message = " ".join((result.stderr or result.output).split())
    assert result.exit_code == 2, message
    assert "set data.separator (--separator) to `;`" in message
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("separator", ["@", "\t"])
def test_a_lines_header_is_not_a_record(tmp_path, separator):
    path = tmp_path / "phrases.txt"
    rows = ["text", "label"], ["profits up", "pos"], ["sales fell", "neg"], ["text", "label"]
    path.write_text("\n" + "".join(f"{t}{separator}{y}\n" for t, y in rows))
    got = load(path, separator=separator)
    assert got.labels == ("pos", "neg", "label")  # only a first line is a header
    assert got.numbers == (3, 4, 5)
    path.write_text("".join(f"{t}{separator}{y}\n" for t, y in rows[:3]))
    data = DataConfig(path=str(path), separator=separator)
    assert label_names(data) == ("neg", "pos")
    assert encode_labels(load(path, separator=separator), ("neg", "pos")) == [1, 0]
    renamed = tmp_path / "renamed.txt"
    renamed.write_text(f"sentence {separator} sentiment\nprofits up{separator}pos\n")
    assert load(renamed, separator=separator, text_column="sentence", label_column="sentiment").labels == ("pos",)
    (tmp_path / "header_only.txt").write_text(f"text{separator}label\n")
    with pytest.raises(DataError, match="has no records"):
        load(tmp_path / "header_only.txt", separator=separator)
