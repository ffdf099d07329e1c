"""Dynamic masking statistics and seeding; the per-worker stream order."""
from __future__ import annotations

import numpy as np
import pytest

from wr_train.masking import IGNORE, mask_batch
from wr_train.tokenizer import CLS, MASK, NUM_SPECIAL, PAD, SEP

V = 8000


def fake_rows(n=400, L=128, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(NUM_SPECIAL, V, size=(n, L))
    ids[:, 0] = CLS
    ids[:, 60] = SEP
    ids[-5:, 100:] = PAD
    return ids, np.arange(1000, 1000 + n)


def test_statistics_80_10_10():
    ids, rows = fake_rows()
    out, labels = mask_batch(ids, rows, epoch=0, seed=1, vocab_size=V)
    target = labels != IGNORE
    candidates = ids >= NUM_SPECIAL
    frac = target.sum() / candidates.sum()
    assert 0.14 < frac < 0.16
    assert not target[~candidates].any()                        # never a special / pad position
    assert (labels[target] == ids[target]).all()                # labels are the originals
    assert (out[~target] == ids[~target]).all()                 # nothing else changes
    masked = (out[target] == MASK).mean()
    kept = (out[target] == ids[target]).mean()
    assert 0.77 < masked < 0.83 and 0.08 < kept < 0.12
    replaced = target & (out != MASK) & (out != ids)
    assert 0.07 < replaced.sum() / target.sum() < 0.12
    assert (out[replaced] >= NUM_SPECIAL).all()                 # random tokens are never special


def test_shares_of_mask_random_unchanged_are_configurable():
    ids, rows = fake_rows()
    out, labels = mask_batch(ids, rows, epoch=0, seed=1, vocab_size=V, mask_share=1.0, random_share=0.0)
    target = labels != IGNORE
    assert (out[target] == MASK).all() and (out[~target] == ids[~target]).all()
    out, labels = mask_batch(ids, rows, epoch=0, seed=1, vocab_size=V, mask_share=0.5, random_share=0.5)
    target = labels != IGNORE
    assert 0.45 < (out[target] == MASK).mean() < 0.55
    assert (out[target] == ids[target]).mean() < 0.01      # unchanged only by a random draw


def test_mask_config_refuses_shares_over_one():
    from wr_train.config import ConfigError, load_config
    cfg = load_config("demo-tiny", ["stages.0.shards=x", "mask.mask_share=0.95", "mask.random_share=0.1"])
    with pytest.raises(ConfigError, match="mask_share"):
        cfg.validate()


def test_mask_is_a_function_of_seed_epoch_row():
    ids, rows = fake_rows(50)
    a = mask_batch(ids, rows, epoch=3, seed=7, vocab_size=V)
    b = mask_batch(ids, rows, epoch=3, seed=7, vocab_size=V)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    # batch composition does not matter: row 10 alone gets the same mask
    c = mask_batch(ids[10:11], rows[10:11], epoch=3, seed=7, vocab_size=V)
    assert (c[1][0] == a[1][10]).all()
    # a new epoch (or seed) masks differently
    d = mask_batch(ids, rows, epoch=4, seed=7, vocab_size=V)
    e = mask_batch(ids, rows, epoch=3, seed=8, vocab_size=V)
    assert (d[1] != a[1]).any() and (e[1] != a[1]).any()


def test_every_row_with_text_gets_a_target():
    ids = np.full((3, 16), PAD)
    ids[:, 0] = CLS
    ids[:, 1] = 500       # one real token per row: 15% would often pick none
    ids[:, 2] = SEP
    _, labels = mask_batch(ids, np.arange(3), epoch=0, seed=0, vocab_size=V)
    assert ((labels != IGNORE).sum(1) == 1).all()


def test_span_masking_picks_contiguous_spans():
    ids, rows = fake_rows(100)
    _, labels = mask_batch(ids, rows, epoch=0, seed=0, vocab_size=V, span=True, span_p=0.2, span_max=10)
    target = labels != IGNORE
    frac = target.sum() / (ids >= NUM_SPECIAL).sum()
    assert 0.13 < frac < 0.17
    runs = []
    for row in target:
        edges = np.diff(np.concatenate([[0], row.astype(int), [0]]))
        runs += list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
    assert np.mean(runs) > 2.0                      # spans, not isolated tokens
    assert max(runs) <= 30


def stream_steps(shards, manifest, steps: int, world: int, start: int = 0, **kw):
    """The first `steps` global batches from batch `start` as `world` workers read them:
    [(epochs, row_ids, ids) of the whole global batch, workers' rows in rank order]."""
    from wr_train.stream import RowStream
    kw = {"seed": 1, "stage": 0, "global_batch": 48, "micro_batch": 8, **kw}
    gens = [RowStream(str(shards), manifest, rank=r, world=world, steps=start, **kw).batches()
            for r in range(world)]
    accum = [RowStream(str(shards), manifest, rank=r, world=world, **kw).accum for r in range(world)]
    out = []
    for _ in range(steps):
        parts = [next(g) for r, g in enumerate(gens) for _ in range(accum[r])]
        out.append(tuple(np.concatenate(p) for p in zip(*parts)))
    return out


def test_global_batches_do_not_depend_on_the_worker_count(shards128):
    """For W in 1, 2, 3, 4 every global step holds the same rows in the same order (the
    workers' shares side by side), each worker `accum` micro-batches of its share."""
    from wr_train.shards import load_manifest
    manifest = load_manifest(str(shards128))
    one = stream_steps(shards128, manifest, 40, 1)
    for world in (2, 3, 4):
        other = stream_steps(shards128, manifest, 40, world)
        for step, (a, b) in enumerate(zip(one, other)):
            assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0]), (world, step)
            assert np.array_equal(a[2], b[2])
    assert all(len(s[1]) == 48 for s in one)


def test_each_row_once_per_epoch_and_a_resume_continues_the_sequence(shards128):
    """Each partition gives every row of its row groups once before any twice; the
    stages' sequence is a pure function of the seed; a resume at any step (on any worker
    count) continues it exactly."""
    from wr_train.shards import load_manifest
    from wr_train.stream import RowStream
    manifest = load_manifest(str(shards128))
    total = manifest["rows"]
    st = RowStream(str(shards128), manifest, seed=1, stage=0, rank=0, world=1, global_batch=48,
                   micro_batch=8, partitions=4)
    assert len(st.partitions) == 4 and sum(p.epoch_rows for p in st.partitions) == total
    steps = stream_steps(shards128, manifest, 3 * total // 48, 1, partitions=4)
    taken = {k: [] for k in range(4)}
    for epochs, row_ids, _ in steps:  # global batch = 12 rows of each partition in turn
        for k in range(4):
            taken[k] += list(zip(epochs[12 * k:12 * k + 12].tolist(), row_ids[12 * k:12 * k + 12].tolist()))
    for k, part in enumerate(st.partitions):
        rows = [r for e, r in taken[k] if e == 0]
        assert len(rows) == part.epoch_rows == len(set(rows)), k     # once each in epoch 0
        assert {r for e, r in taken[k] if e == 1} <= set(rows)          # the same rows again
    firsts = [set(r for e, r in taken[k] if e == 0) for k in range(4)]
    assert sorted(set().union(*firsts)) == list(range(total))          # the partitions cover the corpus
    for start, world in ((7, 2), (1000 // 48, 3), (len(steps) - 5, 1)):
        resumed = stream_steps(shards128, manifest, 5, world, start=start, partitions=4)
        for a, b in zip(resumed, steps[start:start + 5]):
            assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    other_seed = stream_steps(shards128, manifest, 3, 1, partitions=4, seed=2)
    assert not np.array_equal(other_seed[0][1], steps[0][1])


def test_stream_mixes_many_row_groups_in_every_batch(shards128):
    """Each global batch draws from across the corpus (every partition, each mixing its
    share of `window` row groups), in an order that is a pure function of the seed; one
    partition and window=1 is the old one-group-at-a-time order, whose batches come from
    one or two neighbourhoods."""
    from wr_train.shards import BLOCK_ROWS, load_manifest
    manifest = load_manifest(str(shards128))
    assert manifest["rows"] >= 8 * BLOCK_ROWS  # enough groups for the claim to mean something

    def first_batches(window, partitions=16, seed=1, n=20):
        return [s[1] for s in stream_steps(shards128, manifest, n, 1, global_batch=32, window=window,
                                           partitions=partitions, seed=seed)]

    mixed = first_batches(16)
    groups = [len(set((ids // BLOCK_ROWS).tolist())) for ids in mixed]
    assert min(groups) >= 6, groups
    assert max(len(set((ids // BLOCK_ROWS).tolist())) for ids in first_batches(1, partitions=1)) <= 2
    again = first_batches(16)
    assert all(np.array_equal(a, b) for a, b in zip(mixed, again))          # same seed, same order
    assert not np.array_equal(np.concatenate(mixed), np.concatenate(first_batches(16, seed=2)))


def test_workers_read_only_their_partitions(shards128):
    """When the worker count divides the partitions, each row group is read by one worker."""
    from wr_train.shards import load_manifest
    from wr_train.stream import RowStream
    manifest = load_manifest(str(shards128))
    mine = []
    for r in range(4):
        st = RowStream(str(shards128), manifest, seed=1, stage=0, rank=r, world=4, global_batch=48,
                       micro_batch=8, partitions=8)
        mine.append({b for part, *_ in st._mine() for b in part.blocks})
    assert all(len(m) == 4 for m in mine) and len(set().union(*mine)) == 16


def test_fixed_eval_targets_never_change():
    """The held-out targets are those every recorded eval loss was measured on: pinned here
    (the positions the per-row generator drew before training masks moved to the hash)."""
    from wr_train.engine import EVAL_MASK_SEED
    from wr_train.masking import fixed_eval_labels
    rng = np.random.default_rng(0)
    ids = rng.integers(NUM_SPECIAL, 3000, size=(40, 64))
    ids[:, 0] = CLS
    ids[-3:, 50:] = PAD
    labels = fixed_eval_labels(ids, np.arange(500, 540), seed=EVAL_MASK_SEED, prob=0.15)
    where = np.flatnonzero((labels != IGNORE).ravel())
    assert (len(where), where[:12].tolist(), int(where.sum())) == (
        358, [1, 4, 9, 10, 25, 26, 35, 46, 52, 59, 63, 71], 459772)
    assert (labels.ravel()[where] == ids.ravel()[where]).all()
