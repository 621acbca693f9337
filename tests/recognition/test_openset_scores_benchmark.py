"""benchmarks/openset_scores.py scores val pictures against a version's gallery with rows left out (the val rows, as
the build calibrated on them; or a picture's own copies, against the final gallery). Its per-character scores must be
the gallery's own (`balanced` depths included), and leaving a row out must equal searching a gallery built without
it; otherwise the rules it compares are measured on scores no version gives."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest

from anime_role_detect.recognition.aggregate import BALANCED
from anime_role_detect.recognition.gallery import Gallery

from .test_gallery_balanced import DIM, built, look_alikes


@pytest.fixture(scope="module")
def openset_scores(project_root: Path):
    """benchmarks/openset_scores.py as a module (it imports its neighbours `_common` and `accuracy` by name)."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(project_root / "benchmarks"))
    try:
        yield importlib.import_module("openset_scores")
    finally:
        mp.undo()


def search_scores(g: Gallery, queries: np.ndarray, names: list[str]) -> np.ndarray:
    out = np.full((len(queries), len(names)), -1.0)
    for i, cands in enumerate(g.search(queries, k=len(names))):
        for c, _, s in cands:
            out[i, names.index(c)] = s
    return out


def test_scores_with_nothing_left_out_are_the_gallerys_own(openset_scores):
    rows, _, near_big = look_alikes()
    queries = np.concatenate([near_big, rows["other"][:10]])
    g = built(BALANCED, rows)
    names = sorted(rows)
    got = openset_scores.cosines_leaving_out(queries, g, names, [set()] * len(queries))
    want = search_scores(g, queries, names)
    named = want > -1.0  # the search fetches a query's nearest rows: a far character may go unnamed (scored -1 here)
    assert named.any(0).all()  # both characters are scored somewhere
    np.testing.assert_allclose(got[named], want[named], atol=1e-5)


def test_leaving_a_picture_out_scores_it_as_a_gallery_without_that_row(openset_scores):
    rows, _, _ = look_alikes(seed=1)
    g = built(BALANCED, rows)
    names = sorted(rows)
    query = rows["other"][:1]  # a stored row: with it in the gallery its own character scores it near 1
    kept = {"big": rows["big"], "other": rows["other"][1:]}
    without = Gallery("test:emb", DIM, index={"type": "flat"}, aggregate=BALANCED)
    for c, vs in kept.items():
        without.add(c, "s", vs)
    without.reference_rows, without.depths = g.reference_rows, dict(g.depths)  # the depths fixed when `g` was built
    left_out = openset_scores.cosines_leaving_out(query, g, names, [{"other/0"}])
    kept_in = openset_scores.cosines_leaving_out(query, g, names, [set()])
    np.testing.assert_allclose(left_out, search_scores(without, query, names), atol=1e-5)
    assert left_out[0, names.index("other")] < kept_in[0, names.index("other")]  # its own row no longer lifts it
    assert left_out[0, names.index("big")] == pytest.approx(kept_in[0, names.index("big")])
