/* Z-Mask's SPR terms on the CPU in one pass per channel (the CPU counterpart of zmask_spr.cu).
 *
 * For every hooked layer, every channel of every frame goes through, in cache-resident scratch:
 *   bilinear resize to the working grid (align_corners=False, the reference's F.interpolate),
 *   z-score as a*x + b (a = 1/(sigma+eps), b = -mu*a: the same affine map as (x-mu)/(sigma+eps)),
 *   a summed-area table, and then, for every kernel of the layer, the clipped 'same'-mode window
 *   sum from four table reads, |.| accumulated over channels, times 1/(C * window pixels) at the end.
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
#define ZM_ROWS 2                             /* source rows prefix-summed together (independent chains) */

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
    float *acc;                               /* this thread's (n, nk, hr, wr) sums for this layer */
    float *scratch;
} zm_job;

/* Table rows are padded by P = the largest half-width on both sides: P zeros on the left (the table's
 * first column is zero) and P copies of the last column on the right, so every clipped window is
 * one contiguous difference with no edge cases. */
static int zm_pad(const zm_layer *L) {
    int p = 0;
    for (int k = 0; k < L->nk; ++k) if (L->rw[k] > p) p = L->rw[k];
    return p;
}

static size_t zm_scratch(const zm_layer *L, int hr, int wr) {
    const size_t rs = (size_t)wr + 1 + 2 * (size_t)zm_pad(L);
    return (size_t)(L->h + hr + 1) * rs + rs + (size_t)ZM_ROWS * wr;
}

static void zm_channel(const zm_job *jb, int item) {
    const zm_layer *L = jb->layer;
    const int h = L->h, w = L->w, hr = jb->hr, wr = jb->wr, nk = L->nk, P = zm_pad(L);
    const int rs = wr + 1 + 2 * P;                    /* padded row stride; column j is at [P + j] */
    const int fr = item / L->c, ch = item % L->c;
    const float *restrict t = L->tap + (size_t)item * h * w;
    const float a = L->a[ch], b = L->b[ch];
    const int *restrict x0 = L->x0, *restrict x1 = L->x1, *restrict y0 = L->y0, *restrict y1 = L->y1;
    const float *restrict lx = L->lx, *restrict ly = L->ly;
    float *restrict hx = jb->scratch;                 /* h padded rows: source rows along x, prefix-summed */
    float *restrict sat = hx + (size_t)h * rs;        /* hr+1 padded rows: the summed-area table */
    float *restrict cj = sat + (size_t)(hr + 1) * rs; /* one padded row: the column count j, clamped */
    float *restrict tmp = cj + rs;                    /* ZM_ROWS x wr: interpolated rows */

    /* Along x first: interpolate each source row, then its prefix sum (the table's x axis). The
     * vertical interpolation and the z-score are affine, so they commute with this prefix sum:
     * prefix(a * v + b)[j] = a * prefix(v)[j] + b * j. */
    for (int y = 0; y < h; y += ZM_ROWS) {
        const int m = h - y < ZM_ROWS ? h - y : ZM_ROWS;
        for (int r = 0; r < m; ++r) {
            const float *restrict row = t + (size_t)(y + r) * w;
            float *restrict o = tmp + (size_t)r * wr;
            for (int j = 0; j < wr; ++j) o[j] = row[x0[j]] + lx[j] * (row[x1[j]] - row[x0[j]]);
        }
        float s[ZM_ROWS] = {0.0f};
        for (int j = 0; j < wr; ++j)              /* ZM_ROWS independent add chains, interleaved */
            for (int r = 0; r < m; ++r) {
                s[r] += tmp[(size_t)r * wr + j];
                hx[(size_t)(y + r) * rs + P + j + 1] = s[r];
            }
        for (int r = 0; r < m; ++r) {
            float *restrict o = hx + (size_t)(y + r) * rs;
            for (int j = 0; j <= P; ++j) o[j] = 0.0f;
            for (int j = 1; j <= P; ++j) o[P + wr + j] = s[r];
        }
    }
    for (int j = 0; j < rs; ++j) {
        const int c = j - P;
        cj[j] = (float)(c < 0 ? 0 : (c > wr ? wr : c));
        sat[j] = 0.0f;
    }
    for (int i = 0; i < hr; ++i) {                    /* along y: interpolate, z-score, prefix down */
        const float *restrict r0 = hx + (size_t)y0[i] * rs, *restrict r1 = hx + (size_t)y1[i] * rs;
        const float l1 = ly[i], l0 = 1.0f - l1;
        float *restrict s = sat + (size_t)(i + 1) * rs;
        const float *restrict above = s - rs;
        for (int j = 0; j < rs; ++j)
            s[j] = above[j] + (a * (l0 * r0[j] + l1 * r1[j]) + b * cj[j]);
    }

    for (int k = 0; k < nk; ++k) {
        const int rh = L->rh[k], rw = L->rw[k];
        float *restrict acc = jb->acc + ((size_t)fr * nk + k) * hr * wr;
        for (int i = 0; i < hr; ++i) {
            const int i1 = i - rh < 0 ? 0 : i - rh, i2 = i + rh + 1 > hr ? hr : i + rh + 1;
            const float *restrict hi = sat + (size_t)i2 * rs + P + rw + 1, *restrict lo = sat + (size_t)i2 * rs + P - rw;
            const float *restrict hi0 = sat + (size_t)i1 * rs + P + rw + 1, *restrict lo0 = sat + (size_t)i1 * rs + P - rw;
            float *restrict o = acc + (size_t)i * wr;
            for (int j = 0; j < wr; ++j) o[j] += fabsf((hi[j] - hi0[j]) - (lo[j] - lo0[j]));
        }
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
        for (long item = lo; item < hi; ++item) zm_channel(&jb, (int)item);
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
        total += (double)L->n * L->c * ((double)L->h * wr + (double)hr * wr * (1 + L->nk));
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
        const double per = (double)L->h * wr + (double)hr * wr * (1 + L->nk);
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
        const size_t plane = (size_t)L->nk * hr * wr, n = (size_t)L->n * plane;
        for (size_t idx = 0; idx < n; ++idx) {
            float v = 0.0f;
            for (int s = 0; s < used; ++s) v += shares[s].acc[off + idx];
            L->out[idx] = v * L->inv[idx % plane];
        }
        off += n;
    }
    free(mem);
    return 0;
}
