"""End to end on synthetic characters: a tiny classifier trained in the session, a gallery built from it, real Faiss.

Covers the promises users rely on: gallery and model modes well above chance, reranking helps near-twins,
unseen characters are "unknown", a saved+loaded gallery answers identically, enroll/remove without
retraining, the content-hash cache, the feature sink, and bad uploads as one-line errors.
"""

from __future__ import annotations

import io
import random
import shutil

import numpy as np
import pytest
from PIL import Image

from anime_role_detect.data.synthetic import (
    CharacterSpec,
    load_characters,
    render_character,
)
from anime_role_detect.errors import ConfigError, GalleryError, ImageError, WeightsError
from anime_role_detect.recognition.aggregate import BALANCED
from anime_role_detect.recognition.device import resolve_device
from anime_role_detect.recognition.gallery import Gallery
from anime_role_detect.recognition.openset import gallery_probabilities
from anime_role_detect.recognition.pipeline import MIRROR_SUFFIX, Recognizer
from anime_role_detect.recognition.schema import UNKNOWN, Answer
from anime_role_detect.recognition.tagger import is_own_tag_head

from .helpers import TRAIN_CHARS, infer_cfg

pytestmark = pytest.mark.slow


def accuracy(answers: list[Answer], labels: list[str]) -> float:
    return float(np.mean([a.role == y for a, y in zip(answers, labels)]))


@pytest.fixture(scope="module")
def recognizer(version_dir, onnx_tagger) -> Recognizer:
    return Recognizer.from_version(version_dir, infer_cfg(onnx_tagger))


@pytest.fixture(scope="module")
def closed_set(version_dir, onnx_tagger) -> Recognizer:
    """The same folder with open-set rejection off: pure top-1 accuracy."""
    return Recognizer.from_version(version_dir, {**infer_cfg(onnx_tagger), "openset": {"enabled": False}})


def test_version_folder_has_the_contract_files(version_dir):
    for name in ("gallery.faiss", "gallery.rows.npz", "gallery.json", "tag_profiles.json", "calibration.json", "model.ckpt"):
        assert (version_dir / name).is_file(), name


@pytest.mark.parametrize("mode", ["clip", "model", "fusion"])
def test_every_mode_is_well_above_chance(closed_set, test_images, mode):
    images, labels = [(im, f"{i}.png") for i, (im, _) in enumerate(test_images)], [y for _, y in test_images]
    answers = closed_set.recognize_batch(images, mode=mode, rerank=False)
    acc = accuracy(answers, labels)
    assert acc >= 0.5, f"{mode} top-1 {acc:.2f} (chance {1 / TRAIN_CHARS:.2f})"
    a = answers[0]
    assert a.mode == mode and a.whole_image and len(a.detections) == 1
    assert a.series.startswith("series_") or a.role == UNKNOWN
    stage = "forward" if mode == "fusion" else "embed" if mode == "clip" else "classify"  # fusion: one shared backbone pass
    assert {stage, "total"} <= set(a.timings_ms)
    assert a.detections[0].topk[0].score >= a.detections[0].topk[-1].score


def _twin_renders(rec_data, twin_pairs) -> tuple[list[tuple[Image.Image, str]], list[str]]:
    """12 fresh renders of every character that has a near-twin, with their names."""
    assert twin_pairs, "the synthetic set must contain near-twins"
    specs = {s.name: s for s in load_characters(rec_data)}
    rng = random.Random(99)
    names = sorted({n for pair in twin_pairs for n in pair})
    items = [(render_character(specs[n], rng, 96)[0], n) for n in names for _ in range(12)]
    return [(im, f"{n}.png") for im, n in items], [n for _, n in items]


def test_reranking_raises_accuracy_on_near_twins(closed_set, rec_data, twin_pairs):
    imgs, labels = _twin_renders(rec_data, twin_pairs)
    plain = closed_set.recognize_batch(imgs, mode="clip", rerank=False)
    reranked = closed_set.recognize_batch(imgs, mode="clip", rerank=True)
    acc0, acc1 = accuracy(plain, labels), accuracy(reranked, labels)
    assert acc1 > acc0, f"rerank {acc1:.3f} vs no rerank {acc0:.3f} on near-twins"
    changed = [d.rerank for a in reranked for d in a.detections if d.rerank is not None and d.rerank.changed]
    assert changed and all(r.tags_used for r in changed), "a changed answer must name the tags that moved it"
    assert all(d.rerank is None for a in plain for d in a.detections)
    assert all(d.tags for a in reranked for d in a.detections), "the ONNX tagger's tags are part of the answer"
    assert not is_own_tag_head(closed_set.tagger)  # a tagger of its own: its weight is tuned with ties kept on


def test_reranked_fusion_answers_still_say_how_sure_they_are(closed_set, rec_data, twin_pairs):
    """Tags weigh fusion's probability as evidence: the answers gain as much, and their similarity stays a probability
    (the candidates' scores sum to at most 1) instead of reading 1.0, as an added shift made nearly every one."""
    imgs, labels = _twin_renders(rec_data, twin_pairs)
    plain = closed_set.recognize_batch(imgs, mode="fusion", rerank=False)
    reranked = closed_set.recognize_batch(imgs, mode="fusion", rerank=True)
    assert accuracy(reranked, labels) >= accuracy(plain, labels)
    sims = np.array([a.similarity for a in reranked])
    assert np.mean(sims >= 0.9999) < 0.5, f"{np.mean(sims >= 0.9999):.0%} of reranked answers read 1.0"
    assert all(sum(t.score for t in d.topk) <= 1.0 + 1e-3 for a in reranked for d in a.detections)


def test_classifier_tag_head_is_the_default_tagger(version_dir, test_images):
    rec = Recognizer.from_version(version_dir, infer_cfg())  # tagger=auto: the classifier's own tag head
    ans = rec.recognize(test_images[0][0], "t.png", mode="fusion", rerank=True)
    assert type(rec.tagger).__name__ == "ClassifierTagger" and is_own_tag_head(rec.tagger)
    det = ans.detections[0]
    assert det.rerank is not None and all(0.0 <= t.score <= 1.0 for t in det.tags)


def _stranger(known: list[CharacterSpec]) -> CharacterSpec:
    """A character unlike every known one in hair, outfit and hair style."""
    used_hair = {s.hair_color for s in known}
    used_outfit = {s.outfit_color for s in known}
    from anime_role_detect.data.synthetic import HAIR_COLORS, OUTFIT_COLORS

    hair = next(h for h in HAIR_COLORS if h not in used_hair)
    outfit = next((o for o in OUTFIT_COLORS if o not in used_outfit), "white")
    return CharacterSpec("stranger", "series_z", hair, "yellow", "twintails", "hat", outfit)


def _stranger_pictures(rec_data, seed: int, n_shots: int, n_probes: int, prefix: str = "p") -> tuple[list[Image.Image], list[tuple[Image.Image, str]]]:
    """Pictures of `_stranger` drawn from one seed: `n_shots` to enrol it from, then `n_probes` named probes."""
    stranger = _stranger(load_characters(rec_data))
    rng = random.Random(seed)
    shots = [render_character(stranger, rng, 96)[0] for _ in range(n_shots)]
    return shots, [(render_character(stranger, rng, 96)[0], f"{prefix}{i}.png") for i in range(n_probes)]


@pytest.mark.parametrize("mode", ["clip", "fusion"])
def test_unseen_character_is_answered_unknown(recognizer, rec_data, test_images, mode):
    """Known characters are rarely refused (the threshold keeps 98% of the held-out pictures answered right) and an
    unseen one is refused more often than they are; its open-set scores sit below the known ones'. Fusion (the default
    mode of a version with a classifier) gates on the best gallery cosine: its blended probability rated this stranger
    above known pictures.

    How often the stranger is refused depends on where the lowest right answers of the calibration pictures lie (the
    threshold keeps 98% of them): measured 17% of 36 pictures on this CPU, 33-42% on 12 of them (CPU and CUDA), so the
    share asserted is only "more than the 5% of known pictures the threshold may refuse"; the separation is AUROC's."""
    _, unseen = _stranger_pictures(rec_data, 5, 0, 36, prefix="s")
    answers = recognizer.recognize_batch(unseen, mode=mode, rerank=False)
    unknown = np.mean([a.unknown and a.role == UNKNOWN for a in answers])
    known = recognizer.recognize_batch([(im, "k.png") for im, _ in test_images], mode=mode, rerank=False)
    accepted = np.mean([not a.unknown for a in known])
    k_scores = np.array([a.detections[0].openset_score for a in known])
    u_scores = np.array([a.detections[0].openset_score for a in answers])
    auroc = float((k_scores[:, None] > u_scores[None, :]).mean())
    assert auroc >= 0.9, f"{mode}: an unseen character's open-set scores are not below known ones' (AUROC {auroc:.2f})"
    assert unknown > 0.05, f"only {unknown:.2f} of an unseen character's images were 'unknown'"
    assert accepted >= 0.95, f"only {accepted:.2f} of known characters' images were accepted"
    assert all(d.topk for a in answers for d in a.detections), "unknown answers still list the nearest candidates"


def test_saved_and_loaded_gallery_answers_identically(version_dir, tmp_path, test_images):
    copy = tmp_path / "copy"
    shutil.copytree(version_dir, copy)
    Gallery.load(version_dir).save(copy)  # round trip through save
    a = Recognizer.from_version(version_dir, infer_cfg())
    b = Recognizer.from_version(copy, infer_cfg())
    items = [(im, f"{i}.png") for i, (im, _) in enumerate(test_images[::3])]
    for mode in ("clip", "fusion"):
        ra, rb = a.recognize_batch(items, mode=mode), b.recognize_batch(items, mode=mode)
        assert [x.role for x in ra] == [y.role for y in rb]
        assert [x.similarity for x in ra] == [y.similarity for y in rb]
        assert [[t.role for t in x.detections[0].topk] for x in ra] == [[t.role for t in y.detections[0].topk] for y in rb]


def test_enroll_and_remove_without_retraining(version_dir, tmp_path, rec_data, test_images):
    folder = tmp_path / "v"
    shutil.copytree(version_dir, folder)
    rec = Recognizer.from_version(folder, {**infer_cfg(), "openset": {"enabled": False}})
    shots, probe = _stranger_pictures(rec_data, 11, 12, 8)
    before = rec.recognize_batch(probe, mode="clip", rerank=False)
    assert not any(a.role == "stranger" for a in before)
    assert rec.enroll("stranger", "series_z", shots) == 24  # each picture and its mirror image (`enrol.mirror`)
    after = rec.recognize_batch(probe, mode="clip", rerank=False)
    # a look the tiny 64 px embedder never trained on, enrolled from 12 shots: mostly top-1, nearly always top-3
    assert np.mean([a.role == "stranger" for a in after]) >= 0.5
    assert np.mean([any(t.role == "stranger" for t in a.detections[0].topk[:3]) for a in after]) >= 0.85
    assert all(a.series == "series_z" for a in after if a.role == "stranger")
    # fusion: the enrolled character (unknown to the classifier) is named on its pictures and does not take the
    # trained characters' pictures (its score is its gallery probability, on the blend's scale, not a raw cosine above
    # every blend: with its raw cosine it took 16 of the 64 known pictures; test_fusion_scores_an_enrolled_character...)
    fused = rec.recognize_batch(probe, mode="fusion", rerank=False)
    assert np.mean([a.role == "stranger" for a in fused]) >= 0.25
    known = rec.recognize_batch(test_images, mode="fusion", rerank=False)
    assert np.mean([a.role == "stranger" for a in known]) <= 0.1
    assert rec.mode != "model"  # auto never picks the one mode that cannot name an enrolled character
    assert np.mean([a.role == y for a, (_, y) in zip(known, test_images)]) >= 0.6
    rec.save_gallery()
    again = Recognizer.from_version(folder, {**infer_cfg(), "openset": {"enabled": False}})
    assert any(c["name"] == "stranger" for c in again.characters())
    assert again.remove("stranger") == 24 and again.remove("stranger") == 0
    gone = again.recognize_batch(probe, mode="clip", rerank=False)
    assert not any(a.role == "stranger" for a in gone)


def test_five_shot_enrolment_beats_the_frozen_imagenet_baseline(version_dir, tmp_path, rec_data, test_images):
    """A character held out of training, enrolled from 5 pictures without retraining: scored the same way (`top3_mean`),
    the trained version names it more often than a gallery of frozen ImageNet Lite0 features built from the same
    pictures (same shots, same probes) and keeps naming the trained characters; the default `balanced` scoring names it
    more often still, as on real data (docs/accuracy.md "`balanced` as the default"). The pictures alone are enrolled
    (``enrol.mirror=false``): this compares the embeddings; the mirror images are `test_enrolment_adds_each_pictures_mirror_image`'s."""
    from anime_role_detect.recognition.build import build_recognition_folder

    frozen = tmp_path / "frozen"
    build_recognition_folder(rec_data, frozen, infer_cfg(["embedder=lite0", "tagger=none"]), val_fraction=0.25, seed=0)
    trained = tmp_path / "trained"
    shutil.copytree(version_dir, trained)
    shots, probe = _stranger_pictures(rec_data, 21, 5, 24)
    top1 = {}
    for name, folder in (("frozen", frozen), ("trained", trained)):
        rec = Recognizer.from_version(folder, {**infer_cfg(), "openset": {"enabled": False}, "rerank": False, "cache_size": 0,
                                               "enrol": {"mirror": False}})
        assert rec.gallery.aggregate == BALANCED  # what the version was built with: the default
        rec.enroll("stranger", "series_z", shots)
        for aggregate in ("top3_mean", BALANCED):
            rec.gallery.aggregate = aggregate
            answers = rec.recognize_batch(probe, mode="clip", rerank=False)
            top1[name, aggregate] = float(np.mean([a.role == "stranger" for a in answers]))
        if name == "trained":
            known = rec.recognize_batch([(im, "k.png") for im, _ in test_images], mode="clip", rerank=False)
            assert accuracy(known, [y for _, y in test_images]) >= 0.5
    # measured: trained 0.67 vs frozen 0.50 with top3_mean; balanced: trained 0.83, frozen 0.92 on this synthetic set
    # (on real data the trained version enrols better under balanced too: docs/accuracy.md)
    assert top1["trained", "top3_mean"] >= top1["frozen", "top3_mean"] + 0.08, top1
    assert top1["trained", BALANCED] >= top1["trained", "top3_mean"] + 0.08, top1


def test_enrolment_adds_each_pictures_mirror_image(version_dir, tmp_path, rec_data, test_images):
    """5-shot enrolment adds each picture and its mirror image as rows (sources marked), so the enrolled character is
    named at least as often as from the pictures alone and the trained characters keep their answers (measured on
    this fixture: 0.79 both ways, every trained answer the same; the gain is on real data, docs/accuracy.md);
    ``enrol.mirror=false`` adds the pictures alone."""
    shots, probe = _stranger_pictures(rec_data, 21, 5, 24)
    names = [f"shot{i}.png" for i in range(len(shots))]
    top1, known = {}, {}
    for mirror in (False, True):
        folder = tmp_path / f"m{mirror}"
        shutil.copytree(version_dir, folder)
        rec = Recognizer.from_version(folder, {**infer_cfg(), "openset": {"enabled": False}, "rerank": False, "cache_size": 0,
                                               "enrol": {"mirror": mirror}})
        assert rec.enroll("stranger", "series_z", shots, names) == len(shots) * (2 if mirror else 1)
        rows = [rec.gallery.rows[int(i)].source for i in rec.gallery.rows.member_ids("stranger")]
        assert sorted(rows) == sorted(names + ([f"{n}{MIRROR_SUFFIX}" for n in names] if mirror else []))
        top1[mirror] = float(np.mean([a.role == "stranger" for a in rec.recognize_batch(probe, mode="clip", rerank=False)]))
        known[mirror] = [a.role for a in rec.recognize_batch(test_images, mode="clip", rerank=False)]
    assert top1[True] >= top1[False], top1
    assert np.mean([a == b for a, b in zip(known[False], known[True])]) >= 0.95


def test_cache_returns_the_same_answer_and_feature_sink_gets_embeddings(version_dir, test_images):
    rec = Recognizer.from_version(version_dir, infer_cfg())
    img = test_images[0][0]
    first = rec.recognize(img, "a.png")
    hits = rec.cache.hits
    second = rec.recognize(img, "b.png")
    assert rec.cache.hits == hits + 1 and second.filename == "b.png"
    assert second.role == first.role and second.similarity == first.similarity
    seen = []
    rec.add_sink(lambda ans, emb, data: seen.append((ans, emb, data)))
    rec.recognize_batch([(img, "c.png"), (test_images[9][0], "d.png")], mode="model")
    assert len(seen) == 2
    ans, emb, data = seen[0]
    assert data is None  # decoded images come without bytes
    assert emb.shape == (len(ans.detections), rec.embedder.dim) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    hits = rec.cache.hits
    rec.recognize_batch([(img, "e.png")], mode="model")  # served from the cache, still handed to the sink
    assert rec.cache.hits == hits + 1 and len(seen) == 3
    assert seen[2][0].filename == "e.png" and np.array_equal(seen[2][1], emb)


def test_recognize_bytes_hashes_content_and_reports_decode_time(recognizer, test_images):
    buf = io.BytesIO()
    test_images[0][0].save(buf, format="PNG")
    ans = recognizer.recognize_bytes(buf.getvalue(), "up.png")
    assert len(ans.image_sha256) == 64 and "decode" in ans.timings_ms and ans.width == 96


def _jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 100, 50)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("data,needle", [
    (b"hello, I am a text file", "not an image"),
    (_jpeg()[:200], "corrupt or truncated"),
    (None, "too small"),
    ("bomb", "pixel"),
])
def test_bad_uploads_are_one_line_errors_naming_the_file(recognizer, data, needle):
    if data is None:
        buf = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buf, format="PNG")
        data = buf.getvalue()
    elif data == "bomb":
        buf = io.BytesIO()
        Image.new("1", (9000, 9000)).save(buf, format="PNG")  # 81 Mpx, a few KB on disk
        data = buf.getvalue()
    with pytest.raises(ImageError) as exc:
        recognizer.recognize_bytes(data, "upload-7.jpg")
    msg = str(exc.value)
    assert "upload-7.jpg" in msg and needle in msg and "\n" not in msg


def test_gallery_from_another_embedder_is_refused(version_dir, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(version_dir, folder)
    g = Gallery.load(folder)
    g.embedder_config = {"kind": "timm", "model_name": "resnet10t", "pretrained": False, "image_size": 64}
    g.save(folder)
    rec = Recognizer.from_version(folder, infer_cfg())
    with pytest.raises(GalleryError, match="built with embedder classifier:.*rebuild"):
        rec.recognize(Image.new("RGB", (64, 64)), "x.png")


def test_missing_model_file_is_a_clear_error(version_dir, tmp_path):
    folder = tmp_path / "nomodel"
    shutil.copytree(version_dir, folder)
    (folder / "model.ckpt").unlink()
    rec = Recognizer.from_version(folder, infer_cfg())
    with pytest.raises(WeightsError, match=r"model\.ckpt not found"):
        rec.recognize(Image.new("RGB", (64, 64)), "x.png", mode="clip")


@pytest.mark.parametrize("flip", [False, True])
def test_one_backbone_pass_per_view_serves_embedding_logits_and_tags(version_dir, test_images, flip):
    """With the version's classifier as gallery embedder, fusion mode runs the backbone once per batch
    (twice the images with flip TTA: image + mirror in one call), and gets the same answers as separate passes."""
    import json

    import torch

    folder = version_dir.parent / f"shared-pass-{flip}"
    if not folder.exists():
        shutil.copytree(version_dir, folder)
        meta = json.loads((folder / "gallery.json").read_text())
        meta["embedder"]["config"]["flip_tta"] = flip
        (folder / "gallery.json").write_text(json.dumps(meta))
    rec = Recognizer.from_version(folder, {**infer_cfg(), "rerank": False, "cache_size": 0, "tagger": {"kind": "classifier"}})
    assert rec._shares_classifier()
    images = [img for img, _ in test_images[:6]]
    rec.recognize_batch([(images[0], "warm.png")], mode="fusion")  # loads every part (their one-off probes)
    calls: list[int] = []
    hook = rec.embedder.model.backbone.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))
    try:
        answers = rec.recognize_batch([(im, f"{i}.png") for i, im in enumerate(images)], mode="fusion")
    finally:
        hook.remove()
    assert calls == [len(images) * (2 if flip else 1)]
    assert "forward" in answers[0].timings_ms and "classify" not in answers[0].timings_ms
    emb, probs, _ = rec.embedder.embed_with_heads(images)
    sep_probs, _ = rec._classify(images)
    # the shared pass batches image + mirror: on CUDA, cuDNN's TF32 convolutions differ by ~2e-4 between batch sizes
    atol = 1e-5 if resolve_device(rec.config.device) == "cpu" else 2e-3
    np.testing.assert_allclose(probs, sep_probs, atol=atol)
    np.testing.assert_allclose(emb, rec.embedder.embed(images), atol=atol)
    with torch.inference_mode():
        assert rec.classifier is rec.embedder.model  # one network in memory for gallery and heads


def test_auto_mode_answers_in_the_mode_the_version_measured_best(version_dir, tmp_path, test_images):
    """mode=auto (the default) reads the version's own evaluation figures and answers in its best mode; a request that
    names a mode still gets that mode; without figures it answers in fusion, the mode that uses every part."""
    import json
    import shutil

    from anime_role_detect.recognition.config import RecognizerConfig
    from anime_role_detect.recognition.evalset import best_mode

    assert RecognizerConfig().mode == "auto"
    measured = json.loads((version_dir / "eval_metrics.json").read_text())
    rec = Recognizer.from_version(version_dir, infer_cfg())
    assert rec.mode == best_mode(["clip", "model", "fusion"], measured["top1"], rec.rerank_default, measured["pictures"])
    copy = tmp_path / "v"
    shutil.copytree(version_dir, copy)
    for best in ("model", "clip"):
        figures = {"clip": 0.5, "model": 0.5, "fusion": 0.5, best: 0.9}
        (copy / "eval_metrics.json").write_text(json.dumps({"pictures": 10, "top1": figures}))
        rec = Recognizer.from_version(copy, infer_cfg())
        answers = rec.recognize_batch(test_images[:2], rerank=False)
        assert rec.mode == best and {a.mode for a in answers} == {best}
        assert rec.recognize_batch(test_images[:1], mode="fusion", rerank=False)[0].mode == "fusion"
        assert rec.describe()["mode"] == best and rec.describe()["mode_setting"] == "auto"
    (copy / "eval_metrics.json").unlink()
    assert Recognizer.from_version(copy, infer_cfg()).mode == "fusion"
    assert best_mode(["clip"], None, True) == "clip"
    assert best_mode(["clip", "model", "fusion"], {"clip": 0.8, "model": 0.8, "fusion": 0.8}, False) == "fusion"  # ties
    assert best_mode(["clip", "model", "fusion"], {"clip": 0.8, "clip+rerank": 0.95, "fusion": 0.9}, True) == "clip"
    # a lead within the noise of the evaluation set does not move the answer off fusion (mixed5, seed 0: 52 pictures,
    # model led by 2; on pictures set aside from the version fusion got 98.5, model 97.0); a clear lead does
    mixed5 = {"clip": 0.923, "model": 0.981, "fusion": 0.942}
    assert best_mode(["clip", "model", "fusion"], mixed5, False, 52) == "fusion"
    assert best_mode(["clip", "model", "fusion"], mixed5, False) == "model"  # size unknown (older versions): strict
    assert best_mode(["clip", "model", "fusion"], {**mixed5, "fusion": 0.80}, False, 52) == "model"
    assert best_mode(["clip", "model", "fusion"], {"clip": 1.0, "model": 0.97, "fusion": 0.97}, False, 400) == "clip"


def test_fusion_mixes_two_calibrated_probabilities(version_dir, tmp_path, test_images):
    """The version carries a gallery temperature and a blend weight fitted on its held-out pictures
    (`fusion.fit_gallery_weight`, the default; ``false`` keeps half and half); fusion mixes softmax(cosine / T) with
    the trained characters' probability (the whitened gallery's here; gallery weight 1 answers as clip does), so its
    score is a probability and it is never
    far below the better of the two modes. A version calibrated before the temperature existed still blends the raw
    cosine half and half, so its saved thresholds hold."""
    import json

    from anime_role_detect.recognition.build import evaluate_split
    from anime_role_detect.recognition.openset import gallery_probabilities

    calib = json.loads((version_dir / "calibration.json").read_text())
    t, w = calib["gallery_temperature"], calib["gallery_weight"]
    assert 0 < t < 1 and 0 <= w <= 1  # both fitted when the version was built, with no option asked
    rec = Recognizer.from_version(version_dir, {**infer_cfg(), "openset": {"enabled": False}, "rerank": False})
    assert rec.gallery_weight() == w and rec.describe()["calibration"]["fusion"] == {"gallery_weight": w, "gallery_temperature": t,
                                                                                         "untrained": "gallery", "trained_judge": "whitened"}
    fitting = Recognizer.from_version(version_dir, {**infer_cfg(), "openset": {"enabled": False}})
    pics, names = [im for im, _ in test_images], [y for _, y in test_images]
    ev = evaluate_split(fitting, pics, names, ["clip", "model", "fusion"], tune=False)
    fitted = ev.calibration.gallery_weight
    assert fitted is not None and 0 <= fitted <= 1 and fitting.gallery_weight() == fitted  # fusion was scored with the fitted blend
    halves = Recognizer.from_version(version_dir, {**infer_cfg(), "fusion": {"fit_gallery_weight": False}, "openset": {"enabled": False}})
    assert evaluate_split(halves, pics, names, ["clip", "model", "fusion"], tune=False).calibration.gallery_weight is None
    forced = Recognizer.from_version(version_dir, {**infer_cfg(), "fusion": {"gallery_weight": 1.0}, "openset": {"enabled": False}})
    assert forced.gallery_weight() == 1.0  # a number in the config wins over the version's
    f_top = [c[0][0] for c in forced._score([im for im, _ in test_images[:6]], "fusion", False, False).candidates]
    assert f_top == [c[0][0] for c in forced._score([im for im, _ in test_images[:6]], "clip", False, False).candidates]
    labels = [y for _, y in test_images]
    items = [(im, f"{i}.png") for i, (im, _) in enumerate(test_images)]
    top1 = {m: accuracy(rec.recognize_batch(items, mode=m, rerank=False), labels) for m in ("clip", "model", "fusion")}
    assert top1["fusion"] >= max(top1["clip"], top1["model"]) - 0.05, top1
    scored = rec._score([test_images[0][0]], "fusion", False, False)
    assert abs(sum(s for _, _, s in scored.candidates[0]) - 1.0) < 1e-6  # every character listed: a distribution
    probs = rec._score([test_images[0][0]], "model", False, False).candidates[0]
    gal = rec._score([test_images[0][0]], "clip", False, False).candidates[0]
    old = tmp_path / "old"
    shutil.copytree(version_dir, old)
    del calib["gallery_temperature"], calib["gallery_weight"], calib["whitened_temperature"]
    (old / "calibration.json").write_text(json.dumps(calib))
    (old / "whitened_gallery.npz").unlink()  # a version from before any of them
    before = Recognizer.from_version(old, {**infer_cfg(), "openset": {"enabled": False}, "rerank": False})
    assert before.gallery_temperature() is None and before.gallery_weight() == 0.5
    top = before._score([test_images[0][0]], "fusion", False, False).candidates[0][0]
    p = dict((c, s) for c, _, s in probs)[top[0]]
    cos = dict((c, s) for c, _, s in gal)[top[0]]
    assert abs(top[2] - (0.5 * cos + 0.5 * p)) < 1e-6
    assert abs(gallery_probabilities([cos], t)[0] - 1.0) < 1e-9  # (one character alone has all the mass)


def test_a_group_picture_named_as_another_character_it_shows_counts_as_right(version_dir, test_images):
    """A booru group picture is filed under each character tagged on it. The version's own figures (top-1 per mode, the
    right answers open-set keeps) read it as a picture of all of them: half the pictures filed under a second
    character, which is their label, score as well as the true labels do, not as the wrong labels."""
    from anime_role_detect.recognition.build import evaluate_split

    rec = Recognizer.from_version(version_dir, {**infer_cfg(), "openset": {"enabled": False}, "rerank": False})
    images, truth = [im for im, _ in test_images], [y for _, y in test_images]
    names = sorted(set(truth))
    other = [names[(names.index(y) + 1) % len(names)] for y in truth]
    labels = [o if i % 2 == 0 else y for i, (y, o) in enumerate(zip(truth, other))]
    filed = [{y, o} if i % 2 == 0 else {y} for i, (y, o) in enumerate(zip(truth, other))]
    plain = evaluate_split(rec, images, truth, ["clip", "model"], tune=False)
    wrong = evaluate_split(rec, images, labels, ["clip", "model"], tune=False)
    grouped = evaluate_split(rec, images, labels, ["clip", "model"], tune=False, filed=filed)
    for mode in ("clip", "model"):
        assert grouped.top1[mode] >= plain.top1[mode] > wrong.top1[mode] + 0.3, (mode, plain.top1, wrong.top1, grouped.top1)
        right = {k: e.calibration.modes[mode].n_genuine for k, e in (("plain", plain), ("wrong", wrong), ("grouped", grouped))}
        assert right["grouped"] >= right["plain"] > right["wrong"], right


def test_fusion_on_an_approximate_gallery_asks_for_its_best_characters_not_all(version_dir, onnx_tagger, test_images, tmp_path):
    """A big (HNSW) gallery is searched for the best few characters in fusion, with the flat gallery's answers."""
    hnsw_dir = tmp_path / "v_hnsw"
    shutil.copytree(version_dir, hnsw_dir)
    flat = Gallery.load(version_dir)
    ids = np.array(sorted(flat.rows), np.int64)
    big = Gallery(flat.embedder_id, flat.dim, flat.embedder_config, {"type": "hnsw"}, None, flat.aggregate)
    big.add_rows(flat._vectors(ids), [flat.rows[i].character for i in ids], [flat.rows[i].series for i in ids],
                 [flat.rows[i].source for i in ids])
    big.save(hnsw_dir)
    asked: dict[str, list[int]] = {}
    answers = {}
    for name, folder in (("flat", version_dir), ("hnsw", hnsw_dir)):
        rec = Recognizer.from_version(folder, {**infer_cfg(onnx_tagger), "openset": {"enabled": False}, "topk": 3,
                                               "rerank_candidates": 3})  # fewer candidates than the 8 characters
        gallery, search = rec.gallery, rec.gallery.search
        asked[name] = []

        def spy(queries, k=5, _search=search, _asked=asked[name]):
            _asked.append(k)
            return _search(queries, k=k)

        gallery.search = spy
        answers[name] = [a.role for a in rec.recognize_batch(test_images, mode="fusion", rerank=False)]
    assert rec.gallery.kind == "hnsw" and set(asked["hnsw"]) == {rec.n_candidates}
    assert set(asked["flat"]) == {len(flat.characters())} and len(flat.characters()) > rec.n_candidates
    agree = np.mean([a == b for a, b in zip(answers["flat"], answers["hnsw"])])
    assert agree >= 0.95, agree


def test_fusion_scores_an_enrolled_character_by_the_gallery_alone(version_dir, tmp_path, rec_data, test_images):
    """A character enrolled after training has no classifier probability: under the default ``untrained: gallery``
    fusion keeps its gallery probability and blends the trained characters within the gallery's mass on them, so the
    scores stay one distribution over every character, the enrolled one included; it is named on its pictures and
    takes no trained character's pictures (``leftover``, the rule before, is still asked for by name). The version's
    fitted gallery weight gives way to half and half once the gallery holds a character the classifier never saw."""
    import json

    folder = tmp_path / "v"
    shutil.copytree(version_dir, folder)
    calib = json.loads((folder / "calibration.json").read_text())
    (folder / "calibration.json").write_text(json.dumps({**calib, "gallery_weight": 0.8}))  # a fitted lean to the gallery
    shots, probe = _stranger_pictures(rec_data, 11, 12, 16)
    named, taken = {}, {}
    for rule in ("gallery", "leftover"):
        rec = Recognizer.from_version(folder, {**infer_cfg(), "openset": {"enabled": False}, "fusion": {"untrained": rule}})
        assert rec.gallery_weight() == 0.8
        rec.enroll("stranger", "series_z", shots)
        assert rec.gallery_weight() == 0.5  # the weight was fitted on the trained characters alone: half again
        named[rule] = np.mean([a.role == "stranger" for a in rec.recognize_batch(probe, mode="fusion", rerank=False)])
        taken[rule] = np.mean([a.role == "stranger" for a in rec.recognize_batch(test_images, mode="fusion", rerank=False)])
        fused = {c: s for c, _, s in rec._score([probe[0][0]], "fusion", False, False).candidates[0]}
        g = rec.gallery.search(rec.embedder.embed([probe[0][0]]), k=rec.gallery.n_characters)[0]
        p_gal = dict(zip([c for c, _, _ in g], gallery_probabilities([s for _, _, s in g], rec.gallery_temperature())))
        if rule == "gallery":
            assert len(fused) == rec.gallery.n_characters and abs(sum(fused.values()) - 1.0) < 1e-6  # one distribution
            assert abs(fused["stranger"] - p_gal["stranger"]) < 1e-5  # the gallery's own probability
        else:
            assert fused["stranger"] > p_gal["stranger"] * rec.gallery_weight() + 1e-6  # plus 1 - the classifier's top
        rec.remove("stranger")
        assert rec.gallery_weight() == 0.8  # no character only the gallery knows: the version's fitted weight again
    # measured on this fixture: named on 15/16 (leftover 16/16), none of the 64 trained pictures taken by either
    assert named["gallery"] >= 0.75 and taken["gallery"] <= 0.05, (named, taken)
    with pytest.raises(ConfigError, match="fusion.untrained"):
        Recognizer.from_version(folder, {**infer_cfg(), "fusion": {"untrained": "classifier"}})


def _whitened_scores(folder, embeddings: np.ndarray, names: list[str], leave_out_own: bool = False) -> np.ndarray:
    """The version's whitened gallery scored by hand from its file: each character's mean of its best `depths` rows of
    ``unit(e M) . row`` (own row, cosine >= 0.9999, left out when asked)."""
    z = np.load(folder / "whitened_gallery.npz")
    rows, owners, depths, own = z["rows"].astype(np.float32), z["owners"], z["depths"], [str(n) for n in z["names"]]
    out = np.full((len(embeddings), len(names)), -1.0)
    for r, e in enumerate(embeddings):
        w = e @ z["matrix"]
        sims = rows @ (w / np.linalg.norm(w))
        for c, n in enumerate(names):
            if n in own:
                i = own.index(n)
                mine = np.sort([s for s, o in zip(sims, owners) if o == i and not (leave_out_own and s >= 0.9999)])[::-1]
                out[r, c] = mine[: depths[i]].mean()
    return out


def test_fusion_weight_is_fitted_on_the_gallery_it_answers_with(version_dir):
    """A version's held-out pictures join its gallery (and its whitened gallery, whose covariance is fitted again on
    every row) after calibration; fusion's weight is then fitted again on them, each picture scored with its own row
    left out there and in the whitened gallery (`build.refit_gallery_weight`): calibration.json holds what a
    brute-force leave-own-row-out fit gives, and the stored matrix is the whitening of the gallery's rows."""
    import json

    from anime_role_detect.recognition.openset import fit_gallery_weight

    calib = json.loads((version_dir / "calibration.json").read_text())
    g = Gallery.load(version_dir)
    names = sorted(c["name"] for c in g.characters())
    ids = np.arange(len(g.rows))
    vectors, owner = g.index.reconstruct_n(0, len(ids)), [g.rows.names[o] for o in g.rows.owner[ids]]
    resid = vectors - np.stack([vectors[[o == n for o in owner]].mean(0) for n in owner])
    sw = resid.T.astype(np.float64) @ resid / len(vectors)
    ev, vec = np.linalg.eigh(sw / (np.trace(sw) / len(sw)) + np.eye(len(sw)))
    assert np.allclose(np.load(version_dir / "whitened_gallery.npz")["matrix"], (vec / np.sqrt(ev)) @ vec.T, atol=1e-4)
    z = np.load(version_dir / "val_embeddings.npz")
    cos = np.full((len(z["labels"]), len(names)), -1.0)
    for r, e in enumerate(z["embeddings"]):
        sims = vectors @ e
        for c, n in enumerate(names):
            mine = np.sort([s for s, o in zip(sims, owner) if o == n and s < 0.9999])[::-1]
            if len(mine):
                cos[r, c] = mine[: g.depth(n)].mean()
    labels = [names.index(y) for y in z["labels"]]
    judged = _whitened_scores(version_dir, z["embeddings"], names, leave_out_own=True)
    judge = np.stack([gallery_probabilities(row, calib["whitened_temperature"]) for row in judged])
    t = calib["gallery_temperature"]
    loo = fit_gallery_weight(np.stack([gallery_probabilities(row, t) for row in cos]), judge, labels)
    assert calib["gallery_weight"] == pytest.approx(loo)


def test_fusion_judges_trained_characters_with_the_whitened_gallery_until_one_is_enrolled(version_dir, tmp_path, rec_data,
                                                                                          test_images):
    """While every gallery character is a trained one, fusion blends the gallery's probability with the whitened
    gallery's (not the classifier's): each character's score is w x gallery + (1 - w) x whitened, recomputed here from
    the files. Once a character is enrolled the classifier judges again: fusion then answers every picture as a
    version without the whitened gallery does (`fusion.whitened: false`)."""
    folder = tmp_path / "v"
    shutil.copytree(version_dir, folder)
    cfg = {**infer_cfg(), "openset": {"enabled": False}, "topk": 100}
    rec = Recognizer.from_version(folder, cfg)
    plain = Recognizer.from_version(folder, {**cfg, "fusion": {"whitened": False}})
    assert rec.whitened_judge() is not None and plain.whitened_judge() is None
    assert rec.describe()["calibration"]["fusion"]["trained_judge"] == "whitened"
    img = test_images[0][0]
    fused = {c: s for c, _, s in rec._score([img], "fusion", False, False).candidates[0]}
    e = rec.embedder.embed([img])
    g = rec.gallery.search(e, k=rec.gallery.n_characters)[0]
    p_gal = dict(zip([c for c, _, _ in g], gallery_probabilities([s for _, _, s in g], rec.gallery_temperature())))
    names = sorted(p_gal)
    judge = dict(zip(names, gallery_probabilities(_whitened_scores(folder, e, names)[0], rec.calibration.whitened_temperature)))
    w = rec.gallery_weight()
    for c in names:
        assert fused[c] == pytest.approx(w * p_gal[c] + (1 - w) * judge[c], abs=1e-4), c
    shots, probe = _stranger_pictures(rec_data, 11, 12, 16)
    for r in (rec, plain):
        r.enroll("stranger", "series_z", shots)
    assert rec.whitened_judge() is None and rec.describe()["calibration"]["fusion"]["trained_judge"] == "classifier"
    pictures = [(im, f"t{i}.png") for i, (im, _) in enumerate(test_images[:24])] + probe
    assert [a.role for a in rec.recognize_batch(pictures, mode="fusion", rerank=False)] == \
        [a.role for a in plain.recognize_batch(pictures, mode="fusion", rerank=False)]
