"""Each worker's stream of masked micro-batches, in an order that does not depend on the
number of workers: the sequence of global batches is a pure function of (seed, stage) and
the recipe, so a run resumed on more or fewer workers trains on the same batches.

The unit of reading is a Parquet row group (a `Block` of ~1k neighbouring rows, written by
preprocess in corpus order). A stage's blocks are dealt once, by a seeded permutation, into
P `partitions` (the recipe's `partitions`, at most one per block). Each partition is read
epoch after epoch, each epoch in a new seeded order, `window` blocks at a time whose rows
are permuted together (mixing: measured, one block at a time learns markedly slower,
bench/RESULTS.md). Global batch k is the concatenation of the next G/P rows of every
partition (G = global_batch, spread as evenly as G allows); worker r of W takes rows
[r·G/W, (r+1)·G/W) of it and reads only the partitions that overlap them: when W divides
P each block is read by one worker per epoch, and memory holds each of its partitions'
window (about `shuffle_window` blocks over all partitions), whatever the corpus size.
The stream's state is the number of global batches taken. Masking of the next micro-batches
runs on a background thread while the model steps.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from wr_train.config import PretrainConfig, grad_accum, worker_rows
from wr_train.masking import mask_batch
from wr_train.model import TargetLayout
from wr_train.shards import open_shard, read_group


class MaskedBatch(NamedTuple):
    """One masked micro-batch: input_ids and labels [B, L] (int64 tensors, in pinned
    memory when asked), row_ids (numpy), and where the targets sit (made on the host)."""
    ids: object
    labels: object
    row_ids: np.ndarray
    layout: TargetLayout


@dataclass(frozen=True)
class Block:
    file: str
    group: int
    rows: int


def list_blocks(shards: str, manifest: dict) -> list[Block]:
    blocks = []
    for name in sorted(manifest["files"]):
        for g, n in enumerate(manifest["files"][name]["row_groups"]):
            blocks.append(Block(name, g, n))
    return blocks


DEFAULT_WINDOW = PretrainConfig.shuffle_window  # row groups mixed at a time, over all partitions
DEFAULT_PARTITIONS = PretrainConfig.partitions


def deal_partitions(blocks: list[Block], seed: int, stage: int, partitions: int) -> list[list[Block]]:
    """The stage's blocks dealt into min(partitions, blocks) fixed sets."""
    p = min(partitions, len(blocks))
    order = np.random.default_rng((seed, stage, 7)).permutation(len(blocks))
    return [[blocks[i] for i in order[k::p]] for k in range(p)]


def chunk_sizes(global_batch: int, partitions: int) -> list[int]:
    """Rows each partition gives to every global batch: G/P, the remainder to the first."""
    return [global_batch // partitions + (k < global_batch % partitions) for k in range(partitions)]


class Partition:
    """One partition's rows, epoch after epoch: each epoch its blocks in a seeded order,
    `window` at a time, the rows of a window permuted together."""

    def __init__(self, stream: "RowStream", index: int, blocks: list[Block], window: int):
        self.stream, self.index, self.blocks, self.window = stream, index, blocks, window
        self.epoch_rows = sum(b.rows for b in blocks)
        self._windows = None
        self._pending = (0, np.empty(0, dtype=np.int64), None)  # epoch, row_ids, ids not yet taken

    def windows(self, epoch: int) -> list[list[Block]]:
        s = self.stream
        order = np.random.default_rng((s.seed, s.stage, epoch, self.index, 7)).permutation(len(self.blocks))
        mine = [self.blocks[i] for i in order]
        return [mine[i:i + self.window] for i in range(0, len(mine), self.window)]

    def seek(self, consumed: int) -> None:
        """Continue after the first `consumed` rows of this partition."""
        self._windows = self._windows_from(consumed)
        self._pending = (0, np.empty(0, dtype=np.int64), None)

    def _windows_from(self, consumed: int):
        """Yields (epoch, row_ids, ids) of each window from row `consumed` on, mixed."""
        s = self.stream
        epoch, offset = divmod(consumed, self.epoch_rows)
        while True:
            for i, window in enumerate(self.windows(epoch)):
                rows = sum(b.rows for b in window)
                if offset >= rows:
                    offset -= rows
                    continue
                parts = [s.read_block(b) for b in window]
                row_ids = np.concatenate([p[0] for p in parts])
                ids = np.concatenate([p[1] for p in parts])
                order = np.random.default_rng(
                    (s.seed, s.stage, epoch, self.index, i)).permutation(len(row_ids))[offset:]
                yield epoch, row_ids[order], ids[order]
                offset = 0
            epoch += 1

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next `n` rows: (epoch of each row, row_ids, input_ids)."""
        pieces = []
        epoch, row_ids, ids = self._pending
        while n:
            if len(row_ids) == 0:
                epoch, row_ids, ids = next(self._windows)
                continue
            k = min(n, len(row_ids))
            pieces.append((np.full(k, epoch), row_ids[:k], ids[:k]))
            row_ids, ids, n = row_ids[k:], ids[k:], n - k
        self._pending = (epoch, row_ids, ids)
        return tuple(np.concatenate(part) for part in zip(*pieces))


class RowStream:
    """This worker's share of every global batch, as `accum` micro-batches per step;
    `steps` counts the global batches taken (the stream's state)."""

    def __init__(self, shards: str, manifest: dict, *, seed: int, stage: int, rank: int, world: int,
                 global_batch: int, micro_batch: int, partitions: int = DEFAULT_PARTITIONS,
                 window: int = DEFAULT_WINDOW, steps: int = 0):
        self.shards, self.seed, self.stage = shards, seed, stage
        self.rank, self.world = rank, world
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.accum = grad_accum(global_batch, micro_batch, world)
        self.lo, self.hi = worker_rows(global_batch, rank, world)
        dealt = deal_partitions(list_blocks(shards, manifest), seed, stage, partitions)
        self.chunks = chunk_sizes(global_batch, len(dealt))
        per_window = -(-window // len(dealt))  # the recipe's window spread over the partitions
        self.partitions = [Partition(self, k, blocks, per_window) for k, blocks in enumerate(dealt)]
        self.steps = steps
        self._files: dict = {}

    def state_dict(self) -> dict:
        """The place in the stage's order: global batches taken (the same on every rank)."""
        return {"batches": int(self.steps)}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["batches"])

    def read_block(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        shard = self._files.get(block.file)
        if shard is None:
            shard = self._files[block.file] = open_shard(self.shards, block.file)
        return read_group(shard, block.group)

    def _mine(self) -> list[tuple[Partition, int, int, int]]:
        """(partition, its chunk, the part of the chunk this worker keeps: start, stop)."""
        out, at = [], 0
        for part, n in zip(self.partitions, self.chunks):
            start, stop = max(self.lo, at) - at, min(self.hi, at + n) - at
            if start < stop:
                out.append((part, n, start, stop))
            at += n
        return out

    def step_rows(self):
        """Yields this worker's rows of each global batch from batch `steps` on:
        (epoch of each row, row_ids, input_ids)."""
        mine = self._mine()
        for part, n, _, _ in mine:
            part.seek(self.steps * n)
        while True:
            pieces = []
            for part, n, start, stop in mine:
                epochs, row_ids, ids = part.take(n)
                pieces.append((epochs[start:stop], row_ids[start:stop], ids[start:stop]))
            yield tuple(np.concatenate(part) for part in zip(*pieces))

    def batches(self):
        """Unmasked micro-batches, `accum` per global batch: (epochs, row_ids, input_ids),
        this worker's rows of the step cut into near-equal parts (all `micro_batch` rows
        when the worker count divides the global batch evenly)."""
        for epochs, row_ids, ids in self.step_rows():
            cuts = np.array_split(np.arange(len(row_ids)), self.accum)
            for c in cuts:
                yield epochs[c[0]:c[-1] + 1], row_ids[c[0]:c[-1] + 1], ids[c[0]:c[-1] + 1]


def masked_batches(stream: RowStream, *, seed: int, vocab_size: int, mask_cfg, prefetch: int = 4,
                   pin: bool = False):
    """MaskedBatch-es computed ahead on a thread: masks, the target layout the step
    needs (so it never reads the device), and with `pin` page-locked tensors that copy
    to a GPU without blocking.

    The mask of a row depends on the epoch in which the row is seen; rows of one
    micro-batch can straddle an epoch boundary, so each row uses its own epoch.
    """
    import torch
    q: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()
    masking = asdict(mask_cfg)  # MaskConfig's fields are mask_batch's keywords

    def work():
        try:
            for epochs, row_ids, ids in stream.batches():
                out_ids, labels = mask_batch(ids, row_ids, epoch=epochs, seed=seed, vocab_size=vocab_size,
                                             **masking)
                layout = TargetLayout.of(out_ids, labels)
                ids_t, labels_t = torch.from_numpy(out_ids), torch.from_numpy(labels)
                if pin:
                    ids_t, labels_t, layout = ids_t.pin_memory(), labels_t.pin_memory(), layout.pinned()
                batch = MaskedBatch(ids_t, labels_t, row_ids, layout)
                while not stop.is_set():
                    try:
                        q.put(batch, timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # surface reader errors in the training loop
            q.put(e)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    taken = 0
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            taken += 1
            if taken % stream.accum == 0:  # the step's last micro-batch: the state moves on
                stream.steps += 1
            yield item
    finally:
        stop.set()
