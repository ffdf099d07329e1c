"""The corpus's text files: listing them, checking they are UTF-8 text, cutting them into
byte-range chunks, and cleaning a chunk's lines into documents.

Cleaning (per line of a UTF-8 text file, one document per line): a line that does not
decode as UTF-8 is skipped and counted (`skipped.undecodable_lines`); the rest is
stripped of surrounding whitespace; a line that is then empty, or that spm encodes to no
piece at all (e.g. only zero-width characters), is skipped and counted
(`skipped.empty_lines`). A line longer than MAX_DOC_CHARS stays one document but is
encoded in pieces cut after sentence ends (hard cut where there is none; the pieces
concatenate back to the line), so one encode call's memory stays bounded; such lines are
counted in `split_long_lines`.
"""
from __future__ import annotations

import codecs
import fnmatch
import os

import pyarrow as pa

from wr_train import storage
from wr_train.shards import CorpusError

CHUNK_BYTES = 8 << 20          # one Ray Data task reads at most this many bytes of text
MAX_DOC_CHARS = 20_000         # longer lines are encoded in pieces (see module doc)
HEAD_BYTES = 65536             # what check_text_file looks at
_SENTENCE_ENDS = "。！？!?；;…"


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


# ---------------------------------------------------------------- reading and cleaning a chunk

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
