"""A SIGKILL of the real service in the middle of an edit loses nothing: killed while an enrolment embeds its
pictures, while it writes its staging folder, or while the service loads the version a log-fusion run just made
live, the restarted service serves the old or the new version, complete (every file its manifest lists exists,
and it loads and answers), never a staging folder, and the feature log reads back every answer given before the kill.

The staging window lasts milliseconds, so the server is single-stepped (SIGSTOP, look, SIGCONT) and killed while
frozen with its staging folder on disk; a reload takes tens of milliseconds, so the server is killed the moment
`/api/version` reports the reload under way, and its own log shows the swap never happened."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import httpx
import pytest

from anime_role_detect.fusion.featurelog import FeatureLog
from anime_role_detect.fusion.selection import is_holdout
from anime_role_detect.registry import Registry

from .conftest import Server, start_server

pytestmark = pytest.mark.slow

RECOGNIZER = {"mode": "clip", "rerank": False}


# ------------------------------------------------------------------------------------------- helpers


def staging_dirs(registry: Path) -> list[Path]:
    versions = registry / "versions"
    return sorted(p for p in versions.iterdir() if p.name.startswith(".staging-")) if versions.is_dir() else []


def frozen(pid: int, timeout: float = 1.0) -> bool:
    """True once every thread of `pid` is stopped (state T), after a SIGSTOP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
                      for t in os.listdir(f"/proc/{pid}/task")]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if states and all(s in "tT" for s in states):
            return True
    return False


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], done: threading.Event, limit_s: float = 300.0,
              step_s: float = 0.002) -> bool:
    """Single-step `proc` (SIGSTOP, check `condition` while it is frozen, SIGCONT) and SIGKILL it, still frozen, when
    the condition holds. False when `done` is set first (the edit finished between two looks) or after `limit_s`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not done.is_set() and proc.poll() is None:
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            if frozen(proc.pid) and condition():
                proc.kill()
                proc.wait(30)
                return True
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        time.sleep(step_s)
    return False


def png_of(path: Path) -> bytes:
    return path.read_bytes()


class Traffic:
    """A client classifying pictures one after another (unique file names) until stopped or the server dies."""

    def __init__(self, server: Server, pictures: list[bytes], prefix: str) -> None:
        self.answers: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server.url, pictures, prefix), daemon=True)
        self._thread.start()

    def _run(self, url: str, pictures: list[bytes], prefix: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(20_000):
                if self._stop.is_set():
                    return
                try:
                    r = c.post("/api/classify", files={"file": (f"{prefix}-{i:05d}.png", pictures[i % len(pictures)], "image/png")})
                except httpx.HTTPError:
                    return  # the server was killed
                if r.status_code == 200:
                    self.answers.append(r.json())

    def wait_for(self, n: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.answers) < n and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.05)
        assert len(self.answers) >= n, f"only {len(self.answers)} answers before the edit"

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join(90)
        return list(self.answers)


def logged_keys(featurelog: Path) -> Counter:
    """(image hash, file name) of every record the feature log reads back."""
    return Counter((r.image_sha256, r.data.get("filename")) for r in FeatureLog(featurelog).read())


def assert_complete_and_served(server: Server, registry: Path, allowed: set[str], probe: bytes) -> str:
    """The restarted service serves `latest`, which is one of `allowed`, complete and loadable; returns its id."""
    from anime_role_detect.recognition.pipeline import Recognizer

    reg = Registry(registry)
    live = reg.latest_id()
    assert live in allowed, f"live version {live} is neither the old nor the new one ({allowed})"
    info = httpx.get(f"{server.url}/api/version", timeout=30).json()
    assert info["version"] == live and not info["version"].startswith(".staging"), info
    vdir = Path(info["recognizer"]["version_dir"])
    assert vdir.resolve() == (registry / "versions" / live).resolve() and not vdir.name.startswith(".staging-")
    manifest = json.loads((vdir / "manifest.json").read_text())
    missing = [f for f in manifest["files"] if not (vdir / f).exists()]
    assert not missing, f"{live} lists files it lacks: {missing}"
    rec = Recognizer.from_version(vdir, RECOGNIZER)
    rec.warmup()
    assert rec.characters() and rec.recognize_bytes(probe, "probe.png").version == live
    r = httpx.post(f"{server.url}/api/classify", files={"file": ("after-restart.png", probe, "image/png")}, timeout=60)
    assert r.status_code == 200 and r.json()["version"] == live, r.text
    return live


def assert_nothing_lost(server: Server, answers: list[dict]) -> None:
    """Every answer given before the kill reads back from the feature log, and feedback on it still finds it."""
    assert answers, "no answers were given before the kill"
    logged = logged_keys(server.workdir / "featurelog")
    lost = [(a["image_sha256"], a["filename"]) for a in answers if logged[(a["image_sha256"], a["filename"])] < 1]
    assert not lost, f"{len(lost)} of {len(answers)} answers given before the kill have no record: {lost[:3]}"
    r = httpx.post(f"{server.url}/api/feedback", json={"image_sha256": answers[-1]["image_sha256"], "confirmed": True}, timeout=60)
    assert r.status_code == 200, r.text


def restart(server: Server, registry: Path) -> Server:
    """The killed server's work folder (feature log, logs) served again by a new process."""
    server.stop()  # already dead: closes its log
    return start_server(server.workdir, registry, ["limits.max_files=64"])


@pytest.fixture()
def registry(tmp_path, registry_root) -> Path:
    """A private copy of the synthetic registry (the kills edit it)."""
    dst = tmp_path / "registry"
    shutil.copytree(registry_root, dst)
    return dst


# ------------------------------------------------------------------------------------------- enrolment


def _enrol_in_thread(url: str, name: str, pictures: list[bytes], result: dict, done: threading.Event) -> threading.Thread:
    def go() -> None:
        try:
            files = [("files", (f"{name}-{i}.png", p, "image/png")) for i, p in enumerate(pictures)]
            r = httpx.post(f"{url}/api/characters", data={"name": name, "series": "kill test"}, files=files, timeout=300)
            result["status"] = r.status_code
            result["body"] = r.text
        except httpx.HTTPError as exc:
            result["error"] = repr(exc)
        finally:
            done.set()

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("moment", ["embedding", "staging"])
def test_kill_during_an_enrolment_loses_nothing(tmp_path, registry, service_data, moment):
    """SIGKILL while the enrolment embeds its pictures (nothing on disk yet) or with its staging folder half written."""
    pictures = [png_of(p) for n in service_data.names for p in service_data.images(n)]
    newcomer = [png_of(p) for p in service_data.images(service_data.enroll_name)]
    server = start_server(tmp_path / "srv", registry, ["limits.max_files=64"])
    try:
        traffic = Traffic(server, pictures, "before")
        traffic.wait_for(5)
        caught = False
        old = new = None
        for attempt in range(5):  # the staging window is milliseconds: a look may miss it, then enrol again
            old = Registry(registry).latest_id()
            name = f"{service_data.enroll_name}_{attempt}"
            # embedding: many pictures so the work before anything is written lasts seconds; staging: a few
            shots = newcomer * 8 if moment == "embedding" else newcomer
            result: dict = {}
            done = threading.Event()
            t0 = time.monotonic()
            _enrol_in_thread(server.url, name, shots, result, done)
            if moment == "embedding":
                caught = kill_when(server.proc, lambda t0=t0: time.monotonic() - t0 > 0.3 and not staging_dirs(registry), done)
            else:
                caught = kill_when(server.proc, lambda: bool(staging_dirs(registry)), done)
            if caught:
                break
            assert result.get("status") == 201, result
        assert caught, f"no kill landed while {moment} in 5 enrolments"
        print(f"killed while {moment} in enrolment {attempt + 1}; staging left: {[p.name for p in staging_dirs(registry)]}")
        answers = traffic.stop()
        left = staging_dirs(registry)
        new = None if moment == "embedding" else left[0].name[len(".staging-"):] if left else None
        assert (moment == "staging") == bool(left), f"staging folders after a kill while {moment}: {left}"
        server = restart(server, registry)
        live = assert_complete_and_served(server, registry, {old} | ({new} if new else set()), pictures[0])
        assert live == old, "the enrolment was killed before its version was sealed, yet a new version is live"
        names = {c["name"] for c in httpx.get(f"{server.url}/api/characters", timeout=30).json()["characters"]}
        assert name not in names, f"{name} is served although its enrolment never finished"
        assert_nothing_lost(server, answers)
        # the service takes edits again after the crash: a new enrolment seals, goes live and is served
        files = [("files", (f"again-{i}.png", p, "image/png")) for i, p in enumerate(newcomer)]
        r = httpx.post(f"{server.url}/api/characters", data={"name": f"{name}_again"}, files=files, timeout=300)
        assert r.status_code == 201 and Registry(registry).latest_id() == r.json()["version"] != old, r.text
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------- fusion and reload


HOLDOUT_FRACTION = 0.25  # fusion's evaluation.holdout_fraction in these tests (its shipped default)


def run_fusion(server: Server, registry: Path, out: Path) -> dict:
    """`python -m anime_role_detect.fusion` on the server's feature log and registry; its one-line JSON report.

    Regression pruning is off: the test relabels pictures of known characters, and one that is a near-copy of a
    validation picture would be pruned (nothing added, nothing registered) in whichever round picks it."""
    env = {**os.environ, "ARD_ROOT": str(server.workdir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "anime_role_detect.fusion", f"log_dir={server.workdir / 'featurelog'}",
                        f"registry_dir={registry}", "force=true", "promote=true", "evaluation.prune_regressions=false",
                        f"evaluation.holdout_fraction={HOLDOUT_FRACTION}",
                        f"hydra.run.dir={out}", f"output_dir={out}", "log.console_level=WARNING"], cwd=server.workdir, env=env, capture_output=True, text=True, timeout=600,
                       check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    assert report["decision"] == "registered" and report["version_id"], report
    return report


def kill_while_reloading(server: Server, new: str, limit_s: float = 120.0) -> bool:
    """Poll /api/version (which starts the reload) and SIGKILL the server the moment it says the reload is under way.

    True when the server's own log shows it never swapped to `new` (killed mid-load); False when it had already."""
    deadline = time.monotonic() + limit_s
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while time.monotonic() < deadline:
            info = c.get("/api/version").json()
            if info["reload_pending"] and info["registry_latest"] == new:
                server.proc.kill()
                server.proc.wait(30)
                break
            if info["version"] == new:
                return False
            time.sleep(0.01)
        else:
            raise AssertionError(f"the server never started loading {new}")
    log = "".join(p.read_text(errors="replace") for p in (server.workdir / "logs").glob("system*.log"))
    return f"now serving {new}" not in log


def test_kill_during_a_fusion_triggered_reload_loses_nothing(tmp_path, registry, service_data):
    """Fusion makes a new version live; the service is killed while loading it; after restart it serves it, whole."""
    pictures = [png_of(p) for n in service_data.names for p in service_data.images(n)]
    server = start_server(tmp_path / "srv", registry, ["limits.max_files=64"])
    answers: list[dict] = []
    try:
        caught, new, old = False, None, None
        corrected: set[str] = set()
        for attempt in range(4):  # a reload takes tens of milliseconds: if the swap beat the kill, fuse again
            traffic = Traffic(server, pictures, f"round{attempt}")
            traffic.wait_for(10)
            answers += traffic.stop()  # quiet now: only the test's own polls start the reload
            # a correction naming a character the gallery lacks gives fusion a new example every round: a picture not
            # corrected in an earlier round (one already fused is not new) and not one fusion holds back for its gate
            sha = next(a["image_sha256"] for a in reversed(answers)
                       if a["image_sha256"] not in corrected and not is_holdout(f"{a['image_sha256']}#0", HOLDOUT_FRACTION))
            corrected.add(sha)
            r = httpx.post(f"{server.url}/api/feedback", timeout=60, json={"image_sha256": sha, "correct_role": f"kill_newcomer_{attempt}"})
            assert r.status_code == 200, r.text
            old = Registry(registry).latest_id()
            new = run_fusion(server, registry, tmp_path / f"fusion{attempt}")["version_id"]
            assert Registry(registry).latest_id() == new
            caught = kill_while_reloading(server, new)
            if caught:
                break
            if server.proc.poll() is not None:  # killed, but the swap had already happened: serve again, fuse again
                server = restart(server, registry)
        assert caught, "the reload finished before the kill in 4 fusion rounds"
        print(f"killed while loading {new} in fusion round {attempt + 1}")
        server = restart(server, registry)
        live = assert_complete_and_served(server, registry, {old, new}, pictures[0])
        assert live == new, "latest moved before the kill: the restarted service must serve the fused version"
        assert not staging_dirs(registry), "fusion sealed its version before the kill: no staging folder may be left"
        assert_nothing_lost(server, answers)
    finally:
        server.stop()
