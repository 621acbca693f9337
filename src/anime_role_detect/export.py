"""``python -m anime_role_detect.export [--registry DIR] [--version latest|ID] [--int8]``: a version's networks as ONNX (`cli.export`)."""

from .cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
