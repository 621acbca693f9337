"""Dataset folder contract and leak-free splits."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from anime_role_detect.data.dedupe import assign_duplicate_groups
from anime_role_detect.data.layout import (
    MULTI_GROUP_PREFIX,
    ImageRecord,
    Split,
    filed_characters,
    read_metadata,
    scan_dataset,
    stratified_group_split,
    tag_vocabulary,
)
from anime_role_detect.errors import ConfigError, DatasetError
from anime_role_detect.fsutil import file_sha256


def test_scan_reads_folders_and_metadata(synthetic_root):
    recs = scan_dataset(synthetic_root)
    assert len(recs) == 8 * 24
    assert len({r.character for r in recs}) == 8
    assert all(r.tags and r.series for r in recs)  # metadata.jsonl merged
    assert "1girl" in tag_vocabulary(recs)


def test_missing_and_empty_folders_give_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    with pytest.raises(DatasetError, match=r"character folder .*a has no images"):
        scan_dataset(tmp_path)
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "a" / "x.png")
    with pytest.raises(DatasetError, match=r"metadata.jsonl:1: malformed"):
        scan_dataset(tmp_path)


def test_split_is_stratified_deterministic_and_disjoint(synthetic_root):
    recs = scan_dataset(synthetic_root)
    s1 = stratified_group_split(recs, 0.2, seed=3)
    s2 = stratified_group_split(list(reversed(recs)), 0.2, seed=3)
    assert s1 == s2
    assert not set(s1.train) & set(s1.val)
    assert len(s1.train) + len(s1.val) == len(recs)
    per_char = Counter(f.split("/")[0] for f in s1.val)
    assert set(per_char) == {r.character for r in recs}
    assert all(4 <= n <= 6 for n in per_char.values())  # 20% of 24, per character
    assert stratified_group_split(recs, 0.2, seed=4) != s1


def test_split_never_cuts_a_group(tmp_path):
    recs = [ImageRecord(file_name=f"c{i % 2}/{i}.png", character=f"c{i % 2}", group=f"g{i // 4}") for i in range(40)]
    s = stratified_group_split(recs, 0.25, seed=0)
    side = {f: "val" for f in s.val} | {f: "train" for f in s.train}
    for g in {r.group for r in recs}:
        assert len({side[r.file_name] for r in recs if r.group == g}) == 1
    path = tmp_path / "split.json"
    s.save(path)
    assert Split.load(path) == s
    with pytest.raises(ConfigError):
        stratified_group_split(recs, 1.5)


def test_a_set_whose_groups_hold_one_character_splits_as_it_always_did():
    """The val pictures of a set without group pictures are pinned: every published figure was measured on them."""
    recs = [ImageRecord(file_name=f"{c}/{i}.png", character=c, group=f"{c}-g{i // 2}" if i < 6 else "")
            for c, n in (("a", 9), ("b", 12), ("c", 5)) for i in range(n)]
    assert stratified_group_split(recs, 0.25, 0).val == ["a/6.png", "a/8.png", "b/10.png", "b/11.png", "b/7.png", "c/4.png"]
    assert stratified_group_split(recs, 0.25, 1).val == ["a/7.png", "a/8.png", "b/10.png", "b/8.png", "b/9.png", "c/4.png"]


def test_a_group_picture_is_filed_under_every_character_it_was_collected_for(tmp_path):
    """Copies with the same bytes in two folders, or one `multi:` group the clean stage wrote, name all their characters;
    a picture of one character alone names that one (a re-encoded copy under one character stays its own)."""
    def save(name: str, colour: tuple[int, int, int]) -> None:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)

    save("a/group.png", (200, 0, 0))
    save("b/group.png", (200, 0, 0))  # the same bytes: one booru post tagged a and b
    save("a/alone.png", (0, 200, 0))
    save("b/alone.png", (0, 0, 200))
    save("c/tagged.png", (9, 9, 9))
    save("b/tagged.png", (9, 9, 10))  # different bytes, but the clean stage grouped them as one picture
    recs = [ImageRecord(file_name=f, character=f.split("/")[0]) for f in ("a/group.png", "b/group.png", "a/alone.png", "b/alone.png")]
    recs += [ImageRecord(file_name=f, character=f.split("/")[0], group=f"{MULTI_GROUP_PREFIX}b/tagged.png") for f in ("c/tagged.png", "b/tagged.png")]
    shows = filed_characters(recs, [file_sha256(tmp_path / r.file_name) for r in recs])
    assert shows["a/group.png"] == shows["b/group.png"] == {"a", "b"}
    assert shows["a/alone.png"] == {"a"} and shows["b/alone.png"] == {"b"}
    assert shows["c/tagged.png"] == shows["b/tagged.png"] == {"b", "c"}


def test_planted_near_duplicates_share_a_group_and_one_side(tmp_path, synthetic_root):
    recs = scan_dataset(synthetic_root)[:48]
    root = synthetic_root
    # plant resized + recompressed copies of 6 images under new names
    planted = []
    for r in recs[:48:8]:
        img = Image.open(r.path(root)).convert("RGB").resize((80, 80))
        name = r.file_name.replace(".png", "_copy.jpg")
        img.save(root / name, quality=70)
        planted.append((r.file_name, name))
    try:
        all_recs = scan_dataset(root)
        report = assign_duplicate_groups(all_recs, root)
        assert report.near_duplicate_groups >= len(planted)
        by_name = {r.file_name: r for r in all_recs}
        for a, b in planted:
            assert by_name[a].group and by_name[a].group == by_name[b].group
        s = stratified_group_split(all_recs, 0.2, seed=0)
        val = set(s.val)
        for a, b in planted:
            assert (a in val) == (b in val)
    finally:
        for _, b in planted:
            (root / b).unlink()


def test_metadata_roundtrip(tmp_path):
    from anime_role_detect.data.layout import write_metadata

    recs = [ImageRecord("a/1.png", "a", "S", ["x", "y"], "src", "g")]
    write_metadata(tmp_path, recs)
    assert read_metadata(tmp_path)["a/1.png"] == recs[0]
    assert json.loads((tmp_path / "metadata.jsonl").read_text())["file_name"] == "a/1.png"
