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


def format_comparison(report: dict) -> str:
    """A per-mode, per-character table of two versions' figures on the same pictures."""
    a, b = report["a_scores"], report["b_scores"]
    lines = [f"{report['a']} (A) vs {report['b']} (B) on {report['pictures']} pictures ({report['by']})"]
    for mode in report["modes"]:
        sa, sb = a[mode], b[mode]
        lines.append(f"\n[{mode}]  top-1 A {_pct(sa['top1'])}  B {_pct(sb['top1'])}   "
                     f"false rejects A {_pct(sa['false_reject'])}  B {_pct(sb['false_reject'])}")
        for c in sorted(set(sa["per_character"]) | set(sb["per_character"])):
            pa, pb = sa["per_character"].get(c), sb["per_character"].get(c)
            mark = "  <- B worse" if pa is not None and pb is not None and pb < pa else ""
            lines.append(f"  {c:<32} A {_pct(pa):>6}  B {_pct(pb):>6}{mark}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


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
    cp = sub.add_parser("compare", help="both versions on the same evaluation set (per character, per mode)")
    cp.add_argument("a")
    cp.add_argument("b", nargs="?", default="latest")
    cp.add_argument("--json", action="store_true", help="print the report as JSON")
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
        elif args.cmd == "compare":
            from ..recognition.evalset import compare_versions  # an entry point may reach every layer

            report = compare_versions(reg.path(args.a), reg.path(args.b))
            print(json.dumps(report, indent=2) if args.json else format_comparison(report))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
