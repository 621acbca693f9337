"""Real pictures through the real service: a gallery built from 80% of `mixed5` (5 characters, web images),
the held-out 20% sent over HTTP to `/api/classify/batch`; top-1 must clearly beat chance."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from .conftest import start_server

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


def _held_out(path: Path) -> bool:
    """Deterministic 20% hold-out by file name."""
    return int(hashlib.sha256(path.name.encode()).hexdigest(), 16) % 5 == 0


def test_mixed5_held_out_pictures_are_named_over_http(tmp_path, shared_data):
    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.registry import Registry

    src = shared_data / "mixed5"
    if not src.is_dir():
        pytest.skip(f"{src} not found")
    train_root, held = tmp_path / "train", []
    for char_dir in sorted(p for p in src.iterdir() if p.is_dir()):
        (train_root / char_dir.name).mkdir(parents=True)
        for img in sorted(char_dir.iterdir()):
            if _held_out(img):
                held.append((char_dir.name, img))
            else:
                os.symlink(img, train_root / char_dir.name / img.name)  # never copied: read in place
    cfg = compose_plain("infer", ["embedder=lite0", "embedder.image_size=128", "embedder.flip_tta=false", "tagger=none"])
    reg = Registry(tmp_path / "registry")
    staging = reg.staging_dir()
    build_recognition_folder(train_root, staging, cfg, val_fraction=0.2, seed=0)
    reg.commit(staging, kind="test-realdata")

    srv = start_server(tmp_path / "srv", reg.root, ["limits.max_files=16"])
    try:
        correct = total = 0
        with srv.client() as c:
            for i in range(0, len(held), 16):
                chunk = held[i:i + 16]
                files = [("files", (p.name, p.read_bytes())) for _, p in chunk]
                r = c.post("/api/classify/batch", files=files, data={"mode": "clip"})
                assert r.status_code == 200, r.text
                for (truth, _), item in zip(chunk, r.json()["results"]):
                    if item["status"] != 200:
                        continue  # an unreadable web image is refused, not guessed
                    top1 = item["answer"]["detections"][0]["topk"][0]["role"]
                    correct += top1 == truth
                    total += 1
        accuracy = correct / total
        print(f"\nmixed5 held-out over HTTP: top-1 {accuracy:.3f} on {total} pictures (chance 0.2)")
        assert total >= 50
        assert accuracy >= 0.5, f"top-1 {accuracy:.3f} on {total} held-out pictures"
    finally:
        srv.stop()
