"""``pyfiledrop send``: a real subprocess sending to a real server, through a throttling proxy where it must be
stopped half-way."""
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import pyfiledrop
from conftest import ROOT, cli_server, running_server


def send(args, **options):
    return subprocess.run([sys.executable, str(ROOT / "pyfiledrop.py"), "send", *args], capture_output=True,
                          text=True, timeout=300, **options)


def start_send(args):
    return subprocess.Popen([sys.executable, str(ROOT / "pyfiledrop.py"), "send", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def tree(root: Path) -> dict:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def make_folder(root: Path) -> Path:
    folder = root / "photos"
    (folder / "2024" / "summer").mkdir(parents=True)
    (folder / "empty dir").mkdir()
    (folder / "a.txt").write_bytes(b"hello")
    (folder / "empty.bin").write_bytes(b"")
    (folder / "2024" / "summer" / "été.jpg").write_bytes(os.urandom(3 << 20))
    (folder / "2024" / "notes.md").write_bytes(os.urandom(1000))
    return folder


class ThrottlingProxy:
    """A TCP proxy to ``port`` that passes at most ``rate`` bytes a second each way and counts what clients send."""

    def __init__(self, port: int, rate: int):
        self.target, self.rate, self.sent = port, rate, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:  # the server is down: so is the connection through the proxy
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source, target, counted):
        try:
            while data := source.recv(16384):
                if counted:
                    with self._lock:
                        self.sent += len(data)
                    time.sleep(len(data) / self.rate)  # the throttle itself, not a wait for an event
                target.sendall(data)
        except OSError:
            pass
        finally:  # one side gone: both go (a shut-down socket left open would swallow the client's bytes)
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self):
        self.listener.close()


def test_a_folder_is_sent_whole_with_its_structure(server, tmp_path):
    folder = make_folder(tmp_path)
    result = send([str(folder), "--to", server.url, "--state", str(tmp_path / "state.json")])
    assert result.returncode == 0, result.stderr
    assert tree(server.storage / "photos") == tree(folder)
    assert "sent 4 file(s)" in result.stdout
    mtime = os.stat(folder / "a.txt").st_mtime
    assert os.stat(server.storage / "photos" / "a.txt").st_mtime == pytest.approx(mtime, abs=1e-3)


def test_files_the_server_has_are_skipped_on_a_second_run(server, tmp_path):
    folder = make_folder(tmp_path)
    state = ["--state", str(tmp_path / "state.json")]
    assert send([str(folder), "--to", server.url, *state]).returncode == 0
    again = send([str(folder), "--to", server.url, *state])
    assert again.returncode == 0 and "sent 0 file(s)" in again.stdout and "4 already on the server" in again.stdout
    fresh_state = send([str(folder), "--to", server.url, "--state", str(tmp_path / "other.json")])
    assert "3 already on the server" in fresh_state.stdout  # the server says so (by sha256), not our notes
    assert tree(server.storage / "photos") == tree(folder)


def wait_until(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        threading.Event().wait(0.02)


def test_a_send_killed_half_way_sends_only_what_is_missing_when_run_again(server, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    proxy = ThrottlingProxy(server.port, rate=8 << 20)
    args = [str(big), "--to", f"http://127.0.0.1:{proxy.port}", "--state", str(tmp_path / "state.json")]
    first = start_send(args)
    upload = lambda: next(iter(server.engine._live.values()), None)  # noqa: E731
    wait_until(lambda: upload() is not None and server.engine.offset(upload().info.id) >= 3 << 20)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    upload_id = upload().info.id
    wait_until(lambda: not server.engine._live[upload_id].writers)
    had = server.engine.offset(upload_id)
    assert 0 < had < 8 << 20
    proxy.sent = 0
    second = send(args)
    assert second.returncode == 0, second.stderr
    assert (server.storage / "big.bin").read_bytes() == big.read_bytes()
    assert proxy.sent < (8 << 20) - had + 64 * 1024  # the missing bytes, and requests' heads
    proxy.close()


def test_a_send_goes_on_by_itself_when_the_server_restarts(tmp_path):
    folders = ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks"), "--min-free", "0", "-q"]
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))
    with cli_server(folders) as (process, port):
        proxy = ThrottlingProxy(port, rate=4 << 20)
        sender = start_send([str(big), "--to", f"http://127.0.0.1:{proxy.port}", "--state",
                             str(tmp_path / "state.json")])
        wait_until(lambda: proxy.sent > 2 << 20)
        process.kill()
        process.wait(10)
    with cli_server(folders, port=port):
        out, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err
    assert (tmp_path / "storage" / "big.bin").read_bytes() == big.read_bytes()
    proxy.close()


def test_files_that_do_not_make_it_are_named_and_the_exit_status_says_so(make_server, tmp_path):
    server = make_server(max_size_mb=1)
    small, large = tmp_path / "small.txt", tmp_path / "large.bin"
    small.write_bytes(b"fits")
    large.write_bytes(os.urandom(2 << 20))
    result = send([str(small), str(large), str(tmp_path / "missing.txt"), "--to", server.url,
                   "--state", str(tmp_path / "state.json")])
    assert result.returncode == 1
    assert f"not sent: {large}: 413" in result.stderr and "missing.txt: no such file" in result.stderr
    assert "small.txt" not in result.stderr and (server.storage / "small.txt").read_bytes() == b"fits"


def test_a_wrong_address_is_one_clear_line(tmp_path):
    result = send([str(ROOT / "README.md"), "--to", "ftp://host/x", "--state", str(tmp_path / "s.json")])
    assert result.returncode == 2 and "expected an http:// or https:// address" in result.stderr


def test_to_an_https_server_with_its_own_certificate_the_fingerprint_is_what_is_trusted(tmp_path):
    folders = ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks"), "--min-free", "0", "-q", "--tls"]
    source = tmp_path / "secret.txt"
    source.write_bytes(b"over https")
    with cli_server(folders) as (process, port):
        wait_until(lambda: (tmp_path / "chunks" / pyfiledrop.TLS_CERT_NAME).exists())
        fingerprint = pyfiledrop.certificate_fingerprint(tmp_path / "chunks" / pyfiledrop.TLS_CERT_NAME)
        to = ["--to", f"https://127.0.0.1:{port}", "--state", str(tmp_path / "state.json")]
        untrusted = send([str(source), *to])
        assert untrusted.returncode == 1 and "give --fingerprint" in untrusted.stderr
        wrong = send([str(source), *to, "--fingerprint", "00" * 32])
        assert wrong.returncode == 1 and "another fingerprint" in wrong.stderr
        assert not (tmp_path / "storage" / "secret.txt").exists()
        trusted = send([str(source), *to, "--fingerprint", fingerprint.lower()])
        assert trusted.returncode == 0, trusted.stderr
    assert (tmp_path / "storage" / "secret.txt").read_bytes() == b"over https"
