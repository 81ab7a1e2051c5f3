"""timm integration: any attnzoo mechanism inside timm's Vision Transformers.

Two entry points, one module (:class:`AttnzooAttention`, a drop-in for
``timm.layers.Attention``: same constructor, same submodule and parameter names, so state dicts
load both ways with ``strict=True``):

- :func:`swap_attention` replaces every timm ``Attention`` of a built model in place, sharing its
  weights::

      model = timm.create_model("vit_tiny_patch16_224", pretrained=True)
      swap_attention(model, "neighborhood", kernel_size=7)

- :meth:`AttnzooAttention.partial` gives a class for timm's ``attn_layer`` argument::

      model = timm.create_model(
          "vit_tiny_patch16_224", attn_layer=AttnzooAttention.partial("neighborhood", kernel_size=7)
      )
      track_grid(model)  # spatial mechanisms: lay the patch tokens out on the model's grid

How tokens reach the mechanism (``p = model.num_prefix_tokens``: class, register and
distillation tokens, which timm puts first; the patches follow in row-major (H, W) order):

- A mechanism with ``spatial_dims`` (1,) (softmax, linear, ...) sees the whole sequence, prefix
  tokens included, as timm's own attention does.
- A spatial mechanism (2 in its ``spatial_dims``: neighborhood, window, axial, grid, halo,
  varying_window) sees the patches as a (B, heads, H, W, D) grid, and the prefix tokens stay
  global: each prefix query attends to all N tokens (softmax), and each patch query attends to
  its pattern's patches *and* all prefix tokens in one softmax. The second part is exact: the
  mechanism's output over its patches and its log-sum-exp are merged with softmax attention over
  the p prefix keys (:func:`attnzoo.merge_attention_states`), so a mechanism must be able to
  return its LSE when ``p > 0`` (all spatial ones but varying_window can), and the merge
  backpropagates through it. Cost: the mechanism's, plus O(N p D) for the prefix rows and columns.

The grid is the model's ``patch_embed.grid_size``; :func:`track_grid` (which
:func:`swap_attention` calls) also follows dynamic image sizes (``dynamic_img_size=True``) by
reading each forward's patch grid. ``attn_mask`` (timm's convention: bool True = attend, or
additive float) is honored by mechanisms with a ``bias`` parameter (softmax) and refused by the
others; ``is_causal`` maps to the mechanism's ``causal`` for whole-sequence mechanisms. Attention
dropout is not applied by attnzoo mechanisms: a layer with ``attn_drop > 0`` refuses to run in
training mode rather than silently skip it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._torchvision import ensure_importable

ensure_importable()  # before timm imports torchvision: see _torchvision.py

from timm.layers import Attention as TimmAttention  # noqa: E402

from .. import get, merge_attention_states  # noqa: E402
from ..errors import ParameterError, ShapeError  # noqa: E402
from ..registry import Mechanism  # noqa: E402

__all__ = ["AttnzooAttention", "swap_attention", "track_grid"]

_RESERVED = ("return_lse",)  # set by the layer itself


@dataclass
class _Layout:
    """Where the patch tokens lie: ``num_prefix_tokens`` first, then a row-major ``grid``.

    Shared by every layer of one model; as a forward hook on ``patch_embed`` it records the
    grid of the current input (dynamic image sizes). An object rather than a closure so that
    ``copy.deepcopy(model)`` copies it with the layers that read it.
    """

    num_prefix_tokens: int
    grid: Optional[tuple[int, int]]

    def __call__(self, patch_embed: nn.Module, args: tuple, output: Tensor) -> None:
        if output.dim() == 4:  # NHWC, as dynamic_img_size asks of PatchEmbed
            self.grid = (int(output.shape[1]), int(output.shape[2]))
        elif hasattr(patch_embed, "dynamic_feat_size") and args and args[0].dim() == 4:
            self.grid = tuple(int(s) for s in patch_embed.dynamic_feat_size(tuple(args[0].shape[-2:])))


@dataclass(frozen=True)
class _Config:
    mechanism: str = "softmax"
    backend: Optional[str] = None
    params: dict[str, Any] = field(default_factory=dict)
    num_prefix_tokens: Optional[int] = None
    grid_size: Optional[tuple[int, int]] = None


def _mechanism(name: Any) -> Mechanism:
    if not isinstance(name, str):
        raise ParameterError(f"mechanism: expected a registered name (str), got {type(name).__name__}", argument="mechanism")
    return get(name)  # UnknownMechanismError lists the registered names


def _is_spatial(mech: Mechanism) -> bool:
    return 2 in mech.spatial_dims


def _param_names(mech: Mechanism) -> set[str]:
    return {p.name for p in mech.params}


class AttnzooAttention(nn.Module):
    """timm's ``Attention`` with the attention computed by an attnzoo mechanism.

    The constructor is timm's (``dim, num_heads, attn_head_dim, dim_out, qkv_bias, qk_norm,
    scale_norm, proj_bias, gated, attn_drop, proj_drop, norm_layer, device, dtype``) plus the
    keyword-only ``mechanism``, ``backend``, ``mechanism_params``, ``num_prefix_tokens`` and
    ``grid_size``; the projections (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``)
    are timm's, under the same names. ``forward(x, attn_mask=None, is_causal=False)`` maps
    (B, N, C) to (B, N, dim_out). How prefix tokens and the grid are handled: the module
    docstring of :mod:`attnzoo.integrations.timm`.
    """

    _config = _Config()  # what AttnzooAttention.partial(...) sets on its subclass

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[type] = None,
        device: Any = None,
        dtype: Any = None,
        *,
        mechanism: Optional[str] = None,
        backend: Optional[str] = None,
        mechanism_params: Optional[dict[str, Any]] = None,
        num_prefix_tokens: Optional[int] = None,
        grid_size: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        # timm's own module builds the projections, so their shapes and initialization are its
        timm = TimmAttention(
            dim, num_heads=num_heads, attn_head_dim=attn_head_dim, dim_out=dim_out, qkv_bias=qkv_bias,
            qk_norm=qk_norm, scale_norm=scale_norm, proj_bias=proj_bias, gated=gated, attn_drop=attn_drop,
            proj_drop=proj_drop, norm_layer=norm_layer, device=device, dtype=dtype,
        )  # fmt: skip
        self._adopt(timm)
        config = self._config
        self._configure(
            mechanism if mechanism is not None else config.mechanism,
            backend if backend is not None else config.backend,
            {**config.params, **(mechanism_params or {})},
        )
        prefix = num_prefix_tokens if num_prefix_tokens is not None else config.num_prefix_tokens
        grid = grid_size if grid_size is not None else config.grid_size
        self.layout = _Layout(prefix or 0, _pair(grid)) if grid is not None else None

    @classmethod
    def partial(
        cls,
        mechanism: str,
        *,
        backend: Optional[str] = None,
        num_prefix_tokens: Optional[int] = None,
        grid_size: Optional[tuple[int, int]] = None,
        **params: Any,
    ) -> type["AttnzooAttention"]:
        """A subclass bound to ``mechanism`` and its ``params``, for timm's ``attn_layer=``.

        timm checks ``issubclass(attn_layer, ...)``, so this is a class, not a functools.partial.
        A spatial mechanism needs the patch grid: pass ``grid_size=(H, W)`` and
        ``num_prefix_tokens`` here, or call :func:`track_grid` on the built model.
        """
        mech = _mechanism(mechanism)
        _check_params(mech, params)
        config = _Config(mechanism, backend, dict(params), num_prefix_tokens, _pair(grid_size) if grid_size is not None else None)
        return type(f"AttnzooAttention_{mechanism}", (cls,), {"_config": config, "__module__": cls.__module__})

    @classmethod
    def from_timm(
        cls, attn: nn.Module, mechanism: str, *, backend: Optional[str] = None, **params: Any
    ) -> "AttnzooAttention":
        """A layer that shares ``attn``'s submodules (its weights, not copies) and runs ``mechanism``."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._adopt(attn)
        layer._configure(mechanism, backend, params)
        layer.layout = getattr(attn, "layout", None)
        return layer

    def _adopt(self, source: nn.Module) -> None:
        """Take ``source``'s submodules and sizes (a timm Attention or another AttnzooAttention)."""
        self.num_heads, self.head_dim, self.attn_dim = source.num_heads, source.head_dim, source.attn_dim
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            setattr(self, name, getattr(source, name))
        self.training = source.training  # a swap inside an eval() model stays in eval

    def _configure(self, mechanism: str, backend: Optional[str], params: dict[str, Any]) -> None:
        mech = _mechanism(mechanism)
        _check_params(mech, params)
        self.mechanism, self.backend, self.mechanism_params = mech.name, backend, dict(params)

    @property
    def _mech(self) -> Mechanism:
        # looked up per call, not stored: copying or pickling the model must not copy the registry
        return get(self.mechanism)

    def extra_repr(self) -> str:
        shown = {k: f"Tensor{tuple(v.shape)}" if isinstance(v, Tensor) else repr(v) for k, v in self.mechanism_params.items()}
        params = "".join(f", {k}={v}" for k, v in shown.items())
        backend = f", backend={self.backend!r}" if self.backend else ""
        return f"mechanism={self.mechanism!r}{params}{backend}, num_heads={self.num_heads}"

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if x.dim() != 3:
            raise ShapeError(f"{type(self).__name__}: x: expected (B, N, C), got shape {tuple(x.shape)}", argument="x")
        if self.training and self.attn_drop.p > 0:
            raise ParameterError(
                f"{type(self).__name__}: attn_drop: attnzoo mechanisms apply no dropout to attention weights; "
                f"got attn_drop={self.attn_drop.p} in training mode (build the model with attn_drop_rate=0, or eval())",
                argument="attn_drop",
            )
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if _is_spatial(self._mech):
            out = self._attend_grid(q, k, v, attn_mask, is_causal)
        else:
            out = self._attend_sequence(q, k, v, attn_mask, is_causal)
        x = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def _call(self, q: Tensor, k: Tensor, v: Tensor, **extra: Any) -> Any:
        return self._mech(q, k, v, backend=self.backend, **self.mechanism_params, **extra)

    def _attend_sequence(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """The whole sequence, prefix tokens included, as one 1D sequence: timm's own attention."""
        names, extra = _param_names(self._mech), {}
        if attn_mask is not None:
            if "bias" not in names:
                raise ParameterError(
                    f"{type(self).__name__}: attn_mask: {self.mechanism!r} takes no additive mask (only mechanisms "
                    "with a `bias` parameter, e.g. softmax, honor timm's attn_mask)",
                    argument="attn_mask",
                )
            bias = _additive(attn_mask, q.dtype)
            user = self.mechanism_params.get("bias")
            extra["bias"] = bias if user is None else user + bias
        if is_causal:
            if "causal" not in names:
                raise ParameterError(
                    f"{type(self).__name__}: is_causal: {self.mechanism!r} has no causal form", argument="is_causal"
                )
            extra["causal"] = True
        if extra:
            params = {**self.mechanism_params, **extra}
            return self._mech(q, k, v, backend=self.backend, **params)
        return self._call(q, k, v)

    def _attend_grid(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        """Patches on their (H, W) grid through the mechanism; prefix tokens global (module docstring)."""
        for name, given in (("attn_mask", attn_mask is not None), ("is_causal", bool(is_causal))):
            if given:
                raise ParameterError(
                    f"{type(self).__name__}: {name}: the spatial mechanism {self.mechanism!r} lays the patches on "
                    "their grid and takes no sequence mask; pass it through its own parameters instead",
                    argument=name,
                )
        B, H, N, D = q.shape
        p, (gh, gw) = self._layout(N)
        scale = self.mechanism_params.get("scale")

        def grid(t: Tensor) -> Tensor:
            return t[:, :, p:].reshape(B, H, gh, gw, t.shape[-1])

        if p == 0:
            return self._call(grid(q), grid(k), grid(v)).reshape(B, H, N, -1)
        # every backend's LSE is differentiable (tests/conformance/test_lse.py), so the merge below
        # backpropagates into q, k and a learnable score term such as rpb
        local, lse_local = self._call(grid(q), grid(k), grid(v), return_lse=True)
        softmax = get("softmax")
        # patch queries over the prefix keys, merged into the same softmax as their local keys
        prefix, lse_prefix = softmax(q[:, :, p:], k[:, :, :p], v[:, :, :p], scale=scale, return_lse=True)
        patches, _ = merge_attention_states([local.reshape(B, H, gh * gw, -1), prefix], [lse_local.reshape(B, H, gh * gw), lse_prefix])
        head = softmax(q[:, :, :p], k, v, scale=scale)  # prefix queries: every token
        return torch.cat([head, patches.to(head.dtype)], dim=2)

    def _layout(self, n: int) -> tuple[int, tuple[int, int]]:
        layout = self.layout
        if layout is None or layout.grid is None:
            raise ParameterError(
                f"{type(self).__name__}: grid_size: the spatial mechanism {self.mechanism!r} needs the patch grid; "
                "call attnzoo.integrations.timm.track_grid(model) on the built model, or pass grid_size=(H, W) "
                "and num_prefix_tokens to AttnzooAttention.partial",
                argument="grid_size",
            )
        p, (gh, gw) = layout.num_prefix_tokens, layout.grid
        if n != p + gh * gw:
            raise ShapeError(
                f"{type(self).__name__}: x: expected {p} prefix tokens + a {gh}x{gw} patch grid = {p + gh * gw} tokens, "
                f"got {n} (patch dropout and token pruning change the count: the grid cannot be laid out)",
                argument="x",
            )
        if p > 0 and "return_lse" not in _param_names(self._mech):
            raise ParameterError(
                f"{type(self).__name__}: mechanism: {self.mechanism!r} cannot return its log-sum-exp, so the {p} prefix "
                "token(s) cannot join its softmax; use a model without prefix tokens (class_token=False, "
                "global_pool='avg')",
                argument="mechanism",
            )
        return p, (gh, gw)


def _pair(size: Any) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ParameterError(f"grid_size: expected a positive int or (H, W), got {size!r}", argument="grid_size")
    return pair  # type: ignore[return-value]


def _check_params(mech: Mechanism, params: dict[str, Any]) -> None:
    """Unknown or reserved names fail when the layer is built, not at its first forward."""
    names = _param_names(mech)
    for name in params:
        if name in _RESERVED:
            raise ParameterError(f"{mech.name}: {name}: set by the timm layer itself; leave it out", argument=name)
        if name not in names:
            accepted = ", ".join(sorted(names - set(_RESERVED))) or "none"
            raise ParameterError(f"{mech.name}: unknown parameter {name!r}; it accepts: {accepted}", argument=name)


def _additive(attn_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """timm's ``attn_mask`` as an additive bias: bool True = attend (-inf elsewhere), float as given."""
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (TimmAttention, AttnzooAttention))]


def track_grid(model: nn.Module) -> nn.Module:
    """Give every :class:`AttnzooAttention` of ``model`` the model's token layout, kept current.

    Reads ``model.num_prefix_tokens`` and ``model.patch_embed.grid_size`` and adds a forward hook
    on ``patch_embed`` that records each input's grid (dynamic image sizes). Returns ``model``.
    """
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        raise ParameterError(
            f"model: a {type(model).__name__} has no patch_embed/num_prefix_tokens; a spatial mechanism needs a "
            "timm ViT-style model (or grid_size=(H, W) and num_prefix_tokens given to AttnzooAttention.partial)",
            argument="model",
        )
    layout = _Layout(int(model.num_prefix_tokens), _pair(patch_embed.grid_size))
    for hook in list(patch_embed._forward_hooks.values()):
        if isinstance(hook, _Layout):  # tracked before: one hook per model
            layout = hook
            layout.num_prefix_tokens = int(model.num_prefix_tokens)
            break
    else:
        patch_embed.register_forward_hook(layout)
    for _, module in _attention_modules(model):
        if isinstance(module, AttnzooAttention):
            module.layout = layout
    return model


def swap_attention(model: nn.Module, mechanism: str, *, backend: Optional[str] = None, **params: Any) -> nn.Module:
    """Replace every timm ``Attention`` of ``model`` by an :class:`AttnzooAttention` running ``mechanism``.

    In place, sharing the weights (same parameter names: state dicts load both ways), and
    returns ``model`` (a bare ``Attention`` passed as ``model`` is returned replaced). With
    ``softmax`` the model computes what it computed before, to rounding. A spatial mechanism
    also gets the token layout (:func:`track_grid`); how prefix tokens are handled: the module
    docstring. Layers already swapped are swapped again to the new mechanism.
    """
    mech = _mechanism(mechanism)
    _check_params(mech, params)
    if isinstance(model, (TimmAttention, AttnzooAttention)):
        return AttnzooAttention.from_timm(model, mechanism, backend=backend, **params)
    found = _attention_modules(model)
    if not found:
        others = sorted({type(m).__name__ for m in model.modules() if "attention" in type(m).__name__.lower()})
        seen = f" (it has {', '.join(others)}, which this integration does not replace)" if others else ""
        raise ParameterError(
            f"model: no timm Attention module (qkv, proj, num_heads: ViT, DeiT, ...) in a {type(model).__name__}{seen}",
            argument="model",
        )
    if _is_spatial(mech):
        _check_params_on_grid(mech, params, model)
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, AttnzooAttention.from_timm(module, mechanism, backend=backend, **params))
    if _is_spatial(mech):
        track_grid(model)
    return model


def _check_params_on_grid(mech: Mechanism, params: dict[str, Any], model: nn.Module) -> None:
    """Validate ``params`` against the model's grid now (e.g. a kernel larger than the grid)."""
    if not hasattr(model, "patch_embed"):
        track_grid(model)  # raises the error naming `model`
    grid = _pair(model.patch_embed.grid_size)
    first = _attention_modules(model)[0][1]
    probe = torch.zeros(1, first.num_heads, *grid, first.head_dim)
    mech.prepare(probe, probe, probe, params)
