"""wr_train.storage against local tmp dirs and a real S3 server (the session `s3` fixture)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid

import pytest

from wr_train import storage
from wr_train.checkpoint import CheckpointError
from wr_train.pull import pull
from wr_train.storage import StorageError

pytestmark = pytest.mark.integration

BUCKET = "wr-storage-tests"
BIG = 6 * 1024 * 1024 + 123  # > 5 MB: several chunks, multipart upload on S3


@pytest.fixture(scope="module")
def bucket(s3) -> str:
    return s3.bucket(BUCKET)


@pytest.fixture
def s3_root(bucket) -> str:
    """A fresh prefix per test, so tests never see each other's objects."""
    return storage.join(bucket, f"t-{uuid.uuid4().hex[:10]}")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


def make_tree(base: str) -> dict[str, bytes]:
    """Nested dirs, an empty file, a > 5 MB file and a *.gz name (must not be decompressed)."""
    files = {
        "a.txt": b"alpha\n",
        "empty.bin": b"",
        "sub/b.json": json.dumps({"x": 1}).encode(),
        "sub/deeper/c.txt": "中文 ok".encode(),
        "sub/deeper/big.bin": os.urandom(BIG),
        "logs/events.gz": b"not really gzip",
    }
    for rel, data in files.items():
        storage.write_bytes(storage.join(base, rel), data)
    return files


def assert_tree(base: str, files: dict[str, bytes]) -> None:
    assert storage.list_files(base) == {rel: len(data) for rel, data in sorted(files.items())}
    for rel, data in files.items():
        assert storage.read_bytes(storage.join(base, rel)) == data, rel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- paths -----------------------------------------------------------------------------

def test_paths():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3://x")
    assert storage.join("s3://b", "x/", "/y") == "s3://b/x/y"
    assert storage.join("s3://b/", "ckpt") == "s3://b/ckpt"
    assert storage.join("/a", "b", "c") == os.path.join("/a", "b", "c")
    assert storage.resolve("s3://b/x/y/")[1] == "b/x/y"
    assert storage.resolve("s3://b")[1] == "b"
    assert storage.resolve("rel")[1] == os.path.abspath("rel")
    with pytest.raises(StorageError, match="no bucket"):
        storage.resolve("s3:///key")


# -- round trips -------------------------------------------------------------------------

def test_round_trip(root):
    assert not storage.exists(root)
    files = make_tree(root)
    storage.write_text(storage.join(root, "t.txt"), "第一\n")
    files["t.txt"] = "第一\n".encode()
    assert storage.read_text(storage.join(root, "t.txt")) == "第一\n"
    assert_tree(root, files)
    assert storage.exists(root) and storage.isdir(root)
    assert storage.isdir(storage.join(root, "sub/deeper"))
    assert storage.exists(storage.join(root, "a.txt")) and not storage.isdir(storage.join(root, "a.txt"))
    assert not storage.exists(storage.join(root, "nope.txt"))

    storage.write_bytes(storage.join(root, "a.txt"), b"replaced")  # overwrite in place
    assert storage.read_bytes(storage.join(root, "a.txt")) == b"replaced"

    with storage.open_output(storage.join(root, "stream/s.bin")) as out:
        out.write(b"12345")
    with storage.open_input(storage.join(root, "stream/s.bin")) as inp:
        assert inp.read() == b"12345"

    with pytest.raises(StorageError, match="not found"):
        storage.read_bytes(storage.join(root, "nope.txt"))
    with pytest.raises(StorageError, match="expected a directory"):
        storage.list_files(storage.join(root, "a.txt"))
    with pytest.raises(StorageError, match="not found"):
        storage.list_files(storage.join(root, "nope"))

    storage.remove_tree(storage.join(root, "sub"))
    assert not storage.exists(storage.join(root, "sub/b.json"))
    assert "a.txt" in storage.list_files(root)
    storage.remove_tree(root)
    # seaweedfs may keep an emptied nested prefix as a directory (AWS would not): no files
    # is the contract, not "no prefix".
    assert not storage.exists(root) or storage.list_files(root) == {}
    storage.remove_tree(root)  # missing is fine
    storage.remove_tree(storage.join(root, "never-there"))


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "new" / "dir" / "f.json"
    storage.write_text(str(target), "{}")
    assert target.read_text() == "{}"
    assert os.listdir(target.parent) == ["f.json"]
    assert (target.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_check_writable_ok(root):
    storage.check_writable(root)
    assert storage.list_files(root) == {}  # the probe is gone


def test_remove_tree_keeps_the_bucket(s3):
    root = s3.bucket("wr-storage-empty")
    storage.write_bytes(storage.join(root, "x/y"), b"1")
    storage.remove_tree(root)
    assert storage.exists(root) and storage.list_files(root) == {}


# -- copy_tree -----------------------------------------------------------------------------

@pytest.mark.parametrize("src_kind,dst_kind", [("local", "s3"), ("s3", "local"),
                                               ("local", "local"), ("s3", "s3")])
def test_copy_tree(src_kind, dst_kind, tmp_path, s3_root):
    base = {"local": str(tmp_path), "s3": s3_root}
    src = storage.join(base[src_kind], "src")
    dst = storage.join(base[dst_kind], "dst")
    files = make_tree(src)
    listing = storage.copy_tree(src, dst, log=lambda msg: None)
    assert listing == {rel: len(data) for rel, data in sorted(files.items())}
    assert_tree(dst, files)


def test_copy_tree_logs_progress(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "PROGRESS_EVERY_S", 0.0)
    make_tree(str(tmp_path / "src"))
    lines: list[str] = []
    storage.copy_tree(str(tmp_path / "src"), str(tmp_path / "dst"), log=lines.append)
    assert lines and "6/6 files" in lines[-1] and "MB" in lines[-1]
    quiet: list[str] = []
    storage.copy_tree(str(tmp_path / "src"), str(tmp_path / "dst2"), progress=False, log=quiet.append)
    assert quiet == []


# -- pull ------------------------------------------------------------------------------------

def make_checkpoint(base: str, model: bytes = b"weights" * 1000, lie: dict | None = None) -> dict:
    """A checkpoint dir with a state.json manifest (sizes + sha256); `lie` edits the manifest."""
    files = {"model.safetensors": model, "optim/rank0.pt": os.urandom(4096), "tokenizer.model": b"spm"}
    for rel, data in files.items():
        storage.write_bytes(storage.join(base, rel), data)
    manifest = {rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for rel, data in files.items()}
    manifest.update(lie or {})
    storage.write_text(storage.join(base, "state.json"), json.dumps(
        {"step": 7, "stage": 0, "stage_step": 7, "world_size": 1, "config": {}, "files": manifest}))
    return files


def test_pull(s3_root, tmp_path):
    src = storage.join(s3_root, "ckpt")
    files = make_checkpoint(src)
    dest = tmp_path / "dest"
    summary = pull(src, str(dest), log=lambda msg: None)
    assert summary["files"] == 4 and summary["bytes"] == sum(map(len, files.values())) + len(
        storage.read_bytes(storage.join(src, "state.json")))
    assert summary["seconds"] >= 0
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    assert not (tmp_path / "dest.partial").exists()

    with pytest.raises(StorageError, match=r"dest: not empty; pass --overwrite"):
        pull(src, str(dest), log=lambda msg: None)
    assert (dest / "model.safetensors").read_bytes() == files["model.safetensors"]

    (dest / "stale.txt").write_text("from an older pull")
    make_checkpoint(src, model=b"newer weights")
    pull(src, str(dest), overwrite=True, log=lambda msg: None)
    assert (dest / "model.safetensors").read_bytes() == b"newer weights"
    assert not (dest / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["dest"]


def test_pull_into_empty_dir_and_from_local(tmp_path):
    src = tmp_path / "src"
    make_checkpoint(str(src))
    (tmp_path / "empty").mkdir()
    pull(str(src), str(tmp_path / "empty"), log=lambda msg: None)
    assert (tmp_path / "empty" / "state.json").exists()


def test_pull_refuses_incomplete_checkpoint(s3_root, tmp_path):
    src = storage.join(s3_root, "ckpt")
    make_checkpoint(src, lie={"optim/rank1.pt": {"size": 4096}})
    dest = tmp_path / "dest"
    with pytest.raises(CheckpointError, match=r"incomplete checkpoint: optim/rank1.pt"):
        pull(src, str(dest), log=lambda msg: None)
    assert not dest.exists() and not (tmp_path / "dest.partial").exists()


def test_pull_refuses_short_file_and_bad_hash(s3_root, tmp_path):
    src = storage.join(s3_root, "short")
    make_checkpoint(src, lie={"tokenizer.model": {"size": 999}})
    with pytest.raises(CheckpointError, match=r"tokenizer.model has 3 bytes, state.json says 999"):
        pull(src, str(tmp_path / "d1"), log=lambda msg: None)

    src = storage.join(s3_root, "hash")
    make_checkpoint(src, lie={"tokenizer.model": {"size": 3, "sha256": "0" * 64}})
    with pytest.raises(CheckpointError, match=r"tokenizer.model: sha256 .* does not match"):
        pull(src, str(tmp_path / "d2"), log=lambda msg: None)
    assert sorted(os.listdir(tmp_path)) == []


def test_pull_refuses_a_folder_that_is_neither_checkpoint_nor_export(tmp_path, s3_root):
    """Was: exit 0, "pulled 2 files"."""
    for src in (str(tmp_path / "junk"), storage.join(s3_root, "junk")):
        storage.write_text(storage.join(src, "a.txt"), "a")
        storage.write_text(storage.join(src, "b/c.txt"), "c")
        with pytest.raises(StorageError, match=r"junk: neither a wr-train checkpoint \(no state.json\) "
                                               r"nor an exported model \(no config.json\)"):
            pull(src, str(tmp_path / "d"), log=lambda msg: None)
        assert not (tmp_path / "d").exists()
    storage.write_text(storage.join(src, "state.json"), "")  # torn
    with pytest.raises(CheckpointError, match=r"junk/state.json: not valid JSON \(0 bytes: torn or empty"):
        pull(src, str(tmp_path / "d"), log=lambda msg: None)


def test_pull_refuses_empty_or_missing_source(tmp_path, s3_root):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="no files to pull"):
        pull(str(tmp_path / "empty"), str(tmp_path / "d"), log=lambda msg: None)
    with pytest.raises(StorageError, match="not found"):
        pull(storage.join(s3_root, "never-written"), str(tmp_path / "d"), log=lambda msg: None)
    with pytest.raises(StorageError, match="local destination"):
        pull(str(tmp_path), storage.join(s3_root, "x"), log=lambda msg: None)


# -- failures ----------------------------------------------------------------------------------

def test_unreachable_endpoint_fails_fast(bucket, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    for op in (storage.exists, storage.list_files, storage.read_bytes, storage.check_writable,
               lambda p: storage.write_bytes(p, b"x")):
        with pytest.raises(StorageError, match=f"cannot reach the S3 endpoint {endpoint}") as err:
            op(storage.join(bucket, "x"))
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{bucket}/x: ")
    assert time.monotonic() - start < 30


def test_wrong_secret_is_access_denied(bucket, monkeypatch):
    path = storage.join(bucket, "secret-test.txt")
    storage.write_text(path, "hi")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    for op in (storage.read_bytes, storage.exists, storage.list_files, storage.check_writable,
               lambda p: storage.write_bytes(p, b"x")):
        with pytest.raises(StorageError, match=r"access denied \(check AWS credentials\)"):
            op(path if op is not storage.list_files else bucket)


def test_unknown_access_key_is_access_denied(bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(StorageError, match="access denied"):
        storage.list_files(bucket)


def test_nonexistent_bucket(s3):
    path = "s3://no-such-bucket-wr/ckpt"
    for op in (storage.list_files, storage.read_bytes, storage.check_writable):
        with pytest.raises(StorageError, match=f"{path}: bucket no-such-bucket-wr does not exist"):
            op(path)
    assert not storage.exists(path)


def test_unwritable_local(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    target = blocker / "runs"  # a file as parent fails even for root
    with pytest.raises(StorageError, match=f"{target}: not writable"):
        storage.check_writable(str(target))
    with pytest.raises(StorageError, match=f"{target / 'f.txt'}: "):
        storage.write_text(str(target / "f.txt"), "x")
    with pytest.raises(StorageError, match="/proc/wr-train-test: not writable"):
        storage.check_writable("/proc/wr-train-test")
