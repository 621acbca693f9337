"""`POST /api/classify` (one image or video, seed-compatible form) and `POST /api/classify/batch`.

Single images go through the micro-batcher (serve/batching.py) when `batching` is on, else one recognizer
call each; videos and explicit batches always run on their own."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, File, Form, UploadFile
from PIL import Image
from pydantic import BaseModel, Field

from ...errors import UserError
from ...imageio import content_hash
from ...recognition.schema import Answer, Mode, VideoAnswer
from ..deps import LiveDep, Services, ServicesDep, reading, request_deadline, run_model
from ..errors import ApiError, status_for_user_error
from ..live import Loaded
from ..settings import Limits
from ..uploads import Upload, check_count, client_filename, decode_upload, read_upload
from . import ERROR_RESPONSES

router = APIRouter(prefix="/api", tags=["recognition"])

_VIDEO_SUFFIX = {"mp4": ".mp4", "matroska": ".mkv", "avi": ".avi", "mpeg": ".mpg"}


@dataclass(frozen=True)
class Options:
    """How a request wants to be recognised; None means the server's default (`recognizer.mode` / `.rerank`)."""

    mode: Mode | None
    rerank: bool | None


def recognition_options(
    use_model: Annotated[bool, Form(description="Seed flag: answer with the trained classifier (mode=model).")] = False,
    use_deepdanbooru: Annotated[bool, Form(description="Seed flag: gallery + classifier + tagger (mode=fusion); wins over use_model.")] = False,
    mode: Annotated[Mode | None, Form(description="clip (gallery), model (classifier) or fusion; wins over the seed flags (omitted = the server's default).")] = None,
    rerank: Annotated[bool | None, Form(description="Tag-assisted reranking on/off (omitted = the server's default).")] = None,
) -> Options:
    """The form fields every recognition path shares (image, video, batch) -> (mode, rerank).

    An explicit `mode` wins, then `use_deepdanbooru` (fusion), then `use_model` (model); `rerank` is taken as given.
    """
    if mode is None and use_deepdanbooru:
        mode = "fusion"
    elif mode is None and use_model:
        mode = "model"
    return Options(mode=mode, rerank=rerank)


OptionsDep = Annotated[Options, Depends(recognition_options)]


def recognize_image(loaded: Loaded, up: Upload, opts: Options, limits: Limits) -> Answer:
    """Blocking: one image through the live recognizer, which decodes the bytes with the server's limits
    (`imageio.decode_image`; too many pixels is `ImageTooLarge`, 413) and hands them to its sinks (the feature log)."""
    with reading(loaded) as rec:
        return rec.recognize_bytes(up.data, up.filename, mode=opts.mode, rerank=opts.rerank)


def decode_and_hash(up: Upload, limits: Limits) -> tuple[Image.Image, str, float]:
    """Blocking: the upload decoded under the server's limits, its content hash (the answer-cache key, as
    `recognize_bytes` uses) and the decode time in ms."""
    t0 = time.perf_counter()
    image = decode_upload(up, limits)
    return image, content_hash(up.data), (time.perf_counter() - t0) * 1e3


async def recognize_batched(services: Services, loaded: Loaded, up: Upload, opts: Options) -> Answer:
    """One image through the micro-batcher: decoded on its own first (a bad image is answered alone and never
    joins a batch), then recognised with whatever other requests arrive within `batching.max_wait_ms`.
    Decode, wait and batch together are bounded by the request timeout (503), as the unbatched path is."""
    batcher = services.batcher
    assert batcher is not None
    limits = services.settings.limits
    with request_deadline(services):
        with batcher.incoming():
            image, sha, decode_ms = await anyio.to_thread.run_sync(decode_and_hash, up, limits,
                                                                   limiter=services.decode_capacity(), abandon_on_cancel=True)
        ans = await batcher.recognize(loaded, image, up.filename, sha, up.data, mode=opts.mode, rerank=opts.rerank)
    timings = dict(ans.timings_ms)  # as recognize_bytes reports it: decode time, and in the total
    timings["decode"] = round(decode_ms, 2)
    timings["total"] = round(timings.get("total", 0.0) + decode_ms, 2)
    return ans.model_copy(update={"timings_ms": timings})


def recognize_video(loaded: Loaded, up: Upload, sample_fps: float, opts: Options) -> VideoAnswer:
    """Blocking: spool the video to a private temp file (decoders want a path), recognise, delete it."""
    fd, tmp = tempfile.mkstemp(prefix="ard-upload-", suffix=_VIDEO_SUFFIX.get(up.fmt, ".bin"))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(up.data)
        with reading(loaded) as rec:
            return rec.recognize_video(tmp, sample_fps=sample_fps, mode=opts.mode, rerank=opts.rerank, filename=up.filename)
    finally:
        os.unlink(tmp)


@router.post(
    "/classify",
    response_model=Answer | VideoAnswer,
    summary="Name the characters in one image or video",
    responses=ERROR_RESPONSES,
)
async def classify(
    services: ServicesDep,
    loaded: LiveDep,
    file: Annotated[UploadFile, File(description="The image or video; its type is detected from the content, not the name.")],
    opts: OptionsDep,
    sample_fps: Annotated[float | None, Form(gt=0, le=30, description="Videos: frames sampled per second.")] = None,
) -> Answer | VideoAnswer:
    """Answers the seed's ``{filename, role, similarity, boxes}`` plus detections with top-k, tags and
    timings; for a video, the characters' appearance spans and per-frame answers."""
    limits = services.settings.limits
    up = await read_upload(file, limits)
    if up.kind == "video":
        fps = sample_fps or services.settings.video_sample_fps
        return await run_model(services, recognize_video, loaded, up, fps, opts)
    if services.batcher is not None:
        return await recognize_batched(services, loaded, up, opts)
    return await run_model(services, recognize_image, loaded, up, opts, limits)


class BatchItem(BaseModel):
    """The result for one file of a batch: an answer, or the error that file caused."""

    filename: str = Field(description="Name of the file as uploaded.")
    status: int = Field(description="HTTP-style status of this file: 200, or the error code it would have had alone.")
    answer: Answer | None = Field(default=None, description="Recognition result (status 200).")
    error: str | None = Field(default=None, description="Why this file could not be recognised.")


class BatchAnswer(BaseModel):
    """Results in upload order; one bad file does not fail the others."""

    results: list[BatchItem] = Field(description="One item per uploaded file, in order.")
    ok: int = Field(description="Files answered.")
    failed: int = Field(description="Files refused.")


def recognize_many(loaded: Loaded, items: list[tuple[Image.Image, str]], opts: Options) -> list[Answer]:
    """Blocking: the batch through `recognize_batch` (one forward pass per stage where possible)."""
    with reading(loaded) as rec:
        return rec.recognize_batch(items, mode=opts.mode, rerank=opts.rerank)


@router.post(
    "/classify/batch",
    response_model=BatchAnswer,
    summary="Name the characters in several images at once",
    responses=ERROR_RESPONSES,
)
async def classify_batch(
    services: ServicesDep,
    loaded: LiveDep,
    files: Annotated[list[UploadFile], File(description="Images (videos go to /api/classify one at a time).")],
    opts: OptionsDep,
) -> BatchAnswer:
    """Each file is checked on its own: a corrupt or oversized file gets its own error item. The mode and rerank
    fields (and the seed flags) mean what they mean on /api/classify and apply to every file."""
    limits = services.settings.limits
    check_count(files, limits, "images")
    slots: list[BatchItem | tuple[Image.Image, str]] = []
    for i, f in enumerate(files):
        try:
            up = await read_upload(f, limits, index=i, allow_video=False)
            slots.append((await run_model(services, decode_upload, up, limits), up.filename))
        except ApiError as exc:
            slots.append(BatchItem(filename=client_filename(f.filename, i), status=exc.status_code, error=exc.error))
        except UserError as exc:
            slots.append(BatchItem(filename=client_filename(f.filename, i), status=status_for_user_error(exc), error=str(exc)))
    good = [s for s in slots if not isinstance(s, BatchItem)]
    answers = iter(await run_model(services, recognize_many, loaded, good, opts) if good else [])
    results = [s if isinstance(s, BatchItem) else BatchItem(filename=s[1], status=200, answer=next(answers)) for s in slots]
    ok = sum(r.status == 200 for r in results)
    return BatchAnswer(results=results, ok=ok, failed=len(results) - ok)

