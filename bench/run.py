"""Benchmark pyfiledrop against nginx (PUT to disk) and copyparty, all on loopback, in one run.

    python bench/run.py                 # full run: 5 runs, 1 GiB, 500 x 64 KiB, 4 GiB RSS test, connections
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
import itertools
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


def new_small_files(folder: Path, count: int, size: int) -> tuple[list[str], dict[str, int]]:
    """(paths, {sha256: how many}) of ``count`` files of new random bytes, written over the last ones.

    New bytes for every measurement: pyfiledrop keeps the same bytes once (a file whose sha256 a stored upload
    has is checked against that file and linked to it), so a batch it has seen before would measure that
    lookup (a ledger query and a `stat` of every earlier copy, which the bench has set aside) instead of new
    files; copyparty, run here without its database, looks nothing up.
    """
    paths, digests = [], {}
    for number in range(count):
        path = folder / f"small-{number:04d}.bin"
        digest = write_random(path, size)
        digests[digest] = digests.get(digest, 0) + 1
        paths.append(str(path))
    return paths, digests


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


def current_rss(pid: int) -> int:
    return sum(_status(p, "VmRSS") for p in process_tree(pid))


def thread_count(pid: int) -> int:
    return sum(_status(p, "Threads") // 1024 for p in process_tree(pid))


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/PID/clear_refs``, Linux >= 4.0), so that the next
    peak_rss() is the peak of one measurement, not of the process's life.  False where not permitted."""
    ok = True
    for p in process_tree(pid):
        try:
            Path(f"/proc/{p}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user+sys CPU seconds of the process and every process under it, all their threads included
    (/proc/PID/stat utime+stime count every thread of the process), plus cutime+cstime: children that
    already exited and were waited for."""
    ticks = 0
    for p in process_tree(pid):
        try:
            text = Path(f"/proc/{p}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = text[text.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def system_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine (user nice system irq softirq of /proc/stat's cpu line)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) / CLOCK_TICKS


def own_cpu_seconds() -> float:
    """This process (every thread: the client) and its waited-for children (curl)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def recycle_memory(folder: Path, size: int) -> None:
    """Write about ``size`` bytes into a scratch file and delete it, so that the measurement right after it
    writes into memory the machine used a moment ago.

    This kind of VM hands memory the guest left free for a few seconds back to the host (free page reporting,
    /sys/module/page_reporting); a write into the page cache that lands on such memory pays, inside its copy,
    for the host to fault it in again.  Writing 1 GiB cost 2.1 CPU s after 10 s of idling against 0.25 s right
    after another file of 1 GiB was deleted (bench/README.md, "Memory the host took back"), so a measurement
    cost what the idle time before it decided.  A scratch file larger than the kernel's background writeback
    threshold (a tenth of the memory) is partly written to disk before it is deleted: only time lost before
    the measurement, which starts once the deletion (waiting for that writeback) is over.
    """
    size = min(size + 64 * MIB, available_memory() // 2)
    path = folder / "recycle-memory.tmp"
    block = bytes(MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, MIB):
            os.pwrite(fd, block, offset)
    finally:
        os.close(fd)
        path.unlink()


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 30


class Meter:
    """Around one measurement: os.sync() first, the memory it will write into recycled (``recycle``: how many
    bytes the measurement stores), then server CPU seconds, wall time and peak RSS of it."""

    def __init__(self, server: "Server", recycle: int = 0):
        self.pid = server.proc.pid
        self.folder = server.root
        self.recycle = recycle
        self.cpu = self.seconds = 0.0
        self.peak = 0

    def __enter__(self) -> "Meter":
        os.sync()
        if self.recycle:
            recycle_memory(self.folder, self.recycle)
        self.peak_reset = reset_peak_rss(self.pid)
        self.sampler = None if self.peak_reset else RssSampler(self.pid)
        if self.sampler:
            self.sampler.start()
        self.cpu0, self.own0, self.all0 = cpu_seconds(self.pid), own_cpu_seconds(), system_cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu = cpu_seconds(self.pid) - self.cpu0
        # CPU the rest of the machine used meanwhile (not this server, not the bench and its curl): cores
        others = (system_cpu_seconds() - self.all0) - self.cpu - (own_cpu_seconds() - self.own0)
        self.other_load = max(0.0, others) / self.seconds if self.seconds > 0 else 0.0
        self.peak = peak_rss(self.pid) if self.peak_reset else max(self.sampler.stop(), current_rss(self.pid))


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
_ASIDE = itertools.count()


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

    def clean(self, aside: bool = False) -> None:
        """Empty the store for the next case.  ``aside``: by moving its files aside, not deleting them.

        On an ext4 without a journal (this kind of VM's disk) an inode freed in the last 30 s (330 s while its
        inode-table block is dirty) is skipped, one by one, when a new file is created; the case after a
        deletion of 500 files would pay for it (up to a third of a server's CPU per file, seen with perf in
        __ext4_new_inode/recently_deleted) and the order of the cases would decide the table.  What is set
        aside goes with the bench's folder at the end (the big files are few inodes: deleted at once).
        """
        folder = self.root.parent / "set-aside"
        folder.mkdir(exist_ok=True)
        for path in self.stored_files():
            if aside:
                os.rename(path, folder / f"{next(_ASIDE)}-{path.name}")
            else:
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

    def clean(self, aside: bool = False) -> None:
        super().clean(aside)
        for path in (self.root / "chunks").glob("*.part"):
            path.unlink()  # none after a successful case: the ledger stays, it is the server's open database


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


class Floor(Server):
    """bench/floor.py: recv_into a reused 1 MiB buffer + pwrite + sha256, one thread per connection."""
    name = "floor"

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "floor.py"), "--host", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.store)]


# -- measurements ---------------------------------------------------------------------------------------------
class Bench:
    """Every measurement is recorded as data[key][metric][run] -> list of values (a run's value is their
    mean: the floor is measured twice per run).  Metrics: "MB/s", "files/s", "cpu" (s/GiB or ms/file),
    "rss" (peak MiB during the measurement), "finish_ms" (chunked uploads)."""

    def __init__(self, args, tmp: Path):
        self.args, self.tmp = args, tmp
        self.failures: list[str] = []
        self.data: dict[str, dict[str, dict[int, list[float]]]] = {}
        self.run = 0
        self.processes: dict[str, int] = {}   # most processes seen under each server during a measurement
        self.threads: dict[str, int] = {}

    def add(self, key: str, metric: str, value: float) -> None:
        self.data.setdefault(key, {}).setdefault(metric, {}).setdefault(self.run, []).append(value)

    def per_run(self, key: str, metric: str) -> dict[int, float]:
        return {run: statistics.mean(values) for run, values in self.data.get(key, {}).get(metric, {}).items()}

    def fail(self, message: str) -> None:
        print("FAILURE:", message, flush=True)
        self.failures.append(message)

    def check_stored(self, server: Server, expected: dict[str, str], what: str, aside: bool = False) -> bool:
        """``expected``: sha256 -> count expected; every stored file must be one of them."""
        found: dict[str, int] = {}
        for path in server.stored_files():
            digest = sha256_file(path)
            found[digest] = found.get(digest, 0) + 1
        server.clean(aside)
        if found != expected:
            missing = sum(max(0, n - found.get(d, 0)) for d, n in expected.items())
            wrong = sum(n for d, n in found.items() if d not in expected)
            self.fail(f"{what} on {server.name}: {missing} file(s) missing or wrong, {wrong} unexpected")
            return False
        return True

    def record(self, server: Server, key: str, meter: Meter, size: int | None = None, files: int | None = None):
        self.processes[server.name] = max(self.processes.get(server.name, 0), len(process_tree(server.proc.pid)))
        self.threads[server.name] = max(self.threads.get(server.name, 0), thread_count(server.proc.pid))
        self.add(key, "rss", meter.peak / MIB)
        self.add(key, "other", meter.other_load)
        if size is not None:
            self.add(key, "cpu", meter.cpu / (size / GIB))
            return f"{meter.cpu / (size / GIB):.2f} CPU s/GiB, peak RSS {meter.peak / MIB:.1f} MiB"
        self.add(key, "cpu", meter.cpu / files * 1000)
        return f"{meter.cpu / files * 1000:.2f} CPU ms/file, peak RSS {meter.peak / MIB:.1f} MiB"

    def big_chunked(self, server: PyFileDrop, source: Path, digest: str, chunk: int, parallel: int, key: str,
                    page: client.PageHashes | None = None):
        size = source.stat().st_size
        try:
            with Meter(server, recycle=size) as meter:
                result = client.upload_chunked("127.0.0.1", server.port, str(source), chunk_size=chunk,
                                               parallel=parallel, filename="big.bin", page=page)
        except client.UploadFailed as error:
            self.fail(f"{key}: {error}")
            server.clean()
            return None
        if result.reply.get("sha256") != digest:
            self.fail(f"{key}: the server reported sha256 {result.reply.get('sha256')}")
        if not self.check_stored(server, {digest: 1}, key):
            return None
        self.add(key, "MB/s", result.mb_per_s)
        self.add(key, "finish_ms", result.finish_s * 1000)
        extra = self.record(server, key, meter, size=size)
        print(f"  {key}: {result.mb_per_s:.0f} MB/s, {extra}, completing {result.finish_s * 1000:.1f} ms",
              flush=True)
        return result

    def big_curl(self, server: Server, source: Path, digest: str, key: str) -> None:
        size = source.stat().st_size
        with Meter(server, recycle=size) as meter:
            done = subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(source),
                                   server.put_url("big.bin")], capture_output=True, text=True)
        if done.returncode:
            self.fail(f"{key}: curl exited {done.returncode}: {done.stderr.strip()}")
            server.clean()
            return
        if not self.check_stored(server, {digest: 1}, key):
            return
        self.add(key, "MB/s", size / meter.seconds / 1e6)
        extra = self.record(server, key, meter, size=size)
        print(f"  {key}: {size / meter.seconds / 1e6:.0f} MB/s, {extra}", flush=True)

    def many(self, server: Server, paths: list[str], digests: dict[str, int], clients: int, key: str,
             mode: str = "put") -> None:
        try:
            with Meter(server, recycle=sum(os.path.getsize(path) for path in paths)) as meter:
                result = client.upload_many("127.0.0.1", server.port, paths, clients=clients, mode=mode,
                                            put_prefix=server.put_prefix)
        except client.UploadFailed as error:
            self.fail(f"{key}: {error}")
            server.clean()
            return
        if not self.check_stored(server, digests, key, aside=True):
            return
        self.add(key, "files/s", result["files_per_s"])
        extra = self.record(server, key, meter, files=len(paths))
        print(f"  {key}: {result['files_per_s']:.0f} files/s, {extra}", flush=True)


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


def worst_of(metric: str):
    return min if metric in ("MB/s", "files/s") else max


def raise_nofile() -> int:
    """RLIMIT_NOFILE of this process (and so of the servers it starts) up to its hard limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement; median and worst reported")
    parser.add_argument("--size", type=parse_size, default=GIB, help="size of the big file (default 1G)")
    parser.add_argument("--files", type=int, default=500, help="number of small files (default 500)")
    parser.add_argument("--file-size", type=parse_size, default=64 * 1024)
    parser.add_argument("--big-size", type=parse_size, default=4 * GIB,
                        help="size of the pyfiledrop peak-RSS upload (default 4G)")
    parser.add_argument("--no-big", action="store_true", help="skip the 4 GiB peak-RSS upload")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 64 MiB, 50 files, 1 run, no 4 GiB, two short connection cases")
    parser.add_argument("--only", choices=["big", "many", "connections"], help="run only one group")
    parser.add_argument("--connections", default=None,
                        help="connection cases N:M,... (N idle + M trickling; default "
                             "0:0,70:0,300:100,500:500; --quick 0:0,70:10)")
    parser.add_argument("--no-connections", action="store_true", help="skip bench/connections.py's cases")
    parser.add_argument("--probe-timeout", type=float, default=None,
                        help="connections: seconds to wait for the new upload (default 30, --quick 10)")
    parser.add_argument("--pyfiledrop", type=Path, default=PYFILEDROP, help="the pyfiledrop.py to measure")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latest.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.files, args.runs, args.no_big = min(args.size, 64 * MIB), min(args.files, 50), 1, True
    if args.connections is None:
        args.connections = "0:0,70:10" if args.quick else "0:0,70:0,300:100,500:500"
    if args.probe_timeout is None:
        args.probe_timeout = 10.0 if args.quick else 30.0
    do_big, do_many = args.only in (None, "big"), args.only in (None, "many")
    do_conn = args.only in (None, "connections") and not args.no_connections

    started_all = time.monotonic()
    nofile = raise_nofile()
    PyFileDrop.script = args.pyfiledrop.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="pyfiledrop-bench-"))
    servers = [PyFileDrop(tmp), Nginx(tmp), Copyparty(tmp), Floor(tmp)]
    pfd, nginx, copyparty, floor = servers
    bench = Bench(args, tmp)
    big_rss = big_finish = big_cpu = None
    conn_rows: list = []
    info = machine()
    info["nofile"] = nofile
    size_label = f"{args.size / GIB:g} GiB" if args.size >= GIB else f"{args.size / MIB:g} MiB"
    # (key, label) of every big-file case, in the order they run (alternating servers); the floor twice
    big_cases = [
        ("floor curl", "floor (bench/floor.py), curl -T"),
        ("pfd default x6", f"pyfiledrop, page defaults ({DEFAULT_CHUNK // MIB} MiB chunks, 6 in flight)"),
        ("nginx curl", "nginx, curl -T"),
        ("pfd 1MB x6", "pyfiledrop, 1 MB chunks, 6 in flight"),
        ("copyparty curl", "copyparty, curl -T"),
        ("pfd curl", "pyfiledrop, curl -T (PUT /upload/NAME)"),
        ("pfd default x6 parts", "pyfiledrop, page defaults, the file's sha256 only with the last part"),
        ("floor curl", None),
        ("pfd default x1", f"pyfiledrop, {DEFAULT_CHUNK // MIB} MiB chunks, 1 in flight"),
        *((f"pfd {other // MIB}MiB x6", f"pyfiledrop, {other // MIB} MiB chunks, 6 in flight")
          for other in OTHER_CHUNKS),
    ]
    many_cases = [("pyfiledrop", pfd, "chunk", "pyfiledrop, chunk protocol (one chunk per file)"),
                  ("pyfiledrop PUT", pfd, "put", "pyfiledrop, PUT /upload/NAME"),
                  ("copyparty", copyparty, "put", "copyparty, PUT"),
                  ("nginx", nginx, "put", "nginx, PUT"),
                  ("floor", floor, "put", "floor (bench/floor.py), PUT")]
    try:
        if do_big or do_many:
            for server in servers:
                server.start()
            info["copyparty"] = copyparty.version()
            info["pyfiledrop processes at start"] = len(process_tree(pfd.proc.pid))
        source = tmp / "big.bin"
        known_hashes: dict = {}

        def page_hashes(path: Path, chunk: int, with_whole: bool) -> client.PageHashes:
            if chunk not in known_hashes:
                known_hashes[chunk] = client.PageHashes.of(str(path), chunk)
            hashes = known_hashes[chunk]
            return hashes if with_whole else hashes.only_with_the_last()

        if do_big:
            print(f"writing a {size_label} random file", flush=True)
            digest = write_random(source, args.size)
        if do_many:
            small = tmp / "small"
            small.mkdir()
        for run in range(args.runs if do_big or do_many else 0):
            bench.run = run
            print(f"run {run + 1} of {args.runs}", flush=True)
            if do_big:
                for key, _ in big_cases:
                    name, _, how = key.partition(" ")
                    if how == "curl":
                        target = {"floor": floor, "nginx": nginx, "copyparty": copyparty, "pfd": pfd}[name]
                        bench.big_curl(target, source, digest, key)
                    else:
                        chunk_text, parallel = how.split(" x")
                        parallel, _, variant = parallel.partition(" ")
                        chunk = DEFAULT_CHUNK if chunk_text == "default" else (
                            1_000_000 if chunk_text == "1MB" else int(chunk_text.removesuffix("MiB")) * MIB)
                        page = page_hashes(source, chunk, with_whole=variant != "parts")
                        bench.big_chunked(pfd, source, digest, chunk, int(parallel), key, page)
            if do_many:
                for clients in (1, 8):
                    for name, server, mode, _ in many_cases:
                        paths, digests = new_small_files(small, args.files, args.file_size)
                        bench.many(server, paths, digests, clients, f"many {name} x{clients}", mode)
        if source.exists():
            source.unlink()
        if do_big and not args.no_big:
            pfd.stop()
            pfd.clean()
            pfd.start()
            print(f"writing a {args.big_size / GIB:g} GiB file for the peak-RSS upload", flush=True)
            huge = tmp / "huge.bin"
            huge_digest = write_random(huge, args.big_size)
            sampler = RssSampler(pfd.proc.pid)
            sampler.start()
            bench.run = 0
            result = bench.big_chunked(pfd, huge, huge_digest, DEFAULT_CHUNK, 6, "huge default x6",
                                       client.PageHashes.of(str(huge), DEFAULT_CHUNK))
            sampled = sampler.stop()
            big_rss = max(sampled, peak_rss(pfd.proc.pid))
            big_finish = result.finish_s * 1000 if result else None
            big_cpu = bench.per_run("huge default x6", "cpu").get(0)
            huge.unlink()
            print(f"  pyfiledrop peak RSS during {args.big_size / GIB:g} GiB: {big_rss / MIB:.1f} MiB", flush=True)
    finally:
        for server in servers:
            server.stop()
    try:
        if do_conn:
            import connections
            cases = connections.parse_cases(args.connections)
            factories = [lambda root: PyFileDrop(root), lambda root: Copyparty(root), lambda root: Nginx(root)]
            conn_rows = connections.run_cases(factories, cases, tmp / "connections", args.probe_timeout)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    elapsed = time.monotonic() - started_all

    # -- report ------------------------------------------------------------------------------------------
    def agg(key, metric):
        values = list(bench.per_run(key, metric).values())
        return (median(values), worst_of(metric)(values)) if values else (None, None)

    floor_runs = bench.per_run("floor curl", "cpu")

    def floor_ratios(key):
        runs = bench.per_run(key, "cpu")
        values = [runs[r] / floor_runs[r] for r in runs if floor_runs.get(r)]
        return (median(values), max(values), values) if values else (None, None, [])

    def f2(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"pyfiledrop benchmark: {args.runs} run(s); big file {size_label}, {args.files} x "
        f"{args.file_size // 1024} KiB files; loopback; {elapsed / 60:.1f} min",
        "",
        f"Machine: {info['nproc']} cores, {info['cpu']}, disk {info['disk']}, Python {info['python']}, "
        f"kernel {info['kernel']}, {info['nginx']}, {info.get('copyparty', '')}; RLIMIT_NOFILE {nofile}",
        "",
    ]
    if do_big or do_many:
        lines += [f"pyfiledrop: {bench.processes.get('pyfiledrop', '?')} process(es) during every measurement "
                  f"(at start {info.get('pyfiledrop processes at start', '?')}), up to "
                  f"{bench.threads.get('pyfiledrop', '?')} threads", ""]
    if do_big:
        lines += [
            f"### {size_label} upload: server CPU per GiB beside the floor ({args.runs} run(s): median / worst)",
            "",
            "| Case | CPU s/GiB | x floor | MB/s | peak RSS MiB | completion ms | other load, cores |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        seen = set()
        for key, label in big_cases:
            if key in seen or label is None:
                continue
            seen.add(key)
            cpu, cpu_w = agg(key, "cpu")
            if cpu is None:
                continue
            r, r_w, _ = floor_ratios(key)
            mb, mb_w = agg(key, "MB/s")
            rss, rss_w = agg(key, "rss")
            fin, fin_w = agg(key, "finish_ms")
            other, other_w = agg(key, "other")
            lines.append(f"| {label} | {f2(cpu)} / {f2(cpu_w)} | {f2(r)}x / {f2(r_w)}x | {fmt(mb)} / {fmt(mb_w)} | "
                         f"{fmt(rss)} / {fmt(rss_w)} | " + (f"{fmt(fin)} / {fmt(fin_w)}" if fin is not None else "")
                         + f" | {f2(other)} / {f2(other_w)} |")
        if big_rss:
            lines.append(f"| pyfiledrop, {args.big_size / GIB:g} GiB, page defaults (fresh server, one run) | "
                         f"{f2(big_cpu)} | | | {fmt(big_rss / MIB)} (VmRSS every 20 ms and VmHWM) | "
                         f"{fmt(big_finish) if big_finish is not None else '-'} |")
        lines.append("")
    if do_many:
        lines += [
            f"### {args.files} x {args.file_size // 1024} KiB files ({args.runs} run(s): median / worst)",
            "",
            "| Case | clients | files/s | CPU ms per file | peak RSS MiB | other load, cores |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for clients in (1, 8):
            for name, _, _, label in many_cases:
                key = f"many {name} x{clients}"
                fs, fs_w = agg(key, "files/s")
                if fs is None:
                    continue
                cpu, cpu_w = agg(key, "cpu")
                rss, rss_w = agg(key, "rss")
                other, other_w = agg(key, "other")
                lines.append(f"| {label} | {clients} | {fmt(fs)} / {fmt(fs_w)} | {f2(cpu)} / {f2(cpu_w)} | "
                             f"{fmt(rss)} / {fmt(rss_w)} | {f2(other)} / {f2(other_w)} |")
        lines.append("")
    if conn_rows:
        lines += connections.table(conn_rows, args.probe_timeout) + [""]

    targets = []

    def target(text, ok, detail=""):
        mark = "x" if ok else " "
        targets.append(f"- [{mark}] {text}" + (f": {detail}" if detail else "")
                       + ("" if ok is not None else " (not measured)"))

    if do_big:
        _, w, every = floor_ratios("pfd default x6")
        target("page defaults at most 1.15x the floor in every run", (w <= 1.15) if every else None,
               ", ".join(f"{v:.2f}x" for v in every))
        med, w, every = floor_ratios("pfd curl")
        target("curl -T at most 1.1x the floor", (med <= 1.1) if every else None,
               f"median {f2(med)}x, worst {f2(w)}x")
        med, w, every = floor_ratios("pfd 1MB x6")
        target("1 MB chunks at most 1.5x the floor", (med <= 1.5) if every else None,
               f"median {f2(med)}x, worst {f2(w)}x")
    if do_many:
        p8, c8 = bench.per_run("many pyfiledrop x8", "files/s"), bench.per_run("many copyparty x8", "files/s")
        pairs = [(p8[r], c8[r]) for r in p8 if r in c8]
        target(f"{args.files} x {args.file_size // 1024} KiB, 8 clients: more files/s than copyparty in the "
               "same run", all(p > c for p, c in pairs) if pairs else None,
               ", ".join(f"{p:.0f} vs {c:.0f}" for p, c in pairs))
    if do_big:
        target(f"peak RSS during a {args.big_size / GIB:g} GiB upload under 64 MiB",
               (big_rss < 64 * MIB) if big_rss else None, f"{big_rss / MIB:.1f} MiB" if big_rss else "")
        finishes = [v for key in bench.data for v in bench.per_run(key, "finish_ms").values()]
        target("completion under 100 ms at any size (worst of every chunked upload)",
               (max(finishes) < 100) if finishes else None, f"worst {max(finishes):.1f} ms" if finishes else "")
    if targets:
        lines += ["Targets (reported, not asserted):", *targets, ""]
    if bench.failures:
        lines += ["FAILURES:", *[f"- {f}" for f in bench.failures], ""]
    text = "\n".join(lines)
    print()
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
         "data": {k: {m: {str(r): v for r, v in runs.items()} for m, runs in metrics.items()}
                  for k, metrics in bench.data.items()},
         "big_rss": big_rss, "big_finish_ms": big_finish, "processes": bench.processes,
         "threads": bench.threads, "connections": conn_rows, "failures": bench.failures}, indent=1))
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
