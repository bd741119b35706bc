"""Shared fixtures: small phantom studies with ground truth (``node.phantom``), made once per session.

Each returns a ``node.phantom.PhantomStudy``: ``.dicom_dir``, ``.series_files()``, ``.labels``
(NIfTI label volume on the series' grid; ``.label_volume()`` reads it), ``.label_table`` (dict),
``.label("lung_left")``, ``.nodules`` (list of dicts in patient mm), ``.study_uid``, ``.series_uid``.
"""
from __future__ import annotations

import pytest

from node.phantom import PhantomStudy, generate_cr, generate_ct, generate_followup, generate_mr


@pytest.fixture(scope="session")
def phantom_ct(tmp_path_factory) -> PhantomStudy:
    """Whole chest, coarse and fast: 128x128 at 2.8 mm, 60 slices of 5 mm, four 10-20 mm nodules."""
    return generate_ct(tmp_path_factory.mktemp("phantom_ct") / "study", seed=1, rows=128, cols=128, slices=60,
                       pixel_spacing=2.8, slice_thickness=5.0, nodules=4, nodule_diameter_mm=(10.0, 20.0))


@pytest.fixture(scope="session")
def phantom_ct_followup(phantom_ct, tmp_path_factory) -> PhantomStudy:
    """A follow-up of ``phantom_ct``: moved a little, nodules grown/shrunk/vanished/stable plus one new."""
    return generate_followup(phantom_ct, tmp_path_factory.mktemp("phantom_ct_followup") / "study")


@pytest.fixture(scope="session")
def phantom_mr(tmp_path_factory) -> PhantomStudy:
    """Brain-like T1 MR, 256x256x60."""
    return generate_mr(tmp_path_factory.mktemp("phantom_mr") / "study", seed=1)


@pytest.fixture(scope="session")
def phantom_cr(tmp_path_factory) -> PhantomStudy:
    """One PA chest radiograph (CR), 1024x1024."""
    return generate_cr(tmp_path_factory.mktemp("phantom_cr") / "study", seed=1)
