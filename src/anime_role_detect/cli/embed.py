"""``python -m anime_role_detect.cli.embed data.root=FOLDER out=DIR [trainer=ddp trainer.devices=N trainer.num_nodes=M]``.

Embeds a dataset folder as a Lightning predict (`recognition.predict`): each rank writes its shards under
``out/shards``; after every rank is done, rank 0 merges them (characters sorted, file names in dataset order; streamed
through a scratch file, `predict.gallery_from_shards`) into ``out/gallery.*``
and prints one JSON line (rows, characters, images, seconds, images/s, world size). conf/embed.yaml.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig

from ..confutil import to_plain as _plain
from ..errors import ConfigError, DatasetError
from ..fsutil import read_json
from . import hydra_main

SHARDS = "shards"


def _items(root: Path, files: str | None) -> tuple[list[Any], list[tuple[str, Path]]]:
    """The dataset's records (all, or those named in the `files` list) and their (id, path) items."""
    from ..data.layout import scan_dataset

    records = scan_dataset(root)
    if files:
        fp = Path(files)
        if not fp.is_file():
            raise ConfigError(f"files={fp}: no such file; give a text file with one file name per line, or files=null")
        wanted = {line.strip() for line in fp.read_text(encoding="utf-8").splitlines() if line.strip()}
        records = [r for r in records if r.file_name in wanted]
        if not records:
            raise DatasetError(f"none of the {len(wanted)} file names in {fp} is an image of {root}; names are relative to data=")
    return records, [(r.file_name, r.path(root)) for r in records]


def run_embed(cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """Embed (every rank), then merge and save the gallery (rank 0); returns rank 0's summary, None elsewhere."""
    from ..recognition.predict import gallery_from_shards, predict_embeddings
    from ..recognition.shards import ShardSet

    c = dict(_plain(cfg) or {})
    root = (c.get("data") or {}).get("root") if isinstance(c.get("data"), dict) else c.get("data")
    if not root or not c.get("out"):
        raise ConfigError("give data.root=<dataset folder> and out=<output folder>")
    root, out = Path(root), Path(c["out"]).resolve()
    records, items = _items(root, c.get("files"))
    ecfg = dict(c.get("embedder") or {"kind": "timm"})
    if c.get("embedder_file"):  # a whole embedder config (e.g. a classifier's) from build_recognition_folder
        ecfg = dict(read_json(c["embedder_file"]))
    t0 = time.perf_counter()
    trainer = predict_embeddings(items, ecfg, out / SHARDS, c.get("trainer"), batch_size=int(c.get("batch_size", 32)),
                                 num_workers=int(c.get("num_workers", 2)), rows_per_part=int(c.get("rows_per_part", 65_536)),
                                 resume=bool(c.get("resume", True)))
    seconds = time.perf_counter() - t0
    if trainer.global_rank != 0:
        return None
    shards = ShardSet.open(out / SHARDS)
    info, embedded = shards.info, shards.n_unique()
    del shards  # its ids: the merge below reads them again, one copy at a time
    # embedding time of the slowest rank, model loading left out; a resumed run counts the images it embedded
    rate = (len(items) - info["skipped"]) / max(info["seconds"], 1e-9)
    summary: dict[str, Any] = {"images": len(items), "embedded": embedded, "resumed": info["skipped"], "unreadable": len(info["errors"]),
                               "world_size": info["world_size"], "seconds": round(seconds, 2), "embed_seconds": info["seconds"],
                               "images_per_s": round(rate, 2), "images_per_s_per_process": round(rate / info["world_size"], 2)}
    if c.get("gallery", True):
        saved = {k: v for k, v in ecfg.items() if k != "device"}
        rows = [(r.character, r.series, r.file_name) for r in records]
        gallery = gallery_from_shards(out / SHARDS, rows, out, saved, c.get("gallery_build") or {})
        gallery.save(out)
        summary.update(rows=len(gallery), characters=gallery.n_characters, gallery=str(out))
    print(json.dumps(summary), flush=True)
    return summary


@hydra_main("embed")
def main(cfg: DictConfig) -> None:
    """Embed a dataset folder over one or many processes and build its gallery (conf/embed.yaml)."""
    if cfg.get("parent_pid") is not None:  # a gallery build's child: its caller gone, no one waits for its parts
        from ..procgroup import kill_own_group, watch_parent

        watch_parent(kill_own_group, int(cfg.parent_pid))
    run_embed(cfg)


if __name__ == "__main__":
    main()
