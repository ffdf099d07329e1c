"""Bad pretraining input: one-line errors before any worker starts."""
from __future__ import annotations

import pytest

from wr_train.cli import main


@pytest.mark.parametrize("args, expect", [
    (["--size", "huge"], "model.size: unknown preset 'huge'"),
    (["model.max_positions=64"], "seq_length 128 exceeds model.max_positions 64"),
    (["model.vocab_size=999"], "does not match model.vocab_size 999"),
    (["stages.0.global_batch=30"], "global_batch=30 must be a positive multiple"),
    (["--steps", "0"], "steps: expected a positive step count"),
    (["ds_config=nope"], "ds_config nope: no such file"),
    (["precision=fp8"], "precision: expected auto|fp32|bf16|fp16"),
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


def test_resume_with_other_worker_count_is_refused(pretrained_run, capsys):
    cfg, _ = pretrained_run
    rc = main(["pretrain", "--shards", cfg.stages[0].shards, "--storage", cfg.storage, "--name", cfg.name,
               "--steps", "30", "--workers", "1", "stages.0.micro_batch=32"])
    err = capsys.readouterr().err
    assert rc == 2 and "saved by 2 workers" in err and "--workers 2" in err


def test_overrides_may_stand_between_flags():
    from wr_train.cli import _parser, parse_with_overrides, pretrain_config
    args = parse_with_overrides(_parser(), ["pretrain", "--config", "demo-tiny", "zero_stage=3",
                                            "--workers", "1", "stages.0.lr=0.001", "--name", "x",
                                            "--shards", "some/dir"])
    cfg = pretrain_config(args)
    assert (cfg.zero_stage, cfg.workers, cfg.stages[0].lr, cfg.name) == (3, 1, 0.001, "x")
    with pytest.raises(SystemExit):
        parse_with_overrides(_parser(), ["pretrain", "--config", "demo-tiny", "--bogus", "1"])
