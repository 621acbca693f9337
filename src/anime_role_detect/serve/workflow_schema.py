"""The request, status and outcome models of `/api/workflow` (pydantic, documented in OpenAPI), and the plain-JSON
form of a runner's result: what the service, its job processes and its clients share."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
FINISHED: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.'()\-]{0,79}$"
TAG_PATTERN = r"^[^\s\x00-\x1f]*$"  # one booru tag: no spaces (they would add more search terms), no control characters


class CharacterIn(BaseModel):
    """A character to collect images for and train on."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME_PATTERN, description="Character name, e.g. 'suzukaze_aoba' (letters, digits, space, _ . ' ( ) -).")
    series: str = Field(default="", max_length=80, pattern=r"^[^\x00-\x1f]*$", description="Series (work) the character is from.")
    tag: str = Field(default="", max_length=120, pattern=TAG_PATTERN,
                     description="Booru tag to collect by, e.g. 'suzukaze_aoba'; empty = derived from name + series ('name_(series)').")


class WorkflowParams(BaseModel):
    """Training parameters a client may set; each must also be enabled in `workflow.params` of serve.yaml."""

    model_config = ConfigDict(extra="forbid")
    epochs: int | None = Field(default=None, ge=1, le=200, description="Training epochs.")
    images_per_character: int | None = Field(default=None, ge=1, le=2000, description="Images to collect per character.")
    image_size: int | None = Field(default=None, ge=32, le=1024, description="Training image side in pixels.")
    batch_size: int | None = Field(default=None, ge=1, le=512, description="Training batch size.")
    learning_rate: float | None = Field(default=None, gt=0, le=1, description="Optimizer learning rate.")
    model: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,64}$", description="Model config from conf/model/, e.g. 'efficientnet_lite0' or 'tiny'.")
    val_fraction: float | None = Field(default=None, gt=0, lt=1, description="Share of images held out for validation.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Random seed.")


class WorkflowRequest(BaseModel):
    """Start the collect -> clean -> train -> gallery -> registry workflow."""

    model_config = ConfigDict(extra="forbid")
    characters: list[CharacterIn] = Field(min_length=1, max_length=200, description="Characters to learn.")
    params: WorkflowParams = Field(default_factory=WorkflowParams, description="Training parameters (omitted = server defaults).")


class StageStatus(BaseModel):
    """Latest progress of one workflow stage."""

    stage: str = Field(description="Stage name (collect, clean, split, train, gallery, registry, ...).")
    done: int = Field(description="Units done.")
    total: int = Field(description="Units in the stage (0 when unknown).")
    percent: float = Field(description="done/total in percent.")
    message: str = Field(default="", description="Latest message of the stage.")


class WorkflowOutcome(BaseModel):
    """What a finished workflow produced."""

    version_id: str | None = Field(default=None, description="Registry version created (live when promoted).")
    metrics: dict[str, Any] = Field(default_factory=dict, description="Evaluation metrics of the new version.")
    summary: Any = Field(default=None, description="Run summary from the workflow.")


class WorkflowStatus(BaseModel):
    """State of one workflow job."""

    id: str = Field(description="Job id.")
    status: JobStatus = Field(description="queued, running, cancelling, succeeded, failed or cancelled.")
    created: float = Field(description="Unix time the job was created.")
    started: float | None = Field(default=None, description="Unix time it started running.")
    finished: float | None = Field(default=None, description="Unix time it ended.")
    characters: list[CharacterIn] = Field(description="Characters requested.")
    params: dict[str, Any] = Field(default_factory=dict, description="Parameters applied.")
    stages: list[StageStatus] = Field(default_factory=list, description="Latest event per stage, in order of first appearance.")
    log: list[str] = Field(default_factory=list, description="Most recent log lines (newest last).")
    events: int = Field(default=0, description="Events emitted so far (the stream's last id).")
    result: WorkflowOutcome | None = Field(default=None, description="Outcome when succeeded.")
    error: str | None = Field(default=None, description="Why it failed, when failed.")


def outcome_fields(out: Any) -> dict[str, Any]:
    """A runner's result (`WorkflowResult` or alike) as the plain JSON fields of `WorkflowOutcome`."""
    return {"version_id": getattr(out, "version_id", None), "metrics": _jsonable(getattr(out, "metrics", None) or {}),
            "summary": _jsonable(getattr(out, "summary", None))}


def _jsonable(obj: Any) -> Any:
    """Plain JSON types from dataclasses/OmegaConf/paths in a workflow result."""
    from ..confutil import to_plain

    obj = to_plain(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        try:
            return obj.item()
        except Exception:  # noqa: BLE001
            pass
    return str(obj)
