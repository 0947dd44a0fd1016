"""The files page's API with a big ledger, and what a password costs per request.

    python bench/files_list.py [--rows 100000] [--repeat 20]

Fills a fresh ledger with ROWS stored records (one transaction), starts ``pyfiledrop.py --admin-password
--password`` on loopback as a subprocess, and prints the median and worst time of GET /api/uploads for: the
first page, a page deep in (after 50 pages of cursors), a name filter that matches one record, a state that
matches none (the worst case: the whole index is walked), sorted by name and by size; then the time of a small
PUT with no password, with Basic (the password known by its HMAC after the first check) and a page load with
the login cookie.  Nothing is asserted.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pyfiledrop  # noqa: E402

ADMIN, UPLOAD = "bench admin", "bench upload"


def fill(chunks: Path, rows: int) -> None:
    chunks.mkdir(parents=True)
    ledger = pyfiledrop.Ledger(chunks / pyfiledrop.Ledger.FILENAME)
    base = time.time() - rows
    ledger.save(*(pyfiledrop.UploadInfo(id=str(uuid.uuid4()), name=f"folder{n % 100}/IMG_{n:07d}.jpg", size=n * 37,
                                        part_size=max(1, n * 37), client="192.168.1.40", created=base + n,
                                        updated=base + n, state=pyfiledrop.State.STORED, received=((0, n * 37),),
                                        sha256="ab" * 32, stored_name=f"folder{n % 100}/IMG_{n:07d}.jpg",
                                        finished=base + n) for n in range(1, rows + 1)))
    ledger.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed(connection: http.client.HTTPConnection, method: str, path: str, body=None, headers=None):
    started = time.perf_counter()
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    data = response.read()
    elapsed = time.perf_counter() - started
    if response.status >= 300:
        raise SystemExit(f"{method} {path}: {response.status} {data[:200]!r}")
    return elapsed, data


def measure(label: str, connection, repeat: int, method: str, path, body=None, headers=None) -> None:
    times = [timed(connection, method, path() if callable(path) else path, body, headers)[0] for _ in range(repeat)]
    print(f"  {label:<44} median {statistics.median(times) * 1000:7.1f} ms   worst {max(times) * 1000:7.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        storage, chunks = Path(folder) / "storage", Path(folder) / "chunks"
        started = time.perf_counter()
        fill(chunks, args.rows)
        print(f"{args.rows} records written in {time.perf_counter() - started:.1f} s")
        port = free_port()
        env = {**os.environ, pyfiledrop.ADMIN_PASSWORD_ENV: ADMIN, pyfiledrop.PASSWORD_ENV: UPLOAD}
        server = subprocess.Popen([sys.executable, str(ROOT / "pyfiledrop.py"), "--host", "127.0.0.1", "-p", str(port),
                                   "-s", str(storage), "-c", str(chunks), "--min-free", "0", "-q"], env=env)
        try:
            run(port, args.repeat)
        finally:
            server.terminate()
            server.wait(30)


def wait_listening(port: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)


def run(port: int, repeat: int) -> None:
    wait_listening(port)
    admin = {"Authorization": "Basic " + base64.b64encode(f":{ADMIN}".encode()).decode()}
    upload = {"Authorization": "Basic " + base64.b64encode(f":{UPLOAD}".encode()).decode()}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    cursor = None
    for _ in range(50):
        _, data = timed(connection, "GET", "/api/uploads" + (f"?cursor={cursor}" if cursor else ""), None, admin)
        cursor = json.loads(data)["next"]
    print("GET /api/uploads (100 records a page, admin Basic):")
    measure("first page, newest first", connection, repeat, "GET", "/api/uploads", None, admin)
    measure("page 51 (by cursor)", connection, repeat, "GET", f"/api/uploads?cursor={cursor}", None, admin)
    measure("?q= matching one record", connection, repeat, "GET", "/api/uploads?q=IMG_0042424", None, admin)
    measure("?state=receiving (none: the whole index)", connection, repeat, "GET", "/api/uploads?state=receiving",
            None, admin)
    measure("?folder=folder7 (1 in 100)", connection, repeat, "GET", "/api/uploads?folder=folder7", None, admin)
    measure("?sort=name", connection, repeat, "GET", "/api/uploads?sort=name", None, admin)
    measure("?sort=size", connection, repeat, "GET", "/api/uploads?sort=size", None, admin)
    measure("/files (the page itself)", connection, repeat, "GET", "/files", None, admin)
    print("PUT /upload/NAME, 1 KiB, keep-alive:")
    names = iter(range(10**9))
    measure("Basic with the upload password", connection, repeat * 5, "PUT",
            lambda: f"/upload/bench/{next(names)}.bin", b"x" * 1024, upload)
    connection.close()


if __name__ == "__main__":
    main()
