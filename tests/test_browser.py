"""The UI in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from dreamsketch.studio import Studio
from tests.servers import RunningServer, running_server, tiny_settings

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(Studio(tiny_settings(tmp_path_factory.mktemp("browser")))) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield launched
        launched.close()


def test_generate_then_find_it_in_the_gallery(browser, server: RunningServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/")
    expect(page.get_by_role("tab", name="Text to image")).to_be_visible(timeout=30_000)
    page.screenshot(path=tmp_path / "1-loaded.png", full_page=True)

    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    steps = page.get_by_label("number input for Steps")
    steps.fill("60")
    steps.press("Enter")
    page.locator("#txt2img-generate").click()
    expect(page.locator("#txt2img-results .progress-bar")).to_be_visible(timeout=20_000)  # fed by the step callback
    page.screenshot(path=tmp_path / "2-progress.png", full_page=True)

    result = page.locator("#txt2img-results img").first
    expect(result).to_be_visible(timeout=60_000)
    page.screenshot(path=tmp_path / "3-result.png", full_page=True)
    newest = server.studio.gallery.list(limit=1)[0]
    assert newest.meta.prompt == "a lighthouse at dusk" and newest.meta.steps == 60

    page.get_by_role("tab", name="Gallery").click()
    expect(page.locator("#gallery-grid img").first).to_be_visible(timeout=20_000)
    expect(page.locator("#gallery-page-label")).to_contain_text("1 image")
    page.locator("#gallery-grid button.thumbnail-item, #gallery-grid img").first.click()
    parameters = page.locator("#gallery-parameters textarea")
    expect(parameters).to_have_value(re.compile(r"a lighthouse at dusk\nSteps: 60, Sampler:"), timeout=10_000)
    page.screenshot(path=tmp_path / "4-gallery.png", full_page=True)
    page.close()


def test_dark_mode_and_phone_layout(browser, server: RunningServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/?__theme=dark")
    expect(page.get_by_role("tab", name="Text to image")).to_be_visible(timeout=30_000)
    expect(page.locator("body")).to_have_class(re.compile(r"\bdark\b"))
    page.screenshot(path=tmp_path / "5-dark.png", full_page=True)
    page.close()

    phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    phone.goto(server.url + "/")
    generate = phone.locator("#txt2img-generate")
    expect(generate).to_be_visible(timeout=30_000)
    box = generate.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the page scrolls sideways on a phone ({width}px wide)"
    phone.screenshot(path=tmp_path / "6-phone.png", full_page=True)
    phone.close()
