"""Run an exported segmentation model the way its card describes, on any source grid.

Pipeline: resample each input series onto the network grid (card spacing + orientation, with
anti-aliasing when downsampling), normalise, sliding-window inference with Gaussian blending and
optional flip TTA, then resample the class probabilities back onto the *source* grid one class at
a time (a running max keeps memory at two source-sized float arrays whatever the class count),
argmax or threshold there, and post-process per label. The result lies exactly on the source
geometry, so SEG/RTSTRUCT encoders can reference the source slices one to one.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from node.models.card import (CardError, CTWindow, InferenceSpec, InputSpec, LabelSpec, ModelCard, Percentile,
                              Preprocessing, ZScore, orientation_matrix)
from node.models.components import components_to_drop, label_small
from node.models.digest import file_sha256
from node.volume import Geometry, Volume

__all__ = ["LoadedModel", "load_model", "network_grid", "resample", "normalise", "prepare_input",
           "sliding_window", "probabilities_to_labels", "postprocess", "segment", "onnx_runner",
           "choose_providers", "Confidence", "confidence", "segment_scored", "BOX_COLUMNS", "patch_starts"]

Progress = Callable[[float, str], None]
PatchRunner = Callable[[np.ndarray], np.ndarray]  # (B, C, z, y, x) float32 -> (B, K, z, y, x) logits
_AXIS = {"z": 2, "y": 3, "x": 4}  # flip axes of a (B, C, z, y, x) batch
BOX_COLUMNS = 7  # a box detector's rows: z0, y0, x0, z1, y1, x1, score (patch voxels)


# ---------------------------------------------------------------- ONNX Runtime sessions

@dataclass(frozen=True)
class LoadedModel:
    session: object  # onnxruntime.InferenceSession
    providers: tuple[str, ...]  # what the session really uses (ORT falls back silently otherwise)
    sha256: str
    input_name: str
    path: Path


_sessions: dict[tuple[str, str], tuple[tuple[int, int], LoadedModel]] = {}
_sessions_lock = threading.Lock()


def choose_providers(request: str = "auto") -> list[str]:
    """Execution providers to ask for: CUDA when onnxruntime-gpu offers it (unless 'cpu'), then CPU."""
    import onnxruntime as ort

    if request not in ("auto", "cpu", "cuda"):
        raise ValueError(f"provider must be auto, cpu or cuda, got {request!r}")
    available = ort.get_available_providers()
    if request != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if request == "cuda":
        raise RuntimeError("provider 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                           f"(available: {', '.join(available)}); install onnxruntime-gpu")
    return ["CPUExecutionProvider"]


def load_model(model_dir: str | Path, card: ModelCard, provider: str = "auto", *,
               mc_dropout: bool = False) -> LoadedModel:
    """The ONNX Runtime session of ``model_dir``'s model, created once per process and reused.

    Checked at every call (once per job): when model.onnx's size or mtime changed, its content
    hash decides whether a new session is built, so a new model version is picked up without a
    restart and a mere touch costs nothing. ``mc_dropout``: the card's second graph, with the
    dropout masks as inputs (``card.mc_dropout``).
    """
    import onnxruntime as ort

    if mc_dropout and card.mc_dropout is None:
        raise CardError(f"{Path(model_dir) / 'card.yaml'}: mc_dropout: the model has no dropout graph")
    path = (Path(model_dir) / (card.mc_dropout.model_file if mc_dropout else card.model_file)).resolve()
    key = (str(path), provider)
    try:
        st = path.stat()
    except OSError as exc:
        raise CardError(f"{Path(model_dir) / 'card.yaml'}: model_file: cannot read {path}: {exc.strerror}") from None
    stamp = (st.st_size, st.st_mtime_ns)
    with _sessions_lock:
        cached = _sessions.get(key)
        if cached and cached[0] == stamp:
            return cached[1]
        digest = file_sha256(path)
        if cached and cached[1].sha256 == digest:
            _sessions[key] = (stamp, cached[1])
            return cached[1]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # ORT warns about unused initializers of exported graphs
        # No busy-waiting worker threads: the node shares its cores with receivers and encoders.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No CPU memory arena: it keeps the largest patch's activations for the life of the worker,
        # ~100 MB held through every later stage of the job (and every other job); freed tensors
        # go back to the system instead (issue #15: a job's peak within 3x its volume).
        opts.enable_cpu_mem_arena = False
        providers = choose_providers(provider)
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for corrupt or unsupported graphs
            raise CardError(f"{Path(model_dir) / 'card.yaml'}: model_file: {path.name} is not a loadable "
                            f"ONNX model: {exc}") from None
        _check_io(session, card, Path(model_dir), masks=mc_dropout)
        used = tuple(session.get_providers())
        if provider == "cuda" and "CUDAExecutionProvider" not in used:
            raise RuntimeError(f"CUDA was asked for but the session runs on {', '.join(used)} (no usable GPU)")
        model = LoadedModel(session, used, digest, session.get_inputs()[0].name, path)
        _sessions[key] = (stamp, model)
        return model


def _check_io(session, card: ModelCard, model_dir: Path, masks: bool = False) -> None:
    where = model_dir / "card.yaml"
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if masks:  # the image, then one (1, C, 1, 1, 1) dropout mask per site
        if len(inputs) < 2 or any(len(i.shape) != 5 for i in inputs):
            raise CardError(f"{where}: mc_dropout.model_file: the graph must take the image and its dropout masks")
        inputs = inputs[:1]
    if len(inputs) != 1 or len(inputs[0].shape) != 5:
        raise CardError(f"{where}: model_file: the model must take one (batch, channels, z, y, x) input")
    in_ch, out_ch = inputs[0].shape[1], outputs[0].shape[1] if len(outputs[0].shape) == 5 else None
    if isinstance(in_ch, int) and in_ch != card.input.channels:
        raise CardError(f"{where}: input.channels: card says {card.input.channels}, the model takes {in_ch}")
    if card.task == "detection" and card.detection.output == "boxes":
        shape = outputs[0].shape
        if len(shape) != 3 or (isinstance(shape[2], int) and shape[2] != BOX_COLUMNS):
            raise CardError(f"{where}: detection.output: a boxes model returns (batch, boxes, {BOX_COLUMNS}) rows "
                            f"z0 y0 x0 z1 y1 x1 score; this one returns {list(shape)}")
        return
    if out_ch is None:
        raise CardError(f"{where}: model_file: the model's first output must be (batch, classes, z, y, x)")
    if isinstance(out_ch, int) and out_ch != card.output_channels:
        raise CardError(f"{where}: labels: the model outputs {out_ch} channels, the card's "
                        f"{len(card.labels)} labels with {card.inference.activation} need {card.output_channels}")


def onnx_runner(model: LoadedModel) -> PatchRunner:
    def run(batch: np.ndarray) -> np.ndarray:
        return model.session.run(None, {model.input_name: batch})[0]

    return run


# ---------------------------------------------------------------- grids and intensities

def network_grid(source: Geometry, spacing: Sequence[float], orientation: str) -> Geometry:
    """The grid the network sees: ``orientation`` axes, ``spacing`` mm, covering the whole source."""
    d = orientation_matrix(orientation)
    n = np.array(source.shape) - 1
    corners = np.array([(k, j, i) for k in (0, n[0]) for j in (0, n[1]) for i in (0, n[2])], dtype=float)
    local = source.index_to_patient(corners) @ d  # coordinates along the network axes
    lo, hi = local.min(axis=0), local.max(axis=0)
    sp = np.asarray(spacing, dtype=float)
    size_xyz = np.ceil((hi - lo) / sp - 1e-6).astype(int) + 1
    return Geometry(shape=tuple(int(v) for v in size_xyz[::-1]), origin=tuple(float(v) for v in d @ lo),
                    spacing=tuple(float(v) for v in sp), direction=tuple(float(v) for v in d.ravel()))


def _antialias(img: sitk.Image, target: Geometry) -> sitk.Image:
    """Low-pass ``img`` for sampling at ``target``'s spacing, so fine and coarse sources look alike.

    Bins of whole voxels are averaged first (cheap, and it shrinks a 512x512x300 CT eightfold
    for a 4 mm grid), then a Gaussian does the rest (skimage's rule: sigma = (factor - 1) / 2 voxels).
    """
    import SimpleITK as sitk

    step = min(target.spacing)
    shrink = [max(1, int(step / (2 * s))) for s in img.GetSpacing()]
    if max(shrink) > 1:
        img = sitk.BinShrink(img, shrink)
    img = sitk.Cast(img, sitk.sitkFloat32)
    for axis, s in enumerate(img.GetSpacing()):
        sigma_mm = (step - s) / 2
        if sigma_mm > 0.25 * s:
            img = sitk.RecursiveGaussian(img, sigma_mm, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return img


def resample(array: np.ndarray, source: Geometry, target: Geometry, *, linear: bool,
             antialias: bool = False) -> np.ndarray:
    """``array`` on ``source`` sampled at ``target``'s voxel centres (float32 if linear, else same dtype).

    Points beyond the source take the nearest edge value: a scan cut by its field of view must not
    grow an artificial air border that the network would read as the body's edge.
    """
    import SimpleITK as sitk  # here, not at the top: training on a GPU machine imports this module without it

    img = source.to_sitk(array if linear or array.dtype != bool else array.astype(np.uint8))
    if linear:
        img = _antialias(img, target) if antialias else sitk.Cast(img, sitk.sitkFloat32)
    return _sample(img, target, linear)


def _sample(img, target: Geometry, linear: bool) -> np.ndarray:
    """``resample``'s sampling of an image already made (SimpleITK) at ``target``'s voxel centres."""
    import SimpleITK as sitk

    out = sitk.Resample(img, [int(v) for v in target.shape[::-1]], sitk.Transform(),
                        sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, target.origin, target.spacing,
                        target.direction, 0.0, sitk.sitkFloat32 if linear else img.GetPixelID(), True)
    return sitk.GetArrayFromImage(out)


def normalise(array: np.ndarray, prep: Preprocessing) -> np.ndarray:
    a = array.astype(np.float32, copy=False)
    if isinstance(prep, CTWindow):
        return ((np.clip(a, *prep.clip) - prep.mean) / prep.std).astype(np.float32)
    if isinstance(prep, ZScore):
        ref = a[a > prep.mask_above] if prep.mask_above is not None else a
        ref = ref if ref.size else a
        return ((a - ref.mean()) / max(float(ref.std()), 1e-6)).astype(np.float32)
    if isinstance(prep, Percentile):
        lo, hi = np.percentile(a, [prep.lower, prep.upper])
        return ((np.clip(a, lo, hi) - lo) / max(float(hi - lo), 1e-6)).astype(np.float32)
    raise TypeError(f"unknown preprocessing {prep!r}")


def prepare_input(volumes: Sequence[Volume], spec: InputSpec, prep: Preprocessing) -> tuple[np.ndarray, Geometry]:
    """(channels, z, y, x) float32 network input and its grid, from the first volume's extent."""
    if len(volumes) != spec.channels:
        raise ValueError(f"the model takes {spec.channels} series (channels), got {len(volumes)}")
    grid = network_grid(volumes[0].geometry, spec.target_spacing, spec.orientation)
    chans = []
    for vol in volumes:
        on_grid = resample(vol.array, vol.geometry, grid, linear=True, antialias=True)
        chans.append(normalise(on_grid, prep))
    return np.stack(chans), grid


# ---------------------------------------------------------------- sliding window

def patch_starts(length: int, patch: int, step: int) -> list[int]:
    if length <= patch:
        return [0]
    n = int(np.ceil((length - patch) / step)) + 1
    return sorted({int(round(i * (length - patch) / (n - 1))) for i in range(n)})


def importance_map(patch: Sequence[int], blending: str, sigma_scale: float) -> np.ndarray:
    if blending == "constant":
        return np.ones(tuple(patch), dtype=np.float32)
    axes = []
    for p in patch:
        x = np.arange(p, dtype=np.float64) - (p - 1) / 2
        axes.append(np.exp(-0.5 * (x / (sigma_scale * p)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    # Never zero: a voxel covered only by patch borders must still get a defined average.
    return np.maximum(w / w.max(), 1e-6).astype(np.float32)


def _activate(logits: np.ndarray, activation: str) -> np.ndarray:
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sliding_window(image: np.ndarray, run_patch: PatchRunner, spec: InferenceSpec, n_classes: int,
                   progress: Progress | None = None, passes: int = 1) -> np.ndarray:
    """(K, z, y, x) float32 class probabilities of a (C, z, y, x) image, blended over patches.

    ``passes`` > 1: ``run_patch`` answers a (B, C, ...) batch with (passes * B, K, ...) logits, pass
    after pass (e.g. several perturbations of the batch in one call, see ``uncertainty``), and the
    result is (passes, K, z, y, x): each pass blended on its own.
    """
    patch = spec.patch_size
    c, *shape = image.shape
    pads = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for s, p in zip(shape, patch)]
    if any(sum(p) for p in pads):
        floor = image.reshape(c, -1).min(axis=1)
        image = np.stack([np.pad(image[i], pads, constant_values=floor[i]) for i in range(c)])
    padded = image.shape[1:]
    steps = [max(1, int(p * (1 - spec.overlap))) for p in patch]
    starts = [(z, y, x) for z in patch_starts(padded[0], patch[0], steps[0])
              for y in patch_starts(padded[1], patch[1], steps[1]) for x in patch_starts(padded[2], patch[2], steps[2])]
    weight = importance_map(patch, spec.blending, spec.gaussian_sigma_scale)
    probs = np.zeros((passes, n_classes, *padded), dtype=np.float32)
    norm = np.zeros(padded, dtype=np.float32)
    flips = [()] + [tuple(_AXIS[a] for a in f) for f in spec.tta_flips]
    for b0 in range(0, len(starts), spec.batch_size):
        chunk = starts[b0:b0 + spec.batch_size]
        sl = [(slice(None), slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
              for z, y, x in chunk]
        batch = np.stack([image[s] for s in sl]).astype(np.float32, copy=False)
        acc = np.zeros((passes * len(chunk), n_classes, *patch), dtype=np.float32)
        for axes in flips:
            inp = np.ascontiguousarray(np.flip(batch, axes)) if axes else batch
            out = _activate(run_patch(inp), spec.activation)
            if out.shape != acc.shape:
                raise RuntimeError(f"the model returned {out.shape} for a {inp.shape} batch, expected {acc.shape}")
            acc += np.flip(out, axes) if axes else out
        acc *= weight / len(flips)
        acc = acc.reshape(passes, len(chunk), n_classes, *patch)
        for i, s in enumerate(sl):
            probs[(slice(None), *s)] += acc[:, i]
            norm[s[1:]] += weight
        if progress:
            progress(min(1.0, (b0 + len(chunk)) / len(starts)), f"patch {b0 + len(chunk)}/{len(starts)}")
    probs /= norm
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))
    out = np.ascontiguousarray(probs[(slice(None), slice(None), *crop)])
    return out if passes > 1 else out[0]


# ---------------------------------------------------------------- back to the source grid

def _source_box(mask: np.ndarray, grid: Geometry, source: Geometry) -> tuple[slice, slice, slice] | None:
    """Source-grid index box of every point whose interpolation stencil touches ``mask`` (network grid)."""
    lo, hi = [], []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(max(0, hit[0] - 1))
        hi.append(min(mask.shape[axis] - 1, hit[-1] + 1))
    corners = np.array([(k, j, i) for k in (lo[0], hi[0]) for j in (lo[1], hi[1]) for i in (lo[2], hi[2])])
    idx = source.patient_to_index(grid.index_to_patient(corners))
    start = np.maximum(0, np.floor(idx.min(axis=0) - 1e-6).astype(int))
    stop = np.minimum(np.array(source.shape), np.ceil(idx.max(axis=0) + 1e-6).astype(int) + 1)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def _sub_grid(source: Geometry, box: tuple[slice, slice, slice]) -> Geometry:
    """The part of ``source`` inside ``box``: the very same voxel centres."""
    return Geometry(shape=tuple(b.stop - b.start for b in box),
                    origin=tuple(float(v) for v in source.index_to_patient([b.start for b in box])),
                    spacing=source.spacing, direction=source.direction)


def probabilities_to_labels(probs: np.ndarray, grid: Geometry, source: Geometry, labels: Sequence[LabelSpec],
                            activation: str, threshold: float = 0.5) -> np.ndarray:
    """uint8 label array on ``source``: argmax (softmax) or thresholded max (sigmoid).

    A class can only win where its probability reaches 1/K (softmax: the winner's share is at
    least that) or the threshold (sigmoid); interpolation never exceeds the grid values around a
    point, so each class is resampled only inside the source box around its own such voxels, and
    the background only inside their union. Everywhere else the answer is background.
    """
    out = np.zeros(source.shape, dtype=np.uint8)
    softmax = activation == "softmax"
    n = probs.shape[0]
    floor = 1.0 / n if softmax else threshold
    values = list(range(n)) if softmax else [lab.value for lab in labels]
    boxes = {}
    for ch in range(1 if softmax else 0, n):
        mask = probs[ch] >= floor
        box = _source_box(mask, grid, source) if mask.any() else None
        if box is not None:
            boxes[ch] = box
    if not boxes:
        return out
    union = tuple(slice(min(b[a].start for b in boxes.values()), max(b[a].stop for b in boxes.values()))
                  for a in range(3))
    # Each channel's probabilities made an image once; the source box sampled a slab of slices at a
    # time: the best-so-far and each channel's values on the whole box were two or three times the
    # source volume in float32 (the job's peak: 6.7x its input volume).
    images = {ch: grid.to_sitk(np.asarray(probs[ch], dtype=np.float32))  # as resample() casts them
              for ch in ([0] if softmax else []) + list(boxes)}
    for z0 in range(union[0].start, union[0].stop, _SLAB):
        slab = (slice(z0, min(z0 + _SLAB, union[0].stop)), union[1], union[2])
        if softmax:
            best = _sample(images[0], _sub_grid(source, slab), linear=True)
        else:
            best = np.full(tuple(u.stop - u.start for u in slab), np.float32(threshold) - np.float32(1e-6))
        region = out[slab]
        for ch, box in boxes.items():
            part = (slice(max(box[0].start, slab[0].start), min(box[0].stop, slab[0].stop)), box[1], box[2])
            if part[0].stop <= part[0].start:
                continue
            p = _sample(images[ch], _sub_grid(source, part), linear=True)
            rel = tuple(slice(b.start - u.start, b.stop - u.start) for b, u in zip(part, slab))
            b, o = best[rel], region[rel]
            win = p > b
            o[win] = values[ch]
            np.maximum(b, p, out=b)
            del p, win
    return out


_SLAB = 32  # source slices sampled at a time by probabilities_to_labels


def _fill_holes(mask: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Background pockets not connected to the box border (binary_fill_holes, without its slow
    dilation), and only where ``where`` is true when it is given."""
    pockets, n = label_small(~mask)
    if n == 0:
        return np.zeros_like(mask)
    inside = np.ones(n + 1, dtype=bool)
    inside[0] = False  # the mask itself
    for face in (pockets[0], pockets[-1], pockets[:, 0], pockets[:, -1], pockets[:, :, 0], pockets[:, :, -1]):
        inside[np.unique(face)] = False
    holes = inside[pockets]
    del pockets
    if where is not None:
        holes &= where
    return holes


def postprocess(labels: np.ndarray, specs: Sequence[LabelSpec], voxel_ml: float) -> np.ndarray:
    """Per-label clean-up on the source grid, each label inside its own bounding box."""
    boxes = ndimage.find_objects(labels)
    for spec in specs:
        pp = spec.postprocess
        if not (pp.min_size_ml or pp.largest_component or pp.fill_holes) or spec.value > len(boxes):
            continue
        box = boxes[spec.value - 1]
        if box is None:
            continue
        box = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, labels.shape))
        region = labels[box]
        mask = region == spec.value
        if pp.min_size_ml or pp.largest_component:
            for slab, drop in components_to_drop(mask, pp.min_size_ml / voxel_ml, pp.largest_component):
                region[slab][drop] = 0  # the voxels of the components let go
                mask[slab][drop] = False
        if pp.fill_holes:
            holes = _fill_holes(mask, where=region == 0)  # never overwrite another label
            region[holes] = spec.value
            del holes
        del mask
    return labels


@dataclass(frozen=True)
class Confidence:
    """Mean max-softmax inside the predicted labels, on the network grid: how sure the network was
    where it said "structure". Low on inputs unlike its training data, where the classes blur."""

    overall: float | None  # over every voxel of every predicted label; None when nothing was predicted
    per_label: dict[int, float]  # label value -> mean probability of that label where it won


def confidence(probs: np.ndarray, activation: str, threshold: float = 0.5) -> Confidence:
    """Confidence of (K, z, y, x) class probabilities (softmax: channel 0 background; sigmoid: one per label).

    Summed slab by slab so the temporaries stay small for fine network grids of imported models.
    """
    offset = 0 if activation == "softmax" else 1
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    top_sum, top_n = 0.0, 0
    for z0 in range(0, probs.shape[1], 16):
        slab = probs[:, z0:z0 + 16]
        top = slab.max(0)
        winner = slab.argmax(0).astype(np.int16) + offset
        if activation != "softmax":
            winner[top < threshold] = 0
        inside = winner > 0
        top_sum += float(top[inside].sum(dtype=np.float64))
        top_n += int(inside.sum())
        for v in np.unique(winner[inside]):
            hit = winner == v
            sums[int(v)] = sums.get(int(v), 0.0) + float(slab[int(v) - offset][hit].sum(dtype=np.float64))
            counts[int(v)] = counts.get(int(v), 0) + int(hit.sum())
    return Confidence(top_sum / top_n if top_n else None, {v: sums[v] / counts[v] for v in sorted(sums)})


def segment_scored(volumes: Sequence[Volume], card: ModelCard, run_patch: PatchRunner,
                   progress: Progress | None = None) -> tuple[np.ndarray, Confidence]:
    """The card's model on ``volumes`` → uint8 labels on the first volume's exact grid, and its confidence."""
    report = progress or (lambda f, m: None)
    report(0.0, "resampling to the network grid")
    image, grid = prepare_input(volumes, card.input, card.preprocessing)
    xyz = card.input.array_axes == "xyz"
    if xyz:
        image = np.ascontiguousarray(image.transpose(0, 3, 2, 1))
    probs = sliding_window(image, run_patch, card.inference, card.output_channels,
                           lambda f, m: report(0.1 + 0.7 * f, m))
    del image
    if xyz:
        probs = np.ascontiguousarray(probs.transpose(0, 3, 2, 1))
    score = confidence(probs, card.inference.activation, card.inference.threshold)
    report(0.8, "resampling to the source grid")
    source = volumes[0].geometry
    labels = probabilities_to_labels(probs, grid, source, card.labels, card.inference.activation,
                                     card.inference.threshold)
    del probs  # K float channels of the network grid: not held beside post-processing's component labels
    report(0.95, "post-processing")
    voxel_ml = float(np.prod(source.spacing)) / 1000.0
    return postprocess(labels, card.labels, voxel_ml), score


def segment(volumes: Sequence[Volume], card: ModelCard, run_patch: PatchRunner,
            progress: Progress | None = None) -> np.ndarray:
    """The card's model on ``volumes`` → uint8 labels on the first volume's exact grid."""
    return segment_scored(volumes, card, run_patch, progress)[0]
