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
    """Wraps BertForMaskedLM; forward returns (loss, correct, n_targets)."""

    def __init__(self, mlm):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        attention_mask = (input_ids != PAD).long()
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        where = labels != IGNORE
        picked = hidden[where]                       # [M, H]: only the targets
        head = self.mlm.cls.predictions
        logits = head.decoder(head.transform(picked)).float()   # [M, V]
        targets = labels[where]
        n = targets.numel()
        loss = F.cross_entropy(logits, targets, reduction="sum") / max(n, 1)
        correct = (logits.argmax(-1) == targets).sum()
        return loss, correct, n


def flops_per_token(cfg: ModelConfig, vocab_size: int, seq_length: int, mask_fraction: float) -> float:
    """Training FLOPs (forward + backward = 3× forward) per non-pad token.

    Per layer and token: QKV+output projections 8H², FFN 4HF, attention scores and
    values 4LH. The sparse head runs only for the masked fraction: 2H² + 2HV.
    """
    c = cfg.resolved()
    h, f, n_layers = c.hidden, c.ffn, c.layers
    encoder = n_layers * (8 * h * h + 4 * h * f + 4 * seq_length * h)
    head = mask_fraction * (2 * h * h + 2 * h * vocab_size)
    return 3.0 * (encoder + head)


def measure_matmul_flops(dtype=torch.float32, n: int = 1024, seconds: float = 0.5, device="cpu") -> float:
    """The machine's dense matmul rate (FLOP/s) for MFU on devices without a spec sheet."""
    import time
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# Dense bf16 peaks from vendor spec sheets, for MFU on GPUs.
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value if dtype != torch.float32 else value / 2
        return measure_matmul_flops(dtype, 4096, device=device)
    return measure_matmul_flops(torch.float32)
