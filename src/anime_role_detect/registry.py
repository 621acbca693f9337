"""Version registry: ``ROOT/versions/<id>/`` folders plus an atomically replaced ``ROOT/latest`` pointer.

A version is built in a hidden staging folder and renamed into place only when complete, so a
crash never leaves a half-written version visible; ``latest`` is a small file replaced by
write-then-rename, so readers always see a complete, loadable version. Promotions are appended to
``history.jsonl`` so ``rollback`` can return to the previous live version.

CLI: ``python -m anime_role_detect.registry [--root DIR] list|show [ID]|promote ID|rollback``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .errors import RegistryError, UserError
from .fsutil import atomic_write_text, fsync_dir, read_json

#: Files a version folder may hold (see README "Version folder").
VERSION_FILES = (
    "model.ckpt", "gallery.faiss", "gallery.json", "tag_profiles.json", "calibration.json",
    "metrics.json", "config.yaml", "parent",
)
MANIFEST = "manifest.json"


@dataclass
class VersionInfo:
    """A registered version as listed by the registry."""

    id: str
    path: Path
    created: str
    parent: str | None
    kind: str
    live: bool
    metrics: dict

    def to_json(self) -> dict:
        return {"id": self.id, "path": str(self.path), "created": self.created, "parent": self.parent,
                "kind": self.kind, "live": self.live, "metrics": self.metrics}


class Registry:
    """Versions of galleries and models under one root folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.latest_file = self.root / "latest"
        self.history_file = self.root / "history.jsonl"

    # -- creation ---------------------------------------------------------------------------
    def new_version_id(self, prefix: str = "v") -> str:
        """A unique id that sorts by creation time: ``v20261125-093012-123456-ab12``."""
        now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
        return f"{prefix}{now}-{uuid.uuid4().hex[:4]}"

    def staging_dir(self, version_id: str | None = None) -> Path:
        """A fresh hidden folder to write a version into before `commit`."""
        vid = version_id or self.new_version_id()
        path = self.versions_dir / f".staging-{vid}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def commit(self, staging: Path, parent: str | None = None, kind: str = "workflow", promote: bool = True,
               extra: dict | None = None) -> str:
        """Seal a staging folder as a version (atomic rename) and optionally make it live."""
        staging = Path(staging)
        if not staging.name.startswith(".staging-"):
            raise RegistryError(f"{staging} is not a staging folder of this registry")
        vid = staging.name[len(".staging-"):]
        atomic_write_text(staging / "parent", (parent or "none") + "\n")
        manifest = {"id": vid, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "parent": parent, "kind": kind, "files": sorted(p.name for p in staging.iterdir()), **(extra or {})}
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        final = self.versions_dir / vid
        os.replace(staging, final)
        fsync_dir(self.versions_dir)
        if promote:
            self.promote(vid)
        return vid

    def import_folder(self, folder: str | os.PathLike[str], parent: str | None = None, kind: str = "import", promote: bool = True) -> str:
        """Copy a finished folder in as a new version."""
        staging = self.staging_dir()
        for p in Path(folder).iterdir():
            (shutil.copytree if p.is_dir() else shutil.copy2)(p, staging / p.name)
        return self.commit(staging, parent=parent, kind=kind, promote=promote)

    def clean_staging(self) -> int:
        """Delete staging folders left by crashed writers; returns how many."""
        n = 0
        if self.versions_dir.is_dir():
            for p in self.versions_dir.glob(".staging-*"):
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    # -- reading ----------------------------------------------------------------------------
    def latest_id(self) -> str | None:
        """Id of the live version, or None when nothing is registered."""
        try:
            vid = self.latest_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return vid or None

    def path(self, version: str = "latest") -> Path:
        """Folder of a version ('latest' resolves the pointer); raises `RegistryError` if absent."""
        vid = self.latest_id() if version == "latest" else version
        if vid is None:
            raise RegistryError(f"registry {self.root} has no live version yet; run the workflow or `registry promote ID`")
        path = self.versions_dir / vid
        if not (path / MANIFEST).is_file():
            raise RegistryError(f"version {vid!r} not found or incomplete in {self.versions_dir}; see `registry list`")
        return path

    def info(self, vid: str) -> VersionInfo:
        path = self.versions_dir / vid
        man = read_json(path / MANIFEST)
        metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
        return VersionInfo(id=vid, path=path, created=man.get("created", ""), parent=man.get("parent"),
                           kind=man.get("kind", ""), live=vid == self.latest_id(), metrics=metrics)

    def list(self) -> list[VersionInfo]:
        """All complete versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        ids = sorted(p.name for p in self.versions_dir.iterdir() if p.is_dir() and (p / MANIFEST).is_file())
        return [self.info(v) for v in ids]

    # -- switching --------------------------------------------------------------------------
    def promote(self, vid: str) -> None:
        """Make `vid` live: replace ``latest`` atomically and record it in the history."""
        self.path(vid)  # must exist and be complete
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.latest_file, vid + "\n")
        with open(self.history_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "live": vid}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def history(self) -> list[str]:
        """Promoted ids, oldest first."""
        if not self.history_file.is_file():
            return []
        out = []
        for line in self.history_file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line)["live"])
            except (ValueError, KeyError):
                continue  # a torn last line after a crash is ignored
        return out

    def rollback(self) -> str:
        """Make the previously live version live again; returns its id."""
        current = self.latest_id()
        for vid in reversed(self.history()):
            if vid != current and (self.versions_dir / vid / MANIFEST).is_file():
                self.promote(vid)
                return vid
        raise RegistryError("nothing to roll back to: no earlier live version in the history")


def _print_table(rows: Iterable[VersionInfo]) -> None:
    for v in rows:
        acc = v.metrics.get("val/acc", v.metrics.get("top1", ""))
        print(f"{'*' if v.live else ' '} {v.id}  {v.kind:<9} parent={v.parent or '-':<28} {('acc=' + format(acc, '.3f')) if isinstance(acc, float) else ''}")


def main(argv: Sequence[str] | None = None) -> int:
    """Registry command line."""
    ap = argparse.ArgumentParser(prog="python -m anime_role_detect.registry", description="List, show, promote and roll back versions.")
    ap.add_argument("--root", default=os.environ.get("ARD_REGISTRY", "outputs/registry"), help="registry folder (env ARD_REGISTRY)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list versions (* = live)")
    sh = sub.add_parser("show", help="print one version's manifest and metrics")
    sh.add_argument("id", nargs="?", default="latest")
    pr = sub.add_parser("promote", help="make a version live")
    pr.add_argument("id")
    sub.add_parser("rollback", help="make the previous live version live again")
    args = ap.parse_args(argv)
    reg = Registry(args.root)
    try:
        if args.cmd == "list":
            _print_table(reg.list())
        elif args.cmd == "show":
            path = reg.path(args.id)
            print(json.dumps(reg.info(path.name).to_json(), indent=2))
        elif args.cmd == "promote":
            reg.promote(args.id)
            print(f"live: {args.id}")
        elif args.cmd == "rollback":
            print(f"live: {reg.rollback()}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
