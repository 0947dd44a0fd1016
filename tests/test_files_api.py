"""The admin API behind /files on real servers: GET /api/uploads (shape, times, filters, keyset pages, index use),
the existence check after files are removed or changed by hand, DELETE, clean-up, folders, and --expire-after
with an injected clock."""
from __future__ import annotations

import base64
import json
import os
import urllib.parse
import uuid

import pytest
from conftest import chunk_fields, encode_multipart, sha256

import pyfiledrop

ADMIN = "admin pass"
ADMIN_HASH = pyfiledrop.PasswordHash.of(ADMIN)
AUTH = {"Authorization": "Basic " + base64.b64encode(f":{ADMIN}".encode()).decode()}
KEYS = {"id", "name", "folder", "size", "sha256", "state", "exists", "client", "created", "completed", "expires"}
T0 = 1_800_000_000.0   # 2027-01-15T08:00:00Z


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def admin(make_server):
    """``admin(**options)``: a server with the admin password and a clock the test moves."""

    def start(**options):
        clock = Clock()
        server = make_server(admin_password=ADMIN_HASH, clock=clock, **options)
        server.clock = clock
        return server

    return start


def put(server, name: str, data: bytes) -> dict:
    status, _, body = server.request("PUT", "/upload/" + urllib.parse.quote(name), data)
    assert status == 200, body
    return json.loads(body)


def listing(server, query: str = "") -> dict:
    status, _, body = server.request("GET", f"/api/uploads{query}", None, AUTH)
    assert status == 200, body
    return json.loads(body)


def api(server, method: str, path: str, payload=None):
    body = json.dumps(payload).encode() if payload is not None else None
    status, _, data = server.request(method, path, body, {**AUTH, "Content-Type": "application/json"})
    return status, (json.loads(data) if data.startswith((b"{", b"[")) else data.decode())


def fake_records(server, count: int, *, created=lambda n: T0 + n, name=lambda n: f"file{n:06d}.bin"):
    """``count`` stored records written straight into the ledger (as many as a long-used server has)."""
    infos = [pyfiledrop.UploadInfo(id=f"{n:08d}-{uuid.uuid4()}", name=name(n), size=n, part_size=max(1, n),
                                   client="10.0.0.7", created=created(n), updated=created(n),
                                   state=pyfiledrop.State.STORED, received=((0, n),) if n else (),
                                   sha256="0" * 64, stored_name=name(n), finished=created(n))
             for n in range(count)]
    server.engine.ledger.save(*infos)
    return infos


# -- the list -------------------------------------------------------------------------------------------------------

def test_the_list_has_the_documented_shape_newest_first_with_iso_times(admin):
    server = admin(expire_after_s=7 * 86400)
    first = put(server, "one.txt", b"one")
    server.clock.now += 60
    second = put(server, "two.txt", b"second")
    data = listing(server)
    assert set(data) == {"uploads", "next"} and data["next"] is None
    assert [entry["id"] for entry in data["uploads"]] == [second["id"], first["id"]]
    entry = data["uploads"][0]
    assert set(entry) == KEYS
    assert entry == {"id": second["id"], "name": "two.txt", "folder": "", "size": 6, "sha256": sha256(b"second"),
                     "state": "stored", "exists": True, "client": "127.0.0.1", "created": "2027-01-15T08:01:00Z",
                     "completed": "2027-01-15T08:01:00Z", "expires": "2027-01-22T08:01:00Z"}


def test_without_expire_after_stored_files_never_expire_and_partials_show_their_ttl(admin):
    server = admin(partial_ttl_hours=24)
    put(server, "kept.txt", b"x")
    body, content_type = encode_multipart(chunk_fields("partial-1", 0, 10, 5), [("file", "half.bin", b"12345")])
    assert server.request("POST", "/upload", body, {"Content-Type": content_type})[0] == 200
    server.clock.now += 30
    entries = {entry["name"]: entry for entry in listing(server, "?detail=1")["uploads"]}
    assert entries["kept.txt"]["expires"] is None
    assert entries["half.bin"] | {"received": 5} == entries["half.bin"]
    assert entries["half.bin"]["state"] == "receiving" and entries["half.bin"]["exists"] is True
    assert entries["half.bin"]["expires"] == "2027-01-16T08:00:00Z" and entries["half.bin"]["completed"] is None


def test_keyset_pages_return_every_record_once_in_order(admin):
    server = admin()
    infos = fake_records(server, 250, created=lambda n: T0 + n // 7)   # ties on created: the id breaks them
    for sort, key, reverse in [("newest", lambda i: (i.created, i.id), True), ("oldest", lambda i: (i.created, i.id),
                                                                             False),
                               ("name", lambda i: (i.name, i.id), False), ("size", lambda i: (i.size, i.id), True)]:
        seen, cursor = [], ""
        while True:
            data = listing(server, f"?sort={sort}&limit=40" + (f"&cursor={cursor}" if cursor else ""))
            seen += [entry["id"] for entry in data["uploads"]]
            cursor = data["next"]
            if cursor is None:
                break
        assert seen == [info.id for info in sorted(infos, key=key, reverse=reverse)], sort


@pytest.mark.parametrize("query", ["", "?sort=oldest", "?sort=name", "?sort=size", "?state=stored",
                                   "?sort=name&state=deleted"])
def test_each_page_query_walks_an_index_without_sorting(admin, query):
    """What keeps 100,000 records fast: no full sort, one index walk from the cursor on."""
    server = admin()
    fake_records(server, 300)
    cursor = listing(server, query + ("&" if query else "?") + "limit=10")["next"]
    params = dict(part.split("=") for part in query[1:].split("&") if part)
    if cursor:
        params["cursor"] = cursor
    where, arguments, order, _, limit = pyfiledrop.list_query(params, T0)
    plan = server.engine.ledger._db.execute(f"EXPLAIN QUERY PLAN SELECT id FROM uploads WHERE {where} ORDER BY "
                                            f"{order} LIMIT {limit}", arguments).fetchall()
    text = " | ".join(row[-1] for row in plan)
    assert "INDEX uploads_" in text and "TEMP B-TREE" not in text, text


def test_filters_by_name_state_and_folder(admin):
    server = admin()
    put(server, "100%_done.txt", b"a")
    put(server, "100 percent.txt", b"b")
    put(server, "photos/cat.jpg", b"c")
    put(server, "photos/2024/dog.jpg", b"d")
    names = lambda query: sorted(e["folder"] + "/" + e["name"] for e in listing(server, query)["uploads"])  # noqa
    assert names("?q=%25_") == ["/100%_done.txt"]                      # % and _ are literal
    assert names("?q=JPG") == ["photos/2024/dog.jpg", "photos/cat.jpg"]  # any case
    assert names("?folder=") == ["/100 percent.txt", "/100%_done.txt"]
    assert names("?folder=photos") == ["photos/cat.jpg"]
    assert names("?folder=photos/2024") == ["photos/2024/dog.jpg"]
    assert names("?state=receiving,deleted") == []
    assert len(names("?state=stored")) == 4


@pytest.mark.parametrize("query", ["?state=bogus", "?sort=random", "?cursor=!!!", "?limit=0", "?limit=501",
                                   "?limit=-1", "?folder=../etc", "?folder=.hidden",
                                   "?cursor=" + base64.urlsafe_b64encode(b'["name", "x", "y"]').decode()])
def test_a_bad_query_is_400_in_one_line(admin, query):
    server = admin()
    status, headers, body = server.request("GET", f"/api/uploads{query}", None, AUTH)
    assert status == 400 and body.count(b"\n") == 1 and b"Traceback" not in body, body


def test_a_cursor_of_another_sort_order_is_refused(admin):
    server = admin()
    fake_records(server, 5)
    cursor = listing(server, "?limit=2")["next"]
    assert server.request("GET", f"/api/uploads?sort=name&cursor={cursor}", None, AUTH)[0] == 400


# -- does the file still exist? -------------------------------------------------------------------------------------

def test_a_file_removed_or_changed_by_hand_is_marked(admin):
    server = admin()
    # Contents differ: equal ones would be stored as one file (dedup), and a change to one a change to all.
    removed, appended, replaced, kept = (put(server, f"{name}.txt", f"{number}2345".encode()) for number, name in
                                         enumerate(("removed", "appended", "replaced", "kept")))
    os.unlink(server.storage / "removed.txt")
    with open(server.storage / "appended.txt", "ab") as handle:
        handle.write(b"6")
    (server.storage / "new.tmp").write_bytes(b"54321")               # same size, another file
    os.replace(server.storage / "new.tmp", server.storage / "replaced.txt")
    entries = {e["name"]: e for e in listing(server, "?detail=1")["uploads"]}
    assert (entries["removed.txt"]["exists"], entries["removed.txt"]["changed"]) == (False, False)
    assert (entries["appended.txt"]["exists"], entries["appended.txt"]["changed"]) == (False, True)
    assert (entries["replaced.txt"]["exists"], entries["replaced.txt"]["changed"]) == (False, True)
    assert (entries["kept.txt"]["exists"], entries["kept.txt"]["changed"]) == (True, False)
    assert all(e["state"] == "stored" for e in entries.values())


# -- delete ----------------------------------------------------------------------------------------------------------

def test_delete_removes_the_stored_file_and_keeps_the_record(admin):
    server = admin()
    upload = put(server, "gone.txt", b"bytes")
    status, entry = api(server, "DELETE", f"/api/uploads/{upload['id']}")
    assert status == 200 and entry["state"] == "deleted" and entry["exists"] is False
    assert not (server.storage / "gone.txt").exists()
    assert listing(server)["uploads"][0]["state"] == "deleted"
    assert api(server, "DELETE", f"/api/uploads/{upload['id']}")[0] == 200   # again: nothing more to do
    assert server.request("GET", f"/download/{upload['id']}")[0] in (403, 404)


def test_delete_removes_an_incomplete_upload(admin):
    server = admin()
    body, content_type = encode_multipart(chunk_fields("half-done", 0, 10, 5), [("file", "half.bin", b"12345")])
    assert server.request("POST", "/upload", body, {"Content-Type": content_type})[0] == 200
    assert [name for name in os.listdir(server.chunks) if name.endswith(".part")]
    status, entry = api(server, "DELETE", "/api/uploads/half-done")
    assert status == 200 and entry["state"] == "deleted"
    assert not [name for name in os.listdir(server.chunks) if name.endswith(".part")]
    assert listing(server)["uploads"][0]["state"] == "deleted" and os.listdir(server.storage) == []


def test_delete_leaves_a_file_changed_by_hand_in_place(admin):
    server = admin()
    upload = put(server, "edited.txt", b"12345")
    (server.storage / "edited.txt").write_bytes(b"mine now")
    status, message = api(server, "DELETE", f"/api/uploads/{upload['id']}")
    assert status == 409 and "changed on the server" in message
    assert (server.storage / "edited.txt").read_bytes() == b"mine now"


@pytest.mark.parametrize("upload_id", ["no-such-upload", "..%2F..%2Fetc", "a" * 65])
def test_delete_of_an_unknown_id_is_404(admin, upload_id):
    assert api(admin(), "DELETE", f"/api/uploads/{upload_id}")[0] == 404


def test_the_admin_downloads_even_with_downloads_off(admin):
    server = admin()
    upload = put(server, "photos/é.jpg", b"jpeg bytes")
    status, headers, body = server.request("GET", f"/api/uploads/{upload['id']}/file", None, AUTH)
    assert status == 200 and body == b"jpeg bytes"
    assert headers["Content-Disposition"].startswith("attachment")
    assert server.request("GET", f"/download/{upload['id']}")[0] == 403   # not for everyone


# -- expiry ----------------------------------------------------------------------------------------------------------

def test_expire_after_removes_stored_files_and_keeps_their_records(admin):
    server = admin(expire_after_s=3600)
    old = put(server, "old.txt", b"old")
    server.clock.now += 1800
    young = put(server, "young.txt", b"young")
    server.clock.now += 1799
    assert server.engine.expire() == 0 and (server.storage / "old.txt").exists()
    server.clock.now += 1
    assert server.engine.expire() == 1
    assert not (server.storage / "old.txt").exists() and (server.storage / "young.txt").exists()
    entries = {e["id"]: e for e in listing(server)["uploads"]}
    assert (entries[old["id"]]["state"], entries[old["id"]]["exists"]) == ("expired", False)
    assert entries[old["id"]]["completed"] == "2027-01-15T08:00:00Z"
    assert entries[young["id"]]["expires"] == "2027-01-15T09:30:00Z"
    status, _, body = server.request("GET", f"/api/uploads/{old['id']}")
    assert b"expired" in body


def test_expiry_leaves_a_file_changed_by_hand(admin):
    server = admin(expire_after_s=60)
    put(server, "notes.txt", b"12345")
    (server.storage / "notes.txt").write_bytes(b"edited by hand")
    server.clock.now += 61
    assert server.engine.expire() == 1
    assert (server.storage / "notes.txt").read_bytes() == b"edited by hand"
    assert listing(server)["uploads"][0]["state"] == "expired"


def test_expire_after_on_the_command_line():
    assert pyfiledrop.parse_args(["--expire-after", "7d"]).expire_after_s == 7 * 86400
    assert pyfiledrop.parse_args(["--expire-after", "1.5h"]).expire_after_s == 5400
    assert pyfiledrop.parse_args(["--expire-after", "90s"]).expire_after_s == 90
    assert pyfiledrop.parse_args([]).expire_after_s is None
    for bad in ["7", "0d", "-1d", "7w", "d"]:
        with pytest.raises(SystemExit):
            pyfiledrop.parse_args(["--expire-after", bad])


def test_cleanup_removes_abandoned_partials_and_what_is_past_expiry(admin):
    server = admin(expire_after_s=86400)
    for upload_id in ("stale-one", "stale-two"):
        body, content_type = encode_multipart(chunk_fields(upload_id, 0, 10, 5), [("file", "f.bin", b"12345")])
        assert server.request("POST", "/upload", body, {"Content-Type": content_type})[0] == 200
    put(server, "due.txt", b"x")
    server.clock.now += 86400
    body, content_type = encode_multipart(chunk_fields("fresh", 0, 10, 5), [("file", "g.bin", b"12345")])
    assert server.request("POST", "/upload", body, {"Content-Type": content_type})[0] == 200
    assert {e["id"]: e["state"] for e in listing(server, "?state=abandoned")["uploads"]} == {
        "stale-one": "abandoned", "stale-two": "abandoned"}
    status, counts = api(server, "POST", "/api/cleanup", {})
    assert status == 200 and counts == {"abandoned": 2, "expired": 1}
    parts = [name for name in os.listdir(server.chunks) if name.endswith(".part")]
    assert parts == [pyfiledrop._part_key("fresh") + ".part"]
    assert not (server.storage / "due.txt").exists()


# -- folders ---------------------------------------------------------------------------------------------------------

def test_folders_list_create_rename_delete(admin):
    server = admin()
    upload = put(server, "trip/day1/beach.jpg", b"sand")
    assert api(server, "GET", "/api/folders") == (200, {"path": "", "folders": ["trip"]})
    assert api(server, "GET", "/api/folders?path=trip") == (200, {"path": "trip", "folders": ["day1"]})
    assert api(server, "POST", "/api/folders", {"path": "trip/day2"}) == (201, {"path": "trip/day2"})
    assert api(server, "POST", "/api/folders", {"path": "trip/day2"})[0] == 409
    assert (server.storage / "trip" / "day2").is_dir()
    assert api(server, "POST", "/api/folders/rename", {"path": "trip", "to": "holiday"}) == (200, {"path": "holiday"})
    entry = listing(server)["uploads"][0]
    assert (entry["folder"], entry["name"], entry["exists"]) == ("holiday/day1", "beach.jpg", True)
    status, _, body = server.request("GET", f"/api/uploads/{upload['id']}/file", None, AUTH)
    assert (status, body) == (200, b"sand")
    assert api(server, "DELETE", "/api/folders?path=holiday/day1")[0] == 409   # not empty
    assert api(server, "DELETE", "/api/folders?path=holiday/day2") == (200, {"path": "holiday/day2"})
    assert not (server.storage / "holiday" / "day2").exists()
    assert api(server, "DELETE", "/api/folders?path=holiday/day2")[0] == 404


def test_renaming_onto_an_existing_folder_is_refused(admin):
    server = admin()
    put(server, "a/x.txt", b"x")
    put(server, "b/y.txt", b"y")
    assert api(server, "POST", "/api/folders/rename", {"path": "a", "to": "b"})[0] == 409
    assert (server.storage / "a" / "x.txt").exists() and (server.storage / "b" / "y.txt").exists()


@pytest.mark.parametrize("path", ["../outside", "a/../../outside", ".hidden", "a//b", "", "a/" * 40 + "b",
                                  "con\x00trol", "x" * 300])
def test_hostile_folder_names_are_refused(admin, path):
    server = admin()
    status, message = api(server, "POST", "/api/folders", {"path": path})
    assert status == 400, message
    assert not (server.storage.parent / "outside").exists()


def test_a_folder_that_links_out_of_storage_is_refused(admin, tmp_path):
    server = admin()
    outside = tmp_path / "elsewhere"
    (outside / "inner").mkdir(parents=True)
    os.symlink(outside, server.storage / "link")
    assert api(server, "GET", "/api/folders?path=link")[0] == 403
    assert api(server, "DELETE", "/api/folders?path=link/inner")[0] == 403
    assert (outside / "inner").is_dir()


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"path": 5}', b"{" + b" " * 70000 + b"}"])
def test_a_bad_folder_request_body_is_4xx(admin, body):
    server = admin()
    status, _, _ = server.request("POST", "/api/folders", body, {**AUTH, "Content-Type": "application/json"})
    assert status in (400, 413)


def test_a_folder_cannot_move_into_itself(admin):
    server = admin()
    put(server, "a/x.txt", b"x")
    assert api(server, "POST", "/api/folders/rename", {"path": "a", "to": "a/b"})[0] == 400
    assert api(server, "POST", "/api/folders/rename", {"path": "a", "to": "a"})[0] == 400
    assert (server.storage / "a" / "x.txt").exists()


def test_an_uploaders_status_reply_says_when_the_file_expires(admin):
    server = admin(expire_after_s=2 * 86400)
    upload = put(server, "soon.txt", b"x")
    status, _, body = server.request("GET", f"/api/uploads/{upload['id']}")
    assert status == 200 and json.loads(body)["expires"] == "2027-01-17T08:00:00Z"
    plain = admin()
    upload = put(plain, "kept.txt", b"x")
    assert json.loads(plain.request("GET", f"/api/uploads/{upload['id']}")[2])["expires"] is None


NESTED = b"[" * 1000 + b"]" * 1000
BIG_CURSOR = base64.urlsafe_b64encode(b'["newest", 10000000000000000000, "x"]').decode()


@pytest.mark.parametrize("method, path, payload, headers, expected", [
    ("GET", "/api/uploads?limit=%C2%B2", None, {}, 400),          # "²": str.isdigit() says yes, int() no
    ("GET", "/api/uploads?limit=%B2", None, {}, 400),             # not UTF-8
    ("GET", "/api/uploads?state=%FF", None, {}, 400),
    ("GET", "/api/uploads?x=%FF", None, {}, 200),                 # an unknown field, even undecodable, is ignored
    ("GET", "/api/uploads?q=%FF", None, {}, 200),
    ("GET", f"/api/uploads?cursor={BIG_CURSOR}", None, {}, 400),  # over 64 bits: SQLite cannot bind it
    ("GET", "/api/notes?limit=%B2", None, {}, 400),
    ("GET", "/api/notes?before=%B9", None, {}, 400),
    ("POST", "/api/uploads/status", NESTED, {"Content-Type": "application/json"}, 400),   # RecursionError
    ("POST", "/api/folders", NESTED, {"Content-Type": "application/json"}, 400),
    ("POST", "/api/notes", b'{"text": "hi"}', {"Content-Type": "application/json", "Origin": "http://["}, 403),
    ("PUT", "/upload/o.txt", b"hi", {"Origin": "http://[::1"}, 403),
    ("GET", "/api/folders?path=kept.txt", None, {}, 404),         # a stored file is no folder
    ("DELETE", "/api/folders?path=kept.txt", None, {}, 404),
    ("POST", "/api/folders", b'{"path": "kept.txt/sub"}', {"Content-Type": "application/json"}, 409),
    ("POST", "/api/folders/rename", b'{"path": "kept.txt", "to": "moved.txt"}',
     {"Content-Type": "application/json"}, 404),                  # the file would lose its record
])
def test_requests_a_fuzzer_found_answered_500_get_a_plain_4xx(admin, method, path, payload, headers, expected):
    """Found by 12,000 fuzzed requests (deep JSON, a malformed Origin, undecodable or over-long query values, a
    stored file named as a folder): each was answered 500, and a folder rename moved a stored file away from
    its record.  Each gets its own plain answer now, and the stored file stays as it was."""
    server = admin(password=pyfiledrop.PasswordHash.of("upload pass"))
    upload_auth = {"Authorization": "Basic " + base64.b64encode(b":upload pass").decode()}
    status, _, body = server.request("PUT", "/upload/kept.txt", b"kept", upload_auth)
    assert status == 200, body
    status, _, body = server.request(method, path, payload, {**AUTH, **headers})
    assert status == expected, (status, body)
    assert b"Traceback" not in body and str(server.config.storage).encode() not in body
    assert (server.config.storage / "kept.txt").read_bytes() == b"kept"
    assert not (server.config.storage / "moved.txt").exists()
