"""What a workflow job started through ``POST /api/workflow`` costs the service: its memory afterwards and the
latency of the requests it answers meanwhile, jobs in a server thread against jobs in their own process (niceness
added 0 and ``workflow.job_nice``), same run.

For each mode: a fresh server over a copy of one registry (a live version built here from synthetic characters, as
the soak builds it) and a local collector of other synthetic characters; one client classifies pictures one after
another throughout; one workflow job with the workflow's own recipe (``--epochs`` caps training) runs, its version
goes live by hot reload. Reported: the client's p50/p95 before the job and while it runs, the job's wall time, and
the server's resident and peak resident memory at the end (Linux ``/proc``).

    python benchmarks/workflow_jobs.py --epochs 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from soak import OFFLINE_ENV, ProcStats, ServiceProcess, build_registry, percentile  # noqa: I001 - benchmarks/ is on sys.path when run as a script

#: mode name -> serve.yaml workflow settings
MODES: dict[str, dict] = {
    "thread": {"isolation": "thread"},
    "process, nice +0": {"isolation": "process", "job_nice": 0},
    "process, nice +10 (default)": {"isolation": "process", "job_nice": 10},
}


class Prober(threading.Thread):
    """One client classifying a picture after another; each request's (start time, latency in ms)."""

    def __init__(self, url: str, image: bytes) -> None:
        super().__init__(daemon=True)
        self.url, self.image = url, image
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as c:
            while not self.stop.is_set():
                t = time.perf_counter()
                c.post("/api/classify", files={"file": ("x.png", self.image)}).raise_for_status()
                self.samples.append((t, 1000 * (time.perf_counter() - t)))

    def between(self, t0: float, t1: float) -> list[float]:
        return [ms for t, ms in self.samples if t0 <= t < t1]


def quantiles(ms: list[float]) -> tuple[float, float]:
    return percentile(ms, 50), percentile(ms, 95)


def one_run(workflow: dict, registry: Path, collector: Path, names: list[str], image: bytes, epochs: int,
            work: Path, idle_s: float) -> dict[str, float]:
    """A fresh server answers a client before and while one job trains `names`; the figures of that run."""
    work.mkdir(parents=True)
    shutil.copytree(registry, work / "registry", symlinks=True)
    settings = {**workflow, "params": {"epochs": "train.overrides+=trainer.max_epochs={value}"},
                "values": {"collector.root": str(collector)}}
    server = ServiceProcess(work, work / "registry", ["reload_interval_s=0.5"], workflow=settings)
    prober = Prober(server.url, image)
    try:
        server.wait_ready()
        prober.start()
        time.sleep(idle_s)
        with httpx.Client(base_url=server.url, timeout=600) as c:
            t0 = time.perf_counter()
            job = c.post("/api/workflow", json={"characters": [{"name": n} for n in names], "params": {"epochs": epochs}})
            job.raise_for_status()
            job_id = job.json()["id"]
            while (st := c.get(f"/api/workflow/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
            t1 = time.perf_counter()
            if st["status"] != "succeeded":
                raise SystemExit(f"{workflow}: the job {st['status']}: {st.get('error')}\n{server.log_tail()}")
        prober.stop.set()
        prober.join(60)
        time.sleep(2.0)  # let the job's thread (or process) wind down
        mem = ProcStats.of(server.pid)
        before, during = quantiles(prober.between(0, t0)), quantiles(prober.between(t0, t1))
        return {"rss_mb": mem.rss_mb, "peak_mb": mem.peak_mb, "job_s": t1 - t0, "idle_p50": before[0], "idle_p95": before[1],
                "job_p50": during[0], "job_p95": during[1], "answered": len(prober.between(t0, t1))}
    finally:
        prober.stop.set()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--characters", type=int, default=3, help="characters the job trains")
    ap.add_argument("--images", type=int, default=16, help="synthetic pictures per character the job collects")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds the client is timed before the job")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (servers' logs, the runs' stage timings)")
    args = ap.parse_args(argv)
    from anime_role_detect.data.synthetic import generate_dataset, make_characters

    os.environ.update(OFFLINE_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        registry = build_registry(root / "served", n_characters=6, size=96)
        specs = make_characters(args.characters, seed=5, twin_fraction=0.0)
        generate_dataset(root / "collector", size=128, seed=1, images_per_character=args.images, characters=specs)
        image = next((root / "collector" / specs[0].name).iterdir()).read_bytes()
        names = [s.name for s in specs]
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        rows = {mode: one_run(wf, registry, root / "collector", names, image, args.epochs, root / f"run{i}", args.idle_s)
                for i, (mode, wf) in enumerate(MODES.items())}
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"job: {args.characters} characters x {args.images} pictures, {args.epochs} epoch(s), the workflow's recipe; "
          "one client classifying throughout")
    print("| jobs run in | client p50 / p95 ms, no job | while the job runs | answers meanwhile | job (s) | "
          "server RSS after (MB) | server peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['idle_p50']:.0f} / {r['idle_p95']:.0f} | {r['job_p50']:.0f} / {r['job_p95']:.0f} | "
              f"{r['answered']} | {r['job_s']:.1f} | {r['rss_mb']:.0f} | {r['peak_mb']:.0f} |")
    base = rows["thread"]
    for mode, r in list(rows.items())[1:]:
        print(f"{mode} / thread: RSS {r['rss_mb'] / base['rss_mb']:.2f}x, p95 while the job runs "
              f"{r['job_p95'] / base['job_p95']:.2f}x, job time {r['job_s'] / base['job_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
