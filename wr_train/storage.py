"""The one place that knows local paths from `s3://bucket/key` URIs.

Everything goes through pyarrow.fs, the same layer Ray Train uses for `storage_path`; the
S3 client and the environment it is configured from are wr_train.s3's. Errors leave as
`StorageError`, one line naming the path and what was expected.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import threading
import time
import uuid
from typing import Callable

import pyarrow as pa
import pyarrow.fs as pafs

from wr_train import s3

CHUNK = 8 << 20
COPY_WORKERS = 8
PROGRESS_EVERY_S = 5.0
MB = 1 << 20


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line naming the path."""


# -- paths ---------------------------------------------------------------------------

def is_s3(path) -> bool:
    return str(path).startswith("s3://")


def absolute(path: str) -> str:
    """A local path as the user's shell means it (absolute, ~ expanded), s3:// and "" as
    they are: Ray workers, Tune trials and Ray jobs run in other working directories."""
    if not path or is_s3(path):
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


def join(base, *parts) -> str:
    """Join path parts; for s3:// always with "/", whatever the local OS."""
    if is_s3(base):
        pieces = [str(base).rstrip("/")] + [str(p).strip("/") for p in parts]
        return "/".join(p for p in pieces if p)
    return os.path.join(str(base), *map(str, parts))


def _split_s3(path: str) -> tuple[str, str]:
    bucket, _, key = str(path)[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"{path}: no bucket in S3 URI (expected s3://bucket/key)")
    return bucket, key.strip("/")


# -- filesystems ---------------------------------------------------------------------

_LOCAL = pafs.LocalFileSystem()


def resolve(path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it): "bucket/key" for S3, an absolute path locally."""
    if is_s3(path):
        bucket, key = _split_s3(path)
        return s3.filesystem(bucket), f"{bucket}/{key}" if key else bucket  # the bucket's own region
    return _LOCAL, os.path.abspath(os.path.expanduser(str(path)))


# -- error translation -----------------------------------------------------------------

_UNREACHABLE = ("NETWORK_CONNECTION", "Connection refused", "Could not connect",
                "Could not resolve", "curlCode", "Failed to connect", "timed out")
_DENIED = ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID",
           "SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH", "Forbidden",
           "ExpiredToken", "No credentials", "NoCredentials")
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "Bucket '")


def _detail(exc: BaseException) -> str:
    """The informative tail of an SDK message, on one line."""
    text = " ".join(str(exc).split())
    for marker in ("operation: ", "Detail: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return text.split("; Details:")[0][:200]


def translate(exc: BaseException, path) -> StorageError:
    """Map a pyarrow / OS error (or a botocore one, by its text) to a one-line
    StorageError naming `path`."""
    if isinstance(exc, StorageError):
        return exc
    text = f"{type(exc).__name__} {exc}"
    if is_s3(path):
        if any(m in text for m in _UNREACHABLE):
            return StorageError(f"{path}: cannot reach the S3 endpoint {s3.endpoint_label(_split_s3(path)[0])} "
                                f"({_detail(exc)})")
        if any(m in text for m in _DENIED):
            return StorageError(f"{path}: access denied (check AWS credentials)")
        if any(m in text for m in _NO_BUCKET):
            return StorageError(f"{path}: bucket {_split_s3(path)[0]} does not exist")
    if isinstance(exc, FileNotFoundError):
        return _missing(path)
    if isinstance(exc, PermissionError):
        return StorageError(f"{path}: permission denied")
    if isinstance(exc, NotADirectoryError):
        return StorageError(f"{path}: a parent of this path is a file, not a directory")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{path}: is a directory, expected a file")
    return StorageError(f"{path}: {_detail(exc) or type(exc).__name__}")


class _errors:
    """`with _errors(path):` re-raises an OS / pyarrow failure inside as
    translate(exc, path); a StorageError from deeper down passes unchanged."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, (OSError, pa.ArrowException)):
            raise translate(exc, self.path) from exc
        return False


def _info(path) -> pafs.FileInfo:
    fs, p = resolve(path)
    with _errors(path):
        return fs.get_file_info(p)


def _bucket_missing(path) -> bool:
    """Whether the bucket of s3:// `path` does not exist (errors name `path`)."""
    fs, p = resolve(path)
    with _errors(path):
        return fs.get_file_info(p.split("/", 1)[0]).type == pafs.FileType.NotFound


def _missing(path) -> StorageError:
    """'not found', or for S3 the more useful 'bucket does not exist' when that is why
    (pyarrow reports a key in a missing bucket as plain NotFound)."""
    if is_s3(path):
        try:
            if _bucket_missing(path):
                return StorageError(f"{path}: bucket {_split_s3(path)[0]} does not exist")
        except StorageError:
            pass
    return StorageError(f"{path}: not found")


# -- queries ---------------------------------------------------------------------------

def exists(path) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def isdir(path) -> bool:
    """On S3 a "directory" is any prefix with keys under it (or a bucket)."""
    return _info(path).type == pafs.FileType.Directory


def list_files(path) -> dict[str, int]:
    """{relpath: size} of every file under directory `path`, recursively, sorted; "/"
    separators. Directory markers (S3 keys ending in "/") are not files and are skipped."""
    info = _info(path)
    if info.type == pafs.FileType.NotFound:
        raise _missing(path)
    if info.type != pafs.FileType.Directory:
        raise StorageError(f"{path}: is a file, expected a directory")
    fs, root = resolve(path)
    with _errors(path):
        # allow_not_found: seaweedfs can report an emptied prefix as a directory in
        # get_file_info and then fail to list it.
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    prefix = root.rstrip("/") + "/"
    files = {i.path[len(prefix):].replace(os.sep, "/"): i.size
             for i in infos if i.type == pafs.FileType.File}
    return dict(sorted(files.items()))


# -- reading and writing -----------------------------------------------------------------

def open_input(path):
    """A pyarrow input stream. compression=None: pyarrow would otherwise decompress
    *.gz / *.zst / ... transparently, and a copy would change the bytes."""
    fs, p = resolve(path)
    with _errors(path):
        return fs.open_input_stream(p, compression=None)


def open_output(path):
    """A pyarrow output stream (parents created locally). Not atomic on local disk; use
    write_bytes for small files that must never be seen half-written. An S3 object
    only appears when the stream closes."""
    fs, p = resolve(path)
    with _errors(path):
        if not is_s3(path):
            os.makedirs(os.path.dirname(p), exist_ok=True)
        return fs.open_output_stream(p, compression=None)


def read_bytes(path) -> bytes:
    with _errors(path), open_input(path) as stream:
        return stream.read()


def read_text(path, encoding: str = "utf-8") -> str:
    return read_bytes(path).decode(encoding)


def write_bytes(path, data: bytes) -> None:
    """Write a whole file. Locally via a temp file in the same dir + os.replace, so readers
    see the old or the new file, never a torn one; on S3 a PUT is atomic already."""
    if is_s3(path):
        with _errors(path), open_output(path) as stream:  # the upload completes at close
            stream.write(data)
        return
    _, p = resolve(path)
    with _errors(path):
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = os.path.join(os.path.dirname(p), f".{os.path.basename(p)}.{uuid.uuid4().hex[:8]}.tmp")
        # os.open with 0o666 keeps the umask's permissions (mkstemp would force 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            _remove_quietly(tmp)
            raise


def write_text(path, text: str, encoding: str = "utf-8") -> None:
    write_bytes(path, text.encode(encoding))


def _remove_quietly(p: str) -> None:
    try:
        os.remove(p)
    except OSError:
        pass


def remove_tree(path) -> None:
    """Delete a file or a directory tree; a missing path is fine. On S3 a bucket root
    is emptied, never deleted."""
    info = _info(path)
    if info.type == pafs.FileType.NotFound:
        return
    fs, p = resolve(path)
    with _errors(path):
        try:
            if info.type == pafs.FileType.File:
                fs.delete_file(p)
            elif is_s3(path) and "/" not in p:
                fs.delete_dir_contents(p)
            else:
                fs.delete_dir(p)
        except FileNotFoundError:
            pass  # gone meanwhile, or a seaweedfs empty prefix that lists as not found


def check_writable(path) -> None:
    """Fail now, naming `path`, if a run could not write its checkpoints there: create
    the dir, write and delete a probe object. On S3 the bucket must exist beforehand
    (some servers, seaweedfs among them, create a bucket on first PUT; AWS does not)."""
    probe = join(path, f".wr-write-probe-{uuid.uuid4().hex[:12]}")
    fs, p = resolve(probe)
    if is_s3(path):
        if _bucket_missing(path):
            raise StorageError(f"{path}: bucket {_split_s3(path)[0]} does not exist")
        with _errors(path):
            with fs.open_output_stream(p, compression=None) as stream:
                stream.write(b"ok")
            fs.delete_file(p)
        return
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b"ok")
        os.remove(p)
    except OSError as exc:
        raise StorageError(f"{path}: not writable ({exc.strerror or _detail(exc)})") from exc


# -- copying -------------------------------------------------------------------------------

def _copy_file(src: str, dst: str, on_bytes: Callable[[int], None]) -> int:
    """Copy one file between any two filesystems in CHUNK pieces; returns bytes copied.
    Read errors name `src`, write and close (S3: upload completion) errors name `dst`."""
    copied = 0
    with _errors(src), open_input(src) as fin:
        with _errors(dst), open_output(dst) as fout:
            while True:
                with _errors(src):
                    chunk = fin.read(CHUNK)
                if not chunk:
                    return copied
                fout.write(chunk)
                copied += len(chunk)
                on_bytes(len(chunk))


class _Progress:
    """Thread-safe byte counter that logs at most every PROGRESS_EVERY_S seconds, so
    short copies stay silent and long ones show files done/total and MB."""

    def __init__(self, total_files: int, total_bytes: int, label: str, log, enabled: bool):
        self.total_files, self.total_bytes, self.label = total_files, total_bytes, label
        self.log, self.enabled = log, enabled
        self.files = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()
        self.logged = False

    def add_bytes(self, n: int) -> None:
        with self.lock:
            self.bytes += n

    def file_done(self) -> None:
        with self.lock:
            self.files += 1

    def maybe_log(self, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (now - self.last < PROGRESS_EVERY_S and not (final and self.logged)):
            return
        self.last, self.logged = now, True
        rate = self.bytes / MB / max(now - self.start, 1e-6)
        self.log(f"{self.label}: {self.files}/{self.total_files} files, "
                 f"{self.bytes / MB:.1f}/{self.total_bytes / MB:.1f} MB ({rate:.1f} MB/s)")


def copy_tree(src, dst, progress: bool = True, log=print) -> dict[str, int]:
    """Copy every file under `src` to the same relpath under `dst` (local or s3:// on
    either side), several files at a time; then check every destination size against
    the source listing. Returns the source listing {relpath: size}."""
    listing = list_files(src)
    copy_files(src, dst, listing, progress=progress, log=log)
    return listing


def copy_files(src, dst, listing: dict[str, int], progress: bool = True, log=print) -> int:
    """Copy the files `listing` names ({relpath: size}) from under `src` to the same
    relpaths under `dst`, several at a time; each must arrive with its listed size.
    Returns the bytes copied."""
    report = _Progress(len(listing), sum(listing.values()), f"copy {src} -> {dst}", log, progress)
    with cf.ThreadPoolExecutor(max_workers=max(1, min(COPY_WORKERS, len(listing)))) as pool:
        futures = {pool.submit(_copy_file, join(src, rel), join(dst, rel), report.add_bytes): rel
                   for rel in listing}
        pending = set(futures)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=1.0, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    copied, rel = future.result(), futures[future]
                    if copied != listing[rel]:
                        raise StorageError(f"{join(src, rel)}: read {copied} bytes, listed "
                                           f"size is {listing[rel]} (changed during the copy?)")
                    report.file_done()
                report.maybe_log()
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    report.maybe_log(final=True)
    _check_sizes(listing, dst)
    return sum(listing.values())


def _check_sizes(expected: dict[str, int], dst) -> None:
    actual = list_files(dst) if expected else {}
    for rel, size in expected.items():
        if rel not in actual:
            raise StorageError(f"{join(dst, rel)}: missing after the copy")
        if actual[rel] != size:
            raise StorageError(f"{join(dst, rel)}: {actual[rel]} bytes after the copy, "
                               f"source has {size}")


# -- hashing ---------------------------------------------------------------------------------

def sha256_file(path) -> str:
    """The sha256 hex digest of a local file, read in CHUNK pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()
