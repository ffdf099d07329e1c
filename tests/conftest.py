"""Session-wide fixtures: one demo data build, one S3 server, one Ray cluster, one small
pretraining run that the export / fine-tuning / cluster tests reuse."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The real demo corpus + stand-in tasks (package archives cached across sessions)."""
    from wr_train.demo_data import build_demo
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
