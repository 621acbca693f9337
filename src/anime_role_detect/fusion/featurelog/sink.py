"""The feature log as one of the Recognizer's answer sinks (`recognition.sinks.AnswerSink`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ...log import system_log
from ...recognition.schema import Answer

if TYPE_CHECKING:
    from .writer import FeatureLog


class FeatureLogSink:
    """The Recognizer's answer sink that appends to a `FeatureLog` (`recognition.sinks.AnswerSink`).

    Bound to one recognizer, whose embedder id it records; uploads are stored when the policy says
    ``store_images``. The answer gets its record's id (`Answer.record_id`, what feedback names). A write
    that fails (disk full) is logged and never fails the answer.
    """

    def __init__(self, log: "FeatureLog") -> None:
        self.log = log
        self._embedder_id: Callable[[], str] | None = None

    def bind(self, recognizer: Any) -> None:
        self._embedder_id = lambda: str(recognizer.embedder.model_id)

    def __call__(self, answer: Answer, embeddings: np.ndarray, image_bytes: bytes | None = None) -> None:
        embedder_id = self._embedder_id() if self._embedder_id is not None else None
        try:
            answer.record_id = self.log.append(answer, embeddings, image_bytes=image_bytes, embedder_id=embedder_id)
        except OSError as exc:
            system_log.error(f"feature log {self.log.dir}: could not append ({exc})")

    def close(self) -> None:
        self.log.close()
