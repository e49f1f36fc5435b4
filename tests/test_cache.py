"""fedtune's rebuildable cache: computed once, read back by any later call with the same key."""

from __future__ import annotations

import pytest

from fedtune.cache import CACHE_ENV, cache_root, cached_json


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def counting(value):
    calls = []

    def compute():
        calls.append(1)
        return value

    return compute, calls


def test_a_key_is_computed_once_then_read_back(cache):
    compute, calls = counting([[3, 1], [2]])
    assert cached_json("parts", {"seed": 0}, compute) == [[3, 1], [2]]
    assert cached_json("parts", {"seed": 0}, compute) == [[3, 1], [2]]
    assert len(calls) == 1
    assert len(list((cache / "parts").iterdir())) == 1


def test_another_key_is_computed_anew(cache):
    first, _ = counting("a")
    second, calls = counting("b")
    cached_json("parts", {"seed": 0}, first)
    assert cached_json("parts", {"seed": 1}, second) == "b"
    assert len(calls) == 1


def test_an_unreadable_entry_is_rebuilt(cache):
    compute, calls = counting([1, 2])
    cached_json("parts", "k", compute)
    (entry,) = (cache / "parts").iterdir()
    entry.write_text('[1, 2')  # cut short by hand
    assert cached_json("parts", "k", compute) == [1, 2]
    assert len(calls) == 2
    assert entry.read_text() == "[1,2]"


def test_an_unwritable_cache_still_returns_the_value(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(CACHE_ENV, str(blocker / "cache"))
    compute, calls = counting({"x": 1})
    assert cached_json("parts", "k", compute) == {"x": 1}
    assert cached_json("parts", "k", compute) == {"x": 1}
    assert len(calls) == 2


def test_cache_root_follows_xdg_without_the_fedtune_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_root() == tmp_path / "fedtune"
