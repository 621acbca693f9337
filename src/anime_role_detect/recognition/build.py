"""Build a recognition folder (the version-folder contract) from a labelled dataset folder.

`build_recognition_folder` writes ``gallery.faiss`` + ``gallery.json``, ``tag_profiles.json`` (when the
metadata has tags) and ``calibration.json`` (open-set thresholds and rerank weights tuned on a held-out
split), plus a copy of ``model.ckpt`` when given. Used by the workflow's gallery stage, by
``train.py register=true`` (`workflow.publish`) and by ``ard-gallery build`` (`cli.gallery`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
from PIL import Image

from ..confutil import to_plain as _plain
from ..errors import ConfigError, ImageError
from ..imageio import load_image
from ..log import get_logger
from ..versionfiles import GALLERY_META, MODEL, WHITENED_GALLERY
from .aggregate import DEFAULT_AGGREGATE
from .gallery import Gallery
from .openset import (
    DEFAULT_MAX_FALSE_REJECT,
    GALLERY_COSINE,
    TOP,
    OpenSetCalibration,
    calibrate,
    check_max_false_reject,
    fit_gallery_weight,
    fit_temperature,
    gallery_probabilities,
    leave_one_out_scores,
)
from .pipeline import MODES, Recognizer
from .rerank import TagReranker, tune_weight
from .tagger import is_own_tag_head
from .whitened import MAX_ROWS, WhitenedGallery

_log = get_logger("system")
#: ``gallery_build.runtime``: auto embeds a version's gallery and val pictures on ONNX Runtime when the build exports the
#: classifier that embeds them (`_export_classifier_first`); torch keeps torch.
BUILD_RUNTIMES = ("auto", "torch")


def _safe_loader(path: Path) -> Callable[[], Image.Image | None]:
    def load() -> Image.Image | None:
        try:
            return load_image(path)
        except ImageError as exc:
            _log.warning(f"skipped unreadable image: {exc}")
            return None

    return load


@dataclass
class BuildReport:
    """What `build_recognition_folder` made and how well it did on the held-out images."""

    out_dir: str
    characters: int
    train_images: int
    val_images: int
    rows: int
    embedder_id: str
    top1: dict[str, float] = field(default_factory=dict)  # "<mode>" and "<mode>+rerank" on val
    thresholds: dict[str, float] = field(default_factory=dict)
    rerank_weights: dict[str, float] = field(default_factory=dict)
    onnx: dict[str, Any] | None = None  # the ONNX export made with the version (`onnx_export.export_into`), its manifest entry


def _score_matrix(cands: list[list[tuple[str, str, float]]], names: list[str]) -> np.ndarray:
    col = {n: i for i, n in enumerate(names)}
    m = np.full((len(cands), len(names)), -1.0)
    for r, row in enumerate(cands):
        for c, _, s in row:
            if c in col:
                m[r, col[c]] = s
    return m


@dataclass
class SplitEvaluation:
    """What `evaluate_split` measured: top-1 per mode (and with reranking), thresholds, rerank weights."""

    top1: dict[str, float]
    calibration: OpenSetCalibration
    weights: dict[str, float]
    embeddings: np.ndarray | None = None  # the images' gallery embeddings (clip mode), reused to enrol them
    blend: dict[str, Any] | None = None  # what fusion's weight was fitted on (`refit_gallery_weight`); None when not fitted
    whitened: WhitenedGallery | None = None  # fusion's judge of the trained characters when it had one (`whitened`)


def evaluate_split(rec: Recognizer, images: list[Image.Image], labels: list[str], modes: Sequence[str],
                   target_far: float = 0.05, tune: bool = True, max_false_reject: float = DEFAULT_MAX_FALSE_REJECT,
                   tag_truth: Sequence[Sequence[str]] | None = None,
                   filed: Sequence[Collection[str]] | None = None) -> SplitEvaluation:
    """Top-1 with/without reranking per mode on labelled images, open-set thresholds, tuned rerank weights.

    Each threshold refuses at most `max_false_reject` of the pictures its mode answers right (`openset.calibrate`).
    With `tag_truth` (the images' metadata tags) the reranker first learns the tagger's noise per tag. `filed` gives
    each picture every character it is filed under (`data.layout.filed_characters`: a group picture's copies): an
    answer naming any of them is right, and leaving its label out leaves them all out.
    """
    filed = [frozenset(f) | {y} for f, y in zip(filed, labels)] if filed is not None else [frozenset((y,)) for y in labels]
    top1: dict[str, float] = {}
    calib = OpenSetCalibration(target_far=target_far)
    weights: dict[str, float] = {}
    embeddings: np.ndarray | None = None
    names = sorted(set(labels) | {c["name"] for c in rec.characters()})
    rec.n_candidates = max(rec.n_candidates, len(names))
    probs: dict[str, np.ndarray] = {}  # clip and model: each known picture's probability per character, for the fusion blend
    cosines: np.ndarray | None = None  # clip: each known picture's gallery cosine per character (fusion's open-set score)
    fit = rec.config.fusion.fit_gallery_weight and rec.fusion_weight is None
    judge = rec.whitened if "fusion" in modes else None  # fusion's judge of the trained characters, when the version has one
    for mode in modes:
        if mode == "fusion" and fit and {"clip", "model"} <= probs.keys():  # scored with the blend it will answer with
            calib.gallery_weight = rec.fusion_weight = fit_gallery_weight(probs["clip"], probs.get("whitened", probs["model"]),
                                                                               probs["labels"], filed=probs["filed"])
        need_tags = rec.reranker is not None and rec.tagger is not None
        scored = rec._score(images, mode, need_tags, False)
        if mode == "clip":
            embeddings = scored.embeddings
        top1[mode] = float(np.mean([bool(c) and c[0][0] in f for c, f in zip(scored.candidates, filed)]))
        known = [i for i, y in enumerate(labels) if y in names]
        if len(set(labels)) >= 2:
            m = _score_matrix(scored.candidates, names)
            y_idx = [names.index(labels[i]) for i in known]
            mask = np.array([[n in filed[i] for n in names] for i in known], bool).reshape(len(known), len(names))
            if mode == "clip":  # fusion below is scored, thresholded and chosen with the temperature it will answer with
                calib.gallery_temperature = rec.fusion_temperature = fit_temperature(m[known], y_idx, filed=mask)
                probs["clip"] = np.stack([gallery_probabilities(row, calib.gallery_temperature) for row in m[known]])
                probs["labels"], probs["filed"] = np.asarray(y_idx), mask
                cosines = m[known]
                if judge is not None and embeddings is not None:  # its temperature, fitted as the gallery's
                    ws = judge.scores_for(embeddings[known], names)
                    calib.whitened_temperature = rec.whitened_temperature = fit_temperature(ws, y_idx, filed=mask)
                    probs["whitened"] = judge.probabilities(embeddings[known], names, calib.whitened_temperature)
            elif mode == "model":
                probs["model"] = np.clip(m[known], 0.0, None)  # -1 marks a character the classifier does not know
            # fusion's gate is the best gallery cosine (`openset` docstring), on the pictures fusion answers right
            kind = GALLERY_COSINE if mode == "fusion" and cosines is not None else TOP
            g, imp = leave_one_out_scores(cosines if kind == GALLERY_COSINE else m[known], y_idx, renormalise=(mode == "model"), filed=mask)
            right = mask[np.arange(len(known)), m[known].argmax(1)]  # refusing a wrong answer costs nothing: only right ones count
            calib.modes[mode] = calibrate(g[right] if right.any() else g, imp, target_far, 1.0 - max_false_reject, score=kind)
        if need_tags and scored.tag_probs is not None:
            aligned = rec.reranker.align(scored.tag_probs, rec.tagger.tag_names)
            if tag_truth is not None and rec.reranker.noise is None:
                truth = np.array([[t in set(tags) for t in rec.reranker.tags] for tags in tag_truth])
                usable = rec.reranker.fit_tagger_noise(aligned, truth, tagger_id=getattr(rec.tagger, "model_id", ""))
                _log.info(f"tagger noise model: {usable} of {len(rec.reranker.tags)} profile tags usable")
            if tune:
                # the classifier's own tag head sees what the embedding sees: reranking with it must beat no reranking
                # by more than noise, where a tagger of its own keeps its default weight on a tie
                own = is_own_tag_head(rec.tagger)
                weights[mode], _ = tune_weight(rec.reranker, scored.candidates, aligned, labels, mode=mode,
                                               default=0.0 if own else None, beat_noise=own)
            w = weights.get(mode, rec.reranker.weight_for(mode))
            hits = [rec.reranker.rerank(c, a, weight=w, mode=mode).candidates[0][0] in f for c, a, f in zip(scored.candidates, aligned, filed) if c]
            top1[f"{mode}+rerank"] = float(np.mean(hits))
    blend = None
    if calib.gallery_weight is not None and "model" in probs:
        blend = {"names": names, "known": known, "model": probs["model"], "labels": probs["labels"], "filed": probs["filed"]}
    return SplitEvaluation(top1, calib, weights, embeddings, blend, judge if "whitened" in probs else None)


def refit_gallery_weight(gallery: Gallery, embeddings: np.ndarray, blend: Mapping[str, Any], temperature: float | None,
                         whitened: tuple[WhitenedGallery, float] | None = None) -> float:
    """Fusion's weight fitted again once the held-out pictures joined the gallery: each scored against that gallery, the
    one a user's query meets, with its own row and copies left out (`Gallery.scores_without_copies`) instead of against
    the smaller gallery built without them. The first fit underrated the gallery: with the rows added, the weight so
    refitted named more set-aside pictures on `newgame_full` and as many on the other sets (docs/accuracy.md "Fusion's
    weight fitted on the gallery it answers with"). `whitened` (the judge and its temperature, the pictures' rows in
    it too) stands in for the classifier, each picture scored without its own row there as well."""
    names, known = list(blend["names"]), list(blend["known"])
    queries = np.asarray(embeddings, np.float32)[known]
    cos = _score_matrix(gallery.search(queries, k=len(names)), names)
    for r, (q, filed) in enumerate(zip(queries, np.asarray(blend["filed"], bool))):
        own = gallery.scores_without_copies(q, [n for n, f in zip(names, filed) if f])  # its copies are where it is filed
        for n, s in own.items():
            cos[r, names.index(n)] = s
    probs = np.stack([gallery_probabilities(row, temperature) for row in cos])
    trained = blend["model"] if whitened is None else whitened[0].probabilities(queries, names, whitened[1], leave_out_copies=True)
    return fit_gallery_weight(probs, trained, blend["labels"], filed=blend["filed"])


def build_recognition_folder(data_root: str | Path, out_dir: str | Path, cfg: Mapping[str, Any], model_ckpt: str | Path | None = None,
                             val_fraction: float = 0.2, seed: int = 42, target_far: float = 0.05, dedupe: bool = True,
                             include_val: bool = True, progress: Callable[[int, int], None] | None = None,
                             split: tuple[Sequence[str], Sequence[str]] | None = None, onnx: bool = False,
                             max_false_reject: float = DEFAULT_MAX_FALSE_REJECT,
                             check: Callable[[], None] | None = None) -> BuildReport:
    """Dataset folder -> gallery + tag profiles + calibration (+ model.ckpt copy) in `out_dir`, tuned on a leak-free split.

    `split` = (train file names, val file names) reuses a split made elsewhere (a training run's manifest)
    instead of computing one from `val_fraction` and `seed`; files in neither list are left out. `onnx` also
    exports the folder's networks for ONNX Runtime (what `runtime: auto` then uses). Open-set thresholds aim at
    `target_far` of unseen characters named, refusing at most `max_false_reject` of known pictures answered right.
    `check()` raises to cancel an embedding that runs over processes (``gallery_build.trainer``).
    """
    from ..data.layout import filed_characters, scan_dataset, stratified_group_split
    from ..fsutil import file_sha256
    from .embedder import MirrorAveraged, build_embedder

    max_false_reject = check_max_false_reject(max_false_reject)  # before minutes of embedding, not after
    cfg = dict(_plain(cfg) or {})
    gcfg = dict(cfg.get("gallery_build") or {})
    embed_runtime = str(gcfg.get("runtime", "auto"))
    if embed_runtime not in BUILD_RUNTIMES:
        raise ConfigError(f"gallery_build.runtime={embed_runtime!r}: choose one of {', '.join(BUILD_RUNTIMES)} (auto embeds on "
                          "ONNX Runtime when the build exports the version's classifier)")
    root, out = Path(data_root), Path(out_dir).resolve()  # absolute: the version folder's relative file names resolve once
    records = scan_dataset(root)
    if split is not None:
        train_set, val_set = set(split[0]), set(split[1])
        train = [r for r in records if r.file_name in train_set]
        val = [r for r in records if r.file_name in val_set]
    elif val_fraction > 0:
        if dedupe:
            from ..data.dedupe import assign_duplicate_groups

            assign_duplicate_groups(records, root)
        made = stratified_group_split(records, val_fraction, seed)
        val_set = set(made.val)
        train = [r for r in records if r.file_name not in val_set]
        val = [r for r in records if r.file_name in val_set]
    else:
        train, val = list(records), []
    out.mkdir(parents=True, exist_ok=True)
    if model_ckpt:
        if Path(model_ckpt).resolve() != (out / MODEL).resolve():
            shutil.copy2(model_ckpt, out / MODEL)
    ecfg = dict(cfg.get("embedder") or {"kind": "timm"})
    if ecfg.get("kind") == "classifier":
        if not (out / MODEL).is_file() and not ecfg.get("ckpt_path"):
            raise ConfigError("embedder=classifier needs --model-ckpt (or embedder.ckpt_path)")
        ecfg["ckpt_path"] = MODEL if (out / MODEL).is_file() else str(Path(ecfg["ckpt_path"]).resolve())
    embedder = build_embedder(ecfg, base_dir=out)
    distributed = bool(gcfg.get("distributed") or gcfg.get("trainer"))
    exported = _export_classifier_first(out, ecfg, embedder) if onnx and embed_runtime == "auto" and not distributed else None
    if exported is not None:
        embedder = exported[1]
    items = [(r.character, r.series, _safe_loader(r.path(root)), r.file_name) for r in train]
    saved_cfg = {k: v for k, v in ecfg.items() if k != "device"}  # where it ran is not part of the gallery: it loads anywhere
    flip_rows = bool(gcfg.get("flip_rows", False)) and not ecfg.get("flip_tta")  # queries flipped too: rows are already
    row_embedder = MirrorAveraged(embedder) if flip_rows else embedder
    if distributed:  # Lightning predict, over processes/GPUs/nodes with a DDP trainer
        from .predict import build_gallery_predicted

        gallery = build_gallery_predicted(root, train, {**ecfg, "flip_tta": True} if flip_rows else ecfg, out, gcfg, saved_cfg,
                                          progress, check)
    else:  # in-process: faster for small sets (no Lightning start-up; docs/recognition.md "Embedding on a cluster")
        gallery = Gallery.build(items, row_embedder, index=gcfg.get("index"), prototypes=gcfg.get("prototypes"),
                                aggregate=gcfg.get("aggregate", DEFAULT_AGGREGATE), embedder_config=saved_cfg, progress=progress)
    gallery.save(out)
    (out / WHITENED_GALLERY).unlink(missing_ok=True)  # an earlier build's: this one fits its own below, or has none
    has_tags = any(r.tags for r in train)
    if has_tags:
        TagReranker.fit(train, min_tag_count=int(gcfg.get("min_tag_count", 2))).save(out)
    report = BuildReport(str(out), len(gallery.characters()), len(train), len(val), len(gallery), embedder.model_id)
    if val:
        loaded = [(img, r) for r in val if (img := _safe_loader(r.path(root))()) is not None]
        vimgs, vlabels = [img for img, _ in loaded], [r.character for _, r in loaded]
        rcfg = {**cfg, "detector": None, "openset": {"enabled": False}, "cache_size": 0}
        rec = Recognizer.from_version(out, rcfg)
        modes = [m for m in MODES if m == "clip" or (out / MODEL).is_file()]
        train_shas: list[str] = []  # hashed once, for the whitened gallery's first fit and its refit
        if "fusion" in modes and rec.config.fusion.whitened:
            train_shas = [file_sha256(r.path(root)) for r in train]
            whitened = fit_whitened_gallery(gallery, train, train_shas)
            if whitened is not None:
                whitened.save(out)
        # a group picture answered with another character it shows is right (its copies are all on the val side:
        # splits keep a group together)
        val_shas = [file_sha256(r.path(root)) for _, r in loaded]
        shows = filed_characters([r for _, r in loaded], val_shas)
        ev = evaluate_split(rec, vimgs, vlabels, modes, target_far, max_false_reject=max_false_reject,
                            tag_truth=[r.tags for _, r in loaded], filed=[shows[r.file_name] for _, r in loaded])
        top1, calib, weights = ev.top1, ev.calibration, ev.weights
        calib.save(out)
        report.top1, report.rerank_weights = top1, weights
        report.thresholds = {m: t.threshold for m, t in calib.modes.items()}
        if rec.reranker is not None and (weights or rec.reranker.noise is not None):
            rec.reranker.mode_weights.update(weights)
            rec.reranker.save(out)
        vemb = ev.embeddings if ev.embeddings is not None else embedder.embed(vimgs)  # same embedder, same images
        save_eval_set(out, gallery, [r for _, r in loaded], root, vemb, calib, top1, val_shas)
        if include_val:  # thresholds are set; the final gallery also learns from the held-out images (one view each, as
            # they were scored: their rows are then found again as their own when fusion's weight is fitted once more)
            for character in sorted(set(vlabels)):
                idx = [i for i, y in enumerate(vlabels) if y == character]
                recs = [loaded[i][1] for i in idx]
                gallery.add(character, recs[0].series, vemb[idx], [r.file_name for r in recs], embedder_id=embedder.model_id)
            gallery.save(out)
            report.rows = len(gallery)
            judge = None
            if ev.whitened is not None and calib.whitened_temperature is not None:  # the judge learns them too
                refitted = fit_whitened_gallery(gallery, train + [r for _, r in loaded], train_shas + val_shas)  # every row
                if refitted is not None:
                    refitted.save(out)
                    # its temperature stays the first fit's: with the held-out rows in its covariance those pictures
                    # separate perfectly, and a refit would say how sure it is of pictures it was fitted on, not new ones
                    judge = (refitted, calib.whitened_temperature)
                else:  # too many rows now: the classifier judges, as the weight below is then fitted
                    (out / WHITENED_GALLERY).unlink(missing_ok=True)
                    calib.whitened_temperature = None
                    calib.save(out)
            if ev.blend is not None:  # fusion answers with this gallery: its weight is fitted on it
                first = calib.gallery_weight
                calib.gallery_weight = refit_gallery_weight(gallery, vemb, ev.blend, calib.gallery_temperature, judge)
                calib.save(out)
                _log.info(f"fusion's gallery weight {first} -> {calib.gallery_weight} with the held-out pictures in the gallery")
    if onnx:
        from .onnx_export import export_into, manifest_entry

        report.onnx = manifest_entry(exported[0] if exported is not None else export_into(out))
    return report


def fit_whitened_gallery(gallery: Gallery, records: Sequence[Any], sha256: Sequence[str]) -> WhitenedGallery | None:
    """Fusion's judge of the trained characters (`whitened.WhitenedGallery`) from the gallery's rows, its covariance
    fitted on the rows of pictures filed under one character (`layout.filed_characters` of `records` and their content
    hashes `sha256`: a group picture's copies are left out of it), each picture once (a duplicate adds no variation);
    None when the gallery is too big to copy (`whitened.MAX_ROWS`) or too small to fit."""
    from ..data.layout import filed_characters
    from ..errors import GalleryError

    if len(gallery) > MAX_ROWS:
        _log.info(f"no whitened gallery: {len(gallery)} rows is more than {MAX_ROWS}; fusion judges trained characters with the classifier")
        return None
    vectors, characters, sources = gallery.live_rows()
    filed, sha_of = filed_characters(records, sha256), {r.file_name: h for r, h in zip(records, sha256)}
    seen: set[str] = set()
    counted = []  # a picture counts once: filed under one character, and not a byte-identical copy of one counted
    for s in sources:
        h = sha_of.get(s, s)
        counted.append(len(filed.get(s, ())) <= 1 and h not in seen)
        seen.add(h)
    try:
        return WhitenedGallery.fit(vectors, characters, counted, depths={c: gallery.depth(c) for c in set(characters)})
    except GalleryError as exc:
        _log.warning(f"no whitened gallery ({exc}); fusion judges trained characters with the classifier")
        return None


def _export_classifier_first(out: Path, ecfg: Mapping[str, Any], embedder: Any) -> tuple[dict[str, Any], Any] | None:
    """When the gallery embedder is the version's own classifier on the CPU: export it now (``onnx.json`` content) and
    return it with the embedder that runs that export on ONNX Runtime (same model id, views and embeddings), so the
    gallery and the val pictures are embedded 1.7x faster than by torch (docs/recognition.md); None otherwise."""
    from .onnx_export import export_into
    from .runtime import OnnxVersion
    from .views import bare_network

    network = bare_network(embedder)
    if (ecfg.get("kind") != "classifier" or ecfg.get("ckpt_path") != MODEL or str(getattr(network, "device", "")) != "cpu"
            or (out / GALLERY_META).is_file()):  # a gallery already there would join the export: export at the end
        return None
    meta = export_into(out)  # the folder holds model.ckpt alone yet: the export is the classifier's, as at the end
    ort = OnnxVersion.load(out, device="cpu")
    twin = ort.wrapped_embedder(ecfg, embedder.model_id, out / MODEL, getattr(network, "model", None)) if ort is not None else None
    if twin is None:
        _log.warning("the exported classifier does not reproduce the gallery embedder; embedding with torch")
        return None
    return meta, twin


def save_eval_set(out: Path, gallery: Gallery, records: Sequence[Any], root: Path, embeddings: Any, calib: Any,
                  top1: Mapping[str, Any], sha256: Sequence[str]) -> None:
    """The version's evaluation set (the held-out pictures, their embeddings, content hashes `sha256` and paths) and its
    own figures on it before the held-out pictures join the gallery: top-1 per mode, per character and open-set false
    rejects."""
    from ..fsutil import atomic_write_json
    from ..versionfiles import EVAL_METRICS
    from .evalset import EvalSet, score_gallery

    paths = [r.path(root) for r in records]
    evalset = EvalSet(embeddings, [r.character for r in records], gallery.embedder_id,
                      sha256=list(sha256), paths=[str(p.resolve()) for p in paths])
    evalset.save(out)
    clip = score_gallery(gallery, evalset, calib.threshold("clip") if calib is not None else None)
    atomic_write_json(out / EVAL_METRICS, {"pictures": len(evalset), "top1": dict(top1), "clip": clip})
