"""HTTPS: --tls (a certificate made once, kept, reused), --cert/--key, and the server's TLS handshake under
stalled, bogus and plain-HTTP clients.  Real servers on ephemeral ports, real TLS clients (the standard
library's ssl, verifying against the certificate the server made), certificates parsed with cryptography.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    Output,
    chunk_fields,
    cli_server,
    encode_multipart,
    free_port,
    sha256,
)

import pyfiledrop
from test_connections import read_response
from test_console import assert_one_line_error

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

HANG = 10.0  # seconds: anything slower than this is a hang, not a slow machine


# -- helpers ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tls_server(tmp_path: Path, *, limits: pyfiledrop.ServerLimits | None = None, app=None, **options):
    """pyfiledrop over HTTPS in this process on port 0 (or ``app`` instead of pyfiledrop's): (port, identity)."""
    storage, chunks = tmp_path / "storage", tmp_path / "chunks"
    storage.mkdir(exist_ok=True)
    chunks.mkdir(exist_ok=True)
    config = pyfiledrop.Config(host="127.0.0.1", port=0, storage=storage, chunks=chunks, quiet=True, tls=True,
                               min_free=0, **options)
    identity = pyfiledrop.open_tls(config)
    engine = pyfiledrop.open_engine(config)
    server = pyfiledrop.make_server(app or pyfiledrop.create_app(config, engine), "127.0.0.1", 0,
                                    limits=limits or pyfiledrop.ServerLimits(), ssl_context=identity.context)
    stop = threading.Event()
    thread = threading.Thread(target=pyfiledrop.serve, args=(config, engine, server),
                              kwargs={"stop": stop, "tls": identity}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], identity
    finally:
        stop.set()
        thread.join(HANG)
        assert not thread.is_alive(), "serve() did not return after stop was set"
        engine.ledger.close()


def client_context(identity: pyfiledrop.TLSIdentity) -> ssl.SSLContext:
    """A client that trusts exactly the server's certificate and checks the address against its names."""
    context = ssl.create_default_context(cafile=str(identity.certificate))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    return context


def https(port: int, identity, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=HANG, context=client_context(identity))
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def tls_socket(port: int, identity) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=HANG)
    return client_context(identity).wrap_socket(raw, server_hostname="127.0.0.1")


def client_hello() -> bytes:
    """The first flight of a real TLS client, made in memory."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    handshake = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        handshake.do_handshake()
    return outgoing.read()


def closed_within(sock: socket.socket, bound: float) -> bytes:
    """What the server sends until it closes ``sock``; fails if it is still open after ``bound`` seconds."""
    sock.settimeout(bound)
    data = b""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        try:
            block = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            break
        if not block:
            return data
        data += block
    raise AssertionError("the server kept the connection open")


def served_fingerprint(port: int) -> str:
    """The SHA-256 of the certificate the server sends, as the banner writes it."""
    der = ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port), timeout=HANG))
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def folders(tmp_path: Path) -> list[str]:
    return ["-s", str(tmp_path / "storage"), "-c", str(tmp_path / "chunks")]


def banner_of(process: subprocess.Popen) -> tuple[Output, str]:
    output = Output(process)
    output.wait_for(lambda text: "Press Ctrl+C to stop." in text)
    return output, output.text


def stop(process: subprocess.Popen, output: Output) -> str:
    process.send_signal(signal.SIGINT)
    text = output.close()
    assert process.returncode == 0, text
    return text


def run_cli(args: list[str], cwd: Path, prelude: str = "pass") -> subprocess.CompletedProcess:
    """The program with ``args``; ``prelude`` runs first (to hide a module, as a system without it)."""
    program = (f"import runpy, sys; {prelude}; sys.argv = ['pyfiledrop'] + sys.argv[1:]; "
               f"runpy.run_path({str(ROOT / 'pyfiledrop.py')!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", program, *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=cwd)


def scheme_app(environ, start_response):
    body = f"{environ['wsgi.url_scheme']} {environ.get('HTTPS', '')} {len(environ.get('HTTP_X_BIG', ''))}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


# -- the handshake: slow, stalled and hostile clients ----------------------------------------------------------

def test_stalled_handshakes_hold_no_worker_and_do_not_block_others(tmp_path):
    """Two workers, twenty clients stalled mid-handshake (nothing sent, or half a ClientHello) under a head
    deadline longer than this test waits: a real client still gets its answers at once."""
    hello = client_hello()
    limits = pyfiledrop.ServerLimits(max_workers=2, head_timeout=120.0)
    with tls_server(tmp_path, limits=limits, app=scheme_app) as (port, identity):
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=HANG) for _ in range(20)]
        for sock in stalled[10:]:
            sock.sendall(hello[:len(hello) // 2])
        started = time.monotonic()
        for _ in range(3):
            status, _, body = https(port, identity, "GET", "/")
            assert (status, body) == (200, b"https on 0")
        assert time.monotonic() - started < HANG
        for sock in stalled:
            sock.close()


def test_stalled_handshakes_are_closed_after_the_head_deadline(tmp_path):
    hello = client_hello()
    with tls_server(tmp_path, limits=pyfiledrop.ServerLimits(head_timeout=1.0), app=scheme_app) as (port, identity):
        stalled = [socket.create_connection(("127.0.0.1", port), timeout=HANG) for _ in range(4)]
        for sock in stalled[2:]:
            sock.sendall(hello[:len(hello) // 2])
        for sock in stalled:
            assert closed_within(sock, HANG) == b""  # no plaintext sent into a handshake
            sock.close()
        assert https(port, identity, "GET", "/")[0] == 200


def test_a_client_that_finishes_its_hello_late_still_gets_its_answer(tmp_path):
    """Half the ClientHello, a pause, the rest: the handshake resumes where the bytes stopped."""
    with tls_server(tmp_path, app=scheme_app) as (port, identity):
        raw = socket.create_connection(("127.0.0.1", port), timeout=HANG)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        handshake = client_context(identity).wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with pytest.raises(ssl.SSLWantReadError):
            handshake.do_handshake()
        hello = outgoing.read()
        raw.sendall(hello[:20])
        assert https(port, identity, "GET", "/")[0] == 200  # the server went on meanwhile
        raw.sendall(hello[20:])
        while True:
            incoming.write(raw.recv(65536))
            try:
                handshake.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
        raw.sendall(outgoing.read())
        handshake.write(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        raw.sendall(outgoing.read())
        reply = b""
        while b"https on" not in reply:
            block = raw.recv(65536)
            assert block, reply
            incoming.write(block)
            with contextlib.suppress(ssl.SSLWantReadError):
                reply += handshake.read(65536)
        assert reply.startswith(b"HTTP/1.1 200 ")
        raw.close()


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x00\x10" + b"\xff" * 16,          # a handshake record with nonsense in it
    b"\x16\x03\x01\xff\xff" + os.urandom(3000),       # a huge announced record, random bytes
    b"\x16" + b"\x00" * 100,
    b"\x80\x2e\x01\x00\x02\x00\x15\x00",              # an SSL 2.0 hello
])
def test_bogus_tls_bytes_close_that_connection_and_the_server_keeps_serving(tmp_path, garbage):
    with tls_server(tmp_path, app=scheme_app) as (port, identity):
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as sock:
            sock.sendall(garbage)
            answer = closed_within(sock, HANG)
            assert b"HTTP/" not in answer  # at most a TLS alert
        assert https(port, identity, "GET", "/")[0] == 200


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_client_offering_only_tls_1_0_is_refused(tmp_path):
    with tls_server(tmp_path, app=scheme_app) as (port, identity):
        context = client_context(identity)
        with contextlib.suppress(ValueError, ssl.SSLError):  # this OpenSSL may not even offer TLS 1.0 any more
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1
        raw = socket.create_connection(("127.0.0.1", port), timeout=HANG)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(raw, server_hostname="127.0.0.1")
        raw.close()
        assert https(port, identity, "GET", "/")[0] == 200


def test_plain_http_on_the_https_port_is_sent_to_https(tmp_path):
    with tls_server(tmp_path, app=scheme_app) as (port, identity):
        status, headers, body = http_plain(port, "GET", "/some/page?x=1", {"Host": f"192.168.1.5:{port}"})
        assert status == 307
        assert headers["Location"] == f"https://192.168.1.5:{port}/some/page?x=1"
        assert headers["Cache-Control"] == "no-store"  # no browser keeps it for a later plain server
        assert b"HTTPS" in body
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as sock:
            sock.sendall(b"hello\r\n\r\n")
            answer = closed_within(sock, HANG)
        assert answer.startswith(b"HTTP/1.1 400 ") and b"https://" in answer
        with socket.create_connection(("127.0.0.1", port), timeout=HANG) as sock:  # a Host that is no host
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\"<x>\r\n\r\n")
            assert closed_within(sock, HANG).startswith(b"HTTP/1.1 400 ")
        assert https(port, identity, "GET", "/")[0] == 200


def http_plain(port: int, method: str, path: str, headers: dict):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HANG)
    try:
        connection.putrequest(method, path, skip_host=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_decrypted_bytes_buffered_by_tls_are_not_left_waiting(tmp_path):
    """A request head larger than one read arrives in one TLS record: what TLS has already decrypted is read
    at once (no selector wakes for it); pipelined requests after a body are answered too."""
    with tls_server(tmp_path, app=scheme_app, limits=pyfiledrop.ServerLimits(head_timeout=60.0)) as (port, identity):
        with tls_socket(port, identity) as sock:
            big = "b" * 12000
            sock.sendall(f"GET / HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n".encode())  # one write: one record
            status, _, body = read_response(sock)
            assert (status, body) == (200, b"https on 12000")
            two = (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                   b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"c" * 9000 + b"\r\n\r\n")
            sock.sendall(two)
            assert read_response(sock)[2] == b"https on 0"
            assert read_response(sock)[2] == b"https on 9000"


def test_a_request_left_decrypted_behind_a_body_is_answered_after_the_hand_back(tmp_path):
    """The body's last bytes and the next request share one TLS record: the worker reads only the body, TLS
    keeps the rest decrypted, and the connection goes back to the selector (no lingering), which must look."""
    limits = pyfiledrop.ServerLimits(linger=0.0, head_timeout=60.0, idle_timeout=60.0)
    with tls_server(tmp_path, app=scheme_app, limits=limits) as (port, identity):
        with tls_socket(port, identity) as sock:
            for _ in range(3):
                sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n")
                sock.sendall(b"hello" + b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: 12\r\n\r\n")
                assert read_response(sock)[2] == b"https on 0"
                assert read_response(sock)[2] == b"https on 2"


def test_requests_over_https_know_they_are_https(tmp_path):
    with tls_server(tmp_path, app=scheme_app) as (port, identity):
        assert https(port, identity, "GET", "/")[2] == b"https on 0"


# -- uploads and downloads over HTTPS ---------------------------------------------------------------------------

def test_a_chunked_upload_a_put_and_a_ranged_download_over_https(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    chunk_size = 1024 * 1024
    with tls_server(tmp_path, allow_downloads=True) as (port, identity):
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=HANG, context=client_context(identity))
        upload_id = str(uuid.uuid4())
        for index in range(pyfiledrop.chunk_count(len(data), chunk_size)):  # one keep-alive connection
            fields = chunk_fields(upload_id, index, len(data), chunk_size)
            body, content_type = encode_multipart(fields, [("file", "über.bin", data[index * chunk_size:
                                                                                     (index + 1) * chunk_size])])
            connection.request("POST", "/upload", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            reply = json.loads(response.read())
            assert response.status == 200, reply
        connection.close()
        assert reply["complete"] and reply["sha256"] == sha256(data)
        assert (tmp_path / "storage" / "über.bin").read_bytes() == data
        status, _, answer = https(port, identity, "PUT", "/upload/put.bin", data)
        assert status == 200 and json.loads(answer)["sha256"] == sha256(data)
        status, headers, whole = https(port, identity, "GET", f"/download/{upload_id}")
        assert status == 200 and whole == data
        status, _headers, part = https(port, identity, "GET", f"/download/{upload_id}",
                                      headers={"Range": "bytes=1000000-2100000"})
        assert status == 206 and part == data[1000000:2100001]


# -- the certificate --------------------------------------------------------------------------------------------

def load(path: Path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_the_made_certificate_names_every_address_and_meets_apples_rules(tmp_path):
    config = pyfiledrop.Config(chunks=tmp_path, tls=True)
    identity = pyfiledrop.open_tls(config)
    cert = load(identity.certificate)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = names.get_values_for_type(x509.DNSName)
    ips = {str(address) for address in names.get_values_for_type(x509.IPAddress)}
    assert "localhost" in dns and socket.gethostname().lower() in dns
    assert {"127.0.0.1", "::1", *pyfiledrop.lan_addresses()} <= ips
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=365) < lifetime < datetime.timedelta(days=825)
    now = datetime.datetime.now(datetime.timezone.utc)
    assert cert.not_valid_before_utc < now - datetime.timedelta(hours=12)  # a phone's clock may lag
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    cert.verify_directly_issued_by(cert)  # self-signed
    assert identity.fingerprint == ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    key_file = tmp_path / pyfiledrop.TLS_KEY_NAME
    if os.name != "nt":
        assert key_file.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()


def test_a_specific_host_is_named_too(tmp_path, monkeypatch):
    dns, addresses = pyfiledrop.certificate_names("10.11.12.13")
    assert "10.11.12.13" in addresses and "localhost" in dns
    dns, addresses = pyfiledrop.certificate_names("drop.example.lan")  # --host by name
    assert "drop.example.lan" in dns and "drop.example.lan" not in addresses
    monkeypatch.setattr(socket, "gethostname", lambda: "Büro PC")  # a name no certificate can hold as it is
    dns, _ = pyfiledrop.certificate_names("::")
    assert all(name.isascii() and " " not in name for name in dns) and "localhost" in dns
    monkeypatch.setattr(socket, "gethostname", lambda: "Büro")
    dns, addresses = pyfiledrop.certificate_names("::")
    assert "xn--bro-hoa" in dns and "xn--bro-hoa.local" in dns
    cert, _, _ = pyfiledrop.generated_certificate(tmp_path, dns, addresses, time.time())
    assert "xn--bro-hoa" in load(cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


def test_the_certificate_is_kept_renewed_before_its_end_and_when_an_address_is_new(tmp_path):
    dns, addresses = ["localhost"], ["127.0.0.1"]
    long_ago = time.time() - 790 * 86400
    cert_path, _key_path, origin = pyfiledrop.generated_certificate(tmp_path, dns, addresses, long_ago)
    assert origin == "new"
    first = load(cert_path)
    _, _, origin = pyfiledrop.generated_certificate(tmp_path, dns, addresses, long_ago + 86400)
    assert origin == "kept" and load(cert_path).serial_number == first.serial_number
    _, _, origin = pyfiledrop.generated_certificate(tmp_path, dns, addresses, time.time())  # ends in < 30 days
    renewed = load(cert_path)
    assert origin == "renewed" and renewed.serial_number != first.serial_number
    assert renewed.public_key().public_numbers() == first.public_key().public_numbers()  # same key
    assert renewed.not_valid_after_utc > first.not_valid_after_utc
    _, _, origin = pyfiledrop.generated_certificate(tmp_path, dns, ["127.0.0.1", "10.9.8.7"], time.time())
    assert origin == "renewed"
    ips = {str(ip) for ip in load(cert_path).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)}
    assert ips == {"127.0.0.1", "10.9.8.7"}
    _, _, origin = pyfiledrop.generated_certificate(tmp_path, dns, ["127.0.0.1"], time.time())
    assert origin == "kept", "an address seen before stays covered: no new certificate when it goes away"
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_an_unreadable_certificate_or_key_is_made_again(tmp_path):
    cert_path, key_path, _ = pyfiledrop.generated_certificate(tmp_path, ["localhost"], ["127.0.0.1"], time.time())
    cert_path.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n")
    _, _, origin = pyfiledrop.generated_certificate(tmp_path, ["localhost"], ["127.0.0.1"], time.time())
    assert origin == "new" and load(cert_path)
    key_path.write_bytes(b"")
    pyfiledrop.generated_certificate(tmp_path, ["localhost"], ["127.0.0.1"], time.time())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key().public_numbers() == load(cert_path).public_key().public_numbers()


def test_tls_certificate_reused_across_restarts_and_its_fingerprint_in_the_banner(tmp_path):
    fingerprints = []
    for start in range(2):
        with cli_server(["--tls", "--no-qr", *folders(tmp_path)]) as (process, port):
            output, text = banner_of(process)
            served = served_fingerprint(port)
            fingerprints.append(served)
            assert served[:47] in text and served[48:] in text, text
            assert f"  https://127.0.0.1:{port}/" in text.splitlines()
            assert ("made now" if start == 0 else "made at an earlier start") in text
            stop(process, output)
        if start == 0:
            made = (tmp_path / "chunks" / pyfiledrop.TLS_CERT_NAME).stat().st_mtime_ns
    assert fingerprints[0] == fingerprints[1]
    assert (tmp_path / "chunks" / pyfiledrop.TLS_CERT_NAME).stat().st_mtime_ns == made


def test_the_qr_code_opens_the_https_address(tmp_path):
    with cli_server(["--tls", "--host", "0.0.0.0", *folders(tmp_path)]) as (process, port):
        output, text = banner_of(process)
        stop(process, output)
    url = pyfiledrop.page_urls("0.0.0.0", port, scheme="https")[0]
    assert url.startswith("https://") and f"open {url}" in text


# -- --cert and --key -------------------------------------------------------------------------------------------

def own_certificate(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(exist_ok=True)
    cert, key, _ = pyfiledrop.generated_certificate(folder, ["localhost"], ["127.0.0.1"], time.time())
    return cert, key


def test_own_certificate_and_key_are_served(tmp_path):
    cert, key = own_certificate(tmp_path / "mine")
    with cli_server(["--cert", str(cert), "--key", str(key), "--no-qr", *folders(tmp_path)]) as (process, port):
        output, text = banner_of(process)
        served = served_fingerprint(port)
        assert served == pyfiledrop.certificate_fingerprint(cert)
        assert served[:47] in text and f"the certificate {cert}" in text
        stop(process, output)
    assert not (tmp_path / "chunks" / pyfiledrop.TLS_CERT_NAME).exists()


def test_cert_and_key_problems_are_one_line(tmp_path):
    cert, key = own_certificate(tmp_path / "mine")
    _other_cert, other_key = own_certificate(tmp_path / "other")
    port = str(free_port())
    base = ["--host", "127.0.0.1", "-p", port, *folders(tmp_path)]
    assert_one_line_error(run_cli([*base, "--cert", str(cert)], tmp_path), "--cert and --key go together")
    assert_one_line_error(run_cli([*base, "--key", str(key)], tmp_path), "--cert and --key go together")
    assert_one_line_error(run_cli([*base, "--cert", str(tmp_path / "no.pem"), "--key", str(key)], tmp_path),
                          "--cert: no such file")
    assert_one_line_error(run_cli([*base, "--cert", str(cert), "--key", str(other_key)], tmp_path),
                          "cannot be used together")
    assert_one_line_error(run_cli([*base, "--cert", str(key), "--key", str(key)], tmp_path))
    locked = tmp_path / "locked.pem"
    private = serialization.load_pem_private_key(key.read_bytes(), None)
    locked.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.BestAvailableEncryption(b"secret")))
    assert_one_line_error(run_cli([*base, "--cert", str(cert), "--key", str(locked)], tmp_path), "passphrase")


def test_without_cryptography_tls_is_one_clear_line_and_cert_still_works(tmp_path):
    hide = "sys.modules['cryptography'] = None"
    base = ["--host", "127.0.0.1", "-p", str(free_port()), *folders(tmp_path)]
    result = run_cli([*base, "--tls"], tmp_path, hide)
    assert_one_line_error(result, "--tls needs the cryptography package", "pip install cryptography")
    assert not (tmp_path / "chunks" / pyfiledrop.TLS_CERT_NAME).exists()
    cert, key = own_certificate(tmp_path / "mine")
    program = (f"import runpy, sys; {hide}; sys.argv = ['pyfiledrop'] + sys.argv[1:]; "
               f"runpy.run_path({str(ROOT / 'pyfiledrop.py')!r}, run_name='__main__')")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", program, "--host", "127.0.0.1", "-p", str(port), "--no-qr",
                                "--cert", str(cert), "--key", str(key), *folders(tmp_path)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    output, _text = banner_of(process)
    try:
        assert served_fingerprint(port) == pyfiledrop.certificate_fingerprint(cert)
    finally:
        stop(process, output)


def test_a_kill_while_the_certificate_is_written_leaves_no_half_file(tmp_path):
    """Files are written whole or not at all: a leftover temporary (from a kill mid-write) is ignored and
    removed at the next start with the chunks folder's other leftovers."""
    chunks = tmp_path / "chunks"
    chunks.mkdir()
    (chunks / f"{pyfiledrop.TLS_CERT_NAME}.{uuid.uuid4().hex}.tmp").write_text("-----BEGIN CERT")
    with cli_server(["--tls", "--no-qr", *folders(tmp_path)]) as (process, port):
        output, _text = banner_of(process)
        assert served_fingerprint(port) == pyfiledrop.certificate_fingerprint(chunks / pyfiledrop.TLS_CERT_NAME)
        stop(process, output)
    assert sorted(name for name in os.listdir(chunks) if not name.startswith("ledger")) == [
        pyfiledrop.TLS_CERT_NAME, pyfiledrop.TLS_KEY_NAME]


# -- the page in a real browser, over HTTPS ---------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed")
def test_chromium_loads_the_page_over_https_as_a_secure_context_and_uploads(tmp_path):
    """Chromium (told to accept the self-signed certificate, as a person does after comparing it) gets the
    page over TLS, in a secure context, with its scripts allowed, and uploads from it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    data = os.urandom(300_000)
    with tls_server(tmp_path) as (port, identity), sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.goto(f"https://127.0.0.1:{port}/")
            assert page.evaluate("window.isSecureContext && location.protocol") == "https:"
            page.wait_for_function("document.readyState === 'complete'", timeout=60_000)
            reply = page.evaluate("""async (bytes) => {
                const response = await fetch("/upload/from%20chromium.bin",
                                             {method: "PUT", body: new Uint8Array(bytes)});
                return [response.status, await response.json()];
            }""", list(data))
            assert reply[0] == 200 and reply[1]["sha256"] == sha256(data)
            assert (tmp_path / "storage" / "from chromium.bin").read_bytes() == data
            assert errors == [], errors
        finally:
            browser.close()
