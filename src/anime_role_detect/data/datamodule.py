"""`CharacterDataModule`: a ``root/<character>/<image>`` folder (+ optional tags) as Lightning data.

Setup scans the folder, groups exact and near-duplicates (so copies never straddle the split),
decodes every image once to find unreadable ones (skipped and reported, or an error), and makes a
deterministic stratified train/val split saved as a JSON manifest that later runs reuse.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from ..errors import ConfigError, DatasetError, ImageError
from ..fsutil import atomic_write_json, file_sha256, read_json
from ..imageio import load_image
from ..log import training_log
from .dedupe import assign_duplicate_groups
from .layout import (
    ImageRecord,
    characters_per_key,
    class_names,
    filed_characters,
    scan_dataset,
    series_of,
    stratified_group_split,
    tag_vocabulary,
)
from .samplers import PKSampler
from .transforms import IMAGENET_MEAN, IMAGENET_STD, build_eval_transform, build_train_transform, check_resize

Box = tuple[float, float, float, float]
BALANCE_MODES = ("none", "class_weights", "sampler", "pk")
#: how a training picture with a face view is sampled each epoch: ``both`` its figure and its face as two samples
#: (twice the steps), ``either`` one sample that is its face with probability 0.5 (the cost of training without views)
VIEW_SAMPLING = ("both", "either")


class CharacterImageDataset(Dataset):
    """Records -> (image tensor, character index, multi-hot tag vector, mask of the characters its picture is filed
    under); a record with a crop box is that region of its picture (a face view, `CharacterDataModule.add_face_views`);
    one with an `alternate` box is that region or the whole picture, drawn afresh at each load with probability
    `alternate_p`. `filed` lists each record's characters (a group picture's copies: all of them; default its own)."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        root: str | Path,
        class_to_idx: Mapping[str, int],
        tag_to_idx: Mapping[str, int],
        transform: Callable,
        crops: Sequence[tuple[float, float, float, float] | None] | None = None,
        alternates: Sequence[tuple[float, float, float, float] | None] | None = None,
        alternate_p: float = 0.5,
        filed: Sequence[Collection[str]] | None = None,
    ) -> None:
        self.records = list(records)
        self.root = Path(root)
        self.class_to_idx = dict(class_to_idx)
        self.tag_to_idx = dict(tag_to_idx)
        self.transform = transform
        self.crops = list(crops) if crops is not None else [None] * len(self.records)
        self.alternates = list(alternates) if alternates is not None else [None] * len(self.records)
        self.alternate_p = float(alternate_p)
        self.filed = list(filed) if filed is not None else [(r.character,) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def tag_vector(self, rec: ImageRecord) -> torch.Tensor:
        vec = torch.zeros(len(self.tag_to_idx), dtype=torch.float32)
        for t in rec.tags:
            if t in self.tag_to_idx:
                vec[self.tag_to_idx[t]] = 1.0
        return vec

    def filed_vector(self, i: int) -> torch.Tensor:
        vec = torch.zeros(len(self.class_to_idx), dtype=torch.bool)
        vec[[self.class_to_idx[c] for c in self.filed[i] if c in self.class_to_idx]] = True
        vec[self.class_to_idx[self.records[i].character]] = True
        return vec

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]:
        rec = self.records[i]
        img = load_image(rec.path(self.root))  # verified readable at setup
        box = self.crops[i]
        if self.alternates[i] is not None and float(torch.rand(())) < self.alternate_p:  # torch's RNG: seeded per worker
            box = self.alternates[i]
        if box is not None:
            img = img.crop(tuple(int(round(v)) for v in box))
        return self.transform(img), self.class_to_idx[rec.character], self.tag_vector(rec), self.filed_vector(i)


class CharacterDataModule(L.LightningDataModule):
    """Lightning data for character classification with a leak-free, reusable split."""

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 16,
        val_fraction: float = 0.2,
        seed: int = 42,
        num_workers: int = 0,
        augment: Mapping[str, Any] | None = None,
        balance: str = "none",
        dedupe_max_distance: int | None = 8,
        skip_unreadable: bool = True,
        split_dir: str | None = None,
        min_tag_count: int = 2,
        synthetic: Mapping[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        pin_memory: bool = False,
        resize: str = "center_crop",
        face_view: Mapping[str, Any] | None = None,
        pk_per_class: int = 4,
        view_sampling: str = "both",
    ) -> None:
        super().__init__()
        if balance not in BALANCE_MODES:
            raise ConfigError(f"data.balance={balance!r}: choose one of {', '.join(BALANCE_MODES)}")
        if view_sampling not in VIEW_SAMPLING:
            raise ConfigError(f"data.view_sampling={view_sampling!r}: choose one of {', '.join(VIEW_SAMPLING)}")
        if int(batch_size) < 1:
            raise ConfigError(f"data.batch_size={batch_size}: must be at least 1")
        self.root = Path(root).expanduser()
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.augment = dict(augment or {})
        self.balance = balance
        self.pk_per_class = int(pk_per_class)  # K of balance=pk: pictures per character in a batch
        if balance == "pk":
            PKSampler.check(self.batch_size, self.pk_per_class)  # a bad batch_size or K fails now, not at the first epoch
        self.dedupe_max_distance = dedupe_max_distance
        self.skip_unreadable = bool(skip_unreadable)
        self.split_dir = split_dir
        self.min_tag_count = int(min_tag_count)
        self.synthetic = dict(synthetic) if synthetic else None
        self.mean, self.std = tuple(mean), tuple(std)
        self.pin_memory = bool(pin_memory)
        self.resize = check_resize(resize)
        self.face_view_setting = dict(face_view) if face_view else None  # as configured: training checks it, on or off
        self.face_view = dict(face_view) if face_view and face_view.get("enabled") else None  # training adds the views
        self.view_sampling = view_sampling
        self.face_crops: dict[str, tuple[float, float, float, float]] = {}
        self.class_names: list[str] = []
        self.series: dict[str, str] = {}
        self.tag_names: list[str] = []
        self.train_records: list[ImageRecord] = []
        self.val_records: list[ImageRecord] = []
        self.val_filed: list[frozenset[str]] = []  # per val record: every character its picture is filed under
        self.train_filed: list[frozenset[str]] = []  # the same per training record (model.partial_labels' loss reads it)
        self.unreadable: list[str] = []
        self.split_path: Path | None = None
        self._ready = False

    # -- data preparation -------------------------------------------------------------------
    def _maybe_generate_synthetic(self) -> None:
        """Generate the embedded synthetic dataset when `root` is its configured home and missing."""
        if not self.synthetic:
            return
        home = Path(str(self.synthetic.get("root", self.root))).expanduser()
        if home.resolve() != self.root.resolve() or (self.root / "metadata.jsonl").exists():
            return
        from .synthetic import ensure_dataset

        kw = {k: v for k, v in self.synthetic.items() if k != "root"}
        training_log.info(f"generating the synthetic demo dataset at {self.root} ({kw})")
        ensure_dataset(self.root, **kw)

    def default_split_path(self) -> Path:
        """Manifest location: ``split_dir/<name>-<hash of root>-s<seed>-v<frac>.json``, else ``root/split.json``."""
        if not self.split_dir:
            return self.root / "split.json"
        key = hashlib.sha1(str(self.root.resolve()).encode()).hexdigest()[:8]
        return Path(self.split_dir).expanduser() / f"{self.root.name}-{key}-s{self.seed}-v{self.val_fraction:g}.json"

    def _verify_images(self, records: Sequence[ImageRecord]) -> list[str]:
        """Decode every image once; return the unreadable ones as 'file: reason'."""
        bad = []
        for r in records:
            path = r.path(self.root)
            try:
                load_image(path)
            except (ImageError, OSError) as exc:
                reason = re.sub(r" ?<_io\.\w+ object at 0x[0-9a-f]+>", "", str(exc).replace(f"{path}: ", ""))
                bad.append(f"{r.file_name}: {reason}")
        return bad

    def _compute_split(self, records: list[ImageRecord]) -> dict[str, Any]:
        if self.dedupe_max_distance is not None:
            report = assign_duplicate_groups(records, self.root, int(self.dedupe_max_distance))
            bad_names = set(report.unreadable)
            unreadable = [b for b in self._verify_images([r for r in records if r.file_name in bad_names])]
            dup_info = {"exact_duplicates": report.exact_duplicates, "near_duplicate_groups": report.near_duplicate_groups}
        else:
            unreadable = self._verify_images(records)
            dup_info = {"exact_duplicates": None, "near_duplicate_groups": None}
        bad = {u.split(": ", 1)[0] for u in unreadable}
        good = [r for r in records if r.file_name not in bad]
        split = stratified_group_split(good, self.val_fraction, self.seed)
        groups = {r.file_name: r.group for r in good if r.group}
        return {**asdict(split), "root": str(self.root.resolve()), "unreadable": unreadable, "groups": groups, **dup_info}

    def _load_or_make_manifest(self, records: list[ImageRecord]) -> dict[str, Any]:
        """Reuse the saved split when it matches this folder, seed and fraction; else compute and save it."""
        path = self.split_path = self.default_split_path()
        names = {r.file_name for r in records}
        if path.is_file():
            try:
                m = read_json(path)
                bad = {u.split(": ", 1)[0] for u in m.get("unreadable", [])}
                same = set(m["train"]) | set(m["val"]) | bad == names
                if same and int(m["seed"]) == self.seed and float(m["val_fraction"]) == self.val_fraction:
                    return m
                training_log.warning(f"split manifest {path} does not match the dataset (files/seed/fraction changed); making a new split")
            except (ValueError, KeyError, TypeError, OSError) as exc:
                training_log.warning(f"split manifest {path} is unreadable ({exc}); making a new split")
        m = self._compute_split(records)
        atomic_write_json(path, m)
        training_log.info(f"wrote split manifest {path}: {len(m['train'])} train / {len(m['val'])} val")
        return m

    def prepare_data(self) -> None:
        """Rank 0: generate the demo data if needed and write the split manifest."""
        self._maybe_generate_synthetic()
        self._load_or_make_manifest(scan_dataset(self.root))

    def setup(self, stage: str | None = None) -> None:
        """Every rank: read records and the manifest, build class/tag vocabularies."""
        if self._ready:
            return
        self._maybe_generate_synthetic()
        records = scan_dataset(self.root)
        m = self._load_or_make_manifest(records)
        self.unreadable = list(m.get("unreadable", []))
        if self.unreadable:
            if not self.skip_unreadable:
                more = f" (+{len(self.unreadable) - 1} more)" if len(self.unreadable) > 1 else ""
                raise DatasetError(
                    f"unreadable image in {self.root}: {self.unreadable[0]}{more}; "
                    "delete or re-export it, or set data.skip_unreadable=true to skip it"
                )
            training_log.warning(f"skipping {len(self.unreadable)} unreadable image(s): {'; '.join(self.unreadable[:5])}")
        groups = m.get("groups", {})
        metadata_groups = {r.file_name: r.group for r in records}  # the clean stage's `multi:` groups, before the split's
        by_name = {r.file_name: r for r in records}
        for name, g in groups.items():
            if name in by_name:
                by_name[name].group = g
        train_set, val_set = set(m["train"]), set(m["val"])
        self.train_records = [r for r in records if r.file_name in train_set]
        self.val_records = [r for r in records if r.file_name in val_set]
        usable = self.train_records + self.val_records
        self.class_names = class_names(records)
        empty = sorted(set(self.class_names) - {r.character for r in usable})
        if empty:
            raise DatasetError(f"character folder(s) {', '.join(empty)} in {self.root} have no readable images; fix or remove them")
        if len(self.class_names) < 2:
            raise DatasetError(f"dataset folder {self.root} has {len(self.class_names)} character; a classifier needs at least 2")
        if not self.val_records:
            raise DatasetError(f"the validation split of {self.root} is empty; add images (2+ per character) or raise data.val_fraction")
        self.series = series_of(records)
        self.tag_names = tag_vocabulary(self.train_records, self.min_tag_count)
        self.val_filed = self._filed_characters(self.val_records, metadata_groups)
        self.train_filed = self._filed_characters(self.train_records, metadata_groups)
        self._ready = True

    def _filed_characters(self, records: Sequence[ImageRecord], metadata_groups: Mapping[str, str]) -> list[frozenset[str]]:
        """Each record's characters as the version build reads them (`data.layout.filed_characters`: same bytes or the
        clean stage's group); only records whose split group spans several characters can be such copies, so only
        they are hashed."""
        spans = characters_per_key([r.character for r in records], [r.group for r in records])
        shared = [ImageRecord(**{**r.to_json(), "group": metadata_groups.get(r.file_name, "")})
                  for r, chars in zip(records, spans) if len(chars) > 1]
        filed = filed_characters(shared, [file_sha256(r.path(self.root)) for r in shared])
        return [filed.get(r.file_name, frozenset((r.character,))) for r in records]

    # -- loaders ----------------------------------------------------------------------------
    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.class_names)}

    @property
    def tag_to_idx(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tag_names)}

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Use the backbone's normalisation (called by `training.train` once the model exists)."""
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)

    def class_counts(self) -> list[int]:
        counts = Counter(r.character for r in self.train_records)
        return [counts.get(c, 0) for c in self.class_names]

    @property
    def class_weights(self) -> list[float] | None:
        """Inverse-frequency weights (mean 1) when ``balance=class_weights``; else None."""
        if self.balance != "class_weights":
            return None
        counts = [max(1, c) for c in self.class_counts()]
        inv = [1.0 / c for c in counts]
        mean = sum(inv) / len(inv)
        return [w / mean for w in inv]

    def add_face_views(self, crops: Mapping[str, Sequence[float]]) -> int:
        """Train on each training picture's face too: `crops` maps a file name to its face region ``[x1, y1, x2, y2]``
        (found by the face detector `training` runs, margin included); each becomes one more training sample."""
        train = {r.file_name for r in self.train_records}
        self.face_crops = {k: tuple(float(v) for v in box) for k, box in crops.items() if box is not None and k in train}  # type: ignore[misc]
        return len(self.face_crops)

    def _train_items(self) -> tuple[list[ImageRecord], list[Box | None], list[Box | None] | None]:
        """Training records, their crop boxes and (``view_sampling=either``) the face box each may be swapped for."""
        if self.view_sampling == "either":
            return self.train_records, [None] * len(self.train_records), [self.face_crops.get(r.file_name) for r in self.train_records]
        faces = [r for r in self.train_records if r.file_name in self.face_crops]
        return self.train_records + faces, [None] * len(self.train_records) + [self.face_crops[r.file_name] for r in faces], None

    def _dataset(self, records: Sequence[ImageRecord], train: bool, crops: Sequence[Box | None] | None = None,
                 alternates: Sequence[Box | None] | None = None,
                 filed: Sequence[Collection[str]] | None = None) -> CharacterImageDataset:
        tf = (
            build_train_transform(self.image_size, self.mean, self.std, self.augment, self.resize)
            if train
            else build_eval_transform(self.image_size, self.mean, self.std, self.resize)
        )
        return CharacterImageDataset(records, self.root, self.class_to_idx, self.tag_to_idx, tf, crops, alternates, filed=filed)

    def _loader(self, ds: Dataset, shuffle: bool, sampler: Any = None, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=batch_size or self.batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        records, crops, alternates = self._train_items()
        sampler, batch_size = None, None
        if self.balance == "pk":
            labels = [self.class_to_idx[r.character] for r in records]
            sampler = PKSampler(labels, self.batch_size, self.pk_per_class, self.seed)
            batch_size = sampler.batch_size
        elif self.balance == "sampler":
            counts = Counter(r.character for r in records)
            weights = [1.0 / max(1, counts[r.character]) for r in records]
            sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=torch.Generator().manual_seed(self.seed))
        filed = dict(zip((r.file_name for r in self.train_records), self.train_filed))
        ds = self._dataset(records, train=True, crops=crops, alternates=alternates, filed=[filed[r.file_name] for r in records])
        return self._loader(ds, shuffle=True, sampler=sampler, batch_size=batch_size)

    def val_dataloader(self) -> DataLoader:
        """Validation pictures; each batch's 4th item marks every character a picture is filed under (what
        `val/acc` counts as right)."""
        return self._loader(self._dataset(self.val_records, train=False, filed=self.val_filed), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def summary(self) -> dict[str, Any]:
        """Sizes for logs and reports."""
        return {
            "root": str(self.root),
            "classes": len(self.class_names),
            "tags": len(self.tag_names),
            "train_images": len(self.train_records),
            "val_images": len(self.val_records),
            "face_views": len(self.face_crops),
            "unreadable": len(self.unreadable),
            "split_manifest": str(self.split_path) if self.split_path else None,
        }
