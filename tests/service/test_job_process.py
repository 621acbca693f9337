"""Workflow jobs run in their own process (`serve.job_process`): progress streams back into the job, the outcome
and a runner's own error come back, a crash and an unheeded cancel are reported, and the server never imports the
runner. Fast: the runners in `job_runners` stand in for the workflow (test_workflow runs the real one)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import pytest
from omegaconf import OmegaConf

from anime_role_detect.serve.settings import WorkflowSettings
from anime_role_detect.serve.workflows import FINISHED, Job, WorkflowManager, WorkflowRequest


def manager(runner: str, **settings) -> WorkflowManager:
    ws = WorkflowSettings(runner={"_target_": f"service.job_runners.{runner}", "_partial_": True}, **settings)
    return WorkflowManager(ws, "/nonexistent-registry", config_factory=lambda: OmegaConf.create({"characters": []}))


def submit(mgr: WorkflowManager, *names: str) -> Job:
    return mgr.submit(WorkflowRequest.model_validate({"characters": [{"name": n} for n in names or ("aoba",)]}))


def wait(job: Job, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while job.status not in FINISHED:
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout}s"
        time.sleep(0.05)
    return job


def test_a_job_runs_in_its_own_process_and_streams_its_progress_back():
    mgr = manager("finish")
    try:
        job = wait(submit(mgr, "aoba", "hifumi"))
    finally:
        mgr.shutdown()
    assert job.status == "succeeded", job.error
    assert job.result.version_id == "v-test" and job.result.metrics == {"accuracy": 0.5}
    assert job.result.summary["names"] == ["aoba", "hifumi"]  # the config composed here reached the job
    assert job.result.summary["pid"] != os.getpid()
    # its data loaders start workers as the server's would (spawned ones re-import torch: training ran 3x slower)
    assert job.result.summary["start_method"] == multiprocessing.get_start_method()
    assert job.result.summary["nice"] == min(19, os.nice(0) + mgr.settings.job_nice) > os.nice(0)  # it yields to requests
    assert "service.job_runners" not in sys.modules, "the server imported the runner"
    progress = [e["data"] for e in job.events if e["event"] == "progress"]
    assert [(e["stage"], e["done"]) for e in progress] == [("collect", 0), ("collect", 1), ("collect", 2), ("train", 1)]
    assert job.snapshot().stages[-1].stage == "train" and job.snapshot().stages[0].message == "image 2"


@pytest.mark.parametrize("runner,expected", [
    ("refuse", "collector.root is not a folder; set it in serve.yaml"),  # a runner's own one-line error, as it said it
    ("crash", "the workflow process ended without an answer (exit code 3)"),
])
def test_a_failing_job_process_fails_its_job_with_the_reason(runner, expected):
    mgr = manager(runner)
    try:
        job = wait(submit(mgr))
    finally:
        mgr.shutdown()
    assert job.status == "failed" and job.error.startswith(expected), job.error


def test_cancel_reaches_the_job_process_and_an_unheeded_one_ends_it():
    mgr = manager("forever", cancel_grace_s=1.0, max_concurrent=2)
    deaf = WorkflowManager(mgr.settings.model_copy(update={"runner": {"_target_": "service.job_runners.deaf", "_partial_": True}}),
                           "/nonexistent-registry", config_factory=lambda: OmegaConf.create({"characters": []}))
    try:
        jobs = [submit(mgr), submit(deaf)]
        for job in jobs:
            deadline = time.monotonic() + 60
            while not job.progress.events and time.monotonic() < deadline:
                time.sleep(0.05)
        t0 = time.monotonic()
        mgr.cancel(jobs[0])
        deaf.cancel(jobs[1])
        for job in jobs:
            wait(job, timeout=30)
        took = time.monotonic() - t0
    finally:
        mgr.shutdown()
        deaf.shutdown()
    assert [j.status for j in jobs] == ["cancelled", "cancelled"], [j.error for j in jobs]
    assert took < 10, f"cancel took {took:.1f}s"


def test_a_misnamed_runner_is_refused_at_submit_without_importing_it():
    from anime_role_detect.errors import ConfigError

    ws = WorkflowSettings(runner={"_target_": "no_such_package.run", "_partial_": True})
    mgr = WorkflowManager(ws, "/nonexistent-registry", config_factory=lambda: OmegaConf.create({"characters": []}))
    with pytest.raises(ConfigError, match="no importable module"):
        submit(mgr)


def test_submissions_beyond_max_queued_are_refused_until_a_job_starts():
    from anime_role_detect.serve.workflows import JobQueueFull

    mgr = manager("forever", max_queued=1)
    try:
        running, waiting = submit(mgr), submit(mgr)
        deadline = time.monotonic() + 60
        while running.status != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (running.status, waiting.status) == ("running", "queued")
        with pytest.raises(JobQueueFull, match="1 workflow jobs are already waiting"):
            submit(mgr)
        assert len(mgr.list()) == 2  # the refused one is not kept
        mgr.cancel(waiting)  # a cancelled job waits no more: room for one
        third = submit(mgr)
        mgr.cancel(running)
        while third.status != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        fourth = submit(mgr)  # the queue has room again
        assert (waiting.status, fourth.status) == ("cancelled", "queued")
        for job in (third, fourth):
            mgr.cancel(job)
        for job in (running, waiting, third, fourth):
            wait(job)
    finally:
        mgr.shutdown()


def test_ctrl_c_at_the_servers_terminal_leaves_the_job_to_the_servers_cancel():
    """SIGINT reaches a terminal's whole process group; the job's process ignores it, the server cancels the job."""
    import signal

    mgr = manager("forever")
    try:
        job = submit(mgr)
        deadline = time.monotonic() + 60
        while not job.progress.events and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = int(job.progress.events[-1].message.split()[1])
        os.kill(pid, signal.SIGINT)
        time.sleep(1.5)
        assert job.status == "running", job.error
        mgr.cancel(job)
        wait(job)
    finally:
        mgr.shutdown()
    assert job.status == "cancelled", job.error
