"""The GPU path: NCCL + bf16 ZeRO on CUDA workers. Skipped where no GPU exists (the CPU
suite covers the same code with gloo + fp32/bf16)."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sparse_loss_bf16_on_cuda_matches_fp32():
    import numpy as np

    from wr_train.config import ModelConfig
    from wr_train.masking import mask_batch
    from wr_train.model import SparseMLM, build_mlm
    mlm = build_mlm(ModelConfig(size="mini"), 8000, seed=1).cuda().eval()
    rows = np.random.default_rng(0).integers(15, 8000, size=(8, 128))
    ids, labels = (torch.from_numpy(a).cuda() for a in mask_batch(rows, np.arange(8), epoch=0, seed=0, vocab_size=8000)[:2])
    ref = SparseMLM(mlm)(ids, labels)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = SparseMLM(mlm)(ids, labels)[0]
    assert torch.allclose(low.float(), ref, rtol=2e-2)


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_bf16_zero_nccl_pretraining(ray_local, shards128, tmp_path, zero_stage):
    from tests.conftest import pretrain_cfg
    from wr_train import pretrain
    from wr_train.checkpoint import verify_complete
    workers = max(1, min(2, torch.cuda.device_count()))
    cfg = pretrain_cfg(shards128, tmp_path, f"gpu-z{zero_stage}", steps=20, gpu=True,
                       workers=workers, zero_stage=zero_stage, precision="bf16")
    state = verify_complete(pretrain.run(cfg))
    assert state["step"] == 20
    rows = [json.loads(line) for line in (tmp_path / f"gpu-z{zero_stage}" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
