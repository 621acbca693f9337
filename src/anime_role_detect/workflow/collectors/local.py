"""Import images from a local folder or a file list instead of a website.

Per character the source is ``characters[i].path`` (a folder, searched recursively, or a ``.txt``
file listing image paths, one per line), else ``<root>/<character name>/``. Tags come from a sidecar
``<image>.txt`` / ``<stem>.txt`` (comma- or space-separated, the common booru-downloader convention)
or from a ``metadata.jsonl`` next to the images. Files are copied under their content hash, so
re-importing is free and a killed import resumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...errors import ConfigError
from ...fsutil import atomic_path, file_sha256
from ...imageio import IMAGE_SUFFIXES
from ..progress import Progress
from .base import CollectReport, CharacterQuery, Manifest, ManifestEntry, fingerprint


def _sidecar_tags(path: Path) -> list[str]:
    for side in (path.with_name(path.name + ".txt"), path.with_suffix(".txt")):
        if side.is_file():
            text = side.read_text(encoding="utf-8", errors="replace")
            parts = text.replace("\n", ",").split(",") if "," in text else text.split()
            return [t.strip().replace(" ", "_") for t in parts if t.strip()]
    return []


def _metadata_tags(folder: Path) -> dict[str, list[str]]:
    """``metadata.jsonl`` tags keyed by absolute file path (folder and its parent are searched)."""
    out: dict[str, list[str]] = {}
    for base in (folder, folder.parent):
        meta = base / "metadata.jsonl"
        if not meta.is_file():
            continue
        for line in meta.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line)
                out[str((base / obj["file_name"]).resolve())] = [str(t) for t in obj.get("tags") or []]
            except (ValueError, KeyError, TypeError):
                continue
    return out


class LocalCollector:
    """Collector reading images already on disk (own scans, earlier downloads, other tools' exports)."""

    name = "local"

    def __init__(self, root: str | None = None, limit_per_character: int = 100000) -> None:
        self.root = Path(root).expanduser() if root else None
        self.limit = int(limit_per_character)

    def _source_files(self, query: CharacterQuery) -> tuple[list[Path], dict[str, list[str]]]:
        src = Path(query.path).expanduser() if query.path else (self.root / query.name if self.root else None)
        if src is None:
            raise ConfigError(
                f"local collector: no source for {query.name!r}; set collector.root=<folder with one sub-folder per "
                "character> or give the character a path (folder or .txt file list)"
            )
        if src.is_file() and src.suffix.lower() == ".txt":
            files = []
            for line in src.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    p = Path(line).expanduser()
                    files.append(p if p.is_absolute() else src.parent / p)
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                raise ConfigError(f"{src}: {len(missing)} listed file(s) do not exist (first: {missing[0]}); fix the list")
            return files, _metadata_tags(src.parent)
        if not src.is_dir():
            raise ConfigError(f"local collector: {src} for {query.name!r} is neither a folder nor a .txt file list; fix the path")
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return files, _metadata_tags(src)

    def collect(self, query: CharacterQuery, out_dir: Path, progress: Progress | None = None) -> CollectReport:
        """Copy the character's images into ``out_dir/<character>/`` under their content hash."""
        out_dir = Path(out_dir)
        files, meta_tags = self._source_files(query)
        cap = query.limit or self.limit
        files = files[:cap]
        report = CollectReport(character=query.name, query=str(query.path or (self.root or "")))
        man = Manifest(out_dir, query.folder)
        fp = fingerprint({"files": [str(p) for p in files]})
        if man.is_complete(fp):
            report.images = report.reused = sum(1 for e in man.entries.values() if (out_dir / e.file_name).is_file())
            return report
        stage = f"collect:{query.name}"
        for i, path in enumerate(files):
            sha = file_sha256(path)
            key = f"local:{sha}"
            rel = f"{query.folder}/{sha[:20]}{path.suffix.lower()}"
            if key in man.entries and (out_dir / man.entries[key].file_name).is_file():
                report.reused += 1
            else:
                if not (out_dir / rel).is_file():
                    with atomic_path(out_dir / rel) as tmp:
                        shutil.copyfile(path, tmp)
                    report.downloaded += 1
                else:
                    report.reused += 1
                tags = _sidecar_tags(path) or meta_tags.get(str(path.resolve()), [])
                man.add(ManifestEntry(key=key, file_name=rel, tags=tags, source=str(path)))
            if progress:
                progress.emit(stage, i + 1, len(files))
        report.images = len({e.file_name for e in man.entries.values() if (out_dir / e.file_name).is_file()})
        man.mark_complete(fp, report)
        if progress and not files:
            progress.emit(stage, 0, 0, "no images")
        return report
