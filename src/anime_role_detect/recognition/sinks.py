"""Answer sinks: the declared hook through which a `Recognizer` hands every answer to higher layers.

A sink is called with the answer, its per-detection embeddings ``[detections, dim]`` and the uploaded
bytes when the caller had them (None for decoded images and video frames). Cached answers are handed
over too, so logging never turns the cache off. A sink may note on the answer where it put it
(`Answer.record_id`): the answer handed over is the one returned to the caller. The fusion feature log
is one such sink; the recognition layer knows nothing of it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np

from .schema import Answer


@runtime_checkable
class AnswerSink(Protocol):
    """Receives every answer a recognizer gives; must not raise for the answer to be lost (errors are logged)."""

    def __call__(self, answer: Answer, embeddings: np.ndarray, image_bytes: bytes | None) -> None: ...


class BindableSink(AnswerSink, Protocol):
    """A sink that wants to know the recognizer it serves (e.g. to record its embedder id): `Recognizer.add_sink` calls `bind`."""

    def bind(self, recognizer: Any) -> None: ...
