"""A workflow run's folder and context: which characters, where the run lives, its lock, what stages produced."""

from __future__ import annotations

import contextlib
import fcntl
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError, UserError
from ..fsutil import fingerprint, safe_name
from ..registry import Registry
from .collectors import CharacterQuery
from .progress import Progress

STAGE_DIR = "stages"


@dataclass
class WorkflowResult:
    """What a run produced: the registered version, its metrics and the per-character summary rows."""

    version_id: str
    metrics: dict[str, Any]
    summary: list[dict[str, Any]]
    run_dir: str = ""
    resumed_stages: list[str] = field(default_factory=list)
    live: bool = False  # whether the version went live (see `gate`)
    gate: dict[str, Any] | None = None  # the comparison with the live version that decided it

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunContext:
    """Everything a stage needs: config, progress, the run folder and earlier stages' outputs."""

    cfg: DictConfig
    progress: Progress
    run_dir: Path
    queries: list[CharacterQuery]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra_datasets: list[str] = field(default_factory=list)  # resolved extra_datasets (+ the live version's, pinned)
    restarted: bool = False  # the stage ran before under another fingerprint: discard its partial output
    fingerprint: str = ""  # of the running stage (its config and everything before it)

    @property
    def raw_dir(self) -> Path:
        return self.run_dir / "raw"

    @property
    def dataset_dir(self) -> Path:
        return self.run_dir / "dataset"

    @property
    def train_dir(self) -> Path:
        return self.run_dir / "train"

    @property
    def gallery_dir(self) -> Path:
        return self.run_dir / "gallery"

    @property
    def registry(self) -> Registry:
        return Registry(str(self.cfg.registry_dir))


# -- characters and the run folder ---------------------------------------------------------------


def parse_characters(cfg: DictConfig) -> list[CharacterQuery]:
    """Character queries from ``cfg.characters``; one-line errors for an empty or duplicated list."""
    raw = cfg.get("characters")
    if raw is None or len(raw) == 0:
        raise ConfigError(
            "no characters given; pass characters='[{\"name\":\"Hoshino\",\"series\":\"Blue Archive\"}, ...]'"
        )
    items = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
    queries = [CharacterQuery.from_config(o) for o in items]
    seen: dict[str, str] = {}
    for q in queries:
        if q.folder in seen:
            raise ConfigError(f"character {q.name!r} is listed twice (as {seen[q.folder]!r}); give each character once")
        seen[q.folder] = q.name
    return queries


def _run_key(cfg: DictConfig, queries: Sequence[CharacterQuery]) -> dict[str, Any]:
    """What identifies a run's folder: the characters and the site (not caps or timeouts, so raising a cap reuses downloads)."""
    site = OmegaConf.select(cfg, "collector.base_url", default=None) or OmegaConf.select(cfg, "collector.root", default=None)
    return {"characters": [(q.name, q.series, q.tag, q.path) for q in queries],
            "collector": OmegaConf.select(cfg, "collector.name", default=None), "site": site}


def resolve_run_dir(cfg: DictConfig, queries: Sequence[CharacterQuery]) -> Path:
    """``work_dir/<run_name>``; without a run_name: the first character + count + a hash of the request."""
    name = cfg.get("run_name")
    if not name:
        first = safe_name(queries[0].name).replace(" ", "_")[:40]
        more = f"+{len(queries) - 1}" if len(queries) > 1 else ""
        name = f"{first}{more}-{fingerprint(_run_key(cfg, queries))[:8]}"
    return Path(str(cfg.work_dir)) / safe_name(str(name))


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive lock on the run folder (released by the OS if the process dies)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fh = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise UserError(f"another workflow is running in {run_dir}; wait for it or use another run_name=...") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
