"""Job notifications as a receiver sees them: the events, the JSON body, its headers and its signature.

A job's `notify:` (or the farm's `ARCHFARM_NOTIFY_URLS`) names URLs that get one POST per event:

- `finished`: the job ended, however it ended (succeeded, partially_succeeded, failed, cancelled);
- `failed`: the job ended failed or partially_succeeded;
- `first_failure`: a task of the job failed for good (retries exhausted), while the others may still run;
- `pick_needed`: a staged job's drafts are done and it waits for a person to pick (once per run);
- `deadline_at_risk`: the farm expects the job to finish after its `deadline` (once per job), with both times.

The body is fixed when the event happens, so every attempt sends the same bytes; it is signed with
HMAC-SHA256 under `ARCHFARM_NOTIFY_SECRET` and carries a delivery id that stays the same across attempts,
so a receiver can check where it came from and drop a repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

Event = Literal["finished", "failed", "first_failure", "pick_needed", "deadline_at_risk"]

SHEET_PATH = "/ui/jobs/{job_id}"
"""A job's contact sheet in the dashboard, under `ARCHFARM_PUBLIC_URL`."""
SIGNATURE_HEADER = "X-Archfarm-Signature"
EVENT_HEADER = "X-Archfarm-Event"
DELIVERY_HEADER = "X-Archfarm-Delivery"


def check_url(url: str) -> str:
    """An absolute http(s) URL with a host; raises ValueError naming it otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r}: not an http:// or https:// URL with a host")
    if any(c.isspace() or not c.isprintable() for c in url):
        raise ValueError(f"{url!r}: spaces or control characters in a URL")
    return url


def where(url: str) -> str:
    """The URL as logs and errors name it: scheme and host only, since a webhook's path often holds its token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def body(
    *,
    event: str,
    delivery: str,
    at: datetime,
    job_id: str,
    name: str,
    status: str,
    counts: Mapping[str, int],
    public_url: str | None,
    error: str | None = None,
    deadline: tuple[datetime, datetime] | None = None,
) -> str:
    """The JSON sent: the event, the job (id, name, status, task counts, and its sheet's link where the farm
    has a public address), for `first_failure` the reason the first task failed, and for `deadline_at_risk`
    the deadline and the finish expected."""
    payload = {
        "event": event,
        "delivery": delivery,
        "at": at.isoformat(),
        "job": {
            "id": job_id,
            "name": name,
            "status": status,
            "counts": dict(counts),
            "total": sum(counts.values()),
            "sheet_url": None if public_url is None else public_url.rstrip("/") + SHEET_PATH.format(job_id=job_id),
        },
    }
    if error is not None:
        payload["error"] = error
    if deadline is not None:
        payload["deadline"] = {"at": deadline[0].isoformat(), "expected": deadline[1].isoformat()}
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)


def sign(secret: str, data: bytes) -> str:
    """The signature header's value: `sha256=` and the HMAC-SHA256 of the raw body, in hex."""
    return "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()


def verify(secret: str, data: bytes, signature: str | None) -> bool:
    """What a receiver does with the raw body and the header: a constant-time comparison."""
    return signature is not None and hmac.compare_digest(sign(secret, data), signature)


def headers(event: str, delivery: str, data: bytes, secret: str | None) -> dict[str, str]:
    """The request's headers; without a secret the body goes unsigned."""
    found = {
        "Content-Type": "application/json",
        "User-Agent": "archfarm-notify",
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery,
    }
    if secret:
        found[SIGNATURE_HEADER] = sign(secret, data)
    return found
