// AdaGrad: the element-wise statement of `adagrad_update` (adagrad.py), one pass over memory
// per step.  Per tensor: the step size eta_t (AdaGradStep, from `adagrad_step`).
#include "optimlab.h"

namespace optimlab {
namespace {

template <typename T>
void adagrad_range(T* __restrict p, const T* __restrict g, T* __restrict sum, int64_t n,
                   const Decay<T> dc, T neg_eta, T eps) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    T si = fma(gi, gi, sum[i]);                                // sum.addcmul_(g, g)
    sum[i] = si;
    T q = dc.begin(pi);
    q = q + neg_eta * gi / (std::sqrt(si) + eps);              // q.addcdiv_(g, std, -eta_t)
    p[i] = dc.end(pi, q);
  }
}

template <typename T>
void adagrad(const AdaGradHyper& hp, const AdaGradTensor* t, int64_t n, int64_t nthreads) {
  const Decay<T> dc(hp.maximize, hp.decay);
  const T eps = T(hp.eps);
  for_tensor_chunks(t, n, nthreads, [&](int64_t k, int64_t s, int64_t e) {
    adagrad_range<T>(static_cast<T*>(t[k].param) + s, static_cast<const T*>(t[k].grad) + s,
                     static_cast<T*>(t[k].sum) + s, e - s, dc, T(-t[k].eta_t), eps);
  });
}

}  // namespace
}  // namespace optimlab

using namespace optimlab;

extern "C" int optimlab_adagrad(const AdaGradHyper* hp, const AdaGradTensor* t, int64_t n,
                                const Call* call) {
  int rc = precheck(t, n, call, [&](int64_t k, auto add) {
    add(t[k].sum);
    return t[k].sum != nullptr;
  });
  if (rc != RC_OK) return rc;
  return dispatch<Combo<F32, F32, F32>, Combo<F64, F64, F64>>(call, [&](auto c) {
    adagrad<typename decltype(c)::param>(*hp, t, n, call->threads);
  });
}
