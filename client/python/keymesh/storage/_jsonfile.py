"""The JSON state file both JSON storages share, safe across processes.

Format (the original's, so files written by either are read by the other):
one JSON object mapping storage id (keymesh.storage.storage_id) -> a
snapshot object, 2-space indent, UTF-8.

What the original got wrong here (defect 18) and how this fixes it:
- several processes share the file: every read-modify-write holds an
  exclusive flock(2) on ``<path>.lock`` (a lock file beside it, since the
  state file itself is replaced by rename), so no process loses another's
  update; flock also serialises the threads of one process (each operation
  opens the lock file anew);
- each write goes to a temp file of a unique name in the same directory,
  fsync'ed, renamed over the file, then the directory fsync'ed: a crash
  leaves the old file or the new one, never a torn one, and two writers
  never share a temp file;
- a file that does not parse as that shape is logged as an error and kept
  aside (renamed to ``<path>.corrupt-<UTC time>-<pid>``), never silently
  overwritten; an unreadable one (an OS error) is a StorageError and is not
  touched;
- the file (and its lock file) is created mode 0600: the ids are the
  original's unsalted 64-bit SHA-256 prefixes (kept so that its files stay
  readable both ways), which let someone who can read the file confirm a
  guessed key (defect 19), so only the owner may read it;
- the writer coalesces: one read-modify-write per batch of changed keys,
  not one per event, and reads those keys' state from the pool while it
  holds the lock (save_fresh), so the file always ends with the latest.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

from .base import StorageError, storage_id

log = logging.getLogger("keymesh")

PathArg = Union[str, "os.PathLike[str]"]


class JSONFile:
    """The state file at ``path`` (relative paths: to the working directory
    at construction)."""

    def __init__(self, path: PathArg) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self._lock_path = self.path + ".lock"

    # ---- the five operations (each under the file lock) ----------------
    def save_many(self, states: Mapping[str, Dict[str, Any]]) -> None:
        self.save_fresh(lambda: states)

    def save_fresh(self, make_states: Callable[[], Mapping[str, Dict[str, Any]]]) -> None:
        """Saves what ``make_states()`` returns, calling it under the file lock.
        The pool's writer reads the keys' snapshots there: two processes
        that read a key's state in one order then write the file in the same
        order, so the later state always wins (the original let a stale
        snapshot land last: defect 11)."""
        with self._locked():
            states = make_states()
            if not states:
                return
            data = self._read(strict=False)
            for key, state in states.items():
                data[storage_id(key)] = dict(state)
            self._write(data)

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        with self._locked():
            return self._read(strict=True).get(storage_id(key))

    def load_all(self) -> Dict[str, Dict[str, Any]]:
        with self._locked():
            return self._read(strict=True)

    def delete(self, key: str) -> None:
        with self._locked():
            data = self._read(strict=False)
            if data.pop(storage_id(key), None) is not None:
                self._write(data)

    # ---- helpers ---------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open the lock file {self._lock_path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read(self, *, strict: bool) -> Dict[str, Dict[str, Any]]:
        """The file's map ({} when it does not exist). A corrupt file is set
        aside and logged; then strict raises StorageError, else {}."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise StorageError(f"cannot read the storage file {self.path}: {e.strerror}") from None
        problem: Optional[str] = None
        data: Any = None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            problem = "not UTF-8"
        except json.JSONDecodeError as e:
            problem = f"not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        except ValueError as e:  # e.g. a number too long to convert
            problem = f"not JSON: {e}"
        if problem is None:
            problem = _shape_problem(data)
        if problem is None:
            return data  # type: ignore[no-any-return]
        aside = self._set_aside(problem)
        if strict:
            raise StorageError(f"the storage file {self.path} is corrupt ({problem}); kept aside as {aside}")
        return {}

    def _set_aside(self, problem: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = f"{self.path}.corrupt-{stamp}-{os.getpid()}"
        n = 1
        while os.path.lexists(aside):  # never replace a file kept aside before (we hold the lock)
            n += 1
            aside = f"{self.path}.corrupt-{stamp}-{os.getpid()}-{n}"
        try:
            os.replace(self.path, aside)
        except OSError as e:
            raise StorageError(f"the storage file {self.path} is corrupt ({problem}) and could not be "
                               f"set aside: {e.strerror}") from None
        log.error("keymesh: the storage file %s is corrupt (%s); kept aside as %s, starting from an empty state",
                  self.path, problem, aside)
        return aside

    def _write(self, data: Dict[str, Dict[str, Any]]) -> None:
        directory, base = os.path.split(self.path)
        text = json.dumps(data, indent=2)
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
        except OSError as e:
            raise StorageError(f"cannot write the storage file {self.path}: {e.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"cannot write the storage file {self.path}: {e.strerror}") from None
        with contextlib.suppress(OSError):  # the rename's durability; some filesystems refuse
            dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def _shape_problem(data: Any) -> Optional[str]:
    """Why ``data`` is not the file's shape (an object of objects), or None."""
    if not isinstance(data, dict):
        return f"the top level is a {type(data).__name__}, not an object"
    for k, v in data.items():
        if not isinstance(v, dict):
            return f"entry {json.dumps(k)[:40]} is a {type(v).__name__}, not an object"
    return None
