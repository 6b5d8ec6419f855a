// Adam, AdamW and AMSGrad: the element-wise statement of `adam_update` (adam.py), one pass over
// memory per step (read theta, g, m, v; write theta, m, v).  The step's scalars come per tensor
// (AdamStep: alpha_t and sqrt(c2), from `adam_step`, where the bias correction is written).
#include "optimlab.h"

namespace optimlab {
namespace {

// AMS: the running maximum of v; SMALL: 1 - beta1 < 0.5 (torch's lerp formula); HAT: eps on
// sqrt(v_hat) (else on sqrt(v), and the division by sqrt_c2 = 1 is left out)
template <typename T, typename S, bool AMS, bool SMALL, bool HAT>
void adam_range(T* __restrict p, const T* __restrict g, S* __restrict m, S* __restrict v,
                S* __restrict vm, int64_t n, const Decay<T> dc, T w1, T b2, T c2, T sqrt_c2,
                T eps, T neg_alpha) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    T mi = lerp_<SMALL>(Mem<S, T>::ld(m, i), gi, w1);            // m.lerp_(g, 1 - beta1)
    T vi = fma(c2 * gi, gi, Mem<S, T>::ld(v, i) * b2);           // v.mul_(b2).addcmul_(g, g, 1-b2)
    Mem<S, T>::st(m, i, mi);
    Mem<S, T>::st(v, i, vi);
    if (AMS) {
      vi = nan_max(Mem<S, T>::ld(vm, i), vi);                    // v^max_t
      Mem<S, T>::st(vm, i, vi);
    }
    T d = HAT ? std::sqrt(vi) / sqrt_c2 + eps : std::sqrt(vi) + eps;
    T q = dc.begin(pi);
    q = q + neg_alpha * mi / d;                                  // q.addcdiv_(m, d, -alpha_t)
    p[i] = dc.end(pi, q);
  }
}

template <typename T, typename S>
void adam(const AdamHyper& hp, const AdamTensor* t, int64_t n, int64_t nthreads) {
  const Decay<T> dc(hp.maximize, hp.decay);
  const T eps = T(hp.eps), w1 = T(1 - hp.beta1), b2 = T(hp.beta2), c2 = T(1 - hp.beta2);
  const bool small = std::abs(w1) < T(0.5);
  with_bool(small, [&](auto sm) {
    with_bool(hp.eps_on_v_hat != 0, [&](auto hat) {
      for_tensor_chunks(t, n, nthreads, [&](int64_t k, int64_t s, int64_t e) {
        constexpr bool SM = decltype(sm)::value, HAT = decltype(hat)::value;
        T* p = static_cast<T*>(t[k].param) + s;
        const T* g = static_cast<const T*>(t[k].grad) + s;
        S* m = static_cast<S*>(t[k].exp_avg) + s;
        S* v = static_cast<S*>(t[k].exp_avg_sq) + s;
        const T sqrt_c2 = T(t[k].sqrt_c2), neg_alpha = T(-t[k].alpha_t);
        if (hp.amsgrad && t[k].max_exp_avg_sq != nullptr)
          adam_range<T, S, true, SM, HAT>(p, g, m, v, static_cast<S*>(t[k].max_exp_avg_sq) + s,
                                          e - s, dc, w1, b2, c2, sqrt_c2, eps, neg_alpha);
        else
          adam_range<T, S, false, SM, HAT>(p, g, m, v, nullptr, e - s, dc, w1, b2, c2, sqrt_c2,
                                           eps, neg_alpha);
      });
    });
  });
}

}  // namespace
}  // namespace optimlab

using namespace optimlab;

extern "C" int optimlab_adam(const AdamHyper* hp, const AdamTensor* t, int64_t n,
                             const Call* call) {
  int rc = precheck(t, n, call, [&](int64_t k, auto add) {
    add(t[k].exp_avg);
    add(t[k].exp_avg_sq);
    if (hp->amsgrad) add(t[k].max_exp_avg_sq);
    return t[k].exp_avg != nullptr && t[k].exp_avg_sq != nullptr;
  });
  if (rc != RC_OK) return rc;
  return dispatch<Combo<F32, F32, F32>, Combo<F32, F32, BF16>, Combo<F64, F64, F64>>(
      call, [&](auto c) {
        typedef decltype(c) C;
        adam<typename C::param, typename C::state>(*hp, t, n, call->threads);
      });
}
