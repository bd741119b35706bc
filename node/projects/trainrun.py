"""A training run of a project, in its own process: never inside the web process or a job worker.

    python -m node.projects.trainrun RUN_DIR

``RUN_DIR`` (``<data_dir>/projects/<name>/runs/<id>/``) holds ``train.yaml`` (the project's
configuration, outputs redirected into the run) and ``run.json`` (what to do afterwards). The run
writes ``progress.jsonl`` (one line per log message; epochs carry loss, validation Dice and, for
semi-supervised runs, the pseudo-label share) and finally ``status.json`` (``done`` with the
registered version, or ``failed`` with the reason). Its address space is capped (``memory_mb``), so
a run that outgrows it fails on its own, with "out of memory", and the node is untouched.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

from node.models.train_config import BASELINE_PREFIX

__all__ = ["RunNotStarted", "start_run", "run_status", "recent_runs", "main"]

EPOCH = re.compile(r"epoch (\d+)/(\d+) .*?loss ([0-9.]+)(?: val Dice ([0-9.]+))?")
# run.json is written before the process starts (it reads it) and gets the pid once started: a run
# without a pid this young is starting, an older one never got its process.
STARTING_S = 60


class RunNotStarted(RuntimeError):
    """The run's folder is there, listed as failed, but its process could not be started."""


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


PASSWORD_ENV = "HILUM_RUN_ARCHIVE_PASSWORD"  # the archive's password reaches the run by its environment only


def start_run(project_dir: Path, data_dir: Path, memory_mb: int, by: str, archive=None,
              labels: dict[str, dict] | None = None) -> str:
    """Prepare a run of the project's configuration and start it as a separate process; returns its id.

    ``labels`` (study UID → accepted label version) replaces the configuration's data with those SEGs,
    read from ``archive`` (``ArchiveEndpoint``) by DICOMweb; the label versions are kept with the model.
    """
    import yaml

    runs = project_dir / "runs"
    runs.mkdir(exist_ok=True)
    cfg = yaml.safe_load((project_dir / "train.yaml").read_text())
    init_from = None
    if cfg.get("init_from") == "previous":  # carry on from the latest finished run, or start afresh
        init_from = _previous_run(runs, cfg["name"])
        if init_from is None:
            cfg.pop("init_from")
        else:
            cfg["init_from"] = init_from["checkpoint"]
    number, run = _new_run_dir(runs)
    cfg.update(output_dir=str(run / "output"), work_dir=str(run / "work"))
    env = dict(os.environ)
    if labels:
        auth = None
        if archive.username:
            auth = {"username": archive.username, "password_env": PASSWORD_ENV}
            env[PASSWORD_ENV] = archive.password
        cfg["data"] = {"dicomweb": {"url": archive.dicomweb_url, "auth": auth, "study_uids": sorted(labels),
                                    "sop_uids": sorted(v["sop_uid"] for v in labels.values())},
                       "validation_split": cfg["data"].get("validation_split", 0.2)}
        for lab in cfg["labels"]:  # a corrected AI prediction keeps the label's own name and type meaning
            lab["source"] = list(dict.fromkeys([*lab["source"], lab["name"], lab["type"]["meaning"]]))
    (run / "train.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    # Each run is its own version of the model: the configuration's version plus the run's number.
    version = f"{cfg['version']}.r{number}"
    meta = {"data_dir": str(data_dir), "memory_mb": memory_mb, "by": by, "started_at": time.time(),
            "label_versions": labels or None, "version": version if len(version) <= 16 else f"r{number}",
            "init_from": init_from}
    _write(run / "run.json", meta)
    try:
        with open(run / "stderr.log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "node.projects.trainrun", str(run)],
                                    stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                                    cwd=Path(__file__).resolve().parents[2], env=env)
    except OSError as exc:  # no process (no memory, no file descriptors): the run failed now, and says why
        error = f"the run's process could not be started: {exc}"
        _write(run / "status.json", {"state": "failed", "finished_at": time.time(), "error": error})
        raise RunNotStarted(f"run {run.name}: {error}") from exc
    _write(run / "run.json", {**meta, "pid": proc.pid})
    return run.name


def _run_number(run: Path) -> int:
    tail = run.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def _new_run_dir(runs: Path) -> tuple[int, Path]:
    """The next run number and its new folder. Starts at once (a double click: the endpoint runs in a thread
    pool) take turns, so each gets its own number, and so its own model version."""
    with open(runs / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        number = max([0, *(_run_number(r) for r in runs.iterdir())]) + 1
        run = runs / (time.strftime("%Y%m%dT%H%M%S") + f"-{number}")
        run.mkdir()
        return number, run


def _previous_run(runs: Path, model_name: str) -> dict | None:
    """The project's latest finished run (by run number): its best checkpoint and registered version."""
    for run in sorted(runs.iterdir(), key=_run_number, reverse=True):
        checkpoint = run / "work" / model_name / "best.pt"
        try:
            status = json.loads((run / "status.json").read_text())
        except (OSError, ValueError):
            continue  # running, or ended without a result
        if status.get("state") == "done" and checkpoint.is_file():
            return {"run": run.name, "version": status.get("version"), "checkpoint": str(checkpoint)}
    return None


def _alive(pid: int) -> bool:
    """The run's process exists and is not a zombie (it may have been killed, e.g. by the kernel)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] not in ("Z", "X")
    except OSError:
        return False


def _started(meta: dict) -> bool:
    """The run's process is alive, or being started (its pid not recorded yet)."""
    if "pid" not in meta:
        return time.time() - meta["started_at"] < STARTING_S
    return _alive(meta["pid"])


def run_status(run: Path) -> dict:
    """What a run is doing: its epochs so far, and its outcome once it has one."""
    epochs, lines = [], []
    if (run / "progress.jsonl").is_file():
        text = (run / "progress.jsonl").read_text(errors="replace")
        # Only whole lines: the run may be writing its last one now, or was killed while it did.
        for line in text[:text.rfind("\n") + 1].splitlines():
            try:
                entry = json.loads(line)
                msg = str(entry["msg"])
            except (ValueError, TypeError, KeyError):
                continue  # a line torn by a kill: the rest of the log still tells the run's story
            lines.append(msg)
            m = None if msg.startswith(BASELINE_PREFIX) else EPOCH.search(msg)
            if m:
                epochs.append({"epoch": int(m[1]), "of": int(m[2]), "loss": float(m[3]),
                               "val_mean_dice": float(m[4]) if m[4] else None})
    if (run / "status.json").is_file():
        status = json.loads((run / "status.json").read_text())
    elif _started(json.loads((run / "run.json").read_text())):
        status = {"state": "running"}
    else:
        tail = (run / "stderr.log").read_text(errors="replace")[-500:] if (run / "stderr.log").is_file() else ""
        status = {"state": "failed", "error": f"the run's process ended without a result: {tail.strip() or 'killed'}"}
    return {"run": run.name, **status, "epochs": epochs, "log_tail": lines[-5:]}


def recent_runs(project_dir: Path, since: float) -> list[dict]:
    """The project's runs still going or ended after ``since`` (the dashboard's training panel), newest first:
    each run's state and its last epoch (loss, validation Dice), without the whole curve."""
    folder = project_dir / "runs"
    out = []
    for run in sorted(folder.iterdir(), reverse=True) if folder.is_dir() else []:
        if not (run / "run.json").is_file():
            continue
        status = run_status(run)
        if status["state"] != "running" and (status.get("finished_at") or 0) < since:
            continue
        epochs = status.pop("epochs")
        status.pop("log_tail", None)
        status.pop("traceback", None)
        out.append({**status, "last_epoch": epochs[-1] if epochs else None,
                    "best_val_mean_dice": max((e["val_mean_dice"] for e in epochs
                                               if e["val_mean_dice"] is not None), default=None)})
    return out


def main(argv: list[str] | None = None) -> int:
    run = Path((argv or sys.argv[1:])[0])
    meta = json.loads((run / "run.json").read_text())
    limit = meta["memory_mb"] * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    progress = open(run / "progress.jsonl", "a")

    def log(msg: str) -> None:
        progress.write(json.dumps({"at": time.time(), "msg": msg.lstrip("\r")}) + "\n")
        progress.flush()

    try:
        from node.config import load_settings
        from node.models.cli import register_folder
        from node.models.train import train
        from node.models.train_config import load_train_config
        from node.models.versions import ModelRegistry

        out = train(load_train_config(run / "train.yaml"), log=log)
        settings = load_settings(data_dir=Path(meta["data_dir"]))
        from node.audit import open_audit

        registry = ModelRegistry.for_data_dir(settings.data_dir)
        register_folder(registry, open_audit(settings), out, f"training run {run.name} ({meta['by']})",
                        meta["version"], trace={"training_run": run.name, "label_versions": meta.get("label_versions"),
                                                "fine_tuned_from": meta.get("init_from")})
        metrics = json.loads((out / "metrics.json").read_text())
        _write(run / "status.json", {"state": "done", "finished_at": time.time(), "model": metrics["model"],
                                     "version": meta["version"], "mean_dice": metrics["validation"]["mean_dice"]})
        return 0
    except MemoryError:
        _write(run / "status.json", {"state": "failed", "finished_at": time.time(),
                                     "error": f"out of memory (run capped at {meta['memory_mb']} MB)"})
    except Exception as exc:  # noqa: BLE001 - any failure is the run's outcome, reported with its reason
        text = f"{type(exc).__name__}: {exc}"
        # Past the cap, a library's mmap fails too ("failed to map segment", "Cannot allocate memory").
        if any(k in text.lower() for k in ("memory", "cannot allocate", "failed to map")):
            text = f"out of memory (run capped at {meta['memory_mb']} MB): {text}"
        _write(run / "status.json", {"state": "failed", "finished_at": time.time(), "error": text,
                                     "traceback": traceback.format_exc(limit=6)})
    return 1


if __name__ == "__main__":
    sys.exit(main())
