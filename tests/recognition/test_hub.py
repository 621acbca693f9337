"""Weights by Hugging Face hub name, offline: a generated hub cache holds small models in the real file formats.

Each test builds ``models--org--name/{blobs,snapshots/<commit>,refs/main}`` exactly as huggingface_hub
lays it out, sets ``HF_HOME`` (or ``HF_HUB_CACHE``) and ``HF_HUB_OFFLINE=1``, and loads the model by
its hub name through the project's builders: a WD-format ONNX tagger (`build_tagger`, the shipped
``conf/tagger/wd14.yaml`` with no other key), open_clip ``hf-hub:`` and pretrained-tag models and a
timm ``hf-hub:`` model (`build_embedder`), and a YOLO ``.pt`` (`build_detector`). Nothing here
touches the network; a repo that is not cached is a one-line `WeightsError` naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from anime_role_detect.errors import ConfigError, WeightsError
from anime_role_detect.recognition.detector import YoloDetector, build_detector
from anime_role_detect.recognition.embedder import (
    build_embedder,
    clear_shared_models,
    l2_normalise,
)
from anime_role_detect.recognition.hub import (
    download_command,
    hub_cache_dir,
    hub_file,
    hub_offline,
    split_revision,
)
from anime_role_detect.recognition.tagger import build_tagger

from .test_detector_yolo import tiny_yolo_weights  # noqa: F401 - the session's tiny YOLO (trained once, shared)
from .test_tagger import export, wd14_csv

CONF = Path(__file__).resolve().parents[2] / "conf"
WD_REPO = "SmilingWolf/wd-vit-tagger-v3"
RED, BLUE = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))


def hub_repo(cache: Path, repo_id: str, files: dict[str, Path], commit: str | None = None, ref: str = "main") -> str:
    """Put `files` into `cache` as huggingface_hub stores a download: content-addressed blobs, a snapshot of symlinks, a ref."""
    commit = commit or hashlib.sha1(repr((repo_id, sorted(files))).encode()).hexdigest()
    root = cache / f"models--{repo_id.replace('/', '--')}"
    for name, src in files.items():
        data = Path(src).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache under ``HF_HOME`` with offline mode on (read by `hub.py` on every call)."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clear_shared_models()  # a hub name loaded by an earlier test from another cache must not be reused
    yield tmp_path / "hf_home" / "hub"
    clear_shared_models()


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 36, 3), dtype=np.uint8)) for i in range(n)]


# --------------------------------------------------------------------------------------------- hub.py


def test_cache_folder_and_offline_mode_follow_the_environment_at_call_time(tmp_path, monkeypatch):
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub" and not hub_offline()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_cache_dir() == tmp_path / "explicit" and hub_offline()
    assert split_revision("org/name@v2") == ("org/name", "v2") and split_revision("org/name@v2", "main") == ("org/name", "main")
    assert download_command("org/name", ["a.onnx", "b.csv"], "v2") == "hf download org/name a.onnx b.csv --revision v2"


def test_a_cached_file_resolves_offline_and_the_revision_pins_a_commit(hf_cache, tmp_path):
    (tmp_path / "v1.txt").write_text("one")
    (tmp_path / "v2.txt").write_text("two")
    old = hub_repo(hf_cache, "org/name", {"file.txt": tmp_path / "v1.txt"}, commit="1" * 40)
    hub_repo(hf_cache, "org/name", {"file.txt": tmp_path / "v2.txt"}, commit="2" * 40)  # refs/main moves on
    assert hub_file("org/name", "file.txt").read_text() == "two"
    assert hub_file("org/name", "file.txt", revision=old).read_text() == "one"
    assert hub_file("org/name", ("missing.safetensors", "file.txt")).read_text() == "two"  # first alternative present


# --------------------------------------------------------------------------------------------- tagger


def test_wd14_config_loads_the_default_wd_v3_repo_by_name(hf_cache, tmp_path):
    export(tmp_path, nhwc=True, scale=255.0)  # a WD-format export: NHWC, BGR 0-255, probabilities
    hub_repo(hf_cache, WD_REPO, {"model.onnx": tmp_path / "model.onnx", "selected_tags.csv": Path(wd14_csv(tmp_path))})
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "tagger" / "wd14.yaml"))
    assert cfg["repo_id"] == WD_REPO and cfg["model_path"] is None  # tagger=wd14 alone names the hub repo
    tagger = build_tagger(cfg, device="cpu")
    assert tagger.providers == ["CPUExecutionProvider"]
    red, blue = tagger.tag([RED, BLUE])
    assert [t.tag for t in red] == ["third_channel"] and [t.tag for t in blue] == ["first_channel"]  # BGR order honoured
    assert tagger.model_id.startswith("onnx:model.onnx:")


def test_tagger_revision_and_repo_overrides_and_a_local_model_wins(hf_cache, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    export(tmp_path / "a", nhwc=True, scale=255.0)
    export(tmp_path / "b", nhwc=False, scale=1.0)  # another model: another fingerprint
    tags = Path(wd14_csv(tmp_path))
    first = hub_repo(hf_cache, "me/tagger", {"model.onnx": tmp_path / "a" / "model.onnx", "selected_tags.csv": tags}, commit="a" * 40)
    hub_repo(hf_cache, "me/tagger", {"model.onnx": tmp_path / "b" / "model.onnx", "selected_tags.csv": tags}, commit="b" * 40)
    base = {"kind": "onnx", "repo_id": "me/tagger"}
    latest, pinned = build_tagger(base), build_tagger({**base, "revision": first})
    assert not latest.nhwc and pinned.nhwc and latest.model_id != pinned.model_id
    local = build_tagger({**base, "repo_id": "nobody/not-cached", "model_path": str(tmp_path / "a" / "model.onnx"), "tags_path": str(tags)})
    assert local.model_id == pinned.model_id  # the local file, the hub never asked


# --------------------------------------------------------------------------------------------- open_clip

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


def tiny_open_clip(folder: Path, mean: float = 0.5) -> torch.nn.Module:
    """A random tiny CLIP saved as open_clip's hub loader reads it: open_clip_config.json + open_clip_pytorch_model.bin."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": [mean] * 3, "std": [0.5] * 3}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(7)
    model = open_clip.create_model(f"local-dir:{folder}").eval()
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return model


def test_open_clip_hf_hub_name_loads_config_and_weights_from_the_cache(hf_cache, tmp_path):
    src = tmp_path / "clip"
    model = tiny_open_clip(src, mean=0.25)
    hub_repo(hf_cache, "someone/tiny-clip", {n: src / n for n in ("open_clip_config.json", "open_clip_pytorch_model.bin")})
    e = build_embedder({"kind": "open_clip", "model_name": "hf-hub:someone/tiny-clip", "pretrained": "ignored-tag"}, device="cpu")
    assert e.dim == 16 and e.image_size == 32 and e.mean == (0.25, 0.25, 0.25)  # the repo's preprocess_cfg
    assert e.model_id.startswith("open_clip:hf-hub:someone/tiny-clip:")
    x = e.embed(images(3))
    with torch.inference_mode():
        ref = l2_normalise(model.visual(e.preprocess(images(3))).numpy())
    assert x.shape == (3, 16) and np.allclose(x, ref, atol=1e-5)  # the saved weights, not a random init


def test_open_clip_pretrained_tag_resolves_through_the_hub_cache(hf_cache, tmp_path, monkeypatch):
    """A built-in name + tag, as ``ViT-B-32`` + ``laion2b_s34b_b79k``: a tiny model registered under a tag whose hf_hub is our repo."""
    import open_clip
    from open_clip import factory, pretrained
    from safetensors.torch import save_file

    src = tmp_path / "clip"
    model = tiny_open_clip(src)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src / "open_clip_model.safetensors"))
    hub_repo(hf_cache, "someone/tiny-clip-tagged", {"open_clip_model.safetensors": src / "open_clip_model.safetensors"})
    monkeypatch.setitem(factory._MODEL_CONFIGS, "Tiny-CLIP-test", dict(TINY_CLIP))
    monkeypatch.setitem(pretrained._PRETRAINED, "Tiny-CLIP-test", {"tinytag": pretrained._pcfg(hf_hub="someone/tiny-clip-tagged/", mean=(0.3,) * 3)})
    assert "Tiny-CLIP-test" in open_clip.list_models()
    e = build_embedder({"kind": "open_clip", "model_name": "Tiny-CLIP-test", "pretrained": "tinytag"}, device="cpu")
    assert e.model_id == "open_clip:Tiny-CLIP-test:tinytag" and e.mean == (0.3, 0.3, 0.3)  # the tag's preprocessing
    with torch.inference_mode():
        ref = l2_normalise(model.visual(e.preprocess(images(2))).numpy())
    assert np.allclose(e.embed(images(2)), ref, atol=1e-5)
    with pytest.raises(ConfigError, match="not an open_clip tag of Tiny-CLIP-test"):
        build_embedder({"kind": "open_clip", "model_name": "Tiny-CLIP-test", "pretrained": "nosuchtag"})


# --------------------------------------------------------------------------------------------- timm


def test_timm_hf_hub_name_loads_config_and_safetensors_from_the_cache(hf_cache, tmp_path):
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(3)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    save_for_hf(model, str(tmp_path / "timm"), safe_serialization=True)  # config.json + model.safetensors, as push_to_hub
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["architecture"] == "resnet10t"
    commit = hub_repo(hf_cache, "someone/tiny-timm", {n: tmp_path / "timm" / n for n in ("config.json", "model.safetensors")})
    e = build_embedder({"kind": "timm", "model_name": f"hf-hub:someone/tiny-timm@{commit}", "pretrained": False, "image_size": 64})
    assert e.dim == model.num_features and e.model_id.startswith(f"timm:hf-hub:someone/tiny-timm@{commit}:hub:")
    model.reset_classifier(0)
    with torch.inference_mode():
        ref = l2_normalise(model.eval()(e.preprocess(images(3))).numpy())
    assert np.allclose(e.embed(images(3)), ref, atol=1e-5)  # the saved weights, not timm's random init
    with pytest.raises(ConfigError, match="brings its own weights"):
        build_embedder({"kind": "timm", "model_name": "hf-hub:someone/tiny-timm", "weights_path": str(tmp_path / "w.pt")})


# --------------------------------------------------------------------------------------------- YOLO


@pytest.mark.slow
def test_yolo_pt_by_repo_and_filename_finds_the_characters(hf_cache, tiny_yolo_weights):  # noqa: F811
    from anime_role_detect.data.synthetic import make_characters, render_scene

    hub_repo(hf_cache, "someone/anime-yolo", {"detector.pt": tiny_yolo_weights})
    det = build_detector({"kind": "yolo", "repo_id": "someone/anime-yolo", "filename": "detector.pt"})
    assert isinstance(det, YoloDetector) and det.imgsz == 160 and det.weights.name == "detector.pt" and "snapshots" in det.weights.parts
    rng = random.Random(3)
    img, _ = render_scene(make_characters(6, seed=21)[:2], rng, size=(320, 224))
    assert len(det.detect([img])[0]) >= 1
    local = build_detector({"kind": "yolo", "weights": str(tiny_yolo_weights), "repo_id": "nobody/not-cached", "filename": "x.pt"})
    assert local.weights == tiny_yolo_weights  # a local file wins; the hub is not asked


# --------------------------------------------------------------------------------------------- not cached


@pytest.mark.parametrize("build, repo, command, local", [
    (lambda: build_tagger(OmegaConf.to_container(OmegaConf.load(CONF / "tagger" / "wd14.yaml"))),
     WD_REPO, f"hf download {WD_REPO} model.onnx selected_tags.csv", "tagger.model_path"),
    (lambda: build_embedder({"kind": "open_clip", "model_name": "hf-hub:someone/absent-clip"}),
     "someone/absent-clip", "hf download someone/absent-clip open_clip_config.json open_clip_model.safetensors open_clip_pytorch_model.bin",
     "local-dir:"),
    (lambda: build_embedder({"kind": "timm", "model_name": "hf-hub:someone/absent-timm"}),
     "someone/absent-timm", "hf download someone/absent-timm config.json model.safetensors pytorch_model.bin", "local-dir:"),
    (lambda: build_detector({"kind": "yolo", "repo_id": "someone/absent-yolo", "filename": "best.pt"}),
     "someone/absent-yolo", "hf download someone/absent-yolo best.pt", "detector.weights"),
], ids=["wd14-tagger", "open_clip", "timm", "yolo"])
def test_a_repo_that_is_not_cached_is_one_line_naming_the_download_and_the_local_file(hf_cache, build, repo, command, local):
    with pytest.raises(WeightsError) as err:
        build()
    msg = str(err.value)
    assert "\n" not in msg and repo in msg and f"`{command}`" in msg and local in msg, msg
    assert "HF_HUB_OFFLINE" in msg and str(hf_cache) in msg


def test_bad_hub_names_are_config_errors(hf_cache):
    with pytest.raises(ConfigError, match="not a Hugging Face hub repo id"):
        build_tagger({"kind": "onnx", "repo_id": "not a repo!"})
    with pytest.raises(ConfigError, match="model_path .* or tagger.repo_id"):
        build_tagger({"kind": "onnx"})
    with pytest.raises(ConfigError, match="needs detector.filename"):
        build_detector({"kind": "yolo", "repo_id": "someone/anime-yolo"})
