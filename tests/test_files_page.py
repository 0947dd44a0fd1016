"""The /files page in a real browser (Playwright driving Debian's Chromium at /usr/bin/chromium): logging in,
the list, a file removed by hand, delete, filter, folders, download, and 100,000 ledger rows.

Every wait is on the DOM with generous timeouts; no fixed sleeps, no timing assertions."""
from __future__ import annotations

import base64
import json
import os
import urllib.parse
import uuid

import pytest

from browserkit import BROWSER_MARKS, browser  # noqa: F401 (a fixture)

import pyfiledrop

WAIT_MS = 20_000
ADMIN = "files page pass"

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def admin_hash():
    return pyfiledrop.PasswordHash.of(ADMIN)


@pytest.fixture
def page(browser):
    """A page in a fresh context; dialogs answered from ``page.answers`` (a confirm with True, a prompt with
    text); script errors and CSP violations recorded (not the 401/403/409 replies the tests ask for)."""
    context = browser.new_context(accept_downloads=True)
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.answers, page.dialogs, page.errors = [], [], []

    def on_dialog(dialog):
        page.dialogs.append(dialog.message)
        answer = page.answers.pop(0) if page.answers else False
        if answer is True:
            dialog.accept()
        elif answer:
            dialog.accept(answer)
        else:
            dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" and not
            message.text.startswith("Failed to load resource: the server responded with a status of 4") else None)
    yield page
    context.close()


def put(server, name: str, data: bytes, password: str = "") -> dict:
    headers = {"Authorization": "Basic " + base64.b64encode(f":{password}".encode()).decode()} if password else {}
    status, _, body = server.request("PUT", "/upload/" + urllib.parse.quote(name), data, headers)
    assert status == 200, body
    return json.loads(body)


def log_in(page, server, password: str = ADMIN) -> None:
    page.goto(server.url + "/files")
    page.fill("#password", password)
    page.click("button[type=submit]")
    page.wait_for_url(server.url + "/files")
    page.wait_for_function("() => document.body.dataset.loaded")


def row(page, name: str):
    return page.locator("#uploads tbody tr", has=page.locator("td.name", has_text=name))


def wait_rows(page, count: int) -> None:
    page.wait_for_function(f"() => document.querySelectorAll('#uploads tbody tr').length === {count}")


def wait_names(page, names: list[str]) -> None:
    """Until the table lists exactly ``names`` (as shown, folder and name), in order."""
    page.wait_for_function("names => JSON.stringify([...document.querySelectorAll('#uploads tbody td.name')]"
                           ".map(cell => cell.textContent)) === JSON.stringify(names)", arg=names)


def test_log_in_list_missing_file_delete_filter_download(make_server, page, admin_hash):
    server = make_server(admin_password=admin_hash)
    put(server, "keep.txt", b"kept bytes")
    put(server, "gone-by-hand.txt", b"soon gone")
    put(server, "to-delete.txt", b"delete me")
    put(server, "photos/cat &amp; dog.jpg", b"meow")
    os.unlink(server.storage / "gone-by-hand.txt")

    page.goto(server.url + "/files")
    assert page.locator("form[action='/login']").count() == 1   # the 401 login form
    page.fill("#password", "wrong")
    page.click("button[type=submit]")
    assert page.locator("#message").text_content() == "Wrong password."
    log_in(page, server)
    wait_rows(page, 4)
    names = page.locator("#uploads tbody td.name").all_text_contents()
    assert names == ["photos/cat &amp; dog.jpg", "to-delete.txt", "gone-by-hand.txt", "keep.txt"]   # newest first
    assert row(page, "gone-by-hand.txt").locator("td.exists").text_content() == "missing"
    assert row(page, "keep.txt").locator("td.exists").text_content() == "yes"
    assert row(page, "gone-by-hand.txt").locator("a", has_text="Download").count() == 0

    page.answers.append(True)
    row(page, "to-delete.txt").locator("button", has_text="Delete").click()
    page.wait_for_function("""() => [...document.querySelectorAll('#uploads tbody tr')].some(
        r => r.querySelector('td.name').textContent === 'to-delete.txt' && r.dataset.state === 'deleted')""")
    assert not (server.storage / "to-delete.txt").exists()
    assert page.dialogs == ["Delete to-delete.txt from the server?"]

    with page.expect_download() as download_info:
        row(page, "keep.txt").locator("a", has_text="Download").click()
    assert open(download_info.value.path(), "rb").read() == b"kept bytes"

    page.fill("#filter", "CAT")
    wait_rows(page, 1)
    assert page.locator("#uploads tbody td.name").text_content() == "photos/cat &amp; dog.jpg"
    # a name is text, never markup: "&amp;" would show as "&" had it been parsed as HTML
    assert page.errors == []


def test_folders_on_the_page(make_server, page, admin_hash):
    """With --password too: the page's own upload carries the login's CSRF token."""
    server = make_server(admin_password=admin_hash, password=pyfiledrop.PasswordHash.of("uploader"))
    put(server, "trip/beach.jpg", b"sand", "uploader")
    put(server, "top.txt", b"top", "uploader")
    log_in(page, server)
    wait_rows(page, 2)
    page.locator("#crumbs button", has_text="All uploads").wait_for()
    page.locator("#crumbs").get_by_text("All uploads").click()
    page.answers.append("albums")
    page.click("#new-folder")
    page.wait_for_function("() => document.querySelector('#crumbs').textContent.includes('albums')")
    assert (server.storage / "albums").is_dir()
    wait_rows(page, 0)

    page.locator("#crumbs button", has_text="storage").click()
    page.locator("#subfolders button", has_text="trip/").click()
    wait_names(page, ["trip/beach.jpg"])

    page.answers.append("holiday")
    page.click("#rename-folder")
    page.wait_for_function("() => document.querySelector('#crumbs').textContent.includes('holiday')")
    assert (server.storage / "holiday" / "beach.jpg").read_bytes() == b"sand"
    wait_names(page, ["holiday/beach.jpg"])
    assert row(page, "beach.jpg").locator("td.exists").text_content() == "yes"

    page.set_input_files("#upload-here", files=[{"name": "shell.jpg", "mimeType": "image/jpeg", "buffer": b"shell"}])
    wait_names(page, ["holiday/shell.jpg", "holiday/beach.jpg"])
    assert (server.storage / "holiday" / "shell.jpg").read_bytes() == b"shell"   # into the folder shown

    page.answers.append(True)
    page.click("#delete-folder")   # not empty: refused, said on the page
    page.wait_for_function("() => document.querySelector('#message').className === 'error'")
    assert "not empty" in page.locator("#message").text_content()
    assert (server.storage / "holiday").is_dir()
    assert page.errors == []


def test_a_partial_upload_shows_its_progress_and_can_be_removed(make_server, page, admin_hash):
    server = make_server(admin_password=admin_hash)
    server.engine.create("half-way", "big.bin", size=100, part_size=100, client="10.1.2.3")
    server.engine.put("half-way", 0, [b"x" * 63])
    log_in(page, server)
    wait_rows(page, 1)
    assert row(page, "big.bin").locator("td.state").text_content() == "receiving 63%"
    assert row(page, "big.bin").locator("td.exists").text_content() == "partial"
    page.answers.append(True)
    row(page, "big.bin").locator("button", has_text="Remove").click()
    page.wait_for_function("() => document.querySelector('#uploads tbody tr').dataset.state === 'deleted'")
    assert [name for name in os.listdir(server.chunks) if name.endswith(".part")] == []


def test_logging_out_ends_the_session(make_server, page, admin_hash):
    server = make_server(admin_password=admin_hash)
    log_in(page, server)
    page.click("#logout button")
    page.wait_for_url(server.url + "/login")
    response = page.goto(server.url + "/files")
    assert response.status == 401


@pytest.mark.slow
def test_100000_ledger_rows_page_and_filter(make_server, page, admin_hash):
    server = make_server(admin_password=admin_hash)
    infos = [pyfiledrop.UploadInfo(id=f"{n:06d}-{uuid.uuid4()}", name=f"photos/IMG_{n:06d}.jpg", size=n,
                                   part_size=max(1, n), client="10.0.0.9", created=1.8e9 + n, updated=1.8e9 + n,
                                   state=pyfiledrop.State.STORED, received=((0, n),) if n else (), sha256="a" * 64,
                                   stored_name=f"photos/IMG_{n:06d}.jpg", finished=1.8e9 + n)
             for n in range(100_000)]
    server.engine.ledger.save(*infos)
    log_in(page, server)
    wait_rows(page, 100)
    assert page.locator("#uploads tbody td.name").first.text_content() == "photos/IMG_099999.jpg"
    page.click("#more")
    wait_rows(page, 200)
    assert page.locator("#uploads tbody td.name").nth(199).text_content() == "photos/IMG_099800.jpg"
    page.select_option("#sort", "name")
    page.wait_for_function("() => document.querySelector('#uploads tbody td.name').textContent === "
                           "'photos/IMG_000000.jpg'")
    page.fill("#filter", "IMG_04242")
    wait_rows(page, 10)
    assert page.errors == []


def test_with_a_password_a_browser_logs_in_and_uploads_from_the_page(make_server, page):
    server = make_server(password=pyfiledrop.PasswordHash.of("family"))
    response = page.goto(server.url + "/")
    assert response.status == 401
    page.fill("#password", "family")
    page.click("button[type=submit]")
    page.wait_for_url(server.url + "/")
    page.wait_for_function("() => Boolean(window.pyfiledrop && window.pyfiledrop.uploads)")
    page.set_input_files("input[type=file]", [{"name": "hello.txt", "mimeType": "text/plain",
                                               "buffer": b"hello from the page"}])
    page.wait_for_function("""() => { const files = window.pyfiledrop.uploads;
        return files.length === 1 && !files[0].active(); }""")
    assert page.evaluate("window.pyfiledrop.uploads[0].state") == "done"
    assert (server.storage / "hello.txt").read_bytes() == b"hello from the page"
