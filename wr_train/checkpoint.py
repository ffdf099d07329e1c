"""Checkpoints: what a complete one holds, writing and finding one, reading it back.

A checkpoint is a Ray Train checkpoint directory holding every rank's DeepSpeed files
(under DS_TAG), each rank's RNG states, the stages' manifests, spm.model and the metrics
history, plus `state.json` (written by rank 0 after gathering every rank's file list):
    {"step", "stage", "stage_step", "world_size", "positions": [rows consumed per rank],
     "config": {...resolved PretrainConfig...}, "files": {relpath: {"size": n}}, ...}
Complete = state.json exists and every file it lists is there with that size. Resume,
export and pull check this before using a checkpoint.

Writing (`save_checkpoint`, in the workers), finding (`latest_complete`, `fetch_latest`),
reading back (`restore_engine`: the optimizer, schedule and RNG of a mid-stage resume;
`fp32_weights` + `load_stage_weights`: the next stage's or the export's weights;
`read_history`), and `check_resume`: which settings a resumed run must keep.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from wr_train import storage
from wr_train.config import PretrainConfig, to_dict
from wr_train.local_ray import hide_prints
from wr_train.shards import load_manifest

STATE = "state.json"
DS_TAG = "ds"  # DeepSpeed's sub-directory inside a checkpoint


class CheckpointError(ValueError):
    pass


def read_state(ckpt: str) -> dict:
    try:
        if not storage.exists(storage.join(ckpt, STATE)):
            raise CheckpointError(f"{ckpt}: not a wr-train checkpoint (no {STATE})")
        return json.loads(storage.read_text(storage.join(ckpt, STATE)))
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None


def verify_complete(ckpt: str) -> dict:
    """state.json of a complete checkpoint; else CheckpointError naming the first gap."""
    state = read_state(ckpt)
    try:  # the one completeness check, shared with `wr-train pull`
        storage.check_complete(ckpt, dict(sorted(state.get("files", {}).items())), storage.list_files(ckpt))
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    return state


def list_checkpoints(run_dir: str) -> list[str]:
    """Ray's checkpoint_* directories of a run, oldest first."""
    if not storage.isdir(run_dir):
        return []
    names = {rel.split("/", 1)[0] for rel in storage.list_files(run_dir)
             if rel.startswith("checkpoint_") and "/" in rel}
    return sorted((storage.join(run_dir, n) for n in names),
                  key=lambda p: [int(x) for x in re.findall(r"\d+", p.rsplit("/", 1)[-1])] or [0])


def latest_complete(run_dir: str, log=print) -> tuple[str, dict] | tuple[None, None]:
    """The complete checkpoint with the highest step; incomplete ones are skipped with a note."""
    best: tuple = (None, None)
    for ckpt in list_checkpoints(run_dir):
        try:
            state = verify_complete(ckpt)
        except CheckpointError as e:
            log(f"checkpoint: skipping {e}")
            continue
        if best[1] is None or state["step"] >= best[1]["step"]:
            best = (ckpt, state)
    return best


def fetch_latest(run_dir: str, rank: int, log):
    """(storage path, state, local copy) of the last complete checkpoint, or Nones.
    Rank 0 picks it so every rank resumes from the same one."""
    import torch.distributed as dist
    choice = [latest_complete(run_dir, log=log) if rank == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    ckpt, state = choice[0]
    if not state:
        return None, None, None
    local = tempfile.mkdtemp(prefix=f"wr-resume-r{rank}-")
    storage.copy_tree(ckpt, local, progress=False)
    return ckpt, state, local


def save_checkpoint(engine, cfg, stage, s, stage_step, global_step, consumed,
                    history, rank, world) -> str:
    """Every rank writes its files into a local dir; rank 0 adds state.json listing them all."""
    import torch
    import torch.distributed as dist

    out = tempfile.mkdtemp(prefix=f"wr-ckpt-r{rank}-")
    engine.save_checkpoint(out, tag=DS_TAG)
    os.makedirs(os.path.join(out, "rng"), exist_ok=True)
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               os.path.join(out, "rng", f"rank_{rank}.pt"))
    positions = [None] * world
    dist.all_gather_object(positions, consumed)
    if rank == 0:
        manifests = {}
        for i, st in enumerate(cfg.stages):
            manifests[st.name] = load_manifest(st.shards)
        with open(os.path.join(out, "manifests.json"), "w") as f:
            json.dump(manifests, f, ensure_ascii=False, indent=1)
        spm_src = storage.join(stage.shards, "spm.model")
        with open(os.path.join(out, "spm.model"), "wb") as f:
            f.write(storage.read_bytes(spm_src))
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write(history_jsonl(history))
    listing = {str(p.relative_to(out)): p.stat().st_size for p in Path(out).rglob("*") if p.is_file()}
    listings = [None] * world
    dist.all_gather_object(listings, listing)
    if rank == 0:
        files = {}
        for one in listings:
            files.update({rel: {"size": size} for rel, size in one.items()})
        state = {
            "step": global_step, "stage": s, "stage_name": stage.name, "stage_step": stage_step,
            "stage_steps": stage.steps, "world_size": world, "positions": positions,
            "ds_tag": DS_TAG, "config": to_dict(cfg), "files": files,
            "vocab_size": load_manifest(stage.shards)["vocab_size"],
            "seq_length": load_manifest(stage.shards)["seq_length"],
            "saved_at": time.time(),
        }
        with open(os.path.join(out, "state.json"), "w") as f:
            json.dump(state, f, indent=1)
    return out


def restore_engine(engine, local: str, rank: int) -> None:
    """A mid-stage resume: the engine's weights, optimizer and schedule, and this rank's
    RNG states (dropout continues exactly), from a local checkpoint copy."""
    import torch
    engine.load_checkpoint(local, tag=DS_TAG)
    rng = torch.load(os.path.join(local, "rng", f"rank_{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def fp32_weights(ckpt_dir: str, tag: str = DS_TAG) -> dict:
    """Full fp32 weights of a local checkpoint copy, whatever its ZeRO stage.

    Stages 1-3 keep the fp32 master weights in the per-rank optimizer shards (gathered
    by DeepSpeed's zero_to_fp32); stage 0 (a one-worker run) saves the module itself.
    """
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag_dir = os.path.join(ckpt_dir, tag)
    if any(f.endswith("optim_states.pt") and "zero_pp_rank" in f for f in os.listdir(tag_dir)):
        with hide_prints(verbose=False):  # it prints every shard it reads
            sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    else:
        model_states = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"),
                                  map_location="cpu", weights_only=False)
        sd = {k: v.float() for k, v in model_states["module"].items()}
    return {k[len("mlm."):]: v for k, v in sd.items() if k.startswith("mlm.")}


def load_stage_weights(mlm, weights: dict, source: str) -> None:
    """Load the previous stage's weights into the next stage's model, every key and shape
    matching. No difference is allowed: measured, both zero_to_fp32 (ZeRO 1-3) and the
    stage-0 module states hold every key of BertForMaskedLM's state_dict, the tied decoder
    included (its position_ids buffers are not persistent). A silent strict=False would
    start the stage from random weights wherever a key did not match."""
    expected = mlm.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: its weights do not fit the next stage's model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: weight {key} has shape {tuple(tensor.shape)}, the next "
                                  f"stage's model expects {tuple(expected[key].shape)}")
    mlm.load_state_dict(weights, strict=True)


def read_history(ckpt_dir: str) -> list[dict]:
    """The metrics.jsonl rows a checkpoint carries ([] when it has none)."""
    path = os.path.join(ckpt_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def history_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# What a resumed run must keep from the run that saved the checkpoint: the data order and
# the masks are pure functions of the seed, the window and the mask settings, and the saved
# weights and optimizer states fit only the model they were saved from.
# key -> the value a checkpoint saved before the key existed stands for.
RESUME_KEYS = {
    "seed": None, "shuffle_window": 1,  # runs before the window read 1 group at a time
    "mask.prob": None, "mask.span": None, "mask.span_p": None, "mask.span_max": None,
    "model.size": None, "model.layers": None, "model.hidden": None, "model.heads": None,
    "model.ffn": None, "model.max_positions": None, "model.vocab_size": None,
    # DeepSpeed's files differ by precision and ZeRO stage (bf16 keeps its fp32 master
    # weights in other files than fp32's optimizer): another one fails late, in a worker
    "precision": None, "zero_stage": None,
}
# What identifies a stage's shards (wherever they are now: a copy to S3 is the same set).
SHARD_KEYS = ("rows", "seq_length", "packing", "spm_sha256")


def check_resume(ckpt: str, state: dict, cfg: PretrainConfig) -> None:
    """Refuse, before any worker starts, to resume `ckpt` with settings that would break
    the exact data order or fail late: one line naming the key and both values."""
    if state["world_size"] != cfg.workers:
        raise CheckpointError(f"{ckpt}: saved by {state['world_size']} workers; resume with "
                              f"--workers {state['world_size']} (data positions are per worker)")
    saved, now = state["config"], to_dict(cfg)
    for key, default in RESUME_KEYS.items():
        old = _dotted(saved, key, default)
        if old is not None and old != _dotted(now, key):
            raise CheckpointError(f"{ckpt}: saved with {key} {old!r}, this run has {_dotted(now, key)!r}; "
                                  f"resume with {key}={old} or start a new --name")
    if state["stage"] >= len(cfg.stages):
        raise CheckpointError(f"{ckpt}: saved in stage {state['stage'] + 1} ({state.get('stage_name')}), "
                              f"this recipe has {len(cfg.stages)} stage(s)")
    _check_resumed_shards(ckpt, state, cfg)


def _check_resumed_shards(ckpt: str, state: dict, cfg: PretrainConfig) -> None:
    """Each stage begun so far must read the shards it was trained on (the checkpoint's
    manifests.json holds them by stage name)."""
    path = storage.join(ckpt, "manifests.json")
    if not storage.exists(path):
        return  # a checkpoint from before manifests were saved
    saved = json.loads(storage.read_text(path))
    for i in range(state["stage"] + 1):
        name = state["config"]["stages"][i]["name"]
        if name not in saved:
            continue
        current = load_manifest(cfg.stages[i].shards)
        for key in SHARD_KEYS:
            if saved[name].get(key) != current.get(key):
                raise CheckpointError(
                    f"{ckpt}: stages.{i}.shards {cfg.stages[i].shards} has {key} {current.get(key)!r}, "
                    f"the run was trained on shards with {key} {saved[name].get(key)!r}; resume with "
                    f"those shards or start a new --name")


def _dotted(data: dict, key: str, default=None):
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return default
        data = data[part]
    return data
