"""Cost of the security features: audit appends, de-identification, and C-STORE over DICOM TLS
against plain TCP into the real SCP (spool + index, fsync'ed).

Run: .venv/bin/python bench/bench_security.py [--instances 40] [--runs 3] [--size 512]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.audit import AuditTrail, ChainedLog, verify  # noqa: E402
from node.config import load_settings  # noqa: E402
from node.deid import Deidentifier, load_profile  # noqa: E402
from node.receive.ingest import Ingest  # noqa: E402
from node.receive.scp import StoreSCP  # noqa: E402
from node.store.vault import Vault  # noqa: E402
from node.store.index import Index  # noqa: E402
from node.tls.certs import make_dev_pki  # noqa: E402


def ct(size: int, study: str, series: str, k: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "PHANTOM^CHEST", "PHANTOM-001", "19700101"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.Modality = "20250312", "101500", "ACC1", "CT"
    ds.InstitutionName, ds.StationName, ds.SeriesDescription = "Synthetic Hospital", "CT01", "Thorax"
    ds.InstanceNumber, ds.ImagePositionPatient = k + 1, [0, 0, k * 1.0]
    ds.ImageOrientationPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [0.7, 0.7]
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.random.default_rng(k).integers(-1024, 2000, (size, size), dtype=np.int16).tobytes()
    return ds


def bench_audit(n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        trail = AuditTrail(ChainedLog(Path(d) / "audit.jsonl", b"k" * 32), "HILUM")
        times = []
        for i in range(n):
            t = time.perf_counter()
            trail.association(calling_ae="CT1", called_ae="HILUM", source_ip="10.0.0.1", accepted=True)
            times.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert verify(trail.log).ok
        return statistics.median(times) * 1e3, (time.perf_counter() - t) * 1e3


def bench_deid(size: int, n: int) -> float:
    deid = Deidentifier(load_profile("basic", ["retain-longitudinal-modified-dates", "clean-descriptors"]), b"k" * 32)
    study, series = generate_uid(), generate_uid()
    sets = [ct(size, study, series, k) for k in range(n)]
    times = []
    for ds in sets:
        t = time.perf_counter()
        deid.apply(ds)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench_store(size: int, instances: int, runs: int) -> dict[str, float]:
    """Median seconds to C-STORE ``instances`` into the SCP, plain and TLS (mutual)."""
    out: dict[str, list[float]] = {"plain": [], "tls": []}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        pki = make_dev_pki(root / "pki", cn="localhost")
        import socket

        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        settings = load_settings(data_dir=root / "data", dicom_host="127.0.0.1", dicom_port=ports[0],
                                 min_free_disk_mb=0, dicom_tls={"port": ports[1], "cert": str(pki["server"]),
                                                                "key": str(pki["server_key"]), "ca": str(pki["ca"])})
        settings.data_dir.mkdir()
        index = Index(settings.data_dir / "index.db")
        ingest = Ingest(index, Vault(settings.data_dir, None, writer=True))
        scp = StoreSCP(settings, ingest)
        scp.start()
        import ssl

        ctx = ssl.create_default_context(cafile=str(pki["ca"]))
        ctx.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
        try:
            for _ in range(runs):
                for kind, port, tls in (("plain", ports[0], None), ("tls", ports[1], (ctx, "localhost"))):
                    study, series = generate_uid(), generate_uid()
                    batch = [ct(size, study, series, k) for k in range(instances)]
                    ae = AE(ae_title="BENCH")
                    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
                    t = time.perf_counter()
                    assoc = ae.associate("127.0.0.1", port, ae_title="HILUM", tls_args=tls)
                    assert assoc.is_established, kind
                    for ds in batch:
                        assert assoc.send_c_store(ds).Status == 0
                    assoc.release()
                    out[kind].append(time.perf_counter() - t)
        finally:
            scp.stop()
            ingest.close()
    return {k: statistics.median(v) for k, v in out.items()}


def bench_seal(nbytes: int, n: int = 500) -> dict[str, float]:
    """Sealing one spooled instance (node/store/envelope.py): CRC only, and AES-256-GCM + key wrap."""
    from node.store.envelope import Keyring, Sealer

    data = os.urandom(nbytes)
    out = {}
    for name, ring in (("crc", None), ("aes-gcm", Keyring.new())):
        sealer = Sealer(os.urandom(16), ring)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            sealer.seal(data, b"log:1:4096")
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) * 1e3
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--instances", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--audit-entries", type=int, default=300)
    args = p.parse_args()
    append_ms, verify_ms = bench_audit(args.audit_entries)
    deid_ms = bench_deid(args.size, 30)
    store = bench_store(args.size, args.instances, args.runs)
    seal = {n: bench_seal(n) for n in (290_000, 525_000)}
    mb = args.instances * args.size * args.size * 2 / 1e6
    print("| measure | median |")
    print("| --- | --- |")
    print(f"| audit append (fsync'ed, chained) | {append_ms:.2f} ms/entry |")
    print(f"| audit verify, {args.audit_entries} entries | {verify_ms:.1f} ms |")
    print(f"| de-identify one {args.size}x{args.size} CT instance (in memory) | {deid_ms:.2f} ms |")
    for kind in ("plain", "tls"):
        s = store[kind]
        print(f"| C-STORE {args.instances} x {args.size}x{args.size} CT, {kind} | {s:.2f} s "
              f"({args.instances / s:.0f} inst/s, {mb / s:.0f} MB/s) |")
    print(f"| TLS / plain time ratio | {store['tls'] / store['plain']:.2f} |")
    for n, t in seal.items():
        print(f"| seal one {n // 1000} KB spooled instance: CRC only / AES-256-GCM + key wrap | "
              f"{t['crc']:.3f} / {t['aes-gcm']:.3f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
