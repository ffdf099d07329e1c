"""A checkpoint's weights and optimizer on another number of workers (an elastic resume).

ZeRO-1/2 save each rank's partition of flat fp32 buffers (master weights, Adam's moments)
with a map of the parameter fragments it holds; a one-worker fp32 run (ZeRO-0) saves plain
torch state. `gather` rebuilds every parameter's full fp32 weight, exp_avg and exp_avg_sq
from all of a checkpoint's files; `load` writes them into a live engine of any world size,
each rank into its own partition, with the schedule, step counters and loss scale. The
numbers are the saved ones, only cut differently: a resumed run continues as the
uninterrupted one would (tests/test_elastic.py). ZeRO-3 keeps a different layout and is
refused (checkpoint.check_resume).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass

MOMENTS = ("exp_avg", "exp_avg_sq")


class ReshardError(ValueError):
    pass


@dataclass
class Gathered:
    """Everything a checkpoint's ranks held, whole: {name: {"fp32", "exp_avg", "exp_avg_sq"}}."""
    params: dict
    step: float                 # Adam's step count
    model_states: dict          # DeepSpeed's mp_rank_00 file: schedule, step counters
    zero: dict | None           # rank 0's ZeRO optimizer state dict (loss scale), None at ZeRO-0
    world: int


def _load(path: str) -> dict:
    import torch
    # DeepSpeed's own files, hash-checked against state.json before this reads them
    return torch.load(path, map_location="cpu", weights_only=False)


def gather(tag_dir: str, group_names: list[list[str]]) -> Gathered:
    """Every parameter whole from all ranks' files in `tag_dir` (DeepSpeed's folder of a
    local checkpoint copy). `group_names`: the parameter names of each optimizer group in
    order (what a ZeRO-0 torch state dict numbers)."""
    model_states = _load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"))
    files = sorted(glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_00_optim_states.pt")),
                   key=lambda f: int(os.path.basename(f).split("_")[3]))
    if not files:
        return _gather_plain(model_states, group_names)
    ranks = [_load(f)["optimizer_state_dict"] for f in files]
    if int(ranks[0].get("zero_stage", 0)) > 2 or "param_slice_mappings" not in ranks[0]:
        raise ReshardError(f"{tag_dir}: ZeRO-{int(ranks[0].get('zero_stage', 3))} partitions cannot be "
                           f"re-partitioned; resume with the worker count that saved them")
    shapes = {n: s for group in model_states["param_shapes"] for n, s in group.items()}
    pieces: dict = {n: {k: [] for k in ("fp32", *MOMENTS)} for n in shapes}
    step = 0.0
    for sd in ranks:  # rank order: each parameter's fragments in order
        for g, mapping in enumerate(sd["param_slice_mappings"]):
            flat = sd["single_partition_of_fp32_groups"][g]
            state = sd["base_optimizer_state"]["state"].get(g, {})
            step = float(state.get("step", step))
            for name, at in mapping.items():
                cut = slice(at.start, at.start + at.numel)
                pieces[name]["fp32"].append(flat[cut])
                for k in MOMENTS:
                    pieces[name][k].append(state[k][cut] if k in state else flat.new_zeros(at.numel))
    import torch
    params = {n: {k: torch.cat(v).view(shapes[n]).float() for k, v in pieces[n].items()} for n in shapes}
    return Gathered(params, step, model_states, ranks[0], len(files))


def _gather_plain(model_states: dict, group_names: list[list[str]]) -> Gathered:
    """A ZeRO-0 checkpoint: the module's weights and torch AdamW's own state dict."""
    opt = model_states["optimizer"]
    names = [n for group in group_names for n in group]
    params, step = {}, 0.0
    for i, name in enumerate(names):
        state = opt["state"].get(i, {})
        weight = model_states["module"][name].float()
        params[name] = {"fp32": weight, **{k: state[k].float() if k in state else weight.new_zeros(weight.shape)
                                           for k in MOMENTS}}
        step = float(state.get("step", step))
    return Gathered(params, step, model_states, None, 1)


def group_names(engine) -> list[list[str]]:
    """The engine's parameter names by optimizer group, in the order optim.param_groups makes."""
    from wr_train.optim import param_groups
    name_of = {id(p): n for n, p in engine.module.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in param_groups(engine.module, 0.0)]


def load(engine, g: Gathered) -> None:
    """Write the gathered state into this rank's engine (every rank calls it)."""
    import torch
    if hasattr(next(engine.module.parameters()), "ds_id"):
        raise ReshardError("ZeRO-3 engines cannot take a re-partitioned state; resume with the "
                           f"worker count that saved it ({g.world})")
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            p.data.copy_(g.params[name]["fp32"].to(p.dtype))
    opt = engine.optimizer
    if hasattr(opt, "single_partition_of_fp32_groups"):
        _load_zero(opt, engine, g)
    else:
        _load_plain(opt, engine, g)
    sched = engine.lr_scheduler
    sched.load_state_dict(g.model_states["lr_scheduler"])
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr  # the scheduler sets it at its next step; the optimizer steps first
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if key in g.model_states:
            setattr(engine, key, g.model_states[key])


def _load_zero(opt, engine, g: Gathered) -> None:
    """ZeRO-1/2: each parameter fragment this rank holds (DeepSpeed's `_hp_mapping`: where
    in the parameter, where in this rank's flat partition) gets its slice of the whole."""
    import torch
    base = opt.optimizer
    for k, part in enumerate(opt.single_partition_of_fp32_groups):
        state = base.state[part]
        if not state:  # no step taken yet: Adam's state as its first step makes it
            state.update(step=torch.zeros((), dtype=torch.float32, device=part.device),  # fused Adam: on the device
                         **{m: torch.zeros_like(part) for m in MOMENTS})
        state["step"] = torch.full_like(state["step"], g.step) if torch.is_tensor(state["step"]) else g.step
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            frag = getattr(p, "_hp_mapping", None)
            if frag is None:
                continue  # held by other ranks
            lp, hp = frag.lp_fragment_address, frag.hp_fragment_address
            part = opt.single_partition_of_fp32_groups[frag.param_group_index]
            state = base.state[part]
            for key, dest in (("fp32", part), *((m, state[m]) for m in MOMENTS)):
                src = g.params[name][key].reshape(-1)[lp.start:lp.start + lp.numel]
                dest.narrow(0, hp.start, hp.numel).copy_(src)
    if g.zero:
        for key in ("loss_scaler", "dynamic_loss_scale", "overflow"):
            if key in g.zero and hasattr(opt, key):
                setattr(opt, key, g.zero[key])


def _load_plain(opt, engine, g: Gathered) -> None:
    """ZeRO-0 (one fp32 worker): torch AdamW's state dict, numbered as its groups are."""
    import torch
    names = [n for group in group_names(engine) for n in group]
    state = {i: {"step": torch.tensor(g.step), **{m: g.params[n][m] for m in MOMENTS}}
             for i, n in enumerate(names)}
    sd = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
