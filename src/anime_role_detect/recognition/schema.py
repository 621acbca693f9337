"""The one answer schema, shared by `infer.py`, the REST API and the logs.

A superset of the seed's ``{filename, role, similarity, boxes}``: ``role``/``similarity`` are the
best detection's name and score, ``boxes`` all detection boxes as ``[x1, y1, x2, y2]`` pixels.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

UNKNOWN = "unknown"
Mode = Literal["clip", "model", "fusion"]


class TopK(BaseModel):
    """One candidate character and its score."""

    role: str = Field(description="Character name.")
    series: str = Field(default="", description="Series (work) the character is from, when known.")
    score: float = Field(description="Similarity/probability in [0, 1] after reranking; higher is better.")


class TagScore(BaseModel):
    """A tag predicted for the crop."""

    tag: str = Field(description="Danbooru-style tag, e.g. 'long_hair'.")
    score: float = Field(description="Tagger confidence in [0, 1].")


class Rerank(BaseModel):
    """What tag-assisted reranking did for a detection."""

    tags_used: list[str] = Field(default_factory=list, description="Tags that moved the decision.")
    delta: float = Field(default=0.0, description="How far the tags moved the final answer: its probability's change in "
                         "model and fusion modes, the shift its cosine was ranked with in clip mode.")
    changed: bool = Field(default=False, description="True when reranking changed the top answer.")


class Detection(BaseModel):
    """One character found in the image."""

    box: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the input image.")
    detector_score: float = Field(default=1.0, description="Detector confidence (1.0 when the whole image was used).")
    role: str = Field(description="Final character name, or 'unknown' when nobody in the gallery matches.")
    series: str = Field(default="", description="Series of the final character, when known.")
    similarity: float = Field(description="Score of the final answer in [0, 1]: its gallery cosine in clip mode, its "
                              "probability in model and fusion modes (with the tags' evidence when reranking ran).")
    unknown: bool = Field(default=False, description="True when `openset_score` is below the open-set threshold.")
    openset_score: float | None = Field(default=None, description="The score the open-set threshold was compared with: the "
                                        "mode's top score, or in fusion the best gallery cosine (null with open-set off).")
    topk: list[TopK] = Field(default_factory=list, description="Best candidates, best first (in clip mode with reranking "
                             "the tags set the order and each keeps its own cosine).")
    tags: list[TagScore] = Field(default_factory=list, description="Tags predicted for this crop.")
    rerank: Rerank | None = Field(default=None, description="Reranking details, when reranking ran.")


class Answer(BaseModel):
    """Recognition result for one image (or one video frame)."""

    filename: str = Field(description="Name of the input file as given by the client.")
    role: str = Field(description="Best detection's character name ('unknown' when none matched).")
    series: str = Field(default="", description="Series of `role`, when known.")
    similarity: float = Field(description="Best detection's score in [0, 1].")
    boxes: list[list[float]] = Field(default_factory=list, description="All detection boxes, [x1, y1, x2, y2] pixels.")
    unknown: bool = Field(default=False, description="True when no detection matched a known character.")
    mode: Mode = Field(default="clip", description="Recognition mode: clip (gallery), model (classifier), fusion (both + tagger).")
    whole_image: bool = Field(default=False, description="True when no detector ran or it found nothing, so the whole image was used.")
    detections: list[Detection] = Field(default_factory=list, description="One entry per detected character.")
    timings_ms: dict[str, float] = Field(default_factory=dict, description="Milliseconds per stage (decode, detect, embed, search, classify, tag, rerank, total).")
    image_sha256: str = Field(default="", description="Content hash of the input (cache key and log key).")
    version: str = Field(default="", description="Registry version (gallery/model) that answered.")
    width: int = Field(default=0, description="Input image width in pixels.")
    height: int = Field(default=0, description="Input image height in pixels.")
    record_id: str | None = Field(default=None, description="Feature-log record of this answer: send it to /api/feedback "
                                                            "(null when no feature log is kept).")


class Appearance(BaseModel):
    """A character's appearance span in a video."""

    role: str = Field(description="Character name.")
    series: str = Field(default="", description="Series of the character.")
    start_s: float = Field(description="First sampled time the character was seen, seconds.")
    end_s: float = Field(description="Last sampled time the character was seen, seconds.")
    frames: int = Field(description="Number of sampled frames with this character.")
    best_similarity: float = Field(description="Highest score over its frames.")
    best_frame_s: float = Field(description="Time of the frame with the highest score.")
    best_box: list[float] = Field(default_factory=list, description="Box in the best frame.")


class VideoAnswer(BaseModel):
    """Recognition result for a video: per-character appearances and per-frame answers."""

    filename: str = Field(description="Name of the input video.")
    role: str = Field(description="Character with the most sampled frames ('unknown' if none).")
    similarity: float = Field(description="That character's best score.")
    boxes: list[list[float]] = Field(default_factory=list, description="Boxes of that character's best frame.")
    unknown: bool = Field(default=False, description="True when no known character appeared.")
    mode: Mode = Field(default="clip", description="Recognition mode used for the frames.")
    duration_s: float = Field(default=0.0, description="Video duration in seconds, when known.")
    sample_fps: float = Field(default=1.0, description="Frames sampled per second.")
    appearances: list[Appearance] = Field(default_factory=list, description="One span per character appearance.")
    frames: list[Answer] = Field(default_factory=list, description="Per sampled frame answers (filename is 'name@t=..s').")
    timings_ms: dict[str, float] = Field(default_factory=dict, description="Milliseconds per stage.")
