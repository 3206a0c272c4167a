"""One writer per training workdir: `<workdir>/train.lock`, held by process 0 for a whole run.

Two runs writing one workdir overwrite each other's checkpoints, so `train.py` takes this lock
before anything else and a second run stops with one line naming the holder (WorkdirBusyError,
an OSError: the tools print it as `error: ...` and exit with status 2).

Whether a lock is held:
  * `fcntl.flock` on the file: the kernel holds it while the process lives and drops it however
    the process ends, SIGKILL included. On one host (one kernel) that settles it.
  * The file records host, pid, the pid's start time and when the run started, and the holder
    touches it every HEARTBEAT_S seconds. A record is judged on its own where flock may not see
    the holder (a file system without working locks, or a holder on another host): a record of
    this host is stale when its pid is gone or belongs to a process started at another time (a
    reused pid); a record of another host is stale when its heartbeat is older than
    STALE_AFTER_S (the hosts' clocks must agree to within a minute). A run SIGKILLed on another
    host therefore blocks its workdir for STALE_AFTER_S, unless the file is removed by hand.
A stale lock is taken over with a warning naming the run that left it. On a file system without
locks two runs that start at the same moment can both judge a stale record and both go on.
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = "train.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
# flock is not supported here: judge by the record alone.
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


class WorkdirBusyError(OSError):
    """Another run holds the workdir's lock."""


def _pid_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22, after "pid (comm)"


def _pid_alive(pid: int, start: int | None) -> bool:
    """True when `pid` runs and, where start times are known, is the process that started at
    `start` (not a later process given the same pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    now = _pid_start(pid)
    return start is None or now is None or now == start


def describe(record: dict[str, Any] | None, heartbeat_age_s: float) -> str:
    """'pid 123 on host h (started 2026-12-06T21:00:00, heartbeat 5 s ago)'."""
    if not record:
        return "an unknown run (the lock file holds no readable record)"
    return (
        f"pid {record.get('pid')} on host {record.get('host')} (started {record.get('started')}, "
        f"heartbeat {heartbeat_age_s:.0f} s ago)"
    )


class WorkdirLock:
    """The lock file of one workdir (module docstring); `acquire`, then `release` at the end."""

    def __init__(self, workdir: str | Path) -> None:
        self.path = Path(workdir).absolute() / LOCK_NAME
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirBusyError naming the holder; a stale lock is taken
        over with a warning."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record, age = self._read(fd)
                os.close(fd)
                raise self._busy(record, age) from None
            except OSError as error:
                if error.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
            # A holder that ended between our open and flock unlinked the file we opened.
            if self.path.exists() and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        record, age = self._read(fd)
        if record is not None and not self._is_stale(record, age):
            os.close(fd)
            raise self._busy(record, age)
        if os.fstat(fd).st_size:  # a record, or an unreadable one, that no live run holds
            log.warning(
                "%s: taking over the lock left by %s: that run is gone",
                self.path,
                describe(record, age),
            )
        self._write(fd)
        self._fd = fd
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="workdir-lock")
        self._heartbeat.start()

    def release(self) -> None:
        """Removes the lock file (if it still holds this run's record) and drops the lock; a
        no-op when this process does not hold it."""
        if self._fd is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        record, _ = self._read(self._fd)
        if record and record.get("pid") == os.getpid() and record.get("host") == _host():
            self.path.unlink(missing_ok=True)
        os.close(self._fd)  # drops the flock
        self._fd = None

    # ----------------------------------------------------------------------------------------

    def _read(self, fd: int) -> tuple[dict[str, Any] | None, float]:
        """(the record or None when empty or unreadable, seconds since its last heartbeat)."""
        status = os.fstat(fd)
        data = os.pread(fd, max(status.st_size, 1), 0)
        age = time.time() - status.st_mtime
        try:
            record = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return None, age
        return (record if isinstance(record, dict) else None), age

    def _is_stale(self, record: dict[str, Any], age: float) -> bool:
        if record.get("host") == _host():
            pid = record.get("pid")
            if pid == os.getpid():
                return True
            return not (isinstance(pid, int) and _pid_alive(pid, record.get("pid_start")))
        return age > STALE_AFTER_S

    def _busy(self, record: dict[str, Any] | None, age: float) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"{self.path}: the workdir is in use by {describe(record, age)}; two runs on one "
            "workdir overwrite each other's checkpoints: wait for that run to end, stop it, or "
            f"choose another --workdir (remove {self.path.name} only if no run uses it)"
        )

    def _write(self, fd: int) -> None:
        record = {
            "host": _host(),
            "pid": os.getpid(),
            "pid_start": _pid_start(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        data = json.dumps(record).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed by hand: nothing to refresh
                pass


def _host() -> str:
    return socket.gethostname()
