"""What the torch embedders and ONNX Runtime share without importing torch: the per-process network cache, weight-file
fingerprints and unit-length rows. A version run on ONNX Runtime answers without loading torch (seconds of a cold start).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError

# -- one model per process (bounded LRU) ----------------------------------------------------------
#: Most networks kept loaded at once; ``ARD_SHARED_MODELS`` or `set_shared_model_limit` change it.
DEFAULT_SHARED_MODELS = 4
_MODELS: OrderedDict[tuple, Any] = OrderedDict()
_MODELS_LOCK = threading.Lock()
_LIMIT = [max(1, int(os.environ.get("ARD_SHARED_MODELS") or DEFAULT_SHARED_MODELS))]


def set_shared_model_limit(max_models: int) -> None:
    """Keep at most `max_models` networks cached (least recently used ones are forgotten first)."""
    if int(max_models) < 1:
        raise ConfigError(f"shared model cache size {max_models} must be >= 1")
    with _MODELS_LOCK:
        _LIMIT[0] = int(max_models)
        _evict()


def _evict() -> None:
    while len(_MODELS) > _LIMIT[0]:
        _MODELS.popitem(last=False)


def shared_model(key: tuple, loader: Callable[[], Any]) -> Any:
    """The process-wide instance for `key`, loading it on first use (thread-safe, LRU-bounded).

    An evicted network stays alive while a recognizer still holds it; the cache only stops keeping
    it, so reloading new versions again and again does not grow memory without bound.
    """
    with _MODELS_LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        model = loader()
        _MODELS[key] = model
        _evict()
        return model


def shared_model_keys() -> list[tuple]:
    """Keys of the cached networks, least recently used first (tests, diagnostics)."""
    with _MODELS_LOCK:
        return list(_MODELS)


def release_shared_models(folder: str | Path, keep: str | Path | None = None) -> int:
    """Forget the cached networks loaded from files under `folder` but not under `keep` (versions no longer served);
    returns how many. A recognizer still answering holds its own references, so its networks live until it is done."""

    def under(path: str | Path | None) -> Callable[[Any], bool]:
        root = str(Path(path).resolve()) if path is not None else None
        return lambda x: root is not None and isinstance(x, str) and (x == root or x.startswith(root + os.sep))

    inside, kept = under(folder), under(keep)
    with _MODELS_LOCK:
        gone = [k for k in _MODELS if any(inside(x) for x in k) and not any(kept(x) for x in k)]
        for k in gone:
            del _MODELS[k]
    return len(gone)


def clear_shared_models() -> None:
    """Forget every cached model (tests, hot reload of a new version)."""
    with _MODELS_LOCK:
        _MODELS.clear()


def file_fingerprint(path: str | Path) -> str:
    """Short content hash of a weights file (size + first/last MiB: fast even for large checkpoints)."""
    p = Path(path)
    h = hashlib.sha1(str(p.stat().st_size).encode())
    with open(p, "rb") as fh:
        h.update(fh.read(1 << 20))
        if p.stat().st_size > 2 << 20:
            fh.seek(-(1 << 20), 2)
            h.update(fh.read())
    return h.hexdigest()[:12]


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(n, 1e-12)).astype(np.float32)
