"""`python -m app.clean DATA --incoming FEEDBACK_DIR`: corrections kept by the service reviewed into
the data (accept, move, none of these, reject), with the same log, resume and undo as the rest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import (
    CLASS_COLOURS,
    ROOT,
    ReviewServer,
    axe_serious_violations,
    image_bytes,
    make_dataset,
    needs_chromium,
    synthetic_image,
)

from app.building.datasets import find_classes
from app.building.review import INCOMING, LOG_NAME
from app.core.feedback import FeedbackStore, photo_to_keep


def keep(store: FeedbackStore, colour: tuple[int, int, int], label: str | None, answer: str, seed: int) -> str:
    """A correction kept exactly as the server keeps one (the same store and re-encoding)."""
    photo = photo_to_keep(image_bytes(synthetic_image(colour, seed=seed)), 50_000_000)
    others = [c for c in sorted(CLASS_COLOURS) if c != answer]
    predictions = [[answer, 0.8], [others[0], 0.15], [others[1], 0.05]]
    return store.keep(photo, label, predictions, unfamiliar=label is None, model_sha256="ab" * 32).photo


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    data = make_dataset(tmp_path / "data", per_class=10)
    incoming = tmp_path / "feedback"
    store = FeedbackStore(incoming, 10 * 1024 * 1024)
    names = {
        "accept": keep(store, CLASS_COLOURS["reds"], "reds", "blues", 200),
        "move": keep(store, CLASS_COLOURS["greens"], "blues", "blues", 201),
        "none": keep(store, (128, 128, 128), None, "reds", 202),
        "reject": keep(store, CLASS_COLOURS["blues"], "greens", "blues", 203),
    }
    return data, incoming, names


def files_under(*folders: Path) -> set[str]:
    return {p.name for folder in folders for p in folder.rglob("*") if p.is_file() and p.name != LOG_NAME}


def test_corrections_come_first_and_each_decision_moves_the_photo_and_is_logged(folders):
    data, incoming, names = folders
    everything = files_under(data, incoming)
    server = ReviewServer(data, incoming)
    try:
        listing = server.items()
        assert listing["incoming"] == str(incoming.resolve())
        first = listing["items"][:4]
        assert [item["file"] for item in first] == [INCOMING + n for n in sorted(names.values())]
        by_name = {item["file"].removeprefix(INCOMING): item for item in first}
        accept = by_name[names["accept"]]
        assert accept["incoming"] and accept["label"] == "reds" and accept["predicted"] == "blues"
        assert accept["predicted_prob"] == 0.8 and "the parent says reds; the model said blues" in accept["reason"]
        assert by_name[names["none"]]["label"] == "none of these"
        assert listing["progress"]["incoming"] == 4 and listing["progress"]["total"] == 34

        assert server.decide(accept["id"], "keep").json()["item"]["decision"] == "accept"
        assert (data / "reds" / names["accept"]).is_file()
        moved = server.decide(by_name[names["move"]]["id"], "move", "greens").json()["item"]
        assert moved["file"] == f"greens/{names['move']}" and (data / "greens" / names["move"]).is_file()
        none = server.decide(by_name[names["none"]]["id"], "keep").json()["item"]
        assert none["file"] == f"_unfamiliar/{names['none']}" and none["moved_to"] == "_unfamiliar"
        rejected = server.decide(by_name[names["reject"]]["id"], "reject").json()
        assert rejected["item"]["file"] == f"{INCOMING}_rejected/{names['reject']}"
        assert (incoming / "_rejected" / names["reject"]).is_file()
        assert rejected["progress"]["accepted"] == 2 and rejected["progress"]["rejected"] == 1

        # "None of these" works on any photo: one of the data's own goes to _unfamiliar too.
        own = next(item for item in listing["items"] if item["file"] == "blues/3.jpg")
        assert server.decide(own["id"], "unfamiliar").json()["item"]["file"] == "_unfamiliar/3.jpg"

        # Nothing deleted; records stay in the feedback folder; no new class appears for app.train.
        assert files_under(data, incoming) == everything
        assert len(list(incoming.glob("*.json"))) == 4
        assert find_classes(data) == ["blues", "greens", "reds"]
        log = [json.loads(line) for line in (data / LOG_NAME).read_text().splitlines()]
        assert [e["action"] for e in log] == ["accept", "move", "accept", "reject", "unfamiliar"]
        assert log[0]["from"] == INCOMING + names["accept"] and log[0]["class"] == "reds"

        # Undo puts the last ones back where they came from, the feedback folder included.
        assert server.undo().status_code == 200 and (data / "blues" / "3.jpg").is_file()
        assert server.undo().json()["item"]["file"] == INCOMING + names["reject"]
        assert (incoming / names["reject"]).is_file()
    finally:
        server.stop()

    # A restarted review shows what was decided, and the pending correction first again.
    server = ReviewServer(data, incoming)
    try:
        listing = server.items()
        assert listing["items"][0]["file"] == INCOMING + names["reject"] and listing["items"][0]["decision"] is None
        accepted = next(item for item in listing["items"] if item["file"] == f"reds/{names['accept']}")
        assert accepted["decision"] == "accept" and accepted["incoming"] and accepted["label"] == "reds"
        assert listing["progress"]["accepted"] == 2 and listing["progress"]["moved"] == 1
        # ...and can still undo an earlier run's decision: the photo goes back to the feedback folder.
        assert server.undo().json()["item"]["file"] == INCOMING + names["none"]
        assert (incoming / names["none"]).is_file() and not (data / "_unfamiliar" / names["none"]).exists()
    finally:
        server.stop()


def test_bad_decisions_on_corrections_are_refused(folders):
    data, incoming, names = folders
    server = ReviewServer(data, incoming)
    try:
        item = server.items()["items"][0]
        assert server.decide(item["id"], "move", "../../etc").status_code == 400
        assert server.decide(item["id"], "delete").status_code == 400
        (incoming / item["file"].removeprefix(INCOMING)).unlink()
        assert server.decide(item["id"], "keep").status_code == 409
    finally:
        server.stop()


@pytest.mark.parametrize("args, message", [
    (["--incoming", "{tmp}/missing"], "feedback folder not found"),
    (["--incoming", "{tmp}/feedback", "--report", "{tmp}/r.csv"], "--incoming is reviewed on the page"),
])
def test_the_command_says_in_one_line_what_is_wrong(folders, tmp_path, args, message):
    data, _, _ = folders
    args = [a.format(tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, "-m", "app.clean", str(data), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and message in done.stderr, done.stderr


@needs_chromium
def test_the_review_page_shows_the_parents_label_and_accepts_with_k(folders, browser, output_dir):
    data, incoming, names = folders
    server = ReviewServer(data, incoming)
    try:
        context = browser.new_context(viewport={"width": 360, "height": 800}, base_url=server.url)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"/?token={server.token}")
        page.wait_for_selector(".review-card.incoming")
        first = page.locator(".review-card").first
        assert "Parent says: reds · model said: blues (80%)" in first.locator(".labels").inner_text()
        assert first.get_by_role("button", name="Accept as reds (K)").is_visible()
        assert "corrections sent from the page" in page.inner_text("#folder")
        page.keyboard.press("k")  # the first card has focus
        page.wait_for_function("document.querySelector('#progress').textContent.includes('1 accepted')")
        assert (data / "reds" / names["accept"]).is_file()
        assert first.locator(".decision").inner_text() == "Accepted into reds"
        page.keyboard.press("n")  # focus moved on to the next correction: none of these
        page.wait_for_function("document.querySelector('#progress').textContent.includes('1 none of these')")
        assert len(list((data / "_unfamiliar").iterdir())) == 1
        page.screenshot(path=str(output_dir / "review-incoming-360.png"))
        assert axe_serious_violations(page) == []
        assert errors == []
        context.close()
    finally:
        server.stop()
