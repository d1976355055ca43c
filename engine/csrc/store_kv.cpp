// The torch backend's CPU KV store: each token's keys and values ([H, D] contiguous, rows ``row_stride`` bytes
// apart, as views of the fused QKV output are) copied into its slot of the [slots, H, D] caches; a slot of -1 is
// skipped. Built and called by engine/cpu_kernels.py; a step's stores are a few rows, so one thread copies them.

#include <cstdint>
#include <cstring>

extern "C" {

// Returns 0, or -1 (writing nothing) when a slot is past the caches' ``num_slots``.
int gpt2_cpu_store_kv(const char* k, const char* v, long row_stride, long row_bytes, char* k_cache, char* v_cache,
                      long num_slots, const int64_t* slots, long T) {
  for (long t = 0; t < T; t++) {
    if (slots[t] >= num_slots) return -1;
  }
  for (long t = 0; t < T; t++) {
    if (slots[t] < 0) continue;
    std::memcpy(k_cache + slots[t] * row_bytes, k + t * row_stride, row_bytes);
    std::memcpy(v_cache + slots[t] * row_bytes, v + t * row_stride, row_bytes);
  }
  return 0;
}

}  // extern "C"
