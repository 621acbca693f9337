"""`python -m anime_role_detect.serve [key=value ...]` / `ard-serve`: compose conf/serve.yaml and run uvicorn."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..cli import user_errors_exit
from ..log import setup_logging

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")


def serve(cfg: DictConfig) -> None:
    """Build the app from `cfg` and serve it until interrupted."""
    import uvicorn

    from .app import create_app
    from .settings import ServeSettings

    setup_logging(cfg.get("log"))
    settings = ServeSettings.from_config(cfg)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_keep_alive=5, timeout_graceful_shutdown=10)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    serve(cfg)


if __name__ == "__main__":
    main()
