"""API tokens: created once and shown once, stored as SHA-256, revoked by name; and the dashboard's sessions.

A token is 32 random bytes (`af_` + URL-safe base64): guessing one is hopeless, so a plain SHA-256 (no salt,
no slow hash) is enough to keep a stolen database from yielding usable tokens, and lets a request's token be
found with one indexed lookup. A session is the same kind of secret (`afs_`), made at sign-in for a token: the
browser keeps it instead of the token, so a cookie that leaks is worth hours, not the token's lifetime, and
signing out ends it here, whatever the browser still holds.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.db.clock import db_now
from shared.db.models import ApiSession, ApiToken
from shared.errors import InvalidInput, NotFound

PREFIX = "af_"
SESSION_PREFIX = "afs_"
SESSION_SECONDS = 8 * 3600
"""How long a dashboard sign-in lasts: a working day, after which the token is asked for again."""


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


def any_tokens(session: Session) -> bool:
    """Whether a token was ever created (revoked ones count): from then on the farm has owners to tell apart."""
    return session.scalar(select(ApiToken.name).limit(1)) is not None


def start_session(session: Session, token: str) -> str | None:
    """A new session for an active token (None for an unknown or revoked one); expired sessions are dropped."""
    caller = caller_of(session, token)
    if caller is None:
        return None
    session.execute(delete(ApiSession).where(ApiSession.expires_at <= db_now()))
    secret = SESSION_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiSession(sha256=_digest(secret), token=caller.name, expires_at=db_now(SESSION_SECONDS)))
    return secret


def session_caller(session: Session, secret: str) -> Caller | None:
    """The holder of an unexpired session whose token is still active; None otherwise (the same for all)."""
    if not secret.startswith(SESSION_PREFIX) or len(secret) > 100:
        return None
    row = session.execute(
        select(ApiToken.name, ApiToken.admin)
        .join(ApiSession, ApiSession.token == ApiToken.name)
        .where(ApiSession.sha256 == _digest(secret), ApiSession.expires_at > db_now(), ApiToken.revoked_at.is_(None))
    ).first()
    return None if row is None else Caller(row.name, row.admin)


def end_session(session: Session, secret: str) -> None:
    """Sign-out: the session is gone, whatever the browser keeps."""
    session.execute(delete(ApiSession).where(ApiSession.sha256 == _digest(secret)))
