"""Hostile and mutated job files through `archfarm submit --json`: a clean one-line refusal with nothing
stored, or a valid job stored once. Never a traceback, a hang, or a row left by a refused job.

Three generators: structured mutations of a valid job (any field replaced by hostile values, keys added and
dropped, deep nesting, YAML aliases), byte-level mutations of a valid job file, and plan images that are
corrupt, truncated, lying about their size, or not files at all (symlink loops, devices, FIFOs, folders).
`ARCHFARM_CHAOS=long` runs 1,000 examples of each instead of the CI's short form.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from sqlalchemy import func, select
from typer.testing import CliRunner

from producer.cli import app
from shared.db.models import Job, Task
from shared.db.session import make_engine
from tests.chaos.modes import LONG

pytestmark = [pytest.mark.redis, pytest.mark.slow]

EXAMPLES = 1000 if LONG else 60
PER_EXAMPLE_S = 60
FAST = {"base": "tiny-sd15", "width": 64, "height": 64, "steps": 2, "controls": [{"kind": "canny"}]}

HOSTILE_TEXT = [
    "",
    " ",
    "../../../etc/passwd",
    "/etc/shadow",
    "/dev/zero",
    "/dev/null",
    "/proc/self/mem",
    "file:///proc/self/environ",
    "file://remote-host/share/x.png",
    "s3://",
    "s3://b",
    "s3://Bad_Bucket/x.png",
    "s3://bucket",
    "http://169.254.169.254/latest/meta-data",
    "ftp://x/y.png",
    "C:\\plans\\x.png",
    "~root/x.png",
    "a\x00b",
    "%2e%2e%2f",
    "\n\r\t",
    "💥" * 50,
    "x" * 5000,
    "name with spaces",
    "-rf",
    "${HOME}",
    "{{7*7}}",
    "modern",
    "tiny",
    "tiny-sd15",
    "sd15",
    "someone/model",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(HOSTILE_TEXT)
    | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

FIELDS = [
    ("name",),
    ("priority",),
    ("plans",),
    ("plans", 0),
    ("styles",),
    ("styles", 0),
    ("seeds",),
    ("seeds", 0),
    ("profile",),
    ("profile", "base"),
    ("profile", "vae"),
    ("profile", "steps"),
    ("profile", "width"),
    ("profile", "height"),
    ("profile", "guidance_scale"),
    ("profile", "seeds_per_task"),
    ("profile", "scheduler"),
    ("profile", "compile"),
    ("profile", "quantize"),
    ("profile", "controls"),
    ("profile", "controls", 0),
    ("profile", "controls", 0, "kind"),
    ("profile", "controls", 0, "model"),
    ("profile", "controls", 0, "scale"),
    ("profile", "controls", 0, "start"),
    ("profile", "controls", 0, "image"),
    ("profile", "controls", 0, "depth_model"),
    ("output",),
    ("unknown_key",),
]


def valid_job(plan: Path) -> dict[str, Any]:
    return {
        "name": "fuzz",
        "priority": 50,
        "plans": [str(plan)],
        "styles": ["modern"],
        "seeds": [1, 2],
        "profile": json.loads(json.dumps(FAST)),
    }


def set_path(document: Any, path: tuple[Any, ...], value: Any) -> None:
    """Replace (or add) the value at `path`, quietly doing nothing where the path no longer exists."""
    for step in path[:-1]:
        try:
            document = document[step]
        except (KeyError, IndexError, TypeError):
            return
    try:
        if value is _DELETE:
            del document[path[-1]]
        else:
            document[path[-1]] = value
    except (KeyError, IndexError, TypeError):
        return


_DELETE = object()
edits = st.lists(st.tuples(st.sampled_from(FIELDS), values | st.just(_DELETE)), min_size=1, max_size=4)


@pytest.fixture(scope="module")
def submit_env(tmp_path_factory: pytest.TempPathFactory, redis_url: str, models_dir: Path) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("fuzz")
    queue = f"archfarm-fuzz-{uuid.uuid4().hex[:8]}"
    env = {
        "ARCHFARM_DATABASE_URL": f"sqlite:///{folder / 'fuzz.db'}",
        "ARCHFARM_BROKER_URL": redis_url,
        "ARCHFARM_QUEUE": queue,
        "ARCHFARM_STORAGE_URL": str(folder / "store"),
        "ARCHFARM_MODELS_DIR": str(models_dir),
        "HF_HUB_OFFLINE": "1",
    }
    yield env
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{queue}*"):
        client.delete(key)


def rows(env: dict[str, str]) -> tuple[int, int]:
    engine = make_engine(env["ARCHFARM_DATABASE_URL"])
    try:
        with engine.connect() as connection:
            jobs = connection.scalar(select(func.count()).select_from(Job)) or 0
            tasks = connection.scalar(select(func.count()).select_from(Task)) or 0
    except Exception:  # noqa: BLE001 - no schema yet: nothing stored
        return 0, 0
    finally:
        engine.dispose()
    return int(jobs), int(tasks)


def alarm(_signum: int, _frame: object) -> None:
    raise TimeoutError(f"an example ran longer than {PER_EXAMPLE_S} s: a hang")


def submit_and_check(env: dict[str, str], job_file: Path) -> None:
    """The one property: a valid job stored once, or one clean line and nothing stored."""
    before = rows(env)
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(PER_EXAMPLE_S)
    try:
        result = CliRunner().invoke(app, ["submit", str(job_file), "--json"], env=env)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback for {job_file.read_bytes()[:500]!r}") from result.exception
    assert "Traceback" not in result.output
    after = rows(env)
    if result.exit_code == 0:
        assert json.loads(result.stdout)["status"] == "queued"
        assert after[0] == before[0] + 1 and after[1] > before[1]
        assert all(line.startswith("archfarm: warning: ") for line in result.stderr.splitlines())
    else:
        # With --json the refusal is one JSON object on stdout, one line, and nothing else is said.
        lines = result.stdout.splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and set(json.loads(lines[0])) == {"error"}, result.output
        assert "\n" not in json.loads(lines[0])["error"] and result.stderr == ""
        assert after == before, "a refused job left rows behind"


def write_job(folder: Path, document: Any, as_yaml: bool) -> Path:
    path = folder / ("job.yaml" if as_yaml else "job.json")
    try:
        text = yaml.safe_dump(document, allow_unicode=True) if as_yaml else json.dumps(document)
    except (ValueError, TypeError, yaml.YAMLError):  # NaN in JSON, say: write it the way YAML spells it
        text = yaml.safe_dump(document)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    return path


def a_plan(folder: Path) -> Path:
    plan = folder / "plan.png"
    image = Image.new("RGB", (96, 64), "white")
    image.paste((0, 0, 0), (10, 10, 86, 14))
    image.save(plan)
    return plan


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG,  # CI sees the same examples every run; the long form explores
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(changes=edits, as_yaml=st.booleans())
def test_mutated_job_specs(
    submit_env: dict[str, str], changes: list[tuple[tuple[Any, ...], Any]], as_yaml: bool
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="spec-"))
    document = valid_job(a_plan(folder))
    for path, value in changes:
        set_path(document, path, value)
    submit_and_check(submit_env, write_job(folder, document, as_yaml))


@FUZZ
@given(
    cuts=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 8), st.binary(max_size=8)), min_size=1, max_size=6),
    as_yaml=st.booleans(),
)
def test_byte_mutated_job_files(submit_env: dict[str, str], cuts: list[tuple[int, int, bytes]], as_yaml: bool) -> None:
    folder = Path(tempfile.mkdtemp(prefix="bytes-"))
    path = write_job(folder, valid_job(a_plan(folder)), as_yaml)
    data = bytearray(path.read_bytes())
    for at, remove, insert in cuts:
        at %= len(data) + 1
        data[at : at + remove] = insert
    path.write_bytes(bytes(data))
    submit_and_check(submit_env, path)


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width`×`height`: a decompression bomb's calling card."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def encoded(fmt: str, mode: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.new(mode, (48, 32))
    image.save(buffer, format=fmt)
    return buffer.getvalue()


SOURCES = [
    ("PNG", "RGB"),
    ("PNG", "RGBA"),
    ("PNG", "I;16"),
    ("PNG", "P"),
    ("JPEG", "RGB"),
    ("JPEG", "CMYK"),
    ("TIFF", "RGB"),
    ("TIFF", "F"),
    ("BMP", "RGB"),
    ("GIF", "P"),
    ("WEBP", "RGB"),
]
SPECIAL = ["loop", "dir", "dev-zero", "fifo", "missing", "bomb", "empty", "eps"]


@FUZZ
@given(
    source=st.sampled_from(SOURCES) | st.sampled_from(SPECIAL),
    flips=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), max_size=8),
    cut=st.none() | st.integers(0, 5000),
)
def test_mutated_plan_images(
    submit_env: dict[str, str], source: Any, flips: list[tuple[int, int]], cut: int | None
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="plan-"))
    plan = folder / "plan.img"
    if source == "loop":
        plan.symlink_to(plan)
    elif source == "dir":
        plan.mkdir()
    elif source == "dev-zero":
        plan.symlink_to("/dev/zero")
    elif source == "fifo":
        os.mkfifo(plan)
    elif source == "missing":
        pass
    elif source == "bomb":
        plan.write_bytes(png_claiming(200_000, 200_000))
    elif source == "empty":
        plan.write_bytes(b"")
    elif source == "eps":
        plan.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    else:
        data = bytearray(encoded(*source))
        for at, byte in flips:
            data[at % len(data)] = byte
        plan.write_bytes(bytes(data[:cut] if cut is not None else data))
    document = valid_job(plan)
    submit_and_check(submit_env, write_job(folder, document, as_yaml=False))
