"""CharacterDataModule: leak-free, stratified, deterministic, reusable split; bad data handled clearly."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from anime_role_detect.data.datamodule import CharacterDataModule
from anime_role_detect.data.transforms import build_eval_transform, build_train_transform
from anime_role_detect.errors import ConfigError, DatasetError


def _dm(root: Path, tmp_path: Path, **kw) -> CharacterDataModule:
    kw.setdefault("split_dir", str(tmp_path / "splits"))
    kw.setdefault("image_size", 64)
    dm = CharacterDataModule(str(root), **kw)
    dm.setup("fit")
    return dm


def test_split_is_stratified_disjoint_and_deterministic(synthetic_root, tmp_path):
    dm = _dm(synthetic_root, tmp_path / "a")
    train, val = {r.file_name for r in dm.train_records}, {r.file_name for r in dm.val_records}
    assert train and val and not train & val
    assert len(train) + len(val) == 8 * 24
    per_char_val = Counter(r.character for r in dm.val_records)
    per_char_all = Counter(r.character for r in dm.train_records + dm.val_records)
    for char, n in per_char_all.items():  # every character is in val with about 20% of its images
        assert 0.1 <= per_char_val[char] / n <= 0.35, (char, per_char_val[char], n)
    again = _dm(synthetic_root, tmp_path / "b")  # fresh manifest folder: recomputed from scratch
    assert [r.file_name for r in again.val_records] == [r.file_name for r in dm.val_records]
    other_seed = _dm(synthetic_root, tmp_path / "c", seed=7)
    assert {r.file_name for r in other_seed.val_records} != val


def test_split_manifest_is_written_and_reused(synthetic_root, tmp_path):
    dm = _dm(synthetic_root, tmp_path)
    manifest = json.loads(dm.split_path.read_text())
    assert sorted(manifest["val"]) == sorted(r.file_name for r in dm.val_records)
    # Move one image from val to train in the manifest: a new data module must follow the file.
    moved = manifest["val"].pop(0)
    manifest["train"].append(moved)
    dm.split_path.write_text(json.dumps(manifest))
    dm2 = _dm(synthetic_root, tmp_path)
    assert moved in {r.file_name for r in dm2.train_records}
    assert moved not in {r.file_name for r in dm2.val_records}


def test_near_duplicates_never_straddle_the_split(tmp_path):
    from anime_role_detect.data.synthetic import generate_dataset

    root = tmp_path / "dups"
    generate_dataset(root, n_characters=3, images_per_character=10, size=96, seed=3)
    copies = []
    for char_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for k, src in enumerate(sorted(char_dir.glob("*.png"))[:4]):  # resized + recompressed copies
            img = Image.open(src).convert("RGB").resize((88, 88))
            dst = char_dir / f"copy_{k}.jpg"
            img.save(dst, quality=85)
            copies.append((f"{char_dir.name}/{src.name}", f"{char_dir.name}/{dst.name}"))
    for seed in range(4):
        dm = _dm(root, tmp_path / f"s{seed}", seed=seed)
        val = {r.file_name for r in dm.val_records}
        for a, b in copies:
            assert (a in val) == (b in val), f"near-duplicates {a} and {b} on different sides (seed {seed})"


def test_unreadable_image_skipped_and_reported_or_error(synthetic_root, tmp_path):
    root = tmp_path / "corrupt"
    shutil.copytree(synthetic_root, root)
    bad = root / "char_00" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    dm = _dm(root, tmp_path / "a")
    assert len(dm.unreadable) == 1 and dm.unreadable[0].startswith("char_00/broken.png")
    assert "char_00/broken.png" not in {r.file_name for r in dm.train_records + dm.val_records}
    x, y, tags, _ = next(iter(dm.train_dataloader()))  # loading never meets the broken file
    assert x.shape[1:] == (3, 64, 64)
    with pytest.raises(DatasetError, match=r"broken\.png.*skip_unreadable"):
        _dm(root, tmp_path / "b", skip_unreadable=False)


def test_missing_and_empty_folders_are_one_line_errors(synthetic_root, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        _dm(tmp_path / "nope", tmp_path)
    root = tmp_path / "empty_class"
    shutil.copytree(synthetic_root, root)
    (root / "nobody").mkdir()
    with pytest.raises(DatasetError, match=r"nobody.*no images"):
        _dm(root, tmp_path)
    with pytest.raises(ConfigError, match="balance"):
        CharacterDataModule(str(root), balance="magic")


def test_batches_carry_labels_and_tags(synthetic_root, tmp_path):
    dm = _dm(synthetic_root, tmp_path, batch_size=8)
    x, y, tags, filed = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 64, 64) and y.dtype == torch.long
    assert torch.equal(filed, torch.nn.functional.one_hot(y, len(dm.class_names)).bool())  # no group pictures here
    assert tags.shape == (8, len(dm.tag_names)) and len(dm.tag_names) > 5
    assert "1girl" in dm.tag_names and tags.sum() > 8  # identity tags from metadata.jsonl reach the batch
    assert set(dm.series.values()) <= {"series_a", "series_b", "series_c"}


def _with_val(dm: CharacterDataModule, names, tmp_path: Path) -> CharacterDataModule:
    """The same folder with `names` moved to the validation side of its saved split (a new data module reads it)."""
    manifest = json.loads(dm.split_path.read_text())
    manifest["train"] = [n for n in manifest["train"] if n not in names]
    manifest["val"] = sorted(set(manifest["val"]) | set(names))
    dm.split_path.write_text(json.dumps(manifest))
    return _dm(dm.root, tmp_path, batch_size=64)


def test_val_batches_mark_every_character_a_group_picture_is_filed_under(group_picture_root, tmp_path):
    """`val/acc` counts naming any character a group picture shows: same bytes or one `multi:` group file a picture
    under each character; a near-duplicate under another character (another picture) stays its own."""
    g = group_picture_root
    cases = [n for pair in g["same_bytes"] for n in pair] + list(g["multi"]) + list(g["near_duplicate"])
    dm = _with_val(_dm(g["root"], tmp_path), cases, tmp_path)
    filed = dict(zip((r.file_name for r in dm.val_records), dm.val_filed))
    assert set(cases) <= set(filed)
    for a, b in g["same_bytes"]:
        assert filed[a] == filed[b] == {"char_00", "char_01"}, (a, filed[a])
    assert filed[g["multi"][0]] == filed[g["multi"][1]] == {"char_01", "char_02"}
    for name in g["near_duplicate"]:
        assert filed[name] == {name.split("/")[0]}, (name, filed[name])
    assert sum(len(c) > 1 for c in filed.values()) == 2 * len(g["same_bytes"]) + 2  # every other picture: its label
    _, y, _, mask = next(iter(dm.val_dataloader()))
    want = torch.tensor([[c in filed[r.file_name] for c in dm.class_names] for r in dm.val_records])
    assert torch.equal(mask, want) and all(mask[i, int(y[i])] for i in range(len(y)))


def test_balancing_modes(synthetic_root, tmp_path):
    root = tmp_path / "skewed"
    shutil.copytree(synthetic_root, root)
    for p in sorted((root / "char_01").glob("*.png"))[6:]:
        p.unlink()  # char_01 now has 6 images, the others 24
    dm = _dm(root, tmp_path, balance="class_weights")
    w = dm.class_weights
    assert w is not None and w[dm.class_to_idx["char_01"]] > 2 * w[dm.class_to_idx["char_00"]]
    dm_s = _dm(root, tmp_path, balance="sampler", batch_size=64)
    ys = torch.cat([b[1] for b in dm_s.train_dataloader()])
    share = (ys == dm_s.class_to_idx["char_01"]).float().mean().item()
    assert share > 0.06  # ~1/8 with the balanced sampler vs 5/150 without


def test_pk_batches_hold_k_pictures_of_p_characters(synthetic_root, tmp_path):
    """balance=pk: every training batch is P characters x K pictures (what a contrastive identity loss needs), a
    skewed character is drawn as often as the others, an epoch is about one pass, and a seed repeats its order."""
    root = tmp_path / "skewed"
    shutil.copytree(synthetic_root, root)
    for p in sorted((root / "char_01").glob("*.png"))[3:]:
        p.unlink()  # char_01: 3 pictures (fewer than K: reused), the others 24
    dm = _dm(root, tmp_path, balance="pk", pk_per_class=4, batch_size=18)  # P = 18 // 4 = 4 characters, 16 a batch
    loader = dm.train_dataloader()
    batches = [b[1] for b in loader]
    n_train = len(dm.train_records)
    assert all(len(y) == 16 for y in batches) and abs(len(batches) * 16 - n_train) < 16
    for y in batches:
        counts = Counter(y.tolist())
        assert len(counts) == 4 and set(counts.values()) == {4}
    seen = Counter(int(c) for y in batches for c in set(y.tolist()))
    assert seen[dm.class_to_idx["char_01"]] >= 0.5 * len(batches) * 4 / len(dm.class_names)
    again = CharacterDataModule(str(root), split_dir=str(tmp_path / "splits"), image_size=64, balance="pk", pk_per_class=4,
                                batch_size=18)
    again.setup("fit")
    sampler, sampler2 = loader.sampler, again.train_dataloader().sampler
    assert list(sampler2) == list(sampler.__class__(sampler.labels, 18, 4, sampler.seed))  # same seed, same first epoch
    with pytest.raises(ConfigError, match="pk_per_class"):
        CharacterDataModule(str(root), balance="pk", pk_per_class=8, batch_size=12)
    with pytest.raises(ConfigError, match="pk_per_class"):
        CharacterDataModule(str(root), balance="pk", pk_per_class=1)


def test_transforms_shapes_and_normalisation():
    img = Image.new("RGB", (120, 90), (255, 0, 0))
    t = build_eval_transform(64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(img)
    assert t.shape == (3, 64, 64)
    assert torch.allclose(t[0], torch.ones(64, 64)) and torch.allclose(t[1], -torch.ones(64, 64))
    aug = build_train_transform(64, augment={"vflip": 1.0, "rotation": 0, "color_jitter": None, "scale": None, "hflip": 0})
    grad = Image.linear_gradient("L").convert("RGB").resize((64, 64))
    out = aug(grad)
    ref = build_eval_transform(64)(grad)
    assert torch.allclose(out, ref.flip(1), atol=1e-5)  # vflip=1.0 always flips


def test_the_torch_free_evaluation_input_is_torchvisions_value_for_value():
    """`framing.eval_array`, which ONNX Runtime recognition runs without torch, and every evaluation transform now run,
    equals torchvision's Resize + CenterCrop + ToTensor + Normalize (and FitSquare + ToTensor + Normalize) exactly, on
    pictures of every shape, so versions trained and validated through torchvision answer as they did."""
    import numpy as np
    from torchvision import transforms as T

    from anime_role_detect.data.framing import FitSquare, eval_array

    rng = np.random.default_rng(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    for w, h in [(128, 128), (300, 200), (200, 300), (97, 511), (224, 224), (225, 224), (1000, 37), (223, 500)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for size in (224, 96):
            reference = {"center_crop": T.Compose([T.Resize(size, antialias=True), T.CenterCrop(size), *tail]),
                         **{m: T.Compose([FitSquare(size, m), *tail]) for m in ("letterbox", "squash")}}
            for mode, tf in reference.items():
                want = tf(img).numpy()
                got = eval_array(img, size, mean, std, mode)
                assert got.dtype == np.float32 and np.array_equal(got, want), (w, h, size, mode, np.abs(got - want).max())
                assert np.array_equal(build_eval_transform(size, mean, std, mode)(img).numpy(), want)


def test_letterbox_keeps_the_whole_figure_and_travels_with_the_checkpoint(tmp_path):
    """data.resize=letterbox: a tall picture keeps its top and bottom (centre crop cuts them); the classifier records
    the framing so recognition preprocesses as evaluation did; a bad value is a one-line error."""
    import torch
    from PIL import Image

    from anime_role_detect.data.transforms import DEFAULT_AUGMENT, build_eval_transform, build_train_transform
    from anime_role_detect.errors import ConfigError
    from anime_role_detect.models.classifier import CharacterClassifier
    from anime_role_detect.recognition.embedder import _classifier_transform

    tall = Image.new("RGB", (40, 160), (0, 0, 255))
    tall.paste((255, 0, 0), (0, 0, 40, 20))  # a red head at the top
    mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    crop = build_eval_transform(32, mean, std)(tall)
    box = build_eval_transform(32, mean, std, "letterbox")(tall)
    assert crop.shape == box.shape == (3, 32, 32)
    assert float(crop[0].max()) < 0.1  # the centre crop lost the head
    assert float(box[0, :4].max()) > 0.9 and float(box[:, :, 0].min()) > 0.9  # head kept, white padding at the sides
    assert build_train_transform(32, mean, std, {"scale": None}, "letterbox")(tall).shape == (3, 32, 32)
    assert DEFAULT_AUGMENT["color_jitter"][3] == 0.0  # hue is identity: no hue jitter by default
    model = CharacterClassifier(["a", "b"], backbone={"name": "resnet10t"}, image_size=32, eval_resize="letterbox")
    model.mean, model.std = mean, std
    assert torch.allclose(_classifier_transform(model)(tall), box)
    with pytest.raises(ConfigError, match="data.resize"):
        build_eval_transform(32, mean, std, "stretch")


def test_train_batches_mark_group_pictures_too(group_picture_root, tmp_path):
    """Training samples carry the same filed-characters mask as validation (what `model.partial_labels` trains on),
    a group copy's face view included; every other picture: its own label alone."""
    g = group_picture_root
    copies = [n for pair in g["same_bytes"] for n in pair]
    dm = _dm(g["root"], tmp_path)
    manifest = json.loads(dm.split_path.read_text())
    manifest["val"] = [n for n in manifest["val"] if n not in copies]
    manifest["train"] = sorted(set(manifest["train"]) | set(copies))
    dm.split_path.write_text(json.dumps(manifest))
    dm = _dm(g["root"], tmp_path)
    filed = dict(zip((r.file_name for r in dm.train_records), dm.train_filed))
    assert all(filed[n] == {"char_00", "char_01"} for n in copies)
    assert dm.add_face_views({copies[0]: [0.0, 0.0, 48.0, 48.0]}) == 1
    ds = dm.train_dataloader().dataset
    assert len(ds) == len(dm.train_records) + 1 and ds.crops[-1] is not None
    for i, r in enumerate(ds.records):
        want = torch.tensor([c in filed[r.file_name] for c in dm.class_names])
        assert torch.equal(ds.filed_vector(i), want), r.file_name
    assert sum(len(f) > 1 for f in filed.values()) >= len(copies)
