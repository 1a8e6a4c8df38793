"""API tokens: created once and shown once, stored as SHA-256, revoked by name.

A token is 32 random bytes (`af_` + URL-safe base64): guessing one is hopeless, so a plain SHA-256 (no salt,
no slow hash) is enough to keep a stolen database from yielding usable tokens, and lets a request's token be
found with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db.clock import db_now
from shared.db.models import ApiToken
from shared.errors import InvalidInput, NotFound

PREFIX = "af_"


@dataclass(frozen=True)
class Caller:
    """Who a request's token names."""

    name: str
    admin: bool


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, name: str, admin: bool) -> str:
    """A new token for `name` (unique among tokens, revoked ones included); the only time it is seen."""
    token = PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, sha256=_digest(token), admin=admin))
    try:
        session.flush()
    except IntegrityError:
        raise InvalidInput(f"a token named {name!r} exists already") from None
    return token


def revoke_token(session: Session, name: str) -> None:
    found = session.execute(
        update(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None)).values(revoked_at=db_now())
    )
    if not found.rowcount:  # type: ignore[attr-defined]
        raise NotFound(f"no active token named {name!r}")


def tokens(session: Session) -> list[tuple[str, bool, datetime, datetime | None]]:
    """Every token's name, admin flag, creation and revocation time, oldest first."""
    rows = session.execute(
        select(ApiToken.name, ApiToken.admin, ApiToken.created_at, ApiToken.revoked_at).order_by(ApiToken.created_at)
    )
    return [(name, admin, created, revoked) for name, admin, created, revoked in rows]


def caller_of(session: Session, token: str) -> Caller | None:
    """The active token's holder, or None for an unknown or revoked token (the same answer for both)."""
    if not token.startswith(PREFIX) or len(token) > 100:
        return None
    row = session.execute(
        select(ApiToken.name, ApiToken.admin).where(ApiToken.sha256 == _digest(token), ApiToken.revoked_at.is_(None))
    ).first()
    return None if row is None else Caller(row.name, row.admin)
