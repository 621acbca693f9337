"""Recognition fixtures: one tiny classifier trained with the real training framework, and a version folder built from it.

Everything is small (random-init resnet10t, 64 px, a few epochs) so the whole area runs in a few minutes on 2 cores.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from .helpers import TRAIN_CHARS, compose, infer_cfg

@pytest.fixture(scope="session")
def rec_data(tmp_path_factory) -> Path:
    """Synthetic training set: 8 characters (half near-twins), 24 images each, 96 px (the classifier trains at 64)."""
    from anime_role_detect.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("rec_data") / "chars"
    generate_dataset(root, n_characters=TRAIN_CHARS, images_per_character=24, size=96, seed=3, twin_fraction=0.5)
    return root


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory, rec_data) -> Path:
    """A CharacterClassifier (char + tag heads) trained in-process by `training.train` on `rec_data`."""
    import torch

    from anime_role_detect.training import train

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("rec_train")
    cfg = compose("train", [
        f"paths.root_dir={root}", f"paths.output_dir={root / 'out'}", f"data.root={rec_data}", "data.synthetic=null",
        "data.image_size=64", "data.batch_size=16", "model=tiny", "trainer=cpu", "trainer.max_epochs=5",
        "+trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=csv", "log.console_level=WARNING",
        "model.optimizer.lr=3e-3", "evaluate=false",
    ])
    return Path(train(cfg).ckpt_path)


@pytest.fixture(scope="session")
def onnx_tagger(tmp_path_factory, rec_data) -> list[str]:
    """A WD14-format ONNX tagger trained on the synthetic tags; returned as infer.py overrides."""
    from .helpers import train_onnx_tagger

    model, tags = train_onnx_tagger(rec_data, tmp_path_factory.mktemp("tagger"))
    return ["tagger=wd14", f"tagger.model_path={model}", f"tagger.tags_path={tags}", "tagger.general_threshold=0.5"]


@pytest.fixture(scope="session")
def version_dir(tmp_path_factory, rec_data, trained_ckpt, onnx_tagger) -> Path:
    """A complete recognition folder (classifier embedder gallery, tag profiles, calibration, model.ckpt)."""
    from anime_role_detect.recognition.build import build_recognition_folder

    out = tmp_path_factory.mktemp("version") / "v1"
    cfg = infer_cfg(["embedder=classifier", "embedder.flip_tta=false", *onnx_tagger])
    report = build_recognition_folder(rec_data, out, cfg, model_ckpt=trained_ckpt, val_fraction=0.25, seed=0, target_far=0.05)
    (out / "build_report.txt").write_text(repr(report))
    return out


@pytest.fixture(scope="session")
def test_images(rec_data):
    """Fresh images (unseen renders) of the training characters: list of (image, character)."""
    from anime_role_detect.data.synthetic import load_characters, render_character

    rng = random.Random(1234)
    out = []
    for spec in load_characters(rec_data):
        for _ in range(8):
            img, _ = render_character(spec, rng, 96)
            out.append((img, spec.name))
    return out


@pytest.fixture(scope="session")
def twin_pairs(rec_data) -> list[tuple[str, str]]:
    """Pairs of training characters that differ in exactly one attribute."""
    from anime_role_detect.data.synthetic import load_characters

    specs = load_characters(rec_data)
    pairs = []
    for i, a in enumerate(specs):
        for b in specs[i + 1 :]:
            if sum(x != y for x, y in zip(a.attributes(), b.attributes())) == 1:
                pairs.append((a.name, b.name))
    return pairs
