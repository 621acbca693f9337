"""Real data often has no per-image tags: a classifier trained without tags must still serve every mode.

`tagger=auto` (the default) then means "no tagger": fusion blends gallery and classifier only, and
`rerank=true` (also the default) is a no-op instead of an error.
"""

from __future__ import annotations

import pytest

from anime_role_detect.data.layout import scan_dataset
from anime_role_detect.data.synthetic import generate_dataset, make_characters
from anime_role_detect.imageio import load_image
from anime_role_detect.recognition.build import build_recognition_folder
from anime_role_detect.recognition.pipeline import Recognizer

pytestmark = pytest.mark.slow


def test_every_mode_answers_with_a_classifier_trained_without_tags(tmp_path, train_tiny):
    specs = make_characters(4, seed=0, twin_fraction=0.0)
    data = tmp_path / "data"
    generate_dataset(data, images_per_character=12, size=64, seed=1, characters=specs)
    (data / "metadata.jsonl").unlink()  # folders only, like ../shared/data: no tags
    ckpt = train_tiny(tmp_path / "t", data, epochs=2)
    version = tmp_path / "version"
    cfg = {"embedder": {"kind": "classifier", "flip_tta": False}, "tagger": {"kind": "auto"}}
    build_recognition_folder(data, version, cfg, model_ckpt=ckpt, val_fraction=0.25, seed=0)
    assert not (version / "tag_profiles.json").exists()
    rows = scan_dataset(data)[:6]
    images = [(load_image(r.path(data)), r.file_name) for r in rows]
    for mode in ("clip", "model", "fusion"):
        rec = Recognizer.from_version(version, {**cfg, "mode": mode, "rerank": True, "detector": None})
        answers = rec.recognize_batch(images)
        assert len(answers) == len(images) and all(a.mode == mode for a in answers)
        assert all(d.tags == [] and d.rerank is None for a in answers for d in a.detections), mode
