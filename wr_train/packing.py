"""Encoded documents -> rows of seq_length ids: pure functions, no I/O.

Packings (what one row of `seq_length` ids holds; PAD = 0):
- full (default, RoBERTa FULL-SENTENCES): the documents of a chunk form one stream
  `d1 [SEP] d2 [SEP] d3 [SEP] …`, cut into pieces of seq_length-1 ids; every row is
  `[CLS] piece`, so a document may start mid-row and run on into the next row. Only the
  last row of a chunk (CHUNK_BYTES of text) is padded, so padding stays near zero.
- doc (the seed's recipe): each document alone, cut into pieces of seq_length-2 ids; every
  row is `[CLS] piece [SEP]` followed by padding (only a document's last row is short).
Either way the non-pad ids of all rows, with the added [CLS]/[SEP] taken out, are the
encoded documents in corpus order, each exactly once.

A held-out share of the documents (`heldout_pieces`, by a hash of their text) is packed
the same way into the evaluation rows instead of the train rows.
"""
from __future__ import annotations

import hashlib

import numpy as np

from wr_train.text import CorpusError
from wr_train.tokenizer import CLS, PAD, SEP


PACKINGS = ("full", "doc")


def check_packing(packing: str) -> None:
    if packing not in PACKINGS:
        raise CorpusError(f"--packing {packing}: expected 'full' or 'doc'")


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
    check_packing(packing)


def pack_rows(docs_ids: list, ends: list[bool], seq_length: int, packing: str) -> np.ndarray:
    """pack_flat over a list of encoded pieces (ends[i]: piece i ends its document); the
    benches' synthetic corpora (bench/gpu_check.py, bench/pretrain_throughput.py) and tests."""
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

