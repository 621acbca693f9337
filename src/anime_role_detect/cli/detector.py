"""``ard-train-detector out=DIR [preset=tiny] [source=synthetic|animeface|both] [key=value ...]``: make a YOLO
character detector offline (`training.detector`); also ``python -m anime_role_detect.cli.detector``."""

from __future__ import annotations

import sys
from typing import Sequence

from ..training import detector as trainer
from . import user_errors_exit


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> trainer.TrainedDetector:
    """Parse ``key=value`` options, train, print where the weights went and the validation metrics."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(trainer.__doc__)
        raise SystemExit(0)
    result = trainer.make_detector(trainer.parse_overrides(args))
    m = result.metrics
    print(
        f"detector: {result.weights}  mAP50={m['map50']:.3f} mAP50-95={m['map50_95']:.3f} "
        f"P={m['precision']:.3f} R={m['recall']:.3f}  ({result.seconds:.0f} s)\n"
        f"use it: detector=yolo detector.weights={result.weights}"
    )
    return result


if __name__ == "__main__":
    main()
