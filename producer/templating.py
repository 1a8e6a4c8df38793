"""The Jinja2 templates of the dashboard and of `archfarm sheet`'s HTML file: one grid markup for both,
autoescaped, since job names, styles and prompts are user text."""

from __future__ import annotations

from datetime import datetime, timezone

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape


def duration(seconds: float | None) -> str:
    """`45 s`, `12 min`, `3 h 05 min`: an ETA or an age at a glance; `–` when unknown."""
    if seconds is None:
        return "–"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def moment(value: datetime) -> str:
    """A time in UTC, to the minute (the database's clock, whatever the viewer's zone)."""
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc)
    return value.strftime("%Y-%m-%d %H:%M UTC")


ENV = Environment(
    loader=PackageLoader("producer", "templates"),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
ENV.filters["duration"] = duration
ENV.filters["moment"] = moment
