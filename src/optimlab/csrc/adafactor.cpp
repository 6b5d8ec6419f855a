// Adafactor: the statement of `adafactor_update` (adafactor.py) as two passes over memory per
// factored tensor.  Per tensor (AdafactorTensor): its geometry (`batches` matrices of
// rows x cols, row-major; cols = 0 for an unfactored tensor of `rows` elements), its group's
// index into the hyper-parameter array, rho_t and t^c (the decay weight: beta2_t = 1 - t^c),
// both from `adafactor_step`.
#include "optimlab.h"

namespace optimlab {
namespace {

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
struct AfTensor {
  T* p;
  const T* g;
  T* ea;
  T* row;
  T* col;
  T* v;
  int64_t B, n, m, numel;
  double rho, weight;      // rho_t, and t^c (beta2_t = 1 - t^c)
};

// g <- sign g (+ l2 theta): a select, so that fma(0, inf, g) is computed and dropped.  Each loop
// takes a local copy: read through `this`, its fields could alias the arrays the loop writes,
// and GCC would run the scalar version of the loop.
template <typename T>
struct Grad {
  T sign, l2;
  int has_l2;              // int, not bool: GCC does not vectorize a select on a bool
  inline T operator()(T g, T p) const {
    T sg = sign * g, with = fma(l2, p, sg);
    return has_l2 != 0 ? with : sg;
  }
};

template <typename T>
struct Adafactor {
  // hyper-parameters (AdafactorHyper) and what they make of the decay
  double eps1, eps2, clip, beta1, lam, factor;
  bool after, add_form, fold_form, scale, grad_sq, of_update, has_beta1, by_alpha;
  int has_l2;
  T sign, l2;              // g <- sign g (+ l2 theta)

  Grad<T> gradient() const { return {sign, l2, has_l2}; }

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
    T pre_mul, pre_add, post_mul, post_add;   // theta*mul or fma(add, theta, theta)
    int pre_is_add, post_is_add;              // ... before/after the step (int: see has_l2)
    T fold_coef, fold_k;                      // folded: theta + fma(-c, theta, k delta)
    T fold;                                   // 1 or 0
    bool factorized;       // U = (r_i c_j) G  (always with grad_sq; clamp where it cannot bind)
  };

  // ---- the new row statistic R_i from the row's sum of squares (pass 1 and middle agree)
  inline T row_stat(T old, double rsum, int64_t m, const Scal& sc, bool wsmall) const {
    T x = T(rsum / double(m));
    return grad_sq ? fma(sc.one_minus_beta2, x, old * sc.beta2) : lerp(old, x, sc.weight, wsmall);
  }

  // ---- the step's decay scalars (before pass 1: the row statistics need them)
  void scalars(const AfTensor<T>& t, Scal& sc) const {
    sc.beta2 = sc.one_minus_beta2 = sc.weight = T(0);
    if (grad_sq) {
      double b2 = 1.0 - t.weight;
      sc.beta2 = T(b2);
      sc.one_minus_beta2 = T(1.0 - b2);
    } else {
      sc.weight = T(t.weight);
    }
  }

  // ---- pass 1: sum of theta^2, row/column sums of the squared gradient and w_j
  // The column sums and w_j are summed in T over blocks of up to 16 rows, each block's sums
  // then added into double: a vector add per element instead of two conversions and two
  // double adds (pass 1 reads p and g from memory; the sums must not slow it down).
  template <bool READP, bool L2>
  void pass1_rows(const AfTensor<T>& t, const Scal& sc, int64_t r0, int64_t r1,
                  double& sum_p2, double* rowsum, double* colacc, double* wacc) const {
    constexpr int64_t BLOCK = 16;
    const T sg = sign, l = l2;           // locals (see Grad); the L2 term at compile time: a
    const T e1 = grad_sq ? T(eps1) : T(0);   // runtime select keeps this reduction scalar
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
        T gi = L2 ? fma(l, pj, sg * g[j]) : sg * g[j];
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
        T gi = L2 ? fma(l, pj, sg * g[j]) : sg * g[j];
        wb[j] += (gi * gi) * inv;
      }
    }
    flush();
  }

  void pass1(const AfTensor<T>& t, const Scal& sc, int64_t r0, int64_t r1,
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
    if (has_l2) pass1_rows<true, true>(t, sc, r0, r1, sum_p2, rowsum, colacc, wacc);
    else if (scale) pass1_rows<true, false>(t, sc, r0, r1, sum_p2, rowsum, colacc, wacc);
    else pass1_rows<false, false>(t, sc, r0, r1, sum_p2, rowsum, colacc, wacc);
    if (!scale) sum_p2 = 0;
  }

  // sum of U^2 of a factored tensor from pass 1's w (after middle), or -1 where the clamp at
  // eps1^2 can bind and pass 2 must sum U^2 element by element
  double sum_u2(const AfTensor<T>& t, const Scal& sc, const T* cfac,
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
  void middle(const AfTensor<T>& t, double sum_p2, const double* rowsum,
              const double* colsum, T* rfac, T* cfac, Scal& sc) const {
    const double r = t.rho;
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
    // the shrink theta - c theta with c = f lambda, or alpha_t lambda (decay_scale "alpha"),
    // rounded as its form says: theta * (1 - c), fma(-c, theta, theta), or folded into the
    // step, theta + fma(-c, theta, k delta) with k = 1 (1 - c after the step)
    T mul = T(1), add = T(0);
    sc.fold = lam != 0 && fold_form ? T(1) : T(0);
    sc.fold_coef = T(0);
    sc.fold_k = T(1);
    if (lam != 0) {
      const double c = by_alpha ? lam * sc.alpha : factor * lam;
      if (fold_form) {
        sc.fold_coef = T(-c);
        sc.fold_k = after ? T(1 - c) : T(1);
      } else if (add_form) {
        add = T(-c);
      } else {
        mul = T(1 - c);
      }
    }
    // (folded, the step starts from q = theta * 0: see Decay in optimlab.h)
    sc.pre_mul = sc.fold != T(0) ? T(0) : after ? T(1) : mul;
    sc.pre_add = after ? T(0) : add;
    sc.post_mul = after ? mul : T(1);
    sc.post_add = after ? add : T(0);
    sc.pre_is_add = lam != 0 && add_form && !after;
    sc.post_is_add = lam != 0 && add_form && after;
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
  double pass2_rows(const AfTensor<T>& t, const T* rfac, const T* cfac, int64_t r0,
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

  double pass2(const AfTensor<T>& t, const Scal& sc, const T* rfac, const T* cfac,
               int64_t r0, int64_t r1) const {
    const Grad<T> grad = gradient();
    if (t.m == 0) {                      // small vectors: plain loop
      double acc = 0;
      const T e2 = T(eps1 * eps1);
      const bool wsmall = std::abs(sc.weight) < T(0.5);
      for (int64_t i = r0; i < r1; i++) {
        T gi = grad(t.g[i], t.p[i]);
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
    const bool prod = sc.factorized, withl2 = has_l2;
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
  static inline T apply(T p0, T u, T* __restrict ea, int64_t j, const Scal& sc) {
    // pi: where the step goes (decay.begin in _common.py)
    T pa = fma(sc.pre_add, p0, p0), pm = p0 * sc.pre_mul;
    T pi = sc.pre_is_add != 0 ? pa : pm;
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
    T qa = fma(sc.post_add, pi, pi), qm = pi * sc.post_mul, qb = sc.post_is_add != 0 ? qa : qm;
    T f = p0 + fma(sc.fold_coef, p0, sc.fold_k * pi);
    return sc.fold != T(0) ? f : qb;
  }

  // ---- pass 3: the update
  template <bool GS, bool PRODUCT, int MOM, bool DIV>
  void pass3_rows(const AfTensor<T>& t, const Scal& scal, const T* rfac, const T* cfac,
                  int64_t r0, int64_t r1) const {
    const Grad<T> grad = gradient();
    const Scal sc = scal;                // local copies (see Grad)
    const T e2 = T(eps1 * eps1);
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
        T gi = grad(g[j], pj);
        T u = PRODUCT ? (rv * cf[j]) * gi
                      : (T(1) / std::sqrt(std::max((rv * cf[j]) / den, e2))) * gi;
        p[j] = apply<GS, MOM, DIV>(pj, u, ea, j, sc);
      }
    }
  }

  template <bool GS, bool PRODUCT>
  void pass3_mom(const AfTensor<T>& t, const Scal& sc, const T* rfac, const T* cfac,
                 int64_t r0, int64_t r1) const {
    const bool div = !GS || sc.clip_div != T(1);
#define OPTIMLAB_P3(MOM)                                                          \
    (div ? pass3_rows<GS, PRODUCT, MOM, true>(t, sc, rfac, cfac, r0, r1)       \
         : pass3_rows<GS, PRODUCT, MOM, false>(t, sc, rfac, cfac, r0, r1))
    if (!has_beta1) OPTIMLAB_P3(0);
    else if (!of_update) OPTIMLAB_P3(1);
    else OPTIMLAB_P3(2);
#undef OPTIMLAB_P3
  }

  template <bool GS, int MOM>
  void pass3_vec(const AfTensor<T>& t, const Scal& scal, int64_t r0, int64_t r1) const {
    const Grad<T> grad = gradient();
    const Scal sc = scal;                // local copies (see Grad)
    const T e2 = T(eps1 * eps1);
    for (int64_t i = r0; i < r1; i++) {
      T pi = t.p[i];
      T gi = grad(t.g[i], pi);
      T u = GS ? (T(1) / std::sqrt(t.v[i])) * gi
               : (T(1) / std::sqrt(std::max(t.v[i], e2))) * gi;
      t.p[i] = apply<GS, MOM>(pi, u, t.ea, i, sc);
    }
  }

  void pass3(const AfTensor<T>& t, const Scal& sc, const T* rfac, const T* cfac,
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
};

template <typename T>
void adafactor_init(Adafactor<T>& a, const AdafactorHyper& hp) {
  a.eps1 = hp.eps1; a.eps2 = hp.eps2; a.clip = hp.clip_threshold;
  a.has_beta1 = hp.momentum != 0; a.beta1 = a.has_beta1 ? hp.beta1 : 0.0;
  a.of_update = hp.momentum == 2;
  a.scale = hp.scale_parameter != 0; a.grad_sq = hp.grad_sq != 0;
  a.lam = hp.decay.lam; a.factor = hp.decay.factor; a.after = hp.decay.after != 0;
  a.add_form = hp.decay.form == 1; a.fold_form = hp.decay.form == 2;
  a.by_alpha = hp.decay_by_alpha != 0;
  a.has_l2 = hp.decay.l2 != 0;
  a.sign = hp.maximize ? T(-1) : T(1);
  a.l2 = T(hp.decay.l2);
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
int adafactor_step(const AdafactorHyper* hps, int64_t ngroups, const AdafactorTensor* tab,
                   int64_t nt, int64_t nthreads, bool check) {
  std::vector<Adafactor<T>> A(ngroups);
  for (int64_t g = 0; g < ngroups; g++) adafactor_init(A[g], hps[g]);
  std::vector<AfTensor<T>> ts(nt);
  std::vector<const Adafactor<T>*> af(nt);
  int64_t total = 0;
  for (int64_t k = 0; k < nt; k++) {
    AfTensor<T>& t = ts[k];
    const AdafactorTensor& x = tab[k];
    t.p = static_cast<T*>(x.param);
    t.g = static_cast<const T*>(x.grad);
    t.ea = static_cast<T*>(x.exp_avg);
    t.row = static_cast<T*>(x.exp_avg_sq_row);
    t.col = static_cast<T*>(x.exp_avg_sq_col);
    t.v = static_cast<T*>(x.exp_avg_sq);
    t.B = x.batches; t.n = x.rows; t.m = x.cols; t.numel = x.numel;
    t.rho = x.rho; t.weight = x.decay_weight;
    total += t.numel;
    af[k] = &A[x.group];
  }
  const int nth = threads_for(total, nthreads);
  std::vector<AdafactorWork<T>> W(nt);

  // a whole tensor on the calling thread (small tensors)
  auto phase1_one = [&](int64_t k) {
    const AfTensor<T>& t = ts[k];
    AdafactorWork<T>& w = W[k];
    const int64_t rows = t.m ? t.B * t.n : t.numel;
    w.rowsum.assign(t.m ? rows : 0, 0.0);
    w.colsum.assign(t.m ? t.B * t.m : 0, 0.0);
    w.wsum.assign(t.m ? t.B * t.m : 0, 0.0);
    af[k]->scalars(t, w.sc);
    af[k]->pass1(t, w.sc, 0, rows, w.sum_p2, w.rowsum.data(), w.colsum.data(), w.wsum.data());
  };
  auto phase2_one = [&](int64_t k) {
    const AfTensor<T>& t = ts[k];
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
    const AfTensor<T>& t = ts[k];
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
    const AfTensor<T>& t = ts[k];
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
    const AfTensor<T>& t = ts[k];
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

}  // namespace
}  // namespace optimlab

using namespace optimlab;

// Every tensor of the call (of `call->groups` parameter groups: hp points to that many
// structs).  call->check_finite: skip the whole step when a gradient holds inf or NaN
// (returns RC_SKIPPED, nothing written).
extern "C" int optimlab_adafactor(const AdafactorHyper* hp, const AdafactorTensor* t,
                                  int64_t n, const Call* call) {
  if (n < 0 || call->groups < 1) return RC_ARGS;
  const int64_t ps = dtype_size(call->param_dtype), gs = dtype_size(call->grad_dtype),
                ss = dtype_size(call->state_dtype);
  Ranges r;
  for (int64_t k = 0; k < n; k++) {
    const AdafactorTensor& x = t[k];
    const bool factored = x.cols != 0;
    if (x.param == nullptr || x.grad == nullptr || x.group < 0 || x.group >= call->groups ||
        x.numel < 0 || x.batches < 0 || x.rows < 0 || x.cols < 0 ||
        (factored ? (x.numel != x.batches * x.rows * x.cols || x.exp_avg_sq_row == nullptr ||
                     x.exp_avg_sq_col == nullptr)
                  : (x.numel != x.rows || x.batches != 1 || x.exp_avg_sq == nullptr)) ||
        (hp[x.group].momentum != 0 && x.exp_avg == nullptr))
      return RC_ARGS;
    r.add(x.param, x.numel * ps, true);
    r.add(x.grad, x.numel * gs, false);
    r.add(x.exp_avg, x.numel * ss, true);
    r.add(x.exp_avg_sq_row, x.batches * x.rows * ss, true);
    r.add(x.exp_avg_sq_col, x.batches * x.cols * ss, true);
    r.add(x.exp_avg_sq, x.numel * ss, true);
  }
  if (!r.disjoint()) return RC_OVERLAP;
  int skipped = 0;
  int rc = dispatch<Combo<F32, F32, F32>, Combo<F64, F64, F64>>(call, [&](auto c) {
    skipped = adafactor_step<typename decltype(c)::param>(hp, call->groups, t, n, call->threads,
                                                          call->check_finite != 0);
  });
  return rc != RC_OK ? rc : (skipped ? RC_SKIPPED : RC_OK);
}
