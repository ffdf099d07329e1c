"""Parity of wr-train's training math with a plain HuggingFace loop, and of 2 workers
with 1: the same masked micro-batches must give the same loss at every step.

1. The real worker loop (Ray Train, one worker, fp32, ZeRO stage 0, gradient
   accumulation 2, dropout 0, torch's fused AdamW) against a plain `BertForMaskedLM`
   loop: torch's unfused AdamW with the same parameter groups,
   `get_linear_schedule_with_warmup`, the same clipping, fed the micro-batches the
   worker's stream yields.
2. `build_engine` + `train_step` on 2 workers with ZeRO-2 (each rank its half of every
   global batch) against 1 worker with accumulation 2 over the same global batches.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from wr_train import pretrain
from wr_train.config import PretrainConfig, StageConfig, to_dict
from wr_train.engine import build_engine, train_step
from wr_train.optim import param_groups

pytestmark = pytest.mark.integration

STEPS, MICRO = 20, 8


def parity_cfg(shards, storage, name, workers=1) -> PretrainConfig:
    stage = StageConfig(name="seq128", shards=str(shards), steps=STEPS, global_batch=2 * MICRO,
                        micro_batch=MICRO, lr=1e-3, warmup=0.1)
    cfg = PretrainConfig(name=name, storage=str(storage), workers=workers, cpus_per_worker=1,
                         checkpoint_every=STEPS, report_every=1, eval_rows=0, stages=[stage])
    cfg.model.dropout = 0.0
    return cfg.validate()


def hf_losses(cfg: PretrainConfig, shards: str) -> list[float]:
    """The plain loop: BertForMaskedLM's own loss over the worker's micro-batches, the
    gradient the mean over the step's targets (HF Trainer's `num_items_in_batch`)."""
    from transformers import get_linear_schedule_with_warmup

    from wr_train.shards import load_manifest
    from wr_train.model import build_mlm
    from wr_train.stream import RowStream, masked_batches
    from wr_train.tokenizer import PAD
    torch.set_num_threads(1)
    manifest = load_manifest(shards)
    stage = cfg.stages[0]
    accum = stage.global_batch // stage.micro_batch
    mlm = build_mlm(cfg.model, manifest["vocab_size"], seed=cfg.seed).train()
    opt = torch.optim.AdamW(param_groups(mlm, cfg.optim.weight_decay), lr=stage.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    sched = get_linear_schedule_with_warmup(opt, max(1, int(stage.warmup * stage.steps)), stage.steps)
    stream = RowStream(shards, manifest, seed=cfg.seed, stage=0, rank=0, world=1,
                       global_batch=stage.global_batch, micro_batch=stage.micro_batch,
                       partitions=cfg.partitions, window=cfg.shuffle_window)
    batches = masked_batches(stream, seed=cfg.seed, vocab_size=manifest["vocab_size"], mask_cfg=cfg.mask)
    losses = []
    for _ in range(stage.steps):
        loss_sum = 0.0
        step = [next(batches) for _ in range(accum)]
        targets = sum(int((b.labels != -100).sum()) for b in step)
        for batch in step:
            ids_t, labels_t = batch.ids, batch.labels
            loss = mlm(input_ids=ids_t, attention_mask=(ids_t != PAD).long(), labels=labels_t).loss
            n = int((labels_t != -100).sum())
            (loss * n / targets).backward()
            loss_sum += loss.item() * n
        torch.nn.utils.clip_grad_norm_(mlm.parameters(), cfg.optim.clip)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss_sum / targets)
    batches.close()
    return losses


def test_worker_loop_matches_plain_hf_loop(ray_local, shards128, tmp_path):
    cfg = parity_cfg(shards128, tmp_path, "parity")
    pretrain.run(cfg, log=lambda *a: None)
    rows = [json.loads(x) for x in open(tmp_path / "parity" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    ours = [r["loss"] for r in rows]
    theirs = hf_losses(cfg, str(shards128))
    assert ours[-1] < ours[0] - 0.5  # it learns: the comparison is not between two flat lines
    for step, (a, b) in enumerate(zip(ours, theirs), 1):
        assert a == pytest.approx(b, rel=1e-4), (step, a, b)


def _replay_loop(config: dict) -> None:
    """A Ray Train worker: wr-train's engine and train_step over given micro-batches."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from wr_train.config import from_dict
    from wr_train.model import build_mlm
    cfg = from_dict(config["cfg"]).validate()
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(1)
    device = ray.train.torch.get_device()
    engine = build_engine(cfg, cfg.stages[0], world, build_mlm(cfg.model, config["vocab"], seed=cfg.seed))
    batches = iter(config["micro_batches"][rank])
    losses = []
    for _ in range(cfg.stages[0].steps):
        sums, targets, _ = train_step(engine, batches, device)
        dist.all_reduce(sums)
        targets = torch.tensor([float(targets)])
        dist.all_reduce(targets)
        losses.append(float(sums[0] / targets[0]))
    if rank == 0:
        opt = getattr(engine.optimizer, "optimizer", engine.optimizer)  # under ZeRO's wrapper
        with open(config["out"], "w") as f:
            json.dump({"losses": losses, "zero": engine.zero_optimization_stage(),
                       "accum": engine.gradient_accumulation_steps(),
                       "optimizer": type(opt).__name__, "fused": opt.defaults.get("fused")}, f)


def replay(cfg: PretrainConfig, vocab: int, micro_batches: list, out: str) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer
    TorchTrainer(_replay_loop, train_loop_config={"cfg": to_dict(cfg), "vocab": vocab,
                                                  "micro_batches": micro_batches, "out": out},
                 scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers,
                                                        resources_per_worker={"CPU": 1}),
                 run_config=ray.train.RunConfig(storage_path=os.path.dirname(out),
                                                name=os.path.basename(out) + "-ray")).fit()
    return json.load(open(out))


def test_two_workers_zero2_match_one_worker_on_the_same_global_batches(ray_local, shards128, tmp_path):
    from wr_train.shards import load_manifest
    from wr_train.stream import RowStream, masked_batches
    manifest = load_manifest(str(shards128))
    one = parity_cfg(shards128, tmp_path, "one", workers=1)
    two = parity_cfg(shards128, tmp_path, "two", workers=2)
    two.zero_stage = 2
    stream = RowStream(str(shards128), manifest, seed=one.seed, stage=0, rank=0, world=1,
                       global_batch=2 * MICRO, micro_batch=MICRO, window=one.shuffle_window)
    gen = masked_batches(stream, seed=one.seed, vocab_size=manifest["vocab_size"], mask_cfg=one.mask)
    micro = [next(gen) for _ in range(2 * STEPS)]   # global batch k = micro-batches 2k, 2k+1
    gen.close()
    a = replay(one, manifest["vocab_size"], [micro], str(tmp_path / "one.json"))
    b = replay(two, manifest["vocab_size"], [micro[0::2], micro[1::2]], str(tmp_path / "two.json"))
    assert (a["zero"], a["accum"]) == (0, 2) and (b["zero"], b["accum"]) == (2, 1)
    # torch's fused AdamW on both (the plain loop above runs torch's unfused default)
    assert {(r["optimizer"], r["fused"]) for r in (a, b)} == {("AdamW", True)}
    assert a["losses"][-1] < a["losses"][0] - 0.5
    for step, (x, y) in enumerate(zip(a["losses"], b["losses"]), 1):
        assert x == pytest.approx(y, rel=1e-4), (step, x, y)
