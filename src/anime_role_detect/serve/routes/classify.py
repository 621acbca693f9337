"""`POST /api/classify` (one image or video, seed-compatible form) and `POST /api/classify/batch`."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from PIL import Image
from pydantic import BaseModel, Field

from ...errors import UserError
from ...recognition.schema import Answer, Mode, VideoAnswer
from ..deps import LiveDep, ServicesDep, reading, run_model
from ..errors import ApiError, status_for_user_error
from ..live import Loaded
from ..settings import Limits
from ..uploads import Upload, check_count, client_filename, read_upload
from . import ERROR_RESPONSES

router = APIRouter(prefix="/api", tags=["recognition"])

_VIDEO_SUFFIX = {"mp4": ".mp4", "matroska": ".mkv", "avi": ".avi", "mpeg": ".mpg"}


def resolve_mode(mode: Mode | None, use_model: bool, use_deepdanbooru: bool) -> Mode | None:
    """Seed flags -> mode: an explicit `mode` wins, then use_deepdanbooru (fusion), then use_model (model)."""
    if mode is not None:
        return mode
    if use_deepdanbooru:
        return "fusion"
    if use_model:
        return "model"
    return None


def check_pixels(data: bytes, name: str, limits: Limits) -> None:
    """Decompression-bomb guard from the header alone, before any pixel is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
    except Exception:  # noqa: BLE001 - the real decoder reports corrupt data with its own message
        return
    if w * h > limits.max_pixels:
        raise ApiError(413, f"{name}: {w}x{h} pixels is over the {limits.max_pixels:,}-pixel limit "
                            "(decompression-bomb guard); downscale the image", {"filename": name, "limit_pixels": limits.max_pixels})


def recognize_image(loaded: Loaded, up: Upload, mode: Mode | None, rerank: bool | None, limits: Limits) -> Answer:
    """Blocking: one image through the live recognizer."""
    check_pixels(up.data, up.filename, limits)
    with reading(loaded) as rec:
        return rec.recognize_bytes(up.data, up.filename, mode=mode, rerank=rerank)


def recognize_video(loaded: Loaded, up: Upload, sample_fps: float) -> VideoAnswer:
    """Blocking: spool the video to a private temp file (decoders want a path), recognise, delete it."""
    fd, tmp = tempfile.mkstemp(prefix="ard-upload-", suffix=_VIDEO_SUFFIX.get(up.fmt, ".bin"))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(up.data)
        with reading(loaded) as rec:
            return rec.recognize_video(tmp, sample_fps=sample_fps, filename=up.filename)
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
    use_model: Annotated[bool, Form(description="Seed flag: answer with the trained classifier (mode=model).")] = False,
    use_deepdanbooru: Annotated[bool, Form(description="Seed flag: gallery + classifier + tagger (mode=fusion).")] = False,
    mode: Annotated[Mode | None, Form(description="clip (gallery), model (classifier) or fusion; overrides the seed flags.")] = None,
    rerank: Annotated[bool | None, Form(description="Tag-assisted reranking on/off (omitted = the server's default).")] = None,
    sample_fps: Annotated[float | None, Form(gt=0, le=30, description="Videos: frames sampled per second.")] = None,
) -> Answer | VideoAnswer:
    """Answers the seed's ``{filename, role, similarity, boxes}`` plus detections with top-k, tags and
    timings; for a video, the characters' appearance spans and per-frame answers."""
    limits = services.settings.limits
    up = await read_upload(file, limits)
    chosen = resolve_mode(mode, use_model, use_deepdanbooru)
    if up.kind == "video":
        fps = sample_fps or services.settings.video_sample_fps
        return await run_model(services, recognize_video, loaded, up, fps)
    return await run_model(services, recognize_image, loaded, up, chosen, rerank, limits)


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


def recognize_many(loaded: Loaded, items: list[tuple[Image.Image, str]], mode: Mode | None, rerank: bool | None) -> list[Answer]:
    """Blocking: the batch through `recognize_batch` (one forward pass per stage where possible)."""
    with reading(loaded) as rec:
        return rec.recognize_batch(items, mode=mode, rerank=rerank)


def decode_upload(up: Upload, limits: Limits) -> Image.Image:
    """Blocking: safe decode of one image upload under the server's limits."""
    from ...imageio import ImageLimits, decode_image

    check_pixels(up.data, up.filename, limits)
    return decode_image(up.data, up.filename, ImageLimits(max_pixels=limits.max_pixels, max_bytes=limits.max_upload_bytes))


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
    mode: Annotated[Mode | None, Form(description="clip, model or fusion (omitted = the server's default).")] = None,
    rerank: Annotated[bool | None, Form(description="Tag-assisted reranking on/off.")] = None,
) -> BatchAnswer:
    """Each file is checked on its own: a corrupt or oversized file gets its own error item."""
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
    answers = iter(await run_model(services, recognize_many, loaded, good, mode, rerank) if good else [])
    results = [s if isinstance(s, BatchItem) else BatchItem(filename=s[1], status=200, answer=next(answers)) for s in slots]
    ok = sum(r.status == 200 for r in results)
    return BatchAnswer(results=results, ok=ok, failed=len(results) - ok)

