"""Bad pretraining input: one-line errors before any worker starts."""
from __future__ import annotations

import pytest

from wr_train.cli import main


@pytest.mark.parametrize("args, expect", [
    (["--size", "huge"], "model.size: unknown preset 'huge'"),
    (["model.max_positions=64"], "seq_length 128 exceeds model.max_positions 64"),
    (["model.vocab_size=999"], "does not match model.vocab_size 999"),
    (["stages.0.micro_batch=0"], "stages.0: expected micro_batch >= 1"),
    (["--workers", "4000"], "global_batch 512, workers 4000"),
    (["partitions=0"], "partitions: expected >= 1"),
    (["min_workers=3"], "min_workers: expected 0 (a fixed worker count) or 1..workers (2)"),
    (["--steps", "0"], "steps: expected a positive step count"),
    (["ds_config=nope"], "ds_config nope: no such file"),
    (["precision=fp8"], "precision: expected auto|fp32|bf16|fp16"),
    (["shuffle_window=0"], "shuffle_window: expected >= 1 row group"),
    (["eval_rows=-1"], "eval_rows: expected >= 0"),
    (["stages.0.decay=0"], "stages.0.warmup / stages.0.decay: expected fractions"),
])
def test_bad_config(shards128, tmp_path, capsys, args, expect):
    rc = main(["pretrain", "--shards", str(shards128), "--storage", str(tmp_path), "--name", "x",
               "--steps", "5", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and "\n" not in err, err


def test_not_a_shard_dir(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "part-00000.parquet").write_bytes(b"x")
    rc = main(["pretrain", "--shards", str(tmp_path / "half"), "--storage", str(tmp_path), "--steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a complete shard directory (no manifest.json" in err


def test_unwritable_storage(shards128, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = main(["pretrain", "--shards", str(shards128), "--storage", str(blocker / "runs"), "--steps", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and "--storage" in err and "not writable" in err


def test_resume_with_other_shuffle_window_is_refused(pretrained_run, capsys):
    cfg, _ = pretrained_run
    rc = main(["pretrain", "--shards", cfg.stages[0].shards, "--storage", cfg.storage, "--name", cfg.name,
               "--steps", "30", "--workers", "2", "stages.0.micro_batch=16", "stages.0.global_batch=32",
               "shuffle_window=3"])
    err = capsys.readouterr().err
    assert rc == 2 and "shuffle_window 16" in err and "shuffle_window=16" in err, err


def test_eval_line_reads_against_the_floor():
    from wr_train.engine import eval_line
    line = eval_line({"eval_loss": 7.1234, "eval_acc": 0.14, "unigram_floor": 7.988, "unigram_acc": 0.0718})
    assert line == "eval loss 7.123 (unigram floor 7.988) acc 14.0% (floor 7.2%)"
    assert eval_line({"eval_loss": 7.1, "eval_acc": 0.1}) == "eval loss 7.100 acc 10.0%"


def test_overrides_may_stand_between_flags():
    from wr_train.cli import _parser, parse_with_overrides, pretrain_config
    args = parse_with_overrides(_parser(), ["pretrain", "--config", "demo-tiny", "zero_stage=3",
                                            "--workers", "1", "stages.0.lr=0.001", "--name", "x",
                                            "--shards", "some/dir"])
    cfg = pretrain_config(args)
    assert (cfg.zero_stage, cfg.workers, cfg.stages[0].lr, cfg.name) == (3, 1, 0.001, "x")
    with pytest.raises(SystemExit):
        parse_with_overrides(_parser(), ["pretrain", "--config", "demo-tiny", "--bogus", "1"])


def test_lr_schedule_is_hf_linear_or_holds_then_decays():
    import torch
    from transformers import get_linear_schedule_with_warmup

    from wr_train.config import StageConfig
    from wr_train.optim import stage_schedule as lr_schedule

    def lrs(make, steps):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched, out = make(opt), []
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out
    st = StageConfig(steps=40, warmup=0.1)
    assert lrs(lambda o: lr_schedule(o, st), 40) == pytest.approx(
        lrs(lambda o: get_linear_schedule_with_warmup(o, 4, 40), 40))
    held = lrs(lambda o: lr_schedule(o, StageConfig(steps=40, warmup=0.1, decay=0.25)), 40)
    assert held[:5] == [0.0, 0.25, 0.5, 0.75, 1.0] and set(held[4:30]) == {1.0}
    assert held[30:] == pytest.approx([1 - i / 10 for i in range(10)])


def test_eval_rows_show_every_target_as_mask_and_split_evenly(shards128):
    """Held-out rows get fixed 15% targets, each shown as [MASK] (so a context-blind model
    cannot beat the unigram floor by copying); ranks get equal, disjoint shares."""
    import numpy as np

    from tests.conftest import pretrain_cfg
    from wr_train.shards import load_manifest, read_eval_rows
    from wr_train.masking import IGNORE
    from wr_train.engine import eval_set
    from wr_train.tokenizer import MASK
    manifest = load_manifest(str(shards128))
    cfg = pretrain_cfg(shards128, "unused", "x")
    _, rows = read_eval_rows(str(shards128), manifest, cfg.eval_rows)
    parts = [eval_set(cfg, str(shards128), manifest, r, 2) for r in (0, 1)]
    assert len(parts[0][0]) == len(parts[1][0]) == len(rows) // 2 > 10
    for r, (ids, labels) in enumerate(parts):
        target = labels != IGNORE
        assert (ids[target] == MASK).all() and (ids[~target] == rows[r::2][:len(ids)][~target]).all()
        assert (labels[target] == rows[r::2][:len(ids)][target]).all()
        assert 0.12 < target.sum() / (rows[r::2] >= 15).sum() < 0.18
    again = eval_set(cfg, str(shards128), manifest, 0, 2)
    assert np.array_equal(again[1], parts[0][1])      # the same targets at every evaluation


def test_demo_summary_says_where_the_model_stands():
    from wr_train.demo.run import pretrain_summary
    at = pretrain_summary({"step": 560, "eval_loss": 8.01, "eval_acc": 0.07, "unigram_floor": 7.97,
                           "unigram_acc": 0.0716}, 366)
    assert "0.04 nats above the floor" in at and "not yet to read the context" in at
    below = pretrain_summary({"step": 560, "eval_loss": 7.2, "eval_acc": 0.17, "unigram_floor": 7.97,
                              "unigram_acc": 0.0716}, 366)
    assert "0.77 nats below the floor" in below and "The model reads the context" in below
    assert "--budget 20m" in below                                 # what a longer run changes
    far = pretrain_summary({"step": 12000, "eval_loss": 5.86, "eval_acc": 0.097, "unigram_floor": 7.42,
                            "unigram_acc": 0.061}, 1100)
    assert "1.56 nats below the floor" in far and "fill-mask names words that fit" in far
    begun = pretrain_summary({"step": 1400, "eval_loss": 7.22, "eval_acc": 0.058, "unigram_floor": 7.42,
                              "unigram_acc": 0.061}, 240)
    assert "0.20 nats below the floor" in begun and "begun to read the context" in begun


def test_recipe_values_take_their_field_types(tmp_path):
    """PyYAML reads `1e-4` as a string and `1e3` too: a recipe's values are coerced to the
    fields' types (the bad ones are cases of tests/test_bad_input.py)."""
    from wr_train.config import load_config
    recipe = tmp_path / "r.yaml"
    recipe.write_text("seed: 7.0\nstages:\n- lr: 1e-4\n  steps: 1e3\noptim:\n  betas: [0.9, 0.98]\n"
                      "mask:\n  span: 'yes'\nname: 2024\n")
    cfg = load_config(str(recipe), ["stages.0.warmup=5e-2", "name=007"])
    st = cfg.stages[0]
    assert (st.lr, st.steps, st.warmup, cfg.seed, cfg.optim.betas, cfg.mask.span, cfg.name) == \
        (1e-4, 1000, 0.05, 7, (0.9, 0.98), True, "007")
    assert type(st.lr) is float and type(st.steps) is int and type(cfg.seed) is int


def test_next_stage_weights_must_fit_exactly():
    """A stage starts from the last stage's weights only if every key and shape matches
    (strict=False used to start it from random weights where one did not)."""
    from wr_train.checkpoint import CheckpointError
    from wr_train.config import ModelConfig
    from wr_train.model import build_mlm
    from wr_train.checkpoint import load_stage_weights
    saved = build_mlm(ModelConfig(size="tiny"), 64, seed=1).state_dict()
    fresh = build_mlm(ModelConfig(size="tiny"), 64, seed=2)
    load_stage_weights(fresh, saved, "ck")
    assert all((fresh.state_dict()[k] == v).all() for k, v in saved.items())
    key = "bert.encoder.layer.1.output.dense.weight"
    with pytest.raises(CheckpointError, match=f"ck: its weights do not fit .*missing \\['{key}'\\]"):
        load_stage_weights(fresh, {k: v for k, v in saved.items() if k != key}, "ck")
    with pytest.raises(CheckpointError, match="unexpected \\['extra'\\]"):
        load_stage_weights(fresh, {**saved, "extra": saved[key]}, "ck")
    with pytest.raises(CheckpointError, match=f"ck: weight {key} has shape \\(128, 128\\)"):
        load_stage_weights(fresh, {**saved, key: saved[key][:, :128]}, "ck")
