"""Kill -9 during logging and during fusion: nothing acknowledged is lost, `latest` stays complete and loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anime_role_detect.fusion.featurelog import FeatureLog, LogPolicy
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.registry import Registry

from .helpers import make_answer, unit_rows

HERE = Path(__file__).resolve().parent


def _run_writer_and_kill(log_dir: Path, start: int, n_acks: int) -> tuple[dict[int, str], dict[int, str]]:
    """Start the writer, SIGKILL it after `n_acks` acknowledged records; returns acknowledged records/feedback."""
    proc = subprocess.Popen([sys.executable, str(HERE / "kill_writer.py"), str(log_dir), str(start)],
                            stdout=subprocess.PIPE, text=True, bufsize=1)
    recs: dict[int, str] = {}
    fbs: dict[int, str] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, i, rid = line.split()
            (recs if kind == "R" else fbs)[int(i)] = rid
            if len(recs) >= n_acks:
                os.kill(proc.pid, signal.SIGKILL)  # mid-way through the next append or feedback
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    return recs, fbs


@pytest.mark.slow
def test_kill_during_logging_loses_no_acknowledged_record(tmp_path):
    log_dir = tmp_path / "featurelog"
    acked, acked_fb = {}, {}
    for round_, n in enumerate((60, 45, 70)):  # three writer processes, each killed mid-write
        r, f = _run_writer_and_kill(log_dir, start=round_ * 10_000, n_acks=n)
        acked.update(r)
        acked_fb.update(f)
    reader = FeatureLog(log_dir)
    got = {int(rec.image_sha256, 16): rec for rec in reader.read()}
    assert reader.corrupt == 0
    assert set(acked) <= set(got), f"lost {sorted(set(acked) - set(got))[:5]}"
    # the writer runs ahead of the pipe we read its acks from, so a kill can land several records after the
    # last ack we saw; what each writer left must still be a gap-free prefix of what it wrote, nothing torn
    for round_, n in enumerate((60, 45, 70)):
        mine = sorted(i for i in got if round_ * 10_000 <= i < (round_ + 1) * 10_000)
        assert mine == list(range(round_ * 10_000, round_ * 10_000 + len(mine))) and len(mine) >= n
    for i, rec in got.items():
        assert rec.id == acked.get(i, rec.id)
        np.testing.assert_array_equal(rec.embeddings, unit_rows(i, 2, 384))
        assert rec.detections[0]["role"] == f"char_{i % 5:02d}"
    for i in acked_fb:
        assert got[i].feedback[0].role == f"fixed_{i}"
    assert len(reader.segment_paths()) > 3  # rotation happened under the kills too
    # the log stays writable after the crashes: a new writer's records and feedback are read back
    log = FeatureLog(log_dir, embedder_id="e")
    rid = log.append(make_answer(sha=f"{99:064x}"), unit_rows(99, 1, 384))
    log.feedback(rid, confirmed=True)
    last = {r.id: r for r in FeatureLog(log_dir).read()}[rid]
    assert last.feedback[0].confirmed


# -- kill during fusion ---------------------------------------------------------------------------------
def _fusion_world(tmp_path: Path) -> tuple[Registry, str, Path]:
    """A live version with a 6000-row gallery and a feature log of 1500 records with feedback (fusion takes seconds)."""
    dim, chars = 256, [f"char_{i:02d}" for i in range(30)]
    reg = Registry(tmp_path / "registry")
    staging = reg.staging_dir()
    g = Gallery("kill-test-embedder", dim)
    for c in chars:
        g.add(c, "s", unit_rows(int(c[-2:]), 200, dim), [f"seed:{c}:{k}" for k in range(200)])
    g.save(staging)
    v0 = reg.commit(staging, kind="workflow")
    log = FeatureLog(tmp_path / "featurelog", LogPolicy(fsync=False), embedder_id="kill-test-embedder")
    for i in range(1500):
        c = chars[i % len(chars)]
        rid = log.append(make_answer(c, 0.95, sha=f"{i:064x}"), unit_rows(100_000 + i, 1, dim))
        log.feedback(rid, confirmed=True)
    log.close()
    return reg, v0, tmp_path / "featurelog"


def _start_fusion(reg: Registry, log_dir: Path, out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "anime_role_detect.fusion", f"log_dir={log_dir}", f"registry_dir={reg.root}",
           f"hydra.run.dir={out}", "force=true", "log.dir=" + str(out / "logs")]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_live_version_complete(reg: Registry, allowed: set[str]) -> str:
    live = reg.latest_id()
    assert live in allowed, live
    gallery = Gallery.load(reg.path())  # complete and loadable (checksums match)
    assert len(gallery) >= 6000 and (reg.path() / "manifest.json").is_file()
    for info in reg.list():  # every listed version is complete
        Gallery.load(info.path)
    return live


@pytest.mark.slow
def test_kill_during_fusion_keeps_latest_complete_and_loadable(tmp_path):
    reg, v0, log_dir = _fusion_world(tmp_path)
    # 1) kill the moment the new version starts being written (inside the staging window)
    proc = _start_fusion(reg, log_dir, tmp_path / "run1")
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if any(reg.versions_dir.glob(".staging-f*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "fusion finished before the kill; make the world bigger"
    assert _assert_live_version_complete(reg, {v0}) == v0
    # 2) kills at several points of a run (reading logs, selecting, writing, committing, promoting)
    t0 = time.time()
    full = _start_fusion(reg, log_dir, tmp_path / "timing")
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-2000:]
    duration = time.time() - t0
    new_ids = {v.id for v in reg.list()} - {v0}
    assert len(new_ids) == 1
    reg.promote(v0)
    for k, frac in enumerate((0.3, 0.6, 0.85, 0.95)):
        proc = _start_fusion(reg, log_dir, tmp_path / f"kill{k}")
        time.sleep(duration * frac)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        live = _assert_live_version_complete(reg, {v.id for v in reg.list()})
        reg.promote(v0) if live != v0 else None
    # 3) the next fusion cleans up what the killed ones left and registers a complete version
    ok = _start_fusion(reg, log_dir, tmp_path / "final")
    out, err = ok.communicate(timeout=300)
    assert ok.returncode == 0, err[-2000:]
    assert not list(reg.versions_dir.glob(".staging-f*"))
    _assert_live_version_complete(reg, {v.id for v in reg.list()})
    assert reg.latest_id() != v0 and '"decision": "registered"' in out
