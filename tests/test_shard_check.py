"""Shards you can trust: a row group that cannot be read is named (file and group) by the
reader the training stream uses, and `wr-train check-shards` reads every row group of a
folder (local or s3://) on Ray, exiting 2 with one line per bad group."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from wr_train import cli


def corrupt_group(path: Path, group: int, column: int = 1) -> None:
    """Flip 8 bytes in the middle of row group `group`'s column chunk: same size, so the
    folder still passes load_manifest's size check."""
    import pyarrow.parquet as pq
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(column)
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    with open(path, "r+b") as f:
        f.seek(middle)
        data = f.read(8)
        f.seek(middle)
        f.write(bytes(b ^ 0x01 for b in data))


@pytest.fixture(scope="module")
def corrupted(shards128, tmp_path_factory) -> Path:
    """A copy of the test shards with row group 3 of the first train file and row group 0
    of the first eval file corrupted."""
    out = tmp_path_factory.mktemp("corrupted") / "s128"
    shutil.copytree(shards128, out)
    manifest = json.loads((out / "manifest.json").read_text())
    first = sorted(manifest["files"])[0]
    assert len(manifest["files"][first]["row_groups"]) > 4  # groups 2 and 4 stay good
    corrupt_group(out / first, 3)
    corrupt_group(out / sorted(manifest["eval"]["files"])[0], 0)
    return out


def test_bad_row_group_is_named_by_the_reader(corrupted, ray_local):
    from wr_train.shards import ShardReadError, load_manifest, open_shard, read_group, read_rows
    manifest = load_manifest(str(corrupted))  # same sizes: the listing cannot tell
    first = sorted(manifest["files"])[0]
    shard = open_shard(str(corrupted), first)
    for good in (2, 4):
        row_ids, ids = read_group(shard, good)
        assert len(ids) == manifest["files"][first]["row_groups"][good]
    with pytest.raises(ShardReadError) as caught:
        read_group(shard, 3)
    line = str(caught.value)
    assert line.startswith(f"{corrupted}/{first} row group 3: cannot be read (") and "\n" not in line
    assert f"wr-train check-shards {corrupted}`" in line
    # the same line after Ray carries the error out of a worker (pretrain.run shows
    # root_cause_line of what trainer.fit() raises)
    assert str(pickle.loads(pickle.dumps(caught.value))) == line
    from wr_train.local_ray import root_cause_line
    read_in_a_task = ray_local.remote(lambda: read_group(open_shard(str(corrupted), first), 3))
    with pytest.raises(Exception) as in_ray:
        ray_local.get(read_in_a_task.remote())
    assert root_cause_line(in_ray.value).endswith(line)
    # reading the whole file (the held-out rows are read this way) names the group too
    with pytest.raises(ShardReadError, match=r"part-00000\.parquet row group 3: cannot be read"):
        read_rows(str(corrupted), first)
    with pytest.raises(ShardReadError, match=rf"{corrupted}/eval/part-00000\.parquet row group 0: "):
        read_rows(str(corrupted), sorted(manifest["eval"]["files"])[0])


def test_check_shards_passes_good_shards_and_names_bad_groups(shards128, corrupted, capfd, s3):
    from wr_train import storage
    manifest = json.loads((shards128 / "manifest.json").read_text())
    files = {**manifest["files"], **manifest["eval"]["files"]}
    groups = sum(len(info["row_groups"]) for info in files.values())
    rows = manifest["rows"] + manifest["eval"]["rows"]

    capfd.readouterr()
    assert cli.main(["check-shards", str(shards128)]) == 0
    out, err = capfd.readouterr()
    assert out.strip().startswith(f"check-shards {shards128}: ok, {len(files)} files, {groups:,} row groups, "
                                  f"{rows:,} rows read in "), out

    assert cli.main(["check-shards", str(corrupted)]) == 2
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    first = sorted(manifest["files"])[0]
    assert lines[0].startswith(f"wr-train check-shards: {corrupted}/eval/part-00000.parquet row group 0: "
                               f"cannot be read ("), err
    assert lines[1].startswith(f"wr-train check-shards: {corrupted}/{first} row group 3: cannot be read ("), err
    assert lines[2].startswith(f"check-shards {corrupted}: 2 bad of {groups:,} row groups in {len(files)} files"), err
    assert len(lines) == 3 and not out, err

    # the same on S3, from the session's Ray (its workers have the server's credentials)
    bucket = s3.bucket("wr-check-shards")
    storage.copy_tree(str(shards128), storage.join(bucket, "s128"), progress=False)
    assert cli.main(["check-shards", storage.join(bucket, "s128")]) == 0
    assert f": ok, {len(files)} files" in capfd.readouterr().out


def test_check_shards_names_counts_that_disagree_with_the_manifest(shards128, tmp_path):
    """Groups that read fine but do not match the manifest: rows, seq_length, row_ids,
    ids outside the vocabulary (the checks beside the read itself; no Ray needed)."""
    from wr_train.shard_check import check_groups
    manifest = json.loads((shards128 / "manifest.json").read_text())
    name = sorted(manifest["files"])[0]
    info = manifest["files"][name]
    seq, vocab = manifest["seq_length"], manifest["vocab_size"]
    path = f"{shards128}/{name}"
    n = len(info["row_groups"])
    assert check_groups(str(shards128), name, info, 0, n, seq, vocab) == (n, info["rows"], [])
    lying = {**info, "row_groups": [info["row_groups"][0] + 1, *info["row_groups"][1:]]}
    assert check_groups(str(shards128), name, lying, 0, 1, seq, vocab)[2] == [
        f"{path} row group 0: {info['row_groups'][0]} rows, the manifest says {info['row_groups'][0] + 1}"]
    assert check_groups(str(shards128), name, info, 0, 1, seq * 2, vocab)[2] == [
        f"{path} row group 0: input_ids of length {seq}, the manifest's seq_length is {seq * 2}"]
    shifted = {**info, "first_row_id": info["first_row_id"] + 5}
    assert check_groups(str(shards128), name, shifted, 1, 2, seq, vocab)[2][0].startswith(
        f"{path} row group 1: row_id not {info['first_row_id'] + info['row_groups'][0] + 5}..")
    assert check_groups(str(shards128), name, info, 0, 1, seq, 3)[2][0].startswith(
        f"{path} row group 0: ids outside 0..2 (found ")
    extra = {**info, "row_groups": info["row_groups"][:-1]}
    assert f"{path}: {n} row groups, the manifest lists {n - 1}" in \
        check_groups(str(shards128), name, extra, 0, 1, seq, vocab)[2]
