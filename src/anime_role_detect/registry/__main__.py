"""Registry command line: ``python -m anime_role_detect.registry [--root DIR] list|show [ID]|promote ID|rollback``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable, Sequence

from ..errors import UserError
from . import Registry, VersionInfo


def _print_table(rows: Iterable[VersionInfo]) -> None:
    for v in rows:
        acc = v.metrics.get("val/acc", v.metrics.get("top1", ""))
        print(f"{'*' if v.live else ' '} {v.id}  {v.kind:<9} parent={v.parent or '-':<28} {('acc=' + format(acc, '.3f')) if isinstance(acc, float) else ''}")


def main(argv: Sequence[str] | None = None) -> int:
    """Registry command line."""
    ap = argparse.ArgumentParser(prog="python -m anime_role_detect.registry", description="List, show, promote and roll back versions.")
    ap.add_argument("--root", default=os.environ.get("ARD_REGISTRY", "outputs/registry"), help="registry folder (env ARD_REGISTRY)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list versions (* = live)")
    sh = sub.add_parser("show", help="print one version's manifest and metrics")
    sh.add_argument("id", nargs="?", default="latest")
    pr = sub.add_parser("promote", help="make a version live")
    pr.add_argument("id")
    sub.add_parser("rollback", help="make the version live before the current one (again: one further back)")
    args = ap.parse_args(argv)
    reg = Registry(args.root)
    try:
        if args.cmd == "list":
            _print_table(reg.list())
        elif args.cmd == "show":
            path = reg.path(args.id)
            print(json.dumps(reg.info(path.name).to_json(), indent=2))
        elif args.cmd == "promote":
            reg.promote(args.id)
            print(f"live: {args.id}")
        elif args.cmd == "rollback":
            print(f"live: {reg.rollback()}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
