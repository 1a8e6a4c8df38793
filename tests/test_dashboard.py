"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a running `archfarm api`, real
`archfarm worker` processes, Redis, PostgreSQL and S3: progress to 100%, the contact sheet's thumbnails, one
image's details, pause and resume, cancel. Screenshots go to the test's temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from producer.client import Farm
from shared.db.tokens import create_token
from tests.conftest import queued_messages, service_missing
from tests.processes import wait_for
from tests.s3_server import free_port
from tests.test_farm import FAST

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.s3, pytest.mark.slow]


@pytest.fixture
def browser() -> Iterator[Any]:
    """Chromium as Debian installs it (`apt-get install chromium`): Playwright downloads no browser of its own."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        service_missing("playwright is not installed (pip install -e '.[dev]')")
    path = shutil.which("chromium")
    if path is None:
        service_missing("Chromium is not on PATH (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def dashboard(farm_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """`archfarm api` as its own process on a free loopback port; its base URL."""
    port = free_port()
    log = tmp_path / "api.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
        env={**os.environ, **farm_env, "ARCHFARM_API_AUTH": "on"},  # the dashboard signs in with a token
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):  # noqa: S310 - loopback
                return True
        except OSError:
            return proc.poll() is not None

    wait_for(up, 30, f"archfarm api to answer ({log})")
    assert proc.poll() is None, log.read_text()
    yield base
    proc.terminate()
    proc.wait(10)


def job(plan: Path, name: str, plans: int = 1, seeds: int = 2) -> dict:
    return {
        "name": name,
        "plans": [str(plan)] if plans == 1 else [str(plan), str(plan.with_name("first.png"))],
        "styles": ["modern", "japandi"],
        "seeds": {"count": seeds},
        "profile": FAST,
    }


def test_progress_sheet_details_pause_resume_and_cancel_in_a_browser(
    browser: Any,
    farm: Farm,
    farm_env: dict[str, str],
    start_workers,
    dashboard: str,
    example_plan: Path,
    tmp_path: Path,
) -> None:
    from PIL import Image

    screens = tmp_path / "screens"
    screens.mkdir()
    plans = tmp_path / "plans"
    plans.mkdir()
    shutil.copy(example_plan, plans / "ground.png")
    Image.open(example_plan).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(plans / "first.png")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())  # the cancel button's confirmation
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))

    # A job paused from its page waits while a worker is up (the worker drops its messages), then resumes, and
    # its progress bar, updated in place, reaches 100%.
    villa = farm.submit(job(plans / "ground.png", "villa", plans=2))
    with farm.sessions.begin() as session:
        token = create_token(session, "ops", admin=True)  # jobs from Python have no owner: an admin changes them
    page.goto(dashboard)  # sent to sign in first; a wrong token is refused there
    page.get_by_label("Token").fill("af_wrong")
    page.get_by_role("button", name="Sign in").click()
    page.locator("p.error", has_text="unknown or revoked").wait_for(timeout=10_000)
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    row = page.locator(f'tr[data-job="{villa}"]')
    assert row.locator("td").first.inner_text().startswith("villa")
    row.get_by_role("link", name="villa").click()
    page.get_by_role("button", name="Pause").click()
    status = page.locator(".summary h1 .status")
    status.filter(has_text="paused").wait_for(timeout=15_000)
    start_workers("cpu:1")
    broker, queue = farm_env["ARCHFARM_BROKER_URL"], farm_env["ARCHFARM_QUEUE"]
    wait_for(lambda: queued_messages(broker, queue) == 0, 60, "the worker to take the paused job's messages")
    assert farm.status(villa).counts["queued"] == 8
    page.screenshot(path=screens / "paused.png")
    page.get_by_role("button", name="Resume").click()
    page.locator('.summary [role=progressbar][aria-valuenow="100"]').wait_for(timeout=90_000)
    status.filter(has_text="succeeded").wait_for(timeout=10_000)
    assert page.locator(".summary .images").inner_text() == "8/8"

    # The contact sheet: plan × style rows, seed columns, every thumbnail loaded (they load lazily: scroll).
    sheet = page.locator("table.sheet")
    assert sheet.locator("thead th").all_inner_texts()[1:] == ["seed 0", "seed 1"]
    rows = [text.replace("\n", " / ") for text in sheet.locator("tbody th").all_inner_texts()]
    assert rows == ["ground / modern", "ground / japandi", "first / modern", "first / japandi"]
    thumbnails = sheet.locator("img")
    assert thumbnails.count() == 8
    for index in range(8):
        thumbnail = thumbnails.nth(index)
        thumbnail.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
    page.screenshot(path=screens / "sheet.png", full_page=True)

    # One image's details: the full image, its sidecar's facts and a download link.
    thumbnails.nth(3).click()
    details = page.locator("dialog#details[open]")
    details.locator("img").wait_for()
    page.wait_for_function("() => document.querySelector('dialog#details img').naturalWidth === 64")
    assert "japandi interior" in details.locator(".prompt").inner_text()
    assert "seed 1" in details.locator("h2").inner_text()
    assert "tiny-canny" in details.locator("table.controls").inner_text()
    assert "render_s" in details.inner_text()
    download = details.get_by_role("link", name="Download PNG")
    response = page.request.get(dashboard + download.get_attribute("href"))
    assert response.ok and response.body()[:8] == b"\x89PNG\r\n\x1a\n"
    assert response.headers["content-disposition"].startswith('attachment; filename="ground_japandi_seed-1_')
    page.screenshot(path=screens / "details.png")
    page.keyboard.press("Escape")

    # Another job is cancelled from its page while it runs: its queued tasks never start.
    hotel = farm.submit(job(plans / "ground.png", "hotel", seeds=20))
    page.goto(f"{dashboard}/ui/jobs/{hotel}")
    page.get_by_role("button", name="Cancel").click()
    status.filter(has_text="cancelled").wait_for(timeout=30_000)
    view = farm.status(hotel)
    assert view.counts["cancelled"] > 0 and view.counts["queued"] == 0 and view.counts["running"] == 0
    page.screenshot(path=screens / "cancelled.png")

    # The list, filtered by status, and the workers with what each holds.
    page.goto(f"{dashboard}/?status=cancelled")
    assert page.locator("tr[data-job]").count() == 1 and page.locator(f'tr[data-job="{hotel}"]').count() == 1
    page.goto(f"{dashboard}/ui/workers")
    live = page.locator("table.workers tr.live")
    assert live.count() == 1 and "tiny-sd15" in live.inner_text() and "cpu" in live.inner_text()
    page.screenshot(path=screens / "workers.png")
    assert not problems
