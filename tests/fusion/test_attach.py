"""FeatureLog as the real Recognizer's sink: records carry the recognizer's embedder id; uploads stored only when enabled."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from anime_role_detect.data.synthetic import make_characters, render_character
from anime_role_detect.fusion.featurelog import FeatureLog
from anime_role_detect.recognition.embedder import build_embedder
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.recognition.pipeline import Recognizer

EMBEDDER = {"kind": "timm", "model_name": "resnet10t", "pretrained": False, "image_size": 64}


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory):
    """A version folder with a 3-character gallery from a tiny random-init embedder."""
    rng = random.Random(0)
    specs = make_characters(3, seed=0, twin_fraction=0.0)
    emb = build_embedder(EMBEDDER)
    items = [(s.name, s.series, render_character(s, rng, 64)[0], f"{s.name}/{k}") for s in specs for k in range(3)]
    d = tmp_path_factory.mktemp("version")
    Gallery.build(items, emb, embedder_config=EMBEDDER).save(d)
    return d


def _png(seed: int) -> bytes:
    spec = make_characters(3, seed=0, twin_fraction=0.0)[seed % 3]
    buf = io.BytesIO()
    render_character(spec, random.Random(seed), 64)[0].save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("store", [False, True])
def test_recognizer_sink_logs_answer_embedding_and_optionally_the_upload(tmp_path, version_dir, store):
    log = FeatureLog(tmp_path / "fl", {"store_images": store})
    rec = log.attach(Recognizer.from_version(version_dir, {"mode": "clip", "rerank": False}))
    data = _png(1)
    ans = rec.recognize_bytes(data, "up.png")
    rid = log.last_record_id
    rec.recognize(Image.open(io.BytesIO(data)).convert("RGB"), "pil.png")  # no bytes at hand: never stored
    records = list(FeatureLog(tmp_path / "fl").read())
    assert [r.id for r in records][0] == rid and len(records) == 2
    first = records[0]
    assert first.embedder == rec.embedder.model_id and first.image_sha256 == ans.image_sha256
    assert first.data["role"] == ans.role and first.detections[0]["topk"][0]["role"] == ans.detections[0].topk[0].role
    np.testing.assert_allclose(first.embeddings, rec.embedder.embed([Image.open(io.BytesIO(data)).convert("RGB")]), atol=1e-5)
    stored = FeatureLog(tmp_path / "fl").image_path(first)
    assert (stored is not None and stored.read_bytes() == data) if store else stored is None
    assert FeatureLog(tmp_path / "fl").image_path(records[1]) is None
    assert not (tmp_path / "fl" / "images").exists() or store


@pytest.mark.slow
def test_export_stored_uploads_as_dataset_via_cli(tmp_path, version_dir):
    """`python -m anime_role_detect.fusion export_dir=...` turns corrected, stored uploads into a training folder."""
    import json
    import subprocess
    import sys

    from anime_role_detect.data.layout import read_metadata, scan_dataset
    from anime_role_detect.registry import Registry

    reg = Registry(tmp_path / "registry")
    reg.import_folder(version_dir)
    log = FeatureLog(tmp_path / "fl", {"store_images": True})
    rec = log.attach(Recognizer.from_version(reg.path(), {"mode": "clip", "rerank": False}))
    names = sorted(c["name"] for c in rec.characters())
    uploads = {}
    for seed in range(4):
        data = _png(seed)
        ans = rec.recognize_bytes(data, f"{seed}.png")
        truth = names[seed % 3]
        log.feedback(ans.image_sha256, correct_role=truth) if ans.role != truth else log.feedback(ans.image_sha256, confirmed=True)
        uploads[ans.image_sha256] = truth
    out = tmp_path / "export"
    proc = subprocess.run([sys.executable, "-m", "anime_role_detect.fusion", f"log_dir={tmp_path / 'fl'}",
                           f"registry_dir={reg.root}", f"export_dir={out}", f"hydra.run.dir={tmp_path / 'run'}",
                           f"log.dir={tmp_path / 'logs'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["images"] == 4
    meta = read_metadata(out)
    assert {r.group: r.character for r in meta.values()} == uploads  # grouped by upload, labelled by the verdicts
    assert len(scan_dataset(out)) == 4


def test_cached_answer_is_still_written_to_the_feature_log(tmp_path, version_dir):
    """The log is a declared sink, so the content-hash cache stays on: a repeated upload is answered from
    the cache and still gets its own record (with embeddings and the stored upload) for fusion and feedback."""
    log = FeatureLog(tmp_path / "fl", {"store_images": True})
    rec = log.attach(Recognizer.from_version(version_dir, {"mode": "clip", "rerank": False}))
    data = _png(2)
    first = rec.recognize_bytes(data, "one.png")
    hits = rec.cache.hits
    second = rec.recognize_bytes(data, "two.png")
    assert rec.cache.hits == hits + 1 and second.role == first.role
    records = list(FeatureLog(tmp_path / "fl").read())
    assert [r.data["filename"] for r in records] == ["one.png", "two.png"]
    assert records[1].id == log.last_record_id == second.record_id != records[0].id == first.record_id
    np.testing.assert_array_equal(records[1].embeddings, records[0].embeddings)
    assert records[1].embedder == rec.embedder.model_id
    assert FeatureLog(tmp_path / "fl").image_path(records[1]).read_bytes() == data
    log.feedback(records[1].id, confirmed=True)  # feedback on the cached answer's record works
