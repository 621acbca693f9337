"""The REST API over real HTTP against `python -m anime_role_detect.serve` (uvicorn on 127.0.0.1):
classify, batch, enrol-then-recognise, feedback, health/version, errors as JSON."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from anime_role_detect.fusion.featurelog import FeatureLog


pytestmark = pytest.mark.slow


def _jpeg(path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_health_and_version_report_the_live_registry_version(client, registry_root):
    health = client.get("/api/health").json()
    latest = (registry_root / "latest").read_text().strip()
    assert health["ready"] is True and health["status"] == "ok"
    assert health["version"] == latest
    version = client.get("/api/version").json()
    assert version["follows"] == "latest"
    assert version["registry_latest"] == latest
    assert version["load_s"] > 0


def test_version_reports_the_recognizer_facts(client, registry_root):
    """`/api/version` carries `Recognizer.describe()` of the live version: a gallery-only version serves clip only."""
    import json
    from pathlib import Path

    info = client.get("/api/version").json()
    facts = info["recognizer"]
    assert facts is not None, "no recognizer facts on /api/version"
    vdir = Path(facts["version_dir"])
    assert facts["version"] == info["version"] == vdir.name and vdir.parent.resolve() == (registry_root / "versions").resolve()
    assert facts["mode"] == "clip" and facts["modes"] == ["clip"] and facts["classifier"] is False
    assert facts["rerank"] is True  # conf/serve.yaml's default
    assert facts["embedder"] == json.loads((vdir / "gallery.json").read_text())["embedder"]["id"]
    chars = client.get("/api/characters").json()
    assert facts["characters"] == chars["count"] > 0
    assert facts["gallery_rows"] == sum(c["prototypes"] for c in chars["characters"]) > 0
    assert facts["calibration"] and 0 < facts["calibration"]["target_far"] < 1 and "clip" in facts["calibration"]["thresholds"]
    from anime_role_detect.recognition.device import resolve_device

    assert resolve_device(facts["device"]) == "cpu"  # the setting (auto) or the device it resolved to; no GPU here


def test_classify_answers_the_seed_contract_for_a_gallery_image(client, service_data):
    name = service_data.names[2]
    path = service_data.images(name)[0]
    r = client.post("/api/classify", files={"file": ("photo.png", path.read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    ans = r.json()
    assert {"filename", "role", "similarity", "boxes"} <= ans.keys()  # the seed's README contract
    assert ans["filename"] == "photo.png"
    assert ans["role"] == name
    assert ans["similarity"] > 0.5 and ans["similarity"] >= ans["detections"][0]["topk"][-1]["score"]
    assert ans["boxes"] and len(ans["boxes"][0]) == 4
    assert ans["detections"][0]["topk"][0]["role"] == name
    assert len(ans["image_sha256"]) == 64 and ans["mode"] == "clip"


def test_a_big_jpeg_is_answered_in_its_own_pixels(client, service_data):
    """A 2400 x 2400 JPEG decodes drafted (conf/serve.yaml limits.draft_side: half scale here), names whom the same
    picture as a PNG (every pixel decoded) names at nearly its score, and speaks in the upload's pixels."""
    name = service_data.names[1]
    big = Image.open(service_data.images(name)[0]).convert("RGB").resize((2400, 2400), Image.BICUBIC)
    got = {}
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        big.save(buf, format=fmt, quality=92)
        r = client.post("/api/classify", files={"file": (f"big.{fmt.lower()}", buf.getvalue())})
        assert r.status_code == 200, r.text
        got[fmt] = r.json()
    assert got["JPEG"]["role"] == got["PNG"]["role"] == name
    assert abs(got["JPEG"]["similarity"] - got["PNG"]["similarity"]) < 0.01
    assert (got["JPEG"]["width"], got["JPEG"]["height"]) == (2400, 2400) and got["JPEG"]["boxes"] == [[0.0, 0.0, 2400.0, 2400.0]]


def test_type_comes_from_content_not_the_name(client, service_data):
    path = service_data.images(service_data.names[0])[0]
    # a JPEG named .txt is still an image
    r = client.post("/api/classify", files={"file": ("notes.txt", _jpeg(path), "text/plain")})
    assert r.status_code == 200, r.text
    assert r.json()["role"] == service_data.names[0]
    # text named .png is refused with 415 and a JSON message
    r = client.post("/api/classify", files={"file": ("cat.png", b"hello, I am not a picture" * 10, "image/png")})
    assert r.status_code == 415
    body = r.json()
    assert "not an image or video" in body["error"] and body["detail"]["filename"] == "cat.png"


@pytest.mark.parametrize(
    "payload, status, needle",
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, 422, "corrupt"),  # PNG magic, garbage body
        (b"", 422, "empty"),
    ],
)
def test_bad_images_are_4xx_json_errors(client, payload, status, needle):
    r = client.post("/api/classify", files={"file": ("bad.png", payload, "image/png")})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_seed_flag_use_model_switches_mode_and_explains_what_is_missing(client, service_data):
    """The served version has a gallery but no classifier: use_model=true must say so (400), not fall back silently."""
    path = service_data.images(service_data.names[0])[0]
    r = client.post("/api/classify", files={"file": ("a.png", path.read_bytes())}, data={"use_model": "true"})
    assert r.status_code == 400
    assert "classifier" in r.json()["error"]
    r = client.post("/api/classify", files={"file": ("a.png", path.read_bytes())}, data={"mode": "clip", "use_model": "true"})
    assert r.status_code == 200 and r.json()["mode"] == "clip"  # an explicit mode wins over the seed flag


def test_missing_file_field_is_422_naming_the_field(client):
    r = client.post("/api/classify", data={"mode": "clip"})
    assert r.status_code == 422
    assert "file" in r.json()["error"]


def test_batch_answers_in_order_and_isolates_bad_files(client, service_data):
    names = service_data.names[:3]
    files = [("files", (f"{n}.png", service_data.images(n)[1].read_bytes(), "image/png")) for n in names]
    files.insert(1, ("files", ("broken.jpg", b"\xff\xd8\xff" + b"\x00" * 40, "image/jpeg")))
    r = client.post("/api/classify/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["filename"] for x in body["results"]] == [f"{names[0]}.png", "broken.jpg", f"{names[1]}.png", f"{names[2]}.png"]
    assert body["ok"] == 3 and body["failed"] == 1
    assert body["results"][1]["status"] == 422 and body["results"][1]["answer"] is None
    assert [x["answer"]["role"] for x in body["results"] if x["answer"]] == names


def test_enroll_then_recognise_without_retraining(client, service_data, registry_root):
    new = service_data.enroll_name
    imgs = service_data.images(new)
    probe = imgs[-1].read_bytes()
    before = client.post("/api/classify", files={"file": ("probe.png", probe)}).json()
    assert before["role"] != new
    assert new not in [c["name"] for c in client.get("/api/characters").json()["characters"]]
    old_version = client.get("/api/version").json()["version"]

    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in imgs]
    r = client.post("/api/characters", data={"name": new, "series": "series_new"}, files=files)
    assert r.status_code == 201, r.text
    assert r.json()["added"] >= 1 and r.json()["images"] == len(imgs)
    assert r.json()["held_out"] == len(imgs) // 5  # one shot in five evaluates the new character

    chars = {c["name"]: c for c in client.get("/api/characters").json()["characters"]}
    assert chars[new]["series"] == "series_new"
    after = client.post("/api/classify", files={"file": ("probe.png", probe)}).json()
    assert after["role"] == new and after["similarity"] > 0.5
    # the edit is a new registry version with the served one as parent, and the server serves it
    version = client.get("/api/version").json()
    assert version["version"] != old_version
    assert (registry_root / "latest").read_text().strip() == version["version"]
    assert (registry_root / "versions" / version["version"] / "parent").read_text().strip() == old_version
    assert after["version"] == version["version"]
    if len(imgs) >= 5:
        from anime_role_detect.recognition.evalset import EvalSet

        evalset = EvalSet.load(registry_root / "versions" / version["version"])
        assert evalset is not None and evalset.labels.count(new) == len(imgs) // 5 and "enrol" in evalset.sources

    r = client.delete(f"/api/characters/{new}")
    assert r.status_code == 200 and r.json()["removed"] >= 1
    assert client.post("/api/classify", files={"file": ("probe.png", probe)}).json()["role"] != new
    r = client.delete(f"/api/characters/{new}")
    assert r.status_code == 404 and "not in the gallery" in r.json()["error"]


def test_enroll_refuses_bad_names_and_non_images(client, service_data):
    img = service_data.images(service_data.names[0])[0].read_bytes()
    r = client.post("/api/characters", data={"name": "../../etc/passwd"}, files=[("files", ("a.png", img))])
    assert r.status_code == 422 and "name" in r.json()["error"]
    r = client.post("/api/characters", data={"name": "okay_name"}, files=[("files", ("a.png", b"plain text, not an image"))])
    assert r.status_code == 415


def test_feedback_joins_the_feature_log(client, server, service_data):
    path = service_data.images(service_data.names[1])[2]
    ans = client.post("/api/classify", files={"file": ("fb.png", path.read_bytes())}).json()
    r = client.post("/api/feedback", json={"image_sha256": ans["image_sha256"], "confirmed": True})
    assert r.status_code == 200, r.text
    r = client.post("/api/feedback", json={"image_sha256": ans["image_sha256"], "correct_role": "someone_else"})
    assert r.status_code == 200 and r.json()["correct_role"] == "someone_else"
    # what log fusion will read: the logged answer with its embedding, and both verdicts joined
    log = FeatureLog(server.workdir / "featurelog")
    recs = [rec for rec in log.read() if rec.image_sha256 == ans["image_sha256"]]
    assert recs, "the answer was not logged"
    rec = recs[-1]
    assert rec.embeddings.shape[0] == len(ans["detections"]) and rec.embeddings.shape[1] > 0
    assert ans["record_id"] == rec.id  # the answer names its record, what feedback should send
    r = client.post("/api/feedback", json={"record_id": ans["record_id"], "confirmed": True})
    assert r.status_code == 200, r.text
    latest = list(rec.feedback.values())
    assert len(latest) == 1 and latest[0].role == "someone_else" and not latest[0].confirmed
    events = [e for e in log.read_feedback() if e.get("image_sha256") == ans["image_sha256"]]
    assert [e["confirmed"] for e in events] == [True, False]


def test_feedback_for_an_unknown_answer_is_404_and_bad_bodies_422(client):
    r = client.post("/api/feedback", json={"image_sha256": "0" * 64, "confirmed": True})
    assert r.status_code == 404 and "no logged classification" in r.json()["error"]
    r = client.post("/api/feedback", json={"image_sha256": "0" * 64})
    assert r.status_code == 422 and "confirmed" in r.json()["error"]
    r = client.post("/api/feedback", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]


def test_unknown_paths_and_methods_are_json(client):
    r = client.get("/api/nothing-here")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/json") and r.json()["error"]
    r = client.put("/api/classify")
    assert r.status_code == 405 and r.json()["error"]


def test_hot_reload_follows_the_registry_without_failing_requests(client, server, registry_root, service_data):
    """Promote another version while requests run: every request answers 200 and the server switches over."""
    from anime_role_detect.registry import Registry

    reg = Registry(registry_root)
    before = client.get("/api/version").json()["version"]
    # a new version with the same files (as a re-run or a rollback target would have), registered, then promoted
    new_vid = reg.import_folder(reg.path(before), parent=before, kind="test", promote=False)
    png = service_data.images(service_data.names[0])[3].read_bytes()
    reg.promote(new_vid)
    statuses, versions = [], set()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        r = client.post("/api/classify", files={"file": ("x.png", png)})
        statuses.append(r.status_code)
        versions.add(r.json().get("version"))
        if client.get("/api/version").json()["version"] == new_vid and len(statuses) >= 3:
            break
    assert set(statuses) == {200}
    assert client.get("/api/version").json()["version"] == new_vid
    r = client.post("/api/classify", files={"file": ("x.png", png)})
    assert r.json()["version"] == new_vid and r.json()["role"] == service_data.names[0]
    # roll back: the server follows again
    reg.promote(before)
    deadline = time.monotonic() + 90
    while client.get("/api/version").json()["version"] != before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.get("/api/version").json()["version"] == before
    assert versions <= {before, new_vid}  # every answer came from one whole version, old or new


def test_video_upload_answers_appearances(client, service_data):
    """A video (detected from its bytes) gets per-character appearance spans and per-frame answers."""
    from .conftest import mp4_bytes

    a, b = service_data.names[0], service_data.names[3]
    frames = [Image.open(p) for p in service_data.images(a)[:4]] * 2 + [Image.open(p) for p in service_data.images(b)[:4]]
    data = mp4_bytes(frames, fps=4)  # 3 s: 2 s of `a`, then 1 s of `b`
    r = client.post("/api/classify", files={"file": ("clip.bin", data)}, data={"sample_fps": "4"})
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["filename"] == "clip.bin" and ans["role"] == a
    roles = {x["role"] for x in ans["appearances"]}
    assert {a, b} <= roles
    first_a = min(x["start_s"] for x in ans["appearances"] if x["role"] == a)
    first_b = min(x["start_s"] for x in ans["appearances"] if x["role"] == b)
    assert first_a < first_b
    assert len(ans["frames"]) >= 10 and all(f["filename"].startswith("clip.bin@") for f in ans["frames"])


def _count_in_inference_log(server, needle: str) -> int:
    return sum(p.read_text(errors="replace").count(needle) for p in (server.workdir / "logs").glob("inference*.log"))


def _wait_for_more(server, needle: str, before: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while (now := _count_in_inference_log(server, needle)) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    return now


def test_video_upload_honours_the_seed_flags_mode_and_rerank(client, server, service_data):
    """A video is recognised with the same flags as an image: the seed flags pick the mode (this version has no
    classifier, so model/fusion are refused as for images), an explicit mode wins, and rerank reaches the frames."""
    from .conftest import mp4_bytes

    a = service_data.names[0]
    data = mp4_bytes([Image.open(p) for p in service_data.images(a)[:4]], fps=4)
    for flags in ({"use_model": "true"}, {"use_deepdanbooru": "true"}, {"mode": "fusion"}):
        r = client.post("/api/classify", files={"file": ("clip.mp4", data)}, data={"sample_fps": "4", **flags})
        assert r.status_code == 400 and "classifier" in r.json()["error"], (flags, r.text)
    before = _count_in_inference_log(server, "rerank=False")  # the server's default is rerank on
    r = client.post("/api/classify", files={"file": ("clip.mp4", data)},
                    data={"sample_fps": "4", "use_model": "true", "mode": "clip", "rerank": "false"})
    assert r.status_code == 200, r.text
    ans = r.json()
    assert ans["mode"] == "clip" and ans["role"] == a and {f["mode"] for f in ans["frames"]} == {"clip"}
    assert _wait_for_more(server, "rerank=False", before) > before, "rerank=false did not reach the video's frames"


def test_batch_takes_the_same_flags_as_classify(client, server, service_data):
    names = service_data.names[:2]
    files = [("files", (f"{n}.png", service_data.images(n)[4].read_bytes(), "image/png")) for n in names]
    for flags in ({"use_model": "true"}, {"use_deepdanbooru": "true"}):
        r = client.post("/api/classify/batch", files=files, data=flags)
        assert r.status_code == 400 and "classifier" in r.json()["error"], (flags, r.text)
    before = _count_in_inference_log(server, "rerank=False")
    r = client.post("/api/classify/batch", files=files, data={"use_deepdanbooru": "true", "mode": "clip", "rerank": "false"})
    assert r.status_code == 200, r.text
    answers = [x["answer"] for x in r.json()["results"]]
    assert [x["role"] for x in answers] == names and {x["mode"] for x in answers} == {"clip"}
    assert _wait_for_more(server, "rerank=False", before) > before


def test_a_broken_new_version_is_reported_and_the_old_one_keeps_serving(client, registry_root, service_data):
    from anime_role_detect.registry import Registry

    reg = Registry(registry_root)
    good = client.get("/api/version").json()["version"]
    staging = reg.staging_dir()
    (staging / "gallery.json").write_text("{this is not json")
    (staging / "gallery.faiss").write_bytes(b"\x00" * 64)
    broken = reg.commit(staging, kind="test-broken", promote=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = client.get("/api/version").json()
            if info["last_error"] and broken in info["last_error"]:
                break
            time.sleep(0.2)
        assert broken in (info["last_error"] or "") and info["version"] == good and info["registry_latest"] == broken
        png = service_data.images(service_data.names[0])[0].read_bytes()
        r = client.post("/api/classify", files={"file": ("x.png", png)})
        assert r.status_code == 200 and r.json()["version"] == good
        assert client.get("/api/health").json()["ready"] is True
    finally:
        reg.promote(good)


def test_pages_are_served_with_a_strict_policy_and_api_calls_are_traced(client, server):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert client.get("/workflow").status_code == 200 and client.get("/static/app.js").status_code == 200
    r = client.get("/api/health")
    rid = r.headers["x-request-id"]
    assert len(rid) == 16
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # one inference-log line per API request, with the same id
        logs = "".join(p.read_text(errors="replace") for p in (server.workdir / "logs").glob("inference*.log"))
        if rid in logs:
            break
        time.sleep(0.2)
    assert f"{rid} GET /api/health 200" in logs


def test_api_docs_are_served_without_a_cdn(client):
    html = client.get("/docs")
    assert html.status_code == 200 and "/docs-static/swagger-ui-bundle.js" in html.text
    assert "jsdelivr" not in html.text and "tiangolo" not in html.text  # nothing fetched from the internet
    js = client.get("/docs-static/swagger-ui-bundle.js")
    assert js.status_code == 200 and len(js.content) > 100_000
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "/docs-static/redoc.standalone.js" in redoc.text


def test_model_work_does_not_block_the_event_loop(server, service_data):
    """While batches of model work are in flight, health and version still answer at once."""
    import threading

    import httpx

    import io

    from PIL import Image

    from PIL.PngImagePlugin import PngInfo

    paths = [p for n in service_data.names for p in service_data.images(n)[:3]][:15]

    def encoded(path, tag: str) -> bytes:  # same pixels, other bytes: every batch misses the answer cache
        info = PngInfo()
        info.add_text("request", tag)
        buf = io.BytesIO()
        Image.open(path).save(buf, format="PNG", pnginfo=info)
        return buf.getvalue()

    done: list[int] = []

    def heavy(worker: int) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as c:
            for batch in range(3):
                imgs = [encoded(p, f"{worker}-{batch}") for p in paths]
                r = c.post("/api/classify/batch", files=[("files", (f"{i}.png", b)) for i, b in enumerate(imgs)])
                done.append(r.status_code)

    workers = [threading.Thread(target=heavy, args=(w,)) for w in range(3)]
    for w in workers:
        w.start()
    answered_while_busy = 0  # health calls that began and ended while every batch was still in flight
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while any(w.is_alive() for w in workers):
            busy = all(w.is_alive() for w in workers)
            t0 = time.perf_counter()
            assert c.get("/api/health").status_code == 200
            if busy and all(w.is_alive() for w in workers):
                answered_while_busy += 1
                assert time.perf_counter() - t0 < 5.0
            time.sleep(0.005)
    for w in workers:
        w.join()
    assert done == [200] * 9
    assert answered_while_busy >= 3, "health never answered while the batches were running"


def test_start_on_a_broken_version_reports_it_then_recovers_on_promote(tmp_path, registry_root):
    """Broken weights at start-up: the server still starts, says what is wrong, and serves once a good version is live."""
    import shutil

    from anime_role_detect.registry import Registry

    from .conftest import start_server

    root = tmp_path / "registry"
    shutil.copytree(registry_root, root)
    reg = Registry(root)
    good = reg.latest_id()
    staging = reg.staging_dir()
    (staging / "gallery.json").write_text("{truncated")
    broken = reg.commit(staging, kind="test-broken", promote=True)
    srv = start_server(tmp_path / "srv", root)
    try:
        with srv.client() as c:
            health = c.get("/api/health").json()
            assert health["ready"] is False and broken in health["error"] and "promote" in health["error"]
            r = c.post("/api/classify", files={"file": ("a.png", b"\x89PNG\r\n\x1a\n")})
            assert r.status_code == 503 and broken in r.json()["detail"]
            reg.promote(good)
            deadline = time.monotonic() + 90
            while not c.get("/api/health").json()["ready"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert c.get("/api/health").json()["ready"] is True and c.get("/api/version").json()["version"] == good
    finally:
        srv.stop()
