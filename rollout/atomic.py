"""Atomic file and directory writes: a crash leaves the old state or the new one, never half of either.

Scratch files and directories sit beside their target under one recognisable name,
``.{target}.r3-scratch-{pid}-{random}``, and the writer holds an ``flock`` on each for as
long as it works. A writer killed mid-write (SIGKILL, OOM, power loss) leaves its scratch
behind; the next write to the same target removes every scratch whose lock is free and
whose pid is gone, so leftovers never pile up.

Replacing an existing directory swaps the two in one ``renameat2(RENAME_EXCHANGE)`` on Linux
(``renamex_np(RENAME_SWAP)`` on macOS): at every instant ``target`` is either the complete
old directory or the complete new one. Where the kernel or the filesystem offers no
exchange, the fallback is two renames, with a moment in which ``target`` is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Iterator

SCRATCH_MARK = ".r3-scratch-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS sys/stdio.h


def scratch_paths(target: str | os.PathLike) -> list[Path]:
    """Every scratch entry (live or left by a killed writer) that belongs to ``target``."""
    target = Path(target)
    prefix = f".{target.name}{SCRATCH_MARK}"
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a scratch directory beside ``target``; on success it replaces ``target`` with no window."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    tmp = _scratch_name(target)
    tmp.mkdir(mode=0o755)
    lock = _lock(tmp)
    try:
        yield tmp
        _install(tmp, target)
        _remove(tmp)  # after an exchange it holds the old directory; gone if target was new
        _fsync_dir(target.parent)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(lock)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a scratch file in the same directory, fsync, then rename over ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    tmp = _scratch_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    return target


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


# ------------------------------------------------------------------ internals
def _scratch_name(target: Path) -> Path:
    return target.parent / f".{target.name}{SCRATCH_MARK}{os.getpid()}-{secrets.token_hex(6)}"


def _lock(path: Path) -> int:
    """An open descriptor holding an exclusive flock on ``path``: released by the kernel when this process dies."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _sweep(target: Path) -> None:
    """Remove scratch entries of ``target`` left by writers that died (lock free and pid gone)."""
    for path in scratch_paths(target):
        pid_text = path.name.rsplit(SCRATCH_MARK, 1)[1].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue  # a live writer, or (pid reused) one we cannot tell from it: leave it
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # already gone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # still held: a writer on another host sharing this filesystem
        finally:
            os.close(fd)
        _remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing target is exchanged with ``tmp`` in one step."""
    if target.exists() or target.is_symlink():
        _exchange(tmp, target)
        return
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        _exchange(tmp, target)  # someone created target meanwhile


def _exchange(a: Path, b: Path) -> None:
    swap = _swap_function()
    if swap is not None:
        if swap(os.fsencode(a), os.fsencode(b)) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")
    # No exchange here: two renames (target briefly absent), the old directory parked under a scratch name.
    parked = _scratch_name(b)
    os.rename(b, parked)
    os.rename(a, b)
    os.rename(parked, a)


@functools.lru_cache(maxsize=1)
def _swap_function():
    """``f(a, b) -> 0 | -1`` that swaps two paths atomically, or None where libc has none."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, _RENAME_SWAP)
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _fsync_dir(path: Path) -> None:
    """Make the rename itself durable (the entry in the parent directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)
