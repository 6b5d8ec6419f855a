// SGD with momentum, dampening and Nesterov momentum: the element-wise statement of
// `sgd_update` (sgd.py), one pass over memory per step.  Per tensor: whether its momentum
// buffer starts this step (SGDStep.first).
#include "optimlab.h"

namespace optimlab {
namespace {

template <typename T, bool MOM>
void sgd_range(T* __restrict p, const T* __restrict g, T* __restrict b, int64_t n,
               const Decay<T> dc, T neg_lr, T mom, T one_minus_damp, int first, int nesterov) {
  // first, nesterov: int, not bool (GCC does not vectorize a select on a bool)
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    T d = gi;
    if (MOM) {
      T bi = first != 0 ? gi : fma(one_minus_damp, gi, b[i] * mom);  // b.mul_(mu).add_(g, 1-tau)
      b[i] = bi;
      d = nesterov != 0 ? fma(mom, bi, gi) : bi;                 // g.add(b, alpha=mu) or b
    }
    T q = fma(neg_lr, d, dc.begin(pi));                          // q.add_(d, alpha=-lr)
    p[i] = dc.end(pi, q);
  }
}

template <typename T>
void sgd(const SGDHyper& hp, const SGDTensor* t, int64_t n, int64_t nthreads) {
  const Decay<T> dc(hp.maximize, hp.decay);
  const T neg_lr = T(-hp.lr), mom = T(hp.momentum), one_minus_damp = T(1 - hp.dampening);
  const bool momentum = hp.momentum != 0;
  const int nesterov = hp.nesterov != 0;
  for_tensor_chunks(t, n, nthreads, [&](int64_t k, int64_t s, int64_t e) {
    T* p = static_cast<T*>(t[k].param) + s;
    const T* g = static_cast<const T*>(t[k].grad) + s;
    const int first = t[k].first != 0;
    if (momentum)
      sgd_range<T, true>(p, g, static_cast<T*>(t[k].momentum_buffer) + s, e - s, dc, neg_lr,
                         mom, one_minus_damp, first, nesterov);
    else
      sgd_range<T, false>(p, g, nullptr, e - s, dc, neg_lr, mom, one_minus_damp, first,
                          nesterov);
  });
}

}  // namespace
}  // namespace optimlab

using namespace optimlab;

extern "C" int optimlab_sgd(const SGDHyper* hp, const SGDTensor* t, int64_t n,
                            const Call* call) {
  int rc = precheck(t, n, call, [&](int64_t k, auto add) {
    if (hp->momentum == 0) return true;
    add(t[k].momentum_buffer);
    return t[k].momentum_buffer != nullptr;
  });
  if (rc != RC_OK) return rc;
  return dispatch<Combo<F32, F32, F32>, Combo<F64, F64, F64>>(call, [&](auto c) {
    sgd<typename decltype(c)::param>(*hp, t, n, call->threads);
  });
}
