"""Command lines — the code behind ``train.py``, ``infer.py``, ``ard-*`` and ``python -m anime_role_detect.*``; may import every layer.

Only entry points import this package (the repo's ``train.py``/``infer.py``, ``__main__`` modules, console
scripts); no library module does. `user_errors_exit` gives every command its one-line errors.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from ..errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors_exit(fn: F) -> F:
    """Wrap a main function: a `UserError` prints ``error: <message>`` to stderr and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _config_dir_flag(argv: Sequence[str]) -> str | None:
    """The value of Hydra's ``--config-dir``/``-cd`` on a command line, or None."""
    for i, a in enumerate(argv):
        if a in ("--config-dir", "-cd"):
            return argv[i + 1] if i + 1 < len(argv) else ""
        if a.startswith(("--config-dir=", "-cd=")):
            return a.split("=", 1)[1]
    return None


def hydra_main(config_name: str) -> Callable[[Callable[[Any], Any]], Callable[[], Any]]:
    """``@hydra.main`` on the one config directory (`confutil.CONFIG_DIR`) with one-line user errors.

    With ``ARD_CONF_DIR`` set, that folder is the primary config folder and the shipped one follows it through
    Hydra's own ``--config-dir`` (searched after the primary): a site's files win, new ones add, the rest come
    from the package. Every entry point of the project is built with this decorator.
    """

    def decorate(task: Callable[[Any], Any]) -> Callable[[], Any]:
        @user_errors_exit
        @functools.wraps(task)
        def main() -> Any:
            import hydra

            from ..confutil import CONFIG_DIR, site_config_dir
            from ..errors import ConfigError

            site = site_config_dir()
            if site is not None:
                given = _config_dir_flag(sys.argv[1:])
                if given is None:
                    sys.argv[1:1] = ["--config-dir", str(CONFIG_DIR)]  # a relaunched DDP rank already has it
                elif Path(given).resolve() != CONFIG_DIR:
                    raise ConfigError(f"--config-dir {given} and ARD_CONF_DIR={site} both add configs; put the files in one folder")
            primary = site or CONFIG_DIR
            app = hydra.main(version_base="1.3", config_path=str(primary), config_name=config_name)(user_errors_exit(task))
            return app()

        return main

    return decorate
