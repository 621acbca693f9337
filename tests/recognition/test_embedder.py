"""Embedders: real offline ImageNet Lite0 and random-init timm/open_clip models; unit-length float32, batched; weight errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anime_role_detect.errors import ConfigError, WeightsError
from anime_role_detect.recognition.embedder import build_embedder


def imgs(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


def test_offline_lite0_embeddings_are_unit_float32_and_batch_independent():
    e = build_embedder({"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "image_size": 96, "batch_size": 2})
    assert e.dim == 1280 and e.model_id.startswith("timm:efficientnet_lite0_offline:pretrained:")
    x = e.embed(imgs(5))
    assert x.shape == (5, 1280) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    one = e.embed(imgs(5)[3:4])
    assert np.allclose(one[0], x[3], atol=1e-4)  # batching does not change an image's embedding
    assert e.embed([]).shape == (0, 1280)


def test_cpu_networks_run_channels_last_with_the_same_embeddings():
    """A torch embedder's network runs channels-last on CPU (oneDNN's faster layout); its embeddings are the NCHW ones."""
    import torch

    e = build_embedder({"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "image_size": 96})
    convs = [p for p in e.model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert any(not p.is_contiguous() for p in convs)
    x = e.embed(imgs(3))
    e.model.to(memory_format=torch.contiguous_format)
    try:
        assert all(p.is_contiguous() for p in e.model.parameters())
        assert np.allclose(e.embed(imgs(3)), x, atol=1e-5)
    finally:
        e.model.to(memory_format=torch.channels_last)  # the network is shared per process


def test_flip_tta_is_mirror_invariant():
    e = build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "image_size": 64, "flip_tta": True})
    im = imgs(1)[0].resize((48, 48))  # square: letterbox padding is symmetric too
    a, b = e.embed([im, im.transpose(Image.FLIP_LEFT_RIGHT)])
    assert np.allclose(a, b, atol=1e-4)


def test_random_inits_get_different_ids():
    from anime_role_detect.recognition.embedder import clear_shared_models

    a = build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "image_size": 64})
    clear_shared_models()
    b = build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "image_size": 64})
    assert a.model_id != b.model_id  # a gallery of one random init refuses the other


@pytest.mark.slow
def test_open_clip_vit_b32_random_init():
    e = build_embedder({"kind": "open_clip", "model_name": "ViT-B-32", "pretrained": None, "batch_size": 4})
    x = e.embed(imgs(2))
    assert e.dim == 512 and x.shape == (2, 512) and e.model_id.startswith("open_clip:ViT-B-32:random:")
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_weight_and_config_errors_name_the_fix(tmp_path):
    with pytest.raises(WeightsError, match=r"missing\.pt not found.*embedder\.pretrained"):
        build_embedder({"kind": "open_clip", "model_name": "ViT-B-32", "pretrained": str(tmp_path / "missing.pt")})
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        build_embedder({"kind": "open_clip", "model_name": "ViT-Nope", "pretrained": None})
    with pytest.raises(WeightsError, match=r"gone\.ckpt not found"):
        build_embedder({"kind": "classifier", "ckpt_path": str(tmp_path / "gone.ckpt")})
    with pytest.raises(WeightsError, match="backbone weights .* not found"):
        build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "weights_path": str(tmp_path / "w.pt")})
    with pytest.raises(ConfigError, match="embedder.kind"):
        build_embedder({"kind": "sift"})
    with pytest.raises(ConfigError, match="bad option"):
        build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "flavour": "blue"})


# --------------------------------------------------------------------------------------------- shared model cache


@pytest.fixture()
def small_model_cache():
    """A shared-model cache bounded at 3 for one test (the default is restored after)."""
    from anime_role_detect.recognition.embedder import (
        DEFAULT_SHARED_MODELS,
        clear_shared_models,
        set_shared_model_limit,
    )

    clear_shared_models()
    set_shared_model_limit(3)
    yield 3
    set_shared_model_limit(DEFAULT_SHARED_MODELS)
    clear_shared_models()


def test_shared_model_cache_stays_bounded_and_reuses_what_it_still_holds(tmp_path, small_model_cache):
    import torch

    from anime_role_detect.recognition.embedder import shared_model_keys

    paths = []
    for i in range(6):  # six distinct weights files of one architecture: six cache entries if unbounded
        torch.manual_seed(i)
        net = build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "image_size": 32}).model
        paths.append(tmp_path / f"w{i}.pt")
        torch.save(net.state_dict(), paths[-1])
    built = [build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "weights_path": str(p), "image_size": 32})
             for p in paths]
    keys = shared_model_keys()
    assert len(keys) == small_model_cache and [k[3] for k in keys] == [str(p) for p in paths[-3:]]  # least recently used went first
    again = build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "weights_path": str(paths[-2]), "image_size": 32})
    assert again.model is built[-2].model and shared_model_keys()[-1][3] == str(paths[-2])  # reused, now most recent
    reloaded = build_embedder({"kind": "timm", "model_name": "resnet10t", "pretrained": False, "weights_path": str(paths[0]), "image_size": 32})
    assert reloaded.model is not built[0].model and reloaded.model_id == built[0].model_id  # evicted: loaded anew, same weights
    assert len(shared_model_keys()) == small_model_cache


@pytest.mark.slow
def test_hot_reloading_many_classifier_versions_keeps_few_loaded(tmp_path, trained_ckpt, small_model_cache):
    import shutil

    from anime_role_detect.recognition.embedder import (
        ClassifierEmbedder,
        load_classifier,
        shared_model_keys,
    )

    versions = []
    for i in range(5):  # five registry versions, each with its own model.ckpt
        (tmp_path / f"v{i}").mkdir()
        versions.append(shutil.copy(trained_ckpt, tmp_path / f"v{i}" / "model.ckpt"))
    loaded = [load_classifier(p, device="cpu") for p in versions]
    assert len(shared_model_keys()) == small_model_cache and all(k[0] == "classifier" for k in shared_model_keys())
    assert load_classifier(versions[-1], device="cpu") is loaded[-1]
    emb = ClassifierEmbedder(str(versions[-1]), device="cpu", batch_size=3)
    assert emb.model is loaded[-1]  # the embedder, model mode and tag head share one network
    imgs = [Image.new("RGB", (40, 60), (i * 40, 80, 160)) for i in range(4)]
    probs, tags = emb.heads(imgs)
    assert probs.shape == (4, len(emb.model.class_names)) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert tags is not None and tags.shape == (4, len(emb.model.tag_names)) and ((tags >= 0) & (tags <= 1)).all()


def test_a_classifier_card_says_what_the_built_classifier_says(tmp_path, trained_ckpt):
    """`read_classifier_card` reads names, series and views from the checkpoint alone, as the network has them; a file
    that is not a checkpoint is a one-line `WeightsError` naming it."""
    from anime_role_detect.recognition.card import read_classifier_card
    from anime_role_detect.recognition.embedder import load_classifier
    from anime_role_detect.recognition.shared import _MODELS

    card, model = read_classifier_card(trained_ckpt), load_classifier(trained_ckpt, device="cpu")
    assert card.class_names == model.class_names and len(card.class_names) >= 2
    assert card.series == model.series and card.tag_names == model.tag_names and card.face_view == model.face_view
    assert read_classifier_card(trained_ckpt) is card  # read once; and no slot of the few networks shared_model keeps:
    assert not any(isinstance(m, type(card)) for m in list(_MODELS.values()))
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"could not be read .*is it a train.py checkpoint") as err:
        read_classifier_card(bad)
    assert "\n" not in str(err.value) and str(bad) in str(err.value)
    with pytest.raises(WeightsError, match="not found"):
        read_classifier_card(tmp_path / "missing.ckpt")
