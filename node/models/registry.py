"""Model cards as handlers: ``model:<name>`` resolves to a handler class built from ``models/<name>/``.

``node.handler_api.get_handler`` falls back to ``model_handler`` for names starting with
``model:``. A class is rebuilt when card.yaml or model.onnx changes, so a redeployed model is
picked up by the next job without restarting the node.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import yaml

from node.handler_api import Handler
from node.models.card import CARD_FILE, CardError, load_card
from node.models.handler import ModelHandler
from node.models.inference import load_model

__all__ = ["NotAHandler", "PREFIX", "DEFAULT_MODELS_DIR", "handler_at", "model_handler", "model_names", "validate_models"]

PREFIX = "model:"
DEFAULT_MODELS_DIR = Path(os.environ.get("HILUM_MODELS_DIR", Path(__file__).resolve().parents[2] / "models"))

class NotAHandler(CardError, KeyError):
    """A valid card whose model is no ``model:`` handler (a detector): a rule naming it is refused
    like an unknown handler (KeyError), with the card's task as the reason."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


_classes: dict[Path, tuple[tuple, type[ModelHandler]]] = {}
_lock = threading.Lock()


def _stamp(*paths: Path) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


def _task(card_path: Path) -> str | None:
    """The ``task`` a card declares (default segmentation), None when the file is no readable mapping."""
    try:
        raw = yaml.safe_load(card_path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return str(raw.get("task", "segmentation")) if isinstance(raw, dict) else None


def model_names(models_dir: str | Path | None = None, *, handlers_only: bool = False) -> list[str]:
    """``model:<name>`` of every folder holding a card; with ``handlers_only`` not the detectors
    (``task: detection``), which live beside the segmentation models and are checked with them but
    are no handlers. An unreadable card counts as a handler, so its errors are reported where it is used."""
    root = Path(models_dir or DEFAULT_MODELS_DIR)
    if not root.is_dir():
        return []
    cards = [d / CARD_FILE for d in root.iterdir() if (d / CARD_FILE).is_file()]
    return sorted(PREFIX + c.parent.name for c in cards if not handlers_only or _task(c) in (None, "segmentation"))


def model_handler(name: str, models_dir: str | Path | None = None) -> type[Handler]:
    """The handler class of card ``models_dir/<name>/card.yaml`` (``name`` with or without ``model:``).

    KeyError when there is no such model; CardError (a ValueError) when its card is invalid.
    """
    short = name.removeprefix(PREFIX)
    root = Path(models_dir or DEFAULT_MODELS_DIR)
    folder = (root / short).resolve()
    card_path = folder / CARD_FILE
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", short) or not card_path.is_file():
        known = ", ".join(model_names(root, handlers_only=True)) or "none"
        raise KeyError(f"no model named {short!r} in {root} (expected {root / short / CARD_FILE}); known: {known}")
    return handler_at(folder)


def handler_at(folder: str | Path, version: str | None = None) -> type[ModelHandler]:
    """The handler class of the model in ``folder`` (a shipped ``models/<name>/`` or a registered
    version's folder, see ``node.models.versions``); ``version`` overrides the card's version as the
    one every result names (a registered version's own name)."""
    folder = Path(folder).resolve()
    card_path = folder / CARD_FILE
    with _lock:
        cached = _classes.get(folder)
        if cached and cached[0] == _stamp(card_path, folder / cached[1].card.model_file):
            return cached[1]
        card = load_card(card_path)
        if card.task != "segmentation":
            raise NotAHandler(f"{card_path}: task: {card.task}: this model gives candidates to a handler (e.g. "
                            f"lung-nodules with detector: {card.name}); it is not a model: handler")
        short = card.name
        if version is None and card.name != folder.name:
            raise CardError(f"{card_path}: name: {card.name!r} differs from its folder name {folder.name!r}")
        stamp = _stamp(card_path, folder / card.model_file)
        version = version or card.version
        cls = type(f"ModelHandler_{re.sub(r'[^A-Za-z0-9]', '_', short)}", (ModelHandler,), {
            "name": PREFIX + short,
            "version": version,
            "description": card.description.strip().splitlines()[0],
            "modalities": frozenset({card.input.modality}),
            "model_name": card.name,
            "model_version": version,
            "card": card,
            "model_dir": folder,
            # Checked against sr_templates/model.yaml at start-up (node.runtime.check_sr_templates).
            "sr_template": "model" if "SR" in card.emit else None,
            "reports_findings": frozenset(lab.finding_key for lab in card.labels),
            "reports_measurements": frozenset({"volume"}),
        })
        _classes[folder] = (stamp, cls)
        return cls


def validate_models(models_dir: str | Path | None = None, provider: str = "auto") -> list[str]:
    """Load every card and its ONNX session (start-up check); one CardError listing all problems."""
    names, errors = model_names(models_dir), []
    root = Path(models_dir or DEFAULT_MODELS_DIR)
    for name in names:
        folder = root / name.removeprefix(PREFIX)
        try:
            card = load_card(folder)
            if card.task == "segmentation":
                card = model_handler(name, models_dir).card
            load_model(folder, card, provider)
        except CardError as exc:
            errors.append(str(exc))
    if errors:
        raise CardError("invalid model cards:\n" + "\n".join(errors))
    return names
