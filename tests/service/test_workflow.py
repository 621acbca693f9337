"""A fresh server with an empty registry trains characters through `/api/workflow` (real `run_workflow`:
local collector over synthetic images, tiny model), streams progress over SSE, goes live by hot reload,
and a second run is cancelled mid-training."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from .conftest import Server, start_server, write_site_config

pytestmark = pytest.mark.slow

TINY_TRAIN = [
    "data=folder", "~experiment", "model=tiny", "trainer.max_epochs=2", "data.image_size=64", "data.batch_size=16",
    "logger=csv", "~callbacks.progress_bar", "callbacks.early_stopping.patience=10", "threads=1", "data.num_workers=0",
]


def sse(client: httpx.Client, url: str, timeout: float = 300) -> Iterator[dict]:
    """Parse a text/event-stream into {event, id, data} dicts."""
    with client.stream("GET", url, timeout=timeout) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev: dict = {}
        for line in r.iter_lines():
            if not line:
                if "data" in ev:
                    ev["data"] = json.loads(ev["data"])
                    yield ev
                ev = {}
                continue
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            ev[key] = value[1:] if value.startswith(" ") else value


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, service_data) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("fresh")
    conf = write_site_config(base / "site_conf", service_data.gallery_root, base / "wf", TINY_TRAIN)
    srv = start_server(base / "srv", base / "registry", config_dir=conf, config_name="serve_site")
    yield srv
    srv.stop()


def test_fresh_server_has_no_model_and_says_how_to_get_one(fresh, service_data):
    with fresh.client() as c:
        health = c.get("/api/health").json()
        assert health["ready"] is False and "no live version" in health["error"]
        r = c.post("/api/classify", files={"file": ("a.png", service_data.images(service_data.names[0])[0].read_bytes())})
        assert r.status_code == 503 and "no recognizer" in r.json()["error"] and "workflow" in r.json()["detail"]


def test_workflow_trains_streams_progress_and_goes_live(fresh, service_data):
    names = service_data.names[:3]
    with fresh.client() as c:
        r = c.post("/api/workflow", json={"characters": [{"name": n, "series": "synthetic"} for n in names],
                                          "params": {"epochs": 2, "seed": 1}})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running") and [x["name"] for x in job["characters"]] == names

        events = list(sse(c, f"/api/workflow/{job['id']}/events"))
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "end" and events[-1]["data"]["status"] == "succeeded", events[-1]
        assert [int(e["id"]) for e in events] == list(range(1, len(events) + 1))  # nothing lost or doubled
        statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
        assert statuses[:2] == ["queued", "running"] and statuses[-1] == "succeeded"
        stages = list(dict.fromkeys(e["data"]["stage"] for e in events if e["event"] == "progress"))
        assert {"collect", "train", "register"} <= set(stages)
        assert stages.index("collect") < stages.index("train") < stages.index("register")
        assert all(0 <= e["data"]["percent"] <= 100 for e in events if e["event"] == "progress")

        result = events[-1]["data"]["result"]
        vid = result["version_id"]
        assert vid and result["metrics"]
        status = c.get(f"/api/workflow/{job['id']}").json()
        assert status["status"] == "succeeded" and status["result"]["version_id"] == vid
        assert any(s["stage"] == "register" and s["percent"] == 100 for s in status["stages"])

        # a late subscriber gets the whole history, then the stream ends
        replay = list(sse(c, f"/api/workflow/{job['id']}/events"))
        assert [e["id"] for e in replay] == [e["id"] for e in events]
        resumed = list(sse_with_last_id(c, job["id"], last_id=len(events) - 1))
        assert [e["event"] for e in resumed] == ["end"]

        # the new version is live without a restart
        deadline = time.monotonic() + 120
        while c.get("/api/version").json()["version"] != vid and time.monotonic() < deadline:
            time.sleep(0.3)
        assert c.get("/api/version").json()["version"] == vid
        assert {x["name"] for x in c.get("/api/characters").json()["characters"]} == set(names)
        img = service_data.images(names[1])[0].read_bytes()
        ans = c.post("/api/classify", files={"file": ("x.png", img)}).json()
        assert ans["version"] == vid and ans["role"] in set(names) | {"unknown"}
    # the job trained in its own process and the version answers on ONNX Runtime: the server never loaded torch
    assert "libtorch" not in Path(f"/proc/{fresh.proc.pid}/maps").read_text()


def sse_with_last_id(client: httpx.Client, job_id: str, last_id: int) -> Iterator[dict]:
    """Resume a stream the way EventSource does after a reconnect."""
    with client.stream("GET", f"/api/workflow/{job_id}/events", headers={"Last-Event-ID": str(last_id)}, timeout=60) as r:
        assert r.status_code == 200
        block: list[str] = []
        for line in r.iter_lines():
            if line:
                block.append(line)
                continue
            fields = dict(x.split(": ", 1) for x in block if not x.startswith(":"))
            block = []
            if "data" in fields:
                yield {"event": fields.get("event"), "id": fields.get("id"), "data": json.loads(fields["data"])}


def test_cancel_stops_a_running_workflow(fresh, service_data):
    names = service_data.names[3:5]
    with fresh.client() as c:
        r = c.post("/api/workflow", json={"characters": [{"name": n} for n in names], "params": {"epochs": 200}})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        seen_stages, end = set(), None
        for ev in sse(c, f"/api/workflow/{job_id}/events"):
            if ev["event"] == "progress":
                seen_stages.add(ev["data"]["stage"])
                if ev["data"]["stage"] == "train" and "cancel_sent" not in seen_stages:
                    seen_stages.add("cancel_sent")
                    r = c.post(f"/api/workflow/{job_id}/cancel")
                    assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
            if ev["event"] == "end":
                end = ev["data"]
        assert "cancel_sent" in seen_stages, f"never reached training: {seen_stages}"
        assert end is not None and end["status"] == "cancelled"
        assert c.get(f"/api/workflow/{job_id}").json()["status"] == "cancelled"
        listed = {j["id"]: j["status"] for j in c.get("/api/workflow").json()["jobs"]}
        assert listed[job_id] == "cancelled"
        assert c.get("/api/workflow/0123456789ab").status_code == 404
        r = c.get("/api/workflow/0123456789ab/events")  # refused before the stream starts, as JSON
        assert r.status_code == 404 and r.json()["error"]


def job_processes(server_pid: int) -> list[int]:
    """The live processes the server started for its jobs (multiprocessing's spawned children; Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == server_pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            out.append(int(stat.parent.name))
    return out


def test_job_status_survives_a_server_crash(tmp_path, service_data):
    """Jobs are saved under jobs_dir: after a SIGKILL and a restart, a cancelled job still reads cancelled and the
    job that was running reads failed, with how to resume it."""
    conf = write_site_config(tmp_path / "site_conf", service_data.gallery_root, tmp_path / "wf", TINY_TRAIN)
    start = lambda: start_server(tmp_path / "srv", tmp_path / "registry", config_dir=conf, config_name="serve_site")  # noqa: E731
    srv = start()
    try:
        with srv.client() as c:
            first = c.post("/api/workflow", json={"characters": [{"name": n} for n in service_data.names[:2]], "params": {"epochs": 200}}).json()
            second = c.post("/api/workflow", json={"characters": [{"name": n} for n in service_data.names[2:4]], "params": {"epochs": 200}}).json()
            assert c.post(f"/api/workflow/{first['id']}/cancel").status_code == 200
            deadline = time.monotonic() + 120
            while not c.get(f"/api/workflow/{second['id']}").json()["stages"] and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(3)  # some progress is saved (at most every 2 s)
            assert c.get(f"/api/workflow/{first['id']}").json()["status"] == "cancelled"
            jobs = job_processes(srv.proc.pid)
            assert jobs, "the running job has its own process"
    finally:
        srv.proc.kill()  # a crash: no shutdown handler runs
        srv.proc.wait(10)
        srv.stop()
    deadline = time.monotonic() + 60  # the job's process notices its server is gone and stops
    while any(Path(f"/proc/{pid}").exists() for pid in jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in jobs), "a job process outlived its server"
    saved = {p.stem for p in (tmp_path / "srv" / "outputs" / "workflow" / "jobs").glob("*.json")}
    assert {first["id"], second["id"]} <= saved
    srv = start()
    try:
        with srv.client() as c:
            a = c.get(f"/api/workflow/{first['id']}").json()
            b = c.get(f"/api/workflow/{second['id']}").json()
            assert a["status"] == "cancelled" and [ch["name"] for ch in a["characters"]] == service_data.names[:2]
            assert b["status"] == "failed" and "server stopped" in b["error"] and "resume" in b["error"], b
            assert b["stages"], "the progress made before the crash is kept"
            assert {j["id"] for j in c.get("/api/workflow").json()["jobs"]} >= {first["id"], second["id"]}
            ends = [ev for ev in sse(c, f"/api/workflow/{second['id']}/events", timeout=30) if ev["event"] == "end"]
            assert ends and ends[0]["data"]["status"] == "failed"
    finally:
        srv.stop()


def test_a_server_training_on_two_ddp_ranks_goes_live_and_cancels_every_rank(tmp_path, service_data, processes_naming):
    """`trainer=ddp` in the site's training overrides: the job's process trains in a child of its own (Lightning
    re-runs a command line per rank: the server's own, otherwise), reaches a live version, and a cancel ends every rank."""
    ddp = [*TINY_TRAIN, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    conf = write_site_config(tmp_path / "site_conf", service_data.gallery_root, tmp_path / "wf", ddp)
    srv = start_server(tmp_path / "srv", tmp_path / "registry", config_dir=conf, config_name="serve_site")
    try:
        with srv.client() as c:
            job = c.post("/api/workflow", json={"characters": [{"name": n} for n in service_data.names[:2]],
                                                "params": {"epochs": 2}}).json()
            end = [ev["data"] for ev in sse(c, f"/api/workflow/{job['id']}/events") if ev["event"] == "end"]
            assert end and end[0]["status"] == "succeeded", end
            assert end[0]["result"]["version_id"]
            job = c.post("/api/workflow", json={"characters": [{"name": n} for n in service_data.names[2:4]],
                                                "params": {"epochs": 200}}).json()
            ranks, end = [], None
            for ev in sse(c, f"/api/workflow/{job['id']}/events"):
                if ev["event"] == "progress" and ev["data"]["stage"] == "train" and ev["data"]["done"] >= 1 and not ranks:
                    ranks = processes_naming("anime_role_detect.cli.train_config")
                    c.post(f"/api/workflow/{job['id']}/cancel")
                end = ev["data"] if ev["event"] == "end" else end
            assert len(ranks) == 2, f"both ranks trained (the child is rank 0): {ranks}"
            assert end is not None and end["status"] == "cancelled", end
            assert not processes_naming("anime_role_detect.cli.train_config"), "a training rank outlived its cancelled job"
            assert len(srv_processes := job_processes(srv.proc.pid)) <= 1, srv_processes
    finally:
        srv.stop()


@pytest.mark.browser
def test_workflow_page_runs_and_shows_live_progress_and_metrics(fresh, service_data, tmp_path):
    """The /workflow page in headless Chromium: characters typed as rows, start, the job carries those characters,
    stages and log lines arrive over SSE, metrics at the end."""
    from selenium.webdriver.common.by import By

    from .test_browser import _driver, _wait, fill_character_rows

    a, b = service_data.names[:2]
    wanted = [{"name": a, "series": "synthetic", "tag": ""}, {"name": b, "series": "synthetic", "tag": f"{b}_(synthetic_tag)"}]
    drv = _driver(tmp_path, 1200, 900)
    try:
        drv.get(fresh.url + "/workflow")
        fill_character_rows(drv, wanted)
        drv.find_element(By.ID, "p-epochs").send_keys("2")
        drv.find_element(By.ID, "start").click()
        job_id = _wait(drv, lambda d: d.execute_script("return document.body.dataset.job || false"), 30)
        with fresh.client() as c:
            assert c.get(f"/api/workflow/{job_id}").json()["characters"] == wanted
        final = _wait(drv, lambda d: d.execute_script("return document.body.dataset.status") in ("succeeded", "failed", "cancelled")
                      and d.execute_script("return document.body.dataset.status"), 240)
        assert final == "succeeded", drv.find_element(By.ID, "log").text[-2000:]
        stages = [e.get_attribute("data-stage") for e in drv.find_elements(By.CSS_SELECTOR, "#stages .barrow")]
        assert {"collect", "train", "register"} <= set(stages)
        assert "register" in drv.find_element(By.ID, "log").text
        assert "New version" in drv.find_element(By.ID, "outcome-text").text
        assert drv.find_elements(By.CSS_SELECTOR, "#metrics tbody tr")
        drv.save_screenshot(str(tmp_path / "workflow.png"))
    finally:
        drv.quit()
