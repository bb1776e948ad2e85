"""lego.artifacts.file_lock: one holder at a time, its pid in the file, freed when the holder dies."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lego.artifacts import LockBusy, file_lock

ROOT = Path(__file__).resolve().parent.parent


def test_second_non_blocking_holder_gets_lockbusy_with_the_message(tmp_path):
    lock = tmp_path / "sub" / ".lock"  # the directory is created
    with file_lock(lock):
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(LockBusy, match="^run dir in use$"):
            with file_lock(lock, blocking=False, busy_message="run dir in use"):
                pass
        with pytest.raises(LockBusy, match="is locked by another process"):
            with file_lock(lock, blocking=False):
                pass
    with file_lock(lock, blocking=False):  # released on exit: free again
        pass
    assert lock.exists()  # stays in place, so every waiter locks the same inode


def test_contender_keeps_holder_pid_and_a_killed_holder_frees_the_lock(tmp_path):
    lock = tmp_path / ".lock"
    child = textwrap.dedent(f"""
        import sys, time
        from lego.artifacts import file_lock
        with file_lock({str(lock)!r}):
            print("held", flush=True)
            time.sleep(120)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LockBusy):
            with file_lock(lock, blocking=False):
                pass
        assert int(lock.read_text()) == holder.pid  # the refused contender did not truncate it
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    with file_lock(lock, blocking=False):  # the kernel dropped the dead holder's lock
        assert int(lock.read_text()) == os.getpid()
