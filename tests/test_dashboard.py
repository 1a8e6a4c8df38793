"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a running `archfarm api`, real
`archfarm worker` processes, Redis, PostgreSQL and S3: progress to 100%, the contact sheet's thumbnails beside
their plans, one image's details, pause and resume, cancel; pages of another port that try to change a job, and
sign-out. Screenshots go to the test's temporary folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from producer.client import Farm
from producer.dashboard import SESSION_COOKIE
from shared.db.status import JobStatus
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
            with urllib.request.urlopen(f"{base}/healthz", timeout=1):  # loopback
                return True
        except OSError:
            return proc.poll() is not None

    wait_for(up, 30, f"archfarm api to answer ({log})")
    assert proc.poll() is None, log.read_text()
    yield base
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def other_port() -> Iterator[Callable[[str], str]]:
    """Pages served from another port of 127.0.0.1: the dashboard's site, another origin. `serve(html)` answers
    `html` at a path of its own and returns its URL."""
    pages: dict[str, bytes] = {}

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the handler's protocol
            body = pages.get(self.path, b"")
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def serve(html: str) -> str:
        path = f"/{len(pages)}"
        pages[path] = html.encode()
        return f"http://127.0.0.1:{server.server_port}{path}"

    yield serve
    server.shutdown()
    server.server_close()


def sign_in(page: Any, dashboard: str, token: str) -> None:
    page.goto(dashboard)  # sent to sign in first
    page.get_by_label("Token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.locator("table.jobs").wait_for(timeout=10_000)


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
    thumbnails = sheet.locator("td img")
    assert thumbnails.count() == 8
    for index in range(8):
        thumbnail = thumbnails.nth(index)
        thumbnail.scroll_into_view_if_needed()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle())
    plans_shown = sheet.locator("tbody th img.plan")  # each row beside its plan
    assert plans_shown.count() == 4
    for index in range(4):
        page.wait_for_function(
            "img => img.complete && img.naturalWidth > 0", arg=plans_shown.nth(index).element_handle()
        )
    page.screenshot(path=screens / "sheet.png", full_page=True)

    # One image's details: the full image, its sidecar's facts and a download link.
    thumbnails.nth(3).click()
    details = page.locator("dialog#details[open]")
    details.locator(".pair img[data-revisable]").wait_for()
    page.wait_for_function("() => document.querySelector('dialog#details img').naturalWidth === 64")
    assert "japandi interior" in details.locator(".prompt").inner_text()
    assert "seed 1" in details.locator("h2").inner_text()
    assert "tiny-canny" in details.locator("table.controls").inner_text()
    assert "render_s" in details.inner_text()
    page.wait_for_function("() => document.querySelector('dialog#details figure.plan img').naturalWidth > 0")
    assert details.locator("figure.plan figcaption").inner_text() == "plan ground"
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


def test_a_page_of_another_port_cannot_change_a_job_while_the_dashboard_can_and_sign_out_ends_the_session(
    browser: Any, farm: Farm, dashboard: str, other_port: Callable[[str], str], example_plan: Path
) -> None:
    """The page on another port is same-site: the browser sends the session cookie with its requests (SameSite=
    Strict lets it through), so only the server's refusal of another origin keeps the job running."""
    target = farm.submit(job(example_plan, "target"))  # no worker runs: it stays queued
    with farm.sessions.begin() as session:
        token = create_token(session, "ops", admin=True)
    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    sign_in(page, dashboard, token)
    cancel = f"{dashboard}/jobs/{target}/cancel"

    # A script's no-cors fetch: sent with the cookie, its answer unreadable to the page.
    script = f'fetch("{cancel}", {{method: "POST", mode: "no-cors", credentials: "include"}})'
    page.goto(other_port(f"<script>{script}.then(() => document.title = 'sent')</script>"))
    page.wait_for_function("document.title === 'sent'")
    assert farm.status(target).status is JobStatus.QUEUED
    # A form a script posts: the browser goes to the answer.
    with page.expect_response(cancel) as answer:
        page.goto(
            other_port(f'<form method="post" action="{cancel}"></form><script>document.forms[0].submit()</script>')
        )
    assert answer.value.status == 403 and "another site or port" in answer.value.text()
    assert farm.status(target).status is JobStatus.QUEUED

    # The dashboard's own button, on its own origin, cancels.
    page.goto(f"{dashboard}/ui/jobs/{target}")
    page.get_by_role("button", name="Cancel").click()
    page.locator(".summary h1 .status").filter(has_text="cancelled").wait_for(timeout=15_000)
    assert farm.status(target).status is JobStatus.CANCELLED

    # Sign-out ends the session: the cookie the browser held opens nothing afterwards.
    secret = next(cookie["value"] for cookie in page.context.cookies() if cookie["name"] == SESSION_COOKIE)
    assert secret != token
    page.get_by_role("button", name="Sign out").click()
    page.get_by_label("Token").wait_for(timeout=10_000)
    replayed = urllib.request.Request(f"{dashboard}/jobs", headers={"Cookie": f"{SESSION_COOKIE}={secret}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(replayed, timeout=10)  # loopback
    assert refused.value.code == 401


def test_pick_two_drafts_render_their_finals_close_the_picks_and_revise_a_region(
    browser: Any, farm: Farm, start_workers, dashboard: str, example_plan: Path, tmp_path: Path
) -> None:
    """A staged job waits for a pick; two drafts ticked on its contact sheet and one button render their finals
    (through `POST /jobs/{id}/pick`), which appear beside their drafts; `Done picking` ends the job; a region
    dragged over a final's page is rendered again as a revision (`POST /artifacts/{id}/revise`)."""
    start_workers("cpu:1")
    staged = {
        **job(example_plan, "staged"),
        "draft": {"steps": 2},
        "pick": {"by": "hand"},
        "final": {"scale": 2, "strength": 0.5},
    }
    job_id = farm.submit(staged)
    assert farm.wait(job_id, timeout=120).status is JobStatus.WAITING_FOR_PICK
    with farm.sessions.begin() as session:
        token = create_token(session, "lead", admin=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    sign_in(page, dashboard, token)
    page.goto(f"{dashboard}/ui/jobs/{job_id}")
    page.locator(".summary h1 .status").filter(has_text="waiting for pick").wait_for(timeout=10_000)
    boxes = page.locator("table.sheet input[data-pick]")
    assert boxes.count() == 4 and page.locator("table.sheet .adherence").count() == 4
    boxes.nth(0).check()
    boxes.nth(3).check()
    page.get_by_role("button", name="Render finals of the picked drafts").click()
    finals = page.locator("table.sheet a.final")
    page.wait_for_function("() => document.querySelectorAll('table.sheet a.final').length === 2", timeout=120_000)
    assert finals.count() == 2
    page.screenshot(path=tmp_path / "picked.png", full_page=True)
    finals.first.click()  # a final's details open like any image's
    page.wait_for_function("() => document.querySelector('dialog#details img')?.naturalWidth === 128")
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Done picking").click()
    page.locator(".summary h1 .status").filter(has_text="succeeded").wait_for(timeout=30_000)
    finals_made = [a for a in farm.results(job_id) if a.stage == "final"]
    assert len(finals_made) == 2

    # A final's page: its lineage, and a region dragged over it revised as a child job.
    final = finals_made[0]
    page.goto(f"{dashboard}/ui/artifacts/{final.id}")
    assert f"draft #{final.parent_id}" in page.locator(".lineage").inner_text()
    image = page.locator("img[data-revisable]")
    page.wait_for_function("img => img.complete && img.naturalWidth === 128", arg=image.element_handle())
    box = image.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.25)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    assert page.url.endswith(f"/ui/artifacts/{final.id}")  # the drag marked a region, it opened nothing
    page.get_by_label("Prompt").fill("a dark living room, walnut floor")
    page.get_by_role("button", name="Render revision").click()
    flash = page.locator("#flash", has_text="revision job")
    flash.wait_for(timeout=10_000)
    child = flash.inner_text().split()[2]
    assert farm.wait(child, timeout=120).status is JobStatus.SUCCEEDED
    (revision,) = farm.results(child)
    assert revision.parent_id == final.id
    page.goto(f"{dashboard}/ui/artifacts/{final.id}")
    assert f"revision #{revision.id}" in page.locator(".lineage").inner_text()
    page.screenshot(path=tmp_path / "revised.png", full_page=True)
    assert not problems
