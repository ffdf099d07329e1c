"""A run's metrics in the trackers a user names (`--report-to tensorboard,mlflow,wandb`).

TensorBoard writes event files into the run folder (no extra package). MLflow and Weights
& Biases are optional extras (`pip install 'wr-train[mlflow]'`, `'wr-train[wandb]'`); naming
one that is not installed is a one-line error before anything starts.

Pretraining (`Trackers`, opened by rank 0 of the workers): the resolved recipe as params,
every reported metrics row (loss, accuracy, lr, tokens/s, MFU, held-out eval loss beside
the unigram floor), the loss plot at the end. The run's MLflow / W&B ids are kept in
RUN_DIR/tracking.json, so a resumed run continues the same tracked run and `wr-train export`
adds the model card to it.

Where to log comes from the usual environment of the process that starts the run:
MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE,
WANDB_DIR. These are handed to the workers (`tracker_env`); secrets (WANDB_API_KEY,
MLFLOW_TRACKING_TOKEN / _PASSWORD) are not: the workers must find them in their own
environment (the cluster's runtime_env or node settings), as with S3 credentials.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from wr_train import storage

TRACKERS = ("tensorboard", "mlflow", "wandb")
EXTRA = {"mlflow": "mlflow", "wandb": "wandb"}  # tracker -> the pip extra that installs it
PASSED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE",
              "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "WANDB_DIR")
IDS = "tracking.json"
# metrics rows' keys that are not series to plot
NOT_METRICS = ("step", "stage", "stage_step", "time")


class TrackingError(ValueError):
    """A bad --report-to value or a tracker that is not installed; one line."""


def parse_report_to(value: str, key: str = "--report-to") -> tuple[str, ...]:
    """'tensorboard,mlflow' -> ('tensorboard', 'mlflow'); 'none' or '' -> ()."""
    names = tuple(n.strip().lower() for n in str(value).split(",") if n.strip())
    if names in ((), ("none",)):
        return ()
    bad = [n for n in names if n not in TRACKERS]
    if bad:
        raise TrackingError(f"{key} {value!r}: unknown tracker {bad[0]!r}; expected a comma list of "
                            f"{', '.join(TRACKERS)} (or none)")
    return tuple(dict.fromkeys(names))


def check_installed(names) -> None:
    """Import each named tracker now: a missing one is a one-line error naming its extra."""
    for name in names:
        if name in EXTRA:
            try:
                __import__(name)
            except ImportError:
                raise TrackingError(f"--report-to {name}: {name} is not installed; "
                                    f"pip install 'wr-train[{EXTRA[name]}]'") from None


def tracker_env() -> dict[str, str]:
    """The trackers' non-secret settings of this process, to hand to Ray workers."""
    return {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{'stages.0.lr': '0.001', ...}: a nested config as tracker params."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                out.update(flatten(v, f"{name}.{i}."))
        else:
            out[name] = str(value)
    return out


def metric_series(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The MLflow and W&B runs of one pretraining run (TensorBoard is written from the
    history at each checkpoint, `write_tensorboard`). Every method is a no-op for trackers
    not named."""

    def __init__(self, names, run_dir: str, run_name: str, config: dict, env: dict | None = None):
        self.names, self.run_dir, self.run_name, self.config = tuple(names), run_dir, run_name, config
        os.environ.update(env or {})
        self.mlflow = self.mlflow_run = self.wandb_run = None

    def _ids(self) -> dict:
        path = storage.join(self.run_dir, IDS)
        return json.loads(storage.read_text(path)) if storage.exists(path) else {}

    def open(self) -> "Trackers":
        ids = self._ids()
        if "mlflow" in self.names:
            self.mlflow = mlflow_client(ids.get("mlflow_tracking_uri"))
            ids["mlflow_tracking_uri"] = self.mlflow.tracking_uri
            run_id = ids.get("mlflow_run_id")
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "wr-train")
                exp = self.mlflow.get_experiment_by_name(name)
                exp_id = exp.experiment_id if exp else self.mlflow.create_experiment(name)
                run_id = self.mlflow.create_run(exp_id, run_name=self.run_name,
                                                tags={"wr_train.run_dir": self.run_dir}).info.run_id
                for key, value in flatten(self.config).items():
                    self.mlflow.log_param(run_id, key, value[:6000])
            else:
                self.mlflow.update_run(run_id, status="RUNNING")
            self.mlflow_run = ids["mlflow_run_id"] = run_id
        if "wandb" in self.names:
            import wandb
            self.wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "wr-train"), name=self.run_name,
                id=ids.get("wandb_run_id") or uuid.uuid4().hex[:12], resume="allow",
                config=self.config, dir=os.environ.get("WANDB_DIR"), reinit="create_new")
            ids["wandb_run_id"] = self.wandb_run.id
            # probe results land after their step (log_late): plotted against their own step
            self.wandb_run.define_metric("pretrain/probe_*", step_metric="pretrain/checkpoint_step")
        if ids != self._ids():
            storage.write_text(storage.join(self.run_dir, IDS), json.dumps(ids, indent=1))
        return self

    def log(self, row: dict) -> None:
        self._log_mlflow(row)
        if self.wandb_run is not None:
            self.wandb_run.log({f"pretrain/{k}": v for k, v in metric_series(row).items()},
                               step=int(row["step"]))

    def log_late(self, row: dict) -> None:
        """A row of an earlier step than the last logged (a downstream probe's result,
        which lands after its checkpoint). MLflow takes any step; W&B's steps only go
        forward, so there the row goes at W&B's current step with its own as checkpoint_step."""
        self._log_mlflow(row)
        if self.wandb_run is not None:
            self.wandb_run.log({**{f"pretrain/{k}": v for k, v in metric_series(row).items()},
                                "pretrain/checkpoint_step": int(row["step"])})

    def _log_mlflow(self, row: dict) -> None:
        if self.mlflow is not None:
            from mlflow.entities import Metric
            stamp = int(row.get("time", time.time()) * 1000)
            self.mlflow.log_batch(self.mlflow_run, metrics=[
                Metric(f"pretrain/{k}", v, stamp, int(row["step"])) for k, v in metric_series(row).items()])

    def artifact(self, path: str) -> None:
        if self.mlflow is not None:
            self.mlflow.log_artifact(self.mlflow_run, path)
        if self.wandb_run is not None:
            self.wandb_run.save(path, base_path=os.path.dirname(path), policy="now")

    def close(self, ok: bool = True) -> None:
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run, status="FINISHED" if ok else "FAILED")
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=0 if ok else 1)

    def log_plot(self, history: list[dict]) -> None:
        """The loss plot of the whole history as an artifact."""
        if not (self.mlflow or self.wandb_run) or not history:
            return
        with tempfile.TemporaryDirectory(prefix="wr-plot-") as tmp:
            path = Path(tmp) / "loss.png"
            loss_plot(history, path)
            self.artifact(str(path))


def probed_rows(history: list[dict]) -> list[dict]:
    """The rows that hold a downstream probe's result (wr_train.probe), in step order."""
    return [h for h in history if "probe_acc" in h]


def mlflow_client(uri: str | None = None):
    """An MLflow client for the run's store: the one it was created in, else MLFLOW_TRACKING_URI.
    Named explicitly because mlflow.set_tracking_uri (which Ray Tune's MLflow callback calls)
    would otherwise win over the environment for the rest of the process."""
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=uri or os.environ.get("MLFLOW_TRACKING_URI") or None)


def add_to_tracked_run(run_dir: str, paths: list[str], log=print) -> None:
    """`wr-train export`: the model card and plot into the pretraining run's tracked runs
    (RUN_DIR/tracking.json), when there are any and their trackers are installed here."""
    path = storage.join(run_dir, IDS)
    if not storage.exists(path):
        return
    ids = json.loads(storage.read_text(path))
    if ids.get("mlflow_run_id"):
        try:
            client = mlflow_client(ids.get("mlflow_tracking_uri"))
        except ImportError:
            log("export: the run is tracked in MLflow, but mlflow is not installed here: card not logged")
        else:
            for p in paths:
                client.log_artifact(ids["mlflow_run_id"], p, artifact_path="export")
    if ids.get("wandb_run_id"):
        try:
            import wandb
        except ImportError:
            log("export: the run is tracked in W&B, but wandb is not installed here: card not logged")
        else:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "wr-train"), id=ids["wandb_run_id"],
                             resume="allow", dir=os.environ.get("WANDB_DIR"), reinit="create_new")
            for p in paths:
                run.save(p, base_path=os.path.dirname(p), policy="now")
            run.finish()


def loss_plot(history: list[dict], path: Path) -> str | None:
    """The train loss per report, held-out eval loss and the unigram floor, and the
    downstream probe's accuracy with its majority floor when the run probed, as a PNG."""
    if not history:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1.5, label="train")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", lw=1.5,
                label="held-out eval")
    floors = [h for h in history if "unigram_floor" in h]
    if floors:
        ax.axhline(floors[-1]["unigram_floor"], color="grey", ls="--", lw=1,
                   label=f"unigram floor {floors[-1]['unigram_floor']:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss (nats)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    probed = probed_rows(history)
    if probed:  # the downstream probe's accuracy on its own axis, above its majority floor
        acc = ax.twinx()
        acc.plot([h["step"] for h in probed], [h["probe_acc"] for h in probed], "s-", color="tab:green",
                 lw=1.5, label=f"probe {probed[-1]['probe_task']} dev acc")
        acc.axhline(probed[-1]["probe_floor"], color="tab:green", ls=":", lw=1,
                    label=f"majority {probed[-1]['probe_floor']:.0%}")
        acc.set_ylabel("probe accuracy")
        more = acc.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
