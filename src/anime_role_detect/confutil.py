"""OmegaConf helpers shared by the layers that accept either configs or plain mappings."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(obj: Any) -> Any:
    """OmegaConf containers -> resolved plain dicts/lists (anything else passes through unchanged).

    Plain containers pickle into checkpoints and serialise to JSON; configs do neither safely.
    """
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"


_compose_lock = threading.Lock()  # Hydra's global state is not thread-safe (the service composes from worker threads)


def compose_config(config_name: str, overrides: Sequence[str] = (), fix: str = "fix the overrides",
                   config_dir: str | Path | None = None) -> DictConfig:
    """``<config_dir>/<config_name>.yaml`` (default: the project's conf/) with Hydra overrides, from inside or
    outside a running Hydra app; any failure is a one-line `ConfigError` ending in `fix`.

    Used where one job builds another's config (the workflow and log fusion train through ``train.yaml``,
    the service composes workflows, ``gallery_cli`` composes ``infer.yaml``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .errors import ConfigError, UserError

    conf_dir = Path(config_dir) if config_dir else CONFIG_DIR
    with _compose_lock:
        try:
            if GlobalHydra.instance().is_initialized():
                return compose(config_name=config_name, overrides=list(overrides))
            if not (conf_dir / f"{config_name}.yaml").is_file():
                raise ConfigError(f"config {conf_dir / config_name}.yaml not found; {fix}")
            with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
                return compose(config_name=config_name, overrides=list(overrides))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - Hydra raises several types for bad overrides
            raise ConfigError(f"{config_name} config could not be composed ({type(exc).__name__}: {exc}); {fix}") from None


def dataclass_from_mapping(cls: type, cfg: Mapping[str, Any] | None, where: str) -> Any:
    """``cls(**cfg)`` for a config section, with a one-line `ConfigError` naming unknown keys and the known ones."""
    from .errors import ConfigError

    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
    return cls(**cfg)
