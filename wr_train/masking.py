"""Dynamic MLM masking, a pure function of (seed, epoch, row_id).

Each row gets its own generator seeded by (seed, epoch, row_id), so a row's mask does
not depend on batch composition, worker count or resume point, and changes every epoch.
BERT's recipe: `prob` of the non-special tokens become targets; of those 80% -> [MASK],
10% -> a random non-special token, 10% unchanged (`mask_share`, `random_share`).
Optional geometric span masking (UER's `span_masking`): whole spans of length
~ Geometric(span_p), capped at span_max, are chosen until the budget is met.
"""
from __future__ import annotations

import numpy as np

from wr_train.tokenizer import MASK, NUM_SPECIAL

IGNORE = -100  # label of positions that are not predicted


def row_rng(seed: int, epoch: int, row_id: int) -> np.random.Generator:
    return np.random.default_rng((seed, epoch, int(row_id)))


def _choose_tokens(rng, candidates: np.ndarray, prob: float) -> np.ndarray:
    chosen = rng.random(len(candidates)) < prob
    if not chosen.any():  # every row with text trains on at least one target
        chosen[rng.integers(len(candidates))] = True
    return candidates[chosen]


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


def mask_batch(input_ids: np.ndarray, row_ids: np.ndarray, *, epoch: int, seed: int,
               vocab_size: int, prob: float = 0.15, span: bool = False,
               span_p: float = 0.2, span_max: int = 10, mask_share: float = 0.8,
               random_share: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(masked input_ids, labels) for a batch [B, L]; labels are IGNORE off-target."""
    ids = np.array(input_ids, dtype=np.int64, copy=True)
    labels = np.full_like(ids, IGNORE)
    for b in range(ids.shape[0]):
        row = ids[b]
        candidates = np.flatnonzero(row >= NUM_SPECIAL)
        if len(candidates) == 0:
            continue
        rng = row_rng(seed, epoch, row_ids[b])
        targets = (_choose_spans(rng, candidates, prob, span_p, span_max) if span
                   else _choose_tokens(rng, candidates, prob))
        labels[b, targets] = row[targets]
        action = rng.random(len(targets))
        row[targets[action < mask_share]] = MASK
        swap = targets[(action >= mask_share) & (action < mask_share + random_share)]
        row[swap] = rng.integers(NUM_SPECIAL, vocab_size, size=len(swap))
    return ids, labels
