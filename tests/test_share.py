"""--share DIR: the folder's files listed (GET /api/shared) and downloadable (GET /shared/PATH) with Range and
RFC 6266 names; nothing outside the folder reachable, whatever the path says.  Real servers, raw sockets for
request targets no client library would send, and the page in Chromium.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from conftest import cli_server, raw_get, running_server

import pyfiledrop

SECRET = b"the secret outside the shared folder"


@pytest.fixture
def shared(tmp_path) -> Path:
    """A shared folder with files, a subfolder, hidden entries and symlinks in and out; a secret beside it."""
    root = tmp_path / "share"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden-folder").mkdir()
    (root / "a.txt").write_bytes(b"alpha")
    (root / "résumé ü.pdf").write_bytes(b"%PDF-" + bytes(range(256)) * 40)
    (root / "sub" / "b.bin").write_bytes(os.urandom(3000))
    (root / "sub" / "deeper" / "c.txt").write_bytes(b"gamma")
    (root / '<img src=x onerror="document.title=1">.txt').write_bytes(b"x")
    (root / ".env").write_bytes(b"hidden")
    (root / ".hidden-folder" / "d.txt").write_bytes(b"hidden too")
    (tmp_path / "secret.txt").write_bytes(SECRET)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    if hasattr(os, "symlink"):
        os.symlink(tmp_path / "secret.txt", root / "link-out.txt")
        os.symlink(outside, root / "linkdir")
        os.symlink(root / "a.txt", root / "link-in.txt")
    return root


def listing(server) -> dict:
    status, headers, body = server.request("GET", "/api/shared")
    assert status == 200, body
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


def test_the_listing_is_recursive_sorted_and_leaves_out_hidden_and_outside_entries(tmp_path, shared):
    with running_server(tmp_path, share=shared) as server:
        reply = listing(server)
    paths = [entry["path"] for entry in reply["files"]]
    expected = ['<img src=x onerror="document.title=1">.txt', "a.txt", "résumé ü.pdf", "sub/b.bin",
                "sub/deeper/c.txt"]
    if hasattr(os, "symlink"):
        expected.insert(2, "link-in.txt")  # a symlink to a file inside the folder is that file
    assert paths == expected
    assert reply["truncated"] is False
    entry = next(e for e in reply["files"] if e["path"] == "sub/b.bin")
    assert entry["size"] == 3000
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["modified"])
    assert abs(time.mktime(time.strptime(entry["modified"], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
               - (shared / "sub" / "b.bin").stat().st_mtime) < 2


def test_the_listing_stops_at_its_limit(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for index in range(30):
        (root / f"{index:03}.txt").write_bytes(b"")
    files, truncated = pyfiledrop.shared_files(root, limit=10)
    assert truncated and [f["path"] for f in files] == [f"{i:03}.txt" for i in range(10)]
    files, truncated = pyfiledrop.shared_files(root, limit=30)
    assert len(files) == 30 and not truncated


def test_a_shared_file_downloads_with_its_name_safe_headers_and_ranges(tmp_path, shared):
    data = (shared / "résumé ü.pdf").read_bytes()
    with running_server(tmp_path, share=shared) as server:
        path = "/shared/" + quote("résumé ü.pdf")
        status, headers, body = raw_get(server.port, path)
        assert status == 200 and body == data
        assert headers["content-disposition"] == [
            "attachment; filename=\"r_sum_ _.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9%20%C3%BC.pdf"]
        assert headers["content-type"] == ["application/octet-stream"]
        assert headers["x-content-type-options"] == ["nosniff"]
        assert headers["content-security-policy"] == ["sandbox; default-src 'none'"]
        assert len(headers["date"]) == 1
        assert headers["accept-ranges"] == ["bytes"]
        status, headers, body = server.request("GET", path, headers={"Range": "bytes=100-199"})
        assert status == 206 and body == data[100:200]
        assert headers["Content-Range"] == f"bytes 100-199/{len(data)}"
        status, _, body = server.request("GET", path, headers={"Range": "bytes=-50"})
        assert status == 206 and body == data[-50:]
        status, _, _ = server.request("GET", path, headers={"Range": f"bytes={len(data) + 10}-"})
        assert status == 416
        status, _, body = server.request("GET", "/shared/sub/deeper/c.txt")
        assert (status, body) == (200, b"gamma")
        status, headers, body = server.request("HEAD", "/shared/sub/b.bin")
        assert status == 200 and body == b"" and headers["Content-Length"] == "3000"


ESCAPES = [
    "/shared/../secret.txt", "/shared/%2e%2e/secret.txt", "/shared/%2E%2E%2Fsecret.txt", "/shared/..%2fsecret.txt",
    "/shared/sub/../../secret.txt", "/shared/sub%2f..%2f..%2fsecret.txt", "/shared/sub/..%5c..%5csecret.txt",
    "/shared/..%5csecret.txt", "/shared/sub%2fb.bin", "/shared/sub%2Fdeeper/c.txt", "/shared//etc/passwd",
    "/shared/%2Fetc%2Fpasswd", "/shared/%2f%2fetc/passwd",
    "/shared/a.txt%00", "/shared/a%00/../../secret.txt", "/shared/%252e%252e/secret.txt", "/shared/./a.txt",
    "/shared/sub//b.bin", "/shared/C:/Windows/win.ini", "/shared/a.txt:stream", "/shared/link-out.txt",
    "/shared/linkdir/secret.txt", "/shared/.env", "/shared/.hidden-folder/d.txt", "/shared/sub/",
    "/shared/%c0%ae%c0%ae/secret.txt", "/shared/sub/deeper/../../../outside/secret.txt", "/shared/nothing.txt",
    "/shared/" + quote(str(Path("/etc/passwd"))), "/shared/" + "a/" * 300 + "x",
]


def test_nothing_outside_the_shared_folder_is_reachable(tmp_path, shared):
    with running_server(tmp_path, share=shared) as server:
        for target in ESCAPES:
            status, headers, body = raw_get(server.port, target)
            assert status in (400, 404), (target, status, body)
            assert SECRET not in body and b"hidden" not in body, target
            assert str(tmp_path).encode() not in body, target  # no server path in the message
            assert headers["content-type"][0].startswith("text/plain"), target
        status, _, body = raw_get(server.port, "/shared/a.txt")
        assert (status, body) == (200, b"alpha")  # and it keeps serving


def test_the_resolver_refuses_what_is_not_a_plain_relative_path(tmp_path, shared):
    for path in ["", "/", "..", "a/../b", "a//b", "./a.txt", "a\\b", "a\x00", "C:", "/etc/passwd"]:
        with pytest.raises(pyfiledrop.BadRequest):
            pyfiledrop.resolve_shared(shared, path)
    for path in [".env", "sub/.x", "link-out.txt", "linkdir/secret.txt", "sub", "missing"]:
        with pytest.raises(pyfiledrop.NotFound):
            pyfiledrop.resolve_shared(shared, path)
    assert pyfiledrop.resolve_shared(shared, "sub/b.bin") == os.path.realpath(shared / "sub" / "b.bin")


def test_a_file_replaced_by_an_outward_symlink_while_running_is_refused(tmp_path, shared):
    with running_server(tmp_path, share=shared) as server:
        assert server.request("GET", "/shared/sub/deeper/c.txt")[0] == 200
        (shared / "sub" / "deeper" / "c.txt").unlink()
        os.symlink(tmp_path / "secret.txt", shared / "sub" / "deeper" / "c.txt")
        status, _, body = server.request("GET", "/shared/sub/deeper/c.txt")
        assert status == 404 and SECRET not in body
        assert "sub/deeper/c.txt" not in [e["path"] for e in listing(server)["files"]]


def test_without_share_there_is_nothing_shared_and_no_list_on_the_page(tmp_path):
    with running_server(tmp_path) as server:
        assert server.request("GET", "/api/shared")[0] == 404
        assert server.request("GET", "/shared/a.txt")[0] == 404
        assert server.request("GET", "/assets/shared.js")[0] == 404
        assert pyfiledrop.SHARED_SCRIPT_TAG.encode() not in server.request("GET", "/")[2]


def test_share_option_checks_the_folder_and_the_banner_says_what_is_shared(tmp_path, shared):
    import subprocess
    import sys

    from conftest import ROOT
    result = subprocess.run([sys.executable, str(ROOT / "pyfiledrop.py"), "--share", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("pyfiledrop: error: --share: no such folder")
    args = ["--share", str(shared), "--no-qr", "-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks")]
    with cli_server(args) as (process, _port):
        from conftest import Output
        output = Output(process)
        output.wait_for(lambda text: "Press Ctrl+C to stop." in text)
        process.terminate()
        text = output.close()
    count = len(pyfiledrop.shared_files(shared)[0])
    assert f"  sharing        {shared} ({count} files, listed on the page for download)" in text


# -- the page -----------------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")
def test_the_page_lists_shared_files_as_text_and_downloads_one(tmp_path, shared):
    sync_api = pytest.importorskip("playwright.sync_api")
    with running_server(tmp_path, share=shared) as server, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(accept_downloads=True)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(server.url + "/")
            page.wait_for_selector("#shared-list li", timeout=60_000)
            items = page.locator("#shared-list li")
            texts = [items.nth(i).inner_text() for i in range(items.count())]
            assert any(t.startswith("sub/b.bin") and t.rstrip().endswith("2.93 KiB") for t in texts), texts
            assert any(t.startswith("sub/deeper/c.txt") and t.rstrip().endswith("5 B") for t in texts), texts
            assert any("résumé ü.pdf" in t and "10 KiB" in t for t in texts), texts
            assert any('<img src=x onerror="document.title=1">.txt' in t for t in texts)  # shown as text
            assert page.title() == "pyfiledrop" and page.locator("#shared-list img").count() == 0
            heading = page.locator("#shared-heading")
            assert heading.inner_text() == "Shared from this computer"
            with page.expect_download() as download:
                page.locator("#shared-list a", has_text="sub/deeper/c.txt").click()
            assert download.value.suggested_filename == "c.txt"
            assert Path(download.value.path()).read_bytes() == b"gamma"
            assert errors == [], errors  # no CSP violation, no script error
        finally:
            browser.close()
