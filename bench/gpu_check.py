"""One prepared GPU check (issue 14, part 4): wr-train's worker step on one GPU beside the
plain HF loop, then the gpu-marked tests that need no Ray. Start it with

    bash bench/gpu_check.sh [--dry-run] [OUT]

which calls the subcommands below in order:

    install --wheels DIR --site DIR   install from DIR the prepared wheels this box lacks
                                      (stdlib and `packaging` only: nothing heavy imported)
    run OUT [--dry-run]               the measurements; OUT gets gpu_check.md and .json
    pytest RESULT.json FILE...        (internal) pytest -m gpu, tests needing Ray deselected

`run` measures outside Ray, in DeepSpeed's single-process environment (RANK=0,
WORLD_SIZE=1, deepspeed.init_distributed), with the project's own pieces: rows packed by
`packing.pack_rows` from a synthetic corpus (random token "sentences", no downloads),
masked by `stream.masked_batches` (the worker's masking thread, pre-collected so the
timing holds the step alone; the thread's own rate is reported beside the step's), the
engine from `engine.build_engine` (the recipe's DeepSpeed config, bf16, ZeRO-1 or ZeRO-2)
stepped by `engine.train_step`. The HF loop:
`BertForMaskedLM` (SDPA attention) in bf16 autocast computing full-vocab logits with
labels, fused torch AdamW, gradient clipping at 1.0 (as the DeepSpeed config clips).
tokens/s counts non-pad tokens. MFU = tokens/s x `model.flops_per_token` (the FLOPs the
sparse model needs per token; the same count for both loops, so MFU ratios are tokens/s
ratios) over the dense bf16 peak of the card's spec sheet (`machine.GPU_PEAK_BF16`, the
measured matmul rate where the card is not listed), and over the measured rate beside it.

`--dry-run` runs the same path on a CPU (tiny model for every config, short rows, small
vocab, a few steps; DS_ACCELERATOR=cpu, gloo, bf16 so that ZeRO keeps its stage).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, model size, seq, micro batch): the most important first, in case the window ends
CONFIGS = [("base-128", "base", 128, 128), ("tiny-128", "tiny", 128, 128), ("base-512", "base", 512, 32)]
ZERO_STAGES = (1, 2)
VOCAB = 100_000
TARGET_MFU, TARGET_RATIO = 0.40, 2.5   # issue 14: BERT-base bf16 at seq 128 on H100/H200
DRY = {"size": "tiny", "seq": {128: 32, 512: 64}, "batch": 4, "vocab": 1000, "steps": 3, "warmup": 1}


# ------------------------------------------------------------------ install

def _canonical(name: str) -> str:
    return "-".join(part for part in name.lower().replace("_", "-").replace(".", "-").split("-") if part)


def _wheel_info(path: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) read from a wheel's METADATA."""
    import email.parser
    import zipfile
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8"), headersonly=True)
    return _canonical(msg["Name"]), msg["Version"], msg.get_all("Requires-Dist") or []


def _installed(name: str) -> str | None:
    import importlib.metadata
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_plan(wheels: dict[str, tuple[str, Path, list[str]]], roots=("deepspeed",)):
    """Which prepared wheels to install: a wheel goes in where the box lacks its package or
    has a version that a requirement excludes, and its own requirements are then checked
    the same way. Returns (chosen {name: (path, why)}, unmet requirement lines)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # no resolver: every wheel whose package the box lacks
        return ({n: (p, "missing on the box") for n, (v, p, _) in wheels.items() if _installed(n) is None}, [])
    chosen, unmet, todo = {}, [], [Requirement(r) for r in roots]
    while todo:
        req = todo.pop(0)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _canonical(req.name)
        if name in chosen:
            if not req.specifier.contains(wheels[name][0], prereleases=True):
                unmet.append(f"{req} (the prepared wheel is {wheels[name][0]})")
            continue
        have = _installed(name)
        if have is not None and req.specifier.contains(have, prereleases=True):
            continue  # the box's own
        if name in wheels and req.specifier.contains(wheels[name][0], prereleases=True):
            chosen[name] = (wheels[name][1], f"box has {have}" if have else "missing on the box")
            todo.extend(Requirement(r) for r in wheels[name][2])
        else:
            unmet.append(f"{req} (box has {have or 'none'}, no prepared wheel fits)")
    return chosen, unmet


def cmd_install(args) -> int:
    wheel_dir, site = Path(args.wheels), Path(args.site)
    found = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    wheels = {}
    for path in found:
        name, version, requires = _wheel_info(path)
        wheels[name] = (version, path, requires)
    chosen, unmet = install_plan(wheels)
    print(f"install: {len(found)} prepared wheel(s) in {wheel_dir}; "
          + (f"installing {len(chosen)} into {site}:" if chosen else "nothing to install (the box has what deepspeed needs)"))
    for name, (path, why) in chosen.items():
        print(f"  {path.name} ({why})")
    for line in unmet:
        print(f"  warning: unmet requirement {line}")
    if chosen and not args.plan:
        site.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(site),
               *[str(p) for p, _ in chosen.values()]]
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"install: pip failed (exit {rc})")
            return rc
    if _installed("deepspeed") is None and "deepspeed" not in chosen:
        print(f"install: deepspeed is not installed and {wheel_dir} has no wheel for it: run "
              f"`bash bench/prepare_gpu_wheels.sh` on a machine with PyPI and carry {wheel_dir}")
        return 2
    return 0


# ------------------------------------------------------------------ pytest

def cmd_pytest(args) -> int:
    """pytest -m gpu on the given files, tests that need a Ray cluster deselected; the
    outcome of each test goes to args.result (JSON)."""
    import pytest
    outcomes: dict[str, str] = {}
    deselected: list[str] = []

    class NoRay:
        def pytest_collection_modifyitems(self, config, items):
            keep = [it for it in items if "ray_local" not in getattr(it, "fixturenames", ())]
            drop = [it for it in items if it not in keep]
            deselected.extend(it.nodeid for it in drop)
            if drop:
                items[:] = keep
                config.hook.pytest_deselected(items=drop)

        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                if report.outcome == "failed" and report.when != "call":
                    outcomes[report.nodeid] = "error"
                elif report.nodeid not in outcomes or outcomes[report.nodeid] == "passed":
                    outcomes[report.nodeid] = report.outcome

    rc = int(pytest.main(["-q", "-rA", "-p", "no:cacheprovider", "-m", "gpu", *args.files], plugins=[NoRay()]))
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "error", "skipped")}
    Path(args.result).write_text(json.dumps({"exit_code": rc, "counts": counts, "tests": outcomes,
                                             "deselected_need_ray": deselected}, indent=1))
    return rc


def run_tests(deadline: float, env: dict) -> dict:
    import importlib.util
    if importlib.util.find_spec("pytest") is None:
        return {"skipped": "pytest is not installed on this box: the gpu-marked tests did not run"}
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text(encoding="utf-8"))
    left = deadline - time.time()
    if left < 20:
        return {"skipped": f"only {max(left, 0):.0f} s of the time budget left: the gpu-marked tests did not run"}
    result = Path(os.environ.get("TMPDIR", "/tmp")) / f"wr-gpu-check-pytest-{os.getpid()}.json"
    print(f"\n== pytest -m gpu {' '.join(files)} (tests that need Ray deselected; {left:.0f} s left)", flush=True)
    try:
        proc = subprocess.run([sys.executable, __file__, "pytest", str(result), *files], cwd=REPO, env=env,
                              timeout=left)
    except subprocess.TimeoutExpired:
        return {"files": files, "error": f"pytest ran past the time budget ({left:.0f} s) and was stopped"}
    out = json.loads(result.read_text()) if result.exists() else {"error": f"pytest exited {proc.returncode} "
                                                                            f"without a result"}
    result.unlink(missing_ok=True)
    return {"files": files, **out}


# ------------------------------------------------------------------ measurements

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment(dry_run: bool) -> None:
    import torch
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --dry-run on a CPU)")
    os.environ["DS_ACCELERATOR"] = "cpu" if dry_run else "cuda"
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                       "TRANSFORMERS_OFFLINE": "1"}.items():
        os.environ[key] = value


class _Rows:
    """What RowStream hands masked_batches: unmasked micro-batches of (epochs, row_ids, ids)."""

    accum = 1  # one micro-batch a step

    def __init__(self, rows, micro_batch: int):
        self.rows, self.micro_batch, self.steps = rows, micro_batch, 0

    def batches(self):
        import numpy as np
        start = 0
        while True:
            sel = np.arange(start, start + self.micro_batch) % len(self.rows)
            start += self.micro_batch
            yield np.zeros(len(sel), dtype=np.int64), sel.astype(np.int64), self.rows[sel]


def synthetic_rows(vocab: int, seq: int, n_rows: int, seed: int = 0):
    """Packed rows of a synthetic corpus: random-length "sentences" of random non-special
    ids, documents of a few sentences, packed the way preprocess packs ("full")."""
    import numpy as np

    from wr_train.packing import pack_rows
    from wr_train.tokenizer import NUM_SPECIAL
    rng = np.random.default_rng(seed)
    pieces, ends, tokens = [], [], 0
    while tokens < n_rows * seq * 1.1:
        n = int(rng.integers(8, 64))
        pieces.append(rng.integers(NUM_SPECIAL, vocab, size=n))
        ends.append(bool(rng.random() < 0.2))
        tokens += n
    ends[-1] = True
    return pack_rows(pieces, ends, seq, "full")[:n_rows]


def masked(rows, micro_batch: int, vocab: int, n_batches: int) -> list:
    """n_batches micro-batches from the worker's masking thread (stream.masked_batches)."""
    import itertools

    from wr_train.config import MaskConfig
    from wr_train.stream import masked_batches
    gen = masked_batches(_Rows(rows, micro_batch), seed=42, vocab_size=vocab, mask_cfg=MaskConfig())
    try:
        return list(itertools.islice(gen, n_batches))
    finally:
        gen.close()


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _memory_start(device) -> float:
    import gc

    import torch
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2 ** 30


def _peak_gib(device):
    import torch
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def _build(size: str, vocab: int, device):
    import torch

    from wr_train.config import ModelConfig
    from wr_train.model import build_mlm
    with torch.device(device):   # weights made where they train (a base model on the GPU: seconds less)
        return build_mlm(ModelConfig(size=size), vocab, seed=42)


def measure_ours(size, vocab, batches, zero, steps, warmup, device) -> dict:
    import itertools

    import torch

    from wr_train.config import PretrainConfig, StageConfig
    from wr_train.engine import build_engine, train_step
    t0 = time.perf_counter()
    base_mem = _memory_start(device)
    micro = len(batches[0].ids)
    stage = StageConfig(name="gpu-check", shards="-", steps=10_000, global_batch=micro, micro_batch=micro,
                        lr=1e-4, warmup=0.01)
    cfg = PretrainConfig(name="gpu-check", workers=1, gpu=device.type == "cuda", precision="bf16",
                         zero_stage=zero, stages=[stage])
    engine = build_engine(cfg, stage, 1, _build(size, vocab, device))
    try:
        dev = engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)
        it = itertools.cycle(batches)
        engine.train()
        for _ in range(warmup):
            train_step(engine, it, dev)
        _sync(dev)
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = [train_step(engine, it, dev) for _ in range(steps)]
        _sync(dev)
        seconds = time.perf_counter() - t0
        loss_sum = float(sum(r[0] for r in results)[0])
        targets = sum(r[1] for r in results)
        return {"seconds": seconds, "setup_s": setup, "loss": loss_sum / max(targets, 1),
                "zero": engine.zero_optimization_stage(),
                "peak_mem_gib": _peak_gib(dev), "base_mem_gib": base_mem}
    finally:
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine


def measure_hf(size, vocab, batches, steps, warmup, device) -> dict:
    import itertools

    import torch

    from wr_train.optim import param_groups
    from wr_train.tokenizer import PAD
    t0 = time.perf_counter()
    base_mem = _memory_start(device)
    mlm = _build(size, vocab, device).to(device).train()
    try:
        opt = torch.optim.AdamW(param_groups(mlm, 0.01), lr=1e-4, betas=(0.9, 0.999), eps=1e-6, fused=True)
        fused = True
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(param_groups(mlm, 0.01), lr=1e-4, betas=(0.9, 0.999), eps=1e-6)
        fused = False
    it = itertools.cycle(batches)

    def step():
        batch = next(it)
        ids = batch.ids.to(device, non_blocking=True)
        labels = batch.labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = mlm(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mlm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(warmup):
        step()
    _sync(device)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    losses = [step() for _ in range(steps)]
    _sync(device)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "setup_s": setup, "loss": float(torch.stack(losses).float().mean()), "zero": None,
           "peak_mem_gib": _peak_gib(device), "base_mem_gib": base_mem, "fused_adamw": fused}
    del mlm, opt
    return out


def _rate(flops: float) -> str:
    return f"{flops / 1e12:,.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def _fmt(x, spec: str, none: str = "–") -> str:
    return none if x is None else format(x, spec)


def write_tables(out: Path, record: dict) -> str:
    rows = record["rows"]
    lines = [f"# GPU check (`bench/gpu_check.sh`){' — DRY RUN on CPU, not a measurement' if record['dry_run'] else ''}",
             "",
             f"{record['started']}; {record['device']}; torch {record['torch']}, deepspeed {record['deepspeed']}, "
             f"transformers {record['transformers']}; bf16; vocab {record['vocab']:,}; "
             f"{record['steps']} timed steps after {record['warmup']} warm-up step(s) per row.",
             f"Dense bf16 peak {_rate(record['peak_flops'])} ({record['peak_source']}); measured "
             f"{record['matmul_n']}³ bf16 matmul {_rate(record['matmul_flops'])}. MFU: non-pad tokens/s × "
             f"the sparse model's FLOPs per token (`wr_train.model.flops_per_token`, mask fraction "
             f"{record['mask_fraction']:.3f}; the same count for the HF loop) over the peak, and over the measured rate.",
             "",
             "| config | loop | ZeRO | model | seq | batch | tokens/s | ms/step | MFU (peak) | MFU (measured) | vs HF | peak mem GiB | loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['config']} | {r['loop']} | {_fmt(r.get('zero_asked'), 'd')} | {r['size']} | {r['seq']} | "
                         f"{r['batch']} | **failed**: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['config']} | {r['loop']} | {_fmt(r['zero'], 'd')} | {r['size']} | {r['seq']} | {r['batch']} | "
            f"{r['tokens_per_s']:,.0f} | {r['ms_per_step']:.1f} | {r['mfu']:.1%} | {r['mfu_measured']:.1%} | "
            f"{_fmt(r.get('vs_hf'), '.2f')}{'x' if r.get('vs_hf') is not None else ''} | "
            f"{_fmt(r['peak_mem_gib'], '.2f')} | {r['loss']:.3f} |")
    lines.append("")
    lines += [f"- {t}" for t in record["targets"]]
    lines += [f"- {t}" for t in masking_lines(record)]
    tests = record.get("tests")
    if tests:
        if "counts" in tests:
            c = tests["counts"]
            lines.append(f"- tests (`pytest -m gpu {' '.join(tests['files'])}`, {len(tests['deselected_need_ray'])} "
                         f"needing Ray deselected): {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                         f"{c['skipped']} skipped (exit {tests['exit_code']})")
            lines += [f"  - {k}: {v}" for k, v in tests["tests"].items()]
        else:
            lines.append(f"- tests: {tests.get('skipped') or tests.get('error')}")
    lines.append(f"- elapsed {record['elapsed_s']:.0f} s")
    text = "\n".join(lines) + "\n"
    for name, content in (("gpu_check.md", text), ("gpu_check.json", json.dumps(record, indent=1) + "\n")):
        tmp = out / (name + ".tmp")
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(out / name)
    return text


def targets(rows: list[dict], dry_run: bool) -> list[str]:
    goal = f"MFU ≥ {TARGET_MFU:.0%} and ≥ {TARGET_RATIO}x the HF loop for base-128 bf16"
    if dry_run:
        return [f"dry run (CPU, tiny model, small vocab): the targets ({goal}) are not judged"]
    out = []
    for r in rows:
        if r["config"] == "base-128" and r["loop"] == "wr-train" and not r.get("error"):
            mfu_ok = "met" if r["mfu"] >= TARGET_MFU else "NOT met"
            ratio = r.get("vs_hf")
            ratio_ok = "–" if ratio is None else ("met" if ratio >= TARGET_RATIO else "NOT met")
            out.append(f"target base-128 bf16 ZeRO-{r['zero']}: MFU {r['mfu']:.1%} (≥ {TARGET_MFU:.0%}: "
                       f"{mfu_ok}), {_fmt(ratio, '.2f')}x the HF loop (≥ {TARGET_RATIO}x: {ratio_ok})")
    return out or [f"no base-128 wr-train row measured: the targets ({goal}) are not judged"]


def masking_lines(record: dict) -> list[str]:
    """Whether the worker's masking thread (one CPU thread, host side) produces micro-batches
    faster than each config's fastest wr-train row consumes them."""
    out = []
    for config, rate in record.get("masking_tok_s", {}).items():
        ours = [r["tokens_per_s"] for r in record["rows"]
                if r["config"] == config and r["loop"] == "wr-train" and not r.get("error")]
        if ours:
            verdict = "keeps up" if rate >= max(ours) else "the BOTTLENECK: the step waits for it"
            out.append(f"masking thread, {config}: {rate:,.0f} tok/s = {rate / max(ours):.1f}x the fastest "
                       f"wr-train row ({verdict})")
    return out


def cmd_run(args) -> int:
    t_start = time.time()
    deadline = t_start + args.budget
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry_run
    sys.path.insert(0, str(REPO))
    if dry:
        sys.modules["ray"] = None  # as on the GPU box, where there is no Ray: `import ray` fails
    _environment(dry)
    import logging

    import numpy as np
    import torch
    import transformers

    import deepspeed
    from wr_train.machine import GPU_PEAK_BF16, keep_freed_memory, measure_matmul_flops
    from wr_train.model import flops_per_token
    from wr_train.config import ModelConfig

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    transformers.logging.set_verbosity_error()
    keep_freed_memory()  # as the worker does
    if dry:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    device = torch.device("cuda", 0) if not dry else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    deepspeed.init_distributed(dist_backend="gloo" if dry else "nccl", auto_mpi_discovery=False, verbose=False)

    steps = DRY["steps"] if dry else args.steps
    warmup = DRY["warmup"] if dry else args.warmup
    vocab = DRY["vocab"] if dry else VOCAB
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        desc = f"{name} (CUDA {torch.version.cuda}, {torch.cuda.get_device_properties(device).total_memory / 2 ** 30:.0f} GiB)"
        n = 8192
        measured = measure_matmul_flops(torch.bfloat16, n, seconds=0.2, repeats=3, device=device)
        spec = next(((k, v) for k, v in GPU_PEAK_BF16.items() if k in name), None)
    else:
        desc, n = f"CPU x{os.cpu_count()} (dry run)", 256
        measured = measure_matmul_flops(torch.bfloat16, n, seconds=0.05, repeats=2)
        spec = None
    peak = spec[1] if spec else measured
    record = {"dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M %Z"), "device": desc,
              "torch": torch.__version__, "deepspeed": deepspeed.__version__,
              "deepspeed_from": str(Path(deepspeed.__file__).parent), "transformers": transformers.__version__,
              "python": sys.version.split()[0], "peak_flops": peak,
              "peak_source": f"spec sheet, {spec[0]}" if spec else "no spec for this device: the measured rate",
              "matmul_n": n, "matmul_flops": measured, "vocab": vocab, "steps": steps, "warmup": warmup,
              "budget_s": args.budget, "rows": [], "targets": [], "masking_tok_s": {}, "elapsed_s": 0.0}
    print(f"gpu_check: {desc}; torch {torch.__version__}; deepspeed {deepspeed.__version__} "
          f"({record['deepspeed_from']}); peak {_rate(peak)} ({record['peak_source']}), "
          f"measured {_rate(measured)}", flush=True)

    mask_fracs = []
    for config, size, seq, batch in CONFIGS:
        if dry:
            size, seq, batch = DRY["size"], DRY["seq"][seq], DRY["batch"]
        n_batches = min(8, steps + warmup)
        rows = synthetic_rows(vocab, seq, batch * n_batches)
        t0 = time.perf_counter()
        batches = masked(rows, batch, vocab, n_batches)
        tokens = [b.layout.tokens for b in batches]
        record["masking_tok_s"][config] = sum(tokens) / (time.perf_counter() - t0)
        targets_n = [b.layout.n for b in batches]
        mask_frac = sum(targets_n) / sum(tokens)
        mask_fracs.append(mask_frac)
        record["mask_fraction"] = float(np.mean(mask_fracs))
        timed_tokens = sum(tokens[i % len(batches)] for i in range(warmup, warmup + steps))
        fpt = flops_per_token(ModelConfig(size=size), vocab, seq, mask_frac)
        hf_rate = None
        group = []
        for loop, zero in [("wr-train", z) for z in ZERO_STAGES] + [("hf", None)]:
            row = {"config": config, "loop": loop, "zero_asked": zero, "size": size, "seq": seq, "batch": batch,
                   "vocab": vocab, "flops_per_token": fpt, "mask_fraction": mask_frac}
            left = deadline - time.time()
            if left < (10 if dry else 30):
                row["error"] = f"skipped: {max(left, 0):.0f} s of the {args.budget:.0f} s budget left"
            else:
                print(f"== {config} {loop}{f' ZeRO-{zero}' if zero else ''}: {size}, seq {seq}, batch {batch}",
                      flush=True)
                try:
                    got = (measure_ours(size, vocab, batches, zero, steps, warmup, device) if loop == "wr-train"
                           else measure_hf(size, vocab, batches, steps, warmup, device))
                    tok_s = timed_tokens / got["seconds"]
                    row.update(got, tokens_per_s=tok_s, ms_per_step=1e3 * got["seconds"] / steps,
                               mfu=tok_s * fpt / peak, mfu_measured=tok_s * fpt / measured)
                    print(f"   {tok_s:,.0f} tok/s, {row['ms_per_step']:.1f} ms/step, MFU {row['mfu']:.1%} "
                          f"(measured-rate {row['mfu_measured']:.1%}), peak mem {_fmt(row['peak_mem_gib'], '.2f')} GiB, "
                          f"loss {row['loss']:.3f}; setup + warm-up {row['setup_s']:.1f} s", flush=True)
                    if loop == "hf":
                        hf_rate = tok_s
                except Exception as e:  # one failed row must not cost the window the others
                    traceback.print_exc()
                    row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            group.append(row)
            record["rows"].append(row)
            record["elapsed_s"] = time.time() - t_start
            write_tables(out, record)
        for row in group:
            if row["loop"] == "hf" and hf_rate:
                row["vs_hf"] = 1.0
            elif hf_rate and not row.get("error"):
                row["vs_hf"] = row["tokens_per_s"] / hf_rate
                print(f"ratio {config} ZeRO-{row['zero']}: ours / HF = {row['vs_hf']:.2f}x", flush=True)
    record["targets"] = targets(record["rows"], dry)
    record["elapsed_s"] = time.time() - t_start
    write_tables(out, record)

    env = {**os.environ, "DS_ACCELERATOR": os.environ["DS_ACCELERATOR"], "PYTHONPATH": os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    record["tests"] = run_tests(deadline + args.test_grace, env)
    record["elapsed_s"] = time.time() - t_start
    text = write_tables(out, record)
    print("\n" + text, flush=True)
    failed = [r for r in record["rows"] if r.get("error")]
    tests_bad = record["tests"].get("error") or record["tests"].get("exit_code") not in (None, 0, 5)
    return 1 if failed or tests_bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("install")
    p.add_argument("--wheels", default=str(REPO / "bench" / "wheels"))
    p.add_argument("--site", required=True)
    p.add_argument("--plan", action="store_true", help="only print what would be installed")
    p = sub.add_parser("run")
    p.add_argument("out")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--budget", type=float, default=float(os.environ.get("WR_GPU_BUDGET", 330)),
                   help="seconds for the measurements (rows not started by then are skipped)")
    p.add_argument("--test-grace", type=float, default=60.0, help="seconds the tests may run past the budget")
    p = sub.add_parser("pytest")
    p.add_argument("result")
    p.add_argument("files", nargs="+")
    args = ap.parse_args(argv)
    return {"install": cmd_install, "run": cmd_run, "pytest": cmd_pytest}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
