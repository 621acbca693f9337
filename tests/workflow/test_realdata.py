"""The local collector and cleaning on the real images in ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import workflow_config

from anime_role_detect.data.dedupe import near_duplicate_clusters, perceptual_hash
from anime_role_detect.data.layout import Split, read_metadata
from anime_role_detect.fsutil import file_sha256
from anime_role_detect.imageio import load_image
from anime_role_detect.workflow.progress import Progress
from anime_role_detect.workflow.run import run_workflow

pytestmark = pytest.mark.realdata


def test_real_near_duplicates_are_removed_before_the_split(shared_data, tmp_path):
    names = ["Gojo_Satoru", "Hua_Cheng", "Rintarou_Okabe"]
    cfg = workflow_config(tmp_path, None, [{"name": n} for n in names],
                          ["collector=local", f"collector.root={shared_data / 'mixed5'}", "stop_after=split", "clean.min_side=64",
                           "clean.near_duplicates=remove"])
    result = run_workflow(cfg, Progress(log=False))
    run_dir = Path(result.run_dir)
    report = json.loads((run_dir / "clean_report.json").read_text())
    assert report["reasons"].get("near-duplicate", 0) >= 10  # mixed5 holds re-encoded copies of the same pictures
    dataset = run_dir / "dataset"
    meta = read_metadata(dataset)
    split = Split.load(dataset / "split.json")
    assert set(split.train) | set(split.val) == set(meta)
    # Independent check: no kept train image is within the pHash threshold of a kept val image.
    files = sorted(meta)
    hashes = [perceptual_hash(load_image(dataset / f)) for f in files]
    side = {**{f: 0 for f in split.train}, **{f: 1 for f in split.val}}
    clusters = near_duplicate_clusters(hashes, int(cfg.clean.max_distance))
    sides_per_cluster: dict[int, set[int]] = {}
    for f, c in zip(files, clusters):
        sides_per_cluster.setdefault(c, set()).add(side[f])
    assert all(len(s) == 1 for s in sides_per_cluster.values())
    rows = {r["character"]: r for r in result.summary}
    assert set(rows) == set(names) and all(r["val"] >= 8 for r in rows.values())


def test_crop_with_the_anime_face_detector_on_real_illustrations(shared_data, tmp_path):
    names = ["suzukaze_aoba", "takimoto_hifumi"]
    cfg = workflow_config(tmp_path, None, [{"name": n, "limit": 12} for n in names],
                          ["collector=local", f"collector.root={shared_data / 'newgame_full'}", "stop_after=clean",
                           "clean.crop.enabled=true", "clean.crop.keep_uncropped=false", "clean.crop.margin=0.3",
                           "min_images_per_character=2"])
    result = run_workflow(cfg, Progress(log=False))
    run_dir = Path(result.run_dir)
    meta = read_metadata(run_dir / "dataset")
    report = json.loads((run_dir / "clean_report.json").read_text())
    assert meta and all(f.endswith(".png") for f in meta)  # crops are saved as PNG
    for f, rec in meta.items():
        crop = load_image(run_dir / "dataset" / f)
        original = load_image(next((run_dir / "raw" / rec.character).glob(f"{Path(f).stem}.*")))
        assert crop.size[0] * crop.size[1] < original.size[0] * original.size[1]
    assert report["reasons"].get("no character found by the detector", 0) + len(meta) + sum(
        v for k, v in report["reasons"].items() if k != "no character found by the detector") == 24


def test_real_group_pictures_are_kept_for_each_character_on_one_side_of_the_split(shared_data, tmp_path):
    """newgame_full files 28 booru pictures under both toyama_rin and yagami_kou: the workflow keeps each under both,
    every copy on one side of the split (checked on the files' bytes, not on the groups clean wrote)."""
    names = ["toyama_rin", "yagami_kou"]
    cfg = workflow_config(tmp_path, None, [{"name": n} for n in names],
                          ["collector=local", f"collector.root={shared_data / 'newgame_full'}", "stop_after=split"])
    run_dir = Path(run_workflow(cfg, Progress(log=False)).run_dir)
    report = json.loads((run_dir / "clean_report.json").read_text())
    assert report["multi_character_pictures"] >= 20 and "ambiguous" not in report["reasons"]
    dataset = run_dir / "dataset"
    split = Split.load(dataset / "split.json")
    train = set(split.train)
    copies: dict[str, list[str]] = {}
    for f in read_metadata(dataset):
        copies.setdefault(file_sha256(dataset / f), []).append(f)
    shared = [fs for fs in copies.values() if len({f.split("/")[0] for f in fs}) > 1]
    assert len(shared) >= 20
    assert all(len({f in train for f in fs}) == 1 for fs in shared)
    assert {f.split("/")[0] for f in split.val} == set(names)
