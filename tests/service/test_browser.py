"""The real pages in headless Debian Chromium (Selenium): upload a picture, see the name and a box drawn on
the canvas; a friendly error for a non-image; a phone-sized layout; the workflow page's client-side checks."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _driver(tmp_path: Path, width: int, height: int):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian chromium + chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome-profile'}",
                 f"--window-size={width},{height}"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)


@pytest.fixture()
def browser(tmp_path) -> Iterator:
    drv = _driver(tmp_path, 1200, 900)
    yield drv
    drv.quit()


def _wait(drv, cond, timeout: float = 90):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(cond)


def _upload(drv, path: Path) -> None:
    from selenium.webdriver.common.by import By

    drv.find_element(By.ID, "file").send_keys(str(path))


def _answered_or_error(drv):
    state = drv.execute_script("return document.body.dataset.state || ''")
    return state if state in ("answered", "error") else False


def _box_pixel(drv) -> dict:
    """The canvas colour in the middle of the first box's left edge, plus the box and colour the page drew."""
    return drv.execute_script("""
        const c = document.getElementById('canvas');
        const boxes = JSON.parse(c.dataset.boxes || '[]');
        if (!boxes.length) return {boxes: []};
        const lw = +c.dataset.lineWidth, [x1, y1, x2, y2] = boxes[0];
        const x = Math.round(Math.max(1, x1 + lw / 2)), y = Math.round((y1 + y2) / 2);
        const px = c.getContext('2d').getImageData(x, y, 1, 1).data;
        return {boxes, color: JSON.parse(c.dataset.colors)[0], px: Array.from(px), w: c.width, h: c.height};
    """)


def test_upload_shows_name_box_topk_and_screenshot(browser, server, service_data, tmp_path):
    from selenium.webdriver.common.by import By

    name = service_data.names[1]
    src = service_data.images(name)[0]
    big = tmp_path / "upload.png"  # a larger copy, as users upload
    Image.open(src).resize((384, 384), Image.NEAREST).save(big)
    browser.get(server.url + "/")
    assert "Who is this" in browser.title
    _wait(browser, lambda d: d.find_element(By.ID, "version").text.startswith("model "))
    _upload(browser, big)
    assert _wait(browser, _answered_or_error) == "answered", browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "result-role").text == name
    info = _box_pixel(browser)
    assert info["boxes"] and info["w"] == info["h"] >= 384  # drawn at (at least) the picture's resolution
    want = tuple(int(info["color"][i:i + 2], 16) for i in (1, 3, 5))
    assert tuple(info["px"][:3]) == want, f"no box stroke at the box edge: {info}"
    bars = browser.find_elements(By.CSS_SELECTOR, "#detections .topk .barrow")
    assert bars and bars[0].find_element(By.CSS_SELECTOR, ".name").text == name
    width = bars[0].find_element(By.CSS_SELECTOR, ".bar > span").get_attribute("style")
    assert "width" in width
    shot = tmp_path / "recognised.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


def test_video_upload_shows_the_frame_with_boxes_and_appearances(browser, server, service_data, tmp_path):
    from selenium.webdriver.common.by import By

    from .conftest import mp4_bytes

    a, b = service_data.names[0], service_data.names[3]
    frames = [Image.open(p).convert("RGB").resize((192, 192)) for p in service_data.images(a)[:4]] * 2
    frames += [Image.open(p).convert("RGB").resize((192, 192)) for p in service_data.images(b)[:4]]
    clip = tmp_path / "clip.webm"  # VP8 in WebM: what Chromium plays
    clip.write_bytes(mp4_bytes(frames, fps=4, container="webm", codec="libvpx"))
    browser.get(server.url + "/")
    _upload(browser, clip)
    assert _wait(browser, _answered_or_error) == "answered", browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "result-role").text == a
    rows = browser.find_elements(By.CSS_SELECTOR, "#appearances tbody tr")
    assert {r.find_elements(By.TAG_NAME, "td")[0].text for r in rows} >= {a, b}
    # the player stops on the main character's best frame and that frame is drawn with its boxes and names
    _wait(browser, lambda d: d.execute_script("return document.getElementById('canvas').dataset.frameTime || false"), 60)
    roles = browser.execute_script("return JSON.parse(document.getElementById('canvas').dataset.frameRoles)")
    assert a in roles
    info = _box_pixel(browser)
    assert info["boxes"] and tuple(info["px"][:3]) == tuple(int(info["color"][i:i + 2], 16) for i in (1, 3, 5)), info
    assert browser.find_element(By.ID, "video").is_displayed() and browser.find_element(By.ID, "canvas").is_displayed()
    # seeking to the other character's appearance redraws that frame
    link = next(r for r in rows if r.find_elements(By.TAG_NAME, "td")[0].text == b).find_element(By.TAG_NAME, "a")
    link.click()
    _wait(browser, lambda d: b in d.execute_script("return JSON.parse(document.getElementById('canvas').dataset.frameRoles || '[]')"), 30)
    assert "Frame at" in browser.find_element(By.ID, "frame-caption").text
    browser.save_screenshot(str(tmp_path / "video.png"))


def test_non_image_gets_a_friendly_message(browser, server, tmp_path):
    from selenium.webdriver.common.by import By

    bogus = tmp_path / "holiday.jpg"
    bogus.write_text("this is a shopping list, not a photo\n" * 20)
    browser.get(server.url + "/")
    _upload(browser, bogus)
    assert _wait(browser, _answered_or_error) == "error"
    box = browser.find_element(By.ID, "error")
    assert box.is_displayed()
    assert "not an image or a video we can read" in box.text and "holiday.jpg" in box.text
    assert "Traceback" not in browser.page_source
    browser.save_screenshot(str(tmp_path / "error.png"))


def test_phone_sized_layout_fits_the_screen(tmp_path, server, service_data):
    from selenium.webdriver.common.by import By

    drv = _driver(tmp_path, 390, 844)
    try:
        drv.get(server.url + "/")
        _upload(drv, service_data.images(service_data.names[0])[0])
        assert _wait(drv, _answered_or_error) == "answered"
        doc_w = drv.execute_script("return document.documentElement.scrollWidth")
        view_w = drv.execute_script("return window.innerWidth")
        assert doc_w <= view_w, "horizontal scrolling on a phone"
        canvas_w = drv.find_element(By.ID, "canvas").rect["width"]
        assert 0 < canvas_w <= view_w
        drv.save_screenshot(str(tmp_path / "phone.png"))
    finally:
        drv.quit()


def fill_character_rows(drv, characters: list[dict]) -> None:
    """Type characters into the /workflow page's rows (name, series, optional tag), adding rows as needed."""
    from selenium.webdriver.common.by import By

    for i, c in enumerate(characters):
        rows = drv.find_elements(By.CSS_SELECTOR, "#char-rows .char-row")
        if i >= len(rows):
            drv.find_element(By.ID, "add-row").click()
            rows = drv.find_elements(By.CSS_SELECTOR, "#char-rows .char-row")
        for cls, key in ((".c-name", "name"), (".c-series", "series"), (".c-tag", "tag")):
            box = rows[i].find_element(By.CSS_SELECTOR, cls)
            box.clear()
            if c.get(key):
                box.send_keys(c[key])


def _row_values(drv) -> list[list[str]]:
    return drv.execute_script("""return [...document.querySelectorAll('#char-rows .char-row')].map(
        (r) => ['.c-name', '.c-series', '.c-tag'].map((s) => r.querySelector(s).value));""")


def _shown_error(drv):
    from selenium.webdriver.common.by import By

    return _wait(drv, lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed() else False, 10)


def test_workflow_page_checks_the_json_before_sending(browser, server):
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/workflow")
    browser.find_element(By.ID, "json-toggle").click()
    area = browser.find_element(By.ID, "characters")
    area.clear()
    area.send_keys('[{"name": "aoba"')  # broken JSON
    browser.find_element(By.ID, "start").click()
    assert "not valid JSON" in _shown_error(browser).text
    assert browser.find_element(By.ID, "progress").get_attribute("class").split().count("hidden") == 1


def test_workflow_page_takes_characters_as_rows_kept_in_sync_with_json(browser, server, tmp_path):
    """Rows (name, series, optional booru tag) with add/remove, and the same list as JSON behind a toggle."""
    import json

    from selenium.webdriver.common.by import By

    browser.get(server.url + "/workflow")
    assert not browser.find_element(By.ID, "characters").is_displayed()  # rows first, the JSON box on request
    fill_character_rows(browser, [{"name": "Hoshino", "series": "Blue Archive"},
                                  {"name": "suzukaze_aoba", "series": "New Game!", "tag": "suzukaze_aoba"},
                                  {"name": "to be removed"}])
    tag_box = browser.find_elements(By.CSS_SELECTOR, "#char-rows .char-row .c-tag")[0]
    assert tag_box.get_attribute("placeholder") == "hoshino_(blue_archive)"  # the tag the collectors would derive
    browser.find_elements(By.CSS_SELECTOR, "#char-rows .char-row .remove-row")[2].click()
    browser.save_screenshot(str(tmp_path / "workflow-rows.png"))

    browser.find_element(By.ID, "json-toggle").click()
    area = browser.find_element(By.ID, "characters")
    assert area.is_displayed() and not browser.find_element(By.ID, "char-rows").is_displayed()
    assert json.loads(area.get_attribute("value")) == [
        {"name": "Hoshino", "series": "Blue Archive"}, {"name": "suzukaze_aoba", "series": "New Game!", "tag": "suzukaze_aoba"}]
    area.clear()
    area.send_keys('[{"name": "takimoto_hifumi", "series": "New Game!"}, "hoshino"]')
    browser.find_element(By.ID, "json-toggle").click()
    assert browser.find_element(By.CSS_SELECTOR, "#char-rows .c-name").is_displayed()
    assert _row_values(browser) == [["takimoto_hifumi", "New Game!", ""], ["hoshino", "", ""]]

    # a row with a series but no name is caught before anything is sent
    fill_character_rows(browser, [{"name": "takimoto_hifumi", "series": "New Game!"}, {"series": "orphan series"}])
    browser.find_element(By.ID, "start").click()
    assert "row 2 needs a name" in _shown_error(browser).text
    assert "hidden" in browser.find_element(By.ID, "progress").get_attribute("class").split()


def test_api_docs_render_offline(browser, server):
    """Swagger UI comes from the app itself (Chromium here has no network): every endpoint is listed."""
    from selenium.webdriver.common.by import By

    browser.get(server.url + "/docs")
    title = _wait(browser, lambda d: (d.find_elements(By.CSS_SELECTOR, ".swagger-ui .info .title") or [False])[0], 60)
    assert "anime_role_detect" in title.text
    paths = {e.get_attribute("data-path") or e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/api/classify", "/api/classify/batch", "/api/feedback", "/api/health"} <= paths, paths
