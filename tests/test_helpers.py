"""Pure helpers, by table."""
import pytest

import pyfiledrop
from pyfiledrop import BadRequest, TooLarge, chunk_count, chunk_length, numbered_name, parse_chunk_fields, \
    sanitize_filename


@pytest.mark.parametrize("raw, expected", [
    ("photo.jpg", "photo.jpg"),
    ("café.txt", "café.txt"),
    ("文件.txt", "文件.txt"),
    ("😀.txt", "😀.txt"),
    ("cafe\u0301.txt", "café.txt"),                      # NFD becomes NFC
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\win.ini", "win.ini"),
    ("/absolute/path.txt", "path.txt"),
    ("C:\\Users\\me\\doc.pdf", "doc.pdf"),
    ("..", "file"),
    (".", "file"),
    ("", "file"),
    ("   ", "file"),
    ("a\x00b\x1fc.txt", "abc.txt"),
    ("line\nbreak.txt", "linebreak.txt"),
    ("what?<>|*\".txt", "what______.txt"),
    ("colon:stream.txt", "colon_stream.txt"),
    ("CON", "_CON"),
    ("con.txt", "_con.txt"),
    ("LPT1.log", "_LPT1.log"),
    ("COM¹.txt", "_COM¹.txt"),
    ("console.txt", "console.txt"),
    ("trailing dots...", "trailing dots"),
    ("trail. .", "trail"),                      # dots and spaces mixed at the end (Windows drops them all)
    ("trail . . ", "trail"),
    ("CON. .", "_CON"),
    ("a.\u00a0.", "a"),
    ("  spaced  out .txt  ", "spaced out .txt"),
    (".bashrc", "_bashrc"),            # nothing stored is hidden
    ("\ufffd\ufffd.txt", "__.txt"),        # bytes that were not UTF-8
    ("gpj.\u202eexe", "gpj.exe"),                        # no right-to-left override tricks
    ("<img src=x onerror=alert(1)>.txt", "_img src=x onerror=alert(1)_.txt"),
])
def test_sanitize_filename(raw, expected):
    assert sanitize_filename(raw) == expected


@pytest.mark.parametrize("raw", ["a" * 300 + ".txt", "文" * 200 + ".txt", "😀" * 100 + ".tar.gz", "x" * 1000])
def test_sanitize_filename_limits_length_and_keeps_the_extension(raw):
    name = sanitize_filename(raw)
    assert len(name.encode("utf-8")) <= pyfiledrop.MAX_NAME_BYTES
    assert name.endswith(raw[-7:] if raw.endswith(".tar.gz") else raw[-4:] if "." in raw else "x")
    name.encode("utf-8")  # no half characters


@pytest.mark.parametrize("name, number, expected", [
    ("photo.jpg", 0, "photo.jpg"),
    ("photo.jpg", 1, "photo (1).jpg"),
    ("photo.jpg", 12, "photo (12).jpg"),
    ("archive.tar.gz", 2, "archive (2).tar.gz"),
    ("README", 1, "README (1)"),
    (".env", 1, ".env (1)"),
    ("a.b.c", 3, "a.b (3).c"),
    ("name with spaces .txt", 1, "name with spaces (1).txt"),   # one space before the number, not two
])
def test_numbered_name(name, number, expected):
    assert numbered_name(name, number) == expected


@pytest.mark.parametrize("size, chunk, count, last", [
    (0, 10, 1, 0), (1, 10, 1, 1), (10, 10, 1, 10), (11, 10, 2, 1), (25, 10, 3, 5), (30, 10, 3, 10),
])
def test_chunk_arithmetic(size, chunk, count, last):
    assert chunk_count(size, chunk) == count
    assert chunk_length(count - 1, size, chunk) == last
    assert sum(chunk_length(i, size, chunk) for i in range(count)) == size


def fields(**overrides):
    base = {"dzuuid": "abc-123", "dzchunkindex": "1", "dztotalfilesize": "25", "dzchunksize": "10",
            "dztotalchunkcount": "3", "dzchunkbyteoffset": "10"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_parse_chunk_fields_accepts_a_consistent_chunk():
    chunk = parse_chunk_fields(fields(), max_size=100)
    assert (chunk.upload_id, chunk.index, chunk.offset, chunk.length, chunk.total_chunks) == ("abc-123", 1, 10, 10, 3)


def test_parse_chunk_fields_without_dz_fields_is_a_plain_upload():
    assert parse_chunk_fields({"other": "x"}, max_size=100) is None


@pytest.mark.parametrize("overrides, message", [
    ({"dzuuid": "../../etc"}, "dzuuid"),
    ({"dzuuid": "a/b"}, "dzuuid"),
    ({"dzuuid": ""}, "dzuuid"),
    ({"dzuuid": "x" * 65}, "dzuuid"),
    ({"dzuuid": "abc def"}, "dzuuid"),
    ({"dzuuid": "ab\u0663"}, "dzuuid"),               # non-ASCII digit
    ({"dzchunkindex": "-1"}, "dzchunkindex"),
    ({"dzchunkindex": "1.0"}, "dzchunkindex"),
    ({"dzchunkindex": "1e1"}, "dzchunkindex"),
    ({"dzchunkindex": "١"}, "dzchunkindex"),          # int() would take Arabic-Indic digits
    ({"dzchunkindex": "1_0"}, "dzchunkindex"),
    ({"dzchunkindex": "3", "dzchunkbyteoffset": "30"}, "past the last chunk"),
    ({"dzchunkbyteoffset": "11"}, "dzchunkbyteoffset"),
    ({"dztotalchunkcount": "4"}, "dztotalchunkcount"),
    ({"dzchunksize": "0", "dztotalchunkcount": "1", "dzchunkindex": "0", "dzchunkbyteoffset": "0"}, "dzchunksize"),
    ({"dztotalfilesize": "abc"}, "dztotalfilesize"),
    ({"dztotalfilesize": "99999999999999999999999"}, "dztotalfilesize"),
    ({"dzchunksize": None}, "Missing field dzchunksize"),
    ({"dzchunksize": "1", "dztotalfilesize": str(2 ** 21), "dztotalchunkcount": str(2 ** 21)}, "Too many chunks"),
])
def test_parse_chunk_fields_rejects(overrides, message):
    with pytest.raises(BadRequest, match=message):
        parse_chunk_fields(fields(**overrides), max_size=10 ** 9)


def test_parse_chunk_fields_enforces_the_size_limit():
    with pytest.raises(TooLarge):
        parse_chunk_fields(fields(), max_size=24)


@pytest.mark.parametrize("name, expected", [
    ("plain.txt", "attachment; filename=\"plain.txt\"; filename*=UTF-8''plain.txt"),
    ("café.txt", "attachment; filename=\"caf_.txt\"; filename*=UTF-8''caf%C3%A9.txt"),
    ('qu"ote.txt', "attachment; filename=\"qu_ote.txt\"; filename*=UTF-8''qu%22ote.txt"),
])
def test_content_disposition(name, expected):
    assert pyfiledrop.content_disposition(name) == expected


@pytest.mark.parametrize("argv, message", [
    (["--chunk-size", "0"], "chunk-size"),
    (["--max-size", "-1"], "max-size"),
    (["--timeout", "abc"], "timeout"),
    (["-p", "0"], "port"),
    (["-p", "70000"], "port"),
    (["--partial-ttl", "0"], "partial-ttl"),
    (["--parallel-chunks", "0"], "parallel-chunks"),
    (["--chunk-size", str(2 ** 31)], "chunk-size"),
])
def test_parse_args_rejects_invalid_values(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        pyfiledrop.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_parse_args_keeps_the_original_options(tmp_path):
    config = pyfiledrop.parse_args(["-p", "8080", "-s", str(tmp_path / "s"), "-c", str(tmp_path / "c"),
                                    "--max-size", "5", "--timeout", "1000", "--chunk-size", "1000",
                                    "--disable-parallel-chunks", "--disable-force-chunking", "-a",
                                    "--dz-cdn", "https://cdn.example", "--dz-version", "5.9.3"])
    assert (config.port, config.max_size_bytes, config.timeout_ms, config.chunk_size) == (8080, 5 * 2 ** 20, 1000, 1000)
    assert config.parallel_chunks == 1 and not config.force_chunking and config.allow_downloads
    assert config.storage == (tmp_path / "s").resolve()
    assert (config.dz_cdn, config.dz_version) == ("https://cdn.example", "5.9.3")   # retired, still accepted


@pytest.mark.parametrize("size, shown", [(4 * 2 ** 20, "4 MiB"), (8 * 2 ** 20, "8 MiB"), (1_000_000, "976.6 KiB"),
                                         (100, "100 B"), (3 * 2 ** 30, "3 GiB")])
def test_binary_size(size, shown):
    assert pyfiledrop.binary_size(size) == shown


def test_the_fast_path_for_plain_names_gives_what_the_full_rules_give(monkeypatch):
    """sanitize_filename skips its rules for names they would leave alone: random names near every rule's
    edge (dots, spaces, reserved device names, the length limit, characters Windows forbids) must come out
    the same with the shortcut as without it."""
    import random
    import re
    import string
    rng = random.Random(20261202)
    alphabet = string.printable + "\u00e9\u202e\u3000\u00a0....   "
    names = ["CON", "con.txt", "Lpt1.tar.gz", "a..", "a.", " a", "a ", "a  b", ".a", "x" * 200, "x" * 201,
             "COM\u00b9", "nul .txt", "f00001.bin", "photo (1).jpg"]
    for _ in range(20000):
        count = rng.choice((rng.randint(0, 12), rng.randint(195, 205)))
        names.append("".join(rng.choice(alphabet if rng.random() < 0.5 else "aB. -_x(1)CON") for _ in range(count)))
    fast = [sanitize_filename(name) for name in names]
    monkeypatch.setattr(pyfiledrop, "_PLAIN_NAME_RE", re.compile(r"(?!)"))  # never matches: the full rules
    assert [sanitize_filename(name) for name in names] == fast


def test_a_changed_record_is_what_dataclasses_replace_gives():
    import dataclasses
    info = pyfiledrop.UploadInfo(id="u", name="a.bin", size=10, part_size=5, client="c", created=1.0, updated=2.0)
    changes = {"state": pyfiledrop.State.STORED, "received": ((0, 10),), "sha256": "ab", "updated": 3.0}
    changed = info.changed(**changes)
    assert changed == dataclasses.replace(info, **changes) and changed is not info
    assert hash(changed) == hash(dataclasses.replace(info, **changes))
    assert info.state is pyfiledrop.State.RECEIVING and info.received == ()  # the original stays as it was
    with pytest.raises(TypeError):
        info.changed(colour="red")
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.size = 3


def test_upload_ids_are_distinct_random_version_4_uuids_across_draws_and_threads():
    import threading
    import uuid
    ids: list[str] = []
    lock = threading.Lock()

    def draw():
        mine = [pyfiledrop.new_upload_id() for _ in range(700)]  # more than one 4 KiB draw holds
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == len(set(ids)) == 2800
    for text in ids:
        parsed = uuid.UUID(text)
        assert (str(parsed), parsed.version, parsed.variant) == (text, 4, uuid.RFC_4122)
