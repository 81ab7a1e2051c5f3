"""transformers integration: any attnzoo mechanism as a transformers ``attn_implementation``.

::

    from attnzoo.integrations.transformers import register

    key = register("softmax")                      # "attnzoo:softmax"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=key)
    model.set_attn_implementation(register("linear", feature_map="elu"))

:func:`register` puts two functions under one key: the attention function (transformers'
``AttentionInterface``) and the mask function (``AttentionMaskInterface``). The second is not
optional: for a key with no mask function transformers builds no mask at all and the attention
function receives ``attention_mask=None``, so causality and padding would be silently lost.

What the mask function returns (built once per forward and layer type, read by every layer):

- ``None``: no padding, and the pattern is the one the attention call states (``is_causal``,
  else ``module.is_causal``; ``sliding_window``), queries aligned bottom-right on the keys (the
  last query is the last key, as with a KV cache). Nothing is materialized.
- a 2D bool tensor (B, L), True = attend (transformers' convention, as for flash attention): the
  key padding of a causal, sliding-window causal or bidirectional pattern. ``L`` may be shorter
  than the keys the cache returns (a static cache's unfilled slots, which no query can see): the
  attention function keeps the first ``L`` keys. The pattern rides on the tensor
  (``_attnzoo_pattern``); a 2D mask without it takes the call's ``is_causal``/``sliding_window``.
  Cost O(B L), not O(B Nq Nk).
- a 4D bool mask (B, 1, Nq, Nk), True = attend, for any other pattern transformers asks for
  (packed sequences, chunked or bidirectional-overlay masks): built by transformers' ``sdpa_mask``.

The attention function accepts those three and a 4D mask a user passes (bool True = attend, or
additive float 0 / very negative). Every mechanism gets key padding through its
``key_padding_mask`` parameter, (B, Nk) bool with **True = ignore** (the inverse of transformers'
1 = attend). A 4D mask is reduced to key padding + (bottom-right) causal when it factors exactly
(cost O(B Nq Nk) booleans); ``softmax`` takes any other 4D mask as an additive ``bias``, every
other mechanism refuses it (ParameterError naming ``attention_mask``).

Other arguments of the call:

- ``scaling`` -> the mechanism's ``scale`` (a mechanism without one, e.g. ``flow``, has no scale
  in its formula and ignores it).
- ``sliding_window=w`` (transformers: key ``j`` visible from query ``i`` iff ``i - w < j <= i``)
  -> ``sliding_window``'s ``window=(w - 1, 0)``, ``softmax``'s ``masks.sliding_window`` mask_mod;
  other mechanisms refuse.
- ``softcap`` (Gemma 2) -> ``softmax``'s ``masks.softcap`` score_mod; other mechanisms refuse.
- K/V keep ``num_key_value_heads``: mechanisms with ``gqa=True`` (all built-in ones) take them
  un-repeated; K/V are repeated only for a mechanism that does not declare GQA.
- Attention dropout (``dropout > 0``, i.e. training a model whose config sets it): attnzoo's
  mechanisms have no dropout. ``softmax`` then runs as torch's SDPA with ``dropout_p`` and the
  same mask (the same function, plus dropout); every other mechanism refuses, naming
  ``dropout``: set the config's attention dropout to 0 or call ``model.eval()``.
- ``output_attentions=True`` is refused (``attnzoo.hooks`` captures attention maps);
  ``s_aux`` (learned sinks) is refused.
- Output: (B, Nq, H, D), as transformers expects.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._torchvision import ensure_importable

ensure_importable()  # transformers may import torchvision: see _torchvision.py

from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from .. import get, masks  # noqa: E402
from ..errors import ParameterError  # noqa: E402
from ..registry import Mechanism  # noqa: E402

__all__ = ["register", "attnzoo_mask"]

#: Parameters the integration sets from each call; a user binding them at register() is an error.
_SET_PER_CALL = ("causal", "causal_alignment", "key_padding_mask", "scale", "return_lse")


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------
def register(mechanism: str, key: Optional[str] = None, **params: Any) -> str:
    """Register ``mechanism`` (with ``params`` bound) as a transformers attention implementation.

    Registers the attention function and the matching mask function under ``key`` (default
    ``"attnzoo:<mechanism>"``) and returns the key, for ``from_pretrained``/``from_config``'s
    ``attn_implementation=`` or ``model.set_attn_implementation``. Registering again under a key
    replaces what it held. Raises UnknownMechanismError for an unknown name, ParameterError for
    an unknown parameter or one the integration sets per call (``causal``, ``scale``, ...).
    """
    if not isinstance(mechanism, str):
        raise ParameterError(f"mechanism: expected a registered name (str), got {type(mechanism).__name__}", argument="mechanism")
    mech = get(mechanism)  # UnknownMechanismError lists the registered names
    _check_params(mech, params)
    key = f"attnzoo:{mech.name}" if key is None else key
    if not isinstance(key, str) or not key:
        raise ParameterError(f"key: expected a non-empty str, got {key!r}", argument="key")
    AttentionInterface.register(key, _attention_function(mech.name, params))
    AttentionMaskInterface.register(key, attnzoo_mask)
    return key


def _check_params(mech: Mechanism, params: dict[str, Any]) -> None:
    accepted = {p.name for p in mech.params}
    for name in params:
        if name in _SET_PER_CALL:
            raise ParameterError(f"{mech.name}: {name}: set by the integration from each call; leave it out", argument=name)
        if name not in accepted:
            raise ParameterError(
                f"{mech.name}: unknown parameter {name!r}; it accepts: {', '.join(sorted(accepted - set(_SET_PER_CALL)))}",
                argument=name,
            )


# --------------------------------------------------------------------------------------------
# the mask function
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pattern:
    """A pattern transformers asked for that the attention function can state without a dense mask."""

    causal: bool
    window: Optional[int] = None  # transformers' sliding_window: i - window < j <= i


def _pattern_of(mask_function: Callable) -> Optional[_Pattern]:
    """The pattern of one of transformers' standard mask functions, None for any other one.

    Causal and bidirectional are recognised by identity; the sliding window is
    ``and_masks(sliding_window_overlay(w), causal_mask_function)``, recognised by its closure
    (names checked, so a change in transformers gives None: the dense fallback, never a wrong
    pattern).
    """
    if mask_function is causal_mask_function:
        return _Pattern(causal=True)
    if mask_function is bidirectional_mask_function:
        return _Pattern(causal=False)
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask":
        return None
    parts = inspect.getclosurevars(mask_function).nonlocals.get("mask_functions", ())
    if len(parts) != 2 or parts[1] is not causal_mask_function:
        return None
    overlay = parts[0]
    if getattr(overlay, "__qualname__", "") != "sliding_window_overlay.<locals>.inner_mask":
        return None
    window = inspect.getclosurevars(overlay).nonlocals.get("sliding_window")
    return _Pattern(causal=True, window=int(window)) if isinstance(window, int) and window > 0 else None


def attnzoo_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: Optional[Tensor] = None,
    device: Any = "cpu",
    **kwargs: Any,
) -> Optional[Tensor]:
    """transformers' mask-interface function for attnzoo keys (returns: see the module docstring)."""
    pattern = _pattern_of(mask_function)
    if pattern is None:  # packed sequences, overlays, chunks: transformers' own dense mask
        kwargs.pop("allow_is_causal_skip", None)
        kwargs.pop("allow_is_bidirectional_skip", None)
        return sdpa_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
            allow_is_causal_skip=False, allow_is_bidirectional_skip=False, device=device, **kwargs,
        )  # fmt: skip
    q_offset = int(q_offset)  # a static cache passes a tensor
    # Keys a query can see: all of them (bidirectional), else those up to the last query.
    visible = q_offset + q_length - kv_offset if pattern.causal else kv_length
    if visible < q_length or visible > kv_length:  # not bottom-right alignable: state it densely
        return sdpa_mask(
            batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
            allow_is_causal_skip=False, allow_is_bidirectional_skip=False, device=device,
        )  # fmt: skip
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    keep = None if padding is None else padding[:, kv_offset : kv_offset + visible]
    if visible == kv_length and (keep is None or bool(keep.all())):
        return None
    if keep is None:
        keep = torch.ones(batch_size, visible, dtype=torch.bool, device=device)
    keep = keep.to(dtype=torch.bool).contiguous()
    keep._attnzoo_pattern = pattern  # read back by the attention function (lost on a copy: then the call's kwargs)
    return keep


# --------------------------------------------------------------------------------------------
# the attention function
# --------------------------------------------------------------------------------------------
@dataclass
class _Call:
    """What one attention call asks the mechanism for, in attnzoo's terms."""

    key: Tensor
    value: Tensor
    causal: bool
    window: Optional[int] = None
    key_padding_mask: Optional[Tensor] = None  # (B, Nk) bool, True = ignore
    bias: Optional[Tensor] = None  # additive (B|1, H|1, Nq, Nk): a 4D mask that did not factor


def _attention_function(name: str, params: dict[str, Any]) -> Callable:
    def attnzoo_attention(
        module: torch.nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        *,
        scaling: Optional[float] = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        mech = get(name)  # per call: a model pickled or copied does not hold the registry
        _refuse_unsupported(mech, kwargs)
        call = _resolve_mask(mech, module, query, key, value, attention_mask, kwargs)
        if dropout and module.training:
            out = _softmax_with_dropout(mech, params, query, call, scaling, dropout, kwargs.get("softcap"))
        else:
            out = _run(mech, params, query, call, scaling, kwargs.get("softcap"))
        return out.transpose(1, 2).contiguous(), None

    attnzoo_attention.__name__ = attnzoo_attention.__qualname__ = f"attnzoo_attention_{name}"
    return attnzoo_attention


def _refuse_unsupported(mech: Mechanism, kwargs: dict[str, Any]) -> None:
    if kwargs.get("output_attentions"):
        raise ParameterError(
            f"attnzoo:{mech.name}: output_attentions=True is not supported (no attention weights are returned); "
            "capture them with attnzoo.hooks, or use attn_implementation='eager'",
            argument="output_attentions",
        )
    if kwargs.get("s_aux") is not None:
        raise ParameterError(f"attnzoo:{mech.name}: learned attention sinks (s_aux) are not supported", argument="s_aux")


def _is_causal(module: torch.nn.Module, kwargs: dict[str, Any]) -> bool:
    stated = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if stated is None else stated)


def _resolve_mask(
    mech: Mechanism, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], kwargs: dict
) -> _Call:
    """Turn what reached the attention function into causal / window / key padding / bias."""
    window = kwargs.get("sliding_window")
    if mask is None:
        return _Call(key, value, _is_causal(module, kwargs), window)
    if mask.dim() == 2:  # ours: key padding of a stated pattern, over the first L keys
        length = mask.shape[-1]
        pattern = getattr(mask, "_attnzoo_pattern", None)
        causal, window = (pattern.causal, pattern.window) if pattern is not None else (_is_causal(module, kwargs), window)
        keep = mask.to(torch.bool)
        padding = None if bool(keep.all()) else ~keep
        return _Call(key[..., :length, :], value[..., :length, :], causal, window, padding)
    if mask.dim() != 4 or not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ParameterError(
            f"attnzoo:{mech.name}: attention_mask: expected a 2D mask from attnzoo's mask function or a 4D mask "
            f"(bool, True = attend, or additive float), got {tuple(mask.shape)} {mask.dtype}",
            argument="attention_mask",
        )
    # A 4D mask states the whole pattern (transformers' sdpa convention): no causal, no window on top.
    causal, padding, bias = _read_dense(mask, query.shape[0], query.shape[-2], key.shape[-2], query.dtype)
    if bias is not None and "bias" not in {p.name for p in mech.params}:
        raise ParameterError(
            f"attnzoo:{mech.name}: attention_mask: this 4D mask is not key padding plus a causal pattern, and "
            f"{mech.name} takes no arbitrary mask (softmax does)",
            argument="attention_mask",
        )
    return _Call(key, value, causal, None, padding, bias)


def _read_dense(mask: Tensor, batch: int, nq: int, nk: int, dtype: torch.dtype) -> tuple[bool, Optional[Tensor], Optional[Tensor]]:
    """``(causal, key_padding_mask, bias)`` of a 4D mask, memoized on the mask.

    Every layer receives the same mask tensor, so it is read once per forward, not once per
    layer; the memo is keyed by the tensor's version counter, so an in-place edit re-reads it.
    """
    key = (mask._version, batch, nq, nk, dtype)
    memo = getattr(mask, "_attnzoo_read", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    sliced = mask[..., :nk]
    factored = _factor(sliced, nq, nk)
    if factored is None:
        read = (False, None, _additive(sliced, dtype))
    else:  # a mask broadcast over the batch gives one padding row: the mechanisms want (B, Nk)
        causal, padding = factored
        read = (causal, None if padding is None else padding.expand(batch, nk), None)
    mask._attnzoo_read = (key, read)
    return read


def _attend_of(mask: Tensor) -> Optional[Tensor]:
    """A 4D mask as bool True = attend; None for an additive mask holding values other than 0 / very negative."""
    if mask.dtype == torch.bool:
        return mask
    attend = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask < 0
    return attend if bool((attend | blocked).all()) else None


def _factor(mask: Tensor, nq: int, nk: int) -> Optional[tuple[bool, Optional[Tensor]]]:
    """``(causal, key_padding_mask)`` when the 4D mask is exactly that pattern, else None.

    A key no query attends to is padding; the mask must then equal either "every other key" or
    "every other key up to the query's place" (bottom-right). O(B Nq Nk) booleans.
    """
    attend = _attend_of(mask)
    if attend is None or attend.shape[-1] != nk:
        return None
    if attend.shape[1] > 1 and not bool((attend == attend[:, :1]).all()):
        return None  # per-head masks
    attend = attend[:, 0].expand(attend.shape[0], nq, nk)  # (B, Nq, Nk)
    keep = attend.any(dim=1)  # (B, Nk)
    padding = None if bool(keep.all()) else ~keep
    if bool((attend == keep[:, None, :]).all()):
        return False, padding
    tri = torch.ones(nq, nk, dtype=torch.bool, device=mask.device).tril(nk - nq)
    if bool((attend == (tri[None] & keep[:, None, :])).all()):
        return True, padding
    return None


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:  # the dtype's minimum rather than -inf: a fully masked row stays finite
        return torch.zeros((), dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)


def _mechanism_params(
    mech: Mechanism, params: dict[str, Any], nq: int, nk: int, call: _Call, scaling: Optional[float], softcap: Optional[float]
) -> dict[str, Any]:
    """The keyword arguments of the mechanism call; refusals name the transformers argument."""
    accepted = {p.name for p in mech.params}
    out = dict(params)
    if scaling is not None and "scale" in accepted:
        out["scale"] = float(scaling)
    if call.causal and nq > 1:  # one query at the end of the keys sees them all: causal is then a no-op
        if "causal" not in accepted:
            raise ParameterError(f"attnzoo:{mech.name}: has no causal form; use it where is_causal=False", argument="is_causal")
    if "causal" in accepted:
        out["causal"] = call.causal
    if "causal_alignment" in accepted:
        out["causal_alignment"] = "bottom_right"  # a KV cache puts the queries at the end of the keys
    if call.window is not None:
        _add_window(mech, out, call.window, nq, nk)
    if call.key_padding_mask is not None and bool(call.key_padding_mask.any()):
        if "key_padding_mask" not in accepted:
            raise ParameterError(
                f"attnzoo:{mech.name}: attention_mask: this batch is padded and {mech.name} takes no key_padding_mask",
                argument="attention_mask",
            )
        out["key_padding_mask"] = call.key_padding_mask
    if call.bias is not None:
        out["bias"] = call.bias if out.get("bias") is None else out["bias"] + call.bias
    if softcap is not None:
        if "score_mod" not in accepted or out.get("score_mod") is not None:
            raise ParameterError(f"attnzoo:{mech.name}: softcap is supported by softmax without a score_mod of its own", argument="softcap")
        out["score_mod"] = masks.softcap(float(softcap))
    return out


def _add_window(mech: Mechanism, out: dict[str, Any], window: int, nq: int, nk: int) -> None:
    """transformers' sliding_window w (i - w < j <= i) as the mechanism's own window."""
    if mech.name == "sliding_window":
        if out.get("window") not in (None, (window - 1, 0)):
            raise ParameterError(
                f"attnzoo:sliding_window: the model asks for sliding_window={window}, the registered window is {out['window']!r}",
                argument="window",
            )
        out["window"], out["causal"] = (window - 1, 0), True
    elif "mask_mod" in {p.name for p in mech.params}:
        mod = masks.sliding_window(window - 1, 0, offset=nk - nq)
        out["mask_mod"] = mod if out.get("mask_mod") is None else masks.and_masks(out["mask_mod"], mod)
    else:
        raise ParameterError(
            f"attnzoo:{mech.name}: the model asks for sliding_window={window}, which {mech.name} cannot apply "
            "(softmax and sliding_window can)",
            argument="sliding_window",
        )


def _run(mech: Mechanism, params: dict, query: Tensor, call: _Call, scaling: Optional[float], softcap: Optional[float]) -> Tensor:
    key, value = call.key, call.value
    if not mech.gqa and key.shape[1] != query.shape[1]:
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    kwargs = _mechanism_params(mech, params, query.shape[-2], key.shape[-2], call, scaling, softcap)
    return mech(query, key, value, **kwargs)


def _softmax_with_dropout(
    mech: Mechanism, params: dict, query: Tensor, call: _Call, scaling: Optional[float], dropout: float, softcap: Optional[float]
) -> Tensor:
    """Training with attention dropout: softmax as torch's SDPA with dropout_p; other mechanisms refuse."""
    if mech.name != "softmax" or params or softcap is not None:
        raise ParameterError(
            f"attnzoo:{mech.name}: attention dropout ({dropout}) in training is applied only for plain softmax; "
            "set the config's attention dropout to 0 or call model.eval()",
            argument="dropout",
        )
    nq, nk = query.shape[-2], call.key.shape[-2]
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=query.device)
    if call.causal:
        allowed = allowed.tril(nk - nq)
    if call.window is not None:
        allowed = allowed & ~torch.ones_like(allowed).tril(nk - nq - call.window)
    mask = _additive(allowed, query.dtype)[None, None]
    if call.key_padding_mask is not None:
        mask = mask.masked_fill(call.key_padding_mask[:, None, None, :], torch.finfo(query.dtype).min)
    if call.bias is not None:
        mask = mask + call.bias
    return F.scaled_dot_product_attention(
        query, call.key, call.value, attn_mask=mask, dropout_p=dropout, scale=scaling, enable_gqa=True
    )
