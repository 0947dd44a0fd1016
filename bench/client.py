"""A standard-library upload client for benchmarks: Dropzone's chunk protocol, plain PUT, many small files.

Like a browser, each of the ``parallel`` slots keeps one keep-alive ``http.client`` connection and sends one
chunk at a time; chunks are taken in order, and each is streamed from the file (never the whole file in
memory).  Every call returns timings; the ``finish_s`` figure is the time from the file's last byte being
sent (by whichever request carried it) to the first reply that says the file is complete: the cost of
completing a file.

    python bench/client.py FILE --port 16273 [--chunk-size N] [--parallel 6]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import math
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

SEND_BLOCK = 1024 * 1024
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024  # pyfiledrop's default


class UploadFailed(Exception):
    pass


@dataclass
class UploadResult:
    size: int
    seconds: float
    reply: dict
    finish_s: float = 0.0          # the file's last byte sent -> the first reply saying it is complete
    chunk_seconds: list = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.size / self.seconds / 1e6


def _connect(host: str, port: int, timeout: float = 600) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.connect()
    return conn


def _field(boundary: bytes, name: str, value) -> bytes:
    return (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name.encode()
            + b"\"\r\n\r\n" + str(value).encode() + b"\r\n")


def _quote_filename(name: str) -> bytes:
    """As browsers write a filename in multipart headers: UTF-8, with '"', CR and LF percent-encoded."""
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A").encode("utf-8")


def chunk_request_parts(boundary: bytes, upload_id: str, filename: str, index: int, total_size: int,
                        chunk_size: int, extra: dict | None = None) -> tuple[bytes, int, bytes]:
    """(head, chunk length, tail) of one chunk request's multipart body, fields before the file part
    (``extra`` fields after Dropzone's own, as the page sends its part hash, time and file hash)."""
    total = max(1, math.ceil(total_size / chunk_size))
    offset = index * chunk_size
    length = max(0, min(chunk_size, total_size - offset))
    head = b"".join([
        _field(boundary, "dzuuid", upload_id),
        _field(boundary, "dzchunkindex", index),
        _field(boundary, "dztotalfilesize", total_size),
        _field(boundary, "dzchunksize", chunk_size),
        _field(boundary, "dztotalchunkcount", total),
        _field(boundary, "dzchunkbyteoffset", offset),
        *(_field(boundary, name, value) for name, value in (extra or {}).items()),
        b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\""
        + _quote_filename(filename) + b"\"\r\nContent-Type: application/octet-stream\r\n\r\n",
    ])
    tail = b"\r\n--" + boundary + b"--\r\n"
    return head, length, tail


def _send_range(conn: http.client.HTTPConnection, fd: int, offset: int, length: int,
                buffer: bytearray) -> None:
    view = memoryview(buffer)
    sock = conn.sock
    end = offset + length
    while offset < end:
        count = os.preadv(fd, [view[: min(len(buffer), end - offset)]], offset) if hasattr(os, "preadv") \
            else _pread_into(fd, view, min(len(buffer), end - offset), offset)
        if count <= 0:
            raise UploadFailed("the file got shorter while it was being sent")
        sock.sendall(view[:count])
        offset += count


def _pread_into(fd: int, view: memoryview, count: int, offset: int) -> int:
    data = os.pread(fd, count, offset)
    view[: len(data)] = data
    return len(data)


def _post_chunk(conn, host: str, fd: int, upload_id: str, filename: str, index: int, total_size: int,
                chunk_size: int, buffer: bytearray, extra: dict | None = None) -> tuple[dict, float, float, float]:
    """Send one chunk; (reply, seconds for the whole request, when its last byte was sent, when the reply came:
    ``time.perf_counter()``)."""
    boundary = uuid.uuid4().hex.encode()
    head, length, tail = chunk_request_parts(boundary, upload_id, filename, index, total_size, chunk_size, extra)
    started = time.perf_counter()
    conn.putrequest("POST", "/upload", skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", host)
    conn.putheader("Content-Type", "multipart/form-data; boundary=" + boundary.decode())
    conn.putheader("Content-Length", str(len(head) + length + len(tail)))
    conn.endheaders(head)
    _send_range(conn, fd, index * chunk_size, length, buffer)
    conn.sock.sendall(tail)
    sent = time.perf_counter()
    response = conn.getresponse()
    body = response.read()
    done = time.perf_counter()
    if response.status != 200:
        raise UploadFailed(f"chunk {index}: HTTP {response.status}: {body[:300]!r}")
    return json.loads(body), done - started, sent, done


@dataclass(frozen=True)
class PageHashes:
    """What pyfiledrop's page sends besides Dropzone's fields: each part's sha256 (``dzchunksha256``), and the
    whole file's (``dzfilesha256``) once its hashing worker has read the file, "later" before.  Computed before
    an upload is timed (the page hashes in the browser, not on the server)."""
    parts: tuple[str, ...]
    whole: str
    whole_from: int = 0    # the first part sent with the file's hash (the page's hashing is that far ahead)

    @classmethod
    def of(cls, path: str, chunk_size: int) -> "PageHashes":
        parts, whole = [], hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk_size):
                parts.append(hashlib.sha256(block).hexdigest())
                whole.update(block)
        return cls(tuple(parts) or (hashlib.sha256(b"").hexdigest(),), whole.hexdigest())

    def only_with_the_last(self) -> "PageHashes":
        """As the page sends them when its hashing does not get ahead of the link: the file's hash comes with
        the last part (the worker knows it once that part is hashed)."""
        return PageHashes(self.parts, self.whole, len(self.parts) - 1)

    def fields(self, index: int, mtime_ms: int) -> dict:
        return {"dzchunksha256": self.parts[index], "dzmtime": mtime_ms,
                "dzfilesha256": self.whole if index >= self.whole_from else "later"}


def upload_chunked(host: str, port: int, path: str, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                   parallel: int = 1, filename: str | None = None, upload_id: str | None = None,
                   connections: list | None = None, page: PageHashes | None = None) -> UploadResult:
    """Upload ``path`` with Dropzone's chunk protocol, ``parallel`` chunks in flight (one connection each);
    ``page``: with the fields pyfiledrop's page adds."""
    filename = filename or os.path.basename(path)
    upload_id = upload_id or str(uuid.uuid4())
    size = os.path.getsize(path)
    total = max(1, math.ceil(size / chunk_size))
    next_index = [0]
    lock = threading.Lock()
    # Completion: from the file's last byte sent (whichever request carried it) to the first reply saying the
    # file is complete.  Replies of other requests may be held back until then too; timing one of those from
    # its own last byte would count the time the other requests' bytes took to arrive.
    results: dict = {"complete": None, "last_sent": 0.0, "completed_at": None, "chunks": [], "error": None}
    fd = os.open(path, os.O_RDONLY)
    mtime_ms = int(os.stat(fd).st_mtime * 1000)
    slots = min(parallel, total)
    own = connections is None
    conns = connections if connections is not None else [None] * slots

    def worker(slot: int) -> None:
        buffer = bytearray(min(SEND_BLOCK, max(chunk_size, 1)))
        try:
            if conns[slot] is None:
                conns[slot] = _connect(host, port)
            while True:
                with lock:
                    if results["error"] is not None or next_index[0] >= total:
                        return
                    index = next_index[0]
                    next_index[0] += 1
                extra = page.fields(index, mtime_ms) if page is not None else None
                reply, seconds, sent, done = _post_chunk(conns[slot], host, fd, upload_id, filename, index, size,
                                                         chunk_size, buffer, extra)
                with lock:
                    results["chunks"].append(seconds)
                    results["last_sent"] = max(results["last_sent"], sent)
                    if reply.get("complete"):
                        results["complete"] = reply
                        if results["completed_at"] is None or done < results["completed_at"]:
                            results["completed_at"] = done
        except BaseException as error:  # noqa: BLE001 - reported to the caller
            with lock:
                results["error"] = error

    started = time.perf_counter()
    try:
        if slots == 1:
            worker(0)
        else:
            threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(slots)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        os.close(fd)
        if own:
            for conn in conns:
                if conn is not None:
                    conn.close()
    seconds = time.perf_counter() - started
    if results["error"] is not None:
        raise UploadFailed(f"{filename}: {results['error']}") from results["error"]
    if results["complete"] is None:
        raise UploadFailed(f"{filename}: no reply said the upload was complete")
    finish = max(0.0, results["completed_at"] - results["last_sent"])
    return UploadResult(size, seconds, results["complete"], finish, results["chunks"])


def put_file(conn: http.client.HTTPConnection, host: str, url_path: str, path: str,
             buffer: bytearray) -> tuple[int, bytes, float]:
    """PUT ``path`` to ``url_path`` on a keep-alive connection; (status, body, last byte -> response)."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        conn.putrequest("PUT", url_path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        _send_range(conn, fd, 0, size, buffer)
    finally:
        os.close(fd)
    sent = time.perf_counter()
    response = conn.getresponse()
    body = response.read()
    return response.status, body, time.perf_counter() - sent


def upload_many(host: str, port: int, paths: list[str], *, clients: int, mode: str,
                put_prefix: str = "/upload/") -> dict:
    """Upload every file of ``paths`` with ``clients`` keep-alive connections at once.

    ``mode`` "chunk": pyfiledrop's chunk protocol, one chunk per file; "put": PUT ``put_prefix``NAME.
    Returns {"seconds", "files_per_s", "replies"}.
    """
    queue = list(reversed(paths))
    lock = threading.Lock()
    replies: list = []
    errors: list = []

    def worker() -> None:
        buffer = bytearray(SEND_BLOCK)
        conn = None
        try:
            conn = _connect(host, port)
            while True:
                with lock:
                    if errors or not queue:
                        return
                    path = queue.pop()
                name = os.path.basename(path)
                if mode == "chunk":
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        size = os.fstat(fd).st_size
                        reply, *_ = _post_chunk(conn, host, fd, str(uuid.uuid4()), name, 0, size,
                                                  max(size, 1), buffer)
                    finally:
                        os.close(fd)
                    if not reply.get("complete"):
                        raise UploadFailed(f"{name}: not complete after its only chunk: {reply}")
                else:
                    status, body, _ = put_file(conn, host, put_prefix + quote(name), path, buffer)
                    if status not in (200, 201, 204):
                        raise UploadFailed(f"{name}: HTTP {status}: {body[:300]!r}")
                    reply = {"name": name}
                with lock:
                    replies.append(reply)
        except BaseException as error:  # noqa: BLE001
            with lock:
                errors.append(error)
        finally:
            if conn is not None:
                conn.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise UploadFailed(str(errors[0])) from errors[0]
    return {"seconds": seconds, "files_per_s": len(paths) / seconds, "replies": replies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=16273)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--parallel", type=int, default=1, help="chunks in flight (one connection each)")
    args = parser.parse_args()
    result = upload_chunked(args.host, args.port, args.file, chunk_size=args.chunk_size, parallel=args.parallel)
    print(json.dumps({"MB/s": round(result.mb_per_s, 1), "seconds": round(result.seconds, 3),
                      "finish_ms": round(result.finish_s * 1000, 1), "reply": result.reply}))


if __name__ == "__main__":
    main()
