"""Safety limits and access control on a server started with a token, tight limits and one CORS origin."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from .conftest import png_bytes, start_server

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
ALLOWED_ORIGIN = "http://allowed.example"


@pytest.fixture(scope="module")
def strict(tmp_path_factory, registry_root):
    srv = start_server(
        tmp_path_factory.mktemp("strict"), registry_root,
        [f"auth.token={TOKEN}", "limits.max_upload_mb=0.05", "limits.max_video_mb=0.1", "limits.max_files=3",
         "limits.max_pixels=1000000", f"cors.allow_origins=[{ALLOWED_ORIGIN}]", "persist_gallery_edits=false",
         "workflow.max_queued=0"],
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def sc(strict):
    with strict.client() as c:
        yield c


def _auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("method, path, kwargs", [
    ("POST", "/api/feedback", {"json": {"image_sha256": "0" * 64, "confirmed": True}}),
    ("DELETE", "/api/characters/nobody", {}),
    # a body the endpoint itself refuses (422) once past the guard: a valid one would start a real workflow, whose
    # default collector is Danbooru on the internet (tests never touch the network)
    ("POST", "/api/workflow", {"json": {"characters": [{"name": "a; rm -rf /"}]}}),
    ("POST", "/api/workflow/0123456789ab/cancel", {}),
])
def test_mutating_endpoints_need_the_bearer_token(sc, method, path, kwargs):
    r = sc.request(method, path, **kwargs)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["error"]
    r = sc.request(method, path, headers=_auth("wrong"), **kwargs)
    assert r.status_code == 403 and "wrong" in r.json()["error"]
    r = sc.request(method, path, headers=_auth(), **kwargs)
    assert r.status_code not in (401, 403), r.text  # past the guard: the endpoint's own answer


def test_reading_endpoints_stay_open(sc, service_data):
    assert sc.get("/api/characters").status_code == 200
    img = service_data.images(service_data.names[0])[0].read_bytes()
    assert sc.post("/api/classify", files={"file": ("a.png", img)}).status_code == 200


def test_upload_over_the_size_limit_is_413(sc):
    noise = Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3))  # ~120 KB as PNG, limit is 50 KB
    r = sc.post("/api/classify", files={"file": ("big.png", png_bytes(noise))})
    assert r.status_code == 413
    assert "limit" in r.json()["error"] and r.json()["detail"]["limit_bytes"] == int(0.05 * 2**20)


def test_decompression_bomb_is_refused_before_decoding(sc):
    bomb = Image.new("RGB", (2000, 2000), (255, 255, 255))  # 4 MP, a few KB compressed; limit is 1 MP
    data = png_bytes(bomb)
    assert len(data) < 0.05 * 2**20
    r = sc.post("/api/classify", files={"file": ("bomb.png", data)})
    assert r.status_code == 413 and "decompression-bomb" in r.json()["error"]


@pytest.mark.parametrize("bomb", ["over-server-limit", "over-pil-limit"])
def test_too_many_pixels_is_413_on_every_upload_path(sc, bomb):
    """One decode path, one 413: a single upload, a batch item and an enrolment refuse the same picture alike,
    including one so large that PIL itself refuses to open it (that was a 422 'corrupt' before)."""
    from .test_options import png_header_only

    data = png_bytes(Image.new("RGB", (2000, 2000), (255, 255, 255))) if bomb == "over-server-limit" else png_header_only(20000, 20000)
    want = {"filename": "bomb.png", "limit_pixels": 1000000}
    r = sc.post("/api/classify", files={"file": ("bomb.png", data)})
    assert r.status_code == 413 and "decompression-bomb" in r.json()["error"] and r.json()["detail"] == want, r.text
    r = sc.post("/api/classify/batch", files=[("files", ("bomb.png", data))])
    assert r.status_code == 200 and r.json()["results"][0]["status"] == 413, r.text
    assert "decompression-bomb" in r.json()["results"][0]["error"]
    r = sc.post("/api/characters", headers=_auth(), data={"name": "bomb_girl"}, files=[("files", ("bomb.png", data))])
    assert r.status_code == 413 and r.json()["detail"] == want, r.text


def test_request_body_over_the_total_limit_is_413_json(sc):
    r = sc.post("/api/classify", files={"file": ("huge.bin", b"\xff\xd8\xff" + b"\x00" * (3 * 2**20))})
    assert r.status_code == 413
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"]


def test_too_many_files_is_refused(sc, service_data):
    img = service_data.images(service_data.names[0])[0].read_bytes()
    r = sc.post("/api/classify/batch", files=[("files", (f"{i}.png", img)) for i in range(4)])
    assert 400 <= r.status_code < 500 and "files" in r.json()["error"].lower()
    r = sc.post("/api/classify/batch", files=[("files", (f"{i}.png", img)) for i in range(3)])
    assert r.status_code == 200 and r.json()["ok"] == 3


def test_video_over_the_video_limit_is_413(sc):
    fake_mp4 = b"\x00\x00\x00\x18ftypmp42" + b"\x00" * int(0.2 * 2**20)
    r = sc.post("/api/classify", files={"file": ("clip.mp4", fake_mp4)})
    assert r.status_code == 413


def test_cors_allows_only_the_configured_origin(sc):
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    ok = sc.options("/api/classify", headers={"Origin": ALLOWED_ORIGIN, **pre})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    bad = sc.options("/api/classify", headers={"Origin": "http://evil.example", **pre})
    assert "access-control-allow-origin" not in bad.headers
    simple = sc.get("/api/health", headers={"Origin": ALLOWED_ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_no_server_paths_accepted_from_clients(sc):
    """The seed's 'test image path' field is gone: a path in a form field is not read from disk."""
    r = sc.post("/api/classify", data={"file": "/etc/passwd"})
    assert r.status_code == 422
    assert "root:" not in r.text


def test_workflow_parameters_outside_the_whitelist_are_refused(sc):
    r = sc.post("/api/workflow", headers=_auth(), json={"characters": [{"name": "a"}], "params": {"registry_dir": "/tmp/x"}})
    assert r.status_code == 422 and "registry_dir" in r.text
    r = sc.post("/api/workflow", headers=_auth(), json={"characters": [{"name": "a; rm -rf /"}]})
    assert r.status_code == 422


def test_a_full_workflow_queue_answers_429_and_starts_nothing(sc):
    r = sc.post("/api/workflow", headers=_auth(), json={"characters": [{"name": "aoba", "series": "new game"}]})
    assert r.status_code == 429 and "max_queued" in r.json()["error"], r.text
    assert r.headers["retry-after"] == "60" and r.json()["detail"] == {"max_queued": 0}
    assert sc.get("/api/workflow").json()["jobs"] == []


def test_timeout_is_a_json_503(tmp_path, registry_root, service_data):
    """A request whose model work exceeds request_timeout_s gets a 503 JSON answer, and the server keeps serving."""
    srv = start_server(tmp_path / "slow", registry_root, ["limits.request_timeout_s=0.001"])
    try:
        with srv.client() as c:
            img = service_data.images(service_data.names[0])[0].read_bytes()
            r = c.post("/api/classify", files={"file": ("a.png", img)})
            assert r.status_code == 503 and "took longer" in r.json()["error"]
            assert c.get("/api/health").status_code == 200
    finally:
        srv.stop()

