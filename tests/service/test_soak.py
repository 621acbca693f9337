"""The soak benchmark (benchmarks/soak.py) at CI size: 16 loopback clients for 40 seconds against the real service,
with the enrolment, the log-fusion run and its hot reload in the middle, and a short fuzz. No 5xx, every answered
classification logged exactly once, no torn record, resident memory and file handles flat."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soak(project_root: Path):
    """benchmarks/soak.py as a module, loaded from its file (no sys.path change)."""
    path = project_root / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("ard_soak_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_a_short_soak_has_no_5xx_loses_no_record_and_stays_flat(soak, tmp_path):
    cfg = soak.SoakConfig(minutes=40 / 60, clients=16, fuzz=100, fuzz_minutes=3.0, slice_s=10.0, warmup_s=10.0)
    rep = soak.run_soak(cfg, tmp_path / "soak", log=lambda msg: None)
    text = soak.format_report(rep)
    print(text)
    assert rep.requests > 100 and all(k in rep.by_kind for k in ("image", "corrupt", "video", "batch", "feedback", "enrol")), text
    assert rep.server_errors == 0 and rep.transport_errors == 0 and rep.unexpected == 0, text
    events = {e.what: e.detail for e in rep.events}
    assert events["enrol"]["status"] == 201 and events["fusion"]["decision"] == "registered", text
    assert "error" not in events["hot reload"], text
    assert rep.log.answered > 100 and rep.log.missing == 0 and rep.log.duplicated == 0, text
    assert rep.log.torn_lines == 0 and rep.log.corrupt_rows == 0 and rep.log.lines == rep.log.records, text
    assert rep.memory_ok, text
    assert rep.fuzz is not None and rep.fuzz.requests >= 100 and rep.fuzz.server_errors == 0 and not rep.fuzz.failures, text
    assert not rep.problems(), text
