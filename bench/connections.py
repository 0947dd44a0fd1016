"""Time to a new upload, and server RSS, with N idle + M trickling connections open.

    python bench/connections.py                               # 0:0,70:0,300:100,500:500, all three servers
    python bench/connections.py --cases 0:0,500:500 --servers pyfiledrop,nginx --timeout 30

For each server (pyfiledrop, copyparty, nginx as the reference) and each case N:M, a freshly started server
gets, from one background thread of this process, on 127.0.0.1 only:

- N idle connections: each sends one ``GET /`` (keep-alive), reads what comes back, then stays open, silent;
- M trickling connections: half send a request head one byte per second (a head that never ends within the
  case), half send a complete ``PUT`` head with ``Content-Length: 1 GiB`` and then the body one byte per second.

Connecting is bounded (``--setup`` seconds), and so is the wait for the idle connections' replies
(``--answer-wait``); after two more seconds of trickling, a new connection PUTs 1 MiB (timed from connect to
the whole reply; after ``--timeout`` seconds it is "no answer").  The server's VmRSS and thread count are read
with every connection open, just before that upload.  Everything is closed and the server stopped afterwards.
RLIMIT_NOFILE of this process (inherited by the servers) is raised to its hard limit first.
"""

from __future__ import annotations

import argparse
import errno
import http.client
import os
import selectors
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MIB = 1024 * 1024
PROBE_SIZE = MIB
DEFAULT_CASES = "0:0,70:0,300:100,500:500"


def parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        idle, _, trickle = item.strip().partition(":")
        cases.append((int(idle), int(trickle or 0)))
    return cases


class Crowd(threading.Thread):
    """N idle + M trickling connections, driven by one selector loop in a background thread."""

    def __init__(self, port: int, idle: int, trickle: int, put_prefix: str, max_seconds: float):
        super().__init__(daemon=True)
        self.port, self.put_prefix, self.max_seconds = port, put_prefix, max_seconds
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.conns: list[dict] = []
        for number in range(idle):
            self.conns.append({"kind": "idle", "first": (
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n"), "drip": b""})
        for number in range(trickle):
            path = f"{put_prefix}trickle-{number}.bin".encode()
            if number % 2 == 0:   # the head, one byte a second
                head = (b"PUT " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1073741824\r\n"
                        + b"X-Padding: " + b"x" * 200 + b"\r\n\r\n")
                self.conns.append({"kind": "head", "first": b"", "drip": head})
            else:                 # a whole head, then the body one byte a second
                head = (b"PUT " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1073741824\r\n"
                        b"Content-Type: application/octet-stream\r\n\r\n")
                self.conns.append({"kind": "body", "first": head, "drip": b"\0" * 100000})
        self.connected = self.answered = self.closed_by_server = 0

    def counts(self) -> dict:
        with self.lock:
            return {"connected": self.connected, "idle answered": self.answered,
                    "closed by server": self.closed_by_server}

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        deadline = time.monotonic() + self.max_seconds
        try:
            for conn in self.conns:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.update(sock=sock, state="connecting", sent=0, got=0)
                code = sock.connect_ex(("127.0.0.1", self.port))
                if code not in (0, errno.EINPROGRESS):
                    conn["state"] = "failed"
                    sock.close()
                    continue
                selector.register(sock, selectors.EVENT_WRITE, conn)
            next_drip = time.monotonic() + 1
            while not self.stop_event.is_set() and time.monotonic() < deadline:
                for key, events in selector.select(timeout=0.2):
                    conn = key.data
                    sock = conn["sock"]
                    if conn["state"] == "connecting":
                        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                            conn["state"] = "failed"
                            selector.unregister(sock)
                            sock.close()
                            continue
                        conn["state"] = "open"
                        with self.lock:
                            self.connected += 1
                        if conn["first"]:
                            try:
                                sock.send(conn["first"])  # small: goes out whole
                            except OSError:
                                pass
                        selector.modify(sock, selectors.EVENT_READ, conn)
                    elif events & selectors.EVENT_READ:
                        try:
                            data = sock.recv(65536)
                        except BlockingIOError:
                            continue
                        except OSError:
                            data = b""
                        if not data:
                            conn["state"] = "closed"
                            selector.unregister(sock)
                            sock.close()
                            with self.lock:
                                self.closed_by_server += 1
                            continue
                        if conn["kind"] == "idle" and conn["got"] == 0:
                            with self.lock:
                                self.answered += 1
                        conn["got"] += len(data)
                now = time.monotonic()
                if now >= next_drip:
                    next_drip = now + 1
                    for conn in self.conns:
                        if conn["state"] == "open" and conn["drip"] and conn["sent"] < len(conn["drip"]):
                            try:
                                conn["sent"] += conn["sock"].send(conn["drip"][conn["sent"]: conn["sent"] + 1])
                            except (BlockingIOError, OSError):
                                pass
        finally:
            for conn in self.conns:
                sock = conn.get("sock")
                if sock is not None and conn.get("state") not in ("failed", "closed"):
                    try:
                        selector.unregister(sock)
                    except (KeyError, ValueError):
                        pass
                    sock.close()
            selector.close()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def probe(port: int, url_path: str, source: str, timeout: float) -> tuple[float | None, str]:
    """PUT ``source`` from a new connection; (seconds from connect to the whole reply, or None; status text)."""
    import client
    result: dict = {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def attempt() -> None:
        started = time.perf_counter()
        try:
            conn.connect()
            status, body, _ = client.put_file(conn, "127.0.0.1", url_path, source, bytearray(MIB))
            result["seconds"] = time.perf_counter() - started
            result["status"] = f"HTTP {status}"
        except Exception as error:  # noqa: BLE001 - reported
            result["status"] = f"{type(error).__name__}: {error}"

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        try:
            if conn.sock is not None:
                conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.close()
        thread.join(5)
        return None, f"no answer in {timeout:g} s"
    conn.close()
    if "seconds" not in result:
        return None, result.get("status", "?")
    if not result["status"].startswith("HTTP 20"):
        return result["seconds"], result["status"]
    return result["seconds"], result["status"]


def run_case(server, idle: int, trickle: int, source: str, timeout: float, setup: float = 10.0,
             answer_wait: float = 5.0) -> dict:
    import run as bench_run
    server.start()
    pid = server.proc.pid
    base_rss = bench_run.current_rss(pid)
    crowd = Crowd(server.port, idle, trickle, server.put_prefix,
                  max_seconds=setup + answer_wait + 2 + timeout + 30)
    row = {"server": server.name, "idle": idle, "trickle": trickle, "rss before MiB": base_rss / MIB}
    try:
        started = time.monotonic()
        crowd.start()
        while time.monotonic() - started < setup and crowd.counts()["connected"] < idle + trickle:
            time.sleep(0.1)
        row["setup s"] = time.monotonic() - started
        wait_started = time.monotonic()
        while time.monotonic() - wait_started < answer_wait and crowd.counts()["idle answered"] < idle:
            time.sleep(0.1)
        time.sleep(2)   # let the trickling connections trickle
        row.update(crowd.counts())
        row["rss MiB"] = bench_run.current_rss(pid) / MIB
        row["threads"] = bench_run.thread_count(pid)
        row["processes"] = len(bench_run.process_tree(pid))
        seconds, status = probe(server.port, server.put_prefix + "probe.bin", source, timeout)
        row["new upload s"], row["new upload"] = seconds, status
        row["rss after MiB"] = bench_run.current_rss(pid) / MIB
        after = crowd.counts()
        row["closed by server"] = after["closed by server"]
    finally:
        crowd.stop()
        server.stop()
    text = (f"  connections {server.name} {idle} idle + {trickle} trickling: connected {row.get('connected')}, "
            f"idle answered {row.get('idle answered')}, new 1 MiB PUT "
            + (f"{row['new upload s'] * 1000:.0f} ms ({row['new upload']})" if row.get("new upload s") is not None
               else row.get("new upload", "?"))
            + f", RSS {row.get('rss MiB', 0):.1f} MiB, {row.get('threads')} threads")
    print(text, flush=True)
    return row


def run_cases(factories, cases, root: Path, timeout: float) -> list[dict]:
    """``factories``: callables root -> an unstarted bench/run.py Server.  One fresh server per case."""
    import run as bench_run
    bench_run.raise_nofile()
    root.mkdir(parents=True, exist_ok=True)
    source = root / "probe.bin"
    source.write_bytes(os.urandom(PROBE_SIZE))
    rows = []
    for factory in factories:
        for idle, trickle in cases:
            case_root = root / f"{idle}-{trickle}-{len(rows)}"
            case_root.mkdir()
            server = factory(case_root)
            os.sync()
            rows.append(run_case(server, idle, trickle, str(source), timeout))
    return rows


def table(rows: list[dict], timeout: float) -> list[str]:
    def ms(row):
        if row.get("new upload s") is None:
            return row.get("new upload", "-")
        text = f"{row['new upload s'] * 1000:,.0f}"
        return text if row["new upload"].startswith("HTTP 20") else f"{text} ({row['new upload']})"

    lines = [
        f"### New upload with N idle + M trickling connections open (1 MiB PUT, timeout {timeout:g} s)",
        "",
        "| Server | N idle | M trickling | connected | idle answered | new 1 MiB PUT, ms | RSS MiB (idle server) "
        "| threads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['server']} | {row['idle']} | {row['trickle']} | {row.get('connected', '-')} | "
                     f"{row.get('idle answered', '-')} | {ms(row)} | {row.get('rss MiB', 0):.1f} "
                     f"({row.get('rss before MiB', 0):.1f}) | {row.get('threads', '-')} |")
    return lines


def main() -> int:
    import run as bench_run
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="N:M,... (idle:trickling)")
    parser.add_argument("--servers", default="pyfiledrop,copyparty,nginx")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the new upload")
    parser.add_argument("--pyfiledrop", type=Path, default=bench_run.PYFILEDROP)
    parser.add_argument("--out", type=Path, default=bench_run.HERE / "results" / "connections.md")
    args = parser.parse_args()
    bench_run.PyFileDrop.script = args.pyfiledrop.resolve()
    classes = {"pyfiledrop": bench_run.PyFileDrop, "copyparty": bench_run.Copyparty, "nginx": bench_run.Nginx}
    factories = [classes[name.strip()] for name in args.servers.split(",")]
    import shutil
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="pyfiledrop-conn-"))
    try:
        rows = run_cases(factories, parse_cases(args.cases), tmp, args.timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(table(rows, args.timeout)) + "\n"
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
