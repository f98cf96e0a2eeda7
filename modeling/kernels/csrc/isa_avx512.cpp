// AVX-512 kernels (F, BW, VL, DQ, VNNI, BF16: Zen 4, Cooper Lake, Sapphire Rapids and later).
//
// Every format runs as dot products along K of a tile of MR activation rows x NR weight rows: each weight
// row is read once per tile from the mapped file (decode, MR = 1, streams the matrix once), the tile's
// accumulators stay in registers, and one horizontal sum per output ends it.
//   bf16: VDPBF16PS on 32 inputs at a time (bf16 activations).
//   int8 / int4 / MXFP4: VPDPBUSD of unsigned weight bytes by int8 activations (quantized per block of 32,
//   see kern.h): int8 weights as stored (q + 128), int4 nibbles (q + 8), MXFP4 codes looked up (VPSHUFB) as
//   doubled E2M1 values + 12; the offsets come out through the activation block sums (`c8`, `c4`) the
//   integer accumulator starts from. Per 64 weight bytes the integer sums are converted to float and
//   scaled by the activation's (and, for int4 / MXFP4, the weight's) block scales.
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma,f16c,bmi2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma,f16c,bmi2")
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

inline __mmask64 bytes_mask(int64_t len) { return len >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << len) - 1); }
inline __mmask16 lanes_mask(int64_t lanes) { return lanes >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << lanes) - 1); }

// ---- bf16 and float32 weights -------------------------------------------------------------------------
template <int MR, int NR>
void tile_bf16(const Mat& W, const Act& a, const int32_t* rows, int64_t i0, int64_t n, float* y, int64_t ldy) {
    const int64_t K = W.K;
    const uint16_t* x[MR];
    const uint16_t* w[NR];
    for (int i = 0; i < MR; i++) x[i] = a.bf + (int64_t)row_of(rows, i0 + i) * K;
    for (int j = 0; j < NR; j++) w[j] = (const uint16_t*)(W.w + (n + j) * W.ld);
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512i wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = _mm512_loadu_si512(w[j] + k);
        for (int i = 0; i < MR; i++) {
            __m512i xv = _mm512_loadu_si512(x[i] + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    if (k < K) {
        __mmask32 m = (__mmask32)((1ull << (K - k)) - 1);
        __m512i wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = _mm512_maskz_loadu_epi16(m, w[j] + k);
        for (int i = 0; i < MR; i++) {
            __m512i xv = _mm512_maskz_loadu_epi16(m, x[i] + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)xv, (__m512bh)wv[j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(i0 + i) * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int MR, int NR>
void tile_f32(const Mat& W, const Act& a, const int32_t* rows, int64_t i0, int64_t n, float* y, int64_t ldy) {
    const int64_t K = W.K;
    const float* x[MR];
    const float* w[NR];
    for (int i = 0; i < MR; i++) x[i] = a.f + (int64_t)row_of(rows, i0 + i) * K;
    for (int j = 0; j < NR; j++) w[j] = (const float*)(W.w + (n + j) * W.ld);
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = lanes_mask(K - k);
        __m512 wv[NR];
        for (int j = 0; j < NR; j++) wv[j] = _mm512_maskz_loadu_ps(m, w[j] + k);
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(m, x[i] + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(i0 + i) * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// ---- int8 weights, one scale per row ------------------------------------------------------------------
template <int MR, int NR, bool SIGNED>
void tile_i8s(const Mat& W, const Act& a, const int32_t* rows, int64_t i0, int64_t n, float* y, int64_t ldy) {
    const int64_t K = W.K;
    const int8_t* x[MR];
    const float* xs[MR];
    const int32_t* xc[MR];
    const uint8_t* w[NR];
    for (int i = 0; i < MR; i++) {
        int64_t r = row_of(rows, i0 + i);
        x[i] = a.q8 + r * K;
        xs[i] = a.s8 + r * (K / 4);
        xc[i] = a.c8 + r * (K / 4);
    }
    for (int j = 0; j < NR; j++) w[j] = row_at(W, n + j);
    const int64_t il = W.il;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    // 64 inputs at k (len of them at the end of a row: 32); constant masks in the loop over whole chunks
    auto chunk = [&](int64_t k, __mmask64 bm, __mmask16 lm) __attribute__((always_inline)) {
        __m512i wv[NR];
        for (int j = 0; j < NR; j++) {
            wv[j] = _mm512_maskz_loadu_epi8(bm, w[j] + k * il);
            if (SIGNED) wv[j] = _mm512_xor_si512(wv[j], flip);  // q -> q + 128 (x is 0 past the end)
        }
        for (int i = 0; i < MR; i++) {
            __m512i xv = _mm512_maskz_loadu_epi8(bm, x[i] + k);
            __m512 sv = _mm512_maskz_loadu_ps(lm, xs[i] + k / 4);
            // sum (q + 128) * x = sum q * x + 128 * sum x: start from -128 * (block sums of x)
            __m512i corr = _mm512_sub_epi32(_mm512_setzero_si512(),
                                            _mm512_slli_epi32(_mm512_maskz_loadu_epi32(lm, xc[i] + k / 4), 7));
            for (int j = 0; j < NR; j++) {
                __m512i d = _mm512_dpbusd_epi32(corr, wv[j], xv);
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc[i][j]);
            }
        }
    };
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) chunk(k, ~(__mmask64)0, (__mmask16)0xFFFF);
    if (k < K) chunk(k, bytes_mask(K - k), lanes_mask((K - k) / 4));  // K is a multiple of 32
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(i0 + i) * ldy + n + j] = W.scale[n + j] * _mm512_reduce_add_ps(acc[i][j]);
}

template <int MR, int NR> void tile_i8(const Mat& W, const Act& a, const int32_t* r, int64_t i0, int64_t n, float* y, int64_t ldy) {
    if (W.w_signed) tile_i8s<MR, NR, true>(W, a, r, i0, n, y, ldy);
    else tile_i8s<MR, NR, false>(W, a, r, i0, n, y, ldy);
}

// ---- int4 (groups of a multiple of 128) and MXFP4 weights: nibbles ------------------------------------
// One chunk is 64 weight bytes = 128 inputs; lane l of the chunk covers inputs 8l .. 8l + 7 (4 lanes per
// activation block of 32).
template <int MR, int NR, bool MX, bool ZP>
void tile_nib(const Mat& W, const Act& a, const int32_t* rows, int64_t i0, int64_t n, float* y, int64_t ldy) {
    const int64_t K = W.K, Kb = K / 2;
    const int8_t* x[MR];
    const float* xs[MR];
    const int32_t* xc[MR];
    const uint8_t* w[NR];
    const float* sc[NR];   // int4: row n + j's group scales
    const int8_t* zr[NR];  // int4 with zero points: its zero points
    const uint8_t* er[NR]; // MXFP4: its block scales
    for (int i = 0; i < MR; i++) {
        int64_t r = row_of(rows, i0 + i);
        x[i] = a.q4 + r * K;
        xs[i] = a.s4 + r * (K / 8);
        xc[i] = a.c4 + r * (K / 8);
    }
    for (int j = 0; j < NR; j++) {
        w[j] = row_at(W, n + j);
        sc[j] = MX ? nullptr : W.scale + (n + j) * W.sld;
        zr[j] = ZP ? W.zp + (n + j) * W.sld : nullptr;
        er[j] = MX ? W.e8 + (n + j) * W.eld : nullptr;
    }
    const int64_t il = W.il;
    const __m512i low = _mm512_set1_epi8(0x0F);
    // doubled E2M1 values + 12: 0 .. 24, so that they are unsigned bytes
    const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
    const __m512i quad = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    // one chunk: 64 weight bytes per row at byte c (len of them at the end of a row), weight group g; the
    // masks are constants in the loop over whole chunks, so the compiler emits plain loads there
    auto chunk = [&](int64_t c, int64_t len, __mmask64 bm, __mmask16 lm, int64_t g) __attribute__((always_inline)) {
        __m512i lo[NR], hi[NR];
        __m512 ws[NR];
        __m512i zf[NR];
        for (int j = 0; j < NR; j++) {
            __m512i b = _mm512_maskz_loadu_epi8(bm, w[j] + c * il);
            lo[j] = _mm512_and_si512(b, low);
            hi[j] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
            if (MX) {
                lo[j] = _mm512_shuffle_epi8(lut, lo[j]);
                hi[j] = _mm512_shuffle_epi8(lut, hi[j]);
                const uint8_t* e = er[j] + c / 16;
                const int64_t nb = len / 16;
                __m128 s4 = _mm_setr_ps(e8_half_table[e[0]], nb > 1 ? e8_half_table[e[1]] : 0.f,
                                        nb > 2 ? e8_half_table[e[2]] : 0.f, nb > 3 ? e8_half_table[e[3]] : 0.f);
                ws[j] = _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(s4));
            } else {
                ws[j] = _mm512_set1_ps(sc[j][g]);
                if (ZP) zf[j] = _mm512_set1_epi32(-(8 + zr[j][g]));
            }
        }
        for (int i = 0; i < MR; i++) {
            const int8_t* xp = x[i] + 2 * c;
            __m512i xl = _mm512_maskz_loadu_epi8(bm, xp);
            __m512i xh = _mm512_maskz_loadu_epi8(bm, xp + len);
            __m512 sv = _mm512_maskz_loadu_ps(lm, xs[i] + c / 4);
            __m512i cv = _mm512_maskz_loadu_epi32(lm, xc[i] + c / 4);
            // the offset (12 for MXFP4 codes, 8 for int4 without zero points) is the same for every weight
            // row: its correction is computed once per activation row
            const __m512i c8 = _mm512_slli_epi32(cv, 3);
            const __m512i shared = _mm512_sub_epi32(_mm512_setzero_si512(),
                                                    MX ? _mm512_add_epi32(c8, _mm512_slli_epi32(cv, 2)) : c8);
            for (int j = 0; j < NR; j++) {
                __m512i d = ZP ? _mm512_mullo_epi32(cv, zf[j]) : shared;
                d = _mm512_dpbusd_epi32(d, lo[j], xl);
                d = _mm512_dpbusd_epi32(d, hi[j], xh);
                acc[i][j] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(d), sv), ws[j], acc[i][j]);
            }
        }
    };
    // the weight group of chunk c, counted (a division per chunk costs more than the chunk's other work)
    const int64_t chunks_per_group = MX ? 1 : W.group / 128;
    int64_t c = 0, g = 0, in_group = 0;
    for (; c + 64 <= Kb; c += 64) {
        chunk(c, 64, ~(__mmask64)0, (__mmask16)0xFFFF, g);
        if (!MX && ++in_group == chunks_per_group) {
            in_group = 0;
            g++;
        }
    }
    if (c < Kb) chunk(c, Kb - c, bytes_mask(Kb - c), lanes_mask((Kb - c) / 4), g);  // a multiple of 16 bytes
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) y[(i0 + i) * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int MR, int NR> void tile_i4(const Mat& W, const Act& a, const int32_t* r, int64_t i0, int64_t n, float* y, int64_t ldy) {
    if (W.zp) tile_nib<MR, NR, false, true>(W, a, r, i0, n, y, ldy);
    else tile_nib<MR, NR, false, false>(W, a, r, i0, n, y, ldy);
}
template <int MR, int NR> void tile_mx(const Mat& W, const Act& a, const int32_t* r, int64_t i0, int64_t n, float* y, int64_t ldy) {
    tile_nib<MR, NR, true, false>(W, a, r, i0, n, y, ldy);
}

// Weight tiles of 4 rows (then single rows), each against activation tiles of up to MRMAX rows: a weight
// tile is read from memory once and reused from cache by every activation tile.
#define EMO_DRIVE(TILE, MRMAX)                                                                           \
    if (nrows == 1 && decode_row_streams && W.il == 1) {  /* interleaved rows: the 4-row tiles */          \
        int64_t n = n0;                                                                                  \
        if (decode_row_streams == 2 && W.fmt != FMT_BF16 && W.fmt != FMT_F32)                           \
            for (; n + 2 <= n1; n += 2) TILE<1, 2>(W, a, rows, 0, n, y, ldy);                           \
        for (; n < n1; n++) TILE<1, 1>(W, a, rows, 0, n, y, ldy);                                        \
    } else                                                                                               \
    for (int64_t n = n0; n < n1;) {                                                                      \
        const bool four = n1 - n >= 4;                                                                   \
        for (int64_t i = 0; i < nrows;) {                                                                \
            const int64_t left = nrows - i;                                                              \
            if (four) {                                                                                  \
                if (MRMAX >= 4 && left >= 4) { TILE<(MRMAX >= 4 ? 4 : 1), 4>(W, a, rows, i, n, y, ldy); i += 4; } \
                else if (left >= 2) { TILE<2, 4>(W, a, rows, i, n, y, ldy); i += 2; }                 \
                else { TILE<1, 4>(W, a, rows, i, n, y, ldy); i += 1; }                                \
            } else { TILE<1, 1>(W, a, rows, i, n, y, ldy); i += 1; }                                  \
        }                                                                                                \
        n += four ? 4 : 1;                                                                               \
    }

void gemm(const Mat& W, const Act& a, const int32_t* rows, int64_t nrows, int64_t n0, int64_t n1, float* y,
          int64_t ldy) {
    switch (W.fmt) {
        case FMT_BF16: EMO_DRIVE(tile_bf16, 4); break;
        case FMT_F32: EMO_DRIVE(tile_f32, 4); break;
        case FMT_I8: EMO_DRIVE(tile_i8, 2); break;
        case FMT_I4: EMO_DRIVE(tile_i4, 2); break;
        case FMT_MXFP4: EMO_DRIVE(tile_mx, 2); break;
    }
}
#undef EMO_DRIVE

#include "attn.h"

const IsaKernels kernels = {"avx512", 64, 1, 1, gemm, attend};

}  // namespace

const IsaKernels* const avx512_kernels = &kernels;
}  // namespace emo

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else  // not x86-64
#include "kern.h"
namespace emo { const IsaKernels* const avx512_kernels = nullptr; }
#endif
