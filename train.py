"""Train a character classifier: ``python train.py [group=option ...] [key=value ...]``.

Thin entry point (conf/train.yaml, through `anime_role_detect.cli.train`); the work happens in
`anime_role_detect.training.train` and, with ``register=true``, `anime_role_detect.workflow.publish`.
Same as ``python -m anime_role_detect.train`` and ``ard-train``. See docs/training.md.
"""

from anime_role_detect.cli.train import main

if __name__ == "__main__":
    main()
