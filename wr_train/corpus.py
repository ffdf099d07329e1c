"""Corpus -> packed Parquet shards, on Ray Data.

read (byte-range chunks of local or s3:// text files) -> clean -> encode (spm) -> pack,
all inside Ray Data function tasks, one chunk per task; the driver streams the packed
rows back *in chunk order* and writes fixed-size Parquet shards, so `row_id` is dense,
global and the same on every run. `manifest.json` is written last: a shard directory
without it is incomplete and every later stage refuses it.

Packings (what one row of `seq_length` ids holds):
- full (default, RoBERTa FULL-SENTENCES): `[CLS] d1 [SEP] d2 [SEP] d3…` — documents run
  on across rows, each ended by `[SEP]`; every row starts with `[CLS]`; only the last row
  of a chunk is padded.
- doc (the seed's recipe): each document alone, cut into pieces of seq_length-2 tokens,
  each row `[CLS] piece [SEP]` then padding.
"""
from __future__ import annotations

import fnmatch
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field

import numpy as np

from wr_train import storage
from wr_train.tokenizer import CLS, PAD, SEP, check_spm_dir, file_sha256, load_spm, split_sentences

CHUNK_BYTES = 8 << 20          # one Ray Data task reads this many bytes of text
MAX_DOC_CHARS = 20_000         # longer lines are split at sentence ends before encoding
ROWS_PER_SHARD = 64 * 1024
BLOCK_ROWS = 1024             # Parquet row group = the unit the training stream shuffles
STAT_KEYS = ("lines", "documents", "undecodable_lines", "empty_lines", "split_long_lines")


class CorpusError(ValueError):
    pass


@dataclass
class Manifest:
    seq_length: int
    packing: str
    rows: int = 0
    tokens: int = 0               # rows × seq_length
    non_pad_tokens: int = 0
    pad_fraction: float = 0.0
    documents: int = 0
    lines: int = 0
    skipped: dict = field(default_factory=dict)   # why -> count
    split_long_lines: int = 0
    vocab_size: int = 0
    spm_sha256: str = ""
    sources: list = field(default_factory=list)   # [{path, bytes}]
    files: dict = field(default_factory=dict)     # part file -> {rows, first_row_id, size}
    seconds: float = 0.0


# ---------------------------------------------------------------- input listing

def list_sources(patterns: list[str]) -> list[tuple[str, int]]:
    """(path, size) of every text file named by paths, dirs (*.txt inside) or globs."""
    out: list[tuple[str, int]] = []
    for pat in patterns:
        has_glob = any(c in pat for c in "*?[")
        base = pat.rsplit("/", 1)[0] if has_glob else pat
        try:
            if has_glob:
                listing = {storage.join(base, k): v for k, v in storage.list_files(base).items()}
                found = {p: s for p, s in listing.items() if fnmatch.fnmatch(p, pat)}
            elif storage.isdir(pat):
                found = {storage.join(pat, k): v for k, v in storage.list_files(pat).items()
                         if k.endswith(".txt")}
            elif storage.exists(pat):
                found = {pat: _size(pat)}
            else:
                found = {}
        except storage.StorageError as e:
            raise CorpusError(str(e)) from None
        if not found:
            raise CorpusError(f"--corpus {pat}: no such file, or no *.txt files in it")
        out.extend(sorted(found.items()))
    return out


def _size(path: str) -> int:
    fs, inner = storage.resolve(path)
    return fs.get_file_info(inner).size


def check_text_file(path: str) -> None:
    """Refuse a binary file up front (NUL bytes in its first 64 KiB)."""
    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        head = f.read(65536)
    if b"\x00" in head:
        raise CorpusError(f"--corpus {path}: binary file, expected UTF-8 text (one document per line)")


def plan_chunks(sources: list[tuple[str, int]], chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    chunks = []
    for path, size in sources:
        for start in range(0, max(size, 1), chunk_bytes):
            chunks.append({"chunk": len(chunks), "path": path, "start": start,
                           "end": min(start + chunk_bytes, size)})
    return chunks


# ---------------------------------------------------------------- per-chunk work (Ray tasks)

def read_chunk_lines(path: str, start: int, end: int) -> list[bytes]:
    """The lines that *start* inside [start, end): a line straddling `end` belongs here,
    one straddling `start` to the previous chunk."""
    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        if start > 0:
            f.seek(start - 1)
            data = f.read(end - start + 1)
            cut = data.find(b"\n")
            # The line straddling `start` belongs to the previous chunk.
            data = data[cut + 1:] if cut >= 0 else b""
            if cut < 0:
                return []
        else:
            data = f.read(end)
        if data and not data.endswith(b"\n"):
            # Finish the last line: it may run into the next chunk.
            tail = []
            while True:
                block = f.read(1 << 20)
                if not block:
                    break
                nl = block.find(b"\n")
                if nl >= 0:
                    tail.append(block[:nl])
                    break
                tail.append(block)
            data += b"".join(tail)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the split after the final newline is not a line
    return lines


def clean_documents(raw_lines: list[bytes], stats: dict) -> list[tuple[str, bool]]:
    """Decode, strip, drop empties -> [(text, ends_document)]. An over-long line stays one
    document but comes out as several sentence-group pieces, so one encode call's memory
    stays bounded (a 10 MB line is fine)."""
    pieces = []
    for raw in raw_lines:
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            stats["undecodable_lines"] += 1
            continue
        if not text:
            stats["empty_lines"] += 1
            continue
        stats["lines"] += 1
        if len(text) <= MAX_DOC_CHARS:
            pieces.append((text, True))
            continue
        stats["split_long_lines"] += 1
        group: list[str] = []
        size = 0
        for sent in split_sentences(text, max_chars=MAX_DOC_CHARS):
            if size + len(sent) > MAX_DOC_CHARS and group:
                pieces.append(("".join(group), False))
                group, size = [], 0
            group.append(sent)
            size += len(sent)
        pieces.append(("".join(group), True))
    return pieces


def pack_rows(docs_ids: list[list[int]], ends: list[bool], seq_length: int, packing: str) -> np.ndarray:
    """Pack encoded documents into rows (see module doc). ends[i]: piece i ends its document."""
    if packing == "full":
        stream: list[int] = []
        for ids, end in zip(docs_ids, ends):
            stream.extend(ids)
            if end:
                stream.append(SEP)
        body = seq_length - 1
        n_rows = -(-len(stream) // body) if stream else 0
        rows = np.full((n_rows, seq_length), PAD, dtype=np.int32)
        rows[:, 0] = CLS
        flat = np.full(n_rows * body, PAD, dtype=np.int32)
        flat[:len(stream)] = stream
        rows[:, 1:] = flat.reshape(n_rows, body)
        return rows
    if packing == "doc":
        body = seq_length - 2
        out: list[np.ndarray] = []
        current: list[int] = []
        for ids, end in zip(docs_ids, ends):
            current.extend(ids)
            if not end:
                continue
            for s in range(0, len(current), body):
                piece = current[s:s + body]
                row = np.full(seq_length, PAD, dtype=np.int32)
                row[0] = CLS
                row[1:1 + len(piece)] = piece
                row[1 + len(piece)] = SEP
                out.append(row)
            current = []
        return np.stack(out) if out else np.zeros((0, seq_length), dtype=np.int32)
    raise CorpusError(f"--packing {packing}: expected 'full' or 'doc'")


_SPM_CACHE: dict = {}


def encode_and_pack(batch: dict, spm_model: str, seq_length: int, packing: str) -> dict:
    """Ray Data task body: one chunk in, its packed rows (+ the chunk's counts) out."""
    import sentencepiece as spm

    sp = _SPM_CACHE.get(spm_model)
    if sp is None:
        sp = _SPM_CACHE[spm_model] = spm.SentencePieceProcessor(model_file=spm_model)
    path, start, end = str(batch["path"][0]), int(batch["start"][0]), int(batch["end"][0])
    stats = dict.fromkeys(STAT_KEYS, 0)
    pieces = clean_documents(read_chunk_lines(path, start, end), stats)
    texts = [t for t, _ in pieces]
    ends = [e for _, e in pieces]
    stats["documents"] = sum(ends)
    ids = sp.encode(texts, out_type=int) if texts else []
    rows = pack_rows(ids, ends, seq_length, packing)
    n = len(rows)
    real = n > 0
    if not real:  # keep the chunk's counts even when it made no row
        rows = np.zeros((1, seq_length), dtype=np.int32)
        n = 1
    out = {"input_ids": rows, "chunk": np.full(n, int(batch["chunk"][0]), dtype=np.int64),
           "real": np.full(n, real)}
    for k in STAT_KEYS:
        col = np.zeros(n, dtype=np.int64)
        col[0] = stats[k]
        out[k] = col
    return out


# ---------------------------------------------------------------- driver

def preprocess(corpus: list[str], spm_dir: str, out: str, seq_length: int = 128,
               packing: str = "full", rows_per_shard: int = ROWS_PER_SHARD,
               chunk_bytes: int = CHUNK_BYTES, log=print) -> dict:
    """Encode and pack the corpus into OUT/part-*.parquet + OUT/manifest.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    t0 = time.time()
    if not 8 <= seq_length <= 512:
        raise CorpusError(f"--seq-length {seq_length}: expected 8..512 (BERT positions)")
    if packing not in ("full", "doc"):
        raise CorpusError(f"--packing {packing}: expected 'full' or 'doc'")
    spm_model = str(check_spm_dir(spm_dir))
    sp = load_spm(spm_dir)
    sources = list_sources(corpus)
    for path, _ in sources:
        check_text_file(path)
    if sum(s for _, s in sources) == 0:
        raise CorpusError(f"--corpus {' '.join(corpus)}: empty corpus (0 bytes)")
    final, staging = _prepare_output(out)
    chunks = plan_chunks(sources, chunk_bytes)
    log(f"preprocess: {len(sources)} file(s), {sum(s for _, s in sources) / 1e6:.1f} MB in "
        f"{len(chunks)} chunk(s) -> seq {seq_length}, packing {packing}, into {final}")

    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True   # chunk order -> dense, stable row_id
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        encode_and_pack, batch_size=1, batch_format="numpy", num_cpus=1,
        fn_kwargs={"spm_model": spm_model, "seq_length": seq_length, "packing": packing})

    m = Manifest(seq_length=seq_length, packing=packing, vocab_size=sp.get_piece_size(),
                 spm_sha256=file_sha256(spm_model),
                 sources=[{"path": p, "bytes": s} for p, s in sources])
    totals = dict.fromkeys(STAT_KEYS, 0)
    pending: list[np.ndarray] = []
    pending_rows = 0
    last_log = time.time()
    chunks_done: set = set()

    def flush(rows: np.ndarray):
        name = f"part-{len(m.files):05d}.parquet"
        first = m.rows
        table = pa.table({
            "row_id": pa.array(np.arange(first, first + len(rows), dtype=np.int64)),
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), seq_length),
        })
        path = storage.join(staging, name)
        fs, inner = storage.resolve(path)
        pq.write_table(table, inner, filesystem=fs, compression="zstd", row_group_size=BLOCK_ROWS)
        groups = [min(BLOCK_ROWS, len(rows) - s) for s in range(0, len(rows), BLOCK_ROWS)]
        m.files[name] = {"rows": len(rows), "first_row_id": first, "row_groups": groups,
                         "size": fs.get_file_info(inner).size}
        m.rows += len(rows)

    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for k in STAT_KEYS:
                totals[k] += int(batch[k].sum())
            chunks_done.update(batch["chunk"].tolist())
            rows = batch["input_ids"][batch["real"]]
            m.non_pad_tokens += int((rows != PAD).sum())
            pending.append(rows)
            pending_rows += len(rows)
            while pending_rows >= rows_per_shard:
                allrows = np.concatenate(pending)
                flush(allrows[:rows_per_shard])
                pending, pending_rows = [allrows[rows_per_shard:]], len(allrows) - rows_per_shard
            if time.time() - last_log > 10:
                last_log = time.time()
                log(f"preprocess: {len(chunks_done)}/{len(chunks)} chunks, "
                    f"{m.rows + pending_rows:,} rows, {m.non_pad_tokens / (time.time() - t0) / 1e6:.2f}M tok/s")
        if pending_rows:
            flush(np.concatenate(pending))
    except Exception as e:
        storage.remove_tree(staging)
        if isinstance(e, (CorpusError, storage.StorageError)):
            raise
        raise CorpusError(f"preprocess failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e

    if m.rows == 0:
        storage.remove_tree(staging)
        raise CorpusError(f"--corpus {' '.join(corpus)}: empty corpus (no text lines after cleaning)")
    m.tokens = m.rows * seq_length
    m.pad_fraction = round(1 - m.non_pad_tokens / m.tokens, 6)
    m.documents, m.lines, m.split_long_lines = totals["documents"], totals["lines"], totals["split_long_lines"]
    m.skipped = {"undecodable_lines": totals["undecodable_lines"], "empty_lines": totals["empty_lines"]}
    m.seconds = round(time.time() - t0, 2)
    # The segmenter travels with its shards: pretraining copies it into every checkpoint.
    storage.write_bytes(storage.join(staging, "spm.model"), open(spm_model, "rb").read())
    storage.write_text(storage.join(staging, "manifest.json"), json.dumps(asdict(m), indent=2, ensure_ascii=False))
    _publish(staging, final)
    log(f"preprocess: {m.rows:,} rows × {seq_length} in {len(m.files)} shard(s), "
        f"{m.non_pad_tokens:,} non-pad tokens ({m.non_pad_tokens / m.seconds / 1e6:.2f}M tok/s), "
        f"pad {m.pad_fraction:.2%}, {m.documents:,} documents, skipped {m.skipped} in {m.seconds:.1f}s")
    return asdict(m)


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
        parent = os.path.dirname(os.path.abspath(out))
        storage.check_writable(parent)
        staging = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.partial-{uuid.uuid4().hex[:8]}")
        os.makedirs(staging)
        return os.path.abspath(out), staging
    except storage.StorageError as e:
        raise CorpusError(f"--out {out}: {e}") from None


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
    for name, info in manifest.get("files", {}).items():
        if listing.get(name) != info["size"]:
            raise CorpusError(f"{shards}/{name}: missing or truncated shard "
                              f"(expected {info['size']} bytes, found {listing.get(name)})")
    return manifest


def read_rows(shards: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(row_id, input_ids[n, L]) of one shard file."""
    import pyarrow.parquet as pq
    fs, inner = storage.resolve(storage.join(shards, name))
    table = pq.read_table(inner, filesystem=fs)
    ids = table.column("input_ids").combine_chunks()
    seq = ids.type.list_size
    return (table.column("row_id").to_numpy(),
            ids.flatten().to_numpy(zero_copy_only=False).reshape(-1, seq).astype(np.int64))
