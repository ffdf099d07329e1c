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


def test_stream_splits_rows_between_workers_and_resumes_exactly(shards128):
    from wr_train.shards import load_manifest
    from wr_train.stream import RowStream, epoch_blocks, list_blocks
    manifest = load_manifest(str(shards128))
    total = manifest["rows"]
    streams = [RowStream(str(shards128), manifest, seed=1, stage=0, rank=r, world=2, micro_batch=8) for r in (0, 1)]
    epoch_rows = []
    for r, st in enumerate(streams):
        n = sum(b.rows for b in epoch_blocks(list_blocks(str(shards128), manifest), 1, 0, 0, r, 2))
        it = st.rows()
        epoch_rows.append([int(next(it)[1]) for _ in range(n)])
    seen = epoch_rows[0] + epoch_rows[1]
    assert sorted(seen) == list(range(total))       # one epoch: disjoint and complete
    # resume at row 1000 of worker 1 continues exactly where the full stream was
    resumed = RowStream(str(shards128), manifest, seed=1, stage=0, rank=1, world=2, micro_batch=8, consumed=1000)
    it = resumed.rows()
    assert [int(next(it)[1]) for _ in range(50)] == epoch_rows[1][1000:1050]
    # the next epoch is ordered differently
    it = streams[0].rows()
    first = [int(next(it)[1]) for _ in range(len(epoch_rows[0]) + 20)]
    assert first[-20:] != epoch_rows[0][:20]


def test_stream_batches_are_its_rows_in_order_across_windows_and_epochs(shards128):
    """batches() slices the mixed windows directly; it must hand out exactly rows()'s
    sequence, micro-batches spanning a window's or an epoch's end included, with each
    row's own epoch, and from a resume point too."""
    from wr_train.shards import load_manifest
    from wr_train.stream import RowStream
    manifest = load_manifest(str(shards128))
    n = manifest["rows"] * 2 + 37  # into the third epoch, through every window boundary

    def both(consumed):
        kw = dict(seed=5, stage=0, rank=0, world=1, micro_batch=24, window=2, consumed=consumed)
        it = RowStream(str(shards128), manifest, **kw).rows()
        rows = [next(it) for _ in range(n)]
        it = RowStream(str(shards128), manifest, **kw).batches()
        batches = [next(it) for _ in range(-(-n // 24))]
        epochs, row_ids, ids = (np.concatenate(part)[:n] for part in zip(*batches))
        return rows, epochs, row_ids, ids

    for consumed in (0, 1001):
        rows, epochs, row_ids, ids = both(consumed)
        assert epochs.tolist() == [r[0] for r in rows]
        assert row_ids.tolist() == [int(r[1]) for r in rows]
        assert np.array_equal(ids, np.stack([r[2] for r in rows]))
        assert set(epochs.tolist()) == {0, 1, 2}


def test_stream_mixes_many_row_groups_in_every_batch(shards128):
    """Each micro-batch draws from across the corpus (rows of up to `window` row groups
    mixed), in an order that is a pure function of the seed; window=1 is the old
    one-group-at-a-time order, whose batches come from one or two neighbourhoods."""
    from wr_train.shards import BLOCK_ROWS, load_manifest
    from wr_train.stream import RowStream
    manifest = load_manifest(str(shards128))
    assert manifest["rows"] >= 8 * BLOCK_ROWS  # enough groups for the claim to mean something

    def first_batches(window, seed=1, n=20):
        st = RowStream(str(shards128), manifest, seed=seed, stage=0, rank=0, world=1, micro_batch=32,
                       window=window)
        it = st.batches()
        return [next(it)[1] for _ in range(n)]

    mixed = first_batches(16)
    groups = [len(set((ids // BLOCK_ROWS).tolist())) for ids in mixed]
    assert min(groups) >= 6, groups
    assert max(len(set((ids // BLOCK_ROWS).tolist())) for ids in first_batches(1)) <= 2
    again = first_batches(16)
    assert all(np.array_equal(a, b) for a, b in zip(mixed, again))          # same seed, same order
    assert not np.array_equal(np.concatenate(mixed), np.concatenate(first_batches(16, seed=2)))


def test_stream_window_keeps_each_row_once_per_epoch_and_resumes(shards128):
    from wr_train.shards import load_manifest
    from wr_train.stream import RowStream
    manifest = load_manifest(str(shards128))
    total = manifest["rows"]
    seen = []
    for r in range(3):
        st = RowStream(str(shards128), manifest, seed=3, stage=1, rank=r, world=3, micro_batch=8, window=4)
        it = st.rows()
        mine = sum(b.rows for w in st._windows(0) for b in w)
        seen.append([int(next(it)[1]) for _ in range(mine)])
    assert sorted(sum(seen, [])) == list(range(total))
    half = len(seen[2]) // 2
    resumed = RowStream(str(shards128), manifest, seed=3, stage=1, rank=2, world=3, micro_batch=8,
                        window=4, consumed=half)
    it = resumed.rows()
    assert [int(next(it)[1]) for _ in range(40)] == seen[2][half:half + 40]


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
