// The library's own entry points: its ABI version, the layout of every struct of the boundary
// (checked against the Python declarations when the library is loaded), the non-finite check,
// and the stream copy the benchmark measures bandwidth with.
#include <cstddef>
#include <string>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "optimlab.h"

using namespace optimlab;

extern "C" {

int optimlab_abi_version() { return 2; }

int optimlab_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ";Struct size field@offset ..." for every struct of optimlab_structs.h, in its order
const char* optimlab_layout() {
  static const std::string layout = [] {
    std::string out;
#define OPTIMLAB_S(T) out += ";" #T " " + std::to_string(sizeof(T));
#define OPTIMLAB_F(T, f) out += " " #f "@" + std::to_string(offsetof(T, f));
    OPTIMLAB_STRUCTS(OPTIMLAB_S, OPTIMLAB_F)
#undef OPTIMLAB_S
#undef OPTIMLAB_F
    return out;
  }();
  return layout.c_str();
}

// tab per tensor: data pointer, numel, DType code.  Returns 1 when no element is inf or NaN,
// 0 otherwise, -1 for an unknown dtype.
int optimlab_all_finite(int64_t nt, const int64_t* tab, int nthreads) {
  std::vector<int64_t> numel(nt);
  for (int64_t k = 0; k < nt; k++) {
    numel[k] = tab[3 * k + 1];
    if (tab[3 * k + 2] < 0 || tab[3 * k + 2] > 3) return -1;
  }
  int bad = 0;
  std::vector<int> flags(std::max(1, nthreads) * 16, 0);
  for_chunks(nt, numel.data(), 1 << 16, nthreads, [&](int64_t k, int64_t s, int64_t e) {
    const void* base = reinterpret_cast<const void*>(static_cast<intptr_t>(tab[3 * k]));
    bool ok = true;
    switch (tab[3 * k + 2]) {
      case F32: ok = finite_bits<uint32_t, 0x7f800000u>(static_cast<const uint32_t*>(base) + s, e - s); break;
      case BF16: ok = finite_bits<uint16_t, 0x7f80u>(static_cast<const uint16_t*>(base) + s, e - s); break;
      case F64: ok = finite_bits<uint64_t, 0x7ff0000000000000ull>(static_cast<const uint64_t*>(base) + s, e - s); break;
      case F16: ok = finite_bits<uint16_t, 0x7c00u>(static_cast<const uint16_t*>(base) + s, e - s); break;
    }
    if (!ok) flags[size_t(thread_id()) * 16] = 1;
  });
  for (size_t i = 0; i < flags.size(); i += 16) bad |= flags[i];
  return bad ? 0 : 1;
}

// A STREAM-style copy of n bytes (for the benchmark's memory-bandwidth reference): 32-byte
// non-temporal stores where the CPU has them, so the copy moves 2 bytes per byte copied.
void optimlab_stream_copy(void* dst, const void* src, int64_t n, int nthreads) {
  int nth = std::max(1, nthreads);
#pragma omp parallel num_threads(nth)
  {
    const int tid = thread_id(), cnt = team_size();
    int64_t lo = (n * tid / cnt) & ~int64_t(63), hi = tid + 1 == cnt ? n : (n * (tid + 1) / cnt) & ~int64_t(63);
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
#if defined(__AVX__)
    int64_t i = lo;
    while (i < hi && (reinterpret_cast<uintptr_t>(d + i) & 31)) { d[i] = s[i]; i++; }
    for (; i + 32 <= hi; i += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
    for (; i < hi; i++) d[i] = s[i];
    _mm_sfence();
#else
    std::memcpy(d + lo, s + lo, size_t(hi - lo));
#endif
  }
}

}  // extern "C"
