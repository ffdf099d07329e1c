"""Starting (or joining) Ray the way every wr-train command needs it, and keeping its
console to wr-train's own lines.

One place for `ray.init`: the dashboard stays on because Ray Train's PlacementGroupCleaner
asks the state API (served by the dashboard) whether the controller is alive, once a
second; without it every query fails with "State API may be temporarily unavailable".
Ray's and DeepSpeed's chatter stays in Ray's session logs (/tmp/ray/session_latest/logs)
unless `verbose`: the console shows what the training workers write (wr-train's progress
lines, and errors), not the notes of Ray's own actors (the Train controller, the cleaner,
the raylet), which Ray forwards to every driver.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

QUIET_LEVEL = logging.ERROR  # Ray's own driver logger: start-up notes, token-auth notice
CONSOLE_SOURCES = ("RayTrainWorker",)  # Ray actors whose output the console shows


def ensure_ray(*, local: bool = False, num_cpus: int | None = None, gpu: bool = False,
               verbose: bool = False) -> None:
    """Join the cluster named by RAY_ADDRESS (a `ray job submit` job, or `ray start`),
    else start a local one; `local=True` always starts a fresh local Ray (the demo).
    Does nothing if Ray is already initialized."""
    import ray
    if ray.is_initialized():
        return
    env = worker_env(gpu)
    ray.init(address="local" if local else None, num_cpus=num_cpus, include_dashboard=True,
             log_to_driver=True, logging_level=logging.INFO if verbose else QUIET_LEVEL,
             runtime_env={"env_vars": env} if env else None)
    if not verbose:
        forward_only_worker_lines()


def worker_env(gpu: bool) -> dict[str, str]:
    """Environment of Ray's worker processes on CPU runs (measured in bench/RESULTS.md):
    - DS_ACCELERATOR=cpu: DeepSpeed's CPU accelerator.
    - OMP_NUM_THREADS=1 at process start: Ray's set-up runs torch ops in the worker's main
      thread, and a second OpenMP team there makes libgomp stop spin-waiting, so every small
      op of the loop's thread waits for its threads to wake; the loop's thread sets its own
      count (torch.set_num_threads, per thread).
    - THP_MEM_ALLOC_ENABLE=1 (huge pages for torch's big CPU tensors) and MALLOC_ARENA_MAX=1
      (the loop's thread allocates from the main heap that machine.keep_freed_memory keeps),
      so a fresh head-sized tensor does not fault its pages in one by one."""
    return {} if gpu else {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "1",
                           "MALLOC_ARENA_MAX": "1"}


def forward_only_worker_lines() -> None:
    """Show only CONSOLE_SOURCES' lines of what Ray forwards from its processes.

    Ray has no public switch for this: it hands every forwarded batch to the handlers of
    `global_worker_stdstream_dispatcher`; ours passes the training workers' batches on to
    Ray's own printer. Another Ray version without that hook keeps Ray's console as is.
    """
    try:
        from ray._private import worker as ray_worker
        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        ray_print = dict(dispatcher.handlers)["ray_print_logs"]
    except (ImportError, AttributeError, KeyError):
        return

    def print_worker_lines(data: dict) -> None:
        if any(src in (data.get("actor_name") or "") for src in CONSOLE_SOURCES):
            ray_print(data)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_worker_lines)


def quiet_ray_data(verbose: bool = False) -> None:
    """Ray Data's INFO notes (execution plans, "Starting execution of Dataset …") stay in
    its log file; preprocess prints its own progress."""
    if not verbose:
        import ray.data  # noqa: F401  (configures its logger on import)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # incl. "progress bars disabled"


def train_logging_config(verbose: bool):
    """Ray Train's console level: its worker-group notes are INFO, and it warns with a
    traceback whenever a resource request to its autoscaling coordinator is slow (a busy
    CPU box); real failures come back from `fit()` and wr-train names them."""
    import ray.train
    return ray.train.LoggingConfig(log_level="INFO" if verbose else "ERROR")


def quiet_worker(verbose: bool) -> None:
    """In a training worker: DeepSpeed's INFO lines and torch.distributed's deprecation
    warnings stay out of the console (they are about library internals, not the run)."""
    if verbose:
        return
    import deepspeed  # noqa: F401  (its logger is made at import; set the level after)
    for name in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Ray Train's "Reporting training result N: TrainingReport(...)" is logged at INFO by
    # a logger named after its file, i.e. under root, not under ray.train's level
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.distributed")


def hide_prints(verbose: bool):
    """Swallow a library's stdout prints (DeepSpeed's "op built successfully", zero_to_fp32's
    per-shard lines): a worker's stdout reaches the driver's, which carries the result."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def root_cause_line(e: BaseException) -> str:
    """The line of a Ray-wrapped exception that names the original error: Ray puts the
    worker's traceback in the message, and its first line only names the task."""
    text = str(e).strip().splitlines()
    for line in reversed(text):
        if "Error" in line and ":" in line:
            return line.strip()
    return text[-1].strip() if text else type(e).__name__
