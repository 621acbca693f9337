"""The collector interface, a polite HTTP client, and the resumable download loop every booru shares.

A collector turns one `CharacterQuery` into image files ``OUT/<character>/<post>.<ext>`` plus a
per-character manifest (``OUT/.state/<character>.jsonl``, append-only, fsynced per line) that
records each image's tags and source. Images land by write-then-rename and are named by post id,
so a killed run never leaves a half image and a rerun never downloads an image twice.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Protocol

import requests

from ...errors import ConfigError
from ...fsutil import atomic_write_bytes, fingerprint, safe_name
from ...imageio import sniff
from ...log import get_logger
from ..progress import Progress
from .http import FetchError, HttpClient, HttpPolicy

__all__ = ["FetchError", "HttpClient", "HttpPolicy"]  # re-exported: collectors and tests name them from here

_log = get_logger("system")

STATE_DIR = ".state"
#: File extensions worth downloading (videos, zips and flash are skipped).
IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp"})


def booru_tag(name: str, series: str = "") -> str:
    """Danbooru-style character tag from name + series: ``Hoshino``, ``Blue Archive`` -> ``hoshino_(blue_archive)``."""

    def norm(s: str) -> str:
        return re.sub(r"\s+", "_", s.strip().lower())

    return f"{norm(name)}_({norm(series)})" if series.strip() else norm(name)


@dataclass(frozen=True)
class CharacterQuery:
    """One character to collect: display name, series, booru tag and optional local source."""

    name: str
    series: str = ""
    tag: str = ""  # booru tag; derived from name + series when empty
    path: str = ""  # local collector: folder or file list for this character
    limit: int | None = None  # per-character cap overriding the collector's

    @property
    def folder(self) -> str:
        return safe_name(self.name)

    @property
    def search_tag(self) -> str:
        return self.tag or booru_tag(self.name, self.series)

    @classmethod
    def from_config(cls, obj: Any) -> "CharacterQuery":
        """Accept ``{"name", "series", "tag", "path", "limit"}`` or a bare name string."""
        if isinstance(obj, str):
            return cls(name=obj)
        try:
            data = dict(obj)
        except (TypeError, ValueError):
            raise ConfigError(f"characters entry {obj!r}: expected {{name: ..., series: ...}}") from None
        unknown = set(data) - {"name", "series", "tag", "path", "limit"}
        if unknown or not data.get("name"):
            raise ConfigError(
                f"characters entry {data}: needs 'name' and may have series, tag, path, limit (unknown: {sorted(unknown)})"
            )
        limit = data.get("limit")
        return cls(name=str(data["name"]), series=str(data.get("series") or ""), tag=str(data.get("tag") or ""),
                   path=str(data.get("path") or ""), limit=int(limit) if limit is not None else None)


@dataclass
class CollectReport:
    """What collecting one character did (shown in the summary and kept in the run folder)."""

    character: str
    query: str
    images: int = 0  # images present after this run
    downloaded: int = 0
    reused: int = 0  # already on disk from an earlier (interrupted) run
    skipped_posts: int = 0  # no file URL, video, or wrong extension
    failed_downloads: int = 0
    malformed_pages: int = 0
    failed_pages: int = 0
    pages: int = 0
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class Collector(Protocol):
    """Fetches images of one character into ``out_dir/<character>/`` and records them in the manifest."""

    name: str

    def collect(self, query: CharacterQuery, out_dir: Path, progress: Progress | None = None) -> CollectReport: ...


# -- manifest ---------------------------------------------------------------------------------------


@dataclass
class ManifestEntry:
    """One collected image: where it is, what it shows, where it came from."""

    key: str  # post id / source path hash: the identity used to skip re-downloads
    file_name: str  # '<character>/<file>' relative to the raw folder
    tags: list[str]
    source: str
    group: str = ""  # booru parent/pool id, so related posts stay on one side of a split


class Manifest:
    """Append-only, crash-safe list of a character's collected images (a torn last line is ignored)."""

    def __init__(self, out_dir: Path, character_folder: str) -> None:
        self.path = Path(out_dir) / STATE_DIR / f"{character_folder}.jsonl"
        self.entries: dict[str, ManifestEntry] = {}
        self.complete: dict[str, Any] | None = None
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if "complete" in obj:
                    self.complete = obj
                elif "key" in obj:
                    self.entries[obj["key"]] = ManifestEntry(**obj)

    def _append(self, obj: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def add(self, entry: ManifestEntry) -> None:
        self.entries[entry.key] = entry
        self._append(asdict(entry))

    def mark_complete(self, fingerprint: str, report: CollectReport) -> None:
        self.complete = {"complete": fingerprint, "images": report.images}
        self._append(self.complete)

    def is_complete(self, fingerprint: str) -> bool:
        return bool(self.complete and self.complete.get("complete") == fingerprint)


def read_manifest(out_dir: Path, character_folder: str) -> list[ManifestEntry]:
    """Entries of a character whose file is on disk."""
    man = Manifest(out_dir, character_folder)
    return [e for e in man.entries.values() if (Path(out_dir) / e.file_name).is_file()]


# -- HTTP -------------------------------------------------------------------------------------------


@dataclass
class Post:
    """A booru post reduced to what the dataset needs."""

    id: str
    file_url: str
    ext: str
    tags: list[str]
    rating: str = ""
    group: str = ""  # parent id when the site gives one


class MalformedPage(Exception):
    """A listing page that is not the JSON the API documents."""


class BooruCollector:
    """Pages through a booru search and downloads each post's image once; subclasses parse one API."""

    name = "booru"
    default_file_field = "file_url"  # the post field holding the image URL (a site may serve a resized one)

    def __init__(
        self,
        base_url: str,
        limit_per_character: int = 200,
        page_size: int = 100,
        extra_tags: Iterable[str] = (),
        max_pages: int = 50,
        max_consecutive_bad_pages: int = 3,
        http: HttpPolicy | Mapping[str, Any] | None = None,
        api_key: str | None = None,
        login: str | None = None,
        ratings: Iterable[str] = (),
        file_field: str | None = None,
    ) -> None:
        if not base_url:
            raise ConfigError(f"collector.base_url is empty; set it to the {self.name} site, e.g. collector.base_url=https://...")
        if limit_per_character <= 0 or page_size <= 0:
            raise ConfigError("collector.limit_per_character and collector.page_size must be positive")
        self.base_url = base_url.rstrip("/")
        self.limit = int(limit_per_character)
        self.page_size = int(page_size)
        self.extra_tags = [str(t) for t in extra_tags]
        self.max_pages = int(max_pages)
        self.max_bad = int(max_consecutive_bad_pages)
        self.http = HttpClient(http if isinstance(http, HttpPolicy) else HttpPolicy(**dict(http or {})))
        self.api_key = api_key or None
        self.login = login or None
        self.ratings = frozenset(str(r)[:1].lower() for r in ratings)  # filtered here: tag-limited APIs stay within limits
        self.file_field = file_field or self.default_file_field

    # subclasses: the API
    def page_request(self, tags: str, page: int) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def parse_page(self, resp: requests.Response, search_tags: frozenset[str]) -> list[Post]:
        """Posts of one listing page; raises `MalformedPage` when the answer is not the documented JSON."""
        raise NotImplementedError

    @staticmethod
    def page_json(resp: requests.Response) -> Any:
        """The page's JSON, or `MalformedPage`."""
        try:
            return resp.json()
        except ValueError as exc:
            raise MalformedPage(f"not JSON: {exc}") from None

    def post_objects(self, data: Any) -> Iterator[tuple[dict, str]]:
        """Each post object of a page with its image URL (`file_field`, else ``file_url``); `MalformedPage` on a bad list."""
        if not isinstance(data, list):
            raise MalformedPage(f"expected a list of posts, got {type(data).__name__}")
        for obj in data:
            if not isinstance(obj, dict) or "id" not in obj:
                raise MalformedPage("a post without an id")
            yield obj, str(obj.get(self.file_field) or obj.get("file_url") or "")

    def query_string(self, query: CharacterQuery) -> str:
        return " ".join([query.search_tag, *self.extra_tags])

    def _posts(self, query: CharacterQuery, report: CollectReport) -> Iterator[Post]:
        tags = self.query_string(query)
        bad_in_row = 0
        for page in range(self.max_pages):
            url, params = self.page_request(tags, page)
            report.pages += 1
            try:
                posts = self.parse_page(self.http.get(url, params), frozenset(tags.split()))
            except FetchError as exc:
                report.failed_pages += 1
                report.problems.append(f"page {page}: {exc}")
                _log.warning(f"{query.name}: page {page} skipped ({exc})")
                posts = None
            except MalformedPage as exc:
                report.malformed_pages += 1
                report.problems.append(f"page {page}: malformed answer ({exc})")
                _log.warning(f"{query.name}: page {page} skipped, malformed answer ({exc})")
                posts = None
            if posts is None:
                bad_in_row += 1
                if bad_in_row >= self.max_bad:
                    report.problems.append(f"stopped after {bad_in_row} bad pages in a row")
                    return
                continue
            bad_in_row = 0
            yield from posts
            if len(posts) < self.page_size:
                return

    def collect(self, query: CharacterQuery, out_dir: Path, progress: Progress | None = None) -> CollectReport:
        """Download up to the cap of `query`'s images into ``out_dir/<character>/``, skipping those on disk."""
        out_dir = Path(out_dir)
        cap = query.limit or self.limit
        report = CollectReport(character=query.name, query=self.query_string(query))
        man = Manifest(out_dir, query.folder)
        fp = fingerprint({"site": self.base_url, "q": report.query, "cap": cap, "ratings": sorted(self.ratings)})
        have = [e for e in man.entries.values() if (out_dir / e.file_name).is_file()]
        if man.is_complete(fp):
            report.images = report.reused = len(have)
            return report
        count = len(have)
        report.reused = count
        stage = f"collect:{query.name}"
        if progress:
            progress.emit(stage, min(count, cap), cap, f"searching {report.query!r}")
        for post in self._posts(query, report):
            if count >= cap:
                break
            if post.ext.lower() not in IMAGE_EXTS or not post.file_url or (self.ratings and post.rating[:1] not in self.ratings):
                report.skipped_posts += 1
                continue
            key = f"{self.name}:{post.id}"
            rel = f"{query.folder}/{post.id}.{post.ext.lower()}"
            if key in man.entries and (out_dir / man.entries[key].file_name).is_file():
                continue  # counted in `have`
            target = out_dir / rel
            if not target.is_file():  # a file renamed into place just before a kill is adopted, not refetched
                try:
                    data = self.http.get_bytes(post.file_url)
                except (FetchError, requests.RequestException) as exc:
                    report.failed_downloads += 1
                    report.problems.append(f"post {post.id}: {exc}")
                    continue
                kind = sniff(data)
                if kind is None or kind[0] != "image":
                    report.failed_downloads += 1
                    report.problems.append(f"post {post.id}: not an image ({len(data)} bytes from {post.file_url})")
                    continue
                atomic_write_bytes(target, data)
                report.downloaded += 1
            else:
                report.reused += 1
            man.add(ManifestEntry(key=key, file_name=rel, tags=post.tags, source=post.file_url,
                                  group=f"{self.name}:{post.group}" if post.group else ""))
            count += 1
            if progress:
                progress.emit(stage, min(count, cap), cap)
        report.images = count
        if report.failed_pages == 0 and report.malformed_pages == 0:
            man.mark_complete(fp, report)
        if progress:
            progress.emit(stage, cap, cap, f"{count} images ({report.downloaded} new)")
        return report
