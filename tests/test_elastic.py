"""Elastic pretraining: a run resumed on another number of workers trains on the same
global batches with its optimizer re-partitioned, and ends where the uninterrupted run
ends (fp32, dropout 0, ZeRO-2 and ZeRO-3, CPU).

The stream's side (the global batches do not depend on the worker count, each row once
per epoch, resumes continue the sequence) is tested in test_masking.py; the gradient's
(the mean over the global batch's targets, however it is cut) in test_parity.py; a node
lost from an elastic run on a 2-node cluster in test_cluster.py.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import pretrain_cfg
from wr_train import pretrain
from wr_train.checkpoint import verify_complete

pytestmark = pytest.mark.integration

STEPS, SAVE = 20, 10


def elastic_cfg(shards, storage, name, workers, **over):
    """The tests' recipe (ZeRO-2 unless said) at fp32 with dropout 0."""
    cfg = pretrain_cfg(shards, storage, name, steps=STEPS, checkpoint_every=SAVE, report_every=2,
                       eval_rows=64, **over)
    cfg.workers = workers
    cfg.model.dropout = 0.0
    return cfg.validate()


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl") if line.strip()]


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def interrupted(shards, storage, name, first: int, then: int, zero: int) -> tuple[dict, list[str]]:
    """`first` workers until the step after the first checkpoint (an injected failure),
    then the same --name on `then` workers to the end: (losses by step, the resume's lines)."""
    with pytest.raises(RuntimeError, match="injected failure"):
        pretrain.run(elastic_cfg(shards, storage, name, first, fail_at_step=SAVE + 1, zero_stage=zero))
    lines = []
    last = pretrain.run(elastic_cfg(shards, storage, name, then, zero_stage=zero), log=lines.append)
    state = verify_complete(last)
    assert (state["step"], state["world_size"]) == (STEPS, then)
    return losses(f"{storage}/{name}"), lines


def test_resume_on_another_worker_count_ends_where_the_uninterrupted_run_ends(shards128, tmp_path):
    pretrain.run(elastic_cfg(shards128, tmp_path, "straight", 2))
    straight = losses(tmp_path / "straight")
    assert sorted(straight) == list(range(2, STEPS + 1, 2))
    assert straight[STEPS] < straight[2] - 0.5  # it learns: not two flat lines compared
    # ZeRO-2 -> one worker's ZeRO-0, back, and ZeRO-3 on 2 -> 3 (each parameter's slice re-cut)
    for first, then, zero in ((2, 1, 2), (1, 2, 2), (2, 3, 3)):
        got, _ = interrupted(shards128, tmp_path, f"w{first}to{then}", first, then, zero)
        assert sorted(got) == sorted(straight)
        for step, loss in straight.items():
            assert got[step] == pytest.approx(loss, rel=1e-4), (first, then, step, got[step], loss)
        workers = {r["step"]: r["workers"] for r in metrics(tmp_path / f"w{first}to{then}")}
        assert {workers[s] for s in workers if s <= SAVE} == {first}
        assert {workers[s] for s in workers if s > SAVE} == {then}
