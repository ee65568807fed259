"""A browser page on one of the project's pages, for the tests that drive it in Chromium."""

from __future__ import annotations


class Page:
    """A browser page that records console errors and the upload bodies it sends."""

    def __init__(self, browser, base_url: str, width: int = 1024, height: int = 800):
        self.context = browser.new_context(viewport={"width": width, "height": height}, base_url=base_url)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.uploads: list[str] = []
        self.page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        # Remember every blob the page puts in a FormData, to look at what it uploads.
        self.page.add_init_script("""
            window.uploadedBlobs = [];
            const append = FormData.prototype.append;
            FormData.prototype.append = function (name, value, ...rest) {
                if (value instanceof Blob) window.uploadedBlobs.push(value);
                return append.call(this, name, value, ...rest);
            };""")
        self.page.on("request", self._record)
        self.page.goto("/")
        self.page.wait_for_function("document.querySelector('#model-description') !== null")

    def _record(self, request) -> None:
        if request.url.endswith("/upload"):
            self.uploads.append(request.url)

    def choose(self, *files: tuple[str, bytes, str]) -> None:
        with self.page.expect_file_chooser() as chooser:
            self.page.click("#choose-button")
        chooser.value.set_files([{"name": n, "mimeType": m, "buffer": b} for n, b, m in files])

    def wait_done(self, count: int = 1) -> None:
        self.page.wait_for_function(
            "n => document.querySelectorAll('.card .verdict, .card.error').length >= n", arg=count, timeout=60_000)

    def close(self) -> None:
        self.context.close()
        assert self.errors == [], self.errors
