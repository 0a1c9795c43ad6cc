"""The results explorer (issue 17): static pages opened from disk in a real browser, headless Chromium
driven over the DevTools protocol (a pipe, no extra Python package): every page loads without console
errors, every linked image and file exists, and the table of images sorts when a header is clicked."""

import json
import os
import select
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from click.testing import CliRunner

from stages.cli import cli

CHROMIUM = next((path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if path), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
IMAGES = 3


def lds(*args) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """A kq and a vv run of tiny-vit on one extract, laid out as the workflow lays them out, and the report."""
    root = tmp_path_factory.mktemp("explorer")
    results, store = root / "results", ["--store", root / "store"]
    model = results / "shapes" / "tiny-vit"
    lds("preprocess", "--dataset", f"synthetic-shapes:{IMAGES}", "--size", 64, "--shard-size", IMAGES, *store, "--manifest", model / "shard-0/preprocess.json")
    lds("extract", "--input", model / "shard-0/preprocess.json", "--model", "tiny-vit", *store, "--manifest", model / "shard-0/extract.json")
    for graph, run in (("kq", model), ("vv", results / "shapes" / "tiny-vit@vv")):
        lds("solve", "--input", model / "shard-0/extract.json", "--solver", "exact", "--graph", graph, "--channels", 7, *store, "--manifest", run / "shard-0/solve.json")
        lds("decode", "--input", run / "shard-0/solve.json", "--clusters", 3, "--instances", "--figures", run / "figures", *store, "--manifest", run / "shard-0/decode.json")
        lds("evaluate", "--input", run / "shard-0/decode.json", "--metrics", run / "metrics.json", "--layers-csv", run / "layers.csv", *store, "--manifest", run / "evaluate.json")
    lds("report", "--results", results)
    return results


def test_the_report_writes_an_explorer_page_per_image_and_the_per_layer_figure(results):
    runs = json.loads((results / "metrics.json").read_text())["runs"]
    assert [(r["model"], r["graph"]) for r in runs] == [("tiny-vit", "kq"), ("tiny-vit", "vv")]
    layers = (results / "shapes" / "tiny-vit@vv" / "layers.csv").read_text().splitlines()
    assert layers[0] == "graph,layer,head,agreement,layer_xy_r2" and len(layers) == 1 + 4 * 4 and layers[1].startswith("vv,block00,head0,")
    explorer = results / "explorer" / "shapes" / "tiny-vit"
    names = [f"shapes-{i:04d}" for i in range(IMAGES)]
    assert sorted(p.name for p in explorer.iterdir()) == sorted(
        ["layers.png"] + [f"{n}{suffix}" for n in names for suffix in (".html", ".eigenvectors.png", ".regions.png")])
    page = (explorer / "shapes-0001.html").read_text()
    for link in ("../../../index.html", "shapes-0000.html", "shapes-0002.html", "../../../shapes/tiny-vit%40vv/figures/shapes-0001.png"):
        assert f"href='{link}'" in page
    index = (results / "index.html").read_text()
    assert "What and where" in index and "<table class='sortable'>" in index and index.count("explorer/shapes/tiny-vit/shapes-") == IMAGES


def test_explorer_images_limits_the_pages_and_says_so(results, tmp_path):
    limited = tmp_path / "results"
    shutil.copytree(results, limited)
    shutil.rmtree(limited / "explorer")
    lds("report", "--results", limited, "--explorer-images", 1)
    explorer = limited / "explorer" / "shapes" / "tiny-vit"
    assert sorted(p.name for p in explorer.iterdir()) == ["layers.png", "shapes-0000.eigenvectors.png", "shapes-0000.html", "shapes-0000.regions.png"]
    index = (limited / "index.html").read_text()
    assert index.count("explorer/shapes/tiny-vit/shapes-") == 1 and "Pages for the first 1 of 3 images" in index
    assert "shapes-0001.html" not in (explorer / "shapes-0000.html").read_text()  # no link to a page not written


class Browser:
    """Headless Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe: commands on fd 3,
    replies and events on fd 4, each a JSON text ended by a NUL byte)."""

    def __init__(self, profile: Path):
        commands, self.replies = os.pipe(), os.pipe()

        def wire():  # in the child: its fds 3 and 4 are the pipe ends
            os.dup2(commands[0], 3)
            os.dup2(self.replies[1], 4)

        self.process = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands[0])
        os.close(self.replies[1])
        self.out, self.buffer, self.count, self.events = commands[1], b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=self.session)

    def receive(self, timeout: float = 60) -> dict:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.replies[0]], [], [], timeout)
            assert ready, "Chromium did not answer"
            chunk = os.read(self.replies[0], 1 << 16)
            assert chunk, "Chromium closed the pipe"
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.count += 1
        os.write(self.out, json.dumps({"id": self.count, "method": method, "params": params, **({"sessionId": session} if session else {})}).encode() + b"\0")
        while True:
            message = self.receive()
            if message.get("id") == self.count:
                assert "error" not in message, message
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=self.session, expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def open(self, path: Path) -> list[str]:
        """Load a page; the console errors, uncaught exceptions and failed loads it caused."""
        self.events = []
        self.call("Page.navigate", session=self.session, url=path.as_uri())
        while not any(event.get("method") == "Page.loadEventFired" for event in self.events):
            self.events.append(self.receive())
        self.evaluate("1")  # a round trip: whatever the page logged while loading has arrived
        errors = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("exception", {}).get("description") or params["exceptionDetails"]["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                errors.append(" ".join(str(arg.get("value")) for arg in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry']['text']} {params['entry'].get('url', '')}")
        return errors

    def close(self) -> None:
        self.call("Browser.close")
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@needs_chromium
def test_every_page_loads_without_console_errors_and_every_linked_image_and_file_exists(results, browser):
    pages, seen = [results / "index.html"], set()
    while pages:
        page = pages.pop()
        if page in seen:
            continue
        seen.add(page)
        assert browser.open(page) == [], page
        images = browser.evaluate("Array.from(document.images).map(i => [i.src, i.complete && i.naturalWidth > 0])")
        assert images or page.name != "index.html"
        for source, shown in images:
            assert shown and Path(unquote(urlparse(source).path)).is_file(), (page, source)
        for link in browser.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"):
            target = Path(unquote(urlparse(link).path))
            assert target.is_file(), (page, link)
            if target.suffix == ".html":
                pages.append(target)
    assert len(seen) == 1 + IMAGES  # the index and a page per image


@needs_chromium
def test_the_table_of_images_sorts_by_the_clicked_column(results, browser):
    assert browser.open(results / "index.html") == []
    table = "document.querySelector('table.sortable')"
    headers = browser.evaluate(f"Array.from({table}.tHead.rows[0].cells).map(c => c.textContent)")
    assert headers[:3] == ["image", "X-Y R² (kq)", "X-Y error (kq)"] and "matched mIoU (vv)" in headers

    def click(column: int) -> list[list[str]]:
        """Click a header; the (image, its value in that column) of each row, top to bottom."""
        browser.evaluate(f"{table}.tHead.rows[0].cells[{column}].click()")
        return browser.evaluate(f"Array.from({table}.tBodies[0].rows).map(r => [r.cells[0].textContent, r.cells[{column}].dataset.value])")

    column = headers.index("X-Y R² (vv)")
    high_first = click(column)
    values = [float(value) for _, value in high_first]
    assert values == sorted(values, reverse=True) and len(values) == IMAGES and len(set(values)) == IMAGES
    assert click(column) == high_first[::-1]  # a second click: low to high
    assert browser.evaluate(f"{table}.tHead.rows[0].cells[{column}].dataset.order") == "ascending"
    assert [name for name, _ in click(0)] == [f"shapes-{i:04d}" for i in range(IMAGES)]  # names A to Z
