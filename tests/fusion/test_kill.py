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

from anime_role_detect.fusion.featurelog import FeatureLog

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
    assert len(got) - len(acked) <= 3  # at most the record being written when each kill landed
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
