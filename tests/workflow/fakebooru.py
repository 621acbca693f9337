"""A booru on 127.0.0.1 for tests: Danbooru ``/posts.json`` and Gelbooru ``/index.php`` APIs over synthetic images.

Serves `render_character` images with their tags, plus planted exact and near-duplicates, posts the
collector must skip (video, no file URL), and scripted faults per listing page or image
(``429``, ``500``, ``timeout``, ``malformed``, ``garbage``). It counts requests per image so tests
can prove a resumed run downloads nothing twice.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable
from urllib.parse import parse_qs, urlparse

from PIL import Image

from anime_role_detect.data.synthetic import CharacterSpec, image_tags, render_character
from anime_role_detect.workflow.collectors import booru_tag


@dataclass
class FakePost:
    """One post: id, the tag it is found under, its image bytes and general tags."""

    id: int
    search_tag: str
    character: str
    data: bytes
    ext: str
    tags: list[str]
    rating: str = "g"
    parent_id: int | None = None
    planted: str = ""  # "", "exact_of:<id>", "near_of:<id>"
    no_file: bool = False


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_posts(specs: Iterable[CharacterSpec], per_character: int, size: int = 96, seed: int = 0,
               near_duplicates: int = 2, exact_duplicates: int = 1) -> list[FakePost]:
    """Posts for each character: `per_character` distinct images, then planted near/exact copies and skippable posts."""
    rng = random.Random(seed)
    posts: list[FakePost] = []
    next_id = 1000
    for spec in specs:
        tag = booru_tag(spec.name, spec.series)
        mine: list[FakePost] = []
        for _ in range(per_character):
            img, _box = render_character(spec, rng, size)
            mine.append(FakePost(next_id, tag, spec.name, _encode(img, "PNG"), "png", image_tags(spec, rng)))
            next_id += 1
        for k in range(min(near_duplicates, len(mine))):  # resized + recompressed copy of an earlier post
            src = mine[k]
            img = Image.open(io.BytesIO(src.data)).convert("RGB")
            img = img.resize((int(size * 1.25), int(size * 1.25)), Image.BICUBIC)
            mine.append(FakePost(next_id, tag, spec.name, _encode(img, "JPEG", 85), "jpg", src.tags, planted=f"near_of:{src.id}"))
            next_id += 1
        for k in range(min(exact_duplicates, len(mine))):
            src = mine[-1 - k]
            mine.append(FakePost(next_id, tag, spec.name, src.data, src.ext, src.tags, planted=f"exact_of:{src.id}"))
            next_id += 1
        mine.append(FakePost(next_id, tag, spec.name, b"\x00\x00\x00\x18ftypmp42", "mp4", ["video"]))  # skipped: video
        next_id += 1
        mine.append(FakePost(next_id, tag, spec.name, b"", "png", ["deleted"], no_file=True))  # skipped: no file
        next_id += 1
        rng.shuffle(mine)
        posts.extend(mine)
    return posts


@dataclass
class FakeBooru:
    """The server; `faults[key]` is a queue of faults consumed one per request to `key`.

    Keys: ``"page:<search tag>:<0-based page>"`` for listings, ``"img:<post id>"`` for images.
    """

    posts: list[FakePost]
    faults: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    timeout_sleep_s: float = 1.5
    image_delay_s: float = 0.0
    image_requests: Counter = field(default_factory=Counter)
    page_requests: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.by_id = {p.id: p for p in self.posts}
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def add_faults(self, key: str, *faults: str) -> None:
        self.faults[key].extend(faults)

    def _next_fault(self, key: str) -> str | None:
        with self.lock:
            q = self.faults.get(key)
            return q.popleft() if q else None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> str:
        booru = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                booru._handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self.base_url

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()

    # -- serving ----------------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "application/json", headers: dict | None = None) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _apply_fault(self, h: BaseHTTPRequestHandler, key: str) -> bool:
        fault = self._next_fault(key)
        if fault is None:
            return False
        if fault == "429":
            self._send(h, 429, b'{"message": "rate limited"}', headers={"Retry-After": "0"})
        elif fault == "500":
            self._send(h, 500, b"internal error", "text/plain")
        elif fault == "timeout":
            time.sleep(self.timeout_sleep_s)
            self._send(h, 503, b"too late", "text/plain")
        elif fault == "malformed":
            self._send(h, 200, b'[{"id": 1, "file_url": "http://x/1.png", ')  # truncated JSON
        elif fault == "garbage":
            self._send(h, 200, b"<html>cloudflare says hi</html>", "text/html")
        else:
            raise ValueError(f"unknown fault {fault}")
        return True

    def _matching(self, tags: str) -> list[FakePost]:
        words = tags.split()
        return [p for p in self.posts if words and p.search_tag == words[0]]

    def _post_url(self, p: FakePost) -> str:
        return "" if p.no_file else f"{self.base_url}/data/{p.id}.{p.ext}"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/posts.json":  # Danbooru
            limit, page = int(q.get("limit", 20)), int(q.get("page", 1)) - 1
            key = f"page:{q.get('tags', '').split()[0] if q.get('tags') else ''}:{page}"
            with self.lock:
                self.page_requests[key] += 1
            if self._apply_fault(h, key):
                return
            chunk = self._matching(q.get("tags", ""))[page * limit:(page + 1) * limit]
            body = [{"id": p.id, "file_url": self._post_url(p) or None, "large_file_url": self._post_url(p) or None,
                     "file_ext": p.ext, "tag_string_general": " ".join(p.tags),
                     "tag_string_character": p.search_tag, "rating": p.rating, "parent_id": p.parent_id} for p in chunk]
            self._send(h, 200, json.dumps(body).encode())
        elif url.path == "/index.php":  # Gelbooru
            limit, page = int(q.get("limit", 100)), int(q.get("pid", 0))
            key = f"page:{q.get('tags', '').split()[0] if q.get('tags') else ''}:{page}"
            with self.lock:
                self.page_requests[key] += 1
            if self._apply_fault(h, key):
                return
            matching = self._matching(q.get("tags", ""))
            chunk = matching[page * limit:(page + 1) * limit]
            rating = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
            body: dict = {"@attributes": {"limit": limit, "offset": page * limit, "count": len(matching)}}
            if chunk:
                body["post"] = [{"id": p.id, "file_url": self._post_url(p), "tags": " ".join([p.search_tag, *p.tags]),
                                 "rating": rating[p.rating], "parent_id": p.parent_id or 0} for p in chunk]
            self._send(h, 200, json.dumps(body).encode())
        elif url.path.startswith("/data/"):
            pid = int(url.path.rsplit("/", 1)[-1].split(".")[0])
            key = f"img:{pid}"
            with self.lock:
                self.image_requests[pid] += 1
            if self._apply_fault(h, key):
                return
            if self.image_delay_s:
                time.sleep(self.image_delay_s)
            p = self.by_id.get(pid)
            if p is None:
                self._send(h, 404, b"not found", "text/plain")
            else:
                self._send(h, 200, p.data, "image/png" if p.ext == "png" else "image/jpeg")
        else:
            self._send(h, 404, b"not found", "text/plain")
