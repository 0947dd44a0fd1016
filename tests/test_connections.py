"""The HTTP server with real sockets: idle, slow and hostile connections, the limits, HTTP/1.1 framing.

Timing assertions are only generous bounds that catch a hang; synchronisation is by events and polling with
deadlines, never by sleeping.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import select
import socket
import threading
import time

import pytest

import pyfiledrop
from conftest import running_server

HANG = 10.0  # seconds: anything slower than this is a hang, not a slow machine


@contextlib.contextmanager
def tiny_server(app, **limits):
    """``make_server`` with small limits around a WSGI app of the test's own; stopped (and checked) at the end."""
    server = pyfiledrop.make_server(app, "127.0.0.1", 0, limits=pyfiledrop.ServerLimits(**limits))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        stop.set()
        thread.join(HANG)
        assert not thread.is_alive(), "serve() did not return after stop was set"


def echo_app(environ, start_response):
    """Reads the whole body with readinto and answers with its length, sha256 and the client's port."""
    if environ["PATH_INFO"] == "/refuse":
        start_response("413 Request Entity Too Large", [("Content-Length", "4")])
        return [b"no\r\n"]
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("secret internals")
    digest, total = hashlib.sha256(), 0
    buffer = memoryview(bytearray(7000))  # an odd size, so reads straddle chunk boundaries
    try:
        while True:
            count = environ["wsgi.input"].readinto(buffer)
            if not count:
                break
            digest.update(buffer[:count])
            total += count
    except OSError as error:
        body = f"body error {type(error).__name__}".encode()
        start_response("400 Bad Request", [("Content-Length", str(len(body))), ("Connection", "close")])
        return [body]
    body = f"{total} {digest.hexdigest()} {environ['REMOTE_PORT']} {environ.get('CONTENT_LENGTH')}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def connect(port: int, timeout: float = HANG) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One response with a Content-Length (or up to the close) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        block = sock.recv(65536)
        if not block:
            raise ConnectionError(f"closed after {data!r}")
        data += block
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    status = int(lines[0].split()[1])
    length = 0 if status in (204, 304) else int(headers.get("content-length", -1))
    while length < 0 or len(body) < length:
        block = sock.recv(65536)
        if not block:
            break
        body += block
    return status, headers, body


def wait_closed(sock: socket.socket, bound: float = HANG) -> bytes:
    """Everything the server still sends until it closes the connection; fails if it stays open ``bound`` s."""
    sock.settimeout(bound)
    data = b""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            block = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not block:
            return data
        data += block
    raise AssertionError("the server kept the connection open")


def is_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.settimeout(HANG)


def get(sock: socket.socket, path: str = "/", extra: str = "") -> tuple[int, dict, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())
    return read_response(sock)


class Trickler:
    """Background thread sending one byte at a time to each of its sockets until stopped (bounded)."""

    def __init__(self, sockets_and_data: list[tuple[socket.socket, bytes]], interval: float = 0.2):
        self.items = sockets_and_data
        self.interval = interval
        self.stop = threading.Event()
        self.sent = [0] * len(self.items)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(int(60 / self.interval)):  # at most a minute
            if self.stop.is_set():
                return
            for i, (sock, data) in enumerate(self.items):
                if self.sent[i] < len(data) and self.sent[i] >= 0:
                    try:
                        sock.send(data[self.sent[i]:self.sent[i] + 1])
                        self.sent[i] += 1
                    except OSError:
                        self.sent[i] = -1  # closed by the server
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(HANG)
        for sock, _ in self.items:
            sock.close()


# -- the scenario: idle and slow connections cost no thread ---------------------------------------

def test_new_upload_served_while_300_idle_and_100_trickling(tmp_path):
    with running_server(tmp_path) as server:
        idle = [connect(server.port) for _ in range(300)]
        for sock in idle[:50]:  # some of them idle after a request (keep-alive), the rest never sent anything
            assert get(sock, "/api/uploads/none")[0] == 404
        heads = [(connect(server.port), b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 5000) for _ in range(50)]
        bodies = []
        for i in range(50):
            sock = connect(server.port)
            sock.sendall(f"PUT /upload/slow{i}.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n".encode())
            bodies.append((sock, b"b" * 100000))
        with Trickler(heads + bodies):
            data = os.urandom(1024 * 1024)
            started = time.monotonic()
            status, _, reply = server.request("PUT", "/upload/new.bin", data)
            elapsed = time.monotonic() - started
            assert status == 200, reply
            assert (server.storage / "new.bin").read_bytes() == data
            assert elapsed < HANG
            assert all(is_open(sock) for sock in idle[50:])  # nothing was evicted: the cap is per address
        for sock in idle:
            sock.close()
        assert sorted(p.name for p in server.storage.iterdir()) == ["new.bin"]


# -- timeouts -----------------------------------------------------------------------------------------------

def test_trickling_head_is_closed_after_the_head_deadline():
    with tiny_server(echo_app, head_timeout=1.0) as port:
        sock = connect(port)
        head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1000 + b"\r\n\r\n"
        with Trickler([(sock, head)], interval=0.02) as trickler:
            answer = wait_closed(sock)
            assert 0 <= trickler.sent[0] < len(head) or trickler.sent[0] == -1
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408 ")


def test_connection_that_sends_nothing_is_closed_after_the_idle_timeout():
    with tiny_server(echo_app, idle_timeout=1.0) as port:
        with connect(port) as sock:
            assert wait_closed(sock) == b""


def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout():
    with tiny_server(echo_app, idle_timeout=1.0) as port:
        with connect(port) as sock:
            assert get(sock)[0] == 200
            assert get(sock)[0] == 200  # kept alive
            assert wait_closed(sock) == b""


def test_trickling_body_is_cut_and_nothing_is_stored(tmp_path):
    limits = pyfiledrop.ServerLimits(min_rate_bytes=1024, min_rate_window=1.0)
    with running_server(tmp_path, limits=limits) as server:
        sock = connect(server.port)
        sock.sendall(b"PUT /upload/slow.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10)
        with Trickler([(sock, b"y" * 1000)], interval=0.02):
            wait_closed(sock)  # the server cut the connection (any error answer before the close is fine)
        assert list(server.storage.iterdir()) == []
        status, _, body = server.request("PUT", "/upload/ok.bin", b"fine")  # and it still serves
        assert status == 200, body


def test_a_body_that_stops_without_closing_is_cut():
    with tiny_server(echo_app, min_rate_bytes=1024, min_rate_window=1.0) as port:
        with connect(port) as sock:
            sock.sendall(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + b"x" * 100)
            answer = wait_closed(sock)
            assert answer == b"" or b"body error BodyTooSlow" in answer


# -- caps -----------------------------------------------------------------------------------------------------

def test_over_the_per_address_cap_the_oldest_parked_connection_is_closed():
    with tiny_server(echo_app, max_connections_per_address=4) as port:
        first = [connect(port) for _ in range(4)]
        for sock in first:  # in order, each served once: parked oldest first
            assert get(sock)[0] == 200
        newcomer = connect(port)
        assert get(newcomer)[0] == 200  # never refused while the address has parked connections
        assert wait_closed(first[0]) == b""
        assert all(is_open(sock) for sock in first[1:])
        for sock in first[1:]:
            assert get(sock)[0] == 200
        for sock in first + [newcomer]:
            sock.close()


def test_over_the_global_cap_a_parked_connection_makes_room():
    with tiny_server(echo_app, max_connections=3) as port:
        server_sockets = [connect(port) for _ in range(3)]
        for sock in server_sockets:
            assert get(sock)[0] == 200
        with connect(port) as newcomer:
            assert get(newcomer)[0] == 200
        # One parked connection made room: the oldest by when its worker handed it back, which under load
        # need not be the first one opened.
        readable, _, _ = select.select(server_sockets, [], [], HANG)
        assert readable and wait_closed(readable[0]) == b""
        for sock in server_sockets:
            sock.close()


def test_busy_cap_per_address_answers_503():
    entered, release = threading.Semaphore(0), threading.Event()

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/block":
            entered.release()
            release.wait(HANG)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    with tiny_server(app, max_busy_per_address=2) as port:
        blocked = [connect(port), connect(port)]
        for sock in blocked:
            sock.sendall(b"GET /block HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in blocked:
            assert entered.acquire(timeout=HANG)
        with connect(port) as third:
            status, headers, _ = get(third)
            assert status == 503
            assert headers.get("connection") == "close"
            assert wait_closed(third) == b""
        release.set()
        for sock in blocked:
            assert read_response(sock)[0] == 200
        with connect(port) as again:
            assert get(again)[0] == 200  # the cap counts requests running, not the address for ever
        for sock in blocked:
            sock.close()


def test_oversized_head_answers_431():
    with tiny_server(echo_app, max_head_bytes=4096) as port:
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
            assert wait_closed(sock).startswith(b"HTTP/1.1 431 ")


# -- HTTP/1.1 -----------------------------------------------------------------------------------------------

def test_keep_alive_reuses_one_connection_for_several_requests():
    with tiny_server(echo_app) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
        ports = set()
        for i in range(5):
            body = os.urandom(1000 * i)
            connection.request("POST", "/", body=body)
            response = connection.getresponse()
            total, digest, client_port, length = response.read().decode().split()
            assert (int(total), digest, length) == (len(body), hashlib.sha256(body).hexdigest(), str(len(body)))
            ports.add(client_port)
        connection.close()
        assert len(ports) == 1


def test_chunked_request_body_reaches_the_app_intact():
    body = os.urandom(300_000)
    sizes = [1, 2, 7000, 7001, 65536, 100_000]
    pieces, at = [], 0
    for i, size in enumerate(sizes):
        piece = body[at:at + size]
        at += size
        pieces.append(b"%x%s\r\n" % (len(piece), b";ext=1" if i % 2 else b"") + piece + b"\r\n")
    pieces.append(b"%X\r\n" % (len(body) - at) + body[at:] + b"\r\n0\r\nX-Trailer: yes\r\n\r\n")
    with tiny_server(echo_app) as port, connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(pieces))
        status, _, reply = read_response(sock)
        total, digest, _, length = reply.decode().split()
        assert (status, int(total), digest, length) == (200, len(body), hashlib.sha256(body).hexdigest(), "None")
        assert get(sock)[0] == 200  # the connection is still in step


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_body_bytes_that_came_with_the_head_reach_the_app_when_the_client_then_vanishes(ending):
    """The bytes read with the head are handed over with whatever else has arrived; a connection that has
    ended or broken meanwhile costs none of them (a resumable upload keeps what arrived)."""
    body, reads, done = os.urandom(5000), [], threading.Event()
    may_read = threading.Event()

    def app(environ, start_response):
        may_read.wait(HANG)
        buffer = memoryview(bytearray(65536))
        try:
            while count := environ["wsgi.input"].readinto(buffer):
                reads.append(bytes(buffer[:count]))
        except OSError as error:
            reads.append(type(error).__name__)
        done.set()
        start_response("400 Bad Request", [("Content-Length", "0"), ("Connection", "close")])
        return [b""]

    with tiny_server(app) as port:
        sock = connect(port)
        sock.sendall(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + body)
        if ending == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        may_read.set()
        assert done.wait(HANG)
    assert b"".join(reads[:-1]) == body and reads[-1] == "BodyIncomplete", reads[-1]


def test_malformed_chunked_body_is_an_oserror_for_the_app():
    with tiny_server(echo_app) as port, connect(port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcdeXX")
        assert b"body error BodyIncomplete" in wait_closed(sock)


def test_expect_100_continue():
    with tiny_server(echo_app) as port, connect(port) as sock:
        sock.sendall(b"PUT / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = b""
        while b"\r\n\r\n" not in interim:
            block = sock.recv(1)  # one byte at a time: nothing of a final answer may be read here
            assert block, "closed before 100 Continue"
            interim += block
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        status, _, reply = read_response(sock)
        assert status == 200 and reply.startswith(b"5 " + hashlib.sha256(b"hello").hexdigest().encode())


def test_expect_100_continue_refused_without_reading_the_body():
    with tiny_server(echo_app) as port, connect(port) as sock:
        sock.sendall(b"PUT /refuse HTTP/1.1\r\nHost: t\r\nContent-Length: 500000000\r\nExpect: 100-continue\r\n\r\n")
        status, _, _ = read_response(sock)
        assert status == 413
        assert wait_closed(sock) == b""  # the body was never asked for: the connection closes


def test_unread_small_body_is_read_off_and_the_connection_kept():
    with tiny_server(echo_app) as port, connect(port) as sock:
        sock.sendall(b"PUT /refuse HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100000)
        assert read_response(sock)[0] == 413
        assert get(sock)[0] == 200


@pytest.mark.parametrize("line, status", [
    (b"GARBAGE", 400),
    (b"GET /\x01 HTTP/1.1", 400),
    (b"GET / HTTP/1.1 extra", 400),
    (b"GET / HTTX/1.1", 400),
    (b"GET / HTTP/2.0", 400),
    (b"GET relative HTTP/1.1", 400),
])
def test_malformed_request_line(line, status):
    with tiny_server(echo_app) as port, connect(port) as sock:
        sock.sendall(line + b"\r\nHost: t\r\n\r\n")
        answer = wait_closed(sock)
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer


def test_malformed_headers_answer_400():
    for head in (b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
                 b"GET / HTTP/1.1\r\nBad name: x\r\n\r\n",
                 b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
                 b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
                 b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET / HTTP/1.1\r\n\r\n",                                    # no Host (RFC 9112 3.2)
                 b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"):          # two
        with tiny_server(echo_app) as port, connect(port) as sock:
            sock.sendall(head)
            assert wait_closed(sock).startswith(b"HTTP/1.1 400 "), head


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n",       # NUL in a value
    b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n",          # a bare CR: some parsers end the line there
    b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\r\n\r\n",
])
def test_cr_or_nul_inside_a_header_line_answers_400(head):
    # RFC 9110 5.5: a field value with CR, LF or NUL must be refused (or the bytes replaced), never passed on
    seen = []

    def app(environ, start_response):
        seen.append(environ)
        return echo_app(environ, start_response)

    with tiny_server(app) as port, connect(port) as sock:
        sock.sendall(head)
        answer = wait_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"CR or NUL" in answer and not seen


def test_a_head_ended_with_bare_line_feeds_answers_400_at_once():
    # without the check it waited for a CRLF CRLF that never comes: answered 408 after the head timeout
    with tiny_server(echo_app, head_timeout=3 * HANG) as port, connect(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\nHost: t\nConnection: close\n\n")
        answer = wait_closed(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"CRLF" in answer


def test_headers_reach_the_app_as_cgi_keys_however_many_names_clients_make_up():
    # header names are remembered with their environ keys, a bounded number of them: names past the bound
    # (made up by a client, one per request here) push the oldest out, and every one must still arrive right;
    # "_" names must still be dropped
    seen = {}

    def app(environ, start_response):
        seen.update((key, value) for key, value in environ.items() if key.startswith(("HTTP_X", "CONTENT_")))
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    with tiny_server(app) as port, connect(port) as sock:
        bound = pyfiledrop._environ_key.cache_info().maxsize
        for number in range(bound + 50):
            assert get(sock, extra=f"X-Made-Up-{number}: {number}\r\n")[0] == 200
        sock.sendall(b"PUT / HTTP/1.1\r\nHost: t\r\nx-last: a\r\nX-Last: b\r\nX_Under: no\r\n"
                     b"content-type: text/plain\r\nContent-Length: 0\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert get(sock, extra="X-Made-Up-0: again\r\n")[0] == 200   # pushed out of the cache by now
    last = bound + 49
    assert seen[f"HTTP_X_MADE_UP_{last}"] == str(last) and seen["HTTP_X_MADE_UP_0"] == "again"
    assert seen["HTTP_X_LAST"] == "a, b" and "HTTP_X_UNDER" not in seen
    assert seen["CONTENT_TYPE"] == "text/plain" and seen["CONTENT_LENGTH"] == "0"


def test_head_has_no_body_and_pipelining_keeps_step():
    with tiny_server(echo_app) as port, connect(port) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = wait_closed(sock)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert rest.startswith(b"HTTP/1.1 200 "), rest  # not one byte of body after the HEAD answer
        assert b"Connection: close" in rest


def test_app_exception_answers_500_without_a_traceback():
    with tiny_server(echo_app) as port, connect(port) as sock:
        status, _, body = get(sock, "/boom")
        assert status == 500
        assert b"secret" not in body and b"Traceback" not in body


def test_chunked_response_and_http10():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"hello ", b"", b"world"])

    with tiny_server(app) as port:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.getheader("Transfer-Encoding") == "chunked"
        assert response.read() == b"hello world"
        connection.close()
        with connect(port) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = wait_closed(sock)
            assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nhello world")


def test_path_info_is_the_raw_bytes_as_latin1():
    seen = {}

    def app(environ, start_response):
        seen.update(path=environ["PATH_INFO"], query=environ["QUERY_STRING"])
        start_response("204 No Content", [])
        return []

    with tiny_server(app) as port, connect(port) as sock:
        status, _, _ = get(sock, "/upload/caf%C3%A9%2Fx.txt?a=1&b=%20")
        assert status == 204
        assert seen == {"path": "/upload/caf\xc3\xa9/x.txt", "query": "a=1&b=%20"}


def test_stop_closes_every_connection_promptly():
    server = pyfiledrop.make_server(echo_app, "127.0.0.1", 0)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,), daemon=True)
    thread.start()
    port = server.server_address[1]
    sockets = [connect(port) for _ in range(20)]
    assert get(sockets[0])[0] == 200
    stop.set()
    thread.join(HANG)
    assert not thread.is_alive()
    for sock in sockets:
        assert wait_closed(sock) == b""
        sock.close()
    with pytest.raises(OSError):
        connect(port, timeout=2).close()
