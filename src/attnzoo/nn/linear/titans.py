"""Titans' neural long-term memory, Memory as a Context and Memory as a Gate (Behrouz et al., 2025; catalog F11).

"Titans: Learning to Memorize at Test Time" (Behrouz, Zhong & Mirrokni, arXiv 2501.00663). The
memory M is a small MLP whose weights are *learned during the forward*: each token's key/value
pair is a training example of the associative loss, and the weights take one step of gradient
descent with momentum ("surprise") and weight decay ("forgetting") per token. Per head, on
(B, N, C) tokens:

    k_t = x_t W_K,  v_t = x_t W_V,  q_t = x_t W_Q            (Eq. 11, 15; SiLU, q and k l2-normalised, Sec. 4.4)
    l(M_{t-1}; x_t) = || M_{t-1}(k_t) - v_t ||_2^2           (Eq. 12)
    S_t = eta_t S_{t-1} - theta_t grad l(M_{t-1}; x_t)        (Eq. 10 / 14: momentum, the "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t                         (Eq. 13: forgetting by weight decay)
    y_t = M_t(q_t)                                            (Eq. 15: retrieval, a forward pass without update)

with data-dependent theta_t = max_lr * sigmoid(x_t w_theta), eta_t = sigmoid(x_t w_eta),
alpha_t = sigmoid(x_t w_alpha) per head (Sec. 3.1). M is an MLP of ``depth`` linear layers without
biases, SiLU between them (depth 1: a matrix, which makes the update a gated delta rule with
momentum); its initial weights M_0 are parameters of the layer (learned in the outer loop), S_0 = 0.

Parallel form (Sec. 3.2, mini-batch gradient descent): the sequence is cut into chunks of b tokens;
within a chunk every gradient is taken at the weights of the chunk's start M_0 (t' = t - t mod b),
so the b per-token gradients are computed at once. For a linear layer the gradient of token i is
rank one, u_i = delta_i x_i^T (delta: the back-propagated error at the layer's output, x: its input),
and unrolling Eq. 13-14 inside the chunk gives

    M_t = A_t M_0 + g_t S_0 - sum_{i<=t} C_ti delta_i x_i^T,     A_t = prod_{j<=t} (1 - alpha_j),
    C_ti = theta_i sum_{s=i..t} prod_{j=s+1..t} (1 - alpha_j) prod_{j=i+1..s} eta_j,
    g_t = sum_{s<=t} prod_{j=s+1..t} (1 - alpha_j) prod_{j<=s} eta_j

(the momentum's parallel scan written as a product of two lower-triangular decay matrices), so the
read-out of every token of the chunk is, layer by layer (z: the layer's input for query t),

    W_t z = A_t W_0 z + g_t S_0 z - sum_{i<=t} C_ti (x_i . z) delta_i

(a masked "attention" of the chunk's queries over its keys, the dual form of TTT; no per-token
weights are materialised). Chunk size 1 is the token recurrence exactly (the tests check it, and
check larger chunks against a written-out per-chunk loop). Cost per head: O(N d d_h) for the
gradients and chunk-end updates plus O(N b (d + d_h)) for the read-outs (d: head width, d_h: the
MLP's hidden width); the state is the weights and momentum, 2 (d d_h + d_h d) numbers per head
(depth 2), whatever the length. Decoding (``init_state`` / ``step``) keeps the weights and momentum
at the last chunk boundary plus the current chunk's pending keys, values and gates (P < b tokens),
so any split of the sequence into steps equals the full forward; a step of T tokens costs the
pending tokens' gradients again, O((P + T) d d_h + T (P + T)(d + d_h)), and reads out only the new ones.

:class:`NeuralMemory` is the memory alone as a layer (the paper's LMM); :class:`TitansMAC` is the
paper's Memory as a Context variant (Sec. 4.1, Eq. 21-25: each segment attends to the persistent
tokens and to the memory's retrieval for it, then the memory learns from the attention's output;
see its docstring). :class:`TitansMAG` is the paper's Memory as a Gate variant (Sec. 4.2, Eq. 26-28):

    x~ = [p_1 .. p_Np] || x                      persistent memory: Np learnable tokens prepended (Eq. 19, 26)
    y = SW-Attn*(x~)                              sliding-window attention, the persistent tokens always seen (Eq. 27)
    o = RMSNorm(y) (*) sigmoid(M(x~))              the two branches normalised (learnable weights), gated (Eq. 28)

What is simplified (say so before comparing with the paper's numbers): the 1-D depthwise causal
convolutions after the q, k, v projections (Sec. 4.4) are not applied; the memory's read-out goes
through RMSNorm and an output projection, without the extra linear output gate of Sec. 4.4; the
gates are per token and per head (the paper's optional chunk-constant gates, a speed-up, are not
used); the read-out uses M_t (after the token's own update), as the LMM layer and TTT do. The
Memory as a Layer (MAL) variant is not implemented (it is NeuralMemory followed by sliding-window
attention, two layers already here). The public reading followed for the details the paper
leaves open (lucidrains/titans-pytorch): a bias-free MLP memory with its initial weights learned,
theta bounded by a maximum learning rate, the memory output gating the attention output through
a sigmoid.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...errors import ParameterError, ShapeError
from ...functional.local.sliding_window import sliding_window_attention
from ...registry import DecodingState
from .._checks import check_tokens, heads_divide, merge_heads, positive_int, split_heads
from .._registry import ModuleExample, register_module

__all__ = [
    "NeuralMemory",
    "TitansMAG",
    "TitansMAC",
    "TitansState",
    "memory_forward",
    "memory_gradients",
    "neural_memory_recurrent",
    "neural_memory_chunked",
]

Weights = tuple[Tensor, ...]


# --------------------------------------------------------------------------------------------
# the memory MLP: forward and per-token gradients of the associative loss (explicit backprop)
# --------------------------------------------------------------------------------------------
def _silu_grad(h: Tensor) -> Tensor:
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))


def memory_forward(weights: Sequence[Tensor], z: Tensor) -> Tensor:
    """M(z) for an MLP of bias-free layers ``weights`` (each (B, H, out, in)), SiLU between them:
    z (B, H, T, in) -> (B, H, T, out). The retrieval of Eq. 15."""
    for i, w in enumerate(weights):
        z = z @ w.transpose(-1, -2)
        if i < len(weights) - 1:
            z = F.silu(z)
    return z


def memory_gradients(weights: Sequence[Tensor], k: Tensor, v: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """The per-token gradients of Eq. 12, l = ||M(k_t) - v_t||^2, at ``weights``, in factored form.

    Returns ``(inputs, deltas)``: for layer l, ``inputs[l]`` (B, H, T, in_l) is the layer's input
    and ``deltas[l]`` (B, H, T, out_l) the loss's gradient at the layer's output, so token t's
    gradient for that layer is the outer product ``deltas[l][t] inputs[l][t]^T``. Explicit
    backpropagation, differentiable for the outer loss."""
    inputs, pre = [], []
    z = k
    for i, w in enumerate(weights):
        inputs.append(z)
        h = z @ w.transpose(-1, -2)
        pre.append(h)
        z = F.silu(h) if i < len(weights) - 1 else h
    delta = 2 * (z - v)
    deltas = [delta]
    for i in range(len(weights) - 1, 0, -1):
        delta = (delta @ weights[i]) * _silu_grad(pre[i - 1])
        deltas.append(delta)
    return inputs, deltas[::-1]


# --------------------------------------------------------------------------------------------
# the token recurrence (Eq. 13-14): the readable reference
# --------------------------------------------------------------------------------------------
def _zeros_like(weights: Sequence[Tensor]) -> Weights:
    return tuple(torch.zeros_like(w) for w in weights)


def neural_memory_recurrent(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum: Tensor, decay: Tensor,
    weights: Sequence[Tensor], surprise: Optional[Sequence[Tensor]] = None,
) -> tuple[Tensor, Weights, Weights]:
    """Titans' memory token by token (Eq. 12-15): the reference of :func:`neural_memory_chunked`.

    Args:
        q, k: (B, H, N, d); v: (B, H, N, d_out). lr, momentum, decay: theta_t, eta_t, alpha_t (B, H, N).
        weights: M_0, the MLP's layers, each (B, H, out, in). surprise: S_0 (default zeros).

    Returns ``(y, M_N, S_N)``, y (B, H, N, d_out) with y_t = M_t(q_t)."""
    weights = tuple(weights)
    surprise = _zeros_like(weights) if surprise is None else tuple(surprise)
    out = []
    for t in range(q.shape[2]):
        inputs, deltas = memory_gradients(weights, k[:, :, t : t + 1], v[:, :, t : t + 1])
        grads = [d.transpose(-1, -2) @ x for d, x in zip(deltas, inputs)]  # (B, H, out, in)
        th, et, al = (g[:, :, t, None, None] for g in (lr, momentum, decay))
        surprise = tuple(et * s - th * g for s, g in zip(surprise, grads))  # Eq. 14
        weights = tuple((1 - al) * w + s for w, s in zip(weights, surprise))  # Eq. 13
        out.append(memory_forward(weights, q[:, :, t : t + 1]))  # Eq. 15
    return torch.cat(out, dim=2), weights, surprise


# --------------------------------------------------------------------------------------------
# the chunked form (Sec. 3.2): mini-batch gradient descent inside chunks, dual-form read-out
# --------------------------------------------------------------------------------------------
def _segment_decays(log_gate: Tensor) -> tuple[Tensor, Tensor]:
    """From log gates l_1..l_T (B, H, T): ``(P, P0)`` with P[t, s] = exp(sum_{j=s+1..t} l_j) for
    s <= t (0 above the diagonal, 1 on it) and P0[t] = exp(sum_{j<=t} l_j). Segment sums by a
    masked cumulative sum (no difference of two long sums, so no cancellation)."""
    t = log_gate.shape[-1]
    padded = F.pad(log_gate, (1, 0))  # index 0: the chunk's start
    rep = padded.unsqueeze(-1).expand(*padded.shape, t + 1)  # rep[..., j, s] = l_j
    strict = torch.ones(t + 1, t + 1, dtype=torch.bool, device=log_gate.device).tril(-1)
    sums = rep.masked_fill(~strict, 0).cumsum(-2)  # sums[..., t, s] = sum_{s<j<=t} l_j
    keep = torch.ones(t + 1, t + 1, dtype=torch.bool, device=log_gate.device).tril()
    full = sums.masked_fill(~keep, float("-inf")).exp()
    return full[..., 1:, 1:], full[..., 1:, 0]


def _log_gates(momentum: Tensor, decay: Tensor) -> tuple[Tensor, Tensor]:
    tiny = torch.finfo(momentum.dtype).tiny
    return torch.log((1 - decay).clamp_min(tiny)), torch.log(momentum.clamp_min(tiny))


def _chunk(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum: Tensor, decay: Tensor, weights: Weights, surprise: Weights, end_state: bool
) -> tuple[Tensor, Optional[Weights], Optional[Weights]]:
    """One chunk from (M_0, S_0) = (weights, surprise): the read-outs M_t(q_t) of its last
    ``q.shape[2]`` tokens (a decoding step reads only its new ones) and, if ``end_state``,
    (M_T, S_T) after its last token."""
    inputs, deltas = memory_gradients(weights, k, v)  # every gradient at M_0 (Sec. 3.2)
    log_keep, log_mom = _log_gates(momentum, decay)
    d_mat, a = _segment_decays(log_keep)  # D[t, s] = prod_{s<j<=t} (1 - alpha_j), A_t
    f_mat, e = _segment_decays(log_mom)  # F[s, i] = prod_{i<j<=s} eta_j, E_s
    c = (d_mat @ f_mat) * lr.unsqueeze(-2)  # C[t, i] = theta_i sum_s D[t, s] F[s, i]
    g = (d_mat @ e.unsqueeze(-1)).squeeze(-1)  # g_t = sum_s D[t, s] E_s
    rows = slice(k.shape[2] - q.shape[2], None)  # the tokens read out
    a_q, g_q, c_q = a[..., rows, None], g[..., rows, None], c[..., rows, :]
    z = q
    for i, (w, s, x, dl) in enumerate(zip(weights, surprise, inputs, deltas)):
        h = a_q * (z @ w.transpose(-1, -2)) + g_q * (z @ s.transpose(-1, -2)) - (c_q * (z @ x.transpose(-1, -2))) @ dl
        z = F.silu(h) if i < len(weights) - 1 else h
    if not end_state:
        return z, None, None
    c_end, a_end, g_end = c[..., -1, :], a[..., -1, None, None], g[..., -1, None, None]
    f_end = f_mat[..., -1, :] * lr  # theta_i prod_{i<j<=T} eta_j
    e_end = e[..., -1, None, None]
    new_w, new_s = [], []
    for w, s, x, dl in zip(weights, surprise, inputs, deltas):
        new_w.append(a_end * w + g_end * s - (dl * c_end.unsqueeze(-1)).transpose(-1, -2) @ x)  # M_T
        new_s.append(e_end * s - (dl * f_end.unsqueeze(-1)).transpose(-1, -2) @ x)  # S_T
    return z, tuple(new_w), tuple(new_s)


def _scan(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum: Tensor, decay: Tensor,
    weights: Weights, surprise: Weights, chunk_size: int, commit_partial: bool,
) -> tuple[Tensor, Weights, Weights, int]:
    """Chunks of ``chunk_size`` tokens from the first; returns the read-outs of the last
    ``q.shape[2]`` tokens (queries of the earlier ones are not needed), the state after the last
    full chunk (or after every token if ``commit_partial``) and how many tokens it absorbed."""
    n = k.shape[2]
    first = n - q.shape[2]  # the first token read out
    outs, absorbed = [], 0
    for t0 in range(0, n, chunk_size):
        t1 = min(t0 + chunk_size, n)
        full = t1 - t0 == chunk_size
        y, new_w, new_s = _chunk(
            q[:, :, max(t0, first) - first : t1 - first],
            *(t[:, :, t0:t1] for t in (k, v, lr, momentum, decay)),
            weights, surprise, end_state=full or commit_partial,
        )
        outs.append(y)
        if new_w is not None:
            weights, surprise, absorbed = new_w, new_s, t1
    return torch.cat(outs, dim=2), weights, surprise, absorbed


def neural_memory_chunked(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum: Tensor, decay: Tensor,
    weights: Sequence[Tensor], surprise: Optional[Sequence[Tensor]] = None, *, chunk_size: int = 64,
) -> tuple[Tensor, Weights, Weights]:
    """Titans' memory in chunks (Sec. 3.2): same arguments and returns as :func:`neural_memory_recurrent`.

    Inside each chunk of ``chunk_size`` tokens the gradients are taken at the chunk's starting
    weights (mini-batch gradient descent), then Eq. 13-14 are unrolled in closed form (see the
    module docstring); ``chunk_size=1`` is the recurrence. The returned state is after the last token."""
    positive_int("neural_memory_chunked", "chunk_size", chunk_size)
    weights = tuple(weights)
    surprise = _zeros_like(weights) if surprise is None else tuple(surprise)
    y, w, s, _ = _scan(q, k, v, lr, momentum, decay, weights, surprise, chunk_size, commit_partial=True)
    return y, w, s


# --------------------------------------------------------------------------------------------
# decoding state
# --------------------------------------------------------------------------------------------
#: the state's fields holding one tensor (or None)
_SINGLE = ("pending_k", "pending_v", "pending_gates", "attn_k", "attn_v", "segment")


@dataclass
class TitansState(DecodingState):
    """Decoding state of :class:`NeuralMemory` / :class:`TitansMAG`, one value per step (never changed in place).

    ``weights`` / ``surprise``: M and S (per layer, (B, H, out, in)) at the last chunk boundary;
    ``pending``: k, v (B, H, P, d) and the gates theta, eta, alpha (B, H, P, 3) of the P < chunk
    tokens seen since (their gradients are taken at the boundary's weights when the chunk completes);
    ``attn_k`` / ``attn_v``: TitansMAG's attention cache, the persistent tokens and the last
    ``window`` keys and values (None otherwise); ``segment``: TitansMAC's tokens (B, P, C) of the
    current segment (None otherwise); ``seen``: tokens seen, persistent ones included."""

    seen: int = 0
    weights: Weights = ()
    surprise: Weights = ()
    pending_k: Optional[Tensor] = None
    pending_v: Optional[Tensor] = None
    pending_gates: Optional[Tensor] = None
    attn_k: Optional[Tensor] = None
    attn_v: Optional[Tensor] = None
    segment: Optional[Tensor] = None

    def tensors(self) -> dict[str, Tensor]:
        out = {f"weights{i}": w for i, w in enumerate(self.weights)}
        out.update({f"surprise{i}": s for i, s in enumerate(self.surprise)})
        for name in _SINGLE:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def clone(self) -> "TitansState":
        single = {
            name: getattr(self, name).clone()
            for name in _SINGLE
            if getattr(self, name) is not None
        }
        return dataclasses.replace(
            self, weights=tuple(w.clone() for w in self.weights), surprise=tuple(s.clone() for s in self.surprise), **single
        )


def _append(old: Optional[Tensor], new: Tensor) -> Tensor:
    return new if old is None else torch.cat((old, new), dim=2)


def _check_step(owner: str, x: Tensor, dim: int, state: TitansState) -> None:
    check_tokens(owner, x, dim)
    if not isinstance(state, TitansState) or not state.weights:
        raise ParameterError(f"{owner}: state: expected a TitansState from init_state, got {type(state).__name__}", argument="state")
    if x.shape[0] != state.weights[0].shape[0]:
        raise ShapeError(f"{owner}: x: expected batch {state.weights[0].shape[0]} like the state, got shape {tuple(x.shape)}", argument="x")


# --------------------------------------------------------------------------------------------
# the layers
# --------------------------------------------------------------------------------------------
@register_module(
    "F11",
    paper="Titans: Learning to Memorize at Test Time (Behrouz, Zhong & Mirrokni, arXiv 2501.00663, 2025)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8, chunk_size=64), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(dim=32, num_heads=2, chunk_size=4),
    ),
)
class NeuralMemory(nn.Module):
    """Titans' neural long-term memory as a layer: an MLP trained on each token's key/value at test time.

    Per head: q, k, v = SiLU(x W_Q), SiLU(x W_K), SiLU(x W_V) (q, k l2-normalised); the memory M
    (``depth`` bias-free layers, hidden width ``expansion * d``) takes one momentum-and-decay step
    of gradient descent on ||M(k_t) - v_t||^2 per token (Eq. 12-14, data-dependent theta, eta,
    alpha), in chunks of ``chunk_size`` tokens (Sec. 3.2); y_t = M_t(q_t) (Eq. 15), the heads
    merged, RMS-normalised and projected. Causal; (B, N, C) -> (B, N, C). Cost O(N C d_h) plus
    O(N chunk_size (C + H d_h)); decoding state O(H d d_h) whatever the length. See the module
    docstring for the equations and what is simplified.

    Args:
        dim: channels C. num_heads: H, each of width d = C / H.
        depth: layers of the memory MLP (1: a matrix, the paper's linear memory; paper: 1 to 4).
        expansion: hidden width of the MLP, d_h = expansion * d (depth >= 2).
        chunk_size: b, tokens per mini-batch of the inner gradient descent (1: the exact recurrence).
        max_lr: theta_t = max_lr * sigmoid(x_t w_theta).

    Example::

        >>> mem = NeuralMemory(512, num_heads=8, chunk_size=64)
        >>> y = mem(torch.randn(2, 1024, 512))                 # (2, 1024, 512)
        >>> state = mem.init_state(2)
        >>> y1, state = mem.step(torch.randn(2, 1, 512), state)  # one token at a time
    """

    def __init__(self, dim: int, num_heads: int = 4, *, depth: int = 2, expansion: int = 2, chunk_size: int = 64, max_lr: float = 0.1):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.head_dim = heads_divide(name, dim, num_heads)
        self.num_heads = num_heads
        self.depth = positive_int(name, "depth", depth)
        self.expansion = positive_int(name, "expansion", expansion)
        self.chunk_size = positive_int(name, "chunk_size", chunk_size)
        if not isinstance(max_lr, (int, float)) or isinstance(max_lr, bool) or max_lr <= 0:
            raise ParameterError(f"{name}: max_lr: expected a positive number, got {max_lr!r}", argument="max_lr")
        self.max_lr = float(max_lr)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_gates = nn.Linear(dim, 3 * num_heads)  # theta, eta, alpha per head
        d, hidden = self.head_dim, self.expansion * self.head_dim
        widths = [d] + [hidden] * (depth - 1) + [d]
        self.memory_init = nn.ParameterList(
            nn.Parameter(torch.randn(num_heads, widths[i + 1], widths[i]) * widths[i] ** -0.5) for i in range(depth)
        )  # M_0, learned in the outer loop
        self.norm = nn.RMSNorm(dim)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    # the memory's inputs for tokens x: q, k, v (B, H, T, d) and the gates (B, H, T, 3)
    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        q, k, v = (split_heads(F.silu(t), self.num_heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = self.to_gates(x).view(x.shape[0], x.shape[1], 3, self.num_heads).permute(0, 3, 1, 2)
        gates = torch.stack((self.max_lr * torch.sigmoid(g[..., 0]), torch.sigmoid(g[..., 1]), torch.sigmoid(g[..., 2])), dim=-1)
        return q, k, v, gates

    def _initial(self, batch: int) -> Weights:
        return tuple(w.unsqueeze(0).expand(batch, *w.shape).clone() for w in self.memory_init)

    def _finish(self, y: Tensor) -> Tensor:
        return self.out_proj(self.norm(merge_heads(y)))

    def retrieve(self, x: Tensor, *, recurrent: bool = False) -> Tensor:
        """The memory's read-outs y_t = M_t(q_t), heads (B, H, N, d), before the norm and projection;
        ``recurrent=True`` runs the token recurrence (the reference) instead of the chunks."""
        check_tokens(type(self).__name__, x, self.dim)
        q, k, v, gates = self._inputs(x)
        weights = self._initial(x.shape[0])
        if recurrent:
            return neural_memory_recurrent(q, k, v, *gates.unbind(-1), weights)[0]
        return _scan(q, k, v, *gates.unbind(-1), weights, _zeros_like(weights), self.chunk_size, commit_partial=False)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self._finish(self.retrieve(x))

    # -- decoding ------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> TitansState:
        """The state before any token: M_0 for every sequence, S_0 = 0, nothing pending."""
        positive_int(type(self).__name__, "batch_size", batch_size)
        weights = self._initial(batch_size)
        return TitansState(weights=weights, surprise=_zeros_like(weights))

    def _memory_step(self, q: Tensor, k: Tensor, v: Tensor, gates: Tensor, state: TitansState) -> tuple[Tensor, TitansState]:
        """Read-outs (B, H, T, d) of T new tokens and the state after them (chunks aligned to the first token)."""
        k_all, v_all, g_all = _append(state.pending_k, k), _append(state.pending_v, v), _append(state.pending_gates, gates)
        y, weights, surprise, absorbed = _scan(
            q, k_all, v_all, *g_all.unbind(-1), state.weights, state.surprise, self.chunk_size, commit_partial=False
        )
        pending = [t[:, :, absorbed:] if t.shape[2] > absorbed else None for t in (k_all, v_all, g_all)]
        new = dataclasses.replace(
            state, seen=state.seen + q.shape[2], weights=weights, surprise=surprise,
            pending_k=pending[0], pending_v=pending[1], pending_gates=pending[2],
        )
        return y, new

    def step(self, x: Tensor, state: TitansState) -> tuple[Tensor, TitansState]:
        """Outputs (B, T, C) of T >= 1 new tokens and the new state; any split equals :meth:`forward`."""
        _check_step(type(self).__name__, x, self.dim, state)
        y, new = self._memory_step(*self._inputs(x), state)
        return self._finish(y), new

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, depth={self.depth}, expansion={self.expansion}, "
            f"chunk_size={self.chunk_size}, max_lr={self.max_lr}"
        )


@register_module(
    "F11",
    paper="Titans: Learning to Memorize at Test Time (Behrouz, Zhong & Mirrokni, arXiv 2501.00663, 2025)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8, window=256, chunk_size=64), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(dim=32, num_heads=2, window=5, num_persistent=2, chunk_size=4),
    ),
)
class TitansMAG(nn.Module):
    """Titans' Memory as a Gate: sliding-window attention gated by the neural long-term memory (Sec. 4.2).

    x~ = [p_1 .. p_Np] || x (Eq. 26, learnable persistent tokens); y = SW-Attn*(x~), causal
    softmax attention over the last ``window`` tokens plus the persistent ones, always seen
    (Eq. 27, :func:`~attnzoo.functional.sliding_window_attention` with ``sinks=Np``);
    o = RMSNorm(y) (*) sigmoid(M(x~)) with M a :class:`NeuralMemory` over the same x~ (Eq. 28);
    the output projection of o at the real tokens. Causal; (B, N, C) -> (B, N, C). Cost
    O(N (window + Np) C) for the attention plus the memory's (see :class:`NeuralMemory`);
    decoding state: Np + window keys and values plus the memory's weights, whatever the length.

    Args:
        dim: channels C. num_heads: H (attention and memory).
        window: keys before each query that its attention sees (its own included: window + 1).
        num_persistent: Np, persistent memory tokens (0: none).
        depth, expansion, chunk_size, max_lr: of the memory (:class:`NeuralMemory`).

    Example::

        >>> layer = TitansMAG(512, num_heads=8, window=256)
        >>> y = layer(torch.randn(2, 1024, 512))                 # (2, 1024, 512)
        >>> state = layer.init_state(2)                           # the persistent tokens absorbed
        >>> y1, state = layer.step(torch.randn(2, 1, 512), state)
    """

    def __init__(
        self, dim: int, num_heads: int = 4, *, window: int = 64, num_persistent: int = 4,
        depth: int = 2, expansion: int = 2, chunk_size: int = 64, max_lr: float = 0.1,
    ):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.head_dim = heads_divide(name, dim, num_heads)
        self.num_heads = num_heads
        self.window = positive_int(name, "window", window)
        if isinstance(num_persistent, bool) or not isinstance(num_persistent, int) or num_persistent < 0:
            raise ParameterError(f"{name}: num_persistent: expected a non-negative int, got {num_persistent!r}", argument="num_persistent")
        self.num_persistent = num_persistent
        self.persistent = nn.Parameter(torch.randn(num_persistent, dim) * 0.02)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_norm = nn.RMSNorm(dim)
        self.memory = NeuralMemory(dim, num_heads, depth=depth, expansion=expansion, chunk_size=chunk_size, max_lr=max_lr)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def _with_persistent(self, x: Tensor) -> Tensor:
        return torch.cat((self.persistent.to(x.dtype).expand(x.shape[0], -1, -1), x), dim=1)

    def _attention(self, x: Tensor, cache_k: Optional[Tensor] = None, cache_v: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        """SW-Attn* of the tokens x after the cached keys: outputs (B, H, T, d) and all keys, values."""
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if cache_k is not None:
            k, v = torch.cat((cache_k, k), dim=2), torch.cat((cache_v, v), dim=2)
        out = sliding_window_attention(q, k, v, window=(self.window, 0), causal=True, sinks=self.num_persistent)
        return out, k, v

    def _gate(self, attn: Tensor, memory: Tensor) -> Tensor:
        return self.out_proj(self.attn_norm(merge_heads(attn)) * torch.sigmoid(memory))

    def forward(self, x: Tensor) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        xt = self._with_persistent(x)
        attn = self._attention(xt)[0]
        mem = self.memory(xt)
        p = self.num_persistent
        return self._gate(attn[:, :, p:], mem[:, p:])

    # -- decoding ------------------------------------------------------------------------------
    def _advance(self, xt: Tensor, state: TitansState) -> tuple[Tensor, TitansState]:
        attn, k, v = self._attention(xt, state.attn_k, state.attn_v)
        p, keep = self.num_persistent, self.num_persistent + self.window
        if k.shape[2] > keep:  # drop what no later query sees: keep the sinks and the last `window`
            k, v = torch.cat((k[:, :, :p], k[:, :, -self.window :]), dim=2), torch.cat((v[:, :, :p], v[:, :, -self.window :]), dim=2)
        mem_heads, new = self.memory._memory_step(*self.memory._inputs(xt), state)
        out = self._gate(attn, self.memory._finish(mem_heads))
        return out, dataclasses.replace(new, attn_k=k, attn_v=v)

    def init_state(self, batch_size: int) -> TitansState:
        """The state after the persistent tokens (absorbed by the attention cache and the memory)."""
        state = self.memory.init_state(batch_size)
        if self.num_persistent == 0:
            return state
        p = self.persistent.unsqueeze(0).expand(batch_size, -1, -1)
        return self._advance(p, state)[1]

    def step(self, x: Tensor, state: TitansState) -> tuple[Tensor, TitansState]:
        """Outputs (B, T, C) of T >= 1 new tokens and the new state; any split equals :meth:`forward`."""
        _check_step(type(self).__name__, x, self.dim, state)
        return self._advance(x, state)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, window={self.window}, num_persistent={self.num_persistent}"


@register_module(
    "F11",
    paper="Titans: Learning to Memorize at Test Time (Behrouz, Zhong & Mirrokni, arXiv 2501.00663, 2025)",
    layout="(B, N, C)",
    example=ModuleExample(
        dict(dim=512, num_heads=8, segment_len=128), inputs=[(1, 1024, 512)], test_inputs=[(2, 17, 32)],
        test_kwargs=dict(dim=32, num_heads=2, segment_len=4, num_persistent=2),
    ),
)
class TitansMAC(nn.Module):
    """Titans' Memory as a Context: each segment attends to the memory's retrieval for it (Sec. 4.1).

    The sequence is cut into segments S^(t) of ``segment_len`` tokens; for each, in order:

        h_t = M*_{t-1}(q_t),  q_t = S^(t) W_Q              retrieval from the memory before the segment (Eq. 21)
        S~^(t) = [p_1 .. p_Np] || h_t || S^(t)             persistent tokens, retrieved context, the segment (Eq. 22)
        y_t = Attn(S~^(t))                                 softmax attention of the segment's tokens (Eq. 23)
        M_t = M_{t-1}(y_t)                                 the memory learns from y_t (Eq. 24, chunk = segment)
        o_t = RMSNorm(y_t) (*) sigmoid(M*_t(y_t))           gated by the updated memory's read-out (Eq. 25)

    then the output projection. M is a :class:`NeuralMemory` whose chunk is the segment, so its
    gradients inside a segment are taken at M_{t-1} (Sec. 3.2) and its read-out of token i uses the
    weights after token i. Causal: token i of a segment attends to the persistent tokens, to
    h_j and to the segment's tokens j <= i (the paper's figure lets the whole retrieved h_t be
    seen; h_j is made from token j's query, so this reading keeps the layer causal). Cost per
    segment O(C_s (Np + 2 C_s) C) for attention plus the memory's; decoding state: the memory's
    plus the current segment's tokens (< ``segment_len``), whatever the length.

    Args:
        dim: channels C. num_heads: H (attention and memory).
        segment_len: C_s, tokens per segment (and the memory's chunk).
        num_persistent: Np, persistent memory tokens (0: none).
        depth, expansion, max_lr: of the memory (:class:`NeuralMemory`).

    Example::

        >>> layer = TitansMAC(512, num_heads=8, segment_len=128)
        >>> y = layer(torch.randn(2, 1024, 512))                 # (2, 1024, 512)
        >>> state = layer.init_state(2)
        >>> y1, state = layer.step(torch.randn(2, 1, 512), state)
    """

    def __init__(
        self, dim: int, num_heads: int = 4, *, segment_len: int = 128, num_persistent: int = 4,
        depth: int = 2, expansion: int = 2, max_lr: float = 0.1,
    ):
        super().__init__()
        name = type(self).__name__
        self.dim = positive_int(name, "dim", dim)
        self.head_dim = heads_divide(name, dim, num_heads)
        self.num_heads = num_heads
        self.segment_len = positive_int(name, "segment_len", segment_len)
        if isinstance(num_persistent, bool) or not isinstance(num_persistent, int) or num_persistent < 0:
            raise ParameterError(f"{name}: num_persistent: expected a non-negative int, got {num_persistent!r}", argument="num_persistent")
        self.num_persistent = num_persistent
        self.persistent = nn.Parameter(torch.randn(num_persistent, dim) * 0.02)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_norm = nn.RMSNorm(dim)
        self.memory = NeuralMemory(dim, num_heads, depth=depth, expansion=expansion, chunk_size=segment_len, max_lr=max_lr)
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def _piece(self, x: Tensor, state: TitansState) -> tuple[Tensor, TitansState]:
        """Tokens x (B, T, C) that stay inside the current segment: their outputs and the new state."""
        mem = self.memory
        seg = x if state.segment is None else torch.cat((state.segment, x), dim=1)
        b, c, t = x.shape[0], seg.shape[1], x.shape[1]
        q_mem = mem._inputs(seg)[0]  # the memory's queries of the segment (Eq. 21)
        h = mem._finish(memory_forward(state.weights, q_mem))  # M*_{t-1}: the weights at the segment's start
        ctx = torch.cat((self.persistent.to(x.dtype).expand(b, -1, -1), h, seg), dim=1)  # Eq. 22
        _, k, v = (split_heads(z, self.num_heads) for z in self.qkv(ctx).chunk(3, dim=-1))
        q = split_heads(self.qkv(x).chunk(3, dim=-1)[0], self.num_heads)
        i = torch.arange(c - t, c, device=x.device)[:, None]  # the new tokens' places in the segment
        j = torch.arange(c, device=x.device)[None, :]
        causal = j <= i
        mask = torch.cat((torch.ones(t, self.num_persistent, dtype=torch.bool, device=x.device), causal, causal), dim=1)
        y = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))  # Eq. 23
        mem_heads, new = mem._memory_step(*mem._inputs(y), state)  # Eq. 24, read-outs M*_t(y) per token
        out = self.out_proj(self.attn_norm(y) * torch.sigmoid(mem._finish(mem_heads)))  # Eq. 25
        return out, dataclasses.replace(new, segment=None if c == self.segment_len else seg)

    def _advance(self, x: Tensor, state: TitansState) -> tuple[Tensor, TitansState]:
        outs, t0 = [], 0
        while t0 < x.shape[1]:
            room = self.segment_len - (0 if state.segment is None else state.segment.shape[1])
            out, state = self._piece(x[:, t0 : t0 + room], state)
            outs.append(out)
            t0 += room
        return torch.cat(outs, dim=1), state

    def forward(self, x: Tensor) -> Tensor:
        check_tokens(type(self).__name__, x, self.dim)
        return self._advance(x, self.init_state(x.shape[0]))[0]

    def init_state(self, batch_size: int) -> TitansState:
        """The memory's initial state, no segment begun."""
        return self.memory.init_state(batch_size)

    def step(self, x: Tensor, state: TitansState) -> tuple[Tensor, TitansState]:
        """Outputs (B, T, C) of T >= 1 new tokens and the new state; any split equals :meth:`forward`."""
        _check_step(type(self).__name__, x, self.dim, state)
        return self._advance(x, state)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, segment_len={self.segment_len}, num_persistent={self.num_persistent}"
