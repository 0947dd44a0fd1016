"""Shared fixtures: real pyfiledrop servers on ephemeral ports, in-process or as a subprocess."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyfiledrop  # noqa: E402


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_files(chunks: Path) -> list[str]:
    """What the chunks folder holds besides the ledger: the partial files of uploads still receiving."""
    return sorted(name for name in os.listdir(chunks) if not name.startswith(pyfiledrop.Ledger.FILENAME))


def free_port() -> int:
    """A port that was free a moment ago, for the few tests that must start the program as a subprocess."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request to 127.0.0.1:``port`` on a fresh connection: (status, headers, body bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def raw_get(port: int, target: str) -> tuple[int, dict, bytes]:
    """GET with the request target exactly as given (no client normalises it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode("latin-1"))
        data = b""
        while block := sock.recv(65536):
            data += block
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), headers, body


class Output:
    """Collects a process's output lines in a thread, as they come; waits poll for a condition on them."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def since(self, mark: int) -> list[str]:
        return list(self.lines[mark:])

    def wait_for(self, predicate, timeout: float = 30.0) -> None:
        """Until ``predicate(all the output so far)`` holds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; output so far:\n{self.text}")
            threading.Event().wait(0.05)

    def wait_for_line(self, predicate, timeout: float = 20.0, start: int = 0) -> str:
        """The first line from ``start`` on for which ``predicate(line)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            found = next((line for line in self.lines[start:] if predicate(line)), None)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no matching console line within {timeout} s; output:\n{self.text}")
            threading.Event().wait(0.05)

    def close(self) -> str:
        """Wait for the process to end and for its last line to be read."""
        self.process.wait(30)
        self._thread.join(10)
        return self.text


@dataclasses.dataclass
class Server:
    config: pyfiledrop.Config
    port: int
    app: object
    engine: pyfiledrop.Engine
    events: list

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage(self) -> Path:
        return self.config.storage

    @property
    def chunks(self) -> Path:
        return self.config.chunks

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """One request on a fresh connection: (status, headers, body bytes)."""
        return http_request(self.port, method, path, body, headers)

    def post_form(self, fields: dict, files: list[tuple[str, str, bytes]] = (), *, files_first: bool = False):
        body, content_type = encode_multipart(fields, files, files_first=files_first)
        return self.request("POST", "/upload", body, {"Content-Type": content_type})

    def post_chunk(self, upload_id: str, index: int, data: bytes, total_size: int, chunk_size: int,
                   filename: str = "file.bin", **overrides):
        fields = chunk_fields(upload_id, index, total_size, chunk_size)
        fields.update({k: str(v) for k, v in overrides.items()})
        return self.post_form(fields, [("file", filename, data)])

    def upload_chunked(self, data: bytes, chunk_size: int, filename: str = "file.bin", upload_id: str | None = None,
                       order=None) -> dict:
        upload_id = upload_id or str(uuid.uuid4())
        count = pyfiledrop.chunk_count(len(data), chunk_size)
        reply = None
        for index in order if order is not None else range(count):
            status, _, body = self.post_chunk(upload_id, index, data[index * chunk_size:(index + 1) * chunk_size],
                                              len(data), chunk_size, filename)
            assert status == 200, body
            reply = json.loads(body)
        return reply


def chunk_fields(upload_id: str, index: int, total_size: int, chunk_size: int) -> dict:
    return {
        "dzuuid": upload_id,
        "dzchunkindex": str(index),
        "dztotalfilesize": str(total_size),
        "dzchunksize": str(chunk_size),
        "dztotalchunkcount": str(pyfiledrop.chunk_count(total_size, chunk_size)),
        "dzchunkbyteoffset": str(index * chunk_size),
    }


def encode_multipart(fields: dict, files, *, files_first: bool = False) -> tuple[bytes, str]:
    boundary = "----pyfiledroptest" + uuid.uuid4().hex
    field_parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + str(value).encode() + b"\r\n"
        for name, value in fields.items()
    ]
    file_parts = [
        (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
         f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
        for name, filename, data in files
    ]
    parts = file_parts + field_parts if files_first else field_parts + file_parts
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@contextlib.contextmanager
def running_server(tmp_path: Path, *, limits: pyfiledrop.ServerLimits | None = None, clock=None, **options):
    """pyfiledrop in this process on port 0, with its own storage and chunks folders (and ``limits``; ``clock``
    for the engine and the login checks)."""
    storage, chunks = tmp_path / "storage", tmp_path / "chunks"
    storage.mkdir(exist_ok=True)
    chunks.mkdir(exist_ok=True)
    options.setdefault("min_free", 0)
    config = pyfiledrop.Config(host="127.0.0.1", port=0, storage=storage, chunks=chunks, quiet=True, **options)
    events: list = []
    engine = pyfiledrop.open_engine(config, events=events.append, **({"clock": clock} if clock else {}))
    app = pyfiledrop.create_app(config, engine)
    server = pyfiledrop.make_server(app, "127.0.0.1", 0, limits=limits or pyfiledrop.ServerLimits())
    stop = threading.Event()
    thread = threading.Thread(target=pyfiledrop.serve, args=(config, engine, server),
                              kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        yield Server(config, server.server_address[1], app, engine, events)
    finally:
        stop.set()
        thread.join(10)
        engine.ledger.close()


@pytest.fixture
def server(tmp_path):
    with running_server(tmp_path) as running:
        yield running


@pytest.fixture
def make_server(tmp_path):
    """Start servers with options: ``make_server(allow_downloads=True)``; each gets its own folders."""
    stack = contextlib.ExitStack()
    counter = iter(range(1000))

    def start(**options):
        folder = tmp_path / f"server{next(counter)}"
        folder.mkdir()
        return stack.enter_context(running_server(folder, **options))

    with stack:
        yield start


@contextlib.contextmanager
def cli_server(args: list[str], *, env: dict | None = None, cwd: Path | None = None, port: int | None = None):
    """``python pyfiledrop.py ARGS`` as a subprocess; waits until it answers HTTP (polling, not sleeping).

    ``port``: the one an earlier server had (a restart), else a free one."""
    port = port or free_port()
    command = [sys.executable, str(ROOT / "pyfiledrop.py"), "--host", "127.0.0.1", "-p", str(port), *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise AssertionError(f"server exited early: {process.stdout.read()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError("server did not start listening")
            threading.Event().wait(0.05)
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
