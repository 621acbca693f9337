"""A generated video through the real `Recognizer` (tiny classifier + gallery trained in the session).

`Recognizer.recognize_video` delegates to `video.recognize_video`: frames sampled, recognised in
batches by the real pipeline, merged into appearances with the right time ranges.
"""

from __future__ import annotations

import random

import pytest

from anime_role_detect.data.synthetic import load_characters, render_character
from anime_role_detect.recognition.pipeline import Recognizer

from .helpers import infer_cfg
from .test_video import write_video

pytestmark = pytest.mark.slow


def most_different_pair(specs):
    """The two characters that differ in the most attributes (no near-twins: this tests time ranges)."""
    pairs = [(sum(x != y for x, y in zip(a.attributes(), b.attributes())), a, b) for i, a in enumerate(specs) for b in specs[i + 1:]]
    _, a, b = max(pairs, key=lambda p: (p[0], p[1].name, p[2].name))
    return a, b


@pytest.fixture(scope="module")
def recognizer(version_dir, onnx_tagger) -> Recognizer:
    return Recognizer.from_version(version_dir, {**infer_cfg(onnx_tagger), "openset": {"enabled": False}})


@pytest.mark.parametrize("mode", ["clip", "model"])
def test_real_recognizer_gives_the_right_time_ranges(recognizer, rec_data, tmp_path, mode):
    a, b = most_different_pair(load_characters(rec_data))
    rng = random.Random(21)
    frames = [render_character(a if i < 16 else b, rng, 96)[0] for i in range(32)]  # 8 fps: A 0-2 s, B 2-4 s
    video = write_video(tmp_path / "a_then_b.mp4", frames, fps=8)
    answer = recognizer.recognize_video(video, sample_fps=2.0, mode=mode, rerank=False)
    assert len(answer.frames) == 8 and answer.mode == mode and answer.sample_fps == 2.0
    correct = sum(f.role == (a.name if i < 4 else b.name) for i, f in enumerate(answer.frames))
    assert correct >= 7, [f.role for f in answer.frames]
    spans = {ap.role: ap for ap in answer.appearances if ap.frames >= 2}
    assert set(spans) == {a.name, b.name}, answer.appearances
    assert spans[a.name].start_s == 0.0 and spans[a.name].end_s in (1.0, 1.5)
    assert spans[b.name].start_s in (2.0, 2.5) and spans[b.name].end_s == 3.5
    assert answer.role in (a.name, b.name) and not answer.unknown
    assert answer.frames[0].filename == "a_then_b.mp4@t=0.00s" and answer.frames[0].whole_image
