"""Live server: classify new-style uploads, give feedback over HTTP, fuse, and the *running* server answers
the next request with the fused version (same process, no restart)."""

from __future__ import annotations

import time

import pytest

from anime_role_detect.data.synthetic import generate_dataset, make_characters
from anime_role_detect.fusion.fuse import fuse
from anime_role_detect.registry import Registry

from service.conftest import build_version, start_server  # the service owner's real-server helpers


@pytest.mark.slow
def test_fused_version_answers_the_next_request_without_restart(tmp_path):
    specs = make_characters(5, seed=11, twin_fraction=0.0)
    generate_dataset(tmp_path / "gallery", size=96, seed=1, images_per_character=8, characters=specs)
    generate_dataset(tmp_path / "val", size=96, seed=5, images_per_character=4, characters=specs)
    generate_dataset(tmp_path / "night", size=96, seed=3, images_per_character=6, domain="night", characters=specs)
    reg = Registry(tmp_path / "registry")
    v0 = build_version(reg.root, tmp_path / "gallery")
    server = start_server(tmp_path / "server", reg.root)
    try:
        pid = server.proc.pid
        uploads = [(s.name, p.read_bytes()) for s in specs for p in sorted((tmp_path / "night" / s.name).glob("*.png"))]
        with server.client() as client:
            right_before = 0
            for truth, data in uploads:
                ans = client.post("/api/classify", files={"file": ("n.png", data)}).json()
                assert ans["version"] == v0
                right_before += ans["role"] == truth
                verdict = {"confirmed": True} if ans["role"] == truth else {"correct_role": truth}
                r = client.post("/api/feedback", json={"image_sha256": ans["image_sha256"], **verdict})
                assert r.status_code == 200, r.text
            result = fuse({"log_dir": str(tmp_path / "server" / "featurelog"), "registry_dir": str(reg.root),
                           "evaluation": {"val_dir": str(tmp_path / "val"), "holdout_fraction": 0.0}})
            assert result.version_id is not None, result.report["reason"]
            deadline = time.monotonic() + 60
            while client.get("/api/version").json()["version"] != result.version_id:
                assert time.monotonic() < deadline, "server did not switch to the fused version"
                time.sleep(0.2)
            right_after = 0
            for truth, data in uploads:
                ans = client.post("/api/classify", files={"file": ("n.png", data)}).json()
                assert ans["version"] == result.version_id
                right_after += ans["role"] == truth
        assert server.proc.poll() is None and server.proc.pid == pid  # the same process, never restarted
        print(f"night uploads right: {right_before}/{len(uploads)} -> {right_after}/{len(uploads)}")
        assert right_after > right_before
    finally:
        server.stop()
