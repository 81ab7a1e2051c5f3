"""Mixed-precision KV caches (catalog K5): salient tokens in more bits, the rest in fewer.

ZipCache (He et al., "ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token
Identification", NeurIPS 2024, arXiv 2405.14256) and ZipVL keep every token but spend the bits
unevenly:

* **saliency** (ZipCache Sec. 4.2, the *normalized* attention score): key ``j``'s attention summed
  over the queries that may see it, divided by their number,
  ``p_j = sum_{i >= j} A_ij / (S - j)`` (causal, bottom-right). The plain accumulated score
  (H2O's) favours early tokens only because more queries see them; the division removes that bias.
* **mixed precision**: per kv head, the ``high_fraction`` most salient tokens are quantized with
  ``high_bits``, the others with ``low_bits`` (ZipCache: 4 and 2).
* **quantization** (ZipCache Sec. 4.1, after KIVI, Liu et al. 2024): asymmetric uniform
  quantization, keys **per channel** (one scale and zero point per channel, over the tokens of
  each precision group: keys have outlier channels), values **per token**.

Quantization runs through torch's own decomposed quantization ops
(``torch.ops.quantized_decomposed.quantize_per_token`` / ``dequantize_per_token``, the ops
torch.ao's PT2E flow lowers to) with qparams computed here for the bit width; the integer codes
are packed ``8 // bits`` per byte (:func:`pack_bits`), so :attr:`MixedPrecisionKV.nbytes` is the
memory actually held (codes + float32 scales and zero points). Dequantize once per use: this is a
memory model, not a fused low-bit attention kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
from torch import Tensor

from ..errors import ParameterError, ShapeError
from .policies import accumulate_attention, gather_kept

__all__ = [
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "pack_bits",
    "unpack_bits",
    "normalized_attention_saliency",
    "MixedPrecisionKV",
    "mixed_precision_kv",
]

_BITS = (1, 2, 4, 8)


def _check_bits(name: str, bits: int) -> int:
    if isinstance(bits, bool) or bits not in _BITS:
        raise ParameterError(f"{name}: expected one of {_BITS} bits, got {bits!r}", argument=name)
    return bits


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes ``< 2**bits`` along the last dim, packed ``8 // bits`` per byte (the last dim
    padded with zeros to a multiple of that)."""
    per = 8 // _check_bits("bits", bits)
    if per == 1:
        return codes.to(torch.uint8)
    pad = (-codes.shape[-1]) % per
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, pad)).view(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.uint8, device=codes.device) * bits
    return (c << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, length: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``length`` codes of the last dim."""
    per = 8 // _check_bits("bits", bits)
    if per == 1:
        return packed[..., :length]
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :length]


@dataclass
class QuantizedTensor:
    """Asymmetric uniform codes of a tensor, reduced along one axis group (see :func:`quantize`)."""

    packed: Tensor  # uint8, codes packed along the last dim
    scale: Tensor  # float32, broadcastable to the original shape
    zero_point: Tensor  # float32, same shape as scale
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    per: str  # "token" (scales per row of the last dim) or "channel" (per column, over the rows)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 4 * (self.scale.numel() + self.zero_point.numel())


def quantize(x: Tensor, bits: int, *, per: str = "token") -> QuantizedTensor:
    """Quantize ``x`` (..., S, D) to ``bits`` unsigned codes, asymmetric.

    ``per="token"``: one scale and zero point per row (over the D channels); ``per="channel"``: one
    per channel (over the S rows). ``scale = (max - min) / (2**bits - 1)``, ``zero = round(-min / scale)``.
    """
    _check_bits("bits", bits)
    if per not in ("token", "channel"):
        raise ParameterError(f"per: expected 'token' or 'channel', got {per!r}", argument="per")
    if x.ndim < 2:
        raise ShapeError(f"x: expected (..., S, D), got shape {tuple(x.shape)}", argument="x")
    qmax = (1 << bits) - 1
    rows = x.float() if per == "token" else x.float().transpose(-1, -2)  # the reduced axis last
    lo, hi = rows.amin(-1, keepdim=True), rows.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).tiny ** 0.5)
    zero = (-lo / scale).round()
    codes = torch.ops.quantized_decomposed.quantize_per_token(rows, scale, zero, 0, qmax, torch.uint8)
    return QuantizedTensor(pack_bits(codes, bits), scale, zero, bits, tuple(x.shape), x.dtype, per)


def dequantize(q: QuantizedTensor) -> Tensor:
    """The float tensor the codes stand for, in the original shape and dtype."""
    length = q.shape[-1] if q.per == "token" else q.shape[-2]
    codes = unpack_bits(q.packed, q.bits, length)
    rows = torch.ops.quantized_decomposed.dequantize_per_token(codes, q.scale, q.zero_point, 0, (1 << q.bits) - 1, torch.uint8, torch.float32)
    return (rows if q.per == "token" else rows.transpose(-1, -2)).to(q.dtype)


def normalized_attention_saliency(queries: Tensor, keys: Tensor, *, scale: Optional[float] = None) -> Tensor:
    """ZipCache's saliency ``(B, Hkv, S)``: accumulated causal attention over the queries that may
    see each key, divided by their count (queries aligned bottom-right, as a prompt's own)."""
    total = accumulate_attention(None, queries, keys, scale=scale)
    s, n_q = keys.shape[2], queries.shape[2]
    j = torch.arange(s, device=keys.device)
    seen_by = (n_q - (j - (s - n_q)).clamp_min(0)).clamp_min(1)  # queries i with key j visible
    group = queries.shape[1] // keys.shape[1]
    return total / (seen_by * group).to(total.dtype)


@dataclass
class MixedPrecisionKV:
    """A prompt's keys and values, salient tokens at ``high_bits``, the rest at ``low_bits``."""

    salient: Tensor  # (B, Hkv, n_high) token indices, ascending
    other: Tensor  # (B, Hkv, S - n_high)
    keys_high: QuantizedTensor
    values_high: QuantizedTensor
    keys_low: Optional[QuantizedTensor]
    values_low: Optional[QuantizedTensor]
    length: int

    @property
    def nbytes(self) -> int:
        parts = (self.keys_high, self.values_high, self.keys_low, self.values_low)
        return sum(p.nbytes for p in parts if p is not None)

    def dequantize(self) -> tuple[Tensor, Tensor]:
        """Keys and values ``(B, Hkv, S, D)`` back in token order."""
        k_high, v_high = dequantize(self.keys_high), dequantize(self.values_high)
        b, h, _, d = k_high.shape
        keys = k_high.new_empty(b, h, self.length, d)
        values = v_high.new_empty(b, h, self.length, v_high.shape[-1])
        keys.scatter_(2, self.salient[..., None].expand(-1, -1, -1, d), k_high)
        values.scatter_(2, self.salient[..., None].expand(-1, -1, -1, values.shape[-1]), v_high)
        if self.keys_low is not None and self.values_low is not None:
            keys.scatter_(2, self.other[..., None].expand(-1, -1, -1, d), dequantize(self.keys_low))
            values.scatter_(2, self.other[..., None].expand(-1, -1, -1, values.shape[-1]), dequantize(self.values_low))
        return keys, values


def mixed_precision_kv(
    keys: Tensor, values: Tensor, saliency: Tensor, *, high_fraction: float, high_bits: int = 4, low_bits: int = 2
) -> MixedPrecisionKV:
    """Quantize a prompt's cache with ZipCache's split: per kv head the ``ceil(high_fraction * S)``
    most salient tokens at ``high_bits``, the others at ``low_bits``; keys per channel within each
    group, values per token. ``saliency`` ``(B, Hkv, S)``, e.g. :func:`normalized_attention_saliency`."""
    if keys.ndim != 4 or values.shape[:3] != keys.shape[:3]:
        raise ShapeError(f"keys, values: expected (B, Hkv, S, D) with the same (B, Hkv, S), got {tuple(keys.shape)} and {tuple(values.shape)}", argument="values")
    if saliency.shape != keys.shape[:3]:
        raise ShapeError(f"saliency: expected {tuple(keys.shape[:3])} (B, Hkv, S), got {tuple(saliency.shape)}", argument="saliency")
    if not isinstance(high_fraction, (int, float)) or isinstance(high_fraction, bool) or not 0.0 < high_fraction <= 1.0:
        raise ParameterError(f"high_fraction: expected a float in (0, 1], got {high_fraction!r}", argument="high_fraction")
    _check_bits("high_bits", high_bits)
    _check_bits("low_bits", low_bits)
    s = keys.shape[2]
    n_high = min(s, max(1, int(-(-high_fraction * s // 1))))
    order = saliency.argsort(dim=-1, descending=True, stable=True)
    salient, other = order[..., :n_high].sort(-1).values, order[..., n_high:].sort(-1).values
    low = n_high < s
    return MixedPrecisionKV(
        salient=salient,
        other=other,
        keys_high=quantize(gather_kept(keys, salient), high_bits, per="channel"),
        values_high=quantize(gather_kept(values, salient), high_bits, per="token"),
        keys_low=quantize(gather_kept(keys, other), low_bits, per="channel") if low else None,
        values_low=quantize(gather_kept(values, other), low_bits, per="token") if low else None,
        length=s,
    )
