"""The playground page in a real headless browser (Debian's chromium, driven by Playwright) against the session's
real server: search the catalog, steer with a feature, run, and see the unsteered and steered completions side by
side. The screenshot is kept in `test-output/playground.png`."""

import shutil
from pathlib import Path

import pytest

from tests.server.conftest import API_KEY

SCREENSHOT = Path(__file__).resolve().parents[2] / "test-output" / "playground.png"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "the page tests need Debian's chromium (make test installs it)"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_search_steer_and_compare_side_by_side(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.base_url}/playground")
    page.wait_for_selector("#error:text('missing or invalid API key')")  # the server has a key: the page says so
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("#vectors li")
    page.fill("#search", "river")  # the first hits are labelled by it: River / river / rivers, Sea / River / Ocean
    page.wait_for_function("[...document.querySelectorAll('#features li')].length > 0 && "
                           "[...document.querySelectorAll('#features li')].every(li => "
                           "li.textContent.toLowerCase().includes('river'))")
    found = page.locator("#features li").first
    feature = int(found.get_attribute("data-feature"))
    found.locator("button").click()
    page.fill("#spec li input", "30")
    page.dispatch_event("#spec li input", "change")
    page.fill("#max-tokens", "16")
    page.fill("#budget", "128")
    page.click("#run")
    page.wait_for_function("[...document.querySelectorAll('.stats')].every(s => s.textContent.includes('tokens/s'))",
                           timeout=120_000)
    unsteered, steered = page.inner_text("#unsteered pre"), page.inner_text("#steered pre")
    assert unsteered and steered and unsteered != steered
    stats = page.inner_text("#steered .stats")
    assert f'"id":{feature}' in stats and '"strength":30' in stats and '"attention":{"budget":128}' in stats, stats
    assert page.inner_text("#error") == "" and not errors
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.close()
