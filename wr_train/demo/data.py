"""`wr-train data demo`: OUT/corpus/*.txt and OUT/tasks/<name>/{train,dev,test}.<ext>
from the pinned archives, and OUT/demo_manifest.json last. Every dev/test text is kept out
of the pretraining corpus (LeakGuard); a current manifest makes a second build a no-op.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

from wr_train.demo.archives import DemoDataError, pinned_packages
from wr_train.demo.sources import clean_text, read_sources
from wr_train.demo.task_data import SEED, TASK_FORMATS, build_tasks

FORMAT_VERSION = 1  # bump when the output changes for the same archives
PROBE_CHARS = 20  # held-out texts at least this long are also kept out as substrings


def held_out_texts(tasks: dict[str, dict[str, list[dict]]]) -> set[str]:
    """Every text field of every dev/test row. (An inews article's content enters as the
    ocnli sentence2, so its iflytek title+content sentence needs no separate entry.)"""
    texts = set()
    for splits in tasks.values():
        for split in ("dev", "test"):
            for row in splits[split]:
                texts.update(row[key] for key in ("text_a", "text_b", "sentence", "sentence1",
                                                  "sentence2") if key in row)
    return texts


class LeakGuard:
    """Is a corpus line a held-out text, or does it contain a long one? Long texts are
    indexed by their first PROBE_CHARS characters, so one pass over a line finds them."""

    def __init__(self, texts: Iterable[str]):
        self.exact = set(texts)
        self.by_probe = defaultdict(list)
        for text in self.exact:
            if len(text) >= PROBE_CHARS:
                self.by_probe[text[:PROBE_CHARS]].append(text)
        self.probes = frozenset(self.by_probe)

    def leaks(self, line: str) -> bool:
        if line in self.exact:
            return True
        windows = {line[i:i + PROBE_CHARS] for i in range(len(line) - PROBE_CHARS + 1)}
        for probe in windows & self.probes:  # set & set walks the smaller set
            if any(text in line for text in self.by_probe[probe]):
                return True
        return False


# ---------------------------------------------------------------- writers

def write_uer_tsv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\t".join(columns) + "\n")
        for row in rows:
            f.write("\t".join(clean_text(str(row[col])) for col in columns) + "\n")


def write_clue_json(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_corpus_file(path: Path, docs: Iterable[str], guard: LeakGuard) -> dict:
    """One document per line: empty, repeated and leaking documents are skipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    seen, chars, dropped = set(), 0, 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for doc in docs:
            doc = clean_text(doc)
            if not doc or doc in seen:
                continue
            if guard.leaks(doc):
                dropped += 1
                continue
            seen.add(doc)
            chars += len(doc)
            f.write(doc + "\n")
    return {"chars": chars, "lines": len(seen), "dropped_held_out": dropped}


# ---------------------------------------------------------------- build

def current_manifest(out: Path) -> dict | None:
    """The existing manifest if it was built from the same pins and its files are there."""
    try:
        manifest = json.loads((out / "demo_manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest.get("format") != FORMAT_VERSION or manifest.get("packages") != pinned_packages():
        return None
    files = [f"corpus/{name}" for name in manifest.get("corpus", {})]
    files += [split["file"] for task in manifest.get("tasks", {}).values()
              for split in task.values()]
    return manifest if files and all((out / f).is_file() for f in files) else None


def corpus_documents(sources: dict, tasks: dict) -> dict[str, list[str]]:
    """file name -> documents. Reviews used by a dev/test split and inews dev/test articles
    never enter; the LeakGuard then catches texts shared across sources."""
    eval_reviews = {row["text_a"] for name in ("douban", "chnsenticorp")
                    for split in ("dev", "test") for row in tasks[name][split]}
    dialogs = [turns for label, turns in sources["taobao_test"] if label == "1"]
    return {
        "peoples_daily.txt": sources["peoples_daily"],
        "reviews.txt": [text for text, _ in sources["reviews"] if text not in eval_reviews],
        "inews.txt": [content for _, content, _ in sources["inews"]["train"]],
        "sanguo.txt": sources["sanguo"],
        "taobao.txt": [" ".join(turns) for turns in dialogs],
    }


def build_demo(out_dir: str, cache_dir: str | None = None, log=print) -> dict:
    """Build OUT/corpus/*.txt, OUT/tasks/<name>/{train,dev,test}.<ext> and
    OUT/demo_manifest.json; returns the manifest. A current manifest short-circuits."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DemoDataError(f"--out {out_dir}: exists and is not a directory")
    manifest = current_manifest(out)
    if manifest is not None:
        log(f"[demo] {out} is up to date ({manifest['corpus_chars']:,} corpus chars)")
        return manifest
    start = time.time()
    # An interrupted rebuild must not leave an old manifest vouching for half-written files.
    (out / "demo_manifest.json").unlink(missing_ok=True)
    sources = read_sources(cache_dir, log)
    tasks = build_tasks(sources)

    task_manifest = {}
    for name, splits in tasks.items():
        fmt, ext, columns = TASK_FORMATS[name]
        task_manifest[name] = {}
        for split, rows in splits.items():
            rel = f"tasks/{name}/{split}.{ext}"
            if fmt == "uer_tsv":
                write_uer_tsv(out / rel, rows, columns)
            else:
                write_clue_json(out / rel, rows)
            labels = Counter(str(row["label"]) for row in rows)
            task_manifest[name][split] = {"file": rel, "format": fmt, "rows": len(rows),
                                          "labels": dict(sorted(labels.items()))}
        log(f"[demo] task {name}: " + " / ".join(f"{s} {len(r)}" for s, r in splits.items()))

    guard = LeakGuard(held_out_texts(tasks))
    corpus = {}
    for filename, docs in corpus_documents(sources, tasks).items():
        corpus[filename] = write_corpus_file(out / "corpus" / filename, docs, guard)
        log(f"[demo] corpus {filename}: {corpus[filename]['chars']:,} chars, "
            f"{corpus[filename]['lines']:,} lines")

    manifest = {"format": FORMAT_VERSION, "seed": SEED, "packages": pinned_packages(),
                "corpus": corpus, "corpus_chars": sum(c["chars"] for c in corpus.values()),
                "tasks": task_manifest}
    staged = out / "demo_manifest.json.tmp"
    staged.write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(staged, out / "demo_manifest.json")  # written last: it marks a complete build
    log(f"[demo] wrote {out} in {time.time() - start:.0f}s "
        f"({manifest['corpus_chars']:,} corpus chars)")
    return manifest
