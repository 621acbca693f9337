"""``python -m anime_role_detect.export [--registry DIR] [--version latest|ID] [--int8] [--opset N]`` (or ``ard-export``):
write a version's networks as ONNX files into a derived version (`recognition.onnx_export.export_version`).

Hydra-style ``key=value`` words work too (``version=latest int8=true registry=DIR``), as in the other commands.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ..errors import ConfigError
from . import user_errors_exit

#: ``key=value`` words accepted besides the flags, and the flag each becomes.
_KEY_FLAGS = {"version": "--version", "registry": "--registry", "registry_dir": "--registry", "opset": "--opset",
              "int8": "--int8", "promote": "--promote"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flags(argv: Sequence[str]) -> list[str]:
    """Turn ``key=value`` words into the matching flags (booleans: true/false); other words pass through."""
    out: list[str] = []
    for word in argv:
        key, eq, value = word.partition("=")
        if word.startswith("-") or not eq:
            out.append(word)
            continue
        if key not in _KEY_FLAGS:
            raise ConfigError(f"unknown setting {key!r}; use one of {', '.join(sorted(_KEY_FLAGS))} (or see --help)")
        if key in ("int8", "promote"):
            if value.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{key}={value!r}: use true or false")
            out.append(_KEY_FLAGS[key] if value.lower() in _TRUE else f"--no-{key}")
        else:
            out += [_KEY_FLAGS[key], value]
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m anime_role_detect.export",
                                 description="Export a registry version's classifier (logits + tag logits + embedding) and gallery "
                                             "embedder to ONNX, into a derived version (promoted when the base was live).")
    ap.add_argument("--registry", default=os.environ.get("ARD_REGISTRY", "outputs/registry"), help="registry folder (env ARD_REGISTRY)")
    ap.add_argument("--version", default="latest", help="version to export: latest or an id")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=False,
                    help="also write dynamically quantised int8 copies (*.int8.onnx; used with runtime=onnx-int8)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the library's)")
    ap.add_argument("--promote", action=argparse.BooleanOptionalAction, default=None,
                    help="make the new version live (default: when the exported version was live)")
    return ap


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> int:
    """Export, then print the new version and its files as one JSON line."""
    from ..log import setup_logging
    from ..recognition.onnx_export import DEFAULT_OPSET, export_version

    args = parser().parse_args(_flags(list(sys.argv[1:] if argv is None else argv)))
    setup_logging({"console_level": "WARNING"})  # progress goes to logs/system.log; stdout is the one JSON line
    res = export_version(args.registry, args.version, int8=args.int8, opset=args.opset or DEFAULT_OPSET, promote=args.promote)
    print(json.dumps({"version": res.version_id, "base": res.base_id, "live": res.live, "path": str(res.version_dir),
                      "files": res.files, "checks": res.checks}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
