"""Start-up checks that turn run-time failures into configuration errors."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from node.config import ConfigError, load_settings
from node.handler_api import Handler
from node.runtime import check_sr_templates

REPO = Path(__file__).resolve().parents[1]


class _Reporter(Handler):
    name = "test-reporter"
    version = "0"
    sr_template = "ct-anatomy"
    reports_findings = frozenset({"lung_left"})
    reports_measurements = frozenset({"volume"})


def test_shipped_templates_cover_every_registered_handler():
    check_sr_templates()


def test_missing_template_entry_is_a_startup_error(tmp_path):
    shutil.copy(REPO / "sr_templates" / "ct-anatomy.yaml", tmp_path / "ct-anatomy.yaml")
    check_sr_templates([_Reporter], tmp_path)  # complete: passes

    class Greedy(_Reporter):
        reports_measurements = frozenset({"volume", "sphericity"})

    with pytest.raises(ValueError, match="no measurements.'sphericity'.*test-reporter"):
        check_sr_templates([Greedy], tmp_path)

    class Elsewhere(_Reporter):
        sr_template = "nowhere"

    with pytest.raises(ValueError, match="'nowhere' not found"):
        check_sr_templates([Elsewhere], tmp_path)


@pytest.mark.parametrize("override, field", [
    ({"dicom_port": 70000}, "dicom_port"),
    ({"ae_title": "WAY_TOO_LONG_AE_TITLE"}, "ae_title"),
    ({"destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 0}}}, "destinations.tps.port"),
    ({"allowed_callers": [{"ae_title": "CT1", "host": "not-an-ip"}]}, "allowed_callers.0.host"),
    ({"stable_after": -1}, "stable_after"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_settings(**override)
    assert f"{field}:" in str(err.value)


def test_config_from_environment_and_file(tmp_path, monkeypatch):
    cfg = tmp_path / "h.yaml"
    cfg.write_text("ae_title: FROMFILE\ndicom_port: 11200\n")
    monkeypatch.setenv("HILUM_DICOM_PORT", "11300")
    monkeypatch.setenv("HILUM_STORE_ORIGINALS_IN_ORTHANC", "false")
    s = load_settings(cfg)
    assert (s.ae_title, s.dicom_port, s.store_originals_in_orthanc) == ("FROMFILE", 11300, False)
    assert load_settings(cfg, dicom_port=11400).dicom_port == 11400  # CLI beats environment


def test_a_start_that_fails_says_why_and_shuts_down_cleanly(tmp_path):
    """The managed archive's port is taken, so the start fails before the later stages start: `hilum up`
    exits 1 naming the cause, and its shutdown does not trip over the stages it never started."""
    import socket
    import subprocess
    import sys

    import yaml

    from tests.nodeproc import REPO, free_port

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = {"data_dir": str(tmp_path / "data"), "rules_dir": str(REPO / "rules"), "dicom_host": "127.0.0.1",
               "dicom_port": free_port(), "web_port": free_port(), "orthanc_http_port": taken.getsockname()[1],
               "orthanc_dicom_port": free_port(), "min_free_disk_mb": 0,
               "destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": free_port()}}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "node.cli", "up", "--config", str(tmp_path / "c.yaml")],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1
    assert "cannot start" in r.stderr and "Orthanc" in r.stderr
    assert "Traceback" not in r.stderr and "cannot join thread" not in r.stderr
