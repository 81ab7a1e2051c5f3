// Causal chunked linear attention on CPU, forward from a state (Lightning Attention-2 tiling,
// Qin et al. 2024, Sec. 3, Algorithm 1), one (batch, head) row per task.
//
// For feature-mapped q (N, F), k (N, F), values v (N, Dv) of one row, a per-head decay gamma:
//
//   out_i = sum_(j <= i) gamma^(i - j) s (q_i . k_j) v_j          (j < i when `strict`)
//
// computed chunk by chunk (L tokens) with the running state S = sum_j gamma^(.) k_j^T v_j
// (F x Dv) held in cache:
//
//   A   = mask(s Q_c K_c^T)                        L x L, mask_ij = gamma^(i-j) on the visible keys
//   O_c = s gamma^(i+1) (Q_c S) + A V_c
//   S   = gamma^L S + (gamma^(L-1-j) K_c)^T V_c
//
// The torch path does the same with the per-chunk states materialized (N F Dv / L numbers per
// row) and a scan across them; here each row is a sequential loop over its chunks, so the state
// never leaves L1/L2 and no pass over memory happens outside the four small GEMMs per chunk.
//
// `ones`: v is taken as [v, 1] without the column existing: the output and the state carry the
// normalizer sum_j w_ij s (q_i . k_j) as their last column (Dv + 1), computed from the row sums
// of A and a vector z = sum_j gamma^(.) k_j instead of a 65th GEMM column.
//
// Fused around it, so that a normalized linear attention is one pass over q, k and v: a feature
// map (elu + 1, relu, or Based's Taylor map) applied to q (after a scale) and k as each chunk is
// loaded, and the division of the output by its normalizer (+ eps) as each chunk is stored.
//
// Computed in float32: bfloat16 and float16 inputs are widened as each chunk is loaded, and the
// output is float32 (float64 stays on the torch path). The GEMMs use 8-lane
// vectors (GCC/Clang vector extensions: AVX with -march=native, emulated elsewhere) in 4 x 16
// register blocks.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd_exp.h"

namespace {

typedef float f8 __attribute__((vector_size(32)));
constexpr int kNR = 16;  // columns per register block: two vectors
constexpr int kMR = 4;   // rows per register block

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
inline f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }
inline float hsum(f8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// sum_i x[i] * y[i] (y = nullptr: sum_i x[i]), in 8 lanes: no chain of dependent scalar adds.
inline float dot(const float* x, const float* y, int64_t n) {
  f8 acc = splat(0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc += y ? load8(x + i) * load8(y + i) : load8(x + i);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += y ? x[i] * y[i] : x[i];
  return sum;
}

// y[0:n] = a * y[0:n] + b * x[0:n]
inline void axpby(float a, float* y, float b, const float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, splat(a) * load8(y + i) + splat(b) * load8(x + i));
  for (; i < n; ++i) y[i] = a * y[i] + b * x[i];
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// C[MR x 16] (+)= A[MR x K] B[K x 16]; A row-major (lda), B row-major (ldb), C row-major (ldc).
template <int MR>
inline void block(int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  f8 c0[MR], c1[MR];
  for (int r = 0; r < MR; ++r) {
    c0[r] = accumulate ? load8(C + r * ldc) : splat(0.f);
    c1[r] = accumulate ? load8(C + r * ldc + 8) : splat(0.f);
  }
  for (int64_t p = 0; p < K; ++p) {
    f8 b0 = load8(B + p * ldb), b1 = load8(B + p * ldb + 8);
    // Keep the row of B in registers: GCC otherwise folds a load into each of the 2 x MR FMAs,
    // and the loads, not the FMAs, bound the loop (measured 30-40% slower).
    asm("" : "+x"(b0), "+x"(b1));
    for (int r = 0; r < MR; ++r) {
      const f8 a = splat(A[r * lda + p]);
      c0[r] += a * b0;
      c1[r] += a * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store8(C + r * ldc, c0[r]);
    store8(C + r * ldc + 8, c1[r]);
  }
}

// C[rows x n] (+)= A[rows x K] B[K x n] for n a multiple of 16; `depth(i0, mr)` bounds K for the
// row block starting at i0 (causal products skip the zero upper triangle), `width(i0, mr)` the
// columns it needs.
template <typename Depth, typename Width>
void gemm(int64_t rows, int64_t n, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate,
          Depth depth, Width width) {
  int64_t i0 = 0;
  for (; i0 + kMR <= rows; i0 += kMR) {
    const int64_t K = depth(i0, kMR), cols = std::min(n, width(i0, kMR));
    for (int64_t j = 0; j < cols; j += kNR) block<kMR>(K, A + i0 * lda, lda, B + j, ldb, C + i0 * ldc + j, ldc, accumulate);
  }
  for (; i0 < rows; ++i0) {
    const int64_t K = depth(i0, 1), cols = std::min(n, width(i0, 1));
    for (int64_t j = 0; j < cols; j += kNR) block<1>(K, A + i0 * lda, lda, B + j, ldb, C + i0 * ldc + j, ldc, accumulate);
  }
}

typedef int32_t i8v __attribute__((vector_size(32)));

// exp(x) for x <= 0 (simd_exp.h); x below -87, -inf (a padded key) included, gives exactly 0.
inline f8 exp8_nonpositive(f8 x) { return exp_nonpositive<f8, i8v>(x); }

// The feature maps the kernel applies as it loads a chunk (phi(s q), phi(k)): pointwise ones, and
// Based's Taylor map.
enum class Map : int64_t { identity = 0, elu_plus_one = 1, relu = 2, taylor = 3 };

inline f8 apply(Map map, f8 x) {
  const f8 zero = splat(0.f);
  switch (map) {
    case Map::elu_plus_one: return x > zero ? x + splat(1.f) : exp8_nonpositive(x);
    case Map::relu: return x > zero ? x : zero;
    default: return x;
  }
}

inline float apply(Map map, float x) {
  switch (map) {
    case Map::elu_plus_one: return x > 0.f ? x + 1.f : std::exp(x);
    case Map::relu: return x > 0.f ? x : 0.f;
    default: return x;
  }
}

// Based's second-order Taylor map of y = scale * src[0:d] (feature_maps.taylor_features):
// [1, y, w_ij y_i y_j for i <= j], w = 1/sqrt 2 on the diagonal and 1 elsewhere, so that
// phi(x) . phi(x') = 1 + y.y' + (y.y')^2 / 2 with 1 + d + d(d+1)/2 features.
inline void taylor_row(float scale, const float* src, int64_t d, float* dst) {
  constexpr float kRootHalf = 0.70710678118654752f;
  float* y = dst + 1;
  float* pair = y + d;
  dst[0] = 1.f;
  for (int64_t a = 0; a < d; ++a) y[a] = src[a] * scale;
  for (int64_t i = 0; i < d; ++i) {
    const float yi = y[i];
    *pair++ = yi * (kRootHalf * yi);
    for (int64_t j = i + 1; j < d; ++j) *pair++ = yi * y[j];
  }
}

// dst[0:n] = phi(scale * src[0:n]); the Taylor map reads src[0:taylor_dim] and writes n features.
inline void map_row(Map map, float scale, const float* src, float* dst, int64_t n, int64_t taylor_dim) {
  if (map == Map::taylor) return taylor_row(scale, src, taylor_dim, dst);
  int64_t f = 0;
  for (; f + 8 <= n; f += 8) store8(dst + f, apply(map, load8(src + f) * splat(scale)));
  for (; f < n; ++f) dst[f] = apply(map, src[f] * scale);
}

// The decay inside a chunk of `len` tokens, for one row (see linear_scan._ChunkDecay), with the
// scale s folded in.
struct ChunkDecay {
  int64_t len = 0;
  std::vector<float> mask;   // len x lp: s gamma^(i-j) on the visible keys, 0 elsewhere
  std::vector<float> query;  // len: s gamma^(i+1), on the state's contribution to row i
  std::vector<float> key;    // len: gamma^(len-1-j), on key j's contribution to the next state
  float chunk = 1.f;         // gamma^len

  ChunkDecay(int64_t len_, int64_t lp, double log_gamma, double scale, bool strict)
      : len(len_), mask(len_ * lp, 0.f), query(len_), key(len_) {
    for (int64_t i = 0; i < len; ++i) {
      for (int64_t j = 0; j < (strict ? i : i + 1); ++j) mask[i * lp + j] = float(scale * std::exp(double(i - j) * log_gamma));
      query[i] = float(scale * std::exp(double(i + 1) * log_gamma));
      key[i] = float(std::exp(double(len - 1 - i) * log_gamma));
    }
    chunk = float(std::exp(double(len) * log_gamma));
  }
};

struct Options {
  int64_t n, f, dv, length;
  int64_t d_in;           // channels D of each q and k row (= F but for the Taylor map)
  int64_t ldq, ldk, ldv;  // the inputs' token strides (features are contiguous; negative: reversed)
  int64_t state_cols;     // Dv + ones
  int64_t out_cols;       // Dv + ones, or Dv when the kernel divides
  int64_t ldo;            // the output's token stride: out_cols, or -out_cols reversed
  bool ones, strict, divide;
  double scale, eps;
  Map map;
  int64_t taylor_dim;  // the channels the Taylor map reads
  float query_scale;
};

// The buffers of one row's loop, all cache-sized: a chunk of phi(s q) and phi(k) (L x F),
// phi(k)^T (F x lp), V (L x dvp), the scores A (L x lp), the outputs O (L x dvp), the state S
// (F x dvp) and z (F).
struct Row {
  const Options& o;
  int64_t lp, dvp;
  std::vector<float> qb, kb, kt, vb, a, out, S, z, den;
  std::vector<float> wide;  // one widened input row (16-bit inputs)
  bool empty_state = true;

  template <typename T>
  const float* widened(const T* src, int64_t n) {
    if constexpr (std::is_same_v<T, float>) {
      return src;
    } else {
      for (int64_t i = 0; i < n; ++i) wide[i] = static_cast<float>(src[i]);
      return wide.data();
    }
  }

  explicit Row(const Options& opt)
      : o(opt), lp(round_up(opt.length, kNR)), dvp(round_up(opt.dv, kNR)), qb(opt.length * opt.f), kb(opt.length * opt.f),
        kt(opt.f * lp, 0.f), vb(opt.length * dvp, 0.f), a(opt.length * lp), out(opt.length * dvp), S(opt.f * dvp, 0.f), z(opt.f, 0.f),
        den(opt.length), wide(std::max(opt.d_in, opt.dv)) {}

  void load_state(const float* state) {  // the normalizer column goes to z
    for (int64_t f = 0; f < o.f; ++f) {
      std::memcpy(&S[f * dvp], state + f * o.state_cols, o.dv * sizeof(float));
      if (o.ones) z[f] = state[f * o.state_cols + o.dv];
    }
    for (int64_t i = 0; i < o.f * dvp && empty_state; ++i) empty_state = S[i] == 0.f;
    for (int64_t f = 0; f < o.f && empty_state; ++f) empty_state = z[f] == 0.f;
  }

  void store_state(float* state) const {
    for (int64_t f = 0; f < o.f; ++f) {
      std::memcpy(state + f * o.state_cols, &S[f * dvp], o.dv * sizeof(float));
      if (o.ones) state[f * o.state_cols + o.dv] = z[f];
    }
  }

  // phi(s q) row by row, phi(k) transposed, v padded to dvp columns; 16-bit inputs are widened
  // to float32 row by row on the way in.
  template <typename T>
  void load_chunk(const T* q, const T* k, const T* v, int64_t len) {
    for (int64_t j = 0; j < len; ++j) {
      map_row(o.map, o.query_scale, widened(q + j * o.ldq, o.d_in), &qb[j * o.f], o.f, o.taylor_dim);
      map_row(o.map, 1.f, widened(k + j * o.ldk, o.d_in), &kb[j * o.f], o.f, o.taylor_dim);
      std::memcpy(&vb[j * dvp], widened(v + j * o.ldv, o.dv), o.dv * sizeof(float));
    }
    for (int64_t f = 0; f < o.f; ++f)  // strided reads from L1 cost less than strided writes
      for (int64_t j = 0; j < len; ++j) kt[f * lp + j] = kb[j * o.f + f];
  }

  // One chunk: O = s gamma^(i+1) Q S + mask(s Q K^T) V into `dst`, then the state update.
  void chunk(const ChunkDecay& d, float* dst) {
    const int64_t F = o.f, len = d.len;
    auto to_diagonal = [](int64_t i0, int64_t mr) { return i0 + mr; };  // causal: no block above it
    auto all = [](int64_t n) { return [n](int64_t, int64_t) { return n; }; };
    gemm(len, lp, qb.data(), F, kt.data(), lp, a.data(), lp, false, all(F), to_diagonal);
    for (int64_t i = 0; i < len; ++i)  // the columns A V and the row sums read (computed: to the end of the diagonal block)
      for (int64_t j = 0, end = std::min(lp, round_up(i + 1, 8)); j < end; ++j) a[i * lp + j] *= d.mask[i * lp + j];
    if (!empty_state) {
      gemm(len, dvp, qb.data(), F, S.data(), dvp, out.data(), dvp, false, all(F), all(dvp));
      for (int64_t i = 0; i < len; ++i) {
        const f8 w = splat(d.query[i]);
        for (int64_t j = 0; j < dvp; j += 8) store8(&out[i * dvp + j], load8(&out[i * dvp + j]) * w);
      }
    }
    gemm(len, dvp, a.data(), lp, vb.data(), dvp, out.data(), dvp, !empty_state, to_diagonal, all(dvp));
    if (o.ones)  // s gamma^(i+1) q_i . z + sum_j A_ij (zero past the diagonal)
      for (int64_t i = 0; i < len; ++i)
        den[i] = dot(&a[i * lp], nullptr, std::min(lp, round_up(i + 1, 8))) + (empty_state ? 0.f : d.query[i] * dot(&qb[i * F], z.data(), F));
    write(dst, len);
    // S = gamma^len S + (gamma^(len-1-j) K)^T V;  z likewise with V = 1
    if (d.chunk != 1.f) {
      for (int64_t f = 0; f < F; ++f) {
        for (int64_t j = 0; j < len; ++j) kt[f * lp + j] *= d.key[j];
        const f8 w = splat(d.chunk);
        for (int64_t j = 0; j < dvp; j += 8) store8(&S[f * dvp + j], load8(&S[f * dvp + j]) * w);
      }
      for (int64_t f = 0; f < F; ++f) z[f] *= d.chunk;
    }
    gemm(F, dvp, kt.data(), lp, vb.data(), dvp, S.data(), dvp, true, all(len), all(dvp));
    if (o.ones)
      for (int64_t j = 0; j < len; ++j) axpby(1.f, z.data(), d.key[j], &kb[j * F], F);
    empty_state = false;
  }

  // Rows of the output: [O, den], or O / (den + eps).
  void write(float* dst, int64_t len) const {
    for (int64_t i = 0; i < len; ++i) {
      float* row = dst + i * o.ldo;
      const float* src = &out[i * dvp];
      if (o.divide) {
        const float inv = 1.f / float(den[i] + o.eps);
        for (int64_t j = 0; j < o.dv; ++j) row[j] = src[j] * inv;
      } else {
        std::memcpy(row, src, o.dv * sizeof(float));
        if (o.ones) row[o.dv] = den[i];
      }
    }
  }
};

template <typename T>
void scan_row(const Options& o, const T* q, const T* k, const T* v, float* state, float* out, const double* log_gamma) {
  Row row(o);
  row.load_state(state);
  const double lg = log_gamma ? *log_gamma : 0.0;
  const ChunkDecay full(o.length, row.lp, lg, o.scale, o.strict);
  const int64_t tail_len = o.n % o.length;
  const ChunkDecay tail(tail_len ? tail_len : 1, row.lp, lg, o.scale, o.strict);
  for (int64_t t0 = 0; t0 < o.n; t0 += o.length) {
    const int64_t len = std::min(o.length, o.n - t0);
    row.load_chunk(q + t0 * o.ldq, k + t0 * o.ldk, v + t0 * o.ldv, len);
    row.chunk(len == o.length ? full : tail, out + t0 * o.ldo);
  }
  row.store_state(state);
}

// q (B, H, N, D), k (B, Hk, N, D), v (B, Hk, N, Dv) of one dtype (float32, bfloat16 or float16:
// computed in float32 either way, the output float32) with a contiguous last dim (token
// slices of a longer sequence go in without a copy), H a multiple of Hk (GQA); state (B, H, F,
// Dv') or empty; log_gamma (H,) or empty. `map` (0 identity, 1 elu + 1, 2 relu: F = D; 3 Based's
// Taylor map of the first `taylor_dim` channels: F = 1 + d + d(d+1)/2) is applied to
// query_scale * q and to k as each chunk is loaded; `divide` (with `ones`) returns
// out[:, :Dv] / (out[:, Dv] + eps) instead of [out, den]; `reverse` runs the sequence from its
// last token to its first (the anti-causal sums of the backward, without flipping copies).
// Returns (out (B, H, N, Dv' or Dv), state after the last token (B, H, F, Dv')), Dv' = Dv + ones.
std::vector<torch::Tensor> causal_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor state, torch::Tensor log_gamma,
                                          double scale, int64_t length, bool strict, bool ones, int64_t map, int64_t taylor_dim,
                                          double query_scale, bool divide, double eps, bool reverse) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kBFloat16 || dtype == torch::kHalf, "linear_scan: float32, bfloat16 or float16");
  for (const auto& x : {q, k, v}) {
    TORCH_CHECK(x.scalar_type() == dtype && x.device().is_cpu() && x.dim() == 4, "linear_scan: (B, H, N, .) CPU tensors of one dtype");
    TORCH_CHECK(x.stride(3) == 1, "linear_scan: the last dim must be contiguous");
  }
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), Hk = k.size(1), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(2) == N && k.size(3) == D && v.size(0) == B && v.size(1) == Hk && v.size(2) == N, "linear_scan: shapes");
  TORCH_CHECK(Hk >= 1 && H % Hk == 0, "linear_scan: query heads a multiple of key heads");
  TORCH_CHECK(length >= 1 && map >= 0 && map <= 3 && (!divide || ones), "linear_scan: options");
  const bool taylor = static_cast<Map>(map) == Map::taylor;
  TORCH_CHECK(!taylor || (taylor_dim >= 1 && taylor_dim <= D), "linear_scan: the Taylor map reads 1..D channels");
  const int64_t F = taylor ? 1 + taylor_dim + taylor_dim * (taylor_dim + 1) / 2 : D;
  const int64_t cols = Dv + (ones ? 1 : 0);
  const auto f32 = q.options().dtype(torch::kFloat32);
  torch::Tensor end = state.numel() ? state.to(torch::kFloat32).contiguous().clone() : torch::zeros({B, H, F, cols}, f32);
  TORCH_CHECK(end.dim() == 4 && end.size(0) == B && end.size(1) == H && end.size(2) == F && end.size(3) == cols, "linear_scan: state shape");
  const bool decayed = log_gamma.numel() > 0;
  torch::Tensor lg = decayed ? log_gamma.to(torch::kFloat64).contiguous() : log_gamma;
  TORCH_CHECK(!decayed || lg.numel() == H, "linear_scan: one log decay per head");
  const int64_t out_cols = divide ? Dv : cols;
  torch::Tensor out = torch::empty({B, H, N, out_cols}, f32);
  const int64_t sign = reverse ? -1 : 1;  // reversed: every row starts at its last token and walks back
  const Options o{.n = N,
                  .f = F,
                  .dv = Dv,
                  .length = std::min(length, std::max<int64_t>(N, 1)),
                  .d_in = D,
                  .ldq = sign * q.stride(2),
                  .ldk = sign * k.stride(2),
                  .ldv = sign * v.stride(2),
                  .state_cols = cols,
                  .out_cols = out_cols,
                  .ldo = sign * out_cols,
                  .ones = ones,
                  .strict = strict,
                  .divide = divide,
                  .scale = scale,
                  .eps = eps,
                  .map = static_cast<Map>(map),
                  .taylor_dim = taylor_dim,
                  .query_scale = float(query_scale)};
  const int64_t last = reverse ? N - 1 : 0;
  float *op = out.data_ptr<float>(), *sp = end.data_ptr<float>();
  const double* gp = decayed ? lg.data_ptr<double>() : nullptr;
  const int64_t group = H / Hk;
  auto run = [&](auto* qp, auto* kp, auto* vp) {
    at::parallel_for(0, B * H, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / H, h = r % H, hk = h / group;
        scan_row(o, qp + b * q.stride(0) + h * q.stride(1) + last * q.stride(2), kp + b * k.stride(0) + hk * k.stride(1) + last * k.stride(2),
                 vp + b * v.stride(0) + hk * v.stride(1) + last * v.stride(2), sp + r * F * cols, op + (r * N + last) * out_cols,
                 gp ? gp + h : nullptr);
      }
    });
  };
  if (dtype == torch::kBFloat16)
    run(q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  else if (dtype == torch::kHalf)
    run(q.data_ptr<at::Half>(), k.data_ptr<at::Half>(), v.data_ptr<at::Half>());
  else
    run(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>());
  return {out, end};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("causal_forward", &causal_forward, "causal chunked linear attention forward from a state -> (out, state)");
}
