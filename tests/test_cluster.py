"""The cluster path for real, on one machine, the way docs/cluster.md tells users to work.

A head started with `ray start --head` and a second node joined with `ray start --address`
(each with its own temp dir and ports, token auth on), an S3 server that holds the shards and
every run, and jobs sent with `ray job submit --runtime-env cluster/runtime_env.yaml`:

- tiny pretraining whose two workers sit on different nodes (each node has room for one),
  then `wr-train pull` + `export` + `fill-mask` on what the job stored in S3;
- a job with a bad config ends FAILED with the one-line reason in its logs;
- a reduced CLUE sweep (export on the head, then ray_jobs/tune_clue.py) on the cluster;
- recognisable fake S3 keys (given to the nodes as an instance profile would) appear in
  nothing the jobs wrote: run dirs, checkpoints, metrics, sweeps, model card, job logs, and
  every file of Ray's session directories, spilled objects included (the nodes spill every
  object they can, and a watcher reads the spill files while they exist: the sweep's task
  payload is among them);
- docs/cluster.md's stop-and-resume commands, run as written (bucket renamed, `--gpu`
  swapped for this CPU cluster's short-run flags): submit, `ray job stop`, `ray job delete`,
  the same submit again, and the run resumes from its last complete checkpoint;
- SIGKILL of one training worker process, and the loss of the second node (all its processes
  SIGKILLed, then a replacement joins as an autoscaler would add one): the job resumes from the
  last complete checkpoint and ends with the configured step count, its losses those of the
  uninterrupted run (the same before the failure, within 2e-3 after: resume is not bit-exact).

Ray turns a node IP of 127.0.0.1 into the machine's outside address, so the nodes use
127.0.0.2: loopback as well, and kept as given. Every process started here is stopped by PID
(the `ray start --block` process and its descendants, SIGTERM then SIGKILL), also when a test
fails; `ray stop` is never used (it would stop every Ray on the machine).
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tests.s3server import S3Server, _die_with_parent, _PRCTL

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "cluster.md"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
WR_TRAIN = str(BIN / "wr-train")
NODE_IP = "127.0.0.2"
# Recognisable fake keys, new each session (so no file of this repo, uploaded with every
# job's working_dir, holds them): the S3 server below accepts exactly these.
CANARY_KEY = "AKIAWRC" + "".join(random.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", k=13))
CANARY_SECRET = "wrCanary+" + secrets.token_hex(16)
BUCKET = "wrc-runs"
SHARDS = f"s3://{BUCKET}/shards128"
RUNS = f"s3://{BUCKET}/runs"
STEPS = 30
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PORT_RANGE = (23000, 29999)  # below weed's P+10000 ports (30000+) and the ephemeral range


# The tiny run's flags and overrides (pretrain(), and the docs' commands on this cluster).
# fp32 also where demo-tiny's `auto` would pick bf16: on a CPU without bf16 hardware (no AMX, no AVX512-BF16) torch
# emulates bf16 matmuls, ~300x slower (a 2048² product: 92 s against 0.3 s on one core).
SHORT_RUN = ["--steps", str(STEPS), "--workers", "2", "cpus_per_worker=1", "checkpoint_every=10",
             "report_every=5", "stages.0.global_batch=16", "stages.0.micro_batch=8", "stages.0.lr=1e-3",
             "precision=fp32"]


def pretrain(name: str, *overrides: str) -> list[str]:
    """The tiny pretraining job's entrypoint. Each node offers 1 CPU and each worker needs 1,
    so Ray must place the two workers on the two nodes (and each worker trains with one
    torch thread, where resume is exact to the bit). The key=value overrides stay together at
    the end: argparse takes positionals in one run."""
    return ["python", "ray_jobs/pretrain.py", "--config", "demo-tiny", "--shards", SHARDS,
            "--storage", RUNS, "--name", name, *SHORT_RUN, *overrides]


def free_ports(count: int) -> list[int]:
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randint(*PORT_RANGE)
        if port in chosen:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        chosen.append(port)
    return chosen


# ------------------------------------------------------------------ processes we own

def _kill_all(procs: list[psutil.Process], timeout: float) -> None:
    """SIGKILL each process (gone ones are fine) and wait for them."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


class RayNode:
    """One `ray start --block` process in its own session; it and its descendants are ours."""

    def __init__(self, name: str, args: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", *args], env=env, cwd=REPO,
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent if _PRCTL is not None else None)
        self.node_id: str | None = None

    def wait_started(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "block forever" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"ray node {self.name} did not start (rc {self.proc.poll()}):\n"
                           + self.log.read_text(errors="replace")[-3000:])

    def processes(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """The node dies at once: SIGKILL to every process of it (a lost machine)."""
        _kill_all(self.processes(), timeout=10)
        self.proc.wait(timeout=10)

    def stop(self, grace: float = 20) -> None:
        """SIGTERM the `ray start` process (it stops its processes), then SIGKILL leftovers."""
        procs = self.processes()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        _, alive = psutil.wait_procs(procs, timeout=2)
        _kill_all(alive, timeout=5)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log_file.close()


class LocalCluster:
    """Head + worker nodes on this machine; jobs through the dashboard's job API."""

    def __init__(self, s3: S3Server):
        # Short: Ray's AF_UNIX socket paths live under it (limit ~107 characters).
        self.tmp = Path(tempfile.mkdtemp(prefix="wrc-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        token_file = self.tmp / "token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "AWS_", "PYTEST_"))}
        env.update({
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in a job = this venv
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # teardown without a drain wait
            # the GCS notices a lost node in ~5 s instead of ~15 s (test speed only)
            "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
            # every object that lives in the object store goes to a spill file in the node's
            # session directory as well, so the leak check below sees what payloads hold
            "RAY_object_spilling_threshold": "0.0", "RAY_min_spilling_size": "1",
            # What an instance profile gives a node on AWS: credentials in its environment
            # chain, nothing in the repo or in the job's flags.
            "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
            "AWS_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": s3.region,
            "AWS_EC2_METADATA_DISABLED": "true",
            "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        })
        self.env = env
        self.nodes: dict[str, RayNode] = {}
        self.gcs = self.dashboard = ""
        self.submitted: list[str] = []

    # -- nodes ---------------------------------------------------------------------
    def start_head(self, num_cpus: int = 1) -> None:
        gcs, dash, client, agent = free_ports(4)
        self.gcs = f"{NODE_IP}:{gcs}"
        self.dashboard = f"http://127.0.0.1:{dash}"
        self._start("head", ["--head", f"--node-ip-address={NODE_IP}", f"--port={gcs}",
                             f"--num-cpus={num_cpus}", "--include-dashboard=true",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--ray-client-server-port={client}",
                             f"--dashboard-agent-listen-port={agent}"])
        self.nodes["head"].node_id = next(n["node_id"] for n in self.list_nodes() if n["is_head_node"])

    def add_node(self, name: str, num_cpus: int = 1) -> RayNode:
        (agent,) = free_ports(1)
        before = {n["node_id"] for n in self.list_nodes()}
        node = self._start(name, [f"--address={self.gcs}", f"--node-ip-address={NODE_IP}",
                                  f"--num-cpus={num_cpus}", f"--dashboard-agent-listen-port={agent}"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = [n for n in self.list_nodes() if n["node_id"] not in before and n["state"] == "ALIVE"]
            if new:
                node.node_id = new[0]["node_id"]
                return node
            time.sleep(1)
        raise RuntimeError(f"node {name} started but never showed up in `ray list nodes`")

    def _start(self, name: str, args: list[str]) -> RayNode:
        node = RayNode(name, [*args, f"--temp-dir={self.tmp / name}"], self.env, self.tmp / f"{name}.log")
        self.nodes[name] = node
        node.wait_started()
        return node

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            self.nodes[name].stop()
        # Anything that outlived its node (reparented away) still carries our token path.
        mine = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("RAY_AUTH_TOKEN_PATH") == str(self.tmp / "token"):
                    mine.append(p)
            except (psutil.Error, OSError):
                pass
        for p in mine:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(mine, timeout=5)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- CLI and job API -----------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args[:4])}… exited {proc.returncode}:\n"
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return proc

    def ray_list(self, *args: str) -> list[dict]:
        """`ray list …` through the state API; it prints a sentence, not [], when empty."""
        out = self.cli(RAY, "list", *args, "--address", self.dashboard, "--format", "json",
                       "--limit", "1000").stdout.strip()
        try:  # callers poll: a half-written or warning-prefixed answer counts as "nothing yet"
            return json.loads(out) if out.startswith("[") else []
        except json.JSONDecodeError:
            return []

    def list_nodes(self) -> list[dict]:
        return self.ray_list("nodes")

    def train_workers(self, job_id: str) -> list[dict]:
        return self.ray_list("actors", "--detail", "--filter", "class_name=RayTrainWorker",
                             "--filter", f"job_id={job_id}")

    def submit(self, name: str, *entrypoint: str) -> str:
        sid = f"{name}-{secrets.token_hex(3)}"
        self.cli(RAY, "job", "submit", "--address", self.dashboard, "--submission-id", sid,
                 "--runtime-env", "cluster/runtime_env.yaml", "--no-wait", "--", *entrypoint)
        self.submitted.append(sid)
        return sid

    def _get(self, path: str):
        req = urllib.request.Request(self.dashboard + path,
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def job(self, sid: str) -> dict:
        return self._get(f"/api/jobs/{sid}")

    def logs(self, sid: str) -> str:
        return self._get(f"/api/jobs/{sid}/logs")["logs"]

    def wait(self, sid: str, timeout: float, until=TERMINAL) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(sid)
            if job["status"] in until:
                return job
            time.sleep(2)
        raise AssertionError(f"job {sid} still {job['status']} after {timeout:.0f}s; log tail:\n"
                             + self.logs(sid)[-4000:])

    def wait_for_job_id(self, sid: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(sid)
            if job.get("job_id"):
                return job["job_id"]
            assert job["status"] not in TERMINAL, self.logs(sid)[-3000:]
            time.sleep(1)
        raise AssertionError(f"job {sid}: no driver after {timeout:.0f}s")


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def canary_s3():
    """An S3 server of its own whose only identity is the recognisable fake key pair."""
    server = S3Server()
    server.access_key, server.secret_key = CANARY_KEY, CANARY_SECRET
    server.start()
    try:
        server.bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_shards(canary_s3, shards128) -> str:
    from wr_train import storage
    with canary_s3.environ():
        storage.copy_tree(str(shards128), SHARDS, progress=False)
    return SHARDS


class SpillWatcher:
    """Reads every spill file of the cluster's nodes while it exists (Ray deletes one when
    its object is freed): {path: bytes}, each file's largest version."""

    def __init__(self, root: Path):
        self.root, self.files = root, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="spill-watch")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            for p in self.root.glob("*/session_2*/ray_spilled_objects*/*"):
                try:
                    data = p.read_bytes()
                except OSError:
                    continue  # deleted meanwhile
                if len(data) > len(self.files.get(str(p), b"")):
                    self.files[str(p)] = data

    def stop(self) -> dict[str, bytes]:
        self._stop.set()
        self._thread.join(timeout=10)
        return self.files


@pytest.fixture(scope="module")
def cluster(canary_s3):
    c = LocalCluster(canary_s3)
    try:
        t0 = time.monotonic()
        c.start_head()
        print(f"[cluster] head up after {time.monotonic() - t0:.1f}s", flush=True)
        c.add_node("node2")
        print(f"[cluster] node2 joined after {time.monotonic() - t0:.1f}s", flush=True)
        c.spills = SpillWatcher(c.tmp)
        yield c
    finally:
        if getattr(c, "spills", None):
            c.spills.stop()
        c.stop()


def job_tail(cluster: LocalCluster, sid: str) -> str:
    return cluster.logs(sid)[-5000:]


def last_path(logs: str) -> str:
    paths = [line.strip() for line in logs.splitlines() if line.strip().startswith("s3://")]
    assert paths, logs[-3000:]
    return paths[-1]


def s3_objects(s3: S3Server, prefix: str = "") -> dict[str, bytes]:
    client = s3.client()
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
    return out


def metrics(s3: S3Server, run: str) -> dict[int, dict]:
    text = s3_objects(s3, f"runs/{run}/metrics.jsonl")[f"runs/{run}/metrics.jsonl"].decode()
    return {m["step"]: m for m in map(json.loads, text.splitlines())}


def latest_state(s3: S3Server, run: str):
    from wr_train.checkpoint import latest_complete
    with s3.environ():
        return latest_complete(f"{RUNS}/{run}", log=lambda *a: None)


@pytest.fixture(scope="module")
def e2e(cluster, s3_shards):
    """The tiny pretraining job, submitted once; later tests reuse what it stored."""
    t0 = time.monotonic()
    sid = cluster.submit("e2e", *pretrain("e2e"))
    job_id = cluster.wait_for_job_id(sid)
    job = cluster.wait(sid, 400)
    logs = cluster.logs(sid)
    assert job["status"] == "SUCCEEDED", logs[-5000:]
    print(f"[cluster] e2e job: {time.monotonic() - t0:.1f}s", flush=True)
    return SimpleNamespace(sid=sid, job_id=job_id, logs=logs, last=last_path(logs))


# ------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def local_copy(cluster, e2e, tmp_path_factory) -> Path:
    """A user's machine: `wr-train pull` what the job stored, then `wr-train export` it."""
    out = tmp_path_factory.mktemp("e2e-local")
    cluster.cli(WR_TRAIN, "pull", e2e.last, str(out / "ckpt"), timeout=300)
    cluster.cli(WR_TRAIN, "export", str(out / "ckpt"), "--out", str(out / "hf"), timeout=300)
    return out


def test_pretrain_job_on_two_nodes_then_pull_export_fill_mask(cluster, canary_s3, e2e, local_copy):
    # the job printed the last checkpoint's S3 path last; it is complete with every step
    assert e2e.last.startswith(f"{RUNS}/e2e/checkpoint_"), e2e.logs[-2000:]
    _, state = latest_state(canary_s3, "e2e")
    assert state["step"] == STEPS and state["world_size"] == 2
    assert sorted(metrics(canary_s3, "e2e")) == list(range(5, STEPS + 1, 5))

    # the two training workers ran on the two different nodes
    workers = cluster.train_workers(e2e.job_id)
    assert len(workers) == 2, workers
    nodes = {w["node_id"] for w in workers}
    assert nodes == {cluster.nodes["head"].node_id, cluster.nodes["node2"].node_id}

    # a user's machine: pull what the job stored, export it, fill a mask
    out = local_copy
    assert json.loads((out / "ckpt" / "state.json").read_text())["step"] == STEPS
    assert {"config.json", "model.safetensors", "spiece.model", "README.md"} <= {
        p.name for p in (out / "hf").iterdir()}
    table = cluster.cli(WR_TRAIN, "fill-mask", str(out / "hf"), "今天北京的[MASK]很好", "--top-k", "3",
                        timeout=300).stdout
    rows = [line for line in table.splitlines() if re.match(r"\s+\d\s+0\.\d{4}", line)]
    assert len(rows) == 3, table


def test_bad_config_job_fails_with_one_line_reason(cluster, s3_shards):
    sid = cluster.submit("bad", "python", "ray_jobs/pretrain.py", "--shards", SHARDS, "--storage", RUNS,
                         "--name", "bad", "--steps", "5", "zero_stage=7")
    job = cluster.wait(sid, 180)
    assert job["status"] == "FAILED", job
    reason = "wr-train pretrain: error: zero_stage: expected 0-3, got 7"
    # the reason is the last line of the job's logs, as `ray job logs` shows them
    logs = cluster.cli(RAY, "job", "logs", "--address", cluster.dashboard, sid).stdout
    assert logs.strip().splitlines()[-1] == reason, logs[-3000:]
    assert "Traceback" not in logs
    assert "exit code 2" in (job.get("message") or ""), job


def test_clue_sweep_job(cluster, canary_s3, e2e, demo_dir):
    """Export on the head, then the reduced grid: 1 task × 2 learning rates, results to S3."""
    # `ray job submit` shell-quotes every entrypoint word, so a chain goes through bash -c
    sid = cluster.submit(
        "sweep", "bash", "-c",
        f"wr-train export {e2e.last} --out hf && python ray_jobs/tune_clue.py --model hf "
        f"--tasks chnsenticorp --data {demo_dir / 'tasks'} --storage s3://{BUCKET}/sweeps "
        "--name wrc-sweep --epochs 1 --batch-sizes 16 --lrs 1e-4,3e-4 "
        "--max-train-examples 200 --max-eval-examples 100")
    job = cluster.wait(sid, 400)
    logs = cluster.logs(sid)
    assert job["status"] == "SUCCEEDED", logs[-5000:]
    assert last_path(logs) == f"s3://{BUCKET}/sweeps/wrc-sweep"
    files = s3_objects(canary_s3, "sweeps/wrc-sweep/")
    scores = json.loads(files["sweeps/wrc-sweep/scores.json"])
    assert "sweeps/wrc-sweep/scores.md" in files
    text = json.dumps(scores)
    assert "chnsenticorp" in text and "0.0001" in text and "0.0003" in text
    trials = [k for k in files if k.startswith("sweeps/wrc-sweep/trials/") and k.endswith(".json")]
    assert len(trials) == 2, sorted(files)


def _wait_for_checkpoint(cluster, s3, sid, run, min_step=10, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, state = latest_state(s3, run)
        if state and state["step"] >= min_step:
            return state
        job = cluster.job(sid)
        assert job["status"] not in TERMINAL, cluster.logs(sid)[-4000:]
        time.sleep(0.25)  # the fault must land before the job's remaining 20 steps are done
    raise AssertionError(f"{run}: no checkpoint at step {min_step} after {timeout}s")


def _wait_for_alive_workers(cluster, sid, job_id, on: str, timeout=300) -> dict:
    """Wait until both training workers are alive; return the one on node `on`."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [w for w in cluster.train_workers(job_id) if w["state"] == "ALIVE"]
        there = [w for w in alive if w["node_id"] == on]
        if len(alive) == 2 and there:
            return there[0]
        assert time.monotonic() < deadline and cluster.job(sid)["status"] not in TERMINAL, alive
        time.sleep(2)


def _assert_resumed(cluster, s3, e2e, sid, run, workers: int = 2):
    """The job resumed from a checkpoint of its own and ended where e2e ended; with
    `workers` 1, on one worker from a checkpoint two saved."""
    logs = cluster.logs(sid)
    if workers == 2:
        found = re.findall(r"resuming from \S+ \(stage \d+, step (\d+)\)", logs)
    else:
        found = re.findall(r"resumed step ([\d,]+) saved by 2 workers on 1 \(ZeRO-2 state re-partitioned\)", logs)
    assert found, logs[-4000:]
    resumed = int(found[-1].replace(",", ""))
    assert 10 <= resumed < STEPS
    _, state = latest_state(s3, run)
    assert state["step"] == STEPS and state["world_size"] == workers
    assert last_path(logs).startswith(f"{RUNS}/{run}/checkpoint_")
    # The uninterrupted e2e run is the reference: up to the resumed checkpoint the metrics are
    # the same to the bit (the same run); after it, the resumed run follows the same trajectory
    # (same data position, masks, optimizer and schedule: a restart from scratch or from the
    # wrong position is off by 1e-2 or more). It is not bit-exact, in-process either: the
    # loss drifts by up to ~2e-4 relative within 10 steps after the resume.
    got, want = metrics(s3, run), metrics(s3, "e2e")
    assert sorted(got) == sorted(want)
    losses = {s: (got[s]["loss"], want[s]["loss"]) for s in sorted(got)}
    for step, (a, b) in losses.items():
        if step <= resumed:
            assert a == b and got[step]["lr"] == want[step]["lr"], (step, losses)
        else:
            assert a == pytest.approx(b, rel=2e-3), (step, losses)
            assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-9), step
    return resumed


def test_sigkill_of_a_training_worker_recovers(cluster, canary_s3, e2e):
    sid = cluster.submit("wkill", *pretrain("wkill", "max_failures=1"))
    job_id = cluster.wait_for_job_id(sid)
    t0 = time.monotonic()
    # the victim: the training worker on the second node, found while the job starts up
    victim = _wait_for_alive_workers(cluster, sid, job_id, on=cluster.nodes["node2"].node_id)
    proc = psutil.Process(victim["pid"])
    assert "RayTrainWorker" in " ".join(proc.cmdline()), proc.cmdline()
    _wait_for_checkpoint(cluster, canary_s3, sid, "wkill")
    print(f"[cluster] wkill: checkpoint after {time.monotonic() - t0:.1f}s", flush=True)
    proc.send_signal(signal.SIGKILL)
    job = cluster.wait(sid, 400)
    print(f"[cluster] wkill: done after {time.monotonic() - t0:.1f}s", flush=True)
    assert job["status"] == "SUCCEEDED", job_tail(cluster, sid)
    _assert_resumed(cluster, canary_s3, e2e, sid, "wkill")
    assert len(cluster.train_workers(job_id)) == 4  # a second worker group was started


def test_loss_of_a_node_recovers_on_a_replacement(cluster, canary_s3, e2e):
    """The second node dies (every process SIGKILLed). The head alone has one worker's
    worth of CPU, so the restarted worker group waits until a replacement node joins, as the
    autoscaler would add one; then it resumes from the last complete checkpoint."""
    sid = cluster.submit("nodeloss", *pretrain("nodeloss", "max_failures=1"))
    job_id = cluster.wait_for_job_id(sid)
    t0 = time.monotonic()
    lost = cluster.nodes["node2"]
    _wait_for_alive_workers(cluster, sid, job_id, on=lost.node_id)
    _wait_for_checkpoint(cluster, canary_s3, sid, "nodeloss")
    print(f"[cluster] nodeloss: checkpoint after {time.monotonic() - t0:.1f}s", flush=True)
    lost.kill()
    deadline = time.monotonic() + 120
    while not any(n["node_id"] == lost.node_id and n["state"] == "DEAD" for n in cluster.list_nodes()):
        assert time.monotonic() < deadline, "the killed node never showed as DEAD"
        time.sleep(1)
    print(f"[cluster] nodeloss: node DEAD after {time.monotonic() - t0:.1f}s", flush=True)
    replacement = cluster.add_node("node3")
    print(f"[cluster] nodeloss: replacement joined after {time.monotonic() - t0:.1f}s", flush=True)
    job = cluster.wait(sid, 400)
    print(f"[cluster] nodeloss: done after {time.monotonic() - t0:.1f}s", flush=True)
    assert job["status"] == "SUCCEEDED", job_tail(cluster, sid)
    _assert_resumed(cluster, canary_s3, e2e, sid, "nodeloss")
    placed = {w["node_id"] for w in cluster.train_workers(job_id)}
    assert placed == {cluster.nodes["head"].node_id, lost.node_id, replacement.node_id}


def test_loss_of_a_node_shrinks_an_elastic_run(cluster, canary_s3, e2e):
    """min_workers=1: when the second node dies, Ray Train restarts the group with the one
    worker the head has room for, without waiting for a replacement; it resumes the last
    checkpoint with the ZeRO-2 state of two workers re-partitioned, and ends where e2e did."""
    alive = {n["node_id"] for n in cluster.list_nodes() if n["state"] == "ALIVE"}
    second = next((n for name, n in cluster.nodes.items() if name != "head" and n.node_id in alive), None)
    second = second or cluster.add_node("node4")
    sid = cluster.submit("elastic", *pretrain("elastic", "max_failures=1", "min_workers=1"))
    job_id = cluster.wait_for_job_id(sid)
    t0 = time.monotonic()
    _wait_for_alive_workers(cluster, sid, job_id, on=second.node_id)
    _wait_for_checkpoint(cluster, canary_s3, sid, "elastic")
    second.kill()
    try:
        job = cluster.wait(sid, 400)
    finally:
        cluster.add_node("node5")  # the tests after this one run two-worker jobs
    print(f"[cluster] elastic: done after {time.monotonic() - t0:.1f}s", flush=True)
    assert job["status"] == "SUCCEEDED", job_tail(cluster, sid)
    resumed = _assert_resumed(cluster, canary_s3, e2e, sid, "elastic", workers=1)
    rows = metrics(canary_s3, "elastic")
    assert {r["workers"] for s, r in rows.items() if s > resumed} == {1}
    assert len(cluster.train_workers(job_id)) == 3  # two, then one


def doc_block(*needles: str, starts: str = "") -> str:
    """The one ```bash block of docs/cluster.md that starts with `starts` and holds every needle."""
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), re.S)
              if b.startswith(starts) and all(n in b for n in needles)]
    assert len(blocks) == 1, (needles, blocks)
    return blocks[0]


def as_run_here(block: str) -> str:
    """A docs command for this cluster: the test bucket for `my-bucket`, and for `--gpu` the
    short CPU run of pretrain() (so the run is e2e's and its metrics compare)."""
    assert "s3://my-bucket/" in block and " --gpu " in block, block
    return block.replace("s3://my-bucket/", f"s3://{BUCKET}/").replace(
        " --gpu ", " " + shlex.join(SHORT_RUN) + " ")


def run_doc(cluster, block: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """A block as the docs' reader runs it: bash, repo root, RAY_ADDRESS and the token set."""
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**cluster.env, "RAY_ADDRESS": cluster.dashboard})
    if check:
        assert proc.returncode == 0, f"{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_docs_stop_and_resume_commands_as_written(cluster, canary_s3, e2e):
    """docs/cluster.md, sections 3 and 4: submit demo1, stop it once it has a checkpoint,
    delete it, submit the same command again: the run resumes and ends where e2e ended."""
    submit = as_run_here(doc_block("--submission-id demo1 ", "ray_jobs/pretrain.py", starts="ray job submit"))
    resume = as_run_here(doc_block("ray job stop demo1", "ray job delete demo1"))
    assert submit.strip() in resume  # "the same command again"
    run_doc(cluster, submit)
    cluster.submitted.append("demo1")
    _wait_for_checkpoint(cluster, canary_s3, "demo1", "demo1")
    # at once (its first command stops the job): the run must still be short of its end
    followed = run_doc(cluster, resume)  # ends with `ray job logs -f demo1`: until the job ends
    assert "resuming from" in followed.stdout, followed.stdout[-3000:]
    job = cluster.wait("demo1", 60)
    assert job["status"] == "SUCCEEDED", job_tail(cluster, "demo1")
    _assert_resumed(cluster, canary_s3, e2e, "demo1", "demo1")
    # why the docs say to delete first: Ray 2.60 refuses a submission id that exists
    refused = run_doc(cluster, submit, check=False)
    assert refused.returncode != 0 and "already exists" in refused.stdout + refused.stderr, refused


def test_credentials_appear_in_nothing_the_jobs_wrote(cluster, canary_s3, local_copy):
    """Last, so it sees every job of this module: every object in the bucket except our own
    upload (runs, checkpoints, metrics, sweep results), the pulled copy and its export (model
    card), every job's logs, every file under the nodes' Ray session directories (logs,
    runtime_resources, GCS files) and every spill file seen while the jobs ran."""
    blobs = {f"s3://{BUCKET}/{k}": v for k, v in s3_objects(canary_s3).items()
             if not k.startswith("shards128/")}
    assert any(k.endswith("/state.json") for k in blobs) and any(k.endswith("metrics.jsonl") for k in blobs)
    assert any(k.endswith("scores.md") for k in blobs), sorted(blobs)[:20]
    for p in local_copy.rglob("*"):
        if p.is_file():
            blobs[str(p)] = p.read_bytes()
    assert str(local_copy / "hf" / "README.md") in blobs and str(local_copy / "ckpt" / "state.json") in blobs
    for sid in cluster.submitted:
        blobs[f"job {sid} logs"] = cluster.logs(sid).encode()
    session = [p for p in cluster.tmp.glob("*/session_2*/**/*") if p.is_file() and not p.is_socket()]
    logs = [p for p in session if re.match(r"(worker-|job-driver-|python-core-worker-|ray-train-)", p.name)]
    assert logs and len(session) > len(logs)
    for p in session:
        try:
            blobs[str(p)] = p.read_bytes()
        except OSError:
            pass  # a file Ray removed meanwhile
    spilled = cluster.spills.stop()
    # the sweep's payload (the model's files for its trials) was among the spilled objects:
    # a key in it would have been seen
    assert any(b"model.safetensors" in data for data in spilled.values()), sorted(spilled)[:10]
    blobs.update(spilled)
    for needle in (CANARY_KEY, CANARY_SECRET):
        leaked = [name for name, data in blobs.items() if needle.encode() in data]
        assert not leaked, f"{needle[:8]}… found in {leaked}"
    assert len(blobs) > 30
