"""The engine's checksums, folders, original times and cancelling: no HTTP, real ledger and files."""
import hashlib
import os
import sqlite3
import threading
import time
import uuid

import pytest

import pyfiledrop
from pyfiledrop import BadRequest, ChecksumMismatch, Conflict, Forbidden, Ledger, NotFound, State, Superseded

from test_engine import make_engine, pieces


def sha(algorithm, data):
    return (algorithm, hashlib.new(algorithm, data).digest())


def new_upload(engine, size, part_size=4, name="f.bin", **options):
    upload_id = str(uuid.uuid4())
    engine.create(upload_id, name, size=size, part_size=part_size, client="test", **options)
    return upload_id


# -- checksums ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_a_part_with_its_checksum_counts(tmp_path, algorithm):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 8)
    info = engine.put(upload_id, 0, pieces(b"abcd", 3), length=4, checksum=sha(algorithm, b"abcd"))
    assert info.received == ((0, 4),)


@pytest.mark.parametrize("atomic", [True, False])
def test_a_damaged_part_counts_for_nothing_and_can_be_sent_again(tmp_path, atomic):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 8)
    with pytest.raises(ChecksumMismatch) as caught:
        engine.put(upload_id, 0, [b"abXd"], length=4, atomic=atomic, checksum=sha("sha256", b"abcd"),
                   keep_if_empty=True)
    assert caught.value.status == 460
    assert engine.info(upload_id).received == ()
    engine.put(upload_id, 0, [b"abcd"], length=4, atomic=atomic, checksum=sha("sha256", b"abcd"))
    engine.put(upload_id, 4, [b"efgh"], length=4, atomic=atomic)
    info = engine.finish(upload_id)
    assert (engine.backend.storage / info.stored_name).read_bytes() == b"abcdefgh"
    assert info.sha256 == hashlib.sha256(b"abcdefgh").hexdigest()


def test_a_checksummed_request_that_breaks_off_keeps_nothing(tmp_path):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 8)

    def vanishing():
        yield b"ab"
        raise pyfiledrop.ClientDisconnected("gone")

    with pytest.raises(pyfiledrop.ClientDisconnected):
        engine.put(upload_id, 0, vanishing(), length=8, checksum=sha("sha1", b"abcdefgh"), keep_if_empty=True)
    assert engine.info(upload_id).received == () and engine.info(upload_id).state is State.RECEIVING


def test_a_part_received_before_is_refused_when_it_comes_again_with_other_bytes(tmp_path):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 8)
    engine.put(upload_id, 0, [b"abcd"], length=4, atomic=True)
    with pytest.raises(ChecksumMismatch):
        engine.put(upload_id, 0, [b"ABCD"], length=4, atomic=True, checksum=sha("sha256", b"abcd"))
    engine.put(upload_id, 0, [b"abcd"], length=4, atomic=True, checksum=sha("sha256", b"abcd"))  # the same: fine
    engine.put(upload_id, 4, [b"efgh"], length=4, atomic=True)
    info = engine.finish(upload_id)
    assert (engine.backend.storage / info.stored_name).read_bytes() == b"abcdefgh"


def test_a_stored_upload_checks_a_late_copy_of_a_part_too(tmp_path):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 4)
    engine.put(upload_id, 0, [b"abcd"], length=4, atomic=True)
    engine.finish(upload_id)
    assert engine.put(upload_id, 0, [b"abcd"], length=4, checksum=sha("sha1", b"abcd")).state is State.STORED
    with pytest.raises(ChecksumMismatch):
        engine.put(upload_id, 0, [b"abcd"], length=4, checksum=sha("sha1", b"dcba"))


@pytest.mark.parametrize("checksum", [("md5", b"0" * 16), ("sha256", b"short"), ("SHA1", b"0" * 20)])
def test_unknown_or_malformed_checksums_are_refused_before_any_byte(tmp_path, checksum):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 4)
    with pytest.raises(BadRequest):
        engine.put(upload_id, 0, [b"abcd"], length=4, checksum=checksum)
    assert engine.info(upload_id).received == ()


def test_without_keep_if_empty_a_failed_first_request_forgets_the_upload(tmp_path):
    engine = make_engine(tmp_path)
    kept, forgotten = new_upload(engine, 4), new_upload(engine, 4)
    for upload_id, keep in ((kept, True), (forgotten, False)):
        with pytest.raises(ChecksumMismatch):
            engine.put(upload_id, 0, [b"abcd"], length=4, checksum=sha("sha1", b"x"), keep_if_empty=keep)
    assert engine.info(kept).state is State.RECEIVING
    assert engine.info(forgotten).state is State.FAILED
    assert engine.backend.part_stat(kept) is not None and engine.backend.part_stat(forgotten) is None


# -- folders ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("a/b/c.txt", "a/b/c.txt"),
    ("../../etc/passwd", "etc/passwd"),
    ("a\\..\\..\\b.txt", "a/b.txt"),
    ("/abs/x", "abs/x"),
    ("./.git/config", "_git/config"),
    ("a//b/ /c", "a/b/c"),
    ("CON/x.txt", "_CON/x.txt"),
    ("..", "file"),
    ("", "file"),
    ("a/\u202egpj.exe", "a/gpj.exe"),
])
def test_relative_paths_are_sanitised_per_component(raw, expected):
    assert pyfiledrop.sanitize_relative_path(raw) == expected


def test_paths_too_deep_or_too_long_are_refused():
    pyfiledrop.sanitize_relative_path("/".join(["d"] * pyfiledrop.MAX_FOLDER_DEPTH + ["f"]))
    with pytest.raises(BadRequest):
        pyfiledrop.sanitize_relative_path("/".join(["d"] * (pyfiledrop.MAX_FOLDER_DEPTH + 1) + ["f"]))
    with pytest.raises(BadRequest):
        pyfiledrop.sanitize_relative_path("/".join(["x" * 150] * 8))


def store(engine, name, data=b"data", **options):
    upload_id = new_upload(engine, len(data), part_size=max(1, len(data)), name=name, **options)
    engine.put(upload_id, 0, [data], length=len(data), atomic=True)
    return engine.finish(upload_id)


def test_folders_are_made_inside_storage_and_names_numbered_within_them(tmp_path):
    engine = make_engine(tmp_path)
    first, second, top = store(engine, "a/b/c.txt", b"1"), store(engine, "a/b/c.txt", b"2"), store(engine, "c.txt")
    assert (first.stored_name, second.stored_name, top.stored_name) == ("a/b/c.txt", "a/b/c (1).txt", "c.txt")
    storage = engine.backend.storage
    assert (storage / "a/b/c.txt").read_bytes() == b"1" and (storage / "a/b/c (1).txt").read_bytes() == b"2"
    assert engine.ledger.get(second.id).stored_name == "a/b/c (1).txt"


def test_a_file_in_the_way_of_a_folder_is_a_conflict_and_is_left_alone(tmp_path):
    engine = make_engine(tmp_path)
    (engine.backend.storage / "a").write_bytes(b"mine")
    with pytest.raises(Conflict):
        store(engine, "a/c.txt")
    assert (engine.backend.storage / "a").read_bytes() == b"mine"


def test_a_symbolic_link_out_of_storage_is_never_followed(tmp_path):
    engine = make_engine(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (engine.backend.storage / "link").symlink_to(outside)
    with pytest.raises(Forbidden):
        store(engine, "link/c.txt")
    assert list(outside.iterdir()) == []


def test_recovery_finds_a_file_linked_into_a_folder_before_its_record(tmp_path):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 4, name="x/y/z.bin")
    engine.put(upload_id, 0, [b"abcd"], length=4, atomic=True)
    engine.backend.store(upload_id, "x/y/z.bin")      # the link happened, the record did not: a crash here
    engine.ledger.close()
    again = make_engine(tmp_path)
    info = again.info(upload_id)
    assert (info.state, info.stored_name) == (State.STORED, "x/y/z.bin")
    assert info.sha256 == hashlib.sha256(b"abcd").hexdigest() and again.backend.part_stat(upload_id) is None


# -- original times -----------------------------------------------------------------------------------------

def test_the_stored_file_keeps_the_original_modification_time(tmp_path):
    engine = make_engine(tmp_path)
    info = store(engine, "photo.jpg", mtime=1_500_000_000.5)
    assert os.stat(engine.backend.storage / "photo.jpg").st_mtime == pytest.approx(1_500_000_000.5)
    assert engine.ledger.get(info.id).mtime == pytest.approx(1_500_000_000.5)


def test_an_impossible_time_is_ignored_not_fatal(tmp_path):
    engine = make_engine(tmp_path)
    info = store(engine, "odd.bin", mtime=1e300)
    assert info.state is State.STORED


def test_a_version_1_ledger_is_migrated_keeping_its_records(tmp_path):
    _, chunks = tmp_path / "storage", tmp_path / "chunks"
    chunks.mkdir()
    database = sqlite3.connect(chunks / Ledger.FILENAME)
    database.executescript(Ledger.MIGRATIONS[0] + "PRAGMA user_version = 1;")
    database.execute("INSERT INTO uploads VALUES ('old', 'a.txt', 1, 1, '', 1.0, 1.0, 'stored', '[[0,1]]', "
                     "'ab', 'a.txt', 1.0, '')")
    database.commit()
    database.close()
    ledger = Ledger(chunks / Ledger.FILENAME)
    assert ledger.version == len(Ledger.MIGRATIONS) and ledger.get("old").mtime is None
    assert ledger.get("old").stored_name == "a.txt"


# -- cancelling ---------------------------------------------------------------------------------------------

def test_abort_removes_the_partial_and_keeps_a_deleted_record(tmp_path):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 8)
    engine.put(upload_id, 0, [b"abcd"], length=4, atomic=True)
    info = engine.abort(upload_id)
    assert info.state is State.DELETED and engine.ledger.get(upload_id).state is State.DELETED
    assert engine.backend.part_stat(upload_id) is None
    with pytest.raises(NotFound):
        engine.put(upload_id, 4, [b"efgh"], length=4, atomic=True)
    assert list(engine.backend.storage.iterdir()) == []


def test_abort_stops_a_request_still_writing(tmp_path):
    engine = make_engine(tmp_path)
    upload_id = new_upload(engine, 8)
    started, release = threading.Event(), threading.Event()
    outcome = []

    def slow():
        yield b"ab"
        started.set()
        release.wait(10)
        yield b"cd"

    def writer():
        try:
            engine.put(upload_id, 0, slow(), length=4, atomic=True)
            outcome.append("written")
        except Superseded:
            outcome.append("stopped")

    thread = threading.Thread(target=writer)
    thread.start()
    assert started.wait(10)
    engine.abort(upload_id)
    release.set()
    thread.join(10)
    assert outcome == ["stopped"] and engine.ledger.get(upload_id).state is State.DELETED
    assert os.listdir(engine.backend.chunks) == [Ledger.FILENAME] or all(
        not name.endswith(".part") for name in os.listdir(engine.backend.chunks))


def test_abort_of_a_stored_upload_changes_nothing(tmp_path):
    engine = make_engine(tmp_path)
    info = store(engine, "kept.txt")
    assert engine.abort(info.id).state is State.STORED
    assert (engine.backend.storage / "kept.txt").exists()


# -- the ledger's shared commits ------------------------------------------------------------------------------

def _record(upload_id: str, name: str | None = "a.txt") -> pyfiledrop.UploadInfo:
    return pyfiledrop.UploadInfo(id=upload_id, name=name, size=1, part_size=1, client="192.0.2.1", created=1.0,
                                 updated=1.0)


def test_saves_that_wait_for_a_commit_share_the_next_and_a_failing_one_fails_alone(tmp_path):
    ledger = Ledger(tmp_path / Ledger.FILENAME)
    results: dict[str, object] = {}

    def save(upload_id: str, name: str | None) -> None:
        try:
            ledger.save(_record(upload_id, name), mark=(1, 2, 3, 4) if upload_id.endswith("3") else None)
            results[upload_id] = "saved"
        except sqlite3.Error as error:
            results[upload_id] = error

    with ledger._lock:  # a commit in progress: every save below waits for the next one
        threads = [threading.Thread(target=save, args=(f"up{n}", None if n == 5 else f"f{n}.txt"))
                   for n in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(ledger._waiting) < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ledger._waiting) == 8
    for thread in threads:
        thread.join(10)
    assert isinstance(results.pop("up5"), sqlite3.IntegrityError)  # name NOT NULL: that save alone fails
    assert results == {f"up{n}": "saved" for n in range(8) if n != 5}
    assert ledger.get("up5") is None and ledger.get("up7").name == "f7.txt"
    assert ledger.marks(["up3", "up4"]) == {"up3": (1, 2, 3, 4)}
    ledger.close()


def _wal_pages(ledger: Ledger) -> int:
    return os.path.getsize(ledger.path + "-wal") // (4096 + 24)


def test_a_receiving_record_saved_again_writes_only_what_changed(tmp_path):
    ledger = Ledger(tmp_path / Ledger.FILENAME)
    info = _record("up0").changed(size=10 ** 9, part_size=10 ** 6, received=())
    for number in range(50):  # other records around it, so that each index spans pages of its own
        ledger.save(_record(f"other{number}", f"other{number}.txt"))
    ledger.save(info)
    before = _wal_pages(ledger)
    for chunk in range(1, 21):  # what a chunk changes: the ranges received and the time
        info = info.changed(received=((0, chunk * 10 ** 6),), updated=1.0 + chunk)
        ledger.save(info)
        assert ledger.get("up0") == info
    # the table's row and the one index of time (uploads_by_state) per commit: not all six b-trees
    assert (_wal_pages(ledger) - before) / 20 <= 2
    stored = info.changed(state=State.STORED, sha256="ab" * 32, stored_name="a.txt", finished=30.0)
    ledger.save(stored, mark=(1, 2, 3, 4))
    assert ledger.get("up0") == stored and ledger.marks(["up0"]) == {"up0": (1, 2, 3, 4)}
    ledger.close()


def test_a_failed_save_leaves_the_next_one_whole(tmp_path):
    ledger = Ledger(tmp_path / Ledger.FILENAME)
    info = _record("up0", "first.txt")
    ledger.save(info)
    with pytest.raises(sqlite3.IntegrityError):
        ledger.save(info.changed(name=None, updated=2.0))  # NOT NULL: nothing of it is committed
    assert ledger.get("up0") == info
    renamed = info.changed(name="second.txt")
    ledger.save(renamed)
    again = renamed.changed(updated=3.0)
    ledger.save(again)
    assert ledger.get("up0") == again
    ledger.close()
    reopened = Ledger(tmp_path / Ledger.FILENAME)
    assert reopened.get("up0") == again
    reopened.close()


def _wait_for(condition) -> bool:
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_saves_of_one_record_in_one_commit_end_as_the_last_of_them(tmp_path):
    ledger = Ledger(tmp_path / Ledger.FILENAME)
    first = _record("up0", "a.txt")
    ledger.save(first)
    # queued in this order behind a commit in progress; the second has the first record's name again
    versions = [first.changed(name="b.txt", updated=2.0), first.changed(updated=3.0)]
    threads = [threading.Thread(target=ledger.save, args=(version,)) for version in versions]
    with ledger._lock:
        for number, thread in enumerate(threads, 1):
            thread.start()
            assert _wait_for(lambda: len(ledger._waiting) == number)
    for thread in threads:
        thread.join(10)
    assert ledger.get("up0") == versions[1]
    ledger.close()


def test_every_stored_content_is_found_by_its_sha256_before_and_after_a_restart(tmp_path):
    """Look-ups by content skip the query when a bit filter says no upload has that sha256: it must never say
    so for one that does (saved in this process, or found in the ledger at start)."""
    ledger = Ledger(tmp_path / Ledger.FILENAME)
    digests = [hashlib.sha256(str(number).encode()).hexdigest() for number in range(300)]
    for number, digest in enumerate(digests):
        ledger.save(_record(f"up{number}").changed(state=State.STORED, sha256=digest, stored_name=f"{number}.txt",
                                                   finished=2.0))
    assert all([info.id for info in ledger.stored_with(digest, 1)] == [f"up{number}"]
               for number, digest in enumerate(digests))
    assert ledger.stored_with(hashlib.sha256(b"never stored").hexdigest(), 1) == []
    ledger.close()
    reopened = Ledger(tmp_path / Ledger.FILENAME)
    assert all([info.id for info in reopened.stored_with(digest, 1)] == [f"up{number}"]
               for number, digest in enumerate(digests))
    reopened.close()
