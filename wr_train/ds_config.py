"""The DeepSpeed config a run trains with.

`build_ds_config`: the shipped (or the user's) DeepSpeed JSON with the recipe's precision,
batch, optimizer, clipping and ZeRO stage written into it. A user's file that switches on
another precision than the recipe's is refused (`check_ds_precision`); `preflight` builds
the config once on the driver, so a bad file fails there, not in a worker.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from wr_train.config import ConfigError, PretrainConfig, StageConfig, grad_accum


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
    """`auto`: bf16 where the hardware multiplies it (a GPU, a CPU with AMX), else fp32:
    emulated bf16 on other CPUs runs hundreds of times slower than fp32."""
    if cfg.precision != "auto":
        return cfg.precision
    from wr_train.machine import cpu_precision
    return "bf16" if cfg.gpu else cpu_precision("bf16")


def torch_dtype(cfg: PretrainConfig):
    """The torch dtype the recipe's precision computes in."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(cfg), torch.float32)


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
    accum = grad_accum(stage.global_batch, stage.micro_batch, world)
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
    if zero.get("stage", 0) == 0 and precision != "fp32":
        # Without ZeRO, DeepSpeed keeps the fp32 master weights only inside its optimizer
        # wrapper: the checkpoint's module (what export and the next stage read) is 16-bit.
        raise ConfigError(f"zero_stage 0 with precision {precision}: the checkpoint would keep only "
                          f"{precision} weights; use zero_stage 1-3 (ZeRO holds the fp32 master weights)")
    ds["train_micro_batch_size_per_gpu"] = stage.micro_batch
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = stage.micro_batch * accum * world
    ds["gradient_clipping"] = cfg.optim.clip
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": stage.lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
        # torch's AdamW needs no JIT build; CPU offload needs DeepSpeedCPUAdam. Fused (one pass
        # over p, grad and both moments, on CPU as on CUDA): 4x faster than torch's CPU default
        # (a loop of ~12 element-wise ops per tensor) at the same numbers; bench/RESULTS.md.
        **({} if offloads["offload_optimizer"] else {"torch_adam": True, "fused": True})}}
    # The schedule is build_engine's (HF's linear warmup + decay): DeepSpeed's WarmupDecayLR
    # runs one step behind it (its first two steps both at lr 0; tests/test_parity.py).
    ds.pop("scheduler", None)
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds


def cpu_supports_fp16() -> bool:
    """DeepSpeed's CPU accelerator takes fp16 only where oneDNN has fp16 kernels."""
    import torch
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False
