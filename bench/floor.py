"""The floor: the least CPU a Python server that stores and hashes an upload can spend.

    python bench/floor.py --port 16280 --dir /tmp/floor-files

A minimal HTTP/1.1 PUT server on plain sockets: one thread per connection, keep-alive.  Its body loop is
exactly ``recv_into`` a reused 1 MiB buffer, ``os.pwrite`` at the running offset, and
``hashlib.sha256().update`` of the same view; nothing else happens per byte.  ``PUT /NAME`` writes
``DIR/NAME`` (the last path segment, percent-decoded) and replies 200 with the hex sha256 of the body;
``Expect: 100-continue`` is answered (curl -T sends it); any other request gets 200 with an empty body after
its body (if any) is discarded.  It is a measuring stick, not a server: no limits, no timeouts, no safety.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import threading
from urllib.parse import unquote

BUFFER = 1024 * 1024
HEAD_LIMIT = 64 * 1024


def _reply(sock: socket.socket, status: str, body: bytes, close: bool) -> None:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode()
    sock.sendall(head + body)


def serve_connection(sock: socket.socket, folder: str) -> None:
    buffer = bytearray(BUFFER)
    view = memoryview(buffer)
    pending = b""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            # -- request head (not the measured part) --
            while b"\r\n\r\n" not in pending:
                data = sock.recv(HEAD_LIMIT)
                if not data:
                    return
                pending += data
                if len(pending) > HEAD_LIMIT:
                    return
            head, pending = pending.split(b"\r\n\r\n", 1)
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = (lines[0].split(" ") + ["", "", ""])[:3]
            headers = {}
            for line in lines[1:]:
                key, _, value = line.partition(":")
                headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0") or 0)
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            if headers.get("expect", "").lower() == "100-continue":
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            if method != "PUT":
                # discard the body, if any
                left = length - len(pending)
                pending = pending[length:] if left <= 0 else b""
                while left > 0:
                    count = sock.recv_into(view[: min(BUFFER, left)])
                    if not count:
                        return
                    left -= count
                _reply(sock, "200 OK", b"", close)
                if close:
                    return
                continue
            name = os.path.basename(unquote(target.split("?", 1)[0])) or "unnamed"
            fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            digest = hashlib.sha256()
            offset = 0
            try:
                # bytes that arrived with the head
                first, pending = pending[:length], pending[length:]
                if first:
                    os.pwrite(fd, first, 0)
                    digest.update(first)
                    offset = len(first)
                # -- the body loop: the floor --
                while offset < length:
                    count = sock.recv_into(view[: min(BUFFER, length - offset)])
                    if not count:
                        return
                    part = view[:count]
                    os.pwrite(fd, part, offset)
                    digest.update(part)
                    offset += count
            finally:
                os.close(fd)
            _reply(sock, "200 OK", digest.hexdigest().encode(), close)
            if close:
                return
    except OSError:
        return
    finally:
        sock.close()


def serve(host: str, port: int, folder: str) -> None:
    listener = socket.create_server((host, port), backlog=1024, reuse_port=False)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve_connection, args=(sock, folder), daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", required=True, help="folder the files are written into")
    args = parser.parse_args()
    try:
        serve(args.host, args.port, args.dir)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
