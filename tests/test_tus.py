"""tus 1.0 at /tus/: the protocol over real HTTP, then real third-party clients (tuspy)."""
import base64
import hashlib
import http.client
import json
import os
import socket
import threading
import time

import pytest

import pyfiledrop

from conftest import cli_server, running_server, sha256

V = {"Tus-Resumable": "1.0.0"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def create(server, size, metadata="", **headers):
    meta = {"Upload-Metadata": metadata} if metadata is not None else {}
    status, reply, body = server.request("POST", "/tus/", None, {**V, "Upload-Length": str(size), **meta, **headers})
    assert status == 201, body
    assert reply["Tus-Resumable"] == "1.0.0"
    return reply["Location"].split("/tus/")[1], reply


def patch(server, upload_id, offset, data, **headers):
    return server.request("PATCH", f"/tus/{upload_id}", data, {
        **V, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream", **headers})


def head(server, upload_id, **headers):
    return server.request("HEAD", f"/tus/{upload_id}", None, {**V, **headers})


def checksum(algorithm, data):
    return f"{algorithm} {base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


# -- the protocol ---------------------------------------------------------------------------------------------

def test_options_advertise_version_extensions_limit_and_checksums(server):
    status, headers, body = server.request("OPTIONS", "/tus/")
    assert status == 204 and body == b""
    assert headers["Tus-Resumable"] == "1.0.0" and headers["Tus-Version"] == "1.0.0"
    extensions = set(headers["Tus-Extension"].split(","))
    assert {"creation", "creation-with-upload", "expiration", "checksum", "termination"} <= extensions
    assert int(headers["Tus-Max-Size"]) == server.config.max_size_bytes
    assert set(headers["Tus-Checksum-Algorithm"].split(",")) == {"sha1", "sha256"}


def test_create_patch_in_pieces_and_the_file_is_stored_with_its_folder(server):
    data = os.urandom(300_000)
    upload_id, reply = create(server, len(data), f"filename {b64('clip.mp4')},folder {b64('holiday/day 1')}")
    assert reply["Location"] == f"{server.url}/tus/{upload_id}"
    assert head(server, upload_id)[1]["Upload-Offset"] == "0"
    offset = 0
    for piece in (data[:100_000], data[100_000:250_000], data[250_000:]):
        status, headers, _ = patch(server, upload_id, offset, piece)
        assert status == 204
        offset += len(piece)
        assert headers["Upload-Offset"] == str(offset)
    assert (server.storage / "holiday" / "day 1" / "clip.mp4").read_bytes() == data
    status, headers, _ = head(server, upload_id)
    assert (status, headers["Upload-Offset"], headers["Upload-Length"]) == (200, str(len(data)), str(len(data)))
    status, _, body = server.request("GET", f"/api/uploads/{upload_id}")
    assert json.loads(body)["sha256"] == sha256(data) and json.loads(body)["name"] == "holiday/day 1/clip.mp4"
    assert server.engine.ledger.get(upload_id).state is pyfiledrop.State.STORED


def test_head_answers_offset_length_metadata_expiry_and_no_store(server):
    upload_id, _ = create(server, 10, f"filename {b64('a.txt')}")
    patch(server, upload_id, 0, b"abc")
    status, headers, body = head(server, upload_id)
    assert status == 200 and body == b""
    assert headers["Upload-Offset"] == "3" and headers["Upload-Length"] == "10"
    assert headers["Cache-Control"] == "no-store" and headers["Tus-Resumable"] == "1.0.0"
    assert "filename " + b64("a.txt") in headers["Upload-Metadata"]
    expires = time.mktime(time.strptime(headers["Upload-Expires"], "%a, %d %b %Y %H:%M:%S GMT")) - time.timezone
    assert abs(expires - (time.time() + server.config.partial_ttl_seconds)) < 120


def test_an_empty_metadata_header_and_an_empty_file_are_valid(server):
    upload_id, _ = create(server, 0, "")
    assert head(server, upload_id)[1]["Upload-Offset"] == "0"
    assert (server.storage / "file").read_bytes() == b""


def test_creation_with_upload_stores_a_small_file_in_one_request(server):
    status, headers, _ = server.request("POST", "/tus/", b"hello", {
        **V, "Upload-Length": "5", "Upload-Metadata": f"filename {b64('hi.txt')}",
        "Content-Type": "application/offset+octet-stream"})
    assert status == 201 and headers["Upload-Offset"] == "5"
    assert (server.storage / "hi.txt").read_bytes() == b"hello"


def test_a_wrong_offset_is_409_and_changes_nothing(server):
    upload_id, _ = create(server, 10)
    patch(server, upload_id, 0, b"abcd")
    for wrong in (0, 2, 6):
        status, headers, body = patch(server, upload_id, wrong, b"xxxx")
        assert status == 409 and headers["Tus-Resumable"] == "1.0.0"
        assert body.decode().strip() and "/" not in body.decode().split(":")[0]
    assert head(server, upload_id)[1]["Upload-Offset"] == "4"


@pytest.mark.parametrize("algorithm", ["sha1", "sha256"])
def test_checksum_mismatch_is_460_and_nothing_of_the_request_kept(server, algorithm):
    upload_id, _ = create(server, 8, f"filename {b64('c.bin')}")
    status, headers, _ = patch(server, upload_id, 0, b"abcX", **{"Upload-Checksum": checksum(algorithm, b"abcd")})
    assert status == 460 and headers["Tus-Resumable"] == "1.0.0"
    assert head(server, upload_id)[1]["Upload-Offset"] == "0"
    assert patch(server, upload_id, 0, b"abcd", **{"Upload-Checksum": checksum(algorithm, b"abcd")})[0] == 204
    assert patch(server, upload_id, 4, b"efgh", **{"Upload-Checksum": checksum(algorithm, b"efgh")})[0] == 204
    assert (server.storage / "c.bin").read_bytes() == b"abcdefgh"


@pytest.mark.parametrize("header", ["md5 AAAA", "sha1 not*base64", "sha256"])
def test_an_unusable_checksum_header_is_400(server, header):
    upload_id, _ = create(server, 4)
    assert patch(server, upload_id, 0, b"abcd", **{"Upload-Checksum": header})[0] == 400
    assert head(server, upload_id)[1]["Upload-Offset"] == "0"


def test_a_wrong_or_missing_version_is_412_with_the_supported_version(server):
    for headers in ({}, {"Tus-Resumable": "0.2.2"}):
        status, reply, _ = server.request("POST", "/tus/", None, {**headers, "Upload-Length": "5"})
        assert status == 412 and reply["Tus-Version"] == "1.0.0" and reply["Tus-Resumable"] == "1.0.0"
    assert list(server.storage.iterdir()) == [] and server.engine.list() == []


def test_over_the_size_limit_is_413_before_anything_is_made(make_server):
    server = make_server(max_size_mb=1)
    status, headers, _ = server.request("POST", "/tus/", None, {**V, "Upload-Length": str(2 << 20)})
    assert status == 413 and headers["Tus-Resumable"] == "1.0.0"
    upload_id, _ = create(server, 4)
    assert patch(server, upload_id, 0, b"abcdefgh")[0] == 413
    assert server.engine.list()[0].received == ()


@pytest.mark.parametrize("headers, status", [
    ({}, 400),
    ({"Upload-Length": "-1"}, 400),
    ({"Upload-Length": "1e3"}, 400),
    ({"Upload-Defer-Length": "1"}, 400),
    ({"Upload-Length": "5", "Upload-Metadata": "filename !!notbase64"}, 400),
    ({"Upload-Length": "5", "Upload-Metadata": "a " + b64("x") + ",a " + b64("y")}, 400),
    ({"Upload-Length": "5", "Upload-Metadata": "x" * 5000}, 400),
])
def test_bad_creations_are_refused_plainly(server, headers, status):
    code, reply, body = server.request("POST", "/tus/", None, {**V, **headers})
    assert code == status and reply["Tus-Resumable"] == "1.0.0"
    assert b"Traceback" not in body and str(server.storage) not in body.decode()
    assert server.engine.list() == []


def test_hostile_names_stay_in_storage(server, tmp_path):
    for name, folder in (("../../escape.txt", ""), ("x.txt", "../../../etc"), ("/etc/passwd", "/"), ("..", "..")):
        upload_id, _ = create(server, 1, f"filename {b64(name)},folder {b64(folder)}")
        assert patch(server, upload_id, 0, b"x")[0] == 204
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and server.storage not in p.parents
               and server.chunks not in p.parents]
    assert outside == []


def test_patch_needs_its_content_type_and_offset(server):
    upload_id, _ = create(server, 4)
    status, headers, _ = server.request("PATCH", f"/tus/{upload_id}", b"abcd",
                                        {**V, "Upload-Offset": "0", "Content-Type": "text/plain"})
    assert status == 415 and headers["Tus-Resumable"] == "1.0.0"
    status, _, _ = server.request("PATCH", f"/tus/{upload_id}", b"abcd",
                                  {**V, "Content-Type": "application/offset+octet-stream"})
    assert status == 400


def test_unknown_uploads_are_404_and_terminated_ones_410(server):
    assert head(server, "no-such-upload")[0] == 404
    assert patch(server, "../../x", 0, b"a")[0] == 404
    upload_id, _ = create(server, 10)
    patch(server, upload_id, 0, b"abc")
    status, headers, _ = server.request("DELETE", f"/tus/{upload_id}", None, V)
    assert status == 204 and headers["Tus-Resumable"] == "1.0.0"
    assert head(server, upload_id)[0] == 410 and patch(server, upload_id, 3, b"d")[0] == 410
    assert [name for name in os.listdir(server.chunks) if name.endswith(".part")] == []
    assert server.engine.ledger.get(upload_id).state is pyfiledrop.State.DELETED


def test_a_stored_upload_cannot_be_terminated_by_its_uploader(server):
    upload_id, _ = create(server, 2, f"filename {b64('kept.txt')}")
    patch(server, upload_id, 0, b"ok")
    assert server.request("DELETE", f"/tus/{upload_id}", None, V)[0] == 403
    assert (server.storage / "kept.txt").read_bytes() == b"ok"


def test_head_completes_an_upload_whose_bytes_all_arrived_but_which_was_not_completed(server):
    """A stop between the record of the last bytes and completion leaves an upload at its end and not stored; a
    tus client that HEADs it sees its offset at the length and sends nothing more, so HEAD completes it."""
    upload_id, _ = create(server, 1000, f"filename {b64('all-here.bin')}")
    data = os.urandom(1000)
    server.engine.put(upload_id, 0, [data], length=len(data), keep_if_empty=True)  # recorded, not completed
    assert not (server.config.storage / "all-here.bin").exists()
    status, reply, _ = head(server, upload_id)
    assert status == 200 and reply["Upload-Offset"] == reply["Upload-Length"] == "1000", reply
    assert (server.config.storage / "all-here.bin").read_bytes() == data
    assert server.engine.info(upload_id).state is pyfiledrop.State.STORED


def test_head_during_a_patch_shows_the_bytes_written_so_far(server):
    size = 4 << 20
    upload_id, _ = create(server, size)
    connection = socket.create_connection(("127.0.0.1", server.port))
    try:
        connection.sendall((f"PATCH /tus/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                            f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                            f"Content-Length: {size}\r\n\r\n").encode())
        connection.sendall(b"a" * (1 << 20))
        deadline = time.monotonic() + 20
        while (offset := int(head(server, upload_id)[1]["Upload-Offset"])) < 1 << 20:
            assert time.monotonic() < deadline, offset
        assert offset == 1 << 20  # exact: every byte sent so far, and no byte more
        connection.sendall(b"a" * (size - (1 << 20)))
        reply = connection.recv(4096)
        assert reply.startswith(b"HTTP/1.1 204")
    finally:
        connection.close()
    assert head(server, upload_id)[1]["Upload-Offset"] == str(size)


def test_an_interrupted_patch_keeps_what_arrived_and_a_retry_goes_on_from_there(server):
    upload_id, _ = create(server, 1 << 20, f"filename {b64('cut.bin')}")
    data = os.urandom(1 << 20)
    connection = socket.create_connection(("127.0.0.1", server.port))
    connection.sendall((f"PATCH /tus/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                        f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                        f"Content-Length: {len(data)}\r\n\r\n").encode() + data[:300_000])
    deadline = time.monotonic() + 20
    while int(head(server, upload_id)[1]["Upload-Offset"]) < 300_000:
        assert time.monotonic() < deadline
    connection.close()  # the client vanished mid-request
    while server.engine._live[upload_id].writers:  # the server sees the request end
        assert time.monotonic() < deadline
    offset = int(head(server, upload_id)[1]["Upload-Offset"])
    assert offset == 300_000
    assert patch(server, upload_id, offset, data[offset:])[0] == 204
    assert (server.storage / "cut.bin").read_bytes() == data


def test_a_stalled_patch_is_taken_over_by_its_retry_without_losing_its_bytes(server):
    upload_id, _ = create(server, 1 << 20, f"filename {b64('stall.bin')}")
    data = os.urandom(1 << 20)
    stalled = socket.create_connection(("127.0.0.1", server.port))  # a phone that went away without a FIN
    try:
        stalled.sendall((f"PATCH /tus/{upload_id} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
                         f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
                         f"Content-Length: {len(data)}\r\n\r\n").encode() + data[:200_000])
        deadline = time.monotonic() + 20
        while (offset := int(head(server, upload_id)[1]["Upload-Offset"])) < 200_000:
            assert time.monotonic() < deadline
        assert patch(server, upload_id, offset, data[offset:])[0] == 204
    finally:
        stalled.close()
    assert (server.storage / "stall.bin").read_bytes() == data


def test_a_tus_upload_is_reported_on_the_console_like_any_other(server):
    upload_id, _ = create(server, 3, f"filename {b64('seen.txt')}")
    patch(server, upload_id, 0, b"abc")
    stored = [event for event in server.events if isinstance(event, pyfiledrop.Stored)]
    assert [event.info.stored_name for event in stored] == ["seen.txt"]
    patch(server, upload_id, 1, b"x")
    refused = [event for event in server.events if isinstance(event, pyfiledrop.Refused)]
    assert refused == [] or all(event.status != 500 for event in refused)


# -- tuspy, a real third-party client -------------------------------------------------------------------------

tusclient = pytest.importorskip("tusclient.client")
from tusclient.storage import filestorage  # noqa: E402


def test_tuspy_uploads_a_file_in_chunks(server, tmp_path):
    source = tmp_path / "video.bin"
    source.write_bytes(os.urandom(3 << 20))
    client = tusclient.TusClient(f"{server.url}/tus/")
    uploader = client.uploader(str(source), chunk_size=1 << 20, metadata={"filename": "video.bin"})
    uploader.upload()
    assert (server.storage / "video.bin").read_bytes() == source.read_bytes()


def test_tuspy_checksums_are_checked(server, tmp_path):
    source = tmp_path / "sum.bin"
    source.write_bytes(os.urandom(1 << 20))
    client = tusclient.TusClient(f"{server.url}/tus/")
    uploader = client.uploader(str(source), chunk_size=256 << 10, metadata={"filename": "sum.bin"},
                               upload_checksum=True)
    uploader.upload()
    assert (server.storage / "sum.bin").read_bytes() == source.read_bytes()


def test_tuspy_resumes_from_its_stored_url_after_the_server_was_killed(tmp_path):
    folders = ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks"), "--min-free", "0", "-q"]
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(6 << 20))
    url_store = filestorage.FileStorage(str(tmp_path / "tus-urls.json"))
    with cli_server(folders) as (process, port):
        client = tusclient.TusClient(f"http://127.0.0.1:{port}/tus/")
        first = client.uploader(str(source), chunk_size=1 << 20, metadata={"filename": "big.bin"},
                                store_url=True, url_storage=url_store)
        for _ in range(3):
            first.upload_chunk()
        process.kill()  # kill -9: no chance to tidy up
        process.wait(10)
    url = url_store.get_item(first.fingerprinter.get_fingerprint(open(source, "rb")))
    assert url and url.endswith(first.url.split("/tus/")[1])
    with cli_server(folders, port=port) as (process, port_again):
        client = tusclient.TusClient(f"http://127.0.0.1:{port_again}/tus/")
        second = client.uploader(str(source), chunk_size=1 << 20, metadata={"filename": "big.bin"},
                                 store_url=True, url_storage=url_store)
        assert second.url.split("/tus/")[1] == first.url.split("/tus/")[1]  # resumed, not created again
        assert second.offset == 3 << 20
        second.upload()
    assert (tmp_path / "storage" / "big.bin").read_bytes() == source.read_bytes()


def test_a_file_stored_under_the_same_name_with_the_same_content_is_not_sent_again(server):
    data = b"same bytes"
    digest = hashlib.sha256(data).hexdigest()
    metadata = f"filename {b64('same.txt')},folder {b64('f')},sha256 {b64(digest)}"
    first, _ = create(server, len(data), metadata)
    patch(server, first, 0, data)
    again, headers = create(server, len(data), metadata)
    assert again == first and headers["Upload-Offset"] == str(len(data))
    other_name, headers = create(server, len(data), f"filename {b64('other.txt')},sha256 {b64(digest)}")
    assert other_name != first and headers["Upload-Offset"] == "0"
    (server.storage / "f" / "same.txt").write_bytes(b"edited")   # changed by hand: no longer the same file
    changed_size, _ = create(server, len(data), metadata)
    assert changed_size != first


def test_x_http_method_override_is_the_method(server):
    upload_id, _ = create(server, 4, f"filename {b64('o.txt')}")
    status, headers, _ = server.request("POST", f"/tus/{upload_id}", b"abcd", {
        **V, "X-HTTP-Method-Override": "PATCH", "Upload-Offset": "0",
        "Content-Type": "application/offset+octet-stream"})
    assert status == 204 and headers["Upload-Offset"] == "4"
    assert (server.storage / "o.txt").read_bytes() == b"abcd"
    assert server.request("POST", f"/tus/{upload_id}", None, {**V, "X-HTTP-Method-Override": "GET"})[0] == 400
