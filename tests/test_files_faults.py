"""kill -9 while a stored file is removed (by --expire-after or DELETE): after the restart, removing it again
ends in the same state as an uninterrupted removal, and nothing else is touched."""
from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, chunk_fields, encode_multipart

import pyfiledrop

CRASH_SCRIPT = r"""
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import pyfiledrop
storage, chunks, how = pyfiledrop.Path(sys.argv[2]), pyfiledrop.Path(sys.argv[3]), sys.argv[4]
now = [1_800_000_000.0]

def checkpoint(name):
    if name == "removed":
        os.kill(os.getpid(), signal.SIGKILL)

backend = pyfiledrop.LocalBackend(storage, chunks)
ledger = pyfiledrop.Ledger(chunks / pyfiledrop.Ledger.FILENAME)
limits = pyfiledrop.EngineLimits(10 ** 9, stored_ttl=60.0)
engine = pyfiledrop.Engine(ledger, backend, limits, checkpoint=checkpoint, clock=lambda: now[0])
engine.receive_whole("doomed.txt", [b"doomed"], client="", size=6, upload_id="doomed")
now[0] += 61 if how == "expire" else 0
engine.receive_whole("kept.txt", [b"kept"], client="", size=4, upload_id="kept")   # not due
engine.expire() if how == "expire" else engine.delete("doomed")
print("finished without a crash")
"""


@pytest.mark.parametrize("how", ["expire", "delete"])
def test_a_kill_while_removing_a_stored_file_is_finished_by_removing_it_again(tmp_path, how):
    storage, chunks = tmp_path / "storage", tmp_path / "chunks"
    storage.mkdir()
    chunks.mkdir()
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(ROOT), str(storage), str(chunks), how],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == -9, result.stdout + result.stderr
    ledger = pyfiledrop.Ledger(chunks / pyfiledrop.Ledger.FILENAME)
    limits = pyfiledrop.EngineLimits(10 ** 9, stored_ttl=None if how == "delete" else 60.0)
    engine = pyfiledrop.Engine(ledger, pyfiledrop.LocalBackend(storage, chunks), limits,
                               clock=lambda: 1_800_000_070.0)
    doomed = engine.info("doomed")
    assert doomed.state is pyfiledrop.State.STORED and not (storage / "doomed.txt").exists()   # killed in between
    assert pyfiledrop.storage_presence(engine.backend, doomed, None) == "missing"
    engine.expire() if how == "expire" else engine.delete("doomed")
    assert engine.info("doomed").state is (pyfiledrop.State.EXPIRED if how == "expire" else pyfiledrop.State.DELETED)
    assert engine.info("kept").state is pyfiledrop.State.STORED and (storage / "kept.txt").read_bytes() == b"kept"
    assert sorted(os.listdir(storage)) == ["kept.txt"]
    ledger.close()


def test_deleting_an_upload_while_a_request_still_sends_it(make_server):
    """The sender is cut off (its bytes no longer count), the partial file goes, nothing is stored, the record
    says deleted."""
    admin = pyfiledrop.PasswordHash.of("admin")
    server = make_server(admin_password=admin)
    auth = {"Authorization": "Basic " + base64.b64encode(b":admin").decode()}
    size = 4 * 1024 * 1024
    body, content_type = encode_multipart(chunk_fields("in-flight", 0, size * 2, size), [("file", "f.bin", b"\0" * size)])
    head = (f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + body[:1024 * 1024])
        deadline = time.monotonic() + 30
        while not [u for u in json.loads(server.request("GET", "/api/uploads", None, auth)[2])["uploads"]
                   if u["id"] == "in-flight"]:
            assert time.monotonic() < deadline, "the upload never showed up"
            threading.Event().wait(0.02)
        status, _, reply = server.request("DELETE", "/api/uploads/in-flight", None, auth)
        assert status == 200 and json.loads(reply)["state"] == "deleted"
        try:
            sock.sendall(body[1024 * 1024:])
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            answer = b""
    assert not answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert [name for name in os.listdir(server.chunks) if name.endswith(".part")] == []
    assert os.listdir(server.storage) == []
    assert server.engine.info("in-flight").state is pyfiledrop.State.DELETED

