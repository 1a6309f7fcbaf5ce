// paddlefsl: multi-threaded float32 CPU kernels for the memory-bound layers of few-shot
// CNNs (per-channel bias, ReLU, train-mode BatchNorm, max pooling), forward and first-order
// backward, and BatchNorm's double backward. Paddle 3.3.1's CPU kernels for these run on
// one thread and, for the per-channel broadcast and the BatchNorm statistics, 5-10x below
// memory bandwidth; these are plain loops the compiler vectorises, split over OpenMP
// threads.
//
// Built into the same library as _onednn_conv.cc (see _onednn_build.py) and, like those,
// raw: no grad ops, autograd is composed in Python (paddlefsl/ops/cpu_kernels.py). The
// OpenMP runtime is Paddle's libiomp5 (compiled with -fopenmp, linked without libgomp).
//
// Op names avoid the suffix "_grad", which Paddle reserves for the grad op of another op.
//
// Layout: every tensor is contiguous NCHW-like, [N, C, S] with S the product of the
// trailing dims (S = 1 for [N, C]).

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "paddle/extension.h"

namespace {

struct Dims {
  int64_t n, c, s;
};

void check_float(const char* op, const char* name, const paddle::Tensor& t) {
  PD_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, op, ": ", name, " must be float32");
}

Dims channel_dims(const char* op, const paddle::Tensor& x) {
  check_float(op, "x", x);
  const auto shape = x.shape();
  PD_CHECK(shape.size() >= 2, op, ": x must have a batch and a channel axis, got ",
           shape.size(), " dims");
  Dims d{shape[0], shape[1], 1};
  for (size_t i = 2; i < shape.size(); ++i) d.s *= shape[i];
  return d;
}

void check_vector(const char* op, const char* name, const paddle::Tensor& t, int64_t c) {
  check_float(op, name, t);
  PD_CHECK(t.numel() == c, op, ": ", name, " must have one entry per channel (", c,
           "), got ", t.numel());
}

void check_same(const char* op, const char* name, const paddle::Tensor& t,
                const paddle::Tensor& like) {
  check_float(op, name, t);
  PD_CHECK(t.shape() == like.shape(), op, ": ", name, " must have the shape of x");
}

paddle::Tensor contiguous(const paddle::Tensor& t) {
  return t.is_contiguous() ? t : t.contiguous();
}

paddle::Tensor new_like(const paddle::Tensor& t) {
  return paddle::empty(t.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
}

paddle::Tensor empty_vector(int64_t c) {
  return paddle::empty({c}, paddle::DataType::FLOAT32, paddle::CPUPlace());
}

int team(int threads, int64_t work) {
  // Below ~64k elements a parallel region costs more than it saves.
  return work < (int64_t{1} << 16) ? 1 : std::max(1, threads);
}

// Runs body(c) for every channel, channels split over the OpenMP team.
template <typename F>
void per_channel(const Dims& d, int threads, F body) {
#pragma omp parallel for num_threads(team(threads, d.n * d.c * d.s)) schedule(static)
  for (int64_t c = 0; c < d.c; ++c) body(c);
}

}  // namespace

// ------------------------------------------------------------------ per-channel bias

std::vector<paddle::Tensor> ChannelBiasAdd(const paddle::Tensor& x_in, const paddle::Tensor& b,
                                           int threads) {
  const char* op = "pfsl_channel_bias_add";
  const Dims d = channel_dims(op, x_in);
  check_vector(op, "b", b, d.c);
  const auto x = contiguous(x_in);
  auto y = new_like(x);
  const float* xp = x.data<float>();
  const float* bp = b.data<float>();
  float* yp = y.data<float>();
  const int64_t rows = d.n * d.c, s = d.s;
#pragma omp parallel for num_threads(team(threads, rows * s)) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float bias = bp[r % d.c];
    const float* xr = xp + r * s;
    float* yr = yp + r * s;
    for (int64_t i = 0; i < s; ++i) yr[i] = xr[i] + bias;
  }
  return {y};
}

std::vector<paddle::Tensor> ChannelSum(const paddle::Tensor& dy_in, int threads) {
  const char* op = "pfsl_channel_sum";
  const Dims d = channel_dims(op, dy_in);
  const auto dy = contiguous(dy_in);
  auto out = empty_vector(d.c);
  const float* p = dy.data<float>();
  float* o = out.data<float>();
  per_channel(d, threads, [&](int64_t c) {
    double total = 0.0;
    for (int64_t n = 0; n < d.n; ++n) {
      const float* row = p + (n * d.c + c) * d.s;
      float partial = 0.0f;
#pragma omp simd reduction(+ : partial)
      for (int64_t i = 0; i < d.s; ++i) partial += row[i];
      total += partial;
    }
    o[c] = static_cast<float>(total);
  });
  return {out};
}

// ---------------------------------------------------------------------------- ReLU

std::vector<paddle::Tensor> Relu(const paddle::Tensor& x_in, int threads) {
  check_float("pfsl_relu", "x", x_in);
  const auto x = contiguous(x_in);
  auto y = new_like(x);
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  const int64_t size = x.numel();
#pragma omp parallel for num_threads(team(threads, size)) schedule(static)
  for (int64_t i = 0; i < size; ++i) yp[i] = xp[i] > 0.0f ? xp[i] : 0.0f;
  return {y};
}

std::vector<paddle::Tensor> ReluGrad(const paddle::Tensor& y_in, const paddle::Tensor& dy_in,
                                     int threads) {
  const char* op = "pfsl_relu_backward";
  check_float(op, "y", y_in);
  check_same(op, "dy", dy_in, y_in);
  const auto y = contiguous(y_in);
  const auto dy = contiguous(dy_in);
  auto dx = new_like(y);
  const float* yp = y.data<float>();
  const float* gp = dy.data<float>();
  float* dp = dx.data<float>();
  const int64_t size = y.numel();
  // Both loads unconditional and `omp simd`: a branch on the sign would mispredict on
  // half the elements (5x slower than Paddle's kernel).
#pragma omp parallel for simd num_threads(team(threads, size)) schedule(static)
  for (int64_t i = 0; i < size; ++i) {
    const float g = gp[i];
    dp[i] = yp[i] > 0.0f ? g : 0.0f;
  }
  return {dx};
}

// ------------------------------------------------------------- train-mode BatchNorm

namespace {

// The affine map of channel c after normalisation: y = x * scale + shift. The forward and
// the fused ReLU backward both compute it from the same float inputs with the same two
// operations (no FMA contraction: the build targets baseline x86-64), so the backward's
// ReLU mask is exactly the forward's.
struct ChannelAffine {
  float scale, shift;
  ChannelAffine(float w, float b, float mean, float inv_std)
      : scale(w * inv_std), shift(b - mean * (w * inv_std)) {}
  float operator()(float x) const { return x * scale + shift; }
};

// y = w * (x - mean) / sqrt(var + eps) + b with the biased batch variance (as Paddle's
// kernel), then max(y, 0) when kRelu; updates the running statistics in place,
// running = m * running + (1 - m) * batch, and returns the batch mean and
// 1 / sqrt(var + eps) for the backward.
template <bool kRelu>
std::vector<paddle::Tensor> batch_norm_train(const char* op, const paddle::Tensor& x_in,
                                             const paddle::Tensor& w, const paddle::Tensor& b,
                                             const paddle::Tensor& running_mean,
                                             const paddle::Tensor& running_var, float momentum,
                                             float epsilon, int threads) {
  const Dims d = channel_dims(op, x_in);
  check_vector(op, "weight", w, d.c);
  check_vector(op, "bias", b, d.c);
  check_vector(op, "running_mean", running_mean, d.c);
  check_vector(op, "running_var", running_var, d.c);
  PD_CHECK(running_mean.is_contiguous() && running_var.is_contiguous(), op,
           ": running statistics must be contiguous");
  const auto x = contiguous(x_in);
  auto y = new_like(x);
  auto mean = empty_vector(d.c);
  auto inv_std = empty_vector(d.c);
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* bp = b.data<float>();
  // The running statistics are buffers updated in place, as Paddle's own kernel does.
  float* rm = const_cast<float*>(running_mean.data<float>());
  float* rv = const_cast<float*>(running_var.data<float>());
  float* yp = y.data<float>();
  float* mp = mean.data<float>();
  float* ip = inv_std.data<float>();
  const double count = static_cast<double>(d.n * d.s);
  per_channel(d, threads, [&](int64_t c) {
    // One pass for both moments, on data shifted by the channel's first value: with the
    // shift within a few standard deviations of the mean, E[d^2] - E[d]^2 keeps its
    // precision (the shifted-data algorithm), and the data is read twice instead of 3x.
    const float shift0 = count > 0 ? xp[c * d.s] : 0.0f;
    double sum = 0.0, squares = 0.0;
    for (int64_t n = 0; n < d.n; ++n) {
      const float* row = xp + (n * d.c + c) * d.s;
      float partial = 0.0f, partial_squares = 0.0f;
#pragma omp simd reduction(+ : partial, partial_squares)
      for (int64_t i = 0; i < d.s; ++i) {
        const float shifted = row[i] - shift0;
        partial += shifted;
        partial_squares += shifted * shifted;
      }
      sum += partial;
      squares += partial_squares;
    }
    const double shifted_mean = count > 0 ? sum / count : 0.0;
    const double mu = shift0 + shifted_mean;
    const float muf = static_cast<float>(mu);
    const double var =
        count > 0 ? std::max(squares / count - shifted_mean * shifted_mean, 0.0) : 0.0;
    const float inv = static_cast<float>(1.0 / std::sqrt(var + epsilon));
    const ChannelAffine affine(wp[c], bp[c], muf, inv);
    for (int64_t n = 0; n < d.n; ++n) {
      const float* row = xp + (n * d.c + c) * d.s;
      float* out = yp + (n * d.c + c) * d.s;
      for (int64_t i = 0; i < d.s; ++i) {
        const float y = affine(row[i]);
        out[i] = kRelu ? (y > 0.0f ? y : 0.0f) : y;
      }
    }
    mp[c] = muf;
    ip[c] = inv;
    rm[c] = momentum * rm[c] + (1.0f - momentum) * muf;
    rv[c] = momentum * rv[c] + (1.0f - momentum) * static_cast<float>(var);
  });
  return {y, mean, inv_std};
}

// First-order backward of the above: x_hat = (x - mean) * inv_std,
// db = sum g, dw = sum g * x_hat, dx = w * inv_std * (g - db / M - x_hat * dw / M), where
// g = dy, or with kRelu g = dy where the forward's pre-ReLU output was positive, else 0
// (the mask recomputed from x, so the output need not be read; b only serves the mask).
template <bool kRelu>
std::vector<paddle::Tensor> batch_norm_backward(const char* op, const paddle::Tensor& x_in,
                                                const paddle::Tensor& dy_in,
                                                const paddle::Tensor& w, const paddle::Tensor& b,
                                                const paddle::Tensor& mean,
                                                const paddle::Tensor& inv_std, int threads) {
  const Dims d = channel_dims(op, x_in);
  check_same(op, "dy", dy_in, x_in);
  check_vector(op, "weight", w, d.c);
  if (kRelu) check_vector(op, "bias", b, d.c);
  check_vector(op, "mean", mean, d.c);
  check_vector(op, "inv_std", inv_std, d.c);
  const auto x = contiguous(x_in);
  const auto dy = contiguous(dy_in);
  auto dx = new_like(x);
  auto dw = empty_vector(d.c);
  auto db = empty_vector(d.c);
  const float* xp = x.data<float>();
  const float* gp = dy.data<float>();
  const float* wp = w.data<float>();
  const float* mp = mean.data<float>();
  const float* ip = inv_std.data<float>();
  const float* bp = kRelu ? b.data<float>() : nullptr;
  float* dxp = dx.data<float>();
  float* dwp = dw.data<float>();
  float* dbp = db.data<float>();
  const double count = static_cast<double>(d.n * d.s);
  per_channel(d, threads, [&](int64_t c) {
    const float mu = mp[c], inv = ip[c];
    const ChannelAffine affine(wp[c], kRelu ? bp[c] : 0.0f, mu, inv);
    // The gradient reaching the normalisation: dy, through the ReLU's mask when fused.
    auto grad = [&](float x, float dy) { return !kRelu || affine(x) > 0.0f ? dy : 0.0f; };
    double sum_dy = 0.0, sum_dy_xhat = 0.0;
    for (int64_t n = 0; n < d.n; ++n) {
      const float* xr = xp + (n * d.c + c) * d.s;
      const float* gr = gp + (n * d.c + c) * d.s;
      float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = 0; i < d.s; ++i) {
        const float g = grad(xr[i], gr[i]);
        a += g;
        b += g * (xr[i] - mu);
      }
      sum_dy += a;
      sum_dy_xhat += b;
    }
    sum_dy_xhat *= inv;
    dbp[c] = static_cast<float>(sum_dy);
    dwp[c] = static_cast<float>(sum_dy_xhat);
    const float scale = wp[c] * inv;
    const float mean_dy = count > 0 ? static_cast<float>(sum_dy / count) : 0.0f;
    // x_hat * dw / M = (x - mu) * inv * dw / M
    const float slope = count > 0 ? static_cast<float>(sum_dy_xhat / count) * inv : 0.0f;
    for (int64_t n = 0; n < d.n; ++n) {
      const float* xr = xp + (n * d.c + c) * d.s;
      const float* gr = gp + (n * d.c + c) * d.s;
      float* out = dxp + (n * d.c + c) * d.s;
      for (int64_t i = 0; i < d.s; ++i)
        out[i] = scale * (grad(xr[i], gr[i]) - mean_dy - (xr[i] - mu) * slope);
    }
  });
  return {dx, dw, db};
}

}  // namespace

std::vector<paddle::Tensor> BatchNormTrain(const paddle::Tensor& x, const paddle::Tensor& w,
                                           const paddle::Tensor& b,
                                           const paddle::Tensor& running_mean,
                                           const paddle::Tensor& running_var, float momentum,
                                           float epsilon, int threads) {
  return batch_norm_train<false>("pfsl_batch_norm_train", x, w, b, running_mean, running_var,
                                 momentum, epsilon, threads);
}

std::vector<paddle::Tensor> BatchNormReluTrain(const paddle::Tensor& x, const paddle::Tensor& w,
                                               const paddle::Tensor& b,
                                               const paddle::Tensor& running_mean,
                                               const paddle::Tensor& running_var,
                                               float momentum, float epsilon, int threads) {
  return batch_norm_train<true>("pfsl_batch_norm_relu_train", x, w, b, running_mean,
                                running_var, momentum, epsilon, threads);
}

std::vector<paddle::Tensor> BatchNormGrad(const paddle::Tensor& x, const paddle::Tensor& dy,
                                          const paddle::Tensor& w, const paddle::Tensor& mean,
                                          const paddle::Tensor& inv_std, int threads) {
  return batch_norm_backward<false>("pfsl_batch_norm_backward", x, dy, w, w, mean, inv_std,
                                    threads);
}

std::vector<paddle::Tensor> BatchNormReluGrad(const paddle::Tensor& x, const paddle::Tensor& dy,
                                              const paddle::Tensor& w, const paddle::Tensor& b,
                                              const paddle::Tensor& mean,
                                              const paddle::Tensor& inv_std, int threads) {
  return batch_norm_backward<true>("pfsl_batch_norm_relu_backward", x, dy, w, b, mean, inv_std,
                                   threads);
}

// dz where the fused forward's pre-ReLU output w * (x - mean) * inv_std + b was positive,
// else 0: the ReLU part of BatchNormReluGrad alone, the mask recomputed from x exactly as
// the forward computed it. Linear in dz, so it is also its own vector-Jacobian product.
std::vector<paddle::Tensor> ReluMask(const paddle::Tensor& x_in, const paddle::Tensor& dz_in,
                                     const paddle::Tensor& w, const paddle::Tensor& b,
                                     const paddle::Tensor& mean, const paddle::Tensor& inv_std,
                                     int threads) {
  const char* op = "pfsl_batch_norm_relu_mask";
  const Dims d = channel_dims(op, x_in);
  check_same(op, "dz", dz_in, x_in);
  check_vector(op, "weight", w, d.c);
  check_vector(op, "bias", b, d.c);
  check_vector(op, "mean", mean, d.c);
  check_vector(op, "inv_std", inv_std, d.c);
  const auto x = contiguous(x_in);
  const auto dz = contiguous(dz_in);
  auto out = new_like(x);
  const float* xp = x.data<float>();
  const float* gp = dz.data<float>();
  const float* wp = w.data<float>();
  const float* bp = b.data<float>();
  const float* mp = mean.data<float>();
  const float* ip = inv_std.data<float>();
  float* out_p = out.data<float>();
  per_channel(d, threads, [&](int64_t c) {
    const ChannelAffine affine(wp[c], bp[c], mp[c], ip[c]);
    for (int64_t n = 0; n < d.n; ++n) {
      const int64_t row = (n * d.c + c) * d.s;
      for (int64_t i = 0; i < d.s; ++i)
        out_p[row + i] = affine(xp[row + i]) > 0.0f ? gp[row + i] : 0.0f;
    }
  });
  return {out};
}

// Double backward of train-mode BatchNorm: the vector-Jacobian product of
// (dx, dw, db) = BatchNormGrad(x, dy, w) with upstream gradients (ddx, ddw, ddb), i.e. the
// gradients of  sum(ddx * dx) + ddw . dw + ddb . db  with respect to x, w and dy, with the
// dependence of the batch statistics on x included. Per channel, with M elements,
// x_hat = (x - mean) * r, s = sum dy * x_hat, q = dy - mean(dy) - x_hat * s / M,
// C = sum ddx, B = sum ddx * x_hat, A = sum ddx * dy - C * mean(dy):
//   gw  = r * (A - s * B / M)
//   gx  = ddw * r * q + w * r^2 / M * (s * C / M - A * x_hat - s * ddx
//                                      + 2 * s * B / M * x_hat - B * q)
//   gdy = ddb + ddw * x_hat + w * r * (ddx - C / M - x_hat * B / M)
// `present` says which upstream gradients exist (bit 0: ddx, 1: ddw, 2: ddb); a missing one
// is zero and its tensor argument is not read (any float32 tensor may stand in for it).
// With kRelu, the same for BatchNormReluGrad: dy is dz through the fused forward's ReLU
// mask (recomputed from x, b and the statistics exactly as the forward computed it), and
// the gradient returned for dz is gdy through the same mask.
namespace {
template <bool kRelu>
std::vector<paddle::Tensor> batch_norm_double_backward(
    const char* op, const paddle::Tensor& x_in, const paddle::Tensor& dy_in,
    const paddle::Tensor& w, const paddle::Tensor& b, const paddle::Tensor& mean,
    const paddle::Tensor& inv_std, const paddle::Tensor& ddx_in, const paddle::Tensor& ddw,
    const paddle::Tensor& ddb, int present, int threads) {
  const Dims d = channel_dims(op, x_in);
  check_same(op, "dy", dy_in, x_in);
  check_vector(op, "weight", w, d.c);
  if (kRelu) check_vector(op, "bias", b, d.c);
  check_vector(op, "mean", mean, d.c);
  check_vector(op, "inv_std", inv_std, d.c);
  PD_CHECK(present >= 0 && present <= 7, op, ": present must be a 3-bit mask, got ", present);
  const bool has_ddx = present & 1, has_ddw = present & 2, has_ddb = present & 4;
  if (has_ddx) check_same(op, "ddx", ddx_in, x_in);
  if (has_ddw) check_vector(op, "ddw", ddw, d.c);
  if (has_ddb) check_vector(op, "ddb", ddb, d.c);
  const auto x = contiguous(x_in);
  const auto dy = contiguous(dy_in);
  const auto ddx = has_ddx ? contiguous(ddx_in) : x;  // never read when absent
  auto gx = new_like(x);
  auto gw = empty_vector(d.c);
  auto gdy = new_like(x);
  const float* xp = x.data<float>();
  const float* gp = dy.data<float>();
  const float* hp = ddx.data<float>();
  const float* wp = w.data<float>();
  const float* bp = kRelu ? b.data<float>() : nullptr;
  const float* mp = mean.data<float>();
  const float* ip = inv_std.data<float>();
  const float* ddwp = has_ddw ? ddw.data<float>() : nullptr;
  const float* ddbp = has_ddb ? ddb.data<float>() : nullptr;
  float* gxp = gx.data<float>();
  float* gwp = gw.data<float>();
  float* gdyp = gdy.data<float>();
  const double count = static_cast<double>(d.n * d.s);
  per_channel(d, threads, [&](int64_t c) {
    const float mu = mp[c], r = ip[c];
    const ChannelAffine affine(wp[c], kRelu ? bp[c] : 0.0f, mu, r);
    auto pass = [&](float x) { return !kRelu || affine(x) > 0.0f; };
    auto grad = [&](float x, float dy) { return pass(x) ? dy : 0.0f; };
    // Sums of dy, dy * (x - mu), ddx, ddx * (x - mu), ddx * dy over the channel.
    double s_dy = 0.0, s_dyc = 0.0, s_h = 0.0, s_hc = 0.0, s_hdy = 0.0;
    for (int64_t n = 0; n < d.n; ++n) {
      const int64_t off = (n * d.c + c) * d.s;
      const float* xr = xp + off;
      const float* gr = gp + off;
      float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = 0; i < d.s; ++i) {
        const float g = grad(xr[i], gr[i]);
        a += g;
        b += g * (xr[i] - mu);
      }
      s_dy += a;
      s_dyc += b;
      if (has_ddx) {
        const float* hr = hp + off;
        float e = 0.0f, f = 0.0f, g = 0.0f;
#pragma omp simd reduction(+ : e, f, g)
        for (int64_t i = 0; i < d.s; ++i) {
          e += hr[i];
          f += hr[i] * (xr[i] - mu);
          g += hr[i] * grad(xr[i], gr[i]);
        }
        s_h += e;
        s_hc += f;
        s_hdy += g;
      }
    }
    const double m = count > 0 ? count : 1.0;
    const double rr = r, wc = wp[c];
    const double mean_dy = s_dy / m;
    const double s = s_dyc * rr;                 // sum dy * x_hat
    const double big_c = s_h;                     // sum ddx
    const double big_b = s_hc * rr;               // sum ddx * x_hat
    const double big_a = s_hdy - big_c * mean_dy;  // sum ddx * (dy - mean(dy))
    const double dw_up = has_ddw ? ddwp[c] : 0.0;
    const double db_up = has_ddb ? ddbp[c] : 0.0;
    gwp[c] = static_cast<float>(rr * (big_a - s * big_b / m));
    // gx = k_q * q + k_h * ddx + k_xh * x_hat + k_0, with q = dy - mean(dy) - x_hat * s / M.
    const double outer = wc * rr * rr / m;
    const double k_q = dw_up * rr - outer * big_b;
    const double k_h = -outer * s;
    const double k_xh = outer * (2.0 * s * big_b / m - big_a);
    const double k_0 = outer * s * big_c / m;
    // Expanded over dy, ddx and (x - mu) for the inner loop:
    const float a_dy = static_cast<float>(k_q);
    const float a_h = static_cast<float>(k_h);
    const float a_xc = static_cast<float>((k_xh - k_q * s / m) * rr);
    const float a_0 = static_cast<float>(k_0 - k_q * mean_dy);
    // gdy = ddb + ddw * x_hat + w * r * (ddx - C / M - x_hat * B / M)
    const float b_h = static_cast<float>(wc * rr);
    const float b_xc = static_cast<float>((dw_up - wc * rr * big_b / m) * rr);
    const float b_0 = static_cast<float>(db_up - wc * rr * big_c / m);
    for (int64_t n = 0; n < d.n; ++n) {
      const int64_t off = (n * d.c + c) * d.s;
      const float* xr = xp + off;
      const float* gr = gp + off;
      float* ox = gxp + off;
      float* ody = gdyp + off;
      if (has_ddx) {
        const float* hr = hp + off;
#pragma omp simd
        for (int64_t i = 0; i < d.s; ++i) {
          const float xc = xr[i] - mu;
          const bool on = pass(xr[i]);
          ox[i] = a_dy * (on ? gr[i] : 0.0f) + a_h * hr[i] + a_xc * xc + a_0;
          ody[i] = on ? b_h * hr[i] + b_xc * xc + b_0 : 0.0f;
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < d.s; ++i) {
          const float xc = xr[i] - mu;
          const bool on = pass(xr[i]);
          ox[i] = a_dy * (on ? gr[i] : 0.0f) + a_xc * xc + a_0;
          ody[i] = on ? b_xc * xc + b_0 : 0.0f;
        }
      }
    }
  });
  return {gx, gw, gdy};
}
}  // namespace

std::vector<paddle::Tensor> BatchNormDoubleGrad(
    const paddle::Tensor& x, const paddle::Tensor& dy, const paddle::Tensor& w,
    const paddle::Tensor& mean, const paddle::Tensor& inv_std, const paddle::Tensor& ddx,
    const paddle::Tensor& ddw, const paddle::Tensor& ddb, int present, int threads) {
  return batch_norm_double_backward<false>("pfsl_batch_norm_double_backward", x, dy, w, w,
                                           mean, inv_std, ddx, ddw, ddb, present, threads);
}

std::vector<paddle::Tensor> BatchNormReluDoubleGrad(
    const paddle::Tensor& x, const paddle::Tensor& dz, const paddle::Tensor& w,
    const paddle::Tensor& b, const paddle::Tensor& mean, const paddle::Tensor& inv_std,
    const paddle::Tensor& ddx, const paddle::Tensor& ddw, const paddle::Tensor& ddb, int present,
    int threads) {
  return batch_norm_double_backward<true>("pfsl_batch_norm_relu_double_backward", x, dz, w, b,
                                          mean, inv_std, ddx, ddw, ddb, present, threads);
}

// -------------------------------------------------------------------- max pooling

namespace {
struct Pool {
  int64_t h, w, oh, ow;
  int kh, kw, sh, sw, ph, pw;
};

Pool make_pool(const char* op, const std::vector<int64_t>& shape, const std::vector<int>& kernel,
               const std::vector<int>& strides, const std::vector<int>& paddings) {
  PD_CHECK(shape.size() == 4, op, ": x must be 4-D NCHW, got ", shape.size(), " dims");
  PD_CHECK(kernel.size() == 2 && strides.size() == 2 && paddings.size() == 2, op,
           ": kernel, strides and paddings take 2 values each");
  Pool p{shape[2], shape[3], 0, 0, kernel[0], kernel[1],
         strides[0], strides[1], paddings[0], paddings[1]};
  PD_CHECK(p.kh > 0 && p.kw > 0 && p.sh > 0 && p.sw > 0 && p.ph >= 0 && p.pw >= 0, op,
           ": kernel and strides must be positive, paddings non-negative");
  PD_CHECK(p.ph < p.kh && p.pw < p.kw, op, ": padding must be smaller than the kernel");
  p.oh = (p.h + 2 * p.ph - p.kh) / p.sh + 1;
  p.ow = (p.w + 2 * p.pw - p.kw) / p.sw + 1;
  PD_CHECK(p.oh > 0 && p.ow > 0, op, ": the window is larger than the padded input");
  return p;
}
}  // namespace

// Index = position of the window's first maximum in the input plane (h * W + w), as
// Paddle's max_pool2d_with_index.
std::vector<paddle::Tensor> MaxPool2d(const paddle::Tensor& x_in, const std::vector<int>& kernel,
                                      const std::vector<int>& strides,
                                      const std::vector<int>& paddings, int threads) {
  const char* op = "pfsl_max_pool2d";
  check_float(op, "x", x_in);
  const auto shape = x_in.shape();
  const Pool p = make_pool(op, shape, kernel, strides, paddings);
  const auto x = contiguous(x_in);
  const int64_t planes = shape[0] * shape[1];
  auto y = paddle::empty({shape[0], shape[1], p.oh, p.ow}, paddle::DataType::FLOAT32,
                         paddle::CPUPlace());
  auto index = paddle::empty({shape[0], shape[1], p.oh, p.ow}, paddle::DataType::INT32,
                             paddle::CPUPlace());
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  int32_t* ip = index.data<int32_t>();
#pragma omp parallel for num_threads(team(threads, planes * p.h * p.w)) schedule(static)
  for (int64_t plane = 0; plane < planes; ++plane) {
    const float* in = xp + plane * p.h * p.w;
    float* out = yp + plane * p.oh * p.ow;
    int32_t* idx = ip + plane * p.oh * p.ow;
    for (int64_t oh = 0; oh < p.oh; ++oh) {
      const int64_t h0 = std::max<int64_t>(oh * p.sh - p.ph, 0);
      const int64_t h1 = std::min<int64_t>(oh * p.sh - p.ph + p.kh, p.h);
      for (int64_t ow = 0; ow < p.ow; ++ow) {
        const int64_t w0 = std::max<int64_t>(ow * p.sw - p.pw, 0);
        const int64_t w1 = std::min<int64_t>(ow * p.sw - p.pw + p.kw, p.w);
        float best = -std::numeric_limits<float>::max();
        int64_t where = h0 * p.w + w0;
        for (int64_t h = h0; h < h1; ++h)
          for (int64_t w = w0; w < w1; ++w)
            if (in[h * p.w + w] > best) {
              best = in[h * p.w + w];
              where = h * p.w + w;
            }
        out[oh * p.ow + ow] = best;
        idx[oh * p.ow + ow] = static_cast<int32_t>(where);
      }
    }
  }
  return {y, index};
}

std::vector<paddle::Tensor> MaxPool2dGrad(const paddle::Tensor& index_in,
                                          const paddle::Tensor& dy_in,
                                          const std::vector<int>& input_hw, int threads) {
  const char* op = "pfsl_max_pool2d_backward";
  check_float(op, "dy", dy_in);
  PD_CHECK(index_in.dtype() == paddle::DataType::INT32, op, ": index must be int32");
  PD_CHECK(index_in.shape() == dy_in.shape(), op, ": index must have the shape of dy");
  PD_CHECK(dy_in.shape().size() == 4 && input_hw.size() == 2, op,
           ": dy must be 4-D and input_hw 2 values");
  const auto dy = contiguous(dy_in);
  const auto index = contiguous(index_in);
  const auto shape = dy.shape();
  const int64_t planes = shape[0] * shape[1], outs = shape[2] * shape[3];
  const int64_t ins = int64_t{input_hw[0]} * input_hw[1];
  auto dx = paddle::empty({shape[0], shape[1], input_hw[0], input_hw[1]},
                          paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* gp = dy.data<float>();
  const int32_t* ip = index.data<int32_t>();
  float* dp = dx.data<float>();
#pragma omp parallel for num_threads(team(threads, planes * ins)) schedule(static)
  for (int64_t plane = 0; plane < planes; ++plane) {
    float* out = dp + plane * ins;
    std::memset(out, 0, sizeof(float) * ins);
    const float* g = gp + plane * outs;
    const int32_t* idx = ip + plane * outs;
    for (int64_t i = 0; i < outs; ++i) out[idx[i]] += g[i];
  }
  return {dx};
}

// ------------------------------------------------------- shape / dtype inference
// Only used when building a static graph; dims may be -1 (unknown) there.

namespace {
using Shape = std::vector<int64_t>;
Shape channels(const Shape& x) { return {x.size() > 1 ? x[1] : -1}; }
int64_t pooled(int64_t in, int k, int s, int p) { return in < 0 ? -1 : (in + 2 * p - k) / s + 1; }
}  // namespace

std::vector<Shape> SameShape(const Shape& x, const Shape&) { return {x}; }
std::vector<Shape> OneShape(const Shape& x) { return {x}; }
std::vector<Shape> ChannelShape(const Shape& x) { return {channels(x)}; }
// Both BatchNorm ops: a tensor shaped like x, then two per-channel vectors.
std::vector<Shape> XAndTwoChannelShapes(const Shape& x, const Shape&, const Shape&, const Shape&,
                                        const Shape&) {
  return {x, channels(x), channels(x)};
}
std::vector<Shape> XAndTwoChannelShapesOf6(const Shape& x, const Shape&, const Shape&,
                                            const Shape&, const Shape&, const Shape&) {
  return {x, channels(x), channels(x)};
}
std::vector<Shape> SameShapeOf6(const Shape& x, const Shape&, const Shape&, const Shape&,
                                const Shape&, const Shape&) {
  return {x};
}
// Double backward: gx and gdy shaped like x, gw per channel.
std::vector<Shape> DoubleGradShapes(const Shape& x, const Shape&, const Shape&, const Shape&,
                                    const Shape&, const Shape&, const Shape&, const Shape&) {
  return {x, channels(x), x};
}
std::vector<Shape> DoubleGradShapesOf9(const Shape& x, const Shape&, const Shape&, const Shape&,
                                       const Shape&, const Shape&, const Shape&, const Shape&,
                                       const Shape&) {
  return {x, channels(x), x};
}
std::vector<Shape> MaxPoolShape(const Shape& x, const std::vector<int>& k,
                                const std::vector<int>& s, const std::vector<int>& p) {
  const Shape y{x[0], x[1], pooled(x[2], k[0], s[0], p[0]), pooled(x[3], k[1], s[1], p[1])};
  return {y, y};
}
std::vector<Shape> MaxPoolGradShape(const Shape&, const Shape& dy, const std::vector<int>& hw) {
  return {{dy[0], dy[1], hw[0], hw[1]}};
}

using DType = paddle::DataType;
std::vector<DType> F32x1(const DType&) { return {DType::FLOAT32}; }
std::vector<DType> F32x1Of2(const DType&, const DType&) { return {DType::FLOAT32}; }
std::vector<DType> F32x3Of5(const DType&, const DType&, const DType&, const DType&,
                            const DType&) {
  return {DType::FLOAT32, DType::FLOAT32, DType::FLOAT32};
}
std::vector<DType> F32x1Of6(const DType&, const DType&, const DType&, const DType&,
                            const DType&, const DType&) {
  return {DType::FLOAT32};
}
std::vector<DType> F32x3Of6(const DType&, const DType&, const DType&, const DType&,
                            const DType&, const DType&) {
  return {DType::FLOAT32, DType::FLOAT32, DType::FLOAT32};
}
std::vector<DType> F32x3Of8(const DType&, const DType&, const DType&, const DType&,
                            const DType&, const DType&, const DType&, const DType&) {
  return {DType::FLOAT32, DType::FLOAT32, DType::FLOAT32};
}
std::vector<DType> F32x3Of9(const DType&, const DType&, const DType&, const DType&,
                            const DType&, const DType&, const DType&, const DType&,
                            const DType&) {
  return {DType::FLOAT32, DType::FLOAT32, DType::FLOAT32};
}
std::vector<DType> PoolTypes(const DType&) { return {DType::FLOAT32, DType::INT32}; }

PD_BUILD_OP(pfsl_channel_bias_add)
    .Inputs({"X", "B"})
    .Outputs({"Y"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(ChannelBiasAdd))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x1Of2));

PD_BUILD_OP(pfsl_channel_sum)
    .Inputs({"DY"})
    .Outputs({"S"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(ChannelSum))
    .SetInferShapeFn(PD_INFER_SHAPE(ChannelShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x1));

PD_BUILD_OP(pfsl_relu)
    .Inputs({"X"})
    .Outputs({"Y"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(Relu))
    .SetInferShapeFn(PD_INFER_SHAPE(OneShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x1));

PD_BUILD_OP(pfsl_relu_backward)
    .Inputs({"Y", "DY"})
    .Outputs({"DX"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(ReluGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x1Of2));

PD_BUILD_OP(pfsl_batch_norm_train)
    .Inputs({"X", "W", "B", "RunningMean", "RunningVar"})
    .Outputs({"Y", "Mean", "InvStd"})
    .Attrs({"momentum: float", "epsilon: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(BatchNormTrain))
    .SetInferShapeFn(PD_INFER_SHAPE(XAndTwoChannelShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x3Of5));

PD_BUILD_OP(pfsl_batch_norm_backward)
    .Inputs({"X", "DY", "W", "Mean", "InvStd"})
    .Outputs({"DX", "DW", "DB"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(BatchNormGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(XAndTwoChannelShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x3Of5));

PD_BUILD_OP(pfsl_batch_norm_relu_train)
    .Inputs({"X", "W", "B", "RunningMean", "RunningVar"})
    .Outputs({"Y", "Mean", "InvStd"})
    .Attrs({"momentum: float", "epsilon: float", "threads: int"})
    .SetKernelFn(PD_KERNEL(BatchNormReluTrain))
    .SetInferShapeFn(PD_INFER_SHAPE(XAndTwoChannelShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x3Of5));

PD_BUILD_OP(pfsl_batch_norm_relu_backward)
    .Inputs({"X", "DY", "W", "B", "Mean", "InvStd"})
    .Outputs({"DX", "DW", "DB"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(BatchNormReluGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(XAndTwoChannelShapesOf6))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x3Of6));

PD_BUILD_OP(pfsl_batch_norm_relu_mask)
    .Inputs({"X", "DZ", "W", "B", "Mean", "InvStd"})
    .Outputs({"DY"})
    .Attrs({"threads: int"})
    .SetKernelFn(PD_KERNEL(ReluMask))
    .SetInferShapeFn(PD_INFER_SHAPE(SameShapeOf6))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x1Of6));

PD_BUILD_OP(pfsl_batch_norm_double_backward)
    .Inputs({"X", "DY", "W", "Mean", "InvStd", "DDX", "DDW", "DDB"})
    .Outputs({"GX", "GW", "GDY"})
    .Attrs({"present: int", "threads: int"})
    .SetKernelFn(PD_KERNEL(BatchNormDoubleGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(DoubleGradShapes))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x3Of8));

PD_BUILD_OP(pfsl_batch_norm_relu_double_backward)
    .Inputs({"X", "DZ", "W", "B", "Mean", "InvStd", "DDX", "DDW", "DDB"})
    .Outputs({"GX", "GW", "GDZ"})
    .Attrs({"present: int", "threads: int"})
    .SetKernelFn(PD_KERNEL(BatchNormReluDoubleGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(DoubleGradShapesOf9))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x3Of9));

PD_BUILD_OP(pfsl_max_pool2d)
    .Inputs({"X"})
    .Outputs({"Y", "Index"})
    .Attrs({"kernel: std::vector<int>", "strides: std::vector<int>",
            "paddings: std::vector<int>", "threads: int"})
    .SetKernelFn(PD_KERNEL(MaxPool2d))
    .SetInferShapeFn(PD_INFER_SHAPE(MaxPoolShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(PoolTypes));

PD_BUILD_OP(pfsl_max_pool2d_backward)
    .Inputs({"Index", "DY"})
    .Outputs({"DX"})
    .Attrs({"input_hw: std::vector<int>", "threads: int"})
    .SetKernelFn(PD_KERNEL(MaxPool2dGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(MaxPoolGradShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(F32x1Of2));
