"""Fault tests for issue 9 (the new upload engine), black box: the real program as a subprocess, real sockets.

Written before the engine: on 1.0 most of these fail; each docstring names the observed failure it covers.
Folders on tmpfs need root (mount -t tmpfs); those tests skip without it.
"""
from __future__ import annotations

import base64
import collections
import concurrent.futures
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import chunk_fields, encode_multipart, http_request, sha256
from faultkit import (LEDGER, MIB, RECEIVING_RE, STORED_RE, Closed, StalledChunk, Stop, assert_clean,
                      chunk_count, connect, drop_server, hidden_in_storage, min_free, names,
                      post_chunk, post_files, put, put_chunked, read_response, request_head, resume_upload,
                      send_pieces, snapshot_tree, status_of, storage_contents, stray_in_chunks, tmpfs,
                      upload_chunked, wait_until)

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX sockets, signals and mounts")


def folders(tmp_path):
    return tmp_path / "storage", tmp_path / "chunks"


# -- 1. a vanished client -------------------------------------------------------------------------------------

def stall_first_chunk(drop, upload_id, piece, total_size, chunk_size, name, sent=None):
    """Chunk 0 of a new upload sends its head and half its bytes (or ``sent``), then stalls; returns once the
    server has taken the request in hand (the upload id is known), or after 5 s in case an engine only records
    it later."""
    sent = len(piece) // 2 if sent is None else sent
    stalled = StalledChunk(drop.port, upload_id, 0, piece, total_size, chunk_size, name, sent=sent)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and status_of(drop.port, upload_id)[0] == 404:
        threading.Event().wait(0.05)
    return stalled


def retry_within_10_s(drop, upload_id, index, piece, total_size, chunk_size, name):
    try:
        return post_chunk(drop.port, upload_id, index, piece, total_size, chunk_size, name, timeout=10)
    except TimeoutError:
        pytest.fail(f"the retry of stalled chunk {index} was not answered within 10 s")


def test_retry_of_a_stalled_chunk_is_accepted_at_once(tmp_path):
    """Issue 9, vanished client: a chunk request that stalls half-way (socket open, no FIN/RST) blocked its retry
    for 30 s and then answered 409; the retry must be accepted at once and the upload complete."""
    chunk_size = 4 * MIB  # over 1.0's 1 MiB read block, so the stalled request is really in the server
    data = random.Random(1).randbytes(3 * chunk_size - 1000)
    upload_id = str(uuid.uuid4())
    with drop_server(*folders(tmp_path)) as drop:
        stalled = stall_first_chunk(drop, upload_id, data[:chunk_size], len(data), chunk_size, "vanish.bin")
        try:
            status, reply = retry_within_10_s(drop, upload_id, 0, data[:chunk_size], len(data), chunk_size,
                                              "vanish.bin")
            assert status == 200, reply
            for index in (1, 2):
                status, reply = post_chunk(drop.port, upload_id, index,
                                           data[index * chunk_size:(index + 1) * chunk_size], len(data),
                                           chunk_size, "vanish.bin")
                assert status == 200, reply
            assert reply["complete"], reply
            assert reply["sha256"] == sha256(data) and reply["size"] == len(data)
            assert storage_contents(drop.storage) == {reply["name"]: data}
        finally:
            stalled.close()


@pytest.mark.parametrize("held", ["half", "all"])
def test_late_bytes_of_a_stalled_chunk_are_discarded(tmp_path, held):
    """Issue 9, vanished client: bytes of two requests for one chunk must never mix; when the stalled request
    sends its rest after the retry won, it gets 409 or a closed connection and the file keeps the retry's bytes.
    "all": the stalled request had sent every byte of its chunk, only the end of its body was missing (a fault
    sweep found it answered 200 then, as if its bytes had counted)."""
    chunk_size = 4 * MIB  # over 1.0's 1 MiB read block, so the stalled request is really in the server
    rng = random.Random(2)
    data = rng.randbytes(2 * chunk_size + 5000)
    impostor = rng.randbytes(chunk_size)  # the stalled request's payload for chunk 0: other bytes
    upload_id = str(uuid.uuid4())
    with drop_server(*folders(tmp_path)) as drop:
        stalled = stall_first_chunk(drop, upload_id, impostor, len(data), chunk_size, "mix.bin",
                                    sent=len(impostor) if held == "all" else None)
        try:
            status, reply = retry_within_10_s(drop, upload_id, 0, data[:chunk_size], len(data), chunk_size,
                                              "mix.bin")
            assert status == 200, reply
            late = stalled.resume()
            assert late is None or late[0] == 409, f"the stalled request's late bytes were accepted: {late}"
            for index in (1, 2):
                status, reply = post_chunk(drop.port, upload_id, index,
                                           data[index * chunk_size:(index + 1) * chunk_size], len(data),
                                           chunk_size, "mix.bin")
                assert status == 200, reply
            assert reply["complete"] and reply["sha256"] == sha256(data), reply
            assert storage_contents(drop.storage) == {reply["name"]: data}
        finally:
            stalled.close()


@pytest.mark.parametrize("held", ["half", "all"])
def test_a_stalled_small_file_of_one_chunk_is_taken_over_by_its_retry(tmp_path, held):
    """A small file is one chunk from the page, and such a chunk takes the engine's short way (no record, no
    claim on its range); its retry must still take a stalled request over at once, the stalled request's late
    bytes must not count, and the file must be stored once, with the retry's bytes, nothing left behind."""
    rng = random.Random(7)
    data, impostor = rng.randbytes(300_000), rng.randbytes(300_000)
    upload_id = str(uuid.uuid4())
    with drop_server(*folders(tmp_path)) as drop:
        stalled = stall_first_chunk(drop, upload_id, impostor, len(data), 8 * MIB, "one.bin",
                                    sent=len(impostor) if held == "all" else None)
        try:
            assert status_of(drop.port, upload_id)[0] == 200   # on its way, not "no such upload"
            status, reply = retry_within_10_s(drop, upload_id, 0, data, len(data), 8 * MIB, "one.bin")
            assert status == 200 and reply["complete"] and reply["sha256"] == sha256(data), reply
            late = stalled.resume()
            assert late is None or late[0] == 409, f"the stalled request's late bytes were accepted: {late}"
            assert storage_contents(drop.storage) == {"one.bin": data}
            assert status_of(drop.port, upload_id)[1]["sha256"] == sha256(data)
            assert_clean(drop)
        finally:
            stalled.close()


def test_a_small_file_of_one_chunk_cancelled_on_its_way_is_stored_nowhere(tmp_path):
    data = random.Random(8).randbytes(300_000)
    upload_id = str(uuid.uuid4())
    with drop_server(*folders(tmp_path)) as drop:
        stalled = stall_first_chunk(drop, upload_id, data, len(data), 8 * MIB, "gone.bin")
        try:
            status, _, body = http_request(drop.port, "POST", f"/api/uploads/{upload_id}/cancel", b"{}",
                                           {"Content-Type": "application/json"})
            assert status == 200 and json.loads(body)["cancelled"], body
            late = stalled.resume()
            assert late is None or late[0] == 409, f"the cancelled request's bytes were stored: {late}"
            assert storage_contents(drop.storage) == {}
            assert status_of(drop.port, upload_id)[0] == 404
            assert_clean(drop)
        finally:
            stalled.close()


# -- 2. kill -9 at any moment, then resume ---------------------------------------------------------------------

CONNECTION_GONE = (OSError, Closed, Stop, http.client.HTTPException)


class KillTrigger:
    """Calls ``action`` once, when ``after`` chunk requests have gone out (and, if ``at_last``, as one of them is
    some file's last missing chunk); from the uploading thread, so the moment is exact."""

    def __init__(self, after: int, at_last: bool, action=None):
        self.after, self.at_last, self.action = after, at_last, action
        self.sent = 0
        self.lock = threading.Lock()
        self.fired = threading.Event()

    def __call__(self, last: bool) -> None:
        with self.lock:
            self.sent += 1
            if self.fired.is_set() or self.action is None or self.sent < self.after or (self.at_last and not last):
                return
            self.fired.set()
        self.action()


def run_uploads(drop, files, chunk_size, stop, trigger, errors, done):
    """One thread per file, each resuming as the page does; returns the threads (started)."""
    def work(name, data, upload_id):
        try:
            reply = resume_upload(drop.port, upload_id, data, chunk_size, name, stop, on_chunk=trigger)
            if reply is not None:
                done[upload_id] = reply
        except CONNECTION_GONE:
            if not stop.is_set():
                errors.append(f"{name}: the connection failed while the server was up")
        except AssertionError as error:
            if not stop.is_set():
                errors.append(f"{name}: {error}")
    threads = [threading.Thread(target=work, args=file, daemon=True) for file in files]
    for thread in threads:
        thread.start()
    return threads


def test_kill_9_at_random_moments_then_resume_stores_each_file_once(tmp_path):
    """Issue 9, crash inside completion / kill -9: after kills at random moments (some aimed at completion) and
    restarts, resuming as the page does must store every file exactly once (no "X (1).bin" of the same upload),
    each id's status must name its stored file, and nothing partial may be left behind."""
    seed = int(os.environ.get("FAULTS_SEED", "11"))
    rng = random.Random(seed)
    chunk_size = MIB
    files = [(f"crash{i}.bin", rng.randbytes(rng.randint(3 * MIB, 20 * MIB)), str(uuid.uuid4())) for i in range(4)]
    storage, chunks = folders(tmp_path)
    done: dict[str, dict] = {}
    for round_ in range(6):
        final = round_ == 5
        errors: list[str] = []
        with drop_server(storage, chunks) as drop:
            stop = threading.Event()

            def kill(drop=drop, stop=stop):
                stop.set()
                drop.process.kill()

            def kill_soon(delay=rng.uniform(0, 0.03)):  # a random moment inside the chunk request going out
                threading.Timer(delay, kill).start()

            # odd rounds aim at completion (just as some file's last chunk goes out), even ones at a random chunk
            trigger = KillTrigger(rng.randint(1, 12), bool(round_ % 2), None if final else kill_soon)
            threads = run_uploads(drop, files, chunk_size, stop, trigger, errors, done)
            for thread in threads:
                thread.join(120)
            if not final:
                print(f"round {round_}: killed={trigger.fired.is_set()} after {trigger.sent} chunk requests, "
                      f"{len(done)} of {len(files)} files complete")
                kill()
                drop.process.wait(10)
            assert not any(thread.is_alive() for thread in threads), "an upload hung"
            assert not errors, f"round {round_} (seed {seed}): {errors}"
            if final:
                statuses = {upload_id: status_of(drop.port, upload_id) for _, _, upload_id in files}
                stray_running = stray_in_chunks(chunks)
    expected = {name: data for name, data, _ in files}
    stored = storage_contents(storage)
    assert sorted(stored) == sorted(expected), f"seed {seed}: storage holds {sorted(stored)}"
    for name, data in expected.items():
        assert stored[name] == data, f"seed {seed}: {name} differs from what was sent"
    for name, data, upload_id in files:
        status, reply = statuses[upload_id]
        assert status == 200 and reply.get("complete") and reply.get("available"), (name, status, reply)
        assert reply["name"] == name and reply["sha256"] == sha256(data), (name, reply)
    assert not stray_running, f"the chunks folder holds more than the ledger: {sorted(stray_running)}"
    assert_clean(storage, chunks)


# -- 3. disk reservation is no denial of service ----------------------------------------------------------------

def _received_not_stored(storage: Path, chunks: Path, protocol: str, data: bytes) -> str:
    """The state a kill leaves between the last bytes' record and completion: every byte received and recorded,
    nothing stored yet; made by the engine itself (in this process), then let go of as a kill would."""
    storage.mkdir(parents=True, exist_ok=True)
    chunks.mkdir(parents=True, exist_ok=True)
    import pyfiledrop
    engine = pyfiledrop.open_engine(pyfiledrop.parse_args(["-s", str(storage), "-c", str(chunks), "-q"]))
    upload_id = str(uuid.uuid4()) if protocol == "chunks" else uuid.uuid4().hex
    part = MIB if protocol == "chunks" else len(data)
    engine.create(upload_id, "all-here.bin", size=len(data), part_size=part, client="127.0.0.1")
    for offset in range(0, len(data), part):
        engine.put(upload_id, offset, [data[offset:offset + part]], length=len(data[offset:offset + part]),
                   atomic=protocol == "chunks", keep_if_empty=protocol == "tus")
    assert engine.info(upload_id).fully_received and not names(storage)
    engine.ledger.close()
    return upload_id


@pytest.mark.parametrize("protocol", ["tus", "chunks"])
def test_an_upload_with_every_byte_recorded_before_a_kill_is_stored_after_the_restart(tmp_path, protocol):
    """Found by a fault sweep: a tus upload killed after its last bytes were recorded, before completion, told
    HEAD "Upload-Offset == Upload-Length" after the restart (so tuspy and tus-js-client consider it done) but
    was never stored: only a status request completed it, which a tus client never sends, and after
    --partial-ttl it was gone.  The restarted server must store it by itself, once, and HEAD must say so."""
    data = os.urandom(3 * MIB + 5)
    storage, chunks = folders(tmp_path)
    upload_id = _received_not_stored(storage, chunks, protocol, data)
    with drop_server(storage, chunks) as drop:
        wait_until(lambda: (storage / "all-here.bin").exists() and not stray_in_chunks(chunks), 30,
                   "the upload stored without a request")
        assert storage_contents(storage) == {"all-here.bin": data}
        if protocol == "tus":
            status, reply, _ = drop.request("HEAD", f"/tus/{upload_id}", None, {"Tus-Resumable": "1.0.0"})
            assert status == 200 and reply["Upload-Offset"] == reply["Upload-Length"] == str(len(data)), reply
        status, reply = status_of(drop.port, upload_id)
        assert status == 200 and reply["complete"] and reply["sha256"] == sha256(data), reply
        assert_clean(drop)


@pytest.mark.slow
def test_declared_sizes_that_never_arrive_do_not_block_an_honest_upload(tmp_path):
    """Issue 9, reservation DoS: 1.0 preallocates the declared size, so requests that declare 33 MiB and send one
    byte (stalled, or completed as a one-byte chunk: 400) fill a 96 MiB disk and an honest 40 MiB upload gets 507."""
    size, chunk_size = 33 * MIB, 8 * MIB
    with tmpfs(tmp_path / "disk", "96m") as disk, \
            drop_server(disk / "storage", disk / "chunks", *min_free("1M")) as drop:
        stalled, refusals = [], []
        try:
            for _ in range(10):
                stalled.append(StalledChunk(drop.port, str(uuid.uuid4()), 0, b"s" * chunk_size, size, chunk_size,
                                            "claim.bin", sent=1))
            deadline = time.monotonic() + 5  # let the server take them in hand (an engine may not record them)
            while time.monotonic() < deadline and any(status_of(drop.port, s.upload_id)[0] == 404 for s in stalled):
                threading.Event().wait(0.05)
            for _ in range(10):
                refusals.append(post_chunk(drop.port, str(uuid.uuid4()), 0, b"x", size, chunk_size, "short.bin"))
            honest = random.Random(3).randbytes(40 * MIB)
            status, reply = upload_chunked(drop.port, honest, chunk_size, "honest.bin")
            assert status == 200, f"honest 40 MiB upload refused: {status} {reply}"
            assert reply["complete"] and reply["sha256"] == sha256(honest), reply
            assert [status for status, _ in refusals] == [400] * 10, refusals
        finally:
            for request in stalled:
                request.close()


@pytest.mark.parametrize("how", ["put", "chunked"])
def test_min_free_refuses_an_upload_that_would_leave_too_little(tmp_path, how):
    """Issue 9, --min-free: on a 64 MiB disk with --min-free 32M a 40 MiB upload is refused 507 with a plain
    message and leaves nothing behind, while a 10 KiB upload is stored."""
    big = random.Random(4).randbytes(40 * MIB)
    with tmpfs(tmp_path / "disk", "64m") as disk, \
            drop_server(disk / "storage", disk / "chunks", *min_free("32M")) as drop:
        if how == "put":
            status, reply = put(drop.port, "big.bin", big)
        else:
            status, reply = upload_chunked(drop.port, big, 8 * MIB, "big.bin")
        assert status == 507, (status, reply)
        assert isinstance(reply, str) and reply.strip() and "\n" not in reply.strip(), repr(reply)
        assert names(drop.storage) == set(), f"left in storage: {names(drop.storage)}"
        assert_clean(drop)
        small = os.urandom(10 * 1024)
        status, reply = put(drop.port, "small.bin", small)
        assert status == 200 and reply["sha256"] == sha256(small), (status, reply)
        assert storage_contents(drop.storage) == {"small.bin": small}


# -- 4. leftovers ------------------------------------------------------------------------------------------------

def assert_ledger(chunks):
    ledger = chunks / LEDGER
    assert ledger.is_file(), f"no {LEDGER} in the chunks folder: {sorted(names(chunks))}"
    assert ledger.read_bytes()[:16] == b"SQLite format 3\0", "the ledger is not an SQLite database"


def test_the_chunks_folder_holds_only_the_ledger_and_parts_of_uploads_under_way(tmp_path):
    """Issue 9, leftovers: 1.0 keeps ID.done per stored upload, ID.state (and ID.state.*.tmp after a kill) and the
    preallocated .part of a refused one-chunk upload; only the ledger and .part files of uploads still receiving
    may be there, and storage never holds hidden files."""
    storage, chunks = folders(tmp_path)
    chunk_size = 64 * 1024
    rng = random.Random(5)
    with drop_server(storage, chunks) as drop:
        assert upload_chunked(drop.port, rng.randbytes(3 * chunk_size + 7), chunk_size, "multi.bin")[0] == 200
        assert upload_chunked(drop.port, rng.randbytes(1000), chunk_size, "one.bin")[0] == 200
        assert put(drop.port, "put.bin", rng.randbytes(5000))[0] == 200
        assert post_files(drop.port, [("form.bin", rng.randbytes(3000))])[0] == 200
        assert_clean(drop)
        assert_ledger(chunks)
        # refusals: a one-chunk upload whose body is shorter than declared, a chunk past the last one, bad fields
        status, reply = post_chunk(drop.port, str(uuid.uuid4()), 0, b"short", 2 * MIB, 4 * MIB, "short.bin")
        assert status == 400, (status, reply)
        status, reply = post_chunk(drop.port, str(uuid.uuid4()), 0, b"short", 300_000, 100_000, "short3.bin")
        assert status == 400, (status, reply)
        body, content_type = encode_multipart({**chunk_fields("bad-fields", 0, 100, 10), "dzchunkindex": "x"},
                                              [("file", "bad.bin", b"0123456789")])
        assert http_request(drop.port, "POST", "/upload", body, {"Content-Type": content_type})[0] == 400
        assert_clean(drop)
        # an upload under way: its .part may stay, and through a kill -9 and a restart
        data = rng.randbytes(4 * chunk_size)
        upload_id = str(uuid.uuid4())
        for index in (0, 1):
            assert post_chunk(drop.port, upload_id, index, data[index * chunk_size:(index + 1) * chunk_size],
                              len(data), chunk_size, "later.bin")[0] == 200
        assert_clean(drop, parts_allowed=True)
        drop.kill9()
    assert_clean(storage, chunks, parts_allowed=True)
    with drop_server(storage, chunks) as drop:
        status, reply = status_of(drop.port, upload_id)
        assert status == 200 and reply["missing_chunks"] == [2, 3], (status, reply)
        assert_clean(drop, parts_allowed=True)
        for index in (2, 3):
            status, reply = post_chunk(drop.port, upload_id, index, data[index * chunk_size:(index + 1) * chunk_size],
                                       len(data), chunk_size, "later.bin")
            assert status == 200, reply
        assert reply["complete"] and reply["sha256"] == sha256(data)
        assert_clean(drop)
        assert_ledger(chunks)
    assert sorted(names(storage)) == ["form.bin", "later.bin", "multi.bin", "one.bin", "put.bin"]


# -- 5. progress by bytes ----------------------------------------------------------------------------------------

def assert_progress(output, name, elapsed):
    """At least two rising "receiving" lines for ``name`` before its "stored" line, at most about one a second."""
    stored = output.wait_for_line(lambda line: (m := STORED_RE.match(line)) and m["name"] == name)
    lines = output.lines[:output.lines.index(stored)]
    percents = [int(m["percent"]) for line in lines if (m := RECEIVING_RE.match(line)) and m["name"] == name]
    assert len(percents) >= 2, f"progress lines for {name}: {percents}; output:\n{output.text}"
    assert percents == sorted(percents) and percents[-1] > percents[0], percents
    assert len(percents) <= elapsed + 2, f"{len(percents)} progress lines in {elapsed:.1f} s"


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("size, rate", [(13_000_000, "3M"), (1_000_000, "200K")], ids=["12 MB", "1 MB"])
def test_a_slow_put_shows_progress_as_bytes_arrive(tmp_path, size, rate):
    """Issue 9, progress by bytes: 1.0 counts progress in finished chunks, so a PUT (one request) of 12 MB taking
    4 s printed no progress at all.  A file small enough for the short way of one request (up to 1 MiB) can
    take seconds on a poor link too."""
    source = tmp_path / "upload.bin"
    source.write_bytes(os.urandom(size))  # ~4-5 s at the rate
    with drop_server(*folders(tmp_path)) as drop:
        started = time.monotonic()
        done = subprocess.run(["curl", "-sS", "--fail", "--limit-rate", rate, "-T", str(source),
                               f"http://127.0.0.1:{drop.port}/upload/slowput.bin"],
                              capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert_progress(drop.output, "slowput.bin", elapsed)
        assert (drop.storage / "slowput.bin").read_bytes() == source.read_bytes()


def test_progress_moves_within_one_chunk(tmp_path):
    """Issue 9, progress by bytes: one 12 MB chunk (chunk size 16 MiB) sent at ~2.6 MB/s (~4.6 s) printed no
    progress on 1.0, which only counts finished chunks."""
    data = os.urandom(12_000_000)
    chunk_size = 16 * MIB
    body, content_type = encode_multipart(chunk_fields(str(uuid.uuid4()), 0, len(data), chunk_size),
                                          [("file", "slowchunk.bin", data)])
    with drop_server(*folders(tmp_path)) as drop:
        started = time.monotonic()
        with connect(drop.port) as sock:
            sock.sendall(request_head("POST", "/upload", {"Content-Type": content_type}, len(body)))
            assert send_pieces(sock, body, piece=256 * 1024, pause=0.1), "the server answered early"
            status, _, answer = read_response(sock)
        elapsed = time.monotonic() - started
        assert status == 200, answer
        assert_progress(drop.output, "slowchunk.bin", elapsed)


# -- 6. storage and chunks on different disks -----------------------------------------------------------------

def fill_leaving(folder, free_after: int):
    """A filler file in ``folder`` that leaves about ``free_after`` bytes free on its disk."""
    filler = folder / "filler.bin"
    size = shutil.disk_usage(folder).free - free_after
    with open(filler, "wb") as handle:
        for _ in range(size // MIB):
            handle.write(b"\0" * MIB)
        handle.write(b"\0" * (size % MIB))
    return filler


@pytest.mark.parametrize("filler", ["before", "during"])
def test_storage_on_a_small_other_disk_refuses_what_does_not_fit_and_leaves_nothing(tmp_path, filler):
    """Issue 9, different disks: 1.0 copies a finished file into storage under a hidden .pyfiledrop-*.tmp name
    and leaves it there when the disk fills; two 8 MB uploads that do not fit (the filler written before they
    start, or while they arrive) must be refused 507 with nothing in storage but the filler, a 10-byte upload
    must work once the filler is gone, and after a restart nothing stray may remain."""
    chunk_size = MIB
    uploads = [(f"big{i}.bin", random.Random(10 + i).randbytes(8_000_000), str(uuid.uuid4())) for i in range(2)]
    chunks = tmp_path / "chunks"
    with tmpfs(tmp_path / "small", "16m") as storage:
        with drop_server(storage, chunks) as drop:
            last = chunk_count(8_000_000, chunk_size) - 1
            if filler == "before":
                fill = fill_leaving(storage, 6 * MIB)
            statuses = []
            for name, data, upload_id in uploads:
                for index in range(last):
                    status, reply = post_chunk(drop.port, upload_id, index,
                                               data[index * chunk_size:(index + 1) * chunk_size], len(data),
                                               chunk_size, name)
                    if status != 200:
                        break
                statuses.append(status)
            if filler == "during":
                assert statuses == [200, 200], statuses
                fill = fill_leaving(storage, 6 * MIB)
                statuses = [post_chunk(drop.port, upload_id, last, data[last * chunk_size:], len(data), chunk_size,
                                       name)[0] for name, data, upload_id in uploads]
            assert statuses == [507, 507], statuses
            assert names(storage) == {"filler.bin"}, f"storage holds {sorted(names(storage))}"
            fill.unlink()
            status, reply = put(drop.port, "ten.txt", b"0123456789")
            assert status == 200 and reply["name"] == "ten.txt", (status, reply)
            drop.process.terminate()
            drop.process.wait(10)
        with drop_server(storage, chunks) as drop:
            assert status_of(drop.port, reply["id"])[1].get("available") is True
            # An upload refused at completion keeps its bytes, and a restart with room stores it (as would the
            # client's retry, or its status request: asked here, so each one is settled, stored or refused).
            settled = {name: status_of(drop.port, upload_id)[1] for name, data, upload_id in uploads}
            stored = {name: data for name, data, _ in uploads
                      if isinstance(settled[name], dict) and settled[name].get("complete")}
            assert storage_contents(storage) == {"ten.txt": b"0123456789", **stored}
            assert not stray_in_chunks(chunks, parts_allowed=True), sorted(names(chunks))


@pytest.mark.parametrize("layout", ["one disk", "storage elsewhere"])
@pytest.mark.parametrize("how", ["put", "form"])
@pytest.mark.parametrize("slack", [0, 8192])
def test_a_file_that_leaves_the_ledger_no_room_is_507_and_leaves_nothing(tmp_path, layout, how, slack):
    """Found by a fault sweep: a PUT (or one multipart file) whose bytes filled the chunks disk, so that the
    ledger could not record it, was answered 500 and left the whole file in storage without a record (a retry
    on another disk left a second copy, "f (1).bin"); it must be 507, with storage and the chunks folder as
    before, and a small upload must work once the space is back."""
    with tmpfs(tmp_path / "small", "20m") as disk:
        storage = disk / "storage" if layout == "one disk" else tmp_path / "storage"
        with drop_server(storage, disk / "chunks", *min_free("0")) as drop:
            for attempt in range(2):
                free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
                data = os.urandom(free - slack)  # the ledger then has less room than a record needs
                if how == "put":
                    status, reply = put(drop.port, "f.bin", data)
                else:
                    status, reply = post_files(drop.port, [("f.bin", data)])
                assert status == 507, (attempt, status, reply)
                assert not names(storage), f"storage holds {sorted(names(storage))}"
                assert_clean(drop)
            status, reply = put(drop.port, "ten.txt", b"0123456789")
            assert status == 200 and reply["name"] == "ten.txt", (status, reply)
            assert storage_contents(storage) == {"ten.txt": b"0123456789"}


def test_a_small_put_that_leaves_the_ledger_no_room_is_507_and_leaves_nothing(tmp_path):
    """The same for a file small enough for the short way of one request: its name is taken back."""
    with tmpfs(tmp_path / "small", "1m") as disk:
        with drop_server(disk / "storage", disk / "chunks", *min_free("0")) as drop:
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            assert free <= MIB  # small enough for the short way
            status, reply = put(drop.port, "f.bin", os.urandom(free))
            assert status == 507, (status, reply)
            assert not names(drop.storage), f"storage holds {sorted(names(drop.storage))}"
            assert_clean(drop)
            status, reply = put(drop.port, "ten.txt", b"0123456789")
            assert status == 200 and reply["name"] == "ten.txt", (status, reply)
            assert storage_contents(drop.storage) == {"ten.txt": b"0123456789"}


# -- 7. console lines for failures ----------------------------------------------------------------------------

def refusal_lines(output, mark, name, *reasons):
    """New console lines since ``mark`` naming ``name``, one of ``reasons`` (lowercase) and the client."""
    def matches(line):
        low = line.lower()
        return name in line and "127.0.0.1" in line and any(reason in low for reason in reasons)
    wait_until(lambda: any(matches(line) for line in output.since(mark)), 10, f"a console line about {name}")
    return [line for line in output.since(mark) if matches(line)]


@pytest.mark.parametrize("how", ["put", "chunked"])
def test_an_upload_into_a_deleted_storage_folder_is_reported_on_the_console(tmp_path, how):
    """Issue 9, silent failures: with the storage folder deleted while the server runs, 1.0 answered 500 and
    printed nothing; the upload must either succeed (folder recreated, the usual "stored" line) or fail with a 5xx
    and a console line saying it failed."""
    with drop_server(*folders(tmp_path)) as drop:
        shutil.rmtree(drop.storage)
        mark = len(drop.output.lines)
        data = os.urandom(200_000)
        if how == "put":
            status, reply = put(drop.port, "orphan.bin", data)
        else:
            status, reply = upload_chunked(drop.port, data, 64 * 1024, "orphan.bin")
        if status == 200:
            drop.output.wait_for_line(lambda line: (m := STORED_RE.match(line)) and m["name"] == "orphan.bin",
                                      start=mark)
            assert (drop.storage / reply["name"]).read_bytes() == data
        else:
            assert 500 <= status < 600, (status, reply)
            drop.output.wait_for_line(lambda line: "failed" in line.lower() or "error" in line.lower(),
                                      timeout=10, start=mark)


@pytest.mark.parametrize("how", ["put", "chunked"])
def test_a_413_refusal_prints_one_line_naming_file_reason_and_client(tmp_path, how):
    """Issue 9, silent refusals: 1.0 printed nothing when it refused an upload over --max-size; one line must say
    what (the name), why (413 / too large) and from whom (the address)."""
    with drop_server(*folders(tmp_path), "--max-size", "1") as drop:
        mark = len(drop.output.lines)
        data = os.urandom(2 * MIB)
        if how == "put":
            status, reply = put(drop.port, "huge.bin", data)
        else:
            status, reply = post_chunk(drop.port, str(uuid.uuid4()), 0, data[:MIB], len(data), MIB, "huge.bin")
        assert status == 413, (status, reply)
        lines = refusal_lines(drop.output, mark, "huge.bin", "413", "too large")
        assert len(lines) == 1, lines


def test_a_507_refusal_prints_one_line_naming_file_reason_and_client(tmp_path):
    """Issue 9, silent refusals: 1.0 printed nothing when it refused an upload for lack of disk space; one line
    must say what (the name), why (507 / space) and from whom (the address)."""
    with tmpfs(tmp_path / "disk", "16m") as disk, drop_server(disk / "storage", disk / "chunks") as drop:
        mark = len(drop.output.lines)
        status, reply = put(drop.port, "toobig.bin", os.urandom(20 * MIB))
        assert status == 507, (status, reply)
        lines = refusal_lines(drop.output, mark, "toobig.bin", "507", "space")
        assert len(lines) == 1, lines


# -- 8. names ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["%FF%FE.txt", ".hidden"])
def test_a_name_that_would_hide_the_file_is_stored_under_a_visible_name(tmp_path, name):
    """Issue 9, names: PUT /upload/%FF%FE.txt (invalid UTF-8) was stored as a hidden ".txt" on 1.0, and ".hidden"
    as is; the stored name must be visible and the reply must name the file that exists in storage."""
    with drop_server(*folders(tmp_path)) as drop:
        status, reply = put(drop.port, name, b"bytes")
        assert status == 200, (status, reply)
        assert not reply["name"].startswith("."), reply
        assert (drop.storage / reply["name"]).read_bytes() == b"bytes"
        assert not hidden_in_storage(drop.storage), sorted(names(drop.storage))


def test_a_numbered_name_has_one_space_before_the_number(tmp_path):
    """Issue 9, names: "name with spaces .txt" uploaded twice became "name with spaces  (1).txt" (two spaces) on
    1.0; the second copy must be "name with spaces (1).txt"."""
    with drop_server(*folders(tmp_path)) as drop:
        first = put(drop.port, "name%20with%20spaces%20.txt", b"one")
        second = put(drop.port, "name%20with%20spaces%20.txt", b"two")
        assert first[0] == 200 and second[0] == 200, (first, second)
        assert second[1]["name"] == "name with spaces (1).txt", second
        assert (drop.storage / "name with spaces (1).txt").read_bytes() == b"two"
        assert first[1]["name"] != second[1]["name"]


def test_twenty_uploads_leave_no_record_files_in_the_chunks_folder(tmp_path):
    """Issue 9, names/records: 1.0 keeps one ID.done per stored upload in the chunks folder; after 20 uploads it
    may hold only the ledger files."""
    with drop_server(*folders(tmp_path)) as drop:
        for i in range(20):
            if i % 2:
                assert put(drop.port, f"n{i}.bin", os.urandom(100 + i))[0] == 200
            else:
                assert upload_chunked(drop.port, os.urandom(3000 + i), 1024, f"n{i}.bin")[0] == 200
        assert len(names(drop.storage)) == 20
        assert_clean(drop)


# -- 9. unknown length -------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_a_chunked_put_from_curl_stdin_is_stored(tmp_path):
    """Issue 9, unknown length: `curl -T - URL` (Transfer-Encoding: chunked, no Content-Length) got 411 on 1.0;
    it must be stored with the size of what was sent and its sha256."""
    data = os.urandom(3 * MIB + 17)
    with drop_server(*folders(tmp_path)) as drop:
        done = subprocess.run(["curl", "-sS", "--fail-with-body", "-T", "-", f"http://127.0.0.1:{drop.port}/upload/stdin.bin"],
                              input=data, capture_output=True, timeout=60)
        assert done.returncode == 0, (done.stderr, done.stdout[:300])
        reply = json.loads(done.stdout)
        assert reply["size"] == len(data) and reply["sha256"] == sha256(data), reply
        assert (drop.storage / reply["name"]).read_bytes() == data


def test_a_chunked_put_over_raw_framing_is_stored(tmp_path):
    """Issue 9, unknown length: a PUT in HTTP chunked framing (odd frame sizes) got 411 on 1.0."""
    data = os.urandom(1_000_003)
    with drop_server(*folders(tmp_path)) as drop:
        status, reply = put_chunked(drop.port, "framed.bin", data, piece=65_537)
        assert status == 200, (status, reply)
        assert reply["size"] == len(data) and reply["sha256"] == sha256(data), reply
        assert storage_contents(drop.storage) == {reply["name"]: data}
        status, reply = put_chunked(drop.port, "empty.bin", b"")
        assert status == 200 and reply["size"] == 0, (status, reply)


def test_a_chunked_put_over_max_size_is_413_and_leaves_nothing(tmp_path):
    """Issue 9, unknown length: a chunked PUT larger than --max-size 1 must be refused 413, leave no file behind,
    and the server must keep serving."""
    with drop_server(*folders(tmp_path), "--max-size", "1") as drop:
        status, reply = put_chunked(drop.port, "over.bin", os.urandom(3 * MIB))
        assert status == 413, (status, reply)
        assert names(drop.storage) == set()
        assert_clean(drop)
        status, reply = put(drop.port, "after.bin", b"still here")
        assert status == 200, (status, reply)


# -- 10. 1.0 folders migrate ---------------------------------------------------------------------------------------

def write_1_0_partial(chunks, upload_id, name, data, chunk_size, received):
    """ID.part preallocated to the full size with the ``received`` chunks at their offsets, and ID.state as 1.0's
    _Upload.state() writes it (bit i of the little-endian bitmap: chunk i is on disk)."""
    total = chunk_count(len(data), chunk_size)
    with open(chunks / f"{upload_id}.part", "wb") as handle:
        handle.truncate(len(data))
        for index in received:
            handle.seek(index * chunk_size)
            handle.write(data[index * chunk_size:(index + 1) * chunk_size])
    bitmap = sum(1 << index for index in received).to_bytes((total + 7) // 8, "little")
    state = {"v": 1, "id": upload_id, "name": name, "size": len(data), "chunk_size": chunk_size,
             "total_chunks": total, "received": base64.b64encode(bitmap).decode("ascii"), "started": time.time(),
             "client": "127.0.0.1"}
    (chunks / f"{upload_id}.state").write_text(json.dumps(state, separators=(",", ":")), encoding="utf-8")


def write_1_0_stored(storage, chunks, upload_id, name, data, chunk_size):
    """The file in storage and ID.done as 1.0's _store writes it."""
    (storage / name).write_bytes(data)
    record = {"id": upload_id, "name": name, "original_name": name, "size": len(data), "sha256": sha256(data),
              "chunk_size": chunk_size, "total_chunks": chunk_count(len(data), chunk_size),
              "completed": time.time()}
    (chunks / f"{upload_id}.done").write_text(json.dumps(record, separators=(",", ":")), encoding="utf-8")


def test_folders_of_1_0_migrate(tmp_path):
    """Issue 9, migration: a chunks folder in 1.0's layout (ID.part + ID.state for an upload under way, ID.done
    for a stored one) must keep working on the new engine: the partial upload lists exactly its missing chunks
    and completes, the stored one answers complete and available, and no .state/.done files remain."""
    storage, chunks = folders(tmp_path)
    storage.mkdir()
    chunks.mkdir()
    chunk_size = 64 * 1024
    rng = random.Random(6)
    partial = rng.randbytes(5 * chunk_size + 123)  # 6 chunks
    stored = rng.randbytes(100_000)
    write_1_0_partial(chunks, "legacy-partial", "old partial.bin", partial, chunk_size, received=[0, 2, 3])
    write_1_0_stored(storage, chunks, "legacy-done", "old done.bin", stored, chunk_size)
    with drop_server(storage, chunks) as drop:
        status, reply = status_of(drop.port, "legacy-done")
        assert status == 200, (status, reply)
        assert reply["complete"] and reply["available"] is True, reply
        assert reply["name"] == "old done.bin" and reply["sha256"] == sha256(stored), reply
        status, reply = status_of(drop.port, "legacy-partial")
        assert status == 200 and not reply["complete"], (status, reply)
        assert reply["missing_chunks"] == [1, 4, 5], reply
        for index in (1, 4, 5):
            status, reply = post_chunk(drop.port, "legacy-partial", index,
                                       partial[index * chunk_size:(index + 1) * chunk_size], len(partial),
                                       chunk_size, "old partial.bin")
            assert status == 200, (status, reply)
        assert reply["complete"] and reply["sha256"] == sha256(partial), reply
        assert (storage / reply["name"]).read_bytes() == partial
        status, reply = status_of(drop.port, "legacy-done")
        assert status == 200 and reply["available"] is True, reply
        left = {name for name in names(chunks) if name.endswith((".state", ".done"))}
        assert not left, f"1.0 record files left in the chunks folder: {sorted(left)}"
        assert_clean(drop)


# -- 11. robustness ---------------------------------------------------------------------------------------------------

def test_a_hundred_concurrent_small_uploads_are_each_stored_once(tmp_path):
    """Issue 9, robustness: 100 small uploads at once (chunked, PUT and multipart) are all stored exactly once
    with the bytes sent."""
    rng = random.Random(7)
    files = {f"c{i:03d}.bin": rng.randbytes(rng.randint(0, 200_000)) for i in range(100)}

    def send(item):
        position, (name, data) = item
        kind = position % 3
        if kind == 0:
            return upload_chunked(port, data, 16 * 1024, name)
        if kind == 1:
            return put(port, name, data)
        return post_files(port, [(name, data)])

    with drop_server(*folders(tmp_path)) as drop:
        port = drop.port
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            results = list(pool.map(send, enumerate(files.items()), timeout=120))
        for (name, data), (status, reply) in zip(files.items(), results):
            assert status == 200 and reply["name"] == name and reply["sha256"] == sha256(data), (name, status, reply)
        assert storage_contents(drop.storage) == files


def fuzz_request(rng: random.Random) -> bytes:
    """One hostile request, as raw bytes."""
    names_ = ["../../escape.txt", "..\\..\\win.txt", "/etc/passwd", "%2e%2e%2fx", "\u202egpj.exe", "a" * 300,
              "CON", "名前.txt", ".hidden", "", "x\x00y", "%00", "%FF%FE", "~/home.txt", "..", "."]
    numbers = ["0", "-1", "1e9", "99999999999999999999999", str(2 ** 64), " 7", "0x10", "", "NaN", "١٢"]
    roll = rng.random()
    if roll < 0.45:  # most of them reach the upload handlers
        method, path = "POST", rng.choice(["/upload", "/upload?x=1", "/upload/"])
    elif roll < 0.75:
        method, path = "PUT", "/upload/" + rng.choice(names_ + [quote(name) for name in names_])
    else:
        method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "BREW", "P\x00T"])
        path = rng.choice(["/upload/" + rng.choice(names_), "/api/uploads/" + rng.choice(names_),
                           "/download/" + rng.choice(names_), "/assets/../pyfiledrop.py", "/" + "x" * 5000, "*",
                           "/%2e%2e/%2e%2e/etc/passwd", "/api/uploads/", "http://evil/upload"])
    kind = rng.randrange(5)
    headers: dict[str, str] = {}
    if kind == 0:  # a chunk request with hostile fields
        fields = chunk_fields(rng.choice(["ok-id", "../x", "a" * 100, "", "id with space"]), 0, 1000, 100)
        for key in rng.sample(sorted(fields), rng.randint(1, 3)):
            fields[key] = rng.choice(numbers)
        files = [("file", rng.choice(names_), rng.randbytes(rng.randint(0, 500)))]
        body, content_type = encode_multipart(fields, files, files_first=rng.random() < 0.3)
        headers["Content-Type"] = content_type
    elif kind == 1:  # malformed multipart
        boundary = rng.choice(["b", "", "x" * 300, "é"])
        body = rng.choice([b"--b\r\n\r\n", b"garbage", b"--b--", b"--b\r\nContent-Disposition: form-data; name=file; "
                           b"filename=../../x\r\n\r\nDATA", rng.randbytes(rng.randint(0, 2000))])
        headers["Content-Type"] = rng.choice([f"multipart/form-data; boundary={boundary}", "multipart/form-data",
                                              "text/plain", "multipart/form-data; boundary=\"b\"; charset=utf-7"])
    elif kind == 2:  # random bytes as the body
        body = rng.randbytes(rng.randint(0, 4000))
    elif kind == 3:  # bad framing
        body = rng.randbytes(rng.randint(0, 300))
        headers["Transfer-Encoding"] = rng.choice(["chunked", "gzip", "chunked, chunked", "identity"])
        if rng.random() < 0.5:
            body = rng.choice([b"zz\r\n", b"5\r\nab\r\n0\r\n\r\n", b"ffffffffffffffff\r\n", b""]) + body
    else:  # odd headers
        body = b""
        headers[rng.choice(["X-\u00e9", "Host", "Expect", "Range", "If-None-Match"])] = rng.choice(
            ["100-continue", "bytes=-1", "\u00ff" * 10, "x" * 9000])
    length = rng.choice([len(body), len(body), len(body) + rng.randint(1, 1000), max(0, len(body) - 7), None,
                         "-5", "abc", "1e3", "99999999999999999999"])
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{key}: {value}" for key, value in headers.items()]
    return "\r\n".join(lines).encode("utf-8", "surrogateescape") + b"\r\n\r\n" + body


def test_five_hundred_fuzzed_requests_get_sane_answers(tmp_path):
    """Issue 9, robustness: hostile requests must each get an answer under 500 or a closed connection, never a
    traceback or a server path, write nothing outside the storage and chunks folders, and leave the server
    serving."""
    seed = int(os.environ.get("FAULTS_SEED", "11"))
    rng = random.Random(seed)
    storage, chunks = folders(tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = snapshot_tree(tmp_path, {storage, chunks})
    secrets = [str(tmp_path), str(Path(__file__).resolve().parent.parent), "Traceback", "File \""]
    problems, answers = [], collections.Counter()
    with drop_server(storage, chunks, cwd=cwd) as drop:
        for number in range(500):
            raw = fuzz_request(rng)
            with connect(drop.port, timeout=10) as sock:
                try:
                    sock.sendall(raw)
                    sock.shutdown(socket.SHUT_WR)  # the end of what this client sends: no waiting on it
                except OSError:
                    pass
                try:
                    status, _, body = read_response(sock, timeout=10)
                except Closed:
                    answers["closed"] += 1
                    continue
                except TimeoutError:
                    problems.append((number, "no answer within 10 s", raw[:200]))
                    continue
            answers[status] += 1
            text = body.decode("utf-8", "replace")
            if status >= 500 or any(secret in text for secret in secrets):
                problems.append((number, status, text[:200], raw[:200]))
        print(f"seed {seed}: answers {dict(answers)}")
        assert not problems, f"seed {seed}: {problems[:5]}"
        data = os.urandom(50_000)
        status, reply = upload_chunked(drop.port, data, 16 * 1024, "normal.bin")
        assert status == 200 and reply["sha256"] == sha256(data), (status, reply)
        assert "Traceback" not in drop.output.text, drop.output.text[-3000:]
    after = snapshot_tree(tmp_path, {storage, chunks})
    assert after == before, f"written outside storage and chunks: {sorted(set(after) ^ set(before))}"
    assert not hidden_in_storage(storage)


def test_downloads_under_load_are_byte_identical(tmp_path):
    """Issue 9, robustness: with -a, GET /download/ID of stored files while other uploads run returns exactly the
    stored bytes."""
    rng = random.Random(8)
    stored = {}
    with drop_server(*folders(tmp_path), "-a") as drop:
        for i in range(6):
            data = rng.randbytes(rng.randint(1, 3 * MIB))
            status, reply = upload_chunked(drop.port, data, 512 * 1024, f"dl{i}.bin")
            assert status == 200, reply
            stored[reply["id"]] = data
        stop = threading.Event()
        upload_errors = []

        def keep_uploading(worker):
            for n in range(200):
                if stop.is_set():
                    return
                data = os.urandom(256 * 1024 + n)
                status, reply = upload_chunked(drop.port, data, 64 * 1024, f"load{worker}-{n}.bin")
                if status != 200 or reply["sha256"] != sha256(data):
                    upload_errors.append((status, reply))

        loaders = [threading.Thread(target=keep_uploading, args=(w,), daemon=True) for w in range(4)]
        for thread in loaders:
            thread.start()
        try:
            def download(upload_id):
                status, _, body = http_request(drop.port, "GET", f"/download/{upload_id}")
                return upload_id, status, body
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                for upload_id, status, body in pool.map(download, list(stored) * 5, timeout=120):
                    assert status == 200 and body == stored[upload_id], (upload_id, status, len(body))
        finally:
            stop.set()
            for thread in loaders:
                thread.join(60)
        assert not upload_errors, upload_errors[:3]
