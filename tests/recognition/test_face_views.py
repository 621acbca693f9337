"""Face + figure views (`data.face_view`, `recognition/views.py`): training adds each picture's face (found by the real
animeface detector) as a sample, the checkpoint records it, and recognition, gallery building and ONNX Runtime run
every picture on its figure and, when a face is found, its face, mixed; a picture whose face is hidden is answered
from its figure."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from anime_role_detect.data.synthetic import generate_dataset, load_characters, render_character
from anime_role_detect.recognition.views import FaceFigureModel, FaceFinder, FaceViewSpec

from .helpers import compose, infer_cfg

SIZE = 256  # animeface finds about 6 in 10 synthetic faces at 256 px (none at 128)


@pytest.fixture(scope="module")
def face_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("face_data") / "chars"
    generate_dataset(root, n_characters=6, images_per_character=24, size=SIZE, seed=3, twin_fraction=0.5)
    return root


@pytest.fixture(scope="module")
def face_trained(tmp_path_factory, face_data) -> tuple[Path, Path]:
    """(checkpoint, split dir) of a tiny classifier trained by `training.train` with ``data.face_view.enabled=true``."""
    import torch

    from anime_role_detect.training import train

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("face_train")
    cfg = compose("train", [
        f"paths.root_dir={root}", f"paths.output_dir={root / 'out'}", f"data.root={face_data}", "data.synthetic=null",
        f"data.split_dir={root / 'splits'}", "data.image_size=64", "data.batch_size=16", "model=tiny", "trainer=cpu",
        "trainer.max_epochs=6", "+trainer.enable_progress_bar=false", "~callbacks.progress_bar", "logger=csv",
        "log.console_level=WARNING", "model.optimizer.lr=3e-3", "evaluate=false", "data.face_view.enabled=true",
    ])
    return Path(train(cfg).ckpt_path), root / "splits"


@pytest.fixture(scope="module")
def face_version(tmp_path_factory, face_data, face_trained) -> Path:
    from anime_role_detect.recognition.build import build_recognition_folder

    out = tmp_path_factory.mktemp("face_version") / "v1"
    build_recognition_folder(face_data, out, infer_cfg(["embedder=classifier", "tagger=none"]), model_ckpt=face_trained[0],
                             val_fraction=0.25, seed=0)
    return out


@pytest.fixture(scope="module")
def renders(face_data) -> list[tuple[Image.Image, str, tuple[int, int, int, int]]]:
    """Unseen renders of the training characters: (image, character, figure box)."""
    rng = random.Random(77)
    return [(*render_character(spec, rng, SIZE), spec.name) for spec in load_characters(face_data) for _ in range(8)]  # type: ignore[misc]


def _recognizer(version: Path, **cfg):
    from anime_role_detect.recognition.pipeline import Recognizer

    return Recognizer.from_version(version, {"cache_size": 0, "detector": None, "rerank": False, "openset": {"enabled": False}, **cfg})


def test_training_adds_each_face_and_the_checkpoint_records_the_views(face_trained):
    from anime_role_detect.recognition.embedder import load_classifier

    ckpt, splits = face_trained
    model = load_classifier(ckpt, device="cpu")
    spec = FaceViewSpec.from_mapping(model.face_view)
    assert spec.enabled and spec.weight == 0.5 and spec.detector["kind"] == "animeface"
    caches = list(splits.glob("faces-*.json"))
    assert len(caches) == 1, caches
    import json

    found = json.loads(caches[0].read_text())
    with_face = [v["box"] for v in found.values() if v["box"] is not None]
    assert len(found) >= 100 and len(with_face) >= 0.3 * len(found), (len(found), len(with_face))
    x1, y1, x2, y2 = with_face[0]
    assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE and (x2 - x1) < SIZE  # a face region, not the whole picture


def test_face_regions_are_found_once_and_read_back_from_the_cache(tmp_path, face_data):
    from anime_role_detect.imageio import load_image

    files = [(p.relative_to(face_data).as_posix(), p) for p in sorted(face_data.glob("*/*.png"))[:12]]
    cache = tmp_path / "faces.json"
    first = FaceFinder(FaceViewSpec(enabled=True)).regions_for_files(files, cache, load_image)
    again = FaceFinder(FaceViewSpec(enabled=True))

    class Refuses:
        def detect(self, images):
            raise AssertionError("the cache should have answered")

    again.detector = Refuses()
    assert again.regions_for_files(files, cache, load_image) == first
    touched = files[0][1]
    touched.write_bytes(touched.read_bytes())  # a changed file (new mtime) is looked at again
    with pytest.raises(AssertionError, match="cache should have answered"):
        again.regions_for_files(files, cache, load_image)


def test_views_mix_the_figure_and_the_face_and_a_faceless_picture_keeps_its_figure(face_trained, renders):
    from anime_role_detect.recognition.embedder import ClassifierEmbedder

    inner = ClassifierEmbedder(str(face_trained[0]), device="cpu")
    spec = FaceViewSpec(enabled=True, weight=0.3)
    views = FaceFigureModel(inner, spec)
    finder = FaceFinder(spec)
    with_face = next(img for img, _, _ in renders if finder.boxes([img])[0] is not None)
    blank = Image.new("RGB", (SIZE, SIZE), (200, 210, 220))
    assert finder.boxes([blank]) == [None]
    face = finder.faces([with_face])[0]
    assert face is not None and face.width < with_face.width
    got = views.embed([with_face, blank])
    fig, fc, bl = inner.embed([with_face, face, blank])
    mixed = 0.7 * fig + 0.3 * fc
    np.testing.assert_allclose(got[0], mixed / np.linalg.norm(mixed), atol=1e-5)
    np.testing.assert_allclose(got[1], bl, atol=1e-5)
    probs, _ = views.heads([with_face, blank])
    p = inner.heads([with_face, face, blank])[0]
    np.testing.assert_allclose(probs[0], 0.7 * p[0] + 0.3 * p[1], atol=1e-5)
    np.testing.assert_allclose(probs[1], p[2], atol=1e-5)
    assert views.model_id.startswith(inner.model_id + "+face") and views.dim == inner.dim


def test_a_region_head_view_needs_no_face_detector_and_the_version_keeps_it(tmp_path, face_data, face_trained, renders):
    """``face_view.detector: {kind: region}``: every picture gets its top centre as a second view, mixed with its figure
    like a face (no face detector runs); the version records the setting, so it loads and answers on the same views."""
    import json

    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.recognition.embedder import ClassifierEmbedder

    spec = FaceViewSpec.from_mapping({"enabled": True, "weight": 0.5, "margin": 0.0, "detector": {"kind": "region"}})
    assert spec.detector == {"kind": "region"}
    inner = ClassifierEmbedder(str(face_trained[0]), device="cpu")
    images = [img for img, _, _ in renders[:4]] + [Image.new("RGB", (SIZE, SIZE), (200, 210, 220))]
    heads = FaceFinder(spec).faces(images)
    assert all(h is not None and h.size == (round(0.6 * SIZE), SIZE // 2) for h in heads)  # the blank one too
    got = FaceFigureModel(inner, spec).embed(images)
    fig, head = inner.embed(images), inner.embed(heads)
    mixed = 0.5 * fig + 0.5 * head
    np.testing.assert_allclose(got, mixed / np.linalg.norm(mixed, axis=1, keepdims=True), atol=1e-5)

    out = tmp_path / "v1"
    setting = "embedder.face_view={enabled:true,weight:0.5,margin:0.0,detector:{kind:region}}"
    build_recognition_folder(face_data, out, infer_cfg(["embedder=classifier", "tagger=none", setting]), model_ckpt=face_trained[0],
                             val_fraction=0.25, seed=0)
    saved = json.loads((out / "gallery.json").read_text())["embedder"]
    assert saved["config"]["face_view"]["detector"] == {"kind": "region"} and "+face" in saved["id"]
    rec = _recognizer(out)
    answers = rec.recognize_batch([(img, f"{i}.png") for i, (img, _, _) in enumerate(renders)], mode="fusion")
    assert np.mean([a.role == name for a, (_, _, name) in zip(answers, renders)]) >= 0.5  # 6 characters: chance is 17%
    np.testing.assert_allclose(rec.embedder.embed(images[:4]), got[:4], atol=1e-5)  # loaded on the views it was built with


def _hide_face(img: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
    """The picture with the head of its figure painted over (the generator draws it at 30% of the figure's height)."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + 0.3 * h
    out = img.copy()
    ImageDraw.Draw(out).rectangle([cx - 0.34 * w, cy - 0.3 * w, cx + 0.34 * w, cy + 0.3 * w], fill=(128, 128, 128))
    return out


def test_a_picture_whose_face_is_hidden_is_answered_from_its_figure(face_version, renders):
    """The version recognises on two views by default (its checkpoint says so); a picture whose face is painted
    over has no face view, so it is answered from the figure alone, and still named better than chance."""
    rec = _recognizer(face_version)
    assert isinstance(rec.embedder, FaceFigureModel) and isinstance(rec.classifier_transform, FaceFigureModel)
    assert rec.gallery.embedder_id == rec.embedder.model_id
    finder = rec.embedder.finder
    hidden = [(_hide_face(img, box), name) for img, box, name in renders if finder.boxes([img])[0] is not None]
    hidden = [(img, name) for img, name in hidden if finder.boxes([img])[0] is None]
    assert len(hidden) >= 10, len(hidden)
    figure_only = _recognizer(face_version)
    figure_only._loaded["embedder"] = rec.embedder.inner  # the same networks without the face view
    figure_only._loaded["classifier_input"] = rec.classifier_transform.inner
    chance = 1 / len(rec.gallery.characters())
    for mode in ("clip", "model", "fusion"):
        got = rec.recognize_batch([(img, "hidden.png") for img, _ in hidden], mode=mode)
        same = figure_only.recognize_batch([(img, "hidden.png") for img, _ in hidden], mode=mode)
        assert [a.role for a in got] == [a.role for a in same], mode
        assert [a.similarity for a in got] == pytest.approx([a.similarity for a in same], abs=1e-4), mode
        top1 = float(np.mean([a.role == y for a, (_, y) in zip(got, hidden)]))
        assert top1 >= 2 * chance, (mode, top1)


def test_face_views_run_on_onnx_runtime_with_the_same_answers(tmp_path, face_version, renders):
    """The exported classifier is wrapped in the same views: same gallery id, same answers as torch."""
    import shutil

    from anime_role_detect.fsutil import atomic_write_json
    from anime_role_detect.recognition.onnx_export import export_folder
    from anime_role_detect.recognition.runtime import ONNX_META
    from anime_role_detect.recognition.views import bare_network

    version = tmp_path / "v-onnx"
    shutil.copytree(face_version, version)
    atomic_write_json(version / ONNX_META, export_folder(version, version))
    onnx = _recognizer(version, runtime="onnx")
    torch_rec = _recognizer(version, runtime="torch")
    assert type(bare_network(onnx.embedder)).__name__ == "OnnxClassifier" and onnx.embedder.model_id == onnx.gallery.embedder_id
    items = [(img, "x.png") for img, _, _ in renders[:24]]
    for mode in ("clip", "model"):
        a = [r.role for r in onnx.recognize_batch(items, mode=mode)]
        b = [r.role for r in torch_rec.recognize_batch(items, mode=mode)]
        assert np.mean([x == y for x, y in zip(a, b)]) >= 0.95, mode


@pytest.mark.parametrize("cfg,needle", [
    ({"enabled": True, "weight": 1.5}, "face_view.weight=1.5 must be in"),
    ({"enabled": True, "margin": -0.1}, "face_view.margin=-0.1 is negative"),
    ({"enabled": True, "wieght": 0.5}, "unknown key(s) wieght"),
])
def test_a_bad_face_view_setting_is_a_one_line_error(cfg, needle):
    from anime_role_detect.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(needle)):
        FaceViewSpec.from_mapping(cfg)


def test_a_face_view_on_another_detector_gets_only_its_own_options(tmp_path):
    """animeface's face-view defaults (min_likelihood, max_side, ...) fill in an animeface setting only: another kind
    is built from what was written, so a YOLO face model fails on its weights, not on options it never had."""
    from anime_role_detect.errors import WeightsError

    tuned = FaceViewSpec.from_mapping({"enabled": True, "detector": {"max_side": 768}})
    assert tuned.detector["kind"] == "animeface" and tuned.detector["max_side"] == 768 and tuned.detector["expand"] == 0.33
    none = FaceFinder(FaceViewSpec.from_mapping({"enabled": True, "detector": {"kind": "none"}}))
    assert none.boxes([Image.new("RGB", (64, 96))]) == [None]  # no face found: the picture keeps its figure view
    # Hydra merges a mapping override into the config's: the shipped one names only the kind, so none of animeface's
    # options ride along into another detector
    train_cfg = compose("train", ["data.face_view.enabled=true", "data.face_view.detector={kind:region}"])
    from omegaconf import OmegaConf

    head = FaceFinder(FaceViewSpec.from_mapping(OmegaConf.to_container(train_cfg.data.face_view)))
    assert [b.label for b in head.boxes([Image.new("RGB", (64, 96))])] == ["head"]
    missing = tmp_path / "faces.pt"
    with pytest.raises(WeightsError, match=re.escape(str(missing))):
        FaceFinder(FaceViewSpec.from_mapping({"enabled": True, "detector": {"kind": "yolo", "weights": str(missing)}}))


def test_a_mistyped_face_view_key_fails_even_when_the_views_are_off(tmp_path):
    """`data.face_view` is checked before training whether or not it is enabled: a typo never passes silently."""
    from anime_role_detect.data.datamodule import CharacterDataModule
    from anime_role_detect.errors import ConfigError
    from anime_role_detect.training.run import _add_face_views

    off = CharacterDataModule(str(tmp_path), face_view={"enabled": False, "weight": 0.5})
    assert _add_face_views(off) is None
    typo = CharacterDataModule(str(tmp_path), face_view={"enabled": False, "wieght": 0.5})
    with pytest.raises(ConfigError, match=re.escape("unknown key(s) wieght")):
        _add_face_views(typo)


def test_peers_started_together_share_out_face_finding_and_agree(tmp_path, face_data):
    """torchrun starts every rank at once: each finds the faces of half the pictures, all get every region."""
    import json
    import os
    import subprocess
    import sys

    from anime_role_detect.imageio import load_image
    from anime_role_detect.training import launch_rank

    names = [p.relative_to(face_data).as_posix() for p in sorted(face_data.glob("*/*.png"))[:10]]
    cache = tmp_path / "shared" / "faces.json"
    cache.parent.mkdir()
    code = (
        "import json, sys; from pathlib import Path\n"
        "from anime_role_detect.imageio import load_image\n"
        "from anime_role_detect.recognition.views import FaceFinder, FaceViewSpec\n"
        "from anime_role_detect.training import launch_rank\n"
        f"root = Path({str(face_data)!r}); names = {names!r}\n"
        f"got = FaceFinder(FaceViewSpec(enabled=True)).regions_for_files([(n, root / n) for n in names], Path({str(cache)!r}), "
        "load_image, shard=launch_rank(), stall_s=120)\n"
        "print(json.dumps(got))\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "TORCHELASTIC_RUN_ID": "t", "RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    alone = FaceFinder(FaceViewSpec(enabled=True)).regions_for_files([(n, face_data / n) for n in names], None, load_image)
    assert got[0] == got[1] == alone and any(v is not None for v in alone.values())
    for r in (0, 1):  # each rank looked at its own half only
        part = json.loads((cache.parent / f"faces.rank{r}-of-2.json").read_text())
        assert set(part) == set(names[r::2])
    assert set(json.loads(cache.read_text())) == set(names)  # rank 0 merged them for the next run
    assert launch_rank({}) == (0, 1) and launch_rank({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (0, 1)  # sbatch script
    assert launch_rank({"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}) == (3, 4)


def test_a_peer_that_writes_nothing_is_a_one_line_error(tmp_path, face_data):
    from anime_role_detect.errors import DatasetError
    from anime_role_detect.imageio import load_image

    files = [(p.relative_to(face_data).as_posix(), p) for p in sorted(face_data.glob("*/*.png"))[:4]]
    with pytest.raises(DatasetError, match=r"rank 1 wrote no face box to .*faces.rank1-of-2.json for 1 s"):
        FaceFinder(FaceViewSpec(enabled=True)).regions_for_files(files, tmp_path / "faces.json", load_image, shard=(0, 2), stall_s=1)


def test_models_wrapped_on_the_same_views_find_each_face_once(face_trained, renders):
    """A gallery embedder that is not the classifier and the classifier share the finder: one detection per picture."""
    from anime_role_detect.recognition.embedder import ClassifierEmbedder
    from anime_role_detect.recognition.views import with_face_view

    spec = FaceViewSpec(enabled=True)
    inner = ClassifierEmbedder(str(face_trained[0]), device="cpu")
    gallery_side, classifier_side = with_face_view(inner, spec), with_face_view(inner, FaceViewSpec(enabled=True, weight=0.3))
    assert gallery_side.finder is classifier_side.finder  # same detector settings; the weight is each model's own
    real = gallery_side.finder.detector
    calls: list[int] = []

    class Counting:  # the real animeface detector, counted
        def detect(self, images):
            calls.append(len(images))
            return real.detect(images)

    gallery_side.finder.detector = Counting()
    try:
        pictures = [img for img, _, _ in renders[:4]]
        first = gallery_side.embed(pictures)
        classifier_side.heads(pictures)
        assert calls == [4]
        np.testing.assert_allclose(gallery_side.embed(pictures), first, atol=1e-6)
        gallery_side.embed([img.copy() for img in pictures])  # other pictures (even equal ones): found again
        assert calls == [4, 4]
    finally:
        gallery_side.finder.detector = real


@pytest.mark.parametrize("bad", ["twice", ""])
def test_a_bad_view_sampling_is_a_one_line_error(tmp_path, bad):
    from anime_role_detect.data.datamodule import CharacterDataModule
    from anime_role_detect.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.view_sampling=.*choose one of both, either"):
        CharacterDataModule(str(tmp_path), view_sampling=bad)


def test_either_view_sampling_trains_each_picture_once_per_epoch_as_its_figure_or_its_head(tmp_path, face_data):
    """``data.view_sampling=either``: an epoch holds each training picture once (the steps of training without views),
    drawn afresh as its whole figure or its head view, about half each; ``both`` (the default) holds both views."""
    import torch

    from anime_role_detect.data.datamodule import CharacterDataModule
    from anime_role_detect.training.run import _add_face_views

    def module(sampling: str) -> CharacterDataModule:
        dm = CharacterDataModule(str(face_data), image_size=32, split_dir=str(tmp_path / "splits"), resize="squash",
                                 augment={"scale": None, "hflip": 0, "rotation": 0, "color_jitter": None}, seed=0,
                                 face_view={"enabled": True, "margin": 0.0, "detector": {"kind": "region"}}, view_sampling=sampling)
        dm.prepare_data()
        dm.setup("fit")
        _add_face_views(dm)
        return dm

    either, both = module("either"), module("both")
    n = len(either.train_records)
    assert len(either.face_crops) == n  # the region view exists for every picture
    assert len(either.train_dataloader().dataset) == n and len(both.train_dataloader().dataset) == 2 * n
    ref = both.train_dataloader().dataset  # deterministic transform: items [0, n) figures, [n, 2n) their heads
    ds = either.train_dataloader().dataset
    torch.manual_seed(0)
    heads = 0
    for _ in range(3):
        for i in range(n):
            x = ds[i][0]
            is_figure, is_head = torch.allclose(x, ref[i][0], atol=1e-5), torch.allclose(x, ref[n + i][0], atol=1e-5)
            assert is_figure != is_head, f"picture {i} was loaded as neither its figure nor its head view"
            heads += is_head
    assert 0.35 < heads / (3 * n) < 0.65, heads / (3 * n)
