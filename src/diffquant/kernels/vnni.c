/* diffquant's own int8 kernels for x86 CPUs with AVX-512 VNNI (+BW, VL): a group-wise integer GEMM with the
 * per-group rescale fused into its inner loop, and symmetric dynamic activation quantization.
 * Built and loaded by kernels/vnni.py (ctypes); every function has a plain-torch oracle in the tests.
 *
 * Notation (as kernels/backend.py and kernels/segmented.py):
 *   M rows (tokens), K = G*L reduction length cut into G groups of L (L % 4 == 0), N outputs,
 *   NB = ceil(N/16) strips of 16 outputs, K4 = K/4, K8 = K/8.
 *   a      int8  [M, lda]     signed activation codes (the first K columns are used)
 *   w      uint8 weight codes plus `offset` (8 for <= 4-bit formats, 128 for 5..8-bit), VNNI order:
 *            bits8: [NB][K4][16][4]   byte = u(4q + j, 16s + c)                          (K*NB*16 bytes)
 *            bits4: [NB][K8][16][4]   byte = u(8p + j, 16s + c) | u(8p + 4 + j, 16s + c) << 4  (half that)
 *   lut    uint8 [16] or NULL (bits4 only): nibbles are indices, u = lut[nibble] (levels - min(levels) of a
 *          16-entry table such as FP4's, offset = -min(levels)); NULL: u = nibble (codes plus 8)
 *   sa     f32 [M, G] activation scales (row stride sa_rs; 0 = one row shared by all)
 *   sw     f32 [G, ldsw] weight scales, ldsw >= 16*NB (padded)
 *   bias   f32 [N] or NULL
 *   addend f32 [M, ld_addend] or NULL (a low-rank branch's output, added in the epilogue)
 *   y      f32 [M, ldy], or bf16 [M, ldy] when out_bf16 (rounded to nearest even, as torch's .to(bfloat16))
 *   y[m, n] = sum_g sa[m, g] * sw[g, n] * acc_g[m, n] + addend[m, n] + bias[n],
 *             acc_g = sum_{k in g} a[m, k] * (u[k, n] - offset)
 * The addend, the bias and the output cast are the GEMM's epilogue: no extra pass over y in float32.
 *
 * vpdpbusd multiplies unsigned by signed bytes: u (weights) is the unsigned side, so each group's int32
 * accumulator starts at -offset * sum_{k in g} a[m, k] and ends exactly at acc_g (no saturation: vpdpbusd
 * sums four u8*s8 products straight into int32). Work is cut into items, M blocks (~A_BLOCK bytes of A,
 * kept in L3 across all of N) x parts of N (blocks of NR strips), which threads take as they finish (a
 * thread slowed by another process on a shared machine takes fewer); a thread unpacks the 4-bit weights
 * of its strips once per item into an L2-resident panel, so nibbles stay the resident form. A is repacked
 * so that a micro-tile's MR rows are one stream. */

#include <immintrin.h>

#include "dq_runtime.h"

#define MR 4                   /* rows per micro-tile: MR*NR int32 + MR*NR float accumulators in zmm registers */
#define NR 3                   /* strips of 16 outputs per micro-tile */
#define STRIP 16               /* outputs per strip: one zmm of int32 */
#define QUAD_BYTES 64          /* one quad of K for one strip: 16 outputs x 4 codes */

typedef struct {
    const int8_t *a; int64_t lda;
    const uint8_t *w; int32_t bits4; int32_t offset; const uint8_t *lut;
    const float *sa; int64_t sa_rs;
    const float *sw; int64_t ldsw;
    const float *bias; const float *addend; int64_t ld_addend; void *y; int64_t ldy; int32_t out_bf16;
    int64_t M, N, K, L;
    int8_t *ap;               /* a repacked per tile: [ceil(M/MR)][K/4][MR][4], rows past M zero */
    int32_t *corr;            /* [M, G]: -offset * group sums of a */
    uint8_t *scratch;         /* one unpacked NR-strip panel (K/4 x 64 bytes per strip) per thread */
    WorkPlan plan;            /* work items: M blocks x parts of N, taken as threads finish */
} Gemm;

static inline __m512 bf16_round_v(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int32_t)0xFFFF0000u)));
}

static inline __mmask16 tail(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

/* y[m, 16s : 16s + 16] = v (+ bias), in the output's dtype. */
static inline void store16(const Gemm *g, int64_t m, int64_t s, __m512 v) {
    const __mmask16 mask = tail(g->N - s * 16);
    if (g->addend) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, g->addend + m * g->ld_addend + s * 16));
    if (g->bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, g->bias + s * 16));
    if (!g->out_bf16) {
        _mm512_mask_storeu_ps((float *)g->y + m * g->ldy + s * 16, mask, v);
        return;
    }
    __m512i u = _mm512_srli_epi32(_mm512_castps_si512(bf16_round_v(v)), 16);
    u = _mm512_mask_mov_epi32(u, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));  /* NaN */
    _mm256_mask_storeu_epi16((uint16_t *)g->y + m * g->ldy + s * 16, mask, _mm512_cvtepi32_epi16(u));
}

/* One micro-tile: mr rows from m0 x nr strips from s0 over all of K. panel: nr strips of K/4*64 bytes. */
static inline __attribute__((always_inline)) void tile(const Gemm *g, int mr, int nr, int64_t m0, int64_t s0,
                                                       const uint8_t *panel) {
    const int64_t G = g->K / g->L, quads = g->L / 4, strip = g->K / 4 * QUAD_BYTES;
    __m512 yf[MR][NR];
    for (int r = 0; r < MR; r++) for (int v = 0; v < NR; v++) yf[r][v] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512i acc[MR][NR];
        for (int r = 0; r < mr; r++) {
            __m512i c = _mm512_set1_epi32(g->corr[(m0 + r) * G + gi]);
            for (int v = 0; v < nr; v++) acc[r][v] = c;
        }
        const int8_t *ag = g->ap + m0 * g->K + gi * g->L * MR;  /* m0 % MR == 0 */
        const uint8_t *pg = panel + gi * quads * QUAD_BYTES;
        for (int64_t q = 0; q < quads; q++) {
            __m512i b[NR];
            for (int v = 0; v < nr; v++) b[v] = _mm512_loadu_si512(pg + v * strip + q * QUAD_BYTES);
            for (int r = 0; r < mr; r++) {
                __m512i x = _mm512_set1_epi32(load4(ag + (q * MR + r) * 4));
                for (int v = 0; v < nr; v++) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], b[v], x);
            }
        }
        for (int r = 0; r < mr; r++) {
            __m512 s = _mm512_set1_ps(g->sa[(m0 + r) * g->sa_rs + gi]);
            for (int v = 0; v < nr; v++) {
                __m512 w = _mm512_mul_ps(_mm512_loadu_ps(g->sw + gi * g->ldsw + (s0 + v) * 16), s);
                yf[r][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][v]), w, yf[r][v]);
            }
        }
    }
    for (int v = 0; v < nr; v++)
        for (int r = 0; r < mr; r++) store16(g, m0 + r, s0 + v, yf[r][v]);
}

/* Specialise tile() for every (mr, nr) so the accumulators live in registers. */
#define TILE_NR(mr) \
    switch (nr) { case 1: tile(g, mr, 1, m0, s0, panel); break; case 2: tile(g, mr, 2, m0, s0, panel); break; \
                  default: tile(g, mr, 3, m0, s0, panel); }

static void tile_any(const Gemm *g, int mr, int nr, int64_t m0, int64_t s0, const uint8_t *panel) {
    switch (mr) { case 1: TILE_NR(1); break; case 2: TILE_NR(2); break; case 3: TILE_NR(3); break; default: TILE_NR(4); }
}

/* Unpack the nibbles of nr strips from s0 into `buf`, each through the table when `decode` (one vpshufb per
 * 64 codes, on the panel only: the resident weight stays 4-bit). */
static inline __attribute__((always_inline)) void unpack_nibbles(const Gemm *g, int64_t s0, int nr, uint8_t *buf,
                                                                 const int decode) {
    const int64_t k4 = g->K / 4, k8 = g->K / 8;
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i table = decode ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)g->lut)) : low;
    for (int v = 0; v < nr; v++) {
        const uint8_t *src = g->w + (s0 + v) * k8 * QUAD_BYTES;
        uint8_t *dst = buf + v * k4 * QUAD_BYTES;
        for (int64_t p = 0; p < k8; p++) {
            __m512i x = _mm512_loadu_si512(src + p * QUAD_BYTES);
            __m512i lo = _mm512_and_si512(x, low), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
            if (decode) lo = _mm512_shuffle_epi8(table, lo), hi = _mm512_shuffle_epi8(table, hi);
            _mm512_storeu_si512(dst + 2 * p * QUAD_BYTES, lo);
            _mm512_storeu_si512(dst + (2 * p + 1) * QUAD_BYTES, hi);
        }
    }
}

/* The nr strips from s0 over all of K: a view of 8-bit weights, or 4-bit weights unpacked into `buf`
 * (an L2-resident panel, so nibbles stay the resident form and unpacking costs one pass per M block). */
static const uint8_t *panel_of(const Gemm *g, int64_t s0, int nr, uint8_t *buf) {
    if (!g->bits4) return g->w + s0 * (g->K / 4) * QUAD_BYTES;
    if (g->lut) unpack_nibbles(g, s0, nr, buf, 1);
    else unpack_nibbles(g, s0, nr, buf, 0);  /* today's nibbles, no shuffle */
    return buf;
}

#include "dq_items.h"

static size_t scratch_bytes(const Gemm *g) { return g->bits4 ? panel_bytes(g) : 0; }

static void strip_block(const Gemm *g, int64_t m_begin, int64_t m_end, int64_t s0, int nr, uint8_t *scratch) {
    tiles(g, m_begin, m_end, s0, nr, panel_of(g, s0, nr, scratch));
}

/* Repack A so that a micro-tile's rows are one stream (4 bytes of each of MR rows per K quad), and take
 * the group sums for the zero-point correction on the way. */
static void pack_a(void *ctx, int tid, int threads) {
    const Gemm *g = ctx;
    const int64_t G = g->K / g->L, tiles = (g->M + MR - 1) / MR, per = (tiles + threads - 1) / threads;
    for (int64_t tl = tid * per; tl < (tid + 1) * per && tl < tiles; tl++) {
        int8_t *dst = g->ap + tl * MR * g->K;
        for (int r = 0; r < MR; r++) {
            const int64_t m = tl * MR + r;
            for (int64_t gi = 0; gi < G && m < g->M; gi++) {
                const int8_t *src = g->a + m * g->lda + gi * g->L;
                int32_t sum = 0;
                for (int64_t k = 0; k < g->L; k++) sum += src[k];
                g->corr[m * G + gi] = -g->offset * sum;
            }
            for (int64_t q = 0; q < g->K / 4; q++) {
                int32_t v = m < g->M ? load4(g->a + m * g->lda + q * 4) : 0;
                memcpy(dst + (q * MR + r) * 4, &v, 4);
            }
        }
    }
}

/* Returns 0 on success, -1 on bad arguments or allocation failure. */
int dq_vnni_gemm(const int8_t *a, int64_t lda, const uint8_t *w, int32_t bits4, int32_t offset,
                 const float *sa, int64_t sa_rs, const float *sw, int64_t ldsw, const float *bias,
                 const float *addend, int64_t ld_addend, void *y, int64_t ldy, int32_t out_bf16, int64_t M, int64_t N,
                 int64_t K, int64_t L, int32_t threads, const uint8_t *lut) {
    if (M <= 0 || N <= 0 || L <= 0 || L % 4 || K % L || (bits4 && K % 8) || lda < K || ldy < N || (lut && !bits4))
        return -1;
    const int t = clamp_threads(threads);
    Gemm g = {.a = a, .lda = lda, .w = w, .bits4 = bits4, .offset = offset, .lut = lut, .sa = sa, .sa_rs = sa_rs,
              .sw = sw, .ldsw = ldsw, .bias = bias, .addend = addend, .ld_addend = ld_addend, .y = y, .ldy = ldy,
              .out_bf16 = out_bf16, .M = M, .N = N, .K = K, .L = L};
    plan_work(&g.plan, M, K, ((N + 15) / 16 + NR - 1) / NR, t, MR);
    g.corr = malloc(sizeof(int32_t) * (size_t)(M * (K / L)));
    g.ap = malloc((size_t)((M + MR - 1) / MR * MR * K));
    g.scratch = bits4 ? aligned_alloc(64, (size_t)t * scratch_bytes(&g)) : NULL;
    if (g.corr && g.ap && (!bits4 || g.scratch)) {
        parallel(pack_a, &g, M >= 64 ? t : 1);
        parallel(gemm_items, &g, t);
    }
    const int status = g.corr && g.ap && (!bits4 || g.scratch) ? 0 : -1;
    free(g.corr);
    free(g.ap);
    free(g.scratch);
    return status;
}

/* -- symmetric dynamic activation quantization: the AVX-512 half (notation: dq_runtime.h) ---------------- */

/* x'[m, k : k + 16] (masked lanes 0): x, divided by the divisor where there is one. */
static inline __m512 load_x(const Quant *q, int64_t m, int64_t k, __mmask16 mask) {
    __m512 v;
    if (q->bf16) {
        const uint16_t *row = (const uint16_t *)q->x + m * q->ldx;
        __m256i h = _mm256_maskz_loadu_epi16(mask, row + k);
        v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
        v = _mm512_maskz_loadu_ps(mask, (const float *)q->x + m * q->ldx + k);
    }
    if (!q->divisor) return v;
    v = _mm512_div_ps(v, _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), mask, q->divisor + k));  /* masked lanes 0 / 1 */
    return q->bf16 ? bf16_round_v(v) : v;
}

static float group_amax(const Quant *q, int64_t m, int64_t k0, int64_t k1) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 16)
        amax = _mm512_max_ps(amax, _mm512_abs_ps(load_x(q, m, k, tail(k1 - k))));
    return _mm512_reduce_max_ps(amax);
}

static void quantize_group(const Quant *q, int64_t m, int64_t k0, int64_t k1, float scale) {
    const __m512 s = _mm512_set1_ps(scale), lo = _mm512_set1_ps(q->qmin), hi = _mm512_set1_ps(q->qmax);
    int8_t *out = q->codes + m * q->width;
    for (int64_t k = k0; k < k1; k += 16) {
        __m512 v = _mm512_div_ps(load_x(q, m, k, tail(k1 - k)), s);
        if (q->bf16) v = bf16_round_v(v);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_mask_storeu_epi8(out + k, tail(k1 - k), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
    }
}

#include "dq_quantize.h"
