"""Shadow mode: a candidate version runs beside the active one on the same inputs, and is compared.

When a rule names ``model:<name>`` and the registry has versions of it in ``shadow`` state, routing
creates, next to the normal job, one *shadow job* per such version (``shadow_job_options``): the
version is pinned in its options and it has no destinations, so its results stay on the node and
are never delivered. Both jobs keep their label map (``save_labels``: sealed like every result file,
``labels.npz`` in the job's results folder). When the second of the pair finishes, the executor
calls ``record_agreement``: Dice per label and volume differences between the two versions' outputs,
appended to the registry's agreement log, which the API summarises (``agreement_summary``) so that
promoting a version is a decision made on evidence.
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np

from node.models.versions import ModelRegistry
from node.results import LabelMap

__all__ = ["LABELS_FILE", "shadow_job_options", "save_labels", "load_labels", "compare_labels",
           "record_agreement", "agreement_summary", "ran_version"]

log = logging.getLogger("hilum.models.shadow")
LABELS_FILE = "labels.npz"
MODEL_PREFIX = "model:"


def shadow_job_options(registry: ModelRegistry, handler: str, options: dict, active_key: str) -> list[tuple[str, dict]]:
    """(shadow version, its job options) for every shadow version of ``handler``'s model; empty otherwise."""
    if not handler.startswith(MODEL_PREFIX):
        return []
    return [(v, {**options, "model_version": v, "shadow_of": active_key, "keep_labels": True})
            for v in registry.shadows(handler)]


def save_labels(out_dir: Path, outputs: list, write) -> bool:
    """Keep the first label map of a job's results as ``labels.npz`` (``write(path, bytes)`` seals it)."""
    lm = next((o for o in outputs if isinstance(o, LabelMap)), None)
    if lm is None:
        return False
    buf = io.BytesIO()
    names = {s.label: s.name for s in lm.segments}
    np.savez_compressed(buf, labels=lm.labels, spacing=np.asarray(lm.geometry.spacing, dtype=np.float64),
                        names=np.frombuffer(json.dumps(names).encode(), dtype=np.uint8))
    write(Path(out_dir) / LABELS_FILE, buf.getvalue())
    return True


def load_labels(blob: bytes) -> tuple[np.ndarray, dict[str, int], float]:
    """(labels, segment name → value, voxel volume in ml) from a ``labels.npz``'s bytes."""
    with np.load(io.BytesIO(blob)) as z:
        names = {name: int(v) for v, name in json.loads(z["names"].tobytes().decode()).items()}
        return z["labels"], names, float(np.prod(z["spacing"])) / 1000.0


def compare_labels(active: tuple[np.ndarray, dict[str, int], float],
                   shadow: tuple[np.ndarray, dict[str, int], float]) -> dict[str, dict]:
    """Per structure (matched by name): Dice, both volumes (ml) and the shadow's volume difference.

    Dice is NaN-free: a structure neither version found is left out; one found by only one gets 0.
    """
    a_lab, a_names, voxel_ml = active
    s_lab, s_names, _ = shadow
    if a_lab.shape != s_lab.shape:
        raise ValueError(f"the two label maps have different grids {a_lab.shape} and {s_lab.shape}")
    out = {}
    for name in sorted(set(a_names) | set(s_names)):
        a = a_lab == a_names[name] if name in a_names else np.zeros(a_lab.shape, bool)
        s = s_lab == s_names[name] if name in s_names else np.zeros(s_lab.shape, bool)
        na, ns = int(a.sum()), int(s.sum())
        if na + ns == 0:
            continue
        va, vs = na * voxel_ml, ns * voxel_ml
        out[name] = {"dice": round(2.0 * int((a & s).sum()) / (na + ns), 4), "active_ml": round(va, 2),
                     "shadow_ml": round(vs, 2), "volume_diff_ml": round(vs - va, 2),
                     "volume_diff_pct": round(100.0 * (vs - va) / va, 1) if va else None}
    return out


def _opts(job) -> dict:
    return json.loads(job["options_json"] or "{}")


def record_agreement(index, results_dir: Path, read_file, registry: ModelRegistry, job_id: int) -> list[dict]:
    """After a job finished: compare every complete (active, shadow) pair it belongs to, once each.

    ``results_dir`` holds one folder per job; ``read_file(path) -> bytes`` opens a sealed result
    file (``Vault.read_file``). Returns the records written: none while the partner is not done.
    """
    job = index.job(job_id)
    if job is None or job["status"] != "done" or not _opts(job).get("keep_labels"):
        return []
    siblings = index.jobs(study_uid=job["study_uid"], limit=1000)
    shadow_of = _opts(job).get("shadow_of")
    if shadow_of:
        pairs = [(j, job) for j in siblings if j["job_key"] == shadow_of]
    else:
        pairs = [(job, j) for j in siblings if _opts(j).get("shadow_of") == job["job_key"]]
    written = []
    for active, shadow in pairs:
        if active["status"] != "done" or shadow["status"] != "done":
            continue
        try:
            a = load_labels(read_file(Path(results_dir) / str(active["id"]) / LABELS_FILE))
            s = load_labels(read_file(Path(results_dir) / str(shadow["id"]) / LABELS_FILE))
            labels = compare_labels(a, s)
        except Exception as exc:  # noqa: BLE001 - a missing/damaged file or other grid: say so, keep going
            log.warning("shadow agreement of jobs %s and %s not computed: %s", active["id"], shadow["id"], exc)
            continue
        record = {"study_uid": job["study_uid"], "series_uid": job["series_uid"], "rule": job["rule"],
                  "active_job": active["id"], "shadow_job": shadow["id"],
                  "active_version": ran_version(active), "shadow_version": _opts(shadow)["model_version"],
                  "at": shadow["finished_at"], "labels": labels}
        if registry.add_agreement(job["handler"].removeprefix(MODEL_PREFIX), record):
            written.append(record)
    return written


def ran_version(job) -> str | None:
    """The model version a finished job ran, from its history (recorded when the job was claimed)."""
    for event in reversed(json.loads(job["history_json"])):
        if event.get("event") == "model" and event.get("version"):
            return event["version"]
        prov = event.get("provenance") or {}
        if prov.get("model_version"):
            return prov["model_version"]
    return None


def agreement_summary(records: list[dict]) -> dict:
    """Over a shadow period: cases compared, and per structure the mean/min Dice and mean volume difference."""
    per: dict[str, dict[str, list]] = {}
    for r in records:
        for name, m in r["labels"].items():
            e = per.setdefault(name, {"dice": [], "diff_ml": [], "diff_pct": []})
            e["dice"].append(m["dice"])
            e["diff_ml"].append(m["volume_diff_ml"])
            if m.get("volume_diff_pct") is not None:
                e["diff_pct"].append(m["volume_diff_pct"])

    def mean(xs):
        return round(float(np.mean(xs)), 4) if xs else None

    labels = {name: {"cases": len(e["dice"]), "mean_dice": mean(e["dice"]), "min_dice": min(e["dice"]),
                     "mean_volume_diff_ml": mean(e["diff_ml"]), "mean_volume_diff_pct": mean(e["diff_pct"])}
              for name, e in sorted(per.items())}
    dices = [e["mean_dice"] for e in labels.values() if e["mean_dice"] is not None]
    return {"cases": len(records), "mean_dice": round(float(np.mean(dices)), 4) if dices else None,
            "labels": labels, "first": min((r["at"] for r in records), default=None),
            "last": max((r["at"] for r in records), default=None)}
