"""Config plumbing shared by every layer and entry point: the one config directory (`CONFIG_DIR`, with a
site's ``ARD_CONF_DIR`` layered over it), composing a job's config in or outside a Hydra app, plain containers, and
a command line's group choices checked against those folders before any heavy import.

A base-layer module: it imports nothing of the project but `errors`.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf


def to_plain(obj: Any) -> Any:
    """OmegaConf containers -> resolved plain dicts/lists (anything else passes through unchanged).

    Plain containers pickle into checkpoints and serialise to JSON; configs do neither safely.
    """
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


#: The package the configs ship in: the repo's top-level conf/ mapped to ``anime_role_detect.conf`` (pyproject.toml).
CONF_PACKAGE = "anime_role_detect.conf"
#: Environment variable naming a site's config folder, searched before the shipped one (its files win, new ones add).
SITE_CONF_ENV = "ARD_CONF_DIR"


def _shipped_config_dir() -> Path:
    """The installed ``anime_role_detect.conf`` (a wheel, or an editable install mapping it to the checkout's conf/);
    a source tree used without installing falls back to its own conf/."""
    try:
        files = importlib.resources.files(CONF_PACKAGE)
    except ModuleNotFoundError:
        files = None
    if isinstance(files, Path) and (files / "train.yaml").is_file():
        return files.resolve()
    return Path(__file__).resolve().parents[2] / "conf"


#: The one config directory every entry point composes from (``ARD_CONF_DIR`` is layered over it).
CONFIG_DIR: Path = _shipped_config_dir()


def site_config_dir() -> Path | None:
    """``$ARD_CONF_DIR`` resolved, or None when unset; a `ConfigError` when it names no folder."""
    from .errors import ConfigError

    raw = os.environ.get(SITE_CONF_ENV, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"{SITE_CONF_ENV}={raw} is not a folder; point it at a folder of configs laid out like conf/ or unset it")
    return path


def config_dirs(extra: str | Path | None = None) -> list[Path]:
    """The config search order: `extra` (a job's own folder), ``$ARD_CONF_DIR``, then the shipped `CONFIG_DIR`.

    `extra` naming the shipped folder itself adds nothing (the site's folder still comes before it).
    """
    first = Path(extra).expanduser().resolve() if extra else None
    out: list[Path] = []
    for d in (None if first == CONFIG_DIR else first, site_config_dir(), CONFIG_DIR):
        if d is not None and d not in out:
            out.append(d)
    return out


@contextlib.contextmanager
def hydra_search_path(dirs: Sequence[Path]) -> Iterator[None]:
    """Initialise Hydra (outside an app) on `dirs` in order: the first is the primary folder, the others follow it.

    The same search path an entry point gets from `cli.hydra_main` (primary ``config_path`` + Hydra's
    ``--config-dir``, which Hydra places after the primary folder): earlier folders win, later ones fill in.
    Hydra's public `initialize_config_dir` takes one folder, so this mirrors it with the same internals.
    """
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    version.setbase("1.3")
    csp = create_config_search_path(str(dirs[0]))
    for d in dirs[1:]:
        csp.prepend(provider="command-line", path=f"file://{d}", anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="compose", config_search_path=csp)
    try:
        yield
    finally:
        GlobalHydra.instance().clear()


@dataclass
class HydraState:
    """A running Hydra app's config folders and ``hydra`` node: what a process it starts needs so that its
    compose calls and ``${hydra:...}`` interpolations read as they would in the app."""

    dirs: list[str]
    hydra_cfg: Any  # `HydraConfig`'s DictConfig (picklable)


def running_hydra_state() -> HydraState | None:
    """The state of the Hydra app this process runs in, or None outside one."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    dirs = [str(s.path) for s in HydraConfig.get().runtime.config_sources if s.schema == "file"]
    return HydraState(dirs=dirs, hydra_cfg=HydraConfig.instance().cfg)


@contextlib.contextmanager
def restored_hydra(state: HydraState | None) -> Iterator[None]:
    """Run a block, in a fresh process, under `state` (from `running_hydra_state`); None runs it standalone."""
    if state is None:
        yield
        return
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(state.hydra_cfg)
    with hydra_search_path([Path(d) for d in state.dirs] or config_dirs()):
        yield


_compose_lock = threading.Lock()  # Hydra's global state is not thread-safe (the service composes from worker threads)


def check_group_overrides(argv: Sequence[str], dirs: Sequence[Path] | None = None) -> None:
    """Fail fast with one line for ``group=value`` overrides naming a config file that does not exist, or null.

    Groups and options are looked up in `dirs` (default: `config_dirs()`, ``$ARD_CONF_DIR`` then the shipped conf/).
    Hydra cannot set a group to null (``experiment=null`` is a raw traceback there): the fix is ``~group``.
    """
    from .errors import ConfigError

    dirs = list(dirs) if dirs is not None else config_dirs()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if key.startswith("~"):
            continue  # ~group=option deletes; Hydra checks the option itself
        key = key.lstrip("+")
        groups = [d / key for d in dirs if (d / key).is_dir()]
        if key.startswith("hydra") or "." in key or not groups:
            continue
        options = sorted({p.stem for g in groups for p in g.glob("*.yaml")})
        for choice in value.split(","):
            choice = choice.strip()
            if choice in ("", "null"):
                raise ConfigError(f"{key}={choice or repr('')} cannot unset a config group; drop it with ~{key} "
                                  f"(e.g. python train.py '~{key}') or choose one of: {', '.join(options)}")
            if choice.startswith(("choice(", "range(", "glob(")):
                continue
            if choice not in options:
                raise ConfigError(f"unknown {key} {choice!r}; choose one of: {', '.join(options)}")


def compose_config(config_name: str, overrides: Sequence[str] = (), fix: str = "fix the overrides",
                   config_dir: str | Path | None = None) -> DictConfig:
    """``<config_name>.yaml`` with Hydra overrides, from inside or outside a running Hydra app; any failure is a
    one-line `ConfigError` ending in `fix`.

    Searched in `config_dirs(config_dir)` order (a job's own folder, ``$ARD_CONF_DIR``, the shipped conf/), through
    Hydra's search path, so a partial folder overrides or adds single files. Inside a running app the app's own
    search path is used. Where one job builds another's config (the workflow and log fusion train through
    ``train.yaml``, the service composes workflows, ``ard-gallery build`` composes ``infer.yaml``).
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    from .errors import ConfigError, UserError

    with _compose_lock:
        try:
            if GlobalHydra.instance().is_initialized():
                return compose(config_name=config_name, overrides=list(overrides))
            dirs = config_dirs(config_dir)
            if not any((d / f"{config_name}.yaml").is_file() for d in dirs):
                raise ConfigError(f"config {config_name}.yaml not found in {', '.join(map(str, dirs))}; {fix}")
            with hydra_search_path(dirs):
                return compose(config_name=config_name, overrides=list(overrides))
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - Hydra raises several types for bad overrides
            raise ConfigError(f"{config_name} config could not be composed ({type(exc).__name__}: {exc}); {fix}") from None


def compose_plain(config_name: str, overrides: Sequence[str] = (), fix: str | None = None) -> dict[str, Any]:
    """`compose_config` as a resolved plain dict without the run-only parts (``hydra``, ``paths.output_dir``):
    a job's settings for library calls made outside a Hydra run (``ard-gallery build``, tests, benchmarks)."""
    from omegaconf import open_dict

    cfg = compose_config(config_name, overrides, fix=fix or f"check the overrides {' '.join(overrides)}")
    with open_dict(cfg):
        cfg.pop("hydra", None)
        if "paths" in cfg and "output_dir" in cfg.paths:
            del cfg.paths["output_dir"]  # ${hydra:runtime.output_dir}: only resolvable inside a Hydra run
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def dataclass_from_mapping(cls: type, cfg: Mapping[str, Any] | None, where: str) -> Any:
    """``cls(**cfg)`` for a config section, with a one-line `ConfigError` naming unknown keys and the known ones."""
    from .errors import ConfigError

    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
    return cls(**cfg)
