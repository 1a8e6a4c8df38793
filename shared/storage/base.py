"""The storage contract every backend honours, and the key rules that keep keys portable and safe.

Keys are POSIX-style relative paths (`job-7/frame-0001.png`). They are checked the same way for every
backend so a key that works on S3 also works in a local folder, and no key can climb out of its root.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Protocol

from shared.errors import InvalidInput

MAX_KEY_BYTES = 1024
"""S3's own limit on a key, in UTF-8 bytes; one more character would fail there but not locally."""


class Storage(Protocol):
    """Where results and inputs live: a local folder or an S3 bucket prefix."""

    presigns: bool
    """Whether `presigned_url` hands out links that work without credentials: S3 does, a local folder cannot."""

    def presigned_url(
        self, key: str, expires: int = 3600, method: str = "get_object", content_length: int | None = None
    ) -> str:
        """A URL that lets anyone holding it GET (or PUT) the object for `expires` seconds (`presigns` only)."""
        ...

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store `data` under `key`, replacing any previous object whole (readers never see half of it)."""
        ...

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The object's bytes; FileNotFoundError if there is none. With `limit`, an object larger than that is
        refused (InvalidInput) by its size, never read whole."""
        ...

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """`put` of a file's contents, streamed (checkpoints and models run to gigabytes), replaced whole."""
        ...

    def get_file(self, key: str, path: Path) -> None:
        """`get` into a file, streamed; FileNotFoundError if there is no object."""
        ...

    def exists(self, key: str) -> bool:
        """Whether an object (not merely a prefix of one) is stored under `key`."""
        ...

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys, relative to the backend root, that start with `prefix` (a plain string prefix)."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing one is not an error, so retries are safe."""
        ...

    def url(self, key: str) -> str:
        """A `file:///abs/path` or `s3://bucket/prefix/key` URL naming the object, for logs and records."""
        ...


def _why_invalid(key: str) -> str | None:
    if not key:
        return "it is empty"
    if key.startswith("/"):
        return "it is absolute; keys are relative to the storage root"
    if "\\" in key:
        return "it contains a backslash; use '/' between segments"
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in key):
        return "it contains a NUL, control character or lone surrogate"
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"it is longer than {MAX_KEY_BYTES} bytes in UTF-8"
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        return "it has an empty, '.' or '..' segment"
    return None


def _invalid(what: str, key: str, why: str) -> InvalidInput:
    shown = key if len(key) <= 80 else key[:80] + "…"
    return InvalidInput(f"invalid storage {what} {shown!r}: {why}")


def check_key(key: str) -> str:
    """Return `key` unchanged if it is a safe relative key, else raise InvalidInput naming it.

    Rejects what could escape a root or mean different objects on different backends: absolute paths,
    backslashes, control characters, and `.`, `..` or empty segments (so `a//b` and `a/` are refused too).
    """
    if why := _why_invalid(key):
        raise _invalid("key", key, why)
    return key


def check_prefix(prefix: str) -> str:
    """Return `prefix` if it is empty or a valid key, optionally ending in '/'; else raise InvalidInput."""
    if prefix and (why := _why_invalid(prefix.removesuffix("/"))):
        raise _invalid("prefix", prefix, why)
    return prefix
