"""The page in a real browser: Playwright (sync API) driving Debian's Chromium against an in-process pyfiledrop.

Never downloads a browser: it uses /usr/bin/chromium and skips with a clear reason when that is missing.
Every wait is on Dropzone's own state or on the DOM, with generous timeouts; no fixed sleeps, no timing asserts.
"""
from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
from conftest import ROOT, sha256

import pyfiledrop

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "artifacts"
WAIT_MS = 120_000  # a shared 2-core machine may be slow; waits end as soon as the state is reached

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]


# -- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def new_page(browser):
    """``new_page(**context_options)``: a page in a fresh context (own localStorage), dialogs recorded."""
    contexts = []

    def make(**options):
        context = browser.new_context(accept_downloads=True, **options)
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        page.dialogs = []

        def on_dialog(dialog):
            page.dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        # Intercept file choosers from the start: Playwright turns interception on without waiting for it, so a
        # listener added just before a fast key press can lose the race and the chooser is never reported.
        page.on("filechooser", lambda chooser: None)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.console_errors = []
        page.on("console", lambda message: page.console_errors.append(message.text) if message.type == "error" else None)
        return page

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def page(new_page):
    return new_page()


# -- helpers ----------------------------------------------------------------------------------------------------

def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def memory_file(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "application/octet-stream", "buffer": data}


# wait_for_function gets functions, never expression strings: the page's CSP has no 'unsafe-eval', and Playwright
# polls an expression with eval, so a string works only when it happens to be true at the first look.
PAGE_READY = "() => Boolean(window.pyfiledrop && window.pyfiledrop.dropzone)"


def open_page(page, server):
    page.goto(server.url + "/")
    page.wait_for_function(PAGE_READY)
    return page


def reload(page):
    page.reload()
    page.wait_for_function(PAGE_READY)


def add_files(page, files):
    page.set_input_files("input.dz-hidden-input", files)


def wait_finished(page, count: int):
    """Until Dropzone holds ``count`` files and each is a success or an error; their statuses."""
    page.wait_for_function(
        """count => {
            const files = window.pyfiledrop.dropzone.files;
            return files.length >= count && files.every(f => f.status === "success" || f.status === "error");
        }""", arg=count, timeout=WAIT_MS)
    return page.evaluate("window.pyfiledrop.dropzone.files.map(f => [f.name, f.status])")


def assert_stored(server, name: str, data: bytes):
    path = server.storage / name
    assert path.is_file(), f"{name!r} not in storage: {sorted(p.name for p in server.storage.iterdir())}"
    assert sha256(path.read_bytes()) == sha256(data)


def throttle(page, bytes_per_second: int):
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {
        "offline": False, "latency": 20, "downloadThroughput": bytes_per_second, "uploadThroughput": bytes_per_second})
    return cdp


def uploaded_names(page) -> list[str]:
    return page.locator("#uploaded li .pf-name").all_text_contents()


# -- 1. uploads of every shape ------------------------------------------------------------------------------------

def test_large_file_in_parallel_chunks(make_server, page, tmp_path):
    server = make_server(chunk_size=4 * 1024 * 1024, parallel_chunks=3)
    data = payload(25 * 1000 * 1000, seed=1)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    chunk_posts, in_flight, most_in_flight = [], set(), [0]

    def sent(request):
        if request.method == "POST" and request.url.endswith("/upload"):
            chunk_posts.append(request)
            in_flight.add(request)
            most_in_flight[0] = max(most_in_flight[0], len(in_flight))

    page.on("request", sent)
    page.on("requestfinished", lambda request: in_flight.discard(request))
    page.on("requestfailed", lambda request: in_flight.discard(request))
    open_page(page, server)
    add_files(page, [str(source)])
    assert wait_finished(page, 1) == [["big.bin", "success"]]
    assert_stored(server, "big.bin", data)
    assert len(chunk_posts) >= pyfiledrop.chunk_count(len(data), 4 * 1024 * 1024)
    assert most_in_flight[0] >= 2  # chunks of one file really went in parallel
    assert page.locator("#dropper .dz-preview.dz-success").count() == 1
    assert uploaded_names(page) == ["big.bin"]
    assert not page.errors


def test_small_empty_and_several_files(make_server, page):
    server = make_server()
    files = {"ten.bin": payload(10, seed=2), "empty.txt": b"", "a.txt": b"alpha\n", "b.txt": payload(70_000, seed=3),
             "c.txt": payload(1, seed=4)}
    open_page(page, server)
    add_files(page, [memory_file("ten.bin", files["ten.bin"])])
    wait_finished(page, 1)
    add_files(page, [memory_file("empty.txt", b"")])
    wait_finished(page, 2)
    add_files(page, [memory_file(name, files[name]) for name in ("a.txt", "b.txt", "c.txt")])
    statuses = wait_finished(page, 5)
    assert sorted(statuses) == sorted([name, "success"] for name in files)
    for name, data in files.items():
        assert_stored(server, name, data)
    assert sorted(uploaded_names(page)) == sorted(files)
    assert not page.errors


def test_markup_in_a_file_name_is_shown_as_text(make_server, page):
    server = make_server()
    name = "<img src=x onerror=alert(1)>.txt"
    data = b"not markup"
    open_page(page, server)
    add_files(page, [memory_file(name, data)])
    assert wait_finished(page, 1) == [[name, "success"]]
    stored = pyfiledrop.sanitize_filename(name)
    assert_stored(server, stored, data)
    assert page.locator("#dropper .pf-name").first.text_content() == name
    assert page.locator("#dropper .pf-status").first.text_content() == "Uploaded, stored as " + stored
    assert uploaded_names(page) == [stored]
    reload(page)
    assert uploaded_names(page) == [stored]
    assert page.locator("main img, #dropper img, #uploaded img").count() == 0
    assert page.dialogs == []
    assert not page.errors


def test_unicode_names(make_server, page):
    server = make_server()
    files = {"café.txt": "café".encode(), "文件.txt": "文件".encode(), "😀.txt": "😀".encode()}
    open_page(page, server)
    add_files(page, [memory_file(name, data) for name, data in files.items()])
    assert sorted(wait_finished(page, 3)) == sorted([name, "success"] for name in files)
    for name, data in files.items():
        assert_stored(server, name, data)
    assert sorted(uploaded_names(page)) == sorted(files)


# -- 2. slow network ----------------------------------------------------------------------------------------------

def test_slow_network_does_not_time_out_queued_chunks(make_server, page, tmp_path):
    server = make_server(timeout_ms=3000, chunk_size=1_000_000)
    data = payload(40 * 1000 * 1000, seed=5)
    source = tmp_path / "slow.bin"
    source.write_bytes(data)
    open_page(page, server)
    throttle(page, 2 * 1024 * 1024)
    add_files(page, [str(source)])
    assert wait_finished(page, 1) == [["slow.bin", "success"]], page.locator("#dropper .pf-error").all_text_contents()
    assert_stored(server, "slow.bin", data)


def test_slow_link_shared_by_two_files(make_server, page, tmp_path):
    # Six chunks in flight share 1 MiB/s: each needs ~6 s in all, twice the timeout, yet never stalls.
    server = make_server(timeout_ms=3000, chunk_size=1_000_000, parallel_chunks=3)
    files = {f"share{i}.bin": payload(6 * 1000 * 1000, seed=40 + i) for i in range(2)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    open_page(page, server)
    throttle(page, 1024 * 1024)
    add_files(page, [str(tmp_path / name) for name in files])
    statuses = wait_finished(page, 2)
    assert sorted(statuses) == sorted([name, "success"] for name in files), \
        page.locator("#dropper .pf-error").all_text_contents()
    for name, data in files.items():
        assert_stored(server, name, data)


def test_stalled_chunk_request_is_retried(make_server, page, monkeypatch):
    server = make_server(timeout_ms=3000)
    put, release, calls = server.engine.put, threading.Event(), []

    def stall_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            release.wait(60)  # the server never answers this request (until the test ends)
            raise pyfiledrop.BadRequest("released")
        return put(*args, **kwargs)

    monkeypatch.setattr(server.engine, "put", stall_first)
    try:
        open_page(page, server)
        add_files(page, [memory_file("stalled.txt", b"stalled once")])
        assert wait_finished(page, 1) == [["stalled.txt", "success"]]
        assert len(calls) >= 2
        assert_stored(server, "stalled.txt", b"stalled once")
    finally:
        release.set()


# -- 3. nothing but the server ------------------------------------------------------------------------------------

def test_page_only_talks_to_its_server(make_server, page):
    server = make_server(allow_downloads=True)
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    open_page(page, server)
    page.wait_for_load_state("networkidle")
    add_files(page, [memory_file("x.txt", b"x" * 1000)])
    assert wait_finished(page, 1) == [["x.txt", "success"]]
    reload(page)
    page.wait_for_load_state("networkidle")
    assert requests
    outside = [url for url in requests if not url.startswith(server.url + "/")]
    assert outside == []
    assert not [text for text in page.console_errors if "Content Security Policy" in text], page.console_errors
    assert not page.errors


# -- 4. the "Uploaded" list ---------------------------------------------------------------------------------------

def test_uploaded_list_links_download_identical_files(make_server, page):
    server = make_server(allow_downloads=True)
    first, second, third = payload(5000, seed=6), payload(3000, seed=7), "ünï".encode()
    open_page(page, server)
    add_files(page, [memory_file("same.bin", first)])
    wait_finished(page, 1)
    add_files(page, [memory_file("same.bin", second), memory_file("ünï code.txt", third)])
    wait_finished(page, 3)
    # The list shows the names the server stored under (from its JSON), not the browser's names.
    expected = {"same.bin": first, "same (1).bin": second, "ünï code.txt": third}
    assert sorted(uploaded_names(page)) == sorted(expected)
    for name, data in expected.items():
        assert_stored(server, name, data)
        link = next(a for a in page.locator("#uploaded li a.pf-name").all() if a.text_content() == name)
        with page.expect_download() as info:
            link.click()
        download = info.value
        assert download.suggested_filename == name
        assert sha256(Path(download.path()).read_bytes()) == sha256(data)


def test_uploaded_list_without_downloads_has_no_links(make_server, page):
    server = make_server()
    open_page(page, server)
    add_files(page, [memory_file("plain.txt", b"plain")])
    wait_finished(page, 1)
    assert uploaded_names(page) == ["plain.txt"]
    assert page.locator("#uploaded a").count() == 0
    assert page.locator("#uploaded-empty").is_hidden()


def test_uploaded_list_survives_reload_and_marks_gone_files(make_server, page):
    server = make_server(allow_downloads=True)
    open_page(page, server)
    assert page.locator("#uploaded-empty").is_visible()
    add_files(page, [memory_file("keep.txt", b"keep"), memory_file("lose.txt", b"lose")])
    wait_finished(page, 2)
    reload(page)
    assert sorted(uploaded_names(page)) == ["keep.txt", "lose.txt"]
    assert page.locator("#uploaded li.pf-gone").count() == 0
    (server.storage / "lose.txt").unlink()
    reload(page)
    gone = page.locator("#uploaded li.pf-gone")
    gone.wait_for()
    assert gone.locator(".pf-name").all_text_contents() == ["lose.txt"]
    assert gone.locator("a[href]").count() == 0
    assert page.locator("#uploaded li:not(.pf-gone) a[href]").count() == 1
    page.locator("#clear").click()
    assert uploaded_names(page) == []
    assert page.locator("#uploaded-empty").is_visible()


def failed_once(page, message_part: str):
    """One failed preview, its error visible without hovering, nothing added to the list."""
    errors = page.locator("#dropper .dz-preview.dz-error")
    assert errors.count() == 1
    box = errors.locator(".pf-error")
    assert box.is_visible()
    assert message_part in box.text_content()
    assert box.text_content().count(message_part) == 1
    assert uploaded_names(page) == []
    assert page.locator("#uploaded-empty").is_visible()
    assert "failed" in page.locator("#overall").text_content()


def test_file_over_the_limit_fails_in_the_page(make_server, page):
    server = make_server(max_size_mb=1)
    open_page(page, server)
    add_files(page, [memory_file("huge.bin", payload(1024 * 1024 + 1, seed=8))])
    assert wait_finished(page, 1) == [["huge.bin", "error"]]
    failed_once(page, "Too large")
    assert list(server.storage.iterdir()) == []


def test_server_413_is_shown_once(make_server, page):
    server = make_server(max_size_mb=1)

    def lie_about_the_limit(route):
        # The page is told a larger limit than the server has, so the server is the one to refuse.
        response = route.fetch()
        body = response.text().replace(f'"maxFileSizeBytes": {1024 * 1024}', f'"maxFileSizeBytes": {10 * 1024 * 1024}')
        route.fulfill(response=response, body=body)

    page.route(server.url + "/", lie_about_the_limit)
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    open_page(page, server)
    add_files(page, [memory_file("toolarge.bin", payload(2 * 1024 * 1024, seed=9))])
    assert wait_finished(page, 1) == [["toolarge.bin", "error"]]
    failed_once(page, "File too large")
    assert len(posts) == 1, posts  # a refusal is not retried
    assert list(server.storage.iterdir()) == []


def test_server_400_is_shown_once(make_server, page, monkeypatch):
    server = make_server()

    def refuse(*args, **kwargs):
        raise pyfiledrop.BadRequest("The test server refuses this chunk.")

    monkeypatch.setattr(server.engine, "put", refuse)
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    open_page(page, server)
    add_files(page, [memory_file("refused.txt", b"refused")])
    assert wait_finished(page, 1) == [["refused.txt", "error"]]
    failed_once(page, "The test server refuses this chunk.")
    assert len(posts) == 1, posts


# -- 5. progress --------------------------------------------------------------------------------------------------

RECORD_PROGRESS = """() => {
    window.pfSamples = [];
    const record = () => {
        const preview = document.querySelector("#dropper .dz-preview");
        if (preview) {
            window.pfSamples.push({
                now: Number(preview.querySelector(".pf-bar").getAttribute("aria-valuenow")),
                width: preview.querySelector("[data-dz-uploadprogress]").style.width,
                status: preview.querySelector(".pf-status").textContent,
                eta: preview.querySelector(".pf-eta").textContent,
                overall: document.getElementById("overall").textContent,
            });
        }
    };
    new MutationObserver(record).observe(document.getElementById("dropper"),
        {subtree: true, attributes: true, childList: true, characterData: true});
}"""


def test_progress_moves_with_bytes_sent(make_server, page):
    # One chunk only: every value between 0 and 100 comes from bytes in flight, not from finished chunks.
    server = make_server(chunk_size=16 * 1024 * 1024)
    data = payload(3 * 1000 * 1000, seed=10)
    open_page(page, server)
    page.evaluate(RECORD_PROGRESS)
    throttle(page, 1024 * 1024)
    add_files(page, [memory_file("progress.bin", data)])
    assert wait_finished(page, 1) == [["progress.bin", "success"]]
    assert_stored(server, "progress.bin", data)
    samples = page.evaluate("window.pfSamples")
    between = sorted({s["now"] for s in samples if 0 < s["now"] < 100})
    assert len(between) >= 3, between
    widths = {s["width"] for s in samples if s["width"] not in ("", "0%", "100%")}
    assert len(widths) >= 3, widths
    assert any("/s" in s["status"] for s in samples), samples[-5:]
    assert any(s["eta"].endswith("left") for s in samples), samples[-5:]
    bar = page.locator("#dropper .pf-bar")
    assert bar.get_attribute("aria-valuenow") == "100"
    assert page.locator("#dropper [data-dz-uploadprogress]").evaluate("e => e.style.width") == "100%"


def test_overall_line_for_a_batch(make_server, page):
    server = make_server(chunk_size=1024 * 1024)
    files = {f"batch{i}.bin": payload(1_500_000, seed=20 + i) for i in range(3)}
    open_page(page, server)
    page.evaluate(RECORD_PROGRESS)
    throttle(page, 2 * 1024 * 1024)
    add_files(page, [memory_file(name, data) for name, data in files.items()])
    assert sorted(wait_finished(page, 3)) == sorted([name, "success"] for name in files)
    overall = [s["overall"] for s in page.evaluate("window.pfSamples")]
    assert any("of 3 files uploaded" in text and "/s" in text and "left" in text for text in overall), overall[-5:]
    page.wait_for_function("() => document.getElementById('overall').textContent.startsWith('3 of 3 files uploaded')")
    for name, data in files.items():
        assert_stored(server, name, data)


# -- 6. phone and desktop -----------------------------------------------------------------------------------------

def populate(page, server):
    """A page with something in it to look at: a batch of two finished uploads and one refused file."""
    open_page(page, server)
    add_files(page, [memory_file("holiday-photos-from-the-seaside-2024-all-of-them-in-one-archive.zip",
                                 payload(300_000, seed=30)),
                     memory_file("notes.txt", b"notes"),
                     memory_file("too-big.iso", payload(1536 * 1024, seed=31))])
    wait_finished(page, 3)
    page.wait_for_function("() => document.getElementById('overall').textContent === '2 of 3 files uploaded, 1 failed'")


@pytest.mark.parametrize("width,height,label", [(390, 844, "phone"), (1280, 800, "desktop")])
def test_layout(make_server, new_page, width, height, label):
    server = make_server(max_size_mb=1, allow_downloads=True)
    page = new_page(viewport={"width": width, "height": height})
    populate(page, server)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    overflow = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert overflow[0] <= overflow[1], overflow
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"page-{label}-{width}.png"), full_page=True)

    # With files in it, the drop area still says what it is and stays a big target for choosing more.
    message = page.locator("#dropper .dz-message")
    assert message.is_visible()
    box = message.bounding_box()
    assert box["height"] >= 44 and box["width"] >= min(width - 60, 300), box
    for selector in ("body", "#dropper .dz-message", "#dropper .pf-name", "#uploaded .pf-name", ".dz-error .pf-error"):
        size = page.locator(selector).first.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")
        assert size >= 14, (selector, size)
    assert page.locator("#dropper .dz-error .pf-error").is_visible()
    with page.expect_file_chooser(timeout=15_000) as chooser:
        page.locator("#dropper .dz-message").click()
    assert chooser.value.is_multiple()


# -- 7. keyboard and screen readers -------------------------------------------------------------------------------

def test_keyboard_and_accessible_name(make_server, page):
    server = make_server()
    open_page(page, server)
    dropper = page.get_by_role("button", name="Upload new files")
    assert dropper.get_attribute("id") == "dropper"
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "dropper":
            break
    assert page.evaluate("document.activeElement.id") == "dropper"
    with page.expect_file_chooser(timeout=15_000) as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files([memory_file("keyboard.txt", b"typed")])
    assert wait_finished(page, 1) == [["keyboard.txt", "success"]]
    assert_stored(server, "keyboard.txt", b"typed")
    page.locator("#dropper").focus()
    with page.expect_file_chooser(timeout=15_000):
        page.keyboard.press(" ")
