"""The workflow's stages: collect -> clean -> split -> (train) -> evaluate -> gallery -> register, each a function of the run context."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from ..data.layout import ImageRecord, read_metadata, scan_dataset, stratified_group_split
from ..errors import ConfigError, DatasetError
from ..fsutil import atomic_write_json, atomic_write_text, fingerprint, link_or_copy, read_json
from ..log import get_logger
from ..recognition.openset import DEFAULT_MAX_FALSE_REJECT
from ..versionfiles import CONFIG, MANIFEST, METRICS, RUN_REPORT
from .clean import CleanConfig, clean_dataset
from .collectors import build_collector, read_manifest
from .context import RunContext
from .progress import Progress
from .training_bridge import stage_train

_log = get_logger("system")

#: Report files the training run writes and the version keeps.
REPORT_FILES = RUN_REPORT


# -- stages ---------------------------------------------------------------------------------------


def stage_collect(ctx: RunContext) -> dict[str, Any]:
    """Download (or import) each character's images into ``raw/`` with per-image tags."""
    collector = build_collector(ctx.cfg.collector)
    reports = {}
    for i, q in enumerate(ctx.queries):
        ctx.progress.emit("collect", i, len(ctx.queries), f"{q.name} ({q.search_tag})")
        reports[q.name] = collector.collect(q, ctx.raw_dir, ctx.progress).to_json()
        _log.info(f"collected {q.name}: {reports[q.name]['images']} images ({reports[q.name]['downloaded']} downloaded)")
    ctx.progress.emit("collect", len(ctx.queries), len(ctx.queries))
    files = {q.folder: sorted(e.file_name for e in read_manifest(ctx.raw_dir, q.folder)) for q in ctx.queries}
    gaps = [f"{name}: {r['failed_pages']} failed + {r['malformed_pages']} malformed pages"
            for name, r in reports.items() if r["failed_pages"] or r["malformed_pages"]]
    # data_key: what later stages depend on (the collected files), so a retry that adds images redoes them.
    return {"characters": reports, "data_key": fingerprint(files), "incomplete": "; ".join(gaps)}


def _collected_records(ctx: RunContext) -> list[ImageRecord]:
    records = []
    for q in ctx.queries:
        for e in read_manifest(ctx.raw_dir, q.folder):
            records.append(ImageRecord(file_name=e.file_name, character=q.folder, series=q.series, tags=list(e.tags),
                                       source=e.source, group=e.group))
    return records


def resolve_extra_datasets(ctx: RunContext) -> list[str]:
    """``extra_datasets`` plus, with ``extend_live``, the live version's dataset (pinned at the run's first attempt)."""
    extras = [str(Path(str(f)).expanduser().resolve()) for f in ctx.cfg.get("extra_datasets") or []]
    if not ctx.cfg.get("extend_live", False):
        return extras
    pinned = ctx.run_dir / "extend_live.json"
    if pinned.is_file():
        live = read_json(pinned)
    else:
        reg = ctx.registry
        vid = reg.latest_id()
        if vid is None:
            raise ConfigError(f"extend_live=true but registry {reg.root} has no live version yet; run without it first")
        dataset = read_json(reg.path(vid) / MANIFEST).get("dataset")
        if not dataset or not Path(dataset).is_dir():
            raise DatasetError(
                f"live version {vid} does not name an existing dataset folder ({dataset}); "
                "pass the folder with extra_datasets=[...] instead of extend_live"
            )
        live = {"version": vid, "dataset": dataset}
        atomic_write_json(pinned, live)
    return [*extras, str(live["dataset"])]


def _extra_records(ctx: RunContext) -> list[tuple[Path, list[ImageRecord]]]:
    """Records of the extra dataset folders (trained alongside the collected characters)."""
    return [(Path(folder), scan_dataset(folder)) for folder in ctx.extra_datasets]


def stage_clean(ctx: RunContext) -> dict[str, Any]:
    """Reject bad files, drop duplicates, optionally crop; write ``dataset/`` atomically."""
    ccfg = CleanConfig.from_mapping(OmegaConf.to_container(ctx.cfg.clean, resolve=True))
    records = _collected_records(ctx)
    sources: list[tuple[Path, list[ImageRecord]]] = [(ctx.raw_dir, records)] + _extra_records(ctx)
    collected_names = {q.folder for q in ctx.queries}
    # One raw root per source: the extra datasets' files are cleaned from where they are.
    merged: list[ImageRecord] = []
    roots: dict[str, Path] = {}
    for root, recs in sources:
        for r in recs:
            if (root != ctx.raw_dir and r.character in collected_names) or r.file_name in roots:
                continue  # a collected character wins over an extra dataset's folder of the same name; first source wins
            merged.append(r)
            roots[r.file_name] = root
    staging = ctx.run_dir / "dataset.partial"
    kept, report = _clean_multi(merged, roots, staging, ccfg, ctx.progress)
    min_images = int(ctx.cfg.get("min_images_per_character", 4))
    too_few = {q.name: report.kept.get(q.folder, 0) for q in ctx.queries if report.kept.get(q.folder, 0) < min_images}
    if too_few:
        collected = ctx.outputs.get("collect", {}).get("characters", {})

        def why(name: str) -> str:
            problems = collected.get(name, {}).get("problems") or []
            return f" ({problems[0]}{f'; +{len(problems) - 1} more' if len(problems) > 1 else ''})" if problems else ""

        detail = ", ".join(f"{k}: {v}{why(k)}" for k, v in too_few.items())
        raise DatasetError(
            f"too few usable images after cleaning ({detail}; need {min_images}); check each character's tag "
            "(give it explicitly with tag=...), raise collector.limit_per_character, or lower min_images_per_character"
        )
    if len(report.kept) < 2:
        raise DatasetError(
            f"only {len(report.kept)} character with images; a classifier needs 2+: add characters or "
            "extra_datasets=[<dataset folder>] (e.g. the data you trained on before)"
        )
    old = ctx.run_dir / "dataset.old"
    if old.exists():
        shutil.rmtree(old)
    if ctx.dataset_dir.exists():
        ctx.dataset_dir.rename(old)
    staging.rename(ctx.dataset_dir)
    shutil.rmtree(old, ignore_errors=True)
    out = report.to_json()
    atomic_write_json(ctx.run_dir / "clean_report.json", out)
    return {"kept": report.kept, "collected": report.collected, "reasons": report.reasons,
            "rejected": len(report.rejected), "near_duplicate_groups": report.near_duplicate_groups}


def _clean_multi(records: list[ImageRecord], roots: Mapping[str, Path], out_root: Path, ccfg: CleanConfig,
                 progress: Progress):
    """`clean_dataset` over records whose files live under different roots (raw folder, extra datasets)."""
    by_root: dict[Path, list[ImageRecord]] = {}
    for r in records:
        by_root.setdefault(roots[r.file_name], []).append(r)
    if len(by_root) == 1:
        (root, recs), = by_root.items()
        return clean_dataset(recs, root, out_root, ccfg, progress)
    # Several roots: link everything into one temporary raw tree, then clean once (cross-source duplicates found).
    tmp_raw = out_root.parent / "merged.partial"
    if tmp_raw.exists():
        shutil.rmtree(tmp_raw)
    for root, recs in by_root.items():
        for r in recs:
            link_or_copy(root / r.file_name, tmp_raw / r.file_name)
    try:
        return clean_dataset(records, tmp_raw, out_root, ccfg, progress)
    finally:
        shutil.rmtree(tmp_raw, ignore_errors=True)


def stage_split(ctx: RunContext) -> dict[str, Any]:
    """Leak-free 80/20 split (groups never straddle) saved as ``dataset/split.json``; training reuses it."""
    records = list(read_metadata(ctx.dataset_dir).values())
    val_fraction = float(ctx.cfg.split.val_fraction)
    seed = int(ctx.cfg.split.seed)
    split = stratified_group_split(records, val_fraction, seed)
    groups = {r.file_name: r.group for r in records if r.group}
    atomic_write_json(ctx.dataset_dir / "split.json", {**asdict(split), "root": str(ctx.dataset_dir.resolve()),
                                                        "unreadable": [], "groups": groups})
    train, val = set(split.train), set(split.val)
    counts = {}
    for r in records:
        c = counts.setdefault(r.character, {"train": 0, "val": 0})
        c["train" if r.file_name in train else "val"] += 1
    ctx.progress.emit("split", 1, 1, f"{len(train)} train / {len(val)} val")
    return {"train": len(train), "val": len(val), "per_character": counts}


def stage_evaluate(ctx: RunContext) -> dict[str, Any]:
    """Collect the training run's report (metrics.json, per-character table, confusion matrix) for the version."""
    out_dir = Path(ctx.outputs["train"]["output_dir"])
    metrics_path = out_dir / METRICS
    if not metrics_path.is_file():
        raise DatasetError(f"training left no {metrics_path}; keep evaluate=true in the train config")
    metrics = read_json(metrics_path)
    report_dir = ctx.run_dir / "report"
    report_dir.mkdir(exist_ok=True)
    for name in REPORT_FILES:
        if (out_dir / name).is_file():
            shutil.copy2(out_dir / name, report_dir / name)
    ctx.progress.emit("evaluate", 1, 1, f"val accuracy {100 * float(metrics.get('accuracy', 0)):.1f}%")
    return {"accuracy": metrics.get("accuracy"), "per_character": metrics.get("per_character", {}),
            "report_dir": str(report_dir)}


def stage_gallery(ctx: RunContext) -> dict[str, Any]:
    """Gallery + tag profiles + open-set calibration from the cleaned dataset, tuned on the same val split as training."""
    from ..recognition.build import build_recognition_folder

    gdir = ctx.gallery_dir
    if gdir.exists():
        shutil.rmtree(gdir)
    gcfg = OmegaConf.to_container(ctx.cfg.gallery, resolve=True)
    build_cfg = {"embedder": gcfg.get("embedder"), "tagger": gcfg.get("tagger"), "gallery_build": gcfg.get("build") or {}}

    def report(done: int, total: int) -> None:
        ctx.progress.emit("gallery", done, total)

    # No re-grouping (dedupe=False): the dataset's groups and the split seed give exactly the training split.
    built = build_recognition_folder(
        ctx.dataset_dir, gdir, build_cfg, model_ckpt=ctx.outputs["train"]["ckpt_path"],
        val_fraction=float(ctx.cfg.split.val_fraction), seed=int(ctx.cfg.split.seed),
        target_far=float(gcfg.get("target_far", 0.05)), max_false_reject=float(gcfg.get("max_false_reject", DEFAULT_MAX_FALSE_REJECT)),
        dedupe=False, include_val=bool(gcfg.get("include_val", True)),
        progress=report, onnx=bool(gcfg.get("onnx", True)), check=ctx.progress.check_cancelled,
    )
    out = asdict(built) if hasattr(built, "__dataclass_fields__") else dict(built)
    ctx.progress.emit("gallery", 1, 1, f"{out.get('rows', '?')} gallery rows")
    return out


def _version_id(ctx: RunContext) -> str:
    """The version id for this result, fixed at its first register attempt so a retry reuses it
    (a changed config gives a new fingerprint and so a new version)."""
    path = ctx.run_dir / "version_id.json"
    if path.is_file():
        pinned = read_json(path)
        if pinned.get("fingerprint") == ctx.fingerprint:
            return str(pinned["id"])
    vid = ctx.registry.new_version_id()
    atomic_write_json(path, {"fingerprint": ctx.fingerprint, "id": vid})
    return vid


SECRET_KEYS = ("api_key", "login", "password", "token")


def redacted_yaml(cfg: DictConfig) -> str:
    """The config as YAML with literal credentials masked (``${oc.env:...}`` references are kept: they hold no secret)."""
    data = OmegaConf.to_container(cfg, resolve=False)

    def mask(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("***" if k in SECRET_KEYS and isinstance(v, str) and v and not v.startswith("${") else mask(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [mask(v) for v in node]
        return node

    return OmegaConf.to_yaml(OmegaConf.create(mask(data)))


def promote_policy(cfg: DictConfig) -> str:
    """``promote``: true (live when not worse than the live version), always, or false."""
    value = cfg.get("promote", True)
    policy = {True: "gate", False: "never", "true": "gate", "false": "never", "always": "always", "gate": "gate"}.get(
        value if isinstance(value, bool) else str(value).lower())
    if policy is None:
        raise ConfigError(f"promote={value!r}: choose true (live when not worse than the live version), always, or false")
    return policy


def gate_verdict(ctx: RunContext, candidate_dir: Path) -> dict[str, Any]:
    """Judge the new version against the live one on the characters both know (recognition/evalset.judge)."""
    from ..recognition.evalset import judge

    reg = ctx.registry
    live_id = reg.latest_id()
    gcfg = OmegaConf.to_container(ctx.cfg.get("gate") or {}, resolve=True) or {}
    ctx.progress.emit("register", 0, 1, "comparing with the live version" if live_id else "first version")
    verdict = judge(candidate_dir, reg.path(live_id) if live_id else None, margin=float(gcfg.get("margin", 0.0)),
                    mode=gcfg.get("mode"), recognizer_cfg={"detector": None})
    return verdict.to_json()


def stage_register(ctx: RunContext) -> dict[str, Any]:
    """Model, gallery, profiles, calibration, evaluation set, report and config as a new version (id fixed per attempt);
    it goes live when it is not worse than the live version on the characters both know (``promote``)."""
    reg = ctx.registry
    vid = _version_id(ctx)
    policy = promote_policy(ctx.cfg)
    if not (reg.versions_dir / vid / MANIFEST).is_file():
        extra = {"characters": [q.name for q in ctx.queries], "dataset": str(ctx.dataset_dir)}
        with reg.derive(None, kind="workflow", version_id=vid, parent=reg.latest_id(), extra=extra) as d:
            for p in sorted(ctx.gallery_dir.iterdir()):
                if p.is_file():
                    link_or_copy(p, d.dir / p.name)
            report_dir = Path(ctx.outputs["evaluate"]["report_dir"])
            for name in REPORT_FILES:
                if (report_dir / name).is_file():
                    link_or_copy(report_dir / name, d.dir / name)
            train_cfg = Path(ctx.outputs["train"]["output_dir"]) / CONFIG
            if train_cfg.is_file():
                atomic_write_text(d.dir / "train_config.yaml", train_cfg.read_text(encoding="utf-8"))
            atomic_write_text(d.dir / CONFIG, "# workflow config\n" + redacted_yaml(ctx.cfg))
            atomic_write_json(d.dir / "workflow.json", {"run_dir": str(ctx.run_dir), "dataset": str(ctx.dataset_dir),
                                                        "summary": summary_rows(ctx), "stages": ctx.outputs})
            if ctx.outputs.get("gallery", {}).get("onnx"):
                d.extra["onnx"] = ctx.outputs["gallery"]["onnx"]
            if policy == "gate":
                d.extra["gate"] = gate_verdict(ctx, d.dir)
    ctx.progress.emit("register", 1, 1, f"version {vid}")
    return {"version_id": vid, "gate": reg.info(vid).gate}


def apply_promotion(ctx: RunContext) -> bool:
    """Make the registered version live as ``promote`` says (run after the stages, so a rerun with
    ``promote=always`` promotes the version an earlier run kept off live); returns whether it is live."""
    reg = ctx.registry
    out = ctx.outputs.get("register") or {}
    vid, gate = out.get("version_id"), out.get("gate")
    if not vid:
        return False
    policy = promote_policy(ctx.cfg)
    if (policy == "always" or (policy == "gate" and bool(gate and gate.get("promote")))) and reg.latest_id() != vid:
        reg.promote(vid)
    live = reg.latest_id() == vid
    if not live and policy != "never":
        reason = (gate or {}).get("reason", "")
        _log.warning(f"version {vid} kept off live: {reason}; `registry compare {vid}` shows both, promote=always overrides")
    ctx.progress.emit("register", 1, 1, f"version {vid} " + ("(live)" if live else f"(not live: {(gate or {}).get('reason', 'promote=false')})"))
    return live


def _inputs(*keys: str, extra: bool = False) -> Callable[[RunContext], Any]:
    """What a stage's result depends on besides earlier stages: config values (+ the resolved extra datasets)."""

    def get(ctx: RunContext) -> Any:
        part = _config_part(ctx.cfg, keys)
        return {**part, "_extra_datasets": ctx.extra_datasets} if extra else part

    return get


#: The stages in order: name, function, what its result depends on (fingerprinted with the earlier stages').
STAGES: tuple[tuple[str, Callable[[RunContext], dict[str, Any]], Callable[[RunContext], Any]], ...] = (
    ("collect", stage_collect, _inputs("characters", "collector")),
    ("clean", stage_clean, _inputs("clean", "min_images_per_character", extra=True)),
    ("split", stage_split, _inputs("split")),
    ("train", stage_train, _inputs("train")),
    ("evaluate", stage_evaluate, _inputs()),
    ("gallery", stage_gallery, _inputs("gallery")),
    ("register", stage_register, _inputs()),
)
STAGE_NAMES: tuple[str, ...] = tuple(s[0] for s in STAGES)


def summary_rows(ctx: RunContext) -> list[dict[str, Any]]:
    """Per-character rows: collected, kept after cleaning, train/val images, validation accuracy."""
    collected = ctx.outputs.get("collect", {}).get("characters", {})
    clean = ctx.outputs.get("clean", {})
    split = ctx.outputs.get("split", {}).get("per_character", {})
    acc = ctx.outputs.get("evaluate", {}).get("per_character", {})
    names = sorted(set(clean.get("kept", {})) | {q.folder for q in ctx.queries})
    rows = []
    query_of = {q.folder: q for q in ctx.queries}
    for name in names:
        q = query_of.get(name)
        rows.append({
            "character": name,
            "series": q.series if q else "",
            "source": "collected" if q else "extra dataset",
            "collected": collected.get(q.name, {}).get("images") if q else None,
            "kept": clean.get("kept", {}).get(name, 0),
            "train": split.get(name, {}).get("train", 0),
            "val": split.get(name, {}).get("val", 0),
            "accuracy": acc.get(name),
            "problems": list(collected.get(q.name, {}).get("problems", []))[:5] if q else [],
        })
    return rows


def _config_part(cfg: DictConfig, keys: Sequence[str]) -> Any:
    out = {}
    for k in keys:
        v = OmegaConf.select(cfg, k, default=None)
        out[k] = OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig,)) or OmegaConf.is_list(v) else v
    if "collector" in out and isinstance(out["collector"], dict):
        for secret in ("http", "api_key", "login"):
            out["collector"].pop(secret, None)
    return out
