"""The S3 client, configured from the environment only:
- endpoint: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (pyarrow's S3FileSystem() ignores
  these, so they are parsed here into endpoint_override + scheme); unset means AWS itself;
- region, per bucket: AWS_REGION when set (an explicit choice wins); else the region the
  bucket is in, as S3 says (one HEAD bucket per bucket and process: the
  `x-amz-bucket-region` header, which AWS sends even with a 301 or a 403); else the
  default region: AWS_DEFAULT_REGION, else the profile's `region` in ~/.aws/config
  (AWS_PROFILE, AWS_CONFIG_FILE), else us-east-1. pyarrow does not follow a bucket to its
  region by itself: a bucket elsewhere fails with "configured region is … while the bucket
  is located in …". S3-compatible stores that do not report a region get the default;
- credentials: the AWS SDK's default chain (env, profile, instance role / IRSA), which
  re-reads the environment on every request, so a cached filesystem sees changed keys.
  Nothing here reads, copies or passes the keys on.
wr_train.storage is its user for paths; the Ray drivers (corpus, tune) forward
`settings_env()` to their tasks: where S3 is and which profile, never a key.
"""
from __future__ import annotations

import os
import threading
import time

import pyarrow.fs as pafs

CONNECT_TIMEOUT_S = 3.0      # an unreachable endpoint fails in seconds, not minutes
REQUEST_TIMEOUT_S = 60.0     # the SDK's stall timeout (no bytes moving), not a total
LOOKUP_TIMEOUT_S = 10.0      # the bucket-region HEAD
LOOKUP_RETRY_S = 60.0        # a lookup that got no answer is tried again after this
FALLBACK_REGION = "us-east-1"
# Where S3 is and where the SDK looks for credentials, never the credentials themselves:
# what a driver may pass on to its Ray tasks (a Ray started before these were set lacks
# them). Keys, secrets and session tokens stay out of every task payload: Ray keeps those
# in its object store and spills them to disk; workers get credentials the way the driver
# does (environment, profile, instance role / IRSA).
SETTINGS_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
                "AWS_PROFILE", "AWS_CONFIG_FILE")


def endpoint() -> str | None:
    """The endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def settings_env() -> dict[str, str]:
    """The SETTINGS_ENV variables that are set here."""
    return {k: os.environ[k] for k in SETTINGS_ENV if os.environ.get(k)}


def explicit_region() -> str | None:
    """AWS_REGION: set, it is used for every bucket and no lookup is made."""
    return os.environ.get("AWS_REGION") or None


_DEFAULT_CACHE: dict[tuple, str] = {}


def default_region() -> str:
    """AWS_DEFAULT_REGION, else the profile's region in the AWS config file, else us-east-1."""
    if os.environ.get("AWS_DEFAULT_REGION"):
        return os.environ["AWS_DEFAULT_REGION"]
    key = (os.environ.get("AWS_PROFILE"), os.environ.get("AWS_CONFIG_FILE"))
    if key not in _DEFAULT_CACHE:
        region = None
        try:
            import botocore.session
            region = botocore.session.Session().get_config_variable("region")
        except Exception:  # an unreadable config file or an unknown profile: no region from it
            region = None
        _DEFAULT_CACHE[key] = region or FALLBACK_REGION
    return _DEFAULT_CACHE[key]


_LOOKUPS: dict[tuple, tuple[str | None, float]] = {}   # (endpoint, bucket, profile) -> (region, when)
_LOOKUP_LOCK = threading.Lock()


def bucket_region(bucket: str) -> str | None:
    """The region S3 reports for `bucket` (HEAD bucket → x-amz-bucket-region), or None when
    it reports none (a store that ignores regions, no such bucket, unreachable). Cached per
    process; a None answer is asked again after LOOKUP_RETRY_S."""
    key = (endpoint(), bucket, os.environ.get("AWS_PROFILE"))
    with _LOOKUP_LOCK:
        hit = _LOOKUPS.get(key)
        if hit is not None and (hit[0] is not None or time.monotonic() - hit[1] < LOOKUP_RETRY_S):
            return hit[0]
        region = _head_bucket_region(bucket)
        _LOOKUPS[key] = (region, time.monotonic())
        return region


def _head_bucket_region(bucket: str) -> str | None:
    import boto3
    import botocore
    from botocore.config import Config
    from botocore.exceptions import ClientError, NoCredentialsError

    def ask(**extra) -> str | None:
        config = Config(connect_timeout=CONNECT_TIMEOUT_S, read_timeout=LOOKUP_TIMEOUT_S,
                        retries={"max_attempts": 1, "mode": "standard"},
                        s3={"addressing_style": "path"} if endpoint() else {}, **extra)
        client = boto3.session.Session().client("s3", endpoint_url=endpoint(),
                                                region_name=default_region(), config=config)
        try:
            meta = client.head_bucket(Bucket=bucket)["ResponseMetadata"]
        except ClientError as e:  # AWS names the region in its 301 and 403 answers too
            meta = e.response.get("ResponseMetadata", {})
        return (meta.get("HTTPHeaders") or {}).get("x-amz-bucket-region") or None

    try:
        try:
            return ask()
        except NoCredentialsError:  # no credentials here: AWS answers an anonymous HEAD too
            return ask(signature_version=botocore.UNSIGNED)
    except Exception:  # unreachable, timed out: the region falls back to the default
        return None


def region(bucket: str | None = None) -> str:
    """The region to sign requests to `bucket` with (see the module's docstring)."""
    return explicit_region() or (bucket and bucket_region(bucket)) or default_region()


def endpoint_label(bucket: str | None = None) -> str:
    """The endpoint's URL for messages (AWS's own for the region when none is set)."""
    return endpoint() or f"https://s3.{region(bucket)}.amazonaws.com"


_S3_CACHE: dict[tuple, pafs.S3FileSystem] = {}
_S3_LOCK = threading.Lock()


def filesystem(bucket: str | None = None) -> pafs.S3FileSystem:
    """The S3FileSystem for `bucket` (its region, see above); one per (endpoint, region,
    profile): building one sets up a client."""
    url, name = endpoint(), region(bucket)
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
