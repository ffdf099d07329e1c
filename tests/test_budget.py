"""Training to a budget: `budget` parsed with one-line errors, a token budget's steps, a
wall-clock budget that ends on time with the schedule decayed to 0, and a resumed budget
run that keeps its plan."""
from __future__ import annotations

import json
import time

import pytest

from tests.conftest import pretrain_cfg
from wr_train import pretrain
from wr_train.budget import Budget, ClockPlan, parse_budget, stage_shares, token_steps
from wr_train.checkpoint import list_checkpoints, verify_complete
from wr_train.config import ConfigError, PretrainConfig, StageConfig


def test_budget_parses_times_and_token_counts():
    assert parse_budget("30m") == Budget(seconds=1800)
    assert parse_budget("1h30m") == Budget(seconds=5400)
    assert parse_budget("90s") == Budget(seconds=90)
    assert parse_budget("2e9tok") == Budget(tokens=2e9)
    assert parse_budget("500Mtok") == Budget(tokens=5e8)
    assert parse_budget("") is None
    for bad in ("30", "0m", "soon", "-5m", "2e9"):
        with pytest.raises(ConfigError, match=f"budget: expected a wall-clock time .* got '{bad}'"):
            parse_budget(bad)


def test_token_budget_shares_the_stages_as_the_recipe_does():
    cfg = PretrainConfig(stages=[
        StageConfig(name="seq128", shards="a", steps=30, global_batch=32, micro_batch=16, lr=1e-3),
        StageConfig(name="seq512", shards="b", steps=10, global_batch=8, micro_batch=8, lr=1e-4)])
    seqs = [128, 512]
    shares = stage_shares(cfg.stages, seqs)  # 30×32×128 : 10×8×512 tokens = 3 : 1
    assert shares == pytest.approx([0.75, 0.25])
    steps = token_steps(cfg, Budget(tokens=4 * (30 * 32 * 128 + 10 * 8 * 512)), seqs)
    assert steps == [120, 40]                  # four times the recipe's tokens, in its proportion


def test_ranks_that_adopt_rank_0s_fit_stay_due_at_the_same_steps():
    # Each rank's clock differs; the plan's steps come from rank 0 (a broadcast), and the
    # re-fit step must follow from those steps alone, or one rank waits in the fit's
    # broadcast while the other is in the step's all-reduce: a hang (seen in a 2-worker run).
    plans = [ClockPlan(Budget(seconds=240), [1.0], 0) for _ in range(2)]
    clocks = [lambda step: 0.17 * step, lambda step: 0.23 * step]  # rank 1 slower
    due_at = [[], []]
    for step in range(1, 2000):
        for rank, (plan, clock) in enumerate(zip(plans, clocks)):
            plan.observe(step, clock(step))
        due = [plan.due(step) for plan in plans]
        assert due[0] == due[1], f"rank 0 due {due[0]}, rank 1 due {due[1]} at step {step}"
        if due[0]:
            steps, _ = plans[0].fit(step, clocks[0](step))
            assert plans[1].fit(step, clocks[1](step))[0] != steps  # their own fits differ
            for rank, plan in enumerate(plans):
                plan.adopt(step, steps)
                due_at[rank].append(step)
    assert due_at[0] == due_at[1] and len(due_at[0]) == 2
    assert all(plan.fits_done == 2 for plan in plans)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl") if line.strip()]


BUDGET_S = 45


def budget_cfg(shards, storage, name, **over):
    cfg = pretrain_cfg(shards, storage, name, steps=1000, checkpoint_every=30, report_every=10,
                       eval_rows=64, budget=f"{BUDGET_S}s", keep_checkpoints=100, **over)
    cfg.workers = 2  # the fits go through rank 0's broadcast, as the demo's do
    return cfg.validate()


@pytest.mark.integration
def test_wall_clock_budget_ends_on_time_with_the_lr_decayed_and_a_resume_keeps_the_plan(shards128, tmp_path):
    import shutil
    lines = []
    t0 = time.time()
    last = pretrain.run(budget_cfg(shards128, tmp_path, "clock"), log=lines.append)
    wall = time.time() - t0
    state = verify_complete(last)
    rows = metrics(tmp_path / "clock")
    planned = state["config"]["stages"][0]["steps"]
    assert state["step"] == planned != 1000 and state["fits"] == 2
    assert abs(state["trained_s"] - BUDGET_S) <= 0.1 * BUDGET_S, state["trained_s"]
    assert rows[-1]["time"] - rows[0]["time"] <= BUDGET_S < wall  # by the clock too
    assert rows[-1]["lr"] == 0.0 and max(r["lr"] for r in rows) == pytest.approx(1e-3, rel=0.1)
    assert any(line.startswith(f"pretrain: budget {BUDGET_S}s of training") for line in lines), lines
    # Resumed from the checkpoint before the last (its plan final): it ends at the same step,
    # the deadline carried on, not a new plan from a fresh clock.
    final = [c for c in list_checkpoints(str(tmp_path / "clock"))
             if c != last and verify_complete(c)["fits"] == 2]
    assert final, "no checkpoint between the final fit and the end"
    for c in list_checkpoints(str(tmp_path / "clock")):
        if c != final[0]:
            shutil.rmtree(c)  # resume from the first checkpoint after the plan was final
    before = verify_complete(final[0])
    assert before["step"] < planned
    again = verify_complete(pretrain.run(budget_cfg(shards128, tmp_path, "clock")))
    assert again["step"] == planned and again["trained_s"] > before["trained_s"]
    assert metrics(tmp_path / "clock")[-1]["lr"] == 0.0
