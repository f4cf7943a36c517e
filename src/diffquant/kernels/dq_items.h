/* The work-item loop of diffquant's GEMMs (vnni.c, avx2.c). The including source has defined STRIP (outputs
 * per strip), MR, NR (micro-tile rows and strips), QUAD_BYTES (bytes of one strip per quad of K: STRIP * 4),
 * a Gemm struct with M, N, K, bits4, scratch and plan (WorkPlan), and
 *   void tile_any(const Gemm *g, int mr, int nr, int64_t m0, int64_t s0, const uint8_t *panel)
 * and defines after it
 *   size_t scratch_bytes(const Gemm *g)    one thread's scratch (unpacked panels and the like; 0: none)
 *   void strip_block(const Gemm *g, int64_t m_begin, int64_t m_end, int64_t s0, int nr, uint8_t *scratch)
 *                                          rows [m_begin, m_end) x the nr strips from s0 */

#ifndef DQ_ITEMS_H
#define DQ_ITEMS_H

static size_t scratch_bytes(const Gemm *g);
static void strip_block(const Gemm *g, int64_t m_begin, int64_t m_end, int64_t s0, int nr, uint8_t *scratch);

/* One work item: an M block x a range of NR-strip blocks. */
static void run_item(const Gemm *g, int64_t item, uint8_t *scratch) {
    const int64_t strips = (g->N + STRIP - 1) / STRIP, blocks = (strips + NR - 1) / NR;
    const int64_t mb = item / g->plan.nparts, part = item % g->plan.nparts;
    const int64_t m_begin = mb * g->plan.mc, m_end = m_begin + g->plan.mc < g->M ? m_begin + g->plan.mc : g->M;
    for (int64_t j = part * blocks / g->plan.nparts; j < (part + 1) * blocks / g->plan.nparts; j++) {
        const int64_t s0 = j * NR;
        strip_block(g, m_begin, m_end, s0, (int)(strips - s0 < NR ? strips - s0 : NR), scratch);
    }
}

/* The micro-tiles of rows [m_begin, m_end) against one panel of nr strips from s0. */
static void tiles(const Gemm *g, int64_t m_begin, int64_t m_end, int64_t s0, int nr, const uint8_t *panel) {
    for (int64_t m0 = m_begin; m0 < m_end; m0 += MR) tile_any(g, (int)(m_end - m0 < MR ? m_end - m0 : MR), nr, m0, s0, panel);
}

/* Bytes of one thread's unpacked 4-bit panel: NR strips over all of K. */
static inline size_t panel_bytes(const Gemm *g) { return (size_t)(g->K / 4 * QUAD_BYTES * NR); }

/* A thread's share: items taken as it finishes the previous one (a thread slowed by another process on a
 * shared machine takes fewer). */
static void gemm_items(void *ctx, int tid, int threads) {
    Gemm *g = ctx;
    (void)threads;
    uint8_t *scratch = g->scratch ? g->scratch + (size_t)tid * scratch_bytes(g) : NULL;
    const int64_t items = g->plan.mblocks * g->plan.nparts;
    for (int64_t item = take_item(&g->plan); item < items; item = take_item(&g->plan)) run_item(g, item, scratch);
}

#endif
