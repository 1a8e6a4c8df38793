"""Storage backends: one behavioural suite run against a local folder and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.config import Config

from shared.config import Settings
from shared.errors import InvalidInput, StorageError
from shared.storage import (
    LocalStorage,
    S3Storage,
    Storage,
    Storages,
    open_storage,
    open_storage_from_settings,
)
from shared.storage.base import check_key
from tests.s3_server import S3Server, free_port

ALL_BYTES = bytes(range(256)) * 4

BAD_KEYS = [
    "../x",
    "/etc/passwd",
    "a/../../b",
    "a//b",
    "a\\b",
    "",
    "a/./b",
    "a/",
    "nul\x00byte",
    "tab\tkey",
    "x" * 1025,
    "é" * 513,  # 513 characters, 1026 bytes: over S3's limit
]


def short_id(value: str) -> str:
    return repr(value)[:24]


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    """Each backend, empty; the local root is a subfolder so that writes beside it would be noticed."""
    if request.param == "local":
        return LocalStorage(tmp_path / "root")
    server: S3Server = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, "renders/run-1", endpoint_url=server.endpoint_url, region=server.region)


def stored_anywhere(storage: Storage) -> list[str]:
    """Everything the backend holds, inside its root or prefix or not: proves a refused write left nothing."""
    if isinstance(storage, LocalStorage):
        return sorted(str(p) for p in storage.root.parent.rglob("*") if not p.is_dir())
    assert isinstance(storage, S3Storage)
    pages = storage.client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


# --- the contract, on both backends ---------------------------------------------------------------


def test_round_trip_keeps_every_byte(storage: Storage) -> None:
    storage.put("job-1/frame-0001.bin", ALL_BYTES)
    storage.put("job-1/empty.bin", b"")

    assert storage.get("job-1/frame-0001.bin") == ALL_BYTES
    assert storage.get("job-1/empty.bin") == b""


def test_files_stream_in_and_out_whole(storage: Storage, tmp_path: Path) -> None:
    """Checkpoints and models go by file (gigabytes), not through memory: the same bytes, the same contract."""
    source = tmp_path / "optimizer.bin"
    source.write_bytes(ALL_BYTES * 4096)  # 1 MiB
    storage.put("run/step-1/optimizer.bin", b"an older, shorter object")
    storage.put_file("run/step-1/optimizer.bin", source)
    assert storage.get("run/step-1/optimizer.bin") == source.read_bytes()
    storage.get_file("run/step-1/optimizer.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()
    assert storage.list("run/") == ["run/step-1/optimizer.bin"]
    with pytest.raises(FileNotFoundError):
        storage.get_file("run/missing.bin", tmp_path / "missing.bin")


def test_put_replaces_the_whole_object(storage: Storage) -> None:
    storage.put("plan.png", b"first version, longer")
    storage.put("plan.png", b"second")

    assert storage.get("plan.png") == b"second"
    assert storage.list() == ["plan.png"]


def test_exists_is_true_for_objects_only(storage: Storage) -> None:
    assert not storage.exists("job-1/a.png")
    storage.put("job-1/a.png", b"a")

    assert storage.exists("job-1/a.png")
    assert not storage.exists("job-1")  # a prefix of objects is not an object
    assert not storage.exists("job-1/b.png")


def test_list_is_sorted_relative_and_filters_by_string_prefix(storage: Storage) -> None:
    keys = ["job-2/d.png", "job-1/sub/b.png", "top.txt", "job-10/c.png", "job-1/a.png"]
    for key in keys:
        storage.put(key, key.encode())

    assert storage.list() == sorted(keys)
    assert storage.list("job-1/") == ["job-1/a.png", "job-1/sub/b.png"]
    assert storage.list("job-1") == ["job-1/a.png", "job-1/sub/b.png", "job-10/c.png"]
    assert storage.list("job-1/s") == ["job-1/sub/b.png"]
    assert storage.list("job-1/sub/b.png") == ["job-1/sub/b.png"]
    assert storage.list("nothing/") == []


def test_delete_removes_and_tolerates_missing(storage: Storage) -> None:
    storage.put("job-1/a.png", b"a")
    storage.put("job-1/b.png", b"b")

    storage.delete("job-1/a.png")
    storage.delete("job-1/a.png")
    storage.delete("never/was.png")
    storage.delete("job-1")  # a prefix, not an object: nothing to delete

    assert storage.list() == ["job-1/b.png"]


def test_get_of_missing_object_is_file_not_found(storage: Storage) -> None:
    storage.put("job-1/a.png", b"a")

    with pytest.raises(FileNotFoundError):
        storage.get("job-1/missing.png")
    with pytest.raises(FileNotFoundError):
        storage.get("job-1")


def test_url_names_the_object_and_reads_back(storage: Storage, s3_endpoint: str | None) -> None:
    storage.put("job 1/plan #1.png", b"png")
    url = storage.url("job 1/plan #1.png")

    if isinstance(storage, LocalStorage):
        assert url == (storage.root / "job 1" / "plan #1.png").as_uri()
        assert url.startswith("file:///")
    else:
        assert url == f"s3://{storage.bucket}/renders/run-1/job 1/plan #1.png"
    assert reader(s3_endpoint).read(url) == b"png"


@pytest.fixture
def s3_endpoint(request: pytest.FixtureRequest, storage: Storage) -> str | None:
    if isinstance(storage, S3Storage):
        return request.getfixturevalue("s3_server").endpoint_url
    return None


@pytest.mark.parametrize("key", BAD_KEYS, ids=short_id)
def test_bad_keys_are_refused_and_nothing_is_written(storage: Storage, key: str) -> None:
    for attempt in (
        lambda: storage.put(key, b"evil"),
        lambda: storage.get(key),
        lambda: storage.exists(key),
        lambda: storage.delete(key),
        lambda: storage.url(key),
    ):
        with pytest.raises(InvalidInput):
            attempt()

    assert stored_anywhere(storage) == []


@pytest.mark.parametrize("prefix", ["../", "/etc", "a//", "a/../"])
def test_bad_list_prefixes_are_refused(storage: Storage, prefix: str) -> None:
    with pytest.raises(InvalidInput):
        storage.list(prefix)


# --- key rules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["a", "job-1/frame 0001.png", "ü/ñ.txt", ".hidden", "a..b/c.", "x" * 1024])
def test_check_key_returns_good_keys_unchanged(key: str) -> None:
    assert check_key(key) == key


@pytest.mark.parametrize("key", BAD_KEYS, ids=short_id)
def test_check_key_names_the_bad_key(key: str) -> None:
    with pytest.raises(InvalidInput, match="invalid storage key") as caught:
        check_key(key)

    assert repr(key[:80])[1:-1] in str(caught.value)
    assert "\n" not in str(caught.value)


# --- local folder ---------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "root")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_bytes(b"secret")
    return folder


def test_local_symlinked_folder_leading_outside_is_not_followed(local: LocalStorage, outside: Path) -> None:
    local.root.mkdir()
    (local.root / "link").symlink_to(outside, target_is_directory=True)

    with pytest.raises(InvalidInput, match="outside"):
        local.put("link/new.txt", b"evil")
    with pytest.raises(InvalidInput):
        local.put("link/deeper/new.txt", b"evil")
    with pytest.raises(InvalidInput):
        local.get("link/secret.txt")

    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    assert local.list() == []


def test_local_symlinked_file_leading_outside_is_not_overwritten(local: LocalStorage, outside: Path) -> None:
    local.root.mkdir()
    (local.root / "plan.png").symlink_to(outside / "secret.txt")

    with pytest.raises(InvalidInput):
        local.put("plan.png", b"evil")

    assert (outside / "secret.txt").read_bytes() == b"secret"


def test_local_symlink_within_root_is_allowed(local: LocalStorage) -> None:
    (local.root / "real").mkdir(parents=True)
    (local.root / "alias").symlink_to(local.root / "real", target_is_directory=True)

    local.put("alias/a.txt", b"a")

    assert (local.root / "real" / "a.txt").read_bytes() == b"a"


def test_local_root_is_created_on_first_write_only(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "new" / "root")

    assert storage.list() == []
    assert not storage.exists("a")
    assert not (tmp_path / "new").exists()

    storage.put("a/b/c.txt", b"c")

    assert (tmp_path / "new" / "root" / "a" / "b" / "c.txt").read_bytes() == b"c"


def test_local_failed_write_keeps_old_object_and_leaves_no_temp_file(
    local: LocalStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    local.put("plan.png", b"old")

    def disk_full(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(StorageError, match="No space left"):
        local.put("plan.png", b"new")

    assert local.get("plan.png") == b"old"
    assert sorted(p.name for p in local.root.iterdir()) == ["plan.png"]


def test_local_in_flight_temp_files_are_hidden_and_reserved(local: LocalStorage) -> None:
    local.put("a.txt", b"a")
    (local.root / ".archfarm-partial-0123456789abcdef").write_bytes(b"half")

    assert local.list() == ["a.txt"]
    with pytest.raises(InvalidInput, match="reserved"):
        local.put(".archfarm-partial-x", b"x")


# --- S3 -------------------------------------------------------------------------------------------


def _s3(server: S3Server, bucket: str, client: Any = None) -> S3Storage:
    return S3Storage(bucket, "renders", endpoint_url=server.endpoint_url, region=server.region, client=client)


@pytest.mark.s3
def test_s3_keeps_the_content_type(s3_server: S3Server, s3_bucket: str) -> None:
    storage = _s3(s3_server, s3_bucket)
    storage.put("plan.png", b"png", content_type="image/png")

    head = s3_server.client().head_object(Bucket=s3_bucket, Key="renders/plan.png")
    assert head["ContentType"] == "image/png"


@pytest.mark.s3
def test_s3_lists_only_its_prefix(s3_server: S3Server, s3_bucket: str) -> None:
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="renders-old/a.png", Body=b"")
    client.put_object(Bucket=s3_bucket, Key="elsewhere/b.png", Body=b"")
    storage = _s3(s3_server, s3_bucket)
    storage.put("c.png", b"c")

    assert storage.list() == ["c.png"]


@pytest.mark.s3
def test_s3_list_reads_every_page(s3_server: S3Server, s3_bucket: str) -> None:
    """Pages of one key each stand in for S3's 1000-key pages, which would take thousands of puts."""
    client = s3_server.client()
    pages_served = []

    def small_pages(name: str) -> Any:
        paginator = client.get_paginator(name)

        def paginate(**kwargs: Any) -> Any:
            for page in paginator.paginate(PaginationConfig={"PageSize": 1}, **kwargs):
                pages_served.append(page)
                yield page

        return SimpleNamespace(paginate=paginate)

    storage = S3Storage(s3_bucket, "renders", client=SimpleNamespace(get_paginator=small_pages))
    keys = [f"k{i}" for i in range(5)]
    for key in keys:
        client.put_object(Bucket=s3_bucket, Key=f"renders/{key}", Body=b"")

    assert storage.list() == keys
    assert len(pages_served) >= len(keys)


@pytest.mark.s3
def test_s3_missing_bucket_is_a_storage_error_not_a_missing_object(s3_server: S3Server) -> None:
    storage = _s3(s3_server, "no-such-bucket-here")

    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.get("a.png")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        storage.put("a.png", b"a")


@pytest.mark.s3
def test_s3_wrong_credentials_are_a_storage_error(s3_server: S3Server, s3_bucket: str) -> None:
    _s3(s3_server, s3_bucket).put("a.png", b"a")
    impostor = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="not-the-secret",
    )
    storage = _s3(s3_server, s3_bucket, impostor)

    for attempt in (
        lambda: storage.put("b.png", b"b"),
        lambda: storage.get("a.png"),
        lambda: storage.exists("a.png"),
        lambda: storage.list(),
    ):
        with pytest.raises(StorageError) as caught:
            attempt()
        assert "\n" not in str(caught.value)


@pytest.mark.s3
def test_s3_server_not_listening_is_a_quick_storage_error() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    client = boto3.client(
        "s3",
        endpoint_url=dead,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
        config=Config(connect_timeout=1, read_timeout=1, retries={"mode": "standard", "total_max_attempts": 1}),
    )
    storage = S3Storage("some-bucket", client=client)
    attempts: list[object] = []
    client.meta.events.register("before-send", lambda **_: attempts.append(1))

    with pytest.raises(StorageError, match="Could not connect"):
        storage.get("a.png")
    assert len(attempts) == 1  # refused once, reported at once: no retry loop of archfarm's own on top


@pytest.mark.s3
def test_s3_presigned_url_serves_the_object_and_refuses_tampering(s3_server: S3Server, s3_bucket: str) -> None:
    storage = _s3(s3_server, s3_bucket)
    storage.put("job 1/frame.png", ALL_BYTES)
    storage.put("job 1/other.png", b"other")
    url = storage.presigned_url("job 1/frame.png", expires=60)

    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == ALL_BYTES

    signature = url.rpartition("X-Amz-Signature=")[2]
    forged_signature = url.replace(signature, ("0" if signature[0] != "0" else "1") + signature[1:])
    other_object = url.replace("frame.png", "other.png")
    for tampered in (forged_signature, other_object):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(tampered, timeout=5)
        assert caught.value.code == 403


@pytest.mark.s3
def test_s3_presigned_url_is_signed_for_the_public_endpoint(s3_server: S3Server, s3_bucket: str) -> None:
    """The same server under another host name: the link works only because it was signed for that host."""
    public = s3_server.endpoint_url.replace("//127.0.0.1:", "//localhost:")
    assert public != s3_server.endpoint_url
    storage = S3Storage(
        s3_bucket, "renders", endpoint_url=s3_server.endpoint_url, region=s3_server.region, public_endpoint_url=public
    )
    storage.put("frame.png", ALL_BYTES)

    url = storage.presigned_url("frame.png", expires=60)

    assert url.startswith(f"{public}/{s3_bucket}/renders/frame.png?")
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == ALL_BYTES
    # Rewriting the host after signing, instead of signing for it, voids the signature.
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(url.replace(public, s3_server.endpoint_url, 1), timeout=5)
    assert caught.value.code == 403


def test_s3_presigned_url_lifetime_is_bounded() -> None:
    storage = S3Storage("some-bucket", endpoint_url="http://127.0.0.1:9", region="us-east-1")

    with pytest.raises(InvalidInput):
        storage.presigned_url("a.png", expires=0)
    with pytest.raises(InvalidInput):
        storage.presigned_url("a.png", expires=8 * 24 * 3600)


def test_s3_client_retries_and_uses_path_style_for_custom_endpoints() -> None:
    custom = S3Storage("some-bucket", endpoint_url="http://127.0.0.1:9", region="eu-west-1").client
    aws = S3Storage("some-bucket", region="eu-west-1").client

    assert custom.meta.endpoint_url == "http://127.0.0.1:9"
    assert custom.meta.region_name == "eu-west-1"
    assert custom.meta.config.s3 == {"addressing_style": "path"}
    assert custom.meta.config.retries["mode"] == "standard"
    assert custom.meta.config.signature_version == "s3v4"
    assert not (aws.meta.config.s3 or {}).get("addressing_style")


# --- choosing a backend by URL --------------------------------------------------------------------


def test_plain_paths_open_local_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    relative = open_storage("renders")
    absolute = open_storage(str(tmp_path / "out"))

    assert isinstance(relative, LocalStorage) and relative.root == tmp_path / "renders"
    assert isinstance(absolute, LocalStorage) and absolute.root == tmp_path / "out"


def test_file_urls_open_local_folders(tmp_path: Path) -> None:
    folder = tmp_path / "with space"

    for url in (folder.as_uri(), "file://localhost" + folder.as_uri().removeprefix("file://")):
        storage = open_storage(url)
        assert isinstance(storage, LocalStorage) and storage.root == folder


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        ("s3://renders", ""),
        ("s3://renders/", ""),
        ("s3://renders/a/b", "a/b/"),
        ("s3://renders/a/b/", "a/b/"),
    ],
)
def test_s3_urls_open_bucket_prefixes(url: str, prefix: str) -> None:
    storage = open_storage(url, endpoint_url="http://127.0.0.1:9", region="eu-west-1")

    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == ("renders", prefix)
    assert storage.url("k.png") == f"s3://renders/{prefix}k.png"
    assert storage.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert storage.client.meta.region_name == "eu-west-1"


BAD_URLS = [
    "",
    "http://example.com/renders",
    "https://bucket.s3.amazonaws.com/x",
    "ftp://host/renders",
    "s3://",
    "s3:///key",
    "s3:bucket/key",
    "s3://Bad_Bucket/x",
    "s3://ab/x",
    "s3://user@bucket/x",
    "s3://bucket:9000/x",
    "s3://bucket//x",
    "s3://bucket/../x",
    "file://host/srv/renders",
    "file:relative",
    "file:///srv/a?b",
    "file:///srv/a#b",
    "renders\x00",
]


@pytest.mark.parametrize("url", BAD_URLS, ids=short_id)
def test_bad_urls_are_invalid_input(url: str) -> None:
    with pytest.raises(InvalidInput):
        open_storage(url)
    with pytest.raises(InvalidInput):
        reader().read(url)


def test_storage_from_settings(tmp_path: Path) -> None:
    settings = Settings(
        storage_url="s3://renders/p",
        s3_endpoint_url="http://127.0.0.1:9",
        s3_public_endpoint_url="http://farm.example:9",
        s3_region="eu-west-1",
    )

    default = open_storage_from_settings(settings)
    other = open_storage_from_settings(settings, str(tmp_path))

    assert isinstance(default, S3Storage) and default.url("k") == "s3://renders/p/k"
    assert default.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert default.client.meta.region_name == "eu-west-1"
    assert default.presigned_url("k").startswith("http://farm.example:9/renders/p/k?")
    assert isinstance(other, LocalStorage) and other.root == tmp_path


def test_reading_reads_one_local_file(tmp_path: Path) -> None:
    plan = tmp_path / "plan #1.png"
    plan.write_bytes(ALL_BYTES)

    assert reader().read(str(plan)) == ALL_BYTES
    assert reader().read(plan.as_uri()) == ALL_BYTES
    for missing in (str(tmp_path / "nope.png"), (tmp_path / "nope.png").as_uri()):
        with pytest.raises(FileNotFoundError):
            reader().read(missing)


@pytest.mark.parametrize("url", ["s3://renders", "s3://renders/", "s3://renders/dir/", "s3://renders/a//b"])
def test_reading_needs_an_object_key(url: str) -> None:
    with pytest.raises(InvalidInput):
        reader("http://127.0.0.1:9").read(url)


@pytest.mark.s3
def test_reading_reads_one_s3_object_with_credentials_from_the_environment(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="plans/plan.png", Body=ALL_BYTES)

    assert reader(s3_server.endpoint_url).read(f"s3://{s3_bucket}/plans/plan.png") == ALL_BYTES
    with pytest.raises(FileNotFoundError):
        reader(s3_server.endpoint_url).read(f"s3://{s3_bucket}/plans/missing.png")


@pytest.mark.s3
def test_new_clients_sign_with_the_credentials_the_environment_names_now(
    s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-lived process whose keys change (rotated, or another endpoint's) must not keep signing with
    the first ones it saw, as boto3's default session would."""
    s3_server.client().put_object(Bucket=s3_bucket, Key="plans/plan.png", Body=b"plan")
    url = f"s3://{s3_bucket}/plans/plan.png"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "an-old-secret")
    with pytest.raises(StorageError):
        reader(s3_server.endpoint_url).read(url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    assert reader(s3_server.endpoint_url).read(url) == b"plan"


def test_reading_refuses_devices_and_folders(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a regular file"):
        reader().read("/dev/zero")
    with pytest.raises(InvalidInput, match="not a regular file"):
        reader().read(str(tmp_path))


def reader(endpoint_url: str | None = None) -> Storages:
    """A process's storages, reading from the S3 endpoint given."""
    return Storages(Settings(s3_endpoint_url=endpoint_url))
