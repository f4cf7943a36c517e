/* diffquant's own int8 kernels for x86 CPUs with AVX2 + FMA and no AVX-512 (most desktop and laptop CPUs): a
 * group-wise integer GEMM with the per-group rescale fused into its inner loop, an exact int32 GEMM, and
 * symmetric dynamic activation quantization. Built and loaded by kernels/avx2.py (ctypes); every function
 * has a plain-torch oracle in the tests. One source, two builds:
 *   maddubs  (-mavx2 -mfma): the products come from vpmaddubsw (u8 x s8 -> pairs summed in saturating int16)
 *   dpbusd   (+ -mavxvnni, or -mavx512vnni -mavx512vl): AVX-VNNI's vpdpbusd on ymm registers (u8 x s8 ->
 *            quads summed straight into int32), VEX-encoded on Intel client CPUs, EVEX on AVX-512 ones.
 *
 * Notation (as kernels/backend.py, kernels/segmented.py, vnni.c):
 *   M rows (tokens), K = G*L reduction length cut into G groups of L (L % 4 == 0), N outputs,
 *   NB = ceil(N/8) strips of 8 outputs (one ymm of int32), K4 = K/4, K8 = K/8.
 *   a      int8  [M, lda]     signed activation codes (the first ka <= K columns are read, the rest are 0)
 *   w      uint8 weight codes plus `offset`, in strips:
 *            bytes:   [NB][K4][8][4]   byte = u(4q + j, 8s + c)                                  (K*NB*8 bytes)
 *            nibbles: [NB][K8][8][4]   byte = u(8p + j, 8s + c) | u(8p + 4 + j, 8s + c) << 4     (half that)
 *          offset: 8 for nibbles (<= 4-bit formats); for bytes 128 in the dpbusd build and 0 in the maddubs
 *          build, whose byte codes must lie in [-127, 127] (below)
 *   lut    uint8 [16] or NULL (nibbles only): nibbles are indices, u = lut[nibble] (levels - min(levels) of a
 *          16-entry table such as FP4's, offset = -min(levels)); NULL: u = nibble (codes plus 8)
 *   sa     f32 [M, G] activation scales (row stride sa_rs; 0 = one row shared by all)
 *   sw     f32 [G, ldsw] weight scales, ldsw >= 8*NB (padded)
 *   bias   f32 [N] or NULL
 *   addend f32 [M, ld_addend] or NULL (a low-rank branch's output, added in the epilogue)
 *   y      f32 [M, ldy], or bf16 [M, ldy] when out_bf16 (rounded to nearest even, as torch's .to(bfloat16)),
 *          or int32 [M, ldy] (dq_int_gemm: G = 1, no scales)
 *   y[m, n] = sum_g sa[m, g] * sw[g, n] * acc_g[m, n] + addend[m, n] + bias[n],
 *             acc_g = sum_{k in g} a[m, k] * (u[k, n] - offset)
 *
 * Exact int32 sums without VNNI. vpmaddubsw multiplies unsigned by signed bytes and adds adjacent products in
 * saturating int16, so each kind of weight takes the products whose pair sums cannot saturate:
 *   nibbles (u = w + 8 in [0, 15], or lut[nibble] in [0, umax]) x a in [-128, 127]: a pair is at most
 *     2*umax*128 (umax = 15 without a table), so the int16 sums of `chunk` = 32767 / (2*umax*max|a|)
 *     consecutive quads are exact (8 quads for 8-bit activations, all of a 64-input group for 4-bit ones;
 *     a table needs chunk >= 1, i.e. umax <= 127 for 8-bit activations); vpmaddwd with ones then widens them
 *     into int32. Each group's int32 accumulator starts at -offset * sum_{k in g} a[m, k], as in vnni.c.
 *   bytes (w in [-127, 127]) x a in [-128, 127]: sign transfer, |a| (u8, up to 128) times sign(a)*w (s8, in
 *     [-127, 127]): a pair is at most 2*128*127 = 32512 < 32767, exact with no split into two GEMMs. The signs
 *     of a quad's four activations are one of 16 patterns, so instead of negating weights per product
 *     (vpsignb: a fourth instruction per 32 products, and the one that bound the loop) the kernel writes all
 *     16 sign variants of a few quads of its weight strips into an L1-resident table (build_variants, KC
 *     quads at a time, shared by all micro-tiles of an M block) and each row reads the variant its pattern
 *     names: vpmaddubsw straight from memory, then vpmaddwd and vpaddd (3 instructions per 32 products
 *     instead of 4: W8A8 4096 x 4096 x 1024 at 2 threads 125 -> 96 ms). A is packed as |a| and the
 *     pattern's byte offset. A weight code of -128 has no negation in int8: the fused path refuses such
 *     weights (kernels/avx2.py) and the plain GEMM splits them off.
 * Work items, the repacked A and the 4-bit weight panels (unpacked per item, L2-resident, so nibbles stay
 * the resident form) are as in vnni.c. */

#include <immintrin.h>

#include "dq_runtime.h"

#if defined(__AVXVNNI__)
#define HAVE_DPBUSD 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAVE_DPBUSD 1
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#else
#define HAVE_DPBUSD 0
#endif

#define MR 4                   /* rows per micro-tile */
#define NR 2                   /* strips of 8 outputs per micro-tile: MR*NR int32 accumulators in ymm registers */
#define STRIP 8                /* outputs per strip: one ymm of int32 */
#define QUAD_BYTES 32          /* one quad of K for one strip: 8 outputs x 4 codes */
#define VARIANTS 16            /* sign patterns of a quad's four activations */
#define VARIANT_BYTES (VARIANTS * QUAD_BYTES)  /* the 16 sign variants of one strip's quad */
#define KC 16                  /* quads per variant table: NR x KC x 512 bytes = 16 KB, in L1 (measured, one thread,
                                  W8A8 512 x 4096 x 4096: KC 8: 81, 16: 85, 32: 80 GMAC/s) */

enum { DOT_SIGN, DOT_NIBBLE16, DOT_DPBUSD };
enum { OUT_F32, OUT_BF16, OUT_I32 };

typedef struct {
    const int8_t *a; int64_t lda, ka;
    const uint8_t *w; int32_t bits4; int32_t offset; const uint8_t *lut;
    const float *sa; int64_t sa_rs;
    const float *sw; int64_t ldsw;
    const float *bias; const float *addend; int64_t ld_addend; void *y; int64_t ldy; int32_t out;
    int64_t M, N, K, L;
    int32_t mode;             /* DOT_*: how the products are summed */
    int64_t arow;             /* bytes per row and quad in ap: 4 (a), or 8 (|a|, then the uint16 byte offset of
                                 its sign pattern's variant: DOT_SIGN) */
    int8_t *ap;               /* a repacked (a_slot: per tile, or per variant table for DOT_SIGN), rows past M zero */
    int32_t *corr;            /* [M, G]: -offset * group sums of a (offset modes) */
    int64_t chunk;            /* quads whose int16 sums are exact (DOT_NIBBLE16) */
    int64_t kc, kc_shift;     /* quads per variant table (DOT_SIGN): KC, or a smaller power of two dividing L/4;
                                 kc == 1 << kc_shift (packing A divides by it once per quad) */
    int32_t amax[MAX_THREADS];/* max |a| seen by each thread while packing */
    uint8_t *scratch;         /* per thread: an unpacked NR-strip panel (K4 x 32 bytes per strip, nibbles), or
                                 the variant table and the M block's accumulators (DOT_SIGN) */
    WorkPlan plan;
} Gemm;

static inline __m256i tail_mask(int64_t left) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int32_t)(left < 8 ? left : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline __m256 bf16_round_v(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int32_t)0xFFFF0000u)));
}

/* Full strips use plain loads and stores: AMD's vmaskmov stores are microcoded (~10x slower), so the masked
 * forms serve the last, partial strip only. */
static inline __m256 load8(const float *p, int64_t left) {
    return left >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask(left));
}

/* y[m, 8s : 8s + 8] = v (+ addend, + bias), in the output's dtype. */
static inline void store8(const Gemm *g, int64_t m, int64_t s, __m256 v) {
    const int64_t left = g->N - s * 8;
    if (g->addend) v = _mm256_add_ps(v, load8(g->addend + m * g->ld_addend + s * 8, left));
    if (g->bias) v = _mm256_add_ps(v, load8(g->bias + s * 8, left));
    if (g->out == OUT_F32) {
        float *dst = (float *)g->y + m * g->ldy + s * 8;
        if (left >= 8) _mm256_storeu_ps(dst, v);
        else _mm256_maskstore_ps(dst, tail_mask(left), v);
        return;
    }
    __m256i u = _mm256_srli_epi32(_mm256_castps_si256(bf16_round_v(v)), 16);
    u = _mm256_blendv_epi8(u, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    uint16_t *dst = (uint16_t *)g->y + m * g->ldy + s * 8;
    if (left >= 8) {
        _mm_storeu_si128((__m128i *)dst, h);
    } else {
        uint16_t tmp[8];
        _mm_storeu_si128((__m128i *)tmp, h);
        memcpy(dst, tmp, (size_t)left * 2);
    }
}

static inline void store8_int(const Gemm *g, int64_t m, int64_t s, __m256i v) {
    int32_t *dst = (int32_t *)g->y + m * g->ldy + s * 8;
    const int64_t left = g->N - s * 8;
    if (left >= 8) _mm256_storeu_si256((__m256i *)dst, v);
    else _mm256_maskstore_epi32(dst, tail_mask(left), v);
}

/* Where row r of micro-tile tl keeps quad q of packed A: tile-major [tile][K4][MR][4] in the offset modes (a
 * micro-tile streams its rows over all of K), table-major [K4 / kc][tile][kc][MR][8] for DOT_SIGN (the pass
 * of all of an M block's micro-tiles over one variant table reads one contiguous run; tile-major, each tile's
 * part sat 2K bytes from the next and the W8A8 GEMM ran 25% slower). */
static inline int8_t *a_slot(const Gemm *g, int64_t tl, int64_t q, int r) {
    if (g->mode != DOT_SIGN) return g->ap + ((tl * (g->K / 4) + q) * MR + r) * 4;
    const int64_t tiles = (g->M + MR - 1) / MR;
    return g->ap + ((((q >> g->kc_shift) * tiles + tl) << g->kc_shift) + (q & (g->kc - 1))) * MR * 8 + r * 8;
}

/* The byte offset of a packed row-quad's sign variant (DOT_SIGN: the uint16 after |a|). */
static inline int64_t variant_offset(const int8_t *row) { uint16_t v; memcpy(&v, row + 4, 2); return v; }

/* One quad of a full MR x NR = 4 x 2 micro-tile, scheduled by hand: gcc 12 hoists the four broadcasts of
 * the intrinsics version ahead of their products and spills an accumulator to the stack (measured, one
 * thread, 4096 x 4096 x 512: nibbles 76 -> 130 GMAC/s). AT&T operand order: `op src2, src1, dst`. c: the 8
 * accumulators; a: the quad's MR rows in packed A; w0, w1: the two strips; p0..p3: each row's variants. */
#define NIBBLE_ROW(r) \
    "vpbroadcastd " #r "*4(%[a]), %[x]\n\t" \
    "vpmaddubsw %[x], %[w0], %[t]\n\t"   /* pairs of (u = w + 8) * a, exact in int16 */ \
    "vpaddw %[t], %[c" #r "0], %[c" #r "0]\n\t" \
    "vpmaddubsw %[x], %[w1], %[t]\n\t" \
    "vpaddw %[t], %[c" #r "1], %[c" #r "1]\n\t"
#define VARIANT_PRODUCT(r, v) \
    "vpmaddubsw " #v "*512(%[p" #r "]), %[ax], %[t]\n\t"   /* pairs of |a| * sign(a)w: exact in int16 */ \
    "vpmaddwd %[ones], %[t], %[t]\n\t" \
    "vpaddd %[t], %[c" #r #v "], %[c" #r #v "]\n\t"
#define VARIANT_ROW(r) \
    "vpbroadcastd " #r "*8(%[a]), %[ax]\n\t" VARIANT_PRODUCT(r, 0) VARIANT_PRODUCT(r, 1)
#define TILE_ACCUMULATORS \
    [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), \
    [c20] "+x"(c20), [c21] "+x"(c21), [c30] "+x"(c30), [c31] "+x"(c31)
/* c += quads [q0, q1) of a full tile in int16 (DOT_NIBBLE16). pg: the group's panel, ag: its packed A. */
static inline __attribute__((always_inline)) void nibble_loop(const uint8_t *pg, int64_t strip, const int8_t *ag,
                                                              int64_t q0, int64_t q1, __m256i c[MR][NR]) {
    __m256i c00 = c[0][0], c01 = c[0][1], c10 = c[1][0], c11 = c[1][1], c20 = c[2][0], c21 = c[2][1],
            c30 = c[3][0], c31 = c[3][1];
    for (int64_t q = q0; q < q1; q++) {
        const uint8_t *b0 = pg + q * QUAD_BYTES, *b1 = b0 + strip;
        const int8_t *a = ag + q * MR * 4;
        __m256i w0, w1, x, t;
        __asm__("vmovdqu %[m0], %[w0]\n\t"
                "vmovdqu %[m1], %[w1]\n\t"
                NIBBLE_ROW(0) NIBBLE_ROW(1) NIBBLE_ROW(2) NIBBLE_ROW(3)
                : TILE_ACCUMULATORS, [w0] "=&x"(w0), [w1] "=&x"(w1), [x] "=&x"(x), [t] "=&x"(t)
                : [m0] "m"(*(const __m256i *)b0), [m1] "m"(*(const __m256i *)b1), [a] "r"(a),
                  "m"(*(const int8_t (*)[4 * MR])a));
    }
    c[0][0] = c00; c[0][1] = c01; c[1][0] = c10; c[1][1] = c11; c[2][0] = c20; c[2][1] = c21; c[3][0] = c30;
    c[3][1] = c31;
}

/* c += the kc quads of a full tile against a variant table (DOT_SIGN). a: the tile's packed A at the table's
 * first quad: per row |a| and its pattern's byte offset in the quad's table entry. */
static inline __attribute__((always_inline)) void variant_loop(const uint8_t *table, const int8_t *ag, int64_t kc,
                                                               __m256i ones, __m256i c[MR][NR]) {
    __m256i c00 = c[0][0], c01 = c[0][1], c10 = c[1][0], c11 = c[1][1], c20 = c[2][0], c21 = c[2][1],
            c30 = c[3][0], c31 = c[3][1];
    for (int64_t q = 0; q < kc; q++) {
        const int8_t *a = ag + q * MR * 8;
        const uint8_t *entry = table + q * NR * VARIANT_BYTES;
        const uint8_t *p0 = entry + variant_offset(a), *p1 = entry + variant_offset(a + 8),
                      *p2 = entry + variant_offset(a + 16), *p3 = entry + variant_offset(a + 24);
        __m256i ax, t;
        __asm__(VARIANT_ROW(0) VARIANT_ROW(1) VARIANT_ROW(2) VARIANT_ROW(3)
                : TILE_ACCUMULATORS, [ax] "=&x"(ax), [t] "=&x"(t)
                : [a] "r"(a), [p0] "r"(p0), [p1] "r"(p1), [p2] "r"(p2), [p3] "r"(p3), [ones] "x"(ones),
                  "m"(*(const int8_t (*)[8 * MR])a), "m"(*(const uint8_t (*)[NR * VARIANT_BYTES])entry));
    }
    c[0][0] = c00; c[0][1] = c01; c[1][0] = c10; c[1][1] = c11; c[2][0] = c20; c[2][1] = c21; c[3][0] = c30;
    c[3][1] = c31;
}

/* a16[r][v] += the products of quads [q0, q1) of a micro-tile in int16 (DOT_NIBBLE16; exact while
 * q1 - q0 <= chunk). ag: the group's packed A, pg: its panel. */
static inline __attribute__((always_inline)) void dot16(const Gemm *g, const int mr, const int nr, const int8_t *ag,
                                                        const uint8_t *pg, int64_t q0, int64_t q1, __m256i a16[MR][NR]) {
    const int64_t strip = g->K / 4 * QUAD_BYTES;
if (mr == MR && nr == NR) {
        nibble_loop(pg, strip, ag, q0, q1, a16);
        return;
    }
    for (int64_t q = q0; q < q1; q++) {
        __m256i b[NR];
        for (int v = 0; v < nr; v++) b[v] = _mm256_loadu_si256((const __m256i *)(pg + v * strip + q * QUAD_BYTES));
        for (int r = 0; r < mr; r++) {
            const __m256i x = _mm256_set1_epi32(load4(ag + (q * MR + r) * 4));
            for (int v = 0; v < nr; v++) a16[r][v] = _mm256_add_epi16(a16[r][v], _mm256_maddubs_epi16(b[v], x));
        }
    }
}

/* acc[r][v] = the exact int32 sums of quads [0, quads) of a micro-tile (offset modes: without the offset's
 * correction). */
static inline __attribute__((always_inline)) void dot(const Gemm *g, const int mr, const int nr, const int mode,
                                                      const int8_t *ag, const uint8_t *pg, int64_t quads,
                                                      __m256i acc[MR][NR]) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < mr; r++) for (int v = 0; v < nr; v++) acc[r][v] = _mm256_setzero_si256();
    if (mode == DOT_NIBBLE16) {
        /* One chunk (4-bit activations: a whole group): the int32 sums exist only after the loop, so the
         * int16 ones have the registers to themselves. */
        const int single = quads <= g->chunk;
        for (int64_t c0 = 0; c0 < quads; c0 += g->chunk) {
            __m256i a16[MR][NR];
            for (int r = 0; r < mr; r++) for (int v = 0; v < nr; v++) a16[r][v] = _mm256_setzero_si256();
            dot16(g, mr, nr, ag, pg, c0, c0 + g->chunk < quads ? c0 + g->chunk : quads, a16);
            for (int r = 0; r < mr; r++)
                for (int v = 0; v < nr; v++) {
                    const __m256i wide = _mm256_madd_epi16(a16[r][v], ones);
                    acc[r][v] = single || c0 == 0 ? wide : _mm256_add_epi32(acc[r][v], wide);
                }
        }
        return;
    }
#if HAVE_DPBUSD
    const int64_t strip = g->K / 4 * QUAD_BYTES;
    for (int64_t q = 0; q < quads; q++) {
        __m256i b[NR];
        for (int v = 0; v < nr; v++) b[v] = _mm256_loadu_si256((const __m256i *)(pg + v * strip + q * QUAD_BYTES));
        for (int r = 0; r < mr; r++) {
            const __m256i x = _mm256_set1_epi32(load4(ag + (q * MR + r) * 4));
            for (int v = 0; v < nr; v++) acc[r][v] = DPBUSD(acc[r][v], b[v], x);
        }
    }
#endif
}

/* y[m0 + r, 8(s0 + v) ...] (+)= sa * sw * acc for group gi: the fold of a group's exact sums into the float
 * accumulators yf, and the epilogue after the last group (or the int32 output, one group). */
static inline __attribute__((always_inline)) void fold(const Gemm *g, const int mr, const int nr, int64_t m0, int64_t s0,
                                                       int64_t gi, __m256i acc[MR][NR], __m256 yf[MR][NR]) {
    if (g->out == OUT_I32) {
        for (int r = 0; r < mr; r++) for (int v = 0; v < nr; v++) store8_int(g, m0 + r, s0 + v, acc[r][v]);
        return;
    }
    for (int r = 0; r < mr; r++) {
        const __m256 s = _mm256_set1_ps(g->sa[(m0 + r) * g->sa_rs + gi]);
        for (int v = 0; v < nr; v++) {
            const __m256 w = _mm256_mul_ps(_mm256_loadu_ps(g->sw + gi * g->ldsw + (s0 + v) * 8), s);
            yf[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][v]), w, yf[r][v]);
        }
    }
    if (gi + 1 < g->K / g->L) return;
    for (int v = 0; v < nr; v++)
        for (int r = 0; r < mr; r++) store8(g, m0 + r, s0 + v, yf[r][v]);
}

/* One micro-tile of an offset mode: mr rows from m0 x nr strips from s0 over all of K. grouped = 0: one
 * group (L = K), so no float accumulators stay live across the K loop. panel: nr strips of K4*32 bytes. */
static inline __attribute__((always_inline)) void tile(const Gemm *g, const int mr, const int nr, const int mode,
                                                       const int grouped, int64_t m0, int64_t s0, const uint8_t *panel) {
    const int64_t G = grouped ? g->K / g->L : 1, groups = g->K / g->L, quads = (grouped ? g->L : g->K) / 4;
    __m256 yf[MR][NR];
    for (int r = 0; r < MR; r++) for (int v = 0; v < NR; v++) yf[r][v] = _mm256_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m256i acc[MR][NR];
        dot(g, mr, nr, mode, a_slot(g, m0 / MR, gi * quads, 0), panel + gi * quads * QUAD_BYTES, quads, acc);
        for (int r = 0; r < mr; r++) {  /* the offset's correction */
            const __m256i c = _mm256_set1_epi32(g->corr[(m0 + r) * groups + gi]);
            for (int v = 0; v < nr; v++) acc[r][v] = _mm256_add_epi32(acc[r][v], c);
        }
        fold(g, mr, nr, m0, s0, gi, acc, yf);
    }
}

/* Specialise tile() for every (mode, grouped, mr, nr) so the accumulators live in registers. */
#define TILE_NR(mode, grouped, mr) \
    if (nr == 1) tile(g, mr, 1, mode, grouped, m0, s0, panel); else tile(g, mr, 2, mode, grouped, m0, s0, panel)
#define TILE_MR(mode, grouped) \
    switch (mr) { case 1: TILE_NR(mode, grouped, 1); break; case 2: TILE_NR(mode, grouped, 2); break; \
                  case 3: TILE_NR(mode, grouped, 3); break; default: TILE_NR(mode, grouped, 4); }
#define TILE_GROUPED(mode) if (g->L < g->K) { TILE_MR(mode, 1) } else { TILE_MR(mode, 0) }

static void tile_any(const Gemm *g, int mr, int nr, int64_t m0, int64_t s0, const uint8_t *panel) {
#if HAVE_DPBUSD
    TILE_GROUPED(DOT_DPBUSD)
#else
    TILE_GROUPED(DOT_NIBBLE16)
#endif
}

/* Unpack the nibbles of nr strips from s0 into `buf`, each through the table when `decode` (one vpshufb per
 * 32 codes, on the panel only: the resident weight stays 4-bit). */
static inline __attribute__((always_inline)) void unpack_nibbles(const Gemm *g, int64_t s0, int nr, uint8_t *buf,
                                                                 const int decode) {
    const int64_t k4 = g->K / 4, k8 = g->K / 8;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i table = decode ? _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)g->lut)) : low;
    for (int v = 0; v < nr; v++) {
        const uint8_t *src = g->w + (s0 + v) * k8 * QUAD_BYTES;
        uint8_t *dst = buf + v * k4 * QUAD_BYTES;
        for (int64_t p = 0; p < k8; p++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(src + p * QUAD_BYTES));
            __m256i lo = _mm256_and_si256(x, low), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), low);
            if (decode) lo = _mm256_shuffle_epi8(table, lo), hi = _mm256_shuffle_epi8(table, hi);
            _mm256_store_si256((__m256i *)(dst + 2 * p * QUAD_BYTES), lo);
            _mm256_store_si256((__m256i *)(dst + (2 * p + 1) * QUAD_BYTES), hi);
        }
    }
}

/* The nr strips from s0 over all of K: a view of byte weights, or nibbles unpacked into `buf`. */
static const uint8_t *panel_of(const Gemm *g, int64_t s0, int nr, uint8_t *buf) {
    if (!g->bits4) return g->w + s0 * (g->K / 4) * QUAD_BYTES;
    if (g->lut) unpack_nibbles(g, s0, nr, buf, 1);
    else unpack_nibbles(g, s0, nr, buf, 0);  /* today's nibbles, no shuffle */
    return buf;
}

#include "dq_items.h"

/* -- sign transfer by variant tables (DOT_SIGN) ------------------------------------------------------------ */

/* The 16 sign variants of quads [q0, q0 + kc) of nr byte-weight strips: table[q][v][p] = w with byte j of each
 * lane negated where bit j of p is set. */
static void build_variants(const uint8_t *panel, int64_t strip, int nr, int64_t q0, int64_t kc, uint8_t *table) {
    __m256i signs[VARIANTS];
    for (int p = 0; p < VARIANTS; p++) {
        uint32_t lane = 0;
        for (int j = 0; j < 4; j++) lane |= (uint32_t)((p >> j) & 1 ? 0xFF : 0x01) << (8 * j);
        signs[p] = _mm256_set1_epi32((int32_t)lane);
    }
    for (int64_t q = 0; q < kc; q++)
        for (int v = 0; v < nr; v++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(panel + v * strip + (q0 + q) * QUAD_BYTES));
            uint8_t *entry = table + (q * NR + v) * VARIANT_BYTES;
            for (int p = 0; p < VARIANTS; p++)
                _mm256_store_si256((__m256i *)(entry + p * QUAD_BYTES), _mm256_sign_epi8(w, signs[p]));
        }
}

/* The kc quads from q0 of a micro-tile against the variant table. The int32 sums carry over in `sums` (this
 * tile's part of the M block's accumulators, NR * 8 per row) from table to table; after the last table of
 * group gi they are folded into the float ones (`floats`, likewise) or, after the last group, stored by
 * the epilogue. */
static inline __attribute__((always_inline)) void variant_tile(const Gemm *g, const int mr, const int nr, int64_t m0,
                                                               int64_t s0, int64_t q0, const uint8_t *table,
                                                               const int8_t *ag, int32_t *sums, float *floats) {
    const int64_t lq = g->L / 4, gi = q0 / lq;
    const int first = q0 % lq == 0, last = (q0 + g->kc) % lq == 0;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[MR][NR];
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nr; v++)
            acc[r][v] = first ? _mm256_setzero_si256() : _mm256_load_si256((const __m256i *)(sums + (r * NR + v) * 8));
    if (mr == MR && nr == NR) {
        variant_loop(table, ag, g->kc, ones, acc);
    } else {
        for (int64_t q = 0; q < g->kc; q++)
            for (int r = 0; r < mr; r++) {
                const int8_t *a = ag + (q * MR + r) * 8;
                const __m256i ax = _mm256_set1_epi32(load4(a));
                const uint8_t *variant = table + q * NR * VARIANT_BYTES + variant_offset(a);
                for (int v = 0; v < nr; v++) {
                    const __m256i w = _mm256_load_si256((const __m256i *)(variant + v * VARIANT_BYTES));
                    acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(_mm256_maddubs_epi16(ax, w), ones));
                }
            }
    }
    if (!last) {
        for (int r = 0; r < mr; r++)
            for (int v = 0; v < nr; v++) _mm256_store_si256((__m256i *)(sums + (r * NR + v) * 8), acc[r][v]);
        return;
    }
    __m256 yf[MR][NR];
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nr; v++) yf[r][v] = gi ? _mm256_load_ps(floats + (r * NR + v) * 8) : _mm256_setzero_ps();
    fold(g, mr, nr, m0, s0, gi, acc, yf);
    for (int r = 0; r < mr && gi + 1 < g->K / g->L; r++)
        for (int v = 0; v < nr; v++) _mm256_store_ps(floats + (r * NR + v) * 8, yf[r][v]);
}

#define VARIANT_NR(mr) \
    if (nr == 1) variant_tile(g, mr, 1, m0, s0, q0, table, ag, sums, floats); \
    else variant_tile(g, mr, 2, m0, s0, q0, table, ag, sums, floats)

static void variant_tile_any(const Gemm *g, int mr, int nr, int64_t m0, int64_t s0, int64_t q0, const uint8_t *table,
                             const int8_t *ag, int32_t *sums, float *floats) {
    switch (mr) { case 1: VARIANT_NR(1); break; case 2: VARIANT_NR(2); break; case 3: VARIANT_NR(3); break;
                  default: VARIANT_NR(4); }
}

/* A thread's DOT_SIGN scratch: the variant table, then the M block's int32 and float accumulators. */
static inline size_t variant_table_bytes(void) { return (size_t)(NR * KC * VARIANT_BYTES); }
static inline size_t block_sums_bytes(const Gemm *g) { return (size_t)((g->plan.mc + MR) * NR * 8 * 4); }

/* Rows [m_begin, m_end) x nr strips from s0 by sign transfer: for each table of kc quads, every micro-tile. */
static void sign_block(const Gemm *g, int64_t m_begin, int64_t m_end, int64_t s0, int nr, uint8_t *scratch) {
    const int64_t strip = g->K / 4 * QUAD_BYTES;
    int32_t *sums = (int32_t *)(scratch + variant_table_bytes());
    float *floats = (float *)(scratch + variant_table_bytes() + block_sums_bytes(g));
    const int64_t full = nr == NR ? m_begin + (m_end - m_begin) / MR * MR : m_begin;  /* the MR x NR tiles end */
    for (int64_t q0 = 0; q0 < g->K / 4; q0 += g->kc) {
        build_variants(g->w + s0 * strip, strip, nr, q0, g->kc, scratch);
        const int8_t *ag = a_slot(g, m_begin / MR, q0, 0);  /* the M block's run of this table's quads */
        const int64_t tile_bytes = g->kc * MR * 8;
        for (int64_t m0 = m_begin; m0 < full; m0 += MR, ag += tile_bytes)  /* specialised: no dispatch per tile */
            variant_tile(g, MR, NR, m0, s0, q0, scratch, ag, sums + (m0 - m_begin) * NR * 8,
                         floats + (m0 - m_begin) * NR * 8);
        for (int64_t m0 = full; m0 < m_end; m0 += MR, ag += tile_bytes)
            variant_tile_any(g, (int)(m_end - m0 < MR ? m_end - m0 : MR), nr, m0, s0, q0, scratch, ag,
                             sums + (m0 - m_begin) * NR * 8, floats + (m0 - m_begin) * NR * 8);
    }
}

static size_t scratch_bytes(const Gemm *g) {
    if (g->mode == DOT_SIGN) return variant_table_bytes() + 2 * block_sums_bytes(g);
    return g->bits4 ? panel_bytes(g) : 0;
}

static void strip_block(const Gemm *g, int64_t m_begin, int64_t m_end, int64_t s0, int nr, uint8_t *scratch) {
    if (g->mode == DOT_SIGN) sign_block(g, m_begin, m_end, s0, nr, scratch);
    else tiles(g, m_begin, m_end, s0, nr, panel_of(g, s0, nr, scratch));
}

/* -- packing A -------------------------------------------------------------------------------------------- */

static int32_t byte_sum(const int8_t *p, int64_t n) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(p + i))), ones16));
    int32_t lanes[8], sum = 0;
    _mm256_storeu_si256((__m256i *)lanes, acc);
    for (int j = 0; j < 8; j++) sum += lanes[j];
    for (; i < n; i++) sum += p[i];
    return sum;
}

/* The byte offset of the sign variant for a quad whose negative activations are the set bits of `pattern`. */
static inline uint16_t pattern_offset(uint32_t pattern) { return (uint16_t)((pattern & 0xF) * QUAD_BYTES); }

/* One packed row-quad: a (offset modes), or |a| and its sign variant's offset (DOT_SIGN). */
static inline void put_quad(const Gemm *g, int8_t *dst, int32_t x, int32_t ax, uint32_t pattern) {
    if (g->arow == 4) {
        memcpy(dst, &x, 4);
        return;
    }
    const uint16_t offset = pattern_offset(pattern), pad = 0;
    memcpy(dst, &ax, 4);
    memcpy(dst + 4, &offset, 2);
    memcpy(dst + 6, &pad, 2);
}

/* Quads [k/4, k/4 + 8) of the MR rows of micro-tile tl (x[r]: 32 bytes of row r; zero past M) into packed A
 * in one 4 x 8 transpose: those quads of the tile are one contiguous run in both layouts (a_slot; DOT_SIGN
 * needs kc >= 8). Unit = a row-quad: 32 bits (a), or 64 bits (|a|, offset) for DOT_SIGN. */
static inline void pack_eight_quads(const Gemm *g, int64_t tl, int64_t k, const __m256i x[MR], __m256i *amax) {
    __m256i unit[2][MR];  /* per row: units of quads 0, 1, 4, 5 | 2, 3, 6, 7 (64-bit), or all 8 (32-bit) */
    for (int r = 0; r < MR; r++) {
        const __m256i ax = _mm256_abs_epi8(x[r]);
        *amax = _mm256_max_epu8(*amax, ax);
        if (g->mode != DOT_SIGN) {
            unit[0][r] = x[r];
            continue;
        }
        const __m256i negative = _mm256_set1_epi32(_mm256_movemask_epi8(x[r]));  /* bit 4q + j: byte j of quad q < 0 */
        const __m256i pattern = _mm256_and_si256(_mm256_srlv_epi32(negative, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                                 _mm256_set1_epi32(0xF));
        const __m256i offset = _mm256_slli_epi32(pattern, 5);  /* * QUAD_BYTES */
        unit[0][r] = _mm256_unpacklo_epi32(ax, offset);
        unit[1][r] = _mm256_unpackhi_epi32(ax, offset);
    }
    int8_t *dst = a_slot(g, tl, k / 4, 0);
    __m256i out[8];
    if (g->mode == DOT_SIGN) {  /* 64-bit units: out[j] = quad j of rows 0..3 */
        for (int h = 0; h < 2; h++) {
            const __m256i lo01 = _mm256_unpacklo_epi64(unit[h][0], unit[h][1]), lo23 = _mm256_unpacklo_epi64(unit[h][2], unit[h][3]);
            const __m256i hi01 = _mm256_unpackhi_epi64(unit[h][0], unit[h][1]), hi23 = _mm256_unpackhi_epi64(unit[h][2], unit[h][3]);
            out[2 * h] = _mm256_permute2x128_si256(lo01, lo23, 0x20);
            out[2 * h + 1] = _mm256_permute2x128_si256(hi01, hi23, 0x20);
            out[2 * h + 4] = _mm256_permute2x128_si256(lo01, lo23, 0x31);
            out[2 * h + 5] = _mm256_permute2x128_si256(hi01, hi23, 0x31);
        }
        for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(dst + j * MR * 8), out[j]);
        return;
    }
    /* 32-bit units: out[j] = quads 2j, 2j + 1 of rows 0..3 */
    const __m256i lo01 = _mm256_unpacklo_epi32(unit[0][0], unit[0][1]), lo23 = _mm256_unpacklo_epi32(unit[0][2], unit[0][3]);
    const __m256i hi01 = _mm256_unpackhi_epi32(unit[0][0], unit[0][1]), hi23 = _mm256_unpackhi_epi32(unit[0][2], unit[0][3]);
    const __m256i q04 = _mm256_unpacklo_epi64(lo01, lo23), q15 = _mm256_unpackhi_epi64(lo01, lo23);
    const __m256i q26 = _mm256_unpacklo_epi64(hi01, hi23), q37 = _mm256_unpackhi_epi64(hi01, hi23);
    out[0] = _mm256_permute2x128_si256(q04, q15, 0x20);
    out[1] = _mm256_permute2x128_si256(q26, q37, 0x20);
    out[2] = _mm256_permute2x128_si256(q04, q15, 0x31);
    out[3] = _mm256_permute2x128_si256(q26, q37, 0x31);
    for (int j = 0; j < 4; j++) _mm256_storeu_si256((__m256i *)(dst + j * 32), out[j]);
}

/* Quad k/4 of row r of micro-tile tl, one byte at a time (the tail past the last whole 32 columns, and the
 * zero columns past ka); returns max |a| of the quad. */
static int32_t pack_quad(const Gemm *g, int64_t tl, int r, int64_t k) {
    const int64_t m = tl * MR + r;
    int8_t x[4], ax[4];
    uint32_t negative = 0;
    int32_t best = 0;
    for (int j = 0; j < 4; j++) {
        x[j] = m < g->M && k + j < g->ka ? g->a[m * g->lda + k + j] : 0;
        const int32_t magnitude = x[j] < 0 ? -x[j] : x[j];
        ax[j] = (int8_t)(uint8_t)magnitude;  /* |-128| = 128 as an unsigned byte */
        negative |= (uint32_t)(x[j] < 0) << j;
        best = magnitude > best ? magnitude : best;
    }
    put_quad(g, a_slot(g, tl, k / 4, r), load4(x), load4(ax), negative);
    return best;
}

/* Micro-tile tl of A into packed A, columns ka..K-1 and rows past M as 0; returns max |a|. */
static int32_t pack_tile(const Gemm *g, int64_t tl) {
    __m256i amax = _mm256_setzero_si256();
    int64_t k = 0;
    if (g->mode != DOT_SIGN || g->kc % 8 == 0)
        for (; k + 32 <= g->ka; k += 32) {
            __m256i x[MR];
            for (int r = 0; r < MR; r++)
                x[r] = tl * MR + r < g->M ? _mm256_loadu_si256((const __m256i *)(g->a + (tl * MR + r) * g->lda + k))
                                          : _mm256_setzero_si256();
            pack_eight_quads(g, tl, k, x, &amax);
        }
    uint8_t lanes[32];
    _mm256_storeu_si256((__m256i *)lanes, amax);
    int32_t best = 0;
    for (int j = 0; j < 32; j++) best = lanes[j] > best ? lanes[j] : best;
    for (; k < g->K; k += 4)
        for (int r = 0; r < MR; r++) {
            const int32_t quad = pack_quad(g, tl, r, k);
            best = quad > best ? quad : best;
        }
    return best;
}

/* Repack A so that a micro-tile's rows are one stream, and take the group sums of the offset modes. */
static void pack_a(void *ctx, int tid, int threads) {
    Gemm *g = ctx;
    const int64_t G = g->K / g->L, tiles = (g->M + MR - 1) / MR, per = (tiles + threads - 1) / threads;
    int32_t amax = 0;
    for (int64_t tl = tid * per; tl < (tid + 1) * per && tl < tiles; tl++) {
        const int32_t best = pack_tile(g, tl);
        amax = best > amax ? best : amax;
        for (int64_t m = tl * MR; m < (tl + 1) * MR && m < g->M && g->mode != DOT_SIGN; m++)
            for (int64_t gi = 0; gi < G; gi++) {
                const int64_t k0 = gi * g->L, k1 = k0 + g->L < g->ka ? k0 + g->L : g->ka;
                g->corr[m * G + gi] = k1 > k0 ? -g->offset * byte_sum(g->a + m * g->lda + k0, k1 - k0) : 0;
            }
    }
    g->amax[tid] = amax;
}

static int32_t packed_amax(const Gemm *g, int threads) {
    int32_t amax = 0;
    for (int t = 0; t < threads; t++) amax = g->amax[t] > amax ? g->amax[t] : amax;
    return amax;
}

/* Validate, pack A, run the items. Returns 0 on success, -1 on bad arguments or allocation failure. */
static int run_gemm(Gemm *g, int32_t threads) {
    if (g->M <= 0 || g->N <= 0 || g->L <= 0 || g->L % 4 || g->K % g->L || (g->bits4 && g->K % 8) || g->lda < g->ka ||
        g->ka > g->K || g->ka < 0 || g->ldy < g->N || (g->lut && !g->bits4))
        return -1;
    g->mode = HAVE_DPBUSD ? DOT_DPBUSD : g->bits4 ? DOT_NIBBLE16 : DOT_SIGN;
    /* a table brings its own offset (-min(levels)); without one the layout fixes it */
    if (!g->lut && (g->mode == DOT_SIGN ? g->offset != 0 : g->offset != (g->bits4 ? 8 : 128))) return -1;
    int32_t umax = g->lut ? 0 : 15;  /* largest unsigned nibble code: bounds the int16 sums (DOT_NIBBLE16) */
    for (int i = 0; g->lut && i < 16; i++) umax = g->lut[i] > umax ? g->lut[i] : umax;
    g->arow = g->mode == DOT_SIGN ? 8 : 4;
    const int t = clamp_threads(threads), packers = g->M >= 64 ? t : 1;
    plan_work(&g->plan, g->M, g->K * g->arow / 4, ((g->N + 7) / 8 + NR - 1) / NR, t, MR);
    for (g->kc = KC, g->kc_shift = 0; 1 << g->kc_shift < KC; g->kc_shift++) {}
    for (; (g->L / 4) % g->kc; g->kc /= 2, g->kc_shift--) {}  /* tables never straddle a group */
    g->corr = malloc(sizeof(int32_t) * (size_t)(g->M * (g->K / g->L)));
    g->ap = malloc((size_t)((g->M + MR - 1) / MR * MR * (g->K / 4) * g->arow));
    g->scratch = scratch_bytes(g) ? aligned_alloc(32, (size_t)t * scratch_bytes(g)) : NULL;
    int ok = g->corr && g->ap && (!scratch_bytes(g) || g->scratch);
    if (ok) {
        parallel(pack_a, g, packers);
        const int32_t amax = packed_amax(g, packers);
        g->chunk = amax && umax ? 32767 / (2 * umax * amax) : g->K;  /* quads whose int16 pair sums stay exact */
        ok = g->mode != DOT_NIBBLE16 || g->chunk >= 1;  /* a table too wide for these activations' pairs */
        if (ok) parallel(gemm_items, g, t);
    }
    free(g->corr);
    free(g->ap);
    free(g->scratch);
    return ok ? 0 : -1;
}

int dq_gemm(const int8_t *a, int64_t lda, const uint8_t *w, int32_t bits4, int32_t offset, const float *sa,
            int64_t sa_rs, const float *sw, int64_t ldsw, const float *bias, const float *addend, int64_t ld_addend,
            void *y, int64_t ldy, int32_t out_bf16, int64_t M, int64_t N, int64_t K, int64_t L, int32_t threads,
            const uint8_t *lut) {
    Gemm g = {.a = a, .lda = lda, .ka = K, .w = w, .bits4 = bits4, .offset = offset, .lut = lut, .sa = sa,
              .sa_rs = sa_rs, .sw = sw, .ldsw = ldsw, .bias = bias, .addend = addend, .ld_addend = ld_addend, .y = y,
              .ldy = ldy, .out = out_bf16 ? OUT_BF16 : OUT_F32, .M = M, .N = N, .K = K, .L = L};
    return run_gemm(&g, threads);
}

/* y int32 [M, ldy] = a[:, :ka] @ (u - offset), exactly (one group, no scales). */
int dq_int_gemm(const int8_t *a, int64_t lda, int64_t ka, const uint8_t *w, int32_t bits4, int32_t offset,
                int32_t *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int32_t threads) {
    Gemm g = {.a = a, .lda = lda, .ka = ka, .w = w, .bits4 = bits4, .offset = offset, .y = y, .ldy = ldy,
              .out = OUT_I32, .M = M, .N = N, .K = K, .L = K};
    return run_gemm(&g, threads);
}

/* -- symmetric dynamic activation quantization: the AVX2 half (notation: dq_runtime.h) -------------------- */

/* x'[m, k : k + 8] (lanes past `left` 0): x, divided by the divisor where there is one. */
static inline __m256 load_x(const Quant *q, int64_t m, int64_t k, int64_t left) {
    __m256 v;
    if (q->bf16) {
        const uint16_t *row = (const uint16_t *)q->x + m * q->ldx + k;
        uint16_t tmp[8] = {0};
        memcpy(tmp, row, (size_t)(left < 8 ? left : 8) * 2);
        const __m128i h = _mm_loadu_si128((const __m128i *)tmp);
        v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        v = load8((const float *)q->x + m * q->ldx + k, left);
    }
    if (!q->divisor) return v;
    const __m256 divisor = left >= 8 ? _mm256_loadu_ps(q->divisor + k)  /* lanes past `left`: 0 / 1 */
                                     : _mm256_blendv_ps(_mm256_set1_ps(1.0f), load8(q->divisor + k, left),
                                                        _mm256_castsi256_ps(tail_mask(left)));
    v = _mm256_div_ps(v, divisor);
    return q->bf16 ? bf16_round_v(v) : v;
}

static float group_amax(const Quant *q, int64_t m, int64_t k0, int64_t k1) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 amax = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; k += 8) amax = _mm256_max_ps(amax, _mm256_and_ps(load_x(q, m, k, k1 - k), magnitude));
    float lanes[8], best = 0.0f;
    _mm256_storeu_ps(lanes, amax);
    for (int j = 0; j < 8; j++) best = lanes[j] > best ? lanes[j] : best;
    return best;
}

static void quantize_group(const Quant *q, int64_t m, int64_t k0, int64_t k1, float scale) {
    const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(q->qmin), hi = _mm256_set1_ps(q->qmax);
    int8_t *out = q->codes + m * q->width;
    for (int64_t k = k0; k < k1; k += 8) {
        __m256 v = _mm256_div_ps(load_x(q, m, k, k1 - k), s);
        if (q->bf16) v = bf16_round_v(v);
        v = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        const __m256i i = _mm256_cvtps_epi32(v);
        const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        const __m128i i8 = _mm_packs_epi16(i16, i16);
        if (k1 - k >= 8) {
            _mm_storel_epi64((__m128i *)(out + k), i8);
        } else {
            int8_t tmp[16];
            _mm_storeu_si128((__m128i *)tmp, i8);
            memcpy(out + k, tmp, (size_t)(k1 - k));
        }
    }
}

#include "dq_quantize.h"
