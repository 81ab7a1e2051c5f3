"""HyperAttention (S5, ICLR 2024): the angular LSH against a written-out Gray code; an oracle written
from the paper's algorithms (one query at a time for sortLSH + sampling, the causal recursion with
the code's LSE merge) against both backends for the same seed; a block covering every key is
softmax; the estimator's error falls as the sample grows; determinism; bad inputs."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.errors import ParameterError
from attnzoo.functional.sparse import hyper_attention
from attnzoo.functional.sparse.hyper import gray_code, lsh_buckets

BACKENDS = ("reference", "blocked")


def _qkv(b, h, nq, nk=None, d=8, dv=6, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    nk = nq if nk is None else nk
    return (torch.randn(b, h, nq, d, generator=gen, dtype=dtype), torch.randn(b, h, nk, d, generator=gen, dtype=dtype),
            torch.randn(b, h, nk, dv, generator=gen, dtype=dtype))


# --------------------------------------------------------------------------------------------
# the hash
# --------------------------------------------------------------------------------------------
def test_gray_code_is_the_written_out_sequence():
    # the reflected binary Gray code of 0..15, written out
    table = [0, 1, 3, 2, 6, 7, 5, 4, 12, 13, 15, 14, 10, 11, 9, 8]
    assert gray_code(torch.arange(16)).tolist() == table
    # neighbours differ in exactly one bit (why the code orders buckets this way)
    assert all(bin(a ^ b).count("1") == 1 for a, b in zip(table, table[1:]))


def test_lsh_bucket_is_the_gray_code_of_the_sign_bits():
    projections = torch.eye(3, dtype=torch.float64)  # w_t = e_t: bit t is the sign of coordinate t
    x = torch.tensor([[1.0, 2.0, 3.0], [1.0, -2.0, 3.0], [-1.0, -2.0, 3.0], [-1.0, -2.0, -3.0], [1.0, 2.0, -3.0]])
    # sign bits (bit 0 first): 111 = 7, 101 = 5, 100 = 4, 000 = 0, 011 = 3; Gray codes: 4, 7, 6, 0, 2
    assert lsh_buckets(x, projections).tolist() == [4, 7, 6, 0, 2]


# --------------------------------------------------------------------------------------------
# an oracle from the paper
# --------------------------------------------------------------------------------------------
class _Oracle:
    """Alg. 1-4 of the paper, drawing from one generator in the documented order: the projections,
    then each call of the causal recursion (top half, bottom half, then the off-diagonal block)."""

    def __init__(self, d, r, block, m, min_len, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(d, r, generator=self.gen, dtype=torch.float64)
        self.block, self.m, self.min_len = block, m, min_len

    def bucket(self, x):
        code = sum(int(float(x.detach() @ self.w[:, t]) > 0) << t for t in range(self.w.shape[1]))
        return code ^ (code >> 1)

    def exact(self, Q, K, V, causal):
        s = Q @ K.mT / math.sqrt(Q.shape[-1])
        if causal:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), -math.inf)
        return torch.softmax(s, -1) @ V, torch.logsumexp(s, -1)

    def non_causal(self, Q, K, V):  # (B, H, n, D) each
        b, h, nq, _ = Q.shape
        nk = K.shape[2]
        if self.min_len > nq:
            return self.exact(Q, K, V, False)
        n_blocks = math.ceil(nk / self.block)
        q_block = math.ceil(nq / n_blocks)
        use_samples = self.m > 0 and nq > q_block and nk > self.block
        drawn = torch.randint(nk, (b, h, self.m), generator=self.gen) if use_samples else None
        out = torch.zeros(b, h, nq, V.shape[-1], dtype=Q.dtype)
        lse = torch.zeros(b, h, nq, dtype=Q.dtype)
        for bi in range(b):
            for hi in range(h):
                q_sorted = sorted(range(nq), key=lambda i: (self.bucket(Q[bi, hi, i]), i))
                k_sorted = sorted(range(nk), key=lambda j: (self.bucket(K[bi, hi, j]), j))
                for pos, i in enumerate(q_sorted):
                    blk = pos // q_block
                    terms = [(1.0, j) for j in k_sorted[blk * self.block : (blk + 1) * self.block]]
                    if drawn is not None:
                        terms += [(nk / self.m, k_sorted[t]) for t in drawn[bi, hi].tolist() if t // self.block != blk]
                    logits = torch.stack([math.log(w) + Q[bi, hi, i] @ K[bi, hi, j] / math.sqrt(Q.shape[-1]) for w, j in terms])
                    p = torch.softmax(logits, 0)
                    out[bi, hi, i] = sum(p[t] * V[bi, hi, j] for t, (_, j) in enumerate(terms))
                    lse[bi, hi, i] = torch.logsumexp(logits, 0)
        return out, lse

    def causal(self, Q, K, V):
        n = Q.shape[2]
        if n <= self.min_len:
            return self.exact(Q, K, V, True)
        half = math.ceil(n / 2)
        up, lse_up = self.causal(Q[:, :, :half], K[:, :, :half], V[:, :, :half])
        down, lse_down = self.causal(Q[:, :, half:], K[:, :, half:], V[:, :, half:])
        off, lse_off = self.non_causal(Q[:, :, half:], K[:, :, :half], V[:, :, :half])
        c = 1 / (1 + torch.exp(lse_off - lse_down))  # the code's add_self_attentions
        merged = c[..., None] * down + (1 - c[..., None]) * off
        return torch.cat([up, merged], 2), torch.cat([lse_up, lse_down - torch.log(c)], 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq, nk, block, m, r", [(30, 30, 4, 7, 3), (25, 40, 6, 11, 2), (33, 17, 5, 3, 4), (20, 20, 3, 0, 3)])
def test_non_causal_matches_the_paper_query_by_query(backend, nq, nk, block, m, r):
    q, k, v = _qkv(2, 2, nq, nk, seed=nq + nk)
    want, want_lse = _Oracle(8, r, block, m, 1, seed=5).non_causal(q, k, v)
    got, lse = hyper_attention(q, k, v, lsh_num_projs=r, block_size=block, sample_size=m, min_seq_len=1, seed=5, return_lse=True, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, block, m, min_len", [(37, 4, 5, 3), (64, 6, 9, 8), (19, 2, 4, 1)])
def test_causal_recursion_matches_the_paper(backend, n, block, m, min_len):
    q, k, v = _qkv(1, 2, n, seed=n)
    want, want_lse = _Oracle(8, 3, block, m, min_len, seed=9).causal(q, k, v)
    got, lse = hyper_attention(q, k, v, lsh_num_projs=3, block_size=block, sample_size=m, min_seq_len=min_len, seed=9, causal=True, return_lse=True, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_a_block_covering_every_key_is_softmax(backend, causal):
    q, k, v = _qkv(2, 2, 70, seed=3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    got = hyper_attention(q, k, v, block_size=70, sample_size=16, min_seq_len=2, causal=causal, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_estimator_error_falls_as_the_sample_grows():
    """Relative error against softmax at N = 1024 (blocks of 64, min_seq_len 1, seed 0), measured:
    about 6.2, 3.5, 1.7, 0.91, 0.43 for m = 16, 64, 256, 1024, 4096 (~ 1 / sqrt(m)); asserted with margin."""
    q, k, v = _qkv(1, 2, 1024, d=32, dv=32, seed=0)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024, 4096):
        out = hyper_attention(q, k, v, block_size=64, sample_size=m, min_seq_len=1, seed=0, backend="blocked")
        errors.append(float((out - exact).norm() / exact.norm()))
    assert all(later < 0.75 * earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.15 * errors[0], errors


def test_same_seed_same_result_other_seed_other_result():
    q, k, v = _qkv(1, 2, 200, seed=1)
    kw = dict(block_size=16, sample_size=32, min_seq_len=1, causal=True)
    a, b = hyper_attention(q, k, v, seed=3, **kw), hyper_attention(q, k, v, seed=3, **kw)
    assert torch.equal(a, b)
    assert not torch.allclose(a, hyper_attention(q, k, v, seed=4, **kw))


def test_gradients_of_the_blocked_path_match_the_oracle():
    q, k, v = _qkv(1, 1, 24, seed=2)
    weight = torch.randn(1, 1, 24, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fast = [t.clone().requires_grad_() for t in (q, k, v)]
    (hyper_attention(*fast, lsh_num_projs=3, block_size=4, sample_size=6, min_seq_len=5, seed=1, causal=True, backend="blocked") * weight).sum().backward()
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    (_Oracle(8, 3, 4, 6, 5, seed=1).causal(*ref)[0] * weight).sum().backward()
    for got, want in zip(fast, ref):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-9, rtol=1e-8)


def test_bad_inputs_name_the_argument():
    q, k, v = _qkv(1, 1, 10)
    for name, value in [("lsh_num_projs", 0), ("block_size", 0), ("sample_size", -1), ("min_seq_len", 0), ("seed", -1), ("seed", 1.5)]:
        with pytest.raises(ParameterError) as err:
            hyper_attention(q, k, v, **{name: value})
        assert err.value.argument == name
    with pytest.raises(ParameterError) as err:
        hyper_attention(q, k, v, key_padding_mask=torch.zeros(1, 10, dtype=torch.bool))
    assert err.value.argument == "key_padding_mask" and "sample" in str(err.value)
    with pytest.raises(ParameterError) as err:
        hyper_attention(q, k[:, :, :7], v[:, :, :7], causal=True)
    assert err.value.argument == "causal"


def test_sparsity_knob():
    mech = attnzoo.get("hyper")
    q, k, v = _qkv(1, 1, 64)
    p = mech.describe(q, k, v)
    torch.testing.assert_close(mech(q, k, v, **mech.sparsity_params(p, 1.0)), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    part = mech.sparsity_params(p, 0.25)
    assert part["block_size"] + part["sample_size"] == 16
