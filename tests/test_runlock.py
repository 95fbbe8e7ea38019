"""One command at a time in a run directory, between real processes: a second `copa` command
on a busy run directory exits 2 naming the holder and writes nothing; `--wait` waits; a holder
killed by SIGKILL never blocks the next (the OS drops its lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, write_tiny_recipe

from copa.runs import HOLDER_NAME, LOCK_NAME, RunDirBusy, describe_holder, lock_run_dir

# A process that takes the run directory's lock, says so, and sleeps (or exits after a while).
HOLD = """\
import sys, time
from pathlib import Path
from copa.runs import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]), command="holder-of-the-lock")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO),
                                                         os.environ.get("PYTHONPATH", "")])}


def _hold(directory: Path, seconds: float) -> subprocess.Popen[str]:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), str(seconds)],
                              stdout=subprocess.PIPE, text=True, env=_env())
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(directory.rglob("*"))}


@pytest.mark.parametrize("command", ["run", "render"])
def test_a_second_command_exits_2_naming_the_holder_and_writes_nothing(
        tmp_path: Path, tiny_model_dir: Path, command: str) -> None:
    run_dir = tmp_path / "run"
    recipe = write_tiny_recipe(tmp_path, tiny_model_dir)
    holder = _hold(run_dir, 120)
    try:
        before = _snapshot(run_dir)
        second = subprocess.run(
            [sys.executable, "-m", "copa.cli", command, str(recipe), "--set",
             f"run_dir={run_dir}"], capture_output=True, text=True, env=_env(), timeout=300)
        assert second.returncode == 2, second.stdout + second.stderr
        message = second.stderr.strip()
        assert len(message.splitlines()) == 1, message
        assert f"in use by pid {holder.pid} on " in message
        assert "holder-of-the-lock" in message
        assert "--wait" in message
        assert _snapshot(run_dir) == before  # no manifest, no rendered/: nothing half-written
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_does_not_block_the_next(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _hold(run_dir, 120)
    with pytest.raises(RunDirBusy, match=f"pid {holder.pid}"):
        lock_run_dir(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # its holder info is left behind, but names a dead process: not believed
    assert (run_dir / HOLDER_NAME).is_file()
    assert describe_holder(run_dir) == "another process"
    start = time.monotonic()
    lock = lock_run_dir(run_dir, command="next")
    try:
        assert time.monotonic() - start < 5
        assert f'"pid": {os.getpid()}' in (run_dir / HOLDER_NAME).read_text()
    finally:
        lock.release()


def test_wait_waits_for_the_holder_to_finish(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    holder = _hold(run_dir, 3)
    start = time.monotonic()
    messages: list[str] = []
    try:
        lock = lock_run_dir(run_dir, wait=True, emit=messages.append)
        assert time.monotonic() - start > 2  # got it only as the holder ended, seconds later
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.wait()
    try:
        assert len(messages) == 1
        assert f"waiting for {run_dir}: in use by pid {holder.pid}" in messages[0]
    finally:
        lock.release()


def test_releasing_removes_the_holder_info(tmp_path: Path) -> None:
    from copa.runs import run_dir_locked

    with run_dir_locked(tmp_path / "run"):
        assert (tmp_path / "run" / HOLDER_NAME).is_file()
    assert not (tmp_path / "run" / HOLDER_NAME).exists()
    assert (tmp_path / "run" / LOCK_NAME).exists()
