"""The page's "Wrong answer?" flow in a real browser against the real server: offered only when the
server keeps corrections, nothing sent before the parent chooses and agrees, and what was sent kept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import AppProcess, axe_serious_violations, image_bytes, needs_chromium, synthetic_image

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def feedback_server(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("feedback-page")
    app = AppProcess({"MODEL_PATH": str(tiny_export), "FEEDBACK_DIR": str(root / "kept"),
                      "ALLOW_PRIVATE_URLS": "true"}, root / "server.log")
    app.wait_ready()
    app.folder = root / "kept"
    yield app
    app.stop()


def records(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


def classify_a_photo(page) -> None:
    # The page learns from /model whether corrections are kept; wait for that before classifying.
    page.page.wait_for_function("document.querySelector('#privacy').textContent.includes('unless')")
    page.choose(("red.jpg", image_bytes(synthetic_image((200, 40, 40), size=(320, 240))), "image/jpeg"))
    page.wait_done()


@pytest.mark.parametrize("width", [360, 1024])
def test_a_parent_corrects_an_answer_after_reading_what_is_kept(feedback_server, open_page, screenshots, width):
    before = len(records(feedback_server.folder))
    page = open_page(feedback_server.url, width=width)
    classify_a_photo(page)
    p = page.page
    form = p.locator(".correction-form")
    assert form.is_hidden()
    p.get_by_role("button", name="Wrong answer?").click()
    assert form.is_visible()
    labels = p.locator(".choice").all_inner_texts()
    assert [text.strip() for text in labels] == ["blues", "greens", "reds", "None of these"]
    consent = p.locator(".consent").inner_text()
    assert "kept on this server" in consent and "location" in consent
    assert p.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert axe_serious_violations(p) == []
    p.screenshot(path=str(screenshots / f"correction-{width}.png"), full_page=True)
    assert len(records(feedback_server.folder)) == before  # nothing is sent before Send

    p.get_by_label("greens").check()
    p.get_by_role("button", name="Send photo and answer").click()
    done = p.locator(".correction-done")
    done.wait_for(timeout=30_000)
    assert "Thank you" in done.inner_text()
    kept = records(feedback_server.folder)
    assert len(kept) == before + 1
    newest = max(kept, key=lambda r: r["photo"])
    assert newest["label"] == "greens" and newest["photo"].removesuffix(".jpg") in done.inner_text()
    assert (feedback_server.folder / newest["photo"]).stat().st_size > 0
    assert axe_serious_violations(p) == []


def test_cancel_and_an_unchosen_label_send_nothing(feedback_server, open_page):
    before = len(records(feedback_server.folder))
    page = open_page(feedback_server.url, width=360)
    classify_a_photo(page)
    p = page.page
    sent: list[str] = []
    p.on("request", lambda request: request.url.endswith("/feedback") and sent.append(request.url))
    opener = p.get_by_role("button", name="Wrong answer?")
    opener.focus()
    p.keyboard.press("Enter")  # keyboard alone opens it, and focus moves into the choices
    assert p.evaluate("document.activeElement.type") == "radio"
    assert opener.get_attribute("aria-expanded") == "true"
    p.get_by_role("button", name="Send photo and answer").click()  # no label chosen: the browser asks for one
    p.get_by_label("reds").check()
    p.get_by_role("button", name="Cancel").click()
    assert p.locator(".correction-form").is_hidden()
    assert opener.is_visible() and opener.get_attribute("aria-expanded") == "false"
    assert p.evaluate("document.activeElement.textContent") == "Wrong answer?"
    p.wait_for_timeout(300)
    assert sent == [] and len(records(feedback_server.folder)) == before


def test_an_answer_for_a_photo_from_the_web_can_be_corrected_too(feedback_server, image_server, open_page):
    image_server.routes["/grey.png"] = (200, {"Content-Type": "image/png"},
                                        image_bytes(synthetic_image((128, 128, 128), size=(200, 150)), "PNG"))
    page = open_page(feedback_server.url)
    p = page.page
    p.wait_for_function("document.querySelector('#privacy').textContent.includes('unless')")
    p.fill("#url-input", image_server.url("/grey.png"))
    p.click("#url-button")
    page.wait_done()
    p.get_by_role("button", name="Wrong answer?").click()
    p.get_by_label("None of these").check()
    p.get_by_role("button", name="Send photo and answer").click()
    p.locator(".correction-done").wait_for(timeout=30_000)
    newest = max(records(feedback_server.folder), key=lambda r: r["photo"])
    assert newest["label"] is None


def test_when_the_server_keeps_nothing_the_page_offers_nothing(server, open_page):
    page = open_page(server.url, width=360)
    p = page.page
    p.wait_for_function("document.querySelector('#model-description').textContent.includes('Classes')")
    page.choose(("red.jpg", image_bytes(synthetic_image((200, 40, 40), size=(320, 240))), "image/jpeg"))
    page.wait_done()
    assert p.locator(".correction").count() == 0
    assert p.get_by_role("button", name="Wrong answer?").count() == 0
    assert "not stored." in p.locator("#privacy").inner_text()
