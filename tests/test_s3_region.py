"""wr-train signs S3 requests with the region the bucket is in (issue 29, point 1).

pyarrow's S3FileSystem does not follow a bucket to its region: on AWS, a bucket in
us-west-2 asked for with us-east-1 fails ("configured region is … while the bucket is
located in …"). wr_train.s3 asks the bucket (HEAD bucket → x-amz-bucket-region) unless
AWS_REGION says otherwise. The server here is moto's S3 server, which records each
bucket's LocationConstraint and reports it as AWS does (seaweedfs, the suite's other S3
server, ignores regions). moto serves any signing region, so these tests check the region
wr-train chose and what it reached with it, not AWS's refusal.
"""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.s3server import MotoServer
from wr_train import s3

pytestmark = pytest.mark.integration

BUCKETS = {"wr-west": "us-west-2", "wr-frankfurt": "eu-central-1", "wr-virginia": "us-east-1"}


@pytest.fixture(scope="module")
def moto():
    server = MotoServer().start()
    try:
        for name, region in BUCKETS.items():
            server.bucket(name, region)
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_env(moto, monkeypatch, tmp_path):
    """This machine as a user's, pointed at the moto server: keys in the environment, no
    region anywhere (an empty AWS config file), no instance metadata."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3",
                "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "aws-config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return config


def head_requests(moto: MotoServer, bucket: str) -> int:
    log = Path(moto._tmp, "moto.log").read_text(errors="replace")
    return log.count(f'"HEAD /{bucket} HTTP')


def test_the_bucket_says_its_region(moto, aws_env):
    for bucket, region in BUCKETS.items():
        assert s3.region(bucket) == region
        fs = s3.filesystem(bucket)
        assert fs.region == region
        # the filesystem built for that region reads and writes the bucket
        with fs.open_output_stream(f"{bucket}/hello.txt") as f:
            f.write(region.encode())
        with fs.open_input_stream(f"{bucket}/hello.txt") as f:
            assert f.read() == region.encode()
    # asked once per bucket and process, however many filesystems are asked for
    before = head_requests(moto, "wr-west")
    for _ in range(5):
        assert s3.filesystem("wr-west").region == "us-west-2"
    assert head_requests(moto, "wr-west") == before
    assert s3.endpoint_label("wr-west") == moto.endpoint


def test_storage_paths_use_the_buckets_region(moto, aws_env):
    """Every wr-train command reaches S3 through storage.resolve: a bucket in us-west-2
    is written, listed and read with us-west-2's filesystem."""
    from wr_train import storage
    path = "s3://wr-west/runs/t.txt"
    storage.write_text(path, "west")
    assert storage.resolve(path)[0].region == "us-west-2"
    assert storage.read_text(path) == "west" and storage.list_files("s3://wr-west/runs") == {"t.txt": 4}
    assert storage.resolve("s3://wr-frankfurt/x")[0].region == "eu-central-1"


def test_explicit_aws_region_wins(moto, aws_env, monkeypatch):
    monkeypatch.setenv("AWS_REGION", "ap-south-1")
    before = head_requests(moto, "wr-frankfurt")
    assert s3.region("wr-frankfurt") == "ap-south-1"
    assert s3.filesystem("wr-frankfurt").region == "ap-south-1"
    assert head_requests(moto, "wr-frankfurt") == before  # no lookup at all


def test_default_region_from_the_aws_config_file(moto, aws_env, monkeypatch):
    """A bucket that reports no region (here: one the server does not have) gets the
    default region: the profile's `region` in the AWS config file, AWS_DEFAULT_REGION over
    that. A bucket that reports its region keeps it."""
    aws_env.write_text("[default]\nregion = eu-west-1\n\n[profile tokyo]\nregion = ap-northeast-1\n")
    assert s3.default_region() == "eu-west-1"
    assert s3.region("wr-no-such-bucket") == "eu-west-1"
    assert s3.region("wr-west") == "us-west-2"
    monkeypatch.setenv("AWS_PROFILE", "tokyo")
    assert s3.region("wr-no-such-bucket") == "ap-northeast-1"
    assert s3.filesystem("wr-no-such-bucket").region == "ap-northeast-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "sa-east-1")
    assert s3.region("wr-no-such-bucket") == "sa-east-1"
    assert s3.region("wr-west") == "us-west-2"


def test_no_config_at_all_is_us_east_1(aws_env):
    assert s3.default_region() == "us-east-1"
    assert s3.region() == "us-east-1"


def test_unreachable_endpoint_falls_back_at_once(aws_env, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-north-1")
    start = time.monotonic()
    assert s3.region("wr-west") == "eu-north-1"
    assert s3.region("wr-west") == "eu-north-1"
    assert time.monotonic() - start < 10
