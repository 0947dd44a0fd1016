"""Two pyfiledrop.py side by side on many small files, alternating, so that a slow phase of the machine hits both.

    python bench/compare.py OLD/pyfiledrop.py pyfiledrop.py [--files 1000] [--clients 1,8] [--rounds 3]
    python bench/compare.py OLD/pyfiledrop.py pyfiledrop.py --paired 150 [--clients 8] [--rounds 20]

Files of 64 KiB (distinct random bytes) go over keep-alive connections (bench/client.py) by PUT or, with
--mode chunk, by the chunk protocol; each server's CPU (user + system) and context switches (all its threads)
are read from /proc.

By default each measurement starts the server afresh as bench/run.py does (its folders in a temporary one),
warms it with 50 files and sends the others; printed per server, clients and round: files/s, CPU ms per file,
context switches per file.

--paired N starts both servers once and, round after round, sends a batch of N files to each in turn (the
order swapped each round): consecutive batches see the same phase of the machine, so the ratio of a round's
two batches is steadier than two measurements minutes apart.  Printed: each server's medians and the median
(and quartiles) of the rounds' ratios, second server over first.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import client  # noqa: E402
import run  # noqa: E402  (its server runner and its reading of /proc)

WARM_UP = 50


def _context_switches(pid: int) -> int:
    """Voluntary and involuntary, summed over every thread (/proc/PID/status counts the first thread only)."""
    total = 0
    for status in glob.glob(f"/proc/{pid}/task/*/status"):
        for line in Path(status).read_text().splitlines():
            if "ctxt_switches" in line:
                total += int(line.split()[1])
    return total


def _start(script: str, folder: Path) -> run.PyFileDrop:
    server = type("Compared", (run.PyFileDrop,), {"script": Path(script).resolve()})(Path(tempfile.mkdtemp(dir=folder)))
    server.start()
    return server


def _stop(server: run.PyFileDrop, folder: Path) -> None:
    server.stop()
    # set aside, deleted at the end: on ext4 a file created within 30 s of many deletions skips every
    # freed inode one by one (bench/README.md), and the next measurement would pay for this one's files
    aside = folder / "set-aside"
    aside.mkdir(exist_ok=True)
    server.root.parent.rename(aside / server.root.parent.name)


def _send(server: run.PyFileDrop, paths: list[str], clients: int, mode: str) -> tuple[float, float, float]:
    """(files/s, CPU ms per file, context switches per file) of sending ``paths`` to a running server."""
    pid = server.proc.pid
    cpu, switches, started = run.cpu_seconds(pid), _context_switches(pid), time.monotonic()
    client.upload_many("127.0.0.1", server.port, paths, clients=clients, mode=mode)
    seconds = time.monotonic() - started
    return (len(paths) / seconds, 1000 * (run.cpu_seconds(pid) - cpu) / len(paths),
            (_context_switches(pid) - switches) / len(paths))


def measure(script: str, paths: list[str], clients: int, folder: Path, mode: str = "put") -> tuple[float, float, float]:
    """(files/s, CPU ms per file, context switches per file) of one fresh server of ``script``."""
    server = _start(script, folder)
    try:
        client.upload_many("127.0.0.1", server.port, paths[:WARM_UP], clients=clients, mode=mode)
        os.sync()
        return _send(server, paths[WARM_UP:], clients, mode)
    finally:
        _stop(server, folder)


def paired(scripts: list[str], paths: list[str], clients: int, folder: Path, mode: str, batch: int,
           rounds: int) -> None:
    servers = [_start(script, folder) for script in scripts]
    try:
        for server in servers:
            client.upload_many("127.0.0.1", server.port, paths[:WARM_UP], clients=clients, mode=mode)
        results: list[list[tuple[float, float, float]]] = [[], []]
        for number in range(rounds):
            start = WARM_UP + number * batch
            order = (0, 1) if number % 2 == 0 else (1, 0)
            for which in order:
                results[which].append(_send(servers[which], paths[start:start + batch], clients, mode))
        for script, measured in zip(scripts, results):
            rates, cpus, switches = zip(*measured)
            print(f"{clients} client(s)  {script}: median {statistics.median(rates):.0f} files/s, "
                  f"{statistics.median(cpus):.2f} CPU ms per file, {statistics.median(switches):.1f} context "
                  f"switches per file", flush=True)
        ratios = [second[0] / first[0] for first, second in zip(*results)]
        quartiles = ", ".join(f"{value:.3f}" for value in statistics.quantiles(ratios, n=4))
        print(f"{clients} client(s)  files/s of the second over the first, per round: median "
              f"{statistics.median(ratios):.3f} (quartiles {quartiles})", flush=True)
    finally:
        for server in servers:
            _stop(server, folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scripts", nargs=2, help="the two pyfiledrop.py to compare")
    parser.add_argument("--files", type=int, default=1000, help="files per measurement (not with --paired)")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mode", choices=("put", "chunk"), default="put",
                        help="each file by one PUT, or by the chunk protocol (one chunk, as the page sends it)")
    parser.add_argument("--paired", type=int, metavar="N", help="both servers running, batches of N in turn")
    args = parser.parse_args(argv)
    if args.paired is not None and (args.paired < 1 or args.rounds < 2):
        parser.error("--paired needs a batch of at least 1 file and at least 2 rounds")
    folder = Path(tempfile.mkdtemp(prefix="pyfiledrop-compare-"))
    try:
        sources = folder / "sources"
        sources.mkdir()
        count = args.paired * args.rounds if args.paired is not None else args.files
        paths = []
        for index in range(count + WARM_UP):
            path = sources / f"f{index:05d}.bin"
            path.write_bytes(os.urandom(65536))
            paths.append(str(path))
        client_counts = [int(text) for text in args.clients.split(",")]
        if args.paired is not None:
            for clients in client_counts:
                paired(args.scripts, paths, clients, folder, args.mode, args.paired, args.rounds)
        else:
            for round_number in range(1, args.rounds + 1):
                for clients in client_counts:
                    for script in args.scripts:
                        rate, cpu, switches = measure(script, paths, clients, folder, args.mode)
                        print(f"round {round_number}  {clients} client(s)  {script}: {rate:.0f} files/s, "
                              f"{cpu:.2f} CPU ms per file, {switches:.1f} context switches per file", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
