"""Content-addressed artifact store: fingerprints, file hashes, atomic writes, manifests, locks.

Every stage writes into ``<storage>/<kind>/<fingerprint>/``. The fingerprint is a sha256 of
everything that determines the bytes of the output; a ``manifest.json`` written last (with
``"complete": true``) marks the directory as finished. Files are always written under a
temporary name (``.tmp-*``, which no reader's glob matches) and renamed into place, so a killed
run never leaves a half-written file under a real name.

One writer per output directory: every stage holds ``exclusive(lock_path(...))`` (a `filelock`
lock under ``<storage>/locks/``) for the whole time it writes, and removes temporary leftovers
of dead writers only while holding it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import LockBusy, StorageError

log = logging.getLogger("dpo.store")

MANIFEST = "manifest.json"
_HASH_BLOCK = 1 << 20
_UMASK = os.umask(0)
os.umask(_UMASK)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the same object always gives the same text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(obj: Any) -> str:
    """sha256 (hex) of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


# --- file hashing, cached by (path, size, mtime) so multi-GB files are hashed once -------------

_cache_lock = threading.Lock()


def _hash_cache_path() -> Path:
    root = os.environ.get("DPO_HASH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dpo-pipeline"
    )
    return Path(root) / "file-hashes.json"


def sha256_file(path: str | Path, use_cache: bool = True) -> str:
    """sha256 of a file's bytes. Cached by absolute path, size, mtime_ns, inode and ctime_ns.

    Any write to the file changes its ctime (which, unlike the mtime, no user can set back), and
    a file replaced by another one has another inode: either means a re-hash. So a multi-GB model
    is hashed once per content, not once per run; use_cache=False hashes anyway.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    cache_file = _hash_cache_path()
    cache: dict = {}
    if use_cache:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        if key in cache:
            return cache[key]
    started = time.perf_counter()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    value = digest.hexdigest()
    log.debug("sha256 of %s: %.1f MB in %.2f s", path.name, st.st_size / 1e6, time.perf_counter() - started)
    if use_cache:
        with _cache_lock:
            try:
                cache = json.loads(cache_file.read_text())
            except (OSError, ValueError):
                cache = {}
            cache = {k: v for k, v in cache.items() if not k.startswith(f"{path}|")}
            cache[key] = value
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache_file, json.dumps(cache, indent=0))
            except OSError:
                pass  # a read-only home only costs a re-hash next time
    return value


_VERIFIED: dict[tuple, str] = {}


def sha256_verified(path: str | Path) -> str:
    """sha256 of a file's bytes as they are now, hashed at most once per process.

    Unlike ``sha256_file``'s cache on disk (a file any process of this user can write), this
    memo lives only in this process, keyed by device, inode, size, mtime and ctime: any write to
    the file, even one that restores its mtime, changes ctime and so forces a re-hash.
    """
    st = os.stat(path)  # the file itself, by device and inode: no path resolution per call
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = sha256_file(path, use_cache=False)
    return _VERIFIED[key]


def forget_verified() -> None:
    """Forget every sha256 ``sha256_verified`` computed, as in a new process: each file is
    hashed again on its next call."""
    _VERIFIED.clear()


# --- atomic writes -----------------------------------------------------------------------------


def _tmp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    return Path(name)


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        yield tmp
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(directory: str | Path, of: tuple[str, ...] | None = None) -> None:
    """Remove the temporary files and folders (``.tmp-*``) dead writers left in ``directory``;
    ``of``: only those of these file names. Call it only while holding the directory's lock: the
    temporary files of a live writer look the same."""
    patterns = [f".tmp-{name}.*" for name in of] if of is not None else [".tmp-*"]
    for leftover in [p for pattern in patterns for p in Path(directory).glob(pattern)]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_parquet(
    table: pa.Table, path: str | Path, row_group_size: int, metadata: dict | None = None,
    page_checksum: bool = False,
) -> str:
    """Write ``table`` atomically as zstd Parquet; return the file's sha256.

    ``metadata`` (string keys and values) goes into the file-level key/value metadata;
    ``page_checksum``: a CRC32 in every data page header (readers can verify each page).
    """
    path = Path(path)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size,
                       write_page_checksum=page_checksum)
        digest = sha256_file(tmp, use_cache=False)
    return digest


# --- manifests ---------------------------------------------------------------------------------


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of an output directory, or None when there is none (or it is unreadable)."""
    return read_json(Path(directory) / MANIFEST)


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Write the manifest last: its presence with complete=true is the completion flag."""
    atomic_write_json(Path(directory) / MANIFEST, manifest)


# --- storage errors and locks ----------------------------------------------------------------


def ensure_dir(path: str | Path, fix: str = "set `storage` to a writable folder") -> Path:
    """``mkdir -p path``, with a one-line StorageError (ending in ``fix``) instead of an OSError
    traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise StorageError(
            f"cannot create folder {path}: {blocker} is a file, not a folder", hint=f"move the file away, or {fix}"
        ) from None
    except OSError as exc:
        reason = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
        raise StorageError(f"cannot create folder {path} ({reason}): {fix}") from None
    if not os.access(path, os.W_OK):
        raise StorageError(f"folder {path} is not writable: {fix}")
    return path


def lock_path(storage: str | Path, kind: str, name: str) -> Path:
    """The lock file of output ``<storage>/<kind>/<name>`` (outside it: caches stay read-only)."""
    return Path(storage) / "locks" / f"{kind}-{name}.lock"


@contextmanager
def exclusive(path: str | Path, what: str, wait: bool):
    """Hold the lock at ``path`` while the block runs: one writer per output directory.

    wait=True: a second process logs who holds the lock and waits for it; wait=False: it raises
    LockBusy naming the holder's pid. The lock is an OS-level lock (`filelock`), so a killed
    holder releases it; its pid is written beside it for messages only.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    ensure_dir(path.parent)
    owner = path.with_name(path.name + ".owner")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = _lock_owner(owner)
        if not wait:
            raise LockBusy(
                f"{what} is being written by another process ({holder})", hint="wait for it to finish, "
                "or stop it, then run again"
            ) from None
        log.warning("%s is being written by another process (%s); waiting for it", what, holder)
        lock.acquire()
    try:
        try:
            owner.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
        except OSError:
            pass  # only used in messages
        yield
    finally:
        lock.release()


def _lock_owner(owner: Path) -> str:
    try:
        return owner.read_text().strip() or "pid unknown"
    except OSError:
        return "pid unknown"
