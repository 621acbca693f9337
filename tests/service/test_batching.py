"""Micro-batching of concurrent `/api/classify` requests (serve/batching.py).

Fast: the `MicroBatcher` with a recorded group runner and with the real `recognize_group` over a recognizer
stand-in (grouping, per-item errors, cancelled requests, shutdown). Slow: two real servers over the same
synthetic version, one batching (`batching.max_wait_ms=50`) and one not (`0`), hit by concurrent clients.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import pytest
from PIL import Image

from anime_role_detect.errors import ConfigError
from anime_role_detect.serve.batching import Job, MicroBatcher, recognize_group
from anime_role_detect.serve.errors import ApiError
from anime_role_detect.serve.live import Loaded, ReadWriteLock
from anime_role_detect.serve.settings import BatchingSettings, ServeSettings

from .conftest import Server, start_server


# -- the batcher alone (fast) -------------------------------------------------------------------
@dataclass
class FakeAnswer:
    filename: str
    mode: str | None
    batch: int


class FakeRecognizer:
    """Stands in for `Recognizer.recognize_batch`: records each call; an item named 'bad*' breaks its batch."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.delay_s = delay_s

    def recognize_batch(self, items, mode=None, rerank=None, hashes=None, data=None):
        names = [n for _, n in items]
        self.calls.append(names)
        assert hashes == [f"h-{n}" for n in names] and data == [n.encode() for n in names]
        time.sleep(self.delay_s)
        bad = [n for n in names if n.startswith("bad")]
        if bad:
            raise ConfigError(f"{bad[0]}: cannot be recognised")
        return [FakeAnswer(n, mode, len(items)) for n in names]


def _loaded(rec: Any) -> Loaded:
    return Loaded(recognizer=rec, version_id="v1", loaded_at=0.0, load_s=0.0, lock=ReadWriteLock())


async def _to_thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


def _batcher(max_wait_ms: float = 50, max_batch: int = 16, slots: int = 1, **kw) -> MicroBatcher:
    return MicroBatcher(BatchingSettings(max_wait_ms=max_wait_ms, max_batch=max_batch), _to_thread, slots=slots, **kw)


async def _submit(b: MicroBatcher, loaded: Loaded, name: str, mode: str | None = "clip", decode_s: float = 0.0) -> Any:
    """What the route does: announce, 'decode', then wait for the batched answer."""
    with b.incoming():
        await asyncio.sleep(decode_s)
    return await b.recognize(loaded, Image.new("RGB", (4, 4)), name, f"h-{name}", name.encode(), mode=mode, rerank=None)


async def _gather(coros) -> list[Any]:
    return await asyncio.gather(*coros, return_exceptions=True)


def test_concurrent_jobs_share_recognizer_calls_and_each_gets_its_own_answer():
    async def main():
        rec = FakeRecognizer(delay_s=0.02)
        b = _batcher(max_wait_ms=50, max_batch=4)
        loaded = _loaded(rec)
        out = await _gather(_submit(b, loaded, f"img{i}", decode_s=0.001 * i) for i in range(10))
        await b.aclose()
        return rec, b, out

    rec, b, out = asyncio.run(main())
    assert [a.filename for a in out] == [f"img{i}" for i in range(10)]
    assert sorted(n for call in rec.calls for n in call) == sorted(f"img{i}" for i in range(10))
    assert len(rec.calls) < 10 and max(len(c) for c in rec.calls) <= 4
    assert b.stats.batches == len(rec.calls) and b.stats.images == 10 and b.stats.largest > 1


def test_jobs_are_grouped_by_mode_and_lease():
    async def main():
        rec_a, rec_b = FakeRecognizer(delay_s=0.01), FakeRecognizer(delay_s=0.01)
        old, new = _loaded(rec_a), _loaded(rec_b)  # a hot reload between requests: two leases
        b = _batcher(max_wait_ms=100)
        out = await _gather([_submit(b, old, "a1"), _submit(b, old, "m1", mode="model"), _submit(b, new, "n1"),
                             _submit(b, old, "a2"), _submit(b, old, "m2", mode="model")])
        await b.aclose()
        return rec_a, rec_b, out

    rec_a, rec_b, out = asyncio.run(main())
    assert [(a.filename, a.mode) for a in out] == [("a1", "clip"), ("m1", "model"), ("n1", "clip"), ("a2", "clip"), ("m2", "model")]
    assert sorted(map(sorted, rec_a.calls)) == [["a1", "a2"], ["m1", "m2"]]  # never mixed modes in one call
    assert rec_b.calls == [["n1"]]  # never another lease's recognizer


def test_an_item_that_breaks_its_batch_fails_alone():
    """The batch call raises because of one item: every item is retried alone, the bad one gets its own error."""
    async def main():
        rec = FakeRecognizer()
        b = _batcher(max_wait_ms=100)
        loaded = _loaded(rec)
        out = await _gather([_submit(b, loaded, n) for n in ("good1", "bad", "good2")])
        await b.aclose()
        return rec, out

    rec, out = asyncio.run(main())
    assert out[0].filename == "good1" and out[2].filename == "good2"
    assert isinstance(out[1], ConfigError) and "bad" in str(out[1])
    assert rec.calls[0] == ["good1", "bad", "good2"] and rec.calls[1:] == [["good1"], ["bad"], ["good2"]]


def test_recognize_group_holds_one_read_lock_for_the_whole_group():
    """A gallery edit (write lock) waits until the group's one recognizer call is done."""
    rec = FakeRecognizer()
    loaded = _loaded(rec)
    edited = threading.Event()

    def writer() -> None:
        with loaded.lock.write():
            edited.set()

    editor = threading.Thread(target=writer)
    real = rec.recognize_batch

    def batch_while_an_edit_waits(items, **kw):
        editor.start()
        assert not edited.wait(0.2), "a gallery edit ran in the middle of a batch"
        return real(items, **kw)

    rec.recognize_batch = batch_while_an_edit_waits  # type: ignore[method-assign]
    jobs = [Job(loaded, "clip", None, Image.new("RGB", (4, 4)), n, f"h-{n}", n.encode(), None) for n in ("x", "y")]  # type: ignore[arg-type]
    out = recognize_group(jobs)
    editor.join(5)
    assert [a.filename for a in out] == ["x", "y"] and a_batch_of(out) == [2, 2] and edited.is_set()
    assert rec.calls == [["x", "y"]]


def a_batch_of(answers: Sequence[FakeAnswer]) -> list[int]:
    return [a.batch for a in answers]


def test_a_cancelled_request_is_dropped_and_shutdown_answers_the_queue_with_503():
    async def main():
        rec = FakeRecognizer(delay_s=0.3)
        b = _batcher(max_wait_ms=1, slots=1)
        loaded = _loaded(rec)
        first = asyncio.create_task(_submit(b, loaded, "first"))
        await asyncio.sleep(0.1)  # `first` now runs in the only slot
        gone = asyncio.create_task(_submit(b, loaded, "gone"))
        kept = asyncio.create_task(_submit(b, loaded, "kept"))
        await asyncio.sleep(0.05)
        gone.cancel()  # its request timed out while queued
        out = await _gather([first, gone, kept])
        busy = asyncio.create_task(_submit(b, _loaded(FakeRecognizer(delay_s=0.5)), "busy"))
        await asyncio.sleep(0.1)  # `busy` runs in the only slot
        queued = asyncio.create_task(_submit(b, loaded, "queued"))
        await asyncio.sleep(0.05)
        await b.aclose()
        rest = await _gather([busy, queued])
        after = await _gather([_submit(b, loaded, "after")])
        return rec, out, rest, after

    rec, out, rest, after = asyncio.run(main())
    assert out[0].filename == "first" and isinstance(out[1], asyncio.CancelledError) and out[2].filename == "kept"
    assert all("gone" not in call for call in rec.calls)
    # shutdown: what was running finishes, what was queued is told to retry, nothing new is taken
    assert rest[0].filename == "busy" and isinstance(rest[1], ApiError) and rest[1].status_code == 503
    assert isinstance(after[0], ApiError) and after[0].status_code == 503 and "shutting down" in after[0].error


def test_batching_settings_off_at_zero_wait_and_checked():
    assert ServeSettings.from_config({"batching": {"max_wait_ms": 0}}).batching.enabled is False
    assert ServeSettings.from_config({"batching": {"max_batch": 1}}).batching.enabled is False
    assert ServeSettings.from_config({}).batching.enabled is True
    with pytest.raises(ConfigError, match="batching.max_wait_ms"):
        ServeSettings.from_config({"batching": {"max_wait_ms": -1}})
    with pytest.raises(ConfigError, match="batching.max_bach"):  # a misspelt key is refused, not ignored
        ServeSettings.from_config({"batching": {"max_bach": 4}})


# -- real servers (slow) ------------------------------------------------------------------------
N_REQUESTS = 16


@pytest.fixture(scope="module")
def pinned_version(registry_root) -> str:
    """The version both servers serve, pinned (other test modules promote new versions into this registry)."""
    return (registry_root / "latest").read_text().strip()


@pytest.fixture(scope="module")
def batched(tmp_path_factory, registry_root, pinned_version) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("batched"), registry_root,
                       [f"version={pinned_version}", "batching.max_wait_ms=50", "batching.max_batch=16"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def unbatched(tmp_path_factory, registry_root, pinned_version) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("unbatched"), registry_root, [f"version={pinned_version}", "batching.max_wait_ms=0"])
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def pictures(service_data) -> list[tuple[str, bytes]]:
    """Distinct pictures (no answer-cache hits), several per gallery character."""
    per = -(-N_REQUESTS // len(service_data.names))
    pics = [(f"{n}-{i}.png", p.read_bytes()) for n in service_data.names for i, p in enumerate(service_data.images(n)[:per])]
    return pics[:N_REQUESTS]


def _fire(url: str, uploads: Sequence[tuple[str, bytes]], data: Sequence[dict] | None = None) -> list[httpx.Response]:
    """Every upload in its own thread and connection, released together."""
    out: list[Any] = [None] * len(uploads)
    go = threading.Barrier(len(uploads))

    def one(i: int) -> None:
        name, body = uploads[i]
        with httpx.Client(base_url=url, timeout=300) as c:
            go.wait()
            out[i] = c.post("/api/classify", files={"file": (name, body)}, data=(data[i] if data else None))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(uploads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _recognizer_calls(answers: Sequence[dict]) -> float:
    """Recognizer calls behind these answers: an answer from a batch of k carries `timings_ms.batch_images` = k."""
    return sum(1.0 / a["timings_ms"].get("batch_images", 1.0) for a in answers)


def _same_answer(a: dict, b: dict) -> None:
    assert (a["filename"], a["role"], a["unknown"], a["image_sha256"]) == (b["filename"], b["role"], b["unknown"], b["image_sha256"])
    assert a["similarity"] == pytest.approx(b["similarity"], abs=2e-3)
    assert a["boxes"] == b["boxes"]
    assert [t["role"] for t in a["detections"][0]["topk"]] == [t["role"] for t in b["detections"][0]["topk"]]


@pytest.fixture(scope="module")
def reference(unbatched, pictures) -> dict[str, dict]:
    """Unbatched answers, fired concurrently at the max_wait_ms=0 server."""
    got = _fire(unbatched.url, pictures)
    assert [r.status_code for r in got] == [200] * len(pictures), [r.text[:200] for r in got if r.status_code != 200]
    return {r.json()["filename"]: r.json() for r in got}


@pytest.mark.slow
def test_zero_wait_never_batches(reference):
    """With `batching.max_wait_ms=0` every concurrent request is its own recognizer call."""
    assert len(reference) == N_REQUESTS
    assert all("batch_images" not in a["timings_ms"] for a in reference.values())


@pytest.mark.slow
def test_concurrent_requests_share_batches_with_the_unbatched_answers(batched, pictures, reference):
    got = _fire(batched.url, pictures)
    assert [r.status_code for r in got] == [200] * len(pictures), [r.text[:200] for r in got if r.status_code != 200]
    answers = [r.json() for r in got]
    calls = _recognizer_calls(answers)
    assert calls < len(pictures) - 1e-6, f"{len(pictures)} requests took {calls:g} recognizer calls: nothing was batched"
    assert max(a["timings_ms"].get("batch_images", 1) for a in answers) >= 2
    for (name, _), ans in zip(pictures, answers):  # each request got its own answer, the same as unbatched
        assert ans["filename"] == name
        _same_answer(ans, reference[name])
        assert ans["timings_ms"]["decode"] >= 0 and ans["timings_ms"]["total"] >= ans["timings_ms"]["decode"]


@pytest.mark.slow
def test_a_corrupt_image_gets_its_own_422_and_its_neighbours_their_answers(batched, service_data, reference, pictures):
    good = pictures[:6]
    corrupt = ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    uploads = [*good[:3], corrupt, *good[3:]]
    # the same pictures again would be answer-cache hits: add a fresh one that must really be recognised in a batch
    fresh = [(f"fresh-{i}.png", p.read_bytes()) for i, p in enumerate(service_data.images(service_data.names[0])[-3:])]
    got = _fire(batched.url, [*uploads, *fresh])
    codes = [r.status_code for r in got]
    assert codes == [200, 200, 200, 422, 200, 200, 200, 200, 200, 200], [r.text[:200] for r in got]
    assert "corrupt" in got[3].json()["error"]
    for (name, _), r in zip(uploads, got):
        if name != corrupt[0]:
            _same_answer(r.json(), reference[name])


@pytest.mark.slow
def test_an_error_inside_a_batch_is_reported_per_request(batched, unbatched, service_data):
    """mode=model on a gallery-only version fails inside `recognize_batch`: those requests get the error they get
    unbatched (each retried alone), the clip requests sent with them their answers."""
    pics = [(f"m{i}.png", p.read_bytes()) for i, p in enumerate(service_data.images(service_data.names[1])[:6])]
    modes = [{"mode": "model"} if i % 3 == 0 else {"mode": "clip"} for i in range(len(pics))]
    with unbatched.client() as c:
        alone = c.post("/api/classify", files={"file": pics[0]}, data={"mode": "model"})
    assert alone.status_code >= 400 and "classifier" in alone.json()["error"], alone.text
    got = _fire(batched.url, pics, modes)
    for m, r in zip(modes, got):
        if m["mode"] == "model":
            assert (r.status_code, r.json()["error"]) == (alone.status_code, alone.json()["error"]), r.text
        else:
            assert r.status_code == 200 and r.json()["mode"] == "clip", r.text


@pytest.mark.slow
def test_health_answers_while_batches_run(batched, service_data):
    import io

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    def unique(path, tag: str) -> bytes:  # same pixels, new bytes: no answer-cache hit from an earlier test
        info = PngInfo()
        info.add_text("request", tag)
        buf = io.BytesIO()
        Image.open(path).save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()

    pics = [(f"h{i}.png", unique(p, f"health-{i}"))
            for i, p in enumerate(p for n in service_data.names for p in service_data.images(n)[4:10])]
    result: list[list[httpx.Response]] = []
    load = threading.Thread(target=lambda: result.append(_fire(batched.url, pics)))
    load.start()
    slowest, busy = 0.0, 0
    with httpx.Client(base_url=batched.url, timeout=30) as c:
        while load.is_alive():
            t0 = time.perf_counter()
            assert c.get("/api/health").status_code == 200
            took = time.perf_counter() - t0
            if load.is_alive():
                busy += 1
                slowest = max(slowest, took)
            time.sleep(0.005)
    load.join()
    assert [r.status_code for r in result[0]] == [200] * len(pics)
    assert busy >= 3, "health was never asked while the batches ran"
    assert slowest < 2.0, f"health took {slowest:.2f}s while batches ran"
    assert _recognizer_calls([r.json() for r in result[0]]) < len(pics)


@pytest.mark.slow
def test_the_batcher_stops_with_the_server(batched):
    """SIGINT: the app's lifespan closes the batcher (its totals land in the system log) and the process exits cleanly."""
    batched.stop()
    assert batched.proc.returncode == 0, batched.log_tail()
    logs = "".join(p.read_text(errors="replace") for p in (Path(batched.workdir) / "logs").glob("system*.log"))
    assert "micro-batching: {'batches'" in logs
