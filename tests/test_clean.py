"""`python -m app.clean`: out-of-sample ranking of suspicious photos, the review API (moves, rejects,
undo, resume, path checks) and the review page in a real browser."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from support import (
    BEARS,
    CLASS_COLOURS,
    NO_BEARS,
    ROOT,
    ReviewServer,
    axe_serious_violations,
    free_port,
    make_dataset,
    needs_chromium,
    synthetic_image,
)

from app.building.ranking import score_folder
from app.building.review import LOG_NAME, free_name
from app.building.review_app import THUMBNAIL_PX

NOT_BEARS = ROOT.parent / "shared" / "data" / "not-bears"


def clean_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.clean", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def board(size: int = 48) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    b = (((xx // 4) + (yy // 4)) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([b, 255 - b, b], -1))


@pytest.fixture
def noisy_colours(tmp_path: Path) -> tuple[Path, set[str]]:
    """Synthetic classes with two mislabeled photos and one that belongs to no class."""
    data = make_dataset(tmp_path / "data", per_class=15)
    for i in range(2):
        synthetic_image(CLASS_COLOURS["reds"], seed=100 + i).save(data / "blues" / f"red-{i}.jpg")
    board().save(data / "greens" / "board.png")
    return data, {"blues/red-0.jpg", "blues/red-1.jpg", "greens/board.png"}


def test_injected_noise_ranks_at_the_top_of_the_report(noisy_colours, tmp_path):
    data, injected = noisy_colours
    result = clean_cli(str(data), "--report", str(tmp_path / "report.csv"))
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "report.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 48
    assert {"file", "label", "predicted", "score"} <= set(rows[0])
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    top = {r["file"] for r in rows[: 2 * len(injected)]}
    assert injected <= top, [r["file"] for r in rows[:8]]
    by_file = {r["file"]: r for r in rows}
    assert by_file["blues/red-0.jpg"]["predicted"] == "reds" and "likely reds" in by_file["blues/red-0.jpg"]["reason"]
    assert "none of the classes" in by_file["greens/board.png"]["reason"]
    # The second run reads the features from the cache (by file content): no torch import at all.
    start = time.monotonic()
    again = clean_cli(str(data), "--report", str(tmp_path / "again.csv"))
    assert again.returncode == 0 and time.monotonic() - start < 15
    assert (tmp_path / "again.csv").read_text() == (tmp_path / "report.csv").read_text()


@pytest.mark.parametrize("setup,message", [
    ("missing", "data folder not found"),
    ("one class", "need at least two class folders"),
    ("empty class", "class folders with no images: reds"),
    ("undecodable class", "fewer than 2 photos that decode: reds"),
    ("read-only", "is read-only"),
    ("loose photos", "the 12 photos directly in it must go into one sub-folder per class"),
])
def test_bad_data_exits_2_with_one_line(tmp_path, setup, message):
    data = make_dataset(tmp_path / "data", per_class=4)
    args = [str(data)]
    if setup == "missing":
        args = [str(tmp_path / "nope")]
    elif setup == "one class":
        for cls in ("greens", "reds"):
            shutil.rmtree(data / cls)
    elif setup == "empty class":
        shutil.rmtree(data / "reds")
        (data / "reds").mkdir()
    elif setup == "loose photos":
        for photo in sorted(data.rglob("*.jpg")):
            photo.rename(data / f"{photo.parent.name}-{photo.name}")
        for cls in CLASS_COLOURS:
            (data / cls).rmdir()
    elif setup == "undecodable class":
        for f in (data / "reds").iterdir():
            f.write_bytes(b"\xff\xd8 truncated")
    elif setup == "read-only":
        from support import can_mount_read_only

        if not can_mount_read_only():
            pytest.skip("cannot make a private read-only mount here")
        command = ["unshare", "--mount", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(data),
                   sys.executable, "-m", "app.clean", str(data)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        return
    result = clean_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_undecodable_photos_are_listed_first_not_a_crash(noisy_colours):
    data, _ = noisy_colours
    (data / "reds" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    ranking = score_folder(data, threads=1)
    assert ranking.undecodable == ["reds/broken.jpg"]
    assert len(ranking.suspects) == 48


# --- The review API ------------------------------------------------------------------------------


@pytest.fixture
def review(noisy_colours):
    data, _ = noisy_colours
    server = ReviewServer(data)
    yield server, data
    server.stop()


def find(listing: dict, file: str) -> dict:
    return next(item for item in listing["items"] if item["file"] == file)


def test_reject_move_keep_undo_and_the_log(review):
    server, data = review
    listing = server.items()
    assert listing["classes"] == ["blues", "greens", "reds"] and listing["progress"]["total"] == 48
    red = find(listing, "blues/red-0.jpg")
    moved = server.decide(red["id"], "move", "reds").json()
    assert moved["item"]["file"] == "reds/red-0.jpg" and moved["item"]["decision"] == "move"
    assert (data / "reds" / "red-0.jpg").is_file() and not (data / "blues" / "red-0.jpg").exists()

    # A name already taken in the target folder is never overwritten.
    (data / "_rejected" / "greens").mkdir(parents=True)
    (data / "_rejected" / "greens" / "board.png").write_bytes(b"an earlier reject")
    rejected = server.decide(find(listing, "greens/board.png")["id"], "reject").json()
    assert rejected["item"]["file"] == "_rejected/greens/board-1.png"
    assert (data / "_rejected" / "greens" / "board.png").read_bytes() == b"an earlier reject"
    kept = server.decide(find(listing, "reds/0.jpg")["id"], "keep").json()
    progress = {k: v for k, v in kept["progress"].items() if k != "flagged"}
    assert progress == {"reviewed": 3, "total": 48, "kept": 1, "moved": 1, "rejected": 1, "accepted": 0,
                        "unfamiliar": 0, "incoming": 0}

    assert server.undo().json()["item"]["decision"] is None  # the keep
    undone = server.undo().json()["item"]  # the reject: the photo comes back
    assert undone["file"] == "greens/board.png" and (data / "greens" / "board.png").is_file()
    log = [json.loads(line) for line in (data / LOG_NAME).read_text().splitlines()]
    assert [e["action"] for e in log] == ["move", "reject", "keep", "undo", "undo"]
    assert log[0]["from"] == "blues/red-0.jpg" and log[0]["to"] == "reds/red-0.jpg"
    assert sorted(p.name for p in data.rglob("*") if p.is_file()) == sorted(
        [*(f"{i}.jpg" for i in range(15) for _ in range(3)), "red-0.jpg", "red-1.jpg", "board.png", "board.png",
         LOG_NAME])  # nothing deleted, nothing copied


def test_a_restarted_review_shows_what_was_decided_and_can_undo_it(noisy_colours):
    data, _ = noisy_colours
    first = ReviewServer(data)
    listing = first.items()
    first.decide(find(listing, "blues/red-1.jpg")["id"], "move", "reds")
    first.decide(find(listing, "greens/board.png")["id"], "reject")
    first.decide(find(listing, "blues/3.jpg")["id"], "keep")
    first.stop()

    second = ReviewServer(data)  # scores the folders again, as they are now
    try:
        listing = second.items()
        flagged = sum(item["flagged"] for item in listing["items"])
        assert listing["progress"] == {"reviewed": 3, "total": 48, "kept": 1, "moved": 1, "rejected": 1,
                                       "accepted": 0, "unfamiliar": 0, "incoming": 0, "flagged": flagged}
        assert find(listing, "reds/red-1.jpg")["decision"] == "move"
        assert find(listing, "_rejected/greens/board.png")["decision"] == "reject"
        assert find(listing, "blues/3.jpg")["decision"] == "keep"
        second.undo()  # the keep
        item = second.undo().json()["item"]  # the reject, decided before the restart
        assert item["file"] == "greens/board.png" and (data / "greens" / "board.png").is_file()
    finally:
        second.stop()


def test_requests_never_name_paths_and_bad_ones_are_refused(review):
    server, data = review
    before = sorted(str(p) for p in data.rglob("*"))
    for path in ("/thumb/../../etc/passwd", "/photo/%2e%2e%2fetc%2fpasswd", "/photo/-1", "/thumb/abc",
                 "/photo/100000"):
        response = server.http.get(server.url + path, timeout=10)
        assert response.status_code in (400, 404), path
        assert "error" in response.json(), path
    for body in ({"id": "../../etc/passwd", "action": "reject"}, {"id": "blues/0.jpg", "action": "reject"},
                 {"id": True, "action": "keep"}, {"id": 0, "action": "delete"},
                 {"id": 0, "action": "move", "to": "../../outside"}, {"id": 0, "action": "move", "to": "_rejected"}):
        response = server.http.post(server.url + "/api/decide", json=body, timeout=10)
        assert response.status_code == 400, body
    assert server.decide(10_000, "keep").status_code == 404
    not_json = server.http.post(server.url + "/api/decide", data=b"{not json", timeout=10,
                                headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400
    assert server.undo().status_code == 409  # nothing to undo
    assert sorted(str(p) for p in data.rglob("*")) == before


def test_other_web_pages_cannot_drive_the_review(review):
    """What a page on another site could send while the review runs: nothing moves, nothing leaks."""
    server, data = review
    before = sorted(str(p) for p in data.rglob("*"))
    decide = server.url + "/api/decide"
    reject = b'{"id": 0, "action": "reject"}'
    # A cross-site "simple" request: text/plain, another Origin, and no token (it cannot know it).
    simple = requests.post(decide, data=reject, timeout=10,
                           headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert simple.status_code == 403
    # Each guard on its own: no token; the token but another Origin; the token but not JSON.
    assert requests.post(decide, data=reject, timeout=10,
                         headers={"Content-Type": "application/json"}).json()["error"]["code"] == "bad_token"
    assert server.http.post(decide, data=reject, timeout=10, headers={
        "Content-Type": "application/json", "Origin": "http://evil.example"}).json()["error"]["code"] == "cross_origin"
    assert server.http.post(decide, data=reject, timeout=10,
                            headers={"Content-Type": "text/plain"}).status_code == 415
    # DNS rebinding: the attacker's name now points at 127.0.0.1; the Host header still says so.
    rebound = server.http.get(server.url + "/api/items", headers={"Host": "evil.example:8001"}, timeout=10)
    assert rebound.status_code == 403 and str(data) not in rebound.text and "items" not in rebound.json()
    assert requests.get(server.url + "/thumb/0", timeout=10).status_code == 403
    assert sorted(str(p) for p in data.rglob("*")) == before
    # The page itself, opened from the same address with the token, still works.
    assert server.http.post(decide, json={"id": 0, "action": "keep"}, timeout=10,
                            headers={"Origin": server.url}).status_code == 200


def test_a_busy_port_is_one_line_before_any_url(tmp_path):
    import socket

    data = make_dataset(tmp_path / "data", per_class=3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = clean_cli(str(data), "--port", str(taken.getsockname()[1]), timeout=120)
    assert result.returncode == 2
    assert "http://" not in result.stdout
    assert result.stderr.count("\n") == 1 and "--port" in result.stderr, result.stderr


def test_thumbnails_are_small_and_full_photos_only_on_request(review):
    server, data = review
    item = find(server.items(), "greens/board.png")
    thumb = server.http.get(f"{server.url}/thumb/{item['id']}", timeout=10)
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(__import__("io").BytesIO(thumb.content)).size) <= THUMBNAIL_PX
    full = server.http.get(f"{server.url}/photo/{item['id']}", timeout=10)
    assert full.content == (data / "greens" / "board.png").read_bytes()


def test_free_name_never_clobbers(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"1")
    (tmp_path / "a-1.jpg").write_bytes(b"2")
    assert free_name(tmp_path, "a.jpg").name == "a-2.jpg"
    assert free_name(tmp_path, "b.jpg").name == "b.jpg"


# --- Real photos ---------------------------------------------------------------------------------


@pytest.mark.skipif(not (BEARS.is_dir() and NOT_BEARS.is_dir()), reason=NO_BEARS)
def test_injected_label_noise_in_real_bear_photos_ranks_near_the_top(tmp_path):
    """120 photos a class, then 8 grizzlies put in black/, 8 black bears in grizzly/ and 8 photos
    of no bear (cats, cars, food...) in teddys/: precision among the top 24 is printed."""
    rng = random.Random(0)
    data = tmp_path / "data"
    injected = set()
    for cls in ("black", "grizzly", "teddys"):
        (data / cls).mkdir(parents=True)
        for path in rng.sample(sorted((BEARS / cls).iterdir()), 120):
            if path.suffix in (".jpg", ".png", ".webp", ".gif"):
                shutil.copy(path, data / cls / path.name)
    for source, target in (("grizzly", "black"), ("black", "grizzly")):
        pool = sorted(set((BEARS / source).iterdir()) - {data / source / p.name for p in (data / source).iterdir()})
        for path in rng.sample([p for p in pool if p.suffix == ".jpg"], 8):
            shutil.copy(path, data / target / path.name)
            injected.add(f"{target}/{path.name}")
    others = sorted(p for p in NOT_BEARS.rglob("*.jpg"))
    for path in rng.sample(others, 8):
        shutil.copy(path, data / "teddys" / f"nb-{path.name}")
        injected.add(f"teddys/nb-{path.name}")
    ranking = score_folder(data, threads=2)
    top = [s.file for s in ranking.suspects[: len(injected)]]
    precision = len(set(top) & injected) / len(injected)
    found_in_50 = len({s.file for s in ranking.suspects[:50]} & injected) / len(injected)
    print(f"precision among the top {len(injected)}: {precision:.0%}; injected found in the top 50: {found_in_50:.0%}")
    assert precision >= 0.6
    assert found_in_50 >= 0.85


# --- The page, in a real browser -----------------------------------------------------------------


@needs_chromium
@pytest.mark.parametrize("width", [1024, 360])
def test_review_page_with_the_keyboard_and_buttons(review, browser, output_dir, width):
    server, data = review
    context = browser.new_context(viewport={"width": width, "height": 800}, base_url=server.url)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"/?token={server.token}")
    page.wait_for_selector(".review-card")
    cards = page.locator(".review-card")
    assert cards.count() == 48
    # Most suspicious first, thumbnails loaded lazily (the first ones only), file names as text.
    first_files = cards.locator(".file-name").all_inner_texts()[:6]
    assert {"blues/red-0.jpg", "blues/red-1.jpg", "greens/board.png"} <= set(first_files)
    assert page.get_attribute(".review-card img", "loading") == "lazy"
    assert page.inner_text("#progress").startswith("Reviewed 0 of 48")
    flagged = server.items()["progress"]["flagged"]
    assert 3 <= flagged < 48 and page.inner_text("#flagged").startswith(f"{flagged} of 48 photos flagged")
    # The photo is the biggest thing on a card, on a phone and on a desktop.
    photo = page.locator(".review-card .thumb").first.bounding_box()
    body = page.locator(".review-card .card-body").first.bounding_box()
    assert photo["width"] >= min(240, width - 80) and photo["width"] * photo["height"] > body["width"] * 40
    assert page.evaluate("document.documentElement.scrollWidth") <= width

    # Keyboard: the first photo has focus; R rejects it and focus moves on; U undoes.
    first = page.evaluate("document.activeElement.querySelector('.file-name').textContent")
    page.keyboard.press("r")
    page.wait_for_function("document.querySelector('#progress').textContent.startsWith('Reviewed 1 of 48')")
    assert (data / "_rejected" / first).exists()
    assert page.evaluate("document.activeElement.querySelector('.file-name').textContent") != first
    page.keyboard.press("u")
    page.wait_for_function("document.querySelector('#progress').textContent.startsWith('Reviewed 0 of 48')")
    assert (data / first).exists()

    # Buttons: move a mislabeled red to reds; keep a photo with K.
    card_id = page.locator(".review-card", has_text="blues/red-1.jpg").get_attribute("data-id")
    card = page.locator(f".review-card[data-id='{card_id}']")
    card.get_by_role("button", name="Move to reds (3)").click()
    page.wait_for_function("document.querySelector('#progress').textContent.includes('1 moved')")
    assert (data / "reds" / "red-1.jpg").exists()
    assert card.locator(".decision").inner_text() == "Moved to reds"
    assert card.locator(".labels").inner_text().startswith("Folder: reds (was blues)")
    page.locator(".review-card", has_text="greens/0.jpg").focus()
    page.keyboard.press("k")
    page.wait_for_function("document.querySelector('#progress').textContent.includes('1 kept')")
    page.screenshot(path=str(output_dir / f"review-{width}.png"), full_page=False)
    assert axe_serious_violations(page) == []
    assert errors == []
    context.close()


def test_file_names_from_the_internet_are_shown_as_text(tmp_path, browser):
    data = make_dataset(tmp_path / "data", per_class=6)
    synthetic_image(CLASS_COLOURS["reds"]).save(data / "reds" / '<img src=x onerror="window.pwned=1">.jpg')
    server = ReviewServer(data)
    try:
        page = browser.new_page(base_url=server.url)
        page.goto(f"/?token={server.token}")
        page.wait_for_selector(".review-card")
        assert page.evaluate("window.pwned") is None
        assert page.locator(".file-name", has_text="<img src=x").count() == 1
        page.close()
    finally:
        server.stop()


def test_the_command_serves_the_review_page_and_prints_its_url(noisy_colours):
    data, _ = noisy_colours
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "app.clean", str(data), "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("http://" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            lines.append(proc.stdout.readline())
        link = next(line for line in lines if "http://" in line).split()[4]
        url, token = link.split("http://")[1].split("/?token=")
        assert url == f"127.0.0.1:{port}" and len(token) >= 24
        assert requests.get(f"http://{url}/api/items", timeout=5).status_code == 403  # no token
        listing = requests.get(f"http://{url}/api/items", params={"token": token}, timeout=5).json()
        assert listing["progress"]["total"] == 48
        assert requests.get(f"http://{url}/", timeout=5).text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        proc.wait(30)


def test_listening_beyond_this_machine_says_who_can_move_photos(noisy_colours):
    """With --host other than loopback the output says plainly what the link allows (only its
    output is read: no request is sent to the other address)."""
    data, _ = noisy_colours
    proc = subprocess.Popen([sys.executable, "-m", "app.clean", str(data), "--host", "0.0.0.0",
                             "--port", str(free_port())], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not any("warning" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
            lines.append(proc.stdout.readline())
        assert "anyone who can reach it and has the link can move your photos" in lines[-1]
    finally:
        proc.terminate()
        proc.wait(30)
