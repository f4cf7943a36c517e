/* The row driver of symmetric dynamic activation quantization (notation: dq_runtime.h). The including
 * source has defined, for its instruction set:
 *   float group_amax(const Quant *q, int64_t m, int64_t k0, int64_t k1)       max |x'[m, k0:k1]|
 *   void quantize_group(const Quant *q, int64_t m, int64_t k0, int64_t k1, float scale)   codes of x'[m, k0:k1] */

#ifndef DQ_QUANTIZE_H
#define DQ_QUANTIZE_H

/* A row's group ranges first, then its codes: the reductions of consecutive groups overlap instead of
 * each group's division waiting for its own reduction. */
static void quantize_rows(void *ctx, int tid, int threads) {
    const Quant *q = ctx;
    const int64_t G = (q->C + q->L - 1) / q->L, rows = (q->M + threads - 1) / threads;
    const int64_t end = (tid + 1) * rows < q->M ? (tid + 1) * rows : q->M;
    for (int64_t m = tid * rows; m < end; m++) {
        float *scales = q->scales + m * G;
        for (int64_t gi = 0; gi < G; gi++)
            scales[gi] = scale_of(q, group_amax(q, m, gi * q->L, (gi + 1) * q->L < q->C ? (gi + 1) * q->L : q->C));
        for (int64_t gi = 0; gi < G; gi++)
            quantize_group(q, m, gi * q->L, (gi + 1) * q->L < q->C ? (gi + 1) * q->L : q->C, scales[gi]);
        if (q->width > q->C) memset(q->codes + m * q->width + q->C, 0, (size_t)(q->width - q->C));
    }
}

int dq_quantize_symmetric(const void *x, int64_t ldx, int32_t bf16, int64_t M, int64_t C, int64_t L,
                          int64_t width, float qmin, float qmax, const float *divisor, int8_t *codes, float *scales,
                          int32_t threads) {
    if (M < 0 || C <= 0 || L <= 0 || width < C || ldx < C || qmax <= 0) return -1;
    Quant q = {x, ldx, bf16, M, C, L, width, qmin, qmax, divisor, codes, scales};
    parallel(quantize_rows, &q, M * C >= (1 << 16) ? clamp_threads(threads) : 1);
    return 0;
}

#endif
