"""``python -m anime_role_detect.workflow characters='[{"name":"Hoshino","series":"Blue Archive"}]'`` (or ``ard-workflow``).

Thin Hydra entry point (conf/workflow.yaml): progress bars per stage, a summary table at the end;
rerun the same command after an interruption to resume.
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig, open_dict

from ..cli import hydra_main
from ..log import setup_logging
from .progress import CancelledError, Progress, ProgressEvent
from .run import WorkflowResult, hydra_quote, run_workflow


def _hydra_value(obj: Any) -> str:
    """A JSON value written in Hydra's override grammar (unquoted keys, quoted strings)."""
    if isinstance(obj, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, list):
        return "[" + ",".join(_hydra_value(v) for v in obj) + "]"
    if isinstance(obj, str):
        return hydra_quote(obj)
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    return repr(obj)


def json_overrides_to_hydra(args: list[str]) -> list[str]:
    """Accept JSON for list/dict values (``characters='[{"name":"Hoshino","series":"Blue Archive"}]'``).

    Hydra's grammar wants ``[{name:Hoshino,series:'Blue Archive'}]``; arguments whose value is not a JSON
    list or object are passed through untouched.
    """
    import json

    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and value.lstrip()[:1] in "[{" and value:
            try:
                parsed = json.loads(value)
            except ValueError:
                parsed = None
            if isinstance(parsed, (list, dict)):
                arg = f"{key}={_hydra_value(parsed)}"
        out.append(arg)
    return out


class RichBars:
    """One rich progress bar per stage, fed by `Progress` events."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        self.bars = RichProgress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[message]}"),
                                 console=Console(stderr=True), transient=False)
        self.tasks: dict[str, Any] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        if ev.stage not in self.tasks:
            self.tasks[ev.stage] = self.bars.add_task(ev.stage, total=max(ev.total, 1), message="")
        task = self.tasks[ev.stage]
        self.bars.update(task, completed=ev.done, total=max(ev.total, 1), message=ev.message[:60] if ev.message else None)

    def __enter__(self) -> "RichBars":
        self.bars.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.stop()


def print_summary(result: WorkflowResult) -> None:
    """The per-character table (collected, kept, train/val, accuracy) and the version line."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"version {result.version_id}" if result.version_id else "workflow (stopped early)")
    for col in ("character", "series", "collected", "kept", "train", "val", "val accuracy"):
        table.add_column(col, justify="left" if col in ("character", "series") else "right")
    for r in result.summary:
        acc = r.get("accuracy")
        table.add_row(r["character"], r.get("series") or "", "-" if r.get("collected") is None else str(r["collected"]),
                      str(r["kept"]), str(r["train"]), str(r["val"]), "-" if acc is None else f"{100 * acc:.1f}%")
    console = Console()
    console.print(table)
    for r in result.summary:
        if r.get("problems"):
            console.print(f"[yellow]{r['character']}[/]: {'; '.join(r['problems'])} (rerun the same command to retry)")
    acc = result.metrics.get("accuracy")
    print(f"val accuracy {'-' if acc is None else format(100 * acc, '.1f') + '%'} | version {result.version_id or '-'} | run folder {result.run_dir}"
          + (f" | resumed: {', '.join(result.resumed_stages)}" if result.resumed_stages else ""))


@hydra_main("workflow")
def app(cfg: DictConfig) -> None:
    """Run (or resume) the workflow with progress bars; print the summary table."""
    if sys.stderr.isatty() and cfg.get("log"):  # the bars show progress; INFO lines would tear them (still in logs/)
        with open_dict(cfg):
            cfg.log.console_level = "WARNING"
    setup_logging(cfg.get("log"))
    progress = Progress()
    try:
        with RichBars() as bars:
            progress.subscribe(bars)
            result = run_workflow(cfg, progress)
    except (KeyboardInterrupt, CancelledError):
        print("interrupted: rerun the same command to resume where it stopped", file=sys.stderr)
        raise SystemExit(130) from None
    print_summary(result)


def main() -> None:
    """``python -m anime_role_detect.workflow`` / ``ard-workflow``: JSON values accepted, then the Hydra app."""
    sys.argv[1:] = json_overrides_to_hydra(sys.argv[1:])
    app()


if __name__ == "__main__":
    main()
