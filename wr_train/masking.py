"""Dynamic MLM masking, a pure function of (seed, epoch, row_id, position).

Every draw comes from a counter-based hash of (seed, epoch, row_id) and the position in
the row, so a row's mask does not depend on batch composition, worker count or resume
point, and changes every epoch; and a whole micro-batch is masked with a few array
operations instead of a random generator per row: 0.10 ms instead of 0.76 ms per 32 × 128
micro-batch. On a GPU a tiny model's step takes a few milliseconds: one masking thread
must keep up with it, and each stretch it holds the GIL delays the training thread's
kernel launches (bench/RESULTS.md, "The masking thread").

BERT's recipe: `prob` of the non-special tokens become targets; of those 80% -> [MASK],
10% -> a random non-special token, 10% unchanged (`mask_share`, `random_share`).
Optional geometric span masking (UER's `span_masking`): whole spans of length
~ Geometric(span_p), capped at span_max, are chosen until the budget is met (spans are
drawn one after another, by a numpy Generator per row seeded with (seed, epoch, row_id)).
"""
from __future__ import annotations

import numpy as np

from wr_train.tokenizer import MASK, NUM_SPECIAL

IGNORE = -100  # label of positions that are not predicted

_U64 = np.uint64
_FRACTION = 1.0 / (1 << 21)  # a draw in [0, 1) from 21 bits of a hash


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array: every input bit moves every output bit
    (uint64 arithmetic wraps, as the hash needs)."""
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _row_keys(seed: int, epoch, row_ids: np.ndarray) -> np.ndarray:
    """One 64-bit key per row from (seed, epoch, row_id); `epoch` an int or one per row."""
    n = len(row_ids)
    key = _mix(np.full(n, seed & 0xFFFFFFFFFFFFFFFF, dtype=_U64))
    key = _mix(key ^ np.broadcast_to(np.asarray(epoch, dtype=np.int64), (n,)).astype(_U64))
    return _mix(key ^ np.asarray(row_ids, dtype=np.int64).astype(_U64))


def _choose_spans(rng, candidates: np.ndarray, prob: float, span_p: float, span_max: int) -> np.ndarray:
    budget = max(1, int(round(len(candidates) * prob)))
    picked: set[int] = set()
    for _ in range(4 * budget):  # bounded: spans may overlap picked ones
        if len(picked) >= budget:
            break
        length = min(int(rng.geometric(span_p)), span_max, budget - len(picked))
        start = int(rng.integers(len(candidates)))
        picked.update(candidates[start:start + length].tolist())
    return np.fromiter(sorted(picked), dtype=np.int64)


def _per_row_targets(ids: np.ndarray, row_ids, epochs, seed: int, choose) -> np.ndarray:
    """Targets [B, L] drawn row by row by a numpy Generator seeded (seed, epoch, row_id):
    `choose(rng, candidates)` picks among the row's non-special positions."""
    target = np.zeros(ids.shape, dtype=bool)
    for b in range(ids.shape[0]):
        candidates = np.flatnonzero(ids[b] >= NUM_SPECIAL)
        if len(candidates):
            rng = np.random.default_rng((seed, int(epochs[b]), int(row_ids[b])))
            target[b, choose(rng, candidates)] = True
    return target


def _choose_tokens(rng, candidates: np.ndarray, prob: float) -> np.ndarray:
    chosen = rng.random(len(candidates)) < prob
    if not chosen.any():  # every row with text is scored on at least one target
        chosen[rng.integers(len(candidates))] = True
    return candidates[chosen]


def mask_batch(input_ids: np.ndarray, row_ids: np.ndarray, *, epoch, seed: int,
               vocab_size: int, prob: float = 0.15, span: bool = False,
               span_p: float = 0.2, span_max: int = 10, mask_share: float = 0.8,
               random_share: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(masked input_ids, labels) for a batch [B, L]; labels are IGNORE off-target.
    `epoch`: an int, or one per row (a micro-batch can straddle an epoch boundary)."""
    ids = np.array(input_ids, dtype=np.int64, copy=True)
    labels = np.full_like(ids, IGNORE)
    if ids.size == 0:
        return ids, labels
    batch, length = ids.shape
    keys = _row_keys(seed, epoch, row_ids)
    # One hash per position; its bits are three independent draws: 21 bits choose the
    # targets, 21 bits each target's action, the rest (mixed once more) the random token.
    h = _mix(keys[:, None] ^ (np.arange(1, length + 1, dtype=_U64) * _U64(0x9E3779B97F4A7C15))[None, :])
    candidates = ids >= NUM_SPECIAL
    if span:
        target = _per_row_targets(ids, row_ids, np.broadcast_to(np.asarray(epoch), (batch,)), seed,
                                  lambda rng, c: _choose_spans(rng, c, prob, span_p, span_max))
    else:
        draw = (h & _U64(0x1FFFFF)).astype(np.float64) * _FRACTION
        target = candidates & (draw < prob)
        # every row with text trains on at least one target: its lowest draw
        empty = np.flatnonzero(~target.any(axis=1) & candidates.any(axis=1))
        if len(empty):
            lowest = np.where(candidates[empty], draw[empty], 2.0).argmin(axis=1)
            target[empty, lowest] = True
    rows, cols = np.nonzero(target)
    labels[rows, cols] = ids[rows, cols]
    hit = h[rows, cols]
    action = ((hit >> _U64(21)) & _U64(0x1FFFFF)).astype(np.float64) * _FRACTION
    shown = action < mask_share
    ids[rows[shown], cols[shown]] = MASK
    swap = (action >= mask_share) & (action < mask_share + random_share)
    tokens = _mix(hit[swap] >> _U64(42)) % _U64(vocab_size - NUM_SPECIAL)
    ids[rows[swap], cols[swap]] = NUM_SPECIAL + tokens.astype(np.int64)
    return ids, labels


def fixed_eval_labels(input_ids: np.ndarray, row_ids: np.ndarray, *, seed: int, prob: float) -> np.ndarray:
    """The held-out evaluation's targets (labels, IGNORE elsewhere): `prob` of each row's
    non-special tokens, at least one, drawn by a numpy Generator seeded (seed, 0, row_id)
    per row. This is how training masks were drawn before the hash above; the evaluation
    keeps it so that every recorded eval loss stays comparable (re-drawn targets alone
    move the demo model's eval loss by 0.03 nats). It runs once per run."""
    target = _per_row_targets(input_ids, row_ids, np.zeros(len(row_ids), dtype=np.int64), seed,
                              lambda rng, c: _choose_tokens(rng, c, prob))
    return np.where(target, input_ids, IGNORE).astype(np.int64)
