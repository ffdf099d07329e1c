"""The CLUE grid as a Ray Tune sweep: best-of-grid per task, the seed's score table.

The seed reports, per model, the best **dev** accuracy of an 18-configuration grid
(epochs {3,5,8} × batch {32,64} × lr {3e-5,1e-4,3e-4}, seq 128) on each task, and their
mean as "Score". Here every (task, epochs, batch, lr, seed) is one Tune trial: a plain
function trainable that fine-tunes on one GPU (or one CPU here) — no TorchTrainer start-up
per trial (NOTES.md: `Tuner(TorchTrainer)` fails in Ray 2.60 anyway).

Resources are asked for, never guessed from the cluster of the moment: `gpus_per_trial`
(`--gpus-per-trial`, `--gpu` = 1) is what each trial requests, so on a cluster that scales
from zero the pending trials are what makes the autoscaler start GPU nodes; a trial that
Ray gave a GPU but finds no CUDA device fails with one line. A failed trial (a lost spot
node, a crashed worker) is run again up to `max_failures` times. Tune's own experiment
directory (results, TensorBoard events, error files) is STORAGE/NAME/tune/.

A sweep lives in STORAGE/NAME/ (the layout and the trial records: wr_train.tune_trials;
scores.json/.md/.png: wr_train.tune_report). Running the same sweep again (same NAME)
skips the trials whose file exists, so an interrupted sweep resumes where it stopped and
a finished one only rebuilds the report. Trials write their files themselves, so on a
multi-node cluster STORAGE must be s3:// or a shared filesystem; the model and task data
travel to the trials via Ray's object store (the model is written once per node under
$TMPDIR/wr-train-models/<sha>/ and reused).

Entry point: `run_sweep(SweepConfig(...))` (`wr-train sweep`, ray_jobs/tune_clue.py, the demo,
bench/reproduce.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import posixpath
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from ray import tune

from wr_train import s3
from wr_train import storage
from wr_train.config import ConfigError, check_plain_name
from wr_train.local_ray import ensure_ray, root_cause_line
from wr_train.tracking import TrackingError, check_installed, parse_report_to
from wr_train.tune_report import add_scores_to_card, pct, write_report
from wr_train.tune_trials import (SEED_BATCH_SIZES, SEED_EPOCHS, SEED_LRS, SweepError, TrialSpec,
                                  best_by_task, build_grid, checkpoint_path, dev_key, read_trials,
                                  trial_path)

@dataclasses.dataclass
class SweepConfig:
    """One sweep: a model, tasks and the grid (`wr-train sweep` / ray_jobs/tune_clue.py)."""
    model_dir: str                       # exported HuggingFace directory (wr-train export)
    tasks: object                        # names, or "a,b,c" / "all"
    data_dir: str                        # one directory per task
    storage: str = "results"             # local dir or s3://; the sweep lives in STORAGE/NAME
    name: str | None = None              # default clue-<model>; the same name resumes
    epochs: tuple = SEED_EPOCHS
    batch_sizes: tuple = SEED_BATCH_SIZES
    lrs: tuple = SEED_LRS
    seeds: int = 1
    max_train_examples: int = 0          # 0 = all
    max_eval_examples: int = 0
    seq_length: int = 128
    asha: bool = False
    save_best: bool = True
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0.0          # what each trial asks Ray for (0: CPU trials)
    max_concurrent: int | None = None
    max_failures: int = 3                # retries of a failed trial (spot nodes come and go)
    model_name: str | None = None        # the model's name in the score table
    report_to: str = "tensorboard"       # also mlflow, wandb: every trial through Tune's callbacks
    verbose: bool = False
    overrides: tuple = ()                # further FinetuneConfig key=value (warmup=0.1, ...)


MODEL_SKIP = (".png", ".md")  # export extras trials do not need
TUNE_DIR = "tune"             # Tune's experiment directory inside the sweep's


# ---------------------------------------------------------------- fingerprints

def model_files(model_dir: str) -> dict[str, bytes]:
    """The files a trial needs to load the export (top level, no plots/cards)."""
    files = {}
    for p in sorted(Path(model_dir).iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix not in MODEL_SKIP:
            files[p.name] = p.read_bytes()
    return files


def fingerprint(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


def task_fingerprint(task) -> str:
    h = hashlib.sha256()
    for split in ("train", "dev", "test"):
        path = task.files.get(split)
        if path:
            h.update(split.encode() + Path(path).read_bytes())
    return h.hexdigest()


def materialize_model(files: dict[str, bytes], sha: str) -> str:
    """Write the shipped model files once per node (keyed by content) and return the dir."""
    root = Path(tempfile.gettempdir()) / "wr-train-models"
    final = root / sha[:24]
    if (final / ".complete").is_file():
        return str(final)
    staging = root / f".{sha[:24]}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    for name, data in files.items():
        (staging / name).write_bytes(data)
    (staging / ".complete").write_text(sha)
    try:
        os.replace(staging, final)  # atomic; loses to a concurrent winner harmlessly
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return str(final)


# ---------------------------------------------------------------- sweep files

def _record(spec: TrialSpec, result: dict | None, status: str) -> dict:
    rec = {"key": spec.key, "spec": dataclasses.asdict(spec), "status": status, "checkpoint": None}
    if result is not None:
        rec.update({k: result.get(k) for k in (
            "dev_acc", "dev_f1", "test_acc", "test_f1", "best_epoch", "majority_dev", "seconds",
            "train_examples", "dev_examples", "test_examples", "device", "precision", "threads")})
        rec["epochs"] = result.get("epochs", [])
        rec["config"] = result.get("config")
    return rec


# ---------------------------------------------------------------- the trainable

def _trial(config: dict, payload: dict) -> None:
    """One Tune trial: fine-tune, report each epoch, upload the model if it is the task's
    best so far, write trials/<key>.json (its presence marks the trial done). The last
    epoch is reported only after that: a scheduler may stop the trial on that report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key, value in payload["env"].items():  # S3 endpoint/region/profile, never keys
        os.environ.setdefault(key, value)
    from wr_train.finetune import FinetuneConfig, finetune
    spec = TrialSpec(**config["trial"])
    device = _trial_device(spec, payload["gpus_per_trial"])
    model_dir = materialize_model(payload["model_files"], payload["model_sha"])
    task = payload["tasks"][spec.task]
    base = payload["base_config"]
    cfg = FinetuneConfig(**{**base, "epochs": spec.epochs, "batch_size": spec.batch_size,
                            "lr": spec.lr, "seed": spec.seed,
                            "device": device if base.get("device", "auto") == "auto" else base["device"]})
    sweep_dir = payload["sweep_dir"]
    last: list[dict] = []

    def report(metrics: dict) -> None:
        if metrics["epoch"] < spec.epochs:
            tune.report(metrics)
        else:
            last.append(metrics)

    with tempfile.TemporaryDirectory(prefix="wr-trial-") as tmp:
        save_dir = os.path.join(tmp, "best") if payload["save_best"] else None
        result = finetune(model_dir, task, cfg, report=report, save_dir=save_dir)
        rec = _record(spec, result, "done")
        if save_dir and _beats_finished(sweep_dir, rec):
            dest = checkpoint_path(sweep_dir, spec.key)
            storage.copy_tree(save_dir, dest, progress=False)
            rec["checkpoint"] = dest
    storage.write_text(trial_path(sweep_dir, spec.key), json.dumps(rec, indent=1))
    tune.report(last[-1])


def _trial_device(spec: TrialSpec, gpus_per_trial: float) -> str:
    """"cuda" where Ray gave the trial a GPU, "cpu" where it gave none. A GPU from Ray
    that torch cannot see (a CPU build of torch, no driver) fails the trial in one line
    rather than running it on the CPU unnoticed."""
    if not gpus_per_trial > 0:
        return "cpu"
    import ray
    import torch
    if torch.cuda.is_available():
        return "cuda"
    ids = ",".join(str(i) for i in ray.get_gpu_ids()) or "none"
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
    raise SweepError(f"trial {spec.key}: Ray gave it GPU {ids} on {socket.gethostname()}, but "
                     f"torch {torch.__version__} ({build}) finds no CUDA device there: install "
                     f"a CUDA torch on the GPU nodes, or run the sweep with --gpus-per-trial 0")


def _last_error(trial) -> str:
    """The one line naming why a trial's last attempt failed (from Tune's error file)."""
    try:
        text = Path(trial.error_file).read_text(errors="replace")
    except (OSError, TypeError):
        return "no error file (see Ray's logs)"
    last = re.split(r"^Failure # \d+.*$", text, flags=re.M)[-1].strip()
    line = root_cause_line(RuntimeError(last)) if last else "unknown error"
    return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=\w*(?:Error|Exception)\b)", "", line)[:500]


def _beats_finished(sweep_dir: str, rec: dict) -> bool:
    """Is `rec` better than every finished trial of its task that kept its model (only then
    is its model uploaded)?"""
    others = [r for r in read_trials(sweep_dir, rec["spec"]["task"]).values()
              if r["key"] != rec["key"] and r.get("checkpoint")]
    return all(dev_key(rec) > dev_key(r) for r in others)


# ---------------------------------------------------------------- the driver

class _Progress(tune.Callback):
    """Logs trial ends with done/total and the best dev score so far per task; writes the
    record of a trial that ASHA stopped early; prunes the models of trials that are not
    their task's best."""

    def __init__(self, sweep_dir, specs_by_key, total, finished, log, verbose, max_failures=0):
        self.sweep_dir, self.specs, self.total = sweep_dir, specs_by_key, total
        self.max_failures = max_failures
        self.records = dict(finished)
        self.log, self.verbose = log, verbose
        self.history: dict[str, list] = {}   # key -> epoch rows
        self.last: dict[str, dict] = {}       # key -> last reported metrics
        self.failed: list[str] = []
        self.started = time.monotonic()

    def __getstate__(self) -> dict:
        # Tuner pickles its callbacks into the experiment state; `log` (print, a logger
        # method) need not survive that: this sweep resumes from its trial files instead.
        return {**self.__dict__, "log": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.log = self.log or (lambda *_: None)

    def _spec(self, trial) -> TrialSpec:
        return TrialSpec(**trial.config["trial"])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        spec = self._spec(trial)
        row = {k: result.get(k) for k in ("epoch", "train_loss", "dev_acc", "dev_f1",
                                          "train_seconds", "examples_per_s", "seconds")}
        self.history.setdefault(spec.key, []).append(row)
        self.last[spec.key] = dict(result)
        if self.verbose:
            self.log(f"[tune] {spec.task} {spec.label()} s{spec.seed}: epoch "
                     f"{row['epoch']}/{spec.epochs} dev acc {100 * (row['dev_acc'] or 0):.2f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        try:
            self._complete(trial)
        except Exception as e:  # never let reporting kill the sweep
            self.log(f"[tune] warning: bookkeeping of {trial} failed: {e}")

    def _complete(self, trial):
        spec = self._spec(trial)
        path = trial_path(self.sweep_dir, spec.key)
        if storage.exists(path):
            rec = json.loads(storage.read_text(path))
        else:  # stopped by the scheduler before it could write its record
            last = self.last.get(spec.key, {})
            result = {"dev_acc": last.get("best_dev_acc"), "dev_f1": last.get("best_dev_f1"),
                      "test_acc": last.get("test_acc"), "test_f1": last.get("test_f1"),
                      "best_epoch": last.get("best_epoch"), "majority_dev": last.get("majority_dev"),
                      "epochs": self.history.get(spec.key, [])}
            rec = _record(spec, result, "stopped_early")
            storage.write_text(path, json.dumps(rec, indent=1))
        self.records[spec.key] = rec
        self._prune(spec.task)
        done = sum(1 for k in self.specs if k in self.records)
        self.log(f"[tune] {done}/{self.total} trials done ({_elapsed(self.started)}): "
                 f"{spec.task} {spec.label()} s{spec.seed} dev {pct(rec.get('dev_acc'))}"
                 f"{' (stopped early)' if rec['status'] == 'stopped_early' else ''} | best: "
                 + ", ".join(f"{t} {pct(r['dev_acc'])} ({TrialSpec(**r['spec']).label()})"
                             for t, r in best_by_task(self.records.values()).items()))

    def _prune(self, task):
        recs = [r for r in self.records.values() if r["spec"]["task"] == task and r.get("checkpoint")]
        if not recs:
            return
        best = max(recs, key=dev_key)
        for r in recs:
            if r is not best and r.get("checkpoint"):
                storage.remove_tree(r["checkpoint"])
                r["checkpoint"] = None
                storage.write_text(trial_path(self.sweep_dir, r["key"]), json.dumps(r, indent=1))

    def on_trial_recover(self, iteration, trials, trial, **info):
        spec = self._spec(trial)
        self.log(f"[tune] trial {spec.key} failed ({_last_error(trial)}); running it again "
                 f"(retry {trial.run_metadata.num_failures} of {self.max_failures})")

    def on_trial_error(self, iteration, trials, trial, **info):
        spec = self._spec(trial)
        self.failed.append(spec.key)
        tries = f" {self.max_failures + 1} times" if self.max_failures else ""
        self.log(f"[tune] trial {spec.key} failed{tries}: {_last_error(trial)} "
                 f"(running the same sweep again retries it)")


def _elapsed(start: float) -> str:
    s = int(time.monotonic() - start)
    return f"{s // 60}m{s % 60:02d}s"


def trial_resources(cluster: dict, cpus_per_trial: float | None,
                    gpus_per_trial: float) -> tuple[dict, int | None]:
    """Per-trial resources (`cpus_per_trial`, default 1, and `gpus_per_trial` as given,
    whatever the cluster has now) and how many trials may run at once: for CPU trials what
    the cluster's CPUs hold now; for GPU trials no cap (None): Tune queues them and the
    pending requests are what an autoscaler starts GPU nodes for."""
    cpu = cpus_per_trial or 1.0
    if gpus_per_trial > 0:
        return {"cpu": cpu, "gpu": gpus_per_trial}, None
    return {"cpu": cpu}, max(1, int(float(cluster.get("CPU", 1)) // cpu))


def default_model_name(model_dir: str) -> str:
    p = Path(model_dir).resolve()
    return f"{p.parent.name}/{p.name}" if p.name in ("hf", "model", "export", "out") else p.name


def _default_name(model_dir: str) -> str:
    return "clue-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", default_model_name(model_dir)).strip("-")


def run_sweep(cfg: SweepConfig, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) the grid; return {"sweep_dir", "scores_md" (= "table"), "scores", "best",
    "score", "trials_run", "trials_skipped", "failed", "missing"} (missing: keys of grid
    trials without a result, e.g. after a failure or Ctrl-C; running again completes them).
    Everything is checked before any trial starts.
    """
    from wr_train.hf import check_hf_dir
    from wr_train.finetune import config_from_overrides
    from wr_train.tasks import load_tasks, parse_task_list
    # local paths as the user's shell means them: trials run in Ray's directories
    root = storage.absolute(cfg.storage or "results")
    model_dir, data_dir = storage.absolute(str(cfg.model_dir)), storage.absolute(str(cfg.data_dir))
    tasks, epochs, batch_sizes, lrs = cfg.tasks, cfg.epochs, cfg.batch_sizes, cfg.lrs

    # -- everything that can be wrong with the input fails here, before Ray starts
    check_hf_dir(model_dir)
    names = parse_task_list(tasks) if isinstance(tasks, str) else list(tasks)
    loaded = load_tasks(names, data_dir)
    specs = build_grid(list(loaded), list(epochs), list(batch_sizes), list(lrs), cfg.seeds)
    base = dataclasses.asdict(config_from_overrides(
        cfg.overrides, seq_length=cfg.seq_length, max_train_examples=cfg.max_train_examples,
        max_eval_examples=cfg.max_eval_examples))
    if cfg.cpus_per_trial is not None and not cfg.cpus_per_trial > 0:
        raise SweepError(f"--cpus-per-trial {cfg.cpus_per_trial}: expected a positive number (Ray refuses 0)")
    if cfg.gpus_per_trial < 0 or (cfg.max_concurrent is not None and cfg.max_concurrent < 1):
        raise SweepError("--gpus-per-trial must be >= 0 and --max-concurrent >= 1")
    if isinstance(cfg.max_failures, bool) or not isinstance(cfg.max_failures, int) or cfg.max_failures < 0:
        raise SweepError(f"--max-failures {cfg.max_failures}: expected an integer >= 0")
    try:
        trackers = parse_report_to(cfg.report_to)
        check_installed(trackers)
        name = check_plain_name(_default_name(model_dir) if cfg.name is None else cfg.name, "--name")
    except (TrackingError, ConfigError) as e:
        raise SweepError(str(e)) from None
    sweep_dir = storage.join(root, name)
    storage.check_writable(sweep_dir)
    files = model_files(model_dir)
    model_sha = fingerprint(files)
    meta = {"model": str(model_dir), "model_sha256": model_sha, "data": str(data_dir),
            "task_sha256": {t: task_fingerprint(task) for t, task in loaded.items()},
            "finetune": {k: base[k] for k in ("seq_length", "max_train_examples", "max_eval_examples",
                                              "warmup", "weight_decay", "clip")},
            "grid": {"epochs": list(epochs), "batch_sizes": list(batch_sizes), "lrs": list(lrs),
                     "seeds": cfg.seeds}, "asha": cfg.asha}
    meta = _check_resume(sweep_dir, meta)

    finished = {k: r for k, r in read_trials(sweep_dir).items()
                if k in {s.key for s in specs}}
    pending = [s for s in specs if s.key not in finished]
    log(f"[tune] sweep {sweep_dir}: {len(loaded)} task(s) × "
        f"{len(specs) // len(loaded)} configuration(s) = {len(specs)} trials; "
        f"{len(finished)} already done, {len(pending)} to run")
    for task in loaded.values():
        log(f"[tune]   {task.summary()}")

    failed: list[str] = []
    if pending:
        failed = _run_tune(cfg, _Grid(pending, specs, finished, loaded), files, model_sha, base,
                           sweep_dir, model_dir, trackers, log)
    records = {k: r for k, r in read_trials(sweep_dir).items() if k in {s.key for s in specs}}
    report = write_report(sweep_dir, specs, records, loaded, meta,
                          cfg.model_name or default_model_name(model_dir), log)
    missing = report["scores"]["missing"]
    if add_scores_to_card(str(model_dir), report["scores_md"]):  # model_dir is local (check_hf_dir)
        log(f"[tune] added the score table to the model card {Path(model_dir, 'README.md')}")
    report.update(trials_run=len(pending) - len(missing), trials_skipped=len(finished),
                  failed=failed, missing=missing)
    return report


def _check_resume(sweep_dir: str, meta: dict) -> dict:
    path = storage.join(sweep_dir, "sweep.json")
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        if old.get("model_sha256") != meta["model_sha256"]:
            raise SweepError(f"{sweep_dir}: this sweep was run with another model ({old.get('model')}); "
                             f"use a new --name")
        if old.get("finetune") != meta["finetune"]:
            raise SweepError(f"{sweep_dir}: this sweep was run with other settings ({old.get('finetune')}); "
                             f"use a new --name")
        for t, sha in meta["task_sha256"].items():
            if old.get("task_sha256", {}).get(t, sha) != sha:
                raise SweepError(f"{sweep_dir}: task {t}'s data changed since this sweep ran; "
                                 f"use a new --name")
        meta["task_sha256"] = {**old.get("task_sha256", {}), **meta["task_sha256"]}
        meta["created"] = old.get("created")
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    storage.write_text(path, json.dumps(meta, indent=1))
    return meta


@dataclasses.dataclass
class _Grid:
    """The sweep's trials: those to run, all of them, those done, the tasks they read."""
    pending: list
    specs: list
    finished: dict
    loaded: dict


def _run_tune(cfg: SweepConfig, grid: _Grid, files: dict, model_sha: str, base: dict, sweep_dir: str,
              model_dir: str, trackers: tuple, log) -> list[str]:
    import ray
    pending, specs, finished, loaded = grid.pending, grid.specs, grid.finished, grid.loaded
    asha, cpus_per_trial, gpus_per_trial = cfg.asha, cfg.cpus_per_trial, cfg.gpus_per_trial
    max_concurrent, verbose, max_failures = cfg.max_concurrent, cfg.verbose, cfg.max_failures

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # verbose=0 then prints no tables
    if not verbose:  # a failed trial is one [tune] line; its traceback stays in Tune's error.txt
        os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    ensure_ray(verbose=verbose)  # attaches to the cluster when RAY_ADDRESS is set
    cluster = ray.cluster_resources()
    resources, fits = trial_resources(cluster, cpus_per_trial, gpus_per_trial)
    concurrent = max(1, min(n for n in (len(pending), fits, max_concurrent) if n))
    # torch threads = the trial's whole CPUs: oversubscribed threads spin and crawl (NOTES.md)
    base = {**base, "threads": base.get("threads") or max(1, int(resources["cpu"]))}
    log(f"[tune] {len(pending)} trials, {'up to ' * (fits is None)}{concurrent} at a time, each "
        + ", ".join(f"{v:g} {k.upper()}" for k, v in resources.items())
        + f" ({base['threads']} torch thread{'s' * (base['threads'] > 1)}); a failed trial "
        f"runs again up to {max_failures} time{'s' * (max_failures != 1)}")
    if gpus_per_trial > 0 and float(cluster.get("GPU", 0)) < gpus_per_trial:
        log(f"[tune] the cluster has {float(cluster.get('GPU', 0)):g} GPUs now: the trials wait "
            f"until the autoscaler adds GPU nodes (--gpus-per-trial 0 runs them on CPUs)")
    # Task payloads live in Ray's object store (and its spill files): the S3 settings go
    # along, never the keys; trials get those as the driver did (env, profile, instance role).
    payload = {"model_files": files, "model_sha": model_sha, "tasks": {t: loaded[t] for t in
               {s.task for s in pending}}, "base_config": base, "sweep_dir": sweep_dir,
               "save_best": cfg.save_best, "model_dir": str(model_dir),
               "gpus_per_trial": gpus_per_trial,
               "env": s3.settings_env() if storage.is_s3(sweep_dir) else {}}
    trainable = tune.with_resources(tune.with_parameters(_trial, payload=payload), resources)
    scheduler = None
    if asha:
        from ray.tune.schedulers import ASHAScheduler
        scheduler = ASHAScheduler(time_attr="epoch", metric="dev_acc", mode="max",
                                  max_t=max(s.epochs for s in pending), grace_period=1,
                                  reduction_factor=3)
    progress = _Progress(sweep_dir, {s.key: s for s in specs}, len(specs), finished, log, verbose,
                         max_failures)
    # Tune's experiment directory (per-trial results, TensorBoard events, error files) is
    # STORAGE/NAME/tune/, beside the sweep's own files; each trial's folder is its key + id.
    fs, root = storage.resolve(storage.join(sweep_dir, TUNE_DIR))
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([dataclasses.asdict(s) for s in pending])},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, scheduler=scheduler,
                                    reuse_actors=True,
                                    trial_name_creator=lambda t: t.config["trial"]["task"],
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=posixpath.basename(root),
                                  storage_path=posixpath.dirname(root),
                                  storage_filesystem=fs if storage.is_s3(sweep_dir) else None,
                                  verbose=0, callbacks=[progress, *tracker_callbacks(trackers, sweep_dir)],
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    with _keys_not_copied_to_trials():
        tuner.fit()
    return progress.failed


# Ray Tune copies these from the driver's environment into every trial actor's runtime_env
# (ray.tune.execution.class_cache), which Ray keeps in the actor's spec and its runtime-env
# agent writes to its log: kept out here; trials get credentials as every Ray worker does
# (the node's environment, profile, instance role).
TUNE_COPIED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                    "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def _keys_not_copied_to_trials():
    from ray.tune.execution import class_cache
    copied = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = set(copied) - set(TUNE_COPIED_KEYS)
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = copied


def tracker_callbacks(trackers: tuple, sweep_dir: str) -> list:
    """Tune's own logger callbacks for --report-to mlflow / wandb: one tracked run per trial,
    its config as params and every epoch's results (TensorBoard events are Tune's default,
    in STORAGE/NAME/tune/). Where they log comes from this process's environment
    (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME; WANDB_PROJECT, WANDB_MODE, WANDB_DIR)."""
    out = []
    name = posixpath.basename(sweep_dir.rstrip("/"))
    if "mlflow" in trackers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback
        out.append(MLflowLoggerCallback(
            tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"),
            experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "wr-train"),
            tags={"wr_train.sweep": name}))
    if "wandb" in trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback
        settings = {k: os.environ[v] for k, v in (("mode", "WANDB_MODE"), ("dir", "WANDB_DIR"))
                    if os.environ.get(v)}
        out.append(WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT", "wr-train"), group=name,
                                       **settings))
    return out


def _trial_dirname(trial) -> str:
    return f"{TrialSpec(**trial.config['trial']).key}_{trial.trial_id}"
