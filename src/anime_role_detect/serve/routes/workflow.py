"""`/api/workflow`: start the collect -> train -> gallery workflow, follow it live (SSE), cancel it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BaseModel, Field

from ..deps import WorkflowsDep, require_token
from ..errors import ApiError, ErrorBody
from ..workflows import Job, JobQueueFull, WorkflowManager, WorkflowRequest, WorkflowStatus
from . import ERROR_RESPONSES, json_error_responses

router = APIRouter(prefix="/api/workflow", tags=["workflow"])

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{12}$", description="Job id returned by POST /api/workflow.")]


class WorkflowList(BaseModel):
    """Recent workflow jobs, oldest first."""

    jobs: list[WorkflowStatus] = Field(description="Jobs kept by this server process.")


def _job(manager: WorkflowManager, job_id: str) -> Job:
    job = manager.get(job_id)
    if job is None:
        raise ApiError(404, f"no workflow job {job_id!r} on this server (jobs are kept in memory until restart)", {"id": job_id})
    return job


def job_dep(job_id: JobId, manager: WorkflowsDep) -> Job:
    """The job named in the path; 404 before any response starts (an SSE stream cannot change its status later)."""
    return _job(manager, job_id)


JobDep = Annotated[Job, Depends(job_dep)]


QUEUE_FULL = {429: {"model": ErrorBody, "description": "workflow.max_queued jobs are already waiting; retry later."}}
QUEUE_RETRY_S = 60


@router.post("", response_model=WorkflowStatus, status_code=202, dependencies=[Depends(require_token)],
             summary="Start a workflow run", responses={**ERROR_RESPONSES, **QUEUE_FULL})
async def start_workflow(body: WorkflowRequest, manager: WorkflowsDep) -> WorkflowStatus:
    """Queues the run and answers at once; follow it with GET /api/workflow/{id} or its /events stream."""
    try:
        return manager.submit(body).snapshot()
    except JobQueueFull as exc:
        raise ApiError(429, str(exc), {"max_queued": manager.settings.max_queued},
                       headers={"Retry-After": str(QUEUE_RETRY_S)}) from None


@router.get("", response_model=WorkflowList, summary="List recent workflow runs")
async def list_workflows(manager: WorkflowsDep) -> WorkflowList:
    """The runs this server holds, oldest first: every queued and running one, and the newest finished ones up to
    `workflow.keep_finished` runs in all (saved to disk, so they outlive a restart)."""
    return WorkflowList(jobs=[j.snapshot() for j in manager.list()])


@router.get("/{job_id}", response_model=WorkflowStatus, summary="State of one workflow run", responses=ERROR_RESPONSES)
async def get_workflow(job_id: JobId, manager: WorkflowsDep) -> WorkflowStatus:
    """One run's request, stage-by-stage progress and outcome (404 for an id this server does not hold); its
    `/events` stream carries the same progress live."""
    return _job(manager, job_id).snapshot()


@router.post("/{job_id}/cancel", response_model=WorkflowStatus, dependencies=[Depends(require_token)],
             summary="Cancel a workflow run", responses=ERROR_RESPONSES)
async def cancel_workflow(job_id: JobId, manager: WorkflowsDep) -> WorkflowStatus:
    """The run stops at its next progress step; a finished run is left as it is."""
    job = _job(manager, job_id)
    manager.cancel(job)
    return job.snapshot()


@router.get("/{job_id}/events", response_class=EventSourceResponse, summary="Live progress stream (Server-Sent Events)",
            responses=json_error_responses())
async def workflow_events(
    job: JobDep,
    last_event_id: Annotated[int | None, Header(ge=0, description="Resume after this event id (sent by EventSource on reconnect).")] = None,
) -> AsyncIterable[ServerSentEvent]:
    """Events ``status`` ({status}), ``progress`` ({stage, done, total, percent, message, time}) and a final
    ``end`` ({status, error, result}); the backlog is replayed first, so a late subscriber misses nothing."""
    after = last_event_id or 0
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def push(ev: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, ev)

    backlog = job.subscribe(push)
    try:
        ended = False
        for ev in backlog:
            if ev["id"] > after:
                yield ServerSentEvent(event=ev["event"], data=ev["data"], id=str(ev["id"]))
            ended = ended or ev["event"] == "end"
        if ended:
            return
        while True:
            ev = await queue.get()
            if ev["id"] <= after:
                continue
            yield ServerSentEvent(event=ev["event"], data=ev["data"], id=str(ev["id"]))
            if ev["event"] == "end":
                return
    finally:
        job.unsubscribe(push)
