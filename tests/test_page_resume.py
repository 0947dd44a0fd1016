"""The page when things go wrong, in a real browser, through a proxy of ours that counts (and can slow down, or
damage) the bytes the page sends: a server killed and restarted, a reload, a file the server already has, a
byte flipped on the way, a folder, and 2,000 small files."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, free_port, running_server
from browserkit import BROWSER_MARKS, browser  # noqa: F401 (a fixture)
from test_browser import WAIT_MS
from wireproxy import WireProxy

import pyfiledrop

pytestmark = BROWSER_MARKS

MIB = 1024 * 1024


@pytest.fixture
def page(browser):
    """A page in a fresh context, whose dialogs (the warning before leaving mid-upload) are dismissed."""
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.dismiss())
    yield page
    context.close()
SETTLED = "() => window.pyfiledrop.uploads.length > 0 && window.pyfiledrop.uploads.every(u => !u.active())"


def write_file(path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def open_through(page, proxy):
    page.goto(proxy.url + "/")
    page.wait_for_function("() => window.pyfiledrop && window.pyfiledrop.ready")


def give(page, files):
    page.set_input_files("input[type=file]", files)


def settle(page, timeout=WAIT_MS):
    page.wait_for_function(SETTLED, timeout=timeout)
    return page.evaluate("window.pyfiledrop.uploads.map(u => [u.path, u.state, u.message])")


def wait_until(predicate, timeout=60.0, what="the condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        threading.Event().wait(0.02)


def upload_id(page) -> str:
    page.wait_for_function("() => window.pyfiledrop.uploads[0] && window.pyfiledrop.uploads[0].id")
    return page.evaluate("window.pyfiledrop.uploads[0].id")


def part_size(size: int) -> int:
    """The page's part size for a file of ``size`` bytes (default --chunk-size)."""
    part = pyfiledrop.DEFAULT_CHUNK_SIZE
    while part > MIB and size < part * 24:
        part = max(MIB, -(-part // 2))
    return min(part, max(1, size))


# -- a server killed mid-upload ---------------------------------------------------------------------------------

def start_program(port: int, tmp_path) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "pyfiledrop.py"), "--host", "127.0.0.1", "-p", str(port), "--no-qr",
               "-q", "-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks"), "--min-free", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening():
        assert process.poll() is None, "the server exited"
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 30, "the server to listen")
    return process


def test_a_server_killed_mid_upload_is_resumed_by_itself(page, tmp_path):
    source = tmp_path / "video.bin"
    data = write_file(source, 24 * MIB, seed=1)
    port = free_port()
    process = start_program(port, tmp_path)
    with WireProxy(port, bytes_per_second=6 * MIB) as proxy:
        try:
            open_through(page, proxy)
            give(page, [str(source)])
            the_id = upload_id(page)
            wait_until(lambda: proxy.sent > 0.4 * len(data), what="40% of the file sent")
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            ledger = pyfiledrop.Ledger(tmp_path / "chunks" / pyfiledrop.Ledger.FILENAME)
            missing = len(data) - ledger.get(the_id).received_bytes
            ledger.close()
            page.wait_for_function("() => document.getElementById('connection').textContent.includes('retrying')")
            refused = proxy.refused
            wait_until(lambda: proxy.refused > refused, what="the page to try again while the server is down")
            proxy.reset_count()
            process = start_program(port, tmp_path)
            assert settle(page) == [["video.bin", "done", ""]]
        finally:
            process.kill()
            process.wait(10)
    assert (tmp_path / "storage" / "video.bin").read_bytes() == data
    assert 0 < missing < len(data)
    assert proxy.sent <= missing + 3 * part_size(len(data)), (proxy.sent, missing)
    assert page.locator("#connection").text_content() == ""


# -- a reload, and the same file given again --------------------------------------------------------------------

def test_after_a_reload_the_same_file_sends_only_what_is_missing(browser, tmp_path):
    source = tmp_path / "photo.bin"
    data = write_file(source, 24 * MIB, seed=2)
    context = browser.new_context()
    page = context.new_page()
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.accept()))
    with running_server(tmp_path) as server, WireProxy(server.port, bytes_per_second=6 * MIB) as proxy:
        open_through(page, proxy)
        give(page, [str(source)])
        the_id = upload_id(page)
        wait_until(lambda: proxy.sent > 0.4 * len(data), what="40% of the file sent")
        page.reload()                      # the page forgets everything it was doing (after asking)
        page.wait_for_function("() => window.pyfiledrop && window.pyfiledrop.ready")
        assert dialogs == ["beforeunload"]
        proxy.reset_count()
        missing = len(data) - server.engine.info(the_id).received_bytes
        give(page, [str(source)])
        assert settle(page) == [["photo.bin", "done", ""]]
        assert upload_id(page) == the_id
    assert (tmp_path / "storage" / "photo.bin").read_bytes() == data
    assert 0 < missing < 0.8 * len(data)
    assert proxy.sent <= missing + 3 * part_size(len(data)), (proxy.sent, missing)
    context.close()


# -- the same content under another name ------------------------------------------------------------------------

def test_content_the_server_has_is_not_sent_again(page, tmp_path):
    first, second = tmp_path / "first.bin", tmp_path / "copy of first.bin"
    data = write_file(first, 40 * MIB, seed=3)
    second.write_bytes(data)
    with running_server(tmp_path) as server, WireProxy(server.port) as proxy:
        open_through(page, proxy)
        give(page, [str(first)])
        settle(page)
        proxy.bytes_per_second = MIB // 2   # the whole-file hash is known long before 5% of the bytes are sent
        proxy.reset_count()
        open_through(page, proxy)
        give(page, [str(second)])
        assert settle(page) == [["copy of first.bin", "done", ""]]
        page.wait_for_function("() => document.querySelector('#queue .pf-status').textContent.includes('sha256 checked')")
        assert "Already on the server" in page.locator("#queue .pf-status").text_content()
        assert server.engine.ledger.get(upload_id(page)).reason == "same content as first.bin"
    stored = tmp_path / "storage"
    assert os.path.samefile(stored / "first.bin", stored / "copy of first.bin")
    assert proxy.sent < 0.05 * len(data), proxy.sent


# -- a damaged byte on the way ----------------------------------------------------------------------------------

def send_with_a_damaged_byte(page, tmp_path, name, size, at, seed):
    """The page sends the file ``name`` of ``size`` random bytes; one byte at offset ``at`` is damaged on the
    way, once.  The stored bytes (the file's, or the test fails), and the server's refusals and notices."""
    marker = b"--here-a-byte-goes-bad--"
    data = bytearray(random.Random(seed).randbytes(size))
    data[at:at + len(marker)] = marker
    (tmp_path / name).write_bytes(bytes(data))
    with running_server(tmp_path) as server, WireProxy(server.port) as proxy:
        proxy.corrupt_marker = marker
        open_through(page, proxy)
        give(page, [str(tmp_path / name)])
        assert settle(page) == [[name, "done", ""]]
        events = list(server.events)
    assert proxy.corrupted == 1
    assert (tmp_path / "storage" / name).read_bytes() == bytes(data)
    return ([event.status for event in events if isinstance(event, pyfiledrop.Refused)],
            [event.text for event in events if isinstance(event, pyfiledrop.Notice) and "dropped" in event.text])


def test_a_byte_damaged_on_the_way_is_found_by_the_file_hash_and_its_part_sent_again(page, tmp_path):
    """The page sends the file's sha256 with its parts once it knows it (at the latest with the last part),
    "later" before: the server checks the parts' own hashes only when the file is complete and its hash is not
    the page's, drops the damaged part (the 4th of six 1 MiB parts), and the page sends it again."""
    refusals, dropped = send_with_a_damaged_byte(page, tmp_path, "damaged.bin", 6 * MIB, at=3 * MIB, seed=4)
    assert (refusals, dropped) == ([], ['"damaged.bin" is not the file its client hashed: part(s) 4 of 6 dropped, '
                                        'to be sent again'])


def test_a_byte_damaged_in_a_file_of_one_part_is_refused_and_sent_again(page, tmp_path):
    refusals, dropped = send_with_a_damaged_byte(page, tmp_path, "small.bin", 700 * 1024, at=300 * 1024, seed=6)
    assert (refusals, dropped) == ([460], [])


# -- a folder ---------------------------------------------------------------------------------------------------

def test_a_folder_keeps_its_structure_and_times(page, tmp_path):
    album = tmp_path / "given" / "album"
    (album / "day one" / "raw").mkdir(parents=True)
    files = {"cover.txt": b"cover", "day one/a.bin": random.Random(5).randbytes(3 * MIB),
             "day one/raw/b.txt": b"b" * 1000}
    for name, content in files.items():
        (album / name).write_bytes(content)
        os.utime(album / name, (1262304000, 1262304000))
    (tmp_path / "server").mkdir()
    with running_server(tmp_path / "server") as server, WireProxy(server.port) as proxy:
        open_through(page, proxy)
        page.set_input_files("#folder-input", str(album))
        assert sorted(state for _, state, _ in settle(page)) == ["done"] * 3
        for name, content in files.items():
            stored = server.storage / "album" / name
            assert stored.read_bytes() == content, name
            assert os.stat(stored).st_mtime == pytest.approx(1262304000, abs=1)


# -- many small files -------------------------------------------------------------------------------------------

def test_two_thousand_small_files_all_arrive_and_the_page_stays_usable(page, tmp_path):
    files = [{"name": f"note {i:04}.txt", "mimeType": "text/plain", "buffer": f"note {i}\n".encode() * 20}
             for i in range(2000)]
    with running_server(tmp_path) as server, WireProxy(server.port) as proxy:
        open_through(page, proxy)
        give(page, files)
        page.wait_for_function("() => window.pyfiledrop.totals.done > 100")
        started = time.monotonic()
        assert page.evaluate("document.querySelectorAll('#queue li').length") <= 61
        assert time.monotonic() - started < 5, "the page answers while it uploads"
        states = settle(page)
        assert page.locator("#overall").text_content().startswith("2,000 of 2,000 files uploaded")
    assert [state for _, state, _ in states] == ["done"] * 2000
    stored = sorted(os.listdir(server.storage))
    assert len(stored) == 2000 and stored[0] == "note 0000.txt"
    assert (server.storage / "note 1999.txt").read_bytes() == b"note 1999\n" * 20


# -- another file that looks the same -------------------------------------------------------------------------

def test_a_different_file_with_the_same_id_is_found_out_and_sent_whole(browser, tmp_path):
    """Same name, size, time and sampled blocks (so the same id), other bytes in between: the server's part of
    the first file is checked against the second's part hash, refused, and the second starts under its own id."""
    first = bytearray(random.Random(6).randbytes(24 * MIB))
    second = bytearray(first)
    second[200_000:300_000] = random.Random(7).randbytes(100_000)   # in part 0, away from the sampled blocks
    paths = []
    for folder, content in (("a", first), ("b", second)):
        (tmp_path / folder).mkdir()
        paths.append(tmp_path / folder / "same.bin")
        paths[-1].write_bytes(bytes(content))
        os.utime(paths[-1], (1262304000, 1262304000))
    with running_server(tmp_path) as server, WireProxy(server.port, bytes_per_second=6 * MIB) as proxy:
        context = browser.new_context()
        page = context.new_page()
        open_through(page, proxy)
        give(page, [str(paths[0])])
        first_id = upload_id(page)
        def part_zero_stored():
            try:
                return server.engine.info(first_id).part_received(0)
            except pyfiledrop.NotFound:
                return False          # not created yet

        wait_until(part_zero_stored, what="part 0 of the first file stored")
        context.close()                                   # the first device goes away mid-upload
        context = browser.new_context()
        page = context.new_page()
        open_through(page, proxy)
        proxy.bytes_per_second = None
        give(page, [str(paths[1])])
        assert settle(page) == [["same.bin", "done", ""]]
        second_id = upload_id(page)
        assert second_id != first_id
        page.wait_for_function("() => document.querySelector('#queue .pf-status').textContent.includes('checked')")
        context.close()
    assert (tmp_path / "storage" / "same.bin").read_bytes() == bytes(second)
