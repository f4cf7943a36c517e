/* What diffquant's own CPU kernels (vnni.c, avx2.c) share, whatever their instruction set: threads, work
 * items, bf16 rounding, and the scalar half of symmetric dynamic activation quantization. Included by
 * both sources; kernels/native.py hashes it with them, so a change here rebuilds both libraries. */

#ifndef DQ_RUNTIME_H
#define DQ_RUNTIME_H

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
#define A_BLOCK (2 << 20)      /* bytes of A one M block reuses across all of N: stays in L3, not in DRAM */
#define ITEMS_PER_THREAD 4     /* work items per thread, taken dynamically: a thread that finishes early takes more */
#define MIN_ROWS 64            /* rows per M block at least (a 4-bit item unpacks its weight panel once) */

static inline int32_t load4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

static inline float bf16_round(float f) {  /* to the nearest bf16, ties to even (finite f), as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    memcpy(&f, &u, 4);
    return f;
}

static int clamp_threads(int threads) { return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads; }

/* Run fn(ctx, tid, threads) on `threads` threads (this one included). Built with OpenMP (the default), the
 * threads are the process's OpenMP pool, the one torch's own CPU operators use (libgomp is loaded once per
 * process): its workers keep spinning for a while after each torch operator, and threads of our own would
 * share the cores with them (measured: a 2-thread W8A8 layer 49 ms instead of 43). Without OpenMP: pthreads,
 * and a thread that cannot be started has its share run here, so the result never depends on it. */
typedef void (*Job)(void *ctx, int tid, int threads);

#ifdef _OPENMP
#include <omp.h>

static void parallel(Job fn, void *ctx, int threads) {
    if (threads <= 1) {
        fn(ctx, 0, 1);
        return;
    }
#pragma omp parallel num_threads(threads)
    fn(ctx, omp_get_thread_num(), omp_get_num_threads());
}
#else
typedef struct { Job fn; void *ctx; int tid, threads; } Task;

static void *run_task(void *arg) { Task *t = arg; t->fn(t->ctx, t->tid, t->threads); return NULL; }

static void parallel(Job fn, void *ctx, int threads) {
    pthread_t ids[MAX_THREADS];
    Task tasks[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++) {
        tasks[t] = (Task){fn, ctx, t, threads};
        started[t] = pthread_create(&ids[t], NULL, run_task, &tasks[t]) == 0;
    }
    fn(ctx, 0, threads);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else fn(ctx, t, threads);
    }
}
#endif

/* Work items of a GEMM: M blocks of `mc` rows x `nparts` parts of the N blocks, taken as threads finish. */
typedef struct { int64_t mc, mblocks, nparts, next; } WorkPlan;

/* M blocks of about A_BLOCK bytes of A, cut into parts of N, and M blocks halved (down to MIN_ROWS rows)
 * until there are ITEMS_PER_THREAD items per thread. Two items per thread handed out statically left a
 * thread idle whenever the strip blocks did not split evenly (e.g. 2048 x 640 x 640: 14% faster with 4
 * items per thread taken dynamically); 8 per thread was slower on DiT-XL's 512 x 1152 x 1152 (-15%).
 * a_row_bytes: bytes of packed A per row (K, or more where the packing adds to it); mr: rows per tile. */
static void plan_work(WorkPlan *p, int64_t M, int64_t a_row_bytes, int64_t nblocks, int threads, int mr) {
    const int64_t want = threads > 1 ? ITEMS_PER_THREAD * threads : 1;
    p->mc = A_BLOCK / a_row_bytes / mr * mr;
    if (p->mc < mr) p->mc = mr;
    for (;;) {
        p->mblocks = (M + p->mc - 1) / p->mc;
        p->nparts = (want + p->mblocks - 1) / p->mblocks;
        if (p->nparts > nblocks) p->nparts = nblocks;
        if (p->mblocks * p->nparts >= want || p->mc <= MIN_ROWS) break;
        p->mc = p->mc / 2 / mr * mr < MIN_ROWS ? MIN_ROWS : p->mc / 2 / mr * mr;
    }
    p->next = 0;
}

static inline int64_t take_item(WorkPlan *p) { return __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED); }

/* -- symmetric dynamic activation quantization: the scalar half ------------------------------------------
 * x [M, C] (f32, or bf16 when bf16 != 0; row stride ldx elements) -> codes int8 [M, width] (columns >= C
 * are 0) and scales f32 [M, G], G = ceil(C / L), with the expression of formats/ops.py for a signed
 * symmetric format and float32 scales, in x's dtype as torch computes it, after dividing x by `divisor`
 * (f32 [C], a smoothing vector already rounded to x's dtype; NULL: none) as torch's x / divisor does:
 *   x'    = x / divisor[k]                               (bf16 x: the quotient rounded to bf16)
 *   scale = max(max_k |x'[m, k]| / qmax, FLT_MIN)        (bf16 x: the quotient rounded to bf16)
 *   code  = clamp(round_half_even(x' / scale), qmin, qmax)   (bf16 x: x' / scale rounded to bf16 first)
 * Division, not multiplication by a reciprocal, so the codes equal torch's bit for bit. The including
 * source defines the vector halves, group_amax() and quantize_group(), then includes dq_quantize.h. */

typedef struct {
    const void *x; int64_t ldx; int32_t bf16;
    int64_t M, C, L, width;
    float qmin, qmax;
    const float *divisor;
    int8_t *codes; float *scales;
} Quant;

static float scale_of(const Quant *q, float amax) {
    float scale = amax / q->qmax;
    if (q->bf16) scale = bf16_round(scale);
    return scale < 1.17549435e-38f ? 1.17549435e-38f : scale;  /* clamp(min=finfo(float32).tiny) */
}

#endif
