"""``python -m anime_role_detect.cli.train_config CONFIG.yaml [--events FILE] [--result FILE]``: train a config that
`training.launch` composed and saved; Lightning's DDP launcher re-runs this command line for each other rank.

Started by `training.train_launched` (the workflow, log fusion) when a trainer starts more processes; by hand it
reruns a failed attempt with the same config (``last.ckpt`` in its run folder resumes it when ``ckpt_path`` says so).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from . import user_errors_exit


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m anime_role_detect.cli.train_config", description=__doc__.split("\n\n")[0])
    p.add_argument("config", type=Path, help="the composed training config (YAML, as conf/train.yaml composes)")
    p.add_argument("--events", type=Path, default=None, help="append one JSON line per epoch here (rank 0)")
    p.add_argument("--result", type=Path, default=None, help="write the run's TrainResult here as JSON (rank 0)")
    return p


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and train (`training.launch.train_from_file`)."""
    from ..errors import ConfigError
    from ..training.launch import train_from_file

    args = _parser().parse_args(argv)
    if not args.config.is_file():
        raise ConfigError(f"{args.config}: no such config file; give the launch.yaml a training run folder holds")
    train_from_file(args.config, args.events, args.result)


if __name__ == "__main__":
    main()
