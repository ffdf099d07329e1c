"""Benchmark `wr-train preprocess` (Ray Data) against a plain single-process loop.

    python bench/preprocess.py                      # demo corpus, 32k spm, 1x and 10x
    python bench/preprocess.py --vocab 8000 --repeat 1 --scales 1

What runs, each in a fresh child process so no run inherits another's memory:
- spm1 / spm2: spm's batch encode alone (num_threads 1 / 2) over the corpus lines already
  in memory: the ceiling for any pipeline on this machine (1x only).
- plain:  one process, chunk by chunk: read -> clean -> encode (spm, one thread) -> pack
  -> the same Parquet shards (`corpus.chunk_rows` + `shards.ShardWriter`), no Ray.
- plain2: the same loop in two forked processes, each on every other chunk (no Ray): what
  2 cores give without any framework (UER-py's preprocess works this way).
- ray:    `preprocess.preprocess` on a local Ray started with num_cpus=CPUS before the clock
  starts, its workers warm and the tree idle (Ray's and Ray Data's start-up are excluded
  from throughput, not from memory, and shown in the start-up column).
Corpus: the demo corpus (`wr-train data demo`), and the same files 10 times over
(symlinks, so the 10x run reads 10x the bytes).

Measured per run:
- tokens/s: text tokens (the encoded documents, no [CLS]/[SEP]/pad) / wall seconds of
  the work alone;
- CPU-s: user+system seconds of the child's whole process tree (driver, raylet, GCS,
  every Ray worker) over the same window; tok/CPU-s shows the cost independent of other
  load on the machine, and tok/CPU-s × CPUS is what CPUS idle cores could reach;
- peak memory: the largest sum of PSS over the child's process tree (driver + raylet +
  GCS + all Ray workers, shared pages split between their users, so the object store
  is counted once), sampled every --interval seconds for the child's whole life, in a
  separate run of the same kind: reading PSS (/proc/PID/smaps_rollup) of a dozen Ray
  processes costs ~45 ms of CPU per sample, which at 0.1 s would take half a core from
  the run being timed (measured: 1x ray 2.63M tok/s unsampled, 1.83M sampled).
Library imports are start-up for every kind: the plain loops make pyarrow load its
pandas shim (~0.45 CPU-s on first pa.array) before the clock, as Ray's workers did when
they imported Ray Data.
The load average is printed beside each run: on a shared box wall-clock numbers move
with other people's work; the best of --repeat runs is kept.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERIAL = ("spm1", "plain")   # runs that use one core; the others use --cpus
CACHE = Path(os.environ.get("WR_BENCH_CACHE", Path.home() / ".cache" / "wr-train" / "bench"))


# ------------------------------------------------------------------ child side

def tree_cpu_seconds() -> float:
    """User+system seconds of this process, its live descendants, and its children that
    have exited and been waited for (plain2's pool)."""
    import psutil
    me = psutil.Process()
    done = os.times()
    total = done.children_user + done.children_system
    for p in [me] + me.children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def wait_until_idle(window: float = 1.0, busy_cpus: float = 0.1, timeout: float = 60.0) -> None:
    """Return once this process tree used < busy_cpus CPUs over a whole window."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        before = tree_cpu_seconds()
        time.sleep(window)
        if tree_cpu_seconds() - before < busy_cpus * window:
            return


def child(args) -> None:
    import numpy as np

    from wr_train import preprocess as corpus, text
    startup = 0.0
    if args.child == "ray":
        t_start = time.perf_counter()
        import ray
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        # Warm-up outside the clock: one Ray worker per CPU, each having imported Ray
        # Data (run together, so no worker is left cold), then Ray Data's first run (it
        # starts its stats and autoscaling-coordinator actors, ~1.4 CPU-s each, in the
        # background), then wait until the process tree is idle: otherwise that start-up
        # runs inside the timed window.
        @ray.remote(num_cpus=1)
        def warm_worker():
            import ray.data  # noqa: F401
            time.sleep(0.5)
        ray.get([warm_worker.remote() for _ in range(args.cpus)])
        ds = ray.data.from_items(list(range(args.cpus)), override_num_blocks=args.cpus)
        ds.context.enable_progress_bars = False
        ds.map_batches(lambda b: b, batch_size=1, num_cpus=1).materialize()
        wait_until_idle()
        startup = time.perf_counter() - t_start
    else:
        import pyarrow as pa
        pa.array(np.zeros(1, np.int32))  # pyarrow's lazy pandas import, outside the clock
    files = text.list_sources([args.corpus])
    cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
    if args.child == "ray":
        m = corpus.preprocess([args.corpus], args.spm, args.out, seq_length=args.seq_length,
                              packing=args.packing, log=lambda *_: None)
        text_tokens, rows = m["text_tokens"], m["rows"]
    elif args.child.startswith("spm"):
        # spm alone: the lines are read and stripped before the clock starts
        from wr_train.tokenizer import load_spm
        sp = load_spm(args.spm)
        lines = []
        for src in files:
            with open(src.path, encoding="utf-8", errors="replace") as f:
                lines += [t for t in map(str.strip, f) if t]
        cpu0, t0 = tree_cpu_seconds(), time.perf_counter()
        threads = int(args.child[3:])
        text_tokens = sum(len(a) for a in sp.encode(lines, out_type="numpy", num_threads=threads))
        rows = 0
    else:
        chunks = text.plan_chunks(files)
        workers = 2 if args.child == "plain2" else 1
        if workers == 1:
            text_tokens, rows = plain_loop(args, chunks, args.out)
        else:  # the same loop in two processes, each on every other chunk (no Ray)
            import multiprocessing as mp
            with mp.get_context("fork").Pool(workers) as pool:
                parts = pool.starmap(plain_loop, [(args, chunks[i::workers], f"{args.out}/{i}")
                                                  for i in range(workers)])
            text_tokens, rows = sum(p[0] for p in parts), sum(p[1] for p in parts)
        assert rows and np.int64(text_tokens) > 0
    seconds = time.perf_counter() - t0
    cpu = tree_cpu_seconds() - cpu0
    import resource
    maxrss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                 resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "text_tokens": int(text_tokens),
                      "startup_seconds": startup, "max_rss_mb": maxrss,
                      "rows": int(rows), "bytes": sum(s.bytes for s in files)}), flush=True)


def plain_loop(args, chunks: list[dict], out: str) -> tuple[int, int]:
    """read -> clean -> encode -> pack -> Parquet, one chunk after the other."""
    from wr_train import preprocess as corpus, shards
    from wr_train.tokenizer import load_spm
    sp = load_spm(args.spm)
    writer = shards.ShardWriter(out, args.seq_length, shards.ROWS_PER_SHARD)
    text_tokens = 0
    for c in chunks:
        for rows, _, stats in corpus.chunk_rows(sp, c, args.seq_length, args.packing):
            writer.add(rows)
            text_tokens += stats["text_tokens"]
    writer.close()
    return text_tokens, writer.rows


# ------------------------------------------------------------------ parent side

class TreeSampler(threading.Thread):
    """Peak of the summed PSS (and RSS) of a process and all its descendants."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        import psutil
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_pss = self.peak_rss = 0
        self.samples = 0
        self.stop = threading.Event()

    def run(self):
        import psutil
        while not self.stop.is_set():
            pss = rss = 0
            try:
                procs = [self.root] + self.root.children(recursive=True)
            except psutil.Error:
                break
            for p in procs:
                try:
                    info = p.memory_full_info()
                    pss += info.pss
                    rss += info.rss
                except psutil.Error:
                    pass
            self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
            self.samples += 1
            self.stop.wait(self.interval)


def run_child(kind: str, corpus_dir: Path, spm: Path, args, work: Path, sample: bool,
              retries: int = 1) -> dict:
    """One run in a fresh child process, its memory sampled or not (see module doc); a
    failed one (e.g. Ray's start-up timing out on a busy box) is retried `retries` times."""
    try:
        return _run_child(kind, corpus_dir, spm, args, work, sample)
    except RuntimeError as e:
        if retries <= 0:
            raise SystemExit(str(e))
        print(f"{kind}: retrying after: {str(e).strip().splitlines()[-1]}", flush=True)
        return run_child(kind, corpus_dir, spm, args, work, sample, retries - 1)


def _run_child(kind: str, corpus_dir: Path, spm: Path, args, work: Path, sample: bool) -> dict:
    out = work / f"out-{kind}-{time.time_ns()}"
    cmd = [sys.executable, __file__, "--child", kind, "--corpus", str(corpus_dir), "--spm",
           str(spm), "--out", str(out), "--seq-length", str(args.seq_length), "--packing",
           args.packing, "--cpus", str(args.cpus)]
    load0 = os.getloadavg()[0]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    sampler = TreeSampler(proc.pid, args.interval) if sample else None
    if sampler:
        sampler.start()
    stdout, stderr = proc.communicate()
    if sampler:
        sampler.stop.set()
        sampler.join()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench child {kind} failed:\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["load"] = (load0 + os.getloadavg()[0]) / 2
    if sampler:
        result.update(peak_pss_mb=sampler.peak_pss / 2**20, peak_rss_mb=sampler.peak_rss / 2**20,
                      samples=sampler.samples)
    return result


def prepare(args) -> tuple[Path, Path]:
    from wr_train.demo.data import build_demo
    from wr_train.tokenizer import file_sha256, train_spm
    demo = Path(args.demo) if args.demo else CACHE / "demo"
    build_demo(str(demo), log=lambda *_: None)
    corpus_dir = demo / "corpus"
    if args.spm:
        return corpus_dir, Path(args.spm)
    digest = file_sha256(demo / "demo_manifest.json")[:12]
    spm = CACHE / f"spm-{args.vocab}-{args.sample}-{digest}"
    if not (spm / "meta.json").exists():
        print(f"training spm vocab {args.vocab} on {corpus_dir} (cached in {spm}) ...", flush=True)
        train_spm([str(corpus_dir)], str(spm), args.vocab, input_sentence_size=args.sample,
                  log=lambda *_: None)
    return corpus_dir, spm


def repeated_corpus(corpus_dir: Path, times: int, work: Path) -> Path:
    if times == 1:
        return corpus_dir
    d = work / f"corpus-x{times}"
    d.mkdir()
    for i in range(times):
        for f in sorted(corpus_dir.glob("*.txt")):
            (d / f"r{i:02d}-{f.name}").symlink_to(f.resolve())
    return d


def fmt_table(results: list[dict], cpus: int) -> str:
    head = ("| corpus | run | text tokens | seconds | tokens/s | CPU-s (tree) | tok/CPU-s | "
            f"{cpus}-core bound | peak PSS MB (tree) | max RSS MB (driver) | start-up s | load avg |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        per_cpu = r["text_tokens"] / r["cpu_seconds"]
        lines.append(
            f"| {r['scale']}x | {r['kind']} | {r['text_tokens'] / 1e6:.1f}M | {r['seconds']:.2f} | "
            f"{r['text_tokens'] / r['seconds'] / 1e6:.2f}M | {r['cpu_seconds']:.1f} | "
            f"{per_cpu / 1e6:.2f}M | {per_cpu * (1 if r['kind'] in SERIAL else cpus) / 1e6:.2f}M | "
            f"{r['peak_pss_mb']:.0f} | {r['max_rss_mb']:.0f} | {r['startup_seconds']:.1f} | "
            f"{r['load']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", help="demo data dir (default: built into the bench cache)")
    ap.add_argument("--spm", help="an spm dir (default: train one, cached)")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sample", type=int, default=2_000_000, help="spm input_sentence_size")
    ap.add_argument("--scales", default="1,10")
    ap.add_argument("--repeat", type=int, default=2, help="runs per cell; the fastest is kept")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--packing", default="full")
    ap.add_argument("--interval", type=float, default=0.1, help="memory sampling period, s")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--record", nargs="?", const=str(ROOT / "bench" / "RESULTS.md"),
                    help="write the table into the Preprocess section of bench/RESULTS.md")
    # child mode (internal)
    ap.add_argument("--child", choices=["spm1", "spm2", "plain", "plain2", "ray"], help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    corpus_dir, spm = prepare(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="wr-bench-") as tmp:
        work = Path(tmp)
        for scale in [int(s) for s in args.scales.split(",")]:
            cdir = repeated_corpus(corpus_dir, scale, work)
            kinds = ["spm1", "spm2"] if scale == 1 else []
            for kind in kinds + ["plain", "plain2", "ray"]:
                runs = [run_child(kind, cdir, spm, args, work, sample=False)
                        for _ in range(args.repeat)]
                mem = run_child(kind, cdir, spm, args, work, sample=True)
                best = min(runs, key=lambda r: r["seconds"])
                best.update(scale=scale, kind=kind, peak_pss_mb=mem["peak_pss_mb"],
                            max_rss_mb=max(r["max_rss_mb"] for r in runs + [mem]))
                results.append(best)
                print(f"{scale}x {kind}: " + ", ".join(
                    f"{r['text_tokens'] / r['seconds'] / 1e6:.2f}M tok/s in {r['seconds']:.1f}s "
                    f"(load {r['load']:.1f})" for r in runs)
                    + f"; memory run: peak {mem['peak_pss_mb']:.0f} MB PSS over "
                    f"{mem['samples']} samples", flush=True)
    report = render(results, args, spm)
    print()
    print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.record:
        record(Path(args.record), report)
        print(f"\nrecorded in {args.record}")


def render(results: list[dict], args, spm: Path) -> str:
    import platform
    by = {(r["scale"], r["kind"]): r for r in results}
    scales = sorted({r["scale"] for r in results})
    loads = [r["load"] for r in results]
    lines = [
        f"`python bench/preprocess.py {' '.join(sys.argv[1:])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')}: {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}), Ray with num_cpus={args.cpus}; "
        f"spm `{spm.name}` (vocab {args.vocab}), seq {args.seq_length}, packing {args.packing}; "
        f"best of {args.repeat} unsampled run(s) per row, peak PSS from one more run sampled "
        f"every {args.interval} s; load average during the runs "
        f"{min(loads):.1f}-{max(loads):.1f} (the box is shared).",
        "",
        fmt_table(results, args.cpus),
        "",
    ]
    for scale in scales:
        p, r = by[(scale, "plain")], by[(scale, "ray")]
        tp, tr = p["text_tokens"] / p["seconds"], r["text_tokens"] / r["seconds"]
        bound = r["text_tokens"] / r["cpu_seconds"] * args.cpus
        lines.append(f"- {scale}x: ray / plain throughput **{tr / tp:.2f}** (target >= 0.5: "
                     f"{'met' if tr / tp >= 0.5 else 'NOT met'}); ray **{tr / 1e6:.2f}M tok/s** "
                     f"measured (target >= 2.4M: {'met' if tr >= 2.4e6 else 'NOT met'}), "
                     f"{bound / 1e6:.2f}M tok/s on {args.cpus} idle cores at the measured CPU cost")
    if len(scales) > 1:
        lo, hi = scales[0], scales[-1]
        for kind in ("plain", "plain2", "ray"):
            if (hi, kind) in by and (lo, kind) in by:
                ratio = by[(hi, kind)]["peak_pss_mb"] / by[(lo, kind)]["peak_pss_mb"]
                exact = by[(hi, kind)]["max_rss_mb"] / by[(lo, kind)]["max_rss_mb"]
                lines.append(f"- {kind}: peak memory {hi}x / {lo}x = **{ratio:.2f}** (tree PSS; "
                             f"target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'}), driver "
                             f"max RSS {exact:.2f}")
    return "\n".join(lines)


def record(path: Path, report: str) -> None:
    """Replace the body of the "## Preprocess" section of RESULTS.md (other sections stay);
    the hand-written notes below the marker line are kept."""
    marker = "<!-- bench/preprocess.py writes above this line -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head, sep, rest = text.partition("## Preprocess\n")
    if not sep:
        head, rest = text.rstrip("\n") + "\n\n", ""
    nxt = rest.find("\n## ")
    body, tail = (rest, "") if nxt < 0 else (rest[:nxt + 1], rest[nxt + 1:])
    notes = body.split(marker, 1)[1] if marker in body else "\n"
    path.write_text(f"{head}## Preprocess\n\n{report}\n\n{marker}{notes}{tail}")


if __name__ == "__main__":
    main()
