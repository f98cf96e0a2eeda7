// Portable kernels: plain C++ for every CPU (ARM included), compiled for the baseline ISA.
//
// Each weight is decoded to float32 as it is read (never expanded in memory) and multiplied with float32
// activations; no activation quantization, so these are also the closest to dequantize-then-linear.
// The compiler vectorises the inner loops for the baseline (SSE2 on x86-64, NEON on AArch64).
#include <math.h>
#include <string.h>

#include "kern.h"

namespace emo {

float e8_half_table[256];
int32_t decode_row_streams = 1;
namespace {
struct TableInit {
    TableInit() {
        for (int s = 0; s < 256; s++) e8_half_table[s] = ldexpf(1.0f, s - 128);
    }
} table_init;

const float FP4[16] = {0.f, 0.5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f, -0.f, -0.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f};

inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float dot_row(const Mat& W, int64_t n, const float* x) {
    const int64_t K = W.K;
    const uint8_t* w = W.w + n * W.ld;
    float s = 0.f;
    switch (W.fmt) {
        case FMT_F32: {
            const float* p = (const float*)w;
            for (int64_t k = 0; k < K; k++) s += p[k] * x[k];
            return s;
        }
        case FMT_BF16: {
            const uint16_t* p = (const uint16_t*)w;
            for (int64_t k = 0; k < K; k++) s += bf16_to_f32(p[k]) * x[k];
            return s;
        }
        case FMT_I8: {
            const int off = W.w_signed ? 0 : 128;
            for (int64_t k = 0; k < K; k++) s += (float)((W.w_signed ? (int)(int8_t)w[k] : (int)w[k]) - off) * x[k];
            return s * W.scale[n];
        }
        case FMT_I4: {
            const int64_t G = W.group;
            for (int64_t g = 0; g < K / G; g++) {
                const int zp = 8 + (W.zp ? W.zp[n * W.sld + g] : 0);
                float t = 0.f;
                for (int64_t k = g * G; k < (g + 1) * G; k += 2) {
                    const uint8_t b = w[k / 2];
                    t += (float)((b & 15) - zp) * x[k] + (float)((b >> 4) - zp) * x[k + 1];
                }
                s += t * W.scale[n * W.sld + g];
            }
            return s;
        }
        case FMT_MXFP4: {
            const uint8_t* e = W.e8 + n * W.eld;
            for (int64_t blk = 0; blk < K / 32; blk++) {
                float t = 0.f;
                for (int64_t j = 0; j < 16; j++) {
                    const uint8_t b = w[blk * 16 + j];
                    t += FP4[b & 15] * x[blk * 32 + 2 * j] + FP4[b >> 4] * x[blk * 32 + 2 * j + 1];
                }
                s += t * 2.f * e8_half_table[e[blk]];
            }
            return s;
        }
    }
    return s;
}

void gemm(const Mat& W, const Act& a, const int32_t* rows, int64_t nrows, int64_t n0, int64_t n1, float* y,
          int64_t ldy) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t i = 0; i < nrows; i++) {
            const int64_t r = rows ? rows[i] : i;
            y[i * ldy + n] = dot_row(W, n, a.f + r * a.K);
        }
}

#include "attn.h"

const IsaKernels kernels = {"portable", 16, 0, 0, gemm, attend};

}  // namespace

const IsaKernels* const portable_kernels = &kernels;
}  // namespace emo
