"""The sweep's grid and its trial records: what every other part of a sweep agrees on.

The grid is every (task, epochs, batch, lr, seed), task-major (`build_grid`); the seed's
is epochs {3,5,8} × batch {32,64} × lr {3e-5,1e-4,3e-4}. A sweep lives in STORAGE/NAME/
(local dir or s3://, through wr_train.storage):
    sweep.json            model + data fingerprints, settings (checked on resume)
    trials/<key>.json     one finished trial: config, dev per epoch, test of the best epoch
    checkpoints/<key>/    the best-dev model of each task's best trial (others are pruned)
    scores.json / .md / .png   the report (wr_train.tune_report)
A trial's file is written once it is done, so its presence is what resume looks at.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from wr_train import storage

SEED_EPOCHS = (3, 5, 8)
SEED_BATCH_SIZES = (32, 64)
SEED_LRS = (3e-5, 1e-4, 3e-4)


class SweepError(ValueError):
    """Bad sweep input; one line naming what is wrong and what was expected."""


@dataclass(frozen=True)
class TrialSpec:
    task: str
    epochs: int
    batch_size: int
    lr: float
    seed: int
    index: int  # position in the grid: ties on dev go to the earlier configuration

    @property
    def key(self) -> str:
        return f"{self.task}-e{self.epochs}-b{self.batch_size}-lr{self.lr:g}-s{self.seed}"

    @property
    def config_key(self) -> str:
        """The configuration without the seed (seeds of one config are averaged)."""
        return f"e{self.epochs}-b{self.batch_size}-lr{self.lr:g}"

    def label(self) -> str:
        return f"e{self.epochs} b{self.batch_size} lr{self.lr:g}"


def build_grid(tasks, epochs, batch_sizes, lrs, seeds: int = 1) -> list[TrialSpec]:
    """Every (task, epochs, batch, lr, seed), task-major, in the given orders."""
    _check_values("epochs", epochs, int)
    _check_values("batch sizes", batch_sizes, int)
    _check_values("learning rates", lrs, float)
    if not isinstance(seeds, int) or seeds < 1:
        raise SweepError(f"--seeds {seeds}: expected a positive integer")
    specs, i = [], 0
    for task in tasks:
        for e in epochs:
            for b in batch_sizes:
                for lr in lrs:
                    for s in range(seeds):
                        specs.append(TrialSpec(task, int(e), int(b), float(lr), s, i))
                        i += 1
    return specs


def _check_values(what: str, values, kind) -> None:
    if not values:
        raise SweepError(f"{what}: expected at least one value")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or \
                (kind is int and float(v) != int(v)):
            raise SweepError(f"{what}: {v!r} is not a positive {'integer' if kind is int else 'number'}")
    if len(set(values)) != len(values):
        raise SweepError(f"{what}: {list(values)} has duplicates")


def parse_list(text: str, kind, flag: str) -> list:
    """`--lrs 3e-5,1e-4` -> [3e-05, 0.0001]; one-line error naming the flag."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise SweepError(f"{flag} {text}: expected comma-separated "
                         f"{'integers' if kind is int else 'numbers'}") from None
    _check_values(flag, values, kind)
    return values


# ---------------------------------------------------------------- trial records

def dev_key(rec: dict) -> tuple:
    """How trials rank: dev accuracy, then dev F1, then the earlier grid position."""
    return (rec.get("dev_acc") or 0.0, rec.get("dev_f1") or 0.0, -rec["spec"]["index"])


def read_trials(sweep_dir: str, task: str | None = None) -> dict[str, dict]:
    """key -> record of every finished trial under sweep_dir/trials/ (of one task)."""
    trials_dir = storage.join(sweep_dir, "trials")
    if not storage.exists(trials_dir):
        return {}
    out = {}
    mine = re.compile(rf"{re.escape(task)}-e\d+-b\d+-lr[^/]*\.json") if task else None
    for rel in storage.list_files(trials_dir):
        if rel.endswith(".json") and "/" not in rel and (mine is None or mine.fullmatch(rel)):
            try:
                rec = json.loads(storage.read_text(storage.join(trials_dir, rel)))
            except ValueError:
                continue  # a torn file cannot exist (atomic writes); ignore foreign junk
            out[rel[:-len(".json")]] = rec
    return out


def trial_path(sweep_dir: str, key: str) -> str:
    return storage.join(sweep_dir, "trials", f"{key}.json")


def checkpoint_path(sweep_dir: str, key: str) -> str:
    return storage.join(sweep_dir, "checkpoints", key)


def best_by_task(records) -> dict[str, dict]:
    """task -> its best single trial record (by dev_key)."""
    best: dict[str, dict] = {}
    for r in records:
        t = r["spec"]["task"]
        if t not in best or dev_key(r) > dev_key(best[t]):
            best[t] = r
    return best
