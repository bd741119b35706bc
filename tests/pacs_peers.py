"""Real peers playing the hospital PACS: a second, independent Orthanc (C-FIND/C-MOVE/C-GET SCP and
DICOMweb) and DCMTK dcmqrscp; tiny synthetic studies to fill them."""
from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.archive.orthanc import DICOMWEB_PLUGIN_DIRS
from tests.nodeproc import DCMTK_ENV, _port_open, free_port, wait_for


def tiny_study(out_dir: Path, *, patient_id: str = "P1", study_date: str = "20240101", study_time: str = "101500",
               accession: str = "", description: str = "CT CHEST", body_part: str = "CHEST",
               series: tuple[tuple[str, float, int], ...] = (("AX THIN", 1.0, 4),), rows: int = 32,
               modality: str = "CT", study_uid: str | None = None, issuer: str = "") -> "TinyStudy":
    """A small CT study: ``series`` = (description, slice thickness, slices) each. Written as files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    rng = np.random.default_rng(len(list(out_dir.iterdir())))
    st = TinyStudy(study_uid, patient_id, study_date)
    frame_uid = generate_uid()
    for n, (desc, thick, count) in enumerate(series, start=1):
        series_uid = generate_uid()
        st.series[series_uid] = []
        for i in range(count):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "PACS^TEST", patient_id, "", "O"
            if issuer:
                ds.IssuerOfPatientID = issuer
            ds.StudyDate, ds.StudyTime, ds.AccessionNumber = study_date, study_time, accession
            ds.StudyDescription, ds.SeriesDescription = description, desc
            ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", n, i + 1
            ds.Modality, ds.BodyPartExamined, ds.SliceThickness = modality, body_part, thick
            ds.ReferringPhysicianName, ds.Manufacturer = "", "Hilum phantom"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.FrameOfReferenceUID = frame_uid
            ds.PositionReferenceIndicator = ""
            ds.ImagePositionPatient = [-16.0, -16.0, float(i) * thick]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [1.0, 1.0]
            ds.Rows = ds.Columns = rows
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
            ds.PixelData = rng.integers(0, 2000, (rows, rows), dtype=np.int16).tobytes()
            path = out_dir / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            st.series[series_uid].append(ds.SOPInstanceUID)
            st.files.append(path)
    return st


@dataclass
class TinyStudy:
    study_uid: str
    patient_id: str
    study_date: str
    series: dict[str, list[str]] = field(default_factory=dict)  # series UID -> SOP instance UIDs
    files: list[Path] = field(default_factory=list)

    @property
    def sop_uids(self) -> set[str]:
        return {u for v in self.series.values() for u in v}


class PacsOrthanc:
    """A second Orthanc, independent of any node: the hospital PACS."""

    def __init__(self, root: Path, node_ae: str = "HILUM", node_port: int | None = None,
                 users: dict[str, str] | None = None, tls: dict[str, Path] | None = None,
                 lua: str | None = None) -> None:
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        self.ae_title = "PACS"
        modalities = {"hilum": [node_ae, "127.0.0.1", node_port or free_port()]}
        cfg = {
            "Name": "PACS", "StorageDirectory": str(root / "storage"), "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "DicomServerEnabled": True, "DicomAet": self.ae_title, "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False, "DicomModalities": modalities, "TcpNoDelay": True,
            "Plugins": [d for d in DICOMWEB_PLUGIN_DIRS if Path(d).is_dir()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Ssl": False},
            "StableAge": 1, "LimitFindResults": 0, "ConcurrentJobs": 2, "DicomScuTimeout": 10,
        }
        if tls:  # DICOM TLS on its DICOM port: its certificate, and the CAs whose clients it accepts
            cfg.update({"DicomTlsEnabled": True, "DicomTlsCertificate": str(tls["cert"]),
                        "DicomTlsPrivateKey": str(tls["key"]), "DicomTlsTrustedCertificates": str(tls["trusted"]),
                        "DicomTlsRemoteCertificateRequired": tls.get("client_cert_required", True)})
        root.mkdir(parents=True, exist_ok=True)
        if lua:  # e.g. a ReceivedInstanceFilter: an archive that refuses some instances
            (root / "filter.lua").write_text(lua)
            cfg["LuaScripts"] = [str(root / "filter.lua")]
        self.config_path = root / "pacs.json"
        self.config_path.write_text(json.dumps(cfg))
        self.proc: subprocess.Popen | None = None
        self.auth = next(iter(users.items())) if users else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> "PacsOrthanc":
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        log = open(self.root / "pacs.log", "ab")
        self.proc = subprocess.Popen([exe, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                     env={**DCMTK_ENV}, start_new_session=True)
        log.close()
        wait_for(lambda: self._alive(), 60, "the PACS Orthanc")
        wait_for(lambda: _port_open(self.dicom_port), 30, "the PACS Orthanc's DICOM port")
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError("PACS Orthanc exited:\n" + (self.root / "pacs.log").read_text()[-2000:])
        try:
            return httpx.get(self.url + "/system", auth=self.auth, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def upload(self, files: list[Path]) -> None:
        with httpx.Client(base_url=self.url, auth=self.auth, timeout=30) as c:
            for f in files:
                r = c.post("/instances", content=f.read_bytes())
                assert r.status_code == 200, r.text

    def set_node(self, ae: str, port: int) -> None:
        """Tell the PACS where the node's SCP is (its C-MOVE destination)."""
        with httpx.Client(base_url=self.url, auth=self.auth, timeout=30) as c:
            r = c.put("/modalities/hilum", json={"AET": ae, "Host": "127.0.0.1", "Port": port})
            assert r.status_code == 200, r.text


@contextmanager
def pacs_orthanc(root: Path, **kw):
    p = PacsOrthanc(root, **kw).start()
    try:
        yield p
    finally:
        p.stop()


@contextmanager
def dcmqrscp(root: Path, node_ae: str, node_port: int, files: list[Path]):
    """DCMTK's dcmqrscp holding ``files``, knowing the node as ``node_ae`` at ``node_port``."""
    db = root / "db"
    db.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cfg = root / "dcmqrscp.cfg"
    cfg.write_text(f"""NetworkTCPPort = {port}
MaxPDUSize = 16384
MaxAssociations = 16
HostTable BEGIN
hilum = ({node_ae}, 127.0.0.1, {node_port})
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
DCMQR {db} RW (200, 1024mb) ANY
AETable END
""")
    if files:
        subprocess.run(["dcmqridx", str(db), *map(str, files)], check=True, env=DCMTK_ENV, capture_output=True)
    proc = subprocess.Popen(["dcmqrscp", "-c", str(cfg), str(port)], env=DCMTK_ENV, cwd=root,
                            stdout=open(root / "dcmqrscp.log", "ab"), stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _port_open(port), 15, "dcmqrscp")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
