r"""The run folder of ``agr-train`` (``--out``): how its files are written, checked and shared.

A run folder holds ``config.json``, ``metrics.csv``, ``summary.json``, ``curves.png``,
``checkpoint_last.pt``, ``checkpoint_prev.pt`` (the checkpoint before the last),
``checkpoint_best.pt``, ``checksums.json`` and ``run.lock``. This module keeps four promises
about them (``docs/agr_train.rst`` states them for users):

**Atomic, durable writes** (:func:`atomic_write`). A file is written to a temporary file beside
it (``.NAME.PID.RANDOM.tmp``), flushed to the disk (``fsync``), renamed over the old one, and the
folder is flushed too. Readers see the old file or the new one, never a mix, also after a power
cut. A write that fails raises :class:`WriteError`, whose message says "no space left on device
while writing FILE" when that is the cause (``torch.save`` reports it as ``RuntimeError: ...
unexpected pos``; the file object here keeps the real ``OSError``), and the temporary file is
removed. A temporary file left by a killed run is removed by the next run in the folder
(:func:`remove_stray_temporaries`).

**Checksummed checkpoints** (:class:`Checkpoints`). The SHA-256 of every checkpoint is
computed while it is written and recorded in ``checksums.json`` *before* the checkpoint is renamed
into place; a checkpoint is read only when its bytes hash to a recorded digest, and then with
``torch.load(weights_only=True)``, which builds tensors and plain data and runs no code. The
digests are a *set*, so every order of kill leaves files that verify (see :meth:`Checkpoints.save`).
Before a new ``checkpoint_last.pt`` replaces the old one, the old one becomes ``checkpoint_prev.pt``
(a hard link: no copy), so one older good checkpoint always exists.

**One run per folder** (:func:`lock_folder`). A run holds an exclusive ``flock`` on ``run.lock``
for its whole life and writes its pid, host and start time into it; the operating system drops
the lock when the process ends, however it ends. A second run is refused, naming the holder.

**A test-only fault hook** (:func:`arm_fault_hook`): ``AGR_TRAIN_FAULT=enospc:N`` makes the
N-th file operation of a run (1-based: each write, rename, link and lock write counts) fail with
``ENOSPC``; ``AGR_TRAIN_FAULT=kill:N`` ends the process there with ``os._exit(86)``, as a kill
would (no clean-up). Unset, it costs one ``None`` check per file operation.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import io
import json
import os
import pickle
import re
import secrets
import shlex
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import torch

__all__ = [
    "CHECKPOINT_BEST",
    "CHECKPOINT_LAST",
    "CHECKPOINT_PREV",
    "CHECKSUMS",
    "CONFIG",
    "LOCK",
    "PRE_CHECKPOINT_FILES",
    "RUN_FILES",
    "TRACKER_FOLDERS",
    "TRACKING",
    "Checkpoints",
    "RunFolderError",
    "WriteError",
    "arm_fault_hook",
    "atomic_write",
    "is_temporary",
    "load_tensors",
    "lock_folder",
    "remove_stray_temporaries",
    "unwritable",
    "write_error",
    "write_json",
    "write_text",
]

CONFIG = "config.json"
CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_PREV = "checkpoint_prev.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
CHECKSUMS = "checksums.json"
LOCK = "run.lock"
#: ``--log``'s: the W&B run id (:mod:`~agr_optim.training.tracking`), and the trackers' folders.
TRACKING = "tracking.json"
TRACKER_FOLDERS = frozenset({"tensorboard", "wandb"})
#: Every file a run writes in its folder.
RUN_FILES = frozenset(
    {
        CONFIG,
        "metrics.csv",
        "summary.json",
        "curves.png",
        CHECKPOINT_LAST,
        CHECKPOINT_PREV,
        CHECKPOINT_BEST,
        CHECKSUMS,
        TRACKING,
    }
)
#: What a run stopped before its first checkpoint can have left (besides temporary files): the
#: trackers open before the first epoch.
PRE_CHECKPOINT_FILES = frozenset({CONFIG, CHECKSUMS, LOCK, TRACKING}) | TRACKER_FOLDERS

FAULT_ENV = "AGR_TRAIN_FAULT"
FAULT_KILL_EXIT = 86
_CHECKSUMS_FORMAT = "agr-train checksums 1"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class RunFolderError(ValueError):
    """The folder cannot be used as asked (in use, a corrupt or foreign checkpoint): the message
    names the file and says what to do. Nothing was written."""


class WriteError(RuntimeError):
    """A file of the run could not be written (``path``); the previous version of it is intact."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


# ---------------------------------------------------------------------- the fault hook (tests only)
class _Fault:
    def __init__(self, action: str, at: int) -> None:
        self.action, self.at, self.count = action, at, 0


_fault: _Fault | None = None


def arm_fault_hook() -> None:
    """Test-only: read ``AGR_TRAIN_FAULT`` (``enospc:N`` or ``kill:N``) and count file operations
    from 0. ``agr-train`` calls this at the start of every run; unset, the hook does nothing."""
    global _fault
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        _fault = None
        return
    action, _, at = spec.partition(":")
    if action not in ("enospc", "kill") or not at.isdigit() or int(at) < 1:
        raise RunFolderError(f"{FAULT_ENV}={spec!r} (a test-only hook) must be enospc:N or kill:N with N >= 1")
    _fault = _Fault(action, int(at))


def _fault_point(path: str) -> None:
    """One file operation on ``path``; the armed fault fires at the N-th."""
    fault = _fault
    if fault is None:
        return
    fault.count += 1
    if fault.count != fault.at:
        return
    if fault.action == "kill":
        os._exit(FAULT_KILL_EXIT)  # as SIGKILL would: no clean-up, no lock release but the OS's
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


# ---------------------------------------------------------------------- atomic, durable writes
def unwritable(out: str) -> str | None:
    """Why ``out`` cannot be (created and) written, or ``None``; creates nothing."""
    path = os.path.abspath(out)
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{probe!r} exists and is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"no write permission in {probe!r}"
    return None


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a temporary file of :func:`atomic_write` for one of the run's files."""
    match = _TEMPORARY.match(name)
    return match is not None and match["name"] in RUN_FILES


def remove_stray_temporaries(folder: str) -> list[str]:
    """Remove the temporary files a killed run left in ``folder`` (call it holding the lock: no
    other run is writing there then); returns their names."""
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if is_temporary(name):
            with contextlib.suppress(OSError):  # gone already, or not ours to remove: left alone
                if stat.S_ISREG(os.lstat(path).st_mode) or stat.S_ISLNK(os.lstat(path).st_mode):
                    os.unlink(path)
                    removed.append(name)
    return removed


def write_error(error: BaseException, path: str, cause: OSError | None = None) -> WriteError:
    """``error`` (an ``OSError``, or torch's ``RuntimeError`` for a short write) as one line (also
    for what a tracker's own writer reports: :mod:`~agr_optim.training.tracking`)."""
    if cause is None and isinstance(error, OSError):
        cause = error
    if cause is not None and cause.errno in _NO_SPACE:
        return WriteError(f"no space left on device while writing {path}", path)
    if cause is None and "unexpected pos" in str(error):
        # torch.save(obj, path) writes through its own C++ stream and reports a short write, the
        # symptom of a full disk, as "[enforce fail at inline_container.cc] unexpected pos".
        return WriteError(f"no space left on device while writing {path} (torch: short write)", path)
    reason = cause.strerror if cause is not None and cause.strerror else str(error).splitlines()[0]
    return WriteError(f"cannot write {path}: {reason}", path)


class _HashingFile:
    """The file object ``torch.save`` writes a checkpoint through: hashes the bytes on their way
    (torch writes sequentially, never seeks) and keeps the ``OSError`` that torch would turn into
    ``unexpected pos``."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.raw.write(data)
        except OSError as error:
            self.error = error
            raise
        self.sha256.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.raw.flush()


def _temporary_name(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temporary(path: str, fill: Callable[[str], object]) -> str:
    """Write ``path``'s new content to a temporary file beside it, flushed to the disk; returns its
    name. On failure the temporary file is removed and :class:`WriteError` names ``path``."""
    tmp = _temporary_name(path)
    try:
        # Mode 0666 minus the umask, as open(path, "w") (tempfile.mkstemp would leave 0600).
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        fill(tmp)
        _fault_point(path)
        _fsync(tmp, os.O_RDWR)  # (Windows flushes only a file open for writing)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, (OSError, RuntimeError)) and not isinstance(error, WriteError):
            raise write_error(error, path, getattr(error, "agr_cause", None)) from error
        raise
    return tmp


def _commit(tmp: str, path: str) -> None:
    """Rename the temporary file over ``path`` (atomic on POSIX and Windows)."""
    try:
        _fault_point(path)
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise write_error(error, path) from error
        raise


def _fsync_folder(folder: str) -> None:
    # The rename itself reaches the disk only with the folder's entry; not every system can
    # open a folder for that (Windows): there the rename is atomic but not yet durable.
    with contextlib.suppress(OSError):
        _fsync(folder)


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """Write ``path`` through ``write(temporary_path)``, then rename: never a half-written file.

    The temporary file lies beside ``path`` (``.NAME.PID.RANDOM.tmp``, mode 0666 minus the
    umask) and is flushed to the disk before the rename; the folder is flushed after it. Raises
    :class:`WriteError` (the previous ``path`` intact, the temporary file removed).
    """
    tmp = _write_temporary(path, write)
    _commit(tmp, path)
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, obj: Any) -> None:
    """Strict JSON (``allow_nan=False``: a NaN is a bug upstream, never a file)."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


class _SizeRefused(OSError):
    pass


def read_regular_file(path: str, accept: Callable[[int], bool] = lambda size: size <= 1 << 20) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a FIFO, which would block the read
    forever, nor a device) whose size ``accept`` takes (by default at most 1 MiB: a config or a
    checksum record); ``OSError`` (``FileNotFoundError``) otherwise."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        if not accept(info.st_size):
            raise _SizeRefused(errno.EFBIG, f"unexpected size ({info.st_size} bytes)", path)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def load_tensors(data: bytes, path: str, map_location: Any, hint: str) -> Any:
    """``torch.load(weights_only=True)`` of ``data`` (the bytes of ``path``): tensors and plain
    data, no code run. A one-line :class:`RunFolderError` naming ``path`` otherwise (``hint``
    says, for a file that holds other objects, what to do)."""
    if not data:  # torch's EOFError says nothing
        raise RunFolderError(f"{path} is empty (0 bytes)")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise RunFolderError(
            f"{path} holds objects other than tensors and plain data: refused, loading it could run code ({hint})"
        ) from None
    except Exception as error:  # torch's own errors for a file it cannot parse
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RunFolderError(f"{path} cannot be read by torch ({type(error).__name__}: {detail})") from None


# ---------------------------------------------------------------------- the lock
def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"agr-train pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another agr-train run (it has not recorded its pid yet)"


@contextlib.contextmanager
def lock_folder(folder: str) -> Iterator[str | None]:
    """Hold ``folder/run.lock`` exclusively for the block (an ``flock``, released by the operating
    system when the process ends, however it ends) and record the pid, host and start time in it.

    Raises :class:`RunFolderError` naming the holder when another run has it. Yields ``None``, or
    a one-line note when the platform or filesystem has no locks (the block then runs unlocked).
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield f"no folder lock on this platform: make sure no other run uses {folder}"
        return
    path = os.path.join(folder, LOCK)
    try:
        # Not through a symbolic link: a folder from elsewhere could point run.lock at a file of
        # yours, which taking the lock would truncate.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise RunFolderError(f"{path} is a symbolic link: remove it (the lock is a plain file)") from None
        raise write_error(error, path) from error
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RunFolderError(f"{path} is not a regular file: remove it (the lock is a plain file)")
        note = None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderError(
                f"--out {folder!r} is in use by {_holder(fd)} ({path}); wait for that run to end "
                f"or choose another folder"
            ) from None
        except OSError as error:  # ENOLCK: a network filesystem without locks
            note = f"cannot lock {path} ({error.strerror}): make sure no other run uses {folder}"
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started})
        try:
            _fault_point(path)
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode() + b"\n", 0)
        except OSError as error:
            raise write_error(error, path) from error
        yield note
    finally:
        os.close(fd)  # drops the lock


# ---------------------------------------------------------------------- checksummed checkpoints
def _same_inode(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class Checkpoints:
    """``checkpoint_last.pt``, ``checkpoint_prev.pt`` and ``checkpoint_best.pt`` of one folder,
    each read only when its SHA-256 is one that ``checksums.json`` records, and then with
    ``weights_only=True``. Use it holding the folder's lock."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        # digest -> {"epoch", "bytes", "file"}: what checksums.json records (read lazily)
        self._recorded: dict[str, dict[str, Any]] | None = None
        # file name -> digest, for the files as they are now (verified or written by this object)
        self._current: dict[str, str] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _records(self) -> dict[str, dict[str, Any]]:
        if self._recorded is None:
            self._recorded = self._read_checksums()
        return self._recorded

    def _read_checksums(self) -> dict[str, dict[str, Any]]:
        path = self.path(CHECKSUMS)
        try:
            data = json.loads(read_regular_file(path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise RunFolderError(f"{path} is unreadable ({error}): the checkpoints cannot be verified") from None
        ok = isinstance(data, dict) and data.get("format") == _CHECKSUMS_FORMAT and isinstance(data.get("sha256"), dict)
        records = data.get("sha256", {}) if ok else {}
        if not ok or not all(
            isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("epoch"), int)
            for r in records.values()
        ):
            raise RunFolderError(f"{path} is not agr-train's checksum record: the checkpoints cannot be verified")
        return records

    def verify(self, name: str) -> tuple[bytes, dict[str, Any]] | None:
        """The bytes of ``name`` and its record, ``None`` if it does not exist; raises
        :class:`RunFolderError` when its SHA-256 is not recorded (truncated, changed, foreign).
        Its size is checked against the recorded ones before a byte is read."""
        path = self.path(name)
        sizes = {record["bytes"] for record in self._records().values()}
        try:
            data = read_regular_file(path, accept=lambda size: size in sizes)
        except FileNotFoundError:
            return None
        except _SizeRefused:
            data = None
        except OSError as error:
            raise RunFolderError(f"cannot read {path}: {error.strerror or error}") from None
        digest = None if data is None else hashlib.sha256(data).hexdigest()
        record = None if digest is None else self._records().get(digest)
        if data is None or digest is None or record is None or record["bytes"] != len(data):
            if not self._records():
                why = f"there is no {CHECKSUMS} beside it (written by agr-train before checksums, or not by agr-train)"
            else:
                why = f"its SHA-256 is not one {CHECKSUMS} records: truncated or changed on disk"
            raise RunFolderError(f"{path} is corrupt or foreign ({why})")
        self._current[name] = digest
        return data, record

    def _older(self) -> str:
        """What to say about checkpoint_prev.pt when the last one cannot be used."""
        try:
            found = self.verify(CHECKPOINT_PREV)
        except RunFolderError:
            found = None
        if found is None:
            return "no older good checkpoint exists: start a new run in another folder"
        prev, last = shlex.quote(self.path(CHECKPOINT_PREV)), shlex.quote(self.path(CHECKPOINT_LAST))
        return (
            f"an older good checkpoint exists, {prev} (epoch {found[1]['epoch']}): to continue from it, "
            f"mv {prev} {last} and --resume again"
        )

    def load(self, name: str, map_location: Any) -> dict[str, Any] | None:
        """Verify and load ``name`` (``None`` if it does not exist); one-line
        :class:`RunFolderError` otherwise, with the way back for ``checkpoint_last.pt``."""
        try:
            found = self.verify(name)
        except RunFolderError as error:
            if name == CHECKPOINT_BEST:
                hint = (
                    "it holds only the best epoch's weights, for AutoAttack: delete it to go on without them "
                    "(AutoAttack then attacks the last weights)"
                )
            else:
                hint = self._older() if name == CHECKPOINT_LAST else ""
            raise RunFolderError(f"{error}; {hint}" if hint else str(error)) from None
        if found is None:
            if name == CHECKPOINT_LAST and os.path.exists(self.path(CHECKPOINT_PREV)):
                raise RunFolderError(f"{self.path(CHECKPOINT_LAST)} is missing; {self._older()}")
            return None
        path = self.path(name)
        state = load_tensors(found[0], path, map_location, "agr-train never writes such a checkpoint")
        if not isinstance(state, dict):
            raise RunFolderError(f"{path} is not an agr-train checkpoint (a {type(state).__name__}, not a dict)")
        return state

    def recorded_epoch(self, name: str) -> int | None:
        """The epoch recorded for ``name`` as verified or written by this object, else ``None``."""
        digest = self._current.get(name)
        return None if digest is None else int(self._records()[digest]["epoch"])

    def save(self, last: dict[str, Any] | None, epoch: int, best: dict[str, Any] | None = None) -> None:
        """Write ``last`` (after 0-based ``epoch``; ``None``: keep the current one) and, if
        given, ``best`` (after its ``"epoch"``).

        The order keeps every file verifiable whatever step a kill stops at: (1) the new
        checkpoints go to temporary files, hashed while written; (2) the current last one becomes
        ``checkpoint_prev.pt`` (a hard link); (3) ``checksums.json`` records the new digests
        *and* the current ones; (4) the new files are renamed into place, last before best. After
        (3), a file holds either its old or its new bytes, and both are recorded. A resumed run
        finds ``checkpoint_best.pt`` one epoch behind only if the kill fell between the two
        renames; the caller rewrites it then (``last=None``: the best weights are the last
        checkpoint's).
        """
        for name in (CHECKPOINT_LAST, CHECKPOINT_PREV, CHECKPOINT_BEST):  # good files stay recorded below
            if name not in self._current and os.path.exists(self.path(name)):
                with contextlib.suppress(RunFolderError):  # a damaged file's digest is not kept
                    self.verify(name)
        records = self._records()
        pending: list[tuple[str, str, dict[str, Any]]] = []
        try:
            if last is not None:
                pending.append((CHECKPOINT_LAST, *self._write_checkpoint(CHECKPOINT_LAST, last, epoch)))
            if best is not None:
                pending.append((CHECKPOINT_BEST, *self._write_checkpoint(CHECKPOINT_BEST, best, int(best["epoch"]))))
            if last is not None and CHECKPOINT_LAST in self._current:
                self._link(CHECKPOINT_LAST, CHECKPOINT_PREV)
                self._current[CHECKPOINT_PREV] = self._current[CHECKPOINT_LAST]
            kept = {d: records[d] for d in self._current.values()}
            new = {r["sha256"]: {k: v for k, v in r.items() if k != "sha256"} for _, _, r in pending}
            write_json(self.path(CHECKSUMS), {"format": _CHECKSUMS_FORMAT, "sha256": {**kept, **new}})
            self._recorded = {**kept, **new}
            while pending:
                name, tmp, record = pending[0]
                _commit(tmp, self.path(name))
                self._current[name] = record["sha256"]
                pending.pop(0)
        finally:
            for _, tmp, _ in pending:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        _fsync_folder(self.folder)

    def _write_checkpoint(self, name: str, state: dict[str, Any], epoch: int) -> tuple[str, dict[str, Any]]:
        """``state`` into a temporary file for ``name``; its name and record (with ``sha256``)."""
        hashed: list[_HashingFile] = []

        def fill(tmp: str) -> None:
            with open(tmp, "wb") as raw:
                target = _HashingFile(raw)
                hashed.append(target)
                try:
                    torch.save(state, target)  # type: ignore[arg-type]  # a file object: write() and flush()
                except RuntimeError as error:
                    error.agr_cause = target.error  # type: ignore[attr-defined]  # the real OSError
                    raise

        tmp = _write_temporary(self.path(name), fill)
        target = hashed[0]
        return tmp, {"sha256": target.sha256.hexdigest(), "bytes": target.size, "epoch": epoch, "file": name}

    def _link(self, source: str, name: str) -> None:
        """``name`` := the current ``source`` (a hard link; a copy where links are not supported)."""
        src, path = self.path(source), self.path(name)
        if os.path.lexists(path) and _same_inode(os.lstat(path), os.stat(src)):
            # Already linked (a run stopped after the link): rename() of two links to one file
            # would do nothing and leave the temporary name behind.
            return
        tmp = _temporary_name(path)
        try:
            _fault_point(path)
            os.link(src, tmp)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.ENOSYS):
                raise write_error(error, path) from error
            tmp = _write_temporary(path, lambda t: shutil.copyfile(src, t))  # FAT, some network shares
        _commit(tmp, path)
