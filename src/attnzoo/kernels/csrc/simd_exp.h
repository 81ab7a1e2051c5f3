// exp over GCC/Clang vector types, shared by the C++ kernels of this folder.
#pragma once

#include <cstring>

// exp(x) for x <= ~0 (a score minus its row max or its LSE) over a float vector V whose int32
// vector is I. Cephes' expf scheme: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6
// polynomial, 2^n through the exponent bits. Relative error about 2e-7; x below -87 (and -inf:
// masked pairs) gives exactly 0; NaN stays NaN. std::exp is a libm call per element and cost
// about as much as the dot products.
template <typename V, typename I>
inline V exp_nonpositive(V x) {
  const I tiny = x < -87.f;
  x = tiny ? (V{} - 87.f) : x;
  const V y0 = x * 1.44269504088896341f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(y0, I), V);  // truncates toward 0
  n = (n > y0) ? n - 1.f : n;                                        // floor(x log2 e + 1/2)
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const I bits = (__builtin_convertvector(n, I) + 127) << 23;
  V two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return tiny ? V{} : y * two_n;
}
