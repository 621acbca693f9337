"""Collectors against a fake booru on 127.0.0.1: faults are retried or skipped and reported; nothing is fetched twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST_HTTP

from anime_role_detect.errors import ConfigError
from anime_role_detect.imageio import load_image
from anime_role_detect.workflow.collectors import (
    CharacterQuery, DanbooruCollector, GelbooruCollector, HttpClient, HttpPolicy, LocalCollector, booru_tag,
    build_collector, read_manifest,
)
from anime_role_detect.workflow.collectors.base import FetchError
from anime_role_detect.workflow.progress import Progress


def _query(spec) -> CharacterQuery:
    return CharacterQuery(name=spec.name, series=spec.series)


def test_booru_tag_from_name_and_series():
    assert booru_tag("Hoshino", "Blue Archive") == "hoshino_(blue_archive)"
    assert CharacterQuery(name="Rem", tag="rem_(re:zero)").search_tag == "rem_(re:zero)"
    with pytest.raises(ConfigError, match="needs 'name'"):
        CharacterQuery.from_config({"series": "x"})


def test_danbooru_retries_429_500_timeout_skips_malformed_and_resumes_without_refetching(booru, specs, tmp_path):
    spec = specs[0]
    tag = booru_tag(spec.name, spec.series)
    booru.add_faults(f"page:{tag}:0", "429", "500")  # retried, then fine
    booru.add_faults(f"page:{tag}:1", "malformed")  # skipped and reported
    booru.add_faults(f"page:{tag}:2", "timeout")  # retried
    mine = [p for p in booru.posts if p.search_tag == tag]
    downloadable = [p for p in mine if p.ext in ("png", "jpg") and not p.no_file]
    first_page = mine[:5]
    broken = next(p for p in first_page if p.ext == "png" and not p.no_file)
    booru.add_faults(f"img:{broken.id}", *["500"] * 4)  # fails all attempts: reported, not fatal
    col = DanbooruCollector(base_url=booru.base_url, page_size=5, limit_per_character=100, extra_tags=["solo"], http=FAST_HTTP)
    events = []
    progress = Progress(log=False)
    progress.subscribe(events.append)

    report = col.collect(_query(spec), tmp_path, progress)

    on_page_1 = {p.id for p in mine[5:10]}
    expected = {p.id for p in downloadable if p.id not in on_page_1 and p.id != broken.id}
    got = {int(Path(e.file_name).stem) for e in read_manifest(tmp_path, spec.name)}
    assert got == expected
    assert report.malformed_pages == 1 and report.failed_downloads == 1
    assert any("malformed" in s for s in report.problems) and any(str(broken.id) in s for s in report.problems)
    assert report.skipped_posts == 2  # the video and the post without a file
    for e in read_manifest(tmp_path, spec.name):  # real images, tagged with the post's general tags
        post = booru.by_id[int(Path(e.file_name).stem)]
        assert load_image(tmp_path / e.file_name).size[0] >= 96
        assert e.tags == post.tags and e.source.endswith(f"/data/{post.id}.{post.ext}")
    assert events and events[-1].done == events[-1].total and events[-1].stage == f"collect:{spec.name}"

    # Rerun: the malformed page now answers, so only its images (and the broken one) are fetched.
    before = dict(booru.image_requests)
    report2 = col.collect(_query(spec), tmp_path, progress)
    fetched = {pid for pid, n in booru.image_requests.items() if n > before.get(pid, 0)}
    assert fetched == on_page_1 & {p.id for p in downloadable} | {broken.id}
    assert report2.reused == len(expected) and report2.images == len(downloadable)
    # Third run: the manifest says complete, so not even the listing is requested again.
    pages_before = sum(booru.page_requests.values())
    report3 = col.collect(_query(spec), tmp_path, progress)
    assert sum(booru.page_requests.values()) == pages_before and report3.images == len(downloadable)


def test_danbooru_cap_and_rating_filter(booru, specs, tmp_path):
    spec = specs[1]
    for p in booru.posts:
        if p.search_tag == booru_tag(spec.name, spec.series) and p.id % 2:
            p.rating = "e"
    col = DanbooruCollector(base_url=booru.base_url, page_size=4, limit_per_character=5, ratings=["g", "s"], http=FAST_HTTP)
    report = col.collect(_query(spec), tmp_path)
    ids = [int(Path(e.file_name).stem) for e in read_manifest(tmp_path, spec.name)]
    assert len(ids) == 5 == report.images
    assert all(booru.by_id[i].rating == "g" for i in ids)


def test_gelbooru_api_collects_and_drops_search_tags(booru, specs, tmp_path):
    spec = specs[2]
    tag = booru_tag(spec.name, spec.series)
    booru.add_faults(f"page:{tag}:0", "garbage")  # HTML instead of JSON: skipped and reported
    col = build_collector({"name": "gelbooru", "base_url": booru.base_url, "page_size": 100, "http": FAST_HTTP})
    assert isinstance(col, GelbooruCollector)
    r1 = col.collect(_query(spec), tmp_path)
    assert r1.malformed_pages == 1 and r1.images == 0
    r2 = col.collect(_query(spec), tmp_path)
    entries = read_manifest(tmp_path, spec.name)
    assert r2.images == len(entries) == sum(1 for p in booru.posts if p.search_tag == tag and p.ext != "mp4" and not p.no_file)
    assert all(tag not in e.tags and "solo" in e.tags for e in entries)


def test_http_client_access_denied_is_a_config_error_and_404_is_not_retried(booru):
    client = HttpClient(HttpPolicy(**FAST_HTTP))
    with pytest.raises(FetchError, match="HTTP 404"):
        client.get(f"{booru.base_url}/nope")
    assert client.requests == 1
    booru.add_faults("page:x:0", "429", "429", "429", "429", "429")
    with pytest.raises(FetchError, match="429 after 4 attempts"):
        client.get(f"{booru.base_url}/posts.json", {"tags": "x", "page": 1})


def test_unknown_collector_is_a_config_error():
    with pytest.raises(ConfigError, match="collector='flickr' is unknown"):
        build_collector({"name": "flickr"})
    with pytest.raises(ConfigError, match="base_url is empty"):
        build_collector({"name": "danbooru", "base_url": ""})


def test_local_collector_folder_and_file_list_with_sidecar_tags(synthetic_root, tmp_path):
    char = sorted(p.name for p in synthetic_root.iterdir() if p.is_dir())[0]
    files = sorted((synthetic_root / char).glob("*.png"))[:6]
    (files[0].with_suffix(".txt")).write_text("long_hair, blue eyes\n")
    col = LocalCollector(root=str(synthetic_root))
    r = col.collect(CharacterQuery(name=char, limit=6), tmp_path / "raw")
    entries = {Path(e.source).name: e for e in read_manifest(tmp_path / "raw", char)}
    assert r.images == 6 and r.downloaded == 6
    assert entries[files[0].name].tags == ["long_hair", "blue_eyes"]  # sidecar wins
    meta = {json.loads(l)["file_name"]: json.loads(l)["tags"] for l in (synthetic_root / "metadata.jsonl").read_text().splitlines()}
    assert entries[files[1].name].tags == meta[f"{char}/{files[1].name}"]  # from metadata.jsonl
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(str(p) for p in files[:3]) + "\n")
    r2 = col.collect(CharacterQuery(name="other", path=str(listing)), tmp_path / "raw")
    assert r2.images == 3
    with pytest.raises(ConfigError, match="neither a folder nor a .txt"):
        col.collect(CharacterQuery(name="x", path=str(tmp_path / "missing")), tmp_path / "raw")


def test_oversized_downloads_are_refused_and_reported(booru, specs, tmp_path):
    col = DanbooruCollector(base_url=booru.base_url, page_size=50, http={**FAST_HTTP, "max_image_bytes": 2000})
    report = col.collect(_query(specs[0]), tmp_path)
    assert report.images == 0 and report.failed_downloads > 0
    assert all("limit" in p for p in report.problems)
    assert not list(tmp_path.glob(f"{specs[0].name}/*"))  # nothing half-written left behind
