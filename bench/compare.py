"""Two pyfiledrop.py side by side on many small files, alternating, so that a slow phase of the machine hits both.

    python bench/compare.py OLD/pyfiledrop.py pyfiledrop.py [--files 1000] [--clients 1,8] [--rounds 3]

Each measurement starts the server afresh as bench/run.py does (its folders in a temporary one),
warms it with 50 files, then PUTs (or, with --mode chunk, sends by the chunk protocol) the others of 64 KiB (distinct random bytes) over keep-alive connections
(bench/client.py) and reads, from /proc, the server's CPU (user + system) and its context switches (all its
threads).  Printed per server, clients and round: files/s, CPU ms per file, context switches per file.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import client  # noqa: E402
import run  # noqa: E402  (its server runner and its reading of /proc)


def _context_switches(pid: int) -> int:
    """Voluntary and involuntary, summed over every thread (/proc/PID/status counts the first thread only)."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        for line in Path(status).read_text().splitlines():
            if "ctxt_switches" in line:
                total += int(line.split()[1])
    return total


def measure(script: str, paths: list[str], clients: int, folder: Path, mode: str = "put") -> tuple[float, float, float]:
    """(files/s, CPU ms per file, context switches per file) of one fresh server of ``script``."""
    server = type("Compared", (run.PyFileDrop,), {"script": Path(script).resolve()})(Path(tempfile.mkdtemp(dir=folder)))
    server.start()
    try:
        client.upload_many("127.0.0.1", server.port, paths[:50], clients=clients, mode=mode)
        os.sync()
        pid = server.proc.pid
        cpu, switches, started = run.cpu_seconds(pid), _context_switches(pid), time.monotonic()
        client.upload_many("127.0.0.1", server.port, paths[50:], clients=clients, mode=mode)
        seconds = time.monotonic() - started
        count = len(paths) - 50
        return (count / seconds, 1000 * (run.cpu_seconds(pid) - cpu) / count,
                (_context_switches(pid) - switches) / count)
    finally:
        server.stop()
        # set aside, deleted at the end: on ext4 a file created within 30 s of many deletions skips every
        # freed inode one by one (bench/README.md), and the next measurement would pay for this one's files
        aside = folder / "set-aside"
        aside.mkdir(exist_ok=True)
        server.root.parent.rename(aside / server.root.parent.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scripts", nargs=2, help="the two pyfiledrop.py to compare")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("put", "chunk"), default="put",
                        help="each file by one PUT, or by the chunk protocol (one chunk, as the page sends it)")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="pyfiledrop-compare-"))
    try:
        sources = folder / "sources"
        sources.mkdir()
        paths = []
        for index in range(args.files + 50):
            path = sources / f"f{index:05d}.bin"
            path.write_bytes(os.urandom(65536))
            paths.append(str(path))
        for round_number in range(1, args.rounds + 1):
            for clients in (int(text) for text in args.clients.split(",")):
                for script in args.scripts:
                    rate, cpu, switches = measure(script, paths, clients, folder, args.mode)
                    print(f"round {round_number}  {clients} client(s)  {script}: {rate:.0f} files/s, "
                          f"{cpu:.2f} CPU ms per file, {switches:.1f} context switches per file", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
