"""DICOM TLS: the SCP's TLS port with DCMTK storescu and pynetdicom as peers, client-certificate
checks and AE binding, and C-STORE destinations delivering to DCMTK storescp over TLS."""
from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from cryptography import x509
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from node.audit import AuditTrail, ChainedLog, search
from node.config import ConfigError, DimseDestination, load_settings
from node.deliver.destinations import DeliveryError, DimseStoreDestination, Item, build_destinations
from node.receive.ingest import Ingest
from node.receive.scp import StoreSCP
from node.store.vault import Vault
from node.store.index import Index
from node.tls import server_context
from tests.nodeproc import DCMTK_ENV, FlushedIndex, REPO, free_port, wait_for
from tests.test_receive import make_ct


def _cert(pki: Path, *args: str) -> dict[str, Path]:
    out = subprocess.run([sys.executable, "-m", "node.cli", "cert", "self-signed", str(pki), *args],
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    return {n: pki / f"{n}.pem" for n in ("ca", "server", "client")} | {
        f"{n}_key": pki / f"{n}.key" for n in ("ca", "server", "client")}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    return {"site": _cert(root / "site", "--cn", "localhost", "--client-cn", "ct1-scanner"),
            "other": _cert(root / "other", "--cn", "localhost")}


def test_self_signed_pki_is_valid_and_private(pki):
    p = pki["site"]
    ca = x509.load_pem_x509_certificate(p["ca"].read_bytes())
    for name in ("server", "client"):
        cert = x509.load_pem_x509_certificate(p[name].read_bytes())
        cert.verify_directly_issued_by(ca)
        assert oct(os.stat(p[f"{name}_key"]).st_mode & 0o777) == "0o600"
    server = x509.load_pem_x509_certificate(p["server"].read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in {str(a) for a in sans.get_values_for_type(x509.IPAddress)}
    client = x509.load_pem_x509_certificate(p["client"].read_bytes())
    assert client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "ct1-scanner"
    other_ca = x509.load_pem_x509_certificate(pki["other"]["ca"].read_bytes())
    with pytest.raises(Exception):
        client.verify_directly_issued_by(other_ca)


@pytest.fixture
def tls_scp(tmp_path, pki):
    started = []

    def start(**tls_overrides):
        p = pki["site"]
        tls = {"port": free_port(), "cert": str(p["server"]), "key": str(p["server_key"]), "ca": str(p["ca"]),
               **tls_overrides}
        data = tmp_path / f"d{len(started)}"
        data.mkdir()
        settings = load_settings(data_dir=data, dicom_host="127.0.0.1", dicom_port=free_port(), min_free_disk_mb=0,
                                 dicom_tls=tls)
        index = Index(data / "index.db")
        ingest = Ingest(index, Vault(data, None, writer=True))
        trail = AuditTrail(ChainedLog(data / "audit.jsonl", b"k" * 32), "HILUM")
        scp = StoreSCP(settings, ingest, trail)
        scp.start()
        started.append((scp, ingest))
        return settings, FlushedIndex(index, ingest), trail

    yield start
    for scp, ingest in started:
        scp.stop()
        ingest.close()


def _storescu(port: int, f: Path, tls: list[str], calling: str = "CT1") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", calling, "-aec", "HILUM", *tls, "127.0.0.1", str(port), str(f)],
                          env=DCMTK_ENV, capture_output=True, text=True, timeout=60)


def _dcmtk_tls(p: dict[str, Path], trust: Path) -> list[str]:
    return ["+tls", str(p["client_key"]), str(p["client"]), "+cf", str(trust)]


def test_storescu_with_a_valid_client_certificate_stores(tls_scp, pki, tmp_path):
    settings, index, trail = tls_scp()
    f = tmp_path / "a.dcm"
    ds = make_ct(f)
    out = _storescu(settings.dicom_tls.port, f, _dcmtk_tls(pki["site"], pki["site"]["ca"]))
    assert out.returncode == 0, out.stderr
    assert index.has_instance(ds.SOPInstanceUID)
    (entry,) = search(trail.log.entries(), event="association")
    assert entry["tls_identity"] == "ct1-scanner" and entry["detail"]["tls"] is True and entry["outcome"] == 0


def test_wrong_missing_or_no_tls_client_is_refused(tls_scp, pki, tmp_path):
    settings, index, _ = tls_scp()
    f = tmp_path / "a.dcm"
    make_ct(f)
    port = settings.dicom_tls.port
    site, other = pki["site"], pki["other"]
    wrong = _storescu(port, f, _dcmtk_tls(other, site["ca"]))  # client cert from another CA
    anonymous = _storescu(port, f, ["+tla", "+cf", str(site["ca"])])  # TLS without a client certificate
    plain = _storescu(port, f, [])  # no TLS at all on the TLS port
    untrusted_server = _storescu(port, f, _dcmtk_tls(site, other["ca"]))  # client does not trust the node
    for out in (wrong, anonymous, plain, untrusted_server):
        assert out.returncode != 0 and "Association Request Failed" in out.stderr
    assert index.count_studies() == 0
    # The plain port still works alongside (it is enabled by default).
    assert _storescu(settings.dicom_port, f, []).returncode == 0 and index.count_studies() == 1


def _pynetdicom_store(port: int, ds, ctx: ssl.SSLContext | None, calling: str = "PYSCU"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="HILUM", tls_args=(ctx, "localhost") if ctx else None)
    if not assoc.is_established:
        return None, None
    try:
        sock = assoc.dul.socket.socket
        return assoc.send_c_store(ds).Status, (sock.version(), sock.cipher()[0])
    finally:
        assoc.release()


def _client_ctx(trust: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(trust))
    if cert:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_pynetdicom_client_certificates_and_negotiated_protocol(tls_scp, pki):
    settings, index, _ = tls_scp()
    port = settings.dicom_tls.port
    site, other = pki["site"], pki["other"]
    ds = make_ct(None)
    status, (version, cipher) = _pynetdicom_store(port, ds, _client_ctx(site["ca"], site["client"], site["client_key"]))
    assert status == 0 and index.has_instance(ds.SOPInstanceUID)
    assert version in ("TLSv1.2", "TLSv1.3") and ("GCM" in cipher or "CHACHA20" in cipher)
    assert _pynetdicom_store(port, make_ct(None), _client_ctx(site["ca"]))[0] is None  # no client certificate
    assert _pynetdicom_store(port, make_ct(None), _client_ctx(site["ca"], other["client"], other["client_key"]))[0] is None
    old = _client_ctx(site["ca"], site["client"], site["client_key"])
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    assert _pynetdicom_store(port, make_ct(None), old)[0] is None
    assert index.count_studies() == 1


def test_server_context_is_tls12_plus_with_forward_secret_aead_only(pki):
    p = pki["site"]
    ctx = server_context(load_settings(dicom_tls={"port": 2762, "cert": str(p["server"]), "key": str(p["server_key"]),
                                                  "ca": str(p["ca"])}).dicom_tls)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.verify_mode == ssl.CERT_REQUIRED
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(("GCM" in c["name"] or "CHACHA20" in c["name"]) and c["kea"] in ("kx-ecdhe", "kx-dhe")
                         for c in tls12)


def test_optional_client_certificate(tls_scp, pki):
    settings, index, trail = tls_scp(require_client_cert=False)
    site = pki["site"]
    assert _pynetdicom_store(settings.dicom_tls.port, make_ct(None), _client_ctx(site["ca"]))[0] == 0
    (entry,) = search(trail.log.entries(), event="association")
    assert entry["detail"]["tls"] is True and "tls_identity" not in entry


def test_calling_ae_bound_to_its_certificate(tls_scp, pki, tmp_path):
    settings, index, trail = tls_scp(bind_ae_to_cert={"CT1": "ct1-scanner"})
    f = tmp_path / "a.dcm"
    make_ct(f)
    site, other = pki["site"], pki["other"]
    tls_port = settings.dicom_tls.port
    ok = _storescu(tls_port, f, _dcmtk_tls(site, site["ca"]), calling="CT1")
    assert ok.returncode == 0, ok.stderr
    as_other_ae = _storescu(tls_port, f, _dcmtk_tls(site, site["ca"]), calling="MR7")  # CT1's certificate as MR7
    assert as_other_ae.returncode != 0 and "Calling AE Title Not Recognized" in as_other_ae.stderr
    plain = _storescu(settings.dicom_port, f, [], calling="CT1")  # CT1 without its certificate
    assert plain.returncode != 0 and "Calling AE Title Not Recognized" in plain.stderr
    reasons = [e.get("outcome_description") for e in search(trail.log.entries(), event="association")]
    assert reasons[0] == "calling AE 'CT1' is bound to a client certificate: it must use the TLS port"
    assert reasons[1] == "client certificate 'ct1-scanner' may only call as CT1, not 'MR7'"
    # A valid certificate of the same CA, but for another CN, cannot act as CT1.
    out = subprocess.run([sys.executable, "-m", "node.cli", "cert", "client", str(site["ca"].parent), "--cn", "mr7",
                          "--out", str(tmp_path / "mr7")], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    mr7 = {"client": tmp_path / "mr7" / "mr7.pem", "client_key": tmp_path / "mr7" / "mr7.key"}
    as_ct1 = _storescu(tls_port, f, _dcmtk_tls(mr7, site["ca"]), calling="CT1")
    assert as_ct1.returncode != 0 and "Calling AE Title Not Recognized" in as_ct1.stderr
    assert _storescu(tls_port, f, _dcmtk_tls(mr7, site["ca"]), calling="MR7").returncode == 0  # unbound AE: fine
    assert search(trail.log.entries(), event="association")[1]["outcome_description"] == (
        "calling AE 'CT1' needs a client certificate for 'ct1-scanner', got 'mr7'")


def test_plain_port_can_be_disabled(tmp_path, pki):
    p = pki["site"]
    tls = {"port": free_port(), "cert": str(p["server"]), "key": str(p["server_key"]), "ca": str(p["ca"])}
    settings = load_settings(data_dir=tmp_path, dicom_host="127.0.0.1", dicom_port=free_port(), min_free_disk_mb=0,
                             dicom_tls=tls, dicom_plain_enabled=False)
    index = Index(tmp_path / "index.db")
    ingest = Ingest(index, Vault(tmp_path, None, writer=True))
    scp = StoreSCP(settings, ingest)
    scp.start()
    try:
        f = tmp_path / "a.dcm"
        make_ct(f)
        assert _storescu(settings.dicom_port, f, []).returncode != 0
        assert _storescu(settings.dicom_tls.port, f, _dcmtk_tls(p, p["ca"])).returncode == 0
    finally:
        scp.stop()
        ingest.close()


def test_tls_configuration_errors_name_the_field(tmp_path, pki):
    p = pki["site"]
    with pytest.raises(ConfigError, match=r"dicom_tls\.cert: .*does not exist"):
        load_settings(dicom_tls={"port": 2762, "cert": str(tmp_path / "nope.pem"), "key": str(p["server_key"]),
                                 "ca": str(p["ca"])})
    with pytest.raises(ConfigError, match=r"dicom_tls: .*ca: a client CA bundle is needed"):
        load_settings(dicom_tls={"port": 2762, "cert": str(p["server"]), "key": str(p["server_key"])})
    with pytest.raises(ConfigError, match="dicom_plain_enabled"):
        load_settings(dicom_plain_enabled=False)
    with pytest.raises(ConfigError, match=r"dicom_tls\.port"):
        load_settings(dicom_port=2762, dicom_tls={"port": 2762, "cert": str(p["server"]), "key": str(p["server_key"]),
                                                  "ca": str(p["ca"])})
    with pytest.raises(ConfigError, match=r"destinations\.tps\.tls: .*cert and key"):
        load_settings(destinations={"tps": {"ae_title": "TPS", "host": "h", "port": 104,
                                            "tls": {"ca": str(p["ca"]), "cert": str(p["client"])}}})
    # A key that does not belong to the certificate: refused when the destination is built.
    cfg = load_settings(destinations={"tps": {"ae_title": "TPS", "host": "h", "port": 104, "tls": {
        "ca": str(p["ca"]), "cert": str(p["client"]), "key": str(pki["other"]["client_key"])}}})
    with pytest.raises(ValueError, match=r"destinations\.tps\.tls\.cert/tls\.key: cannot load"):
        build_destinations(None, cfg.destinations, "HILUM")


@contextmanager
def tls_storescp(out_dir: Path, p: dict[str, Path], ae_title: str = "TPS"):
    """DCMTK storescp over TLS, requiring a client certificate from the CA in ``p``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen([shutil.which("storescp"), "-aet", ae_title, "-od", str(out_dir), "+tls",
                             str(p["server_key"]), str(p["server"]), "+cf", str(p["ca"]), "-rc", str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        import socket

        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10, "storescp +tls")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _destination(port: int, tls: dict) -> DimseStoreDestination:
    cfg = DimseDestination(ae_title="TPS", host="localhost", port=port, tls=tls)
    return DimseStoreDestination(cfg, "HILUM")


def test_tls_destination_delivers_to_dcmtk_storescp(tmp_path, pki):
    f = tmp_path / "r.dcm"
    ds = make_ct(f)
    site, other = pki["site"], pki["other"]
    with tls_storescp(tmp_path / "tps", site) as port:
        good = _destination(port, {"ca": site["ca"], "cert": site["client"], "key": site["client_key"]})
        assert good.send([Item(ds.SOPInstanceUID, str(f), "result")]) == {ds.SOPInstanceUID}
        no_client_cert = _destination(port, {"ca": site["ca"]})
        with pytest.raises(DeliveryError, match="association"):
            no_client_cert.send([Item(ds.SOPInstanceUID, str(f), "result")])
        untrusted = _destination(port, {"ca": other["ca"], "cert": other["client"], "key": other["client_key"]})
        with pytest.raises(DeliveryError, match="association"):
            untrusted.send([Item(ds.SOPInstanceUID, str(f), "result")])
        wrong_host = DimseStoreDestination(DimseDestination(ae_title="TPS", host="127.0.0.2", port=port, tls={
            "ca": site["ca"], "cert": site["client"], "key": site["client_key"]}), "HILUM")
        with pytest.raises(DeliveryError, match="association"):  # certificate does not name 127.0.0.2
            wrong_host.send([Item(ds.SOPInstanceUID, str(f), "result")])
    received = list((tmp_path / "tps").iterdir())
    assert len(received) == 1 and pydicom.dcmread(received[0]).SOPInstanceUID == ds.SOPInstanceUID
