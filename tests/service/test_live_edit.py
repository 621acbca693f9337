"""Gallery edits on the live recognizer become derived registry versions; the base stays intact and the
open-set calibration is marked stale (it was measured before the gallery changed)."""

from __future__ import annotations

import random

from anime_role_detect.data.synthetic import make_characters, render_character
from anime_role_detect.recognition.embedder import build_embedder
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.recognition.openset import ModeThreshold, OpenSetCalibration
from anime_role_detect.registry import Registry
from anime_role_detect.serve.live import LiveRecognizer

EMBEDDER = {"kind": "timm", "model_name": "resnet10t", "pretrained": False, "image_size": 64}


def _version(tmp_path):
    rng = random.Random(0)
    specs = make_characters(4, seed=0, twin_fraction=0.0)
    emb = build_embedder(EMBEDDER)
    items = [(s.name, s.series, render_character(s, rng, 64)[0], f"{s.name}/{k}") for s in specs[:3] for k in range(3)]
    folder = tmp_path / "built"
    Gallery.build(items, emb, embedder_config=EMBEDDER).save(folder)
    OpenSetCalibration(0.05, {"clip": ModeThreshold(0.5, 0.05, 0.95, 10, 10)}).save(folder)
    reg = Registry(tmp_path / "registry")
    base = reg.import_folder(folder)
    return reg, base, specs[3], rng


def test_enrol_persists_a_derived_version_with_stale_calibration(tmp_path):
    reg, base, newcomer, rng = _version(tmp_path)
    base_meta = (reg.path(base) / "gallery.json").read_text()
    live = LiveRecognizer(reg.root, cfg={"mode": "clip", "rerank": False})
    live.load_now()
    loaded = live.current()
    assert loaded is not None and loaded.recognizer.describe()["calibration"]["stale"] is None
    shots = [render_character(newcomer, rng, 64)[0] for _ in range(3)]
    assert loaded.recognizer.enroll(newcomer.name, newcomer.series, shots) > 0
    vid = live.persist_edit(loaded, kind="enroll", what=newcomer.name)
    assert vid and reg.latest_id() == vid and loaded.version_id == vid
    assert (reg.path(vid) / "parent").read_text().strip() == base and reg.info(vid).kind == "enroll"
    assert (reg.path(base) / "gallery.json").read_text() == base_meta  # the base version is untouched
    new = OpenSetCalibration.load(reg.path(vid))
    assert new.stale and new.stale["reason"] == f"enroll {newcomer.name}" and new.modes["clip"].threshold == 0.5
    assert OpenSetCalibration.load(reg.path(base)).stale is None
    assert loaded.recognizer.describe()["calibration"]["stale"]["since"] == new.stale["since"]
    assert any(c["name"] == newcomer.name for c in Gallery.load(reg.path(vid)).characters())
    assert reg.rollback() == base and reg.latest_id() == base


def test_enrolment_shots_held_out_extend_the_evaluation_set(tmp_path):
    """An enrolled character is evaluated too: shots kept out of the gallery join the derived version's evaluation set."""
    from anime_role_detect.imageio import content_hash
    from anime_role_detect.recognition.evalset import EvalSet

    reg, base, newcomer, rng = _version(tmp_path)
    live = LiveRecognizer(reg.root, cfg={"mode": "clip", "rerank": False})
    live.load_now()
    loaded = live.current()
    shots = [render_character(newcomer, rng, 64)[0] for _ in range(5)]
    loaded.recognizer.enroll(newcomer.name, newcomer.series, shots[:4])
    vid = live.persist_edit(loaded, kind="enroll", what=newcomer.name,
                            evaluate=[(shots[4], newcomer.name, content_hash(shots[4].tobytes()))])
    evalset = EvalSet.load(reg.path(vid))
    assert evalset is not None and evalset.labels == [newcomer.name] and evalset.sources == ["enrol"]
    assert evalset.embedder_id == loaded.recognizer.embedder.model_id
    assert EvalSet.load(reg.path(base)) is None  # the base version is untouched


def test_a_hot_reload_lets_go_of_the_replaced_versions_networks(tmp_path):
    """Each version opens its own ONNX Runtime session (a derived version hard-links the same file under a new path):
    after a reload the process cache holds the served version's networks only, not the replaced one's as well."""
    from anime_role_detect.recognition.onnx_export import export_into
    from anime_role_detect.recognition.shared import shared_model_keys

    reg, base, newcomer, rng = _version(tmp_path)
    folder = tmp_path / "built"
    export_into(folder)
    first = reg.import_folder(folder)
    second = reg.import_folder(folder, promote=False)

    def cached(vid: str) -> list[tuple]:
        root = str(reg.path(vid).resolve())
        return [k for k in shared_model_keys() if any(isinstance(x, str) and x.startswith(root) for x in k)]

    live = LiveRecognizer(reg.root, cfg={"mode": "clip", "rerank": False})
    live.load_now()
    picture = render_character(newcomer, rng, 64)[0]
    assert live.current().version_id == first and live.current().recognizer.recognize(picture).detections
    assert cached(first) and type(live.current().recognizer.embedder).__name__ == "OnnxEmbedder"
    reg.promote(second)
    live.maybe_reload(force=True)
    live._loading.join(60)
    assert live.current().version_id == second and live.current().recognizer.recognize(picture).detections
    assert cached(second) and not cached(first)
