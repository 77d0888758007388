"""Crash-safe file publication: write beside the target, fsync, then rename over it.

A reader sees either the old file or the whole new one, never a partial write; a killed
writer leaves only a `.*.tmp` file that `fs gc` removes. A full disk is reported as one
`DiskFullError` naming the file, and the temporary file is removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DiskFullError, IntegrityError, LockedError

__all__ = ["TMP_SUFFIX", "tmp_path", "publish", "write_json_atomic", "write_bytes_atomic", "read_json",
           "file_lock", "json_safe", "disk_full", "raise_if_disk_full", "CHECKSUMS", "write_checksums",
           "check_checksums", "require_intact", "check_regular", "regular_file_bytes", "NotRegularFile",
           "sha256_file", "try_lock", "cleaned_on_failure", "writer_alive", "writer_running_here", "fsync_dir",
           "fsync_tree", "exchange", "publish_folder", "OLD_SUFFIX", "swapped_out_target", "writer_tag",
           "read_checked_json", "require_recorded", "write_parquet"]

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"  # `.X.<id>.old`: the previous X, moved aside while a new X is published
CHECKSUMS = "checksums.json"
_FULL = (errno.ENOSPC, errno.EDQUOT)


def tmp_path(target: Path) -> Path:
    """A unique temporary name in the target's folder (same filesystem, so rename is atomic),
    carrying the writer's pid and where that pid means something (`writer_tag`), so that a later
    job can tell a dead writer's leftovers: `.NAME.<pid>-<random>-<tag>.tmp`."""
    return target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}-{writer_tag()}{TMP_SUFFIX}")


_TAG: list[str] = []


def writer_tag() -> str:
    """This machine and pid namespace, hashed to 8 hex digits: a pid names a process only within
    them. Two jobs on two nodes (Ray over a shared store) or in two containers have different tags."""
    if not _TAG:
        import socket

        try:
            ns = os.stat("/proc/self/ns/pid").st_ino
        except OSError:
            ns = 0
        _TAG.append(hashlib.sha256(f"{socket.gethostname()}\0{ns}".encode()).hexdigest()[:8])
    return _TAG[0]


def _local_writer(tmp: Path) -> int | None:
    """The pid that named temp file `tmp`, if that pid means a process here: None for a name written on
    another machine or in another pid namespace (its tag is not ours), or with no pid. A name without
    a tag (written before tags existed) is taken as local."""
    parts = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1].split("-")
    if not parts[0].isdigit() or (len(parts) >= 3 and parts[2] != writer_tag()):
        return None
    return int(parts[0])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_alive(tmp: Path) -> bool:
    """Whether the process that named temp file `tmp` may still be running (unknown: assume so)."""
    pid = _local_writer(tmp)
    return pid is None or _running(pid)


def writer_running_here(tmp: Path) -> bool:
    """Whether temp file `tmp` was named by a process of this machine and pid namespace that is still
    running (a job at work: its file is not a leftover). Unknown writers count as not running."""
    pid = _local_writer(tmp)
    return pid is not None and _running(pid)


def disk_full(exc: BaseException) -> bool:
    """Is this error a full disk or an exhausted quota (as OSError, or wrapped by a library)?"""
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text or "errno = 28" in text


def raise_if_disk_full(exc: BaseException, path: Path | str) -> None:
    if disk_full(exc):
        raise DiskFullError(f"disk full writing {path}: free some space (or move the store with --store) and "
                            "re-run; what was already published is kept, and `fs gc` removes leftover temp files") from None


@contextlib.contextmanager
def cleaned_on_failure(tmp: Path, target: Path) -> Iterator[None]:
    """Remove `tmp` if the write fails, and turn a full disk into a DiskFullError."""
    try:
        yield
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise_if_disk_full(exc, target)
        raise


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


fsync_dir = _fsync_dir


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder (deepest first, `folder` last), so that a
    rename publishing it cannot reach the disk before its contents."""
    folder = Path(folder)
    for dirpath, _dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2: Any = None


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):  # not Linux, or a libc older than glibc 2.28
            pass
    return _renameat2


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False, with nothing
    changed, where the kernel, libc or filesystem cannot; any other failure raises OSError."""
    import ctypes

    fn = _libc_renameat2()
    if not fn:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):  # EPERM: a seccomp filter
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swapped_out_target(path: Path) -> Path | None:
    """For `.X.<id>.old` (a previous X moved aside by the fallback of `publish_folder`), X's path."""
    name = path.name
    if not (name.startswith(".") and name.endswith(OLD_SUFFIX)):
        return None
    stem, _, ident = name[1: -len(OLD_SUFFIX)].rpartition(".")
    return path.with_name(stem) if stem and ident else None


def publish_folder(tmp: Path, target: Path, *, overwrite: bool = True) -> None:
    """Publish the finished folder `tmp` at `target`, crash-safely: its files and itself are fsynced
    first and the parent folder after, so a power cut leaves the old or the new folder whole.

    A first publish is one rename. A replacement swaps the two atomically (renameat2 RENAME_EXCHANGE)
    and then deletes the old one, so a reader always sees a whole folder. Where that swap is not
    available it moves the old folder aside to `.X.<id>.old`, renames the new one in and deletes the
    old one; a kill between those two renames leaves the old copy there with no X, which
    `fs verify` reports and `fs gc` puts back (verify.restore_swapped_out).

    `overwrite=False` (callers that refuse an existing target): only the one rename, never a swap,
    so a target that appeared since the caller's check (another job of the same name) is not replaced:
    FileExistsError, which the caller turns into its "already exists" error."""
    tmp, target = Path(tmp), Path(target)
    fsync_tree(tmp)
    try:
        if not overwrite or not target.exists():
            try:
                os.replace(tmp, target)
                _settle(target.parent)
                return
            except OSError as exc:  # ENOTEMPTY/EEXIST: another job published `target` since the caller looked
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if not overwrite:
                    raise FileExistsError(errno.EEXIST, "published meanwhile by another job", str(target)) from None
        if exchange(tmp, target):  # tmp now holds the old folder
            _settle(target.parent)
            _rmtree(tmp)
            return
    except OSError as exc:
        if exc.errno in (errno.EXDEV, errno.EBUSY):  # the target is a mount point: no rename can replace it
            _rmtree(tmp)
            raise IntegrityError(f"cannot publish {target}: it is a mount point or on another filesystem than "
                                 f"{target.parent} ({os.strerror(exc.errno)}), so it cannot be replaced "
                                 "atomically; unmount it or choose another name") from None
        raise
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}{OLD_SUFFIX}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.replace(old, target)  # put the old one back: X is never left missing by a failure
        raise
    _settle(target.parent)
    _rmtree(old)


def _settle(parent: Path) -> None:
    """fsync a folder after a rename into it has happened: the publish stands either way, so a folder
    that cannot be fsynced (some filesystems refuse) must not make the caller report a failure."""
    with contextlib.suppress(OSError):
        _fsync_dir(parent)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def publish(tmp: Path, target: Path) -> None:
    """Atomically move a finished temporary file to its final name."""
    with cleaned_on_failure(tmp, target):
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    _fsync_dir(target.parent)


def write_bytes_atomic(target: Path, data: bytes | memoryview) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(target)
    with cleaned_on_failure(tmp, target):
        with open(tmp, "wb") as fh:
            fh.write(data)
    publish(tmp, target)


def write_parquet(df, path: Path, **options) -> None:
    """`df.write_parquet(path)`, encoded in memory first and written with Python's I/O: on a full disk polars
    reports a failed footer write as "Invalid thrift: transport error", without the errno, so the disk
    being full was not recognised (an unexpected error, exit 1, instead of DiskFullError, exit 11)."""
    import io

    buf = io.BytesIO()
    df.write_parquet(buf, **options)
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())


def write_json_atomic(target: Path, obj: Any) -> None:
    write_bytes_atomic(Path(target), (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def json_safe(obj: Any) -> Any:
    """Plain JSON values: NaN and inf -> None, numpy scalars -> Python, tuples -> lists."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_json(path: Path) -> Any:
    """A JSON file, or one IntegrityError naming it when it is damaged (not UTF-8, not JSON)."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path} is damaged ({type(exc).__name__}: {exc}); restore it from a backup or "
                             "recreate what it belongs to (`fs verify` lists every damaged file)") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path, names: Iterable[str]) -> None:
    """Record the SHA-256 of `names` in `folder/checksums.json` (atomically), for `fs verify`."""
    folder = Path(folder)
    write_json_atomic(folder / CHECKSUMS, {"sha256": {n: sha256_file(folder / n) for n in sorted(names)}})


def check_checksums(folder: Path, prefix: str = "") -> list[str] | None:
    """Problems with the files `checksums.json` lists (None when the folder has no checksums); with
    `prefix`, only the entries under that sub-folder (`fold-0/`)."""
    folder = Path(folder)
    if not (folder / CHECKSUMS).is_file():
        return None
    try:
        recorded = read_json(folder / CHECKSUMS)["sha256"]
    except (IntegrityError, KeyError, TypeError) as exc:
        return [f"{folder / CHECKSUMS if prefix else CHECKSUMS} is damaged ({exc})"]
    problems = []
    for name, digest in sorted(recorded.items()):
        if not name.startswith(prefix):
            continue
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its recorded SHA-256 (damaged or replaced)")
    return problems


class NotRegularFile(OSError):
    """A path that names a FIFO, socket or device: reading it could block forever or never end."""

    def __init__(self, path) -> None:
        super().__init__(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))


def check_regular(path) -> None:
    """That `path` (symlinks followed) is a regular file, without reading it: IsADirectoryError for a
    folder, NotRegularFile for a FIFO, socket or device (a read could block a job forever), and the
    stat's own OSError (missing, a symlink loop, ...)."""
    import stat

    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path)


def regular_file_bytes(path) -> bytes:
    """The bytes of the regular file at `path`, checked by `check_regular` before any read."""
    check_regular(path)
    return Path(path).read_bytes()


def require_intact(folder: Path, fix: str) -> None:
    """Before a saved artifact (a run, a memory, a fitted VA model) is loaded: its files must match its
    `checksums.json`, or one IntegrityError names them, since a flipped bit in weights or an index still
    loads and would give wrong answers without a word. A folder without checksums is not checked."""
    folder = Path(folder)
    problems = check_checksums(folder)
    if problems is None:  # a part of a bigger run (`fold-K/`, `seed-S/fold-K/`): the run's checksums.json
        problems = _checked_by_an_ancestor(folder)
    if problems:
        raise IntegrityError(f"{folder} is damaged ({'; '.join(problems)}); {fix}")


def read_checked_json(path: Path, fix: str) -> Any:
    """A JSON file of a saved artifact (a run's metrics.json, a memory's spec.json, an adapter's meta.json...),
    checked first against the SHA-256 its folder's `checksums.json` (or, for a fold or seed of a bigger
    run, the run's) records for it: a changed digit is still valid JSON, and listings would show it.
    One IntegrityError naming the file and `fix` when it does not match; a file no checksums.json lists
    (saved by an older featurestore) is read as it is."""
    require_recorded(path, fix)
    return read_json(path)


def require_recorded(path: Path, fix: str) -> None:
    """That one file of a saved artifact matches the SHA-256 the nearest enclosing `checksums.json` (up to
    three folders up) records for it; one IntegrityError naming it and `fix` otherwise. A file that no
    checksums.json lists is not checked."""
    path = Path(path)
    for root in path.parents[:4]:
        problems = check_checksums(root, prefix=path.relative_to(root).as_posix())  # that entry alone
        if problems is not None:
            if problems:
                raise IntegrityError(f"{path} is damaged ({'; '.join(problems)}); {fix}")
            return


def _checked_by_an_ancestor(folder: Path, levels: int = 3) -> list[str]:
    """Problems with the files under `folder` that the nearest enclosing `checksums.json` (up to
    `levels` folders up) lists, as `<relative path>/<name>`; none where no ancestor has one."""
    for root in folder.parents[:levels]:
        problems = check_checksums(root, prefix=folder.relative_to(root).as_posix() + "/")
        if problems is not None:
            return problems
    return []


@contextlib.contextmanager
def file_lock(path: Path, what: str, *, shared: bool = False, wait: bool = False,
              wait_option: bool = False) -> Iterator[None]:
    """An advisory lock (exclusive, or shared with other shared holders), released by the kernel
    if the holder is killed. `wait` blocks until it is free instead of raising LockedError, whose
    message offers `--wait` only where the command has it (`wait_option`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fh.fileno(), mode | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            then = ", or pass --wait" if wait_option else " and run this again"
            raise LockedError(f"{what} is locked by another process ({path}); wait for it to finish{then}") from None
        yield
    finally:
        fh.close()


def try_lock(path: Path, *, shared: bool = False, seconds: float = 0.0):
    """An open file holding the lock, or None if it stays busy for `seconds` (caller closes it)."""
    fh = open(path, "a+")
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fh.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return fh
        except BlockingIOError:
            if time.monotonic() >= deadline:
                fh.close()
                return None
            time.sleep(0.05)
