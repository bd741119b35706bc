"""The `hilum` command's own tools, against real peers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom

from node.phantom import generate_ct
from tests.nodeproc import REPO, storescp


def hilum(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_send_stores_every_file_of_a_folder_to_a_real_scp(tmp_path):
    study = generate_ct(tmp_path / "ct", seed=7, rows=32, cols=32, slices=6, pixel_spacing=10, slice_thickness=10,
                        nodules=0)
    (study.dicom_dir / "README.txt").write_text("not DICOM")
    with storescp(tmp_path / "rx", ae_title="RX") as port:
        out = hilum("send", str(study.dicom_dir), "--port", str(port), "--aet", "RX")
    assert out.returncode == 1 and "sent 6, failed 1" in out.stdout  # the README is counted, not sent
    got = {str(pydicom.dcmread(p).SOPInstanceUID) for p in (tmp_path / "rx").iterdir()}
    assert got == {str(pydicom.dcmread(p).SOPInstanceUID) for p in study.series_files()}


def test_status_on_an_empty_data_dir(tmp_path):
    out = hilum("status", "--json", "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data == {"studies": [], "duplicates": 0, "quarantined": 0}


def test_invalid_config_names_the_field(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("dicom_port: 99999\n")
    out = hilum("status", "--config", str(cfg))
    assert out.returncode == 2 and "dicom_port:" in out.stderr and "Traceback" not in out.stderr


def test_rules_takes_the_config_before_or_after_its_subcommand(tmp_path):
    rules = tmp_path / "my-rules"
    rules.mkdir()
    (rules / "ct.yaml").write_text("- name: ct-overview\n  match: {Modality: CT}\n  handler: overview\n"
                                   "  destinations: [orthanc]\n")
    cfg = tmp_path / "hilum.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nrules_dir: {rules}\n")
    study = generate_ct(tmp_path / "ct", seed=8, rows=32, cols=32, slices=6, pixel_spacing=10, slice_thickness=10,
                        nodules=0)
    for args in (("rules", "validate", "--config", str(cfg)), ("rules", "--config", str(cfg), "validate")):
        out = hilum(*args)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == f"{rules}: 1 rule(s), valid"  # the config's rules, not the default ones
    out = hilum("rules", "test", str(study.dicom_dir), "--json", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "ct-overview" in out.stdout
