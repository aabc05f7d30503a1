/* Z-Mask's SPR terms on the CPU in one pass per channel (the CPU counterpart of zmask_spr.cu).
 *
 * For every hooked layer, every channel of every frame goes through, in cache-resident scratch:
 *   bilinear resize to the working grid (align_corners=False, the reference's F.interpolate),
 *   z-score as a*x + b (a = 1/(sigma+eps), b = -mu*a: the same affine map as (x-mu)/(sigma+eps)),
 *   a summed-area table, and then, for every kernel of the layer, the clipped 'same'-mode window
 *   sum from four table reads, |.| accumulated over channels, times 1/(C * window pixels) at the end.
 * A layer whose only kernel is 1x1 skips the table: each cell is resized, z-scored and |.| added directly
 * (the per-cell channel mean of |z|, the outlier cue's map before its pooling).
 * Python (kernels/cpu.py) builds the cascades from these terms with the reference's own code; the
 * plain-torch reference (realtime/defenses/spr.py) is the oracle.
 *
 * One call covers all layers: the (layer, frame, channel) items are split into contiguous shares of
 * about equal cost; each share has its own accumulators, summed in share order at the end, so the
 * result does not depend on scheduling. Built with OpenMP, the shares run on an OpenMP team: the
 * library then binds to the libgomp.so.1 torch has already loaded, so the team is torch's own
 * intra-op pool, still spinning from the backbone, instead of fresh threads that fight those spinning
 * ones for the cores. Built without it, one POSIX thread per share (start-up ~0.1 ms per call).
 */
#include <math.h>
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdlib.h>
#include <string.h>

#define ZM_MAX_THREADS 64

typedef struct {                              /* one hooked layer; mirrored by kernels/cpu.py's _Desc */
    const float *tap; int n, c, h, w;         /* (n, c, h, w) float32, contiguous */
    const float *a, *b;                       /* (c,) z-score scale and offset */
    const int *y0, *y1; const float *ly;      /* (hr,) source rows and the weight of y1 */
    const int *x0, *x1; const float *lx;      /* (wr,) source columns and the weight of x1 */
    int nk; const int *rh, *rw;               /* (nk,) half-widths of each kernel's window */
    const float *inv;                         /* (nk, hr, wr) 1 / (c * window pixels) */
    float *out;                               /* (n, nk, hr, wr) the terms */
} zm_layer;

typedef struct {
    const zm_layer *layer; int hr, wr;
    float *acc;                               /* this thread's (n, nk, wr, hr) sums for this layer (transposed) */
    float *scratch;
} zm_job;

/* The tables are stored transposed (one row per working-grid column, the working-grid rows contiguous)
 * and padded on both axes by the largest half-widths (PH rows, PW columns): zeros before the table's
 * first row/column (which is zero) and copies of its last one after, so every clipped 'same'-mode
 * window is one difference of four reads with no edge cases, and every inner loop runs over
 * contiguous memory (vectorised). */
static int zm_pad_h(const zm_layer *L) {
    int p = 0;
    for (int k = 0; k < L->nk; ++k) if (L->rh[k] > p) p = L->rh[k];
    return p;
}

static int zm_pad_w(const zm_layer *L) {
    int p = 0;
    for (int k = 0; k < L->nk; ++k) if (L->rw[k] > p) p = L->rw[k];
    return p;
}

/* A layer whose only kernel is 1x1 (the plain per-cell |z|, e.g. the outlier cue's map) needs no table:
 * resize and z-score each cell directly and add its |z| to the frame's (transposed) accumulator. */
static int zm_single_cell(const zm_layer *L) {
    return L->nk == 1 && L->rh[0] == 0 && L->rw[0] == 0;
}

static size_t zm_table_size(const zm_layer *L, int hr, int wr) {
    return ((size_t)wr + 1 + 2 * (size_t)zm_pad_w(L)) * ((size_t)hr + 1 + 2 * (size_t)zm_pad_h(L));
}

/* run + the transposed column sums + two tables (two channels share one sweep of the accumulators) */
static size_t zm_scratch(const zm_layer *L, int hr, int wr) {
    const size_t S = (size_t)hr + 1 + 2 * (size_t)zm_pad_h(L);
    return (size_t)L->w + (size_t)L->w * S + 2 * zm_table_size(L, hr, wr);
}

/* Per-item cost for splitting the work into equal shares (inner-loop iterations). */
static double zm_cost(const zm_layer *L, int hr, int wr) {
    if (zm_single_cell(L)) return (double)hr * L->w + (double)hr * wr;
    const double S = hr + 1 + 2 * zm_pad_h(L);
    return (double)hr * L->w * 2 + (double)wr * S + (double)L->nk * wr * hr;
}

/* The z-scored, resized map of one (frame, channel) item as a padded, transposed summed-area table. */
static void zm_table(const zm_job *jb, int item, float *restrict sat) {
    const zm_layer *L = jb->layer;
    const int w = L->w, hr = jb->hr, wr = jb->wr, PH = zm_pad_h(L), PW = zm_pad_w(L);
    const int S = hr + 1 + 2 * PH;                    /* stride of a transposed row; SAT row r is at [PH + r] */
    const int ch = item % L->c;
    const float *restrict t = L->tap + (size_t)item * L->h * w;
    const float a = L->a[ch], b = L->b[ch];
    float *restrict run = jb->scratch;                /* w running column sums */
    float *restrict qt = run + w;                     /* w rows: the column prefix sums, transposed */

    /* Down the rows: interpolate each working row from its two source rows, z-score it (a*v + b: the
     * interpolation weights sum to 1, so this is z-score after resize), add it to the running column
     * sums, store those transposed. */
    for (int x = 0; x < w; ++x) run[x] = 0.0f;
    for (int i = 0; i < hr; ++i) {
        const float *restrict r0 = t + (size_t)L->y0[i] * w, *restrict r1 = t + (size_t)L->y1[i] * w;
        const float l1 = L->ly[i], l0 = 1.0f - l1;
        for (int x = 0; x < w; ++x) run[x] += a * (l0 * r0[x] + l1 * r1[x]) + b;
        for (int x = 0; x < w; ++x) qt[(size_t)x * S + PH + i + 1] = run[x];
    }
    for (int x = 0; x < w; ++x) {
        float *restrict q = qt + (size_t)x * S;
        for (int e = 0; e <= PH; ++e) q[e] = 0.0f;
        for (int e = 1; e <= PH; ++e) q[PH + hr + e] = run[x];
    }
    /* Across the columns: interpolate each working column from its two source columns (whole transposed
     * rows, padding included) and prefix-sum: the table, column by column. */
    for (int e = 0; e < (PW + 1) * S; ++e) sat[e] = 0.0f;
    for (int j = 0; j < wr; ++j) {
        const float *restrict q0 = qt + (size_t)L->x0[j] * S, *restrict q1 = qt + (size_t)L->x1[j] * S;
        const float l1 = L->lx[j], l0 = 1.0f - l1;
        const float *restrict prev = sat + (size_t)(PW + j) * S;
        float *restrict cur = sat + (size_t)(PW + j + 1) * S;
        for (int e = 0; e < S; ++e) cur[e] = prev[e] + (l0 * q0[e] + l1 * q1[e]);
    }
    for (int p = 1; p <= PW; ++p)
        memcpy(sat + (size_t)(PW + wr + p) * S, sat + (size_t)(PW + wr) * S, sizeof(float) * (size_t)S);
}

/* Every kernel's |window sum| of one table (t2 NULL) or of two tables of the same frame, added to that
 * frame's accumulators: two tables per sweep halve the accumulator traffic. */
static void zm_windows(const zm_job *jb, int fr, const float *restrict t1, const float *restrict t2) {
    const zm_layer *L = jb->layer;
    const int hr = jb->hr, wr = jb->wr, nk = L->nk, PH = zm_pad_h(L), PW = zm_pad_w(L);
    const int S = hr + 1 + 2 * PH;
    for (int k = 0; k < nk; ++k) {
        const int rh = L->rh[k], rw = L->rw[k];
        float *restrict acc = jb->acc + ((size_t)fr * nk + k) * wr * hr;
        for (int j = 0; j < wr; ++j) {
            const size_t hi = (size_t)(PW + j + rw + 1) * S + PH, lo = (size_t)(PW + j - rw) * S + PH;
            const float *restrict h1 = t1 + hi, *restrict l1 = t1 + lo;
            float *restrict o = acc + (size_t)j * hr;
            if (t2 == NULL) {
                for (int i = 0; i < hr; ++i)
                    o[i] += fabsf((h1[i + rh + 1] - h1[i - rh]) - (l1[i + rh + 1] - l1[i - rh]));
            } else {
                const float *restrict h2 = t2 + hi, *restrict l2 = t2 + lo;
                for (int i = 0; i < hr; ++i)
                    o[i] += fabsf((h1[i + rh + 1] - h1[i - rh]) - (l1[i + rh + 1] - l1[i - rh]))
                          + fabsf((h2[i + rh + 1] - h2[i - rh]) - (l2[i + rh + 1] - l2[i - rh]));
            }
        }
    }
}

/* Resize and z-score each cell directly (no table) and add its |z| to the frame's transposed accumulator. */
static void zm_direct(const zm_job *jb, int item) {
    const zm_layer *L = jb->layer;
    const int w = L->w, hr = jb->hr, wr = jb->wr, ch = item % L->c, fr = item / L->c;
    const float *restrict t = L->tap + (size_t)item * L->h * w;
    const float a = L->a[ch], b = L->b[ch];
    float *restrict row = jb->scratch;
    float *restrict acc = jb->acc + (size_t)fr * wr * hr;
    for (int i = 0; i < hr; ++i) {
        const float *restrict r0 = t + (size_t)L->y0[i] * w, *restrict r1 = t + (size_t)L->y1[i] * w;
        const float l1 = L->ly[i], l0 = 1.0f - l1;
        for (int x = 0; x < w; ++x) row[x] = l0 * r0[x] + l1 * r1[x];
        for (int j = 0; j < wr; ++j) {
            const float m1 = L->lx[j];
            acc[(size_t)j * hr + i] += fabsf(a * ((1.0f - m1) * row[L->x0[j]] + m1 * row[L->x1[j]]) + b);
        }
    }
}

/* Items [lo, hi) of one layer, two channels of the same frame at a time. */
static void zm_items(const zm_job *jb, long lo, long hi) {
    const zm_layer *L = jb->layer;
    if (zm_single_cell(L)) {
        for (long item = lo; item < hi; ++item) zm_direct(jb, (int)item);
        return;
    }
    const size_t S = (size_t)jb->hr + 1 + 2 * (size_t)zm_pad_h(L);
    float *t1 = jb->scratch + (size_t)L->w + (size_t)L->w * S, *t2 = t1 + zm_table_size(L, jb->hr, jb->wr);
    for (long item = lo; item < hi;) {
        const int fr = (int)(item / L->c);
        const int pair = item + 1 < hi && (item + 1) / L->c == fr;
        zm_table(jb, (int)item, t1);
        if (pair) zm_table(jb, (int)item + 1, t2);
        zm_windows(jb, fr, t1, pair ? t2 : NULL);
        item += pair ? 2 : 1;
    }
}

typedef struct {
    const zm_layer *layers; int nl, hr, wr;
    long begin, end;                          /* global items [begin, end) over all layers */
    float *acc;                               /* sum over layers of n * nk * hr * wr */
    float *scratch;
} zm_share;

static void *zm_worker(void *arg) {
    const zm_share *sh = (const zm_share *)arg;
    long base = 0;
    size_t off = 0;
    for (int l = 0; l < sh->nl; ++l) {
        const zm_layer *L = &sh->layers[l];
        const long items = (long)L->n * L->c;
        const long lo = sh->begin > base ? sh->begin - base : 0;
        const long hi = sh->end - base < items ? sh->end - base : items;
        zm_job jb = {L, sh->hr, sh->wr, sh->acc + off, sh->scratch};
        if (lo < hi) zm_items(&jb, lo, hi);
        base += items;
        off += (size_t)L->n * L->nk * sh->hr * sh->wr;
    }
    return NULL;
}

/* Returns 0, or -1 when the scratch could not be allocated (outputs are then untouched). */
int zm_cpu_terms(const zm_layer *layers, int nl, int hr, int wr, int threads) {
    long items = 0;
    size_t maps = 0, scratch = 0;
    double total = 0.0;
    for (int l = 0; l < nl; ++l) {
        const zm_layer *L = &layers[l];
        items += (long)L->n * L->c;
        maps += (size_t)L->n * L->nk * hr * wr;
        const size_t need = zm_scratch(L, hr, wr);
        if (need > scratch) scratch = need;
        total += (double)L->n * L->c * zm_cost(L, hr, wr);
    }
    if (items == 0) return 0;
    if (threads < 1) threads = 1;
    if (threads > ZM_MAX_THREADS) threads = ZM_MAX_THREADS;
    if (threads > items) threads = (int)items;
    float *mem = (float *)calloc((size_t)threads * (maps + scratch), sizeof(float));
    if (!mem) return -1;
    zm_share shares[ZM_MAX_THREADS];
    pthread_t tid[ZM_MAX_THREADS];
    int started[ZM_MAX_THREADS] = {0};
    /* Shares of about equal cost: walk the items, cutting at each 1/threads of the total. */
    int t = 0;
    long g = 0;
    double done = 0.0;
    shares[0].begin = 0;
    for (int l = 0; l < nl && t < threads - 1; ++l) {
        const zm_layer *L = &layers[l];
        const double per = zm_cost(L, hr, wr);
        for (long i = 0; i < (long)L->n * L->c && t < threads - 1; ++i, ++g) {
            done += per;
            if (done >= total * (t + 1) / threads) { shares[t].end = g + 1; shares[++t].begin = g + 1; }
        }
    }
    shares[t].end = items;
    const int used = t + 1;
    for (int s = 0; s < used; ++s) {
        shares[s].layers = layers; shares[s].nl = nl; shares[s].hr = hr; shares[s].wr = wr;
        shares[s].acc = mem + (size_t)s * (maps + scratch);
        shares[s].scratch = shares[s].acc + maps;
    }
#ifdef _OPENMP
    (void)tid; (void)started;
    #pragma omp parallel num_threads(used)
    {   /* a smaller team than asked for (nested, or a limit) still covers every share */
        const int nth = omp_get_num_threads();
        for (int s = omp_get_thread_num(); s < used; s += nth) zm_worker(&shares[s]);
    }
#else
    for (int s = 1; s < used; ++s) started[s] = pthread_create(&tid[s], NULL, zm_worker, &shares[s]) == 0;
    zm_worker(&shares[0]);
    for (int s = 1; s < used; ++s) {
        if (started[s]) pthread_join(tid[s], NULL);
        else zm_worker(&shares[s]);           /* no thread: do its share here */
    }
#endif
    size_t off = 0;
    for (int l = 0; l < nl; ++l) {
        const zm_layer *L = &layers[l];
        const size_t plane = (size_t)hr * wr, n = (size_t)L->n * L->nk * plane;
        for (size_t p = 0; p < n; p += plane)             /* (frame, kernel) planes; acc is transposed */
            for (int i = 0; i < hr; ++i)
                for (int j = 0; j < wr; ++j) {
                    const size_t src = off + p + (size_t)j * hr + i;
                    float v = 0.0f;
                    for (int s = 0; s < used; ++s) v += shares[s].acc[src];
                    L->out[p + (size_t)i * wr + j] = v * L->inv[(p / plane) % L->nk * plane + (size_t)i * wr + j];
                }
        off += n;
    }
    free(mem);
    return 0;
}

/* The rest of the first pass on the terms (what ZMask.maps_from_terms and FusionBlock do in torch, ~60 tiny tensor
 * ops there): per frame, each cascade H = p_1, H = H / (1 + max H) * p_i (the reference's operation order),
 * the pixel-wise max over the shallow and over the deep cascades, then the 8-scalar fusion block:
 *   g = sigmoid(w1 tanh(w2 H_D + b2) + b1), M~ = sigmoid(w4 tanh(w3 H_S g + b3) + b4),
 *   d = sum(H_S H_D M~) / (1 + sum M~)    (sums in double).
 * step[s] points at frame 0's plane of cascade step s, stride[s] floats apart frame to frame; cascade c has
 * len[c] consecutive steps and role[c] 0 (shallow) or 1 (deep). scratch holds one plane. */
/* exp(v) without a libm call, so the loop below vectorises (with -fno-trapping-math for the clamps): 2^(v log2 e) = 2^n * 2^f with n = round, |f| <= 1/2,
 * 2^f from its degree-6 Taylor polynomial (relative error < 3e-7 against expf over the clamped range). */
static inline float zm_exp(float v) {
    float y = v * 1.44269504f;
    y = y < -125.0f ? -125.0f : y;                          /* -125: the result stays a normal float */
    y = y > 126.0f ? 126.0f : y;
    const int ni = (int)(y + 127.5f) - 127;            /* round(y): the sum is positive, so (int) floors it */
    const float f = (y - (float)ni) * 0.693147181f;
    const float p = 1.0f + f * (1.0f + f * (0.5f + f * (1.6666667e-1f + f * (4.1666668e-2f + f * (8.3333338e-3f
                  + f * 1.3888889e-3f)))));
    const int bits = (ni + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}
static inline float zm_sigmoid(float v) { return 1.0f / (1.0f + zm_exp(-v)); }
/* tanh as 2 sigmoid(2v) - 1 (libm's tanhf is a call per element); absolute error ~3e-7, inside a sigmoid */
static inline float zm_tanh(float v) { return 2.0f / (1.0f + zm_exp(-2.0f * v)) - 1.0f; }

/* max of v[0..n) (n >= 1) in 8 lanes, so it vectorises without fast-math (the maps hold no NaN) */
static float zm_max(const float *restrict v, int n) {
    float m[8];
    for (int k = 0; k < 8; ++k) m[k] = v[0];
    int e = 0;
    for (; e + 8 <= n; e += 8)
        for (int k = 0; k < 8; ++k) m[k] = v[e + k] > m[k] ? v[e + k] : m[k];
    for (; e < n; ++e) m[0] = v[e] > m[0] ? v[e] : m[0];
    for (int k = 1; k < 8; ++k) m[0] = m[k] > m[0] ? m[k] : m[0];
    return m[0];
}

void zm_cpu_tail(const float *const *step, const long *stride, const int *len, const int *role, int nc,
                 int n, int plane, const float *w, float *restrict hs, float *restrict hd, float *restrict soft,
                 float *restrict score, float *restrict scratch) {
    for (int f = 0; f < n; ++f) {
        float *restrict os = hs + (size_t)f * plane, *restrict od = hd + (size_t)f * plane;
        float *restrict om = soft + (size_t)f * plane;
        int seen[2] = {0, 0};
        for (int c = 0, s0 = 0; c < nc; s0 += len[c], ++c) {
            const float *p0 = step[s0] + (size_t)f * stride[s0];
            for (int e = 0; e < plane; ++e) scratch[e] = p0[e];
            for (int s = s0 + 1; s < s0 + len[c]; ++s) {
                const float peak = zm_max(scratch, plane);
                const float den = 1.0f + peak, *p = step[s] + (size_t)f * stride[s];
                for (int e = 0; e < plane; ++e) scratch[e] = scratch[e] / den * p[e];
            }
            float *o = role[c] ? od : os;
            if (!seen[role[c]]) for (int e = 0; e < plane; ++e) o[e] = scratch[e];
            else for (int e = 0; e < plane; ++e) o[e] = scratch[e] > o[e] ? scratch[e] : o[e];
            seen[role[c]] = 1;
        }
        const float w1 = w[0], b1 = w[1], w2 = w[2], b2 = w[3], w3 = w[4], b3 = w[5], w4 = w[6], b4 = w[7];
        for (int e = 0; e < plane; ++e) {      /* elementwise (vectorised), then the two sums in order */
            const float g = zm_sigmoid(w1 * zm_tanh(w2 * od[e] + b2) + b1);
            om[e] = zm_sigmoid(w4 * zm_tanh(w3 * (os[e] * g) + b3) + b4);
        }
        double num = 0.0, den = 0.0;
        for (int e = 0; e < plane; ++e) {
            num += (double)(os[e] * od[e] * om[e]);
            den += om[e];
        }
        score[f] = (float)(num / (1.0 + den));
    }
}
