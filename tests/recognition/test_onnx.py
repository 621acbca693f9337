"""ONNX Runtime: export of a version into a derived one, parity with torch, runtime selection and its errors.

The parity figures (top-1 agreement per mode, embedding cosine) are measured on >= 200 fresh synthetic renders of
the trained characters, through the real `Recognizer` with runtime=torch and runtime=onnx over the same version.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from .helpers import infer_cfg

#: fp32 ONNX vs torch: share of images with the same top-1, and the least cosine between embeddings of one image.
TOP1_AGREEMENT = 0.995
COSINE_TOLERANCE = 0.9999
#: int8 is lossy: its agreement is printed (1.0 here); this floor only catches a broken quantised file (int8 convolutions: ~0.7).
INT8_FLOOR = 0.95


@pytest.fixture(scope="module")
def exported(tmp_path_factory, version_dir):
    """`version_dir` imported into a fresh registry as the live version, then exported (fp32 + int8): (registry, result)."""
    from anime_role_detect.recognition.onnx_export import export_version
    from anime_role_detect.registry import Registry

    reg = Registry(tmp_path_factory.mktemp("onnx_registry") / "registry")
    reg.import_folder(version_dir, promote=True)
    return reg, export_version(reg.root, "latest", int8=True)


@pytest.fixture(scope="module")
def parity_images(rec_data):
    """>= 200 fresh renders (seed unseen by training) of the 8 trained characters, with their names."""
    from anime_role_detect.data.synthetic import load_characters, render_character

    rng = random.Random(4321)
    return [(render_character(spec, rng, 96)[0], spec.name) for spec in load_characters(rec_data) for _ in range(26)]


def _recognizer(folder: Path, runtime: str, **extra):
    from anime_role_detect.recognition.pipeline import Recognizer

    return Recognizer.from_version(folder, {**infer_cfg(), "runtime": runtime, "cache_size": 0, "batch_size": 32, **extra})


def _top1(rec, images, mode: str) -> list[str]:
    answers = rec.recognize_batch([(im, f"{i}.png") for i, (im, _) in enumerate(images)], mode=mode)
    return [a.detections[0].topk[0].role for a in answers]


def test_export_writes_a_derived_live_version_with_a_manifest_entry(exported, version_dir):
    from anime_role_detect.fsutil import read_json
    from anime_role_detect.recognition.embedder import file_fingerprint

    reg, res = exported
    assert res.live and reg.latest_id() == res.version_id and res.base_id != res.version_id
    new, base = res.version_dir, reg.path(res.base_id)
    assert os.stat(new / "model.ckpt").st_ino == os.stat(base / "model.ckpt").st_ino  # carried as a hard link
    assert not (base / "classifier.onnx").exists()  # the base is left as it was
    entry = read_json(new / "manifest.json")["onnx"]
    assert entry["int8"] is True and entry["opset"] >= 13
    assert set(entry["files"]) == {"classifier.onnx", "classifier.int8.onnx", "onnx.json"}  # gallery embedder = the classifier
    assert all((new / f).is_file() for f in entry["files"])
    clf = entry["networks"]["classifier"]
    assert clf["source"] == "model.ckpt" and clf["source_fingerprint"] == file_fingerprint(new / "model.ckpt")
    meta = read_json(new / "onnx.json")["networks"]["classifier"]
    assert meta["outputs"] == ["logits", "tag_logits", "embedding"]  # one graph for every head
    assert meta["check"]["embedding_min_cosine"] >= COSINE_TOLERANCE
    assert reg.info(res.version_id).parent == res.base_id and reg.info(res.version_id).kind == "onnx"


def test_onnx_gives_the_same_answers_as_torch_in_every_mode(exported, parity_images):
    new = exported[1].version_dir
    torch_rec, onnx_rec = _recognizer(new, "torch"), _recognizer(new, "onnx")
    assert type(onnx_rec.embedder).__name__ == "OnnxClassifier" and type(torch_rec.embedder).__name__ == "ClassifierEmbedder"
    assert onnx_rec.embedder.model_id == torch_rec.embedder.model_id and onnx_rec.embedder.dim == torch_rec.embedder.dim
    assert onnx_rec._shares_classifier()  # one run per view for embedding, logits and tags, as with torch
    assert type(onnx_rec.tagger).__name__ == "OnnxClassifierTagger" and onnx_rec.tagger.model_id == torch_rec.tagger.model_id
    assert len(parity_images) >= 200
    for mode in ("model", "clip", "fusion"):
        a, b = _top1(torch_rec, parity_images, mode), _top1(onnx_rec, parity_images, mode)
        agree = float(np.mean([x == y for x, y in zip(a, b)]))
        print(f"\n{mode}: onnx vs torch top-1 agreement {agree:.4f} on {len(a)} images")
        assert agree >= TOP1_AGREEMENT, mode
    images = [im for im, _ in parity_images]
    cos = np.sum(torch_rec.embedder.embed(images) * onnx_rec.embedder.embed(images), axis=1)
    print(f"embedding cosine onnx vs torch: min {cos.min():.6f}")
    assert cos.min() >= COSINE_TOLERANCE
    p_torch, t_torch = torch_rec._classify(images)
    p_onnx, t_onnx = onnx_rec._classify(images)
    assert np.abs(p_torch - p_onnx).max() < 1e-3 and np.abs(t_torch - t_onnx).max() < 1e-3


def test_flip_tta_and_batching_match_torch(exported, parity_images):
    from anime_role_detect.recognition.embedder import ClassifierEmbedder
    from anime_role_detect.recognition.runtime import OnnxVersion

    new = exported[1].version_dir
    images = [im for im, _ in parity_images[:40]]
    onnx_emb = OnnxVersion.load(new).embedder({"flip_tta": True, "batch_size": 7}, _recognizer(new, "torch").embedder.model_id)
    torch_emb = ClassifierEmbedder(str(new / "model.ckpt"), flip_tta=True, batch_size=16, device="cpu")
    cos = np.sum(onnx_emb.embed(images) * torch_emb.embed(images), axis=1)
    assert cos.min() >= COSINE_TOLERANCE
    e1, p1, t1 = onnx_emb.embed_with_heads(images)
    e2, p2, t2 = torch_emb.embed_with_heads(images)
    assert np.sum(e1 * e2, axis=1).min() >= COSINE_TOLERANCE and np.abs(p1 - p2).max() < 1e-3 and np.abs(t1 - t2).max() < 1e-3
    assert onnx_emb.embed([]).shape == (0, onnx_emb.dim)


def test_int8_agreement_is_stated(exported, parity_images):
    new = exported[1].version_dir
    torch_rec, int8_rec = _recognizer(new, "torch"), _recognizer(new, "onnx-int8")
    assert int8_rec.embedder.runtime == "onnx-int8" and int8_rec.embedder.model_id == torch_rec.embedder.model_id
    labels = [name for _, name in parity_images]
    for mode in ("model", "clip", "fusion"):
        a, b = _top1(torch_rec, parity_images, mode), _top1(int8_rec, parity_images, mode)
        agree = float(np.mean([x == y for x, y in zip(a, b)]))
        acc_t, acc_q = (float(np.mean([x == y for x, y in zip(r, labels)])) for r in (a, b))
        print(f"\n{mode}: int8 vs torch top-1 agreement {agree:.4f}; top-1 torch {acc_t:.4f} int8 {acc_q:.4f}")
        assert agree >= INT8_FLOOR, mode


def test_runtime_auto_picks_onnx_only_when_exported(exported, version_dir):
    new = exported[1].version_dir
    assert type(_recognizer(new, "auto").embedder).__name__ == "OnnxClassifier"
    assert type(_recognizer(new, "auto").classifier_transform).__name__ == "OnnxClassifier"
    assert type(_recognizer(version_dir, "auto").embedder).__name__ == "ClassifierEmbedder"  # not exported: torch
    assert _recognizer(version_dir, "auto").onnx is None


@pytest.mark.parametrize("runtime", ["onnx", "onnx-int8"])
def test_runtime_onnx_without_files_is_a_one_line_error(version_dir, runtime):
    from PIL import Image

    from anime_role_detect.errors import ConfigError

    rec = _recognizer(version_dir, runtime)
    with pytest.raises(ConfigError) as err:
        rec.recognize(Image.new("RGB", (96, 96), (200, 120, 80)))
    msg = str(err.value)
    assert "\n" not in msg and f"runtime={runtime}" in msg and "python -m anime_role_detect.export" in msg and "runtime=torch" in msg


def test_int8_runtime_on_an_fp32_export_and_a_bad_runtime_are_errors(tmp_path, exported):
    from anime_role_detect.errors import ConfigError
    from anime_role_detect.fsutil import atomic_write_json, read_json
    from anime_role_detect.recognition.config import RecognizerConfig
    from anime_role_detect.recognition.runtime import select_runtime

    folder = tmp_path / "v"
    shutil.copytree(exported[1].version_dir, folder)
    meta = read_json(folder / "onnx.json")
    atomic_write_json(folder / "onnx.json", {**meta, "int8": False})
    with pytest.raises(ConfigError, match="exported without int8.*--int8"):
        select_runtime("onnx-int8", folder)
    with pytest.raises(ConfigError, match="runtime='tensorrt'"):
        RecognizerConfig(runtime="tensorrt")
    with pytest.raises(ConfigError, match="not a bare checkpoint.*runtime=torch"):
        select_runtime("onnx", None)
    assert select_runtime("auto", None) is None and select_runtime("torch", folder) is None


def test_a_changed_checkpoint_falls_back_to_torch(tmp_path, exported):
    from anime_role_detect.recognition.runtime import OnnxVersion

    folder = tmp_path / "v"
    shutil.copytree(exported[1].version_dir, folder)
    onnx = OnnxVersion.load(folder)
    assert onnx.classifier(folder / "model.ckpt") is not None
    with open(folder / "model.ckpt", "ab") as fh:  # a fine-tune in place: other bytes, same name
        fh.write(b"\0" * 16)
    assert onnx.classifier(folder / "model.ckpt") is None and onnx.tag_names(folder / "model.ckpt") is None
    emb = onnx.embedder({}, exported[1].manifest_entry["networks"]["classifier"]["model_id"], folder / "model.ckpt")
    assert emb is not None and emb.ckpt_path is None  # still the gallery's embedder, no longer the classifier


def test_the_export_carries_the_classifier_card_and_an_older_export_reads_the_checkpoint(tmp_path, exported):
    """A recognizer on ONNX Runtime reads the classifier's names, series and views from ``onnx.json`` (no torch); an
    export made before the card was recorded there (no ``face_view`` key) reads them from the checkpoint, as before."""
    import json

    from anime_role_detect.recognition.card import read_classifier_card
    from anime_role_detect.recognition.runtime import OnnxVersion

    folder = tmp_path / "v"
    shutil.copytree(exported[1].version_dir, folder)
    ckpt = folder / "model.ckpt"
    truth = read_classifier_card(ckpt)
    assert truth.class_names and truth.tag_names and OnnxVersion.load(folder).card(ckpt) == truth
    meta = json.loads((folder / "onnx.json").read_text())
    del meta["networks"]["classifier"]["face_view"]
    (folder / "onnx.json").write_text(json.dumps(meta))
    assert OnnxVersion.load(folder).card(ckpt) is None
    assert _recognizer(folder, "onnx").classifier_card == truth


@pytest.mark.parametrize("colour", [None, 0.3])
def test_a_timm_gallery_embedder_is_exported_as_its_own_file(tmp_path, rec_data, test_images, colour):
    """The bare network is exported; with ``embedder.colour`` the ONNX session is joined to the same histogram."""
    from anime_role_detect.recognition.build import build_recognition_folder
    from anime_role_detect.recognition.onnx_export import export_version
    from anime_role_detect.recognition.views import bare_network
    from anime_role_detect.registry import Registry

    folder = tmp_path / "gallery"
    cfg = infer_cfg(["embedder=lite0", "embedder.image_size=96", "embedder.flip_tta=true", f"embedder.colour={colour or 'null'}"])
    build_recognition_folder(rec_data, folder, cfg, val_fraction=0.25, seed=0, dedupe=False)
    reg = Registry(tmp_path / "registry")
    reg.import_folder(folder, promote=False)
    res = export_version(reg.root, reg.list()[0].id)
    assert not res.live and reg.latest_id() is None  # the base was not live: neither is the export
    assert set(res.files) == {"embedder.onnx", "onnx.json"}
    torch_rec, onnx_rec = _recognizer(res.version_dir, "torch"), _recognizer(res.version_dir, "onnx")
    assert type(bare_network(onnx_rec.embedder)).__name__ == "OnnxEmbedder" and onnx_rec.embedder.model_id == torch_rec.embedder.model_id
    assert type(onnx_rec.embedder).__name__ == ("ColourModel" if colour else "OnnxEmbedder")
    images = test_images[:40]
    cos = np.sum(torch_rec.embedder.embed([im for im, _ in images]) * onnx_rec.embedder.embed([im for im, _ in images]), axis=1)
    assert cos.min() >= COSINE_TOLERANCE
    assert _top1(torch_rec, images, "clip") == _top1(onnx_rec, images, "clip")


def test_export_cli(tmp_path, version_dir, capsys, monkeypatch):
    import json

    from anime_role_detect.cli.export import main
    from anime_role_detect.registry import Registry

    monkeypatch.chdir(tmp_path)  # the command's logs/ folder

    reg = Registry(tmp_path / "registry")
    reg.import_folder(version_dir, promote=True)
    assert main([f"registry={reg.root}", "version=latest", "int8=false"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["live"] and reg.latest_id() == out["version"] and "classifier.int8.onnx" not in out["files"]
    assert out["checks"]["classifier"]["check"]["embedding_min_cosine"] >= COSINE_TOLERANCE
    assert (tmp_path / "logs" / "system.log").is_file()
    for bad in (["--registry", str(tmp_path / "empty")], ["colour=red"], ["int8=maybe"]):
        with pytest.raises(SystemExit) as ex:
            main(bad)
        err = capsys.readouterr().err.strip()
        assert ex.value.code == 2 and err.startswith("error: ") and "\n" not in err, bad


def test_an_attention_embedder_exports_and_matches(tmp_path):
    """nn.MultiheadAttention (open_clip's ViTs) exports although torch runs it as a fused op in inference; int8 stays close."""
    import torch
    from PIL import Image
    from torch import nn

    from anime_role_detect.recognition.embedder import TorchEmbedder
    from anime_role_detect.recognition.onnx_export import export_embedder, quantize_int8
    from anime_role_detect.recognition.runtime import OnnxEmbedder, open_session

    class TinyViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 8, stride=8)
            self.block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.patch(x).flatten(2).transpose(1, 2)).mean(1)

    class Embedder(TorchEmbedder):
        def __init__(self) -> None:
            super().__init__(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), flip_tta=True, resize="center_crop", device="cpu")
            torch.manual_seed(0)
            self.model, self.dim, self.model_id = TinyViT().eval(), 32, "tiny-vit:test"

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

    emb = Embedder()
    entry = export_embedder(emb, tmp_path / "vit.onnx")
    quantize_int8(tmp_path / "vit.onnx", tmp_path / "vit.int8.onnx")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(9)]
    ref = emb.embed(images)
    for name, floor in (("vit.onnx", COSINE_TOLERANCE), ("vit.int8.onnx", 0.99)):
        onnx = OnnxEmbedder(open_session(tmp_path / name, "cpu"), entry, batch_size=4, flip_tta=True)
        assert onnx.model_id == emb.model_id and onnx.dim == emb.dim
        assert np.sum(onnx.embed(images) * ref, axis=1).min() >= floor, name


def test_a_build_with_onnx_embeds_its_gallery_on_onnx_runtime(tmp_path, rec_data, trained_ckpt, version_dir, onnx_tagger):
    """The workflow's build (``onnx=True``, the version's classifier as gallery embedder) exports the classifier first
    and embeds the gallery and the val pictures with that export: the same rows, vectors and thresholds as the torch
    build of the same checkpoint and split (`version_dir`), and one export in the end."""
    from anime_role_detect.errors import ConfigError
    from anime_role_detect.recognition.build import (
        _export_classifier_first,
        build_recognition_folder,
    )
    from anime_role_detect.recognition.embedder import build_embedder
    from anime_role_detect.recognition.gallery import Gallery
    from anime_role_detect.recognition.openset import OpenSetCalibration
    from anime_role_detect.recognition.views import bare_network

    cfg = infer_cfg(["embedder=classifier", "embedder.flip_tta=false", *onnx_tagger])
    ecfg = {**cfg["embedder"], "ckpt_path": "model.ckpt"}
    probe = tmp_path / "probe"
    probe.mkdir()
    shutil.copy2(trained_ckpt, probe / "model.ckpt")
    torch_emb = build_embedder(ecfg, base_dir=probe, device="cpu")
    meta, twin = _export_classifier_first(probe, ecfg, torch_emb)
    assert type(bare_network(twin)).__name__ == "OnnxClassifier" and twin.model_id == torch_emb.model_id
    assert set(meta["networks"]) == {"classifier"}

    out = tmp_path / "v"
    report = build_recognition_folder(rec_data, out, cfg, model_ckpt=trained_ckpt, val_fraction=0.25, seed=0, target_far=0.05, onnx=True)
    assert report.onnx is not None and set(report.onnx["networks"]) == {"classifier"}
    ours, theirs = Gallery.load(out), Gallery.load(version_dir)
    ids = ours.rows.live_ids()
    assert ours.embedder_id == theirs.embedder_id and np.array_equal(ids, theirs.rows.live_ids())
    assert [ours.rows[i].source for i in ids] == [theirs.rows[i].source for i in ids]
    assert np.sum(ours._vectors(ids) * theirs._vectors(ids), axis=1).min() >= COSINE_TOLERANCE
    mine, torch_calib = OpenSetCalibration.load(out), OpenSetCalibration.load(version_dir)
    for mode, t in torch_calib.modes.items():
        assert mine.modes[mode].threshold == pytest.approx(t.threshold, abs=1e-3), mode
    with pytest.raises(ConfigError, match=r"gallery_build.runtime='onnx-gpu': choose one of auto, torch"):
        build_recognition_folder(rec_data, tmp_path / "bad", {**cfg, "gallery_build": {"runtime": "onnx-gpu"}}, onnx=True)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_an_onnx_version_answers_every_mode_without_importing_torch(exported, parity_images, tmp_path):
    """A fresh process answering on ONNX Runtime reads the classifier's names and views from the export
    (`parts.classifier_card`, `OnnxVersion.card`) and frames pictures in numpy (`framing.eval_array`): the same answers
    as torch, and neither Lightning nor torch is ever imported (together 6 of a cold first answer's 7.5 seconds on this
    CPU: `infer.py image=` on the demo version took 7.5 s, now 1.3 s)."""
    import json
    import subprocess
    import sys

    version = exported[1].version_dir
    cfg = {**infer_cfg(), "runtime": "onnx", "cache_size": 0}
    pictures = []
    for i, (image, _) in enumerate(parity_images[:: len(parity_images) // 6][:6]):
        pictures.append(str(tmp_path / f"{i}.png"))
        image.save(pictures[-1])
    code = """
import json, sys
from anime_role_detect.imageio import load_image
from anime_role_detect.recognition.pipeline import Recognizer
version, cfg, pictures = json.loads(sys.argv[1])
rec = Recognizer.from_version(version, cfg)
answers = {m: [a.role for a in rec.recognize_batch([(load_image(p), p) for p in pictures], mode=m)] for m in ("clip", "model", "fusion")}
facts = rec.describe()
print(json.dumps({"answers": answers, "lightning": "lightning" in sys.modules, "torch": sorted(m for m in ("torch", "torchvision")
                  if m in sys.modules), "embedder": type(rec.embedder).__name__, "device": facts["device"]}))
"""
    run = subprocess.run([sys.executable, "-c", code, json.dumps([str(version), cfg, pictures])], capture_output=True, text=True,
                         timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["lightning"] is False and got["torch"] == [] and got["embedder"] == "OnnxClassifier", got
    assert got["device"] == "cpu", got
    from anime_role_detect.imageio import load_image

    torch_rec = _recognizer(version, "torch")
    for mode, roles in got["answers"].items():
        assert roles == [a.role for a in torch_rec.recognize_batch([(load_image(p), p) for p in pictures], mode=mode)], mode
