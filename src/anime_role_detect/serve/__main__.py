"""``python -m anime_role_detect.serve [key=value ...]`` / ``ard-serve``: compose conf/serve.yaml and run uvicorn."""

from __future__ import annotations

from omegaconf import DictConfig

from ..cli import hydra_main
from ..log import setup_logging


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


@hydra_main("serve")
def main(cfg: DictConfig) -> None:
    """Serve conf/serve.yaml (+ ``key=value`` overrides) until interrupted."""
    serve(cfg)


if __name__ == "__main__":
    main()
