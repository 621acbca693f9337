"""Bounded loopback load test of the real service: micro-batching off vs on at 1, 8 and 32 concurrent clients.

Starts two `python -m anime_role_detect.serve` processes on 127.0.0.1 over the same registry version
(--registry, e.g. the one `python train.py` registers, or a small synthetic one built here), one with
`batching.max_wait_ms=0` (one recognizer call per request, the service before micro-batching) and one with
micro-batching on, both with the answer cache off so every request is real work. Then, in interleaved
rounds (every phase sees the same drift of a shared machine), it measures:

  1. in-process baseline: `Recognizer.recognize_bytes` on the same images (no HTTP), and the CPU time
     per image of `recognize_batch` at batch sizes 1/4/8/16 (what batching can save in the model itself),
  2. for each --clients level: that many concurrent clients against each server,

and prints requests/s, p50/p95/p99 latency, images per recognizer call and errors, the on/off ratios per
level, the issue's targets (>= 1.5x throughput at 32 clients; p95 at 32 clients <= 2x the p50 of one
client) and the load average. Exits 1 when any request failed. Never a test; bounded by --requests and
--time-limit.

  nice -n 10 python benchmarks/load_test.py                       # 1, 8, 32 clients, 96 requests per phase
  python benchmarks/load_test.py --registry outputs/registry      # the version `python train.py` registered
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

import httpx
from _common import quiet


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
    batch_sizes: list[float] = field(default_factory=list)  # images in the recognizer call that answered (timings_ms.batch_images)
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
        self.batch_sizes += other.batch_sizes
        self.error_samples += other.error_samples[: max(0, 5 - len(self.error_samples))]
        return self

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    @property
    def images_per_call(self) -> float:
        """Answers per recognizer call: an answer from a batch of k images stands for 1/k of a call."""
        calls = sum(1.0 / k for k in self.batch_sizes)
        return len(self.batch_sizes) / calls if calls else float("nan")

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("latencies_ms", "model_ms", "batch_sizes")}
        d["model_p50_ms"] = round(statistics.median(self.model_ms), 1) if self.model_ms else None
        d.update(throughput_rps=round(self.throughput, 2), p50_ms=round(self.pct(50), 1), p95_ms=round(self.pct(95), 1),
                 p99_ms=round(self.pct(99), 1), images_per_call=round(self.images_per_call, 2),
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


def load_recognizer(registry: Path, version: str):
    """The same version the server serves, in this process, answer cache off."""
    from anime_role_detect.recognition.pipeline import Recognizer
    from anime_role_detect.registry import Registry

    rec = Recognizer.from_version(Registry(registry).path(version), {"cache_size": 0})
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


def batch_cpu_profile(rec, images: list[bytes], sizes: tuple[int, ...] = (1, 4, 8, 16), n: int = 48, rounds: int = 2) -> dict[int, float]:
    """Thread CPU ms per image of `Recognizer.recognize_batch` at each batch size (the most batching can save in
    the model itself; CPU time, so other jobs on a shared machine barely move it). Best of `rounds`."""
    from anime_role_detect.imageio import decode_image

    decoded = [decode_image(d) for d in images[:n]]
    best: dict[int, float] = {}
    for _ in range(rounds):
        for bs in sizes:
            rec.recognize_batch([(decoded[0], "warm")] * bs, hashes=[f"warm{i}" for i in range(bs)])  # this shape, warmed
            t0, done = time.thread_time(), 0
            for i in range(0, len(decoded) - bs + 1, bs):
                done += len(rec.recognize_batch([(im, f"{i + j}.png") for j, im in enumerate(decoded[i:i + bs])]))
            ms = (time.thread_time() - t0) / max(1, done) * 1e3
            best[bs] = min(ms, best.get(bs, ms))
    return best


async def run_clients(url: str, images: list[bytes], clients: int, total: int, limit_s: float, name: str,
                      offset: int = 0) -> Phase:
    """`clients` concurrent clients share `total` requests (POST /api/classify), stopping at `limit_s`."""
    phase = Phase(name, clients=clients)
    counter = iter(range(total))
    deadline = time.perf_counter() + limit_s

    async def client(c: httpx.AsyncClient) -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            data = images[(offset + i) % len(images)]
            s = time.perf_counter()
            try:
                r = await c.post("/api/classify", files={"file": (f"{offset + i}.png", data, "image/png")})
                ok = r.status_code == 200 and "role" in r.json()
                if ok:
                    timings = r.json().get("timings_ms", {})
                    phase.model_ms.append(float(timings.get("total", 0.0)))
                    phase.batch_sizes.append(float(timings.get("batch_images", 1.0)))
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


@dataclass
class ServerProc:
    """One server process, its URL and its work folder."""

    proc: subprocess.Popen
    url: str
    workdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_server(registry: Path, version: str, workdir: Path, threads: int, torch_threads: int,
                 extra: list[str]) -> ServerProc:
    """`python -m anime_role_detect.serve` on a free loopback port, answer cache off, waiting until it is ready."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = [sys.executable, "-m", "anime_role_detect.serve", f"port={port}", f"registry_dir={registry}", f"version={version}",
            f"feature_log.dir={workdir / 'featurelog'}", f"hydra.run.dir={workdir / 'hydra'}", "log.console_level=WARNING",
            f"limits.inference_threads={threads}", f"recognizer.threads={torch_threads}", "recognizer.cache_size=0", *extra]
    env = {**os.environ, "ARD_ROOT": str(workdir), "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}
    with open(workdir / "server.log", "wb") as log:
        proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited:\n{(workdir / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).json().get("ready"):
                return ServerProc(proc, url, workdir)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready in 300 s")


def served_version(registry: Path) -> str:
    """The registry's live version id (both servers are pinned to it)."""
    from anime_role_detect.registry import Registry

    vid = Registry(registry).latest_id()
    if vid is None:
        raise SystemExit(f"{registry} has no live version; run `python train.py` or pass another --registry")
    return vid


def pct_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(args: argparse.Namespace, base: Phase | None, table: dict[tuple[int, str], Phase], load: tuple, load_end: tuple,
           version: str, profile: dict[int, float]) -> None:
    """The phases, the on/off ratios per concurrency level and the issue's two targets."""
    print(f"\nloopback load test: version {version}, {args.requests} requests/phase in {args.rounds} interleaved rounds, "
          f"{args.size}px PNGs, answer cache off; batching off: {args.threads} inference x {args.torch_threads} torch threads; "
          f"batching on: max_wait_ms {args.max_wait_ms:g}, max_batch {args.max_batch}, {args.on_threads} inference x "
          f"{args.on_torch_threads} torch threads; {' '.join(args.set) or 'no other overrides'}"
          f"{'; batching off only: ' + ' '.join(args.off_set) if args.off_set else ''}; cpus={os.cpu_count()}")
    print(f"load average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start, "
          f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f} at end")
    print(f"\n{'phase':<28}{'req':>6}{'err':>5}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'img/call':>10}{'model p50':>10}")
    for p in ([base] if base else []) + list(table.values()):
        model = statistics.median(p.model_ms) if p.model_ms else float("nan")
        per_call = p.images_per_call if p.batch_sizes else float("nan")
        print(f"{p.name:<28}{p.requests:>6}{p.errors:>5}{p.throughput:>9.2f}{p.pct(50):>9.1f}{p.pct(95):>9.1f}{p.pct(99):>9.1f}"
              f"{per_call:>10.2f}{model:>10.1f}")
    print(f"\n{'clients':<9}{'req/s on/off':>14}{'p50 on/off':>12}{'p95 on/off':>12}")
    for c in args.clients:
        on, off = table[(c, "on")], table[(c, "off")]
        print(f"{c:<9}{pct_ratio(on.throughput, off.throughput):>14}{pct_ratio(on.pct(50), off.pct(50)):>12}"
              f"{pct_ratio(on.pct(95), off.pct(95)):>12}")
    single = table[(min(args.clients), "off")]
    if single.model_ms:
        over = [lat - m for lat, m in zip(single.latencies_ms, single.model_ms)]
        print(f"\nHTTP + upload + JSON overhead per request ({single.name}, latency - recognizer time): "
              f"median {statistics.median(over):.1f} ms")
    if base:
        print(f"{single.name} vs in-process: {single.throughput / base.throughput:.2f}x throughput")
    if profile:
        one = profile[min(profile)]
        print("recognize_batch CPU per image (in-process, 1 thread): "
              + ", ".join(f"batch {bs}: {ms:.1f} ms ({one / ms:.2f}x)" for bs, ms in profile.items()))
    top = max(args.clients)
    on, off = table[(top, "on")], table[(top, "off")]
    one_on = table[(min(args.clients), "on")]
    gain, tail = on.throughput / off.throughput, on.pct(95) / single.pct(50)
    if one_on.batch_sizes and one_on.images_per_call < 1.05:
        why = (f"the --off-set difference ({' '.join(args.off_set)}) alone" if args.off_set
               else "differences of that size are this run's noise")
        print(f"\nat {min(args.clients)} client no batch forms (img/call {one_on.images_per_call:.2f}), "
              f"yet on/off reads {one_on.throughput / single.throughput:.2f}x req/s: {why}")
    print(f"\ntarget 1: {top} clients, batching on vs off: {gain:.2f}x throughput (target >= 1.5x: {'met' if gain >= 1.5 else 'NOT met'})")
    print(f"target 2: p95 at {top} clients with batching on / p50 of one client = {on.pct(95):.0f} / {single.pct(50):.0f} ms "
          f"= {tail:.2f}x (target <= 2x: {'met' if tail <= 2 else 'NOT met'}); p95/p50 within the {top}-client phase: "
          f"{on.pct(95) / on.pct(50):.2f}x; Little's law: {top} closed-loop clients at {on.throughput:.1f} req/s wait "
          f"{top / on.throughput * 1e3:.0f} ms on average, so 2x one client's p50 needs {top / (2 * single.pct(50) / 1e3):.0f} req/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    ap.add_argument("--requests", type=int, default=96, help="requests per phase (bounded)")
    ap.add_argument("--time-limit", type=float, default=120.0, help="seconds per phase at most")
    ap.add_argument("--size", type=int, default=256, help="side of the synthetic test pictures, px")
    ap.add_argument("--registry", type=Path, default=None, help="registry to serve, its live version (default: build a synthetic one)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per phase (drift on shared machines)")
    ap.add_argument("--threads", type=int, default=2, help="server inference threads (limits.inference_threads)")
    ap.add_argument("--torch-threads", type=int, default=1, help="torch threads in the servers and the baseline")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="batching.max_wait_ms of the batching server")
    ap.add_argument("--max-batch", type=int, default=8, help="batching.max_batch of the batching server")
    ap.add_argument("--on-threads", type=int, default=None, help="inference threads of the batching server (default: --threads)")
    ap.add_argument("--on-torch-threads", type=int, default=None,
                    help="torch threads of the batching server (default: --torch-threads); batches can use more than one")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="serve.yaml override for both servers, e.g. --set feature_log.enabled=false (repeatable)")
    ap.add_argument("--off-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for the batching-off server only, e.g. --off-set recognizer.runtime=torch: the service as issue 12 found it "
                         "(eager torch, one call per request) against micro-batching on the version's own runtime")
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-process phases (recognizer baseline, batch CPU profile)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.max_wait_ms <= 0:
        ap.error("--max-wait-ms must be > 0 (the other server already runs with batching off)")
    args.on_threads = args.on_threads or args.threads
    args.on_torch_threads = args.on_torch_threads or args.torch_threads
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3

    with tempfile.TemporaryDirectory(prefix="ard-load-") as tmp:
        work = Path(tmp)
        registry = (args.registry or build_registry(work, 96)).resolve()
        version = served_version(registry)
        images = synthetic_images(max(64, args.requests), args.size, seed=123)
        servers: dict[str, ServerProc] = {}
        try:
            servers["off"] = start_server(registry, version, work / "off", args.threads, args.torch_threads,
                                          [*args.set, *args.off_set, "batching.max_wait_ms=0"])
            servers["on"] = start_server(registry, version, work / "on", args.on_threads, args.on_torch_threads,
                                         [*args.set, f"batching.max_wait_ms={args.max_wait_ms:g}", f"batching.max_batch={args.max_batch}"])
            quiet(threads=args.torch_threads)  # same per-request compute as one server worker; no per-image log lines
            rec = None if args.no_baseline else load_recognizer(registry, version)
            profile: dict[int, float] = {}
            if rec is not None:
                rec.recognize_bytes(images[0], "warmup.png")
                profile = batch_cpu_profile(rec, images)
            for srv in servers.values():  # warm both: single requests, then every batch shape a burst produces
                asyncio.run(run_clients(srv.url, images, 1, 4, 60, "warm-up"))
                asyncio.run(run_clients(srv.url, images, max(args.clients), 2 * max(args.clients), 120, "warm-up"))
            per = max(1, args.requests // args.rounds)
            budget = args.time_limit / args.rounds
            base: Phase | None = None
            table: dict[tuple[int, str], Phase] = {}
            for r in range(args.rounds):
                if rec is not None:
                    got = baseline_in_process(rec, images[r * per:(r + 1) * per] or images[:per], budget)
                    base = got if base is None else base.merge(got)
                order = ("off", "on") if r % 2 == 0 else ("on", "off")  # neither side always goes first
                for c in args.clients:
                    for mode in order:
                        got = asyncio.run(run_clients(servers[mode].url, images, c, per, budget,
                                                      f"{c} client{'s' if c > 1 else ''}, batching {mode}", offset=r * per))
                        key = (c, mode)
                        table[key] = got if key not in table else table[key].merge(got)
            table = {k: table[k] for k in sorted(table, key=lambda k: (k[0], k[1] != "off"))}
        finally:
            for srv in servers.values():
                srv.stop()

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    report(args, base, table, load, load_end, version, profile)
    errors = sum(p.errors for p in table.values()) + (base.errors if base else 0)
    for p in table.values():
        for s in p.error_samples:
            print(f"  error in {p.name}: {s}")
    print(f"errors: {errors}")
    if args.json:
        phases = ([base] if base else []) + list(table.values())
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "version": version,
                                         "load_average": {"start": load, "end": load_end},
                                         "batch_cpu_ms_per_image": profile,
                                         "phases": [p.summary() for p in phases]}, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
