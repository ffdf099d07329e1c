"""Corpus -> packed Parquet shards, on Ray Data.

read (byte-range chunks of local or s3:// text files) -> clean -> encode (spm) -> pack,
all inside Ray Data function tasks, one chunk per task; the driver streams the packed
rows back *in chunk order* and writes fixed-size Parquet shards, so `row_id` is dense
(0..rows-1), global and the same on every run. `manifest.json` is written last: a shard
directory without it is incomplete and every later stage refuses it; a failed or interrupted run
deletes what it wrote. The tasks are plain function tasks of one CPU each (no actor pool),
so on 2 CPUs nothing can starve the read (the deadlock in NOTES.md). Memory does not grow
with the corpus: a task holds one chunk, the driver one chunk's rows plus less than a
Parquet row group (ShardWriter), Ray Data keeps a bounded number of chunks in flight.
The driver forwards its AWS_* variables to the tasks, so a Ray started before they were
set still reads and writes the same S3 endpoint.

Cleaning (per line of a UTF-8 text file, one document per line): a line that does not
decode as UTF-8 is skipped and counted (`skipped.undecodable_lines`); the rest is
stripped of surrounding whitespace; a line that is then empty, or that spm encodes to no
piece at all (e.g. only zero-width characters), is skipped and counted
(`skipped.empty_lines`). A line longer than MAX_DOC_CHARS stays one document but is
encoded in pieces cut after sentence ends (hard cut where there is none; the pieces
concatenate back to the line), so one encode call's memory stays bounded; such lines are
counted in `split_long_lines`.

Packings (what one row of `seq_length` ids holds; PAD = 0):
- full (default, RoBERTa FULL-SENTENCES): the documents of a chunk form one stream
  `d1 [SEP] d2 [SEP] d3 [SEP] …`, cut into pieces of seq_length-1 ids; every row is
  `[CLS] piece`, so a document may start mid-row and run on into the next row. Only the
  last row of a chunk (CHUNK_BYTES of text) is padded, so padding stays near zero.
- doc (the seed's recipe): each document alone, cut into pieces of seq_length-2 ids; every
  row is `[CLS] piece [SEP]` followed by padding (only a document's last row is short).
Either way the non-pad ids of all rows, with the added [CLS]/[SEP] taken out, are the
encoded documents in corpus order, each exactly once.

Held out (`heldout`, default 1%): a share of the documents, chosen by a hash of their
text, is packed the same way into `eval/part-*.parquet` (row_id from 0) instead of the
train rows, for pretraining's evaluation. The driver counts the train rows' token ids
(`token_counts.npy`); the manifest's `unigram` is the floor they give: the loss and
accuracy of a model that predicts every masked token from those frequencies alone.
"""
from __future__ import annotations

import codecs
import concurrent.futures as cf
import fnmatch
import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wr_train import storage
from wr_train.local_ray import ensure_ray
from wr_train.tokenizer import CLS, NUM_SPECIAL, PAD, SEP, check_spm_dir, file_sha256, load_spm

CHUNK_BYTES = 8 << 20          # one Ray Data task reads at most this many bytes of text
MAX_DOC_CHARS = 20_000         # longer lines are encoded in pieces (see module doc)
ROWS_PER_SHARD = 64 * 1024
BLOCK_ROWS = 1024              # Parquet row group = the unit the training stream reads
EVAL_DIR = "eval"              # the held-out documents' rows, beside the train rows
HEAD_BYTES = 65536             # what check_text_file looks at
TASKS_PER_CPU = 1              # tasks in flight per CPU (more only costs memory: with
                               # outputs handed over at once, a CPU idles < 0.05 s per task)
STAT_KEYS = ("lines", "documents", "undecodable_lines", "empty_lines", "split_long_lines",
             "text_tokens", "non_pad_tokens", "eval_documents", "eval_text_tokens",
             "eval_non_pad_tokens")
HELDOUT = 0.01                 # share of documents held out as evaluation rows
_SENTENCE_ENDS = "。！？!?；;…"
_S3_ENV_PREFIXES = ("AWS_",)   # forwarded to the tasks (a Ray started earlier lacks them)


class CorpusError(ValueError):
    pass


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
    lines: int = 0                # non-empty decoded lines
    skipped: dict = field(default_factory=dict)   # why -> count
    split_long_lines: int = 0
    vocab_size: int = 0
    spm_sha256: str = ""
    sources: list = field(default_factory=list)   # [{path, bytes}]
    files: dict = field(default_factory=dict)     # part file -> {rows, first_row_id, row_groups, size}
    chunks: int = 0
    seconds: float = 0.0
    heldout: float = 0.0          # share of documents held out (by a hash of their text)
    eval: dict = field(default_factory=dict)      # the held-out rows: rows, documents, tokens, files
    unigram: dict = field(default_factory=dict)   # the floor a model must beat (unigram_floor)


# ---------------------------------------------------------------- input listing

def _glob_base(pat: str) -> str:
    """The directory above the first path component with a wildcard."""
    prefix = "s3://" if storage.is_s3(pat) else ""
    parts = pat[len(prefix):].split("/")
    fixed = []
    for part in parts[:-1]:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    if not fixed:
        return prefix or "."
    return prefix + ("/".join(fixed) or "/")


def list_sources(patterns: list[str]) -> list[tuple[str, int]]:
    """(path, size) of every text file named by paths, dirs (*.txt inside) or globs."""
    out: list[tuple[str, int]] = []
    for pat in patterns:
        try:
            if any(c in pat for c in "*?["):
                base = _glob_base(pat)
                listing = ({storage.join(base, k): v for k, v in storage.list_files(base).items()}
                           if storage.isdir(base) else {})
                rel = (lambda p: os.path.relpath(p)) if base == "." else (lambda p: p)
                found = {rel(p): s for p, s in listing.items() if fnmatch.fnmatch(rel(p), pat)}
            elif storage.isdir(pat):
                found = {storage.join(pat, k): v for k, v in storage.list_files(pat).items()
                         if k.endswith(".txt")}
            elif storage.exists(pat):
                fs, inner = storage.resolve(pat)
                found = {pat: fs.get_file_info(inner).size}
            else:
                found = {}
        except storage.StorageError as e:
            raise CorpusError(f"--corpus {e}") from None
        if not found:
            raise CorpusError(f"--corpus {pat}: no such file, or no *.txt files in it "
                              f"(expected UTF-8 text files, one document per line)")
        out.extend(sorted(found.items()))
    return out


def check_text_file(path: str) -> None:
    """Refuse, up front, a file that is not UTF-8 text: NUL bytes in its first 64 KiB
    (binary), or most of the lines there not decoding (another encoding, e.g. GBK).
    A few undecodable lines are not an error: they are skipped and counted."""
    try:
        with storage.open_input(path) as f:
            head = f.read(HEAD_BYTES)
    except storage.StorageError as e:
        raise CorpusError(f"--corpus {e}") from None
    if b"\x00" in head:
        raise CorpusError(f"--corpus {path}: binary file (NUL bytes), expected UTF-8 text, "
                          f"one document per line")
    lines = head.split(b"\n")
    last = lines.pop()  # possibly cut off by the 64 KiB limit
    bad = 0
    for raw in lines:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    try:  # an incremental decoder accepts a character cut at the end of the head
        codecs.getincrementaldecoder("utf-8")().decode(last, final=len(head) < HEAD_BYTES)
    except UnicodeDecodeError:
        bad += 1
    total = len(lines) + (1 if last else 0)
    if total and bad * 2 > total:
        raise CorpusError(f"--corpus {path}: not UTF-8 text ({bad} of the first {total} lines "
                          f"do not decode), expected UTF-8 text, one document per line")


def plan_chunks(sources: list[tuple[str, int]], chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """Byte ranges of at most chunk_bytes, a file's ranges of equal size (a 17 MB file in
    8 MB chunks gives 3 x 5.7 MB, not 8 + 8 + 1: the tasks finish closer together)."""
    chunks = []
    for path, size in sources:
        if size <= 0:
            continue
        n = -(-size // chunk_bytes)
        step = -(-size // n)
        for start in range(0, size, step):
            chunks.append({"chunk": len(chunks), "path": path, "start": start,
                           "end": min(start + step, size)})
    return chunks


# ---------------------------------------------------------------- per-chunk work (Ray tasks)

def read_chunk(path: str, start: int, end: int) -> bytes:
    """The bytes of the lines that *start* inside [start, end): a line straddling `end`
    belongs to this chunk, one straddling `start` to the previous chunk."""
    fs, inner = storage.resolve(path)
    try:
        return _read_range(fs.open_input_file(inner), start, end)
    except (OSError, pa.ArrowException) as e:
        raise storage.translate(e, path) from None


def _read_range(f, start: int, end: int) -> bytes:
    with f:
        if start > 0:
            f.seek(start - 1)
            data = f.read(end - start + 1)
            cut = data.find(b"\n")
            if cut < 0:
                return b""  # the whole range is inside a line of the previous chunk
            data = data[cut + 1:]
        else:
            data = f.read(end)
        if data and not data.endswith(b"\n"):
            # Finish the last line: it runs on into the next chunk's range.
            tail = []
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                nl = block.find(b"\n")
                if nl >= 0:
                    tail.append(block[:nl + 1])
                    break
                tail.append(block)
            data += b"".join(tail)
    return data


def read_chunk_lines(path: str, start: int, end: int) -> list[bytes]:
    """read_chunk split into lines (without their newlines)."""
    lines = read_chunk(path, start, end).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return lines


def split_long_line(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut `text` into pieces of at most max_chars, each ending after the last sentence
    end inside its window (a hard cut where there is none). "".join(pieces) == text."""
    pieces = []
    start, n = 0, len(text)
    while n - start > max_chars:
        stop = start + max_chars
        cut = max(text.rfind(c, start, stop) for c in _SENTENCE_ENDS)
        cut = cut + 1 if cut >= start else stop
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def clean_documents(data: bytes | list[bytes], stats: dict, *, bom: bool = False
                    ) -> tuple[list[str], list[bool]]:
    """Decode, strip, drop empty lines -> (texts, ends): ends[i] says texts[i] is the
    last piece of its document (only over-long lines give several pieces)."""
    if isinstance(data, list):
        data = b"\n".join(data) + (b"\n" if data else b"")
    if not data:
        return [], []
    if bom and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:  # the slow path only for chunks with a bad line
        lines = []
        for raw in data.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats["undecodable_lines"] += 1
    if lines and lines[-1] == "" and data.endswith(b"\n"):
        lines.pop()  # the split after the final newline is not a line
    n_lines = len(lines)
    texts = [t for t in map(str.strip, lines) if t]
    stats["empty_lines"] += n_lines - len(texts)
    stats["lines"] += len(texts)
    ends = [True] * len(texts)
    if texts and max(map(len, texts)) > MAX_DOC_CHARS:
        out_texts, out_ends = [], []
        for t in texts:
            if len(t) <= MAX_DOC_CHARS:
                out_texts.append(t)
                out_ends.append(True)
                continue
            stats["split_long_lines"] += 1
            pieces = split_long_line(t)
            out_texts.extend(pieces)
            out_ends.extend([False] * (len(pieces) - 1) + [True])
        texts, ends = out_texts, out_ends
    return texts, ends


def encode_texts(sp, texts: list[str], num_threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(all ids concatenated as int32, the id count of each text)."""
    if not texts:
        return np.zeros(0, np.int32), np.zeros(0, np.int64)
    try:  # sentencepiece >= 0.2.1 hands out int32 buffers: no Python int per id
        arrays = sp.encode(texts, out_type="numpy", num_threads=num_threads)
        lens = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        return np.concatenate(arrays).astype(np.int32, copy=False), lens
    except (ValueError, TypeError):
        lists = sp.encode(texts, out_type=int, num_threads=num_threads)
        lens = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
        flat = np.fromiter((i for ids in lists for i in ids), dtype=np.int32, count=int(lens.sum()))
        return flat, lens


def _documents(lens: np.ndarray, ends) -> tuple[np.ndarray, np.ndarray]:
    """Per document (pieces up to an end): (id count, index of its first id)."""
    ends = np.asarray(ends, dtype=bool)
    if len(lens) and not ends[-1]:
        raise ValueError("the last piece must end its document")
    piece_end = np.cumsum(lens)
    doc_end = piece_end[ends]
    doc_len = np.diff(doc_end, prepend=0)
    return doc_len, doc_end - doc_len


def pack_flat(flat: np.ndarray, lens: np.ndarray, ends, seq_length: int, packing: str
              ) -> tuple[np.ndarray, int]:
    """Pack concatenated piece ids into rows (see module doc): (rows [n, seq_length] int32,
    documents packed). Documents of zero ids are left out."""
    doc_len, doc_start = _documents(lens, ends)
    keep = doc_len > 0
    doc_len, doc_start = doc_len[keep], doc_start[keep]
    n_docs = len(doc_len)
    if packing == "full":
        body = seq_length - 1
        stream = np.insert(flat, doc_start + doc_len, SEP) if n_docs else flat[:0]
        n_rows = -(-len(stream) // body)
        rows = np.empty((n_rows, seq_length), dtype=np.int32)
        rows[:, 0] = CLS
        padded = np.full(n_rows * body, PAD, dtype=np.int32)
        padded[:len(stream)] = stream
        rows[:, 1:] = padded.reshape(n_rows, body)
        return rows, n_docs
    if packing == "doc":
        body = seq_length - 2
        doc_rows = -(-doc_len // body)
        n_rows = int(doc_rows.sum())
        rows = np.zeros((n_rows, seq_length), dtype=np.int32)
        rows[:, 0] = CLS
        if n_rows:
            # Id k of a document goes to column 1 + k % body of the document's row
            # k // body, i.e. to flat position first_row*L + 1 + k + 2*(k // body).
            # Dropped documents have no ids, so `flat` holds exactly the kept ones.
            row_start = np.cumsum(doc_rows) - doc_rows
            k = np.arange(len(flat), dtype=np.int64)
            k -= np.repeat(doc_start, doc_len)
            dest = np.repeat(row_start * seq_length + 1 - doc_start, doc_len)
            dest += np.arange(len(flat), dtype=np.int64)
            k //= body
            k *= 2
            dest += k
            del k
            rows.reshape(-1)[dest] = flat
            del dest
            # [SEP] after each row's piece: row j of a document holds
            # min(body, len - j*body) ids.
            row_doc = np.repeat(np.arange(n_docs), doc_rows)
            j = np.arange(n_rows) - row_start[row_doc]
            piece = np.minimum(body, doc_len[row_doc] - j * body)
            rows[np.arange(n_rows), 1 + piece] = SEP
        return rows, n_docs
    raise CorpusError(f"--packing {packing}: expected 'full' or 'doc'")


def pack_rows(docs_ids: list, ends: list[bool], seq_length: int, packing: str) -> np.ndarray:
    """Pack encoded pieces (lists or arrays of ids) into rows (see module doc).
    ends[i]: piece i ends its document."""
    lens = np.fromiter(map(len, docs_ids), dtype=np.int64, count=len(docs_ids))
    flat = (np.concatenate([np.asarray(d, dtype=np.int32) for d in docs_ids])
            if len(docs_ids) else np.zeros(0, np.int32))
    return pack_flat(flat, lens, ends, seq_length, packing)[0]


def heldout_pieces(texts: list[str], ends, share: float) -> np.ndarray:
    """Which pieces belong to held-out documents (a bool per piece). A document is held
    out when a hash of its first piece falls under `share`: the choice depends only on
    the text, not on chunking, run or machine, and duplicates land on the same side."""
    ends = np.asarray(ends, dtype=bool)
    if share <= 0 or not len(texts):
        return np.zeros(len(texts), dtype=bool)
    firsts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    limit = int(share * 2 ** 64)
    held_doc = np.fromiter(
        (int.from_bytes(hashlib.blake2b(texts[i].encode(), digest_size=8).digest(), "little") < limit
         for i in firsts), dtype=bool, count=len(firsts))
    return np.repeat(held_doc, np.diff(np.append(firsts, len(texts))))


def chunk_rows(sp, path: str, start: int, end: int, seq_length: int, packing: str,
               num_threads: int = 1, heldout: float = 0.0) -> tuple[np.ndarray, np.ndarray, dict]:
    """One chunk, read -> clean -> encode -> pack: (train rows, held-out rows, counts by
    STAT_KEYS). A `heldout` share of the documents is packed apart as evaluation rows."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    texts, ends = clean_documents(read_chunk(path, start, end), stats, bom=start == 0)
    flat, lens = encode_texts(sp, texts, num_threads)
    ends = np.asarray(ends, dtype=bool)
    held = heldout_pieces(texts, ends, heldout)
    out = []
    for prefix, sel in (("", ~held), ("eval_", held)):
        part = flat if sel.all() else flat[np.repeat(sel, lens)]
        rows, n_docs = pack_flat(part, lens[sel], ends[sel], seq_length, packing)
        added = len(rows) + n_docs if packing == "full" else 2 * len(rows)
        stats[prefix + "documents"] = n_docs
        stats[prefix + "text_tokens"] = len(part)
        stats[prefix + "non_pad_tokens"] = len(part) + added
        out.append(rows)
    empty = int(ends.sum()) - stats["documents"] - stats["eval_documents"]
    stats["empty_lines"] += empty      # lines that encode to nothing
    stats["lines"] -= empty
    return out[0], out[1], stats


_SPM_CACHE: dict = {}


def _processor(model_proto: bytes):
    import sentencepiece as spm
    key = hashlib.sha256(model_proto).hexdigest()
    sp = _SPM_CACHE.get(key)
    if sp is None:
        sp = _SPM_CACHE[key] = spm.SentencePieceProcessor(model_proto=model_proto)
    return sp


def encode_and_pack(batch: dict, model_proto: bytes, seq_length: int, packing: str,
                    heldout: float = 0.0, env: dict | None = None) -> pa.Table:
    """Ray Data task body: one chunk in, its packed rows (+ the chunk's counts) out, as an
    Arrow table whose `input_ids` is already the FixedSizeList column the shards store
    (no tensor-extension round trip on either side). The counts ride on the first row; a
    chunk without rows sends one dummy row (real=False); held-out rows come after the
    chunk's train rows, marked heldout=True."""
    for key, value in (env or {}).items():  # S3 endpoint/credentials of the driver
        if os.environ.get(key) != value:
            os.environ[key] = value
    sp = _processor(model_proto)
    path, start, end = str(batch["path"][0]), int(batch["start"][0]), int(batch["end"][0])
    rows, eval_rows, stats = chunk_rows(sp, path, start, end, seq_length, packing, heldout=heldout)
    held = np.repeat([False, True], [len(rows), len(eval_rows)])
    rows = np.concatenate([rows, eval_rows]) if len(eval_rows) else rows
    n = len(rows)
    real = n > 0
    if not real:
        rows, n, held = np.zeros((1, seq_length), dtype=np.int32), 1, np.zeros(1, dtype=bool)
    columns = {"input_ids": id_column(rows),
               "chunk": np.full(n, int(batch["chunk"][0]), dtype=np.int64),
               "real": np.full(n, real), "heldout": held}
    for k in STAT_KEYS:
        col = np.zeros(n, dtype=np.int64)
        col[0] = stats[k]
        columns[k] = col
    return pa.table(columns)


def id_column(rows: np.ndarray) -> pa.FixedSizeListArray:
    """[n, seq_length] ids as the shards' `input_ids` column (fixed-size lists of int32)."""
    flat = np.ascontiguousarray(rows, dtype=np.int32).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), rows.shape[1])


def rows_of(table: pa.Table) -> np.ndarray:
    """The `input_ids` column of a table (a task's output or a shard) as an
    [n, seq_length] int32 view: the inverse of id_column."""
    ids = table.column("input_ids").combine_chunks()
    return ids.flatten().to_numpy().reshape(len(ids), ids.type.list_size)


# ---------------------------------------------------------------- driver

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
                self._writer = pq.ParquetWriter(
                    self._sink, table.schema, compression="zstd", use_dictionary=False,
                    column_encoding={"row_id": "DELTA_BINARY_PACKED"},
                    write_statistics=["row_id"])
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


def _s3_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith(_S3_ENV_PREFIXES)}


def _user_error(exc: BaseException) -> BaseException | None:
    """A CorpusError / StorageError raised inside a Ray task, found through Ray's
    wrappers (RayTaskError.cause, UserCodeException.__cause__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (CorpusError, storage.StorageError)):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def unigram_floor(counts: np.ndarray) -> dict:
    """What a model that ignores context scores on MLM targets (non-special tokens) drawn
    from these token counts: its loss is the unigram entropy (nats), its accuracy the
    share of the commonest token."""
    c = np.asarray(counts, dtype=np.float64)[NUM_SPECIAL:]
    total = c.sum()
    if total <= 0:
        return {"targets": 0, "entropy": 0.0, "top_token": 0, "top_fraction": 0.0}
    p = c[c > 0] / total
    top = int(np.argmax(c))
    return {"targets": int(total), "entropy": round(float(-(p * np.log(p)).sum()), 6),
            "top_token": top + NUM_SPECIAL, "top_fraction": round(float(c[top] / total), 6)}


def preprocess(corpus: list[str], spm_dir: str, out: str, seq_length: int = 128,
               packing: str = "full", rows_per_shard: int = ROWS_PER_SHARD,
               chunk_bytes: int = CHUNK_BYTES, heldout: float = HELDOUT, log=print) -> dict:
    """Encode and pack the corpus into OUT/part-*.parquet (+ the held-out documents'
    rows in OUT/eval/) + OUT/spm.model + OUT/token_counts.npy + OUT/manifest.json
    (written last); returns the manifest. Starts a local Ray unless one is running (then
    uses it: the tasks go wherever it has CPUs)."""
    import ray

    t0 = time.time()
    if not 8 <= seq_length <= 512:
        raise CorpusError(f"--seq-length {seq_length}: expected 8..512 (BERT positions)")
    if packing not in ("full", "doc"):
        raise CorpusError(f"--packing {packing}: expected 'full' or 'doc'")
    if not 0 <= heldout < 0.5:
        raise CorpusError(f"--heldout {heldout}: expected a share of documents in [0, 0.5)")
    if isinstance(corpus, str):
        corpus = [corpus]
    spm_model = str(check_spm_dir(spm_dir))
    sp = load_spm(spm_dir)
    with open(spm_model, "rb") as f:
        model_proto = f.read()
    sources = list_sources(corpus)
    with cf.ThreadPoolExecutor(max_workers=8) as pool:  # S3: one GET each, in parallel
        list(pool.map(check_text_file, [p for p, s in sources if s > 0]))
    total_bytes = sum(s for _, s in sources)
    if total_bytes == 0:
        raise CorpusError(f"--corpus {' '.join(corpus)}: empty corpus (0 bytes), expected "
                          f"UTF-8 text, one document per line")
    final, staging = _prepare_output(out)
    chunks = plan_chunks(sources, chunk_bytes)
    log(f"preprocess: {len(sources)} file(s), {total_bytes / 1e6:.1f} MB in "
        f"{len(chunks)} chunk(s) -> seq {seq_length}, packing {packing}, into {final}")
    m = Manifest(seq_length=seq_length, packing=packing, vocab_size=sp.get_piece_size(),
                 spm_sha256=file_sha256(spm_model), chunks=len(chunks), heldout=heldout,
                 sources=[{"path": p, "bytes": s} for p, s in sources])
    totals = dict.fromkeys(STAT_KEYS, 0)
    counts = np.zeros(m.vocab_size, dtype=np.int64)   # train tokens, for the unigram floor
    writer = ShardWriter(staging, seq_length, rows_per_shard)
    eval_writer = ShardWriter(storage.join(staging, EVAL_DIR), seq_length, rows_per_shard)
    try:
        ensure_ray()
        ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
            encode_and_pack, batch_size=1, batch_format="numpy", num_cpus=1 / TASKS_PER_CPU,
            fn_kwargs={"model_proto": model_proto, "seq_length": seq_length,
                       "packing": packing, "heldout": heldout, "env": _s3_env()})
        ctx = ds.context
        ctx.execution_options.preserve_order = True  # chunk order -> stable row_id
        ctx.enable_progress_bars = False
        # Ray Data's per-operator reservation learns the cluster's CPUs from its autoscaling
        # coordinator about 1 s into every run, and until then runs one task at a time
        # (on 2 CPUs that was a third of a 26 MB run). With a single map operator there is
        # nothing to balance; the tasks still take one CPU each, and finished chunks wait
        # in the object store only while the driver is behind (bench/RESULTS.md).
        ctx.op_resource_reservation_enabled = False
        last_log, done = time.time(), 0
        # prefetch_batches=0: a prefetching iterator holds a finished chunk back until the
        # next one is ready, which left the driver's writing to pile up after the last task.
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
            for k in STAT_KEYS:
                totals[k] += int(pc.sum(batch.column(k)).as_py())
            done += len(pc.unique(batch.column("chunk")))
            real = batch.column("real")
            if not pc.all(real).as_py():
                batch = batch.filter(real)
            held = batch.column("heldout").to_numpy(zero_copy_only=False)
            rows = rows_of(batch)
            if held.any():
                eval_writer.add(rows[held])
                rows = rows[~held]
            counts += np.bincount(rows.reshape(-1), minlength=m.vocab_size)
            writer.add(rows)
            if time.time() - last_log > 10:
                last_log = time.time()
                log(f"preprocess: {done}/{len(chunks)} chunks, {writer.rows + writer.pending_rows:,} "
                    f"rows, {totals['text_tokens'] / (time.time() - t0):,.0f} tok/s")
        writer.close()
        eval_writer.close()
        if not writer.files:
            raise CorpusError(f"--corpus {' '.join(corpus)}: empty corpus (no text lines after "
                              f"cleaning: {totals['empty_lines']} empty, "
                              f"{totals['undecodable_lines']} undecodable)")
        m.rows, m.files = writer.rows, writer.files
        m.tokens = m.rows * seq_length
        m.non_pad_tokens, m.text_tokens = totals["non_pad_tokens"], totals["text_tokens"]
        m.pad_fraction = round(1 - m.non_pad_tokens / m.tokens, 6)
        m.documents, m.lines, m.split_long_lines = (totals["documents"], totals["lines"],
                                                    totals["split_long_lines"])
        m.skipped = {"undecodable_lines": totals["undecodable_lines"],
                     "empty_lines": totals["empty_lines"]}
        m.eval = {"rows": eval_writer.rows, "documents": totals["eval_documents"],
                  "text_tokens": totals["eval_text_tokens"],
                  "non_pad_tokens": totals["eval_non_pad_tokens"],
                  "files": {f"{EVAL_DIR}/{k}": v for k, v in eval_writer.files.items()}}
        m.unigram = unigram_floor(counts)
        storage.write_bytes(storage.join(staging, "token_counts.npy"), _npy_bytes(counts))
        m.seconds = round(time.time() - t0, 2)
        # The segmenter travels with its shards: pretraining copies it into every checkpoint.
        storage.write_bytes(storage.join(staging, "spm.model"), model_proto)
        storage.write_text(storage.join(staging, "manifest.json"),
                           json.dumps(asdict(m), indent=2, ensure_ascii=False))
        _publish(staging, final)
    except BaseException as e:
        writer.abort()
        eval_writer.abort()
        _discard(staging)
        found = _user_error(e)
        if isinstance(found, CorpusError):
            raise CorpusError(str(found)) from None
        if isinstance(found, storage.StorageError):
            raise CorpusError(f"preprocess: {found}") from None
        if not isinstance(e, Exception):
            raise
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CorpusError(f"preprocess {' '.join(corpus)} -> {out} failed: "
                          f"{type(e).__name__}: {detail}") from e
    log(f"preprocess: {m.rows:,} rows × {seq_length} in {len(m.files)} shard(s), "
        f"{m.text_tokens:,} text tokens ({m.text_tokens / m.seconds:,.0f} tok/s with start-up),"
        f" pad {m.pad_fraction:.2%}, {m.documents:,} documents, skipped {m.skipped} in {m.seconds:.1f}s")
    log(f"preprocess: held out {m.eval['documents']:,} documents ({heldout:.1%}) as {m.eval['rows']:,} "
        f"eval rows; unigram floor {m.unigram['entropy']:.3f} nats, "
        f"commonest token {m.unigram['top_fraction']:.1%} of targets")
    return asdict(m)


def _npy_bytes(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _prepare_output(out: str) -> tuple[str, str]:
    """(final dir, staging dir). Local: write into a sibling temp dir and rename at the
    end, so OUT never holds half a run. S3 has no rename: write in place, manifest last."""
    try:
        if storage.exists(storage.join(out, "manifest.json")) or (
                storage.isdir(out) and storage.list_files(out)):
            raise CorpusError(f"--out {out}: not empty; choose a new directory or delete it")
        if storage.is_s3(out):
            storage.check_writable(out)
            return out, out
        if os.path.exists(out) and not os.path.isdir(out):
            raise CorpusError(f"--out {out}: exists and is not a directory")
        parent = os.path.dirname(os.path.abspath(out))
        storage.check_writable(parent)
        staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}"
                                       f".partial-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        return os.path.abspath(out), staging
    except storage.StorageError as e:
        raise CorpusError(f"--out {out}: {e}") from None
    except OSError as e:
        raise CorpusError(f"--out {out}: not writable ({e.strerror or e})") from None


def _discard(staging: str) -> None:
    """Best-effort removal of a failed run's files (local staging dir, or the S3 prefix
    that never got its manifest)."""
    try:
        storage.remove_tree(staging)
    except Exception:
        pass


def _publish(staging: str, final: str) -> None:
    if staging == final:
        return
    if os.path.isdir(final):
        os.rmdir(final)  # an empty dir the user made; non-empty was refused up front
    os.replace(staging, final)


# ---------------------------------------------------------------- reading shards

def load_manifest(shards: str) -> dict:
    """The manifest of a complete shard directory, or a one-line error."""
    path = storage.join(shards, "manifest.json")
    try:
        if not storage.exists(path):
            raise CorpusError(f"{shards}: not a complete shard directory (no manifest.json; "
                              f"made by `wr-train preprocess`)")
        manifest = json.loads(storage.read_text(path))
        listing = storage.list_files(shards)
    except storage.StorageError as e:
        raise CorpusError(str(e)) from None
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}: not valid JSON ({e})") from None
    if "spm.model" not in listing:
        raise CorpusError(f"{shards}: not a complete shard directory (no spm.model)")
    for name, info in {**manifest.get("files", {}), **manifest.get("eval", {}).get("files", {})}.items():
        if listing.get(name) != info["size"]:
            raise CorpusError(f"{shards}/{name}: missing or truncated shard "
                              f"(expected {info['size']} bytes, found {listing.get(name)})")
    return manifest


def read_rows(shards: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row_id, input_ids[n, L]) of one shard file."""
    import pyarrow.parquet as pq
    fs, inner = storage.resolve(storage.join(shards, name))
    table = pq.read_table(inner, filesystem=fs)
    return table.column("row_id").to_numpy(), rows_of(table).astype(np.int64)


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
