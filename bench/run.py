"""Benchmark pyfiledrop against nginx (PUT to disk) and copyparty, all on loopback, in one run.

    python bench/run.py                 # full run: median of 3, 1 GiB file, 500 x 64 KiB, 4 GiB RSS test
    python bench/run.py --quick         # smoke run: small sizes, one run, no 4 GiB test
    python bench/run.py --runs 5 --size 2G --no-big

Every server writes into one temporary folder (removed at the end); copyparty lives in its own virtual
environment under ~/.cache/pyfiledrop-bench (created on first use); nginx is installed with apt-get when
missing.  Every stored file's sha256 is checked: a run that stored wrong bytes is reported and the exit status
is non-zero.  The table is printed and written to bench/results/latest.md (plus latest.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import client  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pyfiledrop-bench"
MIB = 1024 * 1024
GIB = 1024 * MIB
sys.path.insert(0, str(REPO))
import pyfiledrop  # noqa: E402

DEFAULT_CHUNK = pyfiledrop.DEFAULT_CHUNK_SIZE
# besides the default and 1 MB: the power-of-two sizes around the default
OTHER_CHUNKS = [size for size in (4 * 1024 * 1024, 8 * 1024 * 1024) if size != DEFAULT_CHUNK]
PYFILEDROP = REPO / "pyfiledrop.py"


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": MIB, "G": GIB}
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode} while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not start listening on port {port}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(4 * MIB)
        view = memoryview(buffer)
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as handle:
        left = size
        while left:
            block = os.urandom(min(16 * MIB, left))
            handle.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


# -- process memory ---------------------------------------------------------------------------------------
def _status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except (FileNotFoundError, ValueError):
                pass
    return sorted(set(pids))


def peak_rss(pid: int) -> int:
    """Sum of VmHWM (peak resident set) over the process and its children."""
    return sum(_status(p, "VmHWM") for p in process_tree(pid))


class RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.peak = max(self.peak, sum(_status(p, "VmRSS") for p in process_tree(self.pid)))
            time.sleep(self.interval)

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.peak


# -- servers ------------------------------------------------------------------------------------------------
class Server:
    name = ""

    def __init__(self, root: Path):
        self.root = root / self.name
        self.store = self.root / "files"
        self.store.mkdir(parents=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        wait_for_port(self.port, self.proc, self.name)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stored_files(self) -> list[Path]:
        return [p for p in self.store.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(self.store).parts)]

    def clean(self) -> None:
        for path in self.stored_files():
            path.unlink()

    def put_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    put_prefix = "/"


class PyFileDrop(Server):
    name = "pyfiledrop"
    script = PYFILEDROP
    put_prefix = "/upload/"

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), "--host", "127.0.0.1", "-p", str(self.port),
                "-s", str(self.store), "-c", str(self.root / "chunks"), "--max-size", "100000", "-q"]

    def put_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/upload/{name}"

    def clean(self) -> None:
        super().clean()
        for path in (self.root / "chunks").glob("*"):
            path.unlink()


NGINX_CONF = """\
daemon off;
master_process on;
user root;
worker_processes auto;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {store};
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
            client_body_temp_path {root}/body;
        }}
    }}
}}
"""


class Nginx(Server):
    name = "nginx"

    def command(self) -> list[str]:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not os.path.exists(binary):
            subprocess.run(["apt-get", "install", "-y", "nginx"], check=True)
        conf = self.root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(root=self.root, port=self.port, store=self.store))
        return [binary, "-p", str(self.root), "-c", str(conf), "-e", str(self.root / "error.log")]


class Copyparty(Server):
    name = "copyparty"

    def command(self) -> list[str]:
        venv = CACHE / "copyparty-venv"
        binary = venv / "bin" / "copyparty"
        if not binary.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "copyparty"], check=True)
        return [str(binary), "-i", "127.0.0.1", "-p", str(self.port), "-v", f"{self.store}::rw", "-q"]

    def version(self) -> str:
        out = subprocess.run([self.command()[0], "--version"], capture_output=True, text=True).stdout
        return out.splitlines()[0] if out else "?"


# -- measurements ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.failures: list[str] = []
        self.samples: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def fail(self, message: str) -> None:
        print("FAILURE:", message, flush=True)
        self.failures.append(message)

    def check_stored(self, server: Server, expected: dict[str, str], what: str) -> None:
        """``expected``: sha256 -> count expected; every stored file must be one of them."""
        found: dict[str, int] = {}
        for path in server.stored_files():
            digest = sha256_file(path)
            found[digest] = found.get(digest, 0) + 1
        if found != expected:
            missing = sum(max(0, n - found.get(d, 0)) for d, n in expected.items())
            wrong = sum(n for d, n in found.items() if d not in expected)
            self.fail(f"{what} on {server.name}: {missing} file(s) missing or wrong, {wrong} unexpected")
        server.clean()

    @staticmethod
    def settle() -> None:
        """Start each measurement with no dirty pages: otherwise the kernel's writeback of the previous one
        (the files are deleted, but writeback may have begun) runs during this one, and which test follows
        which decides the result more than the server does."""
        os.sync()

    def big_chunked(self, server: PyFileDrop, source: Path, digest: str, chunk: int, parallel: int, key: str):
        self.settle()
        try:
            result = client.upload_chunked("127.0.0.1", server.port, str(source), chunk_size=chunk,
                                           parallel=parallel, filename="big.bin")
        except client.UploadFailed as error:
            self.fail(f"{key}: {error}")
            return None
        if result.reply.get("sha256") != digest:
            self.fail(f"{key}: the server reported sha256 {result.reply.get('sha256')}")
        self.check_stored(server, {digest: 1}, key)
        self.add(key, result.mb_per_s)
        self.add(key + " finish_ms", result.finish_s * 1000)
        print(f"  {key}: {result.mb_per_s:.0f} MB/s, completing {result.finish_s * 1000:.1f} ms", flush=True)
        return result

    def big_curl(self, server: Server, source: Path, digest: str, key: str) -> None:
        self.settle()
        started = time.perf_counter()
        done = subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(source),
                               server.put_url("big.bin")], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode:
            self.fail(f"{key}: curl exited {done.returncode}: {done.stderr.strip()}")
            server.clean()
            return
        size = source.stat().st_size
        self.check_stored(server, {digest: 1}, key)
        self.add(key, size / seconds / 1e6)
        print(f"  {key}: {size / seconds / 1e6:.0f} MB/s", flush=True)

    def many(self, server: Server, paths: list[str], digests: dict[str, int], clients: int, key: str) -> None:
        mode = "chunk" if isinstance(server, PyFileDrop) else "put"
        self.settle()
        try:
            result = client.upload_many("127.0.0.1", server.port, paths, clients=clients, mode=mode,
                                        put_prefix=server.put_prefix)
        except client.UploadFailed as error:
            self.fail(f"{key}: {error}")
            server.clean()
            return
        self.check_stored(server, digests, key)
        self.add(key, result["files_per_s"])
        print(f"  {key}: {result['files_per_s']:.0f} files/s", flush=True)


def median(values):
    return statistics.median(values) if values else None


def fmt(value, unit=""):
    if value is None:
        return "-"
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:.1f}{unit}"


def ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def machine() -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", tempfile.gettempdir()],
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "disk": " ".join(disk.split()),
            "python": platform.python_version(), "kernel": platform.release(), "nginx": nginx}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--size", type=parse_size, default=GIB, help="size of the big file (default 1G)")
    parser.add_argument("--files", type=int, default=500, help="number of small files (default 500)")
    parser.add_argument("--file-size", type=parse_size, default=64 * 1024)
    parser.add_argument("--big-size", type=parse_size, default=4 * GIB,
                        help="size of the pyfiledrop peak-RSS upload (default 4G)")
    parser.add_argument("--no-big", action="store_true", help="skip the 4 GiB peak-RSS upload")
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 MiB, 50 files, 1 run, no 4 GiB")
    parser.add_argument("--only", choices=["big", "many"], help="run only one group of measurements")
    parser.add_argument("--pyfiledrop", type=Path, default=PYFILEDROP, help="the pyfiledrop.py to measure")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.files, args.runs, args.no_big = min(args.size, 64 * MIB), min(args.files, 50), 1, True

    PyFileDrop.script = args.pyfiledrop.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="pyfiledrop-bench-"))
    servers = [PyFileDrop(tmp), Nginx(tmp), Copyparty(tmp)]
    pfd, nginx, copyparty = servers
    bench = Bench(args, tmp)
    big_rss = big_finish = None
    info = machine()
    try:
        for server in servers:
            server.start()
        info["copyparty"] = copyparty.version()
        size_label = f"{args.size / GIB:g} GiB" if args.size >= GIB else f"{args.size / MIB:g} MiB"
        source = tmp / "big.bin"
        if args.only in (None, "big"):
            print(f"writing a {size_label} random file", flush=True)
            digest = write_random(source, args.size)
        if args.only in (None, "many"):
            small = tmp / "small"
            small.mkdir()
            paths, digests = [], {}
            for number in range(args.files):
                path = small / f"small-{number:04d}.bin"
                d = write_random(path, args.file_size)
                digests[d] = digests.get(d, 0) + 1
                paths.append(str(path))
        for run in range(args.runs):
            print(f"run {run + 1} of {args.runs}", flush=True)
            if args.only in (None, "big"):
                # alternate between servers within each run
                bench.big_chunked(pfd, source, digest, DEFAULT_CHUNK, 1, "big chunk default x1")
                bench.big_curl(nginx, source, digest, "big nginx curl")
                bench.big_chunked(pfd, source, digest, DEFAULT_CHUNK, 6, "big chunk default x6")
                bench.big_curl(copyparty, source, digest, "big copyparty curl")
                bench.big_chunked(pfd, source, digest, 1_000_000, 6, "big chunk 1MB x6")
                for other in OTHER_CHUNKS:
                    bench.big_chunked(pfd, source, digest, other, 6, f"big chunk {other // MIB}MiB x6")
                bench.big_curl(pfd, source, digest, "big pyfiledrop curl")
            if args.only in (None, "many"):
                for clients in (1, 8):
                    for server in servers:
                        bench.many(server, paths, digests, clients, f"many {server.name} x{clients}")
        if source.exists():
            source.unlink()
        rss = {server.name: peak_rss(server.proc.pid) for server in servers}
        if not args.no_big:
            pfd.stop()
            pfd.clean()
            pfd.start()
            print(f"writing a {args.big_size / GIB:g} GiB file for the peak-RSS upload", flush=True)
            huge = tmp / "huge.bin"
            huge_digest = write_random(huge, args.big_size)
            sampler = RssSampler(pfd.proc.pid)
            sampler.start()
            result = bench.big_chunked(pfd, huge, huge_digest, DEFAULT_CHUNK, 6, "huge chunk default x6")
            sampled = sampler.stop()
            big_rss = max(sampled, peak_rss(pfd.proc.pid))
            big_finish = result.finish_s * 1000 if result else None
            huge.unlink()
            print(f"  pyfiledrop peak RSS during {args.big_size / GIB:g} GiB: {big_rss / MIB:.1f} MiB", flush=True)
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    m = {key: median(values) for key, values in bench.samples.items()}
    ng, cp = m.get("big nginx curl"), m.get("big copyparty curl")
    lines = [
        f"pyfiledrop benchmark: {args.runs} run(s), median; big file {size_label}, {args.files} x "
        f"{args.file_size // 1024} KiB files; loopback",
        "",
        f"Machine: {info['nproc']} cores, {info['cpu']}, disk {info['disk']}, Python {info['python']}, "
        f"kernel {info['kernel']}, {info['nginx']}, {info.get('copyparty', '')}",
        "",
        "| Test | pyfiledrop | nginx | copyparty | pyfiledrop/nginx | pyfiledrop/copyparty |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    big_rows = [
        (f"{size_label}, {DEFAULT_CHUNK // MIB} MiB chunks (default), 1 in flight, MB/s", "big chunk default x1"),
        (f"{size_label}, {DEFAULT_CHUNK // MIB} MiB chunks (default), 6 in flight, MB/s", "big chunk default x6"),
        (f"{size_label}, 1 MB chunks, 6 in flight, MB/s", "big chunk 1MB x6"),
        *((f"{size_label}, {other // MIB} MiB chunks, 6 in flight, MB/s", f"big chunk {other // MIB}MiB x6")
          for other in OTHER_CHUNKS),
        (f"{size_label}, curl -T (all three), MB/s", "big pyfiledrop curl"),
    ]
    if "big nginx curl" in m:
        for label, key in big_rows:
            value = m.get(key)
            lines.append(f"| {label} | {fmt(value)} | {fmt(ng)} | {fmt(cp)} | {ratio(value, ng)} | "
                         f"{ratio(value, cp)} |")
    for clients in (1, 8):
        p, n, c = (m.get(f"many {s} x{clients}") for s in ("pyfiledrop", "nginx", "copyparty"))
        if p is not None:
            lines.append(f"| {args.files} x {args.file_size // 1024} KiB, {clients} client(s), files/s | {fmt(p)} | "
                         f"{fmt(n)} | {fmt(c)} | {ratio(p, n)} | {ratio(p, c)} |")
    lines.append(f"| peak RSS over the whole run, MiB | {fmt(rss['pyfiledrop'] / MIB)} | {fmt(rss['nginx'] / MIB)} | "
                 f"{fmt(rss['copyparty'] / MIB)} | | |")
    if big_rss:
        lines.append(f"| peak RSS during a {args.big_size / GIB:g} GiB upload (6 in flight), MiB | "
                     f"{fmt(big_rss / MIB)} | | | | |")
    for label, key in [("1 in flight", "big chunk default x1 finish_ms"),
                       ("6 in flight", "big chunk default x6 finish_ms")]:
        if key in m:
            lines.append(f"| completing a file ({size_label}, {label}): last chunk sent -> reply, ms | "
                         f"{fmt(m[key])} | | | | |")
    if big_finish is not None:
        lines.append(f"| completing a file ({args.big_size / GIB:g} GiB, 6 in flight), ms | {fmt(big_finish)} | | | | |")

    targets = []

    def target(text, ok):
        targets.append(f"- [{'x' if ok else ' '}] {text}" + ("" if ok is not None else " (not measured)"))

    d6, one_mb, f8 = m.get("big chunk default x6"), m.get("big chunk 1MB x6"), m.get("many pyfiledrop x8")
    target("default settings, 6 in flight >= 70% of nginx MB/s", (d6 / ng >= 0.7) if d6 and ng else None)
    target("default settings, 6 in flight >= 2.5x copyparty curl -T", (d6 / cp >= 2.5) if d6 and cp else None)
    target("1 MB chunks >= copyparty curl -T", (one_mb >= cp) if one_mb and cp else None)
    c8 = m.get("many copyparty x8")
    target("500 x 64 KiB, 8 clients: more files/s than copyparty", (f8 > c8) if f8 and c8 else None)
    target("peak RSS during 4 GiB < 64 MiB", (big_rss < 64 * MIB) if big_rss else None)
    finishes = [v for k, v in m.items() if k.endswith("finish_ms")] + ([big_finish] if big_finish else [])
    target("completing a file < 100 ms", (max(finishes) < 100) if finishes else None)
    lines += ["", "Targets:", *targets, ""]
    if bench.failures:
        lines += ["FAILURES:", *[f"- {f}" for f in bench.failures], ""]
    text = "\n".join(lines)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "samples": bench.samples, "medians": m, "rss": rss, "big_rss": big_rss,
         "big_finish_ms": big_finish, "failures": bench.failures}, indent=1))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
