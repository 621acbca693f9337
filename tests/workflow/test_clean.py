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


def test_a_group_picture_is_kept_under_each_character_on_one_side_of_the_split(raw, tmp_path):
    root, records = raw
    kept, report = clean_dataset(records, root, tmp_path / "clean", CleanConfig())
    assert report.multi_character_pictures == 1 and not report.rejected
    by_name = {r.file_name: r for r in kept}
    assert by_name["a/shared.png"].group == by_name["b/shared.png"].group is not None
    for seed in range(10):  # whatever the seed, both copies fall on one side
        split = stratified_group_split(kept, 0.3, seed)
        assert len({"a/shared.png", "b/shared.png"} & set(split.train)) in (0, 2)
        assert {f.split("/")[0] for f in split.val} == {"a", "b"}


def test_drop_rejects_every_copy_and_says_why(raw, tmp_path):
    root, records = raw
    kept, report = clean_dataset(records, root, tmp_path / "clean", CleanConfig(ambiguous="drop"))
    assert report.multi_character_pictures == 1
    assert {r.file_name for r in kept} == {r.file_name for r in records} - {"a/shared.png", "b/shared.png"}
    assert report.rejected["a/shared.png"].startswith("ambiguous: the same picture is collected for a, b")


@pytest.mark.parametrize("near_duplicates", ["remove", "group"])
def test_a_copy_under_the_same_character_follows_the_near_duplicate_mode(raw, tmp_path, near_duplicates):
    root, records = raw
    _noise(root / "a" / "shared_again.png", 999)
    records = [*records, ImageRecord(file_name="a/shared_again.png", character="a")]
    kept, report = clean_dataset(records, root, tmp_path / "clean", CleanConfig(near_duplicates=near_duplicates))
    by_name = {r.file_name: r for r in kept}
    copies = {"a/shared.png", "a/shared_again.png", "b/shared.png"} & set(by_name)
    if near_duplicates == "remove":  # one copy per character
        assert len(copies) == 2 and "b/shared.png" in copies and list(report.reasons) == ["exact duplicate"]
    else:  # every copy, all in the group picture's split group
        assert len(copies) == 3 and not report.rejected
    assert len({by_name[f].group for f in copies}) == 1


def test_an_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match=r"clean.ambiguous='merge': choose one of \('keep', 'drop'\)"):
        CleanConfig.from_mapping({"ambiguous": "merge"})
