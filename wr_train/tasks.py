"""The fine-tuning task registry and loaders for the real files users have.

Two formats, read exactly as the seed's tasks ship:
- UER TSV (`datasets/{chnsenticorp,douban_book_review,lcqmc}/{train,dev,test}.tsv`):
  a header line; columns are found **by name** (`label`, `text_a`, `text_b`), one row
  per line split on tabs; `test_nolabel.tsv` has no `label` column.
- CLUE JSON lines (`tnews_public`, `iflytek_public`, `ocnli_public`): one object per
  line; text in `sentence` or `sentence1` + `sentence2`; `label` a string or an int;
  the description under `label_desc` (TNEWS, some IFLYTEK copies) or `label_des`
  (IFLYTEK); OCNLI rows labelled "-" (no annotator majority) are skipped. Public test
  files carry no labels.

The label map comes from `labels.json` beside the data when present (CLUE ships one, in
its order), else from the train labels (numeric labels in numeric order). A task name
that is not built in is a *user task* read from `DATA/NAME/` by the format of its files.
Every problem is a one-line `TaskError` naming file:line and what was expected.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


class TaskError(ValueError):
    """Bad task data; the message is one line naming the file (and line) and what was expected."""


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int | None  # index into Task.labels; None in unlabelled test files


@dataclass
class Task:
    name: str
    kind: str                        # "single" | "pair"
    labels: list[str]                # label strings as in the files; index = class id
    train: list[Example]
    dev: list[Example]
    test: list[Example]              # may be empty or unlabelled
    label_desc: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)   # split -> path read
    skipped: dict[str, int] = field(default_factory=dict)  # split -> rows skipped ("-" labels)

    @property
    def test_labelled(self) -> bool:
        return bool(self.test) and all(ex.label is not None for ex in self.test)

    def summary(self) -> str:
        parts = [f"train {len(self.train)}", f"dev {len(self.dev)}"]
        if self.test:
            parts.append(f"test {len(self.test)}{'' if self.test_labelled else ' (unlabelled)'}")
        return f"{self.name} ({self.kind}, {len(self.labels)} labels): " + ", ".join(parts)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    dirs: tuple[str, ...]            # directory names users have, first = ours


# The seed's six tasks; directory names as UER's datasets/ and CLUE's *_public releases.
REGISTRY: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("douban", "single", ("douban", "douban_book_review")),
    TaskSpec("chnsenticorp", "single", ("chnsenticorp", "ChnSentiCorp")),
    TaskSpec("lcqmc", "pair", ("lcqmc", "LCQMC")),
    TaskSpec("tnews", "single", ("tnews", "tnews_public")),
    TaskSpec("iflytek", "single", ("iflytek", "iflytek_public")),
    TaskSpec("ocnli", "pair", ("ocnli", "ocnli_public")),
)}
SEED_TASKS = tuple(REGISTRY)
ALIASES = {d.lower(): spec.name for spec in REGISTRY.values() for d in spec.dirs}

# Split -> candidate file names, first found wins (OCNLI's release names its train file
# train.50k.json; UER's unlabelled test is test_nolabel.tsv).
SPLIT_FILES = {
    "train": ("train.tsv", "train.json", "train.50k.json"),
    "dev": ("dev.tsv", "dev.json"),
    "test": ("test.tsv", "test.json", "test_nolabel.tsv"),
}
SKIP_LABELS = {"-"}
DESC_KEYS = ("label_desc", "label_des")


def canonical_name(name: str) -> str:
    """`douban_book_review` -> `douban`, `tnews_public` -> `tnews`; others unchanged."""
    return ALIASES.get(name.lower(), name)


def task_dir(name: str, data_dir: str) -> Path:
    """The directory holding `name`'s files under `data_dir` (any of its known names),
    or `data_dir` itself when it directly holds a train file."""
    data = Path(data_dir)
    if not data.is_dir():
        raise TaskError(f"--data {data_dir}: no such directory")
    spec = REGISTRY.get(canonical_name(name))
    candidates = [name] + [d for d in (spec.dirs if spec else ()) if d != name]
    for cand in candidates:
        if (data / cand).is_dir():
            return data / cand
    lower = {p.name.lower(): p for p in data.iterdir() if p.is_dir()}
    for cand in candidates:
        if cand.lower() in lower:
            return lower[cand.lower()]
    if _find_split(data, "train") is not None and data.name.lower() in {c.lower() for c in candidates}:
        return data
    if spec is None:
        raise TaskError(f"task {name!r}: not a built-in task ({', '.join(SEED_TASKS)}) and "
                        f"{data / name} does not exist (a user task needs train.json or train.tsv "
                        f"plus dev there)")
    raise TaskError(f"task {name!r}: no directory {' or '.join(str(data / c) for c in candidates)}")


def _find_split(directory: Path, split: str) -> Path | None:
    for fname in SPLIT_FILES[split]:
        if (directory / fname).is_file():
            return directory / fname
    return None


# ---------------------------------------------------------------- raw rows

@dataclass
class _Row:
    line: int
    text_a: str
    text_b: str | None
    label: str | None
    desc: str | None = None


def _lines(path: Path):
    """(line number, text) of every line, a BOM dropped; undecodable bytes are an error."""
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                yield i, (line.lstrip("\ufeff") if i == 1 else line).rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_uer_tsv(path: Path, kind: str | None, require_label: bool = True) -> tuple[list[_Row], str]:
    """Rows of a UER TSV; `kind` None = infer from the header (text_b -> pair). Without
    `require_label` (test files) a missing label column means unlabelled rows."""
    rows: list[_Row] = []
    header: list[str] | None = None
    cols: dict[str, int] = {}
    for n, line in _lines(path):
        if header is None:
            if not line.strip():
                continue
            header = [h.strip() for h in line.split("\t")]
            cols = {h: i for i, h in enumerate(header)}
            kind = kind or ("pair" if "text_b" in cols else "single")
            need = ["text_a"] + (["text_b"] if kind == "pair" else [])
            if require_label:
                need = ["label"] + need
            missing = [c for c in need if c not in cols]
            if missing:
                raise TaskError(f"{path}:{n}: missing column {', '.join(repr(c) for c in missing)} "
                                f"(found columns: {', '.join(header) or 'none'}; expected a header "
                                f"with {', '.join(need)})")
            continue
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < len(header):
            raise TaskError(f"{path}:{n}: {len(fields)} tab-separated fields, the header has "
                            f"{len(header)} ({', '.join(header)})")
        label = fields[cols["label"]].strip() if "label" in cols else None
        if label == "":
            raise TaskError(f"{path}:{n}: empty label")
        rows.append(_Row(n, fields[cols["text_a"]], fields[cols["text_b"]] if kind == "pair" else None, label))
    if header is None:
        kind = kind or "single"
    return rows, kind


def read_clue_json(path: Path, kind: str | None) -> tuple[list[_Row], str]:
    """Rows of a CLUE JSON-lines file; `kind` None = infer from the first object."""
    rows: list[_Row] = []
    for n, line in _lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise TaskError(f"{path}:{n}: not a valid JSON line ({str(e).split(':')[0]})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        if kind is None:
            kind = "pair" if "sentence1" in obj else "single"
        keys = ("sentence1", "sentence2") if kind == "pair" else ("sentence",)
        missing = [k for k in keys if not isinstance(obj.get(k), str)]
        if missing:
            raise TaskError(f"{path}:{n}: no string {' or '.join(repr(k) for k in missing)} key "
                            f"(found keys: {', '.join(obj) or 'none'}; expected {', '.join(keys)}"
                            f"{', label' if not path.name.startswith('test') else ''})")
        label = obj.get("label")
        if label is not None:
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise TaskError(f"{path}:{n}: label {label!r}: expected a string or an integer")
            label = str(label).strip()
            if label == "":
                raise TaskError(f"{path}:{n}: empty label")
        desc = next((str(obj[k]) for k in DESC_KEYS if k in obj), None)
        rows.append(_Row(n, obj[keys[0]], obj[keys[1]] if kind == "pair" else None, label, desc))
    return rows, kind or "single"


def read_labels_json(path: Path) -> tuple[list[str], dict[str, str]]:
    """CLUE's labels.json: JSON lines {"label": "100", "label_desc"|"label_des": "…"}
    (a JSON list of such objects or of label strings is accepted too)."""
    text = path.read_text(encoding="utf-8").lstrip("\ufeff")
    try:
        whole = json.loads(text)
        items = whole if isinstance(whole, list) else [whole]
    except ValueError:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except ValueError as e:
                    raise TaskError(f"{path}:{n}: not a valid JSON line ({str(e).split(':')[0]})") from None
    labels, desc = [], {}
    for i, item in enumerate(items, 1):
        if isinstance(item, (str, int)) and not isinstance(item, bool):
            label = str(item)
        elif isinstance(item, dict) and isinstance(item.get("label"), (str, int)):
            label = str(item["label"])
            d = next((item[k] for k in DESC_KEYS if k in item), None)
            if d is not None:
                desc[label] = str(d)
        else:
            raise TaskError(f"{path}: entry {i}: expected {{\"label\": …, \"label_desc\": …}}")
        if label not in labels:
            labels.append(label)
    if not labels:
        raise TaskError(f"{path}: no labels in it")
    return labels, desc


def _label_order(labels) -> list[str]:
    labels = set(labels)
    if all(lab.lstrip("-").isdigit() for lab in labels):
        return sorted(labels, key=int)
    return sorted(labels)


# ---------------------------------------------------------------- loading

def _read(path: Path, kind: str | None, split: str) -> tuple[list[_Row], str]:
    if path.suffix == ".tsv":
        return read_uer_tsv(path, kind, require_label=split != "test")
    return read_clue_json(path, kind)


def _require_labels(rows: list[_Row], path: Path, split: str) -> None:
    """Train and dev rows all need a label (only test files may go without): found here,
    before the label set is built from them."""
    unlabelled = next((r for r in rows if r.label is None), None)
    if unlabelled is not None:
        raise TaskError(f"{path}:{unlabelled.line}: no 'label' key (every {split} row needs one; "
                        f"only test files may go without)")


def load_task(name: str, data_dir: str) -> Task:
    """Load a built-in task (any of its directory names) or a user task from
    `data_dir/NAME/` ({train,dev}[.tsv|.json], optional test, optional labels.json)."""
    canonical = canonical_name(name)
    spec = REGISTRY.get(canonical)
    directory = task_dir(name, data_dir)
    kind = spec.kind if spec else None
    paths = {split: _find_split(directory, split) for split in SPLIT_FILES}
    for split in ("train", "dev"):
        if paths[split] is None:
            raise TaskError(f"{directory}: no {split} file (expected one of "
                            f"{', '.join(SPLIT_FILES[split])})")
    raw: dict[str, list[_Row]] = {}
    skipped: dict[str, int] = {}
    for split, path in paths.items():
        if path is None:
            raw[split] = []
            continue
        rows, kind = _read(path, kind, split)
        if split != "test":
            _require_labels(rows, path, split)
        kept = [r for r in rows if r.label not in SKIP_LABELS]
        if len(kept) != len(rows):
            skipped[split] = len(rows) - len(kept)
        if not kept and split != "test":
            raise TaskError(f"{path}: empty split (no examples{' after skipping “-” labels' if rows else ''})")
        raw[split] = kept

    label_desc = {r.label: r.desc for r in raw["train"] if r.desc is not None}
    train_labels = {r.label for r in raw["train"]}
    if (directory / "labels.json").is_file():
        labels, desc = read_labels_json(directory / "labels.json")
        label_desc = {**label_desc, **desc}
        unknown = sorted(train_labels - set(labels))
        if unknown:
            row = next(r for r in raw["train"] if r.label == unknown[0])
            raise TaskError(f"{paths['train']}:{row.line}: label {unknown[0]!r} is not in "
                            f"{directory / 'labels.json'}")
    else:
        labels = _label_order(train_labels)
    index = {lab: i for i, lab in enumerate(labels)}

    def convert(split: str) -> list[Example]:
        rows = raw[split]
        if split == "test" and rows and any(r.label is None for r in rows):
            return [Example(r.text_a, r.text_b, None) for r in rows]  # unlabelled test
        out = []
        for r in rows:
            if split != "train" and r.label not in train_labels:
                raise TaskError(f"{paths[split]}:{r.line}: label {r.label!r} does not occur in "
                                f"{paths['train'].name} (train labels: {', '.join(_label_order(train_labels))})")
            out.append(Example(r.text_a, r.text_b, index[r.label]))
        return out

    return Task(name=canonical, kind=kind or "single", labels=labels,
                train=convert("train"), dev=convert("dev"), test=convert("test"),
                label_desc={k: v for k, v in label_desc.items() if k in index},
                files={s: str(p) for s, p in paths.items() if p is not None}, skipped=skipped)


def load_tasks(names, data_dir: str) -> dict[str, Task]:
    """Load several tasks (all checked before any work starts); duplicates refused. Each
    name must be a plain name (a sweep keeps files and trials under it), `--tasks` in
    the error."""
    from wr_train.config import check_plain_name
    for name in names:
        check_plain_name(name, "--tasks")
    tasks: dict[str, Task] = {}
    for name in names:
        task = load_task(name, data_dir)
        if task.name in tasks:
            raise TaskError(f"task {name!r} given twice (as {task.name})")
        tasks[task.name] = task
    if not tasks:
        raise TaskError("no tasks given")
    return tasks


def parse_task_list(text: str) -> list[str]:
    """`--tasks douban,lcqmc` -> ["douban", "lcqmc"]; `all` -> the seed's six."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return list(SEED_TASKS)
    return names


__all__ = ["Example", "Task", "TaskError", "TaskSpec", "REGISTRY", "SEED_TASKS", "canonical_name",
           "task_dir", "load_task", "load_tasks", "parse_task_list", "read_labels_json"]


def majority_share(train_labels: list, labels: list) -> float:
    """Share of `labels` equal to the most frequent of `train_labels`: the accuracy of
    always answering the train set's commonest label (nan when there is nothing to score)."""
    if not labels or not train_labels or labels[0] is None:
        return float("nan")
    top = Counter(train_labels).most_common(1)[0][0]
    return sum(label == top for label in labels) / len(labels)
