"""Passwords on real servers over real HTTP: every route's 401/403, the body never read before the password is
checked (with and without ``Expect: 100-continue``), login cookies (forged, expired, from another key, after a
restart, after a password change), CSRF, cross-site requests, throttling of wrong passwords, and the command
line (environment variables, the terminal prompt through a real pty)."""
from __future__ import annotations

import base64
import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import ROOT, chunk_fields, cli_server, encode_multipart, free_port, http_request, running_server

import pyfiledrop

UPLOAD_PASSWORD, ADMIN_PASSWORD = "drop-it-here", "admin: the other one"
HASHES = {}


def hashes():
    """Hashed once for the module (each scrypt costs tens of milliseconds)."""
    if not HASHES:
        HASHES["upload"] = pyfiledrop.PasswordHash.of(UPLOAD_PASSWORD)
        HASHES["admin"] = pyfiledrop.PasswordHash.of(ADMIN_PASSWORD)
    return HASHES["upload"], HASHES["admin"]


class Headers(dict):
    """Response headers by name in any case (Bottle sends "Www-Authenticate")."""

    def __init__(self, pairs):
        super().__init__((name.lower(), value) for name, value in pairs.items())

    def __getitem__(self, name):
        return super().__getitem__(name.lower())

    def __contains__(self, name):
        return super().__contains__(name.lower())


def req(server, method: str, path: str, body=None, headers=None):
    port = server if isinstance(server, int) else server.port
    status, response_headers, data = http_request(port, method, path, body, headers)
    return status, Headers(response_headers), data


def basic(password: str, user: str = "") -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


BROWSER = {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Chrome/120", "Accept": "text/html,*/*;q=0.8"}


def upload_files(chunks) -> list[str]:
    """The partial files in the chunks folder (beside the ledger and the session key)."""
    return sorted(name for name in os.listdir(chunks) if name.endswith(".part"))


class Clock:
    def __init__(self, now: float = 1_800_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def protected(tmp_path):
    upload, admin = hashes()
    clock = Clock()
    with running_server(tmp_path, password=upload, admin_password=admin, allow_downloads=True, clock=clock) as server:
        server.clock = clock
        yield server


def stored_upload(server, data: bytes = b"hello", name: str = "a.txt") -> dict:
    status, _, body = req(server, "PUT", f"/upload/{name}", data, basic(UPLOAD_PASSWORD))
    assert status == 200, body
    return json.loads(body)


def login(server, password: str, target: str = "") -> tuple[int, dict, str]:
    """POST /login as a browser form: (status, headers, session cookie value)."""
    body = f"password={password}&next={target}".encode()
    status, headers, _ = req(server, "POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
    cookies = [value for name, value in headers.items() if name.lower() == "set-cookie"]
    session = ""
    for line in headers.get("Set-Cookie", "").split("\n") + cookies:
        if line.startswith(pyfiledrop.SESSION_COOKIE + "="):
            session = line.split(";", 1)[0].split("=", 1)[1]
    return status, headers, session


def login_cookies(server, password: str) -> tuple[str, str, list[str]]:
    """(session, csrf, raw Set-Cookie lines) from a real login over a raw connection (all Set-Cookie lines)."""
    body = f"password={password}".encode()
    lines = raw_exchange(server.port, (f"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                       f"application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
                                       "Connection: close\r\n\r\n").encode() + body)
    set_cookies = [line.split(":", 1)[1].strip() for line in lines.split("\r\n") if line.lower().startswith("set-cookie:")]
    values = {line.split("=", 1)[0]: line.split(";", 1)[0].split("=", 1)[1] for line in set_cookies}
    return values.get(pyfiledrop.SESSION_COOKIE, ""), values.get(pyfiledrop.CSRF_COOKIE, ""), set_cookies


def raw_exchange(port: int, data: bytes, timeout: float = 30) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received.decode("latin-1")


def cookie_header(session: str) -> dict:
    return {"Cookie": f"{pyfiledrop.SESSION_COOKIE}={session}"}


# -- every route -------------------------------------------------------------------------------------------------

PROTECTED_ROUTES = [("GET", "/"), ("POST", "/upload"), ("PUT", "/upload/x.txt"), ("GET", "/api/uploads/abc"),
                    ("GET", "/download/abc"), ("GET", "/files"), ("GET", "/api/uploads"),
                    ("DELETE", "/api/uploads/abc"), ("GET", "/api/folders"), ("POST", "/api/cleanup")]


@pytest.mark.parametrize("method,path", PROTECTED_ROUTES)
def test_a_route_without_password_is_401_with_a_basic_challenge_for_scripts(protected, method, path):
    status, headers, body = req(protected, method, path, b"" if method != "GET" else None)
    assert status == 401, body
    assert headers["WWW-Authenticate"].startswith("Basic ")
    assert body == b"This server needs a password.\n"


@pytest.mark.parametrize("method,path", PROTECTED_ROUTES)
def test_a_browser_gets_no_basic_challenge(protected, method, path):
    status, headers, body = req(protected, method, path, None, {"X-Requested-With": "XMLHttpRequest",
                                                                    "Sec-Fetch-Mode": "cors"})
    assert status == 401
    assert "WWW-Authenticate" not in headers


def test_a_page_load_in_a_browser_gets_the_login_form_with_401(protected):
    status, headers, body = req(protected, "GET", "/files?sort=name", None, BROWSER)
    assert status == 401 and "WWW-Authenticate" not in headers
    assert b'<form method="post" action="/login">' in body
    assert b'name="next" value="/files?sort=name"' in body
    assert "script-src" not in headers["Content-Security-Policy"] and "default-src 'none'" in headers[
        "Content-Security-Policy"]


@pytest.mark.parametrize("path", ["/favicon.ico", "/assets/" + pyfiledrop.WORKER_ASSET.format(version=pyfiledrop.__version__),
                                  "/assets/" + pyfiledrop.HASH_WASM_ASSET.format(version=pyfiledrop.HASH_WASM_VERSION),
                                  "/login"])
def test_the_icon_assets_and_login_page_are_public(protected, path):
    assert req(protected, "GET", path)[0] == 200


@pytest.mark.parametrize("user", ["", "anyone", "é with spaces"])
def test_basic_with_any_user_name_uploads(protected, user):
    status, _, body = req(protected, "PUT", "/upload/a.txt", b"hello", basic(UPLOAD_PASSWORD, user))
    assert status == 200, body
    assert (protected.storage / "a.txt").read_bytes() == b"hello"


def test_a_wrong_password_is_403_and_nothing_is_stored(protected):
    status, headers, body = req(protected, "PUT", "/upload/a.txt", b"hello", basic("wrong"))
    assert status == 403 and body == b"Wrong password.\n"
    assert "WWW-Authenticate" not in headers
    assert os.listdir(protected.storage) == [] and upload_files(protected.chunks) == []


def test_the_upload_password_does_not_open_admin_routes(protected):
    for method, path in [("GET", "/files"), ("GET", "/api/uploads"), ("DELETE", "/api/uploads/abc"),
                         ("POST", "/api/cleanup"), ("GET", "/api/folders")]:
        status, _, body = req(protected, method, path, None, basic(UPLOAD_PASSWORD))
        assert (status, body) == (403, b"This needs the admin password.\n"), (method, path)


def test_the_admin_password_opens_everything(protected):
    status, _, body = req(protected, "PUT", "/upload/a.txt", b"hello", basic(ADMIN_PASSWORD))
    assert status == 200, body
    upload_id = json.loads(body)["id"]
    assert req(protected, "GET", f"/api/uploads/{upload_id}", None, basic(ADMIN_PASSWORD))[0] == 200
    assert req(protected, "GET", "/api/uploads", None, basic(ADMIN_PASSWORD))[0] == 200
    assert req(protected, "GET", "/files", None, basic(ADMIN_PASSWORD))[0] == 200


def test_without_admin_password_admin_routes_are_refused_even_to_the_upload_password(make_server):
    upload, _ = hashes()
    server = make_server(password=upload)
    status, _, body = req(server, "GET", "/api/uploads", None, basic(UPLOAD_PASSWORD))
    assert status == 403 and b"--admin-password" in body
    open_server = make_server()
    assert req(open_server, "GET", "/api/uploads")[0] == 403
    assert req(open_server, "GET", "/files")[0] == 403
    assert req(open_server, "PUT", "/upload/a.txt", b"x")[0] == 200   # no --password: uploads stay open


def test_only_an_admin_password_leaves_uploading_open(make_server):
    _, admin = hashes()
    server = make_server(admin_password=admin)
    assert req(server, "PUT", "/upload/a.txt", b"x")[0] == 200
    assert req(server, "GET", "/api/uploads")[0] == 401
    assert req(server, "GET", "/api/uploads", None, basic(ADMIN_PASSWORD))[0] == 200


# -- hostile headers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", ["Basic !!!not-base64", "Basic " + base64.b64encode(b"no colon").decode(),
                                    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), "Basic", "basic    "])
def test_a_malformed_authorization_header_is_400_and_the_server_keeps_serving(protected, header):
    status, _, body = req(protected, "PUT", "/upload/a.txt", b"hello", {"Authorization": header})
    assert status == 400 and body.startswith(b"Malformed Authorization header"), body
    assert os.listdir(protected.storage) == []
    assert req(protected, "PUT", "/upload/a.txt", b"hello", basic(UPLOAD_PASSWORD))[0] == 200


def test_another_scheme_counts_as_no_password(protected):
    status, headers, _ = req(protected, "GET", "/", None, {"Authorization": "Bearer " + "A" * 4000})
    assert status == 401 and "WWW-Authenticate" in headers


def test_two_authorization_headers_do_not_combine_into_a_login(protected):
    head = ("GET /api/uploads HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            f"Authorization: {basic(UPLOAD_PASSWORD)['Authorization']}\r\n"
            f"Authorization: {basic(ADMIN_PASSWORD)['Authorization']}\r\n\r\n")
    status_line = raw_exchange(protected.port, head.encode()).split("\r\n", 1)[0]
    assert status_line.split(" ")[1] in ("400", "401", "403")


# -- the body is not read before the password is checked --------------------------------------------------------------

def test_a_refused_request_that_expects_100_continue_is_answered_without_its_body(protected):
    head = ("PUT /upload/big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\nExpect: 100-continue\r\n\r\n")
    reply = raw_exchange(protected.port, head.encode())   # the body is never sent: the server must not wait
    assert reply.startswith("HTTP/1.1 401 "), reply
    assert "100 Continue" not in reply   # and raw_exchange returned: the server closed the connection
    assert os.listdir(protected.storage) == [] and upload_files(protected.chunks) == []


def test_an_allowed_request_that_expects_100_continue_gets_it(protected):
    """The contrast to the test above: the same request with the password is told to go on."""
    head = ("PUT /upload/big.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            f"Authorization: {basic(UPLOAD_PASSWORD)['Authorization']}\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", protected.port), timeout=30) as sock:
        sock.sendall(head.encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
    assert b"HTTP/1.1 200 " in rest
    assert (protected.storage / "big.bin").read_bytes() == b"hello"


@pytest.mark.parametrize("credentials", [{}, basic("wrong")], ids=["none", "wrong"])
def test_a_refusal_comes_before_any_byte_of_the_body_is_sent(protected, credentials):
    """Without Expect too: the reply arrives while the client still holds back its whole body."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in credentials.items())
    head = f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n" \
           f"Content-Length: 30000000\r\n{extra}\r\n"
    with socket.create_connection(("127.0.0.1", protected.port), timeout=30) as sock:
        sock.sendall(head.encode())
        first = sock.recv(200)
    assert first.startswith(b"HTTP/1.1 401 " if not credentials else b"HTTP/1.1 403 "), first
    assert upload_files(protected.chunks) == []


def test_a_refused_chunk_upload_writes_nothing(protected):
    body, content_type = encode_multipart(chunk_fields(str(uuid.uuid4()), 0, 10, 5), [("file", "f.bin", b"12345")])
    status, _, _ = req(protected, "POST", "/upload", body, {"Content-Type": content_type, **basic("nope")})
    assert status == 403
    assert upload_files(protected.chunks) == [] and os.listdir(protected.storage) == []
    assert protected.engine.list() == []


# -- login cookies ---------------------------------------------------------------------------------------------------

def test_login_sets_a_strict_httponly_cookie_and_opens_the_admin_api(protected):
    session, csrf, set_cookies = login_cookies(protected, ADMIN_PASSWORD)
    assert session and csrf
    session_line = next(line for line in set_cookies if line.startswith(pyfiledrop.SESSION_COOKIE + "="))
    attributes = {part.strip().split("=")[0].lower() for part in session_line.split(";")[1:]}
    assert {"httponly", "samesite", "path", "max-age"} <= attributes and "secure" not in attributes  # plain HTTP
    assert "SameSite=Strict" in session_line
    csrf_line = next(line for line in set_cookies if line.startswith(pyfiledrop.CSRF_COOKIE + "="))
    assert "HttpOnly" not in csrf_line and "SameSite=Strict" in csrf_line   # the page's script reads it
    assert req(protected, "GET", "/api/uploads", None, cookie_header(session))[0] == 200


def test_login_redirects_only_to_this_server(protected):
    status, headers, _ = login(protected, ADMIN_PASSWORD, "/files?q=x")
    assert status == 303 and headers["Location"] == "/files?q=x"
    for hostile in ["//evil.example/", "http://evil.example/", "/\\evil.example", "javascript:alert(1)"]:
        status, headers, _ = login(protected, ADMIN_PASSWORD, hostile)
        assert status == 303 and headers["Location"] == "/files", hostile
    status, headers, _ = login(protected, UPLOAD_PASSWORD)
    assert headers["Location"] == "/"


def test_a_wrong_login_is_403_with_the_form_again(protected):
    status, headers, body = req(protected, "POST", "/login", b"password=nope&next=/files",
                                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 403 and b"Wrong password." in body and b'value="/files"' in body
    assert "Set-Cookie" not in headers


def test_an_upload_login_cannot_use_admin_routes(protected):
    session, _, _ = login_cookies(protected, UPLOAD_PASSWORD)
    assert req(protected, "GET", "/", None, cookie_header(session))[0] == 200
    assert req(protected, "GET", "/api/uploads", None, cookie_header(session))[0] == 403


def test_a_forged_or_altered_cookie_is_no_login(protected):
    session, _, _ = login_cookies(protected, UPLOAD_PASSWORD)
    role, expires, nonce, signature = session.split(".")
    forged = [f"admin.{expires}.{nonce}.{signature}",                 # promoted to admin
              f"{role}.{int(expires) + 10**6}.{nonce}.{signature}",   # lifetime stretched
              f"{role}.{expires}.{nonce}.{signature[:-2]}AA",
              f"{role}.{expires}.{nonce}", "admin", "", "a.b.c.d.e", "upload.9.x.\u00e9"]
    for value in forged:
        status, _, _ = req(protected, "GET", "/", None, {"Cookie": f"{pyfiledrop.SESSION_COOKIE}={value}".encode(
            "utf-8").decode("latin-1")})
        assert status == 401, value


def test_a_cookie_expires(protected):
    session, _, _ = login_cookies(protected, UPLOAD_PASSWORD)
    assert req(protected, "GET", "/", None, cookie_header(session))[0] == 200
    protected.clock.now += pyfiledrop.SESSION_SECONDS + 1
    assert req(protected, "GET", "/", None, cookie_header(session))[0] == 401


def test_logins_survive_a_restart_and_end_when_the_password_changes(tmp_path):
    upload, admin = hashes()
    with running_server(tmp_path, password=upload, admin_password=admin) as first:
        session, _, _ = login_cookies(first, ADMIN_PASSWORD)
        assert req(first, "GET", "/api/uploads", None, cookie_header(session))[0] == 200
    key_file = tmp_path / "chunks" / pyfiledrop.SESSION_KEY_FILENAME
    assert key_file.stat().st_mode & 0o077 == 0
    with running_server(tmp_path, password=upload, admin_password=pyfiledrop.PasswordHash.of(ADMIN_PASSWORD)) as again:
        assert req(again, "GET", "/api/uploads", None, cookie_header(session))[0] == 200   # a new salt, same login
    with running_server(tmp_path, password=upload, admin_password=pyfiledrop.PasswordHash.of("changed")) as changed:
        assert req(changed, "GET", "/api/uploads", None, cookie_header(session))[0] == 401
    key_file.write_bytes(b"damaged")
    with running_server(tmp_path, password=upload, admin_password=admin) as damaged:
        assert req(damaged, "GET", "/api/uploads", None, cookie_header(session))[0] == 401
        assert len(key_file.read_bytes()) == 32


def test_logout_clears_the_cookies(protected):
    reply = raw_exchange(protected.port, b"POST /logout HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                         b"Connection: close\r\n\r\n")
    assert reply.startswith("HTTP/1.1 303 ")
    assert f"Set-Cookie: {pyfiledrop.SESSION_COOKIE}=; HttpOnly; Path=/; Max-Age=0; SameSite=Strict" in reply
    assert f"Set-Cookie: {pyfiledrop.CSRF_COOKIE}=; Path=/; Max-Age=0; SameSite=Strict" in reply


# -- CSRF and cross-site requests ---------------------------------------------------------------------------------------

def test_a_cookie_login_needs_the_csrf_token_to_change_anything(protected):
    upload_id = stored_upload(protected)["id"]
    session, csrf, _ = login_cookies(protected, ADMIN_PASSWORD)
    for token in [None, "", "x" * 32, csrf[:-1] + ("A" if csrf[-1] != "A" else "B")]:
        headers = cookie_header(session) | ({pyfiledrop.CSRF_HEADER: token} if token is not None else {})
        status, _, body = req(protected, "DELETE", f"/api/uploads/{upload_id}", None, headers)
        assert status == 403 and b"CSRF" in body, token
    assert (protected.storage / "a.txt").exists()
    status, _, body = req(protected, "DELETE", f"/api/uploads/{upload_id}", None,
                                        cookie_header(session) | {pyfiledrop.CSRF_HEADER: csrf})
    assert status == 200, body
    assert not (protected.storage / "a.txt").exists()


def test_an_upload_with_a_cookie_but_no_csrf_token_stores_nothing(protected):
    session, csrf, _ = login_cookies(protected, UPLOAD_PASSWORD)
    status, _, _ = req(protected, "PUT", "/upload/a.txt", b"hello", cookie_header(session))
    assert status == 403 and os.listdir(protected.storage) == []
    status, _, _ = req(protected, "PUT", "/upload/a.txt", b"hello", cookie_header(session) | {
        pyfiledrop.CSRF_HEADER: csrf})
    assert status == 200


def test_another_sessions_csrf_token_does_not_fit(protected):
    session, _, _ = login_cookies(protected, ADMIN_PASSWORD)
    _, other_csrf, _ = login_cookies(protected, ADMIN_PASSWORD)
    status, _, _ = req(protected, "POST", "/api/cleanup", b"{}", cookie_header(session) | {
        pyfiledrop.CSRF_HEADER: other_csrf})
    assert status == 403


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Sec-Fetch-Site": "same-site", "Origin": "null"},
                                     {"Origin": "http://127.0.0.1.evil.example"}])
def test_requests_from_another_site_are_refused(protected, headers):
    body = f"password={ADMIN_PASSWORD}".encode()
    status, response_headers, _ = req(protected, "POST", "/login", body, {
        "Content-Type": "application/x-www-form-urlencoded", **headers})
    assert status == 403 and "Set-Cookie" not in response_headers
    status, _, _ = req(protected, "PUT", "/upload/a.txt", b"x", basic(UPLOAD_PASSWORD) | headers)
    assert status == 403 and os.listdir(protected.storage) == []


@pytest.mark.parametrize("headers", [{"Sec-Fetch-Site": "same-origin"}, {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
                                     {"Origin": "http://127.0.0.1:{port}"}, {}])
def test_a_same_origin_request_is_not_taken_for_cross_site(protected, headers):
    """Our own login form sends Origin: null (the page's Referrer-Policy is no-referrer)."""
    headers = {name: value.format(port=protected.port) for name, value in headers.items()}
    status, _, _ = req(protected, "PUT", "/upload/a.txt", b"x", basic(UPLOAD_PASSWORD) | headers)
    assert status == 200


# -- throttling ------------------------------------------------------------------------------------------------------

def test_repeated_wrong_passwords_from_one_address_are_slowed_down(protected):
    for _ in range(pyfiledrop.FREE_FAILURES):
        assert req(protected, "GET", "/", None, basic("guess"))[0] == 403
    status, headers, body = req(protected, "GET", "/", None, basic(UPLOAD_PASSWORD))  # even the right one waits
    assert status == 429 and headers["Retry-After"] == "2", body
    status, _, body = req(protected, "POST", "/login", f"password={UPLOAD_PASSWORD}".encode(),
                                        {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 429 and b"try again in 2 s" in body
    protected.clock.now += 2
    assert req(protected, "GET", "/", None, basic("guess again"))[0] == 403
    assert req(protected, "GET", "/", None, basic(UPLOAD_PASSWORD))[1]["Retry-After"] == "4"   # doubled
    protected.clock.now += 4
    assert req(protected, "GET", "/", None, basic(UPLOAD_PASSWORD))[0] == 200   # and a success forgives
    assert req(protected, "GET", "/", None, basic("one slip"))[0] == 403
    assert req(protected, "GET", "/", None, basic(UPLOAD_PASSWORD))[0] == 200


def test_a_logged_in_browser_is_not_throttled_by_anothers_guesses_through_its_cookie(protected):
    session, _, _ = login_cookies(protected, UPLOAD_PASSWORD)
    for _ in range(pyfiledrop.FREE_FAILURES + 2):
        req(protected, "GET", "/", None, basic("guess"))
    assert req(protected, "GET", "/", None, cookie_header(session))[0] == 200


def test_throttling_counts_an_ipv6_slash_64_as_one_address():
    clock = Clock()
    throttle = pyfiledrop._Throttle(clock)
    for number in range(pyfiledrop.FREE_FAILURES):
        throttle.failed(f"2001:db8:1:2::{number + 1:x}")
    assert throttle.wait_left("2001:db8:1:2:ffff::9") == 2.0
    assert throttle.wait_left("2001:db8:1:3::1") == 0.0
    assert throttle.wait_left("::ffff:10.0.0.1") == 0.0
    for _ in range(pyfiledrop.FREE_FAILURES + 20):
        throttle.failed("::ffff:10.0.0.1")
    assert throttle.wait_left("10.0.0.1") == pyfiledrop.MAX_LOCKOUT_S   # the same address, capped
    clock.now += pyfiledrop.FAILURES_FORGOTTEN_S + 1
    throttle.failed("10.0.0.1")
    assert throttle.wait_left("10.0.0.1") == 0.0   # an old streak is forgotten


def test_the_password_is_kept_only_as_a_hash():
    hashed = pyfiledrop.PasswordHash.of("correct horse")
    assert "correct" not in repr(hashed) and b"correct" not in hashed.digest + hashed.salt + hashed.session_tag
    assert hashed.matches("correct horse") and not hashed.matches("correct horse ")
    assert pyfiledrop.PasswordHash.of("correct horse").salt != hashed.salt


# -- the command line -------------------------------------------------------------------------------------------------

def test_passwords_from_the_environment(tmp_path):
    env = {pyfiledrop.PASSWORD_ENV: "env-secret", pyfiledrop.ADMIN_PASSWORD_ENV: "env-admin"}
    with cli_server(["--password", "--admin-password", "-s", str(tmp_path / "s"), "-c", str(tmp_path / "c")],
                    env=env) as (process, port):
        assert req(port, "GET", "/")[0] == 401
        assert req(port, "GET", "/", None, basic("env-secret"))[0] == 200
        assert req(port, "GET", "/api/uploads", None, basic("env-secret"))[0] == 403
        assert req(port, "GET", "/api/uploads", None, basic("env-admin"))[0] == 200


def test_the_environment_variable_alone_protects_too(tmp_path):
    with cli_server(["-s", str(tmp_path / "s"), "-c", str(tmp_path / "c")],
                    env={pyfiledrop.PASSWORD_ENV: "env-secret"}) as (process, port):
        assert req(port, "GET", "/")[0] == 401


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pyfiledrop.py"), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, **env}, timeout=60)


def test_without_a_terminal_or_variable_the_flag_says_what_to_do(tmp_path):
    env = {pyfiledrop.PASSWORD_ENV: "", pyfiledrop.ADMIN_PASSWORD_ENV: ""}
    result = run_cli(["--admin-password", "-s", str(tmp_path / "s"), "-c", str(tmp_path / "c")], env)
    assert result.returncode == 2
    assert result.stderr.strip() == ("pyfiledrop: error: --admin-password: no terminal to ask for it on; "
                                     "set PYFILEDROP_ADMIN_PASSWORD instead")


def test_the_same_password_for_both_roles_is_refused(tmp_path):
    result = run_cli(["--password", "--admin-password"], {pyfiledrop.PASSWORD_ENV: "same",
                                                          pyfiledrop.ADMIN_PASSWORD_ENV: "same"})
    assert result.returncode == 2 and "must differ" in result.stderr


def pty_server(args: list[str]):
    """pyfiledrop with a real terminal on stdin/stdout (the getpass prompt needs one): (pid, fd)."""
    env = {key: value for key, value in os.environ.items() if key not in (pyfiledrop.PASSWORD_ENV,
                                                                          pyfiledrop.ADMIN_PASSWORD_ENV)}
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, str(ROOT / "pyfiledrop.py"), *args], {**env, "PYTHONUNBUFFERED": "1"})
    return pid, fd


def read_until(fd: int, needle: bytes, seen: bytearray, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while needle not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} in {bytes(seen)!r}")
        if select.select([fd], [], [], left)[0]:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                raise AssertionError(f"the program ended; output: {bytes(seen)!r}")


def test_the_password_is_asked_on_the_terminal_and_never_echoed(tmp_path):
    port = free_port()
    pid, fd = pty_server(["--password", "--host", "127.0.0.1", "-p", str(port), "--no-qr",
                          "-s", str(tmp_path / "s"), "-c", str(tmp_path / "c")])
    seen = bytearray()
    try:
        read_until(fd, b"Password: ", seen)
        os.write(fd, b"typed secret\n")
        read_until(fd, b"The same again: ", seen)
        os.write(fd, b"typed secret\n")
        read_until(fd, b"Press Ctrl+C to stop.", seen)
        assert b"typed secret" not in seen
        assert req(port, "GET", "/")[0] == 401
        assert req(port, "GET", "/", None, basic("typed secret"))[0] == 200
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert b"secret" not in cmdline.read()
    finally:
        os.kill(pid, 15)
        os.waitpid(pid, 0)
        os.close(fd)


def test_two_different_entries_on_the_terminal_are_refused(tmp_path):
    pid, fd = pty_server(["--password", "-s", str(tmp_path / "s"), "-c", str(tmp_path / "c")])
    seen = bytearray()
    try:
        read_until(fd, b"Password: ", seen)
        os.write(fd, b"one\n")
        read_until(fd, b"The same again: ", seen)
        os.write(fd, b"two\n")
        read_until(fd, b"the two entries differ", seen)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 2


def test_a_chunked_login_form_is_refused_unread(protected):
    reply = raw_exchange(protected.port, b"POST /login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                         b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
                                         b"ffffff\r\n" + b"password=" + b"x" * 1000)
    assert reply.startswith("HTTP/1.1 411 ")


def test_a_wrong_password_is_one_console_line(protected):
    req(protected, "PUT", "/upload/a.txt", b"x", basic("nope"))
    req(protected, "POST", "/login", b"password=nope", {"Content-Type": "application/x-www-form-urlencoded"})
    refused = [event for event in protected.events if isinstance(event, pyfiledrop.Refused)]
    assert [(event.what, event.client, event.status) for event in refused] == [
        ("PUT /upload/a.txt", "127.0.0.1", 403), ("a login", "127.0.0.1", 403)]


def test_the_banner_says_who_may_do_what():
    upload, admin = hashes()
    summary = lambda **options: pyfiledrop.access_summary(pyfiledrop.Config(**options))  # noqa: E731
    assert summary() == "uploads open to anyone who reaches the port; /files off (no --admin-password)"
    assert summary(password=upload, admin_password=admin) == (
        "uploads need the password; /files needs the admin password")
    assert summary(admin_password=admin) == "uploads open to anyone who reaches the port; /files needs the admin password"
    text = pyfiledrop.banner(pyfiledrop.Config(expire_after_s=7 * 86400), ["http://x/"])
    assert "  access         uploads open to anyone who reaches the port;" in text
    assert "  expiry         stored files are removed 7d after they are stored" in text
    assert "expiry" not in pyfiledrop.banner(pyfiledrop.Config(), ["http://x/"])
    assert pyfiledrop.expiry_banner_lines(pyfiledrop.Config(expire_after_s=90)) == [
        "  expiry         stored files are removed 90s after they are stored"]


def test_many_guesses_sent_at_once_get_no_more_than_the_free_tries(protected):
    """Each try counts before its (slow) check, so a burst cannot slip in under the limit."""
    results = []

    def guess(number):
        results.append(req(protected, "GET", "/", None, basic(f"guess {number}"))[0])

    threads = [threading.Thread(target=guess, args=(number,)) for number in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [403] * pyfiledrop.FREE_FAILURES + [429] * (16 - pyfiledrop.FREE_FAILURES)


def test_pyfiledrop_send_and_tus_clients_use_basic(protected, tmp_path):
    source = tmp_path / "to send"
    source.mkdir()
    (source / "a.txt").write_bytes(b"sent with a password")
    command = [sys.executable, str(ROOT / "pyfiledrop.py"), "send", str(source), "--to", protected.url, "-q",
               "--state", str(tmp_path / "state.json")]
    wrong = subprocess.run(command, capture_output=True, text=True, timeout=120,
                           env={**os.environ, pyfiledrop.PASSWORD_ENV: "not it"})
    assert wrong.returncode != 0 and "Wrong password" in wrong.stderr + wrong.stdout
    status, headers, _ = req(protected, "POST", "/tus/", b"", {"Tus-Resumable": "1.0.0", "Upload-Length": "5"})
    assert status == 401 and headers["Tus-Resumable"] == "1.0.0"   # a tus client can read the refusal
    right = subprocess.run(command, capture_output=True, text=True, timeout=120,
                           env={**os.environ, pyfiledrop.PASSWORD_ENV: UPLOAD_PASSWORD})
    assert right.returncode == 0, right.stderr
    assert (protected.storage / "to send" / "a.txt").read_bytes() == b"sent with a password"


@pytest.mark.skipif(not hasattr(pyfiledrop, "open_tls"), reason="needs --tls (from branch issue12-tls, not merged yet)")
def test_under_https_the_login_cookies_are_secure(tmp_path):
    import ssl

    env = {pyfiledrop.ADMIN_PASSWORD_ENV: ADMIN_PASSWORD}
    with cli_server(["--tls", "--admin-password", "-s", str(tmp_path / "s"), "-c", str(tmp_path / "c")],
                    env=env) as (process, port):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE   # the self-signed certificate
        body = f"password={ADMIN_PASSWORD}".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall((f"POST /login HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-"
                          f"urlencoded\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        cookies = [line for line in reply.decode("latin-1").split("\r\n") if line.lower().startswith("set-cookie:")]
        assert len(cookies) == 2 and all(line.endswith("; Secure") for line in cookies), cookies


@pytest.mark.skipif(not __import__("shutil").which("curl"), reason="curl is not installed")
def test_curl_with_basic_as_the_readme_shows(protected, tmp_path):
    """``curl -u :PASSWORD -T FILE URL``; a file over 1 MiB, so curl sends Expect: 100-continue and, refused,
    never sends the body."""
    data = os.urandom(3 * 1024 * 1024 + 7)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    base = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}", "-T", str(path)]
    wrong = subprocess.run(base + ["-u", ":wrong", f"{protected.url}/upload/"], capture_output=True, text=True,
                           timeout=120)
    assert wrong.stdout.split() == ["403", "0"], wrong.stdout + wrong.stderr   # not one byte of the body sent
    missing = subprocess.run(base + [f"{protected.url}/upload/"], capture_output=True, text=True, timeout=120)
    assert missing.stdout.split() == ["401", "0"], missing.stdout + missing.stderr
    right = subprocess.run(base + ["-u", f":{UPLOAD_PASSWORD}", f"{protected.url}/upload/"], capture_output=True,
                           text=True, timeout=120)
    assert right.stdout.split()[0] == "200", right.stdout + right.stderr
    assert (protected.storage / "photo.jpg").read_bytes() == data


def test_shared_files_need_the_upload_password(make_server, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "menu.pdf").write_bytes(b"%PDF")
    upload, _ = hashes()
    server = make_server(password=upload, share=shared)
    assert req(server, "GET", "/api/shared")[0] == 401
    assert req(server, "GET", "/shared/menu.pdf")[0] == 401
    status, _, body = req(server, "GET", "/shared/menu.pdf", None, basic(UPLOAD_PASSWORD))
    assert (status, body) == (200, b"%PDF")
