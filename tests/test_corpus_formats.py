"""Corpus formats (issue 31): *.txt, *.txt.gz, *.jsonl, *.jsonl.gz and *.parquet, local or
s3://, read into the same documents, hence the same shards and the same segmenter; a record
without its text is counted and skipped; a file its reader cannot read is refused up front."""
from __future__ import annotations

import collections
import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from wr_train import storage
from wr_train.preprocess import preprocess
from wr_train.shards import load_manifest, read_eval_rows, read_rows
from wr_train.text import CorpusError
from wr_train.text import (Source, check_source, chunk_documents, gzip_pieces, list_sources,
                           plan_chunks, read_chunk)

SEQ = 64
QUIET = dict(log=lambda *a: None)
FORMATS = ("txt", "txt.gz", "jsonl", "jsonl.gz", "parquet")


def write_corpus(path: Path, docs: list, fmt: str, field: str = "text", row_group: int = 300) -> str:
    """`docs` as one corpus file of format `fmt` (a jsonl record also carries an id; a
    document None is a record or row without its text)."""
    path = path.with_name(f"{path.name}.{fmt}")
    if fmt == "parquet":
        table = pa.table({"id": list(range(len(docs))), field: pa.array(docs, pa.string())})
        pq.write_table(table, path, row_group_size=row_group)
        return str(path)
    kind = fmt.removesuffix(".gz")
    if kind == "txt":
        data = "".join(d + "\n" for d in docs).encode()
    else:
        data = "".join(json.dumps({"id": i, **({field: d} if d is not None else {})},
                                  ensure_ascii=False) + "\n" for i, d in enumerate(docs)).encode()
    path.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
    return str(path)


def all_rows(shards: str, m: dict) -> tuple[np.ndarray, ...]:
    parts = [read_rows(shards, name) for name in sorted(m["files"])]
    eval_ids, eval_rows = read_eval_rows(shards, m, 10 ** 9)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            eval_ids, eval_rows)


@pytest.fixture(scope="module")
def slice_docs(demo_dir) -> list[str]:
    """A small real slice of the demo corpus: 1,500 reviews and 300 People's Daily lines."""
    corpus = demo_dir / "corpus"
    reviews = (corpus / "reviews.txt").read_text(encoding="utf-8").splitlines()[:1500]
    daily = (corpus / "peoples_daily.txt").read_text(encoding="utf-8").splitlines()[:300]
    return reviews + daily


@pytest.fixture(scope="module")
def corpora(tmp_path_factory, slice_docs) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    return {fmt: write_corpus(root / "slice", slice_docs, fmt) for fmt in FORMATS}


# ---------------------------------------------------------------- reading, no Ray

def test_gzip_pieces_are_the_plain_files_chunks(tmp_path):
    """A gzip file streams out exactly the pieces read_chunk cuts from the plain file (every
    line in the piece it starts in, whatever the chunk size cuts), so packing it gives the
    plain file's rows; a trailer that lies (two members) still loses nothing."""
    rng = random.Random(2)
    lines = ["" if rng.random() < 0.1 else "中文" * rng.randint(1, 40) + ("\r" if rng.random() < 0.1 else "")
             for _ in range(400)] + ["长" * 3000]
    data = "\n".join(lines).encode()  # no final newline
    plain, packed = tmp_path / "f.txt", tmp_path / "f.txt.gz"
    plain.write_bytes(data)
    packed.write_bytes(gzip.compress(data))
    src = check_source(list_sources([str(packed)])[0])
    assert src.format == "txt.gz" and src.text_bytes == len(data)
    for chunk_bytes in (1, 7, 64, 1000, 4096, len(data), len(data) * 2):
        ranges = plan_chunks([Source(str(plain), len(data))], chunk_bytes)
        want = [read_chunk(str(plain), c["start"], c["end"]) for c in ranges]
        (chunk,) = plan_chunks([src], chunk_bytes)
        got = list(gzip_pieces(chunk["path"], chunk["end"], chunk["step"]))
        assert [w for w in want if w] == [g for g in got if g], chunk_bytes
        assert b"".join(got) == data
    two = tmp_path / "two.txt.gz"  # two members: the trailer holds the second one's size
    two.write_bytes(gzip.compress(data[:5000]) + gzip.compress(data[5000:]))
    (chunk,) = plan_chunks([check_source(list_sources([str(two)])[0])], 1000)
    assert b"".join(gzip_pieces(chunk["path"], chunk["end"], chunk["step"])) == data


def test_records_without_their_text_are_counted_and_skipped(tmp_path):
    """jsonl: a record without the field, with null or a number there is `missing_field`; a
    line that is not a JSON object (or not UTF-8) is `undecodable_lines`, as in text files;
    Parquet: a null is `missing_field`."""
    lines = [b'\xef\xbb\xbf{"text": " first "}', b'{"id": 1}', b'{"text": null}', b'{"text": 5}',
             b'{"text": "second"}', b"not json", b"[1, 2]", b'{"text": "\xff"}', b"", b"  ",
             b'{"text": "   "}', '{"text": "第三"}'.encode()]
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_bytes(b"\n".join(lines) + b"\n")
    table = pa.table({"body": ["一", None, "  ", "二"]})
    pq.write_table(table, tmp_path / "r.parquet", row_group_size=2)
    got = {}
    for path, kwargs in ((jsonl, {}), (tmp_path / "r.parquet", {"text_column": "body"})):
        stats = collections.Counter()
        src = check_source(list_sources([str(path)])[0], **kwargs)
        texts = [t for c in plan_chunks([src]) for ts, _ in chunk_documents(c, stats) for t in ts]
        got[path.suffix] = texts, dict(stats)
    assert got[".jsonl"] == (["first", "second", "第三"],
                             {"missing_field": 3, "undecodable_lines": 3, "empty_lines": 3, "lines": 3})
    assert got[".parquet"] == (["一", "二"], {"missing_field": 1, "empty_lines": 1, "lines": 2})


def test_unreadable_files_are_refused_up_front(tiny_spm, tmp_path):
    """Before any Ray task: a wrong text field or column (naming what is there), a file
    that is not JSON lines, Parquet or gzip; for preprocess and spm alike."""
    from wr_train.tokenizer import TokenizerError, train_spm
    jsonl = write_corpus(tmp_path / "c", ["一", "二"], "jsonl", field="content")
    cases = [
        ([jsonl], {}, "none of the first 2 records has a text field 'text' (fields there: content, id); "
                      "set --text-field"),
        ([write_corpus(tmp_path / "p", ["一"], "parquet", field="body")], {},
         "no column 'text' (columns: id, body); set --text-column"),
        ([write_corpus(tmp_path / "p", ["一"], "parquet", field="body")], {"text_column": "id"},
         "column 'id' holds int64, expected strings"),
    ]
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("这不是 JSON\n" * 20)
    cases.append(([str(bad_json)], {}, "not JSON lines (20 of the first 20 lines are not JSON objects)"))
    fake_parquet = tmp_path / "fake.parquet"
    fake_parquet.write_text("一\n二\n")
    cases.append(([str(fake_parquet)], {}, "not a Parquet file"))
    fake_gz = tmp_path / "fake.txt.gz"
    fake_gz.write_text("一\n二\n")
    cases.append(([str(fake_gz)], {}, "not gzip data"))
    for corpus, kwargs, says in cases:
        with pytest.raises(CorpusError) as e:
            preprocess(corpus, str(tiny_spm), str(tmp_path / "o"), **kwargs, **QUIET)
        assert says in str(e.value) and "\n" not in str(e.value) and corpus[0] in str(e.value)
        with pytest.raises(TokenizerError, match=says.split(" (")[0]):
            train_spm(corpus, str(tmp_path / "spm"), 100, char=True, log=lambda *a: None, **kwargs)
    assert not (tmp_path / "o").exists()


def test_spm_reads_every_format(corpora, tmp_path):
    """The segmenter trained on each format of the same text is the same (one thread)."""
    from wr_train.tokenizer import train_spm
    vocabs, digests = set(), set()
    for fmt, path in corpora.items():
        out = tmp_path / fmt
        train_spm([path], str(out), 4000, threads=1, input_sentence_size=20_000, log=lambda *a: None)
        vocabs.add((out / "spm.vocab").read_bytes())
        digests.add(json.loads((out / "meta.json").read_text())["corpus_sha256"])
    assert len(vocabs) == 1 and len(digests) == 1


# ---------------------------------------------------------------- preprocess on Ray

def test_every_format_gives_the_same_shards(ray_local, s3, corpora, slice_docs, tiny_spm, tmp_path):
    """txt, txt.gz, jsonl, jsonl.gz and Parquet of the same text, local and on s3://: the
    same row_ids and input_ids, train and held-out, and the same counts; the manifest
    names each source and its format."""
    bucket = s3.bucket("wr-formats")
    runs = dict(corpora)
    for fmt in ("jsonl.gz", "parquet"):
        remote = storage.join(bucket, Path(corpora[fmt]).name)
        storage.write_bytes(remote, Path(corpora[fmt]).read_bytes())
        runs[f"s3 {fmt}"] = remote
    results = {}
    for name, path in runs.items():
        out = tmp_path / name.replace(" ", "-")
        m = preprocess([path], str(tiny_spm), str(out), seq_length=SEQ, heldout=0.05, **QUIET)
        assert load_manifest(str(out)) == m
        fmt = name.split()[-1]
        field = {"field": "text"} if fmt.startswith(("jsonl", "parquet")) else {}
        assert m["sources"] == [{"path": path, "bytes": Path(corpora[fmt]).stat().st_size,
                                 "format": fmt, **field}]
        results[name] = m, all_rows(str(out), m)
    ref_m, ref_rows = results["txt"]
    assert ref_m["documents"] + ref_m["eval"]["documents"] == len(slice_docs)
    assert ref_m["eval"]["rows"] > 0 and ref_m["chunks"] == 1
    same = ("rows", "tokens", "non_pad_tokens", "text_tokens", "documents", "lines", "skipped",
            "chunks", "unigram", "files")
    for name, (m, rows) in results.items():
        assert {k: m[k] for k in same} == {k: ref_m[k] for k in same}, name
        assert {k: v for k, v in m["eval"].items()} == ref_m["eval"], name
        for got, want in zip(rows, ref_rows):
            assert np.array_equal(got, want), name


def test_preprocess_counts_records_without_text(ray_local, slice_docs, tiny_spm, tmp_path, capsys):
    """`wr-train preprocess --text-field` / `--text-column`: records without the field (or a
    null there) are counted in skipped.missing_field, the others packed as the plain text."""
    from wr_train.cli import main
    docs = slice_docs[:400]
    holes = [d if i % 7 else None for i, d in enumerate(docs)]
    kept = [d for d in holes if d is not None]
    plain = write_corpus(tmp_path / "kept", kept, "txt")
    m_plain = preprocess([plain], str(tiny_spm), str(tmp_path / "plain"), seq_length=SEQ, heldout=0, **QUIET)
    for fmt, flag in (("jsonl", "--text-field"), ("parquet", "--text-column")):
        path = write_corpus(tmp_path / "holes", holes, fmt, field="content", row_group=50)
        out = tmp_path / f"out-{fmt}"
        assert main(["preprocess", "--corpus", path, "--spm", str(tiny_spm), "--seq-length", str(SEQ),
                     "--heldout", "0", flag, "content", "--out", str(out)]) == 0
        m = load_manifest(str(out))
        assert m["skipped"] == {"undecodable_lines": 0, "empty_lines": 0, "missing_field": len(docs) - len(kept)}
        assert m["sources"][0]["field"] == "content" and m["documents"] == m_plain["documents"] == len(kept)
        for a, b in zip(all_rows(str(out), m), all_rows(str(tmp_path / "plain"), m_plain)):
            assert np.array_equal(a, b), fmt
    capsys.readouterr()
