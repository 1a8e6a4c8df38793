"""What a remote caller's job may point at: the REST API's rule for every kind of job, read from the references
its spec declares (`shared.spec.References`), so a new kind or field is covered by declaring what it points at.

A remote caller must not make the farm read or write its own files or reach its own network: storage URLs
(plans, control images, datasets, published models, outputs) only under the allowed S3 prefixes, notification
URLs only under the allowed ones, model folders only as absolute paths under the allowed roots (a relative one
would be read from wherever the process runs). Pure: nothing is looked up, so an answer says nothing about what
exists, and a refusal names no folder of this machine.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath
from urllib.parse import unquote

from shared.config import Settings
from shared.errors import InvalidInput
from shared.kinds import Spec
from shared.registry import is_path, is_url
from shared.spec import MAX_ECHO


def check_remote(spec: Spec, settings: Settings) -> None:
    """Refuse a spec that points where a remote caller may not; InvalidInput names the field."""
    found = spec.references()
    prefixes = settings.api_storage_prefixes or _bucket_of(settings.storage_url)
    allowed = f"the API takes s3:// URLs under {', '.join(prefixes) or 'nothing (the farm storage is not S3)'}"
    for field, url in found.urls + [(field, ref) for field, ref in found.models if is_url(ref)]:
        if not any(within(url, prefix) for prefix in prefixes):
            raise InvalidInput(f"{field}: {url[:MAX_ECHO]!r}: {allowed}")
    hooks = settings.api_notify_prefixes
    for field, url in found.hooks:
        if not any(within(url, prefix) for prefix in hooks):
            allowed = ", ".join(hooks) or "nothing (ARCHFARM_API_NOTIFY_PREFIXES)"
            raise InvalidInput(f"{field}: {url[:MAX_ECHO]!r}: the API takes notification URLs under {allowed}")
    roots = [PurePosixPath(os.path.normpath(root)) for root in settings.api_model_roots]
    for field, ref in found.models:
        folder = PurePosixPath(os.path.normpath(ref))
        if is_path(ref) and not (folder.is_absolute() and any(folder.is_relative_to(root) for root in roots)):
            raise InvalidInput(
                f"{field}: the API takes a model folder only as an absolute path under the farm's model roots "
                "(ARCHFARM_API_MODEL_ROOTS); use a preset or a hub id"
            )


def within(url: str, prefix: str) -> bool:
    """Whether `url` lies under `prefix` by whole path segments, as written (`s3://farm/in` admits
    `s3://farm/in/a.png`, never `s3://farm/inbox/a.png` nor `s3://farm/in?/a.png`), with no `.` or `..`
    segment, encoded or not, to climb out of it. The scheme and the host are compared in any case, as they
    mean the same in any case."""
    base = prefix.rstrip("/").split("/")
    parts = url.split("/")
    for segments in (base, parts):
        segments[:3] = [segment.lower() for segment in segments[:3]]  # `scheme:`, ``, `host`
    return parts[: len(base)] == base and not {".", ".."} & {unquote(part) for part in parts}


def _bucket_of(url: str) -> list[str]:
    """`s3://bucket/` of an S3 storage URL; nothing for a local one."""
    return [f"s3://{url.removeprefix('s3://').split('/', 1)[0]}/"] if url.startswith("s3://") else []
