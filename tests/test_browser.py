"""The page in a real browser: Playwright (sync API) driving Debian's Chromium against an in-process pyfiledrop.

Never downloads a browser: it uses /usr/bin/chromium and skips with a clear reason when that is missing.
Every wait is on the page's own state (window.pyfiledrop) or on the DOM, with generous timeouts; no fixed sleeps, no timing asserts.
"""
from __future__ import annotations

import functools
import os
import random
import threading
from pathlib import Path

import pytest
from browserkit import BROWSER_MARKS, browser  # noqa: F401 (a fixture)
from conftest import ROOT, sha256

import pyfiledrop

ARTIFACTS = ROOT / "artifacts"
WAIT_MS = 120_000  # a shared 2-core machine may be slow; waits end as soon as the state is reached

pytestmark = BROWSER_MARKS



# -- fixtures ---------------------------------------------------------------------------------------------------

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
PAGE_READY = "() => Boolean(window.pyfiledrop && window.pyfiledrop.ready)"


def open_page(page, server):
    page.goto(server.url + "/")
    page.wait_for_function(PAGE_READY)
    return page


def reload(page):
    page.reload()
    page.wait_for_function(PAGE_READY)


def add_files(page, files):
    page.set_input_files("input[type=file]", files)   # the first: the files input, as an outside suite finds it


def wait_finished(page, count: int):
    """Until the page holds ``count`` files and each is done, failed or cancelled; their states."""
    page.wait_for_function(
        """count => {
            const files = window.pyfiledrop.uploads;
            const rows = document.querySelectorAll("#queue li");
            const shown = [...rows].every(row => /pf-(done|failed|cancelled)/.test(row.className));
            return files.length >= count && files.every(f => !f.active()) && shown
                && rows.length === Math.min(files.length, 60);
        }""", arg=count, timeout=WAIT_MS)
    return page.evaluate("window.pyfiledrop.uploads.map(f => [f.name, f.state])")


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
    server = make_server(chunk_size=4 * 1024 * 1024)
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
    # Each request takes 300 ms more, as over a slow link: the parts in flight then overlap however fast this
    # machine hashes and the server answers (on loopback a part can be answered before the next is hashed).
    network = page.context.new_cdp_session(page)
    network.send("Network.enable")
    network.send("Network.emulateNetworkConditions", {"offline": False, "latency": 300,
                                                      "downloadThroughput": -1, "uploadThroughput": -1})
    add_files(page, [str(source)])
    assert wait_finished(page, 1) == [["big.bin", "done"]]
    assert_stored(server, "big.bin", data)
    assert len(chunk_posts) >= pyfiledrop.chunk_count(len(data), 4 * 1024 * 1024)
    assert most_in_flight[0] >= 3  # parts of one file really went in parallel (up to six)
    assert page.locator("#queue li.pf-done").count() == 1
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
    assert sorted(statuses) == sorted([name, "done"] for name in files)
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
    assert wait_finished(page, 1) == [[name, "done"]]
    stored = pyfiledrop.sanitize_filename(name)
    assert_stored(server, stored, data)
    assert page.locator("#queue .pf-name").first.text_content() == name
    assert page.locator("#queue .pf-status").first.text_content().startswith("Uploaded as " + stored)
    assert uploaded_names(page) == [stored]
    reload(page)
    assert uploaded_names(page) == [stored]
    assert page.locator("main img").count() == 0
    assert page.dialogs == []
    assert not page.errors


def test_unicode_names(make_server, page):
    server = make_server()
    files = {"café.txt": "café".encode(), "文件.txt": "文件".encode(), "😀.txt": "😀".encode()}
    open_page(page, server)
    add_files(page, [memory_file(name, data) for name, data in files.items()])
    assert sorted(wait_finished(page, 3)) == sorted([name, "done"] for name in files)
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
    assert wait_finished(page, 1) == [["slow.bin", "done"]], page.locator("#queue .pf-error").all_text_contents()
    assert_stored(server, "slow.bin", data)


def test_slow_link_shared_by_two_files(make_server, page, tmp_path):
    # Six parts in flight share 1 MiB/s: each needs ~6 s in all, twice the timeout, yet never stalls.
    server = make_server(timeout_ms=3000, chunk_size=1_000_000)
    files = {f"share{i}.bin": payload(6 * 1000 * 1000, seed=40 + i) for i in range(2)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    open_page(page, server)
    throttle(page, 1024 * 1024)
    add_files(page, [str(tmp_path / name) for name in files])
    statuses = wait_finished(page, 2)
    assert sorted(statuses) == sorted([name, "done"] for name in files), \
        page.locator("#queue .pf-error").all_text_contents()
    for name, data in files.items():
        assert_stored(server, name, data)


def wrap_receiving(monkeypatch, engine, wrapper):
    """Route every way bytes reach the engine (a part, or a small file's one request) through wrapper."""
    for method in ("put", "receive_small"):
        receive = getattr(engine, method)
        monkeypatch.setattr(engine, method, functools.partial(wrapper, receive))


def test_stalled_chunk_request_is_retried(make_server, page, monkeypatch):
    server = make_server(timeout_ms=3000)
    release, calls = threading.Event(), []

    def stall_first(receive, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            release.wait(60)  # the server never answers this request (until the test ends)
            raise pyfiledrop.BadRequest("released")
        return receive(*args, **kwargs)

    wrap_receiving(monkeypatch, server.engine, stall_first)
    try:
        open_page(page, server)
        add_files(page, [memory_file("stalled.txt", b"stalled once")])
        assert wait_finished(page, 1) == [["stalled.txt", "done"]]
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
    assert wait_finished(page, 1) == [["x.txt", "done"]]
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


def test_opening_the_page_asks_once_for_every_remembered_file(make_server, page):
    server = make_server()
    open_page(page, server)
    add_files(page, [memory_file("real.txt", b"real")])
    wait_finished(page, 1)
    remembered = page.evaluate("JSON.parse(localStorage.getItem('pyfiledrop.uploaded.v1'))")
    made_up = [{"id": f"pf-{i:040}", "name": f"old {i}.txt", "size": i, "sha256": "", "at": 0} for i in range(499)]
    page.evaluate("entries => localStorage.setItem('pyfiledrop.uploaded.v1', JSON.stringify(entries))",
                  made_up + remembered)
    asked = []
    page.on("request", lambda r: asked.append(r.url) if "/api/uploads" in r.url else None)
    reload(page)
    page.locator("#uploaded li.pf-gone").nth(498).wait_for()
    assert asked == [server.url + "/api/uploads/status"]
    assert page.locator("#uploaded li").count() == 500
    assert page.locator("#uploaded li:not(.pf-gone) .pf-name").all_text_contents() == ["real.txt"]


def failed_once(page, message_part: str):
    """One failed preview, its error visible without hovering, nothing added to the list."""
    errors = page.locator("#queue li.pf-failed")
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
    assert wait_finished(page, 1) == [["huge.bin", "failed"]]
    failed_once(page, "Too large")
    assert page.locator("#queue .pf-action:visible, #retry-failed:visible").count() == 0   # no Retry: same answer
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
    page.on("request", lambda r: posts.append(r.url) if r.url.endswith("/upload") else None)
    open_page(page, server)
    add_files(page, [memory_file("toolarge.bin", payload(2 * 1024 * 1024, seed=9))])
    assert wait_finished(page, 1) == [["toolarge.bin", "failed"]]
    failed_once(page, "File too large")
    assert len(posts) <= 2, posts  # a refusal is not retried: each of the two parts went once at most
    assert list(server.storage.iterdir()) == []


def test_server_400_is_shown_once(make_server, page, monkeypatch):
    server = make_server()

    def refuse(receive, *args, **kwargs):
        raise pyfiledrop.BadRequest("The test server refuses this chunk.")

    wrap_receiving(monkeypatch, server.engine, refuse)
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.url.endswith("/upload") else None)
    open_page(page, server)
    add_files(page, [memory_file("refused.txt", b"refused")])
    assert wait_finished(page, 1) == [["refused.txt", "failed"]]
    failed_once(page, "The test server refuses this chunk.")
    assert len(posts) == 1, posts


# -- 5. progress --------------------------------------------------------------------------------------------------

RECORD_PROGRESS = """() => {
    window.pfSamples = [];
    const record = () => {
        const row = document.querySelector("#queue li");
        if (row) {
            window.pfSamples.push({
                now: row.querySelector("progress").value,
                status: row.querySelector(".pf-status").textContent,
                overall: document.getElementById("overall").textContent,
            });
        }
    };
    new MutationObserver(record).observe(document.querySelector("main"),
        {subtree: true, attributes: true, childList: true, characterData: true});
}"""


def test_progress_moves_with_bytes_sent(make_server, page):
    server = make_server(chunk_size=16 * 1024 * 1024)
    data = payload(3 * 1000 * 1000, seed=10)
    open_page(page, server)
    page.evaluate(RECORD_PROGRESS)
    throttle(page, 1024 * 1024)
    add_files(page, [memory_file("progress.bin", data)])
    assert wait_finished(page, 1) == [["progress.bin", "done"]]
    assert_stored(server, "progress.bin", data)
    samples = page.evaluate("window.pfSamples")
    between = sorted({s["now"] for s in samples if 0 < s["now"] < 100})
    assert len(between) >= 3, between
    assert any("/s" in s["status"] and s["status"].endswith("left") for s in samples), samples[-5:]
    assert not [s for s in samples if "NaN" in s["status"] + s["overall"]], samples[-5:]
    page.wait_for_function("() => document.querySelector('#queue .pf-status').textContent.includes('sha256 checked')")
    assert sha256(data)[:16] in page.locator("#queue .pf-status").text_content()
    assert page.locator("#queue progress").evaluate("e => e.value") == 100


def test_overall_line_for_a_batch(make_server, page):
    server = make_server(chunk_size=1024 * 1024)
    files = {f"batch{i}.bin": payload(1_500_000, seed=20 + i) for i in range(3)}
    open_page(page, server)
    page.evaluate(RECORD_PROGRESS)
    throttle(page, 2 * 1024 * 1024)
    add_files(page, [memory_file(name, data) for name, data in files.items()])
    assert sorted(wait_finished(page, 3)) == sorted([name, "done"] for name in files)
    overall = [s["overall"] for s in page.evaluate("window.pfSamples")]
    assert any("of 3 files uploaded" in text and "/s" in text and "left" in text for text in overall), overall[-5:]
    page.wait_for_function("() => document.getElementById('overall').textContent.startsWith('3 of 3 files uploaded')")
    # a screen reader hears the outcome once, in a polite live region, not every tick of the progress
    page.wait_for_function("() => document.getElementById('announce').textContent === '3 of 3 files uploaded.'")
    assert page.locator("#announce").get_attribute("aria-live") == "polite"
    for name, data in files.items():
        assert_stored(server, name, data)


def test_small_sizes_are_whole_bytes(make_server, page):
    server = make_server()
    open_page(page, server)
    add_files(page, [memory_file("tiny.txt", b"x" * 59)])
    wait_finished(page, 1)
    assert page.locator("#uploaded .pf-meta").first.text_content() == "59 B"


# -- 6. cancel and retry ------------------------------------------------------------------------------------------

def test_cancel_stops_the_upload_and_removes_its_partial_file(make_server, page, tmp_path):
    server = make_server(chunk_size=1024 * 1024)
    source = tmp_path / "cancel.bin"
    source.write_bytes(payload(30 * 1000 * 1000, seed=11))
    open_page(page, server)
    throttle(page, 2 * 1024 * 1024)
    add_files(page, [str(source)])
    page.wait_for_function("() => window.pyfiledrop.uploads[0].acked > 0")
    page.get_by_role("button", name="Cancel cancel.bin").click()
    assert wait_finished(page, 1) == [["cancel.bin", "cancelled"]]
    deadline = threading.Event()
    for _ in range(200):
        if not [name for name in os.listdir(server.chunks) if name.endswith(".part")]:
            break
        deadline.wait(0.05)
    assert [name for name in os.listdir(server.chunks) if name.endswith(".part")] == []
    upload_id = page.evaluate("window.pyfiledrop.uploads[0].id")
    assert server.engine.info(upload_id).state is pyfiledrop.State.DELETED
    assert list(server.storage.iterdir()) == []
    assert "1 cancelled" in page.locator("#overall").text_content()
    page.get_by_role("button", name="Retry cancel.bin").wait_for()


def test_a_failed_file_offers_retry(make_server, page, monkeypatch):
    server = make_server()

    def refuse(receive, *args, **kwargs):
        raise pyfiledrop.BadRequest("The test server refuses this chunk.")

    with monkeypatch.context() as refusing:
        wrap_receiving(refusing, server.engine, refuse)
        open_page(page, server)
        add_files(page, [memory_file("again.txt", b"again")])
        assert wait_finished(page, 1) == [["again.txt", "failed"]]
    page.get_by_role("button", name="Retry again.txt").click()
    assert wait_finished(page, 1) == [["again.txt", "done"]]
    assert_stored(server, "again.txt", b"again")
    page.wait_for_function("() => document.getElementById('overall').textContent === '1 of 1 file uploaded'")


# -- 7. phone and desktop -----------------------------------------------------------------------------------------

LONG_NAME = "holiday-photos-from-the-seaside-2024-all-of-them-in-one-archive-and-then-some-more.zip"


def populate(page, server):
    """A page with something in it to look at: a batch of two finished uploads and one refused file."""
    open_page(page, server)
    add_files(page, [memory_file(LONG_NAME, payload(300_000, seed=30)),
                     memory_file("notes.txt", b"notes"),
                     memory_file("too-big.iso", payload(1536 * 1024, seed=31))])
    wait_finished(page, 3)
    page.wait_for_function("() => document.getElementById('overall').textContent === '2 of 3 files uploaded, 1 failed'")


@pytest.mark.parametrize("width,height,label,scheme", [(360, 740, "phone", "light"), (1280, 800, "desktop", "light"),
                                                       (360, 740, "phone-dark", "dark")])
def test_layout(make_server, new_page, width, height, label, scheme):
    server = make_server(max_size_mb=1, allow_downloads=True)
    page = new_page(viewport={"width": width, "height": height}, color_scheme=scheme)
    populate(page, server)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    overflow = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert overflow[0] <= overflow[1], overflow
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"page-{label}-{width}.png"), full_page=True)

    # With files in it, the drop area still says what it is and its buttons stay big targets.
    button = page.get_by_role("button", name="Choose files")
    box = button.bounding_box()
    assert box["height"] >= 44 and box["width"] >= 100, box
    for selector in ("body", "#dropper p", "#queue .pf-name", "#uploaded .pf-name", ".pf-failed .pf-error"):
        size = page.locator(selector).first.evaluate("e => parseFloat(getComputedStyle(e).fontSize)")
        assert size >= 14, (selector, size)
    assert page.locator("#queue .pf-failed .pf-error").is_visible()
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    dark = sum(int(n) for n in background[background.index("(") + 1:-1].split(",")[:3]) < 3 * 96
    assert dark == (scheme == "dark"), background
    with page.expect_file_chooser(timeout=15_000) as chooser:
        button.click()
    assert chooser.value.is_multiple()


# -- 8. keyboard and screen readers -------------------------------------------------------------------------------

def test_keyboard_and_accessible_names(make_server, page):
    server = make_server()
    open_page(page, server)
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "choose-files":
            break
    assert page.evaluate("document.activeElement.id") == "choose-files"
    with page.expect_file_chooser(timeout=15_000) as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files([memory_file("keyboard.txt", b"typed")])
    assert wait_finished(page, 1) == [["keyboard.txt", "done"]]
    assert_stored(server, "keyboard.txt", b"typed")
    assert page.get_by_role("progressbar", name="keyboard.txt").count() == 1
    assert page.locator("[role=button] #queue, [role=button] progress").count() == 0   # no cards in a button
    page.get_by_role("button", name="Choose a folder").focus()
    with page.expect_file_chooser(timeout=15_000):
        page.keyboard.press(" ")
