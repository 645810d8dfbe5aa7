// Instance norm followed by a leaky ReLU, float32, channels-last: XLA FFI handlers for the CPU
// backend, forward and backward, each two passes over the activations.
//
// Why: XLA:CPU runs the pair as separate reductions and elementwise passes, about ten passes'
// worth of memory traffic (docs/performance-kernels.md has the figures). A U-Net repeats it
// after every convolution. Here the forward reads x twice (statistics, then y) and the backward
// reads x and dy twice (two sums per channel, then dx = k1·dz + k2·(x − μ) + k3 per channel).
//
// Layouts: x, y, dy, dx [N, S, C] (S the spatial voxels, flattened); scale, bias [C]; mean,
// rstd [N, C]. The backward returns the per-sample sums Σdz·x̂ and Σdz ([N, C]) from which the
// caller adds the scale and bias gradients over the batch (a sum over sharded samples too).
//
// Sums: of x less the sample's first voxel (digits kept where the mean is far from 0). Each
// sample's voxels are cut into a fixed number of runs, each summed in float over short
// stretches and in double across them, and the runs are added in order: the result is the
// same to the last bit for any thread count and schedule.
// medjax/ops/cpu/onednn.py builds this file into the same library as onednn_conv.cc.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRuns = 16;     // runs per sample: enough to keep 2–16 threads busy
constexpr int64_t kStretch = 64;  // voxels summed in float (in L1) before the double sums
#define MEDJAX_AVX2 __attribute__((target("avx2,fma")))

struct Layout {
  int64_t N, S, C;
};

ffi::Error LayoutOf(ffi::Span<const int64_t> d, int64_t channels, Layout* out) {
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")))
    return ffi::Error(ffi::ErrorCode::kUnimplemented, "instance norm: needs AVX2 and FMA");
  if (d.size() < 3)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "instance norm: x needs batch, spatial and channel axes");
  int64_t s = 1;
  for (size_t i = 1; i + 1 < d.size(); ++i) s *= d[i];
  *out = Layout{d[0], s, d[d.size() - 1]};
  if (out->C != channels || out->C % 8)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "instance norm: channels must be a multiple of 8, with one scale and "
                      "bias entry each");
  if (out->S == 0)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "instance norm: no spatial voxels");
  return ffi::Error::Success();
}

// The voxels [begin, end) of run r of sample n.
inline int64_t RunBegin(const Layout& l, int64_t r) { return r * l.S / kRuns; }

// The leaky ReLU's slope mask: z itself where z > 0, else slope·z (also right for slope > 1).
MEDJAX_AVX2 inline __m256 LeakyMask(__m256 z, __m256 v, __m256 slope) {
  return _mm256_blendv_ps(_mm256_mul_ps(v, slope), v, _mm256_cmp_ps(z, _mm256_setzero_ps(),
                                                                    _CMP_GT_OQ));
}

MEDJAX_AVX2 inline void AddToDouble(__m256 f, double* to) {
  _mm256_storeu_pd(to, _mm256_add_pd(_mm256_loadu_pd(to),
                                     _mm256_cvtps_pd(_mm256_castps256_ps128(f))));
  _mm256_storeu_pd(to + 4, _mm256_add_pd(_mm256_loadu_pd(to + 4),
                                         _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1))));
}

// Runs every (sample, run) task over the threads, then adds each sample's run sums in order:
// run(n, begin, end, f, g) adds its voxels' two sums per channel into f, g [C] (double).
template <typename Run>
void SumsPerSample(const Layout& l, int64_t threads, Run run, double* sum_f, double* sum_g) {
  const int64_t C = l.C, tasks = l.N * kRuns;
  std::vector<double> part_f(tasks * C, 0.0), part_g(tasks * C, 0.0);
#pragma omp parallel for schedule(dynamic) num_threads(static_cast<int>(threads))
  for (int64_t t = 0; t < tasks; ++t)
    run(t / kRuns, RunBegin(l, t % kRuns), RunBegin(l, t % kRuns + 1), &part_f[t * C],
        &part_g[t * C]);
  for (int64_t n = 0; n < l.N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      double f = 0.0, g = 0.0;
      for (int64_t r = 0; r < kRuns; ++r)
        f += part_f[(n * kRuns + r) * C + c], g += part_g[(n * kRuns + r) * C + c];
      sum_f[n * C + c] = f, sum_g[n * C + c] = g;
    }
}

// Σ(x − k) and Σ(x − k)² of sample n's voxels [begin, end), k [C] the sample's first voxel:
// sums of values near 0 keep their digits where the mean is far from 0 against the spread.
MEDJAX_AVX2 void MomentsRun(const Layout& l, const float* x, int64_t n, int64_t begin,
                            int64_t end, double* sum, double* sum_sq) {
  const int64_t C = l.C;
  const float* k = x + n * l.S * C;
  for (int64_t s0 = begin; s0 < end; s0 += kStretch) {
    const int64_t s1 = std::min(end, s0 + kStretch);
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 kc = _mm256_loadu_ps(k + c);
      __m256 f = _mm256_setzero_ps(), g = _mm256_setzero_ps();
      for (int64_t s = s0; s < s1; ++s) {
        const __m256 v = _mm256_sub_ps(_mm256_loadu_ps(x + (n * l.S + s) * C + c), kc);
        f = _mm256_add_ps(f, v);
        g = _mm256_fmadd_ps(v, v, g);
      }
      AddToDouble(f, sum + c), AddToDouble(g, sum_sq + c);
    }
  }
}

// Σdz and Σdz·(x − μ) of sample n's voxels [begin, end), dz the leaky ReLU's gradient.
MEDJAX_AVX2 void GradSumsRun(const Layout& l, const float* x, const float* dy, const float* mean,
                             const float* gain, const float* bias, float slope, int64_t n,
                             int64_t begin, int64_t end, double* sum_dz, double* sum_dzx) {
  const int64_t C = l.C;
  const __m256 sl = _mm256_set1_ps(slope);
  for (int64_t s0 = begin; s0 < end; s0 += kStretch) {
    const int64_t s1 = std::min(end, s0 + kStretch);
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 m = _mm256_loadu_ps(mean + n * C + c), a = _mm256_loadu_ps(gain + n * C + c);
      const __m256 b = _mm256_loadu_ps(bias + c);
      __m256 f = _mm256_setzero_ps(), h = _mm256_setzero_ps();
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t i = (n * l.S + s) * C + c;
        const __m256 centred = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
        const __m256 z = _mm256_fmadd_ps(centred, a, b);
        const __m256 dz = LeakyMask(z, _mm256_loadu_ps(dy + i), sl);
        f = _mm256_add_ps(f, dz);
        h = _mm256_fmadd_ps(dz, centred, h);
      }
      AddToDouble(f, sum_dz + c), AddToDouble(h, sum_dzx + c);
    }
  }
}

// y = leaky_relu((x − μ)·gain + bias) over sample n's voxels [begin, end).
MEDJAX_AVX2 void OutputRun(const Layout& l, const float* x, const float* mean, const float* gain,
                           const float* bias, float slope, int64_t n, int64_t begin,
                           int64_t end, float* y) {
  const int64_t C = l.C;
  const __m256 sl = _mm256_set1_ps(slope);
  for (int64_t s = begin; s < end; ++s)
    for (int64_t c = 0; c < C; c += 8) {
      const int64_t i = (n * l.S + s) * C + c;
      const __m256 centred = _mm256_sub_ps(_mm256_loadu_ps(x + i),
                                           _mm256_loadu_ps(mean + n * C + c));
      const __m256 z = _mm256_fmadd_ps(centred, _mm256_loadu_ps(gain + n * C + c),
                                       _mm256_loadu_ps(bias + c));
      _mm256_storeu_ps(y + i, LeakyMask(z, z, sl));
    }
}

// dx = k1·dz + k2·(x − μ) + k3 over sample n's voxels [begin, end).
MEDJAX_AVX2 void InputGradRun(const Layout& l, const float* x, const float* dy, const float* mean,
                              const float* gain, const float* bias, const float* k1,
                              const float* k2, const float* k3, float slope, int64_t n,
                              int64_t begin, int64_t end, float* dx) {
  const int64_t C = l.C;
  const __m256 sl = _mm256_set1_ps(slope);
  for (int64_t s = begin; s < end; ++s)
    for (int64_t c = 0; c < C; c += 8) {
      const int64_t i = (n * l.S + s) * C + c, j = n * C + c;
      const __m256 centred = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(mean + j));
      const __m256 z = _mm256_fmadd_ps(centred, _mm256_loadu_ps(gain + j),
                                       _mm256_loadu_ps(bias + c));
      const __m256 dz = LeakyMask(z, _mm256_loadu_ps(dy + i), sl);
      const __m256 out = _mm256_fmadd_ps(_mm256_loadu_ps(k1 + j), dz,
                                         _mm256_fmadd_ps(_mm256_loadu_ps(k2 + j), centred,
                                                         _mm256_loadu_ps(k3 + j)));
      _mm256_storeu_ps(dx + i, out);
    }
}

// rstd·scale per (n, c): z = (x − mean)·gain + bias. (x − mean first: folding the mean into the
// shift would lose digits where the mean is large against the spread.)
std::vector<float> Gain(const Layout& l, const float* rstd, const float* scale) {
  std::vector<float> a(l.N * l.C);
  for (int64_t n = 0; n < l.N; ++n)
    for (int64_t c = 0; c < l.C; ++c) a[n * l.C + c] = rstd[n * l.C + c] * scale[c];
  return a;
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y,
                       ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                       float epsilon, float slope, int64_t threads) {
  Layout l;
  if (ffi::Error e = LayoutOf(x.dimensions(), scale.element_count(), &l); e.failure()) return e;
  const float* xp = x.typed_data();
  std::vector<double> sum(l.N * l.C), sum_sq(l.N * l.C);
  SumsPerSample(
      l, threads,
      [&](int64_t n, int64_t begin, int64_t end, double* f, double* g) {
        MomentsRun(l, xp, n, begin, end, f, g);
      },
      sum.data(), sum_sq.data());
  float* mp = mean->typed_data();
  float* rp = rstd->typed_data();
  for (int64_t i = 0; i < l.N * l.C; ++i) {
    const double shifted = sum[i] / l.S, var = std::max(0.0, sum_sq[i] / l.S - shifted * shifted);
    const int64_t n = i / l.C, c = i % l.C;
    mp[i] = static_cast<float>(xp[n * l.S * l.C + c] + shifted);
    rp[i] = static_cast<float>(1.0 / std::sqrt(var + epsilon));
  }
  const std::vector<float> gain = Gain(l, rp, scale.typed_data());
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
#pragma omp parallel for schedule(dynamic) num_threads(static_cast<int>(threads))
  for (int64_t t = 0; t < l.N * kRuns; ++t)
    OutputRun(l, xp, mp, gain.data(), bp, slope, t / kRuns, RunBegin(l, t % kRuns),
              RunBegin(l, t % kRuns + 1), yp);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                        ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                        ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                        ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                        ffi::ResultBuffer<ffi::F32> dbias, float slope, int64_t threads) {
  Layout l;
  if (ffi::Error e = LayoutOf(x.dimensions(), scale.element_count(), &l); e.failure()) return e;
  const float *xp = x.typed_data(), *dyp = dy.typed_data(), *mp = mean.typed_data();
  const float *rp = rstd.typed_data(), *sp = scale.typed_data(), *bp = bias.typed_data();
  const std::vector<float> gain = Gain(l, rp, sp);
  const int64_t C = l.C;
  std::vector<double> sum_dz(l.N * C), sum_dzx(l.N * C);
  SumsPerSample(
      l, threads,
      [&](int64_t n, int64_t begin, int64_t end, double* f, double* g) {
        GradSumsRun(l, xp, dyp, mp, gain.data(), bp, slope, n, begin, end, f, g);
      },
      sum_dz.data(), sum_dzx.data());
  // dx = rstd·γ·(dz − mean(dz) − x̂·mean(dz·x̂)) with x̂ = (x − μ)·rstd: k1·dz + k2·(x − μ) + k3.
  std::vector<float> k1(l.N * C), k2(l.N * C), k3(l.N * C);
  float* dsp = dscale->typed_data();
  float* dbp = dbias->typed_data();
  for (int64_t n = 0; n < l.N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * C + c;
      const double r = rp[i], s_dz = sum_dz[i], s_dzxhat = r * sum_dzx[i], g = r * sp[c];
      k1[i] = static_cast<float>(g);
      k2[i] = static_cast<float>(-g * r * s_dzxhat / l.S);
      k3[i] = static_cast<float>(-g * s_dz / l.S);
      dsp[i] = static_cast<float>(s_dzxhat);
      dbp[i] = static_cast<float>(s_dz);
    }
  float* dxp = dx->typed_data();
#pragma omp parallel for schedule(dynamic) num_threads(static_cast<int>(threads))
  for (int64_t t = 0; t < l.N * kRuns; ++t)
    InputGradRun(l, xp, dyp, mp, gain.data(), bp, k1.data(), k2.data(), k3.data(), slope,
                 t / kRuns, RunBegin(l, t % kRuns), RunBegin(l, t % kRuns + 1), dxp);
  return ffi::Error::Success();
}

// Any C++ exception (std::bad_alloc from the sums' buffers) turned into an error for XLA.
template <typename F>
ffi::Error Guard(F f) {
  try {
    return f();
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("instance norm: ") + e.what());
  }
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean,
                   ffi::ResultBuffer<ffi::F32> rstd, float epsilon, float slope,
                   int64_t threads) {
  return Guard([&] { return ForwardImpl(x, scale, bias, y, mean, rstd, epsilon, slope, threads); });
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> rstd, ffi::Buffer<ffi::F32> dy,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, float slope, int64_t threads) {
  return Guard([&] {
    return BackwardImpl(x, scale, bias, mean, rstd, dy, dx, dscale, dbias, slope, threads);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxInstanceNormLeakyReluForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y
                                  .Ret<ffi::Buffer<ffi::F32>>()  // mean
                                  .Ret<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Attr<float>("epsilon")
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxInstanceNormLeakyReluBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale
                                  .Arg<ffi::Buffer<ffi::F32>>()  // bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // mean
                                  .Arg<ffi::Buffer<ffi::F32>>()  // rstd
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dx
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dscale per sample
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dbias per sample
                                  .Attr<float>("slope")
                                  .Attr<int64_t>("threads"));
