"""The answer cache: a thread-safe LRU of answers (and their embeddings) keyed by content hash + settings."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .schema import Answer


@dataclass(frozen=True)
class Cached:
    """A cached answer and its per-detection embeddings (sinks get both on a hit too)."""

    answer: Answer
    embeddings: np.ndarray | None


class LRUCache:
    """Thread-safe least-recently-used cache of answers keyed by content hash + settings."""

    def __init__(self, size: int) -> None:
        self.size = max(0, int(size))
        self._data: OrderedDict[tuple, Cached] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: tuple) -> Cached | None:
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key]
            self.misses += 1
            return None

    def put(self, key: tuple, value: Cached) -> None:
        if self.size == 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
