// Host simulator for zmask_spr.cu: runs the REAL kernel source on the CPU, one fiber per CUDA thread.
//
// kernels/hostsim.py compiles this file with g++ after writing a copy of zmask_spr.cu with three
// textual changes (dynamic `extern __shared__` -> a global array, `__shared__` -> function `static`,
// the fp16 PTX instruction -> a C++ conversion) and including it here as ZM_SIM_SOURCE.
// Semantics kept: __syncthreads is a barrier over the block's live threads, warp shuffles exchange
// through a per-warp barrier (so a divergent shuffle deadlocks here instead of silently passing),
// blocks run one after another, atomics are plain read-modify-writes (one OS thread).
// Floats: no FMA contraction (-ffp-contract=off), like the kernel's explicit __f*_rn operations.
// Purpose: test indexing, synchronisation and the Python launch code without a GPU. Not fast.
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

struct zm_uint3 { unsigned x, y, z; };
static zm_uint3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
using std::max;
using std::min;

namespace sim {
struct Bar { int arrived = 0, alive = 0; long gen = 0; };
struct Fiber { ucontext_t ctx; std::vector<char> stack; bool done = false; };
static std::vector<Fiber> fibers;
static std::vector<Bar> warps;
static Bar block;
static ucontext_t sched;
static int cur = 0;
static std::function<void()> body;
static double xchg[1024];
static long progress = 0;   // barrier arrivals/releases and thread exits: a round without any is a deadlock

static void yield() { swapcontext(&fibers[cur].ctx, &sched); }
static void release_if_complete(Bar& b) {
    if (b.arrived > 0 && b.arrived >= b.alive) { b.arrived = 0; ++b.gen; ++progress; }
}
static void wait(Bar& b) {
    const long my = b.gen;
    ++progress;
    if (++b.arrived >= b.alive) { b.arrived = 0; ++b.gen; return; }
    while (b.gen == my) yield();
}
static void entry() {
    body();
    fibers[cur].done = true;
    ++progress;
    --block.alive;
    --warps[cur >> 5].alive;
    release_if_complete(block);
    release_if_complete(warps[cur >> 5]);
}
// Runs one block; returns false when the threads stopped making progress (a barrier never completes).
static bool run_block(unsigned nthreads) {
    fibers.assign(nthreads, Fiber());
    warps.assign((nthreads + 31) / 32, Bar());
    block = Bar();
    block.alive = (int)nthreads;
    for (unsigned i = 0; i < nthreads; ++i) ++warps[i >> 5].alive;
    for (unsigned i = 0; i < nthreads; ++i) {
        Fiber& f = fibers[i];
        f.stack.resize(256 * 1024);
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &sched;
        makecontext(&f.ctx, entry, 0);
    }
    for (bool any = true; any;) {
        any = false;
        const long before = progress;
        for (unsigned i = 0; i < nthreads; ++i) {
            if (fibers[i].done) continue;
            any = true;
            cur = (int)i;
            threadIdx = {i, 0, 0};
            swapcontext(&sched, &fibers[i].ctx);
        }
        if (any && progress == before) return false;   // every live thread is stuck at a barrier
    }
    return true;
}
}  // namespace sim

static inline void __syncthreads() { sim::wait(sim::block); }
template <class T> static inline T zm_sim_xchg(T v, int src) {
    sim::Bar& w = sim::warps[threadIdx.x >> 5];
    std::memcpy(&sim::xchg[threadIdx.x], &v, sizeof(T));
    sim::wait(w);
    T r;
    std::memcpy(&r, &sim::xchg[(threadIdx.x & ~31u) + (unsigned)src], sizeof(T));
    sim::wait(w);
    return r;
}
template <class T> static inline T __shfl_up_sync(unsigned, T v, int off) {
    const int lane = (int)(threadIdx.x & 31);
    const T r = zm_sim_xchg(v, lane >= off ? lane - off : lane);
    return r;
}
template <class T> static inline T __shfl_sync(unsigned, T v, int src) { return zm_sim_xchg(v, src & 31); }
template <class T> static inline T __shfl_xor_sync(unsigned, T v, int m) {
    return zm_sim_xchg(v, (int)((threadIdx.x & 31) ^ (unsigned)m));
}
template <class T> static inline T __ldg(const T* p) { return *p; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned atomicMax(unsigned* p, unsigned v) { const unsigned o = *p; *p = std::max(o, v); return o; }
static inline double atomicAdd(double* p, double v) { const double o = *p; *p = o + v; return o; }
static inline float zm_sim_h2f(unsigned short h) {
    const int e = (h >> 10) & 31, m = h & 1023;
    float v = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp((float)(m | 1024), e - 25);
    return (h & 0x8000) ? -v : v;
}

double zm_smem[1 << 16];   // dynamic shared memory: 512 KiB

#include ZM_SIM_SOURCE

template <class... A, size_t... I>
static void zm_sim_call(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<typename std::remove_reference<A>::type*>(p[I])...);
}
template <class T> static constexpr char zm_sim_code() {
    return std::is_pointer<T>::value ? 'p' : std::is_same<T, long long>::value ? 'q'
         : std::is_same<T, int>::value ? 'i' : std::is_same<T, float>::value ? 'f' : '?';
}
// Binds the kernel to its packed arguments when their type codes match its signature exactly.
template <class... A> static bool zm_sim_bind(void (*k)(A...), void** p, const char* codes) {
    if (std::string{zm_sim_code<A>()...} != codes) return false;
    sim::body = [k, p] { zm_sim_call(k, p, std::index_sequence_for<A...>{}); };
    return true;
}

// params: like cuLaunchKernel's kernelParams, one pointer per argument value; codes: one type code
// per argument (p pointer, q int64, i int32, f float32).
// Returns 0, or -1 unknown kernel, -2 too much shared memory / threads, -3 deadlock, -4 wrong arguments.
extern "C" int zm_sim_launch(const char* name, unsigned gx, unsigned gy, unsigned bx, unsigned shared,
                             void** params, const char* codes) {
    if (shared > sizeof(zm_smem) || bx < 1 || bx > 1024) return -2;
    bool ok;
    if (!std::strcmp(name, "zm_pooled_f32")) ok = zm_sim_bind(zm_pooled_f32, params, codes);
    else if (!std::strcmp(name, "zm_pooled_f16")) ok = zm_sim_bind(zm_pooled_f16, params, codes);
    else if (!std::strcmp(name, "zm_reduce_layer")) ok = zm_sim_bind(zm_reduce_layer, params, codes);
    else if (!std::strcmp(name, "zm_fuse")) ok = zm_sim_bind(zm_fuse, params, codes);
    else if (!std::strcmp(name, "zm_mask")) ok = zm_sim_bind(zm_mask, params, codes);
    else return -1;
    if (!ok) return -4;
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    for (unsigned y = 0; y < gy; ++y)
        for (unsigned x = 0; x < gx; ++x) {
            std::fill(zm_smem, zm_smem + shared / sizeof(double), NAN);   // unwritten reads show up as NaN
            blockIdx = {x, y, 0};
            if (!sim::run_block(bx)) return -3;
        }
    return 0;
}
