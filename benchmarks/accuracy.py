"""One accuracy table for telling characters apart: every real set in ``$ARD_DATA_DIR`` (default ../shared/data) and
the synthetic sameface set, leak-free splits, several seeds, the frozen baseline beside each training recipe.

Per set, seed and recipe (a list of `train.py` overrides on top of the workflow's own training recipe,
read from conf/workflow.yaml so "recipe" is always what the workflow trains today):

* **closed set** (`--protocols closed`): train on the split's train side, build the version exactly as the
  workflow does (`recognition.build.build_recognition_folder`: classifier gallery, calibration, eval set),
  then the val pictures through the real `Recognizer` in clip / model / fusion and in the default
  (``auto``) mode; the share of known characters' pictures answered ``unknown`` with open-set on (false rejects);
* **unseen characters** (`--protocols unseen`): train with 2 characters held out entirely (a group picture that shows
  one of them leaves the trained characters' folders too); enrol them from 5 pictures each without retraining and
  report their top-1 (clip and fusion) and the others'; before enrolling, the share of their pictures answered
  ``unknown`` at the calibrated threshold and the AUROC of the best score (known val pictures vs the unseen
  characters' pictures that show no trained character);
* **pictures of several characters**: a booru group picture is filed once per character tagged on it (found as the
  clean stage finds copies: pHash). Top-1 counts each file against its folder ("strict", as every table before);
  beside it the default answer counted right when it names any character the picture is filed under, and the
  strict ceiling (one answer per picture can be right for one of its copies only). Enrolled characters are scored
  the any-character way, on pictures that share no copy with the 5 enrolled;
* CPU minutes of training per run (user + system, this process and its workers).

**Test pictures** (`--test-fraction`, default 0.2): before training, a leak-free share of each known character's
pictures (near-duplicates kept together, by the data module's own pHash grouping) is set aside; the run trains,
early-stops, calibrates its open-set threshold and picks its default mode on the rest (whose val pictures then join
the gallery, as in every version the workflow builds), and every closed-set figure,
known-refused share and "others" figure is scored on the set-aside pictures only, which no step of building the
version has seen. `--test-fraction 0` scores on the version's own held-out pictures (the protocol before this
option: there the default mode is chosen on the pictures it is scored on).

Baseline, same split, same run: frozen ImageNet Lite0 features in the same gallery (the data README's family
of recipe), built and queried through the same code. Pictures per set land in ``--out``: open-set score
histograms (known vs unseen, threshold drawn), per-character top-1 bars, and the confusion matrix.

    python benchmarks/accuracy.py                                   # every set, 3 seeds, recipes in RECIPES
    python benchmarks/accuracy.py --sets newgame_faces sameface --seeds 0 --recipes recipe identity -o trainer.max_epochs=6
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from _common import REPO, data_dir, held_out, quiet

from anime_role_detect.fsutil import atomic_write_json, fingerprint
from anime_role_detect.workflow.training_bridge import FACE_VIEW_SETTINGS

REAL_SETS = ("newgame_full", "newgame_faces", "faces6", "mixed5")
SYNTHETIC = "sameface"
HEAD = f"data.face_view={FACE_VIEW_SETTINGS['head']}"  # head + figure views, as the workflow sets them
TEN_EPOCHS = ["trainer.max_epochs=10", "callbacks.early_stopping.patience=4"]  # the schedule before head views
#: recipe name -> train.py overrides on top of the workflow's training recipe
RECIPES: dict[str, list[str]] = {
    "recipe": [],  # the workflow's: head + figure views, 6 epochs (conf/workflow.yaml train.face_view: head)
    "figure": [f"data.face_view={FACE_VIEW_SETTINGS['false']}", *TEN_EPOCHS],  # figure only, 10 epochs: the workflow's recipe before head views
    "identity": ["model.embedding.dim=256"],
    "supcon": ["model.embedding.dim=256", "model.embedding.loss=supcon", "data.balance=pk"],  # in-batch, P x K batches
    "letterbox": ["data.resize=letterbox"],  # the whole picture padded to a square; measured 2026-12-06, not adopted
    "hue_jitter": ["data.augment.color_jitter=[0.2,0.2,0.2,0.02]"],  # the augmentation before issue 11
    "long": ["trainer.max_epochs=20", "callbacks.early_stopping.patience=8"],
    "ema": ["callbacks=[default,ema]"],  # moving average of the weights, horizon a tenth of the run (training/ema.py)
    "res288": ["data.image_size=288"],  # resolution: 288 px instead of the workflow's 224 (about 1.65x the compute)
    "crop30": ["data.augment.scale=[0.3,1.0]"],  # random crops down to 30% of the picture (default 60%): parts of a figure, as head views are
    "lr3e4": ["model.optimizer.lr=3.0e-4"],  # the body's learning rate before 2026-12-05 (Lite0's own; the recipe's is 1e-3)
    # all 6 epochs: at 1e-3 val/acc can peak in epoch 0 and patience 3 ended the schedule (the workflow's since 2026-12-05)
    "noearlystop": ["~callbacks.early_stopping"],
    # between the two: does it keep 1e-3's gain on the look-alike sets without its mixed5 and enrolment losses?
    "lr6e4": ["model.optimizer.lr=6.0e-4"],
    # layer-wise rate decay: Lite0's top layer at the recipe's 1e-3, each of its 16 layers below 0.85x the one above
    # (the stem at 7%): keep the early, generic features mixed5 and enrolment lean on, adapt the late ones
    "ld85": ["model.optimizer.layer_decay=0.85"],
    "lr2e3": ["model.optimizer.lr=2.0e-3"],  # twice the recipe's body learning rate (heads 10x it), same 6 epochs
    # no label smoothing (Lite0's config sets 0.1); measured 2026-12-06, not adopted (docs/accuracy.md "Framing and label smoothing")
    "nosmooth": ["model.label_smoothing=0.0"],
    # a group picture (filed under every character it shows) trains towards any of them, not each copy towards its own
    # label; the other real sets hold no such pictures, so only newgame_full can move
    "partial": ["model.partial_labels=true"],  # the default since 2026-12-06 (docs/accuracy.md "Group pictures ...")
    "ownlabel": ["model.partial_labels=false"],  # each group copy towards its own label: the recipe before that
    # a longer weight average (about the last third of the run) against seed-to-seed swings at 1e-3; `ema` is a tenth
    "ema30": ["callbacks=[default,ema]", "callbacks.ema.horizon=0.3", "callbacks.ema.start_fraction=0.3"],
    # the animeface face instead of the head view (Hydra merges the mapping: margin and detector are set again)
    "faceview": ["data.face_view={enabled:true,weight:0.5,margin:0.1,detector:{kind:animeface}}", *TEN_EPOCHS],
    "headview": [HEAD, *TEN_EPOCHS],  # head + figure views, 10 epochs (10/6 of the recipe's training)
    # head + figure at the figure-only run's cost: each picture is one sample per epoch, its head view half the time
    "headmix": [HEAD, "data.view_sampling=either", *TEN_EPOCHS],
    # a longer schedule now that channels-last training takes 0.6-0.7x the CPU: 8 epochs at the recipe's 1e-3 (4/3 of it)
    "ep8": ["trainer.max_epochs=8"],
    # the 6 epochs before that (the workflow's recipe is 8 since 2026-12-06): what the longer schedule did to open-set
    "ep6": ["trainer.max_epochs=6"],
}
#: evaluation variant -> infer.yaml overrides for building a second version from the same checkpoint
EVAL_VARIANTS: dict[str, list[str]] = {
    "noflip": ["embedder.flip_tta=false"],  # the classifier gallery without flip TTA: accuracy vs time
    "flip": ["embedder.flip_tta=true"],  # ... and with it (off by default since 2026-12-02): each picture and its mirror
    "fliprows": ["gallery_build.flip_rows=true"],  # the gallery's rows alone as the mean of a picture and its mirror
    "figure": ["embedder.face_view={enabled:false}"],  # a faceview checkpoint recognising the figure view alone
    "faceonly": ["embedder.face_view={enabled:true,weight:1.0}"],  # ... the face view alone (figure when no face is found)
    "colour": ["embedder.colour=0.3"],  # the colour histogram joined to the gallery embedding (recognition/colour.py)
    "fitw": ["fusion.fit_gallery_weight=true"],  # fusion's blend fitted on the version's held-out pictures (the default since 2026-12-06)
    "half": ["fusion.fit_gallery_weight=false"],  # fusion half and half: the default before 2026-12-06
    "max": ["gallery_build.aggregate=max"],  # a character's best row is its score (top3_mean: the mean of its best three)
    # every character scored on the same share of its rows (recognition/gallery.py)
    "balanced": ["gallery_build.aggregate=balanced"],
    "top3": ["gallery_build.aggregate=top3_mean"],  # the default, named: a character's best three rows, whatever its row count
    # the picture's top centre (detector `region`) as a second view beside the figure: a head view with no face detector
    "headcrop": ["embedder.face_view={enabled:true,weight:0.5,margin:0.0,detector:{kind:region}}"],
}
#: answer variant -> recognizer settings the recipe's own version is asked with (nothing is built again)
ANSWER_VARIANTS: dict[str, dict[str, Any]] = {
    # fusion's rule for an enrolled character before 2026-12-06: blended with the classifier's 1 - top probability
    "leftover": {"fusion": {"untrained": "leftover"}},
    "nomirror": {"enrol": {"mirror": False}},  # enrolment from the pictures alone, before 2026-12-06 (no mirror-image rows)
}
#: evaluation variants the frozen baseline is built with too: how a gallery scores its rows is the protocol, so the
#: baseline beside a variant is scored the same way (`baseline+max` ...)
BASELINE_VARIANTS = ("max", "balanced", "top3")
#: evaluation variant -> the checkpoint file next to the best one that its version is built from instead
CHECKPOINT_VARIANTS: dict[str, str] = {
    "final": "last.ckpt",  # the weights at the end of the schedule, not the epoch with the best val/acc
}
MODES = ("clip", "model", "fusion")
HELD_OUT = 2
ENROL_SHOTS = 5


@dataclass
class Run:
    """One (set, seed, recipe, protocol) row of the table."""

    set: str
    seed: int
    recipe: str
    protocol: str
    test_fraction: float = 0.0  # share of pictures set aside before training and scored (0: the version's own val)
    pool: str = "raw"  # what trained and built the version: "raw" (every pool picture) or "clean" (the workflow's clean
    #                    stage); runs saved before --pool existed were all raw
    top1: dict[str, float] = field(default_factory=dict)  # mode -> top-1 on known characters' val pictures
    top1_any: dict[str, float] = field(default_factory=dict)  # mode -> ... right when naming any character the picture is filed under
    ceiling: float = float("nan")  # the best strict top-1 one answer per picture can reach (group pictures: one copy right)
    default_mode: str = ""
    false_reject: float = float("nan")  # known pictures answered unknown (default mode, open-set on)
    refused_right: float = float("nan")  # ... of those the closed default answered right (the cost of open-set)
    refused_wrong: float = float("nan")  # ... of those it answered wrong (what open-set saves from a wrong name)
    unseen_rejected: float = float("nan")  # unseen characters' pictures answered unknown before enrolment
    auroc: float = float("nan")
    enrolled_top1: dict[str, float] = field(default_factory=dict)  # mode -> top-1 of the enrolled characters
    unseen_pictures: int = 0  # the held-out characters' pictures that show no trained character
    others_top1: dict[str, float] = field(default_factory=dict)  # mode -> top-1 of the trained ones after enrolment
    train_cpu_min: float = 0.0
    ms_per_image: float = float("nan")  # closed-set recognition in the default mode, batches of 32, this machine
    per_character: dict[str, float] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)  # known / unseen best scores, for the histogram
    threshold: float | None = None
    confusion: dict[str, Any] = field(default_factory=dict)


# -- data -------------------------------------------------------------------------------------------
def set_root(name: str, work: Path) -> Path | None:
    """The set's folder: a real one under data_dir(), or the synthetic sameface set generated into `work`."""
    if name == SYNTHETIC:
        from anime_role_detect.data.synthetic import generate_dataset, make_characters

        root = work / "sameface-data"
        if not root.is_dir():  # every character a near-twin of another: one attribute tells them apart
            generate_dataset(root, size=128, seed=7, images_per_character=40, characters=make_characters(8, seed=3, twin_fraction=1.0))
        return root
    root = data_dir() / name
    if not root.is_dir():
        print(f"skip {name}: {root} not found (set ARD_DATA_DIR)", file=sys.stderr)
        return None
    return root


def held_out_characters(root: Path, seed: int) -> list[str]:
    from anime_role_detect.data.layout import scan_dataset

    return held_out({r.character for r in scan_dataset(root)}, seed, HELD_OUT)


def subset(root: Path, drop: Sequence[str], out: Path, keep_files: set[str] | None = None,
           drop_files: set[str] = frozenset()) -> Path:
    """`root` without the characters in `drop` and the files in `drop_files` (with `keep_files`, only those), as hard links."""
    from anime_role_detect.data.layout import scan_dataset
    from anime_role_detect.fsutil import link_or_copy

    if not out.is_dir():
        for r in scan_dataset(root):
            if r.character not in drop and r.file_name not in drop_files and (keep_files is None or r.file_name in keep_files):
                link_or_copy(r.path(root), out / r.file_name)
    return out


@dataclass(frozen=True)
class Picture:
    """What a file of a set shows: its near-duplicate cluster across every folder, and the characters it is filed under."""

    cluster: int
    characters: frozenset[str]


def pictures_of(root: Path, cache: Path, max_distance: int) -> dict[str, Picture]:
    """Every file of `root` -> its `Picture`, found as the clean stage finds copies (pHash within `max_distance`): a booru
    group picture is collected once per character tagged on it, so its copies sit in several folders."""
    from collections import defaultdict

    from anime_role_detect.data.dedupe import near_duplicate_clusters, perceptual_hash
    from anime_role_detect.data.layout import scan_dataset
    from anime_role_detect.imageio import load_image

    if cache.is_file():
        return {f: Picture(c, frozenset(cs)) for f, (c, cs) in json.loads(cache.read_text()).items()}
    records = scan_dataset(root)
    clusters = near_duplicate_clusters([perceptual_hash(load_image(r.path(root))) for r in records], max_distance)
    chars: dict[int, set[str]] = defaultdict(set)
    for r, c in zip(records, clusters):
        chars[c].add(r.character)
    got = {r.file_name: Picture(int(c), frozenset(chars[c])) for r, c in zip(records, clusters)}
    atomic_write_json(cache, {f: [p.cluster, sorted(p.characters)] for f, p in got.items()})
    return got


def strict_ceiling(files: Sequence[str], pics: dict[str, Picture]) -> float:
    """The best strict top-1 on `files` if every copy of a picture gets one answer: a group picture's copies filed under
    k characters give at most one right answer among them."""
    from collections import Counter

    by_cluster: dict[int, Counter] = {}
    for f in files:
        by_cluster.setdefault(pics[f].cluster, Counter())[f.split("/")[0]] += 1
    return sum(max(c.values()) for c in by_cluster.values()) / max(1, len(files))


def workflow_clean() -> dict[str, Any]:
    """conf/workflow.yaml's `clean:` options: what the workflow's clean stage does to collected pictures."""
    from anime_role_detect.confutil import compose_plain

    return dict(compose_plain("workflow")["clean"])


def clean_pool(root: Path, out: Path, options: dict[str, Any]) -> Path:
    """`root` through the workflow's own clean stage: what a workflow run trains on (near-duplicate copies and
    pictures filed under several characters kept or dropped as `clean.near_duplicates` / `clean.ambiguous` say)."""
    from anime_role_detect.data.layout import METADATA_FILE, scan_dataset
    from anime_role_detect.workflow.clean import CleanConfig, clean_dataset

    if not (out / METADATA_FILE).is_file():  # clean_dataset writes it last
        kept, report = clean_dataset(scan_dataset(root), root, out, CleanConfig.from_mapping(options))
        print(f"  cleaned {root}: kept {len(kept)}, rejected {len(report.rejected)} ({report.reasons}), "
              f"{report.multi_character_pictures} pictures under several characters", file=sys.stderr, flush=True)
    return out


def set_aside_test(root: Path, seed: int, fraction: float, cache: Path) -> tuple[list[str], list[str]]:
    """(pool, test) file names of `root`: a stratified, near-duplicate-aware share `fraction` set aside for scoring."""
    from anime_role_detect.data.dedupe import assign_duplicate_groups
    from anime_role_detect.data.layout import scan_dataset, stratified_group_split

    if cache.is_file():
        got = json.loads(cache.read_text())
        return got["pool"], got["test"]
    records = scan_dataset(root)
    assign_duplicate_groups(records, root, 8)
    split = stratified_group_split(records, fraction, 7919 + seed)  # not the training split's seed stream
    atomic_write_json(cache, {"pool": split.train, "test": split.val})
    return split.train, split.val


# -- train / build / evaluate -----------------------------------------------------------------------
def workflow_recipe() -> list[str]:
    """The training overrides the workflow uses today: conf/workflow.yaml's face-view schedule, train.overrides and
    face view, in the order `workflow.training_bridge.compose_train_config` applies them."""
    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.workflow.training_bridge import face_view_setting, recipe_overrides

    tcfg = compose_plain("workflow")["train"]
    return [*recipe_overrides(tcfg), f"data.face_view={face_view_setting(tcfg.get('face_view', False))}"]


def cpu_seconds() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Trained:
    """What `train_run` keeps of a training run (cached in its folder, so a later invocation reuses it)."""

    ckpt_path: str
    split_path: str
    cpu_min: float
    overrides: list[str] = field(default_factory=list)  # everything the run was composed with beyond its paths
    config: str | None = None  # `training_fingerprint` of the composed config (None: recorded before 2026-12-06)


def training_fingerprint(cfg: Any, out: Path, root: Path) -> str:
    """What a training run was composed with (model, data, trainer, callbacks; its own folders left out): a changed
    default in conf/ (not only a changed override) makes a cached run another recipe's."""
    from omegaconf import OmegaConf

    kept = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "data", "trainer", "callbacks") if k in cfg}
    return path_free_fingerprint(kept, {out: "<run>", root: "<data>"})


def path_free_fingerprint(obj: Any, paths: dict[Path, str] | None = None) -> str:
    """`fingerprint` of a JSON-able object with the checkout's path (and `paths`, longest first) written as names, so
    worktrees and work folders share what they cached."""
    text = json.dumps(obj, sort_keys=True, default=str)
    for path, name in sorted({**(paths or {}), REPO: "<repo>"}.items(), key=lambda p: -len(str(p[0]))):
        text = text.replace(str(path), name)
    return fingerprint(json.loads(text))


def train_run(root: Path, seed: int, overrides: Sequence[str], out: Path, threads: int) -> Trained:
    from anime_role_detect.confutil import compose_config
    from anime_role_detect.training import train

    workflow = workflow_recipe()
    recipe = [*workflow, *overrides]
    cfg = compose_config("train", [*workflow, f"data.root={root}", f"data.split_dir={out}/splits", f"data.seed={seed}",
                                   f"seed={seed}", f"paths.root_dir={REPO}", f"paths.output_dir={out}", f"paths.data_dir={out}",
                                   "register=false", "evaluate=false", "logger=csv", "~callbacks.progress_bar",
                                   "+trainer.enable_progress_bar=false", f"threads={threads}", "log.console_level=WARNING",
                                   *overrides])
    composed = training_fingerprint(cfg, out, root)
    cached = out / "accuracy_run.json"
    if cached.is_file():
        got = Trained(**json.loads(cached.read_text()))
        if got.overrides != recipe or got.config not in (None, composed):  # the recipe or a conf/ default changed since
            raise SystemExit(f"{out} was trained with {got.overrides or 'overrides not recorded'} (config {got.config}), not "
                             f"{recipe} (config {composed}): give another --work folder (or delete that run) to train it again")
        if got.config is None:
            print(f"  {out}: trained before accuracy.py recorded configs; reused on its overrides alone", flush=True)
        if Path(got.ckpt_path).is_file():
            return got

    t0 = cpu_seconds()
    result = train(cfg)
    got = Trained(str(result.ckpt_path), str(result.split_path), (cpu_seconds() - t0) / 60, recipe, composed)
    atomic_write_json(cached, asdict(got))
    return got


#: what a cached version was built with (its checkpoint and `build_fingerprint`), beside its files
BUILD_RECORD = "accuracy_build.json"


def build_version(root: Path, out: Path, split: tuple[list[str], list[str]], ckpt: str | None, overrides: Sequence[str] = (),
                  rebuild: bool = False, include_val: bool = False) -> Path:
    """The version the workflow would build from `ckpt` (the frozen baseline without one); reused when built before
    with the same infer config, else (or with `rebuild`: the same checkpoint through the code checked out now) built
    again. A version is minutes to build, so a config change (e.g. conf/infer.yaml's default aggregate) rebuilds it.
    `include_val`: the val pictures join the gallery once the thresholds are set, as the workflow's versions do (scored
    on pictures set aside before training); without it the val pictures stay out, to score the version on them."""
    import shutil

    from anime_role_detect.confutil import compose_plain
    from anime_role_detect.recognition.build import build_recognition_folder

    cfg = compose_plain("infer", ["embedder=classifier" if ckpt else "embedder=lite0", "tagger=none", *overrides])
    built_with = {"checkpoint": ckpt and str(ckpt).replace(str(REPO), "<repo>"), "config": build_fingerprint(cfg),
                  **({"include_val": True} if include_val else {})}  # versions recorded before it kept val out
    if out.is_dir() and (rebuild or not built_as(out, built_with, cfg)):
        shutil.rmtree(out)
    if not (out / "gallery.json").is_file():
        build_recognition_folder(root, out, cfg, model_ckpt=ckpt, split=split, include_val=include_val, onnx=True)  # as the workflow
        atomic_write_json(out / BUILD_RECORD, built_with)
    return out


def built_as(out: Path, built_with: dict[str, Any], cfg: dict[str, Any]) -> bool:
    """Whether the version in `out` was built as `built_with` says. One built before the record existed is trusted
    when its gallery scores rows as `cfg` asks (the one build setting whose default has changed since)."""
    record = out / BUILD_RECORD
    if record.is_file():
        return json.loads(record.read_text()) == built_with
    meta = out / "gallery.json"
    return meta.is_file() and json.loads(meta.read_text()).get("aggregate") == cfg["gallery_build"]["aggregate"]


#: infer.yaml keys read only when a version answers or enrols, never when it is built: changing them builds nothing anew
ANSWER_ONLY_KEYS = ("enrol",)


def build_fingerprint(cfg: dict[str, Any]) -> str:
    """The infer config's hash without what names the checkout (its paths) or only answers (`ANSWER_ONLY_KEYS`), so
    worktrees share cached versions."""
    return path_free_fingerprint({k: v for k, v in cfg.items() if k != "paths" and k not in ANSWER_ONLY_KEYS})


def load(root: Path, files: Sequence[str]) -> list[tuple[Any, str]]:
    from anime_role_detect.imageio import load_image

    return [(load_image(root / f), f) for f in files]


def recognizer(version: Path, openset: bool, settings: dict[str, Any] | None = None) -> Any:
    """The version as `infer.py` answers with it (no detector: the pictures are the crops), plus an answer variant's settings."""
    from anime_role_detect.recognition.pipeline import Recognizer

    return Recognizer.from_version(version, {"detector": None, "cache_size": 0, "rerank": False, "openset": {"enabled": openset},
                                             **(settings or {})})


def answers(rec: Any, items: list[tuple[Any, str]], mode: str | None) -> list[Any]:
    out = []
    for i in range(0, len(items), 32):
        out += rec.recognize_batch(items[i : i + 32], mode=mode, rerank=False)
    return out


def top1(got: list[Any], labels: Sequence[str]) -> float:
    return float(np.mean([a.role == y for a, y in zip(got, labels)])) if labels else float("nan")


def top1_any(got: list[Any], characters: Sequence[frozenset[str]]) -> float:
    """Top-1 where an answer naming any character its picture is filed under counts as right."""
    return float(np.mean([a.role in cs for a, cs in zip(got, characters)])) if characters else float("nan")


def gate_score(answer: Any) -> float:
    """The score open-set judged the answer on (fusion: the best gallery cosine), else its similarity."""
    d = answer.detections[0] if answer.detections else None
    return d.openset_score if d is not None and d.openset_score is not None else answer.similarity


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """P(score of a known picture > score of an unseen one), ties half."""
    p, n = np.asarray(pos, float), np.asarray(neg, float)
    if not len(p) or not len(n):
        return float("nan")
    return float(((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n)))


def evaluate_closed(run: Run, version: Path, root: Path, val: list[str], pics: dict[str, Picture],
                    settings: dict[str, Any] | None = None) -> None:
    items = load(root, val)
    labels = [f.split("/")[0] for f in val]
    filed = [pics[f].characters for f in val]
    run.ceiling = strict_ceiling(val, pics)
    closed = recognizer(version, openset=False, settings=settings)
    answers(closed, items[:2], closed.mode)  # load the networks before timing
    for mode in closed.supported_modes():
        t0 = time.perf_counter()
        got = answers(closed, items, mode)
        if mode == closed.mode:
            run.ms_per_image = (time.perf_counter() - t0) * 1e3 / max(1, len(items))
        run.top1[mode] = top1(got, labels)
        run.top1_any[mode] = top1_any(got, filed)
        if mode == closed.mode:
            run.per_character = {c: top1([a for a, y in zip(got, labels) if y == c], [y for y in labels if y == c]) for c in sorted(set(labels))}
            run.confusion = {"labels": labels, "answers": [a.role for a in got]}
            right = np.array([a.role == y for a, y in zip(got, labels)], bool)
    run.default_mode = closed.mode
    run.top1["default"] = run.top1[closed.mode]
    run.top1_any["default"] = run.top1_any[closed.mode]
    opened = recognizer(version, openset=True, settings=settings)
    refused = np.array([a.unknown for a in answers(opened, items, None)], bool)
    run.false_reject = float(refused.mean())
    run.refused_right = float(refused[right].mean()) if right.any() else float("nan")
    run.refused_wrong = float(refused[~right].mean()) if (~right).any() else float("nan")


def evaluate_unseen(run: Run, version: Path, full_root: Path, val: list[str], held: list[str], pics: dict[str, Picture],
                    settings: dict[str, Any] | None = None) -> None:
    """Before enrolment: are the unseen characters refused? After 5-shot enrolment: are they named? Only their pictures
    that show no trained character count as unseen (a group picture with a trained one is that one's picture too)."""
    known_items = load(full_root, val)
    known_labels = [f.split("/")[0] for f in val]
    unseen = {c: sorted(f for f, p in pics.items() if f.split("/")[0] == c and p.characters <= set(held)) for c in held}
    run.unseen_pictures = sum(len(fs) for fs in unseen.values())
    opened = recognizer(version, openset=True, settings=settings)
    mode = opened.mode if opened.mode != "model" else "fusion"  # the classifier alone cannot name an enrolled character
    k_ans = answers(opened, known_items, mode)
    u_items = [it for c in held for it in load(full_root, unseen[c])]
    u_ans = answers(opened, u_items, mode)
    run.unseen_rejected = float(np.mean([a.unknown for a in u_ans]))
    run.false_reject = float(np.mean([a.unknown for a in k_ans]))
    run.scores = {"known": [gate_score(a) for a in k_ans], "unseen": [gate_score(a) for a in u_ans]}
    run.threshold = opened.calibration.threshold(mode) if opened.calibration is not None else None
    run.auroc = auroc(run.scores["known"], run.scores["unseen"])
    rec = recognizer(version, openset=False, settings=settings)
    rng = np.random.default_rng(run.seed)
    test_items, test_labels = [], []
    for c in held:
        files = list(unseen[c])
        rng.shuffle(files)
        files.sort(key=lambda f: len(pics[f].characters) > 1)  # enrol from pictures of the character alone (stable: shuffled within)
        shots = files[:ENROL_SHOTS]
        rec.enroll(c, "", [im for im, _ in load(full_root, shots)])
        rest = [f for f in files[ENROL_SHOTS:] if pics[f].cluster not in {pics[s].cluster for s in shots}]  # no copy of a shot
        test_items += load(full_root, rest)
        test_labels += [pics[f].characters for f in rest]
    for m in [m for m in ("clip", "fusion") if m in rec.supported_modes()]:
        run.enrolled_top1[m] = top1_any(answers(rec, test_items, m), test_labels)
        run.others_top1[m] = top1(answers(rec, known_items, m), known_labels)


def variant_checkpoint(best: str, variant: str) -> str:
    """The checkpoint `variant`'s version is built from: the best one, or its neighbour in `CHECKPOINT_VARIANTS`."""
    if variant not in CHECKPOINT_VARIANTS:
        return best
    path = Path(best).parent / CHECKPOINT_VARIANTS[variant]
    if not path.is_file():
        raise SystemExit(f"{path} is missing: variant {variant} needs it beside {best}; train the run again with another --work")
    import torch

    states = torch.load(path, map_location="cpu", weights_only=False).get("callbacks", {})
    if not any("'monitor': None" in k for k in states):  # before conf/callbacks' last_checkpoint: a copy of the best
        raise SystemExit(f"{path} was written by Lightning's save_last (a copy of the best epoch), not the final epoch: "
                         "train the run again with another --work")
    return str(path)


def one_run(name: str, root: Path, seed: int, recipe: str, protocol: str, work: Path, threads: int,
            extra: Sequence[str], variants: Sequence[str] = (), test_fraction: float = 0.0, pool_kind: str = "clean",
            rebuild: bool = False) -> list[Run]:
    """The recipe's run and the frozen baseline on the same split: [baseline, recipe, recipe+variant...]."""
    held = held_out_characters(root, seed) if protocol == "unseen" else []
    distance = int(workflow_clean().get("max_distance", 6))
    pics = pictures_of(root, work / f"{name}-pictures-d{distance}.json", distance)
    shows_held = {f for f, p in pics.items() if p.characters & set(held) and f.split("/")[0] not in held}
    # held out entirely: a group picture showing a held-out character leaves the trained characters' folders too
    known_root = subset(root, held, work / f"{name}-minus-{'-'.join(held)}{'-alone' if shows_held else ''}",
                        drop_files=shows_held) if held else root
    tag = f"{name}/{protocol}/s{seed}" + (f"/t{test_fraction:g}" if test_fraction else "")
    train_root, test = known_root, None
    if test_fraction:
        pool, test = set_aside_test(known_root, seed, test_fraction, work / tag / "test_split.json")
        train_root = subset(known_root, [], work / tag / "pool", keep_files=set(pool))
    runs_dir = work / tag
    if pool_kind == "clean":  # the set-aside pictures stay as they are: they stand for a user's uploads
        options = workflow_clean()
        runs_dir = work / tag / f"clean-{fingerprint(options)[:8]}"  # another clean setting trains and builds anew
        train_root = clean_pool(train_root, runs_dir / "pool", options)
    result = train_run(train_root, seed, [*RECIPES[recipe], *extra], runs_dir / recipe, threads)
    cpu_min = result.cpu_min
    split = json.loads(Path(result.split_path).read_text())
    sp = (split["train"], split["val"])
    scored = test if test is not None else sp[1]
    out = []
    builds = [("baseline", None, []), (recipe, result.ckpt_path, []),
              *((f"baseline+{v}", None, EVAL_VARIANTS[v]) for v in variants if v in BASELINE_VARIANTS),
              *((f"{recipe}+{v}", variant_checkpoint(result.ckpt_path, v), EVAL_VARIANTS.get(v, [])) for v in variants
                if v not in ANSWER_VARIANTS)]
    asked = [(f"{recipe}+{v}", ANSWER_VARIANTS[v]) for v in variants if v in ANSWER_VARIANTS]
    for rname, ckpt, infer_overrides in builds:
        version = build_version(train_root, runs_dir / f"version-{rname}", sp, ckpt, infer_overrides, rebuild, include_val=test is not None)
        for label, settings in [(rname, None), *(asked if rname == recipe else [])]:  # answer variants: the recipe's version
            run = Run(name, seed, label, protocol, test_fraction, pool_kind, train_cpu_min=0.0 if ckpt is None else cpu_min)
            if protocol == "closed":
                evaluate_closed(run, version, known_root, scored, pics, settings)
            else:
                evaluate_unseen(run, version, root, scored, held, pics, settings)
            out.append(run)
            print(f"  {tag} {label}: " + json.dumps({k: v for k, v in asdict(run).items() if k not in ("scores", "confusion", "per_character")}),
                  file=sys.stderr, flush=True)
    return out


# -- report -----------------------------------------------------------------------------------------
def mean_sd(xs: Sequence[float], scale: float = 100.0) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    d = 1 if scale > 1 else 2
    return f"{scale * statistics.mean(xs):.{d}f}" + (f" ± {scale * statistics.stdev(xs):.{d}f}" if len(xs) > 1 else "")


def scored_on(test_fraction: float, pool: str = "clean") -> str:
    return (f"test {100 * test_fraction:.0f}%" if test_fraction else "version's val") + (", raw pool" if pool == "raw" else "")


def table(runs: list[Run]) -> str:
    lines = ["| set | scored on | recipe | seeds | clip | model | fusion | default (mode) | default, any of its characters | strict ceiling "
             "| known refused | of right / wrong answers | CPU min/run | ms/image |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda k: (k[0], k[2], k[1] != "baseline", k[1])  # noqa: E731
    for key in sorted({(r.set, r.recipe, r.test_fraction, r.pool) for r in runs if r.protocol == "closed"}, key=order):
        rs = [r for r in runs if (r.set, r.recipe, r.test_fraction, r.pool) == key and r.protocol == "closed"]
        modes = "/".join(sorted({r.default_mode for r in rs}))
        cols = [mean_sd([r.top1.get(m, float("nan")) for r in rs]) for m in (*MODES, "default")]
        lines.append(f"| {key[0]} | {scored_on(key[2], key[3])} | {key[1]} | {len(rs)} | {' | '.join(cols[:3])} | {cols[3]} ({modes}) | "
                     f"{mean_sd([r.top1_any.get('default', float('nan')) for r in rs])} | {mean_sd([r.ceiling for r in rs])} | "
                     f"{mean_sd([r.false_reject for r in rs])} | {mean_sd([r.refused_right for r in rs])} / {mean_sd([r.refused_wrong for r in rs])} | "
                     f"{statistics.mean(r.train_cpu_min for r in rs):.1f} | "
                     f"{statistics.mean(r.ms_per_image for r in rs):.0f} |")
    unseen = [r for r in runs if r.protocol == "unseen"]
    if unseen:
        lines += ["", f"Unseen characters ({HELD_OUT} held out of training; enrolled from {ENROL_SHOTS} pictures each):", "",
                  ("| set | scored on | recipe | seeds | enrolled top-1 clip / fusion | others after enrolment clip / fusion | unseen pictures "
                   "| unseen refused before enrolment | known refused | AUROC |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key in sorted({(r.set, r.recipe, r.test_fraction, r.pool) for r in unseen}, key=order):
            rs = [r for r in unseen if (r.set, r.recipe, r.test_fraction, r.pool) == key]
            e = " / ".join(mean_sd([r.enrolled_top1.get(m, float("nan")) for r in rs]) for m in ("clip", "fusion"))
            o = " / ".join(mean_sd([r.others_top1.get(m, float("nan")) for r in rs]) for m in ("clip", "fusion"))
            lines.append(f"| {key[0]} | {scored_on(key[2], key[3])} | {key[1]} | {len(rs)} | {e} | {o} | "
                         f"{statistics.mean(r.unseen_pictures for r in rs):.0f} | {mean_sd([r.unseen_rejected for r in rs])} | "
                         f"{mean_sd([r.false_reject for r in rs])} | {mean_sd([r.auroc for r in rs], 1.0)} |")
    return "\n".join(lines)


def pictures(runs: list[Run], out: Path) -> list[Path]:
    """Per set: open-set histograms (known vs unseen, threshold), per-character bars, confusion of the default mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name in sorted({r.set for r in runs}):
        rs = [r for r in runs if r.set == name]
        recipes = sorted({r.recipe for r in rs}, key=lambda k: (k != "baseline", k))
        fig, axes = plt.subplots(1, 3, figsize=(18, 5))
        ax = axes[0]
        for r in [r for r in rs if r.protocol == "unseen" and r.scores][:2]:
            bins = np.linspace(min(r.scores["known"] + r.scores["unseen"]), max(r.scores["known"] + r.scores["unseen"]), 30)
            ax.hist(r.scores["known"], bins=bins, alpha=0.5, label=f"{r.recipe}: known")
            ax.hist(r.scores["unseen"], bins=bins, alpha=0.5, label=f"{r.recipe}: unseen")
            if r.threshold is not None:
                ax.axvline(r.threshold, linestyle="--", color="k" if r.recipe == "baseline" else "r", label=f"{r.recipe}: threshold")
        ax.set_title("open-set best score, seed 0 (dashed: calibrated thresholds)")
        ax.legend(fontsize=7)
        ax = axes[1]
        closed = [r for r in rs if r.protocol == "closed"]
        chars = sorted({c for r in closed for c in r.per_character})
        width = 0.8 / max(1, len(recipes))
        for i, rec in enumerate(recipes):
            vals = [statistics.mean([r.per_character.get(c, 0.0) for r in closed if r.recipe == rec] or [0.0]) for c in chars]
            ax.bar(np.arange(len(chars)) + i * width, vals, width, label=rec)
        ax.set_xticks(np.arange(len(chars)) + 0.4 - width / 2, chars, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title("top-1 per character (default mode, mean of seeds)")
        ax.legend(fontsize=7)
        ax = axes[2]
        best = [r for r in closed if r.recipe != "baseline" and r.confusion]
        if best:
            idx = {c: i for i, c in enumerate(chars)}
            cm = np.zeros((len(chars), len(chars) + 1))
            for r in best:
                for y, a in zip(r.confusion["labels"], r.confusion["answers"]):
                    cm[idx[y], idx.get(a, len(chars))] += 1
            cm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
            ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(chars) + 1), [*chars, "other"], rotation=45, ha="right", fontsize=7)
            ax.set_yticks(range(len(chars)), chars, fontsize=7)
            ax.set_title("confusion, default mode (every trained run, rows: true)")
        fig.suptitle(name)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=[*REAL_SETS, SYNTHETIC])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--protocols", nargs="+", default=["closed", "unseen"], choices=["closed", "unseen"])
    ap.add_argument("-o", "--override", action="append", default=[], help="extra train.py override for every run (e.g. trainer.max_epochs=6)")
    ap.add_argument("--test-fraction", type=float, default=0.2,
                    help="share of each known character's pictures set aside before training and scored (0: score on the version's own val)")
    ap.add_argument("--pool", choices=["clean", "raw"], default="clean",
                    help="train on the pool after the workflow's clean stage (what a workflow run gets) or on every pool picture")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--fresh", action="store_true", help="forget the runs already in --out/runs.json")
    ap.add_argument("--rebuild", action="store_true",
                    help="build every version again from its cached checkpoint (version-building code changed since)")
    ap.add_argument("--variants", nargs="*", default=[], choices=[*EVAL_VARIANTS, *CHECKPOINT_VARIANTS, *ANSWER_VARIANTS],
                    help="also build each run's version these ways: infer overrides on the same checkpoint (e.g. noflip), or final (its "
                         "last.ckpt); or ask the recipe's own version with other recognizer settings (e.g. leftover)")
    ap.add_argument("--work", type=Path, default=REPO / "outputs" / "benchmarks" / "accuracy" / "work")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "benchmarks" / "accuracy")
    args = ap.parse_args(argv)
    quiet(args.threads)
    threads = args.threads or os.cpu_count() or 1
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg(), time.perf_counter()
    print(f"# accuracy: sets {args.sets}, seeds {args.seeds}, recipes {args.recipes}, protocols {args.protocols}, scored on {scored_on(args.test_fraction, args.pool)}, "
          f"overrides {args.override}; workflow recipe {workflow_recipe()}; load average at start {load0[0]:.2f}")
    saved = args.out / "runs.json"
    runs: list[Run] = [Run(**r) for r in json.loads(saved.read_text())] if saved.is_file() and not args.fresh else []
    tf, pk = args.test_fraction, args.pool
    done = {(r.set, r.seed, r.recipe, r.protocol, r.test_fraction, r.pool) for r in runs}
    if runs:
        print(f"# {len(runs)} runs already in {saved} are kept and not run again (--fresh starts over)")
    for name in args.sets:
        root = set_root(name, args.work)
        if root is None:
            continue
        for protocol in args.protocols:
            for seed in args.seeds:
                for recipe in args.recipes:
                    variants = args.variants
                    if all((name, seed, n, protocol, tf, pk) in done for n in (recipe, *(f"{recipe}+{v}" for v in variants))):
                        continue
                    got = one_run(name, root, seed, recipe, protocol, args.work, threads, args.override, variants, tf, pk, args.rebuild)
                    runs += [r for r in got if (r.set, r.seed, r.recipe, r.protocol, tf, pk) not in done]  # one baseline per split
                    done |= {(r.set, r.seed, r.recipe, r.protocol, tf, pk) for r in got}
                    atomic_write_json(saved, [asdict(r) for r in runs])  # hours of runs: never a half-written file
    print(table(runs))
    for p in pictures(runs, args.out):
        print(f"picture: {p}")
    load1 = os.getloadavg()
    print(f"# {(time.perf_counter() - t0) / 60:.1f} min; load average at start {load0[0]:.2f}, at end {load1[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
