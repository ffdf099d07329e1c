"""The corpus's files: listing them, checking each can be read in its format, cutting
them into chunks, and cleaning a chunk's records into documents.

Formats, by file name (one document per line or record):
- `*.txt`: UTF-8 text, one document per line; `*.jsonl`: one JSON object per line, the
  document in its `text_field` (default `text`). Chunks are byte ranges: a line belongs
  to the chunk it starts in.
- `*.txt.gz` / `*.jsonl.gz`: the same, gzip'd. gzip cannot be entered in the middle, so
  one task reads the whole file, but cuts the text into the pieces a plain file of the
  same text would be cut into (sized from the gzip trailer's length), and packs piece
  by piece: its memory stays one piece, and a `.txt.gz` gives the shards of its `.txt`.
- `*.parquet`: the document in each row's `text_column` (default `text`, a string
  column); chunks are runs of row groups.
Any other file named on its own is read as `.txt` (`.gz` as `.txt.gz`); a directory gives
the files with these endings inside it. The chunks are read here, inside preprocess's Ray
Data tasks, not by ray.data.read_text / read_json / read_parquet: those fail a task on
the first undecodable line or record instead of counting and skipping it (read_text also
reads a file whole and splits lines at \r and U+2028 too), and their blocks are not the
chunks that make a `.txt.gz` pack as its `.txt`.

Cleaning (per line or record): a line that does not decode as UTF-8, or a jsonl line that
is not a JSON object, is skipped and counted (`skipped.undecodable_lines`); a record
without its text field (or with null or a non-string there) likewise
(`skipped.missing_field`); the rest is stripped of surrounding whitespace; a document that
is then empty, or that spm encodes to no piece at all (e.g. only zero-width characters), is
skipped and counted (`skipped.empty_lines`). A document longer than MAX_DOC_CHARS stays
one document but is encoded in pieces cut after sentence ends (hard cut where there is
none; the pieces concatenate back to it), so one encode call's memory stays bounded; such
documents are counted in `split_long_lines`.
"""
from __future__ import annotations

import codecs
import collections
import dataclasses
import fnmatch
import gzip
import json
import os
import zlib
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from wr_train import storage


class CorpusError(ValueError):
    """Corpus or preprocess input that cannot be made into shards (a missing, binary or
    non-UTF-8 file, a record without its text, a bad --out); one line naming it and what
    was expected."""


CHUNK_BYTES = 8 << 20          # one Ray Data task reads at most this many bytes of text
MAX_DOC_CHARS = 20_000         # longer lines are encoded in pieces (see module doc)
HEAD_BYTES = 65536             # what check_source looks at (of the text, for gzip)
_SENTENCE_ENDS = "。！？!?；;…"
# name ending -> format (longest first); a directory lists the files with these endings
FORMATS = {".txt.gz": "txt.gz", ".jsonl.gz": "jsonl.gz", ".jsonl": "jsonl", ".parquet": "parquet",
           ".txt": "txt"}
TEXT_FIELD = "text"            # default of --text-field (jsonl) and --text-column (Parquet)
_ONE_PER_LINE = {"txt": "UTF-8 text, one document per line",
                 "jsonl": "JSON lines (one object per line, UTF-8)"}


@dataclass(frozen=True)
class Source:
    """One corpus file: where, its size, its format, and (once checked) what planning its
    chunks needs: the text field/column, a gzip file's text size, Parquet's row groups."""
    path: str
    bytes: int
    format: str = "txt"
    field: str = ""               # jsonl: the text field; parquet: the text column
    text_bytes: int = 0           # gzip: the text's size from the trailer (mod 2**32)
    row_groups: tuple = ()        # parquet: the text column's bytes in each row group

    def manifest_entry(self) -> dict:
        entry = {"path": self.path, "bytes": self.bytes, "format": self.format}
        if self.field:
            entry["field"] = self.field
        return entry


def source_format(path: str) -> str:
    name = str(path).lower()
    for ending, fmt in FORMATS.items():
        if name.endswith(ending):
            return fmt
    return "txt.gz" if name.endswith(".gz") else "txt"


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


def list_sources(patterns: list[str]) -> list[Source]:
    """Every corpus file named by paths, dirs (the files with a FORMATS ending inside) or
    globs, with its size and format."""
    out: list[Source] = []
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
                         if k.lower().endswith(tuple(FORMATS))}
            elif storage.exists(pat):
                fs, inner = storage.resolve(pat)
                found = {pat: fs.get_file_info(inner).size}
            else:
                found = {}
        except storage.StorageError as e:
            raise CorpusError(f"--corpus {e}") from None
        if not found:
            raise CorpusError(f"--corpus {pat}: no such file, or no corpus files in it "
                              f"(*.txt, *.txt.gz, *.jsonl, *.jsonl.gz or *.parquet)")
        out.extend(Source(p, size, source_format(p)) for p, size in sorted(found.items()))
    return out


def check_source(src: Source, text_field: str = TEXT_FIELD, text_column: str = TEXT_FIELD) -> Source:
    """Refuse, up front, a file its format's reader cannot read (one line naming it);
    returns `src` with what planning its chunks needs filled in."""
    try:
        if src.format == "parquet":
            return _check_parquet(src, text_column)
        kind = src.format.removesuffix(".gz")
        if src.format.endswith(".gz"):
            head, text_bytes = _gzip_head(src)
        else:
            with storage.open_input(src.path) as f:
                head, text_bytes = f.read(HEAD_BYTES), src.bytes
        _check_text_head(src.path, head, _ONE_PER_LINE[kind])
        if kind == "jsonl":
            _check_jsonl_head(src.path, head, text_field)
        return dataclasses.replace(src, text_bytes=text_bytes,
                                   field=text_field if kind == "jsonl" else "")
    except storage.StorageError as e:
        raise CorpusError(f"--corpus {e}") from None


def _gzip_head(src: Source) -> tuple[bytes, int]:
    """The first HEAD_BYTES of a gzip file's text, and the text's size (the trailer's
    ISIZE: exact below 4 GiB for a one-member file; it only sizes the pieces)."""
    fs, inner = storage.resolve(src.path)
    try:
        with storage.open_input(src.path) as f, gzip.GzipFile(fileobj=f) as z:
            head = z.read(HEAD_BYTES)
        with fs.open_input_file(inner) as f:
            f.seek(max(src.bytes - 4, 0))
            text_bytes = int.from_bytes(f.read(4), "little")
    except (OSError, EOFError, zlib.error) as e:
        if isinstance(e, (pa.ArrowException, FileNotFoundError, PermissionError)):
            raise storage.translate(e, src.path) from None
        raise CorpusError(f"--corpus {src.path}: not gzip data ({e}), expected a gzip'd "
                          f"{_ONE_PER_LINE[src.format.removesuffix('.gz')]}") from None
    return head, text_bytes


def _check_text_head(path: str, head: bytes, expected: str) -> None:
    """Binary (NUL bytes in the head), or most of the head's lines not decoding (another
    encoding, e.g. GBK): refused. A few undecodable lines are not an error: they are
    skipped and counted."""
    if b"\x00" in head:
        raise CorpusError(f"--corpus {path}: binary file (NUL bytes), expected {expected}")
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
                          f"do not decode), expected {expected}")


def _check_jsonl_head(path: str, head: bytes, field: str) -> None:
    """Most of the head's lines not JSON objects, or none of them holding `field` as a
    string: refused (a wrong --text-field would otherwise skip every record)."""
    lines = head.split(b"\n")
    if len(head) == HEAD_BYTES:
        lines.pop()  # cut off by the 64 KiB limit
    records, bad = [], 0
    for raw in filter(None, map(bytes.strip, lines)):
        try:
            record = json.loads(raw.removeprefix(codecs.BOM_UTF8))
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    if bad * 2 > bad + len(records):
        raise CorpusError(f"--corpus {path}: not JSON lines ({bad} of the first {bad + len(records)} "
                          f"lines are not JSON objects), expected one JSON object per line")
    if records and not any(isinstance(r.get(field), str) for r in records):
        seen = sorted({k for r in records for k in r})
        raise CorpusError(f"--corpus {path}: none of the first {len(records)} records has a text "
                          f"field {field!r} (fields there: {', '.join(seen[:10]) or 'none'}); "
                          f"set --text-field")


def _check_parquet(src: Source, column: str) -> Source:
    import pyarrow.parquet as pq
    fs, inner = storage.resolve(src.path)
    try:
        with fs.open_input_file(inner) as f:
            meta = pq.ParquetFile(f).metadata
    except pa.ArrowInvalid as e:
        raise CorpusError(f"--corpus {src.path}: not a Parquet file ({str(e).splitlines()[0]})") from None
    except (OSError, pa.ArrowException) as e:
        raise storage.translate(e, src.path) from None
    schema = meta.schema.to_arrow_schema()
    if column not in schema.names:
        raise CorpusError(f"--corpus {src.path}: no column {column!r} (columns: "
                          f"{', '.join(schema.names[:10])}); set --text-column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_string_view(kind)):
        raise CorpusError(f"--corpus {src.path}: column {column!r} holds {kind}, expected "
                          f"strings (set --text-column)")
    index = [meta.schema.column(i).path for i in range(meta.num_columns)].index(column)
    groups = tuple(meta.row_group(g).column(index).total_uncompressed_size
                   for g in range(meta.num_row_groups))
    return dataclasses.replace(src, field=column, row_groups=groups)


def plan_chunks(sources: list[Source], chunk_bytes: int = CHUNK_BYTES) -> list[dict]:
    """The chunks a task each: {chunk, path, format, field, start, end, step}.
    Text and jsonl: byte ranges [start, end) of at most chunk_bytes, a file's ranges of
    equal size (a 17 MB file in 8 MB chunks gives 3 x 5.7 MB, not 8 + 8 + 1: the tasks
    finish closer together). gzip: the whole file, its text cut into pieces of `step`
    bytes as the ranges of the plain file would be. Parquet: row groups [start, end),
    as many as fit chunk_bytes of text (at least one)."""
    chunks = []

    def add(src: Source, start: int, end: int, step: int = 0) -> None:
        chunks.append({"chunk": len(chunks), "path": src.path, "format": src.format,
                       "field": src.field, "start": start, "end": end, "step": step})

    for src in sources:
        if src.format == "parquet":
            start, groups = 0, src.row_groups
            while start < len(groups):
                end, size = start + 1, groups[start]
                while end < len(groups) and size + groups[end] <= chunk_bytes:
                    size += groups[end]
                    end += 1
                add(src, start, end)
                start = end
            continue
        if src.format.endswith(".gz"):
            if src.bytes > 0:  # even with text_bytes 0 (a lying trailer): read it all
                add(src, 0, src.text_bytes, _step(src.text_bytes, chunk_bytes))
            continue
        if src.bytes <= 0:
            continue
        step = _step(src.bytes, chunk_bytes)
        for start in range(0, src.bytes, step):
            add(src, start, min(start + step, src.bytes))
    return chunks


def _step(size: int, chunk_bytes: int) -> int:
    """The size of each of the fewest equal ranges of at most chunk_bytes that cover size."""
    n = max(1, -(-size // chunk_bytes))
    return max(1, -(-size // n))


# ---------------------------------------------------------------- reading and cleaning a chunk

def chunk_documents(chunk: dict, stats: dict) -> Iterator[tuple[list[str], list[bool]]]:
    """A chunk's documents, cleaned, as (texts, ends) per piece (see clean_documents): one
    piece for a byte range or a run of row groups, a gzip file's pieces one at a time."""
    path, fmt, field = chunk["path"], chunk["format"], chunk["field"]
    if fmt == "parquet":
        yield clean_texts(read_parquet_texts(path, field, chunk["start"], chunk["end"]), stats)
    elif fmt.endswith(".gz"):
        for i, data in enumerate(gzip_pieces(path, chunk["end"], chunk["step"])):
            yield _clean(data, fmt.removesuffix(".gz"), field, stats, bom=i == 0)
    else:
        data = read_chunk(path, chunk["start"], chunk["end"])
        yield _clean(data, fmt, field, stats, bom=chunk["start"] == 0)


def read_documents(sources: list[Source], stats: dict | None = None) -> Iterator[str]:
    """Every document of checked sources (check_source) in corpus order, cleaned as
    preprocess cleans them, a long one's pieces joined again; `stats` gets the counts."""
    stats = stats if stats is not None else collections.defaultdict(int)
    for chunk in plan_chunks(sources):
        for texts, ends in chunk_documents(chunk, stats):
            doc: list[str] = []
            for piece, end in zip(texts, ends):
                doc.append(piece)
                if end:
                    yield "".join(doc)
                    doc = []


def _clean(data: bytes, kind: str, field: str, stats: dict, bom: bool) -> tuple[list[str], list[bool]]:
    if kind == "jsonl":
        return clean_texts(json_texts(data, field, stats, bom=bom), stats)
    return clean_documents(data, stats, bom=bom)


def gzip_pieces(path: str, text_bytes: int, step: int) -> Iterator[bytes]:
    """A gzip file's text in the pieces read_chunk would give for the plain file of
    `text_bytes` bytes in ranges of `step` (a line belongs to the piece it starts in), read
    as a stream; a piece that lies inside a line is b"". Past text_bytes (a wrong
    trailer: several members, or 4 GiB and more) the rest is the last piece."""
    try:
        with storage.open_input(path) as raw, gzip.GzipFile(fileobj=raw) as f:
            buf, base = bytearray(), 0        # buf holds the text from offset `base` on
            for bound in range(step, text_bytes, step):
                # this piece ends after the first newline at or after bound - 1
                if bound <= base:
                    yield b""
                    continue
                nl = buf.find(b"\n", bound - 1 - base)
                while nl < 0:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    nl = block.find(b"\n", max(0, bound - 1 - base - len(buf)))
                    nl = nl + len(buf) if nl >= 0 else -1
                    buf += block
                if nl < 0:
                    break
                yield bytes(buf[:nl + 1])
                base += nl + 1
                del buf[:nl + 1]
            buf += f.read()
            yield bytes(buf)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorpusError(f"--corpus {path}: broken gzip data ({e})") from None
    except (OSError, pa.ArrowException) as e:
        raise storage.translate(e, path) from None


def json_texts(data: bytes, field: str, stats: dict, *, bom: bool = False) -> list[str | None]:
    """Each JSON-lines record's `field` (None where it is missing, null or not a string);
    undecodable lines (not UTF-8, not a JSON object) and blank ones are counted and
    left out."""
    if bom and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the split after the final newline is not a line
    out: list[str | None] = []
    for raw in lines:
        if not raw.strip():
            stats["empty_lines"] += 1
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            record = None
        if not isinstance(record, dict):
            stats["undecodable_lines"] += 1
            continue
        value = record.get(field)
        out.append(value if isinstance(value, str) else None)
    return out


def read_parquet_texts(path: str, column: str, start: int, end: int) -> list[str | None]:
    """The `column` of row groups [start, end) of a Parquet file."""
    import pyarrow.parquet as pq
    fs, inner = storage.resolve(path)
    try:
        with fs.open_input_file(inner) as f:
            table = pq.ParquetFile(f).read_row_groups(list(range(start, end)), columns=[column])
    except (OSError, pa.ArrowException) as e:
        raise storage.translate(e, path) from None
    return table.column(column).to_pylist()



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
    return clean_texts(lines, stats)


def clean_texts(texts: list[str | None], stats: dict) -> tuple[list[str], list[bool]]:
    """Documents (None: a record without its text) -> stripped, empty ones dropped, long
    ones in pieces: (texts, ends) as clean_documents."""
    n = len(texts)
    if None in texts:
        texts = [t for t in texts if t is not None]
        stats["missing_field"] += n - len(texts)
        n = len(texts)
    texts = [t for t in map(str.strip, texts) if t]
    stats["empty_lines"] += n - len(texts)
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
