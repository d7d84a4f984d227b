"""The UI in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image

from dreamsketch.studio import Studio
from dreamsketch.ui import SUGGESTED_PROMPTS
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


OWN_PROMPTS = ["a red circle on a blue background", "a small green square on a yellow background"]


@pytest.fixture(scope="module")
def suggesting_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """tiny-demo (no suggested prompts of its own) and, selected at start, a builtin tiny model with its own."""
    folder = tmp_path_factory.mktemp("browser-suggestions")
    own = {"id": "tiny-suggests", "name": "Tiny with prompts", "source": "builtin:tiny", "family": "sd15"}
    own |= {"width": 64, "height": 64, "steps": 2, "guidance_scale": 2.0, "prompts": OWN_PROMPTS}
    demo = {"id": "tiny-demo", "name": "Tiny demo (noise)", "source": "builtin:tiny", "family": "sd15"}
    demo |= {"width": 128, "height": 128, "steps": 2, "guidance_scale": 7.5}
    (folder / "models.yaml").write_text(yaml.safe_dump([demo, own], sort_keys=False), encoding="utf-8")
    with running_server(Studio(tiny_settings(folder, default_model="tiny-suggests"))) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=ARGS)
        yield launched
        launched.close()


def open_app(browser, server: RunningServer, query: str = ""):  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(server.url + "/" + query)
    expect(page.get_by_role("tab", name="Text to image")).to_be_visible(timeout=30_000)
    return page


def set_numbers(page, **values: int) -> None:  # type: ignore[no-untyped-def]
    """Type into the Text to image sliders' number boxes, e.g. set_numbers(page, Steps=60)."""
    for label, value in values.items():
        field = page.get_by_label(f"number input for {label.replace('_', ' ')}").first
        field.fill(str(value))
        field.press("Enter")


def type_kept(field, value: str) -> None:  # type: ignore[no-untyped-def]
    """Type into a number box until the value stays: in a tab shown for the first time, Gradio may still be mounting
    the slider, which then puts its old value back (Generate then sent 0.6 for a Strength typed as 0.3)."""
    for _ in range(10):
        field.fill(value)
        field.press("Enter")
        field.page.wait_for_timeout(300)
        if field.input_value() == value:
            return
    raise AssertionError(f"{value} typed, {field.input_value()} kept")


def choose_model(page, name: str) -> None:  # type: ignore[no-untyped-def]
    """Pick the Text to image model whose label starts with `name`, as a person does."""
    page.get_by_label("Model").first.click()
    page.get_by_role("option", name=re.compile("^" + re.escape(name))).click()


def test_suggested_prompts_follow_the_model_and_fill_the_prompt(browser, suggesting_server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page = open_app(browser, suggesting_server)
    suggestions = page.locator("#txt2img-suggestions button.gallery-item")
    prompt = page.get_by_label("Prompt", exact=True).first
    generic = [re.compile("^" + re.escape(text[:40])) for text in SUGGESTED_PROMPTS]  # long ones are cut short
    expect(page.get_by_text("Suggested prompts").first).to_be_visible()
    expect(suggestions).to_have_text(OWN_PROMPTS)  # the default model's own, from the start
    suggestions.nth(1).click()
    expect(prompt).to_have_value(OWN_PROMPTS[1], timeout=10_000)

    choose_model(page, "Tiny demo")
    expect(suggestions).to_have_text(generic, timeout=10_000)  # a model without prompts of its own: the generic ones
    suggestions.first.click()
    expect(prompt).to_have_value(SUGGESTED_PROMPTS[0], timeout=10_000)  # whole, though shown cut short
    page.locator("#txt2img-generate").click()
    expect(page.locator("#txt2img-results img").first).to_be_visible(timeout=60_000)

    choose_model(page, "Tiny with prompts")
    expect(suggestions).to_have_text(OWN_PROMPTS, timeout=10_000)
    page.get_by_role("button", name="Reuse parameters").first.click()  # sets the model back to tiny-demo
    expect(page.get_by_label("Model").first).to_have_value(re.compile("^Tiny demo"), timeout=10_000)
    expect(suggestions).to_have_text(generic, timeout=10_000)
    page.close()


def test_generate_then_find_it_in_the_gallery(browser, server: RunningServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page = open_app(browser, server)
    page.screenshot(path=tmp_path / "1-loaded.png", full_page=True)

    page.get_by_label("Prompt", exact=True).fill("a lighthouse at dusk")
    set_numbers(page, Steps=60)
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

    page = open_app(browser, server, "?__theme=dark")
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


LINES_OF_TEXT = """(element, text) => {
  const walker = document.createTreeWalker(element, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.textContent.trim() !== text) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    return range.getClientRects().length;
  }
  return 0;
}"""


def test_the_gallery_grid_and_the_models_table_fit_a_phone(browser, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    """On a phone the Gallery's fourth column was cut off, and the models table broke its words a letter a line."""
    from playwright.sync_api import expect

    while server.studio.gallery.count() < 8:
        server.studio.generate(server.studio.parse({"prompt": "many", "steps": 1, "batch_size": 4}, "txt2img"))
    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone.goto(server.url + "/")
    expect(phone.locator("#txt2img-generate")).to_be_visible(timeout=30_000)

    def open_tab(name: str) -> None:  # a phone shows the first tab and a menu of the others
        phone.get_by_role("button", name="More tabs").click()
        phone.locator("button:visible", has_text=name).last.click()

    open_tab("Gallery")
    thumbnails = phone.locator("#gallery-grid button.thumbnail-item")
    expect(thumbnails.nth(7)).to_be_visible(timeout=10_000)
    grid = phone.locator("#gallery-grid .grid-container").bounding_box()
    assert grid is not None
    for index in range(8):
        box = thumbnails.nth(index).bounding_box()
        assert box is not None and box["x"] + box["width"] <= grid["x"] + grid["width"] + 1, (index, box, grid)

    open_tab("Models & status")
    cell = phone.locator("#models-table").get_by_role("gridcell", name="tiny-demo")
    expect(cell).to_be_visible(timeout=10_000)
    lines = cell.evaluate(LINES_OF_TEXT, "tiny-demo")
    assert lines == 1, f"'tiny-demo' takes {lines} lines"
    assert phone.evaluate("document.documentElement.scrollWidth") <= 400  # the table scrolls, not the page
    phone.close()


def test_reuse_parameters_and_send_to_img2img_take_the_selected_image(browser, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page = open_app(browser, server)
    page.get_by_label("Prompt", exact=True).fill("two foxes")
    set_numbers(page, Batch_size=2)
    page.locator("#txt2img-generate").click()
    thumbnails = page.locator("#txt2img-results button.thumbnail-item")
    expect(thumbnails).to_have_count(2, timeout=60_000)
    expect(page.locator("#txt2img-results img").first).to_have_css("object-fit", "contain")  # never cropped
    first, second = sorted(server.studio.gallery.list(limit=2), key=lambda entry: entry.id)
    assert first.meta.prompt == second.meta.prompt == "two foxes" and first.meta.seed != second.meta.seed

    thumbnails.nth(1).click()
    page.get_by_role("button", name="Reuse parameters").first.click()
    seed = page.get_by_label("Seed (-1: random)")
    expect(seed.first).to_have_value(str(second.meta.seed), timeout=10_000)

    page.get_by_role("button", name="Send to img2img").first.click()
    expect(page.get_by_role("tab", name="Image to image")).to_have_attribute("aria-selected", "true", timeout=10_000)
    expect(seed.nth(1)).to_have_value(str(second.meta.seed))
    expect(page.locator("#img2img-generate")).to_be_visible()
    before = server.studio.gallery.count()
    page.locator("#img2img-generate").click()
    expect(page.locator("#img2img-results img").first).to_be_visible(timeout=60_000)
    newest = server.studio.gallery.list(limit=1)[0]
    assert server.studio.gallery.count() == before + 1  # one image's parameters; img2img keeps its batch size
    assert newest.meta.prompt == "two foxes" and newest.meta.strength == 0.6
    page.close()


def test_new_results_are_not_picked_and_img2img_reuse_restores_the_strength(browser, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    """Reuse and Send took the picture picked in the previous results; img2img's Reuse left Strength as it was; Send
    on a picture deleted meanwhile showed Gradio's error with the server's path."""
    from playwright.sync_api import expect

    page = open_app(browser, server)
    seed = page.get_by_label("Seed (-1: random)")
    set_numbers(page, Batch_size=2, Steps=4)  # img2img at strength 0.3 below: at least one step
    seed.first.fill("500")
    page.locator("#txt2img-generate").click()
    thumbnails = page.locator("#txt2img-results button.thumbnail-item")
    expect(thumbnails).to_have_count(2, timeout=60_000)
    thumbnails.nth(1).click()
    seed.first.fill("700")
    newest = server.studio.gallery.count() + 2
    page.locator("#txt2img-generate").click()
    expect(page.locator("#txt2img-results").get_by_text("seed 700")).to_be_visible(timeout=60_000)
    assert server.studio.gallery.count() == newest
    seed.first.fill("1")
    page.get_by_role("button", name="Reuse parameters").first.click()
    expect(seed.first).to_have_value("700", timeout=10_000)  # the first of the new results, none being picked

    page.get_by_role("button", name="Send to img2img").first.click()
    expect(page.get_by_role("tab", name="Image to image")).to_have_attribute("aria-selected", "true", timeout=10_000)
    strength = page.get_by_label("number input for Strength (denoising)")
    type_kept(strength, "0.3")
    page.locator("#img2img-generate").click()
    expect(page.locator("#img2img-results img").first).to_be_visible(timeout=60_000)
    assert server.studio.gallery.list(limit=1)[0].meta.strength == 0.3
    strength.fill("0.9")
    strength.press("Enter")
    page.get_by_role("tabpanel").get_by_role("button", name="Reuse parameters").click()  # the tab shown
    expect(strength).to_have_value("0.3", timeout=10_000)

    page.get_by_role("tab", name="Text to image").click()
    shown = [e for e in server.studio.gallery.list(limit=3) if e.meta.strength is None]  # the last txt2img results
    first = min(shown, key=lambda entry: entry.meta.seed)
    assert first.meta.seed == 700
    server.studio.gallery.delete(first.file_name)
    page.get_by_role("button", name="Send to img2img").first.click()
    expect(page.get_by_text("This picture is no longer in the gallery.")).to_be_visible(timeout=10_000)
    expect(page.get_by_role("tab", name="Text to image")).to_have_attribute("aria-selected", "true")
    expect(page.get_by_text(str(server.studio.gallery.folder))).to_have_count(0)
    page.close()


def test_cancel_stops_the_run_and_writes_nothing(browser, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    page = open_app(browser, server)
    page.get_by_label("Prompt", exact=True).fill("a long run")
    set_numbers(page, Steps=150, Batch_size=8)
    before = server.studio.gallery.count()
    page.locator("#txt2img-generate").click()
    expect(page.locator("#txt2img-results .progress-bar")).to_be_visible(timeout=20_000)
    page.locator("#txt2img-cancel").click()
    expect(page.locator("#txt2img-results .progress-bar")).to_be_hidden(timeout=10_000)
    expect(page.get_by_text("Cancelled; nothing was saved.")).to_be_visible(timeout=10_000)
    for _ in range(100):  # the engine sees the cancel at its next step
        if server.studio.pending == 0:
            break
        page.wait_for_timeout(100)
    assert server.studio.pending == 0
    assert server.studio.gallery.count() == before

    page.get_by_label("Prompt", exact=True).fill("after the cancel")
    set_numbers(page, Steps=2, Batch_size=1)
    page.locator("#txt2img-generate").click()
    expect(page.locator("#txt2img-results img").first).to_be_visible(timeout=60_000)
    assert server.studio.gallery.list(limit=1)[0].meta.prompt == "after the cancel"
    page.close()


def test_gallery_tab_pages_reuses_deletes_and_reads_png_info(browser, server: RunningServer, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    studio = server.studio
    scrap = studio.generate(studio.parse({"prompt": "a scrap", "steps": 1}, "txt2img")).entries[0]
    for prompt, seed in (("a tin robot", 7), ("an old pier, fog", 1234), ("a paper boat", 99)):
        studio.generate(studio.parse({"prompt": prompt, "seed": seed, "steps": 2}, "txt2img"))
    studio.gallery.delete(scrap.file_name)  # a gap in the ids, which a rebuild of the index closes
    monkeypatch.setattr("dreamsketch.ui.GALLERY_PAGE", 2)
    total = studio.gallery.count()
    boat, pier = studio.gallery.list(limit=2)

    page = open_app(browser, server)
    expect(page.get_by_label("Model").first).to_have_value("Tiny demo (noise) · loaded")  # labels say it now
    page.get_by_role("tab", name="Gallery").click()
    label = page.locator("#gallery-page-label")
    expect(label).to_contain_text(f"Page 1 of {-(-total // 2)} · {total} images", timeout=20_000)
    page.get_by_role("button", name="Older ▶").click()
    expect(label).to_contain_text("Page 2 of")
    page.get_by_role("button", name="◀ Newer").click()
    expect(label).to_contain_text("Page 1 of")
    pages = -(-total // 2)
    page.get_by_role("button", name="Oldest ⏭").click()
    expect(label).to_contain_text(f"Page {pages} of {pages}")
    page.get_by_role("button", name="⏮ Newest").click()
    expect(label).to_contain_text("Page 1 of")

    page.locator("#gallery-grid button.thumbnail-item").nth(1).click()
    parameters = page.locator("#gallery-parameters textarea")
    expect(parameters).to_have_value(re.compile(r"^an old pier, fog\nSteps: 2, .*Seed: 1234,"), timeout=10_000)
    page.get_by_role("button", name="Reuse in Text to image").click()
    expect(page.get_by_role("tab", name="Text to image")).to_have_attribute("aria-selected", "true", timeout=10_000)
    expect(page.get_by_label("Prompt", exact=True).first).to_have_value("an old pier, fog")
    expect(page.get_by_label("Seed (-1: random)").first).to_have_value("1234")

    page.get_by_role("tab", name="Gallery").click()
    page.locator("#gallery-grid button.thumbnail-item").first.click()
    expect(parameters).to_have_value(re.compile(r"^a paper boat\n"), timeout=10_000)
    studio.gallery.index_path.unlink()  # lost while the page shows the boat: rebuilt, its rows numbered anew
    page.get_by_role("button", name="Delete").click()  # deleted what the id chosen had become: another picture
    expect(label).to_contain_text(f"{total - 1} images", timeout=10_000)
    assert studio.gallery.find(boat.file_name) is None and studio.gallery.file_path(boat.file_name) is None
    assert studio.gallery.find(pier.file_name) is not None
    page.locator("#gallery-grid button.thumbnail-item").first.click()
    expect(page.locator("#gallery-grid button.thumbnail-item.selected").first).to_be_visible(timeout=10_000)
    page.get_by_role("button", name="Older ▶").click()  # a new page: nothing selected, nothing shown as selected
    expect(page.locator("#gallery-grid button.thumbnail-item.selected")).to_have_count(0, timeout=10_000)
    expect(parameters).to_have_value("")

    page.get_by_text("PNG info: read the parameters of a picture").click()
    png = studio.gallery.file_path(pier.file_name)
    assert png is not None
    page.locator("#png-info input[type=file]").set_input_files(str(png))
    expect(page.get_by_label("Parameters text")).to_have_value(re.compile(r"^an old pier, fog\n"), timeout=10_000)

    # Refresh takes in what was done to the folder by hand: a copy of a PNG added, then a PNG removed
    robot = next(entry for entry in studio.gallery.list(limit=100) if entry.meta.prompt == "a tin robot")
    copy = studio.gallery.folder / ("copied-" + robot.file_name)
    shutil.copy(studio.gallery.folder / robot.file_name, copy)
    page.get_by_role("button", name="Refresh").click()
    expect(label).to_contain_text(f"· {total} images", timeout=10_000)
    assert studio.gallery.file_path(copy.name) is not None
    (studio.gallery.folder / robot.file_name).unlink()
    page.get_by_role("button", name="Refresh").click()
    expect(label).to_contain_text(f"· {total - 1} images", timeout=10_000)
    assert studio.gallery.file_path(robot.file_name) is None

    # A picture of the page deleted elsewhere (another tab): Gradio refuses a click on it before the app hears of it,
    # so the picture chosen before stayed chosen, and Delete removed it while the grid showed the other selected
    chosen, gone = studio.gallery.list(limit=2)
    page.get_by_role("button", name="⏮ Newest").click()  # the page of these two (other tests' pictures add pages)
    expect(label).to_contain_text("Page 1 of", timeout=10_000)
    page.locator("#gallery-grid button.thumbnail-item").nth(0).click()
    expect(parameters).not_to_have_value("", timeout=10_000)
    studio.gallery.delete(gone.file_name)
    page.locator("#gallery-grid button.thumbnail-item").nth(1).click()
    page.get_by_role("button", name="Delete").click()
    expect(page.get_by_text("The gallery changed since this page was shown").first).to_be_visible(timeout=10_000)
    assert studio.gallery.find(chosen.file_name) is not None
    page.close()


def test_a_file_that_is_not_an_image_gets_our_message_in_img2img_and_png_info(browser, server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("just some text")
    page = open_app(browser, server)
    page.get_by_role("tab", name="Image to image").click()
    page.locator("#img2img-image input[type=file]").set_input_files(str(not_an_image))
    page.locator("#img2img-generate").click()
    expect(page.get_by_text("field 'image': ")).to_be_visible(timeout=20_000)
    expect(page.get_by_text("Could not preprocess")).to_have_count(0)

    page.get_by_role("tab", name="Gallery").click()
    page.get_by_text("PNG info: read the parameters of a picture").click()
    page.locator("#png-info input[type=file]").set_input_files(str(not_an_image))
    expect(page.get_by_text("Not a readable image.")).to_be_visible(timeout=20_000)
    page.close()


def test_early_clicks_warn_and_leave_the_page_usable(browser, server: RunningServer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A raised gr.Error covered every output of the event (the whole form) with an "Error" badge."""
    from playwright.sync_api import expect

    page = open_app(browser, server)
    for button in ("Reuse parameters", "Send to img2img"):
        page.get_by_role("button", name=button).first.click()
        expect(page.get_by_text("Generate something first.").first).to_be_visible(timeout=10_000)
    page.get_by_role("tab", name="Gallery").click()
    page.get_by_role("button", name="Delete").click()
    expect(page.get_by_text("Select an image first.").first).to_be_visible(timeout=10_000)
    page.get_by_role("button", name="Reuse in Text to image").click()
    expect(page.get_by_text("Select an image first.")).to_have_count(2, timeout=10_000)
    expect(page.get_by_text("Error", exact=True)).to_have_count(0)

    page.get_by_text("PNG info: read the parameters of a picture").click()
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32), "teal").save(plain)
    page.locator("#png-info input[type=file]").set_input_files(str(plain))
    expect(
        page.get_by_text("This picture has no A1111 parameters (a PNG 'parameters' chunk or an EXIF UserComment).")
    ).to_have_count(1, timeout=10_000)
    page.close()


def test_one_result_is_shown_whole_and_the_seed_box_is_checked_like_the_api(browser, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    server.studio.engine.cache.evict("tiny-demo")
    page = open_app(browser, server)
    model = page.get_by_label("Model").first
    expect(model).to_have_value("Tiny demo (noise) · ready offline")
    seed = page.get_by_label("Seed (-1: random)").first
    for typed, message in (("1.5", "field 'seed': must be a whole number"), ("-2", "field 'seed': must be from -1")):
        seed.fill(typed)
        page.locator("#txt2img-generate").click()
        expect(page.get_by_text(message).first).to_be_visible(timeout=20_000)
    seed.fill("5")
    prompt = page.get_by_label("Prompt", exact=True).first
    prompt.fill("fox " * 625 + "!")  # pasted past the limit: the box used to cut it silently
    page.locator("#txt2img-generate").click()
    expect(page.get_by_text("field 'prompt': at most 2000 characters (got 2501)").first).to_be_visible(timeout=20_000)
    prompt.fill("a fox")
    set_numbers(page, Steps=2)
    page.locator("#txt2img-generate").click()
    result = page.locator("#txt2img-results img").first
    expect(result).to_be_visible(timeout=60_000)
    picture, frame = result.bounding_box(), page.locator("#txt2img-results").bounding_box()
    assert picture and frame and picture["y"] + picture["height"] <= frame["y"] + frame["height"], (picture, frame)
    assert server.studio.gallery.list(limit=1)[0].meta.seed == 5
    expect(model).to_have_value("Tiny demo (noise) · loaded", timeout=10_000)  # the label follows the generation
    page.close()


def test_the_api_docs_say_what_to_do_when_swagger_cannot_load(browser, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    """Offline (a normal state), the Swagger UI's scripts from the CDN do not load and the page was blank."""
    from playwright.sync_api import expect

    page = browser.new_page()
    page.route(re.compile(r"https://cdn\.jsdelivr\.net/.*"), lambda route: route.abort())
    page.goto(server.url + "/api/docs")
    expect(page.get_by_text("did not load (is this machine offline?)")).to_be_visible(timeout=20_000)
    page.get_by_role("link", name="/api/openapi.json").click()
    expect(page.get_by_text('"openapi"')).to_be_visible(timeout=10_000)
    page.close()


def test_the_docs_tab_shows_the_address_the_page_was_opened_at(browser, server: RunningServer) -> None:  # type: ignore[no-untyped-def]
    """A server on 0.0.0.0 (a LAN, a Space) showed http://127.0.0.1 in every snippet."""
    from playwright.sync_api import expect

    page = browser.new_page()
    address = server.url.replace("127.0.0.1", "localhost")
    page.goto(address + "/")
    page.get_by_role("tab", name="Docs").click()
    expect(page.get_by_text(f'client = Client("{address}")')).to_be_visible(timeout=20_000)
    page.close()
