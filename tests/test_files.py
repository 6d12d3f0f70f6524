"""sparsesam._files: atomic writes keep the old file on failure, leave nothing behind, and clean up after a kill."""
from __future__ import annotations

import os
import stat

import pytest

from sparsesam._files import atomic_file, atomic_write
from sparsesam.model_files import write_json


class Boom(Exception):
    pass


def test_a_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "out" / "a.txt"  # the folder is made
    atomic_write(path, "first\n")
    atomic_write(path, b"second\n")
    assert path.read_text() == "second\n" and os.listdir(path.parent) == ["a.txt"]


def test_a_failed_write_keeps_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json(str(path), {"b": 1, "a": 2})
    before = path.read_bytes()
    with pytest.raises(Boom):
        with atomic_file(path, "w") as f:
            f.write('{"half": ')
            raise Boom()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["a.json"]


def test_permissions_follow_the_umask_like_open(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.bin", b"x")
        with open(tmp_path / "b.bin", "wb") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)
    assert mode("a.bin") == mode("b.bin") == 0o640


def test_leftovers_of_a_killed_write_are_removed_by_the_next_write(tmp_path):
    (tmp_path / ".a.json.1a2b3c.tmp").write_text("half a file")
    (tmp_path / ".other.json.1a2b3c.tmp").write_text("another file's, kept")
    atomic_write(tmp_path / "a.json", "{}\n")
    assert sorted(os.listdir(tmp_path)) == [".other.json.1a2b3c.tmp", "a.json"]


def test_json_keys_sorted_only_when_asked(tmp_path):
    write_json(str(tmp_path / "report.json"), {"b": 1, "a": {"d": 2, "c": 3}})
    write_json(str(tmp_path / "model.json"), {"b": 1, "a": {"d": 2, "c": 3}}, sort_keys=True)
    assert (tmp_path / "report.json").read_text().index('"b"') < (tmp_path / "report.json").read_text().index('"a"')
    assert (tmp_path / "model.json").read_text() == '{\n  "a": {\n    "c": 3,\n    "d": 2\n  },\n  "b": 1\n}\n'


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="data"):
        atomic_write(tmp_path / "a", 3)
    with pytest.raises(ValueError, match="mode"):
        with atomic_file(tmp_path / "a", "a"):
            pass
