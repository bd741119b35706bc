"""The IOD validator the tests use knows every IOD the node writes, or every IOD check fails loudly."""
from __future__ import annotations

import sys

import pytest

from tests import iod


@pytest.fixture
def no_validator(tmp_path, monkeypatch):
    """No dciodvfy beside this Python, none on PATH, HILUM_DCIODVFY unset; the choice not cached."""
    monkeypatch.delenv("HILUM_DCIODVFY", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    iod.dciodvfy_executable.cache_clear()
    yield tmp_path
    iod.dciodvfy_executable.cache_clear()


def test_the_chosen_dciodvfy_knows_label_map_seg():
    assert iod._knows_label_map_seg(iod.dciodvfy_executable())


def test_no_validator_fails_loudly(no_validator):
    with pytest.raises(RuntimeError, match="no dciodvfy that knows Label Map SEG \\(none found\\)"):
        iod.assert_valid_iod(no_validator / "any.dcm")


def test_a_validator_older_than_label_map_seg_is_refused(no_validator, monkeypatch):
    # What Debian bookworm's 2022 dciodvfy answers for a Label Map Segmentation.
    old = no_validator / "dciodvfy"
    old.write_text("#!/bin/sh\necho 'Error - Information Object Not found'\n")
    old.chmod(0o755)
    monkeypatch.setenv("HILUM_DCIODVFY", str(old))
    with pytest.raises(RuntimeError, match="found only .*dciodvfy, which predates Label Map Segmentation"):
        iod.assert_valid_iod(no_validator / "any.dcm")
