"""Video: frame sampling (PyAV and OpenCV), appearance aggregation, recognize_video, and bad videos.

The video is generated in the test (synthetic character A for seconds 0-2, B for 2-4) and decoded by
the real code; the recognizer is a small deterministic classifier that
implements ``recognize_batch`` from the characters' colours (the pipeline's `Recognizer` has the same method).
"""

from __future__ import annotations

import random
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from anime_role_detect.data.synthetic import HAIR_COLORS, OUTFIT_COLORS, CharacterSpec, render_character
from anime_role_detect.errors import ConfigError, ImageError, UserError
from anime_role_detect.recognition.schema import UNKNOWN, Answer, Detection, TopK
from anime_role_detect.recognition.video import (
    aggregate_appearances,
    default_max_gap,
    iter_video_frames,
    recognize_video,
    video_info,
)

FPS = 8
SIZE = 96


def write_video(path: Path, frames: list[Image.Image], fps: int = FPS, codec: str = "mpeg4") -> Path:
    """Encode RGB frames into a video file with PyAV."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


class ColourRecognizer:
    """Deterministic stand-in for the pipeline: scores each character by how many pixels carry its
    hair and outfit colours (whole image, one detection); below `threshold` the answer is unknown."""

    def __init__(self, specs: list[CharacterSpec], threshold: float = 0.02) -> None:
        self.names = [s.name for s in specs]
        self.colours = [np.array([HAIR_COLORS[s.hair_color], OUTFIT_COLORS[s.outfit_color]], np.float32) for s in specs]
        self.threshold = threshold
        self.calls: list[list[str]] = []

    def scores(self, img: Image.Image) -> np.ndarray:
        px = np.asarray(img.convert("RGB"), np.float32).reshape(-1, 1, 3)
        return np.array([(np.linalg.norm(px - c[None], axis=2) < 45).mean() for c in self.colours])

    def recognize_batch(self, items: list[tuple[Image.Image, str]], mode: str | None = None, **_: object) -> list[Answer]:
        self.calls.append([name for _, name in items])
        out = []
        for img, name in items:
            sims = self.scores(img)
            best = int(np.argmax(sims))
            sim = float(sims[best])
            unknown = sim < self.threshold
            role = UNKNOWN if unknown else self.names[best]
            box = [0.0, 0.0, float(img.width), float(img.height)]
            det = Detection(box=box, role=role, similarity=sim, unknown=unknown,
                            topk=[TopK(role=self.names[i], score=float(sims[i])) for i in np.argsort(-sims)])
            out.append(Answer(filename=name, role=role, similarity=sim, boxes=[box], unknown=unknown,
                              whole_image=True, detections=[det], mode=mode or "clip"))
        return out


@pytest.fixture(scope="module")
def two_characters() -> tuple[CharacterSpec, CharacterSpec]:
    """Two characters whose colours (blue vs red) no background of the default style carries."""
    a = CharacterSpec("blue_girl", "series_a", "blue", "green", "long", "none", "blue")
    b = CharacterSpec("red_girl", "series_b", "red", "yellow", "twintails", "ribbon", "red")
    return a, b


@pytest.fixture(scope="module")
def a_then_b_video(tmp_path_factory, two_characters) -> Path:
    """4 s at 8 fps: character A for 0-2 s, character B for 2-4 s (new pose every frame)."""
    a, b = two_characters
    rng = random.Random(0)
    frames = [render_character(a if i < 2 * FPS else b, rng, SIZE)[0] for i in range(4 * FPS)]
    return write_video(tmp_path_factory.mktemp("video") / "a_then_b.mp4", frames)


@pytest.fixture(scope="module")
def recognizer(two_characters) -> ColourRecognizer:
    return ColourRecognizer(list(two_characters))


@pytest.mark.parametrize("backend", ["av", "opencv"])
def test_frames_are_sampled_at_the_requested_rate(a_then_b_video, backend):
    frames = list(iter_video_frames(a_then_b_video, sample_fps=2.0, backend=backend))
    assert [t for t, _ in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5], abs=1e-3)
    assert all(img.mode == "RGB" and img.size == (SIZE, SIZE) for _, img in frames)


def test_keyframe_backend_samples_only_key_frames(a_then_b_video):
    every = [t for t, _ in iter_video_frames(a_then_b_video, sample_fps=100.0)]
    with av.open(str(a_then_b_video)) as container:
        keys = [round(float(p.pts * p.time_base), 3) for p in container.demux(video=0) if p.is_keyframe and p.pts is not None]
    fast = [t for t, _ in iter_video_frames(a_then_b_video, sample_fps=100.0, backend="av_keyframes")]
    assert fast == sorted(keys) and 1 <= len(fast) < len(every) and set(fast) <= set(every)
    # at 1 fps each tick takes the first key frame at or after it
    ticks = [t for t, _ in iter_video_frames(a_then_b_video, sample_fps=1.0, backend="av_keyframes")]
    assert ticks[0] == 0.0 and set(ticks) <= set(keys) and ticks == sorted(set(ticks))


def test_sampling_faster_than_the_video_gives_every_frame_once(a_then_b_video):
    times = [t for t, _ in iter_video_frames(a_then_b_video, sample_fps=100.0)]
    assert len(times) == 4 * FPS and times == sorted(set(times))


def test_max_frames_stops_early(a_then_b_video):
    assert len(list(iter_video_frames(a_then_b_video, sample_fps=4.0, max_frames=3))) == 3


def test_video_info_reads_the_container(a_then_b_video):
    info = video_info(a_then_b_video)
    assert info.duration_s == pytest.approx(4.0, abs=0.2)
    assert info.fps == pytest.approx(FPS) and (info.width, info.height) == (SIZE, SIZE)


def test_recognize_video_gives_the_right_time_ranges(a_then_b_video, recognizer, two_characters):
    a, b = two_characters
    recognizer.calls.clear()
    answer = recognize_video(recognizer, a_then_b_video, sample_fps=2.0, batch_size=3, mode="model")
    spans = [(ap.role, ap.start_s, ap.end_s, ap.frames) for ap in answer.appearances]
    assert spans == [(a.name, 0.0, 1.5, 4), (b.name, 2.0, 3.5, 4)]
    # batches went through the recognizer as batches, frames named by their time
    assert [len(c) for c in recognizer.calls] == [3, 3, 2]
    assert recognizer.calls[0][1] == "a_then_b.mp4@t=0.50s"
    assert len(answer.frames) == 8 and all(f.mode == "model" for f in answer.frames)
    assert answer.duration_s == pytest.approx(4.0, abs=0.2) and answer.sample_fps == 2.0
    assert answer.role in (a.name, b.name) and not answer.unknown
    best = next(ap for ap in answer.appearances if ap.role == answer.role)
    assert answer.similarity == best.best_similarity and answer.boxes == [best.best_box]
    assert best.start_s <= best.best_frame_s <= best.end_s
    assert {"decode", "recognize", "aggregate", "total"} <= set(answer.timings_ms)
    # the same answer through OpenCV decoding
    again = recognize_video(recognizer, a_then_b_video, sample_fps=2.0, batch_size=8, backend="opencv", mode="model")
    assert [(ap.role, ap.start_s, ap.end_s) for ap in again.appearances] == [s[:3] for s in spans]


def test_video_with_nobody_known_is_unknown(a_then_b_video, recognizer):
    strict = ColourRecognizer([], threshold=1.01)
    strict.names, strict.colours = recognizer.names, recognizer.colours
    answer = recognize_video(strict, a_then_b_video, sample_fps=1.0)
    assert answer.unknown and answer.role == UNKNOWN and answer.appearances == [] and len(answer.frames) == 4


# --------------------------------------------------------------------------------------------- aggregation


def _answer(t: float, *dets: tuple[str, float]) -> tuple[float, Answer]:
    detections = [
        Detection(box=[i * 10.0, 0.0, i * 10.0 + 5, 5.0], role=r, similarity=s, unknown=r == UNKNOWN)
        for i, (r, s) in enumerate(dets)
    ]
    top = max(detections, key=lambda d: d.similarity) if detections else None
    return t, Answer(filename=f"v@t={t}", role=top.role if top else UNKNOWN, similarity=top.similarity if top else 0.0,
                     boxes=[d.box for d in detections], detections=detections, unknown=top is None or top.unknown)


def test_aggregate_splits_on_gaps_and_keeps_the_best_frame():
    frames = [
        _answer(0.0, ("aoba", 0.7)), _answer(1.0, ("aoba", 0.9), ("hifumi", 0.6)), _answer(2.0, ("aoba", 0.8)),
        _answer(3.0, (UNKNOWN, 0.2)), _answer(4.0), _answer(5.0, ("aoba", 0.75)), _answer(6.0, ("hifumi", 0.65)),
    ]
    spans = aggregate_appearances(list(reversed(frames)), max_gap_s=1.5)  # input order does not matter
    got = [(s.role, s.start_s, s.end_s, s.frames, s.best_frame_s) for s in spans]
    assert got == [("aoba", 0.0, 2.0, 3, 1.0), ("hifumi", 1.0, 1.0, 1, 1.0), ("aoba", 5.0, 5.0, 1, 5.0), ("hifumi", 6.0, 6.0, 1, 6.0)]
    assert spans[0].best_similarity == 0.9 and spans[0].best_box == [0.0, 0.0, 5.0, 5.0]
    assert spans[1].best_box == [10.0, 0.0, 15.0, 5.0]  # hifumi was the second detection in that frame
    # a wider gap bridges the missing frames; min_frames drops one-frame flicker
    bridged = aggregate_appearances(frames, max_gap_s=3.0, min_frames=2)
    assert [(s.role, s.start_s, s.end_s, s.frames) for s in bridged] == [("aoba", 0.0, 5.0, 4)]


def test_aggregate_counts_a_character_once_per_frame_and_defaults_the_gap():
    times = (0.0, 0.5, 1.0, 1.5, 2.5, 4.5)
    frames = [_answer(t, ("rin", 0.5), ("rin", 0.8)) for t in times]
    spans = aggregate_appearances(frames)  # default gap: 2.5 x median spacing (0.5 s) = 1.25 s
    assert default_max_gap(times) == pytest.approx(1.25) and default_max_gap((), sample_fps=2.0) == pytest.approx(1.25)
    assert [(s.start_s, s.end_s, s.frames, s.best_similarity) for s in spans] == [(0.0, 2.5, 5, 0.8), (4.5, 4.5, 1, 0.8)]
    assert aggregate_appearances([]) == []


# --------------------------------------------------------------------------------------------- bad input


def test_bad_videos_fail_with_one_clear_error(tmp_path, a_then_b_video):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    picture = tmp_path / "picture.mp4"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(picture, format="PNG")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(a_then_b_video.read_bytes()[:300])
    cases = {
        tmp_path / "missing.mp4": "no such video file",
        text: "not a readable video",
        empty: "empty",
        picture: "png image, not a video",
        truncated: "",
    }
    for path, phrase in cases.items():
        for backend in ("av", "opencv"):
            with pytest.raises(ImageError) as err:
                list(iter_video_frames(path, 1.0, backend=backend))
            msg = str(err.value)
            assert str(path) in msg and phrase in msg and "\n" not in msg, msg


@pytest.mark.parametrize("backend", ["av", "opencv"])
def test_a_video_without_frames_is_an_error(tmp_path, backend):
    path = tmp_path / "no_frames.avi"  # a valid AVI header with a video stream and zero frames
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=FPS)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    with pytest.raises(ImageError, match="no decodable frames") as err:
        list(iter_video_frames(path, 1.0, backend=backend))
    assert str(path) in str(err.value)


def test_bad_sampling_options_are_config_errors(a_then_b_video, recognizer):
    with pytest.raises(ConfigError, match="sample_fps"):
        list(iter_video_frames(a_then_b_video, 0))
    with pytest.raises(ConfigError, match="backend"):
        list(iter_video_frames(a_then_b_video, 1.0, backend="gstreamer"))
    with pytest.raises(ConfigError, match="batch_size"):
        recognize_video(recognizer, a_then_b_video, batch_size=0)
    with pytest.raises(UserError, match="max_gap_s"):
        aggregate_appearances([_answer(0.0, ("a", 0.9))], max_gap_s=-1)
