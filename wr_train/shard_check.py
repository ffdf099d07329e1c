"""`wr-train check-shards`: read every row group of a shard folder and check it against
the manifest, in parallel Ray tasks.

`load_manifest` checks what a listing can (every file there with its size); this reads
what it cannot: each row group of every train and eval part file must decompress, hold
the manifest's row count, `seq_length` ids per row, ids below the vocabulary size, and
`row_id`s that continue the file's range. A bad group fails a pretraining run only when
a worker reaches it, hours in; here it is found in one pass over the folder.
One Ray task reads GROUPS_PER_TASK neighbouring groups of one file; one CPU of the
cluster is left free for the driver and Ray's own processes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from wr_train import storage
from wr_train.shards import ShardReadError, load_manifest, open_shard, read_group

GROUPS_PER_TASK = 16     # row groups one task reads (16 × 1024 rows: ~8 MB at seq 128)


@dataclass
class ShardCheck:
    """What check_shards found: counts, and one line per bad row group (or file)."""
    shards: str
    files: int = 0
    groups: int = 0      # the manifest's, all of them
    read: int = 0        # groups read without error
    rows: int = 0        # rows in them
    seconds: float = 0.0
    bad: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.bad:
            return (f"check-shards {self.shards}: ok, {self.files} files, {self.groups:,} row groups, "
                    f"{self.rows:,} rows read in {self.seconds:.1f} s")
        return (f"check-shards {self.shards}: {len(self.bad)} bad of {self.groups:,} row groups in "
                f"{self.files} files; rebuild the folder with `wr-train preprocess` (or restore "
                f"the named files)")


def check_shards(shards: str, log=lambda *_: None, verbose: bool = False) -> ShardCheck:
    """Read every row group of every part file (train and eval/) of `shards` (local or
    s3://) on Ray and check it against the manifest. An incomplete folder is refused by
    load_manifest (one line); bad groups are listed in the result's `bad`."""
    import ray

    from wr_train.local_ray import ensure_ray, root_cause_line
    shards = storage.absolute(shards)  # Ray's tasks run in other working directories
    manifest = load_manifest(shards)
    seq, vocab = manifest["seq_length"], manifest["vocab_size"]
    files = {**manifest.get("files", {}), **manifest.get("eval", {}).get("files", {})}
    report = ShardCheck(shards, files=len(files),
                        groups=sum(len(info["row_groups"]) for info in files.values()))
    t0 = time.time()
    ensure_ray(verbose=verbose)
    check = ray.remote(num_cpus=1, max_retries=0)(check_groups)
    jobs = [(name, start, min(start + GROUPS_PER_TASK, len(info["row_groups"])))
            for name, info in files.items()
            for start in range(0, max(1, len(info["row_groups"])), GROUPS_PER_TASK)]
    slots = max(1, int(ray.cluster_resources().get("CPU", 2)) - 1)
    pending, todo, last_log = {}, list(jobs), time.time()
    while todo or pending:
        while todo and len(pending) < slots:
            name, start, stop = todo.pop(0)
            ref = check.remote(shards, name, files[name], start, stop, seq, vocab)
            pending[ref] = (name, start, stop)
        ready, _ = ray.wait(list(pending), num_returns=1)
        name, start, stop = pending.pop(ready[0])
        try:
            groups, rows, bad = ray.get(ready[0])
        except Exception as e:  # the task itself died (memory, a lost node): name its share
            groups, rows = 0, 0
            bad = [f"{storage.join(shards, name)} row groups {start}-{stop - 1}: not checked "
                   f"({root_cause_line(e)})"]
        report.read += groups
        report.rows += rows
        report.bad += bad
        if time.time() - last_log > 10:
            last_log = time.time()
            log(f"check-shards: {report.read:,}/{report.groups:,} row groups read, "
                f"{len(report.bad)} bad")
    report.bad.sort()
    report.seconds = time.time() - t0
    return report


def check_groups(shards: str, name: str, info: dict, start: int, stop: int, seq_length: int,
                 vocab_size: int) -> tuple[int, int, list[str]]:
    """Read row groups [start, stop) of one part file; returns (groups read, rows read,
    one line per problem). The task's body: plain Python, testable without Ray."""
    path = storage.join(shards, name)
    try:
        shard = open_shard(shards, name)
    except ShardReadError as e:
        return 0, 0, [f"{path}: cannot be read ({e.reason})"]
    except (storage.StorageError, OSError) as e:
        return 0, 0, [f"{path}: cannot be opened ({e})"]
    expected = info["row_groups"]
    bad = []
    if start == 0 and shard.num_row_groups != len(expected):
        bad.append(f"{path}: {shard.num_row_groups} row groups, the manifest lists {len(expected)}")
    first = info.get("first_row_id", 0) + sum(expected[:start])
    groups = rows = 0
    for g in range(start, min(stop, shard.num_row_groups)):
        where = f"{path} row group {g}"
        try:
            row_ids, ids = read_group(shard, g)
        except ShardReadError as e:
            bad.append(f"{where}: cannot be read ({e.reason})")
            first += expected[g]
            continue
        groups += 1
        rows += len(ids)
        if len(ids) != expected[g]:
            bad.append(f"{where}: {len(ids)} rows, the manifest says {expected[g]}")
        elif ids.shape[1] != seq_length:
            bad.append(f"{where}: input_ids of length {ids.shape[1]}, the manifest's seq_length is "
                       f"{seq_length}")
        elif not np.array_equal(row_ids, np.arange(first, first + len(ids))):
            bad.append(f"{where}: row_id not {first}..{first + len(ids) - 1} in order")
        elif len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
            bad.append(f"{where}: ids outside 0..{vocab_size - 1} (found {ids.min()}..{ids.max()})")
        first += expected[g]
    return groups, rows, bad
