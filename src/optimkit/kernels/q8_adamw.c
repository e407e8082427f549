/* Fused AdamW step with block-wise dynamic 8-bit moments (CPU).
 *
 * One call updates one parameter tensor in place: for every block of 256
 * elements, decode both moments, run the AdamW update (the float32
 * operations of optimkit's tensor-op reference path, in the same order and
 * with the same fused multiply-adds torch's CPU kernels use), then
 * re-quantize: block absmax, then the nearest map code. Divisions by a
 * per-block or per-step constant are multiplications by its reciprocal here
 * (the reference divides): that moves a result by at most an ulp, which can
 * only change a code when a value sits on a rounding tie. The three loops are
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


#if defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_AVX512 1

/* table[idx] for 16 indices in [0, 255], from a 256-float table held in 16
 * registers: eight two-register permutes, then blends on index bits 5-7. */
static inline __m512 lookup256(const __m512 *t, __m512i idx) {
    __m512 r0 = _mm512_permutex2var_ps(t[0], idx, t[1]);
    __m512 r1 = _mm512_permutex2var_ps(t[2], idx, t[3]);
    __m512 r2 = _mm512_permutex2var_ps(t[4], idx, t[5]);
    __m512 r3 = _mm512_permutex2var_ps(t[6], idx, t[7]);
    __m512 r4 = _mm512_permutex2var_ps(t[8], idx, t[9]);
    __m512 r5 = _mm512_permutex2var_ps(t[10], idx, t[11]);
    __m512 r6 = _mm512_permutex2var_ps(t[12], idx, t[13]);
    __m512 r7 = _mm512_permutex2var_ps(t[14], idx, t[15]);
    __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
    __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
    __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
    __m512 s0 = _mm512_mask_blend_ps(b5, r0, r1), s1 = _mm512_mask_blend_ps(b5, r2, r3);
    __m512 s2 = _mm512_mask_blend_ps(b5, r4, r5), s3 = _mm512_mask_blend_ps(b5, r6, r7);
    __m512 u0 = _mm512_mask_blend_ps(b6, s0, s1), u1 = _mm512_mask_blend_ps(b6, s2, s3);
    return _mm512_mask_blend_ps(b7, u0, u1);
}

static inline void load_table(__m512 *t, const float *values) {
    for (int k = 0; k < 16; ++k) t[k] = _mm512_loadu_ps(values + 16 * k);
}

/* The update loop of update_block, 16 elements at a time; returns how many
 * elements it handled (the rest go through the scalar loop). */
static inline int64_t update_block_avx512(float *restrict pp, const float *restrict gg,
                                          const uint8_t *restrict mcc, const uint8_t *restrict vcc,
                                          float ma, float va, int64_t len, const __m512 *st,
                                          const __m512 *ut, const hyper *h, int low_weight,
                                          float *restrict mb, float *restrict vb) {
    const __m512 w = _mm512_set1_ps(h->w), nb1 = _mm512_set1_ps(-h->b1), b2 = _mm512_set1_ps(h->b2);
    const __m512 omb2 = _mm512_set1_ps(h->one_minus_b2), inv_bc = _mm512_set1_ps(1.0f / h->bc2_sqrt);
    const __m512 eps = _mm512_set1_ps(h->eps), decay = _mm512_set1_ps(h->decay);
    const __m512 sv = _mm512_set1_ps(h->step_value), mav = _mm512_set1_ps(ma), vav = _mm512_set1_ps(va);
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
        __m512i mi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mcc + i)));
        __m512i vi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(vcc + i)));
        __m512 m = _mm512_mul_ps(lookup256(st, mi), mav);
        __m512 v = _mm512_mul_ps(lookup256(ut, vi), vav);
        __m512 g = _mm512_loadu_ps(gg + i);
        __m512 d = _mm512_sub_ps(g, m);
        m = low_weight ? _mm512_fmadd_ps(w, d, m) : _mm512_fmadd_ps(nb1, d, g);
        v = _mm512_mul_ps(v, b2);
        v = _mm512_fmadd_ps(_mm512_mul_ps(omb2, g), g, v);
        __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), inv_bc), eps);
        __m512 q = _mm512_mul_ps(_mm512_loadu_ps(pp + i), decay);
        _mm512_storeu_ps(pp + i, _mm512_add_ps(q, _mm512_div_ps(_mm512_mul_ps(sv, m), den)));
        _mm512_store_ps(mb + i, m);
        _mm512_store_ps(vb + i, v);
    }
    return i;
}

static inline int64_t encode_block_avx512(const float *restrict x, float scale, uint8_t *restrict codes,
                                          int64_t len, const int32_t *restrict lut, const __m512 *midt) {
    const __m512 s = _mm512_set1_ps(1.0f / scale);
    const __m512i lo = _mm512_set1_epi32(KEY_LO), hi = _mm512_set1_epi32(KEY_HI);
    const __m512i span = _mm512_set1_epi32(SPAN), absmask = _mm512_set1_epi32(0x7FFFFFFF);
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
        __m512 y = _mm512_mul_ps(_mm512_load_ps(x + i), s);
        __m512i bits = _mm512_castps_si512(y);
        __m512i key = _mm512_srli_epi32(_mm512_and_si512(bits, absmask), 16);
        key = _mm512_min_epi32(_mm512_max_epi32(key, lo), hi);
        __m512i slot = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(bits, 31), span),
                                        _mm512_sub_epi32(key, lo));
        __m512i c = _mm512_i32gather_epi32(slot, lut, 4);
        __mmask16 up = _mm512_cmp_ps_mask(y, lookup256(midt, c), _CMP_GE_OQ);
        c = _mm512_mask_add_epi32(c, up, c, _mm512_set1_epi32(1));
        _mm_storeu_si128((__m128i *)(codes + i), _mm512_cvtepi32_epi8(c));
    }
    return i;
}
#endif

static inline void update_block(float *restrict pp, const float *restrict gg, const uint8_t *restrict mcc,
                                const uint8_t *restrict vcc, float ma, float va, int64_t from, int64_t len,
                                const float *restrict smap, const float *restrict umap, const hyper *h,
                                int low_weight, float *restrict mb, float *restrict vb) {
    const float w = h->w, b1 = h->b1, b2 = h->b2, omb2 = h->one_minus_b2, inv_bc = 1.0f / h->bc2_sqrt,
                eps = h->eps, decay = h->decay, sv = h->step_value;
    if (low_weight) {
#pragma omp simd
        for (int64_t i = from; i < len; ++i) {
            float gi = gg[i];
            float m = smap[mcc[i]] * ma;
            float v = umap[vcc[i]] * va;
            m = fmaf(w, gi - m, m);                 /* torch's lerp, weight < 0.5 */
            v = v * b2;
            v = fmaf(omb2 * gi, gi, v);             /* addcmul */
            float den = sqrtf(v) * inv_bc + eps;
            float q = pp[i] * decay;                /* decoupled weight decay */
            pp[i] = q + sv * m / den;               /* addcdiv: (value * m) / den */
            mb[i] = m;
            vb[i] = v;
        }
    } else {
#pragma omp simd
        for (int64_t i = from; i < len; ++i) {
            float gi = gg[i];
            float m = smap[mcc[i]] * ma;
            float v = umap[vcc[i]] * va;
            m = fmaf(-b1, gi - m, gi);              /* torch's lerp, weight >= 0.5 */
            v = v * b2;
            v = fmaf(omb2 * gi, gi, v);
            float den = sqrtf(v) * inv_bc + eps;
            float q = pp[i] * decay;
            pp[i] = q + sv * m / den;
            mb[i] = m;
            vb[i] = v;
        }
    }
}

static inline void encode_block(const float *restrict x, float scale, uint8_t *restrict codes, int64_t from,
                                int64_t len, const int32_t *restrict lut, const float *restrict mid) {
    const float inv = 1.0f / scale;
#pragma omp simd
    for (int64_t i = from; i < len; ++i) {
        float y = x[i] * inv;
        uint32_t bits;
        memcpy(&bits, &y, 4);
        int32_t key = (int32_t)((bits & 0x7FFFFFFFu) >> 16);
        key = key < KEY_LO ? KEY_LO : (key > KEY_HI ? KEY_HI : key);
        int32_t c = lut[(int32_t)(bits >> 31) * SPAN + key - KEY_LO];
        codes[i] = (uint8_t)(c + (y >= mid[c]));
    }
}

/* One call for a list of tensors: one parallel region over all their blocks
 * (not one per tensor), each block finding its tensor by a binary search
 * over the block offsets. */
void adamw_q8_step(int64_t ntensors, float **ps, const float **gs, uint8_t **mcs, float **mabss,
                   uint8_t **vcs, float **vabss, const int64_t *ns, const int64_t *block_offsets,
                   float decay, float one_minus_b1, float b1, int low_weight, float b2,
                   float one_minus_b2, float bc2_sqrt, float eps, float step_value,
                   const float *smap, const float *umap,
                   const int32_t *slut, const float *smid, const int32_t *ulut, const float *umid,
                   float tiny) {
    hyper h = {decay, one_minus_b1, b1, b2, one_minus_b2, bc2_sqrt, eps, step_value, tiny};
    int64_t nblocks = block_offsets[ntensors];
#pragma omp parallel
    {
#ifdef HAVE_AVX512
    __m512 st[16], ut[16], smt[16], umt[16];
    load_table(st, smap);
    load_table(ut, umap);
    load_table(smt, smid);
    load_table(umt, umid);
#endif
#pragma omp for schedule(static)
    for (int64_t gb = 0; gb < nblocks; ++gb) {
        int64_t lo = 0, hi = ntensors - 1;       /* last t with block_offsets[t] <= gb */
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (block_offsets[mid] <= gb) lo = mid; else hi = mid - 1;
        }
        int64_t t = lo, b = gb - block_offsets[t], n = ns[t];
        float *p = ps[t];
        const float *g = gs[t];
        uint8_t *mc = mcs[t], *vc = vcs[t];
        float *mabs = mabss[t], *vabs = vabss[t];
        float mb[BLOCK] __attribute__((aligned(64)));
        float vb[BLOCK] __attribute__((aligned(64)));
        int64_t start = b * BLOCK;
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        int64_t done = 0;
#ifdef HAVE_AVX512
        done = update_block_avx512(p + start, g + start, mc + start, vc + start, mabs[b], vabs[b], len, st, ut,
                                   &h, low_weight, mb, vb);
#endif
        update_block(p + start, g + start, mc + start, vc + start, mabs[b], vabs[b], done, len, smap, umap, &h,
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
        float ms = mmax > tiny ? mmax : tiny, vs = vmax > tiny ? vmax : tiny;
        int64_t me = 0, ve = 0;
#ifdef HAVE_AVX512
        me = encode_block_avx512(mb, ms, mc + start, len, slut, smt);
        ve = encode_block_avx512(vb, vs, vc + start, len, ulut, umt);
#endif
        encode_block(mb, ms, mc + start, me, len, slut, smid);
        encode_block(vb, vs, vc + start, ve, len, ulut, umid);
    }
    }
}

/* The same AdamW step with float32 moments: one parallel region over all
 * tensors' blocks, one vectorized pass per block (torch's fused AdamW takes one
 * parallel loop per tensor). */
void adamw_f32_step(int64_t ntensors, float **ps, const float **gs, float **ms, float **vs,
                    const int64_t *ns, const int64_t *block_offsets,
                    float decay, float one_minus_b1, float b1, int low_weight, float b2,
                    float one_minus_b2, float bc2_sqrt, float eps, float step_value) {
    int64_t nblocks = block_offsets[ntensors];
#pragma omp parallel for schedule(static)
    for (int64_t gb = 0; gb < nblocks; ++gb) {
        int64_t lo = 0, hi = ntensors - 1;
        while (lo < hi) {
            int64_t mid = (lo + hi + 1) / 2;
            if (block_offsets[mid] <= gb) lo = mid; else hi = mid - 1;
        }
        int64_t t = lo, start = (gb - block_offsets[t]) * BLOCK, n = ns[t];
        int64_t len = n - start < BLOCK ? n - start : BLOCK;
        float *restrict p = ps[t] + start, *restrict m = ms[t] + start, *restrict v = vs[t] + start;
        const float *restrict g = gs[t] + start;
        if (low_weight) {
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) {
                float gi = g[i];
                float mm = fmaf(one_minus_b1, gi - m[i], m[i]);
                float vv = fmaf(one_minus_b2 * gi, gi, v[i] * b2);
                float den = sqrtf(vv) / bc2_sqrt + eps;
                p[i] = p[i] * decay + step_value * mm / den;
                m[i] = mm;
                v[i] = vv;
            }
        } else {
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) {
                float gi = g[i];
                float mm = fmaf(-b1, gi - m[i], gi);
                float vv = fmaf(one_minus_b2 * gi, gi, v[i] * b2);
                float den = sqrtf(vv) / bc2_sqrt + eps;
                p[i] = p[i] * decay + step_value * mm / den;
                m[i] = mm;
                v[i] = vv;
            }
        }
    }
}
