"""bench/pretrain_recipes.py's plain loop, the sweep's workhorse: it runs the recipe's
steps over every rank's stream and scores the held-out [MASK] targets against the floor."""
from __future__ import annotations

import json
import math

from tests.conftest import load_bench


def test_plain_point_trains_and_reports_against_the_floor(shards128):
    manifest = json.loads((shards128 / "manifest.json").read_text())
    over = ["checkpoint_every=4", "stages.0.steps=8", "stages.0.global_batch=16",
            "stages.0.micro_batch=8", "stages.0.lr=2e-3"]
    bench = load_bench("pretrain_recipes")
    r = bench.plain_point(str(shards128), over + ["model.output_bias=zero"], "smoke")
    assert sorted(r["evals"]) == [4, 8] and r["rows"] == 8 * 16
    assert r["floor"] == manifest["unigram"]["entropy"]
    assert math.isclose(r["below_floor"], r["floor"] - r["eval_loss"])
    # from ln(V) at init towards the floor: 8 steps of lr 2e-3 learn the frequencies
    assert r["evals"][8] < r["evals"][4] < math.log(manifest["vocab_size"])
    # demo-tiny's own start (the head's bias at the log frequencies) is on the floor already
    start = bench.plain_point(str(shards128), over, "smoke-unigram")
    assert abs(start["evals"][4] - r["floor"]) < 0.3 and start["evals"][4] < r["evals"][4]
