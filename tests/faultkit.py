"""Helpers for the issue-9 fault tests: a server subprocess with its output, raw sockets that stall or trickle,
the page's resume protocol, tmpfs mounts, and what the folders may hold.

Everything here talks to the real program over loopback sockets; nothing imports the engine.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import select
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import Output, chunk_fields, cli_server, encode_multipart, http_request

LEDGER = "ledger.sqlite3"
LEDGER_FILES = {LEDGER, LEDGER + "-wal", LEDGER + "-shm", LEDGER + "-journal"}
MIB = 1024 * 1024


def chunk_count(total_size: int, chunk_size: int) -> int:
    """As Dropzone counts: an empty file is still one (empty) chunk."""
    return max(1, -(-total_size // chunk_size))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 100):
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            break
        threading.Event().wait(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


# -- the server and its console ------------------------------------------------------------------------------

@dataclasses.dataclass
class Drop:
    process: subprocess.Popen
    port: int
    output: Output
    storage: Path
    chunks: Path

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        return http_request(self.port, method, path, body, headers)

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait(10)


def min_free(value: str) -> list[str]:
    """``--min-free VALUE``; FAULTKIT_OMIT_MIN_FREE=1 leaves it out, to see 1.0 fail for its real reason rather
    than for not knowing the option."""
    return [] if os.environ.get("FAULTKIT_OMIT_MIN_FREE") == "1" else ["--min-free", value]


@contextlib.contextmanager
def drop_server(storage: Path, chunks: Path, *extra: str, cwd: Path | None = None):
    """``pyfiledrop.py -s STORAGE -c CHUNKS --no-qr EXTRA`` on a free port, its output collected."""
    storage.mkdir(parents=True, exist_ok=True)
    chunks.mkdir(parents=True, exist_ok=True)
    args = ["-s", str(storage), "-c", str(chunks), "--no-qr", *extra]
    with cli_server(args, cwd=cwd) as (process, port):
        yield Drop(process, port, Output(process), storage, chunks)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` for the test; skips when not root or mount is not allowed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        for _ in range(50):  # a server still closing its files may hold the mount for a moment
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            threading.Event().wait(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# -- what the folders may hold ---------------------------------------------------------------------------------

def names(folder: Path) -> set[str]:
    return {entry.name for entry in os.scandir(folder)} if folder.exists() else set()


def stray_in_chunks(chunks: Path, *, parts_allowed: bool = False) -> set[str]:
    """Files in the chunks folder other than the ledger (and ``*.part`` of uploads still receiving)."""
    return {name for name in names(chunks)
            if name not in LEDGER_FILES and not (parts_allowed and name.endswith(".part"))}


def hidden_in_storage(storage: Path) -> set[str]:
    return {name for name in names(storage) if name.startswith(".")}


def storage_contents(storage: Path) -> dict[str, bytes]:
    return {entry.name: Path(entry.path).read_bytes() for entry in os.scandir(storage) if entry.is_file()}


def assert_clean(drop_or_storage, chunks: Path | None = None, *, parts_allowed: bool = False) -> None:
    """No hidden files in storage; nothing but the ledger (and maybe ``*.part``) in the chunks folder."""
    storage = drop_or_storage.storage if chunks is None else drop_or_storage
    chunks = drop_or_storage.chunks if chunks is None else chunks
    assert not hidden_in_storage(storage), f"hidden files in storage: {sorted(hidden_in_storage(storage))}"
    stray = stray_in_chunks(chunks, parts_allowed=parts_allowed)
    assert not stray, f"the chunks folder holds more than the ledger: {sorted(stray)}"


def snapshot_tree(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (outside ``skip``) with its size and mtime."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(folder, d) not in skip]
        for name in files + dirs:
            path = Path(folder, name)
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            found[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns if name in files else 0)
    return found


# -- plain requests --------------------------------------------------------------------------------------------

def post_chunk(port: int, upload_id: str, index: int, piece: bytes, total_size: int, chunk_size: int,
               name: str, timeout: float = 60):
    """One chunk as the page sends it: (status, reply as JSON or text)."""
    body, content_type = encode_multipart(chunk_fields(upload_id, index, total_size, chunk_size),
                                          [("file", name, piece)])
    status, _, answer = exchange(port, "POST", "/upload", body, {"Content-Type": content_type}, timeout=timeout)
    return status, decode(answer)


def upload_chunked(port: int, data: bytes, chunk_size: int, name: str, upload_id: str | None = None):
    upload_id = upload_id or str(uuid.uuid4())
    reply = None
    for index in range(chunk_count(len(data), chunk_size)):
        status, reply = post_chunk(port, upload_id, index, data[index * chunk_size:(index + 1) * chunk_size],
                                   len(data), chunk_size, name)
        if status != 200:
            return status, reply
    return 200, reply


def put(port: int, name: str, data: bytes, timeout: float = 60):
    status, _, answer = exchange(port, "PUT", "/upload/" + name, data, {}, timeout=timeout)
    return status, decode(answer)


def post_files(port: int, files: list[tuple[str, bytes]]):
    body, content_type = encode_multipart({}, [("file", name, data) for name, data in files])
    status, _, answer = exchange(port, "POST", "/upload", body, {"Content-Type": content_type})
    return status, decode(answer)


def status_of(port: int, upload_id: str):
    status, _, answer = http_request(port, "GET", f"/api/uploads/{upload_id}")
    return status, decode(answer)


def decode(answer: bytes):
    try:
        return json.loads(answer)
    except ValueError:
        return answer.decode("utf-8", "replace")


# -- raw sockets -----------------------------------------------------------------------------------------------

class Closed(Exception):
    """The server closed (or reset) the connection without a response."""


def request_head(method: str, path: str, headers: dict, length: int | None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{key}: {value}" for key, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def connect(port: int, timeout: float = 60) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def answered(sock: socket.socket) -> bool:
    """Whether the server has sent something (a response, or the end of the connection) already."""
    return bool(select.select([sock], [], [], 0)[0])


def send_pieces(sock: socket.socket, data: bytes, piece: int = 256 * 1024, pause: float = 0.0) -> bool:
    """Send ``data``; stop early (False) once the server answers or closes, so an early refusal is not lost
    to a reset.  ``pause`` spaces the pieces (pacing a slow client, not synchronisation)."""
    view = memoryview(data)
    for start in range(0, len(view), piece):
        if answered(sock):
            return False
        try:
            sock.sendall(view[start:start + piece])
        except (BrokenPipeError, ConnectionResetError):
            return False
        if pause:
            threading.Event().wait(pause)
    return True


def read_response(sock: socket.socket, timeout: float = 60):
    """(status, headers, body) of the next response on ``sock``; raises Closed if there is none."""
    sock.settimeout(timeout)
    buffer = b""
    try:
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                raise Closed(buffer)
            buffer += data
            if len(buffer) > 1 << 20:
                raise AssertionError("response head over 1 MiB")
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if 100 <= status < 200:  # an interim answer ("100 Continue"): the response follows
            sock.settimeout(timeout)
            return _read_after_interim(sock, rest, timeout)
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(rest) < length:
                data = sock.recv(65536)
                if not data:
                    break
                rest += data
            body = rest[:length]
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = _read_chunked(sock, rest)
        else:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                rest += data
            body = rest
        return status, headers, body
    except ConnectionResetError:
        raise Closed(buffer) from None


class _Prefixed:
    """A socket that first returns ``prefix`` (bytes already read past an interim response)."""

    def __init__(self, sock, prefix: bytes):
        self.sock, self.prefix = sock, prefix

    def recv(self, size: int) -> bytes:
        if self.prefix:
            data, self.prefix = self.prefix[:size], self.prefix[size:]
            return data
        return self.sock.recv(size)

    def settimeout(self, timeout) -> None:
        self.sock.settimeout(timeout)


def _read_after_interim(sock, rest: bytes, timeout: float):
    return read_response(_Prefixed(sock, rest), timeout)


def _read_chunked(sock, rest: bytes) -> bytes:
    body = b""
    for _ in range(1 << 20):
        while b"\r\n" not in rest:
            data = sock.recv(65536)
            if not data:
                return body
            rest += data
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            data = sock.recv(65536)
            if not data:
                return body + rest
            rest += data
        body, rest = body + rest[:size], rest[size + 2:]
        if size == 0:
            return body
    return body


def exchange(port: int, method: str, path: str, body: bytes | None, headers: dict, timeout: float = 60):
    """One request on a fresh raw connection, robust to the server refusing before the body is all sent:
    (status, headers, body); raises Closed when the server closed without a response."""
    body = body or b""
    with connect(port, timeout) as sock:
        sock.sendall(request_head(method, path, {**headers, "Connection": "close"}, len(body)))
        send_pieces(sock, body)
        return read_response(sock, timeout)


def chunked_framing(data: bytes, piece: int = 64 * 1024) -> list[bytes]:
    """``data`` as HTTP/1.1 chunked transfer coding, one frame per list item (the last is the terminator)."""
    frames = [b"%x\r\n" % len(data[i:i + piece]) + data[i:i + piece] + b"\r\n" for i in range(0, len(data), piece)]
    return frames + [b"0\r\n\r\n"]


def put_chunked(port: int, name: str, data: bytes, piece: int = 64 * 1024, timeout: float = 60):
    """PUT with Transfer-Encoding: chunked (no Content-Length): (status, reply)."""
    with connect(port, timeout) as sock:
        sock.sendall(request_head("PUT", "/upload/" + name,
                                  {"Transfer-Encoding": "chunked", "Connection": "close"}, None))
        for frame in chunked_framing(data, piece):
            if answered(sock):
                break
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
        status, _, answer = read_response(sock, timeout)
        return status, decode(answer)


class StalledChunk:
    """A chunk request that sends its head and the first ``sent`` bytes of the chunk, then stops, the socket left
    open (no FIN, no RST).  ``resume()`` sends the rest and returns the response, or None if the connection was
    closed."""

    def __init__(self, port: int, upload_id: str, index: int, piece: bytes, total_size: int, chunk_size: int,
                 name: str, sent: int, declared: dict | None = None):
        self.upload_id = upload_id
        fields = chunk_fields(upload_id, index, total_size, chunk_size)
        fields.update(declared or {})
        body, content_type = encode_multipart(fields, [("file", name, piece)])
        data_at = body.index(piece) if piece else body.rindex(b"\r\n--")
        self.cut = data_at + sent
        self.body = body
        self.sock = connect(port)
        self.sock.sendall(request_head("POST", "/upload", {"Content-Type": content_type}, len(body)))
        self.sock.sendall(body[:self.cut])

    def resume(self, timeout: float = 20):
        try:
            self.sock.sendall(self.body[self.cut:])
        except (BrokenPipeError, ConnectionResetError):
            return None
        try:
            status, _, answer = read_response(self.sock, timeout)
        except Closed:
            return None
        return status, decode(answer)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# -- the page's resume protocol ---------------------------------------------------------------------------------

class Stop(Exception):
    pass


def resume_upload(port: int, upload_id: str, data: bytes, chunk_size: int, name: str, stop: threading.Event,
                  on_chunk=None):
    """What the page does after a reconnect: ask which chunks are missing and send those (404: all of them).

    Returns the completed reply (name, sha256) or raises OSError/Closed when the server goes away.
    ``on_chunk(last)`` is called before each chunk is sent, ``last`` true for the last one missing (to aim kills).
    """
    total = chunk_count(len(data), chunk_size)
    status, reply = status_of(port, upload_id)
    if status == 404:
        missing = list(range(total))
    elif status == 200 and reply.get("complete"):
        return reply
    elif status == 200:
        missing = list(reply["missing_chunks"])
    else:
        raise AssertionError(f"status of {upload_id}: {status} {reply}")
    for position, index in enumerate(missing):
        if stop.is_set():
            raise Stop()
        if on_chunk is not None:
            on_chunk(position == len(missing) - 1)
        status, reply = post_chunk(port, upload_id, index, data[index * chunk_size:(index + 1) * chunk_size],
                                   len(data), chunk_size, name, timeout=30)
        if status == 200 and reply.get("complete"):
            return reply
        if status != 200:
            raise AssertionError(f"chunk {index} of {name}: {status} {reply}")
    status, reply = status_of(port, upload_id)  # missing_chunks may have been cut short
    if status == 200 and reply.get("complete"):
        return reply
    return None


STORED_RE = re.compile(r'\d\d:\d\d:\d\d stored "(?P<name>.*)" ')
RECEIVING_RE = re.compile(r'\d\d:\d\d:\d\d receiving "(?P<name>.*)" (?P<percent>\d+)% of ')
