"""Face + figure views: a character is recognised from its whole figure and, when a face is found, its face.

A picture (or a detector's character crop) is the *figure* view; the best face a face detector
(animeface by default) finds inside it, widened by a margin, is the *face* view. `FaceFigureModel`
runs any embedder or classifier on both views in one batch and mixes them per picture: unit
embeddings averaged and renormalised, class and tag probabilities averaged, the face weighted by
`FaceViewSpec.weight`. A picture without a face found keeps its figure view alone, so hidden faces,
backs and screenshots still get an answer. Training adds the face views as extra samples
(`data.face_view`); the checkpoint records the spec so recognition and gallery building use the
same views (`face_view_for`).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from ..errors import ConfigError, DatasetError
from ..fsutil import atomic_write_json
from ..log import get_logger
from .detector import Box, build_detector, crop_box, crop_region

_log = get_logger("inference")

#: What a face + figure model id adds to its network's id (`FaceFigureModel.model_id`, `base_model_id`).
FACE_ID_SUFFIX = "+face"
DEFAULT_FACE_DETECTOR: dict[str, Any] = {"kind": "animeface", "min_likelihood": 0.5, "max_side": 512, "expand": 0.33, "max_det": 1}


@dataclass(frozen=True)
class FaceViewSpec:
    """Whether to add a face view, how much it weighs against the figure, and how faces are found and cropped."""

    enabled: bool = False
    weight: float = 0.5        # the face view's share of a picture's scores when a face is found (1.0: face only)
    margin: float = 0.1        # crop margin around the detector's (already expanded) face box
    detector: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_FACE_DETECTOR))

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | bool | None) -> "FaceViewSpec":
        """From a config mapping (unknown keys: one-line error), a bool (enabled) or None (off)."""
        if cfg is None or isinstance(cfg, bool):
            return cls(enabled=bool(cfg))
        cfg = dict(cfg)
        unknown = sorted(set(cfg) - {"enabled", "weight", "margin", "detector"})
        if unknown:
            raise ConfigError(f"face_view: unknown key(s) {', '.join(unknown)}; choose from enabled, weight, margin, detector")
        weight = float(cfg.get("weight", 0.5))
        if not 0.0 <= weight <= 1.0:
            raise ConfigError(f"face_view.weight={weight} must be in [0, 1] (the face view's share; 1.0 = face only)")
        margin = float(cfg.get("margin", 0.1))
        if margin < 0:
            raise ConfigError(f"face_view.margin={margin} is negative; use a fraction such as 0.1")
        return cls(bool(cfg.get("enabled", False)), weight, margin, _face_detector(cfg.get("detector")))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "detector": dict(self.detector)}

    @property
    def key(self) -> str:
        """Short fingerprint of how faces are found and cropped (cache files and model ids)."""
        return hashlib.sha1(json.dumps({"m": self.margin, "d": dict(self.detector)}, sort_keys=True).encode()).hexdigest()[:8]


def _face_detector(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """The face view's detector config: animeface's face-view defaults under what `given` sets; another detector kind
    (a YOLO face model, ``none``) exactly as given, since animeface's options are not its options."""
    given = dict(given or {})
    named = given.get("kind") or given.get("name")  # `name`: the legacy key `build_detector` still reads
    return {**DEFAULT_FACE_DETECTOR, **given} if named in (None, "", DEFAULT_FACE_DETECTOR["kind"]) else given


class FaceFinder:
    """The best face inside each picture (a `Box`, or None), and its crop.

    Each thread's last batch is remembered, so models wrapped on the same views (a gallery embedder and
    the classifier, `shared_finder`) asked about the same pictures in turn find their faces once.
    """

    def __init__(self, spec: FaceViewSpec) -> None:
        self.spec = spec
        self.detector = build_detector(dict(spec.detector))
        self._last = threading.local()

    def boxes(self, images: Sequence[Image.Image]) -> list[Box | None]:
        images = list(images)
        last = getattr(self._last, "batch", None)  # (the pictures, held so their ids stay theirs; their boxes)
        if last is not None and len(last[0]) == len(images) and all(a is b for a, b in zip(last[0], images)):
            return list(last[1])
        found = [found[0] if found else None for found in self.detector.detect(images)]
        self._last.batch = (images, found)
        return list(found)

    def crop(self, image: Image.Image, box: Box | None) -> Image.Image | None:
        return None if box is None else crop_box(image, box, self.spec.margin)

    def faces(self, images: Sequence[Image.Image]) -> list[Image.Image | None]:
        return [self.crop(im, b) for im, b in zip(images, self.boxes(images))]

    def regions_for_files(self, files: Iterable[tuple[str, Path]], cache: Path | None, load: Callable[[Path], Image.Image],
                          shard: tuple[int, int] = (0, 1), stall_s: float = 1800.0) -> dict[str, list[int] | None]:
        """The face view's pixel region ``[x1, y1, x2, y2]`` (what `crop` cuts; None: no face) per dataset file name;
        found once and kept in `cache` (JSON keyed by name, file size and mtime, written atomically every 50 new
        pictures, so an interrupted run resumes).

        `shard` ``(rank, world)``: processes started together (torchrun, srun) each find the faces of every
        world-th picture into their own part file beside `cache`, wait for the others' parts (an error when one
        writes nothing for `stall_s` seconds) and all return the same regions; rank 0 merges them into `cache`.
        """
        files = list(files)
        rank, world = shard
        if world <= 1 or cache is None:
            return self._find(files, cache, load, {})
        known = _read_cache(cache)
        done = _lookup(files, known)
        if done is not None:  # Lightning's launcher starts the other ranks after rank 0 has found every face
            return done
        parts = [cache.with_name(f"{cache.stem}.rank{r}-of-{world}{cache.suffix}") for r in range(world)]
        self._find(files[rank::world], parts[rank], load, known)
        merged = dict(known)
        for r in range(world):
            merged.update(_wait_for_part(files[r::world], parts[r], r, stall_s))
        if rank == 0:
            atomic_write_json(cache, merged, indent=None)
        found = _lookup(files, merged)
        assert found is not None  # every part was complete for its files
        return found

    def _find(self, files: Sequence[tuple[str, Path]], cache: Path | None, load: Callable[[Path], Image.Image],
              known: Mapping[str, Any]) -> dict[str, list[int] | None]:
        seen: dict[str, Any] = {**known, **(_read_cache(cache) if cache is not None else {})}
        out: dict[str, list[int] | None] = {}
        new = 0
        for name, path in files:
            stamp = _stamp(path)
            hit = seen.get(name)
            if isinstance(hit, dict) and hit.get("stamp") == stamp:
                out[name] = hit.get("box")
                continue
            image = load(path)
            box = self.boxes([image])[0]
            out[name] = None if box is None else list(crop_region(image.size, box, self.spec.margin))
            seen[name] = {"stamp": stamp, "box": out[name]}
            new += 1
            if cache is not None and new % 50 == 0:
                atomic_write_json(cache, seen, indent=None)
        if cache is not None and (new or not cache.is_file()):
            atomic_write_json(cache, seen, indent=None)
        return out


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _read_cache(cache: Path) -> dict[str, Any]:
    if not cache.is_file():
        return {}
    try:
        got = json.loads(cache.read_text())
        return got if isinstance(got, dict) else {}
    except (OSError, ValueError) as exc:
        _log.warning(f"face box cache {cache} is unreadable ({exc}); finding faces again")
        return {}


def _lookup(files: Sequence[tuple[str, Path]], seen: Mapping[str, Any]) -> dict[str, list[int] | None] | None:
    """Every file's region from `seen` when all are there for the file as it is now, else None."""
    out: dict[str, list[int] | None] = {}
    for name, path in files:
        hit = seen.get(name)
        if not (isinstance(hit, dict) and hit.get("stamp") == _stamp(path)):
            return None
        out[name] = hit.get("box")
    return out


def _wait_for_part(files: Sequence[tuple[str, Path]], part: Path, rank: int, stall_s: float, poll_s: float = 1.0) -> dict[str, Any]:
    """Another rank's part file once it holds all of `files`; a one-line error when it stops growing for `stall_s`."""
    last, since = -1, time.monotonic()
    while True:
        seen = _read_cache(part)
        if _lookup(files, seen) is not None:
            return {name: seen[name] for name, _ in files}
        if len(seen) != last:
            last, since = len(seen), time.monotonic()
        elif time.monotonic() - since > stall_s:
            raise DatasetError(f"rank {rank} wrote no face box to {part} for {stall_s:.0f} s; if that process died, rerun "
                               "(the faces found so far are kept)")
        time.sleep(poll_s)


def _mix(figure: np.ndarray, face: np.ndarray, idx: Sequence[int], weight: float) -> np.ndarray:
    out = figure.astype(np.float32, copy=True)
    if len(idx):
        out[list(idx)] = (1.0 - weight) * figure[list(idx)] + weight * face
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class FaceFigureModel:
    """Any embedder or classifier (torch or ONNX Runtime) run on each picture's figure and face views, mixed.

    Exposes what the wrapped object does (`embed`, `heads`, `embed_with_heads`; every other attribute is
    the wrapped one's), so galleries, recognition and the ONNX path use it unchanged.
    """

    def __init__(self, inner: Any, spec: FaceViewSpec, finder: FaceFinder | None = None) -> None:
        self.inner, self.spec = inner, spec
        self.finder = finder or FaceFinder(spec)
        self.model_id = f"{inner.model_id}{FACE_ID_SUFFIX}{spec.weight:g}:{spec.key}"
        self.dim = inner.dim

    def __getattr__(self, name: str) -> Any:
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def _views(self, images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[int]]:
        faces = self.finder.faces(images)
        idx = [i for i, f in enumerate(faces) if f is not None]
        return list(images) + [faces[i] for i in idx], idx  # type: ignore[misc]

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        batch, idx = self._views(images)
        e = self.inner.embed(batch)
        n = len(images)
        return _unit(_mix(e[:n], e[n:], idx, self.spec.weight))

    def heads(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        batch, idx = self._views(images)
        probs, tags = self.inner.heads(batch)
        n = len(images)
        return _mix(probs[:n], probs[n:], idx, self.spec.weight), (None if tags is None else _mix(tags[:n], tags[n:], idx, self.spec.weight))

    def embed_with_heads(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        batch, idx = self._views(images)
        e, probs, tags = self.inner.embed_with_heads(batch)
        n, w = len(images), self.spec.weight
        return (_unit(_mix(e[:n], e[n:], idx, w)), _mix(probs[:n], probs[n:], idx, w),
                None if tags is None else _mix(tags[:n], tags[n:], idx, w))


def base_model_id(model_id: str) -> str:
    """The wrapped network's own model id (the exported ONNX file's) of a face + figure and/or colour `model_id`."""
    from .colour import COLOUR_ID_SUFFIX

    return str(model_id).split(FACE_ID_SUFFIX, 1)[0].split(COLOUR_ID_SUFFIX, 1)[0]


def bare_network(obj: Any) -> Any:
    """The network under any view or colour wrappers (what is exported to ONNX)."""
    while (inner := getattr(obj, "inner", None)) is not None:
        obj = inner
    return obj


def face_view_for(setting: Mapping[str, Any] | bool | None, classifier: Any = None) -> FaceViewSpec:
    """The spec in force: an explicit `setting` (a gallery's or the config's ``face_view``) wins, else what the
    classifier was trained with (its checkpoint's ``face_view``), else off."""
    if setting is not None:
        return FaceViewSpec.from_mapping(setting)
    return FaceViewSpec.from_mapping(getattr(classifier, "face_view", None))


_FINDERS: dict[str, FaceFinder] = {}
_FINDERS_LOCK = threading.Lock()


def shared_finder(spec: FaceViewSpec) -> FaceFinder:
    """The process's one `FaceFinder` for `spec`'s detector settings (built on first use)."""
    with _FINDERS_LOCK:
        if spec.key not in _FINDERS:
            _FINDERS[spec.key] = FaceFinder(spec)
        return _FINDERS[spec.key]


def with_face_view(obj: Any, spec: FaceViewSpec) -> Any:
    """`obj` run on face + figure views when `spec` is enabled (never wrapped twice), else `obj` itself. Every
    wrapper with the same detector settings shares one finder, so a picture's face is found once, not per model."""
    if not spec.enabled or isinstance(obj, FaceFigureModel):
        return obj
    return FaceFigureModel(obj, spec, shared_finder(spec))
