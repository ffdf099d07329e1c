"""Corpus -> packed Parquet shards, on Ray Data.

read (chunks of local or s3:// corpus files: byte ranges of text and JSON lines, a whole
gzip file, runs of Parquet row groups; wr_train.text) -> clean -> encode (spm) -> pack,
all inside Ray Data function tasks, one chunk per task; the driver streams the packed
rows back *in chunk order* and writes fixed-size Parquet shards, so `row_id` is dense
(0..rows-1), global and the same on every run. `manifest.json` is written last: a shard
directory without it is incomplete and every later stage refuses it; a failed or interrupted run
deletes what it wrote. The tasks are plain function tasks of one CPU each (no actor pool),
so on 2 CPUs nothing can starve the read (the deadlock in NOTES.md). Memory does not grow
with the corpus: a task holds one chunk, the driver one chunk's rows plus less than a
Parquet row group (ShardWriter), Ray Data keeps a bounded number of chunks in flight (a
gzip file's task packs and hands over one piece of its text at a time).
The driver forwards its S3 settings (endpoint, region, profile: wr_train.s3.settings_env)
to the tasks, so a Ray started before they were set still reads and writes the same S3
endpoint; never its keys, which the tasks get as the driver does (env, profile, role).

The rooms it drives: `text` (listing, chunks, cleaning), `packing` (rows from encoded
documents), `shards` (the format it writes). Held out (`heldout`, default 1%): a share of
the documents, chosen by a hash of their text, is packed the same way into
`eval/part-*.parquet` (row_id from 0) instead of the train rows, for pretraining's
evaluation. The driver counts the train rows' token ids (`token_counts.npy`); the
manifest's `unigram` is the floor they give: the loss and accuracy of a model that
predicts every masked token from those frequencies alone.
"""
from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from wr_train import s3, storage
from wr_train.local_ray import ensure_ray, quiet_ray_data, root_cause_line
from wr_train.packing import check_packing, heldout_pieces, pack_flat
from wr_train.shards import (EVAL_DIR, MANIFEST, ROWS_PER_SHARD, SPM, TOKEN_COUNTS, Manifest,
                             ShardError, ShardWriter, id_column, rows_of)
from wr_train.text import (CHUNK_BYTES, TEXT_FIELD, CorpusError, Source, check_source, chunk_documents,
                           list_sources, plan_chunks)
from wr_train.tokenizer import NUM_SPECIAL, check_spm_dir, file_sha256, load_spm

TASKS_PER_CPU = 1              # tasks in flight per CPU (more only costs memory: with
                               # outputs handed over at once, a CPU idles < 0.05 s per task)
STAT_KEYS = ("lines", "documents", "undecodable_lines", "empty_lines", "missing_field",
             "split_long_lines", "text_tokens", "non_pad_tokens", "eval_documents",
             "eval_text_tokens", "eval_non_pad_tokens")
HELDOUT = 0.01                 # share of documents held out as evaluation rows


# ---------------------------------------------------------------- per-chunk work (Ray tasks)

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


def chunk_rows(sp, chunk: dict, seq_length: int, packing: str, num_threads: int = 1,
               heldout: float = 0.0) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """One chunk (text.plan_chunks), read -> clean -> encode -> pack: (train rows, held-out
    rows, counts by STAT_KEYS) per piece of it (text.chunk_documents: one, or a gzip
    file's pieces). A `heldout` share of the documents is packed apart as evaluation rows."""
    stats = dict.fromkeys(STAT_KEYS, 0)
    for texts, ends in chunk_documents(chunk, stats):
        yield pack_documents(sp, texts, ends, stats, seq_length, packing, num_threads, heldout)
        stats = dict.fromkeys(STAT_KEYS, 0)


def pack_documents(sp, texts: list[str], ends: list[bool], stats: dict, seq_length: int,
                   packing: str, num_threads: int = 1, heldout: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Cleaned documents (text.clean_texts) -> encode -> pack; `stats` (the cleaning's
    counts) gets the packing's."""
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
                    heldout: float = 0.0, env: dict | None = None) -> Iterator[pa.Table]:
    """Ray Data task body: one chunk in, its packed rows (+ the counts) out, as Arrow tables
    (one per piece of the chunk) whose `input_ids` is already the FixedSizeList column the
    shards store (no tensor-extension round trip on either side). The counts ride on the
    first row; a piece without rows sends one dummy row (real=False); held-out rows come
    after the piece's train rows, marked heldout=True."""
    for key, value in (env or {}).items():  # the driver's S3 endpoint/region/profile
        if os.environ.get(key) != value:
            os.environ[key] = value
    sp = _processor(model_proto)
    chunk = {k: batch[k][0].item() if hasattr(batch[k][0], "item") else batch[k][0]
             for k in ("chunk", "path", "format", "field", "start", "end", "step")}
    for rows, eval_rows, stats in chunk_rows(sp, chunk, seq_length, packing, heldout=heldout):
        yield _rows_table(rows, eval_rows, stats, chunk["chunk"], seq_length)


def _rows_table(rows: np.ndarray, eval_rows: np.ndarray, stats: dict, chunk: int,
                seq_length: int) -> pa.Table:
    held = np.repeat([False, True], [len(rows), len(eval_rows)])
    rows = np.concatenate([rows, eval_rows]) if len(eval_rows) else rows
    n = len(rows)
    real = n > 0
    if not real:
        rows, n, held = np.zeros((1, seq_length), dtype=np.int32), 1, np.zeros(1, dtype=bool)
    columns = {"input_ids": id_column(rows),
               "chunk": np.full(n, chunk, dtype=np.int64),
               "real": np.full(n, real), "heldout": held}
    for k in STAT_KEYS:
        col = np.zeros(n, dtype=np.int64)
        col[0] = stats[k]
        columns[k] = col
    return pa.table(columns)


# ---------------------------------------------------------------- driver

def _s3_env() -> dict:
    """The driver's S3 settings for its tasks (endpoint, region, profile), never its keys:
    task arguments live in Ray's object store and its spill files (wr_train.s3.SETTINGS_ENV)."""
    return s3.settings_env()


def _user_error(exc: BaseException) -> BaseException | None:
    """A CorpusError / StorageError raised inside a Ray task, found through Ray's
    wrappers (RayTaskError.cause, UserCodeException.__cause__)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (CorpusError, ShardError, storage.StorageError)):
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
               chunk_bytes: int = CHUNK_BYTES, heldout: float = HELDOUT, log=print,
               text_field: str = TEXT_FIELD, text_column: str = TEXT_FIELD) -> dict:
    """Encode and pack the corpus into OUT/part-*.parquet (+ the held-out documents'
    rows in OUT/eval/) + OUT/spm.model + OUT/token_counts.npy + OUT/manifest.json
    (written last); returns the manifest. `text_field` / `text_column`: where jsonl
    records / Parquet rows hold their text. Starts a local Ray unless one is running (then
    uses it: the tasks go wherever it has CPUs)."""
    t0 = time.time()
    _check_settings(seq_length, packing, heldout)
    if isinstance(corpus, str):
        corpus = [corpus]
    spm_model = str(check_spm_dir(spm_dir))
    sp = load_spm(spm_dir)
    with open(spm_model, "rb") as f:
        model_proto = f.read()
    sources = _corpus_sources(corpus, text_field, text_column)
    final, staging = _prepare_output(out)
    chunks = plan_chunks(sources, chunk_bytes)
    log(f"preprocess: {len(sources)} file(s), {sum(s.bytes for s in sources) / 1e6:.1f} MB in "
        f"{len(chunks)} chunk(s) -> seq {seq_length}, packing {packing}, into {final}")
    m = Manifest(seq_length=seq_length, packing=packing, vocab_size=sp.get_piece_size(),
                 spm_sha256=file_sha256(spm_model), chunks=len(chunks), heldout=heldout,
                 sources=[s.manifest_entry() for s in sources])
    writer = ShardWriter(staging, seq_length, rows_per_shard)
    eval_writer = ShardWriter(storage.join(staging, EVAL_DIR), seq_length, rows_per_shard)
    try:
        ds = _dataset(chunks, model_proto, seq_length, packing, heldout)
        totals, counts = _write_rows(ds, writer, eval_writer, m.vocab_size, len(chunks), t0, log)
        if not writer.files:
            raise CorpusError(f"--corpus {' '.join(corpus)}: empty corpus (no text lines after "
                              f"cleaning: {totals['empty_lines']} empty, "
                              f"{totals['undecodable_lines']} undecodable, "
                              f"{totals['missing_field']} without the text field)")
        _fill_manifest(m, writer, eval_writer, totals, counts)
        storage.write_bytes(storage.join(staging, TOKEN_COUNTS), _npy_bytes(counts))
        m.seconds = round(time.time() - t0, 2)
        # The segmenter travels with its shards: pretraining copies it into every checkpoint.
        storage.write_bytes(storage.join(staging, SPM), model_proto)
        storage.write_text(storage.join(staging, MANIFEST),
                           json.dumps(asdict(m), indent=2, ensure_ascii=False))
        _publish(staging, final)
    except BaseException as e:
        writer.abort()
        eval_writer.abort()
        _discard(staging)
        error = _failure(e, corpus, out)
        if error is None:
            raise
        raise error from error.__cause__
    log(f"preprocess: {m.rows:,} rows × {seq_length} in {len(m.files)} shard(s), "
        f"{m.text_tokens:,} text tokens ({m.text_tokens / m.seconds:,.0f} tok/s with start-up),"
        f" pad {m.pad_fraction:.2%}, {m.documents:,} documents, skipped {m.skipped} in {m.seconds:.1f}s")
    log(f"preprocess: held out {m.eval['documents']:,} documents ({heldout:.1%}) as {m.eval['rows']:,} "
        f"eval rows; unigram floor {m.unigram['entropy']:.3f} nats, "
        f"commonest token {m.unigram['top_fraction']:.1%} of targets")
    return asdict(m)


def _check_settings(seq_length: int, packing: str, heldout: float) -> None:
    if not 8 <= seq_length <= 512:
        raise CorpusError(f"--seq-length {seq_length}: expected 8..512 (BERT positions)")
    check_packing(packing)
    if not 0 <= heldout < 0.5:
        raise CorpusError(f"--heldout {heldout}: expected a share of documents in [0, 0.5)")


def _corpus_sources(corpus: list[str], text_field: str, text_column: str) -> list[Source]:
    """The corpus's files, each checked to be readable in its format; refuses 0 bytes."""
    # absolute: the Ray Data tasks read them in other working directories
    sources = list_sources([storage.absolute(c) for c in corpus])
    with cf.ThreadPoolExecutor(max_workers=8) as pool:  # S3: one GET each, in parallel
        sources = list(pool.map(lambda s: check_source(s, text_field, text_column)
                                if s.bytes > 0 else s, sources))
    if sum(s.bytes for s in sources) == 0:
        raise CorpusError(f"--corpus {' '.join(corpus)}: empty corpus (0 bytes), expected "
                          f"UTF-8 text, one document per line")
    return sources


def _dataset(chunks: list[dict], model_proto: bytes, seq_length: int, packing: str,
             heldout: float):
    """The Ray Data pipeline: one encode_and_pack task per chunk, results in chunk order."""
    import ray

    ensure_ray()
    quiet_ray_data()
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
    return ds


def _write_rows(ds, writer: ShardWriter, eval_writer: ShardWriter, vocab_size: int,
                n_chunks: int, t0: float, log) -> tuple[dict, np.ndarray]:
    """Stream the tasks' rows into the train and eval shards; returns the chunks' counts
    (by STAT_KEYS) summed and the train rows' token counts (for the unigram floor)."""
    totals = dict.fromkeys(STAT_KEYS, 0)
    counts = np.zeros(vocab_size, dtype=np.int64)
    last_log, done = time.time(), set()
    # prefetch_batches=0: a prefetching iterator holds a finished chunk back until the
    # next one is ready, which left the driver's writing to pile up after the last task.
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for k in STAT_KEYS:
            totals[k] += int(pc.sum(batch.column(k)).as_py())
        done.update(pc.unique(batch.column("chunk")).to_pylist())  # a gzip chunk: several batches
        real = batch.column("real")
        if not pc.all(real).as_py():
            batch = batch.filter(real)
        held = batch.column("heldout").to_numpy(zero_copy_only=False)
        rows = rows_of(batch)
        if held.any():
            eval_writer.add(rows[held])
            rows = rows[~held]
        counts += np.bincount(rows.reshape(-1), minlength=vocab_size)
        writer.add(rows)
        if time.time() - last_log > 10:
            last_log = time.time()
            log(f"preprocess: {len(done)}/{n_chunks} chunks, {writer.rows + writer.pending_rows:,} "
                f"rows, {totals['text_tokens'] / (time.time() - t0):,.0f} tok/s")
    writer.close()
    eval_writer.close()
    return totals, counts


def _fill_manifest(m: Manifest, writer: ShardWriter, eval_writer: ShardWriter, totals: dict,
                   counts: np.ndarray) -> None:
    m.rows, m.files = writer.rows, writer.files
    m.tokens = m.rows * m.seq_length
    m.non_pad_tokens, m.text_tokens = totals["non_pad_tokens"], totals["text_tokens"]
    m.pad_fraction = round(1 - m.non_pad_tokens / m.tokens, 6)
    m.documents, m.lines, m.split_long_lines = (totals["documents"], totals["lines"],
                                                totals["split_long_lines"])
    m.skipped = {"undecodable_lines": totals["undecodable_lines"],
                 "empty_lines": totals["empty_lines"], "missing_field": totals["missing_field"]}
    m.eval = {"rows": eval_writer.rows, "documents": totals["eval_documents"],
              "text_tokens": totals["eval_text_tokens"],
              "non_pad_tokens": totals["eval_non_pad_tokens"],
              "files": {f"{EVAL_DIR}/{k}": v for k, v in eval_writer.files.items()}}
    m.unigram = unigram_floor(counts)


def _failure(e: BaseException, corpus: list[str], out: str) -> CorpusError | None:
    """The one-line CorpusError a failed run raises (its __cause__ is what it is raised
    from); None: re-raise `e` as it is (KeyboardInterrupt and the like)."""
    found = _user_error(e)
    if isinstance(found, (CorpusError, ShardError)):
        return CorpusError(str(found))
    if isinstance(found, storage.StorageError):
        return CorpusError(f"preprocess: {found}")
    if not isinstance(e, Exception):
        return None
    error = CorpusError(f"preprocess {' '.join(corpus)} -> {out} failed: {root_cause_line(e)}")
    error.__cause__ = e
    return error


def _npy_bytes(array: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _prepare_output(out: str) -> tuple[str, str]:
    """(final dir, staging dir). Local: write into a sibling temp dir and rename at the
    end, so OUT never holds half a run. S3 has no rename: write in place, manifest last."""
    try:
        if storage.exists(storage.join(out, MANIFEST)) or (
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
