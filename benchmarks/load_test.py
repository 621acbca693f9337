"""Bounded loopback load test of the real service: N concurrent clients x a fixed number of requests.

Starts `python -m anime_role_detect.serve` on 127.0.0.1 (or uses --url, loopback only) over a registry
version (--registry, or a small synthetic one built here), then measures in the same run:

  1. in-process baseline: `Recognizer.recognize_bytes` on the same images (no HTTP),
  2. one client, sequential requests,
  3. N concurrent clients,

and prints throughput, p50/p99 latency and errors for each, with ratios against the baselines.
Exits 1 when any request failed. Never a test; bounded by --requests and --time-limit.

  python benchmarks/load_test.py --clients 8 --requests 160
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Phase:
    """Results of one measured phase."""

    name: str
    clients: int
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    model_ms: list[float] = field(default_factory=list)  # recognizer time inside the answer (timings_ms.total)
    error_samples: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def merge(self, other: "Phase") -> "Phase":
        """Add another round of the same phase."""
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.latencies_ms += other.latencies_ms
        self.model_ms += other.model_ms
        self.error_samples += other.error_samples[: max(0, 5 - len(self.error_samples))]
        return self

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("latencies_ms", "model_ms")}
        d["model_p50_ms"] = round(statistics.median(self.model_ms), 1) if self.model_ms else None
        d.update(throughput_rps=round(self.throughput, 2), p50_ms=round(self.pct(50), 1), p99_ms=round(self.pct(99), 1),
                 mean_ms=round(statistics.fmean(self.latencies_ms), 1) if self.latencies_ms else None)
        return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_images(n: int, size: int, seed: int) -> list[bytes]:
    """PNG bytes of `n` distinct synthetic character pictures (distinct, so no answer cache can help)."""
    import random

    from anime_role_detect.data.synthetic import make_characters, render_character

    rng = random.Random(seed)
    specs = make_characters(8, seed=seed, twin_fraction=0.0)
    out = []
    for i in range(n):
        img, _ = render_character(specs[i % len(specs)], rng, size)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_registry(folder: Path, size: int) -> Path:
    """A small registry version from synthetic characters (same builder as the tests)."""
    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.data.synthetic import generate_dataset
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.registry import Registry

    data = folder / "data"
    generate_dataset(data, n_characters=8, images_per_character=12, size=size, seed=0, twin_fraction=0.0)
    cfg = compose_plain("infer", ["embedder=lite0", f"embedder.image_size={size}", "embedder.flip_tta=false", "tagger=none"])
    reg = Registry(folder / "registry")
    with reg.derive(None, "benchmark", promote=True) as d:
        build_recognition_folder(data, d.dir, cfg, val_fraction=0.2, seed=0)
    return reg.root


def load_recognizer(registry: Path):
    """The same version the server serves, in this process, answer cache off."""
    from anime_role_detect.recognition.pipeline import Recognizer
    from anime_role_detect.registry import Registry

    rec = Recognizer.from_version(Registry(registry).path("latest"), {"cache_size": 0})
    rec.warmup()
    return rec


def baseline_in_process(rec, images: list[bytes], limit_s: float) -> Phase:
    """The recognizer alone, sequentially, on the same images: the floor HTTP adds to."""
    phase = Phase("in-process recognizer", clients=1)
    t0 = time.perf_counter()
    for i, data in enumerate(images):
        if time.perf_counter() - t0 > limit_s:
            break
        s = time.perf_counter()
        ans = rec.recognize_bytes(data, f"{i}.png")
        phase.latencies_ms.append((time.perf_counter() - s) * 1e3)
        phase.model_ms.append(float(ans.timings_ms.get("total", 0.0)))
        phase.requests += 1
    phase.seconds = time.perf_counter() - t0
    return phase


async def run_clients(url: str, images: list[bytes], clients: int, total: int, limit_s: float, name: str) -> Phase:
    """`clients` concurrent clients share `total` requests (POST /api/classify), stopping at `limit_s`."""
    phase = Phase(name, clients=clients)
    counter = iter(range(total))
    deadline = time.perf_counter() + limit_s

    async def client(c: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            data = images[i % len(images)]
            s = time.perf_counter()
            try:
                r = await c.post("/api/classify", files={"file": (f"{i}.png", data, "image/png")})
                ok = r.status_code == 200 and "role" in r.json()
                if ok:
                    phase.model_ms.append(float(r.json().get("timings_ms", {}).get("total", 0.0)))
                if not ok and len(phase.error_samples) < 5:
                    phase.error_samples.append(f"{r.status_code}: {r.text[:200]}")
            except httpx.HTTPError as exc:
                ok = False
                if len(phase.error_samples) < 5:
                    phase.error_samples.append(repr(exc))
            phase.latencies_ms.append((time.perf_counter() - s) * 1e3)
            phase.requests += 1
            phase.errors += 0 if ok else 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        phase.seconds = time.perf_counter() - t0
    return phase


def start_server(registry: Path, workdir: Path, threads: int, torch_threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [sys.executable, "-m", "anime_role_detect.serve", f"port={port}", f"registry_dir={registry}",
            f"feature_log.dir={workdir / 'featurelog'}", f"hydra.run.dir={workdir / 'hydra'}", "log.console_level=WARNING",
            f"limits.inference_threads={threads}", f"recognizer.threads={torch_threads}"]
    env = {**os.environ, "ARD_ROOT": str(workdir), "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    log = open(workdir / "server.log", "wb")
    proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{(workdir / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).json().get("ready"):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready in 180 s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients in the load phase")
    ap.add_argument("--requests", type=int, default=160, help="requests per phase (bounded)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per phase at most")
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic test pictures, px")
    ap.add_argument("--registry", type=Path, default=None, help="registry to serve (default: build a synthetic one)")
    ap.add_argument("--url", default=None, help="use a running server (loopback only) instead of starting one")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds per phase (drift on shared machines)")
    ap.add_argument("--threads", type=int, default=2, help="server inference threads (limits.inference_threads)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads in the server and the baseline")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        ap.error("--url must be a loopback address (127.0.0.1/localhost): this tool never loads remote servers")
    if args.url and not args.registry:
        ap.error("--url needs --registry (the registry that server serves) for the in-process baseline")

    with tempfile.TemporaryDirectory(prefix="ard-load-") as tmp:
        work = Path(tmp)
        registry = args.registry or build_registry(work, 96)
        images = synthetic_images(max(32, args.requests), args.size, seed=123)
        proc = None
        url = args.url
        if url is None:
            proc, url = start_server(registry, work, args.threads, args.torch_threads)
        try:
            import torch

            torch.set_num_threads(args.torch_threads)  # same per-request compute as one server worker
            rec = load_recognizer(registry)
            rec.recognize_bytes(images[0], "warmup.png")
            asyncio.run(run_clients(url, images[:4], 1, 4, 30, "warm-up"))
            # interleaved rounds: on a shared machine the load drifts; every phase sees the same drift
            per = max(1, args.requests // args.rounds)
            budget = args.time_limit / args.rounds
            phases: list[Phase] = []
            for r in range(args.rounds):
                chunk = images[r * per:(r + 1) * per] or images[:per]
                got = [baseline_in_process(rec, chunk, budget),
                       asyncio.run(run_clients(url, chunk, 1, per, budget, "HTTP, 1 client")),
                       asyncio.run(run_clients(url, chunk, args.clients, per, budget, f"HTTP, {args.clients} clients"))]
                phases = got if not phases else [a.merge(b) for a, b in zip(phases, got)]
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(15)

    base = phases[0]
    single, multi = phases[-2], phases[-1]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nloopback load test: {args.requests} requests/phase in {args.rounds} interleaved rounds, {args.size}px PNGs, "
          f"server threads={args.threads}, cpus={os.cpu_count()}, load average {load:.1f}")
    print(f"{'phase':<26}{'req':>6}{'err':>5}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'model p50':>10}"
          f"{'x base req/s':>14}{'x base p50':>12}")
    for p in phases:
        model = statistics.median(p.model_ms) if p.model_ms else float("nan")
        print(f"{p.name:<26}{p.requests:>6}{p.errors:>5}{p.throughput:>9.2f}{p.pct(50):>9.1f}{p.pct(99):>9.1f}{model:>10.1f}"
              f"{p.throughput / base.throughput:>14.2f}{p.pct(50) / base.pct(50):>12.2f}")
    if single.model_ms:
        over = [lat - m for lat, m in zip(single.latencies_ms, single.model_ms)]
        print(f"\nHTTP + upload + JSON overhead per request (1 client, latency - recognizer time): "
              f"median {statistics.median(over):.1f} ms")
    print(f"\nconcurrency gain ({multi.clients} clients vs 1): {multi.throughput / single.throughput:.2f}x throughput, "
          f"p99 {multi.pct(99) / single.pct(99):.2f}x")
    errors = sum(p.errors for p in phases)
    for p in phases:
        for s in p.error_samples:
            print(f"  error in {p.name}: {s}")
    print(f"errors: {errors}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "phases": [p.summary() for p in phases]}, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
