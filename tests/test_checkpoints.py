"""Checkpoints a cluster cannot defeat (issue 28): torn or corrupt files are skipped, each
rank fetches only its share, one run per name, nothing left in the temp dir, every
setting that shapes training checked on resume. Local paths and the test S3 server."""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import pretrain_cfg
from tests.test_pretrain import assert_same_losses, metrics_of
from wr_train import checkpoint, pretrain, storage
from wr_train.checkpoint import CheckpointError, Lease, latest_complete, list_checkpoints, verify_complete
from wr_train.config import to_dict

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_runs(s3) -> str:
    return s3.bucket("wr-ckpt-tests")


def copy_run(cfg, dest: str) -> str:
    """A copy of the shared run's folder (its checkpoints at steps 20 and 30) at `dest`."""
    storage.copy_tree(pretrain.run_dir_of(cfg), storage.join(dest, cfg.name), progress=False)
    return storage.join(dest, cfg.name)


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- names and contents

def test_checkpoints_are_named_by_step_and_list_every_files_hash(pretrained_run):
    cfg, last = pretrained_run
    assert last.endswith("/checkpoint_step_0000030")
    assert [p.rsplit("/", 1)[-1] for p in list_checkpoints(pretrain.run_dir_of(cfg))] == [
        "checkpoint_step_0000020", "checkpoint_step_0000030"]
    state = verify_complete(last)
    for rel, meta in state["files"].items():
        assert meta["sha256"] == storage.sha256_file(os.path.join(last, rel)), rel
    assert {m["rank"] for m in state["files"].values()} == {0, 1}
    assert state["streams"] == [{"batches": 30}, {"batches": 30}]  # global batches taken, on every rank
    assert set(state["versions"]) == {"torch", "deepspeed", "numpy", "pyarrow", "transformers", "ray", "wr_train"}
    assert state["versions"]["torch"].startswith("2.")


# ---------------------------------------------------------------- torn state.json

@pytest.mark.parametrize("where", ["local", "s3"])
def test_torn_state_json_is_skipped_naming_the_file(pretrained_run, tmp_path, where, request):
    """Was: pretrain and export exit 2 with 'Expecting value: line 1 column 1 (char 0)'."""
    cfg, _ = pretrained_run
    root = str(tmp_path) if where == "local" else storage.join(request.getfixturevalue("s3_runs"), uuid.uuid4().hex[:8])
    run_dir = copy_run(cfg, root)
    newest = list_checkpoints(run_dir)[-1]
    storage.write_text(storage.join(newest, "state.json"), "")
    lines = []
    ckpt, state = latest_complete(run_dir, log=lines.append)
    assert state["step"] == 20 and ckpt.endswith("checkpoint_step_0000020")
    assert len(lines) == 1 and "checkpoint_step_0000030/state.json: not valid JSON (0 bytes: torn" in lines[0]
    from wr_train.export import export_checkpoint
    with pytest.raises(CheckpointError, match=r"checkpoint_step_0000030/state\.json: not valid JSON"):
        export_checkpoint(newest, str(tmp_path / "hf"))


def test_torn_newest_checkpoint_resumes_from_the_previous_on_s3(pretrained_run, s3_runs, tmp_path):
    """The newest checkpoint's state.json is half an upload; Ray's snapshot lists a
    checkpoint that is gone. The same command resumes from step 20 and ends where the
    uninterrupted run did."""
    cfg, _ = pretrained_run
    root = storage.join(s3_runs, uuid.uuid4().hex[:8])
    run_dir = copy_run(cfg, root)
    newest = list_checkpoints(run_dir)[-1]
    text = storage.read_text(storage.join(newest, "state.json"))
    storage.write_text(storage.join(newest, "state.json"), text[: len(text) // 2])
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    storage.write_text(snapshot, json.dumps({"checkpoint_results": [
        {"checkpoint_dir_name": "checkpoint_step_0000010"}, {"checkpoint_dir_name": "checkpoint_step_0000020"}]}))
    lines = []
    last = pretrain.run(pretrain_cfg(cfg.stages[0].shards, root, cfg.name), log=lines.append)
    assert last.endswith("checkpoint_step_0000030") and verify_complete(last)["step"] == 30
    assert any("checkpoint_step_0000010 (listed in Ray's snapshot, gone from storage)" in ln for ln in lines)
    assert any("resuming" in ln and "newest complete checkpoint is step 20" in ln for ln in lines), lines
    assert_same_losses(metrics_of(run_dir), metrics_of(pretrain.run_dir_of(cfg)), [20, 25, 30])


# ---------------------------------------------------------------- checksums

def test_corrupt_partition_of_the_right_size_is_skipped_on_resume(pretrained_run, tmp_path):
    """Was: checked by size only; a corrupt file of the right size passed."""
    cfg, _ = pretrained_run
    run_dir = copy_run(cfg, str(tmp_path))
    newest = Path(list_checkpoints(run_dir)[-1])
    victim = next((newest / "ds").glob("*zero_pp_rank_1_*optim_states.pt"))
    flip_a_byte(victim)
    verify_complete(str(newest))  # sizes alone cannot see it
    from wr_train.export import export_checkpoint
    with pytest.raises(CheckpointError, match=rf"{victim.name}: sha256 .* does not match state.json"):
        export_checkpoint(str(newest), str(tmp_path / "hf"))
    # resume: rank 1 finds the mismatch in its share; every rank falls back to step 20,
    # trains to 30 as the uninterrupted run did, and saves step 30 anew
    last = pretrain.run(pretrain_cfg(cfg.stages[0].shards, tmp_path, cfg.name))
    assert last == str(newest)
    assert_same_losses(metrics_of(run_dir), metrics_of(pretrain.run_dir_of(cfg)), [20, 25, 30])
    export_checkpoint(last, str(tmp_path / "hf"))  # every hash matches again


def test_export_of_s3_checkpoint_verifies_every_hash(pretrained_run, s3_runs, tmp_path):
    cfg, _ = pretrained_run
    run_dir = copy_run(cfg, storage.join(s3_runs, uuid.uuid4().hex[:8]))
    newest = list_checkpoints(run_dir)[-1]
    rel = "rng/rank_1.pt"
    data = bytearray(storage.read_bytes(storage.join(newest, rel)))
    data[-1] ^= 0xFF
    storage.write_bytes(storage.join(newest, rel), bytes(data))
    from wr_train.export import export_checkpoint
    with pytest.raises(CheckpointError, match=r"rng/rank_1\.pt: sha256 .* does not match"):
        export_checkpoint(newest, str(tmp_path / "hf"))
    assert not list(Path(tmp_path).glob("hf/*"))


# ---------------------------------------------------------------- one run per name

@pytest.mark.parametrize("where", ["local", "s3"])
def test_lease_one_run_per_name(tmp_path, where, request):
    """Was: no lock; two runs under one name overwrote each other's files."""
    root = str(tmp_path) if where == "local" else storage.join(request.getfixturevalue("s3_runs"), uuid.uuid4().hex[:8])
    run_dir = storage.join(root, "r1")
    first = Lease(run_dir, settle_s=0).acquire()
    with pytest.raises(CheckpointError, match=rf"r1: in use by another run \({socket.gethostname()}:{os.getpid()}, "
                                              r"started .*, heartbeat \d+s ago\); wait for it to end"):
        Lease(run_dir, settle_s=0).acquire()
    first.heartbeat(force=True)
    first.release()
    assert not storage.exists(storage.join(run_dir, ".lease.json"))

    # a lease whose heartbeat stopped long ago (a node gone) is taken over, with a note
    storage.write_text(storage.join(run_dir, ".lease.json"), json.dumps(
        {"host": "node-gone", "pid": 1, "started": time.time() - 7200, "heartbeat": time.time() - 3600,
         "token": "old"}))
    notes = []
    second = Lease(run_dir, log=notes.append, settle_s=0).acquire()
    assert notes and "taking over the lease" in notes[0] and "node-gone:1 (no heartbeat for 3600s)" in notes[0]
    # the old holder learns at its next heartbeat that it must stop
    old = Lease(run_dir, token="old")
    with pytest.raises(CheckpointError, match="lease taken over by"):
        old.heartbeat(force=True)
    second.release()


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    """A run killed with SIGKILL leaves its lease: the same command on the same host
    resumes at once, without waiting for the lease to go stale."""
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    run_dir = str(tmp_path / "r")
    storage.write_text(os.path.join(run_dir, ".lease.json"), json.dumps(
        {"host": socket.gethostname(), "pid": dead.pid, "started": time.time(), "heartbeat": time.time(),
         "token": "killed"}))
    notes = []
    Lease(run_dir, log=notes.append, settle_s=0).acquire().release()
    assert "(that process is gone)" in notes[0]


def test_second_pretrain_under_a_held_name_is_refused_before_ray(pretrained_run, tmp_path):
    cfg, _ = pretrained_run
    run = pretrain_cfg(cfg.stages[0].shards, tmp_path, "busy")
    with Lease(pretrain.run_dir_of(run), settle_s=0).held():
        with pytest.raises(CheckpointError, match="busy: in use by another run"):
            pretrain.run(run)
    assert not list_checkpoints(pretrain.run_dir_of(run))


# ---------------------------------------------------------------- settings on resume

def test_resume_refuses_every_changed_training_setting(pretrained_run):
    """Was: mask shares, dropout, a stage's lr/warmup/decay/batch, optim.*, eval_rows
    changed silently on resume."""
    cfg, last = pretrained_run
    state = verify_complete(last)
    for key, value in [("mask.mask_share", 0.5), ("mask.random_share", 0.2), ("model.dropout", 0.0),
                       ("optim.betas", (0.9, 0.98)), ("optim.weight_decay", 0.1), ("eval_rows", 64),
                       ("seed", 7)]:
        run = pretrain_cfg(cfg.stages[0].shards, cfg.storage, cfg.name)
        group, _, leaf = key.rpartition(".")
        setattr(getattr(run, group) if group else run, leaf, value)
        with pytest.raises(CheckpointError, match=rf"saved with {key} .*, this run has .*; resume with {key}="):
            checkpoint.check_resume(last, state, run)
    for leaf, value in [("lr", 3e-4), ("warmup", 0.2), ("decay", 0.5), ("global_batch", 64), ("micro_batch", 8)]:
        run = pretrain_cfg(cfg.stages[0].shards, cfg.storage, cfg.name)
        setattr(run.stages[0], leaf, value)
        with pytest.raises(CheckpointError, match=rf"saved with stages\.0\.{leaf} "):
            checkpoint.check_resume(last, state, run)
    run = pretrain_cfg(cfg.stages[0].shards, cfg.storage, cfg.name, steps=20)
    with pytest.raises(CheckpointError, match=r"stages\.0\.steps 30, this run has 20; a begun stage can grow"):
        checkpoint.check_resume(last, state, run)


def test_resume_allows_more_steps_and_says_so_and_names_new_versions(pretrained_run):
    cfg, last = pretrained_run
    state = verify_complete(last)
    state["versions"] = {**state["versions"], "torch": "2.0.0"}
    lines = []
    checkpoint.check_resume(last, state, pretrain_cfg(cfg.stages[0].shards, cfg.storage, cfg.name, steps=60),
                            log=lines.append)
    assert any("stages.0.steps 30 -> 60 at step 30: lr 0.001 warms up over 6 steps, decays linearly to 0 at "
               "step 60" in ln for ln in lines), lines
    assert any("torch 2.0.0 when checkpoint_step_0000030 was saved" in ln for ln in lines), lines


# ---------------------------------------------------------------- each rank's share

def share_bound(state: dict, world: int) -> float:
    """1.1 × (files of no rank + optimizer state / W)."""
    shared = sum(m["size"] for rel, m in state["files"].items() if checkpoint._RANK_FILE.search(rel) is None)
    optim = sum(m["size"] for rel, m in state["files"].items() if rel.endswith("optim_states.pt"))
    return 1.1 * (shared + optim / world)


@pytest.mark.parametrize("zero, where", [(2, "s3"), (3, "local")])
def test_each_of_four_ranks_fetches_only_its_share(pretrained_run, tmp_path, zero, where, request):
    """Was: every rank copied the whole checkpoint, every rank's optimizer partition and RNG."""
    cfg, _ = pretrained_run
    root = str(tmp_path) if where == "local" else storage.join(request.getfixturevalue("s3_runs"), uuid.uuid4().hex[:8])
    run = pretrain_cfg(cfg.stages[0].shards, root, f"w4z{zero}", steps=10, zero_stage=zero)
    run.workers, run.stages[0].micro_batch = 4, 8
    last = pretrain.run(run.validate())
    state = verify_complete(last)
    assert state["world_size"] == 4
    for rank in range(4):
        dest = tmp_path / f"share{rank}"
        fetched = checkpoint.fetch_rank_files(last, state, rank, str(dest))
        got = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
        assert fetched == sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
        assert fetched <= share_bound(state, 4), (rank, fetched, share_bound(state, 4))
        owners = {int(m.group(1)) for m in map(checkpoint._RANK_FILE.search, got) if m}
        assert f"rng/rank_{rank}.pt" in got and owners == {rank}, got
        assert any(f"zero_pp_rank_{rank}_" in g and g.endswith("optim_states.pt") for g in got)
    if zero == 3:  # and a real 4-worker resume through those shares, two more steps
        lines = []
        run.stages[0].steps = 12
        last = pretrain.run(run, log=lines.append)
        assert verify_complete(last)["step"] == 12
        assert any("stages.0.steps 10 -> 12" in ln for ln in lines), lines


# ---------------------------------------------------------------- nothing left behind

def ours(tmp) -> list:
    """wr-train's temp copies in `tmp` (torch may cache its compiled kernels there too)."""
    return [p.name for p in tmp.iterdir() if p.name.startswith("wr-")]


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """tempfile's directory for this test alone, to count what is left in it."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_failed_fetch_leaves_nothing_in_the_temp_dir(pretrained_run, tmp_path, own_tmp, one_process_group):
    cfg, _ = pretrained_run
    run_dir = copy_run(cfg, str(tmp_path / "runs"))
    older, newest = list_checkpoints(run_dir)
    # each fails its hash check once fetched: newest in rank 0's optimizer partition, older
    # in its RNG file. Nothing can be resumed, and nothing is left behind.
    flip_a_byte(next(Path(newest, "ds").glob("*zero_pp_rank_0_*optim_states.pt")))
    flip_a_byte(Path(older, "rng", "rank_0.pt"))
    lines = []
    assert checkpoint.fetch_share(run_dir, 0, lines.append) is None
    assert len(lines) == 2 and "optim_states.pt: sha256" in lines[0] and "rank_0.pt: sha256" in lines[1], lines
    assert ours(own_tmp) == []


def test_failed_save_leaves_nothing_in_the_temp_dir(pretrained_run, tmp_path, own_tmp, one_process_group):
    """DeepSpeed has written its files when rank 0 fails to read the shards' spm.model."""
    import shutil

    from wr_train.engine import build_engine
    from wr_train.model import build_mlm
    from wr_train.shards import load_manifest
    cfg, _ = pretrained_run
    shards = tmp_path / "shards"
    shutil.copytree(cfg.stages[0].shards, shards)
    run = pretrain_cfg(shards, tmp_path, "save", workers=1, zero_stage=1)
    run.stages[0].micro_batch = 32
    engine = build_engine(run, run.stages[0], 1, build_mlm(run.model, load_manifest(str(shards))["vocab_size"]))
    (shards / "spm.model").unlink()
    from wr_train.shards import ShardError
    with pytest.raises((storage.StorageError, ShardError), match="no spm.model|spm.model: not found"):
        checkpoint.save(engine, run, checkpoint.TrainState(step=1, stage_step=1), {"batches": 0}, 0, 1)
    assert ours(own_tmp) == []


def test_config_dict_round_trip_keeps_training_settings(pretrained_run):
    from wr_train.config import from_dict, training_settings
    cfg, _ = pretrained_run
    d = to_dict(cfg)
    assert training_settings(to_dict(from_dict(d)), 1) == training_settings(d, 1)
    assert {"mask.mask_share", "model.dropout", "stages.0.lr", "optim.betas", "eval_rows"} <= set(training_settings(d, 1))


class _Payload:
    """What a hostile RNG file could hold: unpickling it would call `ran.append`."""
    ran: list = []

    def __reduce__(self):
        return (_Payload.ran.append, ("unpickled",))


def test_rng_file_holding_code_is_refused_not_unpickled(tmp_path):
    import torch
    good, bad = tmp_path / "rank_0.pt", tmp_path / "rank_1.pt"
    torch.save({"cpu": torch.get_rng_state(), "cuda": None}, good)
    torch.save({"cpu": torch.get_rng_state(), "cuda": _Payload()}, bad)
    assert torch.equal(checkpoint.read_rng(str(good))["cpu"], torch.get_rng_state())
    with pytest.raises(CheckpointError, match=r"rank_1\.pt: not a plain RNG state \(refused to unpickle it"):
        checkpoint.read_rng(str(bad))
    assert _Payload.ran == []
