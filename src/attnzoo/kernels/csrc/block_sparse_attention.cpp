// Block-sparse FlashAttention-2 on CPU: softmax attention over the (query block, key block)
// pairs a plan lists, forward and backward, no N x N tensor.
//
// The plan is CSR over 64 x 64 blocks: for pattern (b, h) and query block i, the key blocks
// kv_block[ptr[i] : ptr[i + 1]] (ascending), each with mask_id -1 (every pair inside) or the
// index of its element mask: 64 words, bit c of word r = query r of the block may see key c.
// A plan may be shared by every batch entry and head (Pb = Ph = 1) or given per head (Ph = H)
// and per batch entry (Pb = B).
//
//   forward (FA2, Dao 2023, Algorithm 1): per query block, runs of consecutive key blocks are
//     one GEMM each: S = scale Q K^T (+ key bias, element masks), online softmax (running max
//     m, sum l, rescaled accumulator), O += P V; out = O / l, lse = m + log l.
//   backward (Algorithm 2): P = exp(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - delta),
//     dQ += scale dS K, dK += scale dS^T Q with delta = rowsum(dO * O) - dlse. One task owns
//     a (batch, key head) pair (or a (batch, query head) pair with its own dK/dV rows, which
//     the caller sums over the group), so the scatter into dK/dV needs no atomics.
//
// GEMMs go to the BLAS PyTorch links (MKL's sgemm_ on x86 wheels: it picks AVX-512/AVX2 by
// itself); where no sgemm_ is linked, plain loops. The exponentials run 16 lanes wide with
// AVX-512 and 8 lanes otherwise (explicit GCC vector types; the build is -march=native).
// Layouts: q (B, H, Nq, D), k (B, Hk, Nk, D), v (B, Hk, Nk, Dv), float32, contiguous.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "simd_exp.h"

// Fortran BLAS, LP64 (MKL/OpenBLAS as linked by PyTorch). Weak: absent, the loops run instead.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

constexpr int kBlock = 64;   // query and key block: one 64-bit mask word per query row
constexpr int kMaxRun = 8;   // consecutive key blocks fused into one GEMM (512 keys)
constexpr int kRunKeys = kBlock * kMaxRun;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float fv __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t iv __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline fv loadv(const float* p) {
  fv v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void storev(float* p, fv v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(fv v) {
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

inline fv expv(fv x) { return exp_nonpositive<fv, iv>(x); }

// row[0..n) = exp(row - shift); returns the sum.
inline float exp_row(float* row, float shift, int n) {
  fv acc{};
  int c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const fv e = expv(loadv(row + c) - shift);
    storev(row + c, e);
    acc += e;
  }
  float sum = hsum(acc);
  for (; c < n; ++c) {
    fv x{};
    x[0] = row[c] - shift;
    row[c] = expv(x)[0];
    sum += row[c];
  }
  return sum;
}

// The row's max; a NaN anywhere makes it NaN (so the row's output is NaN, never a silent value).
inline float max_row(const float* row, int n) {
  fv mv = fv{} + kNegInf;
  iv nan{};
  int c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    const fv x = loadv(row + c);
    mv = x > mv ? x : mv;
    nan |= x != x;
  }
  float m = kNegInf;
  for (int j = 0; j < kLanes; ++j) m = std::max(m, mv[j]);
  for (int j = 0; j < kLanes; ++j)
    if (nan[j]) return std::numeric_limits<float>::quiet_NaN();
  for (; c < n; ++c) {
    if (row[c] != row[c]) return row[c];
    m = std::max(m, row[c]);
  }
  return m;
}

inline void scale_row(float* row, float alpha, int64_t n) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) storev(row + c, loadv(row + c) * alpha);
  for (; c < n; ++c) row[c] *= alpha;
}

// Row-major C (M x N, ldc) = alpha * op(A) op(B) + beta * C, op(A) M x K (A stored K x M when
// ta), op(B) K x N (B stored N x K when tb): the column-major BLAS call on the transposes.
void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
          float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_) {
    const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
    sgemm_(&opb, &opa, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
    return;
  }
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float acc = 0.f;
      for (int t = 0; t < K; ++t) acc += (ta ? A[t * lda + i] : A[i * lda + t]) * (tb ? B[j * ldb + t] : B[t * ldb + j]);
      C[i * ldc + j] = alpha * acc + (beta == 0.f ? 0.f : beta * C[i * ldc + j]);
    }
  }
}

struct Plan {
  const int32_t* ptr;       // (Pb, Ph, nqb + 1)
  const int32_t* kv_block;  // (nnz,)
  const int32_t* mask_id;   // (nnz,)
  const uint64_t* bits;     // (n_masks, 64)
  int64_t pb, ph, nqb;

  const int32_t* row_ptr(int64_t b, int64_t h) const {
    return ptr + ((pb == 1 ? 0 : b) * ph + (ph == 1 ? 0 : h)) * (nqb + 1);
  }
};

struct Dims {
  int64_t B, H, Hk, Nq, Nk, D, Dv;
  int64_t group() const { return H / Hk; }
};

// The run of consecutive key blocks starting at entry e (at most kMaxRun blocks).
inline int run_length(const Plan& plan, int64_t e, int64_t end) {
  int n = 1;
  while (e + n < end && n < kMaxRun && plan.kv_block[e + n] == plan.kv_block[e] + n) ++n;
  return n;
}

// Masked scores of one run: S = scale Q K^T, -inf where an element mask or the key bias says so.
void run_scores(const Plan& plan, int64_t e, int n_blocks, const float* Q, const float* K, const float* kbias,
                int rows, int keys, int D, float scale, float* S) {
  gemm(false, true, rows, keys, D, scale, Q, D, K, D, 0.f, S, keys);
  for (int t = 0; t < n_blocks; ++t) {
    const int32_t id = plan.mask_id[e + t];
    if (id < 0) continue;
    const uint64_t* words = plan.bits + static_cast<int64_t>(id) * kBlock;
    const int c0 = t * kBlock, cn = std::min(kBlock, keys - c0);
    for (int r = 0; r < rows; ++r) {
      const uint64_t w = words[r];
      if (w == ~0ull) continue;
      float* s = S + r * keys + c0;
      for (int c = 0; c < cn; ++c)
        if (!((w >> c) & 1ull)) s[c] = kNegInf;
    }
  }
  if (kbias) {
    for (int r = 0; r < rows; ++r) {
      float* s = S + r * keys;
      for (int c = 0; c < keys; ++c) s[c] += kbias[c];
    }
  }
}

void forward_impl(const Dims& d, const Plan& plan, const float* qp, const float* kp, const float* vp,
                  const float* kbp, float scale, float* op, float* lp) {
  const int64_t nqb = plan.nqb, group = d.group();
  at::parallel_for(0, d.B * d.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kBlock * kRunKeys), m(kBlock), l(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nqb, bh = task / nqb, h = bh % d.H, b = bh / d.H;
      const int rows = static_cast<int>(std::min<int64_t>(kBlock, d.Nq - qb * kBlock));
      const int64_t q_row = (b * d.H + h) * d.Nq + qb * kBlock;
      const float* Q = qp + q_row * d.D;
      float* O = op + q_row * d.Dv;
      const int64_t kv = b * d.Hk + h / group;
      const float* K = kp + kv * d.Nk * d.D;
      const float* V = vp + kv * d.Nk * d.Dv;
      const float* kb = kbp ? kbp + b * d.Nk : nullptr;
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(O, O + rows * d.Dv, 0.f);
      const int32_t* ptr = plan.row_ptr(b, h);
      for (int64_t e = ptr[qb], stop = ptr[qb + 1]; e < stop;) {
        const int n = run_length(plan, e, stop);
        const int64_t key0 = static_cast<int64_t>(plan.kv_block[e]) * kBlock;
        const int keys = static_cast<int>(std::min<int64_t>(n * kBlock, d.Nk - key0));
        run_scores(plan, e, n, Q, K + key0 * d.D, kb ? kb + key0 : nullptr, rows, keys, d.D, scale, S.data());
        for (int r = 0; r < rows; ++r) {
          float* s = S.data() + r * keys;
          const float mx = max_row(s, keys);
          const float m_new = mx != mx ? mx : std::max(m[r], mx);  // std::max would drop a NaN
          if (m_new == kNegInf) {  // nothing visible yet: weights 0, state unchanged
            std::fill(s, s + keys, 0.f);
            continue;
          }
          const float alpha = m[r] == kNegInf ? 0.f : std::exp(m[r] - m_new);
          l[r] = l[r] * alpha + exp_row(s, m_new, keys);
          if (alpha != 1.f) scale_row(O + r * d.Dv, alpha, d.Dv);
          m[r] = m_new;
        }
        gemm(false, false, rows, d.Dv, keys, 1.f, S.data(), keys, V + key0 * d.Dv, d.Dv, 1.f, O, d.Dv);
        e += n;
      }
      for (int r = 0; r < rows; ++r) {
        float* o = O + r * d.Dv;
        if (l[r] == 0.f) {  // no visible key: output 0, lse -inf
          std::fill(o, o + d.Dv, 0.f);
          lp[q_row + r] = kNegInf;
          continue;
        }
        scale_row(o, 1.f / l[r], d.Dv);
        lp[q_row + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

// owners: Hk (a task owns a key head and loops over its query heads) or H (a task owns one
// query head and writes dk/dv rows of its own, shape (B, H, Nk, .)).
void backward_impl(const Dims& d, const Plan& plan, const float* qp, const float* kp, const float* vp,
                   const float* kbp, const float* dop, const float* lp, const float* deltap, float scale,
                   int64_t owners, float* dqp, float* dkp, float* dvp) {
  const int64_t nqb = plan.nqb, group = d.group(), heads_per_owner = owners == d.Hk ? group : 1;
  at::parallel_for(0, d.B * owners, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(kBlock * kRunKeys), dP(kBlock * kRunKeys);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / owners, owner = task % owners;
      float* dK = dkp + task * d.Nk * d.D;
      float* dV = dvp + task * d.Nk * d.Dv;
      for (int64_t g = 0; g < heads_per_owner; ++g) {
        const int64_t h = owners == d.Hk ? owner * group + g : owner;
        const int64_t kv = b * d.Hk + h / group;
        const float* K = kp + kv * d.Nk * d.D;
        const float* V = vp + kv * d.Nk * d.Dv;
        const float* kb = kbp ? kbp + b * d.Nk : nullptr;
        const int32_t* ptr = plan.row_ptr(b, h);
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int rows = static_cast<int>(std::min<int64_t>(kBlock, d.Nq - qb * kBlock));
          const int64_t q_row = (b * d.H + h) * d.Nq + qb * kBlock;
          const float *Q = qp + q_row * d.D, *dO = dop + q_row * d.Dv;
          const float *lse = lp + q_row, *delta = deltap + q_row;
          float* dQ = dqp + q_row * d.D;
          for (int64_t e = ptr[qb], stop = ptr[qb + 1]; e < stop;) {
            const int n = run_length(plan, e, stop);
            const int64_t key0 = static_cast<int64_t>(plan.kv_block[e]) * kBlock;
            const int keys = static_cast<int>(std::min<int64_t>(n * kBlock, d.Nk - key0));
            run_scores(plan, e, n, Q, K + key0 * d.D, kb ? kb + key0 : nullptr, rows, keys, d.D, scale, S.data());
            for (int r = 0; r < rows; ++r) {  // P = exp(S - lse); rows that saw no key get 0
              float* s = S.data() + r * keys;
              if (lse[r] == kNegInf) std::fill(s, s + keys, 0.f);
              else exp_row(s, lse[r], keys);
            }
            gemm(true, false, keys, d.Dv, rows, 1.f, S.data(), keys, dO, d.Dv, 1.f, dV + key0 * d.Dv, d.Dv);
            gemm(false, true, rows, keys, d.Dv, 1.f, dO, d.Dv, V + key0 * d.Dv, d.Dv, 0.f, dP.data(), keys);
            for (int r = 0; r < rows; ++r) {  // dS = P (dP - delta), in place of dP
              const float* p = S.data() + r * keys;
              float* ds = dP.data() + r * keys;
              for (int c = 0; c < keys; ++c) ds[c] = p[c] * (ds[c] - delta[r]);
            }
            gemm(false, false, rows, d.D, keys, scale, dP.data(), keys, K + key0 * d.D, d.D, 1.f, dQ, d.D);
            gemm(true, false, keys, d.D, rows, scale, dP.data(), keys, Q, d.D, 1.f, dK + key0 * d.D, d.D);
            e += n;
          }
        }
      }
    }
  });
}

Dims dims_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, N, D)");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "q, k, v must be contiguous float32 CPU tensors");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "q, k, v must share the batch");
  TORCH_CHECK(q.size(1) % k.size(1) == 0 && v.size(1) == k.size(1), "q heads must be a multiple of k/v heads");
  TORCH_CHECK(q.size(3) == k.size(3) && v.size(2) == k.size(2), "q/k head dims or k/v lengths differ");
  return Dims{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3)};
}

Plan plan_of(const Dims& d, const at::Tensor& ptr, const at::Tensor& kv_block, const at::Tensor& mask_id,
             const at::Tensor& bits) {
  const int64_t nqb = (d.Nq + kBlock - 1) / kBlock;
  TORCH_CHECK(ptr.dim() == 3 && ptr.size(2) == nqb + 1 && ptr.scalar_type() == at::kInt && ptr.is_contiguous(),
              "ptr must be a contiguous int32 (Pb, Ph, n_q_blocks + 1) tensor");
  TORCH_CHECK(ptr.size(0) == 1 || ptr.size(0) == d.B, "ptr: the plan's batch must be 1 or B");
  TORCH_CHECK(ptr.size(1) == 1 || ptr.size(1) == d.H, "ptr: the plan's heads must be 1 or H");
  TORCH_CHECK(kv_block.scalar_type() == at::kInt && mask_id.scalar_type() == at::kInt &&
                  kv_block.numel() == mask_id.numel() && kv_block.is_contiguous() && mask_id.is_contiguous(),
              "kv_block and mask_id must be contiguous int32 tensors of one length");
  TORCH_CHECK(bits.scalar_type() == at::kLong && bits.is_contiguous() && (bits.numel() == 0 || bits.size(-1) == kBlock),
              "bits must be a contiguous int64 (n_masks, 64) tensor");
  return Plan{ptr.data_ptr<int32_t>(), kv_block.data_ptr<int32_t>(), mask_id.data_ptr<int32_t>(),
              reinterpret_cast<const uint64_t*>(bits.data_ptr<int64_t>()), ptr.size(0), ptr.size(1), nqb};
}

const float* key_bias_of(const at::Tensor& kbias, const Dims& d) {
  if (kbias.numel() == 0) return nullptr;
  TORCH_CHECK(kbias.scalar_type() == at::kFloat && kbias.is_contiguous() && kbias.numel() == d.B * d.Nk,
              "key_bias must be a contiguous float32 (B, Nk) tensor");
  return kbias.data_ptr<float>();
}

std::vector<at::Tensor> block_sparse_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& ptr, const at::Tensor& kv_block,
                                             const at::Tensor& mask_id, const at::Tensor& bits,
                                             const at::Tensor& key_bias, double scale) {
  const Dims d = dims_of(q, k, v);
  const Plan plan = plan_of(d, ptr, kv_block, mask_id, bits);
  auto out = at::empty({d.B, d.H, d.Nq, d.Dv}, q.options());
  auto lse = at::empty({d.B, d.H, d.Nq}, q.options());
  forward_impl(d, plan, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), key_bias_of(key_bias, d),
               static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>());
  return {out, lse};
}

// dk/dv come back per owner: (B, Hk, Nk, .) when own_kv_heads, else (B, H, Nk, .) for the
// caller to sum over each key head's group.
std::vector<at::Tensor> block_sparse_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& v, const at::Tensor& lse, const at::Tensor& delta,
                                              const at::Tensor& ptr, const at::Tensor& kv_block,
                                              const at::Tensor& mask_id, const at::Tensor& bits,
                                              const at::Tensor& key_bias, double scale, bool own_kv_heads) {
  const Dims d = dims_of(q, k, v);
  const Plan plan = plan_of(d, ptr, kv_block, mask_id, bits);
  TORCH_CHECK(dout.scalar_type() == at::kFloat && dout.is_contiguous() && dout.numel() == d.B * d.H * d.Nq * d.Dv,
              "the output's gradient must be a contiguous float32 (B, H, Nq, Dv) tensor");
  for (const auto* t : {&lse, &delta})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == d.B * d.H * d.Nq,
                "lse and delta must be contiguous float32 (B, H, Nq) tensors");
  const int64_t owners = own_kv_heads ? d.Hk : d.H;
  auto dq = at::zeros(q.sizes(), q.options());
  auto dk = at::zeros({d.B, owners, d.Nk, d.D}, q.options());
  auto dv = at::zeros({d.B, owners, d.Nk, d.Dv}, q.options());
  backward_impl(d, plan, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), key_bias_of(key_bias, d),
                dout.data_ptr<float>(), lse.data_ptr<float>(), delta.data_ptr<float>(), static_cast<float>(scale),
                owners, dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>());
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------
// Gathered rows against one key range each (content-sparse selections: MoBA, NSA, routing).
//
// Group g: batch b, query head h, keys [key0, key0 + len) of head h / group; its query rows are
// rows[gptr[g] : gptr[g + 1]] (flat indices into q's (B * H * Nq) rows), each seeing keys up to
// limit[e] (absolute; causal cut) in the range. Every entry e gets the softmax over its range:
// out_e (E, Dv) and lse_e (E,); the caller merges the entries of a row by their LSEs. Work is
// the selected (row, key) pairs, however they scatter over 64-row tiles.
// ---------------------------------------------------------------------------------------------
struct Groups {
  const int64_t* rows;   // (E,)
  const int64_t* limit;  // (E,)
  const int64_t* gptr;   // (G + 1,)
  const int64_t* meta;   // (G, 4): b, h, key0, len
  int64_t G;
};

constexpr int kRowChunk = 64;

// S (m x len) = scale Q_rows K^T + bias, -inf past each row's limit; returns nothing.
void gathered_scores(const Dims& d, const Groups& g, int64_t e0, int m, const float* qp, const float* K, const float* kb,
                     int64_t key0, int len, float scale, float* Qbuf, float* S) {
  for (int r = 0; r < m; ++r) std::memcpy(Qbuf + r * d.D, qp + g.rows[e0 + r] * d.D, d.D * sizeof(float));
  gemm(false, true, m, len, static_cast<int>(d.D), scale, Qbuf, d.D, K + key0 * d.D, d.D, 0.f, S, len);
  for (int r = 0; r < m; ++r) {
    float* s = S + r * len;
    if (kb)
      for (int c = 0; c < len; ++c) s[c] += kb[key0 + c];
    const int64_t visible = std::min<int64_t>(len, g.limit[e0 + r] - key0 + 1);
    for (int64_t c = std::max<int64_t>(visible, 0); c < len; ++c) s[c] = kNegInf;
  }
}

void gathered_forward_impl(const Dims& d, const Groups& g, const float* qp, const float* kp, const float* vp, const float* kbp,
                           float scale, float* op, float* lp) {
  const int64_t group = d.group();
  at::parallel_for(0, g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S, Qbuf(kRowChunk * d.D);
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t b = g.meta[gi * 4], h = g.meta[gi * 4 + 1], key0 = g.meta[gi * 4 + 2];
      const int len = static_cast<int>(g.meta[gi * 4 + 3]);
      const int64_t kv = b * d.Hk + h / group;
      const float *K = kp + kv * d.Nk * d.D, *V = vp + kv * d.Nk * d.Dv, *kb = kbp ? kbp + b * d.Nk : nullptr;
      S.resize(static_cast<size_t>(kRowChunk) * len);
      for (int64_t e0 = g.gptr[gi]; e0 < g.gptr[gi + 1]; e0 += kRowChunk) {
        const int m = static_cast<int>(std::min<int64_t>(kRowChunk, g.gptr[gi + 1] - e0));
        gathered_scores(d, g, e0, m, qp, K, kb, key0, len, scale, Qbuf.data(), S.data());
        std::vector<float> l(m);
        for (int r = 0; r < m; ++r) {
          float* s = S.data() + r * len;
          const float mx = max_row(s, len);
          if (mx == kNegInf) {
            std::fill(s, s + len, 0.f);
            l[r] = 0.f;
            lp[e0 + r] = kNegInf;
            continue;
          }
          l[r] = exp_row(s, mx, len);
          lp[e0 + r] = mx + std::log(l[r]);
        }
        float* O = op + e0 * d.Dv;
        gemm(false, false, m, static_cast<int>(d.Dv), len, 1.f, S.data(), len, V + key0 * d.Dv, d.Dv, 0.f, O, d.Dv);
        for (int r = 0; r < m; ++r) scale_row(O + r * d.Dv, l[r] == 0.f ? 0.f : 1.f / l[r], d.Dv);
      }
    }
  });
}

// One task per (batch, key head): its groups run in order, so dK/dV need no atomics.
void gathered_backward_impl(const Dims& d, const Groups& g, const float* qp, const float* kp, const float* vp, const float* kbp,
                            const float* dop, const float* lp, const float* deltap, float scale, float* dqp, float* dkp,
                            float* dvp) {
  const int64_t group = d.group();
  std::vector<std::vector<int64_t>> owned(d.B * d.Hk);
  for (int64_t gi = 0; gi < g.G; ++gi) owned[g.meta[gi * 4] * d.Hk + g.meta[gi * 4 + 1] / group].push_back(gi);
  at::parallel_for(0, d.B * d.Hk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S, dP, Qbuf(kRowChunk * d.D), dObuf(kRowChunk * d.Dv), dQbuf(kRowChunk * d.D);
    for (int64_t task = begin; task < end; ++task) {
      float* dK = dkp + task * d.Nk * d.D;
      float* dV = dvp + task * d.Nk * d.Dv;
      const float *K = kp + task * d.Nk * d.D, *V = vp + task * d.Nk * d.Dv;
      const float* kb = kbp ? kbp + (task / d.Hk) * d.Nk : nullptr;
      for (const int64_t gi : owned[task]) {
        const int64_t key0 = g.meta[gi * 4 + 2];
        const int len = static_cast<int>(g.meta[gi * 4 + 3]);
        S.resize(static_cast<size_t>(kRowChunk) * len);
        dP.resize(static_cast<size_t>(kRowChunk) * len);
        for (int64_t e0 = g.gptr[gi]; e0 < g.gptr[gi + 1]; e0 += kRowChunk) {
          const int m = static_cast<int>(std::min<int64_t>(kRowChunk, g.gptr[gi + 1] - e0));
          gathered_scores(d, g, e0, m, qp, K, kb, key0, len, scale, Qbuf.data(), S.data());
          for (int r = 0; r < m; ++r) {
            float* s = S.data() + r * len;
            if (lp[e0 + r] == kNegInf) std::fill(s, s + len, 0.f);
            else exp_row(s, lp[e0 + r], len);
          }
          std::memcpy(dObuf.data(), dop + e0 * d.Dv, m * d.Dv * sizeof(float));
          gemm(true, false, len, static_cast<int>(d.Dv), m, 1.f, S.data(), len, dObuf.data(), d.Dv, 1.f, dV + key0 * d.Dv, d.Dv);
          gemm(false, true, m, len, static_cast<int>(d.Dv), 1.f, dObuf.data(), d.Dv, V + key0 * d.Dv, d.Dv, 0.f, dP.data(), len);
          for (int r = 0; r < m; ++r) {
            const float* p = S.data() + r * len;
            float* ds = dP.data() + r * len;
            const float delta = deltap[e0 + r];
            for (int c = 0; c < len; ++c) ds[c] = p[c] * (ds[c] - delta);
          }
          gemm(false, false, m, static_cast<int>(d.D), len, scale, dP.data(), len, K + key0 * d.D, d.D, 0.f, dQbuf.data(), d.D);
          std::memcpy(dqp + e0 * d.D, dQbuf.data(), m * d.D * sizeof(float));
          gemm(true, false, len, static_cast<int>(d.D), m, scale, dP.data(), len, Qbuf.data(), d.D, 1.f, dK + key0 * d.D, d.D);
        }
      }
    }
  });
}

Groups groups_of(const Dims& d, const at::Tensor& rows, const at::Tensor& limit, const at::Tensor& gptr, const at::Tensor& meta) {
  for (const auto* t : {&rows, &limit, &gptr, &meta})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(), "rows, limit, gptr, meta must be contiguous int64 CPU tensors");
  TORCH_CHECK(rows.numel() == limit.numel() && meta.dim() == 2 && meta.size(1) == 4 && gptr.numel() == meta.size(0) + 1,
              "rows/limit (E,), gptr (G + 1,), meta (G, 4)");
  return Groups{rows.data_ptr<int64_t>(), limit.data_ptr<int64_t>(), gptr.data_ptr<int64_t>(), meta.data_ptr<int64_t>(), meta.size(0)};
}

std::vector<at::Tensor> gathered_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows,
                                         const at::Tensor& limit, const at::Tensor& gptr, const at::Tensor& meta,
                                         const at::Tensor& key_bias, double scale) {
  const Dims d = dims_of(q, k, v);
  const Groups g = groups_of(d, rows, limit, gptr, meta);
  auto out = at::empty({rows.numel(), d.Dv}, q.options());
  auto lse = at::empty({rows.numel()}, q.options());
  gathered_forward_impl(d, g, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), key_bias_of(key_bias, d),
                        static_cast<float>(scale), out.data_ptr<float>(), lse.data_ptr<float>());
  return {out, lse};
}

// dq_e (E, D) per entry (the caller sums a row's entries); dk, dv (B, Hk, Nk, .).
std::vector<at::Tensor> gathered_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& lse, const at::Tensor& delta, const at::Tensor& rows,
                                          const at::Tensor& limit, const at::Tensor& gptr, const at::Tensor& meta,
                                          const at::Tensor& key_bias, double scale) {
  const Dims d = dims_of(q, k, v);
  const Groups g = groups_of(d, rows, limit, gptr, meta);
  const int64_t E = rows.numel();
  TORCH_CHECK(dout.scalar_type() == at::kFloat && dout.is_contiguous() && dout.numel() == E * d.Dv, "dout must be (E, Dv) float32");
  for (const auto* t : {&lse, &delta})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == E, "lse and delta must be (E,) float32");
  auto dq = at::zeros({E, d.D}, q.options());
  auto dk = at::zeros(k.sizes(), q.options());
  auto dv = at::zeros(v.sizes(), q.options());
  gathered_backward_impl(d, g, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), key_bias_of(key_bias, d),
                         dout.data_ptr<float>(), lse.data_ptr<float>(), delta.data_ptr<float>(), static_cast<float>(scale),
                         dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>());
  return {dq, dk, dv};
}

std::string kernel_path() {
  std::string simd = kLanes == 16 ? "avx512 (16-lane exp)" : "8-lane exp (avx2 or emulated)";
  return simd + ", GEMM: " + (sgemm_ ? "BLAS sgemm_ linked by PyTorch" : "plain loops (no BLAS found)");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &block_sparse_forward, "block-sparse attention forward -> (out, lse)");
  m.def("backward", &block_sparse_backward, "block-sparse attention backward -> (dq, dk, dv)");
  m.def("gathered_forward", &gathered_forward, "gathered rows against one key range per group -> (out_e, lse_e)");
  m.def("gathered_backward", &gathered_backward, "gathered rows backward -> (dq_e, dk, dv)");
  m.def("path", &kernel_path, "which SIMD width and GEMM this build uses");
}
