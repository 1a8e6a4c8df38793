"""Storage in a local folder: the embedded default, and a shared mount when workers share a filesystem."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from shared.errors import ConfigError, InvalidInput, StorageError
from shared.storage.base import check_key, check_prefix

_PARTIAL = ".archfarm-partial-"
"""Name start of in-flight temp files: `list` hides them, so a crashed writer never shows up as a key."""
_CHUNK = 8 << 20


class LocalStorage:
    """Objects are files under `root`; keys are their paths relative to it.

    A key cannot be both an object and a prefix of others here (`a` and `a/b`), unlike on S3.
    """

    presigns = False

    def __init__(self, root: Path) -> None:
        # Resolved once so that a later chdir or a symlinked root cannot move where keys land.
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        """The file for `key`, with every symlink resolved, refused if that lands outside root."""
        check_key(key)
        if key.rpartition("/")[2].startswith(_PARTIAL):
            raise InvalidInput(f"invalid storage key {key!r}: names starting {_PARTIAL!r} are reserved")
        try:
            path = (self.root / key).resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop, before Python 3.13
            raise InvalidInput(f"storage key {key!r} cannot be resolved under {self.root}: {e}") from e
        if not path.is_relative_to(self.root):
            raise InvalidInput(f"storage key {key!r} leads outside {self.root} through a symlink")
        return path

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Write to a temp file beside the target, then rename over it, so readers see old or new, whole.

        `content_type` is not stored: a file has nowhere to keep it, and servers infer it from the name.
        """
        self._replace(key, lambda f: f.write(data))

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        with path.open("rb") as source:
            self._replace(key, lambda f: shutil.copyfileobj(source, f, _CHUNK))

    def _replace(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        path = self._path(key)
        tmp = path.parent / f"{_PARTIAL}{secrets.token_hex(8)}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Not NamedTemporaryFile: its 0600 mode would stick to the result; this honours the umask.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"cannot write {self.url(key)}: {e.strerror or e}") from e

    def get_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        try:
            shutil.copyfile(source, path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            if source.is_file():  # the target's folder is missing: not the object
                raise StorageError(f"cannot write {path}: {e.strerror or e}") from e
            raise FileNotFoundError(f"no object {self.url(key)}") from e
        except OSError as e:
            raise StorageError(f"cannot read {self.url(key)}: {e.strerror or e}") from e

    def get(self, key: str, limit: int | None = None) -> bytes:
        path = self._path(key)
        try:
            if limit is not None and path.stat().st_size > limit:
                raise InvalidInput(f"{self.url(key)}: {path.stat().st_size} bytes is over the limit of {limit}")
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
            raise FileNotFoundError(f"no object {self.url(key)}") from e
        except OSError as e:
            raise StorageError(f"cannot read {self.url(key)}: {e.strerror or e}") from e

    def presigned_url(
        self, key: str, expires: int = 3600, method: str = "get_object", content_length: int | None = None
    ) -> str:
        raise ConfigError(f"{self.url(key)}: a local folder cannot sign links; a farm whose storage is S3 can")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        check_prefix(prefix)
        keys: list[str] = []
        # os.walk does not follow symlinked folders, so listing cannot wander outside root either.
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            here = "" if rel == "." else rel + "/"
            # Descend only into folders that can hold matches: those the prefix runs into or through.
            dirnames[:] = [d for d in dirnames if _overlaps(here + d + "/", prefix)]
            keys += [here + f for f in filenames if not f.startswith(_PARTIAL)]
        return sorted(k for k in keys if k.startswith(prefix))

    def delete(self, key: str) -> None:
        # Empty parent folders are left: removing them could race with a concurrent put into them.
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except NotADirectoryError:
            return
        except OSError as e:
            if path.is_dir():  # a folder is not an object, so there was nothing to delete
                return
            raise StorageError(f"cannot delete {self.url(key)}: {e.strerror or e}") from e

    def url(self, key: str) -> str:
        return (self.root / check_key(key)).as_uri()


def _overlaps(folder: str, prefix: str) -> bool:
    return folder.startswith(prefix) or prefix.startswith(folder)
