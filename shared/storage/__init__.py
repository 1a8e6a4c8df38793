"""Pick a storage backend from a URL, so the same job runs against a local folder or S3 without edits.

Accepted: a plain path (`renders`, `/srv/out`), `file:///abs/path`, or `s3://bucket[/prefix]`.
"""

from __future__ import annotations

import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

from shared.config import Settings
from shared.errors import InputError, InvalidInput, PlanError, StorageError
from shared.storage.base import Storage
from shared.storage.local import LocalStorage
from shared.storage.s3 import S3Storage

__all__ = [
    "LocalStorage",
    "S3Storage",
    "Storage",
    "canonical_url",
    "input_errors",
    "open_storage",
    "open_storage_from_settings",
    "Storages",
]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")
"""A URL scheme; two letters at least, so that a Windows drive (`C:`) would still read as a path."""

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
"""S3 bucket naming rules (3-63 lowercase letters, digits, dots, hyphens); also rules out `user@host:port`."""

MAX_READ_BYTES = 512 * 1024 * 1024
"""Largest input file read (plans and control maps): far above any real scan, far below a machine's memory."""

_EXPECTED = "expected a folder path, file:///abs/path or s3://bucket/prefix"


def _parse(url: str) -> Path | tuple[str, str]:
    """A local path, or (bucket, rest) for an s3:// URL; InvalidInput for anything else."""
    if not url:
        raise InvalidInput(f"storage URL is empty: {_EXPECTED}")
    if "\x00" in url:
        raise InvalidInput(f"storage URL {url!r} contains a NUL character")
    if not _SCHEME.match(url):
        return Path(url)
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "s3" and rest.startswith("//"):
        bucket, _, key = rest[2:].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise InvalidInput(f"storage URL {url!r} has no valid bucket name: {_EXPECTED}")
        # Taken verbatim, not URL-decoded: S3 keys may hold '%', '?' and '#' and s3:// URLs carry them raw.
        return bucket, key
    if scheme == "file" and rest.startswith("//"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput(f"storage URL {url!r} names a remote host; only local file:/// URLs are read")
        if parts.query or parts.fragment or not parts.path:
            raise InvalidInput(f"storage URL {url!r} is not a plain file:///abs/path (encode '?' and '#')")
        path = unquote(parts.path)
        if "\x00" in path:
            raise InvalidInput(f"storage URL {url!r} contains a NUL character")
        return Path(path)
    raise InvalidInput(f"unsupported storage URL {url!r}: {_EXPECTED}")


def canonical_url(url: str) -> str:
    """Paths become absolute `file://` URLs (so a worker started elsewhere finds the same place); s3:// URLs
    are kept. Raises InvalidInput for anything `open_storage` would refuse."""
    where = _parse(url)
    if isinstance(where, Path):
        try:
            return where.expanduser().resolve().as_uri()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop, before Python 3.13
            raise InvalidInput(f"{url!r} cannot be resolved: {e}") from None
    bucket, key = where
    return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"


def open_storage(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    public_endpoint_url: str | None = None,
) -> Storage:
    """The backend `url` names; the endpoints and `region` only matter for s3:// URLs."""
    where = _parse(url)
    if isinstance(where, Path):
        return LocalStorage(where)
    bucket, prefix = where
    return S3Storage(bucket, prefix, endpoint_url=endpoint_url, region=region, public_endpoint_url=public_endpoint_url)


def open_storage_from_settings(settings: Settings, url: str | None = None) -> Storage:
    """The backend for `url` (default: the configured storage_url), with the configured S3 endpoints, opened
    anew: for one-off use (a training run's output). A process that keeps reading and writing uses `Storages`."""
    return open_storage(
        settings.storage_url if url is None else url,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        public_endpoint_url=settings.s3_public_endpoint_url,
    )


class Storages:
    """The storages one process reads and writes, opened from its settings (endpoints, region) and kept, the
    most recently used `keep`: an API serving thousands of thumbnails, a worker reading plans and writing
    renders, each opens a URL's backend once (an S3 client is costly to make)."""

    def __init__(self, settings: Settings, keep: int = 32) -> None:
        self.settings = settings
        self.keep = keep
        self._open: OrderedDict[str, Storage] = OrderedDict()
        self._lock = threading.Lock()

    def open(self, url: str | None = None) -> Storage:
        """The backend for `url` (default: the farm's storage, ARCHFARM_STORAGE_URL)."""
        url = self.settings.storage_url if url is None else url
        with self._lock:
            storage = self._open.pop(url, None) or open_storage_from_settings(self.settings, url)
            self._open[url] = storage
            while len(self._open) > self.keep:
                self._open.popitem(last=False)
        return storage

    def read(self, url: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
        """The bytes of ONE object named by a path, file:// URL or s3://bucket/key URL (plan images, mostly); one
        larger than `max_bytes` is refused by its size, never read into memory whole."""
        where = _parse(url)
        if isinstance(where, tuple):
            bucket, key = where
            if not key:
                raise InvalidInput(f"URL {url!r} names a bucket, not an object")
            return self.open(f"s3://{bucket}").get(key, limit=max_bytes)
        return _read_file(where, url, max_bytes)


def _read_file(where: Path, url: str, max_bytes: int) -> bytes:
    # Read directly, not through LocalStorage: a path the user names may be a symlink to anywhere. Only
    # regular files of bounded size: a device such as /dev/zero would otherwise be read until memory runs out.
    try:
        info = where.stat()
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInput(f"{url}: not a regular file")
        if info.st_size > max_bytes:
            raise InvalidInput(f"{url}: {info.st_size} bytes is over the limit of {max_bytes}")
        return where.read_bytes()
    except (IsADirectoryError, NotADirectoryError) as e:
        raise FileNotFoundError(f"no file {url!r}: {e.strerror}") from e
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as e:
        raise StorageError(f"cannot read {url!r}: {e.strerror or e}") from e


@contextmanager
def input_errors(where: str, plan_digest: str | None = None) -> Iterator[None]:
    """Reading or decoding a task's stored input: what no retry or other node can mend (the object gone,
    unreadable, not an image) becomes an `InputError` starting with `where` (which input, by name and URL);
    storage being away stays a `StorageError`, which is retried."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(f"{where}: missing from storage (deleted after the job was submitted?)", plan_digest) from None
    except PermissionError:
        raise InputError(f"{where}: not readable (permission denied)", plan_digest) from None
    except PlanError as error:
        raise InputError(f"{where}: {error.problem}", plan_digest) from None
    except InvalidInput as error:
        raise InputError(f"{where}: {error}", plan_digest) from None
