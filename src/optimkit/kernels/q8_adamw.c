/* Fused AdamW step with block-wise dynamic 8-bit moments (CPU).
 *
 * One call updates one parameter tensor in place: for every block of 256
 * elements, decode both moments, run the AdamW update (the float32
 * operations of optimkit's tensor-op reference path, in the same order and
 * with the same fused multiply-adds torch's CPU kernels use), then
 * re-quantize: block absmax, then the nearest map code. The three loops are
 * kept apart so that each is a plain loop the compiler vectorizes (gathers
 * for the table lookups).
 *
 * Nearest code: a small table keyed by the sign and the top 16 bits of |y|
 * (clamped to the exponents that matter, so the table stays in L1) gives
 * the lower candidate code c; the answer is c or c + 1 depending on the
 * midpoint between them (the table is built so that no key range contains
 * two midpoints).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256
#define KEY_LO ((127 - 24) << 7)
#define KEY_HI (127 << 7)
#define SPAN (KEY_HI - KEY_LO + 1)

typedef struct {
    float decay, w, b1, b2, one_minus_b2, bc2_sqrt, eps, step_value, tiny;
} hyper;

static inline void update_block(float *restrict pp, const float *restrict gg, const uint8_t *restrict mcc,
                                const uint8_t *restrict vcc, float ma, float va, int64_t len,
                                const float *restrict smap, const float *restrict umap, const hyper *h,
                                int low_weight, float *restrict mb, float *restrict vb) {
    const float w = h->w, b1 = h->b1, b2 = h->b2, omb2 = h->one_minus_b2, bc = h->bc2_sqrt,
                eps = h->eps, decay = h->decay, sv = h->step_value;
    if (low_weight) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            float gi = gg[i];
            float m = smap[mcc[i]] * ma;
            float v = umap[vcc[i]] * va;
            m = fmaf(w, gi - m, m);                 /* torch's lerp, weight < 0.5 */
            v = v * b2;
            v = fmaf(omb2 * gi, gi, v);             /* addcmul */
            float den = sqrtf(v) / bc + eps;
            float q = pp[i] * decay;                /* decoupled weight decay */
            pp[i] = q + sv * m / den;               /* addcdiv: (value * m) / den */
            mb[i] = m;
            vb[i] = v;
        }
    } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            float gi = gg[i];
            float m = smap[mcc[i]] * ma;
            float v = umap[vcc[i]] * va;
            m = fmaf(-b1, gi - m, gi);              /* torch's lerp, weight >= 0.5 */
            v = v * b2;
            v = fmaf(omb2 * gi, gi, v);
            float den = sqrtf(v) / bc + eps;
            float q = pp[i] * decay;
            pp[i] = q + sv * m / den;
            mb[i] = m;
            vb[i] = v;
        }
    }
}

static inline void encode_block(const float *restrict x, float scale, uint8_t *restrict codes, int64_t len,
                                const int32_t *restrict lut, const float *restrict mid) {
    const float inv = scale;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
        float y = x[i] / inv;
        uint32_t bits;
        memcpy(&bits, &y, 4);
        int32_t key = (int32_t)((bits & 0x7FFFFFFFu) >> 16);
        key = key < KEY_LO ? KEY_LO : (key > KEY_HI ? KEY_HI : key);
        int32_t c = lut[(int32_t)(bits >> 31) * SPAN + key - KEY_LO];
        codes[i] = (uint8_t)(c + (y >= mid[c]));
    }
}

void adamw_q8_step(float *p, const float *g, uint8_t *mc, float *mabs, uint8_t *vc, float *vabs,
                   int64_t n, float decay, float one_minus_b1, float b1, int low_weight, float b2,
                   float one_minus_b2, float bc2_sqrt, float eps, float step_value,
                   const float *smap, const float *umap,
                   const int32_t *slut, const float *smid, const int32_t *ulut, const float *umid,
                   float tiny) {
    hyper h = {decay, one_minus_b1, b1, b2, one_minus_b2, bc2_sqrt, eps, step_value, tiny};
    int64_t nblocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
        float mb[BLOCK] __attribute__((aligned(64)));
        float vb[BLOCK] __attribute__((aligned(64)));
        int64_t start = b * BLOCK;
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        update_block(p + start, g + start, mc + start, vc + start, mabs[b], vabs[b], len, smap, umap, &h,
                     low_weight, mb, vb);
        float mmax = 0.f, vmax = 0.f;
#pragma omp simd reduction(max : mmax, vmax)
        for (int64_t i = 0; i < len; ++i) {
            float a = fabsf(mb[i]), c = fabsf(vb[i]);
            mmax = a > mmax ? a : mmax;   /* not fmaxf: a libm call per element */
            vmax = c > vmax ? c : vmax;
        }
        mabs[b] = mmax;
        vabs[b] = vmax;
        encode_block(mb, mmax > tiny ? mmax : tiny, mc + start, len, slut, smid);
        encode_block(vb, vmax > tiny ? vmax : tiny, vc + start, len, ulut, umid);
    }
}
