"""Make a character detector offline: build a YOLO dataset, train ultralytics YOLOv8n from its yaml.

No anime YOLO weights can be downloaded here, so the data is made locally from two sources:

- ``synthetic``: multi-character composites from `data.synthetic.render_scene` with exact boxes
  (0-3 characters per image, three drawing styles), class ``character``;
- ``animeface``: real illustrations (e.g. ``../shared/data/newgame_full``) labelled by the nvxs
  anime-face detector (`detector.AnimeFaceDetector`), each face box widened by ``face_expand`` so
  it takes in hair and headwear; images where it finds no face are left out (they may hold
  characters it missed, which would teach the model that characters are background).

``ard-train-detector out=DIR [preset=tiny] [source=synthetic|animeface|both]
[real_dir=FOLDER] [epochs=30] [n_train=200] ...`` writes ``DIR/detector.pt`` (use it with
``detector=yolo detector.weights=DIR/detector.pt``), ``DIR/detector.json`` (validation metrics and
the config) and the YOLO dataset and run under ``DIR/dataset`` and ``DIR/yolo``.

A training tool that sits above recognition (it labels real images with `recognition.detector`'s
animeface detector and runs ultralytics under its guards); ``training/__init__`` never imports it.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from ..errors import ConfigError, DatasetError
from ..fsutil import atomic_path, atomic_write_json, atomic_write_text
from ..imageio import IMAGE_SUFFIXES, load_image
from ..log import training_log
from ..recognition.detector import AnimeFaceDetector, Box, torch_global_state_kept, ultralytics_offline

CLASS_NAMES = ("character",)
SOURCES = ("synthetic", "animeface", "both")
SCENE_SIZES = ((320, 224), (288, 288), (352, 240), (256, 320))


@dataclass
class DetectorTrainingConfig:
    """Options of ``ard-train-detector`` / ``python -m anime_role_detect.cli.detector`` (``key=value`` overrides)."""

    out: str = "outputs/detector"
    source: str = "synthetic"  # synthetic | animeface | both
    real_dir: str | None = None  # folder of real images for source=animeface|both (searched recursively)
    n_train: int = 200  # synthetic training composites
    n_val: int = 40  # synthetic validation composites
    max_characters: int = 3  # per synthetic composite (0..max; ~10% empty backgrounds)
    max_real_images: int = 300  # real images to label with animeface (0 = all)
    real_val_fraction: float = 0.15
    face_expand: float = 0.5  # widen animeface boxes by this fraction of the face size per side
    min_likelihood: float = 0.5  # animeface score threshold for a label
    image_size: int = 320  # training/inference size (imgsz)
    model: str = "yolov8n.yaml"  # architecture yaml shipped in ultralytics (trained from scratch) or a local .pt
    width: float | None = None  # override the yaml's width multiple (e.g. 0.125 = half of yolov8n: faster on CPU)
    depth: float | None = None  # override the yaml's depth multiple
    epochs: int = 30
    batch: int = 16
    patience: int = 50
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads for training (None: this process's setting, not ultralytics' cpu_count-1)
    workers: int = 0
    seed: int = 0
    optimizer: str = "auto"  # ultralytics optimizer (auto picks AdamW for short runs)
    lr0: float | None = None  # initial learning rate (None: the optimizer's default)
    warmup_epochs: float = 3.0
    val_each_epoch: bool = True  # False: validate only after the last epoch (faster)
    mosaic: float = 1.0  # ultralytics augmentation switches (mosaic helps small datasets)
    close_mosaic: int = 5
    preset: str | None = None  # apply PRESETS[preset] first (then the other overrides)
    extra: dict[str, Any] = field(default_factory=dict)  # any other ultralytics train() argument


#: Named option sets. ``tiny``: a detector in about a minute on 2 CPU cores (tests, demos): half-width
#: YOLOv8n at 160 px, 96 synthetic composites, 25 epochs; 20/20 two-character scenes found at IoU > 0.5.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": dict(
        n_train=96, n_val=16, epochs=25, image_size=160, batch=16, width=0.125, mosaic=0.0, optimizer="AdamW",
        lr0=0.01, warmup_epochs=1.0, val_each_epoch=False, threads=1,  # 1 thread: robust on a shared, busy CPU
    ),
}


@dataclass(frozen=True)
class TrainedDetector:
    """Where the trained weights are and how well they did on the validation split."""

    weights: Path
    metrics: dict[str, float]
    data_yaml: Path
    seconds: float


# --------------------------------------------------------------------------------------------- dataset


def yolo_label_line(box: Box | Sequence[float], width: int, height: int, cls: int = 0) -> str:
    """One YOLO label line: ``cls cx cy w h`` normalised to [0, 1]."""
    x1, y1, x2, y2 = (box.x1, box.y1, box.x2, box.y2) if isinstance(box, Box) else box
    x1, x2 = max(0.0, min(x1, width)), max(0.0, min(x2, width))
    y1, y2 = max(0.0, min(y1, height)), max(0.0, min(y2, height))
    cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
    return f"{cls} {cx:.6f} {cy:.6f} {(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}"


def _write_sample(root: Path, split: str, stem: str, image: Image.Image, boxes: Sequence[Box | Sequence[float]]) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(root / "images" / split / f"{stem}.jpg", quality=92)
    w, h = image.size
    lines = [yolo_label_line(b, w, h) for b in boxes]
    (root / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


def synthetic_scenes(n: int, seed: int, max_characters: int = 3) -> Iterator[tuple[Image.Image, list[tuple[int, int, int, int]]]]:
    """`n` composites of 0..`max_characters` synthetic characters with their exact figure boxes."""
    from ..data.synthetic import DOMAINS, make_characters, render_scene

    rng = random.Random(seed)
    specs = make_characters(24, seed=seed + 1, twin_fraction=0.3)
    for _ in range(n):
        k = 0 if rng.random() < 0.1 else rng.randint(1, max(1, max_characters))
        size = rng.choice(SCENE_SIZES)
        domain = rng.choice(DOMAINS)
        img, placed = render_scene(rng.sample(specs, k), rng, size=size, domain=domain)
        yield img, [box for _, box in placed]


def write_synthetic_split(root: Path, split: str, n: int, seed: int, max_characters: int) -> int:
    """Write `n` synthetic composites into ``root/{images,labels}/split``; returns the number of boxes."""
    boxes_total = 0
    for i, (img, boxes) in enumerate(synthetic_scenes(n, seed, max_characters)):
        _write_sample(root, split, f"syn_{seed}_{i:05d}", img, boxes)
        boxes_total += len(boxes)
    return boxes_total


def find_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursive, sorted)."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def write_animeface_splits(
    root: Path, real_dir: Path, max_images: int, val_fraction: float, face_expand: float, min_likelihood: float, seed: int
) -> dict[str, int]:
    """Label real images with animeface and write those with >= 1 face; returns counts (images, faces, skipped)."""
    paths = find_images(real_dir)
    if not paths:
        raise DatasetError(f"real_dir={real_dir}: no images found; point it at a folder of JPEG/PNG illustrations")
    rng = random.Random(seed)
    rng.shuffle(paths)
    if max_images > 0:
        paths = paths[:max_images]
    detector = AnimeFaceDetector(min_likelihood=min_likelihood, expand=face_expand)
    counts = {"real_images": 0, "real_faces": 0, "real_skipped": 0}
    n_val = int(round(len(paths) * val_fraction))
    for i, path in enumerate(paths):
        try:
            img = load_image(path)
        except Exception:  # noqa: BLE001 - an unreadable file is skipped, not fatal
            counts["real_skipped"] += 1
            continue
        faces = detector.detect([img])[0]
        if not faces:
            counts["real_skipped"] += 1
            continue
        split = "val" if i < n_val else "train"
        _write_sample(root, split, f"real_{i:05d}", img, faces)
        counts["real_images"] += 1
        counts["real_faces"] += len(faces)
    if counts["real_images"] == 0:
        raise DatasetError(f"real_dir={real_dir}: animeface found no face in {len(paths)} images; use source=synthetic")
    return counts


def build_dataset(cfg: DetectorTrainingConfig, root: Path) -> tuple[Path, dict[str, int]]:
    """Write the YOLO dataset (images/labels/data.yaml) for `cfg.source` under `root`; returns (data.yaml, counts)."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"source={cfg.source!r} is unknown; choose from {', '.join(SOURCES)}")
    if root.exists():
        shutil.rmtree(root)  # a stale half-written dataset must not mix into this run
    counts: dict[str, int] = {}
    if cfg.source in ("synthetic", "both"):
        if cfg.n_train < 1 or cfg.n_val < 1:
            raise ConfigError(f"n_train={cfg.n_train} and n_val={cfg.n_val} must be >= 1")
        counts["synthetic_train_boxes"] = write_synthetic_split(root, "train", cfg.n_train, cfg.seed, cfg.max_characters)
        counts["synthetic_val_boxes"] = write_synthetic_split(root, "val", cfg.n_val, cfg.seed + 10_000, cfg.max_characters)
    if cfg.source in ("animeface", "both"):
        if not cfg.real_dir:
            raise ConfigError(f"source={cfg.source} needs real_dir=FOLDER (real illustrations to label with animeface)")
        real_dir = Path(cfg.real_dir).expanduser()
        if not real_dir.is_dir():
            raise DatasetError(f"real_dir={real_dir}: no such folder; point it at a folder of illustrations")
        counts.update(
            write_animeface_splits(root, real_dir, cfg.max_real_images, cfg.real_val_fraction, cfg.face_expand, cfg.min_likelihood, cfg.seed)
        )
    for split in ("train", "val"):
        counts[f"{split}_images"] = len(list((root / "images" / split).glob("*.jpg")))
        if counts[f"{split}_images"] == 0:
            raise DatasetError(f"the {split} split is empty; raise n_{split} / max_real_images or real_val_fraction")
    data_yaml = _write_data_yaml(root, "data.yaml", "images/val")
    for prefix, source in (("syn_", "synthetic"), ("real_", "real")):  # per-source validation sets for the report
        val_images = sorted((root / "images" / "val").glob(f"{prefix}*.jpg"))
        if val_images:
            atomic_write_text(root / f"val_{source}.txt", "".join(f"./images/val/{p.name}\n" for p in val_images))
            _write_data_yaml(root, f"data_val_{source}.yaml", f"val_{source}.txt")
    return data_yaml, counts


def _write_data_yaml(root: Path, name: str, val: str) -> Path:
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASS_NAMES))
    path = root / name
    atomic_write_text(path, f"path: {root.resolve()}\ntrain: images/train\nval: {val}\nnames:\n{names}\n")
    return path


# --------------------------------------------------------------------------------------------- training


@contextlib.contextmanager
def _no_font_download() -> Iterator[None]:
    """ultralytics fetches Arial.ttf when it checks a dataset (for plot labels); we make no plots, so skip it."""
    import ultralytics.data.utils as data_utils

    original = data_utils.check_font
    data_utils.check_font = lambda *a, **k: None
    try:
        yield
    finally:
        data_utils.check_font = original


def scaled_model_yaml(model: str, width: float | None, depth: float | None, out_dir: Path) -> str:
    """`model` (an ultralytics architecture yaml) with its width/depth multiples replaced, written to `out_dir`.

    ``yolov8n.yaml`` with ``width=0.125`` halves every channel count of YOLOv8n: about 3x fewer FLOPs,
    which is what makes a detector trainable in a minute on 2 CPU cores for tests and demos.
    """
    if width is None and depth is None:
        return model
    from ultralytics.nn.tasks import guess_model_scale, yaml_model_load

    try:
        spec = yaml_model_load(model)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"model={model}: architecture yaml not found ({exc}); use e.g. yolov8n.yaml") from None
    scales = spec.get("scales") or {}
    scale = spec.get("scale") or guess_model_scale(model) or (next(iter(scales)) if scales else "")
    base = list(scales.get(scale, [spec.get("depth_multiple", 1.0), spec.get("width_multiple", 1.0), 1024]))
    if depth is not None:
        base[0] = float(depth)
    if width is not None:
        base[1] = float(width)
    spec = {k: v for k, v in spec.items() if k not in ("yaml_file", "scales", "depth_multiple", "width_multiple")}
    spec["scale"] = "n"
    spec["scales"] = {"n": base}
    import yaml

    path = out_dir / f"{Path(model).stem}-d{base[0]:g}-w{base[1]:g}.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def train_yolo(cfg: DetectorTrainingConfig, data_yaml: Path, run_dir: Path) -> tuple[Path, dict[str, float]]:
    """Train ultralytics YOLO on `data_yaml` fully offline; returns (best weights, validation metrics).

    Offline: the architecture comes from the yaml inside the ultralytics package (no .pt download),
    ``amp=False`` skips the AMP check (it downloads a reference model on GPUs), ``plots=False`` skips fonts.
    """
    ultralytics_offline()
    with torch_global_state_kept():  # import torch before ultralytics (which sets OMP_NUM_THREADS=1)
        from ultralytics import YOLO

    model_path = Path(cfg.model).expanduser()
    if cfg.model.endswith(".pt") and not model_path.is_file():
        raise ConfigError(f"model={cfg.model}: no such weights file; use an architecture yaml such as yolov8n.yaml")
    arch = str(model_path) if model_path.is_file() else cfg.model
    if not arch.endswith(".pt"):
        arch = scaled_model_yaml(arch, cfg.width, cfg.depth, run_dir.parent)
    with torch_global_state_kept():
        model = YOLO(arch, task="detect")
    args = dict(
        data=str(data_yaml), epochs=cfg.epochs, imgsz=cfg.image_size, batch=cfg.batch, device=cfg.device,
        workers=cfg.workers, seed=cfg.seed, patience=cfg.patience, project=str(run_dir.parent), name=run_dir.name,
        exist_ok=True, pretrained=False, amp=False, plots=False, verbose=False, mosaic=cfg.mosaic,
        close_mosaic=cfg.close_mosaic, cache=False, deterministic=True, optimizer=cfg.optimizer,
        warmup_epochs=cfg.warmup_epochs, val=cfg.val_each_epoch,
    )
    if cfg.lr0 is not None:
        args["lr0"] = cfg.lr0
    args.update(cfg.extra or {})
    import torch

    threads = int(cfg.threads or torch.get_num_threads())
    model.add_callback("on_pretrain_routine_start", lambda trainer: torch.set_num_threads(threads))
    with _no_font_download(), torch_global_state_kept():
        model.train(**args)
    trainer = model.trainer
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    return best, _box_metrics(dict(getattr(trainer, "metrics", {}) or {}))


def _box_metrics(raw: dict[str, Any]) -> dict[str, float]:
    return {
        "precision": float(raw.get("metrics/precision(B)", 0.0)),
        "recall": float(raw.get("metrics/recall(B)", 0.0)),
        "map50": float(raw.get("metrics/mAP50(B)", 0.0)),
        "map50_95": float(raw.get("metrics/mAP50-95(B)", 0.0)),
    }


def validate_detector(weights: Path, data_yaml: Path, image_size: int, device: str = "cpu", batch: int = 16) -> dict[str, float]:
    """Box precision/recall/mAP of `weights` on the ``val`` split of `data_yaml` (ultralytics val, no plots)."""
    ultralytics_offline()
    with torch_global_state_kept():
        from ultralytics import YOLO

        model = YOLO(str(weights), task="detect")
        with _no_font_download():
            result = model.val(data=str(data_yaml), imgsz=image_size, batch=batch, device=device, plots=False,
                               verbose=False, workers=0, project=str(weights.parent / "yolo"), name="val", exist_ok=True)
    return _box_metrics(dict(result.results_dict))


def make_detector(cfg: DetectorTrainingConfig) -> TrainedDetector:
    """Build the dataset, train, and publish ``out/detector.pt`` + ``out/detector.json`` atomically."""
    if cfg.epochs < 1 or cfg.image_size < 32 or cfg.batch < 1:
        raise ConfigError(f"epochs={cfg.epochs}, batch={cfg.batch} must be >= 1 and image_size={cfg.image_size} >= 32")
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data_yaml, counts = build_dataset(cfg, out / "dataset")
    training_log.info(f"detector dataset {data_yaml}: {counts}")
    best, metrics = train_yolo(cfg, data_yaml, out / "yolo")
    seconds = time.perf_counter() - t0
    by_source = {}
    if cfg.source == "both":  # how the one model does on each kind of picture
        for source in ("synthetic", "real"):
            yaml_path = data_yaml.parent / f"data_val_{source}.yaml"
            if yaml_path.is_file():
                by_source[source] = validate_detector(best, yaml_path, cfg.image_size, cfg.device, cfg.batch)
    weights = out / "detector.pt"
    with atomic_path(weights) as tmp:
        shutil.copyfile(best, tmp)
    atomic_write_json(out / "detector.json", {
        "weights": weights.name, "class_names": list(CLASS_NAMES), "image_size": cfg.image_size,
        "metrics": metrics, "metrics_by_source": by_source, "dataset": counts, "seconds": round(seconds, 1),
        "config": asdict(cfg),
        "note": "real-image labels come from the animeface detector (pseudo-labels), not from people",
    })
    training_log.info(f"detector written to {weights}: {metrics} in {seconds:.0f} s")
    return TrainedDetector(weights, metrics, data_yaml, seconds)


def parse_overrides(argv: Sequence[str]) -> DetectorTrainingConfig:
    """``key=value`` overrides (Hydra syntax) onto the defaults, type-checked by OmegaConf."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [a for a in argv if "=" not in a]
    if bad:
        raise ConfigError(f"arguments must be key=value (got {bad[0]!r}); e.g. out=outputs/detector epochs=30")
    argv = [a.lstrip("+") for a in argv]
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("preset=")), None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is unknown; choose from {', '.join(PRESETS)}")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(DetectorTrainingConfig), PRESETS.get(preset or "default", {}), OmegaConf.from_dotlist(argv)
        )
    except OmegaConfBaseException as exc:
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"bad option: {msg}; options are {', '.join(DetectorTrainingConfig.__dataclass_fields__)}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def make_tiny_detector(out: str | Path, seed: int = 0) -> Path:
    """``out/detector.pt`` trained with the ``tiny`` preset, reused when already there (shared by tests)."""
    out = Path(out)
    weights = out / "detector.pt"
    if weights.is_file() and (out / "detector.json").is_file():
        return weights
    cfg = parse_overrides(["preset=tiny", f"out={out}", f"seed={seed}"])
    return make_detector(cfg).weights
