"""Pretraining step throughput: the loop users run, the engine alone, a plain HF loop, UER-py.

Real demo text (People's Daily, the first 4,000 lines), one spm (32k, trained once into the
cache), seq 128, batch 32, fp32 on CPU, one worker, every row in this one run:
- real loop: `wr-train pretrain` itself (Ray Train, one worker with every CPU, the shards
  `preprocess` writes from that text, RowStream + the masking thread + engine.train_step +
  the metrics meter), started once Ray's daemons have settled; the best tok/s of the run's
  own reports after the first (start-up, warm-up);
- engine: the worker's DeepSpeed engine (one worker: ZeRO stage 0) around SparseMLM on
  batches masked beforehand, with glibc told to keep freed memory (as the worker does);
- HF: BertForMaskedLM(labels=...) computing full-vocab logits on every position, torch AdamW,
  glibc's default allocator settings (as a plain script runs);
- UER-py (`--uer PATH`, a checkout of dbiir/UER-py, kept outside this repo): its own
  preprocess.py (`--data_processor mlm --full_sentences --dynamic_masking`) and pretrain.py
  (models/bert/<size>_config.json, `--target mlm`, dropout 0.1 as ours) on the same text and
  spm, every CPU as torch threads; the best tok/s of its reports after the first (it counts
  batch × seq: every position is text with --full_sentences).
- `--breakdown` adds where the time goes: SparseMLM in a plain torch AdamW loop (no
  DeepSpeed), the engine with dropout 0, the engine with torch's unfused AdamW (what
  DeepSpeed's torch_adam builds by default), and the worker's loop outside Ray
  (`stream_loop`: RowStream + the masking thread + engine.train_step in the bench's own
  process).
Engine and HF rows: the best of --repeat timed passes (single timings on a shared VM move
±25%). Counts non-pad tokens. MFU = tokens/s × FLOPs per token the sparse model needs, over the
dense fp32 (CPU) / bf16 (GPU) matmul rate measured at the start of this run.

    python bench/pretrain_throughput.py [--sizes tiny,small] [--vocabs 32000,100000] [--steps 20]
                                        [--uer ~/src/UER-py] [--breakdown]
Ends with one line per size/vocab: `<size> <engine tok/s> <hf tok/s> <ratio>x`, and with
--uer one per size: `uer <size> <real-loop tok/s> <uer tok/s> <ratio>x`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29533"}.items():
    os.environ.setdefault(k, v)

from wr_train.config import ModelConfig, PretrainConfig, StageConfig  # noqa: E402
from wr_train.ds_config import build_ds_config  # noqa: E402
from wr_train.optim import param_groups  # noqa: E402
from wr_train.machine import keep_freed_memory, peak_flops  # noqa: E402
from wr_train.masking import mask_batch  # noqa: E402
from wr_train.model import SparseMLM, TargetLayout, build_mlm, flops_per_token  # noqa: E402
from wr_train.packing import pack_rows  # noqa: E402
from wr_train.tokenizer import PAD, train_spm  # noqa: E402

SEQ = 128
REPORT = 10  # steps per report window of the real loop and UER-py
SETTLE_S = 15  # seconds a fresh local Ray is left to start its daemons before the real loop
REPEAT = 3   # timed passes of the engine / HF rows (the best counts); --repeat


def demo_text(cache: Path) -> tuple[Path, Path]:
    """(the benchmark's text file, its 32k spm dir), made once into the cache."""
    from wr_train.demo.data import build_demo
    demo = cache / "demo"
    build_demo(str(demo), log=lambda *a: None)
    spm_dir = cache / "spm32k"
    if not (spm_dir / "spm.model").exists():
        train_spm([str(demo / "corpus")], str(spm_dir), 32000, input_sentence_size=300_000)
    text = cache / "bench_text.txt"
    if not text.exists():
        with open(demo / "corpus" / "peoples_daily.txt", encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()][:4000]
        text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return text, spm_dir


def demo_rows(text: Path, spm_dir: Path, n_rows: int) -> np.ndarray:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spm.model"))
    ids = sp.encode(text.read_text(encoding="utf-8").splitlines())
    return pack_rows(ids, [True] * len(ids), SEQ, "full")[:n_rows]


def batches(rows: np.ndarray, batch: int, vocab: int, steps: int):
    out = []
    for s in range(steps):
        sel = np.arange(s * batch, (s + 1) * batch) % len(rows)
        ids, labels = mask_batch(rows[sel], sel, epoch=0, seed=0, vocab_size=min(vocab, 32000))
        # the target layout is made on the host, as the worker's masking thread does
        out.append((torch.from_numpy(ids), torch.from_numpy(labels), TargetLayout.of(ids, labels)))
    return out


def time_loop(step_fn, data, device, warmup: int = 3) -> float:
    """Best of REPEAT passes over data[warmup:] (this VM's single timings move ±25%)."""
    for ids, labels, layout in data[:warmup]:
        step_fn(ids.to(device), labels.to(device), layout.to(device))
    best = 0.0
    for _ in range(REPEAT):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tokens = 0
        for ids, labels, layout in data[warmup:]:
            step_fn(ids.to(device), labels.to(device), layout.to(device))
            tokens += layout.tokens
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, tokens / (time.perf_counter() - t0))
    return best


def engine_only(size: str, vocab: int, data, device, precision: str, dropout: float = 0.1,
                fused_adam: bool = True) -> float:
    import deepspeed
    keep_freed_memory(True)   # as wr-train's worker does
    mlm = build_mlm(ModelConfig(size=size, dropout=dropout), vocab).to(device)
    cfg = PretrainConfig(workers=1, gpu=device.type == "cuda", zero_stage=1, precision=precision,
                         stages=[StageConfig(shards="-", steps=1000, global_batch=len(data[0][0]),
                                             micro_batch=len(data[0][0]), lr=1e-4)])
    ds = build_ds_config(cfg, cfg.stages[0], 1)
    ds["optimizer"]["params"]["fused"] = fused_adam  # False: torch's default AdamW (a --breakdown row)
    engine, *_ = deepspeed.initialize(model=SparseMLM(mlm), model_parameters=param_groups(mlm, 0.01),
                                      config=ds)

    def step(ids, labels, layout):
        loss, _, _ = engine(ids, None, layout)
        engine.backward(loss)
        engine.step()
    return time_loop(step, data, device)


def sparse_plain(size: str, vocab: int, data, device) -> float:
    """SparseMLM in a plain torch loop (AdamW, clipping at 1.0): the engine row minus DeepSpeed."""
    keep_freed_memory(True)
    mlm = build_mlm(ModelConfig(size=size), vocab).to(device)
    model = SparseMLM(mlm)
    opt = torch.optim.AdamW(param_groups(mlm, 0.01), lr=1e-4)

    def step(ids, labels, layout):
        loss, _, _ = model(ids, None, layout)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time_loop(step, data, device)


def hf_loop(size: str, vocab: int, data, device, precision: str) -> float:
    keep_freed_memory(False)  # glibc's defaults, as a plain script runs
    mlm = build_mlm(ModelConfig(size=size), vocab).to(device)
    opt = torch.optim.AdamW(mlm.parameters(), lr=1e-4, weight_decay=0.01)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step(ids, labels, _layout):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = mlm(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time_loop(step, data, device)


def bench_shards(text: Path, spm_dir: Path, cache: Path) -> Path:
    """The text packed by `wr-train preprocess` (made once into the cache; no held-out part)."""
    import ray

    from wr_train.preprocess import preprocess
    shards = cache / "shards32k-128"
    if not (shards / "manifest.json").exists():
        preprocess([str(text)], str(spm_dir), str(shards), seq_length=SEQ, heldout=0, log=lambda *a: None)
        ray.shutdown()
    return shards


def stream_loop(size: str, shards: Path, batch: int, steps: int, device, precision: str) -> float:
    """The worker's loop outside Ray: RowStream + the masking thread + engine.train_step
    (device sums, host counts) in this process: the real loop minus Ray Train."""
    from wr_train.engine import build_engine, train_step
    from wr_train.shards import load_manifest
    from wr_train.stream import RowStream, masked_batches
    keep_freed_memory(True)
    manifest = load_manifest(str(shards))
    cfg = PretrainConfig(workers=1, gpu=device.type == "cuda", zero_stage=1, precision=precision,
                         model=ModelConfig(size=size),
                         stages=[StageConfig(shards=str(shards), steps=1000, global_batch=batch,
                                             micro_batch=batch, lr=1e-4)]).validate()
    engine = build_engine(cfg, cfg.stages[0], 1, build_mlm(cfg.model, manifest["vocab_size"]).to(device))
    stream = RowStream(str(shards), manifest, seed=0, stage=0, rank=0, world=1, global_batch=batch,
                       micro_batch=batch)
    it = masked_batches(stream, seed=0, vocab_size=manifest["vocab_size"], mask_cfg=cfg.mask,
                        pin=device.type == "cuda")
    best = 0.0
    try:
        for _ in range(3):
            train_step(engine, it, device)
        for _ in range(REPEAT):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, tokens = time.perf_counter(), 0
            for _ in range(steps):
                tokens += train_step(engine, it, device)[2]
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, tokens / (time.perf_counter() - t0))
    finally:
        it.close()
    return best


def real_loop(size: str, text: Path, spm_dir: Path, cache: Path, windows: int, batch: int,
              precision: str) -> float:
    """`wr-train pretrain` itself, one worker with every CPU: the best tok/s of its reports
    after the first (which holds start-up and warm-up)."""
    import ray

    from wr_train import pretrain
    from wr_train.local_ray import ensure_ray
    shards = bench_shards(text, spm_dir, cache)
    ensure_ray()
    time.sleep(SETTLE_S)  # Ray's daemons start for ~15 s; a real run is hours long
    runs = Path(tempfile.mkdtemp(prefix="wr-bench-"))
    steps = REPORT * (windows + 1)
    cfg = PretrainConfig(
        name=f"bench-{size}", storage=str(runs), workers=1, cpus_per_worker=os.cpu_count() or 1,
        zero_stage=1, precision=precision, report_every=REPORT, checkpoint_every=steps, eval_rows=0,
        model=ModelConfig(size=size),
        stages=[StageConfig(shards=str(shards), steps=steps, global_batch=batch, micro_batch=batch,
                            lr=1e-4)]).validate()
    try:
        pretrain.run(cfg, log=lambda *a, **k: None)
        with open(runs / cfg.name / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    finally:
        ray.shutdown()  # its daemons stay out of the rows measured after this one
        shutil.rmtree(runs, ignore_errors=True)
    return max(r["tokens_per_s"] for r in rows[1:])


def uer_loop(size: str, uer: Path, text: Path, spm_dir: Path, cache: Path, windows: int,
             batch: int) -> float:
    """UER-py's own preprocess.py + pretrain.py on the same text and spm: the best tok/s of
    its reports after the first."""
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "PYTHONPATH": str(uer)}
    dataset = cache / "uer_dataset32k.pt"
    if not dataset.exists():
        subprocess.run([sys.executable, "preprocess.py", "--corpus_path", str(text),
                        "--spm_model_path", str(spm_dir / "spm.model"), "--dataset_path", str(dataset),
                        "--processes_num", "1", "--data_processor", "mlm", "--seq_length", str(SEQ),
                        "--full_sentences", "--dynamic_masking"],
                       cwd=uer, env=env, check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="uer-bench-") as tmp:
        out = subprocess.run(
            [sys.executable, "pretrain.py", "--dataset_path", str(dataset),
             "--spm_model_path", str(spm_dir / "spm.model"),
             "--config_path", f"models/bert/{size}_config.json", "--output_model_path", f"{tmp}/m.bin",
             "--total_steps", str(REPORT * (windows + 1)), "--report_steps", str(REPORT),
             "--save_checkpoint_steps", "100000000", "--batch_size", str(batch),
             "--data_processor", "mlm", "--target", "mlm", "--learning_rate", "1e-4"],
            cwd=uer, env=env, capture_output=True, text=True)
    rates = [float(x) for x in re.findall(r"\|\s*([\d.]+) tokens/s", out.stdout + out.stderr)]
    if out.returncode or len(rates) < 2:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"UER-py pretrain.py in {uer} failed (exit {out.returncode}): {tail[0]}")
    return max(rates[1:])


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    global REPEAT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--vocabs", default="32000,100000")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of the engine and HF rows")
    ap.add_argument("--windows", type=int, default=6,
                    help=f"timed {REPORT}-step report windows of the real loop and UER-py (small's real "
                         f"loop still speeds up over its first ~4)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=REPEAT, help="timed passes of the engine/HF rows")
    ap.add_argument("--uer", type=Path, help="a checkout of dbiir/UER-py: adds its row, same text and spm")
    ap.add_argument("--breakdown", action="store_true",
                    help="add SparseMLM without DeepSpeed, the engine without dropout, the loop outside Ray")
    ap.add_argument("--no-real", action="store_true", help="skip the real-loop row (no Ray start)")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF row (slow at small; real/engine needs none)")
    ap.add_argument("--precisions", default="",
                    help="comma list of fp32,bf16 for our rows (default: bf16 on GPU, fp32 on CPU); "
                         "UER-py runs fp32 once per size, its row shared by them")
    ap.add_argument("--cache", type=Path, default=Path(os.path.expanduser("~/.cache/wr-train/bench")))
    args = ap.parse_args()
    REPEAT = args.repeat
    if args.uer and not (args.uer / "pretrain.py").exists():
        ap.error(f"--uer {args.uer}: expected a checkout of dbiir/UER-py (no pretrain.py there)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = args.precisions.split(",") if args.precisions else ["bf16" if device.type == "cuda" else "fp32"]
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    rates = {p: peak_flops(device, torch.bfloat16 if p == "bf16" else torch.float32) for p in precisions}
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"device {name}; dense matmul rate " + ", ".join(f"{p} {r / 1e9:,.0f} GFLOP/s" for p, r in rates.items())
          + f" ({'spec sheet' if device.type == 'cuda' else 'measured'}); load {load()}", flush=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    text, spm_dir = demo_text(args.cache)
    rows = demo_rows(text, spm_dir, args.batch * (args.steps + 3))
    results = []
    uer: dict[str, float] = {}
    for size, vocab, precision in itertools.product(args.sizes.split(","), map(int, args.vocabs.split(",")),
                                                    precisions):
        if size != "tiny" and vocab != 32000:
            continue  # the targets name tiny at 100k; small at 32k
        data = batches(rows, args.batch, vocab, args.steps + 3)
        mask_frac = float(np.mean([lay.n / lay.tokens for _, _, lay in data]))
        r = {"size": size, "vocab": vocab, "precision": precision,
             "engine": engine_only(size, vocab, data, device, precision)}
        if args.breakdown:
            r["plain_sparse"] = sparse_plain(size, vocab, data, device)
            r["engine_no_dropout"] = engine_only(size, vocab, data, device, precision, dropout=0.0)
            r["engine_unfused_adam"] = engine_only(size, vocab, data, device, precision, fused_adam=False)
            if vocab == 32000:
                shards = bench_shards(text, spm_dir, args.cache)
                r["stream_loop"] = stream_loop(size, shards, args.batch, args.steps, device, precision)
        if not args.no_hf:
            r["hf"] = hf_loop(size, vocab, data, device, precision)
        if vocab == 32000 and args.uer:
            if size not in uer:
                uer[size] = uer_loop(size, args.uer, text, spm_dir, args.cache, args.windows, args.batch)
            r["uer"] = uer[size]
        if vocab == 32000 and not args.no_real:
            r["real"] = real_loop(size, text, spm_dir, args.cache, args.windows, args.batch, precision)
        r["mfu"] = r["engine"] * flops_per_token(ModelConfig(size=size), vocab, SEQ, mask_frac) / rates[precision]
        r["load"] = load()
        results.append(r)
        print("  " + "  ".join(f"{k} {v:,.0f}" if isinstance(v, float) and k != "mfu" else f"{k} {v}"
                               for k, v in r.items()), flush=True)
    print_table(results, args.breakdown, precisions)


def print_table(results: list[dict], breakdown: bool, precisions: list[str]) -> None:
    def num(r, key):
        return f"{r[key]:,.0f}" if key in r else "–"

    def ratio(r, a, b):
        return f"{r[a] / r[b]:.2f}x" if a in r and b in r else "–"
    extra = ["plain_sparse", "engine_no_dropout", "engine_unfused_adam", "stream_loop"] if breakdown else []
    print("\n| size | vocab | precision | real loop tok/s | engine tok/s | " + "".join(f"{k} tok/s | " for k in extra)
          + "HF loop tok/s | UER-py tok/s | real/UER | real/engine | engine/HF | engine MFU | load |")
    print("|---" * (12 + len(extra)) + "|")
    for r in results:
        print(f"| {r['size']} | {r['vocab']:,} | {r['precision']} | {num(r, 'real')} | {num(r, 'engine')} | "
              + "".join(f"{num(r, k)} | " for k in extra)
              + f"{num(r, 'hf')} | {num(r, 'uer')} | {ratio(r, 'real', 'uer')} | {ratio(r, 'real', 'engine')} | "
              f"{ratio(r, 'engine', 'hf')} | {r['mfu']:.1%} | {r['load']} |")
    def label(r, with_vocab: bool) -> str:  # tiny, tiny@100k, tiny-bf16 (precision named when several)
        vocab = f"@{r['vocab'] // 1000}k" if with_vocab and r["vocab"] != 32000 else ""
        return r["size"] + vocab + ("" if len(precisions) == 1 else f"-{r['precision']}")
    print()
    for r in results:
        if "hf" in r:
            print(f"{label(r, True)} {r['engine']:.0f} {r['hf']:.0f} {r['engine'] / r['hf']:.2f}x")
    for r in results:
        if "uer" in r and "real" in r:
            print(f"uer {label(r, False)} {r['real']:.0f} {r['uer']:.0f} {r['real'] / r['uer']:.2f}x")


if __name__ == "__main__":
    main()
