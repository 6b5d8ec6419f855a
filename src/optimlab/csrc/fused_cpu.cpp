// optimlab's fused CPU kernels: one pass over memory per optimizer step (Adafactor: two),
// all tensors of a parameter group in one call, split across OpenMP threads.
//
// Plain C ABI, no Python or torch headers: `optimlab._ext` compiles this file with the system
// C++ compiler on first use (seconds) and calls it through ctypes with the tensors' data
// pointers.  Each kernel restates, element by element, the operation order of the per-tensor
// reference kernel in the matching optimlab/*.py file (`adam_update`, `sgd_update`, ...),
// with scalars rounded to the tensor dtype where torch rounds them and fused multiply-adds
// exactly where torch's kernels use them (compiled with -ffp-contract=off), so the results
// agree with the reference to float rounding (tests/test_fast_paths.py).
//
// Layout of the per-tensor tables passed in: int64 slots, pointers as integers; 0 = absent.
// Hyper-parameters come as a double array in a fixed order documented at each entry point.
// Returns 0 on success, a negative number for an unsupported dtype code.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace {

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

inline int threads_for(int64_t total, int nthreads) {
  // below ~64K elements a fork/join costs more than it saves
  return total < (1 << 16) ? 1 : std::max(1, nthreads);
}

// All (tensor, chunk) work items of a call, handed out dynamically: a thread that the OS
// deschedules (a busy machine) does not hold the others at the closing barrier, as a static
// split would.  Chunks are 32K elements (128 KB per fp32 stream), long enough for the
// hardware prefetchers.
template <typename F>
void for_chunks(int64_t nt, const int64_t* numel, int64_t chunk, int nthreads, F&& f) {
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

// Rounding as torch's CPU kernels round.  The library is compiled with -ffp-contract=off, so a
// multiply and an add round separately, as in torch's mul/div/addcdiv kernels; where torch's
// kernels use a fused multiply-add (add/sub with alpha=, addcmul, lerp) so does this file,
// through fma(): a + alpha b = fma(alpha, b, a); a + v t1 t2 = fma(v t1, t2, a).
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

template <typename T> struct Table {                      // per-tensor slots
  const int64_t* t;
  int64_t w;
  template <typename P> P* ptr(int64_t k, int slot) const {
    return reinterpret_cast<P*>(static_cast<intptr_t>(t[k * w + slot]));
  }
  int64_t val(int64_t k, int slot) const { return t[k * w + slot]; }
};

// The decay and sign options every kernel shares, as arithmetic that is exact when an
// option is off (x * 1, fma(0, y, x)), so the inner loops carry no branches:
//   g <- sign * g + wd_l2 * theta         (maximize; L2 decay: g.add(theta, alpha=wd))
//   theta <- theta * pre                   (decoupled decay of theta_{t-1}: theta.mul_(pre))
//   theta <- theta + post * theta          (decay of the updated weights: add_ with alpha)
template <typename T> struct Decay {
  T sign, wd_l2, pre, post;
  Decay(double maximize, double l2, double pre_mul, double post_alpha)
      : sign(maximize != 0 ? T(-1) : T(1)), wd_l2(T(l2)), pre(T(pre_mul)), post(T(post_alpha)) {}
  inline T grad(T g, T p) const { return fma(wd_l2, p, sign * g); }
  inline T after(T p) const { return fma(post, p, p); }
};

// ------------------------------------------------------------------------------ finite check
template <typename U, U MASK>
bool finite_bits(const U* x, int64_t n) {
  U bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; i++) bad |= static_cast<U>((x[i] & MASK) == MASK);
  return bad == 0;
}

// ------------------------------------------------------------------------------ Adam
// tab per tensor: p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, numel, step
// hp: lr, beta1, beta2, eps, wd_l2, pre_mul, post_alpha, maximize, amsgrad, sqrt_v_hat,
//     correct_bias
template <typename T, typename S, bool AMS, bool SMALL>
void adam_range(T* __restrict p, const T* __restrict g, S* __restrict m, S* __restrict v,
                S* __restrict vm, int64_t n, const Decay<T> dc, T w1, T b2, T c2, T bs, T eps,
                T val) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    pi = pi * dc.pre;
    T mi = lerp_<SMALL>(Mem<S, T>::ld(m, i), gi, w1);
    T vi = fma(c2 * gi, gi, Mem<S, T>::ld(v, i) * b2);
    Mem<S, T>::st(m, i, mi);
    Mem<S, T>::st(v, i, vi);
    if (AMS) {
      vi = nan_max(Mem<S, T>::ld(vm, i), vi);
      Mem<S, T>::st(vm, i, vi);
    }
    T d = std::sqrt(vi) / bs + eps;          // bs = 1 for eps on sqrt(v): exact
    pi = pi + val * mi / d;
    p[i] = dc.after(pi);
  }
}

template <typename T, typename S>
void adam_kernel(int64_t nt, const int64_t* tab, const double* hp, int nthreads) {
  Table<T> tb{tab, 7};
  const double lr = hp[0], beta1 = hp[1], beta2 = hp[2];
  const Decay<T> dc(hp[7], hp[4], hp[5], hp[6]);
  const T eps = T(hp[3]), w1 = T(1 - beta1), b2 = T(beta2), c2 = T(1 - beta2);
  const bool small = std::abs(w1) < T(0.5);
  const bool amsgrad = hp[8] != 0, hat = hp[9] != 0, correct = hp[10] != 0;
  std::vector<int64_t> numel(nt);
  std::vector<T> bc2s(nt), value(nt);
  for (int64_t k = 0; k < nt; k++) {
    numel[k] = tb.val(k, 5);
    double step = double(tb.val(k, 6));
    double bc1 = correct ? 1 - std::pow(beta1, step) : 1.0;
    double bc2 = correct ? 1 - std::pow(beta2, step) : 1.0;
    double r2 = std::pow(bc2, 0.5);
    bc2s[k] = hat ? T(r2) : T(1);
    value[k] = hat ? T(-lr / bc1) : T(-lr * r2 / bc1);
  }
  for_chunks(nt, numel.data(), CHUNK, nthreads, [&](int64_t k, int64_t s, int64_t e) {
    T* p = tb.template ptr<T>(k, 0) + s;
    const T* g = tb.template ptr<T>(k, 1) + s;
    S* m = tb.template ptr<S>(k, 2) + s;
    S* v = tb.template ptr<S>(k, 3) + s;
    S* vm = amsgrad ? tb.template ptr<S>(k, 4) + s : nullptr;
    const int64_t n = e - s;
    if (amsgrad && small)
      adam_range<T, S, true, true>(p, g, m, v, vm, n, dc, w1, b2, c2, bc2s[k], eps, value[k]);
    else if (amsgrad)
      adam_range<T, S, true, false>(p, g, m, v, vm, n, dc, w1, b2, c2, bc2s[k], eps, value[k]);
    else if (small)
      adam_range<T, S, false, true>(p, g, m, v, vm, n, dc, w1, b2, c2, bc2s[k], eps, value[k]);
    else
      adam_range<T, S, false, false>(p, g, m, v, vm, n, dc, w1, b2, c2, bc2s[k], eps, value[k]);
  });
}

// ------------------------------------------------------------------------------ SGD
// tab: p, g, momentum_buffer, numel, first_step
// hp: lr, momentum, dampening, nesterov, wd_l2, pre_mul, post_alpha, maximize
template <typename T, bool MOM>
void sgd_range(T* __restrict p, const T* __restrict g, T* __restrict b, int64_t n,
               const Decay<T> dc, T lr, T mom, T damp, bool first, bool nesterov) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    pi = pi * dc.pre;
    T d = gi;
    if (MOM) {
      T bi = first ? gi : fma(damp, gi, b[i] * mom);
      b[i] = bi;
      d = nesterov ? fma(mom, bi, gi) : bi;
    }
    pi = fma(lr, d, pi);
    p[i] = dc.after(pi);
  }
}

template <typename T>
void sgd_kernel(int64_t nt, const int64_t* tab, const double* hp, int nthreads) {
  Table<T> tb{tab, 5};
  const T lr = T(-hp[0]), mom = T(hp[1]), damp = T(1 - hp[2]);
  const bool nesterov = hp[3] != 0;
  const Decay<T> dc(hp[7], hp[4], hp[5], hp[6]);
  std::vector<int64_t> numel(nt);
  for (int64_t k = 0; k < nt; k++) numel[k] = tb.val(k, 3);
  for_chunks(nt, numel.data(), CHUNK, nthreads, [&](int64_t k, int64_t s, int64_t e) {
    T* p = tb.template ptr<T>(k, 0) + s;
    const T* g = tb.template ptr<T>(k, 1) + s;
    T* b = tb.template ptr<T>(k, 2);
    const bool first = tb.val(k, 4) != 0;
    if (b == nullptr)
      sgd_range<T, false>(p, g, nullptr, e - s, dc, lr, mom, damp, first, nesterov);
    else
      sgd_range<T, true>(p, g, b + s, e - s, dc, lr, mom, damp, first, nesterov);
  });
}

// ------------------------------------------------------------------------------ AdaGrad
// tab: p, g, sum, numel, step
// hp: lr, lr_decay, eps, wd_l2, pre_mul, post_alpha, maximize
template <typename T>
void adagrad_range(T* __restrict p, const T* __restrict g, T* __restrict sum, int64_t n,
                   const Decay<T> dc, T c, T eps) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    pi = pi * dc.pre;
    T si = fma(gi, gi, sum[i]);
    sum[i] = si;
    pi = pi + c * gi / (std::sqrt(si) + eps);
    p[i] = dc.after(pi);
  }
}

template <typename T>
void adagrad_kernel(int64_t nt, const int64_t* tab, const double* hp, int nthreads) {
  Table<T> tb{tab, 5};
  const T eps = T(hp[2]);
  const Decay<T> dc(hp[6], hp[3], hp[4], hp[5]);
  std::vector<int64_t> numel(nt);
  std::vector<T> clr(nt);
  for (int64_t k = 0; k < nt; k++) {
    numel[k] = tb.val(k, 3);
    clr[k] = T(-(hp[0] / (1 + (double(tb.val(k, 4)) - 1) * hp[1])));
  }
  for_chunks(nt, numel.data(), CHUNK, nthreads, [&](int64_t k, int64_t s, int64_t e) {
    adagrad_range<T>(tb.template ptr<T>(k, 0) + s, tb.template ptr<T>(k, 1) + s,
                     tb.template ptr<T>(k, 2) + s, e - s, dc, clr[k], eps);
  });
}

// ------------------------------------------------------------------------------ RMSProp
// tab: p, g, square_avg, grad_avg, momentum_buffer, numel
// hp: lr, alpha, eps, momentum, centered, wd_l2, pre_mul, post_alpha, maximize
template <typename T, bool CENTERED, bool MOM, bool SMALL>
void rmsprop_range(T* __restrict p, const T* __restrict g, T* __restrict sq, T* __restrict ga,
                   T* __restrict b, int64_t n, const Decay<T> dc, T lr, T alpha, T c, T eps,
                   T mom) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    pi = pi * dc.pre;
    T vi = fma(c * gi, gi, sq[i] * alpha);
    sq[i] = vi;
    T avg;
    if (CENTERED) {
      T ai = lerp_<SMALL>(ga[i], gi, c);
      ga[i] = ai;
      avg = std::sqrt(fma(-ai, ai, vi));
    } else {
      avg = std::sqrt(vi);
    }
    avg = avg + eps;
    if (MOM) {
      T bi = b[i] * mom + gi / avg;
      b[i] = bi;
      pi = fma(lr, bi, pi);
    } else {
      pi = pi + lr * gi / avg;
    }
    p[i] = dc.after(pi);
  }
}

template <typename T>
void rmsprop_kernel(int64_t nt, const int64_t* tab, const double* hp, int nthreads) {
  Table<T> tb{tab, 6};
  const T lr = T(-hp[0]), alpha = T(hp[1]), c = T(1 - hp[1]), eps = T(hp[2]), mom = T(hp[3]);
  const bool centered = hp[4] != 0, use_mom = hp[3] > 0, small = std::abs(c) < T(0.5);
  const Decay<T> dc(hp[8], hp[5], hp[6], hp[7]);
  std::vector<int64_t> numel(nt);
  for (int64_t k = 0; k < nt; k++) numel[k] = tb.val(k, 5);
  for_chunks(nt, numel.data(), CHUNK, nthreads, [&](int64_t k, int64_t s, int64_t e) {
    T* p = tb.template ptr<T>(k, 0) + s;
    const T* g = tb.template ptr<T>(k, 1) + s;
    T* sq = tb.template ptr<T>(k, 2) + s;
    T* ga = centered ? tb.template ptr<T>(k, 3) + s : nullptr;
    T* b = use_mom ? tb.template ptr<T>(k, 4) + s : nullptr;
    const int64_t n = e - s;
#define OPTIMLAB_RMS(C, M, SM) rmsprop_range<T, C, M, SM>(p, g, sq, ga, b, n, dc, lr, alpha, c, eps, mom)
    if (centered && use_mom) { if (small) OPTIMLAB_RMS(true, true, true); else OPTIMLAB_RMS(true, true, false); }
    else if (centered) { if (small) OPTIMLAB_RMS(true, false, true); else OPTIMLAB_RMS(true, false, false); }
    else if (use_mom) OPTIMLAB_RMS(false, true, true);      // no lerp: SMALL is unused
    else OPTIMLAB_RMS(false, false, true);
#undef OPTIMLAB_RMS
  });
}

// ------------------------------------------------------------------------------ RAdam
// tab: p, g, exp_avg, exp_avg_sq, numel, step
// hp: lr, beta1, beta2, eps, sqrt_v_hat, rho_threshold, degenerate_to_sgd, wd_l2, pre_mul,
//     post_alpha, maximize
// BR: 2 the rectified step, 1 the un-adapted step, 0 moments only
// HAT: eps on sqrt(v_hat); a compile-time flag, or the loop computes both forms (divisions
// and square roots bound this kernel's speed, not memory)
template <typename T, int BR, bool SMALL, bool HAT>
void radam_range(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                 int64_t n, const Decay<T> dc, T w1, T b2, T c2, T b1c, T bs, T r, T lr, T eps) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    pi = pi * dc.pre;
    T mi = lerp_<SMALL>(m[i], gi, w1);
    T vi = fma(c2 * gi, gi, v[i] * b2);
    m[i] = mi;
    v[i] = vi;
    T mh = mi / b1c;
    if (BR == 2) {
      T root = std::sqrt(vi);
      T l = HAT ? T(1) / (root / bs + eps) : (T(1) / (root + eps)) * bs;
      pi = pi - mh * lr * l * r;
    } else if (BR == 1) {
      pi = pi - mh * lr;
    }
    p[i] = dc.after(pi);
  }
}

template <typename T>
void radam_kernel(int64_t nt, const int64_t* tab, const double* hp, int nthreads) {
  Table<T> tb{tab, 6};
  const double beta1 = hp[1], beta2 = hp[2];
  const T lr = T(hp[0]), eps = T(hp[3]), w1 = T(1 - beta1), b2 = T(beta2), c2 = T(1 - beta2);
  const bool hat = hp[4] != 0, degenerate = hp[6] != 0, small = std::abs(w1) < T(0.5);
  const Decay<T> dc(hp[10], hp[7], hp[8], hp[9]);
  std::vector<int64_t> numel(nt);
  std::vector<T> bc1(nt), bc2s(nt), rt(nt);
  std::vector<int> branch(nt);
  for (int64_t k = 0; k < nt; k++) {
    numel[k] = tb.val(k, 4);
    double step = double(tb.val(k, 5));
    double b2t = std::pow(beta2, step);
    bc1[k] = T(1 - std::pow(beta1, step));
    bc2s[k] = T(std::pow(1 - b2t, 0.5));
    double rho_inf = 2 / (1 - beta2) - 1;
    double rho_t = rho_inf - 2 * step * b2t / (1 - b2t);
    if (rho_t > hp[5]) {
      branch[k] = 2;
      rt[k] = T(std::pow((rho_t - 4) * (rho_t - 2) * rho_inf /
                         ((rho_inf - 4) * (rho_inf - 2) * rho_t), 0.5));
    } else {
      branch[k] = degenerate ? 1 : 0;
      rt[k] = T(0);
    }
  }
  for_chunks(nt, numel.data(), CHUNK, nthreads, [&](int64_t k, int64_t s, int64_t e) {
    T* p = tb.template ptr<T>(k, 0) + s;
    const T* g = tb.template ptr<T>(k, 1) + s;
    T* m = tb.template ptr<T>(k, 2) + s;
    T* v = tb.template ptr<T>(k, 3) + s;
    const int64_t n = e - s;
#define OPTIMLAB_RADAM(BR, SM, H) radam_range<T, BR, SM, H>(p, g, m, v, n, dc, w1, b2, c2, bc1[k], bc2s[k], rt[k], lr, eps)
    if (branch[k] == 2) {
      if (hat) { if (small) OPTIMLAB_RADAM(2, true, true); else OPTIMLAB_RADAM(2, false, true); }
      else { if (small) OPTIMLAB_RADAM(2, true, false); else OPTIMLAB_RADAM(2, false, false); }
    }
    else if (branch[k] == 1) { if (small) OPTIMLAB_RADAM(1, true, false); else OPTIMLAB_RADAM(1, false, false); }
    else { if (small) OPTIMLAB_RADAM(0, true, false); else OPTIMLAB_RADAM(0, false, false); }
#undef OPTIMLAB_RADAM
  });
}

// ------------------------------------------------------------------------------ Adafactor
// tab: p, g, exp_avg, row, col, v, batches, rows, cols, step   (cols = 0: unfactored, numel
//      = rows; factored tensors are `batches` matrices of rows x cols, row-major)
// hp: lr, eps1, eps2, clip_threshold, decay_rate, beta1 (NaN: none), weight_decay (shrink),
//     decay_factor (NaN: alpha_t), wd_l2, wd_after_update, scale_parameter, relative_step,
//     warmup_init, grad_sq (eps1 placement), momentum_of_update, maximize
//
// Two passes over each factored tensor: (1) sum of p^2, the row/column means of the squared
// gradient and what the update clipping needs, (3) the update.  RMS(U) needs no pass of its
// own: with the new row statistic R_i known as soon as row i is summed,
//   sum_ij U_ij^2 = sum_ij (r_i c_j G_ij)^2 = d sum_j (1/C_j) w_j,  w_j = sum_i G_ij^2 / R_i,
// where r_i = (R_i/d)^(-1/2), c_j = C_j^(-1/2) and d = mean(R) (grad_sq layout) or
// max(mean(R), eps1) (clamp layout, where the clamp at eps1^2 cannot bind; where it can, a
// pass (2) sums U^2 element by element).  w_j is summed in pass 1 from the row still in L1
// (in T over blocks of 16 rows, then in double); the sum differs from the reference's float32
// sum of U^2 by rounding only.
// Vectors (unfactored) keep pass (2), which also updates their v.  Tensors with fewer than
// 64K elements are spread whole over the threads; larger ones are split by rows.
template <typename T>
struct AdafactorTensor {
  T* p;
  const T* g;
  T* ea;
  T* row;
  T* col;
  T* v;
  int64_t B, n, m, numel, step;
};

template <typename T>
struct Adafactor {
  // hyper-parameters
  double lr, eps1, eps2, clip, decay_rate, beta1, wd, decay_factor, wd_l2;
  bool after, scale, relative, warmup, grad_sq, of_update, maximize, has_beta1, alpha_decay;
  T sign, l2;              // g <- sign g + l2 theta

  double rho(int64_t step) const {
    if (!relative) return lr;
    double r = std::min(lr, 1.0 / std::sqrt(double(step)));
    if (warmup) r = std::min(1e-6 * double(step), r);
    return r;
  }

  // per-tensor scalars between the passes
  struct Scal {
    double alpha;          // alpha_t as the reference holds it
    T alpha_t;             // alpha_t rounded to T (grad_sq layout)
    T beta2, one_minus_beta2, weight;
    double rms_den;        // sqrt(numel)
    T clip_div;            // grad_sq: max(1, RMS(U)/d) in T
    double clip_f;         // clamp: the same in double
    T k_step, k_avg, b1;   // clamp layout: the step sizes the reference passes as alpha=
    T one_minus_b1;        // 1 - beta1 rounded once from double, as torch rounds alpha=
    T pre_mul, pre_add, post_mul, post_add;   // theta*mul + add*theta before/after the step
    bool factorized;       // U = (r_i c_j) G  (always with grad_sq; clamp where it cannot bind)
  };

  // ---- the new row statistic R_i from the row's sum of squares (pass 1 and middle agree)
  inline T row_stat(T old, double rsum, int64_t m, const Scal& sc, bool wsmall) const {
    T x = T(rsum / double(m));
    return grad_sq ? fma(sc.one_minus_beta2, x, old * sc.beta2) : lerp(old, x, sc.weight, wsmall);
  }

  // ---- the step's decay scalars (before pass 1: the row statistics need them)
  void scalars(const AdafactorTensor<T>& t, Scal& sc) const {
    sc.beta2 = sc.one_minus_beta2 = sc.weight = T(0);
    if (grad_sq) {
      double b2 = 1.0 - std::pow(double(t.step), decay_rate);
      sc.beta2 = T(b2);
      sc.one_minus_beta2 = T(1.0 - b2);
    } else {
      sc.weight = T(std::pow(double(t.step), decay_rate));
    }
  }

  // ---- pass 1: sum of theta^2, row/column sums of the squared gradient and w_j
  // The column sums and w_j are summed in T over blocks of up to 16 rows, each block's sums
  // then added into double: a vector add per element instead of two conversions and two
  // double adds (pass 1 reads p and g from memory; the sums must not slow it down).
  template <bool READP>
  void pass1_rows(const AdafactorTensor<T>& t, const Scal& sc, int64_t r0, int64_t r1,
                  double& sum_p2, double* rowsum, double* colacc, double* wacc) const {
    constexpr int64_t BLOCK = 16;
    const T e1 = grad_sq ? T(eps1) : T(0), sg = sign, l = l2;
    const bool wsmall = std::abs(sc.weight) < T(0.5);
    std::vector<T> cbuf(size_t(2 * t.m), T(0));
    T* __restrict cb = cbuf.data();
    T* __restrict wb = cbuf.data() + t.m;
    int64_t cur = -1, in_block = 0;
    auto flush = [&]() {
      if (cur < 0) return;
      double* __restrict col = colacc + cur * t.m;
      double* __restrict w = wacc + cur * t.m;
      for (int64_t j = 0; j < t.m; j++) {
        col[j] += double(cb[j]);
        w[j] += double(wb[j]);
        cb[j] = T(0);
        wb[j] = T(0);
      }
    };
    for (int64_t r = r0; r < r1; r++) {
      const T* __restrict g = t.g + r * t.m;
      const T* __restrict p = t.p + r * t.m;
      if (r / t.n != cur || in_block == BLOCK) {
        flush();
        cur = r / t.n;
        in_block = 0;
      }
      in_block++;
      T rs = 0, ps = 0;
#pragma omp simd reduction(+ : rs, ps)
      for (int64_t j = 0; j < t.m; j++) {
        T pj = READP ? p[j] : T(0);
        T gi = fma(l, pj, sg * g[j]);
        T sq = gi * gi + e1;               // + eps1 with grad_sq (exact + 0 otherwise)
        rs += sq;
        ps += pj * pj;
        cb[j] += sq;
      }
      rowsum[r] = double(rs);
      sum_p2 += double(ps);
      const T inv = T(1.0 / double(row_stat(t.row[r], double(rs), t.m, sc, wsmall)));
#pragma omp simd
      for (int64_t j = 0; j < t.m; j++) {  // the row is in L1
        T pj = READP ? p[j] : T(0);
        T gi = fma(l, pj, sg * g[j]);
        wb[j] += (gi * gi) * inv;
      }
    }
    flush();
  }

  void pass1(const AdafactorTensor<T>& t, const Scal& sc, int64_t r0, int64_t r1,
             double& sum_p2, double* rowsum, double* colacc, double* wacc) const {
    if (t.m == 0) {
      if (scale) {
        double acc = 0;
        const T* __restrict p = t.p;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = r0; i < r1; i++) acc += double(p[i]) * double(p[i]);
        sum_p2 += acc;
      }
      return;
    }
    if (scale || wd_l2 != 0) pass1_rows<true>(t, sc, r0, r1, sum_p2, rowsum, colacc, wacc);
    else pass1_rows<false>(t, sc, r0, r1, sum_p2, rowsum, colacc, wacc);
    if (!scale) sum_p2 = 0;
  }

  // sum of U^2 of a factored tensor from pass 1's w (after middle), or -1 where the clamp at
  // eps1^2 can bind and pass 2 must sum U^2 element by element
  double sum_u2(const AdafactorTensor<T>& t, const Scal& sc, const T* cfac,
                const double* wsum) const {
    if (t.m == 0 || !sc.factorized) return -1;
    double total = 0;
    for (int64_t b = 0; b < t.B; b++) {
      const T* col = t.col + b * t.m;
      const double* w = wsum + b * t.m;
      double acc = 0;
      for (int64_t j = 0; j < t.m; j++) acc += w[j] / double(col[j]);
      total += acc * double(cfac[t.B * t.m + b]);
    }
    return total;
  }

  // ---- between the passes: alpha_t, the second-moment updates, the row/column factors
  void middle(const AdafactorTensor<T>& t, double sum_p2, const double* rowsum,
              const double* colsum, T* rfac, T* cfac, Scal& sc) const {
    const double r = rho(t.step);
    sc.rms_den = std::pow(double(t.numel), 0.5);
    if (!scale) {
      sc.alpha = r;
    } else if (grad_sq) {                                     // 0-dim tensor arithmetic
      T rms = T(T(std::sqrt(sum_p2)) / T(sc.rms_den));
      sc.alpha = rms > T(eps2) ? double(T(rms * T(r))) : eps2 * r;
    } else {                                                  // .item() and python floats
      double rms = double(T(std::sqrt(sum_p2))) / sc.rms_den;
      sc.alpha = std::max(eps2, rms) * r;
    }
    sc.alpha_t = T(sc.alpha);
    // the shrink: theta * (1 - f wd) (decay_scale "lr"), or theta - alpha_t wd theta
    T mul = T(1), add = T(0);
    if (wd != 0) {
      if (alpha_decay) add = T(-wd * sc.alpha);
      else mul = T(1 - decay_factor * wd);
    }
    sc.pre_mul = after ? T(1) : mul;
    sc.pre_add = after ? T(0) : add;
    sc.post_mul = after ? mul : T(1);
    sc.post_add = after ? add : T(0);
    sc.factorized = grad_sq;
    if (t.m == 0) return;
    const bool wsmall = std::abs(sc.weight) < T(0.5);
    for (int64_t b = 0; b < t.B; b++) {
      T* row = t.row + b * t.n;
      T* col = t.col + b * t.m;
      const double* rsum = rowsum + b * t.n;
      const double* csum = colsum + b * t.m;
      T* rf = rfac + b * t.n;
      T* cf = cfac + b * t.m;
      double rmean = 0;
      for (int64_t i = 0; i < t.n; i++) {
        row[i] = row_stat(row[i], rsum[i], t.m, sc, wsmall);
        rmean += double(row[i]);
      }
      for (int64_t j = 0; j < t.m; j++) {
        T x = T(csum[j] / double(t.n));
        col[j] = grad_sq ? fma(sc.one_minus_beta2, x, col[j] * sc.beta2)
                         : lerp(col[j], x, sc.weight, wsmall);
      }
      T mean = T(rmean / double(t.n));
      if (grad_sq) {                     // U = rsqrt(R / mean R) rsqrt(C) G
        for (int64_t i = 0; i < t.n; i++) rf[i] = T(1) / std::sqrt(row[i] / mean);
        for (int64_t j = 0; j < t.m; j++) cf[j] = T(1) / std::sqrt(col[j]);
        cfac[t.B * t.m + b] = mean;      // d of sum_u2
      } else {                           // U = rsqrt(max(R C / max(mean R, eps1), eps1^2)) G
        T den = std::max(mean, T(eps1));
        T rmin = row[0], cmin = col[0];
        for (int64_t i = 0; i < t.n; i++) {
          rf[i] = row[i];
          rmin = std::min(rmin, row[i]);
        }
        for (int64_t j = 0; j < t.m; j++) {
          cf[j] = col[j];
          cmin = std::min(cmin, col[j]);
        }
        cfac[t.B * t.m + b] = den;       // kept for the element-wise form
        // where the clamp at eps1^2 cannot bind anywhere, factor the root
        bool fact = (rmin / den) * cmin > T(4 * eps1 * eps1) && std::isfinite(double(rmin)) &&
                    rmin > T(0) && cmin > T(0);
        sc.factorized = b == 0 ? fact : (sc.factorized && fact);
      }
    }
    if (!grad_sq && sc.factorized) {
      for (int64_t b = 0; b < t.B; b++) {
        T* rf = rfac + b * t.n;
        T* cf = cfac + b * t.m;
        T den = cfac[t.B * t.m + b];
        for (int64_t i = 0; i < t.n; i++) rf[i] = T(1) / std::sqrt(rf[i] / den);
        for (int64_t j = 0; j < t.m; j++) cf[j] = T(1) / std::sqrt(cf[j]);
      }
    }
  }

  // ---- pass 2: sum of U^2 (unfactored tensors: also the second-moment update)
  template <bool L2, bool PRODUCT>
  double pass2_rows(const AdafactorTensor<T>& t, const T* rfac, const T* cfac, int64_t r0,
                    int64_t r1) const {
    double total = 0;
    const T e2 = T(eps1 * eps1), sg = sign, l = l2;
    for (int64_t r = r0; r < r1; r++) {
      const T* __restrict g = t.g + r * t.m;
      const T* __restrict p = t.p + r * t.m;
      int64_t b = r / t.n;
      const T* __restrict cf = cfac + b * t.m;
      const T rv = rfac[r], den = PRODUCT ? T(1) : cfac[t.B * t.m + b];
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < t.m; j++) {
        T gi = L2 ? fma(l, p[j], sg * g[j]) : sg * g[j];
        T u = PRODUCT ? (rv * cf[j]) * gi
                      : (T(1) / std::sqrt(std::max((rv * cf[j]) / den, e2))) * gi;
        acc += u * u;
      }
      total += double(acc);
    }
    return total;
  }

  double pass2(const AdafactorTensor<T>& t, const Scal& sc, const T* rfac, const T* cfac,
               int64_t r0, int64_t r1) const {
    if (t.m == 0) {                      // small vectors: plain loop
      double acc = 0;
      const T e2 = T(eps1 * eps1);
      const bool wsmall = std::abs(sc.weight) < T(0.5);
      for (int64_t i = r0; i < r1; i++) {
        T gi = fma(l2, t.p[i], sign * t.g[i]);
        T vi = t.v[i], u;
        if (grad_sq) {
          vi = fma(sc.one_minus_beta2, gi * gi + T(eps1), vi * sc.beta2);
          u = (T(1) / std::sqrt(vi)) * gi;
        } else {
          vi = lerp(vi, gi * gi, sc.weight, wsmall);
          u = (T(1) / std::sqrt(std::max(vi, e2))) * gi;
        }
        t.v[i] = vi;
        acc += double(u) * double(u);
      }
      return acc;
    }
    const bool prod = sc.factorized, withl2 = wd_l2 != 0;
    if (prod) return withl2 ? pass2_rows<true, true>(t, rfac, cfac, r0, r1)
                            : pass2_rows<false, true>(t, rfac, cfac, r0, r1);
    return withl2 ? pass2_rows<true, false>(t, rfac, cfac, r0, r1)
                  : pass2_rows<false, false>(t, rfac, cfac, r0, r1);
  }

  void finish_clip(double sum_u2, Scal& sc) const {
    if (grad_sq) {
      T rms = T(T(std::sqrt(sum_u2)) / T(sc.rms_den));
      T x = T(rms / T(clip));
      sc.clip_div = x < T(1) ? T(1) : x;
    } else {
      double x = double(T(std::sqrt(sum_u2))) / (sc.rms_den * clip);
      sc.clip_f = std::max(1.0, x);
      if (!has_beta1) sc.k_step = T(-sc.alpha / sc.clip_f);
      else if (!of_update) sc.k_avg = T((1 - beta1) * sc.alpha / sc.clip_f);
      else {
        sc.k_avg = T((1 - beta1) / sc.clip_f);
        sc.k_step = T(-sc.alpha);
      }
    }
    sc.b1 = T(beta1);
    sc.one_minus_b1 = T(1 - beta1);
  }

  // theta and exp_avg for one element with U = u; GS: the grad_sq (transformers) layout;
  // MOM: 0 no first moment, 1 of the scaled update, 2 of the update
  // DIV = false: clip_div is 1 (the clipping does not bind), and u / 1 = u exactly
  template <bool GS, int MOM, bool DIV = true>
  static inline T apply(T pi, T u, T* __restrict ea, int64_t j, const Scal& sc) {
    pi = fma(sc.pre_add, pi, pi * sc.pre_mul);
    if (GS) {
      if (DIV) u = u / sc.clip_div;
      if (MOM == 0) {
        pi = pi - u * sc.alpha_t;
      } else if (MOM == 1) {
        T e = fma(sc.one_minus_b1, u * sc.alpha_t, ea[j] * sc.b1);
        ea[j] = e;
        pi = pi - e;
      } else {
        T e = fma(sc.one_minus_b1, u, ea[j] * sc.b1);
        ea[j] = e;
        pi = pi - e * sc.alpha_t;
      }
    } else {
      if (MOM == 0) {
        pi = fma(sc.k_step, u, pi);
      } else if (MOM == 1) {
        T e = fma(sc.k_avg, u, ea[j] * sc.b1);
        ea[j] = e;
        pi = pi - e;
      } else {
        T e = fma(sc.k_avg, u, ea[j] * sc.b1);
        ea[j] = e;
        pi = fma(sc.k_step, e, pi);
      }
    }
    return fma(sc.post_add, pi, pi * sc.post_mul);
  }

  // ---- pass 3: the update
  template <bool GS, bool PRODUCT, int MOM, bool DIV>
  void pass3_rows(const AdafactorTensor<T>& t, const Scal& sc, const T* rfac, const T* cfac,
                  int64_t r0, int64_t r1) const {
    const T e2 = T(eps1 * eps1), sg = sign, l = l2;
    for (int64_t r = r0; r < r1; r++) {
      T* __restrict p = t.p + r * t.m;
      const T* __restrict g = t.g + r * t.m;
      T* __restrict ea = MOM ? t.ea + r * t.m : nullptr;
      int64_t b = r / t.n;
      const T* __restrict cf = cfac + b * t.m;
      const T rv = rfac[r], den = PRODUCT ? T(1) : cfac[t.B * t.m + b];
#pragma omp simd
      for (int64_t j = 0; j < t.m; j++) {
        T pj = p[j];
        T gi = fma(l, pj, sg * g[j]);
        T u = PRODUCT ? (rv * cf[j]) * gi
                      : (T(1) / std::sqrt(std::max((rv * cf[j]) / den, e2))) * gi;
        p[j] = apply<GS, MOM, DIV>(pj, u, ea, j, sc);
      }
    }
  }

  template <bool GS, bool PRODUCT>
  void pass3_mom(const AdafactorTensor<T>& t, const Scal& sc, const T* rfac, const T* cfac,
                 int64_t r0, int64_t r1) const {
    const bool div = !GS || sc.clip_div != T(1);
#define OPTIMLAB_P3(MOM)                                                       \
    (div ? pass3_rows<GS, PRODUCT, MOM, true>(t, sc, rfac, cfac, r0, r1)       \
         : pass3_rows<GS, PRODUCT, MOM, false>(t, sc, rfac, cfac, r0, r1))
    if (!has_beta1) OPTIMLAB_P3(0);
    else if (!of_update) OPTIMLAB_P3(1);
    else OPTIMLAB_P3(2);
#undef OPTIMLAB_P3
  }

  template <bool GS, int MOM>
  void pass3_vec(const AdafactorTensor<T>& t, const Scal& sc, int64_t r0, int64_t r1) const {
    const T e2 = T(eps1 * eps1);
    for (int64_t i = r0; i < r1; i++) {
      T pi = t.p[i];
      T gi = fma(l2, pi, sign * t.g[i]);
      T u = GS ? (T(1) / std::sqrt(t.v[i])) * gi
               : (T(1) / std::sqrt(std::max(t.v[i], e2))) * gi;
      t.p[i] = apply<GS, MOM>(pi, u, t.ea, i, sc);
    }
  }

  void pass3(const AdafactorTensor<T>& t, const Scal& sc, const T* rfac, const T* cfac,
             int64_t r0, int64_t r1) const {
    const int mom = !has_beta1 ? 0 : (!of_update ? 1 : 2);
    if (t.m == 0) {
      if (grad_sq) {
        if (mom == 0) pass3_vec<true, 0>(t, sc, r0, r1);
        else if (mom == 1) pass3_vec<true, 1>(t, sc, r0, r1);
        else pass3_vec<true, 2>(t, sc, r0, r1);
      } else {
        if (mom == 0) pass3_vec<false, 0>(t, sc, r0, r1);
        else if (mom == 1) pass3_vec<false, 1>(t, sc, r0, r1);
        else pass3_vec<false, 2>(t, sc, r0, r1);
      }
      return;
    }
    if (grad_sq) pass3_mom<true, true>(t, sc, rfac, cfac, r0, r1);
    else if (sc.factorized) pass3_mom<false, true>(t, sc, rfac, cfac, r0, r1);
    else pass3_mom<false, false>(t, sc, rfac, cfac, r0, r1);
  }

  // one whole tensor on the calling thread (small tensors)
  void serial(const AdafactorTensor<T>& t, std::vector<double>& rowsum,
              std::vector<double>& colsum, std::vector<double>& wsum, std::vector<T>& rfac,
              std::vector<T>& cfac) const {
    if (t.numel == 0) return;
    int64_t rows = t.m ? t.B * t.n : t.numel;
    rowsum.assign(t.m ? rows : 0, 0.0);
    colsum.assign(t.m ? t.B * t.m : 0, 0.0);
    wsum.assign(t.m ? t.B * t.m : 0, 0.0);
    rfac.assign(t.m ? rows : 0, T(0));
    cfac.assign(t.m ? t.B * (t.m + 1) : 0, T(0));
    double sum_p2 = 0;
    Scal sc;
    scalars(t, sc);
    pass1(t, sc, 0, rows, sum_p2, rowsum.data(), colsum.data(), wsum.data());
    middle(t, sum_p2, rowsum.data(), colsum.data(), rfac.data(), cfac.data(), sc);
    double su = sum_u2(t, sc, cfac.data(), wsum.data());
    if (su < 0) su = pass2(t, sc, rfac.data(), cfac.data(), 0, rows);
    finish_clip(su, sc);
    pass3(t, sc, rfac.data(), cfac.data(), 0, rows);
  }
};

template <typename T>
void adafactor_init(Adafactor<T>& a, const double* hp) {
  a.lr = hp[0]; a.eps1 = hp[1]; a.eps2 = hp[2]; a.clip = hp[3]; a.decay_rate = hp[4];
  a.has_beta1 = !std::isnan(hp[5]); a.beta1 = a.has_beta1 ? hp[5] : 0.0;
  a.wd = hp[6]; a.alpha_decay = std::isnan(hp[7]); a.decay_factor = a.alpha_decay ? 0.0 : hp[7];
  a.wd_l2 = hp[8]; a.after = hp[9] != 0; a.scale = hp[10] != 0; a.relative = hp[11] != 0;
  a.warmup = hp[12] != 0; a.grad_sq = hp[13] != 0; a.of_update = hp[14] != 0;
  a.maximize = hp[15] != 0;
  a.sign = a.maximize ? T(-1) : T(1);
  a.l2 = T(a.wd_l2);
}

// What pass 1 leaves for the rest of a tensor's step.
template <typename T>
struct AdafactorWork {
  std::vector<double> rowsum, colsum, wsum;
  double sum_p2 = 0;
  bool finite = true;                 // with the check: no inf/NaN met in pass 1
  typename Adafactor<T>::Scal sc;
};

// One step of every tensor of a call; tensors may belong to different parameter groups (table
// slot 10, when width > 10; hp holds 16 doubles per group).  check: the whole step is skipped
// when a gradient holds inf or NaN, found without a pass of its own: pass 1 of every tensor
// runs before anything is written, and a non-finite gradient makes its row's sum of squares
// (or, for vectors, the bit test that pass 1 then makes) non-finite; a non-finite sum whose
// gradient turns out finite (g^2 overflowed) is confirmed by a bit test.  Returns 1 when the
// step was skipped, else 0.
template <typename T>
int adafactor_step(int64_t ngroups, const double* hps, int64_t nt, const int64_t* tab,
                   int64_t width, int nthreads, bool check) {
  std::vector<Adafactor<T>> A(ngroups);
  for (int64_t g = 0; g < ngroups; g++) adafactor_init(A[g], hps + 16 * g);
  Table<T> tb{tab, width};
  std::vector<AdafactorTensor<T>> ts(nt);
  std::vector<const Adafactor<T>*> af(nt);
  int64_t total = 0;
  for (int64_t k = 0; k < nt; k++) {
    AdafactorTensor<T>& t = ts[k];
    t.p = tb.template ptr<T>(k, 0);
    t.g = tb.template ptr<T>(k, 1);
    t.ea = tb.template ptr<T>(k, 2);
    t.row = tb.template ptr<T>(k, 3);
    t.col = tb.template ptr<T>(k, 4);
    t.v = tb.template ptr<T>(k, 5);
    t.B = tb.val(k, 6); t.n = tb.val(k, 7); t.m = tb.val(k, 8); t.step = tb.val(k, 9);
    t.numel = t.m ? t.B * t.n * t.m : t.n;
    total += t.numel;
    af[k] = &A[width > 10 ? tb.val(k, 10) : 0];
  }
  const int nth = threads_for(total, nthreads);
  std::vector<AdafactorWork<T>> W(nt);

  // a whole tensor on the calling thread (small tensors)
  auto phase1_one = [&](int64_t k) {
    const AdafactorTensor<T>& t = ts[k];
    AdafactorWork<T>& w = W[k];
    const int64_t rows = t.m ? t.B * t.n : t.numel;
    w.rowsum.assign(t.m ? rows : 0, 0.0);
    w.colsum.assign(t.m ? t.B * t.m : 0, 0.0);
    w.wsum.assign(t.m ? t.B * t.m : 0, 0.0);
    af[k]->scalars(t, w.sc);
    af[k]->pass1(t, w.sc, 0, rows, w.sum_p2, w.rowsum.data(), w.colsum.data(), w.wsum.data());
  };
  auto phase2_one = [&](int64_t k) {
    const AdafactorTensor<T>& t = ts[k];
    AdafactorWork<T>& w = W[k];
    const Adafactor<T>& a = *af[k];
    const int64_t rows = t.m ? t.B * t.n : t.numel;
    std::vector<T> rfac(t.m ? rows : 0), cfac(t.m ? t.B * (t.m + 1) : 0);
    a.middle(t, w.sum_p2, w.rowsum.data(), w.colsum.data(), rfac.data(), cfac.data(), w.sc);
    double su = a.sum_u2(t, w.sc, cfac.data(), w.wsum.data());
    if (su < 0) su = a.pass2(t, w.sc, rfac.data(), cfac.data(), 0, rows);
    a.finish_clip(su, w.sc);
    a.pass3(t, w.sc, rfac.data(), cfac.data(), 0, rows);
    w = AdafactorWork<T>();
  };
  // a tensor split by rows among the threads (larger than a thread's fair share)
  auto phase1_split = [&](int64_t k) {
    const AdafactorTensor<T>& t = ts[k];
    AdafactorWork<T>& w = W[k];
    const int64_t rows = t.m ? t.B * t.n : t.numel;
    const int64_t ncol = t.m ? t.B * t.m : 0;
    std::vector<double> colpart(size_t(nth) * ncol, 0.0), wpart(size_t(nth) * ncol, 0.0),
        part(nth, 0.0);
    w.rowsum.assign(t.m ? rows : 0, 0.0);
    af[k]->scalars(t, w.sc);
#pragma omp parallel num_threads(nth)
    {
      const int tid = thread_id(), cnt = team_size();
      int64_t r0 = rows * tid / cnt, r1 = rows * (tid + 1) / cnt;
      double sp = 0;
      af[k]->pass1(t, w.sc, r0, r1, sp, w.rowsum.data(), colpart.data() + size_t(tid) * ncol,
                   wpart.data() + size_t(tid) * ncol);
      part[tid] = sp;
    }
    w.colsum.assign(ncol, 0.0);
    w.wsum.assign(ncol, 0.0);
    for (int i = 0; i < nth; i++) {
      w.sum_p2 += part[i];
      for (int64_t j = 0; j < ncol; j++) {
        w.colsum[j] += colpart[size_t(i) * ncol + j];
        w.wsum[j] += wpart[size_t(i) * ncol + j];
      }
    }
  };
  auto phase2_split = [&](int64_t k) {
    const AdafactorTensor<T>& t = ts[k];
    AdafactorWork<T>& w = W[k];
    const Adafactor<T>& a = *af[k];
    const int64_t rows = t.m ? t.B * t.n : t.numel;
    std::vector<T> rfac(t.m ? rows : 0), cfac(t.m ? t.B * (t.m + 1) : 0);
    std::vector<double> part(nth, 0.0);
    a.middle(t, w.sum_p2, w.rowsum.data(), w.colsum.data(), rfac.data(), cfac.data(), w.sc);
    const double su = a.sum_u2(t, w.sc, cfac.data(), w.wsum.data());
    if (su >= 0) a.finish_clip(su, w.sc);
#pragma omp parallel num_threads(nth)
    {
      const int tid = thread_id(), cnt = team_size();
      int64_t r0 = rows * tid / cnt, r1 = rows * (tid + 1) / cnt;
      if (su < 0) {                      // vectors, or the clamp can bind: sum U^2 here
        part[tid] = a.pass2(t, w.sc, rfac.data(), cfac.data(), r0, r1);
#pragma omp barrier
#pragma omp single
        {
          double s = 0;
          for (int i = 0; i < cnt; i++) s += part[i];
          a.finish_clip(s, w.sc);
        }
      }
      a.pass3(t, w.sc, rfac.data(), cfac.data(), r0, r1);
    }
    w = AdafactorWork<T>();
  };
  // the finite check of a tensor after its pass 1
  auto check_one = [&](int64_t k) {
    const AdafactorTensor<T>& t = ts[k];
    AdafactorWork<T>& w = W[k];
    bool ok = true;
    if (t.m == 0) {
      ok = false;                        // vectors: pass 1 did not read g
    } else {
      for (double r : w.rowsum) ok &= std::isfinite(r);
    }
    if (!ok) {
      if (sizeof(T) == 4)
        ok = finite_bits<uint32_t, 0x7f800000u>(reinterpret_cast<const uint32_t*>(t.g), t.numel);
      else
        ok = finite_bits<uint64_t, 0x7ff0000000000000ull>(reinterpret_cast<const uint64_t*>(t.g),
                                                          t.numel);
    }
    w.finite = ok;
  };

  // Tensors larger than a thread's fair share (GPT-2's token embedding) are split by rows
  // among the threads, pass by pass; all others are whole-tensor tasks handed out largest
  // first (dynamic: a descheduled thread does not hold the others up).
  std::vector<int64_t> big, tasks;
  for (int64_t k = 0; k < nt; k++)
    if (ts[k].numel > 0)
      (nth > 1 && ts[k].numel >= (1 << 16) && ts[k].numel * 2 * nth > total ? big : tasks)
          .push_back(k);
  std::sort(tasks.begin(), tasks.end(),
            [&](int64_t x, int64_t y) { return ts[x].numel > ts[y].numel; });
  const int64_t ntask = int64_t(tasks.size());
  const bool par = nth > 1 && ntask > 1;
  // on_big for each split tensor in turn, then on_task for the others, handed out dynamically
  auto each = [&](auto&& on_big, auto&& on_task) {
    for (int64_t k : big) on_big(k);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nth) if (par)
    for (int64_t i = 0; i < ntask; i++) on_task(tasks[i]);
  };
  if (!check) {                          // tensor by tensor: pass 3 finds it in cache
    each([&](int64_t k) { phase1_split(k); phase2_split(k); },
         [&](int64_t k) { phase1_one(k); phase2_one(k); });
    return 0;
  }
  each([&](int64_t k) { phase1_split(k); check_one(k); },
       [&](int64_t k) { phase1_one(k); check_one(k); });
  for (int64_t k = 0; k < nt; k++)
    if (!W[k].finite) return 1;
  each(phase2_split, phase2_one);
  return 0;
}

template <typename T>
void adafactor_kernel(int64_t nt, const int64_t* tab, const double* hp, int nthreads) {
  adafactor_step<T>(1, hp, nt, tab, 10, nthreads, false);
}

}  // namespace

extern "C" {

int optimlab_abi_version() { return 1; }

int optimlab_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// tab per tensor: data pointer, numel, dtype (0 float32, 1 bfloat16, 2 float64, 3 float16)
// Returns 1 when no element is inf or NaN, 0 otherwise, -1 for an unknown dtype.
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
      case 0: ok = finite_bits<uint32_t, 0x7f800000u>(static_cast<const uint32_t*>(base) + s, e - s); break;
      case 1: ok = finite_bits<uint16_t, 0x7f80u>(static_cast<const uint16_t*>(base) + s, e - s); break;
      case 2: ok = finite_bits<uint64_t, 0x7ff0000000000000ull>(static_cast<const uint64_t*>(base) + s, e - s); break;
      case 3: ok = finite_bits<uint16_t, 0x7c00u>(static_cast<const uint16_t*>(base) + s, e - s); break;
    }
    if (!ok) {
      flags[size_t(thread_id()) * 16] = 1;
    }
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

// dtype: 0 float32 (state float32), 1 float32 params with bfloat16 state, 2 float64
int optimlab_adam(int dtype, int64_t nt, const int64_t* tab, const double* hp, int nthreads) {
  switch (dtype) {
    case 0: adam_kernel<float, float>(nt, tab, hp, nthreads); return 0;
    case 1: adam_kernel<float, bf16>(nt, tab, hp, nthreads); return 0;
    case 2: adam_kernel<double, double>(nt, tab, hp, nthreads); return 0;
  }
  return -1;
}

#define OPTIMLAB_ENTRY(NAME)                                                                 \
  int optimlab_##NAME(int dtype, int64_t nt, const int64_t* tab, const double* hp,           \
                      int nthreads) {                                                        \
    switch (dtype) {                                                                         \
      case 0: NAME##_kernel<float>(nt, tab, hp, nthreads); return 0;                         \
      case 2: NAME##_kernel<double>(nt, tab, hp, nthreads); return 0;                        \
    }                                                                                        \
    return -1;                                                                               \
  }

OPTIMLAB_ENTRY(sgd)
OPTIMLAB_ENTRY(adagrad)
OPTIMLAB_ENTRY(rmsprop)
OPTIMLAB_ENTRY(radam)
OPTIMLAB_ENTRY(adafactor)

// Adafactor over several parameter groups in one call: tab has 11 slots per tensor (the
// adafactor layout, then the group's index), hp 16 doubles per group in the adafactor order.
// check != 0: skip the whole step if a gradient holds inf or NaN (returns 1; nothing written).
int optimlab_adafactor_groups(int dtype, int64_t ngroups, const double* hp, int64_t nt,
                              const int64_t* tab, int nthreads, int check) {
  switch (dtype) {
    case 0: return adafactor_step<float>(ngroups, hp, nt, tab, 11, nthreads, check != 0);
    case 2: return adafactor_step<double>(ngroups, hp, nt, tab, 11, nthreads, check != 0);
  }
  return -1;
}

}  // extern "C"
