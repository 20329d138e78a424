// Decode steps of a dense GQA model in one C++ loop: the native form of engine/flat_decode.py.
//
// Why: at batch-1 decode on a CPU a token is ~120 small matmuls plus ~1,000 tiny ops (norms, RoPE,
// cache writes and gathers, softmax, residual adds), and each tiny op costs more in dispatch,
// allocation and Python than in arithmetic. Here the matmuls stay ATen's kernels (the same
// int4/int8/bf16 ones the modules call) and everything between them is a plain loop over the
// rows: one pass each where the Python form makes several (RMSNorm, RoPE, SiLU * up), no
// temporaries. Attention reads the paged cache in place: no gather of the sequence's blocks, and
// each KV head's keys are read once for all of the head's query heads.
//
// Short prompts run here too (a 32 x 128-token prefill: 3.3-3.6 s through the modules, 2.7-3.1
// here): a prompt's row attends to its sequence's cached keys up to its own position, which the
// step wrote before anyone attends, so the same loop serves decodes, prompts, chunks and mixes.
//
// The rounding follows the modules step for step (each op's result rounded to the model dtype
// where theirs is), so the hidden states differ from theirs only in the order of float sums
// and in exp's last bits (tests/test_native_decode.py bounds the difference).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

// oneDNN's linear on a weight it has already reordered into its own blocked layout
// (torch.ops.mkldnn._reorder_linear_weight): F.linear reorders a plain bf16 weight on every call,
// which at decode sizes costs about as much memory traffic as the matmul itself
Tensor onednn_linear(const Tensor& x, const Tensor& packed, const Tensor& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, packed, bias.defined() ? c10::IValue(bias) : c10::IValue(), c10::IValue(std::string("none")),
                          c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// A projection as the modules run it: 0 float (nn.Linear), 1 int8 weight-only, 2 int4, 3 bf16 with
// the weight in oneDNN's layout (the same matmul as 0: oneDNN's, minus the reorder).
struct Proj {
  int64_t kind = 0;
  Tensor w;       // float weight [N, K], int8 qweight [N, K], the int4 kernel's packed weight, or oneDNN's
  Tensor bias;    // undefined when none
  Tensor scale;   // int8: per-row scale [N] in the matmul dtype (hardware.matmul_dtype); int4: the kernel's scales/zeros
  int64_t group = 0;        // int4 group size
  int64_t pack_max_m = 0;   // int8: rows up to which the packed kernel runs (0: never; flat_decode.py decides)

  Tensor operator()(const Tensor& x) const {
    Tensor y;
    if (kind == 0) return at::linear(x, w, bias.defined() ? c10::optional<Tensor>(bias) : c10::nullopt);
    if (kind == 3) return onednn_linear(x, w, bias);
    if (kind == 1) {
      // quant/int8.py weight_only_mm: the packed kernel for few bf16 rows, else q in the matmul
      // dtype (the scale's: x's own, or fp32 for bf16 on a CPU without bf16 matmul units)
      const auto dt = scale.scalar_type();
      if (x.size(0) <= pack_max_m)
        y = at::_weight_int8pack_mm(x, w, dt == x.scalar_type() ? scale : scale.to(x.scalar_type()));  // no dispatch per call where they agree
      else
        y = (at::linear(x.to(dt), w.to(dt)) * scale).to(x.scalar_type());
    } else {
      y = at::_weight_int4pack_mm_for_cpu(x, w, group, scale);  // Python checked rows <= KERNEL_MAX_M
    }
    return bias.defined() ? y + bias : y;
  }
};

constexpr int64_t kFfnRows = 2048;  // model/transformer.py FFN_ROWS

struct Layer {
  Tensor ln1, ln2;  // RMSNorm weights
  double eps1, eps2;
  Proj qkv, o, gate_up, down;
};

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T> inline T from_f(float v) { return static_cast<T>(v); }
// the model dtype's rounding of a float result (identity for fp32)
template <typename T> inline float rnd(float v) { return to_f(from_f<T>(v)); }

// Eight floats as one value (GCC/Clang vector extensions): AVX where the build enables it, two
// SSE/NEON registers otherwise. bf16 widens to float by a 16-bit shift, exactly.
typedef float f8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) { f8 v; std::memcpy(&v, p, sizeof v); return v; }
inline f8 load8(const c10::BFloat16* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof h);
  u32x8 w = __builtin_convertvector(h, u32x8) << 16;
  f8 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline float hsum(f8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// float -> bf16 as c10::BFloat16 rounds it (to nearest even; NaN to the quiet NaN), eight at a time
inline u32x8 bf16_bits(f8 v) {
  u32x8 u;
  std::memcpy(&u, &v, sizeof u);
  const u32x8 r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  return v != v ? u32x8{} + 0x7fc00000u : r;
}
// the model dtype's rounding of eight float results (identity for fp32)
template <typename T> inline f8 round8(f8 v);
template <> inline f8 round8<float>(f8 v) { return v; }
template <> inline f8 round8<c10::BFloat16>(f8 v) {
  const u32x8 r = bf16_bits(v);
  std::memcpy(&v, &r, sizeof v);
  return v;
}
inline void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof v); }
inline void store8(c10::BFloat16* p, f8 v) {
  const u16x8 h = __builtin_convertvector(bf16_bits(v) >> 16, u16x8);
  std::memcpy(p, &h, sizeof h);
}

// rows of a [rows, ...] array split over the threads where there are enough of them to repay a
// parallel region's start (~a few microseconds)
template <typename F>
void over_rows(int64_t rows, int64_t row_elems, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) f(r);
  });
}

// y = w * rms_norm(x.float()).to(T), each row; as RMSNorm.forward rounds it
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t n, double eps) {
  over_rows(rows, n, [&](int64_t r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    f8 acc{};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) { const f8 v = load8(xr + i); acc += v * v; }
    float ss = hsum(acc);
    for (; i < n; i++) { float v = to_f(xr[i]); ss += v * v; }
    const float inv = 1.0f / std::sqrt(ss / n + static_cast<float>(eps));
    for (i = 0; i + 8 <= n; i += 8) store8(yr + i, load8(w + i) * round8<T>(load8(xr + i) * inv));
    for (; i < n; i++) yr[i] = from_f<T>(to_f(w[i]) * rnd<T>(to_f(xr[i]) * inv));
  });
}

// x <- x + y, rounded to the model dtype as the modules' residual add rounds it
template <typename T>
void add_rows(T* x, const T* y, int64_t rows, int64_t n) {
  over_rows(rows, n, [&](int64_t r) {
    T* xr = x + r * n;
    const T* yr = y + r * n;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(xr + i, load8(xr + i) + load8(yr + i));
    for (; i < n; i++) xr[i] = from_f<T>(to_f(xr[i]) + to_f(yr[i]));
  });
}

// q and k heads of each row of qkv [rows, (H + Hkv + Hkv) * D] rotated in place (model/layers.py
// apply_rope: half-split, or interleaved pairs written back in half-split order); cos/sin [rows, D/2]
template <typename T>
void rope_rows(T* qkv, const T* cos, const T* sin, int64_t rows, int64_t heads, int64_t width, int64_t D,
               bool interleaved) {
  const int64_t half = D / 2;
  over_rows(rows, heads * D, [&](int64_t r) {
    const T* c = cos + r * half;
    const T* s = sin + r * half;
    float a[64], b[64];  // half <= 64: head_dim <= 128 (flat_decode.py's NATIVE_HEAD_DIMS)
    for (int64_t h = 0; h < heads; h++) {
      T* x = qkv + r * width + h * D;
      if (!interleaved && half % 8 == 0) {
        for (int64_t i = 0; i < half; i += 8) {
          const f8 ai = load8(x + i), bi = load8(x + half + i), ci = load8(c + i), si = load8(s + i);
          store8(x + i, round8<T>(ai * ci) - round8<T>(bi * si));
          store8(x + half + i, round8<T>(bi * ci) + round8<T>(ai * si));
        }
        continue;
      }
      for (int64_t i = 0; i < half; i++) {
        a[i] = to_f(interleaved ? x[2 * i] : x[i]);
        b[i] = to_f(interleaved ? x[2 * i + 1] : x[half + i]);
      }
      for (int64_t i = 0; i < half; i++) {
        float ci = to_f(c[i]), si = to_f(s[i]);
        x[i] = from_f<T>(rnd<T>(a[i] * ci) - rnd<T>(b[i] * si));
        x[half + i] = from_f<T>(rnd<T>(b[i] * ci) + rnd<T>(a[i] * si));
      }
    }
  });
}

typedef int32_t i8x8 __attribute__((vector_size(32)));

// e^x eight at a time: Cephes' expf, 2^n * e^r with |r| <= ln2 / 2 and a degree-6 polynomial
// (within ~2 ulp of std::exp; std::exp one at a time was most of a 32-row step's softmax and SiLU)
inline f8 exp8(f8 x) {
  x = x < -87.0f ? f8{} - 87.0f : x;
  x = x > 88.0f ? f8{} + 88.0f : x;
  const f8 fx = x * 1.44269504088896341f;
  const i8x8 n = __builtin_convertvector(fx + (fx < 0 ? f8{} - 0.5f : f8{} + 0.5f), i8x8);  // round to nearest
  const f8 nf = __builtin_convertvector(n, f8);
  const f8 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
  f8 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const i8x8 bits = (n + 127) << 23;
  f8 scale2n;
  std::memcpy(&scale2n, &bits, sizeof scale2n);
  return y * scale2n;
}

// ask for the bytes at p .. p + n ahead of their use: a sequence's blocks lie anywhere in the pool,
// and the hardware prefetchers stop at each block's end. Into L2 (prefetcht2), not L1: a core has
// only ~16 L1 fill buffers, and attention waited on them (32 rows x 190 keys x 30 layers: 12.5 ->
// 10.5 ms)
inline void prefetch(const void* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) __builtin_prefetch(static_cast<const char*>(p) + i, 0, 1);
}

// lane i of the result: the sum of a[i]'s eight lanes (a transpose-and-add tree: 14 shuffles and 7
// adds for eight sums, where eight horizontal sums take ~40 instructions)
inline f8 reduce8(const f8* a) {
  auto pairs = [](f8 x, f8 y) {  // [x01, y01, x23, y23, x45, y45, x67, y67]
    return __builtin_shufflevector(x, y, 0, 8, 2, 10, 4, 12, 6, 14) + __builtin_shufflevector(x, y, 1, 9, 3, 11, 5, 13, 7, 15);
  };
  auto quads = [](f8 x, f8 y) {  // of two pairs() results: [x0-3, x'0-3, y0-3, y'0-3, x4-7, x'4-7, y4-7, y'4-7]
    return __builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15);
  };
  const f8 lo = quads(pairs(a[0], a[1]), pairs(a[2], a[3])), hi = quads(pairs(a[4], a[5]), pairs(a[6], a[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// ---- bf16 attention by AVX512-BF16 dot products (vdpbf16ps), where the CPU has them ----------
// A bf16 product is exact in float, so q . k this way equals the widened sum up to its order; the
// softmax weights are rounded to bf16 for the value sum (as torch's own bf16 flash attention
// does). Chosen at run time: the build targets no particular CPU.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define NANOSEEK_BF16_DOT 1
#define BF16_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// NANOSEEK_BF16_DOT=0 turns it off (an A/B in bench/decode_parts.py; read each call, ~0.1 µs)
bool cpu_has_bf16_dot() {
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  const char* off = std::getenv("NANOSEEK_BF16_DOT");
  return yes && !(off && std::strcmp(off, "0") == 0);
}

// e^x sixteen at a time: exp8's Cephes polynomial, with AVX-512's scalef for the 2^n
BF16_DOT_TARGET inline __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_add_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f))),
                                 _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
  __m512 y = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(y, n);
}

BF16_DOT_TARGET inline __m512 widen16(const c10::BFloat16* p) {  // exact: bf16 is a float's high half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// a row of F.silu(gate) * up for bf16 (gate [F], up [F] -> out [F]), sixteen at a time: the silu
// rounded to bf16, the product rounded again, as the modules round them. A prompt's step has
// thousands of rows (4,096 x 1,536 x 30 layers: 150 -> ~40 ms against the eight-wide loop).
BF16_DOT_TARGET void silu_mul_bf16(const c10::BFloat16* gate, const c10::BFloat16* up, c10::BFloat16* out, int64_t F) {
  int64_t i = 0;
  for (; i + 16 <= F; i += 16) {
    const __m512 g = widen16(gate + i);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
    const __m512 sr = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s)), 16));
    _mm256_storeu_si256((__m256i*)(out + i), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sr, widen16(up + i))));
  }
  for (; i < F; i++) {
    const float g = static_cast<float>(gate[i]);
    out[i] = c10::BFloat16(static_cast<float>(c10::BFloat16(g / (1.0f + std::exp(-g)))) * static_cast<float>(up[i]));
  }
}

// lane u of the result: the sum of p[u]'s sixteen lanes, for u = 0 .. 15 in order (a butterfly:
// 30 shuffles and 15 adds for sixteen sums, all in registers)
BF16_DOT_TARGET inline __m512 sums16(const __m512* p) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; i++)  // per 128-bit lane: [p2i, p2i+1, p2i, p2i+1] partials
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
  for (int i = 0; i < 4; i++) {  // per 128-bit lane: tokens 4i .. 4i + 3, one partial each
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; i++)  // 128-bit lanes: [8i .. 8i+3 (two partials), 8i+4 .. 8i+7 (two)]
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88), _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}

// out_g = softmax(scale * q_g . K) V for the G query heads q [G, D] of one KV head (unscaled),
// over its L cached tokens k_t = kc + at[t], v_t = vc + at[t] (kc, vc offset to the head), in one
// pass of tiles of 16 tokens with flash attention's running max and sum: a tile's keys are read
// once for the scores and its values once, while both are in L1. Scores: per token, NV dot
// products a head into a 16-lane partial, then sums16 turns 16 tokens' partials into one
// register. Values: a tile's tokens in pairs, interleaved once (so that a head's bf16 weight
// pair, broadcast, multiplies both in one dot product). The interleave works within 128-bit
// lanes, so accumulator w's lane 4k + i holds dim 32 (w / 2) + 8k + 4 (w % 2) + i. Heads go HB
// at a time, their accumulators in registers.
// prefetch_bytes > 0: ask for that much of each row of the next tile.
// (Against a two-pass form, scores for all keys then values: ~25% less time where the keys are
// in cache, as a prompt's are; about the same where they stream from DRAM.)
template <int NV>
BF16_DOT_TARGET void attend_tiles_bf16(const c10::BFloat16* q, const c10::BFloat16* kc, const c10::BFloat16* vc,
                                       const int64_t* at, int64_t L, int64_t G, float scale, c10::BFloat16* out,
                                       int64_t prefetch_bytes) {
  constexpr int64_t D = 32 * NV, W = 2 * NV, HB = 16 / W;
  alignas(64) uint16_t vbuf[8 * W * 32];  // a tile's values, pairs of tokens interleaved
  alignas(64) uint16_t pb[HB][16];        // a tile's weights in bf16
  for (int64_t g0 = 0; g0 < G; g0 += HB) {
    const int64_t hb = std::min(HB, G - g0);
    __m512 acc[HB][W], lsum[HB];
    float mx[HB];
    for (int64_t h = 0; h < HB; h++) {
      for (int w = 0; w < W; w++) acc[h][w] = _mm512_setzero_ps();
      lsum[h] = _mm512_setzero_ps();
      mx[h] = -INFINITY;
    }
    for (int64_t t0 = 0; t0 < L; t0 += 16) {
      const int64_t n = std::min<int64_t>(16, L - t0);
      const __mmask16 valid = n == 16 ? 0xffff : __mmask16((1u << n) - 1);
      if (prefetch_bytes && g0 == 0)
        for (int64_t u = t0 + 16, e = std::min(L, t0 + 32); u < e; u++) {
          prefetch(kc + at[u], prefetch_bytes);
          prefetch(vc + at[u], prefetch_bytes);
        }
      for (int64_t h = 0; h < hb; h++) {
        const c10::BFloat16* qh = q + (g0 + h) * D;
        __m512bh qv[NV];
        for (int v = 0; v < NV; v++) qv[v] = (__m512bh)_mm512_loadu_si512(qh + 32 * v);
        __m512 part[16];
        for (int64_t u = 0; u < 16; u++) {
          part[u] = _mm512_setzero_ps();
          if (u < n)
            for (int v = 0; v < NV; v++)
              part[u] = _mm512_dpbf16_ps(part[u], qv[v], (__m512bh)_mm512_loadu_si512(kc + at[t0 + u] + 32 * v));
        }
        const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid,
                                            _mm512_mul_ps(sums16(part), _mm512_set1_ps(scale)));
        const float m = std::max(mx[h], _mm512_reduce_max_ps(s));
        const __m512 corr = _mm512_set1_ps(std::exp(mx[h] - m));  // the running sums' rescale (0 at the first tile)
        mx[h] = m;
        const __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(s, _mm512_set1_ps(m))));
        lsum[h] = _mm512_fmadd_ps(lsum[h], corr, p);
        for (int w = 0; w < W; w++) acc[h][w] = _mm512_mul_ps(acc[h][w], corr);
        _mm256_store_si256((__m256i*)pb[h], (__m256i)_mm512_cvtneps_pbh(p));
      }
      const int64_t pairs = (n + 1) / 2;
      for (int64_t i = 0; i < pairs; i++) {
        const int64_t t = t0 + 2 * i;
        for (int v = 0; v < NV; v++) {
          const __m512i a = _mm512_loadu_si512(vc + at[t] + 32 * v);
          const __m512i b = 2 * i + 1 < n ? _mm512_loadu_si512(vc + at[t + 1] + 32 * v) : _mm512_setzero_si512();
          _mm512_store_si512(vbuf + 32 * (i * W + 2 * v), _mm512_unpacklo_epi16(a, b));
          _mm512_store_si512(vbuf + 32 * (i * W + 2 * v + 1), _mm512_unpackhi_epi16(a, b));
        }
      }
      for (int64_t i = 0; i < pairs; i++) {
        __m512bh vv[W];
        for (int w = 0; w < W; w++) vv[w] = (__m512bh)_mm512_load_si512(vbuf + 32 * (i * W + w));
        for (int64_t h = 0; h < hb; h++) {
          int32_t pair;
          std::memcpy(&pair, pb[h] + 2 * i, sizeof pair);  // an odd tile's last partner: its weight is 0
          const __m512bh pp = (__m512bh)_mm512_set1_epi32(pair);
          for (int w = 0; w < W; w++) acc[h][w] = _mm512_dpbf16_ps(acc[h][w], vv[w], pp);
        }
      }
    }
    for (int64_t h = 0; h < hb; h++) {
      alignas(64) float o[W * 16];
      for (int w = 0; w < W; w++) _mm512_store_ps(o + 16 * w, acc[h][w]);
      const float inv = 1.0f / _mm512_reduce_add_ps(lsum[h]);
      c10::BFloat16* og = out + (g0 + h) * D;
      for (int w = 0; w < W; w++)  // accumulator w's lane 4k + i: dim 32 (w / 2) + 8k + 4 (w % 2) + i
        for (int k = 0; k < 4; k++)
          for (int i = 0; i < 4; i++) og[32 * (w / 2) + 8 * k + 4 * (w % 2) + i] = c10::BFloat16(o[16 * w + 4 * k + i] * inv);
    }
  }
}
#else
bool cpu_has_bf16_dot() { return false; }
#endif

// out [rows, H * D]: each row's query heads over its sequence's cached keys, read from the paged
// cache in place. kc/vc [num_blocks, block_size, Hkv, D]; tables [rows, W] block ids; lens [rows].
// C = D / 8, a compile-time count of eight-float chunks so that a key's chunks stay in registers.
//
// A task is one row's KV heads j0 .. j0 + hpt: all of them when there are rows enough for every
// thread, else one head a task so that a single sequence still spreads over the threads. Within a
// task each KV head is one pass over the keys and one over the values, so a key row is widened
// from bf16 once for all of its G query heads (not once per query head), scores come eight tokens
// at a time out of reduce8 (not one horizontal sum each), and the value pass keeps its
// accumulators in registers: it widens a 32-float slice of every value once into a buffer, then
// sums it for each query head with four accumulators. The first pass over a task's keys
// prefetches every head's key and value rows a block ahead: one contiguous read of whole rows,
// which the later passes find in L2. bf16 caches with D a multiple of 32 go to attend_tiles_bf16
// instead where the CPU has AVX512-BF16 (one pass, AVX512-BF16 dot products: 14.2 -> 10.3 ms on
// the shape above in a two-pass form, and a prompt's rows ~25% faster again in tiles).
template <typename T, int C>
void paged_attention_c(const T* qkv, int64_t width, const T* kc, const T* vc, int64_t block_size,
                       const int64_t* tables, int64_t table_width, const int64_t* lens, T* out, int64_t rows,
                       int64_t H, int64_t Hkv, float scale) {
  constexpr int64_t D = C * 8, CW = C < 4 ? C : 4;  // CW: chunks per value pass (one 64-byte line of bf16)
  const int64_t G = H / Hkv;
  int64_t max_len = 1;
  for (int64_t r = 0; r < rows; r++) max_len = std::max(max_len, lens[r]);
  const int64_t hpt = rows >= at::get_num_threads() ? Hkv : 1, per_row = Hkv / hpt, nq = hpt * G;
  // split only where a task is worth a thread's start-up
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(max_len * nq * D, 1));
  const bool dot = std::is_same_v<T, c10::BFloat16> && C % 4 == 0 && cpu_has_bf16_dot();
  at::parallel_for(0, rows * per_row, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> p(dot ? 0 : nq * max_len), mx(nq), sum(nq);
    std::vector<int64_t> at(max_len);  // token t's offset in the cache (its row of KV head 0)
    // the widened path's scratch: scaled queries, partial sums of 8 tokens, a value slice, running maxima
    std::vector<f8> q(dot ? 0 : nq * C), part(dot ? 0 : G * 8), vbuf(dot ? 0 : max_len * CW), mj8(dot ? 0 : G);
    for (int64_t task = begin; task < end; task++) {
      const int64_t r = task / per_row, j0 = (task % per_row) * hpt, L = lens[r];
      const int64_t* table = tables + r * table_width;
      const T* qr = qkv + r * width + j0 * G * D;  // the task's query heads, in order
      if (!dot)
        for (int64_t i = 0; i < nq * C; i++) q[i] = load8(qr + i * 8) * scale;
      // once a task, not per read: two integer divisions a token cost more than its arithmetic
      for (int64_t t = 0, b = 0; t < L; b++)
        for (int64_t i = 0; i < block_size && t < L; i++, t++) at[t] = (table[b] * block_size + i) * Hkv * D;
      for (int64_t jj = 0; jj < hpt; jj++) {
        const int64_t j = j0 + jj;
        // token t's row of KV head j in the cache
        auto row = [&](const T* base, int64_t t) { return base + at[t] + j * D; };
        float* pj = p.data() + jj * G * L;  // [G, L] scores, then probabilities
        float* mj = mx.data() + jj * G;
        // p <- e^(p - max), and its sum
        auto softmax = [&] {
          for (int64_t g = 0; g < G; g++) {
            float* ph = pj + g * L;
            f8 s8{};
            int64_t t = 0;
            for (; t + 8 <= L; t += 8) {
              f8 e = exp8(load8(ph + t) - mj[g]);
              std::memcpy(ph + t, &e, sizeof e);
              s8 += e;
            }
            float s = hsum(s8);
            for (; t < L; t++) s += (ph[t] = std::exp(ph[t] - mj[g]));
            sum[jj * G + g] = s;
          }
        };
#ifdef NANOSEEK_BF16_DOT
        if constexpr (std::is_same_v<T, c10::BFloat16> && C % 4 == 0) {
          if (dot) {
            const T* qg = qkv + r * width + j * G * D;  // this KV head's query heads, unscaled
            attend_tiles_bf16<C / 4>(qg, kc + j * D, vc + j * D, at.data(), L, G, scale, out + r * H * D + j * G * D,
                                     jj == 0 ? hpt * D * sizeof(T) : 0);
            continue;
          }
        }
#endif
        const f8* qj = q.data() + jj * G * C;
        for (int64_t g = 0; g < G; g++) mj8[g] = f8{} - INFINITY;
        for (int64_t t0 = 0; t0 < L; t0 += 8) {  // q . k, eight tokens at a time
          const int64_t n = std::min<int64_t>(8, L - t0);
          for (int64_t u = 0; u < 8; u++) {
            if (u >= n) {
              for (int64_t g = 0; g < G; g++) part[g * 8 + u] = f8{};
              continue;
            }
            const int64_t t = t0 + u;
            const T* k = row(kc, t);
            if (jj == 0) {  // the first pass: every head's rows, a block ahead
              if (t + block_size < L) {
                prefetch(row(kc, t + block_size), hpt * D * sizeof(T));
                prefetch(row(vc, t + block_size), hpt * D * sizeof(T));
              }
            }
            f8 kv[C];
            for (int c = 0; c < C; c++) kv[c] = load8(k + c * 8);
            for (int64_t g = 0; g < G; g++) {  // two chains of FMAs: one waits on each add's latency
              const f8* qg = qj + g * C;
              f8 s0 = qg[0] * kv[0], s1{};
              for (int c = 1; c < C; c += 2) {
                s1 += qg[c] * kv[c];
                if (c + 1 < C) s0 += qg[c + 1] * kv[c + 1];
              }
              part[g * 8 + u] = s0 + s1;
            }
          }
          for (int64_t g = 0; g < G; g++) {
            f8 s = reduce8(&part[g * 8]);
            if (n < 8)
              for (int64_t u = n; u < 8; u++) s[u] = -INFINITY;  // no token: no score, nor a max
            std::memcpy(pj + g * L + t0, &s, n * sizeof(float));
            mj8[g] = mj8[g] > s ? mj8[g] : s;
          }
        }
        for (int64_t g = 0; g < G; g++) {
          const f8 m = mj8[g];
          mj[g] = std::max(std::max(std::max(m[0], m[1]), std::max(m[2], m[3])), std::max(std::max(m[4], m[5]), std::max(m[6], m[7])));
        }
        softmax();
        for (int64_t c0 = 0; c0 < C; c0 += CW) {  // softmax-weighted values, a 32-float slice at a time
          for (int64_t t = 0; t < L; t++) {
            const T* v = row(vc, t) + c0 * 8;
            for (int64_t cc = 0; cc < CW; cc++) vbuf[t * CW + cc] = load8(v + cc * 8);
          }
          for (int64_t g = 0; g < G; g++) {
            const float* ph = pj + g * L;
            f8 acc[CW] = {}, odd[CW] = {};  // even and odd tokens: eight chains keep both FMA ports busy
            int64_t t = 0;
            for (; t + 2 <= L; t += 2) {
              const f8 p0 = f8{} + ph[t], p1 = f8{} + ph[t + 1];
              for (int64_t cc = 0; cc < CW; cc++) {
                acc[cc] += p0 * vbuf[t * CW + cc];
                odd[cc] += p1 * vbuf[(t + 1) * CW + cc];
              }
            }
            if (t < L)
              for (int64_t cc = 0; cc < CW; cc++) acc[cc] += (f8{} + ph[t]) * vbuf[t * CW + cc];
            for (int64_t cc = 0; cc < CW; cc++) acc[cc] += odd[cc];
            T* o = out + r * H * D + (j * G + g) * D + c0 * 8;
            const float inv = 1.0f / sum[jj * G + g];
            for (int64_t cc = 0; cc < CW; cc++)
              for (int d = 0; d < 8; d++) o[cc * 8 + d] = from_f<T>(acc[cc][d] * inv);
          }
        }
      }
    }
  });
}

// head_dim D = 8 * C for C in {1, 2, 4, 8, 16}: the sizes the kernel is compiled for
// (flat_decode.py sends no other)
template <typename T>
void paged_attention(const T* qkv, int64_t width, const T* kc, const T* vc, int64_t block_size,
                     const int64_t* tables, int64_t table_width, const int64_t* lens, T* out, int64_t rows,
                     int64_t H, int64_t Hkv, int64_t D, float scale) {
  switch (D) {
#define NANOSEEK_ATTN_CASE(d) \
    case d: return paged_attention_c<T, d / 8>(qkv, width, kc, vc, block_size, tables, table_width, lens, out, rows, H, Hkv, scale);
    NANOSEEK_ATTN_CASE(8) NANOSEEK_ATTN_CASE(16) NANOSEEK_ATTN_CASE(32) NANOSEEK_ATTN_CASE(64) NANOSEEK_ATTN_CASE(128)
#undef NANOSEEK_ATTN_CASE
    default: TORCH_CHECK(false, "native attention: head_dim ", D, " is not one of 8, 16, 32, 64, 128");
  }
}

// ---- block-sparse prefill attention (model/sparse_attention.py attend_blocks, bf16) -----------
// Queries q [T, G, D] (one KV head's G query heads; query t at position first + t) over the key
// blocks they selected: pairs (query[i], block[i]), sorted by block, the own block among them.
// Block j holds positions j * bs .. j * bs + bs - 1 (rows of k and v [P, D]); a query sees the
// keys of a block up to its own position. A thread owns a range of queries and walks the pairs in
// block order. Each block it meets is packed once: keys as bf16 pairs of dims, transposed, so that
// a broadcast query pair scores 16 keys a lane with no horizontal sums; values as pairs of keys
// interleaved, as attend_tiles_bf16 does. Then the block's query heads go four at a time (ROWS), each
// taking the block in one online-softmax step (flash attention's running max and sum, fp32
// accumulators): four rows keep 4 x NC score chains and 4 x 2 NV value chains in flight, where
// one row alone waits on the latency of each dot product. A query's blocks come in increasing
// order whatever the chunking or the threads, so its result depends on its own selection only.
#ifdef NANOSEEK_BF16_DOT
constexpr int ROWS = 4;
constexpr f8 IOTA8 = {0, 1, 2, 3, 4, 5, 6, 7};

struct BlockRow {
  int64_t r;          // the row's accumulators: (query - t0) * G + head
  const uint32_t* q;  // its query, as bf16 pairs
  int64_t nk;         // keys it sees in the block
};

// one online-softmax step of ROWS rows (short batches repeat their first row; only n are kept)
// over a packed block: kp [D/2][16 NC] key pairs, vp [8 NC][2 NV][32] value pairs
template <int NV, int NC>
BF16_DOT_TARGET void block_rows(const BlockRow* rows, int n, const uint32_t* kp, const uint16_t* vp, float scale,
                                float* acc, float* mx, float* sum) {
  constexpr int64_t D = 32 * NV, BSP = 16 * NC;
  __m512 sc[ROWS][NC];
  for (int i = 0; i < ROWS; i++)
    for (int c = 0; c < NC; c++) sc[i][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D / 2; d++) {
    __m512bh qq[ROWS];
    for (int i = 0; i < ROWS; i++) qq[i] = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(rows[i < n ? i : 0].q[d]));
    for (int c = 0; c < NC; c++) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kp + d * BSP + 16 * c);
      for (int i = 0; i < ROWS; i++) sc[i][c] = _mm512_dpbf16_ps(sc[i][c], kv, qq[i]);
    }
  }
  alignas(64) float s[BSP];
  alignas(64) uint16_t pb[ROWS][BSP + 2];
  float alpha[ROWS];
  int64_t nk_max = 1;
  for (int i = 0; i < ROWS; i++) {
    const BlockRow& row = rows[i < n ? i : 0];
    const int64_t nk = row.nk;
    nk_max = std::max(nk_max, nk);
    // lanes at or past nk: keys after the query, or past the block (no score, weight 0)
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < NC; c++) {
      sc[i][c] = _mm512_mul_ps(sc[i][c], _mm512_set1_ps(scale));
      const __mmask16 live = nk >= 16 * (c + 1) ? __mmask16(0xFFFF) : nk <= 16 * c ? __mmask16(0) : __mmask16((1u << (nk - 16 * c)) - 1);
      mv = _mm512_mask_max_ps(mv, live, mv, sc[i][c]);
      _mm512_store_ps(s + 16 * c, sc[i][c]);
    }
    const float m_old = i < n ? mx[row.r] : -INFINITY, m_new = std::max(m_old, _mm512_reduce_max_ps(mv));
    alpha[i] = m_old == -INFINITY ? 0.0f : std::exp(m_old - m_new);
    f8 tot8{};
    for (int64_t u = 0; u < BSP; u += 8) {
      const f8 x = exp8(load8(s + u) - m_new);
      const f8 y = (IOTA8 + float(u)) < float(nk) ? x : f8{};
      store8(s + u, y);
      tot8 += y;
    }
    const float tot = hsum(tot8);
    for (int64_t u = 0; u < BSP; u += 16) _mm256_storeu_si256((__m256i*)(pb[i] + u), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(s + u)));
    if (i < n) {
      mx[row.r] = m_new;
      sum[row.r] = sum[row.r] * alpha[i] + tot;
    }
  }
  __m512 o[ROWS][2 * NV];
  for (int i = 0; i < ROWS; i++) {
    const float* ar = acc + rows[i < n ? i : 0].r * D;
    for (int w = 0; w < 2 * NV; w++) o[i][w] = _mm512_mul_ps(_mm512_loadu_ps(ar + 16 * w), _mm512_set1_ps(alpha[i]));
  }
  for (int64_t u = 0; u < (nk_max + 1) / 2; u++) {  // a row's weights past its own keys are 0
    __m512bh pp[ROWS];
    for (int i = 0; i < ROWS; i++) {
      int32_t pair;
      std::memcpy(&pair, pb[i] + 2 * u, sizeof pair);
      pp[i] = (__m512bh)_mm512_set1_epi32(pair);
    }
    for (int w = 0; w < 2 * NV; w++) {
      const __m512bh vv = (__m512bh)_mm512_loadu_si512(vp + 32 * (u * 2 * NV + w));
      for (int i = 0; i < ROWS; i++) o[i][w] = _mm512_dpbf16_ps(o[i][w], vv, pp[i]);
    }
  }
  for (int i = 0; i < n; i++)
    for (int w = 0; w < 2 * NV; w++) _mm512_storeu_ps(acc + rows[i].r * D + 16 * w, o[i][w]);
}

// queries t0 .. t1 - 1: one thread's share (a lambda would not carry the target attributes)
template <int NV, int NC>
BF16_DOT_TARGET void block_attention_range(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v,
                                           int64_t ks, int64_t vs, int64_t P, const int64_t* pq, const int64_t* pb,
                                           int64_t n_pairs,
                                           int64_t t0, int64_t t1, int64_t G, int64_t first, int64_t bs, float scale,
                                           c10::BFloat16* out) {
  constexpr int64_t D = 32 * NV, BSP = 16 * NC;
  const int64_t nt = t1 - t0;
  std::vector<float> acc(nt * G * D, 0.0f), mx(nt * G, -INFINITY), sum(nt * G, 0.0f);
  std::vector<uint32_t> kp((D / 2) * BSP);      // [dim pair][key]: both dims of a pair, one key
  std::vector<uint16_t> vp((BSP / 2) * 2 * D);  // [key pair][2 NV vectors of 32]
  BlockRow batch[ROWS];
  int n = 0;
  int64_t packed = -1;
  for (int64_t i = 0; i <= n_pairs; i++) {
    const bool more = i < n_pairs;
    const int64_t t = more ? pq[i] : -1;
    if (more && (t < t0 || t >= t1)) continue;
    const int64_t j = more ? pb[i] : -1;
    if (n && (j != packed || !more)) {  // the block's last rows
      block_rows<NV, NC>(batch, n, kp.data(), vp.data(), scale, acc.data(), mx.data(), sum.data());
      n = 0;
    }
    if (!more) break;
    const int64_t base = j * bs;
    if (j != packed) {
      for (int64_t u = 0; u < BSP; u++) {
        const bool have = u < bs && base + u < P;
        const uint32_t* kr = have ? reinterpret_cast<const uint32_t*>(k + (base + u) * ks) : nullptr;
        for (int64_t d = 0; d < D / 2; d++) kp[d * BSP + u] = have ? kr[d] : 0u;
      }
      for (int64_t u = 0; u < BSP; u += 2) {
        for (int w = 0; w < NV; w++) {
          const bool ha = u < bs && base + u < P, hb = u + 1 < bs && base + u + 1 < P;
          const __m512i a = ha ? _mm512_loadu_si512(v + (base + u) * vs + 32 * w) : _mm512_setzero_si512();
          const __m512i b = hb ? _mm512_loadu_si512(v + (base + u + 1) * vs + 32 * w) : _mm512_setzero_si512();
          _mm512_storeu_si512(vp.data() + 32 * ((u / 2) * 2 * NV + 2 * w), _mm512_unpacklo_epi16(a, b));
          _mm512_storeu_si512(vp.data() + 32 * ((u / 2) * 2 * NV + 2 * w + 1), _mm512_unpackhi_epi16(a, b));
        }
      }
      packed = j;
    }
    const int64_t nk = std::min<int64_t>(bs, first + t - base + 1);  // keys up to the query's own position
    for (int64_t g = 0; g < G; g++) {
      batch[n++] = BlockRow{(t - t0) * G + g, reinterpret_cast<const uint32_t*>(q + (t * G + g) * D), nk};
      if (n == ROWS) {
        block_rows<NV, NC>(batch, n, kp.data(), vp.data(), scale, acc.data(), mx.data(), sum.data());
        n = 0;
      }
    }
  }
  for (int64_t r = 0; r < nt * G; r++) {  // normalise; undo the value interleave (see attend_tiles_bf16)
    const float inv = sum[r] > 0.0f ? 1.0f / sum[r] : 0.0f;
    const float* ar = acc.data() + r * D;
    c10::BFloat16* og = out + (t0 * G + r) * D;
    for (int w = 0; w < 2 * NV; w++)
      for (int kk = 0; kk < 4; kk++)
        for (int l = 0; l < 4; l++) og[32 * (w / 2) + 8 * kk + 4 * (w % 2) + l] = c10::BFloat16(ar[16 * w + 4 * kk + l] * inv);
  }
}

template <int NV, int NC>
void block_attention_bf16(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, int64_t ks,
                          int64_t vs, int64_t P,
                          const int64_t* pq, const int64_t* pb, int64_t n_pairs, int64_t T, int64_t G, int64_t first,
                          int64_t bs, float scale, c10::BFloat16* out) {
  const int64_t grain = std::max<int64_t>(1, T / std::max(1, at::get_num_threads()));
  at::parallel_for(0, T, grain, [&](int64_t t0, int64_t t1) {
    block_attention_range<NV, NC>(q, k, v, ks, vs, P, pq, pb, n_pairs, t0, t1, G, first, bs, scale, out);
  });
}
#endif

// q [T, G, D], k and v [P, D] (bf16; rows may be strided, e.g. one KV head of [P, Hkv, D], and
// are read in place); pairs sorted by block -> [T, G, D]. Where the
// CPU has no AVX512-BF16 the caller stays in Python (has_bf16_dot()).
Tensor block_attention(Tensor q, Tensor k, Tensor v, Tensor pair_query, Tensor pair_block, int64_t first,
                       int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 2 && v.sizes() == k.sizes() && q.size(2) == k.size(1),
              "block_attention: q [T, G, D], k and v [P, D]");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "block_attention: bf16 tensors");
  TORCH_CHECK(block_size >= 1 && block_size <= 64, "block_attention: block size ", block_size, " is not in 1..64");
  TORCH_CHECK(cpu_has_bf16_dot(), "block_attention: this CPU has no AVX512-BF16");
  q = q.contiguous();
  if (k.stride(1) != 1) k = k.contiguous();
  if (v.stride(1) != 1) v = v.contiguous();
  pair_query = pair_query.contiguous();
  pair_block = pair_block.contiguous();
  const int64_t T = q.size(0), G = q.size(1), D = q.size(2);
  Tensor out = at::empty_like(q);
#ifdef NANOSEEK_BF16_DOT
  auto run = [&](auto nv, auto nc) {
    block_attention_bf16<decltype(nv)::value, decltype(nc)::value>(
        q.data_ptr<c10::BFloat16>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(), k.stride(0), v.stride(0),
        k.size(0),
        pair_query.data_ptr<int64_t>(), pair_block.data_ptr<int64_t>(), pair_query.numel(), T, G, first, block_size,
        static_cast<float>(scale), out.data_ptr<c10::BFloat16>());
  };
  auto by_block = [&](auto nv) {  // 16-key lanes a block takes
    switch ((block_size + 15) / 16) {
      case 1: return run(nv, std::integral_constant<int, 1>{});
      case 2: return run(nv, std::integral_constant<int, 2>{});
      case 3: return run(nv, std::integral_constant<int, 3>{});
      default: return run(nv, std::integral_constant<int, 4>{});
    }
  };
  switch (D) {
    case 32: by_block(std::integral_constant<int, 1>{}); break;
    case 64: by_block(std::integral_constant<int, 2>{}); break;
    case 128: by_block(std::integral_constant<int, 4>{}); break;
    default: TORCH_CHECK(false, "block_attention: head_dim ", D, " is not one of 32, 64, 128");
  }
#endif
  return out;
}

class Decoder {
 public:
  Decoder(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double scale, bool interleaved)
      : H_(n_heads), Hkv_(n_kv_heads), D_(head_dim), scale_(scale), interleaved_(interleaved) {}

  void add_layer(Tensor ln1, double eps1, Tensor ln2, double eps2, std::vector<Tensor> qkv,
                 std::vector<Tensor> o, std::vector<Tensor> gate_up, std::vector<Tensor> down,
                 std::vector<int64_t> kinds, std::vector<int64_t> groups, std::vector<int64_t> pack_max_m) {
    Layer l{ln1, ln2, eps1, eps2};
    std::vector<Tensor>* parts[4] = {&qkv, &o, &gate_up, &down};
    Proj* projs[4] = {&l.qkv, &l.o, &l.gate_up, &l.down};
    for (int i = 0; i < 4; i++) {  // each part: [weight, bias or empty, scale or empty]
      Proj& p = *projs[i];
      p.kind = kinds[i];
      p.group = groups[i];
      p.pack_max_m = pack_max_m[i];
      p.w = (*parts[i])[0];
      if ((*parts[i])[1].numel()) p.bias = (*parts[i])[1];
      p.scale = (*parts[i])[2];
    }
    layers_.push_back(std::move(l));
  }

  // x [rows, dim] embedded tokens: a decoding sequence's one token, or a prompt's (chunk's) tokens
  // in order; cos/sin [rows, D/2]; k_cache/v_cache: each layer's [num_blocks, block_size, Hkv, D];
  // slots [rows]: where each row's key and value go; tables [rows, W]: the row's sequence's
  // blocks; lens [rows]: the keys the row sees (its position + 1). Every row's key and value are
  // written before any row attends, so a prompt's rows see each other causally.
  // Returns final_norm(hidden) [rows, dim].
  Tensor step(Tensor x, Tensor cos, Tensor sin, const std::vector<Tensor>& k_cache,
              const std::vector<Tensor>& v_cache, Tensor slots, Tensor tables, Tensor lens, Tensor norm,
              double norm_eps) {
    TORCH_CHECK(k_cache.size() == layers_.size() && v_cache.size() == layers_.size(),
                "native decode: the cache has ", k_cache.size(), " layers, the model ", layers_.size());
    x = x.contiguous().clone();  // updated in place: the residual stream
    cos = cos.contiguous();
    sin = sin.contiguous();
    slots = slots.contiguous();
    tables = tables.contiguous();
    lens = lens.contiguous();
    Tensor y;
    auto go = [&](auto zero) { y = run<decltype(zero)>(x, cos, sin, k_cache, v_cache, slots, tables, lens, norm, norm_eps); };
    AT_DISPATCH_SWITCH(x.scalar_type(), "nanoseek_decode_step",
        AT_DISPATCH_CASE(at::kFloat, [&] { go(float{}); }) AT_DISPATCH_CASE(at::kBFloat16, [&] { go(c10::BFloat16{}); }));
    return y;
  }

 private:
  template <typename T>
  Tensor run(Tensor& x, const Tensor& cos, const Tensor& sin, const std::vector<Tensor>& k_cache,
             const std::vector<Tensor>& v_cache, const Tensor& slots, const Tensor& tables, const Tensor& lens,
             const Tensor& norm, double norm_eps) {
    const int64_t rows = x.size(0), dim = x.size(1), H = H_, Hkv = Hkv_, D = D_;
    const int64_t width = (H + 2 * Hkv) * D;
    Tensor h = at::empty_like(x);
    Tensor attn = at::empty({rows, H * D}, x.options());
    T* xp = x.data_ptr<T>();
    for (const Layer& l : layers_) {
      const size_t li = &l - layers_.data();
      rms_norm_rows<T>(xp, l.ln1.data_ptr<T>(), h.data_ptr<T>(), rows, dim, l.eps1);
      Tensor qkv = l.qkv(h).contiguous();
      T* qp = qkv.data_ptr<T>();
      rope_rows<T>(qp, cos.data_ptr<T>(), sin.data_ptr<T>(), rows, H + Hkv, width, D, interleaved_);
      // this token's key and value into its cache slot
      const Tensor& kc = k_cache[li];
      const Tensor& vc = v_cache[li];
      T* kcp = kc.data_ptr<T>();
      T* vcp = vc.data_ptr<T>();
      const int64_t* sp = slots.data_ptr<int64_t>();
      for (int64_t r = 0; r < rows; r++) {
        std::copy(qp + r * width + H * D, qp + r * width + (H + Hkv) * D, kcp + sp[r] * Hkv * D);
        std::copy(qp + r * width + (H + Hkv) * D, qp + (r + 1) * width, vcp + sp[r] * Hkv * D);
      }
      paged_attention<T>(qp, width, kcp, vcp, kc.size(1), tables.data_ptr<int64_t>(), tables.size(1),
                         lens.data_ptr<int64_t>(), attn.data_ptr<T>(), rows, H, Hkv, D,
                         static_cast<float>(scale_));
      Tensor o = l.o(attn).contiguous();
      const T* op = o.data_ptr<T>();
      add_rows<T>(xp, op, rows, dim);
      // the FFN half in slices of rows (a prompt's step has thousands): cache-sized temporaries,
      // as model/transformer.py slices it
      const bool bf16_dot = cpu_has_bf16_dot();
      for (int64_t a = 0; a < rows; a += kFfnRows) {
        const int64_t n = std::min(kFfnRows, rows - a);
        Tensor ha = h.narrow(0, a, n);
        rms_norm_rows<T>(xp + a * dim, l.ln2.data_ptr<T>(), ha.data_ptr<T>(), n, dim, l.eps2);
        Tensor gu = l.gate_up(ha).contiguous();
        const int64_t F = gu.size(1) / 2;
        Tensor act = at::empty({n, F}, x.options());
        const T* gp = gu.data_ptr<T>();
        T* ap = act.data_ptr<T>();
        over_rows(n, 2 * F, [&](int64_t r) {  // F.silu(gate) * up, each rounded as the modules round it
          const T* gr = gp + r * 2 * F;
          T* ar = ap + r * F;
#ifdef NANOSEEK_BF16_DOT
          if constexpr (std::is_same_v<T, c10::BFloat16>) {
            if (bf16_dot) {
              silu_mul_bf16(gr, gr + F, ar, F);
              return;
            }
          }
#endif
          int64_t i = 0;
          for (; i + 8 <= F; i += 8) {
            const f8 g = load8(gr + i);
            store8(ar + i, round8<T>(g / (1.0f + exp8(-g))) * load8(gr + F + i));
          }
          for (; i < F; i++) ar[i] = from_f<T>(rnd<T>(to_f(gr[i]) / (1.0f + std::exp(-to_f(gr[i])))) * to_f(gr[F + i]));
        });
        Tensor d = l.down(act).contiguous();
        add_rows<T>(xp + a * dim, d.data_ptr<T>(), n, dim);
      }
    }
    Tensor y = at::empty_like(x);  // the final norm
    rms_norm_rows<T>(xp, norm.data_ptr<T>(), y.data_ptr<T>(), rows, dim, norm_eps);
    return y;
  }

  int64_t H_, Hkv_, D_;
  double scale_;
  bool interleaved_;
  std::vector<Layer> layers_;
};

// the attention alone, for tests and benchmarks: qkv [rows, (H + 2 Hkv) * D] (its q part is read)
Tensor attention(Tensor qkv, Tensor kc, Tensor vc, Tensor tables, Tensor lens, int64_t H, int64_t Hkv, double scale) {
  qkv = qkv.contiguous();
  tables = tables.contiguous();
  lens = lens.contiguous();
  const int64_t rows = qkv.size(0), D = kc.size(3);
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == qkv.scalar_type(),
              "attention: contiguous caches of the query's dtype");
  Tensor out = at::empty({rows, H * D}, qkv.options());
  auto go = [&](auto zero) {
    using T = decltype(zero);
    paged_attention<T>(qkv.data_ptr<T>(), qkv.size(1), kc.data_ptr<T>(), vc.data_ptr<T>(), kc.size(1),
                       tables.data_ptr<int64_t>(), tables.size(1), lens.data_ptr<int64_t>(), out.data_ptr<T>(), rows,
                       H, Hkv, D, static_cast<float>(scale));
  };
  AT_DISPATCH_SWITCH(qkv.scalar_type(), "nanoseek_attention",
      AT_DISPATCH_CASE(at::kFloat, [&] { go(float{}); }) AT_DISPATCH_CASE(at::kBFloat16, [&] { go(c10::BFloat16{}); }));
  return out;
}

// int4 weights in the checkpoint layout (uint8 [N, K/2]: column 2i the low nibble, 2i + 1 the
// high) -> [N, K] in dtype: q * scale + min per group of K / scale.size(1), computed as
// quant/int4.py dequantize does (a float multiply, then an add, then rounded to dtype: no fused
// multiply-add here, so the two agree exactly). One pass over the weight, where the Python form
// makes five (prefill above the int4 kernel's rows dequantises every weight, every step).
template <typename T>
__attribute__((optimize("fp-contract=off"))) void dequantize_int4_row(const uint8_t* b, const float* sc, const float* mn,
                                                                      T* out, int64_t groups, int64_t group) {
  for (int64_t gi = 0; gi < groups; gi++) {
    const f8 s = f8{} + sc[gi], m = f8{} + mn[gi];
    for (int64_t k = gi * group; k < (gi + 1) * group; k += 8) {
      const uint8_t* p = b + k / 2;
      const f8 q = {float(p[0] & 15), float(p[0] >> 4), float(p[1] & 15), float(p[1] >> 4),
                    float(p[2] & 15), float(p[2] >> 4), float(p[3] & 15), float(p[3] >> 4)};
      store8(out + k, q * s + m);
    }
  }
}

Tensor dequantize_int4(Tensor packed, Tensor scale, Tensor lo, at::ScalarType dtype) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && scale.dim() == 2 && lo.sizes() == scale.sizes() &&
              scale.size(0) == packed.size(0), "dequantize_int4: packed uint8 [N, K/2], scale and min [N, K/group]");
  packed = packed.contiguous();
  scale = scale.to(at::kFloat).contiguous();
  lo = lo.to(at::kFloat).contiguous();
  const int64_t N = packed.size(0), K = 2 * packed.size(1), groups = scale.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 8 == 0, "dequantize_int4: groups of a multiple of 8");
  const int64_t group = K / groups;
  Tensor out = at::empty({N, K}, packed.options().dtype(dtype));
  auto go = [&](auto zero) {
    using T = decltype(zero);
    const uint8_t* pp = packed.data_ptr<uint8_t>();
    const float* sp = scale.data_ptr<float>();
    const float* lp = lo.data_ptr<float>();
    T* op = out.data_ptr<T>();
    over_rows(N, K, [&](int64_t n) {
      dequantize_int4_row<T>(pp + n * (K / 2), sp + n * groups, lp + n * groups, op + n * K, groups, group);
    });
  };
  AT_DISPATCH_SWITCH(dtype, "nanoseek_dequantize_int4",
      AT_DISPATCH_CASE(at::kFloat, [&] { go(float{}); }) AT_DISPATCH_CASE(at::kBFloat16, [&] { go(c10::BFloat16{}); }));
  return out;
}

// ---- greedy choice: each row's argmax ------------------------------------------------------
// x [R, N] fp32 logits -> [R] int64: the index of each row's first maximum (torch.max's rule,
// a NaN counting as the maximum). Eight lanes keep a running maximum and its index; torch's
// max(-1) takes ~0.9 ms for 32 rows of a 49,152-token vocabulary here, this ~0.1 ms.
Tensor argmax_rows(Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "argmax_rows: fp32 [R, N]");
  x = x.contiguous();
  const int64_t R = x.size(0), N = x.size(1);
  Tensor out = at::empty({R}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  // the plain rule, one element at a time: the first NaN, else the first maximum
  auto scalar = [](const float* row, int64_t N) {
    int64_t best_j = 0;
    for (int64_t i = 0; i < N; i++) {
      if (row[i] != row[i]) return i;
      if (row[i] > row[best_j]) best_j = i;
    }
    return best_j;
  };
  over_rows(R, N, [&](int64_t r) {
    const float* row = xp + r * N;
    if (N < 16) {
      op[r] = scalar(row, N);
      return;
    }
    f8 bv = load8(row), odd{};  // odd: v - v, NaN wherever a lane met a NaN or an infinity
    i8x8 bi = {0, 1, 2, 3, 4, 5, 6, 7}, idx = bi;
    int64_t j = 8;
    for (; j + 8 <= N; j += 8) {
      idx += 8;
      const f8 v = load8(row + j);
      odd += v - v;
      const i8x8 gt = v > bv;  // strictly greater: a tie keeps the earlier index
      bv = gt ? v : bv;
      bi = gt ? idx : bi;
    }
    odd += bv - bv;
    if (hsum(odd) != 0.0f) {  // NaN or infinities: the plain rule decides
      op[r] = scalar(row, N);
      return;
    }
    float best = bv[0];
    int64_t best_j = bi[0];
    for (int k = 1; k < 8; k++)
      if (bv[k] > best || (bv[k] == best && bi[k] < best_j)) best = bv[k], best_j = bi[k];
    for (; j < N; j++) {
      if (row[j] != row[j] || row[j] - row[j] != 0.0f) {
        best_j = scalar(row, N);
        break;
      }
      if (row[j] > best) best = row[j], best_j = j;
    }
    op[r] = best_j;
  });
  return out;
}

// ---- top-k block choice (indexer.choose_blocks) ---------------------------------------------
// torch.topk takes ~10 ns an element here for the short rows of block selection (k ~ 30 of
// ~1,000 blocks, one row per query and group: ~0.6 s a layer at 32K tokens). This finds the
// same set by a threshold instead: the k-th largest of the maxima of >= k column groups is a
// lower bound on the k-th largest score (those k maxima are k distinct scores), so only the
// scores at or above it are candidates, and a partial sort of those (a few times k) picks k.
// Scores are compared as order-preserving integers; ties go to the later column, which is the
// tie-break indexer.recency_bias asks for, and makes the choice independent of row length.

inline int32_t key_of_bits(int32_t u) { return u ^ ((u >> 31) & 0x7fffffff); }  // float bits -> ordered int
inline int32_t order_key(float f) {
  int32_t u;
  std::memcpy(&u, &f, sizeof u);
  return key_of_bits(u);
}
// a row's keys from its raw bits (bf16: the high half of a float), in a loop that vectorises
inline void row_keys(const float* s, int64_t L, int32_t* keys) {
  const int32_t* u = reinterpret_cast<const int32_t*>(s);
  for (int64_t j = 0; j < L; j++) keys[j] = key_of_bits(u[j]);
}
inline void row_keys(const c10::BFloat16* s, int64_t L, int32_t* keys) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(s);
  for (int64_t j = 0; j < L; j++) keys[j] = key_of_bits(int32_t(uint32_t(h[j]) << 16));
}

template <typename T>
void topk_columns_rows(const T* s, const int64_t* limit, int64_t R, int64_t n, int64_t lo, int64_t k, int64_t* out) {
  const int32_t none = order_key(-INFINITY);
  at::parallel_for(0, R, std::max<int64_t>(1, 4096 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> keys(n), maxima(n);
    std::vector<uint64_t> cand(n);
    for (int64_t r = r0; r < r1; r++) {
      int64_t* o = out + r * k;
      const int64_t L = std::max<int64_t>(0, std::min(limit[r], n) - lo);  // columns lo .. lo + L - 1
      const T* sr = s + r * n + lo;
      row_keys(sr, L, keys.data());
      int64_t nc = 0;
      if (L <= k) {
        for (int64_t j = 0; j < L; j++) cand[nc++] = j;
      } else {
        // the groups: columns equal mod nb (>= k of them, a multiple of 16: the max runs in vectors)
        const int64_t nb = std::min(L, (2 * k + 15) / 16 * 16);
        std::copy(keys.begin(), keys.begin() + nb, maxima.begin());
        for (int64_t a = nb; a < L; a += nb)
          for (int64_t b = 0; b < std::min(nb, L - a); b++) maxima[b] = std::max(maxima[b], keys[a + b]);
        std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.begin() + nb, std::greater<int32_t>());
        const int32_t tau = maxima[k - 1];
        // (score, column) as one unsigned integer: the larger is the better, ties to the later column
        for (int64_t a = 0; a < L; a += 16) {  // most 16-column runs hold no candidate: test them whole
          const int64_t e = std::min(L, a + 16);
          bool any = false;
          for (int64_t j = a; j < e; j++) any |= keys[j] >= tau;
          if (!any) continue;
          for (int64_t j = a; j < e; j++) {
            cand[nc] = (uint64_t(uint32_t(keys[j]) ^ 0x80000000u) << 32) | uint64_t(j);
            nc += keys[j] >= tau;
          }
        }
        if (nc > k) std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.begin() + nc, std::greater<uint64_t>());
        nc = k;
      }
      for (int64_t i = 0; i < k; i++) {
        const int64_t j = i < nc ? int64_t(cand[i] & 0xffffffffu) : -1;
        o[i] = j < 0 || keys[j] == none ? -1 : lo + j;
      }
    }
  });
}

// s [R, n] (fp32 or bf16) block scores, limit [R]: row r chooses among columns lo .. limit[r]-1
// -> [R, k] int64 columns in no particular order; -1 where fewer than k columns (or a -inf score).
Tensor topk_columns(Tensor s, Tensor limit, int64_t lo, int64_t k) {
  TORCH_CHECK(s.dim() == 2 && limit.dim() == 1 && limit.size(0) == s.size(0), "topk_columns: s [R, n], limit [R]");
  TORCH_CHECK(limit.scalar_type() == at::kLong && k >= 0 && lo >= 0, "topk_columns: int64 limit, k >= 0, lo >= 0");
  TORCH_CHECK(s.size(1) < (int64_t(1) << 32), "topk_columns: rows longer than 2^32");
  s = s.contiguous();
  limit = limit.contiguous();
  Tensor out = at::empty({s.size(0), k}, s.options().dtype(at::kLong));
  if (k == 0 || s.size(0) == 0) return out;
  auto go = [&](auto zero) {
    using T = decltype(zero);
    topk_columns_rows<T>(s.data_ptr<T>(), limit.data_ptr<int64_t>(), s.size(0), s.size(1), lo, k,
                         out.data_ptr<int64_t>());
  };
  AT_DISPATCH_SWITCH(s.scalar_type(), "nanoseek_topk_columns",
      AT_DISPATCH_CASE(at::kFloat, [&] { go(float{}); }) AT_DISPATCH_CASE(at::kBFloat16, [&] { go(c10::BFloat16{}); }));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, bool>())
      .def("add_layer", &Decoder::add_layer)
      // without the GIL: the server's event loop keeps streaming while the engine thread decodes
      .def("step", &Decoder::step, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attention", &attention, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("argmax_rows", &argmax_rows, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("dequantize_int4", &dequantize_int4, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("block_attention", &block_attention, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("topk_columns", &topk_columns, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("has_bf16_dot", &cpu_has_bf16_dot);
}
