"""BertForMaskedLM from a preset, with a sparse MLM loss.

The weights keep HF's BertForMaskedLM layout (export is a save), but the training
forward projects only the masked positions onto the vocabulary: with a 100k vocab the
full [B, L, V] projection would dominate the step (UER's "sparse" MLM head).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wr_train.config import ModelConfig
from wr_train.masking import IGNORE
from wr_train.tokenizer import PAD


def bert_config(cfg: ModelConfig, vocab_size: int):
    from transformers import BertConfig
    cfg = cfg.resolved()
    return BertConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, intermediate_size=cfg.ffn,
        max_position_embeddings=cfg.max_positions, hidden_act="gelu",
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        type_vocab_size=2, pad_token_id=PAD, tie_word_embeddings=True,
        initializer_range=cfg.init_std,
    )


def build_mlm(cfg: ModelConfig, vocab_size: int, seed: int = 0):
    from transformers import BertForMaskedLM
    torch.manual_seed(seed)
    cfg = cfg.resolved()
    config = bert_config(cfg, vocab_size)
    config._attn_implementation = "sdpa"  # PyTorch SDPA attention kernels
    model = BertForMaskedLM(config)
    model.tie_weights()
    if cfg.position_init == "sinusoidal":
        with torch.no_grad():
            table = model.bert.embeddings.position_embeddings.weight
            table.copy_(sinusoidal_positions(*table.shape) * cfg.init_std / math.sqrt(0.5))
    return model


def fresh_mlm(cfg: ModelConfig, vocab_size: int, seed: int, shards: str):
    """A model as pretraining starts one: build_mlm, then with model.output_bias=unigram the
    head's bias from the shards' token counts (the worker and the sweeps' plain loop)."""
    mlm = build_mlm(cfg, vocab_size, seed=seed)
    if cfg.output_bias == "unigram":
        from wr_train.shards import read_token_counts
        init_output_bias(mlm, read_token_counts(shards, vocab_size))
    return mlm


def init_output_bias(mlm, token_counts) -> None:
    """Start the MLM head's bias at the tokens' log frequencies (add-one smoothed): the
    model predicts the unigram floor from step 0 instead of spending its first few hundred
    steps, and its embeddings' capacity, learning frequencies (at lr 1e-3 an Adam-trained
    bias moves ~1e-3 a step, and rare pieces sit ~10 nats below the commonest). Measured on
    the demo at 2,400 steps: 0.06 nats lower held-out loss alone, 0.15-0.2 with the sin/cos
    position table (bench/RESULTS.md, "How the demo's model starts")."""
    c = np.asarray(token_counts, dtype=np.float64) + 1.0
    log_p = np.log(c / c.sum())
    bias = mlm.cls.predictions.bias
    with torch.no_grad():
        bias.copy_(torch.from_numpy(log_p - log_p.mean()).to(bias.dtype))


def sinusoidal_positions(n: int, dim: int) -> torch.Tensor:
    """The Transformer's position encoding [n, dim] (sin on even, cos on odd features, unit
    amplitude): each offset is a fixed rotation of it, so attention can find neighbours
    from the first step instead of learning a random table first."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(n, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, :dim // 2]
    return table.float()


QUERY_BUCKET = 8  # the last layer's query length is the most targets in a row, rounded up to this
TARGET_BUCKET = 32  # the head's rows: the micro-batch's target count, rounded up to this


@dataclass
class TargetLayout:
    """Where a micro-batch's masked targets sit, worked out on the host (the masking
    thread has the labels in numpy already), so the step never has to ask the device:
    coordinates, each target's slot among its row's targets, a bucketed query length and
    the counts. Arrays are numpy, or tensors after `to()`."""
    rows: object     # [M] row of each target (row-major order, as labels[labels != IGNORE])
    cols: object     # [M] its position in the row
    slot: object     # [M] its place among its row's targets: the last layer's query index
    targets: object  # [M'] the token ids to predict, then IGNORE up to M' (M rounded up to
    #                  TARGET_BUCKET): the head's matmuls see a few shapes, not a new one per
    #                  step (oneDNN's bf16 CPU kernels and CUDA graphs are made per shape)
    q_len: int       # queries per row in the last layer (>= the most targets in any row)
    n: int           # M
    tokens: int      # non-pad tokens of the micro-batch
    has_pad: bool    # any [PAD] (else attention runs without a mask: a faster kernel)

    @staticmethod
    def of(ids: np.ndarray, labels: np.ndarray) -> "TargetLayout":
        where = labels != IGNORE
        rows, cols = np.nonzero(where)
        slot = (np.cumsum(where, axis=1) - 1)[rows, cols]
        most = int(where.sum(axis=1).max()) if where.size else 0
        q_len = max(QUERY_BUCKET, -(-most // QUERY_BUCKET) * QUERY_BUCKET)
        targets = np.full(max(TARGET_BUCKET, -(-rows.size // TARGET_BUCKET) * TARGET_BUCKET), IGNORE,
                          dtype=np.int64)
        targets[:rows.size] = labels[rows, cols]
        return TargetLayout(rows, cols, slot, targets, q_len, int(rows.size),
                            int((ids != PAD).sum()), bool((ids == PAD).any()))

    def pinned(self) -> "TargetLayout":
        """Its arrays as tensors in pinned host memory (for non-blocking copies to a GPU)."""
        return dataclasses.replace(self, **{k: torch.from_numpy(np.ascontiguousarray(getattr(self, k)))
                                            .pin_memory() for k in ("rows", "cols", "slot", "targets")})

    def to(self, device) -> "TargetLayout":
        def move(a):
            t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            return t.to(device, non_blocking=True)
        return dataclasses.replace(self, **{k: move(getattr(self, k)) for k in ("rows", "cols", "slot", "targets")})


class SparseMLM(nn.Module):
    """Wraps BertForMaskedLM; forward returns (loss, correct, n_targets).

    Runs HF's own submodules (same weights, same math) with two savings, both exact:
    - the head projects only the masked positions onto the vocabulary;
    - the last layer computes queries, attention output and FFN only at the masked
      positions: nothing else of its output reaches the loss (keys and values still
      come from every position). At tiny this skips ~40% of the encoder's FLOPs.
    """

    def __init__(self, mlm):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                layout: TargetLayout | None = None):
        """(loss, correct, n): mean loss and correct count (device tensors) and the number
        of targets (an int). The training step passes the host-made `layout` (no device
        reads); given only `labels`, the layout is worked out from them here (reads them)."""
        if layout is None:
            layout = TargetLayout.of(input_ids.cpu().numpy(), labels.cpu().numpy()).to(input_ids.device)
        bert = self.mlm.bert
        # SDPA's boolean mask: True = attend. None when no row has padding (faster kernel).
        key_mask = (input_ids != PAD)[:, None, None, :] if layout.has_pad else None
        x = bert.embeddings(input_ids=input_ids)
        layers = bert.encoder.layer
        for layer in layers[:-1]:
            x = self._layer(layer, x, x, key_mask)
        rows, cols, slot = layout.rows, layout.cols, layout.slot
        queries = x.new_zeros(x.shape[0], layout.q_len, x.shape[-1])
        queries = queries.index_put((rows, slot), x[rows, cols])
        picked = self._layer(layers[-1], queries, x, key_mask)[rows, slot]   # [M, H]
        picked = F.pad(picked, (0, 0, 0, layout.targets.shape[0] - layout.n))  # [M', H]: zero rows
        head = self.mlm.cls.predictions
        logits = head.decoder(head.transform(picked)).float()   # [M', V]
        targets = layout.targets
        loss = F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE) / max(layout.n, 1)
        # correct: the target's logit is the largest (a tie counts; in float they do not
        # happen). A max is ~6x cheaper than an argmax over [M, V] on CPU (5.7 vs 37 ms at
        # 600 × 20k, one thread).
        hit = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) >= logits.amax(-1)
        correct = (hit & (targets != IGNORE)).sum()
        return loss, correct, layout.n

    def _layer(self, layer, x_q: torch.Tensor, x_kv: torch.Tensor, key_mask) -> torch.Tensor:
        """One BertLayer for the queries x_q [B, Q, H] over keys/values from x_kv [B, S, H]."""
        att = layer.attention.self
        b, q_len, s_len = x_q.shape[0], x_q.shape[1], x_kv.shape[1]
        heads, d = att.num_attention_heads, att.attention_head_size
        q = att.query(x_q).view(b, q_len, heads, d).transpose(1, 2)
        k = att.key(x_kv).view(b, s_len, heads, d).transpose(1, 2)
        v = att.value(x_kv).view(b, s_len, heads, d).transpose(1, 2)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask,
                                             dropout_p=att.dropout.p if att.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, q_len, heads * d)
        a = layer.attention.output(ctx, x_q)
        return layer.output(layer.intermediate(a), a)


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int, mask_fraction: float) -> float:
    """Training FLOPs (forward + backward = 3× forward) per non-pad token, as SparseMLM runs.

    Per layer and token: QKV+output projections 8H², FFN 4HF, attention scores and
    values 4LH. The last layer runs in full only for the masked fraction; at every
    other position it computes keys and values (4H²). The sparse head runs only for the
    masked fraction: 2H² + 2HV.
    """
    c = cfg.resolved()
    h, f, n_layers = c.hidden, c.ffn, c.layers
    layer = 8 * h * h + 4 * h * f + 4 * seq_length * h
    last = mask_fraction * (layer - 4 * h * h) + 4 * h * h
    head = mask_fraction * (2 * h * h + 2 * h * vocab_size)
    return 3.0 * ((n_layers - 1) * layer + last + head)
