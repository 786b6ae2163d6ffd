/* deadneuron: one-pass per-channel activation statistics on the CPU.
 *
 * Built on first use by deadneuron/_native.py with the system C compiler and loaded with ctypes;
 * where that fails the audit uses torch kernels instead. The statistics are those of
 * `deadneuron.stats.fused_moments`, which is the reference every test compares this file with.
 *
 * Input: an activation `a` and the tensor `f` its flat region is tested on (`f` may be NULL: then
 * `a` itself), both viewed as (outer, C, inner) with element strides (so, sc, si).
 * Output, added in place to `acc`, seven rows of C doubles:
 *   zero (|a| <= eps), flat (f <= lo or f >= hi), nonfinite (NaN or Inf in a),
 *   sum and sum of squares of the finite elements of a, min and max of the finite elements of a;
 * and to `counts`: counts[0] += elements, counts[1] += elements if the flat region was counted
 * (pass lo = hi = NaN to count none: every comparison with NaN is false).
 *
 * Partial sums are kept in the input's precision over at most FLUSH elements, then added to the
 * double accumulators, so float32 counts stay exact (FLUSH < 2**24) and sums lose little. A stretch
 * is summed finite-only first; if its sum or sum of squares comes out non-finite (a NaN or Inf in
 * it, or an overflow) it is summed again with the checks, in double.
 * Compiled with -fno-trapping-math so that the selects below vectorise; nothing here relies on
 * floating-point exceptions. Never compile this with -ffast-math: the finiteness tests would go.
 * Compiled with -fopenmp, a batch is split by channel ranges over `threads` threads of the OpenMP
 * runtime torch has loaded (deadneuron/_native.py checks that there is only that one); each thread
 * reduces whole channels, in the same order as one thread would, so the result does not change.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define FLUSH 4096 /* elements per partial sum in the row kernel, rows per flush in the column kernel */
#define BLOCK 64   /* columns per block in the column kernel: 7 partial arrays stay in L1 */
#define LONG_ROW 256 /* rows at least this long (inner contiguous) are reduced one by one */

/* One element: v from a, w from f; updates the seven partial accumulators named in the macro. */
#define ELEMENT(T, TMAX, v, w, z, fl, nf, s, q, l, h)          \
    do {                                                     \
        T av_ = v < 0 ? -v : v;                              \
        T cv_ = av_ <= TMAX ? v : (T)0;                      \
        z += av_ <= eps ? (T)1 : (T)0;                       \
        fl += ((w <= lo) | (w >= hi)) ? (T)1 : (T)0;         \
        nf += av_ <= TMAX ? (T)0 : (T)1;                     \
        s += (double)cv_;                                    \
        q += (double)cv_ * (double)cv_;                      \
        T m1_ = av_ <= TMAX ? v : (T)INFINITY;               \
        T m2_ = av_ <= TMAX ? v : -(T)INFINITY;              \
        l = m1_ < l ? m1_ : l;                               \
        h = m2_ > h ? m2_ : h;                               \
    } while (0)

/* The same for a stretch known to hold only finite values: no finiteness tests. A stretch is run
 * this way first; if its sum or sum of squares comes out non-finite (a NaN or Inf was in it, or a
 * square overflowed) it is run again with ELEMENT. */
#define ELEMENT_FINITE(T, v, w, z, fl, s, q, l, h)         \
    do {                                                   \
        T av_ = v < 0 ? -v : v;                            \
        z += av_ <= eps ? (T)1 : (T)0;                     \
        fl += ((w <= lo) | (w >= hi)) ? (T)1 : (T)0;       \
        s += v;                                            \
        q += v * v;                                        \
        l = v < l ? v : l;                                 \
        h = v > h ? v : h;                                 \
    } while (0)

#define DEFINE_KERNELS(T, TMAX, SUFFIX)                                                               \
    /* Rows: each (o, c) row of `inner` contiguous elements is reduced on its own. */                 \
    static void rows_##SUFFIX(const T *restrict a, const T *restrict f, int64_t outer, int64_t C,     \
                              int64_t inner, int64_t so, int64_t sc, int64_t c0, int64_t c1,          \
                              T eps, T lo, T hi, double *restrict acc) {                              \
        double *zero = acc, *flat = acc + C, *nonf = acc + 2 * C, *sum = acc + 3 * C;                 \
        double *sq = acc + 4 * C, *mn = acc + 5 * C, *mx = acc + 6 * C;                               \
        for (int64_t o = 0; o < outer; ++o) {                                                         \
            for (int64_t c = c0; c < c1; ++c) {                                                       \
                const T *restrict pa = a + o * so + c * sc;                                           \
                const T *restrict pf = f + o * so + c * sc;                                           \
                T l = (T)INFINITY, h = -(T)INFINITY;                                                  \
                for (int64_t i0 = 0; i0 < inner; i0 += FLUSH) {                                       \
                    int64_t n = inner - i0 < FLUSH ? inner - i0 : FLUSH;                              \
                    const T *restrict xa = pa + i0, *restrict xf = pf + i0;                           \
                    T z = 0, fl = 0, nf = 0, s = 0, q = 0, cl = l, ch = h;                            \
                    _Pragma("omp simd reduction(+ : z, fl, s, q) reduction(min : cl) reduction(max : ch)") \
                    for (int64_t i = 0; i < n; ++i) {                                                 \
                        T v = xa[i], w = xf[i];                                                       \
                        ELEMENT_FINITE(T, v, w, z, fl, s, q, cl, ch);                                 \
                    }                                                                                 \
                    double ds = s, dq = q;                                                            \
                    if (!(s - s == 0 && q - q == 0)) { /* again, with the checks, summing in double */ \
                        z = fl = 0;                                                                   \
                        ds = dq = 0;                                                                  \
                        cl = l;                                                                       \
                        ch = h;                                                                       \
                        _Pragma("omp simd reduction(+ : z, fl, nf, ds, dq) reduction(min : cl) reduction(max : ch)") \
                        for (int64_t i = 0; i < n; ++i) {                                             \
                            T v = xa[i], w = xf[i];                                                   \
                            ELEMENT(T, TMAX, v, w, z, fl, nf, ds, dq, cl, ch);                        \
                        }                                                                             \
                    }                                                                                 \
                    l = cl;                                                                           \
                    h = ch;                                                                           \
                    zero[c] += z; flat[c] += fl; nonf[c] += nf; sum[c] += ds; sq[c] += dq;            \
                }                                                                                     \
                mn[c] = l < mn[c] ? l : mn[c];                                                        \
                mx[c] = h > mx[c] ? h : mx[c];                                                        \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Columns: rows (o, i) at a + o*so + i*si, of which columns [k_begin, k_end) are read; column k  \
     * belongs to channel k / group. Blocks of BLOCK columns keep their partials in L1, over          \
     * stretches of FLUSH rows (run finite-only first, again with the checks if that overflowed). */  \
    static void cols_##SUFFIX(const T *restrict a, const T *restrict f, int64_t outer, int64_t inner, \
                              int64_t so, int64_t si, int64_t k_begin, int64_t k_end, int64_t group,  \
                              T eps, T lo, T hi, int64_t C, double *restrict acc) {                   \
        double *zero = acc, *flat = acc + C, *nonf = acc + 2 * C, *sum = acc + 3 * C;                 \
        double *sq = acc + 4 * C, *mn = acc + 5 * C, *mx = acc + 6 * C;                               \
        const int64_t total = outer * inner;                                                          \
        for (int64_t k0 = k_begin; k0 < k_end; k0 += BLOCK) {                                         \
            const int64_t nk = k_end - k0 < BLOCK ? k_end - k0 : BLOCK;                               \
            const int single = k0 / group == (k0 + nk - 1) / group;                                   \
            T z[BLOCK], fl[BLOCK], nf[BLOCK], s[BLOCK], q[BLOCK], l[BLOCK], h[BLOCK];                 \
            double ds[BLOCK], dq[BLOCK]; /* the sums as flushed (the careful pass sums in double) */  \
            T bl[BLOCK], bh[BLOCK];                                                                   \
            for (int64_t k = 0; k < BLOCK; ++k) {                                                     \
                bl[k] = (T)INFINITY;                                                                  \
                bh[k] = -(T)INFINITY;                                                                 \
            }                                                                                         \
            for (int64_t r0 = 0; r0 < total; r0 += FLUSH) {                                           \
                const int64_t r1 = total - r0 < FLUSH ? total : r0 + FLUSH;                           \
                for (int pass = 0; pass < 2; ++pass) {                                                \
                    for (int64_t k = 0; k < BLOCK; ++k) {                                             \
                        z[k] = fl[k] = nf[k] = s[k] = q[k] = 0;                                       \
                        ds[k] = dq[k] = 0;                                                            \
                        l[k] = bl[k];                                                                 \
                        h[k] = bh[k];                                                                 \
                    }                                                                                 \
                    int64_t o = r0 / inner, i = r0 % inner;                                           \
                    for (int64_t r = r0; r < r1; ++r) {                                               \
                        const T *restrict pa = a + o * so + i * si + k0;                              \
                        const T *restrict pf = f + o * so + i * si + k0;                              \
                        if (pass == 0) {                                                              \
                            _Pragma("omp simd")                                                       \
                            for (int64_t k = 0; k < nk; ++k) {                                        \
                                T v = pa[k], w = pf[k];                                               \
                                ELEMENT_FINITE(T, v, w, z[k], fl[k], s[k], q[k], l[k], h[k]);         \
                            }                                                                         \
                        } else {                                                                      \
                            _Pragma("omp simd")                                                       \
                            for (int64_t k = 0; k < nk; ++k) {                                        \
                                T v = pa[k], w = pf[k];                                               \
                                ELEMENT(T, TMAX, v, w, z[k], fl[k], nf[k], ds[k], dq[k], l[k], h[k]); \
                            }                                                                         \
                        }                                                                             \
                        if (++i == inner) {                                                           \
                            i = 0;                                                                    \
                            ++o;                                                                      \
                        }                                                                             \
                    }                                                                                 \
                    int finite = 1;                                                                   \
                    for (int64_t k = 0; k < nk; ++k) finite &= (s[k] - s[k] == 0) & (q[k] - q[k] == 0); \
                    if (pass == 1) break;                                                             \
                    if (finite) {                                                                     \
                        for (int64_t k = 0; k < nk; ++k) {                                            \
                            ds[k] = s[k];                                                             \
                            dq[k] = q[k];                                                             \
                        }                                                                             \
                        break;                                                                        \
                    }                                                                                 \
                }                                                                                     \
                if (single) { /* the whole block is one channel: reduce it with vector sums */        \
                    T tz = 0, tfl = 0, tnf = 0;                                                       \
                    double ts = 0, tq = 0;                                                            \
                    _Pragma("omp simd reduction(+ : tz, tfl, tnf, ts, tq)")                           \
                    for (int64_t k = 0; k < nk; ++k) {                                                \
                        tz += z[k]; tfl += fl[k]; tnf += nf[k]; ts += ds[k]; tq += dq[k];             \
                    }                                                                                 \
                    const int64_t c = k0 / group;                                                     \
                    zero[c] += tz; flat[c] += tfl; nonf[c] += tnf; sum[c] += ts; sq[c] += tq;         \
                } else {                                                                              \
                    for (int64_t k = 0, j = k0 % group, c = k0 / group; k < nk; ++k) {                \
                        if (k > 0 && ++j == group) { j = 0; ++c; }                                    \
                        zero[c] += z[k]; flat[c] += fl[k]; nonf[c] += nf[k]; sum[c] += ds[k]; sq[c] += dq[k]; \
                    }                                                                                 \
                }                                                                                     \
                for (int64_t k = 0; k < nk; ++k) {                                                    \
                    bl[k] = l[k];                                                                     \
                    bh[k] = h[k];                                                                     \
                }                                                                                     \
            }                                                                                         \
            if (single) {                                                                             \
                T tl = (T)INFINITY, th = -(T)INFINITY;                                                \
                _Pragma("omp simd reduction(min : tl) reduction(max : th)")                           \
                for (int64_t k = 0; k < nk; ++k) {                                                    \
                    tl = bl[k] < tl ? bl[k] : tl;                                                     \
                    th = bh[k] > th ? bh[k] : th;                                                     \
                }                                                                                     \
                const int64_t c = k0 / group;                                                         \
                mn[c] = tl < mn[c] ? tl : mn[c];                                                      \
                mx[c] = th > mx[c] ? th : mx[c];                                                      \
            } else {                                                                                  \
                for (int64_t k = 0, j = k0 % group, c = k0 / group; k < nk; ++k) {                    \
                    if (k > 0 && ++j == group) { j = 0; ++c; }                                        \
                    mn[c] = bl[k] < mn[c] ? bl[k] : mn[c];                                            \
                    mx[c] = bh[k] > mx[c] ? bh[k] : mx[c];                                            \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Which kernel reads this layout: 0 rows, 1 columns, 2 columns grouped per channel, -1 none. */  \
    static int layout_##SUFFIX(int64_t outer, int64_t inner, int64_t sc, int64_t si) {                \
        if (si == 1 && (inner >= LONG_ROW || (outer < 8 && inner >= 32))) return 0;                   \
        if (sc == 1) return 1;                                                                        \
        if ((si == 1 || inner == 1) && sc == inner) return 2;                                         \
        if (si == 1) return 0;                                                                        \
        return -1;                                                                                    \
    }                                                                                                 \
                                                                                                      \
    static void channels_##SUFFIX(int kind, const T *a, const T *f, int64_t outer, int64_t C,         \
                                  int64_t inner, int64_t so, int64_t sc, int64_t si, T eps, T lo,     \
                                  T hi, double *acc, int64_t c0, int64_t c1) {                        \
        if (c1 <= c0) return;                                                                         \
        if (kind == 0)                                                                                \
            rows_##SUFFIX(a, f, outer, C, inner, so, sc, c0, c1, eps, lo, hi, acc);                   \
        else if (kind == 1)                                                                           \
            cols_##SUFFIX(a, f, outer, inner, so, si, c0, c1, 1, eps, lo, hi, C, acc);                \
        else                                                                                          \
            cols_##SUFFIX(a, f, outer, 1, so, 0, c0 * inner, c1 * inner, inner, eps, lo, hi, C, acc); \
    }                                                                                                 \
                                                                                                      \
    /* Adds channels [c0, c1) of the batch (all of them: 0, C), split over `threads` OpenMP threads   \
     * by channel ranges (each thread writes only its own channels); the element counts are added     \
     * by the call that has c0 == 0, so that ranges added by separate calls count once. Built         \
     * without OpenMP the ranges simply run one after the other. Returns 0; 1 when the strides fit    \
     * no kernel (nothing written: the caller passes contiguous copies); 2 for a bad range. */        \
    int deadneuron_stats_##SUFFIX(const T *a, const T *f, int64_t outer, int64_t C, int64_t inner,    \
                                  int64_t so, int64_t sc, int64_t si, double eps, double lo,          \
                                  double hi, int count_flat, double *acc, double *counts,             \
                                  int64_t c0, int64_t c1, int threads) {                              \
        if (!f) f = a;                                                                                \
        if (c0 < 0 || c1 > C || c0 > c1) return 2;                                                    \
        if (outer > 0 && c1 > c0 && inner > 0) {                                                      \
            const int kind = layout_##SUFFIX(outer, inner, sc, si);                                   \
            if (kind < 0) return 1;                                                                   \
            const int64_t n = c1 - c0;                                                                \
            const int parts = threads < 1 ? 1 : (n < threads ? (int)n : threads);                     \
            _Pragma("omp parallel for num_threads(parts) schedule(static) if (parts > 1)")            \
            for (int t = 0; t < parts; ++t)                                                           \
                channels_##SUFFIX(kind, a, f, outer, C, inner, so, sc, si, (T)eps, (T)lo, (T)hi, acc, \
                                  c0 + n * t / parts, c0 + n * (t + 1) / parts);                      \
        }                                                                                             \
        if (c0 == 0) {                                                                                \
            counts[0] += (double)(outer * inner);                                                     \
            if (count_flat) counts[1] += (double)(outer * inner);                                     \
        }                                                                                             \
        return 0;                                                                                     \
    }

DEFINE_KERNELS(float, FLT_MAX, f32)
DEFINE_KERNELS(double, DBL_MAX, f64)
