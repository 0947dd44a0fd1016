"""What a new user noticed (issue 12's polish list), server side and banner: loopback-only banners, one size
convention, sizes with units, refused and warned options, --open, the page in use, a deleted --index, the
status line on a 100-column terminal, warnings after the banner, one Date and a Server that tells nothing, the
shortened sha256, SIGTERM and Ctrl+C endings, the connection-trouble line.  Real subprocesses and servers.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, Output, cli_server, free_port, http_request, running_server

import pyfiledrop

pytestmark = pytest.mark.skipif(os.name == "nt", reason="sends signals, uses a pty")
QR_BLOCK = "\u2588"


def folders(tmp_path: Path) -> list[str]:
    return ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks")]


def banner_and_stop(args: list[str], *, cwd: Path | None = None, env: dict | None = None) -> tuple[str, int]:
    with cli_server(args, cwd=cwd, env=env) as (process, port):
        output = Output(process)
        output.wait_for(lambda text: "Press Ctrl+C to stop." in text)
        process.send_signal(signal.SIGINT)
        text = output.close()
    assert process.returncode == 0, text
    return text, port


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pyfiledrop.py"), *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyfiledrop: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# -- the banner ---------------------------------------------------------------------------------------------------

def test_loopback_host_says_this_machine_only_and_draws_no_qr(tmp_path):
    text, port = banner_and_stop(folders(tmp_path))  # cli_server listens on 127.0.0.1
    assert "Reachable from this machine only (--host 127.0.0.1)" in text
    assert f"  http://127.0.0.1:{port}/" in text.splitlines()
    assert QR_BLOCK not in text and "##" not in text and "scan" not in text
    assert "phone" not in text and "No connection?" not in text


@pytest.mark.parametrize("host", ["::1", "127.0.0.5", "localhost"])
def test_every_loopback_address_counts_as_this_machine_only(host, tmp_path):
    config = pyfiledrop.Config(host=host, storage=tmp_path, chunks=tmp_path)
    out = io.StringIO()
    urls = pyfiledrop.page_urls(host, 8000)
    pyfiledrop._print_banner(config, urls, pyfiledrop.Console(out))
    text = out.getvalue()
    assert f"Reachable from this machine only (--host {host})" in text and QR_BLOCK not in text
    assert not pyfiledrop.is_loopback("192.168.1.5") and not pyfiledrop.is_loopback("0.0.0.0")


def test_lan_banner_has_the_qr_code_and_the_connection_trouble_line_which_the_readme_has_too(tmp_path):
    text, port = banner_and_stop(["--host", "0.0.0.0", *folders(tmp_path)])
    line = pyfiledrop.CONNECTION_TROUBLE.format(port=port)
    assert line in text.splitlines() and "firewall" in line and "guest Wi-Fi" in line
    assert len(line) <= 100
    assert QR_BLOCK in text
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert pyfiledrop.CONNECTION_TROUBLE.format(port=pyfiledrop.DEFAULT_PORT) in readme


def test_banner_lines_fit_100_columns(tmp_path):
    """Every line the program writes itself (paths aside) fits a 100-column terminal, HTTPS lines included."""
    short = Path("/srv/drop")
    config = pyfiledrop.Config(host="0.0.0.0", storage=short, chunks=short, max_size_mb=123456,
                               chunk_size=3 * 1024 * 1024 + 5)
    urls = ["http://192.168.100.200:16273/", "http://10.0.0.1:16273/"]
    identity = pyfiledrop.TLSIdentity(None, ":".join(["AB"] * 32), short / "c.pem", "new")
    lines = pyfiledrop.banner(config, urls, identity).splitlines()
    for origin in ("kept", "renewed", "own"):
        lines += pyfiledrop.tls_banner_lines(pyfiledrop.TLSIdentity(None, identity.fingerprint, short, origin))
    for line in lines:
        assert len(line) <= 100, line


def test_the_page_in_use_is_named_and_a_deleted_index_falls_back_to_the_built_in_page(tmp_path):
    program = tmp_path / "program"
    program.mkdir()
    shutil.copy(ROOT / "pyfiledrop.py", program / "pyfiledrop.py")
    (program / "index.html").write_text("<p>beside the script</p>")
    process = subprocess.Popen([sys.executable, str(program / "pyfiledrop.py"), "--host", "127.0.0.1", "-p",
                                str(free_port()), *folders(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = Output(process)
    output.wait_for(lambda text: "Press Ctrl+C to stop." in text)
    process.send_signal(signal.SIGINT)
    text = output.close()
    assert f"  page           {program / 'index.html'} (found beside the program; it replaces the built-in page)" \
        in text.splitlines()

    page = tmp_path / "mine.html"
    page.write_text("<p>my own page</p>")
    with running_server(tmp_path, index=page) as server:
        assert server.request("GET", "/")[2] == b"<p>my own page</p>"
        page.unlink()
        status, headers, body = server.request("GET", "/")
        assert status == 200 and b"pyfiledrop" in body and b"pyfiledrop-config" in body
        assert "Content-Security-Policy" in headers  # the built-in page, with its own policy


# -- sizes --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, max_mib, chunk", [
    (["--max-size", "5"], 5, pyfiledrop.DEFAULT_CHUNK_SIZE),            # a plain number is MiB, as before
    (["--max-size", "2G"], 2048, pyfiledrop.DEFAULT_CHUNK_SIZE),
    (["--max-size", "1.5GiB"], 1536, pyfiledrop.DEFAULT_CHUNK_SIZE),
    (["--max-size", "500M", "--chunk-size", "8M"], 500, 8 * 2 ** 20),
    (["--max-size", "5", "--chunk-size", "1000"], 5, 1000),                # a plain number is bytes, as before
    (["--chunk-size", "512K"], pyfiledrop.DEFAULT_MAX_SIZE_MB, 512 * 1024),
])
def test_sizes_with_units(args, max_mib, chunk, tmp_path):
    config = pyfiledrop.parse_args([*args, *folders(tmp_path)])
    assert (config.max_size_mb, config.chunk_size) == (max_mib, chunk)


def test_one_size_convention_in_the_banner_the_console_and_the_page(tmp_path):
    text, _ = banner_and_stop(["--max-size", "5", "--chunk-size", "512K", *folders(tmp_path)])
    assert "files up to 5 MiB; chunks of 512 KiB" in text
    text, _ = banner_and_stop(folders(tmp_path))
    assert "files up to 100 GiB; chunks of 8 MiB" in text
    assert not re.search(r"\d (KB|MB|GB)\b|MB/s", text)
    assert pyfiledrop.human_size(5 * 2 ** 20) == pyfiledrop.binary_size(5 * 2 ** 20) == "5 MiB"
    # the page's shared list sizes as binary_size() does (the same rule in JavaScript)
    assert "toPrecision(4)" in pyfiledrop.SHARED_JS and '"KiB", "MiB"' in pyfiledrop.SHARED_JS


def test_unusable_options_are_refused_with_the_usable_range(tmp_path):
    line = one_line_error(run_cli(["--timeout", "1", *folders(tmp_path)], tmp_path))
    assert "--timeout" in line and "at least 1000" in line and "usable" in line
    line = one_line_error(run_cli(["--chunk-size", "1", *folders(tmp_path)], tmp_path))
    assert "--chunk-size 1 B allows files of at most 1 MiB" in line and "usable: 256 KiB to 1 GiB" in line
    line = one_line_error(run_cli(["--max-size", "500K", *folders(tmp_path)], tmp_path))
    assert "whole MiB" in line
    assert not (tmp_path / "storage").exists()


def test_poor_options_are_warned_after_the_banner(tmp_path):
    text, _ = banner_and_stop(["--timeout", "3000", "--chunk-size", "128K", *folders(tmp_path)])
    lines = text.splitlines()
    assert lines[0] == f"pyfiledrop {pyfiledrop.__version__}"
    timeout = next(i for i, line in enumerate(lines) if "warning: --timeout 3000 ms" in line)
    chunk = next(i for i, line in enumerate(lines) if "warning: --chunk-size 128 KiB" in line)
    assert "usable" in lines[timeout] and "usable" in lines[chunk]
    assert min(timeout, chunk) > lines.index("Press Ctrl+C to stop.")


@pytest.mark.skipif(os.stat("/tmp").st_dev == os.stat("/dev/shm").st_dev if os.path.isdir("/dev/shm") else True,
                    reason="needs two filesystems (/tmp and /dev/shm)")
def test_the_different_disks_warning_comes_after_the_banners_first_line(tmp_path):
    storage = Path("/dev/shm") / f"pyfiledrop-test-{uuid.uuid4().hex}"
    try:
        text, _ = banner_and_stop(["-s", str(storage), "-c", str(tmp_path / "chunks")])
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    lines = text.splitlines()
    assert lines[0] == f"pyfiledrop {pyfiledrop.__version__}"
    assert any("warning: the storage and chunks folders are on different disks" in line for line in lines[1:])


# -- --open --------------------------------------------------------------------------------------------------------

def test_local_url_follows_the_host():
    assert pyfiledrop.local_url("0.0.0.0", 80) == "http://127.0.0.1:80/"
    assert pyfiledrop.local_url("::", 80) == "http://[::1]:80/"
    assert pyfiledrop.local_url("::1", 80, "https") == "https://[::1]:80/"
    assert pyfiledrop.local_url("192.168.1.5", 8080) == "http://192.168.1.5:8080/"


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")
def test_open_opens_the_address_listened_on(tmp_path):
    """--host ::1 --open: the browser (here a recording script, through $BROWSER) is given [::1], and it answers."""
    record = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f"#!/bin/sh\necho \"$1\" > {record}\n")
    browser.chmod(0o755)
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "pyfiledrop.py"), "--host", "::1", "-p", str(port),
                                "--open", *folders(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "BROWSER": str(browser),
                                               "DISPLAY": ""})
    output = Output(process)
    try:
        deadline = time.monotonic() + 30
        while not (record.exists() and record.read_text().strip()):
            assert time.monotonic() < deadline, output.text
            threading.Event().wait(0.05)
        assert record.read_text().strip() == f"http://[::1]:{port}/"
        with socket.create_connection(("::1", port), timeout=10):
            pass
    finally:
        process.send_signal(signal.SIGINT)
        output.close()


# -- the status line ----------------------------------------------------------------------------------------------

def test_two_uploads_at_once_fit_a_100_column_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    now = [100.0]
    out = io.StringIO()
    console = pyfiledrop.Console(out, tty=True, clock=lambda: now[0])
    started = time.time()
    names = ["Holiday in the mountains with the whole family, part one.mov", "IMG_20260704_181512_HDR.jpg"]
    for received in range(1, 41):
        now[0] += 0.1
        for number, name in enumerate(names):
            console.handle(pyfiledrop.Progress(str(number), name, received * 1_000_000, 900_000_000, started))
    drawn = out.getvalue().split("\r")[-1]
    assert len(drawn) <= 99, drawn
    assert drawn.startswith("receiving ") and drawn.count("%") == 2, drawn
    assert "part one.mov" in drawn or "one.mov" in drawn  # names shortened in the middle, ends kept
    assert "HDR.jpg" in drawn


def test_the_status_line_gives_up_details_before_it_is_cut():
    items = [(f"file number {i} with a long name.bin", f"{i}0% of 1 GiB, 10.0 MiB/s, 9 s left", f"{i}0%")
             for i in range(1, 6)]
    for width in (60, 79, 99, 150):
        text = pyfiledrop.fit_status(items[:2], width)
        assert len(text) <= width and text.count("%") == 2, text
    many = pyfiledrop.fit_status(items, 40)
    assert len(many) <= 40 and many.startswith("receiving 5 files")
    assert pyfiledrop.fit_status(items[:1], 200) == f'receiving "{items[0][0]}" {items[0][1]}'


# -- headers ------------------------------------------------------------------------------------------------------

def header_lines(port: int, request: bytes) -> list[str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while block := sock.recv(65536):
            data += block
    return data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]


def test_every_reply_has_one_date_and_a_server_header_that_tells_nothing(tmp_path):
    with running_server(tmp_path, allow_downloads=True) as server:
        status, _, reply = server.request("PUT", "/upload/a.txt", b"hello")
        assert status == 200, reply
        upload_id = __import__("json").loads(reply)["id"]
        for request in (f"GET /download/{upload_id} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode(),
                        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                        b"GET /nothing HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                        b"GET /favicon.ico HTTP/1.0\r\n\r\n",
                        b"BROKEN\r\n\r\n"):                                   # the server's own 400
            lines = header_lines(server.port, request)
            dates = [line for line in lines if line.lower().startswith("date:")]
            servers = [line for line in lines if line.lower().startswith("server:")]
            assert len(dates) == 1, lines
            assert servers == ["Server: pyfiledrop"], lines
            assert not any(word in "\n".join(lines) for word in ("Python", "Paste", pyfiledrop.__version__))


# -- endings ------------------------------------------------------------------------------------------------------

def test_sigterm_ends_with_the_summary_line(tmp_path):
    with cli_server(folders(tmp_path)) as (process, port):
        output = Output(process)
        output.wait_for(lambda text: "Press Ctrl+C to stop." in text)
        assert http_request(port, "PUT", "/upload/x.bin", b"x")[0] == 200
        output.wait_for(lambda text: 'stored "x.bin"' in text)
        process.terminate()
        text = output.close()
    assert process.returncode == 0, text
    assert text.splitlines()[-1] == "Stopped. 1 file(s) stored this session."
    assert "Traceback" not in text


def visible(line: str) -> str:
    """What a terminal shows of one line: each carriage return writes over it from the first column."""
    shown = ""
    for piece in line.split("\r"):
        shown = piece + shown[len(piece):]
    return shown


def test_ctrl_c_on_a_terminal_leaves_no_caret_c(tmp_path):
    import fcntl
    import pty
    import termios

    def own_terminal() -> None:  # in the child: the pty becomes its controlling terminal, so ^C is SIGINT
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    controller, terminal = pty.openpty()
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "pyfiledrop.py"), "--host", "127.0.0.1", "-p", str(port),
                                "--no-qr", *folders(tmp_path)], stdin=terminal, stdout=terminal, stderr=terminal,
                               start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               preexec_fn=own_terminal)  # noqa: PLW1509 (one system call, nothing imported)
    os.close(terminal)
    received = b""

    def read_until(predicate, bound: float = 30.0) -> None:
        nonlocal received
        deadline = time.monotonic() + bound
        while not predicate(received):
            assert time.monotonic() < deadline, received
            try:
                block = os.read(controller, 65536)
            except OSError:  # the other end closed
                return
            if not block:
                return
            received += block

    try:
        read_until(lambda data: b"Press Ctrl+C to stop." in data)
        os.write(controller, b"\x03")  # the terminal driver echoes ^C and sends SIGINT
        read_until(lambda data: b"Stopped." in data)
        process.wait(30)
        read_until(lambda data: data.endswith(b"\n"), 5)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(controller)
    last = visible(received.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n").split("\n")[-1])
    assert last == "Stopped. 0 file(s) stored this session.", repr(received[-200:])
