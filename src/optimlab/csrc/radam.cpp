// RAdam: the element-wise statement of `radam_update` (radam.py), one pass over memory per
// step.  Per tensor: the branch, c1, sqrt(c2) and r_t (RAdamStep, from `radam_step`, where
// the rectification is written).
#include "optimlab.h"

namespace optimlab {
namespace {

// BR: 2 the rectified step, 1 the un-adapted step, 0 moments only.  HAT: eps on sqrt(v_hat);
// a compile-time flag, or the loop computes both forms (divisions and square roots bound this
// kernel's speed, not memory).
template <typename T, int BR, bool SMALL, bool HAT>
void radam_range(T* __restrict p, const T* __restrict g, T* __restrict m, T* __restrict v,
                 int64_t n, const Decay<T> dc, T w1, T b2, T c2, T c1, T sqrt_c2, T r, T lr,
                 T eps) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    T mi = lerp_<SMALL>(m[i], gi, w1);                       // m.lerp_(g, 1 - beta1)
    T vi = fma(c2 * gi, gi, v[i] * b2);                      // v.mul_(b2).addcmul_(g, g, 1-b2)
    m[i] = mi;
    v[i] = vi;
    T mh = mi / c1;                                          // m^_t
    T q = dc.begin(pi);
    if (BR == 2) {
      T root = std::sqrt(vi);
      T l = HAT ? T(1) / (root / sqrt_c2 + eps) : (T(1) / (root + eps)) * sqrt_c2;
      q = q - mh * lr * l * r;
    } else if (BR == 1) {
      q = q - mh * lr;
    }
    p[i] = dc.end(pi, q);
  }
}

template <typename T>
void radam(const RAdamHyper& hp, const RAdamTensor* t, int64_t n, int64_t nthreads) {
  const Decay<T> dc(hp.maximize, hp.decay);
  const T lr = T(hp.lr), eps = T(hp.eps), w1 = T(1 - hp.beta1), b2 = T(hp.beta2),
          c2 = T(1 - hp.beta2);
  const bool small = std::abs(w1) < T(0.5), hat = hp.eps_on_v_hat != 0;
  with_bool(small, [&](auto sm) {
    for_tensor_chunks(t, n, nthreads, [&](int64_t k, int64_t s, int64_t e) {
      constexpr bool SM = decltype(sm)::value;
      T* p = static_cast<T*>(t[k].param) + s;
      const T* g = static_cast<const T*>(t[k].grad) + s;
      T* m = static_cast<T*>(t[k].exp_avg) + s;
      T* v = static_cast<T*>(t[k].exp_avg_sq) + s;
      const T c1 = T(t[k].c1), sqrt_c2 = T(t[k].sqrt_c2), r = T(t[k].r_t);
      const int64_t len = e - s;
#define OPTIMLAB_RADAM(BR, H) \
      radam_range<T, BR, SM, H>(p, g, m, v, len, dc, w1, b2, c2, c1, sqrt_c2, r, lr, eps)
      if (t[k].branch == 2) {
        if (hat) OPTIMLAB_RADAM(2, true);
        else OPTIMLAB_RADAM(2, false);
      } else if (t[k].branch == 1) {
        OPTIMLAB_RADAM(1, false);
      } else {
        OPTIMLAB_RADAM(0, false);
      }
#undef OPTIMLAB_RADAM
    });
  });
}

}  // namespace
}  // namespace optimlab

using namespace optimlab;

extern "C" int optimlab_radam(const RAdamHyper* hp, const RAdamTensor* t, int64_t n,
                              const Call* call) {
  int rc = precheck(t, n, call, [&](int64_t k, auto add) {
    add(t[k].exp_avg);
    add(t[k].exp_avg_sq);
    return t[k].exp_avg != nullptr && t[k].exp_avg_sq != nullptr &&
           t[k].branch >= 0 && t[k].branch <= 2;
  });
  if (rc != RC_OK) return rc;
  return dispatch<Combo<F32, F32, F32>, Combo<F64, F64, F64>>(call, [&](auto c) {
    radam<typename decltype(c)::param>(*hp, t, n, call->threads);
  });
}
