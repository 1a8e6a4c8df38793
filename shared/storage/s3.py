"""Storage in an S3 bucket (AWS, or MinIO, SeaweedFS, Ceph, R2 via `endpoint_url`) for distributed runs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import closing, contextmanager
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from shared.errors import InvalidInput, StorageError
from shared.storage.base import check_key, check_prefix

_MISSING = {"NoSuchKey", "404", "NotFound"}
"""Error codes for an absent object: GET says NoSuchKey, HEAD has no body and says only 404."""

MAX_PRESIGN_SECONDS = 7 * 24 * 3600
"""SigV4 refuses presigned URLs valid for longer than a week."""


def make_client(endpoint_url: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client that retries throttling and transient faults, credentials from the AWS chain.

    Non-AWS servers get path-style addressing (`host/bucket/key`), since they rarely have per-bucket DNS.
    SigV4 is explicit because botocore may otherwise presign with SigV2, which many servers refuse.
    """
    config = Config(
        signature_version="s3v4",
        retries={"mode": "standard"},
        s3={"addressing_style": "path"} if endpoint_url else None,
    )
    return _session().client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
)


def _session() -> boto3.session.Session:
    """A boto3 session for the credentials the environment names now.

    boto3's default session resolves credentials once and keeps them for the life of the process; a
    process whose environment changes (new keys for another endpoint, rotated keys) would go on signing
    with the old ones. Sessions are kept per set of variables: making one costs ~150 ms, a client ~7 ms."""
    return _session_for(tuple(os.environ.get(name) for name in _CREDENTIAL_VARIABLES))


@lru_cache(maxsize=8)
def _session_for(_credentials: tuple[str | None, ...]) -> boto3.session.Session:
    return boto3.session.Session()


class S3Storage:
    """Objects are `prefix/key` in `bucket`; pass `client` to reuse one or to tune timeouts.

    `public_endpoint_url` is the endpoint that presigned URLs name, for clients that reach the server at
    another address than this process does (a port published from a container network, a proxy).
    """

    presigns = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        public_endpoint_url: str | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise InvalidInput(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.removesuffix("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.client = client if client is not None else make_client(endpoint_url, region)
        self.public_endpoint_url = public_endpoint_url or None

    @cached_property
    def _presigner(self) -> Any:
        """The client that signs presigned URLs. SigV4 signs the Host header, so a URL for the public endpoint
        must be signed for that host: rewriting the host of a URL signed for another one voids it."""
        if self.public_endpoint_url is None:
            return self.client
        return make_client(self.public_endpoint_url, self.client.meta.region_name)

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    @contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turn botocore's exceptions into archfarm's: missing → FileNotFoundError, else StorageError."""
        where = f"s3://{self.bucket}/{self.prefix}{key}"
        try:
            yield
        except ClientError as e:
            error = e.response.get("Error", {})
            code = error.get("Code", "")
            if code in _MISSING:
                raise FileNotFoundError(f"no object {where}") from e
            detail = error.get("Message") or e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise StorageError(f"S3 {action} {where} failed: {code}: {detail}") from e
        except BotoCoreError as e:  # includes EndpointConnectionError, timeouts, missing credentials
            raise StorageError(f"S3 {action} {where} failed: {e}") from e

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """One PutObject: S3 replaces objects whole, so readers never see a partial write."""
        name = self._key(key)
        with self._errors("put", key):
            self.client.put_object(Bucket=self.bucket, Key=name, Body=data, ContentType=content_type)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        """boto3's managed transfer: multipart past its threshold, so a 5 GB object needs no 5 GB of memory."""
        name = self._key(key)
        with self._errors("put", key):
            self.client.upload_file(str(path), self.bucket, name, ExtraArgs={"ContentType": content_type})

    def get_file(self, key: str, path: Path) -> None:
        name = self._key(key)
        with self._errors("get", key):
            self.client.download_file(self.bucket, name, str(path))

    def get(self, key: str, limit: int | None = None) -> bytes:
        """The object's bytes; with `limit`, an object larger than that is refused (InvalidInput) by the size S3
        states, and its body is never read past the limit, whatever the size said."""
        name = self._key(key)
        with self._errors("get", key):
            # The body is read inside too: a dropped connection mid-stream is a storage failure as well.
            answer = self.client.get_object(Bucket=self.bucket, Key=name)
            with closing(answer["Body"]) as body:
                if limit is None:
                    return bytes(body.read())
                too_big = answer["ContentLength"] > limit
                data = b"" if too_big else bytes(body.read(limit + 1))
        if too_big or len(data) > limit:
            raise InvalidInput(f"s3://{self.bucket}/{name}: larger than the limit of {limit} bytes")
        return data

    def exists(self, key: str) -> bool:
        name = self._key(key)
        try:
            with self._errors("head", key):
                self.client.head_object(Bucket=self.bucket, Key=name)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> list[str]:
        """All matching keys, page by page: one ListObjectsV2 call returns at most 1000."""
        full = self.prefix + check_prefix(prefix)
        keys: list[str] = []
        with self._errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                keys += [item["Key"].removeprefix(self.prefix) for item in page.get("Contents", [])]
        return sorted(keys)

    def delete(self, key: str) -> None:
        """S3 answers a delete of a missing key with success too, so no existence check is needed."""
        name = self._key(key)
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=name)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def presigned_url(
        self, key: str, expires: int = 3600, method: str = "get_object", content_length: int | None = None
    ) -> str:
        """An HTTP URL that lets anyone holding it GET the object (or, with `method="put_object"`, PUT it) for
        `expires` seconds, without credentials. A PUT's `content_length` is signed: S3 refuses a body of any
        other size.

        Signing is local: it neither checks that the object exists nor contacts the server. The URL names
        `public_endpoint_url` where one is set.
        """
        if not 1 <= expires <= MAX_PRESIGN_SECONDS:
            raise InvalidInput(f"presigned URL lifetime must be 1..{MAX_PRESIGN_SECONDS} s, not {expires}")
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key)}
        if content_length is not None:
            params["ContentLength"] = content_length
        with self._errors("presign", key):
            return self._presigner.generate_presigned_url(method, Params=params, ExpiresIn=expires)
