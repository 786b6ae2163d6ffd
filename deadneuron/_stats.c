/* deadneuron: one-pass per-channel activation statistics on the CPU.
 *
 * Built on first use by deadneuron/_native.py with the system C compiler and loaded with ctypes;
 * where that fails the audit uses torch kernels instead. The statistics are those of
 * `deadneuron.moments.fused_moments`, which is the reference every test compares this file with.
 *
 * Input: an activation `a` and the tensor `f` its flat region is tested on (`f` may be NULL: then
 * `a` itself), both viewed as (outer, C, inner) with element strides (so, sc, si).
 * Output, merged in place into `acc`, seven rows of C doubles:
 *   zero    elements with |a| <= eps
 *   flat    elements with f finite and (f <= lo or f >= hi): a non-finite f is never flat
 *   finite  finite elements of a
 *   mean    mean of the finite elements of a
 *   m2      their centred sum of squares, sum((a - mean)^2)
 *   min/max range of the finite elements of a;
 * and to `counts`: counts[0] += elements, counts[1] += elements if the flat region was counted
 * (pass lo = hi = NaN to count none: every comparison with NaN is false).
 *
 * Moments: each stretch of at most FLUSH elements of a channel (a row, or FLUSH rows of a column
 * block) is summed as s = sum(a - K), q = sum((a - K)^2), K being the channel's running mean (for
 * its first stretch, the mean of that stretch), and merged into (finite, mean, m2) in double with
 * Chan's parallel formula. The sums are partial sums in the input's precision over at most CHUNK
 * elements (32 per vector lane with AVX-512) or CHUNK_ROWS rows, added in double: with the shift,
 * float32 input keeps its std to about 1e-7 relative however large its mean (mean 2e4, std 1 gave
 * std 44 with sum and sum of squares). Counts are kept in the input's precision over at most FLUSH
 * elements (exact: FLUSH < 2**24), then added to the double accumulators. A stretch is run
 * finite-only first; if s or q comes out non-finite (a NaN or Inf in a or f, or an overflow) it is
 * run again with the checks, summed in double.
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
#define BLOCK 64   /* columns per block in the column kernel: the partial arrays stay in L1 */
#define LONG_ROW 256 /* rows at least this long (inner contiguous) are reduced one by one */
#define CHUNK 512  /* elements per partial sum of the moments in the row kernel (32-128 per lane) */
#define CHUNK_ROWS 16 /* rows per partial sum of the moments in the column kernel */

enum { R_ZERO, R_FLAT, R_FIN, R_MEAN, R_M2, R_MIN, R_MAX };

/* Chan's parallel formula: merge nb finite elements with shifted sums s = sum(v - K) and
 * q = sum((v - K)^2) into channel c's (finite, mean, m2). */
static void merge_moments(double *acc, int64_t C, int64_t c, double nb, double K, double s, double q) {
    if (!(nb > 0)) return;
    double *cnt = acc + R_FIN * C + c, *mean = acc + R_MEAN * C + c, *m2 = acc + R_M2 * C + c;
    const double off = s / nb;  /* the part's mean, minus K */
    double m2b = q - s * off;   /* the part's centred sum of squares */
    if (m2b < 0) m2b = 0;
    const double na = *cnt, n = na + nb, delta = (K + off) - *mean;
    *m2 += m2b + delta * delta * (na * (nb / n));
    *mean += delta * (nb / n);
    *cnt = n;
}

/* The flat test: f in the region and finite. */
#define IS_FLAT(ABS, TMAX, w) (ABS(w) <= (TMAX) && ((w) <= lo || (w) >= hi))

/* One element of a stretch run finite-only, the moments summed in the input's precision (partial
 * sums, added in double every CHUNK elements or CHUNK_ROWS rows). The flat test has no finiteness
 * test: where f is a itself (CHECK 0) a non-finite value makes s non-finite, and where it is not
 * (CHECK 1) w - w (NaN for a non-finite w, else 0) is added into s; either way the stretch is run
 * again with the checks. */
#define ELEMENT_FAST(T, ABS, TMAX, v, w, CHECK, kt, z, fl, s, q, l, h)                                \
    do {                                                                                              \
        T av_ = ABS(v);                                                                               \
        z += av_ <= eps ? (T)1 : (T)0;                                                                \
        fl += ((w) <= lo || (w) >= hi) ? (T)1 : (T)0;                                                 \
        T d_ = v - (kt);                                                                              \
        q += d_ * d_;                                                                                 \
        if (CHECK) d_ += w - w;                                                                       \
        s += d_;                                                                                      \
        l = v < l ? v : l;                                                                            \
        h = v > h ? v : h;                                                                            \
    } while (0)

/* The same with the finiteness tests, summed in double: nf counts the non-finite elements of a. */
#define ELEMENT(T, ABS, TMAX, v, w, K, z, fl, nf, s, q, l, h)                                         \
    do {                                                                                              \
        T av_ = ABS(v);                                                                               \
        int ok_ = av_ <= TMAX;                                                                        \
        z += av_ <= eps ? (T)1 : (T)0;                                                                \
        fl += IS_FLAT(ABS, TMAX, w) ? (T)1 : (T)0;                                                    \
        nf += ok_ ? (T)0 : (T)1;                                                                      \
        double d_ = ok_ ? (double)v - (K) : 0.0;                                                      \
        s += d_;                                                                                      \
        q += d_ * d_;                                                                                 \
        T m1_ = ok_ ? v : (T)INFINITY;                                                                \
        T m2_ = ok_ ? v : -(T)INFINITY;                                                               \
        l = m1_ < l ? m1_ : l;                                                                        \
        h = m2_ > h ? m2_ : h;                                                                        \
    } while (0)

#define DEFINE_KERNELS(T, TMAX, ABS, SUFFIX)                                                          \
    /* The shift of a channel's next stretch of n contiguous elements: its running mean; for its      \
     * first stretch, the mean of that stretch's finite values (0 if none: it adds no moments). */    \
    static double shift_##SUFFIX(const double *acc, int64_t C, int64_t c, const T *x, int64_t n) {    \
        if (acc[R_FIN * C + c] > 0) return acc[R_MEAN * C + c];                                       \
        double sum = 0;                                                                               \
        T seen = 0;                                                                                   \
        _Pragma("omp simd reduction(+ : sum, seen)")                                                  \
        for (int64_t i = 0; i < n; ++i) {                                                             \
            const T v = x[i];                                                                         \
            sum += (double)(ABS(v) <= TMAX ? v : (T)0);                                               \
            seen += ABS(v) <= TMAX ? (T)1 : (T)0;                                                     \
        }                                                                                             \
        return seen > 0 ? sum / seen : 0.0;                                                           \
    }                                                                                                 \
                                                                                                      \
    /* A stretch of n contiguous elements, finite-only; the moments summed in the input's precision   \
     * over runs of CHUNK elements, then in double. */                                                \
    static void fast_##SUFFIX(const T *restrict xa, const T *restrict xf, int64_t n, int check,       \
                              T eps, T lo, T hi, T kt, T *rz, T *rfl, double *rs, double *rq, T *rl,  \
                              T *rh) {                                                                \
        T z = 0, fl = 0, l = *rl, h = *rh;                                                            \
        double s = 0, q = 0;                                                                          \
        for (int64_t i0 = 0; i0 < n; i0 += CHUNK) {                                                   \
            const int64_t i1 = n - i0 < CHUNK ? n : i0 + CHUNK;                                       \
            T ps = 0, pq = 0;                                                                         \
            if (check) {                                                                              \
                _Pragma("omp simd reduction(+ : z, fl, ps, pq) reduction(min : l) reduction(max : h)") \
                for (int64_t i = i0; i < i1; ++i) {                                                   \
                    T v = xa[i], w = xf[i];                                                           \
                    ELEMENT_FAST(T, ABS, TMAX, v, w, 1, kt, z, fl, ps, pq, l, h);                     \
                }                                                                                     \
            } else {                                                                                  \
                _Pragma("omp simd reduction(+ : z, fl, ps, pq) reduction(min : l) reduction(max : h)") \
                for (int64_t i = i0; i < i1; ++i) {                                                   \
                    T v = xa[i], w = xf[i];                                                           \
                    ELEMENT_FAST(T, ABS, TMAX, v, w, 0, kt, z, fl, ps, pq, l, h);                     \
                }                                                                                     \
            }                                                                                         \
            s += ps;                                                                                  \
            q += pq;                                                                                  \
        }                                                                                             \
        *rz = z; *rfl = fl; *rs = s; *rq = q; *rl = l; *rh = h;                                       \
    }                                                                                                 \
                                                                                                      \
    /* Rows: each (o, c) row of `inner` contiguous elements is reduced on its own. */                 \
    static void rows_##SUFFIX(const T *restrict a, const T *restrict f, int64_t outer, int64_t C,     \
                              int64_t inner, int64_t so, int64_t sc, int64_t c0, int64_t c1,          \
                              T eps, T lo, T hi, double *restrict acc) {                              \
        double *zero = acc + R_ZERO * C, *flat = acc + R_FLAT * C;                                    \
        double *mn = acc + R_MIN * C, *mx = acc + R_MAX * C;                                          \
        const int check = f != a;                                                                     \
        for (int64_t o = 0; o < outer; ++o) {                                                         \
            for (int64_t c = c0; c < c1; ++c) {                                                       \
                const T *restrict pa = a + o * so + c * sc;                                           \
                const T *restrict pf = f + o * so + c * sc;                                           \
                T l = (T)INFINITY, h = -(T)INFINITY;                                                  \
                for (int64_t i0 = 0; i0 < inner; i0 += FLUSH) {                                       \
                    int64_t n = inner - i0 < FLUSH ? inner - i0 : FLUSH;                              \
                    const T *restrict xa = pa + i0, *restrict xf = pf + i0;                           \
                    const T kt = (T)shift_##SUFFIX(acc, C, c, xa, n);                                 \
                    const double K = kt;                                                              \
                    T z, fl, nf = 0, cl = l, ch = h;                                                  \
                    double s, q;                                                                      \
                    fast_##SUFFIX(xa, xf, n, check, eps, lo, hi, kt, &z, &fl, &s, &q, &cl, &ch);      \
                    if (!(s - s == 0 && q - q == 0)) { /* again, with the checks, in double */        \
                        z = fl = 0;                                                                   \
                        s = q = 0;                                                                    \
                        cl = l;                                                                       \
                        ch = h;                                                                       \
                        _Pragma("omp simd reduction(+ : z, fl, nf, s, q) reduction(min : cl) reduction(max : ch)") \
                        for (int64_t i = 0; i < n; ++i) {                                             \
                            T v = xa[i], w = xf[i];                                                   \
                            ELEMENT(T, ABS, TMAX, v, w, K, z, fl, nf, s, q, cl, ch);                  \
                        }                                                                             \
                    }                                                                                 \
                    l = cl;                                                                           \
                    h = ch;                                                                           \
                    zero[c] += z;                                                                     \
                    flat[c] += fl;                                                                    \
                    merge_moments(acc, C, c, (double)n - (double)nf, K, s, q);                        \
                }                                                                                     \
                mn[c] = l < mn[c] ? l : mn[c];                                                        \
                mx[c] = h > mx[c] ? h : mx[c];                                                        \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* One block of the column kernel: rows (o, i) at a + o*so + i*si, of which columns               \
     * [k0, k0 + nk) are read; column k belongs to channel k / group, and a block never splits a      \
     * channel except at fixed offsets from its start (so how channels are split over threads does    \
     * not change any result). Over stretches of FLUSH rows, run finite-only first, again with the    \
     * checks if that came out non-finite; then each channel's columns are reduced and merged. */     \
    static void block_##SUFFIX(const T *restrict a, const T *restrict f, int64_t outer, int64_t inner, \
                               int64_t so, int64_t si, int64_t k0, int64_t nk, int64_t group,         \
                               T eps, T lo, T hi, int64_t C, double *restrict acc) {                  \
        double *zero = acc + R_ZERO * C, *flat = acc + R_FLAT * C;                                    \
        double *mn = acc + R_MIN * C, *mx = acc + R_MAX * C;                                          \
        const int64_t total = outer * inner;                                                          \
        const int check = f != a;                                                                     \
        T z[BLOCK], fl[BLOCK], nf[BLOCK], l[BLOCK], h[BLOCK], bl[BLOCK], bh[BLOCK];                   \
        T ps[BLOCK], pq[BLOCK], kt[BLOCK];                                                            \
        double s[BLOCK], q[BLOCK];                                                                    \
        for (int64_t k = 0; k < BLOCK; ++k) {                                                         \
            bl[k] = (T)INFINITY;                                                                      \
            bh[k] = -(T)INFINITY;                                                                     \
            kt[k] = 0;                                                                                \
        }                                                                                             \
        for (int64_t r0 = 0; r0 < total; r0 += FLUSH) {                                               \
            const int64_t r1 = total - r0 < FLUSH ? total : r0 + FLUSH;                               \
            /* one shift per channel (its columns' sums add up): its running mean, or for its first   \
             * stretch the mean of the stretch's finite values */                                   \
            int first = 0;                                                                            \
            for (int64_t c = k0 / group; c <= (k0 + nk - 1) / group; ++c) first |= !(acc[R_FIN * C + c] > 0); \
            double ms[BLOCK];                                                                         \
            T mc[BLOCK];                                                                              \
            if (first) {                                                                              \
                for (int64_t k = 0; k < BLOCK; ++k) ms[k] = mc[k] = 0;                                \
                for (int64_t r = r0; r < r1; ++r) {                                                   \
                    const T *restrict pa = a + (r / inner) * so + (r % inner) * si + k0;              \
                    _Pragma("omp simd")                                                               \
                    for (int64_t k = 0; k < nk; ++k) {                                                \
                        const T v = pa[k];                                                            \
                        const T ok = ABS(v) <= TMAX ? v : (T)0;                                       \
                        ms[k] += (double)ok;                                                          \
                        mc[k] += ABS(v) <= TMAX ? (T)1 : (T)0;                                        \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
            for (int64_t k = 0; k < nk;) {                                                            \
                const int64_t c = (k0 + k) / group;                                                   \
                const int64_t ke = (c + 1) * group - k0 < nk ? (c + 1) * group - k0 : nk;             \
                double kc = acc[R_MEAN * C + c];                                                      \
                if (!(acc[R_FIN * C + c] > 0)) {                                                      \
                    double sum = 0, seen = 0;                                                         \
                    for (int64_t j = k; j < ke; ++j) {                                                \
                        sum += ms[j];                                                                 \
                        seen += mc[j];                                                                \
                    }                                                                                 \
                    kc = seen > 0 ? sum / seen : 0.0;                                                 \
                }                                                                                     \
                for (; k < ke; ++k) kt[k] = (T)kc;                                                    \
            }                                                                                         \
            for (int pass = 0; pass < 2; ++pass) {                                                    \
                for (int64_t k = 0; k < BLOCK; ++k) {                                                 \
                    z[k] = fl[k] = nf[k] = ps[k] = pq[k] = 0;                                         \
                    s[k] = q[k] = 0;                                                                  \
                    l[k] = bl[k];                                                                     \
                    h[k] = bh[k];                                                                     \
                }                                                                                     \
                int64_t o = r0 / inner, i = r0 % inner, rows = 0;                                     \
                for (int64_t r = r0; r < r1; ++r) {                                                   \
                    const T *restrict pa = a + o * so + i * si + k0;                                  \
                    const T *restrict pf = f + o * so + i * si + k0;                                  \
                    if (pass == 1) {                                                                  \
                        _Pragma("omp simd")                                                           \
                        for (int64_t k = 0; k < nk; ++k) {                                            \
                            T v = pa[k], w = pf[k];                                                   \
                            ELEMENT(T, ABS, TMAX, v, w, (double)kt[k], z[k], fl[k], nf[k], s[k], q[k], l[k], h[k]); \
                        }                                                                             \
                    } else if (check) {                                                               \
                        _Pragma("omp simd")                                                           \
                        for (int64_t k = 0; k < nk; ++k) {                                            \
                            T v = pa[k], w = pf[k];                                                   \
                            ELEMENT_FAST(T, ABS, TMAX, v, w, 1, kt[k], z[k], fl[k], ps[k], pq[k], l[k], h[k]); \
                        }                                                                             \
                    } else {                                                                          \
                        _Pragma("omp simd")                                                           \
                        for (int64_t k = 0; k < nk; ++k) {                                            \
                            T v = pa[k], w = pf[k];                                                   \
                            ELEMENT_FAST(T, ABS, TMAX, v, w, 0, kt[k], z[k], fl[k], ps[k], pq[k], l[k], h[k]); \
                        }                                                                             \
                    }                                                                                 \
                    if (pass == 0 && (++rows == CHUNK_ROWS || r + 1 == r1)) { /* partials into double */ \
                        rows = 0;                                                                     \
                        _Pragma("omp simd")                                                           \
                        for (int64_t k = 0; k < nk; ++k) {                                            \
                            s[k] += ps[k];                                                            \
                            q[k] += pq[k];                                                            \
                            ps[k] = pq[k] = 0;                                                        \
                        }                                                                             \
                    }                                                                                 \
                    if (++i == inner) {                                                               \
                        i = 0;                                                                        \
                        ++o;                                                                          \
                    }                                                                                 \
                }                                                                                     \
                if (pass == 1) break;                                                                 \
                int finite = 1;                                                                       \
                for (int64_t k = 0; k < nk; ++k) finite &= (s[k] - s[k] == 0) & (q[k] - q[k] == 0);   \
                if (finite) break;                                                                    \
            }                                                                                         \
            for (int64_t k = 0; k < nk;) { /* per channel: add its columns, merge */                  \
                const int64_t c = (k0 + k) / group;                                                   \
                const int64_t ke = (c + 1) * group - k0 < nk ? (c + 1) * group - k0 : nk;             \
                T tz = 0, tfl = 0, tnf = 0;                                                           \
                double ts = 0, tq = 0;                                                                \
                const double kc = kt[k];                                                              \
                const double seen = (double)(r1 - r0) * (double)(ke - k);                             \
                for (int64_t j = k; j < ke; ++j) {                                                    \
                    tz += z[j]; tfl += fl[j]; tnf += nf[j]; ts += s[j]; tq += q[j];                   \
                }                                                                                     \
                zero[c] += tz;                                                                        \
                flat[c] += tfl;                                                                       \
                merge_moments(acc, C, c, seen - (double)tnf, kc, ts, tq);                             \
                k = ke;                                                                               \
            }                                                                                         \
            for (int64_t k = 0; k < nk; ++k) {                                                        \
                bl[k] = l[k];                                                                         \
                bh[k] = h[k];                                                                         \
            }                                                                                         \
        }                                                                                             \
        for (int64_t k = 0; k < nk;) {                                                                \
            const int64_t c = (k0 + k) / group;                                                       \
            const int64_t ke = (c + 1) * group - k0 < nk ? (c + 1) * group - k0 : nk;                 \
            T tl = (T)INFINITY, th = -(T)INFINITY;                                                    \
            for (int64_t j = k; j < ke; ++j) {                                                        \
                tl = bl[j] < tl ? bl[j] : tl;                                                         \
                th = bh[j] > th ? bh[j] : th;                                                         \
            }                                                                                         \
            mn[c] = tl < mn[c] ? tl : mn[c];                                                          \
            mx[c] = th > mx[c] ? th : mx[c];                                                          \
            k = ke;                                                                                   \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Columns: channels [c0, c1), each `group` consecutive columns of rows (o, i); blocks hold whole \
     * channels (as many as fit in BLOCK columns), or BLOCK columns of one channel at a time. */      \
    static void cols_##SUFFIX(const T *a, const T *f, int64_t outer, int64_t inner, int64_t so,       \
                              int64_t si, int64_t c0, int64_t c1, int64_t group, T eps, T lo, T hi,   \
                              int64_t C, double *acc) {                                               \
        if (group <= BLOCK) {                                                                         \
            const int64_t per = BLOCK / group;                                                        \
            for (int64_t c = c0; c < c1; c += per) {                                                  \
                const int64_t m = c1 - c < per ? c1 - c : per;                                        \
                block_##SUFFIX(a, f, outer, inner, so, si, c * group, m * group, group, eps, lo, hi,  \
                               C, acc);                                                               \
            }                                                                                         \
            return;                                                                                   \
        }                                                                                             \
        for (int64_t c = c0; c < c1; ++c)                                                             \
            for (int64_t j = 0; j < group; j += BLOCK)                                                \
                block_##SUFFIX(a, f, outer, inner, so, si, c * group + j,                             \
                               group - j < BLOCK ? group - j : BLOCK, group, eps, lo, hi, C, acc);    \
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
            cols_##SUFFIX(a, f, outer, 1, so, 0, c0, c1, inner, eps, lo, hi, C, acc);                 \
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

DEFINE_KERNELS(float, FLT_MAX, fabsf, f32)
DEFINE_KERNELS(double, DBL_MAX, fabs, f64)
