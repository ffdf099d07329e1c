"""SparseMLM: the training forward equals HF's BertForMaskedLM loss, for every preset shape."""
import numpy as np
import pytest
import torch

from wr_train.config import ModelConfig
from wr_train.masking import mask_batch
from wr_train.model import TARGET_BUCKET, SparseMLM, TargetLayout, build_mlm, flops_per_token


@pytest.mark.parametrize("size", ["tiny", "mini"])
def test_sparse_loss_equals_hf_full_loss(size):
    """Skipping the last layer's work at unmasked positions and the head's at every
    unmasked position changes nothing the loss sees (dropout off to compare)."""
    mlm = build_mlm(ModelConfig(size=size), 3000, seed=1).eval()
    rng = np.random.default_rng(0)
    rows = rng.integers(15, 3000, size=(6, 64))
    rows[1, 40:] = 0                      # padding in one row
    ids, labels = mask_batch(rows, np.arange(6), epoch=0, seed=3, vocab_size=3000)
    ids, labels = torch.from_numpy(ids), torch.from_numpy(labels)
    layout = TargetLayout.of(ids.numpy(), labels.numpy())
    assert len(layout.targets) % TARGET_BUCKET == 0 and len(layout.targets) > layout.n  # padded head rows
    loss, correct, n = SparseMLM(mlm)(ids, labels)
    ref = mlm(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)
    assert n == int((labels != -100).sum()) > 0
    assert torch.allclose(loss, ref.loss, rtol=1e-5, atol=1e-5)
    where = labels != -100
    assert int(correct) == int((ref.logits[where].argmax(-1) == labels[where]).sum())
    # gradients agree too
    loss.backward()
    g_ours = {k: p.grad.clone() for k, p in mlm.named_parameters() if p.grad is not None}
    mlm.zero_grad()
    mlm(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels).loss.backward()
    for k, p in mlm.named_parameters():
        ref_g = p.grad if p.grad is not None else torch.zeros_like(p)
        assert torch.allclose(g_ours.get(k, torch.zeros_like(p)), ref_g, rtol=1e-4, atol=1e-6), k


def test_padded_head_rows_count_for_nothing():
    """The head's rows past the targets (up to TARGET_BUCKET) predict [PAD] here; they
    must add no correct prediction and no loss."""
    mlm = build_mlm(ModelConfig(size="tiny"), 1000, seed=1).eval()
    with torch.no_grad():
        mlm.cls.predictions.bias[0] = 1e4   # every row's top logit is [PAD] (id 0)
    rows = np.random.default_rng(0).integers(15, 1000, size=(2, 40))
    ids, labels = mask_batch(rows, np.arange(2), epoch=0, seed=3, vocab_size=1000)
    ids, labels = torch.from_numpy(ids), torch.from_numpy(labels)
    loss, correct, n = SparseMLM(mlm)(ids, labels)
    assert int(correct) == 0 and n % TARGET_BUCKET
    ref = mlm(input_ids=ids, attention_mask=(ids != 0).long(), labels=labels)
    assert torch.allclose(loss, ref.loss, rtol=1e-5)


def test_flops_per_token_counts_the_sparse_last_layer():
    full = flops_per_token(ModelConfig(size="tiny"), 32000, 128, 1.0)
    sparse = flops_per_token(ModelConfig(size="tiny"), 32000, 128, 0.15)
    assert sparse < full
    # mask fraction 1.0: every position runs everything = the dense count
    h, f, v = 128, 512, 32000
    dense = 3 * (2 * (8 * h * h + 4 * h * f + 4 * 128 * h) + 2 * h * h + 2 * h * v)
    assert full == pytest.approx(dense)


def test_init_options_reach_the_model():
    """init_std is BERT's initializer_range; position_init=sinusoidal starts the learned
    position table as sin/cos at that scale; a bad value names its key."""
    from wr_train.config import ConfigError
    from wr_train.model import sinusoidal_positions
    normal = build_mlm(ModelConfig(size="tiny", init_std=0.05), 500, seed=0)
    assert normal.config.initializer_range == 0.05
    assert normal.bert.encoder.layer[0].attention.self.query.weight.std().item() == pytest.approx(0.05, rel=0.05)
    sin = build_mlm(ModelConfig(size="tiny", position_init="sinusoidal"), 500, seed=0)
    table = sin.bert.embeddings.position_embeddings.weight
    assert torch.allclose(table, sinusoidal_positions(512, 128) * 0.02 / 0.5 ** 0.5)
    assert table[0, 1].item() == pytest.approx(0.02 / 0.5 ** 0.5)   # cos(0) = 1
    with pytest.raises(ConfigError, match="model.position_init"):
        ModelConfig(size="tiny", position_init="rope").resolved()


def test_unigram_output_bias_predicts_the_floor():
    """init_output_bias: with (nearly) zero weights the head's softmax is the add-one
    smoothed unigram distribution at every position: the first loss is the floor, not log V."""
    from wr_train.config import ConfigError
    from wr_train.model import init_output_bias
    vocab = 400
    rng = np.random.default_rng(0)
    counts = np.zeros(vocab, np.int64)
    counts[15:] = (1e5 / np.arange(1, vocab - 14) ** 1.1).astype(np.int64)   # Zipf-like
    mlm = build_mlm(ModelConfig(size="tiny", init_std=1e-4), vocab, seed=0).eval()  # ~no signal from weights
    init_output_bias(mlm, counts)
    p = (counts + 1.0) / (counts + 1.0).sum()
    bias = mlm.cls.predictions.bias.detach().numpy()
    assert np.allclose(bias - bias.mean(), np.log(p) - np.log(p).mean(), atol=1e-5)
    assert mlm.cls.predictions.decoder.bias is mlm.cls.predictions.bias    # the head uses it
    rows = rng.choice(vocab, p=p, size=(2, 64))
    with torch.no_grad():
        log_q = torch.log_softmax(mlm(input_ids=torch.from_numpy(rows)).logits, -1)   # [2, 64, V]
    assert torch.allclose(log_q, torch.from_numpy(np.log(p)).float().expand_as(log_q), atol=0.01)
    with pytest.raises(ConfigError, match="model.output_bias"):
        ModelConfig(size="tiny", output_bias="log").resolved()
