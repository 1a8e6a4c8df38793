"""The command line's output: results on stdout, one-line errors and warnings on stderr (or, for a command run
with --json, errors as `{"error": ...}` on stdout for the program reading it)."""

from __future__ import annotations

import json
from contextvars import ContextVar
from typing import NoReturn

import typer
from rich.console import Console

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
