"""HTTPS for the web server: a real `hilum up` with web_tls, HSTS, no plain HTTP on the TLS port,
and plain HTTP refused at start-up on a non-loopback address."""
from __future__ import annotations

import socket
import ssl
import subprocess
import sys

import certifi
import httpx
import pytest
import yaml

from node.config import ConfigError, load_settings
from tests.nodeproc import REPO, NodeProcess, free_port


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki")
    r = subprocess.run([sys.executable, "-m", "node.cli", "cert", "self-signed", str(out), "--cn", "localhost"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    return out


class HttpsNode(NodeProcess):
    @property
    def web(self) -> str:
        return f"https://localhost:{self.config['web_port']}"


def test_https_with_hsts_and_no_plain_http_on_the_port(tmp_path, pki, monkeypatch):
    # httpx (in this test and in NodeProcess' health check) trusts the development CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.pem"))
    (tmp_path / "rules").mkdir()
    node = HttpsNode(tmp_path / "data", tmp_path / "rules", web_host="127.0.0.1",
                     web_tls={"cert": str(pki / "server.pem"), "key": str(pki / "server.key")})
    node.start(archive_up=False)
    try:
        r = node.api("GET", "/api/health")
        assert r.status_code == 200 and r.url.scheme == "https"
        assert r.headers["strict-transport-security"].startswith("max-age=")
        port = node.config["web_port"]
        with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port gets no answer
            httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses the server
            httpx.get(f"https://localhost:{port}/api/health", verify=ssl.create_default_context(cafile=certifi.where()),
                      timeout=5)
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
        ctx12 = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx12.wrap_socket(raw, server_hostname="localhost") as tls:
            name, _, _ = tls.cipher()
            assert "GCM" in name or "CHACHA20" in name  # TLS 1.2: AEAD suites only
    finally:
        node.stop()
        node._kill_orthanc()


def test_plain_http_only_on_loopback_unless_allowed(tmp_path, pki):
    for host in ("127.0.0.1", "::1", "localhost"):
        assert load_settings(web_host=host).web_tls is None
    for host in ("0.0.0.0", "10.1.2.3", "node.hospital.example"):
        with pytest.raises(ConfigError, match=rf"web_allow_plain_http: web_host {host} is not loopback"):
            load_settings(web_host=host)
    assert load_settings(web_host="0.0.0.0", web_allow_plain_http=True).web_allow_plain_http
    tls = {"cert": str(pki / "server.pem"), "key": str(pki / "server.key")}
    assert load_settings(web_host="0.0.0.0", web_tls=tls).web_tls is not None
    with pytest.raises(ConfigError, match=r"web_tls\.key: .*does not exist"):
        load_settings(web_tls={"cert": str(pki / "server.pem"), "key": str(tmp_path / "missing.key")})
    # `hilum up` refuses to start (before binding anything), naming the field.
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "d"), "web_host": "0.0.0.0",
                                   "web_port": free_port(), "rules_dir": str(tmp_path / "rules")}))
    out = subprocess.run([sys.executable, "-m", "node.cli", "up", "--config", str(cfg)], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and "web_allow_plain_http" in out.stderr
    assert not (tmp_path / "d").exists()
