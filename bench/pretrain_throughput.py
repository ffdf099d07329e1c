"""Pretraining step throughput: wr-train's step vs a plain HF BertForMaskedLM loop.

Same packed, masked rows (real demo text, seq 128, batch 32) for both, one worker:
- ours: the worker's DeepSpeed engine (fp32 on CPU: ZeRO stage 0, one worker; bf16 ZeRO-1 on
  GPU) around SparseMLM, which projects only the masked positions onto the vocabulary and
  runs the last layer only there, with glibc told to keep freed memory (as the worker does);
- HF: BertForMaskedLM(labels=...) computing full-vocab logits on every position, torch AdamW,
  glibc's default allocator settings (as a plain script runs).
Counts non-pad tokens only. MFU = tokens/s × FLOPs per token the sparse model needs,
over the dense fp32 (CPU) / bf16 (GPU) matmul rate measured at the start of this run.

    python bench/pretrain_throughput.py [--sizes tiny,small] [--vocabs 32000,100000] [--steps 20]
Ends with one line per size/vocab: `<size> <ours tok/s> <hf tok/s> <ratio>x`.
"""
from __future__ import annotations

import argparse
import os
import sys
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
from wr_train.engine import param_groups  # noqa: E402
from wr_train.machine import keep_freed_memory, peak_flops  # noqa: E402
from wr_train.masking import mask_batch  # noqa: E402
from wr_train.model import SparseMLM, TargetLayout, build_mlm, flops_per_token  # noqa: E402
from wr_train.packing import pack_rows  # noqa: E402
from wr_train.tokenizer import PAD, train_spm  # noqa: E402


def demo_rows(cache: Path, seq: int, n_rows: int) -> np.ndarray:
    """Packed rows of real demo text (spm 32k trained once into the cache)."""
    from wr_train.demo.data import build_demo
    demo = cache / "demo"
    build_demo(str(demo), log=lambda *a: None)
    corpus = [str(demo / "corpus" / "peoples_daily.txt")]
    spm_dir = cache / "spm32k"
    if not (spm_dir / "spm.model").exists():
        train_spm([str(demo / "corpus")], str(spm_dir), 32000, input_sentence_size=300_000)
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spm.model"))
    lines = [l.strip() for l in open(corpus[0], encoding="utf-8") if l.strip()][:4000]
    ids = sp.encode(lines)
    rows = pack_rows(ids, [True] * len(ids), seq, "full")
    return rows[:n_rows]


def batches(rows: np.ndarray, batch: int, vocab: int, steps: int):
    out = []
    for s in range(steps):
        sel = np.arange(s * batch, (s + 1) * batch) % len(rows)
        ids, labels = mask_batch(rows[sel], sel, epoch=0, seed=0, vocab_size=min(vocab, 32000))
        # the target layout is made on the host, as the worker's masking thread does
        out.append((torch.from_numpy(ids), torch.from_numpy(labels), TargetLayout.of(ids, labels)))
    return out


def time_loop(step_fn, data, device, warmup: int = 3) -> float:
    for ids, labels, layout in data[:warmup]:
        step_fn(ids.to(device), labels.to(device), layout.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    for ids, labels, layout in data[warmup:]:
        step_fn(ids.to(device), labels.to(device), layout.to(device))
        tokens += layout.tokens
    if device.type == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def ours(size: str, vocab: int, data, device, precision: str) -> float:
    import deepspeed
    keep_freed_memory(True)   # as wr-train's worker does
    mlm = build_mlm(ModelConfig(size=size), vocab).to(device)
    cfg = PretrainConfig(workers=1, gpu=device.type == "cuda", zero_stage=1, precision=precision,
                         stages=[StageConfig(shards="-", steps=1000, global_batch=len(data[0][0]),
                                             micro_batch=len(data[0][0]), lr=1e-4)])
    engine, *_ = deepspeed.initialize(model=SparseMLM(mlm), model_parameters=param_groups(mlm, 0.01),
                                      config=build_ds_config(cfg, cfg.stages[0], 1))

    def step(ids, labels, layout):
        loss, _, _ = engine(ids, None, layout)
        engine.backward(loss)
        engine.step()
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small")
    ap.add_argument("--vocabs", default="32000,100000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/wr-train/bench"))
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "bf16" if device.type == "cuda" else "fp32"
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    rate = peak_flops(device, torch.bfloat16 if precision == "bf16" else torch.float32)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    print(f"device {name}, {precision}; dense matmul rate {rate / 1e9:,.0f} GFLOP/s "
          f"({'spec sheet' if device.type == 'cuda' else 'measured'})")
    rows = demo_rows(Path(args.cache), args.seq, args.batch * (args.steps + 3))
    results = []
    for size in args.sizes.split(","):
        for vocab in map(int, args.vocabs.split(",")):
            if size != "tiny" and vocab != 32000:
                continue  # the targets name tiny at 100k; small at 32k
            data = batches(rows, args.batch, vocab, args.steps + 3)
            mask_frac = float(np.mean([lay.n / lay.tokens for _, _, lay in data]))
            a = ours(size, vocab, data, device, precision)
            b = hf_loop(size, vocab, data, device, precision)
            mfu = a * flops_per_token(ModelConfig(size=size), vocab, args.seq, mask_frac) / rate
            results.append((size, vocab, a, b, mfu))
            print(f"  {size:<6} vocab {vocab:>7,}: ours {a:>9,.0f} tok/s   hf {b:>9,.0f} tok/s   "
                  f"{a / b:5.2f}x   ours MFU {mfu:.1%}", flush=True)
    print("\n| size | vocab | ours tok/s | HF loop tok/s | ratio | ours MFU |\n|---|---|---|---|---|---|")
    for size, vocab, a, b, mfu in results:
        print(f"| {size} | {vocab:,} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x | {mfu:.1%} |")
    # UER-py's own CPU loop on this kind of machine (issue #3; 32k vocab, padding counted)
    uer = {"tiny": 11_500, "small": 1_750}
    for size, vocab, a, b, mfu in results:
        if vocab == 32000 and size in uer:
            print(f"{size}: ours / UER-py's ~{uer[size]:,} tok/s = {a / uer[size]:.2f}x")
    print()
    for size, vocab, a, b, mfu in results:
        label = size if vocab == 32000 else f"{size}@{vocab // 1000}k"
        print(f"{label} {a:.0f} {b:.0f} {a / b:.2f}x")


if __name__ == "__main__":
    main()
