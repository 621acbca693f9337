"""The fusion report (JSON + Markdown) and the decision to register: not worse on validation and held-back feedback."""

from __future__ import annotations

from typing import Any, Mapping


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def render_markdown(report: Mapping[str, Any]) -> str:
    """Human-readable fusion report."""
    m, bar = report["metrics"], report.get("unconfirmed_bar") or {}
    lines = [
        f"# Fusion report {report['time']}", "",
        f"- decision: **{report['decision']}** ({report['reason']})",
        f"- base version: `{report['base_version']}` -> new version: `{report.get('version_id') or '-'}`",
        f"- log records read: {report['records']} ({report['corrupt_records']} corrupt skipped)",
        f"- unconfirmed answers needed score >= {bar.get('min_confidence')} (feedback bar {bar.get('feedback_bar')} "
        f"from {bar.get('verdicts', 0)} verdicts)", "",
        "| metric | live | new |", "|---|---|---|",
        f"| validation top-1 ({m['val_n']} images, {m.get('val_source') or 'none'}) | {_fmt(m['val_before'])} | {_fmt(m['val_after'])} |",
        f"| held-back feedback top-1 ({m['holdout_n']}) | {_fmt(m['holdout_before'])} | {_fmt(m['holdout_after'])} |",
        "", "| character | corrected | confirmed | unconfirmed | total added |", "|---|---|---|---|---|",
    ]
    for c, d in sorted(report["added_per_character"].items()):
        lines.append(f"| {c} | {d.get('corrected', 0)} | {d.get('confirmed', 0)} | {d.get('unconfirmed', 0)} | {sum(d.values())} |")
    lines += ["", "Skipped: " + (", ".join(f"{k}={v}" for k, v in sorted(report["skipped"].items())) or "none")]
    return "\n".join(lines) + "\n"


def decide(metrics: Mapping[str, Any], n_added: int, tolerance: float, force: bool) -> tuple[bool, str]:
    """Register only when something was added and neither validation nor held-back feedback got worse; the reason
    names the figures that decided."""
    if n_added == 0:
        return False, "no new examples passed the selection"
    judged = [n for n in ("val", "holdout") if metrics[f"{n}_before"] is not None]
    figures = ", ".join(f"{n} top-1 {metrics[f'{n}_before']:.3f} -> {metrics[f'{n}_after']:.3f} ({metrics[f'{n}_n']} pictures)"
                        for n in judged)
    worse = [n for n in judged if metrics[f"{n}_after"] < metrics[f"{n}_before"] - tolerance]
    if force:
        return True, "forced" + (f" ({figures})" if figures else " (nothing to compare on)")
    if not judged:
        return False, "nothing to compare on (no evaluation set, no held-back feedback); pass force=true to register anyway"
    if worse:
        return False, f"new version is worse on {' and '.join(worse)} beyond the tolerance {tolerance}: {figures}"
    return True, f"not worse (tolerance {tolerance}): {figures}"
