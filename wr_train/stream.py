"""Each worker's stream of masked micro-batches: an order that is a pure function of
(seed, stage, epoch, rank, world size), so a resumed run skips exactly what it saw.

The unit of reading is a Parquet row group (`BLOCK_ROWS` rows, written by preprocess in
corpus order, so one block is ~1k neighbouring rows of one source). Per epoch: the blocks
of all shard files are permuted with a seeded generator, worker r takes blocks r, r+W,
r+2W, ..., and mixes them `window` blocks at a time: the rows of a window's blocks are
permuted together, so every micro-batch draws from up to `window` places spread over the
whole corpus (measured: one block at a time learns markedly slower, bench/RESULTS.md).
Memory holds one window (window × BLOCK_ROWS rows), whatever the corpus size; masking of
the next micro-batches runs on a background thread while the model steps.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np

from wr_train.config import PretrainConfig
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


def epoch_blocks(blocks: list[Block], seed: int, stage: int, epoch: int, rank: int, world: int) -> list[Block]:
    order = np.random.default_rng((seed, stage, epoch, 7)).permutation(len(blocks))
    return [blocks[i] for i in order[rank::world]]


DEFAULT_WINDOW = PretrainConfig.shuffle_window  # row groups mixed at a time per worker


def epoch_windows(blocks: list[Block], seed: int, stage: int, epoch: int, rank: int, world: int,
                  window: int) -> list[list[Block]]:
    """This worker's blocks of an epoch, in groups of `window` whose rows are mixed."""
    mine = epoch_blocks(blocks, seed, stage, epoch, rank, world)
    return [mine[i:i + window] for i in range(0, len(mine), window)]


class RowStream:
    """Yields (row_ids, input_ids) micro-batches forever; `consumed` counts rows taken."""

    def __init__(self, shards: str, manifest: dict, *, seed: int, stage: int, rank: int,
                 world: int, micro_batch: int, consumed: int = 0, window: int = DEFAULT_WINDOW):
        self.shards, self.seed, self.stage = shards, seed, stage
        self.rank, self.world, self.micro_batch, self.window = rank, world, micro_batch, window
        self.blocks = list_blocks(shards, manifest)
        if len(self.blocks) < world:
            raise ValueError(f"{shards}: {len(self.blocks)} row group(s) cannot feed {world} workers; "
                             f"use fewer workers or a bigger corpus")
        self.consumed = consumed
        self._files: dict = {}

    def state_dict(self) -> dict:
        """This worker's place in its order: rows taken so far in the stage."""
        return {"rows": int(self.consumed)}

    def load_state_dict(self, state: dict) -> None:
        self.consumed = int(state["rows"])

    def _read_block(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        shard = self._files.get(block.file)
        if shard is None:
            shard = self._files[block.file] = open_shard(self.shards, block.file)
        return read_group(shard, block.group)

    def _windows(self, epoch: int) -> list[list[Block]]:
        return epoch_windows(self.blocks, self.seed, self.stage, epoch, self.rank, self.world, self.window)

    def _positions(self):
        """(epoch, window index, row offset) of row number `self.consumed` of this worker."""
        epoch, left = 0, self.consumed
        while True:
            windows = self._windows(epoch)
            total = sum(b.rows for w in windows for b in w)
            if left < total:
                for i, w in enumerate(windows):
                    rows = sum(b.rows for b in w)
                    if left < rows:
                        return epoch, i, left
                    left -= rows
            left -= total
            epoch += 1

    def _windows_from_position(self):
        """Yields (epoch, row_ids, input_ids) of each window from row `self.consumed` of
        this worker on, the window's rows in their mixed order."""
        epoch, start, offset = self._positions()
        while True:
            windows = self._windows(epoch)
            for i in range(start, len(windows)):
                parts = [self._read_block(b) for b in windows[i]]
                row_ids = np.concatenate([p[0] for p in parts])
                ids = np.concatenate([p[1] for p in parts])
                order = np.random.default_rng(
                    (self.seed, self.stage, epoch, self.rank, self.world, i)).permutation(len(row_ids))[offset:]
                yield epoch, row_ids[order], ids[order]
                offset = 0
            start, epoch = 0, epoch + 1

    def rows(self):
        """Yields (epoch, row_id, input_ids) one row at a time in this worker's order."""
        for epoch, row_ids, ids in self._windows_from_position():
            for j in range(len(row_ids)):
                yield epoch, row_ids[j], ids[j]

    def batches(self):
        """Unmasked micro-batches in this worker's order: (epoch of each row, row_ids,
        input_ids), sliced from the mixed windows (a micro-batch can span two)."""
        windows = self._windows_from_position()
        epoch, row_ids, ids, at = 0, np.empty(0, dtype=np.int64), None, 0
        while True:
            pieces, need = [], self.micro_batch
            while need:
                if at == len(row_ids):
                    (epoch, row_ids, ids), at = next(windows), 0
                    continue
                take = min(need, len(row_ids) - at)
                pieces.append((np.full(take, epoch), row_ids[at:at + take], ids[at:at + take]))
                at, need = at + take, need - take
            yield tuple(np.concatenate(part) for part in zip(*pieces))


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
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            stream.consumed += len(item.row_ids)
            yield item
    finally:
        stop.set()
