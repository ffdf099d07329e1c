"""wr_train.text / packing / shards / corpus: chunking, cleaning and packing as pure
functions; then `preprocess` on Ray Data against real demo text, local and s3://, with every packing invariant checked
against an independent encoding of the corpus; then each bad input of issue 2 §5."""
from __future__ import annotations

import codecs
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from wr_train import preprocess as corpus, storage
from wr_train.preprocess import preprocess
from wr_train.packing import heldout_pieces, pack_rows
from wr_train.shards import BLOCK_ROWS, ShardError, ShardWriter, load_manifest, read_eval_rows, read_rows
from wr_train.text import CorpusError
from wr_train.text import MAX_DOC_CHARS, Source, clean_documents, plan_chunks, read_chunk, split_long_line
from wr_train.tokenizer import CLS, NUM_SPECIAL, PAD, SEP, TokenizerError, file_sha256, load_spm

SEQ = 64
CHUNK = 512 << 10   # small chunks: the test corpus spans several tasks and chunk edges
QUIET = dict(log=lambda *a: None, heldout=0.0)  # exact round trips: every document in train


# ---------------------------------------------------------------- helpers

def reference_docs(sp, files: list[str]) -> tuple[list[list[int]], dict]:
    """The encoded documents of `files`, by the rules in text.py's and packing.py's docs,
    computed line by line without any of preprocess's machinery (only split_long_line for
    > MAX_DOC_CHARS)."""
    docs, stats = [], {"undecodable_lines": 0, "empty_lines": 0, "split_long_lines": 0}
    for f in files:
        data = Path(f).read_bytes()
        if data.startswith(codecs.BOM_UTF8):
            data = data[3:]
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        for raw in lines:
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                stats["undecodable_lines"] += 1
                continue
            pieces = [text]
            if len(text) > MAX_DOC_CHARS:
                stats["split_long_lines"] += 1
                pieces = split_long_line(text)
            ids = [i for p in pieces for i in sp.encode(p)] if text else []
            if not ids:
                stats["empty_lines"] += 1
                continue
            docs.append(ids)
    return docs, stats


def all_rows(shards: str) -> tuple[np.ndarray, np.ndarray]:
    m = load_manifest(shards)
    parts = [read_rows(shards, name) for name in sorted(m["files"])]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_full(rows: np.ndarray, docs: list[list[int]], seq: int, chunks: int) -> None:
    """full packing: [CLS] + seq-1 ids of the stream d1 [SEP] d2 [SEP] ...; padding only
    at the end of a row, and only on the last row of a chunk."""
    assert rows.shape[1] == seq and (rows[:, 0] == CLS).all()
    body = rows[:, 1:]
    real = body != PAD
    assert (np.diff(real.astype(np.int8), axis=1) <= 0).all(), "a pad inside a row"
    assert (~real[:, -1]).sum() <= chunks
    assert not (body == CLS).any()
    expected = np.fromiter((i for d in docs for i in d + [SEP]), dtype=np.int64)
    assert np.array_equal(body[real], expected)


def check_doc(rows: np.ndarray, docs: list[list[int]], seq: int) -> None:
    """doc packing: every document on its own rows `[CLS] piece [SEP] pad…`."""
    body = seq - 2
    expected = []
    for d in docs:
        for s in range(0, len(d), body):
            piece = d[s:s + body]
            expected.append([CLS] + piece + [SEP] + [PAD] * (body - len(piece)))
    assert rows.shape == (len(expected), seq)
    assert np.array_equal(rows, np.array(expected, dtype=np.int64))


def naive_pack(docs: list[list[int]], ends: list[bool], seq: int, packing: str) -> list[list[int]]:
    merged, cur = [], []
    for ids, end in zip(docs, ends):
        cur = cur + list(ids)
        if end:
            if cur:
                merged.append(cur)
            cur = []
    if packing == "full":
        stream = [i for d in merged for i in d + [SEP]]
        rows = [[CLS] + stream[s:s + seq - 1] for s in range(0, len(stream), seq - 1)]
    else:
        rows = [[CLS] + d[s:s + seq - 2] + [SEP] for d in merged for s in range(0, len(d), seq - 2)]
    return [r + [PAD] * (seq - len(r)) for r in rows]


# ---------------------------------------------------------------- pure functions

@pytest.mark.parametrize("packing", ["full", "doc"])
def test_pack_rows_matches_naive_packing(packing):
    rng = random.Random(0)
    for trial in range(30):
        n = rng.randint(0, 40)
        docs = [[rng.randint(NUM_SPECIAL, 999) for _ in range(rng.choice([0, 1, 5, 62, 63, 64, 130, rng.randint(0, 300)]))]
                for _ in range(n)]
        ends = [rng.random() < 0.7 for _ in range(n)]
        if n:
            ends[-1] = True
        got = pack_rows(docs, ends, SEQ, packing)
        assert got.dtype == np.int32 and got.shape[1:] == (SEQ,)
        assert got.tolist() == naive_pack(docs, ends, SEQ, packing), trial


def test_read_chunk_partitions_the_file_exactly(tmp_path):
    """Concatenated chunks give back the file byte for byte, for any chunk size: every
    line is read by exactly one task, whatever the chunk edges cut."""
    rng = random.Random(1)
    lines = []
    for _ in range(300):
        kind = rng.random()
        lines.append("" if kind < 0.1 else "中文" * rng.randint(1, 40) + ("\r" if kind > 0.9 else ""))
    lines.append("长" * 3000)  # a line longer than most chunks
    path = tmp_path / "f.txt"
    data = ("\n".join(lines)).encode()  # no final newline
    path.write_bytes(data)
    for chunk_bytes in (1, 7, 64, 1000, 4096, len(data), len(data) * 2):
        chunks = plan_chunks([Source(str(path), len(data))], chunk_bytes)
        assert all(c["end"] - c["start"] <= chunk_bytes for c in chunks)
        got = b"".join(read_chunk(str(path), c["start"], c["end"]) for c in chunks)
        assert got == data, chunk_bytes


def test_shard_writer_cuts_files_and_row_groups(tmp_path):
    """Whatever the chunk sizes: files of rows_per_shard rows (the last shorter), row groups
    of BLOCK_ROWS (a file's last shorter), row_id dense, rows in order, manifest entries
    matching the Parquet metadata."""
    rng = random.Random(0)
    for trial in range(25):
        root = tmp_path / str(trial)
        per_shard = rng.choice([700, BLOCK_ROWS, 2 * BLOCK_ROWS, 3000])
        w = ShardWriter(str(root), 4, per_shard)
        total = 0
        for _ in range(rng.randint(0, 5)):
            n = rng.choice([0, 1, 500, BLOCK_ROWS, 2500])
            w.add(np.arange(total * 4, (total + n) * 4, dtype=np.int32).reshape(n, 4))
            total += n
        w.close()
        assert w.rows == total and len(w.files) == -(-total // per_shard)
        seen = 0
        for name in sorted(w.files):
            info, meta = w.files[name], pq.ParquetFile(root / name).metadata
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            assert info["row_groups"] == groups and info["first_row_id"] == seen
            assert all(g == BLOCK_ROWS for g in groups[:-1]) and 0 < groups[-1] <= BLOCK_ROWS
            assert info["size"] == os.path.getsize(root / name)
            row_id, ids = read_rows(str(root), name)
            assert np.array_equal(row_id, np.arange(seen, seen + len(ids))) and (ids[:, 0] == row_id * 4).all()
            seen += len(ids)
        assert seen == total and all(w.files[n]["rows"] == per_shard for n in sorted(w.files)[:-1])


def test_split_long_line_is_lossless():
    text = ("这是一个句子。" * 5000) + ("没有句号的长段" * 5000) + "结尾！"
    pieces = split_long_line(text, max_chars=1000)
    assert "".join(pieces) == text
    assert all(0 < len(p) <= 1000 for p in pieces)
    assert all(p.endswith("。") for p in pieces[:30])  # cut after sentence ends where there are some
    assert split_long_line("短", 1000) == ["短"]


def test_clean_documents_counts():
    stats = dict.fromkeys(corpus.STAT_KEYS, 0)
    data = codecs.BOM_UTF8 + "第一行\n\n  \n 第二行 \r\n".encode() + b"\xff\xfe bad\n" + "长".encode() * (MAX_DOC_CHARS + 5) + b"\n"
    texts, ends = clean_documents(data, stats, bom=True)
    assert texts[:2] == ["第一行", "第二行"] and ends[:2] == [True, True]
    assert "".join(texts[2:]) == "长" * (MAX_DOC_CHARS + 5) and ends[2:] == [False, True]
    assert stats["lines"] == 3 and stats["empty_lines"] == 2 and stats["undecodable_lines"] == 1
    assert stats["split_long_lines"] == 1


def test_ten_mb_line_memory_is_bounded(tmp_path, tiny_spm, demo_dir):
    """A 10 MB line is encoded in pieces: the chunk's peak memory stays a small multiple of
    the line (a single spm call on the whole line costs ~4x more)."""
    path = tmp_path / "long.txt"
    write_long_line(path, demo_dir, 10 << 20)
    probe = ("import json, os, resource, sys\n"
             "from wr_train import preprocess as corpus\nfrom wr_train.tokenizer import load_spm\n"
             "sp = load_spm(sys.argv[1]); f = sys.argv[2]\n"
             "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "chunk = {'path': f, 'format': 'txt', 'field': '', 'start': 0, 'end': os.path.getsize(f)}\n"
             "[(rows, _, st)] = corpus.chunk_rows(sp, chunk, 128, 'full')\n"
             "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
             "print(json.dumps({'grew_mb': (peak - base) / 1024, **st}))\n")
    out = subprocess.run([sys.executable, "-c", probe, str(tiny_spm), str(path)], check=True,
                         capture_output=True, text=True, cwd=str(Path(__file__).parents[1]))
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["split_long_lines"] == 1 and result["documents"] == 3
    assert result["grew_mb"] < 150, result


def write_long_line(path: Path, demo_dir: Path, size: int) -> None:
    text = (demo_dir / "corpus" / "inews.txt").read_text(encoding="utf-8").replace("\n", "")
    blob = (text * (size // len(text.encode()) + 1)).encode()[:size]
    blob = blob.decode("utf-8", "ignore").encode()
    path.write_bytes(b"first short line\n" + blob + b"\nlast line\n")


# ---------------------------------------------------------------- preprocess on Ray

@pytest.fixture(scope="module")
def ray_cluster(ray_local):
    """The session's one Ray (conftest.ray_local: ray.init once if not initialized,
    never shut down)."""
    return ray_local


@pytest.fixture(scope="module")
def sp(tiny_spm):
    return load_spm(str(tiny_spm))


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory, demo_dir) -> Path:
    """Real text (reviews + taobao, ~3 MB) and a file of awkward lines: BOM, CRLF, blank
    and whitespace-only lines, a zero-width-only line, undecodable bytes, a line over
    MAX_DOC_CHARS, and no final newline."""
    d = tmp_path_factory.mktemp("text")
    for name in ("reviews.txt", "taobao.txt"):
        (d / name).write_bytes((demo_dir / "corpus" / name).read_bytes())
    sanguo = (demo_dir / "corpus" / "sanguo.txt").read_text(encoding="utf-8").replace("\n", "")
    odd = (codecs.BOM_UTF8 + "第一行，有BOM\r\n\r\n   \n\t\u3000\n\u200b\n".encode()
           + b"\xc3\x28 broken utf-8\n" + "正常的一行 with spaces  inside\n".encode()
           + b"\xe4\xb8 truncated\n" + sanguo[:MAX_DOC_CHARS * 2 + 17].encode() + b"\n"
           + "最后一行没有换行符".encode())
    (d / "zz_odd.txt").write_bytes(odd)
    return d


@pytest.fixture(scope="module")
def text_files(text_dir) -> list[str]:
    return [str(p) for p in sorted(text_dir.glob("*.txt"))]


@pytest.fixture(scope="module")
def reference(sp, text_files):
    return reference_docs(sp, text_files)


@pytest.fixture(scope="module")
def full_run(ray_cluster, text_dir, tiny_spm, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "shards"
    m = preprocess([str(text_dir)], str(tiny_spm), str(out), seq_length=SEQ, chunk_bytes=CHUNK,
                   rows_per_shard=3000, **QUIET)
    return out, m


def test_full_packing_invariants(full_run, reference):
    out, m = full_run
    docs, _ = reference
    row_id, rows = all_rows(str(out))
    assert np.array_equal(row_id, np.arange(len(rows)))
    check_full(rows, docs, SEQ, m["chunks"])
    assert np.count_nonzero(rows) == m["non_pad_tokens"] == m["text_tokens"] + len(rows) + len(docs)


def test_manifest_counts(full_run, reference, text_files, tiny_spm):
    out, m = full_run
    docs, stats = reference
    assert load_manifest(str(out)) == m
    assert m["seq_length"] == SEQ and m["packing"] == "full"
    assert m["documents"] == m["lines"] == len(docs)
    assert m["text_tokens"] == sum(map(len, docs))
    assert m["tokens"] == m["rows"] * SEQ
    assert m["pad_fraction"] == round(1 - m["non_pad_tokens"] / m["tokens"], 6) < 0.01
    assert m["skipped"] == {"undecodable_lines": 2, "empty_lines": 4, "missing_field": 0}
    assert {k: m["skipped"].get(k, m.get(k)) for k in stats} == stats
    assert m["split_long_lines"] == 1
    assert m["vocab_size"] == 8000 and m["spm_sha256"] == file_sha256(tiny_spm / "spm.model")
    assert (out / "spm.model").read_bytes() == (tiny_spm / "spm.model").read_bytes()
    assert [s["path"] for s in m["sources"]] == text_files
    assert {s["format"] for s in m["sources"]} == {"txt"}
    assert [s["bytes"] for s in m["sources"]] == [os.path.getsize(f) for f in text_files]
    assert m["chunks"] > len(text_files)  # the test really crosses chunk edges
    first = 0
    assert sorted(os.listdir(out)) == sorted(list(m["files"]) + ["manifest.json", "spm.model", "token_counts.npy"])
    assert m["eval"]["rows"] == 0 and m["eval"]["files"] == {}
    for name in sorted(m["files"]):
        info = m["files"][name]
        meta = pq.ParquetFile(out / name).metadata
        assert info["size"] == os.path.getsize(out / name)
        assert info["first_row_id"] == first and info["rows"] == meta.num_rows
        assert info["row_groups"] == [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        assert all(n == BLOCK_ROWS for n in info["row_groups"][:-1])
        first += info["rows"]
    assert first == m["rows"] and len(m["files"]) == -(-m["rows"] // 3000)


def test_rows_are_stable_across_runs(full_run, text_dir, tiny_spm, tmp_path):
    """Same corpus and settings -> the same row_id -> ids and the same bytes; the shard
    size only moves the file cuts, never a row."""
    out, m = full_run
    again = tmp_path / "again"
    m2 = preprocess([str(text_dir)], str(tiny_spm), str(again), seq_length=SEQ, chunk_bytes=CHUNK,
                    rows_per_shard=3000, **QUIET)
    assert {k: v for k, v in m2.items() if k != "seconds"} == {k: v for k, v in m.items() if k != "seconds"}
    for name in m["files"]:
        assert (again / name).read_bytes() == (out / name).read_bytes()
    other = tmp_path / "other"
    preprocess([str(text_dir)], str(tiny_spm), str(other), seq_length=SEQ, chunk_bytes=CHUNK,
               rows_per_shard=5000, **QUIET)
    a, b = all_rows(str(out)), all_rows(str(other))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_heldout_documents_are_packed_apart_with_the_floor(ray_cluster, text_dir, tiny_spm, reference,
                                                          sp, text_files, full_run, tmp_path):
    """A share of the documents (by a hash of the text) goes to eval/ instead of the
    train rows: together they are every document once; the floor comes from the counts
    of the train rows alone."""
    docs, _ = reference
    out = tmp_path / "held"
    m = preprocess([str(text_dir)], str(tiny_spm), str(out), seq_length=SEQ, chunk_bytes=CHUNK,
                   rows_per_shard=3000, log=lambda *a: None, heldout=0.2)
    ev = m["eval"]
    assert m["heldout"] == 0.2 and 0 < ev["rows"] == sum(f["rows"] for f in ev["files"].values())
    assert sorted(ev["files"])[0] == "eval/part-00000.parquet"
    assert m["documents"] + ev["documents"] == len(docs) == full_run[1]["documents"]
    assert 0.1 < ev["documents"] / len(docs) < 0.3
    assert m["text_tokens"] + ev["text_tokens"] == sum(map(len, docs))
    _, train = all_rows(str(out))
    eval_ids, held = read_eval_rows(str(out), m, 10 ** 9)
    assert np.array_equal(eval_ids, np.arange(ev["rows"])) and len(held) == ev["rows"]
    assert np.count_nonzero(held) == ev["non_pad_tokens"] and np.count_nonzero(train) == m["non_pad_tokens"]
    # the held-out documents are exactly those the hash picks, and the same on a rerun
    texts = []
    for f in text_files:
        data = Path(f).read_bytes().removeprefix(codecs.BOM_UTF8)
        for raw in data.split(b"\n"):
            try:
                t = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                continue
            if t and sp.encode(split_long_line(t)[0]):
                texts.append(split_long_line(t)[0])
    picked = heldout_pieces(texts, [True] * len(texts), 0.2)
    assert int(picked.sum()) == ev["documents"]
    first_held = sp.encode(texts[int(np.argmax(picked))])
    n = min(len(first_held), SEQ - 1)
    assert held[0, 1:1 + n].tolist() == first_held[:n]  # eval rows keep corpus order
    # the floor: unigram entropy and commonest-token share of the train rows' targets
    counts = np.load(out / "token_counts.npy")
    assert np.array_equal(counts, np.bincount(train.reshape(-1), minlength=m["vocab_size"]))
    c = counts[NUM_SPECIAL:].astype(float)
    p = c[c > 0] / c.sum()
    assert m["unigram"]["entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-5)
    assert m["unigram"]["top_fraction"] == pytest.approx(c.max() / c.sum(), rel=1e-5)
    assert 3 < m["unigram"]["entropy"] < np.log(m["vocab_size"])
    assert load_manifest(str(out)) == m
    (out / "eval" / "part-00000.parquet").write_bytes(b"cut")
    with pytest.raises(ShardError, match="eval/part-00000.parquet: missing or truncated"):
        load_manifest(str(out))


def test_heldout_share_is_checked(tiny_spm, text_files, tmp_path):
    with pytest.raises(CorpusError, match="--heldout 0.7: expected a share"):
        preprocess(text_files, str(tiny_spm), str(tmp_path / "o"), log=lambda *a: None, heldout=0.7)


def test_doc_packing_invariants(ray_cluster, text_dir, tiny_spm, reference, tmp_path):
    docs, _ = reference
    out = tmp_path / "doc"
    m = preprocess([str(text_dir / "*.txt")], str(tiny_spm), str(out), seq_length=SEQ,
                   packing="doc", chunk_bytes=CHUNK, **QUIET)
    row_id, rows = all_rows(str(out))
    assert np.array_equal(row_id, np.arange(len(rows)))
    check_doc(rows, docs, SEQ)
    assert m["packing"] == "doc" and m["documents"] == len(docs)
    assert np.count_nonzero(rows) == m["non_pad_tokens"] == m["text_tokens"] + 2 * len(rows)
    assert m["pad_fraction"] > 0.1  # what the full packing saves


def test_ten_mb_line_through_ray(ray_cluster, sp, tiny_spm, demo_dir, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_long_line(src / "long.txt", demo_dir, 10 << 20)
    out = tmp_path / "out"
    m = preprocess([str(src)], str(tiny_spm), str(out), seq_length=128, chunk_bytes=1 << 20, **QUIET)
    docs, stats = reference_docs(sp, [str(src / "long.txt")])
    assert m["split_long_lines"] == stats["split_long_lines"] == 1
    assert m["documents"] == 3 and m["chunks"] == 11
    check_full(all_rows(str(out))[1], docs, 128, m["chunks"])


def test_s3_input_and_output(ray_cluster, s3, text_dir, text_files, tiny_spm, full_run):
    """s3:// in (a dir and a glob) and s3:// out give the rows of the local run."""
    bucket = s3.bucket("wr-corpus-tests")
    for f in text_files:
        storage.write_bytes(storage.join(bucket, "corpus", Path(f).name), Path(f).read_bytes())
    local_out, local_m = full_run
    out = storage.join(bucket, "shards-full")
    m = preprocess([storage.join(bucket, "corpus")], str(tiny_spm), out, seq_length=SEQ,
                   chunk_bytes=CHUNK, rows_per_shard=3000, **QUIET)
    assert load_manifest(out) == m
    assert [s["path"] for s in m["sources"]] == [storage.join(bucket, "corpus", Path(f).name) for f in text_files]
    keep = ("rows", "text_tokens", "non_pad_tokens", "documents", "skipped", "files", "chunks")
    assert {k: m[k] for k in keep} == {k: local_m[k] for k in keep}
    s3_rows, local_rows = all_rows(out), all_rows(str(local_out))
    assert np.array_equal(s3_rows[0], local_rows[0]) and np.array_equal(s3_rows[1], local_rows[1])
    assert storage.read_bytes(storage.join(out, "spm.model")) == (tiny_spm / "spm.model").read_bytes()
    # a glob over s3 keys, to a local directory
    m2 = preprocess([storage.join(bucket, "corpus", "t*.txt")], str(tiny_spm), str(Path(local_out).parent / "glob"),
                    seq_length=SEQ, **QUIET)
    assert [s["path"] for s in m2["sources"]] == [storage.join(bucket, "corpus", "taobao.txt")]


# ---------------------------------------------------------------- bad input (§5)

def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


def assert_no_output(out: Path) -> None:
    """Nothing a later stage would take for shards: no OUT, no leftover staging dir."""
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]
    with pytest.raises(ShardError, match="not a complete shard directory"):
        load_manifest(str(out))


def test_missing_path(tiny_spm, tmp_path):
    with pytest.raises(CorpusError) as e:
        preprocess([str(tmp_path / "nope.txt")], str(tiny_spm), str(tmp_path / "o"), **QUIET)
    assert "--corpus" in one_line(e.value) and "nope.txt: no such file" in str(e.value)
    with pytest.raises(CorpusError, match=r"--corpus .*/\*\.md: no such file"):
        preprocess([str(tmp_path / "*.md")], str(tiny_spm), str(tmp_path / "o"), **QUIET)
    assert_no_output(tmp_path / "o")


def test_empty_corpus(ray_cluster, tiny_spm, tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(CorpusError) as e:
        preprocess([str(tmp_path / "empty.txt")], str(tiny_spm), str(tmp_path / "o"), **QUIET)
    assert "empty.txt: empty corpus (0 bytes)" in one_line(e.value)
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("\n   \n\u3000\n\n")
    with pytest.raises(CorpusError) as e:
        preprocess([str(blank)], str(tiny_spm), str(tmp_path / "o"), **QUIET)
    assert "empty corpus (no text lines after cleaning: 4 empty" in one_line(e.value)
    assert_no_output(tmp_path / "o")


def test_binary_and_foreign_encoding(tiny_spm, tmp_path):
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)) * 100)
    with pytest.raises(CorpusError) as e:
        preprocess([str(binary)], str(tiny_spm), str(tmp_path / "o"), **QUIET)
    assert f"--corpus {binary}: binary file" in one_line(e.value) and "UTF-8" in str(e.value)
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes(("中文文本，一行一个文档。\n" * 50).encode("gbk"))
    with pytest.raises(CorpusError) as e:
        preprocess([str(gbk)], str(tiny_spm), str(tmp_path / "o"), **QUIET)
    assert f"--corpus {gbk}: not UTF-8 text" in one_line(e.value)
    assert_no_output(tmp_path / "o")


def test_not_an_spm_dir(text_files, tmp_path):
    with pytest.raises(TokenizerError) as e:
        preprocess(text_files, str(tmp_path), str(tmp_path / "o"), **QUIET)
    assert f"--spm {tmp_path}: not an spm directory (expected spm.model" in one_line(e.value)
    assert_no_output(tmp_path / "o")


@pytest.mark.parametrize("seq", [7, 513])
def test_seq_length_out_of_range(seq, text_files, tiny_spm, tmp_path):
    with pytest.raises(CorpusError) as e:
        preprocess(text_files, str(tiny_spm), str(tmp_path / "o"), seq_length=seq, **QUIET)
    assert one_line(e.value) == f"--seq-length {seq}: expected 8..512 (BERT positions)"


def test_unwritable_or_used_output(text_files, tiny_spm, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(CorpusError) as e:
        preprocess(text_files, str(tiny_spm), str(blocker / "shards"), **QUIET)
    assert f"--out {blocker}/shards" in one_line(e.value) and "not writable" in str(e.value)
    with pytest.raises(CorpusError, match=r"--out .*a-file: exists and is not a directory"):
        preprocess(text_files, str(tiny_spm), str(blocker), **QUIET)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(CorpusError, match=r"--out .*used: not empty"):
        preprocess(text_files, str(tiny_spm), str(used), **QUIET)
    assert (used / "keep.txt").read_text() == "mine"


def test_unreachable_s3_endpoint(s3, text_files, tiny_spm, tmp_path, monkeypatch):
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed}")
    with pytest.raises(CorpusError) as e:
        preprocess(["s3://wr-corpus-tests/corpus"], str(tiny_spm), str(tmp_path / "o"), **QUIET)
    assert "--corpus s3://wr-corpus-tests/corpus: cannot reach the S3 endpoint" in one_line(e.value)
    assert f"127.0.0.1:{closed}" in str(e.value)
    with pytest.raises(CorpusError) as e:
        preprocess(text_files, str(tiny_spm), "s3://wr-corpus-tests/out", **QUIET)
    assert "--out s3://wr-corpus-tests/out: " in one_line(e.value) and "cannot reach" in str(e.value)
    assert_no_output(tmp_path / "o")


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_run_leaves_no_shard_dir(ray_cluster, s3, where, error, text_dir, tiny_spm, tmp_path, monkeypatch):
    """A run that dies after writing a shard (an I/O error, Ctrl-C) removes what it wrote:
    nothing is left that load_manifest would accept."""
    write = ShardWriter._append
    calls = []

    def failing_write(self, rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise error
        write(self, rows)

    monkeypatch.setattr(ShardWriter, "_append", failing_write)
    out = (str(tmp_path / "o") if where == "local"
           else storage.join(s3.bucket("wr-corpus-tests"), f"failed-{type(error).__name__}"))
    with pytest.raises(CorpusError if isinstance(error, Exception) else KeyboardInterrupt) as e:
        preprocess([str(text_dir / "taobao.txt")], str(tiny_spm), out, seq_length=SEQ,
                   rows_per_shard=500, **QUIET)
    if isinstance(error, Exception):
        assert "disk full" in one_line(e.value)
    assert len(calls) == 2
    if where == "local":
        assert_no_output(tmp_path / "o")
    else:
        assert not storage.exists(out) or not storage.list_files(out)
        with pytest.raises(ShardError, match="not a complete shard directory"):
            load_manifest(out)


def test_load_manifest_refuses_incomplete_dirs(full_run, tmp_path):
    import shutil
    src, _ = full_run
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    part = sorted(broken.glob("part-*.parquet"))[-1]
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"part-\d+\.parquet: missing or truncated shard"):
        load_manifest(str(broken))
    part.unlink()
    with pytest.raises(ShardError, match="missing or truncated shard"):
        load_manifest(str(broken))
    (broken / "spm.model").unlink()
    with pytest.raises(ShardError, match=r"not a complete shard directory \(no spm.model\)"):
        load_manifest(str(broken))
    (broken / "manifest.json").unlink()
    with pytest.raises(ShardError, match=r"not a complete shard directory \(no manifest.json"):
        load_manifest(str(broken))
