"""Video recognition: sample frames at a fixed rate, recognise them in batches, merge into appearances.

`iter_video_frames` decodes with PyAV (default) or OpenCV and yields ``(t_seconds, PIL image)`` at
``sample_fps``; `aggregate_appearances` turns per-frame answers into per-character time spans
(``schema.Appearance``); `recognize_video` runs the two around any object with a
``recognize_batch(list[(image, filename)], ...)`` method (the pipeline's `Recognizer`).
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from PIL import Image

from ..errors import ConfigError, ImageError
from ..imageio import sniff
from .schema import UNKNOWN, Answer, Appearance, VideoAnswer

Frame = tuple[float, Image.Image]


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video (duration/fps may be 0 when the container does not tell)."""

    duration_s: float
    fps: float
    width: int
    height: int
    frames: int


# --------------------------------------------------------------------------------------------- decoding


def _check_video_file(path: Path) -> None:
    """Fail early, naming the file, for a missing file, an empty file or an image given as a video."""
    if not path.is_file():
        raise ImageError(f"{path}: no such video file; check the path")
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head:
        raise ImageError(f"{path}: the file is empty; give an MP4, MKV, WEBM, AVI or MOV video")
    kind = sniff(head)
    if kind is not None and kind[0] == "image":
        raise ImageError(f"{path}: this is a {kind[1]} image, not a video; pass it as image= instead of video=")


def _av_frames(path: Path, sample_fps: float, max_frames: int | None, keyframes_only: bool = False) -> Iterator[Frame]:
    """PyAV decoding; `keyframes_only` asks the decoder to skip every non-key frame (fast scan of long videos)."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise ImageError(f"{path}: not a readable video ({exc}); give an MP4, MKV, WEBM, AVI or MOV file") from None
    with container:
        if not container.streams.video:
            raise ImageError(f"{path}: the file has no video stream; give a video file")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if keyframes_only:
            stream.codec_context.skip_frame = "NONKEY"
        step = 1.0 / sample_fps
        next_t, n = 0.0, 0
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) - start if frame.time is not None else n * step
                if t + 1e-6 < next_t:
                    continue
                yield round(t, 3), frame.to_image()
                n += 1
                next_t = (math.floor(t / step + 1e-6) + 1) * step
                if max_frames is not None and n >= max_frames:
                    return
        except av.error.FFmpegError as exc:
            if n == 0:
                raise ImageError(f"{path}: the video data is corrupt ({exc}); re-encode or re-download it") from None
            # a truncated tail: keep the frames decoded so far


def _opencv_frames(path: Path, sample_fps: float, max_frames: int | None) -> Iterator[Frame]:
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ImageError(f"{path}: not a readable video (OpenCV cannot open it); give an MP4, MKV, WEBM, AVI or MOV file")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        step = 1.0 / sample_fps
        next_t, n, index = 0.0, 0, 0
        while True:
            ok = cap.grab()
            if not ok:
                return
            pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC)
            t = index / fps if fps > 0 else pos_ms / 1000.0
            index += 1
            if t + 1e-6 < next_t:
                continue
            ok, bgr = cap.retrieve()
            if not ok:
                return
            yield round(t, 3), Image.fromarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            n += 1
            next_t = (math.floor(t / step + 1e-6) + 1) * step
            if max_frames is not None and n >= max_frames:
                return
    finally:
        cap.release()


#: Frame decoders by name (``video.backend`` in config).
#: ``av_keyframes`` decodes key frames only (the first key frame at or after each sampling tick): several
#: times faster on long videos, at the cost of sampling times that follow the key-frame spacing.
VIDEO_BACKENDS: dict[str, Callable[[Path, float, int | None], Iterator[Frame]]] = {
    "av": _av_frames,
    "av_keyframes": functools.partial(_av_frames, keyframes_only=True),
    "opencv": _opencv_frames,
}


def iter_video_frames(
    path: str | Path, sample_fps: float = 1.0, backend: str = "av", max_frames: int | None = None
) -> Iterator[Frame]:
    """Yield ``(t_seconds, RGB PIL image)`` for frames sampled every ``1 / sample_fps`` seconds, from t=0.

    Raises `ImageError` naming the file when it is missing, not a video, or yields no frame at all.
    """
    if not sample_fps or sample_fps <= 0:
        raise ConfigError(f"sample_fps={sample_fps} must be > 0 (frames sampled per second, e.g. 1 or 2)")
    decoder = VIDEO_BACKENDS.get(backend)
    if decoder is None:
        raise ConfigError(f"video backend {backend!r} is unknown; choose from {', '.join(sorted(VIDEO_BACKENDS))}")
    path = Path(path)
    _check_video_file(path)
    n = 0
    for item in decoder(path, float(sample_fps), max_frames):
        n += 1
        yield item
    if n == 0:
        raise ImageError(f"{path}: the video has no decodable frames; check that it plays and re-encode it (e.g. H.264 MP4)")


def video_info(path: str | Path) -> VideoInfo:
    """Duration, frame rate, size and frame count from the container (PyAV), without decoding."""
    import av

    path = Path(path)
    _check_video_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ImageError(f"{path}: the file has no video stream; give a video file")
            s = container.streams.video[0]
            fps = float(s.average_rate) if s.average_rate else 0.0
            if s.duration is not None and s.time_base is not None:
                duration = float(s.duration * s.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            else:
                duration = 0.0
            return VideoInfo(duration, fps, s.codec_context.width, s.codec_context.height, int(s.frames or 0))
    except av.error.FFmpegError as exc:
        raise ImageError(f"{path}: not a readable video ({exc}); give an MP4, MKV, WEBM, AVI or MOV file") from None


# --------------------------------------------------------------------------------------------- aggregation


#: Gap, in sampling intervals, that still continues a span: 2.5 bridges one missed frame, not two.
GAP_INTERVALS = 2.5


def default_max_gap(times: Iterable[float], sample_fps: float | None = None) -> float:
    """`GAP_INTERVALS` sampling intervals (from `sample_fps`, else the median spacing of `times`)."""
    if sample_fps:
        return GAP_INTERVALS / sample_fps
    ts = sorted(times)
    gaps = sorted(b - a for a, b in zip(ts, ts[1:]) if b > a)
    return GAP_INTERVALS * gaps[len(gaps) // 2] if gaps else 0.0


def _frame_hits(answer: Answer) -> dict[str, tuple[float, str, list[float]]]:
    """Known characters in one frame: role -> (best similarity, series, box). A role seen twice counts once."""
    hits: dict[str, tuple[float, str, list[float]]] = {}
    candidates = [(d.role, d.series, d.similarity, d.box, d.unknown) for d in answer.detections]
    if not candidates:  # an answer without detections still names its role
        box = answer.boxes[0] if answer.boxes else []
        candidates = [(answer.role, answer.series, answer.similarity, box, answer.unknown)]
    for role, series, sim, box, unknown in candidates:
        if unknown or not role or role == UNKNOWN:
            continue
        if role not in hits or sim > hits[role][0]:
            hits[role] = (float(sim), series, list(box))
    return hits


def aggregate_appearances(
    frame_answers: Sequence[tuple[float, Answer]], max_gap_s: float | None = None, min_frames: int = 1
) -> list[Appearance]:
    """Merge per-frame answers into per-character spans, ordered by start time.

    A character's span continues while consecutive sightings are at most `max_gap_s` apart (default
    `default_max_gap`: one missed frame is bridged, two split the span); spans with fewer than
    `min_frames` sightings are dropped as flicker.
    """
    frames = sorted(frame_answers, key=lambda ta: ta[0])
    if max_gap_s is None:
        max_gap_s = default_max_gap(t for t, _ in frames)
    if max_gap_s < 0:
        raise ConfigError(f"max_gap_s={max_gap_s} must be >= 0 seconds")
    open_spans: dict[str, Appearance] = {}
    done: list[Appearance] = []
    for t, answer in frames:
        for role, (sim, series, box) in _frame_hits(answer).items():
            span = open_spans.get(role)
            if span is not None and t - span.end_s > max_gap_s:
                done.append(span)
                span = None
            if span is None:
                open_spans[role] = Appearance(
                    role=role, series=series, start_s=t, end_s=t, frames=1,
                    best_similarity=sim, best_frame_s=t, best_box=box,
                )
                continue
            span.end_s, span.frames = t, span.frames + 1
            if sim > span.best_similarity:
                span.best_similarity, span.best_frame_s, span.best_box = sim, t, box
            if not span.series and series:
                span.series = series
    done.extend(open_spans.values())
    kept = [a for a in done if a.frames >= min_frames]
    return sorted(kept, key=lambda a: (a.start_s, a.role))


# --------------------------------------------------------------------------------------------- recognition


class BatchRecognizer(Protocol):
    """What `recognize_video` needs from the pipeline: batched recognition of named images."""

    def recognize_batch(self, items: list[tuple[Image.Image, str]], **kwargs: Any) -> list[Answer]: ...


def recognize_video(
    recognizer: BatchRecognizer,
    path: str | Path,
    sample_fps: float = 1.0,
    batch_size: int = 8,
    max_gap_s: float | None = None,
    min_frames: int = 1,
    backend: str = "av",
    max_frames: int | None = None,
    filename: str | None = None,
    on_batch: Callable[[int, float], None] | None = None,
    **recognize_kwargs: Any,
) -> VideoAnswer:
    """Recognise a video: sampled frames -> ``recognizer.recognize_batch`` in batches -> appearances.

    ``recognize_kwargs`` (e.g. ``mode``, ``rerank``) go to every ``recognize_batch`` call unchanged;
    `on_batch(frames_done, t_seconds)` reports progress.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    path = Path(path)
    name = filename or path.name
    kwargs = {k: v for k, v in recognize_kwargs.items() if v is not None}
    t_start = time.perf_counter()
    decode_s = recog_s = 0.0
    frame_answers: list[tuple[float, Answer]] = []
    frames = iter_video_frames(path, sample_fps, backend=backend, max_frames=max_frames)
    while True:
        t0 = time.perf_counter()
        batch = list(itertools.islice(frames, batch_size))
        decode_s += time.perf_counter() - t0
        if not batch:
            break
        t0 = time.perf_counter()
        answers = recognizer.recognize_batch([(img, f"{name}@t={t:.2f}s") for t, img in batch], **kwargs)
        recog_s += time.perf_counter() - t0
        if len(answers) != len(batch):
            raise RuntimeError(f"recognize_batch returned {len(answers)} answers for {len(batch)} frames")
        frame_answers.extend((t, a) for (t, _), a in zip(batch, answers))
        if on_batch is not None:
            on_batch(len(frame_answers), batch[-1][0])
    t0 = time.perf_counter()
    gap = default_max_gap((), sample_fps) if max_gap_s is None else max_gap_s
    appearances = aggregate_appearances(frame_answers, max_gap_s=gap, min_frames=min_frames)
    agg_s = time.perf_counter() - t0
    try:
        duration = video_info(path).duration_s
    except ImageError:
        duration = 0.0
    duration = duration or (frame_answers[-1][0] if frame_answers else 0.0)
    return _video_answer(name, frame_answers, appearances, sample_fps, duration, {
        "decode": decode_s * 1e3, "recognize": recog_s * 1e3, "aggregate": agg_s * 1e3,
        "total": (time.perf_counter() - t_start) * 1e3,
    })


def _video_answer(
    name: str, frame_answers: list[tuple[float, Answer]], appearances: list[Appearance],
    sample_fps: float, duration_s: float, timings_ms: dict[str, float],
) -> VideoAnswer:
    """The summary answer: the character seen in the most sampled frames, with its best frame's boxes."""
    frames_by_role: dict[str, int] = {}
    best: dict[str, Appearance] = {}
    for a in appearances:
        frames_by_role[a.role] = frames_by_role.get(a.role, 0) + a.frames
        if a.role not in best or a.best_similarity > best[a.role].best_similarity:
            best[a.role] = a
    mode = frame_answers[0][1].mode if frame_answers else "clip"
    common = dict(
        filename=name, mode=mode, duration_s=round(duration_s, 3), sample_fps=sample_fps,
        appearances=appearances, frames=[a for _, a in frame_answers],
        timings_ms={k: round(v, 2) for k, v in timings_ms.items()},
    )
    if not frames_by_role:
        return VideoAnswer(role=UNKNOWN, similarity=0.0, unknown=True, **common)
    role = max(frames_by_role, key=lambda r: (frames_by_role[r], best[r].best_similarity))
    top = best[role]
    return VideoAnswer(
        role=role, similarity=top.best_similarity, boxes=[top.best_box] if top.best_box else [], unknown=False, **common
    )


__all__ = [
    "VideoInfo", "iter_video_frames", "video_info", "aggregate_appearances", "default_max_gap", "recognize_video",
    "BatchRecognizer", "VIDEO_BACKENDS",
]
