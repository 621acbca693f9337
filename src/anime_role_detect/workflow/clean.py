"""Cleaning collected images into a training-ready dataset folder.

Rejects files that are not images, are corrupt, or are too small; puts exact duplicates (content
hash) and perceptual near-duplicates (pHash within ``max_distance`` bits) in one split group, so no
copy leaks across the split (``near_duplicates=remove`` keeps only the largest copy). A picture
found under several characters (a booru picture of a group) is kept under each of them in one split
group (``ambiguous=keep``), or dropped (``drop``). Optionally crops each image to
the character the detector finds. The dataset is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from ..data.dedupe import assign_duplicate_groups, near_duplicate_clusters, perceptual_hash
from ..data.layout import MULTI_GROUP_PREFIX, ImageRecord, write_metadata
from ..errors import ConfigError, ImageError
from ..fsutil import file_sha256, link_or_copy
from ..imageio import ImageLimits, load_image
from ..log import get_logger
from .progress import Progress

_log = get_logger("system")

NEAR_DUPLICATE_MODES = ("remove", "group")
#: keep: one copy per character, all in one split group; drop: reject every copy.
#: keep is the default: newgame_full files 262 of its 756 pictures under 2+ characters, and dropping them cost the
#: workflow's version about 9 points of top-1 on set-aside pictures (docs/accuracy.md "Pictures of several characters").
AMBIGUOUS_MODES = ("keep", "drop")


@dataclass
class CleanConfig:
    """Cleaning options (``clean:`` in conf/workflow.yaml)."""

    min_side: int = 64  # px; smaller images carry too little of the character
    max_distance: int = 6  # pHash bits for near-duplicates (0 = exact copies only)
    near_duplicates: str = "group"  # group: keep all, same split side; remove: keep the largest copy
    ambiguous: str = "keep"  # a picture under several characters: keep (under each, one split group) | drop
    crop: Mapping[str, Any] | None = None  # {enabled, detector: {...}, margin, keep_uncropped}

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | None) -> "CleanConfig":
        data = dict(cfg or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"clean: unknown option(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        out = cls(**data)
        if out.near_duplicates not in NEAR_DUPLICATE_MODES:
            raise ConfigError(f"clean.near_duplicates={out.near_duplicates!r}: choose one of {NEAR_DUPLICATE_MODES}")
        if out.ambiguous not in AMBIGUOUS_MODES:
            raise ConfigError(f"clean.ambiguous={out.ambiguous!r}: choose one of {AMBIGUOUS_MODES}")
        return out


@dataclass
class CleanReport:
    """Per-character counts and every rejected file with its reason."""

    kept: dict[str, int] = field(default_factory=dict)
    collected: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # file_name -> reason
    reasons: dict[str, int] = field(default_factory=dict)
    near_duplicate_groups: int = 0
    multi_character_pictures: int = 0  # pictures found under several characters (kept or dropped: `ambiguous`)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class _Item:
    record: ImageRecord
    src: Path
    sha: str = ""
    phash: int = 0
    pixels: int = 0
    crop: Image.Image | None = None


def _reject(report: CleanReport, item: _Item, reason: str) -> None:
    report.rejected[item.record.file_name] = reason
    key = reason.split(":", 1)[0]
    report.reasons[key] = report.reasons.get(key, 0) + 1


def _crop_function(crop_cfg: Mapping[str, Any] | None) -> Callable[[Image.Image], Image.Image | None] | None:
    """Detector-based crop (largest-score box plus margin), or None when cropping is off."""
    if not crop_cfg or not crop_cfg.get("enabled", False):
        return None
    from ..recognition.detector import build_detector, crop_box

    detector = build_detector(dict(crop_cfg.get("detector") or {}))
    margin = float(crop_cfg.get("margin", 0.1))

    def crop(img: Image.Image) -> Image.Image | None:
        boxes = detector.detect([img])[0]
        if not boxes:
            return None
        best = max(boxes, key=lambda b: b.score)
        return crop_box(img, best, margin)

    return crop


def _keep_copies(group: list[_Item], cfg: CleanConfig, report: CleanReport) -> list[_Item]:
    """The copies of one character's near-duplicate `group` that stay: the largest (``remove``) or all in one group."""
    if len(group) == 1:
        return group
    report.near_duplicate_groups += 1
    best = max(group, key=lambda it: (it.pixels, it.src.stat().st_size, it.record.file_name))
    if cfg.near_duplicates == "group":
        for it in group:
            it.record.group = f"dup:{best.record.file_name}"
        return group
    for it in group:
        if it is not best:
            kind = "exact duplicate" if it.sha == best.sha else "near-duplicate"
            _reject(report, it, f"{kind}: of {best.record.file_name}")
    return [best]


def clean_dataset(
    records: Sequence[ImageRecord],
    raw_root: Path,
    out_root: Path,
    cfg: CleanConfig,
    progress: Progress | None = None,
) -> tuple[list[ImageRecord], CleanReport]:
    """Write the cleaned dataset of `records` (files under `raw_root`) to `out_root`; returns kept records and report."""
    raw_root, out_root = Path(raw_root), Path(out_root)
    report = CleanReport(collected=dict(Counter(r.character for r in records)))
    limits = ImageLimits(min_side=max(1, int(cfg.min_side)))
    crop = _crop_function(cfg.crop)
    keep_uncropped = bool((cfg.crop or {}).get("keep_uncropped", True))
    items: list[_Item] = []
    for i, rec in enumerate(sorted(records, key=lambda r: r.file_name)):
        item = _Item(record=ImageRecord(**rec.to_json()), src=raw_root / rec.file_name)
        try:
            img = load_image(item.src, limits)
        except ImageError as exc:
            text = str(exc)
            reason = "too small" if "too small" in text else "not an image" if "not an image" in text else "corrupt"
            _reject(report, item, f"{reason}: {text.split(': ', 1)[-1]}")
        else:
            if crop is not None:
                cropped = crop(img)
                if cropped is None and not keep_uncropped:
                    _reject(report, item, "no character found by the detector")
                    img = None
                elif cropped is not None:
                    item.crop = img = cropped
            if img is not None:
                item.sha = file_sha256(item.src)
                item.phash = perceptual_hash(img)
                item.pixels = img.size[0] * img.size[1]
                items.append(item)
        if progress and (i % 16 == 0 or i + 1 == len(records)):
            progress.emit("clean", i + 1, len(records), "checking images" if i + 1 < len(records) else "")

    # Near-duplicates by pHash distance; exact copies (same bytes, same hash) always fall in one cluster.
    clusters = near_duplicate_clusters([it.phash for it in items], int(cfg.max_distance))
    members: dict[int, list[_Item]] = defaultdict(list)
    for it, c in zip(items, clusters):
        members[c].append(it)
    kept: list[_Item] = []
    for group in members.values():
        chars = sorted({it.record.character for it in group})
        if len(chars) > 1:
            report.multi_character_pictures += 1
            if cfg.ambiguous == "drop":
                for it in group:
                    _reject(report, it, f"ambiguous: the same picture is collected for {', '.join(chars)}")
                continue
            shared = [_keep_copies([it for it in group if it.record.character == c], cfg, report) for c in chars]
            gid = f"{MULTI_GROUP_PREFIX}{min(it.record.file_name for it in group)}"
            for it in (it for copies in shared for it in copies):
                it.record.group = gid  # every character's copy on one side of the split
                kept.append(it)
            continue
        kept.extend(_keep_copies(group, cfg, report))

    if out_root.exists():
        shutil.rmtree(out_root)
    out_root.mkdir(parents=True)
    out_records: list[ImageRecord] = []
    for it in sorted(kept, key=lambda it: it.record.file_name):
        rec = it.record
        if it.crop is not None:
            rec.file_name = str(Path(rec.file_name).with_suffix(".png").as_posix())
            (out_root / rec.file_name).parent.mkdir(parents=True, exist_ok=True)
            it.crop.save(out_root / rec.file_name)
        else:
            link_or_copy(it.src, out_root / rec.file_name)
        out_records.append(rec)
    if cfg.near_duplicates == "group":  # also merge booru parent groups with pHash groups (transitively)
        assign_duplicate_groups(out_records, out_root, int(cfg.max_distance))
    write_metadata(out_root, out_records)
    report.kept = dict(Counter(r.character for r in out_records))
    if progress:
        progress.emit("clean", len(records), len(records), f"kept {len(out_records)} of {len(records)} images")
    return out_records, report
