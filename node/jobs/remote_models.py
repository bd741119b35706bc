"""A ``model:`` job on a remote worker runs the exact registry version the node resolved for it.

Node side: when a worker claims a model job, the node resolves the version (the active one, or a
shadow job's pinned one) as the local executor does, records it in the job's history, and gives the
worker a *manifest*: the version and its files (card + ONNX) with their SHA-256. The worker then
fetches those files for that attempt only; the node serves the version recorded in the job's
history, never whatever is active by then, and nothing else from the version folder.

Worker side: files are kept in a content-addressed cache (``<work dir>/models/blobs/<sha256>``),
checked against the manifest's hash as they arrive, so a version crosses the network once per
worker and a damaged or substituted file never runs. The worker's own ``models/`` folder plays
no part.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from node.models.card import CARD_FILE, CardError, load_card
from node.models.digest import file_sha256
from node.models.versions import BUILT_IN, INFO_FILE, ModelRegistry, Resolved, job_model

__all__ = ["ModelIntegrityError", "claim_model", "served_file", "model_folder"]

MODEL_EVENT = "model"  # the job-history event naming the version a job runs (also the local executor's)


class ModelIntegrityError(Exception):
    """A model file whose bytes are not the ones the node resolved (damaged, changed or substituted)."""


def _files(resolved: Resolved) -> dict[str, Path]:
    """The files a version runs from: its card and the card's model file (inside the folder only)."""
    card = load_card(resolved.folder / CARD_FILE)
    folder = resolved.folder.resolve()
    model = (folder / card.model_file).resolve()
    if not model.is_relative_to(folder):
        raise CardError(f"{resolved.folder / CARD_FILE}: model_file: {card.model_file} lies outside the version folder")
    return {CARD_FILE: folder / CARD_FILE, card.model_file: model}


def _manifest(resolved: Resolved) -> dict:
    files = _files(resolved)
    entries = [{"name": n, "sha256": file_sha256(p), "size": p.stat().st_size} for n, p in files.items()]
    if resolved.version != BUILT_IN:  # a registered version is immutable: its ONNX hash was taken at registration
        registered = json.loads((resolved.folder / INFO_FILE).read_text()).get("sha256")
        model = entries[1]
        if registered and registered != model["sha256"]:
            raise ModelIntegrityError(
                f"model {resolved.name} {resolved.version}: {model['name']} has SHA-256 {model['sha256'][:16]}…, "
                f"registered as {registered[:16]}…: the version folder changed after registration")
    return {"name": resolved.name, "version": resolved.version, "files": entries}


def claim_model(registry: ModelRegistry, index, job) -> dict | None:
    """The manifest of the version ``job`` runs (None: not a model job), recorded in its history.

    KeyError when the model has no runnable version; CardError / ModelIntegrityError when the
    version's files are unusable: the caller fails the job with that reason."""
    options = json.loads(job["options_json"])
    resolved = job_model(registry, job["handler"], options)
    if resolved is None:
        return None
    manifest = _manifest(resolved)
    index.note_job(job["id"], {"event": MODEL_EVENT, "name": resolved.name, "version": resolved.version,
                               "state": resolved.state, "shadow": bool(options.get("shadow_of"))})
    return manifest


def served_file(registry: ModelRegistry, history: list[dict], name: str) -> Path:
    """The file ``name`` of the version the job's history says it runs; KeyError for anything else."""
    event = next((e for e in reversed(history) if e.get("event") == MODEL_EVENT), None)
    if event is None:
        raise KeyError("this job runs no model")
    path = _files(registry.pinned(event["name"], event["version"])).get(name)
    if path is None:
        raise KeyError(f"{name!r} is not a file of model {event['name']} {event['version']}")
    return path


def _blob(blobs: Path, entry: dict, fetch: Callable[[str], Iterable[bytes]]) -> Path:
    """The cached file of ``entry``, fetched and checked against its hash when not cached yet."""
    path = blobs / entry["sha256"]
    if path.is_file() and path.stat().st_size == entry["size"]:
        return path
    blobs.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in fetch(entry["name"]):
                h.update(chunk)
                f.write(chunk)
        if h.hexdigest() != entry["sha256"]:
            raise ModelIntegrityError(f"model file {entry['name']}: received SHA-256 {h.hexdigest()[:16]}…, "
                                      f"the node resolved {entry['sha256'][:16]}…: not run")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def model_folder(manifest: dict, cache: Path, fetch: Callable[[str], Iterable[bytes]]) -> Path:
    """A folder holding exactly the manifest's files (links into the cache), named as the card's
    model, so ``handler_at`` loads it as it loads the node's own folder."""
    key = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache / "versions" / key / manifest["name"]
    for entry in manifest["files"]:
        name = Path(entry["name"])
        if name.is_absolute() or ".." in name.parts:
            raise ModelIntegrityError(f"model file {entry['name']!r}: not a name inside the model folder")
        blob = _blob(cache / "blobs", entry, fetch)
        target = folder / entry["name"]
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(blob, target)
            except FileExistsError:  # another worker process of this work dir linked it meanwhile
                pass
    return folder
