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
    p.add_argument("--parent-pid", type=int, default=None,
                   help="stop once this process, the caller that started this one, is gone (what a workflow passes; "
                        "a command run by hand, e.g. another node's, outlives its shell)")
    return p


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> None:
    """Parse the command line and train (`training.launch.train_from_file`)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from ..errors import ConfigError
    from ..log import get_logger
    from ..training.launch import CHILD_MODULE, STOPPED_EXIT, train_from_file

    args = _parser().parse_args(argv)
    if not args.config.is_file():
        raise ConfigError(f"{args.config}: no such config file; give the launch.yaml a training run folder holds")
    try:
        train_from_file(args.config, args.events, args.result, args.parent_pid)
    except SIGTERMException:  # a SystemExit of code 0: a stopped run must not look finished
        get_logger("training").warning("training stopped on SIGTERM (every rank at the same step); to resume from the "
                                       f"last finished epoch run: python -m {CHILD_MODULE} {args.config}")
        raise SystemExit(STOPPED_EXIT) from None


if __name__ == "__main__":
    main()
