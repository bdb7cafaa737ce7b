// Fused batch normalization for the CPU: the math of bnlab/functional.py in two passes over
// memory per direction. bnlab/kernels/__init__.py builds this file (JIT, once per machine),
// checks it against the eager reference, and documents when it is used.
//
// Shape legend (Ioffe & Szegedy 2015, Algorithm 1, per channel):
//   x, y, dy, dx : (N, C, *S), float32 or float64, in one of two dense layouts:
//       channels first : memory order (N, C, inner)   -- torch.contiguous_format
//       channels last  : memory order (N, inner, C)   -- torch.channels_last(_3d), or inner == 1
//   inner = prod(S); m = N * inner values per channel; rows = N * C (first) or N * inner (last)
//   shift K, mean mu, invstd, gamma, beta : (C,)
//
// Numerics are functional.py's:
//   * corrected two-pass statistics (Chan, Golub & LeVeque 1983): K = a rough mean rounded to
//     x's dtype, then d = x - K (exact near the mean, Sterbenz), sum(d) and sum(d*d);
//     mu = K + sum(d)/m, var = max(sum(d*d)/m - (sum(d)/m)^2, 0);
//   * per-channel sums accumulated in x's dtype over short runs (256 values of a row, or 16
//     rows per channel of channels-last input), then in
//     float64 across runs and blocks -- the eager path's torch.sum per chunk and float64
//     across chunks; where a float32 run overflows (|x - K| > 1.8e19) or the input is not
//     finite, the sums are redone in float64 throughout. Per-channel coefficients in float64;
//   * the cancellation guard: element-wise passes always use the shifted form
//     y = (x - K) * s + t', never x * s + t (it costs one subtraction in a pass that is
//     bound by memory, so it is never switched off).
//
// Forward  : pass 1 reads x (statistics), pass 2 reads x and writes y.
// Backward : pass 1 reads x and dy (sum dy, sum dy*(x-K)), pass 2 reads both, writes dx.
// Threads  : at::parallel_for (OpenMP in PyTorch's CPU builds). Per-channel partial sums are
//            kept per block of rows, blocks fixed by the shape (not by the thread count), so
//            results do not depend on the number of threads.

// Per-operator headers, not <ATen/ATen.h>: measured, 25 s of compiler CPU time instead of 35 s.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

struct Geometry {
  int64_t n, c, inner, m;
  bool last;  // channels-last memory order (C innermost)
};

Geometry geometry(const Tensor& x, bool channels_last) {
  TORCH_CHECK(x.dim() >= 2, "batch norm expects input of shape (N, C, ...), got ", x.dim(),
              "D input");
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t inner = x.numel() / std::max<int64_t>(1, n * c);
  TORCH_CHECK(n * c * inner > 0, "fused batch norm needs a non-empty input, got size ",
              x.sizes());
  return {n, c, inner, n * inner, channels_last || inner == 1};
}

// Number of blocks the rows are split into for per-channel partial sums: fixed by the
// shape, at most 64, at least 2048 elements per block.
int64_t num_blocks(int64_t rows, int64_t row_len) {
  const int64_t total = rows * row_len;
  return std::max<int64_t>(1, std::min<int64_t>({64, rows, total / 2048}));
}

// Per-channel sums of f(a, b) over a block-split walk of the rows, accumulated in acc_t
// (x's dtype, as the eager path's torch.sum) over at most kRun values per channel, then in
// float64 (as the eager path's sums across chunks).
//   first layout: row r = (n, c) holds `inner` contiguous values of channel r % C
//   last layout : row r = (n, i) holds C contiguous values, one per channel
// Two accumulators per channel, returned as a (2, C) float64 tensor.
constexpr int64_t kRun = 256;      // values summed in acc_t along a row (first layout)
constexpr int64_t kRunRows = 16;   // rows summed in acc_t per channel (last layout)

template <typename acc_t, typename Body>
Tensor channel_sums2(const Geometry& g, const Body& body) {
  const int64_t rows = g.last ? g.n * g.inner : g.n * g.c;
  const int64_t row_len = g.last ? g.c : g.inner;
  const int64_t blocks = num_blocks(rows, row_len);
  std::vector<double> part(static_cast<size_t>(blocks * 2 * g.c), 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> run(g.last ? static_cast<size_t>(2 * g.c) : 0);
    for (int64_t b = b0; b < b1; ++b) {
      double* __restrict acc0 = part.data() + b * 2 * g.c;
      double* __restrict acc1 = acc0 + g.c;
      const int64_t r0 = rows * b / blocks, r1 = rows * (b + 1) / blocks;
      if (g.last) {
        acc_t* __restrict run0 = run.data();
        acc_t* __restrict run1 = run0 + g.c;
        for (int64_t q0 = r0; q0 < r1; q0 += kRunRows) {
          std::fill(run.begin(), run.end(), acc_t(0));
          for (int64_t r = q0; r < std::min(r1, q0 + kRunRows); ++r) body.row_last(r, run0, run1);
          for (int64_t j = 0; j < g.c; ++j) {
            acc0[j] += static_cast<double>(run0[j]);
            acc1[j] += static_cast<double>(run1[j]);
          }
        }
      } else {
        for (int64_t r = r0; r < r1; ++r) {
          double s0 = 0.0, s1 = 0.0;
          for (int64_t i0 = 0; i0 < g.inner; i0 += kRun) {
            acc_t t0 = 0, t1 = 0;
            body.row_first(r, i0, std::min(g.inner, i0 + kRun), t0, t1);
            s0 += static_cast<double>(t0);
            s1 += static_cast<double>(t1);
          }
          acc0[r % g.c] += s0;
          acc1[r % g.c] += s1;
        }
      }
    }
  });
  Tensor out = at::zeros({2, g.c}, at::kDouble);
  double* o = out.data_ptr<double>();
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t j = 0; j < 2 * g.c; ++j) o[j] += part[b * 2 * g.c + j];
  }
  return out;
}

// The sums in x's dtype, or in float64 where those overflowed (float32 squares of |x - K| >
// 1.8e19) or the input holds inf/NaN: float64 does not overflow, and gives inf/NaN input
// the eager path's non-finite statistics.
template <typename scalar_t, typename Body>
Tensor channel_sums2_guarded(const Geometry& g, const Body& body) {
  Tensor sums = channel_sums2<scalar_t>(g, body);
  if (!std::is_same<scalar_t, double>::value) {
    const double* s = sums.data_ptr<double>();
    bool finite = true;
    for (int64_t j = 0; j < 2 * g.c; ++j) finite = finite && std::isfinite(s[j]);
    if (!finite) sums = channel_sums2<double>(g, body);
  }
  return sums;
}

// ---- statistics: sum(x - K), sum((x - K)^2) ----------------------------------------------

template <typename scalar_t>
struct StatsBody {
  const scalar_t* x;
  const scalar_t* k;  // (C,)
  int64_t c, inner;
  // values i0..i1 of row r (first layout): t0 += sum(d), t1 += sum(d * d)
  template <typename acc_t>
  void row_first(int64_t r, int64_t i0, int64_t i1, acc_t& t0, acc_t& t1) const {
    const scalar_t* __restrict xr = x + r * inner;
    const acc_t kc = static_cast<acc_t>(k[r % c]);
    acc_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t d = static_cast<acc_t>(xr[i]) - kc;  // exact near the mean
      a += d;
      b += d * d;
    }
    t0 += a;
    t1 += b;
  }
  template <typename acc_t>
  void row_last(int64_t r, acc_t* __restrict a, acc_t* __restrict b) const {
    const scalar_t* __restrict xr = x + r * c;
    const scalar_t* __restrict kk = k;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const acc_t d = static_cast<acc_t>(xr[j]) - static_cast<acc_t>(kk[j]);
      a[j] += d;
      b[j] += d * d;
    }
  }
};

// K per channel: the mean of the first few batch items (at least 256 values per channel when
// the batch has them), accumulated in float64 and rounded to x's dtype. Any value within a
// few standard deviations of the mean will do: the correction term removes the rest.
template <typename scalar_t>
Tensor rough_mean(const Tensor& x, const Geometry& g) {
  const int64_t items = std::min<int64_t>(g.n, std::max<int64_t>(1, (256 + g.inner - 1) / g.inner));
  const scalar_t* xp = x.data_ptr<scalar_t>();
  std::vector<double> sum(static_cast<size_t>(g.c), 0.0);
  for (int64_t n = 0; n < items; ++n) {
    for (int64_t i = 0; i < g.inner; ++i) {
      for (int64_t ch = 0; ch < g.c; ++ch) {
        const int64_t at = g.last ? (n * g.inner + i) * g.c + ch : (n * g.c + ch) * g.inner + i;
        sum[ch] += static_cast<double>(xp[at]);
      }
    }
  }
  Tensor k = at::empty({g.c}, x.options().memory_format(at::MemoryFormat::Contiguous));
  scalar_t* kp = k.data_ptr<scalar_t>();
  for (int64_t ch = 0; ch < g.c; ++ch) {
    kp[ch] = static_cast<scalar_t>(sum[ch] / static_cast<double>(items * g.inner));
  }
  return k;
}

// Returns (shift K in x.dtype, mean float64, biased var float64), all (C,).
std::tuple<Tensor, Tensor, Tensor> stats(const Tensor& x, bool channels_last) {
  const Geometry g = geometry(x, channels_last);
  Tensor shift, sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_stats", [&] {
    shift = rough_mean<scalar_t>(x, g);
    StatsBody<scalar_t> body{x.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), g.c, g.inner};
    sums = channel_sums2_guarded<scalar_t>(g, body);
  });
  Tensor mean = at::empty({g.c}, at::kDouble), var = at::empty({g.c}, at::kDouble);
  const double* s = sums.data_ptr<double>();
  double* mp = mean.data_ptr<double>();
  double* vp = var.data_ptr<double>();
  Tensor shift64 = shift.to(at::kDouble);
  const double* kp = shift64.data_ptr<double>();
  const double m = static_cast<double>(g.m);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    const double mean_d = s[ch] / m;
    vp[ch] = std::max(s[g.c + ch] / m - mean_d * mean_d, 0.0);
    mp[ch] = kp[ch] + mean_d;
  }
  return {shift, mean, var};
}

// ---- the element-wise passes ---------------------------------------------------------------

// y = (x - K) * s + t  (s = gamma * invstd, t = beta - (mu - K) * s)
template <typename scalar_t>
void affine_pass(const Geometry& g, const scalar_t* x, const scalar_t* k, const scalar_t* s,
                 const scalar_t* t, scalar_t* y) {
  if (g.last) {
    const int64_t rows = g.n * g.inner;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / g.c), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* __restrict xr = x + r * g.c;
        scalar_t* __restrict yr = y + r * g.c;
#pragma omp simd
        for (int64_t j = 0; j < g.c; ++j) yr[j] = (xr[j] - k[j]) * s[j] + t[j];
      }
    });
  } else {
    const int64_t rows = g.n * g.c;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / g.inner), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t ch = r % g.c;
        const scalar_t kc = k[ch], sc = s[ch], tc = t[ch];
        const scalar_t* __restrict xr = x + r * g.inner;
        scalar_t* __restrict yr = y + r * g.inner;
#pragma omp simd
        for (int64_t i = 0; i < g.inner; ++i) yr[i] = (xr[i] - kc) * sc + tc;
      }
    });
  }
}

// dx = a * dy + b * (x - K) + c
template <typename scalar_t>
void backward_pass(const Geometry& g, const scalar_t* dy, const scalar_t* x, const scalar_t* k,
                   const scalar_t* a, const scalar_t* b, const scalar_t* c, scalar_t* dx) {
  if (g.last) {
    const int64_t rows = g.n * g.inner;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / g.c), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* __restrict dyr = dy + r * g.c;
        const scalar_t* __restrict xr = x + r * g.c;
        scalar_t* __restrict dxr = dx + r * g.c;
#pragma omp simd
        for (int64_t j = 0; j < g.c; ++j) dxr[j] = a[j] * dyr[j] + b[j] * (xr[j] - k[j]) + c[j];
      }
    });
  } else {
    const int64_t rows = g.n * g.c;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / g.inner), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t ch = r % g.c;
        const scalar_t kc = k[ch], ac = a[ch], bc = b[ch], cc = c[ch];
        const scalar_t* __restrict dyr = dy + r * g.inner;
        const scalar_t* __restrict xr = x + r * g.inner;
        scalar_t* __restrict dxr = dx + r * g.inner;
#pragma omp simd
        for (int64_t i = 0; i < g.inner; ++i) dxr[i] = ac * dyr[i] + bc * (xr[i] - kc) + cc;
      }
    });
  }
}

Tensor to_scalar(const std::vector<double>& v, const Tensor& like) {
  Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kDouble);
  std::copy(v.begin(), v.end(), t.data_ptr<double>());
  return t.to(like.scalar_type());
}

// y = gamma * (x - mu) * invstd + beta, written (x - K) * s + t' with s = gamma * invstd and
// t' = beta - (mu - K) * s computed per channel in float64.
Tensor normalize(const Tensor& x, const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                 const Tensor& weight, const Tensor& bias, bool channels_last) {
  const Geometry g = geometry(x, channels_last);
  Tensor k64 = shift.to(at::kDouble).contiguous(), mu = mean.to(at::kDouble).contiguous();
  Tensor is = invstd.to(at::kDouble).contiguous();
  Tensor w = weight.to(at::kDouble).contiguous(), bb = bias.to(at::kDouble).contiguous();
  std::vector<double> s(g.c), t(g.c);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    s[ch] = w.data_ptr<double>()[ch] * is.data_ptr<double>()[ch];
    t[ch] = bb.data_ptr<double>()[ch] - (mu.data_ptr<double>()[ch] - k64.data_ptr<double>()[ch]) * s[ch];
  }
  Tensor y = at::empty_like(x);
  Tensor st = to_scalar(s, x), tt = to_scalar(t, x), kt = shift.to(x.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_normalize", [&] {
    affine_pass<scalar_t>(g, x.data_ptr<scalar_t>(), kt.data_ptr<scalar_t>(),
                          st.data_ptr<scalar_t>(), tt.data_ptr<scalar_t>(), y.data_ptr<scalar_t>());
  });
  return y;
}

// ---- backward sums: sum(dy), sum(dy * (x - K)) ---------------------------------------------

template <typename scalar_t>
struct BackwardBody {
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* k;
  int64_t c, inner;
  template <typename acc_t>
  void row_first(int64_t r, int64_t i0, int64_t i1, acc_t& t0, acc_t& t1) const {
    const scalar_t* __restrict dyr = dy + r * inner;
    const scalar_t* __restrict xr = x + r * inner;
    const acc_t kc = static_cast<acc_t>(k[r % c]);
    acc_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = i0; i < i1; ++i) {
      const acc_t gy = static_cast<acc_t>(dyr[i]);
      a += gy;
      b += gy * (static_cast<acc_t>(xr[i]) - kc);
    }
    t0 += a;
    t1 += b;
  }
  template <typename acc_t>
  void row_last(int64_t r, acc_t* __restrict a, acc_t* __restrict b) const {
    const scalar_t* __restrict dyr = dy + r * c;
    const scalar_t* __restrict xr = x + r * c;
    const scalar_t* __restrict kk = k;
#pragma omp simd
    for (int64_t j = 0; j < c; ++j) {
      const acc_t gy = static_cast<acc_t>(dyr[j]);
      a[j] += gy;
      b[j] += gy * (static_cast<acc_t>(xr[j]) - static_cast<acc_t>(kk[j]));
    }
  }
};

// The closed-form backward (derivation in functional.batch_norm_backward):
//   dbeta  = sum(dy)                                                         term 1
//   dgamma = sum(dy * (x - mu)) * invstd                                     term 2
//   dx     = a * dy + b * (x - K) + c, per channel in float64:
//            a = gamma * invstd
//            b = -a * invstd^2 * sum(dy * (x - mu)) / m       (0 in evaluation mode)
//            c = -a * dbeta / m - b * (mu - K)                (0 in evaluation mode)
// with sum(dy * (x - mu)) = sum(dy * (x - K)) - (mu - K) * sum(dy).
// Returns (dx in x.dtype, dgamma float64, dbeta float64).
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& dy, const Tensor& x,
                                            const Tensor& shift, const Tensor& mean,
                                            const Tensor& invstd, const Tensor& weight,
                                            bool training, bool channels_last) {
  const Geometry g = geometry(x, channels_last);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.strides() == x.strides() &&
                  dy.scalar_type() == x.scalar_type(),
              "fused batch norm backward: dy must match x in shape, strides and dtype");
  Tensor kt = shift.to(x.scalar_type()).contiguous();
  Tensor sums;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_backward_sums", [&] {
    BackwardBody<scalar_t> body{dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                kt.data_ptr<scalar_t>(), g.c, g.inner};
    sums = channel_sums2_guarded<scalar_t>(g, body);
  });
  Tensor k64 = kt.to(at::kDouble), mu = mean.to(at::kDouble).contiguous();
  Tensor is = invstd.to(at::kDouble).contiguous(), w = weight.to(at::kDouble).contiguous();
  const double* s = sums.data_ptr<double>();
  const double m = static_cast<double>(g.m);
  Tensor dgamma = at::empty({g.c}, at::kDouble), dbeta = at::empty({g.c}, at::kDouble);
  std::vector<double> a(g.c), b(g.c, 0.0), c(g.c, 0.0);
  for (int64_t ch = 0; ch < g.c; ++ch) {
    const double mean_minus_k = mu.data_ptr<double>()[ch] - k64.data_ptr<double>()[ch];
    const double inv = is.data_ptr<double>()[ch];
    const double sum_dy = s[ch];
    const double sum_dy_xmu = s[g.c + ch] - mean_minus_k * sum_dy;
    dbeta.data_ptr<double>()[ch] = sum_dy;            // term 1
    dgamma.data_ptr<double>()[ch] = sum_dy_xmu * inv;  // term 2
    a[ch] = w.data_ptr<double>()[ch] * inv;
    if (training) {
      b[ch] = -a[ch] * inv * inv * sum_dy_xmu / m;
      c[ch] = -a[ch] * sum_dy / m - b[ch] * mean_minus_k;
    }
  }
  Tensor dx = at::empty_like(x);
  Tensor at_ = to_scalar(a, x), bt = to_scalar(b, x), ct = to_scalar(c, x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_batch_norm_backward", [&] {
    backward_pass<scalar_t>(g, dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                            kt.data_ptr<scalar_t>(), at_.data_ptr<scalar_t>(),
                            bt.data_ptr<scalar_t>(), ct.data_ptr<scalar_t>(),
                            dx.data_ptr<scalar_t>());
  });
  return {dx, dgamma, dbeta};
}

}  // namespace

TORCH_LIBRARY(bnlab_fused, m) {
  m.def("stats", &stats);
  m.def("normalize", &normalize);
  m.def("backward", &backward);
}
