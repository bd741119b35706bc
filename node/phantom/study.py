"""A generated phantom study on disk: DICOM folder plus ground truth, described by ``phantom.json``.

Layout of OUT_DIR::

    dicom/          Part 10 files (names are hashes: sort by geometry, not by name)
    labels.nii.gz   truth label volume on the image series' voxel grid (CT, MR): the anatomy at
                    each voxel centre, in the order load_series sorts the slices
    labels.json     label table: value, name, intended HU (or MR signal), groups, sides
    nodules.json    list of nodules in this study's patient coordinates (CT)
    changes.json    follow-up only: transform from the baseline and each nodule's change
    phantom.json    manifest: options, UIDs, geometry, pose, files per series
"""
from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from node.volume import Geometry

MANIFEST = "phantom.json"


@dataclass(frozen=True)
class PhantomStudy:
    root: Path
    modality: str
    dicom_dir: Path
    manifest_path: Path
    patient_id: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str | None
    labels: Path | None = None  # label volume (NIfTI), same voxel grid as the image series
    label_table_path: Path | None = None
    nodules_path: Path | None = None
    changes_path: Path | None = None
    localizer_series_uid: str | None = None

    @classmethod
    def open(cls, root: str | Path) -> "PhantomStudy":
        """The study a previous ``generate_*`` call wrote to ``root``."""
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{root} holds no phantom study ({MANIFEST} missing)")
        m = json.loads(path.read_text())
        files = m["files"]

        def opt(key: str) -> Path | None:
            return root / files[key] if files.get(key) else None

        return cls(
            root=root, modality=m["modality"], dicom_dir=root / files["dicom"], manifest_path=path,
            patient_id=m["patient"]["id"], study_uid=m["study_uid"], series_uid=m["series_uid"],
            frame_of_reference_uid=m.get("frame_of_reference_uid"), labels=opt("labels"),
            label_table_path=opt("label_table"), nodules_path=opt("nodules"), changes_path=opt("changes"),
            localizer_series_uid=m.get("localizer_series_uid"),
        )

    @property
    def manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    @property
    def label_table(self) -> dict:
        return json.loads(self.label_table_path.read_text()) if self.label_table_path else {}

    @property
    def nodules(self) -> list[dict]:
        return json.loads(self.nodules_path.read_text()) if self.nodules_path else []

    @property
    def changes(self) -> dict | None:
        return json.loads(self.changes_path.read_text()) if self.changes_path else None

    @property
    def geometry(self) -> Geometry:
        """Voxel grid of the image series (CT, MR); a CR is one projection and has none."""
        g = self.manifest.get("geometry")
        if g is None:
            raise ValueError(f"{self.modality} phantom at {self.root} is not a volume")
        return Geometry(shape=tuple(g["shape"]), origin=tuple(g["origin"]), spacing=tuple(g["spacing"]),
                        direction=tuple(g["direction"]))

    def series_files(self, series_uid: str | None = None) -> list[Path]:
        """Files of the image series (default) or of ``series_uid``, in no particular order."""
        names = self.manifest["series"][series_uid or self.series_uid]
        return [self.dicom_dir / n for n in names]

    def label(self, name: str) -> int:
        """Value of the label called ``name`` (e.g. "lung_left")."""
        for entry in self.label_table["labels"]:
            if entry["name"] == name:
                return int(entry["value"])
        raise KeyError(f"no label named {name!r} in {self.label_table_path}")

    def label_volume(self) -> tuple[np.ndarray, Geometry]:
        """Truth labels as a (slices, rows, cols) array on the image series' grid."""
        import SimpleITK as sitk

        if self.labels is None:
            raise ValueError(f"{self.modality} phantom at {self.root} has no label volume")
        img = sitk.ReadImage(str(self.labels))
        arr = sitk.GetArrayFromImage(img)
        geom = Geometry(shape=arr.shape, origin=img.GetOrigin(), spacing=img.GetSpacing(),
                        direction=img.GetDirection())
        return arr, geom


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def write_labels(path: Path, labels: np.ndarray, geom: Geometry) -> None:
    """NIfTI via SimpleITK (it converts LPS to the file's RAS), gzipped by zlib, which frees the GIL.

    The gzip header's time stamp is zero so that the same phantom gives the same bytes.
    """
    import SimpleITK as sitk

    plain = path.with_name(path.name.removesuffix(".gz"))
    sitk.WriteImage(geom.to_sitk(labels), str(plain))
    with open(plain, "rb") as src, open(path, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", compresslevel=1, fileobj=raw, mtime=0) as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    plain.unlink()


def geometry_json(geom: Geometry) -> dict:
    return {"shape": list(geom.shape), "origin": list(geom.origin), "spacing": list(geom.spacing),
            "direction": list(geom.direction)}


def prepare_out_dir(out_dir: str | Path) -> Path:
    """A new or empty folder: a phantom never mixes with older files."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out_dir {out} exists and is not an empty folder; choose a new one")
    (out / "dicom").mkdir(parents=True, exist_ok=True)
    return out
