"""Soak test of the real service: N loopback clients for M minutes mixing every kind of request, with an
enrolment, a log-fusion run and the hot reload it causes in the middle; then an API fuzz of K generated requests.

Starts `python -m anime_role_detect.serve` (uvicorn on 127.0.0.1, a free port) over a registry version built
here from synthetic characters (the tests' builder), and reports:

* requests served and statuses per request kind (good images, corrupt files, videos, batches, feedback,
  reads, the enrolment); 0 5xx, 0 transport errors and 0 unexpected statuses is the bar;
* p50/p95 latency, requests and the server's resident memory per time slice (``--slice-s``);
* the server's resident memory, open file handles (/proc/<pid>/fd) and threads after the warm-up and at the
  end (memory must stay within ``--memory-bound`` or ``--memory-floor-mb``, handles within ``--fd-slack``);
* the feature log read back (`FeatureLog(dir).read()`) against the answers: every answered classification
  (image, batch item, video frame) has exactly one record with its hash, file name, version and role, and
  no record is torn (every line complete and parseable, every embedding row block CRC-clean);
* the fuzz phase: schemathesis against the live /openapi.json, K requests, no 5xx, errors as JSON.

Exits 1 when a check fails. Never a test: tests/service/test_soak.py runs `run_soak` for 40 seconds.
Every loop is bounded in count and time; requests go only to 127.0.0.1.

  nice -n 10 python benchmarks/soak.py --minutes 10 --fuzz 10000
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import httpx

LOOPBACK = "127.0.0.1"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
#: request kind -> statuses that are right for it (anything else is "unexpected")
EXPECTED: dict[str, frozenset[int]] = {
    "image": frozenset({200}), "corrupt": frozenset({415, 422}), "video": frozenset({200}),
    "bad_video": frozenset({200, 415, 422}), "batch": frozenset({200}), "feedback": frozenset({200}),
    "read": frozenset({200}), "enrol": frozenset({201}),
}
#: share of each kind in the client mix (the enrolment is one request made by the orchestrator)
MIX: dict[str, float] = {"image": 0.45, "corrupt": 0.10, "video": 0.04, "bad_video": 0.01, "batch": 0.15,
                         "feedback": 0.20, "read": 0.05}
#: one answered classification as both the answer and its feature-log record name it
AnswerKey = tuple[str, str, str, str]  # (image_sha256, filename, version, role)
#: how long the load may run past its nominal end while the enrolment / fusion / hot reload finish
MAX_OVERRUN_S = 900.0


# ------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SoakConfig:
    """What one soak run does; the defaults are the benchmark's 30-minute run without fuzzing."""

    minutes: float = 30.0
    clients: int = 16
    fuzz: int = 0                  # generated requests in the fuzz phase (0 = no fuzz phase)
    fuzz_minutes: float = 45.0     # time bound of the fuzz phase
    slice_s: float = 60.0          # latency/memory report slice
    warmup_s: float | None = None  # baseline memory/handles taken after this; default min(60 s, 10% of the run)
    enrol_at: float = 0.35         # share of the run at which the enrolment is sent
    fusion_at: float = 0.55        # share of the run at which log fusion runs (and the service hot-reloads)
    memory_bound: float = 0.20     # largest allowed resident-memory growth from the warm-up to the end
    memory_floor_mb: float = 96.0  # ... but always this many MB: the run enrols, fuses and reloads one version, which a
                                   # server on ONNX Runtime (~250 MB, no torch) holds beside what the allocator keeps
    fd_slack: int = 16             # largest allowed growth of open handles other than sockets from the warm-up to the end
    image_size: int = 96
    characters: int = 6
    request_timeout_s: float = 180.0
    seed: int = 0

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, 0.1 * self.duration_s)


# ------------------------------------------------------------------------------------------- data and server


@dataclass(frozen=True)
class Character:
    """A synthetic character the clients render pictures of."""

    name: str
    series: str
    pictures: tuple[bytes, ...]


def png(img: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def video_bytes(frames: Sequence[Any], fps: int = 4) -> bytes:
    """Frames encoded as MPEG-4 in MP4, in memory (PyAV), as tests/service/conftest.py makes videos."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_image(img.convert("RGB"))):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


@dataclass
class Payloads:
    """Everything the clients send, made once: pictures per character, corrupt files, videos."""

    gallery: list[Character]
    newcomer: Character  # not in the gallery; enrolled in the middle of the run
    corrupt: list[tuple[str, bytes]]
    videos: list[bytes]
    bad_videos: list[bytes]

    @classmethod
    def make(cls, n_characters: int, size: int, seed: int, per_character: int = 40) -> "Payloads":
        from anime_role_detect.data.synthetic import make_characters, render_character

        specs = make_characters(n_characters + 1, seed=11, twin_fraction=0.0)
        rng = random.Random(seed * 7919 + 5)  # a different stream than the gallery's own pictures
        chars = [Character(s.name, s.series, tuple(png(render_character(s, rng, size)[0]) for _ in range(per_character)))
                 for s in specs]
        from PIL import Image

        frames = [[Image.open(io.BytesIO(p)) for p in c.pictures[:4]] for c in chars[:n_characters]]
        videos = [video_bytes(frames[i] * 2 + frames[(i + 1) % n_characters]) for i in range(min(3, n_characters))]
        corrupt = [("broken.png", b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(200))),
                   ("truncated.png", chars[0].pictures[0][:300]), ("empty.jpg", b""),
                   ("notes.png", b"hello, I am not a picture\n" * 20), ("broken.jpg", b"\xff\xd8\xff" + b"\x00" * 64)]
        bad_videos = [videos[0][: len(videos[0]) // 2], videos[0][:64]]
        return cls(chars[:n_characters], chars[n_characters], corrupt, videos, bad_videos)


def build_registry(folder: Path, n_characters: int, size: int) -> Path:
    """A registry with one live version (gallery + open-set calibration, its embedder exported to ONNX as the workflow's
    versions are) from synthetic characters, as the service tests build it."""
    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.data.synthetic import generate_dataset, make_characters
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.registry import Registry

    data = folder / "data"
    specs = make_characters(n_characters + 1, seed=11, twin_fraction=0.0)
    generate_dataset(data, size=size, seed=1, images_per_character=12, characters=specs[:n_characters])
    cfg = compose_plain("infer", ["embedder=lite0", f"embedder.image_size={size}", "embedder.flip_tta=false", "tagger=none"])
    reg = Registry(folder / "registry")
    with reg.derive(None, "soak", promote=True) as d:
        build_recognition_folder(data, d.dir, cfg, val_fraction=0.2, seed=0, onnx=True)
    return reg.root


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def site_config(folder: Path, empty_collector: Path, work_dir: Path, workflow: dict[str, Any] | None = None) -> Path:
    """conf/serve.yaml plus a workflow that collects from an empty local folder (fuzzed workflow requests fail fast,
    offline); `workflow` sets more of its keys (its ``values`` join those)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    empty_collector.mkdir(parents=True, exist_ok=True)
    extra = dict(workflow or {})
    values = {"collector.root": str(empty_collector), "work_dir": str(work_dir), **extra.pop("values", {})}
    cfg = {"defaults": ["serve", "_self_"], "workflow": {"overrides": ["collector=local"], **extra, "values": values}}
    (folder / "serve_soak.yaml").write_text("# @package _global_\n" + yaml.safe_dump(cfg, sort_keys=False))
    return folder


class ServiceProcess:
    """`python -m anime_role_detect.serve` in a subprocess on a free loopback port, with its own work folder."""

    def __init__(self, workdir: Path, registry: Path, overrides: Sequence[str] = (), workflow: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.registry = registry
        self.featurelog = workdir / "featurelog"
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        conf = site_config(workdir / "conf", workdir / "empty_collector", workdir / "workflow", workflow)
        args = [sys.executable, "-m", "anime_role_detect.serve", "--config-dir", str(conf), "--config-name", "serve_soak",
                f"host={LOOPBACK}", f"port={self.port}", f"registry_dir={registry}", f"feature_log.dir={self.featurelog}",
                f"hydra.run.dir={workdir / 'hydra'}", "log.console_level=WARNING", *overrides]
        env = {**os.environ, **OFFLINE_ENV, "ARD_ROOT": str(workdir)}
        env.pop("ARD_API_TOKEN", None)
        self.log_path = workdir / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, timeout: float = 300.0, model: bool = True) -> None:
        """Until /api/health says ready (or, with `model` false, answers at all: a server with an empty registry);
        raises with the server's log when it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                health = httpx.get(f"{self.url}/api/health", timeout=5).json()
            except (httpx.HTTPError, ValueError):
                health = {}
            if health.get("ready") or (health and not model):
                return
            if health.get("error"):  # up, but the version did not load: no point waiting
                raise RuntimeError(f"server up without a model: {health['error']}")
            time.sleep(0.3)
        raise RuntimeError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@dataclass(frozen=True)
class ProcStats:
    """The server process as /proc shows it: memory, open handles (files vs sockets, which follow the clients) and threads."""

    rss_mb: float
    fds: int      # every open handle
    sockets: int  # of which sockets (the listener plus one per client connection)
    threads: int
    peak_mb: float = 0.0  # the process's peak resident memory so far (VmHWM)

    @property
    def files(self) -> int:
        """Handles that are not sockets: files, pipes, event fds (what a leak would grow)."""
        return self.fds - self.sockets

    @classmethod
    def of(cls, pid: int) -> "ProcStats":
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss_kb = int(fields["VmRSS"].split()[0])
        links = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except FileNotFoundError:  # closed while listing
                continue
        return cls(round(rss_kb / 1024, 1), len(links), sum(t.startswith("socket:") for t in links), int(fields["Threads"]),
                   round(int(fields["VmHWM"].split()[0]) / 1024, 1))

    def line(self) -> str:
        return f"RSS {self.rss_mb} MB, {self.files} open files + {self.sockets} sockets, {self.threads} threads"


# ------------------------------------------------------------------------------------------- the load


@dataclass
class Sample:
    """One request as a client saw it."""

    t: float  # seconds since the load started, at the request's start
    kind: str
    status: int  # 0 = transport error (no HTTP status)
    ms: float
    ok: bool  # the status is right for the kind and the body is what that status promises


@dataclass
class Outcome:
    """What one action got: its status, the classifications answered and answers worth feedback later."""

    status: int
    answered: list[AnswerKey] = field(default_factory=list)
    judged: list[tuple[str, str, str, str]] = field(default_factory=list)  # (image_sha256, truth, series, answered role)
    correct: int = 0
    graded: int = 0
    note: str = ""
    wrong_body: bool = False  # a right status whose body is not what it promises


class Ledger:
    """Everything the clients saw, shared between their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.samples: list[Sample] = []
        self.answered: collections.Counter[AnswerKey] = collections.Counter()
        self.feedback_queue: collections.deque[tuple[str, str, str, str]] = collections.deque(maxlen=2000)
        self.unexpected: list[str] = []
        self.correct = 0
        self.graded = 0

    def add(self, sample: Sample, outcome: Outcome) -> None:
        with self.lock:
            self.samples.append(sample)
            self.answered.update(outcome.answered)
            self.feedback_queue.extend(outcome.judged)
            self.correct += outcome.correct
            self.graded += outcome.graded
            if not sample.ok and len(self.unexpected) < 20:
                self.unexpected.append(f"{sample.kind} -> {sample.status or 'transport error'}: {outcome.note[:300]}")

    def next_feedback(self) -> tuple[str, str, str, str] | None:
        with self.lock:
            return self.feedback_queue.popleft() if self.feedback_queue else None


@dataclass
class Run:
    """State the clients share: the server, what they send, the ledger, and flags the orchestrator sets.

    The load runs until `stop` is set: at `deadline`, or later when the mid-run steps are still going (the
    hot reload must happen under load), but never past `deadline + MAX_OVERRUN_S`.
    """

    url: str
    payloads: Payloads
    ledger: Ledger
    t0: float
    deadline: float
    enrolled: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def characters(self) -> list[Character]:
        return self.payloads.gallery + ([self.payloads.newcomer] if self.enrolled.is_set() else [])


Action = Callable[[httpx.Client, Run, random.Random, str], Outcome]


def _answer_key(ans: dict) -> AnswerKey:
    return (ans.get("image_sha256", ""), ans.get("filename", ""), ans.get("version", ""), ans.get("role", ""))


def _graded(ans: dict, char: Character) -> Outcome:
    ok = ans.get("role") == char.name
    return Outcome(200, [_answer_key(ans)], [(ans.get("image_sha256", ""), char.name, char.series, ans.get("role", ""))],
                   correct=int(ok), graded=1)


def body(r: httpx.Response) -> dict:
    """The JSON object a response carries ({} when it carries none)."""
    try:
        d = r.json()
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


def act_image(c: httpx.Client, run: Run, rng: random.Random, name: str) -> Outcome:
    """One good picture to /api/classify."""
    char = rng.choice(run.characters())
    r = c.post("/api/classify", files={"file": (f"{name}.png", rng.choice(char.pictures), "image/png")})
    return _graded(r.json(), char) if r.status_code == 200 else Outcome(r.status_code, note=r.text)


def act_corrupt(c: httpx.Client, run: Run, rng: random.Random, name: str) -> Outcome:
    """A corrupt or non-image file to /api/classify (a 4xx with a JSON message is right)."""
    fname, data = rng.choice(run.payloads.corrupt)
    r = c.post("/api/classify", files={"file": (f"{name}-{fname}", data, "application/octet-stream")})
    return Outcome(r.status_code, note=r.text, wrong_body=not str(body(r).get("error") or "").strip())


def act_video(c: httpx.Client, run: Run, rng: random.Random, name: str) -> Outcome:
    """A small MP4 to /api/classify, 2 frames per second: every sampled frame is an answered classification."""
    r = c.post("/api/classify", files={"file": (f"{name}.mp4", rng.choice(run.payloads.videos), "video/mp4")},
               data={"sample_fps": "2"})
    if r.status_code != 200:
        return Outcome(r.status_code, note=r.text)
    return Outcome(200, [_answer_key(f) for f in r.json().get("frames", [])])


def act_bad_video(c: httpx.Client, run: Run, rng: random.Random, name: str) -> Outcome:
    """A truncated MP4: the frames decoded so far are answered, or a 4xx says why not."""
    r = c.post("/api/classify", files={"file": (f"{name}.mp4", rng.choice(run.payloads.bad_videos), "video/mp4")},
               data={"sample_fps": "2"})
    if r.status_code != 200:
        return Outcome(r.status_code, note=r.text)
    return Outcome(200, [_answer_key(f) for f in r.json().get("frames", [])])


def act_batch(c: httpx.Client, run: Run, rng: random.Random, name: str) -> Outcome:
    """Three good pictures and one corrupt file to /api/classify/batch: three answers, one error item."""
    chars = [rng.choice(run.characters()) for _ in range(3)]
    files = [("files", (f"{name}-{i}.png", rng.choice(ch.pictures), "image/png")) for i, ch in enumerate(chars)]
    bad = rng.choice(run.payloads.corrupt)
    files.insert(rng.randrange(4), ("files", (f"{name}-bad-{bad[0]}", bad[1], "application/octet-stream")))
    r = c.post("/api/classify/batch", files=files)
    if r.status_code != 200:
        return Outcome(r.status_code, note=r.text)
    items = r.json()["results"]
    good = [it for it in items if it["status"] == 200]
    if len(good) != 3 or len(items) != 4:
        return Outcome(200, note=f"batch of 3 good + 1 bad answered {len(good)} of {len(items)}: {r.text[:300]}", wrong_body=True)
    out = Outcome(200)
    for it, ch in zip(good, chars):
        one = _graded(it["answer"], ch)
        out.answered += one.answered
        out.judged += one.judged
        out.correct += one.correct
        out.graded += 1
    return out


def act_feedback(c: httpx.Client, run: Run, rng: random.Random, name: str) -> Outcome:
    """Confirm or correct an earlier answer by its image hash (a 404 would mean its record is lost)."""
    item = run.ledger.next_feedback()
    if item is None:
        return act_image(c, run, rng, name)
    sha, truth, series, role = item
    body = {"image_sha256": sha, "confirmed": True} if role == truth else {"image_sha256": sha, "correct_role": truth, "series": series}
    r = c.post("/api/feedback", json=body)
    return Outcome(r.status_code, note=r.text)


def act_read(c: httpx.Client, run: Run, rng: random.Random, name: str) -> Outcome:
    """One of the read-only endpoints."""
    r = c.get(rng.choice(["/api/health", "/api/version", "/api/characters"]))
    return Outcome(r.status_code, note=r.text)


ACTIONS: dict[str, Action] = {"image": act_image, "corrupt": act_corrupt, "video": act_video, "bad_video": act_bad_video,
                              "batch": act_batch, "feedback": act_feedback, "read": act_read}


def timed(run: Run, kind: str, fn: Callable[[], Outcome]) -> Outcome:
    """Run one request, time it, and enter it in the ledger (a transport error is status 0)."""
    start = run.now()
    s = time.perf_counter()
    try:
        out = fn()
    except httpx.HTTPError as exc:
        out = Outcome(0, note=repr(exc))
    except (ValueError, KeyError, TypeError) as exc:  # a 200 whose body is not the documented answer
        out = Outcome(200, note=repr(exc), wrong_body=True)
    ok = out.status in EXPECTED[kind] and not out.wrong_body
    run.ledger.add(Sample(start, kind, out.status, (time.perf_counter() - s) * 1e3, ok), out)
    return out


def client_loop(idx: int, run: Run, seed: int, timeout: float, max_requests: int = 1_000_000) -> None:
    """One client: a seeded mix of requests until the deadline, the stop flag or `max_requests`."""
    rng = random.Random(seed * 1000 + idx)
    kinds, weights = list(MIX), list(MIX.values())
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=2.0)  # < the server's 5 s
    with httpx.Client(base_url=run.url, timeout=timeout, limits=limits) as c:
        for n in range(max_requests):
            if run.stop.is_set() or time.monotonic() >= run.deadline + MAX_OVERRUN_S:
                return
            kind = rng.choices(kinds, weights)[0]
            name = f"c{idx:02d}-{n:06d}"
            timed(run, kind, lambda action=ACTIONS[kind], name=name: action(c, run, rng, name))


# ------------------------------------------------------------------------------------------- the orchestrator


@dataclass
class Event:
    """Something the orchestrator did during the load."""

    t: float
    what: str
    detail: dict = field(default_factory=dict)


def enrol(run: Run) -> Event:
    """Enrol the held-back character from six pictures through the API, while the clients keep going."""
    char = run.payloads.newcomer
    files = [("files", (f"enrol-{i}.png", p, "image/png")) for i, p in enumerate(char.pictures[-6:])]
    detail: dict = {}

    def call() -> Outcome:
        with httpx.Client(base_url=run.url, timeout=300) as c:
            r = c.post("/api/characters", data={"name": char.name, "series": char.series}, files=files)
        detail.update(status=r.status_code, body=body(r) or r.text[:300])
        return Outcome(r.status_code, note=r.text)

    start = run.now()
    out = timed(run, "enrol", call)
    if out.status == 201:
        run.enrolled.set()
    return Event(start, "enrol", {**detail, "seconds": round(run.now() - start, 2)})


def run_fusion(run: Run, server: ServiceProcess, timeout: float = 900.0) -> Event:
    """`python -m anime_role_detect.fusion` on the service's registry and feature log (force=true so `latest` moves)."""
    start = run.now()
    out_dir = server.workdir / "fusion"
    args = [sys.executable, "-m", "anime_role_detect.fusion", f"log_dir={server.featurelog}", f"registry_dir={server.registry}",
            "force=true", "promote=true", f"hydra.run.dir={out_dir}", f"output_dir={out_dir}", "log.console_level=WARNING"]
    env = {**os.environ, **OFFLINE_ENV, "ARD_ROOT": str(server.workdir)}
    try:
        p = subprocess.run(args, cwd=server.workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Event(start, "fusion", {"error": f"fusion did not finish in {timeout:.0f}s"})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    report = json.loads(lines[-1]) if lines else {}
    detail = {"rc": p.returncode, "decision": report.get("decision"), "reason": report.get("reason"),
              "version_id": report.get("version_id"), "added": report.get("added"), "seconds": round(run.now() - start, 2)}
    if p.returncode != 0 or not report:
        detail["stderr"] = p.stderr[-1500:]
    return Event(start, "fusion", detail)


def wait_for_version(run: Run, version_id: str, timeout: float = 600.0) -> Event:
    """Poll /api/version until the service serves `version_id` (the hot reload fusion caused)."""
    start = run.now()
    deadline = time.monotonic() + timeout
    last: dict = {}
    with httpx.Client(base_url=run.url, timeout=30) as c:
        while time.monotonic() < deadline and not run.stop.is_set():
            try:
                last = c.get("/api/version").json()
            except (httpx.HTTPError, ValueError):
                last = {}
            if last.get("version") == version_id:
                return Event(start, "hot reload", {"version": version_id, "seconds": round(run.now() - start, 2),
                                                   "load_s": last.get("load_s"), "reloads": last.get("reloads")})
            time.sleep(0.5)
    return Event(start, "hot reload", {"error": f"still serving {last.get('version')} after {timeout:.0f}s, wanted {version_id}",
                                       "last_error": last.get("last_error")})


def orchestrate(run: Run, server: ServiceProcess, cfg: SoakConfig, events: list[Event]) -> None:
    """The one-off steps in the middle of the load: the enrolment, then log fusion and the hot reload it causes."""
    def sleep_until(share: float) -> bool:
        target = run.t0 + share * cfg.duration_s
        while time.monotonic() < target:
            if run.stop.wait(min(1.0, max(0.0, target - time.monotonic()))):
                return False
        return True

    if not sleep_until(cfg.enrol_at):
        return
    events.append(enrol(run))
    if not sleep_until(cfg.fusion_at):
        return
    fusion = run_fusion(run, server)
    events.append(fusion)
    if fusion.detail.get("version_id") and fusion.detail.get("decision") == "registered":
        events.append(wait_for_version(run, fusion.detail["version_id"]))


def monitor(run: Run, pid: int, every_s: float, timeline: list[tuple[float, ProcStats]], end: threading.Event) -> None:
    """Sample the server's memory, handles and threads every `every_s` seconds until `end`."""
    while not end.is_set():
        try:
            timeline.append((run.now(), ProcStats.of(pid)))
        except (FileNotFoundError, ProcessLookupError):
            return
        end.wait(every_s)


# ------------------------------------------------------------------------------------------- the feature log


@dataclass
class LogCheck:
    """The feature log read back against what the clients were answered."""

    records: int = 0
    lines: int = 0
    torn_lines: int = 0
    corrupt_rows: int = 0
    bad_rows: int = 0        # records whose embedding rows do not match their detections
    answered: int = 0
    missing: int = 0         # answered classifications without a record
    duplicated: int = 0      # answered classifications with more than one record
    unanswered: int = 0      # records no client was answered for (e.g. a request that timed out)
    missing_samples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.torn_lines or self.corrupt_rows or self.bad_rows or self.missing or self.duplicated) and self.lines == self.records


def raw_lines(folder: Path) -> tuple[int, int]:
    """(complete parseable lines, torn or unparseable lines) over the log's segment files, read byte for byte."""
    good = torn = 0
    for seg in sorted((folder / "segments").glob("*.jsonl")):
        blob = seg.read_bytes()
        parts = blob.split(b"\n")
        if parts and parts[-1] == b"":
            parts.pop()
        else:
            torn += 1 if parts else 0  # a last line without its newline
            parts = parts[:-1]
        for line in parts:
            try:
                json.loads(line)
                good += 1
            except ValueError:
                torn += 1
    return good, torn


def check_feature_log(folder: Path, answered: collections.Counter[AnswerKey]) -> LogCheck:
    """Read the log back (`FeatureLog(dir).read()`) and match every answered classification to exactly one record."""
    from anime_role_detect.fusion.featurelog import FeatureLog

    log = FeatureLog(folder)
    logged: collections.Counter[AnswerKey] = collections.Counter()
    chk = LogCheck()
    for rec in log.read():
        chk.records += 1
        d = rec.data
        logged[(d.get("image_sha256", ""), d.get("filename", ""), d.get("version", ""), d.get("role", ""))] += 1
        if rec.embeddings.shape[0] != len(rec.detections):
            chk.bad_rows += 1
    chk.corrupt_rows = log.corrupt
    chk.lines, chk.torn_lines = raw_lines(folder)
    chk.answered = sum(answered.values())
    for key, n in answered.items():
        have = logged.get(key, 0)
        if have < n:
            chk.missing += n - have
            if len(chk.missing_samples) < 10:
                chk.missing_samples.append(f"{key} answered {n}x, logged {have}x")
        elif have > n:
            chk.duplicated += have - n
    chk.unanswered = sum(max(0, n - answered.get(k, 0)) for k, n in logged.items())
    return chk


# ------------------------------------------------------------------------------------------- fuzzing


@dataclass
class FuzzReport:
    """The fuzz phase: generated requests, their statuses and the checks that failed."""

    requests: int = 0
    seconds: float = 0.0
    operations: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    not_sent: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    failure_samples: list[str] = field(default_factory=list)
    gave_up: dict[str, int] = field(default_factory=dict)  # operations Hypothesis could not generate for (e.g. Unsatisfiable)

    @property
    def server_errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


def run_fuzz(url: str, total: int, limit_s: float, seed: int = 0) -> FuzzReport:
    """Schemathesis against the live /openapi.json (the checks of tests/service/test_fuzz.py) until `total` requests or `limit_s`.

    Operations take turns in rounds (a new Hypothesis seed each round) so that operations with few distinct
    inputs do not end the phase early; a failed check is counted, never shrunk.
    """
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    rep = FuzzReport()
    statuses: collections.Counter[int] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    rep.operations = len(ops)
    t0 = time.monotonic()
    deadline = t0 + limit_s

    def fail(title: str, detail: str) -> None:
        failures[title] += 1
        if len(rep.failure_samples) < 10:
            rep.failure_samples.append(f"{title}: {detail[:300]}")

    def check(case: Any) -> None:
        if rep.requests >= total or time.monotonic() > deadline:
            return
        try:
            response = case.call(timeout=60)
        except Exception as exc:  # noqa: BLE001 - a request the client could not send or read is counted, not raised
            rep.not_sent += 1  # e.g. a generated value schemathesis cannot serialise
            if type(exc).__module__.split(".")[0] in ("requests", "urllib3") or isinstance(exc, OSError):
                fail("transport error", repr(exc))
            return
        rep.requests += 1
        statuses[response.status_code] += 1
        label = f"{case.operation.label} -> {response.status_code}"
        if response.status_code >= 400:
            ctype = (response.headers.get("content-type") or [""])[0]
            try:
                ok = ctype.startswith("application/json") and str(response.json().get("error", "")).strip() != ""
            except ValueError:
                ok = False
            if not ok:
                fail("error is not a JSON {error} body", f"{label}: {response.text[:200]}")
        try:
            case.validate_response(response, checks=checks)
        except BaseExceptionGroup as group:
            for exc in group.exceptions:
                fail(getattr(exc, "title", type(exc).__name__), f"{label}: {getattr(exc, 'message', exc)}")
        except AssertionError as exc:
            fail(getattr(exc, "title", "check failed"), f"{label}: {exc}")

    for rnd in range(10_000):
        before = rep.requests
        per_op = max(10, min(500, -(-(total - rep.requests) // max(1, len(ops)))))
        for op in ops:
            if rep.requests >= total or time.monotonic() > deadline:
                break

            @hypothesis_seed(seed * 100_003 + rnd)
            @given(case=op.as_strategy())
            @settings(max_examples=per_op, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def fuzz(case: Any) -> None:
                check(case)

            try:
                fuzz()
            except Exception as exc:  # noqa: BLE001 - Hypothesis giving up on an operation (e.g. Unsatisfiable) ends its turn
                rep.gave_up[f"{op.label}: {type(exc).__name__}"] = rep.gave_up.get(f"{op.label}: {type(exc).__name__}", 0) + 1
        if rep.requests >= total or time.monotonic() > deadline or rep.requests == before:
            break
    rep.seconds = round(time.monotonic() - t0, 1)
    rep.statuses = dict(sorted(statuses.items()))
    rep.failures = dict(failures)
    return rep


# ------------------------------------------------------------------------------------------- the run and its report


@dataclass
class SliceStats:
    """Requests in one time slice."""

    start_s: float
    requests: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    server_errors: int
    rss_mb: float | None


@dataclass
class SoakReport:
    """Figures and verdicts of one soak run."""

    config: dict
    seconds: float
    loadavg_start: tuple[float, float, float]
    loadavg_end: tuple[float, float, float]
    requests: int
    by_kind: dict[str, dict[str, int]]
    latency_by_kind: dict[str, dict[str, float]]
    slices: list[SliceStats]
    server_errors: int
    transport_errors: int
    unexpected: int
    unexpected_samples: list[str]
    top1: float | None
    events: list[Event]
    start: ProcStats
    end: ProcStats
    peak_rss_mb: float
    log: LogCheck
    fuzz: FuzzReport | None = None
    after_fuzz: ProcStats | None = None

    @property
    def rss_growth(self) -> float:
        return self.end.rss_mb / self.start.rss_mb - 1.0

    @property
    def memory_ok(self) -> bool:
        """Resident memory at the end within `memory_bound` of the warm-up figure, or within `memory_floor_mb` MB of it."""
        cfg = self.config
        return self.rss_growth <= cfg["memory_bound"] or self.end.rss_mb - self.start.rss_mb <= cfg["memory_floor_mb"]

    def problems(self) -> list[str]:
        """Every check that failed, one line each (empty = the run passed)."""
        cfg = self.config
        out = []
        if self.server_errors:
            out.append(f"{self.server_errors} server errors (5xx)")
        if self.transport_errors:
            out.append(f"{self.transport_errors} transport errors (no HTTP answer)")
        if self.unexpected:
            out.append(f"{self.unexpected} unexpected statuses, e.g. {self.unexpected_samples[:3]}")
        if not self.log.ok:
            out.append(f"feature log: {self.log.missing} answers without a record, {self.log.duplicated} logged twice, "
                       f"{self.log.torn_lines} torn lines, {self.log.corrupt_rows} CRC failures, {self.log.bad_rows} row mismatches, "
                       f"{self.log.lines} lines vs {self.log.records} records read; {self.log.missing_samples[:3]}")
        if not self.memory_ok:
            out.append(f"resident memory grew {self.rss_growth:.1%} ({self.start.rss_mb} -> {self.end.rss_mb} MB), bound "
                       f"{cfg['memory_bound']:.0%} or {cfg['memory_floor_mb']:.0f} MB")
        if self.end.files - self.start.files > cfg["fd_slack"]:
            out.append(f"open file handles (not sockets) grew {self.start.files} -> {self.end.files} (slack {cfg['fd_slack']})")
        whats = {e.what: e.detail for e in self.events}
        if whats.get("enrol", {}).get("status") != 201:
            out.append(f"enrolment did not succeed: {whats.get('enrol')}")
        if whats.get("fusion", {}).get("decision") != "registered":
            out.append(f"fusion did not register a version: {whats.get('fusion')}")
        if "error" in whats.get("hot reload", {"error": "no hot reload seen"}):
            out.append(f"hot reload: {whats.get('hot reload', {}).get('error', 'not seen')}")
        if self.fuzz is not None:
            if self.fuzz.requests < cfg["fuzz"]:
                out.append(f"fuzz sent {self.fuzz.requests} of {cfg['fuzz']} requests in {self.fuzz.seconds}s")
            if self.fuzz.server_errors or self.fuzz.failures:
                out.append(f"fuzz: {self.fuzz.server_errors} 5xx, failed checks {self.fuzz.failures}, e.g. {self.fuzz.failure_samples[:3]}")
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["rss_growth"] = round(self.rss_growth, 4)
        d["problems"] = self.problems()
        return d


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize_slices(samples: Sequence[Sample], timeline: Sequence[tuple[float, ProcStats]], slice_s: float) -> list[SliceStats]:
    """p50/p95 latency, request count, 5xx and the server's memory per `slice_s` slice of the run (by request start)."""
    n = int(max((s.t for s in samples), default=0.0) // slice_s) + 1
    out = []
    for i in range(n):
        lo, hi = i * slice_s, (i + 1) * slice_s
        ms = [s.ms for s in samples if lo <= s.t < hi]
        rss = [p.rss_mb for t, p in timeline if lo <= t < hi]
        out.append(SliceStats(lo, len(ms), round(percentile(ms, 50), 1), round(percentile(ms, 95), 1), round(max(ms, default=float("nan")), 1),
                              sum(1 for s in samples if lo <= s.t < hi and 500 <= s.status < 600), rss[-1] if rss else None))
    return out


def by_kind(samples: Sequence[Sample]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, float]]]:
    """Statuses per request kind, and p50/p95 per kind."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lat: dict[str, list[float]] = collections.defaultdict(list)
    for s in samples:
        counts[s.kind][str(s.status) if s.status else "transport"] += 1
        lat[s.kind].append(s.ms)
    return ({k: dict(sorted(v.items())) for k, v in sorted(counts.items())},
            {k: {"p50_ms": round(percentile(v, 50), 1), "p95_ms": round(percentile(v, 95), 1)} for k, v in sorted(lat.items())})


def wait_idle(pid: int, seconds: float) -> ProcStats:
    """The server's stats after `seconds` of no load (lets worker threads and sockets wind down)."""
    time.sleep(seconds)
    return ProcStats.of(pid)


def run_soak(cfg: SoakConfig, workdir: Path, log: Callable[[str], None] = print) -> SoakReport:
    """Build a registry, start the service, run the load with its mid-run steps, check the feature log, fuzz; report."""
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    log(f"building the registry and payloads in {workdir} (load average {load_start[0]:.1f})")
    registry = build_registry(workdir / "build", cfg.characters, cfg.image_size)
    payloads = Payloads.make(cfg.characters, cfg.image_size, cfg.seed)
    server = ServiceProcess(workdir / "server", registry)
    timeline: list[tuple[float, ProcStats]] = []
    events: list[Event] = []
    monitor_end = threading.Event()
    try:
        server.wait_ready()
        t0 = time.monotonic()
        run = Run(server.url, payloads, Ledger(), t0, t0 + cfg.duration_s)
        log(f"server pid {server.pid} on {server.url}; {cfg.clients} clients for {cfg.minutes} min")
        mon = threading.Thread(target=monitor, args=(run, server.pid, min(5.0, cfg.slice_s / 4), timeline, monitor_end), daemon=True)
        mon.start()
        clients = [threading.Thread(target=client_loop, args=(i, run, cfg.seed, cfg.request_timeout_s), daemon=True)
                   for i in range(cfg.clients)]
        for t in clients:
            t.start()
        orch = threading.Thread(target=orchestrate, args=(run, server, cfg, events), daemon=True)
        orch.start()
        time.sleep(min(cfg.warmup, cfg.duration_s))
        start_stats = ProcStats.of(server.pid)
        log(f"after {cfg.warmup:.0f}s warm-up: {start_stats.line()}")
        time.sleep(max(0.0, run.deadline - time.monotonic()))
        orch.join(MAX_OVERRUN_S)  # the load goes on until the mid-run steps are done (bounded)
        run.stop.set()
        for t in clients:
            t.join(cfg.request_timeout_s + 30)
        orch.join(30)
        seconds = time.monotonic() - t0
        end_stats = wait_idle(server.pid, 3.0)
        monitor_end.set()
        mon.join(10)
        log(f"load done after {seconds:.0f}s: {end_stats.line()}; checking the feature log")
        chk = check_feature_log(server.featurelog, run.ledger.answered)
        fuzz_rep = after_fuzz = None
        if cfg.fuzz > 0:
            log(f"fuzzing with {cfg.fuzz} generated requests (at most {cfg.fuzz_minutes} min)")
            fuzz_rep = run_fuzz(server.url, cfg.fuzz, cfg.fuzz_minutes * 60, cfg.seed)
            after_fuzz = wait_idle(server.pid, 3.0)
        samples = run.ledger.samples
        kinds, lat = by_kind(samples)
        return SoakReport(
            config={**asdict(cfg), "warmup_s": cfg.warmup}, seconds=round(seconds, 1), loadavg_start=load_start,
            loadavg_end=os.getloadavg(), requests=len(samples), by_kind=kinds, latency_by_kind=lat,
            slices=summarize_slices(samples, timeline, cfg.slice_s),
            server_errors=sum(1 for s in samples if 500 <= s.status < 600),
            transport_errors=sum(1 for s in samples if s.status == 0),
            unexpected=sum(1 for s in samples if not s.ok), unexpected_samples=run.ledger.unexpected,
            top1=round(run.ledger.correct / run.ledger.graded, 4) if run.ledger.graded else None, events=events,
            start=start_stats, end=end_stats, peak_rss_mb=max((p.rss_mb for _, p in timeline), default=end_stats.rss_mb),
            log=chk, fuzz=fuzz_rep, after_fuzz=after_fuzz,
        )
    finally:
        monitor_end.set()
        server.stop()


def format_report(rep: SoakReport) -> str:
    """The report as text: totals, statuses per kind, slices, process figures, the log check, the fuzz, the verdict."""
    c = rep.config
    la0, la1 = rep.loadavg_start, rep.loadavg_end
    lines = [(f"soak: {c['clients']} clients, {rep.seconds:.0f} s, {rep.requests} requests "
              f"({rep.requests / max(rep.seconds, 1e-9):.1f}/s), cpus={os.cpu_count()}"),
             f"load average at start {la0[0]:.2f} {la0[1]:.2f} {la0[2]:.2f}, at end {la1[0]:.2f} {la1[1]:.2f} {la1[2]:.2f}",
             (f"5xx: {rep.server_errors}   transport errors: {rep.transport_errors}   unexpected statuses: {rep.unexpected}"
              f"   top-1 on good pictures: {rep.top1}"), "", f"{'kind':<10}{'statuses':<40}{'p50 ms':>9}{'p95 ms':>9}"]
    for kind, counts in rep.by_kind.items():
        lat = rep.latency_by_kind[kind]
        lines.append(f"{kind:<10}{json.dumps(counts):<40}{lat['p50_ms']:>9.1f}{lat['p95_ms']:>9.1f}")
    lines += ["", f"{'slice':>7}{'req':>7}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'5xx':>5}{'RSS MB':>9}"]
    for s in rep.slices:
        lines.append(f"{s.start_s:>6.0f}s{s.requests:>7}{s.p50_ms:>9.1f}{s.p95_ms:>9.1f}{s.max_ms:>9.1f}{s.server_errors:>5}"
                     f"{(s.rss_mb if s.rss_mb is not None else float('nan')):>9.1f}")
    lines += ["", "events:"] + [f"  {e.t:>6.0f}s {e.what}: {json.dumps(e.detail)[:400]}" for e in rep.events]
    lines += ["", f"server after warm-up (under load): {rep.start.line()}",
              f"server at end (3 s idle):         {rep.end.line()}",
              f"resident memory {rep.rss_growth:+.1%} (bound {c['memory_bound']:.0%} or {c['memory_floor_mb']:.0f} MB), peak {rep.peak_rss_mb} MB"]
    lg = rep.log
    lines += [(f"feature log: {lg.records} records read back = {lg.lines} complete lines; {lg.torn_lines} torn, "
               f"{lg.corrupt_rows} CRC failures, {lg.bad_rows} row mismatches; {lg.answered} answered classifications, "
               f"{lg.missing} without a record, {lg.duplicated} logged twice, {lg.unanswered} records without an answer")]
    if rep.fuzz is not None:
        f = rep.fuzz
        lines += [f"fuzz: {f.requests} generated requests over {f.operations} operations in {f.seconds:.0f} s; statuses {f.statuses}; "
                  f"not sent {f.not_sent}; failed checks {f.failures or 'none'}" + (f"; gave up {f.gave_up}" if f.gave_up else "")]
        if rep.after_fuzz is not None:
            lines.append(f"server after fuzz (3 s idle):     {rep.after_fuzz.line()}")
    problems = rep.problems()
    lines += ["", "PASS" if not problems else "FAIL:\n  " + "\n  ".join(problems)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakConfig()
    ap.add_argument("--minutes", type=float, default=d.minutes, help="length of the load phase")
    ap.add_argument("--clients", type=int, default=d.clients, help="concurrent clients")
    ap.add_argument("--fuzz", type=int, default=d.fuzz, help="generated requests in the fuzz phase after the load (0 = none)")
    ap.add_argument("--fuzz-minutes", type=float, default=d.fuzz_minutes, help="time bound of the fuzz phase")
    ap.add_argument("--slice-s", type=float, default=d.slice_s, help="seconds per latency/memory slice in the report")
    ap.add_argument("--memory-bound", type=float, default=d.memory_bound, help="largest resident-memory growth after the warm-up")
    ap.add_argument("--memory-floor-mb", type=float, default=d.memory_floor_mb, help="growth in MB always allowed (one more version)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run's registry, feature log and server log here")
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = ap.parse_args(argv)
    cfg = SoakConfig(minutes=args.minutes, clients=args.clients, fuzz=args.fuzz, fuzz_minutes=args.fuzz_minutes,
                     slice_s=args.slice_s, memory_bound=args.memory_bound, memory_floor_mb=args.memory_floor_mb, seed=args.seed)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="ard-soak-")
    try:
        rep = run_soak(cfg, args.workdir or Path(tmp))
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(format_report(rep))
    if args.json:
        args.json.write_text(json.dumps(rep.to_json(), indent=2, default=str))
    return 1 if rep.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
