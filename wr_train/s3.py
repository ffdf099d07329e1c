"""The S3 client, configured from the environment only:
- endpoint: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (pyarrow's S3FileSystem() ignores
  these, so they are parsed here into endpoint_override + scheme); unset means AWS itself;
- region: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1;
- credentials: the AWS SDK's default chain (env, profile, instance role), which re-reads
  the environment on every request, so a cached filesystem sees changed keys.
wr_train.storage is its only user: everything else goes through storage's paths.
"""
from __future__ import annotations

import os
import threading

import pyarrow.fs as pafs

CONNECT_TIMEOUT_S = 3.0      # an unreachable endpoint fails in seconds, not minutes
REQUEST_TIMEOUT_S = 60.0     # the SDK's stall timeout (no bytes moving), not a total


def endpoint() -> str | None:
    """The endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
    """The region from the environment, else us-east-1."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def endpoint_label() -> str:
    """The endpoint's URL for messages (AWS's own for the region when none is set)."""
    return endpoint() or f"https://s3.{region()}.amazonaws.com"


_S3_CACHE: dict[tuple, pafs.S3FileSystem] = {}
_S3_LOCK = threading.Lock()


def filesystem() -> pafs.S3FileSystem:
    """One S3FileSystem per (endpoint, region, profile): building one sets up a client."""
    url, name = endpoint(), region()
    cache_key = (url, name, os.environ.get("AWS_PROFILE"))
    with _S3_LOCK:
        fs = _S3_CACHE.get(cache_key)
        if fs is None:
            options = dict(region=name, connect_timeout=CONNECT_TIMEOUT_S,
                           request_timeout=REQUEST_TIMEOUT_S,
                           retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
            if url:
                scheme, sep, host = url.partition("://")
                if not sep:
                    scheme, host = "https", url
                options.update(endpoint_override=host.rstrip("/"), scheme=scheme)
            fs = _S3_CACHE[cache_key] = pafs.S3FileSystem(**options)
        return fs
