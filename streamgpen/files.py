"""Files on disk, the one way: atomic writes, honest permissions, inputs that are regular files.

Every output streamgpen writes (photos, face crops, the face log, videos, downloaded weights) is
written under a temporary name beside its target and renamed onto it when complete, so a reader
never sees a half-written file under the final name. The temporary name says which process made
it, ``.NAME.partial-PID-RANDOM.EXT``: a run killed with SIGKILL leaves one behind, and the next run
that writes the same target removes it once that process is gone (:func:`remove_stale`).

A renamed file gets the permissions a plain ``open(path, "w")`` would have given it (0666 less the
umask); ``mkstemp`` alone would leave 0600.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from streamgpen.errors import UserError

_STALE = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)-[0-9a-f]+(?:\.[^.]*)?$")


def cache_dir(name: str) -> Path:
    """``$XDG_CACHE_HOME/streamgpen/NAME`` (``~/.cache`` without it): where streamgpen keeps what
    it can fetch or make again (weights, the service's spool)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home).expanduser() / "streamgpen" / name


def default_mode() -> int:
    """The mode a new file gets from ``open()``: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside ``path``, same extension (muxers and encoders read it)."""
    path = Path(path)
    token = secrets.token_hex(4)
    return path.with_name(f".{path.name}.partial-{os.getpid()}-{token}{path.suffix}")


def place(temp: Path, path: Path) -> None:
    """Rename a finished ``temp`` onto ``path`` with the permissions of a normal new file."""
    os.chmod(temp, default_mode())
    os.replace(temp, path)


def describe_os_error(error: OSError) -> str:
    """``No space left on device`` and friends: the reason, without Python's decoration."""
    return error.strerror or str(error)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` when the block succeeds,
    remove it when the block raises. An ``OSError`` becomes one :class:`UserError` line."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({describe_os_error(e)})") from None
    remove_stale(path)
    temp = temp_path(path)
    try:
        yield temp
        place(temp, path)
    except OSError as e:
        temp.unlink(missing_ok=True)
        raise UserError(f"{path}: cannot write ({describe_os_error(e)})") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_stale(path: Path) -> int:
    """Remove temporary files beside ``path`` left by processes that no longer run (a SIGKILL,
    a power cut); returns how many were removed. Files of live processes are left alone."""
    path = Path(path)
    removed = 0
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return 0
    for sibling in siblings:
        match = _STALE.match(sibling.name)
        if match is None or match["name"] != path.name or _alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            sibling.unlink()
            removed += 1
    return removed


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of our temporary files (folder walks skip them)."""
    return _STALE.match(name) is not None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


def same_file(a: Path | str, b: Path | str) -> bool:
    """Whether ``a`` and ``b`` are one file: the same path, a symlink to it, or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they lead
        return Path(a).resolve() == Path(b).resolve()


def require_regular_file(path: Path | str, what: str = "input") -> None:
    """Refuse a FIFO, socket or device given as a file (reading one would block or never end).

    A missing file is left to the caller's own message."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
    raise UserError(f"{path}: the {what} is {kind} (give a regular file)")
