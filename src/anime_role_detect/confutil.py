"""OmegaConf helpers shared by the layers that accept either configs or plain mappings."""

from __future__ import annotations

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


def compose_config(config_name: str, overrides: Sequence[str] = (), fix: str = "fix the overrides") -> DictConfig:
    """``conf/<config_name>.yaml`` with Hydra overrides, from inside or outside a running Hydra app.

    Used where one job builds another's config (the workflow and log fusion train through ``train.yaml``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .errors import ConfigError, UserError

    try:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
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
