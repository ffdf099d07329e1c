"""Masked-LM pretraining: a Ray Train TorchTrainer whose workers run DeepSpeed ZeRO.

Driver (`run`): validate the recipe and the shards (`preflight`, `check_resume`), then
`trainer.fit()`.
Worker (`train_worker`): for each stage from where the run stopped: build the engine (from
the previous stage's weights), stream masked rows, step, report metrics, and every
`checkpoint_every` steps save a complete checkpoint that every rank reports to. Re-running
with the same storage and name resumes from the last complete checkpoint, exactly (same
data order, masks, dropout RNG, optimizer, schedule).

The rooms it uses: wr_train.ds_config (the DeepSpeed config), wr_train.engine (building the
engine, `train_step`, the held-out evaluation), wr_train.checkpoint (save, find, restore,
and which settings a resume must keep), wr_train.stream (the masked rows).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from wr_train import storage
from wr_train.checkpoint import (CheckpointError, check_resume, fetch_latest, fp32_weights, history_jsonl,
                                 latest_complete, load_stage_weights, read_history, restore_engine,
                                 save_checkpoint)
from wr_train.config import ConfigError, PretrainConfig, from_dict, to_dict
from wr_train.ds_config import build_ds_config, cpu_supports_fp16, resolve_precision, torch_dtype
from wr_train.engine import build_engine, eval_line, eval_set, evaluate, train_step
from wr_train.local_ray import ensure_ray, hide_prints, quiet_worker, root_cause_line, train_logging_config
from wr_train.shards import CorpusError, load_manifest, read_token_counts


# ---------------------------------------------------------------- the worker

@dataclass
class _Worker:
    """This training process: its place in the group, its device, where its lines go."""
    rank: int
    world: int
    device: object
    log: Callable
    verbose: bool
    peak: float | None = None  # the device's peak FLOP/s for the MFU (measured once, on first use)


@dataclass
class _Position:
    """Where training stands: the checkpoint's on resume, then advanced by the loop."""
    stage: int = 0
    stage_step: int = 0
    step: int = 0                  # global step
    positions: list | None = None  # rows each rank had consumed in the stage (a mid-stage resume)
    history: list = field(default_factory=list)  # rank 0: every metrics row of the run
    local: str | None = None       # a local copy of the last checkpoint: a mid-stage resume's
    #                                engine state, or the next stage's starting weights
    source: str | None = None      # ... that checkpoint in storage (for errors)


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: every stage from where the run stopped."""
    cfg = from_dict(loop_config["config"]).validate()
    run_dir = loop_config["run_dir"]
    w = _start_worker(cfg, loop_config.get("verbose", False))
    import torch.distributed as dist
    at = _resume_point(cfg, run_dir, w)
    for s in range(at.stage, len(cfg.stages)):
        _train_stage(cfg, s, run_dir, w, at)
        if s + 1 < len(cfg.stages):
            # Each rank wrote only its own shard files; the next stage's weights come from
            # the merged checkpoint in storage, once every rank's upload is done.
            dist.barrier()
            if at.local:
                shutil.rmtree(at.local, ignore_errors=True)
            at.source, _, at.local = fetch_latest(run_dir, w.rank, w.log)
    if at.local:
        shutil.rmtree(at.local, ignore_errors=True)


def _start_worker(cfg: PretrainConfig, verbose: bool) -> _Worker:
    """This process set up to train: DeepSpeed's accelerator, quiet libraries, threads."""
    if not cfg.gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_worker(verbose)
    import ray.train
    import ray.train.torch
    import torch

    from wr_train.machine import keep_freed_memory
    keep_freed_memory()  # big per-step CPU tensors reuse memory instead of fresh pages
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    log = _stderr_line if rank == 0 else (lambda *a, **k: None)
    return _Worker(rank, world, device, log, verbose)


def _resume_point(cfg: PretrainConfig, run_dir: str, w: _Worker) -> _Position:
    """The last complete checkpoint's position (and a local copy of it), or the start."""
    source, state, local = fetch_latest(run_dir, w.rank, w.log)
    if not state:
        return _Position()
    if state["world_size"] != w.world:
        raise CheckpointError(
            f"{source}: saved by {state['world_size']} workers, this run has {w.world}; "
            f"resume with --workers {state['world_size']} (data positions are per worker)")
    w.log(f"resuming from {source} (stage {state['stage']}, step {state['step']})")
    at = _Position(stage=state["stage"], stage_step=state["stage_step"], step=state["step"],
                   positions=state["positions"], history=read_history(local) if w.rank == 0 else [],
                   local=local, source=source)
    if at.stage_step == cfg.stages[at.stage].steps:  # resumed at a stage's end
        at.stage, at.stage_step, at.positions = at.stage + 1, 0, None
    return at


def _train_stage(cfg: PretrainConfig, s: int, run_dir: str, w: _Worker, at: _Position) -> None:
    """Stage `s` from `at` to its last step: step, report, evaluate and save on schedule."""
    import ray.train

    from wr_train.machine import peak_flops
    from wr_train.stream import RowStream, masked_batches
    stage = cfg.stages[s]
    manifest = load_manifest(stage.shards)
    mid_stage = s == at.stage and at.stage_step > 0
    engine = _stage_engine(cfg, s, manifest, w, at, mid_stage)
    stream = RowStream(stage.shards, manifest, seed=cfg.seed, stage=s, rank=w.rank, world=w.world,
                       micro_batch=stage.micro_batch, window=cfg.shuffle_window,
                       consumed=at.positions[w.rank] if (mid_stage and at.positions) else 0)
    batches = masked_batches(stream, seed=cfg.seed, vocab_size=manifest["vocab_size"], mask_cfg=cfg.mask,
                             pin=w.device.type == "cuda")
    held_out = eval_set(cfg, stage.shards, manifest, w.rank, w.world) if cfg.eval_rows else None
    if w.peak is None:
        w.peak = peak_flops(w.device, torch_dtype(cfg))
    w.log(f"stage {s + 1}/{len(cfg.stages)} {stage.name}: seq {manifest['seq_length']}, {stage.steps} steps, "
          f"global batch {stage.global_batch} = {stage.micro_batch} × {engine.gradient_accumulation_steps()} "
          f"accum × {w.world} workers, ZeRO-{engine.zero_optimization_stage()}, {resolve_precision(cfg)}, "
          f"{w.device}")
    if cfg.eval_rows and held_out is None:
        w.log(f"no held-out rows in {stage.shards} (made with --heldout 0, or before it existed): "
              f"no evaluation")
    meter = _Meter(w.device)
    engine.train()
    while at.stage_step < stage.steps:
        meter.add(*train_step(engine, batches, w.device))
        at.stage_step += 1
        at.step += 1
        if at.step == cfg.fail_at_step:
            _inject_failure_once(run_dir, w.rank, at.step)
        save = at.stage_step % cfg.checkpoint_every == 0 or at.stage_step == stage.steps
        if not (save or at.stage_step % cfg.report_every == 0):
            continue
        metrics = _report_metrics(meter, engine, cfg, s, manifest, w, at)
        if save and held_out is not None:
            metrics.update(_eval_metrics(engine, held_out, stage, manifest, w, at))
        at.history.append(metrics)
        if save:
            _save_and_report(engine, metrics, cfg, s, stream.consumed, run_dir, w, at)
        else:
            ray.train.report(metrics)
        meter.restart()  # evaluation and saving stay out of tok/s
    batches.close()
    at.stage_step, at.positions = 0, None


def _stage_engine(cfg: PretrainConfig, s: int, manifest: dict, w: _Worker, at: _Position, mid_stage: bool):
    """Stage `s`'s engine: mid-stage, the checkpoint's engine state and RNG; else fresh."""
    from wr_train.model import build_mlm, fresh_mlm
    vocab = manifest["vocab_size"]
    mlm = (build_mlm(cfg.model, vocab, seed=cfg.seed) if at.local   # weights come from the checkpoint
           else fresh_mlm(cfg.model, vocab, cfg.seed, cfg.stages[s].shards))
    if at.local and not mid_stage:
        # A new stage starts from the last weights (fp32, gathered from any ZeRO stage)
        # with a fresh optimizer and schedule, as the seed's recipe does.
        load_stage_weights(mlm, fp32_weights(at.local), at.source)
        mlm.tie_weights()
    with hide_prints(w.verbose):
        engine = build_engine(cfg, cfg.stages[s], w.world, mlm)
    if mid_stage:
        restore_engine(engine, at.local, w.rank)
    return engine


class _Meter:
    """The steps since the last report: loss × targets and correct predictions summed on
    the device, target and non-pad token counts on the host (known there already), the
    seconds they took. `read` all-reduces them: the one device read per report."""

    def __init__(self, device):
        import torch
        self.device = device
        self.totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss·n, correct
        self.restart()

    def restart(self) -> None:
        self.totals.zero_()
        self.counts = [0, 0]  # targets, non-pad tokens
        self.since, self.steps = time.time(), 0

    def add(self, sums, targets: int, tokens: int) -> None:
        self.totals += sums
        self.counts = [self.counts[0] + targets, self.counts[1] + tokens]
        self.steps += 1

    def read(self) -> tuple:
        """(loss·n, correct, targets, tokens) of every worker, seconds, steps."""
        import torch
        import torch.distributed as dist
        report = torch.cat([self.totals, torch.tensor(self.counts, dtype=torch.float64, device=self.device)])
        dist.all_reduce(report)
        loss_sum, correct_sum, targets, tokens = report.tolist()
        return loss_sum, correct_sum, targets, tokens, time.time() - self.since, self.steps


def _report_metrics(meter: _Meter, engine, cfg: PretrainConfig, s: int, manifest: dict,
                    w: _Worker, at: _Position) -> dict:
    """A report step's metrics row (every worker's steps since the last report) and its line."""
    from wr_train.model import flops_per_token
    stage = cfg.stages[s]
    loss_sum, correct_sum, targets, tokens, elapsed, steps = meter.read()
    tok_s = tokens / max(elapsed, 1e-9)
    mask_frac = targets / max(tokens, 1)
    flops = flops_per_token(cfg.model, manifest["vocab_size"], manifest["seq_length"], mask_frac)
    metrics = {
        "step": at.step, "stage": s, "stage_step": at.stage_step,
        "loss": loss_sum / max(targets, 1), "mlm_acc": correct_sum / max(targets, 1),
        "lr": float(engine.get_lr()[0]), "tokens_per_s": tok_s,
        "mfu": tok_s * flops / (w.peak * w.world),
        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
        "time": time.time(),
    }
    eta = elapsed / steps * (stage.steps - at.stage_step)
    w.log(f"{_where(stage, at)} loss {metrics['loss']:.4f} acc {metrics['mlm_acc']:.3f} "
          f"lr {metrics['lr']:.2e} {tok_s:,.0f} tok/s mfu {metrics['mfu']:.1%} eta {eta:.0f}s")
    return metrics


def _eval_metrics(engine, held_out, stage, manifest: dict, w: _Worker, at: _Position) -> dict:
    """The held-out loss and accuracy over every worker's share (and the shards' unigram
    floor beside them), and their line."""
    import torch.distributed as dist
    ev = evaluate(engine, held_out, stage.micro_batch, w.device)
    dist.all_reduce(ev)
    e_loss, e_correct, e_targets = ev.tolist()
    metrics = {"eval_loss": e_loss / max(e_targets, 1), "eval_acc": e_correct / max(e_targets, 1),
               "eval_targets": int(e_targets)}
    floor = manifest.get("unigram") or {}
    if floor:
        metrics.update(unigram_floor=floor["entropy"], unigram_acc=floor["top_fraction"])
    w.log(f"{_where(stage, at)} {eval_line(metrics)}")
    return metrics


def _save_and_report(engine, metrics: dict, cfg: PretrainConfig, s: int, consumed: int,
                     run_dir: str, w: _Worker, at: _Position) -> None:
    """Every rank saves its files and reports them to Ray, which persists the checkpoint;
    rank 0 then rewrites the run's metrics.jsonl and TensorBoard files."""
    import ray.train
    stage = cfg.stages[s]
    ckpt_dir = save_checkpoint(engine, cfg, stage, s, at.stage_step, at.step, consumed,
                               at.history, w.rank, w.world)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # Ray has persisted it
    w.log(f"{_where(stage, at)} checkpoint saved (global step {at.step}) in {run_dir}")
    if w.rank == 0:
        storage.write_text(storage.join(run_dir, "metrics.jsonl"), history_jsonl(at.history))
        write_tensorboard(at.history, storage.join(run_dir, "tensorboard"))


def _where(stage, at: _Position) -> str:
    return f"[{stage.name}] step {at.stage_step}/{stage.steps}"


def _inject_failure_once(run_dir: str, rank: int, step: int) -> None:
    """A drill: rank 0 dies at `step` the first time only (a marker in the run dir)."""
    marker = storage.join(run_dir, f".injected-failure-{step}")
    if rank == 0 and not storage.exists(marker):
        storage.write_text(marker, "1")
        raise RuntimeError(f"injected failure at step {step} (fail_at_step)")


def write_tensorboard(history: list[dict], dest: str) -> None:
    """TensorBoard event file of the whole history (rewritten at each checkpoint: S3
    cannot append, and a resumed run's history comes back with its checkpoint)."""
    from torch.utils.tensorboard import SummaryWriter
    with tempfile.TemporaryDirectory(prefix="wr-tb-") as tmp:
        writer = SummaryWriter(log_dir=tmp)
        for row in history:
            for key in ("loss", "mlm_acc", "lr", "tokens_per_s", "mfu",
                        "eval_loss", "eval_acc", "unigram_floor", "unigram_acc"):
                if key in row:
                    writer.add_scalar(f"pretrain/{key}", row[key], row["step"], walltime=row.get("time"))
        writer.close()
        storage.remove_tree(dest)
        storage.copy_tree(tmp, dest, progress=False)


def _stderr_line(*parts, **_) -> None:
    """One progress line on stderr (a worker's reaches the driver's stderr through Ray).
    Not print(): Ray Train patches print to also log it, and the console then shows every
    line twice; and stdout is kept for the checkpoint path `wr-train pretrain` prints."""
    sys.stderr.write(" ".join(map(str, parts)) + "\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- the driver

def preflight(cfg: PretrainConfig) -> None:
    """Every check that can fail before a worker starts, each a one-line error."""
    from wr_train.shards import check_spm
    cfg.validate()
    vocab = sha = None
    for i, st in enumerate(cfg.stages):
        try:
            m = load_manifest(st.shards)
            check_spm(st.shards, m)  # the spm.model beside the shards made their ids
        except (CorpusError, storage.StorageError) as e:
            raise ConfigError(f"stages.{i}.shards: {e}") from None
        if m["seq_length"] > cfg.model.max_positions:
            raise ConfigError(f"stages.{i}.shards {st.shards}: seq_length {m['seq_length']} exceeds "
                              f"model.max_positions {cfg.model.max_positions}")
        if cfg.model.vocab_size and m["vocab_size"] != cfg.model.vocab_size:
            raise ConfigError(f"stages.{i}.shards {st.shards}: vocab {m['vocab_size']} does not match "
                              f"model.vocab_size {cfg.model.vocab_size}")
        if sha and m["spm_sha256"] != sha:
            raise ConfigError(f"stages.{i}.shards {st.shards}: made with another spm model than "
                              f"stages.0 (vocab {m['vocab_size']} vs {vocab}); all stages need one segmenter")
        vocab, sha = m["vocab_size"], m["spm_sha256"]
    if cfg.model.output_bias == "unigram":
        try:
            read_token_counts(cfg.stages[0].shards, vocab)  # every stage has one segmenter (above)
        except (CorpusError, storage.StorageError) as e:
            raise ConfigError(f"model.output_bias=unigram: {e}") from None
    ds = build_ds_config(cfg, cfg.stages[0], cfg.workers)  # a bad ds_config fails here, not in a worker
    if ds["fp16"]["enabled"] and not cfg.gpu and not cpu_supports_fp16():
        raise ConfigError("precision fp16: this CPU has no fp16 kernels (DeepSpeed refuses it); "
                          "use fp32 or bf16 on CPU, fp16 on GPUs")


def run_dir_of(cfg: PretrainConfig) -> str:
    return storage.join(cfg.storage, cfg.name)


def with_absolute_paths(cfg: PretrainConfig) -> PretrainConfig:
    """A copy whose local paths mean what they meant in the user's shell: the workers run
    in Ray's directories (in a `ray job submit` job: relative to the uploaded working_dir)."""
    cfg = copy.deepcopy(cfg)
    cfg.storage = storage.absolute(cfg.storage)
    for st in cfg.stages:
        st.shards = storage.absolute(st.shards)
    if cfg.ds_config and os.path.exists(cfg.ds_config):  # else a shipped config's name
        cfg.ds_config = os.path.abspath(cfg.ds_config)
    return cfg


def run(cfg: PretrainConfig, log=_stderr_line, verbose: bool = False) -> str:
    """Train (or resume) the run STORAGE/NAME; returns the last checkpoint's path.
    Progress goes to stderr (the workers' lines too), so stdout can carry just the path."""
    cfg = with_absolute_paths(cfg)
    preflight(cfg)
    run_dir = run_dir_of(cfg)
    try:
        storage.check_writable(run_dir)
    except storage.StorageError as e:
        raise ConfigError(f"--storage {cfg.storage}: {e}") from None
    ckpt, state = latest_complete(run_dir, log=log)
    if state:
        check_resume(ckpt, state, cfg)
        log(f"pretrain: resuming {run_dir} from step {state['step']}")
    import ray.train  # after the checks: bad input fails before seconds of imports
    from ray.train.torch import TorchTrainer
    ensure_ray(gpu=cfg.gpu, verbose=verbose)
    fs, inner = storage.resolve(cfg.storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": run_dir, "verbose": verbose},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}),
        run_config=ray.train.RunConfig(
            name=cfg.name, storage_path=inner, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=train_logging_config(verbose)),
    )
    log(f"pretrain: {cfg.model.size} model, {len(cfg.stages)} stage(s), {cfg.workers} worker(s) -> {run_dir}")
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; keep its last line
        raise RuntimeError(f"pretraining failed: {root_cause_line(e)}") from None
    last = storage.join(run_dir, Path(result.checkpoint.path).name) if result.checkpoint else None
    if last is None:
        ckpt, _ = latest_complete(run_dir, log=log)
        last = ckpt
    final = last_eval(run_dir)
    if final:
        log(f"pretrain: step {final['step']} {eval_line(final)}")
    return last


def last_eval(run_dir: str) -> dict | None:
    """The run's last metrics row with a held-out evaluation (None if it has none)."""
    path = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(path):
        return None
    rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    return evals[-1] if evals else None
