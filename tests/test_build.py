"""build.py: the standalone executable (PyInstaller one-file build plus its smoke test) and the icon files."""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import build


def test_executable_names_per_platform():
    assert build.executable_name("linux") == "pyfiledrop"
    assert build.executable_name("win32") == "pyfiledrop.exe"
    assert build.executable_name("darwin") == "pyfiledrop-macos"


def test_icons_wrap_the_favicon_png(tmp_path):
    png = build._favicon_png()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    ico = build.write_icon(tmp_path, "win32").read_bytes()
    reserved, kind, count = struct.unpack("<HHH", ico[:6])
    width, height, _, _, planes, bits, size, offset = struct.unpack("<BBBBHHII", ico[6:22])
    assert (reserved, kind, count, planes, bits) == (0, 1, 1, 1, 32)
    assert (width, height) == build.png_size(png) and ico[offset:offset + size] == png
    icns = build.write_icon(tmp_path, "darwin").read_bytes()
    assert icns[:4] == b"icns" and struct.unpack(">I", icns[4:8])[0] == len(icns) and icns.endswith(png)
    assert build.write_icon(tmp_path, "linux") is None


def test_help_explains_the_options():
    result = subprocess.run([sys.executable, str(ROOT / "build.py"), "--help"], capture_output=True, text=True,
                            check=True)
    for option in ("--skip-smoke", "--smoke-only", "--vendor", "dist/pyfiledrop.exe", "pyfiledrop-macos"):
        assert option in result.stdout


def test_smoke_test_of_a_missing_executable_fails_clearly(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "build.py"), "--smoke-only", str(tmp_path / "nothing")],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "smoke test failed: no such file" in result.stderr


@pytest.mark.slow
def test_build_the_executable_and_smoke_test_it(tmp_path):
    """The whole `python build.py`: PyInstaller one-file build, then the smoke test of what it built."""
    dist, work = tmp_path / "dist", tmp_path / "work"
    result = subprocess.run([sys.executable, str(ROOT / "build.py"), "--dist", str(dist), "--work", str(work)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    executable = dist / build.executable_name()
    assert executable.is_file()
    assert f"smoke: {executable.name} passed" in result.stdout
    assert "stored in app/storage/" in result.stdout.replace("\\", "/")
    assert "smoke: --tls made a certificate, kept it for the next start" in result.stdout
    assert "took an upload over HTTPS" in result.stdout
    # the smoke test also passes on its own, on the file just built
    result = subprocess.run([sys.executable, str(ROOT / "build.py"), "--smoke-only", str(executable)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
