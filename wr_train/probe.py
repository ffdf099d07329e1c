"""A downstream probe of one checkpoint: its weights briefly fine-tuned on a capped task.

`probe_checkpoint(ckpt, task, cfg)` is the one job: open the complete checkpoint (every
hash checked), write its weights as a HuggingFace directory (export's `write_hf_weights`),
fine-tune that on the task once per learning rate of the probe's small grid
(wr_train.finetune), and return the best dev accuracy as `probe_acc` beside the task's
majority share as `probe_floor` (finetune's `majority_dev`: always answering the train
subset's commonest label). `capped_task` is the task as every probe of a run sees it;
`probe_hf` probes a model that has no checkpoint (bench/reproduce.py: scratch as step 0).

Pretraining runs it beside training: rank 0 launches it as a Ray task on each checkpoint
once Ray has persisted it, and merges the result into that checkpoint's metrics row when it
lands (wr_train.pretrain). Not through Ray Train's own per-checkpoint validation
(`ray.train.report(..., validation=...)` with a trainer `ValidationConfig`, alpha in Ray
2.60), because there
- the results land in Ray's checkpoint manager (the driver's `Result`, or a worker's
  `get_all_reported_checkpoints`), not in rank 0's history that metrics.jsonl, TensorBoard,
  the trackers and the model card are written from; the last checkpoint's only after the
  workers have stopped, so a second writer of those files would be needed on the driver;
- every checkpoint's validation is queued, one running at a time, so slow probes fall
  behind onto checkpoints that wr-train's rotation has deleted; here only the newest waits;
- the validation task's lines never reach the console (it shows the training workers' only).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

from wr_train.checkpoint import open_checkpoint
from wr_train.config import ProbeConfig
from wr_train.export import write_hf_weights
from wr_train.finetune import FinetuneConfig, finetune, subset
from wr_train.tasks import Task, load_task, majority_share


def capped_task(cfg: ProbeConfig) -> Task:
    """The probe's task as every probe of a run sees it: a fixed random subset of
    `train_examples` train rows (finetune's subset: the same at every checkpoint), the first
    `eval_examples` dev rows, no test. Read once by the driver and handed to the probes, so
    no node needs a copy of the task's files. TaskError on bad task data."""
    task = load_task(cfg.task, cfg.data)
    return dataclasses.replace(task, train=subset(task.train, cfg.train_examples),
                               dev=task.dev[:cfg.eval_examples], test=[])


def task_floor(task: Task) -> float:
    """The capped task's majority share: the accuracy a probe must beat."""
    return majority_share([ex.label for ex in task.train], [ex.label for ex in task.dev])


def probe_checkpoint(ckpt: str, task: Task, cfg: ProbeConfig) -> dict:
    """Fine-tune complete checkpoint `ckpt`'s weights on `task` (capped already), once per
    lr of `cfg.lrs`. Returns {step, probe_task, probe_acc (the best dev accuracy),
    probe_floor (the majority share), probe_lr (the best lr), probe_train_examples, probe_s}."""
    if not cfg.gpus:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # reading ZeRO files imports DeepSpeed
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="wr-probe-") as hf_dir:
        with open_checkpoint(ckpt, log=lambda *_: None) as opened:
            write_hf_weights(opened, Path(hf_dir))
            step = opened.state["step"]
        scores = probe_hf(hf_dir, task, cfg)
    return {"step": step, **scores, "probe_s": round(time.time() - start, 1)}


def probe_hf(hf_dir: str, task: Task, cfg: ProbeConfig) -> dict:
    """The probe of a HuggingFace model directory (a checkpoint's weights, or a model that
    has no checkpoint, e.g. random weights): {probe_task, probe_acc, probe_floor, probe_lr,
    probe_train_examples}, as `probe_checkpoint` returns them."""
    runs = [finetune(hf_dir, task, finetune_config(cfg, lr)) for lr in cfg.learning_rates()]
    best = max(runs, key=lambda run: run["dev_acc"])  # ties: the first lr
    return {"probe_task": task.name, "probe_acc": best["dev_acc"], "probe_floor": best["majority_dev"],
            "probe_lr": best["config"]["lr"], "probe_train_examples": best["train_examples"]}


def finetune_config(cfg: ProbeConfig, lr: float) -> FinetuneConfig:
    """One point of the probe's grid (the task comes capped: no caps here)."""
    return FinetuneConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=lr, seq_length=cfg.seq_length,
                          threads=max(1, int(cfg.cpus)), device="auto" if cfg.gpus else "cpu")


def probe_line(result: dict) -> str:
    """The console's line for a probe's result."""
    return (f"probe: step {result['step']} {result['probe_task']} acc {result['probe_acc']:.1%} "
            f"(majority {result['probe_floor']:.1%}), lr {result['probe_lr']:g}, "
            f"{result['probe_train_examples']:,} examples, {result['probe_s']:.0f}s")
