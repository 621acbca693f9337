"""The dataset-folder contract: ``ROOT/<character>/<image>`` plus optional ``ROOT/metadata.jsonl``.

Each metadata line: ``{"file_name": "<character>/<image>", "character", "series", "tags": [...],
"source", "group"}`` (Hugging Face ``imagefolder`` naming). Splits never cut a ``group``.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ..errors import DatasetError
from ..fsutil import atomic_write_json, atomic_write_text, read_json
from ..imageio import IMAGE_SUFFIXES

METADATA_FILE = "metadata.jsonl"
SPLIT_FILE = "split.json"
#: `ImageRecord.group` prefix of a picture filed under several characters (the clean stage's `ambiguous: keep`)
MULTI_GROUP_PREFIX = "multi:"


@dataclass
class ImageRecord:
    """One labelled image of a dataset folder."""

    file_name: str  # path relative to the dataset root, '/'-separated
    character: str
    series: str = ""
    tags: list[str] = field(default_factory=list)
    source: str = ""
    group: str = ""  # post / near-duplicate group; empty means "its own group"

    def path(self, root: str | Path) -> Path:
        """Absolute path of the image under `root`."""
        return Path(root) / self.file_name

    @property
    def group_key(self) -> str:
        """Group used by splits: the explicit group, else the file itself."""
        return self.group or self.file_name

    def to_json(self) -> dict:
        return asdict(self)


def read_metadata(root: str | Path) -> dict[str, ImageRecord]:
    """Read ``metadata.jsonl`` (absent file -> empty), keyed by ``file_name``; bad lines are errors."""
    path = Path(root) / METADATA_FILE
    out: dict[str, ImageRecord] = {}
    if not path.exists():
        return out
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
            rec = ImageRecord(
                file_name=str(obj["file_name"]),
                character=str(obj.get("character") or Path(obj["file_name"]).parts[0]),
                series=str(obj.get("series") or ""),
                tags=[str(t) for t in obj.get("tags") or []],
                source=str(obj.get("source") or ""),
                group=str(obj.get("group") or ""),
            )
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise DatasetError(
                f"{path}:{lineno}: malformed metadata line ({exc}); each line must be a JSON object with 'file_name'"
            ) from None
        out[rec.file_name] = rec
    return out


def write_metadata(root: str | Path, records: Iterable[ImageRecord]) -> Path:
    """Write ``metadata.jsonl`` atomically."""
    path = Path(root) / METADATA_FILE
    text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
    return path


def scan_dataset(root: str | Path, require_min_classes: int = 1) -> list[ImageRecord]:
    """List the labelled images of a dataset folder, merging ``metadata.jsonl`` when present.

    Raises `DatasetError` for a missing folder, no class folders, or an empty class folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"dataset folder {root} does not exist; pass data.root=<folder with one sub-folder per character>"
        )
    meta = read_metadata(root)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not classes:
        raise DatasetError(f"dataset folder {root} has no character sub-folders; expected {root}/<character>/<image>")
    records: list[ImageRecord] = []
    for cdir in classes:
        files = sorted(p for p in cdir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(
                f"character folder {cdir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder"
            )
        for f in files:
            rel = f.relative_to(root).as_posix()
            rec = meta.get(rel) or ImageRecord(file_name=rel, character=cdir.name)
            if rec.character != cdir.name:
                rec = ImageRecord(**{**rec.to_json(), "character": cdir.name})
            records.append(rec)
    if len(classes) < require_min_classes:
        raise DatasetError(f"dataset folder {root} has {len(classes)} character(s); at least {require_min_classes} needed")
    return records


def class_names(records: Sequence[ImageRecord]) -> list[str]:
    """Sorted unique character names."""
    return sorted({r.character for r in records})


def series_of(records: Sequence[ImageRecord]) -> dict[str, str]:
    """character -> series (first non-empty value seen)."""
    out: dict[str, str] = {}
    for r in records:
        if r.series and not out.get(r.character):
            out[r.character] = r.series
        out.setdefault(r.character, r.series)
    return out


def tag_vocabulary(records: Sequence[ImageRecord], min_count: int = 1) -> list[str]:
    """Sorted tags that occur at least `min_count` times."""
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        for t in set(r.tags):
            counts[t] += 1
    return sorted(t for t, c in counts.items() if c >= min_count)


@dataclass
class Split:
    """A train/val split as lists of ``file_name``; saved as ``split.json`` and reused."""

    train: list[str]
    val: list[str]
    seed: int
    val_fraction: float

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> "Split":
        obj = read_json(path)
        return cls(train=list(obj["train"]), val=list(obj["val"]), seed=int(obj["seed"]), val_fraction=float(obj["val_fraction"]))


def characters_per_key(labels: Sequence[str], keys: Sequence[str]) -> list[frozenset[str]]:
    """Each item's characters: every label filed under its key (one picture's content hash or group); an empty key,
    its own label. A booru group picture is collected once per character tagged on it: one key, several labels."""
    by_key: dict[str, set[str]] = defaultdict(set)
    for y, k in zip(labels, keys):
        if k:
            by_key[k].add(y)
    return [frozenset(by_key[k]) if k else frozenset((y,)) for y, k in zip(labels, keys)]


def filed_characters(records: Sequence[ImageRecord], sha256: Sequence[str]) -> dict[str, frozenset[str]]:
    """File name -> every character its picture is filed under: its copies share bytes (`sha256`, one per record), or
    one `MULTI_GROUP_PREFIX` group the clean stage wrote. Naming any of them names someone the picture shows."""
    keys = [r.group if r.group.startswith(MULTI_GROUP_PREFIX) else h for r, h in zip(records, sha256)]
    return {r.file_name: c for r, c in zip(records, characters_per_key([r.character for r in records], keys))}


def stratified_group_split(records: Sequence[ImageRecord], val_fraction: float = 0.2, seed: int = 42) -> Split:
    """Deterministic per-character split that keeps every ``group`` on one side.

    Groups are assigned greedily (largest first, shuffled by `seed`) to val until the character's
    val share reaches `val_fraction`; every character with 2+ groups gets at least one val group.
    A group spanning characters is placed by its first member's character, so val fills with the pictures a character
    seen mostly in groups is alone in (on `newgame_full` every one of `ahagon_umiko`'s). Counting a group picture for
    every character it shows, val's share of each kind, was measured and not adopted: the same top-1 (the val pictures
    join the gallery either way) and 3.7x the known pictures refused, a threshold calibrated on an easier val
    (docs/accuracy.md "Which pictures a split sends to val").
    """
    if not 0.0 < val_fraction < 1.0:
        from ..errors import ConfigError

        raise ConfigError(f"data.val_fraction={val_fraction}: must be between 0 and 1 (e.g. 0.2)")
    rng = random.Random(seed)
    groups: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.file_name):
        groups[r.group_key].append(r)
    by_char: dict[str, list[str]] = defaultdict(list)
    for g, members in groups.items():
        by_char[members[0].character].append(g)
    train: list[str] = []
    val: list[str] = []
    for char in sorted(by_char):
        gids = sorted(by_char[char])
        rng.shuffle(gids)
        gids.sort(key=lambda g: -len(groups[g]))  # stable: big groups first, ties in shuffled order
        total = sum(len(groups[g]) for g in gids)
        target = val_fraction * total
        n_val = 0
        chosen: set[str] = set()
        # Fill val with the smallest groups first so the share lands close to the target.
        for g in reversed(gids):
            if len(gids) - len(chosen) <= 1:
                break
            if n_val + len(groups[g]) <= max(target, 1) or not chosen:
                chosen.add(g)
                n_val += len(groups[g])
            if n_val >= target:
                break
        for g in gids:
            (val if g in chosen else train).extend(r.file_name for r in groups[g])
    return Split(train=sorted(train), val=sorted(val), seed=seed, val_fraction=val_fraction)
