// What every optimlab kernel shares: storage types, threads, rounding as torch rounds, the
// dtype dispatch, the memory check every call makes before it writes, and the shared options
// (maximize and weight decay) as element-wise arithmetic.
//
// Plain C ABI, no Python or torch headers: `optimlab._ext` compiles these sources with the
// system C++ compiler on first use (seconds), against the header it generates from the Python
// declarations (optimlab_structs.h: one struct per hyper-parameter and per-tensor dataclass,
// fields of the same name, in the same order), and calls them through ctypes.  Each kernel
// restates, element by element, the operation order of its algorithm's reference kernel
// (`adam_update` in adam.py, ...), with scalars rounded to the tensor dtype where torch rounds
// them and fused multiply-adds exactly where torch's kernels use them (compiled with
// -ffp-contract=off), so the results agree with the reference to float rounding
// (tests/test_fast_paths.py).  Scalars that depend on the step (bias corrections, RAdam's
// rectification, Adafactor's rho_t) come computed, per tensor, from Python: they are written
// once, in the algorithm's declaration.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "optimlab_structs.h"

namespace optimlab {

// ------------------------------------------------------------------------------ storage types
typedef uint16_t bf16;

inline float bf16_load(bf16 x) { return __builtin_bit_cast(float, uint32_t(x) << 16); }

inline bf16 bf16_store(float f) {                 // round to nearest even, as c10::BFloat16
  uint32_t u = __builtin_bit_cast(uint32_t, f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<bf16>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);   // NaN
}

// storage type S holding compute type T
template <typename S, typename T> struct Mem {
  static inline T ld(const S* p, int64_t i) { return static_cast<T>(p[i]); }
  static inline void st(S* p, int64_t i, T x) { p[i] = static_cast<S>(x); }
};
template <> struct Mem<bf16, float> {
  static inline float ld(const bf16* p, int64_t i) { return bf16_load(p[i]); }
  static inline void st(bf16* p, int64_t i, float x) { p[i] = bf16_store(x); }
};

// the C type of a DType code
template <int64_t CODE> struct CType;
template <> struct CType<F32> { typedef float type; };
template <> struct CType<BF16> { typedef bf16 type; };
template <> struct CType<F64> { typedef double type; };
template <> struct CType<F16> { typedef uint16_t type; };

inline int64_t dtype_size(int64_t code) { return code == F64 ? 8 : (code == F32 ? 4 : 2); }

// A (parameter, gradient, state) dtype combination a kernel is built for.  dispatch<Combos...>
// calls f(Combo{}) for the call's combination if it is one of `Combos`, and returns RC_DTYPES
// otherwise (the Python declaration lists the same combinations; a test runs each of them).
template <int64_t P, int64_t G, int64_t S> struct Combo {
  static constexpr int64_t p = P, g = G, s = S;
  typedef typename CType<P>::type param;
  typedef typename CType<G>::type grad;
  typedef typename CType<S>::type state;
};

template <typename... Cs, typename F>
int dispatch(const Call* call, F&& f) {
  int rc = RC_DTYPES;
  ((rc == RC_DTYPES && call->param_dtype == Cs::p && call->grad_dtype == Cs::g &&
            call->state_dtype == Cs::s
        ? (f(Cs{}), rc = RC_OK)
        : 0),
   ...);
  return rc;
}

// a compile-time bool from a runtime value: f(std::true_type{}) or f(std::false_type{})
template <typename F>
inline void with_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// ------------------------------------------------------------------------------ threads
// this thread's index and the team's size inside a parallel region (0 and 1 without OpenMP)
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int threads_for(int64_t total, int64_t nthreads) {
  // below ~64K elements a fork/join costs more than it saves
  return total < (1 << 16) ? 1 : std::max<int>(1, int(nthreads));
}

// All (tensor, chunk) work items of a call, handed out dynamically: a thread that the OS
// deschedules (a busy machine) does not hold the others at the closing barrier, as a static
// split would.  Chunks are 32K elements (128 KB per fp32 stream), long enough for the
// hardware prefetchers.
template <typename F>
void for_chunks(int64_t nt, const int64_t* numel, int64_t chunk, int64_t nthreads, F&& f) {
  std::vector<int64_t> first(nt + 1, 0);
  int64_t elems = 0;
  for (int64_t k = 0; k < nt; k++) {
    first[k + 1] = first[k] + (numel[k] + chunk - 1) / chunk;
    elems += numel[k];
  }
  const int64_t total = first[nt];
  int nth = threads_for(elems, nthreads);
  if (nth <= 1) {
    for (int64_t k = 0; k < nt; k++)
      for (int64_t s = 0; s < numel[k]; s += chunk) f(k, s, std::min(s + chunk, numel[k]));
    return;
  }
#pragma omp parallel num_threads(nth)
  {
    int64_t k = 0;
#pragma omp for schedule(dynamic, 4)
    for (int64_t item = 0; item < total; item++) {
      while (first[k + 1] <= item) k++;                 // items arrive in increasing order
      while (first[k] > item) k--;
      int64_t s = (item - first[k]) * chunk;
      f(k, s, std::min(s + chunk, numel[k]));
    }
  }
}

constexpr int64_t CHUNK = 1 << 15;

// for_chunks over a kernel's tensor structs (every struct has `numel`)
template <typename TT, typename F>
void for_tensor_chunks(const TT* t, int64_t n, int64_t nthreads, F&& f) {
  std::vector<int64_t> numel(n);
  for (int64_t k = 0; k < n; k++) numel[k] = t[k].numel;
  for_chunks(n, numel.data(), CHUNK, nthreads, std::forward<F>(f));
}

// ------------------------------------------------------------------------------ memory check
// The memory a call writes must not be read or written through another tensor of the call
// (an aliased gradient, overlapping parameter views): the reference kernel applies its
// operations tensor by tensor, the fused one element by element across threads, and the two
// would disagree.  Tensors that are only read may share memory.
struct Ranges {
  struct R { uintptr_t lo, hi; bool written; };
  std::vector<R> r;
  void add(const void* p, int64_t bytes, bool written) {
    if (p != nullptr && bytes > 0)
      r.push_back({reinterpret_cast<uintptr_t>(p), reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes), written});
  }
  bool disjoint() {
    std::sort(r.begin(), r.end(), [](const R& a, const R& b) { return a.lo < b.lo; });
    uintptr_t end_any = 0, end_written = 0;
    for (const R& x : r) {
      if (x.lo < end_written || (x.written && x.lo < end_any)) return false;
      end_any = std::max(end_any, x.hi);
      if (x.written) end_written = std::max(end_written, x.hi);
    }
    return true;
  }
};

// ------------------------------------------------------------------------------ rounding
// The library is compiled with -ffp-contract=off, so a multiply and an add round separately,
// as in torch's mul/div/addcdiv kernels; where torch's kernels use a fused multiply-add
// (add/sub with alpha=, addcmul, lerp) so does this code, through fma():
// a + alpha b = fma(alpha, b, a); a + v t1 t2 = fma(v t1, t2, a).
template <typename T> inline T fma(T a, T b, T c) { return std::fma(a, b, c); }

// torch's lerp(a, b, w): fma(w, b - a, a) for |w| < 0.5, else fma(w - 1, b - a, b); written
// without a branch on the (uniform) weight so that the loops vectorize
template <typename T> inline T lerp(T a, T b, T w, bool small) {
  T d = b - a;
  T lo = fma(w, d, a), hi = fma(w - T(1), d, b);
  return small ? lo : hi;
}

// the same with the weight's side known at compile time (a select on a loop-invariant flag
// keeps GCC from vectorizing some loops)
template <bool SMALL, typename T> inline T lerp_(T a, T b, T w) {
  return SMALL ? fma(w, b - a, a) : fma(w - T(1), b - a, b);
}

template <typename T> inline T nan_max(T a, T b) {        // torch.maximum propagates NaN
  return ((a != a) | (a > b)) ? a : b;
}

// ------------------------------------------------------------------------------ finite check
template <typename U, U MASK>
bool finite_bits(const U* x, int64_t n) {
  U bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; i++) bad |= static_cast<U>((x[i] & MASK) == MASK);
  return bad == 0;
}

// ------------------------------------------------------------------------------ shared options
// maximize and weight decay (struct WeightDecay) as the kernels apply them:
//   g     <- sign g (+ l2 theta)                          (an L2 term)
//   theta <- theta * pre_mul    or  fma(-f lambda, theta, theta)   before the update
//   theta <- theta * post_mul   or  fma(-f lambda, theta, theta)   after it
//   theta <- theta + fma(-f lambda, theta, k delta)                  folded into the update
// (ShrinkForm MULTIPLY, ADD or FOLD; the multipliers are 1 where nothing is shrunk, and the
// folded form starts from q = theta * 0: 0, or NaN where theta is not finite, as the
// reference's theta + (k q - c theta) is there).  Every
// kernel writes its last statements as `decay.begin/end` in _common.py:
//   T q = dc.begin(pi);  q = q + delta;  p[i] = dc.end(pi, q);
// Each option is a select between the plain and the decayed value, both computed: an option
// that is off changes nothing, not even an infinite weight (fma(0, inf, g) is NaN, and is
// dropped).  The selects are loop-invariant; GCC vectorizes them as blends, and the kernels
// are memory-bound, so they cost nothing measurable (an AdamW step with decay of the updated
// weights runs as fast as Adam's: the README's Performance section).
template <typename T> struct Decay {
  T sign, l2, pre_mul, post_mul, coef, fold_k;
  // int, not bool: GCC does not vectorize a select on a bool
  int has_l2, pre_add, post_add, fold;
  Decay(int64_t maximize, const WeightDecay& d)
      : sign(maximize ? T(-1) : T(1)), l2(T(d.l2)), pre_mul(T(1)), post_mul(T(1)), coef(T(0)),
        fold_k(T(1)), has_l2(d.l2 != 0), pre_add(0), post_add(0), fold(0) {
    const double c = d.factor * d.lam;
    if (d.lam != 0) {
      if (d.form == 1) {                         // ShrinkForm.ADD: p.add_(p, alpha=-c)
        (d.after ? post_add : pre_add) = 1;
        coef = T(-c);
      } else if (d.form == 2) {                  // ShrinkForm.FOLD: p.add_(k q - c p)
        fold = 1;                                // (begin: q = theta * 0)
        pre_mul = T(0);
        coef = T(-c);
        fold_k = d.after ? T(1 - c) : T(1);
      } else {                                   // ShrinkForm.MULTIPLY: p.mul_(1 - c)
        (d.after ? post_mul : pre_mul) = T(1 - c);
      }
    }
  }
  inline T grad(T g, T p) const {
    T sg = sign * g, with = fma(l2, p, sg);
    return has_l2 != 0 ? with : sg;
  }
  // where the step delta goes: theta (shrunk first, before the update), or 0 (folded:
  // pre_mul is 0; a select of the constant 0 here stops GCC vectorizing the loops)
  inline T begin(T p) const {
    T a = fma(coef, p, p), m = p * pre_mul;
    return pre_add != 0 ? a : m;
  }
  // theta after the step, q = begin(theta) + delta: q shrunk (after the update), or
  // theta + (k q - c theta)
  inline T end(T p, T q) const {
    T a = fma(coef, q, q), m = q * post_mul, b = post_add != 0 ? a : m;
    T f = p + fma(coef, p, fold_k * q);
    return fold != 0 ? f : b;
  }
};

// The checks every element-wise call makes before it writes anything: the parameter and
// gradient pointers are set, the call asks for no finite check (one-pass kernels cannot skip
// a step they have started writing: Python checks first), and no written tensor shares memory
// with another.  `written(k, add)` passes tensor k's written state tensors to add() and
// returns false when one it needs is missing.
template <typename TT, typename W>
int precheck(const TT* t, int64_t n, const Call* call, W&& written) {
  if (call->check_finite || call->groups != 1 || n < 0) return RC_ARGS;
  const int64_t ps = dtype_size(call->param_dtype), gs = dtype_size(call->grad_dtype),
                ss = dtype_size(call->state_dtype);
  Ranges r;
  for (int64_t k = 0; k < n; k++) {
    if (t[k].param == nullptr || t[k].grad == nullptr || t[k].numel < 0) return RC_ARGS;
    r.add(t[k].param, t[k].numel * ps, true);
    r.add(t[k].grad, t[k].numel * gs, false);
    if (!written(k, [&](const void* p) { r.add(p, t[k].numel * ss, true); })) return RC_ARGS;
  }
  return r.disjoint() ? RC_OK : RC_OVERLAP;
}

}  // namespace optimlab
