"""fcos_jax.training.workdir_lock: one holder per workdir; a lock left by a dead run is taken over.

Holders are real processes (this one, a child that is SIGKILLed) or records written by hand for
the cases a test cannot stage (a reused pid, another host).
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fcos_jax.training import workdir_lock
from fcos_jax.training.workdir_lock import WorkdirBusyError, WorkdirLock

HOLD = (
    "import sys, time; from fcos_jax.training.workdir_lock import WorkdirLock; "
    "WorkdirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


def write_record(workdir, age_s=0.0, **record):
    path = workdir / workdir_lock.LOCK_NAME
    path.write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00", **record}))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_second_holder_is_refused_naming_the_first_and_release_frees_it(tmp_path):
    first = WorkdirLock(tmp_path)
    first.acquire()
    record = json.loads((tmp_path / "train.lock").read_text())
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    with pytest.raises(WorkdirBusyError) as info:
        WorkdirLock(tmp_path).acquire()  # flock is per open file: refused in one process too
    message = str(info.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
    assert record["started"] in message and "\n" not in message
    first.release()
    assert not (tmp_path / "train.lock").exists()
    second = WorkdirLock(tmp_path)
    second.acquire()
    second.release()


def test_the_lock_of_a_sigkilled_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid} on host"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "train.lock").exists()  # left behind
    lock = WorkdirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert f"taking over the lock left by pid {holder.pid}" in caplog.text
    assert json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_record_of_this_host_stands_while_its_process_lives(tmp_path, caplog):
    """Judged without flock (the record alone, as on a file system without locks): a live pid
    with its own start time holds; a dead pid or a pid started at another time does not."""
    parent, host = os.getppid(), socket.gethostname()
    write_record(tmp_path, host=host, pid=parent, pid_start=workdir_lock._pid_start(parent))
    with pytest.raises(WorkdirBusyError, match=f"pid {parent} on host {host}"):
        WorkdirLock(tmp_path).acquire()
    for stale in (dict(pid=dead_pid()), dict(pid=parent, pid_start=-1)):  # gone; reused pid
        write_record(tmp_path, host=host, **stale)
        lock = WorkdirLock(tmp_path)
        with caplog.at_level(logging.WARNING):
            lock.acquire()
        assert f"left by pid {stale['pid']} on host {host}" in caplog.text
        lock.release()
        caplog.clear()


def test_a_record_of_another_host_stands_until_its_heartbeat_is_old(tmp_path, caplog):
    write_record(tmp_path, age_s=30, host="elsewhere", pid=1)
    with pytest.raises(WorkdirBusyError, match="pid 1 on host elsewhere.*heartbeat 30 s ago"):
        WorkdirLock(tmp_path).acquire()
    write_record(tmp_path, age_s=workdir_lock.STALE_AFTER_S + 60, host="elsewhere", pid=1)
    lock = WorkdirLock(tmp_path)
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert "taking over the lock left by pid 1 on host elsewhere" in caplog.text
    lock.release()


def test_the_holder_refreshes_its_heartbeat(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    path = tmp_path / "train.lock"
    os.utime(path, (0, 0))
    deadline = time.time() + 10
    while path.stat().st_mtime == 0:
        assert time.time() < deadline, "no heartbeat"
        time.sleep(0.05)
    lock.release()
