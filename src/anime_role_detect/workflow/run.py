"""The workflow: collect -> clean -> split -> train -> evaluate -> gallery -> register, resumable stage by stage.

Each run lives in a folder named after its characters and collector (the same command finds the same
folder). A finished stage leaves a marker ``stages/<stage>.json`` (written atomically) holding a
fingerprint of its config and of the stages before it; a rerun skips stages whose marker matches and
redoes the rest. Downloads resume image by image (collector manifests), training resumes from
``last.ckpt``, and the version is committed to the registry under an id fixed at the run's first
attempt, so a crash at any point can never register two versions or leave a half version live.
`run_workflow` is what ``python -m anime_role_detect.workflow`` and the service's /api/workflow call.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import lightning as L
from omegaconf import DictConfig, OmegaConf

from ..confutil import compose_config
from ..data.layout import ImageRecord, read_metadata, scan_dataset, stratified_group_split
from ..errors import ConfigError, DatasetError, UserError
from ..fsutil import atomic_write_json, atomic_write_text, link_or_copy, read_json
from ..log import get_logger
from ..registry import MANIFEST, Registry
from .clean import CleanConfig, clean_dataset
from .collectors import CharacterQuery, build_collector, read_manifest
from .collectors.base import fingerprint, safe_name
from .progress import Progress

_log = get_logger("system")

STAGE_DIR = "stages"
#: Report files the training run writes and the version keeps.
REPORT_FILES = ("metrics.json", "per_character.csv", "per_character.md", "confusion_matrix.png")


@dataclass
class WorkflowResult:
    """What a run produced: the registered version, its metrics and the per-character summary rows."""

    version_id: str
    metrics: dict[str, Any]
    summary: list[dict[str, Any]]
    run_dir: str = ""
    resumed_stages: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunContext:
    """Everything a stage needs: config, progress, the run folder and earlier stages' outputs."""

    cfg: DictConfig
    progress: Progress
    run_dir: Path
    queries: list[CharacterQuery]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_datasets: list[str] = field(default_factory=list)  # resolved extra_datasets (+ the live version's, pinned)
    restarted: bool = False  # the stage ran before under another fingerprint: discard its partial output
    fingerprint: str = ""  # of the running stage (its config and everything before it)

    @property
    def raw_dir(self) -> Path:
        return self.run_dir / "raw"

    @property
    def dataset_dir(self) -> Path:
        return self.run_dir / "dataset"

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"

    @property
    def gallery_dir(self) -> Path:
        return self.run_dir / "gallery"

    @property
    def registry(self) -> Registry:
        return Registry(str(self.cfg.registry_dir))


# -- characters and the run folder ---------------------------------------------------------------


def parse_characters(cfg: DictConfig) -> list[CharacterQuery]:
    """Character queries from ``cfg.characters``; one-line errors for an empty or duplicated list."""
    raw = cfg.get("characters")
    if raw is None or len(raw) == 0:
        raise ConfigError(
            "no characters given; pass characters='[{\"name\":\"Hoshino\",\"series\":\"Blue Archive\"}, ...]'"
        )
    items = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
    queries = [CharacterQuery.from_config(o) for o in items]
    seen: dict[str, str] = {}
    for q in queries:
        if q.folder in seen:
            raise ConfigError(f"character {q.name!r} is listed twice (as {seen[q.folder]!r}); give each character once")
        seen[q.folder] = q.name
    return queries


def _run_key(cfg: DictConfig, queries: Sequence[CharacterQuery]) -> dict[str, Any]:
    """What identifies a run's folder: the characters and the site (not caps or timeouts, so raising a cap reuses downloads)."""
    site = OmegaConf.select(cfg, "collector.base_url", default=None) or OmegaConf.select(cfg, "collector.root", default=None)
    return {"characters": [(q.name, q.series, q.tag, q.path) for q in queries],
            "collector": OmegaConf.select(cfg, "collector.name", default=None), "site": site}


def resolve_run_dir(cfg: DictConfig, queries: Sequence[CharacterQuery]) -> Path:
    """``work_dir/<run_name>``; without a run_name: the first character + count + a hash of the request."""
    name = cfg.get("run_name")
    if not name:
        first = safe_name(queries[0].name).replace(" ", "_")[:40]
        more = f"+{len(queries) - 1}" if len(queries) > 1 else ""
        name = f"{first}{more}-{fingerprint(_run_key(cfg, queries))[:8]}"
    return Path(str(cfg.work_dir)) / safe_name(str(name))


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on the run folder (released by the OS if the process dies)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise UserError(f"another workflow is running in {run_dir}; wait for it or use another run_name=...") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


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


# Training: the real training framework, composed from conf/train.yaml with the workflow's overrides.


class WorkflowProgressCallback(L.Callback):
    """Lightning callback feeding epoch progress into the run's `Progress` and honouring cancel."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress

    def _emit(self, trainer: L.Trainer, message: str = "") -> None:
        if self.progress is not None:
            total = int(trainer.max_epochs or 1)
            self.progress.emit("train", min(trainer.current_epoch, total), total, message)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(trainer, f"resumed at epoch {trainer.current_epoch}" if trainer.current_epoch else "")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.progress is not None:
            self.progress.check_cancelled()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val/acc")
        msg = f"epoch {trainer.current_epoch + 1}: val/acc={float(acc):.3f}" if acc is not None else ""
        if self.progress is not None:
            total = int(trainer.max_epochs or 1)
            self.progress.emit("train", min(trainer.current_epoch + 1, total), total, msg)


def hydra_quote(value: Any) -> str:
    """A Hydra override value that stays one string whatever it holds (spaces, commas, brackets in paths)."""
    return "'" + str(value).replace("'", "\\'").replace("${", "\\${") + "'"


def compose_train_config(ctx: RunContext, resume_ckpt: Path | None) -> DictConfig:
    """``conf/train.yaml`` + ``train.overrides`` + the bindings to this run's dataset, split and folders."""
    tcfg = ctx.cfg.train
    values = {"dataset": hydra_quote(ctx.dataset_dir.resolve()), "train_dir": hydra_quote(ctx.train_dir.resolve()),
              "val_fraction": float(ctx.cfg.split.val_fraction), "seed": int(ctx.cfg.split.seed)}
    overrides = [str(o) for o in tcfg.get("overrides") or []]
    overrides += [str(b).format(**values) for b in tcfg.bind]
    log_dir = OmegaConf.select(ctx.cfg, "log.dir", default=None)
    if log_dir:  # training logs where the workflow logs, at the same console level
        overrides += [f"log.dir={hydra_quote(log_dir)}", f"log.console_level={ctx.cfg.log.console_level}"]
    if resume_ckpt is not None:
        overrides.append(f"ckpt_path={hydra_quote(resume_ckpt)}")
    return compose_config(str(tcfg.get("config_name", "train")), overrides, fix="fix train.overrides")


def stage_train(ctx: RunContext) -> dict[str, Any]:
    """Train the classifier in-process; an interrupted attempt resumes from its ``last.ckpt``."""
    from ..training import train

    if ctx.restarted and ctx.train_dir.exists():
        shutil.rmtree(ctx.train_dir)  # partial training under another config: start over
    last = ctx.train_dir / "checkpoints" / "last.ckpt"
    resume = last if last.is_file() else None
    if resume:
        _log.info(f"resuming training from {resume}")
    tcfg = compose_train_config(ctx, resume)
    try:
        result = train(tcfg, callbacks=[WorkflowProgressCallback(ctx.progress)])
    except SystemExit as exc:  # Lightning turns Ctrl-C during fit into sys.exit(1): keep it an interrupt
        raise KeyboardInterrupt("training interrupted") from exc
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str)) or v is None}
    return {"ckpt_path": str(result.ckpt_path), "output_dir": str(result.output_dir), "metrics": metrics,
            "resumed_from": str(resume) if resume else None}


def stage_evaluate(ctx: RunContext) -> dict[str, Any]:
    """Collect the training run's report (metrics.json, per-character table, confusion matrix) for the version."""
    out_dir = Path(ctx.outputs["train"]["output_dir"])
    metrics_path = out_dir / "metrics.json"
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
    from ..recognition.gallery_cli import build_recognition_folder

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
        target_far=float(gcfg.get("target_far", 0.05)), dedupe=False, include_val=bool(gcfg.get("include_val", True)),
        progress=report,
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


def stage_register(ctx: RunContext) -> dict[str, Any]:
    """Copy model, gallery, profiles, calibration, report and config into a version; commit; make it live."""
    reg = ctx.registry
    vid = _version_id(ctx)
    final = reg.versions_dir / vid
    if not (final / MANIFEST).is_file():
        parent = reg.latest_id()
        staging = reg.staging_dir(vid)
        for p in sorted(ctx.gallery_dir.iterdir()):
            if p.is_file():
                shutil.copy2(p, staging / p.name)
        report_dir = Path(ctx.outputs["evaluate"]["report_dir"])
        for name in REPORT_FILES:
            if (report_dir / name).is_file():
                shutil.copy2(report_dir / name, staging / name)
        train_cfg = Path(ctx.outputs["train"]["output_dir"]) / "config.yaml"
        cfg_text = "# workflow config\n" + redacted_yaml(ctx.cfg)
        if train_cfg.is_file():
            atomic_write_text(staging / "train_config.yaml", train_cfg.read_text(encoding="utf-8"))
        atomic_write_text(staging / "config.yaml", cfg_text)
        atomic_write_json(staging / "workflow.json", {"run_dir": str(ctx.run_dir), "dataset": str(ctx.dataset_dir),
                                                      "summary": summary_rows(ctx), "stages": ctx.outputs})
        reg.commit(staging, parent=parent, kind="workflow", promote=False,
                   extra={"characters": [q.name for q in ctx.queries], "dataset": str(ctx.dataset_dir)})
    if bool(ctx.cfg.get("promote", True)) and reg.latest_id() != vid:
        reg.promote(vid)
    ctx.progress.emit("register", 1, 1, f"version {vid}{' (live)' if reg.latest_id() == vid else ''}")
    return {"version_id": vid, "live": reg.latest_id() == vid}


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


def run_workflow(cfg: DictConfig, progress: Progress | None = None) -> WorkflowResult:
    """Run (or resume) the whole workflow for ``cfg.characters``; returns the registered version and summary."""
    progress = progress or Progress()
    queries = parse_characters(cfg)
    run_dir = resolve_run_dir(cfg, queries)
    with run_lock(run_dir):
        stage_dir = run_dir / STAGE_DIR
        if cfg.get("restart", False):  # everything but the downloads is redone, and a new version is made
            shutil.rmtree(stage_dir, ignore_errors=True)
            for pinned in ("version_id.json", "extend_live.json"):
                (run_dir / pinned).unlink(missing_ok=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "workflow.yaml", redacted_yaml(cfg))
        ctx = RunContext(cfg=cfg, progress=progress, run_dir=run_dir, queries=queries)
        _log.info(f"workflow run folder {run_dir} ({len(queries)} characters)")
        resumed: list[str] = []
        chain, result_key = "", ""
        t_start = time.perf_counter()
        stop_after = cfg.get("stop_after")
        if stop_after and stop_after not in STAGE_NAMES:
            raise ConfigError(f"stop_after={stop_after!r}: choose one of {', '.join(STAGE_NAMES)}")
        ctx.extra_datasets = resolve_extra_datasets(ctx)
        for name, fn, inputs in STAGES:
            if stop_after and STAGE_NAMES.index(name) > STAGE_NAMES.index(stop_after):
                break
            # A stage's fingerprint: the one before it, its own inputs, and what the stage before it produced.
            fp = fingerprint([chain, inputs(ctx), result_key])
            chain = fp
            done_path, started_path = stage_dir / f"{name}.json", stage_dir / f"{name}.started"
            marker = read_json(done_path) if done_path.is_file() else None
            if marker and marker.get("fingerprint") == fp:
                ctx.outputs[name] = marker["output"]
                result_key = fingerprint(marker["output"].get("data_key", marker["output"]))
                resumed.append(name)
                progress.emit(name, 1, 1, "done earlier")
                continue
            started = read_json(started_path) if started_path.is_file() else None
            ctx.restarted = bool(started and started.get("fingerprint") != fp)
            ctx.fingerprint = fp
            atomic_write_json(started_path, {"fingerprint": fp})
            progress.check_cancelled()
            t0 = time.perf_counter()
            output = fn(ctx)
            ctx.outputs[name] = output
            result_key = fingerprint(output.get("data_key", output))
            if output.get("incomplete"):  # e.g. pages the site failed to serve: the next run tries again
                _log.warning(f"stage {name} incomplete: {output['incomplete']}; rerun the same command to retry")
                continue
            atomic_write_json(done_path, {"fingerprint": fp, "seconds": round(time.perf_counter() - t0, 2),
                                          "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                          "output": output})
            _log.info(f"stage {name} done in {time.perf_counter() - t0:.1f}s")
        vid = ctx.outputs.get("register", {}).get("version_id", "")
        metrics = {"accuracy": ctx.outputs.get("evaluate", {}).get("accuracy"), **ctx.outputs.get("train", {}).get("metrics", {}),
                   "seconds": round(time.perf_counter() - t_start, 2)}
        return WorkflowResult(version_id=vid, metrics=metrics, summary=summary_rows(ctx), run_dir=str(run_dir),
                              resumed_stages=resumed)
