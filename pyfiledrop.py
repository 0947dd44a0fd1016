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
import contextlib
import dataclasses
import enum
import errno
import hashlib
import hmac
import itertools
import json
import logging
import mmap
import os
import queue
import re
import selectors
import shutil
import socket
import sqlite3
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

__version__ = "1.1.0"
__all__ = [
    "Config", "parse_args", "main", "serve", "create_app", "open_engine", "make_server", "ServerLimits", "Engine",
    "EngineLimits", "Ledger", "LocalBackend", "BackendConstraints", "UploadInfo", "State", "Progress", "Stored",
    "Refused", "Notice", "UploadError", "S3Engine", "S3Location", "parse_s3_url", "ServiceUnavailable", "BadRequest", "Forbidden", "NotFound", "Conflict", "Superseded",
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
# Browsers open at most 6 connections to one host over HTTP/1.1.  2 files x 3 chunks = 6, so no chunk request
# waits in the browser's queue, where its timeout would already be running.
DEFAULT_PARALLEL_CHUNKS = 3
PARALLEL_FILES = 2
# A chunk request that sends and receives nothing for this long is abandoned and retried (not a limit on the
# whole request: the page re-arms it on every byte of progress).
DEFAULT_TIMEOUT_MS = 120_000
DEFAULT_MAX_SIZE_MB = 100_000
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

DZ_FIELDS = ("dzuuid", "dzchunkindex", "dztotalfilesize", "dzchunksize", "dztotalchunkcount",
             "dzchunkbyteoffset")
DEFAULT_DZ_CDN = "https://cdnjs.cloudflare.com/ajax/libs/dropzone"

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
    add("--max-size", type=_positive_int, default=DEFAULT_MAX_SIZE_MB, metavar="MB",
        help=f"largest file accepted, in MiB (default {DEFAULT_MAX_SIZE_MB})")
    add("--timeout", type=_positive_int, default=DEFAULT_TIMEOUT_MS, metavar="MS",
        help=f"the page gives up on a chunk request after this long without progress, and retries it "
             f"(ms, default {DEFAULT_TIMEOUT_MS})")
    add("--chunk-size", type=_positive_int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
        help=f"chunk size the page uploads with (default {DEFAULT_CHUNK_SIZE})")
    add("--parallel-chunks", type=_positive_int, default=DEFAULT_PARALLEL_CHUNKS, metavar="N",
        help=f"chunks of one file in flight at once (default {DEFAULT_PARALLEL_CHUNKS})")
    add("--disable-parallel-chunks", action="store_true", help="send one chunk at a time (--parallel-chunks 1)")
    add("--disable-force-chunking", action="store_true",
        help="send files smaller than one chunk as a plain upload")
    add("-a", "--allow-downloads", action="store_true", help="let the page download uploaded files back")
    add("--dz-cdn", metavar="URL", help="load Dropzone from this CDN instead of the embedded copy")
    add("--dz-version", metavar="V", help="Dropzone version to load from the CDN")
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
    add("--s3", metavar="URL",
        help="store in an S3-compatible object store instead of folders: http(s)://HOST[:PORT]/BUCKET[/PREFIX] "
             "(credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile; needs boto3)")
    add("--s3-region", metavar="REGION", help="the store's region (default: AWS_REGION, else us-east-1)")
    return parser


def parse_args(argv: list[str] | None = None) -> Config:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chunk_size > MAX_CHUNK_SIZE:
        parser.error(f"--chunk-size is at most {MAX_CHUNK_SIZE} bytes")
    index = args.index
    if index is not None and not index.is_file():
        parser.error(f"--index: no such file: {index}")
    if index is None and (_program_dir() / "index.html").is_file():
        index = _program_dir() / "index.html"
    try:
        s3 = parse_s3_url(args.s3, args.s3_region) if args.s3 else None
    except ValueError as error:
        parser.error(f"--s3: {error}")
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
    )


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


def sanitize_filename(raw: str) -> str:
    """A name that is safe on every OS and still reads like the original (unicode kept)."""
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
    name = re.sub(r" {2,}", " ", name).strip(" ").rstrip(".").strip(" ")
    if not name.strip("."):
        return "file"
    if name.startswith("."):  # nothing stored is hidden (and nothing can pass for pyfiledrop's own files)
        name = "_" + name[1:]
    if _WINDOWS_RESERVED.match(name.partition(".")[0].rstrip(" ")):
        name = "_" + name
    return _truncate_name(name, MAX_NAME_BYTES)


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


def binary_size(size: int) -> str:
    """Sizes people set in powers of two, shown as they set them: 4194304 -> "4 MiB"."""
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} B"


def human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


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
    """What the ledger knows of one upload; a frozen value, replaced (``dataclasses.replace``) on change."""

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


_GONE = {State.FAILED: "That upload failed.", State.EXPIRED: "That upload expired.",
         State.DELETED: "That upload was deleted.", State.RECEIVING: "That upload is still receiving.",
         State.STORED: "That upload is stored."}


class Ledger:
    """The one record of every upload: a SQLite database (WAL) in the chunks folder.

    The schema is versioned with ``PRAGMA user_version``; ``MIGRATIONS[n]`` takes a database from version n to
    n + 1.  Writes are serialised by one lock over one connection (SQLite serialises writers anyway); each call
    is one transaction.  ``synchronous=NORMAL`` keeps every commit safe against a crash of this process, not
    against a power cut (the same trade as for the files themselves; see the README).
    """

    FILENAME = "ledger.sqlite3"
    MIGRATIONS = (
        """CREATE TABLE uploads (
               id TEXT PRIMARY KEY, name TEXT NOT NULL, size INTEGER, part_size INTEGER NOT NULL,
               client TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL, state TEXT NOT NULL,
               received TEXT NOT NULL, sha256 TEXT, stored_name TEXT, finished REAL, reason TEXT NOT NULL);
           CREATE INDEX uploads_by_state ON uploads (state, updated);
           CREATE INDEX uploads_by_created ON uploads (created);""",
        """ALTER TABLE uploads ADD COLUMN mtime REAL;
           CREATE INDEX uploads_by_content ON uploads (sha256, size);""",
    )
    _COLUMNS = ("id", "name", "size", "part_size", "client", "created", "updated", "state", "received", "sha256",
                "stored_name", "finished", "reason", "mtime")

    def __init__(self, path: Path | str):
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=2)
        try:
            # Exclusive, taken at once and held: no file locks per transaction, and a second pyfiledrop on the
            # same chunks folder is refused at its start rather than sharing uploads it cannot see.
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as error:
            self._db.close()
            if "locked" in str(error):
                raise RuntimeError("another pyfiledrop is using this chunks folder") from None
            raise
        self._migrate()
        placeholders = ", ".join("?" for _ in self._COLUMNS)
        updates = ", ".join(f"{column}=excluded.{column}" for column in self._COLUMNS[1:])
        self._upsert = (f"INSERT INTO uploads ({', '.join(self._COLUMNS)}) VALUES ({placeholders}) "
                        f"ON CONFLICT(id) DO UPDATE SET {updates}")

    def _migrate(self) -> None:
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(self.MIGRATIONS):
                raise RuntimeError(f"the ledger {self.path} was written by a newer pyfiledrop")
            for number in range(version, len(self.MIGRATIONS)):
                self._db.executescript(f"BEGIN IMMEDIATE; {self.MIGRATIONS[number]} "
                                       f"PRAGMA user_version = {number + 1}; COMMIT;")

    @property
    def version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def save(self, *infos: UploadInfo) -> None:
        """Insert or replace these records, in one transaction."""
        rows = [self._row(info) for info in infos]
        with self._lock:
            if len(rows) == 1:
                self._db.execute(self._upsert, rows[0])
                return
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(self._upsert, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def get(self, upload_id: str) -> UploadInfo | None:
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
        """Stored uploads with this content (by the index on sha256 and size), newest first."""
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(self._COLUMNS)} FROM uploads WHERE sha256 = ? AND size = ? "
                                    "AND state = ? ORDER BY created DESC LIMIT ?",
                                    (sha256, size, State.STORED.value, limit)).fetchall()
        return [self._info(row) for row in rows]

    def newest(self, limit: int = 100, offset: int = 0) -> list[UploadInfo]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(self._COLUMNS)} FROM uploads ORDER BY created DESC "
                                    "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [self._info(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _row(info: UploadInfo) -> tuple:
        return (info.id, info.name, info.size, info.part_size, info.client, info.created, info.updated,
                info.state.value, json.dumps(info.received, separators=(",", ":")), info.sha256, info.stored_name,
                info.finished, info.reason, info.mtime)

    @staticmethod
    def _info(row: tuple) -> UploadInfo:
        values = dict(zip(Ledger._COLUMNS, row))
        values["state"] = State(values["state"])
        values["received"] = tuple((int(low), int(high)) for low, high in json.loads(values["received"]))
        return UploadInfo(**values)


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
        self._chunks = str(self.chunks)
        self._checkpoint = checkpoint
        self._warn = warn
        self._copies: set[str] = set()          # ids copied into storage from another filesystem
        self._free: tuple[float, int] = (-1.0, 0)  # (when, bytes): statvfs at most every FREE_SPACE_TTL_S
        self._written = 0                          # bytes written since then

    # -- partial files --------------------------------------------------------------------------------------
    def part_path(self, upload_id: str) -> str:
        return os.path.join(self._chunks, _part_key(upload_id) + ".part")  # plain strings: the hot path

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

    MAP_WINDOW = 8 * MIB

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
        directory = self.folder_for(folder)
        source = self.part_path(upload_id)
        _set_mtime(source, mtime)   # before the link: the stored file never shows another time
        for number in range(MAX_NAME_ATTEMPTS):
            candidate = numbered_name(leaf, number)
            try:
                claimed = self._claim(source, directory / candidate)
            except OSError as error:
                if error.errno != errno.EXDEV:
                    raise
                source = self._copy_into_storage(upload_id)  # the folders are on different filesystems
                _set_mtime(source, mtime)
                claimed = self._claim(source, directory / candidate)
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

    def _claim(self, source: str, target: Path) -> bool:
        """Link ``source`` as ``target``; False when ``target`` is taken."""
        try:
            os.link(source, target)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not os.path.exists(source) or target.parent.exists():
                raise
            if not self.storage.exists():
                self._recreate(self.storage, "storage")
            target.parent.mkdir(parents=True, exist_ok=True)
            return self._claim(source, target)
        except OSError as error:
            if error.errno in _LINK_FATAL_ERRNOS or error.errno == errno.EXDEV:
                raise
            return self._move_without_link(source, target)

    @staticmethod
    def _move_without_link(source: str, target: Path) -> bool:
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


EngineEvent = Progress | Stored | Refused | Notice

COMMIT_EVERY = 64 * MIB          # a long request records what arrived this often (a crash loses less)
SPACE_CHECK_EVERY = 4 * MIB      # how often a long request looks at the free space (statvfs: microseconds)
PROGRESS_EVERY_S = 0.25
STALLED_AFTER_S = 1.0            # a request that moved no byte for this long may be taken over by a retry
RIVAL_WAIT_S = 10.0              # a retry waits this long at most for an earlier copy of itself still moving
HASH_WINDOW = 8 * MIB            # the in-order hash reads back at most this much per turn of its lock
HASH_BACKLOG = 32 * MIB          # a reply waits while more than this waits to be hashed: completion stays quick


class _Writer:
    """One request putting bytes into an upload from ``start``; ``fenced`` once a newer request took over."""

    __slots__ = ("start", "end", "position", "committed_to", "lock", "fenced", "whole", "holes", "hasher",
                 "hash_from", "next_space_check", "next_progress", "last_progress", "atomic", "superseded",
                 "keep_if_empty")

    def __init__(self, start: int, end: int | None, holes: list[tuple[int, int | None]]):
        self.start = self.position = self.committed_to = start
        self.end = end
        self.lock = threading.Lock()     # held for each write and commit, so fencing is never half-way
        self.fenced = False
        self.whole = holes == [(start, end)]   # nothing in its range was received before
        self.holes = holes
        self.hasher = None               # covers [0, position) once it hashes as it writes
        self.hash_from = 0
        self.next_space_check = start + SPACE_CHECK_EVERY
        self.next_progress = 0.0
        self.last_progress = time.monotonic()
        self.atomic = False
        self.superseded = False          # fenced by a newer request (not by its own failure)
        self.keep_if_empty = False

    def fence(self, superseded: bool = True) -> None:
        with self.lock:
            self.fenced = True
            self.superseded = self.superseded or superseded

    def overlaps(self, start: int, end: int | None) -> bool:
        return (end is None or self.start < end) and (self.end is None or start < self.end)


class _Live:
    """An upload being received, in memory: its record, the requests writing it, and the in-order hash."""

    __slots__ = ("info", "ephemeral", "lock", "changed", "writers", "hash_lock", "hasher", "hashed_to",
                 "finish_lock", "linked_as", "background_hash", "hash_wanted", "hash_progress", "fd")

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
        self.finish_lock = threading.Lock()
        self.linked_as: str | None = None   # stored under this name, not yet recorded (the ledger failed)
        self.background_hash = False    # a thread is hashing received bytes from the file
        self.hash_wanted = False        # more bytes arrived meanwhile: it looks again before it ends
        self.hash_progress = threading.Condition()   # the hash moved on (replies held back wait for it)

    def in_flight(self) -> int:
        return sum(max(0, writer.position - writer.committed_to) for writer in tuple(self.writers))


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
        if size is not None and size > self.limits.max_size:
            raise TooLarge(f"File too large: {size} bytes; this server accepts up to {self.limits.max_size} "
                           "bytes per file.")
        with self._opening[hash(upload_id) % 64]:
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

    def _new_part(self, upload_id: str) -> int:
        try:
            try:
                return self.backend.create_part(upload_id)
            except FileExistsError:
                # Neither live nor recorded (we hold this id's opening lock): left by a stop before its record.
                self.backend.discard(upload_id)
                return self.backend.create_part(upload_id)
        except OSError as error:
            raise storage_error(error)

    def _record(self, info: UploadInfo, on_failure: Callable[[], None] = lambda: None) -> None:
        try:
            self.ledger.save(info)
        except (sqlite3.Error, OSError) as error:
            on_failure()
            log.error("the ledger could not record upload %s: %s", info.id, error)
            raise StorageFailure("The server could not record the upload.") from None

    def _resume(self, info: UploadInfo | None) -> _Live | None:
        """An unfinished upload recorded in the ledger, live again (after a restart)."""
        if info is None or info.state is not State.RECEIVING:
            return None
        upload_id = info.id
        if self.backend.part_stat(upload_id) is None:
            self._record(dataclasses.replace(info, state=State.FAILED, reason="its partial file disappeared"))
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
            raise InsufficientStorage(f"Not enough disk space on the server: {needed} bytes needed, "
                                      f"{max(0, free - self.limits.min_free)} available.")

    # -- info, list -----------------------------------------------------------------------------------------
    def info(self, upload_id: str) -> UploadInfo:
        live = self._live.get(upload_id)
        if live is not None:
            return live.info
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
            keep_if_empty: bool = False) -> UploadInfo:
        """Write the bytes of ``pieces`` at ``offset`` (at most ``length`` of them); the upload's info after.

        Bytes already received are read and dropped, never written again.  What arrived is recorded even
        when the request breaks off (the client vanished), so it can go on from there; ``atomic``: only if
        all ``length`` bytes arrive (a chunk protocol that always sends a part again whole).
        ``checksum`` (algorithm, digest), "sha1" or "sha256": the bytes of this request must have that hash,
        else none of them counts and ChecksumMismatch is raised; bytes received before are checked too, so a
        part sent again with other content is refused.  A stored upload is answered as it is, unwritten.
        ``keep_if_empty``: an upload the client created explicitly (tus) outlives a failed request that brought
        none of its bytes; otherwise such an upload is forgotten, and a retry starts it again.
        """
        check = _checksum_hasher(checksum)
        if check is not None:
            pieces, atomic_here = _hashed(pieces, check), True
        else:
            atomic_here = atomic
        live = self._get_live(upload_id)
        if live is None:
            info = self._settled_info(upload_id)
            if check is not None:
                _drain(pieces)
                _verify(check, checksum)
            return info
        size = live.info.size
        end = offset + length if length is not None else size
        if offset < 0 or (size is not None and (offset > size or end > size)):
            raise BadRequest("Those bytes lie past the end of the file.")
        writer = self._claim(live, offset, end)
        writer.atomic = atomic_here
        writer.keep_if_empty = keep_if_empty
        failed = True
        try:
            self._receive(live, writer, pieces)
            failed = atomic and writer.position != end
            if check is not None and not failed:
                failed = not _verify(check, checksum, raise_error=False)
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
        try:
            fd = os.dup(live.fd) if live.fd is not None else self.backend.open_part(live.info.id)
        except FileNotFoundError:
            if live.info.state is State.STORED:  # completed by another request meanwhile: nothing to write
                return _drain(pieces)
            raise Conflict("This upload expired or was removed; start it again.") from None
        except OSError as error:
            raise storage_error(error)
        try:
            for piece in pieces:
                self._write_piece(live, writer, fd, piece)
                if writer.position - writer.committed_to >= COMMIT_EVERY and not writer.atomic:
                    self._commit(live, writer)
                if writer.position >= writer.next_space_check:
                    writer.next_space_check += SPACE_CHECK_EVERY
                    self.check_space(0)
                self._report_progress(live, writer)
        finally:
            os.close(fd)

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
            writer.hash_from = live.hashed_to
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
                info = dataclasses.replace(live.info, updated=self.clock(),
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
                if writer.hash_from <= live.hashed_to < writer.committed_to:
                    live.hasher, live.hashed_to = hasher.copy(), writer.committed_to
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
        hashed (the parts came faster than one thread hashes them), this reply waits, so completing the file
        never has much left to hash."""
        with live.hash_progress:
            while prefix_end(live.info.received) - live.hashed_to > HASH_BACKLOG and live.background_hash:
                live.hash_progress.wait(1.0)

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
                self._record(dataclasses.replace(live.info, state=State.FAILED, updated=self.clock(),
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
                with live.hash_progress:
                    live.hash_progress.notify_all()
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
            info = dataclasses.replace(info, size=size, part_size=max(1, size) if live.ephemeral else info.part_size)
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
            info = self._store(live, live.hasher.hexdigest())
        self._forget(upload_id)
        with self._lock:
            self.stored_count += 1
        self.events(Stored(info))
        return info

    def _store(self, live: _Live, digest: str) -> UploadInfo:
        upload_id = live.info.id
        stat = self.backend.part_stat(upload_id)
        if stat is None or stat.st_size != live.info.size:
            raise StorageFailure("The partial file does not have the declared size.")
        try:
            stored_name = live.linked_as or self.backend.store(upload_id, live.info.name, live.info.mtime)
        except OSError as error:
            raise storage_error(error)
        live.linked_as = stored_name
        now = self.clock()
        with live.lock:  # from now on a late commit of another request sees the upload stored
            receiving = live.info
            info = live.info = dataclasses.replace(receiving, state=State.STORED, sha256=digest,
                                                   stored_name=stored_name, finished=now, updated=now)
            try:
                self._record(info)  # on failure the part stays linked: a retry of finish records the same name
            except UploadError:
                live.info = receiving
                raise
        self.checkpoint("recorded")
        self.backend.discard(upload_id)
        self.checkpoint("discarded")
        return info

    def receive_whole(self, name: str, pieces: Iterable, *, client: str, size: int | None = None,
                      upload_id: str | None = None) -> UploadInfo:
        """A file that arrives whole in one request (PUT, a multipart file): received, then stored."""
        fresh = upload_id is None
        upload_id = upload_id or str(uuid.uuid4())
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
        with self._opening[hash(upload_id) % 64]:
            live = self._live.get(upload_id) or self._resume(self.ledger.get(upload_id))
        if live is None:
            return self.info(upload_id)
        with live.finish_lock:
            with live.lock:
                if live.info.state is State.STORED:
                    return live.info
                info = live.info = dataclasses.replace(live.info, state=State.DELETED, updated=self.clock(),
                                                       reason=reason)
            for writer in list(live.writers):
                writer.fence()
            self._forget(upload_id)
            self.backend.discard(upload_id)
            if not live.ephemeral:
                self._record(info)
        return info

    def _forget(self, upload_id: str) -> _Live | None:
        with self._lock:
            live = self._live.pop(upload_id, None)
        if live is not None and live.fd is not None:
            fd, live.fd = live.fd, None
            os.close(fd)
        return live

    # -- expire ---------------------------------------------------------------------------------------------
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
                self._record(dataclasses.replace(info, state=State.EXPIRED, updated=self.clock(),
                                                 reason="untouched for too long"))
                removed += 1
        if removed:
            self._notice(f"removed {removed} unfinished upload(s) untouched for "
                         f"{self.limits.partial_ttl / 3600:g} hours")
        return removed


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
            ledger.save(dataclasses.replace(info, state=State.FAILED, updated=clock(),
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
        ledger.save(dataclasses.replace(base, size=size, state=State.STORED, received=((0, size),) if size else (),
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
#     .pyfiledrop/claims/NAME              a name taken by an upload still receiving
#     .pyfiledrop/sha256/SHA-SIZE/ID       stored content by hash (a tus sender's re-run skips what is there)
# What arrived is never written down separately: it is ListParts (entries for a re-sent part grouped by part
# number) plus the staged objects, listed in that order.

S3_META = ".pyfiledrop/"
S3_MIN_PART = 5 * MIB                 # S3's smallest part, but for the last one
S3_MAX_PARTS = 10_000
S3_PART = 8 * MIB                     # the part grid of uploads that bring no grid of their own (tus, PUT)
# A file of one request with a known length streams into parts with nothing buffered, and each part ends with a
# wait for the store's answer: bigger parts wait less often (a body of unknown length keeps S3_PART, since it
# is buffered a part at a time).
S3_STREAMED_PART = 64 * MIB
S3_HASH_BLOCK = 1 * MIB


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
                if self.code(error) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                    return None
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

    def listing(self, prefix: str) -> Iterator[dict]:
        """Every object under ``prefix`` (Key, Size, LastModified), page after page."""
        with self.guarded("list objects"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                yield from page.get("Contents", ())

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
                continue  # another upload still receiving holds it
            if self.store.head(self.store.key(candidate)) is None:
                return candidate
            self.store.delete(self._claim_key(candidate))
        raise Conflict("Too many files with this name already.")

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
        self._release(upload)  # another node created it at the same moment: its record counts
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
        return dataclasses.replace(info, received=received, updated=updated), parts, staged

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

    receive_whole = Engine.receive_whole   # create, put, declare_size, finish: the same calls here

    def check_space(self, needed: int) -> None:
        """The store's capacity is its own business: it answers a write it cannot take."""

    def read(self, upload_id: str) -> Iterator[memoryview]:
        raise BadRequest("With an object store, send the chunk fields before the file in the form.")

    # -- put --------------------------------------------------------------------------------------------------
    def put(self, upload_id: str, offset: int, pieces: Iterable, *, length: int | None = None,
            atomic: bool = False, checksum: tuple[str, bytes] | None = None,
            keep_if_empty: bool = False) -> UploadInfo:
        """As ``Engine.put``.  Every part is all or nothing (a request that breaks off keeps the parts it brought
        whole); with ``checksum`` no byte counts unless the request's bytes have that hash."""
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

    def _merge_whole_parts(self, upload: _S3Upload, numbers: Iterable[int]) -> dict[int, dict]:
        """Send each of these parts that is whole in staged objects as one S3 part, read back from them (their
        bytes never wait in a node between requests).  A merge that fails is done again by a later one."""
        merged = {}
        for number in sorted(numbers):
            segments = []
            for item in self.store.listing(self._staged_prefix(upload.info.id, number)):
                span = _staged_span(item["Key"])
                if span is not None and item["Size"] == span[1] - span[0]:
                    segments.append((*span, item["Key"]))
            part_start, part_end = upload.part_span(number)
            if not _covers(((low, high) for low, high, _ in segments), part_start, part_end):
                continue
            try:
                merged[number] = self._merge(upload, number, segments)
            except (UploadError, NoSuchUpload) as error:
                log.info("merging part %d of %s failed (done again later): %s", number, upload.info.name,
                         getattr(error, "message", error))
        return merged

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
            upload.info = dataclasses.replace(upload.info, received=((0, position),), updated=self.clock())
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
            raise ServiceUnavailable("The object store did not take the last parts; try again shortly.")
        self.checkpoint("merged")
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
            return dataclasses.replace(current.info, state=State.STORED, size=size, sha256=sha256,
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
            return dataclasses.replace(upload.info, state=State.DELETED, reason=reason)
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
        upload.info = dataclasses.replace(info, size=size, part_size=max(1, size))
        return upload.info


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
            changed = self._change(upload.info.id, lambda current: dataclasses.replace(current.info, sha256=sha256)
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

    def close(self) -> None:
        """Nothing to close: every record is in the store."""


class S3Files:
    """What the adapters ask of the backend about stored files: there, their size, a download with Range."""

    def __init__(self, engine: S3Engine):
        self.store = engine.store

    def stored_exists(self, stored_name: str) -> bool:
        return self.store.head(self.store.key(stored_name)) is not None

    def stored_size(self, stored_name: str) -> int | None:
        head = self.store.head(self.store.key(stored_name))
        return None if head is None else head["ContentLength"]

    def download_response(self, info: UploadInfo, range_header: str | None) -> bottle.HTTPResponse:
        """The stored object, streamed from the store; one byte range (``Range``) answered with 206."""
        key = self.store.key(info.stored_name)
        head = self.store.head(key)
        if head is None:
            raise NotFound("That file is no longer on the server.")
        size = head["ContentLength"]
        spans = list(bottle.parse_range_header(range_header, size)) if range_header else []
        if range_header and range_header.startswith("bytes=") and not spans:
            response = plain_response(416, "That range is not in the file.")
            response.set_header("Content-Range", f"bytes */{size}")
            return response
        start, end = spans[0] if spans else (0, size)
        response = bottle.HTTPResponse(self.store.read(key, start, end) if end > start else b"",
                                       status=206 if spans else 200)
        response.set_header("Content-Length", str(end - start))
        if spans:
            response.set_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        response.set_header("Accept-Ranges", "bytes")
        response.set_header("Content-Type", "application/octet-stream")
        response.set_header("Last-Modified", formatdate(head["LastModified"].timestamp(), usegmt=True))
        response.set_header("Content-Disposition", content_disposition(info.stored_name))
        response.set_header("X-Content-Type-Options", "nosniff")
        response.set_header("Content-Security-Policy", "sandbox; default-src 'none'")
        return response


def open_s3_engine(config: Config, *, events: Callable[[EngineEvent], None] = lambda event: None,
                   checkpoint: Callable[[str], None] = lambda step: None) -> S3Engine:
    """The engine over the object store of ``--s3``; S3StartError when it cannot be used."""
    store = open_object_store(config.s3)
    limits = EngineLimits(config.max_size_bytes, 0, config.partial_ttl_seconds)
    return S3Engine(store, limits, events=events, checkpoint=checkpoint)


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


def multipart_parts(environ: dict, length: int | None) -> Iterator[FormField | FilePart]:
    """Stream a multipart/form-data body part by part; a file part's data is read as the caller consumes it."""
    mimetype, options = parse_options_header(environ.get("CONTENT_TYPE", ""))
    boundary = options.get("boundary", "")
    if mimetype != "multipart/form-data" or not boundary or len(boundary) > 200:
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
def _part_names(raw: bytes) -> tuple[str, str | None]:
    """(name, filename or None) from a part's header block, as werkzeug's decoder reads it."""
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
        return {**completed_reply(info), "available": engine.backend.stored_exists(info.stored_name)}
    if info.fully_received:  # stopped after the last part, before completion: complete it now
        return {**completed_reply(engine.finish(upload_id)), "available": True}
    return {"id": info.id, "complete": False, "name": info.name, "size": info.size,
            "received_chunks": info.received_parts(), "total_chunks": info.total_parts,
            "missing_chunks": info.missing_parts(1000)}


class _Subject:
    """Names the file an error is about, for the console's line."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, UploadError) and not getattr(error, "subject", ""):
            error.subject = self.name


def receive_chunk(engine: Engine, chunk: ChunkInfo, filename: str, data: Iterable, client: str) -> dict:
    """One Dropzone chunk: the bytes of part ``chunk.index`` of upload ``chunk.upload_id``."""
    name = sanitize_filename(filename)
    with _Subject(name):
        info = engine.create(chunk.upload_id, name, size=chunk.total_size, part_size=chunk.chunk_size,
                             client=client, ephemeral=chunk.total_chunks == 1)
        if info.state is State.RECEIVING:
            counted = _Counted(data)
            try:
                info = engine.put(chunk.upload_id, chunk.offset, counted, length=chunk.length, atomic=True)
            except TooManyBytes as error:
                seen = chunk.length + error.extra + _Counted(data).drain(engine.limits.max_size)
                if chunk.offset + seen > engine.limits.max_size:
                    raise TooLarge(f"File too large: this server accepts up to {engine.limits.max_size} bytes "
                                   "per file.") from None
                raise BadRequest(f"Chunk {chunk.index} has {seen} bytes; expected {chunk.length}.") from None
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
                    chunk_reply = receive_chunk(engine, chunk, part.filename, part.data, client)
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
            return receive_chunk(engine, chunk, spooled[0][1], engine.read(spooled[0][0]), client)
        if not spooled:
            raise BadRequest("No file in the request: send it as a multipart part named 'file'.")
        replies = [completed_reply(_store_spooled(engine, upload_id)) for upload_id, _ in spooled]
        return {**replies[0], "files": replies} if len(replies) == 1 else {"files": replies}
    finally:
        for upload_id, _ in spooled:
            engine.discard(upload_id)  # those not stored: the request failed


def _spool(engine: Engine, part: FilePart, client: str) -> str:
    """Receive a whole file of a form; stored by ``_store_spooled`` once the form has ended well."""
    upload_id, name = str(uuid.uuid4()), sanitize_filename(part.filename)
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

    def __iter__(self):
        for piece in self.data:
            self.count += len(piece)
            yield piece

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
    upload_id = str(uuid.uuid4())
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


###############################################################################
# The application #############################################################
###############################################################################


def _json(data: dict, status: int = 200) -> bottle.HTTPResponse:
    response = bottle.HTTPResponse(json.dumps(data, ensure_ascii=False), status=status)
    response.content_type = "application/json; charset=utf-8"
    response.set_header("Cache-Control", "no-store")
    response.set_header("X-Content-Type-Options", "nosniff")
    return response


def _script_hash(html: str) -> str:
    script = re.search(r"<script>(.*?)</script>", html, re.DOTALL).group(1)
    return "sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")


def dropzone_urls(config: Config) -> tuple[str, str, str]:
    """(js, css, extra CSP source): the embedded copy unless --dz-cdn / another --dz-version asks for a CDN."""
    version = config.dz_version or DROPZONE_VERSION
    if config.dz_cdn is None and version == DROPZONE_VERSION:
        return f"/assets/dropzone-{DROPZONE_VERSION}.min.js", f"/assets/dropzone-{DROPZONE_VERSION}.min.css", ""
    base = f"{(config.dz_cdn or DEFAULT_DZ_CDN).rstrip('/')}/{version}"
    if version.startswith(("4.", "5.")):
        js, css = f"{base}/min/dropzone.min.js", f"{base}/min/dropzone.min.css"
    else:
        js, css = f"{base}/dropzone-min.js", f"{base}/dropzone.min.css"
    parts = urlsplit(base)
    return js, css, f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def render_index(config: Config) -> tuple[str, str]:
    """The built-in page and its Content-Security-Policy."""
    js, css, cdn = dropzone_urls(config)
    page_config = {
        "chunkSize": config.chunk_size,
        "parallelChunks": config.parallel_chunks,
        "parallelFiles": PARALLEL_FILES,
        "timeoutMs": config.timeout_ms,
        "maxFileSizeBytes": config.max_size_bytes,
        "forceChunking": config.force_chunking,
        "allowDownloads": config.allow_downloads,
        "version": __version__,
    }
    config_json = json.dumps(page_config).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    html = (INDEX_HTML.replace("{{dropzone_js}}", bottle.html_escape(js))
            .replace("{{dropzone_css}}", bottle.html_escape(css))
            .replace("{{config_json}}", config_json)
            .replace("{{version}}", __version__))
    policy = (f"default-src 'self'; script-src 'self' {cdn} '{_script_hash(html)}'; style-src 'self' {cdn} "
              "'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
              "form-action 'self'; frame-ancestors 'none'")
    return html, re.sub(" +", " ", policy)


def open_engine(config: Config, *, events: Callable[[EngineEvent], None] = lambda event: None,
                checkpoint: Callable[[str], None] = lambda step: None) -> Engine:
    """The engine over ``config``'s folders: its ledger opened (and migrated), disk and ledger reconciled; with
    ``config.s3`` the engine over that object store instead."""
    if config.s3 is not None:
        return open_s3_engine(config, events=events, checkpoint=checkpoint)
    warn = lambda text: events(Notice(text, True))  # noqa: E731
    backend = LocalBackend(config.storage, config.chunks, checkpoint=checkpoint, warn=warn)
    min_free = config.min_free if config.min_free is not None else default_min_free(backend.total_space())
    limits = EngineLimits(config.max_size_bytes, min_free, config.partial_ttl_seconds)
    return Engine(Ledger(config.chunks / Ledger.FILENAME), backend, limits, events=events, checkpoint=checkpoint)


def default_min_free(disk_size: int) -> int:
    """The reserve kept free when --min-free is not given: 2% of the disk, at most 1 GiB."""
    return min(1 << 30, disk_size // 50)


def create_app(config: Config, engine: Engine) -> bottle.Bottle:
    """The WSGI application for ``config``; routes only translate between HTTP and the ``engine``."""
    app = bottle.Bottle(catchall=True)
    app.install(ErrorsAsResponses(engine.events))
    _page_routes(app, config)

    def client() -> str:
        return bottle.request.environ.get("REMOTE_ADDR", "")

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
        return reply(200, {**tus_upload_headers(engine, tus_info(engine, upload_id)), "Cache-Control": "no-store"})

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
    assets = {
        f"dropzone-{DROPZONE_VERSION}.min.js": (unpack_asset(DROPZONE_JS), "application/javascript"),
        f"dropzone-{DROPZONE_VERSION}.min.css": (unpack_asset(DROPZONE_CSS), "text/css"),
    }
    favicon = unpack_asset(FAVICON_PNG)

    @app.get("/")
    def index():
        if config.index is not None:
            response = bottle.static_file(config.index.name, root=str(config.index.parent),
                                          mimetype="text/html")
            response.set_header("Cache-Control", "no-cache")
            return response
        response = bottle.HTTPResponse(page)
        response.content_type = "text/html; charset=utf-8"
        response.set_header("Content-Security-Policy", page_policy)
        response.set_header("X-Content-Type-Options", "nosniff")
        response.set_header("Referrer-Policy", "no-referrer")
        response.set_header("Cache-Control", "no-cache")
        return response

    @app.get("/favicon.ico")
    def favicon_route():
        response = bottle.HTTPResponse(favicon)
        response.content_type = "image/png"
        response.set_header("Cache-Control", "public, max-age=86400")
        return response

    @app.get("/assets/<name>")
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


def page_urls(host: str, port: int) -> list[str]:
    if host in ("0.0.0.0", "", "::"):
        hosts = lan_addresses() or ["127.0.0.1"]
    else:
        hosts = [f"[{host}]" if ":" in host else host]
    return [f"http://{h}:{port}/" for h in hosts]


def banner(config: Config, urls: list[str]) -> str:
    ttl = f"{config.partial_ttl_hours:g} h"
    lines = [
        f"pyfiledrop {__version__}",
        *([f"  saving to      {config.storage}",
           f"  partial files  {config.chunks} (unfinished uploads, removed after {ttl} untouched)"]
          if config.s3 is None else
          [f"  saving to      {config.s3} (unfinished uploads removed after {ttl} untouched)"]),
        f"  limits         files up to {config.max_size_mb} MiB; chunks of {binary_size(config.chunk_size)}, "
        f"{config.parallel_chunks} at a time; {config.timeout_ms / 1000:g} s per chunk",
        f"  downloads      {'allowed' if config.allow_downloads else 'off'}",
        "Open this address on a phone or PC on this network:" if len(urls) == 1 else
        "Open one of these addresses on a phone or PC on this network (the first is the most likely):",
        *(f"  {url}" for url in urls),
    ]
    return "\n".join(lines)


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

    def log_line(self, text: str, *, warning: bool = False) -> None:
        if warning:
            log.warning("%s", text)
        else:
            log.info("%s", text)

    def stored(self, info: UploadInfo) -> None:
        with self._lock:
            if self._uploads.pop(info.id, None) is not None and self.tty:
                self._refresh(self.clock(), force=True)
        seconds = max((info.finished or 0) - info.created, 1e-6)
        self.log_line(f'stored "{info.stored_name}" {human_size(info.size or 0)} in {seconds:.1f} s '
                      f"({(info.size or 0) / seconds / 1e6:.1f} MB/s) sha256 {info.sha256} from {info.client or '-'}")

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
        elapsed = max(now - upload["since"], 1e-6)
        rate = (upload["done"] - upload["base"]) / elapsed
        size = upload["size"]
        if size is None:  # a body of unknown length
            return f'"{upload["name"]}" {human_size(upload["done"])} so far, {rate / 1e6:.1f} MB/s'
        percent = 100 * upload["done"] // max(size, 1)
        text = f'"{upload["name"]}" {percent}% of {human_size(size)}, {rate / 1e6:.1f} MB/s'
        if rate > 0:
            text += f", {max(0, size - upload['done']) / rate:.0f} s left"
        return text

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
            self._draw("receiving " + " | ".join(self._describe(upload, now) for upload in shown))

    def finish(self, text: str) -> None:
        """The last line: clears the status line (and the terminal's "^C") first."""
        with self._lock:
            self._clear_status()
            self._emit(("\r" if self.tty else "") + text + "\n")
            self._finished = True


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
    linger: float = 0.005
    """After a response, a worker waits this long for the same connection's next request before parking it
    in the selector: the page sends its next chunk, and a script its next file, within a millisecond or two,
    and handing a connection back and forth costs more than a small file's whole request."""
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
_CHUNK_SIZE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?\Z")
_REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
_SEND_BLOCK = 64 * 1024    # a response's first block this small goes out in one send with the headers


class _Connection:
    __slots__ = ("sock", "address", "port", "buffer", "since", "head_started", "busy", "closed")

    def __init__(self, sock: socket.socket, address: str, port: int, now: float):
        self.sock, self.address, self.port = sock, address, port
        self.buffer = bytearray()    # bytes of the next request head that have arrived
        self.since = now             # when it was parked (accepted, or handed back after a response)
        self.head_started = None     # when the first byte of the head now arriving came
        self.busy = False            # running a request in a worker (else parked in the selector)
        self.closed = False


class _Wire:
    """A connection's socket as a worker uses it: blocking with timeouts, and the minimum rate enforced."""

    def __init__(self, sock: socket.socket, limits: ServerLimits):
        self.sock = sock
        self.window, self.minimum = limits.min_rate_window, limits.min_rate_bytes
        self.waited = 0.0   # seconds spent waiting for the client in this window
        self.moved = 0      # bytes moved in this window

    def _account(self, started: float, count: int) -> None:
        self.waited += time.monotonic() - started
        self.moved += count
        if self.waited >= self.window:
            if self.moved < self.minimum:
                raise BodyTooSlow(f"fewer than {self.minimum} bytes in {self.window:g} s")
            self.waited, self.moved = 0.0, 0

    def recv_into(self, view) -> int:
        while True:
            self.sock.settimeout(max(self.window - self.waited, 0.01))
            started = time.monotonic()
            try:
                count = self.sock.recv_into(view)
            except TimeoutError:
                self._account(started, 0)
                continue
            self._account(started, count)
            if not count:
                raise BodyIncomplete("the client closed the connection")
            return count

    def send(self, data) -> None:
        view = memoryview(data).cast("B")
        while view:
            self.sock.settimeout(max(self.window - self.waited, 0.01))
            started = time.monotonic()
            try:
                count = self.sock.send(view)
            except TimeoutError:
                count = 0
            self._account(started, count)
            view = view[count:]

    def sendfile(self, file, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``file`` from ``offset`` with os.sendfile; returns the bytes sent."""
        fd, out, sent = file.fileno(), self.sock.fileno(), 0
        self.sock.settimeout(0.0)
        while sent < count:
            started = time.monotonic()
            try:
                done = os.sendfile(out, fd, offset + sent, min(count - sent, 1 << 30))
            except BlockingIOError:
                done = None
            if done == 0:
                break  # the file is shorter than it said
            if done is None:
                ready = selectors.DefaultSelector()
                try:
                    ready.register(out, selectors.EVENT_WRITE)
                    ready.select(max(self.window - self.waited, 0.01))
                finally:
                    ready.close()
                done = 0
            self._account(started, done)
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


class HTTPServer:
    """The server ``make_server`` returns: ``serve(stop)`` until the event is set, then ``close()``."""

    def __init__(self, app: Callable, host: str, port: int, limits: ServerLimits):
        self.app, self.limits = app, limits
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
        try:
            data = connection.sock.recv(HEAD_READ)
        except (BlockingIOError, InterruptedError):
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
            if len(buffer) > self.limits.max_head_bytes:
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

    def _sweep(self, now: float) -> None:
        limits = self.limits
        for connection in list(self._connections):
            if connection.busy:
                continue
            if connection.head_started is not None:
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
                    with contextlib.suppress(OSError):
                        connection.sock.shutdown(socket.SHUT_RDWR)
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

    # -- the worker side ---------------------------------------------------------------------------------------
    def _error_bytes(self, status: int, message: str, head_only: bool = False) -> bytes:
        body = (message + "\n").encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nDate: {self._http_date()}\r\n"
                f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
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
            sock.settimeout(remaining)
            try:
                data = sock.recv(HEAD_READ)
            except (TimeoutError, BlockingIOError, InterruptedError):
                return None
            if not data:
                return None  # closed: the selector sees it and closes too
            buffer += data

    def _parse_head(self, head: bytes):
        """(method, target, version, [(name, value), ...]) or an (error status, message) pair."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not _TOKEN_RE.match(parts[0]) or not parts[1]:
            return 400, "Malformed request line."
        method, target, version = parts
        match = _VERSION_RE.match(version)
        if not match:
            return 400, "Malformed request line."
        if match.group(1) != b"1":
            return 400, "Only HTTP/1.0 and HTTP/1.1 are supported."
        if any(c < 0x21 or c == 0x7f for c in target):
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
        tokens, framing = self._read_headers(environ, headers)
        http11 = version == "HTTP/1.1"
        keep = "close" not in tokens if http11 else "keep-alive" in tokens
        if isinstance(framing, str):
            wire.send(self._error_bytes(400, framing))
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
            key = name.upper().replace("-", "_")
            if "_" in name:
                continue  # "X_A" and "X-A" would both be HTTP_X_A: such headers are dropped (as nginx does)
            if key == "CONTENT_LENGTH":
                lengths.add(value)
                continue
            if key == "TRANSFER_ENCODING":
                codings += [c.strip().lower() for c in value.split(",") if c.strip()]
            if key == "CONNECTION":
                tokens |= {t.strip().lower() for t in value.split(",")}
            if key == "CONTENT_TYPE":
                environ["CONTENT_TYPE"] = value
                continue
            key = "HTTP_" + key
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
                has_date = True
            lines.append(f"{name}: {value}")
        if not has_date:
            lines.append(f"Date: {server._http_date()}")
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
                or self.chunked):
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


def make_server(app: Callable, host: str, port: int, *, limits: ServerLimits = ServerLimits(),
                ssl_context=None) -> HTTPServer:
    """pyfiledrop's HTTP server for ``app``, bound but not yet serving; port 0 picks a free one."""
    if ssl_context is not None:
        # The hook for HTTPS: the handshake belongs in the selector thread, non-blocking (wrap_socket with
        # do_handshake_on_connect=False, then do_handshake() on readiness), so it can never block accepting.
        raise NotImplementedError("HTTPS is not implemented yet")
    return HTTPServer(app, host, port, limits)


###############################################################################
# serve() #####################################################################
###############################################################################


def _print_banner(config: Config, urls: list[str], console: Console) -> None:
    text = banner(config, urls)
    no_qr = None
    if config.qr:
        try:
            code = qr_code(urls[0], ansi=_enable_ansi(console.out),
                           blocks=_can_encode(console.out, "\u2588\u2580\u2584"))
            text += f"\nOr scan this with a phone's camera to open {urls[0]}\n" + "\n".join(code)
        except ImportError:
            no_qr = "no QR code: the segno package is not installed (pip install segno)"
    console.write(text + "\nPress Ctrl+C to stop.")
    if no_qr:
        log.warning(no_qr)


def serve(config: Config, engine: Engine, server, *, stop: threading.Event | None = None,
          console: Console | None = None) -> int:
    """Serve until ``stop`` is set or Ctrl+C; expires stale partial uploads at start and periodically.

    Ctrl+C cuts requests in flight: bytes count as received only once the ledger has recorded them, so an
    interrupted upload resumes where it stopped when the client retries after a restart.
    """
    console = console or Console(sys.stdout, quiet=config.quiet)
    stop = stop or threading.Event()
    engine.expire()

    def janitor() -> None:
        interval = min(3600.0, max(60.0, engine.limits.partial_ttl / 4))
        while not stop.wait(interval):
            try:
                engine.expire()
            except Exception:  # never let housekeeping end the server
                log.exception("removing stale partial uploads failed")

    threading.Thread(target=janitor, name="pyfiledrop-janitor", daemon=True).start()
    urls = page_urls(config.host, server.server_address[1])
    try:  # from here on Ctrl+C ends with the last line, even while the banner is being printed
        if not config.quiet:
            _print_banner(config, urls, console)
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
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)
    parts = urlsplit(args.to if "://" in args.to else f"http://{args.to}")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        parser.error(f"--to: expected an http:// or https:// address, got {args.to!r}")
    path = parts.path if parts.path not in ("", "/") else "/tus/"
    endpoint = f"{parts.scheme}://{parts.netloc}{path.rstrip('/')}/"
    password = args.password if args.password is not None else os.environ.get("PYFILEDROP_PASSWORD")
    return SendConfig(tuple(args.sources), endpoint, password, args.parallel, args.state, args.quiet)


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

    def __init__(self, endpoint: str, password: str | None, timeout: float = 60.0):
        parts = urlsplit(endpoint)
        self.endpoint, self.scheme, self.netloc, self.timeout = endpoint, parts.scheme, parts.netloc, timeout
        self.headers = {"Tus-Resumable": TUS_VERSION, "User-Agent": f"pyfiledrop-send/{__version__}"}
        if password is not None:
            token = base64.b64encode(f"pyfiledrop:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self._connection = None

    def _connect(self):
        import http.client

        if self._connection is None:
            kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            self._connection = kind(self.netloc, timeout=self.timeout)
        return self._connection

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
    session = TusSession(config.endpoint, config.password)
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
    stdout.write(f"sent {sent} file(s), {human_size(progress._sent_now)}; {skipped} already on the server\n")
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
    folders = () if config.s3 else ((config.storage, "storage"), (config.chunks, "chunks"))
    for path, what in folders:
        problem = _prepare_folder(path, what)
        if problem:
            return _fail(problem)
    if folders and os.stat(config.storage).st_dev != os.stat(config.chunks).st_dev:
        log.warning("the storage and chunks folders are on different disks: each finished file will be copied")
    try:
        engine = open_engine(config, events=console.handle)
    except S3StartError as error:
        return _fail(str(error))
    except (sqlite3.Error, OSError, RuntimeError) as error:
        return _fail(f"cannot open the upload ledger in {config.chunks}: {error}")
    try:
        server = make_server(create_app(config, engine), config.host, config.port)
    except OSError as error:
        if error.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
            return _fail(f"port {config.port} is already in use (choose another with -p)")
        if error.errno in (errno.EACCES, getattr(errno, "WSAEACCES", -1)):
            return _fail(f"not allowed to listen on port {config.port} (choose another with -p, above 1023)")
        return _fail(f"cannot listen on {config.host}:{config.port}: {error.strerror or error}")
    _disable_quick_edit()
    if config.open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(f"http://127.0.0.1:{server.server_address[1]}/",)).start()
    return serve(config, engine, server, console=console)


###############################################################################
# Generated assets and the page ###############################################
###############################################################################


def unpack_asset(packed: str) -> bytes:
    return zlib.decompress(base64.b85decode(packed))


# >>> vendored assets: generated by `python build.py --vendor`; do not edit by hand
DROPZONE_VERSION = "6.3.5"
DROPZONE_SOURCE = "npm dropzone@6.3.5 (github.com/enyo/dropzone), tarball sha256 555b83845cfe63b6d1192a8c07eb30a50d55af26d6afbb78abad91d3f5336830"
DROPZONE_LICENCE = "MIT; Copyright (c) 2026 Matias Simon <m@tias.me>"
DROPZONE_JS = (
    "c-qZ<YkS)^(&+d76|_%}L&h{E*^Zk^q5UL|+vZ*8(%9K;*Xy^WB-mynlUkDUrLx}Ner5&(5Fjbp-OD*APaccJWiS8+gPFl#="
    "w8gyQJG|^>&<WC+!0~47wiNtqJheAN;e1sA+wWktv4v|ry{#>#98+|45ML|O+=hV8yjvCilDekE=t$)23R}}vCts7aC0~Iyz"
    "(l~Zk?k%&vG{sccn<jLO9p6qI8DBiBl&V{w79c<P9#M1Omtq;v^Xfx99mqm<1D&UY1w>DC`bKuZqEFb5kNV3A3}&xvn>JlGK"
    "@a(C|kB8BFu6%n<S5DlR_Wrl0a`D)RC^7{!x`JMm|pgfk8&XEVY$+1N<kF(+Syuk$><50Zj@A^qU&ygy$IVkjM!?poJ>QbRE"
    "`w6U=UqXG521N_^+@W<XlObQqQ1U6nQa#7Cm)QJ~*4pJ8;fRk-Zg!k|;Uj$`#Qszl|DVq@<Ow5@aO-CYj9#zot3fh`@cu@1X"
    "7DhY)8yiNNsunFI1&k(fQOtp2gkNf;%B!RZe#ORz@#t$2*4`0Ezm|3;&L1A!W@31D?zNN+rnBP8EoIh1Tqh+U0F((hJfZQyM"
    "3hb%Ho@XlrykM`mJkkfI%SgcJQ2jx>Exb}gw77k&Wee+7HJ7XWxNIBq?pF#=<4VO-el*l<F7)#Mq?m`-?LQoqfOz@<NUJdmk"
    "W=(RF$KFl?cy=v*B<eiat=-C{9OW62mLLjYSzJ6R3|p;OV+e(s6bh9Kwpqt_fCX%%8{Tr{dNzia>LzT&{UI&PFrp$0!$Zsn9"
    "kGM|u$QAW4(51}9*2;i<wFUL>-fpD(hD3)w%wdaW^0FeKD|!3#YM!>+f4#F(O1&g@!h*2a{U7J9187-q2)P7{=DND~P#AMq+"
    ">00RL$2#E+uHw>X?KtEF=AmR7C!4O9B>%zcdvGC(?KFcTlbT*mz*P^`2#{FoT6=me#Cgs&(F2;ai5>H^-dw!W*i)>cP($hEx"
    "yu{?obdts6qQC9W=;{4zQYKTRjGjNbnx$WX7vMACJQ9aS0%e{gzl;8M_q%U<FSa#EDy85;NkBQjr^Nc}aRRHazvExWci$&4+"
    "XU^!9znYP5MKj*UqE`~ODcMI9bbymtJ(E11tK6)hMGD-gXnc(oH_BY$+*1g_qL6sA4PI`RoZFqdGJQCup&Sa;mE2qS~7tv8Y"
    "%B#NKawOm}x)F;z?58_k)+Jkb<41K)k5}f11ZBtnpl=qkBM|XYqnN@g^>yBcd7`nSCYVvB>#lEG}Z0t{*uKS2mE#SGBN{%QV"
    "ZykI5K_K!Sk8cr+5zQj86lDoJ%lCC|zXHl2|uil1g;Mj$b*dKr&Di|g!0949=r(_Gvn;<h-HJrz0QnG}fAC(gx^SA^BObUG`"
    "m!XN^S?_sjzDbTnc(-i0cvBlqd8jl&$=J&kJ5c)V7m2c(Xya)7wYWmSzm|2HL*SQioEY8f46dzG>Rb7|=C7b2W5af(Pz;2#F"
    "wKOZ8Vm6&-dFhPv`0`o$Y^;DXtRk?Xoq}-Ek3NB11H1C9K$ak!3(j-^?`sfPCLqgbY@B;+SK>KIz6z8-uu?XG@p8uTy>0@Eo"
    "MzdZ<gy>(vy&76C3A+!rQ^=$ijEeG_sJVCaNfsvj!Nr0^SQC)s0c%Sm)-#N5_J$=<1jeDfuEHMKZzRb5y*lZ5>RASy$(q(1E"
    "k<ljIn1_4?B_I0uG#090Wx9I=)ANZItEt3@MNyeHO(uOAEn(PDFkKbC6T&7(gO#gDw<hT+V>j#?S+RF;<8i(uN@!P(PAy)?C"
    "XhnIWKve0N5i&;kZ%^diZxW8D7w(Q6<dm?j_wez=X(5<4m($dQo^9;hDSIw6XU<g+6go1JMj!%JsWzUQerx*G{#=wm%8NRT`"
    "$aeD7u!)lk)V~_}P=r6Fp7X5iS>_?|>BL5P8e}La>_<aw*U*Y%9@C!e~XyM~-3_|=ua^V6uS=iU-B;Lr~XFmRYHcQ6+G{DvZ"
    "i9&!${`hy^G{)i%^63{6L6VIpn*6vPKC23pPWxpx#oiZz-d|L8N*HCcw5&BuxwN4iVy*%?ye~nNxhO=b5P9C-0Pds20&PLm^"
    "%ioID<loTz-t|c3Q~z-lE(S{8(>_tOY+iorPw6~mP|(iFK%mL^v%3IXW@*0-(s$_1@pVb3`dM3EjE;D_37%DqCAq1#hd%n_!"
    "1$3keJ*=9!eA)_rD(;4**|F=H`9_ubrS21xS`v+n}O|u=FiFt4a|IARy<vA{;5fPB!aCub?%DDu(M-rS<(+u*IeOuR8n#rS>"
    "D1$`$q?8iN9Nc$G}Xpig)thn1kOwf71EMILH{YN9}4ETJ=Zw3Cpiic9C9gh_{81zGSKrBFGY7Fxv6vITg38|tIwm-mV?pgXF"
    "@_rUl;D_F23AeWe*OQK1_d6AEP?st9o`9=OnQA7l{_=^cFihy!R4=4$8ZbzjJcpyOi<PmYpFbNbiKb0>M5_DD#TbMqN`>Cqy"
    "f<)Yjp>N^)xV#FklhiH!3W^6{bVll%5NRGWsGX7)tgGyo4-ZDUeaTyL5P7Ba<;DBifoqfqRga8zP28VnUf+PP2Es(f=yxac2"
    "BakGMp-PQcB!|08UtC%GBtcjzoyx3>X>q!^X!{>zIYaSN;IdYehytmW6Kz<&bCDA7tED?+A@cX^2_{E_M?<9+yfX~&{I%mM6"
    "m%`yUDIxi#iSY6}0kZ4mY>4Ap+XKuTj%<J92w|-ti8ojx0+;H#W7T0e>m{wj4QTKGGYk^@WlcPsR0g0_>z;=OdhtToGBmdSB"
    "oFljGEi686AwlIu&5lgfAt(zJX}0^21@q2W3(=|ZeK9cD*ONK(lxsF6k{_JY}(ZU)nA9@kd$f`!<6ZA@#_UWVH=&n{soHF5;"
    "0%9dN=x`r*^RVCHR3itvky~e&ZG|J?>CdRdKnvGC(*t(AMuNv8#ONSOkxc*{y-H|ImKI5#u$?n4SuG4j1>^hhR12zfQZ?BRP"
    "rt9u{k^<zbvYhrio!i^n;C3g-^2^S4x7+OiWNrkSnF2%NXU7?b>+gHrV7vQm&)NPi`1ZT)?~Z%B!8ZIl+b@D|A^i~E_g?Po;"
    "`>f-Z_nxRukrpZ)tA4=+dWx-NB$ndJJsLe-|cN#&v>W$T>g0HrL50z58<84sdjh1v+;m;s?X(*cXy~CPEYpdaCbN8Q9E7vYr"
    "Mb2`l>wQP53iDyW5OE;|uQ+U&h;bCw#g5u^P`E3GeVbZ05yFXNTJ}-U*M|`2TI4XQ#t-fz$T{qWu4WlD7Ala=JVc-^rf!cH~"
    "I(Udj>ZZS(I-9s%|KEzg`Rf6Tus{cveL1y_~-j%TvV`0Vjac6rA3_*cDu%M`83e=8|T!Q0uj+uwO%w-4`D`#XD#Klf+1%k>%"
    "W-5%Fxy!AVe7neU)<GHgVSAxPD-X*?_xA87lk}QABc<c5R-l{!?w|?KV+vi`Eez>%rf~(5Qc8?hkh1cOyysLi6^0ME$eIA#?"
    "rQ`O}ZlA~fSoKHIpPr{>^SEo%pBhi5i$jA>+Udxq|HoD`|A0CQlAUq%&{TeolcEF}0X1P4wGP~`x31tV2g%CEH&FL;6dLC86"
    "@=@55g-&5`QtF+@puUUeEwJJPecsJ{qvoe#ziUQh`{bHP-}lOBpOZ7Dgg{2D8?5gP?9KaRz^cKzBVj-wd0CrcXb2)G5~8ejm"
    "k0-f-b7+uoBqNIj!n7K@tS#1XV0w)N{f*+$H$gYH6)bb+Aavcs)D#$4un+ConjpGRt32CT?_QN_*#^m)pvv2r!+X{$YqHeM*"
    "R=-2Qm_{#Z_$GPt<X*5VDU5wp#=py`R=*IXyGX!x<QBg=xY@#f+pT>mY;iHlL5Ow0Z(9g7PXzww|FLS^B7wt1K;bY=Qlyz0b"
    "g8EACeo(2O$wiJNI7Vf(xRfF<u_H}{mf}+f(cx)P9#`0tupi846ko73|^6B{F>$mSd{BQt$m6kWRf#EVMpznI&KC4Np4`{vU"
    "ujr#$e^s09HCDH1r`fimKSE3rjwC0b5IT^<buECh+=$K>B0u#O$a1ixW*p3U>TN00O9KZw`6xeRWATI{+`T1>kq>!iQ|N?H*"
    "3!=+9$ks?A(AW_>a;4TPYoMz8Z4)sb()H3R1J0dM~7Ntgrl7X@kFr!KSi5BSSkw_u=Z1VcIP4utiVz+U($su9Q__n7)jCpT<"
    ";ZJ0)Z@D9uvdtMg_SG;7NZ#xoBkz`T1WM98=Yl<73(4RCliVxKbLd<!Ke5!#i2ML1J=`cCrFP{K#TCn#zsTI@?{wK1>8Hylo"
    "}jFt|77=${@=y9qg<DJ(3q@`hpb>GQ`QJ|CT&L<ebb6HjI$M5}pG-cQ(!MJDUT|BhfGp}D<=GWMbXHjP7XJX^hFgTRuh@s{w"
    "9HpxN)LeYgEt#;HgPD8LlPmf4auwS!hHBW`S3Xlyw12ICBLU+R;g!&%3iZCi3-`w;5z*s1Ba4^)fh3|EIM`D2B!y_v(mpqcv"
    "{(;B3x_6kO<w7~XAU~D&7kCbt<NLzT{30Yzlt7E;0ZZnAmahXPC<j{N4K(2DNo`;<S#w6oMgnW82h}PHnhPqhDKluH)_|!qs"
    "8MOa)D+aHD$oamb&3eocm?&b4@e*n>Z2djMn14cJurqiBHs@n*Z`Q&Ncu`S!jaByg_G3%ri$4V#+VaruO_R6nX>>11lacs*@"
    "a8z4^+lgCmFc+7vUL{EzWt5)iXn00O6TRuO>nt1EYr@ooD#jpsrP<vYK{RQ0F`v;DkkvDusrP-gxh^w3KQavK!KVNEUCj%7B"
    "uvX1=q<TxmAQCGjX+9*EekhkRP@D0eJJRRXb~*5yEzu_3%wHRB18#Q5Hc%TiJXfDphyU|9jp73{PI0Bgrg3T&udm`0(C-j2*"
    "{zRz+?U(%iC<DU7VUri6!k$#BC0sN7lR|Rv=U!`+}D;2U_!0$-7oxi8gJC}YG)qq(}91jm`(D~wxJP18eXP~ZU`Eco~Tub^a"
    "(je8l6wLC8KGJGr)DKf%mq1O!8Sud<W|ucbBt|uRCO>4(m(RxzEQFh6Ea$I|gXMd}3UobBJK@;SD>n>oz!_%cmGjI3`OJyaa"
    "h0Y)Jqy|r(P3mPV46m8*^aO65mrN3Ifu34Nv<+Li-=_3vEdMss&-qm)scFwNgK`+8m=HwqjvpOGo(kUPA%4WhpX%QrW@e$d9"
    "ELmnf^{vHDYIia7Dqvk~~z7MYS$KDJBI2c)!U;RXyoK*yN_Q{FXG>XTN}=o*%{q`n&pW5~@S*qdVZ`0PTD28{utiB!+Tlzge"
    "nY(#~-zE6rL6+l)f9ksGeAd|>(*xU0+hQ6nj0)mvC<s9qmxZ&TPcH@o)oAdatf56(=`=Y7i?!fmhUNBS{hU*JGG^DL03nUq_"
    "z6iNvU{*plyDMpd02NKJak_gCWfo|PT1G2Uh3f2B=QeK^qF{Uo4TY!Lm%gSgYYLG|@X~m|knc$}{M_-QKQcWrCBUwJRvNjjV"
    ";Y7*x$#q}9ear2>hW$j!{VT_>*6pfskWS2W?vXJn?7meOKT7F8gSy`LA3wj3YWCa0+Vn&^LiP~(k(6gavhSeR!4|5Mb@!c0D"
    "Pd2FqVi9VJZ0t;Z8|DQw}yj}SHsD+{H^vkVpmwlay^31l$m)tE)&+tYcX8sw>G<^?L4}8)sbbj1CzHzeq~o~$*{{1tu+$(mG"
    ";6VpI7c_Ep-_eY%9wc)KVLM_iDHj%#GSB)h3^3p8OMmk=x9kjccKlrE1P4DtEu<E$N`$l2Vp5ol%Re6>XO^nY$%B<uBi$*Ob"
    "Wj1Y~5zRnY1TUb-p&kv6zW)C%ZnlM@fgl@W$)tM|0|jPoSkn#4mffl9Kd>9V{O2-$vak|G%<=+7Q<-Dp+uX;viIsW6I%MK*!"
    "<R~9d`X&7}^7MX~P^06{}`u|8NHe+=o^P)$^#Ige2AtPjSAQ+|_8)=Y?pERpf#mC}k%2_5+w0XR%`LI(XujxGaq}AVMu)m5^"
    "V6Aj^fJ{mHh4;lGYy*Juus}mRvoZS=!J{hB2AwjLe4HfBYLy`;@{y83=I|B+{Gmdi8HIeO2p?Ic<dj=6{F;=I-mi)btcz5JI"
    "YJ^K?HtDNo{4jHyp_6<ZSRSylM{JFaEdk|DFA%Z7EHCep}Jv;`ondVi3o;)>&XGqhB_D?vv`#Z6QnlnntWm0VPb-85nx&iS@"
    "KcKRjAs@f`PAPm;xTrg$ZTP+{z1@O`s?h&~26rk&{DV;m!5=XxJT;uiDC}Yfq)T_S9D7tUM=yh3JZLUhA@><yvpyr*&k|L7+"
    "09wjBW4=Y$8Mad6nj%@+auh3w$ajCEbluuRRFdsu3KFX^;D*GAF4O$j=kR*E*1VksB9;n&Jit|S{}OU1HM#2A$M{T$DYticl"
    "(7a(7~o=mb^F<y+wyA$06^uSo9QCK^o8X=zdM@ak;Z0-0wNz$+H@%=z1<1MD?J#f1gM9D3|7p8MVOV=r#yPi#Jy=FHNH7w(n"
    "`jASEEY6q7U_g3DG4#0Px_ZW>5v`gvJyiswp8_gwxfX`DH82I)Ifu0r)-!~9e3ur<Sh%X7|73yJTP7zFLO`x-u<X>m&H$A9A"
    "zJlq=>g?^!|=5j!#0*@_b%UNWw#1dOR_eg49OD!e(O%Mwo0ZkHFx(vB*&83!!n@M4W9a%KxHE($>`$+TL9Ifg?ZcR;Vo;kC|"
    "|5B@nm!bW0!^(AD9@hn(n~l&!!%y#s225RWIt5o1wnBf>%_E6J#2xkxEAv0}=MR-RET|l~=myb<jM|YB}G))2$RuJikKYpVU"
    "=KQ_F5K{pc%~=0)Fw_96hPAJw!bow=xG*haU5=<J)hSeyeRi5Ah~*UD1$2!4i1Ybk;ju)aJ?Uo@^=NXF^Yt%P!wl}cell$M8"
    "el~Y-r*Y~5r(z_ve(*#yYz6sT*ZJMT85cJF``oK_WQf^pNMM-4c!S00X48xvVU=!=kBLlBgtZ-dDtw;TvEEzl91v<l<4HmN@"
    "P}jO6kAm0bvRGSJ`ma3K3F}IE-g>dUVR|@l|6QhsnmS3A$eMB`6Fsl*reV{FKsPX@iC>SbVc~~CWqj12S?H`gY!IzimB|YnF"
    "D#66np!e_;^D;^DFr9}bkRzHZ1puIoSHzc?{?{XXUlGOsd-sg9vNqJN6eQR%(;wEQOb28Ts-%C{FYhjog2^>Fe9_6rGwPXT-"
    "9#OHY-=@CcvuC&JFw$lvG&ipUX9<-p|tWK`FO$QQ3>?+E41|{#wt|H*?B`=h7Q)N&k<KY-xNMo_g!HP+KnVkm0t~W2tEuZXW"
    "~R6dA_hTGu#wRU;vhFx*;DURx;HWZn`1LBaF?82;MDp@DoWku553M`eD)O*<M!q}A?s)%2W2<q&B868~J|pRf357*(^H;8y="
    "CR|-mkv0*Sh4)e3*T!OQW_vWqr=g-~Ut;Fl}phZ|moyQ6Sk}=<{T<|TsJe#Fsw+Gulf?=|VUZG%@Ug9nSI|aWuZF`D&?-!^L"
    "H`-Osar3rARb|YxM8W1c0uNGcJXGZacXc%-Q`hS$OE8HzHJ^#dAj+ktXhl3wm;CjLEmhmIPi@*4OiQ(ea$(14Ahrg@{BK}sD"
    "i}vXD3#e{89-cVT_Kh$jOi@}dMjbt!nQ)lRFFZVznx)ho+qWaE?_6ARidagXv>mi;pwb<&K8#+U{;Ew6f{V6%qS%bw(u0+=h"
    "^i;1Pe?ab^?*&3Y{-C`YhD$FHJsIaXOx`)LXI{s96niv==*|dhN2G#eoz|`p6KH=`f4)@muJYPdtM9$_@-IV^09p;Pb$gI4~"
    "9{8bvjPR%DoF{{c(0JI#%_W*J+wz|dUj>>O6SK@hnF!MlClm>eDu{L^pdx^#%GEHOzz9%UL9E<8$d**d0hM1`BTCXN|}mER^"
    "gsj2r!G1}wA9uZx}6}}X)J%)f6YO5CYo$EZnZ~*GSK)r>0!0<<LReL1pXxB+00#tkr@}xtkQOu#nY7=3it^*?}q3|<BQE{~h"
    "i@}Y!5m%X8a-2Na9sHP%c1#>{#sSaU-LrE8jS|#+KMN7Ym5Ux%86MS6vP+<TL>QjP<PoEnazTL80G)wweiI}&X&F>jS=`AIR"
    "2P|D*gm0N%0zIG%Q36<LxxTOVYsq3YD+>rUJOzJPH+I~fb<A(yPz=R<OPv8$A0QH4{%|AKgG&ZwDZkeR$ef_R<oIUK2%K4p|"
    "j-7j6mQY#%M6<FMpi=Qor7kr)Lj^86-G;Dci7%vLmSBYX{VT!!K+2nKvlNe$7!K$Q!qHn}R(S`7mAoT~^?Eue-fVe-2W&b*q"
    "+9T(pB!WCm}Ed>M|-HRJ->U<W~V@Mh&M3JG1$Ga*>vT{MtoIO6!@`u~fH{o<CZ&cP1;6M{m^;M4=3v~}>Y-g%y7r>r|<;?&p"
    "fY{<TvJ~J@?{TB3Uv2uW3^ae05S^W;@6e&eebd;N2pfP2o>35|kbze@WuWdn)p>B#x#7rYe=`Bo|T!*q#J^}1%;J0nJMCKBr"
    "NXfpheKl1$yg-vYG93Zpo1Xd*BZ$e$=yCO_^0hxJ&(S*Fw+eS_1f&8-sWm7O;66R+1_vq`y3*23*aobbIWBBFi`bv(N<jmM%"
    "UO2<9dYb(%Hg8fIWtn$s?(LJQO>1fm1dZUQ;Z)(N3_!AZzvqXd<;*c7{f><rE?V*+G%tsMCvePD3#^TE#&6xtOLAy(VTJPuA"
    "e@LZi}+EG)M$yAmzSltmsBWwu%SZl9ugFtoC@nZQPWH@u^isj^MI9-N82ZWcFRC<Ip%G8?10}?hXvcygDQfU}~Af<OrXdSCP"
    "!Iv!m86$!iO)QHx{e<MP8>acoGfJo*ky)3K^V*CCWz^vEp<JIa^0(*4_CIdj?)vur_XpC{%SmeD~mEa?_5IkkMzTuyeyI?T0"
    "dEej2)>H!%>3P*ing1o(QB!*7b?l>9XRq#(Y<zB7TJ-O8Jk1-CZ&9lrHEEFTiPyD!M5USCXDh4z_PW@8S%Pn=uiIF*y;#d!4"
    "xUiNp>5pbCAmRmHTWFVhJVV=emE?Q6zI6wKyFDiN_RC2&j3<ZLHTjK*k5iGy(tQL^v67Ttw)k8TM|E<7t{mYLTIcegfdhij+"
    "Vyh|3Y4?Ah_{fIo;)ZsR0qF&K6cZ#ZgDtAH7z(AVMI)@^V?KhMh_2G$|bt7xk)(1>L8}Vw2?v%@co3Oe8KPU%IppFA8o-4*x"
    "XuJLp9$rloE>aNF-8K8Dv40l8oVcN<-k5!VFuVO<)_R`Kk~sZZ0?Pt|uV9$4Xv{T~*pv;A;q>?ENLT@d8;Ha3E$u`i%ioP$q"
    "6quM0K4f^3=~!rg0QH-|Bj5NW$@mt5@AX49F%PY#TZGhbYe`+tVr_K@Aqo9x!oIBNXXN4pH_d^yQZkCkgsNXvwP>O!PaEcXM"
    "vzN{keW<aSpR#{Pe%#+I`4Ko<dkQVCobOxdWEjL#K!}y$DK$HX(AcYnvhIR&A<fT*Sa^e>jWlG{j%Z=NswnI5qM?b&&{#7)C"
    "TKJ@W=@P(<s$eQ|4kRJB@Qonj%9p`aMNVU>0{D@E8>obMexAXK1bLQyzzXIC+H<T>A=5ZyS(6JG>VOK?=8u++GVD}0aS?g`B"
    "pfyQUU8eCBsF4eG9B^DA1Q>gD)5(|?C-*8Sfx3~F3$1T5^p}jXrtTxNkHMk@b-<W4$_i82@2?paJPCos_=kn?6lTUjbOzb6c"
    ")%LUG&pCtMaZ@xocIE?e+XEyS*2E4KaA}TmfBPes5WMv)wJm+p78P<24n&6@cXf^|AuDwG7^t1_%P`g*)*JV22bKPMY(&efc"
    "U=f3Z`4k*Sg>vMNBFPZMo|z*m|2i=Fz5Z_t%NG}0nH1G=pCJ>DCpc;T5sTd&n*g_%D>{ma+<-7QSMACvv6piAqT6)$W}hh&X"
    "<&}m@{8-8^hzr?%E2ML4>xBH>eviNkq)#Hsm7+{*sR$g$jgh0k#0?JvI>-u7=<md`$#2?7hfZR4C59$E0K7Y-?Pd7Igi-nn4"
    "yZvA_jBbq!E2XT|UMX*Ssc{Py_3pG%R<*2YZl1>Vc0aY%la&|0>a{EHZ6#I9YTD%gt9cdT=d1kjdmeXJdHs?{P3T{)Bq)0>K"
    "{?Pq5*7lK=k?FZb2~sr>KPjT;p-2FN5@BR<pBZv<j{RJf&Rc&N@3r~uV>Q93p9y8?TU??HXHV-P7n{XoIZdd4Fs45`=dM;K|"
    "G8ywzq8RnW9qVk6MfWvSO0!_nax>2cpqpF=@Y$La|nxJ!?g*esk&%AqI2lwcO)dVv%Vv!JvwjO>RK>;K;t#rD^r~3d`xJ_B9"
    "7!V-@AsiQHThw3_Wj!bfgaT+aekIJVEDD?xtWxDKQS)U%o32M`TK?zV?HZjO?^!pS-so(&F4JRr2GK5VU3zZ__NAppH2$t;d"
    "00s~?#Rx`(rjqhN$r^k^%)khk*K`ve(%1wk+pj^!IV~KZSuRT0rlhT})LGk33ICrh+S$eJ)*1!V>O-k>6m@Gls9CJ|0p67m1"
    "#lX!rb3c~hmOwz98&=$!!<LWxWIyHuy%XGD4y-pf^9v6O6#AvI3v1L=ii}kKPKMoHwDd5fLxq0gb7*dA9`w)A*Z#<tl+`yk4"
    "8u%~A8bejJT0`D7GaY}UixPvAZi)mSL2i>1sZOv??8mg5+U6v*17|O@11-(JUlu%!LNHLoJh>@@fb`-f)6E2RIlhPXXNq+5V"
    "#N?J)q)m<>BEDZ7&G8V*ccuzHFY!GktFMj7O8a(j~np#*(41(I{rxeYlsfYGSk+E#kKO)H>9-oA}k`v0v4Q!f@wwNJY|E!~e"
    "4W@r~Ad!)*oSmDAQ@N>qCkhTmMwxE_SRbQyWI522Lw1r!)bX%bft+zIo<9E#_!)ZzUghg#w+KVQDua$apIlrj!i;H|!n7K0W"
    "N7i6G8kc7QFJ+Aw6ETN%P-ELUQa?p-m&tyr+hy+tFu`p4@5AW~+HQI=Net-O9Sx!HTf6PQt4(i7w1Uw&zCSSz>HuY3!43jGU"
    "B9Y5Ib^=wQqK!SY#TOD?l09J6kCmR~6Dm5$AxWez8a1?&`igq|Z5x;>@;Knv@afe&vJhI|%n8@*kPo$NKUY?cvawLL`T|pvq"
    "mv62R#+J;Te_9V;zt~xEB7OwItOcvp^6h<fRJ4G^<sFPp4eG9g&1Y&n4%)(S~+{HC2zsISgy`1r4pI<RRUQV)n*W?D;0cFN7"
    "72oXI^%AAk9$r@qzWZnuEDKAnr#fOeG^S*K~d>K)~|X5Ao!03(Y2ZHd*gSX|^@OB*^-Ciw8%Hw@|K!T$|pb1%6L$X+#OPIEy"
    "%p*cMv6qjUPUT$^2+Kehvm+AUghOu;)zokF?z&{v~MbYdv*&OD(dyDh`>ERT4x<WQ4@Uk+CU0y9k9lV$l@kR!Ays$(1J<<0o"
    "Ha%Z8{SMl9a8l6Eh)jm@Vum3`;Ud=4^jla|spy?zbwM=Tc-@=Y6EspsvihH2H(GFM}`-%bb7rX4Q+kq@;Gwj^*wqxgPBwln)"
    "Q7TuJ3Ohi}&!%l+Qc3&&%G6Y6^yp0h<IYA!xfOY<z8z)`fW|$S0Y7q*t^8bXbnKB=CxKGV|Dvvu7!FfsFb6D2SI)A+be6T5l"
    "nKb3^RonH_x*Va4`J+YZj$b=9TiJAMJcCk7{ue@4ZP(aOKC>Qqni)DgC^QI7qJh#6mxw?-uhQgYG_-qg9G6};(d)q23=v0<|"
    "o{b=#=R=yRG7*r0R5xlsp6b6Hx08Pbr+@Ra~@Pmaix|mo^6;X%D&0giicXq~Q4nl9U1cBvHF-`NIR+5hCEGqp!p44w|C(9QL"
    "aWul)s-14@<!rDQ0J#bPD%*P#oSX>B>NTb~7oYH`!bN%6xUdbhy~P(a}%5O-23TH!Y_@Hed9wdYKz3e)#MOfXg{hJZUhBdCj"
    "Zt2Eh)kx&8X)>dJ@O!&i9nb)K#agO^!Jx!xvh=pzgzs+z(%^K>hW#y1HyVP1(=b|)LAE`!4XW1y2MxXjcwY)h8E!eR_(2!%z"
    "_6*CMuGf|ZLbX-z;lWK0Dm&k5+Ow;MjpSBJY=zxc$A<2$8n@DKKy87D{;y4m)cn-YK-pIeMOE3B&}d2SMHs~fdDE`^2w0_s1"
    "Cv9}5#tU!oLyXqJd%~{{NW@U%CGvSbq$_E3Ym(!OP}LG*-Wy~jg9|#LMeUovnfk@o`+YYlkmSzK7K%<1bATLRd=F+9RV-Wk^"
    "HcfqmXp)SQ9n_{QO)HEgqA6k@fl8-R`SU88<4s@2j0IDA;Wxj*-@4IB{!Sk}O^+p7Qk@rhx=yqh-QA&U%6ydwW(cccLYvP-Q"
    "mE;r3Cf{<5cKdT5|eF6#l?l{PnDErUYe2URvw+v+4LV^QUV%-+?(ZJehrC{YN1EI-Fb7}Ez5Gf<_{!1*D$fz{y5rsy8m?$`)"
    "&b}hn9<LiW`ORD)jLhY2Q2mtqd7=Byc(%=2!@lcCxE$n%7yEBI>wq42{%2`EJE`j)cMOzUv0Aj2^tp4%S(TAhAfp!5{sfp0H"
    "XqW8bWqoF`BpxvcimJ*^FEl;$q%RpzZhnv>V7AG0&+XjOU|WhfwX`YEyppE%(3Gn=KrpO`R4Y4m&ynQuc!zEirg7-C6t;OV="
    "K25hxkL*&J~9+XpFe;6>^I%`{*A+6MdJOxFbLSUWaKFCX+Bzs?)cvp{n^Do_v%&si>i>LXLtAKolD=mNh^t1des9*%&uMUd2"
    "jDQU9opb7{7}S%6_@A^YGHsA4Ye3d#IN%Vl7ctS*EuYf&?#~X=9!WS~F`ecdnpcRA5=>sg9$n5RGD4lv}iFH7``@K(s9pZP!"
    "0!jt)tCfwv712j?=m5vdMt>yUpk{D-+3#>2_I=0W$_>=}MqH@`>LT4qj6iw515hvEW1PpW}m@h4%?hJ__Dj70)l@b4mUzA!t"
    "BFfrmW#zJ)QlfHEdS|J6RiYHDslsk0cKq2~iu4*J$*T>scx7FB=lVU_4aA8`&Wzas3uW^vVrFj_BLx;N~C2L-)(<c#HcZb{V"
    "eeuUR8G?C%J2x(HAE^6S@+YSYGxW&k5ZY@L?+y>-?QM<nitmG-({-H33(L4z=jx8~sy>xoTlC=^?+vZ>4s5hlFVM<_c6z%XY"
    "OdNM0rLu8qo^DlI0~h*jSb^PdP-VJc-2!UpaW)=%T}(9jrO^g&K~#?48Ac6^yw^f0gFlU#2DB_5h54@EBZ?J%E#OpOV`5!8L"
    "HhXGi<HW_@Y9s7JWcol201nB$qMZ9l+AeUtf|!Fej8ydQQ?A$SHjL02B4)bG1M$FICMl0pbu(Xk~PAKl09c=Xi(NN<uMGzV)"
    "eqdK*xlFOMn6GWUk`hUz9J2;-RdB}vPd%5-O{+vowLoPqKXW$i(JAmFDj_T}^DW?yV=c?qbnAsRE{97VF%$U@D#ebg&F4<fh"
    "Cep>N#dnR?qm(4USBRzUX%zuHO(#3EO7zn3;eyaxTutEBR9L9mq8lP0t*NSv7oq^XZrek3-Y$N<!WwRT!ZXE~d@{I$dr*Po&"
    "waWWj=%^L#anS!x7xMnDS+)*_?eHhiRq*QAIXpRGGaKwL@IQ87uZH!6BWH$D*X*FtKhr4b(?w@A1j_(F&`}~D)bD^jp$3TK$"
    ");QLZlN(=7&FJx49Npu-)(IUAVb%Xmv0dmfrA;HmUSEB3&1dnUFEF*@KCvy{X56oZyjwp3&?Jy$uuj3F#)+=9sJdz%GAf~Q)"
    "g81K%@s=YP%DrCSR{^9I9ooW)L@M87((h3`Wy02kI6tmPE#41e)&z&%fzlr1?QzX1;I}Gy~E%!u*7o1TcuMzS>Iq7+rm}?6%"
    "s@kl5*b5t`>}D^ZiShM}jbxOIw>k^sNqfQMIZ)On8PW&Rd%(uRDqK3+ITT3EnhkcA^Z3s4xsTNDDGk3cFfMII*Ts?Xv5=jfW"
    "RV_~5|KWpqhXPpdhV+7CL_wfjraaLSC{FNrUa6Vn3_!vCrcK+V!ZFdp`LJnb}^xKc%T{?q>GMFHxyar|M(<!8>Oi0sCCn4Lp"
    "=qx1*K7Ia(njK~sg&;$jB|^iAER)(#sC1r8DTbj|2L~A5W)c#mVHg1;-Zch&GrSJ{8M&()3dGj0=kDKcJy0TKloClWJ+Bt`T"
    "pf4)_7idd>DVrxwQIX8--C;^`gVh<m{>QFFf2;b=N-4N5uc)<F5*$o#$i*xLAr!0vAV^OKI*bQNZHZ6=cmfOTt&c2o4)MyS("
    "jV&jp(l5l|dIsvriWC)(_>9-KGa6dUV+uHu5Yi{UVg^34>xkhTZMVEnvMo-`(6n51Z~m78d<DETCAn8Sn4+`1=+`M}Hb?MCE"
    "$@(Zatl`fpx|@C$$B^F5?lI5uvD3Iq8@h0YAWuqZ#gGFSWx^br*^g(m3FN5A}fatc)U`px0nqwjzC@!fy@`S|^ZkDq?}d~*8"
    "bFMs{{m%qis(O6tuUM0VMom{8c^dEUq&Tek+?tkz0ws&@4?0x(4yUk7*Y2hFp!N#z+TTNmV@%0#ZVD#{DqTJbFp`T4QH&LwO"
    "heSQZVY<J+4MXjw8#~^sSGy1S{{AjT8OS$!FCbz2A=%&G1AxiK-j1Juvhe`~u7e^Rg?qbw`JSLp1-|1~;LA<3<7y$qUTbpJo"
    "?Nsik5IY*PDT9;VeUiO&+2f|YY3_8l9k>))IHTmlAyk)H5kGQ-P`q}T3k0iwH^yK>Xk)r83ba=KD(Tgci#4ixRfFZnr1mn<X"
    "v*{K2DSAY$Ah?(y2Y$FP4C2{|-$8iMOceq7KhEk~M<ZT}Yw1)CdBf7dhp)!tnQQ2-&89rNIatEl(4hF&lFkDeNpgCm&B(irX"
    "(<Y;2Su@Z<CLi)yIR?Onc{X))Ns%!tSFqzO>n(-TJ{pX(hOF!6Vg(Nw<s35MZNukccYu?`mz7Aj&#i5dDWgExh5ZK|y>Q!EA"
    "!1~Q166i20_AdLw;Z^}{Wz4YW&lI11#Fi7OKR2*?lmz&$?&$nOfZQ|q3xpKVP%s028gMxchqAicr=@^%4Le|}V9nD$Bn5qlZ"
    "73J%>hOvzz#S8Iq1bv*SK6cLj`}Nk};;rAiTgbT1JC{J~V&tOhm2I;=y%M=_Zt+jT604j-2UmPND$!_@q-5*i=!3Ac1b_O=l"
    "A@ppInXqSuUo(S4m9sO&o-aIpUyL%zI+ot`_s|g6l7e7qyPd={gYps@kMCv>Gf`qq{ypRu_i@MddnYeZhG30?U7R1lS&m&Dh"
    "1Pt+&V_~orZ2K+4t^4hWtGb-HiDA-b3L}bX158gpR%4jg5&?J^aE>LDOxBJQt@slsp%wyM^O|A~cu=#s)Z0yRCC=eTb}PZ$t"
    "%pp^ILb9s)XG2rE{!7%DHJN?#zKDb_NSZ7&>=q3chb&i`_XY?hD2`*=EqdB$6yO0e3xPSW5v3SIYq0D=VFtp"
)
DROPZONE_CSS = (
    "c-o~`-EONm5WYW8fld`EsX_`#NV=ev&I9b;th5(<>A*m&0!FrJ)1tiljtv1rAwN2bBH1v^?>C>vzuw?8<|G4Q6+{S{C$>CtR"
    "wl>FnN_SHA(fxL6G%>S5i_3odX*9h|IN2faax==&TP3igxzsrXK|M7mPWf)dH&V8B~luJP4h?mxx*LJL{X*!l>Sawgd~NzyE"
    "waJk5~9&JuZJ<MVu91EQe*gvYx90JK2JMVSfDs;}LKhpLDXT=*tdM8orT33RPHg!MI;AnoHmlQmC|%iy$UtDyQVs4x<z#F<h"
    "Dy>C}ERU)7%bZgH{%!?IXBIgq)tRKL~hB4{GxB%-D8z2X#PG`EjHlcV%q533UtB#KlL*0||AEF|F)BGZ>DqM}I2r=O!tUpnF"
    ">v5)K>c;gj*|CxfX{hAW(>ApZ@<#pmc0SPB*lawa8AA-t6kP)8H+}}WEIpZJc^`VrK<yFX1%p%Q?z^M#kmdke2&v3v>nbI8E"
    "*9Q{5CD?>{<U5wrq*W)O&EL>|!Qq|4M}<*JidbwMm#pa3z)>}5!f<!EzGRr@$^-k5vhXb^n4prf+~<J(Lf>KBm|y4r3!5{7l"
    "Ttq6m0HF$h09*QqnS#w5vp>4a63`(!F<o30ATqPMbQvgeeB#c6oDi(6&)u`f2)0Jb7}bY6vy$MpY?2Nf~a%Zn73AIVb!6IE7"
    "WTa8Rm8bf&=83&`=0d90R_)H7cu1dec->OKmWMka41&#@K-?Z?7TXku3LQFUVOtfx+zGW7dsia?KwLjp`2?$)m#E3^9E&w=K"
    "<JtGbYxx!GWDG}b#_nstaL2V{^^LV%rv&ZH2_sa`Wf(QBo@s+$Yh9XTNL2ex-p!2PC6p*Y9Gsrool3AVuW0G9cKlj1=QO^r}"
    "PZXnt=lDhW1<>lYe_>kt;j<dY{QR-1Iawg}sD~raLp%vXL1>soq-%wsdSS{m}efW^3v=CGT?UN&oBFG=Kpj}?x4}-hYy&aO<"
    "#yBJ$Yqf>!X6tGCv1pc5=q@%4wtUIwuQ&?@-zOKxyH>iIlsiTrVcwu=Grhj_klyqd=ldb@Knc2t?qD&U^D+$a1h$N|jh*;bk"
    "sNhtH#Wiw%L5JV1AI~7^VNQ@sKniSOLs9Gey1$~=d4b<Ue#8*ar0h#m#Owj63jTRK+kZaITdVp#~u>(sn8MYrK+Cem=nhJ8B"
    "SBHW;8{J_IlsW54PsU`pHD)dt|Cq=}&NRXVjK>Pwt9b2`ccX`k-zQ>TNrKdUu|P^^z$M5Dm>6mT=q;?-WglX?pWS*RwXuiWD"
    "S_t8{{~L18N_AYvLNn)do0FZ%jBH132&^O)v%nAF#uD<v3-*qrf#F__%~l;X8}E)A~1D(h}ot<k4n-awb@%>v#W?6U_b=MuE"
    "ults!&G#mhjuI^hhbb@Zco|(1OudUUlt)z{!{w<<>fP4n`q#MZA9~lQnUrAT(L4ipr+4*K0Hd@BO(L+y%`T9((Gizk};5s{J"
    "H%Rttckpb@d*sR+pYX=|X(IyjLOFpXccb*z<mNh82ew}1K8Z1Iy!B!Dc-8y)GiWdRdKBEX4KRpMo7#<yL2V8+w#G#U0CXmzv"
    "UiuDc1VTiA1}{OsI256{7s4iGx_g7fBlKskuUAlITT`*k-~a@`SCvscdB*"
)
FAVICON_PNG = (
    "c-rd>@N?(olHy`uVBq!ia0vp^3LwnE1|*BCs=ffJa!(h>kcwMxuRC%bP~c%XuxEk(w>R5w&tAbIo$8x)vq8Pnx<gJW=<3u@Z"
    "#TMVuP+dND0@#~(IM_f5f1Sz0uBs}EPvz;qNDQ|WdCtp;M>|3?RdFC@X#f0#t6BGWe$7y16c}HtUteo)v+?p;eO=4*`H_m#K"
    "%9GS1*V%d;Fc{JkSXYp00i_>zopr08%$V&;"
)
# <<< vendored assets

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pyfiledrop</title>
<link rel="icon" type="image/png" href="/favicon.ico">
<link rel="stylesheet" href="{{dropzone_css}}">
<script src="{{dropzone_js}}"></script>
<script id="pyfiledrop-config" type="application/json">{{config_json}}</script>
<style>
  :root { --accent: #0e7c86; --bad: #b3261e; --fg: #1b1f23; --muted: #5f6b76; --line: #d6dde3; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
         background: #f6f8fa; }
  main { max-width: 820px; margin: 0 auto; padding: 16px; }
  h1 { font-size: 1.4rem; margin: 8px 0 4px; }
  h2 { font-size: 1.15rem; margin: 24px 0 8px; display: flex; align-items: center; gap: 12px; }
  .hint { color: var(--muted); margin: 0 0 12px; font-size: .95rem; }
  #dropper.dropzone { min-height: 180px; border: 3px dashed var(--accent); border-radius: 14px; background: #fff;
         padding: 12px; cursor: pointer; }
  #dropper.dropzone:focus-visible { outline: 4px solid #ffbf47; outline-offset: 2px; }
  #dropper.dz-drag-hover { background: #e6f4f5; }
  #dropper .dz-message { margin: 2.2em 0; font-size: 1.15rem; text-align: center; }
  #dropper.dz-started .dz-message { display: block; margin: .6em 0 1em; }  /* still the tap target for more */
  #dropper .dz-message button { font: inherit; border: 0; background: none; color: var(--accent); padding: 0; }
  #dropper .dz-message strong { display: block; font-size: 1.3rem; }
  #dropper .dz-preview { display: block; margin: 8px 0; min-height: 0; width: auto; }
  #dropper .dz-preview.dz-image-preview { background: none; }
  .pf-file { border: 1px solid var(--line); border-radius: 10px; padding: 10px 12px; background: #fbfcfd;
         cursor: default; }
  .pf-row { display: flex; justify-content: space-between; gap: 12px; flex-wrap: wrap; }
  .pf-name { font-weight: 600; overflow-wrap: anywhere; min-width: 0; }
  .pf-meta { color: var(--muted); font-size: .9rem; font-variant-numeric: tabular-nums; }
  .pf-bar { height: 8px; border-radius: 4px; background: #e4e9ee; overflow: hidden; margin: 8px 0 4px; }
  .pf-bar > span { display: block; height: 100%; width: 0; background: var(--accent); }
  .dz-success .pf-bar > span { background: #2e7d32; }
  .dz-error .pf-file { border-color: var(--bad); background: #fdf3f2; }
  .dz-error .pf-bar > span { background: var(--bad); }
  .pf-error { color: var(--bad); font-weight: 600; }
  .pf-error:empty { display: none; }
  #overall { min-height: 1.5em; color: var(--muted); margin: 8px 0 0; font-variant-numeric: tabular-nums; }
  #uploaded { list-style: none; padding: 0; margin: 0; }
  #uploaded li { padding: 8px 0; border-bottom: 1px solid var(--line); display: flex; gap: 8px;
         justify-content: space-between; flex-wrap: wrap; }
  #uploaded li .pf-name { font-weight: 400; }
  #uploaded li.pf-gone .pf-name { text-decoration: line-through; color: var(--muted); }
  #uploaded a { color: var(--accent); }
  button.pf-clear { font: inherit; font-size: .9rem; padding: 6px 14px; border-radius: 8px;
         border: 1px solid var(--line); background: #fff; cursor: pointer; min-height: 40px; }
  .pf-empty { color: var(--muted); }
  footer { color: var(--muted); font-size: .8rem; margin: 32px 0 8px; }
</style>
</head>
<body>
<main>
  <h1>pyfiledrop</h1>
  <h2 id="upload-heading">Upload new files</h2>
  <p class="hint" id="limits"></p>
  <div id="dropper" class="dropzone" role="button" tabindex="0" aria-labelledby="upload-heading"
       aria-describedby="drop-instructions">
    <div class="dz-message" id="drop-instructions"><strong>Drop files here</strong>or click / tap here to choose
      files</div>
  </div>
  <p id="overall" role="status" aria-live="polite"></p>
  <h2>Uploaded <button type="button" class="pf-clear" id="clear">Clear</button></h2>
  <ul id="uploaded" aria-live="polite"></ul>
  <p class="pf-empty" id="uploaded-empty">Nothing uploaded from this browser yet.</p>
  <footer>pyfiledrop {{version}}</footer>
</main>
<template id="preview-template">
  <div class="dz-preview dz-file-preview">
    <div class="pf-file">
      <div class="pf-row"><span class="pf-name" data-dz-name></span><span class="pf-meta pf-size"></span></div>
      <div class="pf-bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="0"><span
        data-dz-uploadprogress></span></div>
      <div class="pf-row"><span class="pf-meta pf-status">Waiting…</span><span class="pf-meta pf-eta"></span></div>
      <div class="pf-error" data-dz-errormessage role="alert"></div>
    </div>
  </div>
</template>
<script>
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("pyfiledrop-config").textContent);
  var STORE_KEY = "pyfiledrop.uploaded.v1";
  var listEl = document.getElementById("uploaded");
  var emptyEl = document.getElementById("uploaded-empty");
  var overallEl = document.getElementById("overall");

  function human(bytes) {
    var units = ["B", "KB", "MB", "GB", "TB"], i = 0;
    while (bytes >= 1000 && i < units.length - 1) { bytes /= 1000; i++; }
    return (i === 0 ? bytes : bytes.toFixed(bytes < 10 ? 1 : 0)) + " " + units[i];
  }
  function duration(seconds) {
    if (!isFinite(seconds) || seconds < 0) return "";
    seconds = Math.round(seconds);
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
  }

  document.getElementById("limits").textContent =
    "Up to " + human(cfg.maxFileSizeBytes) + " per file." +
    (cfg.allowDownloads ? " Uploaded files can be downloaded again from this page." : "");

  // ---- the "Uploaded" list: what the server confirmed, kept in this browser (per server) ----
  function loadEntries() {
    try { var v = JSON.parse(localStorage.getItem(STORE_KEY) || "[]"); return Array.isArray(v) ? v : []; }
    catch (e) { return []; }
  }
  function saveEntries(entries) {
    try { localStorage.setItem(STORE_KEY, JSON.stringify(entries.slice(-500))); } catch (e) { /* private mode */ }
  }
  function renderEntry(entry) {
    var li = document.createElement("li");
    li.dataset.id = entry.id;
    var name;
    if (cfg.allowDownloads) {
      name = document.createElement("a");
      name.href = "/download/" + encodeURIComponent(entry.id);
      name.setAttribute("download", entry.name);
    } else {
      name = document.createElement("span");
    }
    name.className = "pf-name";
    name.textContent = entry.name;
    var meta = document.createElement("span");
    meta.className = "pf-meta";
    meta.textContent = human(entry.size);
    li.appendChild(name);
    li.appendChild(meta);
    return li;
  }
  function renderList() {
    var entries = loadEntries();
    listEl.textContent = "";
    entries.slice().reverse().forEach(function (e) { listEl.appendChild(renderEntry(e)); });
    emptyEl.hidden = entries.length > 0;
    return entries;
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
    if (link) { link.removeAttribute("href"); }
  }
  function checkEntries(entries) {
    entries.forEach(function (e) {
      fetch("/api/uploads/" + encodeURIComponent(e.id), { cache: "no-store" }).then(function (r) {
        if (r.status === 404) { markGone(e.id); return null; }
        return r.ok ? r.json() : null;
      }).then(function (info) {
        if (info && info.complete && !info.available) markGone(e.id);
      }).catch(function () {});
    });
  }
  function addEntry(result) {
    var entries = loadEntries().filter(function (e) { return e.id !== result.id; });
    entries.push({ id: result.id, name: result.name, size: result.size, sha256: result.sha256, at: Date.now() });
    saveEntries(entries);
    renderList();
  }
  document.getElementById("clear").addEventListener("click", function () {
    saveEntries([]);
    renderList();
  });
  checkEntries(renderList());

  // ---- Dropzone ----
  Dropzone.autoDiscover = false;
  var template = document.getElementById("preview-template").innerHTML;
  var dz = new Dropzone("#dropper", {
    url: "/upload",
    paramName: "file",
    chunking: true,
    forceChunking: cfg.forceChunking,
    chunkSize: cfg.chunkSize,
    parallelChunkUploads: cfg.parallelChunks > 1 ? cfg.parallelChunks : false,
    parallelUploads: cfg.parallelFiles,
    retryChunks: true,
    retryChunksLimit: 3,
    timeout: cfg.timeoutMs,
    maxFilesize: null,  // checked to the byte in accept, with a message in the units the page shows
    accept: function (file, done) {
      if (file.size <= cfg.maxFileSizeBytes) return done();
      var size = human(file.size), limit = human(cfg.maxFileSizeBytes);
      if (size === limit) { size = file.size + " bytes"; limit = cfg.maxFileSizeBytes + " bytes"; }
      done("Too large: " + size + ". This server accepts up to " + limit + " per file.");
    },
    createImageThumbnails: false,
    previewTemplate: template,
    dictResponseError: "The server answered {{statusCode}}.",
    // Chunks of one file may finish in any order, so the last response to arrive is not always the one that
    // completed the file: ask the server what it stored.
    chunksUploaded: function (file, done) {
      fetch("/api/uploads/" + encodeURIComponent(file.upload.uuid), { cache: "no-store" })
        .then(function (r) { return r.ok ? r.json() : r.text().then(function (t) { throw new Error(t); }); })
        .then(function (info) {
          if (!info.complete) throw new Error("The server has not stored this file.");
          file.pfResult = info;
          done();
        })
        .catch(function (err) { dz._errorProcessing([file], String(err.message || err)); });
    }
  });

  // A refusal (400, 413, ...) gets the same answer every time: fail at once instead of sending the chunk
  // again retryChunksLimit times. Timeouts, dropped connections, 408, 409, 429 and 5xx are still retried.
  var handleUploadError = dz._handleUploadError;
  if (typeof handleUploadError === "function") {
    dz._handleUploadError = function (files, xhr, response) {
      var status = xhr ? xhr.status : 0;
      if (status >= 400 && status < 500 && [408, 409, 429].indexOf(status) < 0 && files[0].upload.chunked) {
        var chunk = dz._getChunk(files[0], xhr);
        if (chunk) chunk.retries = Infinity;
      }
      return handleUploadError.call(this, files, xhr, response);
    };
  }

  function previewPart(file, selector) { return file.previewElement && file.previewElement.querySelector(selector); }

  var batch = { bytes: 0, files: 0, done: 0, failed: 0, started: 0 };
  function updateOverall() {
    var active = dz.files.filter(function (f) { return f.status === Dropzone.UPLOADING || f.status === Dropzone.QUEUED; });
    if (!active.length && !batch.files) { overallEl.textContent = ""; return; }
    var sent = 0, total = 0;
    dz.files.forEach(function (f) {
      if (f.pfBatch !== batch.id) return;
      total += f.size;
      sent += f.status === Dropzone.SUCCESS ? f.size : ((f.upload && f.upload.bytesSent) || 0);
    });
    var elapsed = (Date.now() - batch.started) / 1000;
    var speed = elapsed > 0.5 ? sent / elapsed : 0;
    var text = batch.done + " of " + batch.files + (batch.files === 1 ? " file" : " files") + " uploaded";
    if (batch.failed) text += ", " + batch.failed + " failed";
    if (active.length) {
      text += " · " + human(sent) + " of " + human(total);
      if (speed > 0) text += " · " + human(speed) + "/s · " + duration((total - sent) / speed) + " left";
    }
    overallEl.textContent = text;
  }

  dz.on("addedfile", function (file) {
    if (!dz.getActiveFiles().some(function (f) { return f !== file && f.pfBatch === batch.id; }) &&
        batch.done + batch.failed >= batch.files) {
      batch = { id: Date.now() + Math.random(), bytes: 0, files: 0, done: 0, failed: 0, started: Date.now() };
    }
    file.pfBatch = batch.id;
    batch.files += 1;
    var size = previewPart(file, ".pf-size");
    if (size) size.textContent = human(file.size);  // the units of the "Uploaded" list, as text
    updateOverall();
  });
  // The timeout is for a request that makes no progress, not for one that takes long: chunks in flight
  // share the link, so on a slow one (or with two files at once) a healthy chunk may need longer than the
  // timeout in all. Each byte sent or received re-arms the watchdog; a stalled request is retried.
  function watchdog(xhr) {
    if (!xhr || !cfg.timeoutMs || xhr.pfWatched) return;
    xhr.pfWatched = true;
    xhr.timeout = 0;
    var timer = null;
    function arm() {
      clearTimeout(timer);
      timer = setTimeout(function () {
        if (xhr.readyState === 4) return;
        var onTimeout = xhr.ontimeout;
        xhr.abort();
        if (onTimeout) onTimeout.call(xhr);
      }, cfg.timeoutMs);
    }
    ["progress", "load"].forEach(function (type) { xhr.upload.addEventListener(type, arm); });
    xhr.addEventListener("progress", arm);
    xhr.addEventListener("loadend", function () { clearTimeout(timer); });
    arm();
  }

  dz.on("sending", function (file, xhr) {
    watchdog(xhr);
    if (!file.pfStarted) file.pfStarted = Date.now();
    var status = previewPart(file, ".pf-status");
    if (status && status.textContent === "Waiting…") status.textContent = "Uploading…";
  });
  dz.on("uploadprogress", function (file, progress, bytesSent) {
    var bar = previewPart(file, ".pf-bar");
    if (bar) bar.setAttribute("aria-valuenow", String(Math.floor(progress)));
    var elapsed = (Date.now() - (file.pfStarted || Date.now())) / 1000;
    var speed = elapsed > 0.3 ? bytesSent / elapsed : 0;
    var status = previewPart(file, ".pf-status");
    var eta = previewPart(file, ".pf-eta");
    if (status) status.textContent = Math.floor(progress) + "% · " + human(bytesSent) + (speed ? " · " + human(speed) + "/s" : "");
    if (eta) eta.textContent = speed ? duration((file.size - bytesSent) / speed) + " left" : "";
    updateOverall();
  });
  dz.on("success", function (file, response) {
    var result = file.pfResult || (response && response.files ? response.files[0] : response);
    if (result && result.id) addEntry(result);
    var status = previewPart(file, ".pf-status");
    if (status) {
      status.textContent = result && result.name && result.name !== file.name ? "Uploaded, stored as " + result.name
        : "Uploaded";
    }
    var eta = previewPart(file, ".pf-eta");
    if (eta) eta.textContent = "";
    var bar = previewPart(file, ".pf-bar > span");
    if (bar) bar.style.width = "100%";
    batch.done += 1;
    updateOverall();
  });
  dz.on("error", function (file, message) {
    if (file.pfFailed) return;
    file.pfFailed = true;
    var text = typeof message === "string" ? message : (message && message.error) || "Upload failed.";
    var box = previewPart(file, "[data-dz-errormessage]");
    if (box) box.textContent = text.trim();
    var status = previewPart(file, ".pf-status");
    if (status) status.textContent = "Failed";
    var eta = previewPart(file, ".pf-eta");
    if (eta) eta.textContent = "";
    batch.failed += 1;
    updateOverall();
  });
  var dropper = document.getElementById("dropper");
  dropper.addEventListener("keydown", function (event) {
    if ((event.key === "Enter" || event.key === " ") && event.target === dropper) {
      event.preventDefault();
      dz.hiddenFileInput.click();
    }
  });
  window.pyfiledrop = { dropzone: dz };
})();
</script>
</body>
</html>
"""


if __name__ == "__main__":
    sys.exit(main())
