// The torch backend's CPU paged decode attention: one query per sequence and head against that sequence's cached
// keys and values, read in place through its block table (no gathered copy of the context), in fp32 for fp32 /
// fp16 / bf16 caches. AVX2 + FMA + F16C, OpenMP threads over (sequence, run of heads). Built and called by
// engine/cpu_kernels.py.
//
// out[b, h] = softmax(scale * q[b, h] . K[b, :, h]^T) . V[b, :, h] over the context_lens[b] cached tokens of
// sequence b, token s in slot block_tables[b, s / block_size] * block_size + s % block_size of the
// [slots, H, D] caches. Exact softmax in two passes over the scores (kept per thread), no online rescaling.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "simd.h"

namespace {

using namespace gpt2_cpu;

constexpr long kMaxHeadDim = 256;  // D <= this and a multiple of 8 (engine/cpu_kernels.py checks both)

inline long slot_of(const int32_t* table, long s, long block_size) {
  return static_cast<long>(table[s / block_size]) * block_size + s % block_size;
}

// The scores of heads 0 .. J-1 for one token: q and key point at the first head's D values, the next head's are D
// on. J dot products at once, so J independent FMA chains are in flight.
template <int J, typename T>
inline void score_heads(const float* q, const T* key, long D, float scale, float* scores, long head_stride) {
  __m256 dot[J];
  for (int j = 0; j < J; j++) dot[j] = _mm256_setzero_ps();
  for (long d = 0; d < D; d += 8) {
    for (int j = 0; j < J; j++) {
      dot[j] = _mm256_fmadd_ps(load8(key + j * D + d), _mm256_loadu_ps(q + j * D + d), dot[j]);
    }
  }
  for (int j = 0; j < J; j++) scores[j * head_stride] = hsum(dot[j]) * scale;
}

// scores[0 .. n) -> e^(score - max) in place; returns their sum.
inline float exponentiate(float* scores, long n) {
  float top = -INFINITY;
  for (long s = 0; s < n; s++) top = std::max(top, scores[s]);
  const __m256 top8 = _mm256_set1_ps(top);
  __m256 total8 = _mm256_setzero_ps();
  long s = 0;
  for (; s + 8 <= n; s += 8) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + s), top8));
    _mm256_storeu_ps(scores + s, p);
    total8 = _mm256_add_ps(total8, p);
  }
  float total = 0.0f;
  for (; s < n; s++) {
    scores[s] = std::exp(scores[s] - top);
    total += scores[s];
  }
  return total + hsum(total8);
}

// Heads 0 .. heads-1 of one sequence, token by token: each token's keys (and values) of these heads are one
// contiguous run of its slot, read once, where a head at a time read D values a slot apart (bf16 caches evicted
// first, gpt2-medium's heads: 8 x 100 tokens 617 -> 263 us, 8 x 1000 4.1 -> 1.6 ms). q and out are the heads' D values
// each, k and v point at the first head of slot 0 (the next slot is HD on); scores holds heads x n, acc
// heads + heads x D (each head's inverse sum, then its value sums).
template <typename T>
void attend(const float* q, const T* k, const T* v, const int32_t* table, long n, long heads, long HD, long D,
            long block_size, float scale, float* scores, float* acc, float* out) {
  for (long s = 0; s < n; s++) {
    const T* key = k + slot_of(table, s, block_size) * HD;
    long h = 0;
    for (; h + 4 <= heads; h += 4) score_heads<4>(q + h * D, key + h * D, D, scale, scores + h * n + s, n);
    for (; h < heads; h++) score_heads<1>(q + h * D, key + h * D, D, scale, scores + h * n + s, n);
  }
  float* inverse = acc;     // heads: 1 / each head's sum of e^(score - max), 0 with nothing cached (zeros out)
  float* sum = acc + heads;  // heads x D: the weighted sums of the values
  for (long h = 0; h < heads; h++) {
    const float total = exponentiate(scores + h * n, n);
    inverse[h] = n > 0 ? 1.0f / total : 0.0f;
  }
  std::fill(sum, sum + heads * D, 0.0f);
  for (long s = 0; s < n; s++) {
    const T* value = v + slot_of(table, s, block_size) * HD;
    for (long h = 0; h < heads; h++) {
      const __m256 p = _mm256_set1_ps(scores[h * n + s]);
      for (long d = 0; d < D; d += 8) {
        float* a = sum + h * D + d;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(p, load8(value + h * D + d), _mm256_loadu_ps(a)));
      }
    }
  }
  for (long h = 0; h < heads; h++)
    for (long d = 0; d < D; d++) out[h * D + d] = sum[h * D + d] * inverse[h];
}

// Whether every sequence's context fits its table row and every block it reads is one of the cache's.
bool tables_hold(const int32_t* block_tables, long table_stride, const int32_t* context_lens, long B, long block_size,
                 long num_blocks) {
  for (long b = 0; b < B; b++) {
    const long n = context_lens[b];
    if (n < 0 || n > table_stride * block_size) return false;
    for (long i = 0; i < (n + block_size - 1) / block_size; i++) {
      const long block = block_tables[b * table_stride + i];
      if (block < 0 || block >= num_blocks) return false;
    }
  }
  return true;
}

template <typename T>
void decode(const float* q, const void* k_cache, const void* v_cache, const int32_t* block_tables, long table_stride,
            const int32_t* context_lens, float* out, long B, long H, long D, long block_size, float scale,
            int threads) {
  const T* k = static_cast<const T*>(k_cache);
  const T* v = static_cast<const T*>(v_cache);
  long longest = 0;
  for (long b = 0; b < B; b++) longest = std::max<long>(longest, context_lens[b]);
  // Work items of (sequence, a run of its heads): whole sequences where there are enough of them to share out,
  // else each sequence's heads split so every thread has about two items.
  const long parts = std::min<long>(H, std::max<long>(1, (2 * threads + B - 1) / B));
  const long items = B * parts;
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> scores(H * longest), acc(H + H * D);
#pragma omp for schedule(static)
    for (long i = 0; i < items; i++) {
      const long b = i / parts, part = i % parts;
      const long first = H * part / parts, heads = H * (part + 1) / parts - first;
      attend(q + (b * H + first) * D, k + first * D, v + first * D, block_tables + b * table_stride, context_lens[b],
             heads, H * D, D, block_size, scale, scores.data(), acc.data(), out + (b * H + first) * D);
    }
  }
}

}  // namespace

extern "C" {

// The largest head size gpt2_cpu_decode_attention takes.
long gpt2_cpu_decode_attention_max_head_dim() { return kMaxHeadDim; }

// q, out: fp32 [B, H, D]; k_cache, v_cache: [num_blocks * block_size slots, H, D] of ``kind`` (fp32, fp16 or
// bf16); block_tables: int32 [B, table_stride]; context_lens: int32 [B]. All contiguous. Returns 0, or -1 (writing
// nothing) for arguments it does not take: a head size it can't, or a context its table row or the cache can't hold.
int gpt2_cpu_decode_attention(int kind, const float* q, const void* k_cache, const void* v_cache,
                              const int32_t* block_tables, long table_stride, const int32_t* context_lens, float* out,
                              long B, long H, long D, long block_size, long num_blocks, float scale, int threads) {
  if (D % 8 != 0 || D > kMaxHeadDim || block_size < 1 || threads < 1) return -1;
  if (!tables_hold(block_tables, table_stride, context_lens, B, block_size, num_blocks)) return -1;
  switch (kind) {
    case kF32:
      decode<float>(q, k_cache, v_cache, block_tables, table_stride, context_lens, out, B, H, D, block_size, scale,
                    threads);
      return 0;
    case kF16:
      decode<FP16>(q, k_cache, v_cache, block_tables, table_stride, context_lens, out, B, H, D, block_size, scale,
                   threads);
      return 0;
    case kBF16:
      decode<BF16>(q, k_cache, v_cache, block_tables, table_stride, context_lens, out, B, H, D, block_size, scale,
                   threads);
      return 0;
  }
  return -1;
}

}  // extern "C"
