"""A sweep on a cluster that scales from zero asks for GPUs itself (issue 29, point 2).

Ray's own autoscaler test harness: the fake multi-node provider (`provider: type:
fake_multinode`, what `ray.cluster_utils.AutoscalingCluster` drives) runs the real
autoscaler in the head's monitor and "launches" a node of a type by starting a Ray node
process on this machine with that type's resources. The head has 1 CPU and no GPU; the one
worker type declares `GPU: 1` with `min_workers: 0`, as the sweep node types of
cluster/aws.yaml and the KubeRay manifest do.

- `tune_clue.py --gpus-per-trial 0`: the trial runs on the head's CPU; nothing launched.
- `tune_clue.py --gpus-per-trial 1`: the pending trial makes the autoscaler launch the GPU
  type; the trial lands there, where the "GPU" is Ray's bookkeeping only (this machine has
  none, torch is a CPU build), and fails with one line saying so.

AutoscalingCluster itself is not used: its start() runs `ray stop --force` (every Ray on
the machine, other test sessions' included) and reads an example config the Ray 2.60
wheel does not ship. The head here is started and stopped by PID like tests/test_cluster.py's.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import shutil
from pathlib import Path

import psutil
import pytest

from tests.test_cluster import BIN, REPO, RayNode, free_ports
from tests.test_finetune import tiny_model  # noqa: F401  (the session's tiny exported model)

pytestmark = pytest.mark.integration

GPU_TYPE = "ray.worker.gpu"
KEY = "chnsenticorp-e1-b32-lr0.001-s0"


def autoscaling_config(gcs_address: str) -> dict:
    """The fake provider's cluster config: a 1-CPU head, one GPU worker type from zero."""
    return {
        "cluster_name": "wr-autoscale-test",
        "max_workers": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True,
                     "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            GPU_TYPE: {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": 100 * 2**20},
                       "node_config": {}, "min_workers": 0, "max_workers": 1},
        },
        "head_node_type": "ray.head.default",
        "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 5, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def fake_cluster():
    import ray._private.services
    tmp = Path(tempfile.mkdtemp(prefix="wra-", dir="/tmp"))  # short: Ray's socket paths
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "PYTEST_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "RAY_USAGE_STATS_ENABLED": "0", "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1", "DS_ACCELERATOR": "cpu",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    ip = ray._private.services.get_node_ip_address()
    (port,) = free_ports(1)
    gcs = f"{ip}:{port}"
    config = tmp / "autoscaling.json"
    config.write_text(json.dumps(autoscaling_config(gcs)))
    head = RayNode("head", ["--head", f"--port={port}", "--num-cpus=1", "--num-gpus=0",
                            f"--autoscaling-config={config}", "--include-dashboard=false",
                            "--object-store-memory=100000000", f"--temp-dir={tmp / 'ray'}"],
                   env, tmp / "head.log")
    try:
        head.wait_started()
        yield {"gcs": gcs, "env": {**env, "RAY_ADDRESS": gcs}, "tmp": tmp}
    finally:
        head.stop()
        mine = []  # nodes the autoscaler started live on after the head's processes
        for p in psutil.process_iter():
            try:
                if p.environ().get("RAY_AUTH_TOKEN_PATH") == str(token):
                    mine.append(p)
            except (psutil.Error, OSError):
                pass
        for p in mine:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(mine, timeout=5)
        shutil.rmtree(tmp, ignore_errors=True)


def monitor_log(cluster) -> str:
    logs = list((cluster["tmp"] / "ray").glob("session_2*/logs/monitor.log"))
    assert logs, "no monitor.log: the autoscaler did not run"
    return logs[0].read_text(errors="replace")


def sweep(cluster, model: str, demo_dir: Path, storage: Path, name: str, *flags: str):
    cmd = [sys.executable, str(REPO / "ray_jobs" / "tune_clue.py"), "--model", model,
           "--tasks", "chnsenticorp", "--data", str(demo_dir / "tasks"), "--storage", str(storage),
           "--name", name, "--epochs", "1", "--batch-sizes", "32", "--lrs", "1e-3",
           "--seq-length", "32", "--max-train-examples", "100", "--max-eval-examples", "50", *flags]
    return subprocess.run(cmd, cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=400)


def test_cpu_sweep_launches_nothing(fake_cluster, tiny_model, demo_dir, tmp_path):  # noqa: F811
    done = sweep(fake_cluster, tiny_model, demo_dir, tmp_path, "cpu", "--gpus-per-trial", "0")
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-2000:]
    rec = json.loads((tmp_path / "cpu" / "trials" / f"{KEY}.json").read_text())
    assert rec["status"] == "done" and rec["device"] == "cpu"
    assert f"type {GPU_TYPE}" not in monitor_log(fake_cluster)


def test_gpu_sweep_makes_the_autoscaler_launch_a_gpu_node(fake_cluster, tiny_model, demo_dir, tmp_path):  # noqa: F811
    done = sweep(fake_cluster, tiny_model, demo_dir, tmp_path, "gpu", "--gpus-per-trial", "1",
                 "--max-failures", "0")
    out = done.stdout + done.stderr
    assert "the cluster has 0 GPUs now: the trials wait until the autoscaler adds GPU nodes" in out, out[-4000:]
    assert f"Launching 1 nodes, type {GPU_TYPE}." in monitor_log(fake_cluster), out[-4000:]
    # the trial ran where Ray gave it the GPU, found no CUDA device, and said so in one line
    failed = [line for line in out.splitlines() if line.startswith(f"[tune] trial {KEY} failed")]
    assert len(failed) == 1, out[-4000:]
    assert f"SweepError: trial {KEY}: Ray gave it GPU 0 on " in failed[0], failed[0]
    assert "finds no CUDA device there" in failed[0] and "--gpus-per-trial 0" in failed[0], failed[0]
    assert done.returncode == 1 and "1 trial(s) without a result (1 failed" in done.stderr, out[-4000:]
    assert "Traceback" not in out, out[-6000:]
    assert not (tmp_path / "gpu" / "trials").exists()
