#!/usr/bin/env python3
"""pyfiledrop: a file-drop server in one script.

Run ``python pyfiledrop.py``, open the printed address on any device on the LAN, drop files on the page,
and they land in the storage folder of this machine: in chunks, resumable, checked, never overwriting.

Sections, in order (each under a banner), read top to bottom:
    constants; Config (parse_args); pure helpers; errors as values (each with its HTTP status); the ledger
    (SQLite: the one record of every upload); the backend (where bytes live, its constraints as data); the
    engine (create, put bytes at an offset, info, finish, expire, list; it never sees HTTP); recovery (ledger
    and disk agree after any stop); protocol adapters (chunk protocol, multipart, PUT); Bottle plugins (error
    mapping); the application; the console (fed by engine events); the HTTP server; serve(); main();
    generated assets and the page.

A chunk's bytes go: socket -> multipart scanner -> one pwrite at their offset -> ledger commit -> final name.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import enum
import errno
import functools
import getpass
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import mmap
import math
import os
import queue
import re
import select
import selectors
import shutil
import socket
import sqlite3
import ssl
import stat
import sys
import threading
import time
import unicodedata
import uuid
import zlib
from email.utils import formatdate
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

import bottle
from werkzeug.http import parse_options_header

__version__ = "1.4.0"
__all__ = [
    "Config", "parse_args", "main", "serve", "create_app", "open_engine", "make_server", "ServerLimits", "Engine",
    "EngineLimits", "Ledger", "LocalBackend", "BackendConstraints", "UploadInfo", "State", "Progress", "Stored",
    "Refused", "Notice", "NoteReceived", "Note", "TextBoard", "UploadError", "S3Engine", "S3Location", "parse_s3_url",
    "ServiceUnavailable", "BadRequest", "Forbidden", "NotFound", "Conflict", "Superseded",
    "ChecksumMismatch", "TooLarge", "InsufficientStorage", "StorageFailure", "ClientDisconnected", "Console",
    "sanitize_filename", "sanitize_relative_path", "split_folder", "numbered_name", "chunk_count", "chunk_length",
    "add_range", "range_holes", "prefix_end", "multipart_parts", "FormField", "FilePart",
]

###############################################################################
# Constants ###################################################################
###############################################################################

DEFAULT_HOST = "0.0.0.0"
DEFAULT_PORT = 16273
# 8 MiB: at loopback speed each request costs about a millisecond of Python, so 8 MiB chunks reach nginx's speed
# where 4 MiB reach 60-80% of it (bench/README.md); a chunk lost on a flaky phone link costs a few seconds of
# Wi-Fi to resend, and a slow link is no problem because the page's timeout counts time without progress.
DEFAULT_CHUNK_SIZE = 8 * 1024 * 1024
# Browsers open at most 6 connections to one host over HTTP/1.1: the page keeps that many part requests in
# flight in all (a file alone gets all six; on a lossy link one TCP connection is limited by loss, not the link).
DEFAULT_PARALLEL_CHUNKS = 6
# A chunk request that sends and receives nothing for this long is abandoned and retried (not a limit on the
# whole request: the page re-arms it on every byte of progress).
DEFAULT_TIMEOUT_MS = 120_000
DEFAULT_MAX_SIZE_MB = 100 * 1024    # 100 GiB
DEFAULT_PARTIAL_TTL_HOURS = 24.0

MIB = 1024 * 1024
MAX_CHUNK_SIZE = 1024 * MIB
MAX_CHUNK_COUNT = 1 << 20          # bounds the part grid of one upload (status replies, missing-part lists)
MAX_ID_LENGTH = 64
MAX_NAME_BYTES = 200               # leaves room for " (12345)" under every filesystem's 255 limit
MAX_FIELD_BYTES = 1024
MAX_FORM_PARTS = 64
MAX_NAME_ATTEMPTS = 10_000
MAX_FOLDER_DEPTH = 32              # folders an upload may name above its file
MAX_PATH_BYTES = 1024              # a stored name with its folders (Windows and macOS allow about this much)
READ_BLOCK = 1 * MIB
MAX_NOTE_BYTES = 64 * 1024         # a note, or the shared text, in UTF-8: a long message, not a file

DZ_FIELDS = ("dzuuid", "dzchunkindex", "dztotalfilesize", "dzchunksize", "dztotalchunkcount",
             "dzchunkbyteoffset")

log = logging.getLogger("pyfiledrop")


###############################################################################
# Config ######################################################################
###############################################################################


def _program_dir() -> Path:
    """Where default folders and an index.html override live.

    Beside the executable when frozen (not PyInstaller's temporary unpack folder), beside the script when run
    from a checkout, and the current folder when installed as a package (site-packages is no place for data).
    """
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent
    here = Path(__file__).resolve().parent
    if {"site-packages", "dist-packages"} & set(here.parts):
        return Path.cwd()
    return here


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    storage: Path = Path("storage")
    chunks: Path = Path("chunk")
    max_size_mb: int = DEFAULT_MAX_SIZE_MB
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    chunk_size: int = DEFAULT_CHUNK_SIZE
    parallel_chunks: int = DEFAULT_PARALLEL_CHUNKS
    force_chunking: bool = True
    allow_downloads: bool = False
    tls: bool = False                  # HTTPS with a certificate made and kept in the chunks folder
    cert: Path | None = None           # HTTPS with this certificate (PEM, chain allowed) and key instead
    key: Path | None = None
    share: Path | None = None          # a folder whose files the page lists for download
    share_prefix: str | None = None    # --share with --s3: a key prefix of the bucket ("" or ending in "/")
    dz_cdn: str | None = None
    dz_version: str | None = None
    index: Path | None = None
    partial_ttl_hours: float = DEFAULT_PARTIAL_TTL_HOURS
    min_free: int | None = None        # bytes; None: default_min_free() of the disk
    quiet: bool = False
    verbose: bool = False
    qr: bool = True
    open_browser: bool = False
    s3: S3Location | None = None       # --s3: every byte and record in this object store, nothing on this node
    password: PasswordHash | None = None        # --password: uploading and the page (the admin one also works)
    admin_password: PasswordHash | None = None  # --admin-password: also /files and the /api/uploads list
    expire_after_s: float | None = None         # --expire-after: stored files are removed this long after
    share_text: str | None = None               # --share-text: shown on the page ("" clears what was kept)

    @property
    def max_size_bytes(self) -> int:
        # MiB, as Dropzone's maxFilesize, so the page and the server agree on the limit to the byte.
        return self.max_size_mb * MIB

    @property
    def partial_ttl_seconds(self) -> float:
        return self.partial_ttl_hours * 3600.0


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, not a usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    if not re.fullmatch(r"\s*\+?[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(text: str) -> int:
    """"0", "4096", "500M", "2G", "1.5GiB": a size in bytes (units are powers of 1024)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 0, 500M or 2G, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _time_span(text: str) -> float:
    """"90s", "30m", "12h", "7d", "1.5d": seconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd])\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a time such as 90s, 30m, 12h or 7d, got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]


def _read_password(parser: argparse.ArgumentParser, asked: bool, env: str, flag: str) -> PasswordHash | None:
    """The password for ``flag`` from ``env``, else asked on the terminal (never from the command line, where
    ``ps`` shows it); None when neither the flag nor the variable is given."""
    password = os.environ.get(env, "")
    if not password and not asked:
        return None
    if not password:
        if not sys.stdin or not sys.stdin.isatty():
            parser.error(f"{flag}: no terminal to ask for it on; set {env} instead")
        password = getpass.getpass(f"{flag[2:].replace('-', ' ').capitalize()}: ")
        if password != getpass.getpass("The same again: "):
            parser.error(f"{flag}: the two entries differ")
    if not password.strip():
        parser.error(f"{flag}: the password is empty")
    return PasswordHash.of(password)


MIN_TIMEOUT_MS = 1000              # below it even a loopback reply may count as no progress
USEFUL_TIMEOUT_MS = 10_000         # a phone on a weak link goes seconds without progress; below this, a warning
USEFUL_CHUNK_SIZE = 256 * 1024     # each request costs ~1 ms of Python and a round trip; below this, a warning


def _size_in_mib(text: str) -> int:
    """--max-size: a plain number is MiB, as always; "500M", "2G" are sizes (whole MiB)."""
    if re.fullmatch(r"\s*\+?[0-9]+\s*", text):
        return _positive_int(text)
    size = _byte_size(text)
    if size < MIB or size % MIB:
        raise argparse.ArgumentTypeError(f"expected whole MiB such as 500M or 2G, got {text!r}")
    return size // MIB


def _chunk_bytes(text: str) -> int:
    """--chunk-size: a plain number is bytes, as always; "512K", "8M" are sizes."""
    size = _positive_int(text) if re.fullmatch(r"\s*\+?[0-9]+\s*", text) else _byte_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size of at least 1 byte, got {text!r}")
    return size


def _check_limits(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse values that cannot work, with the usable range."""
    if args.timeout < MIN_TIMEOUT_MS:
        parser.error(f"--timeout is in milliseconds and at least {MIN_TIMEOUT_MS} (usable: {USEFUL_TIMEOUT_MS} "
                     f"and more; default {DEFAULT_TIMEOUT_MS}); got {args.timeout}")
    largest = args.chunk_size * MAX_CHUNK_COUNT
    if largest < args.max_size * MIB:
        parser.error(f"--chunk-size {binary_size(args.chunk_size)} allows files of at most {binary_size(largest)} "
                     f"({MAX_CHUNK_COUNT} chunks), under --max-size {binary_size(args.max_size * MIB)}: use at least "
                     f"{binary_size(-(-args.max_size * MIB // MAX_CHUNK_COUNT))} (usable: "
                     f"{binary_size(USEFUL_CHUNK_SIZE)} to {binary_size(MAX_CHUNK_SIZE)})")


def option_warnings(config: Config) -> list[str]:
    """Values that work, but not well: said after the banner."""
    warnings = []
    if config.timeout_ms < USEFUL_TIMEOUT_MS:
        warnings.append(f"--timeout {config.timeout_ms} ms: the page will give up on chunks that are only slow "
                        f"(usable: {USEFUL_TIMEOUT_MS} ms and more)")
    if config.chunk_size < USEFUL_CHUNK_SIZE:
        warnings.append(f"--chunk-size {binary_size(config.chunk_size)}: uploads will be slow, every chunk costs a "
                        f"request (usable: {binary_size(USEFUL_CHUNK_SIZE)} to {binary_size(MAX_CHUNK_SIZE)})")
    if config.share_prefix and os.path.isdir("/" + config.share_prefix):  # --share /home/me/Public, as without --s3
        warnings.append(f"--share with --s3 shares the key prefix {config.share_prefix} of the bucket, not the "
                        f"folder /{config.share_prefix.rstrip('/')} of this machine")
    return warnings


def build_parser() -> argparse.ArgumentParser:
    here = _program_dir()
    parser = _ArgumentParser(
        prog="pyfiledrop",
        description="Serve a drop page on the LAN; files dropped on it are saved to the storage folder.",
        epilog="To send files to a server from a terminal: pyfiledrop send FILE_OR_FOLDER... --to URL "
               "(see pyfiledrop send --help).",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"pyfiledrop {__version__}")
    add("-p", "--port", type=_port, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    add("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: every interface)")
    add("-s", "--storage", type=Path, default=here / "storage", help="folder for uploaded files")
    add("-c", "--chunks", type=Path, default=here / "chunk", help="folder for partial uploads")
    add("--max-size", type=_size_in_mib, default=DEFAULT_MAX_SIZE_MB, metavar="SIZE",
        help=f"largest file accepted: MiB as a plain number, or 500M, 2G (default {DEFAULT_MAX_SIZE_MB // 1024}G)")
    add("--timeout", type=_positive_int, default=DEFAULT_TIMEOUT_MS, metavar="MS",
        help=f"the page gives up on a chunk request after this long without progress, and retries it "
             f"(ms, at least {MIN_TIMEOUT_MS}; default {DEFAULT_TIMEOUT_MS})")
    add("--chunk-size", type=_chunk_bytes, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
        help=f"chunk size the page uploads with: bytes as a plain number, or 512K, 8M "
             f"(default {DEFAULT_CHUNK_SIZE // MIB}M)")
    add("--parallel-chunks", type=_positive_int, default=DEFAULT_PARALLEL_CHUNKS, metavar="N",
        help=f"part requests the page keeps in flight, over all its files (default {DEFAULT_PARALLEL_CHUNKS})")
    add("--disable-parallel-chunks", action="store_true", help="send one chunk at a time (--parallel-chunks 1)")
    add("--disable-force-chunking", action="store_true",
        help="send files smaller than one chunk as a plain upload")
    add("-a", "--allow-downloads", action="store_true", help="let the page download uploaded files back")
    add("--tls", action="store_true",
        help="serve HTTPS with a self-signed certificate made on first use and kept in the chunks folder "
             "(needs the cryptography package)")
    add("--cert", type=Path, metavar="FILE", help="serve HTTPS with this certificate (PEM) and --key")
    add("--key", type=Path, metavar="FILE", help="the private key (PEM, no passphrase) of --cert")
    add("--share", metavar="DIR", help="list the files of DIR (and its subfolders) on the page for download; with "
                                       "--s3, DIR is a key prefix of the bucket (public/, drop/outgoing) whose "
                                       "objects are listed and streamed from the store")
    add("--dz-cdn", metavar="URL", help="retired in 1.1 (the page has its own uploader): ignored, with a warning")
    add("--dz-version", metavar="V", help="retired in 1.1, as --dz-cdn")
    add("--index", type=Path, metavar="FILE",
        help="serve this page instead of the built-in one (default: index.html beside the program, if any)")
    add("--partial-ttl", type=_positive_float, default=DEFAULT_PARTIAL_TTL_HOURS, metavar="HOURS",
        help=f"remove unfinished uploads untouched for this long (default {DEFAULT_PARTIAL_TTL_HOURS:g})")
    add("--min-free", type=_byte_size, metavar="SIZE",
        help="free space every folder keeps; uploads that would use it are refused (507) "
             "(default: 2%% of the disk, at most 1G)")
    add("-q", "--quiet", action="store_true", help="print only warnings and errors")
    add("-v", "--verbose", action="store_true", help="also log every HTTP request")
    add("--no-qr", action="store_true", help="do not draw a QR code of the address")
    add("--open", action="store_true", help="open the page in the default browser")
    _add_store_and_access_options(add)
    return parser


def _add_store_and_access_options(add: Callable) -> None:
    """Where files go besides the folders, who may do what, and how long stored files and texts stay."""
    add("--s3", metavar="URL",
        help="store in an S3-compatible object store instead of folders: http(s)://HOST[:PORT]/BUCKET[/PREFIX] "
             "(credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile; needs boto3)")
    add("--s3-region", metavar="REGION", help="the store's region (default: AWS_REGION, else us-east-1)")
    add("--password", action="store_true",
        help=f"ask for a password (or read ${PASSWORD_ENV}) that the page and uploading need")
    add("--admin-password", action="store_true",
        help=f"ask for an admin password (or read ${ADMIN_PASSWORD_ENV}) for /files, the list of every upload")
    add("--share-text", metavar="TEXT",
        help="show TEXT on the page with a Copy button (kept for later starts; \"\" stops sharing it); "
             "the admin can change it on /files")
    add("--expire-after", type=_time_span, metavar="TIME",
        help="remove stored files this long after they were stored (units s, m, h, d: 7d); "
             "their records stay, as expired")


def parse_args(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chunk_size > MAX_CHUNK_SIZE:
        parser.error(f"--chunk-size is at most {MAX_CHUNK_SIZE} bytes")
    _check_limits(parser, args)
    _check_tls_and_share(parser, args)
    index = args.index
    if index is not None and not index.is_file():
        parser.error(f"--index: no such file: {index}")
    password = _read_password(parser, args.password, PASSWORD_ENV, "--password")
    admin_password = _read_password(parser, args.admin_password, ADMIN_PASSWORD_ENV, "--admin-password")
    if password and admin_password and admin_password.session_tag == password.session_tag:
        parser.error("--admin-password must differ from --password (else every uploader is an admin)")
    if index is None and (_program_dir() / "index.html").is_file():
        index = _program_dir() / "index.html"
    try:
        s3 = parse_s3_url(args.s3, args.s3_region) if args.s3 else None
    except ValueError as error:
        parser.error(f"--s3: {error}")
    if s3 is not None and args.expire_after is not None:
        parser.error("--expire-after does not work with --s3 yet (set an expiry rule on the bucket instead)")
    return Config(
        host=args.host,
        port=args.port,
        storage=args.storage.expanduser().resolve(),
        chunks=args.chunks.expanduser().resolve(),
        max_size_mb=args.max_size,
        timeout_ms=args.timeout,
        chunk_size=args.chunk_size,
        parallel_chunks=1 if args.disable_parallel_chunks else args.parallel_chunks,
        force_chunking=not args.disable_force_chunking,
        allow_downloads=args.allow_downloads,
        tls=args.tls or args.cert is not None,
        cert=args.cert.expanduser().resolve() if args.cert else None,
        key=args.key.expanduser().resolve() if args.key else None,
        share=Path(args.share).expanduser().resolve() if args.share is not None and s3 is None else None,
        share_prefix=_share_prefix(parser, args.share) if args.share is not None and s3 is not None else None,
        dz_cdn=args.dz_cdn,
        dz_version=args.dz_version,
        index=index,
        partial_ttl_hours=args.partial_ttl,
        min_free=args.min_free,
        quiet=args.quiet,
        verbose=args.verbose,
        qr=not args.no_qr,
        open_browser=args.open,
        s3=s3,
        password=password,
        admin_password=admin_password,
        expire_after_s=args.expire_after,
        share_text=_share_text(parser, args.share_text),
    )


def _share_prefix(parser: argparse.ArgumentParser, text: str) -> str:
    try:
        return parse_share_prefix(text)
    except ValueError as error:
        parser.error(f"--share: {error}")


def _share_text(parser: argparse.ArgumentParser, text: str | None) -> str | None:
    """--share-text as it is kept: refused when not UTF-8 (bytes the terminal gave as they were) or too long."""
    if text is None:
        return None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        parser.error("--share-text: the text is not valid UTF-8")
    if size > MAX_NOTE_BYTES:
        parser.error(f"--share-text: at most {MAX_NOTE_BYTES // 1024} KiB of text, got {size} bytes")
    return text if text.strip() else ""


def _check_tls_and_share(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together: the certificate and its private key")
    for option, path in (("--cert", args.cert), ("--key", args.key)):
        if path is not None and not path.expanduser().is_file():
            parser.error(f"{option}: no such file: {path}")
    if args.share is not None and args.s3 is None and not Path(args.share).expanduser().is_dir():
        parser.error(f"--share: no such folder: {args.share}")


###############################################################################
# Pure helpers ################################################################
###############################################################################

_ID_RE = re.compile(r"[A-Za-z0-9-]{1,%d}\Z" % MAX_ID_LENGTH)
_UINT_RE = re.compile(r"[0-9]{1,19}\Z")
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"/\\|?*]')
_WINDOWS_RESERVED = re.compile(r"(CON|PRN|AUX|NUL|COM[0-9¹²³]|LPT[0-9¹²³]|CONIN\$|CONOUT\$)\Z", re.IGNORECASE)
# Bidirectional overrides let "gpj.exe" display as "exe.jpg"; they never belong in a filename.
_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c")


def is_valid_id(text: str) -> bool:
    return bool(_ID_RE.match(text))


# A name of these characters is left as it is by sanitize_filename's rules (no control, bidi or separator
# character, nothing Windows forbids, no leading dot or space, no trailing dot or space, no double space), so
# it can skip them: most names are like this, and the rules cost more than the rest of a small file's request.
_PLAIN_NAME_RE = re.compile(r"[A-Za-z0-9_\-+=,;!#$%&'()@\[\]^`{}~](?:[A-Za-z0-9_\-+=,;!#$%&'()@\[\]^`{}~. ]*"
                            r"[A-Za-z0-9_\-+=,;!#$%&'()@\[\]^`{}~])?\Z")


def sanitize_filename(raw: str) -> str:
    """A name that is safe on every OS and still reads like the original (unicode kept)."""
    if (len(raw) <= MAX_NAME_BYTES and _PLAIN_NAME_RE.match(raw) and "  " not in raw
            and not _WINDOWS_RESERVED.match(raw.partition(".")[0].rstrip(" "))):
        return raw
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    cleaned = []
    for char in name:
        category = unicodedata.category(char)
        if category == "Cc" or category == "Cs" or char in _BIDI_CONTROLS:
            continue
        if category in ("Zl", "Zp") or (category == "Zs" and char != " "):
            char = " "
        cleaned.append(char)
    name = _WINDOWS_FORBIDDEN.sub("_", "".join(cleaned)).replace("\ufffd", "_")  # U+FFFD: bytes not UTF-8
    name = re.sub(r" {2,}", " ", name).strip(" ").rstrip(". ")  # Windows drops trailing dots and spaces
    if not name.strip("."):
        return "file"
    if name.startswith("."):  # nothing stored is hidden (and nothing can pass for pyfiledrop's own files)
        name = "_" + name[1:]
    if _WINDOWS_RESERVED.match(name.partition(".")[0].rstrip(" ")):
        name = "_" + name
    return _truncate_name(name, MAX_NAME_BYTES)


_SHOWN_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible_line(text: str, limit: int, ellipsis: str = "\u2026") -> str:
    """``text`` safe for a terminal, on one line: control and format characters (escape sequences, C1 controls,
    bidi overrides, line separators) written as escapes such as \\n, \\x1b, \\u202e; at most ``limit``
    characters of the text are shown, then ``ellipsis``."""
    shown = []
    for char in text[:limit]:
        category = unicodedata.category(char)
        if category in ("Cc", "Cf", "Cs", "Zl", "Zp") and char != "\u200d":   # ZWJ joins emoji, harmless
            shown.append(_SHOWN_ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else
                                                     f"\\u{ord(char):04x}" if ord(char) < 0x10000 else
                                                     f"\\U{ord(char):08x}"))
        else:
            shown.append(char)
    return "".join(shown) + (ellipsis if len(text) > limit else "")


def sanitize_relative_path(raw: str) -> str:
    """``sanitize_filename`` for each folder and the file of a relative path ("a/b/c.txt"); nothing climbs.

    "." and ".." and empty components are dropped, so no path leaves the folder it is stored under;
    BadRequest when it names more than MAX_FOLDER_DEPTH folders or MAX_PATH_BYTES bytes.
    """
    parts = [part for part in raw.replace("\\", "/").split("/") if part.strip(" ") not in ("", ".", "..")]
    if len(parts) > MAX_FOLDER_DEPTH + 1:
        raise BadRequest(f"Folders nest at most {MAX_FOLDER_DEPTH} deep here.")
    path = "/".join(sanitize_filename(part) for part in parts) if parts else "file"
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise BadRequest(f"The file's path is too long: at most {MAX_PATH_BYTES} bytes with its folders.")
    return path


def split_folder(path: str) -> tuple[str, str]:
    """("a/b", "c.txt") for "a/b/c.txt"; ("", "c.txt") for a file at the top."""
    folder, _, name = path.rpartition("/")
    return folder, name


def _truncate_name(name: str, limit: int) -> str:
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, ext = split_extension(name)
    if len(ext.encode("utf-8")) > limit // 2:
        stem, ext = name, ""
    budget = limit - len(ext.encode("utf-8"))
    while len(stem.encode("utf-8")) > budget:
        stem = stem[:-1]
    return stem.rstrip(" .") + ext


def split_extension(name: str) -> tuple[str, str]:
    """("archive", ".tar.gz") for the double extensions people know, else split at the last dot."""
    lowered = name.lower()
    for double in (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst"):
        if lowered.endswith(double) and len(name) > len(double):
            return name[: -len(double)], name[-len(double):]
    dot = name.rfind(".")
    if dot <= 0:
        return name, ""
    return name[:dot], name[dot:]


def numbered_name(name: str, number: int) -> str:
    """numbered_name("photo.jpg", 2) == "photo (2).jpg"; number 0 is the name itself."""
    if number == 0:
        return name
    stem, ext = split_extension(name)
    return f"{stem.rstrip(' ')} ({number}){ext}"


def chunk_count(total_size: int, chunk_size: int) -> int:
    """As Dropzone counts: an empty file is still one (empty) chunk."""
    return max(1, -(-total_size // chunk_size))


def chunk_length(index: int, total_size: int, chunk_size: int) -> int:
    return max(0, min(chunk_size, total_size - index * chunk_size))


def content_disposition(name: str) -> str:
    """RFC 6266: an ASCII fallback plus the exact name in RFC 5987 form."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%' else "_" for c in name) or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def binary_size(size: float) -> str:
    """A size for people, everywhere (console, banner, page): powers of 1024, at most 4 significant digits,
    so sizes people set read as they set them: 4194304 -> "4 MiB", 1000000 -> "976.6 KiB"."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{int(size)} B"


def human_size(size: float) -> str:
    """One convention for people everywhere: binary_size()."""
    return binary_size(size)


@dataclasses.dataclass(frozen=True)
class ChunkInfo:
    upload_id: str
    index: int
    total_size: int
    chunk_size: int
    total_chunks: int

    @property
    def offset(self) -> int:
        return self.index * self.chunk_size

    @property
    def length(self) -> int:
        return chunk_length(self.index, self.total_size, self.chunk_size)


def parse_chunk_fields(fields: Mapping[str, str], max_size: int) -> ChunkInfo | None:
    """Validate Dropzone's chunk fields; None when there are none (a plain upload)."""
    present = [name for name in DZ_FIELDS if name in fields]
    if not present:
        return None
    missing = [name for name in DZ_FIELDS if name not in fields]
    if missing:
        raise BadRequest(f"Missing field {missing[0]}.")
    upload_id = fields["dzuuid"]
    if not is_valid_id(upload_id):
        raise BadRequest(f"dzuuid must be 1 to {MAX_ID_LENGTH} letters, digits or '-'.")
    numbers = {}
    for name in DZ_FIELDS[1:]:
        text = fields[name].strip()
        if not _UINT_RE.match(text):
            raise BadRequest(f"{name} must be a whole number.")
        numbers[name] = int(text)
    index, size = numbers["dzchunkindex"], numbers["dztotalfilesize"]
    size_of_chunk, count = numbers["dzchunksize"], numbers["dztotalchunkcount"]
    if size > max_size:
        raise TooLarge(f"File too large: {size} bytes; this server accepts up to {max_size} bytes per file.")
    if not 1 <= size_of_chunk <= MAX_CHUNK_SIZE:
        raise BadRequest(f"dzchunksize must be from 1 to {MAX_CHUNK_SIZE}.")
    if count != chunk_count(size, size_of_chunk):
        raise BadRequest("dztotalchunkcount does not match dztotalfilesize / dzchunksize.")
    if count > MAX_CHUNK_COUNT:
        raise BadRequest(f"Too many chunks ({count}); use a larger chunk size.")
    if index >= count:
        raise BadRequest("dzchunkindex is past the last chunk.")
    if numbers["dzchunkbyteoffset"] != index * size_of_chunk:
        raise BadRequest("dzchunkbyteoffset does not match dzchunkindex * dzchunksize.")
    return ChunkInfo(upload_id, index, size, size_of_chunk, count)


@dataclasses.dataclass(frozen=True)
class ChunkExtras:
    """The chunk protocol's optional fields (pyfiledrop's page sends them; plain Dropzone clients do not)."""

    path: str | None = None            # dzrelpath: the file's path in a dropped folder, sanitised ("a/b/c.txt")
    mtime: float | None = None         # dzmtime: the original's modification time, ms since 1970 on the wire
    part_sha256: bytes | None = None   # dzchunksha256: this part's sha256 (hex on the wire)
    file_sha256: str | None = None     # dzfilesha256: the whole file's (hex), or "later" (it comes with a later part)


MAX_MTIME_S = 4102444800.0   # 2100-01-01: later (or negative) times are a client's bug, not a file's date
_SHA256_HEX_RE = re.compile(r"[0-9a-fA-F]{64}\Z")


def parse_mtime_ms(text: str) -> float:
    """A File.lastModified (ms since 1970) as seconds; BadRequest unless a whole number in a sane range."""
    text = text.strip()
    if not re.fullmatch(r"[0-9]{1,16}(\.[0-9]{1,6})?", text) or float(text) / 1000 > MAX_MTIME_S:
        raise BadRequest("dzmtime must be milliseconds since 1970, before the year 2100.")
    return float(text) / 1000


def parse_sha256_hex(text: str, field: str) -> bytes:
    if not _SHA256_HEX_RE.match(text.strip()):
        raise BadRequest(f"{field} must be a sha256 in hex (64 digits).")
    return bytes.fromhex(text.strip())


def parse_chunk_extras(fields: Mapping[str, str]) -> ChunkExtras:
    path = fields.get("dzrelpath")
    mtime = fields.get("dzmtime")
    digest, file_digest = fields.get("dzchunksha256"), fields.get("dzfilesha256")
    return ChunkExtras(path=sanitize_relative_path(path) if path and path.strip() else None,
                       mtime=parse_mtime_ms(mtime) if mtime else None,
                       part_sha256=parse_sha256_hex(digest, "dzchunksha256") if digest else None,
                       file_sha256=_parse_file_sha256(file_digest) if file_digest else None)


def _parse_file_sha256(text: str) -> str:
    if text.strip() == FILE_SHA256_LATER:
        return FILE_SHA256_LATER
    try:
        return parse_sha256_hex(text, "dzfilesha256").hex()
    except BadRequest:
        raise BadRequest('dzfilesha256 must be a sha256 in hex (64 digits) or "later".') from None


_random_bytes = b""
_random_lock = threading.Lock()


def new_upload_id() -> str:
    """A random version-4 UUID (the id the server gives an upload), from ``os.urandom`` drawn 4 KiB at a time:
    each draw is a system call, and with many small files arriving at once each system call hands the
    interpreter lock to another thread, which costs more than the call (bench/README.md, 1.3)."""
    global _random_bytes
    with _random_lock:
        if len(_random_bytes) < 16:
            _random_bytes = os.urandom(4096)
        drawn, _random_bytes = _random_bytes[:16], _random_bytes[16:]
    return str(uuid.UUID(bytes=drawn, version=4))


###############################################################################
# Errors as values ############################################################
###############################################################################


class UploadError(Exception):
    """An upload refused or failed; ``status`` is the HTTP status the message goes out with."""

    status = 500
    headers: Mapping[str, str] = {}     # sent with the error reply

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(UploadError):
    status = 400


class Forbidden(UploadError):
    status = 403


class NotFound(UploadError):
    status = 404


class Conflict(UploadError):
    status = 409


class Gone(UploadError):
    status = 410


class Superseded(Conflict):
    """A newer request took over the bytes this request was writing (a retry of a stalled request)."""


class TooManyBytes(BadRequest):
    """A request carried more bytes than the range it announced; ``extra`` of them were seen past its end."""

    def __init__(self, message: str, extra: int):
        super().__init__(message)
        self.extra = extra


class TooLarge(UploadError):
    status = 413


class ChecksumMismatch(UploadError):
    """The bytes that arrived do not have the hash the client sent with them (tus answers 460 for this)."""

    status = 460


class InsufficientStorage(UploadError):
    status = 507


class StorageFailure(UploadError):
    status = 500


class ClientDisconnected(BadRequest):
    """The request body broke off: the client vanished, was too slow, or sent less than it announced."""


_NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# EPERM is not here: Linux answers it for link() on FAT/exFAT, where the no-link fallback is the way on.
_LINK_FATAL_ERRNOS = _NO_SPACE_ERRNOS | {errno.EACCES, errno.EROFS}


def storage_error(error: OSError) -> UploadError:
    """An OSError as the client may see it: what went wrong, never where."""
    if error.errno in _NO_SPACE_ERRNOS:
        return InsufficientStorage("Not enough disk space on the server.")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageFailure("The server cannot write to its storage folder.")
    return StorageFailure("The server could not save the file.")


###############################################################################
# Ledger ######################################################################
###############################################################################

Ranges = tuple[tuple[int, int], ...]   # sorted, merged, half-open [start, end) byte ranges


def add_range(ranges: Ranges, start: int, end: int) -> Ranges:
    """``ranges`` with [start, end) added, merged with its neighbours."""
    if start >= end:
        return ranges
    merged: list[tuple[int, int]] = []
    for low, high in ranges:
        if high < start or low > end:
            merged.append((low, high))
        else:
            start, end = min(start, low), max(end, high)
    merged.append((start, end))
    return tuple(sorted(merged))


def remove_range(ranges: Ranges, start: int, end: int) -> Ranges:
    """``ranges`` without [start, end)."""
    kept: list[tuple[int, int]] = []
    for low, high in ranges:
        if high <= start or low >= end:
            kept.append((low, high))
            continue
        if low < start:
            kept.append((low, start))
        if high > end:
            kept.append((end, high))
    return tuple(kept)


def range_holes(ranges: Ranges, start: int, end: int | None) -> list[tuple[int, int | None]]:
    """The parts of [start, end) not in ``ranges`` (end None: unbounded)."""
    holes: list[tuple[int, int | None]] = []
    position = start
    for low, high in ranges:
        if high <= position:
            continue
        if end is not None and low >= end:
            break
        if low > position:
            holes.append((position, low))
        position = max(position, high)
    if end is None or position < end:
        holes.append((position, end))
    return holes


def prefix_end(ranges: Ranges) -> int:
    """How many bytes from the start of the file are received without a gap."""
    return ranges[0][1] if ranges and ranges[0][0] == 0 else 0


class State(str, enum.Enum):
    RECEIVING = "receiving"
    STORED = "stored"
    FAILED = "failed"
    EXPIRED = "expired"
    DELETED = "deleted"


@dataclasses.dataclass(frozen=True)
class UploadInfo:
    """What the ledger knows of one upload; a frozen value, replaced (``changed``) on change."""

    id: str
    name: str                    # the sanitised name the client gave, with its folders ("a/b/c.txt")
    size: int | None             # None until a body of unknown length ends
    part_size: int               # the client's chunk grid (the whole size for one-request uploads)
    client: str
    created: float
    updated: float
    state: State = State.RECEIVING
    received: Ranges = ()
    sha256: str | None = None
    stored_name: str | None = None
    finished: float | None = None
    reason: str = ""
    mtime: float | None = None   # the original's modification time, given to the stored file
    # The whole file's sha256 as its client gave it (checked when complete), or FILE_SHA256_LATER
    client_sha256: str | None = None

    def changed(self, **changes) -> UploadInfo:
        """This record with ``changes``: ``dataclasses.replace`` without its look at every field each time (a
        record changes with every part received, and twice for each file of one request)."""
        if not changes.keys() <= _UPLOAD_FIELDS:
            raise TypeError(f"UploadInfo has no field {sorted(changes.keys() - _UPLOAD_FIELDS)[0]!r}")
        copy = object.__new__(UploadInfo)
        copy.__dict__.update(self.__dict__, **changes)
        return copy

    @property
    def received_bytes(self) -> int:
        return sum(high - low for low, high in self.received)

    @property
    def fully_received(self) -> bool:
        return self.size is not None and (self.size == 0 or self.received == ((0, self.size),))

    @property
    def total_parts(self) -> int:
        return chunk_count(self.size or 0, self.part_size)

    def part_received(self, index: int) -> bool:
        start = index * self.part_size
        end = start + chunk_length(index, self.size or 0, self.part_size)
        return not range_holes(self.received, start, end)

    def received_parts(self) -> int:
        """How many parts of the grid are received whole (counted per range, not per part)."""
        size, part = self.size or 0, self.part_size
        if size == 0:
            return self.total_parts  # an empty file's one part has no bytes to wait for
        count = 0
        for low, high in self.received:
            last = self.total_parts if high == size else high // part   # parts [first, last) lie inside
            count += max(0, last - -(-low // part))
        return count

    def missing_parts(self, limit: int) -> list[int]:
        missing: list[int] = []
        for low, high in range_holes(self.received, 0, self.size or 0):
            for index in range(low // self.part_size, -(-high // self.part_size)):
                if (not missing or missing[-1] != index) and len(missing) < limit:
                    missing.append(index)
        return missing


_UPLOAD_FIELDS = frozenset(field.name for field in dataclasses.fields(UploadInfo))


@dataclasses.dataclass(frozen=True)
class Note:
    """A text sent from the page: kept as it came (shown only as text, never as HTML or raw on a terminal)."""

    id: str
    text: str
    client: str
    created: float


_GONE = {State.FAILED: "That upload failed.", State.EXPIRED: "That upload expired.",
         State.DELETED: "That upload was deleted.", State.RECEIVING: "That upload is still receiving.",
         State.STORED: "That upload is stored."}


@dataclasses.dataclass
class _PendingSave:
    """A ``Ledger.save`` waiting for the next commit."""

    rows: list[tuple]                          # ``Ledger._row`` of each record, in order
    mark: tuple[int, int, int, int] | None     # the first record's stored file
    done: bool = False
    error: Exception | None = None


class Ledger:
    """The one record of every upload: a SQLite database (WAL) in the chunks folder.

    The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[n]`` takes a database from version n to
    n + 1.  Writes are serialised by one lock over one connection (SQLite serialises writers anyway); each call
    is one transaction.  ``synchronous=NORMAL`` keeps every commit safe against a crash of this process, not
    against a power cut (the same trade as for the files themselves; see the README).
    """

    FILENAME = "ledger.sqlite3"
    _save_mark = "UPDATE uploads SET mark_device = ?, mark_inode = ?, mark_size = ?, mark_mtime_ns = ? WHERE id = ?"
    MIGRATIONS = (
        """CREATE TABLE uploads (
               id TEXT PRIMARY KEY, name TEXT NOT NULL, size INTEGER, part_size INTEGER NOT NULL,
               client TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, state TEXT NOT NULL,
               received TEXT NOT NULL, sha256 TEXT, stored_name TEXT, finished REAL, reason TEXT NOT NULL);
           CREATE INDEX uploads_by_state ON uploads (state, updated);
           CREATE INDEX uploads_by_created ON uploads (created);""",
        """ALTER TABLE uploads ADD COLUMN mtime REAL;
           CREATE INDEX uploads_by_content ON uploads (sha256, size);""",
        # The files page: keyset pages in each order it offers, and each stored file's identity when stored.
        """CREATE INDEX uploads_newest ON uploads (created, id);
           CREATE INDEX uploads_by_path ON uploads (COALESCE(stored_name, name), id);
           CREATE INDEX uploads_by_size ON uploads (COALESCE(size, 0), id);
           CREATE TABLE stored_marks (id TEXT PRIMARY KEY, device INTEGER NOT NULL, inode INTEGER NOT NULL,
                                      size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL);""",
        # Text both ways: notes sent from the page (seq orders them and pages the list; id is what goes out,
        # random so it tells nobody how many others sent), and settings such as the shared text.
        """CREATE TABLE notes (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, text TEXT NOT NULL,
                               bytes INTEGER NOT NULL, client TEXT NOT NULL, sender TEXT NOT NULL,
                               created REAL NOT NULL);
           CREATE INDEX notes_by_sender ON notes (sender);
           CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL);""",
        # Dedup asks for the newest few stored copies of some bytes: read off the index, not sorted from all.
        """DROP INDEX uploads_by_content;
           CREATE INDEX uploads_by_content ON uploads (sha256, size, finished);""",
        # A stored file's mark in its own row, so that storing a file is one statement: a separate table (and
        # the index of created that uploads_newest already covers) cost three more b-tree pages per commit.
        """ALTER TABLE uploads ADD COLUMN mark_device INTEGER;
           ALTER TABLE uploads ADD COLUMN mark_inode INTEGER;
           ALTER TABLE uploads ADD COLUMN mark_size INTEGER;
           ALTER TABLE uploads ADD COLUMN mark_mtime_ns INTEGER;
           UPDATE uploads SET (mark_device, mark_inode, mark_size, mark_mtime_ns) =
               (SELECT device, inode, size, mtime_ns FROM stored_marks WHERE stored_marks.id = uploads.id)
               WHERE id IN (SELECT id FROM stored_marks);
           DROP TABLE stored_marks;
           DROP INDEX uploads_by_created;""",
        # The file's sha256 as its client gave it: parts sent with it are checked at completion (after a
        # restart too, when the checksums of single parts are no longer known).
        """ALTER TABLE uploads ADD COLUMN client_sha256 TEXT;""",
    )
    _COLUMNS = ("id", "name", "size", "part_size", "client", "created", "updated", "state", "received", "sha256",
                "stored_name", "finished", "reason", "mtime", "client_sha256")
    _MARK_COLUMNS = ("mark_device", "mark_inode", "mark_size", "mark_mtime_ns")
    _STATE_COLUMN, _SHA256_COLUMN = _COLUMNS.index("state"), _COLUMNS.index("sha256")
    _RECEIVING_KEPT = 4096

    def __init__(self, path: Path | str):
        self.path = str(path)
        self._lock = threading.Lock()
        self._waiting: list[_PendingSave] = []   # saves for the next commit (see ``save``)
        self._waiting_lock = threading.Lock()
        self._receiving: dict[str, tuple] = {}   # id -> row as committed, for records still receiving
        self._updates: dict[tuple[int, ...], str] = {}
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=2)
        try:
            # Exclusive, taken at once and held: no file locks per transaction, and a second pyfiledrop on the
            # same chunks folder is refused at its start rather than sharing uploads it cannot see.
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # A checkpoint every 40 MB of log rather than 4: it rewrites each page once however often it
            # changed, and its two fsyncs are waited for by the request that happens to commit.
            self._db.execute("PRAGMA wal_autocheckpoint=10000")
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            self._db.close()
            if "locked" in str(error):
                raise RuntimeError("another pyfiledrop is using this chunks folder") from None
            raise
        self._migrate()
        self._contents = mmap.mmap(-1, self._CONTENT_BITS // 8)
        self._ids = mmap.mmap(-1, self._ID_BITS // 8)
        self._load_bits()
        placeholders = ", ".join("?" for _ in self._COLUMNS)
        updates = ", ".join(f"{column}=excluded.{column}" for column in self._COLUMNS[1:])
        self._upsert = (f"INSERT INTO uploads ({', '.join(self._COLUMNS)}) VALUES ({placeholders}) "
                        f"ON CONFLICT(id) DO UPDATE SET {updates}")
        marked = self._COLUMNS + self._MARK_COLUMNS
        self._upsert_marked = (f"INSERT INTO uploads ({', '.join(marked)}) VALUES ({', '.join('?' * len(marked))}) "
                               "ON CONFLICT(id) DO UPDATE SET "
                               + ", ".join(f"{column}=excluded.{column}" for column in marked[1:]))

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(self.MIGRATIONS):
                raise RuntimeError(f"the ledger {self.path} was written by a newer pyfiledrop")
            for number in range(version, len(self.MIGRATIONS)):
                self._db.executescript(f"BEGIN IMMEDIATE; {self.MIGRATIONS[number]} "
                                       f"PRAGMA user_version = {number + 1}; COMMIT;")

    # Which contents may be stored, by 20 bits of their sha256: most files are new, and their look-up for a
    # stored copy then costs a bit test, not a query (a query also lets another thread take the interpreter
    # lock).  128 KiB of anonymous memory (a page counts once a bit in it is set); with 100,000 files stored,
    # one new file in ten still asks the ledger.
    _CONTENT_BITS = 1 << 20
    # Likewise which ids may have a record, by their hash: a new upload under a client's id (every small file
    # the page sends) then needs no query to learn that nothing is recorded under it.
    _ID_BITS = 1 << 20

    def _load_bits(self) -> None:
        with self._lock:
            for upload_id, state, sha256 in self._db.execute("SELECT id, state, sha256 FROM uploads"):
                self._note_id(upload_id)
                if state == State.STORED.value and sha256 is not None:
                    self._note_content(sha256)

    def _id_bit(self, upload_id: str) -> tuple[int, int]:
        position = hash(upload_id) & (self._ID_BITS - 1)
        return position >> 3, 1 << (position & 7)

    def _note_id(self, upload_id: str) -> None:
        byte, bit = self._id_bit(upload_id)
        self._ids[byte] |= bit

    def may_have_id(self, upload_id: str) -> bool:
        """False only when no record has this id."""
        byte, bit = self._id_bit(upload_id)
        return bool(self._ids[byte] & bit)

    def _content_bit(self, sha256: str) -> tuple[int, int] | None:
        try:
            position = int(sha256[:6], 16) & (self._CONTENT_BITS - 1)
        except (TypeError, ValueError):
            return None
        return position >> 3, 1 << (position & 7)

    def _note_content(self, sha256: str) -> None:
        bit = self._content_bit(sha256)
        if bit is not None:
            self._contents[bit[0]] |= bit[1]

    def _may_hold(self, sha256: str) -> bool:
        """False only when no stored upload has this sha256."""
        bit = self._content_bit(sha256)
        return bit is None or bool(self._contents[bit[0]] & bit[1])

    @property
    def version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def save(self, *infos: UploadInfo, mark: tuple[int, int, int, int] | None = None) -> None:
        """Insert or replace these records, in one transaction; ``mark``: what the first one's stored file is
        (see ``save_mark``), in the same commit (one commit a stored file, not two).

        Saves that arrive while another commits wait for the next commit, which takes all of them in one
        transaction: a commit costs the b-tree pages it writes, and records of one moment share most of them
        (the newest end of every index ordered by time).  Each save returns once its rows are committed."""
        pending = _PendingSave([self._row(info) for info in infos], mark)
        with self._waiting_lock:
            self._waiting.append(pending)
        with self._lock:
            if not pending.done:
                self._commit_waiting()
        if pending.error is not None:
            raise pending.error

    def _commit_waiting(self) -> None:
        """Commit every waiting save (holding ``_lock``); when that fails, each alone, so only a save that
        fails by itself reports the failure."""
        with self._waiting_lock:
            batch, self._waiting = self._waiting, []
        try:
            written: dict[str, tuple | None] = {}
            self._transaction([statement for pending in batch for statement in self._statements(pending, written)])
            self._learn(written)
        except (sqlite3.Error, OSError) as error:
            if len(batch) == 1:
                batch[0].error = error
            else:
                for pending in batch:
                    try:
                        written = {}
                        self._transaction(self._statements(pending, written))
                        self._learn(written)
                    except (sqlite3.Error, OSError) as own:
                        pending.error = own
        except BaseException:  # interrupted while committing: no save of this batch may pass for committed
            for pending in batch:
                pending.error = sqlite3.OperationalError("the commit was interrupted")
            raise
        finally:
            for pending in batch:
                pending.done = True

    def _statements(self, pending: _PendingSave, written: dict[str, tuple | None]) -> list[tuple[str, tuple]]:
        """What writes ``pending``'s rows.  A record still receiving is saved again and again (a chunk's
        range, the time): only the columns that changed since its last commit are written, so the indexes of
        columns that did not change are left alone (an upsert rewrites every index entry: six b-tree pages a
        commit, against two).  ``written`` collects the rows as these statements leave them (None: forget)."""
        statements = []
        for number, row in enumerate(pending.rows):
            upload_id = row[0]
            self._note_id(upload_id)  # before the commit: a look-up meanwhile asks the database
            before = written[upload_id] if upload_id in written else self._receiving.get(upload_id)
            if number == 0 and pending.mark is not None:
                statements.append((self._upsert_marked, row + tuple(pending.mark)))
            elif before is None:
                statements.append((self._upsert, row))
            else:
                changed = tuple(index for index in range(1, len(row)) if row[index] != before[index])
                if changed:
                    statements.append((self._update_of(changed), tuple(row[index] for index in changed)
                                       + (upload_id,)))
            state = row[self._STATE_COLUMN]
            written[upload_id] = row if state == State.RECEIVING.value else None
            if state == State.STORED.value and row[self._SHA256_COLUMN] is not None:
                self._note_content(row[self._SHA256_COLUMN])  # before the commit: never missed
        return statements

    def _update_of(self, columns: tuple[int, ...]) -> str:
        statement = self._updates.get(columns)
        if statement is None:
            assignments = ", ".join(f"{self._COLUMNS[index]} = ?" for index in columns)
            statement = self._updates[columns] = f"UPDATE uploads SET {assignments} WHERE id = ?"
        return statement

    def _learn(self, written: dict[str, tuple | None]) -> None:
        """Committed: remember the rows of records still receiving (a bounded number; a record forgotten is
        saved whole next time)."""
        for upload_id, row in written.items():
            self._receiving.pop(upload_id, None)
            if row is not None:
                if len(self._receiving) >= self._RECEIVING_KEPT:
                    del self._receiving[next(iter(self._receiving))]
                self._receiving[upload_id] = row

    def _transaction(self, statements: list[tuple[str, tuple]]) -> None:
        if not statements:
            return
        if len(statements) == 1:
            self._db.execute(*statements[0])
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                self._db.execute(*statement)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def get(self, upload_id: str) -> UploadInfo | None:
        if not self.may_have_id(upload_id):
            return None
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(self._COLUMNS)} FROM uploads WHERE id = ?",
                                   (upload_id,)).fetchone()
        return None if row is None else self._info(row)

    def in_state(self, state: State, updated_before: float | None = None) -> list[UploadInfo]:
        query = f"SELECT {', '.join(self._COLUMNS)} FROM uploads WHERE state = ?"
        arguments: tuple = (state.value,)
        if updated_before is not None:
            query, arguments = query + " AND updated < ?", (state.value, updated_before)
        with self._lock:
            rows = self._db.execute(query, arguments).fetchall()
        return [self._info(row) for row in rows]

    def stored_with(self, sha256: str, size: int, limit: int = 100) -> list[UploadInfo]:
        """Stored uploads with this content (by the index on sha256 and size), the newest stored first."""
        if not self._may_hold(sha256):
            return []
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(self._COLUMNS)} FROM uploads WHERE sha256 = ? AND size = ? "
                                    "AND state = ? ORDER BY finished DESC LIMIT ?",
                                    (sha256, size, State.STORED.value, limit)).fetchall()
        return [self._info(row) for row in rows]

    def newest(self, limit: int = 100, offset: int = 0) -> list[UploadInfo]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(self._COLUMNS)} FROM uploads ORDER BY created DESC "
                                    "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [self._info(row) for row in rows]

    def select(self, where: str, arguments: Mapping, order: str = "created DESC, id DESC",
               limit: int = 100) -> list[UploadInfo]:
        """Records matching ``where`` (an SQL condition of the caller's own text; every value is bound from
        ``arguments``), in ``order``: one keyset page of the files page, or a sweep."""
        query = (f"SELECT {', '.join(self._COLUMNS)} FROM uploads WHERE {where} ORDER BY {order} "
                 "LIMIT :limit")
        with self._lock:
            rows = self._db.execute(query, {**arguments, "limit": limit}).fetchall()
        return [self._info(row) for row in rows]

    def save_mark(self, upload_id: str, mark: tuple[int, int, int, int]) -> None:
        """What the stored file of ``upload_id`` is (device, inode, size, mtime in ns), to notice changes."""
        with self._lock:
            self._db.execute(self._save_mark, (*mark, upload_id))

    def marks(self, upload_ids: Iterable[str]) -> dict[str, tuple[int, int, int, int]]:
        ids = list(upload_ids)
        found: dict[str, tuple[int, int, int, int]] = {}
        with self._lock:
            for start in range(0, len(ids), 500):
                batch = ids[start:start + 500]
                rows = self._db.execute(f"SELECT id, {', '.join(self._MARK_COLUMNS)} FROM uploads WHERE mark_inode "
                                        f"IS NOT NULL AND id IN ({', '.join('?' * len(batch))})", batch).fetchall()
                found.update((row[0], tuple(row[1:])) for row in rows)
        return found

    def rename_folder(self, old: str, new: str) -> int:
        """Stored uploads under folder ``old`` are now under ``new`` (the folder was renamed on the files page)."""
        with self._lock:
            self._receiving.clear()  # rows are changed here, not through save
            return self._db.execute(
                "UPDATE uploads SET stored_name = :new || substr(stored_name, length(:old) + 1) "
                "WHERE substr(stored_name, 1, length(:old) + 1) = :old || '/'", {"old": old, "new": new}).rowcount

    # -- notes and settings -------------------------------------------------------------------------------
    def add_note(self, note: Note, sender: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO notes (id, text, bytes, client, sender, created) VALUES (?, ?, ?, ?, ?, ?)",
                             (note.id, note.text, len(note.text.encode("utf-8")), note.client, sender, note.created))

    def sender_usage(self, sender: str) -> tuple[int, int]:
        """(notes, bytes of text) kept from ``sender``."""
        with self._lock:
            count, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM notes WHERE sender = ?",
                                           (sender,)).fetchone()
        return count, size

    def notes(self, limit: int, before: int | None = None) -> list[tuple[int, Note]]:
        """(seq, note) newest first, those older than ``before`` (a seq) when given."""
        with self._lock:
            rows = self._db.execute("SELECT seq, id, text, client, created FROM notes WHERE seq < ? "
                                    "ORDER BY seq DESC LIMIT ?", (before if before is not None else 1 << 62,
                                                                  limit)).fetchall()
        return [(row[0], Note(*row[1:])) for row in rows]

    def delete_note(self, note_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM notes WHERE id = ?", (note_id,)).rowcount > 0

    def setting(self, key: str) -> tuple[str, float] | None:
        """(value, when it was set) of a setting, None when unset."""
        with self._lock:
            row = self._db.execute("SELECT value, updated FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else (row[0], row[1])

    def set_setting(self, key: str, value: str | None, when: float) -> None:
        """Set (None: remove) a setting."""
        with self._lock:
            if value is None:
                self._db.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                self._db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?, ?)", (key, value, when))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _row(info: UploadInfo) -> tuple:
        return (info.id, info.name, info.size, info.part_size, info.client, info.created, info.updated,
                info.state.value, _ranges_json(info.received), info.sha256, info.stored_name, info.finished,
                info.reason, info.mtime, info.client_sha256)

    @staticmethod
    def _info(row: tuple) -> UploadInfo:
        values = dict(zip(Ledger._COLUMNS, row))
        values["state"] = State(values["state"])
        values["received"] = tuple((int(low), int(high)) for low, high in json.loads(values["received"]))
        return UploadInfo(**values)


def _ranges_json(ranges: Ranges) -> str:
    """``json.dumps(ranges, separators=(",", ":"))`` for (int, int) pairs, without the encoder's set-up: this
    is written for every record saved."""
    return "[" + ",".join(f"[{low:d},{high:d}]" for low, high in ranges) + "]"


###############################################################################
# Backend: where the bytes live ###############################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class BackendConstraints:
    """What a backend can do, as data the engine and the adapters read (an object store differs here)."""

    min_part: int = 1               # the smallest part it accepts, but for the last one
    max_part: int | None = None     # the largest part, if any
    max_parts: int | None = None    # how many parts one upload may have, if limited
    random_access: bool = True      # parts may arrive in any order and be written at any offset


def _part_key(upload_id: str) -> str:
    # Hex of the id: safe and unique on case-insensitive filesystems and against Windows' reserved names.
    return upload_id.encode("utf-8").hex()


def _id_from_key(key: str) -> str | None:
    try:
        upload_id = bytes.fromhex(key).decode("utf-8")
    except ValueError:
        return None
    return upload_id if is_valid_id(upload_id) else None


class LocalBackend:
    """Partial files in the chunks folder (``HEXID.part``), finished files in the storage folder.

    A partial file becomes a stored file by ``os.link`` under its final name, which fails rather than replace
    an existing file; until the part is removed, its link count (2) shows a crash that the link happened.
    Where links are impossible (FAT, exFAT) the name is claimed with O_EXCL and filled with os.replace.  With
    the folders on different filesystems the part is first copied into storage under ``.pyfiledrop-HEXID.tmp``.
    """

    constraints = BackendConstraints()
    TEMP_PREFIX = ".pyfiledrop-"

    def __init__(self, storage: Path, chunks: Path, *, checkpoint: Callable[[str], None] = lambda step: None,
                 warn: Callable[[str], None] = lambda text: None):
        self.storage = Path(storage)
        self.chunks = Path(chunks)
        self._storage = str(self.storage)
        self._chunks = str(self.chunks)
        self._part_prefix = os.path.join(self._chunks, "")   # plain strings: the hot path
        self._checkpoint = checkpoint
        self._warn = warn
        self._copies: set[str] = set()          # ids copied into storage from another filesystem
        self._free: tuple[float, int] = (-1.0, 0)  # (when, bytes): statvfs at most every FREE_SPACE_TTL_S
        self._written = 0                          # bytes written since then

    # -- partial files --------------------------------------------------------------------------------------
    def part_path(self, upload_id: str) -> str:
        return self._part_prefix + _part_key(upload_id) + ".part"

    def create_part(self, upload_id: str) -> int:
        """A new empty partial file, open for writing; FileExistsError when one is there already."""
        flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | getattr(os, "O_BINARY", 0)
        try:
            return os.open(self.part_path(upload_id), flags, 0o644)
        except FileNotFoundError:
            self._recreate(self.chunks, "chunks")
            return os.open(self.part_path(upload_id), flags, 0o644)

    def open_part(self, upload_id: str) -> int:
        return os.open(self.part_path(upload_id), os.O_RDWR | getattr(os, "O_BINARY", 0))

    def write_at(self, fd: int, data, offset: int) -> None:
        self._written += len(data)
        view = memoryview(data)
        if hasattr(os, "pwrite"):
            while view:
                count = os.pwrite(fd, view, offset)
                view, offset = view[count:], offset + count
            return
        os.lseek(fd, offset, os.SEEK_SET)
        while view:
            view = view[os.write(fd, view):]

    MAP_WINDOW = 1 * MIB   # mapped pages count in the resident size while mapped: keep the window small

    def hash_range(self, hasher, fd: int, start: int, end: int) -> None:
        """Feed bytes [start, end) of the open partial file to ``hasher``: mapped, so the hash reads them
        straight from the page cache (a read into a buffer would copy each byte once more)."""
        while start < end:
            base = start - start % mmap.ALLOCATIONGRANULARITY
            length = min(end, base + self.MAP_WINDOW) - base
            try:
                window = mmap.mmap(fd, length, offset=base, access=mmap.ACCESS_READ)
            except (OSError, ValueError):
                return self._hash_by_reading(hasher, fd, start, end)  # a filesystem that cannot map
            with window, memoryview(window) as view:
                hasher.update(view[start - base:])
            start = base + length

    def _hash_by_reading(self, hasher, fd: int, start: int, end: int) -> None:
        buffer = _take_buffer()
        try:
            view = memoryview(buffer)
            while start < end:
                count = self.read_at(fd, view[:min(len(view), end - start)], start)
                if not count:
                    raise ValueError("the partial file is shorter than expected")
                hasher.update(view[:count])
                start += count
        finally:
            _give_buffer(buffer)

    @staticmethod
    def read_at(fd: int, view: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(fd, [view], offset)
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(view))
        view[:len(data)] = data
        return len(data)

    def part_stat(self, upload_id: str) -> os.stat_result | None:
        try:
            return os.stat(self.part_path(upload_id))
        except FileNotFoundError:
            return None

    def discard(self, upload_id: str) -> None:
        """Remove what an upload left in the chunks folder (and its copy in storage, if one was made)."""
        _unlink_quietly(self.part_path(upload_id))
        if upload_id in self._copies:
            self._copies.discard(upload_id)
            _unlink_quietly(self._temp_path(upload_id))

    def part_ids(self) -> list[str | None]:
        """Ids of the partial files in the chunks folder (None for a file that is no part of ours)."""
        try:
            names = os.listdir(self._chunks)
        except FileNotFoundError:
            return []
        return [_id_from_key(name[:-5]) for name in names if name.endswith(".part")]

    FREE_SPACE_TTL_S = 0.05   # many small uploads a second need not each ask the filesystem

    def free_space(self, fresh: bool = False) -> int:
        """Free bytes on the fuller of the two filesystems (an estimate from a recent look, unless ``fresh``)."""
        when, free = self._free
        now = time.monotonic()
        if fresh or now - when > self.FREE_SPACE_TTL_S:
            try:
                free = min(shutil.disk_usage(folder).free for folder in {self.storage, self.chunks})
            except OSError as error:
                raise storage_error(error)
            self._free, self._written = (now, free), 0
        return free - self._written

    def total_space(self) -> int:
        return min(shutil.disk_usage(folder).total for folder in {self.storage, self.chunks})

    # -- stored files ---------------------------------------------------------------------------------------
    def store(self, upload_id: str, name: str, mtime: float | None = None) -> str:
        """Give the complete partial file its final name in storage, never replacing a file; the name used.

        ``name`` may name folders ("a/b/c.txt"): they are made as needed, inside storage.  The partial file
        stays (linked twice) until ``discard``: the engine records the name in between.
        """
        folder, leaf = split_folder(name)
        directory = str(self.folder_for(folder)) if folder else self._storage  # plain strings: the hot path
        source = self.part_path(upload_id)
        _set_mtime(source, mtime)   # before the link: the stored file never shows another time
        for number in range(MAX_NAME_ATTEMPTS):
            candidate = numbered_name(leaf, number)
            try:
                claimed = self._claim(source, os.path.join(directory, candidate))
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                source = self._copy_into_storage(upload_id)  # the folders are on different filesystems
                _set_mtime(source, mtime)
                claimed = self._claim(source, os.path.join(directory, candidate))
            if claimed:
                self._checkpoint("linked")
                return f"{folder}/{candidate}" if folder else candidate
        raise Conflict("Too many files with this name already.")

    def folder_for(self, folder: str) -> Path:
        """The storage folder ``folder`` ("a/b", sanitised), made if missing; never a way out of storage."""
        if not folder:
            return self.storage
        directory = self.storage / folder
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise Conflict(f'A file is in the way of the folder "{folder}".') from None
        root = os.path.realpath(self.storage)
        if not os.path.realpath(directory).startswith(root + os.sep):  # a symbolic link someone put there
            raise Forbidden(f'The folder "{folder}" leads out of the storage folder.')
        return directory

    def _claim(self, source: str, target: str) -> bool:
        """Link ``source`` as ``target``; False when ``target`` is taken."""
        try:
            os.link(source, target)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            parent = Path(target).parent
            if not os.path.exists(source) or parent.exists():
                raise
            if not self.storage.exists():
                self._recreate(self.storage, "storage")
            parent.mkdir(parents=True, exist_ok=True)
            return self._claim(source, target)
        except OSError as error:
            if error.errno in _LINK_FATAL_ERRNOS or error.errno == errno.EXDEV:
                raise
            return self._move_without_link(source, target)

    @staticmethod
    def _move_without_link(source: str, target: str) -> bool:
        """For filesystems without hard links (FAT, exFAT): False when ``target`` is taken.

        Known gap: with no link count to show it, a kill between claiming ``target`` (empty) and the replace
        leaves that empty file, and the retry stores the upload under the next name.
        """
        if os.name == "nt":
            try:
                os.rename(source, target)  # refuses an existing target on Windows
            except FileExistsError:
                return False
            return True
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        os.replace(source, target)
        return True

    def _temp_path(self, upload_id: str) -> str:
        return str(self.storage / f"{self.TEMP_PREFIX}{_part_key(upload_id)}.tmp")

    def _copy_into_storage(self, upload_id: str) -> str:
        """Chunks and storage on different filesystems: one copy, under a hidden name, removed on failure."""
        temp = self._temp_path(upload_id)
        _unlink_quietly(temp)  # a copy from an attempt that failed; never a stored file (those are links)
        self._copies.add(upload_id)
        try:
            with open(self.part_path(upload_id), "rb") as source, open(temp, "xb") as target:
                shutil.copyfileobj(source, target, READ_BLOCK)
        except BaseException:
            _unlink_quietly(temp)
            raise
        self._checkpoint("copied")
        return temp

    def _recreate(self, folder: Path, what: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._warn(f"the {what} folder {folder} had disappeared; created it again")

    def unstore(self, upload_id: str, stored_name: str) -> bool:
        """Take back a name ``store`` gave the partial file when the name could not be recorded: only while that
        name is still the partial file (or its copy), linked twice, so no other file is ever removed."""
        path = self.stored_path(stored_name)
        for source in (self._temp_path(upload_id), self.part_path(upload_id)):
            if _same_file(source, path):
                _unlink_quietly(path)
                return True
        return False

    def find_stored(self, upload_id: str, name: str | None) -> str | None:
        """After a crash: the stored name the partial file (or its copy) was linked under, if it was."""
        try:
            source = os.stat(self._temp_path(upload_id))
        except FileNotFoundError:
            source = self.part_stat(upload_id)
        if source is None or source.st_nlink < 2:
            return None
        identity = (source.st_ino, source.st_dev)
        folder, leaf = split_folder(name or "")
        misses = 0
        for number in range(MAX_NAME_ATTEMPTS if name else 0):  # names are claimed in this order
            candidate = f"{folder}/{numbered_name(leaf, number)}" if folder else numbered_name(leaf, number)
            try:
                found = os.stat(self.storage / candidate)
            except (FileNotFoundError, NotADirectoryError):
                misses += 1
                if misses > 100:
                    break
                continue
            if (found.st_ino, found.st_dev) == identity:
                return candidate
        for top, _, files in os.walk(self.storage):  # renamed by hand, or no record of the name: look at all
            for filename in files:
                path = os.path.join(top, filename)
                with contextlib.suppress(OSError):
                    found = os.stat(path, follow_symlinks=False)
                    if (found.st_ino, found.st_dev) == identity:
                        return os.path.relpath(path, self.storage).replace(os.sep, "/")
        return None

    def temporaries(self) -> list[tuple[str, str | None]]:
        """(file name, upload id or None) of the hidden copies left in storage."""
        try:
            names = os.listdir(self.storage)
        except FileNotFoundError:
            return []
        prefix, suffix = self.TEMP_PREFIX, ".tmp"
        return [(name, _id_from_key(name[len(prefix):-len(suffix)])) for name in names
                if name.startswith(prefix) and name.endswith(suffix)]

    def remove_temporary(self, filename: str) -> None:
        _unlink_quietly(self.storage / filename)

    def stored_path(self, stored_name: str) -> Path:
        return self.storage / stored_name

    def stored_exists(self, stored_name: str) -> bool:
        return (self.storage / stored_name).is_file()

    def link_stored(self, existing: str, name: str) -> str | None:
        """A second name for the stored file ``existing`` (a hard link: no new space); the name used, numbered
        as ``store`` numbers.  A name that already is this very file is the answer (so a retry after a crash
        links nothing twice).  None where this filesystem cannot link (FAT, exFAT): the caller stores a copy."""
        folder, leaf = split_folder(name)
        directory = self.folder_for(folder)
        source = self.storage / existing
        for number in range(MAX_NAME_ATTEMPTS):
            candidate = numbered_name(leaf, number)
            target = directory / candidate
            try:
                os.link(source, target)
            except FileExistsError:
                if not _same_file(source, target):
                    continue
            except OSError as error:
                if error.errno in _LINK_FATAL_ERRNOS:
                    raise
                return None
            self._checkpoint("linked")
            return f"{folder}/{candidate}" if folder else candidate
        raise Conflict("Too many files with this name already.")

    def stored_mark(self, stored_name: str | None) -> tuple[int, int, int, int] | None:
        """(device, inode, size, mtime in ns) of a stored file, or None where it cannot be looked at."""
        try:
            found = os.lstat(os.path.join(self._storage, stored_name))
        except (OSError, TypeError):
            return None
        return found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns

    def stored_size(self, stored_name: str) -> int | None:
        try:
            return os.stat(self.storage / stored_name).st_size
        except OSError:
            return None

    def hash_stored(self, stored_name: str) -> str:
        digest = hashlib.sha256()
        with open(self.storage / stored_name, "rb", buffering=0) as handle:
            buffer = bytearray(READ_BLOCK)
            view = memoryview(buffer)
            while count := handle.readinto(buffer):
                digest.update(view[:count])
        return digest.hexdigest()


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _set_mtime(path: str, mtime: float | None) -> None:
    if mtime is None:
        return
    with contextlib.suppress(OSError, OverflowError, ValueError):  # a time the filesystem cannot hold
        os.utime(path, (time.time(), mtime))


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


###############################################################################
# Engine ######################################################################
###############################################################################


@dataclasses.dataclass(frozen=True)
class EngineLimits:
    max_size: int                    # bytes per file
    min_free: int = 0                # bytes every filesystem keeps free; uploads that would eat into it get 507
    partial_ttl: float = DEFAULT_PARTIAL_TTL_HOURS * 3600.0   # seconds an unfinished upload may sit untouched
    stored_ttl: float | None = None  # seconds a stored file is kept (--expire-after); None: for good
    ahead_wait: float = 0.25         # seconds a part ahead of the in-order hash may wait for it (_wait_for_hash)
    front_stalled: float = 0.05      # ... unless the part before it has not moved for this long


@dataclasses.dataclass(frozen=True)
class Progress:
    upload_id: str
    name: str
    received: int
    size: int | None
    started: float                   # wall-clock time the upload was created


@dataclasses.dataclass(frozen=True)
class Stored:
    info: UploadInfo


@dataclasses.dataclass(frozen=True)
class Refused:
    """An upload request refused or failed, as one console line: what, why, from whom."""

    what: str
    client: str
    status: int
    message: str


@dataclasses.dataclass(frozen=True)
class Notice:
    text: str
    warning: bool = False


@dataclasses.dataclass(frozen=True)
class NoteReceived:
    note: Note


EngineEvent = Progress | Stored | Refused | Notice | NoteReceived

COMMIT_EVERY = 64 * MIB          # a long request records what arrived this often (a crash loses less)
SPACE_CHECK_EVERY = 4 * MIB      # how often a long request looks at the free space (statvfs: microseconds)
PROGRESS_EVERY_S = 0.25
# put's file_sha256 from a client that sends the file's sha256 with a later part (the page: it knows it once
# it has read the whole file, at the latest when it sends the last part)
FILE_SHA256_LATER = "later"
STALLED_AFTER_S = 1.0            # a request that moved no byte for this long may be taken over by a retry
RIVAL_WAIT_S = 10.0              # a retry waits this long at most for an earlier copy of itself still moving
# A part the client sent just before it cancelled may reach the server just after: for this long a cancelled
# id is not started again (409), so that part leaves nothing behind; the same file given later starts anew.
CANCEL_QUIET_S = 5.0
HASH_WINDOW = 8 * MIB            # the in-order hash reads back at most this much per turn of its lock
HASH_BACKLOG = 32 * MIB          # a reply waits while more than this waits to be hashed: completion stays quick
SMALL_WHOLE = READ_BLOCK         # a file of one request up to this size takes the short way (_receive_small)


class _Writer:
    """One request putting bytes into an upload from ``start``; ``fenced`` once a newer request took over."""

    __slots__ = ("start", "end", "position", "committed_to", "lock", "fenced", "whole", "holes", "hasher",
                 "hash_from", "next_space_check", "next_progress", "last_progress", "atomic", "superseded",
                 "keep_if_empty", "turn", "hash_epoch")

    def __init__(self, start: int, end: int | None, holes: list[tuple[int, int | None]]):
        self.start = self.position = self.committed_to = start
        self.end = end
        self.lock = threading.Lock()     # held for each write and commit, so fencing is never half-way
        self.fenced = False
        self.whole = holes == [(start, end)]   # nothing in its range was received before
        self.holes = holes
        self.hasher = None               # covers [0, position) once it hashes as it writes
        self.hash_from = 0
        self.hash_epoch = 0              # the upload's hash_epoch when it took its copy of the hash
        self.next_space_check = start + SPACE_CHECK_EVERY
        self.next_progress = 0.0
        self.last_progress = time.monotonic()
        self.atomic = False
        self.superseded = False          # fenced by a newer request (not by its own failure)
        self.keep_if_empty = False
        self.turn: threading.Event | None = None   # set while it waits for the hash: set once it has come

    def fence(self, superseded: bool = True) -> None:
        with self.lock:
            self.fenced = True
            self.superseded = self.superseded or superseded

    def overlaps(self, start: int, end: int | None) -> bool:
        return (end is None or self.start < end) and (self.end is None or start < self.end)


class _Live:
    """An upload being received, in memory: its record, the requests writing it, and the in-order hash."""

    __slots__ = ("info", "ephemeral", "lock", "changed", "writers", "hash_lock", "hasher", "hashed_to",
                 "finish_lock", "linked_as", "background_hash", "hash_wanted", "hash_progress", "fd", "write_lock",
                 "hash_epoch", "unchecked", "unchecked_known")

    def __init__(self, info: UploadInfo, ephemeral: bool, fd: int | None = None):
        self.info = info
        self.fd = fd                     # an upload of one request keeps the file it was created with open
        self.ephemeral = ephemeral       # arrives in one request: no record until it is stored
        self.lock = threading.Lock()     # info and writers
        self.changed = threading.Condition(self.lock)   # a writer has gone
        self.writers: list[_Writer] = []
        self.hash_lock = threading.Lock()
        self.hasher = hashlib.sha256()   # covers [0, hashed_to), all of it received
        self.hashed_to = 0
        self.hash_epoch = 0              # counts restarts of the hash (damaged parts dropped)
        self.unchecked: list[tuple[int, int, bytes]] = []   # (start, end, sha256) of parts not hashed alone
        # Every part received without its own check is in ``unchecked`` (not so for a record read back after a
        # restart that has a client_sha256: its parts' checksums went with the process).
        self.unchecked_known = info.client_sha256 is None
        self.finish_lock = threading.Lock()
        self.linked_as: str | None = None   # stored under this name, not yet recorded (the ledger failed)
        self.background_hash = False    # a thread is hashing received bytes from the file
        self.hash_wanted = False        # more bytes arrived meanwhile: it looks again before it ends
        self.hash_progress = threading.Condition()   # the hash moved on (replies held back wait for it)
        # One write at a time into the file.  The kernel allows no more anyway (a buffered write holds the
        # file's inode lock), but a second writer there spins on the CPU while the first copies its bytes; here
        # it sleeps.
        self.write_lock = threading.Lock()

    def in_flight(self) -> int:
        return sum(max(0, writer.position - writer.committed_to) for writer in tuple(self.writers))


class _SmallClaim:
    """A small file of one request on the short way (``Engine._receive_small``).  Under a client's id another
    request for it may come (a retry of a stalled request): that one waits while this one moves, then fences
    it.  ``lock`` is held to fence it, and by the request itself from the link of the name to the removal of
    the partial file, so the upload ends either stored by this request or left to the newer one."""

    __slots__ = ("info", "lock", "fenced", "ended", "last_progress", "watched")

    def __init__(self, info: UploadInfo):
        self.info = info
        self.lock = threading.Lock()
        self.fenced = False          # a newer request (or a cancel) took over: this one stores nothing
        self.ended = False           # stored, or given up
        self.last_progress = time.monotonic()
        self.watched = False         # a newer request waits for its end


class Engine:
    """Uploads as byte ranges: create, put bytes at an offset, info, finish, expire, list.

    Knows nothing of HTTP: the protocol adapters translate requests into these calls.  Every byte is written
    once, at its offset, by exactly one request (a newer request for the same bytes fences the older one),
    and hashed once, in order, as it arrives where it can (see ``_join_hash``), else read back once.
    ``checkpoint(step)`` is called at each step of completion, so tests can stop the process there.
    """

    def __init__(self, ledger: Ledger, backend: LocalBackend, limits: EngineLimits, *,
                 clock: Callable[[], float] = time.time, events: Callable[[EngineEvent], None] = lambda e: None,
                 checkpoint: Callable[[str], None] = lambda step: None):
        self.ledger = ledger
        self.backend = backend
        self.limits = limits
        self.clock = clock
        self.events = events
        self.checkpoint = checkpoint
        self._lock = threading.Lock()                  # the dict of live uploads; never held across I/O
        self._live: dict[str, _Live] = {}
        self._opening = [threading.Lock() for _ in range(64)]   # loading or creating, striped per id
        self._small: dict[str, _SmallClaim] = {}       # small files on the short way under their client's id
        self._small_ended = threading.Condition(self._lock)
        self.stored_count = 0
        self.recovered = recover(ledger, backend, clock, self._notice)

    def _notice(self, text: str, warning: bool = False) -> None:
        self.events(Notice(text, warning))

    # -- create -------------------------------------------------------------------------------------------
    def create(self, upload_id: str, name: str, *, size: int | None, part_size: int, client: str,
               ephemeral: bool = False, fresh: bool = False, mtime: float | None = None) -> UploadInfo:
        """A new upload, or the one already under ``upload_id`` if it matches (name, size, part size).

        ``name`` may name folders ("a/b/c.txt", as ``sanitize_relative_path`` makes it).  ``ephemeral``: it
        arrives in one request, so it is recorded only once stored.  ``fresh``: the id was just made by the
        server, so nothing can be under it yet (no look-up).  ``mtime``: the stored file's modification time.
        """
        if size is not None:
            self._check_size(size)
        stripe = self._opening[hash(upload_id) % 64]
        stripe.acquire()
        try:
            # A request of the short way under this id: waited for while it moves, then fenced; none can begin
            # while the stripe is held.
            while (claim := self._small.get(upload_id)) is not None and not (claim.ended or claim.fenced):
                stripe.release()
                try:
                    self._take_over_small(claim)
                finally:
                    stripe.acquire()
            return self._create_here(upload_id, name, size, part_size, client, ephemeral, fresh, mtime)
        finally:
            stripe.release()

    def _create_here(self, upload_id: str, name: str, size: int | None, part_size: int, client: str,
                     ephemeral: bool, fresh: bool, mtime: float | None) -> UploadInfo:
        """``create``, holding the id's stripe of ``_opening``."""
        live = self._live.get(upload_id)
        recorded = None if live is not None or fresh else self.ledger.get(upload_id)
        if recorded is not None and recorded.state is State.RECEIVING:
            live = self._resume(recorded)
        if live is not None:
            _check_same(live.info, name, size, part_size)
            return live.info
        if recorded is not None and recorded.state is State.STORED:
            _check_same(recorded, name, size, part_size)
            return recorded
        if recorded is not None and recorded.state is State.DELETED and \
                self.clock() - recorded.updated < CANCEL_QUIET_S:
            raise Conflict("This upload was cancelled a moment ago.")
        self.check_space(size or 0)
        now = self.clock()
        info = UploadInfo(id=upload_id, name=name, size=size, part_size=part_size, client=client,
                          created=now, updated=now, mtime=mtime)
        fd = self._new_part(upload_id)
        live = _Live(info, ephemeral, fd if ephemeral else None)
        if not ephemeral:
            os.close(fd)
            self._record(info, on_failure=lambda: self.backend.discard(upload_id))
        with self._lock:
            self._live[upload_id] = live
        return info

    def _check_size(self, size: int) -> None:
        if size > self.limits.max_size:
            raise TooLarge(f"File too large: {size} bytes; this server accepts up to {self.limits.max_size} "
                           "bytes per file.")

    def _new_part(self, upload_id: str) -> int:
        try:
            try:
                return self.backend.create_part(upload_id)
            except FileExistsError:
                # Neither live nor recorded (we hold this id's opening lock): left by a stop before its record,
                # or by a request of the short way this one has just fenced.
                self.backend.discard(upload_id)
                return self.backend.create_part(upload_id)
        except OSError as error:
            raise storage_error(error)

    def _record(self, info: UploadInfo, on_failure: Callable[[], None] = lambda: None) -> None:
        """Save ``info``; a stored one with what its file is now, so the files page notices a change by hand."""
        try:
            mark = self.backend.stored_mark(info.stored_name) if info.state is State.STORED else None
            self.ledger.save(info, mark=mark)
        except (sqlite3.Error, OSError) as error:
            on_failure()
            log.error("the ledger could not record upload %s: %s", info.id, error)
            full = getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or \
                getattr(error, "errno", None) in _NO_SPACE_ERRNOS
            if full:  # the upload's own bytes took the room its record needed: the client may free some or wait
                raise InsufficientStorage("Not enough disk space on the server to record the upload.") from None
            raise StorageFailure("The server could not record the upload.") from None

    def _resume(self, info: UploadInfo | None) -> _Live | None:
        """An unfinished upload recorded in the ledger, live again (after a restart)."""
        if info is None or info.state is not State.RECEIVING:
            return None
        upload_id = info.id
        if self.backend.part_stat(upload_id) is None:
            self._record(info.changed(state=State.FAILED, reason="its partial file disappeared"))
            return None
        live = _Live(info, ephemeral=False)
        with self._lock:
            self._live[upload_id] = live
        if info.received:
            self._notice(f'resuming "{info.name}": {human_size(info.received_bytes)} of '
                         f"{human_size(info.size or 0)} already here")
        return live

    def _get_live(self, upload_id: str) -> _Live | None:
        live = self._live.get(upload_id)
        if live is None:
            with self._opening[hash(upload_id) % 64]:
                live = self._live.get(upload_id) or self._resume(self.ledger.get(upload_id))
        return live

    def check_space(self, needed: int) -> None:
        """507 unless ``needed`` more bytes leave the reserve (``min_free``) free on every filesystem."""
        free = self.backend.free_space()
        if needed + self.limits.min_free > free:  # look again before refusing: the estimate may be stale
            free = self.backend.free_space(fresh=True)
        if needed + self.limits.min_free > free:
            if not needed:  # a check while bytes arrive: the disk filled up under way
                raise InsufficientStorage("Not enough disk space on the server to go on with this upload.")
            raise InsufficientStorage(f"Not enough disk space on the server: {needed} bytes needed, "
                                      f"{max(0, free - self.limits.min_free)} available.")

    # -- info, list -----------------------------------------------------------------------------------------
    def info(self, upload_id: str) -> UploadInfo:
        live = self._live.get(upload_id)
        if live is not None:
            return live.info
        claim = self._small.get(upload_id)
        if claim is not None and not claim.ended:
            return claim.info
        info = self.ledger.get(upload_id)
        if info is None:
            raise NotFound("No such upload.")
        return info

    def _settled_info(self, upload_id: str) -> UploadInfo:
        """An upload no longer receiving: its info if it was stored, else NotFound (it expired or failed)."""
        info = self.info(upload_id)
        if info.state is not State.STORED:
            raise NotFound(f"{_GONE[info.state]} Start it again.")
        return info

    def offset(self, upload_id: str) -> int:
        """How many bytes from the start are here without a gap, counting those that requests still running
        have written and not yet recorded (a resumable client asks this to go on from there)."""
        live = self._live.get(upload_id)
        if live is None:
            info = self.info(upload_id)
            return info.size or 0 if info.state is State.STORED else prefix_end(info.received)
        with live.changed:
            ranges = live.info.received
            for writer in live.writers:
                if not writer.fenced and not writer.atomic:
                    ranges = add_range(ranges, writer.start, writer.position)
        return prefix_end(ranges) if live.info.state is not State.STORED else live.info.size or 0

    def list(self, limit: int = 100, offset: int = 0) -> list[UploadInfo]:
        """Uploads, newest first."""
        return self.ledger.newest(limit, offset)

    # -- put ------------------------------------------------------------------------------------------------
    def put(self, upload_id: str, offset: int, pieces: Iterable, *, length: int | None = None,
            atomic: bool = False, checksum: tuple[str, bytes] | None = None,
            keep_if_empty: bool = False, file_sha256: str | None = None) -> UploadInfo:
        """Write the bytes of ``pieces`` at ``offset`` (at most ``length`` of them); the upload's info after.

        Bytes already received are read and dropped, never written again.  What arrived is recorded even
        when the request breaks off (the client vanished), so it can go on from there; ``atomic``: only if
        all ``length`` bytes arrive (a chunk protocol that always sends a part again whole).
        ``checksum`` (algorithm, digest), "sha1" or "sha256": the bytes of this request must have that hash,
        else none of them counts and ChecksumMismatch is raised; bytes received before are checked too, so a
        part sent again with other content is refused.  A stored upload is answered as it is, unwritten.
        ``keep_if_empty``: an upload the client created explicitly (tus) outlives a failed request that brought
        none of its bytes; otherwise such an upload is forgotten, and a retry starts it again.
        ``file_sha256`` (hex): the client's sha256 of the whole file, or FILE_SHA256_LATER (it comes with a
        later part).  With it, the sha256 ``checksum`` of an ``atomic`` part not received before is kept, not
        computed: ``finish`` reads such parts back to check them only if the file's hash is not the client's
        (each byte is hashed once, not twice).
        """
        check = _checksum_hasher(checksum)
        atomic_here = atomic or check is not None
        live = self._get_live(upload_id)
        if live is None:
            info = self._settled_info(upload_id)
            if check is not None:
                _drain(_hashed(pieces, check))
                _verify(check, checksum)
            return info
        size = live.info.size
        end = offset + length if length is not None else size
        if offset < 0 or (size is not None and (offset > size or end > size)):
            raise BadRequest("Those bytes lie past the end of the file.")
        writer = self._claim(live, offset, end)
        writer.atomic = atomic_here
        writer.keep_if_empty = keep_if_empty
        if check is not None and not (atomic and self._check_later(live, writer, checksum, file_sha256)):
            pieces = _hashed(pieces, check)
        else:
            check = None
        failed = True
        try:
            self._receive(live, writer, pieces)
            if writer.superseded and atomic_here:  # its bytes all came, but a newer request's count instead
                raise Superseded("A newer request took over these bytes of the upload.")
            failed = atomic and writer.position != end
            if check is not None and not failed:
                failed = not _verify(check, checksum, raise_error=False)
            elif checksum is not None and not failed:
                with live.lock:
                    live.unchecked.append((writer.start, end, checksum[1]))
        except TooManyBytes:
            atomic_here = True  # a request that breaks its own announcement: none of it counts
            raise
        finally:
            if failed and atomic_here:
                writer.fence(superseded=False)  # none of it counts
            self._settle(live, writer, failed)
        if check is not None:
            _verify(check, checksum)
        return live.info

    @staticmethod
    def _check_later(live: _Live, writer: _Writer, checksum: tuple[str, bytes], file_sha256: str | None) -> bool:
        """Whether this part's checksum can wait for the file's hash (``put``'s ``file_sha256``): its bytes are
        all new, and no part so kept came with another file hash.  The upload's record says so (with the part's
        commit), so that a restart knows parts went unchecked."""
        if file_sha256 is None or checksum[0] != "sha256" or live.ephemeral or not writer.whole or writer.end is None:
            return False
        with live.lock:
            known = live.info.client_sha256
            if known is None or (known == FILE_SHA256_LATER and file_sha256 != FILE_SHA256_LATER):
                live.info = live.info.changed(client_sha256=file_sha256)
                return True
            return file_sha256 in (known, FILE_SHA256_LATER)

    def _claim(self, live: _Live, start: int, end: int | None) -> _Writer:
        """Register a writer for [start, end).

        An earlier request for the same bytes that has made no progress for STALLED_AFTER_S (its client
        vanished, or gave up and retried) is fenced at once: its later bytes are dropped.  One still moving is
        waited for (then this request only reads what is already there), but for no longer than
        RIVAL_WAIT_S: after that the newer request wins.
        """
        deadline = time.monotonic() + RIVAL_WAIT_S
        while True:
            with live.changed:
                rivals = [w for w in live.writers if not w.fenced and w.overlaps(start, end)]
                if not rivals:
                    writer = _Writer(start, end, range_holes(live.info.received, start, end))
                    live.writers.append(writer)
                    return writer
                now = time.monotonic()
                moving = now < deadline and any(now - w.last_progress < STALLED_AFTER_S for w in rivals)
                if moving:
                    live.changed.wait(STALLED_AFTER_S / 4)
                    continue
            for rival in rivals:  # outside live.lock: a rival commits holding its own lock, then live.lock
                if not rival.atomic:
                    self._commit(live, rival)  # what it wrote counts: a resumable client goes on from there
                rival.fence()

    def _receive(self, live: _Live, writer: _Writer, pieces: Iterable) -> None:
        # An upload of one request writes through the file it was created with: its id was made by the server
        # and is told to nobody before it is stored, so only this request can end it (and close that file).
        own = live.fd is None
        try:
            fd = self.backend.open_part(live.info.id) if own else live.fd
        except FileNotFoundError:
            if live.info.state is State.STORED:  # completed by another request meanwhile: nothing to write
                return _drain(pieces)
            raise Conflict("This upload expired or was removed; start it again.") from None
        except OSError as error:
            raise storage_error(error)
        try:
            self._wait_for_hash(live, writer)
            for piece in pieces:
                self._write_piece(live, writer, fd, piece)
                if writer.position - writer.committed_to >= COMMIT_EVERY and not writer.atomic:
                    self._commit(live, writer)
                if writer.position >= writer.next_space_check:
                    writer.next_space_check += SPACE_CHECK_EVERY
                    self.check_space(0)
                self._report_progress(live, writer)
        finally:
            if own:
                os.close(fd)

    def _wait_for_hash(self, live: _Live, writer: _Writer) -> None:
        """A part ahead of the in-order hash waits, before it reads its first byte, while the part before it
        moves and brings the hash here (``ahead_wait`` at most).  Its bytes meanwhile wait in the connection's
        buffers, and once the hash has come they are hashed from memory as they arrive instead of being written,
        then read back from the file to be hashed.  On a fast link (where the CPU is the limit) parts in flight
        are so read in order; on a slow one, or when the part before stalls, the wait ends soon and changes
        little (the connection's buffers go on filling meanwhile)."""
        if not writer.whole or self.limits.ahead_wait <= 0 or live.hashed_to >= writer.start:
            return
        deadline = time.monotonic() + self.limits.ahead_wait
        turn = writer.turn = threading.Event()   # only this writer is woken when the hash reaches it
        try:
            while live.hashed_to < writer.start and not writer.fenced and self._front_moving(live, writer):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                turn.wait(min(remaining, self.limits.front_stalled))
        finally:
            writer.turn = None
            writer.last_progress = time.monotonic()  # waiting for its turn is not stalling

    def _front_moving(self, live: _Live, writer: _Writer) -> bool:
        """Another request holds the bytes where the hash stands and moved within ``front_stalled`` (or waits
        for its own turn, which has come), or a thread is hashing received bytes from the file."""
        if live.background_hash:
            return True
        at, stalled = live.hashed_to, time.monotonic() - self.limits.front_stalled
        return any(w is not writer and not w.fenced and w.start <= at and (w.end is None or at < w.end)
                   and (w.turn is not None or w.last_progress > stalled) for w in tuple(live.writers))

    @staticmethod
    def _hash_moved(live: _Live) -> None:
        """Wake whoever waits for the hash: replies held back, and a part whose turn has come."""
        at = live.hashed_to
        for waiting in tuple(live.writers):
            turn = waiting.turn
            if turn is not None and waiting.start <= at:
                turn.set()
        with live.hash_progress:
            live.hash_progress.notify_all()

    def _write_piece(self, live: _Live, writer: _Writer, fd: int, piece) -> None:
        count = len(piece)
        if writer.end is not None and writer.position + count > writer.end:
            room = writer.end - writer.position
            if room:
                self._write_piece(live, writer, fd, piece[:room])
            raise TooManyBytes("The request carries more bytes than it announced.", count - room)
        if writer.position + count > self.limits.max_size:
            raise TooLarge(f"File too large: this server accepts up to {self.limits.max_size} bytes per file.")
        position = writer.position
        if writer.hasher is None and writer.whole and writer.start <= live.hashed_to <= position:
            self._join_hash(live, writer, fd)  # before the write: this piece is then hashed from memory
        with writer.lock:
            if writer.fenced:
                raise Superseded("A newer request took over these bytes of the upload.")
            try:
                with live.write_lock:
                    if writer.whole:
                        self.backend.write_at(fd, piece, position)
                    else:
                        self._write_holes(writer, fd, piece, position)
            except OSError as error:
                raise storage_error(error)
            writer.position = position + count
        if writer.hasher is not None:
            writer.hasher.update(piece)

    def _write_holes(self, writer: _Writer, fd: int, piece, position: int) -> None:
        """Write only the parts of ``piece`` that were not received before this request."""
        end = position + len(piece)
        view = memoryview(piece)
        for low, high in writer.holes:
            low, high = max(low, position), min(end if high is None else high, end)
            if low < high:
                self.backend.write_at(fd, view[low - position:high - position], low)

    def _join_hash(self, live: _Live, writer: _Writer, fd: int) -> None:
        """The in-order hash has reached this writer's bytes: catch up on those already written (read back
        once), then hash the rest as it arrives."""
        if not live.hash_lock.acquire(blocking=False):
            return
        try:
            if not writer.start <= live.hashed_to <= writer.position:
                return
            hasher = live.hasher.copy()
            writer.hash_from, writer.hash_epoch = live.hashed_to, live.hash_epoch
            self._hash_from_file(hasher, fd, live.hashed_to, writer.position)
            writer.hasher = hasher
        finally:
            live.hash_lock.release()

    def _hash_from_file(self, hasher, fd: int, start: int, end: int) -> None:
        try:
            self.backend.hash_range(hasher, fd, start, end)
        except (OSError, ValueError) as error:
            if isinstance(error, OSError):
                raise storage_error(error)
            raise StorageFailure("The partial file is shorter than expected.") from None

    def _report_progress(self, live: _Live, writer: _Writer) -> None:
        writer.last_progress = now = time.monotonic()
        if now >= writer.next_progress:
            writer.next_progress = now + PROGRESS_EVERY_S
            info = live.info
            self.events(Progress(info.id, info.name, info.received_bytes + live.in_flight(), info.size,
                                 info.created))

    # -- commit, settle ---------------------------------------------------------------------------------------
    def _commit(self, live: _Live, writer: _Writer) -> None:
        """Record the bytes ``writer`` wrote since its last commit; then let the hash move on over them."""
        with writer.lock:
            if writer.fenced or writer.position == writer.committed_to:
                return
            with live.lock:
                if live.info.state is not State.RECEIVING:  # stored meanwhile by another request
                    return
                info = live.info.changed(updated=self.clock(),
                                         received=add_range(live.info.received, writer.start, writer.position))
                if not live.ephemeral:
                    self._record(info)
                live.info = info
            writer.committed_to = writer.position
        self._adopt_hash(live, writer)

    def _adopt_hash(self, live: _Live, writer: _Writer) -> None:
        hasher = writer.hasher
        if hasher is not None:
            with live.hash_lock:
                if writer.hash_epoch == live.hash_epoch and writer.hash_from <= live.hashed_to < writer.committed_to:
                    live.hasher, live.hashed_to = hasher.copy(), writer.committed_to
            self._hash_moved(live)
        self._advance_hash(live)

    def _settle(self, live: _Live, writer: _Writer, failed: bool) -> None:
        """The request is over: keep what it wrote (unless fenced), and forget the writer."""
        try:
            if not (failed and live.ephemeral):
                self._commit(live, writer)
        except UploadError as error:
            log.error("could not record the bytes received for %s: %s", live.info.name, error.message)
        finally:
            with live.changed:
                live.writers.remove(writer)
                live.changed.notify_all()
        if failed and not writer.superseded and not writer.keep_if_empty:
            self._forget_if_empty(live)
        elif not failed:
            self._hold_back(live)

    def _hold_back(self, live: _Live) -> None:
        """Slow the client to the speed of the hash: while more than HASH_BACKLOG of received bytes wait to be
        hashed (parts came faster than one thread hashes them, or ahead of a slower part before them), this
        reply waits, so completing the file never has much left to hash.  It waits only while the hash moves
        (a client may send the part before them only once these are answered), RIVAL_WAIT_S at most."""
        deadline = time.monotonic() + RIVAL_WAIT_S
        with live.hash_progress:
            while (live.info.received_bytes - live.hashed_to > HASH_BACKLOG and self._hash_moving(live)
                   and time.monotonic() < deadline):
                live.hash_progress.wait(STALLED_AFTER_S / 4)

    @staticmethod
    def _hash_moving(live: _Live) -> bool:
        """The in-order hash is moving on: a thread hashes received bytes from the file, or a request at the
        hash's front hashes its bytes as they arrive and moved within the last STALLED_AFTER_S."""
        if live.background_hash:
            return True
        now = time.monotonic()
        return any(w.hasher is not None and not w.fenced and w.hash_from <= live.hashed_to
                   and now - w.last_progress < STALLED_AFTER_S for w in tuple(live.writers))

    def _forget_if_empty(self, live: _Live) -> None:
        """A failed request leaves nothing behind where nothing of its upload was received: a retry starts it
        again (an upload of one request has nothing to resume at all)."""
        upload_id = live.info.id
        with self._opening[hash(upload_id) % 64]:
            with live.lock:
                if live.writers or (live.info.received and not live.ephemeral) or self._live.get(upload_id) is not live:
                    return
            self.discard(upload_id)
            if not live.ephemeral:
                self._record(live.info.changed(state=State.FAILED, updated=self.clock(),
                                               reason="nothing of it arrived"))

    # -- the in-order hash ----------------------------------------------------------------------------------
    def _advance_hash(self, live: _Live, wait: bool = False) -> None:
        """Hash received bytes from the file where no writer is hashing them as they arrive.

        ``wait`` (completion): here and now, until every received byte is hashed.  Otherwise one background
        thread per upload does it, so no request's reply waits for bytes of other requests to be hashed.
        """
        if wait:
            return self._hash_now(live, trust_writers=False)
        with live.lock:
            if live.background_hash:
                live.hash_wanted = True  # the running thread looks again before it ends
                return
            if not self._hash_backlog(live):
                return
            live.background_hash = True
        threading.Thread(target=self._catch_up, args=(live,), name="pyfiledrop-hash", daemon=True).start()

    def _catch_up(self, live: _Live) -> None:
        try:
            while True:
                self._hash_now(live, trust_writers=True)
                with live.lock:
                    if not live.hash_wanted and not self._hash_backlog(live):
                        live.background_hash = False
                        break
                    live.hash_wanted = False
        except Exception as error:  # completion hashes what is left; only the head start is lost
            log.warning("hashing %s in the background failed: %s", live.info.name, error)
            with live.lock:
                live.background_hash = False
        with live.hash_progress:
            live.hash_progress.notify_all()

    def _hash_now(self, live: _Live, trust_writers: bool) -> None:
        """Hash the received prefix from the file, a window at a time (the lock is let go in between, so a
        writer handing over its own hash never waits long)."""
        fd = None
        try:
            while self._hash_backlog(live, trust_writers):
                with live.hash_lock:
                    end = min(prefix_end(live.info.received), live.hashed_to + HASH_WINDOW)
                    if not self._hash_backlog(live, trust_writers):
                        continue
                    if fd is None:
                        fd = os.open(self.backend.part_path(live.info.id), os.O_RDONLY | getattr(os, "O_BINARY", 0))
                    self._hash_from_file(live.hasher, fd, live.hashed_to, end)
                    live.hashed_to = end
                self._hash_moved(live)
        finally:
            if fd is not None:
                os.close(fd)

    @staticmethod
    def _hash_backlog(live: _Live, trust_writers: bool = True) -> bool:
        """Received bytes wait for the hash, and (``trust_writers``) no writer hashing as it goes will bring
        the hash over them."""
        if prefix_end(live.info.received) <= live.hashed_to:
            return False
        return not trust_writers or not any(w.hasher is not None and not w.fenced and w.hash_from <= live.hashed_to
                                            for w in tuple(live.writers))

    # -- size, finish -----------------------------------------------------------------------------------------
    def declare_size(self, upload_id: str, size: int) -> UploadInfo:
        """Fix the size of an upload created without one (a body of unknown length has ended)."""
        live = self._get_live(upload_id)
        if live is None:
            raise NotFound("No such upload.")
        if size > self.limits.max_size:
            raise TooLarge(f"File too large: this server accepts up to {self.limits.max_size} bytes per file.")
        with live.lock:
            info = live.info
            if info.size is not None and info.size != size:
                raise BadRequest("The upload's size was given before, and differently.")
            if info.received and info.received[-1][1] > size:
                raise BadRequest("More bytes were received than that size.")
            info = info.changed(size=size, part_size=max(1, size) if live.ephemeral else info.part_size)
            if not live.ephemeral:
                self._record(info)
            live.info = info
        return info

    def finish(self, upload_id: str) -> UploadInfo:
        """Store a fully received upload under its final name, exactly once; later calls answer the same."""
        live = self._get_live(upload_id)
        if live is None:
            return self._settled_info(upload_id)
        with live.finish_lock:
            if live.info.state is State.STORED:
                return live.info
            if not live.info.fully_received:
                raise Conflict("The upload is not complete: parts are missing.")
            with live.changed:  # writers that hashed as they wrote hand their hash over as they finish
                live.changed.wait_for(lambda: not any(w.hasher is not None and not w.fenced for w in live.writers),
                                      timeout=RIVAL_WAIT_S)
            self._advance_hash(live, wait=True)
            if live.hashed_to != live.info.size:
                raise StorageFailure("The server could not check the file.")
            self.checkpoint("hashed")
            digest = live.hasher.hexdigest()
            if live.info.client_sha256 not in (None, digest) and self._drop_damaged(live):
                return live.info
            info = self._store(live, digest)
        self._forget(upload_id)
        with self._lock:
            self.stored_count += 1
        self.events(Stored(info))
        return info

    def _drop_damaged(self, live: _Live) -> bool:
        """The file's hash is not the one its client sent (or none came): the parts whose checksums were kept
        are read back and checked, and those with other bytes are dropped, to be sent again (the hash starts
        over).  After a restart those checksums are unknown: everything is received again.  False when nothing
        is dropped: the client's file hash was wrong, and every part is as its own checksum says."""
        upload_id, everything = live.info.id, not live.unchecked_known
        if everything:
            damaged = list(live.info.received)
        else:
            damaged = [(start, end) for start, end, digest in live.unchecked
                       if not self.received_part_matches(upload_id, start, end, digest)]
        live.unchecked = [part for part in live.unchecked if part[:2] not in damaged]
        live.unchecked_known = True
        if not damaged:
            return False
        with live.lock:
            received = live.info.received
            for start, end in damaged:
                received = remove_range(received, start, end)
            info = live.info.changed(received=received, updated=self.clock())
            self._record(info)
            live.info = info
        with live.hash_lock:  # a writer hashing as it writes carries the damaged bytes in its copy: not adopted
            live.hasher, live.hashed_to, live.hash_epoch = hashlib.sha256(), 0, live.hash_epoch + 1
        parts = ", ".join(f"{start // info.part_size + 1}" for start, _ in damaged) if not everything else "all"
        self._notice(f'"{info.name}" is not the file its client hashed: part(s) {parts} of {info.total_parts} '
                     'dropped, to be sent again', warning=True)
        return True

    def _store(self, live: _Live, digest: str) -> UploadInfo:
        upload_id = live.info.id
        # An upload of one request was written whole through the file it was created with, moments ago: the
        # look at its size is for partial files that waited on disk between requests (one system call less
        # for every small file the page sends).
        if live.fd is None:
            stat = self.backend.part_stat(upload_id)
            if stat is None or stat.st_size != live.info.size:
                raise StorageFailure("The partial file does not have the declared size.")
        stored_name, reason = (live.linked_as, "") if live.linked_as else self._final_name(live.info, digest)
        live.linked_as = stored_name
        now = self.clock()
        with live.lock:  # from now on a late commit of another request sees the upload stored
            receiving = live.info
            info = live.info = receiving.changed(state=State.STORED, sha256=digest, reason=reason,
                                                 stored_name=stored_name, finished=now, updated=now)
            try:
                self._record(info)  # on failure the part stays linked: a retry of finish records the same name
            except UploadError:
                live.info = receiving
                if live.ephemeral:  # no retry of finish can come (its id is the server's): take the name back
                    self.backend.unstore(upload_id, stored_name)
                    live.linked_as = None
                raise
        self.checkpoint("recorded")
        self.backend.discard(upload_id)
        self.checkpoint("discarded")
        return info

    def received_part_matches(self, upload_id: str, start: int, end: int, sha256: bytes) -> bool:
        """Whether bytes [start, end), all received already, have this sha256 in the partial file (False only
        on a real difference: a part sent again with other content than the first time)."""
        live = self._get_live(upload_id)
        if live is None or range_holes(live.info.received, start, end):
            return True
        try:
            fd = self.backend.open_part(upload_id)
        except OSError:
            return True  # stored or gone meanwhile: put answers for that
        try:
            hasher = hashlib.sha256()
            self._hash_from_file(hasher, fd, start, end)
        finally:
            os.close(fd)
        return hmac.compare_digest(hasher.digest(), sha256)

    # -- content: the same bytes are stored once ---------------------------------------------------------------
    def find_content(self, sha256: str, size: int) -> UploadInfo | None:
        """A stored upload whose file has exactly these bytes, checked now by hashing that file again (a record
        alone is not trusted: the file may have been edited or replaced by hand since)."""
        if size <= 0 or not re.fullmatch(r"[0-9a-f]{64}", sha256):
            return None
        for info in self.ledger.stored_with(sha256, size, limit=3):
            try:
                if (os.stat(self.backend.stored_path(info.stored_name)).st_size == size
                        and self.backend.hash_stored(info.stored_name) == sha256):
                    return info
            except OSError:
                continue
        return None

    def _final_name(self, info: UploadInfo, digest: str) -> tuple[str, str]:
        """(the stored name, the ledger's reason): a stored file with these bytes linked under the upload's name,
        or else the complete partial file itself."""
        try:
            stored_name, reason = self._link_same_content(info, digest)
            return stored_name or self.backend.store(info.id, info.name, info.mtime), reason
        except OSError as error:
            raise storage_error(error)

    def _link_same_content(self, info: UploadInfo, digest: str) -> tuple[str | None, str]:
        """(the name, the ledger's reason) when a stored file with these bytes now also carries this upload's
        name; (None, "") when there is none, or this filesystem cannot link."""
        original = self.find_content(digest, info.size or 0)
        if original is None:
            return None, ""
        linked = self.backend.link_stored(original.stored_name, info.name)
        return (linked, f"same content as {original.stored_name}") if linked else (None, "")

    def complete_by_content(self, upload_id: str, sha256: str) -> UploadInfo | None:
        """The client knows its file's sha256: if a stored file has these bytes, the upload is stored at once
        under its own name as a link to that file (its partial file goes, writers still sending are fenced).
        None when no stored file has them; the upload then goes on as before."""
        live = self._get_live(upload_id)
        if live is None:
            return self._settled_info(upload_id)
        with live.finish_lock:
            if live.info.state is State.STORED:
                return live.info
            stored_name, reason = self._link_same_content(live.info, sha256)
            if stored_name is None:
                return None
            with self._opening[hash(upload_id) % 64]:  # a request arriving meanwhile finds the stored record
                info = self._stored_by_link(live, sha256, stored_name, reason)
                self._forget(upload_id)
            self.checkpoint("recorded")
            self.backend.discard(upload_id)
            self.checkpoint("discarded")
        with self._lock:
            self.stored_count += 1
        self.events(Stored(info))
        return info

    def _stored_by_link(self, live: _Live, sha256: str, stored_name: str, reason: str) -> UploadInfo:
        now = self.clock()
        with live.lock:
            receiving = live.info
            size = receiving.size or 0
            info = live.info = receiving.changed(state=State.STORED, sha256=sha256, reason=reason,
                                                 received=((0, size),), stored_name=stored_name, finished=now,
                                                 updated=now)
            try:
                self._record(info)
            except UploadError:
                live.info = receiving
                raise
        for writer in list(live.writers):  # outside live.lock: a writer commits holding its lock, then live.lock
            writer.fence()
        return info

    def receive_whole(self, name: str, pieces: Iterable, *, client: str, size: int | None = None,
                      upload_id: str | None = None) -> UploadInfo:
        """A file that arrives whole in one request (PUT, a multipart file): received, then stored."""
        if upload_id is None and size is not None and size <= SMALL_WHOLE:
            self._check_size(size)
            now = self.clock()
            claim = _SmallClaim(UploadInfo(id=new_upload_id(), name=name, size=size, part_size=max(1, size),
                                           client=client, created=now, updated=now))
            return self._receive_small(claim, pieces)   # nobody else knows the id: the claim is not shown
        return self.receive_in_steps(name, pieces, client=client, size=size, upload_id=upload_id)

    def receive_in_steps(self, name: str, pieces: Iterable, *, client: str, size: int | None = None,
                         upload_id: str | None = None) -> UploadInfo:
        """``receive_whole`` by the calls every engine has: create, put, declare_size, finish."""
        fresh = upload_id is None
        upload_id = upload_id or new_upload_id()
        self.create(upload_id, name, size=size, part_size=max(1, size or 0), client=client, ephemeral=True,
                    fresh=fresh)
        try:
            info = self.put(upload_id, 0, pieces, length=size)
            if info.size is None:
                info = self.declare_size(upload_id, info.received_bytes)
            if not info.fully_received:
                raise ClientDisconnected("The request body ended before the whole file arrived.")
            return self.finish(upload_id)
        except BaseException:
            self.discard(upload_id)  # unless stored: then it is no longer live, and this does nothing
            raise

    def receive_small(self, upload_id: str, name: str, pieces: Iterable, *, client: str, size: int,
                      part_size: int, mtime: float | None = None, sha256: bytes | None = None) -> UploadInfo | None:
        """A small file (``SMALL_WHOLE`` at most) in one request under the client's id (a file of one chunk):
        stored by ``_receive_small``'s short way while nothing is known under that id.  None, with nothing
        read, when something is (live, recorded, or another request on this way): the caller then takes the
        general steps, whose ``create`` takes over from a request here.  ``sha256``: the client's hash of the
        file; bytes without it are refused (ChecksumMismatch) and stored nowhere."""
        if size > SMALL_WHOLE:
            return None
        self._check_size(size)
        with self._opening[hash(upload_id) % 64]:
            if upload_id in self._live or upload_id in self._small or self.ledger.may_have_id(upload_id):
                return None
            now = self.clock()
            claim = _SmallClaim(UploadInfo(id=upload_id, name=name, size=size, part_size=part_size, client=client,
                                           created=now, updated=now, mtime=mtime))
            with self._lock:
                self._small[upload_id] = claim
        return self._receive_small(claim, pieces, sha256)

    def _receive_small(self, claim: _SmallClaim, pieces: Iterable, sha256: bytes | None = None) -> UploadInfo:
        """A small file of known size in one request: the general steps' work with none of their machinery for
        requests that share an upload (at many small files a second that machinery was a tenth of each file's
        CPU time).  Under a server's id no other request can know the upload; under a client's, ``claim`` is
        how a newer request takes over (``create``).  Nothing is recorded until the file is stored."""
        info, fd, stored = claim.info, None, False
        try:
            self.check_space(info.size)
            fd = self._new_part(info.id)
            hasher = self._write_small(claim, fd, pieces)
            if sha256 is not None:
                _verify(hasher, ("sha256", sha256))
            self.checkpoint("hashed")
            info = self._store_small(claim, hasher.hexdigest())
            stored = True
        finally:
            self._let_go_small(claim, fd, stored)
        with self._lock:
            self.stored_count += 1
        self.events(Stored(info))
        return info

    def _write_small(self, claim: _SmallClaim, fd: int, pieces: Iterable):
        """Write and hash ``info.size`` bytes of ``pieces`` from offset 0; their sha256."""
        info = claim.info
        hasher, position, next_progress = hashlib.sha256(), 0, 0.0
        for piece in pieces:
            count = len(piece)
            extra = position + count - info.size
            if extra > 0:
                raise TooManyBytes("The request carries more bytes than it announced.", extra)
            if claim.fenced:  # its partial file may no longer be the one under its id: its bytes go nowhere
                raise Superseded("A newer request took over this upload.")
            try:
                self.backend.write_at(fd, piece, position)
            except OSError as error:
                raise storage_error(error)
            hasher.update(piece)
            position += count
            claim.last_progress = now = time.monotonic()
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY_S
                self.events(Progress(info.id, info.name, position, info.size, info.created))
        if position != info.size:
            raise ClientDisconnected("The request body ended before the whole file arrived.")
        return hasher

    def _store_small(self, claim: _SmallClaim, digest: str) -> UploadInfo:
        """Link the received partial file under its name (or a stored file with its bytes), record it, remove the
        partial file: all while no newer request can fence this one."""
        with claim.lock:
            if claim.fenced:
                raise Superseded("A newer request took over this upload.")
            info = claim.info
            stored_name, reason = self._final_name(info, digest)
            now = self.clock()
            info = info.changed(state=State.STORED, sha256=digest, reason=reason, stored_name=stored_name,
                                received=((0, info.size),) if info.size else (), finished=now, updated=now)
            try:
                self._record(info)
            except UploadError:
                # A retry finds nothing recorded and starts again: the name goes, or it would be stored twice.
                self.backend.unstore(info.id, stored_name)
                raise
            claim.ended = True
            self.checkpoint("recorded")
            self.backend.discard(info.id)
        self.checkpoint("discarded")
        return info

    def _let_go_small(self, claim: _SmallClaim, fd: int | None, stored: bool) -> None:
        """The request of ``claim`` is over: its partial file goes unless stored (and then only while it is the
        one under its id: a newer request that fenced it makes its own), and a newer request waiting is told."""
        upload_id = claim.info.id
        try:
            if fd is not None and not stored:
                with self._opening[hash(upload_id) % 64]:
                    mine, there = os.fstat(fd), self.backend.part_stat(upload_id)
                    if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                        self.backend.discard(upload_id)
        finally:
            if fd is not None:
                os.close(fd)
            if not stored:  # a stored one was ended under its lock already
                with claim.lock:
                    claim.ended = True
            if claim.watched or self._small.get(upload_id) is claim:  # else never shown (a server's id)
                with self._lock:
                    if self._small.get(upload_id) is claim:
                        del self._small[upload_id]
                    if claim.watched:
                        self._small_ended.notify_all()

    def _take_over_small(self, claim: _SmallClaim) -> None:
        """Wait while the request of ``claim`` moves (RIVAL_WAIT_S at most, as ``_claim`` waits for a rival),
        then fence it: from then on it stores nothing, and the caller goes on alone."""
        deadline = time.monotonic() + RIVAL_WAIT_S
        with self._small_ended:
            claim.watched = True
            while not claim.ended and time.monotonic() - claim.last_progress < STALLED_AFTER_S and \
                    time.monotonic() < deadline:
                self._small_ended.wait(STALLED_AFTER_S / 4)
        with claim.lock:
            if not claim.ended:
                claim.fenced = True

    def read(self, upload_id: str) -> Iterator[memoryview]:
        """The bytes received of an unfinished upload, from its start (each block valid until the next)."""
        size = self.info(upload_id).received_bytes
        buffer = _take_buffer()
        try:
            with open(self.backend.part_path(upload_id), "rb", buffering=0) as handle:
                view = memoryview(buffer)
                while size and (count := handle.readinto(view[:min(len(view), size)])):
                    size -= count
                    yield view[:count]
        finally:
            _give_buffer(buffer)

    def discard(self, upload_id: str) -> None:
        """Forget an unfinished upload that will not go on; its partial file goes."""
        live = self._forget(upload_id)
        if live is not None and live.info.state is not State.STORED:
            self.backend.discard(upload_id)

    def abort(self, upload_id: str, reason: str = "cancelled") -> UploadInfo:
        """End an unfinished upload for good (the client cancelled it): requests still writing it are fenced,
        its partial file goes, its record stays as deleted.  A stored upload is answered as it is."""
        claim = self._small.get(upload_id)
        if claim is not None:
            with claim.lock:
                if not claim.ended:  # its request stores nothing now, and takes its partial file away
                    claim.fenced = True
                    return claim.info.changed(state=State.DELETED, updated=self.clock(), reason=reason)
        with self._opening[hash(upload_id) % 64]:
            live = self._live.get(upload_id) or self._resume(self.ledger.get(upload_id))
        if live is None:
            return self.info(upload_id)
        with live.finish_lock:
            with live.lock:
                if live.info.state is State.STORED:
                    return live.info
                info = live.info = live.info.changed(state=State.DELETED, updated=self.clock(),
                                                     reason=reason)
            for writer in list(live.writers):
                writer.fence()
            # Recorded before it is forgotten, under the id's stripe: a request meanwhile (one in flight at the
            # cancel) finds the record deleted, not the old receiving one to take up again.
            with self._opening[hash(upload_id) % 64]:
                if not live.ephemeral:
                    self._record(info)
                self._forget(upload_id)
            self.backend.discard(upload_id)
        return info

    def _forget(self, upload_id: str) -> _Live | None:
        with self._lock:
            live = self._live.pop(upload_id, None)
        if live is not None and live.fd is not None:
            fd, live.fd = live.fd, None
            os.close(fd)
        return live

    # -- expire ---------------------------------------------------------------------------------------------
    def finish_received(self) -> int:
        """Store the uploads whose every byte was recorded but that were not completed (the server stopped in
        between): their clients may never ask again (a tus client that sees its offset at the end is done).
        The number stored."""
        stored = 0
        for info in self.ledger.in_state(State.RECEIVING):
            if not info.fully_received:
                continue
            try:
                self.finish(info.id)
                stored += 1
            except UploadError as error:
                log.error('could not complete "%s", received whole before a stop: %s', info.name, error.message)
            except Exception:  # never let this end in a thread's traceback; the next request may complete it
                log.exception('could not complete "%s", received whole before a stop', info.name)
        return stored

    def expire(self, now: float | None = None) -> int:
        """Remove unfinished uploads untouched for ``partial_ttl`` seconds; their records stay, as expired."""
        cutoff = (self.clock() if now is None else now) - self.limits.partial_ttl
        removed = 0
        for info in self.ledger.in_state(State.RECEIVING, updated_before=cutoff):
            with self._opening[hash(info.id) % 64]:
                live = self._live.get(info.id)
                if live is not None and (live.writers or live.info.updated >= cutoff):
                    continue
                self._forget(info.id)
                self.backend.discard(info.id)
                self._record(info.changed(state=State.EXPIRED, updated=self.clock(),
                                          reason="untouched for too long"))
                removed += 1
        if removed:
            self._notice(f"removed {removed} unfinished upload(s) untouched for "
                         f"{self.limits.partial_ttl / 3600:g} hours")
        return removed + self._expire_stored(self.clock() if now is None else now)

    def _expire_stored(self, now: float) -> int:
        """Remove stored files kept ``stored_ttl`` seconds; their records stay, as expired."""
        if self.limits.stored_ttl is None:
            return 0
        removed = 0
        while due := self.ledger.select("state = 'stored' AND finished <= :cutoff",
                                        {"cutoff": now - self.limits.stored_ttl}, "finished", 500):
            for info in due:
                try:
                    self._remove_stored(info, State.EXPIRED, "kept for as long as --expire-after says")
                except Conflict as error:  # changed by hand: no longer only ours to remove
                    self._record(info.changed(state=State.EXPIRED, updated=self.clock(),
                                              reason=error.message))
                removed += 1
        if removed:
            self._notice(f"removed {removed} stored file(s) past --expire-after")
        return removed

    def _remove_stored(self, info: UploadInfo, state: State, reason: str) -> UploadInfo:
        """Unlink the stored file of ``info`` (unless another record stores under that name, or it was changed
        by hand: then Conflict) and record ``state``."""
        presence = storage_presence(self.backend, info, self.ledger.marks([info.id]).get(info.id))
        if presence == "changed":
            raise Conflict("The file was changed on the server since it was stored, so it was left in place.")
        shared = self.ledger.select("state = 'stored' AND COALESCE(stored_name, name) = :name AND id != :id",
                                    {"name": info.stored_name, "id": info.id}, "id", 1)
        if presence == "present" and not shared:
            try:
                _unlink_quietly(self.backend.stored_path(info.stored_name))
            except OSError as error:
                raise storage_error(error)
        self.checkpoint("removed")   # a stop here leaves a stored record of a missing file: removing it again ends it
        removed = info.changed(state=state, updated=self.clock(), reason=reason)
        self._record(removed)
        return removed

    def delete(self, upload_id: str) -> UploadInfo:
        """Remove an upload's bytes, stored (``_remove_stored``) or partial (``abort``: a request still sending it
        gets 409); the record stays, as deleted."""
        info = self.info(upload_id)
        if info.state is State.RECEIVING:
            info = self.abort(upload_id, "deleted on the files page")
        if info.state is State.STORED:  # or completed meanwhile
            return self._remove_stored(info, State.DELETED, "deleted on the files page")
        return info


def storage_presence(backend: LocalBackend, info: UploadInfo, mark: tuple[int, int, int, int] | None) -> str:
    """Whether a stored upload's file is still there as stored: "present", "missing" (removed by hand),
    "changed" (modified or replaced by hand: another size, or another inode or mtime than recorded when it was
    stored), or "" for an upload not stored."""
    if hasattr(backend, "presence"):  # an object store: the object's own metadata says
        return backend.presence(info)
    if info.state is not State.STORED or not info.stored_name:
        return ""
    try:
        found = os.lstat(backend.stored_path(info.stored_name))
    except OSError:
        return "missing"
    if not stat.S_ISREG(found.st_mode) or found.st_size != info.size:
        return "changed"
    if mark is not None and (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns) != mark:
        return "changed"
    return "present"


CHECKSUM_ALGORITHMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}


def _checksum_hasher(checksum: tuple[str, bytes] | None):
    if checksum is None:
        return None
    algorithm, digest = checksum
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise BadRequest(f"Unknown checksum algorithm {algorithm[:20]!r}; use sha1 or sha256.")
    hasher = CHECKSUM_ALGORITHMS[algorithm]()
    if len(digest) != hasher.digest_size:
        raise BadRequest(f"A {algorithm} checksum is {hasher.digest_size} bytes long.")
    return hasher


def _hashed(pieces: Iterable, hasher) -> Iterator:
    for piece in pieces:
        hasher.update(piece)
        yield piece


def _verify(hasher, checksum: tuple[str, bytes], raise_error: bool = True) -> bool:
    if hmac.compare_digest(hasher.digest(), checksum[1]):
        return True
    if raise_error:
        raise ChecksumMismatch("Checksum mismatch: these bytes were damaged on the way; send them again.")
    return False


def _check_same(info: UploadInfo, name: str, size: int | None, part_size: int) -> None:
    if (info.name, info.size, info.part_size) != (name, size, part_size):
        raise BadRequest("This upload id belongs to an upload with another name, size or chunk size.")


###############################################################################
# Recovery: ledger and disk agree again after a crash #########################
###############################################################################


def recover(ledger: Ledger, backend: LocalBackend, clock: Callable[[], float],
            notice: Callable[[str, bool], None]) -> int:
    """Make the ledger and the folders agree after a stop at any moment; the number of uploads set right.

    A partial file linked twice was stored under its final name, whether or not the record says so: the
    record is completed from the stored file.  Any other partial file without a receiving record, and any
    hidden copy in storage, is removed.  A receiving record whose partial file is gone has failed.
    """
    fixed = migrate_v1_folder(ledger, backend, clock, notice)
    for upload_id in backend.part_ids():
        if upload_id is not None:
            fixed += _reconcile_part(ledger, backend, clock, upload_id)
    for filename, upload_id in backend.temporaries():
        if upload_id is not None:
            fixed += _reconcile_part(ledger, backend, clock, upload_id)
        backend.remove_temporary(filename)
    for info in ledger.in_state(State.RECEIVING):
        if backend.part_stat(info.id) is None:
            ledger.save(info.changed(state=State.FAILED, updated=clock(),
                                     reason="its partial file disappeared"))
            fixed += 1
    if fixed:
        notice(f"set right {fixed} upload record(s) after an unclean stop", False)
    return fixed


def _reconcile_part(ledger: Ledger, backend: LocalBackend, clock: Callable[[], float], upload_id: str) -> int:
    info = ledger.get(upload_id)
    if info is not None and info.state is State.STORED:
        backend.discard(upload_id)  # stopped after the record, before the partial file went
        return 1
    linked = backend.find_stored(upload_id, info.name if info else None)
    if linked is not None:  # stopped after the link, before the record: the stored file is the upload
        size = os.path.getsize(backend.stored_path(linked))
        now = clock()
        base = info or UploadInfo(id=upload_id, name=linked, size=size, part_size=max(1, size), client="",
                                  created=now, updated=now)
        ledger.save(base.changed(size=size, state=State.STORED, received=((0, size),) if size else (),
                                 sha256=backend.hash_stored(linked), stored_name=linked, finished=now,
                                 updated=now))
        backend.discard(upload_id)
        return 1
    if info is None or info.state is not State.RECEIVING:
        backend.discard(upload_id)  # an upload of one request that never finished: nothing to resume
        return 1
    return 0


def migrate_v1_folder(ledger: Ledger, backend: LocalBackend, clock: Callable[[], float],
                      notice: Callable[[str, bool], None]) -> int:
    """Take a 1.0 chunks folder (``ID.part``, ``ID.state``, ``ID.done`` files) into the ledger."""
    try:
        names = sorted(os.listdir(backend.chunks), key=lambda name: not name.endswith(".done"))
    except FileNotFoundError:
        return 0
    migrated = 0
    for name in names:
        stem, _, suffix = name.partition(".")
        if suffix in ("done", "state"):
            migrated += _migrate_v1_record(ledger, backend, clock, notice, name)
    for name in names:  # 1.0's records, its temporary state files, and its partial files without a record
        stem, _, suffix = name.partition(".")
        if suffix in ("done", "state") or name.endswith(".tmp") or (suffix == "part" and _id_from_key(stem) is None):
            _unlink_quietly(backend.chunks / name)
    if migrated:
        notice(f"took {migrated} upload record(s) of pyfiledrop 1.0 into the ledger", False)
    return migrated


def _migrate_v1_record(ledger: Ledger, backend: LocalBackend, clock: Callable[[], float],
                       notice: Callable[[str, bool], None], name: str) -> int:
    stem, _, suffix = name.partition(".")
    try:
        record = json.loads((backend.chunks / name).read_text(encoding="utf-8"))
        info = (_v1_done if suffix == "done" else _v1_state)(record, clock)
    except (OSError, ValueError, KeyError, TypeError) as error:
        notice(f"a 1.0 upload record {name} is unreadable ({error}); it is left out", True)
        return 0
    if not is_valid_id(info.id) or ledger.get(info.id) is not None:
        return 0  # a 1.0 state file beside its own finished record: the record counts
    if suffix == "state":
        if not os.path.exists(backend.chunks / f"{stem}.part"):
            return 0
        os.replace(backend.chunks / f"{stem}.part", backend.part_path(info.id))
    ledger.save(info)
    return 1


def _v1_done(record: dict, clock: Callable[[], float]) -> UploadInfo:
    size, completed = int(record["size"]), float(record["completed"])
    return UploadInfo(id=str(record["id"]), name=str(record.get("original_name", record["name"])), size=size,
                      part_size=max(1, int(record.get("chunk_size") or size)), client="", created=completed,
                      updated=completed, state=State.STORED, received=((0, size),) if size else (),
                      sha256=str(record["sha256"]), stored_name=str(record["name"]), finished=completed)


def _v1_state(record: dict, clock: Callable[[], float]) -> UploadInfo:
    size, part_size = int(record["size"]), int(record["chunk_size"])
    bitmap = int.from_bytes(base64.b64decode(record["received"]), "little")
    received: Ranges = ()
    for index in range(int(record["total_chunks"])):
        if (bitmap >> index) & 1:
            start = index * part_size
            received = add_range(received, start, start + chunk_length(index, size, part_size))
    return UploadInfo(id=str(record["id"]), name=str(record["name"]), size=size, part_size=part_size,
                      client=str(record.get("client", "")), created=float(record["started"]), updated=clock(),
                      received=received)


###############################################################################
# Object store: S3 backend and engine #########################################
###############################################################################
# ``--s3 URL``: every byte and every record lives in an S3-compatible store, so any number of identical nodes
# behind a load balancer serve the same uploads and a node keeps nothing between requests.  In the store, under
# the URL's prefix:
#     NAME, a/b/NAME                       stored files (each one a completed multipart upload)
#     .pyfiledrop/uploads/ID.json          the record of an upload (written with If-None-Match / If-Match)
#     .pyfiledrop/staged/ID/PART/START-END bytes of a part not yet whole (S3 parts are 5 MiB at least)
#     .pyfiledrop/staged/ID/PART/merging   the claim of the node merging that part's pieces into it
#     .pyfiledrop/claims/NAME              a name taken by an upload still receiving
#     .pyfiledrop/sha256/SHA-SIZE/ID       stored content by hash (a tus sender's re-run skips what is there)
#     .pyfiledrop/session.json             the key signing login cookies, the same on every node
# What arrived is never written down separately: it is ListParts (entries for a re-sent part grouped by part
# number) plus the staged objects, listed in that order.

S3_META = ".pyfiledrop/"
S3_MIN_PART = 5 * MIB                 # S3's smallest part, but for the last one
S3_MAX_PARTS = 10_000
S3_MAX_KEY_BYTES = 1024               # S3's longest key, in UTF-8
S3_PART = 8 * MIB                     # the part grid of uploads that bring no grid of their own (tus, PUT)
# A file of one request with a known length streams into parts with nothing buffered, and each part ends with a
# wait for the store's answer: bigger parts wait less often (a body of unknown length keeps S3_PART, since it
# is buffered a part at a time).
S3_STREAMED_PART = 64 * MIB
S3_HASH_BLOCK = 1 * MIB


def s3_merge_claim_ttl(part_size: int) -> float:
    """Seconds after which a claim on merging a part of ``part_size`` bytes counts as left by a node that stopped
    mid-merge, so another node may take it over: a minute, and a second more per MiB (a merge reads the part once
    and sends it once, far faster on a working store).  Too early costs only a merge done twice, never bytes."""
    return 60.0 + part_size / MIB


class ServiceUnavailable(UploadError):
    status = 503
    headers = {"Retry-After": "5"}


@dataclasses.dataclass(frozen=True)
class S3Location:
    """``--s3 URL``: http(s)://HOST[:PORT]/BUCKET[/PREFIX]."""

    endpoint: str
    bucket: str
    prefix: str                       # "" or ending in "/"
    region: str

    @property
    def on_aws(self) -> bool:
        return urlsplit(self.endpoint).hostname.endswith(".amazonaws.com")

    def __str__(self) -> str:
        return f"{self.endpoint}/{self.bucket}/{self.prefix}"


def parse_s3_url(text: str, region: str | None = None) -> S3Location:
    """The store behind ``--s3``; ValueError with a reason for a URL that names none."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected http(s)://HOST[:PORT]/BUCKET[/PREFIX], got {text!r}")
    if parts.query or parts.fragment or parts.username:
        raise ValueError("the URL names the endpoint, bucket and prefix only (credentials come from the "
                         "environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or a profile)")
    bucket, _, prefix = unquote_to_bytes(parts.path).decode("utf-8", "replace").strip("/").partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"no bucket name in {text!r} (http(s)://HOST[:PORT]/BUCKET[/PREFIX])")
    prefix = "/".join(part for part in prefix.split("/") if part)
    if any(part in (".", "..") or part.startswith(".pyfiledrop") for part in prefix.split("/")):
        raise ValueError(f"the prefix {prefix!r} may not contain '.', '..' or .pyfiledrop")
    aws_region = re.fullmatch(r"s3[.-]([a-z0-9-]+)\.amazonaws\.com", parts.hostname)
    region = region or os.environ.get("AWS_REGION") or (aws_region.group(1) if aws_region else "us-east-1")
    return S3Location(f"{parts.scheme}://{parts.netloc}", bucket, prefix + "/" if prefix else "", region)


class S3StartError(RuntimeError):
    """The store cannot be used: one line for the console, and the start ends (exit status 2)."""


def open_object_store(location: S3Location, *, pool: int = 64) -> ObjectStore:
    """A client for the store, checked with HeadBucket; S3StartError with one clear line otherwise."""
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        raise S3StartError("--s3 needs boto3: pip install 'pyfiledrop[s3]' (or pip install boto3)") from None
    config = botocore.config.Config(
        region_name=location.region, max_pool_connections=pool, connect_timeout=5, read_timeout=60,
        retries={"max_attempts": 3, "mode": "standard"}, tcp_keepalive=True,
        # Bodies stream from the request: nothing to hash in advance or to rewind (TLS and the part's own
        # checks guard them on the way), and no checksum trailers a store may not know.
        request_checksum_calculation="when_required", response_checksum_validation="when_required",
        s3={"addressing_style": "virtual" if location.on_aws else "path", "payload_signing_enabled": False})
    client = boto3.session.Session().client("s3", endpoint_url=location.endpoint, config=config)
    store = ObjectStore(location, client, botocore.exceptions)
    store.check()
    return store


class ObjectStore:
    """The bucket under its prefix, through one thread-safe boto3 client; the store's failures as UploadErrors
    (503 while it cannot be reached, so a client retries and the upload resumes once it is back)."""

    def __init__(self, location: S3Location, client, exceptions):
        self.location = location
        self.bucket = location.bucket
        self.client = client
        self.errors = exceptions

    def key(self, name: str) -> str:
        return self.location.prefix + name

    def meta(self, name: str) -> str:
        return self.location.prefix + S3_META + name

    def check(self) -> None:
        where = f"bucket {self.bucket!r} at {self.location.endpoint}"
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self.errors.NoCredentialsError:
            raise S3StartError("no credentials for the object store: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)") from None
        except self.errors.ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise S3StartError(f"no {where}") from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise S3StartError(f"the object store refused these credentials for {where}") from None
            raise S3StartError(f"the object store answered {code} for {where}") from None
        except self.errors.BotoCoreError as error:
            raise S3StartError(f"cannot reach the object store at {self.location.endpoint}: {error}") from None

    @contextlib.contextmanager
    def guarded(self, what: str):
        """Store failures as a client should see them: what failed, never the store's own words or keys."""
        try:
            yield
        except self.errors.ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
            code = error.response.get("Error", {}).get("Code", "")
            log.warning("the object store refused to %s: %s %s", what, status, code)
            if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "RequestTimeout"):
                raise ServiceUnavailable("The object store is busy or unavailable; try again shortly.") from None
            raise StorageFailure("The object store refused to save the file.") from None
        except self.errors.BotoCoreError as error:
            log.warning("the object store could not %s: %s", what, error)
            raise ServiceUnavailable("The object store cannot be reached; try again shortly.") from None

    def code(self, error) -> str:
        return str(error.response.get("Error", {}).get("Code", "")) if isinstance(error, self.errors.ClientError) else ""

    # -- small objects --------------------------------------------------------------------------------------
    def get_json(self, key: str) -> tuple[dict, str, float] | None:
        """(object, ETag, last modified) of a small JSON object, None when there is none."""
        try:
            with self.guarded("read a record"):
                try:
                    reply = self.client.get_object(Bucket=self.bucket, Key=key)
                except self.errors.ClientError as error:
                    if self.code(error) in ("NoSuchKey", "404"):
                        return None
                    raise
                return json.loads(reply["Body"].read()), reply["ETag"], reply["LastModified"].timestamp()
        except ValueError:
            raise StorageFailure("A record in the object store is damaged.") from None

    def put_if(self, key: str, body: bytes, *, etag: str | None = None, **extra) -> str | None:
        """Write ``key`` only if it is still as read (``etag``), or absent (None); its new ETag, or None when the
        condition failed (another node wrote it first)."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        with self.guarded("write a record"):
            try:
                return self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **condition, **extra)["ETag"]
            except self.errors.ClientError as error:
                if self.code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey"):
                    return None  # (NoSuchKey: If-Match on an object removed meanwhile, as AWS answers it)
                raise

    def delete_if(self, key: str, etag: str) -> bool:
        """Remove ``key`` only if it is still as written (``etag``); False when it is not, or gone."""
        with self.guarded("remove an object"):
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
                return True
            except self.errors.ClientError as error:
                if self.code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict", "NoSuchKey", "404"):
                    return False
                raise

    def head(self, key: str) -> dict | None:
        with self.guarded("look up a file"):
            try:
                return self.client.head_object(Bucket=self.bucket, Key=key)
            except self.errors.ClientError as error:
                if self.code(error) in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise

    def delete(self, *keys: str) -> None:
        with self.guarded("remove an object"):
            for start in range(0, len(keys), 1000):
                objects = [{"Key": key} for key in keys[start:start + 1000]]
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})

    def listing(self, prefix: str, after: str | None = None) -> Iterator[dict]:
        """Every object under ``prefix`` (Key, Size, LastModified), page after page; only those after the key
        ``after`` when it is given."""
        with self.guarded("list objects"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, **({"StartAfter": after} if after else {}))
            for page in pages:
                yield from page.get("Contents", ())

    def folders(self, prefix: str) -> list[str]:
        """The names of the "folders" directly under ``prefix`` (common prefixes), hidden ones left out."""
        names = []
        with self.guarded("list folders"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix,
                                                                          Delimiter="/")
            for page in pages:
                names += [item["Prefix"][len(prefix):].rstrip("/") for item in page.get("CommonPrefixes", ())]
        return sorted(name for name in names if name and not name.startswith("."))

    # -- streams ----------------------------------------------------------------------------------------------
    def put_stream(self, key: str, body: _StreamBody, **extra) -> str:
        with self.guarded("save bytes"):
            try:
                return self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ContentLength=body.length,
                                              **extra)["ETag"]
            except Exception:
                body.raise_own()
                raise

    def upload_part(self, key: str, upload: str, number: int, body: _StreamBody) -> str:
        with self.guarded("save bytes"):
            try:
                return self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number,
                                               Body=body, ContentLength=body.length)["ETag"]
            except Exception:
                body.raise_own()
                raise

    def parts(self, key: str, upload: str, after: int = 0) -> dict[int, dict] | None:
        """The parts of a multipart upload numbered above ``after``, by number, each {"Size", "ETag", "Modified"}
        (a part sent twice is listed twice by some stores: the last entry counts); None when the upload is gone
        (completed or aborted)."""
        found: dict[int, dict] = {}
        with self.guarded("list parts"):
            try:
                pages = self.client.get_paginator("list_parts").paginate(Bucket=self.bucket, Key=key, UploadId=upload,
                                                                         PartNumberMarker=after)
                for page in pages:
                    for part in page.get("Parts", ()):
                        found[part["PartNumber"]] = {"Size": part["Size"], "ETag": part["ETag"],
                                                     "Modified": part["LastModified"].timestamp()}
            except self.errors.ClientError as error:
                if self.code(error) in ("NoSuchUpload", "404"):
                    return None
                raise
        return found

    def read(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The bytes [start, end) of an object, a block at a time."""
        with self.guarded("read a file"):
            span = f"bytes={start}-{'' if end is None else end - 1}"
            body = self.client.get_object(Bucket=self.bucket, Key=key, Range=span)["Body"]
            try:
                yield from body.iter_chunks(S3_HASH_BLOCK)
            finally:
                body.close()


class _StreamBody:
    """``length`` bytes of a request as a file-like body for boto3, read from the request's pieces as the store
    takes them: a bounded buffer, never the part.  A body of unknown length (``known`` False) is read into memory
    first, a part at most, since a part's size is sent before it.

    ``last``: these bytes end what the request announced, so before the final block goes out the request is
    checked for bytes beyond (TooManyBytes) and for its checksum (``check``: hasher, expected): a bad request
    then leaves no part.  The request may end early (the client vanished): ``raise_own`` raises that error, not
    the store client's complaint that it cannot rewind the stream to retry."""

    def __init__(self, source: _Pieces, length: int, *, known: bool = True, last: bool = False,
                 check: tuple = (None, None)):
        self.source = source
        self.error: BaseException | None = None
        self.sent = 0
        self.last = last and known
        self.check = check
        self.length, self._buffer = length, None
        if not known:
            self._buffer = source.take(length)
            self.length = len(self._buffer)

    def read(self, size: int = -1):
        """Up to ``size`` bytes, or more: the store client sends whatever it gets, and asked 16 KiB at a time
        it would spend a Python call on each.  A view of the request's buffer, valid until the next read."""
        left = self.length - self.sent
        want = left if size is None or size < 0 else min(max(size, READ_BLOCK), left)
        if want <= 0:
            return b""
        try:
            block = self._next(want)
            self.sent += len(block)
            if self.last and self.sent == self.length:
                block = bytes(block)  # the look beyond reads the next piece into the same buffer
                self._check_end()
        except BaseException as error:
            self.error = error
            raise
        return block

    def _next(self, want: int):
        if self._buffer is not None:
            return memoryview(self._buffer)[self.sent:self.sent + want]
        block = self.source.read(want)
        if not block:
            raise ClientDisconnected("The request body ended before the bytes it announced.")
        return block

    def _check_end(self) -> None:
        try:
            extra = self.source.extra()
            if extra:
                raise TooManyBytes("The request carries more bytes than it announced.", extra)
            if self.check[0] is not None:
                _verify(*self.check)
        except UploadError as error:
            self.error = error
            raise

    def raise_own(self) -> None:
        if self.error is not None:
            raise self.error


class _Pieces:
    """A request's pieces (memoryviews valid until the next) read as bytes, any amount at a time; hashed as
    they pass by the hashers given (the request's checksum, the file's sha256 when the bytes come in order)."""

    def __init__(self, pieces: Iterable, hashers: Iterable = ()):
        self._pieces = iter(pieces)
        self._left = memoryview(b"")
        self.hashers = [hasher for hasher in hashers if hasher is not None]
        self.count = 0

    def read(self, size: int) -> memoryview:
        """A view valid until the next read."""
        while not self._left:
            piece = next(self._pieces, None)
            if piece is None:
                return b""
            self._left = memoryview(piece)
        block = self._left[:size]
        self._left = self._left[len(block):]
        for hasher in self.hashers:
            hasher.update(block)
        self.count += len(block)
        return block

    def take(self, size: int) -> bytearray:
        """Up to ``size`` bytes (fewer only at the end of the body)."""
        taken = bytearray()
        while len(taken) < size and (block := self.read(size - len(taken))):
            taken += block
        return taken

    def extra(self) -> int:
        """How many bytes wait beyond what was read (a request that carries more than it announced)."""
        return len(self.read(MAX_FIELD_BYTES))


def s3_part_size(size: int | None, part_size: int, max_size: int) -> int:
    """The upload's S3 part grid: a whole number of the client's parts (so none straddles two S3 parts), at
    least S3's minimum, few enough for S3's 10,000 parts; S3_PART for uploads without a grid of their own."""
    if part_size >= (size or max_size) or part_size == 1:  # one request per file, or tus: no client grid
        return max(S3_PART, -(-(size or max_size) // S3_MAX_PARTS // MIB) * MIB)
    multiple = max(-(-S3_MIN_PART // part_size), -(-(size or 0) // (part_size * S3_MAX_PARTS)))
    return part_size * multiple


@dataclasses.dataclass
class _S3Upload:
    """An upload's record in the store (or, for an upload of one request, only in this node's memory)."""

    info: UploadInfo
    key: str                          # the claimed stored name (under the prefix)
    grid: int                         # S3 part size of this upload
    multipart: str | None = None      # the S3 upload id; None until the first bytes of a one-request upload
    etag: str | None = None           # of the record as last read or written
    ephemeral: bool = False
    parts: dict = dataclasses.field(default_factory=dict)   # one-request uploads: number -> ETag
    hasher: object = None             # one-request uploads: the file's sha256, as the bytes pass in order

    def to_json(self) -> bytes:
        info = {field.name: getattr(self.info, field.name) for field in dataclasses.fields(UploadInfo)}
        info.update(state=self.info.state.value, received=None)
        return json.dumps({"info": info, "key": self.key, "grid": self.grid, "multipart": self.multipart},
                          separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: dict, etag: str) -> _S3Upload:
        values = dict(data["info"], received=())
        values["state"] = State(values["state"])
        return cls(UploadInfo(**values), str(data["key"]), int(data["grid"]), data.get("multipart"), etag)

    def part_span(self, number: int) -> tuple[int, int]:
        """Bytes [start, end) of S3 part ``number`` (from 1)."""
        start = (number - 1) * self.grid
        return start, min(start + self.grid, self.info.size if self.info.size is not None else 1 << 62)


def _staged_span(key: str) -> tuple[int, int] | None:
    """[start, end) of a staged object from its key (``.../PART/START-END``)."""
    match = re.search(r"/([0-9]{1,19})-([0-9]{1,19})\Z", key)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _covers(spans: Iterable[tuple[int, int]], start: int, end: int) -> bool:
    ranges: Ranges = ()
    for low, high in spans:
        ranges = add_range(ranges, low, high)
    return not range_holes(ranges, start, end)


class NoSuchUpload(Exception):
    """The multipart upload is gone: completed or removed by another request."""


class S3Engine:
    """The engine's calls (create, put, offset, info, finish, abort, expire, list) over an object store, for the
    protocol adapters exactly as ``Engine`` serves them; nothing is kept on this node between requests.

    One upload is one S3 multipart upload at its final name, claimed when the upload is created.  Bytes stream
    from the request into UploadPart where a request brings a whole part, else into a staged object, merged into
    its part once the part is whole.  An upload of one request (PUT, a form's file, a one-chunk upload) is only
    in this node's memory until it is stored, and its sha256 is computed as its bytes pass; an upload of many
    requests is hashed by reading the stored object once, in the background (its sha256 is null until then).
    """

    def __init__(self, store: ObjectStore, limits: EngineLimits, *, clock: Callable[[], float] = time.time,
                 events: Callable[[EngineEvent], None] = lambda e: None,
                 checkpoint: Callable[[str], None] = lambda step: None):
        self.store = store
        self.limits = limits
        self.clock = clock
        self.events = events
        self.checkpoint = checkpoint
        self.ledger = S3Records(self)
        self.backend = S3Files(self)
        self._lock = threading.Lock()
        self._whole: dict[str, _S3Upload] = {}    # uploads of one request in flight on this node
        self._busy: dict[str, int] = {}           # uploads with a request running on this node (not to expire)
        self._hashing: set[str] = set()
        # One merge of a part at a time on this node: two requests that both found a part whole (the page sends
        # small parts six at a time) would otherwise both read its staged objects while the first removes them.
        self._merging = [threading.Lock() for _ in range(64)]
        self._settled: dict[str, _S3Upload] = {}  # records read that no longer change, by their ETag
        self._receiving: dict[str, _S3Upload] = {}  # records read of uploads receiving (their fixed fields)
        self._parts_seen: dict[str, dict[int, dict]] = {}  # whole parts seen of those uploads
        self.stored_count = 0
        self.recovered = 0

    # -- keys, records --------------------------------------------------------------------------------------
    def _record_key(self, upload_id: str) -> str:
        return self.store.meta(f"uploads/{upload_id}.json")

    def _staged_prefix(self, upload_id: str, number: int | None = None) -> str:
        return self.store.meta(f"staged/{upload_id}/" + ("" if number is None else f"{number:05d}/"))

    def _claim_key(self, name: str) -> str:
        return self.store.meta(f"claims/{name}")

    def _merge_claim_key(self, upload_id: str, number: int) -> str:
        """Among the part's staged objects (no span in its name), so whatever removes those removes it too."""
        return self._staged_prefix(upload_id, number) + "merging"

    def _load(self, upload_id: str, cached: bool = False) -> _S3Upload | None:
        """The upload's record as the store has it; ``cached``: as this node last read it while it was receiving
        (what create and put need of it never changes; a put to an upload that ended finds out from the store)."""
        whole = self._whole.get(upload_id) or (self._receiving.get(upload_id) if cached else None)
        if whole is not None:
            return whole
        found = self.store.get_json(self._record_key(upload_id))
        if found is None:
            return None
        data, etag, _ = found
        try:
            upload = _S3Upload.from_json(data, etag)
        except (KeyError, TypeError, ValueError):
            raise StorageFailure("A record in the object store is damaged.") from None
        self._remember(upload)
        return upload

    def _remember(self, upload: _S3Upload) -> None:
        with self._lock:
            if upload.info.state is not State.RECEIVING:
                self._receiving.pop(upload.info.id, None)
                self._parts_seen.pop(upload.info.id, None)
                return
            if len(self._receiving) > 10_000:  # a cache: forgetting costs a look-up
                self._receiving.clear()
                self._parts_seen.clear()
            self._receiving[upload.info.id] = upload

    def _known_parts(self, upload: _S3Upload, fresh: bool = False) -> dict[int, dict] | None:
        """The upload's whole parts: those this node saw before (a part never goes while its upload lives) and
        those listed after the first one it has not seen (PartNumberMarker), so a listing stays short however
        many parts the upload has.  ``fresh``: every part listed again (completion needs the last ETag of a part
        sent twice)."""
        with self._lock:
            seen = {} if fresh else dict(self._parts_seen.get(upload.info.id, {}))
        first_unseen = 1
        while first_unseen in seen:
            first_unseen += 1
        listed = self.store.parts(self.store.key(upload.key), upload.multipart, after=first_unseen - 1)
        if listed is None:
            return None
        for number, part in listed.items():
            start, end = upload.part_span(number)
            if part["Size"] == end - start:
                seen[number] = part
        with self._lock:
            if upload.info.id in self._receiving:
                self._parts_seen[upload.info.id] = seen
        return seen

    def _saw_part(self, upload: _S3Upload, number: int, size: int, etag: str) -> None:
        with self._lock:  # a new dict: other requests may be going through the one there now
            if upload.info.id in self._receiving:
                seen = dict(self._parts_seen.get(upload.info.id, {}))
                seen[number] = {"Size": size, "ETag": etag, "Modified": self.clock()}
                self._parts_seen[upload.info.id] = seen

    def _save(self, upload: _S3Upload) -> bool:
        """Write the record unless another node changed it since it was read (then False)."""
        etag = self.store.put_if(self._record_key(upload.info.id), upload.to_json(), etag=upload.etag,
                                 ContentType="application/json")
        if etag is None:
            return False
        upload.etag = etag
        return True

    def _change(self, upload_id: str, change: Callable[[_S3Upload], UploadInfo | None]) -> _S3Upload | None:
        """Apply ``change`` to the record (None: leave it) and write it; read again and retried when another
        node wrote it first, so two nodes never lose each other's change."""
        for _ in range(20):
            upload = self._load(upload_id)
            if upload is None:
                return None
            info = change(upload)
            if info is None:
                return upload
            upload.info = info
            if self._save(upload):
                self._remember(upload)
                return upload
        raise ServiceUnavailable("The upload's record keeps changing; try again.")

    @contextlib.contextmanager
    def _running(self, upload_id: str):
        with self._lock:
            self._busy[upload_id] = self._busy.get(upload_id, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[upload_id] -= 1
                if not self._busy[upload_id]:
                    del self._busy[upload_id]

    # -- names ----------------------------------------------------------------------------------------------
    def _claim_name(self, upload_id: str, name: str) -> str:
        """The first free name of ``name``'s numbered series, claimed for this upload until it is stored.

        The claim is written with If-None-Match: * before the object is looked for, and dropped only after the
        object exists, so at every moment a name in use has its object or its claim: two nodes never pick the
        same name, and a name with an object is never picked (CompleteMultipartUpload also says If-None-Match).
        """
        folder, leaf = split_folder(name)
        for number in range(MAX_NAME_ATTEMPTS):
            candidate = f"{folder}/{numbered_name(leaf, number)}" if folder else numbered_name(leaf, number)
            if self.store.put_if(self._claim_key(candidate), upload_id.encode()) is None:
                if self._claimed_by(candidate) == upload_id:
                    return candidate  # this upload's first requests on two nodes at once: one name for both
                continue  # another upload still receiving holds it
            if self.store.head(self.store.key(candidate)) is None:
                return candidate
            self.store.delete(self._claim_key(candidate))
        raise Conflict("Too many files with this name already.")

    def _claimed_by(self, name: str) -> str | None:
        try:
            return b"".join(self.store.read(self._claim_key(name))).decode("utf-8", "replace")
        except UploadError:   # dropped meanwhile
            return None

    def _begin(self, key: str, upload_id: str) -> str:
        with self.store.guarded("start an upload"):
            return self.store.client.create_multipart_upload(
                Bucket=self.store.bucket, Key=self.store.key(key), ContentType="application/octet-stream",
                Metadata={"pyfiledrop-id": upload_id})["UploadId"]

    def _release(self, upload: _S3Upload, *, abort: bool = True) -> None:
        """What an upload holds in the store besides its record: its multipart upload, staged parts, claim (the
        claim last: a leftover of a stop in between is found by the claim, see ``_sweep``)."""
        if abort:
            self._release_multipart(upload)
        if not upload.ephemeral:
            staged = [item["Key"] for item in self.store.listing(self._staged_prefix(upload.info.id))]
            self.store.delete(*staged)
        self.store.delete(self._claim_key(upload.key))

    # -- create -----------------------------------------------------------------------------------------------
    def create(self, upload_id: str, name: str, *, size: int | None, part_size: int, client: str,
               ephemeral: bool = False, fresh: bool = False, mtime: float | None = None) -> UploadInfo:
        """As ``Engine.create``; two nodes creating the same id at once end up with the one record written first."""
        if size is not None and size > self.limits.max_size:
            raise TooLarge(f"File too large: {size} bytes; this server accepts up to {self.limits.max_size} "
                           "bytes per file.")
        # Read afresh (put then uses what this read): an upload that ended on another node starts again here,
        # as with a folder, instead of being taken for one still receiving.
        existing = None if fresh else self._load(upload_id)
        if existing is not None and existing.info.state in (State.RECEIVING, State.STORED):
            _check_same(existing.info, name, size, part_size)
            return existing.info
        now = self.clock()
        info = UploadInfo(id=upload_id, name=name, size=size, part_size=part_size, client=client, created=now,
                          updated=now, mtime=mtime)
        grid = s3_part_size(size, part_size, self.limits.max_size)
        if ephemeral and size is not None:
            grid = max(grid, S3_STREAMED_PART)
        if ephemeral:
            upload = _S3Upload(info, "", grid, ephemeral=True, hasher=hashlib.sha256(),
                               etag=existing.etag if existing else None)
            with self._lock:
                self._whole[upload_id] = upload
            return info
        upload = _S3Upload(info, self._claim_name(upload_id, name), grid, etag=existing.etag if existing else None)
        try:
            upload.multipart = self._begin(upload.key, upload_id)
            saved = self._save(upload)
        except BaseException:
            self._release(upload)
            raise
        if saved:
            self._remember(upload)
            return info
        # Another node created it at the same moment: its record counts, and what it staged (its claim too, if it
        # is this name); only this node's own multipart upload goes.
        winner = self._load(upload_id)
        self._release_multipart(upload)
        if winner is None or winner.key != upload.key:
            self.store.delete(self._claim_key(upload.key))
        return self.create(upload_id, name, size=size, part_size=part_size, client=client, mtime=mtime)

    # -- what arrived -----------------------------------------------------------------------------------------
    def _received(self, upload: _S3Upload, *, staged: bool = True,
                  fresh: bool = False) -> tuple[UploadInfo, dict[int, dict], list[dict]]:
        """The upload with what arrived, from the store: (info, parts by number, staged objects).  Staged objects
        are listed before the parts: one merged and removed meanwhile is then among the parts.  ``staged``
        False: they are not looked for (after a chunk request on a grid where chunks are whole parts)."""
        info = upload.info
        if upload.ephemeral or info.state is not State.RECEIVING:
            return info, {}, []
        staged = list(self.store.listing(self._staged_prefix(info.id))) if staged else []
        parts = self._known_parts(upload, fresh)
        if parts is None:
            return self._multipart_gone(upload), {}, []
        received, updated = (), info.updated
        for number, part in parts.items():
            start, end = upload.part_span(number)
            if part["Size"] == end - start:
                received = add_range(received, start, end)
            updated = max(updated, part["Modified"])
        for item in staged:
            span = _staged_span(item["Key"])
            if span is not None and item["Size"] == span[1] - span[0]:
                received = add_range(received, *span)
            updated = max(updated, item["LastModified"].timestamp())
        return info.changed(received=received, updated=updated), parts, staged

    def _multipart_gone(self, upload: _S3Upload) -> UploadInfo:
        """The record says receiving but its multipart upload is gone: completed by a node that stopped before
        recording it (the object says so in its metadata), else removed."""
        head = self.store.head(self.store.key(upload.key))
        if head is not None and head.get("Metadata", {}).get("pyfiledrop-id") == upload.info.id:
            return self._stored(upload, None).info
        changed = self._change(upload.info.id, lambda current: dataclasses.replace(
            current.info, state=State.FAILED, updated=self.clock(), reason="its multipart upload disappeared")
            if current.info.state is State.RECEIVING else None)
        return changed.info if changed else upload.info

    # -- info, list, offset ------------------------------------------------------------------------------------
    def info(self, upload_id: str) -> UploadInfo:
        upload = self._load(upload_id) if is_valid_id(upload_id) else None
        if upload is None:
            raise NotFound("No such upload.")
        info = self._received(upload)[0]
        if info.state is State.STORED and info.sha256 is None:
            self._hash_later(upload)  # its node stopped before the hash was done: any node takes it up
        return info

    def offset(self, upload_id: str) -> int:
        info = self.info(upload_id)
        return info.size or 0 if info.state is State.STORED else prefix_end(info.received)

    def list(self, limit: int = 100, offset: int = 0) -> list[UploadInfo]:
        """Uploads, newest first, from the records in the store (every node lists every upload)."""
        uploads = sorted(self._records(), key=lambda upload: upload.info.created, reverse=True)
        return [self._received(upload)[0] for upload in uploads[offset:offset + limit]]

    def _records(self) -> list[_S3Upload]:
        """Every record; those that no longer change are read once per node (known by their ETag)."""
        found = []
        for item in self.store.listing(self.store.meta("uploads/")):
            cached = self._settled.get(item["ETag"])
            upload = cached or self._load(item["Key"].rsplit("/", 1)[-1][:-len(".json")])
            if upload is None:
                continue
            if upload.info.state is not State.RECEIVING and (upload.info.sha256 or upload.info.state is not State.STORED):
                if len(self._settled) > 100_000:  # a cache: forgetting costs a read
                    self._settled.clear()
                self._settled[upload.etag] = upload
            found.append(upload)
        return found

    receive_whole = Engine.receive_in_steps   # create, put, declare_size, finish: the same calls here

    def receive_small(self, *args, **kwargs) -> None:
        """Every upload under a client's id takes the general steps here (its claim is the object store's)."""
        return None

    def check_space(self, needed: int) -> None:
        """The store's capacity is its own business: it answers a write it cannot take."""

    def read(self, upload_id: str) -> Iterator[memoryview]:
        raise BadRequest("With an object store, send the chunk fields before the file in the form.")

    # -- put --------------------------------------------------------------------------------------------------
    def put(self, upload_id: str, offset: int, pieces: Iterable, *, length: int | None = None,
            atomic: bool = False, checksum: tuple[str, bytes] | None = None,
            keep_if_empty: bool = False, file_sha256: str | None = None) -> UploadInfo:
        """As ``Engine.put``, but each part's checksum is checked as it arrives (``file_sha256`` is not used).
        Every part is all or nothing (a request that breaks off keeps the parts it brought whole); with
        ``checksum`` no byte counts unless the request's bytes have that hash."""
        check = _checksum_hasher(checksum)
        upload = self._load(upload_id, cached=True)
        if upload is None:
            raise NotFound("No such upload.")
        with self._running(upload_id):
            if upload.ephemeral:
                return self._put_whole(upload, offset, pieces, length, (check, checksum))
            if upload.info.state is not State.RECEIVING:
                return self._answer_settled(upload, pieces, (check, checksum))
            size = upload.info.size
            end = offset + length if length is not None else size
            if offset < 0 or size is None or offset > size or end > size:
                raise BadRequest("Those bytes lie past the end of the file.")
            source = _Pieces(pieces, [check])
            staged: list[str] = []
            try:
                self._write_range(upload, offset, end, source, length is not None, (check, checksum), staged)
                if check is not None:
                    _verify(check, checksum)
            except (ChecksumMismatch, TooManyBytes):
                self.store.delete(*staged)  # none of this request counts
                raise
            except NoSuchUpload:
                return self._answer_settled(upload, pieces, (None, None))
            finally:
                try:
                    self._merge_whole_parts(upload, {self._number_of(key) for key in staged})
                except UploadError as error:  # done again by a later request, or by finish
                    log.info("merging parts of %s failed: %s", upload.info.name, error.message)
            info = self._received(upload, staged=bool(staged) or upload.grid != upload.info.part_size)[0]
            if info.state not in (State.RECEIVING, State.STORED):
                raise NotFound(f"{_GONE[info.state]} Start it again.")
            return info

    def _answer_settled(self, upload: _S3Upload, pieces: Iterable, check) -> UploadInfo:
        """A request for an upload that is stored (answered as it is, its bytes read and dropped) or ended."""
        info = upload.info
        if info.state is State.RECEIVING and not upload.ephemeral:
            info = self._received(self._load(info.id) or upload)[0]
        if info.state is not State.STORED:
            raise NotFound(f"{_GONE[info.state]} Start it again.")
        _drain(pieces)
        if check[0] is not None:
            _verify(*check)
        return info

    @staticmethod
    def _number_of(staged_key: str) -> int:
        return int(staged_key.rsplit("/", 2)[-2])

    def _write_range(self, upload: _S3Upload, start: int, end: int, source: _Pieces, known: bool, check,
                     staged: list[str]) -> None:
        """Bytes [start, end) of the request into the store, part by part: straight into UploadPart where the
        request brings the part whole, else as a staged object.  With a checksum, only a request within one part
        goes straight in (its last block is checked before it is sent, so a bad one leaves no part)."""
        one_part = start // upload.grid == max(start, end - 1) // upload.grid
        position = start
        while position < end:
            number = position // upload.grid + 1
            part_start, part_end = upload.part_span(number)
            stop = min(end, part_end)
            body = _StreamBody(source, stop - position, known=known, last=stop == end, check=check)
            if not body.length:
                return
            if (position, stop) == (part_start, part_end) and body.length == stop - position and \
                    (check[0] is None or (one_part and known)):
                self._saw_part(upload, number, body.length, self._upload_part(upload, number, body))
            else:
                key = self._staged_prefix(upload.info.id, number) + f"{position:015d}-{position + body.length:015d}"
                self.store.put_stream(key, body)
                staged.append(key)
            position += body.length
            self._progress(upload, position - start)
            if body.length < stop - position:
                return  # a body of unknown length ended

    def _upload_part(self, upload: _S3Upload, number: int, body: _StreamBody) -> str:
        try:
            return self.store.upload_part(self.store.key(upload.key), upload.multipart, number, body)
        except StorageFailure:
            if self.store.parts(self.store.key(upload.key), upload.multipart) is None:
                raise NoSuchUpload() from None  # completed or removed by another request meanwhile
            raise

    def _progress(self, upload: _S3Upload, sent: int) -> None:
        info = upload.info
        self.events(Progress(info.id, info.name, info.received_bytes + sent, info.size, info.created))

    def _merge_whole_parts(self, upload: _S3Upload, numbers: Iterable[int]) -> dict[int, str]:
        """Send each of these parts that is whole in staged objects as one S3 part, read back from them (their
        bytes never wait in a node between requests).  One merge of a part at a time: on this node a lock, between
        nodes the part's merge claim (``_claim_part``); a part another node is merging is left to it.  A merge that
        fails or is left is done again by a later request, or by finish."""
        merged = {}
        for number in sorted(numbers):
            with self._merging[hash((upload.info.id, number)) % 64]:  # listed inside: a merge just done left none
                if self._whole_segments(upload, number) is None:
                    continue
                claim = self._claim_part(upload, number)
                if claim is None:
                    continue
                try:
                    self.checkpoint("part-claimed")
                    # Listed again under the claim: a node that merged the part meanwhile removed its pieces.
                    segments = self._whole_segments(upload, number)
                    if segments is not None:
                        merged[number] = self._merge(upload, number, segments)
                except (UploadError, NoSuchUpload) as error:
                    log.info("merging part %d of %s failed (done again later): %s", number, upload.info.name,
                             getattr(error, "message", error))
                finally:
                    self._release_part_claim(upload, number, claim)
        return merged

    def _whole_segments(self, upload: _S3Upload, number: int) -> list[tuple[int, int, str]] | None:
        """The staged pieces of part ``number`` as (start, end, key), None unless they cover the whole part."""
        segments = []
        for item in self.store.listing(self._staged_prefix(upload.info.id, number)):
            span = _staged_span(item["Key"])
            if span is not None and item["Size"] == span[1] - span[0]:
                segments.append((*span, item["Key"]))
        part_start, part_end = upload.part_span(number)
        return segments if _covers(((low, high) for low, high, _ in segments), part_start, part_end) else None

    def _claim_part(self, upload: _S3Upload, number: int) -> str | None:
        """This node's claim on merging part ``number`` (its ETag), None while another node holds one.

        Written with If-None-Match: *, so of two nodes that find the part whole at once one merges it.  A claim
        older than ``s3_merge_claim_ttl`` was left by a node that stopped mid-merge: it is overwritten with
        If-Match: its ETag, so of two nodes taking it over one wins (each claim's body is unique, so is its ETag).
        """
        key = self._merge_claim_key(upload.info.id, number)
        body = json.dumps({"claim": uuid.uuid4().hex, "at": self.clock()}).encode()
        etag = self.store.put_if(key, body, ContentType="application/json")
        if etag is not None:
            return etag
        held = self.store.head(key)
        if held is None:  # released meanwhile: the part is merged, or free to merge
            return self.store.put_if(key, body, ContentType="application/json")
        if self.clock() - held["LastModified"].timestamp() < s3_merge_claim_ttl(upload.grid):
            return None
        log.warning("taking over the merge of part %d of %s from a node that stopped", number, upload.info.name)
        return self.store.put_if(key, body, etag=held["ETag"], ContentType="application/json")

    def _release_part_claim(self, upload: _S3Upload, number: int, etag: str) -> None:
        """Remove the claim if it is still this node's (If-Match): one taken over meanwhile stays its new owner's.
        A claim that cannot be removed now goes stale and is taken over, or goes with the upload's staged objects."""
        with contextlib.suppress(UploadError):
            self.store.delete_if(self._merge_claim_key(upload.info.id, number), etag)

    def _merge(self, upload: _S3Upload, number: int, segments: list[tuple[int, int, str]]) -> str:
        part_start, part_end = upload.part_span(number)

        def blocks() -> Iterator[bytes]:
            position = part_start
            for start, end, key in sorted(segments):
                if end > position:
                    yield from self.store.read(key, position - start, end - start)
                    position = end

        etag = self._upload_part(upload, number, _StreamBody(_Pieces(blocks()), part_end - part_start))
        self.store.delete(*(key for _, _, key in segments))  # after the part: its bytes are always somewhere
        return etag

    def _put_whole(self, upload: _S3Upload, offset: int, pieces: Iterable, length: int | None, check) -> UploadInfo:
        """An upload of one request: its bytes in order, part after part, hashed as they pass."""
        if upload.info.state is State.STORED:
            return self._answer_settled(upload, pieces, check)
        position = upload.info.received_bytes
        if offset != position or position % upload.grid:
            raise BadRequest("The bytes of a file sent in one request arrive in order.")
        end = offset + length if length is not None else None
        source = _Pieces(pieces, [upload.hasher, check[0]])
        while end is None or position < end:
            want = upload.grid if end is None else min(upload.grid, end - position)
            if end is None and position + want > self.limits.max_size:
                want = self.limits.max_size - position + 1  # one byte more tells a file too large
            body = _StreamBody(source, want, known=end is not None, last=end is not None and position + want == end,
                               check=check)
            if not body.length:
                break
            if position + body.length > self.limits.max_size:
                raise TooLarge(f"File too large: this server accepts up to {self.limits.max_size} bytes per file.")
            if upload.multipart is None:
                upload.key = self._claim_name(upload.info.id, upload.info.name)
                upload.multipart = self._begin(upload.key, upload.info.id)
            upload.parts[position // upload.grid + 1] = self._upload_part(upload, position // upload.grid + 1, body)
            position += body.length
            upload.info = upload.info.changed(received=((0, position),), updated=self.clock())
            self._progress(upload, 0)
            if body.length < want:
                break
        return upload.info


    # -- finish, end, expire ------------------------------------------------------------------------------
    def finish(self, upload_id: str) -> UploadInfo:
        """As ``Engine.finish``: the multipart upload completed at its claimed name, exactly once (a second node
        finishing at the same moment finds the object its own and answers the same)."""
        upload = self._load(upload_id)
        if upload is None:
            raise NotFound("No such upload.")
        if upload.ephemeral:
            return self._finish_whole(upload)
        info, parts, staged = self._received(upload, fresh=True)
        if info.state is State.STORED:
            return info
        if info.state is not State.RECEIVING:
            raise NotFound(f"{_GONE[info.state]} Start it again.")
        if not info.fully_received:
            raise Conflict("The upload is not complete: parts are missing.")
        etags = {number: part["ETag"] for number, part in parts.items()}
        missing = [number for number in range(1, -(-(info.size or 0) // upload.grid) + 1) if number not in etags]
        etags.update(self._merge_whole_parts(upload, missing))
        if any(number not in etags for number in missing):
            raise ServiceUnavailable("The last parts are not in the object store yet; try again shortly.")
        self.checkpoint("merged")
        # A node stopped between its CreateMultipartUpload and its record of this upload left one at this name,
        # and the claim that would let the sweep find it goes once this upload is stored: it goes now.
        self._abort_stale_multiparts(self.store.key(upload.key), {upload.multipart}, self.clock())
        self._complete(upload, etags)
        self.checkpoint("completed")
        return self._stored(upload, None).info


    def _complete(self, upload: _S3Upload, etags: dict[int, str]) -> None:
        """CompleteMultipartUpload with If-None-Match: * (an object that appeared at the name is never replaced);
        an empty file, which has no part, is a PutObject with the same condition."""
        key, store = self.store.key(upload.key), self.store
        with store.guarded("store the file"):
            try:
                if not etags:
                    store.client.put_object(Bucket=store.bucket, Key=key, Body=b"", IfNoneMatch="*",
                                            ContentType="application/octet-stream",
                                            Metadata={"pyfiledrop-id": upload.info.id})
                    self._release_multipart(upload)
                else:
                    store.client.complete_multipart_upload(
                        Bucket=store.bucket, Key=key, UploadId=upload.multipart, IfNoneMatch="*",
                        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in sorted(etags.items())]})
                return
            except store.errors.ClientError as error:
                code = store.code(error)
                if code not in ("NoSuchUpload", "PreconditionFailed", "404", "412"):
                    raise
        head = store.head(key)
        if head is not None and head.get("Metadata", {}).get("pyfiledrop-id") == upload.info.id:
            return  # completed by another request meanwhile
        if code in ("PreconditionFailed", "412"):
            raise Conflict(f'Another program put a file at "{upload.key}" in the object store meanwhile; '
                           "this upload is kept, unfinished.")
        raise NotFound("That upload was removed meanwhile. Start it again.")


    def _release_multipart(self, upload: _S3Upload) -> None:
        if not upload.multipart:
            return
        with self.store.guarded("remove an upload"):
            try:
                self.store.client.abort_multipart_upload(Bucket=self.store.bucket, Key=self.store.key(upload.key),
                                                         UploadId=upload.multipart)
            except self.store.errors.ClientError as error:
                if self.store.code(error) not in ("NoSuchUpload", "404"):
                    raise


    def _stored(self, upload: _S3Upload, sha256: str | None) -> _S3Upload:
        """Record an upload whose object is complete as stored; then its claim and staged leftovers go."""
        now = self.clock()
        was_stored = []

        def change(current: _S3Upload) -> UploadInfo | None:
            if current.info.state is State.STORED:
                was_stored.append(True)
                return None
            size = current.info.size if current.info.size is not None else upload.info.size
            return current.info.changed(state=State.STORED, size=size, sha256=sha256,
                                        stored_name=current.key, finished=now, updated=now,
                                        received=((0, size),) if size else ())

        if upload.ephemeral:
            upload.info = change(upload) or upload.info
            saved = self._save(upload) or self._save(dataclasses.replace(upload, etag=self._record_etag(upload)))
            if not saved:
                raise ServiceUnavailable("The upload's record could not be written; try again.")
            with self._lock:
                self._whole.pop(upload.info.id, None)
        else:
            upload = self._change(upload.info.id, change) or upload
        if was_stored:
            return upload
        self._release(upload, abort=False)
        with self._lock:
            self.stored_count += 1
        self.events(Stored(upload.info))
        if sha256 is None:
            self._hash_later(upload)
        else:
            self._index(upload.info)
        return upload


    def _record_etag(self, upload: _S3Upload) -> str | None:
        """The ETag of the record now under the upload's id (an earlier upload that used the same id and ended)."""
        found = self.store.get_json(self._record_key(upload.info.id))
        return found[1] if found else None


    def _finish_whole(self, upload: _S3Upload) -> UploadInfo:
        info = upload.info
        if info.state is State.STORED:
            return info
        if info.size is None or not info.fully_received:
            raise Conflict("The upload is not complete: parts are missing.")
        if upload.multipart is None:  # an empty file: no part was sent, so no name was claimed yet
            upload.key = self._claim_name(info.id, info.name)
        self._complete(upload, upload.parts)
        return self._stored(upload, upload.hasher.hexdigest()).info


    def abort(self, upload_id: str, reason: str = "cancelled") -> UploadInfo:
        """As ``Engine.abort``: the record says deleted first, then the multipart upload is aborted, so
        ListMultipartUploads keeps nothing of it (a stop in between is swept by its claim)."""
        upload = self._load(upload_id)
        if upload is None:
            raise NotFound("No such upload.")
        if upload.ephemeral:
            self.discard(upload_id)
            return upload.info.changed(state=State.DELETED, reason=reason)
        return self._end(upload, State.DELETED, reason).info


    def _end(self, upload: _S3Upload, state: State, reason: str) -> _S3Upload:
        ended = self._change(upload.info.id, lambda current: dataclasses.replace(
            current.info, state=state, updated=self.clock(), reason=reason)
            if current.info.state is State.RECEIVING else None) or upload
        if ended.info.state is state:
            self._release(ended)
        return ended


    def discard(self, upload_id: str) -> None:
        """Forget an upload of one request that will not go on: its multipart upload and claim go."""
        with self._lock:
            upload = self._whole.pop(upload_id, None)
        if upload is not None and upload.info.state is not State.STORED and upload.multipart:
            self._release(upload)


    def declare_size(self, upload_id: str, size: int) -> UploadInfo:
        upload = self._load(upload_id)
        if upload is None:
            raise NotFound("No such upload.")
        if size > self.limits.max_size:
            raise TooLarge(f"File too large: this server accepts up to {self.limits.max_size} bytes per file.")
        info = upload.info
        if info.size is not None and info.size != size:
            raise BadRequest("The upload's size was given before, and differently.")
        if info.received and info.received[-1][1] > size:
            raise BadRequest("More bytes were received than that size.")
        if not upload.ephemeral:
            return info
        upload.info = info.changed(size=size, part_size=max(1, size))
        return upload.info

    def finish_received(self) -> int:
        """Nothing to go through at start: a node keeps no list of uploads.  One whose every byte reached the
        store before a stop is completed by the next request about it (a tus HEAD, the page's status request)."""
        return 0

    def expire(self, now: float | None = None) -> int:
        """Uploads untouched for ``partial_ttl`` (by the times of their parts in the store) end as expired; then
        what was left behind by stopped nodes goes (see ``_sweep``)."""
        now = self.clock() if now is None else now
        cutoff = now - self.limits.partial_ttl
        receiving: dict[str, _S3Upload] = {}
        ended: set[str] = set()
        removed = 0
        for upload in self._records():
            if upload.info.state is not State.RECEIVING:
                ended.add(upload.info.id)
                continue
            info = self._received(upload)[0]
            if info.state is State.RECEIVING and info.updated < cutoff and upload.info.id not in self._busy:
                self._end(upload, State.EXPIRED, "untouched for too long")
                ended.add(upload.info.id)
                removed += 1
            elif info.state is State.RECEIVING:
                receiving[upload.info.id] = upload
            else:
                ended.add(upload.info.id)
        self._sweep(receiving, ended, cutoff)
        if removed:
            self.events(Notice(f"removed {removed} unfinished upload(s) untouched for "
                               f"{self.limits.partial_ttl / 3600:g} hours"))
        return removed


    def _sweep(self, receiving: dict[str, _S3Upload], ended: set[str], cutoff: float) -> None:
        """Leftovers of nodes that stopped mid-way: staged objects of uploads that ended (or of none, untouched
        since ``cutoff``: an upload created since the records were listed may be staging now), and claims (with
        the multipart uploads at their names) untouched since ``cutoff`` that belong to no upload receiving."""
        staged_prefix = self.store.meta("staged/")
        leftovers = []
        for item in self.store.listing(staged_prefix):
            owner = item["Key"][len(staged_prefix):].split("/", 1)[0]
            if owner in ended or (owner not in receiving and item["LastModified"].timestamp() < cutoff):
                leftovers.append(item["Key"])
        self.store.delete(*leftovers)
        with self._lock:
            whole = list(self._whole.values())
        live = {upload.multipart for upload in (*receiving.values(), *whole)}
        claims = self.store.meta("claims/")
        for item in self.store.listing(claims):
            if item["LastModified"].timestamp() >= cutoff:
                continue
            name = item["Key"][len(claims):]
            if any(upload.key == name for upload in receiving.values()):
                continue
            if self._abort_stale_multiparts(self.store.key(name), live, cutoff):
                self.store.delete(item["Key"])

    def _abort_stale_multiparts(self, key: str, live: set, cutoff: float) -> bool:
        """Abort the multipart uploads at ``key`` that no upload receiving owns and no part touched since
        ``cutoff``; False if one of them is still in use (its claim then stays)."""
        store = self.store
        with store.guarded("list uploads"):
            pages = store.client.get_paginator("list_multipart_uploads").paginate(Bucket=store.bucket, Prefix=key)
            uploads = [item for page in pages for item in page.get("Uploads", ()) if item["Key"] == key]
        idle = True
        for item in uploads:
            if item["UploadId"] in live:
                idle = False
                continue
            parts = store.parts(key, item["UploadId"]) or {}
            touched = max([item["Initiated"].timestamp(), *(part["Modified"] for part in parts.values())])
            if touched >= cutoff:
                idle = False
                continue
            self._release_multipart(_S3Upload(None, key[len(store.location.prefix):], 1, item["UploadId"]))
        return idle


    def _hash_later(self, upload: _S3Upload) -> None:
        """The sha256 of a stored upload of many requests: one read of the object, in the background."""
        with self._lock:
            if upload.info.id in self._hashing:
                return
            self._hashing.add(upload.info.id)
        threading.Thread(target=self._hash_stored, args=(upload,), name="pyfiledrop-s3-hash", daemon=True).start()


    def _hash_stored(self, upload: _S3Upload) -> None:
        try:
            digest = hashlib.sha256()
            for block in self.store.read(self.store.key(upload.key)):
                digest.update(block)
            sha256 = digest.hexdigest()
            changed = self._change(upload.info.id, lambda current: current.info.changed(sha256=sha256)
                                   if current.info.state is State.STORED and current.info.sha256 is None else None)
            if changed is not None:
                self._index(changed.info)
        except Exception as error:  # the next look at the upload, on any node, tries again
            log.warning("hashing %s in the object store failed: %s", upload.info.name, error)
        finally:
            with self._lock:
                self._hashing.discard(upload.info.id)


    def _index(self, info: UploadInfo) -> None:
        """A marker by content, so a sender's re-run finds the file stored (``S3Records.stored_with``)."""
        if info.sha256:
            with contextlib.suppress(UploadError):
                self.store.put_if(self.store.meta(f"sha256/{info.sha256}-{info.size}/{info.id}"), b"")


    def session_key(self) -> bytes:
        """The key that signs login cookies, one for every node: ``.pyfiledrop/session.json``, written once with
        If-None-Match (two nodes starting at once: the first one's key counts, the other reads it)."""
        key = self.store.meta("session.json")
        for _ in range(3):
            found = self.store.get_json(key)
            if found is not None and re.fullmatch(r"[0-9a-f]{64}", str(found[0].get("key"))):
                return bytes.fromhex(found[0]["key"])
            made = os.urandom(32)
            if self.store.put_if(key, json.dumps({"key": made.hex()}).encode(),
                                 etag=found[1] if found else None) is not None:
                return made
        raise StorageFailure("The login key in the object store cannot be read or written.")

    # -- what main's routes ask: part checks, content, the files page ------------------------------------------
    def received_part_matches(self, upload_id: str, start: int, end: int, sha256: bytes) -> bool:
        """As ``Engine.received_part_matches`` where the bytes can be read back: staged objects.  Bytes already in
        whole S3 parts cannot be (S3 reads no part of an open multipart upload), so they are not judged (True); a
        part sent again with a checksum replaces them only if the new bytes match it."""
        upload = self._load(upload_id, cached=True)
        if upload is None or upload.ephemeral or upload.info.state is not State.RECEIVING:
            return True
        info, _, staged = self._received(upload)
        if info.state is not State.RECEIVING or range_holes(info.received, start, end):
            return True
        pieces = sorted((span, item["Key"]) for item in staged
                        if (span := _staged_span(item["Key"])) and span[0] < end and span[1] > start)
        if not _covers((span for span, _ in pieces), start, end):
            return True
        hasher, position = hashlib.sha256(), start
        try:
            for (low, high), key in pieces:
                if high > position:
                    for block in self.store.read(key, position - low, min(high, end) - low):
                        hasher.update(block)
                    position = min(high, end)
        except UploadError:  # merged into its part meanwhile: no longer readable, not judged
            return True
        return hmac.compare_digest(hasher.digest(), sha256)

    def find_content(self, sha256: str, size: int) -> UploadInfo | None:
        """Dedup at finish is off with an object store (S3 has no links): never a match."""
        return None

    def complete_by_content(self, upload_id: str, sha256: str) -> UploadInfo | None:
        """Nothing is stored by content with an object store: the upload goes on (``find_content``)."""
        return None

    def delete(self, upload_id: str) -> UploadInfo:
        """As ``Engine.delete``: a receiving upload is aborted; a stored one's object is removed (only if it is
        still the one this upload stored: its metadata says so), then its record says deleted."""
        info = self.info(upload_id)
        if info.state is State.RECEIVING:
            info = self.abort(upload_id, "deleted on the files page")
        if info.state is not State.STORED:
            return info
        key = self.store.key(info.stored_name)
        head = self.store.head(key)
        if head is not None and head.get("Metadata", {}).get("pyfiledrop-id") != info.id:
            raise Conflict("Another object is at that name in the store now, so it was left in place.")
        index = [self.store.meta(f"sha256/{info.sha256}-{info.size}/{info.id}")] if info.sha256 else []
        self.store.delete(*([key] if head is not None else []), *index)
        self.checkpoint("removed")  # a stop here leaves a stored record of a missing object: deleting again ends it
        changed = self._change(upload_id, lambda current: dataclasses.replace(
            current.info, state=State.DELETED, updated=self.clock(), reason="deleted on the files page")
            if current.info.state is State.STORED else None)
        return changed.info if changed else self.info(upload_id)


class NotWithObjectStore(UploadError):
    """What needs a local folder or ledger (folders of the files page, renames) refused under ``--s3``."""

    status = 501


class S3Records:
    """What the adapters ask of the ledger, answered from the records in the store."""

    def __init__(self, engine: S3Engine):
        self.engine = engine

    def stored_with(self, sha256: str, size: int, limit: int = 100) -> list[UploadInfo]:
        found = []
        for item in self.engine.store.listing(self.engine.store.meta(f"sha256/{sha256}-{size}/")):
            upload = self.engine._load(item["Key"].rsplit("/", 1)[-1])
            if upload is not None and upload.info.state is State.STORED and len(found) < limit:
                found.append(upload.info)
        return sorted(found, key=lambda info: info.created, reverse=True)

    def select(self, where: str, arguments: Mapping, order: str = "created DESC, id DESC",
               limit: int = 100) -> list[UploadInfo]:
        """As ``Ledger.select``, over a snapshot of every record in the store (an in-memory SQLite of the
        ledger's schema), so the files page's filters, orders and pages are the same SQL as with a folder."""
        snapshot = Ledger(":memory:")
        try:
            snapshot.save(*(self.engine._received(upload)[0] for upload in self.engine._records()))
            return snapshot.select(where, arguments, order, limit)
        finally:
            snapshot.close()

    def marks(self, upload_ids: Iterable[str]) -> dict[str, tuple[int, int, int, int]]:
        """No inode marks in a store: an object's metadata names its upload instead (``S3Files.presence``)."""
        return {}

    def rename_folder(self, old: str, new: str) -> int:
        raise NotWithObjectStore("Folders cannot be renamed with --s3.")

    def close(self) -> None:
        """Nothing to close: every record is in the store."""


class S3Files:
    """What the adapters ask of the backend about stored files: there, their size, a download with Range."""

    def __init__(self, engine: S3Engine):
        self.engine = engine
        self.store = engine.store

    def part_stat(self, upload_id: str) -> dict | None:
        """Something (its record) while an upload can still receive, as a partial file's stat is; else None."""
        upload = self.engine._load(upload_id, cached=True)
        return None if upload is None or upload.info.state is not State.RECEIVING else {"id": upload_id}

    def presence(self, info: UploadInfo) -> str:
        """As ``storage_presence``: "present", "missing", "changed" (another object at the name, or another
        size), "" for an upload not stored."""
        if info.state is not State.STORED or not info.stored_name:
            return ""
        head = self.store.head(self.store.key(info.stored_name))
        if head is None:
            return "missing"
        if head.get("Metadata", {}).get("pyfiledrop-id") != info.id or head["ContentLength"] != info.size:
            return "changed"
        return "present"

    def folders(self, path: str) -> list[str]:
        """The folders directly in ``path`` ("a/b" or ""), from the store's common prefixes."""
        return self.store.folders(self.store.key(path + "/" if path else ""))

    def stored_exists(self, stored_name: str) -> bool:
        return self.store.head(self.store.key(stored_name)) is not None

    def stored_size(self, stored_name: str) -> int | None:
        head = self.store.head(self.store.key(stored_name))
        return None if head is None else head["ContentLength"]

    def download_response(self, info: UploadInfo, range_header: str | None) -> bottle.HTTPResponse:
        """The stored object, streamed from the store; one byte range (``Range``) answered with 206."""
        response = s3_object_response(self.store, self.store.key(info.stored_name), info.stored_name, range_header)
        if response is None:
            raise NotFound("That file is no longer on the server.")
        return response


def s3_object_response(store: ObjectStore, key: str, name: str, range_header: str | None) -> bottle.HTTPResponse | None:
    """The object at ``key`` as a download named ``name``, streamed from the store; one byte range (``Range``)
    answered with 206; None when there is no such object."""
    head = store.head(key)
    if head is None:
        return None
    size = head["ContentLength"]
    spans = list(bottle.parse_range_header(range_header, size)) if range_header else []
    if range_header and range_header.startswith("bytes=") and not spans:
        response = plain_response(416, "That range is not in the file.")
        response.set_header("Content-Range", f"bytes */{size}")
        return response
    start, end = spans[0] if spans else (0, size)
    response = bottle.HTTPResponse(store.read(key, start, end) if end > start else b"", status=206 if spans else 200)
    response.set_header("Content-Length", str(end - start))
    if spans:
        response.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
    response.set_header("Accept-Ranges", "bytes")
    response.set_header("Content-Type", "application/octet-stream")
    response.set_header("Last-Modified", formatdate(head["LastModified"].timestamp(), usegmt=True))
    response.set_header("Content-Disposition", content_disposition(name))
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
    return response


def open_s3_engine(config: Config, *, events: Callable[[EngineEvent], None] = lambda event: None,
                   checkpoint: Callable[[str], None] = lambda step: None,
                   clock: Callable[[], float] = time.time) -> S3Engine:
    """The engine over the object store of ``--s3``; S3StartError when it cannot be used."""
    store = open_object_store(config.s3)
    limits = EngineLimits(config.max_size_bytes, 0, config.partial_ttl_seconds)
    return S3Engine(store, limits, events=events, checkpoint=checkpoint, clock=clock)


###############################################################################
# Protocol adapters: HTTP requests into engine calls ##########################
###############################################################################


def request_body(environ: dict, length: int | None) -> Iterator[memoryview]:
    """The request body, read into one reused buffer: each block is valid until the next one is asked for.

    ``length`` None: a body of unknown length (chunked), read until the server says it ended.
    """
    body = _BodyReader(environ, length)
    buffer = _take_buffer()
    try:
        view = memoryview(buffer)
        while count := body.readinto(view):
            yield view[:count]
    finally:
        _give_buffer(buffer)


def content_length(environ: dict) -> int | None:
    """The announced body length; None for a chunked body, whose end the server finds."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return None
    text = (environ.get("CONTENT_LENGTH") or "0").strip()
    if not _UINT_RE.match(text):
        raise BadRequest("Content-Length must be a whole number.")
    return int(text)


@dataclasses.dataclass
class FormField:
    name: str
    value: str


@dataclasses.dataclass
class FilePart:
    name: str
    filename: str
    data: Iterator[bytes]
    expect: Callable[[int], None] = lambda length: None   # "the data is this long": it is then not searched


_buffer_pool: list = []
_buffer_pool_lock = threading.Lock()


def _take_buffer():
    """A READ_BLOCK buffer.  Anonymous memory: pages cost memory only once bytes land in them, so a request
    that trickles costs a page, not a MiB."""
    with _buffer_pool_lock:
        if _buffer_pool:
            return _buffer_pool.pop()
    return mmap.mmap(-1, READ_BLOCK)


def _give_buffer(buffer) -> None:
    with _buffer_pool_lock:
        if len(_buffer_pool) < 16:
            _buffer_pool.append(buffer)


class _BodyReader:
    """A request body from the server's ``wsgi.input``: ``readinto`` straight into our buffer where it can."""

    def __init__(self, environ: dict, length: int | None):
        stream = environ["wsgi.input"]
        self.remaining = length
        self._readinto = getattr(stream, "readinto", None)
        self._read = stream.read

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` (up to what is left of the body); 0 only once the body is all read."""
        if self.remaining is not None:
            view = view[:self.remaining]
            if not view:
                return 0
        try:
            if self._readinto is not None:
                count = self._readinto(view) or 0
            else:
                block = self._read(len(view))
                count = len(block)
                view[:count] = block
        except (OSError, ValueError):
            raise ClientDisconnected("The connection broke while the file was being received.") from None
        if self.remaining is not None:
            if not count:
                raise ClientDisconnected("The request body ended before its Content-Length.")
            self.remaining -= count
        return count


_PLAIN_FORM_TYPE_RE = re.compile(r"multipart/form-data;[ \t]*boundary=([0-9A-Za-z_\-.]{1,70})\Z")


def multipart_boundary(content_type: str) -> str:
    """The boundary of a multipart/form-data Content-Type ("" for any other type), as werkzeug reads it: one
    match for the form browsers and curl send."""
    plain = _PLAIN_FORM_TYPE_RE.match(content_type)
    if plain is not None:
        return plain.group(1)
    mimetype, options = parse_options_header(content_type)
    return options.get("boundary", "") if mimetype == "multipart/form-data" else ""


def multipart_parts(environ: dict, length: int | None) -> Iterator[FormField | FilePart]:
    """Stream a multipart/form-data body part by part; a file part's data is read as the caller consumes it."""
    boundary = multipart_boundary(environ.get("CONTENT_TYPE", ""))
    if not boundary or len(boundary) > 200:
        raise BadRequest("Expected a multipart/form-data body with a file part.")
    try:
        boundary_bytes = boundary.encode("latin-1")
    except UnicodeEncodeError:
        raise BadRequest("The multipart boundary is not ASCII.") from None
    # Own scanner (bytes.find over one reusable buffer filled with readinto): a file part's data reaches the
    # caller as memoryview slices of that buffer, without werkzeug's per-block copies.  Each slice is valid
    # until the next one is requested.
    reader = _MultipartReader(_BodyReader(environ, length), boundary_bytes)
    try:
        reader.skip_preamble()
        while True:
            for name, text in reader.plain_fields():
                yield FormField(name, text)
            part = reader.next_part()
            if part is None:
                return
            name, filename = part
            if filename is None:
                value = bytearray()
                for piece in reader.part_data():
                    value += piece
                    if len(value) > MAX_FIELD_BYTES:
                        raise BadRequest(f"Form field {name!r} is too long.")
                try:
                    text = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise BadRequest(f"Form field {name!r} is not UTF-8.") from None
                yield FormField(name, text)
            else:
                data = reader.part_data()
                yield FilePart(name, filename, data, reader.expect)
                _drain(data)
    finally:
        reader.close()


_MALFORMED = "The multipart body is malformed."


def _at(buffer, offset: int, prefix: bytes) -> bool:
    return buffer[offset:offset + len(prefix)] == prefix


_PART_HEADER_LIMIT = 16 * 1024
_MAX_PADDING = 64
# The header block every browser and curl sends for a form part: one Content-Disposition with a quoted name
# and maybe a quoted filename (no backslash, quote, line break or % inside: browsers percent-encode the first
# three, and werkzeug decodes that), then
# lines such as Content-Type.  Read with one match; anything else (folded lines, filename*=, escapes, a second
# disposition) goes through werkzeug as before.
_PLAIN_DISPOSITION_RE = re.compile(
    rb'content-disposition:[ \t]*form-data;[ \t]*name="([^"\\\r\n%]*)"(?:;[ \t]*filename="([^"\\\r\n%]*)")?[ \t]*'
    rb'(?:\r\n(?!content-disposition)[!-9;-~][ -~\t]*)*\Z', re.IGNORECASE)


# A form field as browsers send it, boundary line to the CRLF that starts the next delimiter: a value of one
# line after a Content-Disposition with a plain name and nothing else.  Fields of the chunk protocol are read
# with one match each (seven parts a chunk: the general scanner costs a third of a chunk request's work).
# The lookahead asks for the next delimiter of the same boundary, whole ("--b7" is no delimiter of "b"): the
# value's line must end there, not at a line break inside the value.
_PLAIN_FIELD_RE = re.compile(
    rb'--([0-9A-Za-z_\-.]{1,200})\r\nContent-Disposition: form-data; name="([^"\\\r\n%]*)"\r\n\r\n([^\r\n]*)\r\n'
    rb'(?=--\1(?:--|[ \t]{0,' + str(_MAX_PADDING).encode() + rb'}\r\n))')


def _part_names(raw: bytes) -> tuple[str, str | None]:
    """(name, filename or None) from a part's header block, as werkzeug's decoder reads it."""
    plain = _PLAIN_DISPOSITION_RE.match(raw)
    if plain is not None:
        try:
            name, filename = plain.group(1).decode(), plain.group(2)
            return name, None if filename is None else filename.decode()
        except UnicodeDecodeError:
            raise BadRequest(_MALFORMED) from None
    return _part_names_in_full(raw)


def _part_names_in_full(raw: bytes) -> tuple[str, str | None]:
    try:
        lines = re.sub(rb"\r\n[ \t]+", b" ", raw).split(b"\r\n")
        disposition = ""
        for line in lines:
            key, _, value = line.strip().decode().partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value.strip()
    except UnicodeDecodeError:
        raise BadRequest(_MALFORMED) from None
    _, options = parse_options_header(disposition)
    return options.get("name", ""), options.get("filename")


class _MultipartReader:
    """A small streaming multipart/form-data scanner over one reusable buffer."""

    def __init__(self, body: _BodyReader, boundary: bytes):
        self.body = body
        self.buf = _take_buffer()
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.dash_boundary = b"--" + boundary
        self.delimiter = b"\r\n--" + boundary
        self.parts = 0
        self.closed = False
        self.expected: int | None = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            _give_buffer(self.buf)

    def _fill(self) -> bool:
        """Move the unread bytes to the front and read more after them; False at the end of the body."""
        if self.closed:
            raise BadRequest(_MALFORMED)
        if self.start:
            left = self.end - self.start
            if left:
                self.view[:left] = bytes(self.view[self.start:self.end])
            self.start, self.end = 0, left
        if self.end == len(self.buf):
            raise BadRequest(_MALFORMED)
        count = self.body.readinto(self.view[self.end:])
        self.end += count
        return count > 0

    def _need(self, count: int) -> None:
        while self.end - self.start < count:
            if not self._fill():
                raise BadRequest(_MALFORMED)

    def skip_preamble(self) -> None:
        self._need(len(self.dash_boundary))
        if _at(self.buf, self.start, self.dash_boundary):
            return
        skipped = 0
        while True:
            found = self.buf.find(self.delimiter, self.start, self.end)
            if found >= 0:
                self.start = found + 2
                return
            keep = max(self.start, self.end - len(self.delimiter) + 1)
            skipped += keep - self.start
            self.start = keep
            if skipped > _PART_HEADER_LIMIT or not self._fill():
                raise BadRequest(_MALFORMED)

    def plain_fields(self) -> list[tuple[str, str]]:
        """At a boundary: the form fields from here that are plainly written and already in the buffer, read;
        the reader is then at the boundary after them.  The rest is left to ``next_part``."""
        fields = []
        boundary, buf, end = self.dash_boundary[2:], self.buf, self.end
        while (match := _PLAIN_FIELD_RE.match(buf, self.start, end)) is not None:
            seen, name, value = match.groups()
            if seen != boundary:
                break
            if self.parts >= MAX_FORM_PARTS:
                raise BadRequest(_MALFORMED)
            try:
                name = name.decode()
            except UnicodeDecodeError:
                raise BadRequest(_MALFORMED) from None
            if len(value) > MAX_FIELD_BYTES:
                raise BadRequest(f"Form field {name!r} is too long.")
            try:
                fields.append((name, value.decode("utf-8")))
            except UnicodeDecodeError:
                raise BadRequest(f"Form field {name!r} is not UTF-8.") from None
            self.parts += 1
            self.start = match.end()
        return fields

    def next_part(self) -> tuple[str, str | None] | None:
        """At a boundary: the next part's (name, filename), its headers read; None at the closing one."""
        length = len(self.dash_boundary)
        self._need(length + 2)
        if _at(self.buf, self.start + length, b"--"):
            self.start += length + 2
            return None
        pad = length
        while True:
            self._need(pad + 2)
            if self.buf[self.start + pad] in (32, 9) and pad < length + _MAX_PADDING:
                pad += 1
                continue
            if not _at(self.buf, self.start + pad, b"\r\n"):
                raise BadRequest(_MALFORMED)
            break
        self.start += pad  # at the CRLF that ends the boundary line
        self.parts += 1
        if self.parts > MAX_FORM_PARTS:
            raise BadRequest(_MALFORMED)
        while True:
            found = self.buf.find(b"\r\n\r\n", self.start, self.end)
            if found >= 0:
                break
            if self.end - self.start > _PART_HEADER_LIMIT or not self._fill():
                raise BadRequest(_MALFORMED)
        raw = bytes(self.view[self.start + 2:found]) if found > self.start else b""
        self.start = found + 4
        return _part_names(raw)

    def _delimiter_ends(self, at: int) -> bool | None:
        """Whether the boundary candidate ending at ``at`` is a delimiter; None when more bytes are needed."""
        buf, end = self.buf, self.end
        if end - at < 2:
            return None
        if _at(buf, at, b"--"):
            return True
        pad = at
        while pad < end and buf[pad] in (32, 9):
            pad += 1
            if pad - at > _MAX_PADDING:
                return False
        if end - pad < 2:
            return None
        return _at(buf, pad, b"\r\n")

    def expect(self, length: int) -> None:
        """The next part's data should be ``length`` bytes: they are passed on without a search for the
        boundary, which is then looked for right after them (and searched for as usual if it is not there)."""
        self.expected = length

    def _fits(self, length: int) -> bool:
        remaining = self.body.remaining
        return remaining is not None and self.end - self.start + remaining >= length + len(self.delimiter) + 4

    def _known_length(self, length: int) -> Iterator[memoryview]:
        while length:
            if self.start == self.end and not self._fill():
                raise BadRequest(_MALFORMED)
            take = min(length, self.end - self.start)
            yield self.view[self.start:self.start + take]
            self.start += take
            length -= take

    def _delimiter_here(self) -> bool:
        try:
            self._need(len(self.delimiter) + 2)
        except BadRequest:
            return False
        if not _at(self.buf, self.start, self.delimiter) or not self._delimiter_ends(self.start + len(self.delimiter)):
            return False
        self.start += 2
        return True

    def part_data(self) -> Iterator[memoryview]:
        """The current part's data as slices of the buffer; stops at (and leaves the reader on) the boundary."""
        expected, self.expected = self.expected, None
        if expected is not None and self._fits(expected):
            yield from self._known_length(expected)
            if self._delimiter_here():
                return
        delimiter = self.delimiter
        tail = len(delimiter) - 1
        while True:
            found = self.buf.find(delimiter, self.start, self.end)
            if found >= 0:
                ends = self._delimiter_ends(found + len(delimiter))
                if ends:
                    if found > self.start:
                        yield self.view[self.start:found]
                    self.start = found + 2
                    return
                if ends is False:  # boundary-like bytes inside the data
                    yield self.view[self.start:found + 1]
                    self.start = found + 1
                    continue
                if found > self.start:
                    yield self.view[self.start:found]
                    self.start = found
            else:
                keep = self.end - tail
                if keep > self.start:
                    yield self.view[self.start:keep]
                    self.start = keep
            if not self._fill():
                raise BadRequest(_MALFORMED)


def completed_reply(info: UploadInfo) -> dict:
    return {"id": info.id, "name": info.stored_name, "size": info.size, "sha256": info.sha256, "complete": True}


def status_reply(engine: Engine, upload_id: str) -> dict:
    """``GET /api/uploads/ID``: what is missing of an upload, or what was stored."""
    info = engine.info(upload_id) if is_valid_id(upload_id) else None
    if info is None or info.state not in (State.RECEIVING, State.STORED):
        raise NotFound("No such upload." if info is None else _GONE[info.state])
    if info.state is State.STORED:
        return {**completed_reply(info), "available": engine.backend.stored_exists(info.stored_name),
                "expires": iso_time(stored_expiry(engine, info))}
    if info.fully_received:  # stopped after the last part, before completion: complete it now
        return {**completed_reply(engine.finish(upload_id)), "available": True}
    return {"id": info.id, "complete": False, "name": info.name, "size": info.size,
            "received_chunks": info.received_parts(), "total_chunks": info.total_parts,
            "missing_chunks": info.missing_parts(1000)}


MAX_STATUS_IDS = 1000
MAX_JSON_BYTES = 128 * 1024


def read_json(environ: dict, limit: int = MAX_JSON_BYTES) -> dict:
    """A small JSON object request body; BadRequest for anything else (too long, not JSON, not an object).

    Content-Type must say JSON: another site's page can make a browser send a form (text/plain) here without
    asking, but not a JSON body (that needs a CORS preflight, which this server never grants)."""
    if parse_options_header(environ.get("CONTENT_TYPE", ""))[0] != "application/json":
        raise BadRequest("Send the request as JSON (Content-Type: application/json).")
    length = content_length(environ)
    if length is None or length > limit:
        raise BadRequest(f"Send a JSON body of at most {limit} bytes, with a Content-Length.")
    body = bytearray()
    for piece in request_body(environ, length):
        body += piece
    try:
        value = json.loads(bytes(body).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: nested a thousand levels deep
        raise BadRequest("The body is not JSON.") from None
    if not isinstance(value, dict):
        raise BadRequest("The body must be a JSON object.")
    return value


def status_many(engine: Engine, request: dict) -> dict:
    """``POST /api/uploads/status`` {"ids": [...]}: ``status_reply`` of each, in one request (a page that
    remembers 500 files asks once); an id the server does not know, or no longer has, answers {"gone": why}."""
    ids = request.get("ids")
    if not isinstance(ids, list) or len(ids) > MAX_STATUS_IDS or not all(isinstance(i, str) for i in ids):
        raise BadRequest(f"Send {{\"ids\": [...]}} with at most {MAX_STATUS_IDS} upload ids.")
    replies: dict[str, dict] = {}
    for upload_id in dict.fromkeys(ids):
        try:
            replies[upload_id] = status_reply(engine, upload_id)
        except NotFound as error:
            replies[upload_id] = {"id": upload_id, "gone": error.message}
    return {"uploads": replies}


def cancel_reply(engine: Engine, upload_id: str, client: str) -> dict:
    """``POST /api/uploads/ID/cancel``: an unfinished upload stops for good and its partial file goes.

    Only from the address that started it: a page's upload ids come from its files (see the README), so
    someone else holding the same file could name it.  A stored upload is not touched (that is the admin's
    DELETE)."""
    info = engine.info(upload_id) if is_valid_id(upload_id) else None
    if info is None:
        raise NotFound("No such upload.")
    if info.state is State.RECEIVING:
        if info.client and info.client != client:
            raise Forbidden("Only the device that started this upload can cancel it.")
        info = engine.abort(upload_id, "cancelled by the client")
    return {"id": info.id, "state": info.state.value, "cancelled": info.state is State.DELETED}


def content_reply(engine: Engine, upload_id: str, request: dict, client: str, allowed: bool) -> dict:
    """``POST /api/uploads/ID/content`` {"sha256", "name", "path", "size", "chunk_size", "mtime"}: the page
    knows its file's whole hash; when a stored file has those bytes the upload is stored at once as a link to
    it (nothing more is sent).  {"complete": false} otherwise, and the page goes on sending."""
    if not is_valid_id(upload_id):
        raise BadRequest(f"An upload id is 1 to {MAX_ID_LENGTH} letters, digits or '-'.")
    sha256 = parse_sha256_hex(str(request.get("sha256", "")), "sha256").hex()
    size, part_size = request.get("size"), request.get("chunk_size")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (size, part_size)) \
            or not 1 <= part_size <= MAX_CHUNK_SIZE or chunk_count(size, part_size) > MAX_CHUNK_COUNT:
        raise BadRequest("size and chunk_size must be whole numbers, as in the chunk fields.")
    if not allowed or size == 0:
        return {"id": upload_id, "complete": False}
    mtime = parse_mtime_ms(str(request["mtime"])) if request.get("mtime") is not None else None
    name = sanitize_relative_path(str(request.get("path") or request.get("name") or ""))
    with _Subject(name):
        engine.create(upload_id, name, size=size, part_size=part_size, client=client, mtime=mtime)
        info = engine.complete_by_content(upload_id, sha256)
    if info is None or info.state is not State.STORED:
        return {"id": upload_id, "complete": False}
    return {**completed_reply(info), "same_as": info.reason.removeprefix("same content as ") or None}


MAX_VERIFY_PARTS = 64


def verify_reply(engine: Engine, upload_id: str, request: dict) -> dict:
    """``POST /api/uploads/ID/verify`` {"parts": {"INDEX": "SHA256", ...}}: which of these parts, received
    before, hold other bytes than the client's (its file is not the one that upload came from).  The page
    asks this of every part it skips because the server has it, so a resumed upload is checked part by part
    without sending them again; parts not received yet are not judged."""
    info = engine.info(upload_id) if is_valid_id(upload_id) else None
    parts = request.get("parts")
    if info is None:
        raise NotFound("No such upload.")
    if not isinstance(parts, dict) or len(parts) > MAX_VERIFY_PARTS:
        raise BadRequest(f'Send {{"parts": {{"INDEX": "SHA256", ...}}}} with at most {MAX_VERIFY_PARTS} parts.')
    mismatched = []
    for key, digest in parts.items():
        if not _UINT_RE.match(str(key)) or int(key) >= info.total_parts:
            raise BadRequest("A part index must be a whole number within the upload.")
        index, expected = int(key), parse_sha256_hex(str(digest), "sha256")
        start = index * info.part_size
        end = start + chunk_length(index, info.size or 0, info.part_size)
        if info.state is State.RECEIVING and not engine.received_part_matches(upload_id, start, end, expected):
            mismatched.append(index)
    return {"id": upload_id, "mismatched": sorted(mismatched)}


class _Subject:
    """Names the file an error is about, for the console's line."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, UploadError) and not getattr(error, "subject", ""):
            error.subject = self.name


def receive_chunk(engine: Engine, chunk: ChunkInfo, filename: str, data: Iterable, client: str,
                  extras: ChunkExtras = ChunkExtras()) -> dict:
    """One Dropzone chunk: the bytes of part ``chunk.index`` of upload ``chunk.upload_id``."""
    name = extras.path or sanitize_filename(filename)
    checksum = ("sha256", extras.part_sha256) if extras.part_sha256 is not None else None
    with _Subject(name):
        if chunk.total_chunks == 1:
            info = _receive_one_chunk(engine, chunk, name, data, client, extras)
            if info is not None:
                return completed_reply(info)
        info = engine.create(chunk.upload_id, name, size=chunk.total_size, part_size=chunk.chunk_size,
                             client=client, ephemeral=chunk.total_chunks == 1, mtime=extras.mtime)
        if info.state is State.RECEIVING and checksum is not None and info.part_received(chunk.index) and \
                not engine.received_part_matches(chunk.upload_id, chunk.offset, chunk.offset + chunk.length,
                                                 checksum[1]):
            raise ChecksumMismatch(f"Part {chunk.index} was received before with other bytes: this is not the "
                                   "same file (start it under another id).")
        if info.state is State.RECEIVING:
            counted = _Counted(data)
            try:
                info = engine.put(chunk.upload_id, chunk.offset, counted, length=chunk.length, atomic=True,
                                  checksum=checksum, file_sha256=extras.file_sha256)
            except TooManyBytes as error:
                raise _overrun(engine, chunk, error, data) from None
        if info.state is State.RECEIVING and not info.part_received(chunk.index):
            if chunk.total_chunks == 1:
                engine.discard(chunk.upload_id)
            raise BadRequest(f"Chunk {chunk.index} has {counted.count} bytes; expected {chunk.length}.")
        if info.state is State.RECEIVING and info.fully_received:
            info = engine.finish(chunk.upload_id)
        if info.state is State.STORED:
            return completed_reply(info)
        return {"id": info.id, "complete": False, "received_chunks": info.received_parts(),
                "total_chunks": info.total_parts}


def _receive_one_chunk(engine: Engine, chunk: ChunkInfo, name: str, data: Iterable, client: str,
                       extras: ChunkExtras) -> UploadInfo | None:
    """A file of one chunk by the engine's short way (``receive_small``); None, nothing read, when its id is
    known there and the general steps answer it."""
    counted = _Counted(data)
    try:
        return engine.receive_small(chunk.upload_id, name, counted, client=client, size=chunk.total_size,
                                    part_size=chunk.chunk_size, mtime=extras.mtime, sha256=extras.part_sha256)
    except TooManyBytes as error:
        raise _overrun(engine, chunk, error, data) from None
    except ClientDisconnected:
        if counted.ended:  # its part ended early (the boundary came): the client's count is wrong
            raise BadRequest(f"Chunk {chunk.index} has {counted.count} bytes; expected {chunk.length}.") from None
        raise


def _overrun(engine: Engine, chunk: ChunkInfo, error: TooManyBytes, data: Iterable) -> UploadError:
    """The error for a chunk with more bytes than its fields say (the rest is read to tell how many)."""
    seen = chunk.length + error.extra + _Counted(data).drain(engine.limits.max_size)
    if chunk.offset + seen > engine.limits.max_size:
        return TooLarge(f"File too large: this server accepts up to {engine.limits.max_size} bytes per file.")
    return BadRequest(f"Chunk {chunk.index} has {seen} bytes; expected {chunk.length}.")


def receive_put(engine: Engine, environ: dict, client: str) -> dict:
    """``PUT /upload/NAME`` or ``/upload/FOLDER/.../NAME``: the body is the file; of unknown length when chunked.

    Folders in the path are kept under storage, each sanitised like a file name (an encoded slash is one too).
    """
    # Bottle re-decodes PATH_INFO as UTF-8, dropping what is not; the raw path keeps every byte.
    raw = environ.get("bottle.raw_path", environ.get("PATH_INFO", "")).encode("latin-1").split(b"/", 2)[-1]
    name = sanitize_relative_path(raw.decode("utf-8", errors="replace"))
    with _Subject(name):
        length = content_length(environ)
        info = engine.receive_whole(name, request_body(environ, length), client=client, size=length)
        return completed_reply(info)


def receive_form(engine: Engine, environ: dict, client: str) -> dict:
    """A multipart POST: one Dropzone chunk, or one or more whole files (stored once the body has ended)."""
    length = content_length(environ)
    fields: dict[str, str] = {}
    spooled: list[tuple[str, str]] = []   # (upload id, file name) of whole files received, not yet stored
    chunk_reply: dict | None = None
    try:
        for part in multipart_parts(environ, length):
            if isinstance(part, FormField):
                if part.name in fields and part.name in DZ_FIELDS and fields[part.name] != part.value:
                    raise BadRequest(f"Field {part.name} is given twice.")
                fields[part.name] = part.value
                continue
            with _Subject(sanitize_filename(part.filename)):
                chunk = parse_chunk_fields(fields, engine.limits.max_size)
                if chunk_reply is not None or (chunk is not None and spooled):
                    raise BadRequest("A chunk request carries exactly one file.")
                if chunk is not None:
                    part.expect(chunk.length)
                    chunk_reply = receive_chunk(engine, chunk, part.filename, part.data, client,
                                                parse_chunk_extras(fields))
                elif part.filename or _has_bytes(part):
                    if not spooled:
                        engine.check_space(length or 0)
                    spooled.append((_spool(engine, part, client), part.filename))
        if chunk_reply is not None:
            return chunk_reply
        chunk = parse_chunk_fields(fields, engine.limits.max_size)
        if chunk is not None:  # the chunk fields came after the file part: the spooled file is the chunk
            if len(spooled) != 1:
                raise BadRequest("A chunk request carries exactly one file.")
            return receive_chunk(engine, chunk, spooled[0][1], engine.read(spooled[0][0]), client,
                                 parse_chunk_extras(fields))
        if not spooled:
            raise BadRequest("No file in the request: send it as a multipart part named 'file'.")
        replies = [completed_reply(_store_spooled(engine, upload_id)) for upload_id, _ in spooled]
        return {**replies[0], "files": replies} if len(replies) == 1 else {"files": replies}
    finally:
        for upload_id, _ in spooled:
            engine.discard(upload_id)  # those not stored: the request failed


def _spool(engine: Engine, part: FilePart, client: str) -> str:
    """Receive a whole file of a form; stored by ``_store_spooled`` once the form has ended well."""
    upload_id, name = new_upload_id(), sanitize_filename(part.filename)
    with _Subject(name):
        engine.create(upload_id, name, size=None, part_size=1, client=client, ephemeral=True, fresh=True)
        engine.put(upload_id, 0, part.data)
    return upload_id


def _store_spooled(engine: Engine, upload_id: str) -> UploadInfo:
    info = engine.info(upload_id)
    with _Subject(info.name):
        engine.declare_size(upload_id, info.received_bytes)
        return engine.finish(upload_id)


class _Counted:
    """The pieces of ``data``, counted as they pass."""

    def __init__(self, data: Iterable):
        self.data = iter(data)
        self.count = 0
        self.ended = False   # the pieces came to their end (rather than an error)

    def __iter__(self):
        for piece in self.data:
            self.count += len(piece)
            yield piece
        self.ended = True

    def drain(self, enough: int) -> int:
        """Read on (dropping the bytes) until the end or ``enough`` bytes; how many were read."""
        for _ in self:
            if self.count >= enough:
                break
        return self.count


def _drain(data: Iterable) -> None:
    for _ in data:
        pass


def _has_bytes(part: FilePart) -> bool:
    """An HTML form's empty file input (no name, no bytes) is no file."""
    first = next(part.data, None)
    if first is None:
        return False
    part.data = itertools.chain([first], part.data)
    return True


###############################################################################
# Protocol adapters: tus 1.0 ##################################################
###############################################################################
# tus (tus.io) is the open protocol for resumable uploads: a POST creates an upload at the server's address,
# PATCH requests append at its current offset, HEAD tells the offset after any failure.  Each request becomes
# engine calls: create, put at the offset (non-atomic, so an interrupted PATCH keeps what arrived), finish.

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,expiration,checksum,termination"
TUS_CONTENT_TYPE = "application/offset+octet-stream"
TUS_HEADERS = {"Tus-Resumable": TUS_VERSION}
MAX_TUS_METADATA_BYTES = 4096


class TusVersionMismatch(UploadError):
    status = 412
    headers = {"Tus-Version": TUS_VERSION}


class UnsupportedMediaType(UploadError):
    status = 415


@dataclasses.dataclass(frozen=True)
class TusCreation:
    """What a tus POST asks for: the file's size, its name (with folders), its original time, and its sha256 if
    the client knows it (then a file already stored under that name with that content is not sent again)."""

    size: int
    name: str
    mtime: float | None
    sha256: str | None = None


def tus_check_version(environ: dict) -> None:
    if environ.get("HTTP_TUS_RESUMABLE", "").strip() != TUS_VERSION:
        raise TusVersionMismatch(f"This server speaks tus {TUS_VERSION}: send Tus-Resumable: {TUS_VERSION}.")


def tus_options(config: Config) -> dict[str, str]:
    return {"Tus-Version": TUS_VERSION, "Tus-Extension": TUS_EXTENSIONS, "Tus-Max-Size": str(config.max_size_bytes),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUM_ALGORITHMS)}


def _header_uint(environ: dict, header: str, what: str) -> int | None:
    text = environ.get("HTTP_" + header.upper().replace("-", "_"))
    if text is None:
        return None
    if not _UINT_RE.match(text.strip()):
        raise BadRequest(f"{what} must be a whole number of bytes.")
    return int(text.strip())


def tus_metadata(header: str) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (a key alone has an empty value)."""
    if len(header) > MAX_TUS_METADATA_BYTES:
        raise BadRequest(f"Upload-Metadata is too long (at most {MAX_TUS_METADATA_BYTES} bytes).")
    metadata: dict[str, str] = {}
    for pair in filter(None, (item.strip() for item in header.split(","))):
        key, _, value = pair.partition(" ")
        if not key.isascii() or not key.isprintable() or key in metadata:
            raise BadRequest("Upload-Metadata has a malformed or repeated key.")
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            raise BadRequest(f"Upload-Metadata: the value of {key[:40]!r} is not base64.") from None
        metadata[key] = decoded.decode("utf-8", errors="replace")
    return metadata


def tus_creation(environ: dict, max_size: int) -> TusCreation:
    size = _header_uint(environ, "Upload-Length", "Upload-Length")
    if size is None:
        if environ.get("HTTP_UPLOAD_DEFER_LENGTH") is not None:
            raise BadRequest("This server needs the size at creation: send Upload-Length.")
        raise BadRequest("Send the file's size as Upload-Length.")
    if size > max_size:
        raise TooLarge(f"File too large: {size} bytes; this server accepts up to {max_size} bytes per file.")
    metadata = tus_metadata(environ.get("HTTP_UPLOAD_METADATA", ""))
    filename = metadata.get("filename") or metadata.get("name") or "file"
    folder = metadata.get("folder") or split_folder(metadata.get("relativePath", "").replace("\\", "/"))[0]
    digest = metadata.get("sha256", "").lower()
    return TusCreation(size, sanitize_relative_path(f"{folder}/{sanitize_filename(filename)}"),
                       _metadata_time(metadata.get("mtime")), digest if re.fullmatch("[0-9a-f]{64}", digest) else None)


def _metadata_time(text: str | None) -> float | None:
    """The original's modification time, seconds since 1970; a value that is no plausible time is ignored."""
    try:
        value = float(text) if text else None
    except ValueError:
        return None
    return value if value is not None and 0 <= value < 1 << 34 else None


def tus_checksum(environ: dict) -> tuple[str, bytes] | None:
    """``Upload-Checksum: sha1 BASE64``, as the engine checks it."""
    header = environ.get("HTTP_UPLOAD_CHECKSUM")
    if header is None:
        return None
    algorithm, _, value = header.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise BadRequest(f"Unsupported checksum algorithm; use one of {', '.join(CHECKSUM_ALGORITHMS)}.")
    try:
        return algorithm, base64.b64decode(value.strip(), validate=True)
    except ValueError:
        raise BadRequest("Upload-Checksum: the checksum is not base64.") from None


def tus_create(engine: Engine, environ: dict, client: str) -> tuple[UploadInfo, bool]:
    """``POST``: a new upload (and its first bytes, with creation-with-upload); (info, bytes were sent)."""
    creation = tus_creation(environ, engine.limits.max_size)
    with_upload = _tus_body_follows(environ)
    already = already_stored(engine, creation)
    if already is not None:
        if with_upload:
            _drain(request_body(environ, content_length(environ)))
        return already, with_upload
    upload_id = new_upload_id()
    with _Subject(creation.name):
        checksum = tus_checksum(environ) if with_upload else None
        info = engine.create(upload_id, creation.name, size=creation.size, part_size=max(1, creation.size),
                             client=client, fresh=True, mtime=creation.mtime)
        if with_upload:
            try:
                info = _tus_append(engine, environ, info, 0, checksum)
            except BaseException:
                engine.abort(upload_id, reason="its first request failed")  # the client never learns its address
                raise
        elif creation.size == 0:
            info = engine.finish(upload_id)
    return info, with_upload


def already_stored(engine: Engine, creation: TusCreation) -> UploadInfo | None:
    """The stored upload that is this file already: the same name, size and sha256, and still there with that
    size (a sender re-run over the same folder skips what arrived).  Its bytes are not hashed again here."""
    if creation.sha256 is None:
        return None
    for info in engine.ledger.stored_with(creation.sha256, creation.size):
        if info.stored_name == creation.name and engine.backend.stored_size(info.stored_name) == creation.size:
            return info
    return None


def _tus_body_follows(environ: dict) -> bool:
    if environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower() == TUS_CONTENT_TYPE:
        return True
    if content_length(environ):
        raise UnsupportedMediaType(f"Send the bytes of an upload with Content-Type: {TUS_CONTENT_TYPE}.")
    return False


def tus_patch(engine: Engine, environ: dict, upload_id: str) -> UploadInfo:
    """``PATCH``: bytes at the upload's current offset, which the client names in ``Upload-Offset``."""
    if environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower() != TUS_CONTENT_TYPE:
        raise UnsupportedMediaType(f"A PATCH carries Content-Type: {TUS_CONTENT_TYPE}.")
    offset = _header_uint(environ, "Upload-Offset", "Upload-Offset")
    if offset is None:
        raise BadRequest("Send the offset the bytes belong at as Upload-Offset.")
    checksum = tus_checksum(environ)
    info = tus_info(engine, upload_id)
    with _Subject(info.name):
        current = engine.offset(upload_id)
        if offset != current:
            raise Conflict(f"Upload-Offset is {offset}, but the upload is at {current}: ask with HEAD.")
        return _tus_append(engine, environ, info, offset, checksum)


def _tus_append(engine: Engine, environ: dict, info: UploadInfo, offset: int,
                checksum: tuple[str, bytes] | None) -> UploadInfo:
    length = content_length(environ)
    if length is not None and offset + length > (info.size or 0):
        raise TooLarge("These bytes would go past the Upload-Length of the upload.")
    info = engine.put(info.id, offset, request_body(environ, length), length=length, checksum=checksum,
                      keep_if_empty=True)
    if info.state is State.RECEIVING and info.fully_received:
        info = engine.finish(info.id)
    return info


def tus_info(engine: Engine, upload_id: str) -> UploadInfo:
    """The upload behind a tus address; 404 for none, 410 for one that ended without being stored."""
    info = engine.info(upload_id) if is_valid_id(upload_id) else None
    if info is None:
        raise NotFound("No such upload.")
    if info.state not in (State.RECEIVING, State.STORED):
        raise Gone(_GONE[info.state])
    return info


def tus_status(engine: Engine, upload_id: str) -> UploadInfo:
    """``HEAD``: the upload as it is; one with every byte received but not completed (the server stopped in
    between) is completed first, since a client told its offset is at the end sends nothing more."""
    info = tus_info(engine, upload_id)
    if info.state is State.RECEIVING and info.fully_received:
        info = engine.finish(upload_id)
    return info


def tus_upload_headers(engine: Engine, info: UploadInfo) -> dict[str, str]:
    """The headers of a reply about an upload: its offset, length, metadata and, unfinished, its expiry."""
    headers = {"Upload-Offset": str(engine.offset(info.id)), "Upload-Length": str(info.size or 0)}
    folder, name = split_folder(info.stored_name or info.name)
    pairs = [("filename", name)] + ([("folder", folder)] if folder else [])
    headers["Upload-Metadata"] = ",".join(f"{key} {base64.b64encode(value.encode()).decode()}" for key, value in pairs)
    if info.state is State.RECEIVING:
        headers["Upload-Expires"] = formatdate(info.updated + engine.limits.partial_ttl, usegmt=True)
    return headers


def tus_terminate(engine: Engine, upload_id: str) -> None:
    """``DELETE``: an unfinished upload ends and its bytes go.  A stored file is not the uploader's to remove:
    it is on someone's disk now (the admin removes stored files)."""
    info = tus_info(engine, upload_id)
    if info.state is State.STORED:
        raise Forbidden("This upload is complete and stored; it can no longer be removed this way.")
    if engine.abort(upload_id, reason="terminated by the client").state is State.STORED:
        raise Forbidden("This upload is complete and stored; it can no longer be removed this way.")


###############################################################################
# Plugins #####################################################################
###############################################################################


class ErrorsAsResponses:
    """Bottle plugin: an UploadError becomes its status with a one-line plain message (never a traceback or a
    path); on routes marked ``report=True`` each refusal is also one console line (what, why, from whom)."""

    name = "pyfiledrop-errors"
    api = 2

    def __init__(self, events: Callable[[EngineEvent], None]):
        self.events = events

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        report = route.config.get("report", False)

        def guarded(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except UploadError as error:
                if report:
                    self._report(error.status, error.message, getattr(error, "subject", ""))
                response = plain_response(error.status, error.message, close=isinstance(error, ClientDisconnected))
                for header, value in (*route.config.get("error_headers", ()), *error.headers.items()):
                    response.set_header(header, value)
                return response
            except Exception as error:  # a bug: say so in one line, keep serving
                log.debug("request failed", exc_info=True)
                self._report(500, f"internal error ({type(error).__name__})", "")
                return plain_response(500, "Internal server error.", close=True)

        return guarded

    def _report(self, status: int, message: str, subject: str) -> None:
        request = bottle.request
        what = f'"{subject}"' if subject else f"{request.method} {request.path}"
        self.events(Refused(what, request.environ.get("REMOTE_ADDR", ""), status, message))


_STATUS_LINES = {460: "460 Checksum Mismatch"}   # tus's own status, unknown to Bottle


def plain_response(status: int, message: str, *, close: bool = False) -> bottle.HTTPResponse:
    response = bottle.HTTPResponse(message.rstrip("\n") + "\n", status=_STATUS_LINES.get(status, status))
    response.content_type = "text/plain; charset=utf-8"
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Cache-Control", "no-store")
    if close:
        response.set_header("Connection", "close")
    return response


# -- Authentication ---------------------------------------------------------------------------------------------
# Three levels, each route naming the one it needs in its config (``auth=``; default UPLOADER):
#   PUBLIC    the icon, the page's assets, the login page;
#   UPLOADER  the page, uploading, an upload's status and download: open to all unless --password is set;
#   ADMIN     /files and the /api/uploads list and actions: only with --admin-password, which also opens UPLOADER.
# Browsers log in on /login and carry a signed cookie; scripts send HTTP Basic (any user name).

PUBLIC, UPLOADER, ADMIN = "public", "upload", "admin"
PASSWORD_ENV = "PYFILEDROP_PASSWORD"
ADMIN_PASSWORD_ENV = "PYFILEDROP_ADMIN_PASSWORD"
SESSION_COOKIE = "pyfiledrop_session"
CSRF_COOKIE = "pyfiledrop_csrf"           # readable by the pages' scripts, which echo it in CSRF_HEADER
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 30 * 86400
SESSION_KEY_FILENAME = "session.key"     # beside the ledger: logins survive a restart
# scrypt n=2**14, r=8: 16 MiB and some 50 ms per check.  The hash never leaves memory, wrong guesses are slowed
# per address (below) and a right password is checked once, then known by its HMAC: the cost buys little more.
SCRYPT_COST = {"n": 1 << 14, "r": 8, "p": 1, "maxmem": 64 * MIB}
FREE_FAILURES = 5                        # wrong passwords from one address before each next try must wait
MAX_LOCKOUT_S = 300.0                    # the wait doubles per further failure, up to this
FAILURES_FORGOTTEN_S = 3600.0
MAX_TRACKED_ADDRESSES = 4096
UNSAFE_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
_SCRYPT_SLOTS = threading.BoundedSemaphore(2)   # password checks at once: they cannot take every core


@dataclasses.dataclass(frozen=True, repr=False)
class PasswordHash:
    """A password as a salted scrypt hash (the password itself is not kept).

    ``session_tag`` is derived with a fixed salt so that it is the same on every start: it goes into every
    login cookie's signature, so changing the password logs out everyone who logged in with the old one.
    """

    salt: bytes
    digest: bytes
    session_tag: bytes

    @classmethod
    def of(cls, password: str) -> PasswordHash:
        salt = os.urandom(16)
        secret = password.encode("utf-8", "surrogateescape")   # a variable's bytes as they are
        return cls(salt, hashlib.scrypt(secret, salt=salt, **SCRYPT_COST),
                   hashlib.scrypt(secret, salt=b"pyfiledrop session tag", **SCRYPT_COST))

    def matches(self, password: str) -> bool:
        with _SCRYPT_SLOTS:
            digest = hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=self.salt, **SCRYPT_COST)
        return hmac.compare_digest(digest, self.digest)

    def __repr__(self) -> str:
        return "PasswordHash(...)"


def load_session_key(chunks: Path) -> bytes:
    """The key that signs login cookies: made once (atomically: never a half-written key), kept in ``chunks``."""
    path = chunks / SESSION_KEY_FILENAME
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
    except FileNotFoundError:
        pass
    temp = chunks / f".{SESSION_KEY_FILENAME}.tmp"   # one server per chunks folder (the ledger's lock)
    fd = os.open(temp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        os.write(fd, os.urandom(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)   # a key of the wrong length (damaged) is replaced: its logins end
    return path.read_bytes()


class _Throttle:
    """Wrong passwords per address (IPv6 per /64, which one device can rotate within): after FREE_FAILURES,
    each further try must wait 2, 4, 8 ... up to MAX_LOCKOUT_S seconds after the last failure."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, tuple[int, float]] = {}   # key: (count, time of the last), oldest first

    @staticmethod
    def _key(address: str) -> str:
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return address
        if parsed.version == 4:
            return str(parsed)
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))

    def wait_left(self, address: str) -> float:
        with self._lock:
            return self._wait(self._key(address))

    def _wait(self, key: str) -> float:
        count, last = self._failures.get(key, (0, 0.0))
        if count < FREE_FAILURES:
            return 0.0
        return max(0.0, last + min(MAX_LOCKOUT_S, 2.0 ** (count - FREE_FAILURES + 1)) - self.clock())

    def begin(self, address: str) -> float:
        """The seconds ``address`` must still wait, or 0 and this try counted as a failure until ``succeeded``:
        counted before the check, so many guesses sent at once cannot all slip in under the limit."""
        with self._lock:
            wait = self._wait(self._key(address))
            if not wait:
                self._count(self._key(address))
            return wait

    def failed(self, address: str) -> None:
        with self._lock:
            self._count(self._key(address))

    def _count(self, key: str) -> None:
        now = self.clock()
        count, last = self._failures.pop(key, (0, now))
        self._failures[key] = (1 if now - last > FAILURES_FORGOTTEN_S else count + 1, now)
        while len(self._failures) > MAX_TRACKED_ADDRESSES:
            del self._failures[next(iter(self._failures))]

    def succeeded(self, address: str) -> None:
        with self._lock:
            self._failures.pop(self._key(address), None)


@dataclasses.dataclass(frozen=True)
class Credentials:
    """Who a request is: the role it proved (None: none), how (``"basic"``, ``"cookie"``), its CSRF token."""

    role: str | None
    via: str = ""
    csrf: str = ""


class Authenticator:
    """Checks passwords and login cookies; issues cookies and CSRF tokens.  Holds no password, only hashes."""

    def __init__(self, password: PasswordHash | None, admin_password: PasswordHash | None, key: bytes, *,
                 clock: Callable[[], float] = time.time):
        self.hashes = {role: h for role, h in ((ADMIN, admin_password), (UPLOADER, password)) if h is not None}
        self.key = key
        self.clock = clock
        self.throttle = _Throttle(clock)
        self._known: dict[str, bytes] = {}   # role: HMAC of its password, once a request has proved it

    def required(self, level: str) -> bool:
        """Whether a route of ``level`` needs any password at all."""
        return level == ADMIN or (level == UPLOADER and UPLOADER in self.hashes)

    def role_of(self, password: str) -> str | None:
        """The role ``password`` proves (the admin one first), or None.  Not throttled: see ``attempt``."""
        tag = hmac.new(self.key, password.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()
        for role in self.hashes:
            if role in self._known and hmac.compare_digest(self._known[role], tag):
                return role
        for role, hashed in self.hashes.items():
            if role not in self._known and hashed.matches(password):
                self._known[role] = tag
                return role
        return None

    def attempt(self, password: str, address: str) -> str | None:
        """``role_of``, counted against ``address``: raises TooManyAttempts while it must wait."""
        wait = self.throttle.begin(address)
        if wait > 0:
            raise TooManyAttempts(wait)
        role = self.role_of(password)
        if role is not None:
            self.throttle.succeeded(address)
        return role

    def _sign(self, payload: str, role: str) -> str:
        mac = hmac.new(self.key, payload.encode("ascii") + b"|" + self.hashes[role].session_tag, hashlib.sha256)
        return base64.urlsafe_b64encode(mac.digest()).decode("ascii").rstrip("=")

    def issue(self, role: str) -> str:
        """A login cookie's value: role, expiry, a random session id, and their signature."""
        payload = f"{role}.{int(self.clock()) + SESSION_SECONDS}.{uuid.uuid4().hex}"
        return f"{payload}.{self._sign(payload, role)}"

    def session(self, value: str) -> Credentials:
        parts = value.split(".")
        if len(parts) != 4 or parts[0] not in self.hashes or not parts[1].isdigit():
            return Credentials(None)
        payload = ".".join(parts[:3])
        if not hmac.compare_digest(self._sign(payload, parts[0]).encode(), parts[3].encode("ascii", "replace")):
            return Credentials(None)
        if int(parts[1]) < self.clock():
            return Credentials(None)
        return Credentials(parts[0], "cookie", self.csrf_token(parts[2]))

    def csrf_token(self, session_id: str) -> str:
        mac = hmac.new(self.key, b"csrf|" + session_id.encode("ascii", "replace"), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac[:24]).decode("ascii")


class TooManyAttempts(UploadError):
    status = 429

    def __init__(self, wait: float):
        self.wait = max(1, int(wait + 0.999))
        super().__init__(f"Too many wrong passwords from this address: try again in {self.wait} s.")


def _basic_password(header: str) -> str | None:
    """The password of an ``Authorization: Basic`` header (any user name), None for another scheme."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("Malformed Authorization header.") from None
    if ":" not in decoded:
        raise BadRequest("Malformed Authorization header: expected user:password (any user name).")
    return decoded.split(":", 1)[1]


def _is_browser(environ: dict) -> bool:
    """Browsers get the login page instead of ``WWW-Authenticate`` (which would pop up their own prompt)."""
    return (any(key.startswith("HTTP_SEC_FETCH_") for key in environ) or "HTTP_X_REQUESTED_WITH" in environ
            or "text/html" in environ.get("HTTP_ACCEPT", "")
            or environ.get("HTTP_USER_AGENT", "").startswith("Mozilla/"))


def _cross_site(environ: dict) -> bool:
    """A request a browser sent on behalf of another site (a form or script there posting to us).

    Sec-Fetch-Site decides where the browser sends it (all current ones do); else the Origin's host.  An Origin
    of "null" is what our own pages' forms send under Referrer-Policy: no-referrer, so it is no evidence."""
    site = environ.get("HTTP_SEC_FETCH_SITE")
    if site is not None:
        return site not in ("same-origin", "none")
    origin = environ.get("HTTP_ORIGIN", "null")
    if origin == "null":
        return False
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:  # "http://[": no browser sends that, so no page of ours did
        return True
    return netloc.lower() != environ.get("HTTP_HOST", "").lower()


def _cookie(environ: dict, name: str) -> str:
    for item in environ.get("HTTP_COOKIE", "").split(";"):
        key, _, value = item.strip().partition("=")
        if key == name:
            return value
    return ""


class RequirePassword:
    """Bottle plugin: a route's ``auth`` level is checked before its callback runs, so before any byte of the
    request body is read; the server sends "100 Continue" only on the first read, so a client that waits for it
    (``Expect: 100-continue``, as curl does for large files) is refused without sending its body at all."""

    name = "pyfiledrop-auth"
    api = 2

    def __init__(self, auth: Authenticator | None, events: Callable[[EngineEvent], None] = lambda event: None):
        self.auth = auth
        self.events = events   # a wrong password is one console line (further tries are throttled)

    def apply(self, callback: Callable, route: bottle.Route) -> Callable:
        level = route.config.get("auth", UPLOADER)
        if level == PUBLIC:
            return callback

        extra_headers = route.config.get("error_headers", ())   # a protocol's own headers (tus) on refusals too

        def checked(*args, **kwargs):
            refusal = self.check(bottle.request.environ, level)
            if refusal is None:
                return callback(*args, **kwargs)
            for header, value in extra_headers:
                refusal.set_header(header, value)
            return refusal

        return checked

    def check(self, environ: dict, level: str) -> bottle.HTTPResponse | None:
        """None when the request may go on (its Credentials then in the environ), else the refusal."""
        auth = self.auth
        if level == ADMIN and (auth is None or ADMIN not in auth.hashes):
            return plain_response(403, "This needs the admin password: start the server with --admin-password.")
        if auth is None or not auth.required(level):
            return None
        try:
            credentials = self.credentials(environ)
        except TooManyAttempts as error:
            refusal = _auth_refusal(environ, error.status, error.message, login=False)
            refusal.set_header("Retry-After", str(error.wait))
            return refusal
        if credentials.role is None:
            if credentials.via == "basic":
                self.events(Refused(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}",
                                    environ.get("REMOTE_ADDR", ""), 403, "Wrong password."))
                return _auth_refusal(environ, 403, "Wrong password.")
            return _auth_refusal(environ, 401, "This server needs a password.")
        if level == ADMIN and credentials.role != ADMIN:
            return _auth_refusal(environ, 403, "This needs the admin password.")
        if environ["REQUEST_METHOD"] in UNSAFE_METHODS:
            if credentials.via == "cookie" and not hmac.compare_digest(
                    environ.get("HTTP_X_CSRF_TOKEN", "").encode("latin-1"), credentials.csrf.encode("ascii")):
                return plain_response(403, f"Missing or wrong {CSRF_HEADER} header: reload the page.")
            if _cross_site(environ):
                return plain_response(403, "A request from another site was refused.")
        environ["pyfiledrop.credentials"] = credentials
        return None

    def credentials(self, environ: dict) -> Credentials:
        header = environ.get("HTTP_AUTHORIZATION", "")
        password = _basic_password(header) if header else None
        if password is not None:
            return Credentials(self.auth.attempt(password, environ.get("REMOTE_ADDR", "")), "basic")
        cookie = _cookie(environ, SESSION_COOKIE)
        return self.auth.session(cookie) if cookie else Credentials(None)


def _auth_refusal(environ: dict, status: int, message: str, login: bool = True) -> bottle.HTTPResponse:
    """401/403/429: the login page for a browser's page load, else one plain line (with the Basic challenge on
    a 401 to a client that is not a browser)."""
    browser = _is_browser(environ)
    if browser and environ["REQUEST_METHOD"] in ("GET", "HEAD") and "text/html" in environ.get("HTTP_ACCEPT", ""):
        target = environ.get("PATH_INFO", "/") + ("?" + environ["QUERY_STRING"] if environ.get("QUERY_STRING") else "")
        return login_page(message, target if login else "", status)
    response = plain_response(status, message)
    if status == 401 and not browser:
        response.set_header("WWW-Authenticate", 'Basic realm="pyfiledrop", charset="UTF-8"')
    return response


def _local_target(text: str) -> str:
    """Where to go after logging in: a path on this server only (never "//elsewhere" or a URL)."""
    if (not text.startswith("/") or text.startswith(("//", "/\\")) or len(text) > 2000
            or any(ord(c) < 0x20 or c == "\x7f" for c in text)):
        return ""
    return text


def login_page(message: str, target: str, status: int = 200) -> bottle.HTTPResponse:
    html = (LOGIN_HTML.replace("{{message}}", bottle.html_escape(message))
            .replace("{{next}}", bottle.html_escape(_local_target(target))))
    response = bottle.HTTPResponse(html, status=status)
    response.content_type = "text/html; charset=utf-8"
    response.set_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Referrer-Policy", "no-referrer")
    response.set_header("Cache-Control", "no-store")
    return response


def _login_cookies(response: bottle.HTTPResponse, session: str, csrf: str, secure: bool, max_age: int) -> None:
    attributes = f"Path=/; Max-Age={max_age}; SameSite=Strict" + ("; Secure" if secure else "")
    response.add_header("Set-Cookie", f"{SESSION_COOKIE}={session}; HttpOnly; {attributes}")
    response.add_header("Set-Cookie", f"{CSRF_COOKIE}={csrf}; {attributes}")


def _login_routes(app: bottle.Bottle, auth: Authenticator | None, events: Callable[[EngineEvent], None]) -> None:
    """/login (a form for browsers; scripts use Basic instead) and /logout."""

    @app.get("/login", auth=PUBLIC)
    def login_form():
        return login_page("Enter the password." if auth else "This server needs no password.",
                          bottle.request.query.getunicode("next") or "")

    @app.post("/login", auth=PUBLIC)
    def login():
        environ = bottle.request.environ
        if auth is None:
            return plain_response(404, "This server needs no password.")
        if _cross_site(environ):
            return plain_response(403, "A request from another site was refused.")
        if content_length(environ) is None or content_length(environ) > 64 * 1024:
            return plain_response(411 if content_length(environ) is None else 413,
                                  "Send the form with a Content-Length of at most 64 KiB.", close=True)
        target = _local_target(bottle.request.forms.getunicode("next") or "")
        try:
            role = auth.attempt(bottle.request.forms.getunicode("password") or "", environ.get("REMOTE_ADDR", ""))
        except TooManyAttempts as error:
            response = login_page(error.message, target, error.status)
            response.set_header("Retry-After", str(error.wait))
            return response
        if role is None:
            events(Refused("a login", environ.get("REMOTE_ADDR", ""), 403, "Wrong password."))
            return login_page("Wrong password.", target, 403)
        session = auth.issue(role)
        response = bottle.HTTPResponse(status=303)
        response.set_header("Location", target or ("/files" if role == ADMIN else "/"))
        response.set_header("Cache-Control", "no-store")
        _login_cookies(response, session, auth.session(session).csrf, environ.get("wsgi.url_scheme") == "https",
                       SESSION_SECONDS)
        return response

    @app.post("/logout", auth=PUBLIC)
    def logout():
        if _cross_site(bottle.request.environ):
            return plain_response(403, "A request from another site was refused.")
        response = bottle.HTTPResponse(status=303)
        response.set_header("Location", "/login")
        _login_cookies(response, "", "", bottle.request.environ.get("wsgi.url_scheme") == "https", 0)
        return response


def _authenticator(config: Config, engine: Engine) -> Authenticator | None:
    if config.password is None and config.admin_password is None:
        return None
    # With --s3 every node signs and checks login cookies with one key, kept in the store.
    key = engine.session_key() if hasattr(engine, "session_key") else load_session_key(config.chunks)
    return Authenticator(config.password, config.admin_password, key, clock=engine.clock)


###############################################################################
# The application #############################################################
###############################################################################


_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False)   # one, not one per reply as json.dumps makes it


def _json(data: dict, status: int = 200) -> bottle.HTTPResponse:
    response = bottle.HTTPResponse(_JSON_ENCODER.encode(data), status=status)
    response.content_type = "application/json; charset=utf-8"
    response.set_header("Cache-Control", "no-store")
    response.set_header("X-Content-Type-Options", "nosniff")
    return response


def _script_hash(html: str) -> str:
    script = re.search(r"<script>(.*?)</script>", html, re.DOTALL).group(1)
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")


WORKER_ASSET = "hasher-{version}.js"
HASH_WASM_ASSET = "hash-wasm-sha256-{version}.min.js"
TEXT_ASSET = "text-{version}.js"


def render_index(config: Config) -> tuple[str, str]:
    """The built-in page and its Content-Security-Policy."""
    page_config = {
        "chunkSize": config.chunk_size,
        "parallel": config.parallel_chunks,
        "timeoutMs": config.timeout_ms,
        "maxFileSizeBytes": config.max_size_bytes,
        "allowDownloads": config.allow_downloads,
        "claims": not config.allow_downloads,   # see content_reply: no "I have this hash" where files go out
        "workerUrl": "/assets/" + WORKER_ASSET.format(version=__version__),
        "version": __version__,
        "csrfCookie": CSRF_COOKIE,
        "csrfHeader": CSRF_HEADER,
        "noteMaxBytes": MAX_NOTE_BYTES,
    }
    config_json = json.dumps(page_config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    html = INDEX_HTML.replace("{{config_json}}", config_json).replace("{{version}}", __version__)
    html = with_shared_list(html, config)
    if "</body>" in html:   # the text box and the shared text: a script of its own, as the shared list's
        html = html.replace("</body>", f'<script src="/assets/{TEXT_ASSET.format(version=__version__)}" defer>'
                                       "</script>\n</body>", 1)
    policy = (f"default-src 'self'; script-src 'self' '{_script_hash(html)}'; worker-src 'self'; style-src 'self' "
              "'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
              "form-action 'self'; frame-ancestors 'none'")
    return html, policy


def page_assets() -> dict[str, tuple[bytes, str]]:
    """The page's scripts by name: the hashing worker, and hash-wasm, which it loads."""
    hash_wasm = HASH_WASM_ASSET.format(version=HASH_WASM_VERSION)
    worker = HASHER_WORKER_JS.replace("{{hash_wasm}}", "/assets/" + hash_wasm)
    return {
        hash_wasm: (unpack_asset(HASH_WASM_SHA256_JS), "application/javascript"),
        WORKER_ASSET.format(version=__version__): (worker.encode("utf-8"), "application/javascript"),
        TEXT_ASSET.format(version=__version__): (TEXT_JS.encode("utf-8"), "application/javascript"),
    }


def open_engine(config: Config, *, events: Callable[[EngineEvent], None] = lambda event: None,
                checkpoint: Callable[[str], None] = lambda step: None, clock: Callable[[], float] = time.time) -> Engine:
    """The engine over ``config``'s folders: its ledger opened (and migrated), disk and ledger reconciled; with
    ``config.s3`` the engine over that object store instead."""
    if config.s3 is not None:
        return open_s3_engine(config, events=events, checkpoint=checkpoint, clock=clock)
    warn = lambda text: events(Notice(text, True))  # noqa: E731
    backend = LocalBackend(config.storage, config.chunks, checkpoint=checkpoint, warn=warn)
    min_free = config.min_free if config.min_free is not None else default_min_free(backend.total_space())
    limits = EngineLimits(config.max_size_bytes, min_free, config.partial_ttl_seconds, config.expire_after_s)
    ledger = Ledger(config.chunks / Ledger.FILENAME)
    return Engine(ledger, backend, limits, events=events, checkpoint=checkpoint, clock=clock)


def default_min_free(disk_size: int) -> int:
    """The reserve kept free when --min-free is not given: 2% of the disk, at most 1 GiB."""
    return min(1 << 30, disk_size // 50)


def create_app(config: Config, engine: Engine) -> bottle.Bottle:
    """The WSGI application for ``config``; routes only translate between HTTP and the ``engine``."""
    app = bottle.Bottle(catchall=True)
    app.install(ErrorsAsResponses(engine.events))
    auth = _authenticator(config, engine)
    app.install(RequirePassword(auth, engine.events))
    _login_routes(app, auth, engine.events)
    _files_routes(app, config, engine)
    _page_routes(app, config)
    _share_routes(app, shared_source(config, engine))

    def client() -> str:
        return bottle.request.environ.get("REMOTE_ADDR", "")

    _text_routes(app, text_board(config, engine), client)

    @app.post("/upload", report=True)
    def upload():
        return _json(receive_form(engine, bottle.request.environ, client()))

    @app.put("/upload/<name:path>", report=True)
    def put_upload(name):
        return _json(receive_put(engine, bottle.request.environ, client()))

    @app.put("/upload")
    @app.put("/upload/")
    def put_without_name():
        raise BadRequest("Put the file name in the address: PUT /upload/NAME")

    _tus_routes(app, config, engine, client)

    @app.get("/api/uploads/<upload_id>")
    def upload_status(upload_id):
        return _json(status_reply(engine, upload_id))

    _resume_routes(app, config, engine, client)

    @app.get("/download/<upload_id>")
    def download(upload_id):
        if not config.allow_downloads:
            raise Forbidden("Downloads are turned off on this server (start it with --allow-downloads).")
        return stored_file_response(engine, upload_id)

    _error_pages(app)
    if config.verbose:
        @app.hook("after_request")
        def access_log():
            request = bottle.request
            log.info("%s %s %s %s", request.environ.get("REMOTE_ADDR", "-"), request.method, request.path,
                     bottle.response.status_code)

    return app


def text_board(config: Config, engine: Engine) -> TextBoard:
    """The notes and shared text over the engine's ledger; --share-text replaces what an earlier start kept."""
    if not isinstance(engine.ledger, Ledger):  # --s3: nodes keep nothing, and the store holds no notes
        return StatelessTextBoard(config.share_text)
    board = TextBoard(engine.ledger, clock=engine.clock, events=engine.events, check_space=engine.check_space)
    if config.share_text is not None:
        board.share(config.share_text, None)
    return board


def _resume_routes(app: bottle.Bottle, config: Config, engine: Engine, client: Callable[[], str]) -> None:
    """What the page resumes with: the status of many uploads, cancel, part checks, "do you have this?"."""

    @app.post("/api/uploads/status")
    def uploads_status():
        return _json(status_many(engine, read_json(bottle.request.environ)))

    @app.post("/api/uploads/<upload_id>/cancel", report=True)
    def cancel_upload(upload_id):
        read_json(bottle.request.environ)   # a JSON body ({}), so no other site's form can send this
        return _json(cancel_reply(engine, upload_id, client()))

    @app.post("/api/uploads/<upload_id>/verify")
    def verify_parts(upload_id):
        return _json(verify_reply(engine, upload_id, read_json(bottle.request.environ)))

    @app.post("/api/uploads/<upload_id>/content", report=True)
    def upload_by_content(upload_id):
        request = read_json(bottle.request.environ)
        return _json(content_reply(engine, upload_id, request, client(), not config.allow_downloads))


def _tus_routes(app: bottle.Bottle, config: Config, engine: Engine, client: Callable[[], str]) -> None:
    """tus 1.0 at /tus/ (see the tus adapter section); every reply, errors too, carries Tus-Resumable."""
    tus = {"report": True, "error_headers": tuple(TUS_HEADERS.items())}  # pairs: Bottle flattens a dict here

    def reply(status: int, headers: Mapping[str, str] = {}) -> bottle.HTTPResponse:
        response = bottle.HTTPResponse(status=status)
        for header, value in {**TUS_HEADERS, **headers}.items():
            response.set_header(header, value)
        return response

    @app.route("/tus/", method="OPTIONS", **tus)
    @app.route("/tus/<upload_id>", method="OPTIONS", **tus)
    def tus_discover(upload_id=None):
        return reply(204, tus_options(config))

    @app.post("/tus/", **tus)
    def tus_post():
        tus_check_version(bottle.request.environ)
        info, with_upload = tus_create(engine, bottle.request.environ, client())
        headers = tus_upload_headers(engine, info)
        location = f"{bottle.request.urlparts.scheme}://{bottle.request.urlparts.netloc}/tus/{info.id}"
        return reply(201, {"Location": location, "Upload-Offset": headers["Upload-Offset"],
                           **({"Upload-Expires": headers["Upload-Expires"]} if "Upload-Expires" in headers else {})})

    @app.route("/tus/<upload_id>", method="HEAD", **tus)
    def tus_head(upload_id):
        tus_check_version(bottle.request.environ)
        return reply(200, {**tus_upload_headers(engine, tus_status(engine, upload_id)), "Cache-Control": "no-store"})

    @app.route("/tus/<upload_id>", method="PATCH", **tus)
    def tus_append(upload_id):
        tus_check_version(bottle.request.environ)
        info = tus_patch(engine, bottle.request.environ, upload_id)
        headers = tus_upload_headers(engine, info)
        return reply(204, {key: headers[key] for key in ("Upload-Offset", "Upload-Expires") if key in headers})

    @app.delete("/tus/<upload_id>", **tus)
    def tus_delete(upload_id):
        tus_check_version(bottle.request.environ)
        tus_terminate(engine, upload_id)
        return reply(204)

    overridden = {"PATCH": tus_append, "DELETE": tus_delete, "HEAD": tus_head}

    @app.post("/tus/<upload_id>", **tus)
    def tus_method_override(upload_id):
        """tus: "X-HTTP-Method-Override MUST be interpreted as the request's method" (for clients whose
        network lets only GET and POST through)."""
        method = bottle.request.environ.get("HTTP_X_HTTP_METHOD_OVERRIDE", "").strip().upper()
        if method not in overridden:
            raise BadRequest("POST to an upload's address needs X-HTTP-Method-Override: PATCH, DELETE or HEAD.")
        return overridden[method](upload_id)


def stored_file_response(engine: Engine, upload_id: str) -> bottle.HTTPResponse:
    info = engine.info(upload_id) if is_valid_id(upload_id) else None
    if info is None or info.state is not State.STORED:
        raise NotFound("No such file.")
    if hasattr(engine.backend, "download_response"):  # an object store: streamed from there
        return engine.backend.download_response(info, bottle.request.environ.get("HTTP_RANGE"))
    path = engine.backend.stored_path(info.stored_name)
    response = bottle.static_file(path.name, root=str(path.parent), mimetype="application/octet-stream")
    if response.status_code >= 400:
        raise NotFound("That file is no longer on the server.")
    response.set_header("Content-Disposition", content_disposition(info.stored_name))
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
    return response


def _page_routes(app: bottle.Bottle, config: Config) -> None:
    """The page, its assets and the icon."""
    page, page_policy = render_index(config)
    assets = page_assets()
    favicon = unpack_asset(FAVICON_PNG)

    @app.get("/")
    def index():
        if config.index is not None and config.index.is_file():  # deleted while running: the built-in page
            response = bottle.static_file(config.index.name, root=str(config.index.parent),
                                          mimetype="text/html")
            response.set_header("Cache-Control", "no-cache")
            if response.status_code < 400:
                return response
        response = bottle.HTTPResponse(page)
        response.content_type = "text/html; charset=utf-8"
        response.set_header("Content-Security-Policy", page_policy)
        response.set_header("X-Content-Type-Options", "nosniff")
        response.set_header("Referrer-Policy", "no-referrer")
        response.set_header("Cache-Control", "no-cache")
        return response

    @app.get("/favicon.ico", auth=PUBLIC)
    def favicon_route():
        response = bottle.HTTPResponse(favicon)
        response.content_type = "image/png"
        response.set_header("Cache-Control", "public, max-age=86400")
        return response

    @app.get("/assets/<name>", auth=PUBLIC)
    def asset(name):
        if name not in assets:
            return plain_response(404, "Not found.")
        body, mimetype = assets[name]
        response = bottle.HTTPResponse(body)
        response.content_type = f"{mimetype}; charset=utf-8"
        response.set_header("Cache-Control", "public, max-age=31536000, immutable")
        response.set_header("X-Content-Type-Options", "nosniff")
        return response


def _error_pages(app: bottle.Bottle) -> None:
    """Bottle's own errors (no route, wrong method) as one plain line too."""
    messages = {400: "Bad request.", 403: "Forbidden.", 404: "Not found.", 405: "Method not allowed.",
                413: "Request too large.", 500: "Internal server error."}

    def error_page(error: bottle.HTTPError) -> str:
        bottle.response.content_type = "text/plain; charset=utf-8"
        if error.status_code >= 500:
            bottle.response.set_header("Connection", "close")
        return messages.get(error.status_code, error.status_line) + "\n"

    for code in messages:
        app.error(code)(error_page)


# -- The files page and its API (admin) -------------------------------------------------------------------------

ABANDONED_AFTER_S = 15 * 60   # an unfinished upload that moved no byte for this long is shown as abandoned
MAX_LIST_ROWS = 500
_PATH_SQL = "COALESCE(stored_name, name)"
_LIST_ORDERS = {               # ?sort=: (SQL key, descending); each has an index (Ledger.MIGRATIONS[2])
    "newest": ("created", True), "oldest": ("created", False),
    "name": (_PATH_SQL, False), "size": ("COALESCE(size, 0)", True),
}
# ?state=: the states the page shows, from the ledger's.  "+state" keeps SQLite off the state index, so the
# index of the sort order drives the query and a page stops after its rows (not a sort of every match).
_STATE_SQL = {
    "receiving": "(+state = 'receiving' AND updated >= :idle)",
    "abandoned": "((+state = 'receiving' AND updated < :idle) OR (+state = 'expired' AND finished IS NULL))",
    "stored": "+state = 'stored'",
    "expired": "(+state = 'expired' AND finished IS NOT NULL)",
    "deleted": "+state = 'deleted'",
    "failed": "+state = 'failed'",
}


def iso_time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def shown_state(info: UploadInfo, now: float) -> str:
    """The state the files page shows: the ledger's, with "abandoned" for an upload that stopped short."""
    if info.state is State.RECEIVING and info.updated < now - ABANDONED_AFTER_S:
        return "abandoned"
    if info.state is State.EXPIRED and info.finished is None:
        return "abandoned"
    return info.state.value


def _encode_cursor(sort: str, info: UploadInfo) -> str:
    key = {"newest": info.created, "oldest": info.created, "name": info.stored_name or info.name,
           "size": info.size or 0}[sort]
    raw = json.dumps([sort, key, info.id], separators=(",", ":")).encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_cursor(text: str, sort: str) -> tuple:
    try:
        value = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        kind, key, upload_id = value
        if kind != sort or not isinstance(upload_id, str) or not isinstance(key, (int, float, str)):
            raise ValueError
        if not math.isfinite(key) if isinstance(key, float) else isinstance(key, int) and not -2**63 <= key < 2**63:
            raise ValueError  # what SQLite cannot compare with (an integer over 64 bits is an OverflowError)
    except (ValueError, TypeError, binascii.Error):
        raise BadRequest("Malformed cursor (it belongs to another sort order, or was changed).") from None
    return key, upload_id


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def list_query(query: Mapping[str, str], now: float) -> tuple[str, dict, str, str, int]:
    """The files list's ?state=, ?q=, ?folder=, ?sort=, ?cursor=, ?limit= as (where, arguments, order, sort,
    limit) for Ledger.select; every value bound, only fixed SQL text put together."""
    sort = query.get("sort") or "newest"
    if sort not in _LIST_ORDERS:
        raise BadRequest(f"Unknown sort order; use one of {', '.join(_LIST_ORDERS)}.")
    key, descending = _LIST_ORDERS[sort]
    where, arguments = ["1"], {"idle": now - ABANDONED_AFTER_S}
    states = [state for state in (query.get("state") or "").split(",") if state]
    if any(state not in _STATE_SQL for state in states):
        raise BadRequest(f"Unknown state; use one or more (comma-separated) of {', '.join(_STATE_SQL)}.")
    if states:
        where.append("(" + " OR ".join(_STATE_SQL[state] for state in states) + ")")
    if query.get("q"):
        where.append(f"{_PATH_SQL} LIKE :q ESCAPE '\\'")
        arguments["q"] = f"%{_like_escape(query['q'][:MAX_NAME_BYTES * 4])}%"
    if "folder" in query:
        folder = folder_path(query["folder"]) if query["folder"] else ""
        arguments["prefix"] = folder + "/" if folder else ""
        where.append(f"substr({_PATH_SQL}, 1, length(:prefix)) = :prefix "
                     f"AND instr(substr({_PATH_SQL}, length(:prefix) + 1), '/') = 0")
    if query.get("cursor"):
        arguments["after_key"], arguments["after_id"] = _decode_cursor(query["cursor"], sort)
        where.append(f"({key}, id) {'<' if descending else '>'} (:after_key, :after_id)")
    limit = query.get("limit") or "100"
    if not _UINT_RE.match(limit) or not 1 <= int(limit) <= MAX_LIST_ROWS:  # ASCII digits only: not "²"
        raise BadRequest(f"?limit= is a number from 1 to {MAX_LIST_ROWS}.")
    direction = "DESC" if descending else "ASC"
    return " AND ".join(where), arguments, f"{key} {direction}, id {direction}", sort, int(limit)


def stored_expiry(engine: Engine, info: UploadInfo) -> float | None:
    """When --expire-after removes this stored file (None: never, or it is not stored)."""
    ttl = engine.limits.stored_ttl
    return info.finished + ttl if info.state is State.STORED and ttl and info.finished else None


def upload_entry(engine: Engine, info: UploadInfo, mark, now: float, detail: bool) -> dict:
    """One upload as GET /api/uploads lists it."""
    folder, _, name = (info.stored_name or info.name).rpartition("/")
    presence = storage_presence(engine.backend, info, mark)
    if info.state is State.RECEIVING:
        exists = engine.backend.part_stat(info.id) is not None
        expires = info.updated + engine.limits.partial_ttl
    else:
        exists = presence == "present"
        expires = stored_expiry(engine, info)
    entry = {"id": info.id, "name": name, "folder": folder, "size": info.size, "sha256": info.sha256,
             "state": shown_state(info, now), "exists": exists, "client": info.client,
             "created": iso_time(info.created), "completed": iso_time(info.finished), "expires": iso_time(expires)}
    if detail:
        entry.update(received=info.received_bytes, changed=presence == "changed", reason=info.reason)
    return entry


def decoded_query(query: bottle.FormsDict) -> dict[str, str]:
    """The query string's fields as text (the last of a repeated one); bytes that are not UTF-8 become U+FFFD,
    so a hostile query gets a 400 from whoever reads it, never a 500 from decoding it."""
    def text(value: str) -> str:  # Bottle gives each byte of the query as one latin-1 character
        return value.encode("latin-1").decode("utf-8", "replace")
    return {text(key): text(value) for key, value in query.allitems()}


def list_uploads(engine: Engine, query: Mapping[str, str]) -> dict:
    now = engine.clock()
    where, arguments, order, sort, limit = list_query(query, now)
    infos = engine.ledger.select(where, arguments, order, limit + 1)
    more, infos = len(infos) > limit, infos[:limit]
    marks = engine.ledger.marks(info.id for info in infos if info.state is State.STORED)
    detail = query.get("detail") == "1"
    return {"uploads": [upload_entry(engine, info, marks.get(info.id), now, detail) for info in infos],
            "next": _encode_cursor(sort, infos[-1]) if more else None}


def remove_abandoned(engine: Engine) -> dict:
    """The files page's clean-up: partial files of uploads that stopped short, and stored files past their
    expiry (the janitor's work, done now)."""
    cutoff = engine.clock() - ABANDONED_AFTER_S
    removed = 0
    while stale := engine.ledger.select("state = 'receiving' AND updated < :cutoff", {"cutoff": cutoff}, "id", 500):
        for info in stale:
            engine.delete(info.id)
            removed += 1
    return {"abandoned": removed, "expired": engine.expire()}


def folder_path(text: str) -> str:
    """A folder inside storage as "a/b": every part a plain name (as uploads' names are cleaned), none hidden."""
    parts = text.strip("/").split("/")
    if len(parts) > MAX_FOLDER_DEPTH or not all(parts):
        raise BadRequest("Not a folder name.")
    for part in parts:
        if part != sanitize_filename(part) or part.startswith(".") or len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise BadRequest(f"Not a usable folder name: {part[:80]!r}.")
    return "/".join(parts)


def _folder_on_disk(engine: Engine, path: str) -> Path:
    """The folder ``path`` in storage, refusing one that leads out of it (a link made by hand)."""
    storage = os.path.realpath(engine.backend.storage)
    target = engine.backend.storage / path if path else engine.backend.storage
    real = os.path.realpath(target)
    if real != storage and not real.startswith(storage + os.sep):
        raise Forbidden("That folder leads outside the storage folder.")
    return target


def list_folders(engine: Engine, path: str) -> dict:
    if hasattr(engine.backend, "folders"):  # an object store: its common prefixes
        return {"path": path, "folders": engine.backend.folders(path)}
    folder = _folder_on_disk(engine, path)
    try:
        with os.scandir(folder) as entries:
            names = sorted(entry.name for entry in entries
                           if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):  # a stored file by that name is no folder either
        raise NotFound("No such folder.") from None
    except OSError as error:
        raise storage_error(error)
    return {"path": path, "folders": names}


def change_folder(engine: Engine, action: str, path: str, to: str = "") -> dict:
    """Create, rename (its stored uploads' records follow) or delete (only when empty) a storage folder."""
    if not hasattr(engine.backend, "storage"):  # an object store has no folders of its own, only names
        done = {"create": "created", "rename": "renamed", "delete": "deleted"}[action]
        raise NotWithObjectStore(f"Folders cannot be {done} with --s3.")
    folder = _folder_on_disk(engine, path)
    if action != "create" and not folder.is_dir():
        raise NotFound("No such folder.")  # a stored file is renamed or removed through its upload, not here
    try:
        if action == "create":
            folder.mkdir(parents=True)
        elif action == "delete":
            folder.rmdir()
        else:
            if to == path or to.startswith(path + "/"):
                raise BadRequest("A folder cannot move into itself.")
            target = _folder_on_disk(engine, to)
            if target.exists():
                raise Conflict("A file or folder with that name already exists.")
            target.parent.mkdir(parents=True, exist_ok=True)
            folder.rename(target)
            engine.ledger.rename_folder(path, to)
    except FileExistsError:
        raise Conflict("A file or folder with that name already exists.") from None
    except FileNotFoundError:
        raise NotFound("No such folder.") from None
    except NotADirectoryError:
        raise Conflict("A file in storage has that name: a folder cannot go there.") from None
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise Conflict("The folder is not empty: delete or move its files first.") from None
        raise storage_error(error)
    return {"path": to or path}


def _json_body() -> dict:
    length = content_length(bottle.request.environ)
    if length is None or length > 64 * 1024:
        raise BadRequest("Send a JSON body with a Content-Length of at most 64 KiB.")
    try:
        data = json.loads(bottle.request.body.read() or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise BadRequest("The request body is not JSON.") from None
    if not isinstance(data, dict) or not all(isinstance(value, str) for value in data.values()):
        raise BadRequest('Expected a JSON object of strings, such as {"path": "photos"}.')
    return data


def _files_routes(app: bottle.Bottle, config: Config, engine: Engine) -> None:
    """/files and the admin API behind it."""

    @app.get("/files", auth=ADMIN)
    def files_page():
        return render_files_page(config, engine, bottle.request.environ)

    @app.get("/api/uploads", auth=ADMIN)
    def uploads_list():
        return _json(list_uploads(engine, decoded_query(bottle.request.query)))

    @app.delete("/api/uploads/<upload_id>", auth=ADMIN, report=True)
    def upload_delete(upload_id):
        info = engine.delete(upload_id)
        return _json(upload_entry(engine, info, None, engine.clock(), False))

    @app.get("/api/uploads/<upload_id>/file", auth=ADMIN)
    def upload_file(upload_id):
        return stored_file_response(engine, upload_id)

    @app.post("/api/cleanup", auth=ADMIN, report=True)
    def cleanup():
        return _json(remove_abandoned(engine))

    @app.get("/api/folders", auth=ADMIN)
    def folders():
        path = bottle.request.query.getunicode("path") or ""
        return _json(list_folders(engine, folder_path(path) if path else ""))

    @app.post("/api/folders", auth=ADMIN, report=True)
    def folder_create():
        return _json(change_folder(engine, "create", folder_path(_json_body().get("path", ""))), 201)

    @app.post("/api/folders/rename", auth=ADMIN, report=True)
    def folder_rename():
        body = _json_body()
        return _json(change_folder(engine, "rename", folder_path(body.get("path", "")), folder_path(body.get("to", ""))))

    @app.delete("/api/folders", auth=ADMIN, report=True)
    def folder_delete():
        return _json(change_folder(engine, "delete", folder_path(bottle.request.query.getunicode("path") or "")))


def render_files_page(config: Config, engine: Engine, environ: dict) -> bottle.HTTPResponse:
    credentials = environ.get("pyfiledrop.credentials") or Credentials(None)
    page_config = {"csrfHeader": CSRF_HEADER, "csrf": credentials.csrf, "loggedIn": credentials.via == "cookie",
                   "expireAfter": config.expire_after_s, "version": __version__}
    config_json = json.dumps(page_config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    html = FILES_HTML.replace("{{config_json}}", config_json).replace("{{version}}", __version__)
    response = bottle.HTTPResponse(html)
    response.content_type = "text/html; charset=utf-8"
    response.set_header("Content-Security-Policy", f"default-src 'self'; script-src '{_script_hash(html)}'; "
                        "style-src 'unsafe-inline'; img-src 'self'; connect-src 'self'; object-src 'none'; "
                        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Referrer-Policy", "no-referrer")
    response.set_header("Cache-Control", "no-store")
    return response


###############################################################################
# Sharing back: --share DIR ###################################################
###############################################################################
# The files of one folder, listed on the page and downloadable.  Nothing outside the folder is reachable: a
# path is refused unless it is plain names joined by "/" (no "..", ".", empty, hidden, NUL, backslash or colon
# parts, no percent-encoded "/" or "\"), and what it names, with every symlink resolved, must be a regular file
# inside the folder's real path.  With --s3, --share names a key prefix of the bucket instead: its objects are
# listed and streamed from the store under the same rules for paths (colons allowed: keys have no drives), and
# nothing under the store's own .pyfiledrop/ is ever reached.

SHARE_LIST_LIMIT = 10_000      # entries listed at most: a page stays quick, the JSON under a few MB
SHARED_SCRIPT_TAG = '<script src="/assets/shared.js" defer></script>'


def with_shared_list(html: str, config: Config) -> str:
    """The page with the shared-files list (its own script, which adds its own section) when --share is on."""
    if (config.share is None and config.share_prefix is None) or "</body>" not in html:
        return html
    return html.replace("</body>", SHARED_SCRIPT_TAG + "\n</body>", 1)


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


def shared_files(root: Path, limit: int = SHARE_LIST_LIMIT) -> tuple[list[dict], bool]:
    """([{"path", "size", "modified"}, ...] sorted by path, truncated): what ``resolve_shared`` would serve."""
    real_root = os.path.realpath(root)
    found: list[dict] = []
    for folder, subfolders, names in os.walk(real_root, onerror=lambda error: None):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        relative = os.path.relpath(folder, real_root)
        for name in sorted(names):
            path = name if relative == "." else f"{relative.replace(os.sep, '/')}/{name}"
            try:
                real = resolve_shared(root, path, real_root)
                path.encode("utf-8")
                stat = os.stat(real)
            except (UploadError, OSError, UnicodeEncodeError):
                continue
            if len(found) >= limit:
                return found, True
            found.append({"path": path, "size": stat.st_size, "modified": _iso_utc(stat.st_mtime)})
    return found, False


def _iso_utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def shared_path_parts(path: str, *, colons: bool = False) -> list[str]:
    """The names in a shared path ("folder/name"); BadRequest unless they are plain names joined by "/" (no
    "..", ".", empty parts, NUL or backslash, and no colon unless ``colons``: on a disk it names a drive or a
    stream), NotFound for a hidden one (a name starting with "."), which is neither listed nor served."""
    parts = path.split("/")
    if "\x00" in path or "\\" in path or any(part in ("", ".", "..") or (":" in part and not colons)
                                           for part in parts):
        raise BadRequest("Not a path to a shared file.")
    if any(part.startswith(".") for part in parts):
        raise NotFound("No such shared file.")
    return parts


def resolve_shared(root: Path, path: str, real_root: str | None = None) -> str:
    """The real path of the shared file ``path`` ("folder/name") under ``root``; BadRequest for a path that
    is no plain relative path, NotFound for anything else that is not a regular file inside the folder."""
    parts = shared_path_parts(path)
    real_root = real_root or os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if not _inside(real_root, real) or not os.path.isfile(real):
        raise NotFound("No such shared file.")
    return real


def shared_file_response(root: Path, path: str) -> bottle.HTTPResponse:
    """A download with Range support and the same safe headers as stored files'."""
    real = resolve_shared(root, path)
    response = bottle.static_file(os.path.basename(real), root=os.path.dirname(real),
                                  mimetype="application/octet-stream")
    if response.status_code >= 400 and response.status_code != 416:
        raise NotFound("No such shared file.")
    response.set_header("Content-Disposition", content_disposition(path.rsplit("/", 1)[-1]))
    response.set_header("X-Content-Type-Options", "nosniff")
    response.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
    response.set_header("Cache-Control", "no-cache")
    return response


class SharedFolder:
    """``--share DIR``: the files of a folder of this machine."""

    def __init__(self, root: Path):
        self.root = root

    def __str__(self) -> str:
        return str(self.root)

    def files(self, limit: int = SHARE_LIST_LIMIT) -> tuple[list[dict], bool]:
        return shared_files(self.root, limit)

    def response(self, path: str, range_header: str | None) -> bottle.HTTPResponse:
        return shared_file_response(self.root, path)  # bottle's static_file reads the Range itself


class SharedPrefix:
    """``--share PREFIX`` with ``--s3``: the objects under a key prefix of the bucket, listed and streamed from the
    store (with Range), as a shared folder's files are: the same paths and hidden names; never a key outside the
    prefix, nor one under the store's own .pyfiledrop/."""

    def __init__(self, store: ObjectStore, prefix: str):
        self.store = store
        self.prefix = parse_share_prefix(prefix)   # "" (the whole bucket) or ending in "/", whatever it was given

    def __str__(self) -> str:
        return f"{self.store.location.endpoint}/{self.store.bucket}/{self.prefix}"

    def files(self, limit: int = SHARE_LIST_LIMIT) -> tuple[list[dict], bool]:
        """As ``shared_files``: what ``response`` would serve, sorted by path (the store lists keys in order).  A
        hidden folder is stepped over, not paged through: the store's own .pyfiledrop/, with a record of every
        upload ever, is one when the uploads' prefix is shared."""
        found: list[dict] = []
        after = None
        while True:
            for item in self.store.listing(self.prefix, after):
                path = item["Key"][len(self.prefix):]
                folders = path.split("/")[:-1]
                hidden = next((depth for depth, name in enumerate(folders) if name.startswith(".")), None)
                past = self.prefix + "/".join(folders[:hidden + 1]) + "/\U0010ffff" if hidden is not None else after
                if past != after:  # a hidden folder's keys sort together: list on from past the last one it can hold
                    after = past
                    break
                try:
                    self.key(path)
                except UploadError:  # a "folder" marker (a key ending in "/"), a hidden file, a key too long
                    continue
                if len(found) >= limit:
                    return found, True
                found.append({"path": path, "size": item["Size"],
                              "modified": _iso_utc(item["LastModified"].timestamp())})
            else:
                return found, False

    def key(self, path: str) -> str:
        """The key of the shared ``path``; BadRequest for a path that is no plain relative path, NotFound for a
        hidden one and for what is pyfiledrop's own or longer than a key can be."""
        shared_path_parts(path, colons=True)
        try:
            key = self.prefix + path
            too_long = len(key.encode("utf-8")) > S3_MAX_KEY_BYTES
        except UnicodeEncodeError:
            raise BadRequest("Not a path to a shared file.") from None
        if too_long or key.startswith(self.store.meta("")):
            raise NotFound("No such shared file.")
        return key

    def response(self, path: str, range_header: str | None) -> bottle.HTTPResponse:
        response = s3_object_response(self.store, self.key(path), path.rsplit("/", 1)[-1], range_header)
        if response is None:
            raise NotFound("No such shared file.")
        response.set_header("Cache-Control", "no-cache")
        return response


def parse_share_prefix(text: str) -> str:
    """``--share`` with ``--s3``: a key prefix of the bucket, taken as a folder: names joined by "/" and ending in
    "/" ("public", "/public" and "public/" are one; "/" or "" is the whole bucket); ValueError for a prefix with
    ".", "..", a hidden name (.pyfiledrop is one), a backslash or NUL."""
    parts = [part for part in text.strip().split("/") if part]
    if any(part in (".", "..") or part.startswith(".") or "\\" in part or "\x00" in part for part in parts):
        raise ValueError(f"the key prefix {text!r} may not contain '.', '..', names starting with '.' or '\\'")
    return "".join(part + "/" for part in parts)


def shared_source(config: Config, engine=None) -> SharedFolder | SharedPrefix | None:
    """What ``--share`` shares: a folder, or with ``--s3`` a key prefix of the engine's store; None without it."""
    if config.share_prefix is not None:
        return SharedPrefix(engine.store, config.share_prefix) if engine is not None else None
    return SharedFolder(config.share) if config.share is not None else None


def _encoded_separator(environ: dict) -> bool:
    """Whether the path as sent has a percent-encoded "/" or "\\": no shared name holds one, so it can only be a
    try at another path (the server decodes it into a separator before the route sees it)."""
    target = environ.get("REQUEST_URI") or environ.get("RAW_URI") or ""
    return re.search(r"%(2f|5c)", target.split("?", 1)[0], re.IGNORECASE) is not None


def _share_routes(app: bottle.Bottle, shared: SharedFolder | SharedPrefix | None) -> None:
    @app.get("/api/shared")
    def shared_list():
        if shared is None:
            raise NotFound("Nothing is shared (start the server with --share DIR).")
        files, truncated = shared.files()
        return _json({"files": files, "truncated": truncated})

    @app.get("/shared/<path:path>")
    def shared_download(path):
        if shared is None:
            raise NotFound("Nothing is shared (start the server with --share DIR).")
        if _encoded_separator(bottle.request.environ):
            raise BadRequest("Not a path to a shared file.")
        return shared.response(path, bottle.request.get_header("Range"))

    @app.get("/assets/shared.js")
    def shared_script():
        if shared is None:
            return plain_response(404, "Not found.")
        response = bottle.HTTPResponse(SHARED_JS)
        response.content_type = "application/javascript; charset=utf-8"
        response.set_header("Cache-Control", "no-cache")
        response.set_header("X-Content-Type-Options", "nosniff")
        return response


# The shared list's own script (no inline code, so the page's Content-Security-Policy needs no change): it adds
# its section before the page's footer and fills it from /api/shared, names set as text, never as HTML.
SHARED_JS = r"""(function () {
  "use strict";
  function size(bytes) {  // as binary_size() in the console: powers of 1024, at most 4 significant digits
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
    return Number(bytes.toPrecision(4)) + " " + units[i];
  }
  function el(tag, text, style) {
    var node = document.createElement(tag);
    if (text) node.textContent = text;
    if (style) node.setAttribute("style", style);
    return node;
  }
  var section = el("section", "", "margin:24px 0 0");
  section.id = "shared";
  section.setAttribute("aria-labelledby", "shared-heading");
  var heading = el("h2", "Shared from this computer");
  heading.id = "shared-heading";
  var note = el("p", "", "color:var(--muted,#5f6b76);margin:0 0 8px");
  note.id = "shared-note";
  var list = el("ul", "", "list-style:none;padding:0;margin:0");
  list.id = "shared-list";
  section.append(heading, note, list);
  var main = document.querySelector("main") || document.body;
  main.insertBefore(section, main.querySelector("footer"));
  function show(reply) {
    list.textContent = "";
    reply.files.forEach(function (file) {
      var item = el("li", "", "padding:8px 0;border-bottom:1px solid var(--line,#d6dde3);display:flex;gap:8px;"
                              + "justify-content:space-between;flex-wrap:wrap");
      var link = el("a", file.path, "color:var(--accent,#0e7c86);overflow-wrap:anywhere");
      link.href = "/shared/" + file.path.split("/").map(encodeURIComponent).join("/");
      link.setAttribute("download", file.path.split("/").pop());
      item.append(link, el("span", size(file.size), "color:var(--muted,#5f6b76);font-variant-numeric:tabular-nums"));
      list.append(item);
    });
    note.textContent = !reply.files.length ? "The shared folder is empty."
      : reply.truncated ? "Only the first " + reply.files.length + " files are listed." : "";
    note.hidden = !note.textContent;
  }
  function load() {
    fetch("/api/shared", {cache: "no-store"}).then(function (response) {
      if (!response.ok) throw new Error(response.status);
      return response.json();
    }).then(show, function () { note.textContent = "The shared files could not be listed."; note.hidden = false; });
  }
  load();
  document.addEventListener("visibilitychange", function () { if (!document.hidden) load(); });
})();
"""


###############################################################################
# Text both ways: notes and the shared text ###################################
###############################################################################
# A box on the page sends a note (a message, a link) to this PC: one console line, kept in the ledger, listed on
# /files.  The text shared from this PC (--share-text, or set on /files) shows on the page with a Copy button.
# Both are hostile input to whoever reads them: pages set them as text (textContent, never HTML), the console
# shows them through visible_line, and a link is opened only when it is the whole text and http(s).

MAX_NOTE_BODY = 6 * MAX_NOTE_BYTES + 1024   # the JSON of the longest note, every character escaped (\u0001)
NOTES_PER_SENDER = 500                      # kept from one address (IPv6: one /64) until the admin deletes some
NOTE_BYTES_PER_SENDER = 8 * MIB
MAX_NOTES_LISTED = 200
SHARED_TEXT_KEY = "shared_text"


def sender_of(address: str) -> str:
    """Who counts as one sender for the caps: the address, an IPv6 one by its /64 (one device can rotate within
    it), as the password throttle counts them."""
    return _Throttle._key(address)


def note_text(request: dict) -> str:
    """The "text" of a note or shared-text request: a non-empty string of valid UTF-8, at most MAX_NOTE_BYTES."""
    text = request.get("text")
    if not isinstance(text, str):
        raise BadRequest('Send {"text": "..."}.')
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:   # a lone surrogate ("\ud800" in the JSON): no text any page could show
        raise BadRequest("The text is not valid Unicode.") from None
    if size > MAX_NOTE_BYTES:
        raise TooLarge(f"The text is {size} bytes; at most {MAX_NOTE_BYTES // 1024} KiB is accepted.")
    if not text.strip():
        raise BadRequest("The text is empty.")
    return text


def read_text_request(environ: dict) -> str:
    """A JSON {"text": ...} body: 413 before reading a body that cannot hold an acceptable text."""
    length = content_length(environ)
    if length is not None and length > MAX_NOTE_BODY:
        raise TooLarge(f"Too long: at most {MAX_NOTE_BYTES // 1024} KiB of text is accepted.")
    return note_text(read_json(environ, MAX_NOTE_BODY))


class TextBoard:
    """Notes from the page and the shared text, kept in the ledger (so both survive a restart)."""

    def __init__(self, ledger: Ledger, *, clock: Callable[[], float] = time.time,
                 events: Callable[[EngineEvent], None] = lambda event: None,
                 check_space: Callable[[int], None] = lambda size: None):
        self.ledger = ledger
        self.clock = clock
        self.events = events
        self.check_space = check_space   # the engine's free-space reserve: notes never fill the disk either
        self._lock = threading.Lock()    # the cap's count and the insert, together

    def receive(self, text: str, client: str) -> Note:
        sender = sender_of(client)
        with self._lock:
            count, size = self.ledger.sender_usage(sender)
            if count >= NOTES_PER_SENDER or size + len(text.encode("utf-8")) > NOTE_BYTES_PER_SENDER:
                raise TooManyNotes(f"This address has sent as many notes as the server keeps "
                                   f"({NOTES_PER_SENDER}, or {NOTE_BYTES_PER_SENDER // MIB} MiB): "
                                   "the admin can delete some on /files.")
            self.check_space(len(text.encode("utf-8")) * 2)
            note = Note(uuid.uuid4().hex, text, client, self.clock())
            try:
                self.ledger.add_note(note, sender)
            except sqlite3.Error as error:
                log.error("the ledger could not record a note: %s", error)
                raise StorageFailure("The server could not record the note.") from None
        self.events(NoteReceived(note))
        return note

    def page(self, limit: int = 50, before: int | None = None) -> dict:
        """GET /api/notes: newest first; "next" continues the list after the last one given."""
        rows = self.ledger.notes(limit + 1, before)
        more, rows = len(rows) > limit, rows[:limit]
        return {"notes": [note_entry(note) for _, note in rows], "next": str(rows[-1][0]) if more else None}

    def delete(self, note_id: str) -> dict:
        if not is_valid_id(note_id) or not self.ledger.delete_note(note_id):
            raise NotFound("No such note.")
        return {"id": note_id, "deleted": True}

    def shared(self) -> dict:
        kept = self.ledger.setting(SHARED_TEXT_KEY)
        return {"text": kept[0] if kept else None, "updated": iso_time(kept[1]) if kept else None}

    def share(self, text: str | None, by: str | None) -> dict:
        """Share ``text`` (None or "": stop sharing); one console line says who changed it (``by`` None: none,
        as at start, where the banner says it)."""
        text = text or None
        self.ledger.set_setting(SHARED_TEXT_KEY, text, self.clock())
        if by is not None:
            self.events(Notice(f"shared text {f'now {len(text)} characters' if text else 'cleared'} ({by})"))
        return self.shared()


class StatelessTextBoard:
    """Text both ways under ``--s3``: no notes (a node keeps nothing), and only the ``--share-text`` it was
    started with (give every node the same one); changing it from /files is refused."""

    def __init__(self, text: str | None):
        self.text, self.started = text or None, time.time()

    def _refuse(self, *args, **kwargs):
        raise NotWithObjectStore("Notes and shared text from /files are not kept with --s3; use --share-text.")

    receive = page = delete = share = _refuse

    def shared(self) -> dict:
        return {"text": self.text, "updated": iso_time(self.started) if self.text else None}


class TooManyNotes(UploadError):
    status = 429


def note_entry(note: Note) -> dict:
    return {"id": note.id, "text": note.text, "client": note.client, "created": iso_time(note.created)}


def _notes_cursor(text: str | None) -> int | None:
    if not text:
        return None
    if not _UINT_RE.match(text) or len(text) > 18:
        raise BadRequest("Malformed ?before= (use the \"next\" of the previous page).")
    return int(text)


def _text_routes(app: bottle.Bottle, board: TextBoard, client: Callable[[], str]) -> None:
    """POST /api/notes (uploaders), the notes list and delete (admin), the shared text (read: uploaders)."""

    @app.post("/api/notes", report=True)
    def note_send():
        if _cross_site(bottle.request.environ):   # also without a password: a JSON body is not enough alone
            raise Forbidden("A request from another site was refused.")
        note = board.receive(read_text_request(bottle.request.environ), client())
        return _json({"id": note.id, "created": iso_time(note.created)}, 201)

    @app.get("/api/notes", auth=ADMIN)
    def notes_list():
        limit = bottle.request.query.get("limit") or "50"
        if not _UINT_RE.match(limit) or not 1 <= int(limit) <= MAX_NOTES_LISTED:
            raise BadRequest(f"?limit= is a number from 1 to {MAX_NOTES_LISTED}.")
        return _json(board.page(int(limit), _notes_cursor(bottle.request.query.get("before"))))

    @app.delete("/api/notes/<note_id>", auth=ADMIN, report=True)
    def note_delete(note_id):
        return _json(board.delete(note_id))

    @app.get("/api/shared-text")
    def shared_text():
        return _json(board.shared())

    @app.put("/api/shared-text", auth=ADMIN, report=True)
    def shared_text_set():
        return _json(board.share(read_text_request(bottle.request.environ), f"from /files by {client()}"))

    @app.delete("/api/shared-text", auth=ADMIN, report=True)
    def shared_text_clear():
        return _json(board.share(None, f"from /files by {client()}"))


# The page's text box and shared text, a script of its own (no inline code, so the page's Content-Security-Policy
# needs no change): it adds its section above the "Uploaded" list.  Every text is set with textContent or value.
TEXT_JS = r"""(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("pyfiledrop-config").textContent);
  var POLL_MS = 5000;   // the shared text changes rarely; a phone sees a change within seconds
  function el(tag, attributes, text) {
    var node = document.createElement(tag);
    Object.keys(attributes || {}).forEach(function (name) { node.setAttribute(name, attributes[name]); });
    if (text) node.textContent = text;
    return node;
  }
  var style = el("style", {}, [
    "#text-box textarea { font: inherit; width: 100%; min-height: 4.5em; padding: 8px; border-radius: 8px;",
    "  border: 1px solid var(--line); background: var(--card); color: var(--fg); resize: vertical; }",
    "#text-box textarea:focus-visible { outline: 3px solid #ffbf47; outline-offset: 2px; }",
    "#text-box label { display: block; margin: 0 0 4px; }",
    "#shared-text-area { border: 1px solid var(--line); border-radius: 10px; background: var(--card);",
    "  padding: 8px 10px; margin: 0 0 16px; }",
    "#shared-text { white-space: pre-wrap; overflow-wrap: anywhere; font: inherit; margin: 4px 0 8px;",
    "  max-height: 40vh; overflow: auto; }",
    "#shared-text-area h3 { font-size: 1rem; margin: 0; }",
    "#text-box a { color: var(--accent); overflow-wrap: anywhere; }",
    "#text-box .pf-tools { align-items: center; margin-top: 8px; }",
    "#note-status.pf-bad, #copy-status.pf-bad { color: var(--bad); font-weight: 600; }"].join("\n"));
  document.head.appendChild(style);

  var section = el("section", { id: "text-box", "aria-labelledby": "text-heading" });
  section.appendChild(el("h2", { id: "text-heading" }, "Text"));
  var area = el("div", { id: "shared-text-area" });
  area.hidden = true;
  area.appendChild(el("h3", { id: "shared-text-heading" }, "Shared from this computer"));
  var shared = el("pre", { id: "shared-text", tabindex: "0", "aria-labelledby": "shared-text-heading" });
  var linkLine = el("p", { id: "shared-link-line", class: "pf-meta" }, "Open: ");
  var link = el("a", { id: "shared-link", target: "_blank", rel: "noopener noreferrer" });
  linkLine.appendChild(link);
  var copyTools = el("div", { class: "pf-tools" });
  var copy = el("button", { type: "button", id: "copy-shared-text" }, "Copy");
  var copyStatus = el("span", { id: "copy-status", role: "status" });
  copyTools.append(copy, copyStatus);
  area.append(shared, linkLine, copyTools);
  var label = el("label", { for: "note-text" }, "Send a note or a link to this computer");
  var box = el("textarea", { id: "note-text", rows: "3", "aria-describedby": "note-status" });
  var sendTools = el("div", { class: "pf-tools" });
  var send = el("button", { type: "button", id: "send-note", class: "pf-main" }, "Send text");
  var sendStatus = el("span", { id: "note-status", role: "status", "aria-live": "polite" });
  sendTools.append(send, sendStatus);
  section.append(area, label, box, sendTools);
  var main = document.querySelector("main") || document.body;
  var uploaded = document.getElementById("uploaded-heading");
  var before = uploaded ? uploaded.closest("section") : main.querySelector("footer");
  main.insertBefore(section, before && before.parentNode === main ? before : null);

  function say(node, text, bad) { node.textContent = text; node.className = bad ? "pf-bad" : ""; }
  function csrfHeaders(headers) {   // as the uploader: the login's CSRF cookie echoed (behind --password)
    var match = document.cookie.match(new RegExp("(?:^|;\\s*)" + cfg.csrfCookie + "=([^;]*)"));
    if (match) headers[cfg.csrfHeader] = decodeURIComponent(match[1]);
    return headers;
  }
  // A link is offered only when it is the whole text and http(s): "javascript:" and the like never become one,
  // and the link shows the address it opens (as the browser parsed it: punycode for look-alike host names).
  function onlyLink(text) {
    var trimmed = text.trim(), url;
    if (!trimmed || /\s/.test(trimmed)) return null;
    try { url = new URL(trimmed); } catch (error) { return null; }
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  }

  var current = null;
  function showShared(text) {
    if (text === current) return;   // unchanged: a selection the person is making stays
    current = text;
    area.hidden = !text;
    shared.textContent = text || "";
    var href = text ? onlyLink(text) : null;
    linkLine.hidden = !href;
    if (href) { link.href = href; link.textContent = href; } else { link.removeAttribute("href"); }
    say(copyStatus, "");
    section.dataset.shared = String(Date.now());
  }
  function loadShared() {
    return fetch("/api/shared-text", { cache: "no-store" }).then(function (response) {
      if (!response.ok) throw new Error(String(response.status));
      return response.json();
    }).then(function (reply) { showShared(reply.text); }, function () { /* kept as shown; tried again soon */ });
  }
  // navigator.clipboard exists only in a secure context (HTTPS, localhost); over plain HTTP on the LAN the
  // text is selected and copied with execCommand, and where even that is refused it stays selected.
  function selectShared() {
    var range = document.createRange();
    range.selectNodeContents(shared);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    try { return document.execCommand("copy"); } catch (error) { return false; }
  }
  function copied(done) {
    say(copyStatus, done ? "Copied" : "Select and copy: the text is selected", !done);
    section.dataset.copied = done ? "clipboard" : "selected";
  }
  copy.addEventListener("click", function () {
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(current || "").then(function () { copied(true); },
                                                         function () { copied(selectShared()); });
    } else {
      copied(selectShared());
    }
  });

  function sendNote() {
    var text = box.value;
    if (!text.trim()) { say(sendStatus, "Type a note or paste a link first.", true); box.focus(); return; }
    if (new TextEncoder().encode(text).length > cfg.noteMaxBytes) {
      say(sendStatus, "Too long: at most " + Math.floor(cfg.noteMaxBytes / 1024) + " KiB of text.", true);
      return;
    }
    send.disabled = true;
    say(sendStatus, "Sending\u2026");
    fetch("/api/notes", { method: "POST", cache: "no-store", body: JSON.stringify({ text: text }),
                          headers: csrfHeaders({ "Content-Type": "application/json" }) }).then(function (response) {
      if (response.status === 401) { location.reload(); return; }
      if (response.ok) {
        if (box.value === text) box.value = "";
        say(sendStatus, "Sent at " + new Date().toLocaleTimeString() + ".");
        return;
      }
      return response.text().then(function (message) {
        say(sendStatus, "Not sent: " + (message.trim() || "the server answered " + response.status + "."), true);
      });
    }, function () {
      say(sendStatus, "Not sent: the server cannot be reached. Your text is still in the box.", true);
    }).then(function () { send.disabled = false; });
  }
  send.addEventListener("click", sendNote);
  box.addEventListener("keydown", function (event) {   // Ctrl+Enter (Cmd+Enter) sends; Enter is a new line
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); sendNote(); }
  });

  loadShared();
  setInterval(function () { if (!document.hidden) loadShared(); }, POLL_MS);
  document.addEventListener("visibilitychange", function () { if (!document.hidden) loadShared(); });
})();
"""


###############################################################################
# Console #####################################################################
###############################################################################

_VIRTUAL_PREFIXES = ("172.17.", "172.18.", "172.19.", "192.168.56.", "192.168.99.", "10.0.75.")
# Adapters no phone on the LAN can reach through: containers, virtual machines, WSL, VPN tunnels.
_VIRTUAL_NAMES = ("docker", "br-", "veth", "virbr", "vboxnet", "vmnet", "vethernet", "lxc", "lxd", "podman", "cni",
                  "flannel", "cali", "tun", "tap", "utun", "wg", "tailscale", "zt")
_SIOCGIFADDR = {"linux": 0x8915, "darwin": 0xC0206921}   # ioctl: the IPv4 address of one interface


def _interface_addresses() -> list[tuple[str, str]]:
    """(interface name, IPv4 address) per interface that has one, asked of the kernel; [] where it cannot say."""
    request = _SIOCGIFADDR.get(sys.platform)
    if request is None or not hasattr(socket, "if_nameindex"):
        return []
    try:
        import fcntl
        import struct

        found = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            for _, name in socket.if_nameindex():
                try:
                    reply = fcntl.ioctl(probe.fileno(), request, struct.pack("256s", name.encode()[:15]))
                except OSError:  # no IPv4 address on this interface
                    continue
                found.append((name, socket.inet_ntoa(reply[20:24])))
        return found
    except (OSError, ImportError, OverflowError, ValueError):
        return []


def _default_route_address() -> str | None:
    """The source address of the default route.  Connecting a UDP socket only asks the OS: nothing is sent."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1
        return probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()


def lan_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine, the most likely LAN address first.

    Order: the address of the default route, then private (RFC 1918) addresses, then others; adapters that are
    virtual (Docker, WSL, VirtualBox, VPNs: by interface name, or by well-known address where names are unknown)
    go last.  Linux and macOS ask the kernel for each interface's address; elsewhere the host name's addresses
    are used.  Nothing is sent to any address.
    """
    import ipaddress

    named = _interface_addresses()
    if not named:
        try:
            named = [("", info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)]
        except OSError:
            named = []
    default = _default_route_address()
    if default and default not in {address for _, address in named}:
        named.insert(0, ("", default))

    def virtual(name: str, address: str) -> bool:
        if name:
            return name.lower().startswith(_VIRTUAL_NAMES)
        # No name (Windows): Hyper-V's switches (WSL, Default Switch) take x.y.z.1 in 172.16.0.0/12.
        return address.startswith(_VIRTUAL_PREFIXES) or (
            ipaddress.ip_address(address) in ipaddress.ip_network("172.16.0.0/12") and address.endswith(".1")
            and address != default)

    candidates: dict[str, tuple] = {}
    for position, (name, address) in enumerate(named):
        if address in candidates or address.startswith(("127.", "0.", "169.254.")):
            continue
        candidates[address] = (virtual(name, address), address != default,
                               not ipaddress.ip_address(address).is_private, position)
    return sorted(candidates, key=candidates.__getitem__)


def page_urls(host: str, port: int, *, scheme: str = "http") -> list[str]:
    if host in ("0.0.0.0", "", "::"):
        hosts = lan_addresses() or ["127.0.0.1"]
    else:
        hosts = [f"[{host}]" if ":" in host else host]
    return [f"{scheme}://{h}:{port}/" for h in hosts]


def banner(config: Config, urls: list[str], tls: TLSIdentity | None = None, shared_text: str | None = None,
           shared: SharedFolder | SharedPrefix | None = None) -> str:
    """``shared``: what --share shares (by default the folder of ``config``; a key prefix needs the store)."""
    ttl = f"{config.partial_ttl_hours:g} h"
    lines = [
        f"pyfiledrop {__version__}",
        *([f"  saving to      {config.storage}",
           f"  partial files  {config.chunks} (unfinished uploads, removed after {ttl} untouched)"]
          if config.s3 is None else
          [f"  saving to      {config.s3} (unfinished uploads removed after {ttl} untouched)"]),
        f"  limits         files up to {binary_size(config.max_size_bytes)}; "
        f"chunks of {binary_size(config.chunk_size)}, "
        f"{config.parallel_chunks} at a time; {config.timeout_ms / 1000:g} s per chunk",
        f"  downloads      {'allowed' if config.allow_downloads else 'off'}",
        f"  access         {access_summary(config)}",
        *expiry_banner_lines(config),
        *tls_banner_lines(tls),
        *share_banner_lines(shared or shared_source(config)),
        *shared_text_banner_lines(config, shared_text),
        *page_banner_lines(config),
        *address_banner_lines(config.host, urls),
    ]
    return "\n".join(lines)


def is_loopback(host: str) -> bool:
    """Whether ``--host`` lets only this machine connect (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address_banner_lines(host: str, urls: list[str]) -> list[str]:
    if is_loopback(host):
        return [f"Reachable from this machine only (--host {host}); open:", f"  {urls[0]}"]
    port = urlsplit(urls[0]).port
    return [
        "Open this address on a phone or PC on this network:" if len(urls) == 1 else
        "Open one of these addresses on a phone or PC on this network (the first is the most likely):",
        *(f"  {url}" for url in urls),
        CONNECTION_TROUBLE.format(port=port),
    ]


# One line for when no phone can connect: the two causes behind nearly every case.
CONNECTION_TROUBLE = "No connection? Allow TCP port {port} in this computer's firewall; guest Wi-Fi may isolate devices."


def page_banner_lines(config: Config) -> list[str]:
    """Say so when another page than the built-in one is served (an index.html beside the program is easy to
    forget)."""
    if config.index is None:
        return []
    if config.index == _program_dir() / "index.html":
        return [f"  page           {config.index} (found beside the program; it replaces the built-in page)"]
    return [f"  page           {config.index} (--index; the built-in page if it goes away)"]


def share_banner_lines(shared: SharedFolder | SharedPrefix | None) -> list[str]:
    if shared is None:
        return []
    files, truncated = shared.files()
    count = f"{len(files)}{'+' if truncated else ''} file{'' if len(files) == 1 else 's'}"
    return [f"  sharing        {shared} ({count}, listed on the page for download)"]


def shared_text_banner_lines(config: Config, text: str | None) -> list[str]:
    """Text kept from an earlier start is easy to forget: the banner says it is still on the page."""
    if not text:
        return []
    origin = "--share-text" if config.share_text else "kept from an earlier start"
    return [f"  shared text    {len(text)} characters ({origin}), on the page for everyone who may see it; "
            "clear it on /files or with --share-text \"\""]


def tls_banner_lines(tls: TLSIdentity | None) -> list[str]:
    """What HTTPS serves with, and the fingerprint a person compares with what the phone shows."""
    if tls is None:
        return []
    what = {"new": "a self-signed certificate made now (kept in the chunks folder for later starts)",
            "kept": "the self-signed certificate made at an earlier start",
            "renewed": "the self-signed certificate made again (ending, or a new address): phones ask again",
            "own": f"the certificate {tls.certificate}"}[tls.origin]
    half = len(tls.fingerprint) // 2 + 1
    lines = [f"  HTTPS          {what}"]
    if tls.origin != "own":
        lines.append("                 a phone warns it is not trusted: accept it only if its SHA-256 matches")
    return lines + [f"  SHA-256        {tls.fingerprint[:half - 1]}", f"                 {tls.fingerprint[half:]}"]


def access_summary(config: Config) -> str:
    """Who may do what, in one banner line."""
    uploads = "uploads need the password" if config.password else "uploads open to anyone who reaches the port"
    files = "/files needs the admin password" if config.admin_password else "/files off (no --admin-password)"
    return f"{uploads}; {files}"


def expiry_banner_lines(config: Config) -> list[str]:
    if not config.expire_after_s:
        return []
    return [f"  expiry         stored files are removed {_duration_text(config.expire_after_s)} after they are stored"]


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def qr_code(text: str, *, ansi: bool = False, blocks: bool = True) -> list[str]:
    """``text`` as a QR code drawn with characters; ImportError without the optional ``segno`` package.

    Two modules per character cell with half blocks.  With ``ansi`` the code is drawn black on white whatever
    the terminal's colours; without, light modules are drawn as blocks, which reads right on the usual dark
    console (and scanners read the inverse too).  ``blocks=False`` draws with "##" for consoles without them.
    """
    import segno

    rows = [[bool(module) for module in row]
            for row in segno.make(text, error="m", micro=False).matrix_iter(scale=1, border=2)]
    if not blocks:
        return ["".join("  " if dark else "##" for dark in row) for row in rows]
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))
    glyphs = {(True, True): "\u2588", (True, False): "\u2580", (False, True): "\u2584", (False, False): " "}
    lines = []
    for top, bottom in zip(rows[0::2], rows[1::2]):
        if ansi:  # black foreground on white: dark modules are drawn
            lines.append("\x1b[30;47m" + "".join(glyphs[t, b] for t, b in zip(top, bottom)) + "\x1b[0m")
        else:  # light modules are drawn
            lines.append("".join(glyphs[not t, not b] for t, b in zip(top, bottom)))
    return lines


def _enable_ansi(out) -> bool:
    """Whether ``out`` is a terminal that understands colour escapes (switched on in Windows consoles)."""
    try:
        if not out.isatty():
            return False
    except (AttributeError, ValueError):
        return False
    if os.name != "nt":
        return os.environ.get("TERM") != "dumb"
    try:
        import ctypes
        import msvcrt

        kernel32 = ctypes.windll.kernel32
        handle = msvcrt.get_osfhandle(out.fileno())
        mode = ctypes.c_uint32()
        if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        return bool(kernel32.SetConsoleMode(handle, mode.value | 0x0004))  # ENABLE_VIRTUAL_TERMINAL_PROCESSING
    except Exception:
        return False


def _can_encode(out, text: str) -> bool:
    try:
        text.encode(getattr(out, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


class Console:
    """Everything the server prints while it runs: log lines, and the progress of uploads that take a while.

    Progress appears for a file once it has been arriving for PROGRESS_AFTER_S, then at most every
    PROGRESS_EVERY_S.  On a terminal it is one status line redrawn in place under the log; otherwise (a pipe,
    a log file) one plain line per file each time.
    """

    PROGRESS_AFTER_S = 2.0
    PROGRESS_EVERY_S = 1.0
    FORGET_AFTER_S = 60.0   # an upload the client gave up on leaves the status line

    def __init__(self, out=None, *, quiet: bool = False, tty: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.out = out or sys.stdout
        self.quiet = quiet
        if tty is None:
            try:
                tty = self.out.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.clock = clock
        self._lock = threading.Lock()
        self._uploads: dict[str, dict] = {}
        self._status = ""          # the status line now on screen (terminal only)
        self._status_shown = None  # when it was last drawn
        self._session_start = time.time()
        self._finished = False     # after the last line, requests still being cut off print nothing
        self._ellipsis = "\u2026" if _can_encode(self.out, "\u2026") else "..."

    # -- output -------------------------------------------------------------------------------------------
    def _emit(self, text: str) -> None:
        if self._finished:
            return
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):  # a closed or broken stdout must not break uploads
            pass

    def _clear_status(self) -> None:
        if self._status:
            self._emit("\r" + " " * len(self._status) + "\r")
            self._status = ""

    def write(self, text: str) -> None:
        """Print ``text`` (one or more lines), keeping the status line below it."""
        with self._lock:
            status = self._status
            self._clear_status()
            self._emit(text + "\n")
            if status:
                self._draw(status)

    def _draw(self, text: str) -> None:
        width = shutil.get_terminal_size((80, 24)).columns - 1
        self._status = text[:width]
        self._emit(self._status)

    # -- engine events ----------------------------------------------------------------------------------------
    def handle(self, event: EngineEvent) -> None:
        """The engine's (and the error plugin's) events, as console lines."""
        if isinstance(event, Progress):
            self.progress(event)
        elif isinstance(event, Stored):
            self.stored(event.info)
        elif isinstance(event, Refused):
            verb = "failed" if event.status >= 500 else "refused"
            self.log_line(f"{verb} {event.what} from {event.client or '-'}: {event.status} {event.message}",
                          warning=event.status >= 500 or event.status in (413, 507))
        elif isinstance(event, Notice):
            self.log_line(event.text, warning=event.warning)
        elif isinstance(event, NoteReceived):
            self.note(event.note)

    NOTE_SHOWN_CHARS = 120   # the console shows a note's start; /files and the ledger keep all of it

    def note(self, note: Note) -> None:
        """A note as one line: who sent it, how long it is, its start with nothing a terminal would obey."""
        text = visible_line(note.text, self.NOTE_SHOWN_CHARS, self._ellipsis)
        encoding = getattr(self.out, "encoding", None)
        if encoding:   # what the console cannot show, as escapes (else the whole line would be lost)
            with contextlib.suppress(LookupError):
                text = text.encode(encoding, "backslashreplace").decode(encoding)
        self.log_line(f"note from {note.client or '-'} ({len(note.text)} characters): {text}")

    def log_line(self, text: str, *, warning: bool = False) -> None:
        if warning:
            log.warning("%s", text)
        else:
            log.info("%s", text)

    def stored(self, info: UploadInfo) -> None:
        with self._lock:
            if self._uploads.pop(info.id, None) is not None and self.tty:
                self._refresh(self.clock(), force=True)
        if not log.isEnabledFor(logging.INFO):  # --quiet: the line would be made only to be dropped
            return
        seconds = max((info.finished or 0) - info.created, 1e-6)
        digest = (info.sha256 or "")[:12] + self._ellipsis  # enough to compare by eye; the ledger keeps it all
        self.log_line(f'stored "{info.stored_name}" {binary_size(info.size or 0)} in {seconds:.1f} s '
                      f"({(info.size or 0) / seconds / MIB:.1f} MiB/s) sha256 {digest} from {info.client or '-'}")

    # -- progress -----------------------------------------------------------------------------------------
    def progress(self, event: Progress) -> None:
        """``event.received`` bytes of an upload are here: a line at most once a second, after two seconds."""
        if self.quiet:
            return
        now = self.clock()
        with self._lock:
            self._forget_stale(now)
            upload = self._uploads.get(event.upload_id)
            if upload is None:
                if event.started >= self._session_start:  # begun in this session: measure from its start
                    upload = {"since": now - max(0.0, time.time() - event.started), "base": 0}
                else:  # resumed from an earlier session: measure from now
                    upload = {"since": now, "base": event.received}
                upload["shown"] = None
                self._uploads[event.upload_id] = upload
            upload.update(name=event.name, done=event.received, size=event.size, seen=now)
            if now - upload["since"] < self.PROGRESS_AFTER_S:
                return
            if self.tty:
                self._refresh(now)
            elif upload["shown"] is None or now - upload["shown"] >= self.PROGRESS_EVERY_S:
                upload["shown"] = now
                self._emit(f"{time.strftime('%H:%M:%S')} receiving {self._describe(upload, now)}\n")

    def _describe(self, upload: dict, now: float) -> str:
        return f'"{upload["name"]}" {self._details(upload, now)[0]}'

    def _details(self, upload: dict, now: float) -> tuple[str, str]:
        """(all details, the shortest) of an upload's progress, without its name."""
        elapsed = max(now - upload["since"], 1e-6)
        rate = (upload["done"] - upload["base"]) / elapsed
        size = upload["size"]
        if size is None:  # a body of unknown length
            return f"{binary_size(upload['done'])} so far, {rate / MIB:.1f} MiB/s", binary_size(upload["done"])
        percent = 100 * upload["done"] // max(size, 1)
        text = f"{percent}% of {binary_size(size)}, {rate / MIB:.1f} MiB/s"
        if rate > 0:
            text += f", {max(0, size - upload['done']) / rate:.0f} s left"
        return text, f"{percent}%"

    def _forget_stale(self, now: float) -> None:
        for upload_id in [key for key, upload in self._uploads.items()
                          if now - upload["seen"] > self.FORGET_AFTER_S]:
            del self._uploads[upload_id]

    def _refresh(self, now: float, force: bool = False) -> None:
        """Redraw the terminal status line: every upload under way for a while, at most once a second."""
        if not force and self._status_shown is not None and now - self._status_shown < self.PROGRESS_EVERY_S:
            return
        shown = [upload for upload in self._uploads.values() if now - upload["since"] >= self.PROGRESS_AFTER_S]
        self._clear_status()
        self._status_shown = now
        if shown:
            width = shutil.get_terminal_size((80, 24)).columns - 1
            items = [(upload["name"], *self._details(upload, now)) for upload in shown]
            self._draw(fit_status(items, width, self._ellipsis))

    def finish(self, text: str) -> None:
        """The last line: clears the status line (and the terminal's "^C") first."""
        with self._lock:
            self._clear_status()
            self._emit(("\r" if self.tty else "") + text + "\n")
            self._finished = True


def fit_status(items: list[tuple[str, str, str]], width: int, ellipsis: str = "\u2026") -> str:
    """One status line for uploads (name, all details, shortest details) that fits ``width`` uncut: names
    shortened in the middle first, then only the shortest details, then a count."""
    for detail in (1, 2):
        for budget in (None, 40, 24, 12):
            text = "receiving " + " | ".join(f'"{_shorten(item[0], budget, ellipsis)}" {item[detail]}'
                                             for item in items)
            if len(text) <= width:
                return text
    text = f"receiving {len(items)} files: " + ", ".join(item[2] for item in items)
    return text if len(text) <= width else f"receiving {len(items)} files"[:width]


def _shorten(name: str, budget: int | None, ellipsis: str) -> str:
    if budget is None or len(name) <= budget:
        return name
    tail = min(8, budget // 3)  # the end of a name (its extension, a number) tells files apart
    return name[:budget - tail - len(ellipsis)] + ellipsis + name[-tail:]


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.write(self.format(record))
        except Exception:
            self.handleError(record)


###############################################################################
# HTTP server #################################################################
###############################################################################
# pyfiledrop's own HTTP/1.1 server for the WSGI app, standard library only.  One selector thread owns every
# connection that is not running a request (new, idle keep-alive, request head still arriving), so an idle or
# slow connection costs a socket and a few hundred bytes, never a thread.  A complete request head goes to a
# worker thread, which runs the app with the request body read straight from the socket into the app's buffer,
# writes the response and hands the connection back.  Every figure is a field of ServerLimits.


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """The server's limits and timeouts, with the reason for each.

    Real links, slowest first: a phone on 2G/EDGE uploads 20-50 KB/s, which a browser may share between up to
    6 connections to one host, so at least ~3 KB/s per connection; 3G and poor Wi-Fi give 100 KB/s and more.
    A slowloris client sends about 1 byte per second per connection to hold it open.  The figures below sit
    far under every real link and far above slowloris.
    """

    head_timeout: float = 10.0
    """Seconds from the first byte of a request head to its end.  A head is under 2 KB: 0.1 s on 2G."""
    idle_timeout: float = 30.0
    """Seconds a keep-alive connection may wait for its next request (or a new one for its first byte).
    The page sends the next chunk within milliseconds of the last reply, so 30 s only closes connections a
    browser parked; it reconnects when it needs one (nginx's keepalive_timeout is 75 s; Apache's is 5 s)."""
    max_head_bytes: int = 64 * 1024
    """A request line and headers larger than this get 431 (browsers send under 2 KB)."""
    min_rate_bytes: int = 16 * 1024
    min_rate_window: float = 20.0
    """A request body (or a response) that moves fewer than min_rate_bytes in any min_rate_window seconds
    spent waiting for the client is cut: 0.8 KiB/s, a quarter of the slowest real link above, 800 times
    slowloris.  Only time spent waiting for the client counts, not time the app spends between reads."""
    max_connections: int = 4096
    """Open connections in all (lowered to fit under the open-file limit, which start-up raises to its hard
    maximum).  At the cap a new connection closes the oldest parked connection of the busiest address."""
    max_connections_per_address: int = 512
    """Open connections from one address; over it, that address's oldest parked (idle or head pending)
    connection is closed to make room, so a new connection is never refused for this.  A browser opens 6
    per host; 512 leaves room for many devices behind one NAT address and still keeps one address to an
    eighth of max_connections."""
    max_busy_per_address: int = 128
    """Requests from one address running in workers at once; a complete request head over this gets 503 and
    the connection is closed.  Half of max_workers: one address can never take every worker, while a script
    with a hundred parallel uploads still runs."""
    max_workers: int = 256
    """Worker threads at most (started on demand, ended after worker_idle_timeout without work); further
    complete requests wait in a queue, holding no thread."""
    worker_idle_timeout: float = 60.0
    drain_bytes: int = 64 * 1024 * 1024
    """After a response, an unread request body up to this size is read off to keep the connection."""
    linger: float = 0.05
    """After a response, a worker waits this long for the same connection's next request before parking it
    in the selector: the page sends its next chunk, and a script its next file, one round trip after the
    reply (over Wi-Fi 2 to 30 ms; on a loaded machine a local client's threads take turns), and handing a
    connection back and forth costs more than a small file's whole request.  5 ms let 10-20% of the requests
    of eight local clients go through the selector (bench/README.md, 1.3)."""
    listen_backlog: int = 1024
    """Connections the kernel queues before the selector accepts them (it accepts as fast as they come)."""


class BodyIncomplete(ConnectionError):
    """The client closed the connection, or the request body ended early or is malformed."""


class BodyTooSlow(TimeoutError):
    """The request body moved slower than ServerLimits' minimum rate."""


_HEAD_END = b"\r\n\r\n"
HEAD_READ = 8192   # a request head is read this much at a time: little of a body arrives with it, to be copied
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_VERSION_RE = re.compile(rb"HTTP/(\d)\.(\d)\Z")
_BAD_TARGET_RE = re.compile(rb"[\x00-\x20\x7f]")   # a control byte or a space in the request target
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\Z")
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
_SEND_BLOCK = 64 * 1024    # a response's first block this small goes out in one send with the headers
SERVER_HEADER = "Server: pyfiledrop"   # no version: an attacker learns nothing to look up


class _Connection:
    __slots__ = ("sock", "address", "port", "buffer", "since", "head_started", "busy", "closed", "tls_started")

    def __init__(self, sock: socket.socket, address: str, port: int, now: float):
        self.sock, self.address, self.port = sock, address, port
        self.buffer = bytearray()    # bytes of the next request head that have arrived
        self.since = now             # when it was parked (accepted, or handed back after a response)
        self.head_started = None     # when the first byte of the head now arriving came
        self.busy = False            # running a request in a worker (else parked in the selector)
        self.closed = False
        self.tls_started = None      # HTTPS: when the connection came, until its TLS handshake is done


class _Wire:
    """A connection's socket as a worker uses it, with the minimum rate enforced.

    The socket stays non-blocking and a read or write is tried first; only when nothing is ready does the
    worker wait in poll.  A Python socket with a timeout polls before every call and switches its blocking
    mode with an ioctl when the timeout changes: three more system calls per small request, each letting
    another thread take the interpreter lock.
    """

    def __init__(self, sock: socket.socket, limits: ServerLimits):
        self.sock = sock
        self.window, self.minimum = limits.min_rate_window, limits.min_rate_bytes
        self.waited = 0.0   # seconds spent waiting for the client in this window
        self.moved = 0      # bytes moved in this window
        if sock.gettimeout() != 0.0:
            sock.setblocking(False)

    def _account(self, started: float, count: int) -> None:
        self.waited += time.monotonic() - started
        self.moved += count
        if self.waited >= self.window:
            if self.moved < self.minimum:
                raise BodyTooSlow(f"fewer than {self.minimum} bytes in {self.window:g} s")
            self.waited, self.moved = 0.0, 0

    def _wait(self, writable: bool) -> None:
        """Until the socket is ready, or what is left of the window has passed (counted as waiting)."""
        started = time.monotonic()
        wait_ready(self.sock, max(self.window - self.waited, 0.01), writable)
        self._account(started, 0)

    def recv_into(self, view) -> int:
        while True:
            try:
                count = self.sock.recv_into(view)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                self._wait(writable=False)
                continue
            except ssl.SSLWantWriteError:
                self._wait(writable=True)
                continue
            if not count:
                raise BodyIncomplete("the client closed the connection")
            self.moved += count
            return count

    def recv_waiting_into(self, view) -> int:
        """What has arrived already, without waiting: 0 when nothing has (or the connection ended or broke,
        which the next ``recv_into`` reports)."""
        try:
            count = self.sock.recv_into(view)
        except OSError:  # nothing yet (BlockingIOError, ssl.SSLWantReadError) or broken
            return 0
        self.moved += count
        return count

    def send(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            try:
                count = self.sock.send(view)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                self._wait(writable=True)
                continue
            except ssl.SSLWantReadError:
                self._wait(writable=False)
                continue
            self.moved += count
            view = view[count:]

    def sendfile(self, file, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``file`` from ``offset`` with os.sendfile; returns the bytes sent."""
        fd, out, sent = file.fileno(), self.sock.fileno(), 0
        while sent < count:
            try:
                done = os.sendfile(out, fd, offset + sent, min(count - sent, 1 << 30))
            except BlockingIOError:
                self._wait(writable=True)
                continue
            if done == 0:
                break  # the file is shorter than it said
            self.moved += done
            sent += done
        return sent


class _RequestBody:
    """``wsgi.input``: the request body, read from the socket into the caller's buffer.

    ``readinto(buffer)`` returns the bytes read, 0 only at the end of the body; ``read(size=-1)`` and
    ``readline(size=-1)`` return bytes.  Bytes that arrived with the head are served first, then the socket's
    ``recv_into`` fills the caller's buffer directly.  Content-Length and chunked bodies (decoded, trailers
    skipped) are both handled; "100 Continue" is sent on the first read when the client expects it.  A client
    that disconnects, ends the body early or breaks the chunked framing raises BodyIncomplete (a
    ConnectionError); one slower than the minimum rate raises BodyTooSlow (a TimeoutError).
    """

    def __init__(self, wire: _Wire, pending: bytes, length: int | None, chunked: bool, expect_continue: bool):
        self._wire = wire
        self._pending = memoryview(pending)   # bytes that came with the head (or past a chunk-size line)
        self._length = length if not chunked else None
        self._remaining = length or 0          # of the body (Content-Length) or of the current chunk
        self._chunked = chunked
        self._chunk_started = False            # chunked: a chunk-size line has been read
        self.done = not chunked and not length
        self.expect_continue = expect_continue  # "100 Continue" still owed
        self.started = False                   # any read was asked for
        self.broken = False                    # a read failed: the connection is out of step

    # -- the raw byte source -------------------------------------------------------------------------
    def _raw_into(self, view) -> int:
        if self._pending:
            count = min(len(view), len(self._pending))
            view[:count] = self._pending[:count]
            self._pending = self._pending[count:]
            if count < len(view) and not self._pending:
                # With what has arrived since in the same block, a small file is one write and one hash
                # update, not two (each is a system call that hands the interpreter lock on).
                count += self._wire.recv_waiting_into(view[count:])
            return count
        return self._wire.recv_into(view)

    def _raw_line(self, limit: int = 4096) -> bytes:
        """One CRLF-terminated framing line (without the CRLF), for chunked bodies."""
        line = bytearray()
        while True:
            if not self._pending:
                block = bytearray(8192)
                count = self._wire.recv_into(block)
                self._pending = memoryview(bytes(block[:count]))
            end = bytes(self._pending[:limit]).find(b"\n")
            if end >= 0:
                line += self._pending[:end + 1]
                self._pending = self._pending[end + 1:]
                break
            line += self._pending
            self._pending = self._pending[:0]
            if len(line) > limit:
                raise BodyIncomplete("a chunk-size line is too long")
        if not line.endswith(b"\r\n"):
            raise BodyIncomplete("malformed chunked framing")
        return bytes(line[:-2])

    def _start(self) -> None:
        self.started = True
        if self.expect_continue:
            self.expect_continue = False
            self._wire.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _next_chunk(self) -> None:
        if self._chunk_started:  # the CRLF after a chunk's data
            end = bytearray(2)
            got = self._raw_into(memoryview(end))
            if got == 1:
                got += self._raw_into(memoryview(end)[1:])
            if end != b"\r\n":
                raise BodyIncomplete("malformed chunked framing")
        match = _CHUNK_SIZE_RE.match(self._raw_line())
        if not match:
            raise BodyIncomplete("malformed chunk size")
        self._chunk_started = True
        self._remaining = int(match.group(1), 16)
        if not self._remaining:
            for _ in range(100):  # trailers: skipped
                if self._raw_line() == b"":
                    break
            else:
                raise BodyIncomplete("too many trailers")
            self.done = True

    # -- the WSGI side ---------------------------------------------------------------------------------
    def readinto(self, buffer) -> int:
        try:
            return self._readinto(buffer)
        except OSError:
            self.broken = True
            raise

    def _readinto(self, buffer) -> int:
        if self.broken:
            raise BodyIncomplete("the request body broke off earlier")
        if not self.started:
            self._start()
        view = memoryview(buffer).cast("B")
        if self.done or not len(view):
            return 0
        if self._chunked and not self._remaining:
            self._next_chunk()
            if self.done:
                return 0
        count = self._raw_into(view[:min(len(view), self._remaining)])
        self._remaining -= count
        if not self._chunked and not self._remaining:
            self.done = True
        return count

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while True:
                block = self.read(READ_BLOCK)
                if not block:
                    return b"".join(parts)
                parts.append(block)
        buffer = bytearray(min(size, self._remaining) if self._remaining else min(size, READ_BLOCK))
        count = self.readinto(buffer)
        del buffer[count:]
        return bytes(buffer)

    def readline(self, size: int | None = -1) -> bytes:
        try:
            return self._readline(size)
        except OSError:
            self.broken = True
            raise

    def _readline(self, size: int | None) -> bytes:
        if self.broken:
            raise BodyIncomplete("the request body broke off earlier")
        line = bytearray()
        while size is None or size < 0 or len(line) < size:
            if not self.started:
                self._start()
            if self.done:
                break
            if not self._pending and not (self._chunked and not self._remaining):
                # refill the pending bytes from the socket: readline is rare, a copy here is fine
                block = bytearray(min(self._remaining, 8192))
                self._pending = memoryview(bytes(block[:self._wire.recv_into(block)]))
            if self._chunked and not self._remaining:
                self._next_chunk()
                continue
            available = self._pending[:min(self._remaining, len(self._pending))]
            if size is not None and size >= 0:
                available = available[:size - len(line)]
            end = bytes(available).find(b"\n")
            taken = available[:end + 1] if end >= 0 else available
            line += taken
            self._pending = self._pending[len(taken):]
            self._remaining -= len(taken)
            if not self._chunked and not self._remaining:
                self.done = True
            if end >= 0:
                break
        return bytes(line)

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(self)

    def __iter__(self):
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    # -- for the server --------------------------------------------------------------------------------
    def leftover(self) -> bytes:
        """Bytes past the body that already arrived (a pipelined next request)."""
        return bytes(self._pending)

    def finish(self, limit: int) -> bool:
        """Read off the rest of the body when that is cheap; False when the connection must be closed."""
        if self.done:
            return True
        if self.broken or self.expect_continue and not self.started:
            return False  # the client waits for "100 Continue" before sending the body, and need not send it
        if self._length is not None and self._remaining > limit:
            return False
        buffer = memoryview(bytearray(min(READ_BLOCK, limit)))
        drained = 0
        try:
            while not self.done and drained <= limit:
                drained += self.readinto(buffer)
        except OSError:
            return False
        return self.done


class _FileWrapper:
    """``wsgi.file_wrapper``: a file the server may send with os.sendfile."""

    def __init__(self, file, block_size: int = READ_BLOCK):
        self.file, self.block_size = file, block_size
        if hasattr(file, "close"):
            self.close = file.close

    def __iter__(self):
        while True:
            block = self.file.read(self.block_size)
            if not block:
                return
            yield block


class _WorkerPool:
    """Threads started on demand up to ``size``, each ending after ``idle_timeout`` seconds without work."""

    def __init__(self, size: int, idle_timeout: float, name: str):
        self._size, self._idle_timeout, self._name = size, idle_timeout, name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.threads = 0
        self._idle = 0      # waiting threads no job has been promised to
        self._backlog = 0   # queued jobs no thread has been promised to

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            self._jobs.put(job)
            if self._idle:
                self._idle -= 1
            elif self.threads < self._size:
                self.threads += 1
                threading.Thread(target=self._work, name=f"{self._name}-{self.threads}", daemon=True).start()
            else:
                self._backlog += 1

    def _work(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_timeout)
            except queue.Empty:
                with self._lock:
                    if self._idle:  # no job was promised to this thread: it may end
                        self._idle -= 1
                        self.threads -= 1
                        return
                continue  # a job was promised to it just now
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("HTTP worker failed")
            with self._lock:
                if self._backlog:
                    self._backlog -= 1  # take a queued job at once
                else:
                    self._idle += 1

    def close(self) -> None:
        with self._lock:
            for _ in range(self.threads):
                self._jobs.put(None)
            self.threads = 0


def _connection_cap(limits: ServerLimits) -> int:
    """limits.max_connections, lowered to leave room under the open-file limit (raised to its hard maximum
    first) for the files the workers open, the log and the listening socket."""
    if os.name == "nt":  # no such limit, but Python's select() takes at most 512 sockets on Windows
        return min(limits.max_connections, 500)
    open_files = _raise_open_file_limit()
    if open_files is None:
        return limits.max_connections
    return min(limits.max_connections, max(16, open_files - 2 * limits.max_workers - 64))


def _raise_open_file_limit() -> int | None:
    """Raise the soft limit on open files to the hard one; returns the limit (None where unknown)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return None if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError):
        return soft


@functools.lru_cache(maxsize=1024)   # the names clients send, each worked out once (made-up ones age out)
def _environ_key(name: str) -> str:
    """The environ key of a header ("CONTENT_LENGTH", "CONTENT_TYPE", "HTTP_..."); "" for a name with "_"."""
    upper = name.upper().replace("-", "_")
    return "" if "_" in name else upper if upper in ("CONTENT_LENGTH", "CONTENT_TYPE") else "HTTP_" + upper


class HTTPServer:
    """The server ``make_server`` returns: ``serve(stop)`` until the event is set, then ``close()``."""

    def __init__(self, app: Callable, host: str, port: int, limits: ServerLimits,
                 ssl_context: ssl.SSLContext | None = None):
        self.app, self.limits = app, limits
        self.ssl_context = ssl_context
        self.max_connections = _connection_cap(limits)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            if os.name != "nt":  # on Windows SO_REUSEADDR would let a second server take the same port
                self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind((host, port))
            self.socket.listen(limits.listen_backlog)
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()[:2]
        self._pool = _WorkerPool(limits.max_workers, limits.worker_idle_timeout, "pyfiledrop-http")
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._lock = threading.Lock()          # guards _returned and _stopped (workers hand connections back)
        self._returned: list[tuple[_Connection, bool]] = []
        self._stopped = False
        # owned by the selector thread:
        self._connections: dict[_Connection, None] = {}                  # all open ones, oldest first
        self._by_address: dict[str, dict[_Connection, None]] = {}        # the same, per client address
        self._busy: dict[str, int] = {}                                   # requests in workers, per address
        self._warned: dict[str, float] = {}
        self._date = (0, "")

    # -- the selector thread --------------------------------------------------------------------------------
    def serve(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set (noticed within 0.25 s); then close every connection and the socket."""
        selector = self._selector
        selector.register(self.socket, selectors.EVENT_READ, None)
        selector.register(self._wake_r, selectors.EVENT_READ, self._wake_r)
        next_sweep = 0.0
        try:
            while not stop.is_set():
                for key, _ in selector.select(0.25):
                    if key.data is None:
                        self._accept()
                    elif key.data is self._wake_r:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except (BlockingIOError, InterruptedError):
                            pass
                    else:
                        self._read_head(key.data)
                self._take_returned()
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 0.25
        finally:
            self.close()

    def _accept(self) -> None:
        for _ in range(256):
            try:
                sock, peer = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # EMFILE and the like: the cap is meant to keep this from happening
                log.debug("accept failed: %s", error)
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = peer[0]
            mine = self._by_address.get(address, {})
            if len(mine) >= self.limits.max_connections_per_address:
                if not self._evict(mine, f"{address} has {len(mine)} connections"):
                    self._refuse_now(sock, address, "its connection cap is all busy")
                    continue
            if len(self._connections) >= self.max_connections:
                busiest = max(self._by_address.values(), key=len, default={})
                why = f"{len(self._connections)} connections are open"
                if not (self._evict(busiest, why) or self._evict(self._connections, why)):
                    self._refuse_now(sock, address, "every connection is busy")
                    continue
            connection = _Connection(sock, address, peer[1], time.monotonic())
            if self.ssl_context is not None:
                connection.tls_started = connection.since
            self._connections[connection] = None
            self._by_address.setdefault(address, {})[connection] = None
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _evict(self, connections: dict, why: str) -> bool:
        for connection in connections:  # oldest first
            if not connection.busy:
                log.debug("closing a parked connection from %s:%s: %s", connection.address, connection.port, why)
                self._close(connection)
                return True
        return False

    def _refuse_now(self, sock: socket.socket, address: str, why: str) -> None:
        self._warn(address, f"refused a connection from {address}: {why}")
        with contextlib.suppress(OSError):
            if self.ssl_context is None:  # a TLS client could not read a plain answer
                sock.send(self._error_bytes(503, "The server is busy; try again shortly."))
        sock.close()

    def _warn(self, address: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(address, -3600.0) >= 60:
            self._warned[address] = now
            log.warning("%s (at most once a minute per address)", message)
        else:
            log.debug("%s", message)

    def _read_head(self, connection: _Connection) -> None:
        if connection.tls_started is not None:
            self._start_handshake_step(connection)
            return
        try:
            data = _recv_head_bytes(connection.sock, self.limits.max_head_bytes)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(connection)
            return
        connection.buffer += data
        if connection.head_started is None:
            connection.head_started = time.monotonic()
        self._check_head(connection, len(connection.buffer) - len(data))

    def _check_head(self, connection: _Connection, searched: int = 0) -> None:
        buffer = connection.buffer
        while buffer[:2] == b"\r\n":  # empty lines before a request line are allowed (RFC 9112 2.2)
            del buffer[:2]
            searched = 0
        end = buffer.find(_HEAD_END, max(0, searched - 3))
        if end < 0:
            if buffer.find(b"\n\n", max(0, searched - 1)) >= 0:  # the head ended, but with bare LFs
                self._answer_and_close(connection, 400, "Lines of a request head must end with CRLF.")
            elif len(buffer) > self.limits.max_head_bytes:
                log.debug("request head over %d bytes from %s", self.limits.max_head_bytes, connection.address)
                self._answer_and_close(connection, 431, "The request head is too large.")
            return
        if end + 4 > self.limits.max_head_bytes:
            self._answer_and_close(connection, 431, "The request head is too large.")
            return
        head, rest = bytes(buffer[:end]), bytes(buffer[end + 4:])
        connection.buffer = bytearray()
        connection.head_started = None
        if self._busy.get(connection.address, 0) >= self.limits.max_busy_per_address:
            self._warn(connection.address, f"answered 503 to {connection.address}: it already has "
                                           f"{self.limits.max_busy_per_address} requests running")
            self._answer_and_close(connection, 503, "Too many requests at once from this address.")
            return
        self._selector.unregister(connection.sock)
        connection.busy = True
        self._busy[connection.address] = self._busy.get(connection.address, 0) + 1
        self._pool.submit(lambda: self._run(connection, head, rest))

    def _answer_and_close(self, connection: _Connection, status: int, message: str) -> None:
        with contextlib.suppress(OSError):
            connection.sock.send(self._error_bytes(status, message))
        self._close(connection)

    def _close(self, connection: _Connection) -> None:
        if connection.closed:
            return
        connection.closed = True
        if not connection.busy:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(connection.sock)
        with contextlib.suppress(OSError):
            connection.sock.close()
        self._connections.pop(connection, None)
        mine = self._by_address.get(connection.address)
        if mine is not None:
            mine.pop(connection, None)
            if not mine:
                del self._by_address[connection.address]

    def _take_returned(self) -> None:
        with self._lock:
            returned, self._returned = self._returned, []
        now = time.monotonic()
        for connection, keep in returned:
            connection.busy = False
            left = self._busy.get(connection.address, 1) - 1
            if left:
                self._busy[connection.address] = left
            else:
                self._busy.pop(connection.address, None)
            if not keep:
                self._close(connection)
                continue
            connection.since = now
            connection.head_started = now if connection.buffer else None
            try:
                connection.sock.setblocking(False)
                self._selector.register(connection.sock, selectors.EVENT_READ, connection)
            except (OSError, ValueError):
                self._close(connection)
                continue
            # re-queue at the end: the oldest-first order is by when a connection was last parked
            self._connections.pop(connection, None)
            self._connections[connection] = None
            mine = self._by_address.setdefault(connection.address, {})
            mine.pop(connection, None)
            mine[connection] = None
            if connection.buffer:  # a pipelined request came with the last one
                self._check_head(connection)
            elif _tls_pending(connection.sock):  # decrypted bytes the selector cannot see
                self._read_head(connection)

    def _sweep(self, now: float) -> None:
        limits = self.limits
        for connection in list(self._connections):
            if connection.busy:
                continue
            if connection.tls_started is not None:
                if now - connection.tls_started > limits.head_timeout:
                    log.debug("closing %s:%s: no TLS handshake within %g s", connection.address, connection.port,
                              limits.head_timeout)
                    self._close(connection)
            elif connection.head_started is not None:
                if now - connection.head_started > limits.head_timeout:
                    log.debug("closing %s:%s: no complete request head within %g s", connection.address,
                              connection.port, limits.head_timeout)
                    self._answer_and_close(connection, 408, "The request head took too long.")
            elif now - connection.since > limits.idle_timeout:
                self._close(connection)

    def _hand_back(self, connection: _Connection, keep: bool) -> None:
        """From a worker: the request is done; the connection goes back to the selector (or is closed)."""
        with self._lock:
            if self._stopped:
                with contextlib.suppress(OSError):
                    connection.sock.close()
                return
            self._returned.append((connection, keep))
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def close(self) -> None:
        """Close the listening socket and every connection; requests running in workers are cut."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for connection in list(self._connections):
                if connection.busy:  # its worker sees the connection break and ends the request
                    with contextlib.suppress(OSError):  # (under TLS too: the socket's own shutdown, not SSL's)
                        socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)
        for connection in list(self._connections):
            if not connection.busy:
                self._close(connection)
        self._connections.clear()
        self._by_address.clear()
        for sock in (self.socket, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        with contextlib.suppress(OSError, ValueError):
            self._selector.close()
        self._pool.close()

    # -- HTTPS connections ------------------------------------------------------------------------------------
    # A TLS handshake never blocks a thread while it waits: the selector waits for the client's bytes, then a
    # worker runs one non-blocking step of the handshake (its signature costs CPU that must not delay
    # accepting), and hands the connection back.  A client that stalls or sends garbage holds only a parked
    # socket, closed after head_timeout like a slow request head.
    def _start_handshake_step(self, connection: _Connection) -> None:
        if self._busy.get(connection.address, 0) >= self.limits.max_busy_per_address:
            self._close(connection)
            return
        self._selector.unregister(connection.sock)
        connection.busy = True
        self._busy[connection.address] = self._busy.get(connection.address, 0) + 1
        self._pool.submit(lambda: self._handshake_step(connection))

    def _handshake_step(self, connection: _Connection) -> None:
        keep = False
        try:
            keep = self._advance_handshake(connection)
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError: garbage, an old version, a reset
            log.debug("TLS handshake with %s:%s failed: %s", connection.address, connection.port, error)
        finally:
            self._hand_back(connection, keep)

    def _advance_handshake(self, connection: _Connection) -> bool:
        """As far as the client's bytes allow; True while the connection goes on (handshake done or waiting)."""
        sock = connection.sock
        if not isinstance(sock, ssl.SSLSocket):
            try:
                first = sock.recv(HEAD_READ, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return True
            if first[:1] != b"\x16":  # no TLS handshake record: plain HTTP (or garbage) on the HTTPS port
                if first[:1].isalpha():
                    self._redirect_to_https(sock, first)
                return False
            sock = connection.sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                                  do_handshake_on_connect=False)
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                return True
            except ssl.SSLWantWriteError:  # only if the client reads nothing of the handshake it started
                if not wait_ready(sock, 1.0, writable=True):
                    return False
        connection.tls_started = None
        return True

    def _redirect_to_https(self, sock: socket.socket, head: bytes) -> None:
        """An address typed without https:// reaches the HTTPS port: send the browser to https (307, so no
        browser remembers it for a later plain-HTTP server on the same port)."""
        sock.recv(len(head))  # taken off, so closing does not reset the connection before the reply is read
        target = re.match(rb"[A-Z]{3,10} (/[\x21-\x7e]{0,2000}) HTTP/1\.[01]\r\n", head)
        host = re.search(rb"\r\nHost:[ \t]*([A-Za-z0-9.:\[\]-]{1,300})[ \t]*\r\n", head, re.IGNORECASE)
        if target and host:
            location = b"https://" + host.group(1) + target.group(1)
            body = b"This server speaks HTTPS: " + location + b"\n"
            reply = (b"HTTP/1.1 307 Temporary Redirect\r\n" + SERVER_HEADER.encode() + b"\r\nLocation: " + location
                     + b"\r\nCache-Control: no-store"
                     b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close"
                     b"\r\n\r\n" % len(body) + body)
        else:
            reply = self._error_bytes(400, "This server speaks HTTPS: open its address with https://")
        sock.send(reply)
        sock.shutdown(socket.SHUT_WR)

    # -- the worker side ---------------------------------------------------------------------------------------
    def _error_bytes(self, status: int, message: str, head_only: bool = False) -> bytes:
        body = (message + "\n").encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nDate: {self._http_date()}\r\n"
                f"{SERVER_HEADER}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n").encode()
        return head if head_only else head + body

    def _http_date(self) -> str:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def _run(self, connection: _Connection, head: bytes, rest: bytes) -> None:
        keep = False
        try:
            while True:
                keep = self._handle(connection, head, rest)
                following = self._next_head(connection) if keep and self._may_linger(connection) else None
                if following is None:
                    break
                head, rest = following
        except OSError as error:
            log.debug("connection from %s:%s ended: %s", connection.address, connection.port,
                      error.strerror or error)
        except Exception:
            log.exception("HTTP request from %s failed", connection.address)
        finally:
            self._hand_back(connection, keep)

    def _may_linger(self, connection: _Connection) -> bool:
        """Only while the address is far from its caps: a lingering connection counts as busy, and must not
        stand in the way of the rule that parked connections give way to new ones."""
        limits = self.limits
        return (not self._stopped and len(self._connections) < self.max_connections // 2
                and len(self._by_address.get(connection.address, ())) < limits.max_connections_per_address // 2
                and self._busy.get(connection.address, 0) < limits.max_busy_per_address // 2)

    def _next_head(self, connection: _Connection) -> tuple[bytes, bytes] | None:
        """The next request's head if it arrives within ``linger``: a client that goes on at once (the page's
        next chunk, a script's next file) is served by this worker without a trip through the selector.
        None hands the connection (and any partial head) back to the selector."""
        buffer, sock = connection.buffer, connection.sock
        deadline = time.monotonic() + self.limits.linger
        while True:
            while buffer[:2] == b"\r\n":
                del buffer[:2]
            end = buffer.find(_HEAD_END)
            if end >= 0:
                if end + 4 > self.limits.max_head_bytes:
                    return None  # the selector answers 431
                head, rest = bytes(buffer[:end]), bytes(buffer[end + 4:])
                connection.buffer = bytearray()
                return head, rest
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(buffer) > self.limits.max_head_bytes:
                return None
            try:
                data = sock.recv(HEAD_READ)  # non-blocking (see _Wire): wait only when nothing has arrived
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                if not wait_ready(sock, remaining):
                    return None
                continue
            except ssl.SSLWantWriteError:
                return None
            if not data:
                return None  # closed: the selector sees it and closes too
            buffer += data

    def _parse_head(self, head: bytes):
        """(method, target, version, [(name, value), ...]) or an (error status, message) pair."""
        lines = head.split(b"\r\n")
        if head.count(b"\r") >= len(lines) or b"\x00" in head:  # RFC 9110 5.5: refused, never passed on
            return 400, "A CR or NUL byte inside a line of the request head."
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN_RE.match(parts[0]) or not parts[1]:
            return 400, "Malformed request line."
        method, target, version = parts
        match = _VERSION_RE.match(version)
        if not match:
            return 400, "Malformed request line."
        if match.group(1) != b"1":
            return 400, "Only HTTP/1.0 and HTTP/1.1 are supported."
        if _BAD_TARGET_RE.search(target):
            return 400, "Malformed request target."
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN_RE.match(name):
                return 400, "Malformed header line."
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return method.decode("latin-1"), target.decode("latin-1"), version.decode("latin-1"), headers

    def _handle(self, connection: _Connection, head: bytes, rest: bytes) -> bool:
        """Run one request; True when the connection may be kept for another."""
        wire = _Wire(connection.sock, self.limits)
        parsed = self._parse_head(head)
        if len(parsed) == 2:
            log.debug("%s from %s:%s", parsed[1], connection.address, connection.port)
            wire.send(self._error_bytes(*parsed))
            return False
        method, target, version, headers = parsed
        path, _, query = target.partition("?")
        if path.startswith(("http://", "https://")):  # absolute form
            path = "/" + path.split("/", 3)[3] if path.count("/") >= 3 else "/"
        elif not path.startswith("/") and not (path == "*" and method == "OPTIONS"):
            wire.send(self._error_bytes(400, "Malformed request target."))
            return False
        environ = self._base_environ(connection, method, path, query, target, version)
        if isinstance(connection.sock, ssl.SSLSocket):
            environ.update({"wsgi.url_scheme": "https", "HTTPS": "on"})
        tokens, framing = self._read_headers(environ, headers)
        http11 = version == "HTTP/1.1"
        keep = "close" not in tokens if http11 else "keep-alive" in tokens
        if isinstance(framing, str):
            wire.send(self._error_bytes(400, framing))
            return False
        host = environ.get("HTTP_HOST")
        if http11 and (host is None or "," in host):  # RFC 9112 3.2: exactly one (two are joined with ", ")
            wire.send(self._error_bytes(400, "An HTTP/1.1 request needs exactly one Host header."))
            return False
        length, chunked = framing
        if chunked and not http11:
            wire.send(self._error_bytes(400, "Transfer-Encoding with Content-Length or HTTP/1.0."))
            return False
        if length is not None:
            environ["CONTENT_LENGTH"] = str(length)
        expect = http11 and environ.get("HTTP_EXPECT", "").lower() == "100-continue"
        body = _RequestBody(wire, rest, length, chunked, expect)
        environ["wsgi.input"] = body
        if not self._respond(wire, environ, method, http11, keep) or not body.finish(self.limits.drain_bytes):
            return False
        connection.buffer = bytearray(body.leftover())
        return True

    def _base_environ(self, connection: _Connection, method: str, path: str, query: str, target: str,
                      version: str) -> dict:
        return {
            "REQUEST_METHOD": method, "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path.encode("latin-1")).decode("latin-1"), "QUERY_STRING": query,
            "REQUEST_URI": target, "SERVER_NAME": str(self.server_address[0]),
            "SERVER_PORT": str(self.server_address[1]), "SERVER_PROTOCOL": version,
            "REMOTE_ADDR": connection.address, "REMOTE_PORT": str(connection.port),
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": sys.stderr,
            "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
            "wsgi.input_terminated": True, "wsgi.file_wrapper": _FileWrapper,
        }

    @staticmethod
    def _read_headers(environ: dict, headers: list) -> tuple[set, tuple[int | None, bool] | str]:
        """Headers into ``environ``; (Connection tokens, (length, chunked) or the reason the framing is bad)."""
        lengths, codings, tokens = set(), [], set()
        for name, value in headers:
            key = _environ_key(name)
            if not key:
                continue  # "X_A" and "X-A" would both be HTTP_X_A: such headers are dropped (as nginx does)
            if key == "CONTENT_LENGTH":
                lengths.add(value)
                continue
            if key == "HTTP_TRANSFER_ENCODING":
                codings += [c.strip().lower() for c in value.split(",") if c.strip()]
            if key == "HTTP_CONNECTION":
                tokens |= {t.strip().lower() for t in value.split(",")}
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
                continue
            if key in environ:
                environ[key] += ("; " if key == "HTTP_COOKIE" else ", ") + value
            else:
                environ[key] = value
        if codings:
            if lengths:
                return tokens, "Transfer-Encoding with Content-Length or HTTP/1.0."
            if codings != ["chunked"]:
                return tokens, "Only the chunked transfer-coding is supported."
            return tokens, (None, True)
        if lengths:
            if len(lengths) != 1 or not re.fullmatch(r"[0-9]{1,18}", next(iter(lengths))):
                return tokens, "Malformed Content-Length."
            return tokens, (int(next(iter(lengths))), False)
        return tokens, (None, False)

    def _send_result(self, wire: _Wire, state: dict, writer, result, method: str, http11: bool, keep: bool) -> bool:
        """Send what the app returned (after whatever it wrote); True when the connection may be kept."""
        blocks = iter(result) if not isinstance(result, (list, tuple)) else None
        first = b""
        if blocks is not None and not isinstance(result, _FileWrapper):
            for first in blocks:  # the headers are sent with the first non-empty block
                if first:
                    break
        if state["status"] is None:
            raise AssertionError("the app did not call start_response")
        if writer is None:
            writer = _ResponseWriter(self, wire, state, method, http11, keep, result, first)
            state["sent"] = True
        if isinstance(result, (list, tuple)):
            writer.send_all(result)
        elif isinstance(result, _FileWrapper):
            writer.send_file(result)
        else:
            writer.send(first)
            for block in blocks:
                writer.send(block)
        return writer.finish()

    def _respond(self, wire: _Wire, environ: dict, method: str, http11: bool, keep: bool) -> bool:
        """Run the app and send its response; True when the connection may be kept."""
        state = {"status": None, "headers": None, "sent": False}

        def start_response(status, headers, exc_info=None):
            if exc_info:
                try:
                    if state["sent"]:
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif state["status"] is not None:
                raise AssertionError("start_response was called twice")
            state["status"], state["headers"] = status, list(headers)
            return write

        def write(data):  # the legacy write() callable: sent as it comes, chunked or up to a Content-Length
            nonlocal writer
            if writer is None:
                writer = _ResponseWriter(self, wire, state, method, http11, keep, None, b"")
                state["sent"] = True
            writer.send(data)

        writer: _ResponseWriter | None = None
        try:
            result = self.app(environ, start_response)
        except Exception:
            log.exception("the app failed on %s %s", method, environ.get("PATH_INFO"))
            wire.send(self._error_bytes(500, "Internal server error."))
            return False
        try:
            return self._send_result(wire, state, writer, result, method, http11, keep)
        except OSError:
            raise
        except Exception:
            log.exception("the app failed on %s %s", method, environ.get("PATH_INFO"))
            if not state["sent"]:
                wire.send(self._error_bytes(500, "Internal server error."))
            return False
        finally:
            if hasattr(result, "close"):
                result.close()


class _ResponseWriter:
    """Sends one response: status line and headers with the first block, then Content-Length or chunked."""

    def __init__(self, server: HTTPServer, wire: _Wire, state: dict, method: str, http11: bool, keep: bool,
                 result, first: bytes):
        self.wire = wire
        status, headers = state["status"], state["headers"]
        code = int(status.split(" ", 1)[0])
        self.body_allowed = method != "HEAD" and code >= 200 and code not in (204, 304)
        self.length = None
        lines = [f"HTTP/1.1 {status}"]
        has_date = False
        for name, value in headers:
            lower = name.lower()
            if lower == "content-length":
                self.length = int(value)
            elif lower == "connection":
                if "close" in value.lower():
                    keep = False
                continue
            elif lower == "transfer-encoding":
                continue  # framing is the server's business
            elif lower == "date":
                if has_date:
                    continue  # one Date, whoever else set one
                has_date = True
            elif lower == "server":
                continue  # ours alone, and it names no version
            lines.append(f"{name}: {value}")
        if not has_date:
            lines.append(f"Date: {server._http_date()}")
        lines.append(SERVER_HEADER)
        if self.length is None and isinstance(result, (list, tuple)) and self.body_allowed:
            self.length = sum(len(block) for block in result)  # a whole body in hand: its length is known
            if self.body_allowed:
                lines.append(f"Content-Length: {self.length}")
        self.chunked = self.length is None and self.body_allowed and http11
        if self.length is None and self.body_allowed and not http11:
            keep = False  # an HTTP/1.0 body without a length ends when the connection closes
        if self.chunked:
            lines.append("Transfer-Encoding: chunked")
        if not keep:
            lines.append("Connection: close")
        elif not http11:
            lines.append("Connection: keep-alive")
        self.keep = keep
        self.head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self.sent = 0

    def _flush_head(self, data=b"") -> None:
        if self.head is not None:
            head, self.head = self.head, None
            if len(data) <= _SEND_BLOCK:
                self.wire.send(head + bytes(data))
                return
            self.wire.send(head)
        if data:
            self.wire.send(data)

    def send(self, data) -> None:
        if not self.body_allowed:
            self._flush_head()
            return
        if self.length is not None:
            data = memoryview(data).cast("B")
            if len(data) > self.length - self.sent:  # more than the app's Content-Length: cut, then close
                data, self.keep = data[:max(self.length - self.sent, 0)], False
        if self.chunked and data:
            self._flush_head(b"%x\r\n" % len(data) + bytes(data) + b"\r\n" if len(data) <= _SEND_BLOCK else b"")
            if len(data) > _SEND_BLOCK:
                self.wire.send(b"%x\r\n" % len(data))
                self.wire.send(data)
                self.wire.send(b"\r\n")
        else:
            self._flush_head(data)
        self.sent += len(data)

    def send_all(self, blocks) -> None:
        if len(blocks) == 1:
            self.send(blocks[0])
        else:
            for block in blocks:
                self.send(block)

    def send_file(self, wrapper: _FileWrapper) -> None:
        file = wrapper.file
        try:
            fileno = file.fileno()
            offset = file.tell()
        except (AttributeError, OSError, ValueError):
            fileno = None
        if (fileno is None or not hasattr(os, "sendfile") or self.length is None or not self.body_allowed
                or self.chunked or isinstance(self.wire.sock, ssl.SSLSocket)):  # sendfile would skip TLS
            for block in wrapper:
                self.send(block)
            return
        self._flush_head()
        self.sent += self.wire.sendfile(file, offset, self.length)

    def finish(self) -> bool:
        self._flush_head()
        if self.chunked:
            self.wire.send(b"0\r\n\r\n")
            return self.keep
        if self.length is not None and self.body_allowed and self.sent < self.length:
            log.debug("the app's response was shorter than its Content-Length: closing the connection")
            return False
        return self.keep


def _tls_pending(sock: socket.socket) -> bool:
    """Whether TLS has decrypted bytes buffered: they are no longer in the socket, so no selector sees them."""
    try:
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0
    except (OSError, ValueError):
        return False


def _recv_head_bytes(sock: socket.socket, limit: int) -> bytes:
    """What has arrived of a request head (over TLS with what is decrypted already, up to about ``limit``)."""
    data = sock.recv(HEAD_READ)
    while data and len(data) <= limit and _tls_pending(sock):
        data += sock.recv(HEAD_READ)
    return data


def wait_ready(sock: socket.socket, timeout: float, writable: bool = False) -> bool:
    """Whether ``sock`` became readable (or writable) within ``timeout`` seconds: poll where there is one
    (select's descriptor limit of 1,024 is below the connections a server holds), select on Windows."""
    if hasattr(select, "poll"):
        waiter = select.poll()
        waiter.register(sock, select.POLLOUT if writable else select.POLLIN)
        return bool(waiter.poll(timeout * 1000))
    ready = select.select([], [sock], [], timeout)[1] if writable else select.select([sock], [], [], timeout)[0]
    return bool(ready)


def make_server(app: Callable, host: str, port: int, *, limits: ServerLimits = ServerLimits(),
                ssl_context=None) -> HTTPServer:
    """pyfiledrop's HTTP server for ``app``, bound but not yet serving; port 0 picks a free one.

    With ``ssl_context`` it serves HTTPS only (see "HTTPS connections" in HTTPServer)."""
    return HTTPServer(app, host, port, limits, ssl_context)


###############################################################################
# HTTPS: the certificate and the TLS context ##################################
###############################################################################
# --tls makes a self-signed certificate once and keeps it beside the ledger, so a phone that accepted it (after
# comparing the fingerprint the banner prints) sees the same one on every start.  It is made with the optional
# ``cryptography`` package, imported only here; --cert/--key need nothing but the standard library's ssl.

TLS_CERT_NAME = "tls-certificate.pem"
TLS_KEY_NAME = "tls-key.pem"
# Apple's rule for TLS server certificates (iOS 13, macOS 10.15): valid for 825 days at most.
TLS_VALID_DAYS = 800
TLS_BACKDATE_S = 86400         # a phone whose clock is a little behind still accepts a certificate made now
TLS_RENEW_DAYS = 30            # a kept certificate this close to its end is renewed (with the same key)


class TLSSetupError(Exception):
    """HTTPS cannot start: the message is one line for the console."""


@dataclasses.dataclass(frozen=True)
class TLSIdentity:
    """What HTTPS serves with: the context for the server, and what the banner says about the certificate."""
    context: ssl.SSLContext
    fingerprint: str        # SHA-256 of the certificate (DER), "AB:CD:...", as browsers show it
    certificate: Path
    origin: str             # "new", "kept", "renewed" (made by --tls) or "own" (--cert)


def open_tls(config: Config, *, now: float | None = None) -> TLSIdentity | None:
    """The TLS identity ``config`` asks for (None for plain HTTP); TLSSetupError with a one-line reason."""
    if config.cert is not None:
        cert, key, origin = config.cert, config.key, "own"
    elif config.tls:
        dns_names, addresses = certificate_names(config.host)
        cert, key, origin = generated_certificate(config.chunks, dns_names, addresses,
                                                  time.time() if now is None else now)
    else:
        return None
    return TLSIdentity(tls_context(cert, key), certificate_fingerprint(cert), cert, origin)


def certificate_names(host: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) a made certificate covers: localhost, this machine's name, every LAN address."""
    import ipaddress

    hostname = socket.gethostname().strip(".") or "localhost"
    dns_names = ["localhost", hostname] + ([f"{hostname}.local"] if "." not in hostname else [])
    addresses = ["127.0.0.1", "::1", *lan_addresses()]
    if host not in ("0.0.0.0", "", "::"):
        try:
            addresses.append(str(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:  # --host by name
            dns_names.append(host)
    return list(dict.fromkeys(filter(None, map(_dns_label, dns_names)))), list(dict.fromkeys(addresses))


def _dns_label(name: str) -> str | None:
    """``name`` as a certificate takes it (ASCII, IDNA for others); None for a name no certificate can hold."""
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    return ascii_name if re.fullmatch(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*",
                                      ascii_name) else None


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)  # a client could make the server sign again and again
    context.set_alpn_protocols(["http/1.1"])

    def no_password() -> bytes:  # never prompt on the terminal: the server runs unattended
        raise TLSSetupError(f"the key {key} is protected by a passphrase; give a key without one")

    try:
        context.load_cert_chain(cert, key, password=no_password)
    except OSError as error:
        if isinstance(error, ssl.SSLError):
            raise TLSSetupError(f"the certificate {cert} and the key {key} cannot be used together "
                                f"({error.reason or error})") from None
        raise TLSSetupError(f"cannot read {error.filename or cert}: {error.strerror or error}") from None
    return context


_PEM_CERT_RE = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")


def certificate_fingerprint(cert: Path) -> str:
    """The SHA-256 fingerprint of the first certificate in a PEM file, as "AB:CD:..."."""
    try:
        match = _PEM_CERT_RE.search(cert.read_text(encoding="ascii", errors="replace"))
        der = ssl.PEM_cert_to_DER_cert(match.group(0)) if match else b""
    except (OSError, ValueError) as error:
        raise TLSSetupError(f"cannot read the certificate {cert}: {error}") from None
    if not der:
        raise TLSSetupError(f"no PEM certificate in {cert}")
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def generated_certificate(folder: Path, dns_names: list[str], addresses: list[str],
                          now: float) -> tuple[Path, Path, str]:
    """(certificate, key, origin) in ``folder``: kept while valid and covering every name, else made again
    with the same key (a new key only when there is none, or it is unreadable)."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError:
        raise TLSSetupError("--tls needs the cryptography package to make its certificate: pip install cryptography "
                            "(or give your own with --cert and --key)") from None
    cert_path, key_path = folder / TLS_CERT_NAME, folder / TLS_KEY_NAME
    key = _read_quietly(key_path, lambda data: serialization.load_pem_private_key(data, None))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        key = None
    old = _read_quietly(cert_path, x509.load_pem_x509_certificate) if key is not None else None
    if old is not None and _public_bytes(old.public_key()) != _public_bytes(key.public_key()):
        old = None
    wanted = _names_of(dns_names, addresses)
    if old is not None:
        have = set(old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        left = old.not_valid_after_utc.timestamp() - now
        if set(wanted) <= have and left > TLS_RENEW_DAYS * 86400:
            return cert_path, key_path, "kept"
        wanted += [name for name in old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                   if name not in wanted]  # an address seen before (DHCP, another network) stays covered
    if key is None:
        key = ec.generate_private_key(ec.SECP256R1())
        _write_atomically(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    try:
        certificate = _self_signed(key, wanted, now)
    except ValueError as error:  # a name cryptography will not take: say which, do not crash
        raise TLSSetupError(f"cannot make the certificate: {error}") from None
    _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path, "new" if old is None else "renewed"


def _names_of(dns_names: list[str], addresses: list[str]) -> list:
    import ipaddress

    from cryptography import x509

    return [*(x509.DNSName(name) for name in dns_names),
            *(x509.IPAddress(ipaddress.ip_address(address)) for address in addresses)]


def _self_signed(key, names: list, now: float):
    """An ECDSA P-256 certificate for ``names`` as browsers and Apple's rules want it: a leaf (not a CA), for
    serverAuth, valid under 825 days, every name in the subject alternative names."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    start = datetime.datetime.fromtimestamp(now - TLS_BACKDATE_S, datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pyfiledrop on {socket.gethostname()}"[:64]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pyfiledrop (self-signed)")])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=TLS_VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))


def _public_bytes(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_quietly(path: Path, parse: Callable[[bytes], object]):
    """``parse(bytes of path)``, or None when the file is missing or unreadable (it is then made again)."""
    try:
        return parse(path.read_bytes())
    except (OSError, ValueError, TypeError):
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    """Whole or not at all, readable by this user only (a key must stay private); a ``.tmp`` left by a crash
    is removed at the next start with the chunks folder's other leftovers."""
    temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        descriptor = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        _unlink_quietly(temporary)
        raise TLSSetupError(f"cannot write {path}: {error.strerror or error}") from None


###############################################################################
# serve() #####################################################################
###############################################################################


def _print_banner(config: Config, urls: list[str], console: Console, tls: TLSIdentity | None = None,
                  shared_text: str | None = None, shared: SharedFolder | SharedPrefix | None = None) -> None:
    text = banner(config, urls, tls, shared_text, shared)
    no_qr = None
    if config.qr and not is_loopback(config.host):  # a phone cannot open this machine's loopback address
        try:
            code = qr_code(urls[0], ansi=_enable_ansi(console.out),
                           blocks=_can_encode(console.out, "\u2588\u2580\u2584"))
            text += f"\nOr scan this with a phone's camera to open {urls[0]}\n" + "\n".join(code)
        except ImportError:
            no_qr = "no QR code: the segno package is not installed (pip install segno)"
    console.write(text + "\nPress Ctrl+C to stop.")
    if no_qr:
        log.warning(no_qr)


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc only).  Importing this module compiles half a
    megabyte of source, and the memory the compiler frees stays with the process (about 14 MiB, a third of
    the server's resident size) until malloc_trim returns it.  (Run as a script, CPython keeps the script's
    syntax tree until the script ends, so there is less to hand back.)"""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to hand back
        pass


def serve(config: Config, engine: Engine, server, *, stop: threading.Event | None = None,
          console: Console | None = None, tls: TLSIdentity | None = None, warnings: Iterable[str] = ()) -> int:
    """Serve until ``stop`` is set or Ctrl+C; expires stale partial uploads at start and periodically.

    Ctrl+C cuts requests in flight: bytes count as received only once the ledger has recorded them, so an
    interrupted upload resumes where it stopped when the client retries after a restart.
    """
    console = console or Console(sys.stdout, quiet=config.quiet)
    stop = stop or threading.Event()
    engine.expire()
    threading.Thread(target=engine.finish_received, name="pyfiledrop-complete", daemon=True).start()

    def janitor() -> None:
        interval = min(3600.0, max(60.0, min(engine.limits.partial_ttl, engine.limits.stored_ttl or 1e9) / 4))
        while not stop.wait(interval):
            try:
                engine.expire()
            except Exception:  # never let housekeeping end the server
                log.exception("removing stale partial uploads failed")

    threading.Thread(target=janitor, name="pyfiledrop-janitor", daemon=True).start()
    urls = page_urls(config.host, server.server_address[1], scheme="https" if tls else "http")
    try:  # from here on Ctrl+C ends with the last line, even while the banner is being printed
        if not config.quiet:
            kept = engine.ledger.setting(SHARED_TEXT_KEY) if isinstance(engine.ledger, Ledger) else None
            _print_banner(config, urls, console, tls, (kept or (config.share_text or "",))[0],
                          shared_source(config, engine))
        for warning in warnings:  # after the banner, so the first line says what is starting
            log.warning("%s", warning)
        server.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.close()
    if not config.quiet:
        console.finish(f"Stopped. {engine.stored_count} file(s) stored this session.")
    return 0


###############################################################################
# pyfiledrop send: the tus client ############################################
###############################################################################
# ``pyfiledrop send FILE_OR_FOLDER... --to URL`` pushes files to a pyfiledrop (or any tus server) and survives
# anything: each file's upload address is kept in a small state file, so running the command again goes on
# where it stopped (after Ctrl+C, a network drop, a reboot of either side).  Standard library only.

SEND_PARALLEL = 4                 # files in flight at once
SEND_BLOCK = 1 * MIB              # read and sent this much at a time
SEND_GIVE_UP_S = 600.0            # a file is given up after this long without any progress
SEND_BACKOFF_S = (0.5, 1, 2, 4, 8, 15, 30)


@dataclasses.dataclass(frozen=True)
class SendConfig:
    sources: tuple[Path, ...]
    endpoint: str                 # the tus endpoint, e.g. http://host:8000/tus/
    password: str | None
    parallel: int
    state: Path
    quiet: bool
    fingerprint: str | None = None   # SHA-256 of the server's certificate, hex: trusts that one (--tls)


@dataclasses.dataclass(frozen=True)
class SendItem:
    path: Path
    name: str                     # with its folders, as it is to be stored ("holiday/day 1/clip.mp4")
    size: int
    mtime: float

    @property
    def key(self) -> str:
        return f"{self.path.resolve()}|{self.size}|{self.mtime}"


class SendFailed(Exception):
    """A file that cannot be sent: the server refused it for good, or no progress for SEND_GIVE_UP_S."""


def _default_send_state() -> Path:
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "pyfiledrop" / "send.json"


def parse_send_args(argv: list[str]) -> SendConfig:
    parser = _ArgumentParser(prog="pyfiledrop send", description="Send files and folders to a pyfiledrop (or "
                             "any tus server); run it again to go on after any interruption.")
    parser.add_argument("sources", nargs="+", type=Path, metavar="FILE_OR_FOLDER")
    parser.add_argument("--to", required=True, metavar="URL",
                        help="the server's address (http://HOST:PORT) or its tus endpoint")
    parser.add_argument("-u", "--password", metavar="PASSWORD",
                        help="the upload password (default: $PYFILEDROP_PASSWORD)")
    parser.add_argument("--parallel", type=_positive_int, default=SEND_PARALLEL, metavar="N",
                        help=f"files sent at once (default {SEND_PARALLEL})")
    parser.add_argument("--state", type=Path, default=_default_send_state(), metavar="FILE",
                        help="where upload addresses are remembered (default: %(default)s)")
    parser.add_argument("--fingerprint", metavar="SHA256",
                        help="trust the server's certificate with this SHA-256 fingerprint (the one the banner of "
                             "pyfiledrop --tls prints), instead of asking a certificate authority")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    fingerprint = re.sub(r"[\s:]", "", args.fingerprint or "").upper() or None
    if fingerprint is not None and not re.fullmatch("[0-9A-F]{64}", fingerprint):
        parser.error("--fingerprint: expected 64 hex digits (colons allowed), as the server's banner shows")
    parts = urlsplit(args.to if "://" in args.to else f"http://{args.to}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        parser.error(f"--to: expected an http:// or https:// address, got {args.to!r}")
    path = parts.path if parts.path not in ("", "/") else "/tus/"
    endpoint = f"{parts.scheme}://{parts.netloc}{path.rstrip('/')}/"
    password = args.password if args.password is not None else os.environ.get("PYFILEDROP_PASSWORD")
    return SendConfig(tuple(args.sources), endpoint, password, args.parallel, args.state, args.quiet, fingerprint)


def collect_send_items(sources: Iterable[Path]) -> tuple[list[SendItem], list[str]]:
    """Every file to send, a folder's with their folders; and the sources that are neither file nor folder."""
    items: list[SendItem] = []
    problems: list[str] = []
    for source in sources:
        if source.is_file():
            items.append(_send_item(source, source.name))
        elif source.is_dir():
            top = source.resolve().name or "folder"
            for folder, folders, files in os.walk(source):
                folders.sort()
                relative = Path(folder).relative_to(source).as_posix()
                for filename in sorted(files):
                    name = "/".join(part for part in (top, relative, filename) if part and part != ".")
                    items.append(_send_item(Path(folder) / filename, name))
        else:
            problems.append(f"{source}: no such file or folder")
    return items, problems


def _send_item(path: Path, name: str) -> SendItem:
    stat = path.stat()
    return SendItem(path, name, stat.st_size, stat.st_mtime)


class SendState:
    """Upload addresses and hashes of files being sent, kept across runs in one small JSON file."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        try:
            self._records: dict[str, dict] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            self._records = {}

    def get(self, key: str) -> dict:
        with self._lock:
            return dict(self._records.get(key, {}))

    def update(self, key: str, **values) -> None:
        with self._lock:
            record = self._records.setdefault(key, {})
            record.update({name: value for name, value in values.items() if value is not None})
            for name in [name for name, value in values.items() if value is None]:
                record.pop(name, None)
            self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(self._records, indent=0), encoding="utf-8")
        os.replace(temporary, self.path)  # a crash leaves the old file or the new one, never half of one


class _Retry(Exception):
    """A failure worth trying again: the network, a restarting server, a damaged part."""


class TusSession:
    """One connection to the tus server, made again after any failure; requests as (status, headers, body)."""

    def __init__(self, endpoint: str, password: str | None, timeout: float = 60.0, fingerprint: str | None = None):
        parts = urlsplit(endpoint)
        self.endpoint, self.scheme, self.netloc, self.timeout = endpoint, parts.scheme, parts.netloc, timeout
        self.fingerprint = fingerprint
        self.headers = {"Tus-Resumable": TUS_VERSION, "User-Agent": f"pyfiledrop-send/{__version__}"}
        if password is not None:
            token = base64.b64encode(f"pyfiledrop:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self._connection = None

    def _connect(self):
        import http.client

        if self._connection is None:
            if self.scheme != "https":
                self._connection = http.client.HTTPConnection(self.netloc, timeout=self.timeout)
            else:
                self._connection = self._https_connection()
        return self._connection

    def _https_connection(self):
        """Verified by a certificate authority, or, with a fingerprint, pinned to exactly that certificate
        (a self-signed one is trusted only when it is the one the person compared)."""
        import http.client
        import ssl

        context = ssl.create_default_context()
        if self.fingerprint is not None:
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        connection = http.client.HTTPSConnection(self.netloc, timeout=self.timeout, context=context)
        try:
            connection.connect()
        except ssl.SSLCertVerificationError as error:
            raise SendFailed(f"the server's certificate is not trusted ({error.verify_message}); for "
                             "pyfiledrop --tls, give --fingerprint as its banner shows it") from None
        if self.fingerprint is not None:
            seen = hashlib.sha256(connection.sock.getpeercert(binary_form=True)).hexdigest().upper()
            if seen != self.fingerprint:
                connection.close()
                raise SendFailed(f"the server's certificate has another fingerprint ({seen[:16]}...): "
                                 "not the server you meant, or a new certificate")
        return connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def request(self, method: str, url: str, headers: Mapping[str, str] = {}, body=None,
                sent: Callable[[int], None] = lambda count: None) -> tuple[int, dict, str]:
        """``body``: bytes, or (file, offset, length) streamed from the file, ``sent`` told of each block."""
        import http.client

        path = urlsplit(url).path or "/"
        try:
            connection = self._connect()
            connection.putrequest(method, path, skip_accept_encoding=True)
            length = len(body) if isinstance(body, bytes) else body[2] if body else 0
            for name, value in {**self.headers, **headers, "Content-Length": str(length)}.items():
                connection.putheader(name, value)
            connection.endheaders(body if isinstance(body, bytes) else None)
            if body and not isinstance(body, bytes):
                _stream_file(connection, *body, sent)
            response = connection.getresponse()
            text = response.read().decode("utf-8", errors="replace")
            return response.status, {k.lower(): v for k, v in response.getheaders()}, text.strip()
        except (OSError, http.client.HTTPException) as error:
            self.close()
            raise _Retry(f"connection: {error}") from None


def _stream_file(connection, handle, offset: int, length: int, sent: Callable[[int], None]) -> None:
    handle.seek(offset)
    while length > 0:
        block = handle.read(min(SEND_BLOCK, length))
        if not block:
            raise _Retry("the file got shorter while it was sent")
        connection.send(block)
        length -= len(block)
        sent(len(block))


class SendProgress:
    """Bytes the server has of each file, summed into one line: files, bytes, speed, time left."""

    def __init__(self, items: list[SendItem], stream, quiet: bool):
        self.total = sum(item.size for item in items)
        self.count = len(items)
        self.stream, self.quiet = stream, quiet or not getattr(stream, "isatty", lambda: False)()
        self._lock = threading.Lock()
        self._offsets: dict[str, int] = {}
        self._sent_now = 0                # bytes sent in this run (the speed counts only those)
        self.finished = 0
        self.started = time.monotonic()

    def at(self, item: SendItem, offset: int) -> None:
        with self._lock:
            self._offsets[item.key] = offset

    def sent(self, item: SendItem, count: int) -> None:
        with self._lock:
            self._offsets[item.key] = self._offsets.get(item.key, 0) + count
            self._sent_now += count

    def done(self) -> None:
        with self._lock:
            self.finished += 1

    @property
    def sent_this_run(self) -> int:
        with self._lock:
            return self._sent_now

    def line(self) -> str:
        with self._lock:
            have, sent, finished = sum(self._offsets.values()), self._sent_now, self.finished
        elapsed = max(1e-3, time.monotonic() - self.started)
        speed = sent / elapsed
        left = f" · {_duration((self.total - have) / speed)} left" if speed > 0 and have < self.total else ""
        return (f"{finished} of {self.count} files · {human_size(have)} of {human_size(self.total)} · "
                f"{human_size(speed)}/s{left}")

    def show(self, stop: threading.Event) -> None:
        while not self.quiet and not stop.wait(0.5):
            self.stream.write("\r\x1b[K" + self.line())
            self.stream.flush()
        if not self.quiet:
            self.stream.write("\r\x1b[K")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while block := handle.read(SEND_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def send_file(item: SendItem, session: TusSession, state: SendState, progress: SendProgress) -> bool:
    """Send one file until the server has it all; True if it was there already.  SendFailed if it cannot be."""
    key = f"{session.endpoint}|{item.key}"
    record = state.get(key)
    digest = record.get("sha256") or file_sha256(item.path)
    state.update(key, sha256=digest)
    url, sent_any = record.get("url"), False
    finished_before = record.get("done", False)   # then the server is asked whether it still has it all
    last_progress, attempt = time.monotonic(), 0
    while True:
        try:
            if url is None:
                url, offset = _send_create(session, item, digest)
                state.update(key, url=url)
                sent_any = sent_any or item.size == 0  # an empty file is complete once created
                finished_before = False
            else:
                offset = _send_offset(session, url)
            progress.at(item, offset)
            if offset < item.size:
                sent_any = True
                offset = _send_patch(session, url, item, offset, progress)
            if offset >= item.size:
                state.update(key, done=True)
                return finished_before or not sent_any
            last_progress, attempt = time.monotonic(), 0
        except _Gone:
            url = None
        except _Retry as error:
            if time.monotonic() - last_progress > SEND_GIVE_UP_S:
                raise SendFailed(f"no progress for {SEND_GIVE_UP_S / 60:g} minutes ({error})") from None
            threading.Event().wait(SEND_BACKOFF_S[min(attempt, len(SEND_BACKOFF_S) - 1)])
            attempt += 1


class _Gone(Exception):
    """The server no longer knows the upload (it expired, or the server was replaced): start it again."""


def _send_answer(status: int, body: str, what: str) -> None:
    if status in (404, 410):
        raise _Gone()
    if status in (409, 423, 460) or status >= 500 and status != 507:
        raise _Retry(f"{what}: {status} {body[:200]}")
    if status >= 400:
        raise SendFailed(f"{status} {body[:200]}" if body else f"the server answered {status}")


def _send_create(session: TusSession, item: SendItem, digest: str) -> tuple[str, int]:
    folder, name = split_folder(item.name)
    pairs = {"filename": name, "folder": folder, "mtime": repr(item.mtime), "sha256": digest}
    metadata = ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items() if v)
    status, headers, body = session.request("POST", session.endpoint, {"Upload-Length": str(item.size),
                                                                       "Upload-Metadata": metadata})
    if status in (404, 410):
        raise SendFailed(f"no tus endpoint at {session.endpoint} ({status})")
    _send_answer(status, body, "creating the upload")
    if status != 201 or "location" not in headers:
        raise SendFailed(f"the server did not create the upload (it answered {status})")
    url = urljoin(session.endpoint, headers["location"])
    return url, int(headers.get("upload-offset") or 0)


def _send_offset(session: TusSession, url: str) -> int:
    status, headers, body = session.request("HEAD", url)
    _send_answer(status, body, "asking for the offset")
    return int(headers.get("upload-offset", 0))


def _send_patch(session: TusSession, url: str, item: SendItem, offset: int, progress: SendProgress) -> int:
    with open(item.path, "rb") as handle:
        status, headers, body = session.request(
            "PATCH", url, {"Upload-Offset": str(offset), "Content-Type": TUS_CONTENT_TYPE},
            (handle, offset, item.size - offset), sent=lambda count: progress.sent(item, count))
    _send_answer(status, body, "sending")
    return int(headers.get("upload-offset", offset))


def send_main(argv: list[str], stdout=None, stderr=None) -> int:
    """``pyfiledrop send``: 0 when the server has every file; 1 naming each that did not make it; 2 on usage."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        config = parse_send_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    items, problems = collect_send_items(config.sources)
    state = SendState(config.state)
    progress = SendProgress(items, stderr, config.quiet)
    stop = threading.Event()
    shower = threading.Thread(target=progress.show, args=(stop,), daemon=True)
    shower.start()
    outcomes: dict[SendItem, str | bool] = {}
    work = queue.SimpleQueue()
    for item in items:
        work.put(item)
    workers = [threading.Thread(target=_send_worker, args=(config, work, state, progress, outcomes), daemon=True)
               for _ in range(min(config.parallel, max(1, len(items))))]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            while worker.is_alive():
                worker.join(0.5)
    except KeyboardInterrupt:
        stop.set()
        shower.join(2)
        stderr.write("stopped; run the same command again to go on where it stopped\n")
        return 130
    stop.set()
    shower.join(2)
    return _send_summary(items, outcomes, problems, progress, stdout, stderr)


def _send_worker(config: SendConfig, work: queue.SimpleQueue, state: SendState, progress: SendProgress,
                 outcomes: dict) -> None:
    session = TusSession(config.endpoint, config.password, fingerprint=config.fingerprint)
    try:
        while True:
            try:
                item = work.get_nowait()
            except queue.Empty:
                return
            try:
                outcomes[item] = send_file(item, session, state, progress)
            except (SendFailed, OSError) as error:
                outcomes[item] = str(error) or type(error).__name__
            progress.done()
    finally:
        session.close()


def _send_summary(items: list[SendItem], outcomes: dict, problems: list[str], progress: SendProgress,
                  stdout, stderr) -> int:
    failed = [(item, outcome) for item, outcome in outcomes.items() if isinstance(outcome, str)]
    skipped = sum(1 for outcome in outcomes.values() if outcome is True)
    sent = len(items) - len(failed) - skipped
    stdout.write(f"sent {sent} file(s), {human_size(progress.sent_this_run)}; {skipped} already on the server\n")
    for item, reason in failed:
        stderr.write(f"not sent: {item.path}: {reason}\n")
    for problem in problems:
        stderr.write(f"not sent: {problem}\n")
    return 1 if failed or problems else 0


###############################################################################
# main() ######################################################################
###############################################################################


def _prepare_folder(path: Path, what: str) -> str | None:
    """None if ``path`` is a folder this process can create files in, else the reason why not."""
    if path.exists() and not path.is_dir():
        return f"the {what} folder {path} is a file, not a folder (choose another with --{what})"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".pyfiledrop-write-test-{uuid.uuid4().hex}"
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as error:
        return f"cannot write to the {what} folder {path}: {error.strerror or error}"
    return None


class _LogFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else record.levelname.lower() + ": "
        return f"{self.formatTime(record, '%H:%M:%S')} {level}{record.message}"


def _configure_logging(config: Config, console: Console | None = None) -> None:
    handler = _ConsoleHandler(console) if console is not None else logging.StreamHandler(sys.stdout)
    handler.setFormatter(_LogFormatter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.WARNING if config.quiet else logging.INFO)


def _fail(message: str) -> int:
    print(f"pyfiledrop: error: {message}", file=sys.stderr, flush=True)
    _pause_if_own_console()
    return 2


def _pause_if_own_console() -> None:
    """Started by a double-click on Windows, the console closes with the program: keep the message readable.

    The console is our own when no other program shares it: only this process, or this process and its parent
    when that is PyInstaller's one-file bootloader (the same executable) or the py launcher.  A shell sharing
    the console means the message stays on screen anyway.
    """
    if os.name != "nt" or not sys.stdin or not sys.stdin.isatty():
        return
    try:
        import ctypes

        kernel32 = ctypes.windll.kernel32
        pids = (ctypes.c_uint32 * 16)()
        count = kernel32.GetConsoleProcessList(pids, 16)
        if not 0 < count <= 16:
            return
        others = set(pids[:count]) - {os.getpid()}
        if others - {os.getppid()}:
            return
        if others:
            handle = kernel32.OpenProcess(0x1000, False, os.getppid())  # PROCESS_QUERY_LIMITED_INFORMATION
            if not handle:
                return
            try:
                name = ctypes.create_unicode_buffer(1024)
                size = ctypes.c_uint32(1024)
                if not kernel32.QueryFullProcessImageNameW(handle, 0, name, ctypes.byref(size)):
                    return
            finally:
                kernel32.CloseHandle(handle)
            parent = Path(name.value)
            if parent.name.lower() not in ("py.exe", "pyw.exe") and not (
                    getattr(sys, "frozen", False) and parent == Path(sys.executable)):
                return
        input("Press Enter to close this window.")
    except Exception:
        pass


def _disable_quick_edit() -> None:
    """In a Windows console a stray click starts a selection, which pauses all output and with it every upload
    until a key is pressed; a server window is better off without Quick Edit."""
    if os.name != "nt" or not sys.stdin or not sys.stdin.isatty():
        return
    try:
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.GetStdHandle(-10)  # STD_INPUT_HANDLE
        mode = ctypes.c_uint32()
        if kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            kernel32.SetConsoleMode(handle, (mode.value & ~0x0040) | 0x0080)  # -QUICK_EDIT, +EXTENDED_FLAGS
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    return_freed_memory()  # first: what compiling this script freed is one block yet, not strewn with live data
    arguments = sys.argv[1:] if argv is None else argv
    if arguments[:1] == ["send"]:
        return send_main(arguments[1:])
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl+C while starting up
        return 130


def _main(argv: list[str] | None) -> int:
    try:
        config = parse_args(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
        if code:
            _pause_if_own_console()
        return code
    console = Console(sys.stdout, quiet=config.quiet)
    _configure_logging(config, console)
    if config.dz_cdn or config.dz_version:
        log.warning("--dz-cdn and --dz-version are retired: the page has its own uploader and loads nothing from "
                    "a CDN; they are ignored")
    # With --s3 nothing is kept on a node: no folders, but --tls's made certificate, which is this node's own.
    folders = ((config.storage, "storage"), (config.chunks, "chunks")) if config.s3 is None else \
        ((config.chunks, "chunks"),) if config.tls and config.cert is None else ()
    for path, what in folders:
        problem = _prepare_folder(path, what)
        if problem:
            return _fail(problem)
    warnings = option_warnings(config)
    if config.s3 is None and os.stat(config.storage).st_dev != os.stat(config.chunks).st_dev:
        warnings.append("the storage and chunks folders are on different disks: each finished file will be copied")
    try:
        engine = open_engine(config, events=console.handle)
    except S3StartError as error:
        return _fail(str(error))
    except (sqlite3.Error, OSError, RuntimeError) as error:
        return _fail(f"cannot open the upload ledger in {config.chunks}: {error}")
    try:
        tls = open_tls(config)
    except TLSSetupError as error:
        return _fail(str(error))
    try:
        server = make_server(create_app(config, engine), config.host, config.port,
                             ssl_context=tls.context if tls else None)
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            return _fail(f"port {config.port} is already in use (choose another with -p)")
        if error.errno in (errno.EACCES, getattr(errno, "WSAEACCES", -1)):
            return _fail(f"not allowed to listen on port {config.port} (choose another with -p, above 1023)")
        return _fail(f"cannot listen on {config.host}:{config.port}: {error.strerror or error}")
    _disable_quick_edit()
    if config.open_browser:
        import webbrowser

        url = local_url(config.host, server.server_address[1], "https" if tls else "http")
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    _stop_on_sigterm()
    return serve(config, engine, server, console=console, tls=tls, warnings=warnings)


def local_url(host: str, port: int, scheme: str = "http") -> str:
    """The page's address for a browser on this machine: the address listened on, loopback for "every
    interface" (of the family listened on: ::1 for ::)."""
    address = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{scheme}://{f'[{address}]' if ':' in address else address}:{port}/"


def _stop_on_sigterm() -> None:
    """SIGTERM (kill, systemd, docker stop) and Ctrl+Break end the server as Ctrl+C does: with its last line."""
    import signal

    def interrupt(number, frame):
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGBREAK"):
        if hasattr(signal, name):
            with contextlib.suppress(ValueError, OSError):  # not the main thread (embedded): leave it be
                signal.signal(getattr(signal, name), interrupt)


###############################################################################
# Generated assets and the page ###############################################
###############################################################################


def unpack_asset(packed: str) -> bytes:
    return zlib.decompress(base64.b85decode(packed))


# >>> vendored assets: generated by `python build.py --vendor`; do not edit by hand
HASH_WASM_VERSION = "4.12.0"
HASH_WASM_SOURCE = "npm hash-wasm@4.12.0 (github.com/Daninet/hash-wasm), tarball sha256 1db32a125fb46177932ec8ac438d3cd8214ebdfaccb5d6611b657d88eb586f92"
HASH_WASM_LICENCE = "MIT; Copyright (c) 2020 Dani Biró"
HASH_WASM_SHA256_JS = (
    "c-qBWYg6LPw*J0<1!L{9;DuMYi#p7l?pz>Tq5)BKYHFX5gb;}dLXeB&e?Mz=cMzS+Yxb8jRZNmjXZ2dox^}1I@n4_*mHI0+F"
    "&C4+SLWg&m7YY=Y;kscyjrb}g4x6U;>Zdgj%TJdHC^X;*D-^SrL9a#HUlq3y?KZY|Kod>6D*umSG$7i<A43@(|8$JkrxJOlG"
    "8HJ2jS@6v7&=|J=)BiaGY}1vv3|Q4i68Of$faFz_AZL#Wx>9d+9r0wY2D!IXj5Sy;9&$9Uk)Ik@;YM<)`Uy2jaPd?=be6mQI"
    "uUuZD5`aAf*d6L0bL_4JJV__1*OapnkRMv?1eclzVU^GoI>9YMcb`c*=ZZwbOLqPYh$o<EuMl$LYr&w=^ioE<DCX0cK|$k}F"
    "Oo*j^ex*Zt`fqzsndM+XA@h$vF16mqH8kcH>tlTCc3MGaH=L3ZpibUMo3lh|*F_v1?h>nQ@oynqU5w|hAxsFDqR)x6aq7U><"
    "^|X06>`C^`-NW4wXb@k!9qQpQ?=Q`vL5LCY>%#TwuA%1d3?fO>$;2v7#=QrBd3&=WloZ4>wr{I?{&v{&2^qxn<=dO}y?wKu*"
    "o^_9?(FJXQ3t*2)2sgVOeHI&9VlUw8kD+Z+6h2j!=Mt8EqSF)DV)=$qPQBNv`o~7=8}=_c0$ikDS=0WtQoAI`d7!J%CYgd+}"
    "<B=dg00Cs<;9P>7qokQi~ug^Tv&PSsjPr&7w-EbX@IMyzWh}7`8{_4Zyjz<RTwW@=xZnTe%4Q&@LHIorh)i;(m5q3}(X`r+F"
    "%9M&79(-q*s;O;!iix9zb}h~)X=BsvBpNBZhg^9-ePveG0nEH}n^l#R?t4W937R3lO}7IKm)kqpuz8fgT^)#+MuHJ$0LugEe"
    "{I%G=eihxWH3lGqNeuhhw=}2>RRW_hKugF$kQ8m({F3>YQr2%72h>J9JN|mV&Mj#vG6@h+Deou#cw?H%W$Ogv0B`wp-6C#I%"
    "^)=K-M$hmcJ75YIE@8BwKd7o9NjG5x22&-3k8gTNqq|R|iO<sp(4Sg5A&ZViu908akVpgWar$JRev6Wua6&wy8pG2^%^is6h"
    "|6RcGzeg70Kd?;H`feo2b}Pk)j|Tg#IOkI8^A*z_*xSgc?K(e)Qm1*rV`Tw^sY`jz(+>{Iz8yi@R%w@GX}^T$N@UK0XYGeJ$"
    "WRCi2+t90e^VzUen{1y6&&?L|QF6;kHbB!&3_PNt<Xj%~ffm3AzHlk6nFj7?Zr^5wNpK(YTefq@=(-<<<^b8`gJd;q`@G>f%"
    "wh12{^qbRlVy(VOHMUYBLr8Yr6G1U{y4oO0TDuhG2QSe^zvv+-T94?ceW&G_=0@$>QcJvKg7`1o+#jo*|snUAl(9Y4Q6z8;U"
    "Sit&|X<KOY|r(*o+>-Z$u_)RhXG}-tQW{+~oLR@vGgQ?QC10D1XKSDw>aXkt3C6N|?UZqmAx6z0X$2-njAMW)gMJv!eX{y}W"
    "8`3t6O37kJy$DC-ZJ@b6<4t;N8?Albq@8U<kKA972a<>fSz$bM1rOal9=geRDDd&`6ONDZ0(2-zT8rz@f1^Wbu&+Zu*5Rem^"
    "Gg~zrE*|z@kmN{aJ=I@c**pjG(z;JOTYnquYfqfaaOd7A=1J2mS}Iq?Fw)2iT2*EeahPVqP@RsFLF6`NgFUZY444ks<J01+!"
    "JzMGdbxsmlKX$&dQ@kg}%L&M-(P2c`Ga3mzBh_s@&#oguZWtz76n+9{e<p>qOu>5##k>EFXT?+y_Mrq9O)Ks6&W{Ql8Q72-+"
    "P%y9;!$;iq%j1wp$YXhR&Qs5hPaR$lm4Uij9e$JzlO)(%I}Zu550U)}Yeu=a-N-`Mr{dHX=L590P2Zx=q@h<$nz@peJKv7^6"
    "c7&Jv3Y{qer<0=W+B_TV?eG9(}E_+4DUg5H%+|-62Wi%B*QxP;JuuBzwN}k!&m9VL+*ruA?25r%9@7lQyI-=d#wHFz!J5H-2"
    "XfZyKN15}e3m$c$AIM`AbWcwi9!-HqGseTCXp5YG5t|hen^hQ(jX7Xr_QaSyG3EfqbWDsVY+PTA>x*%LHiei%*L+-|&t|MoP"
    "i5_z(5Dvb)8jE(6Z+I*eR|x!G{L{N;~#9BMvQ;Z@rBSe<G%@ZtpWcHu3J;^Zwmfx;N64Y9rsbeKNb8_pe-SG6HZ&`wjp$@0P"
    "QB~m+NCFXb%N#^u-bU2Ap<J(C!IrP#-g(Pq|D28*PWpHEVAPY+5^P?s&VvrnSR{`%+6_)7oLfeW@+zw|DfpFSP~z_KrUHrM9"
    "5o-qGjywgtZJ7+)^?SjavWvZLGq+6I?h_zaDG2IWS-DR4g&v8X9xQ3K*o3x5jpfvNC;Y3u_X-o6m+i(NbSrAV|#yY>f0>yFc"
    "^2wIF!<k4k3q8^Y(IC37>z$4TPQib8s5qNZVctFgPbjH6XFwq1iEf^2S)VR%gVoXnr>BE>2{3d){RgA0haV79Y3CHHKt1a}|"
    "j`exZ?WHU9*^Tvi&wZ&Y^x2K|dCz^REBNom{NJN(&$v#7&$orocL4h?@ZaV>KNI}V1pf=*eGR{m^Dpv@B=U>|z9^#%Hly7V*"
    "t7&T=!<RmwKz5pg7$-;jlTE@KcCYUIa3lj6Mazvzma$x>j-Q*J8XEK(FHd84jb-Ey1+)?VZ(h%7ue`KY`8D!g1)|^&wc4a(7"
    ")Kx=e~3y=wIyUhwg<$@|sk3I}({_bm2DoIA1Aa?G5!==N9HV-bG$90gDr(ca2z_7=~T4^6dT;?_V}%6zh&M%=@(a0y{6U^U7"
    "9}qqQa%wt!jFoHlMtRd0avG0LAGu;;-CV7`Jm`~-3~=%?(;po7akX<!|V*B2$IS>y`RfjVPW!rDU}Vl0QmR<gH1yXV=(76n="
    "c=iNZs#!cwSIA4{cEz~F{;BPL}qb93IxjbDaPjN=K$BsM?pw6APm<(H#VT!eP-bES~*6K~H!yzsNmMagGYs3?dO}nH&8s<%@"
    "P%C6jucg3zE+h*N=h-;lyVMBKXkvZ2Mj0--45vbdQz1ihG|`{h1Z3#-Db<uNj<@DVmC4$KaiJEwV)YB^w}kvaes>{Wxo{){h"
    "Mfep5R3!!R`68<yl#k&{L4eupYabmVEn_8^FMCfue&vvJ85k;FK>2T1D>IPxiw_-AqQ}47(E?vgZcfegm@aDPZ@Q}=G&);^C"
    "h-Zj<X_gR$`oI+AupEf}gkx#I=EQ0eGehwe_0mqgMfJ)>J7WHft(@kC{Ln_|iF+hD*^Ni2Wxlub;-vTjv4nK_WWhj`X=6R8|"
    "`{xel*{4mp-ePhiO~QxG%S`~zlp_t(LKo`TLL#7qX9<R-&R{}X1t8-W?bG8KKp!xc1$*~E3hKU~^>hvk4_sR}IB7)y6#>OR&"
    "_t{Y>i|1*}P{fgz_16Ve)Ud^1~I*sflz>-A!SgH)mKiQvkd9pBFv_B&WmPzgJv@@^x2KdV4HUVZk`@^*b%I7PZ3-QKPVLWJ4"
    "-`S<gvAh;oUdMKsEgwHN9OQSC1WU;EF6#LfZDY?a?>LrIf#o!gMUGz6D;3~Z(TK9clJq&2Fc)>$T$E!;V=QG{i+f-(vjIFKm"
    "g=8k=IKS}>AtzfbuyO#E&@yN1$E8lC=AP%z_JzFAIt?c8S&J}%B2BfcDLp8w;7wiam)%aW;CBIPRGEPBw>DP;hX`U0XYJd%_"
    "CS`%!{~~7ntGPhhbJ@^8}^OV&Z_u#HmZ6hLD90Q2$I$p6f1!oR_hjlkm85JghMM0Ye#OgJ-}F^fkke$*BrC)mTpOYg`M{S{k"
    "Wg>;;}#E^Ki*eIchG%h_0#M_JNf_#=iW+ZyeR3{{37lXEKMoW{1%<Lg5c#g)+ZG0rpjRc0HC$Wuz3r>w2Kcq9_XA2EdAP+@D"
    "0%r^4OHe_KNa%>wAt2~&4d#Xfwz%ydj!giJ0#z0^;h%q}k^`<AQ7Q;UQW}3ik2<KNY9|1XBSAjUGc(^`Hh8i_o1+k<m_8&4V"
    "sm-y3qlj6Lp53{^TBDH&%R7#xJ9Sl%1+i3_pZN?+Nnk0(SlZjG)pCF_Ymfv>j8}*y*klWMMl6RGpU0YP9?P-p#aI?+&4*}(G"
    "0RGVr7p1SYZPpQ*`JT?eU4d6VAhK5uOB`I)B(O4{Un&33j0HwE3<iLgRk}2d>+|F-SrSl1>--}xm}9*uf*}+DR$R2wF>;2Nw"
    "91PEW!4{URsD{AKN94WlLb$im}{uvoM*1+%$2MU^x(2_AquR80V>u?LCgADzH>zEStyKVbv)zfB86;xK_ik)G%JP5HpEk*5a"
    "6nIIqNUeta=>J9Z8IB@t%AmvPNdlSm)ruz+_Mr{+rNYa4t+q#~9*i?8XJY)yw_c@<;1uC|@|5Nh_xGzpgGE-s>NVEhNY{UI*"
    ")){oO7w+qA%<ic7U^UaW9=dg7#E~E6uE{d^_=_t$9pM0!x+Mb5^P6h1(<pBOIHXmxO8Fow-UC5&E+Xel&k2O@^-kf5N1-n3;"
    "&=%I1qe)3+7%{sL`JW8-?E+%ygwIi19@Ck}bS4cF>1^5UENZxxkFkX3Z21E@`%dKSkLs*eJZa8Y{Ou>n*)yKAc`mzRG2>6U?"
    "C!!Wx27t$4a5-XE8G_UQ0Fk)03Bdl+RtU+S0-Cq=a}_l%nBFg>=APV+Q!E*8wkv<a6N*pr%MLQWvva%We~5l{akj%ZAKS1qs"
    "KOL;+x)<@>r4pOIy@GQ)U|s%is^W%&hjka;3~;Ndhcy1ePE4vxyyO(~{3)#>cTV1(qN6vq^rOy~g<;<e~(ai8>o|nG~{I*6F"
    "icHcOPttfy|(qL|BWlVGU|yZmS_tF_GKG=O?`VkE(GD6srsE^FL}CykRa@CG$e0xW%j<p*=wU0`g=YnV%GcZuvz%vms(b$Kp"
    "(;&E}2C@#*l?KEm)E(?=jd7CUQHq`2g=Z=f4E=_=CFIik1%j7ZaQeKxPu)kumxaf!Nt1Zi!|5Yxz(qxFKvc~*O=YF<M<Y%|{"
    "x23T{xy>Y~e;$(6jN6OqWXbYxn553RO;$5D3R$b|lVZX-3+*MV8Alg)wXQ2CowG385H(|mzpq$`_3?#R9}hvcJp8tXaaz)3o"
    "ysVmjI|QZ?;)>X4wNmH1G|ZGV6$Dg=oDE!u}M-l`MhrWXb!ZpgWBmz<@S`I)_h1-Yt~M)m6dVF?djvS=54ZCv$>p%s#B~Rnu"
    "%)7o~Si-_I?T9lXS#8n2vY{(?);A+{oX-M8XatVFxqdslevuXa_JSm&M#%*uj9e_e6UyZolRBF=h4vwN4WIcv{bfD#|J)nY+"
    "?xw|4TzK7LzoUadm&4r`>*e>LC2xVmp2zlp1$VyhBN{@Z!gM=`4&A1_rl-}jPWwicKf?qwq^l4YOmN7Uq65?gMeEq~l5QBMi"
    "{@rLgy{2(ugTg$w^l?rSRCc$@4Py8L9*#9Gm{XY`$A=~Vo`>*$axUucN$t%BGBdeYUGz?~3&uAYvh$r9QsVOYi$GUF`-M6?5"
    "zL3G+&#4q;$j35xWW{8V#k*r!ygQao`P@L}@6s>C`^Ag+{UZ7x#21v|pX-cqv+`u0@Hqp<jMk&>b}Y6(R-!WMRf=_nx#^#4k"
    "0M!Yggq_r9Vy0_yofJ(5nomyZyDnuk0TQiM<ybU5S(wZ7^ybdUZ+3B$W6_<*<x)Av0FBA{K(_u<GxZ})3iQN)AZQ0_|DH*Zm"
    "6p%<CU7_?*Z9<TVfckBJjJ$eU>EXiG8vf(A7fXQi}V4LB71^(!4P|-CBbN0nCWq>=uC&wm+9l3EQ8^_LqwD-U|1Rf^Owo=?Q"
    "2`d9g<|kNZirE-@C^Pw%;TivGp+x4O{gDKhTsrQrJ})KeDlh<j0)|2Loy^QTr`>_wdr1NZByY#bt?-XKpH3hrq=#yzcKKdWR"
    "6{YS9xme?08*^)xpUf4n77VP2?W-2AP!fWH*wf63syuDUjv~lBV(qv;X`EVb$LfXb9%Iwj$g?rUTY_FOTA@Agv*lP>l8ynZJ"
    "doFR0jKcR7>TbKn?Ug9Tq^Qj{8sYl{>D#@Y`}^nM9@{?${<cJaLyUSD?<sqCT)}t8F6Dbal{b4E$(y~OJ09>|x{!r*T$Cljp"
    "1WPlVD=VmxV<Hip(OUYBk#rJyx;EeK1j@a)ZgP>O3ZtHkN0hI-n)CeYl(Sh{@&ueFWLKkX}6!7aDQ>xzDAX9n7{A#a#OySo8"
    ">aX_j1!Wd$}oGV~mihUB(~tgPPEDZ%s9%;SkybpJ;4vrK<RTU{*PPnAJx4>2WbT&bQ}_@^NiyUTkan0{Btzy8u^wzp(a0IU7"
    "{l>iohb##45>yuDYa_M`Mrf?VFiZw+`XG-gh9Rlc~IRm`TH?`$gbr~9xvKAlysj|EMG)9l<n-I>~PTPi%=-$|9)Cdlg}qk3|"
    "20`ZOFcMgaH#8yN|K{*Ng_QLJZCVpx{>IXUeh~?~{W)*6-eOf+vIgdYJNm2YrC+Fs9=6UW!%XyFroK@QW@gwclFX!Qdw{S9<"
    "^y>#NO3uhU@1C~s1DI&OdG^xuC~(#hTxVV^GqNUl$AJG{UUt3h{oc`J9<Kh_-NQEaLCrZivctgns-(%$lj$#=%voBii}Re8@"
    "`6QV1{V9U=c{%G5~SSpn~!uzTFbm-G8q`w3DQ>1&b)Z(G_BJkb2jrg2*Qsa-@Zc!CPfB2zx?9MqyBO>n>&kzV=MD{I6pjm*K"
    "lt6=3<djo~;mgnlG&=oTowPiMKd<SVqn|2K5LY3jHT1oq6#?YYKgQCrXieI#d7h{BkaIvG?5TDVHIQJyB9Y5TVTE_8S1AFVC"
    "c|p(wVun8h#)+LV9G^b~q_Djy$qp#23LF&R=?ed9U4&3WOxo}&^48GiG<R0JU$dx7cun`aG#L?&K1K_kHzS-<LupJ;u>|9*L"
    "Q<pp-Q`pOSyoK()L2TR}oRIdXj#t~hP$Id)+c*uo@W(}<ddgN@leFYYv1XgG}^RI~Kn-<pXeBVa#8#j(cx==YJnQWST`BMD>"
    "|CJ7Fna`igKd@bcb`9G#-Y&2R>Ide*ku@>r5>O{mI-mKwkk5tngZ#VZ*D+1*vfN^5J%2t18^d!2&Xv#ZxsuKDn{HkErhNbM<"
    "xBaTe52Xy_qzM#^sAc<&fIL6bL+?#bjbaD^F?U4AI-hMJsN|0CBcpG7zP)K<#1wvt*->E&Ksu>7VObi*CDS4Wif&v#=$Zg*A"
    "6o0uc0S3@PepD=5uqC){aI@Q#m-<M9#%{yl^78@SVVoCg8#2v~}byxH{4Pe@%wOWXL`l5|cRxGOQz~0|c)<XO)~BUUURW7Tn"
    "l_EGncAv;bli7#n^Fm_k549b{h4eh-xx+CFla*#S5Ie{AOT`T?Pmtf-Bq)@paU`o*Qu>t7A7Z-%#b=EwpcbSK{Z)PD%V+2ec"
    ">EuU8F%{E^smdcgtN$oUye30AJ-!WLMR5Lr%C1ASbvo3UUPQZdU-}HSCAerxV^6CWGu(PNANRQOCde@95M`J$(@<%6?zh0Hi"
    "A93q(i!i-|I-p-C-`u|o-wzMd+TZm;?zOELw?Tx}USO2mD}fw+FPN4&kG(M#PlIy}JX6co%Q4$-ee;d%OQ>bO=Zv2kvju3je"
    "r_&8v;A{(Df9iDf=}1o&!3Aw3~>FNk_BN{8wMhSg(U0Cm*W17(xC<I)gRT;q0QRk06>L<OZ7svR4eCXCasd2vt!qsy{hDKKN"
    "fx<z3>Rd;)uczM*UL(?R+n;?|kCM84*ac4<mn*`N?kgZl=6NDhQ+00upmLj~pAS1D3l|PVnT-!{EUQA~0)V306JMqcYe$b1C"
    ";od_#Qn;5>x$jc}yQk?TaL=2CI5OaF>oDgWtfcS`P4J_8z&k9N71rRaag0R;Xu$M1~6XYsS)%&TF8l^>xmqQULSh~H<=Jl{c"
    "6n;(H+izgu|yu3}?b7VTEd+v(XeNw!3iaav{ayk6QIl~HxdYUk$U_AnQ$>&~WZbCKrA1(0E2VWppi7@ub_*pT_nT>=qDGMqA"
    "(8b6BmvBHO@Nfo{kj7_Y4?%AMH`%#ni~|K{TP#N=_pY3ll``l_H1<G+K|nL_Ssd`e=`LZsWYVlo!jSep8vUhZAVz@+)1BDAk"
    ";(R4XA%8gCgA{R%<nl;u_8iF4@Ph{->?Al75K-G=+k-pWZg{bIR#E$a*qh?&$;1ijL+wC{<M0wAJIQcEb?sYkLQb($I3mf`D"
    "e>qI0xq34TIvr8M|0m^UW+eINLG@_>?~%%^h=k&hCwTbLtdFq9?yvu&(Ig^)K4zdZkc2Jbc8w^!~ZhUdKGhr~TY-y~YViwJZ"
    "kUm!&sXg<?%yTXPG03O;v%iCOXoJq)Ka-16<%?@9fgY8p-?3JHku_20yRbLFRCpCdVm`3yYw49?bN{m+mwCAXS;krTH7B=tP"
    "n6}MNylnhTOd?fbBZrt1=Ce`=04yzR2G2GwpfB?sy{|CY7#|5KMW1@SbS)T<t?#O3hj$8lPCbux39LDqS`~*8NF9}j%0D*br"
    "#2#agBWErgCS?XY7m7XW;7`KzBNkCW77PAYekT!x;&&2(SHUzFBHO$6a+dC#_U)gph!b^Oa(?+z*rjwVyeXt~ip6%^k$(PMz"
    "*75r-Gl0NFEP7dRBx^!twTIY2RZ&1CV(ww6n3r*r!P4_H0?7@V4Hq3!+qsE^E2l79AFBFI99X(Z1=jSTqkhmCZ@#ECdIY0Lz"
    "?~pX@wze*UMQ2(EFVQ0jDueFb}YQ;_ZK_X{Q!QGR1qP(wt4;=ikrvOA6!IBA0R@dH?%4CiRl}Usn3Q`=cUQ48INr!8?xeT#u"
    "h#_2hz{+|Tj-bN5wU6l)|_Z)o4#??477bNf01TX}npI@=8(;?So&)Pqcgpx|AS%7Yqzp&gvk3J6x_B8AZ*ast!_D9Q^ktDBK"
    "G@*VcqSyJA^%y+O{G1($Stg5iSH&Qus{?43(9L*^iW=&xRORD@!4*bqq`sl#B1P6Ea^V}A1yv`+1_z(--P5NNstPgU=Yr({V"
    "jp)cjne|iZmEr+mh8EY!KqL2>-B3cFwazrQI>5<qd40+9n94Xj2PHu2h@5_tz?|W=*x!|!k7+koDvGroR#A{67F^gABaS4`E"
    "RtcsO7GnUUgFs1vOA(;aoHUa?7$JB4&%WIT6d8T$`a;9++F$e%mew;BU~+E;k#NEq}WxdxLe?1i!)$m{13&vnaF@vP<+UsYU"
    "UTw2^RnouH;Zr{t>Z^1CGrb9@9wfd`AxMAYbWiZXZ}cA+6T6oO-k~Ctw6Ygnw*FD2Dpy9x?6r>qOe#^50Kg@XrRZB|%{3{9p"
    "eEnXRDG"
)
FAVICON_PNG = (
    "c-rd>@N?(olHy`uVBq!ia0vp^3LwnE1|*BCs=ffJa!(h>kcwMxuRC%bP~c%XuxEk(w>R5w&tAbIo$8x)vq8Pnx<gJW=<3u@Z"
    "#TMVuP+dND0@#~(IM_f5f1Sz0uBs}EPvz;qNDQ|WdCtp;M>|3?RdFC@X#f0#t6BGWe$7y16c}HtUteo)v+?p;eO=4*`H_m#K"
    "%9GS1*V%d;Fc{JkSXYp00i_>zopr08%$V&;"
)
# <<< vendored assets

# The hashing worker (pyfiledrop's own code; hash-wasm, vendored above, does the hashing).
HASHER_WORKER_JS = r"""// pyfiledrop's hashing worker.  A job: the upload's id from a few sampled blocks, then each part's sha256,
// in order, and the whole file's sha256 from the same reads (each byte is read from the file once: in
// Chromium a read goes through the browser process, which costs more than hashing it).  The page keeps two
// workers, so two files hash at once.  hash-wasm (MIT) does the hashing: the page may be on plain HTTP,
// where browsers offer no crypto.subtle.
"use strict";
importScripts("{{hash_wasm}}");
var SAMPLE = 64 * 1024;
var idQueue = [], hashQueue = [], running = false, cancelled = {};
var hashers = Promise.all([hashwasm.createSHA256(), hashwasm.createSHA256(), hashwasm.createSHA256()]);

function read(file, start, end) {
  return file.slice(start, end).arrayBuffer().then(function (buffer) { return new Uint8Array(buffer); });
}
function post(job, kind, value, index) {
  postMessage({ job: job.job, kind: kind, value: value, index: index });
}
function label(job) {
  return "pyfiledrop-1|" + job.file.size + "|" + job.path + "|" + job.file.lastModified + "|" + job.partSize + "|";
}

// Who the file is, without reading it all: its size, name, time and part size, and three sampled blocks.
function fingerprint(job, hasher) {
  var file = job.file, size = file.size, middle = Math.max(0, Math.floor(size / 2) - SAMPLE / 2);
  var blocks = [[0, SAMPLE], [middle, middle + SAMPLE], [Math.max(0, size - SAMPLE), size]];
  hasher.init();
  hasher.update(label(job));
  return blocks.reduce(function (done, block) {
    return done.then(function () { return read(file, block[0], Math.min(size, block[1])); })
      .then(function (bytes) { hasher.update(bytes); });
  }, Promise.resolve()).then(function () { return hasher.digest("hex"); });
}

// A file of one part under 64 KiB is read once, for its id, its part and its whole hash.
function smallFile(job, hasher) {
  return read(job.file, 0, job.file.size).then(function (bytes) {
    hasher.init();
    hasher.update(bytes);
    var whole = hasher.digest("hex");
    hasher.init();
    hasher.update(label(job));
    hasher.update(bytes);
    post(job, "id", hasher.digest("hex"));
    post(job, "part", whole, 0);
    post(job, "whole", whole);
    post(job, "done");
  });
}

// Ids first: a file waits for its id before anything of it is sent, and the id is quick to make.
function drainIds() {
  if (!idQueue.length) return Promise.resolve();
  var job = idQueue.shift();
  return hashers.then(function (pair) {
    if (job.small) return smallFile(job, pair[1]);
    return fingerprint(job, pair[1]).then(function (id) { post(job, "id", id); });
  }).catch(function (e) { fail(job, e); }).then(drainIds);
}

function eachBlock(job, size, hasher, each) {
  var file = job.file, count = Math.max(1, Math.ceil(file.size / size)), index = 0;
  function next() {
    if (cancelled[job.job] || index >= count) return null;
    var start = index * size;
    return drainIds().then(function () { return read(file, start, Math.min(file.size, start + size)); })
      .then(function (bytes) { each(bytes, index); index += 1; return next(); });
  }
  return next();
}

// Each part's hash as soon as it is read (sending waits for it), and the whole hash from the same bytes.
function hashFile(job, partHasher, wholeHasher) {
  wholeHasher.init();
  return eachBlock(job, job.partSize, partHasher, function (bytes, index) {
    partHasher.init();
    partHasher.update(bytes);
    post(job, "part", partHasher.digest("hex"), index);
    wholeHasher.update(bytes);
  }).then(function () {
    if (!cancelled[job.job]) post(job, "whole", wholeHasher.digest("hex"));
  });
}

function fail(job, error) {
  post(job, "error", String((error && error.message) || error));
}

function pump() {
  if (running) return;
  running = true;
  drainIds().then(function () {
    var job = hashQueue.shift();
    if (!job) return null;
    return hashers.then(function (three) { return hashFile(job, three[0], three[2]); })
      .then(function () { if (!cancelled[job.job]) post(job, "done"); }, function (e) { fail(job, e); })
      .then(function () { delete cancelled[job.job]; });
  }).then(function () {
    running = false;
    if (idQueue.length || hashQueue.length) pump();
  });
}

onmessage = function (event) {
  var job = event.data;
  if (job.cancel) { cancelled[job.cancel] = true; return; }
  job.small = job.file.size <= job.partSize && job.file.size <= SAMPLE;
  idQueue.push(job);
  if (!job.small) hashQueue.push(job);
  pump();
};
"""

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>pyfiledrop</title>
<link rel="icon" type="image/png" href="/favicon.ico">
<script id="pyfiledrop-config" type="application/json">{{config_json}}</script>
<style>
  :root { --accent: #0e7c86; --bad: #b3261e; --good: #2e7d32; --fg: #1b1f23; --muted: #5f6b76; --line: #d6dde3;
          --bg: #f6f8fa; --card: #fff; --soft: #e6f4f5; --badbg: #fdf3f2; }
  @media (prefers-color-scheme: dark) {
    :root { --accent: #4fc3cf; --bad: #ff8a80; --good: #81c784; --fg: #e6e9ec; --muted: #a0abb5; --line: #3a434c;
            --bg: #15191d; --card: #1e2428; --soft: #1d3336; --badbg: #3a2220; }
  }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
         background: var(--bg); }
  main { max-width: 820px; margin: 0 auto; padding: 16px; }
  h1 { font-size: 1.4rem; margin: 8px 0 4px; }
  h2 { font-size: 1.15rem; margin: 24px 0 8px; display: flex; align-items: center; gap: 12px; flex-wrap: wrap; }
  .hint { color: var(--muted); margin: 0 0 12px; font-size: .95rem; }
  #dropper { border: 3px dashed var(--accent); border-radius: 14px; background: var(--card); padding: 24px 12px;
             text-align: center; }
  #dropper.pf-hover { background: var(--soft); }
  #dropper p { margin: 0 0 12px; font-size: 1.15rem; }
  button { font: inherit; font-size: .95rem; padding: 8px 16px; border-radius: 8px; border: 1px solid var(--line);
           background: var(--card); color: var(--fg); cursor: pointer; min-height: 44px; }
  button.pf-main { background: var(--accent); color: var(--card); border-color: var(--accent); font-weight: 600; }
  button:focus-visible { outline: 3px solid #ffbf47; outline-offset: 2px; }
  .pf-inputs { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); }
  #overall { min-height: 1.5em; margin: 12px 0 4px; font-variant-numeric: tabular-nums; }
  #connection { color: var(--bad); font-weight: 600; margin: 4px 0; }
  #connection:empty, #notice:empty { display: none; }
  .pf-tools { display: flex; gap: 8px; flex-wrap: wrap; }
  .pf-center { justify-content: center; }
  #queue { list-style: none; padding: 0; margin: 8px 0 0; }
  .pf-file { display: grid; grid-template-columns: minmax(0, 1fr) auto; gap: 2px 12px; padding: 8px 10px;
             border: 1px solid var(--line); border-radius: 10px; background: var(--card); margin: 6px 0; }
  .pf-file .pf-name { font-weight: 600; overflow-wrap: anywhere; min-width: 0; }
  .pf-file progress { grid-column: 1 / -1; width: 100%; height: 8px; accent-color: var(--accent); }
  .pf-file .pf-status { overflow-wrap: anywhere; min-width: 0; }
  .pf-file .pf-action { grid-row: 1; grid-column: 2; min-height: 36px; padding: 4px 12px; }
  .pf-file .pf-error { grid-column: 1 / -1; color: var(--bad); font-weight: 600; overflow-wrap: anywhere; }
  .pf-file .pf-error:empty { display: none; }
  .pf-file.pf-failed { border-color: var(--bad); background: var(--badbg); }
  .pf-file.pf-done progress { accent-color: var(--good); }
  .pf-meta { color: var(--muted); font-size: .9rem; font-variant-numeric: tabular-nums; }
  #queue-more { color: var(--muted); }
  #uploaded { list-style: none; padding: 0; margin: 0; }
  #uploaded li { padding: 8px 0; border-bottom: 1px solid var(--line); display: flex; gap: 8px;
                 justify-content: space-between; flex-wrap: wrap; }
  #uploaded .pf-name { overflow-wrap: anywhere; min-width: 0; }
  #uploaded li.pf-gone .pf-name { text-decoration: line-through; color: var(--muted); }
  #uploaded a { color: var(--accent); }
  .pf-empty { color: var(--muted); }
  .pf-sr { position: absolute; width: 1px; height: 1px; overflow: hidden; clip-path: inset(50%); }
  footer { color: var(--muted); font-size: .8rem; margin: 32px 0 8px; }
</style>
</head>
<body>
<main>
  <h1>pyfiledrop</h1>
  <section aria-labelledby="upload-heading">
    <h2 id="upload-heading">Upload new files</h2>
    <p class="hint" id="limits"></p>
    <div id="dropper">
      <p>Drop files or folders here</p>
      <div class="pf-tools pf-center">
        <button type="button" class="pf-main" id="choose-files">Choose files</button>
        <button type="button" id="choose-folder">Choose a folder</button>
      </div>
      <div class="pf-inputs">
        <input type="file" id="file-input" multiple tabindex="-1" aria-label="Files to upload">
        <input type="file" id="folder-input" webkitdirectory tabindex="-1" aria-label="A folder to upload">
      </div>
    </div>
    <p id="overall"></p>
    <p id="connection" role="alert"></p>
    <p id="notice" class="hint" role="status"></p>
    <p id="announce" class="pf-sr" role="status" aria-live="polite"></p>
    <div class="pf-tools">
      <button type="button" id="cancel-all" hidden>Cancel all</button>
      <button type="button" id="retry-failed" hidden>Retry failed</button>
    </div>
    <ul id="queue" aria-label="Files in this upload"></ul>
    <p id="queue-more"></p>
  </section>
  <section aria-labelledby="uploaded-heading">
    <h2 id="uploaded-heading">Uploaded <button type="button" id="clear">Clear</button></h2>
    <ul id="uploaded"></ul>
    <p class="pf-empty" id="uploaded-empty">Nothing uploaded from this browser yet.</p>
  </section>
  <footer>pyfiledrop {{version}}</footer>
</main>
<script>
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("pyfiledrop-config").textContent);
  var STORE_KEY = "pyfiledrop.uploaded.v1";
  var MIB = 1024 * 1024;
  var SLOTS = cfg.parallel;           // requests at once (6: every connection a browser opens to one host)
  var GIVE_UP_MS = 15 * 60 * 1000;    // a file fails after this long without a part getting through
  var SHOWN_ROWS = 60;                // rows in the list of files in progress; the rest are counted
  var $ = function (id) { return document.getElementById(id); };

  // ---- numbers as people read them ----
  // Powers of 1024 with at most 4 significant digits, as the console prints them ("5 MiB", "976.6 KiB").
  function human(bytes) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    bytes = Math.max(0, bytes || 0);
    while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
    return (i === 0 ? String(Math.round(bytes)) : String(Number(bytes.toPrecision(4)))) + " " + units[i];
  }
  function duration(seconds) {
    if (!isFinite(seconds) || seconds < 0) return "";
    seconds = Math.max(1, Math.round(seconds));
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
  }
  function count(n, one, many) { return n.toLocaleString("en") + " " + (n === 1 ? one : many); }

  // Speed over the last few seconds of samples, so it is right at 100 KB/s and at 1 GB/s alike.
  function Meter() { this.samples = []; }
  Meter.prototype.add = function (total) {
    var now = performance.now();
    this.samples.push([now, total]);
    while (this.samples.length > 2 && now - this.samples[0][0] > 5000) this.samples.shift();
  };
  Meter.prototype.speed = function () {
    var s = this.samples;
    if (s.length < 2) return 0;
    var span = s[s.length - 1][0] - s[0][0];
    return span >= 800 ? (s[s.length - 1][1] - s[0][1]) * 1000 / span : 0;
  };

  // Parts: at most cfg.chunkSize, halved (to 1 MiB) until a file has 24 of them, so six are in flight and
  // the end of a file never crawls on one connection.  Only the size decides it: a reload picks the same.
  function partSizeFor(size) {
    var part = cfg.chunkSize;
    while (part > MIB && size < part * 24) part = Math.max(MIB, Math.ceil(part / 2));
    return Math.min(part, Math.max(1, size));
  }

  // ---- hashing, in two workers: each file's part hashes and whole hash in the less busy one ----
  var workers = [], jobs = {}, nextJob = 1;
  function hashWorkers() {
    while (workers.length < 2) {
      var worker = new Worker(cfg.workerUrl);
      worker.load = 0;
      worker.onmessage = function (event) {
        var job = jobs[event.data.job];
        if (job) job.upload.hashed(event.data, job);
      };
      workers.push(worker);
    }
    return workers[0].load <= workers[1].load ? [workers[0], workers[1]] : [workers[1], workers[0]];
  }
  function startHashing(upload) {
    var worker = hashWorkers()[0], job = { id: nextJob++, upload: upload, worker: worker };
    jobs[job.id] = job;
    upload.jobs = [job];
    worker.load += upload.size + 1;
    worker.postMessage({ job: job.id, file: upload.file, path: upload.path, partSize: upload.partSize });
  }
  function endJob(job, cancel) {
    if (!jobs[job.id]) return;
    delete jobs[job.id];
    job.worker.load -= job.upload.size + 1;
    if (cancel) job.worker.postMessage({ cancel: job.id });
  }
  function stopHashing(upload) {
    (upload.jobs || []).forEach(function (job) { endJob(job, true); });
  }

  // ---- one file ----
  var uploads = [], changed = true;
  function Upload(file, path) {
    this.file = file;
    this.name = file.name;
    this.path = path || file.name;
    this.size = file.size;
    this.partSize = partSizeFor(file.size);
    this.parts = Math.max(1, Math.ceil(file.size / this.partSize));
    this.state = "queued";     // queued, checking, sending, done, failed, cancelled
    this.message = "";
    this.reset();
  }
  Upload.prototype.reset = function () {
    this.id = null;
    this.hashes = [];
    this.whole = null;
    this.todo = null;          // part indexes still to send, in order
    this.acked = 0;            // bytes the server confirmed
    this.inFlight = {};        // index -> request
    this.failures = 0;
    this.lastGood = Date.now();
    this.meter = new Meter();
    this.result = null;
    this.claimed = false;
    this.sent = 0;             // bytes put on the wire, retries included
    this.skipped = null;       // parts the server had, not yet checked against this file's part hashes
    this.toVerify = {};
    this.verifying = false;
  };
  Upload.prototype.active = function () { return this.state === "queued" || this.state === "checking" || this.state === "sending"; };
  Upload.prototype.partLength = function (index) {
    return Math.max(0, Math.min(this.partSize, this.size - index * this.partSize));
  };
  Upload.prototype.bytesDone = function () {
    if (this.state === "done") return this.size;
    var loaded = 0, flights = this.inFlight;
    Object.keys(flights).forEach(function (k) { loaded += flights[k].loaded; });
    return Math.min(this.size, this.acked + loaded);
  };
  Upload.prototype.hashed = function (message, job) {
    if (message.kind === "done") return endJob(job, false);
    if (message.kind === "id") {
      this.id = (this.idPrefix || "pf-") + message.value.slice(0, 40);
      statusQueue.push(this);
      askStatusSoon();
    } else if (message.kind === "part") {
      this.hashes[message.index] = message.value;
      verifySkipped(this, message.index);
      schedule();
    } else if (message.kind === "whole") {
      this.whole = message.value;
      this.wholeKnown();
    } else {
      this.fail("The browser could not read this file (" + message.value + ").");
    }
  };
  Upload.prototype.wholeKnown = function () {
    if (this.state === "done") return this.checkResult();
    if (cfg.claims && this.parts > 1 && this.active() && !this.claimed) claimContent(this);
  };
  Upload.prototype.fail = function (message) {
    if (!this.active()) return;
    this.abortAll();
    stopHashing(this);
    this.state = "failed";
    this.message = message;
    finished(this);
  };
  Upload.prototype.abortAll = function () {
    var flights = this.inFlight;
    this.inFlight = {};
    Object.keys(flights).forEach(function (k) { flights[k].xhr.abort(); });
  };

  // ---- talking to the server ----
  // A browser opens six connections to a host and the parts may hold them all: a question to the server
  // (status, "do you have this content?", cancel) takes one back from the part with the least progress
  // (sent again later), and parts use five while it waits.
  var asking = 0;
  function postJson(path, body, patient) {   // patient: waits for the next free connection, takes none back
    asking += 1;
    if (busy >= SLOTS && !patient) preemptOne();
    return rawPostJson(path, body).then(function (value) { asked(); return value; },
                                        function (error) { asked(); throw error; });
  }
  function asked() { asking -= 1; schedule(); }
  function preemptOne() {
    var least = null;
    uploads.forEach(function (u) {
      Object.keys(u.inFlight).forEach(function (k) {
        var flight = u.inFlight[k];
        if (!least || flight.loaded < least.loaded) least = flight;
      });
    });
    if (least) { least.preempted = true; least.xhr.abort(); }
  }
  // Behind --password a logged-in browser echoes its login's CSRF cookie (pyfiledrop_csrf) in X-CSRF-Token:
  // another site can send the cookie but cannot read it.  A 401 means the login ended: the page shows the form.
  function csrfHeaders(headers) {
    var match = document.cookie.match(new RegExp("(?:^|;\\s*)" + cfg.csrfCookie + "=([^;]*)"));
    if (match) headers[cfg.csrfHeader] = decodeURIComponent(match[1]);
    return headers;
  }
  function loginEnded(status) {
    if (status === 401) location.reload();
    return status === 401;
  }
  function rawPostJson(path, body) {
    return fetch(path, { method: "POST", cache: "no-store", body: JSON.stringify(body),
                         headers: csrfHeaders({ "Content-Type": "application/json" }) }).then(function (response) {
      if (loginEnded(response.status)) return new Promise(function () {});
      if (response.ok) return response.json();
      return response.text().then(function (text) {
        var error = new Error(text.trim() || ("The server answered " + response.status + "."));
        error.status = response.status;
        throw error;
      });
    });
  }

  // What the server already has of each new upload: one request for many files (a 2,000-file drop asks twice).
  var statusQueue = [], statusTimer = null;
  function askStatusSoon() {
    if (!statusTimer) statusTimer = setTimeout(askStatus, 30);
  }
  function askStatus() {
    statusTimer = null;
    var batch = statusQueue.splice(0, 1000).filter(function (u) { return u.active(); });
    if (statusQueue.length) askStatusSoon();
    if (!batch.length) return;
    batch.forEach(function (u) { u.state = "checking"; });
    postJson("/api/uploads/status", { ids: batch.map(function (u) { return u.id; }) }).then(function (reply) {
      batch.forEach(function (u) { applyStatus(u, reply.uploads[u.id]); });
      schedule();
    }, function (error) {
      if (error.status && error.status < 500) batch.forEach(function (u) { u.fail(error.message); });
      else { link.down(); batch.forEach(function (u) { statusQueue.push(u); }); }
    });
  }
  function applyStatus(upload, info) {
    if (!upload.active() || !info) return;
    if (info.complete) return upload.completed(info, true);
    var missing = null;
    if (!info.gone && info.missing_chunks) {
      missing = info.missing_chunks.slice();
      var last = missing.length ? missing[missing.length - 1] + 1 : upload.parts;
      if (missing.length >= 1000) for (var i = last; i < upload.parts; i++) missing.push(i);
    }
    var todo = missing || range(upload.parts), inFlight = upload.inFlight, wanted = {};
    todo.forEach(function (index) { wanted[index] = true; });
    upload.todo = todo.filter(function (index) { return !inFlight[index]; });
    upload.acked = 0;
    upload.skipped = {};
    for (var p = 0; p < upload.parts; p++) {
      if (wanted[p] || inFlight[p]) continue;
      upload.acked += upload.partLength(p);
      upload.skipped[p] = true;
      verifySkipped(upload, p);
    }
    upload.state = "sending";
    changed = true;
  }

  // Parts the server already has are not sent again, but each is checked against this file's own part hash
  // as soon as that is known (up to 64 a request): a partial upload of another file under the same id (same
  // name, size, time and sampled blocks) is found, and this file starts again under an id of its own.
  function verifySkipped(upload, index) {
    if (!upload.skipped || !upload.skipped[index] || upload.hashes[index] === undefined) return;
    delete upload.skipped[index];
    upload.toVerify[index] = upload.hashes[index];
    if (!upload.verifying) sendVerify(upload);
  }
  function sendVerify(upload) {
    var keys = Object.keys(upload.toVerify).slice(0, 64), parts = {}, id = upload.id;
    if (!keys.length || !upload.active() || !id) return;
    keys.forEach(function (k) { parts[k] = upload.toVerify[k]; delete upload.toVerify[k]; });
    upload.verifying = true;
    postJson("/api/uploads/" + encodeURIComponent(id) + "/verify", { parts: parts }, true).then(function (reply) {
      upload.verifying = false;
      if (upload.id !== id) return;
      if (reply.mismatched.length) return restartUnderNewId(upload);
      sendVerify(upload);
    }, function (error) {
      upload.verifying = false;
      if (error.status && error.status < 500) return;   // stored or gone meanwhile: the status says which
      keys.forEach(function (k) { upload.toVerify[k] = parts[k]; });
      setTimeout(function () { sendVerify(upload); }, 2000);
    });
  }
  function range(n) { var out = []; for (var i = 0; i < n; i++) out.push(i); return out; }

  // The link: down after a request found no server; one probe with backoff until it answers, then every
  // upload asks again what the server has (it may have restarted) and goes on.
  var link = {
    isDown: false, since: 0, delay: 0, timer: null,
    down: function () {
      if (!this.isDown) { this.isDown = true; this.since = Date.now(); this.delay = 500; changed = true; }
      if (!this.timer) this.timer = setTimeout(this.probe.bind(this), this.delay * (0.75 + Math.random() / 2));
    },
    probe: function () {
      var self = this, waiting = uploads.filter(function (u) { return u.active() && u.id; });
      self.timer = null;
      postJson("/api/uploads/status", { ids: waiting.slice(0, 1000).map(function (u) { return u.id; }) })
        .then(function (reply) {
          self.isDown = false;
          changed = true;
          waiting.slice(0, 1000).forEach(function (u) { applyStatus(u, reply.uploads[u.id]); u.lastGood = Date.now(); });
          if (statusQueue.length) askStatusSoon();
          schedule();
        }, function () {
          self.delay = Math.min(15000, self.delay * 2);
          waiting.forEach(function (u) {
            if (Date.now() - u.lastGood > GIVE_UP_MS) u.fail("No connection to the server for 15 minutes.");
          });
          self.down();
        });
    }
  };

  // ---- sending parts: the earliest files first, up to SLOTS requests in all ----
  var busy = 0, scheduled = false;
  function schedule() {
    if (scheduled) return;
    scheduled = true;
    Promise.resolve().then(function () { scheduled = false; fill(); });
  }
  function fill() {
    if (link.isDown) return;
    for (var i = 0; i < uploads.length && busy < SLOTS; i++) {
      var upload = uploads[i];
      if (upload.state !== "sending" || !upload.todo) continue;
      while (busy < SLOTS - (asking ? 1 : 0) && upload.todo.length && upload.hashes[upload.todo[0]] !== undefined) {
        sendPart(upload, upload.todo.shift());
      }
      if (!upload.todo.length && !Object.keys(upload.inFlight).length && !upload.result) askResult(upload);
    }
    changed = true;
  }
  function partForm(upload, index) {
    var start = index * upload.partSize, form = new FormData();
    var fields = {
      dzuuid: upload.id, dzchunkindex: index, dztotalfilesize: upload.size, dzchunksize: upload.partSize,
      dztotalchunkcount: upload.parts, dzchunkbyteoffset: start, dzchunksha256: upload.hashes[index],
      dzmtime: upload.file.lastModified
    };
    if (upload.path !== upload.name) fields.dzrelpath = upload.path;
    // The file's sha256 (known at the latest when the last part goes): the server then checks the part hashes
    // only if the file's is not this one, so it hashes each byte once, not twice.
    fields.dzfilesha256 = upload.whole || "later";
    Object.keys(fields).forEach(function (k) { form.append(k, String(fields[k])); });
    form.append("file", upload.file.slice(start, start + upload.partLength(index)), upload.name);
    return form;
  }
  function sendPart(upload, index) {
    var xhr = new XMLHttpRequest(), flight = { xhr: xhr, loaded: 0 };
    upload.inFlight[index] = flight;
    busy += 1;
    xhr.open("POST", "/upload");
    var csrf = csrfHeaders({});
    Object.keys(csrf).forEach(function (name) { xhr.setRequestHeader(name, csrf[name]); });
    var watchdog = null;
    function arm() {
      clearTimeout(watchdog);
      watchdog = setTimeout(function () { xhr.abort(); partEnded(upload, index, flight, 0, "stalled"); }, cfg.timeoutMs);
    }
    xhr.upload.onprogress = function (event) {
      var grown = event.loaded - flight.loaded;
      flight.loaded = event.loaded;
      upload.sent += grown;
      arm();
      changed = true;
    };
    xhr.onload = function () {
      clearTimeout(watchdog);
      if (!loginEnded(xhr.status)) partEnded(upload, index, flight, xhr.status, xhr.responseText);
    };
    xhr.onerror = xhr.onabort = function () { clearTimeout(watchdog); partEnded(upload, index, flight, 0, ""); };
    arm();
    xhr.send(partForm(upload, index));
  }
  function retryLater(upload, index, delay) {
    setTimeout(function () {
      if (!upload.active() || !upload.todo) return;
      upload.todo.unshift(index);
      schedule();
    }, delay * (0.75 + Math.random() / 2));
  }
  function partEnded(upload, index, flight, status, text) {
    if (flight.ended) return;
    flight.ended = true;
    busy -= 1;
    changed = true;
    if (upload.inFlight[index] !== flight) return schedule();   // cancelled, or stored meanwhile
    delete upload.inFlight[index];
    if (status === 200) return partStored(upload, index, text);
    if (flight.preempted) {
      upload.todo.unshift(index);
      return schedule();
    }
    if (status === 0) {
      upload.todo.unshift(index);
      link.down();
      return schedule();
    }
    if (status >= 500 && status !== 507 && Date.now() - upload.lastGood < GIVE_UP_MS) {
      retryLater(upload, index, 1000 * Math.min(30, 1 << Math.min(5, upload.failures++)));
      return schedule();
    }
    upload.failures += 1;
    if (status === 460 && /received before/.test(text)) return restartUnderNewId(upload);
    if ((status === 460 || status === 408 || status === 409 || status === 429) && upload.failures < 10) {
      retryLater(upload, index, status === 460 ? 50 : 1000 * upload.failures);
      return schedule();
    }
    if (status === 404 && upload.failures < 3) { statusQueue.push(upload); askStatusSoon(); return; }
    upload.fail((text || "").trim() || ("The server answered " + status + "."));
    schedule();
  }
  function partStored(upload, index, text) {
    var reply = null;
    try { reply = JSON.parse(text); } catch (e) { /* answered below */ }
    upload.acked += upload.partLength(index);
    upload.lastGood = Date.now();
    upload.failures = 0;
    if (reply && reply.complete) upload.completed(reply, false);
    schedule();
  }
  // Another file with this one's name, size, time and sampled blocks left a partial upload under the same id:
  // this file goes on under an id of its own.
  function restartUnderNewId(upload) {
    upload.abortAll();
    stopHashing(upload);
    upload.idPrefix = "pf-" + Math.random().toString(36).slice(2, 10) + "-";
    var prefix = upload.idPrefix;
    upload.reset();
    upload.idPrefix = prefix;
    upload.state = "queued";
    startHashing(upload);
  }
  function askResult(upload) {
    upload.result = "asking";
    fetch("/api/uploads/" + encodeURIComponent(upload.id), { cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (info) {
        if (info && info.complete) return upload.completed(info, false);
        upload.result = null;
        statusQueue.push(upload);
        askStatusSoon();
      }, function () { upload.result = null; link.down(); });
  }
  function claimContent(upload) {
    upload.claimed = true;
    postJson("/api/uploads/" + encodeURIComponent(upload.id) + "/content", {
      sha256: upload.whole, name: upload.name, path: upload.path, size: upload.size,
      chunk_size: upload.partSize, mtime: upload.file.lastModified
    }).then(function (reply) {
      if (reply.complete && upload.active()) upload.completed(reply, true);
    }, function () { /* the parts go on: this only spares sending them */ });
  }
  Upload.prototype.completed = function (info, early) {
    if (!this.active()) return;
    this.abortAll();
    this.result = info;
    this.early = early;
    this.state = "done";
    this.jobs.forEach(function (job) { if (job.mode === "parts") endJob(job, true); });
    finished(this);
    this.checkResult();
  };
  Upload.prototype.checkResult = function () {
    if (!this.whole || !this.result || this.checked) return;
    if (this.result.sha256 == null) return this.askHashLater(1000);   // --s3: hashed once stored, in the background
    this.checked = true;
    changed = true;
    if (this.result.sha256 === this.whole) return;
    this.state = "failed";
    this.message = "The server's copy differs from this file (sha256 " + this.result.sha256 + ").";
    this.idPrefix = "pf-" + Math.random().toString(36).slice(2, 10) + "-";   // a Retry goes under a new id
    totals.done -= 1;
    totals.failed += 1;
  };
  Upload.prototype.askHashLater = function (wait) {
    var upload = this;
    if (this.askingHash || wait > 64000) return;
    this.askingHash = true;
    setTimeout(function () {
      postJson("/api/uploads/status", { ids: [upload.id] }).then(function (reply) {
        var status = reply.uploads && reply.uploads[upload.id];
        upload.askingHash = false;
        if (status && status.sha256) {
          upload.result.sha256 = status.sha256;
          upload.checkResult();
        } else if (status && status.complete) upload.askHashLater(wait * 2);
      }, function () { upload.askingHash = false; upload.askHashLater(wait * 2); });
    }, wait);
  };
  Upload.prototype.cancel = function () {
    if (!this.active()) return;
    this.abortAll();
    stopHashing(this);
    this.state = "cancelled";
    finished(this);
    if (this.id) sendCancel(this.id, 3);
  };
  function sendCancel(id, tries) {
    postJson("/api/uploads/" + encodeURIComponent(id) + "/cancel", {}).catch(function (error) {
      if (!error.status && tries > 1) setTimeout(function () { sendCancel(id, tries - 1); }, 2000);
    });
  }
  Upload.prototype.retry = function () {
    if (this.final || (this.state !== "failed" && this.state !== "cancelled")) return;
    totals[this.state === "failed" ? "failed" : "cancelled"] -= 1;
    this.reset();
    this.state = "queued";
    this.message = "";
    this.checked = false;
    startHashing(this);
    changed = true;
  };

  // ---- what was given: files, folders ----
  var totals = { given: 0, done: 0, failed: 0, cancelled: 0 };
  function add(file, path) {
    var upload = new Upload(file, path);
    uploads.push(upload);
    totals.given += 1;
    if (file.size > cfg.maxFileSizeBytes) {
      var size = human(file.size), limit = human(cfg.maxFileSizeBytes);
      if (size === limit) { size = file.size + " bytes"; limit = cfg.maxFileSizeBytes + " bytes"; }
      upload.final = true;   // a retry would get the same answer: no Retry button
      upload.fail("Too large: " + size + ". This server accepts up to " + limit + " per file.");
    } else {
      startHashing(upload);
    }
    changed = true;
  }
  function finished(upload) {
    totals[upload.state === "done" ? "done" : upload.state === "failed" ? "failed" : "cancelled"] += 1;
    if (upload.state === "done") remember(upload);
    changed = true;
    renderSoon();
    announceSoon();
  }
  var renderPending = false;
  function renderSoon() {   // an outcome shows at the next frame, not at the next tick of the clock
    if (renderPending) return;
    renderPending = true;
    requestAnimationFrame(function () { renderPending = false; changed = false; render(); });
  }
  function addList(files) {
    for (var i = 0; i < files.length; i++) add(files[i], files[i].webkitRelativePath || files[i].name);
    wakeLock.update();
  }
  // A dropped folder: walked with the entries API, each file with its path in the folder.
  function walk(entry, path, found) {
    if (entry.isFile) {
      return new Promise(function (resolve) {
        entry.file(function (file) { found.push([file, path + file.name]); resolve(); }, function () { resolve(); });
      });
    }
    if (!entry.isDirectory) return Promise.resolve();
    var reader = entry.createReader(), children = [];
    return new Promise(function (resolve) {
      (function more() {
        reader.readEntries(function (batch) {
          if (!batch.length) return resolve();
          children = children.concat(Array.prototype.slice.call(batch));
          more();
        }, function () { resolve(); });
      })();
    }).then(function () {
      return children.reduce(function (done, child) {
        return done.then(function () { return walk(child, path + entry.name + "/", found); });
      }, Promise.resolve());
    });
  }
  function dropped(dataTransfer) {
    var items = dataTransfer.items, entries = [];
    for (var i = 0; items && i < items.length; i++) {
      var entry = items[i].webkitGetAsEntry && items[i].webkitGetAsEntry();
      if (entry) entries.push(entry);
    }
    if (!entries.length) return addList(dataTransfer.files);
    var found = [];
    entries.reduce(function (done, entry) { return done.then(function () { return walk(entry, "", found); }); },
                   Promise.resolve()).then(function () {
      found.forEach(function (pair) { add(pair[0], pair[1]); });
      wakeLock.update();
    });
  }

  // ---- the list of files in progress: failures first, then what is moving; the rest counted ----
  var queueEl = $("queue"), moreEl = $("queue-more"), overallEl = $("overall"), linkEl = $("connection");
  var ORDER = { failed: 0, sending: 1, checking: 2, queued: 3, done: 4, cancelled: 5 };
  function statusText(u) {
    if (u.state === "failed") return "Failed";
    if (u.state === "cancelled") return "Cancelled";
    if (u.state === "done") {
      var stored = u.result && u.result.name && u.result.name !== u.path ? " as " + u.result.name : "";
      var how = u.early ? "Already on the server" + (u.result.same_as ? " (same content as " + u.result.same_as + ")" : "")
        + ": nothing more sent" : "Uploaded";
      var check = u.checked ? " · sha256 checked: " + u.whole.slice(0, 16) + "… here and on the server" : " · checking…";
      return how + stored + check;
    }
    if (u.state !== "sending") return u.state === "checking" ? "Checking the server…" : "Waiting…";
    if (link.isDown) return "Connection lost, retrying…";
    var done = u.bytesDone(), speed = u.meter.speed();
    var text = Math.floor(100 * done / Math.max(1, u.size)) + "% · " + human(done) + " of " + human(u.size);
    return speed ? text + " · " + human(speed) + "/s · " + duration((u.size - done) / speed) + " left" : text;
  }
  function rowFor(u) {
    if (u.row) return u.row;
    var li = document.createElement("li"), name = document.createElement("span");
    li.className = "pf-file";
    name.className = "pf-name";
    name.textContent = u.path;
    var bar = document.createElement("progress");
    bar.max = 100;
    bar.setAttribute("aria-label", u.path);
    var status = document.createElement("span"), error = document.createElement("span");
    status.className = "pf-meta pf-status";
    error.className = "pf-error";
    var button = document.createElement("button");
    button.type = "button";
    button.className = "pf-action";
    button.addEventListener("click", function () { if (u.active()) u.cancel(); else u.retry(); schedule(); });
    li.append(name, bar, status, error, button);
    u.row = { li: li, bar: bar, status: status, error: error, button: button };
    return u.row;
  }
  function paintRow(u) {
    var row = rowFor(u);
    row.li.className = "pf-file pf-" + u.state;
    row.bar.value = Math.floor(100 * u.bytesDone() / Math.max(1, u.size));
    row.status.textContent = statusText(u);
    row.error.textContent = u.state === "failed" ? u.message : "";
    var label = u.active() ? "Cancel" : u.state === "done" || u.final ? "" : "Retry";
    row.button.hidden = !label;
    row.button.textContent = label;
    row.button.setAttribute("aria-label", label + " " + u.path);
    return row.li;
  }
  function render() {
    var shown = uploads.slice().sort(function (a, b) { return ORDER[a.state] - ORDER[b.state]; }).slice(0, SHOWN_ROWS);
    var wanted = shown.map(paintRow);
    wanted.forEach(function (li, i) { if (queueEl.children[i] !== li) queueEl.insertBefore(li, queueEl.children[i] || null); });
    while (queueEl.children.length > wanted.length) queueEl.removeChild(queueEl.lastChild);
    var hidden = uploads.length - shown.length;
    moreEl.textContent = hidden > 0 ? "and " + count(hidden, "more file", "more files") + " (counted above)" : "";
    renderOverall();
  }
  var overallMeter = new Meter();
  function renderOverall() {
    var active = uploads.filter(function (u) { return u.active(); });
    var sent = 0, total = 0;
    uploads.forEach(function (u) { if (u.state !== "cancelled") { total += u.size; sent += u.bytesDone(); } });
    overallMeter.add(uploads.reduce(function (n, u) { return n + u.sent; }, 0));
    var text = totals.given ? totals.done.toLocaleString("en") + " of " + count(totals.given, "file", "files") +
      " uploaded" : "";
    if (totals.failed) text += ", " + totals.failed + " failed";
    if (totals.cancelled) text += ", " + totals.cancelled + " cancelled";
    var speed = overallMeter.speed();
    if (active.length) {
      text += " · " + human(sent) + " of " + human(total);
      if (speed && !link.isDown) text += " · " + human(speed) + "/s · " + duration((total - sent) / speed) + " left";
    }
    overallEl.textContent = text;
    linkEl.textContent = link.isDown ? "Connection lost, retrying… (the upload goes on by itself when the server is back)" : "";
    $("cancel-all").hidden = !active.length;
    $("retry-failed").hidden = !uploads.some(function (u) { return u.state === "failed" && !u.final; });
  }
  setInterval(function () {
    uploads.forEach(function (u) { if (u.state === "sending") u.meter.add(u.bytesDone()); });
    if (changed || uploads.some(function (u) { return u.state === "sending"; })) { changed = false; render(); }
  }, 250);
  // Screen readers hear the outcome, not every tick of the progress.
  var announceTimer = null;
  function announceSoon() {
    clearTimeout(announceTimer);
    announceTimer = setTimeout(function () {
      var active = uploads.some(function (u) { return u.active(); });
      $("announce").textContent = active ? "" : totals.done.toLocaleString("en") + " of " +
        count(totals.given, "file", "files") +
        " uploaded" + (totals.failed ? ", " + totals.failed + " failed" : "") + ".";
      wakeLock.update();
    }, 1000);
  }

  // ---- the "Uploaded" list: what the server confirmed, kept in this browser ----
  var listEl = $("uploaded"), emptyEl = $("uploaded-empty"), HISTORY = 500;
  function loadEntries() {
    try { var v = JSON.parse(localStorage.getItem(STORE_KEY) || "[]"); return Array.isArray(v) ? v : []; }
    catch (e) { return []; }
  }
  var entries = loadEntries(), saveTimer = null;
  function writeEntries() {
    clearTimeout(saveTimer);
    saveTimer = null;
    try { localStorage.setItem(STORE_KEY, JSON.stringify(entries.slice(-HISTORY))); } catch (e) { /* private mode */ }
  }
  function saveEntries() {   // at once when nothing else is going on; among 2,000 small files, now and then
    if (!uploads.some(function (u) { return u.active(); })) return writeEntries();
    if (!saveTimer) saveTimer = setTimeout(writeEntries, 1000);
  }
  window.addEventListener("pagehide", function () { if (saveTimer) writeEntries(); });
  function renderEntry(entry) {
    var li = document.createElement("li"), name;
    li.dataset.id = entry.id;
    if (cfg.allowDownloads) {
      name = document.createElement("a");
      name.href = "/download/" + encodeURIComponent(entry.id);
      name.setAttribute("download", entry.name.split("/").pop());
    } else {
      name = document.createElement("span");
    }
    name.className = "pf-name";
    name.textContent = entry.name;
    var meta = document.createElement("span");
    meta.className = "pf-meta";
    meta.textContent = human(entry.size);
    li.append(name, meta);
    return li;
  }
  function showEntry(entry) {
    listEl.insertBefore(renderEntry(entry), listEl.firstChild);
    while (listEl.children.length > HISTORY) listEl.removeChild(listEl.lastChild);
    emptyEl.hidden = true;
  }
  function remember(upload) {
    var r = upload.result;
    entries = entries.filter(function (e) { return e.id !== r.id; });
    entries.push({ id: r.id, name: r.name, size: r.size, sha256: r.sha256, at: Date.now() });
    if (entries.length > HISTORY * 2) entries = entries.slice(-HISTORY);
    var old = listEl.querySelector('li[data-id="' + CSS.escape(r.id) + '"]');
    if (old) old.remove();
    showEntry(entries[entries.length - 1]);
    saveEntries();
  }
  function markGone(id) {
    var li = listEl.querySelector('li[data-id="' + CSS.escape(id) + '"]');
    if (!li || li.classList.contains("pf-gone")) return;
    li.classList.add("pf-gone");
    var note = document.createElement("span");
    note.className = "pf-meta";
    note.textContent = "no longer on the server";
    li.appendChild(note);
    var link = li.querySelector("a");
    if (link) link.removeAttribute("href");
  }
  function checkEntries() {   // one request for all of them
    var ids = entries.slice(-HISTORY).map(function (e) { return e.id; });
    if (!ids.length) return;
    postJson("/api/uploads/status", { ids: ids }).then(function (reply) {
      ids.forEach(function (id) {
        var info = reply.uploads[id];
        if (info && (info.gone || (info.complete && !info.available))) markGone(id);
      });
    }, function () {});
  }
  entries.slice(-HISTORY).forEach(showEntry);
  emptyEl.hidden = entries.length > 0;
  checkEntries();
  $("clear").addEventListener("click", function () {
    entries = [];
    saveEntries();
    listEl.textContent = "";
    emptyEl.hidden = false;
  });

  // ---- the page's controls ----
  var fileInput = $("file-input"), folderInput = $("folder-input"), dropper = $("dropper");
  [fileInput, folderInput].forEach(function (input) {
    input.addEventListener("change", function () { addList(input.files); input.value = ""; });
  });
  $("choose-files").addEventListener("click", function () { fileInput.click(); });
  $("choose-folder").addEventListener("click", function () { folderInput.click(); });
  $("cancel-all").addEventListener("click", function () {
    uploads.forEach(function (u) { u.cancel(); });
  });
  $("retry-failed").addEventListener("click", function () {
    uploads.forEach(function (u) { if (u.state === "failed") u.retry(); });
  });
  document.addEventListener("dragover", function (event) {
    event.preventDefault();
    dropper.classList.add("pf-hover");
  });
  document.addEventListener("dragleave", function (event) {
    if (!event.relatedTarget) dropper.classList.remove("pf-hover");
  });
  document.addEventListener("drop", function (event) {
    event.preventDefault();
    dropper.classList.remove("pf-hover");
    if (event.dataTransfer) dropped(event.dataTransfer);
  });
  document.addEventListener("keydown", function (event) {   // Escape: cancel the file whose row has focus
    if (event.key !== "Escape") return;
    uploads.forEach(function (u) { if (u.row && u.row.li.contains(document.activeElement)) u.cancel(); });
  });
  window.addEventListener("beforeunload", function (event) {
    if (!uploads.some(function (u) { return u.active(); })) return;
    event.preventDefault();
    event.returnValue = "";
  });

  // ---- phones: the screen stays on while uploading (where allowed), and a paused page says so ----
  var wakeLock = {
    lock: null,
    update: function () {
      var want = uploads.some(function (u) { return u.active(); });
      if (want && !this.lock && navigator.wakeLock && document.visibilityState === "visible") {
        var self = this;
        self.lock = "asking";
        navigator.wakeLock.request("screen").then(function (lock) {
          self.lock = lock;
          lock.addEventListener("release", function () { self.lock = null; });
        }, function () { self.lock = null; });
      } else if (!want && this.lock && this.lock.release) {
        this.lock.release();
      }
    }
  };
  var hiddenSince = 0;
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") { hiddenSince = Date.now(); return; }
    var away = Date.now() - hiddenSince, active = uploads.some(function (u) { return u.active(); });
    $("notice").textContent = active && hiddenSince && away > 5000 ?
      "The browser paused the uploads while this page was in the background; they go on now." : "";
    if (link.isDown) { clearTimeout(link.timer); link.timer = null; link.probe(); }
    schedule();
    wakeLock.update();
  });

  var limits = "Up to " + human(cfg.maxFileSizeBytes) + " per file.";
  $("limits").textContent = limits + (cfg.allowDownloads ? " Uploaded files can be downloaded again from this page." : "");
  // The hashing workers start with the page, not with the first file: loading and compiling hash-wasm takes
  // a moment that would otherwise come before the first byte is sent.
  setTimeout(hashWorkers, 0);
  window.pyfiledrop = { uploads: uploads, totals: totals, link: link, ready: true };
})();
</script>
</body>
</html>
"""


LOGIN_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>pyfiledrop: log in</title>
<link rel="icon" href="/favicon.ico">
<style>
  body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2329; background: #f6f8fa;
         margin: 0; display: flex; min-height: 100vh; align-items: center; justify-content: center; }
  form { background: #fff; border: 1px solid #d5dbe1; border-radius: 12px; padding: 24px; width: min(360px, 90vw); }
  h1 { font-size: 1.3rem; margin: 0 0 12px; }
  label { display: block; margin: 0 0 6px; }
  input[type=password] { font: inherit; width: 100%; box-sizing: border-box; padding: 10px; border-radius: 8px;
         border: 1px solid #b8c2cc; }
  button { font: inherit; margin-top: 14px; padding: 10px 18px; border-radius: 8px; border: 0; background: #0b63c5;
         color: #fff; cursor: pointer; min-height: 44px; }
  #message { color: #b3261e; min-height: 1.5em; margin: 0 0 8px; }
</style>
</head>
<body>
<form method="post" action="/login">
  <h1>pyfiledrop</h1>
  <p id="message" role="alert">{{message}}</p>
  <label for="password">Password</label>
  <input type="password" id="password" name="password" autocomplete="current-password" autofocus required>
  <input type="hidden" name="next" value="{{next}}">
  <button type="submit">Log in</button>
</form>
</body>
</html>
"""

FILES_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>pyfiledrop: files</title>
<link rel="icon" href="/favicon.ico">
<style>
  :root { --line: #d5dbe1; --muted: #5b6670; --accent: #0b63c5; --bad: #b3261e; }
  body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2329; margin: 0;
         background: #fff; }
  header, main { padding: 0 16px; }
  header { display: flex; gap: 16px; align-items: center; flex-wrap: wrap; border-bottom: 1px solid var(--line); }
  header h1 { font-size: 1.25rem; margin: 12px 0; }
  header a, header button.link { color: var(--accent); background: none; border: 0; font: inherit; cursor: pointer; }
  .bar { display: flex; gap: 8px; flex-wrap: wrap; align-items: center; margin: 12px 0; }
  .bar input, .bar select, button { font: inherit; padding: 6px 10px; border-radius: 8px; border: 1px solid var(--line);
         background: #fff; min-height: 36px; }
  button { cursor: pointer; }
  button.danger { color: var(--bad); }
  label.button { padding: 6px 10px; border-radius: 8px; border: 1px solid var(--line); cursor: pointer; }
  #crumbs button, #subfolders button { border: 0; color: var(--accent); padding: 4px 6px; min-height: 0; }
  #crumbs button[aria-current] { color: inherit; font-weight: 600; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { font-weight: 600; font-size: .85rem; color: var(--muted); position: sticky; top: 0; background: #fff; }
  td.name { word-break: break-all; min-width: 12em; }
  td .folder { color: var(--muted); }
  td.sha { font-family: ui-monospace, monospace; font-size: .8rem; }
  td.bad { color: var(--bad); font-weight: 600; }
  td.actions { white-space: nowrap; }
  td.actions a, td.actions button { margin-right: 6px; }
  #message { min-height: 1.5em; color: var(--muted); }
  #message.error { color: var(--bad); }
  .table-wrap { overflow-x: auto; }
  #text-section { border-bottom: 1px solid var(--line); padding-bottom: 8px; }
  #text-section h2 { font-size: 1.05rem; margin: 12px 0 6px; }
  .text-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 8px 24px; }
  #shared-input { font: inherit; width: 100%; box-sizing: border-box; padding: 6px 10px; border-radius: 8px;
         border: 1px solid var(--line); resize: vertical; }
  #notes { list-style: none; padding: 0; margin: 0; max-height: 22em; overflow: auto; }
  #notes li { border-bottom: 1px solid var(--line); padding: 6px 0; }
  #notes .note-meta { color: var(--muted); font-size: .85rem; }
  #notes .note-text { white-space: pre-wrap; overflow-wrap: anywhere; font: inherit; margin: 2px 0 4px; }
  #notes .note-actions button, #notes .note-actions a { margin-right: 6px; }
  #notes a { color: var(--accent); overflow-wrap: anywhere; }
  #text-section h2 button { font-weight: normal; font-size: .9rem; }
  .note-meta { color: var(--muted); font-size: .85rem; }
</style>
</head>
<body>
<header>
  <h1>pyfiledrop: files</h1>
  <a href="/">Upload page</a>
  <form method="post" action="/logout" id="logout" hidden><button type="submit" class="link">Log out</button></form>
</header>
<main>
  <section id="text-section" aria-labelledby="text-heading">
    <div class="text-grid">
      <div>
        <h2 id="text-heading"><label for="shared-input">Text shared on the upload page</label></h2>
        <textarea id="shared-input" rows="3" aria-describedby="shared-state"></textarea>
        <div class="bar">
          <button type="button" id="share-text">Share</button>
          <button type="button" id="unshare-text" class="danger">Stop sharing</button>
          <span id="shared-state" role="status"></span>
        </div>
      </div>
      <div>
        <h2 id="notes-heading">Notes sent from the page <button type="button" id="notes-refresh">Refresh</button></h2>
        <ul id="notes" aria-labelledby="notes-heading"></ul>
        <p id="notes-empty" class="note-meta">No notes yet.</p>
        <button type="button" id="notes-more" hidden>Show more notes</button>
      </div>
    </div>
  </section>
  <div class="bar" id="folderbar">
    <span>Folder:</span>
    <span id="crumbs"></span>
    <span id="subfolders"></span>
    <button type="button" id="new-folder">New folder</button>
    <button type="button" id="rename-folder">Rename folder</button>
    <button type="button" id="delete-folder" class="danger">Delete folder</button>
    <label class="button" id="upload-label">Upload here<input type="file" id="upload-here" multiple hidden></label>
  </div>
  <div class="bar">
    <input type="search" id="filter" placeholder="Filter by name" aria-label="Filter by name">
    <select id="state" aria-label="State">
      <option value="">Every state</option><option value="stored">Stored</option>
      <option value="receiving">Receiving</option><option value="abandoned">Abandoned</option>
      <option value="expired">Expired</option><option value="deleted">Deleted</option>
      <option value="failed">Failed</option>
    </select>
    <select id="sort" aria-label="Sort by">
      <option value="newest">Newest first</option><option value="oldest">Oldest first</option>
      <option value="name">By name</option><option value="size">Largest first</option>
    </select>
    <button type="button" id="refresh">Refresh</button>
    <button type="button" id="cleanup" class="danger">Remove abandoned and expired</button>
  </div>
  <p id="message" role="status"></p>
  <div class="table-wrap">
  <table id="uploads">
    <thead><tr><th>Name</th><th>Size</th><th>SHA-256</th><th>From</th><th>Uploaded</th><th>Completed</th>
      <th>Expires</th><th>State</th><th>In storage</th><th>Actions</th></tr></thead>
    <tbody></tbody>
  </table>
  </div>
  <p><button type="button" id="more" hidden>Show more</button></p>
</main>
<script>
(function () {
  "use strict";
  var config = {{config_json}};
  var view = { folder: null, next: null, pages: 0, timer: null, loads: 0 };
  var $ = function (id) { return document.getElementById(id); };
  var tbody = $("uploads").tBodies[0];

  function say(text, isError) {
    $("message").textContent = text;
    $("message").className = isError ? "error" : "";
  }

  function api(method, url, body) {
    var headers = { "Accept": "application/json" };
    headers[config.csrfHeader] = config.csrf;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(url, { method: method, headers: headers, credentials: "same-origin",
                        body: body === undefined ? undefined : JSON.stringify(body) }).then(function (response) {
      if (response.status === 401) { location.reload(); throw new Error("Logged out: log in again."); }
      if (!response.ok) return response.text().then(function (text) { throw new Error(text.trim()); });
      return response.json();
    });
  }

  function size(bytes) {
    if (bytes === null || bytes === undefined) return "?";
    var units = ["bytes", "KiB", "MiB", "GiB", "TiB"], value = bytes, unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return unit === 0 ? bytes + " bytes" : value.toFixed(value < 10 ? 1 : 0) + " " + units[unit];
  }

  function when(iso) { return iso ? new Date(iso).toLocaleString() : "\\u2014"; }

  function cell(row, text, className, title) {
    var td = row.insertCell();
    td.textContent = text;
    if (className) td.className = className;
    if (title) td.title = title;
    return td;
  }

  function stateText(entry) {
    if (entry.state === "receiving" && entry.size) {
      return "receiving " + Math.floor(100 * entry.received / entry.size) + "%";
    }
    return entry.state;
  }

  function storageText(entry) {
    if (entry.state === "stored") return entry.exists ? "yes" : entry.changed ? "changed by hand" : "missing";
    if (entry.state === "receiving" || entry.state === "abandoned") return entry.exists ? "partial" : "\\u2014";
    return "\\u2014";
  }

  function button(parent, label, action, danger) {
    var b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    if (danger) b.className = "danger";
    b.addEventListener("click", action);
    parent.appendChild(b);
  }

  function remove(entry, question) {
    if (!confirm(question)) return;
    api("DELETE", "/api/uploads/" + encodeURIComponent(entry.id)).then(function () {
      say("Removed " + entry.name + ".");
      reload();
    }, function (error) { say(error.message, true); });
  }

  function addRow(entry) {
    var row = tbody.insertRow();
    row.dataset.id = entry.id;
    row.dataset.state = entry.state;
    var name = row.insertCell();
    name.className = "name";
    if (entry.folder) {
      var folder = document.createElement("span");
      folder.className = "folder";
      folder.textContent = entry.folder + "/";
      name.appendChild(folder);
    }
    name.appendChild(document.createTextNode(entry.name));
    cell(row, size(entry.size));
    cell(row, entry.sha256 ? entry.sha256.slice(0, 12) + "\\u2026" : "\\u2014", "sha", entry.sha256 || "");
    cell(row, entry.client);
    cell(row, when(entry.created), "", entry.created);
    cell(row, when(entry.completed), "", entry.completed || "");
    cell(row, when(entry.expires), "", entry.expires || "");
    cell(row, stateText(entry), "state");
    var exists = storageText(entry);
    cell(row, exists, "exists" + (exists === "missing" || exists === "changed by hand" ? " bad" : ""), entry.reason);
    var actions = row.insertCell();
    actions.className = "actions";
    if (entry.state === "stored" && entry.exists) {
      var link = document.createElement("a");
      link.href = "/api/uploads/" + encodeURIComponent(entry.id) + "/file";
      link.textContent = "Download";
      link.setAttribute("download", entry.name);
      actions.appendChild(link);
    }
    if (entry.state === "stored") {
      button(actions, "Delete", function () { remove(entry, "Delete " + entry.name + " from the server?"); }, true);
    } else if (entry.state === "receiving" || entry.state === "abandoned") {
      button(actions, "Remove", function () { remove(entry, "Remove the incomplete upload " + entry.name + "?"); }, true);
    }
  }

  function query(cursor) {
    var params = new URLSearchParams({ detail: "1", sort: $("sort").value, limit: "100" });
    if ($("state").value) params.set("state", $("state").value);
    if ($("filter").value) params.set("q", $("filter").value);
    if (view.folder !== null) params.set("folder", view.folder);
    if (cursor) params.set("cursor", cursor);
    return "/api/uploads?" + params.toString();
  }

  function load(cursor) {
    var ticket = ++view.loads;   // a reply to a load that a newer one replaced (typing, another folder) is dropped
    return api("GET", query(cursor)).then(function (data) {
      if (ticket !== view.loads) return;
      if (!cursor) { tbody.textContent = ""; view.pages = 0; }
      data.uploads.forEach(addRow);
      view.pages += 1;
      view.next = data.next;
      $("more").hidden = !data.next;
      document.body.dataset.loaded = String(Date.now());
      if (!tbody.rows.length) say("No uploads here.");
      else if (!$("message").classList.contains("error")) say(tbody.rows.length + (data.next ? "+" : "") + " shown.");
      clearTimeout(view.timer);
      if (view.pages === 1 && tbody.querySelector("tr[data-state=receiving]")) view.timer = setTimeout(reload, 5000);
    }, function (error) { say(error.message, true); });
  }

  function reload() { return load(null); }

  function folderJoin(name) { return view.folder ? view.folder + "/" + name : name; }

  function showFolders() {
    var crumbs = $("crumbs"), subs = $("subfolders");
    crumbs.textContent = "";
    subs.textContent = "";
    var all = document.createElement("button");
    all.type = "button";
    all.textContent = "All uploads";
    if (view.folder === null) all.setAttribute("aria-current", "true");
    all.addEventListener("click", function () { openFolder(null); });
    crumbs.appendChild(all);
    var parts = view.folder === null ? null : view.folder ? view.folder.split("/") : [];
    if (parts !== null) {
      ["storage"].concat(parts).forEach(function (part, index) {
        var path = parts.slice(0, index).join("/");
        crumbs.appendChild(document.createTextNode(" / "));
        var b = document.createElement("button");
        b.type = "button";
        b.textContent = part;
        if (index === parts.length) b.setAttribute("aria-current", "true");
        b.addEventListener("click", function () { openFolder(path); });
        crumbs.appendChild(b);
      });
    }
    var here = view.folder || "";
    $("rename-folder").disabled = $("delete-folder").disabled = !view.folder;
    api("GET", "/api/folders" + (here ? "?path=" + encodeURIComponent(here) : "")).then(function (data) {
      data.folders.forEach(function (name) {
        var b = document.createElement("button");
        b.type = "button";
        b.className = "subfolder";
        b.textContent = name + "/";
        b.addEventListener("click", function () { openFolder(folderJoin(name)); });
        subs.appendChild(b);
      });
    }, function (error) { say(error.message, true); });
  }

  function openFolder(path) {
    view.folder = path;
    showFolders();
    reload();
  }

  function folderAction(promise, done) {
    promise.then(function (data) { done(data); }, function (error) { say(error.message, true); });
  }

  $("new-folder").addEventListener("click", function () {
    var name = prompt("Name of the new folder:");
    if (!name) return;
    folderAction(api("POST", "/api/folders", { path: folderJoin(name) }), function (data) {
      say("Created " + data.path + ".");
      openFolder(data.path);
    });
  });
  $("rename-folder").addEventListener("click", function () {
    var parts = view.folder.split("/"), name = prompt("New name of the folder:", parts[parts.length - 1]);
    if (!name) return;
    var to = parts.slice(0, -1).concat([name]).join("/");
    folderAction(api("POST", "/api/folders/rename", { path: view.folder, to: to }), function (data) {
      say("Renamed to " + data.path + ".");
      openFolder(data.path);
    });
  });
  $("delete-folder").addEventListener("click", function () {
    if (!confirm("Delete the empty folder " + view.folder + "?")) return;
    var parent = view.folder.split("/").slice(0, -1).join("/");
    folderAction(api("DELETE", "/api/folders?path=" + encodeURIComponent(view.folder)), function () {
      say("Deleted the folder.");
      openFolder(parent);
    });
  });
  $("cleanup").addEventListener("click", function () {
    if (!confirm("Remove every abandoned upload's partial file, and every stored file past its expiry?")) return;
    api("POST", "/api/cleanup", {}).then(function (data) {
      say("Removed " + data.abandoned + " abandoned and " + data.expired + " expired.");
      reload();
    }, function (error) { say(error.message, true); });
  });
  function putFile(file) {
    var path = (view.folder ? view.folder + "/" : "") + file.name;
    var headers = {};
    headers[config.csrfHeader] = config.csrf;
    return fetch("/upload/" + path.split("/").map(encodeURIComponent).join("/"),
                 { method: "PUT", headers: headers, credentials: "same-origin", body: file }).then(function (response) {
      if (!response.ok) return response.text().then(function (text) { throw new Error(file.name + ": " + text.trim()); });
    });
  }
  $("upload-here").addEventListener("change", function () {
    var files = Array.prototype.slice.call(this.files), input = this;
    say("Uploading " + files.length + " file(s) to " + (view.folder || "the top folder") + "\u2026");
    files.reduce(function (previous, file) { return previous.then(function () { return putFile(file); }); },
                 Promise.resolve()).then(function () {
      say("Uploaded " + files.length + " file(s).");
      input.value = "";
      reload();
    }, function (error) { say(error.message, true); input.value = ""; reload(); });
  });
  var typing = null;
  $("filter").addEventListener("input", function () { clearTimeout(typing); typing = setTimeout(reload, 250); });
  $("state").addEventListener("change", reload);
  $("sort").addEventListener("change", reload);
  $("refresh").addEventListener("click", reload);
  $("more").addEventListener("click", function () { if (view.next) load(view.next); });
  $("logout").hidden = !config.loggedIn;
  showFolders();
  reload();
  textSection();

  // -- text both ways: the shared text and the notes (every text set with textContent or value, never HTML) --
  function textSection() {
    var notes = { next: null, newest: null, pages: 0 };
    function onlyLink(text) {   // a link only when it is the whole text and http(s); it shows what it opens
      var trimmed = text.trim(), url;
      if (!trimmed || /\\s/.test(trimmed)) return null;
      try { url = new URL(trimmed); } catch (error) { return null; }
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    }
    function copyFrom(node, text, done) {   // navigator.clipboard only in a secure context: else select and copy
      function selectAndCopy() {
        var range = document.createRange(), selection = window.getSelection();
        range.selectNodeContents(node);
        selection.removeAllRanges();
        selection.addRange(range);
        try { return document.execCommand("copy"); } catch (error) { return false; }
      }
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(selectAndCopy()); });
      } else {
        done(selectAndCopy());
      }
    }
    function addNote(note) {
      var item = document.createElement("li"), meta = document.createElement("div");
      var text = document.createElement("pre"), actions = document.createElement("div");
      item.dataset.id = note.id;
      meta.className = "note-meta";
      meta.textContent = when(note.created) + " from " + note.client;
      text.className = "note-text";
      text.textContent = note.text;
      actions.className = "note-actions";
      item.append(meta, text, actions);
      button(actions, "Copy", function () {
        copyFrom(text, note.text, function (copied) { say(copied ? "Copied" : "Select and copy: the note is selected"); });
      });
      var href = onlyLink(note.text);
      if (href) {
        var link = document.createElement("a");
        link.href = href;
        link.textContent = "Open " + href;
        link.target = "_blank";
        link.rel = "noopener noreferrer";
        actions.appendChild(link);
      }
      button(actions, "Delete", function () {
        if (!confirm("Delete this note?")) return;
        api("DELETE", "/api/notes/" + encodeURIComponent(note.id)).then(function () {
          item.remove();
          $("notes-empty").hidden = $("notes").children.length > 0;
          say("Deleted the note.");
        }, function (error) { say(error.message, true); });
      }, true);
      $("notes").appendChild(item);
    }
    function loadNotes(before) {
      return api("GET", "/api/notes?limit=50" + (before ? "&before=" + encodeURIComponent(before) : "")).then(function (data) {
        if (!before) {
          var newest = data.notes.length ? data.notes[0].id : null;
          if (newest === notes.newest && $("notes").children.length) return;   // unchanged: a selection stays
          notes.newest = newest;
          notes.pages = 0;
          $("notes").textContent = "";
        }
        notes.pages += 1;
        data.notes.forEach(addNote);
        notes.next = data.next;
        $("notes-more").hidden = !data.next;
        $("notes-empty").hidden = $("notes").children.length > 0;
        document.body.dataset.notesLoaded = String(Date.now());
      }, function (error) { say(error.message, true); });
    }
    function showShared(data) {
      $("shared-input").value = data.text || "";
      $("shared-state").textContent = data.text ? "Shared since " + when(data.updated) + "." : "Nothing is shared.";
      document.body.dataset.sharedLoaded = String(Date.now());
    }
    api("GET", "/api/shared-text").then(showShared, function (error) { say(error.message, true); });
    $("share-text").addEventListener("click", function () {
      api("PUT", "/api/shared-text", { text: $("shared-input").value }).then(function (data) {
        showShared(data);
        say("The text is shared on the upload page.");
      }, function (error) { say(error.message, true); });
    });
    $("unshare-text").addEventListener("click", function () {
      api("DELETE", "/api/shared-text").then(function (data) { showShared(data); say("Stopped sharing the text."); },
                                            function (error) { say(error.message, true); });
    });
    $("notes-refresh").addEventListener("click", function () { notes.newest = null; loadNotes(null); });
    $("notes-more").addEventListener("click", function () { if (notes.next) loadNotes(notes.next); });
    setInterval(function () { if (!document.hidden && notes.pages <= 1) loadNotes(null); }, 10000);
    loadNotes(null);
  }
})();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
