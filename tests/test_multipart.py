"""The streaming multipart scanner, against werkzeug's decoder on bodies read in awkward pieces."""
import io
import random
import re

import pytest
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

import pyfiledrop
from pyfiledrop import BadRequest, FormField, multipart_parts


class TrickleInput:
    """A request body that arrives in pieces of random sizes, as a socket delivers it."""

    def __init__(self, body: bytes, rng: random.Random, largest: int):
        self.stream = io.BytesIO(body)
        self.rng = rng
        self.largest = largest

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(min(size, self.rng.randint(1, self.largest)))


def parse(body: bytes, boundary: str, rng=None, largest=1 << 20, expectations=()):
    """``expectations``: lengths announced for the file parts in turn (as a chunk's fields announce it)."""
    environ = {"wsgi.input": TrickleInput(body, rng or random.Random(0), largest),
               "CONTENT_TYPE": f"multipart/form-data; boundary={boundary}"}
    parts, expectations = [], list(expectations)
    for part in multipart_parts(environ, len(body)):
        if isinstance(part, FormField):
            parts.append(("field", part.name, part.value.encode()))
        else:
            if expectations:
                part.expect(expectations.pop(0))
            parts.append(("file", part.name, part.filename, b"".join(bytes(p) for p in part.data)))
    return parts


def reference(body: bytes, boundary: str):
    decoder = MultipartDecoder(boundary.encode())
    decoder.receive_data(body)
    decoder.receive_data(None)
    parts, current = [], None
    while True:
        event = decoder.next_event()
        if isinstance(event, (Epilogue, NeedData)):
            return parts
        if isinstance(event, Field):
            current = ["field", event.name, b""]
            parts.append(current)
        elif isinstance(event, File):
            current = ["file", event.name, event.filename, b""]
            parts.append(current)
        elif isinstance(event, Data):
            current[-1] += event.data


def build(rng: random.Random, boundary: str) -> bytes:
    chunks = [b"preamble to ignore\r\n"] if rng.random() < 0.3 else []
    for index in range(rng.randint(1, 5)):
        padding = b" " * rng.randint(0, 3) if rng.random() < 0.2 else b""
        chunks.append(b"--" + boundary.encode() + padding + b"\r\n")
        if rng.random() < 0.5:
            chunks.append(f'Content-Disposition: form-data; name="field{index}"\r\n\r\n'.encode())
            chunks.append(str(rng.randint(0, 10 ** 9)).encode())
        else:
            chunks.append(f'Content-Disposition: form-data; name="file"; filename="f{index}.bin"\r\n'
                          "Content-Type: application/octet-stream\r\n\r\n".encode())
            data = bytearray(rng.randbytes(rng.choice([0, 1, 17, 4096, 70_000, 1_200_000])))
            # boundary look-alikes inside the data: the delimiter minus its last byte, and with a wrong tail
            for lookalike in (b"\r\n--" + boundary.encode()[:-1], b"\r\n--" + boundary.encode() + b"x", b"\r\n\r\n"):
                if data and rng.random() < 0.5:
                    at = rng.randrange(len(data))
                    data[at:at] = lookalike
            chunks.append(bytes(data))
        chunks.append(b"\r\n")
    chunks.append(b"--" + boundary.encode() + b"--\r\n")
    if rng.random() < 0.3:
        chunks.append(b"epilogue to ignore")
    return b"".join(chunks)


@pytest.mark.parametrize("seed", range(40))
def test_scanner_agrees_with_werkzeug(seed):
    rng = random.Random(seed)
    boundary = "----WebKitFormBoundary" + "".join(rng.choice("abcXYZ019") for _ in range(16))
    body = build(rng, boundary)
    expected = [tuple(part) for part in reference(body, boundary)]
    assert parse(body, boundary, rng, largest=rng.choice([1, 7, 100, 65536, 1 << 20])) == expected


@pytest.mark.parametrize("seed", range(40))
def test_an_announced_length_gives_the_same_parts(seed):
    """A file part announced at its true length (or shorter) is passed on without a search for the boundary,
    and must come out exactly as werkzeug decodes it; announced longer, it may only swallow what follows
    (the client's own upload is then wrong, and atomic chunks are refused), never lose data."""
    rng = random.Random(seed)
    boundary = "----WebKitFormBoundary" + "".join(rng.choice("abcXYZ019") for _ in range(16))
    body = build(rng, boundary)
    expected = [tuple(part) for part in reference(body, boundary)]
    true_lengths = [len(part[3]) for part in expected if part[0] == "file"]
    shorter = [max(0, length - rng.randint(0, 50)) for length in true_lengths]
    for announced in (true_lengths, shorter):
        assert parse(body, boundary, rng, rng.choice([7, 65536, 1 << 20]), announced) == expected
    longer = [length + rng.randint(1, 50) for length in true_lengths]
    try:
        got = parse(body, boundary, rng, 65536, longer)
    except BadRequest:
        return
    files = [part[3] for part in got if part[0] == "file"]
    assert files[:1] == [] or files[0].startswith([part[3] for part in expected if part[0] == "file"][0])


@pytest.mark.parametrize("body", [
    b"",                                                      # nothing
    b"--b\r\n",                                               # cut after the first boundary
    b'--b\r\nContent-Disposition: form-data; name="x"\r\n',  # headers never end
    b'--b\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\nno closing boundary',
    b"no boundary at all " * 2000,
    b"--bogus-boundary\r\n\r\n",
    b'--b\r\nContent-Disposition: form-data; name="x"\r\nX-Long: ' + b"h" * 1_100_000,   # headers past the buffer
])
def test_malformed_bodies_are_bad_requests(body):
    with pytest.raises(BadRequest):
        parse(body, "b")


def test_too_many_parts():
    body = b"".join(b'--b\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % i
                    for i in range(pyfiledrop.MAX_FORM_PARTS + 1)) + b"--b--\r\n"
    with pytest.raises(BadRequest):
        parse(body, "b")


def test_an_unread_file_part_is_skipped_over():
    body = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n' + b"A" * 3_000_000
            + b'\r\n--b\r\nContent-Disposition: form-data; name="after"\r\n\r\nyes\r\n--b--\r\n')
    environ = {"wsgi.input": io.BytesIO(body), "CONTENT_TYPE": "multipart/form-data; boundary=b"}
    seen = [(type(part).__name__, part.name) for part in multipart_parts(environ, len(body))]
    assert seen == [("FilePart", "file"), ("FormField", "after")]


# -- the one-match readings of common headers give what werkzeug gives -----------------------------------------

def _random_part_header(rng) -> bytes:
    starts = ['Content-Disposition: form-data; name="', 'content-disposition:form-data;name="',
              'CONTENT-DISPOSITION: form-data;  name="', 'Content-Disposition: form-data; name="x"; filename="',
              'Content-Disposition: attachment; name="', ' Content-Disposition: form-data; name="']
    pieces = ['a', 'Z', ' ', ';', '"', '\\', '%22', '%', '\u00e9', '\t', '\r\n', '\r\n ', '=', '*', "'", 'filename',
              'name', '\r\nContent-Type: text/plain', '\r\nContent-Disposition: form-data; name="b"', '\x00', '\xff',
              '\r\n\tx']
    raw = rng.choice(starts) + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 6)))
    if rng.random() < 0.5:
        raw += '"'
    if rng.random() < 0.4:
        raw += '; filename="' + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 5))) + '"'
    if rng.random() < 0.3:
        raw += rng.choice(['\r\nContent-Type: application/octet-stream', '\r\n content-type: x', '\r\nX-A: b', ' ',
                           '\r\ncontent-disposition: form-data; name="q"'])
    return raw.encode("utf-8") if rng.random() < 0.9 else raw.encode("latin-1", "replace")


def _outcome(function, value):
    try:
        return function(value)
    except pyfiledrop.BadRequest as error:
        return "refused", error.message


def test_part_headers_read_in_one_match_give_what_werkzeug_gives():
    rng = random.Random(20261202)
    headers = [_random_part_header(rng) for _ in range(30000)]
    assert sum(bool(pyfiledrop._PLAIN_DISPOSITION_RE.match(raw)) for raw in headers) > 1000  # the shortcut ran
    for raw in headers:
        assert _outcome(pyfiledrop._part_names, raw) == _outcome(pyfiledrop._part_names_in_full, raw), raw


def test_the_boundary_read_in_one_match_is_what_werkzeug_reads():
    from werkzeug.http import parse_options_header
    rng = random.Random(7)
    starts = ["multipart/form-data; boundary=", "Multipart/Form-Data;boundary=", "multipart/form-data;  boundary=",
              "multipart/mixed; boundary=", "multipart/form-data; charset=x; boundary=", "multipart/form-data;boundary="]
    pieces = list("aZ09'()+_,-./:=? ;\"\\\t%\u00e9") + ["----WebKitFormBoundary", "\r\n", "a", "-", "_", "."]
    for _ in range(30000):
        content_type = rng.choice(starts) + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        mimetype, options = parse_options_header(content_type)
        expected = options.get("boundary", "") if mimetype == "multipart/form-data" else ""
        assert pyfiledrop.multipart_boundary(content_type) == expected, content_type


def _tricky_fields_body(rng, boundary: str, lookalikes: bool) -> bytes:
    delimiter = b"\r\n--" + boundary.encode()
    pieces = [b"7", b"abc", b"", b"\r", b"\n", b"\r\n", b"\xff", b"\xc3\xa9", b" ", b"\t", b"%", b'"', b"x" * 600,
              boundary.encode()] + ([delimiter, delimiter, delimiter + b"7", delimiter + b"--x", delimiter[:-1],
                                     b"\r\n--"] if lookalikes else [])
    chunks = []
    for index in range(rng.randint(1, 8)):
        name = rng.choice([f"f{index}".encode(), b"dzuuid", b"a%b", b'q"', b"\xff", b"n\\x", "\u00e9".encode()])
        line = b"--" + boundary.encode() + (rng.choice([b" ", b"\t "]) if rng.random() < 0.15 else b"") + b"\r\n"
        header = (b'Content-Disposition: form-data; name="%s"' % name if rng.random() < 0.7 else
                  rng.choice([b'content-disposition: form-data; name="%s"' % name,
                              b'Content-Disposition: form-data; name="%s"\r\nContent-Type: text/plain' % name]))
        value = (b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))) if rng.random() < 0.3 else
                 rng.choice([b"", b"0", b"8388608", b"6c1f-0a", "\u00e9t\u00e9 x".encode(), b"a" * 1024, b"a" * 1025]))
        chunks.append(line + header + b"\r\n\r\n" + value + b"\r\n")
    if rng.random() < 0.5:
        chunks.append(b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="file"; filename="a"'
                      b"\r\n\r\n" + rng.randbytes(rng.choice([0, 5, 5000])) + b"\r\n")
    return b"".join(chunks) + b"--" + boundary.encode() + b"--\r\n"


def test_fields_read_in_one_match_agree_with_the_scanner_and_werkzeug(monkeypatch):
    """Plain form fields are read with one match each; any field that match cannot read exactly (a line break
    or a delimiter look-alike in the value, padding after the boundary, other headers, a bad name or value)
    must come out as the general scanner reads it: the same parts, or the same refusal; and as werkzeug reads
    it, where the values hold no delimiter look-alike."""
    rng = random.Random(20261203)
    cases = []
    for _ in range(3000):
        boundary = rng.choice(["b", "----WebKitFormBoundaryXy12", "x-y.z_0"])
        lookalikes = rng.random() < 0.5
        body = _tricky_fields_body(rng, boundary, lookalikes)
        cases.append((body, boundary, rng.choice([1, 50, 1 << 20, 1 << 20, 1 << 20]), lookalikes))
    read_at_once = []
    one_match = pyfiledrop._MultipartReader.plain_fields

    def counted(reader):
        fields = one_match(reader)
        read_at_once.extend(fields)
        return fields

    monkeypatch.setattr(pyfiledrop._MultipartReader, "plain_fields", counted)
    fast = [_outcome(lambda c: parse(c[0], c[1], random.Random(1), c[2]), case) for case in cases]
    assert len(read_at_once) > 600  # the one-match reading did run
    monkeypatch.setattr(pyfiledrop, "_PLAIN_FIELD_RE", re.compile(rb"(?!)"))  # the general scanner
    slow = [_outcome(lambda c: parse(c[0], c[1], random.Random(1), c[2]), case) for case in cases]
    assert sum(outcome[0] != "refused" for outcome in fast) > 300
    for case, got, expected in zip(cases, fast, slow):
        assert got == expected, case
        # werkzeug takes a delimiter followed by other bytes than CRLF for a delimiter too; RFC 2046 does not
        if expected[0] != "refused" and not case[3]:
            assert got == [tuple(part) for part in reference(case[0], case[1])], case


@pytest.mark.parametrize("tail", [b"7", b"x y", b"-", b"\x00"])
def test_a_value_line_followed_by_a_longer_boundary_stays_one_value(tail):
    """"--b7" is no delimiter of boundary "b": the line break before it is part of the value."""
    body = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n--b' + tail + b"\r\n--b--\r\n"
    assert parse(body, "b") == [tuple(part) for part in reference(body, "b")] == [("field", "a", b"x\r\n--b" + tail)]


def test_the_fields_of_a_chunk_request_are_read_in_one_match_each():
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
    fields = {"dzuuid": "0b9c8e5a-0d44-4c1e-9d2b-5f1f3d8e2a10", "dzchunkindex": "3", "dztotalfilesize": "100000000",
              "dzchunksize": "8388608", "dztotalchunkcount": "12", "dzchunkbyteoffset": "25165824"}
    body = b"".join(b'--%s\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n'
                    % (boundary.encode(), name.encode(), value.encode()) for name, value in fields.items())
    body += (b'--%s\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\nDATA\r\n--%s--\r\n'
             % (boundary.encode(), boundary.encode()))
    reader = pyfiledrop._MultipartReader(pyfiledrop._BodyReader({"wsgi.input": io.BytesIO(body)}, len(body)),
                                         boundary.encode())
    reader.skip_preamble()
    assert reader.plain_fields() == list(fields.items())
    assert reader.next_part() == ("file", "a.bin")
    assert b"".join(bytes(piece) for piece in reader.part_data()) == b"DATA"
    assert reader.next_part() is None
    reader.close()
