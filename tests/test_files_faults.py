"""kill -9 while a stored file is removed (by --expire-after or DELETE): after the restart, removing it again
ends in the same state as an uninterrupted removal, and nothing else is touched."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

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
