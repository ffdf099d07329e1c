"""What makes a checkpoint complete, and finding the last complete one.

A checkpoint is a Ray Train checkpoint directory holding every rank's DeepSpeed files,
plus `state.json` (written by rank 0 after gathering every rank's file list):
    {"step", "stage", "stage_step", "world_size", "positions": [rows consumed per rank],
     "config": {...resolved PretrainConfig...}, "files": {relpath: {"size": n}}, ...}
Complete = state.json exists and every file it lists is there with that size. Resume,
export and pull check this before using a checkpoint.
"""
from __future__ import annotations

import json
import re

from wr_train import storage

STATE = "state.json"


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
    listing = storage.list_files(ckpt)
    for rel, info in sorted(state.get("files", {}).items()):
        found = listing.get(rel)
        if found is None:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint, {rel} is missing")
        if found != info["size"]:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint, {rel} has {found} bytes, "
                                  f"expected {info['size']}")
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
