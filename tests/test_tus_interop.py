"""tus against third-party software under Node: tus-js-client as the client, @tus/server as the reference.

The Node packages are installed by .ci/run (``npm ci --prefix tests/node``)."""
import base64
import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import http_request

NODE_DIR = Path(__file__).resolve().parent / "node"


def node() -> str:
    path = shutil.which("node")
    if not path or not (NODE_DIR / "node_modules" / "@tus" / "server").is_dir():
        message = "needs Node and `npm ci --prefix tests/node` (.ci/run installs both)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them: a skip there would hide a failure
        pytest.skip(message)
    return path


def tus_js_upload(endpoint: str, path: Path, **options) -> dict:
    result = subprocess.run([node(), str(NODE_DIR / "upload.mjs"), endpoint, str(path), json.dumps(options)],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_tus_js_client_uploads_in_chunks(server, tmp_path):
    source = tmp_path / "photo.jpg"
    source.write_bytes(os.urandom((2 << 20) + 12345))
    reply = tus_js_upload(f"{server.url}/tus/", source, chunkSize=1 << 20,
                          metadata={"filename": "photo.jpg", "filetype": "image/jpeg"})
    assert reply.get("done"), reply
    assert (server.storage / "photo.jpg").read_bytes() == source.read_bytes()


def test_tus_js_client_resumes_an_upload_a_new_process_finds_by_its_url(server, tmp_path):
    source = tmp_path / "long.bin"
    source.write_bytes(os.urandom(4 << 20))
    first = tus_js_upload(f"{server.url}/tus/", source, chunkSize=1 << 20, stopAfter=2 << 20)
    assert first["done"] is False and first["offset"] >= 2 << 20
    assert not (server.storage / "long.bin").exists()
    second = tus_js_upload(f"{server.url}/tus/", source, chunkSize=1 << 20, uploadUrl=first["url"])
    assert second["done"] and second["url"] == first["url"]
    assert (server.storage / "long.bin").read_bytes() == source.read_bytes()
    assert [info.id for info in server.engine.list()] == [first["url"].rsplit("/", 1)[1]]


# -- differential: pyfiledrop and @tus/server answer the same requests alike ---------------------------------

@contextlib.contextmanager
def reference_server(folder: Path, max_size: int):
    folder.mkdir()
    process = subprocess.Popen([node(), str(NODE_DIR / "reference-server.mjs"), str(folder), str(max_size)],
                               stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(process.stdout.readline())["port"]
        yield port
    finally:
        process.kill()
        process.wait(10)


V = {"Tus-Resumable": "1.0.0"}
BYTES = {"Content-Type": "application/offset+octet-stream"}
COMPARED = ("Tus-Resumable", "Upload-Offset", "Upload-Length", "Tus-Version")


def conversation(port: int) -> tuple[list[tuple], list[tuple]]:
    """One fixed sequence of tus requests: (what each answer says where tus leaves no choice, and the answers
    to the requests where the tus text is explicit and the reference server answers otherwise)."""
    answers, by_the_text = [], []

    def ask(method, path, body=None, headers=None, keep=COMPARED, text=None):
        status, reply, _ = http_request(port, method, path, body, headers)
        (answers if text is None else by_the_text).append((method, status, {key: reply.get(key) for key in keep}))
        return reply

    metadata = {"Upload-Metadata": "filename " + base64.b64encode(b"a.txt").decode()}
    # "MUST respond with 412 ... and MUST include the Tus-Version header": @tus/server 1.10 omits the header,
    # and answers 400 to a version it does not know; a PATCH of another type "SHOULD" be 415, it answers 400.
    ask("POST", "/tus/", None, {"Upload-Length": "10"}, keep=("Tus-Version",), text=True)
    ask("POST", "/tus/", None, {**V, "Tus-Resumable": "0.9.0", "Upload-Length": "10"}, keep=("Tus-Version",),
        text=True)
    ask("POST", "/tus/", None, {**V, "Upload-Length": str(1 << 30)}, keep=("Tus-Resumable",))   # over the limit
    location = ask("POST", "/tus/", None, {**V, "Upload-Length": "10", **metadata}, keep=("Tus-Resumable",))
    path = "/tus/" + location["Location"].rstrip("/").rsplit("/", 1)[1]
    ask("HEAD", path, None, V, keep=("Tus-Resumable", "Upload-Offset", "Upload-Length", "Cache-Control"))
    ask("PATCH", path, b"abc", {**V, "Upload-Offset": "0", "Content-Type": "text/plain"}, keep=("Tus-Resumable",),
        text=True)
    ask("PATCH", path, b"abc", {**V, **BYTES, "Upload-Offset": "4"}, keep=("Tus-Resumable",))   # wrong offset
    ask("PATCH", path, b"abcde", {**V, **BYTES, "Upload-Offset": "0"}, keep=("Tus-Resumable", "Upload-Offset"))
    ask("HEAD", path, None, V)
    ask("PATCH", path, b"fghij", {**V, **BYTES, "Upload-Offset": "5"}, keep=("Tus-Resumable", "Upload-Offset"))
    ask("HEAD", path, None, V)
    ask("HEAD", "/tus/0123456789abcdef0123456789abcdef", None, V, keep=("Tus-Resumable",))      # unknown
    other = ask("POST", "/tus/", None, {**V, "Upload-Length": "4"}, keep=())
    other_path = "/tus/" + other["Location"].rstrip("/").rsplit("/", 1)[1]
    ask("DELETE", other_path, None, V, keep=("Tus-Resumable",))
    status, _, _ = http_request(port, "HEAD", other_path, None, V)
    answers.append(("HEAD after DELETE", status in (404, 410), {}))  # tus lets the server choose 404 or 410
    return answers, by_the_text


def test_pyfiledrop_answers_like_the_tus_reference_server(make_server, tmp_path):
    server = make_server(max_size_mb=1)
    with reference_server(tmp_path / "reference", server.config.max_size_bytes) as reference_port:
        expected, _ = conversation(reference_port)
    answers, by_the_text = conversation(server.port)
    assert answers == expected
    assert by_the_text == [("POST", 412, {"Tus-Version": "1.0.0"}), ("POST", 412, {"Tus-Version": "1.0.0"}),
                           ("PATCH", 415, {"Tus-Resumable": "1.0.0"})]
