// AVX2 + FMA kernels (every x86-64 CPU since Haswell / Zen 1).
//
// Same tiling as isa_avx512.cpp with 256-bit vectors. AVX2 has no VNNI, so integer dot products are
// VPMADDUBSW (unsigned bytes x signed bytes -> pairs of int16) then VPMADDWD by ones (-> int32):
//   int8 weights use llama.cpp's sign trick (|w| times x with w's sign), since q + 128 times x would
//   saturate int16; int4 nibbles (0 .. 15) and MXFP4 looked-up codes (0 .. 24) are small enough to be
//   the unsigned operand directly, corrected by the activation block sums like the AVX-512 path.
//   bf16 weights are widened to float32 (a shift) and multiplied with float32 activations by FMA.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi2")
#endif
#include <immintrin.h>
#include <string.h>

#include "kern.h"

namespace emo {
namespace {

inline int32_t row_of(const int32_t* rows, int64_t i) { return rows ? rows[i] : (int32_t)i; }

// where row n's bytes start (see Mat.il): chunk c of it is at row_at(W, n) + c * W.il
inline const uint8_t* row_at(const Mat& W, int64_t n) {
    return W.il == 4 ? W.w + (n >> 2) * W.ld + (n & 3) * W.unit : W.w + n * W.ld;
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

inline __m256 bf16x8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

inline float bf16_to_f32(uint16_t b) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)b << 16;
    return v.f;
}

// ---- bf16 and float32 weights -------------------------------------------------------------------------
template <int MR, int NR, bool BF>
void tile_float(const Mat& W, const Act& a, const int32_t* rows, int64_t i0, int64_t n, float* y, int64_t ldy) {
    const int64_t K = W.K;
    const float* x[MR];
    const uint8_t* w[NR];
    for (int i = 0; i < MR; i++) x[i] = a.f + (int64_t)row_of(rows, i0 + i) * K;
    for (int j = 0; j < NR; j++) w[j] = row_at(W, n + j);
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[NR];
        for (int j = 0; j < NR; j++)
            wv[j] = BF ? bf16x8((const uint16_t*)w[j] + k) : _mm256_loadu_ps((const float*)w[j] + k);
        for (int i = 0; i < MR; i++) {
            __m256 xv = _mm256_loadu_ps(x[i] + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float s = hsum(acc[i][j]);
            for (int64_t t = k; t < K; t++)
                s += x[i][t] * (BF ? bf16_to_f32(((const uint16_t*)w[j])[t]) : ((const float*)w[j])[t]);
            y[(i0 + i) * ldy + n + j] = s;
        }
}
template <int MR, int NR> void tile_bf16(const Mat& W, const Act& a, const int32_t* r, int64_t i0, int64_t n, float* y, int64_t ldy) {
    tile_float<MR, NR, true>(W, a, r, i0, n, y, ldy);
}
template <int MR, int NR> void tile_f32(const Mat& W, const Act& a, const int32_t* r, int64_t i0, int64_t n, float* y, int64_t ldy) {
    tile_float<MR, NR, false>(W, a, r, i0, n, y, ldy);
}

// ---- int8 weights, one scale per row: 32 inputs (one activation block, 8 lanes) per step ----------------
template <int MR, int NR>
void tile_i8(const Mat& W, const Act& a, const int32_t* rows, int64_t i0, int64_t n, float* y, int64_t ldy) {
    const int64_t K = W.K;
    const int8_t* x[MR];
    const float* xs[MR];
    const uint8_t* w[NR];
    for (int i = 0; i < MR; i++) {
        int64_t r = row_of(rows, i0 + i);
        x[i] = a.q8 + r * K;
        xs[i] = a.s8 + r * (K / 4);
    }
    for (int j = 0; j < NR; j++) w[j] = row_at(W, n + j);
    const int64_t il = W.il;
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m256i aw[NR], sw[NR];
        for (int j = 0; j < NR; j++) {
            __m256i q = _mm256_loadu_si256((const __m256i*)(w[j] + k * il));
            if (!W.w_signed) q = _mm256_xor_si256(q, flip);  // stored q + 128 -> q
            aw[j] = _mm256_sign_epi8(q, q);                  // |q|
            sw[j] = q;
        }
        for (int i = 0; i < MR; i++) {
            __m256i xv = _mm256_loadu_si256((const __m256i*)(x[i] + k));
            __m256 sv = _mm256_set1_ps(xs[i][k / 4]);
            for (int j = 0; j < NR; j++) {
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[j], _mm256_sign_epi8(xv, sw[j])), ones);
                acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sv, acc[i][j]);
            }
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(i0 + i) * ldy + n + j] = W.scale[n + j] * hsum(acc[i][j]);
}

// ---- int4 (groups of a multiple of 64) and MXFP4: 32 weight bytes = 64 inputs, 8 lanes of 8 inputs ------
template <int MR, int NR, bool MX, bool ZP>
void tile_nib(const Mat& W, const Act& a, const int32_t* rows, int64_t i0, int64_t n, float* y, int64_t ldy) {
    const int64_t K = W.K, Kb = K / 2;
    const int8_t* x[MR];
    const float* xs[MR];
    const int32_t* xc[MR];
    const uint8_t* w[NR];
    for (int i = 0; i < MR; i++) {
        int64_t r = row_of(rows, i0 + i);
        x[i] = a.q4 + r * K;
        xs[i] = a.s4 + r * (K / 8);
        xc[i] = a.c4 + r * (K / 8);
    }
    const float* sc[NR];   // int4: row n + j's group scales (and zero points)
    const int8_t* zr[NR];
    for (int j = 0; j < NR; j++) {
        w[j] = row_at(W, n + j);
        sc[j] = MX ? nullptr : W.scale + (n + j) * W.sld;
        zr[j] = ZP ? W.zp + (n + j) * W.sld : nullptr;
    }
    const int64_t il = W.il;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    const __m256i half_lanes = _mm256_setr_epi32(-1, -1, -1, -1, 0, 0, 0, 0);
    __m256 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    // the weight group of chunk c, counted (a division per chunk costs more than the chunk's other work)
    const int64_t chunks_per_group = MX ? 1 : W.group / 64;
    int64_t g = 0, in_group = 0;
    for (int64_t c = 0; c < Kb; c += 32) {
        const bool full = Kb - c >= 32;  // else 16 bytes (K is a multiple of 32)
        const int64_t len = full ? 32 : 16;
        __m256i lo[NR], hi[NR], zf[NR];
        __m256 ws[NR];
        for (int j = 0; j < NR; j++) {
            __m256i b = full ? _mm256_loadu_si256((const __m256i*)(w[j] + c * il))
                             : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(w[j] + c * il)));
            lo[j] = _mm256_and_si256(b, low);
            hi[j] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            if (MX) {
                lo[j] = _mm256_shuffle_epi8(lut, lo[j]);
                hi[j] = _mm256_shuffle_epi8(lut, hi[j]);
                const uint8_t* e = W.e8 + (n + j) * W.eld + c / 16;
                ws[j] = _mm256_setr_m128(_mm_set1_ps(e8_half_table[e[0]]), _mm_set1_ps(full ? e8_half_table[e[1]] : 0.f));
            } else {
                ws[j] = _mm256_set1_ps(sc[j][g]);
                if (ZP) zf[j] = _mm256_set1_epi32(-(8 + zr[j][g]));
            }
        }
        for (int i = 0; i < MR; i++) {
            const int8_t* xp = x[i] + 2 * c;
            __m256i xl, xh, cv;
            __m256 sv;
            if (full) {
                xl = _mm256_loadu_si256((const __m256i*)xp);
                xh = _mm256_loadu_si256((const __m256i*)(xp + len));
                sv = _mm256_loadu_ps(xs[i] + c / 4);
                cv = _mm256_loadu_si256((const __m256i*)(xc[i] + c / 4));
            } else {
                xl = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)xp));
                xh = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(xp + len)));
                sv = _mm256_maskload_ps(xs[i] + c / 4, half_lanes);
                cv = _mm256_maskload_epi32(xc[i] + c / 4, half_lanes);
            }
            // the offset (12 for MXFP4 codes, 8 for int4 without zero points) is the same for every weight
            // row: its correction is computed once per activation row
            const __m256i c8 = _mm256_slli_epi32(cv, 3);
            const __m256i shared = _mm256_sub_epi32(_mm256_setzero_si256(),
                                                    MX ? _mm256_add_epi32(c8, _mm256_slli_epi32(cv, 2)) : c8);
            for (int j = 0; j < NR; j++) {
                __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xl), _mm256_maddubs_epi16(hi[j], xh));
                __m256i corr = ZP ? _mm256_mullo_epi32(cv, zf[j]) : shared;
                __m256i d = _mm256_add_epi32(_mm256_madd_epi16(p, ones), corr);
                acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(d), sv), ws[j], acc[i][j]);
            }
        }
        if (!MX && ++in_group == chunks_per_group) {
            in_group = 0;
            g++;
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(i0 + i) * ldy + n + j] = hsum(acc[i][j]);
}
template <int MR, int NR> void tile_i4(const Mat& W, const Act& a, const int32_t* r, int64_t i0, int64_t n, float* y, int64_t ldy) {
    if (W.zp) tile_nib<MR, NR, false, true>(W, a, r, i0, n, y, ldy);
    else tile_nib<MR, NR, false, false>(W, a, r, i0, n, y, ldy);
}
template <int MR, int NR> void tile_mx(const Mat& W, const Act& a, const int32_t* r, int64_t i0, int64_t n, float* y, int64_t ldy) {
    tile_nib<MR, NR, true, false>(W, a, r, i0, n, y, ldy);
}

#define EMO_DRIVE(TILE)                                                                                  \
    if (nrows == 1 && decode_row_streams && W.il == 1) {  /* interleaved rows: the 4-row tiles */          \
        int64_t n = n0;                                                                                  \
        if (decode_row_streams == 2 && W.fmt != FMT_BF16 && W.fmt != FMT_F32)                           \
            for (; n + 2 <= n1; n += 2) TILE<1, 2>(W, a, rows, 0, n, y, ldy);                           \
        for (; n < n1; n++) TILE<1, 1>(W, a, rows, 0, n, y, ldy);                                        \
    } else                                                                                               \
    for (int64_t n = n0; n < n1;) {                                                                      \
        const bool four = n1 - n >= 4;                                                                   \
        for (int64_t i = 0; i < nrows;) {                                                                \
            if (four) {                                                                                  \
                if (nrows - i >= 2) { TILE<2, 4>(W, a, rows, i, n, y, ldy); i += 2; }                   \
                else { TILE<1, 4>(W, a, rows, i, n, y, ldy); i += 1; }                                  \
            } else { TILE<1, 1>(W, a, rows, i, n, y, ldy); i += 1; }                                    \
        }                                                                                                \
        n += four ? 4 : 1;                                                                               \
    }

void gemm(const Mat& W, const Act& a, const int32_t* rows, int64_t nrows, int64_t n0, int64_t n1, float* y,
          int64_t ldy) {
    switch (W.fmt) {
        case FMT_BF16: EMO_DRIVE(tile_bf16); break;
        case FMT_F32: EMO_DRIVE(tile_f32); break;
        case FMT_I8: EMO_DRIVE(tile_i8); break;
        case FMT_I4: EMO_DRIVE(tile_i4); break;
        case FMT_MXFP4: EMO_DRIVE(tile_mx); break;
    }
}
#undef EMO_DRIVE

#include "attn.h"

const IsaKernels kernels = {"avx2", 32, 0, 1, gemm, attend};

}  // namespace

const IsaKernels* const avx2_kernels = &kernels;
}  // namespace emo

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else  // not x86-64
#include "kern.h"
namespace emo { const IsaKernels* const avx2_kernels = nullptr; }
#endif
