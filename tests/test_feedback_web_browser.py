"""The annotation page in a real browser: Debian's chromium, headless, driven by Playwright.

`make setup` installs chromium (apt) and the playwright package (test extras); Playwright's own browser download is
never used. Set FEEDBACK_WEB_SCREENSHOTS=docs to rewrite the README's screenshots of the three pages.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import requests

from ilf.v1 import feedback_pb2
from test_feedback_web import (MODEL_VERSION, TOKENS, WRONG, start_page, store_round_report,  # noqa: F401 - fixtures
                               web_env, web_execution)

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extras)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("chromium is not installed (apt-get install chromium; `make setup` does it as root)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
# As root in a container: no sandbox of chromium's own, nothing fetched in the background, no GPU.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15000
RUN_TIMEOUT_MS = 60000
FIXED_ADD = "def add(a, b):\n    return a + b\n"
HALF_FIXED_ADD = "def add(a, b):\n    return abs(a + b) + 1\n"


@pytest.fixture(scope="module")
def browser():
    # launch() starts chromium with a fresh --user-data-dir of its own, removed when it closes.
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture
def open_context(browser):
    """New browser contexts (separate cookie jars: separate people); closed after the test."""
    contexts = []

    def open_one():
        context = browser.new_context(viewport={"width": 1360, "height": 900})
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        return context
    yield open_one
    for context in contexts:
        context.close()


def sign_in(context, url: str, name: str, path: str = "/queue"):
    page = context.new_page()
    page.goto(f"{url}{path}")
    assert "/signin" in page.url            # sent to the form first
    page.fill("#token", TOKENS[name][0])
    page.click("#signin button[type=submit]")
    page.wait_for_url(f"{url}{path}")
    return page


def run_outcome(page) -> str:
    """What the page says once its Run tests finished (the sandbox may be slow on a busy machine)."""
    page.wait_for_selector("#run-status:is(.passed, .failed, .error)", timeout=RUN_TIMEOUT_MS)
    return page.inner_text("#run-status")


def screenshot(page, name: str, tmp_path: Path) -> None:
    """Saves a full-page screenshot (into docs/ when FEEDBACK_WEB_SCREENSHOTS=docs)."""
    folder = ROOT / os.environ["FEEDBACK_WEB_SCREENSHOTS"] if os.environ.get("FEEDBACK_WEB_SCREENSHOTS") else tmp_path
    path = folder / f"annotation-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10000


def test_an_annotator_writes_feedback_tries_two_fixes_and_submits(start_page, open_context, tmp_path):
    started = time.monotonic()
    site = start_page()
    page = sign_in(open_context(), site.url, "ada")
    # The queue: three open items of the test's task set, written by the test's model version.
    counts = page.locator("#counts tbody tr").first
    assert counts.locator("td").nth(0).inner_text() == "arithmetic"
    assert counts.locator("td[data-state=open]").inner_text() == "3"
    assert page.locator("#items tbody tr").count() == 3 and MODEL_VERSION in page.locator("#items").inner_text()
    screenshot(page, "queue", tmp_path)

    page.click("#take-next")                # the oldest item: add(), which subtracts
    page.wait_for_url(f"{site.url}/items/{site.items[1]}")
    assert "add two numbers" in page.locator("#task-text").inner_text()
    assert page.locator("#program .linenos").count() and page.locator("#program .k").first.inner_text() == "def"
    assert page.inner_text("#program td.code").strip() == WRONG[1].strip()      # laid out line by line
    first_test = page.locator("#tests li").nth(0)
    assert first_test.locator(".verdict").inner_text() == "FAILED"
    assert first_test.locator(".expected").inner_text() == "3" and first_test.locator(".actual").inner_text() == "-1"
    assert page.locator("#tests li").nth(2).locator(".verdict").inner_text() == "PASSED"
    assert site.service.queue.get(site.items[1])[1].leased_by == "ada"      # opening it took the lease

    page.fill("#feedback", "The function subtracts b from a; it should return a + b.")
    page.fill("#refinement", HALF_FIXED_ADD)
    page.click("#run")
    assert run_outcome(page) == "passes 0 of 3 tests"
    assert page.locator("#run-results li .verdict").all_inner_texts() == ["FAILED"] * 3
    assert page.is_checked("#attach")        # editing the program proposes it
    page.click("#submit")                   # refused: the attached refinement fails
    page.wait_for_load_state()              # the page again, its script running (the shortcuts below need it)
    assert "does not pass the tests" in page.inner_text("#refused")
    assert page.input_value("#feedback").startswith("The function subtracts")   # nothing typed is lost

    page.fill("#refinement", FIXED_ADD)
    page.keyboard.press("Alt+r")            # Run tests, by its shortcut
    assert run_outcome(page) == "passes all 3 tests"
    assert page.locator("#run-results li .verdict").all_inner_texts() == ["PASSED"] * 3
    screenshot(page, "item", tmp_path)
    page.focus("#feedback")
    page.keyboard.press("Control+Enter")    # Submit, by its shortcut
    page.wait_for_selector("#saved")
    record_id = page.inner_text("#saved .record-id")
    assert f"/items/{site.items[2]}" in page.url      # and on to the next item

    record = site.feedback_stub(TOKENS["carl"][0]).GetFeedback(
        feedback_pb2.GetFeedbackRequest(record_id=record_id), timeout=10)
    assert (record.annotator_id, record.feedback, record.human_refinement, record.queue_item) == (
        "ada", "The function subtracts b from a; it should return a + b.", FIXED_ADD, site.items[1])
    assert record.tests.refinement_passed and record.tests.tests_passed == 1 and record.tests.tests_total == 3
    assert record.program_model_version == MODEL_VERSION and record.source == "queue"

    # Two rounds' reports in the store, as the loop writes them, make the pass@1 chart.
    store = site.service.records.store
    store_round_report(store, "round-20261201-1", (0.08, 0.03, 0.13), (0.12, 0.06, 0.18), promoted=True,
                       reason="pass@1 rose by 0.040")
    store_round_report(store, "round-20261202-1", (0.12, 0.06, 0.18), (0.11, 0.05, 0.17), promoted=False,
                       reason="pass@1 dropped by 0.010 (margin 0)")
    page.click("header nav >> text=Progress")
    assert page.locator("#per-annotator tbody tr").first.locator("td").all_inner_texts()[:3] == ["ada", "1", "1"]
    assert page.inner_text("#new-records") == "1"
    assert page.locator("#chart g.mark").count() == 4 and page.locator("#chart g.mark.after.filled").count() == 1
    screenshot(page, "progress", tmp_path)
    print(f"annotator scenario: {time.monotonic() - started:.1f} s")


def test_a_skipped_item_is_offered_to_others_and_an_expired_lease_too(start_page, open_context):
    site = start_page(lease_s=5)
    ada = sign_in(open_context(), site.url, "ada")
    ada.click("#take-next")
    ada.wait_for_url(f"{site.url}/items/{site.items[1]}")
    ada.keyboard.press("Alt+s")             # Skip, by its shortcut: the next item is another one
    ada.wait_for_url(f"{site.url}/items/{site.items[2]}")
    skipped = site.service.queue.get(site.items[1])[1]
    assert skipped.state == "queued" and skipped.skipped_by == ["ada"]

    grace = sign_in(open_context(), site.url, "grace")
    grace.click("#take-next")               # re-offered: the item ada skipped, the oldest open one
    grace.wait_for_url(f"{site.url}/items/{site.items[1]}")
    grace.goto(f"{site.url}/items/{site.items[2]}")   # ada holds this one: grace may read it, not answer it
    assert "ada is writing feedback on it" in grace.inner_text("#lease") and not grace.locator("#answer").count()

    expires = site.service.queue.get(site.items[2])[1].lease_expires_at
    time.sleep(max(0.0, expires - time.time()) + 0.5)     # ada's lease on item 2 expires without an answer
    grace.reload()
    assert grace.locator("#answer").count() and site.service.queue.get(site.items[2])[1].leased_by == "grace"
    assert "expired" in ada.inner_text("#lease")       # ada's page says so
    ada.fill("#feedback", "Too late.")
    ada.click("#submit")
    assert "no longer valid; grace holds it now" in ada.inner_text("#refused")


def test_an_operator_page_is_refused_to_an_annotator(start_page, open_context):
    site = start_page()
    annotator = sign_in(open_context(), site.url, "ada")
    assert not annotator.locator("header nav >> text=Operators").count()
    reply = annotator.goto(f"{site.url}/admin")
    assert reply.status == 403 and "needs the operator role" in annotator.inner_text("main")
    assert not annotator.locator("#collect").count()
    operator = sign_in(open_context(), site.url, "olga", path="/admin")
    assert operator.locator("#collect select[name=task_set] option").count() == 2    # mbpp and the test's


def test_a_session_cookie_does_not_work_after_sign_out(start_page, open_context):
    site = start_page()
    context = open_context()
    page = sign_in(context, site.url, "ada")
    [cookie] = [c for c in context.cookies() if c["name"] == "ilf_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    assert page.evaluate("document.cookie") == ""       # scripts cannot read it
    page.click("header .signout button")
    page.wait_for_url(f"{site.url}/signin")
    stolen = open_context()                 # someone who copied the cookie before the sign-out
    stolen.add_cookies([{k: cookie[k] for k in ("name", "value", "domain", "path")}])
    replay = stolen.new_page()
    replay.goto(f"{site.url}/items/{site.items[1]}")
    assert "/signin" in replay.url and "add two numbers" not in replay.content()
    assert requests.get(f"{site.url}/queue", cookies={"ilf_session": cookie["value"]},
                        allow_redirects=False).status_code == 303
