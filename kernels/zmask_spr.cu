// Fused Z-Mask heatmaps (SPR) and detection. Device code only: compiles with NVRTC (CuPy RawModule)
// and with `nvcc -ptx`; no headers (half floats are converted with one PTX instruction).
//
// Pipeline per call (kernels/runtime.py launches it, kernels/launch.py sizes it):
//   zm_pooled_f32|f16  once per layer, blocks looping over (sample, channel chunk, kernel group):
//                      feature map -> working grid (bilinear 'same' / nearest 'demo', torch's index
//                      arithmetic) -> z-score -> summed-area table (SAT) of z in double (shared memory,
//                      or a per-block global slot when too big) -> every kernel's box mean from 4 SAT
//                      reads -> |.| -> chunk sums in registers, one plain store per pixel (no atomics:
//                      deterministic two-stage channel reduction)
//   zm_reduce_layer    once per layer: chunk sums / C = pooled maps p_k; per-sample maxima of the
//                      cascade's running products (atomicMax on float bits, values are >= 0)
//   zm_fuse            cascades in the reference's operation order, max over layers -> H_S, H_D,
//                      fusion block -> soft mask, per-sample sums of the score (double atomics)
//   zm_mask            score d, flag d > lambda0, keep-mask at the input size
// The SAT is double: an fp32 SAT of a 150x300 grid loses up to ~1.3e-3 relative on 1x1..3x4 boxes
// next to a strong activation (tests/test_kernels_emulate.py), the double one stays below 1e-6.
// Cascade length and kernels per work item are bounded by the defines below, which kernels/launch.py
// mirrors (tests check the two agree).

#define ZM_PPT 8                 // pixels per thread per slab (accumulators live in registers)
#define ZM_KG 4                  // box kernels per group (blockIdx work item)
#define ZM_LMAX 8                // longest cascade
#define ZM_REC (4 + 2 * ZM_LMAX) // ints per layer record: koff, K, LS, LD, sidx[LMAX], didx[LMAX]
#define ZM_THREADS_MAX 512
#define ZM_FULL 0xffffffffu

typedef long long i64;
typedef unsigned short zm_half;  // IEEE binary16 bits

__device__ __forceinline__ float zm_load(const float* p, i64 i) { return __ldg(p + i); }
__device__ __forceinline__ float zm_load(const zm_half* p, i64 i) {
    float f;
    unsigned short b = p[i];
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
}

// torch 'nearest' (legacy): src = min(floor(dst * (float)in / out), in - 1)
__device__ __forceinline__ int zm_nearest(int dst, int in, int out) {
    const float scale = __fdiv_rn((float)in, (float)out);
    return min((int)floorf(__fmul_rn((float)dst, scale)), in - 1);
}

struct ZmLerp { int i0, i1; float l0, l1; };

// torch bilinear, align_corners=False: src = max(scale * (dst + 0.5) - 0.5, 0), no FMA contraction.
__device__ __forceinline__ ZmLerp zm_linear(int dst, int in, int out) {
    const float scale = __fdiv_rn((float)in, (float)out);
    float src = __fsub_rn(__fmul_rn(scale, __fadd_rn((float)dst, 0.5f)), 0.5f);
    if (src < 0.f) src = 0.f;
    ZmLerp r;
    r.i0 = (int)src;
    r.i1 = r.i0 + ((r.i0 < in - 1) ? 1 : 0);
    r.l1 = __fsub_rn(src, (float)r.i0);
    r.l0 = __fsub_rn(1.f, r.l1);
    return r;
}

// h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d), in torch's CUDA order, each op rounded.
__device__ __forceinline__ float zm_blend(const ZmLerp& ly, const ZmLerp& lx, float a, float b, float c, float d) {
    const float top = __fadd_rn(__fmul_rn(lx.l0, a), __fmul_rn(lx.l1, b));
    const float bot = __fadd_rn(__fmul_rn(lx.l0, c), __fmul_rn(lx.l1, d));
    return __fadd_rn(__fmul_rn(ly.l0, top), __fmul_rn(ly.l1, bot));
}

// Sum of z over rows ya..yb, cols xa..xb (inclusive) from a SAT with a zero top row / left column.
__device__ __forceinline__ double zm_box(const double* sat, int pitch, int ya, int yb, int xa, int xb) {
    const double* top = sat + (i64)ya * pitch;
    const double* bot = sat + (i64)(yb + 1) * pitch;
    return (bot[xb + 1] - bot[xa]) - (top[xb + 1] - top[xa]);
}

// z of channels cg..cg+ns-1 on the working grid into the SATs' interior (zero top row / left column).
// One pass over all pixels of all ns channels: independent loads, unrolled for memory-level parallelism.
template <typename T>
__device__ __forceinline__ void zm_fill(double* buf, int ns, int cg, const T* plane0, i64 sC, i64 sH, i64 sW,
                                        const float* mu, const float* sigma, float eps, int h, int w, int HR, int WR,
                                        int mode, int pitch, int sat_elems) {
    const int hw = HR * WR;
    for (int q = threadIdx.x; q < ns * pitch; q += blockDim.x) buf[(i64)(q / pitch) * sat_elems + q % pitch] = 0.0;
    for (int q = threadIdx.x; q < ns * HR; q += blockDim.x)
        buf[(i64)(q / HR) * sat_elems + (i64)(q % HR + 1) * pitch] = 0.0;
#pragma unroll 4
    for (int q = threadIdx.x; q < ns * hw; q += blockDim.x) {
        const int s = q / hw, p = q - s * hw, y = p / WR, x = p - y * WR, c = cg + s;
        const T* plane = plane0 + (i64)c * sC;
        float f;
        if (mode == 0) {
            const ZmLerp ly = zm_linear(y, h, HR), lx = zm_linear(x, w, WR);
            const i64 r0 = (i64)ly.i0 * sH, r1 = (i64)ly.i1 * sH, c0 = (i64)lx.i0 * sW, c1 = (i64)lx.i1 * sW;
            f = zm_blend(ly, lx, zm_load(plane, r0 + c0), zm_load(plane, r0 + c1), zm_load(plane, r1 + c0),
                         zm_load(plane, r1 + c1));
        } else {
            f = zm_load(plane, (i64)zm_nearest(y, h, HR) * sH + (i64)zm_nearest(x, w, WR) * sW);
        }
        const float z = __fdiv_rn(__fsub_rn(f, __ldg(mu + c)), __fadd_rn(__ldg(sigma + c), eps));
        buf[(i64)s * sat_elems + (i64)(y + 1) * pitch + x + 1] = (double)z;
    }
}

// Row prefix sums in place: one warp per row, warp-wide inclusive scan of 32 columns at a time.
__device__ __forceinline__ void zm_scan_rows(double* buf, int ns, int HR, int WR, int pitch, int sat_elems) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int r = warp; r < ns * HR; r += nwarps) {
        const int s = r / HR, y = r - s * HR;
        double* row = buf + (i64)s * sat_elems + (i64)(y + 1) * pitch + 1;
        double carry = 0.0;
        for (int x0 = 0; x0 < WR; x0 += 32) {
            const int x = x0 + lane;
            double v = x < WR ? row[x] : 0.0;
            for (int off = 1; off < 32; off <<= 1) {
                const double t = __shfl_up_sync(ZM_FULL, v, off);
                if (lane >= off) v += t;
            }
            if (x < WR) row[x] = carry + v;
            carry += __shfl_sync(ZM_FULL, v, 31);
        }
    }
}

// Columns: one lane per column walks down the rows, loads batched 8 deep for latency hiding.
__device__ __forceinline__ void zm_scan_cols(double* buf, int ns, int HR, int WR, int pitch, int sat_elems) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int tiles = (WR + 31) / 32;
    for (int t = warp; t < ns * tiles; t += nwarps) {
        const int s = t / tiles, x = (t - s * tiles) * 32 + lane + 1;
        if (x > WR) continue;
        double* col = buf + (i64)s * sat_elems + x;
        double run = 0.0;
        for (int y0 = 1; y0 <= HR; y0 += 8) {
            double v[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = (y0 + i <= HR) ? col[(i64)(y0 + i) * pitch] : 0.0;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                run += v[i];
                if (y0 + i <= HR) col[(i64)(y0 + i) * pitch] = run;
            }
        }
    }
}

// Adds |box mean| of every kernel of the group, for this thread's pixels of one slab, to acc.
__device__ __forceinline__ void zm_eval(float (&acc)[ZM_PPT][ZM_KG], const double* sat, int pitch, int slab,
                                        int HR, int WR, int mode, const int* kern, int kn) {
    const int hw = HR * WR;
#pragma unroll
    for (int i = 0; i < ZM_PPT; ++i) {
        const int p = (slab * ZM_PPT + i) * (int)blockDim.x + (int)threadIdx.x;
        if (p >= hw) continue;
        const int y = p / WR, x = p - (p / WR) * WR;
#pragma unroll
        for (int k = 0; k < ZM_KG; ++k) {
            if (k >= kn) continue;
            const int kh = __ldg(kern + 2 * k), kw = __ldg(kern + 2 * k + 1);
            int ya, yb, xa, xb;
            if (mode == 0) {
                ya = max(y - kh / 2, 0); yb = min(y + kh / 2, HR - 1);
                xa = max(x - kw / 2, 0); xb = min(x + kw / 2, WR - 1);
            } else {
                ya = zm_nearest(y, HR - kh + 1, HR); yb = ya + kh - 1;
                xa = zm_nearest(x, WR - kw + 1, WR); xb = xa + kw - 1;
            }
            const double cnt = (double)((yb - ya + 1) * (xb - xa + 1));
            acc[i][k] += fabsf((float)(zm_box(sat, pitch, ya, yb, xa, xb) / cnt));
        }
    }
}

__device__ __forceinline__ void zm_store(const float (&acc)[ZM_PPT][ZM_KG], float* out, int slab, int hw, int kn) {
#pragma unroll
    for (int i = 0; i < ZM_PPT; ++i) {
        const int p = (slab * ZM_PPT + i) * (int)blockDim.x + (int)threadIdx.x;
        if (p >= hw) continue;
#pragma unroll
        for (int k = 0; k < ZM_KG; ++k)
            if (k < kn) out[(i64)k * hw + p] = acc[i][k];
    }
}

__device__ __forceinline__ void zm_zero(float (&acc)[ZM_PPT][ZM_KG]) {
#pragma unroll
    for (int i = 0; i < ZM_PPT; ++i)
#pragma unroll
        for (int k = 0; k < ZM_KG; ++k) acc[i][k] = 0.f;
}

// Work item = (sample n, channel chunk, kernel group); blocks loop over items (persistent grid).
// partial[n][chunk][k][p] = sum over the chunk's channels of |box_k mean of z|(p).
// SAT buffer: dynamic shared memory (scratch == 0) or this block's slot of global scratch.
// A block holds `sats` channel SATs at once; with several pixel slabs the launch guarantees
// chunk <= sats, so each slab's accumulators are complete before they are stored.
template <typename T>
__device__ __forceinline__ void zm_pooled(const T* feat, i64 sN, i64 sC, i64 sH, i64 sW, const float* mu,
                                          const float* sigma, float eps, int N, int C, int h, int w, int HR, int WR,
                                          int mode, const int* kern, int K, int chunk, int n_chunks, int sats,
                                          int n_slabs, int pitch, double* scratch, float* partial) {
    extern __shared__ double zm_smem[];
    const int hw = HR * WR, sat_elems = (HR + 1) * pitch;
    double* buf = scratch ? scratch + (i64)blockIdx.x * sats * sat_elems : zm_smem;
    const int kgroups = (K + ZM_KG - 1) / ZM_KG, items = N * n_chunks * kgroups;
    float acc[ZM_PPT][ZM_KG];
    for (int item = blockIdx.x; item < items; item += gridDim.x) {
        const int kg = item % kgroups, rest = item / kgroups;
        const int ch = rest % n_chunks, n = rest / n_chunks;
        const int c0 = ch * chunk, c1 = min(c0 + chunk, C);
        const int k0 = kg * ZM_KG, kn = min(ZM_KG, K - k0);
        float* out = partial + ((i64)(n * n_chunks + ch) * K + k0) * hw;
        zm_zero(acc);
        for (int cg = c0; cg < c1; cg += sats) {
            const int ns = min(sats, c1 - cg);
            __syncthreads();  // previous readers of buf are done
            zm_fill(buf, ns, cg, feat + (i64)n * sN, sC, sH, sW, mu, sigma, eps, h, w, HR, WR, mode, pitch, sat_elems);
            __syncthreads();
            zm_scan_rows(buf, ns, HR, WR, pitch, sat_elems);
            __syncthreads();
            zm_scan_cols(buf, ns, HR, WR, pitch, sat_elems);
            __syncthreads();
            for (int slab = 0; slab < n_slabs; ++slab) {
                if (n_slabs > 1) zm_zero(acc);
                for (int s = 0; s < ns; ++s)
                    zm_eval(acc, buf + (i64)s * sat_elems, pitch, slab, HR, WR, mode, kern + 2 * k0, kn);
                if (n_slabs > 1) zm_store(acc, out, slab, hw, kn);
            }
        }
        if (n_slabs == 1) zm_store(acc, out, 0, hw, kn);
    }
}

#define ZM_POOLED_ARGS(T)                                                                                   \
    const T *feat, i64 sN, i64 sC, i64 sH, i64 sW, const float *mu, const float *sigma, float eps, int N, \
        int C, int h, int w, int HR, int WR, int mode, const int *kern, int K, int chunk, int n_chunks,     \
        int sats, int n_slabs, int pitch, double *scratch, float *partial
#define ZM_POOLED_CALL \
    feat, sN, sC, sH, sW, mu, sigma, eps, N, C, h, w, HR, WR, mode, kern, K, chunk, n_chunks, sats, n_slabs, pitch, \
        scratch, partial

extern "C" __global__ void __launch_bounds__(ZM_THREADS_MAX) zm_pooled_f32(ZM_POOLED_ARGS(float)) {
    zm_pooled<float>(ZM_POOLED_CALL);
}
extern "C" __global__ void __launch_bounds__(ZM_THREADS_MAX) zm_pooled_f16(ZM_POOLED_ARGS(zm_half)) {
    zm_pooled<zm_half>(ZM_POOLED_CALL);
}

__device__ __forceinline__ float zm_warp_max(float v) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(ZM_FULL, v, off));
    return v;
}

__device__ __forceinline__ double zm_warp_sum(double v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(ZM_FULL, v, off);
    return v;
}

// grid (ceil(hw / blockDim), N). rec = this layer's record in the cascade table.
// P[n][koff + k][p] = (sum over chunks of partial) / C; qmax[n][layer][cas][j] = max_p prod_{i<=j} p_idx[i].
extern "C" __global__ void zm_reduce_layer(const float* partial, int n_chunks, int C, int hw, float* pall, int ktot,
                                           const int* rec, unsigned int* qmax, int layer, int L) {
    const int n = blockIdx.y, p = blockIdx.x * blockDim.x + threadIdx.x;
    const bool on = p < hw;
    const int koff = rec[0], K = rec[1];
    float* pout = pall + ((i64)n * ktot + koff) * hw;
    if (on) {
        for (int k = 0; k < K; ++k) {
            float s = 0.f;
            for (int c = 0; c < n_chunks; ++c) s += partial[((i64)(n * n_chunks + c) * K + k) * hw + p];
            pout[(i64)k * hw + p] = s / (float)C;
        }
    }
    for (int cas = 0; cas < 2; ++cas) {
        const int len = rec[2 + cas];
        const int* idx = rec + 4 + cas * ZM_LMAX;
        float q = 0.f;
        for (int j = 0; j + 1 < len; ++j) {  // the last stage's maximum is never used
            const float pj = on ? pout[(i64)idx[j] * hw + p] : 0.f;
            q = (j == 0) ? pj : q * pj;
            const float m = zm_warp_max(on ? q : 0.f);
            if ((threadIdx.x & 31) == 0)
                atomicMax(qmax + ((i64)(n * L + layer) * 2 + cas) * ZM_LMAX + j, __float_as_uint(m));
        }
    }
}

__device__ __forceinline__ float zm_sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
__device__ __forceinline__ float zm_max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

// grid (ceil(hw / blockDim), N). Cascade H = p0; H = H / (1 + max H) * p_j, with max H_j recovered as
// qmax_j / prod_{i<j} (1 + max H_i); then max over layers, fusion block, score sums.
// fusion: (w1, b1, w2, b2, w3, b3, w4, b4) or 0 for heatmaps only. sums[n] = (sum hs*hd*soft, sum soft).
extern "C" __global__ void zm_fuse(const float* pall, int ktot, int hw, const int* table, int L,
                                   const unsigned int* qmax, const float* fusion, float* hs_out, float* hd_out,
                                   float* soft_out, double* sums) {
    __shared__ double red[2][ZM_THREADS_MAX / 32];
    const int n = blockIdx.y, p = blockIdx.x * blockDim.x + threadIdx.x;
    const bool on = p < hw;
    double a = 0.0, b = 0.0;
    if (on) {
        float hmax[2] = {0.f, 0.f};
        bool seen[2] = {false, false};
        for (int l = 0; l < L; ++l) {
            const int* rec = table + l * ZM_REC;
            const float* pl = pall + ((i64)n * ktot + rec[0]) * hw + p;
            for (int cas = 0; cas < 2; ++cas) {
                const int len = rec[2 + cas];
                if (len == 0) continue;
                const int* idx = rec + 4 + cas * ZM_LMAX;
                const unsigned int* qm = qmax + ((i64)(n * L + l) * 2 + cas) * ZM_LMAX;
                float heat = pl[(i64)idx[0] * hw], peak = __uint_as_float(qm[0]), scale = 1.f;
                for (int j = 1; j < len; ++j) {
                    heat = heat / (1.f + peak) * pl[(i64)idx[j] * hw];
                    scale = scale * (1.f + peak);
                    if (j + 1 < len) peak = __uint_as_float(qm[j]) / scale;
                }
                hmax[cas] = seen[cas] ? zm_max_nan(hmax[cas], heat) : heat;
                seen[cas] = true;
            }
        }
        const float hs = hmax[0], hd = hmax[1];
        hs_out[(i64)n * hw + p] = hs;
        hd_out[(i64)n * hw + p] = hd;
        if (fusion) {
            const float g = zm_sigmoid(fusion[0] * tanhf(fusion[2] * hd + fusion[3]) + fusion[1]);
            const float soft = zm_sigmoid(fusion[6] * tanhf(fusion[4] * (hs * g) + fusion[5]) + fusion[7]);
            soft_out[(i64)n * hw + p] = soft;
            a = (double)(hs * hd * soft);
            b = (double)soft;
        }
    }
    if (!fusion) return;  // uniform across the grid: no barrier below is skipped by part of a block
    a = zm_warp_sum(a);
    b = zm_warp_sum(b);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) { red[0][warp] = a; red[1][warp] = b; }
    __syncthreads();
    if (warp == 0) {
        a = lane < nwarps ? red[0][lane] : 0.0;
        b = lane < nwarps ? red[1][lane] : 0.0;
        a = zm_warp_sum(a);
        b = zm_warp_sum(b);
        if (lane == 0) {
            atomicAdd(sums + 2 * n, a);
            atomicAdd(sums + 2 * n + 1, b);
        }
    }
}

// grid (ceil(H*W / blockDim), N). d = sum(hs*hd*soft) / (1 + sum(soft)); flagged = d > lambda0;
// keep-mask: 0 where the upsampled soft mask exceeds thr on flagged frames ('same': bilinear then
// threshold; 'demo': threshold at the working size, nearest upsample), 1 elsewhere.
extern "C" __global__ void zm_mask(const float* soft, int HR, int WR, const double* sums, float lambda0, float thr,
                                   int mode, int H, int W, float* score_out, unsigned char* flag_out, float* mask) {
    const int n = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
    const float d = (float)sums[2 * n] / (1.f + (float)sums[2 * n + 1]);
    const bool flag = d > lambda0;
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        score_out[n] = d;
        flag_out[n] = flag ? 1 : 0;
    }
    if (i >= H * W) return;
    float keep = 1.f;
    if (flag) {
        const int y = i / W, x = i - (i / W) * W;
        const float* sm = soft + (i64)n * HR * WR;
        float v;
        if (mode == 0) {
            const ZmLerp ly = zm_linear(y, HR, H), lx = zm_linear(x, WR, W);
            v = zm_blend(ly, lx, sm[ly.i0 * WR + lx.i0], sm[ly.i0 * WR + lx.i1], sm[ly.i1 * WR + lx.i0],
                         sm[ly.i1 * WR + lx.i1]);
        } else {
            v = sm[zm_nearest(y, HR, H) * WR + zm_nearest(x, WR, W)];
        }
        keep = v > thr ? 0.f : 1.f;
    }
    mask[(i64)n * H * W + i] = keep;
}
