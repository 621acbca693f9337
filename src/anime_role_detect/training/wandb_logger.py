"""Weights & Biases logging that never hangs a run: offline on its own without an API key or a network
(``conf/logger/wandb.yaml`` builds `build_wandb_logger`); sync an offline run later with ``wandb sync``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from ..log import training_log


def wandb_reachable(host: str = "api.wandb.ai", port: int = 443, timeout_s: float = 1.5) -> bool:
    """True when the W&B API host accepts a TCP connection within `timeout_s`."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def wandb_has_credentials() -> bool:
    """An API key in the environment or in ~/.netrc for api.wandb.ai."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text(encoding="utf-8")
    except OSError:
        return False


def wandb_offline_needed() -> tuple[bool, str]:
    """(offline?, why): offline when asked to, when there is no API key, or when W&B is unreachable."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return True, f"WANDB_MODE={mode}"
    if not wandb_has_credentials():
        return True, "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    if not wandb_reachable():
        return True, "api.wandb.ai is unreachable"
    return False, "online"


def build_wandb_logger(offline: bool | None = None, **kwargs: Any):
    """`WandbLogger` that never hangs: offline automatically without a key or network."""
    from lightning.pytorch.loggers import WandbLogger

    forced, why = wandb_offline_needed()
    use_offline = forced if offline is None else bool(offline) or forced
    if use_offline:
        os.environ["WANDB_MODE"] = "offline"
        training_log.info(f"W&B logging offline ({why}); sync later with `wandb sync <run dir>`")
    kwargs.setdefault("settings", None)
    settings = kwargs.pop("settings")
    if settings is None:
        import wandb

        settings = wandb.Settings(init_timeout=60, silent=True, x_disable_stats=True)
    return WandbLogger(offline=use_offline, settings=settings, **kwargs)
