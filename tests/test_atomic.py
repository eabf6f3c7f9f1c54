"""Writes are atomic: a failure midway leaves the previous file whole and no temporary behind."""

import os

import pytest

from lora_ext import atomic


def test_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "result.json"
    atomic.write_json(target, {"a": 1})
    atomic.write_json(target, {"a": 2})
    assert target.read_text() == '{"a": 2}'
    assert os.listdir(tmp_path) == ["result.json"]


def test_a_failure_midway_leaves_the_previous_version(tmp_path):
    target = tmp_path / "bench.txt"
    atomic.write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.atomic_path(target) as tmp, open(tmp, "w") as f:
            f.write("half of the new")
            raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["bench.txt"]


def test_an_unserializable_object_leaves_nothing_behind(tmp_path):
    target = tmp_path / "new.json"
    with pytest.raises(TypeError):
        atomic.write_json(target, {"a": object()})
    assert os.listdir(tmp_path) == []
