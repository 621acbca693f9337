"""Helpers for thin entry points: one-line errors for user mistakes instead of a traceback wall."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

from .errors import UserError

F = TypeVar("F", bound=Callable[..., Any])


def user_errors_exit(fn: F) -> F:
    """Wrap a main function: a `UserError` prints ``error: <message>`` to stderr and exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]
