"""``hilum cert self-signed OUT_DIR``: a development CA with a server and a client certificate.

For trying DICOM TLS and HTTPS on a test bench, not for production (use the hospital's PKI).
ECDSA P-256 keys (fast, and every TLS 1.2+ peer including DCMTK speaks them). The server
certificate names ``--cn``, localhost, 127.0.0.1 and ::1, and is valid for client use too, so a
node can present it to destinations that require a client certificate.
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # the longest validity browsers accept for a server certificate


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Hilum development"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(subject: str, key, issuer: x509.Name, issuer_key, *, ca: bool, usages: list,
           sans: list[x509.GeneralName] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=VALID_DAYS))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_agreement=True, key_cert_sign=False,
                                          crl_sign=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, encipher_only=False, decipher_only=False),
                            critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def make_dev_pki(out_dir: Path, cn: str = "hilum", client_cn: str = "hilum-client") -> dict[str, Path]:
    """Write ca.pem/ca.key, server.pem/server.key, client.pem/client.key; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{cn} development CA")
    ca = _issue(f"{cn} development CA", ca_key, ca_name, ca_key, ca=True, usages=[])  # self-signed
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(cn), x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]
    if cn == "localhost":
        sans = sans[1:]
    server = _issue(cn, server_key, ca.subject, ca_key, ca=False, sans=sans,
                    usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _issue(client_cn, client_key, ca.subject, ca_key, ca=False, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    paths = {}
    for name, cert, key in (("ca", ca, ca_key), ("server", server, server_key), ("client", client, client_key)):
        paths[name] = out_dir / f"{name}.pem"
        paths[f"{name}_key"] = out_dir / f"{name}.key"
        _write_cert(paths[name], cert)
        _write_key(paths[f"{name}_key"], key)
    return paths


def issue_client_cert(ca_dir: Path, cn: str, out_dir: Path) -> tuple[Path, Path]:
    """One more client certificate from the development CA in ``ca_dir`` (e.g. one per modality)."""
    ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue(cn, key, ca.subject, ca_key, ca=False, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{cn}.pem", out_dir / f"{cn}.key"
    _write_cert(cert_path, cert)
    _write_key(key_path, key)
    return cert_path, key_path


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hilum cert", description="development certificates")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("self-signed", help="a development CA, a server and a client certificate (PEM)")
    s.add_argument("out_dir", type=Path)
    s.add_argument("--cn", default="hilum", help="server name (also in the certificate's DNS names)")
    s.add_argument("--client-cn", dest="client_cn", default="hilum-client", help="client certificate CN")
    c = sub.add_parser("client", help="one more client certificate from a development CA made by self-signed")
    c.add_argument("ca_dir", type=Path, help="the OUT_DIR of `hilum cert self-signed`")
    c.add_argument("--cn", required=True, help="client certificate CN (what bind_ae_to_cert names)")
    c.add_argument("--out", type=Path, help="output folder (default: CA_DIR)")
    args = p.parse_args(argv)
    if args.cmd == "client":
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", args.cn):
            p.error("--cn: letters, digits, '.', '_' or '-' (it names the output files)")
        for path in issue_client_cert(args.ca_dir, args.cn, args.out or args.ca_dir):
            print(path)
        return 0
    paths = make_dev_pki(args.out_dir, args.cn, args.client_cn)
    for name, path in paths.items():
        print(f"{name:<11} {path}")
    print("development certificates only: the CA key can sign anything; keep it off production hosts",
          file=sys.stderr)
    return 0
