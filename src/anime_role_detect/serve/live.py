"""The live recognizer: loaded once, swapped in the background when the registry's `latest` moves.

A request takes a `Lease` (the recognizer object plus a shared lock) for its whole duration, so a
reload never pulls a model out from under an in-flight request; enrol/remove take the lock
exclusively because they change the gallery the searches read.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from PIL import Image

from ..errors import RegistryError
from ..log import get_logger
from ..recognition.pipeline import Recognizer
from ..recognition.shared import release_shared_models
from ..registry import Registry
from ..versionfiles import (
    CALIBRATION,
    GALLERY_INDEX,
    GALLERY_META,
    GALLERY_ROWS,
    GALLERY_VECTORS,
)

_log = get_logger("system")

#: (version_dir, recognizer config) -> Recognizer; the default uses `Recognizer.from_version`.
RecognizerLoader = Callable[[Path, dict[str, Any]], Recognizer]


def load_from_version(version_dir: Path, cfg: dict[str, Any]) -> Recognizer:
    """Build the pipeline's `Recognizer` for one registry version folder."""
    rec = Recognizer.from_version(version_dir, cfg)
    rec.warmup()  # load every model now, not on the first request
    return rec


class ReadWriteLock:
    """Many readers or one writer; writers wait for readers to drain and block new ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Loaded:
    """One loaded recognizer and the version it came from."""

    recognizer: Recognizer
    version_id: str
    loaded_at: float
    load_s: float
    lock: ReadWriteLock


class LiveRecognizer:
    """Holds the current recognizer; polls the registry and hot-swaps in a background thread."""

    def __init__(self, registry_root: str | Path, version: str = "latest", cfg: dict[str, Any] | None = None,
                 reload_interval_s: float = 2.0, loader: RecognizerLoader = load_from_version,
                 on_load: Callable[[Any], None] | None = None) -> None:
        self.registry = Registry(registry_root)
        self.version = version
        self.cfg = dict(cfg or {})
        self.reload_interval_s = reload_interval_s
        self.loader = loader
        self.on_load = on_load
        self._current: Loaded | None = None
        self._swap_lock = threading.Lock()
        self._loading: threading.Thread | None = None
        self._last_check = 0.0
        self.last_error: str | None = None
        self._failed_id: str | None = None
        self.reloads = 0

    # -- loading ----------------------------------------------------------------------------
    def _wanted_id(self) -> str | None:
        return self.registry.latest_id() if self.version == "latest" else self.version

    def _load(self, vid: str) -> Loaded:
        t0 = time.perf_counter()
        path = self.registry.path(vid)
        rec = self.loader(path, self.cfg)
        if self.on_load is not None:
            self.on_load(rec)
        took = time.perf_counter() - t0
        _log.info(f"recognizer version {vid} loaded in {took:.2f}s from {path}")
        return Loaded(rec, vid, time.time(), took, ReadWriteLock())

    def load_now(self) -> None:
        """Load the wanted version synchronously (start-up); failure is kept in `last_error`."""
        vid = self._wanted_id()
        if vid is None:
            self.last_error = (f"registry {self.registry.root} has no live version yet; "
                               "run the workflow (page /workflow) or `registry promote ID`")
            _log.warning(self.last_error)
            return
        try:
            self._current = self._load(vid)
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - the server starts and reports it on /api/health
            self.last_error = f"version {vid} failed to load: {exc}; promote a working version (registry promote ID)"
            self._failed_id = vid  # no retry storm; a newly promoted version is tried
            _log.error(self.last_error)

    def _background_load(self, vid: str) -> None:
        try:
            loaded = self._load(vid)
        except Exception as exc:  # noqa: BLE001 - keep serving the old version
            self.last_error = f"version {vid} failed to load, still serving {self.version_id}: {exc}"
            _log.error(self.last_error)
            self._failed_id = vid
            return
        with self._swap_lock:
            self._current = loaded
            self.reloads += 1
            self.last_error = None
        _log.info(f"hot reload: now serving {vid}")
        self._release(loaded)

    def _release(self, new: "Loaded") -> None:
        """Drop every other registry version's networks from the process cache (`shared.release_shared_models`): each
        version loads its own (derived versions hard-link the same files under new paths), so reloads would keep them."""
        n = release_shared_models(self.registry.root, keep=getattr(new.recognizer, "version_dir", None))
        if n:
            _log.info(f"released {n} cached network(s) of versions no longer served")

    def maybe_reload(self, force: bool = False) -> None:
        """Start a background load when the registry's pointer moved (rate-limited)."""
        now = time.monotonic()
        if not force and now - self._last_check < self.reload_interval_s:
            return
        self._last_check = now
        try:
            vid = self._wanted_id()
        except (OSError, RegistryError):
            return
        with self._swap_lock:
            busy = self._loading is not None and self._loading.is_alive()
            current = self._current.version_id if self._current else None
            if vid is None or vid == current or busy or vid == self._failed_id:
                return
            self._loading = threading.Thread(target=self._background_load, args=(vid,), name=f"reload-{vid}", daemon=True)
            self._loading.start()

    @property
    def reloading(self) -> bool:
        """True while a newer version is loading in the background."""
        t = self._loading
        return t is not None and t.is_alive()

    def persist_edit(self, loaded: Loaded, kind: str = "gallery-edit", what: str = "",
                     evaluate: Sequence[tuple[Image.Image, str, str]] = ()) -> str | None:
        """Save an enrol/remove as a new registry version derived from the served one, and keep serving it.

        Unchanged files are carried as hard links; the open-set calibration is marked stale (measured before
        the gallery changed); `evaluate` = ``(image, label, sha256)`` pictures kept out of the gallery extend the
        version's evaluation set. Following `latest`, the new version is promoted; a pinned server re-pins to it.
        Call under the write lock.
        """
        rec = loaded.recognizer
        if getattr(rec, "version_dir", None) is None:
            return None
        with self._swap_lock:
            promote = self.version == "latest"
            with self.registry.derive(loaded.version_id, kind=kind, promote=promote, skip={GALLERY_INDEX, GALLERY_META, GALLERY_ROWS, GALLERY_VECTORS}) as d:
                rec.save_gallery(d.dir)
                if evaluate:
                    extend_eval_set(rec, d.dir, evaluate)
                if getattr(rec, "calibration", None) is not None:
                    rec.calibration.mark_stale(f"{kind} {what}".strip())
                    rec.calibration.save(d.writable(CALIBRATION))
            vid = str(d.id)
            rec.version_dir = self.registry.path(vid)
            rec.version = vid
            loaded.version_id = vid
            if not promote:
                self.version = vid
        _log.info(f"gallery edit saved as version {vid} (parent {d.base_id})")
        return vid

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until a running background load finishes (tests, shutdown)."""
        t = self._loading
        if t is not None:
            t.join(timeout)

    # -- using ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def version_id(self) -> str | None:
        cur = self._current
        return cur.version_id if cur else None

    @property
    def loaded(self) -> Loaded | None:
        return self._current

    def current(self) -> Loaded | None:
        """The loaded recognizer right now (after a rate-limited check for a newer version)."""
        self.maybe_reload()
        return self._current


def extend_eval_set(rec: Recognizer, folder: Path, pictures: Sequence[tuple[Image.Image, str, str]]) -> None:
    """Add held-out enrolment shots (embedded by the recognizer's embedder) to the evaluation set in `folder`."""
    from ..recognition.evalset import EvalSet

    emb = rec.embedder.embed([img for img, _, _ in pictures])
    new = EvalSet(emb, [label for _, label, _ in pictures], rec.embedder.model_id,
                  sha256=[sha for _, _, sha in pictures], sources=["enrol"] * len(pictures))
    base = EvalSet.load(folder)
    if base is not None and len(base) and base.embedder_id != new.embedder_id:
        _log.warning(f"evaluation set in {folder} is from another embedder ({base.embedder_id}); enrolment shots not added")
        return
    (new if base is None or not len(base) else base.extend(new)).save(folder)
