"""A checkpoint's weights and optimizer on another number of workers (an elastic resume).

ZeRO-1/2 save each rank's partition of flat fp32 buffers (master weights, Adam's moments)
with a map of the parameter fragments it holds; ZeRO-3 saves each rank's 1/W slice of every
parameter (padded), one flat buffer per group, the layout DeepSpeed's zero_to_fp32 reads; a
one-worker fp32 run (ZeRO-0) saves plain torch state. `gather` rebuilds every parameter's
full fp32 weight, exp_avg and exp_avg_sq from all of a checkpoint's files; `load` writes
them into a live engine of any world size and ZeRO stage, each rank into its own partition
(DeepSpeed's fragment maps at ZeRO-1/2, its `set_local_hp_param` at ZeRO-3), with the
schedule, step counters and loss scale. The numbers are the saved ones, only cut
differently: a resumed run continues as the uninterrupted one would (tests/test_elastic.py).
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
    plain = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    model_states = _load(plain if os.path.exists(plain)
                         else os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt"))  # ZeRO-3
    files = sorted(glob.glob(os.path.join(tag_dir, "zero_pp_rank_*_mp_rank_00_optim_states.pt")),
                   key=lambda f: int(os.path.basename(f).split("_")[3]))
    if not files:
        return _gather_plain(model_states, group_names)
    ranks = [_load(f)["optimizer_state_dict"] for f in files]
    if "fp32_flat_groups" in ranks[0]:
        return _gather_zero3(model_states, ranks)
    if "param_slice_mappings" not in ranks[0]:
        raise ReshardError(f"{tag_dir}: ZeRO partitions without DeepSpeed's fragment map cannot be "
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


def _gather_zero3(model_states: dict, ranks: list[dict]) -> Gathered:
    """ZeRO-3: rank r holds elements [r·k, (r+1)·k) of every parameter (k = ceil(numel/W),
    the last rank's slice padded), the parameters' slices back to back in each rank's flat
    buffers, groups in order."""
    import torch
    world = len(ranks)
    flats = {"fp32": [torch.cat(r["fp32_flat_groups"]) for r in ranks]}
    for k in MOMENTS:
        flats[k] = [torch.cat([r["optimizer_state_dict"]["state"][g][k]
                               for g in sorted(r["optimizer_state_dict"]["state"])]) for r in ranks]
    state0 = ranks[0]["optimizer_state_dict"]["state"]
    step = float(state0[min(state0)]["step"]) if state0 else 0.0
    params, at = {}, 0
    for group in model_states["param_shapes"]:
        for name, shape in group.items():
            n = shape.numel()
            k = -(-n // world)
            params[name] = {key: torch.cat([f[at:at + k] for f in flat])[:n].view(shape).float()
                            for key, flat in flats.items()}
            at += k
    return Gathered(params, step, model_states, ranks[0], world)


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
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        _load_zero3(opt, engine, g)
    else:
        with torch.no_grad():
            for name, p in engine.module.named_parameters():
                p.data.copy_(g.params[name]["fp32"].to(p.dtype))
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
    for part in opt.single_partition_of_fp32_groups:
        _adam_state(base, part, g.step)
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
    _loss_scale(opt, g)


def _load_zero3(opt, engine, g: Gathered) -> None:
    """ZeRO-3: each parameter's slice of this rank into DeepSpeed's `set_local_hp_param`
    (no collective); the 16-bit partitions follow the fp32 ones."""
    import torch
    for part in opt.fp32_partitioned_groups_flat:
        _adam_state(opt.optimizer, part, g.step)
    rank, world = engine.global_rank, engine.world_size
    with torch.no_grad():
        for name, p in engine.module.named_parameters():
            k = p.ds_tensor.numel()  # this rank's slice: elements [rank·k, (rank+1)·k), the last padded
            for key in ("fp32", *MOMENTS):  # (DeepSpeed's set_full_hp_param misses that padding)
                whole = torch.nn.functional.pad(g.params[name][key].flatten(), (0, k * world - p.ds_numel))
                opt.set_local_hp_param(whole[rank * k:(rank + 1) * k], p, None if key == "fp32" else key)
        for lp, hp in zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat):
            if lp.data_ptr() != hp.data_ptr():
                lp.data.copy_(hp.data)
    _loss_scale(opt, g)


def _adam_state(base, part, step: float) -> dict:
    """Adam's state of one flat partition, made as its first step makes it if no step has
    been taken yet (step on the partition's device, as fused Adam wants), at `step`."""
    import torch
    state = base.state[part]
    if "exp_avg" not in state:
        state.update(step=torch.zeros((), dtype=torch.float32, device=part.device),
                     **{m: torch.zeros_like(part) for m in MOMENTS})
    state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step
    return state


def _loss_scale(opt, g: Gathered) -> None:
    """fp16's dynamic loss scale, as rank 0 saved it."""
    for key in ("loss_scaler", "dynamic_loss_scale", "overflow"):
        if g.zero and key in g.zero and hasattr(opt, key):
            setattr(opt, key, g.zero[key])


def _load_plain(opt, engine, g: Gathered) -> None:
    """ZeRO-0 (one fp32 worker): torch AdamW's state dict, numbered as its groups are."""
    import torch
    names = [n for group in group_names(engine) for n in group]
    state = {i: {"step": torch.tensor(g.step), **{m: g.params[n][m] for m in MOMENTS}}
             for i, n in enumerate(names)}
    sd = opt.state_dict()
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
