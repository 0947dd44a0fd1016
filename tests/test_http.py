"""The routes, through a real server on an ephemeral port and real HTTP requests."""
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from conftest import chunk_fields, encode_multipart, running_server, sha256, upload_files


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def assert_plain_error(status, headers, body, expected_status, server):
    assert status == expected_status, body
    text = body.decode("utf-8")
    assert headers["Content-Type"].startswith("text/plain")
    assert "Traceback" not in text and str(server.storage.parent) not in text
    assert not re.search(r"/(tmp|root|home|usr|etc|var)\b|[A-Z]:\\", text), text
    assert len(text) < 300
    return text


# -- the page and its assets ------------------------------------------------------------------------------

def test_page_is_self_contained(server):
    status, headers, body = server.request("GET", "/")
    page = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "Upload new files" in page and "Uploaded" in page and "Clear" in page
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert references and all(ref.startswith("/") for ref in references), references
    assert "http://" not in page and "https://" not in page
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for ref in references:
        status, headers, asset = server.request("GET", ref)
        assert status == 200 and len(asset) > 100, ref
    config = json.loads(re.search(r'id="pyfiledrop-config" type="application/json">([^<]*)<', page).group(1))
    status, headers, worker = server.request("GET", config["workerUrl"])
    assert status == 200 and headers["Content-Type"].startswith("application/javascript")
    hash_wasm = re.search(rb'importScripts\("([^"]+)"\)', worker).group(1).decode()
    status, _, library = server.request("GET", hash_wasm)
    assert status == 200 and b"hash-wasm" in library and b"createSHA256" in library


def test_retired_cdn_options_load_nothing_from_a_cdn(make_server):
    running = make_server(dz_cdn="https://cdn.example.org/dropzone", dz_version="6.3.5")
    status, headers, body = running.request("GET", "/")
    assert status == 200 and "cdn.example.org" not in body.decode()
    assert "cdn.example.org" not in headers["Content-Security-Policy"]


def test_index_override_is_served(make_server, tmp_path):
    custom = tmp_path / "custom.html"
    custom.write_text("<html><body>my own drop page</body></html>")
    running = make_server(index=custom)
    status, _, body = running.request("GET", "/")
    assert status == 200 and b"my own drop page" in body


def test_index_html_beside_the_script_is_used(tmp_path):
    program = tmp_path / "app"
    program.mkdir()
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "pyfiledrop.py"), program / "pyfiledrop.py")
    (program / "index.html").write_text("<p>beside the script</p>")
    result = subprocess.run(
        [sys.executable, "-c", "import pyfiledrop; print(pyfiledrop.parse_args([]).index)"],
        cwd=program, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(program / "index.html")


def test_unknown_routes_and_methods_answer_in_plain_text(server):
    for method, path, code in (("GET", "/nope", 404), ("DELETE", "/upload", 405), ("GET", "/upload", 405)):
        status, headers, body = server.request(method, path)
        assert status == code and headers["Content-Type"].startswith("text/plain") and b"<" not in body


# -- plain uploads ----------------------------------------------------------------------------------------

def test_multipart_upload_of_one_and_several_files(server):
    status, _, body = server.post_form({}, [("file", "one.txt", b"first")])
    reply = json.loads(body)
    assert status == 200 and reply["name"] == "one.txt" and reply["sha256"] == sha256(b"first")
    status, _, body = server.post_form({}, [("file", "a.bin", b"A" * 1000), ("file", "b.bin", b"")])
    files = json.loads(body)["files"]
    assert [(f["name"], f["size"]) for f in files] == [("a.bin", 1000), ("b.bin", 0)]
    assert (server.storage / "a.bin").read_bytes() == b"A" * 1000
    assert (server.storage / "b.bin").read_bytes() == b""


def test_put_upload_with_unicode_name(server):
    data = os.urandom(5000)
    for name in ("café.txt", "文件.txt", "😀.txt"):
        status, _, body = server.request("PUT", "/upload/" + quote(name), data)
        reply = json.loads(body)
        assert status == 200 and reply["name"] == name and reply["sha256"] == sha256(data)
        assert (server.storage / name).read_bytes() == data


def test_put_without_a_name_or_length(server):
    status, headers, body = server.request("PUT", "/upload", b"x")
    assert "PUT /upload/NAME" in assert_plain_error(status, headers, body, 400, server)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("PUT", "/upload/x.txt")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    connection.send(b"1\r\nx\r\n0\r\n\r\n")
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    assert response.status == 200 and reply["size"] == 1 and (server.storage / "x.txt").read_bytes() == b"x"


# -- chunked uploads --------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["forward", "backward"])
def test_chunked_upload_in_any_order(server, order):
    data = os.urandom(300_000)
    count = -(-len(data) // 65536)
    indexes = list(range(count)) if order == "forward" else list(reversed(range(count)))
    reply = server.upload_chunked(data, 65536, "chunky.bin", order=indexes)
    assert reply["complete"] and reply["sha256"] == sha256(data) and reply["name"] == "chunky.bin"
    assert (server.storage / "chunky.bin").read_bytes() == data
    status, _, body = server.request("GET", f"/api/uploads/{reply['id']}")
    assert json.loads(body)["available"] is True


def test_retried_chunks_are_harmless(server):
    data = os.urandom(200_000)
    upload_id = str(uuid.uuid4())
    for index in (0, 0, 1, 2, 1, 3):
        start = index * 65536
        status, _, body = server.post_chunk(upload_id, index, data[start:start + 65536], len(data), 65536)
        assert status == 200
    final = json.loads(body)
    assert final["complete"]
    status, _, body = server.post_chunk(upload_id, 3, data[3 * 65536:], len(data), 65536)
    assert status == 200 and json.loads(body) == final
    assert os.listdir(server.storage) == ["file.bin"]


def test_fields_after_the_file_part_still_make_a_chunk(server):
    data = os.urandom(1000)
    upload_id = str(uuid.uuid4())
    for index in range(2):
        body, ctype = encode_multipart(chunk_fields(upload_id, index, 1000, 500),
                                       [("file", "late.bin", data[index * 500:(index + 1) * 500])], files_first=True)
        status, _, reply = server.request("POST", "/upload", body, {"Content-Type": ctype})
        assert status == 200, reply
    assert json.loads(reply)["complete"]
    assert os.listdir(server.storage) == ["late.bin"]
    assert (server.storage / "late.bin").read_bytes() == data


def test_parallel_chunks_over_http(server):
    data = os.urandom(2_000_000)
    size = 100_000
    upload_id = str(uuid.uuid4())

    def send(index):
        return server.post_chunk(upload_id, index, data[index * size:(index + 1) * size], len(data), size)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, list(range(20)) + [3, 7, 11]))
    assert all(status == 200 for status, _, _ in results)
    complete = [json.loads(body) for _, _, body in results if json.loads(body)["complete"]]
    assert complete and {r["sha256"] for r in complete} == {sha256(data)}
    assert (server.storage / "file.bin").read_bytes() == data


def test_restart_mid_upload_resumes(tmp_path):
    data = os.urandom(500_000)
    size = 100_000
    upload_id = str(uuid.uuid4())
    with running_server(tmp_path) as first:
        for index in (0, 2, 4):
            assert first.post_chunk(upload_id, index, data[index * size:(index + 1) * size], len(data), size)[0] == 200
    with running_server(tmp_path) as second:
        status, _, body = second.request("GET", f"/api/uploads/{upload_id}")
        assert json.loads(body)["missing_chunks"] == [1, 3]
        for index in (1, 3):
            status, _, body = second.post_chunk(upload_id, index, data[index * size:(index + 1) * size],
                                                len(data), size)
        assert json.loads(body)["sha256"] == sha256(data)
        assert (second.storage / "file.bin").read_bytes() == data


def test_name_collisions_never_overwrite(server):
    (server.storage / "same.txt").write_bytes(b"old")
    names = [json.loads(server.post_form({}, [("file", "same.txt", b"new%d" % i)])[2])["name"] for i in range(3)]
    assert names == ["same (1).txt", "same (2).txt", "same (3).txt"]
    assert (server.storage / "same.txt").read_bytes() == b"old"
    reply = server.upload_chunked(b"chunked", 3, "same.txt")
    assert reply["name"] == "same (4).txt"


def test_fifty_concurrent_uploads_all_complete(server):
    payloads = [os.urandom(150_000 + i) for i in range(50)]
    barrier = threading.Barrier(50)

    def upload(i):
        barrier.wait(30)
        return server.upload_chunked(payloads[i], 50_000, f"f{i:02}.bin")

    with ThreadPoolExecutor(50) as pool:
        replies = list(pool.map(upload, range(50)))
    assert all(r["complete"] for r in replies)
    for i, data in enumerate(payloads):
        assert (server.storage / f"f{i:02}.bin").read_bytes() == data


# -- hostile input ----------------------------------------------------------------------------------------

HOSTILE_FIELDS = [
    ({"dzuuid": "../../outside"}, 400),
    ({"dzuuid": "..%2F..%2Foutside"}, 400),
    ({"dzuuid": "a" * 65}, 400),
    ({"dzchunkindex": "-1"}, 400),
    ({"dzchunkindex": "abc"}, 400),
    ({"dzchunkindex": "5"}, 400),
    ({"dzchunkbyteoffset": "7"}, 400),
    ({"dztotalchunkcount": "9"}, 400),
    ({"dzchunksize": "0"}, 400),
    ({"dztotalfilesize": "-5"}, 400),
    ({"dztotalfilesize": "1" * 30}, 400),
]


@pytest.mark.parametrize("overrides, expected", HOSTILE_FIELDS)
def test_hostile_fields_get_a_clear_4xx_and_change_nothing(server, tmp_path, overrides, expected):
    before = snapshot(tmp_path)
    fields = chunk_fields(str(uuid.uuid4()), 0, 10, 5)
    fields.update(overrides)
    status, headers, body = server.post_form(fields, [("file", "x.bin", b"12345")])
    assert_plain_error(status, headers, body, expected, server)
    assert snapshot(tmp_path) == before
    assert server.request("GET", "/")[0] == 200  # still serving


@pytest.mark.parametrize("filename", ["../../outside.txt", "..\\..\\outside.txt", "/etc/outside.txt",
                                      "sub/dir/outside.txt", "..", "x\x00y.txt"])
def test_hostile_filenames_stay_in_storage(server, tmp_path, filename):
    reply = json.loads(server.post_form({}, [("file", filename, b"data")])[2])
    chunked = server.upload_chunked(b"chunked data", 5, filename)
    for stored in (reply["name"], chunked["name"]):
        assert "/" not in stored and "\\" not in stored and "\x00" not in stored
        assert (server.storage / stored).is_file()
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and server.storage not in p.parents
               and server.chunks not in p.parents]
    assert outside == []


def test_hostile_put_paths_stay_in_storage(server, tmp_path):
    for path in ("/upload/..%2F..%2Foutside.txt", "/upload/%2e%2e/%2e%2e/outside.txt", "/upload/a%00b.txt"):
        status, _, body = server.request("PUT", path, b"data")
        if status == 200:
            assert "/" not in json.loads(body)["name"]
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and server.storage not in p.parents
               and server.chunks not in p.parents]
    assert outside == []


def test_an_upload_id_cannot_change_size_name_or_chunk_size(server):
    upload_id = str(uuid.uuid4())
    assert server.post_chunk(upload_id, 0, b"12345", 10, 5, "a.bin")[0] == 200
    for args in ((b"12345", 15, 5, "a.bin"), (b"12345", 10, 5, "b.bin"), (b"123456", 12, 6, "a.bin")):
        status, headers, body = server.post_chunk(upload_id, 1, *args)
        assert_plain_error(status, headers, body, 400, server)


def test_a_short_or_long_chunk_is_refused(server):
    upload_id = str(uuid.uuid4())
    for data in (b"1234", b"123456"):
        status, headers, body = server.post_chunk(upload_id, 0, data, 10, 5)
        assert "expected 5" in assert_plain_error(status, headers, body, 400, server)
    # nothing of the upload arrived, so nothing of it is kept: the page's retry starts it again
    assert server.request("GET", f"/api/uploads/{upload_id}")[0] == 404
    assert server.post_chunk(upload_id, 0, b"12345", 10, 5)[0] == 200
    assert json.loads(server.request("GET", f"/api/uploads/{upload_id}")[2])["received_chunks"] == 1


@pytest.mark.parametrize("body, ctype", [
    (b"not multipart", "text/plain"),
    (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x\"\r\n\r\nunterminated", "multipart/form-data; boundary=b"),
    (b"garbage without boundary", "multipart/form-data; boundary=zzz"),
    (b"", "multipart/form-data"),
])
def test_malformed_bodies(server, tmp_path, body, ctype):
    before = snapshot(tmp_path)
    status, headers, reply = server.request("POST", "/upload", body, {"Content-Type": ctype})
    assert_plain_error(status, headers, reply, 400, server)
    assert snapshot(tmp_path) == before


def test_max_size_is_enforced_by_the_server(make_server, tmp_path):
    small = make_server(max_size_mb=1)
    limit = 2 ** 20
    before = snapshot(small.storage.parent)
    status, headers, body = small.post_chunk(str(uuid.uuid4()), 0, b"x" * 10, limit + 1, limit)
    assert_plain_error(status, headers, body, 413, small)
    status, headers, body = small.post_form({}, [("file", "big.bin", b"x" * (limit + 1))])
    assert_plain_error(status, headers, body, 413, small)
    status, headers, body = small.request("PUT", "/upload/big.bin", b"x" * (limit + 1))
    assert_plain_error(status, headers, body, 413, small)
    assert snapshot(small.storage.parent) == before
    # a chunk that declares a small file but carries more than the limit
    status, headers, body = small.post_chunk(str(uuid.uuid4()), 0, b"x" * (limit + 10), 100, 100)
    assert_plain_error(status, headers, body, 413, small)
    assert os.listdir(small.storage) == []
    assert all(not name.endswith(".done") for name in os.listdir(small.chunks))
    assert json.loads(small.post_form({}, [("file", "ok.bin", b"x" * limit)])[2])["size"] == limit


def test_declared_size_beyond_free_disk_space_is_507(make_server):
    running = make_server(max_size_mb=2 ** 40)
    free = shutil.disk_usage(running.storage).free
    size = free + 2 ** 30
    chunk = 2 ** 29
    status, headers, body = running.post_form(
        {"dzuuid": str(uuid.uuid4()), "dzchunkindex": "0", "dztotalfilesize": str(size), "dzchunksize": str(chunk),
         "dztotalchunkcount": str(-(-size // chunk)), "dzchunkbyteoffset": "0"}, [("file", "x.bin", b"abc")])
    assert "disk space" in assert_plain_error(status, headers, body, 507, running)
    assert upload_files(running.chunks) == [] and os.listdir(running.storage) == []


# -- downloads --------------------------------------------------------------------------------------------

def test_downloads_are_off_by_default(server):
    reply = server.upload_chunked(b"secret", 4, "s.txt")
    status, headers, body = server.request("GET", f"/download/{reply['id']}")
    assert_plain_error(status, headers, body, 403, server)


def test_downloads_need_the_full_id(make_server):
    running = make_server(allow_downloads=True)
    data = os.urandom(10_000)
    reply = running.upload_chunked(data, 4096, "naïve 文件.bin")
    status, headers, body = running.request("GET", f"/download/{reply['id']}")
    assert status == 200 and body == data
    assert headers["Content-Disposition"] == (
        "attachment; filename=\"na_ve __.bin\"; filename*=UTF-8''na%C3%AFve%20%E6%96%87%E4%BB%B6.bin")
    for wrong in (reply["id"][:8], reply["id"][:-1], reply["id"] + "0", "..", "%2e%2e%2fstorage"):
        status, headers, body = running.request("GET", f"/download/{wrong}")
        assert status == 404, wrong
    (running.storage / reply["name"]).unlink()
    assert running.request("GET", f"/download/{reply['id']}")[0] == 404
    assert json.loads(running.request("GET", f"/api/uploads/{reply['id']}")[2])["available"] is False


def test_no_download_sees_a_partial_file(make_server):
    running = make_server(allow_downloads=True)
    upload_id = str(uuid.uuid4())
    running.post_chunk(upload_id, 0, b"12345", 10, 5)
    assert running.request("GET", f"/download/{upload_id}")[0] == 404
    assert os.listdir(running.storage) == []


# -- broken storage ---------------------------------------------------------------------------------------

def _immutable(path, on):
    return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def test_unwritable_storage_answers_clearly_and_recovers(server):
    if not shutil.which("chattr") or not _immutable(server.storage, True):
        pytest.skip("needs chattr +i on this filesystem (root cannot be stopped by permissions)")
    try:
        data = os.urandom(1000)
        upload_id = str(uuid.uuid4())
        status, headers, body = server.post_chunk(upload_id, 0, data[:600], 1000, 600)
        assert status == 200   # chunks still go to the chunks folder
        status, headers, body = server.post_chunk(upload_id, 1, data[600:], 1000, 600)
        assert "cannot write" in assert_plain_error(status, headers, body, 500, server)
        status, headers, body = server.post_form({}, [("file", "plain.txt", b"abc")])
        assert_plain_error(status, headers, body, 500, server)
    finally:
        _immutable(server.storage, False)
    assert os.listdir(server.storage) == []
    status, _, body = server.post_chunk(upload_id, 1, data[600:], 1000, 600)   # the browser's retry
    assert status == 200 and json.loads(body)["sha256"] == sha256(data)
    assert (server.storage / "file.bin").read_bytes() == data


def test_put_keeps_folders_of_the_path_inside_storage(server, tmp_path):
    status, _, body = server.request("PUT", "/upload/trip/day%201/photo.jpg", b"jpeg")
    assert status == 200 and json.loads(body)["name"] == "trip/day 1/photo.jpg"
    assert (server.storage / "trip" / "day 1" / "photo.jpg").read_bytes() == b"jpeg"
    status, _, body = server.request("PUT", "/upload/trip/day%201/photo.jpg", b"jpeg 2")
    assert json.loads(body)["name"] == "trip/day 1/photo (1).jpg"
    status, _, body = server.request("PUT", "/upload/trip/../../../up.txt", b"x")
    assert status == 200 and json.loads(body)["name"] == "trip/up.txt"
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and server.storage not in p.parents
               and server.chunks not in p.parents]
    assert outside == []


def test_put_into_a_folder_where_a_file_stands_is_refused_and_the_file_kept(server):
    assert server.request("PUT", "/upload/notes", b"my notes")[0] == 200
    status, headers, body = server.request("PUT", "/upload/notes/x.txt", b"x")
    assert_plain_error(status, headers, body, 409, server)
    assert (server.storage / "notes").read_bytes() == b"my notes"
