"""The command line's output: results on stdout, one-line errors and warnings on stderr (or, for a command run
with --json, errors as `{"error": ...}` on stdout for the program reading it)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console

from shared.errors import ArchfarmError

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

json_errors: ContextVar[bool] = ContextVar("json_errors", default=False)
"""Set by a command run with --json."""


def fail(message: str, code: int = 2) -> NoReturn:
    if json_errors.get():
        out.print(json.dumps({"error": message}), markup=False, highlight=False)
    else:
        err.print(f"archfarm: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    err.print(f"archfarm: warning: {message}", markup=False, soft_wrap=True)


def print_json(data: object) -> None:
    out.print(json.dumps(data, default=str), markup=False, highlight=False)


F = TypeVar("F", bound=Callable[..., Any])


class Commands(typer.Typer):
    """A group of commands whose errors the user can fix (`ArchfarmError`) end the same way: one line (or, under
    --json, `{"error": ...}` on stdout) and exit 2, never a traceback."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        register = super().command(*args, **kwargs)

        def decorate(function: F) -> F:
            @functools.wraps(function)
            def run(*call_args: Any, **call_kwargs: Any) -> Any:
                try:
                    return function(*call_args, **call_kwargs)
                except ArchfarmError as error:
                    fail(str(error))

            register(run)
            return function

        return decorate
