"""``attnzoo analyze``: the attention analyses (catalog A1-A4) on all-MiniLM-L6-v2, as a report.

    attnzoo analyze [SENTENCE ...] [--out DIR] [--clusters K]

Each sentence runs alone through the shipped MiniLM encoder (:mod:`attnzoo.bench.minilm`) inside
:func:`attnzoo.hooks.attention_hooks`, which captures the 6 layers x 12 heads' maps; then:
per-head entropy, first-token mass, sink rate, extreme-token mass, value-norm drains, mean token
distance, attention rollout, a copy score on the sentence repeated (an encoder's stand-in for
the retrieval-head needle task: a query in the second copy copies when its top key is the same
token in the first copy), head-ablation importance (1 - cosine of the sentence embeddings with
one head zeroed, through the hooks' editing) and k-means clusters of the heads' maps. Written
to ``DIR``: ``report.md``, heatmap PNGs and ``metrics.json``. :func:`analyze_minilm` computes
and writes; :func:`cmd_analyze` prints.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from torch import Tensor

from .. import analysis
from ..errors import ParameterError
from ..hooks import attention_hooks

__all__ = ["DEFAULT_SENTENCES", "add_analyze_parser", "analyze_minilm", "cmd_analyze"]

DEFAULT_SENTENCES = (
    "The cat slept on the warm windowsill all afternoon.",
    "Why is the sky blue during the day but red at sunset?",
)
DEFAULT_OUT = "attnzoo-analysis"


@dataclass
class SentenceMaps:
    """One sentence's tokens, per-layer maps (H, N, N) and values (H, N, Dh)."""

    text: str
    tokens: list[str]
    maps: list[Tensor]
    values: list[Tensor]


@dataclass
class Analysis:
    """Everything ``attnzoo analyze`` computed: per (layer, head) tables, rollouts, files written."""

    sentences: list[SentenceMaps]
    per_head: dict[str, Tensor]  # name -> (L, H), averaged over sentences
    rollouts: list[Tensor]  # per sentence (N, N)
    sink_rate: float
    clusters: Tensor  # (L, H) labels, from the first sentence's maps
    files: list[Path] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# running the model
# --------------------------------------------------------------------------------------------
def _capture(model: Any, ids: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, the maps (H, N, N) and the values (H, N, Dh) of one unpadded sentence."""
    from ..bench.minilm import Batch

    captured: list[Any] = []
    with attention_hooks() as hooks:
        model.encode(Batch(ids.view(1, -1), torch.zeros(1, ids.numel(), dtype=torch.bool)), captured=captured)
    return [r.weights[0] for r in hooks.records], [c.v[0] for c in captured]


def _sentence(model: Any, text: str) -> SentenceMaps:
    encoding = model.tokenizer.encode(text)
    maps, values = _capture(model, torch.tensor(encoding.ids))
    return SentenceMaps(text, list(encoding.tokens), maps, values)


def _copy_score(model: Any, text: str) -> Tensor:
    """(L, H): :func:`~attnzoo.analysis.retrieval_score` of the second copy of a repeated sentence."""
    ids = model.tokenizer.encode(text).ids
    body = ids[1:-1]  # without [CLS] and [SEP]
    n = len(body)
    doubled = torch.tensor([ids[0], *body, ids[-1], *body, ids[-1]])
    maps, _ = _capture(model, doubled)
    second = slice(n + 2, 2 * n + 2)
    outputs = torch.tensor(body)
    return torch.stack([analysis.retrieval_score(m[:, second], doubled, outputs, (1, n + 1)) for m in maps])


def _ablation(model: Any, sentences: Sequence[str]) -> Tensor:
    """(L, H): mean 1 - cos(embedding with the head zeroed, embedding) over the sentences."""
    full = model.embed(sentences)
    layers = [f"call{i}" for i in range(model.config.layers)]

    def distance() -> float:
        return float((1.0 - (model.embed(sentences) * full).sum(-1)).mean())

    return analysis.head_ablation_importance(distance, layers, model.config.heads)


def analyze_minilm(sentences: Sequence[str], out: Path, *, clusters: int = 4, model: Any = None) -> Analysis:
    """Run every analysis on MiniLM over ``sentences`` and write ``out/report.md``, PNGs and ``metrics.json``."""
    if not sentences or not all(isinstance(s, str) and s.strip() for s in sentences):
        raise ParameterError("sentences: expected at least one non-empty sentence", argument="sentences")
    if model is None:
        from ..bench.minilm import load

        model = load()
    runs = [_sentence(model, s) for s in sentences]
    per_sentence: dict[str, list[Tensor]] = {}
    for run in runs:
        for name, values in _head_metrics(run).items():
            per_sentence.setdefault(name, []).append(values)
    per_head = {name: torch.stack(values).mean(0) for name, values in per_sentence.items()}
    per_head["copy score"] = torch.stack([_copy_score(model, s) for s in sentences]).mean(0)
    per_head["ablation importance"] = _ablation(model, list(sentences))
    first = runs[0]
    heads = torch.cat(first.maps)  # (L * H, N, N)
    n_clusters = min(clusters, heads.shape[0])
    labels, _ = analysis.cluster_heads(heads, n_clusters)
    result = Analysis(
        sentences=runs,
        per_head=per_head,
        rollouts=[analysis.rollout(run.maps) for run in runs],
        sink_rate=sum(analysis.sink_rate(run.maps) for run in runs) / len(runs),
        clusters=labels.view(len(first.maps), -1),
    )
    _write(result, Path(out))
    return result


def _head_metrics(run: SentenceMaps) -> dict[str, Tensor]:
    """(L, H) per metric for one sentence."""
    n = len(run.tokens)
    rows: dict[str, list[Tensor]] = {"entropy": [], "first-token mass": [], "extreme-token mass": [], "value-norm drain": [], "mean distance (tokens)": []}
    for maps, values in zip(run.maps, run.values):
        rows["entropy"].append(analysis.head_entropy(maps))
        rows["first-token mass"].append(analysis.first_token_mass(maps))
        rows["extreme-token mass"].append(analysis.extreme_token_mass(maps)[0])
        rows["value-norm drain"].append(analysis.value_norm_drain(maps, values))
        rows["mean distance (tokens)"].append(analysis.attention_distance(maps, (n,)))
    return {name: torch.stack(values) for name, values in rows.items()}


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _write(result: Analysis, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.files += _figures(result, out)
    (out / "metrics.json").write_text(json.dumps(_metrics(result), indent=1))
    (out / "report.md").write_text(_markdown(result))
    result.files += [out / "metrics.json", out / "report.md"]


def _metrics(result: Analysis) -> dict[str, Any]:
    return {
        "sentences": [{"text": s.text, "tokens": s.tokens} for s in result.sentences],
        "per_head": {name: values.tolist() for name, values in result.per_head.items()},
        "rollout": [r.tolist() for r in result.rollouts],
        "sink_rate": result.sink_rate,
        "clusters": result.clusters.tolist(),
    }


def _markdown(result: Analysis) -> str:
    first = result.sentences[0]
    lines = [
        "# Attention analysis of all-MiniLM-L6-v2",
        "",
        "Written by `attnzoo analyze`: maps captured with `attnzoo.hooks.attention_hooks`, numbers from `attnzoo.analysis`.",
        "Per-head numbers are averaged over the sentences; each sentence runs alone (no padding).",
        "",
        "## Sentences",
        "",
        *[f"{i + 1}. {s.text} ({len(s.tokens)} tokens: `{' '.join(s.tokens)}`)" for i, s in enumerate(result.sentences)],
        "",
        "## Per layer (mean over heads)",
        "",
        _layer_table(result),
        "",
        f"Entropy is in nats; a row over n keys is at most log n (log {len(first.tokens)} = {math.log(len(first.tokens)):.2f} for sentence 1). "
        f"Sink rate (share of heads with first-token mass > 0.3, Gu et al. 2024): **{result.sink_rate:.2f}**. "
        "A value-norm drain below 1: the head's most-attended key has a smaller value than its keys' mean (Guo et al. 2024).",
        "",
        "## Heads",
        "",
        _top_heads(result, "ablation importance", "Most important heads (1 - cosine of the embeddings with the head zeroed)"),
        "",
        _top_heads(result, "copy score", "Best copy heads (sentence repeated: top key = the same token in the first copy; Wu et al. 2024's score)"),
        "",
        "Head clusters (k-means on the first sentence's normalized maps), `layer.head`:",
        "",
        *[f"- cluster {c}: " + ", ".join(f"{layer}.{head}" for layer, head in (result.clusters == c).nonzero().tolist()) for c in range(int(result.clusters.max()) + 1)],
        "",
        "## Figures",
        "",
        *[f"![{p.stem}]({p.name})" for p in result.files if p.suffix == ".png"],
        "",
    ]
    return "\n".join(lines)


def _layer_table(result: Analysis) -> str:
    names = [n for n in result.per_head]
    header = "| layer | " + " | ".join(names) + " |"
    rule = "|---|" + "---|" * len(names)
    layers = next(iter(result.per_head.values())).shape[0]
    rows = [f"| {layer} | " + " | ".join(f"{float(result.per_head[n][layer].mean()):.3g}" for n in names) + " |" for layer in range(layers)]
    return "\n".join([header, rule, *rows])


def _top_heads(result: Analysis, name: str, title: str, count: int = 5) -> str:
    values = result.per_head[name]
    order = values.flatten().argsort(descending=True)[:count].tolist()
    heads = values.shape[1]
    return title + ": " + ", ".join(f"{i // heads}.{i % heads} ({float(values.flatten()[i]):.3g})" for i in order)


def _figures(result: Analysis, out: Path) -> list[Path]:
    from ..bench.report import _matplotlib  # Agg, or an ImportError saying how to get matplotlib

    _matplotlib()
    from matplotlib.figure import Figure

    first = result.sentences[0]
    files = []
    for layer, maps in enumerate(first.maps):
        files.append(_save(_head_grid(Figure, maps, first.tokens, f"layer {layer}, sentence 1"), out / f"layer{layer}_heads.png"))
    files.append(_save(_heatmap(Figure, result.rollouts[0], first.tokens, "attention rollout, sentence 1 (Abnar & Zuidema 2020)"), out / "rollout.png"))
    files.append(_save(_summary(Figure, result), out / "heads_summary.png"))
    return files


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=80)
    return path


def _ticks(ax: Any, tokens: Sequence[str]) -> None:
    if len(tokens) <= 24:
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
    else:
        ax.set_xticks([])
        ax.set_yticks([])


def _head_grid(Figure: Any, maps: Tensor, tokens: Sequence[str], title: str) -> Any:
    heads = maps.shape[0]
    cols = 4
    rows = -(-heads // cols)
    fig = Figure(figsize=(3.2 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= heads:
            ax.axis("off")
            continue
        ax.imshow(maps[h].float().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=8)
        _ticks(ax, tokens)
    fig.suptitle(title)
    return fig


def _heatmap(Figure: Any, matrix: Tensor, tokens: Sequence[str], title: str) -> Any:
    fig = Figure(figsize=(6, 5.4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(matrix.float().numpy(), cmap="viridis")
    fig.colorbar(image, ax=ax)
    _ticks(ax, tokens)
    ax.set_title(title, fontsize=9)
    return fig


def _summary(Figure: Any, result: Analysis) -> Any:
    names = ["entropy", "first-token mass", "copy score", "ablation importance"]
    fig = Figure(figsize=(4.2 * len(names), 3.6), layout="constrained")
    axes = fig.subplots(1, len(names))
    for ax, name in zip(axes, names):
        image = ax.imshow(result.per_head[name].float().numpy(), cmap="magma", aspect="auto")
        fig.colorbar(image, ax=ax)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    return fig


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def add_analyze_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("analyze", help="attention analyses (rollout, entropy, sinks, heads) on MiniLM, as a report")
    parser.add_argument("sentences", nargs="*", help=f"sentences to analyze (default: {len(DEFAULT_SENTENCES)} built in)")
    parser.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"output directory (default ./{DEFAULT_OUT})")
    parser.add_argument("--clusters", type=int, default=4, help="head clusters for k-means (default 4)")
    parser.set_defaults(handler=cmd_analyze)


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    if args.clusters < 1:
        raise ParameterError(f"--clusters: expected a positive int, got {args.clusters}", argument="clusters")
    try:
        result = analyze_minilm(args.sentences or DEFAULT_SENTENCES, args.out, clusters=args.clusters)
    except ImportError as err:
        console.print(f"attnzoo analyze: {err}")
        return 1
    entropy = result.per_head["entropy"]
    console.print(f"analyzed {len(result.sentences)} sentence(s): {entropy.shape[0]} layers x {entropy.shape[1]} heads")
    console.print(f"sink rate {result.sink_rate:.2f}; mean entropy {float(entropy.mean()):.3f} nats")
    console.print(f"wrote {len(result.files)} files to {args.out} (report.md, metrics.json, heatmaps)")
    return 0
