// The torch backend's CPU GEMM: y[M, N] = x[M, K] . W[N, K]^T computed in fp32, for fp32 / fp16 / bf16 weights and
// int8 weight codes with per-row scales. AVX2 + FMA + F16C intrinsics, the float weights' loop in simd.h's Vec (16
// lanes where built for AVX-512, else 8); OpenMP threads (the libgomp PyTorch has loaded). Built and called by
// engine/cpu_kernels.py, which documents the measurements behind the choices here.
//
// * Float weights: each weight is read once per tile and widened to fp32 in registers (F16C for fp16, a shift for
//   bf16). Weights packed once at load (strips of kLanes rows, a strip's values at one k side by side) are multiplied
//   as outer products, every output one FMA chain along k; row-major ones (the LM head, which shares its storage with
//   the embedding) as dot products, kLanes partial sums per output. Either way an output's sum runs in the same
//   order whatever the batch and the threads (batch-invariant, bit for bit).
// * int8 weights: activations are rounded to int16 row by row (scale = the row's max |x| / 32767) and multiplied
//   with the codes widened to int16, 16 products per instruction (vpmaddwd), summed exactly in int32 within chunks
//   of K that cannot overflow, then scaled: w_scale[n] * x_scale[m] * sum. The codes of each block of 8 rows are
//   stored 16 values of K at a time, row after row ([K / 16][rows][16]), so a tile reads all its rows' codes from
//   one pointer at fixed offsets: with a pointer per row the loop ran out of registers and took 2.6x as long.
// * Activations may be fp32, fp16 or bf16: 16-bit ones are widened once per call, and the epilogue (+ bias, GELU,
//   + residual: the model's order) runs in fp32 on each thread's own columns as soon as they are done, rounding once
//   into the output's format. The torch ops it replaces (two conversions and up to three elementwise ops around
//   each GEMM) cost more than a small GEMV at M = 1.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <omp.h>
#include <unistd.h>

#include "simd.h"

namespace {

using namespace gpt2_cpu;

constexpr long kKMultiple = 16;       // K must be a multiple of this (engine/cpu_kernels.py checks it)
constexpr float kInt16Max = 32767.0f;  // |activation code| <= this
// int32 sums per lane: each vpmaddwd term is at most 2 * 32767 * 127, and a lane takes at most one term per 16
// values of K, so 2048 values of K (128 terms, at most 1.07e9) stay under 2^31 with 2x to spare.
constexpr long kInt8Chunk = 2048;
constexpr int kInt8Rows = 8;  // activation rows per int8 tile
// At M = 1 the int8 GEMV prefetches the codes this many bytes ahead in its stream of rows (one row is too close: it
// measured no faster). gpt2-medium's block GEMMs, 2 Xeon cores: 0.87x the time in the AVX2 build, 0.95x in AVX-512's;
// 4 and 16 KiB ahead gained less on single GEMMs.
constexpr long kInt8Ahead = 8192;
// Weight rows per int8 tile above M = 1: two in the AVX-512 build, whose 32 registers hold 2 x 8 accumulators
// (gpt2-medium's block GEMMs, 2 Xeon cores: 0.84x the time of one row at M = 32, 0.70x at M = 256; three rows
// measured slower than two); one with AVX2 (see int8_weights).
constexpr int kInt8TileRows = kLanes == 16 ? 2 : 1;

// f(std::integral_constant<int, b>{}, m) for each block of b <= B activation rows starting at row m: full blocks of
// B, then one smaller block for the rest, so every tile size is a compile-time constant.
template <int B, typename F>
inline void rest_block(long left, long m, F& f) {
  if (left == B) {
    f(std::integral_constant<int, B>{}, m);
  } else if constexpr (B > 1) {
    rest_block<B - 1>(left, m, f);
  }
}

template <int B, typename F>
inline void activation_blocks(long M, F&& f) {
  long m = 0;
  for (; m + B <= M; m += B) f(std::integral_constant<int, B>{}, m);
  if (m < M) rest_block<B - 1>(M - m, m, f);
}

// Each thread's contiguous share [begin, end) of ``count`` items, in whole ``grain``s but for the last thread's end:
// body(begin, end, is_last_thread).
template <typename Body>
void parallel_shares(long count, long grain, int threads, Body body) {
#pragma omp parallel num_threads(threads)
  {
    const long t = omp_get_thread_num(), n = omp_get_num_threads(), grains = count / grain;
    body(grain * (grains * t / n), t == n - 1 ? count : grain * (grains * (t + 1) / n), t == n - 1);
  }
}

// What follows the product, in the model's order: out = gelu(y + bias) + residual, each part optional, where y is
// the fp32 product and bias, residual and out are stored in the activations' format (out may be y itself in fp32).
struct Epilogue {
  const void* bias;      // [N] or null
  const void* residual;  // [M, N] or null
  void* out;             // [M, N]
  int kind;              // the activations' stored format: kF32, kF16 or kBF16
  bool gelu;
};

template <typename A>
void finish_columns(const Epilogue& e, const float* y, long M, long N, long begin, long end) {
  const A* bias = static_cast<const A*>(e.bias);
  const A* residual = static_cast<const A*>(e.residual);
  A* out = static_cast<A*>(e.out);
  for (long m = 0; m < M; m++) {
    const float* row = y + m * N;
    long n = begin;
    for (; n + 8 <= end; n += 8) {
      __m256 v = _mm256_loadu_ps(row + n);
      if (bias) v = _mm256_add_ps(v, load8(bias + n));
      if (e.gelu) v = gelu_tanh(v);
      if (residual) v = _mm256_add_ps(v, load8(residual + m * N + n));
      store8(out + m * N + n, v);
    }
    for (; n < end; n++) {
      float v = row[n];
      if (bias) v += load1(bias + n);
      if (e.gelu) v = gelu_tanh(v);
      if (residual) v += load1(residual + m * N + n);
      store1(out + m * N + n, v);
    }
  }
}

void finish(const Epilogue& e, const float* y, long M, long N, long begin, long end) {
  switch (e.kind) {
    case kF16:
      finish_columns<FP16>(e, y, M, N, begin, end);
      return;
    case kBF16:
      finish_columns<BF16>(e, y, M, N, begin, end);
      return;
    default:
      if (e.bias || e.residual || e.gelu) finish_columns<float>(e, y, M, N, begin, end);
  }
}

// x as fp32: itself, or widened into ``buffer`` from 16-bit activations.
const float* widen(const void* x, int kind, long count, std::vector<float>& buffer) {
  if (kind == kF32) return static_cast<const float*>(x);
  buffer.resize(count);
  for (long i = 0; i < count; i += 8) {
    const __m256 v = kind == kF16 ? load8(static_cast<const FP16*>(x) + i) : load8(static_cast<const BF16*>(x) + i);
    _mm256_storeu_ps(buffer.data() + i, v);
  }
  return buffer.data();
}

// ---- float weights ----

// Packed float weights (every block linear) come in strips of kLanes rows, each strip's values interleaved
// ([N / kLanes][K][kLanes]): one load gives a strip's kLanes weights at one k. Rows past the last whole strip stay
// row-major. engine/cpu_kernels.py packs them.
//
// A tile is MR activation rows against NP strips, an outer product per k: NP weight loads and MR broadcasts feed
// MR x NP FMAs into one register of kLanes outputs each. Every output is one FMA chain over k in order (restarted
// every kChunkK values of k and added to the output so far), whatever the tile, the batch, the thread or the vector
// width: a row's bits do not depend on its batch, nor on the build (rows in whole strips). Against the row-major
// tiles below (registers of partial sums along k, the layout before), on gpt2's block GEMMs (2 Xeon cores, AVX-512,
// interleaved runs): fp32 176 -> 216 GFLOP/s at M = 8, 275-284 -> 304-307 at M = 32, 289-290 -> 346-351 at
// M = 2048 (MKL: 210 at M = 32, 345-405 at 512-2048); fp16 and bf16 1.27-1.36x above M = 1; the AVX2 build (6 x 2
// tiles) 1.02-1.12x.
constexpr long kChunkK = 256;                      // k per FMA chain: error ~ sqrt(256) + sqrt(K / 256) ulp
constexpr int kTileRows = kLanes == 16 ? 8 : 6;    // MR: 8 x 3 takes 24 of AVX-512's 32 registers, 6 x 2 12 of
constexpr int kTileStrips = kLanes == 16 ? 3 : 2;  // AVX2's 16 (NP; 4 x 3 and 3 x 3 ran slower there)
constexpr int kGemvStrips = 6;                     // NP at M = 1: six independent chains hide the FMA latency
constexpr long kRowBlock = 8 * kTileRows;          // activation rows swept against a strip's weights in turn
constexpr long kChunkBytes = 1 << 20;              // weights of the strips a thread sweeps the rows against at once
// At M = 1 each strip prefetched this many bytes ahead of its stream. gpt2-medium's 96 block GEMVs (2 Xeon cores),
// against the row-major tiles with their own prefetch: fp16 0.9x the time (1.05x without it), bf16 the same, fp32
// 0.95x with or without; 512 B ahead was a little slower, 1 KiB the same.
constexpr long kStripAhead = 2048;

template <int MR, int NP, typename W>
inline void strip_tile(const float* x, long K, const W* w, float* y, long N) {
  const long strip_step = K * kLanes;
  for (long k0 = 0; k0 < K; k0 += kChunkK) {
    const long k1 = std::min(K, k0 + kChunkK);
    Vec acc[MR][NP];
    for (int m = 0; m < MR; m++)
      for (int p = 0; p < NP; p++) acc[m][p] = vec_zero();
    for (long k = k0; k < k1; k++) {
      Vec wv[NP];
      for (int p = 0; p < NP; p++) {
        const W* at = w + p * strip_step + k * kLanes;
        wv[p] = vec_load(at);
        if constexpr (MR == 1) _mm_prefetch(reinterpret_cast<const char*>(at) + kStripAhead, _MM_HINT_T0);
      }
      for (int m = 0; m < MR; m++) {
        const Vec xb = vec_broadcast(x + m * K + k);
        for (int p = 0; p < NP; p++) acc[m][p] = vec_fmadd(xb, wv[p], acc[m][p]);
      }
    }
    for (int m = 0; m < MR; m++) {
      for (int p = 0; p < NP; p++) {
        float* out = y + m * N + p * kLanes;
        vec_store(out, k0 == 0 ? acc[m][p] : vec_add(vec_load(out), acc[m][p]));
      }
    }
  }
}

// NP strips against ``rows`` activation rows, kTileRows at a time; y points at row 0's first column of the strips.
template <int NP, typename W>
inline void strip_rows(const float* x, long rows, long K, const W* w, float* y, long N) {
  activation_blocks<kTileRows>(rows, [&](auto b, long m) {
    strip_tile<decltype(b)::value, NP>(x + m * K, K, w, y + m * N, N);
  });
}

// Strips [begin, end) against every activation row: at M = 1 kGemvStrips at a time, above it a chunk of strips at a
// time (kChunkBytes of weights, which the core's L2 keeps), each against blocks of kRowBlock rows, tile by tile.
template <typename W>
void strip_weights(const float* x, const W* w, float* y, long M, long N, long K, long begin, long end) {
  const long strip_step = K * kLanes;
  long p = begin;
  if (M == 1) {
    for (; p + kGemvStrips <= end; p += kGemvStrips) {
      strip_tile<1, kGemvStrips>(x, K, w + p * strip_step, y + p * kLanes, N);
    }
    for (; p < end; p++) strip_tile<1, 1>(x, K, w + p * strip_step, y + p * kLanes, N);
    return;
  }
  const long fit = kChunkBytes / (strip_step * static_cast<long>(sizeof(W)));  // strips, rounded down to whole tiles
  const long chunk = std::max<long>(kTileStrips, fit / kTileStrips * kTileStrips);
  for (long c0 = begin; c0 < end; c0 += chunk) {
    const long c1 = std::min(end, c0 + chunk);
    for (long m0 = 0; m0 < M; m0 += kRowBlock) {
      const long rows = std::min(kRowBlock, M - m0);
      const float* xm = x + m0 * K;
      float* ym = y + m0 * N;
      for (p = c0; p + kTileStrips <= c1; p += kTileStrips) {
        strip_rows<kTileStrips>(xm, rows, K, w + p * strip_step, ym + p * kLanes, N);
      }
      for (; p < c1; p++) strip_rows<1>(xm, rows, K, w + p * strip_step, ym + p * kLanes, N);
    }
  }
}

// Row-major float weights: the LM head, which shares its storage with the embedding, and the rows past the last whole
// strip. A tile is R weight rows against B activation rows with one register of kLanes partial sums each (lane j sums
// the k = j mod kLanes), added up at the end: each row's sum in the same order whatever the batch.
template <int R, int B, typename W>
inline void row_tile(const float* x, const W* w, long K, float* y, long N) {
  Vec acc[R][B];
  for (int r = 0; r < R; r++)
    for (int b = 0; b < B; b++) acc[r][b] = vec_zero();
  for (long k = 0; k < K; k += kLanes) {
    Vec wv[R];
    for (int r = 0; r < R; r++) {
      wv[r] = vec_load(w + r * K + k);
      // At M = 1, the next tile's rows fetched while this one runs: 0.75x the time for the bf16 LM head (2 Xeon cores).
      if constexpr (B == 1) _mm_prefetch(reinterpret_cast<const char*>(w + (r + R) * K + k), _MM_HINT_T0);
    }
    for (int b = 0; b < B; b++) {
      Vec xv = vec_load(x + b * K + k);
      for (int r = 0; r < R; r++) acc[r][b] = vec_fmadd(wv[r], xv, acc[r][b]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < B; b++) y[b * N + r] = vec_sum(acc[r][b]);
}

// R weight rows against every activation row, B at a time; y points at the first row's column of activation row 0.
template <int R, int B, typename W>
inline void row_rows(const float* x, const W* w, float* y, long M, long N, long K) {
  activation_blocks<B>(M, [&](auto b, long m) { row_tile<R, decltype(b)::value>(x + m * K, w, K, y + m * N, N); });
}

// Weight rows per row-major tile: at M = 1 six (six independent chains; three left fp32 a fifth slower); above it six
// against 4 activation rows with AVX-512's 32 registers, three with AVX2's 16 (12 accumulators, the weights and one
// activation vector).
constexpr int kGemvRows = 6;
constexpr int kRowTileRows = kLanes == 16 ? 6 : 3;

// Above M = 1 the activations go a panel of rows at a time, each panel against all of a thread's weight rows, a panel
// taking half a core's L2 (sysconf; 256 KiB where it does not say): every weight tile then sweeps activations its
// core holds, where a sweep over all M rows read them from L3 once K x M outgrew L2. gpt2-medium's block GEMMs at
// M = 256 (2 Xeon cores, L2 2 MiB): 0.84x the time in the AVX-512 build, 0.75x in AVX2's; quarter-MiB panels gained
// less (0.94x, 0.82x), and M = 32 fits one panel.
// Rows of ``row_bytes`` each in a panel, a multiple of ``multiple``.
long panel_rows(long row_bytes, long multiple) {
  static const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE) > 0 ? sysconf(_SC_LEVEL2_CACHE_SIZE) : 512 * 1024;
  return std::max(multiple, l2 / 2 / row_bytes / multiple * multiple);
}

// Row-major weight rows [begin, end) against every activation row.
template <typename W>
void row_weights(const float* x, const W* w, float* y, long M, long N, long K, long begin, long end) {
  const long panel = panel_rows(K * static_cast<long>(sizeof(float)), 4);
  for (long m0 = 0; m0 < M; m0 += panel) {
    const long rows_here = std::min(panel, M - m0);
    const float* xp = x + m0 * K;
    float* yp = y + m0 * N;
    long n = begin;
    for (; rows_here == 1 && n + kGemvRows <= end; n += kGemvRows) {
      row_tile<kGemvRows, 1>(xp, w + n * K, K, yp + n, N);
    }
    for (; rows_here > 1 && n + kRowTileRows <= end; n += kRowTileRows) {
      row_rows<kRowTileRows, 4>(xp, w + n * K, yp + n, rows_here, N, K);
    }
    for (; n < end; n++) row_rows<1, 4>(xp, w + n * K, yp + n, rows_here, N, K);
  }
}

template <typename W>
void float_weights(const float* x, const void* w, bool packed, float* y, long M, long N, long K, const Epilogue& e,
                   int threads) {
  const W* weights = static_cast<const W*>(w);
  if (!packed) {
    parallel_shares(N, 1, threads, [&](long begin, long end, bool) {
      row_weights(x, weights, y, M, N, K, begin, end);
      finish(e, y, M, N, begin, end);
    });
    return;
  }
  const long strips = N / kLanes;
  parallel_shares(strips, M == 1 ? kGemvStrips : kTileStrips, threads, [&](long begin, long end, bool last) {
    strip_weights(x, weights, y, M, N, K, begin, end);
    if (last) row_weights(x, weights, y, M, N, K, strips * kLanes, N);  // the rows past the last whole strip
    finish(e, y, M, N, begin * kLanes, last ? N : end * kLanes);
  });
}

// ---- int8 weights ----

// The int8 GEMM's registers of int16 codes: kCodeLanes of them, 16 in AVX2's, 32 in AVX-512's. An activation row's
// codes are stored in chunks of kCodeLanes ([K / kCodeLanes][rows][kCodeLanes] for a block of rows); where K is an
// odd multiple of 16, the AVX-512 build's last chunk is half used and half_multiply_add reads it.
#if defined(__AVX512F__)
constexpr long kCodeLanes = 32;
using Codes = __m512i;
inline Codes codes_zero() { return _mm512_setzero_si512(); }
inline Codes weight_codes(const int8_t* w) {
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}
inline Codes activation_codes(const int16_t* x) { return _mm512_loadu_si512(x); }
inline Codes multiply_add(Codes acc, Codes w, Codes x) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x)); }
inline float codes_sum(Codes v) { return vec_sum(_mm512_cvtepi32_ps(v)); }
#else
constexpr long kCodeLanes = 16;
using Codes = __m256i;
inline Codes codes_zero() { return _mm256_setzero_si256(); }
inline Codes weight_codes(const int8_t* w) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
}
inline Codes activation_codes(const int16_t* x) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)); }
inline Codes multiply_add(Codes acc, Codes w, Codes x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
inline float codes_sum(Codes v) { return hsum(_mm256_cvtepi32_ps(v)); }
#endif

// 16 weight codes and 16 activation codes multiplied and added into acc's first 8 int32 lanes: the half chunk.
inline Codes half_multiply_add(Codes acc, const int8_t* w, const int16_t* x) {
  const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
  const __m256i product = _mm256_madd_epi16(wv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
#if defined(__AVX512F__)
  return _mm512_add_epi32(acc, _mm512_zextsi256_si512(product));
#else
  return _mm256_add_epi32(acc, product);
#endif
}

// K rounded up to whole chunks of codes: the codes one activation row takes.
inline long codes_per_row(long K) { return (K + kCodeLanes - 1) / kCodeLanes * kCodeLanes; }

// A row of x as int16 codes, code k at q[k / kCodeLanes * chunk_stride + k % kCodeLanes], and its scale; a row
// holding inf or NaN gets a NaN scale (so its outputs are NaN, as a float GEMM's would be), an all-zero row a zero
// scale.
void quantize_row(const float* x, long K, int16_t* q, long chunk_stride, float* scale) {
  const auto at = [&](long k) { return q + k / kCodeLanes * chunk_stride + k % kCodeLanes; };
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps(), probe = _mm256_setzero_ps();
  for (long k = 0; k < K; k += 8) {
    __m256 v = _mm256_loadu_ps(x + k);
    top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v));
    probe = _mm256_add_ps(probe, _mm256_mul_ps(v, _mm256_setzero_ps()));  // NaN once any value is inf or NaN
  }
  float most = 0.0f;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  for (float lane : lanes) most = std::max(most, lane);
  if (hsum(probe) != 0.0f) {  // only NaN compares unequal to 0 here
    *scale = std::numeric_limits<float>::quiet_NaN();
    for (long k = 0; k < K; k += 16) std::memset(at(k), 0, 16 * sizeof(int16_t));
    return;
  }
  *scale = most / kInt16Max;
  const __m256 inv = _mm256_set1_ps(most > 0.0f ? kInt16Max / most : 0.0f);
  for (long k = 0; k < K; k += 16) {
    __m256i lo = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inv));  // round to nearest even
    __m256i hi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k + 8), inv));
    __m256i packed = _mm256_packs_epi32(lo, hi);  // saturating; interleaves the 128-bit halves
    __m256i ordered = _mm256_permute4x64_epi64(packed, 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(at(k)), ordered);
  }
}

// R weight rows (codes w, a row apart; scales w_scale) against the B activation rows of one block of codes x.
template <int R, int B>
inline void int8_tile(const int16_t* x, const float* x_scale, const int8_t* w, const float* w_scale, long K, float* y,
                      long N) {
  float total[R][B] = {};
  for (long start = 0; start < K; start += kInt8Chunk) {
    const long end = std::min(K, start + kInt8Chunk);
    Codes acc[R][B];
    for (int r = 0; r < R; r++)
      for (int b = 0; b < B; b++) acc[r][b] = codes_zero();
    long k = start;
    for (; k + kCodeLanes <= end; k += kCodeLanes) {
      Codes wv[R];
      for (int r = 0; r < R; r++) {
        wv[r] = weight_codes(w + r * K + k);
        if constexpr (B == 1) _mm_prefetch(reinterpret_cast<const char*>(w + r * K + k + kInt8Ahead), _MM_HINT_T0);
      }
      const int16_t* xk = x + k * B;  // this step's codes of each of the B rows, side by side
      for (int b = 0; b < B; b++) {
        const Codes xv = activation_codes(xk + b * kCodeLanes);
        for (int r = 0; r < R; r++) acc[r][b] = multiply_add(acc[r][b], wv[r], xv);
      }
    }
    if (k < end) {  // the half chunk
      for (int r = 0; r < R; r++)
        for (int b = 0; b < B; b++) acc[r][b] = half_multiply_add(acc[r][b], w + r * K + k, x + k * B + b * kCodeLanes);
    }
    for (int r = 0; r < R; r++)
      for (int b = 0; b < B; b++) total[r][b] += codes_sum(acc[r][b]);
  }
  for (int r = 0; r < R; r++)
    for (int b = 0; b < B; b++) y[b * N + r] = total[r][b] * w_scale[r] * x_scale[b];
}

// One weight row per step at M = 1 (measured faster than 2-6 with AVX2: the int32 adds have no latency to hide),
// kInt8TileRows above, 8 activation rows per tile, whose codes (8 x K int16) stay in L1/L2 while the weights stream
// past.
void int8_weights(const float* x, const void* w, const float* w_scale, float* y, long M, long N, long K,
                  const Epilogue& e, int threads) {
  const long row_codes = codes_per_row(K);
  std::vector<int16_t> codes(M * row_codes);
  std::vector<float> x_scale(M);
  for (long m = 0; m < M; m++) {
    const long first = m / kInt8Rows * kInt8Rows, rows = std::min<long>(kInt8Rows, M - first);  // row m's block
    int16_t* block = codes.data() + first * row_codes;
    quantize_row(x + m * K, K, block + (m - first) * kCodeLanes, rows * kCodeLanes, &x_scale[m]);
  }
  const int8_t* weights = static_cast<const int8_t*>(w);
  const long panel = panel_rows(row_codes * static_cast<long>(sizeof(int16_t)), kInt8Rows);
  parallel_shares(N, 1, threads, [&](long begin, long end, bool) {
    // Panels of whole blocks of codes, as for float weights: 0.80-0.87x the time at M = 256 (gpt2-medium's block
    // GEMMs, 2 Xeon cores, both builds), M = 32 the same.
    for (long m0 = 0; m0 < M; m0 += panel) {
      const long rows_here = std::min(panel, M - m0);
      const auto tiles = [&](auto r, long n) {  // weight rows n .. n + r - 1 against the panel, block by block
        activation_blocks<kInt8Rows>(rows_here, [&](auto b, long m) {  // m: the first row of a block
          const long row = m0 + m;
          int8_tile<decltype(r)::value, decltype(b)::value>(codes.data() + row * row_codes, x_scale.data() + row,
                                                            weights + n * K, w_scale + n, K, y + row * N + n, N);
        });
      };
      long n = begin;
      for (; rows_here > 1 && n + kInt8TileRows <= end; n += kInt8TileRows) {
        tiles(std::integral_constant<int, kInt8TileRows>{}, n);
      }
      for (; n < end; n++) tiles(std::integral_constant<int, 1>{}, n);
    }
    finish(e, y, M, N, begin, end);
  });
}

}  // namespace

extern "C" {

// The multiple of K every call needs.
long gpt2_cpu_gemm_k_multiple() { return kKMultiple; }

// The rows of a strip of packed float weights, their values side by side (the GEMM's vector lanes: 8, or 16 with
// AVX-512).
long gpt2_cpu_gemm_pack_lanes() { return kLanes; }

// y[M, N] = gelu(x[M, K] . W[N, K]^T + bias) + residual, all row-major and contiguous; x, bias [N], residual
// [M, N] and y stored as ``act_kind`` (fp32, fp16 or bf16; bias and residual optional, null for none), the product
// and epilogue in fp32 with one rounding at the end; float weights are packed in strips (see strip_tile) where
// ``packed``, else row-major; ``scales`` (per weight row) only for int8, whose codes are row-major.
// Returns 0, or -1 for arguments it does not take (an unknown kind, K not a multiple of 16, int8 without scales).
int gpt2_cpu_gemm(int kind, const void* x, const void* w, int packed, const float* scales, void* y, long M, long N,
                  long K, const void* bias, const void* residual, int act_kind, int gelu, int threads) {
  if (K % kKMultiple != 0 || M < 0 || N < 0 || threads < 1) return -1;
  if (act_kind != kF32 && act_kind != kF16 && act_kind != kBF16) return -1;
  if (kind == kInt8 && scales == nullptr) return -1;
  std::vector<float> x32, y32;
  const float* xf = widen(x, act_kind, M * K, x32);
  if (act_kind != kF32) y32.resize(M * N);
  float* yf = act_kind == kF32 ? static_cast<float*>(y) : y32.data();
  const Epilogue e{bias, residual, y, act_kind, gelu != 0};
  switch (kind) {
    case kF32:
      float_weights<float>(xf, w, packed != 0, yf, M, N, K, e, threads);
      return 0;
    case kF16:
      float_weights<FP16>(xf, w, packed != 0, yf, M, N, K, e, threads);
      return 0;
    case kBF16:
      float_weights<BF16>(xf, w, packed != 0, yf, M, N, K, e, threads);
      return 0;
    case kInt8:
      int8_weights(xf, w, scales, yf, M, N, K, e, threads);
      return 0;
  }
  return -1;
}

}  // extern "C"
