"""Masked-LM pretraining: a Ray Train TorchTrainer whose workers run DeepSpeed ZeRO.

Driver (`run`): validate the recipe and the shards, then `trainer.fit()`.
Worker (`train_worker`): for each stage from where the run stopped: build the model
(from the previous stage's weights), `deepspeed.initialize`, stream masked rows, step,
report metrics, and every `checkpoint_every` steps save a complete checkpoint that every
rank reports to. Re-running with the same storage and name resumes from the last
complete checkpoint, exactly (same data order, masks, dropout RNG, optimizer, schedule).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from wr_train import storage
from wr_train.checkpoint import CheckpointError, latest_complete
from wr_train.config import ConfigError, PretrainConfig, StageConfig, from_dict, grad_accum, to_dict
from wr_train.corpus import CorpusError, load_manifest
from wr_train.local_ray import ensure_ray, hide_prints, quiet_worker, train_logging_config

DS_TAG = "ds"  # DeepSpeed's sub-directory inside a checkpoint


# ---------------------------------------------------------------- DeepSpeed config

def load_ds_file(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.exists():
        shipped = resources.files("wr_train.ds_configs") / (name_or_path if name_or_path.endswith(".json")
                                                             else name_or_path + ".json")
        if not shipped.is_file():
            raise ConfigError(f"ds_config {name_or_path}: no such file or shipped config "
                              f"(zero1_bf16, zero2_bf16, zero3_bf16, zero2_fp16, zero3_offload_bf16, cpu_fp32)")
        path = Path(str(shipped))
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path}: not valid JSON ({e})") from None
    return {k: v for k, v in data.items() if not k.startswith("_")}


def resolve_precision(cfg: PretrainConfig) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if cfg.gpu else "fp32"


def ds_file_precision(ds: dict, name: str) -> str | None:
    """The precision a DeepSpeed JSON switches on: "bf16", "fp16", or None (it sets none)."""
    on = [p for p, keys in (("bf16", ("bf16", "bfloat16")), ("fp16", ("fp16",)))
          if any(isinstance(ds.get(k), dict) and ds[k].get("enabled") is True for k in keys)]
    if len(on) > 1:
        raise ConfigError(f"ds_config {name}: enables both bf16 and fp16; expected one of them")
    return on[0] if on else None


def check_ds_precision(cfg: PretrainConfig, ds: dict) -> None:
    """A user's ds_config that switches on a precision must agree with `precision`:
    the recipe's precision is what trains, and a file saying otherwise was meant."""
    wanted = ds_file_precision(ds, cfg.ds_config)
    precision = resolve_precision(cfg)
    if wanted and wanted != precision:
        means = f" (auto: {precision} on {'GPU' if cfg.gpu else 'CPU'})" if cfg.precision == "auto" else ""
        raise ConfigError(f"ds_config {cfg.ds_config}: enables {wanted}, but precision={cfg.precision}"
                          f"{means} trains {precision}; set precision={wanted} or use another ds_config")


def build_ds_config(cfg: PretrainConfig, stage: StageConfig, world: int) -> dict:
    """The shipped/named DeepSpeed JSON with the recipe's batch, optimizer and schedule."""
    ds = load_ds_file(cfg.ds_config or ("zero2_bf16" if cfg.gpu else "cpu_fp32"))
    if cfg.ds_config:  # the defaults are picked by device only; `precision` overrides theirs
        check_ds_precision(cfg, ds)
    accum = grad_accum(stage, world)
    precision = resolve_precision(cfg)
    ds["bf16"] = {"enabled": precision == "bf16"}
    fp16 = ds.get("fp16", {}) if precision == "fp16" else {}
    ds["fp16"] = {**{"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}, **fp16, "enabled": precision == "fp16"}
    ds["zero_optimization"] = {**ds.get("zero_optimization", {})}
    if not cfg.ds_config:
        ds["zero_optimization"]["stage"] = cfg.zero_stage
    zero = ds["zero_optimization"]
    offloads = {k: zero.get(k, {}).get("device") in ("cpu", "nvme")
                for k in ("offload_optimizer", "offload_param")}
    if world == 1 and not any(offloads.values()) and precision == "fp32":
        # One worker: ZeRO has nothing to partition, and its flat-buffer copies cost ~20%
        # of a CPU step (measured, bench/pretrain_throughput.py). Same math at stage 0.
        # bf16/fp16 keep their stage: ZeRO holds their fp32 master weights.
        zero["stage"] = 0
    ds["train_micro_batch_size_per_gpu"] = stage.micro_batch
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = stage.micro_batch * accum * world
    ds["gradient_clipping"] = cfg.optim.clip
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": stage.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
        # torch's AdamW (fused on CUDA) needs no JIT build; CPU offload needs DeepSpeedCPUAdam.
        **({} if offloads["offload_optimizer"] else {"torch_adam": True})}}
    # The schedule is build_engine's (HF's linear warmup + decay): DeepSpeed's WarmupDecayLR
    # runs one step behind it (its first two steps both at lr 0; tests/test_parity.py).
    ds.pop("scheduler", None)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- the worker loop

EVAL_MASK_SEED = 20_251_201  # one seed for every run: evaluations of all runs share targets
EVAL_MASK_PROB = 0.15        # BERT's token masking, whatever a recipe trains with: comparable runs


def build_engine(cfg: PretrainConfig, stage: StageConfig, world: int, mlm):
    """deepspeed.initialize on the sparse-head model with the recipe's DeepSpeed config and
    its schedule (lr_schedule)."""
    import deepspeed

    from wr_train.model import SparseMLM
    engine, _, _, _ = deepspeed.initialize(
        model=SparseMLM(mlm), model_parameters=param_groups(mlm, cfg.optim.weight_decay),
        config=build_ds_config(cfg, stage, world), lr_scheduler=lambda opt: lr_schedule(opt, stage))
    return engine


def lr_schedule(optimizer, stage: StageConfig):
    """Linear warmup over `warmup` of the steps, then linear decay to 0 over the last
    `decay` of them, constant in between. decay=1 is HF's get_linear_schedule_with_warmup
    (decay from the end of warmup on), step for step."""
    import torch
    total = stage.steps
    warm = max(1, int(stage.warmup * total))
    start = warm if stage.decay >= 1 else max(warm, total - max(1, int(stage.decay * total)))

    def factor(step: int) -> float:
        if step < warm:
            return step / warm
        if step < start:
            return 1.0
        return max(0.0, (total - step) / max(1, total - start))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(engine, batches, device) -> tuple:
    """One optimizer step over `gradient_accumulation_steps` MaskedBatch-es from `batches`.

    Returns (sums, targets, tokens): loss × targets and correct predictions summed on the
    device, and the target and non-pad token counts, which the host knew already (the
    masking thread's TargetLayout). Nothing is read back from the device: the loop reads
    the sums once per report (tests/test_host_reads.py holds it to that)."""
    import torch
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    targets = tokens = 0
    for _ in range(engine.gradient_accumulation_steps()):
        batch = next(batches)
        layout = batch.layout.to(device)
        loss, correct, n = engine(batch.ids.to(device, non_blocking=True), None, layout)
        engine.backward(loss)
        engine.step()
        sums += torch.stack([loss.detach().double() * n, correct.double()])
        targets, tokens = targets + n, tokens + layout.tokens
    return sums, targets, tokens


def eval_set(cfg: PretrainConfig, shards: str, manifest: dict, rank: int, world: int):
    """This rank's share of the held-out rows, masked once with the fixed eval seed and
    BERT's 15%, every target replaced by [MASK]: (input_ids, labels), the same targets at
    every evaluation of every run (whatever masking the recipe trains with). Every rank gets
    the same number of rows (ZeRO-3 needs the same forward calls on every rank)."""
    from wr_train.corpus import read_eval_rows
    from wr_train.masking import IGNORE, mask_batch
    from wr_train.tokenizer import MASK
    row_ids, rows = read_eval_rows(shards, manifest, cfg.eval_rows)
    n = len(rows) // world * world
    if n == 0:
        return None
    row_ids, rows = row_ids[:n][rank::world], rows[:n][rank::world]
    ids, labels = mask_batch(rows, row_ids, epoch=0, seed=EVAL_MASK_SEED,
                             vocab_size=manifest["vocab_size"], prob=EVAL_MASK_PROB)
    # Every target shown as [MASK], as fill-mask sees it: then a model that ignores the
    # context cannot beat the unigram floor. Under BERT's 80/10/10 the 10% unchanged
    # targets let a context-blind model copy its input and score ~0.6 nats below the
    # floor (measured on the demo model: 1.8 nats on those, 8.0 on [MASK] vs floor 7.97).
    ids[labels != IGNORE] = MASK
    return ids, labels


def evaluate(engine, data, micro_batch: int, device):
    """(loss × targets, correct, targets) over this rank's eval rows, dropout off."""
    import torch
    from wr_train.model import TargetLayout
    ids, labels = data
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    targets = 0
    engine.eval()
    with torch.no_grad():
        for i in range(0, len(ids), micro_batch):
            layout = TargetLayout.of(ids[i:i + micro_batch], labels[i:i + micro_batch]).to(device)
            loss, correct, n = engine(torch.from_numpy(ids[i:i + micro_batch]).to(device), None, layout)
            sums += torch.stack([loss.double() * n, correct.double()])
            targets += n
    engine.train()
    return torch.cat([sums, torch.tensor([float(targets)], dtype=torch.float64, device=device)])


def eval_line(metrics: dict) -> str:
    """`eval loss 7.12 (unigram floor 7.99) acc 14.0% (floor 7.2%)`"""
    floor = metrics.get("unigram_floor")
    text = f"eval loss {metrics['eval_loss']:.3f}"
    text += f" (unigram floor {floor:.3f})" if floor is not None else ""
    text += f" acc {metrics['eval_acc']:.1%}"
    text += f" (floor {metrics['unigram_acc']:.1%})" if floor is not None else ""
    return text


def train_worker(loop_config: dict) -> None:
    cfg = from_dict(loop_config["config"]).validate()
    if not cfg.gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    verbose = loop_config.get("verbose", False)
    quiet_worker(verbose)
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from wr_train.model import build_mlm, flops_per_token, keep_freed_memory, peak_flops
    from wr_train.stream import RowStream, masked_batches
    keep_freed_memory()  # big per-step CPU tensors reuse memory instead of fresh pages

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    run_dir = loop_config["run_dir"]
    log = _stderr_line if rank == 0 else (lambda *a, **k: None)

    resume_dir, state, local_resume = _fetch_latest(run_dir, rank, log)
    if state and state["world_size"] != world:
        raise CheckpointError(
            f"{resume_dir}: saved by {state['world_size']} workers, this run has {world}; "
            f"resume with --workers {state['world_size']} (data positions are per worker)")
    if state:
        log(f"resuming from {resume_dir} (stage {state['stage']}, step {state['step']})")
    history = read_history(local_resume) if (state and rank == 0) else []
    start_stage = state["stage"] if state else 0
    stage_step = state["stage_step"] if state else 0
    positions = state["positions"] if state else None
    global_step = state["step"] if state else 0
    if state and stage_step == cfg.stages[start_stage].steps:  # resumed at a stage's end
        start_stage, stage_step, positions = start_stage + 1, 0, None
    weights_from = local_resume  # a local copy holding the next stage's starting weights
    weights_src = resume_dir     # ... of this checkpoint in storage (for errors)

    peak = None
    for s in range(start_stage, len(cfg.stages)):
        stage = cfg.stages[s]
        manifest = load_manifest(stage.shards)
        vocab, seq = manifest["vocab_size"], manifest["seq_length"]
        mlm = build_mlm(cfg.model, vocab, seed=cfg.seed)
        mid_stage = state is not None and s == start_stage and stage_step > 0
        if weights_from and not mid_stage:
            # A new stage starts from the last weights (fp32, gathered from any ZeRO stage)
            # with a fresh optimizer and schedule, as the seed's recipe does.
            load_stage_weights(mlm, fp32_weights(weights_from), weights_src)
            mlm.tie_weights()
        with hide_prints(verbose):
            engine = build_engine(cfg, stage, world, mlm)
        if mid_stage:
            engine.load_checkpoint(local_resume, tag=DS_TAG)
            rng = torch.load(os.path.join(local_resume, "rng", f"rank_{rank}.pt"), weights_only=False)
            torch.set_rng_state(rng["cpu"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        else:
            stage_step = 0
        stream = RowStream(stage.shards, manifest, seed=cfg.seed, stage=s, rank=rank, world=world,
                           micro_batch=stage.micro_batch, window=cfg.shuffle_window,
                           consumed=positions[rank] if (mid_stage and positions) else 0)
        batches = masked_batches(stream, seed=cfg.seed, vocab_size=vocab, mask_cfg=cfg.mask,
                                 pin=device.type == "cuda")
        held_out = eval_set(cfg, stage.shards, manifest, rank, world) if cfg.eval_rows else None
        floor = manifest.get("unigram") or {}
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg), torch.float32)
        if peak is None:
            peak = peak_flops(device, dtype)
        log(f"stage {s + 1}/{len(cfg.stages)} {stage.name}: seq {seq}, {stage.steps} steps, global batch "
            f"{stage.global_batch} = {stage.micro_batch} × {engine.gradient_accumulation_steps()} accum × "
            f"{world} workers, ZeRO-{engine.zero_optimization_stage()}, {resolve_precision(cfg)}, {device}")
        if cfg.eval_rows and held_out is None:
            log(f"no held-out rows in {stage.shards} (made with --heldout 0, or before it existed): "
                f"no evaluation")
        totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss·n, correct: read at reports
        counts = [0, 0]  # targets, non-pad tokens: known on the host
        t_last, steps_since = time.time(), 0
        engine.train()
        while stage_step < stage.steps:
            sums, n_targets, n_tokens = train_step(engine, batches, device)
            totals += sums
            counts = [counts[0] + n_targets, counts[1] + n_tokens]
            stage_step += 1
            global_step += 1
            steps_since += 1
            if global_step == cfg.fail_at_step:
                _inject_failure_once(run_dir, rank, global_step)
            save = stage_step % cfg.checkpoint_every == 0 or stage_step == stage.steps
            if not (save or stage_step % cfg.report_every == 0):
                continue
            report = torch.cat([totals, torch.tensor(counts, dtype=torch.float64, device=device)])
            dist.all_reduce(report)
            loss_sum, correct_sum, targets, tokens = report.tolist()  # the one device read per report
            elapsed = time.time() - t_last
            tok_s = tokens / max(elapsed, 1e-9)
            mask_frac = targets / max(tokens, 1)
            metrics = {
                "step": global_step, "stage": s, "stage_step": stage_step,
                "loss": loss_sum / max(targets, 1), "mlm_acc": correct_sum / max(targets, 1),
                "lr": float(engine.get_lr()[0]), "tokens_per_s": tok_s,
                "mfu": tok_s * flops_per_token(cfg.model, vocab, seq, mask_frac) / (peak * world),
                "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                "time": time.time(),
            }
            eta = elapsed / steps_since * (stage.steps - stage_step)
            log(f"[{stage.name}] step {stage_step}/{stage.steps} loss {metrics['loss']:.4f} "
                f"acc {metrics['mlm_acc']:.3f} lr {metrics['lr']:.2e} {tok_s:,.0f} tok/s "
                f"mfu {metrics['mfu']:.1%} eta {eta:.0f}s", flush=True)
            if save and held_out is not None:
                ev = evaluate(engine, held_out, stage.micro_batch, device)
                dist.all_reduce(ev)
                e_loss, e_correct, e_targets = ev.tolist()
                metrics.update(eval_loss=e_loss / max(e_targets, 1), eval_acc=e_correct / max(e_targets, 1),
                               eval_targets=int(e_targets))
                if floor:
                    metrics.update(unigram_floor=floor["entropy"], unigram_acc=floor["top_fraction"])
                log(f"[{stage.name}] step {stage_step}/{stage.steps} {eval_line(metrics)}")
            history.append(metrics)
            totals.zero_()
            counts = [0, 0]
            if save:
                ckpt_dir = _save_checkpoint(engine, cfg, stage, s, stage_step, global_step,
                                            stream.consumed, history, rank, world)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(ckpt_dir))
                shutil.rmtree(ckpt_dir, ignore_errors=True)  # Ray has persisted it
                log(f"[{stage.name}] step {stage_step}/{stage.steps} checkpoint saved (global step "
                    f"{global_step}) in {run_dir}")
                if rank == 0:
                    storage.write_text(storage.join(run_dir, "metrics.jsonl"), _jsonl(history))
                    write_tensorboard(history, storage.join(run_dir, "tensorboard"))
            else:
                ray.train.report(metrics)
            t_last, steps_since = time.time(), 0  # evaluation and saving stay out of tok/s
        batches.close()
        del engine
        stage_step, positions = 0, None
        if s + 1 < len(cfg.stages):
            # Each rank wrote only its own shard files; the next stage's weights come from
            # the merged checkpoint in storage, once every rank's upload is done.
            dist.barrier()
            if weights_from:
                shutil.rmtree(weights_from, ignore_errors=True)
            weights_src, _, weights_from = _fetch_latest(run_dir, rank, log)
    if weights_from:
        shutil.rmtree(weights_from, ignore_errors=True)


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


def _fetch_latest(run_dir: str, rank: int, log):
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


def _save_checkpoint(engine, cfg, stage, s, stage_step, global_step, consumed,
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
            f.write(_jsonl(history))
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


def _inject_failure_once(run_dir: str, rank: int, step: int) -> None:
    """A drill: rank 0 dies at `step` the first time only (a marker in the run dir)."""
    marker = storage.join(run_dir, f".injected-failure-{step}")
    if rank == 0 and not storage.exists(marker):
        storage.write_text(marker, "1")
        raise RuntimeError(f"injected failure at step {step} (fail_at_step)")


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


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# ---------------------------------------------------------------- the driver

def preflight(cfg: PretrainConfig) -> None:
    """Every check that can fail before a worker starts, each a one-line error."""
    cfg.validate()
    vocab = sha = None
    for i, st in enumerate(cfg.stages):
        try:
            m = load_manifest(st.shards)
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
    ds = build_ds_config(cfg, cfg.stages[0], cfg.workers)  # a bad ds_config fails here, not in a worker
    if ds["fp16"]["enabled"] and not cfg.gpu and not cpu_supports_fp16():
        raise ConfigError("precision fp16: this CPU has no fp16 kernels (DeepSpeed refuses it); "
                          "use fp32 or bf16 on CPU, fp16 on GPUs")


def cpu_supports_fp16() -> bool:
    """DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels."""
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


# What a resumed run must keep from the run that saved the checkpoint: the data order and
# the masks are pure functions of the seed, the window and the mask settings, and the saved
# weights and optimizer states fit only the model they were saved from.
# key -> the value a checkpoint saved before the key existed stands for.
RESUME_KEYS = {
    "seed": None, "shuffle_window": 1,  # runs before the window read 1 group at a time
    "mask.prob": None, "mask.span": None, "mask.span_p": None, "mask.span_max": None,
    "model.size": None, "model.layers": None, "model.hidden": None, "model.heads": None,
    "model.ffn": None, "model.max_positions": None, "model.vocab_size": None,
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
        raise RuntimeError(f"pretraining failed: {_root_cause(e)}") from None
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


def _root_cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    for line in reversed(text):
        if "Error" in line and ":" in line:
            return line.strip()
    return text[-1] if text else type(e).__name__
