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
 * Moments: a channel's whole batch is summed in double, s = sum(a - K) and q = sum((a - K)^2), K
 * being the channel's first finite element in (o, i) order; the batch's (finite, mean, m2) =
 * (n, K + s/n, q - s*s/n) is then merged into the accumulator once, with Chan's parallel formula
 * (as `deadneuron.stats.ChannelStats` merges the torch kernels' batches). Where K lies far from the
 * batch's mean (q > REDO * m2: the subtraction would cancel digits), the channel is summed again
 * with K = that mean. So a batch's statistics depend on that batch alone, never on what the
 * accumulator saw before it, and are accurate to float64 rounding: accumulators of the same
 * batches split over processes merge to one process's result to about 1e-15 relative.
 * Counts are kept in the input's precision over at most FLUSH elements (exact: FLUSH < 2**24),
 * then added in double. A stretch of FLUSH elements is run finite-only first; if s or q comes out
 * non-finite (a NaN or Inf in a or f) it is run again with the checks.
 * Compiled with -fno-trapping-math so that the selects below vectorise; nothing here relies on
 * floating-point exceptions. Never compile this with -ffast-math: the finiteness tests would go.
 * -std=c99 fuses no a*b+c on its own; SQUARE_ADD fuses q + d*d explicitly where the CPU has FMA, so
 * vector and scalar code round alike.
 * Compiled with -fopenmp, a batch is split by channel ranges over `threads` threads of the OpenMP
 * runtime torch has loaded (deadneuron/_native.py checks that there is only that one); each thread
 * reduces whole channels, in the same order as one thread would, so the result does not change.
 *
 * WRITES: the relu variants can also write relu(z) into `out` (a tensor of z's strides, not z itself) as
 * they read z, so that the model's own relu call is that pass (deadneuron/probe/measure.py `fused_relu`):
 * torch.relu's values bit for bit (RELU_OF: x < 0 gives 0; -0.0 and NaN pass through). Only with relu's
 * default thresholds, whose fast pass (RELU0) reads every element of every stretch before any check:
 * the pass writes them all, and a pass run again (the checks, a far shift) reads z, which it left alone.
 * Elsewhere (other thresholds, chosen rows, out == z, a large batch read a block of columns at a time)
 * the call returns 3 and does nothing.
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define FLUSH 4096 /* elements per count run in the row kernel, rows per stretch in the column kernel */
#define BLOCK 64   /* columns per block in the column kernel: the partial arrays stay in L1 */
#define TILE 16    /* columns of a block summed together in registers (finite-only pass) */
#define TILE_ROWS 256 /* ... over this many rows at a time (the block's rows stay in cache between tiles) */
#define TILE_BYTES (12 << 20) /* ... for batches of at most this many bytes read: beyond (out of a 32 MB L3,
                                   measured with benchmarks/kernel_speed.py) the plain block loop streams faster */
#define LONG_ROW 64 /* rows at least this long (inner contiguous) are reduced by the row kernel; LANES long where the
                       batch fits in cache (`lanes`) */
#define LANES 16 /* lanes of the short-row kernel */
#define LANE_FLUSH (1 << 20) /* elements between its moves of counts into double (per lane < 2**24) */
#define ROW_CHANNELS 256 /* channels the row kernel reads together, row by row in memory order */
#define FLAT_BLOCK 512 /* columns per block of the flat-only column loop */
#define NARROW 512 /* bytes of a channels-last row each thread reads at least (else one thread reads it) */
#define REDO 64.0  /* a shift with q > REDO * m2 (about 8 standard deviations off) is redone */

enum { R_ZERO, R_FLAT, R_FIN, R_MEAN, R_M2, R_MIN, R_MAX };

/* Where outer row o starts: rows[o] for a batch's chosen rows (a padding mask's), else o * so. */
#define ROW(o) (rows ? rows[o] : (o) * so)
/* The column kernel reads a block of columns down the rows; where rows lie a page or more apart (a
 * channels-last batch of many channels) the hardware prefetchers, which stop at page boundaries, fetch
 * nothing ahead and every row's lines come from memory one miss at a time (2-3 times slower than the
 * same batch in cache, measured in a BERT's and a transformer's MLP with benchmarks/kernel_speed.py).
 * So the rows PF_ROWS ahead are prefetched explicitly. */
#define PF_ROWS 16
#define AHEAD(o) (rows ? rows[(o) + PF_ROWS] : ((o) + PF_ROWS) * so)
/* In a tile's loop over rows r (= o where inner == 1) up to r1: fetch the tile's line PF_ROWS rows ahead. */
#define TILE_AHEAD()                                                                                  \
    do {                                                                                              \
        if (inner == 1 && r + PF_ROWS < r1) {                                                         \
            __builtin_prefetch(a + AHEAD(o) + kk);                                                    \
            if (check) __builtin_prefetch(f + AHEAD(o) + kk);                                         \
        }                                                                                             \
    } while (0)

/* In `lane_rows`' loop over one channel's rows o up to o1: the next row's first lines fetched ahead (the
 * rows lie C * inner elements apart; a large batch read channel by channel starts every row cold). */
#define LANE_AHEAD()                                                                                  \
    do {                                                                                              \
        if (o + 1 < o1)                                                                               \
            for (int64_t x = 0; x < full && x < LANE_AHEAD_ELEMENTS; x += 64 / (int64_t)sizeof(*a)) { \
                __builtin_prefetch(a + ROW(o + 1) + off + x);                                         \
                if (check) __builtin_prefetch(f + ROW(o + 1) + off + x);                              \
            }                                                                                         \
    } while (0)
#define LANE_AHEAD_ELEMENTS 256

/* relu(z) with the default thresholds (eps 0, flat region z <= 0): |relu(z)| <= 0 exactly where z <= 0, and
 * a finite z <= 0 is flat; so one comparison counts both, and the range of relu(z) is relu of z's range. The
 * fast pass of the relu variants then takes ELEMENT_RELU0's shorter step, its lanes' l/h tracking z (a -inf
 * in z shows there: the pass is run again with the checks). */
#define RELU0(TRANSFORMED) ((TRANSFORMED) && eps == 0 && lo == 0 && isinf(hi) && hi > 0)
#define ELEMENT_RELU0(T, w, K, z, s, q, l, h)                                                         \
    do {                                                                                              \
        T v_ = RELU_OF(w);                                                                            \
        z += (w) <= 0 ? (T)1 : (T)0;                                                                  \
        double d_ = (double)v_ - (K);                                                                 \
        s += d_;                                                                                      \
        SQUARE_ADD(q, d_);                                                                            \
        l = (w) < l ? (w) : l;                                                                        \
        h = (w) > h ? (w) : h;                                                                        \
    } while (0)

/* One step of the short-row lanes: elements i + k (k < N) of the rows at pa (and pf) into lane k, in MODE
 * (a constant: the other branches fold away) 0 finite-only, f is a; 1 finite-only, f read; 2 with the
 * checks; 3 ELEMENT_RELU0; 4 ELEMENT_RELU0 with relu's value written to po (the output, see WRITES). */
#define LANE_STEP(T, ABS, TMAX, TR, MODE, N)                                                          \
    _Pragma("omp simd")                                                                               \
    for (int64_t k = 0; k < (N); ++k) {                                                               \
        if ((MODE) == 2) {                                                                            \
            T w = pf[i + k], v = TR(pa[i + k]);                                                       \
            ELEMENT(T, ABS, TMAX, v, w, K, z[k], fl[k], nx[k], s[k], q[k], l[k], h[k]);               \
        } else if ((MODE) == 1) {                                                                     \
            T w = pf[i + k], v = TR(pa[i + k]);                                                       \
            ELEMENT_FAST(T, ABS, TMAX, v, w, 1, K, z[k], fl[k], nx[k], s[k], q[k], l[k], h[k]);       \
        } else if ((MODE) == 0) {                                                                     \
            T v = TR(pa[i + k]);                                                                      \
            ELEMENT_FAST(T, ABS, TMAX, v, v, 0, K, z[k], fl[k], nx[k], s[k], q[k], l[k], h[k]);       \
        } else {                                                                                      \
            T w = pa[i + k];                                                                          \
            ELEMENT_RELU0(T, w, K, z[k], s[k], q[k], l[k], h[k]);                                     \
            if ((MODE) == 4) po[i + k] = RELU_OF(w);                                                  \
        }                                                                                             \
    }
/* Rows [o0, o1), their first `full` elements LANES at a time (the loop over rows stays a loop). */
#define LANE_ROWS(T, ABS, TMAX, TR, MODE)                                                             \
    for (int64_t o = o0; o < o1; ++o) {                                                               \
        const T *restrict pa = a + ROW(o) + off, *restrict pf = f + ROW(o) + off;                     \
        T *restrict po = (MODE) == 4 ? wo + ROW(o) + off : NULL;                                     \
        (void)pf;                                                                                     \
        (void)po;                                                                                     \
        LANE_AHEAD();                                                                                 \
        for (int64_t i = 0; i < full; i += LANES) {                                                   \
            LANE_STEP(T, ABS, TMAX, TR, MODE, LANES)                                                  \
        }                                                                                             \
        __asm__ volatile("");                                                                         \
    }
/* Rows [o0, o1), their last n elements (from i) into the first n lanes. */
#define LANE_TAILS(T, ABS, TMAX, TR, MODE)                                                            \
    for (int64_t o = o0; o < o1; ++o) {                                                               \
        const T *restrict pa = a + ROW(o) + off, *restrict pf = f + ROW(o) + off;                     \
        T *restrict po = (MODE) == 4 ? wo + ROW(o) + off : NULL;                                     \
        (void)pf;                                                                                     \
        (void)po;                                                                                     \
        LANE_STEP(T, ABS, TMAX, TR, MODE, n)                                                          \
    }

/* `tile_relu0`'s loop over rows r0..r1 of N columns in RELU0's step (sl/sh: z's range); W (a constant):
 * relu's values written to `out` too. */
#define RELU0_TILE_ROWS(T, N, W)                                                                      \
    for (int64_t r = r0; r < r1; ++r) {                                                               \
        const T *restrict pa = a + ROW(o) + i * si + kk;                                              \
        T *restrict po = (W) ? wo + ROW(o) + i * si + kk : NULL;                                     \
        (void)po;                                                                                     \
        TILE_AHEAD();                                                                                 \
        _Pragma("omp simd")                                                                           \
        for (int64_t k = 0; k < (N); ++k) {                                                           \
            T w = pa[k];                                                                              \
            ELEMENT_RELU0(T, w, K[k], z[k], s[k], q[k], sl[k], sh[k]);                                \
            if (W) po[k] = RELU_OF(w);                                                                \
        }                                                                                             \
        __asm__ volatile(""); /* the loop over rows stays a loop: not vectorised */                   \
        if (++i == inner) {                                                                           \
            i = 0;                                                                                    \
            ++o;                                                                                      \
        }                                                                                             \
    }

/* A channel's sums over one batch: counts in double, moments shifted by K. */
typedef struct {
    double z, fl, nf, s, q;
} Sums;

/* Whether a batch's shifted sums lose digits in q - s*s/n: then they are summed again around the
 * mean they give (never for non-finite sums: overflow in float64 input). */
static int far_shift(double n, double s, double q) {
    if (!(n > 0) || !(q - q == 0) || !(s - s == 0)) return 0;
    double m2 = q - s * (s / n);
    return q > REDO * (m2 > 0 ? m2 : 0);
}

/* Chan's parallel formula: merge a batch of nb finite elements with shifted sums s = sum(v - K) and
 * q = sum((v - K)^2) into channel c's (finite, mean, m2). */
static void merge_moments(double *acc, int64_t C, int64_t c, double nb, double K, double s, double q) {
    if (!(nb > 0)) return;
    double *cnt = acc + R_FIN * C + c, *mean = acc + R_MEAN * C + c, *m2 = acc + R_M2 * C + c;
    const double off = s / nb;  /* the batch's mean, minus K */
    double m2b = q - s * off;   /* the batch's centred sum of squares */
    if (m2b < 0) m2b = 0;
    const double na = *cnt, n = na + nb, delta = (K + off) - *mean;
    *m2 += m2b + delta * delta * (na * (nb / n));
    *mean += delta * (nb / n);
    *cnt = n;
}

/* The flat test: f in the region and finite; FLAT_ONE: the same as 1 or 0 in T, without branches. */
#define IS_FLAT(ABS, TMAX, w) (ABS(w) <= (TMAX) && ((w) <= lo || (w) >= hi))
#define FLAT_ONE(T, ABS, TMAX, w) ((T)((ABS(w) <= (TMAX)) & (((w) <= lo) | ((w) >= hi))))

/* q + d*d: fused where the CPU has FMA (one rounding; the vector and scalar code fuse alike). */
#ifdef __FMA__
#define SQUARE_ADD(q, d) q = fma(d, d, q)
#else
#define SQUARE_ADD(q, d) q += (d) * (d)
#endif

/* One element of a stretch run finite-only; the moments in double. The flat test has no
 * finiteness test: where f is a itself (CHECK 0) a non-finite value makes s non-finite, and where
 * it is not (CHECK 1) w - w (NaN for a non-finite w, else 0) is added into `nw`; either way the
 * stretch is run again with the checks. */
#define ELEMENT_FAST(T, ABS, TMAX, v, w, CHECK, K, z, fl, nw, s, q, l, h)                             \
    do {                                                                                              \
        T av_ = ABS(v);                                                                               \
        z += av_ <= eps ? (T)1 : (T)0;                                                                \
        fl += ((w) <= lo || (w) >= hi) ? (T)1 : (T)0;                                                 \
        if (CHECK) nw += (w) - (w);                                                                   \
        double d_ = (double)(v) - (K);                                                                \
        SQUARE_ADD(q, d_);                                                                            \
        s += d_;                                                                                      \
        l = v < l ? v : l;                                                                            \
        h = v > h ? v : h;                                                                            \
    } while (0)

/* The same with the finiteness tests: nf counts the non-finite elements of a. */
#define ELEMENT(T, ABS, TMAX, v, w, K, z, fl, nf, s, q, l, h)                                         \
    do {                                                                                              \
        T av_ = ABS(v);                                                                               \
        int ok_ = av_ <= TMAX;                                                                        \
        z += av_ <= eps ? (T)1 : (T)0;                                                                \
        fl += IS_FLAT(ABS, TMAX, w) ? (T)1 : (T)0;                                                    \
        nf += ok_ ? (T)0 : (T)1;                                                                      \
        double d_ = ok_ ? (double)(v) - (K) : 0.0;                                                    \
        s += d_;                                                                                      \
        SQUARE_ADD(q, d_);                                                                            \
        T m1_ = ok_ ? v : (T)INFINITY;                                                                \
        T m2_ = ok_ ? v : -(T)INFINITY;                                                               \
        l = m1_ < l ? m1_ : l;                                                                        \
        h = m2_ > h ? m2_ : h;                                                                        \
    } while (0)

#define DEFINE_KERNELS(T, TMAX, ABS, SUFFIX, TR, TRANSFORMED)                                         \
    /* A stretch of n contiguous elements: counts in the input's precision, moments in double;        \
     * finite-only first, again with the checks if s or q came out non-finite. */                     \
    static void stretch_##SUFFIX(const T *restrict xa, const T *restrict xf, T *restrict xo, int64_t n,\
                                 int check, T eps, T lo, T hi, double K, Sums *sums, T *rl, T *rh) {  \
        T z = 0, fl = 0, nf = 0, nw = 0, l = *rl, h = *rh;                                            \
        double s = 0, q = 0;                                                                          \
        if (RELU0(TRANSFORMED)) { /* relu(z), default thresholds: l and h track z, the flat count is z's */ \
            T lz = (T)INFINITY, hz = -(T)INFINITY;                                                    \
            if (xo) { /* relu's values written too (WRITES) */                                        \
                _Pragma("omp simd reduction(+ : z, s, q) reduction(min : lz) reduction(max : hz)")    \
                for (int64_t i = 0; i < n; ++i) {                                                     \
                    T w = xa[i];                                                                      \
                    ELEMENT_RELU0(T, w, K, z, s, q, lz, hz);                                          \
                    xo[i] = RELU_OF(w);                                                               \
                }                                                                                     \
            } else {                                                                                  \
                _Pragma("omp simd reduction(+ : z, s, q) reduction(min : lz) reduction(max : hz)")    \
                for (int64_t i = 0; i < n; ++i) {                                                     \
                    T w = xa[i];                                                                      \
                    ELEMENT_RELU0(T, w, K, z, s, q, lz, hz);                                          \
                }                                                                                     \
            }                                                                                         \
            fl = z;                                                                                   \
            nw = lz == -(T)INFINITY; /* a -inf in z: again, with the checks */                         \
            if (n > 0 && nw == 0) {                                                                   \
                lz = RELU_OF(lz);                                                                     \
                hz = RELU_OF(hz);                                                                     \
                l = lz < l ? lz : l;                                                                  \
                h = hz > h ? hz : h;                                                                  \
            }                                                                                         \
        } else if (check) {                                                                           \
            _Pragma("omp simd reduction(+ : z, fl, nw, s, q) reduction(min : l) reduction(max : h)")  \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                T w = xf[i], v = TR(xa[i]);                                                           \
                ELEMENT_FAST(T, ABS, TMAX, v, w, 1, K, z, fl, nw, s, q, l, h);                        \
            }                                                                                         \
        } else {                                                                                      \
            _Pragma("omp simd reduction(+ : z, fl, s, q) reduction(min : l) reduction(max : h)")      \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                T w = xf[i], v = TR(xa[i]);                                                           \
                ELEMENT_FAST(T, ABS, TMAX, v, w, 0, K, z, fl, nw, s, q, l, h);                        \
            }                                                                                         \
        }                                                                                             \
        if (!(s - s == 0 && q - q == 0 && nw == 0)) { /* again, with the checks */                    \
            z = fl = 0;                                                                               \
            s = q = 0;                                                                                \
            l = *rl;                                                                                  \
            h = *rh;                                                                                  \
            _Pragma("omp simd reduction(+ : z, fl, nf, s, q) reduction(min : l) reduction(max : h)")  \
            for (int64_t i = 0; i < n; ++i) {                                                         \
                T w = xf[i], v = TR(xa[i]);                                                           \
                ELEMENT(T, ABS, TMAX, v, w, K, z, fl, nf, s, q, l, h);                                \
            }                                                                                         \
        }                                                                                             \
        sums->z += z; sums->fl += fl; sums->nf += nf; sums->s += s; sums->q += q;                     \
        *rl = l;                                                                                      \
        *rh = h;                                                                                      \
    }                                                                                                 \
                                                                                                      \
    /* Channel c's first finite element in (o, i) order (0 if it has none), where element (o, i) of   \
     * column k of the column kernel's rows is at a + o*so + i*si + k: the shift of its sums. */      \
    static double first_##SUFFIX(const T *a, int64_t outer, int64_t inner, int64_t so,                \
                                 const int64_t *rows, int64_t si,                                     \
                                 int64_t k0, int64_t group) {                                         \
        for (int64_t o = 0; o < outer; ++o)                                                           \
            for (int64_t i = 0; i < inner; ++i)                                                       \
                for (int64_t k = k0; k < k0 + group; ++k) {                                           \
                    const T v = TR(a[ROW(o) + i * si + k]);                                           \
                    if (ABS(v) <= TMAX) return (double)v;                                             \
                }                                                                                     \
        return 0.0;                                                                                   \
    }                                                                                                 \
                                                                                                      \
    /* Rows [o0, o1) of one channel (row o at a + ROW(o) + off), their first `full` elements (a multiple\
     * of LANES) LANES at a time, added into the lane sums zb... in `mode` (LANE_STEP), held in locals\
     * that stay in registers from row to row. Not inlined (inlined, -O3 fuses it with the caller's loops\
     * and the sums go through memory for every vector). */                                           \
    __attribute__((noinline)) static void lane_rows_##SUFFIX(const T *restrict a, const T *restrict f,\
            T *restrict wo, const int64_t *restrict rows, int64_t so, int64_t off, int64_t o0, int64_t o1, int64_t full,\
            int mode, T eps, T lo, T hi, double K, T *restrict zb, T *restrict flb, T *restrict nb,   \
            double *restrict sb, double *restrict qb, T *restrict lb, T *restrict hb) {               \
        const int check = mode != 0;                                                                  \
        T z[LANES], fl[LANES], nx[LANES], l[LANES], h[LANES];                                         \
        double s[LANES], q[LANES];                                                                    \
        for (int k = 0; k < LANES; ++k) {                                                             \
            z[k] = zb[k]; fl[k] = flb[k]; nx[k] = nb[k]; s[k] = sb[k]; q[k] = qb[k]; l[k] = lb[k]; h[k] = hb[k];\
        }                                                                                             \
        switch (mode) {                                                                               \
            case 0: LANE_ROWS(T, ABS, TMAX, TR, 0); break;                                            \
            case 1: LANE_ROWS(T, ABS, TMAX, TR, 1); break;                                            \
            case 2: LANE_ROWS(T, ABS, TMAX, TR, 2); break;                                            \
            case 3: LANE_ROWS(T, ABS, TMAX, TR, 3); break;                                            \
            default: LANE_ROWS(T, ABS, TMAX, TR, 4); break;                                           \
        }                                                                                             \
        for (int k = 0; k < LANES; ++k) {                                                             \
            zb[k] = z[k]; flb[k] = fl[k]; nb[k] = nx[k]; sb[k] = s[k]; qb[k] = q[k]; lb[k] = l[k]; hb[k] = h[k];\
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* One channel's outer rows (o at a + ROW(o) + off) of `inner` (< FLUSH) contiguous elements: LANES\
     * at a time into lane sums (`lane_rows`; the rows are too short to sum each on its own: the sums of\
     * a row's few vectors would cost more than reading them), each row's last inner % LANES elements \
     * into the first lanes; the lanes summed once at the end. Counts are moved from the lanes into   \
     * double every LANE_FLUSH elements (exact). Finite-only first (for relu(z) with the default      \
     * thresholds RELU0's shorter step), again with the checks where that came out non-finite. */     \
    static void lanes_##SUFFIX(const T *restrict a, const T *restrict f, T *restrict wo, int64_t outer, int64_t inner,\
                               int64_t so, const int64_t *restrict rows, int64_t off, T eps, T lo,    \
                               T hi, double K, Sums *sums, T *rl, T *rh) {                            \
        const int check = (f != a) | TRANSFORMED, relu0 = RELU0(TRANSFORMED);                         \
        const int64_t full = inner / LANES * LANES, n = inner - full;                                 \
        const int64_t step = LANE_FLUSH / inner > 0 ? LANE_FLUSH / inner : 1; /* rows between moves */\
        T z[LANES], fl[LANES], nx[LANES], l[LANES], h[LANES];                                         \
        double s[LANES], q[LANES], zs = 0, fls = 0, nfs = 0;                                          \
        for (int pass = 0; pass < 2; ++pass) {                                                        \
            const int mode = pass ? 2 : relu0 ? (wo ? 4 : 3) : check;                                \
            zs = fls = nfs = 0;                                                                       \
            for (int k = 0; k < LANES; ++k) {                                                         \
                z[k] = fl[k] = nx[k] = 0;                                                             \
                s[k] = q[k] = 0;                                                                      \
                l[k] = (T)INFINITY;                                                                   \
                h[k] = -(T)INFINITY;                                                                  \
            }                                                                                         \
            for (int64_t o0 = 0; o0 < outer; o0 += step) {                                            \
                const int64_t o1 = outer - o0 < step ? outer : o0 + step;                             \
                if (full)                                                                             \
                    lane_rows_##SUFFIX(a, f, wo, rows, so, off, o0, o1, full, mode, eps, lo, hi, K, z, fl, nx, s, q, l, h);\
                if (n) {                                                                              \
                    const int64_t i = full;                                                           \
                    switch (mode) {                                                                   \
                        case 0: LANE_TAILS(T, ABS, TMAX, TR, 0); break;                               \
                        case 1: LANE_TAILS(T, ABS, TMAX, TR, 1); break;                               \
                        case 2: LANE_TAILS(T, ABS, TMAX, TR, 2); break;                               \
                        case 3: LANE_TAILS(T, ABS, TMAX, TR, 3); break;                               \
                        default: LANE_TAILS(T, ABS, TMAX, TR, 4); break;                              \
                    }                                                                                 \
                }                                                                                     \
                for (int k = 0; k < LANES; ++k) {                                                     \
                    zs += z[k]; fls += mode >= 3 ? z[k] : fl[k]; /* RELU0: the same count */          \
                    if (mode == 2) nfs += nx[k];                                                      \
                    z[k] = fl[k] = 0;                                                                 \
                    if (mode == 2) nx[k] = 0;                                                         \
                }                                                                                     \
            }                                                                                         \
            if (pass == 1) break;                                                                     \
            int finite = 1;                                                                           \
            for (int k = 0; k < LANES; ++k)                                                           \
                finite &= (s[k] - s[k] == 0) & (q[k] - q[k] == 0) & (nx[k] == 0) & (l[k] != -(T)INFINITY);\
            if (!finite) continue;                                                                    \
            if (mode >= 3) /* the lanes' range was z's: relu's is relu of it (lanes that saw an element) */\
                for (int k = 0; k < LANES; ++k)                                                       \
                    if (l[k] <= h[k]) {                                                               \
                        l[k] = RELU_OF(l[k]);                                                         \
                        h[k] = RELU_OF(h[k]);                                                         \
                    }                                                                                 \
            break;                                                                                    \
        }                                                                                             \
        double ss = 0, qs = 0;                                                                        \
        T lm = *rl, hm = *rh;                                                                         \
        for (int k = 0; k < LANES; ++k) {                                                             \
            ss += s[k];                                                                               \
            qs += q[k];                                                                               \
            if (l[k] < lm) lm = l[k];                                                                 \
            if (h[k] > hm) hm = h[k];                                                                 \
        }                                                                                             \
        sums->z += zs; sums->fl += fls; sums->nf += nfs; sums->s += ss; sums->q += qs;                \
        *rl = lm;                                                                                     \
        *rh = hm;                                                                                     \
    }                                                                                                 \
                                                                                                      \
    /* Rows: channels [c, c + m), the (o, c) rows of `inner` contiguous elements: short rows (under    \
     * FLUSH) channel by channel through `lanes`; long ones read in memory order (o, then c), each    \
     * channel's stretches summed in order into sums[j], range into l/h. */                           \
    static void row_sums_##SUFFIX(const T *a, const T *f, T *wo, int64_t outer, int64_t inner, int64_t so,\
                                  const int64_t *rows, int lanes,                                     \
                                  int64_t sc, int64_t c, int64_t m, T eps, T lo, T hi,                \
                                  const double *K, Sums *sums, T *l, T *h) {                          \
        const int check = (f != a) | TRANSFORMED;                                                     \
        for (int64_t j = 0; j < m; ++j) {                                                             \
            sums[j] = (Sums){0, 0, 0, 0, 0};                                                          \
            l[j] = (T)INFINITY;                                                                       \
            h[j] = -(T)INFINITY;                                                                      \
        }                                                                                             \
        if (lanes && inner < FLUSH) {                                                                 \
            for (int64_t j = 0; j < m; ++j)                                                           \
                lanes_##SUFFIX(a, f, wo, outer, inner, so, rows, (c + j) * sc, eps, lo, hi, K[j], sums + j, \
                               l + j, h + j);                                                         \
            return;                                                                                   \
        }                                                                                             \
        for (int64_t o = 0; o < outer; ++o)                                                           \
            for (int64_t j = 0; j < m; ++j) {                                                         \
                const T *pa = a + ROW(o) + (c + j) * sc, *pf = f + ROW(o) + (c + j) * sc;             \
                T *po = wo ? wo + ROW(o) + (c + j) * sc : NULL;                                     \
                for (int64_t i0 = 0; i0 < inner; i0 += FLUSH)                                         \
                    stretch_##SUFFIX(pa + i0, pf + i0, po ? po + i0 : NULL, inner - i0 < FLUSH ? inner - i0 : FLUSH,\
                                     check, eps, lo, hi, K[j], sums + j, l + j, h + j);               \
            }                                                                                         \
    }                                                                                                 \
                                                                                                      \
    /* Rows: channels [c0, c1) a chunk of ROW_CHANNELS at a time; a channel whose shift was far from  \
     * its mean is summed again alone (its sums do not depend on the other channels'). */             \
    static void rows_##SUFFIX(const T *a, const T *f, T *wo, int64_t outer, int64_t C, int64_t inner,\
                              const int64_t *rows, int lanes,                                         \
                              int64_t so, int64_t sc, int64_t c0, int64_t c1, T eps, T lo, T hi,      \
                              double *acc) {                                                          \
        double K[ROW_CHANNELS];                                                                       \
        Sums sums[ROW_CHANNELS];                                                                      \
        T l[ROW_CHANNELS], h[ROW_CHANNELS];                                                           \
        const double seen = (double)outer * (double)inner;                                            \
        for (int64_t c = c0; c < c1; c += ROW_CHANNELS) {                                             \
            const int64_t m = c1 - c < ROW_CHANNELS ? c1 - c : ROW_CHANNELS;                          \
            for (int64_t j = 0; j < m; ++j)                                                           \
                K[j] = first_##SUFFIX(a + (c + j) * sc, outer, inner, so, rows, 1, 0, 1);             \
            row_sums_##SUFFIX(a, f, wo, outer, inner, so, rows, lanes, sc, c, m, eps, lo, hi, K, sums, l, h);\
            for (int64_t j = 0; j < m; ++j) {                                                         \
                if (far_shift(seen - sums[j].nf, sums[j].s, sums[j].q)) {                             \
                    K[j] += sums[j].s / (seen - sums[j].nf);                                          \
                    row_sums_##SUFFIX(a, f, wo, outer, inner, so, rows, lanes, sc, c + j, 1, eps, lo, hi, K + j, \
                                      sums + j, l + j, h + j);                                        \
                }                                                                                     \
                acc[R_ZERO * C + c + j] += sums[j].z;                                                 \
                acc[R_FLAT * C + c + j] += sums[j].fl;                                                \
                merge_moments(acc, C, c + j, seen - sums[j].nf, K[j], sums[j].s, sums[j].q);          \
                if (l[j] < acc[R_MIN * C + c + j]) acc[R_MIN * C + c + j] = l[j];                     \
                if (h[j] > acc[R_MAX * C + c + j]) acc[R_MAX * C + c + j] = h[j];                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* `tile` in RELU0's step (relu(z), default thresholds), its own function so that tile's other loops\
     * keep their registers: sl/sh track z's range here (block_ makes relu's of it). */               \
    __attribute__((noinline)) static void tile_relu0_##SUFFIX(const T *restrict a, T *restrict wo, int64_t inner,\
            const int64_t *restrict rows, int64_t so, int64_t si, int64_t r0, int64_t r1, int64_t kk, int64_t tn,\
            const double *restrict Kb, T *restrict zb, double *restrict sb, double *restrict qb,      \
            T *restrict slb, T *restrict shb) {                                                       \
        const int check = 0;                                                                          \
        const T *f = a;                                                                               \
        T z[TILE], sl[TILE], sh[TILE];                                                                \
        double s[TILE], q[TILE], K[TILE];                                                             \
        for (int64_t k = 0; k < TILE; ++k) {                                                          \
            const int in = k < tn;                                                                    \
            z[k] = in ? zb[k] : 0; s[k] = in ? sb[k] : 0; q[k] = in ? qb[k] : 0; K[k] = in ? Kb[k] : 0;\
            sl[k] = in ? slb[k] : (T)INFINITY; sh[k] = in ? shb[k] : -(T)INFINITY;                    \
        }                                                                                             \
        int64_t o = r0 / inner, i = r0 % inner;                                                       \
        if (tn == TILE && wo) { /* a constant trip count: the sums stay in registers */              \
            RELU0_TILE_ROWS(T, TILE, 1)                                                               \
        } else if (tn == TILE) {                                                                      \
            RELU0_TILE_ROWS(T, TILE, 0)                                                               \
        } else if (wo) {                                                                             \
            RELU0_TILE_ROWS(T, tn, 1)                                                                 \
        } else {                                                                                      \
            RELU0_TILE_ROWS(T, tn, 0)                                                                 \
        }                                                                                             \
        for (int64_t k = 0; k < tn; ++k) {                                                            \
            zb[k] = z[k]; sb[k] = s[k]; qb[k] = q[k]; slb[k] = sl[k]; shb[k] = sh[k];                 \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Rows [r0, r1) of columns [kk, kk + tn) (tn <= TILE) finite-only (ELEMENT_FAST), added into the \
     * block's per-column sums z, fl, nw, s, q and range sl/sh: each column row after row as the block's \
     * own loop would (the same values), with the TILE columns' sums in locals that stay in registers \
     * across rows instead of being loaded and stored for every row. Not inlined (inlined, -O3 fuses it \
     * with the block's loops), and the empty asm keeps the compiler from vectorising the loop over rows \
     * (with gathers) instead of the TILE columns. */                                                 \
    __attribute__((noinline)) static void tile_##SUFFIX(const T *restrict a, const T *restrict f,     \
            int64_t inner, const int64_t *restrict rows, int64_t so, int64_t si, int64_t r0, int64_t r1, \
            int64_t kk, int64_t tn, int check, T eps, T lo, T hi, const double *restrict Kb, T *restrict zb, \
            T *restrict flb, T *restrict nwb, double *restrict sb, double *restrict qb, T *restrict slb, \
            T *restrict shb) {                                                                        \
        T z[TILE], fl[TILE], nw[TILE], sl[TILE], sh[TILE];                                            \
        double s[TILE], q[TILE], K[TILE];                                                             \
        for (int64_t k = 0; k < TILE; ++k) {                                                          \
            const int in = k < tn;                                                                    \
            z[k] = in ? zb[k] : 0; fl[k] = in ? flb[k] : 0; nw[k] = in ? nwb[k] : 0;                  \
            s[k] = in ? sb[k] : 0; q[k] = in ? qb[k] : 0; K[k] = in ? Kb[k] : 0;                      \
            sl[k] = in ? slb[k] : (T)INFINITY; sh[k] = in ? shb[k] : -(T)INFINITY;                    \
        }                                                                                             \
        int64_t o = r0 / inner, i = r0 % inner;                                                       \
        if (tn == TILE && !check) {                                                                   \
            for (int64_t r = r0; r < r1; ++r) {                                                       \
                const T *restrict pa = a + ROW(o) + i * si + kk;                                      \
                TILE_AHEAD();                                                                         \
                _Pragma("omp simd")                                                                   \
                for (int64_t k = 0; k < TILE; ++k) {                                                  \
                    T v = TR(pa[k]);                                                                  \
                    ELEMENT_FAST(T, ABS, TMAX, v, v, 0, K[k], z[k], fl[k], nw[k], s[k], q[k], sl[k], sh[k]); \
                }                                                                                     \
                __asm__ volatile(""); /* the loop over rows stays a loop: not vectorised */           \
                if (++i == inner) {                                                                   \
                    i = 0;                                                                            \
                    ++o;                                                                              \
                }                                                                                     \
            }                                                                                         \
        } else if (tn == TILE) {                                                                      \
            for (int64_t r = r0; r < r1; ++r) {                                                       \
                const T *restrict pa = a + ROW(o) + i * si + kk;                                      \
                TILE_AHEAD();                                                                         \
                const T *restrict pf = f + ROW(o) + i * si + kk;                                      \
                _Pragma("omp simd")                                                                   \
                for (int64_t k = 0; k < TILE; ++k) {                                                  \
                    T w = pf[k], v = TR(pa[k]);                                                       \
                    ELEMENT_FAST(T, ABS, TMAX, v, w, 1, K[k], z[k], fl[k], nw[k], s[k], q[k], sl[k], sh[k]); \
                }                                                                                     \
                __asm__ volatile(""); /* the loop over rows stays a loop: not vectorised */           \
                if (++i == inner) {                                                                   \
                    i = 0;                                                                            \
                    ++o;                                                                              \
                }                                                                                     \
            }                                                                                         \
        } else {                                                                                      \
            for (int64_t r = r0; r < r1; ++r) {                                                       \
                const T *restrict pa = a + ROW(o) + i * si + kk;                                      \
                TILE_AHEAD();                                                                         \
                const T *restrict pf = f + ROW(o) + i * si + kk;                                      \
                _Pragma("omp simd")                                                                   \
                for (int64_t k = 0; k < tn; ++k) {                                                    \
                    T w = pf[k], v = TR(pa[k]);                                                       \
                    ELEMENT_FAST(T, ABS, TMAX, v, w, 1, K[k], z[k], fl[k], nw[k], s[k], q[k], sl[k], sh[k]); \
                }                                                                                     \
                __asm__ volatile(""); /* the loop over rows stays a loop: not vectorised */           \
                if (++i == inner) {                                                                   \
                    i = 0;                                                                            \
                    ++o;                                                                              \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
        for (int64_t k = 0; k < tn; ++k) {                                                            \
            zb[k] = z[k]; flb[k] = fl[k]; nwb[k] = nw[k]; sb[k] = s[k]; qb[k] = q[k];                 \
            slb[k] = sl[k]; shb[k] = sh[k];                                                           \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Rows [r0, r1) (at most FLUSH) of the column block: finite-only first, again with the checks if that\
     * came out non-finite; the stretch's sums added into out[k - k0] and its range into l/h. */      \
    static void stretch_cols_##SUFFIX(const T *restrict a, const T *restrict f, T *restrict wo, int64_t outer, int64_t inner,\
                                      const int64_t *restrict rows, int tiles, int64_t so, int64_t si, int64_t k0,\
                                      int64_t nk, T eps, T lo, T hi, const double *restrict K, int64_t r0,\
                                      int64_t r1, Sums *restrict out, T *restrict l, T *restrict h) { \
        const int check = (f != a) | TRANSFORMED, relu0 = RELU0(TRANSFORMED);                         \
        T z[BLOCK], fl[BLOCK], nf[BLOCK], nw[BLOCK], sl[BLOCK], sh[BLOCK], lz[BLOCK], hz[BLOCK];      \
        double s[BLOCK], q[BLOCK];                                                                    \
            for (int pass = 0; pass < 2; ++pass) {                                                    \
                for (int64_t k = 0; k < BLOCK; ++k) {                                                 \
                    z[k] = fl[k] = nf[k] = nw[k] = 0;                                                 \
                    s[k] = q[k] = 0;                                                                  \
                    sl[k] = k < nk ? l[k] : (T)INFINITY;                                              \
                    sh[k] = k < nk ? h[k] : -(T)INFINITY;                                             \
                    lz[k] = (T)INFINITY;                                                              \
                    hz[k] = -(T)INFINITY;                                                             \
                }                                                                                     \
                const int fast0 = pass == 0 && relu0; /* RELU0: lz/hz take z's range */               \
                if (pass == 0 && tiles && r1 - r0 >= TILE_ROWS) { /* finite-only, TILE columns at a time over */ \
                    for (int64_t c = r0; c < r1; c += TILE_ROWS) { /* rows few enough to stay in cache */ \
                        const int64_t e = r1 - c < TILE_ROWS ? r1 : c + TILE_ROWS;                    \
                        for (int64_t t = 0; t < nk; t += TILE)                                        \
                            if (fast0)                                                                \
                                tile_relu0_##SUFFIX(a, wo, inner, rows, so, si, c, e, k0 + t, nk - t < TILE ? nk - t : TILE,\
                                                    K + t, z + t, s + t, q + t, lz + t, hz + t);      \
                            else                                                                      \
                                tile_##SUFFIX(a, f, inner, rows, so, si, c, e, k0 + t, nk - t < TILE ? nk - t : TILE,\
                                              check, eps, lo, hi, K + t, z + t, fl + t, nw + t, s + t, q + t, sl + t,\
                                              sh + t);                                                \
                    }                                                                                 \
                } else {                                                                              \
                    int64_t o = r0 / inner, i = r0 % inner;                                           \
                    for (int64_t r = r0; r < r1; ++r) {                                               \
                        const T *restrict pa = a + ROW(o) + i * si + k0;                              \
                        if (inner == 1 && o + PF_ROWS < outer) /* rows far apart: fetch ahead */      \
                            for (int64_t k = k0; k < k0 + nk; k += 64 / (int64_t)sizeof(T)) {         \
                                __builtin_prefetch(a + AHEAD(o) + k);                                 \
                                if (check) __builtin_prefetch(f + AHEAD(o) + k);                      \
                            }                                                                         \
                        const T *restrict pf = f + ROW(o) + i * si + k0;                              \
                        if (pass == 1) {                                                              \
                            _Pragma("omp simd")                                                       \
                            for (int64_t k = 0; k < nk; ++k) {                                        \
                                T w = pf[k], v = TR(pa[k]);                                           \
                                ELEMENT(T, ABS, TMAX, v, w, K[k], z[k], fl[k], nf[k], s[k], q[k], sl[k], sh[k]); \
                            }                                                                         \
                        } else if (fast0 && wo) { /* relu's values written too (WRITES) */           \
                            T *restrict po = wo + ROW(o) + i * si + k0;                              \
                            if (inner == 1 && o + PF_ROWS < outer) /* its lines owned ahead of the stores */\
                                for (int64_t k = k0; k < k0 + nk; k += 64 / (int64_t)sizeof(T))       \
                                    __builtin_prefetch(wo + AHEAD(o) + k, 1);                         \
                            _Pragma("omp simd")                                                       \
                            for (int64_t k = 0; k < nk; ++k) {                                        \
                                T w = pa[k];                                                          \
                                ELEMENT_RELU0(T, w, K[k], z[k], s[k], q[k], lz[k], hz[k]);            \
                                po[k] = RELU_OF(w);                                                   \
                            }                                                                         \
                        } else if (fast0) {                                                           \
                            _Pragma("omp simd")                                                       \
                            for (int64_t k = 0; k < nk; ++k) {                                        \
                                T w = pa[k];                                                          \
                                ELEMENT_RELU0(T, w, K[k], z[k], s[k], q[k], lz[k], hz[k]);            \
                            }                                                                         \
                        } else if (check) {                                                           \
                            _Pragma("omp simd")                                                       \
                            for (int64_t k = 0; k < nk; ++k) {                                        \
                                T w = pf[k], v = TR(pa[k]);                                           \
                                ELEMENT_FAST(T, ABS, TMAX, v, w, 1, K[k], z[k], fl[k], nw[k], s[k], q[k], sl[k], sh[k]); \
                            }                                                                         \
                        } else {                                                                      \
                            _Pragma("omp simd")                                                       \
                            for (int64_t k = 0; k < nk; ++k) {                                        \
                                T w = pf[k], v = TR(pa[k]);                                           \
                                ELEMENT_FAST(T, ABS, TMAX, v, w, 0, K[k], z[k], fl[k], nw[k], s[k], q[k], sl[k], sh[k]); \
                            }                                                                         \
                        }                                                                             \
                        if (++i == inner) {                                                           \
                            i = 0;                                                                    \
                            ++o;                                                                      \
                        }                                                                             \
                    }                                                                                 \
                }                                                                                     \
                if (pass == 1) break;                                                                 \
                if (fast0) /* zero and flat are one count; relu's range is relu of z's; a -inf in z: again */\
                    for (int64_t k = 0; k < nk; ++k) {                                                \
                        fl[k] = z[k];                                                                 \
                        nw[k] = lz[k] == -(T)INFINITY;                                                \
                        if (lz[k] <= hz[k]) {                                                         \
                            const T rl = RELU_OF(lz[k]), rh = RELU_OF(hz[k]);                         \
                            sl[k] = rl < sl[k] ? rl : sl[k];                                          \
                            sh[k] = rh > sh[k] ? rh : sh[k];                                          \
                        }                                                                             \
                    }                                                                                 \
                int finite = 1;                                                                       \
                for (int64_t k = 0; k < nk; ++k)                                                      \
                    finite &= (s[k] - s[k] == 0) & (q[k] - q[k] == 0) & (nw[k] == 0);                 \
                if (finite) break;                                                                    \
            }                                                                                         \
            for (int64_t k = 0; k < nk; ++k) {                                                        \
                out[k].z += z[k]; out[k].fl += fl[k]; out[k].nf += nf[k];                             \
                out[k].s += s[k]; out[k].q += q[k];                                                   \
                l[k] = sl[k];                                                                         \
                h[k] = sh[k];                                                                         \
            }                                                                                         \
    }                                                                                                 \
                                                                                                      \
    /* One block of the column kernel: rows (o, i) at a + o*so + i*si, of which columns [k0, k0 + nk) are\
     * read, column k shifted by K[k - k0]; stretch after stretch of FLUSH rows (`stretch_cols`), each\
     * column's sums into out[k - k0] and its range into l/h; a column's result does not depend on the\
     * others. With split > 1 (a batch whose rows are too narrow to share by channels) the stretches are\
     * spread over `split` threads, each into its own sums, added in stretch order after: the same sums\
     * as one thread's, bit for bit. */                                                               \
    static void block_##SUFFIX(const T *restrict a, const T *restrict f, T *restrict wo, int64_t outer, int64_t inner,\
                               const int64_t *restrict rows, int tiles, int split, int64_t so, int64_t si,\
                               int64_t k0, int64_t nk, T eps, T lo, T hi, const double *restrict K,   \
                               Sums *restrict out, T *restrict l, T *restrict h) {                    \
        const int64_t total = outer * inner, stretches = (total + FLUSH - 1) / FLUSH;                 \
        for (int64_t k = 0; k < nk; ++k) {                                                            \
            out[k] = (Sums){0, 0, 0, 0, 0};                                                           \
            l[k] = (T)INFINITY;                                                                       \
            h[k] = -(T)INFINITY;                                                                      \
        }                                                                                             \
        Sums *ps = NULL;                                                                              \
        T *pr = NULL;                                                                                 \
        if (split > 1 && stretches > 1) {                                                             \
            ps = (Sums *)malloc((size_t)(stretches * nk) * sizeof(Sums));                             \
            pr = (T *)malloc((size_t)(2 * stretches * nk) * sizeof(T));                               \
        }                                                                                             \
        if (!ps || !pr) { /* one thread (or no memory for the stretches' sums) */                     \
            free(ps);                                                                                 \
            free(pr);                                                                                 \
            for (int64_t r0 = 0; r0 < total; r0 += FLUSH)                                             \
                stretch_cols_##SUFFIX(a, f, wo, outer, inner, rows, tiles, so, si, k0, nk, eps, lo, hi, K, r0,\
                                      total - r0 < FLUSH ? total : r0 + FLUSH, out, l, h);            \
            return;                                                                                   \
        }                                                                                             \
        _Pragma("omp parallel for num_threads(split) schedule(static)")                               \
        for (int64_t st = 0; st < stretches; ++st) {                                                  \
            Sums *o = ps + st * nk;                                                                   \
            T *sl = pr + 2 * st * nk, *sh = sl + nk;                                                  \
            for (int64_t k = 0; k < nk; ++k) {                                                        \
                o[k] = (Sums){0, 0, 0, 0, 0};                                                         \
                sl[k] = (T)INFINITY;                                                                  \
                sh[k] = -(T)INFINITY;                                                                 \
            }                                                                                         \
            const int64_t r0 = st * FLUSH;                                                            \
            stretch_cols_##SUFFIX(a, f, wo, outer, inner, rows, tiles, so, si, k0, nk, eps, lo, hi, K, r0,\
                                  total - r0 < FLUSH ? total : r0 + FLUSH, o, sl, sh);                \
        }                                                                                             \
        for (int64_t st = 0; st < stretches; ++st)                                                    \
            for (int64_t k = 0; k < nk; ++k) {                                                        \
                const Sums *o = ps + st * nk + k;                                                     \
                const T sl = pr[2 * st * nk + k], sh = pr[(2 * st + 1) * nk + k];                     \
                out[k].z += o->z; out[k].fl += o->fl; out[k].nf += o->nf; out[k].s += o->s; out[k].q += o->q;\
                l[k] = sl < l[k] ? sl : l[k];                                                         \
                h[k] = sh > h[k] ? sh : h[k];                                                         \
            }                                                                                         \
        free(ps);                                                                                     \
        free(pr);                                                                                     \
    }                                                                                                 \
                                                                                                      \
    /* Channels [c, c + m), each `group` consecutive columns (m = 1 where group > BLOCK): each        \
     * channel's columns' sums added in column order into sums[j], its range into l[j]/h[j]. */       \
    static void columns_##SUFFIX(const T *a, const T *f, T *wo, int64_t outer, int64_t inner, int64_t so,\
                                 const int64_t *rows, int tiles, int split,                           \
                                 int64_t si, int64_t c, int64_t m, int64_t group, T eps, T lo, T hi,  \
                                 const double *K, Sums *sums, T *l, T *h) {                           \
        double kc[BLOCK];                                                                             \
        Sums cs[BLOCK];                                                                               \
        T cl[BLOCK], ch[BLOCK];                                                                       \
        for (int64_t j = 0; j < m; ++j) {                                                             \
            sums[j] = (Sums){0, 0, 0, 0, 0};                                                          \
            l[j] = (T)INFINITY;                                                                       \
            h[j] = -(T)INFINITY;                                                                      \
        }                                                                                             \
        for (int64_t k0 = c * group; k0 < (c + m) * group; k0 += BLOCK) {                             \
            const int64_t nk = (c + m) * group - k0 < BLOCK ? (c + m) * group - k0 : BLOCK;           \
            /* columns [k, k + n) of the block are channel c + j's: a run per channel, whose column sums \
             * are added in column order in registers (not through memory, column after column) */    \
            const int64_t j0 = k0 / group - c, first = group - k0 % group;                            \
            for (int64_t k = 0, j = j0, n = first; k < nk; k += n, ++j, n = group)                    \
                for (int64_t e = k; e < k + n && e < nk; ++e) kc[e] = K[j];                           \
            block_##SUFFIX(a, f, wo, outer, inner, rows, tiles, split, so, si, k0, nk, eps, lo, hi, kc, cs, cl, ch);\
            for (int64_t k = 0, j = j0, n = first; k < nk; k += n, ++j, n = group) {                  \
                Sums t = sums[j];                                                                     \
                T tl = l[j], th = h[j];                                                               \
                for (int64_t e = k; e < k + n && e < nk; ++e) {                                       \
                    t.z += cs[e].z; t.fl += cs[e].fl; t.nf += cs[e].nf; t.s += cs[e].s; t.q += cs[e].q; \
                    if (cl[e] < tl) tl = cl[e];                                                       \
                    if (ch[e] > th) th = ch[e];                                                       \
                }                                                                                     \
                sums[j] = t;                                                                          \
                l[j] = tl;                                                                            \
                h[j] = th;                                                                            \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Columns: channels [c0, c1), each `group` consecutive columns of rows (o, i); blocks hold whole \
     * channels (as many as fit in BLOCK columns), or BLOCK columns of one channel at a time. */      \
    static void cols_##SUFFIX(const T *a, const T *f, T *wo, int64_t outer, int64_t inner, int64_t so,\
                              const int64_t *rows, int tiles, int split,                              \
                              int64_t si, int64_t c0, int64_t c1, int64_t group, T eps, T lo, T hi,   \
                              int64_t C, double *acc) {                                               \
        const int64_t per = group <= BLOCK ? BLOCK / group : 1;                                       \
        double K[BLOCK];                                                                              \
        Sums sums[BLOCK];                                                                             \
        T l[BLOCK], h[BLOCK];                                                                         \
        for (int64_t c = c0; c < c1; c += per) {                                                      \
            const int64_t m = c1 - c < per ? c1 - c : per;                                            \
            for (int64_t j = 0; j < m; ++j)                                                           \
                K[j] = first_##SUFFIX(a, outer, inner, so, rows, si, (c + j) * group, group);         \
            columns_##SUFFIX(a, f, wo, outer, inner, so, rows, tiles, split, si, c, m, group, eps, lo, hi, K, sums, l, h);\
            const double seen = (double)outer * (double)inner * (double)group;                        \
            int again = 0;                                                                            \
            for (int64_t j = 0; j < m; ++j)                                                           \
                if (far_shift(seen - sums[j].nf, sums[j].s, sums[j].q)) {                             \
                    K[j] += sums[j].s / (seen - sums[j].nf);                                          \
                    again = 1;                                                                        \
                }                                                                                     \
            if (again) /* the other channels' sums come out the same again */                         \
                columns_##SUFFIX(a, f, wo, outer, inner, so, rows, tiles, split, si, c, m, group, eps, lo, hi, K, sums, l, h);\
            for (int64_t j = 0; j < m; ++j) {                                                         \
                acc[R_ZERO * C + c + j] += sums[j].z;                                                 \
                acc[R_FLAT * C + c + j] += sums[j].fl;                                                \
                merge_moments(acc, C, c + j, seen - sums[j].nf, K[j], sums[j].s, sums[j].q);          \
                if (l[j] < acc[R_MIN * C + c + j]) acc[R_MIN * C + c + j] = l[j];                     \
                if (h[j] > acc[R_MAX * C + c + j]) acc[R_MAX * C + c + j] = h[j];                     \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Which kernel reads this layout: 0 rows, 1 columns, 2 columns grouped per channel, -1 none. */  \
    static int layout_##SUFFIX(int64_t outer, int64_t inner, int64_t sc, int64_t si, int cached) {    \
        if (si == 1 && (inner >= LONG_ROW || (cached && inner >= LANES) || (outer < 8 && inner >= 32))) \
            return 0;                                                                                 \
        if (sc == 1) return 1;                                                                        \
        if ((si == 1 || inner == 1) && sc == inner) return 2;                                         \
        if (si == 1) return 0;                                                                        \
        return -1;                                                                                    \
    }                                                                                                 \
                                                                                                      \
    static void channels_##SUFFIX(int kind, int tiles, int split, const T *a, const T *f, T *wo, int64_t outer,\
                                  const int64_t *rows,                                                \
                                  int64_t C,                                                          \
                                  int64_t inner, int64_t so, int64_t sc, int64_t si, T eps, T lo,     \
                                  T hi, double *acc, int64_t c0, int64_t c1) {                        \
        if (c1 <= c0) return;                                                                         \
        if (kind == 0)                                                                                \
            rows_##SUFFIX(a, f, wo, outer, C, inner, rows, tiles, so, sc, c0, c1, eps, lo, hi, acc);        \
        else if (kind == 1)                                                                           \
            cols_##SUFFIX(a, f, wo, outer, inner, so, rows, tiles, split, si, c0, c1, 1, eps, lo, hi, C, acc);\
        else                                                                                          \
            cols_##SUFFIX(a, f, wo, outer, 1, so, rows, tiles, split, 0, c0, c1, inner, eps, lo, hi, C, acc);\
    }                                                                                                 \
                                                                                                      \
    /* Adds channels [c0, c1) of the batch (all of them: 0, C), split over `threads` OpenMP threads   \
     * by channel ranges (each thread writes only its own channels); the element counts are added     \
     * by the call that has c0 == 0, so that ranges added by separate calls count once. Built         \
     * without OpenMP the ranges simply run one after the other. Returns 0; 1 when the strides fit    \
     * no kernel (nothing written: the caller passes contiguous copies); 2 for a bad range. */        \
    static int stats_rows_##SUFFIX(const T *a, const T *f, T *wo, int64_t outer, const int64_t *rows, int64_t C,\
                                   int64_t inner, int64_t so, int64_t sc, int64_t si, double eps, double lo, \
                                   double hi, int count_flat, double *acc, double *counts,            \
                                   int64_t c0, int64_t c1, int threads) {                             \
        if (!f) f = a;                                                                                \
        if (c0 < 0 || c1 > C || c0 > c1) return 2;                                                    \
        if (wo && (!RELU0(TRANSFORMED) || rows || c0 != 0 || c1 != C || wo == a)) return 3; /* WRITES */ \
        if (outer > 0 && c1 > c0 && inner > 0) {                                                      \
            /* the batch's bytes read: the tiled column pass and the short-row lanes (channel by channel,  \
             * not in memory order) only pay while they stay in cache */                              \
            const int tiles = (double)outer * (double)inner * (double)C * sizeof(T) * (f != a ? 2 : 1) <= TILE_BYTES; \
            const int kind = layout_##SUFFIX(outer, inner, sc, si, tiles);                            \
            if (kind < 0) return 1;                                                                   \
            /* WRITES where every element is read once: not where a batch too large for the tiles is   \
             * read a block of BLOCK columns at a time down its rows, the rows again for each block (the \
             * output's lines, written a block at a time, then cost more than torch's pass: measured) */\
            if (wo && kind > 0 && !tiles && (kind == 1 ? C : C * inner) > BLOCK) return 3;            \
            const int64_t n = c1 - c0;                                                                \
            /* channels-last rows split by channels: each thread's share of a row at least NARROW bytes  \
             * (narrower shares have both threads pull the same cache lines: slower than one thread);   \
             * narrower rows are split by stretches of FLUSH rows instead (`block`) */                  \
            const int narrow = kind == 1 && n * (int64_t)sizeof(T) < NARROW * (int64_t)threads;        \
            const int parts = threads < 1 || narrow ? 1 : (n < threads ? (int)n : threads);           \
            if (parts > 1) {                                                                          \
                _Pragma("omp parallel for num_threads(parts) schedule(static)")                       \
                for (int t = 0; t < parts; ++t)                                                       \
                    channels_##SUFFIX(kind, tiles, 1, a, f, wo, outer, rows, C, inner, so, sc, si, (T)eps, (T)lo, (T)hi,\
                                      acc, c0 + n * t / parts, c0 + n * (t + 1) / parts);             \
            } else /* no region around it: block's own (narrow rows) is then the top level, torch's threads */\
                channels_##SUFFIX(kind, tiles, narrow ? threads : 1, a, f, wo, outer, rows, C, inner, so, sc, si, (T)eps,\
                                  (T)lo, (T)hi, acc, c0, c1);                                         \
        }                                                                                             \
        if (c0 == 0) {                                                                                \
            counts[0] += (double)(outer * inner);                                                     \
            if (count_flat) counts[1] += (double)(outer * inner);                                     \
        }                                                                                             \
        return 0;                                                                                     \
    }

/* The exported entry and the flat-only pass, once per input type (no transform). */
#define DEFINE_ENTRY_AND_FLAT(T, TMAX, ABS, SUFFIX)                                                   \
    /* Outer row o of the batch starts at element rows[o] (a padding mask's valid rows, read in place) \
     * or, without rows, at o * so. */                                                                \
    int deadneuron_stats_##SUFFIX(const T *a, const T *f, int64_t outer, int64_t C, int64_t inner,    \
                                  int64_t so, int64_t sc, int64_t si, double eps, double lo,          \
                                  double hi, int count_flat, double *acc, double *counts,             \
                                  int64_t c0, int64_t c1, int threads) {                              \
        return stats_rows_##SUFFIX(a, f, NULL, outer, NULL, C, inner, so, sc, si, eps, lo, hi, count_flat, acc, counts, \
                                   c0, c1, threads);                                                  \
    }                                                                                                 \
    /* Flat counts only (what a pre-hook takes before an in-place call overwrites z): channels        \
     * [c0, c1) of z added into flat[c]. Long contiguous runs (si == 1) channel by channel; else, where \
     * channels are contiguous (sc == 1) or each outer row is one contiguous run of channels x inner  \
     * (sc == inner), rows of columns a block at a time (column k of channel k / group) with a counter \
     * per column; any other strides element by element. Counts in the input's precision over at most \
     * FLUSH elements (exact), then in double. */                                                     \
    static void flat_runs_##SUFFIX(const T *z, int64_t outer, int64_t inner, int64_t so, int64_t sc,  \
                                 int64_t si, T lo, T hi, double *flat, int64_t c0, int64_t c1) {      \
        for (int64_t o = 0; o < outer; ++o)                                                           \
            for (int64_t c = c0; c < c1; ++c) {                                                       \
                const T *restrict p = z + o * so + c * sc;                                            \
                double total = 0;                                                                     \
                for (int64_t i0 = 0; i0 < inner; i0 += FLUSH) {                                       \
                    const int64_t n = inner - i0 < FLUSH ? inner - i0 : FLUSH;                        \
                    T cnt = 0;                                                                        \
                    if (si == 1) {                                                                    \
                        _Pragma("omp simd reduction(+ : cnt)")                                        \
                        for (int64_t i = 0; i < n; ++i) {                                             \
                            T w = p[i0 + i];                                                          \
                            cnt += FLAT_ONE(T, ABS, TMAX, w);                                         \
                        }                                                                             \
                    } else {                                                                          \
                        for (int64_t i = 0; i < n; ++i) {                                             \
                            T w = p[(i0 + i) * si];                                                   \
                            cnt += FLAT_ONE(T, ABS, TMAX, w);                                         \
                        }                                                                             \
                    }                                                                                 \
                    total += cnt;                                                                     \
                }                                                                                     \
                flat[c] += total;                                                                     \
            }                                                                                         \
    }                                                                                                 \
                                                                                                      \
    /* One row's columns into their counters. Not inlined: -O3's unroll-and-jam would fuse it with the \
     * loop over rows and leave it unvectorised (ten times slower). */                                \
    __attribute__((noinline)) static void flat_row_##SUFFIX(const T *restrict p, int64_t nk, T lo, T hi, \
                                                           T *restrict cnt) {                         \
        _Pragma("omp simd")                                                                           \
        for (int64_t k = 0; k < nk; ++k) {                                                            \
            T w = p[k];                                                                               \
            cnt[k] += FLAT_ONE(T, ABS, TMAX, w);                                                      \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Rows r = (o, i) at z + o*so + i*si (inner 1 and si 0 for whole outer rows), columns [k0, k1)   \
     * contiguous in each; column k belongs to channel k / group. */                                  \
    static void flat_cols_##SUFFIX(const T *z, int64_t outer, int64_t inner, int64_t so, int64_t si,  \
                                 int64_t k0, int64_t k1, int64_t group, T lo, T hi, double *flat) {   \
        T cnt[FLAT_BLOCK];                                                                            \
        double sum[FLAT_BLOCK];                                                                       \
        const int64_t rows = outer * inner;                                                           \
        for (int64_t b = k0; b < k1; b += FLAT_BLOCK) {                                               \
            const int64_t nk = k1 - b < FLAT_BLOCK ? k1 - b : FLAT_BLOCK;                             \
            for (int64_t k = 0; k < nk; ++k) sum[k] = 0;                                              \
            for (int64_t r0 = 0; r0 < rows; r0 += FLUSH) {                                            \
                const int64_t r1 = rows - r0 < FLUSH ? rows : r0 + FLUSH;                             \
                for (int64_t k = 0; k < nk; ++k) cnt[k] = 0;                                          \
                for (int64_t r = r0; r < r1; ++r)                                                     \
                    flat_row_##SUFFIX(z + (r / inner) * so + (r % inner) * si + b, nk, lo, hi, cnt);  \
                for (int64_t k = 0; k < nk; ++k) sum[k] += cnt[k];                                    \
            }                                                                                         \
            for (int64_t k = 0; k < nk; ++k) flat[(b + k) / group] += sum[k];                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    static void flat_##SUFFIX(const T *z, int64_t outer, int64_t inner, int64_t so, int64_t sc, int64_t si, \
                            T lo, T hi, double *flat, int64_t c0, int64_t c1) {                       \
        if (si == 1 && inner >= 64)                                                                   \
            flat_runs_##SUFFIX(z, outer, inner, so, sc, 1, lo, hi, flat, c0, c1);                     \
        else if (sc == 1)                                                                             \
            flat_cols_##SUFFIX(z, outer, inner, so, si, c0, c1, 1, lo, hi, flat);                     \
        else if ((si == 1 || inner == 1) && sc == inner)                                              \
            flat_cols_##SUFFIX(z, outer, 1, so, 0, c0 * inner, c1 * inner, inner, lo, hi, flat);      \
        else                                                                                          \
            flat_runs_##SUFFIX(z, outer, inner, so, sc, si, lo, hi, flat, c0, c1);                    \
    }                                                                                                 \
                                                                                                      \
    static int flat_all_##SUFFIX(const T *z, int64_t outer, int64_t C, int64_t inner, int64_t so,     \
                                 int64_t sc, int64_t si, double lo, double hi, double *flat,          \
                                 double *counts, int threads) {                                       \
        if (outer > 0 && C > 0 && inner > 0) {                                                        \
            const int parts = threads < 1 ? 1 : (C < threads ? (int)C : threads);                     \
            _Pragma("omp parallel for num_threads(parts) schedule(static) if (parts > 1)")            \
            for (int t = 0; t < parts; ++t)                                                           \
                flat_##SUFFIX(z, outer, inner, so, sc, si, (T)lo, (T)hi, flat,                        \
                              C * t / parts, C * (t + 1) / parts);                                    \
        }                                                                                             \
        counts[1] += (double)(outer * inner);                                                         \
        return 0;                                                                                     \
    }
/* What the statistics are taken of: the input itself, or relu of it (torch.relu's values exactly: x < 0
 * gives 0; -0.0 and NaN pass through). The relu variants read the pre-activation z once and take the
 * statistics of relu(z) with the flat region tested on z, where the plain kernel would read both z and
 * the output; they always run the finiteness checks on z (z = -inf gives a finite 0 that is not flat). */
#define SAME(x) (x)
#define RELU_OF(x) ((x) < 0 ? 0 : (x))
DEFINE_KERNELS(float, FLT_MAX, fabsf, f32, SAME, 0)
DEFINE_KERNELS(double, DBL_MAX, fabs, f64, SAME, 0)
DEFINE_KERNELS(float, FLT_MAX, fabsf, f32_relu, RELU_OF, 1)
DEFINE_KERNELS(double, DBL_MAX, fabs, f64_relu, RELU_OF, 1)
DEFINE_ENTRY_AND_FLAT(float, FLT_MAX, fabsf, f32)
DEFINE_ENTRY_AND_FLAT(double, DBL_MAX, fabs, f64)

/* A call prepared once per site and layout (deadneuron/_native.py `Planned`): the view's shape and
 * strides, thresholds and accumulator pointers packed in one struct, so that a call passes three
 * pointers. mode 0: the statistics (deadneuron_stats_*, every channel) into the (7, C) `acc`; mode 1:
 * the flat counts only, `acc` then pointing at C doubles (the accumulator's flat row), the elements
 * tested added to counts[1]. dtype 0: float32, 1: float64. Returns as deadneuron_stats_*. */
typedef struct {
    int64_t outer, C, inner, so, sc, si;
    double eps, lo, hi;
    double *acc, *counts;
    int32_t dtype, mode, count_flat, threads;
    const int64_t *rows; /* NULL, or the element offsets of the `outer` rows read (statistics only) */
    int32_t relu, unused; /* relu 1: the statistics of relu(a), flat tested on a (mode 0 only) */
} deadneuron_plan;

int deadneuron_planned(const void *a, const void *f, const deadneuron_plan *p) {
    if (p->mode == 1) {
        if (p->dtype == 0)
            return flat_all_f32((const float *)a, p->outer, p->C, p->inner, p->so, p->sc, p->si, p->lo, p->hi,
                                p->acc, p->counts, p->threads);
        return flat_all_f64((const double *)a, p->outer, p->C, p->inner, p->so, p->sc, p->si, p->lo, p->hi,
                            p->acc, p->counts, p->threads);
    }
    if (p->relu) { /* f: NULL, or where relu(a) is written (WRITES) */
        if (p->dtype == 0)
            return stats_rows_f32_relu((const float *)a, (const float *)a, (float *)f, p->outer, p->rows, p->C, p->inner, p->so,
                                       p->sc, p->si, p->eps, p->lo, p->hi, p->count_flat, p->acc, p->counts, 0, p->C,
                                       p->threads);
        return stats_rows_f64_relu((const double *)a, (const double *)a, (double *)f, p->outer, p->rows, p->C, p->inner, p->so,
                                   p->sc, p->si, p->eps, p->lo, p->hi, p->count_flat, p->acc, p->counts, 0, p->C,
                                   p->threads);
    }
    if (p->dtype == 0)
        return stats_rows_f32((const float *)a, (const float *)f, NULL, p->outer, p->rows, p->C, p->inner, p->so, p->sc,
                              p->si, p->eps, p->lo, p->hi, p->count_flat, p->acc, p->counts, 0, p->C, p->threads);
    return stats_rows_f64((const double *)a, (const double *)f, NULL, p->outer, p->rows, p->C, p->inner, p->so, p->sc,
                          p->si, p->eps, p->lo, p->hi, p->count_flat, p->acc, p->counts, 0, p->C, p->threads);
}

/* Gradient flow (deadneuron/gradflow.py): per channel c of one (outer, C, inner) batch with element
 * strides (so, sc, si), the float64 sum of |g| added into abs_sum[c] and the count of g != 0 into
 * nonzero[c] (nonzero NULL: the |g| sums alone, what the tau-dormant score's sum |a| takes). A channel
 * with a NaN in the batch gets NaN for both of that batch's sums, as the torch reference
 * (`deadneuron.gradflow._channel_sums`); +-Inf adds Inf to the sum and counts as non-zero. |g| is summed
 * in double; the counts are kept in the input's precision over at most FLUSH elements (exact), then added
 * in double. Layouts: channel by channel over contiguous runs (si == 1, rows read in memory order, a
 * chunk of channels at a time); columns (sc == 1, or whole outer rows of channels x inner, column k
 * belonging to channel k / group) with a sum per column; any other strides element by element. Each
 * channel is summed in an order that depends on the layout alone, so the split over threads (by channel
 * ranges, as the statistics kernel) does not change the result. */
#define FLOW_BLOCK 64 /* columns per block of the column loop: its sums stay in L1 */
#define FLOW_TILE 32  /* columns of a block summed together in registers */

/* A batch's sums of one channel into the accumulators (NaN in the batch: both NaN). */
static void flow_finish(double *abs_sum, double *nonzero, double s, double n) {
    *abs_sum += s;
    if (nonzero) *nonzero += s == s ? n : (double)NAN;
}

/* Rows r0 .. r1 - 1 of a tile, p pointing at the tile's first column in each; the empty asm keeps the
 * loop over rows a loop (as in tile_*: else -O3 vectorises it with gathers instead of the columns). */
#define FLOW_ROWS(T, BODY)                                                                             \
    for (int64_t r = r0; r < r1; ++r) {                                                               \
        const T *restrict p = g + ROW(o) + i * si + kk;                                               \
        BODY                                                                                          \
        __asm__ volatile("");                                                                         \
        if (++i == inner) {                                                                           \
            i = 0;                                                                                    \
            ++o;                                                                                      \
        }                                                                                             \
    }

#define DEFINE_FLOW(T, ABS, SUFFIX)                                                                   \
    /* A run of n contiguous elements into *s and *nz. */                                             \
    static void flow_run_##SUFFIX(const T *restrict p, int64_t n, int count, double *s, double *nz) { \
        for (int64_t i0 = 0; i0 < n; i0 += FLUSH) {                                                   \
            const int64_t m = n - i0 < FLUSH ? n - i0 : FLUSH;                                        \
            const T *restrict q = p + i0;                                                             \
            double a = 0;                                                                             \
            T c = 0;                                                                                  \
            if (count) {                                                                              \
                _Pragma("omp simd reduction(+ : a, c)")                                               \
                for (int64_t i = 0; i < m; ++i) {                                                     \
                    const T v = q[i];                                                                 \
                    a += (double)ABS(v);                                                              \
                    c += v != 0 ? (T)1 : (T)0;                                                        \
                }                                                                                     \
            } else {                                                                                  \
                _Pragma("omp simd reduction(+ : a)")                                                  \
                for (int64_t i = 0; i < m; ++i) a += (double)ABS(q[i]);                               \
            }                                                                                         \
            *s += a;                                                                                  \
            *nz += (double)c;                                                                         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Channels [c0, c1), runs of `inner` elements (si == 1), ROW_CHANNELS channels at a time read    \
     * row after row in memory order. */                                                              \
    static void flow_rows_##SUFFIX(const T *g, int64_t outer, int64_t inner, int64_t so, const int64_t *rows, \
                                   int64_t sc, int64_t c0, int64_t c1, int count, double *abs_sum,    \
                                   double *nonzero) {                                                 \
        double s[ROW_CHANNELS], n[ROW_CHANNELS];                                                      \
        for (int64_t c = c0; c < c1; c += ROW_CHANNELS) {                                             \
            const int64_t m = c1 - c < ROW_CHANNELS ? c1 - c : ROW_CHANNELS;                          \
            for (int64_t j = 0; j < m; ++j) s[j] = n[j] = 0;                                          \
            for (int64_t o = 0; o < outer; ++o)                                                       \
                for (int64_t j = 0; j < m; ++j)                                                       \
                    flow_run_##SUFFIX(g + ROW(o) + (c + j) * sc, inner, count, s + j, n + j);         \
            for (int64_t j = 0; j < m; ++j)                                                           \
                flow_finish(abs_sum + c + j, nonzero ? nonzero + c + j : NULL, s[j], n[j]);           \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Rows [r0, r1) of columns [kk, kk + tn) (tn <= FLOW_TILE) added into sb[k] and cb[k], the tile's \
     * sums kept in registers across rows (a whole tile's: the partial tile is plain). Not inlined: else \
     * -O3 fuses it with the block's loops. */                                                        \
    __attribute__((noinline)) static void flow_tile_##SUFFIX(const T *restrict g, int64_t inner,      \
            const int64_t *restrict rows, int64_t so, int64_t si, int64_t r0, int64_t r1, int64_t kk,  \
            int64_t tn, int count, double *restrict sb, T *restrict cb) {                             \
        double s[FLOW_TILE];                                                                          \
        T c[FLOW_TILE];                                                                               \
        for (int64_t k = 0; k < FLOW_TILE; ++k) {                                                     \
            s[k] = k < tn ? sb[k] : 0;                                                                \
            c[k] = k < tn ? cb[k] : 0;                                                                \
        }                                                                                             \
        int64_t o = r0 / inner, i = r0 % inner;                                                       \
        if (tn == FLOW_TILE && count) {                                                               \
            FLOW_ROWS(T, _Pragma("omp simd") for (int64_t k = 0; k < FLOW_TILE; ++k) {                \
                const T v = p[k];                                                                     \
                s[k] += (double)ABS(v);                                                               \
                c[k] += v != 0 ? (T)1 : (T)0;                                                         \
            })                                                                                        \
        } else if (tn == FLOW_TILE) {                                                                 \
            FLOW_ROWS(T, _Pragma("omp simd") for (int64_t k = 0; k < FLOW_TILE; ++k) s[k] += (double)ABS(p[k]);) \
        } else {                                                                                      \
            FLOW_ROWS(T, for (int64_t k = 0; k < tn; ++k) {                                           \
                const T v = p[k];                                                                     \
                s[k] += (double)ABS(v);                                                               \
                c[k] += v != 0 ? (T)1 : (T)0;                                                         \
            })                                                                                        \
        }                                                                                             \
        for (int64_t k = 0; k < tn; ++k) {                                                            \
            sb[k] = s[k];                                                                             \
            cb[k] = c[k];                                                                             \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Rows r = (o, i) at g + ROW(o) + i*si, columns [k0, k0 + nk) (contiguous in each row): each     \
     * column's sums into s[k], n[k]; TILE_ROWS rows at a time (they stay in cache across the tiles). */ \
    static void flow_block_##SUFFIX(const T *g, int64_t outer, int64_t inner, int64_t so, const int64_t *rows, \
                                    int64_t si, int64_t k0, int64_t nk, int count, double *restrict s, \
                                    double *restrict n) {                                             \
        T cnt[FLOW_BLOCK];                                                                            \
        const int64_t total = outer * inner;                                                          \
        for (int64_t k = 0; k < nk; ++k) s[k] = n[k] = 0;                                             \
        for (int64_t r0 = 0; r0 < total; r0 += FLUSH) {                                               \
            const int64_t r1 = total - r0 < FLUSH ? total : r0 + FLUSH;                               \
            for (int64_t k = 0; k < nk; ++k) cnt[k] = 0;                                              \
            for (int64_t t0 = r0; t0 < r1; t0 += TILE_ROWS)                                           \
                for (int64_t kk = 0; kk < nk; kk += FLOW_TILE)                                        \
                    flow_tile_##SUFFIX(g, inner, rows, so, si, t0, r1 - t0 < TILE_ROWS ? r1 : t0 + TILE_ROWS, \
                                       k0 + kk, nk - kk < FLOW_TILE ? nk - kk : FLOW_TILE, count, s + kk, \
                                       cnt + kk);                                                     \
            for (int64_t k = 0; k < nk; ++k) n[k] += (double)cnt[k];                                  \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Channels [c0, c1), each `group` consecutive columns: blocks hold whole channels (as many as fit \
     * in FLOW_BLOCK columns) or FLOW_BLOCK columns of one channel; a channel's column sums are added \
     * in column order. */                                                                            \
    static void flow_cols_##SUFFIX(const T *g, int64_t outer, int64_t inner, int64_t so, const int64_t *rows, \
                                   int64_t si, int64_t c0, int64_t c1, int64_t group, int count,      \
                                   double *abs_sum, double *nonzero) {                                \
        double bs[FLOW_BLOCK], bn[FLOW_BLOCK], cs[FLOW_BLOCK], cn[FLOW_BLOCK];                        \
        const int64_t per = group <= FLOW_BLOCK ? FLOW_BLOCK / group : 1;                             \
        for (int64_t c = c0; c < c1; c += per) {                                                      \
            const int64_t m = c1 - c < per ? c1 - c : per, end = (c + m) * group;                     \
            for (int64_t j = 0; j < m; ++j) cs[j] = cn[j] = 0;                                        \
            for (int64_t k0 = c * group; k0 < end; k0 += FLOW_BLOCK) {                                \
                const int64_t nk = end - k0 < FLOW_BLOCK ? end - k0 : FLOW_BLOCK;                     \
                flow_block_##SUFFIX(g, outer, inner, so, rows, si, k0, nk, count, bs, bn);            \
                for (int64_t k = 0; k < nk; ++k) {                                                    \
                    const int64_t j = (k0 + k) / group - c;                                           \
                    cs[j] += bs[k];                                                                   \
                    cn[j] += bn[k];                                                                   \
                }                                                                                     \
            }                                                                                         \
            for (int64_t j = 0; j < m; ++j)                                                           \
                flow_finish(abs_sum + c + j, nonzero ? nonzero + c + j : NULL, cs[j], cn[j]);         \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    /* Any strides, element by element. */                                                           \
    static void flow_any_##SUFFIX(const T *g, int64_t outer, int64_t inner, int64_t so, const int64_t *rows, \
                                  int64_t sc, int64_t si, int64_t c0, int64_t c1, double *abs_sum,    \
                                  double *nonzero) {                                                  \
        for (int64_t c = c0; c < c1; ++c) {                                                           \
            double s = 0, n = 0;                                                                      \
            for (int64_t o = 0; o < outer; ++o)                                                       \
                for (int64_t i = 0; i < inner; ++i) {                                                 \
                    const T v = g[ROW(o) + c * sc + i * si];                                          \
                    s += (double)ABS(v);                                                              \
                    n += v != 0 ? 1.0 : 0.0;                                                          \
                }                                                                                     \
            flow_finish(abs_sum + c, nonzero ? nonzero + c : NULL, s, n);                             \
        }                                                                                             \
    }                                                                                                 \
                                                                                                      \
    static void flow_channels_##SUFFIX(const T *g, int64_t outer, int64_t inner, int64_t so,          \
                                       const int64_t *rows, int64_t sc, int64_t si, int64_t c0,       \
                                       int64_t c1, double *abs_sum, double *nonzero) {                \
        const int count = nonzero != NULL;                                                            \
        if (c1 <= c0) return;                                                                         \
        if (si == 1 && (inner >= 64 || (outer < 8 && inner >= 16)))                                   \
            flow_rows_##SUFFIX(g, outer, inner, so, rows, sc, c0, c1, count, abs_sum, nonzero);       \
        else if (sc == 1)                                                                             \
            flow_cols_##SUFFIX(g, outer, inner, so, rows, si, c0, c1, 1, count, abs_sum, nonzero);    \
        else if ((si == 1 || inner == 1) && sc == inner)                                              \
            flow_cols_##SUFFIX(g, outer, 1, so, rows, 0, c0, c1, inner, count, abs_sum, nonzero);     \
        else if (si == 1)                                                                             \
            flow_rows_##SUFFIX(g, outer, inner, so, rows, sc, c0, c1, count, abs_sum, nonzero);       \
        else                                                                                          \
            flow_any_##SUFFIX(g, outer, inner, so, rows, sc, si, c0, c1, abs_sum, nonzero);           \
    }                                                                                                 \
                                                                                                      \
    static void flow_all_##SUFFIX(const T *g, int64_t outer, int64_t C, int64_t inner, int64_t so,    \
                                  const int64_t *rows, int64_t sc, int64_t si, double *abs_sum,       \
                                  double *nonzero, int threads) {                                     \
        if (outer <= 0 || C <= 0 || inner <= 0) return;                                               \
        const int parts = threads < 1 ? 1 : (C < threads ? (int)C : threads);                         \
        _Pragma("omp parallel for num_threads(parts) schedule(static) if (parts > 1)")                \
        for (int t = 0; t < parts; ++t)                                                               \
            flow_channels_##SUFFIX(g, outer, inner, so, rows, sc, si, C * t / parts, C * (t + 1) / parts, \
                                   abs_sum, nonzero);                                                 \
    }
DEFINE_FLOW(float, fabsf, f32)
DEFINE_FLOW(double, fabs, f64)

/* The gradient-flow call prepared once per layout (deadneuron/_native.py `NativeStats.flow_plan`),
 * taking the same three pointers as deadneuron_planned (the second is not read). rows: NULL, or the
 * element offsets of the `outer` rows read (a padding mask's valid rows). Returns 0, 2 for an unknown
 * dtype (nothing written). */
typedef struct {
    int64_t outer, C, inner, so, sc, si;
    double *abs_sum, *nonzero;
    int32_t dtype, threads;
    const int64_t *rows;
} deadneuron_flow_plan;

int deadneuron_flow_planned(const void *g, const void *unused, const deadneuron_flow_plan *p) {
    (void)unused;
    if (p->dtype == 0)
        flow_all_f32((const float *)g, p->outer, p->C, p->inner, p->so, p->rows, p->sc, p->si, p->abs_sum,
                     p->nonzero, p->threads);
    else if (p->dtype == 1)
        flow_all_f64((const double *)g, p->outer, p->C, p->inner, p->so, p->rows, p->sc, p->si, p->abs_sum,
                     p->nonzero, p->threads);
    else
        return 2;
    return 0;
}
