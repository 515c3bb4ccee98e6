"""A lock per run, safe on one machine and on a shared filesystem, that a dead holder cannot keep forever.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and on NFS v3+), holding who
took it (host, pid, the pid's start time, a random token). While held, a heartbeat thread touches it every
``heartbeat_s``. A lock is stale when its holder is known dead (same host, pid gone or reused) or when its
heartbeat stopped for ``stale_after_s`` (a holder on another host, or a frozen one). Breaking a stale lock is
serialised by a short-lived second lock file, and only removes the lock if it still holds the token that was
judged stale, so two processes recovering the same stale lock cannot both win.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

DEFAULT_HEARTBEAT_S = 30.0
DEFAULT_STALE_AFTER_S = float(os.environ.get("REPRO_LOCK_STALE_S", 600))
_BREAK_LOCK_MAX_AGE_S = 60.0  # a breaker that died mid-break leaves its file; nobody needs it this long


def _pid_start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a live holder from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after the last ')' are plain.
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``try_acquire()`` without waiting; ``release()`` only removes a lock this object holds."""

    def __init__(self, path: Path, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
                 stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        self.path = Path(path)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.token: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- who holds it --------------------------------------------------------------------------------------------
    def holder(self) -> Optional[dict[str, Any]]:
        """The holder's record, ``{}`` while a fresh lock is still being written, None when free."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError:
            return {}
        try:
            info = json.loads(text)
        except json.JSONDecodeError:
            return {}
        return info if isinstance(info, dict) else {}

    def _age_s(self) -> Optional[float]:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def is_stale(self, info: Optional[dict[str, Any]] = None) -> bool:
        """Whether the current lock (or ``info``, read before) belongs to a holder that is gone."""
        info = self.holder() if info is None else info
        age = self._age_s()
        if info is None or age is None:
            return False  # free: nothing to break
        if age > self.stale_after_s:
            return True  # heartbeat stopped (works across hosts)
        if info.get("host") != socket.gethostname() or "pid" not in info:
            return False
        pid = int(info["pid"])
        if not _pid_alive(pid):
            return True
        started = info.get("pid_start")
        return started is not None and _pid_start_time(pid) not in (None, started)

    def is_held_live(self) -> bool:
        """Held by someone whose lock is not stale (this object included)."""
        info = self.holder()
        return info is not None and not self.is_stale(info)

    def describe(self) -> str:
        info = self.holder() or {}
        return f"{info.get('host', '?')}:{info.get('pid', '?')}"

    # -- taking and giving back ---------------------------------------------------------------------------------
    def try_acquire(self, note: str = "") -> bool:
        """Take the lock if it is free or stale; False when a live holder has it."""
        if self.token is not None:
            return True
        for _ in range(3):
            if self._create(note):
                return True
            info = self.holder()
            if info is None:
                continue  # released between our attempt and our look: try again
            if not self.is_stale(info):
                return False
            self._break(info)
        return False

    def _create(self, note: str) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start_time(os.getpid()),
                "token": token, "acquired_at": time.time(), "note": note}
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(info))
            f.flush()
            os.fsync(f.fileno())
        self.token = token
        self._start_heartbeat()
        return True

    def _break(self, judged: dict[str, Any]) -> None:
        """Remove a stale lock, unless it changed since it was judged stale; breakers take turns."""
        guard = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > _BREAK_LOCK_MAX_AGE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return
        os.close(fd)
        try:
            now = self.holder()
            if now is not None and now.get("token") == judged.get("token") and self.is_stale(now):
                self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        if self.token is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        info = self.holder()
        if info and info.get("token") == self.token:  # never remove a lock someone took over from us
            self.path.unlink(missing_ok=True)
        self.token = None

    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a filesystem hiccup; the next beat tries again

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
