"""A short real training run: beats chance, leaves a self-contained checkpoint and a report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from anime_role_detect.data.transforms import build_eval_transform
from anime_role_detect.errors import WeightsError
from anime_role_detect.training.evaluation import write_report
from anime_role_detect.models.classifier import CharacterClassifier

pytestmark = pytest.mark.slow


def test_short_run_clearly_beats_chance(trained_run):
    m = trained_run.metrics
    chance = 1 / 8
    assert m["val/acc"] >= 3 * chance, m  # 8 characters incl. near-twins: chance is 12.5%
    assert m["images"] >= 32 and m["classes"] == 8
    out = Path(trained_run.output_dir)
    for name in ("metrics.json", "per_character.csv", "per_character.md", "confusion_matrix.png", "learning_curves.png", "config.yaml"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["accuracy"] == m["accuracy"] and len(saved["confusion_matrix"]) == 8
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out / "learning_curves.png") as curves:  # drawn from the CSV logger's metrics.csv
        assert curves.format == "PNG" and curves.width >= 600 and curves.height >= 200, (curves.format, curves.size)
    assert "| **overall** |" in (out / "per_character.md").read_text()
    assert 0.0 <= saved["tag_map"] <= 1.0 and saved["top5_accuracy"] >= saved["accuracy"]


def test_checkpoint_reloads_self_contained_with_identical_logits(trained_run, synthetic_root):
    from anime_role_detect.data.layout import scan_dataset
    from anime_role_detect.imageio import load_image

    model = CharacterClassifier.load_from_checkpoint(trained_run.ckpt_path, map_location="cpu").eval()
    again = CharacterClassifier.load_from_checkpoint(trained_run.ckpt_path, map_location="cpu").eval()
    assert model.class_names == [f"char_{i:02d}" for i in range(8)]
    assert set(model.series) == set(model.class_names) and all(model.series.values())
    assert "1girl" in model.tag_names and model.image_size == 64
    assert len(model.mean) == 3 and len(model.std) == 3
    assert model.hparams.run_config["data"]["image_size"] == 64  # the resolved run config travels along
    tf = build_eval_transform(model.image_size, model.mean, model.std)
    recs = scan_dataset(synthetic_root)[:5]
    x = torch.stack([tf(load_image(r.path(synthetic_root))) for r in recs])
    with torch.no_grad():
        c1, t1 = model(x)
        c2, t2 = again(x)
        emb = model.embed(x)
    assert torch.equal(c1, c2) and torch.equal(t1, t2)
    assert c1.shape == (5, 8) and t1.shape == (5, len(model.tag_names))
    assert emb.shape == (5, model.embed_dim) and emb.abs().sum() > 0


def test_checkpoint_errors_are_weights_errors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        CharacterClassifier.load_from_checkpoint(tmp_path / "missing.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="could not be loaded"):
        CharacterClassifier.load_from_checkpoint(bad)


def test_write_report_files(tmp_path):
    m = write_report(tmp_path, ["a", "b", "c"], [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], {"note": "x"})
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    assert m["per_character"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert m["confusion_matrix"][0] == [1, 1, 0] and m["note"] == "x"
    rows = (tmp_path / "per_character.csv").read_text().splitlines()
    assert rows[0].startswith("character,images,correct,accuracy") and rows[1].startswith("a,2,1,0.5,b")


def test_filed_accuracy_counts_any_character_a_picture_is_filed_under():
    """A group picture's copy named as another character it shows is right (top-1 and top-k); per character by label."""
    from torchmetrics.classification import MulticlassAccuracy

    from anime_role_detect.models.filed_accuracy import FiledAccuracy

    logits = torch.tensor([[5.0, 1, 0, 0], [5.0, 1, 0, 0], [0, 5.0, 1, 0], [0, 0, 1, 5.0]])
    y = torch.tensor([0, 1, 2, 2])
    filed = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]).bool()  # rows 0-1: one picture's copies
    metric = FiledAccuracy(4, top_k=2)
    metric.update(logits, y, filed)
    out = metric.compute()
    assert out["acc"].item() == 0.5 and out["acc_top_k"].item() == 1.0
    assert out["per_class"][:3].tolist() == [1.0, 1.0, 0.0] and torch.isnan(out["per_class"][3])
    assert MulticlassAccuracy(num_classes=4, average="micro")(logits, y).item() == 0.25  # each copy on its label
    plain = FiledAccuracy(4, top_k=2)
    plain.update(logits, y)  # without a mask: the label alone
    assert plain.compute()["acc"].item() == 0.25


def test_partial_label_loss_asks_only_for_one_of_the_filed_characters():
    """`filed_cross_entropy`: a picture filed under one character is plain cross-entropy (class weights and label
    smoothing included, the same number); a group picture's copy answered as another character it shows costs little,
    where its own label alone would cost a lot."""
    import torch.nn.functional as F

    from anime_role_detect.models.filed_accuracy import filed_cross_entropy

    torch.manual_seed(0)
    logits, y, w = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]), torch.rand(4) + 0.5
    one = F.one_hot(y, 4).bool()
    for weight in (None, w):
        for smoothing in (0.0, 0.1):
            assert torch.equal(filed_cross_entropy(logits, y, one, weight, smoothing), F.cross_entropy(logits, y, weight=weight, label_smoothing=smoothing))
    group = one.clone()
    group[0, 1] = True  # row 0 is filed under characters 0 and 1
    p = logits.softmax(-1)
    want = (-(p[0, 0] + p[0, 1]).log() - sum(p[i, y[i]].log() for i in range(1, 6))) / 6
    assert filed_cross_entropy(logits, y, group).item() == pytest.approx(want.item(), rel=1e-5)
    sure = torch.tensor([[-8.0, 8.0, -8.0, -8.0]])  # the copy filed under 0 and 1, named 1
    assert filed_cross_entropy(sure, y[:1], group[:1]).item() < 1e-3 and F.cross_entropy(sure, y[:1]).item() > 10


def test_validation_tag_map_leaves_out_tags_no_validation_picture_carries(recwarn):
    """`val/tag_map` (logged every epoch) is the report's `tag_map` on the same pictures: a tag absent from the
    validation side is left out, not scored 0 (torchmetrics' own AP, with a warning), and two batches add up."""
    import numpy as np

    from anime_role_detect.models.tag_metrics import TagMeanAveragePrecision
    from anime_role_detect.training.evaluation import tag_map

    torch.manual_seed(0)
    probs = torch.rand(12, 5)
    target = (torch.rand(12, 5) > 0.5).long()
    target[:, 3] = 0  # no validation picture carries tag 3
    metric = TagMeanAveragePrecision(5)
    metric.update(probs[:7], target[:7])
    metric.update(probs[7:], target[7:])
    got = metric.compute().item()
    assert got == pytest.approx(tag_map(target.numpy(), probs.numpy()), abs=1e-6)
    kept = [j for j in range(5) if j != 3]
    assert got == pytest.approx(float(np.mean([tag_map(target[:, [j]].numpy(), probs[:, [j]].numpy()) for j in kept])))
    assert not [w for w in recwarn if "No positive samples" in str(w.message)]
    empty = TagMeanAveragePrecision(2)
    empty.update(probs[:3, :2], torch.zeros(3, 2, dtype=torch.long))
    assert torch.isnan(empty.compute())  # nothing to score: the classifier logs no val/tag_map


def test_validation_accuracy_reads_group_pictures_as_the_version_does(group_picture_root, tmp_path, compose_cfg, tiny):
    """A run whose validation side holds a group picture's copies (same bytes, filed under char_00 and char_01):
    `val/acc`, the checkpoint it picks and metrics.json count naming either character as right; `accuracy_strict`
    scores each copy on its own label."""
    import numpy as np

    from anime_role_detect.data.datamodule import CharacterDataModule
    from anime_role_detect.training import train
    from anime_role_detect.training.evaluation import predict_loader, read_epoch_metrics

    torch.set_num_threads(1)
    g = group_picture_root
    dm = CharacterDataModule(str(g["root"]), image_size=64, split_dir=str(tmp_path / "splits"), seed=42, val_fraction=0.2)
    dm.setup("fit")
    copies = [n for pair in g["same_bytes"] for n in pair]
    others = {*g["multi"], *g["near_duplicate"]}  # trained on: the copy pairs are the only group pictures in val
    manifest = json.loads(dm.split_path.read_text())
    manifest["train"] = sorted({n for n in manifest["train"] if n not in copies} | (others & set(manifest["val"])))
    manifest["val"] = sorted((set(manifest["val"]) - others) | set(copies))
    dm.split_path.write_text(json.dumps(manifest))
    cfg = compose_cfg(tiny(tmp_path, g["root"], epochs=4) + [f"paths.output_dir={tmp_path / 'out'}", "model.optimizer.lr=3e-3",
                                                              f"data.split_dir={tmp_path / 'splits'}", "data.seed=42", "data.val_fraction=0.2"])
    result = train(cfg)
    m = result.metrics
    model = CharacterClassifier.load_from_checkpoint(result.ckpt_path, map_location="cpu")
    assert model.partial_labels  # the default: the training side's multi: pair trains towards either character
    dm = CharacterDataModule(str(g["root"]), image_size=64, split_dir=str(tmp_path / "splits"), seed=42, val_fraction=0.2,
                             mean=model.mean, std=model.std)
    dm.setup("fit")
    pred = predict_loader(model, dm.val_dataloader())
    names = [r.file_name for r in dm.val_records]
    assert set(copies) <= set(names)
    at = {n: i for i, n in enumerate(names)}
    pair_preds = [(int(pred["y_pred"][at[a]]), int(pred["y_pred"][at[b]])) for a, b in g["same_bytes"]]
    assert all(p == q for p, q in pair_preds)  # one picture, one answer
    named_either = sum(p in (0, 1) for p, _ in pair_preds)
    assert named_either >= 1, pair_preds  # a run this short still names char_00's own pictures as char_00 or char_01
    strict = float(np.mean(pred["y_true"] == pred["y_pred"]))
    n = len(names)
    assert m["accuracy_strict"] == pytest.approx(strict, abs=1e-6)
    # each copy pair named as either character: both copies right, where the label alone counts one of them
    assert m["accuracy"] == pytest.approx(strict + named_either / n, abs=1e-6) and m["val/acc"] == m["accuracy"]
    curves = read_epoch_metrics(next(Path(result.output_dir).rglob("metrics.csv")))
    val_acc = [e["val/acc"] for e in curves.values() if "val/acc" in e]
    assert len(val_acc) >= 2 and all("val/acc_strict" in e for e in curves.values() if "val/acc" in e)
    assert max(val_acc) == pytest.approx(m["accuracy"], abs=1e-4)  # the checkpoint kept is the best by this reading
    train_acc = [(e["train/acc"], e["train/acc_strict"]) for e in curves.values() if "train/acc" in e]
    assert len(train_acc) >= 2 and all(a >= s for a, s in train_acc)  # the training side's multi: pair read the same way


def test_default_run_trains_channels_last_and_its_checkpoint_reloads(trained_run):
    """The default callbacks train with channels-last weights (oneDNN's faster CPU layout: about 1.5x the training
    images/s, benchmarks/cpu_layouts.py); the checkpoint holds the same values and loads into a fresh model."""
    ckpt = torch.load(trained_run.ckpt_path, map_location="cpu", weights_only=False)
    convs = {k: v for k, v in ckpt["state_dict"].items() if v.ndim == 4}
    assert convs and all(v.is_contiguous(memory_format=torch.channels_last) for v in convs.values())
    assert any(not v.is_contiguous() for v in convs.values())  # a k x k convolution over several channels: moved
    model = CharacterClassifier.load_from_checkpoint(trained_run.ckpt_path, map_location="cpu")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in convs.items())


def test_ema_callback_saves_the_averaged_weights(tmp_path, synthetic_root, compose_cfg, tiny):
    """`callbacks=[default,ema]`: the checkpoint's state_dict (what evaluation, the gallery and the registry load) holds
    the moving average of the weights, the raw weights stay beside it, and the run still learns."""
    from anime_role_detect.training import train

    torch.set_num_threads(1)
    cfg = compose_cfg(tiny(tmp_path, synthetic_root, epochs=4)
                  + ["callbacks=[default,ema]", f"paths.output_dir={tmp_path / 'out'}",
                     "model.optimizer.lr=3e-3"])
    assert cfg.callbacks.ema.horizon == 0.1
    result = train(cfg)
    ckpt = torch.load(result.ckpt_path, map_location="cpu", weights_only=False)
    averaged, raw = ckpt["state_dict"], ckpt["current_model_state"]
    name = next(k for k, v in averaged.items() if k.startswith("backbone.") and v.dtype.is_floating_point and v.numel() > 100)
    assert not torch.equal(averaged[name], raw[name])
    model = CharacterClassifier.load_from_checkpoint(result.ckpt_path, map_location="cpu")
    assert torch.equal(model.state_dict()[name], averaged[name])
    assert result.metrics["val/acc"] >= 2 / 8, result.metrics
    from anime_role_detect.errors import ConfigError
    from anime_role_detect.training.ema import RunLengthEMA

    with pytest.raises(ConfigError, match="horizon=0"):
        RunLengthEMA(horizon=0)
