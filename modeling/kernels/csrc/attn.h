// Decode attention (see AttnArgs in kern.h), written once in plain C++ and included by each isa_*.cpp
// inside its anonymous namespace: every ISA file compiles it with its own instruction set (the compiler
// vectorises the loops over D), and internal linkage keeps the copies apart (see kern.h).
//
// Loops are shaped for vectorisation without -ffast-math: dot products keep 16 partial sums (no
// cross-lane reduction inside the loop) and exp is a polynomial over arrays instead of a libm call.

inline void attn_load_row(const uint8_t* base, int32_t bf16, int64_t off, int64_t D, float* dst) {
    if (bf16) {
        const uint16_t* p = (const uint16_t*)base + off;
        for (int64_t d = 0; d < D; d++) {
            const uint32_t u = (uint32_t)p[d] << 16;
            float f;
            memcpy(&f, &u, 4);
            dst[d] = f;
        }
    } else {
        memcpy(dst, (const float*)base + off, (size_t)D * 4);
    }
}

inline float attn_dot(const float* a, const float* b, int64_t D) {
    float part[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int64_t d = 0;
    for (; d + 16 <= D; d += 16)
        for (int j = 0; j < 16; j++) part[j] += a[d + j] * b[d + j];
    float s = 0.f;
    for (; d < D; d++) s += a[d] * b[d];
    for (int j = 0; j < 16; j++) s += part[j];
    return s;
}

// x[i] = exp(x[i]) for x[i] <= 0 (scores minus their maximum): 2^n * p(r), r in [-ln2/2, ln2/2], a degree-6
// polynomial (relative error ~2e-7); anything below -87 flushes to exp(-87).
inline void attn_exp_inplace(float* x, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        v = v < -87.f ? -87.f : v;
        const float t = v * 1.44269504088896341f;
        const int32_t k = (int32_t)(t - 0.5f);  // round to nearest for t <= 0
        const float kf = (float)k;
        const float r = (v - kf * 0.693359375f) + kf * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.f;
        const uint32_t bits = (uint32_t)(k + 127) << 23;
        float s;
        memcpy(&s, &bits, 4);
        x[i] = p * s;
    }
}

void attend(const AttnArgs& p, int64_t kv0, int64_t kv1) {
    const int64_t D = p.D, L = p.L, G = p.H / p.KVH;
    float row[ATTN_DMAX];
    for (int64_t h = kv0; h < kv1; h++) {
        const float* q = p.q + h * G * D;
        float* sc = p.scores + h * G * L;  // [G, L]
        for (int64_t l = 0; l < L; l++) {
            attn_load_row(p.k, p.bf16, h * p.k_hs + l * p.k_ls, D, row);
            for (int64_t g = 0; g < G; g++) sc[g * L + l] = attn_dot(q + g * D, row, D) * p.scale;
        }
        for (int64_t g = 0; g < G; g++) {
            float* s = sc + g * L;
            float m = p.sinks ? p.sinks[h * G + g] : s[0];
            for (int64_t l = 0; l < L; l++) m = s[l] > m ? s[l] : m;
            for (int64_t l = 0; l < L; l++) s[l] -= m;
            attn_exp_inplace(s, L);
            float z = 0.f;
            for (int64_t l = 0; l < L; l++) z += s[l];
            if (p.sinks) {
                float e = p.sinks[h * G + g] - m;
                attn_exp_inplace(&e, 1);
                z += e;
            }
            const float iz = 1.f / z;
            for (int64_t l = 0; l < L; l++) s[l] *= iz;
        }
        float* o = p.out + h * G * D;
        for (int64_t i = 0; i < G * D; i++) o[i] = 0.f;
        for (int64_t l = 0; l < L; l++) {
            attn_load_row(p.v, p.bf16, h * p.v_hs + l * p.v_ls, D, row);
            for (int64_t g = 0; g < G; g++) {
                const float w = sc[g * L + l];
                float* og = o + g * D;
                for (int64_t d = 0; d < D; d++) og[d] += w * row[d];
            }
        }
    }
}
