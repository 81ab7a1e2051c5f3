// Gathered attention on CPU: softmax attention where query i attends the keys index[i, :].
//
// The neighbor table `index` (Nq, K) lists each query's keys (-1 = no key in that slot), so any
// pattern with a bounded number of keys per query (neighborhood 1D/2D/3D with dilation, stride
// and causal axes; short sliding windows) runs in O(Nq * K * D) time and O(Nq * K) memory,
// reading the keys in place: no gather, no N x N tensor, no tile waste.
//
//   forward:   s_t = scale * q_i . k_{index[i,t]} + bias[i,t];  p = softmax(s);  o_i = sum_t p_t v_t
//   backward:  pass 1 per query:  dp_t = do_i . v_t, ds_t = p_t (dp_t - delta_i),
//                                 delta_i = do_i . o_i,  dq_i = scale * sum_t ds_t k_t
//              pass 2 per key j over the inverse table (the (query, slot) pairs that see j,
//              CSR): dk_j = scale * sum ds q_i,  dv_j = sum p do_i,  recomputing p and ds
//              so nothing of size Nq * K is stored (unless the bias needs its gradient).
// Pass 2 owns each key row, so the scatter needs no atomics and parallelises over keys.
// Layouts: q (B, H, Nq, D), k/v (B, Hk, Nk, D) contiguous (one head dim for q, k and v), H a multiple of Hk (GQA),
// bias (B|1, H|1, Nq, K) or empty. Accumulation in float for every input dtype.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>

#include "simd_exp.h"

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Row kernels. The float path with a head dim known at compile time (a multiple of 8) uses
// explicit 8-lane vectors (GCC/Clang vector extensions: AVX on x86, emulated elsewhere), so
// a row's accumulator stays in registers and four key rows share each load of q; the
// compiler's auto-vectorizer proved fragile here (a refactor silently halved the speed).
// Every other case (other dtypes, other head dims) runs the generic scalar loops.
typedef float f8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
inline float hsum(f8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

template <int DT, typename T>
constexpr bool kVector = std::is_same_v<T, float> && DT > 0 && DT % 8 == 0;

// The row of a (N, n) matrix that slot t of a table row names (a masked slot, -1, reads row
// 0 and must get weight 0 from the caller).
template <typename T>
inline const T* named_row(const T* base, const int64_t* row, int64_t t, int64_t n) {
  return base + (row[t] < 0 ? 0 : row[t]) * n;
}

// out[t] = x . base[row[t]] for t < K.
template <int DT, typename T>
inline void row_dots(const T* x, const T* base, const int64_t* row, int64_t K, int64_t n, float* out) {
  int64_t t = 0;
  if constexpr (kVector<DT, T>) {
    f8 xv[DT / 8];
    for (int j = 0; j < DT / 8; ++j) xv[j] = load8(x + 8 * j);
    for (; t + 4 <= K; t += 4) {
      const float *r0 = named_row(base, row, t, n), *r1 = named_row(base, row, t + 1, n);
      const float *r2 = named_row(base, row, t + 2, n), *r3 = named_row(base, row, t + 3, n);
      f8 a0 = xv[0] * load8(r0), a1 = xv[0] * load8(r1), a2 = xv[0] * load8(r2), a3 = xv[0] * load8(r3);
      for (int j = 1; j < DT / 8; ++j) {
        a0 += xv[j] * load8(r0 + 8 * j);
        a1 += xv[j] * load8(r1 + 8 * j);
        a2 += xv[j] * load8(r2 + 8 * j);
        a3 += xv[j] * load8(r3 + 8 * j);
      }
      out[t] = hsum(a0), out[t + 1] = hsum(a1), out[t + 2] = hsum(a2), out[t + 3] = hsum(a3);
    }
  }
  for (; t < K; ++t) {
    const T* r = named_row(base, row, t, n);
    float acc = 0.f;
    for (int64_t d = 0; d < n; ++d) acc += static_cast<float>(x[d]) * static_cast<float>(r[d]);
    out[t] = acc;
  }
}

// acc[0..n) += sum_t w[t] * base[row[t]] (masked slots carry w = 0).
template <int DT, typename T>
inline void row_combine(const float* w, const T* base, const int64_t* row, int64_t K, int64_t n, float* acc) {
  if constexpr (kVector<DT, T>) {
    f8 a[DT / 8];
    for (int j = 0; j < DT / 8; ++j) a[j] = load8(acc + 8 * j);
    for (int64_t t = 0; t < K; ++t) {
      const float* r = named_row(base, row, t, n);
      const f8 wt = f8{} + w[t];
      for (int j = 0; j < DT / 8; ++j) a[j] += wt * load8(r + 8 * j);
    }
    for (int j = 0; j < DT / 8; ++j) store8(acc + 8 * j, a[j]);
  } else {
    for (int64_t t = 0; t < K; ++t) {
      const T* r = named_row(base, row, t, n);
      for (int64_t d = 0; d < n; ++d) acc[d] += w[t] * static_cast<float>(r[d]);
    }
  }
}

// y[0..n) += alpha * x (one row; the backward's scatter over the inverse table).
template <int DT, typename T>
inline void axpy(float alpha, const T* x, float* y, int64_t n) {
  if constexpr (kVector<DT, T>) {
    const f8 av = f8{} + alpha;
    for (int j = 0; j < DT / 8; ++j) store8(y + 8 * j, load8(y + 8 * j) + av * load8(x + 8 * j));
  } else {
    for (int64_t d = 0; d < n; ++d) y[d] += alpha * static_cast<float>(x[d]);
  }
}

typedef int32_t i8v __attribute__((vector_size(32)));

inline f8 exp8_nonpositive(f8 x) { return exp_nonpositive<f8, i8v>(x); }

// p[t] = exp(s[t] - m) over a row (masked slots hold -inf and get 0); returns the sum.
inline float row_exp(const float* s, float m, float* p, int64_t K) {
  f8 acc{};
  int64_t t = 0;
  for (; t + 8 <= K; t += 8) {
    const f8 e = exp8_nonpositive(load8(s + t) - m);
    store8(p + t, e);
    acc += e;
  }
  float sum = hsum(acc);
  if (t < K) {  // the tail, padded with -inf
    float tail[8];
    for (int j = 0; j < 8; ++j) tail[j] = t + j < K ? s[t + j] - m : -std::numeric_limits<float>::infinity();
    const f8 e = exp8_nonpositive(load8(tail));
    for (int j = 0; t + j < K; ++j) p[t + j] = e[j], sum += e[j];
  }
  return sum;
}

struct Shape {
  int64_t B, H, Hk, Nq, Nk, D, K;
  int64_t bias_sb, bias_sh;  // bias strides over batch and head (0 when broadcast)
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
               const at::Tensor& bias) {
  Shape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), index.size(1), 0, 0};
  if (bias.numel() > 0) {
    s.bias_sb = bias.size(0) == 1 ? 0 : bias.stride(0);
    s.bias_sh = bias.size(1) == 1 ? 0 : bias.stride(1);
  }
  return s;
}

// Scores of one query row (scale q_i . k_j + bias, -inf on masked slots) into s; returns
// their max (-inf when the row names no key).
template <int DT, typename T>
inline float row_scores(const T* qi, const T* kb, const int64_t* row, const float* bi, int64_t K, int64_t n,
                        float scale, float* s) {
  row_dots<DT>(qi, kb, row, K, n, s);
  float m = kNegInf;
  for (int64_t t = 0; t < K; ++t) {
    const float x = row[t] < 0 ? kNegInf : scale * s[t] + (bi ? bi[t] : 0.f);
    s[t] = x;
    m = (x > m || x != x) ? x : m;  // a NaN score makes the max NaN, so the row's output is NaN
  }
  return m;
}

template <int DT, typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                  const at::Tensor& bias, float scale, at::Tensor& out, at::Tensor& lse) {
  const Shape sh = shape_of(q, k, v, index, bias);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const int64_t* ip = index.data_ptr<int64_t>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  T* op = out.data_ptr<T>();
  float* lp = lse.data_ptr<float>();
  const int64_t n = sh.D;
  at::parallel_for(0, sh.B * sh.H * sh.Nq, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> s(sh.K), acc(n);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % sh.Nq, bh = r / sh.Nq, h = bh % sh.H, b = bh / sh.H;
      const int64_t kv_off = (b * sh.Hk + h / (sh.H / sh.Hk)) * sh.Nk * n;
      const int64_t* row = ip + i * sh.K;
      const float* bi = bp ? bp + b * sh.bias_sb + h * sh.bias_sh + i * sh.K : nullptr;
      const float m = row_scores<DT>(qp + r * n, kp + kv_off, row, bi, sh.K, n, scale, s.data());
      T* o = op + r * n;
      if (m == kNegInf) {  // no key: zeros and lse = -inf, never NaN
        for (int64_t d = 0; d < n; ++d) o[d] = T(0);
        lp[r] = kNegInf;
        continue;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const float sum = row_exp(s.data(), m, s.data(), sh.K);
      row_combine<DT>(s.data(), vp + kv_off, row, sh.K, n, acc.data());
      const float inv = 1.f / sum;
      for (int64_t d = 0; d < n; ++d) o[d] = static_cast<T>(acc[d] * inv);
      lp[r] = m + std::log(sum);
    }
  });
}

// Backward, one (batch, kv head) group at a time so the per-pair buffers P and dS hold
// group * Nq * K floats (not B * H * Nq * K): pass 1 over query rows fills them and dq,
// pass 2 over key rows reads them through the inverse table into dk and dv.
template <int DT, typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& lse, const at::Tensor& index, const at::Tensor& inv_ptr,
                   const at::Tensor& inv_pos, const at::Tensor& bias, float scale, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor& dbias) {
  const Shape sh = shape_of(q, k, v, index, bias);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T* dop = dout.data_ptr<T>();
  const float* lp = lse.data_ptr<float>();
  const int64_t* ip = index.data_ptr<int64_t>();
  const int64_t *ptr = inv_ptr.data_ptr<int64_t>(), *pos = inv_pos.data_ptr<int64_t>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  float* dbp = dbias.numel() ? dbias.data_ptr<float>() : nullptr;
  const int64_t n = sh.D, group = sh.H / sh.Hk, pairs = sh.Nq * sh.K;
  std::vector<float> P(group * pairs), dS(group * pairs);

  for (int64_t b = 0; b < sh.B; ++b) {
    for (int64_t hk = 0; hk < sh.Hk; ++hk) {
      const int64_t kv_off = (b * sh.Hk + hk) * sh.Nk * n;
      at::parallel_for(0, group * sh.Nq, 64, [&](int64_t begin, int64_t end) {
        std::vector<float> s(sh.K);
        for (int64_t gr = begin; gr < end; ++gr) {
          const int64_t g = gr / sh.Nq, i = gr % sh.Nq, h = hk * group + g;
          const int64_t r = (b * sh.H + h) * sh.Nq + i;
          float* p_row = P.data() + gr * sh.K;
          float* ds_row = dS.data() + gr * sh.K;
          const int64_t* row = ip + i * sh.K;
          const float* bi = bp ? bp + b * sh.bias_sb + h * sh.bias_sh + i * sh.K : nullptr;
          if (lp[r] == kNegInf) {
            for (int64_t t = 0; t < sh.K; ++t) p_row[t] = ds_row[t] = 0.f;
            continue;
          }
          const T* doi = dop + r * n;
          row_scores<DT>(qp + r * n, kp + kv_off, row, bi, sh.K, n, scale, s.data());
          row_exp(s.data(), lp[r], p_row, sh.K);
          row_dots<DT>(doi, vp + kv_off, row, sh.K, n, ds_row);
          float delta = 0.f;  // rowsum(dO * O) = sum_t p_t dp_t: no need to keep the output
          for (int64_t t = 0; t < sh.K; ++t) delta += p_row[t] * ds_row[t];
          for (int64_t t = 0; t < sh.K; ++t) ds_row[t] = p_row[t] * (ds_row[t] - delta);
          for (int64_t t = 0; t < sh.K; ++t) s[t] = scale * ds_row[t];
          row_combine<DT>(s.data(), kp + kv_off, row, sh.K, n, dqp + r * n);
          if (dbp) std::copy(ds_row, ds_row + sh.K, dbp + r * sh.K);
        }
      });
      at::parallel_for(0, sh.Nk, 64, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          float* dkj = dkp + kv_off + j * n;
          float* dvj = dvp + kv_off + j * n;
          for (int64_t g = 0; g < group; ++g) {
            const int64_t q_off = ((b * sh.H + hk * group + g) * sh.Nq) * n;
            const float* p_g = P.data() + g * pairs;
            const float* ds_g = dS.data() + g * pairs;
            for (int64_t e = ptr[j]; e < ptr[j + 1]; ++e) {
              const int64_t i = pos[e] / sh.K;
              axpy<DT>(scale * ds_g[pos[e]], qp + q_off + i * n, dkj, n);
              axpy<DT>(p_g[pos[e]], dop + q_off + i * n, dvj, n);
            }
          }
        }
      });
    }
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                  const at::Tensor& bias) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, N, D)");
  TORCH_CHECK(q.size(3) == k.size(3) && k.size(3) == v.size(3), "q, k, v must share their head dim");
  TORCH_CHECK(index.dim() == 2 && index.size(0) == q.size(2) && index.scalar_type() == at::kLong &&
                  index.is_contiguous(), "index must be a contiguous (Nq, K) int64 tensor");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "q heads must be a multiple of k heads");
  if (bias.numel()) {
    TORCH_CHECK(bias.dim() == 4 && bias.scalar_type() == at::kFloat && bias.size(2) == q.size(2) &&
                    bias.size(3) == index.size(1) && bias.stride(3) == 1 && bias.stride(2) == index.size(1),
                "bias must be a float (B|1, H|1, Nq, K) tensor, rows contiguous");
  }
}

// Calls fn.template operator()<DT>() with DT the compile-time head dim when D is a common one.
template <typename F>
void dispatch_head_dim(int64_t d, F&& fn) {
  switch (d) {
    case 32: fn(std::integral_constant<int, 32>{}); break;
    case 64: fn(std::integral_constant<int, 64>{}); break;
    case 128: fn(std::integral_constant<int, 128>{}); break;
    default: fn(std::integral_constant<int, 0>{});
  }
}

std::vector<at::Tensor> gathered_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& index, const at::Tensor& bias, double scale) {
  check_inputs(q, k, v, index, bias);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gathered_forward", [&] {
    dispatch_head_dim(q.size(3), [&](auto dt) {
      forward_impl<decltype(dt)::value, scalar_t>(q, k, v, index, bias, static_cast<float>(scale), out, lse);
    });
  });
  return {out, lse};
}

std::vector<at::Tensor> gathered_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& lse,
                                          const at::Tensor& index, const at::Tensor& inv_ptr,
                                          const at::Tensor& inv_pos, const at::Tensor& bias, double scale,
                                          bool bias_grad) {
  check_inputs(q, k, v, index, bias);
  TORCH_CHECK(dout.is_contiguous(), "the output's gradient must be contiguous");
  auto f32 = q.options().dtype(at::kFloat);
  auto dq = at::zeros(q.sizes(), f32), dk = at::zeros(k.sizes(), f32), dv = at::zeros(v.sizes(), f32);
  auto dbias = bias_grad ? at::zeros({q.size(0), q.size(1), q.size(2), index.size(1)}, f32) : at::empty({0}, f32);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gathered_backward", [&] {
    dispatch_head_dim(q.size(3), [&](auto dt) {
      backward_impl<decltype(dt)::value, scalar_t>(dout, q, k, v, lse, index, inv_ptr, inv_pos, bias,
                                                    static_cast<float>(scale), dq, dk, dv, dbias);
    });
  });
  return {dq, dk, dv, dbias};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &gathered_forward, "gathered attention forward -> (out, lse)");
  m.def("backward", &gathered_backward, "gathered attention backward -> (dq, dk, dv, dbias)");
}
