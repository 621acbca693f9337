"""The clean stage's treatment of a picture collected under several characters (a booru picture of a group)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from anime_role_detect.data.layout import ImageRecord, stratified_group_split
from anime_role_detect.errors import ConfigError
from anime_role_detect.workflow.clean import CleanConfig, clean_dataset


def _noise(path, seed: int) -> None:
    """A 96 px picture of smooth random blobs: each seed its own perceptual hash."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(small).resize((96, 96), Image.BICUBIC).save(path)


@pytest.fixture()
def raw(tmp_path):
    """Characters a and b with 6 pictures each; a/shared.png and b/shared.png are the same group picture."""
    root = tmp_path / "raw"
    records = []
    for c, base in (("a", 0), ("b", 100)):
        for i in range(6):
            _noise(root / c / f"{i}.png", base + i)
            records.append(ImageRecord(file_name=f"{c}/{i}.png", character=c))
        _noise(root / c / "shared.png", 999)
        records.append(ImageRecord(file_name=f"{c}/shared.png", character=c))
    return root, records


def test_a_group_picture_is_kept_under_each_character_and_always_trains(raw, tmp_path):
    root, records = raw
    kept, report = clean_dataset(records, root, tmp_path / "clean", CleanConfig())
    assert report.multi_character_pictures == 1 and not report.rejected
    by_name = {r.file_name: r for r in kept}
    assert by_name["a/shared.png"].group == by_name["b/shared.png"].group is not None
    for seed in range(10):  # whatever the seed, the group picture never lands among the validation pictures
        split = stratified_group_split(kept, 0.3, seed)
        assert {"a/shared.png", "b/shared.png"} <= set(split.train)
        assert {f.split("/")[0] for f in split.val} == {"a", "b"}


def test_drop_rejects_every_copy_and_says_why(raw, tmp_path):
    root, records = raw
    kept, report = clean_dataset(records, root, tmp_path / "clean", CleanConfig(ambiguous="drop"))
    assert report.multi_character_pictures == 1
    assert {r.file_name for r in kept} == {r.file_name for r in records} - {"a/shared.png", "b/shared.png"}
    assert report.rejected["a/shared.png"].startswith("ambiguous: the same picture is collected for a, b")


def test_a_copy_under_the_same_character_is_still_a_duplicate(raw, tmp_path):
    root, records = raw
    _noise(root / "a" / "shared_again.png", 999)
    records = [*records, ImageRecord(file_name="a/shared_again.png", character="a")]
    kept, report = clean_dataset(records, root, tmp_path / "clean", CleanConfig())
    names = {r.file_name for r in kept}
    assert "b/shared.png" in names and len(names & {"a/shared.png", "a/shared_again.png"}) == 1
    assert list(report.reasons) == ["exact duplicate"]


def test_an_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match=r"clean.ambiguous='merge': choose one of \('keep', 'drop'\)"):
        CleanConfig.from_mapping({"ambiguous": "merge"})
