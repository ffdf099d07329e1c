"""The shard format: what `wr-train preprocess` writes and every later stage reads.

A shard directory (local or s3://) holds
    part-NNNNN.parquet   train rows: `row_id` (int64, dense 0..rows-1 in corpus order, delta
                         encoded) and `input_ids` (fixed-size lists of seq_length int32 ids),
                         in row groups of BLOCK_ROWS rows (the unit the training stream reads),
                         ROWS_PER_SHARD rows a file (the last one shorter), zstd pages with
                         a CRC32 each (checked on every read)
    eval/part-*.parquet  the held-out documents' rows, the same way (row_id from 0)
    spm.model            the segmenter that made the ids (pretraining copies it on)
    token_counts.npy     how often each id occurs in the train rows
    manifest.json        `Manifest`, written last: every file with its size and row groups
A directory without manifest.json, or whose files do not match it, is incomplete, and
`load_manifest` refuses it with a one-line ShardError.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from wr_train import storage

ROWS_PER_SHARD = 64 * 1024
BLOCK_ROWS = 1024              # Parquet row group = the unit the training stream reads
EVAL_DIR = "eval"              # the held-out documents' rows, beside the train rows
MANIFEST = "manifest.json"
SPM = "spm.model"
TOKEN_COUNTS = "token_counts.npy"


class ShardError(ValueError):
    """A shard directory that is not what `wr-train preprocess` wrote (or a manifest, spm
    model or count file that does not match it); one line naming the file and what was
    expected."""


class ShardReadError(ShardError):
    """A row group (or a file's footer) that cannot be read: names the file, the group and
    why; `reason` alone is what `wr-train check-shards` lists."""

    def __init__(self, path: str, group: int | None, reason: str):
        self.path, self.group, self.reason = path, group, reason
        where = f"{path} row group {group}" if group is not None else path
        folder = path.rsplit("/", 2 if f"/{EVAL_DIR}/" in path else 1)[0]
        super().__init__(f"{where}: cannot be read ({reason}); `wr-train check-shards {folder}` "
                         f"checks every row group")

    def __reduce__(self):  # rebuilt from its parts when Ray carries it out of a worker
        return ShardReadError, (self.path, self.group, self.reason)


@dataclass
class Manifest:
    seq_length: int
    packing: str
    rows: int = 0
    tokens: int = 0               # rows × seq_length
    non_pad_tokens: int = 0       # text_tokens + the added [CLS]/[SEP]
    text_tokens: int = 0          # ids of the encoded documents alone
    pad_fraction: float = 0.0
    documents: int = 0
    lines: int = 0                # non-empty decoded lines (jsonl/Parquet: records)
    skipped: dict = field(default_factory=dict)   # why -> count
    split_long_lines: int = 0
    vocab_size: int = 0
    spm_sha256: str = ""
    sources: list = field(default_factory=list)   # [{path, bytes, format, field (jsonl/parquet)}]
    files: dict = field(default_factory=dict)     # part file -> {rows, first_row_id, row_groups, size}
    chunks: int = 0
    seconds: float = 0.0
    heldout: float = 0.0          # share of documents held out (by a hash of their text)
    eval: dict = field(default_factory=dict)      # the held-out rows: rows, documents, tokens, files
    unigram: dict = field(default_factory=dict)   # the floor a model must beat (preprocess.unigram_floor)


# ---------------------------------------------------------------- the id column

def id_column(rows: np.ndarray) -> pa.FixedSizeListArray:
    """[n, seq_length] ids as the shards' `input_ids` column (fixed-size lists of int32)."""
    flat = np.ascontiguousarray(rows, dtype=np.int32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), rows.shape[1])


def rows_of(table: pa.Table) -> np.ndarray:
    """The `input_ids` column of a table (a task's output or a shard) as an
    [n, seq_length] int32 view: the inverse of id_column."""
    ids = table.column("input_ids").combine_chunks()
    return ids.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), ids.type.list_size)


# ---------------------------------------------------------------- writing

class ShardWriter:
    """Streams the rows into part-NNNNN.parquet files of rows_per_shard rows (the last one
    shorter), row groups of BLOCK_ROWS rows, row_id counting from 0. Whole row groups go
    to the open file as soon as they are complete, so memory stays at one chunk's rows
    plus less than a row group, whatever the shard size."""

    def __init__(self, root: str, seq_length: int, rows_per_shard: int):
        self.root, self.seq_length, self.rows_per_shard = root, seq_length, rows_per_shard
        self.files: dict = {}
        self.rows = 0                      # rows handed to a file so far
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0              # < BLOCK_ROWS (or < what the file still takes)
        self._writer = self._sink = self._name = None
        self._file_rows = 0

    def add(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        if self.pending:
            rows = np.concatenate(self.pending + [rows])
        pos, n = 0, len(rows)
        while pos < n:
            room = self.rows_per_shard - self._file_rows
            take = min(room, n - pos)
            if take < room:
                take -= take % BLOCK_ROWS  # only whole row groups until the file is full
            if not take:
                break
            self._append(rows[pos:pos + take])
            pos += take
        self.pending = [rows[pos:]] if pos < n else []
        self.pending_rows = n - pos

    def close(self) -> None:
        if self.pending_rows:
            self._append(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        if self._writer is not None:
            self._close_file()

    def abort(self) -> None:
        """Close an open file without recording it (the caller deletes the directory; an
        S3 object only exists once closed, so close first, then delete)."""
        try:
            if self._writer is not None:
                self._writer.close()
            if self._sink is not None:
                self._sink.close()
        except Exception:
            pass
        self._writer = self._sink = None

    def _append(self, rows: np.ndarray) -> None:
        import pyarrow.parquet as pq
        if self._writer is None:
            self._name = f"part-{len(self.files):05d}.parquet"
            self._first, self._file_rows = self.rows, 0
        path = storage.join(self.root, self._name)
        table = pa.table({
            "row_id": pa.array(np.arange(self.rows, self.rows + len(rows), dtype=np.int64)),
            "input_ids": id_column(rows),
        })
        try:
            if self._writer is None:
                self._sink = storage.open_output(path)
                # Dictionary encoding of token ids costs 3x the time of zstd and makes the
                # file bigger; row_id is an arange, which delta encoding stores in bytes.
                # A CRC32 per page (4 bytes): token ids barely compress, zstd stores them as
                # raw blocks, and a flipped byte there decodes without error into another
                # id; open_shard verifies the CRCs, so the read (and check-shards) fails.
                self._writer = pq.ParquetWriter(
                    self._sink, table.schema, compression="zstd", use_dictionary=False,
                    column_encoding={"row_id": "DELTA_BINARY_PACKED"},
                    write_statistics=["row_id"], write_page_checksum=True)
            self._writer.write_table(table, row_group_size=BLOCK_ROWS)
        except (OSError, pa.ArrowException) as e:
            raise storage.translate(e, path) from None
        self.rows += len(rows)
        self._file_rows += len(rows)
        if self._file_rows == self.rows_per_shard:
            self._close_file()

    def _close_file(self) -> None:
        path = storage.join(self.root, self._name)
        try:
            self._writer.close()
            self._sink.close()  # S3: the upload completes here
            fs, inner = storage.resolve(path)
            size = fs.get_file_info(inner).size
        except (OSError, pa.ArrowException) as e:
            raise storage.translate(e, path) from None
        finally:
            self._writer = self._sink = None
        n, self._file_rows = self._file_rows, 0
        groups = [min(BLOCK_ROWS, n - s) for s in range(0, n, BLOCK_ROWS)]
        self.files[self._name] = {"rows": n, "first_row_id": self._first, "row_groups": groups,
                                  "size": size}


# ---------------------------------------------------------------- reading

def load_manifest(shards: str) -> dict:
    """The manifest of a complete shard directory, or a one-line error."""
    path = storage.join(shards, MANIFEST)
    try:
        if not storage.exists(path):
            raise ShardError(f"{shards}: not a complete shard directory (no manifest.json; "
                              f"made by `wr-train preprocess`)")
        manifest = json.loads(storage.read_text(path))
        listing = storage.list_files(shards)
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if SPM not in listing:
        raise ShardError(f"{shards}: not a complete shard directory (no spm.model)")
    for name, info in {**manifest.get("files", {}), **manifest.get("eval", {}).get("files", {})}.items():
        if listing.get(name) != info["size"]:
            raise ShardError(f"{shards}/{name}: missing or truncated shard "
                              f"(expected {info['size']} bytes, found {listing.get(name)})")
    return manifest


def check_spm(shards: str, manifest: dict) -> None:
    """The folder's spm.model must be the segmenter that made the ids: its sha256 must be
    the manifest's `spm_sha256`, else a one-line ShardError naming the file and both
    hashes (a swapped spm.model would train and export with the wrong vocabulary)."""
    import hashlib
    path = storage.join(shards, SPM)
    expected = manifest.get("spm_sha256")
    if not expected:
        raise ShardError(f"{storage.join(shards, MANIFEST)}: no spm_sha256 (made by an older "
                          f"`wr-train preprocess`?); cannot check {SPM}")
    try:
        found = hashlib.sha256(storage.read_bytes(path)).hexdigest()
    except storage.StorageError as e:
        raise ShardError(str(e)) from None
    if found != expected:
        raise ShardError(f"{path}: sha256 {found[:12]}… is not the manifest's spm_sha256 "
                          f"{expected[:12]}… (not the segmenter that made these shards)")


def read_token_counts(shards: str, vocab_size: int) -> np.ndarray:
    """How often each id occurs in the train rows ([vocab_size] int64, token_counts.npy)."""
    import io
    path = storage.join(shards, TOKEN_COUNTS)
    try:
        counts = np.load(io.BytesIO(storage.read_bytes(path)))
    except (storage.StorageError, OSError, ValueError) as e:
        raise ShardError(f"{path}: expected the train tokens' counts that `wr-train preprocess` "
                          f"writes ({e})") from None
    if counts.shape != (vocab_size,):
        raise ShardError(f"{path}: expected {vocab_size} counts (the manifest's vocab_size), "
                          f"found shape {counts.shape}")
    return counts.astype(np.int64)


def read_rows(shards: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row_id, input_ids[n, L]) of one shard file; a group that cannot be read is a
    ShardReadError naming the file and the group."""
    shard = open_shard(shards, name)
    if not shard.num_row_groups:
        table = shard.parquet.read()
        return table.column("row_id").to_numpy(), rows_of(table).astype(np.int64)
    parts = [read_group(shard, g) for g in range(shard.num_row_groups)]
    return (np.concatenate([r for r, _ in parts]),
            np.concatenate([x for _, x in parts]).astype(np.int64))


class ShardFile:
    """One open shard file: its `path` and its pyarrow ParquetFile (`parquet`), whose
    attributes it answers too (`num_row_groups`, `metadata`, …)."""

    def __init__(self, path: str, parquet):
        self.path, self.parquet = path, parquet

    def __getattr__(self, attr):
        if attr == "parquet":  # not set yet (a copy being built)
            raise AttributeError(attr)
        return getattr(self.parquet, attr)


def open_shard(shards: str, name: str) -> ShardFile:
    """One shard file, for reading it a row group at a time (read_group), every page's
    CRC checked (files written before the CRCs have none to check); a missing file is a
    StorageError, an unreadable footer a ShardReadError, each naming the file."""
    import pyarrow.parquet as pq
    path = storage.join(shards, name)
    fs, inner = storage.resolve(path)
    try:
        source = fs.open_input_file(inner)
    except (OSError, pa.ArrowException) as e:
        raise storage.translate(e, path) from None
    try:
        return ShardFile(path, pq.ParquetFile(source, page_checksum_verification=True))
    except (OSError, pa.ArrowException) as e:
        raise ShardReadError(path, None, _first_line(e)) from None


def read_group(shard: ShardFile, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_id, input_ids[n, L] int32) of row group `group` of an open_shard file; one
    that cannot be read (corrupt bytes, a failed S3 read) is a one-line ShardReadError
    naming the file and the group, not pyarrow's bare `ZSTD decompression failed`."""
    try:
        table = shard.parquet.read_row_group(group)
        return table.column("row_id").to_numpy(), rows_of(table)
    except (OSError, pa.ArrowException, KeyError) as e:
        raise ShardReadError(shard.path, group, _first_line(e)) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def read_eval_rows(shards: str, manifest: dict, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(row_id, input_ids[n, L]) of the first `limit` held-out rows (fewer if there are
    fewer; none when preprocess held out nothing)."""
    ids, rows, n = [], [], 0
    for name in sorted(manifest.get("eval", {}).get("files", {})):
        if n >= limit:
            break
        r, x = read_rows(shards, name)
        ids.append(r[:limit - n])
        rows.append(x[:limit - n])
        n += len(ids[-1])
    if not ids:
        seq = manifest["seq_length"]
        return np.zeros(0, np.int64), np.zeros((0, seq), np.int64)
    return np.concatenate(ids), np.concatenate(rows)
