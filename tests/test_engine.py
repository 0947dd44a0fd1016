"""The engine on its own: no HTTP, a real ledger and real files in temporary folders."""
import base64
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import uuid

import pytest

import pyfiledrop
from pyfiledrop import (BadRequest, Conflict, Engine, EngineLimits, InsufficientStorage, Ledger, LocalBackend,
                        NotFound, State, StorageFailure, Superseded, TooLarge, add_range, prefix_end, range_holes)

from conftest import ROOT, upload_files
from faultkit import wait_until

MIB = 1 << 20


def folders(tmp_path):
    storage, chunks = tmp_path / "storage", tmp_path / "chunks"
    storage.mkdir(exist_ok=True)
    chunks.mkdir(exist_ok=True)
    return storage, chunks


def make_engine(tmp_path, *, ledger_class=Ledger, storage=None, chunks=None, **limits):
    default_storage, default_chunks = folders(tmp_path)
    chunks = chunks or default_chunks
    limits.setdefault("max_size", 10 ** 9)
    clock = limits.pop("clock", None)
    events = limits.pop("events", None)
    options = {"events": events.append} if events is not None else {}
    if clock is not None:
        options["clock"] = clock
    backend = LocalBackend(storage or default_storage, chunks)
    return Engine(ledger_class(chunks / Ledger.FILENAME), backend, EngineLimits(**limits), **options)


def pieces(data, step=7):
    """Bytes in uneven pieces, as a network read delivers them."""
    return (data[i:i + step] for i in range(0, len(data), step))


def send_parts(engine, data, part_size, *, name="f.bin", upload_id=None, order=None, step=7):
    upload_id = upload_id or str(uuid.uuid4())
    engine.create(upload_id, name, size=len(data), part_size=part_size, client="test")
    count = pyfiledrop.chunk_count(len(data), part_size)
    info = None
    for index in order if order is not None else range(count):
        part = data[index * part_size:(index + 1) * part_size]
        info = engine.put(upload_id, index * part_size, pieces(part, step), length=len(part), atomic=True)
    if info.fully_received:
        info = engine.finish(upload_id)
    return upload_id, info


# -- byte ranges --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranges, added, expected", [
    ((), (0, 5), ((0, 5),)),
    (((0, 5),), (5, 9), ((0, 9),)),
    (((0, 5), (10, 20)), (4, 11), ((0, 20),)),
    (((10, 20),), (0, 3), ((0, 3), (10, 20))),
    (((0, 5),), (2, 2), ((0, 5),)),
])
def test_ranges_merge(ranges, added, expected):
    assert add_range(ranges, *added) == expected


def test_range_holes_and_prefix():
    ranges = ((0, 5), (10, 20))
    assert range_holes(ranges, 0, 30) == [(5, 10), (20, 30)]
    assert range_holes(ranges, 2, 4) == []
    assert range_holes(ranges, 12, None) == [(20, None)]
    assert prefix_end(ranges) == 5 and prefix_end(((3, 9),)) == 0 and prefix_end(()) == 0


# -- parts, order, hash -------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["forward", "backward", "shuffled"])
def test_parts_in_any_order_store_the_exact_bytes(tmp_path, order):
    engine = make_engine(tmp_path)
    data = os.urandom(1000)
    indexes = list(range(pyfiledrop.chunk_count(len(data), 64)))
    if order == "backward":
        indexes.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(indexes)
    upload_id, info = send_parts(engine, data, 64, order=indexes)
    assert info.state is State.STORED and info.sha256 == hashlib.sha256(data).hexdigest()
    assert (engine.backend.storage / info.stored_name).read_bytes() == data
    assert upload_files(engine.backend.chunks) == []
    assert engine.ledger.get(upload_id) == info


def test_parallel_writers_in_random_pieces_hash_right(tmp_path):
    """Parts arrive in parallel threads, in pieces of random size: the in-order hash (partly as bytes arrive,
    partly read back) must equal the file's."""
    engine = make_engine(tmp_path)
    data = os.urandom(3 * MIB + 12345)
    part_size = 256 * 1024
    count = pyfiledrop.chunk_count(len(data), part_size)
    engine.create("par", "p.bin", size=len(data), part_size=part_size, client="")
    rng = random.Random(3)
    errors, infos = [], []

    def send(index):
        part = data[index * part_size:(index + 1) * part_size]
        try:
            infos.append(engine.put("par", index * part_size, pieces(part, rng.randint(1000, 70000)),
                                    length=len(part), atomic=True))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    info = engine.finish("par")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert (engine.backend.storage / "p.bin").read_bytes() == data


def test_parts_in_parallel_write_into_their_file_one_at_a_time(tmp_path):
    """The kernel lets one buffered write into a file at a time, and a second writer spins on the CPU
    meanwhile: the engine queues writers itself.  The first write waits for a second to come in beside it
    while the second part's request is started."""
    inside, overlaps, first_inside, second_entered = [], [], threading.Event(), threading.Event()

    class WatchedBackend(LocalBackend):
        def write_at(self, fd, data, offset):
            inside.append(offset)
            if len(inside) > 1:
                overlaps.append(tuple(inside))
                second_entered.set()
            try:
                if not first_inside.is_set():
                    first_inside.set()
                    second_entered.wait(1)  # not a synchronisation: whether the second write comes is the test
                super().write_at(fd, data, offset)
            finally:
                inside.remove(offset)

    storage, chunks = folders(tmp_path)
    engine = Engine(Ledger(chunks / Ledger.FILENAME), WatchedBackend(storage, chunks), EngineLimits(max_size=MIB))
    data = os.urandom(128 * 1024)
    engine.create("one", "one.bin", size=len(data), part_size=64 * 1024, client="")
    first = threading.Thread(target=engine.put, args=("one", 0, [data[:64 * 1024]]),
                             kwargs={"length": 64 * 1024, "atomic": True})
    first.start()
    assert first_inside.wait(10)
    engine.put("one", 64 * 1024, [data[64 * 1024:]], length=64 * 1024, atomic=True)
    first.join(10)
    assert not overlaps
    assert engine.finish("one").sha256 == hashlib.sha256(data).hexdigest()


class ReadBackCounted(LocalBackend):
    """The local backend, counting the bytes the in-order hash reads back from the partial file."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_back = 0

    def hash_range(self, hasher, fd, start, end):
        self.read_back += end - start
        super().hash_range(hasher, fd, start, end)


def _two_parts_in_flight(tmp_path, limits, gate_first):
    """Part 0 sends half its bytes, then holds until released; part 1 starts meanwhile.  Returns the engine,
    the events and what part 1's first read saw."""
    storage, chunks = folders(tmp_path)
    backend = ReadBackCounted(storage, chunks)
    engine = Engine(Ledger(chunks / Ledger.FILENAME), backend, EngineLimits(max_size=MIB, **limits))
    data, part = os.urandom(256 * 1024), 128 * 1024
    engine.create("two", "two.bin", size=len(data), part_size=part, client="")
    half_sent, release, seen = threading.Event(), threading.Event(), {}

    def first_part():
        yield data[:part // 2]
        half_sent.set()
        assert release.wait(60)
        yield data[part // 2:part]

    def second_part():
        seen["part 0 recorded"] = engine.info("two").received == ((0, part),)
        yield from pieces(data[part:], 4096)

    threads = [threading.Thread(target=engine.put, args=("two", 0, first_part()), kwargs={"length": part, "atomic": True}),
               threading.Thread(target=engine.put, args=("two", part, second_part()), kwargs={"length": part, "atomic": True})]
    threads[0].start()
    assert half_sent.wait(10)
    threads[1].start()
    try:
        gate_first(engine, threads[1])
    finally:
        release.set()
    for thread in threads:
        thread.join(30)
    assert engine.finish("two").sha256 == hashlib.sha256(data).hexdigest()
    return backend, seen


def test_a_part_ahead_of_the_hash_waits_for_the_part_before_it_and_is_hashed_as_it_arrives(tmp_path):
    """Six parts in flight: those ahead of the in-order hash would be written, then read back from the file to be
    hashed (a second pass over every byte).  Such a part waits, before it reads its first byte, while the part
    before it moves; then it is hashed from memory.  Here part 0 holds (its client is still sending: the
    stall limit is long), part 1 must not read until part 0 is recorded, and nothing is read back."""
    def part_one_waits(engine, second):
        wait_until(lambda: any(w.turn is not None for w in engine._live["two"].writers), 10,
                   "part 1 to wait for its turn (it read its bytes while part 0 was still coming)")

    backend, seen = _two_parts_in_flight(tmp_path, {"ahead_wait": 60.0, "front_stalled": 60.0}, part_one_waits)
    assert seen["part 0 recorded"]
    assert backend.read_back == 0


def test_a_part_ahead_of_a_stalled_part_waits_no_longer(tmp_path):
    """The part before has not moved for ``front_stalled`` (its client vanished): the part behind reads its
    bytes at once, whole, while the stalled one still holds; the file is whole once both have arrived."""
    def part_one_goes_on(engine, second):
        second.join(30)
        assert not second.is_alive(), "part 1 waited for a part that had stalled"

    backend, seen = _two_parts_in_flight(tmp_path, {"ahead_wait": 60.0, "front_stalled": 0.05}, part_one_goes_on)
    assert not seen["part 0 recorded"]
    assert backend.read_back == 128 * 1024  # part 1, read back once the hash came to it


def test_duplicates_in_parallel_complete_exactly_once(tmp_path):
    engine = make_engine(tmp_path)
    data = os.urandom(64 * 1024)
    engine.create("dup", "d.bin", size=len(data), part_size=1024, client="")
    errors, finished = [], []

    def send(index):
        part = data[index * 1024:(index + 1) * 1024]
        try:
            info = engine.put("dup", index * 1024, pieces(part, 100), length=len(part), atomic=True)
            if info.fully_received:
                finished.append(engine.finish("dup"))
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=send, args=(i % 64,)) for i in range(64 + 16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    assert os.listdir(engine.backend.storage) == ["d.bin"]
    assert {info.stored_name for info in finished} == {"d.bin"}
    assert (engine.backend.storage / "d.bin").read_bytes() == data


def test_a_retry_of_a_received_part_is_read_not_written(tmp_path):
    engine = make_engine(tmp_path)
    data = os.urandom(300)
    engine.create("u1", "f.bin", size=300, part_size=100, client="")
    engine.put("u1", 0, pieces(data[:100]), length=100, atomic=True)
    engine.put("u1", 0, pieces(b"R" * 100), length=100, atomic=True)  # a retry with other bytes
    engine.put("u1", 100, pieces(data[100:]), length=200, atomic=True)
    assert (engine.backend.storage / engine.finish("u1").stored_name).read_bytes() == data


# -- a stalled request is taken over ------------------------------------------------------------------------

def test_a_stalled_request_is_taken_over_at_once_and_its_later_bytes_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(pyfiledrop, "STALLED_AFTER_S", 0.05)
    engine = make_engine(tmp_path)
    first, retry = os.urandom(100), os.urandom(100)
    engine.create("u1", "f.bin", size=100, part_size=100, client="")
    started, release = threading.Event(), threading.Event()
    outcome = []

    def stalled_client():
        yield first[:50]
        started.set()
        release.wait(30)
        yield first[50:]

    def first_request():
        try:
            engine.put("u1", 0, stalled_client(), length=100, atomic=True)
            outcome.append("stored")
        except Superseded:
            outcome.append("superseded")

    thread = threading.Thread(target=first_request)
    thread.start()
    assert started.wait(10)
    # the stalled one sends nothing more; the retry is not kept waiting for it
    done = threading.Event()
    retry_thread = threading.Thread(target=lambda: (engine.put("u1", 0, pieces(retry), length=100, atomic=True),
                                                    done.set()))
    retry_thread.start()
    assert done.wait(10), "the retry waited for the stalled request"
    release.set()
    thread.join(10)
    retry_thread.join(10)
    assert outcome == ["superseded"]
    info = engine.finish("u1")
    assert (engine.backend.storage / info.stored_name).read_bytes() == retry
    assert info.sha256 == hashlib.sha256(retry).hexdigest()


# -- a small file of one chunk under the client's id: the short way, and a request that takes it over ----------

def one_chunk(engine, upload_id, data, *, sha256=None):
    """As the chunk adapter sends a file of one chunk: the short way, else (its id known) the general steps."""
    info = engine.receive_small(upload_id, "one.bin", data, client="", size=100, part_size=MIB, sha256=sha256)
    if info is not None:
        return info
    engine.create(upload_id, "one.bin", size=100, part_size=MIB, client="", ephemeral=True)
    engine.put(upload_id, 0, data, length=100, atomic=True)
    return engine.finish(upload_id)


def held_client(first, started, release):
    yield first[:50]
    started.set()
    release()
    yield first[50:]


def run_in_thread(call):
    outcome, done = [], threading.Event()

    def target():
        try:
            outcome.append(call())
        except pyfiledrop.UploadError as error:
            outcome.append(error)
        done.set()

    threading.Thread(target=target, daemon=True).start()
    return outcome, done


def test_a_stalled_small_file_on_the_short_way_is_taken_over_by_its_retry(tmp_path, monkeypatch):
    monkeypatch.setattr(pyfiledrop, "STALLED_AFTER_S", 0.05)
    engine = make_engine(tmp_path)
    first, retry = os.urandom(100), os.urandom(100)
    started, release = threading.Event(), threading.Event()
    outcome, done = run_in_thread(lambda: one_chunk(engine, "s1", held_client(first, started,
                                                                                lambda: release.wait(30))))
    assert started.wait(10)
    assert engine.info("s1").state is State.RECEIVING   # the status of a file on its way, not "no such upload"
    info = one_chunk(engine, "s1", pieces(retry))       # the stalled one sends nothing more: no wait for it
    release.set()
    assert done.wait(10) and isinstance(outcome[0], Superseded), outcome
    assert info.state is State.STORED and info.sha256 == hashlib.sha256(retry).hexdigest()
    assert os.listdir(engine.backend.storage) == ["one.bin"]
    assert (engine.backend.storage / "one.bin").read_bytes() == retry
    assert upload_files(engine.backend.chunks) == []


def test_a_retry_of_a_small_file_still_moving_waits_for_it_and_answers_what_it_stored(tmp_path):
    engine = make_engine(tmp_path)
    first = os.urandom(100)
    started = threading.Event()
    watched = lambda: wait_until(lambda: engine._small["s2"].watched, 10, "the retry waiting")  # noqa: E731
    outcome, done = run_in_thread(lambda: one_chunk(engine, "s2", held_client(first, started, watched)))
    assert started.wait(10)
    info = one_chunk(engine, "s2", pieces(b"R" * 100))   # a copy of the same request: waits, stores nothing
    assert done.wait(10) and outcome[0].state is State.STORED, outcome
    assert info == outcome[0] and info.sha256 == hashlib.sha256(first).hexdigest()
    assert os.listdir(engine.backend.storage) == ["one.bin"] and upload_files(engine.backend.chunks) == []


def test_a_small_file_on_the_short_way_cancelled_is_stored_nowhere(tmp_path):
    engine = make_engine(tmp_path)
    started, release = threading.Event(), threading.Event()
    outcome, done = run_in_thread(lambda: one_chunk(engine, "s3", held_client(os.urandom(100), started,
                                                                                lambda: release.wait(30))))
    assert started.wait(10)
    assert engine.abort("s3").state is State.DELETED
    release.set()
    assert done.wait(10) and isinstance(outcome[0], Superseded), outcome
    assert os.listdir(engine.backend.storage) == [] and upload_files(engine.backend.chunks) == []
    with pytest.raises(NotFound):
        engine.info("s3")


def test_the_short_way_reads_nothing_of_an_id_already_known(tmp_path):
    engine = make_engine(tmp_path)
    stored = one_chunk(engine, "known", [b"k" * 100])
    engine.create("live", "one.bin", size=100, part_size=MIB, client="")
    for upload_id in ("known", "live"):
        untouched = iter([b"x" * 100])
        assert engine.receive_small(upload_id, "one.bin", untouched, client="", size=100, part_size=MIB) is None
        assert next(untouched) == b"x" * 100
    assert one_chunk(engine, "known", [b"k" * 100]) == stored   # the general steps answer the stored file
    assert os.listdir(engine.backend.storage) == ["one.bin"]


def test_a_small_file_without_the_hash_its_client_sent_is_stored_nowhere(tmp_path):
    engine = make_engine(tmp_path)
    data = os.urandom(100)
    damaged = bytes([data[0] ^ 1]) + data[1:]
    with pytest.raises(pyfiledrop.ChecksumMismatch):
        one_chunk(engine, "h1", [damaged], sha256=hashlib.sha256(data).digest())
    assert os.listdir(engine.backend.storage) == [] and upload_files(engine.backend.chunks) == []
    info = one_chunk(engine, "h1", [data], sha256=hashlib.sha256(data).digest())
    assert info.state is State.STORED and (engine.backend.storage / "one.bin").read_bytes() == data


def test_parts_ahead_of_a_stalled_part_are_answered(tmp_path, monkeypatch):
    """Replies of parts far ahead of the in-order hash wait for it while it moves (completion then has little
    left to hash), but not for a part before them whose client stopped sending: the page may send that part
    again only once the others are answered."""
    monkeypatch.setattr(pyfiledrop, "HASH_BACKLOG", 1000)
    monkeypatch.setattr(pyfiledrop, "STALLED_AFTER_S", 0.05)
    monkeypatch.setattr(pyfiledrop, "RIVAL_WAIT_S", 600.0)  # so only the stall can end the wait
    engine = make_engine(tmp_path)
    part = 10_000
    data = os.urandom(4 * part)
    engine.create("u1", "f.bin", size=len(data), part_size=part, client="")
    started, release = threading.Event(), threading.Event()

    def stalled_client():  # part 0: at the hash's front, hashing as it goes, then silent
        yield data[:part // 2]
        started.set()
        release.wait(60)
        yield data[part // 2:part]

    first = threading.Thread(target=lambda: engine.put("u1", 0, stalled_client(), length=part, atomic=True))
    first.start()
    assert started.wait(10)
    answered = threading.Event()
    later = threading.Thread(target=lambda: ([engine.put("u1", index * part, pieces(data[index * part:(index + 1) * part]),
                                                          length=part, atomic=True) for index in (1, 2, 3)],
                                             answered.set()))
    later.start()
    assert answered.wait(30), "parts ahead waited for a part whose client had stopped"
    release.set()
    first.join(10)
    later.join(10)
    info = engine.finish("u1")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert (engine.backend.storage / info.stored_name).read_bytes() == data


def test_an_interrupted_request_keeps_what_arrived_unless_atomic(tmp_path):
    engine = make_engine(tmp_path)
    data = os.urandom(1000)
    engine.create("tus", "t.bin", size=1000, part_size=1000, client="")

    def breaks_off(start, count):
        yield data[start:start + count]
        raise pyfiledrop.ClientDisconnected("gone")

    with pytest.raises(pyfiledrop.ClientDisconnected):
        engine.put("tus", 0, breaks_off(0, 600))
    assert engine.info("tus").received == ((0, 600),)
    with pytest.raises(pyfiledrop.ClientDisconnected):
        engine.put("tus", 600, breaks_off(600, 300), length=400, atomic=True)
    assert engine.info("tus").received == ((0, 600),)
    engine.put("tus", 600, pieces(data[600:]))
    assert engine.finish("tus").sha256 == hashlib.sha256(data).hexdigest()


# -- restart, crash ---------------------------------------------------------------------------------------------

def test_an_upload_resumes_in_a_new_engine(tmp_path):
    data = os.urandom(500)
    first = make_engine(tmp_path)
    first.create("r1", "r.bin", size=500, part_size=100, client="1.2.3.4")
    for index in (0, 2, 4):
        first.put("r1", index * 100, pieces(data[index * 100:(index + 1) * 100]), length=100, atomic=True)
    first.ledger.close()
    second = make_engine(tmp_path)
    info = second.info("r1")
    assert info.state is State.RECEIVING and info.missing_parts(10) == [1, 3] and info.client == "1.2.3.4"
    for index in (1, 3):
        info = second.put("r1", index * 100, pieces(data[index * 100:(index + 1) * 100]), length=100)
    info = second.finish("r1")
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert (second.backend.storage / "r.bin").read_bytes() == data


CRASH_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import pyfiledrop
storage, chunks, step, kind = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]

def checkpoint(name):
    if name == step:
        os.kill(os.getpid(), signal.SIGKILL)

backend = pyfiledrop.LocalBackend(pyfiledrop.Path(storage), pyfiledrop.Path(chunks), checkpoint=checkpoint)
ledger = pyfiledrop.Ledger(pyfiledrop.Path(chunks) / pyfiledrop.Ledger.FILENAME)
engine = pyfiledrop.Engine(ledger, backend, pyfiledrop.EngineLimits(10 ** 9), checkpoint=checkpoint)
data = bytes(range(256)) * 40
if kind == "parts":
    engine.create("crash-1", "x.bin", size=len(data), part_size=4096, client="")
    for offset in range(0, len(data), 4096):
        engine.put("crash-1", offset, [data[offset:offset + 4096]], length=len(data[offset:offset + 4096]))
    engine.finish("crash-1")
elif kind == "whole":
    engine.receive_whole("x.bin", [data], client="", size=len(data), upload_id="crash-1")
elif kind == "one":  # a small file of one chunk under the client's id: receive_small's short way
    assert engine.receive_small("crash-1", "x.bin", [data], client="", size=len(data), part_size=1 << 20)
else:  # a small file under an id of the server's own: receive_whole's short way
    engine.receive_whole("x.bin", [data], client="", size=len(data))
print("finished without a crash")
"""
STEPS = ["hashed", "linked", "recorded", "discarded"]


def run_until_killed(tmp_path, storage, chunks, step, kind):
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(ROOT), str(storage), str(chunks), step, kind],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -9, result.stdout + result.stderr


def assert_one_stored_copy(tmp_path, storage):
    data = bytes(range(256)) * 40
    engine = make_engine(tmp_path, storage=storage)
    info = engine.info("crash-1")
    if info.state is State.RECEIVING:  # killed before the link: the client's retry of the last part completes it
        info = engine.finish("crash-1")
    assert info.state is State.STORED and info.stored_name == "x.bin"
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(os.listdir(storage)) == ["x.bin"] and (storage / "x.bin").read_bytes() == data
    assert upload_files(engine.backend.chunks) == []
    again = engine.finish("crash-1")  # a retry after the restart answers the same, stores nothing new
    assert again.stored_name == "x.bin" and sorted(os.listdir(storage)) == ["x.bin"]


@pytest.mark.parametrize("kind", ["parts", "whole", "one"])
@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_every_step_of_completion_ends_with_one_copy(tmp_path, step, kind):
    storage, chunks = folders(tmp_path)
    run_until_killed(tmp_path, storage, chunks, step, kind)
    if kind in ("whole", "one") and step == "hashed":
        # a one-request upload killed before its link has no record: nothing stored, nothing left behind
        engine = make_engine(tmp_path)
        with pytest.raises(NotFound):
            engine.info("crash-1")
        assert os.listdir(storage) == [] and upload_files(chunks) == []
        return
    assert_one_stored_copy(tmp_path, storage)


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_every_step_of_storing_a_small_file_of_one_request_ends_with_one_copy_or_none(tmp_path, step):
    """The short way for a small file under a server's id: killed before its link, nothing is stored and
    nothing is left; from the link on, the file is stored once and recorded, and the chunks folder is empty."""
    storage, chunks = folders(tmp_path)
    run_until_killed(tmp_path, storage, chunks, step, "fresh")
    engine = make_engine(tmp_path)
    data = bytes(range(256)) * 40
    recorded = engine.ledger.newest(10, 0)
    assert upload_files(chunks) == []
    if step == "hashed":
        assert os.listdir(storage) == [] and recorded == []
        return
    assert sorted(os.listdir(storage)) == ["x.bin"] and (storage / "x.bin").read_bytes() == data
    assert [(info.state, info.stored_name, info.sha256) for info in recorded] == \
        [(State.STORED, "x.bin", hashlib.sha256(data).hexdigest())]


@pytest.mark.parametrize("fault", ["ended early", "broke", "too many bytes"])
def test_a_small_file_of_one_request_that_fails_on_the_way_leaves_nothing(tmp_path, fault):
    engine = make_engine(tmp_path)

    def body():
        yield b"x" * 400
        if fault == "broke":
            raise pyfiledrop.ClientDisconnected("The connection broke while the file was being received.")
        if fault == "too many bytes":
            yield b"x" * 700

    with pytest.raises(pyfiledrop.BadRequest if fault == "too many bytes" else pyfiledrop.ClientDisconnected):
        engine.receive_whole("f.bin", body(), client="", size=1000)
    assert os.listdir(engine.backend.storage) == [] and upload_files(engine.backend.chunks) == []
    assert engine.ledger.newest(10, 0) == [] and engine.stored_count == 0
    assert engine.receive_whole("f.bin", [b"y" * 1000], client="", size=1000).stored_name == "f.bin"


@pytest.fixture
def other_filesystem(tmp_path):
    """A small tmpfs: storage on another filesystem than the chunks folder (needs root to mount)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("step", ["copied", "linked", "recorded", "discarded"])
def test_a_kill_during_a_copy_to_another_disk_leaves_one_copy_and_no_temporary(tmp_path, other_filesystem, step):
    storage = other_filesystem / "storage"
    storage.mkdir()
    _, chunks = folders(tmp_path)
    run_until_killed(tmp_path, storage, chunks, step, "parts")
    assert_one_stored_copy(tmp_path, storage)


def test_a_full_other_disk_leaves_no_copy_behind(tmp_path, other_filesystem):
    storage = other_filesystem / "storage"
    storage.mkdir()
    engine = make_engine(tmp_path, storage=storage)
    (other_filesystem / "filler").write_bytes(b"f" * (12 * MIB))
    with pytest.raises(InsufficientStorage):
        engine.receive_whole("big.bin", [os.urandom(6 * MIB)], client="", size=6 * MIB)
    assert os.listdir(storage) == [] and upload_files(engine.backend.chunks) == []
    (other_filesystem / "filler").unlink()
    assert engine.receive_whole("small.bin", [b"0123456789"], client="", size=10).stored_name == "small.bin"


class LedgerThatFailsOnce(Ledger):
    """A ledger whose first write of a stored record fails, as a full or broken disk makes it."""

    failed = False

    def save(self, *infos, **options):
        if not self.failed and any(info.state is State.STORED for info in infos):
            LedgerThatFailsOnce.failed = True
            raise OSError(28, "No space left on device")
        return super().save(*infos, **options)


def test_a_failed_record_of_completion_is_retried_without_a_second_copy(tmp_path):
    engine = make_engine(tmp_path, ledger_class=LedgerThatFailsOnce)
    data = os.urandom(300)
    engine.create("u1", "f.bin", size=300, part_size=100, client="")
    for offset in (0, 100, 200):
        engine.put("u1", offset, [data[offset:offset + 100]], length=100)
    with pytest.raises(InsufficientStorage):  # ENOSPC: the client is told there is no room (507)
        engine.finish("u1")
    info = engine.finish("u1")
    assert info.stored_name == "f.bin" and sorted(os.listdir(engine.backend.storage)) == ["f.bin"]
    assert upload_files(engine.backend.chunks) == []
    engine.ledger.close()
    assert make_engine(tmp_path).info("u1").stored_name == "f.bin"


# -- space, size, limits ------------------------------------------------------------------------------------

def test_declared_but_unsent_bytes_take_no_space(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    engine = make_engine(tmp_path, max_size=2 ** 62, min_free=0)
    for number in range(100):
        upload_id = f"hog-{number}"
        engine.create(upload_id, "hog.bin", size=free // 2, part_size=8 * MIB, client="")
        engine.put(upload_id, 0, [b"x"], length=8 * MIB, atomic=True)
    used = sum(os.stat(p).st_blocks * 512 for p in engine.backend.chunks.glob("*.part"))
    assert used < 100 * 64 * 1024
    assert engine.receive_whole("honest.bin", [os.urandom(MIB)], client="", size=MIB).state is State.STORED


def test_min_free_is_kept(tmp_path, other_filesystem):
    storage, chunks = other_filesystem / "storage", other_filesystem / "chunks"
    storage.mkdir()
    chunks.mkdir()
    engine = make_engine(tmp_path, storage=storage, chunks=chunks, max_size=2 ** 62, min_free=8 * MIB)
    with pytest.raises(InsufficientStorage):
        engine.create("big", "big.bin", size=9 * MIB, part_size=MIB, client="")
    with pytest.raises(InsufficientStorage):  # a body of unknown length is checked as it arrives
        engine.receive_whole("stream.bin", (b"x" * MIB for _ in range(12)), client="")
    assert upload_files(chunks) == [] and os.listdir(storage) == []
    assert engine.receive_whole("small.bin", [b"x" * 1000], client="", size=1000).state is State.STORED


def test_unknown_length_is_fixed_when_the_body_ends(tmp_path):
    engine = make_engine(tmp_path, max_size=10_000)
    data = os.urandom(5000)
    info = engine.receive_whole("s.bin", pieces(data, 999), client="")
    assert info.size == 5000 and info.sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(TooLarge):
        engine.receive_whole("big.bin", pieces(os.urandom(10_001), 999), client="")
    assert upload_files(engine.backend.chunks) == [] and os.listdir(engine.backend.storage) == ["s.bin"]


def test_bytes_past_the_announced_range_are_refused(tmp_path):
    engine = make_engine(tmp_path, max_size=100)
    with pytest.raises(TooLarge):
        engine.create("u0", "f.bin", size=101, part_size=50, client="")
    engine.create("u1", "f.bin", size=100, part_size=50, client="")
    engine.put("u1", 0, [b"y" * 10], length=10)
    with pytest.raises(BadRequest):
        engine.put("u1", 10, pieces(b"x" * 60, 50), length=50, atomic=True)
    with pytest.raises(BadRequest):
        engine.put("u1", 90, [b"x" * 20])
    assert engine.info("u1").received == ((0, 10),)


def test_an_upload_id_cannot_change_its_file(tmp_path):
    engine = make_engine(tmp_path)
    engine.create("u1", "a.bin", size=100, part_size=50, client="")
    for change in ({"name": "b.bin"}, {"size": 99}, {"part_size": 25}):
        arguments = {"name": "a.bin", "size": 100, "part_size": 50, **change}
        with pytest.raises(BadRequest):
            engine.create("u1", arguments.pop("name"), client="", **arguments)


def test_finish_refuses_an_incomplete_upload(tmp_path):
    engine = make_engine(tmp_path)
    engine.create("u1", "f.bin", size=100, part_size=40, client="")
    engine.put("u1", 0, [b"x" * 40], length=40)
    with pytest.raises(Conflict):
        engine.finish("u1")
    assert os.listdir(engine.backend.storage) == []


def test_existing_files_are_never_overwritten(tmp_path):
    engine = make_engine(tmp_path)
    (engine.backend.storage / "same.txt").write_bytes(b"precious")
    (engine.backend.storage / "same (1).txt").mkdir()
    info = engine.receive_whole("same.txt", [b"new bytes"], client="")
    assert info.stored_name == "same (2).txt"
    assert (engine.backend.storage / "same.txt").read_bytes() == b"precious"
    assert (engine.backend.storage / "same (2).txt").read_bytes() == b"new bytes"


# -- expiry, events, migration ------------------------------------------------------------------------------

def test_expire_removes_only_stale_partial_uploads(tmp_path):
    clock = [1_000_000.0]
    engine = make_engine(tmp_path, partial_ttl=3600, clock=lambda: clock[0])
    engine.create("old", "old.bin", size=100, part_size=40, client="")
    engine.put("old", 0, [b"o" * 40], length=40)
    clock[0] += 3000
    engine.create("new", "new.bin", size=100, part_size=40, client="")
    stored = engine.receive_whole("done.txt", [b"done"], client="")
    clock[0] += 1000
    assert engine.expire() == 1
    assert engine.info("old").state is State.EXPIRED and engine.info("new").state is State.RECEIVING
    assert upload_files(engine.backend.chunks) == [pyfiledrop._part_key("new") + ".part"]
    clock[0] += 7200
    assert engine.expire() == 1
    assert upload_files(engine.backend.chunks) == [] and engine.info(stored.id).state is State.STORED
    assert (engine.backend.storage / "done.txt").read_bytes() == b"done"


def test_progress_is_reported_by_bytes_within_one_request(tmp_path, monkeypatch):
    monkeypatch.setattr(pyfiledrop, "PROGRESS_EVERY_S", 0)
    events = []
    engine = make_engine(tmp_path, events=events)
    engine.receive_whole("p.bin", pieces(b"x" * 10_000, 1000), client="", size=10_000)
    received = [event.received for event in events if isinstance(event, pyfiledrop.Progress)]
    assert received == sorted(received) and len(received) >= 9 and received[-1] == 10_000
    assert [type(e).__name__ for e in events if not isinstance(e, pyfiledrop.Progress)] == ["Stored"]


def write_v1_folder(storage, chunks, data):
    """A chunks folder as pyfiledrop 1.0 left it: one upload half received, one finished, stray temp files."""
    part = bytearray(len(data))
    for index in (0, 2):
        part[index * 100:(index + 1) * 100] = data[index * 100:(index + 1) * 100]
    (chunks / "half-1.part").write_bytes(bytes(part))
    bitmap = base64.b64encode((0b101).to_bytes(1, "little")).decode()
    (chunks / "half-1.state").write_text(json.dumps(
        {"v": 1, "id": "half-1", "name": "half.bin", "size": len(data), "chunk_size": 100, "total_chunks": 4,
         "received": bitmap, "started": 1000.0, "client": "10.0.0.7"}))
    (chunks / "half-1.state.0123abcd.tmp").write_bytes(b"")
    (storage / "done.bin").write_bytes(b"finished")
    (chunks / "done-1.done").write_text(json.dumps(
        {"id": "done-1", "name": "done.bin", "original_name": "done.bin", "size": 8,
         "sha256": hashlib.sha256(b"finished").hexdigest(), "chunk_size": 8, "total_chunks": 1,
         "completed": 2000.0}))
    (chunks / "done-1.state").write_text("{}")  # a stale state beside its finished record
    (chunks / "lonely-1.part").write_bytes(b"never recorded")
    (storage / ".pyfiledrop-0123456789abcdef0123456789abcdef.tmp").write_bytes(b"half a copy")


def test_a_v1_folder_is_migrated(tmp_path):
    storage, chunks = folders(tmp_path)
    data = os.urandom(400)
    write_v1_folder(storage, chunks, data)
    engine = make_engine(tmp_path)
    half = engine.info("half-1")
    assert half.missing_parts(10) == [1, 3] and half.client == "10.0.0.7"
    done = engine.info("done-1")
    assert done.state is State.STORED and done.stored_name == "done.bin"
    assert done.sha256 == hashlib.sha256(b"finished").hexdigest()
    for index in (1, 3):
        engine.put("half-1", index * 100, [data[index * 100:(index + 1) * 100]], length=100)
    assert engine.finish("half-1").sha256 == hashlib.sha256(data).hexdigest()
    assert upload_files(chunks) == [] and sorted(os.listdir(storage)) == ["done.bin", "half.bin"]
    assert engine.ledger.version == len(Ledger.MIGRATIONS)


def test_every_record_is_found_by_its_id_before_and_after_a_restart_and_unknown_ids_are_not(tmp_path):
    """The ledger skips the query for an id no record can have (a bitmap of the ids' hashes, rebuilt at start):
    no record of any state may go missing for it, in the same run or the next."""
    _, chunks = folders(tmp_path)
    ledger = Ledger(chunks / Ledger.FILENAME)
    base = pyfiledrop.UploadInfo(id="x", name="n.bin", size=4, part_size=4, client="", created=1, updated=1)
    ids = {state: [f"{state.value}-{number}" for number in range(300)] for state in State}
    for state, names in ids.items():
        for upload_id in names:
            ledger.save(base.changed(id=upload_id, state=state))
    unknown = [str(uuid.uuid4()) for _ in range(2000)]
    for run in range(2):
        for state, names in ids.items():
            assert [ledger.get(upload_id).state for upload_id in names] == [state] * len(names), (run, state)
        assert [ledger.get(upload_id) for upload_id in unknown] == [None] * len(unknown)
        ledger.close()
        ledger = Ledger(chunks / Ledger.FILENAME)
    ledger.close()


def test_the_ledger_refuses_a_newer_schema(tmp_path):
    _, chunks = folders(tmp_path)
    Ledger(chunks / Ledger.FILENAME).close()
    import sqlite3
    with sqlite3.connect(chunks / Ledger.FILENAME) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError):
        Ledger(chunks / Ledger.FILENAME)


def test_part_counts_agree_with_the_plain_definition():
    """received_parts and missing_parts are computed per range (fast for 100,000 parts); they must agree with
    asking each part in turn."""
    rng = random.Random(1)
    for _ in range(3000):
        size, part = rng.randint(0, 500), rng.randint(1, 60)
        ranges = ()
        for _ in range(rng.randint(0, 6)):
            low = rng.randint(0, size)
            ranges = add_range(ranges, low, rng.randint(low, size))
        info = pyfiledrop.UploadInfo(id="x", name="n", size=size, part_size=part, client="", created=0, updated=0,
                                     received=ranges)
        parts = range(info.total_parts)
        assert info.received_parts() == sum(1 for index in parts if info.part_received(index))
        assert info.missing_parts(10 ** 6) == [index for index in parts if not info.part_received(index)]


def test_list_gives_every_upload_newest_first(tmp_path):
    clock = [1000.0]
    engine = make_engine(tmp_path, clock=lambda: clock[0])
    for name in ("a.txt", "b.txt", "c.txt"):
        clock[0] += 1
        engine.receive_whole(name, [name.encode()], client="10.0.0.9")
    clock[0] += 1
    engine.create("part-1", "d.bin", size=10, part_size=5, client="10.0.0.8")
    listed = engine.list()
    assert [info.name for info in listed] == ["d.bin", "c.txt", "b.txt", "a.txt"]
    assert [info.state for info in listed] == [State.RECEIVING] + [State.STORED] * 3
    assert [info.name for info in engine.list(limit=2, offset=1)] == ["c.txt", "b.txt"]


# -- the file's own hash instead of each part's -------------------------------------------------------------------

def send_with_file_hash(engine, upload_id, data, part_size, *, sent=None, file_sha256=None, order=None, later=()):
    """Parts with their own sha256 and the whole file's (as the page sends them once it knows the latter;
    the parts of ``later`` say it comes later); ``sent``: the bytes that arrive instead of the file's (damaged
    on the way).  The last put's info."""
    sent = data if sent is None else sent
    file_sha256 = file_sha256 or hashlib.sha256(data).hexdigest()
    count = pyfiledrop.chunk_count(len(data), part_size)
    info = None
    for index in order if order is not None else range(count):
        start, end = index * part_size, min(len(data), (index + 1) * part_size)
        info = engine.put(upload_id, start, pieces(sent[start:end], 4096), length=end - start, atomic=True,
                          checksum=("sha256", hashlib.sha256(data[start:end]).digest()),
                          file_sha256=pyfiledrop.FILE_SHA256_LATER if index in later else file_sha256)
    return info


def test_parts_sent_with_the_file_hash_are_checked_by_it(tmp_path):
    """A part's checksum waits for the file's hash: a part whose own checksum is wrong but whose bytes are the
    file's is not refused (each byte is hashed once, for the file), and the file is stored as its hash says."""
    engine = make_engine(tmp_path)
    data, part = os.urandom(5 * 4096 + 100), 4096
    engine.create("f1", "f.bin", size=len(data), part_size=part, client="")
    send_with_file_hash(engine, "f1", data, part, order=[3, 1, 0, 5, 2])
    wrong_checksum = hashlib.sha256(b"not this part").digest()
    info = engine.put("f1", 4 * part, pieces(data[4 * part:5 * part]), length=part, atomic=True,
                      checksum=("sha256", wrong_checksum), file_sha256=hashlib.sha256(data).hexdigest())
    assert info.fully_received
    info = engine.finish("f1")
    assert info.state is State.STORED and info.sha256 == hashlib.sha256(data).hexdigest()
    assert (engine.backend.storage / "f.bin").read_bytes() == data


def test_a_part_damaged_on_the_way_is_found_when_the_file_is_complete_and_received_again(tmp_path):
    events = []
    engine = make_engine(tmp_path, events=events)
    data, part = os.urandom(6 * 4096), 4096
    damaged = bytearray(data)
    damaged[2 * part + 17] ^= 1
    engine.create("d1", "d.bin", size=len(data), part_size=part, client="")
    assert send_with_file_hash(engine, "d1", data, part, sent=bytes(damaged), order=[1, 2, 0, 3, 5, 4]).fully_received
    info = engine.finish("d1")
    assert info.state is State.RECEIVING and info.missing_parts(100) == [2]
    assert os.listdir(engine.backend.storage) == []
    assert [e.text for e in events if isinstance(e, pyfiledrop.Notice)] == [
        '"d.bin" is not the file its client hashed: part(s) 3 of 6 dropped, to be sent again']
    assert engine.ledger.get("d1").missing_parts(100) == [2]
    send_with_file_hash(engine, "d1", data, part, order=[2])
    info = engine.finish("d1")
    assert info.state is State.STORED and info.sha256 == hashlib.sha256(data).hexdigest()
    assert (engine.backend.storage / "d.bin").read_bytes() == data


def test_a_wrong_file_hash_keeps_no_file_out_whose_parts_are_right(tmp_path):
    engine = make_engine(tmp_path)
    data, part = os.urandom(3 * 4096), 4096
    engine.create("w1", "w.bin", size=len(data), part_size=part, client="")
    send_with_file_hash(engine, "w1", data, part, file_sha256="0" * 64)
    info = engine.finish("w1")
    assert info.state is State.STORED and info.sha256 == hashlib.sha256(data).hexdigest()


def test_a_part_received_before_is_still_checked_as_it_comes_again(tmp_path):
    engine = make_engine(tmp_path)
    data, part = os.urandom(2 * 4096), 4096
    engine.create("r1", "r.bin", size=len(data), part_size=part, client="")
    send_with_file_hash(engine, "r1", data, part, order=[0])
    with pytest.raises(pyfiledrop.ChecksumMismatch):
        send_with_file_hash(engine, "r1", data, part, sent=b"x" * len(data), order=[0])


def test_after_a_restart_a_file_unlike_its_hash_is_received_again_whole(tmp_path):
    """The parts' own checksums went with the process: a complete file whose hash is not its client's keeps
    nothing of what arrived unchecked before the restart, and is stored once it arrives again right."""
    data, part = os.urandom(4 * 4096), 4096
    damaged = bytearray(data)
    damaged[100] ^= 1
    engine = make_engine(tmp_path)
    engine.create("k1", "k.bin", size=len(data), part_size=part, client="")
    send_with_file_hash(engine, "k1", data, part, sent=bytes(damaged), order=[0, 1, 2])
    engine.ledger.close()
    engine = make_engine(tmp_path)
    assert engine.info("k1").client_sha256 == hashlib.sha256(data).hexdigest()
    send_with_file_hash(engine, "k1", data, part, order=[3])
    info = engine.finish("k1")
    assert info.state is State.RECEIVING and info.received == () and os.listdir(engine.backend.storage) == []
    send_with_file_hash(engine, "k1", data, part)
    assert engine.finish("k1").sha256 == hashlib.sha256(data).hexdigest()
    assert (engine.backend.storage / "k.bin").read_bytes() == data


def test_parts_sent_before_the_file_hash_is_known_wait_for_it_too(tmp_path):
    """The page sends "later" until it knows the file's sha256 (at the latest with the last part): those
    parts are checked by the file's hash as well, and a damaged one among them is found and sent again."""
    events = []
    engine = make_engine(tmp_path, events=events)
    data, part = os.urandom(5 * 4096), 4096
    damaged = bytearray(data)
    damaged[part + 1] ^= 1
    engine.create("l1", "l.bin", size=len(data), part_size=part, client="")
    info = send_with_file_hash(engine, "l1", data, part, sent=bytes(damaged), later=(0, 1, 2))
    assert info.fully_received   # the damaged part was taken as it came: its hash waits for the file's
    assert engine.finish("l1").missing_parts(100) == [1]
    send_with_file_hash(engine, "l1", data, part, order=[1])
    assert engine.finish("l1").sha256 == hashlib.sha256(data).hexdigest()
    assert (engine.backend.storage / "l.bin").read_bytes() == data


@pytest.mark.parametrize("damage", [False, True])
def test_when_the_file_hash_never_comes_the_parts_are_checked_at_the_end(tmp_path, damage):
    """A resumed upload whose last part came before: the file hash may never come with a part, so the parts
    kept unchecked are read back and checked when the file is complete."""
    engine = make_engine(tmp_path)
    data, part = os.urandom(3 * 4096), 4096
    sent = bytearray(data)
    if damage:
        sent[2 * part + 5] ^= 1
    engine.create("n1", "n.bin", size=len(data), part_size=part, client="")
    send_with_file_hash(engine, "n1", data, part, sent=bytes(sent), later=(0, 1, 2))
    info = engine.finish("n1")
    if damage:
        assert info.missing_parts(100) == [2] and os.listdir(engine.backend.storage) == []
        send_with_file_hash(engine, "n1", data, part, order=[2], later=(2,))
        info = engine.finish("n1")
    assert info.state is State.STORED and (engine.backend.storage / "n.bin").read_bytes() == data


def test_after_a_restart_parts_that_waited_for_a_file_hash_still_come_up_against_it(tmp_path):
    data, part = os.urandom(3 * 4096), 4096
    damaged = bytearray(data)
    damaged[5] ^= 1
    engine = make_engine(tmp_path)
    engine.create("m1", "m.bin", size=len(data), part_size=part, client="")
    send_with_file_hash(engine, "m1", data, part, sent=bytes(damaged), order=[0, 1], later=(0, 1))
    engine.ledger.close()
    engine = make_engine(tmp_path)
    assert engine.info("m1").client_sha256 == pyfiledrop.FILE_SHA256_LATER
    send_with_file_hash(engine, "m1", data, part, order=[2])
    assert engine.finish("m1").received == ()
    send_with_file_hash(engine, "m1", data, part)
    assert engine.finish("m1").state is State.STORED
    assert (engine.backend.storage / "m.bin").read_bytes() == data



def test_a_request_arriving_while_an_upload_is_cancelled_finds_it_cancelled(tmp_path):
    """A part in flight at the cancel reaches the engine while the cancel removes the partial file: it must find
    the upload deleted, not take up again the record that still said receiving (and leave it failed)."""
    engine = make_engine(tmp_path)
    data, part = os.urandom(4 * 4096), 4096
    engine.create("c1", "c.bin", size=len(data), part_size=part, client="")
    engine.put("c1", 0, pieces(data[:part]), length=part, atomic=True)
    discard, arrivals = engine.backend.discard, []

    def discard_while_a_request_arrives(upload_id):
        try:
            arrivals.append(engine.create("c1", "c.bin", size=len(data), part_size=part, client=""))
        except Conflict as error:
            arrivals.append(error)
        discard(upload_id)

    engine.backend.discard = discard_while_a_request_arrives
    engine.abort("c1")
    assert isinstance(arrivals[0], Conflict), arrivals
    assert engine.info("c1").state is State.DELETED
    assert upload_files(engine.backend.chunks) == []
