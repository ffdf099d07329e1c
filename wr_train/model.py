"""BertForMaskedLM from a preset, with a sparse MLM loss.

The weights keep HF's BertForMaskedLM layout (export is a save), but the training
forward projects only the masked positions onto the vocabulary: with a 100k vocab the
full [B, L, V] projection would dominate the step (UER's "sparse" MLM head).
"""
from __future__ import annotations

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
    )


def build_mlm(cfg: ModelConfig, vocab_size: int, seed: int = 0):
    from transformers import BertForMaskedLM
    torch.manual_seed(seed)
    config = bert_config(cfg, vocab_size)
    config._attn_implementation = "sdpa"  # PyTorch SDPA attention kernels
    model = BertForMaskedLM(config)
    model.tie_weights()
    return model


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

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        bert = self.mlm.bert
        not_pad = input_ids != PAD
        # SDPA's boolean mask: True = attend. None when no row has padding (faster kernel).
        key_mask = None if bool(not_pad.all()) else not_pad[:, None, None, :]
        x = bert.embeddings(input_ids=input_ids)
        layers = bert.encoder.layer
        for layer in layers[:-1]:
            x = self._layer(layer, x, x, key_mask)
        where = labels != IGNORE
        rows, cols = where.nonzero(as_tuple=True)     # row-major: the order of labels[where]
        slot = (where.cumsum(1) - 1)[rows, cols]      # a target's place among its row's targets
        queries = x.new_zeros(x.shape[0], max(int(where.sum(1).max()), 1), x.shape[-1])
        queries = queries.index_put((rows, slot), x[rows, cols])
        picked = self._layer(layers[-1], queries, x, key_mask)[rows, slot]   # [M, H]
        head = self.mlm.cls.predictions
        logits = head.decoder(head.transform(picked)).float()   # [M, V]
        targets = labels[where]
        n = targets.numel()
        loss = F.cross_entropy(logits, targets, reduction="sum") / max(n, 1)
        correct = (logits.argmax(-1) == targets).sum()
        return loss, correct, n

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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4   # glibc mallopt() parameters


def keep_freed_memory(enable: bool = True) -> bool:
    """Make glibc keep freed memory for reuse instead of handing it back to the OS.

    By default every CPU tensor over 32 MB is a fresh mmap, and the kernel zero-fills
    each of its pages on first touch: with a 100k vocab the [masked, V] logits and their
    gradients pay that every step (measured: exp over 600×100k 172 -> 56 ms, zeros_like
    114 -> 12 ms). A training process keeps its peak memory anyway. Linux/glibc only;
    returns whether it applied. enable=False restores glibc's defaults.
    """
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0 if enable else 65536)
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1 if enable else 128 * 1024)
        return bool(ok)
    except (OSError, AttributeError):
        return False


def measure_matmul_flops(dtype=torch.float32, n: int = 1024, seconds: float = 0.25, repeats: int = 4,
                         device="cpu") -> float:
    """The machine's dense matmul rate (FLOP/s) for MFU on devices without a spec sheet:
    the best of a few short timings, so a moment of contention does not lower it."""
    import time
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    best = 0.0
    for _ in range(repeats):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


# Dense bf16 peaks from vendor spec sheets, for MFU on GPUs.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2
        return measure_matmul_flops(dtype, 4096, device=device)
    return measure_matmul_flops(torch.float32, 2048)
