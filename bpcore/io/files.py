"""Files that must never be torn, lost or trusted: the atomic write and consistent read
under :mod:`bpcore.io.checkpoint`.

Writing goes to a temporary file in the destination folder (``.NAME.HOST.PID.TOKEN.tmp``),
is flushed and fsynced, then ``os.replace``d over the target, and the folder is fsynced: a
crash at any point leaves either the old file or the new one. A new file gets the
permissions the umask gives, an overwritten one keeps its mode, and temporary files whose
writer died are removed by the next write to the same path. Reading opens the file once
(without blocking: a FIFO is refused, not waited on), lets the ``safetensors`` library parse
it, and checksums the data of that same file.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import stat
import time
import struct
from typing import Any, Callable

from ..errors import CheckpointError

__all__ = ["atomic_write", "read_consistent"]


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}."


def _remove_dead_writers_leftovers(path: str) -> None:
    """Delete temporary files that writers on this host left when they died mid-save.

    A temporary file is ``.NAME.HOST.PID.TOKEN.tmp``; one whose process no longer exists is
    garbage. Those of live writers (concurrent saves) and of other hosts are left alone.
    """
    folder, prefix = os.path.dirname(path), _temp_prefix(path)
    host = socket.gethostname()
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        parts = name[len(prefix):-len(".tmp")].rsplit(".", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive (or alive under another user: PermissionError below)
        except ProcessLookupError:
            pass
        except (PermissionError, OSError):
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass


def atomic_write(path: str, payload: bytes) -> None:
    """Write ``payload`` to ``path`` so that a crash leaves the old file or the new one.

    The new file's mode is the old file's when there is one, else what the umask gives
    (as for any file the user writes).
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"save: folder {folder!r} does not exist; create it first")
    if os.path.isdir(path):  # (the rename would fail after the whole write)
        raise CheckpointError(f"save: {path!r} is a folder; give a file path in it, e.g. "
                              f"{os.path.join(path, 'model.safetensors')!r}")
    _remove_dead_writers_leftovers(path)
    tmp = os.path.join(folder, f"{_temp_prefix(path)}{socket.gethostname()}.{os.getpid()}."
                               f"{secrets.token_hex(4)}.tmp")
    try:
        old_mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        old_mode = None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            if old_mode is not None:
                os.fchmod(f.fileno(), old_mode)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # some filesystems cannot fsync a directory; the file is already safe
        pass


def read_consistent(path: str, read: Callable[[Any, str], tuple[dict, str]]) -> Any:
    """``read(safe_open_handle, where) -> (result, sha256)`` on the file at ``path``, as one
    consistent file; any defect of the file (or a file that is no file) is a
    :class:`CheckpointError`, never another exception.

    ``read`` returns the SHA-256 the file's own metadata claims for its data; it is checked
    on the very file that safetensors read, even while another process replaces ``path``.
    """
    where = f"load {path!r}"
    # Another process may replace the file while we read it: read again, after a pause that
    # grows (1 ms, 2 ms, ... 50 ms; about 2 s in all), so a reader racing busy writers on a
    # loaded machine still gets one whole file.
    for attempt in range(50):
        if attempt:
            time.sleep(min(0.05, 0.001 * 2 ** (attempt - 1)))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
        except FileNotFoundError:
            raise CheckpointError(f"load: no checkpoint at {path!r}") from None
        except IsADirectoryError:
            raise CheckpointError(f"load: {path!r} is a folder, not a checkpoint file") from None
        except OSError as e:
            raise CheckpointError(f"{where}: cannot be read ({e})") from None
        try:
            got = _read_open_file(path, fd, where, read)
        finally:
            os.close(fd)
        if got is not None:
            return got
    raise CheckpointError(f"{where}: the file kept changing while it was read (another "
                          "process is writing it); try again")


def _read_open_file(path: str, fd: int, where: str, read: Callable):
    """:func:`read_consistent` on the file ``fd`` holds open; None if ``path`` stopped being
    that file."""
    from safetensors import SafetensorError, safe_open

    st = os.fstat(fd)
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"load: {path!r} is a folder, not a checkpoint file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
        raise CheckpointError(f"{where}: not a regular file (a pipe, socket or device); a "
                              "checkpoint is a file written by bpcore.save")
    if st.st_size < 8:
        raise CheckpointError(f"{where}: truncated ({st.st_size} bytes; a safetensors file "
                              "starts with an 8-byte header length)")

    def same_file() -> bool:  # our open file pins its inode, which therefore is never reused
        try:
            now = os.stat(path)
        except OSError:
            return False
        return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)

    if not same_file():
        return None
    try:
        # safetensors' reader checks the header (size, JSON, dtypes, shapes, offsets that
        # tile the data exactly) on a memory map: a file larger or smaller than its header
        # says is refused without reading the data.
        with safe_open(path, framework="numpy") as f:
            result, sha256 = read(f, where)
        if not same_file():
            return None
        _check_sha256(fd, sha256, where)  # the very file safetensors read
    except CheckpointError:
        raise
    except SafetensorError as e:
        raise CheckpointError(f"{where}: corrupted or truncated: not a valid safetensors file "
                              f"({e})") from None
    except OSError as e:
        raise CheckpointError(f"{where}: cannot be read ({e})") from None
    except Exception as e:  # whatever else a crafted file provokes: still the file's fault
        raise CheckpointError(f"{where}: unreadable ({type(e).__name__}: {e})") from None
    return result


def _check_sha256(fd: int, want: str, where: str) -> None:
    """Compare the checksum of the tensor data, read in blocks (never all at once)."""
    h = hashlib.sha256()
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    pos = 8 + n
    while block := os.pread(fd, 1 << 20, pos):
        h.update(block)
        pos += len(block)
    if h.hexdigest() != want:
        raise CheckpointError(f"{where}: the tensor data does not match its checksum; the "
                              "file is truncated or corrupted")


