"""Run infrastructure shared by the command lines of both pipelines and by the core's file writers.

Not part of ``pad``'s public API; it depends on the standard library only (``torch`` is imported lazily by
:func:`machine_description`).

- :func:`atomic_write`: the one way a file is written (temporary file, fsync, rename, folder fsync); a
  failed write removes its temporary file and raises :class:`WriteError`, naming the path and the error.
- :class:`UsageError`, :class:`OneLineParser`, :func:`report_error`, :func:`error_line` and :data:`EXIT_BAD_INPUT`:
  every CLI reports bad input (flags, files, folders) as one ``error:`` line and exit 2, never a usage block.
- :func:`read_text` and :func:`read_json`: the one way a text or JSON file is read back, any fault (a folder, an
  unreadable or non-UTF-8 file, invalid JSON, another JSON type than expected) a ``ValueError`` naming the file.
- :func:`sha256_bytes`, :func:`sha256_file`, :func:`sha256_fields` and :func:`verify`: the one integrity scheme of
  every file the project writes and reads back.  Each file kind records the SHA-256 of its contents where that
  kind has room for it (a dyconv checkpoint's wrapper, a safetensors file's metadata, a Trainer folder's
  ``checksums.json``); a record that does not match, is malformed or is absent raises :class:`IntegrityError`,
  whose message names the file.
- :func:`lock_folder`: one run per output folder (an ``flock`` the operating system releases when the process dies).
- :class:`StopSignals`: SIGTERM, SIGINT and SIGUSR1 become a request the training loop honours at the next step
  boundary; the CLI then saves and exits with ``128 + signal``.
- :func:`keep_freed_memory`, :func:`machine_description`, :func:`code_version`: process settings and the
  provenance recorded with a run.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import socket
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
TEMPORARY_SUFFIX = ".tmp"


def error_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name where the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class UsageError(Exception):
    """Bad input to a command line (a flag, a config, a file or folder it names): its message is the error line."""


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose parse errors raise :class:`UsageError` instead of printing a usage block and exiting."""

    def error(self, message: str):
        raise UsageError(message)


def report_error(err: BaseException | str) -> int:
    """Prints ``err`` as one ``error: ...`` line on stderr; returns :data:`EXIT_BAD_INPUT` for ``main`` to return.
    The project's own writes fail as :class:`WriteError` (``cannot write PATH: reason``); an ``OSError`` from
    elsewhere (a library's save) names its file where it has one; any other error gives its message's first line."""
    if isinstance(err, str):
        message = err
    elif isinstance(err, OSError) and not isinstance(err, WriteError):
        message = f"{err.filename}: " if err.filename else ""
        message += err.strerror or error_line(err)
    else:
        message = error_line(err)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT


# ---------------------------------------------------------------- reading

def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of ``path``; ``ValueError`` naming the file (and the line of the first
    undecodable byte) for a folder, an unreadable or a non-UTF-8 file."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, expected a file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x})") from None


def read_json(path: str | os.PathLike, expect: type | None = dict):
    """The JSON value in ``path`` (a ``dict`` unless ``expect`` says otherwise);
    ``ValueError`` naming the file and the line for anything else."""
    text = read_text(path)
    if not text.strip():
        raise ValueError(f"{path}: empty file, expected JSON")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    if expect is not None and not isinstance(value, expect):
        raise ValueError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                         f"got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- integrity

class IntegrityError(ValueError):
    """A file whose contents do not match the SHA-256 recorded for them, whose record is malformed, or that
    carries none (it predates checksummed files of its kind); the message names the file."""


def sha256_bytes(data) -> str:
    """Hex SHA-256 of ``data`` (bytes or any buffer)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the bytes of ``path``, read in 1 MiB blocks (``OSError`` when it cannot be read)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_fields(fields) -> str:
    """Hex SHA-256 of a sequence of byte strings, each prefixed by its length (8 bytes, little-endian), so
    that no two different sequences hash the same byte stream."""
    digest = hashlib.sha256()
    for data in fields:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def verify(path: str | os.PathLike, recorded, actual: str, record: str = "its contents") -> None:
    """:class:`IntegrityError` unless ``recorded`` (the digest ``record`` holds for ``path``) is ``actual``."""
    if not isinstance(recorded, str):
        raise IntegrityError(f"{path}: its checksum record is malformed (not a SHA-256 string)")
    if recorded != actual:
        raise IntegrityError(f"{path}: checksum does not match {record} (damaged file)")


def predates(file: str, what: str, remedy: str) -> IntegrityError:
    """The error for ``file`` (e.g. ``"checkpoint run/checkpoint.pt"``) written before its kind recorded
    ``what``: without it nothing tells a damaged file from an intact one, or what it holds."""
    return IntegrityError(f"{file} predates {what}; {remedy}")


# ---------------------------------------------------------------- writing files

class WriteError(OSError):
    """A file could not be written (disk full, read-only folder, I/O error): names the path and the error."""

    def __init__(self, path, err: OSError):
        reason = err.strerror or error_line(err)
        super().__init__(err.errno, f"cannot write {path}: {reason}")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror


def temporary_path(path: str | os.PathLike) -> Path:
    """``path.tmp``, with any stale file of that name removed: never written through, since a stale temporary
    file may be a hard link to a live file (a link-and-rename killed half-way)."""
    path = Path(path)
    tmp = path.with_name(path.name + TEMPORARY_SUFFIX)
    tmp.unlink(missing_ok=True)
    return tmp


def sync_folder(folder: str | os.PathLike) -> None:
    """Makes the renames in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, data, parents: bool = False) -> None:
    """Writes ``data`` to ``path`` so that a crash leaves the old file or the new one, never a mix.

    ``data``: bytes, a str (UTF-8), or a callable that writes to the open binary file.  It goes to ``path.tmp``,
    is flushed to disk (fsync), renamed over ``path`` and the folder is synced (``parents``: its missing folders
    are made first).  Any ``OSError`` on the way (ENOSPC, EROFS, EIO, a folder that is a file) removes the
    temporary file and raises :class:`WriteError`; ``path`` is untouched.
    """
    path = Path(path)
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_path(path)
    except OSError as err:
        raise WriteError(path, err) from None
    try:
        with open(tmp, "xb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        sync_folder(path.parent)
    except OSError as err:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise WriteError(path, err) from None


def atomic_link(source: str | os.PathLike, target: str | os.PathLike) -> bool:
    """Gives the file ``source`` the second name ``target`` atomically (a hard link under ``target.tmp``
    renamed over ``target``), without writing it again.  False where the file system cannot link (the caller
    then copies); :class:`WriteError` on any other failure."""
    source, target = Path(source), Path(target)
    try:
        tmp = temporary_path(target)
        try:
            os.link(source, tmp)
        except OSError as err:
            if err.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            raise
        os.replace(tmp, target)
        sync_folder(target.parent)
    except OSError as err:
        raise WriteError(target, err) from None
    return True


# ---------------------------------------------------------------- one run per folder

LOCK_FILE = ".lock"


class FolderInUse(RuntimeError):
    """Another live process holds the output folder's lock."""


def lock_folder(folder: str | os.PathLike):
    """Takes the exclusive lock of ``folder`` for this process and returns its open file (keep it open for
    the whole run; the operating system releases the lock when the process ends, however it ends).

    :class:`FolderInUse` names the holder's PID and host when another run holds it.  Where ``flock`` is not
    available (not POSIX) the folder is not locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    path = Path(folder) / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that did not record itself"
        handle.close()
        raise FolderInUse(f"{folder} is in use by another run ({holder}); give this run its own folder, "
                          f"or wait for that run to end") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on host {socket.gethostname()}\n")
    handle.flush()
    return handle


# ---------------------------------------------------------------- preemption

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a stop request (``requested``: the signal number, or None).

    The training loop checks it at step boundaries, saves, and raises :class:`Preempted`.  A second
    signal while the first is being honoured changes nothing (the save in progress is not interrupted).
    """

    def __init__(self):
        self.requested: int | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is None:
            self.requested = signum

    def install(self) -> "StopSignals":
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class Preempted(Exception):
    """Raised where a run stops for a signal after saving; ``saved`` names the checkpoint (or says none)."""

    def __init__(self, signum: int, saved: str):
        super().__init__(f"stopped by {signal.Signals(signum).name}: {saved}")
        self.signum, self.saved = signum, saved

    def exit_code(self) -> int:
        return 128 + self.signum

# ---------------------------------------------------------------- process settings and provenance

def keep_freed_memory() -> bool:
    """Tells glibc malloc to serve big blocks from its heap and keep freed memory.

    Dynamic layers build large temporaries every step (per-sample conv weights
    ``(B, *S)`` of hundreds of MB; all experts' mixed weights ``(E, out, in)``);
    by default glibc maps every block above 32 MB fresh from the kernel and unmaps it
    when freed, so each step pays page faults to zero gigabytes again (measured on
    2 CPU cores: ResNet-10 PAD-DY-Conv at 28 px, batch 64, 11 s/step before, 1.6 s
    after).  Returns False where this is not glibc.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def machine_description() -> str:
    """One line naming where a run computes, recorded with its results, e.g.
    ``"cpu: Intel(R) Xeon(R) ... (2 cores, 2 torch threads), torch 2.14.1"`` or
    ``"cuda: NVIDIA H100 80GB HBM3 x1, torch 2.14.1"``."""
    import os
    import platform

    import torch
    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    model = platform.processor() or platform.machine() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {model} ({cores} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def code_version() -> str:
    """The git commit of this repository's code, recorded with a run's results: ``"da95647"``, with
    ``"+modified"`` when tracked files differ from it, or ``"unknown"`` outside a git checkout."""
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=30)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0 or status.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+modified" if status.stdout.strip() else "")
