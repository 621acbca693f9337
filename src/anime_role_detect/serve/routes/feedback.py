"""`POST /api/feedback`: confirm or correct an answer; the verdict joins the feature log that log fusion reads."""

from __future__ import annotations

from typing import Self

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..deps import FeatureLogDep, ServicesDep, require_token, run_model
from . import ERROR_RESPONSES

router = APIRouter(prefix="/api", tags=["feedback"])


class FeedbackIn(BaseModel):
    """A verdict on an earlier answer, named by its image hash (``image_sha256`` of the answer) or record id."""

    model_config = ConfigDict(extra="forbid")
    image_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="`image_sha256` from the answer.")
    record_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_\-]{1,64}$", description="Feature-log record id, when known.")
    confirmed: bool = Field(default=False, description="True: the answer was right.")
    correct_role: str | None = Field(default=None, min_length=1, max_length=120, pattern=r"^[^\x00-\x1f]+$",
                                     description="The character it really is (a correction).")
    series: str = Field(default="", max_length=80, pattern=r"^[^\x00-\x1f]*$", description="Series of `correct_role`.")
    detection: int | None = Field(default=None, ge=0, le=1000, description="Which detection (index); default the best one.")

    @model_validator(mode="after")
    def _one_key_one_verdict(self) -> Self:
        if not (self.image_sha256 or self.record_id):
            raise ValueError("give image_sha256 (from the answer) or record_id")
        if self.confirmed == bool(self.correct_role):
            raise ValueError("give either confirmed=true or a correct_role, not both or neither")
        return self


class FeedbackOut(BaseModel):
    """The verdict as stored."""

    key: str = Field(description="Record id or image hash the verdict was stored under.")
    confirmed: bool = Field(description="True when the answer was confirmed.")
    correct_role: str | None = Field(default=None, description="The corrected character, when corrected.")
    detection: int | None = Field(default=None, description="Detection index the verdict applies to.")


@router.post("/feedback", response_model=FeedbackOut, dependencies=[Depends(require_token)],
             summary="Confirm or correct an answer (feeds log fusion)", responses=ERROR_RESPONSES)
async def feedback(body: FeedbackIn, services: ServicesDep, log: FeatureLogDep) -> FeedbackOut:
    """404 when no logged answer has that hash or id (only answers given while the feature log was on can get feedback)."""
    key = body.record_id or body.image_sha256 or ""
    event = await run_model(services, lambda: log.feedback(key, correct_role=body.correct_role, confirmed=body.confirmed,
                                                          detection=body.detection, series=body.series))
    return FeedbackOut(key=key, confirmed=bool(event.get("confirmed")), correct_role=event.get("correct_role"),
                       detection=event.get("detection"))
