"""The six stand-in fine-tuning tasks, built from the sources in the real tasks' formats
(UER TSV, CLUE JSON lines), so the loaders that read user-supplied data also read these.
Splits use a fixed seed.
"""
from __future__ import annotations

import random
from collections import defaultdict

from wr_train.demo.sources import TNEWS_LABELS, Article

SEED = 0
TRAIN_CAP, EVAL_CAP = 8000, 1000  # keep CPU fine-tuning fast
IFLYTEK_CHARS, OCNLI_PREMISE_CHARS = 500, 200  # stand-in text lengths
INEWS_LABELS = {0: "正面", 1: "中性", 2: "负面"}  # inews: 0 positive, 1 neutral, 2 negative
OCNLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}

TASK_FORMATS = {  # name -> (format, extension, UER columns)
    "douban": ("uer_tsv", "tsv", ["label", "text_a"]),
    "chnsenticorp": ("uer_tsv", "tsv", ["label", "text_a"]),
    "lcqmc": ("uer_tsv", "tsv", ["label", "text_a", "text_b"]),
    "tnews": ("clue_json", "json", None),
    "iflytek": ("clue_json", "json", None),
    "ocnli": ("clue_json", "json", None),
}


def split_80_10_10(items: list, seed: int = SEED) -> dict[str, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    n_eval = round(len(items) * 0.1)
    return {"train": items[2 * n_eval:], "dev": items[:n_eval], "test": items[n_eval:2 * n_eval]}


def cap_splits(splits: dict[str, list]) -> dict[str, list]:
    return {name: rows[:TRAIN_CAP if name == "train" else EVAL_CAP]
            for name, rows in splits.items()}


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


def build_tasks(sources: dict) -> dict[str, dict[str, list[dict]]]:
    articles = inews_splits(sources["inews"])
    return {**sentiment_tasks(sources["reviews"]),
            "lcqmc": lcqmc_task(sources["taobao_dev"]),
            "tnews": tnews_task(sources["thucnews"]),
            "iflytek": iflytek_task(articles),
            "ocnli": ocnli_task(articles)}
