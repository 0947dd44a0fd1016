"""The upload engine on its own: no HTTP, real files in temporary folders."""
import hashlib
import json
import os
import random
import threading
import uuid

import pytest

from pyfiledrop import BadRequest, ChunkInfo, Conflict, NotFound, TooLarge, UploadStore, chunk_count


def make_store(tmp_path, **options):
    storage, chunks = tmp_path / "storage", tmp_path / "chunks"
    storage.mkdir(exist_ok=True)
    chunks.mkdir(exist_ok=True)
    options.setdefault("max_size", 10 ** 9)
    options.setdefault("partial_ttl", 3600)
    return UploadStore(storage, chunks, **options)


def chunks_of(data, size):
    count = chunk_count(len(data), size)
    return [(i, data[i * size:(i + 1) * size]) for i in range(count)]


def info(upload_id, index, data, size):
    return ChunkInfo(upload_id, index, len(data), size, chunk_count(len(data), size))


def pieces(data, step=7):
    """A chunk's bytes in uneven pieces, as a network read delivers them."""
    return (data[i:i + step] for i in range(0, len(data), step)) if data else iter(())


def send_all(store, data, size, name="f.bin", upload_id=None, order=None):
    upload_id = upload_id or str(uuid.uuid4())
    parts = chunks_of(data, size)
    reply = None
    for index in order if order is not None else range(len(parts)):
        reply = store.write_chunk(info(upload_id, index, data, size), name, pieces(parts[index][1]))
    return upload_id, reply


@pytest.mark.parametrize("order", ["forward", "backward", "shuffled"])
def test_chunks_in_any_order_store_the_exact_bytes(tmp_path, order):
    store = make_store(tmp_path)
    data = os.urandom(1000)
    indexes = list(range(chunk_count(len(data), 64)))
    if order == "backward":
        indexes.reverse()
    elif order == "shuffled":
        random.Random(7).shuffle(indexes)
    upload_id, reply = send_all(store, data, 64, order=indexes)
    assert reply == {"id": upload_id, "name": "f.bin", "size": 1000, "sha256": hashlib.sha256(data).hexdigest(),
                     "complete": True}
    assert (store.storage_dir / "f.bin").read_bytes() == data
    assert sorted(p.name for p in store.chunks_dir.iterdir()) == [f"{upload_id}.done"]


def test_replies_before_completion_count_chunks(tmp_path):
    store = make_store(tmp_path)
    data = os.urandom(100)
    reply = store.write_chunk(info("u1", 0, data, 40), "f.bin", pieces(data[:40]))
    assert reply == {"id": "u1", "complete": False, "received_chunks": 1, "total_chunks": 3}
    assert store.status("u1")["missing_chunks"] == [1, 2]


def test_empty_file_is_one_empty_chunk(tmp_path):
    store = make_store(tmp_path)
    _, reply = send_all(store, b"", 10, name="empty.txt")
    assert reply["complete"] and reply["size"] == 0
    assert (store.storage_dir / "empty.txt").read_bytes() == b""


def test_a_retried_chunk_is_not_written_again(tmp_path):
    store = make_store(tmp_path)
    data = os.urandom(300)
    store.write_chunk(info("u1", 0, data, 100), "f.bin", pieces(data[:100]))
    # the same chunk again, with different bytes: a retry must not overwrite what was received
    reply = store.write_chunk(info("u1", 0, data, 100), "f.bin", pieces(b"x" * 100))
    assert reply["received_chunks"] == 1
    store.write_chunk(info("u1", 1, data, 100), "f.bin", pieces(data[100:200]))
    final = store.write_chunk(info("u1", 2, data, 100), "f.bin", pieces(data[200:]))
    assert (store.storage_dir / "f.bin").read_bytes() == data
    # a retry of the completing chunk answers with the same result and stores nothing new
    again = store.write_chunk(info("u1", 2, data, 100), "f.bin", pieces(data[200:]))
    assert again == final
    assert os.listdir(store.storage_dir) == ["f.bin"]


def test_completed_upload_is_recognised_after_restart(tmp_path):
    data = os.urandom(50)
    upload_id, first = send_all(make_store(tmp_path), data, 20)
    restarted = make_store(tmp_path)
    again = restarted.write_chunk(info(upload_id, 1, data, 20), "f.bin", pieces(data[20:40]))
    assert again == first
    assert restarted.status(upload_id)["available"] is True
    assert os.listdir(restarted.storage_dir) == ["f.bin"]


def test_a_chunk_of_the_wrong_length_is_refused_and_not_counted(tmp_path):
    store = make_store(tmp_path)
    data = os.urandom(100)
    for wrong in (data[:39], data[:41]):
        with pytest.raises(BadRequest, match="expected 40"):
            store.write_chunk(info("u1", 0, data, 40), "f.bin", pieces(wrong))
    assert store.status("u1")["received_chunks"] == 0
    send_all(store, data, 40, upload_id="u1")
    assert (store.storage_dir / "f.bin").read_bytes() == data


def test_a_long_chunk_never_writes_past_its_own_range(tmp_path):
    store = make_store(tmp_path)
    data = os.urandom(100)
    store.write_chunk(info("u1", 1, data, 40), "f.bin", pieces(data[40:80]))
    with pytest.raises(BadRequest):
        store.write_chunk(info("u1", 0, data, 40), "f.bin", pieces(b"\xff" * 90))
    store.write_chunk(info("u1", 0, data, 40), "f.bin", pieces(data[:40]))
    store.write_chunk(info("u1", 2, data, 40), "f.bin", pieces(data[80:]))
    assert (store.storage_dir / "f.bin").read_bytes() == data


@pytest.mark.parametrize("change", ["name", "size", "chunk_size"])
def test_an_upload_id_cannot_change_its_file(tmp_path, change):
    store = make_store(tmp_path)
    data = os.urandom(100)
    store.write_chunk(info("u1", 0, data, 40), "f.bin", pieces(data[:40]))
    name, other, size = "f.bin", data, 40
    if change == "name":
        name = "g.bin"
    elif change == "size":
        other = data + b"x"
    else:
        size = 50
    with pytest.raises(BadRequest, match="another name, size or chunk size"):
        store.write_chunk(info("u1", 1, other, size), name, pieces(other[size:2 * size]))


def test_resume_after_restart_from_persisted_state(tmp_path):
    data = os.urandom(500)
    first = make_store(tmp_path)
    for index, part in chunks_of(data, 100)[:3]:
        first.write_chunk(info("resume-1", index, data, 100), "r.bin", pieces(part))
    state = json.loads((first.chunks_dir / "resume-1.state").read_text())
    assert state["total_chunks"] == 5
    second = make_store(tmp_path)   # a new process: nothing in memory
    assert second.status("resume-1")["missing_chunks"] == [3, 4]
    for index, part in chunks_of(data, 100)[3:]:
        reply = second.write_chunk(info("resume-1", index, data, 100), "r.bin", pieces(part))
    assert reply["sha256"] == hashlib.sha256(data).hexdigest()
    assert (second.storage_dir / "r.bin").read_bytes() == data


def test_state_file_is_replaced_whole_and_leaves_no_temp_files(tmp_path):
    store = make_store(tmp_path)
    data = os.urandom(400)
    for index, part in chunks_of(data, 100)[:3]:
        store.write_chunk(info("u1", index, data, 100), "f.bin", pieces(part))
        json.loads((store.chunks_dir / "u1.state").read_text())
    assert sorted(os.listdir(store.chunks_dir)) == ["u1.part", "u1.state"]
    assert os.path.getsize(store.chunks_dir / "u1.part") == 400  # preallocated to the full size


def test_parallel_chunks_complete_exactly_once(tmp_path):
    store = make_store(tmp_path)
    data = os.urandom(64 * 1024)
    parts = chunks_of(data, 1024)
    replies, errors = [], []

    def send(index, part):
        try:
            replies.append(store.write_chunk(info("par", index, data, 1024), "p.bin", pieces(part, 100)))
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=send, args=p) for p in parts + parts[:8]]  # with duplicates
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert os.listdir(store.storage_dir) == ["p.bin"]
    assert (store.storage_dir / "p.bin").read_bytes() == data
    completed = {r["sha256"] for r in replies if r["complete"]}
    assert completed == {hashlib.sha256(data).hexdigest()}


def test_existing_files_are_never_overwritten(tmp_path):
    store = make_store(tmp_path)
    (store.storage_dir / "same.txt").write_bytes(b"precious")
    (store.storage_dir / "same (1).txt").mkdir()
    _, reply = send_all(store, b"new bytes", 4, name="same.txt")
    assert reply["name"] == "same (2).txt"
    assert (store.storage_dir / "same.txt").read_bytes() == b"precious"
    assert (store.storage_dir / "same (2).txt").read_bytes() == b"new bytes"


def test_plain_upload_and_limit(tmp_path):
    store = make_store(tmp_path, max_size=10)
    pending = store.receive_plain(pieces(b"0123456789"))
    assert store.commit(pending, "ok.txt")["name"] == "ok.txt"
    with pytest.raises(TooLarge):
        store.receive_plain(pieces(b"0123456789A"))
    with pytest.raises(TooLarge):
        store.receive_plain(pieces(b""), declared_size=11)
    assert os.listdir(store.chunks_dir) == [f"{pending.id}.done"]
    assert os.listdir(store.storage_dir) == ["ok.txt"]


def test_declared_size_beyond_free_space_is_refused_before_writing(tmp_path):
    store = make_store(tmp_path, max_size=2 ** 62)
    huge = 2 ** 61
    with pytest.raises(Exception) as error:
        store.write_chunk(ChunkInfo("big", 0, huge, 2 ** 29, chunk_count(huge, 2 ** 29)), "big.bin", pieces(b""))
    assert error.value.status == 507
    assert os.listdir(store.chunks_dir) == []


def test_expire_removes_only_stale_partial_uploads(tmp_path):
    clock = [10_000_000.0]
    store = make_store(tmp_path, partial_ttl=3600, clock=lambda: clock[0])
    data = os.urandom(100)
    store.write_chunk(info("old", 0, data, 40), "old.bin", pieces(data[:40]))
    store.write_chunk(info("new", 0, data, 40), "new.bin", pieces(data[:40]))
    send_all(store, b"done", 10, name="done.txt", upload_id="finished")
    now = os.path.getmtime(store.chunks_dir / "new.state")
    old_time = now - 7200
    for suffix in (".part", ".state"):
        os.utime(store.chunks_dir / f"old{suffix}", (old_time, old_time))
    assert store.expire(now=now) == 1
    assert sorted(os.listdir(store.chunks_dir)) == ["finished.done", "new.part", "new.state"]
    with pytest.raises(NotFound):
        store.status("old")
    assert store.expire(now=now + 7200) == 1  # now "new" is stale too; the finished record stays
    assert sorted(os.listdir(store.chunks_dir)) == ["finished.done"]
    assert (store.storage_dir / "done.txt").read_bytes() == b"done"


def test_lookup_needs_the_exact_id(tmp_path):
    store = make_store(tmp_path)
    upload_id, _ = send_all(store, b"hello", 10, name="h.txt")
    path, record = store.lookup(upload_id)
    assert path.read_bytes() == b"hello" and record["name"] == "h.txt"
    for wrong in (upload_id[:8], upload_id + "0", "../" + upload_id, upload_id.upper() + "x"):
        with pytest.raises(NotFound):
            store.lookup(wrong)


def test_finish_refuses_an_incomplete_upload(tmp_path):
    store = make_store(tmp_path)
    data = os.urandom(100)
    store.write_chunk(info("u1", 0, data, 40), "f.bin", pieces(data[:40]))
    with pytest.raises(Conflict):
        store.finish("u1")
    assert os.listdir(store.storage_dir) == []


def test_a_chunk_that_carries_the_file_past_the_limit_is_413(tmp_path):
    store = make_store(tmp_path, max_size=100)
    data = os.urandom(100)
    with pytest.raises(TooLarge):
        store.write_chunk(info("u1", 1, data, 50), "f.bin", pieces(b"x" * 200, 50))
    with pytest.raises(BadRequest):  # too long for its chunk, but not past the limit
        store.write_chunk(info("u1", 0, data, 50), "f.bin", pieces(b"x" * 60, 50))
    assert store.status("u1")["received_chunks"] == 0


def test_a_retry_waits_for_a_copy_of_itself_still_being_received(tmp_path):
    store = make_store(tmp_path)
    data = os.urandom(200)
    first_started, release = threading.Event(), threading.Event()

    def slow_first_copy():
        yield data[:50]
        first_started.set()
        release.wait(10)
        yield data[50:100]

    replies = []
    first = threading.Thread(target=lambda: replies.append(
        store.write_chunk(info("u1", 0, data, 100), "f.bin", slow_first_copy())))
    first.start()
    assert first_started.wait(10)
    retry = threading.Thread(target=lambda: replies.append(
        store.write_chunk(info("u1", 0, data, 100), "f.bin", pieces(b"R" * 100))))
    retry.start()
    release.set()
    first.join(10)
    retry.join(10)
    assert [r["received_chunks"] for r in replies] == [1, 1]
    store.write_chunk(info("u1", 1, data, 100), "f.bin", pieces(data[100:]))
    assert (store.storage_dir / "f.bin").read_bytes() == data   # the retry's bytes were never written
