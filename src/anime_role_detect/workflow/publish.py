"""Publish a training run as the live registry version: what ``train.py register=true`` does (the demo's default).

The run's classifier + a gallery of its features + tag profiles + open-set calibration, all built from the
run's own train/val split (`recognition.build`), plus the run's report and config, committed as one version
through `Registry.derive` and promoted, so ``python infer.py image=...`` and the service answer with no other
step. Synthetic (demo) data also gets a few fresh sample pictures to try. Workflow layer: it may import data,
training, recognition and the registry; training never imports it (``train.py`` calls it after `train`).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from ..confutil import dataclass_from_mapping, to_plain
from ..errors import DatasetError
from ..fsutil import atomic_write_json, read_json
from ..log import get_logger
from ..recognition.openset import DEFAULT_MAX_FALSE_REJECT
from ..registry import Registry
from ..training import TrainResult
from ..versionfiles import CONFIG, METRICS, MODEL, RUN_REPORT

_log = get_logger("system")

#: Report files a training run writes and a version keeps.
REPORT_FILES = RUN_REPORT


@dataclass
class PublishConfig:
    """``publish`` in conf/train.yaml: where the version goes and how its gallery is built."""

    registry_dir: str = "outputs/registry"
    promote: bool = True
    embedder: dict[str, Any] = field(default_factory=lambda: {"kind": "classifier", "ckpt_path": MODEL})
    tagger: dict[str, Any] = field(default_factory=lambda: {"kind": "auto"})
    target_far: float = 0.05  # open-set: at most this share of impostor val scores pass the threshold
    max_false_reject: float = DEFAULT_MAX_FALSE_REJECT  # ... unless that refuses more than this share of the val pictures answered right
    include_val: bool = True  # thresholds are calibrated on val, then the val images join the gallery
    onnx: bool = True  # export the version's networks for ONNX Runtime (runtime: auto uses them; 2-3x faster on CPU)
    build: dict[str, Any] = field(default_factory=dict)  # gallery index / prototypes / aggregate (conf/infer.yaml gallery_build)
    samples_dir: str | None = None  # synthetic data: fresh renders to try are written here
    samples_per_character: int = 3


@dataclass
class PublishResult:
    """The version a run became, whether it is live, and sample pictures to try it on."""

    version_id: str
    live: bool
    version_dir: str
    registry_dir: str
    characters: int
    gallery_rows: int
    top1: dict[str, float] = field(default_factory=dict)  # on the run's val split, per recognition mode
    samples: list[str] = field(default_factory=list)
    seconds: float = 0.0


def read_split(split_path: str | Path) -> tuple[list[str], list[str]]:
    """(train, val) file names of a split manifest written by the training data module."""
    path = Path(split_path)
    if not path.is_file():
        raise DatasetError(f"split manifest {path} not found; the training run writes it (data.split_dir), rerun train.py")
    m = read_json(path)
    return list(m["train"]), list(m["val"])


def build_version(staging: Path, result: TrainResult, pc: PublishConfig) -> dict[str, Any]:
    """Write model + gallery + tag profiles + calibration (from the run's split) and the run's report into `staging`."""
    from ..recognition.build import build_recognition_folder

    build_cfg = {"embedder": dict(pc.embedder), "tagger": dict(pc.tagger), "gallery_build": dict(pc.build)}
    report = build_recognition_folder(result.data_root, staging, build_cfg, model_ckpt=result.ckpt_path,
                                      target_far=pc.target_far, max_false_reject=pc.max_false_reject, include_val=pc.include_val,
                                      split=read_split(result.split_path), onnx=pc.onnx)
    run_dir = Path(result.output_dir)
    for name in REPORT_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, staging / name)
    if (staging / METRICS).is_file():  # the registry lists val/acc; the gallery's own val top-1 per mode beside it
        metrics = read_json(staging / METRICS)
        atomic_write_json(staging / METRICS, {**metrics, "val/acc": metrics.get("accuracy"), "gallery_top1": report.top1})
    if (run_dir / CONFIG).is_file():
        shutil.copy2(run_dir / CONFIG, staging / CONFIG)
    return asdict(report)


def publish_training_run(cfg: DictConfig | Mapping[str, Any], result: TrainResult, promote: bool | None = None) -> PublishResult:
    """Commit the run as a new registry version (promoted unless ``publish.promote=false`` or `promote` is False)."""
    pc: PublishConfig = dataclass_from_mapping(PublishConfig, to_plain(cfg.get("publish")), "publish")
    live = pc.promote if promote is None else promote and pc.promote
    reg = Registry(pc.registry_dir)
    t0 = time.perf_counter()
    with reg.derive(None, kind="train", promote=live) as d:
        report = build_version(d.dir, result, pc)
        d.extra.update({"dataset": str(Path(result.data_root).resolve()), "run_dir": str(Path(result.output_dir).resolve()),
                        "characters": report["characters"]})
        if report.get("onnx"):
            d.extra["onnx"] = report["onnx"]
    samples = write_demo_samples(to_plain(cfg.get("data")) or {}, result, pc)
    vid = str(d.id)
    _log.info(f"published {result.ckpt_path} as version {vid} in {reg.root}{' (live)' if reg.latest_id() == vid else ''}")
    return PublishResult(version_id=vid, live=reg.latest_id() == vid, version_dir=str(reg.path(vid)), registry_dir=str(reg.root),
                         characters=int(report["characters"]), gallery_rows=int(report["rows"]), top1=dict(report["top1"]),
                         samples=[str(p) for p in samples], seconds=round(time.perf_counter() - t0, 1))


def write_demo_samples(data: Mapping[str, Any], result: TrainResult, pc: PublishConfig) -> list[Path]:
    """Fresh renders of the generated characters to try the version on (`data` config synthetic only; none otherwise)."""
    if not data.get("synthetic") or not pc.samples_dir or pc.samples_per_character <= 0:
        return []
    if not (Path(result.data_root) / "characters.json").is_file():
        return []
    from ..data.synthetic import write_samples

    size = int((data.get("synthetic") or {}).get("size", 128))
    return write_samples(result.data_root, pc.samples_dir, pc.samples_per_character, size=size)


def _shown(path: str | Path) -> str:
    """`path` relative to the working folder when it is inside it (shorter commands to copy)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def next_commands(published: PublishResult) -> list[str]:
    """The commands that use the new version: infer.py on a sample, the service and its curl line."""
    default = (Path.cwd() / "outputs" / "registry").resolve()
    where = [] if Path(published.registry_dir).resolve() == default else [f"registry_dir={_shown(published.registry_dir)}"]
    sample = _shown(published.samples[0]) if published.samples else "<your picture>"
    return [" ".join(["python infer.py", f"image={sample}", *where]),
            " ".join(["python -m anime_role_detect.serve", *where]),
            f'curl -X POST -F "file=@{sample}" http://127.0.0.1:5001/api/classify']


def report_published(published: PublishResult, out: Any = None) -> None:
    """Print the new version and the exact next commands (stdout: they are the run's result)."""
    import sys

    stream = out or sys.stdout
    top1 = ", ".join(f"{m} {100 * v:.1f}%" for m, v in sorted(published.top1.items()) if "+" not in m)
    print(f"registered version {published.version_id}{' (live)' if published.live else ''} in {_shown(published.registry_dir)}: "
          f"classifier + gallery of {published.characters} characters ({published.gallery_rows} rows)"
          + (f"; val top-1 {top1}" if top1 else "") + f" ({published.seconds:.0f} s)", file=stream)
    infer, serve, curl = next_commands(published)
    if published.samples:
        print(f"{len(published.samples)} sample pictures to try in {_shown(Path(published.samples[0]).parent)}/", file=stream)
    print(f"next: {infer}", file=stream)
    print(f"      {serve}   then   {curl}", file=stream, flush=True)


__all__ = ["PublishConfig", "PublishResult", "REPORT_FILES", "build_version", "next_commands", "publish_training_run",
           "read_split", "report_published"]

