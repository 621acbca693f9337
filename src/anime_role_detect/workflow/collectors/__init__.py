"""Collectors (part of the workflow; imports the base and data) behind one interface `Collector.collect(query, out_dir, progress)`.

``build_collector(cfg)`` instantiates ``cfg._target_`` (Hydra style) or looks ``cfg.name`` up in
`COLLECTORS`; every collector writes ``OUT/<character>/<image>`` + ``OUT/.state/<character>.jsonl``.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from .base import (
    BooruCollector, CharacterQuery, CollectReport, Collector, HttpClient, HttpPolicy, ManifestEntry,
    booru_tag, read_manifest, safe_name,
)
from .danbooru import DanbooruCollector
from .gelbooru import GelbooruCollector
from .local import LocalCollector

#: name -> collector class (the service lists these; configs may also give a `_target_`).
COLLECTORS: dict[str, type] = {
    "danbooru": DanbooruCollector,
    "gelbooru": GelbooruCollector,
    "local": LocalCollector,
}


def build_collector(cfg: Mapping[str, Any]) -> Collector:
    """Collector from config: ``{_target_: ..., ...}`` or ``{name: danbooru|gelbooru|local, ...}``."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    target = data.pop("_target_", None)
    name = data.pop("name", None)
    if target:
        from hydra.utils import get_class

        try:
            cls = get_class(target)
        except Exception as exc:  # noqa: BLE001 - Hydra wraps import errors in several types
            raise ConfigError(f"collector._target_={target!r} cannot be imported ({exc}); use one of {sorted(COLLECTORS)}") from None
    elif name in COLLECTORS:
        cls = COLLECTORS[name]
    else:
        raise ConfigError(f"collector={name!r} is unknown; choose collector=danbooru, gelbooru or local")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"collector {name or target}: bad option ({exc}); see conf/collector/{name or 'danbooru'}.yaml") from None


__all__ = [
    "COLLECTORS", "BooruCollector", "CharacterQuery", "CollectReport", "Collector", "DanbooruCollector",
    "GelbooruCollector", "HttpClient", "HttpPolicy", "LocalCollector", "ManifestEntry", "booru_tag",
    "build_collector", "read_manifest", "safe_name",
]
