"""Version registry — ``ROOT/versions/<id>/`` folders plus an atomic ``ROOT/latest`` pointer; imports only the base (storage, no models).

A version is built in a hidden staging folder and renamed into place only when complete, so a
crash never leaves a half-written version visible; ``latest`` is a small file replaced by
write-then-rename, so readers always see a complete, loadable version. Promotions are appended to
``history.jsonl`` so ``rollback`` can return to the previous live version.

New versions are derived from a base with `Registry.derive` (stage, hard-link the carried files, let
the caller write the changed ones, commit with one rename, optionally promote): the one way the
workflow, log fusion and the service's gallery edits make versions.

CLI (``registry/__main__.py``): ``python -m anime_role_detect.registry [--root DIR] list|show [ID]|promote ID|rollback``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import RegistryError
from ..fsutil import atomic_write_text, fsync_dir, link_or_copy, read_json
from ..versionfiles import EVAL_METRICS, MANIFEST, METRICS, PARENT, SEALED


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
    gate: dict | None = None  # how the version was judged against the live one when it was made (workflow, fusion)
    evaluation: dict | None = None  # its own figures on its evaluation set when it was built

    def to_json(self) -> dict:
        return {"id": self.id, "path": str(self.path), "created": self.created, "parent": self.parent,
                "kind": self.kind, "live": self.live, "metrics": self.metrics, "gate": self.gate, "evaluation": self.evaluation}


@dataclass
class Derivation:
    """A version being derived: write the changed files into `dir`; the rest was carried from the base.

    Carried files are hard links to the base's (versions are immutable): replace them by
    write-then-rename (`fsutil.atomic_*`, `Gallery.save`) or call `writable(name)` before writing in place.
    """

    dir: Path
    base_id: str | None
    base_dir: Path | None
    kind: str
    promote: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the manifest
    id: str | None = None  # set when committed

    def writable(self, name: str) -> Path:
        """Path of `name` in the new version, unlinked from the base so it can be written in place."""
        path = self.dir / name
        if path.is_file() or path.is_symlink():
            path.unlink()
        return path

    def drop(self, name: str) -> None:
        """Do not carry `name` into the new version."""
        path = self.dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


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
        atomic_write_text(staging / PARENT, (parent or "none") + "\n")
        manifest = {"id": vid, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "parent": parent, "kind": kind, "files": sorted(p.name for p in staging.iterdir()), **(extra or {})}
        atomic_write_text(staging / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        final = self.versions_dir / vid
        os.replace(staging, final)
        fsync_dir(self.versions_dir)
        if promote:
            self.promote(vid)
        return vid

    @contextlib.contextmanager
    def derive(self, base: str | None, kind: str, *, promote: bool = False, skip: Iterable[str] = (),
               extra: dict[str, Any] | None = None, prefix: str = "v", version_id: str | None = None,
               parent: str | None = None) -> Iterator[Derivation]:
        """Stage a new version from `base` (an id, 'latest', or None for an empty one) and commit it on exit.

        Every file of the base except `skip` and what the registry seals itself is hard-linked in; the
        caller writes the changed files into ``d.dir``. Leaving the block normally commits with one
        rename (and promotes when ``d.promote``); an exception removes the staging folder. `version_id`
        fixes the new id (a resumable writer retries under the same one); `parent` records a parent
        for a version built from scratch (default: the base).
        """
        base_dir = self.path(base) if base else None
        d = Derivation(dir=self.staging_dir(version_id or self.new_version_id(prefix)), base_id=base_dir.name if base_dir else parent,
                       base_dir=base_dir, kind=kind, promote=promote, extra=dict(extra or {}))
        try:
            if base_dir is not None:
                carry_files(base_dir, d.dir, skip=set(skip) | SEALED)
            yield d
        except BaseException:
            shutil.rmtree(d.dir, ignore_errors=True)
            raise
        d.id = self.commit(d.dir, parent=d.base_id, kind=kind, promote=d.promote, extra=d.extra)

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
        if vid.startswith(".") or "/" in vid:
            raise RegistryError(f"{vid!r} is not a version id (hidden names are unfinished staging folders); see `registry list`")
        path = self.versions_dir / vid
        if not (path / MANIFEST).is_file():
            raise RegistryError(f"version {vid!r} not found or incomplete in {self.versions_dir}; see `registry list`")
        return path

    def info(self, vid: str) -> VersionInfo:
        path = self.versions_dir / vid
        man = read_json(path / MANIFEST)
        metrics = read_json(path / METRICS) if (path / METRICS).is_file() else {}
        return VersionInfo(id=vid, path=path, created=man.get("created", ""), parent=man.get("parent"),
                           kind=man.get("kind", ""), live=vid == self.latest_id(), metrics=metrics, gate=man.get("gate"),
                           evaluation=read_json(path / EVAL_METRICS) if (path / EVAL_METRICS).is_file() else None)

    def list(self) -> list[VersionInfo]:
        """All complete versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        ids = sorted(p.name for p in self.versions_dir.iterdir()
                     if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST).is_file())
        return [self.info(v) for v in ids]

    # -- switching --------------------------------------------------------------------------
    def promote(self, vid: str, action: str = "promote") -> None:
        """Make `vid` live: replace ``latest`` atomically and record it in the history."""
        self.path(vid)  # must exist and be complete
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.latest_file, vid + "\n")
        event = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "live": vid, "action": action}
        with open(self.history_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _events(self) -> list[dict]:
        if not self.history_file.is_file():
            return []
        out = []
        for line in self.history_file.read_text(encoding="utf-8").splitlines():
            try:
                event = json.loads(line)
                out.append({"live": str(event["live"]), "action": event.get("action", "promote")})
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash is ignored
        return out

    def history(self) -> list[str]:
        """Every id made live (promotions and rollbacks), oldest first."""
        return [e["live"] for e in self._events()]

    def live_stack(self) -> list[str]:
        """The promotions still in force, oldest first: history replayed with each rollback undoing one promotion."""
        stack: list[str] = []
        for event in self._events():
            if event["action"] == "rollback" and event["live"] in stack:
                while stack and stack[-1] != event["live"]:
                    stack.pop()
            else:
                stack.append(event["live"])
        return stack

    def rollback(self) -> str:
        """Make the version live before the current one; called again, it keeps walking back. Returns its id."""
        stack = self.live_stack()
        current = self.latest_id()
        while stack and stack[-1] == current:
            stack.pop()
        for vid in reversed(stack):
            if vid != current and (self.versions_dir / vid / MANIFEST).is_file():
                self.promote(vid, action="rollback")
                return vid
        raise RegistryError("nothing to roll back to: no earlier live version in the history")


def carry_files(src: Path, dst: Path, skip: Iterable[str] = ()) -> None:
    """Hard-link (or copy) every entry of version folder `src` into `dst` except `skip` and hidden ones."""
    skip = set(skip)
    for p in Path(src).iterdir():
        if p.name in skip or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, copy_function=link_or_copy)
        else:
            link_or_copy(p, dst / p.name)
