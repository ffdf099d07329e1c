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
and which settings a resume must keep), wr_train.stream (the masked rows), and, when the
recipe names a probe task, wr_train.probe (rank 0 runs it on each persisted checkpoint as a
Ray task beside training, `_Probes`).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from wr_train import checkpoint, storage
from wr_train.checkpoint import TrainState, check_resume, history_jsonl, latest_complete
from wr_train.config import ConfigError, PretrainConfig, from_dict, to_dict
from wr_train.ds_config import build_ds_config, cpu_supports_fp16, resolve_precision, torch_dtype
from wr_train.engine import build_engine, eval_line, eval_set, evaluate, train_step
from wr_train.local_ray import ensure_ray, hide_prints, quiet_worker, root_cause_line, train_logging_config
from wr_train.shards import ShardError, load_manifest, read_token_counts
from wr_train.tracking import TrackingError, check_installed, parse_report_to, tracker_env


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
    trackers: object = None    # rank 0's tracking.Trackers (MLflow / W&B), if any are named
    probes: "_Probes | None" = None  # rank 0's downstream probes, when the run probes


@dataclass
class _Resume:
    """This rank's fetched share of the checkpoint a run resumes from."""
    source: str      # the checkpoint in storage (for messages)
    local: str       # the local copy of this rank's share (removed once restored)
    saved_world: int  # the workers that saved it (another count: the state is re-partitioned)


def train_worker(loop_config: dict) -> None:
    """One Ray Train worker: every stage from where the run stopped. A stage starts from
    the previous stage's last weights, gathered in memory from the engine that trained
    them (or from the checkpoint's engine, when the run resumes at a stage's end)."""
    cfg = from_dict(loop_config["config"]).validate()
    run_dir = loop_config["run_dir"]
    w = _start_worker(cfg, loop_config.get("verbose", False))
    lease = checkpoint.Lease(run_dir, token=loop_config["lease"]) if w.rank == 0 and loop_config.get("lease") else None
    ts, resume = _resume_point(cfg, run_dir, w)
    ok = False
    try:
        w.trackers = _open_trackers(cfg, run_dir, w, loop_config.get("tracker_env"))
        w.probes = _start_probes(cfg, w, ts, resume, loop_config.get("probe_task"))
        weights = None
        if resume and ts.stage_step == cfg.stages[ts.stage].steps:  # saved at a stage's end
            engine = _stage_engine(cfg, ts.stage, w, None, resume)
            weights = checkpoint.full_weights(engine) if ts.stage + 1 < len(cfg.stages) else None
            del engine
            ts.next_stage()
            resume = _drop(resume)
        for s in range(ts.stage, len(cfg.stages)):
            engine = _stage_engine(cfg, s, w, weights, resume)
            resume = _drop(resume)
            _train_stage(cfg, s, run_dir, w, ts, engine, lease, loop_config.get("budget"))
            weights = checkpoint.full_weights(engine) if s + 1 < len(cfg.stages) else None
            del engine
            ts.next_stage()
        if w.probes:
            _take_probes(cfg, run_dir, w, ts, wait=True)  # the last checkpoint's probe too
        if w.trackers:
            w.trackers.log_plot(ts.history)
        ok = True
    finally:
        _drop(resume)
        if w.trackers:
            w.trackers.close(ok)


def _open_trackers(cfg: PretrainConfig, run_dir: str, w: _Worker, env: dict | None):
    """Rank 0's MLflow / W&B runs (None when no such tracker is named, or on other ranks)."""
    from wr_train.tracking import Trackers, parse_report_to
    names = [n for n in parse_report_to(cfg.report_to) if n != "tensorboard"]
    if w.rank != 0 or not names:
        return None
    return Trackers(names, run_dir, cfg.name, to_dict(cfg), env).open()


def _start_probes(cfg: PretrainConfig, w: _Worker, ts: TrainState, resume: "_Resume | None",
                  task) -> "_Probes | None":
    """Rank 0's probes (None when the run does not probe, or on other ranks); a resumed
    checkpoint whose probe never landed (the run stopped first) is probed again."""
    if w.rank != 0 or not cfg.probe.task or task is None:
        return None
    probes = _Probes(cfg.probe, task, w.log)
    if resume and not any("probe_acc" in row for row in ts.history if row["step"] == ts.step):
        probes.add(resume.source, ts.step)
    return probes


def _drop(resume: "_Resume | None") -> None:
    """Remove a fetched share once the engine holds it (or on the way out)."""
    if resume is not None:
        shutil.rmtree(resume.local, ignore_errors=True)
    return None


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


def _resume_point(cfg: PretrainConfig, run_dir: str, w: _Worker) -> tuple[TrainState, _Resume | None]:
    """The newest checkpoint every rank fetched its share of intact, or the start."""
    found = checkpoint.fetch_share(run_dir, w.rank, w.log)
    if found is None:
        return TrainState(), None
    source, state, local, fetched = found
    total = sum(m["size"] for m in state["files"].values())
    saved = state["world_size"]
    if saved == w.world:
        w.log(f"resuming from {source} (stage {state['stage'] + 1}, step {state['step']}): each rank "
              f"fetched its share, rank 0 {fetched / 2**20:,.1f} MB of {total / 2**20:,.1f} MB")
    else:
        w.log(f"resumed step {state['step']:,} saved by {saved} worker{'s' * (saved > 1)} on {w.world} "
              f"(ZeRO-{state.get('zero_stage', state['config'].get('zero_stage'))} state re-partitioned): each rank fetched every "
              f"partition, {fetched / 2**20:,.1f} MB")
    # rank 0's history, with what its rows gained after the checkpoint was sealed (probes)
    history = []
    if w.rank == 0:
        history = checkpoint.with_late_keys(source, checkpoint.read_history(local), state["step"])
    ts = TrainState.of(state, history)
    return ts, _Resume(source, local, saved)


def _train_stage(cfg: PretrainConfig, s: int, run_dir: str, w: _Worker, at: TrainState, engine,
                 lease: "checkpoint.Lease | None", loop_budget: dict | None = None) -> None:
    """Stage `s` from `at` to its last step: step, report, evaluate and save on schedule."""
    import ray.train

    from wr_train.machine import peak_flops
    from wr_train.stream import RowStream, masked_batches
    stage = cfg.stages[s]
    manifest = load_manifest(stage.shards)
    stream = RowStream(stage.shards, manifest, seed=cfg.seed, stage=s, rank=w.rank, world=w.world,
                       global_batch=stage.global_batch, micro_batch=stage.micro_batch,
                       partitions=cfg.partitions, window=cfg.shuffle_window)
    if at.streams:  # a mid-stage resume: the place in the stage's order (the same on every rank)
        stream.load_state_dict(at.streams[0])
    batches = masked_batches(stream, seed=cfg.seed, vocab_size=manifest["vocab_size"], mask_cfg=cfg.mask,
                             pin=w.device.type == "cuda")
    held_out = eval_set(cfg, stage.shards, manifest, w.rank, w.world) if cfg.eval_rows else None
    if w.peak is None:
        w.peak = peak_flops(w.device, torch_dtype(cfg))
    accum = engine.gradient_accumulation_steps()
    split = (f"{stage.micro_batch} × {accum} accum × {w.world} workers"
             if stage.micro_batch * accum * w.world == stage.global_batch else
             f"{w.world} workers × ~{stage.global_batch / w.world:.0f} rows in {accum} micro-batches")
    w.log(f"stage {s + 1}/{len(cfg.stages)} {stage.name}: seq {manifest['seq_length']}, {stage.steps} steps, "
          f"global batch {stage.global_batch} = {split} from {len(stream.partitions)} partitions, "
          f"ZeRO-{engine.zero_optimization_stage()}, {resolve_precision(cfg)}, {w.device}")
    if cfg.eval_rows and held_out is None:
        w.log(f"no held-out rows in {stage.shards} (made with --heldout 0, or before it existed): "
              f"no evaluation")
    plan = _clock_plan(cfg, s, at, engine, stage, w, loop_budget)
    clock0 = time.time() - at.trained_s  # the run's trained seconds go on from the checkpoint's
    meter = _Meter(w.device)
    engine.train()
    while at.stage_step < stage.steps:
        meter.add(*train_step(engine, batches, w.device))
        at.stage_step += 1
        at.step += 1
        at.trained_s = time.time() - clock0
        if plan is not None:
            _follow_plan(plan, engine, stage, manifest, w, at)
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
            _save_and_report(engine, metrics, cfg, stream.state_dict(), run_dir, w, at)
            if w.probes:  # Ray has persisted it: a probe can read it
                w.probes.add(storage.join(run_dir, checkpoint.checkpoint_name(at.step)), at.step)
        else:
            ray.train.report(metrics)
        if w.trackers:
            w.trackers.log(metrics)
        if w.probes:
            _take_probes(cfg, run_dir, w, at)
        if lease is not None:
            lease.heartbeat()  # stops this run if another took its name
        meter.restart()  # evaluation and saving stay out of tok/s
    batches.close()


def _clock_plan(cfg: PretrainConfig, s: int, at: TrainState, engine, stage, w: _Worker, loop_budget: dict | None):
    """A wall-clock budget's plan for stage `s` (None without one, or once the stage's
    steps are fitted twice). Before its first fit a stage runs at least enough steps to
    measure."""
    from wr_train.budget import WARM_STEPS, ClockPlan, parse_budget, reshape_schedule
    budget = parse_budget(cfg.budget)
    if budget is None or not budget.seconds or at.fits >= 2:
        return None
    plan = ClockPlan(budget, loop_budget["shares"], s, at.fits)
    if at.fits == 0 and stage.steps < 3 * WARM_STEPS:
        stage.steps = 3 * WARM_STEPS
        reshape_schedule(engine.lr_scheduler, stage)
    return plan


def _follow_plan(plan, engine, stage, manifest: dict, w: _Worker, at: TrainState) -> None:
    """Measure, and when the plan is due fit the stage's steps to its deadline: rank 0's
    clock decides for all (every rank must stop at the same step)."""
    import torch.distributed as dist

    from wr_train.budget import reshape_schedule
    from wr_train.optim import schedule_points
    plan.observe(at.stage_step, at.trained_s)
    if not plan.due(at.stage_step):
        return
    fitted = [plan.fit(at.stage_step, at.trained_s)]
    dist.broadcast_object_list(fitted, src=0)  # rank 0's clock: every rank the same plan
    steps, per_step = fitted[0]
    plan.adopt(at.stage_step, steps)
    at.fits = plan.fits_done
    stage.steps = max(steps, at.stage_step + 1)
    reshape_schedule(engine.lr_scheduler, stage)
    tok_s = stage.global_batch * manifest["seq_length"] / max(per_step, 1e-9)
    _, decay_from, _ = schedule_points(stage)
    w.log(f"{_where(stage, at)} budget {plan.budget} ({plan.deadline:.0f}s of training to the end of "
          f"this stage): ~{stage.steps:,} steps at {tok_s:,.0f} tok/s, decay from step {decay_from:,}"
          f"{'' if plan.fits_done < 2 else ' (final)'}")


def _stage_engine(cfg: PretrainConfig, s: int, w: _Worker, weights: dict | None, resume: _Resume | None):
    """Stage `s`'s engine: restored from this rank's share of a checkpoint saved in this
    stage; else a fresh optimizer on the previous stage's weights (as the seed's recipe
    does), or on a fresh model."""
    from wr_train.model import build_mlm, fresh_mlm
    vocab = load_manifest(cfg.stages[s].shards)["vocab_size"]
    if resume or weights is not None:  # the weights come from the checkpoint / previous stage
        mlm = build_mlm(cfg.model, vocab, seed=cfg.seed)
    else:
        mlm = fresh_mlm(cfg.model, vocab, cfg.seed, cfg.stages[s].shards)
    if weights is not None:
        checkpoint.load_stage_weights(mlm, weights, f"stage {s} ({cfg.stages[s - 1].name})'s last weights")
        mlm.tie_weights()
    with hide_prints(w.verbose):
        engine = build_engine(cfg, cfg.stages[s], w.world, mlm)
    if resume:
        checkpoint.restore(engine, resume.local, w.rank, resume.saved_world, w.world)
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
                    w: _Worker, at: TrainState) -> dict:
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
        "workers": w.world, "trained_s": round(at.trained_s, 3),
        "time": time.time(),
    }
    eta = elapsed / steps * (stage.steps - at.stage_step)
    w.log(f"{_where(stage, at)} loss {metrics['loss']:.4f} acc {metrics['mlm_acc']:.3f} "
          f"lr {metrics['lr']:.2e} {tok_s:,.0f} tok/s mfu {metrics['mfu']:.1%} eta {eta:.0f}s")
    return metrics


def _eval_metrics(engine, held_out, stage, manifest: dict, w: _Worker, at: TrainState) -> dict:
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


def _save_and_report(engine, metrics: dict, cfg: PretrainConfig, stream_state: dict,
                     run_dir: str, w: _Worker, at: TrainState) -> None:
    """Every rank saves and hashes its files and reports them to Ray, which persists the
    checkpoint as checkpoint_step_NNNNNNN; once every rank's upload is done, rank 0
    rewrites the run's metrics.jsonl and TensorBoard files and rotates old checkpoints."""
    import ray.train
    import torch.distributed as dist
    stage = cfg.stages[at.stage]
    start = time.time()
    ckpt_dir = checkpoint.save(engine, cfg, at, stream_state, w.rank, w.world)
    written = time.time()
    try:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir),
                         checkpoint_dir_name=checkpoint.checkpoint_name(at.step))
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # Ray has persisted it (or failed to)
    dist.barrier()  # every rank's files are in storage
    metrics.update(save_s=round(time.time() - start, 3), save_write_s=round(written - start, 3))
    w.log(f"{_where(stage, at)} checkpoint saved: {storage.join(run_dir, checkpoint.checkpoint_name(at.step))} "
          f"({metrics['save_s']:.1f}s: {metrics['save_write_s']:.1f}s writing, "
          f"{metrics['save_s'] - metrics['save_write_s']:.1f}s upload)")
    if w.rank == 0:
        _write_run_metrics(cfg, run_dir, at)
        checkpoint.rotate(run_dir, cfg.keep_checkpoints, log=w.log)


def _write_run_metrics(cfg: PretrainConfig, run_dir: str, at: TrainState) -> None:
    """Rank 0: the run's metrics.jsonl and TensorBoard files, rewritten from the history."""
    storage.write_text(storage.join(run_dir, checkpoint.RUN_METRICS), history_jsonl(at.history))
    if "tensorboard" in cfg.report_to:
        write_tensorboard(at.history, storage.join(run_dir, "tensorboard"))


class _Probes:
    """Rank 0's downstream probes (wr_train.probe, which says why not Ray Train's
    validation hook), each a Ray task beside training: one runs at a time, and of the
    checkpoints saved meanwhile only the newest waits (an older one may be rotated away
    before its turn). The reports collect the results without waiting (the workers never
    wait for a probe); only the run's end waits for the last."""

    def __init__(self, cfg, task, log):
        import ray

        from wr_train.probe import probe_checkpoint
        self.cfg, self.log = cfg, log
        self.launch = ray.remote(probe_checkpoint).options(num_cpus=cfg.cpus, num_gpus=cfg.gpus, max_retries=0)
        self.task = ray.put(task)  # once, not with every probe
        self.running = None  # (its object ref, the checkpoint's step, when it started)
        self.waiting = None  # (the checkpoint's path, its step)

    def add(self, ckpt: str, step: int) -> None:
        if self.waiting:
            self.log(f"probe: step {self.waiting[1]} skipped (step {self.running[1]}'s probe was still "
                     f"running when step {step} was saved)")
        self.waiting = (ckpt, step)
        self._start_waiting()

    def _start_waiting(self) -> None:
        if self.running is None and self.waiting is not None:
            ckpt, step = self.waiting
            self.running = (self.launch.remote(ckpt, self.task, self.cfg), step, time.time())
            self.waiting = None

    def poll(self, wait: bool = False) -> list[dict]:
        """The results that have landed (a failed or timed-out probe: a line, no result);
        `wait`: every probe, running and waiting, to its end or its timeout."""
        import ray
        landed = []
        while self.running is not None:
            ref, step, started = self.running
            left = self.cfg.timeout_s - (time.time() - started)
            if wait and left > 0:
                self.log(f"probe: waiting for step {step}'s probe (at most {left:.0f}s more)")
            ready, _ = ray.wait([ref], timeout=max(0.0, left) if wait else 0)
            if ready:
                try:
                    landed.append(ray.get(ref))
                except Exception as e:  # a probe never stops training
                    self.log(f"probe: step {step} failed: {root_cause_line(e)}")
            elif left <= 0:
                ray.cancel(ref, force=True)
                self.log(f"probe: step {step} gave no result within probe.timeout_s={self.cfg.timeout_s:g}: "
                         f"cancelled (no room for its probe.cpus / probe.gpus?)")
            else:
                return landed
            self.running = None
            self._start_waiting()
        return landed


def _take_probes(cfg: PretrainConfig, run_dir: str, w: _Worker, at: TrainState, wait: bool = False) -> None:
    """Rank 0: the probe results that landed, each into its checkpoint's metrics row (next
    to its eval_loss), the console, the trackers, and the run's metrics files."""
    from wr_train.probe import probe_line
    landed = w.probes.poll(wait)
    for result in landed:
        row = next((r for r in reversed(at.history) if r["step"] == result["step"]), None)
        if row is not None:
            row.update({k: v for k, v in result.items() if k.startswith("probe_")})
        w.log(probe_line(result))
        if w.trackers:
            w.trackers.log_late({**result, "time": time.time()})
    if landed:
        _write_run_metrics(cfg, run_dir, at)


def _where(stage, at: TrainState) -> str:
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
                        "eval_loss", "eval_acc", "unigram_floor", "unigram_acc", "probe_acc", "probe_floor"):
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
        except (ShardError, storage.StorageError) as e:
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
        except (ShardError, storage.StorageError) as e:
            raise ConfigError(f"model.output_bias=unigram: {e}") from None
    try:
        check_installed(parse_report_to(cfg.report_to))
    except TrackingError as e:
        raise ConfigError(str(e)) from None
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
    if cfg.probe.data:
        cfg.probe.data = os.path.abspath(cfg.probe.data)
    return cfg


def run(cfg: PretrainConfig, log=_stderr_line, verbose: bool = False) -> str:
    """Train (or resume) the run STORAGE/NAME; returns the last checkpoint's path.
    Progress goes to stderr (the workers' lines too), so stdout can carry just the path."""
    cfg = with_absolute_paths(cfg)
    preflight(cfg)
    probe_task = _probe_task(cfg, log)
    budget = _plan_budget(cfg, log)
    run_dir = run_dir_of(cfg)
    try:
        storage.check_writable(run_dir)
    except storage.StorageError as e:
        raise ConfigError(f"--storage {cfg.storage}: {e}") from None
    with checkpoint.Lease(run_dir, log=log).held() as lease:  # one run per name
        return _fit(cfg, run_dir, lease, log, verbose, budget, probe_task)


def _probe_task(cfg: PretrainConfig, log):
    """The downstream probe's capped task (wr_train.probe), read here on the driver and
    handed to the probes; None when the run does not probe. Bad task data fails here."""
    if not cfg.probe.task:
        return None
    from wr_train.probe import capped_task, task_floor
    from wr_train.tasks import TaskError
    try:
        task = capped_task(cfg.probe)
    except TaskError as e:
        raise ConfigError(f"probe.task {cfg.probe.task} (probe.data {cfg.probe.data}): {e}") from None
    log(f"pretrain: probing each checkpoint on {task.name}: {len(task.train):,} train / {len(task.dev):,} "
        f"dev examples, {cfg.probe.epochs} epoch(s), lr {cfg.probe.lrs} (majority {task_floor(task):.1%})")
    return task


def _plan_budget(cfg: PretrainConfig, log) -> dict | None:
    """A budget's split over the stages (their shares of the recipe's tokens); a token
    budget sets the stages' steps here, a wall-clock one in the workers."""
    from wr_train.budget import parse_budget, stage_shares, token_steps
    budget = parse_budget(cfg.budget)
    if budget is None:
        return None
    seqs = [load_manifest(st.shards)["seq_length"] for st in cfg.stages]
    shares = stage_shares(cfg.stages, seqs)
    if budget.tokens:
        for st, steps in zip(cfg.stages, token_steps(cfg, budget, seqs)):
            st.steps = steps
        log(f"pretrain: budget {budget}: " + ", ".join(f"{st.name} {st.steps:,} steps" for st in cfg.stages))
    else:
        log(f"pretrain: budget {budget} of training: " + ", ".join(
            f"{st.name} {share:.0%}" for st, share in zip(cfg.stages, shares)) +
            "; each stage fits its steps to its share once it has measured its step time")
    return {"shares": shares, "clock": bool(budget.seconds)}


def _fit(cfg: PretrainConfig, run_dir: str, lease, log, verbose: bool, budget: dict | None = None,
         probe_task=None) -> str:
    """Check the resume, then train on Ray; returns the last checkpoint's path."""
    checkpoint.forget_ray_snapshot(run_dir, log=log)
    ckpt, state = latest_complete(run_dir, log=log)
    if state and budget and budget["clock"]:
        for i in range(min(state["stage"] + 1, len(cfg.stages))):  # the begun stages keep their plan
            cfg.stages[i].steps = state["config"]["stages"][i]["steps"]
    if state:
        check_resume(ckpt, state, cfg, log=log)
        log(f"pretrain: resuming {run_dir}: its newest complete checkpoint is step {state['step']} "
            f"(the workers check each file's hash as they fetch it)")
    import ray.train  # after the checks: bad input fails before seconds of imports
    from ray.train.torch import TorchTrainer
    ensure_ray(gpu=cfg.gpu, verbose=verbose)
    if probe_task is not None:
        _check_probe_room(cfg, log)
    fs, inner = storage.resolve(cfg.storage)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": run_dir, "verbose": verbose,
                           "lease": lease.token, "tracker_env": tracker_env(), "budget": budget,
                           "probe_task": probe_task},
        scaling_config=ray.train.ScalingConfig(
            # elastic: Ray restarts the group on the workers it can get (each restart resumes
            # from the last checkpoint, re-partitioned; the batches stay the recipe's)
            num_workers=(cfg.min_workers, cfg.workers) if 0 < cfg.min_workers < cfg.workers else cfg.workers,
            use_gpu=cfg.gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.gpu else {})}),
        run_config=ray.train.RunConfig(
            # checkpoints are kept and found by wr_train.checkpoint (rotate, complete_checkpoints)
            name=cfg.name, storage_path=inner, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            logging_config=train_logging_config(verbose)),
    )
    workers = f"{cfg.min_workers}-{cfg.workers}" if 0 < cfg.min_workers < cfg.workers else str(cfg.workers)
    log(f"pretrain: {cfg.model.size} model, {len(cfg.stages)} stage(s), {workers} worker(s) -> {run_dir}")
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; keep its last line
        raise RuntimeError(f"pretraining failed: {root_cause_line(e)}") from None
    last, _ = latest_complete(run_dir, log=log)
    final = last_eval(run_dir)
    if final:
        log(f"pretrain: step {final['step']} {eval_line(final)}")
    return last


def _check_probe_room(cfg: PretrainConfig, log) -> None:
    """A line when Ray has no room now for a probe beside the workers: each probe then
    waits for it (or an autoscaler adds it), at most probe.timeout_s."""
    import ray
    have = ray.cluster_resources()
    cpus = cfg.workers * cfg.cpus_per_worker + cfg.probe.cpus
    gpus = (cfg.workers if cfg.gpu else 0) + cfg.probe.gpus
    if (cfg.probe.cpus and have.get("CPU", 0) < cpus) or (cfg.probe.gpus and have.get("GPU", 0) < gpus):
        log(f"pretrain: Ray has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs now; the workers "
            f"and a probe ask for {cpus:g} and {gpus:g}: each probe waits for room, at most probe.timeout_s "
            f"{cfg.probe.timeout_s:g}s (probe.cpus=0 runs it on the workers' cores)")


def last_eval(run_dir: str) -> dict | None:
    """The run's last metrics row with a held-out evaluation (None if it has none)."""
    path = storage.join(run_dir, checkpoint.RUN_METRICS)
    if not storage.exists(path):
        return None
    rows = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    evals = [r for r in rows if "eval_loss" in r]
    return evals[-1] if evals else None
