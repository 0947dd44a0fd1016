"""The chunk protocol's optional fields and the routes the page resumes with: part hashes, folders, original
times, the status of many uploads at once, cancel, and the same content stored once (over real HTTP)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, chunk_fields, running_server, sha256, upload_files

import pyfiledrop

CHUNK = 64 * 1024


def data_of(size: int, seed: int = 1) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (size // 32 + 1))[:size]


def part(data: bytes, index: int) -> bytes:
    return data[index * CHUNK:(index + 1) * CHUNK]


def send(server, upload_id, index, data, chunk_data=None, filename="file.bin", **extra):
    chunk_data = part(data, index) if chunk_data is None else chunk_data
    fields = chunk_fields(upload_id, index, len(data), CHUNK)
    fields.update({key: str(value) for key, value in extra.items()})
    return server.post_form(fields, [("file", filename, chunk_data)])


def send_all(server, upload_id, data, filename="file.bin", **extra) -> dict:
    reply = None
    for index in range(pyfiledrop.chunk_count(len(data), CHUNK)):
        status, _, body = send(server, upload_id, index, data, filename=filename,
                               dzchunksha256=sha256(part(data, index)), **extra)
        assert status == 200, body
        reply = json.loads(body)
    return reply


def post_json(server, path, value):
    status, _, body = server.request("POST", path, json.dumps(value).encode(),
                                     {"Content-Type": "application/json"})
    return status, (json.loads(body) if body.startswith(b"{") else body.decode())


# -- part hashes ------------------------------------------------------------------------------------------------

def test_a_part_with_the_wrong_hash_is_refused_and_counts_for_nothing(server):
    data = data_of(3 * CHUNK)
    damaged = bytearray(part(data, 1))
    damaged[100] ^= 1
    status, _, body = send(server, "hashes", 1, data, bytes(damaged), dzchunksha256=sha256(part(data, 1)))
    assert status == 460, body
    assert server.engine.info("hashes").received_bytes == 0
    assert send_all(server, "hashes", data)["complete"]
    assert (server.storage / "file.bin").read_bytes() == data


def test_a_stored_part_sent_again_with_other_bytes_is_refused(server):
    data = data_of(3 * CHUNK)
    assert send(server, "again", 0, data, dzchunksha256=sha256(part(data, 0)))[0] == 200
    other = data_of(CHUNK, seed=2)
    status, _, body = send(server, "again", 0, data, other, dzchunksha256=sha256(other))
    assert status == 460, body
    assert send(server, "again", 0, data, dzchunksha256=sha256(part(data, 0)))[0] == 200


def test_with_the_file_hash_a_damaged_part_is_found_at_the_end_and_asked_for_again(server):
    """The page sends the whole file's sha256 once it knows it ("later" before): the parts' own hashes are then
    checked only if the file's is not that one, and a damaged part is dropped from the upload's status, to be
    sent again."""
    data = data_of(4 * CHUNK, seed=5)
    damaged = bytearray(part(data, 2))
    damaged[7] ^= 1
    whole = hashlib.sha256(data).hexdigest()
    for index in (0, 1, 3, 2):
        sent = bytes(damaged) if index == 2 else None
        status, _, body = send(server, "whole", index, data, sent, dzchunksha256=sha256(part(data, index)),
                               dzfilesha256="later" if index < 2 else whole)
        assert status == 200, body
    assert json.loads(body)["complete"] is False
    status, reply = post_json(server, "/api/uploads/status", {"ids": ["whole"]})
    assert status == 200 and reply["uploads"]["whole"]["missing_chunks"] == [2], reply
    assert list(server.storage.iterdir()) == []
    status, _, body = send(server, "whole", 2, data, dzchunksha256=sha256(part(data, 2)), dzfilesha256=whole)
    assert status == 200 and json.loads(body)["complete"], body
    assert (server.storage / "file.bin").read_bytes() == data


@pytest.mark.parametrize("value", ["xyz", "ab" * 31, "00" * 33])
def test_a_malformed_file_hash_is_a_clear_400(server, value):
    data = data_of(2 * CHUNK)
    status, _, body = send(server, "malformed-whole", 0, data, dzfilesha256=value)
    assert status == 400 and b"dzfilesha256" in body, body
    assert list(server.storage.iterdir()) == []


@pytest.mark.parametrize("value", ["xyz", "ab" * 31, "00" * 33])
def test_a_malformed_part_hash_is_a_clear_400(server, value):
    data = data_of(CHUNK)
    status, _, body = send(server, "malformed", 0, data, dzchunksha256=value)
    assert status == 400 and b"dzchunksha256" in body
    assert upload_files(server.chunks) == [] and list(server.storage.iterdir()) == []


# -- folders and times ------------------------------------------------------------------------------------------

def test_a_relative_path_keeps_its_folders_inside_storage(server):
    data = data_of(2 * CHUNK + 5)
    reply = send_all(server, "folder", data, filename="c.txt", dzrelpath="../a/./b/../c.txt")
    assert reply["name"] == "a/b/c.txt"
    assert (server.storage / "a" / "b" / "c.txt").read_bytes() == data
    assert not (server.storage.parent / "a").exists()


def test_the_original_modification_time_is_kept(server):
    data = data_of(2 * CHUNK)
    send_all(server, "times", data, dzmtime="1262304000123")   # 2010-01-01, as File.lastModified gives it
    assert os.stat(server.storage / "file.bin").st_mtime == pytest.approx(1262304000.123, abs=0.01)


@pytest.mark.parametrize("value", ["-5", "1e12", "nan", "99999999999999"])
def test_a_bad_modification_time_is_a_clear_400(server, value):
    status, _, body = send(server, "badtime", 0, data_of(CHUNK), dzmtime=value)
    assert status == 400 and b"dzmtime" in body


# -- many at once -----------------------------------------------------------------------------------------------

def test_the_status_of_many_uploads_in_one_request(server):
    data = data_of(3 * CHUNK)
    send(server, "half", 0, data)
    send_all(server, "whole", data)
    status, reply = post_json(server, "/api/uploads/status", {"ids": ["half", "whole", "never", "../x"]})
    assert status == 200
    uploads = reply["uploads"]
    assert uploads["half"]["complete"] is False and uploads["half"]["missing_chunks"] == [1, 2]
    assert uploads["whole"]["complete"] is True and uploads["whole"]["sha256"] == sha256(data)
    assert uploads["whole"]["available"] is True
    assert "gone" in uploads["never"] and "gone" in uploads["../x"]


@pytest.mark.parametrize("body", [b"[]", b"{", b'{"ids": "x"}', json.dumps({"ids": ["a"] * 1001}).encode()])
def test_a_bad_status_request_is_a_clear_400(server, body):
    status, _, reply = server.request("POST", "/api/uploads/status", body, {"Content-Type": "application/json"})
    assert status == 400 and b"Traceback" not in reply


# -- cancel -----------------------------------------------------------------------------------------------------

def test_cancel_removes_the_partial_file_and_ends_the_upload(server):
    data = data_of(3 * CHUNK)
    send(server, "cancel-me", 0, data)
    assert upload_files(server.chunks) != []
    status, reply = post_json(server, "/api/uploads/cancel-me/cancel", {})
    assert status == 200 and reply["cancelled"] is True
    assert upload_files(server.chunks) == []
    assert server.engine.ledger.get("cancel-me").state is pyfiledrop.State.DELETED
    assert list(server.storage.iterdir()) == []
    # A part that was on its way when the client cancelled arrives late: it starts nothing, leaves nothing.
    status, _, body = send(server, "cancel-me", 1, data)
    assert status == 409, body
    assert upload_files(server.chunks) == []
    # The page's ids come from the file: the same file given again later starts again, from nothing.
    now = server.engine.clock
    server.engine.clock = lambda: now() + pyfiledrop.CANCEL_QUIET_S + 1
    status, _, body = send(server, "cancel-me", 1, data)
    assert status == 200 and json.loads(body)["received_chunks"] == 1, body


def test_cancel_leaves_a_stored_upload_alone(server):
    data = data_of(2 * CHUNK)
    send_all(server, "kept", data)
    status, reply = post_json(server, "/api/uploads/kept/cancel", {})
    assert status == 200 and reply["cancelled"] is False
    assert (server.storage / "file.bin").read_bytes() == data


def test_only_the_starting_address_may_cancel(server):
    server.engine.create("theirs", "a.bin", size=3 * CHUNK, part_size=CHUNK, client="192.0.2.7")
    status, _ = post_json(server, "/api/uploads/theirs/cancel", {})
    assert status == 403
    assert server.engine.info("theirs").state is pyfiledrop.State.RECEIVING


def test_a_form_from_another_site_cannot_cancel(server):
    data = data_of(3 * CHUNK)
    send(server, "csrf", 0, data)
    status, _, body = server.request("POST", "/api/uploads/csrf/cancel", b"{}", {"Content-Type": "text/plain"})
    assert status == 400 and b"application/json" in body
    assert server.engine.info("csrf").state is pyfiledrop.State.RECEIVING


def test_deleting_an_upload_is_the_admins_alone(server):
    # DELETE /api/uploads/ID is the admin's; without --admin-password nobody may, the uploader neither.
    data = data_of(CHUNK)
    send(server, "mine", 0, data)
    assert server.request("DELETE", "/api/uploads/mine")[0] == 403
    assert server.engine.info("mine").state is pyfiledrop.State.STORED


# -- the same content, stored once ------------------------------------------------------------------------------

def test_a_duplicate_completed_upload_takes_no_new_space(server):
    data = data_of(3 * CHUNK + 7)
    send_all(server, "first", data, filename="one.bin")
    reply = send_all(server, "second", data, filename="two.bin")
    assert reply["name"] == "two.bin" and reply["sha256"] == sha256(data)
    one, two = os.stat(server.storage / "one.bin"), os.stat(server.storage / "two.bin")
    assert (one.st_ino, one.st_dev) == (two.st_ino, two.st_dev)
    assert server.engine.ledger.get("second").reason == "same content as one.bin"


def test_a_stored_file_changed_by_hand_is_not_linked(server):
    data = data_of(3 * CHUNK)
    send_all(server, "first", data, filename="one.bin")
    edited = bytearray(data)
    edited[5] ^= 1
    (server.storage / "one.bin").write_bytes(bytes(edited))  # same size, other bytes than the ledger says
    send_all(server, "second", data, filename="two.bin")
    assert (server.storage / "two.bin").read_bytes() == data
    assert os.stat(server.storage / "one.bin").st_ino != os.stat(server.storage / "two.bin").st_ino


def claim(server, upload_id, data, name="copy.bin", **extra):
    request = {"sha256": sha256(data), "name": name, "size": len(data), "chunk_size": CHUNK, **extra}
    return post_json(server, f"/api/uploads/{upload_id}/content", request)


def test_known_content_completes_at_once_without_its_bytes(server):
    data = data_of(5 * CHUNK)
    send_all(server, "original", data, filename="photo.jpg")
    status, reply = claim(server, "copy", data, name="again.jpg", path="holiday/again.jpg")
    assert status == 200 and reply["complete"] is True, reply
    assert reply["name"] == "holiday/again.jpg" and reply["same_as"] == "photo.jpg"
    assert os.path.samefile(server.storage / "photo.jpg", server.storage / "holiday" / "again.jpg")
    assert server.engine.ledger.get("copy").state is pyfiledrop.State.STORED
    assert upload_files(server.chunks) == []
    status, _, body = send(server, "copy", 1, data, filename="again.jpg", dzrelpath="holiday/again.jpg")
    assert status == 200 and json.loads(body)["complete"] is True   # a part still in flight: answered, unwritten


def test_a_claim_midway_removes_the_partial_file(server):
    data = data_of(5 * CHUNK)
    send_all(server, "original", data, filename="photo.jpg")
    send(server, "midway", 0, data, filename="b.jpg")
    _, reply = claim(server, "midway", data, name="b.jpg")
    assert reply["complete"] is True
    assert upload_files(server.chunks) == []
    assert (server.storage / "b.jpg").read_bytes() == data


def test_unknown_content_is_no_claim(server):
    data = data_of(5 * CHUNK)
    status, reply = claim(server, "unknown", data)
    assert status == 200 and reply["complete"] is False
    assert send_all(server, "unknown", data, filename="copy.bin")["complete"]


def test_a_claim_with_the_same_name_and_content_is_the_same_file(server):
    data = data_of(2 * CHUNK)
    send_all(server, "original", data, filename="same.bin")
    assert claim(server, "copy", data, name="same.bin")[1]["name"] == "same.bin"
    assert sorted(os.listdir(server.storage)) == ["same.bin"]


def test_no_claims_where_downloads_are_on(tmp_path):
    # A claim needs only a hash: with downloads on, it would hand out any file whose hash someone knows.
    with running_server(tmp_path, allow_downloads=True) as server:
        data = data_of(2 * CHUNK)
        send_all(server, "original", data)
        assert claim(server, "copy", data)[1]["complete"] is False


@pytest.mark.parametrize("request_body", [
    {"sha256": "zz", "name": "a", "size": 1, "chunk_size": 1},
    {"sha256": "00" * 32, "name": "a", "size": -1, "chunk_size": 1},
    {"sha256": "00" * 32, "name": "a", "size": 10, "chunk_size": 0},
    {"sha256": "00" * 32, "name": "a", "size": True, "chunk_size": 1},
])
def test_a_bad_claim_is_a_clear_400(server, request_body):
    status, reply = post_json(server, "/api/uploads/x/content", request_body)
    assert status == 400, reply
    assert upload_files(server.chunks) == []


# -- a kill at every step of storing a duplicate ----------------------------------------------------------------

DEDUP_CRASH_SCRIPT = r"""
import hashlib, os, signal, sys
sys.path.insert(0, sys.argv[1])
import pyfiledrop
storage, chunks, step, how = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
armed = False

def checkpoint(name):
    if armed and name == step:
        os.kill(os.getpid(), signal.SIGKILL)

backend = pyfiledrop.LocalBackend(pyfiledrop.Path(storage), pyfiledrop.Path(chunks), checkpoint=checkpoint)
ledger = pyfiledrop.Ledger(pyfiledrop.Path(chunks) / pyfiledrop.Ledger.FILENAME)
engine = pyfiledrop.Engine(ledger, backend, pyfiledrop.EngineLimits(10 ** 9), checkpoint=checkpoint)
data = bytes(range(256)) * 40
engine.receive_whole("x.bin", [data], client="", size=len(data), upload_id="original")
armed = True
engine.create("copy", "y.bin", size=len(data), part_size=4096, client="")
engine.put("copy", 0, [data[:4096]], length=4096)
if how == "claim":
    engine.complete_by_content("copy", hashlib.sha256(data).hexdigest())
else:
    for offset in range(4096, len(data), 4096):
        engine.put("copy", offset, [data[offset:offset + 4096]], length=len(data[offset:offset + 4096]))
    engine.finish("copy")
print("finished without a crash")
"""


# (a claim hashes the stored file, not the upload: it has no "hashed" step)
@pytest.mark.parametrize("how, step", [("finish", "hashed"), ("finish", "linked"), ("finish", "recorded"),
                                       ("finish", "discarded"), ("claim", "linked"), ("claim", "recorded"),
                                       ("claim", "discarded")])
def test_a_kill_while_storing_a_duplicate_ends_with_one_link_and_nothing_left(tmp_path, how, step):
    storage, chunks = tmp_path / "storage", tmp_path / "chunks"
    storage.mkdir()
    chunks.mkdir()
    result = subprocess.run([sys.executable, "-c", DEDUP_CRASH_SCRIPT, str(ROOT), str(storage), str(chunks), step,
                             how], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == -9, result.stdout + result.stderr
    data = bytes(range(256)) * 40
    ledger = pyfiledrop.Ledger(chunks / pyfiledrop.Ledger.FILENAME)
    engine = pyfiledrop.Engine(ledger, pyfiledrop.LocalBackend(storage, chunks), pyfiledrop.EngineLimits(10 ** 9))
    info = engine.info("copy")
    if info.state is pyfiledrop.State.RECEIVING:   # the client's retry (its last part, or its claim again)
        info = engine.complete_by_content("copy", sha256(data)) if how == "claim" else engine.finish("copy")
    assert info.state is pyfiledrop.State.STORED and info.stored_name == "y.bin"
    assert sorted(os.listdir(storage)) == ["x.bin", "y.bin"]
    assert os.path.samefile(storage / "x.bin", storage / "y.bin")
    assert upload_files(chunks) == []
    ledger.close()


# -- a resumed upload is checked part by part ---------------------------------------------------------------------

def test_verify_names_the_received_parts_that_hold_other_bytes(server):
    data = data_of(4 * CHUNK)
    other = data_of(4 * CHUNK, seed=9)
    for index in (0, 2):
        assert send(server, "mixed", index, data)[0] == 200
    request = {"parts": {"0": sha256(part(data, 0)), "2": sha256(part(other, 2)), "3": sha256(part(other, 3))}}
    status, reply = post_json(server, "/api/uploads/mixed/verify", request)
    assert status == 200 and reply["mismatched"] == [2]   # part 3 is not there yet: not judged


@pytest.mark.parametrize("parts", [{"9": "00" * 32}, {"x": "00" * 32}, {"0": "zz"}, [1],
                                   {str(i): "00" * 32 for i in range(65)}])
def test_a_bad_verify_request_is_a_clear_400(server, parts):
    send(server, "verify-bad", 0, data_of(4 * CHUNK))
    status, reply = post_json(server, "/api/uploads/verify-bad/verify", {"parts": parts})
    assert status == 400, reply
