"""What the program prints and how it starts and stops: real subprocesses, output read as it comes."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from conftest import ROOT, Output, chunk_fields, cli_server, encode_multipart, free_port, http_request, sha256

import pyfiledrop

pytestmark = pytest.mark.skipif(os.name == "nt", reason="sends SIGINT")
QR_BLOCK = "\u2588"


def post_chunk(port: int, upload_id: str, index: int, data: bytes, chunk_size: int, name: str) -> dict:
    fields = chunk_fields(upload_id, index, len(data), chunk_size)
    body, content_type = encode_multipart(fields, [("file", name, data[index * chunk_size:(index + 1) * chunk_size])])
    status, answer = request(port, "POST", "/upload", body, {"Content-Type": content_type})
    assert status == 200, answer
    return json.loads(answer)


def post_file(port: int, data: bytes, chunk_size: int, name: str) -> dict:
    """Every chunk of ``data`` in order under a new upload id; the last reply."""
    upload_id = str(uuid.uuid4())
    for index in range(pyfiledrop.chunk_count(len(data), chunk_size)):
        reply = post_chunk(port, upload_id, index, data, chunk_size, name)
    return reply


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    status, _, answer = http_request(port, method, path, body, headers)
    return status, answer


def folders(tmp_path) -> list[str]:
    return ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks")]


def interrupt(process: subprocess.Popen, output: Output) -> str:
    process.send_signal(signal.SIGINT)
    text = output.close()
    assert process.returncode == 0, text
    return text


# -- banner ---------------------------------------------------------------------------------------------------

def test_retired_dropzone_options_say_so_at_start(tmp_path):
    with cli_server([*folders(tmp_path), "--dz-cdn", "https://cdn.example", "--dz-version", "5.9.3"]) as (process, _):
        output = Output(process)
        output.wait_for(lambda text: "Press Ctrl+C to stop." in text)
        text = interrupt(process, output)
    assert "--dz-cdn and --dz-version are retired" in text and "ignored" in text


def test_banner_shows_version_folders_limits_every_url_and_a_qr_code(tmp_path):
    with cli_server(["--host", "0.0.0.0", *folders(tmp_path), "--max-size", "123"]) as (process, port):
        output = Output(process)
        output.wait_for(lambda text: "Press Ctrl+C to stop." in text)
        text = interrupt(process, output)
    urls = pyfiledrop.page_urls("0.0.0.0", port)
    assert urls, "at least the loopback address"
    lines = text.splitlines()
    assert lines[0] == f"pyfiledrop {pyfiledrop.__version__}"
    assert f"saving to      {tmp_path / 'storage'}" in text
    assert str(tmp_path / "chunks") in text
    assert "files up to 123 MiB" in text
    for url in urls:
        assert f"  {url}" in lines
    assert lines.index(f"  {urls[0]}") < lines.index("Press Ctrl+C to stop.")
    assert f"scan this with a phone's camera to open {urls[0]}" in text
    qr_lines = [line for line in lines if QR_BLOCK in line]
    assert len(qr_lines) >= 10 and len({len(line) for line in qr_lines}) == 1, "a square block of equal lines"
    assert lines[-1] == "Stopped. 0 file(s) stored this session."


def test_no_qr_leaves_the_code_out(tmp_path):
    with cli_server(["--no-qr", *folders(tmp_path)]) as (process, port):
        output = Output(process)
        output.wait_for(lambda text: "Press Ctrl+C to stop." in text)
        text = interrupt(process, output)
    assert f"  http://127.0.0.1:{port}/" in text.splitlines()
    assert QR_BLOCK not in text and "scan" not in text


def test_without_segno_the_qr_code_is_left_out_with_a_warning(tmp_path):
    program = (f"import runpy, sys; sys.modules['segno'] = None; sys.argv = {['pyfiledrop', *folders(tmp_path)]!r}"
               f" + ['--host', '0.0.0.0', '-p', sys.argv[1]]; runpy.run_path({str(ROOT / 'pyfiledrop.py')!r},"
               " run_name='__main__')")
    process = subprocess.Popen([sys.executable, "-c", program, str(free_port())], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output = Output(process)
    try:
        output.wait_for(lambda text: "no QR code" in text)
    finally:
        text = interrupt(process, output)
    assert re.search(r"\d\d:\d\d:\d\d warning: no QR code: the segno package is not installed", text)
    assert QR_BLOCK not in text and "Press Ctrl+C to stop." in text


def test_quiet_prints_nothing_for_a_normal_session(tmp_path):
    data = os.urandom(50_000)
    with cli_server(["--quiet", *folders(tmp_path)]) as (process, port):
        output = Output(process)
        reply = post_file(port, data, 10_000, "quiet.bin")
        assert reply["complete"]
        text = interrupt(process, output)
    assert text == ""


# -- while uploads run ----------------------------------------------------------------------------------------

def test_one_line_per_stored_file_and_no_access_log(tmp_path):
    data = os.urandom(100_000)
    with cli_server(folders(tmp_path)) as (process, port):
        output = Output(process)
        reply = post_file(port, data, 30_000, "report.pdf")
        assert request(port, "GET", "/")[0] == 200
        output.wait_for(lambda text: "stored" in text)
        text = interrupt(process, output)
    stored = [line for line in text.splitlines() if re.match(r"\d\d:\d\d:\d\d stored ", line)]
    assert len(stored) == 1, text
    assert re.fullmatch(r'\d\d:\d\d:\d\d stored "report\.pdf" 97\.66 KiB in [0-9.]+ s \([0-9.]+ MiB/s\) '
                        rf'sha256 {sha256(data)[:12]}\u2026 from 127\.0\.0\.1', stored[0]), stored[0]
    assert reply["sha256"] == sha256(data)
    assert "POST" not in text and "GET" not in text and "receiving" not in text
    assert text.splitlines()[-1] == "Stopped. 1 file(s) stored this session."


def test_verbose_logs_each_request(tmp_path):
    data = os.urandom(30_000)
    with cli_server(["--verbose", *folders(tmp_path)]) as (process, port):
        output = Output(process)
        post_file(port, data, 10_000, "v.bin")
        output.wait_for(lambda text: text.count("POST /upload 200") == 3)
        interrupt(process, output)


def test_progress_lines_for_a_slow_upload_are_throttled(tmp_path):
    """A client spreading 24 chunks over a few seconds: a few progress lines, not one per chunk."""
    chunk_size, count = 8_000, 24
    data = os.urandom(chunk_size * count)
    with cli_server(folders(tmp_path)) as (process, port):
        output = Output(process)
        upload_id = str(uuid.uuid4())
        started = time.monotonic()
        for index in range(count):
            reply = post_chunk(port, upload_id, index, data, chunk_size, "slow.bin")
            threading.Event().wait(0.15)  # pacing the client, not synchronisation
        elapsed = time.monotonic() - started
        assert reply["complete"]
        output.wait_for(lambda text: " stored " in text)
        text = interrupt(process, output)
    progress = [line for line in text.splitlines() if " receiving " in line]
    assert progress, text
    # first after 2 s, then at most one a second: a bound from the client's own clock, which runs longer
    assert len(progress) <= elapsed - 2 + 1, (elapsed, progress)
    for line in progress:
        assert re.fullmatch(r'\d\d:\d\d:\d\d receiving "slow\.bin" \d{1,2}% of 187\.5 KiB, [0-9.]+ MiB/s.*', line), line
    assert text.index(" receiving ") < text.index(" stored ")


# -- stopping and resuming ------------------------------------------------------------------------------------

def test_ctrl_c_cuts_an_upload_in_flight_and_a_restart_completes_it(tmp_path):
    chunk_size, count = 50_000, 6
    data = os.urandom(chunk_size * count - 1234)
    upload_id = str(uuid.uuid4())
    with cli_server(folders(tmp_path)) as (process, port):
        output = Output(process)
        for index in range(3):
            post_chunk(port, upload_id, index, data, chunk_size, "movie.mkv")
        # chunk 3 is half sent when Ctrl+C comes
        fields = chunk_fields(upload_id, 3, len(data), chunk_size)
        body, content_type = encode_multipart(fields, [("file", "movie.mkv", data[3 * chunk_size:4 * chunk_size])])
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        try:
            text = interrupt(process, output)
        finally:
            stalled.close()
    assert text.splitlines()[-1] == "Stopped. 0 file(s) stored this session."
    assert not list((tmp_path / "storage").iterdir())

    with cli_server(folders(tmp_path)) as (process, port):
        output = Output(process)
        status, answer = request(port, "GET", f"/api/uploads/{upload_id}")
        state = json.loads(answer)
        assert status == 200 and state["complete"] is False
        assert state["received_chunks"] == 3 and state["missing_chunks"] == [3, 4, 5]
        for index in state["missing_chunks"]:
            reply = post_chunk(port, upload_id, index, data, chunk_size, "movie.mkv")
        assert reply["complete"] and reply["sha256"] == sha256(data)
        status, answer = request(port, "GET", f"/api/uploads/{upload_id}")
        assert status == 200 and json.loads(answer)["complete"] is True
        text = interrupt(process, output)
    assert sha256((tmp_path / "storage" / "movie.mkv").read_bytes()) == sha256(data)
    assert f'resuming "movie.mkv": {pyfiledrop.human_size(3 * chunk_size)} of {pyfiledrop.human_size(len(data))} already here' in text
    assert text.splitlines()[-1] == "Stopped. 1 file(s) stored this session."


# -- start-up errors ------------------------------------------------------------------------------------------

def run_cli(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "pyfiledrop.py"), *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, cwd=tmp_path)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyfiledrop: error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0]


def test_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["--host", "127.0.0.1", "-p", str(port), *folders(tmp_path)], tmp_path)
    assert_one_line_error(result, f"port {port} is already in use")
    assert result.stdout == ""


def test_a_second_server_on_the_same_folders_is_one_clear_line(tmp_path):
    """Two servers on one chunks folder would each miss the other's uploads; the second is refused at start."""
    with cli_server(folders(tmp_path), cwd=tmp_path):
        result = run_cli(["--host", "127.0.0.1", "-p", str(free_port()), *folders(tmp_path)], tmp_path)
    assert_one_line_error(result, "another pyfiledrop is using this chunks folder")


def test_storage_that_is_a_file_is_one_clear_line(tmp_path):
    (tmp_path / "storage").write_text("not a folder")
    result = run_cli(["--host", "127.0.0.1", "-p", str(free_port()), *folders(tmp_path)], tmp_path)
    assert_one_line_error(result, "is a file, not a folder")


@pytest.mark.parametrize("args", [["--chunk-size", "0"], ["--max-size", "-1"], ["--timeout", "abc"],
                                  ["-p", "70000"], ["--partial-ttl", "nan"], ["--no-such-option"]])
def test_invalid_values_are_one_line_without_traceback(tmp_path, args):
    result = run_cli([*args, *folders(tmp_path)], tmp_path)
    assert_one_line_error(result)
    assert result.stdout == ""
    assert not (tmp_path / "storage").exists()


# -- addresses and the console, in process --------------------------------------------------------------------

def test_lan_addresses_order_and_virtual_adapters_last(monkeypatch):
    interfaces = [("lo", "127.0.0.1"), ("docker0", "172.17.0.1"), ("eth0", "192.168.1.5"),
                  ("vboxnet0", "192.168.56.1"), ("wlan0", "10.0.0.7"), ("br-4f2a", "172.18.0.1"),
                  ("veth12ab", "10.200.0.1"), ("eth1", "169.254.10.10"), ("tailscale0", "100.101.102.103"),
                  ("enp3s0", "203.0.113.9")]
    monkeypatch.setattr(pyfiledrop, "_interface_addresses", lambda: interfaces)
    monkeypatch.setattr(pyfiledrop, "_default_route_address", lambda: "10.0.0.7")
    assert pyfiledrop.lan_addresses() == ["10.0.0.7", "192.168.1.5", "203.0.113.9", "172.17.0.1",
                                          "192.168.56.1", "172.18.0.1", "10.200.0.1", "100.101.102.103"]


def test_addresses_without_interface_names_and_loopback_only(monkeypatch):
    monkeypatch.setattr(pyfiledrop, "_interface_addresses", list)
    monkeypatch.setattr(pyfiledrop, "_default_route_address", lambda: "192.168.0.20")
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [
        (socket.AF_INET, 0, 0, "", ("172.27.16.1", 0)), (socket.AF_INET, 0, 0, "", ("192.168.0.20", 0))])
    assert pyfiledrop.lan_addresses() == ["192.168.0.20", "172.27.16.1"]   # WSL's vEthernet last

    monkeypatch.setattr(pyfiledrop, "_default_route_address", lambda: None)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(socket.AF_INET, 0, 0, "", ("127.0.1.1", 0))])
    assert pyfiledrop.page_urls("0.0.0.0", 8080) == ["http://127.0.0.1:8080/"]
    assert pyfiledrop.page_urls("::1", 8080) == ["http://[::1]:8080/"]


def test_real_interfaces_are_listed_without_loopback():
    addresses = pyfiledrop.lan_addresses()
    assert all(not address.startswith("127.") for address in addresses)
    assert all(socket.inet_aton(address) for address in addresses)


def test_terminal_progress_redraws_one_status_line():
    now = [100.0]
    out = io.StringIO()
    console = pyfiledrop.Console(out, tty=True, clock=lambda: now[0])
    started = time.time()
    for received in range(1, 41):  # 40 MB in 4 s
        now[0] += 0.1
        console.handle(pyfiledrop.Progress("a", "big.iso", received * 1_000_000, 50_000_000, started))
    drawn = out.getvalue()
    assert "\n" not in drawn
    assert 1 <= drawn.count("receiving") <= 3, drawn   # from 2 s on, once a second
    assert re.search(r'\rreceiving "big\.iso" \d+% of 47\.68 MiB, [0-9.]+ MiB/s, \d+ s left\Z', drawn), drawn
    console.write("a log line")  # clears the status line, prints, draws it again below
    assert re.match(r"\r +\ra log line\nreceiving [^\r\n]+\Z", out.getvalue()[len(drawn):])
    stored = pyfiledrop.UploadInfo(id="a", name="big.iso", size=50_000_000, part_size=1, client="", created=started,
                                   updated=started, state=pyfiledrop.State.STORED, stored_name="big.iso")
    console.handle(pyfiledrop.Stored(stored))   # done: the status line goes
    console.finish("Stopped.")
    assert re.search(r" s left\r +\r\rStopped\.\n\Z", out.getvalue())


@pytest.mark.parametrize("ansi", [False, True])
def test_qr_drawing_holds_exactly_the_code_segno_made(ansi):
    segno = pytest.importorskip("segno")
    url = "http://192.168.178.23:16273/"
    expected = [[bool(module) for module in row]
                for row in segno.make(url, error="m", micro=False).matrix_iter(scale=1, border=2)]
    lines = pyfiledrop.qr_code(url, ansi=ansi)
    if ansi:
        assert all(line.startswith("\x1b[30;47m") and line.endswith("\x1b[0m") for line in lines)
        lines = [line[len("\x1b[30;47m"):-len("\x1b[0m")] for line in lines]
    # each character is two modules; drawn (foreground) halves are dark with ansi, light without
    halves = {" ": (False, False), "\u2580": (True, False), "\u2584": (False, True), "\u2588": (True, True)}
    rows = []
    for line in lines:
        cells = [halves[char] for char in line]
        rows += [[top == ansi for top, _ in cells], [bottom == ansi for _, bottom in cells]]
    assert rows[:len(expected)] == expected
    assert pyfiledrop.qr_code(url, blocks=False) == [
        "".join("  " if dark else "##" for dark in row) for row in expected]
