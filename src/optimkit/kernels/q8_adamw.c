/* Fused AdamW step with block-wise dynamic 8-bit moments (CPU).
 *
 * One call updates one parameter tensor in place: for every block of 256
 * elements, decode both moments, run the AdamW update (the float32
 * operations of optimkit's tensor-op reference path, in the same order and
 * with the same fused multiply-adds torch's CPU kernels use), then
 * re-quantize: block absmax, then the nearest map code (or, for a state
 * with an encode counter, stochastic rounding: see encode_sr_one). Divisions by a
 * per-block or per-step constant are multiplications by its reciprocal here
 * (the reference divides): that moves a result by at most an ulp, which can
 * only change a code when a value sits on a rounding tie. The three loops
 * (update, absmax, encode) are kept apart; with AVX-512 the update and the
 * encode are written with intrinsics, the rest is a plain vectorized loop.
 *
 * Decode: with AVX-512 VBMI, 64 codes at a time: the map's four byte planes
 * are held in registers and looked up with byte permutes (128 entries each),
 * then unpacks assemble the floats; otherwise 16 at a time with float
 * permutes (lookup256).
 *
 * Nearest code: the dynamic map is a zero, then one decade after another
 * (decade d holds a uniform grid of cells), then 1; each is a region here.
 * From |y|, the float's exponent picks a binade; a binade holds at most one
 * region start (the midpoint below the region's first code), so one
 * comparison gives the region. Inside a region an affine function of |y|,
 * t = |y| * inv + bias, puts the midpoints between codes within a small
 * tolerance (NEAR) of the integers and code k on (k - 1, k + 1), so
 * floor(t) is the nearest code unless t lies within NEAR of an integer. The
 * vector encoder (AVX-512 F/BW/DQ) takes floor(t) for the lanes not that
 * close and redoes the others (rare) with the exact scalar encoder:
 * floor(t - 0.5) is the nearest code or the one below it, and one comparison
 * with the midpoint above it (a table) settles it. The scalar encoder is also
 * the portable path. The signed map is handled on |y| (its
 * negative half mirrors the positive one); a negative y uses the float just
 * below |y| so that exact midpoints round as the reference's count of
 * midpoints <= y does.
 *
 * Unsigned map (the second moment): code 0 decodes to zero and is kept for
 * exact zeros; a positive value that rounds to it (nearest or stochastic)
 * takes code 1, the smallest positive entry, as codecs._keep_positive does.
 * Otherwise an element whose v is tiny next to its block's absmax would decode
 * to v = 0 while its m keeps a code, and its step would be m / eps.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 256

/* Layout of an encoder table (floats; the int32 entries are stored as bits),
 * built by q8_adamw.py for one map. Binade entries are keyed by the low five
 * bits of the exponent of |y|, clamped to [96, 127] (no region starts below
 * 2**-31), region entries by the region index (0: zero, 1 + d: decade d,
 * then 1; the rest repeat the last). Codes here are those of the half map
 * (0 = zero, ..., the last = 1); the signed map adds or subtracts them from
 * its zero code. */
#define ENC_THR 0      /* 32: the region start inside the binade, or NaN */
#define ENC_BASE 32    /* 32 int32: the region of the binade below that start */
#define ENC_INV 64     /* 16: 1 / cell width (tiny for the one-code regions) */
#define ENC_BIAS 80    /* 16: first code of the region - region start / width */
#define ENC_CMAX 96    /* 16 int32: last code of the region */
#define ENC_NEAR 112   /* the tolerance NEAR */
#define ENC_VBIAS 128  /* 32: the vector encoder's bias (+ NEAR), for y >= 0 then (signed map) y < 0 */
#define ENC_VCLAMP 160 /* 32 int32: its bound on the code, likewise */
#define ENC_MID 192    /* 256: midpoint between half-map codes c and c + 1 (NaN past the end) */
#define ENC_SIZE 448
#define SIGNED_ZERO 127

typedef struct {
    float decay, w, b1, b2, one_minus_b2, bc2_sqrt, eps, step_value, tiny;
} hyper;


/* The exact scalar encoder (see the comment at the top). */
static inline uint8_t encode_one(float y, const float *restrict enc, int is_signed) {
    uint32_t ab;
    memcpy(&ab, &y, 4);
    ab &= 0x7FFFFFFFu;
    int neg = is_signed && y < 0.f;
    ab -= (uint32_t)neg;
    float a;
    memcpy(&a, &ab, 4);
    int32_t e = (int32_t)(ab >> 23);
    e = (e < 96 ? 96 : (e > 127 ? 127 : e)) & 31;
    int32_t reg, cmax;
    memcpy(&reg, enc + ENC_BASE + e, 4);
    reg += a >= enc[ENC_THR + e];
    memcpy(&cmax, enc + ENC_CMAX + reg, 4);
    float t = fmaf(a, enc[ENC_INV + reg], enc[ENC_BIAS + reg]) - 0.5f;
    t = t < (float)cmax ? t : (float)cmax;    /* NaN: cmax */
    int32_t c = t > 0.f ? (int32_t)t : 0;     /* floor for t >= 0 */
    c += a >= enc[ENC_MID + c];
    if (!is_signed) return (uint8_t)(c + (c == 0 && y > 0.f));   /* NaN: not > 0 */
    return (uint8_t)(neg ? SIGNED_ZERO - (c < SIGNED_ZERO ? c : SIGNED_ZERO) : SIGNED_ZERO + c);
}

/* Stochastic rounding (codecs._Blockwise._codes with stochastic=True): y goes
 * to the last map entry <= y (lower, at most 254) or to the next one, up with
 * probability p = clamp((y - lo) / (hi - lo), 0, 1), decided by u < p for the
 * dither u of the element (codecs._dither): an integer hash of the element's
 * index in the tensor plus the encode counter (seed) times the golden ratio,
 * all modulo 2**32 (the reference's int64 arithmetic masks to 32 bits). The
 * lower entry is the nearest code, or the one below it when that code's value
 * exceeds y. y = x / scale by a division, as the reference computes it. */
static inline uint32_t seed_phi(int64_t seed) {
    return (uint32_t)(((uint64_t)seed & 0xFFFFFFu) * 0x9E3779B9u);
}

static inline float dither_one(uint64_t i, uint32_t phi) {
    uint32_t x = (uint32_t)i * 1103515245u + 0x5BD1E995u;
    x ^= x >> 16;
    x *= 0x45D9F3Bu;
    x ^= x >> 16;
    x *= 0x45D9F3Bu;
    x ^= x >> 16;
    x += phi;
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}

static inline uint8_t encode_sr_one(float y, float u, const float *restrict values, const float *restrict enc,
                                    int is_signed) {
    int32_t c = encode_one(y, enc, is_signed);
    c -= values[c] > y;
    c = c < 0 ? 0 : (c > 254 ? 254 : c);
    if (y != y) c = 254;                        /* NaN: the reference's binary search puts it last */
    float lo = values[c], hi = values[c + 1];
    float p = (y - lo) / (hi - lo);
    p = p > 0.f ? p : 0.f;                      /* NaN: never up, as u < NaN */
    p = p < 1.f ? p : 1.f;
    c += u < p;
    if (!is_signed) c += c == 0 && y > 0.f;     /* code 0 is for exact zeros */
    return (uint8_t)c;
}

static inline void encode_sr_block(const float *restrict x, float scale, uint8_t *restrict codes, int64_t from,
                                   int64_t len, const float *restrict values, const float *restrict enc,
                                   int is_signed, uint64_t index0, uint32_t phi) {
    for (int64_t i = from; i < len; ++i)
        codes[i] = encode_sr_one(x[i] / scale, dither_one(index0 + (uint64_t)i, phi), values, enc, is_signed);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
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

/* One AdamW element update on 16 lanes, from decoded moments m and v. */
static inline void update16(float *restrict pp, const float *restrict gg, __m512 m, __m512 v, const hyper *h,
                            int low_weight, float *restrict mb, float *restrict vb, __m512 *mmax, __m512 *vmax) {
    const __m512 inv_bc = _mm512_set1_ps(1.0f / h->bc2_sqrt);
    __m512 g = _mm512_loadu_ps(gg);
    __m512 d = _mm512_sub_ps(g, m);
    m = low_weight ? _mm512_fmadd_ps(_mm512_set1_ps(h->w), d, m) : _mm512_fmadd_ps(_mm512_set1_ps(-h->b1), d, g);
    v = _mm512_mul_ps(v, _mm512_set1_ps(h->b2));
    v = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(h->one_minus_b2), g), g, v);
    __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(v), inv_bc), _mm512_set1_ps(h->eps));
    __m512 q = _mm512_mul_ps(_mm512_loadu_ps(pp), _mm512_set1_ps(h->decay));
    _mm512_storeu_ps(pp, _mm512_add_ps(q, _mm512_div_ps(_mm512_mul_ps(_mm512_set1_ps(h->step_value), m), den)));
    _mm512_store_ps(mb, m);
    _mm512_store_ps(vb, v);
    /* max(|x|, running max): the running max when x is NaN, as the scalar loop */
    *mmax = _mm512_max_ps(_mm512_abs_ps(m), *mmax);
    *vmax = _mm512_max_ps(_mm512_abs_ps(v), *vmax);
}

#if defined(__AVX512VBMI__)
#define HAVE_VBMI 1
/* A 256-float table as four byte planes (byte p of every entry), each in four
 * registers: t[4 * p + q] holds the entries 64 q .. 64 q + 63. */
static inline void load_planes(__m512i *t, const float *values) {
    uint8_t bytes[4][256] __attribute__((aligned(64)));
    for (int k = 0; k < 256; ++k) {
        uint32_t bits;
        memcpy(&bits, values + k, 4);
        for (int p = 0; p < 4; ++p) bytes[p][k] = (uint8_t)(bits >> (8 * p));
    }
    for (int p = 0; p < 4; ++p)
        for (int q = 0; q < 4; ++q) t[4 * p + q] = _mm512_load_si512((const void *)(bytes[p] + 64 * q));
}

/* The byte order in which decode64's unpacks leave the elements in place:
 * position 16 L + 4 q + j takes element 16 q + 4 L + j. */
static inline __m512i decode64_order(void) {
    uint8_t idx[64] __attribute__((aligned(64)));
    for (int pos = 0; pos < 64; ++pos) idx[pos] = (uint8_t)(16 * ((pos >> 2) & 3) + 4 * (pos >> 4) + (pos & 3));
    return _mm512_load_si512((const void *)idx);
}

/* table[codes[k]] for 64 codes: per byte plane, two 128-entry byte permutes
 * and a blend on the code's top bit, then byte and word unpacks assemble the
 * floats; out[q] holds elements 16 q .. 16 q + 15. */
static inline void decode64(const uint8_t *codes, const __m512i *t, __m512i order, __m512 *out) {
    __m512i c = _mm512_permutexvar_epi8(order, _mm512_loadu_si512((const void *)codes));
    __mmask64 top = _mm512_movepi8_mask(c);
    __m512i b[4];
    for (int p = 0; p < 4; ++p)
        b[p] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(t[4 * p], c, t[4 * p + 1]),
                                      _mm512_permutex2var_epi8(t[4 * p + 2], c, t[4 * p + 3]));
    __m512i l01 = _mm512_unpacklo_epi8(b[0], b[1]), h01 = _mm512_unpackhi_epi8(b[0], b[1]);
    __m512i l23 = _mm512_unpacklo_epi8(b[2], b[3]), h23 = _mm512_unpackhi_epi8(b[2], b[3]);
    out[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(l01, l23));
    out[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(l01, l23));
    out[2] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(h01, h23));
    out[3] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(h01, h23));
}
#endif

typedef struct {
    __m512 st[16], ut[16];        /* the maps, for lookup256 */
#ifdef HAVE_VBMI
    __m512i sp[16], up[16];       /* the maps as byte planes, for decode64 */
    __m512i order;
#endif
} dec_tables;

static inline void load_decoder(dec_tables *d, const float *smap, const float *umap) {
    load_table(d->st, smap);
    load_table(d->ut, umap);
#ifdef HAVE_VBMI
    load_planes(d->sp, smap);
    load_planes(d->up, umap);
    d->order = decode64_order();
#endif
}

/* The update loop of update_block, 64 (or 16) elements at a time; returns how
 * many elements it handled (the rest go through the scalar loop). */
static inline int64_t update_block_avx512(float *restrict pp, const float *restrict gg,
                                          const uint8_t *restrict mcc, const uint8_t *restrict vcc,
                                          float ma, float va, int64_t len, const dec_tables *dt,
                                          const hyper *h, int low_weight, float *restrict mb,
                                          float *restrict vb, float *mmax, float *vmax) {
    const __m512 mav = _mm512_set1_ps(ma), vav = _mm512_set1_ps(va);
    __m512 mx = _mm512_setzero_ps(), vx = _mm512_setzero_ps();
    int64_t i = 0;
#ifdef HAVE_VBMI
    for (; i + 64 <= len; i += 64) {
        __m512 m[4], v[4];
        decode64(mcc + i, dt->sp, dt->order, m);
        decode64(vcc + i, dt->up, dt->order, v);
        for (int q = 0; q < 4; ++q)
            update16(pp + i + 16 * q, gg + i + 16 * q, _mm512_mul_ps(m[q], mav), _mm512_mul_ps(v[q], vav), h,
                     low_weight, mb + i + 16 * q, vb + i + 16 * q, &mx, &vx);
    }
#endif
    for (; i + 16 <= len; i += 16) {
        __m512i mi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(mcc + i)));
        __m512i vi = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(vcc + i)));
        update16(pp + i, gg + i, _mm512_mul_ps(lookup256(dt->st, mi), mav), _mm512_mul_ps(lookup256(dt->ut, vi), vav),
                 h, low_weight, mb + i, vb + i, &mx, &vx);
    }
    *mmax = _mm512_reduce_max_ps(mx);
    *vmax = _mm512_reduce_max_ps(vx);
    return i;
}

/* Unsigned map: code 1 where y > 0 rounded to code 0 (see encode_one). */
static inline __m512i keep_positive16(__m512i c, __m512 y) {
    __mmask16 pos = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GT_OQ);
    return _mm512_mask_max_epi32(c, pos, c, _mm512_set1_epi32(1));
}

typedef struct {
    __m512 thr[2], inv, bias[2], near;  /* near: 2 NEAR */
    __m512i base[2], clamp[2];
} enc_regs;

static inline void load_encoder(enc_regs *r, const float *enc) {
    for (int k = 0; k < 2; ++k) {
        r->thr[k] = _mm512_loadu_ps(enc + ENC_THR + 16 * k);
        r->base[k] = _mm512_loadu_si512((const void *)(enc + ENC_BASE + 16 * k));
        r->bias[k] = _mm512_loadu_ps(enc + ENC_VBIAS + 16 * k);
        r->clamp[k] = _mm512_loadu_si512((const void *)(enc + ENC_VCLAMP + 16 * k));
    }
    r->inv = _mm512_loadu_ps(enc + ENC_INV);
    r->near = _mm512_set1_ps(2.0f * enc[ENC_NEAR]);
}

/* Codes of 16 values y (already divided by the block scale); *close gets the
 * lanes that need the exact encoder. The vector encoder works on the codes
 * of the full map: t' = y * inv + bias' is 127 + t for y >= 0 and 128 - t
 * for y < 0 (signed map; t as in the comment at the top, taken on |y|), so
 * floor(t') is the code wherever t is not close to an integer, bounded above
 * (y >= 0) or below (y < 0) by the region's last code. */
static inline __m512i codes16(__m512 y, const enc_regs *r, int is_signed, __mmask16 *close) {
    __m512i ab = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32(0x7FFFFFFF));
    __mmask16 neg = 0;
    if (is_signed) {
        /* y < 0: the float below |y| picks the region, so that |y| on a region
         * start goes toward zero as in the reference */
        neg = _mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_LT_OQ);
        ab = _mm512_mask_sub_epi32(ab, neg, ab, _mm512_set1_epi32(1));
    }
    __m512i e = _mm512_srli_epi32(ab, 23);
    e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(96)), _mm512_set1_epi32(127));
    __m512i reg = _mm512_permutex2var_epi32(r->base[0], e, r->base[1]);
    __mmask16 above = _mm512_cmp_ps_mask(_mm512_castsi512_ps(ab), _mm512_permutex2var_ps(r->thr[0], e, r->thr[1]),
                                         _CMP_GE_OQ);
    reg = _mm512_mask_add_epi32(reg, above, reg, _mm512_set1_epi32(1));
    if (is_signed) reg = _mm512_mask_or_epi32(reg, neg, reg, _mm512_set1_epi32(16));
    /* the bias includes + NEAR: close (t' within NEAR of an integer) is t - floor(t) < 2 NEAR */
    __m512 t = _mm512_fmadd_ps(y, _mm512_permutexvar_ps(reg, r->inv),
                               _mm512_permutex2var_ps(r->bias[0], reg, r->bias[1]));
    *close = _mm512_cmp_ps_mask(_mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                r->near, _CMP_LT_OQ);
    __m512i c = _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512i bound = _mm512_permutex2var_epi32(r->clamp[0], reg, r->clamp[1]);
    /* unsigned min: NaN, or t too large for an int32, gives the bound */
    c = _mm512_mask_min_epu32(c, (__mmask16)~neg, c, bound);
    if (is_signed) c = _mm512_mask_max_epi32(c, neg, c, bound);
    else c = keep_positive16(c, y);
    return c;
}

/* Codes of x[i] / scale for the signed (m) or unsigned (v) map, 64 at a time
 * (lanes close to a midpoint are redone by encode_one); returns how many
 * elements it handled. */
static inline int64_t encode_block_avx512(const float *restrict x, float scale, uint8_t *restrict codes,
                                          int64_t len, const enc_regs *r, const float *restrict enc,
                                          int is_signed) {
    const float inv = 1.0f / scale;
    const __m512 s = _mm512_set1_ps(inv);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    int64_t i = 0;
    for (; i + 64 <= len; i += 64) {
        __m512i c[4];
        __mmask16 close[4];
        for (int q = 0; q < 4; ++q)
            c[q] = codes16(_mm512_mul_ps(_mm512_loadu_ps(x + i + 16 * q), s), r, is_signed, close + q);
        /* codes are in [0, 255]: two saturating packs, then the 128-bit lanes' order */
        __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
        _mm512_storeu_si512((void *)(codes + i), _mm512_permutexvar_epi32(order, packed));
        if (__builtin_expect((close[0] | close[1] | close[2] | close[3]) != 0, 0)) {
            for (int q = 0; q < 4; ++q)
                for (unsigned m = close[q]; m; m &= m - 1) {
                    int64_t k = i + 16 * q + __builtin_ctz(m);
                    codes[k] = encode_one(x[k] * inv, enc, is_signed);
                }
        }
    }
    return i;
}

/* Pieces of the vector stochastic encoder (see encode_sr_one). */

/* The nearest code of 16 values y (codes16, close lanes redone by encode_one). */
static inline __m512i sr_nearest16(__m512 y, const enc_regs *r, const float *restrict enc, int is_signed) {
    __mmask16 close;
    __m512i c = codes16(y, r, is_signed, &close);
    if (__builtin_expect(close != 0, 0)) {
        float yy[16];
        int32_t cc[16];
        _mm512_storeu_ps(yy, y);
        _mm512_storeu_si512((void *)cc, c);
        for (unsigned m = close; m; m &= m - 1) {
            int k = __builtin_ctz(m);
            cc[k] = encode_one(yy[k], enc, is_signed);
        }
        c = _mm512_loadu_si512((const void *)cc);
    }
    return c;
}

/* The neighbour of code c on y's side (below it where values[c] > y: *above),
 * clamped to the map, to look up next. */
static inline __m512i sr_other16(__m512 y, __m512i c, __m512 vc, __mmask16 *above) {
    const __m512i one = _mm512_set1_epi32(1);
    *above = _mm512_cmp_ps_mask(vc, y, _CMP_GT_OQ);
    __m512i other = _mm512_mask_sub_epi32(_mm512_add_epi32(c, one), *above, c, one);
    return _mm512_min_epi32(_mm512_max_epi32(other, _mm512_setzero_si512()), _mm512_set1_epi32(255));
}

/* The stochastic code of 16 values y, elements idx .. idx + 15 of their tensor,
 * from the nearest code c, vc = values[c] and vo = values[the other]. */
static inline __m512i sr_finish16(__m512 y, __m512i c, __m512 vc, __m512 vo, __mmask16 above, uint32_t idx,
                                  uint32_t phi, int is_signed) {
    const __m512i one = _mm512_set1_epi32(1);
    c = _mm512_mask_sub_epi32(c, above, c, one);                      /* lower */
    __m512 lo = _mm512_mask_blend_ps(above, vc, vo), hi = _mm512_mask_blend_ps(above, vo, vc);
    /* Past the ends of the map (y below its first entry, or y >= 1 on the last
     * code) the reference clamps lower to [0, 254], and p is then 0 or 1. Here
     * the clamped neighbour is c itself, so lo = hi and p is -inf (below), or
     * +inf or 0 / 0 (at 1 or above): max(0, p) keeps a NaN and min(NaN, 1) is 1,
     * giving 0 and 1. A NaN y: lower 254, never up (the reference's u < NaN). */
    __m512 p = _mm512_div_ps(_mm512_sub_ps(y, lo), _mm512_sub_ps(hi, lo));
    p = _mm512_min_ps(_mm512_max_ps(_mm512_setzero_ps(), p), _mm512_set1_ps(1.0f));
    __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    c = _mm512_min_epi32(_mm512_max_epi32(c, _mm512_setzero_si512()), _mm512_set1_epi32(254));
    c = _mm512_mask_mov_epi32(c, nan, _mm512_set1_epi32(254));
    p = _mm512_mask_mov_ps(p, nan, _mm512_setzero_ps());
    /* the dither (dither_one) */
    __m512i h = _mm512_add_epi32(_mm512_set1_epi32((int32_t)idx),
                                 _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    h = _mm512_add_epi32(_mm512_mullo_epi32(h, _mm512_set1_epi32((int32_t)1103515245u)),
                         _mm512_set1_epi32(0x5BD1E995));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x45D9F3B));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_mullo_epi32(h, _mm512_set1_epi32(0x45D9F3B));
    h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
    h = _mm512_add_epi32(h, _mm512_set1_epi32((int32_t)phi));
    __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(h, 8)), _mm512_set1_ps(1.0f / 16777216.0f));
    c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(u, p, _CMP_LT_OQ), c, one);
    return is_signed ? c : keep_positive16(c, y);
}

#ifdef HAVE_VBMI
/* 64 codes in [0, 255] (int32, 16 per register) as bytes in element order. */
static inline void pack64(const __m512i *c, uint8_t *out) {
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m512i packed = _mm512_packus_epi16(_mm512_packus_epi32(c[0], c[1]), _mm512_packus_epi32(c[2], c[3]));
    _mm512_storeu_si512((void *)out, _mm512_permutexvar_epi32(order, packed));
}
#endif

/* Stochastic codes of x[i] / scale (see encode_sr_one), x[i] being element
 * index0 + i of its tensor: with VBMI 64 at a time (the map lookups as in
 * decode64), then 16 at a time (lookup256). Returns how many elements it
 * handled. */
static inline int64_t encode_sr_block_avx512(const float *restrict x, float scale, uint8_t *restrict codes,
                                             int64_t len, const enc_regs *r, const dec_tables *dt,
                                             const float *restrict enc, int is_signed, uint64_t index0,
                                             uint32_t phi) {
    const __m512 s = _mm512_set1_ps(scale);
    const __m512 *vt = is_signed ? dt->st : dt->ut;
    int64_t i = 0;
#ifdef HAVE_VBMI
    const __m512i *planes = is_signed ? dt->sp : dt->up;
    for (; i + 64 <= len; i += 64) {
        __m512 y[4], vc[4], vo[4];
        __m512i c[4], other[4];
        __mmask16 above[4];
        uint8_t buf[64] __attribute__((aligned(64)));
        for (int q = 0; q < 4; ++q) {
            y[q] = _mm512_div_ps(_mm512_loadu_ps(x + i + 16 * q), s);
            c[q] = sr_nearest16(y[q], r, enc, is_signed);
        }
        pack64(c, buf);
        decode64(buf, planes, dt->order, vc);
        for (int q = 0; q < 4; ++q) other[q] = sr_other16(y[q], c[q], vc[q], above + q);
        pack64(other, buf);
        decode64(buf, planes, dt->order, vo);
        for (int q = 0; q < 4; ++q)
            c[q] = sr_finish16(y[q], c[q], vc[q], vo[q], above[q], (uint32_t)(index0 + (uint64_t)(i + 16 * q)), phi,
                                is_signed);
        pack64(c, codes + i);
    }
#endif
    for (; i + 16 <= len; i += 16) {
        __m512 y = _mm512_div_ps(_mm512_loadu_ps(x + i), s);
        __m512i c = sr_nearest16(y, r, enc, is_signed);
        __m512 vc = lookup256(vt, c);
        __mmask16 above;
        __m512 vo = lookup256(vt, sr_other16(y, c, vc, &above));
        c = sr_finish16(y, c, vc, vo, above, (uint32_t)(index0 + (uint64_t)i), phi, is_signed);
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
                                int64_t len, const float *restrict enc, int is_signed) {
    const float inv = 1.0f / scale;
    for (int64_t i = from; i < len; ++i) codes[i] = encode_one(x[i] * inv, enc, is_signed);
}

/* The encoder alone (for tests): codes of x[i] / scale, i < n; simd = 0
 * forces the scalar loop. */
void q8_encode(const float *x, int64_t n, float scale, uint8_t *codes, const float *enc, int is_signed,
               int simd) {
    int64_t done = 0;
#ifdef HAVE_AVX512
    if (simd) {
        enc_regs r;
        load_encoder(&r, enc);
        done = encode_block_avx512(x, scale, codes, n, &r, enc, is_signed);
    }
#endif
    encode_block(x, scale, codes, done, n, enc, is_signed);
}

/* The stochastic encoder alone (for tests): codes of x[i] / scale, i < n,
 * x[i] being element index0 + i of its tensor; simd = 0 forces the scalar
 * loop. */
void q8_encode_sr(const float *x, int64_t n, float scale, uint8_t *codes, const float *values, const float *enc,
                  int is_signed, int64_t seed, int64_t index0, int simd) {
    int64_t done = 0;
    uint32_t phi = seed_phi(seed);
#ifdef HAVE_AVX512
    if (simd) {
        enc_regs r;
        dec_tables dt;
        load_encoder(&r, enc);
        load_decoder(&dt, values, values);
        done = encode_sr_block_avx512(x, scale, codes, n, &r, &dt, enc, is_signed, (uint64_t)index0, phi);
    }
#endif
    encode_sr_block(x, scale, codes, done, n, values, enc, is_signed, (uint64_t)index0, phi);
}

#ifdef HAVE_AVX512
#define SIMD_TABLES(regs) &(regs), &dt
#else
#define SIMD_TABLES(regs) NULL, NULL
#endif

/* Encode one state's block: stochastically at the state's seed (when it has
 * one), else to nearest; vector lanes first where available, then the rest. */
static inline void encode_state_block(const float *restrict x, float scale, uint8_t *restrict codes, int64_t len,
                                      const int64_t *seed, const float *restrict values,
                                      const float *restrict enc, int is_signed, uint64_t index0,
                                      const void *regs, const void *tables) {
    int64_t done = 0;
    (void)regs;
    (void)tables;
    if (seed) {
        uint32_t phi = seed_phi(*seed);
#ifdef HAVE_AVX512
        done = encode_sr_block_avx512(x, scale, codes, len, (const enc_regs *)regs, (const dec_tables *)tables,
                                      enc, is_signed, index0, phi);
#endif
        encode_sr_block(x, scale, codes, done, len, values, enc, is_signed, index0, phi);
    } else {
#ifdef HAVE_AVX512
        done = encode_block_avx512(x, scale, codes, len, (const enc_regs *)regs, enc, is_signed);
#endif
        encode_block(x, scale, codes, done, len, enc, is_signed);
    }
}

/* One call for a list of tensors: one parallel region over all their blocks
 * (not one per tensor), each block finding its tensor by a binary search
 * over the block offsets. */
void adamw_q8_step(int64_t ntensors, float **ps, const float **gs, uint8_t **mcs, float **mabss,
                   uint8_t **vcs, float **vabss, const int64_t *ns, const int64_t *block_offsets,
                   float decay, float one_minus_b1, float b1, int low_weight, float b2,
                   float one_minus_b2, float bc2_sqrt, float eps, float step_value,
                   const float *smap, const float *umap, const float *senc, const float *uenc,
                   float tiny, int64_t **mseeds, int64_t **vseeds) {
    hyper h = {decay, one_minus_b1, b1, b2, one_minus_b2, bc2_sqrt, eps, step_value, tiny};
    int64_t nblocks = block_offsets[ntensors];
#pragma omp parallel
    {
#ifdef HAVE_AVX512
    dec_tables dt;
    enc_regs se, ue;
    load_decoder(&dt, smap, umap);
    load_encoder(&se, senc);
    load_encoder(&ue, uenc);
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
        float mmax = 0.f, vmax = 0.f;
#ifdef HAVE_AVX512
        done = update_block_avx512(p + start, g + start, mc + start, vc + start, mabs[b], vabs[b], len, &dt, &h,
                                   low_weight, mb, vb, &mmax, &vmax);
#endif
        update_block(p + start, g + start, mc + start, vc + start, mabs[b], vabs[b], done, len, smap, umap, &h,
                     low_weight, mb, vb);
#pragma omp simd reduction(max : mmax, vmax)
        for (int64_t i = done; i < len; ++i) {
            float a = fabsf(mb[i]), c = fabsf(vb[i]);
            mmax = a > mmax ? a : mmax;   /* not fmaxf: a libm call per element */
            vmax = c > vmax ? c : vmax;
        }
        mabs[b] = mmax;
        vabs[b] = vmax;
        float ms = mmax > tiny ? mmax : tiny, vs = vmax > tiny ? vmax : tiny;
        encode_state_block(mb, ms, mc + start, len, mseeds ? mseeds[t] : NULL, smap, senc, 1,
                           (uint64_t)start, SIMD_TABLES(se));
        encode_state_block(vb, vs, vc + start, len, vseeds ? vseeds[t] : NULL, umap, uenc, 0,
                           (uint64_t)start, SIMD_TABLES(ue));
    }
    }
    /* each encode advances its state's counter (after every block has read it) */
    for (int64_t t = 0; t < ntensors; ++t) {
        if (mseeds && mseeds[t]) ++*mseeds[t];
        if (vseeds && vseeds[t]) ++*vseeds[t];
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
