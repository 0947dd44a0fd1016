"""Text both ways over real HTTP: notes sent to the PC (hostile ones above all), the shared text, the console
line, the ledger migration, and who may do what behind passwords."""
from __future__ import annotations

import base64
import http.client
import io
import json
import re
import sqlite3
import urllib.parse

import pytest
from conftest import Output, cli_server, http_request, running_server

import pyfiledrop

UPLOAD_PASSWORD, ADMIN_PASSWORD = "notes upload pass", "notes admin pass"
HASHES: dict = {}
JSON = {"Content-Type": "application/json"}


def hashes():
    if not HASHES:
        HASHES["upload"] = pyfiledrop.PasswordHash.of(UPLOAD_PASSWORD)
        HASHES["admin"] = pyfiledrop.PasswordHash.of(ADMIN_PASSWORD)
    return HASHES["upload"], HASHES["admin"]


def basic(password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f":{password}".encode()).decode()}


def send_note(server, text, headers: dict | None = None):
    body = text if isinstance(text, bytes) else json.dumps({"text": text}).encode()
    return server.request("POST", "/api/notes", body, {**JSON, **(headers or {})})


def notes(server, password: str = ADMIN_PASSWORD, query: str = "") -> dict:
    status, _, body = server.request("GET", "/api/notes" + query, None, basic(password))
    assert status == 200, body
    return json.loads(body)


@pytest.fixture
def admin_server(tmp_path):
    _, admin = hashes()
    with running_server(tmp_path, admin_password=admin) as server:
        yield server


# -- sending a note -------------------------------------------------------------------------------------------

def test_a_note_is_kept_as_sent_and_listed_newest_first(admin_server):
    hostile = '<script>alert(1)</script><img src=x onerror=alert(2)> \x1b]0;owned\x07\x1b[2J\x00 \u202egpj.exe'
    status, headers, body = send_note(admin_server, "first: https://example.org/a?b=1")
    assert status == 201, body
    first = json.loads(body)["id"]
    status, _, body = send_note(admin_server, hostile)
    assert status == 201, body
    listed = notes(admin_server)["notes"]
    assert [note["text"] for note in listed] == [hostile, "first: https://example.org/a?b=1"]
    assert listed[1]["id"] == first and listed[0]["client"] == "127.0.0.1"
    assert listed[0]["created"].endswith("Z")
    assert headers["Content-Type"].startswith("application/json")


def test_hostile_bodies_are_refused_with_a_plain_line_and_nothing_is_kept(admin_server):
    refusals = [
        (b'{"text": "x"}', {"Content-Type": "text/plain"}, 400),                   # what another site's form can send
        (b'{"text": "x"}', {"Content-Type": "application/x-www-form-urlencoded"}, 400),
        (b'{"text": "\xff\xfe not utf-8"}', JSON, 400),
        (b'{"text": "\\ud800 lone surrogate"}', JSON, 400),
        (b'{"text": ""}', JSON, 400),
        (b'{"text": " \\n\\t "}', JSON, 400),
        (b'{"text": 42}', JSON, 400),
        (b'["text"]', JSON, 400),
        (b'not json', JSON, 400),
        (json.dumps({"text": "\u00e9" * (pyfiledrop.MAX_NOTE_BYTES // 2 + 1)}).encode(), JSON, 413),
        (b'{"text": "' + b"a" * (pyfiledrop.MAX_NOTE_BODY + 10) + b'"}', JSON, 413),
    ]
    for body, headers, expected in refusals:
        status, reply_headers, reply = admin_server.request("POST", "/api/notes", body, headers)
        assert status == expected, (body[:40], reply)
        assert reply_headers["Content-Type"].startswith("text/plain") and len(reply.splitlines()) == 1
        assert b"Traceback" not in reply and str(admin_server.chunks).encode() not in reply
    assert notes(admin_server)["notes"] == []
    assert send_note(admin_server, "still serving")[0] == 201


def test_the_longest_note_fits_even_when_every_character_is_escaped(admin_server):
    text = "\x01" * pyfiledrop.MAX_NOTE_BYTES   # 6 bytes of JSON per byte of text
    status, _, body = send_note(admin_server, text)
    assert status == 201, body
    assert notes(admin_server)["notes"][0]["text"] == text


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}])
def test_a_cross_site_note_is_refused_even_without_a_password(make_server, headers):
    server = make_server()
    status, _, body = send_note(server, "from elsewhere", headers)
    assert status == 403, body
    assert send_note(server, "from the page", {"Sec-Fetch-Site": "same-origin"})[0] == 201


def test_one_address_may_keep_only_so_many_notes(admin_server, monkeypatch):
    monkeypatch.setattr(pyfiledrop, "NOTES_PER_SENDER", 3)
    for number in range(3):
        assert send_note(admin_server, f"note {number}")[0] == 201
    status, _, body = send_note(admin_server, "one too many")
    assert status == 429 and b"/files" in body
    oldest = notes(admin_server)["notes"][-1]["id"]
    assert admin_server.request("DELETE", f"/api/notes/{oldest}", None, basic(ADMIN_PASSWORD))[0] == 200
    assert send_note(admin_server, "room again")[0] == 201


def test_notes_page_through_and_delete(admin_server):
    for number in range(5):
        assert send_note(admin_server, f"note {number}")[0] == 201
    first = notes(admin_server, query="?limit=2")
    assert [n["text"] for n in first["notes"]] == ["note 4", "note 3"] and first["next"]
    second = notes(admin_server, query=f"?limit=2&before={first['next']}")
    third = notes(admin_server, query=f"?limit=2&before={second['next']}")
    assert [n["text"] for n in second["notes"] + third["notes"]] == ["note 2", "note 1", "note 0"]
    assert third["next"] is None
    gone = first["notes"][0]["id"]
    assert admin_server.request("DELETE", f"/api/notes/{gone}", None, basic(ADMIN_PASSWORD))[0] == 200
    assert admin_server.request("DELETE", f"/api/notes/{gone}", None, basic(ADMIN_PASSWORD))[0] == 404
    assert admin_server.request("DELETE", "/api/notes/..%2f..", None, basic(ADMIN_PASSWORD))[0] == 404
    assert admin_server.request("GET", "/api/notes?before=x", None, basic(ADMIN_PASSWORD))[0] == 400
    assert len(notes(admin_server)["notes"]) == 4


def test_a_note_is_one_event_for_the_console(admin_server):
    send_note(admin_server, "hello\nPC")
    received = [event for event in admin_server.events if isinstance(event, pyfiledrop.NoteReceived)]
    assert [(event.note.text, event.note.client) for event in received] == [("hello\nPC", "127.0.0.1")]


# -- the console line -----------------------------------------------------------------------------------------

@pytest.fixture
def console_to():
    """``console_to(out)``: a Console on ``out`` as main() sets one up (its log lines through it)."""
    kept = pyfiledrop.log.handlers[:], pyfiledrop.log.level, pyfiledrop.log.propagate

    def make(out):
        console = pyfiledrop.Console(out, tty=False)
        pyfiledrop._configure_logging(pyfiledrop.Config(), console)
        return console

    yield make
    pyfiledrop.log.handlers[:], level, pyfiledrop.log.propagate = kept
    pyfiledrop.log.setLevel(level)


def console_lines(console_to, note_text: str) -> list[str]:
    out = io.StringIO()
    console_to(out).handle(pyfiledrop.NoteReceived(pyfiledrop.Note("n1", note_text, "192.0.2.7", 0.0)))
    return out.getvalue().splitlines()


def test_the_console_line_shows_no_terminal_escape_and_stays_one_line(console_to):
    hostile = "pay \x1b[2J\x1b]0;pwned\x07 now\r\nfake line\u2028\u202eevil\x9b31m\x00 ok \U0001f600"
    (line,) = console_lines(console_to, hostile)
    assert "note from 192.0.2.7" in line and f"({len(hostile)} characters)" in line
    assert all(ord(char) >= 0x20 and not 0x7f <= ord(char) <= 0x9f for char in line)
    assert "\u2028" not in line and "\u202e" not in line
    assert "\\x1b[2J" in line and "\\r\\n" in line and "\\u202e" in line and "\\x9b" in line and "\U0001f600" in line


def test_a_long_note_is_shortened_on_the_console(console_to):
    (line,) = console_lines(console_to, "word " * 1000)
    assert line.endswith(("\u2026", "...")) and len(line) < 220 and "(5000 characters)" in line


def test_a_console_that_cannot_show_a_character_gets_an_escape_not_a_lost_line(console_to):
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii")
    console_to(out).handle(pyfiledrop.NoteReceived(pyfiledrop.Note("n1", "caf\u00e9 \U0001f600", "192.0.2.7", 0.0)))
    out.flush()
    assert "caf\\xe9 \\U0001f600" in out.buffer.getvalue().decode("ascii")


def test_the_real_console_prints_a_received_note_as_one_safe_line(tmp_path):
    args = ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks"), "--no-qr"]
    with cli_server(args) as (process, port):
        output = Output(process)
        status, _, body = http_request(port, "POST", "/api/notes",
                                       json.dumps({"text": "link \x1b[31mhttps://example.org\x1b[0m\nbye"}).encode(),
                                       JSON)
        assert status == 201, body
        line = output.wait_for_line(lambda text: "note from 127.0.0.1" in text)
        process.terminate()
        output.close()
    assert "\x1b" not in output.text
    assert line.endswith("link \\x1b[31mhttps://example.org\\x1b[0m\\nbye")


# -- the shared text ------------------------------------------------------------------------------------------

def shared(server, headers: dict | None = None) -> dict:
    status, _, body = server.request("GET", "/api/shared-text", None, headers)
    assert status == 200, body
    return json.loads(body)


def test_the_admin_shares_and_clears_text_and_it_survives_a_restart(tmp_path):
    _, admin = hashes()
    with running_server(tmp_path, admin_password=admin) as server:
        assert shared(server) == {"text": None, "updated": None}
        text = "Wi-Fi: <b>guest</b> \x1b[0m pass 1234"
        status, _, body = server.request("PUT", "/api/shared-text", json.dumps({"text": text}).encode(),
                                         {**JSON, **basic(ADMIN_PASSWORD)})
        assert status == 200, body
        assert shared(server)["text"] == text
        assert any(isinstance(event, pyfiledrop.Notice) and event.text.startswith(f"shared text now {len(text)} characters")
                   for event in server.events)
    with running_server(tmp_path, admin_password=admin) as server:
        assert shared(server)["text"] == text
        assert server.request("DELETE", "/api/shared-text", None, basic(ADMIN_PASSWORD))[0] == 200
        assert shared(server)["text"] is None
    with running_server(tmp_path, admin_password=admin) as server:
        assert shared(server)["text"] is None


def test_share_text_at_start_replaces_what_was_kept_and_an_empty_one_clears_it(tmp_path):
    with running_server(tmp_path, share_text="from the command line") as server:
        assert shared(server)["text"] == "from the command line"
        assert server.request("PUT", "/api/shared-text", b'{"text": "x"}', JSON)[0] == 403   # no admin password
    with running_server(tmp_path) as server:
        assert shared(server)["text"] == "from the command line"
    with running_server(tmp_path, share_text="") as server:
        assert shared(server)["text"] is None


@pytest.mark.parametrize("argv,message", [(["--share-text", "a" * (64 * 1024 + 1)], "at most 64 KiB"),
                                          (["--share-text", "bad \udcff byte"], "not valid UTF-8")])
def test_share_text_that_cannot_be_kept_is_refused_at_start(argv, message, capsys):
    with pytest.raises(SystemExit):
        pyfiledrop.parse_args(argv)
    assert message in capsys.readouterr().err


def test_the_banner_says_that_text_is_shared(tmp_path):
    args = ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks"), "--no-qr", "--share-text", "hello"]
    with cli_server(args) as (process, _):
        output = Output(process)
        output.wait_for_line(lambda line: line.startswith("  shared text    5 characters (--share-text)"))
        process.terminate()
        output.close()
    assert output.lines[0].startswith("pyfiledrop ")   # nothing before the banner's first line


def test_shared_text_refuses_what_a_note_refuses(admin_server):
    auth = {**JSON, **basic(ADMIN_PASSWORD)}
    for body, expected in ((b'{"text": ""}', 400), (b'{"text": "\\udfff"}', 400), (b"x=1", 400),
                           (json.dumps({"text": "a" * (pyfiledrop.MAX_NOTE_BYTES + 1)}).encode(), 413)):
        assert admin_server.request("PUT", "/api/shared-text", body, auth)[0] == expected
    assert shared(admin_server)["text"] is None


# -- passwords ------------------------------------------------------------------------------------------------

def test_with_passwords_notes_need_the_upload_one_and_the_list_the_admin_one(tmp_path):
    upload, admin = hashes()
    with running_server(tmp_path, password=upload, admin_password=admin) as server:
        assert send_note(server, "no password")[0] == 401
        assert send_note(server, "wrong", basic("wrong"))[0] == 403
        assert send_note(server, "right", basic(UPLOAD_PASSWORD))[0] == 201
        assert server.request("GET", "/api/shared-text")[0] == 401
        assert server.request("GET", "/api/shared-text", None, basic(UPLOAD_PASSWORD))[0] == 200
        assert server.request("GET", "/api/notes", None, basic(UPLOAD_PASSWORD))[0] == 403
        put = {**JSON, **basic(UPLOAD_PASSWORD)}
        assert server.request("PUT", "/api/shared-text", b'{"text": "mine"}', put)[0] == 403
        assert server.request("DELETE", "/api/notes/abc", None, basic(UPLOAD_PASSWORD))[0] == 403
        assert [note["text"] for note in notes(server)["notes"]] == ["right"]


def login_cookie(server, password: str) -> tuple[dict, str]:
    """A browser's login: (its session cookie header, its CSRF token), from the real /login."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", "/login", urllib.parse.urlencode({"password": password}).encode(),
                           {"Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        assert response.status == 303
        lines = response.headers.get_all("Set-Cookie")
    finally:
        connection.close()
    cookies = dict(re.match(r"pyfiledrop_(session|csrf)=([^;]*)", line).groups() for line in lines)
    return {"Cookie": f"{pyfiledrop.SESSION_COOKIE}={cookies['session']}"}, cookies["csrf"]


def test_a_logged_in_browser_needs_the_csrf_token_for_notes_and_the_shared_text(tmp_path):
    upload, admin = hashes()
    with running_server(tmp_path, password=upload, admin_password=admin) as server:
        cookie, csrf = login_cookie(server, UPLOAD_PASSWORD)
        assert send_note(server, "no token", cookie)[0] == 403
        assert send_note(server, "with token", {**cookie, pyfiledrop.CSRF_HEADER: csrf})[0] == 201
        cookie, csrf = login_cookie(server, ADMIN_PASSWORD)
        body = b'{"text": "shared"}'
        assert server.request("PUT", "/api/shared-text", body, {**JSON, **cookie})[0] == 403
        assert server.request("PUT", "/api/shared-text", body, {**JSON, **cookie, pyfiledrop.CSRF_HEADER: csrf})[0] == 200
        assert server.request("DELETE", "/api/shared-text", None, cookie)[0] == 403
        assert shared(server, basic(UPLOAD_PASSWORD))["text"] == "shared"
        assert [note["text"] for note in notes(server)["notes"]] == ["with token"]


def test_without_an_admin_password_notes_are_sent_but_never_listed(make_server):
    server = make_server()
    assert send_note(server, "for the console and the ledger")[0] == 201
    assert server.request("GET", "/api/notes")[0] == 403


# -- the ledger -----------------------------------------------------------------------------------------------

def test_the_migration_from_the_version_with_a_table_of_marks_keeps_every_upload(tmp_path):
    path = tmp_path / pyfiledrop.Ledger.FILENAME
    previous = next(index for index, step in enumerate(pyfiledrop.Ledger.MIGRATIONS) if "DROP TABLE stored_marks" in step)
    db = sqlite3.connect(path)
    for migration in pyfiledrop.Ledger.MIGRATIONS[:previous]:
        db.executescript(migration)
    db.execute(f"PRAGMA user_version = {previous}")
    db.execute("INSERT INTO uploads (id, name, size, part_size, client, created, updated, state, received, sha256, "
               "stored_name, finished, reason, mtime) VALUES ('up1', 'a.txt', 3, 3, '192.0.2.1', 1.0, 2.0, "
               "'stored', '[[0,3]]', 'ab', 'a.txt', 2.0, '', NULL)")
    db.execute("INSERT INTO stored_marks VALUES ('up1', 1, 2, 3, 4)")
    db.commit()
    db.close()
    ledger = pyfiledrop.Ledger(path)
    try:
        assert ledger.version == len(pyfiledrop.Ledger.MIGRATIONS)
        kept = ledger.get("up1")
        assert (kept.name, kept.state, kept.received, kept.client) == ("a.txt", pyfiledrop.State.STORED,
                                                                        ((0, 3),), "192.0.2.1")
        assert ledger.marks(["up1"]) == {"up1": (1, 2, 3, 4)}
        ledger.add_note(pyfiledrop.Note("n1", "hi", "192.0.2.1", 5.0), "192.0.2.1")
        assert [note.text for _, note in ledger.notes(10)] == ["hi"]
    finally:
        ledger.close()


def test_the_migration_from_the_previous_version_keeps_stored_and_receiving_uploads(tmp_path):
    path = tmp_path / pyfiledrop.Ledger.FILENAME
    previous = len(pyfiledrop.Ledger.MIGRATIONS) - 1
    db = sqlite3.connect(path)
    for migration in pyfiledrop.Ledger.MIGRATIONS[:previous]:
        db.executescript(migration)
    db.execute(f"PRAGMA user_version = {previous}")
    columns = "id, name, size, part_size, client, created, updated, state, received, sha256, stored_name, finished, reason"
    db.execute(f"INSERT INTO uploads ({columns}) VALUES ('up1', 'a.txt', 3, 3, '192.0.2.1', 1.0, 2.0, 'stored', "
               "'[[0,3]]', 'ab', 'a.txt', 2.0, '')")
    db.execute(f"INSERT INTO uploads ({columns}) VALUES ('up2', 'b.bin', 8, 4, '192.0.2.2', 1.0, 2.0, 'receiving', "
               "'[[0,4]]', NULL, NULL, NULL, '')")
    db.commit()
    db.close()
    ledger = pyfiledrop.Ledger(path)
    try:
        assert ledger.version == len(pyfiledrop.Ledger.MIGRATIONS)
        stored, receiving = ledger.get("up1"), ledger.get("up2")
        assert (stored.state, stored.stored_name, stored.client_sha256) == (pyfiledrop.State.STORED, "a.txt", None)
        assert (receiving.state, receiving.received, receiving.client_sha256) == (pyfiledrop.State.RECEIVING,
                                                                                  ((0, 4),), None)
        ledger.save(receiving.changed(client_sha256="c" * 64))
        assert ledger.get("up2").client_sha256 == "c" * 64
    finally:
        ledger.close()
