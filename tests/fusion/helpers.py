"""Builders shared by the fusion tests: answers with known embeddings, deterministic per seed."""

from __future__ import annotations

import numpy as np

from anime_role_detect.recognition.schema import Answer, Detection, TopK


def unit_rows(seed: int, rows: int, dim: int) -> np.ndarray:
    """Deterministic unit-length float32 rows (the 'embedding' of a test record)."""
    x = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_answer(role: str = "char_00", score: float = 0.9, n_det: int = 1, sha: str = "", filename: str = "a.png",
                runner_up: str = "char_01") -> Answer:
    """An Answer with `n_det` detections, the first one (best) naming `role`."""
    dets = [
        Detection(box=[0, 0, 10 + i, 10 + i], role=role if i == 0 else runner_up, similarity=score - 0.1 * i,
                  topk=[TopK(role=role, score=score), TopK(role=runner_up, score=score - 0.2)])
        for i in range(n_det)
    ]
    return Answer(filename=filename, role=role, similarity=score, boxes=[d.box for d in dets], detections=dets,
                  image_sha256=sha, version="v-test", mode="clip")
