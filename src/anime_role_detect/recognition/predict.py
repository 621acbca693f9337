"""Gallery embedding as a Lightning ``predict``: one process or many (DDP over processes, GPUs, nodes, SLURM).

Each rank embeds its slice of the images (`data.predict_module.ImageFolderPredictData`) with the configured embedder
(`EmbedModule`, the same ``embed`` as the in-process path) and `ShardWriter` writes what it made as atomic
shard files ``rank-00003-part-0000.npz`` (ids + unit vectors) plus ``rank-00003.done.json`` (`recognition.shards`).
`gallery_from_shards` then builds the `Gallery` the way `Gallery.build` does (characters sorted, rows in dataset
order within one, prototypes per character), so 1 and N processes give the same rows in the same order; it
streams the vectors through a scratch file, so one machine merges a 10M-image archive (docs/recognition.md).
A run that was killed resumes: run again with the same images, embedder and world size, it embeds only the images
no finished part holds (`resume_state`), each rank numbering its new parts after its old ones.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ..errors import GalleryError
from ..fsutil import atomic_write_json, fingerprint, read_json
from ..log import get_logger
from .aggregate import DEFAULT_AGGREGATE
from .faiss_index import resolve_kind, train_rows
from .gallery import Gallery
from .shards import DONE_GLOB, PART_GLOB, RUN_FILE, ShardSet, done_name, not_embedded, part_name, rank_parts, save_part

_log = get_logger("system")


def _device_name(device: torch.device) -> str:
    """A torch device as the embedder's device setting (``cpu``, ``cuda:1``, ``mps``)."""
    return f"{device.type}:{device.index}" if device.index is not None else device.type


class EmbedModule(L.LightningModule):
    """Runs the configured embedder on each predict batch of `Decoded` images; returns (ids, vectors, errors)."""

    def __init__(self, embedder_cfg: Mapping[str, Any], base_dir: str | Path | None = None, threads: int | None = None) -> None:
        super().__init__()
        self.embedder_cfg = dict(embedder_cfg)
        self.base_dir = base_dir
        self.threads = threads
        self.embedder: Any = None

    def setup(self, stage: str) -> None:
        """Build the embedder on this rank's device; CPU ranks share the cores instead of each taking all of them."""
        from .embedder import build_embedder

        device = self.trainer.strategy.root_device
        if device.type == "cpu":
            local = max(1, int(getattr(self.trainer, "num_devices", 1) or 1))
            torch.set_num_threads(int(self.threads or max(1, (os.cpu_count() or 1) // local)))
        if self.embedder is None:
            self.embedder = build_embedder({**self.embedder_cfg, "device": _device_name(device)}, base_dir=self.base_dir)

    def predict_step(self, batch: list[Any], batch_idx: int) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
        good = [d for d in batch if d.image is not None]
        vectors = self.embedder.embed([d.image for d in good]) if good else np.zeros((0, int(self.embedder.dim)), np.float32)
        return [d.id for d in good], vectors, [(d.id, d.error) for d in batch if d.image is None]


class ShardWriter(BasePredictionWriter):
    """Writes each rank's embeddings as atomic shard parts of at most `rows_per_part` rows, then a done marker."""

    def __init__(self, shard_dir: str | Path, rows_per_part: int = 65_536, run: Mapping[str, Any] | None = None,
                 resume: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.shard_dir = Path(shard_dir)
        self.rows_per_part = max(1, int(rows_per_part))
        self.run = dict(run or {})
        self.resume = resume
        self.skipped = 0  # images an earlier run's parts already hold (a resumed run)
        self._ids: list[str] = []
        self._vecs: list[np.ndarray] = []
        self._errors: list[tuple[str, str]] = []
        self._parts = 0
        self._rows = 0
        self._t0 = 0.0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Rank 0 clears an earlier run's shards (a resumed run's done markers only) and records this run; the other
        ranks write only after Lightning's post-setup barrier. A resuming rank numbers its parts after its old ones."""
        if trainer.global_rank == 0:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            stale = self.shard_dir.glob(DONE_GLOB) if self.resume else [*self.shard_dir.glob(PART_GLOB), *self.shard_dir.glob(DONE_GLOB)]
            for old in stale:
                old.unlink()
            atomic_write_json(self.shard_dir / RUN_FILE, self.run)
        if self.resume:
            self._parts = len(rank_parts(self.shard_dir, trainer.global_rank))

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.perf_counter()  # the embedder is loaded: from here on it is embedding time

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any, batch_indices: Any,
                           batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        ids, vectors, errors = prediction
        if ids:
            self._ids.extend(ids)
            self._vecs.append(np.asarray(vectors, np.float32))
        self._errors.extend(errors)
        if len(self._ids) >= self.rows_per_part:
            self._flush(trainer.global_rank)

    def _flush(self, rank: int) -> None:
        if not self._ids:
            return
        save_part(self.shard_dir / part_name(rank, self._parts), self._ids, np.concatenate(self._vecs))
        self._parts += 1
        self._rows += len(self._ids)
        self._ids, self._vecs = [], []

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Last part, the done marker (rows, parts, world size, embedder), then wait for every rank."""
        rank = trainer.global_rank
        self._flush(rank)
        emb = pl_module.embedder
        atomic_write_json(self.shard_dir / done_name(rank), {
            "rank": rank, "world_size": trainer.world_size, "rows": self._rows, "parts": self._parts, "skipped": self.skipped,
            "seconds": round(time.perf_counter() - self._t0, 3),
            "embedder_id": str(emb.model_id), "dim": int(emb.dim), "errors": [list(e) for e in self._errors]})
        trainer.strategy.barrier("embedding_shards_written")


def predict_embeddings(items: Sequence[tuple[str, str | Path]], embedder_cfg: Mapping[str, Any], shard_dir: str | Path,
                       trainer_cfg: Mapping[str, Any] | None = None, base_dir: str | Path | None = None, batch_size: int = 32,
                       num_workers: int = 2, rows_per_part: int = 65_536, resume: bool = True) -> L.Trainer:
    """Run the Lightning predict over `items` and write this rank's shards; returns the trainer (its rank decides who merges).

    `trainer_cfg` holds Trainer arguments (``accelerator``, ``devices``, ``strategy``, ``num_nodes``; a Hydra
    ``_target_`` is ignored). Under DDP every rank runs this call; merge after it on rank 0 only.
    """
    from ..data.predict_module import ImageFolderPredictData

    tcfg = {k: v for k, v in dict(trainer_cfg or {}).items() if not str(k).startswith("_") and k in _TRAINER_KEYS}
    tcfg.setdefault("accelerator", "cpu")
    tcfg.setdefault("devices", 1)
    writer = ShardWriter(shard_dir, rows_per_part)
    trainer = L.Trainer(**tcfg, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, callbacks=[writer], default_root_dir=str(shard_dir))
    writer.run = {"embedder": embedder_key(embedder_cfg), "images": fingerprint([str(i) for i, _ in items]),
                  "world_size": int(trainer.world_size)}
    left = resume_state(shard_dir, writer.run, items) if resume else list(items)
    writer.resume, writer.skipped = len(left) < len(items), len(items) - len(left)
    if not left:  # every image is in a finished part and every rank's marker is there: nothing to embed
        for marker in Path(shard_dir).glob(DONE_GLOB):
            atomic_write_json(marker, {**read_json(marker), "rows": 0, "seconds": 0.0, "skipped": len(items)})
        return trainer
    module = EmbedModule(embedder_cfg, base_dir=base_dir)
    trainer.predict(module, datamodule=ImageFolderPredictData(left, batch_size, num_workers), return_predictions=False)
    return trainer


def embedder_key(embedder_cfg: Mapping[str, Any]) -> str:
    """The embedder's settings and the content of every weights file they name: a checkpoint retrained in place makes
    another key, so its old vectors are never reused."""
    from .shared import file_fingerprint

    files = {k: file_fingerprint(v) for k, v in embedder_cfg.items() if isinstance(v, str) and v and Path(v).is_file()}
    return fingerprint([dict(embedder_cfg), files])


def resume_state(shard_dir: str | Path, run: Mapping[str, Any], items: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The items an earlier run of the same `run` (embedder, images, world size) left to embed; all of them when the
    folder holds another run's shards, or when the earlier run left no marker for a rank that had nothing left."""
    d = Path(shard_dir)
    if not d.is_dir() or not (d / RUN_FILE).is_file() or read_json(d / RUN_FILE) != dict(run):
        return list(items)
    missing = not_embedded(d, [str(i) for i, _ in items])
    left = [it for it, m in zip(items, missing.tolist()) if m]
    if not left:
        try:
            ShardSet.open(d)
        except GalleryError:
            return list(items)  # killed between its last part and its marker: embed again from the start
    if len(left) < len(items):
        _log.info(f"resuming the embedding in {d}: {len(items) - len(left)} of {len(items)} images are in its finished parts")
    return left


#: Trainer arguments that matter to a predict run (a training config's max_epochs, precision etc. are left out).
_TRAINER_KEYS = frozenset({"accelerator", "devices", "num_nodes", "strategy", "use_distributed_sampler", "plugins"})
EMBED_LOG = "embed.log"  # the embed command's output, in its work folder
POLL_S = 0.5  # how often a caller waiting on the embed command checks for a cancel
_HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR"  # Hydra's last line after an error: not the error


def gallery_order(characters: Sequence[str]) -> np.ndarray:
    """Row order of a gallery built from these rows: characters sorted, rows in the given order within one."""
    names = np.asarray(characters, dtype=np.str_)
    return np.argsort(names, kind="stable") if len(names) else np.zeros(0, np.int64)


def gallery_from_vectors(rows: Sequence[tuple[str, str, str]], vectors: np.ndarray, embedder_id: str, dim: int,
                         embedder_config: Mapping[str, Any] | None = None, index: Any = None, prototypes: Any = None,
                         aggregate: str = DEFAULT_AGGREGATE, progress: Callable[[int, int], None] | None = None,
                         spill_dir: str | Path | None = None, chunk: int = 65_536) -> Gallery:
    """`Gallery.build` from precomputed vectors: ``(character, series, source)`` per row, characters sorted, rows in the
    given order within one, prototypes per character.

    With ``all`` prototypes the rows go in `chunk` at a time into an index sized for the whole gallery and trained
    on a sample of all of it, so `vectors` may be an ``np.memmap`` bigger than memory (rows already in gallery
    order are read in sequence). An IVF-PQ gallery's vector file spills to `spill_dir` while it is built.
    """
    if len(rows) != len(vectors):
        raise GalleryError(f"{len(vectors)} vectors for {len(rows)} rows; embed again")
    if not rows:
        raise GalleryError("none of the images could be read; check the dataset folder")
    g = Gallery(embedder_id, dim, embedder_config, index, prototypes, aggregate)
    g.spill_dir = spill_dir
    order = gallery_order([r[0] for r in rows])
    series: dict[str, str] = {}
    for character, s, _ in rows:
        if s and not series.get(character):
            series[character] = s
    n = len(order)
    if g.prototype_spec.method == "all":
        in_order = bool(np.array_equal(order, np.arange(n)))
        take = (lambda a, b: vectors[a:b]) if in_order else (lambda a, b: vectors[order[a:b]])
        kind = resolve_kind(g.index_spec, n)
        need = min(n, train_rows(kind, g.index_spec, dim, n))
        pick = np.sort(np.random.default_rng(0).choice(n, need, replace=False)) if 0 < need < n else np.arange(need)
        sample = np.asarray(vectors[order[pick]], np.float32) if need else None  # the rows Gallery would draw from all of them
        for a in range(0, n, max(1, int(chunk))):
            b = min(n, a + max(1, int(chunk)))
            meta = [rows[i] for i in order[a:b].tolist()]
            g.add_rows(take(a, b), [m[0] for m in meta], [series.get(m[0], "") for m in meta], [m[2] for m in meta],
                       expected_rows=n, train_sample=sample)
            if progress:
                progress(b, n)
        g.fix_reference()
        return g
    done = 0
    for c, group in itertools.groupby(order.tolist(), key=lambda i: rows[i][0]):  # one character at a time: its prototypes need all its vectors
        idx = list(group)
        g.add(c, series.get(c, ""), np.asarray(vectors[idx], np.float32), [rows[i][2] for i in idx])
        done += len(idx)
        if progress:
            progress(done, n)
    g.fix_reference()
    return g


def gallery_from_shards(shard_dir: str | Path, rows: Sequence[tuple[str, str, str]], scratch_dir: str | Path,
                        embedder_config: Mapping[str, Any] | None = None, gallery_cfg: Mapping[str, Any] | None = None,
                        progress: Callable[[int, int], None] | None = None, spill_dir: str | Path | None = None) -> Gallery:
    """The gallery of ``(character, series, file id)`` `rows` from a predict's shards, without every vector in memory.

    Rows no rank embedded (unreadable images, logged) are left out. The vectors are copied one shard part at a
    time into a float32 scratch file in `scratch_dir`, in gallery order, then added in chunks (`gallery_from_vectors`):
    memory holds the ids, one part and one chunk; the disk holds 4 x dim bytes per row until the gallery is built.
    An IVF-PQ vector file spills to `spill_dir` (default `scratch_dir`): the folder the gallery will be saved in
    moves it into place instead of copying it.
    """
    shards = ShardSet.open(shard_dir)
    for _, err in shards.info["errors"]:
        _log.warning(f"skipped unreadable image: {err}")
    where = shards.locate([r[2] for r in rows])
    found = np.flatnonzero(where >= 0)
    order = found[gallery_order([rows[i][0] for i in found.tolist()])]
    kept = [rows[i] for i in order.tolist()]
    gcfg = dict(gallery_cfg or {})
    scratch_dir = Path(scratch_dir)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = scratch_dir / "merged-vectors.npy"
    vectors = np.lib.format.open_memmap(scratch, "w+", np.float32, (len(kept), shards.dim)) if kept else np.zeros((0, shards.dim), np.float32)
    try:
        shards.gather(where[order], vectors)
        info, dim = shards.info, shards.dim
        del shards, where, found, order  # the ids (10M rows: ~0.2 GB) are not needed to build the gallery
        return gallery_from_vectors(kept, vectors, info["embedder_id"], dim, embedder_config, gcfg.get("index"),
                                    gcfg.get("prototypes"), gcfg.get("aggregate", DEFAULT_AGGREGATE), progress, spill_dir=spill_dir or scratch_dir)
    finally:
        del vectors
        scratch.unlink(missing_ok=True)


def starts_ranks(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether a trainer config starts more than this process (DDP launches re-run the command line); ``devices: auto``
    does where it finds several GPUs."""
    from collections.abc import Sequence as Listed

    devices = trainer_cfg.get("devices", 1)
    text = str(devices).strip().lower()
    if isinstance(devices, Listed) and not isinstance(devices, str):  # a list, or a Hydra ListConfig
        many = len(devices) > 1
    elif text == "auto":
        many = str(trainer_cfg.get("accelerator", "auto")).lower() in ("auto", "gpu", "cuda") and _cuda_devices() > 1
    else:
        many = text == "-1" or (text.isdigit() and int(text) > 1)
    return bool(many or int(trainer_cfg.get("num_nodes", 1) or 1) > 1 or str(trainer_cfg.get("strategy", "")).startswith("ddp"))


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def _embed_subprocess(root: Path, names: Sequence[str], embedder_cfg: Mapping[str, Any], work: Path,
                      trainer_cfg: Mapping[str, Any], batch_size: int, num_workers: int,
                      check: Callable[[], None] | None = None) -> None:
    """Run ``python -m anime_role_detect.cli.embed`` (shards only) over `names` in a process group of its own: DDP
    re-runs its command line, not the caller's program. `check()` runs every `POLL_S` and raises to cancel: the group
    is then killed at once (each part is written whole, so a later run resumes from them), as it is when the caller
    dies (``parent_pid``). Its log is ``work/embed.log``."""
    import json
    import subprocess
    import sys

    from ..procgroup import start_group, stop_group

    work.mkdir(parents=True, exist_ok=True)
    (work / "files.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    (work / "embedder.json").write_text(json.dumps(dict(embedder_cfg)), encoding="utf-8")
    tr = [f"trainer.{k}={v}" for k, v in trainer_cfg.items() if k in _TRAINER_KEYS and k != "plugins"]
    cmd = [sys.executable, "-m", "anime_role_detect.cli.embed", f"data.root={root.resolve()}", f"files={work / 'files.txt'}",
           f"embedder_file={work / 'embedder.json'}", f"out={work}", "gallery=false", f"paths.root_dir={work}",
           f"batch_size={batch_size}", f"num_workers={num_workers}", "trainer=ddp" if starts_ranks(trainer_cfg) else "trainer=cpu",
           *tr]
    log = work / EMBED_LOG
    with open(log, "w", encoding="utf-8") as out:  # the pid is not in `cmd`, which an error tells a user to run
        proc = start_group([*cmd, f"parent_pid={os.getpid()}"], cwd=work, stdout=out, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None:
            if check is not None:
                check()
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            stop_group(proc, grace_s=0)
    if proc.returncode != 0:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
        said = [line for line in lines if line and not line.startswith(_HYDRA_HINT)]
        last = next((line for line in reversed(said) if line.startswith("error: ")), said[-1] if said else "no output")
        raise GalleryError(f"embedding the gallery over processes failed ({last.strip()[:300]}); its log is {log}; "
                           f"run `{' '.join(cmd)}` to see why")


def build_gallery_predicted(root: str | Path, records: Sequence[Any], embedder_cfg: Mapping[str, Any], out: str | Path,
                            gallery_cfg: Mapping[str, Any], saved_cfg: Mapping[str, Any],
                            progress: Callable[[int, int], None] | None = None,
                            check: Callable[[], None] | None = None) -> Gallery:
    """The gallery of `records` (dataset records) embedded as a Lightning predict, same rows as `Gallery.build`.

    ``gallery_cfg.trainer`` (accelerator, devices, strategy, num_nodes) spreads it over processes: then the embed
    command runs as a subprocess, which `check()` (raising) cancels; one process runs here. ``batch_size``/
    ``num_workers`` set the loader.
    """
    import shutil

    root, out = Path(root), Path(out)
    tcfg = dict(gallery_cfg.get("trainer") or {})
    bs, nw = int(gallery_cfg.get("batch_size", 32)), int(gallery_cfg.get("num_workers", 2))
    work = out / ".embed"
    ecfg = dict(embedder_cfg)
    if ecfg.get("ckpt_path") and not Path(ecfg["ckpt_path"]).is_absolute():
        ecfg["ckpt_path"] = str((out / ecfg["ckpt_path"]).resolve())
    if starts_ranks(tcfg):
        _embed_subprocess(root, [r.file_name for r in records], ecfg, work, tcfg, bs, nw, check)
    else:
        predict_embeddings([(r.file_name, r.path(root)) for r in records], ecfg, work / "shards", tcfg, batch_size=bs, num_workers=nw)
    gallery = gallery_from_shards(work / "shards", [(r.character, r.series, r.file_name) for r in records], work, saved_cfg,
                                  gallery_cfg, progress, spill_dir=out)
    shutil.rmtree(work, ignore_errors=True)  # a version folder carries its gallery, not the shards it came from
    return gallery
