"""``attnzoo bench cache``: recall at a fixed KV-cache budget, for every eviction policy (B5, K2-K4).

No LLM weights can be downloaded, so the benchmark trains its own small causal LM (Zoology's
recall model, :class:`~attnzoo.bench.mqar.MQARModel`: 2 softmax layers with short convolutions)
on a needle task with the question in the prompt, then decodes the answers from a compressed
KV cache:

* :func:`needle_recall`: ``P`` key-value pairs ``k1 v1 ... kP vP`` (keys from ``[2, V/2)``,
  values from ``[V/2, V)``, as MQAR), a separator, the question (``m`` of the keys, in random
  order), a separator, and the same ``m`` keys again, where the model must answer each key's
  value. The first copy is what makes the question visible at compression time: SnapKV's claim
  ("LLM knows what you are looking for before generation") is about a prompt that ends with the
  question, and this is that prompt.
* :class:`CachedDecoder`: the trained model run as a decoder with a per-layer KV cache. The prompt
  (pairs, question, separators: ``S = 2P + m + 2`` tokens) is prefilled, each layer's cache is cut
  to the budget by the policy **once, after the prefill** (kvpress's protocol), then the second
  copy is fed one token per step (teacher forcing), each step appending its key and value. At
  budget = S the decoder's logits equal the model's full forward (tested).
* Policies (:mod:`attnzoo.cache.policies`, scored on each layer's own prefill queries and keys):
  ``streaming_llm`` (4 sinks + recent), ``h2o`` (accumulated attention of every prompt query;
  half the budget heavy hitters, half recent, as H2O's experiments), ``snapkv`` (observation
  window = the last ``m + 1`` prompt queries, i.e. the question and its separator; pooling
  kernel 5), ``tova`` (the last prompt query's attention), ``key_norm`` (lowest ||k||), and
  ``full`` (no eviction) as the ceiling. Budgets are fractions of ``S``.
* ``zipcache`` (K5) evicts nothing: every token is kept, quantized (:mod:`attnzoo.cache.quantized`),
  the budget fraction of them (the most salient by ZipCache's normalized attention) in 4 bits and
  the rest in 2; its memory is the packed codes plus scales, so at budget 10% it holds about as
  many bytes as an eviction policy keeping ~10% of the tokens in float32.
* Budgets per layer and head (K6): ``pyramidkv`` (SnapKV's selection with PyramidKV's per-layer
  budgets, more in the lower layer, the same mean), ``longgen`` (LongGen's layout: the middle
  layer(s) keep the full cache, the others sinks + recent at the budget: more memory, plotted as
  such), ``moa`` (per-head recent spans allocated under ``H x budget`` keys per layer from the
  attention mass each span captured on separate calibration prompts, MoA's search with a cheaper
  objective; the kept sets are ragged, so evicted keys are masked and only kept ones counted).
* Measures: accuracy (answers whose argmax is the value), the KV memory kept (bytes, all
  layers, float32), and the time per generated token (median of the decode steps).

Results are stored under kind ``"cache"``; :func:`plot_cache` draws accuracy against KV memory.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..cache import policies
from ..cache.quantized import mixed_precision_kv, normalized_attention_saliency
from ..errors import ParameterError
from .machine import machine_info
from .mqar import IGNORE_INDEX, MQARModel
from .results import case_key, config_json, Result, ResultStore

__all__ = [
    "CacheConfig",
    "CacheRow",
    "CachedDecoder",
    "POLICIES",
    "needle_recall",
    "train_recall_model",
    "evaluate_policy",
    "run_cache",
    "plot_cache",
]

SEP = 1  # the separator token; 0 is unused, keys start at 2


def needle_recall(
    vocab_size: int, num_pairs: int, num_questions: int, num_examples: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Needle-recall examples ``(inputs, labels)``, each ``(num_examples, 2P + 2m + 2)`` int64.

    ``inputs = k1 v1 ... kP vP SEP q1 ... qm SEP q1 ... qm``; ``labels`` hold each question key's
    value at the positions of its second copy and -100 elsewhere. The prompt is everything up to
    and including the second ``SEP`` (:func:`prompt_length`).
    """
    if num_questions > num_pairs:
        raise ParameterError(f"num_questions: at most num_pairs ({num_pairs}), got {num_questions}", argument="num_questions")
    half = vocab_size // 2
    if half - 2 < num_pairs:
        raise ParameterError(f"vocab_size: need V/2 - 2 >= num_pairs distinct keys, got V={vocab_size}", argument="vocab_size")
    gen = torch.Generator().manual_seed(seed)
    keys = torch.stack([torch.randperm(half - 2, generator=gen)[:num_pairs] + 2 for _ in range(num_examples)])
    values = torch.randint(half, vocab_size, (num_examples, num_pairs), generator=gen)
    asked = torch.stack([torch.randperm(num_pairs, generator=gen)[:num_questions] for _ in range(num_examples)])
    q_keys, q_values = keys.gather(1, asked), values.gather(1, asked)
    sep = torch.full((num_examples, 1), SEP, dtype=torch.int64)
    pairs = torch.stack([keys, values], dim=2).reshape(num_examples, 2 * num_pairs)
    inputs = torch.cat([pairs, sep, q_keys, sep, q_keys], dim=1)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels[:, -num_questions:] = q_values
    return inputs, labels


def prompt_length(num_pairs: int, num_questions: int) -> int:
    """S: the tokens prefilled before the answers are decoded (pairs, separators, the question)."""
    return 2 * num_pairs + num_questions + 2


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
POLICIES = ("full", "streaming_llm", "h2o", "snapkv", "tova", "key_norm", "zipcache", "pyramidkv", "longgen", "moa")

@dataclass(frozen=True)
class CacheConfig:
    vocab_size: int = 256
    num_pairs: int = 32
    num_questions: int = 8
    d_model: int = 64
    num_heads: int = 2
    num_layers: int = 2
    train_steps: int = 1200
    batch_size: int = 64
    lr: float = 3e-3
    test_examples: int = 256
    budgets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    policies: tuple[str, ...] = POLICIES
    seed: int = 0

    @property
    def prompt_length(self) -> int:
        return prompt_length(self.num_pairs, self.num_questions)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class Trained:
    model: MQARModel
    accuracy: float  # full-cache accuracy on the test set (the ceiling every policy is measured against)
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def train_recall_model(config: CacheConfig, log: Optional[Callable[[int, float], None]] = None) -> Trained:
    """Train :class:`MQARModel` (softmax, short convolutions) on fresh :func:`needle_recall` batches.

    AdamW, cosine decay to 0 over ``train_steps``, cross-entropy on the answer positions only.
    Each batch draws its number of pairs uniformly from ``[num_questions, num_pairs]``: the short
    prompts are learned first and carry the longer ones (a fixed 32 pairs did not leave chance
    level in 1200 steps on the CPU; the mixture did).
    """
    torch.manual_seed(config.seed)
    model = MQARModel(config.vocab_size, config.d_model, "softmax", num_heads=config.num_heads, num_layers=config.num_layers, conv_kernel=3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    total = config.train_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1))))
    start, losses = time.perf_counter(), []
    model.train()
    sizes = torch.randint(config.num_questions, config.num_pairs + 1, (total,), generator=torch.Generator().manual_seed(config.seed))
    for step in range(total):
        inputs, labels = needle_recall(config.vocab_size, int(sizes[step]), config.num_questions, config.batch_size, seed=config.seed * 1_000_003 + step + 1)
        logits, targets = model.answer_logits(inputs, labels)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % 100 == 0 or step == total - 1):
            log(step, losses[-1])
    model.eval()
    inputs, labels = test_set(config)
    with torch.no_grad():
        logits, targets = model.answer_logits(inputs, labels)
    accuracy = float((logits.argmax(-1) == targets).float().mean())
    return Trained(model, accuracy, total, time.perf_counter() - start, losses)


def test_set(config: CacheConfig) -> tuple[Tensor, Tensor]:
    return needle_recall(config.vocab_size, config.num_pairs, config.num_questions, config.test_examples, seed=config.seed * 1_000_003)


# --------------------------------------------------------------------------------------------
# decoding from a compressed cache
# --------------------------------------------------------------------------------------------
@dataclass
class _LayerCache:
    keys: Tensor  # (B, H, S, D)
    values: Tensor
    conv_inputs: Tensor  # (B, K-1, C): the short convolution's last normed inputs
    stored_bytes: Optional[int] = None  # bytes the prompt's cache is held in, when quantized
    keep: Optional[Tensor] = None  # (B, H, S) bool: per-head kept prompt keys (ragged budgets)


class CachedDecoder:
    """:class:`MQARModel` as a KV-cache decoder: ``prefill`` the prompt, ``compress`` each layer's
    cache with a policy, then ``step`` one token at a time.

    The layers' arithmetic is the model's own (its norms, short convolution taps, q/k/v/out
    projections, softmax attention with scale ``D ** -0.5``), so with no compression the step
    logits equal ``model(tokens)`` at those positions.
    """

    def __init__(self, model: MQARModel):
        for layer in model.layers:
            if layer.conv is None or layer.mixer.mechanism.name != "softmax":
                raise ParameterError("CachedDecoder: expects softmax mixers with short convolutions (bench cache's model)", argument="model")
        self.model = model
        self.caches: list[_LayerCache] = []
        self.prefill_queries: list[Tensor] = []
        self.head_spans: Optional[list[Tensor]] = None  # per layer (H,), from calibrate_head_spans

    def _heads(self, mixer, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, mixer.num_heads, mixer.head_dim).transpose(1, 2)  # noqa: E731
        return split(mixer.q_proj(x)), split(mixer.k_proj(x)), split(mixer.v_proj(x))

    def _merge(self, mixer, out: Tensor) -> Tensor:
        b, h, n, d = out.shape
        return mixer.out_proj(out.transpose(1, 2).reshape(b, n, h * d))

    @torch.no_grad()
    def prefill(self, tokens: Tensor) -> Tensor:
        """Run the prompt ``(B, S)``; keep each layer's keys, values, queries and conv inputs. Returns the logits."""
        x = self.model.embedding(tokens)
        self.caches, self.prefill_queries = [], []
        for layer in self.model.layers:
            normed = layer.conv_norm(x)
            x = x + layer.conv(normed)
            q, k, v = self._heads(layer.mixer, layer.mixer_norm(x))
            x = x + self._merge(layer.mixer, F.scaled_dot_product_attention(q, k, v, is_causal=True))
            keep = layer.conv.kernel_size - 1
            self.caches.append(_LayerCache(k, v, normed[:, normed.shape[1] - keep :]))
            self.prefill_queries.append(q)
        return self.model.logits(x)

    @torch.no_grad()
    def compress(self, policy: str, budget: int, *, num_questions: int) -> None:
        """Cut every layer's cache to ``budget`` tokens (a mean over layers and heads for the K6
        policies) with ``policy`` (see the module docstring)."""
        window = num_questions + 1
        layers = len(self.caches)
        s = self.caches[0].keys.shape[2]
        if policy == "pyramidkv":
            budgets = policies.pyramid_budgets(max(budget, window + 1), layers, s, window=window)
        elif policy == "longgen":
            full = set(policies.middle_full_layers(layers))
            budgets = [s if i in full else budget for i in range(layers)]
        else:
            budgets = [budget] * layers
        for i, (cache, q) in enumerate(zip(self.caches, self.prefill_queries)):
            if policy == "zipcache":
                mixed = mixed_precision_kv(cache.keys, cache.values, normalized_attention_saliency(q, cache.keys), high_fraction=budget / s)
                cache.keys, cache.values = mixed.dequantize()
                cache.stored_bytes = mixed.nbytes
                continue
            if policy == "moa":
                if self.head_spans is None:
                    raise ParameterError("compress: policy 'moa' needs calibrate_head_spans() first", argument="policy")
                cache.keep = policies.per_head_recent(cache.keys, self.head_spans[i])
                continue
            inner = {"pyramidkv": "snapkv", "longgen": "streaming_llm"}.get(policy, policy)
            kept = select(inner, cache.keys, q, budgets[i], window=window)
            cache.keys, cache.values = policies.gather_kept(cache.keys, kept), policies.gather_kept(cache.values, kept)

    @torch.no_grad()
    def calibrate_head_spans(self, tokens: Tensor, budget: int, *, window: int, candidates: Optional[Sequence[int]] = None) -> list[Tensor]:
        """MoA-style per-head spans for each layer (:func:`attnzoo.cache.policies.allocate_head_spans`),
        profiled on calibration prompts ``tokens``: the attention mass the last ``window`` prompt
        queries put inside each candidate span; heads share ``H * budget`` keys per layer."""
        self.prefill(tokens)
        s = tokens.shape[1]
        candidates = sorted({max(1, int(s * f)) for f in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)} if candidates is None else set(candidates))
        spans = []
        for cache, q in zip(self.caches, self.prefill_queries):
            probs = torch.cat([p for _, p in policies.attention_probs(q[:, :, -window:], cache.keys)], dim=2)  # (B, H, w, S)
            recent_mass = probs.flip(-1).cumsum(-1)  # mass inside the last j + 1 keys
            captured = torch.stack([recent_mass[..., c - 1] for c in candidates], -1).mean((0, 2))  # (H, C)
            heads = captured.shape[0]
            total = max(heads * budget, heads * candidates[0])
            spans.append(policies.allocate_head_spans(captured, candidates, total))
        self.head_spans = spans
        return spans

    @torch.no_grad()
    def step(self, token: Tensor) -> Tensor:
        """One token ``(B,)`` through every layer against its cache; returns ``(B, V)`` logits."""
        x = self.model.embedding(token[:, None])
        for layer, cache in zip(self.model.layers, self.caches):
            normed = layer.conv_norm(x)
            window = torch.cat([cache.conv_inputs, normed], dim=1)  # the K inputs the causal taps see
            conv = (window * layer.conv.weight).sum(1, keepdim=True)
            if layer.conv.bias is not None:
                conv = conv + layer.conv.bias
            cache.conv_inputs = window[:, 1:]
            x = x + conv
            q, k, v = self._heads(layer.mixer, layer.mixer_norm(x))
            cache.keys, cache.values = torch.cat([cache.keys, k], 2), torch.cat([cache.values, v], 2)
            mask = None
            if cache.keep is not None:  # per-head evictions: the prompt keys a head dropped stay masked
                cache.keep = torch.cat([cache.keep, cache.keep.new_ones(*cache.keep.shape[:2], 1)], 2)
                mask = cache.keep[:, :, None, :]
            x = x + self._merge(layer.mixer, F.scaled_dot_product_attention(q, cache.keys, cache.values, attn_mask=mask))
        return self.model.logits(x)[:, 0]

    def cache_bytes(self) -> int:
        """Bytes the prompt's keys and values are held in (right after :meth:`compress`), all layers;
        a per-head keep mask counts the kept keys only (a ragged store would hold those)."""
        total = 0
        for c in self.caches:
            if c.stored_bytes is not None:
                total += c.stored_bytes
                continue
            per_token = (c.keys.shape[-1] * c.keys.element_size() + c.values.shape[-1] * c.values.element_size())
            tokens = int(c.keep.sum()) if c.keep is not None else c.keys.shape[0] * c.keys.shape[1] * c.keys.shape[2]
            total += tokens * per_token
        return total


def select(policy: str, keys: Tensor, queries: Tensor, budget: int, *, window: int) -> Tensor:
    """Kept indices ``(B, H, budget)`` of one layer's prompt cache under ``policy``."""
    if policy == "full":
        b, h, n, _ = keys.shape
        return torch.arange(n, device=keys.device).expand(b, h, n)
    if policy == "streaming_llm":
        return policies.streaming_llm(keys, budget=budget, n_sink=min(4, budget - 1))
    if policy == "h2o":
        return policies.h2o(policies.accumulate_attention(None, queries, keys), budget=budget, recent=budget // 2)
    if policy == "snapkv":
        return policies.snapkv(keys, queries[:, :, -window:], budget=max(budget, window))
    if policy == "tova":
        return policies.tova(keys, queries[:, :, -1:], budget=budget)
    if policy == "key_norm":
        return policies.key_norm(keys, budget=budget)
    raise ParameterError(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}", argument="policy")


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@dataclass
class CacheRow:
    policy: str
    budget_fraction: float
    budget_tokens: int
    accuracy: float
    kv_bytes: int  # kept prompt cache, all layers, at the first decode step, per sequence
    ms_per_token: float
    full_accuracy: float
    note: str = ""


def evaluate_policy(model: MQARModel, config: CacheConfig, policy: str, fraction: float, inputs: Tensor, labels: Tensor) -> CacheRow:
    """Accuracy, kept KV bytes and time per generated token of ``policy`` at ``fraction`` of the prompt."""
    s = config.prompt_length
    budget = s if policy == "full" else max(1, int(round(fraction * s)))  # zipcache: tokens in high bits
    if policy == "snapkv":
        budget = max(budget, config.num_questions + 1)  # the observation window is always kept
    decoder = CachedDecoder(model)
    if policy == "moa":  # profiled offline, on prompts of the training distribution (not the test set)
        calibration, _ = needle_recall(config.vocab_size, config.num_pairs, config.num_questions, 64, seed=config.seed * 1_000_003 - 1)
        decoder.calibrate_head_spans(calibration[:, :s], budget, window=config.num_questions + 1)
    decoder.prefill(inputs[:, :s])
    decoder.compress(policy, budget, num_questions=config.num_questions)
    kv_bytes = decoder.cache_bytes() // inputs.shape[0]
    correct, times = [], []
    for t in range(s, inputs.shape[1]):
        start = time.perf_counter()
        logits = decoder.step(inputs[:, t])
        times.append((time.perf_counter() - start) * 1e3)
        correct.append(logits.argmax(-1) == labels[:, t])
    accuracy = float(torch.stack(correct).float().mean())
    return CacheRow(policy, fraction, budget, accuracy, kv_bytes, statistics.median(times), float("nan"))


def run_cache(
    config: CacheConfig,
    store: Optional[ResultStore] = None,
    *,
    trained: Optional[Trained] = None,
    log: Optional[Callable[[str], None]] = None,
) -> tuple[Trained, list[CacheRow]]:
    """Train (unless ``trained`` is given), then every policy x budget; rows stored under kind ``"cache"``."""
    for name in config.policies:
        if name not in POLICIES:
            raise ParameterError(f"policies: expected names from {', '.join(POLICIES)}, got {name!r}", argument="policies")
    if trained is None:
        trained = train_recall_model(config, None if log is None else (lambda step, loss: log(f"step {step}: loss {loss:.3f}")))
    inputs, labels = test_set(config)
    run_id = store.start_run("cache", config_json(config), machine_info("cpu")) if store is not None else None
    rows = []
    for policy in config.policies:
        for fraction in (1.0,) if policy == "full" else config.budgets:
            row = evaluate_policy(trained.model, config, policy, fraction, inputs, labels)
            row.full_accuracy = trained.accuracy
            rows.append(row)
            if store is not None and run_id is not None:
                store.add(run_id, _result(row, config, trained))
            if log is not None:
                log(f"{policy} at {fraction:g}: accuracy {row.accuracy:.3f}")
    if store is not None and run_id is not None:
        store.finish_run(run_id)
    return trained, rows


def _result(row: CacheRow, config: CacheConfig, trained: Trained) -> Result:
    identity = {"policy": row.policy, "fraction": row.budget_fraction, "config": config_json(config)}
    return Result(
        kind="cache",
        mechanism=row.policy,
        case_key=case_key("cache", identity),
        mode="decode",
        dtype="float32",
        device="cpu",
        batch=config.test_examples,
        heads=config.num_heads,
        q_len=config.num_questions,
        kv_len=config.prompt_length,
        head_dim=config.d_model // config.num_heads,
        median_ms=row.ms_per_token,
        params={"budget": row.budget_tokens},
        metrics={
            "budget_fraction": row.budget_fraction, "accuracy": row.accuracy, "kv_bytes": row.kv_bytes,
            "full_accuracy": trained.accuracy, "train_steps": trained.steps, "train_seconds": trained.seconds,
        },
        note=row.note,
    )


def plot_cache(rows: Sequence[CacheRow], path: str) -> None:
    """Accuracy against kept KV memory, one line per policy, as a PNG (the report's figure)."""
    from .report import cache_figure, save_png

    save_png(cache_figure([(r.policy, r.kv_bytes / 1024, r.accuracy) for r in rows]), path)
