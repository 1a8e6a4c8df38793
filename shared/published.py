"""Models published to storage, named by URL (`model: s3://bucket/prefix`): the on-storage format.

A published model is a diffusers model folder's files under a URL prefix (`s3://`, `file:///` or a plain path),
plus `archfarm-model.json`, written last: `{"format": 1, "files": {"relative/path": "sha256hex", ...}}`. The
manifest's own sha256 names one version of the model: submit pins it into the job, and each worker fetches
that version once into its model cache, every file checked against the manifest, as plans are checked
against their content hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any

from shared.config import Settings
from shared.errors import InvalidInput, ModelError
from shared.folders import built_once
from shared.storage import Storage, open_storage_from_settings
from shared.storage.base import check_key

MANIFEST = "archfarm-model.json"
FORMAT = 1
FOLDER_PREFIX = "published-"
"""A fetched model's folder in the model cache: `published-<manifest sha256>`, so each version is its own."""
_SHA256_HEX = frozenset("0123456789abcdef")


def publish(folder: Path, url: str, settings: Settings, licence: str | None = None) -> str:
    """Upload the model in `folder` under `url`, the manifest last; the manifest's sha256 (the version's name).
    `licence` (a `shared.licences.LICENCES` key) is declared in the manifest, so every job using the model is
    checked against it.

    An earlier manifest there is deleted first, so a model half replaced is never taken for a whole one.
    Hidden files (the `.cache/` that `hf download --local-dir` leaves) are not part of the model."""
    storage = _open(url, settings)
    names = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    names = [name for name in names if name != MANIFEST and not _hidden(name)]
    if not names:
        raise InvalidInput(f"{folder}: no model files to publish")
    storage.delete(MANIFEST)
    hashes: dict[str, str] = {}
    for name in names:
        storage.put_file(name, folder / name)
        hashes[name] = _file_sha256(folder / name)
    declaration = {} if licence is None else {"licence": licence}
    manifest = json.dumps({"format": FORMAT, "files": hashes, **declaration}, sort_keys=True, indent=1).encode()
    storage.put(MANIFEST, manifest, "application/json")
    return _sha256(manifest)


def manifest_digest(url: str, settings: Settings) -> str:
    """The sha256 of the manifest now under `url`, checked; InvalidInput when there is no published model."""
    try:
        raw, _ = _manifest(_open(url, settings), url)
    except ModelError as error:
        raise InvalidInput(str(error)) from None
    return _sha256(raw)


def declaration(url: str, settings: Settings) -> dict[str, Any]:
    """The manifest now under `url`, as JSON (its `licence`, if any, is what the model declares)."""
    try:
        raw, _ = _manifest(_open(url, settings), url)
    except ModelError as error:
        raise InvalidInput(str(error)) from None
    found: dict[str, Any] = json.loads(raw)
    return found


def local_declaration(folder: Path) -> dict[str, Any] | None:
    """A model folder's own `archfarm-model.json` as JSON (a fetched published model holds its manifest; a
    studio's folder may hold just `{"licence": KEY}`); None when it has none or it is not a JSON object."""
    try:
        found = json.loads((folder / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return found if isinstance(found, dict) else None


def fetch(url: str, models_dir: Path, settings: Settings, expected: str | None) -> Path:
    """The model published at `url` as a local folder in `models_dir`, downloaded on first use only.

    `expected` is the manifest sha256 the job was submitted with: a model published again since fails the task
    for good rather than render with other weights. Every file is checked against the manifest in a staging
    folder, then the folder is renamed into place, so a reader never sees a half-fetched or damaged model;
    processes racing to fetch the same version each stage their own copy, and the loser drops it."""
    if expected is not None and (cached := models_dir / f"{FOLDER_PREFIX}{expected}").is_dir():
        return cached
    try:
        storage = _open(url, settings)
    except InvalidInput as error:
        raise ModelError(str(error)) from None
    raw, files = _manifest(storage, url)
    digest = _sha256(raw)
    if expected is not None and digest != expected:
        raise ModelError(
            f"the model at {url} changed after the job was submitted (manifest sha256 {digest[:12]}…, the job "
            f"pins {expected[:12]}…)"
        )

    def download(staging: Path) -> None:
        for name, want in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _get_file(storage, url, name, path)
            if _file_sha256(path) != want:
                raise ModelError(
                    f"{url}: {name} does not match its sha256 in {MANIFEST} (damaged, or published again meanwhile)"
                )
        (staging / MANIFEST).write_bytes(raw)  # what the version declares (its licence) travels with it

    return built_once(models_dir / f"{FOLDER_PREFIX}{digest}", download)


def digest_of(folder: Path) -> str | None:
    """The manifest sha256 a fetched folder holds the version of; None for any other folder."""
    digest = folder.name.removeprefix(FOLDER_PREFIX)
    return digest if folder.name.startswith(FOLDER_PREFIX) and _is_sha256(digest) else None


def _open(url: str, settings: Settings) -> Storage:
    return open_storage_from_settings(settings, url)


def _manifest(storage: Storage, url: str) -> tuple[bytes, dict[str, str]]:
    """The manifest's bytes and its files (path → sha256), each path checked; ModelError saying what is wrong."""
    raw = _get(storage, url, MANIFEST, f"no {MANIFEST} under {url}: not a published model")
    try:
        data: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelError(f"{url}: {MANIFEST} is not JSON ({error})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(files, dict) or not files:
        raise ModelError(f"{url}: {MANIFEST} is not a format {FORMAT} manifest with a non-empty `files` mapping")
    folders = {str(parent) for name in files for parent in PurePosixPath(name).parents}
    for name, digest in files.items():  # JSON keys: always strings
        if not _safe_name(name) or name in folders:
            raise ModelError(f"{url}: {MANIFEST} names an unsafe path {name[:80]!r}")
        if not isinstance(digest, str) or not _is_sha256(digest):
            raise ModelError(f"{url}: {MANIFEST} gives {name!r} no sha256")
    return raw, files


def _safe_name(name: str) -> bool:
    """A relative path that stays inside the model's folder: no `..`, no absolute path, no hidden or reserved name."""
    if name == MANIFEST or _hidden(name):
        return False
    try:
        check_key(name)
    except InvalidInput:
        return False
    return True


def _get(storage: Storage, url: str, name: str, missing: str | None = None) -> bytes:
    try:
        return storage.get(name)
    except FileNotFoundError:
        raise ModelError(missing or f"{url}: {name}, listed in its {MANIFEST}, is missing") from None
    except InvalidInput as error:  # a local folder's symlink leading out of it
        raise ModelError(f"{url}: {error}") from None


def _get_file(storage: Storage, url: str, name: str, path: Path) -> None:
    try:
        storage.get_file(name, path)
    except FileNotFoundError:
        raise ModelError(f"{url}: {name}, listed in its {MANIFEST}, is missing") from None
    except InvalidInput as error:  # a local folder's symlink leading out of it
        raise ModelError(f"{url}: {error}") from None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in name.split("/"))


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and set(text) <= _SHA256_HEX


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
