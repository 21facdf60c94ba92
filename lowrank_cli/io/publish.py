"""Making a finished output appear under its name: whole, on disk, never over another run's unless forced.

Every output is built under a temporary name beside its target, `.NAME.lowrank-tmp-<pid>-<random>…`,
flushed to disk (`sync`: fsync of the file, or of every file and folder of a folder) and published
by one rename; `write_file` does all three for a single file. A crash then leaves the old output or
the new one under the name, never a name whose data had not reached the disk.

Without force the rename refuses to replace anything (renameat2 RENAME_NOREPLACE; where the
filesystem lacks it, a hard link for a file or a claimed empty folder for a folder), so of two
runs writing the same OUT one wins and the other fails with "already exists" instead of both
saying they wrote it. With force the replacement is atomic: a file by os.replace, a folder by
renaming the old one aside, the new one in, then removing the old.

The pid in a temporary's name lets a later run tell one a killed run left behind (its process is
gone) from one a running process is still writing: sweep_stale_temps removes the first kind only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from lowrank_cli.errors import OutputError, arg

TEMP_MARK = ".lowrank-tmp-"
# .NAME.lowrank-tmp-PID-RANDOM[.KIND].tmp; mkstemp's random part has no dot.
_STALE = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(?P<pid>\d+)-[^.]+(\.[a-z]+)?\.tmp$")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM across a few renames, so an interrupt cannot land between them."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# Every temporary file or folder this process has made and not yet renamed or removed. An interrupt
# that lands between making one and handing it to its owner's cleanup still finds it here.
_LIVE_TEMPS: set[Path] = set()


# The lists that recording_published() hands out; publish() adds each finished output to them.
_RECORDS: list[list[Path]] = []


@contextlib.contextmanager
def recording_published() -> Iterator[list[Path]]:
    """The outputs published under their names while inside: what a run had written when it was stopped.

    Yields a list that each output published inside the block is appended to (its final path), so a
    caller interrupted after an output appeared can say that it is there, whole.

    Example:
        >>> with lowrank_cli.recording_published() as written:
        ...     lowrank_cli.compress("model.safetensors", rank=64)
        >>> written  # [PosixPath('model.lowrank.safetensors')]
    """
    published: list[Path] = []
    _RECORDS.append(published)
    try:
        yield published
    finally:
        _RECORDS.remove(published)


def track_temp(path: Path) -> Path:
    _LIVE_TEMPS.add(Path(path))
    return Path(path)


def untrack_temp(path: Path) -> None:
    _LIVE_TEMPS.discard(Path(path))


def remove_leftover_temps() -> None:
    """Remove every temporary this process still has (after an interrupt, before exiting)."""
    for path in list(_LIVE_TEMPS):
        with contextlib.suppress(OSError):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        _LIVE_TEMPS.discard(path)


def make_temp(target: Path, *, folder: bool = False, kind: str = "") -> Path:
    """A new temporary file (or folder) beside `target`, tracked for cleanup on interrupt; raises OSError.

    kind ("data", "old"…) tells the temporaries of one target apart in a listing.
    """
    target = Path(target)
    options = {
        "prefix": f".{target.name}{TEMP_MARK}{os.getpid()}-",
        "suffix": f".{kind}.tmp" if kind else ".tmp",
        "dir": target.parent,
    }
    with signals_held():  # made and tracked together
        if folder:
            return track_temp(Path(tempfile.mkdtemp(**options)))
        fd, name = tempfile.mkstemp(**options)
        os.close(fd)
        return track_temp(Path(name))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_file(target: Path, write: Callable[[Path], None], *, force: bool) -> None:
    """Make the file `target` whole or not at all: write(temporary) fills a new temporary file beside
    it, which is then flushed to disk, given a normal file's mode and published.

    Raises OutputError when `target` exists and force is off, and what write raises or OSError for
    any other failure (the caller says which output failed); the temporary is removed either way.
    """
    temporary = make_temp(target)
    try:
        write(temporary)
        sync(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp made it private
        publish(temporary, target, force=force)
    except BaseException:
        remove_temp(temporary)
        raise


def sync(path: Path) -> None:
    """fsync a file, or a folder with every file and folder under it (each folder after what it holds),
    so that what a rename publishes is on disk before its name is."""
    path = Path(path)
    if path.is_dir():
        for entry in sorted(path.iterdir()):
            if not entry.is_symlink() and (entry.is_dir() or entry.is_file()):  # no FIFO: opening one blocks
                sync(entry)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (path.is_dir() and exc.errno == errno.EINVAL):  # a filesystem that cannot sync a folder
            raise
    finally:
        os.close(fd)


def publish(temporary: Path, target: Path, *, force: bool) -> None:
    """Rename `temporary` (a file or folder) to `target` in one step; without force, never over anything.

    Raises OutputError naming `target` when it exists and force is off (the temporary is then
    removed), and OSError for any other failure (the caller says which output failed).
    """
    temporary, target = Path(temporary), Path(target)
    folder, old = temporary.is_dir(), None
    try:
        with signals_held():  # published and forgotten as temporary together, or neither
            if not force:
                _rename_noreplace(temporary, target, folder=folder)
            elif folder and target.is_dir():
                old = _replace_folder(temporary, target)
            else:
                os.replace(temporary, target)
            untrack_temp(temporary)
            if not any(parent in _LIVE_TEMPS for parent in target.parents):  # an output, not a part of one
                for published in _RECORDS:
                    published.append(target)
    except FileExistsError:
        remove_temp(temporary)
        raise OutputError(
            f"{target}: already exists (written by another run meanwhile); pass {arg('force')} to overwrite it"
            f" or choose another {arg('out')}"
        ) from None
    if old is not None:
        remove_temp(old)


def remove_temp(temporary: Path) -> None:
    """Remove a temporary file or folder, whatever is left of it; never raises."""
    with contextlib.suppress(OSError):
        shutil.rmtree(temporary) if temporary.is_dir() else temporary.unlink(missing_ok=True)
    untrack_temp(temporary)


def sweep_stale_temps(folder: Path) -> list[str]:
    """Remove the temporaries that lowrank runs which no longer exist left in `folder`; one note for each.

    A run killed by SIGKILL or the OOM killer cannot clean up after itself. A temporary whose
    process is alive (or whose pid we may not signal) is another run's work in progress and is left.
    """
    notes = []
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except OSError:
        return notes
    for name in names:
        match = _STALE.match(name)
        if match is None or _process_exists(int(match["pid"])):
            continue
        path = Path(folder) / name
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except FileNotFoundError:
            continue  # another run swept it first
        except OSError as exc:
            notes.append(
                f"{path}: left by a run that was killed (pid {match['pid']}); cannot remove it ({exc.strerror})"
            )
            continue
        notes.append(f"removed {path}, left by a lowrank run that was killed (pid {match['pid']})")
    return notes


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or a pid we cannot ask about: leave its files alone
    return True


def _rename_noreplace(temporary: Path, target: Path, *, folder: bool) -> None:
    """rename(2) that fails with FileExistsError instead of replacing `target`."""
    if _renameat2(temporary, target):
        return
    if not folder:
        try:
            os.link(temporary, target)  # fails if target exists, like open(O_EXCL)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS):
                raise
        else:
            os.unlink(temporary)
            return
    # No hard links either: claim the name first, exclusively, then rename over our own claim.
    if folder:
        os.mkdir(target)
    else:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        os.replace(temporary, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.rmdir(target) if folder else os.unlink(target)
        raise


_libc = None


def _renameat2(temporary: Path, target: Path) -> bool:
    """renameat2(RENAME_NOREPLACE); False where the system or filesystem does not have it."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    function = getattr(_libc, "renameat2", None) if _libc else None
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(temporary), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # the filesystem cannot do it: fall back
        return False
    raise OSError(code, os.strerror(code), str(target))  # EEXIST comes out as FileExistsError


def _replace_folder(new: Path, target: Path) -> Path:
    """Put the folder `target` aside and `new` in its place; returns the temporary folder holding the old
    one, for the caller to remove once signals are let through again."""
    old = make_temp(target, folder=True, kind="old")
    os.rename(target, old / target.name)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old / target.name, target)  # put the old one back
        remove_temp(old)
        raise
    return old
