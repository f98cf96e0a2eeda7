// Plain data shared by the dispatcher (ops.cpp) and the per-ISA kernels (isa_*.cpp).
//
// The ISA translation units are compiled with wider instruction sets (a `#pragma GCC target` at their top)
// than the rest of the extension, so they must not instantiate any inline function or template that the
// linker could merge with a copy compiled for the baseline (an AVX-512 std::vector<T>::size() picked for
// every caller would crash an AVX2 machine). Hence this header holds only C-like structs and declarations:
// the ISA files include it, <immintrin.h> and C headers, nothing else.
#pragma once
#include <stddef.h>
#include <stdint.h>

namespace emo {

// Weight formats, each a matrix [N, K] in nn.Linear layout (row n is output n).
enum Fmt : int32_t {
    FMT_F32 = 0,    // float32 rows
    FMT_BF16 = 1,   // bfloat16 rows
    FMT_I8 = 2,     // one byte per weight; `w_signed`: int8 q, else uint8 q + 128 (compressed-tensors' bytes);
                    // one float scale per row
    FMT_I4 = 3,     // two 4-bit values per byte, element 2i in the low nibble of byte i, stored q + 8
                    // (compressed-tensors' int32 words read as bytes); float scale per (row, group),
                    // optional int8 zero point per (row, group): w = (q - zp) * scale
    FMT_MXFP4 = 4,  // OCP MXFP4: E2M1 codes, element 2i in the low nibble of byte i (16 bytes per block
                    // of 32), one E8M0 scale byte per (row, block): w = fp4 * 2^(s - 127)
};

struct Mat {
    int32_t fmt;
    int32_t w_signed;    // FMT_I8 only
    int64_t N, K;
    const uint8_t* w;    // il 1: row n starts at w + n * ld
    int64_t ld;          // il 1: bytes between rows; il 4: bytes between groups of 4 rows
    // Rows interleaved (the quantized formats' repacked copy, Matrix.interleave): il 4 stores rows 4g .. 4g + 3
    // unit by unit (`unit` bytes of row 4g, then of 4g + 1, ...), so a tile of 4 rows reads one sequential
    // stream; byte c (a multiple of unit) of row n lives at w + (n / 4) * ld + (n % 4) * unit + c * 4.
    int32_t il = 1;      // 1 or 4
    int32_t unit = 0;    // il 4: the ISA's chunk width (IsaKernels.vb) the copy was made for
    const float* scale;  // FMT_I8: [N]; FMT_I4: [N, K / group] (row stride sld)
    int64_t sld;
    const int8_t* zp;    // FMT_I4 with zero points: [N, K / group] (row stride sld), or null
    int32_t group;       // FMT_I4 group size (a multiple of 32)
    const uint8_t* e8;   // FMT_MXFP4: [N, K / 32] (row stride eld)
    int64_t eld;
};

// Activations of one call, prepared once and shared by every matrix that reads them. Quantized forms are
// int8 per block of 32 inputs (llama.cpp's Q8_0): a float scale d per block, q = round(x / d).
//   lanes: a 32-bit lane of a vector dot product covers 4 consecutive inputs (natural layout, FMT_I8) or
//   8 (nibble layout, FMT_I4 / FMT_MXFP4); `s*` hold each lane's block scale, `c*` each block's sum of q
//   at the block's first lane and 0 at the others (what offset-coded weights are corrected by).
//   The nibble layout keeps, per chunk of `vb` weight bytes at byte offset c, the inputs 2(c + i) (low
//   nibbles) first and then 2(c + i) + 1 (high nibbles): a chunk of 2 * vb bytes at offset 2c (shorter at
//   the end of a row).
struct Act {
    int64_t M, K;
    const float* f;       // [M, K] float32, always
    const uint16_t* bf;   // [M, K] bfloat16, or null
    const int8_t* q8;     // [M, K] natural layout, or null
    const float* s8;      // [M, K / 4]
    const int32_t* c8;    // [M, K / 4]
    const int8_t* q4;     // [M, K] nibble layout, or null
    const float* s4;      // [M, K / 8]
    const int32_t* c4;    // [M, K / 8]
};

enum Need : int32_t { NEED_BF16 = 1, NEED_Q8 = 2, NEED_Q4 = 4 };

// E8M0 scale byte s -> 2^(s - 127) / 2 (the MXFP4 kernels multiply doubled E2M1 values).
extern float e8_half_table[256];

// Decode attention: one query per head against a cache slot's keys and values.
//   element (h, l, d) of the keys lives at k + (h * k_hs + l * k_ls + d) * (bf16 ? 2 : 4); likewise values.
//   Query head j reads kv head j / (H / KVH) (grouped-query attention). `sinks` (gpt-oss): one more logit per
//   head whose probability mass is dropped. Scores and softmax in float32; `scores` is scratch [H, L].
struct AttnArgs {
    const float* q;  // [H, D]
    const uint8_t* k;
    const uint8_t* v;
    int32_t bf16;  // keys and values are bfloat16 (else float32)
    int64_t H, KVH, L, D;
    int64_t k_hs, k_ls, v_hs, v_ls;
    const float* sinks;  // [H] or null
    float scale;
    float* scores;  // [H, L]
    float* out;     // [H, D]
};
enum { ATTN_DMAX = 512 };

// Decode matrix-vector products (one activation row): 1 streams each weight row on its own (the default),
// 2 streams quantized rows in pairs (sharing the activation-side work), 0 uses the tiles of 4 rows;
// switchable for A/B measurements (set_decode_streams).
extern int32_t decode_row_streams;

// One ISA's kernels. `gemm` computes y[i * ldy + n] = sum_k x[rows[i], k] * W[n, k] for i < nrows and
// n0 <= n < n1 (rows: indices into the prepared activations; null means 0..nrows-1).
// `vb` is the chunk width (bytes) the ISA wants the nibble layout in.
struct IsaKernels {
    const char* name;
    int32_t vb;
    int32_t native_bf16;  // wants Act.bf for FMT_BF16
    int32_t quantized;    // reads the quantized activations (else Act.f with on-the-fly dequantization)
    void (*gemm)(const Mat& W, const Act& a, const int32_t* rows, int64_t nrows, int64_t n0, int64_t n1, float* y,
                 int64_t ldy);
    // attention of the query heads of kv heads kv0 .. kv1 - 1 (see AttnArgs)
    void (*attend)(const AttnArgs& p, int64_t kv0, int64_t kv1);
};

// Defined in isa_portable.cpp / isa_avx2.cpp / isa_avx512.cpp; the x86 ones are null elsewhere.
extern const IsaKernels* const portable_kernels;
extern const IsaKernels* const avx2_kernels;
extern const IsaKernels* const avx512_kernels;

}  // namespace emo
