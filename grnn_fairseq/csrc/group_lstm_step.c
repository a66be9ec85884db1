/*
 * The pointwise part of one time step of the fused group LSTM (grnn_fairseq/modules/fused_group_lstm.py),
 * forward and backward, each in one pass over the step's gates.
 *
 * Gao et al., NAACL 2018, equations 4 and 5 with the channel shuffle of section 2.2 between time steps; the
 * gates are nn.LSTM's: i, f, o = sigmoid, g = tanh, c_t = f c_{t-1} + i g, h_t = o tanh(c_t). The same step in
 * PyTorch operations is the loop body of ``_forward`` / ``FusedGroupLSTMFunction.backward``; tests compare the two.
 *
 * Plain C, no Python or torch headers: setup.py builds it as an optional extension (a failed build leaves the
 * PyTorch operations in charge) and grnn_fairseq/modules/_kernel.py loads it with ctypes. A step's rows are
 * split over torch's OpenMP threads: built with -fopenmp, the library needs libgomp.so.1, which the process
 * already has loaded with torch, so both share one thread pool.
 *
 * Layouts (float32, group-major; k = group, b = batch row, u = unit of the group, Hk = H/K, G4 = 4 Hk):
 *   z[k] + b*z_ld + q*Hk + u  pre-activation of gate q (i, f, g, o) at (k, b, u); the g rows are doubled by the
 *                             caller, so tanh(z_g) = 2 sigmoid(2 z_g) - 1 shares the sigmoid of the other gates
 *   x[k] + b*z_ld + ...       optional input projection of the step, added to z (NULL when z already holds it)
 *   c[k*c_gs + b*Hk + u]      cell states
 *   r[k'*r_gs + b*Hk + j]     the next step's recurrent input in r order: shuffle(h) when shuffled, where h unit
 *                             (k, u1*m + u2) sits at r group u1, position u2*K + k (m = Hk/K), else r = h
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* below this many units (K*B*Hk) per thread a step is not worth splitting; a translation model's step (K=4,
 * B=32, H/K=64: 8192 units) is worth splitting over 2 threads (docs/speed.md) */
#define MIN_UNITS_PER_THREAD 2048

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
/* one build serves every x86-64 CPU: the loader picks the AVX-512, AVX2 or baseline clone */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

/* The threads a step of `units` units (K*B*Hk) is split over: at most nthreads, each with at least
 * MIN_UNITS_PER_THREAD units, at least one. */
static int64_t step_threads(int64_t nthreads, int64_t units) {
    if (nthreads > units / MIN_UNITS_PER_THREAD) nthreads = units / MIN_UNITS_PER_THREAD;
    return nthreads > 1 ? nthreads : 1;
}

/* Inside a parallel region: this thread's share [begin, end) of `rows` rows (all of them without OpenMP). */
static void thread_rows(int64_t rows, int64_t *begin, int64_t *end) {
    int64_t n = 1, id = 0;
#ifdef _OPENMP
    n = omp_get_num_threads();
    id = omp_get_thread_num();
#endif
    *begin = rows * id / n;
    *end = rows * (id + 1) / n;
}

/* The first b with row b*K + k at or after row `begin`. */
static inline int64_t first_b(int64_t begin, int64_t K, int64_t k) { return (begin - k + K - 1) / K; }

/* e^x in float32 within 2 ulp on [-87, 88] (Cody-Waite reduction, Cephes' expf polynomial); branch free so
 * that the compiler vectorizes the loops that call it. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x; /* comparisons, not fminf: a NaN stays a NaN */
    x = x > 88.0f ? 88.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

/* One row (k, b) of the forward step; has_x and save are literal constants at every call, so the compiler emits
 * a branch-free, vectorized loop for each of the four cases. */
static inline __attribute__((always_inline)) void forward_row(
    int64_t Hk, const float *restrict zr, const float *restrict xr, const float *restrict cp, float *restrict cn,
    float *restrict h, float *restrict qr, float *restrict qcr, float *restrict fr, const int has_x, const int save) {
    for (int64_t u = 0; u < Hk; u++) {
        float zi = zr[u], zf = zr[Hk + u], zg = zr[2 * Hk + u], zo = zr[3 * Hk + u];
        if (has_x) {
            zi += xr[u];
            zf += xr[Hk + u];
            zg += xr[2 * Hk + u];
            zo += xr[3 * Hk + u];
        }
        float si = sigmoid_f32(zi), sf = sigmoid_f32(zf), sg = sigmoid_f32(zg), so = sigmoid_f32(zo);
        float g = 2.0f * sg - 1.0f;
        float c = sf * cp[u] + si * g;
        float tc = 2.0f * sigmoid_f32(2.0f * c) - 1.0f;
        cn[u] = c;
        h[u] = so * tc;
        if (save) {
            qr[u] = si * (1.0f - si) * g;                  /* d c / d z_i */
            qr[Hk + u] = sf * (1.0f - sf) * cp[u];         /* d c / d z_f */
            qr[2 * Hk + u] = 4.0f * si * sg * (1.0f - sg); /* d c / d z_g: i (1 - g^2) */
            qr[3 * Hk + u] = so * (1.0f - so) * tc;        /* d h / d z_o */
            qcr[u] = so * (1.0f - tc * tc);                /* d h / d c */
            fr[u] = sf;                                    /* d c_t / d c_{t-1} */
        }
    }
}

/* Rows [begin, end) of the forward step, row i = (k, b) = (i % K, i / K); h: a scratch row of Hk floats. */
MULTIVERSION
static void forward_rows(int64_t begin, int64_t end, int64_t K, int64_t B, int64_t Hk, int64_t shuffle,
                         const float *const *z, const float *const *x, int64_t x_off, int64_t z_ld,
                         const float *c_prev, float *c_next, int64_t c_gs, float *r_next, int64_t r_gs, float *q,
                         int64_t q_gs, float *qc, float *fs, int64_t s_gs, float *out, float *h) {
    const int64_t m = Hk / K;
    /* The rows are split b-major (a thread writes whole rows b of r_next: no false sharing) and visited group by
     * group, so that each buffer is read and written in one stream per group, not K interleaved ones. */
    for (int64_t k = 0; k < K; k++) {
        for (int64_t b = first_b(begin, K, k); b * K + k < end; b++) {
            const float *zr = z[k] + b * z_ld;
            const float *xr = x ? x[k] + x_off + b * z_ld : NULL;
            const float *cp = c_prev + k * c_gs + b * Hk;
            float *cn = c_next + k * c_gs + b * Hk;
            float *qr = q ? q + k * q_gs + b * 4 * Hk : NULL;
            float *qcr = q ? qc + k * s_gs + b * Hk : NULL;
            float *fr = q ? fs + k * s_gs + b * Hk : NULL;
            if (xr && q) forward_row(Hk, zr, xr, cp, cn, h, qr, qcr, fr, 1, 1);
            else if (xr) forward_row(Hk, zr, xr, cp, cn, h, qr, qcr, fr, 1, 0);
            else if (q) forward_row(Hk, zr, xr, cp, cn, h, qr, qcr, fr, 0, 1);
            else forward_row(Hk, zr, xr, cp, cn, h, qr, qcr, fr, 0, 0);
            if (shuffle) { /* h unit (k, u1*m + u2) -> r group u1, position u2*K + k */
                for (int64_t u1 = 0; u1 < K; u1++) {
                    float *rr = r_next + u1 * r_gs + b * Hk + k;
                    const float *hr = h + u1 * m;
                    for (int64_t u2 = 0; u2 < m; u2++) rr[u2 * K] = hr[u2];
                }
            } else {
                memcpy(r_next + k * r_gs + b * Hk, h, (size_t)Hk * sizeof(float));
            }
            if (out) memcpy(out + (b * K + k) * Hk, h, (size_t)Hk * sizeof(float)); /* row b of B x H, plain order */
        }
    }
}

/*
 * Forward step. Reads z (+ x), c_prev; writes c_next, the next recurrent input r_next and, when q is not NULL,
 * what the backward pass needs: q (gate derivatives, G4 per row: d pre-activation = dc * q for i, f, g and
 * dh * q for o), qc = o (1 - tanh^2 c) and fs = f (s_gs / Hk per row); when out is not NULL, also h_t in plain
 * order into out (B x H, contiguous). The K*B rows are split over up to nthreads threads (torch's OpenMP pool:
 * the same libgomp.so.1).
 */
int64_t grnn_lstm_forward_step(int64_t K, int64_t B, int64_t Hk, int64_t shuffle, const float *const *z,
                            const float *const *x, int64_t x_off, int64_t z_ld, const float *c_prev, float *c_next,
                            int64_t c_gs, float *r_next, int64_t r_gs, float *q, int64_t q_gs, float *qc, float *fs,
                            int64_t s_gs, float *out, int64_t nthreads) {
    const int64_t rows = K * B, threads = step_threads(nthreads, rows * Hk);
    int64_t failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t begin, end;
        thread_rows(rows, &begin, &end);
        float *h = malloc((size_t)Hk * sizeof(float)); /* scratch row: h of one (k, b) */
        if (h) forward_rows(begin, end, K, B, Hk, shuffle, z, x, x_off, z_ld, c_prev, c_next, c_gs, r_next, r_gs,
                            q, q_gs, qc, fs, s_gs, out, h);
        else {
#pragma omp atomic write
            failed = 1;
        }
        free(h);
    }
    return failed ? -1 : 0; /* -1: out of memory for a scratch row */
}

/* One row (k, b) of the backward step: the gates' gradient dg from dh and dc; dc becomes dc_{t-1}. */
static inline __attribute__((always_inline)) void backward_row(int64_t Hk, const float *restrict dh,
                                                                const float *restrict qr, const float *restrict qcr,
                                                                const float *restrict fr, float *restrict dcr,
                                                                float *restrict dgr) {
    for (int64_t u = 0; u < Hk; u++) {
        float d = dcr[u] + dh[u] * qcr[u];
        dgr[u] = qr[u] * d;
        dgr[Hk + u] = qr[Hk + u] * d;
        dgr[2 * Hk + u] = qr[2 * Hk + u] * d;
        dgr[3 * Hk + u] = qr[3 * Hk + u] * dh[u];
        dcr[u] = d * fr[u];
    }
}

/* Rows [begin, end) of the backward step, row i = (k, b) = (i % K, i / K); dh: a scratch row of Hk floats. */
MULTIVERSION
static void backward_rows(int64_t begin, int64_t end, int64_t K, int64_t B, int64_t Hk, int64_t shuffle,
                          const float *dy, int64_t dy_gs, int64_t dy_ld, const float *const *dr, const float *rm,
                          const float *dh_add, const float *q, int64_t q_gs, const float *qc, const float *fs,
                          int64_t s_gs, float *dc, float *dg, int64_t dg_gs, float *dh) {
    const int64_t m = Hk / K;
    for (int64_t k = 0; k < K; k++) { /* the thread's rows group by group, as in forward_rows */
        for (int64_t b = first_b(begin, K, k); b * K + k < end; b++) {
            if (dy) {
                memcpy(dh, dy + k * dy_gs + b * dy_ld, (size_t)Hk * sizeof(float));
            } else {
                memset(dh, 0, (size_t)Hk * sizeof(float));
            }
            if (dr) { /* unshuffle: h unit (k, u1*m + u2) <- r group u1, position u2*K + k */
                if (shuffle) {
                    for (int64_t u1 = 0; u1 < K; u1++) {
                        const float *dr_row = dr[u1] + b * Hk + k;
                        const float *rm_row = rm ? rm + (u1 * B + b) * Hk + k : NULL;
                        float *dhr = dh + u1 * m;
                        if (rm_row) {
                            for (int64_t u2 = 0; u2 < m; u2++) dhr[u2] += dr_row[u2 * K] * rm_row[u2 * K];
                        } else {
                            for (int64_t u2 = 0; u2 < m; u2++) dhr[u2] += dr_row[u2 * K];
                        }
                    }
                } else {
                    const float *dr_row = dr[k] + b * Hk;
                    const float *rm_row = rm ? rm + (k * B + b) * Hk : NULL;
                    if (rm_row) {
                        for (int64_t u = 0; u < Hk; u++) dh[u] += dr_row[u] * rm_row[u];
                    } else {
                        for (int64_t u = 0; u < Hk; u++) dh[u] += dr_row[u];
                    }
                }
            }
            if (dh_add) {
                const float *ar = dh_add + (k * B + b) * Hk;
                for (int64_t u = 0; u < Hk; u++) dh[u] += ar[u];
            }
            backward_row(Hk, dh, q + k * q_gs + b * 4 * Hk, qc + k * s_gs + b * Hk, fs + k * s_gs + b * Hk,
                         dc + (k * B + b) * Hk, dg + k * dg_gs + b * 4 * Hk);
        }
    }
}

/*
 * Backward step, the adjoint of the forward step at the same t. dh_t = dy (the output's gradient, NULL for
 * none) + unshuffle(dr * rm) (the gradient of the next step's recurrent input, r order, NULL at the last step;
 * rm the recurrent dropout mask in r order, K x B x Hk, or NULL) + dh_add (K x B x Hk in h order, or NULL).
 * dc (K x B x Hk) holds dc_t on entry and dc_{t-1} on return. Writes the gates' gradient dg (G4 per row).
 * The K*B rows are split over up to nthreads threads.
 */
int64_t grnn_lstm_backward_step(int64_t K, int64_t B, int64_t Hk, int64_t shuffle, const float *dy, int64_t dy_gs,
                             int64_t dy_ld, const float *const *dr, const float *rm, const float *dh_add,
                             const float *q, int64_t q_gs, const float *qc, const float *fs, int64_t s_gs, float *dc,
                             float *dg, int64_t dg_gs, int64_t nthreads) {
    const int64_t rows = K * B, threads = step_threads(nthreads, rows * Hk);
    int64_t failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t begin, end;
        thread_rows(rows, &begin, &end);
        float *dh = malloc((size_t)Hk * sizeof(float)); /* scratch row: dh of one (k, b) */
        if (dh) backward_rows(begin, end, K, B, Hk, shuffle, dy, dy_gs, dy_ld, dr, rm, dh_add, q, q_gs, qc, fs,
                              s_gs, dc, dg, dg_gs, dh);
        else {
#pragma omp atomic write
            failed = 1;
        }
        free(dh);
    }
    return failed ? -1 : 0; /* -1: out of memory for a scratch row */
}

/* The library's interface version: the loader refuses a stale build of another version. */
int64_t grnn_kernel_version(void) { return 3; }
