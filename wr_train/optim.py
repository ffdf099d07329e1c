"""The optimizer's parameter groups and the learning-rate schedules, for pretraining and
fine-tuning alike. The schedules are transformers' own, with one warmup convention (HF's:
lr 0 at step 0, the peak after the warmup steps): linear decay to 0 from the end of warmup
(`get_linear_schedule_with_warmup`, BERT's), or warmup, constant, then linear decay over
the last part of the steps (`get_wsd_schedule`).
"""
from __future__ import annotations

from wr_train.config import StageConfig


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model, lr: float, weight_decay: float):
    """Fused torch AdamW over `param_groups` (fine-tuning; pretraining's comes from DeepSpeed
    with the same groups)."""
    import torch
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=True)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int, decay_start: int | None = None):
    """Linear warmup over `warmup_steps`, then linear decay to 0 at `total_steps`: from the end
    of warmup on (decay_start None, HF's get_linear_schedule_with_warmup), or constant until
    `decay_start` (HF's get_wsd_schedule)."""
    from transformers import get_linear_schedule_with_warmup, get_wsd_schedule
    if decay_start is None or decay_start <= warmup_steps:
        return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)
    return get_wsd_schedule(optimizer, num_warmup_steps=warmup_steps, num_stable_steps=decay_start - warmup_steps,
                            num_decay_steps=total_steps - decay_start, warmup_type="linear", decay_type="linear",
                            min_lr_ratio=0.0)


def schedule_points(stage: StageConfig) -> tuple[int, int, int]:
    """(end of warmup, start of decay, end) in a pretraining stage's steps: `warmup` and
    `decay` are fractions of them (decay 1: from the end of warmup on)."""
    total = stage.steps
    warm = max(1, int(stage.warmup * total))
    start = warm if stage.decay >= 1 else max(warm, total - max(1, int(stage.decay * total)))
    return warm, start, total


def stage_schedule(optimizer, stage: StageConfig):
    """A pretraining stage's schedule (decay=1 is HF's linear schedule step for step)."""
    warm, start, total = schedule_points(stage)
    return linear_schedule(optimizer, warm, total, decay_start=start)


def schedule_shape(stage: StageConfig) -> str:
    """A pretraining stage's schedule in words, for the console."""
    warm, start, total = schedule_points(stage)
    flat = f", constant to step {start:,}" if start > warm else ""
    return f"lr {stage.lr:g} warms up over {warm:,} steps{flat}, decays linearly to 0 at step {total:,}"
