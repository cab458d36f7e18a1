"""One process at a time in a results folder: an advisory lock (fcntl.flock) on a lock file inside it.

    import folder_lock
    folder_lock.acquire(out)          # a second process stops at once: SystemExit naming the folder and the holder's pid
    ...                               # read, check and write the folder's files
    folder_lock.release(out)          # or let a function decorated with @folder_lock.releases give it back

Why: two evaluate.py runs on one folder would each generate and judge every sample (their appends
interleave), and two close starts with different models could both pass the manifest check. The
lock is held by this process until `release` (taking it again in the same process is a no-op, so
nested stages share it); the operating system drops it when the process dies, even by SIGKILL, so a
killed run never leaves a stale lock. The lock file holds the holder's pid and is removed on release.
On a file system without locks (Lustre without -o flock, some FUSE mounts) it warns once and goes on
unlocked. Linux and macOS (fcntl); stdlib only.
"""
from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path

LOCK_FILE = ".lock"
_held: dict[str, tuple[int, Path, bool]] = {}  # resolved folder -> (fd of its lock file, the file, we made the folder)
# flock's errors where the file system has no locks: Lustre mounted without -o flock (ENOSYS), some FUSE
# and network file systems (EOPNOTSUPP / ENOTSUP), NFS without its lock daemon (ENOLCK).
NO_LOCKS = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}
_warned = False


def _warn_unlocked(folder: Path, e: OSError) -> None:
    global _warned
    if not _warned:
        _warned = True
        print(f"warning: {folder}: its file system cannot lock files (flock: {e.strerror}): running without the lock, "
              "so make sure no other run uses the same folder", file=sys.stderr)


def acquire(folder: str | Path, what: str = "another run") -> None:
    """Hold `folder`'s lock (made, with the folder, if need be); a lock held by another process stops
    this one at once with a one-line SystemExit naming the folder and that process's pid."""
    import fcntl

    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SystemExit(f"{folder} is in use by {what} (pid {holder}): wait for it to end, or choose another folder") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                os.close(fd)
                raise
            _warn_unlocked(folder, e)  # a file system without locks: run as before locks existed
            break
        try:  # the holder may have removed the file between our open and our lock: then lock the new one
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = (fd, path, made)


def release(folder: str | Path) -> None:
    """Give `folder`'s lock back (nothing when this process does not hold it); a folder that `acquire`
    made and that stayed empty is removed, so a run stopped by a check leaves nothing behind."""
    held = _held.pop(str(Path(folder).resolve()), None)
    if held is None:
        return
    fd, path, made = held
    path.unlink(missing_ok=True)  # before the lock goes: a waiting opener sees the file is gone (samestat above)
    os.close(fd)
    if made:
        try:
            path.parent.rmdir()
        except OSError:  # not empty: the run wrote results
            pass


def releases(fn):
    """Decorator: the locks that a call of `fn` takes are released when it returns or raises (those its
    caller already held stay held)."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        before = set(_held)
        try:
            return fn(*args, **kwargs)
        finally:
            for key in set(_held) - before:
                release(key)

    return call
