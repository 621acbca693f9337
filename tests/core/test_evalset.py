"""A version's evaluation set: stored with the version, extended by derived versions, and the ground
on which `registry compare` puts two versions side by side."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from anime_role_detect.errors import GalleryError
from anime_role_detect.data.layout import characters_per_key
from anime_role_detect.recognition.evalset import EvalSet, compare_versions, score_answers, score_gallery
from anime_role_detect.registry import Registry
from anime_role_detect.registry.__main__ import main as registry_main

EMBEDDER = {"kind": "timm", "model_name": "efficientnet_lite0_offline", "pretrained": True, "image_size": 64}


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """A: 3 characters; B: the same gallery with one character's rows gone (worse on it). Both carry A's eval set."""
    from anime_role_detect.data.synthetic import make_characters, render_character
    from anime_role_detect.recognition.embedder import build_embedder
    from anime_role_detect.recognition.gallery import Gallery

    root = tmp_path_factory.mktemp("evalset")
    rng = random.Random(0)
    specs = make_characters(3, seed=1, twin_fraction=0.0)
    emb = build_embedder(EMBEDDER)
    items = [(s.name, s.series, render_character(s, rng, 64)[0], f"{s.name}/{k}") for s in specs for k in range(5)]
    gallery = Gallery.build(items, emb, embedder_config=EMBEDDER)
    probes, labels, paths = [], [], []
    for s in specs:
        for k in range(4):
            img = render_character(s, random.Random(100 + k), 64)[0]
            p = root / "val" / s.name / f"{k}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            img.save(p)
            probes.append(img), labels.append(s.name), paths.append(str(p))
    evalset = EvalSet(emb.embed(probes), labels, emb.model_id, sha256=[f"h{i}" for i in range(len(labels))], paths=paths)
    reg = Registry(root / "registry")
    with reg.derive(None, kind="test", promote=True) as d:
        gallery.save(d.dir)
        evalset.save(d.dir)
    with reg.derive(d.id, kind="test") as worse:
        g = Gallery.load(reg.path(d.id))
        g.remove(specs[0].name)
        g.save(worse.dir)
    return reg, d.id, worse.id, specs[0].name, evalset


def test_eval_set_round_trip_and_extend(tmp_path, two_versions):
    reg, a, b, _, evalset = two_versions
    loaded = EvalSet.load(reg.path(a))
    assert loaded is not None and loaded.labels == evalset.labels and loaded.embedder_id == evalset.embedder_id
    np.testing.assert_array_equal(loaded.embeddings, evalset.embeddings)
    assert EvalSet.load(reg.path(b)).paths == evalset.paths  # a derived version inherits it
    more = EvalSet(evalset.embeddings[:2], ["new_girl", "new_girl"], evalset.embedder_id, sha256=["x1", "h0"], sources=["enrol"] * 2)
    both = loaded.extend(more)
    assert len(both) == len(loaded) + 2 and both.sources[-1] == "enrol"
    assert len(both.extend(more)) == len(both)  # same pictures are not added twice
    other = EvalSet(evalset.embeddings[:1], ["a"], "another-embedder")
    with pytest.raises(GalleryError, match="cannot be merged"):
        loaded.extend(other)
    assert EvalSet.load(tmp_path) is None


def test_compare_shows_the_worse_version_on_the_same_pictures(two_versions, capsys):
    reg, a, b, removed, evalset = two_versions
    from anime_role_detect.recognition.gallery import Gallery

    figures_a = score_gallery(Gallery.load(reg.path(a)), evalset)
    assert figures_a["top1"] >= 0.9 and figures_a["per_character"][removed] >= 0.75
    report = compare_versions(reg.path(a), reg.path(b), {"rerank": False})
    assert report["by"] == "images" and report["pictures"] == len(evalset) and report["modes"] == ["clip"]
    sa, sb = report["a_scores"]["clip"], report["b_scores"]["clip"]
    assert sb["per_character"][removed] == 0.0 < sa["per_character"][removed] and sb["top1"] < sa["top1"]
    assert registry_main(["--root", str(reg.root), "compare", a, b]) == 0
    out = capsys.readouterr().out
    assert f"{removed}" in out and "<- B worse" in out
    assert registry_main(["--root", str(reg.root), "compare", a, b, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["b_scores"]["clip"]["per_character"][removed] == 0.0


def test_a_group_picture_answered_as_another_character_it_shows_is_right():
    """Copies of one picture filed under a and b (one content hash, two labels): naming b is right for the copy labelled a
    too; a picture of a alone answered b stays wrong, and without hashes every copy counts against its label only."""
    labels, shas = ["a", "b", "a", "c"], ["h1", "h1", "h2", ""]
    assert characters_per_key(labels, shas) == [{"a", "b"}, {"a", "b"}, {"a"}, {"c"}]
    answers = [("b", 0.9), ("b", 0.9), ("b", 0.8), ("c", 0.7)]
    grouped = score_answers(labels, answers, threshold=0.75, sha256=shas)
    plain = score_answers(labels, answers, threshold=0.75)
    assert grouped["top1"] == 0.75 and plain["top1"] == 0.5
    assert grouped["per_character"] == {"a": 0.5, "b": 1.0, "c": 1.0}
    assert grouped["top1_open_set"] == 0.5 and grouped["false_reject"] == 0.25  # c's right answer falls under 0.75


def test_compare_without_an_eval_set_is_a_one_line_error(tmp_path, capsys):
    reg = Registry(tmp_path)
    ids = []
    for _ in range(2):
        with reg.derive(None, kind="test") as d:
            (d.dir / "gallery.json").write_text("{}")
        ids.append(d.id)
    assert registry_main(["--root", str(tmp_path), "compare", *ids]) == 2
    err = capsys.readouterr().err
    assert "carries an evaluation set" in err and err.count("\n") == 1
