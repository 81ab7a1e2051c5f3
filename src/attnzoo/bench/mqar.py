"""The recall benchmark (catalog B2): multi-query associative recall (MQAR) as Zoology defines it.

Zoology (Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language
Models", ICLR 2024; code: HazyResearch/zoology, ``zoology/data/multiquery_ar.py``, ``model.py``,
``train.py``) measures how well a sequence mixer recalls: a sequence holds
``num_kv_pairs`` key-value pairs, then the keys come back as queries and the model must emit each
key's value. Zoology plots the accuracy against the model width, Based (Arora et al., 2024;
``arxiv24_based_figure2/configs.py``) against the size of the mixer's recurrent state. This
module reproduces the task's semantics (not its code) and runs every registered mechanism that
can attend causally in the same small language model:

* :func:`multiquery_ar`: the data. Keys are drawn from ``[1, V/2)``, each at most once per
  example, values from ``[V/2, V)``; the pairs fill the first ``2 * num_kv_pairs`` tokens. Each
  key is queried once, at an even offset ``2 * g`` of the rest of the sequence, the gaps ``g``
  drawn without replacement with probability ``∝ (g + 1) ** (power_a - 1)`` (a power law: most
  queries come soon after the context, as repeated bigrams do in text). The label at a query
  position is its key's value; every other label is -100 (ignored by the loss and the
  accuracy). With ``random_non_queries`` the tokens between queries are uniform in ``[0, V)``
  (noise, as in Zoology), else 0. Zoology requires ``V > L`` and ``4 * num_kv_pairs <= L``.
* :class:`MQARModel`: embedding -> ``num_layers`` x (optional causal short convolution residual,
  then the mechanism as pre-norm residual mixer in :class:`~attnzoo.nn.mha.MultiheadAttention`)
  -> LayerNorm -> LM head tied to the embedding; no MLP (Zoology's ``state_mixer`` is
  ``Identity`` in these experiments). The short convolution stands for Zoology's BaseConv in the
  ``Hybrid`` mixer of Based's recall runs (the "Based recipe"): without it, or positions, a
  token cannot see which key came just before it.
* :func:`train_mqar`: AdamW (Zoology's optimizer, torch's default weight decay), cosine decay
  to 0 over the step budget, cross-entropy on answer positions (the LM head runs on those
  alone: the same loss as Zoology's ``ignore_index=-100``, a fraction of the cost); after each epoch the test
  accuracy (fraction of answer positions whose argmax is the value, pooled over the test
  segments) is measured and training stops once it reaches ``early_stop`` (Zoology: 0.99).
* :func:`run_mqar`: every mechanism x d_model x learning rate, one :class:`Result` (kind
  ``"mqar"``) per case in the :class:`ResultStore`; cases already stored are skipped
  (resume). Mechanisms without the ``causal_self`` pattern get one "n/a" row and are not run.

Mechanism parameters are each mechanism's ``example_params(problem, "causal_self")`` (no
per-mechanism code here), overridable by name. ``state_size`` is the elements of the decoding
state of the whole model: ``layers x heads x Mechanism.state_size(head_dim, head_dim)``, None
for mechanisms that keep a KV cache; for those, ``kv_cache_size`` = ``layers x 2 x L x d_model``
at the longest test length (an upper bound for windowed mechanisms, whose cache stops growing).
The short convolution's (kernel - 1) x d_model numbers per layer are not counted.

Presets (:data:`PRESETS`): ``zoology`` is Based's Fig. 2 grid (V = 8192; train (64, 4, 100k),
(128, 8, 20k), (256, 16/32/64, 20k each); test (64, 4/8/16), (128, 32), (256, 64), (512, 128),
(1024, 256), 1000 each; d_model 32/64/128; lr logspace(-3, -1.5, 4); batch 256; 32 epochs),
a GPU job (not run here). ``cpu`` is a reduced grid that trains in minutes per mechanism on 2 CPU cores
(its numbers are in its definition).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import AttnZooError, ParameterError
from ..nn.mha import MultiheadAttention, ShortConvolution
from ..registry import Mechanism, get, list_mechanisms
from .results import Result, ResultStore, case_key

__all__ = [
    "IGNORE_INDEX",
    "PATTERN",
    "PRESETS",
    "Segment",
    "MQARConfig",
    "MQARCase",
    "TrainOutcome",
    "multiquery_ar",
    "MQARModel",
    "train_mqar",
    "make_data",
    "build_model",
    "evaluate",
    "plan_mqar",
    "run_mqar",
    "preset",
    "best_over_lr",
]

#: The label of every position that is not an answer (torch's cross-entropy default ignore index).
IGNORE_INDEX = -100
#: The CAB pattern a recall model needs: causal self-attention.
PATTERN = "causal_self"
KIND = "mqar"


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(f"multiquery_ar: {name}: expected an int >= {minimum}, got {value!r}", argument=name)
    return value


def _check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, power_a: float) -> None:
    _check_int("num_kv_pairs", num_kv_pairs, 1)
    _check_int("seq_len", seq_len, 4)
    _check_int("vocab_size", vocab_size, 2)
    _check_int("num_examples", num_examples, 0)
    if vocab_size <= seq_len:
        raise ParameterError(f"multiquery_ar: vocab_size: must exceed seq_len={seq_len} (Zoology's V > L), got {vocab_size}", argument="vocab_size")
    if 4 * num_kv_pairs > seq_len:
        raise ParameterError(
            f"multiquery_ar: num_kv_pairs: 4 * num_kv_pairs must be <= seq_len={seq_len} (the pairs and as many query slots), got {num_kv_pairs}",
            argument="num_kv_pairs",
        )
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not (0 < power_a < math.inf):
        raise ParameterError(f"multiquery_ar: power_a: expected a finite positive number, got {power_a!r}", argument="power_a")


def _distinct_draws(low: int, high: int, count: int, rows: int, gen: torch.Generator, chunk: int = 2048) -> Tensor:
    """``rows`` x ``count`` integers from [low, high), distinct within a row, uniformly (chunks of
    rows bound the (rows, high - low) scratch: V = 8192 and 100k rows would be 3 GB at once)."""
    parts = []
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        scores = torch.rand(n, high - low, generator=gen)
        parts.append(scores.topk(count, dim=1).indices + low)  # the top-k of iid uniforms: a uniform k-subset, in random order
    return torch.cat(parts) if parts else torch.empty(0, count, dtype=torch.int64)


def _power_law_gaps(space: int, count: int, rows: int, power_a: float, gen: torch.Generator) -> Tensor:
    """Per row, ``count`` distinct gaps in [0, space), drawn one after another without replacement
    with weights ``p_g ∝ (g + 1) ** (power_a - 1)`` (Zoology's power law over query positions)."""
    weights = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    if rows == 0:
        return torch.empty(0, count, dtype=torch.int64)
    return torch.multinomial((weights / weights.sum()).expand(rows, space), count, replacement=False, generator=gen)


def multiquery_ar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    power_a: float = 0.01,
    seed: int = 0,
    random_non_queries: bool = True,
) -> tuple[Tensor, Tensor]:
    """MQAR examples as Zoology defines them: ``(inputs, labels)``, int64, each (num_examples, seq_len).

    Layout of one example (C = 2 * num_kv_pairs)::

        positions 0..C-1    k_1 v_1 k_2 v_2 ... (keys distinct, in [1, V/2); values in [V/2, V))
        positions C..L-1    noise (or 0), with key k_i again at C + 2 * g_i (the query)
        labels              v_i at the query of k_i, -100 everywhere else

    The gaps g_i are distinct, from [0, (L - C) // 2), drawn by a power law with exponent
    ``power_a - 1`` (Zoology's default ``power_a = 0.01``: strongly favours early queries).
    Deterministic in ``seed``. Raises :class:`~attnzoo.errors.ParameterError` unless V > L and
    4 * num_kv_pairs <= L.

    Example::

        >>> inputs, labels = multiquery_ar(64, 32, 4, num_examples=100, seed=0)
        >>> inputs.shape, int((labels != -100).sum(1).max())
        (torch.Size([100, 32]), 4)
    """
    _check_mqar(vocab_size, seq_len, num_kv_pairs, num_examples, power_a)
    gen = torch.Generator().manual_seed(int(seed))
    context = 2 * num_kv_pairs
    keys = _distinct_draws(1, vocab_size // 2, num_kv_pairs, num_examples, gen)
    values = _distinct_draws(vocab_size // 2, vocab_size, num_kv_pairs, num_examples, gen)
    gaps = _power_law_gaps((seq_len - context) // 2, num_kv_pairs, num_examples, float(power_a), gen)

    inputs = torch.zeros(num_examples, seq_len, dtype=torch.int64)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    if random_non_queries:
        inputs[:, context:] = torch.randint(vocab_size, (num_examples, seq_len - context), generator=gen)
    query_positions = context + 2 * gaps
    inputs.scatter_(1, query_positions, keys)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels.scatter_(1, query_positions, values)
    return inputs, labels


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class _Block(nn.Module):
    """One layer: ``x += conv(norm(x))`` (optional), then ``x += mixer(norm(x))``; no MLP."""

    def __init__(self, d_model: int, mixer: MultiheadAttention, conv_kernel: Optional[int]):
        super().__init__()
        self.conv_norm = nn.LayerNorm(d_model) if conv_kernel else None
        self.conv = ShortConvolution(d_model, conv_kernel) if conv_kernel else None
        self.mixer_norm = nn.LayerNorm(d_model)
        self.mixer = mixer

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None and self.conv_norm is not None:
            x = x + self.conv(self.conv_norm(x))
        return x + self.mixer(self.mixer_norm(x))[0]  # (output, weights=None), torch's convention


class MQARModel(nn.Module):
    """Zoology's recall language model with a registered mechanism as its sequence mixer.

    ``embedding -> num_layers x [short conv residual] + [pre-norm mechanism residual] ->
    LayerNorm -> LM head`` (tied to the embedding, as Zoology ties them), no MLP. Weights start
    as Zoology's: normal(0, 0.02), output projections scaled by ``1 / sqrt(2 num_layers)``.
    ``conv_kernel=None`` drops the short convolutions; ``max_len`` adds learned absolute
    positions (Zoology's ``max_position_embeddings``; its Based runs use none). The mixer's
    parameters are the mechanism's example parameters for ``causal_self``, overridden by
    ``mechanism_params``.

    Example::

        >>> model = MQARModel(vocab_size=64, d_model=32, mechanism="linear")
        >>> logits = model(torch.randint(64, (8, 32)))     # (8, 32, 64)
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        mechanism: str = "softmax",
        *,
        num_heads: int = 1,
        num_layers: int = 2,
        conv_kernel: Optional[int] = 3,
        max_len: Optional[int] = None,
        mechanism_params: Optional[Mapping[str, Any]] = None,
        backend: Optional[str] = None,
    ):
        super().__init__()
        self.vocab_size, self.d_model = vocab_size, d_model
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(max_len, d_model) if max_len else None
        params = dict(mechanism_params or {})
        self.layers = nn.ModuleList(
            _Block(d_model, MultiheadAttention(d_model, num_heads, batch_first=True, mechanism=mechanism, causal=True, backend=backend, example_params=True, **params), conv_kernel)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._zoology_init)
        self.head.weight = self.embedding.weight  # tied, after init (Zoology ties after its init too)

    def _zoology_init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, MultiheadAttention):  # GPT-2's scaled init of residual outputs
            nn.init.normal_(module.out_proj.weight, std=0.02 / math.sqrt(2 * len(self.layers)))

    def hidden(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, d_model) states before the final norm and the head."""
        x = self.embedding(tokens)
        if self.positions is not None:
            x = x + self.positions(torch.arange(tokens.shape[1], device=tokens.device))
        for layer in self.layers:
            x = layer(x)
        return x

    def logits(self, hidden: Tensor) -> Tensor:
        """(..., d_model) states -> (..., V) logits (norm and head act per token)."""
        return self.head(self.norm(hidden))

    def forward(self, tokens: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, V) next-token logits."""
        return self.logits(self.hidden(tokens))

    def answer_logits(self, tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and labels at the answer positions only, ``(A, V)`` and ``(A,)``.

        The loss and the accuracy ignore every other position, so the head (V x d_model per
        token, the largest matmul of the model) runs on the ~L/16 answers alone: the same loss
        and gradients as the full head with ``ignore_index``, at a fraction of the cost."""
        answers = labels != IGNORE_INDEX
        return self.logits(self.hidden(tokens)[answers]), labels[answers]

    def state_size(self) -> Optional[int]:
        """Elements of the mixers' decoding state per sequence, all layers (None: KV caches).
        Uses the parameters of the last forward; run one first."""
        sizes = [layer.mixer.state_size() for layer in self.layers]
        return None if any(s is None for s in sizes) else int(sum(sizes))  # type: ignore[arg-type]

    def mechanism_params(self) -> dict[str, Any]:
        """The parameters the first mixer ran with (example ones filled in), for the record."""
        return self.layers[0].mixer.used_params()


# --------------------------------------------------------------------------------------------
# configuration and presets
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One MQAR setting: ``num_examples`` sequences of ``seq_len`` tokens with ``num_kv_pairs`` pairs."""

    seq_len: int
    num_kv_pairs: int
    num_examples: int

    @property
    def name(self) -> str:
        return f"L{self.seq_len}-kv{self.num_kv_pairs}"


@dataclass(frozen=True)
class MQARConfig:
    """What the recall benchmark trains and tests; every field is part of a case's identity
    (except ``mechanisms``, ``d_models``, ``learning_rates``, which enumerate the cases)."""

    vocab_size: int = 8192
    train: tuple[Segment, ...] = (Segment(64, 4, 100_000),)
    test: tuple[Segment, ...] = (Segment(64, 4, 1_000),)
    d_models: tuple[int, ...] = (64,)
    learning_rates: tuple[float, ...] = (1e-3,)
    mechanisms: Optional[tuple[str, ...]] = None  # None: every registered mechanism
    num_heads: int = 1  # Zoology's MQAR attention runs use one head
    num_layers: int = 2
    conv_kernel: Optional[int] = 3  # Zoology's BaseConv kernel in the Based runs; None: no short conv
    positional: bool = False  # learned absolute positions (Zoology's Based runs: none)
    power_a: float = 0.01
    random_non_queries: bool = True
    epochs: int = 32
    max_steps: Optional[int] = None  # a cap on optimizer steps across epochs (None: epochs decide)
    batch_size: int = 256
    test_batch_size: int = 32
    weight_decay: float = 0.01  # torch's AdamW default, which Zoology uses
    early_stop: float = 0.99
    seed: int = 0
    device: str = "cpu"
    # mechanism parameter overrides, applied to the mechanisms that have a parameter of that name
    overrides: tuple[tuple[str, Any], ...] = ()

    def max_len(self) -> int:
        return max(s.seq_len for s in self.train + self.test)

    def identity(self) -> dict[str, Any]:
        """The fields that make two runs of one (mechanism, d_model, lr) the same case."""
        out = asdict(self)
        for name in ("mechanisms", "d_models", "learning_rates", "overrides"):
            out.pop(name)
        return out


def _segments(rows: Sequence[tuple[int, int, int]]) -> tuple[Segment, ...]:
    return tuple(Segment(*r) for r in rows)


#: Based's Fig. 2 MQAR grid (HazyResearch/zoology ``arxiv24_based_figure2/configs.py``): a GPU job.
ZOOLOGY = MQARConfig(
    vocab_size=8192,
    train=_segments([(64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000)]),
    test=_segments([(64, 4, 1_000), (64, 8, 1_000), (64, 16, 1_000), (128, 32, 1_000), (256, 64, 1_000), (512, 128, 1_000), (1024, 256, 1_000)]),
    d_models=(32, 64, 128),
    learning_rates=tuple(float(x) for x in torch.logspace(-3, -1.5, 4).tolist()),
    epochs=32,
    batch_size=256,
    test_batch_size=32,
)

#: A reduced grid for 2 CPU cores: vocabulary 512 (> L = 256), lengths 64..256 with Zoology's
#: ratio of pairs to length (L / 16), 64k tokens per segment and epoch (1000 / 500 / 250
#: sequences), 12 epochs of batch 32 (672 steps), d_model 32/64, two learning rates. With 8
#: epochs (measured on the shared 2-core CPU, 1 thread) softmax reached 0.976 at d_model 32 but
#: only 0.81 (lr 3e-3) and 0.04 (lr 1e-2) at d_model 64: MQAR is learned in a sudden transition
#: that a short budget can miss, hence 12.
CPU = MQARConfig(
    vocab_size=512,
    train=_segments([(64, 4, 1_000), (128, 8, 500), (256, 16, 250)]),
    test=_segments([(64, 4, 100), (128, 8, 50), (256, 16, 50)]),
    d_models=(32, 64),
    learning_rates=(3e-3, 1e-2),
    epochs=12,
    batch_size=32,
    test_batch_size=50,
)

#: B4 length extrapolation: train at L = 64 only, test at 64 ... 1024 (16 L) with Zoology's ratio
#: of pairs to length (L / 16); V = 2048 > 1024. The mechanisms of the catalog's B4 entry, each
#: with parameters fixed across lengths (a window that grew with N would not be extrapolating):
#: softmax, sliding_window with 4 sinks and a 32-token window, linear, retention, and the
#: score-level variants (sigmoid with its -log n bias, relu with 1/n, softcap, and the two
#: length-aware ones told the training length: softplus (V1) and length_temperature (V4)).
EXTRAPOLATION = MQARConfig(
    vocab_size=2048,
    train=_segments([(64, 4, 4_000)]),
    test=_segments([(64, 4, 100), (128, 8, 50), (256, 16, 50), (512, 32, 25), (1024, 64, 25)]),
    d_models=(64,),
    learning_rates=(3e-3,),
    mechanisms=("softmax", "sliding_window", "linear", "retention", "sigmoid", "relu", "softcap", "softplus", "length_temperature"),
    epochs=8,
    batch_size=32,
    test_batch_size=25,
    early_stop=1.01,  # never: the long segments are not trained on, so pooled accuracy must not stop training
    overrides=(("window", (32, 0)), ("sinks", 4), ("train_length", 64)),
)

PRESETS: dict[str, MQARConfig] = {"cpu": CPU, "zoology": ZOOLOGY, "extrapolation": EXTRAPOLATION}


def preset(name: str, **changes: Any) -> MQARConfig:
    """A preset's config (``"cpu"`` or ``"zoology"``) with fields replaced by ``changes``."""
    if name not in PRESETS:
        raise ParameterError(f"mqar: preset: expected one of {', '.join(PRESETS)}, got {name!r}", argument="preset")
    return replace(PRESETS[name], **changes)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
@dataclass
class TrainOutcome:
    """What one training run measured."""

    accuracy: float
    by_segment: dict[str, float]
    steps: int
    epochs: int
    train_seconds: float
    final_loss: float
    stopped_early: bool
    state_size: Optional[int]
    num_parameters: int
    mechanism_params: dict[str, Any] = field(default_factory=dict)


Data = list[tuple[Segment, Tensor, Tensor]]


def make_data(config: MQARConfig) -> tuple[Data, Data]:
    """Train and test examples of every segment; distinct seeds per segment and split."""

    def build(segments: tuple[Segment, ...], offset: int) -> Data:
        return [
            (s, *multiquery_ar(config.vocab_size, s.seq_len, s.num_kv_pairs, s.num_examples, config.power_a, config.seed * 1000 + offset + i, config.random_non_queries))
            for i, s in enumerate(segments)
        ]

    return build(config.train, 0), build(config.test, 500)


def _batches(data: Data, batch_size: int, gen: Optional[torch.Generator]) -> list[tuple[Tensor, Tensor]]:
    """Batches within each segment (one length per batch), in shuffled order when ``gen`` is given."""
    out = []
    for _, inputs, labels in data:
        order = torch.randperm(len(inputs), generator=gen) if gen is not None else torch.arange(len(inputs))
        out += [(inputs[idx], labels[idx]) for idx in order.split(batch_size)]
    if gen is not None:
        out = [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]
    return out


@torch.no_grad()
def evaluate(model: MQARModel, data: Data, batch_size: int, device: str = "cpu") -> tuple[float, dict[str, float]]:
    """Fraction of answer positions whose argmax is the value: pooled, and per segment."""
    model.eval()
    right_total, count_total, by_segment = 0, 0, {}
    for segment, inputs, labels in data:
        right, count = 0, 0
        for x, y in zip(inputs.split(batch_size), labels.split(batch_size)):
            x, y = x.to(device), y.to(device)
            logits, answers = model.answer_logits(x, y)
            right += int((logits.argmax(-1) == answers).sum())
            count += answers.numel()
        by_segment[segment.name] = right / max(count, 1)
        right_total, count_total = right_total + right, count_total + count
    model.train()
    return right_total / max(count_total, 1), by_segment


def _total_steps(config: MQARConfig, train: Data) -> int:
    per_epoch = sum(math.ceil(len(inputs) / config.batch_size) for _, inputs, _ in train)
    total = per_epoch * config.epochs
    return min(total, config.max_steps) if config.max_steps is not None else total


def _mechanism_overrides(mech: Mechanism, config: MQARConfig) -> dict[str, Any]:
    names = {p.name for p in mech.params}
    return {name: value for name, value in config.overrides if name in names}


def build_model(mechanism: str, d_model: int, config: MQARConfig) -> MQARModel:
    """The recall model of one case, seeded by ``config.seed`` (the caller's RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MQARModel(
            config.vocab_size,
            d_model,
            mechanism,
            num_heads=config.num_heads,
            num_layers=config.num_layers,
            conv_kernel=config.conv_kernel,
            max_len=config.max_len() if config.positional else None,
            mechanism_params=_mechanism_overrides(get(mechanism), config),
        )
    return model.to(config.device)


def train_mqar(
    mechanism: str,
    d_model: int,
    lr: float,
    config: MQARConfig,
    data: Optional[tuple[Data, Data]] = None,
    on_epoch: Optional[Callable[[int, int, float], None]] = None,
) -> TrainOutcome:
    """Train one model on the config's train segments; test after each epoch; stop at ``early_stop``.

    AdamW at ``lr`` with ``weight_decay``, cosine decay to 0 over the step budget (Zoology decays
    per epoch; per step is the same curve, smoother), cross-entropy over answer positions only
    (the mean over answers, as Zoology's ``ignore_index=-100`` loss; the head runs on answers only).
    ``train_seconds`` is the wall time of the optimizer steps and the evaluations.
    ``on_epoch(epoch, steps, accuracy)`` is called after each evaluation.
    """
    train, test = data if data is not None else make_data(config)
    model = build_model(mechanism, d_model, config)
    total = _total_steps(config, train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1))))
    gen = torch.Generator().manual_seed(config.seed)
    steps, epochs, loss_value, accuracy, by_segment = 0, 0, float("nan"), 0.0, {}
    start = time.perf_counter()
    while steps < total:
        for x, y in _batches(train, config.batch_size, gen):
            loss = F.cross_entropy(*model.answer_logits(x.to(config.device), y.to(config.device)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            steps, loss_value = steps + 1, float(loss.detach())
            if steps >= total:
                break
        epochs += 1
        accuracy, by_segment = evaluate(model, test, config.test_batch_size, config.device)
        if on_epoch is not None:
            on_epoch(epochs, steps, accuracy)
        if accuracy >= config.early_stop:
            break
    seconds = time.perf_counter() - start
    return TrainOutcome(
        accuracy=accuracy,
        by_segment=by_segment,
        steps=steps,
        epochs=epochs,
        train_seconds=seconds,
        final_loss=loss_value,
        stopped_early=accuracy >= config.early_stop,
        state_size=model.state_size(),
        num_parameters=sum(p.numel() for p in model.parameters()),
        mechanism_params=model.mechanism_params(),
    )


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MQARCase:
    """One mechanism x d_model x learning rate; ``skip`` says why it will not run ("n/a: ...")."""

    mechanism: str
    d_model: Optional[int]
    lr: Optional[float]
    key: str
    skip: Optional[str] = None

    @property
    def description(self) -> str:
        if self.skip is not None:
            return f"{self.mechanism}: {self.skip}"
        return f"{self.mechanism} d_model={self.d_model} lr={self.lr:.2e}"


def _selected(config: MQARConfig) -> list[Mechanism]:
    return list_mechanisms() if config.mechanisms is None else [get(name) for name in config.mechanisms]


def _case_identity(mech: Mechanism, d_model: Optional[int], lr: Optional[float], config: MQARConfig) -> dict[str, Any]:
    return {"mechanism": mech.name, "d_model": d_model, "lr": lr, "overrides": _mechanism_overrides(mech, config), **config.identity()}


def plan_mqar(config: MQARConfig) -> list[MQARCase]:
    """Every case, in mechanism order, then d_model, then learning rate; one "n/a" case for each
    mechanism without the causal_self pattern."""
    cases = []
    for mech in _selected(config):
        if PATTERN not in mech.patterns:
            key = case_key(KIND, _case_identity(mech, None, None, config))
            cases.append(MQARCase(mech.name, None, None, key, f"n/a: no {PATTERN} pattern"))
            continue
        for d_model in config.d_models:
            for lr in config.learning_rates:
                cases.append(MQARCase(mech.name, d_model, float(lr), case_key(KIND, _case_identity(mech, d_model, float(lr), config))))
    return cases


def _state_fields(outcome: TrainOutcome, d_model: int, config: MQARConfig) -> dict[str, Any]:
    if outcome.state_size is not None:
        return {"state_size": outcome.state_size, "state_kind": "recurrent", "kv_cache_size": None}
    cache = config.num_layers * 2 * max(s.seq_len for s in config.test) * d_model
    return {"state_size": None, "state_kind": "kv_cache", "kv_cache_size": cache}


def _result(case: MQARCase, config: MQARConfig) -> Result:
    """Train one case (or record why it did not run) as a Result of kind "mqar"."""
    base = dict(kind=KIND, mechanism=case.mechanism, case_key=case.key, pattern=PATTERN, mode="train", dtype="float32", device=config.device)
    if case.skip is not None:
        return Result(**base, note=case.skip)
    assert case.d_model is not None and case.lr is not None
    shape = dict(batch=config.batch_size, heads=config.num_heads, q_len=max(s.seq_len for s in config.test), head_dim=case.d_model // config.num_heads)
    metrics: dict[str, Any] = {"d_model": case.d_model, "lr": case.lr, "vocab_size": config.vocab_size}
    try:
        outcome = train_mqar(case.mechanism, case.d_model, case.lr, config, _data_for(config))
    except (AttnZooError, RuntimeError, ValueError) as err:  # one failing mechanism must not end the run
        first = str(err).splitlines()[0] if str(err) else ""
        return Result(**base, **shape, metrics={**metrics, "accuracy": None}, note=f"error: {type(err).__name__}: {first}")
    metrics.update(
        accuracy=outcome.accuracy,
        by_segment=outcome.by_segment,
        steps=outcome.steps,
        epochs=outcome.epochs,
        train_seconds=outcome.train_seconds,
        final_loss=outcome.final_loss,
        stopped_early=outcome.stopped_early,
        num_parameters=outcome.num_parameters,
        **_state_fields(outcome, case.d_model, config),
    )
    return Result(**base, **shape, params=outcome.mechanism_params, metrics=metrics, note="early stop" if outcome.stopped_early else "")


_DATA_CACHE: dict[str, tuple[Data, Data]] = {}


def _data_for(config: MQARConfig) -> tuple[Data, Data]:
    """The config's data, generated once per process (every case of a run trains on the same examples)."""
    key = case_key("mqar-data", {k: v for k, v in config.identity().items() if k in ("vocab_size", "train", "test", "power_a", "random_non_queries", "seed")})
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()  # hold one data set at a time: the zoology preset's is ~200 MB
        _DATA_CACHE[key] = make_data(config)
    return _DATA_CACHE[key]


def run_mqar(
    config: MQARConfig,
    store: ResultStore,
    *,
    machine: Optional[Mapping[str, Any]] = None,
    resume: bool = True,
    on_case: Optional[Callable[[int, int, str], None]] = None,
) -> list[Result]:
    """Run every case of :func:`plan_mqar` and store each as it finishes; returns the new Results.

    With ``resume`` a case whose key is already in ``store`` is skipped (not returned).
    ``on_case(done, total, description)`` is called after each case (the CLI's progress bar).
    """
    cases = plan_mqar(config)
    run_id = store.start_run(KIND, {**config.identity(), "mechanisms": [c.mechanism for c in cases], "d_models": config.d_models, "learning_rates": config.learning_rates, "overrides": dict(config.overrides)}, machine or {})
    results = []
    for done, case in enumerate(cases, 1):
        if not (resume and store.done(case.key)):
            result = _result(case, config)
            store.add(run_id, result)
            results.append(result)
        if on_case is not None:
            on_case(done, len(cases), case.description)
    store.finish_run(run_id)
    return results


def best_over_lr(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Stored "mqar" rows reduced as Zoology plots them: per (mechanism, d_model) the best test
    accuracy over the learning rates, with that run's lr, state_size and kv_cache_size.

    ``rows`` are :meth:`ResultStore.results` dicts; rows without an accuracy ("n/a", errors) are
    left out. Sorted by mechanism, then d_model. The report plots ``accuracy`` against
    ``d_model`` and against ``state_size`` (or ``kv_cache_size`` for KV-cache mechanisms).
    """
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        m = row.get("metrics") or {}
        if m.get("accuracy") is None:
            continue
        key = (row["mechanism"], int(m["d_model"]))
        if key not in best or m["accuracy"] > best[key]["accuracy"]:
            best[key] = {"mechanism": row["mechanism"], "d_model": int(m["d_model"]), "accuracy": m["accuracy"], "lr": m.get("lr"),
                         "state_size": m.get("state_size"), "kv_cache_size": m.get("kv_cache_size"), "steps": m.get("steps"),
                         "by_segment": m.get("by_segment") or {}}
    return [best[k] for k in sorted(best)]
