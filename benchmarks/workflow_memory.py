"""The service's memory after it trained a version through ``POST /api/workflow``: jobs in their own process
(``workflow.isolation=process``, the default) against jobs in a server thread (``thread``), same run.

For each mode: a fresh server (empty registry, a local collector over synthetic characters), one workflow job with
the workflow's own recipe (``--epochs`` caps training), the new version live by hot reload, one classification;
then the server's resident memory now and at its peak (Linux ``/proc``), and the job's wall time.

    python benchmarks/workflow_memory.py --epochs 1 --characters 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from soak import OFFLINE_ENV, ServiceProcess  # noqa: I001 - benchmarks/ is on sys.path when run as a script


def memory_mb(pid: int) -> tuple[float, float]:
    """Resident and peak resident memory of `pid` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def one_run(isolation: str, collector: Path, names: list[str], epochs: int, work: Path) -> dict[str, float]:
    """A fresh server trains `names`, answers once on the new version; its memory and the job's seconds."""
    work.mkdir(parents=True)
    workflow = {"isolation": isolation, "params": {"epochs": "train.overrides+=trainer.max_epochs={value}"},
                "values": {"collector.root": str(collector)}}
    server = ServiceProcess(work, work / "registry", ["reload_interval_s=0.5"], workflow=workflow)
    try:
        server.wait_ready(model=False)
        with httpx.Client(base_url=server.url, timeout=600) as c:
            t = time.perf_counter()
            job = c.post("/api/workflow", json={"characters": [{"name": n} for n in names], "params": {"epochs": epochs}})
            job.raise_for_status()
            job_id = job.json()["id"]
            while (st := c.get(f"/api/workflow/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.5)
            seconds = time.perf_counter() - t
            if st["status"] != "succeeded":
                raise SystemExit(f"{isolation}: the job {st['status']}: {st.get('error')}\n{server.log_tail()}")
            vid = st["result"]["version_id"]
            while c.get("/api/version").json().get("version") != vid:
                time.sleep(0.3)
            image = next((collector / names[0]).iterdir()).read_bytes()
            c.post("/api/classify", files={"file": ("x.png", image)}).raise_for_status()
            time.sleep(2.0)  # let the job's thread (or process) wind down
            rss, peak = memory_mb(server.pid)
        return {"rss_mb": rss, "peak_mb": peak, "job_s": seconds}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--characters", type=int, default=3)
    ap.add_argument("--images", type=int, default=16, help="synthetic pictures per character")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep it (servers' logs, the runs' stage timings)")
    args = ap.parse_args(argv)
    from anime_role_detect.data.synthetic import generate_dataset, make_characters

    os.environ.update(OFFLINE_ENV)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        specs = make_characters(args.characters, seed=5, twin_fraction=0.0)
        generate_dataset(root / "collector", size=128, seed=1, images_per_character=args.images, characters=specs)
        names = [s.name for s in specs]
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        rows = {iso: one_run(iso, root / "collector", names, args.epochs, root / iso) for iso in ("thread", "process")}
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{args.characters} characters x {args.images} pictures, {args.epochs} epoch(s), the workflow's recipe")
    print("| jobs run in | server RSS after (MB) | server peak RSS (MB) | job (s) |")
    print("|---|---|---|---|")
    for iso, r in rows.items():
        print(f"| {iso} | {r['rss_mb']:.0f} | {r['peak_mb']:.0f} | {r['job_s']:.1f} |")
    t, p = rows["thread"], rows["process"]
    print(f"process / thread: RSS {p['rss_mb'] / t['rss_mb']:.2f}x, peak {p['peak_mb'] / t['peak_mb']:.2f}x, "
          f"job time {p['job_s'] / t['job_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
