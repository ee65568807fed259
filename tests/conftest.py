from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from pages import Page
from support import CHROMIUM, CHROMIUM_ARGS, ROOT, AppProcess, LocalHTTPServer, make_dataset

OUTPUT = ROOT / "test-output"


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT.mkdir(exist_ok=True)
    return OUTPUT


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real fastai export of a tiny CNN trained for ten epochs on synthetic images, in seconds.
    What the command printed is kept beside it, in `train-output.txt`."""
    from app.train import main

    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "data")
    out = root / "model"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        status = main([str(data), "--arch", "tiny_cnn", "--no-pretrained", "--epochs", "10", "--freeze-epochs", "0",
                       "--lr", "1e-2", "--size", "32", "--bs", "8", "--workers", "0", "--quiet", "--out", str(out)])
    (root / "train-output.txt").write_text(printed.getvalue())
    assert status == 0, printed.getvalue()
    return out / "export.pkl"


@pytest.fixture(scope="session")
def other_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny model: the same classes, trained with another seed on more photos."""
    from app.train import main

    root = tmp_path_factory.mktemp("other")
    data = make_dataset(root / "data", per_class=14)
    out = root / "model"
    assert main([str(data), "--arch", "tiny_cnn", "--no-pretrained", "--epochs", "6", "--freeze-epochs", "0",
                 "--lr", "1e-2", "--size", "32", "--bs", "8", "--workers", "0", "--quiet", "--seed", "7",
                 "--out", str(out)]) == 0
    return out / "export.pkl"


@pytest.fixture(scope="session")
def small_model(tmp_path_factory: pytest.TempPathFactory):
    """A student's small set at `app.train`'s defaults (the pretrained EfficientNet-Lite0 body, a
    linear head): 12 synthetic photos a class from four sources. Its card, what training printed,
    and its output folder."""
    from app.train import main

    root = tmp_path_factory.mktemp("small")
    data = make_dataset(root / "data", per_class=12)
    # Four sources, as SOURCES.csv names them for the shared photos: each photo's `repo`.
    rows = [f"{p.relative_to(data)},{p.parent.name},owner/source-{i % 4}"
            for i, p in enumerate(sorted(data.glob("*/*.jpg")))]
    (data / "SOURCES.csv").write_text("file,class,repo\n" + "\n".join(rows) + "\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        status = main([str(data), "--out", str(root / "model"), "--quiet"])
    assert status == 0, printed.getvalue()
    return json.loads((root / "model" / "model-card.json").read_text()), printed.getvalue(), root / "model"


@pytest.fixture(scope="session")
def tiny_learner(tiny_export: Path):
    from fastai.learner import load_learner

    return load_learner(tiny_export, cpu=True)


@pytest.fixture
def model_copy(tiny_export: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny export (with its card) that a test may break or move."""
    dest = tmp_path / "model"
    shutil.copytree(tiny_export.parent, dest, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.json"))
    return dest / "export.pkl"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium, driven by Playwright (which never downloads a browser of its own here).
    Per module: Playwright's sync API keeps an event loop running in this thread while it is open,
    and other tests call asyncio.run()."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def image_server():
    server = LocalHTTPServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def server(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory):
    """The real server (`python -m app`) on the tiny export, allowed to fetch from loopback."""
    log = tmp_path_factory.mktemp("logs") / "server.log"
    app = AppProcess({"MODEL_PATH": str(tiny_export), "ALLOW_PRIVATE_URLS": "true", "FETCH_TIMEOUT_S": "2",
                      "MAX_UPLOAD_MB": "2"}, log)
    yield app.wait_ready()
    app.stop()


@pytest.fixture(scope="module")
def screenshots(output_dir):
    folder = output_dir / "screenshots"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture
def open_page(browser):
    pages = []

    def open_(base_url: str, **kwargs) -> Page:
        page = Page(browser, base_url, **kwargs)
        pages.append(page)
        return page

    yield open_
    for page in pages:
        page.close()
