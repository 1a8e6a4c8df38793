"""Uploads without storage credentials: a client asks where to PUT a plan or control image, then names the
returned URL in a job."""

from __future__ import annotations

import uuid
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Request

from producer import schemas
from producer.api.deps import farm
from shared.errors import ConfigError, InvalidInput
from shared.plans import safe_stem
from shared.spec import MAX_ECHO

router = APIRouter()
UPLOAD_SECONDS = 3600
UPLOAD_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")


@router.post("/uploads", status_code=201, response_model=schemas.Upload)
def upload(request: Request, body: schemas.UploadRequest) -> dict[str, Any]:
    """Where to PUT a plan or control image without storage credentials: a presigned PUT URL (valid
    `UPLOAD_SECONDS`) for exactly `size` bytes (the signature covers the Content-Length, so S3 itself refuses
    any other size), and the s3:// URL to name in a job. Each upload gets a folder of its own, holding the
    file under its own name, made safe: the plan keeps that name in keys, sheets and results."""
    client = farm(request)
    storage = client.storages.open()
    if not storage.presigns:
        raise ConfigError("uploads need the farm's storage on S3 (ARCHFARM_STORAGE_URL=s3://...)")
    name = PurePosixPath(body.name.replace("\\", "/")).name
    suffix = PurePosixPath(name).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise InvalidInput(f"name: {body.name[:MAX_ECHO]!r}: uploads take {', '.join(UPLOAD_SUFFIXES)} files")
    if body.size > client.settings.max_plan_bytes:
        raise InvalidInput(f"size: {body.size} bytes is over this farm's limit of {client.settings.max_plan_bytes}")
    key = f"uploads/{uuid.uuid4()}/{safe_stem(PurePosixPath(name).stem)}{suffix}"
    put = storage.presigned_url(key, UPLOAD_SECONDS, method="put_object", content_length=body.size)
    return {
        "url": storage.url(key),
        "upload_url": put,
        "method": "PUT",
        "size": body.size,
        "expires_in": UPLOAD_SECONDS,
    }
