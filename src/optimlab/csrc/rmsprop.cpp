// RMSProp, centered and with momentum: the element-wise statement of `rmsprop_update`
// (rmsprop.py), one pass over memory per step.
#include "optimlab.h"

namespace optimlab {
namespace {

template <typename T, bool CENTERED, bool MOM, bool SMALL>
void rmsprop_range(T* __restrict p, const T* __restrict g, T* __restrict sq, T* __restrict ga,
                   T* __restrict b, int64_t n, const Decay<T> dc, T neg_lr, T alpha, T c, T eps,
                   T mom) {
#pragma omp simd
  for (int64_t i = 0; i < n; i++) {
    T pi = p[i];
    T gi = dc.grad(g[i], pi);
    T vi = fma(c * gi, gi, sq[i] * alpha);                 // v.mul_(alpha).addcmul_(g, g, 1-alpha)
    sq[i] = vi;
    T avg;
    if (CENTERED) {
      T ai = lerp_<SMALL>(ga[i], gi, c);                   // a.lerp_(g, 1 - alpha)
      ga[i] = ai;
      avg = std::sqrt(fma(-ai, ai, vi));                   // sqrt(v - a^2)
    } else {
      avg = std::sqrt(vi);
    }
    avg = avg + eps;
    T q = dc.begin(pi);
    if (MOM) {
      T bi = b[i] * mom + gi / avg;                        // b.mul_(mu).addcdiv_(g, avg)
      b[i] = bi;
      q = fma(neg_lr, bi, q);                              // q.add_(b, alpha=-lr)
    } else {
      q = q + neg_lr * gi / avg;                           // q.addcdiv_(g, avg, -lr)
    }
    p[i] = dc.end(pi, q);
  }
}

template <typename T>
void rmsprop(const RMSPropHyper& hp, const RMSPropTensor* t, int64_t n, int64_t nthreads) {
  const Decay<T> dc(hp.maximize, hp.decay);
  const T neg_lr = T(-hp.lr), alpha = T(hp.alpha), c = T(1 - hp.alpha), eps = T(hp.eps),
          mom = T(hp.momentum);
  const bool small = std::abs(c) < T(0.5);
  with_bool(hp.centered != 0, [&](auto centered) {
    with_bool(hp.momentum > 0, [&](auto momentum) {
      // SMALL only matters for the centered lerp: one instantiation otherwise
      with_bool(small || !decltype(centered)::value, [&](auto sm) {
        for_tensor_chunks(t, n, nthreads, [&](int64_t k, int64_t s, int64_t e) {
          constexpr bool C = decltype(centered)::value, M = decltype(momentum)::value;
          rmsprop_range<T, C, M, decltype(sm)::value>(
              static_cast<T*>(t[k].param) + s, static_cast<const T*>(t[k].grad) + s,
              static_cast<T*>(t[k].square_avg) + s,
              C ? static_cast<T*>(t[k].grad_avg) + s : nullptr,
              M ? static_cast<T*>(t[k].momentum_buffer) + s : nullptr, e - s, dc, neg_lr, alpha,
              c, eps, mom);
        });
      });
    });
  });
}

}  // namespace
}  // namespace optimlab

using namespace optimlab;

extern "C" int optimlab_rmsprop(const RMSPropHyper* hp, const RMSPropTensor* t, int64_t n,
                                const Call* call) {
  int rc = precheck(t, n, call, [&](int64_t k, auto add) {
    add(t[k].square_avg);
    if (hp->centered) add(t[k].grad_avg);
    if (hp->momentum > 0) add(t[k].momentum_buffer);
    return t[k].square_avg != nullptr && (!hp->centered || t[k].grad_avg != nullptr) &&
           (hp->momentum <= 0 || t[k].momentum_buffer != nullptr);
  });
  if (rc != RC_OK) return rc;
  return dispatch<Combo<F32, F32, F32>, Combo<F64, F64, F64>>(call, [&](auto c) {
    rmsprop<typename decltype(c)::param>(*hp, t, n, call->threads);
  });
}
