"""Synthetic phantom studies with ground truth: chest CT (baseline and follow-up), brain MR, chest CR.

No patient data can be used here, so the project makes its own studies; because it makes them it
knows the truth (every organ's voxels, every nodule's centre and size), which is what lets tests
measure accuracy. ``node.phantom.study`` describes the files of a study; ``cli`` is
``hilum phantom OUT_DIR [options]``.
"""
from node.phantom.cli import cli
from node.phantom.cr import generate_cr
from node.phantom.ct import CTOptions, generate_ct, generate_followup
from node.phantom.family import generate_family_case
from node.phantom.mr import generate_mr
from node.phantom.study import PhantomStudy

__all__ = ["CTOptions", "PhantomStudy", "cli", "generate_cr", "generate_ct", "generate_family_case",
           "generate_followup", "generate_mr"]
