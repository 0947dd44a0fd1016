"""tus and ``pyfiledrop send`` behind --password: refused before any byte, in tus's terms; let in with Basic."""
import base64
import os
import subprocess
import sys

from conftest import ROOT, cli_server, running_server
from test_auth import UPLOAD_PASSWORD, basic, hashes, req

V = {"Tus-Resumable": "1.0.0"}


def test_tus_needs_the_upload_password_and_says_so_in_tus_terms(tmp_path):
    upload, admin = hashes()
    with running_server(tmp_path, password=upload, admin_password=admin) as server:
        status, headers, _ = req(server, "POST", "/tus/", None, {**V, "Upload-Length": "4"})
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic") and headers["Tus-Resumable"] == "1.0.0"
        status, _, _ = req(server, "POST", "/tus/", None, {**V, "Upload-Length": "4", **basic("wrong")})
        assert status == 403
        assert server.engine.list() == []
        status, headers, _ = req(server, "POST", "/tus/", None, {**V, "Upload-Length": "4", **basic(UPLOAD_PASSWORD)})
        assert status == 201
        path = "/tus/" + headers["Location"].rsplit("/", 1)[1]
        patch = {**V, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        assert req(server, "PATCH", path, b"abcd", patch)[0] == 401      # the address alone is not enough
        assert req(server, "HEAD", path, None, V)[0] == 401
        assert req(server, "PATCH", path, b"abcd", {**patch, **basic(UPLOAD_PASSWORD)})[0] == 204
        assert (server.storage / "file").read_bytes() == b"abcd"


def test_send_with_the_password_from_the_environment_or_u(tmp_path):
    source = tmp_path / "a.txt"
    source.write_bytes(b"secret drop")
    folders = ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks"), "--min-free", "0", "-q",
               "--password"]
    with cli_server(folders, env={"PYFILEDROP_PASSWORD": UPLOAD_PASSWORD}) as (process, port):
        command = [sys.executable, str(ROOT / "pyfiledrop.py"), "send", str(source), "--to",
                   f"http://127.0.0.1:{port}", "--state", str(tmp_path / "state.json")]
        clean = {key: value for key, value in os.environ.items() if key != "PYFILEDROP_PASSWORD"}
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120, env=clean)
        assert refused.returncode == 1 and "401" in refused.stderr
        wrong = subprocess.run(command + ["-u", "nope"], capture_output=True, text=True, timeout=120, env=clean)
        assert wrong.returncode == 1 and "403" in wrong.stderr
        assert not (tmp_path / "storage" / "a.txt").exists()
        sent = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env={**clean, "PYFILEDROP_PASSWORD": UPLOAD_PASSWORD})
        assert sent.returncode == 0, sent.stderr
    assert (tmp_path / "storage" / "a.txt").read_bytes() == b"secret drop"
