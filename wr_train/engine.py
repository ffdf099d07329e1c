"""The DeepSpeed engine a worker trains, and what runs on it.

`build_engine`: `deepspeed.initialize` on the sparse-head model with the recipe's DeepSpeed
config (wr_train.ds_config), AdamW parameter groups and schedule (wr_train.optim).
`train_step`: one optimizer step over the micro-batches of gradient accumulation; loss and
correct predictions stay summed on the device, so a step never waits for it.
`eval_set` / `evaluate` / `eval_line`: the fixed held-out targets, their loss and accuracy
on the engine, and the one line that reads them against the unigram floor.
"""
from __future__ import annotations

from wr_train.config import PretrainConfig, StageConfig
from wr_train.ds_config import build_ds_config
from wr_train.optim import param_groups, stage_schedule

EVAL_MASK_SEED = 20_251_201  # one seed for every run: evaluations of all runs share targets
EVAL_MASK_PROB = 0.15        # BERT's token masking, whatever a recipe trains with: comparable runs


def build_engine(cfg: PretrainConfig, stage: StageConfig, world: int, mlm):
    """deepspeed.initialize on the sparse-head model with the recipe's DeepSpeed config and
    its schedule (optim.stage_schedule)."""
    import deepspeed

    from wr_train.model import SparseMLM
    engine, _, _, _ = deepspeed.initialize(
        model=SparseMLM(mlm), model_parameters=param_groups(mlm, cfg.optim.weight_decay),
        config=build_ds_config(cfg, stage, world), lr_scheduler=lambda opt: stage_schedule(opt, stage))
    return engine


def train_step(engine, batches, device) -> tuple:
    """One optimizer step over `gradient_accumulation_steps` MaskedBatch-es from `batches`.

    The gradient is the mean over every target of the global batch: each micro-batch's
    summed loss divided by the step's target count over all workers (one all-reduce of a
    number, on the device), scaled by workers × accumulation, which DeepSpeed divides
    back out. So it does not depend on how the global batch is cut into micro-batches
    and workers (a mean per micro-batch would weigh a target by its micro-batch's size),
    and a run resumed on another worker count takes the same steps.

    Returns (sums, targets, tokens): loss × targets and correct predictions summed on the
    device, and the target and non-pad token counts, which the host knew already (the
    masking thread's TargetLayout). Nothing is read back from the device: the loop reads
    the sums once per report (tests/test_host_reads.py holds it to that)."""
    import torch
    import torch.distributed as dist
    accum = engine.gradient_accumulation_steps()
    step = [next(batches) for _ in range(accum)]
    local = sum(b.layout.n for b in step)
    total = torch.tensor([float(local)], dtype=torch.float32, device=device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(total)
    scale = (world * accum) / total.clamp(min=1.0)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    tokens = 0
    for batch in step:
        layout = batch.layout.to(device)
        loss, correct, n = engine(batch.ids.to(device, non_blocking=True), None, layout)
        engine.backward(loss * (n * scale).to(loss.dtype))
        engine.step()
        sums += torch.stack([loss.detach().double() * n, correct.double()])
        tokens += layout.tokens
    return sums, local, tokens


def eval_set(cfg: PretrainConfig, shards: str, manifest: dict, rank: int, world: int):
    """This rank's share of the held-out rows, masked once with the fixed eval seed and
    BERT's 15%, every target replaced by [MASK]: (input_ids, labels), the same targets at
    every evaluation of every run (whatever masking the recipe trains with). Every rank gets
    the same number of rows (ZeRO-3 needs the same forward calls on every rank)."""
    import numpy as np

    from wr_train.masking import IGNORE, fixed_eval_labels
    from wr_train.shards import read_eval_rows
    from wr_train.tokenizer import MASK
    row_ids, rows = read_eval_rows(shards, manifest, cfg.eval_rows)
    n = len(rows) // world * world
    if n == 0:
        return None
    row_ids, rows = row_ids[:n][rank::world], rows[:n][rank::world]
    labels = fixed_eval_labels(rows, row_ids, seed=EVAL_MASK_SEED, prob=EVAL_MASK_PROB)
    ids = np.array(rows, dtype=np.int64, copy=True)
    # Every target shown as [MASK], as fill-mask sees it: then a model that ignores the
    # context cannot beat the unigram floor. Under BERT's 80/10/10 the 10% unchanged
    # targets let a context-blind model copy its input and score ~0.6 nats below the
    # floor (measured on the demo model: 1.8 nats on those, 8.0 on [MASK] vs floor 7.97).
    ids[labels != IGNORE] = MASK
    return ids, labels


def evaluate(engine, data, micro_batch: int, device):
    """(loss × targets, correct, targets) over this rank's eval rows, dropout off."""
    import torch

    from wr_train.model import TargetLayout
    ids, labels = data
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    targets = 0
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(ids), micro_batch):
            layout = TargetLayout.of(ids[i:i + micro_batch], labels[i:i + micro_batch]).to(device)
            loss, correct, n = engine(torch.from_numpy(ids[i:i + micro_batch]).to(device), None, layout)
            sums += torch.stack([loss.double() * n, correct.double()])
            targets += n
    engine.train()
    return torch.cat([sums, torch.tensor([float(targets)], dtype=torch.float64, device=device)])


def eval_line(metrics: dict) -> str:
    """`eval loss 7.12 (unigram floor 7.99) acc 14.0% (floor 7.2%)`"""
    floor = metrics.get("unigram_floor")
    text = f"eval loss {metrics['eval_loss']:.3f}"
    text += f" (unigram floor {floor:.3f})" if floor is not None else ""
    text += f" acc {metrics['eval_acc']:.1%}"
    text += f" (floor {metrics['unigram_acc']:.1%})" if floor is not None else ""
    return text
