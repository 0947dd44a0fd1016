"""Text both ways in a real browser (Playwright driving Debian's Chromium at /usr/bin/chromium): a note sent from
the page shows on /files as text; the shared text shows on the page with a Copy button, through the clipboard
API in a secure context and by selecting and execCommand("copy") over plain HTTP on a LAN name.

Every wait is on the DOM with generous timeouts; no fixed sleeps, no timing assertions."""
from __future__ import annotations


import pytest

from browserkit import BROWSER_MARKS, chromium

import pyfiledrop

WAIT_MS = 30_000
ADMIN = "text page admin"
LAN_NAME = "pyfiledrop.test"   # resolved to 127.0.0.1 by the browser, but not "localhost": no secure context

pytestmark = BROWSER_MARKS
HOSTILE = '<img src=x onerror="window.owned=1"><script>window.owned=2</script> \x1b[2J &amp; \u202egpj.exe'


@pytest.fixture(scope="module")
def admin_hash():
    return pyfiledrop.PasswordHash.of(ADMIN)


@pytest.fixture(scope="module")
def browser():
    with chromium(f"--host-resolver-rules=MAP {LAN_NAME} 127.0.0.1") as launched:
        yield launched


@pytest.fixture
def context(browser):
    """A fresh context that may use the clipboard; its pages record script errors and CSP violations."""
    context = browser.new_context(permissions=["clipboard-read", "clipboard-write"])
    context.set_default_timeout(WAIT_MS)
    context.errors = []
    context.on("page", lambda page: watch(page, context.errors))
    yield context
    context.close()


def watch(page, errors: list) -> None:
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" and message.text !=
            "Failed to load resource: the server responded with a status of 401 (Unauthorized)" else None)  # login
    page.on("dialog", lambda dialog: dialog.accept())


def log_in(page, server) -> None:
    page.goto(server.url + "/files")
    page.fill("#password", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_url(server.url + "/files")
    page.wait_for_function("() => document.body.dataset.notesLoaded && document.body.dataset.sharedLoaded")


def send_from_page(page, text: str, keyboard: bool = False) -> None:
    page.fill("#note-text", text)
    if keyboard:
        page.focus("#note-text")
        page.keyboard.press("Control+Enter")
    else:
        page.click("#send-note")
    page.wait_for_function("() => document.getElementById('note-status').textContent.startsWith('Sent')")
    assert page.input_value("#note-text") == ""


def test_a_note_sent_from_the_page_shows_on_files_as_text(make_server, context, admin_hash):
    server = make_server(admin_password=admin_hash)
    page = context.new_page()
    page.goto(server.url + "/")
    assert page.get_by_label("Send a note or a link to this computer").count() == 1
    page.click("#send-note")   # empty: refused on the page, nothing sent
    assert "first" in page.text_content("#note-status")
    send_from_page(page, HOSTILE)
    send_from_page(page, "https://example.org/a?b=1", keyboard=True)
    send_from_page(page, "javascript:window.owned=3")
    assert [note.note.text for note in (e for e in server.events if isinstance(e, pyfiledrop.NoteReceived))] == [
        HOSTILE, "https://example.org/a?b=1", "javascript:window.owned=3"]

    files = context.new_page()
    log_in(files, server)
    texts = files.locator("#notes .note-text").all_text_contents()
    assert texts == ["javascript:window.owned=3", "https://example.org/a?b=1", HOSTILE]   # newest first
    assert files.locator("#notes img, #notes script").count() == 0
    assert files.evaluate("window.owned") is None and page.evaluate("window.owned") is None
    links = files.locator("#notes a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.org/a?b=1"
    assert links.get_attribute("rel") == "noopener noreferrer"
    assert all("127.0.0.1" in meta for meta in files.locator("#notes .note-meta").all_text_contents())

    files.locator("#notes li", has_text="javascript:").get_by_role("button", name="Delete").click()
    files.wait_for_function("() => document.querySelectorAll('#notes li').length === 2")
    assert [n.text for _, n in server.engine.ledger.notes(10)] == ["https://example.org/a?b=1", HOSTILE]
    assert context.errors == []


def test_shared_text_shows_on_the_page_and_copies_through_the_clipboard(make_server, context, admin_hash):
    text = "Wi-Fi <b>guest</b>\npassword: 1234 \u00e9\U0001f600"
    server = make_server(admin_password=admin_hash, share_text=text)
    page = context.new_page()
    page.goto(server.url + "/")
    page.wait_for_selector("#shared-text-area:not([hidden])")
    assert page.text_content("#shared-text") == text and page.locator("#shared-text b").count() == 0
    assert page.evaluate("window.isSecureContext") is True
    page.click("#copy-shared-text")
    page.wait_for_function("() => document.getElementById('copy-status').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == text

    files = context.new_page()   # the admin changes it on /files; the page shows the new text by itself
    log_in(files, server)
    assert files.input_value("#shared-input") == text
    files.fill("#shared-input", "https://example.org/shared")
    files.click("#share-text")
    files.wait_for_function("() => document.getElementById('shared-state').textContent.startsWith('Shared since')")
    page.wait_for_function("() => document.getElementById('shared-text').textContent === "
                           "'https://example.org/shared'")
    assert page.get_attribute("#shared-link", "href") == "https://example.org/shared"
    files.click("#unshare-text")
    page.wait_for_selector("#shared-text-area", state="hidden")
    assert context.errors == []


def test_over_plain_http_on_a_lan_name_copy_selects_the_text_and_uses_exec_command(make_server, context):
    text = "copied without the clipboard API: <i>plain</i>"
    server = make_server(share_text=text)
    page = context.new_page()
    page.goto(f"http://{LAN_NAME}:{server.port}/")
    page.wait_for_selector("#shared-text-area:not([hidden])")
    assert page.evaluate("window.isSecureContext") is False
    assert page.evaluate("navigator.clipboard === undefined")
    page.click("#copy-shared-text")
    page.wait_for_function("() => document.getElementById('text-box').dataset.copied")
    assert page.evaluate("window.getSelection().toString()") == text   # selected for the person in any case
    status = page.text_content("#copy-status")
    if page.evaluate("document.getElementById('text-box').dataset.copied") == "clipboard":
        assert status == "Copied"
        secure = context.new_page()   # what execCommand put on the clipboard, read where the API exists
        secure.goto(server.url + "/")
        assert secure.evaluate("navigator.clipboard.readText()") == text
    else:
        assert status.startswith("Select and copy")
    send_from_page(page, "a note over plain HTTP")
    assert [n.text for _, n in server.engine.ledger.notes(10)] == ["a note over plain HTTP"]
    assert context.errors == []
