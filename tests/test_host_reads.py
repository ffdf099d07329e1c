"""The training step never waits for the device: a TorchFunctionMode records every call
that makes the host read a tensor back (item, tolist, bool/int/float of a tensor, nonzero,
boolean-mask indexing, .cpu()/.numpy()), and any such call made from wr-train's code while
`train_step` runs fails the test. (On a GPU each one stalls the queue; on this CPU the
same calls are visible, which is what the guard checks.) The loop reads once per report."""
from __future__ import annotations

import os
import traceback

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from wr_train.config import MaskConfig, ModelConfig, PretrainConfig, StageConfig
from wr_train.engine import build_engine, train_step
from wr_train.masking import mask_batch
from wr_train.model import SparseMLM, TargetLayout, build_mlm
from wr_train.stream import MaskedBatch

READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy",
         "cpu", "masked_select", "unique", "argwhere", "equal", "allclose"}
INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}
HERE = os.path.abspath(__file__)


def _bool_index(args) -> bool:
    idx = args[1] if len(args) > 1 else None
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _caller() -> str:
    """The innermost frame outside torch and this file: who asked for the read."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = os.path.abspath(frame.filename)
        if path != HERE and f"{os.sep}torch{os.sep}" not in path:
            return f"{path}:{frame.lineno} ({frame.name})"
    return "?"


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS or (name in INDEXING and _bool_index(args)):
            self.calls.append((name, _caller()))
        return func(*args, **(kwargs or {}))

    def ours(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if f"{os.sep}wr_train{os.sep}" in c[1]]


def micro_batches(n: int, vocab: int, micro: int = 4, seq: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        rows = rng.integers(15, vocab, size=(micro, seq))
        rows[:, 0] = 2
        rows[-1, seq // 2:] = 0  # one padded row: the step takes the masked-attention path
        ids, labels = mask_batch(rows, np.arange(i * micro, (i + 1) * micro), epoch=0, seed=seed,
                                 vocab_size=vocab, prob=0.15)
        yield MaskedBatch(torch.from_numpy(ids), torch.from_numpy(labels), np.arange(micro),
                          TargetLayout.of(ids, labels))


def test_train_step_reads_nothing_back_from_the_device(one_process_group):
    vocab = 500
    model = ModelConfig(size="custom", layers=2, hidden=32, heads=2, ffn=64, max_positions=64, dropout=0.1)
    stage = StageConfig(name="s", shards="unused", steps=3, global_batch=8, micro_batch=4, lr=1e-3)
    cfg = PretrainConfig(workers=1, model=model, stages=[stage], mask=MaskConfig()).validate()
    engine = build_engine(cfg, stage, 1, build_mlm(cfg.model, vocab, seed=0))
    assert engine.gradient_accumulation_steps() == 2  # accumulation inside the guarded step too
    batches = micro_batches(6, vocab)
    guard = HostReads()
    totals = torch.zeros(2, dtype=torch.float64)
    targets = 0
    with guard:
        for _ in range(3):
            sums, n, _ = train_step(engine, batches, torch.device("cpu"))
            totals += sums
            targets += n
    assert not guard.ours(), f"train_step read the device back: {guard.ours()}"
    assert targets > 0 and 0 < float(totals[0]) / targets < 20  # it computed real losses


def test_the_guard_sees_a_read():
    """Without the host-made layout SparseMLM reads the labels back: the guard must see it."""
    vocab = 200
    mlm = build_mlm(ModelConfig(size="custom", layers=1, hidden=16, heads=2, ffn=32, max_positions=64),
                    vocab, seed=0)
    batch = next(micro_batches(1, vocab))
    guard = HostReads()
    with guard:
        SparseMLM(mlm)(batch.ids, batch.labels)
    assert any(name in ("cpu", "numpy") for name, _ in guard.ours())
    guard = HostReads()
    with guard:
        SparseMLM(mlm)(batch.ids, None, batch.layout.to("cpu"))
    assert not guard.ours()
