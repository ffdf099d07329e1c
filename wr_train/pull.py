"""`wr-train pull`: a finished checkpoint or export (s3:// or local) into a local
directory, checked against its state.json before and after the copy, and swapped into
place so the destination never holds half of one."""
from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid

from wr_train import storage
from wr_train.checkpoint import STATE, check_files, read_state
from wr_train.storage import MB, StorageError


def _files_to_check(src, listing: dict[str, int]) -> dict[str, dict] | None:
    """A checkpoint's `files` map (its state.json, checked by wr_train.checkpoint), None
    for an exported model (config.json); anything else is refused."""
    if STATE in listing:
        return read_state(src)["files"]
    if "config.json" in listing:
        return None
    raise StorageError(f"{src}: neither a wr-train checkpoint (no {STATE}) nor an exported model "
                       f"(no config.json)")


def _dest_ready(dst: str, overwrite: bool) -> None:
    if os.path.isdir(dst):
        if os.listdir(dst) and not overwrite:
            raise StorageError(f"{dst}: not empty; pass --overwrite")
    elif os.path.lexists(dst) and not overwrite:
        raise StorageError(f"{dst}: exists and is not a directory; pass --overwrite")


def _swap_into_place(partial: str, dst: str) -> None:
    """Rename the finished copy to `dst`; an old `dst` is moved aside first and deleted
    after, so `dst` never holds a mix of old and new files."""
    old = None
    if os.path.lexists(dst):
        old = f"{dst}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(partial, dst)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.remove(old)


def pull(src, dst, overwrite: bool = False, log=print) -> dict:
    """Copy a finished checkpoint or export (s3:// or local) to the local directory `dst`.

    Refuses a non-empty `dst` unless overwrite, and a `src` that is neither a checkpoint
    (state.json) nor an export (config.json). A checkpoint's listed files are checked
    before copying (missing / short files fail fast, nothing is written) and after (size,
    sha256). The
    copy goes to `dst`.partial and is renamed at the end, so `dst` never holds half a
    checkpoint. Returns {"src", "dest", "files", "bytes", "seconds"}.
    """
    start = time.monotonic()
    if storage.is_s3(dst):
        raise StorageError(f"{dst}: pull needs a local destination directory")
    dst = storage.resolve(dst)[1].rstrip(os.sep) or os.sep
    listing = storage.list_files(src)
    if not listing:
        raise StorageError(f"{src}: no files to pull")
    files = _files_to_check(src, listing)
    if files is not None:
        check_files(src, files, listing)  # missing / short files fail before anything is written
    _dest_ready(dst, overwrite)
    partial = dst + ".partial"
    try:
        storage.remove_tree(partial)  # left over from an interrupted pull
        storage.copy_tree(src, partial, log=log)
        if files is not None:
            check_files(src, files, storage.list_files(partial), local_root=partial)
        try:
            _swap_into_place(partial, dst)
        except OSError as exc:
            raise storage.translate(exc, dst) from exc
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    summary = {"src": str(src), "dest": dst, "files": len(listing),
               "bytes": sum(listing.values()), "seconds": round(time.monotonic() - start, 3)}
    log(f"pulled {summary['files']} files ({summary['bytes'] / MB:.1f} MB) from {src} "
        f"to {dst} in {summary['seconds']:.1f}s")
    return summary
