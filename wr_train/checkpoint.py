"""Checkpoints: the one module that knows what a checkpoint is (docs/checkpoints.md).

A run lives in RUN_DIR = STORAGE/NAME. A checkpoint is RUN_DIR/checkpoint_step_NNNNNNN/
(a Ray Train checkpoint directory, named by its global step) holding:
    ds/…                   every rank's DeepSpeed files (ZeRO partitions: zero_pp_rank_R_…)
    rng/rank_R.pt          each rank's RNG states (tensors only)
    manifests.json         the shards' manifests by stage name
    spm.model              the segmenter the shards were encoded with
    metrics.jsonl          the metrics history so far
    state.json             written last by rank 0: TrainState (step, stage, stage step,
                           each rank's stream state), world size, the resolved config,
                           library versions, and every file's size, sha256 and writer rank
Complete = state.json parses and every file it lists is there with its size (and, once
copied or read locally, its sha256). Resume takes the newest complete checkpoint and
skips the others with one line each; export and pull verify every hash; each rank of a
resume fetches only its share (`rank_files`). Besides checkpoints the run folder holds
`.lease.json`: one run per name at a time (`Lease`).

Writing (`save`), finding (`list_checkpoints`, `complete_checkpoints`), reading back
(`fetch_share` + `restore`, `full_weights` of a live engine, `fp32_weights` of a local
copy, `open_checkpoint` for export), and `check_resume`: which settings a resume keeps.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wr_train import storage
from wr_train.config import PretrainConfig, to_dict, training_settings
from wr_train.local_ray import hide_prints
from wr_train.shards import load_manifest

STATE = "state.json"
DS_TAG = "ds"  # DeepSpeed's sub-directory inside a checkpoint
PREFIX = "checkpoint_"
LEASE = ".lease.json"
LEASE_STALE_S = 600.0      # a lease without a heartbeat for this long is taken over
HEARTBEAT_EVERY_S = 30.0
LIBRARIES = ("torch", "deepspeed", "numpy", "pyarrow", "transformers", "ray", "wr_train")


class CheckpointError(ValueError):
    pass


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint saved at global `step`: sorts by step."""
    return f"{PREFIX}step_{step:07d}"


@dataclass
class TrainState:
    """Where training stands: what a checkpoint restores and the loop advances."""
    step: int = 0                  # global optimizer steps
    stage: int = 0
    stage_step: int = 0            # steps within the stage
    streams: list | None = None    # each rank's RowStream.state_dict() in the stage (mid-stage)
    history: list = field(default_factory=list)  # every metrics row of the run (rank 0)
    trained_s: float = 0.0         # seconds of training so far (a wall-clock budget's clock)
    fits: int = 0                  # a wall-clock budget's fits of the current stage's steps

    def next_stage(self) -> None:
        self.stage, self.stage_step, self.streams, self.fits = self.stage + 1, 0, None, 0

    @classmethod
    def of(cls, state: dict, history: list) -> "TrainState":
        streams = state.get("streams")
        if streams is None and state.get("positions") is not None:  # saved before streams
            streams = [{"rows": p} for p in state["positions"]]
        return cls(step=state["step"], stage=state["stage"], stage_step=state["stage_step"],
                   streams=streams, history=history, trained_s=float(state.get("trained_s", 0.0)),
                   fits=int(state.get("fits", 0)))


# ---------------------------------------------------------------- finding and verifying

def _step_of(name: str) -> int:
    numbers = re.findall(r"\d+", name)
    return int(numbers[0]) if name.startswith(f"{PREFIX}step_") and numbers else -1


def list_checkpoints(run_dir: str) -> list[str]:
    """The run's checkpoint directories, oldest first (by step; checkpoints named by
    Ray's date before they were named by step sort first, by date)."""
    if not storage.isdir(run_dir):
        return []
    names = {rel.split("/", 1)[0] for rel in storage.list_files(run_dir)
             if rel.startswith(PREFIX) and "/" in rel}
    return [storage.join(run_dir, n) for n in
            sorted(names, key=lambda n: (_step_of(n), [int(x) for x in re.findall(r"\d+", n)]))]


_REQUIRED = {"step": int, "stage": int, "stage_step": int, "world_size": int, "config": dict, "files": dict}


def read_state(ckpt: str) -> dict:
    """A checkpoint's state.json; a missing, torn, empty or malformed one is a
    CheckpointError naming the file."""
    path = storage.join(ckpt, STATE)
    try:
        if not storage.exists(path):
            raise CheckpointError(f"{ckpt}: not a wr-train checkpoint (no {STATE})")
        text = storage.read_text(path)
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    try:
        state = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({len(text)} bytes: torn or empty upload?): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}")
    for key, kind in _REQUIRED.items():
        if not isinstance(state.get(key), kind):
            raise CheckpointError(f"{path}: key {key!r} missing or not a {kind.__name__}")
    for rel, meta in state["files"].items():
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
            raise CheckpointError(f'{path}: files[{rel!r}] must be {{"size": int, "sha256": str}}')
    return state


def check_files(ckpt: str, files: dict[str, dict], sizes: dict[str, int], local_root: str | None = None) -> None:
    """Every file of `files` ({relpath: {"size", "sha256"?}}) is in the listing `sizes` with
    its size, and with `local_root` (a local copy) has its sha256; else CheckpointError
    naming the first gap."""
    for rel, meta in sorted(files.items()):
        if rel not in sizes:
            raise CheckpointError(f"{ckpt}: incomplete checkpoint: {rel} is listed in {STATE} but missing")
        if sizes[rel] != int(meta["size"]):
            raise CheckpointError(f"{ckpt}: incomplete checkpoint: {rel} has {sizes[rel]} bytes, "
                                  f"{STATE} says {meta['size']}")
        if local_root is not None and meta.get("sha256"):
            digest = storage.sha256_file(os.path.join(local_root, rel))
            if digest != meta["sha256"]:
                raise CheckpointError(f"{storage.join(ckpt, rel)}: sha256 {digest[:12]}… does not match "
                                      f"{STATE} ({str(meta['sha256'])[:12]}…): corrupt checkpoint")


def verify_complete(ckpt: str) -> dict:
    """state.json of a checkpoint whose listed files are all there with their sizes;
    else CheckpointError naming the first gap. (Hashes need a local copy: `open_checkpoint`.)"""
    state = read_state(ckpt)
    try:
        check_files(ckpt, state["files"], storage.list_files(ckpt))
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    return state


def complete_checkpoints(run_dir: str, log=print) -> list[tuple[str, dict]]:
    """(path, state) of every complete checkpoint, newest first; the others are skipped
    with one line each."""
    found = []
    for ckpt in list_checkpoints(run_dir):
        try:
            found.append((ckpt, verify_complete(ckpt)))
        except CheckpointError as e:
            log(f"checkpoint: skipping {e}")
    return sorted(found, key=lambda c: c[1]["step"], reverse=True)


def latest_complete(run_dir: str, log=print) -> tuple[str, dict] | tuple[None, None]:
    """The complete checkpoint with the highest step, or (None, None)."""
    found = complete_checkpoints(run_dir, log=log)
    return found[0] if found else (None, None)


# ---------------------------------------------------------------- each rank's share

_RANK_FILE = re.compile(r"(?:zero_pp_rank_|rng/rank_)(\d+)_?")


def rank_files(state: dict, rank: int, world: int | None = None) -> dict[str, dict]:
    """The files rank `rank` of a `world`-worker resume reads: its own ZeRO partition(s)
    and RNG file and every file that belongs to no rank (the model states of ZeRO 0-2,
    state.json's neighbours); other ranks' partitions stay in storage. On another worker
    count than the checkpoint's every rank reads all partitions (wr_train.reshard
    re-cuts them), and its own RNG file where the checkpoint has one."""
    regather = world is not None and world != state["world_size"]
    out = {}
    for rel, meta in state["files"].items():
        m = _RANK_FILE.search(rel)
        if m is None or int(m.group(1)) == rank or (regather and not rel.startswith("rng/")):
            out[rel] = meta
    return out


def fetch_rank_files(ckpt: str, state: dict, rank: int, dest: str, world: int | None = None) -> int:
    """Copy rank `rank`'s share of `ckpt` into the local dir `dest` and check each file's
    size and sha256; returns the bytes fetched. DeepSpeed unpickles these files, so
    nothing is loaded that does not match state.json."""
    share = rank_files(state, rank, world)
    try:
        fetched = storage.copy_files(ckpt, dest, {rel: m["size"] for rel, m in share.items()}, progress=False)
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    check_files(ckpt, share, {rel: m["size"] for rel, m in share.items()}, local_root=dest)
    return fetched


def fetch_share(run_dir: str, rank: int, log) -> tuple[str, dict, str, int] | None:
    """(storage path, state, local copy of this rank's share, bytes) of the newest
    checkpoint that every rank fetched intact, or None. Rank 0 lists the complete ones
    (so every rank tries the same); one that fails a size or hash check on any rank is
    skipped with one line naming the file, and the next older one is tried."""
    import torch.distributed as dist
    candidates = [complete_checkpoints(run_dir, log=lambda *a: None) if rank == 0 else None]
    dist.broadcast_object_list(candidates, src=0)
    for ckpt, state in candidates[0]:
        local = tempfile.mkdtemp(prefix=f"wr-resume-r{rank}-")
        error, fetched = None, 0
        try:
            fetched = fetch_rank_files(ckpt, state, rank, local, dist.get_world_size())
        except CheckpointError as e:
            error = str(e)
        except BaseException:
            shutil.rmtree(local, ignore_errors=True)
            raise
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        bad = [e for e in errors if e]
        if not bad:
            return ckpt, state, local, fetched
        shutil.rmtree(local, ignore_errors=True)
        log(f"checkpoint: skipping {bad[0]}")
    return None


# ---------------------------------------------------------------- writing

def library_versions() -> dict[str, str]:
    from importlib import metadata
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def save(engine, cfg: PretrainConfig, ts: TrainState, stream_state: dict, rank: int, world: int) -> str:
    """Every rank writes its files into a local dir and hashes them; rank 0 adds the shared
    files and state.json listing every rank's. Returns the local dir (the caller hands it
    to Ray and removes it); on a failure nothing is left behind."""
    import torch
    import torch.distributed as dist

    out = tempfile.mkdtemp(prefix=f"wr-ckpt-r{rank}-")
    try:
        engine.save_checkpoint(out, tag=DS_TAG)
        os.makedirs(os.path.join(out, "rng"), exist_ok=True)
        torch.save({"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
                   os.path.join(out, "rng", f"rank_{rank}.pt"))
        streams = [None] * world
        dist.all_gather_object(streams, stream_state)
        stage = cfg.stages[ts.stage]
        if rank == 0:
            manifests = {st.name: load_manifest(st.shards) for st in cfg.stages}
            Path(out, "manifests.json").write_text(json.dumps(manifests, ensure_ascii=False, indent=1))
            Path(out, "spm.model").write_bytes(storage.read_bytes(storage.join(stage.shards, "spm.model")))
            Path(out, "metrics.jsonl").write_text(history_jsonl(ts.history))
        mine = {str(p.relative_to(out)): {"size": p.stat().st_size, "sha256": storage.sha256_file(p), "rank": rank}
                for p in sorted(Path(out).rglob("*")) if p.is_file()}
        listings = [None] * world
        dist.all_gather_object(listings, mine)
        if rank == 0:
            manifest = load_manifest(stage.shards)
            state = {
                **asdict(TrainState(ts.step, ts.stage, ts.stage_step, streams, [], ts.trained_s, ts.fits)),
                "stage_name": stage.name, "stage_steps": stage.steps, "world_size": world,
                "zero_stage": engine.zero_optimization_stage(),  # the layout saved (1 worker fp32: 0)
                "config": to_dict(cfg), "versions": library_versions(),
                "files": {rel: meta for one in listings for rel, meta in one.items()},
                "vocab_size": manifest["vocab_size"], "seq_length": manifest["seq_length"],
                "saved_at": time.time(),
            }
            del state["history"]  # it is metrics.jsonl
            Path(out, STATE).write_text(json.dumps(state, indent=1))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def rotate(run_dir: str, keep: int, log=print) -> None:
    """Keep the newest `keep` complete checkpoints; delete every older checkpoint, complete
    or not. Newer incomplete ones (a torn save of a crashed try) are left to be
    overwritten when training reaches their step again."""
    found = complete_checkpoints(run_dir, log=lambda *a: None)
    if len(found) <= keep:
        return
    oldest_kept = found[keep - 1][1]["step"]
    for ckpt in list_checkpoints(run_dir):
        if _step_of(ckpt.rsplit("/", 1)[-1]) < oldest_kept:
            storage.remove_tree(ckpt)


def forget_ray_snapshot(run_dir: str, log=print) -> None:
    """wr-train finds checkpoints by reading them, not through Ray's list. Ray 2.60 refuses
    to start a run whose `checkpoint_manager_snapshot.json` names a checkpoint that is gone
    (rotated, or deleted by hand), so the list is removed before each start; the ones it
    named that are gone are said."""
    path = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    if not storage.exists(path):
        return
    try:
        listed = set(re.findall(r'"checkpoint_dir_name":\s*"([^"]+)"', storage.read_text(path)))
    except storage.StorageError:
        listed = set()
    for name in sorted(listed):
        if not storage.exists(storage.join(run_dir, name)):
            log(f"checkpoint: skipping {storage.join(run_dir, name)} (listed in Ray's snapshot, gone from storage)")
    storage.remove_tree(path)


# ---------------------------------------------------------------- reading back

def restore(engine, local: str, rank: int, saved_world: int, world: int) -> None:
    """A mid-stage resume: the engine's weights, optimizer and schedule, and this rank's
    RNG states (dropout continues exactly), from this rank's fetched share. On another
    worker count the fp32 weights and Adam's moments of all saved ranks are gathered and
    re-cut for this one (wr_train.reshard); a rank the checkpoint had no RNG file for
    keeps its fresh seed."""
    import torch

    from wr_train import reshard
    if saved_world == world:
        with hide_prints(verbose=False):
            engine.load_checkpoint(local, tag=DS_TAG)
    else:
        try:
            reshard.load(engine, reshard.gather(os.path.join(local, DS_TAG), reshard.group_names(engine)))
        except reshard.ReshardError as e:
            raise CheckpointError(str(e)) from None
    path = os.path.join(local, "rng", f"rank_{rank}.pt")
    if not os.path.exists(path):
        return
    rng = read_rng(path)
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def read_rng(path: str) -> dict:
    """A rank's saved RNG state, read without unpickling code (torch's weights_only): a file
    that holds anything but tensors is refused, naming it."""
    import pickle

    import torch
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a plain RNG state (refused to unpickle it: {first})") from None


def full_weights(engine) -> dict:
    """The live engine's full fp32 weights (BertForMaskedLM keys), whatever its ZeRO stage:
    the optimizer's fp32 master copy gathered over the ranks (a collective: every rank
    calls it), so the next stage starts without reading a checkpoint."""
    from deepspeed.utils import safe_get_full_fp32_param
    full = {}
    for p in engine.module.parameters():
        value = safe_get_full_fp32_param(p)
        full[id(p)] = (value if value is not None else p.detach()).float().cpu().clone()
    out = {}
    for key, t in engine.module.state_dict(keep_vars=True).items():
        if key.startswith("mlm."):
            out[key[len("mlm."):]] = full.get(id(t), t.detach().float().cpu())
    return out


def fp32_weights(ckpt_dir: str, tag: str = DS_TAG) -> dict:
    """Full fp32 weights of a local, verified checkpoint copy, whatever its ZeRO stage.

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
                                  map_location="cpu", weights_only=False)  # hash-checked by the caller
        sd = {k: v.float() for k, v in model_states["module"].items()}
    return {k[len("mlm."):]: v for k, v in sd.items() if k.startswith("mlm.")}


@dataclass
class Opened:
    """A verified local copy of a whole checkpoint (`open_checkpoint`)."""
    path: str          # where it is in storage
    local: str         # the verified local copy
    state: dict

    def weights(self) -> dict:
        return fp32_weights(self.local)

    def manifests(self) -> dict:
        return json.loads(Path(self.local, "manifests.json").read_text())

    def history(self) -> list[dict]:
        return with_late_keys(self.path, read_history(self.local), self.state["step"])

    def spm_model(self) -> str:
        return os.path.join(self.local, "spm.model")


class open_checkpoint:
    """`with open_checkpoint(path) as ck:` a complete checkpoint (dir or s3://) with every
    file's sha256 checked; an s3:// one is downloaded to a temp dir removed on exit."""

    def __init__(self, ckpt: str, log=print):
        self.ckpt, self.log, self.tmp = ckpt, log, None

    def __enter__(self) -> Opened:
        state = verify_complete(self.ckpt)
        local = self.ckpt
        try:
            if storage.is_s3(self.ckpt):
                self.tmp = tempfile.mkdtemp(prefix="wr-open-")
                local = os.path.join(self.tmp, "ckpt")
                self.log(f"downloading {self.ckpt}")
                try:
                    storage.copy_files(self.ckpt, local, {r: m["size"] for r, m in state["files"].items()},
                                       log=self.log)
                except storage.StorageError as e:
                    raise CheckpointError(str(e)) from None
            check_files(self.ckpt, state["files"], {r: m["size"] for r, m in state["files"].items()},
                        local_root=local)
        except BaseException:
            self.__exit__()
            raise
        return Opened(self.ckpt, local, state)

    def __exit__(self, *exc) -> None:
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def load_stage_weights(mlm, weights: dict, source: str) -> None:
    """Load the previous stage's weights into the next stage's model, every key and shape
    matching. No difference is allowed: a silent strict=False would start the stage from
    random weights wherever a key did not match."""
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
    """The metrics.jsonl rows a local checkpoint copy carries ([] when it has none)."""
    path = os.path.join(ckpt_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def history_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


RUN_METRICS = "metrics.jsonl"  # the run's rows beside its checkpoints, rewritten by rank 0


def with_late_keys(ckpt: str, rows: list[dict], step: int) -> list[dict]:
    """`rows` (checkpoint `ckpt`'s own metrics.jsonl) with the keys their steps gained in
    the run's metrics.jsonl beside it after `ckpt` was sealed: a downstream probe of a
    checkpoint (wr_train.probe) finishes after the checkpoint is written, so a checkpoint
    never holds its own probe's result. Only for a checkpoint inside its run folder (named
    by its `step`); a copy elsewhere (`wr-train pull`) has its own rows only."""
    name = ckpt.rstrip("/").rsplit("/", 1)[-1]
    run_metrics = storage.join(ckpt.rstrip("/").rsplit("/", 1)[0], RUN_METRICS)
    if name != checkpoint_name(step) or not storage.exists(run_metrics):
        return rows
    try:
        later = [json.loads(line) for line in storage.read_text(run_metrics).splitlines() if line.strip()]
    except (storage.StorageError, ValueError):
        return rows  # a torn run file: the checkpoint's rows are whole
    later = {r.get("step"): r for r in later if isinstance(r, dict)}
    return [{**later.get(r["step"], {}), **r} if r["step"] <= step else r for r in rows]


# ---------------------------------------------------------------- resuming

# What identifies a stage's shards (wherever they are now: a copy to S3 is the same set).
SHARD_KEYS = ("rows", "seq_length", "packing", "spm_sha256")


def check_resume(ckpt: str, state: dict, cfg: PretrainConfig, log=print) -> None:
    """Refuse, before any worker starts, to resume `ckpt` with settings that would change
    how the run trains (config.training_settings): one line naming the key and both
    values. A begun stage's steps may grow (said in one line); a library version change
    is said and allowed."""
    streams = state.get("streams") or []
    if streams and "batches" not in streams[0]:
        raise CheckpointError(f"{ckpt}: saved by a wr-train whose data order depended on the worker "
                              f"count (before partitions); finish it with that version or start a new --name")
    if state["stage"] >= len(cfg.stages):
        raise CheckpointError(f"{ckpt}: saved in stage {state['stage'] + 1} ({state.get('stage_name')}), "
                              f"this recipe has {len(cfg.stages)} stage(s)")
    begun = state["stage"] + 1
    saved, now = training_settings(state["config"], begun), training_settings(to_dict(cfg), begun)
    for key, old in saved.items():
        if key in now and now[key] != old:
            raise CheckpointError(f"{ckpt}: saved with {key} {old!r}, this run has {now[key]!r}; "
                                  f"resume with {key}={_as_override(old)} or start a new --name")
    for i in range(begun):
        _check_stage_steps(ckpt, state, cfg, i, log)
    for lib, old in (state.get("versions") or {}).items():
        new = library_versions().get(lib)
        if new is not None and new != old:
            log(f"pretrain: {lib} {old} when {ckpt.rsplit('/', 1)[-1]} was saved, {new} now")
    _check_resumed_shards(ckpt, state, cfg)


def _as_override(value) -> str:
    return ",".join(map(str, value)).join("[]") if isinstance(value, (list, tuple)) else str(value)


def _check_stage_steps(ckpt: str, state: dict, cfg: PretrainConfig, i: int, log) -> None:
    from wr_train.optim import schedule_shape
    old = state["config"]["stages"][i]["steps"]
    stage = cfg.stages[i]
    if stage.steps == old:
        return
    done = state["stage_step"] if i == state["stage"] else old
    if stage.steps < old:
        raise CheckpointError(f"{ckpt}: saved with stages.{i}.steps {old}, this run has {stage.steps}; "
                              f"a begun stage can grow, not shrink (its schedule is set by its steps)")
    if i < state["stage"]:
        log(f"pretrain: stages.{i}.steps {old} -> {stage.steps}: stage {i + 1} has ended, "
            f"the new steps do not apply to it")
        stage.steps = old
        return
    log(f"pretrain: stages.{i}.steps {old} -> {stage.steps} at step {done}: {schedule_shape(stage)}")


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


# ---------------------------------------------------------------- one run per name

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """RUN_DIR/.lease.json: who trains this run now (host, pid, start, heartbeat). A second
    run under the same name is refused with one line naming the holder; a lease whose
    process is gone (same host) or whose heartbeat is older than LEASE_STALE_S is taken
    over with a note. On S3 there is no atomic create: the lease is written, read back
    after a moment and kept only if it is still ours (two starts within that moment can
    both see their own; the later writer wins and the other stops at its next heartbeat)."""

    def __init__(self, run_dir: str, log=print, stale_s: float = LEASE_STALE_S, settle_s: float = 0.5,
                 token: str | None = None):
        self.run_dir, self.path, self.log = run_dir, storage.join(run_dir, LEASE), log
        self.stale_s, self.settle_s = stale_s, settle_s
        self.token = token or uuid.uuid4().hex
        self.started = time.time()
        self.last_beat = time.time() if token else 0.0  # a worker's copy: the driver just wrote it

    def _read(self) -> dict | None:
        try:
            data = json.loads(storage.read_text(self.path))
            return data if isinstance(data, dict) else None
        except storage.StorageError:
            return None
        except ValueError:
            return None  # a torn lease holds nothing

    def _write(self) -> None:
        self.last_beat = time.time()
        storage.write_text(self.path, json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
            "heartbeat": self.last_beat, "token": self.token}))

    def acquire(self) -> "Lease":
        held = self._read()
        if held and held.get("token") != self.token:
            age = time.time() - float(held.get("heartbeat", 0))
            who = f"{held.get('host')}:{held.get('pid')}"
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(held.get("started", 0))))
            gone = held.get("host") == socket.gethostname() and not _pid_alive(int(held.get("pid", 0)))
            if gone:
                self.log(f"pretrain: taking over the lease of {self.run_dir} from {who} (that process is gone)")
            elif age > self.stale_s:
                self.log(f"pretrain: taking over the lease of {self.run_dir} from {who} "
                         f"(no heartbeat for {age:.0f}s)")
            else:
                raise CheckpointError(
                    f"{self.run_dir}: in use by another run ({who}, started {since}, heartbeat {age:.0f}s "
                    f"ago); wait for it to end, stop it, or use another --name")
        self._write()
        time.sleep(self.settle_s)
        self._check_ours()
        return self

    def _check_ours(self) -> dict:
        held = self._read()
        if not held or held.get("token") != self.token:
            who = f"{held.get('host')}:{held.get('pid')}" if held else "nobody"
            raise CheckpointError(f"{self.run_dir}: lease taken over by {who}; stopping this run "
                                  f"so two runs never write one folder")
        return held

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the lease's heartbeat (at most every HEARTBEAT_EVERY_S unless `force`);
        raise if another run took it."""
        if not force and time.time() - self.last_beat < HEARTBEAT_EVERY_S:
            return
        held = self._check_ours()
        self.last_beat = held["heartbeat"] = time.time()
        storage.write_text(self.path, json.dumps(held))

    @contextlib.contextmanager
    def held(self):
        """Acquire; keep the heartbeat going from a thread while the body runs (training,
        but also waiting for nodes); release on the way out."""
        self.acquire()
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_EVERY_S):
                try:
                    self.heartbeat(force=True)
                except (CheckpointError, storage.StorageError):
                    return  # taken over: rank 0 stops the workers at its next report

        thread = threading.Thread(target=beat, daemon=True, name="wr-lease")
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            self.release()

    def release(self) -> None:
        held = self._read()
        if held and held.get("token") == self.token:
            storage.remove_tree(self.path)
