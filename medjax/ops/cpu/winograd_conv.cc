// A 3×3×3, stride-1 convolution by Winograd's minimal filtering F(2×2×2, 3×3×3), float32,
// channels-last: XLA FFI handlers for the CPU backend (AVX2 + FMA), forward and kernel gradient.
//
// Why not oneDNN: its Winograd convolutions are 2-D and AVX-512 only, and its direct 3-D kernels
// run the U-Net's 16- and 32-channel convolutions at about half of this CPU's peak. Winograd
// computes each 2×2×2 output tile from a 4×4×4 input tile with 64 products per channel pair
// instead of 216: 3.4× fewer multiply-adds, paid for by the tile transforms.
//
// Layouts: x [N, D, H, W, C], kernel [3, 3, 3, C, O], y [N, D', H', W', O] with
// D' = D + pad_lo + pad_hi - 2 (any pads ≥ 0). C and O multiples of 8.
//
// Per call: the kernel is transformed once (U = G g Gᵀ along each axis: [64][C][O]). The output
// tiles are then taken in blocks of T; per block and thread, in scratch that stays in L2:
//   1. V[64][T][C] = Bᵀ d B of each tile's input (zeros outside the image),
//   2. M[p] = V[p] · U[p] for each of the 64 positions p (register-blocked 6 tiles × 16 outputs),
//   3. y tile = Aᵀ m A, written where it falls inside the output.
// The kernel gradient reuses stage 1 and sums V[p]ᵀ (A dy Aᵀ)[p] over the tiles, then applies Gᵀ
// (MedjaxConvWinogradKernelGrad); the input gradient is a forward call with the kernel flipped.
// medjax/ops/cpu/onednn.py builds this file into the same library as onednn_conv.cc.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Dims = ffi::Span<const int64_t>;

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Scratch = std::unique_ptr<float[], FreeDeleter>;

Scratch Allocate(size_t floats) {
  size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64;
  return Scratch(static_cast<float*>(std::aligned_alloc(64, bytes)));
}

// dst[a][b][e] = Σ M[a][i] M[b][j] M[e][k] src[i][j][k] over i, j, k: the n_out × n_in matrix M
// applied along each of the three axes, every entry a row of `co` floats ([C][O]). The kernel
// transform is U = G g Gᵀ per axis (M = G: 3 -> 4, p = (a * 4 + b) * 4 + e over depth, height
// and width); the kernel gradient's last step Gᵀ dU G (M = Gᵀ: 4 -> 3).
void Separable(const float* src, int n_in, int n_out, const float* M, int64_t co, float* dst) {
  auto add = [co](float f, const float* from, float* to) {
    if (f != 0.f)
      for (int64_t q = 0; q < co; ++q) to[q] += f * from[q];
  };
  // Along width: [in][in][in] -> [in][in][out], then height -> [in][out][out], then depth.
  std::vector<float> t1(n_in * n_in * n_out * co, 0.f), t2(n_in * n_out * n_out * co, 0.f);
  std::fill(dst, dst + n_out * n_out * n_out * co, 0.f);
  for (int i = 0; i < n_in; ++i)
    for (int j = 0; j < n_in; ++j)
      for (int e = 0; e < n_out; ++e)
        for (int k = 0; k < n_in; ++k)
          add(M[e * n_in + k], src + ((i * n_in + j) * n_in + k) * co,
              t1.data() + ((i * n_in + j) * n_out + e) * co);
  for (int i = 0; i < n_in; ++i)
    for (int b = 0; b < n_out; ++b)
      for (int j = 0; j < n_in; ++j)
        for (int e = 0; e < n_out; ++e)
          add(M[b * n_in + j], t1.data() + ((i * n_in + j) * n_out + e) * co,
              t2.data() + ((i * n_out + b) * n_out + e) * co);
  for (int a = 0; a < n_out; ++a)
    for (int i = 0; i < n_in; ++i)
      for (int b = 0; b < n_out; ++b)
        for (int e = 0; e < n_out; ++e)
          add(M[a * n_in + i], t2.data() + ((i * n_out + b) * n_out + e) * co,
              dst + ((a * n_out + b) * n_out + e) * co);
}

// F(2, 3)'s kernel transform G (4 × 3) and its transpose.
constexpr float kG[4][3] = {{1, 0, 0}, {.5f, .5f, .5f}, {.5f, -.5f, .5f}, {0, 0, 1}};
constexpr float kGt[3][4] = {{1, .5f, .5f, 0}, {0, .5f, -.5f, 0}, {0, .5f, .5f, 1}};

// Bᵀ of F(2, 3) on four vectors, in place: (d0 - d2, d1 + d2, d2 - d1, d1 - d3).
__attribute__((target("avx2,fma"))) inline void InputRows(__m256& d0, __m256& d1, __m256& d2,
                                                          __m256& d3) {
  __m256 r0 = _mm256_sub_ps(d0, d2), r1 = _mm256_add_ps(d1, d2), r2 = _mm256_sub_ps(d2, d1),
         r3 = _mm256_sub_ps(d1, d3);
  d0 = r0, d1 = r1, d2 = r2, d3 = r3;
}

struct Geometry {
  int64_t N, D, H, W, C, Do, Ho, Wo, O;
  int64_t lo_d, lo_h, lo_w;
  int64_t TD, TH, TW;  // tiles per axis
};

// Bᵀ's row e of four values src[0], src[s], src[2s], src[3s].
template <int e>
__attribute__((target("avx2,fma"))) inline __m256 InputRow(const float* src, int64_t s) {
  if (e == 0) return _mm256_sub_ps(_mm256_loadu_ps(src), _mm256_loadu_ps(src + 2 * s));
  if (e == 1) return _mm256_add_ps(_mm256_loadu_ps(src + s), _mm256_loadu_ps(src + 2 * s));
  if (e == 2) return _mm256_sub_ps(_mm256_loadu_ps(src + 2 * s), _mm256_loadu_ps(src + s));
  return _mm256_sub_ps(_mm256_loadu_ps(src + s), _mm256_loadu_ps(src + 3 * s));
}

// Along width (from src, strides sx < sy) then height, for one depth row a: tile[a][b][e].
template <int e>
__attribute__((target("avx2,fma"))) inline void WidthHeight(const float* src, int64_t sx,
                                                            int64_t sy, float* tile) {
  __m256 d0 = InputRow<e>(src, sx), d1 = InputRow<e>(src + sy, sx),
         d2 = InputRow<e>(src + 2 * sy, sx), d3 = InputRow<e>(src + 3 * sy, sx);
  InputRows(d0, d1, d2, d3);
  _mm256_store_ps(tile + e * 8, d0), _mm256_store_ps(tile + (4 + e) * 8, d1),
      _mm256_store_ps(tile + (8 + e) * 8, d2), _mm256_store_ps(tile + (12 + e) * 8, d3);
}

// Stage 1 for tiles [t0, t0 + T): V[p][t][c]. (Geometry by value: through a reference, GCC
// reloaded its fields after every store.)
__attribute__((target("avx2,fma"))) void InputTiles(const Geometry g, const float* x,
                                                    int64_t t0, int64_t T, float* V) {
  alignas(32) float tile[64 * 8], edge[64 * 8];
  const int64_t C = g.C, sx = C, sy = g.W * C, sz = g.H * g.W * C, sp = T * C;
  for (int64_t t = 0; t < T; ++t) {
    int64_t id = t0 + t;
    int64_t tw = id % g.TW, th = (id / g.TW) % g.TH, td = (id / (g.TW * g.TH)) % g.TD,
            n = id / (g.TW * g.TH * g.TD);
    int64_t z0 = 2 * td - g.lo_d, y0 = 2 * th - g.lo_h, x0 = 2 * tw - g.lo_w;
    bool inside = z0 >= 0 && y0 >= 0 && x0 >= 0 && z0 + 4 <= g.D && y0 + 4 <= g.H &&
                  x0 + 4 <= g.W;
    const float* image = x + n * g.D * sz;
    for (int64_t c = 0; c < C; c += 8) {
      const float* src;
      int64_t s[3];
      if (inside) {
        src = image + z0 * sz + y0 * sy + x0 * sx + c, s[0] = sz, s[1] = sy, s[2] = sx;
      } else {  // the tile's voxels copied into `edge`, zeros outside the image
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) {
            int64_t z = z0 + a, y = y0 + b;
            bool row = z >= 0 && z < g.D && y >= 0 && y < g.H;
            const float* r = image + z * sz + y * sy + c;
            for (int e = 0; e < 4; ++e) {
              int64_t xx = x0 + e;
              _mm256_store_ps(edge + ((a * 4 + b) * 4 + e) * 8,
                              row && xx >= 0 && xx < g.W ? _mm256_loadu_ps(r + xx * sx)
                                                         : _mm256_setzero_ps());
            }
          }
        src = edge, s[0] = 128, s[1] = 32, s[2] = 8;
      }
      for (int a = 0; a < 4; ++a) {
        const float* row = src + a * s[0];
        float* out = tile + a * 128;
        WidthHeight<0>(row, s[2], s[1], out), WidthHeight<1>(row, s[2], s[1], out),
            WidthHeight<2>(row, s[2], s[1], out), WidthHeight<3>(row, s[2], s[1], out);
      }
      // Along depth, into V.
      float* v = V + t * C + c;
      for (int be = 0; be < 16; ++be) {
        const float* p = tile + be * 8;
        __m256 d0 = _mm256_load_ps(p), d1 = _mm256_load_ps(p + 128),
               d2 = _mm256_load_ps(p + 256), d3 = _mm256_load_ps(p + 384);
        InputRows(d0, d1, d2, d3);
        _mm256_store_ps(v + be * sp, d0), _mm256_store_ps(v + (16 + be) * sp, d1),
            _mm256_store_ps(v + (32 + be) * sp, d2), _mm256_store_ps(v + (48 + be) * sp, d3);
      }
    }
  }
}

// M[p][t][o0 : o0 + 8 * NV] for R tiles from t: R × NV accumulators of 8 outputs. Written out
// per row (not as an array of __m256, which GCC kept in memory, storing it on every k).
#define MEDJAX_ROW(r)                                                        \
  if (R > r) {                                                               \
    __m256 b = _mm256_broadcast_ss(v + r * C + k);                           \
    a##r##0 = _mm256_fmadd_ps(b, w0, a##r##0);                               \
    if (NV > 1) a##r##1 = _mm256_fmadd_ps(b, w1, a##r##1);                   \
  }
#define MEDJAX_STORE(r)                                                      \
  if (R > r) {                                                               \
    _mm256_store_ps(m + r * O, a##r##0);                                     \
    if (NV > 1) _mm256_store_ps(m + r * O + 8, a##r##1);                     \
  }
template <int R, int NV>
__attribute__((target("avx2,fma"))) inline void Block(const float* v, const float* u,
                                                      float* m, int64_t C, int64_t O) {
  static_assert(R <= 6 && NV <= 2, "6 rows of 2 vectors: 12 accumulators of 16 registers");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
         a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t k = 0; k < C; ++k) {
    __m256 w0 = _mm256_load_ps(u + k * O), w1 = NV > 1 ? _mm256_load_ps(u + k * O + 8) : w0;
    MEDJAX_ROW(0) MEDJAX_ROW(1) MEDJAX_ROW(2) MEDJAX_ROW(3) MEDJAX_ROW(4) MEDJAX_ROW(5)
  }
  MEDJAX_STORE(0) MEDJAX_STORE(1) MEDJAX_STORE(2) MEDJAX_STORE(3) MEDJAX_STORE(4) MEDJAX_STORE(5)
}
#undef MEDJAX_ROW
#undef MEDJAX_STORE

template <int NV>
__attribute__((target("avx2,fma"))) void Products(const float* V, const float* U, float* M,
                                                  int64_t T, int64_t C, int64_t O,
                                                  int64_t o0) {
  for (int p = 0; p < 64; ++p) {
    const float* v = V + p * T * C;
    const float* u = U + p * C * O + o0;
    float* m = M + p * T * O + o0;
    int64_t t = 0;
    for (; t + 6 <= T; t += 6) Block<6, NV>(v + t * C, u, m + t * O, C, O);
    for (; t < T; ++t) Block<1, NV>(v + t * C, u, m + t * O, C, O);
  }
}

// Stage 3: y from M for tiles [t0, t0 + T).
__attribute__((target("avx2,fma"))) void OutputTiles(const Geometry g, const float* M,
                                                     int64_t t0, int64_t T, float* y) {
  alignas(32) float s1[32 * 8], s2[16 * 8];
  for (int64_t t = 0; t < T; ++t) {
    int64_t id = t0 + t;
    int64_t tw = id % g.TW, th = (id / g.TW) % g.TH, td = (id / (g.TW * g.TH)) % g.TD,
            n = id / (g.TW * g.TH * g.TD);
    float* base = y + n * g.Do * g.Ho * g.Wo * g.O;
    for (int64_t o = 0; o < g.O; o += 8) {
      // Aᵀ = [[1, 1, 1, 0], [0, 1, -1, -1]] along width: 64 -> s1[a][b][2].
      for (int ab = 0; ab < 16; ++ab) {
        const float* m = M + (ab * 4 * T + t) * g.O + o;
        __m256 m0 = _mm256_load_ps(m), m1 = _mm256_load_ps(m + T * g.O),
               m2 = _mm256_load_ps(m + 2 * T * g.O), m3 = _mm256_load_ps(m + 3 * T * g.O);
        __m256 d12 = _mm256_sub_ps(m1, m2);
        _mm256_store_ps(s1 + (ab * 2) * 8, _mm256_add_ps(_mm256_add_ps(m0, m1), m2));
        _mm256_store_ps(s1 + (ab * 2 + 1) * 8, _mm256_sub_ps(d12, m3));
      }
      // Along height: s1[a][b][w] -> s2[a][h][w].
      for (int a = 0; a < 4; ++a)
        for (int w = 0; w < 2; ++w) {
          const float* m = s1 + (a * 8 + w) * 8;
          __m256 m0 = _mm256_load_ps(m), m1 = _mm256_load_ps(m + 16), m2 = _mm256_load_ps(m + 32),
                 m3 = _mm256_load_ps(m + 48);
          _mm256_store_ps(s2 + (a * 4 + w) * 8, _mm256_add_ps(_mm256_add_ps(m0, m1), m2));
          _mm256_store_ps(s2 + (a * 4 + 2 + w) * 8, _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3));
        }
      // Along depth, into y where the tile's voxel lies inside it.
      for (int hw = 0; hw < 4; ++hw) {
        const float* m = s2 + hw * 8;
        __m256 m0 = _mm256_load_ps(m), m1 = _mm256_load_ps(m + 32), m2 = _mm256_load_ps(m + 64),
               m3 = _mm256_load_ps(m + 96);
        __m256 out[2] = {_mm256_add_ps(_mm256_add_ps(m0, m1), m2),
                         _mm256_sub_ps(_mm256_sub_ps(m1, m2), m3)};
        int64_t yy = 2 * th + hw / 2, xx = 2 * tw + hw % 2;
        if (yy >= g.Ho || xx >= g.Wo) continue;
        for (int dz = 0; dz < 2; ++dz) {
          int64_t z = 2 * td + dz;
          if (z >= g.Do) continue;
          _mm256_storeu_ps(base + ((z * g.Ho + yy) * g.Wo + xx) * g.O + o, out[dz]);
        }
      }
    }
  }
}

// The kernel gradient. Per tile M = V · U and y = Aᵀ M A, so with dM = A dy Aᵀ (each axis) the
// gradient of U[p] is Σ_tiles V[p]ᵀ dM[p], and the kernel's is Gᵀ dU G along each axis.

// Row i of A = [[1, 0], [1, 1], [1, -1], [0, -1]] applied to (u, v).
template <int i>
__attribute__((target("avx2,fma"))) inline __m256 GradRow(__m256 u, __m256 v) {
  if (i == 0) return u;
  if (i == 1) return _mm256_add_ps(u, v);
  if (i == 2) return _mm256_sub_ps(u, v);
  return _mm256_sub_ps(_mm256_setzero_ps(), v);
}

// Height row b of A, then depth, for each width position: dM[a][b][e] for a = 0..3.
template <int b>
__attribute__((target("avx2,fma"))) inline void GradDepth(const __m256 (&r)[2][2][4], float* dm,
                                                          int64_t sp) {
  for (int e = 0; e < 4; ++e) {
    __m256 h0 = GradRow<b>(r[0][0][e], r[0][1][e]), h1 = GradRow<b>(r[1][0][e], r[1][1][e]);
    float* out = dm + (b * 4 + e) * sp;
    _mm256_store_ps(out, GradRow<0>(h0, h1)), _mm256_store_ps(out + 16 * sp, GradRow<1>(h0, h1)),
        _mm256_store_ps(out + 32 * sp, GradRow<2>(h0, h1)),
        _mm256_store_ps(out + 48 * sp, GradRow<3>(h0, h1));
  }
}

// dM[p][t][o] for tiles [t0, t0 + T) from dy (zeros past the output's end).
__attribute__((target("avx2,fma"))) void GradTiles(const Geometry g, const float* dy, int64_t t0,
                                                   int64_t T, float* dM) {
  const int64_t O = g.O, sp = T * O;
  for (int64_t t = 0; t < T; ++t) {
    int64_t id = t0 + t;
    int64_t tw = id % g.TW, th = (id / g.TW) % g.TH, td = (id / (g.TW * g.TH)) % g.TD,
            n = id / (g.TW * g.TH * g.TD);
    const float* base = dy + n * g.Do * g.Ho * g.Wo * O;
    for (int64_t o = 0; o < O; o += 8) {
      __m256 r[2][2][4];  // [depth][height][width after A]
      for (int dz = 0; dz < 2; ++dz)
        for (int hy = 0; hy < 2; ++hy) {
          int64_t z = 2 * td + dz, yy = 2 * th + hy, xx = 2 * tw;
          bool row = z < g.Do && yy < g.Ho;
          const float* p = base + ((z * g.Ho + yy) * g.Wo + xx) * O + o;
          __m256 u = row ? _mm256_loadu_ps(p) : _mm256_setzero_ps();
          __m256 v = row && xx + 1 < g.Wo ? _mm256_loadu_ps(p + O) : _mm256_setzero_ps();
          r[dz][hy][0] = GradRow<0>(u, v), r[dz][hy][1] = GradRow<1>(u, v),
          r[dz][hy][2] = GradRow<2>(u, v), r[dz][hy][3] = GradRow<3>(u, v);
        }
      float* dm = dM + t * O + o;
      GradDepth<0>(r, dm, sp), GradDepth<1>(r, dm, sp), GradDepth<2>(r, dm, sp),
          GradDepth<3>(r, dm, sp);
    }
  }
}

// dU[p][c : c + R][o0 : o0 + 8·NV] += Σ_t V[p][t][c + r] · dM[p][t][o0 : ...], R × NV
// accumulators (written out per row, as in Block).
#define MEDJAX_GROW(r)                                                       \
  if (R > r) {                                                               \
    __m256 b = _mm256_broadcast_ss(v + t * C + r);                           \
    a##r##0 = _mm256_fmadd_ps(b, w0, a##r##0);                               \
    if (NV > 1) a##r##1 = _mm256_fmadd_ps(b, w1, a##r##1);                   \
  }
#define MEDJAX_GADD(r)                                                       \
  if (R > r) {                                                               \
    float* q = du + r * O;                                                   \
    _mm256_store_ps(q, _mm256_add_ps(_mm256_load_ps(q), a##r##0));           \
    if (NV > 1) _mm256_store_ps(q + 8, _mm256_add_ps(_mm256_load_ps(q + 8), a##r##1)); \
  }
template <int R, int NV>
__attribute__((target("avx2,fma"))) inline void GradBlock(const float* v, const float* dm,
                                                          float* du, int64_t T, int64_t C,
                                                          int64_t O) {
  static_assert(R <= 6 && NV <= 2, "6 rows of 2 vectors: 12 accumulators of 16 registers");
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00,
         a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  for (int64_t t = 0; t < T; ++t) {
    __m256 w0 = _mm256_load_ps(dm + t * O), w1 = NV > 1 ? _mm256_load_ps(dm + t * O + 8) : w0;
    MEDJAX_GROW(0) MEDJAX_GROW(1) MEDJAX_GROW(2) MEDJAX_GROW(3) MEDJAX_GROW(4) MEDJAX_GROW(5)
  }
  MEDJAX_GADD(0) MEDJAX_GADD(1) MEDJAX_GADD(2) MEDJAX_GADD(3) MEDJAX_GADD(4) MEDJAX_GADD(5)
}
#undef MEDJAX_GROW
#undef MEDJAX_GADD

template <int NV>
__attribute__((target("avx2,fma"))) void GradProducts(const float* V, const float* dM, float* dU,
                                                      int64_t T, int64_t C, int64_t O,
                                                      int64_t o0) {
  for (int p = 0; p < 64; ++p) {
    const float* v = V + p * T * C;
    const float* dm = dM + p * T * O + o0;
    float* du = dU + p * C * O + o0;
    int64_t c = 0;
    for (; c + 6 <= C; c += 6) GradBlock<6, NV>(v + c, dm, du + c * O, T, C, O);
    for (; c < C; c += 2) GradBlock<2, NV>(v + c, dm, du + c * O, T, C, O);  // C is even
  }
}

// Whether x, kernel and y (dims as in the header) and the attributes make a convolution this file
// computes: rank 5, 3×3×3, stride 1, channels in multiples of 8, shapes that follow each other.
ffi::Error CheckShapes(Dims xd, Dims kd, Dims yd, Dims strides, Dims pad_lo, Dims pad_hi) {
  if (xd.size() != 5 || kd.size() != 5 || yd.size() != 5 || kd[0] != 3 || kd[1] != 3 ||
      kd[2] != 3 || xd[4] % 8 || kd[4] % 8 || kd[3] != xd[4] ||
      std::any_of(strides.begin(), strides.end(), [](int64_t s) { return s != 1; }))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "Winograd convolution: needs a 3x3x3 stride-1 kernel and channels "
                      "divisible by 8");
  bool shapes_agree = yd[0] == xd[0] && yd[4] == kd[4];
  for (int i = 0; i < 3; ++i)
    shapes_agree = shapes_agree && pad_lo[i] >= 0 && pad_hi[i] >= 0 &&
                   yd[i + 1] == xd[i + 1] + pad_lo[i] + pad_hi[i] - 2;
  if (!shapes_agree)
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "Winograd convolution: the output shape does not follow from the input's, "
                      "the kernel's and the padding");
  return ffi::Error::Success();
}

// Tiles per block: V and M together about 96 KiB (measured best at 16 channels: 6 to 12 tiles ran
// alike, 48 tiles' transforms 1.4× slower).
int64_t TilesPerBlock(int64_t C, int64_t O) {
  return std::clamp<int64_t>(96 * 1024 / (64 * 4 * (C + O)), 6, 96);
}

ffi::Error WinogradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                        ffi::ResultBuffer<ffi::F32> y, Dims strides, Dims pad_lo, Dims pad_hi,
                        int64_t threads) {
  auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  if (ffi::Error e = CheckShapes(xd, kd, yd, strides, pad_lo, pad_hi); e.failure()) return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], yd[4],
             pad_lo[0], pad_lo[1], pad_lo[2], (yd[1] + 1) / 2, (yd[2] + 1) / 2, (yd[3] + 1) / 2};
  const int64_t tiles = g.N * g.TD * g.TH * g.TW;
  const int64_t T = TilesPerBlock(g.C, g.O);
  const int64_t blocks = (tiles + T - 1) / T;
  // Every buffer before the threads start, so a failed allocation is an error, not a crash.
  const int workers = static_cast<int>(std::max<int64_t>(1, threads));
  Scratch U = Allocate(64 * g.C * g.O);
  std::vector<Scratch> V, M;
  for (int i = 0; i < workers; ++i)
    V.push_back(Allocate(64 * T * g.C)), M.push_back(Allocate(64 * T * g.O));
  if (!U || std::any_of(V.begin(), V.end(), [](const Scratch& s) { return !s; }) ||
      std::any_of(M.begin(), M.end(), [](const Scratch& s) { return !s; }))
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "Winograd convolution: out of memory for its scratch buffers");
  Separable(kernel.typed_data(), 3, 4, &kG[0][0], g.C * g.O, U.get());
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
#pragma omp parallel num_threads(workers)
  {
    float* v = V[omp_get_thread_num()].get();
    float* m = M[omp_get_thread_num()].get();
    // Blocks are handed out as threads come free: XLA runs other work beside this call, and on 2
    // cores a thread that lost its core would otherwise hold up the call with its fixed share
    // (3-D U-Net train step on 2 cores, medians of 6 processes each: 1.27-1.43 s, against
    // 1.35-1.51 s with fixed shares; paired runs 0.98-1.10x, median 1.05x).
#pragma omp for schedule(dynamic)
    for (int64_t b = 0; b < blocks; ++b) {
      int64_t t0 = b * T, n = std::min(T, tiles - t0);
      InputTiles(g, xp, t0, n, v);
      // Rows of V and M are n apart within a block: pass n as the block's T.
      int64_t o0 = 0;
      for (; o0 + 16 <= g.O; o0 += 16) Products<2>(v, U.get(), m, n, g.C, g.O, o0);
      for (; o0 < g.O; o0 += 8) Products<1>(v, U.get(), m, n, g.C, g.O, o0);
      OutputTiles(g, m, t0, n, yp);
    }
  }
  return ffi::Error::Success();
}

// The kernel gradient of WinogradImpl's convolution: x and dy in, dkernel [3, 3, 3, C, O] out.
ffi::Error WinogradKernelGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                                  ffi::ResultBuffer<ffi::F32> dkernel, Dims strides, Dims pad_lo,
                                  Dims pad_hi, int64_t threads) {
  auto xd = x.dimensions(), kd = dkernel->dimensions(), yd = dy.dimensions();
  if (ffi::Error e = CheckShapes(xd, kd, yd, strides, pad_lo, pad_hi); e.failure()) return e;
  Geometry g{xd[0], xd[1], xd[2], xd[3], xd[4], yd[1], yd[2], yd[3], yd[4],
             pad_lo[0], pad_lo[1], pad_lo[2], (yd[1] + 1) / 2, (yd[2] + 1) / 2, (yd[3] + 1) / 2};
  const int64_t tiles = g.N * g.TD * g.TH * g.TW, T = TilesPerBlock(g.C, g.O);
  const int64_t blocks = (tiles + T - 1) / T, co = g.C * g.O;
  const int workers = static_cast<int>(std::max<int64_t>(1, threads));
  // The blocks are cut into a fixed number of runs, each summing its dU into its own buffer, and
  // the runs are handed out as threads come free (as in WinogradImpl). The buffers are added in
  // run order, so the sum's order, and the result to the last bit, depend neither on the
  // scheduling nor on the number of threads. 16 runs: 8 per thread on 2 cores, scratch of
  // 16 · 64 · C · O floats; more than 16 threads would leave some idle here.
  const int64_t runs = std::min<int64_t>(blocks, 16);
  std::vector<Scratch> V, dM, dU;
  for (int i = 0; i < workers; ++i)
    V.push_back(Allocate(64 * T * g.C)), dM.push_back(Allocate(64 * T * g.O));
  for (int64_t r = 0; r < runs; ++r) dU.push_back(Allocate(64 * co));
  for (const auto* buffers : {&V, &dM, &dU})
    if (std::any_of(buffers->begin(), buffers->end(), [](const Scratch& s) { return !s; }))
      return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                        "Winograd convolution: out of memory for its scratch buffers");
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
#pragma omp parallel num_threads(workers)
  {
    int me = omp_get_thread_num();
    float *v = V[me].get(), *dm = dM[me].get();
#pragma omp for schedule(dynamic)
    for (int64_t r = 0; r < runs; ++r) {
      float* du = dU[r].get();
      std::fill(du, du + 64 * co, 0.f);
      for (int64_t b = r * blocks / runs; b < (r + 1) * blocks / runs; ++b) {
        int64_t t0 = b * T, n = std::min(T, tiles - t0);
        InputTiles(g, xp, t0, n, v);
        GradTiles(g, dyp, t0, n, dm);
        int64_t o0 = 0;
        for (; o0 + 16 <= g.O; o0 += 16) GradProducts<2>(v, dm, du, n, g.C, g.O, o0);
        for (; o0 < g.O; o0 += 8) GradProducts<1>(v, dm, du, n, g.C, g.O, o0);
      }
    }
  }
  float* total = dU[0].get();
  for (int64_t r = 1; r < runs; ++r) {
    const float* part = dU[r].get();
    for (int64_t q = 0; q < 64 * co; ++q) total[q] += part[q];
  }
  Separable(total, 4, 3, &kGt[0][0], co, dkernel->typed_data());
  return ffi::Error::Success();
}

// A handler with any C++ exception (std::bad_alloc from the kernel transforms' buffers) turned
// into an error: none may cross into XLA.
template <auto Impl>
ffi::Error Guarded(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out,
                   Dims strides, Dims pad_lo, Dims pad_hi, int64_t threads) {
  try {
    return Impl(a, b, out, strides, pad_lo, pad_hi, threads);
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("Winograd convolution: ") + e.what());
  }
}

}  // namespace

#define MEDJAX_WINOGRAD_BINDING                                                \
  ffi::Ffi::Bind()                                                             \
      .Arg<ffi::Buffer<ffi::F32>>()                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                            \
      .Ret<ffi::Buffer<ffi::F32>>()                                            \
      .Attr<Dims>("strides")                                                   \
      .Attr<Dims>("pad_lo")                                                    \
      .Attr<Dims>("pad_hi")                                                    \
      .Attr<int64_t>("threads")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxConvWinograd, Guarded<WinogradImpl>, MEDJAX_WINOGRAD_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(MedjaxConvWinogradKernelGrad, Guarded<WinogradKernelGradImpl>,
                              MEDJAX_WINOGRAD_BINDING);

// This CPU's features for the handler (compiled for AVX2 + FMA whatever the host): bit 0, AVX2
// and FMA (it can run); bit 1, AVX-512F (oneDNN's direct kernels are likely faster there).
extern "C" int MedjaxWinogradSupported() {
  return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0) |
         (__builtin_cpu_supports("avx512f") ? 2 : 0);
}
