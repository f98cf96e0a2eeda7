// The extension's entry points: ISA dispatch, the thread pool, activation preparation, `linear` and the
// fused mixture-of-experts call. Compiled for the baseline ISA; the wide kernels live in isa_*.cpp.
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <math.h>
#include <sched.h>

#include "kern.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EMO_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define EMO_PAUSE() asm volatile("yield")
#else
#define EMO_PAUSE() ((void)0)
#endif

namespace emo {

// ---- CPU features and the ISA in use --------------------------------------------------------------------
static bool cpu_has(const char* feature) {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    std::string f(feature);
    if (f == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (f == "avx512")
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bf16");
#else
    (void)feature;
#endif
    return false;
}

static std::vector<std::string> supported_isas() {
    std::vector<std::string> out;
    if (avx512_kernels && cpu_has("avx512")) out.push_back("avx512");
    if (avx2_kernels && cpu_has("avx2")) out.push_back("avx2");
    out.push_back("portable");
    return out;
}

static const IsaKernels* isa_by_name(const std::string& name) {
    if (name == "avx512") return avx512_kernels;
    if (name == "avx2") return avx2_kernels;
    if (name == "portable") return portable_kernels;
    return nullptr;
}

static const IsaKernels* g_isa = nullptr;

static void set_isa(const std::string& name) {
    auto ok = supported_isas();
    for (auto& s : ok)
        if (s == name) {
            g_isa = isa_by_name(name);
            return;
        }
    std::string list;
    for (auto& s : ok) list += (list.empty() ? "" : ", ") + s;
    TORCH_CHECK_VALUE(false, "ISA '", name, "' is not supported on this CPU; supported here: ", list);
}

static const IsaKernels* isa() {
    if (!g_isa) set_isa(supported_isas().front());
    return g_isa;
}

// ---- the thread pool ------------------------------------------------------------------------------------
// Workers wake once per parallel call, spin for a short while after their share (the next call of a
// forward pass usually comes within microseconds), then sleep on a condition variable, so idle threads
// never hold a core another process needs. Work inside a call is taken from an atomic counter, so a
// worker that the OS has descheduled (a busy neighbour) delays only the chunk it holds.
class Pool {
   public:
    ~Pool() { resize(1); }

    int size() const { return n_; }

    void resize(int n) {
        if (n < 1) n = 1;
        if (n == n_) return;
        {
            std::lock_guard<std::mutex> lk(mu_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
        stop_ = false;
        n_ = n;
        // a worker starts from the generation of now: a call made before its thread runs is still its own
        const uint64_t now = gen_.load(std::memory_order_seq_cst);
        for (int i = 1; i < n; i++) workers_.emplace_back([this, i, now] { loop(i, now); });
    }

    void set_spin_us(int us) { spin_us_ = us < 0 ? 0 : us; }

    // f(thread index) on the caller (thread 0) and on every worker that joins before the caller has finished
    // its own share; returns when those are done. A worker the OS has not scheduled by then (a busy
    // neighbour) is not waited for: it finds the call closed when it runs and goes back to waiting, so f
    // must share its work dynamically (parallel_items takes items from an atomic counter).
    void run(const std::function<void(int)>& f) {
        if (n_ == 1) {
            f(0);
            return;
        }
        std::lock_guard<std::mutex> one_caller(run_mu_);  // one parallel call at a time (never nested)
        job_ = &f;
        joined_.store(0, std::memory_order_release);  // open, nobody in (a worker that joins sees job_)
        gen_.fetch_add(1, std::memory_order_seq_cst);
        if (sleepers_.load(std::memory_order_seq_cst) > 0) {
            std::lock_guard<std::mutex> lk(mu_);
            cv_.notify_all();
        }
        f(0);
        joined_.fetch_or(CLOSED, std::memory_order_acq_rel);  // late workers stay out
        int spins = 0;
        while ((joined_.load(std::memory_order_acquire) & ~CLOSED) != 0) {  // wait for the ones inside
            if (++spins < 20000) EMO_PAUSE();
            else sched_yield();  // a worker inside was descheduled: give the core away
        }
        job_ = nullptr;
    }

   private:
    void loop(int tid, uint64_t seen) {
        for (;;) {
            auto t0 = std::chrono::steady_clock::now();
            int spins = 0;
            while (gen_.load(std::memory_order_acquire) == seen) {
                EMO_PAUSE();
                if (++spins % 64 == 0 &&
                    std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(spin_us_)) {
                    std::unique_lock<std::mutex> lk(mu_);
                    sleepers_.fetch_add(1, std::memory_order_seq_cst);
                    cv_.wait(lk, [&] { return stop_ || gen_.load(std::memory_order_seq_cst) != seen; });
                    sleepers_.fetch_sub(1, std::memory_order_seq_cst);
                    break;
                }
            }
            if (stop_) return;
            seen = gen_.load(std::memory_order_acquire);
            // join the call in flight unless its caller has closed it (then job_ may be gone already)
            if (joined_.fetch_add(1, std::memory_order_acq_rel) & CLOSED) {
                joined_.fetch_sub(1, std::memory_order_acq_rel);
                continue;
            }
            (*job_)(tid);
            joined_.fetch_sub(1, std::memory_order_acq_rel);
        }
    }

    int n_ = 1;
    int spin_us_ = 100;
    std::vector<std::thread> workers_;
    std::atomic<uint64_t> gen_{0};
    static constexpr int CLOSED = 1 << 30;
    std::atomic<int> joined_{0};  // workers inside the current call, | CLOSED once its caller is done
    std::atomic<int> sleepers_{0};
    const std::function<void(int)>* job_ = nullptr;
    std::mutex mu_, run_mu_;
    std::condition_variable cv_;
    bool stop_ = false;
};

// Threads of the pool: set_threads(n) fixes them (the model's own count, so that torch's intra-op threads can
// differ: a decode step runs its small torch ops on one thread); 0 follows torch's count.
static int g_threads = 0;

static Pool& pool() {
    static Pool* p = [] {
        auto* q = new Pool();  // never destroyed: workers must not be joined during static destruction
        const char* s = std::getenv("EMO_SPIN_US");
        if (s) q->set_spin_us(std::atoi(s));
        return q;
    }();
    const int want = g_threads > 0 ? g_threads : at::get_num_threads();
    if (p->size() != want) p->resize(want);
    return *p;
}

// Runs body(i) for i in [0, items) over the pool, chunks taken dynamically.
static void parallel_items(int64_t items, const std::function<void(int64_t)>& body) {
    Pool& p = pool();
    if (items <= 1 || p.size() == 1) {
        for (int64_t i = 0; i < items; i++) body(i);
        return;
    }
    std::atomic<int64_t> next{0};
    p.run([&](int) {
        for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < items;) body(i);
    });
}

// ---- weights ----------------------------------------------------------------------------------------------
// A weight matrix as the kernels read it: raw pointers into tensors this object keeps alive.
struct Matrix {
    Mat m{};
    std::vector<torch::Tensor> keep;
    std::string name;
    // the rows interleaved by 4 for one ISA's chunk width (interleave()): what that ISA's kernels read
    Mat packed{};
    torch::Tensor packed_bytes;
    int64_t rows() const { return m.N; }
    int64_t cols() const { return m.K; }
    bool interleaved() const { return packed_bytes.defined(); }
};
using MatrixPtr = std::shared_ptr<Matrix>;

// The layout kernels `k` read: the interleaved copy where it was made for their chunk width, else the
// matrix as stored (another ISA forced after the copy was made: correct, from the original bytes).
static const Mat& mat_for(const Matrix& M, const IsaKernels* k) {
    return (M.interleaved() && k->quantized && M.packed.unit == k->vb) ? M.packed : M.m;
}

// A copy of a quantized matrix with its rows interleaved by 4 (Mat.il) for the current ISA's chunk width:
// a decoded token's tile of 4 rows then reads one sequential stream instead of 4 strided ones, and shares
// the activation-side work of each chunk between the 4 rows. Each row is padded to whole chunks (zeros: the
// activations past K are zero, so they add nothing) and the last group to 4 rows. False (nothing made) for
// float matrices and the portable kernels, which read the stored layout.
static bool interleave(Matrix& M) {
    const IsaKernels* k = isa();
    const Mat& m = M.m;
    if (M.interleaved() || !k->quantized || !(m.fmt == FMT_I8 || m.fmt == FMT_I4 || m.fmt == FMT_MXFP4))
        return M.interleaved();
    const int64_t unit = k->vb, row_bytes = m.fmt == FMT_I8 ? m.K : m.K / 2;
    const int64_t padded = (row_bytes + unit - 1) / unit * unit, groups = (m.N + 3) / 4;
    auto buf = torch::empty({groups * 4 * padded}, torch::kUInt8);  // every byte written once below
    uint8_t* dst = buf.data_ptr<uint8_t>();
    parallel_items(groups, [&](int64_t g) {
        for (int64_t r = 0; r < 4; r++) {
            const bool real = 4 * g + r < m.N;  // else a padding row of the last group
            const uint8_t* src = m.w + (4 * g + r) * m.ld;
            for (int64_t c = 0; c < padded; c += unit) {
                uint8_t* d = dst + g * 4 * padded + c * 4 + r * unit;
                const int64_t len = real ? std::min(unit, row_bytes - c) : 0;  // c < row_bytes
                if (len) std::memcpy(d, src + c, len);
                if (len < unit) std::memset(d + len, 0, unit - len);
            }
        }
    });
    M.packed = m;
    M.packed.w = dst;
    M.packed.ld = 4 * padded;
    M.packed.il = 4;
    M.packed.unit = (int32_t)unit;
    M.packed_bytes = buf;
    return true;
}

static void check_rows(const torch::Tensor& t, const std::string& what, const std::string& name) {
    TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": ", what, " is on ", t.device().str(), ", the native kernels run on the CPU");
    TORCH_CHECK_VALUE(t.dim() >= 2, name, ": ", what, " must be 2-D, has shape ", t.sizes());
    TORCH_CHECK_VALUE(t.stride(-1) == 1, name, ": ", what, " rows must be contiguous");
}

static MatrixPtr dense(torch::Tensor w, std::string name) {
    check_rows(w, "weight", name);
    TORCH_CHECK_VALUE(w.dim() == 2, name, ": weight must be 2-D, has shape ", w.sizes());
    auto M = std::make_shared<Matrix>();
    if (w.scalar_type() == torch::kBFloat16) M->m.fmt = FMT_BF16;
    else if (w.scalar_type() == torch::kFloat32) M->m.fmt = FMT_F32;
    else TORCH_CHECK_VALUE(false, name, ": weight dtype ", w.scalar_type(), " has no native kernel (float32, bfloat16)");
    M->m.N = w.size(0);
    M->m.K = w.size(1);
    M->m.w = (const uint8_t*)w.data_ptr();
    M->m.ld = w.stride(0) * w.element_size();
    M->keep = {w};
    M->name = name;
    return M;
}

static torch::Tensor float_rows(torch::Tensor t, int64_t N, int64_t G, const std::string& what, const std::string& name) {
    TORCH_CHECK_VALUE(t.numel() == N * G, name, ": ", what, " has ", t.numel(), " values, expected ", N, " x ", G);
    return t.to(torch::kFloat32).reshape({N, G}).contiguous();
}

static MatrixPtr int8(torch::Tensor w, int64_t K, torch::Tensor scale, bool is_signed, std::string name) {
    check_rows(w, "weight", name);
    TORCH_CHECK_VALUE(K % 32 == 0, name, ": int8 kernels need the input dimension to be a multiple of 32, not ", K);
    TORCH_CHECK_VALUE(w.element_size() == 1 && w.size(1) >= K, name, ": int8 weight must be bytes of at least ", K,
                      " per row, has shape ", w.sizes(), " of ", w.scalar_type());
    auto M = std::make_shared<Matrix>();
    M->m.fmt = FMT_I8;
    M->m.w_signed = is_signed;
    M->m.N = w.size(0);
    M->m.K = K;
    M->m.w = (const uint8_t*)w.data_ptr();
    M->m.ld = w.stride(0);
    auto s = float_rows(scale, M->m.N, 1, "weight_scale", name);
    M->m.scale = s.data_ptr<float>();
    M->m.sld = 1;
    M->keep = {w, s};
    M->name = name;
    return M;
}

static MatrixPtr int4(torch::Tensor w, int64_t K, torch::Tensor scale, c10::optional<torch::Tensor> zp, int64_t group,
                      std::string name) {
    check_rows(w, "weight", name);
    TORCH_CHECK_VALUE(K % 32 == 0, name, ": int4 kernels need the input dimension to be a multiple of 32, not ", K);
    TORCH_CHECK_VALUE(group > 0 && K % group == 0 && group % (2 * isa()->vb) == 0, name, ": int4 group size ", group,
                      " is not supported by the ", isa()->name, " kernels (a multiple of ", 2 * isa()->vb,
                      " dividing ", K, ")");
    TORCH_CHECK_VALUE(w.element_size() == 1 && w.size(1) * 2 >= K, name, ": int4 weight must be ", K / 2,
                      " bytes per row, has shape ", w.sizes());
    auto M = std::make_shared<Matrix>();
    M->m.fmt = FMT_I4;
    M->m.N = w.size(0);
    M->m.K = K;
    M->m.w = (const uint8_t*)w.data_ptr();
    M->m.ld = w.stride(0);
    M->m.group = (int32_t)group;
    auto s = float_rows(scale, M->m.N, K / group, "weight_scale", name);
    M->m.scale = s.data_ptr<float>();
    M->m.sld = K / group;
    M->keep = {w, s};
    if (zp.has_value()) {
        TORCH_CHECK_VALUE(zp->numel() == M->m.N * (K / group), name, ": weight_zero_point has ", zp->numel(),
                          " values, expected ", M->m.N, " x ", K / group);
        auto z = zp->to(torch::kInt8).reshape({M->m.N, K / group}).contiguous();
        M->m.zp = z.data_ptr<int8_t>();
        M->keep.push_back(z);
    }
    M->name = name;
    return M;
}

static MatrixPtr mxfp4(torch::Tensor blocks, torch::Tensor scales, std::string name) {
    TORCH_CHECK_VALUE(blocks.scalar_type() == torch::kUInt8 && blocks.dim() == 3 && blocks.size(2) == 16, name,
                      ": MXFP4 blocks must be uint8 [rows, cols / 32, 16], are ", blocks.scalar_type(), " ", blocks.sizes());
    TORCH_CHECK_VALUE(scales.scalar_type() == torch::kUInt8 && scales.dim() == 2 && scales.size(0) == blocks.size(0) &&
                          scales.size(1) == blocks.size(1),
                      name, ": MXFP4 scales must be uint8 [", blocks.size(0), ", ", blocks.size(1), "], are ",
                      scales.scalar_type(), " ", scales.sizes());
    TORCH_CHECK_VALUE(blocks.stride(2) == 1 && blocks.stride(1) == 16 && scales.stride(1) == 1, name,
                      ": MXFP4 blocks and scales must have contiguous rows");
    auto M = std::make_shared<Matrix>();
    M->m.fmt = FMT_MXFP4;
    M->m.N = blocks.size(0);
    M->m.K = blocks.size(1) * 32;
    M->m.w = blocks.data_ptr<uint8_t>();
    M->m.ld = blocks.stride(0);
    M->m.e8 = scales.data_ptr<uint8_t>();
    M->m.eld = scales.stride(0);
    M->keep = {blocks, scales};
    M->name = name;
    return M;
}

// ---- activations ----------------------------------------------------------------------------------------
struct ActStore {
    torch::Tensor f, bf;
    // quantized forms in plain vectors: a decode step prepares a few activations per layer, and a torch
    // allocation (through the dispatcher) costs more than the quantization of a row
    std::vector<int8_t> q8, q4;
    std::vector<float> s8, s4;
    std::vector<int32_t> c8, c4;
    Act a{};
};

static int need_of(const IsaKernels* k, const Mat& m) {
    if (!k->quantized) return 0;
    switch (m.fmt) {
        case FMT_BF16: return k->native_bf16 ? NEED_BF16 : 0;
        case FMT_I8: return NEED_Q8;
        case FMT_I4:
        case FMT_MXFP4: return NEED_Q4;
    }
    return 0;
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fff + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

// x [M, K] (any float dtype) -> the forms the matrices that will read it need.
static void prepare(ActStore& st, const torch::Tensor& x, int need, const IsaKernels* k) {
    const int64_t M = x.size(0), K = x.size(1);
    st.f = x.to(torch::kFloat32).contiguous();
    st.a.M = M;
    st.a.K = K;
    st.a.f = st.f.data_ptr<float>();
    if (need & NEED_BF16) {
        st.bf = x.to(torch::kBFloat16).contiguous();
        st.a.bf = (const uint16_t*)st.bf.data_ptr();
    }
    const bool q8 = need & NEED_Q8, q4 = need & NEED_Q4;
    if (!q8 && !q4) return;
    TORCH_CHECK_VALUE(K % 32 == 0, "quantized kernels need activations of a multiple of 32 values, not ", K);
    // one form: int8 values [M, K], then a block scale and a block-sum slot per lane (K / inputs_per_lane each)
    auto alloc = [&](std::vector<int8_t>& q, std::vector<float>& sc, std::vector<int32_t>& c, int64_t inputs_per_lane,
                     const int8_t*& qp, const float*& sp, const int32_t*& cp) {
        q.resize(M * K);
        sc.resize(M * (K / inputs_per_lane));
        c.assign(M * (K / inputs_per_lane), 0);
        qp = q.data();
        sp = sc.data();
        cp = c.data();
    };
    if (q8) alloc(st.q8, st.s8, st.c8, 4, st.a.q8, st.a.s8, st.a.c8);
    if (q4) alloc(st.q4, st.s4, st.c4, 8, st.a.q4, st.a.s4, st.a.c4);
    const int64_t vb = k->vb, Kb = K / 2;
    const Act& a = st.a;
    auto row = [&](int64_t m) {
        const float* xr = a.f + m * K;
        // the natural layout: q8's own row, or a scratch row that the nibble layout is permuted from
        thread_local std::vector<int8_t> scratch;
        int8_t* qr = q8 ? (int8_t*)a.q8 + m * K : (scratch.resize(K), scratch.data());
        for (int64_t b = 0; b < K / 32; b++) {
            const float* xb = xr + b * 32;
            float amax = 0.f;
            for (int e = 0; e < 32; e++) {  // not fmaxf: a libm call on the baseline ISA (NaN is skipped alike)
                const float v = fabsf(xb[e]);
                amax = v > amax ? v : amax;
            }
            const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int8_t* q = qr + b * 32;
            int32_t sum = 0;
            for (int e = 0; e < 32; e++) {
                // round half to even, as nearbyintf (a libm call on the baseline ISA) does: |v| <= 127, so adding
                // and subtracting 1.5 * 2^23 leaves v rounded in the float unit
                const float v = (xb[e] * id + 12582912.f) - 12582912.f;
                q[e] = (int8_t)(int)v;
                sum += q[e];
            }
            if (q8) {
                float* s = (float*)a.s8 + m * (K / 4) + b * 8;
                for (int l = 0; l < 8; l++) s[l] = d;
                ((int32_t*)a.c8)[m * (K / 4) + b * 8] = sum;
            }
            if (q4) {
                float* s = (float*)a.s4 + m * (K / 8) + b * 4;
                for (int l = 0; l < 4; l++) s[l] = d;
                ((int32_t*)a.c4)[m * (K / 8) + b * 4] = sum;
            }
        }
        if (q4) {  // per chunk of vb weight bytes at byte c: the inputs of its low nibbles, then of its high ones
            int8_t* out = (int8_t*)a.q4 + m * K;
            for (int64_t c = 0; c < Kb; c += vb) {
                const int64_t len = Kb - c < vb ? Kb - c : vb;
                int8_t* o = out + 2 * c;
                const int8_t* in = qr + 2 * c;
                for (int64_t j = 0; j < len; j++) {
                    o[j] = in[2 * j];
                    o[len + j] = in[2 * j + 1];
                }
            }
        }
    };
    if (M * K < (1 << 16)) {
        for (int64_t m = 0; m < M; m++) row(m);
    } else {
        parallel_items(M, [&](int64_t m) { row(m); });
    }
}

// float32 activations ask for float32 products: quantized weights are then decoded to float as they are
// read (the portable kernels) instead of meeting int8-quantized activations, so a float32 model equals
// dequantize-then-linear to float rounding. bf16 / fp16 activations take the ISA's integer dot products.
static bool is_quantized(const Mat& m) { return m.fmt == FMT_I8 || m.fmt == FMT_I4 || m.fmt == FMT_MXFP4; }
static const IsaKernels* kernels_for(const torch::Tensor& x, bool quantized) {
    return (quantized && x.scalar_type() == torch::kFloat32) ? portable_kernels : isa();
}

// ---- linear -----------------------------------------------------------------------------------------------
static int64_t chunk_rows(int64_t N, int64_t work_per_row) {
    // enough chunks for dynamic balance (8 per thread), each worth at least ~64k multiply-adds
    const int64_t threads = pool().size();
    int64_t r = (N + threads * 8 - 1) / (threads * 8);
    const int64_t min_rows = (65536 + work_per_row - 1) / work_per_row;
    if (r < min_rows) r = min_rows;
    r = (r + 3) / 4 * 4;
    return r < N ? r : N;
}

// x @ W_j.T + bias_j for one or several matrices of one input width (an attention layer's q, k and v): the
// activations prepared once and one parallel region over the rows of all of them. Results in x's dtype, or
// with `float_out` as float32 holding the values rounded to x's dtype (logits: what y.to(dtype).float()
// gives, without the two copies).
static std::vector<torch::Tensor> linear_many(torch::Tensor x, const std::vector<MatrixPtr>& Ws,
                                              const std::vector<c10::optional<torch::Tensor>>& biases,
                                              bool float_out) {
    TORCH_CHECK_VALUE(!Ws.empty() && biases.size() == Ws.size(), "linear_many: ", Ws.size(), " matrices and ",
                      biases.size(), " biases");
    bool quantized = false;
    for (const auto& W : Ws) {
        TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == W->m.K, W->name, ": input of shape ", x.sizes(),
                          " does not match a weight of ", W->m.N, " x ", W->m.K);
        quantized |= is_quantized(W->m);
    }
    const int64_t M = x.size(0);
    const IsaKernels* k = kernels_for(x, quantized);
    int need = 0;
    for (const auto& W : Ws) need |= need_of(k, W->m);
    ActStore st;
    prepare(st, x, need, k);
    struct Item { size_t j; int64_t n0, n1; };
    std::vector<Item> items;
    std::vector<torch::Tensor> ys;
    for (size_t j = 0; j < Ws.size(); j++) {
        const int64_t N = Ws[j]->m.N, R = chunk_rows(N, M * Ws[j]->m.K);
        ys.push_back(torch::empty({M, N}, torch::kFloat32));
        for (int64_t n0 = 0; n0 < N; n0 += R) items.push_back({j, n0, std::min(N, n0 + R)});
    }
    parallel_items((int64_t)items.size(), [&](int64_t i) {
        const Item& it = items[i];
        const MatrixPtr& W = Ws[it.j];
        k->gemm(mat_for(*W, k), st.a, nullptr, M, it.n0, it.n1, ys[it.j].data_ptr<float>(), W->m.N);
    });
    const auto dtype = x.scalar_type();
    for (size_t j = 0; j < Ws.size(); j++) {
        torch::Tensor& y = ys[j];
        if (biases[j].has_value()) y.add_(biases[j]->to(torch::kFloat32));
        if (dtype == torch::kFloat32) continue;
        if (!float_out) {
            y = y.to(dtype);
        } else if (dtype == torch::kBFloat16) {  // rounded in place
            float* yp = y.data_ptr<float>();
            for (int64_t i = 0; i < y.numel(); i++) yp[i] = bf16_to_f32(f32_to_bf16(yp[i]));
        } else {
            y = y.to(dtype).to(torch::kFloat32);
        }
    }
    return ys;
}

static torch::Tensor linear(torch::Tensor x, const MatrixPtr& W, c10::optional<torch::Tensor> bias, bool float_out) {
    return linear_many(x, {W}, {bias}, float_out)[0];
}

// ---- RMSNorm ----------------------------------------------------------------------------------------------
// y = weight * (x / sqrt(mean(x^2) + eps)) over the last dimension, as modeling.layers.rms_norm: in float32,
// the normalised value rounded to x's dtype before the product (which is rounded again). One call instead
// of seven small torch ops per norm.
static torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
    const int64_t D = x.size(-1);
    TORCH_CHECK_VALUE(weight.numel() == D, "rms_norm: weight has ", weight.numel(), " values for rows of ", D);
    TORCH_CHECK_VALUE(x.scalar_type() == weight.scalar_type() &&
                          (x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32),
                      "rms_norm: x and weight must share a dtype, bfloat16 or float32 (", x.scalar_type(), ", ",
                      weight.scalar_type(), ")");
    auto xc = x.contiguous();
    auto wc = weight.contiguous();
    auto out = torch::empty_like(xc);
    const int64_t rows = D ? xc.numel() / D : 0;
    const bool bf = x.scalar_type() == torch::kBFloat16;
    const float e = (float)eps;
    auto row = [&](int64_t r) {
        if (bf) {
            const uint16_t* xr = (const uint16_t*)xc.data_ptr() + r * D;
            const uint16_t* w = (const uint16_t*)wc.data_ptr();
            uint16_t* y = (uint16_t*)out.data_ptr() + r * D;
            double ss = 0.;  // double: the float32 mean torch computes pairwise, to its rounding
            for (int64_t d = 0; d < D; d++) {
                const float v = bf16_to_f32(xr[d]);
                ss += v * v;
            }
            const float inv = 1.f / sqrtf((float)(ss / (double)D) + e);
            for (int64_t d = 0; d < D; d++) {
                const float hb = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[d]) * inv));
                y[d] = f32_to_bf16(bf16_to_f32(w[d]) * hb);
            }
        } else {
            const float* xr = xc.data_ptr<float>() + r * D;
            const float* w = wc.data_ptr<float>();
            float* y = out.data_ptr<float>() + r * D;
            double ss = 0.;
            for (int64_t d = 0; d < D; d++) ss += xr[d] * xr[d];
            const float inv = 1.f / sqrtf((float)(ss / (double)D) + e);
            for (int64_t d = 0; d < D; d++) y[d] = w[d] * (xr[d] * inv);
        }
    };
    if (rows * D < (1 << 16)) {
        for (int64_t r = 0; r < rows; r++) row(r);
    } else {
        parallel_items(rows, row);
    }
    return out;
}

// ---- decode attention ---------------------------------------------------------------------------------
// One query per head (q [H, D]) against keys and values [KVH, L, D] (strided views of a cache slot, read in
// place), grouped-query heads, optional sinks [H]: float32 [H, D]. One work item per kv head.
static torch::Tensor attend_decode(torch::Tensor q, torch::Tensor keys, torch::Tensor vals,
                                   c10::optional<torch::Tensor> sinks, double scale) {
    TORCH_CHECK_VALUE(q.dim() == 2, "attention: queries must be [heads, head_dim], are ", q.sizes());
    TORCH_CHECK_VALUE(keys.dim() == 3 && vals.sizes() == keys.sizes(), "attention: keys ", keys.sizes(), " and values ",
                      vals.sizes(), " must both be [kv_heads, positions, head_dim]");
    const int64_t H = q.size(0), D = q.size(1), KVH = keys.size(0), L = keys.size(1);
    TORCH_CHECK_VALUE(keys.size(2) == D, "attention: head_dim of the keys (", keys.size(2), ") is not the queries' (", D, ")");
    TORCH_CHECK_VALUE(KVH > 0 && H % KVH == 0, "attention: ", H, " query heads do not group over ", KVH, " kv heads");
    TORCH_CHECK_VALUE(D <= ATTN_DMAX, "attention: head_dim ", D, " is above the native kernel's ", (int)ATTN_DMAX);
    TORCH_CHECK_VALUE(L > 0, "attention: no positions to attend to");
    TORCH_CHECK_VALUE(keys.scalar_type() == vals.scalar_type() &&
                          (keys.scalar_type() == torch::kBFloat16 || keys.scalar_type() == torch::kFloat32),
                      "attention: keys and values must both be bfloat16 or float32, are ", keys.scalar_type(), " and ",
                      vals.scalar_type());
    TORCH_CHECK_VALUE(keys.stride(2) == 1 && vals.stride(2) == 1, "attention: head_dim must be contiguous");
    TORCH_CHECK_VALUE(keys.device().is_cpu() && vals.device().is_cpu() && q.device().is_cpu(),
                      "attention: the native kernels run on the CPU");
    auto qf = q.to(torch::kFloat32).contiguous();
    torch::Tensor sk;
    if (sinks.has_value()) {
        TORCH_CHECK_VALUE(sinks->numel() == H, "attention: ", sinks->numel(), " sinks for ", H, " heads");
        sk = sinks->to(torch::kFloat32).contiguous();
    }
    auto scores = torch::empty({H, L}, torch::kFloat32);
    auto out = torch::empty({H, D}, torch::kFloat32);
    AttnArgs p{};
    p.q = qf.data_ptr<float>();
    p.k = (const uint8_t*)keys.data_ptr();
    p.v = (const uint8_t*)vals.data_ptr();
    p.bf16 = keys.scalar_type() == torch::kBFloat16;
    p.H = H;
    p.KVH = KVH;
    p.L = L;
    p.D = D;
    p.k_hs = keys.stride(0);
    p.k_ls = keys.stride(1);
    p.v_hs = vals.stride(0);
    p.v_ls = vals.stride(1);
    p.sinks = sk.defined() ? sk.data_ptr<float>() : nullptr;
    p.scale = (float)scale;
    p.scores = scores.data_ptr<float>();
    p.out = out.data_ptr<float>();
    const IsaKernels* k = isa();
    if (KVH == 1 || L * D * H < (1 << 17)) {  // below ~100k multiply-adds a second thread costs more than it saves
        k->attend(p, 0, KVH);
    } else {
        parallel_items(KVH, [&](int64_t h) { k->attend(p, h, h + 1); });
    }
    return out;
}

// ---- mixture of experts -----------------------------------------------------------------------------------
enum Activation : int32_t { ACT_SWIGLU = 0, ACT_CLAMPED_SWIGLU = 1 };

struct Expert {
    MatrixPtr gate, up, down;  // ACT_CLAMPED_SWIGLU: `gate` holds the interleaved gate/up rows, `up` is null
    torch::Tensor gate_up_bias, down_bias;  // float32 or undefined
    int64_t inter = 0;
};

// The experts of one MoE layer by slot, filled in as slots are first used (an expert is never read before).
struct ExpertSet {
    int32_t act = ACT_SWIGLU;
    float alpha = 1.f, limit = 0.f;
    std::vector<std::shared_ptr<Expert>> slots;

    ExpertSet(int64_t n, int32_t act, double alpha, double limit) : act(act), alpha((float)alpha), limit((float)limit), slots(n) {}

    void set(int64_t slot, MatrixPtr gate, c10::optional<MatrixPtr> up, MatrixPtr down,
             c10::optional<torch::Tensor> gate_up_bias, c10::optional<torch::Tensor> down_bias) {
        TORCH_CHECK_VALUE(slot >= 0 && slot < (int64_t)slots.size(), "expert slot ", slot, " out of range");
        auto e = std::make_shared<Expert>();
        e->gate = gate;
        e->down = down;
        const int64_t H = gate->m.K;
        if (act == ACT_SWIGLU) {
            TORCH_CHECK_VALUE(up.has_value(), gate->name, ": a SwiGLU expert needs an up matrix");
            e->up = *up;
            TORCH_CHECK_VALUE(e->up->m.N == gate->m.N && e->up->m.K == H, e->up->name, ": shape ", e->up->m.N, " x ",
                              e->up->m.K, " does not match the gate's ", gate->m.N, " x ", H);
            e->inter = gate->m.N;
        } else {
            TORCH_CHECK_VALUE(gate->m.N % 2 == 0, gate->name, ": interleaved gate/up needs an even row count");
            e->inter = gate->m.N / 2;
        }
        TORCH_CHECK_VALUE(down->m.K == e->inter && down->m.N == H, down->name, ": shape ", down->m.N, " x ",
                          down->m.K, " does not match an expert of hidden ", H, " and intermediate ", e->inter);
        if (gate_up_bias.has_value()) {
            TORCH_CHECK_VALUE(gate_up_bias->numel() == gate->m.N, gate->name, ": bias has ", gate_up_bias->numel(),
                              " values, expected ", gate->m.N);
            e->gate_up_bias = gate_up_bias->to(torch::kFloat32).contiguous();
        }
        if (down_bias.has_value()) {
            TORCH_CHECK_VALUE(down_bias->numel() == H, down->name, ": bias has ", down_bias->numel(), " values, expected ", H);
            e->down_bias = down_bias->to(torch::kFloat32).contiguous();
        }
        slots[slot] = e;
    }
    bool has(int64_t slot) const { return slot >= 0 && slot < (int64_t)slots.size() && slots[slot] != nullptr; }
};

static inline float silu(float g) { return g / (1.f + expf(-g)); }

// With bf16 activations the per-expert torch path rounds to bf16 after every product and elementwise
// step; the fused call rounds at the same points, so both paths agree but for accumulation order.
static inline float round_as(bool bf, float v) { return bf ? bf16_to_f32(f32_to_bf16(v)) : v; }

// out[t] = sum over the chosen experts e of t (in slot order) of weight(t, e) * expert_e(x[t]), float32.
// `slots` [T, k] int64 (-1: no expert), `weights` [T, k] float32.
static torch::Tensor moe(torch::Tensor x, ExpertSet& es, torch::Tensor slots, torch::Tensor weights) {
    TORCH_CHECK_VALUE(x.dim() == 2, "moe: hidden states must be [T, H], are ", x.sizes());
    const int64_t T = x.size(0), H = x.size(1);
    TORCH_CHECK_VALUE(slots.dim() == 2 && slots.size(0) == T && weights.sizes() == slots.sizes(),
                      "moe: slots ", slots.sizes(), " and weights ", weights.sizes(), " must both be [", T, ", k]");
    auto sl = slots.to(torch::kInt64).contiguous();
    auto wt = weights.to(torch::kFloat32).contiguous();
    const int64_t kk = sl.size(1), S = (int64_t)es.slots.size();
    const int64_t* sp = sl.data_ptr<int64_t>();
    const float* wp = wt.data_ptr<float>();

    // pairs (token, weight) grouped by slot, slots in increasing order
    std::vector<int64_t> count(S + 1, 0);
    for (int64_t i = 0; i < T * kk; i++) {
        const int64_t s = sp[i];
        if (s < 0) continue;
        TORCH_CHECK_VALUE(s < S, "moe: slot ", s, " out of range (", S, " slots)");
        TORCH_CHECK_VALUE(es.slots[s] != nullptr, "moe: expert slot ", s, " has no weights set");
        count[s + 1]++;
    }
    std::vector<int64_t> off(S + 1, 0);
    for (int64_t s = 0; s < S; s++) off[s + 1] = off[s] + count[s + 1];
    const int64_t P = off[S];
    std::vector<int32_t> pair_tok(P);
    std::vector<float> pair_w(P);
    {
        std::vector<int64_t> fill(off.begin(), off.end() - 1);
        for (int64_t t = 0; t < T; t++)
            for (int64_t j = 0; j < kk; j++) {
                const int64_t s = sp[t * kk + j];
                if (s < 0) continue;
                pair_tok[fill[s]] = (int32_t)t;
                pair_w[fill[s]] = wp[t * kk + j];
                fill[s]++;
            }
    }
    std::vector<int64_t> active;
    bool quantized = false;
    for (int64_t s = 0; s < S; s++)
        if (off[s + 1] > off[s]) {
            const Expert& e = *es.slots[s];
            quantized |= is_quantized(e.gate->m) || is_quantized(e.down->m) || (e.up && is_quantized(e.up->m));
        }
    const IsaKernels* k = kernels_for(x, quantized);
    int need1 = 0, need2 = 0;
    int64_t inter_max = 0;
    for (int64_t s = 0; s < S; s++)
        if (off[s + 1] > off[s]) {
            active.push_back(s);
            const Expert& e = *es.slots[s];
            TORCH_CHECK_VALUE(e.gate->m.K == H, e.gate->name, ": expects hidden ", e.gate->m.K, ", got ", H);
            need1 |= need_of(k, e.gate->m) | (e.up ? need_of(k, e.up->m) : 0);
            need2 |= need_of(k, e.down->m);
            TORCH_CHECK_VALUE(inter_max == 0 || e.inter == inter_max, e.down->name, ": experts of one layer must share "
                              "their intermediate size (", e.inter, " vs ", inter_max, ")");
            inter_max = e.inter;
        }
    auto out = torch::zeros({T, H}, torch::kFloat32);
    if (P == 0) return out;
    ActStore A;
    prepare(A, x, need1, k);
    auto hbuf = torch::empty({P, inter_max}, torch::kFloat32);
    float* hp = hbuf.data_ptr<float>();

    // 1. gate and up (and the activation) of every pair, by tiles of intermediate rows
    struct Item { int64_t s, r0, r1; };
    std::vector<Item> items;
    const int64_t threads = pool().size();
    for (int64_t s : active) {
        const int64_t I = es.slots[s]->inter, m = off[s + 1] - off[s];
        int64_t rt = (m * H >= (1 << 20)) ? 16 : 128;  // smaller tiles when many tokens share an expert
        if (active.size() * ((I + rt - 1) / rt) < (size_t)(4 * threads)) rt = 16;
        for (int64_t r = 0; r < I; r += rt) items.push_back({s, r, std::min(I, r + rt)});
    }
    const bool rb = x.scalar_type() == torch::kBFloat16;
    parallel_items((int64_t)items.size(), [&](int64_t it) {
        const Item& item = items[it];
        const Expert& e = *es.slots[item.s];
        const int64_t m = off[item.s + 1] - off[item.s];
        const int32_t* rows = pair_tok.data() + off[item.s];
        const int64_t r0 = item.r0, r1 = item.r1;
        thread_local std::vector<float> g, u;
        if (es.act == ACT_SWIGLU) {
            const int64_t I = e.inter;
            g.resize(m * I);
            u.resize(m * I);
            k->gemm(mat_for(*e.gate, k), A.a, rows, m, r0, r1, g.data(), I);
            k->gemm(mat_for(*e.up, k), A.a, rows, m, r0, r1, u.data(), I);
            for (int64_t i = 0; i < m; i++) {
                float* h = hp + (off[item.s] + i) * inter_max;
                for (int64_t r = r0; r < r1; r++) {
                    const float gr = round_as(rb, g[i * I + r]), ur = round_as(rb, u[i * I + r]);
                    h[r] = round_as(rb, round_as(rb, silu(gr)) * ur);
                }
            }
        } else {  // gpt-oss: rows 2r (gate) and 2r + 1 (up) of the interleaved matrix
            const int64_t N2 = e.gate->m.N;
            g.resize(m * N2);
            k->gemm(mat_for(*e.gate, k), A.a, rows, m, 2 * r0, 2 * r1, g.data(), N2);
            const float* b = e.gate_up_bias.defined() ? e.gate_up_bias.data_ptr<float>() : nullptr;
            const float alpha = es.alpha, limit = es.limit;
            for (int64_t i = 0; i < m; i++) {
                float* h = hp + (off[item.s] + i) * inter_max;
                for (int64_t r = r0; r < r1; r++) {
                    float gt = round_as(rb, g[i * N2 + 2 * r] + (b ? b[2 * r] : 0.f));
                    float up = round_as(rb, g[i * N2 + 2 * r + 1] + (b ? b[2 * r + 1] : 0.f));
                    gt = fminf(gt, limit);
                    up = fminf(fmaxf(up, -limit), limit);
                    const float sg = round_as(rb, 1.f / (1.f + expf(-round_as(rb, alpha * gt))));
                    h[r] = round_as(rb, round_as(rb, up + 1.f) * round_as(rb, gt * sg));
                }
            }
        }
    });

    // 2. down, by tiles of output columns: each tile sums its experts in slot order (deterministic)
    ActStore B;
    prepare(B, hbuf, need2, k);
    std::vector<int32_t> iota(P);
    for (int64_t i = 0; i < P; i++) iota[i] = (int32_t)i;
    float* op = out.data_ptr<float>();
    // 4 tiles per thread: each tile reads every chosen expert's rows (a stream each), so fewer, longer tiles
    // start fewer streams (measured on 2 Zen 4 cores: 5-10% faster than chunk_rows' 8 per thread); more
    // would leave a descheduled worker's tile a larger share of the call
    const int64_t ct = std::max(chunk_rows(H, P * inter_max / (int64_t)active.size() + 1),
                                std::min(H, (H / (4 * threads) + 3) / 4 * 4));
    const int64_t tiles = (H + ct - 1) / ct;
    parallel_items(tiles, [&](int64_t tile) {
        const int64_t c0 = tile * ct, c1 = std::min(H, c0 + ct);
        thread_local std::vector<float> y;
        for (int64_t s : active) {
            const Expert& e = *es.slots[s];
            const int64_t m = off[s + 1] - off[s];
            y.resize(m * H);
            k->gemm(mat_for(*e.down, k), B.a, iota.data() + off[s], m, c0, c1, y.data(), H);
            const float* db = e.down_bias.defined() ? e.down_bias.data_ptr<float>() : nullptr;
            for (int64_t i = 0; i < m; i++) {
                const int64_t t = pair_tok[off[s] + i];
                const float w = pair_w[off[s] + i];
                float* o = op + t * H;
                const float* yi = y.data() + i * H;
                for (int64_t c = c0; c < c1; c++) o[c] += w * round_as(rb, yi[c] + (db ? db[c] : 0.f));
            }
        }
    });
    return out;
}

// ---- rotary position embedding ----------------------------------------------------------------------------
// x [..., T, D] (rotate-half layout) rotated by cos / sin [T, R] (float32, R <= D even; dims past R pass
// unrotated), with the rounding points of modeling.layers.apply_rope in x's dtype: cos and sin rounded to it,
// x * cos and rotate_half(x) * sin each rounded, then their sum. One call instead of eight small torch ops.
static torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
    TORCH_CHECK_VALUE(x.dim() >= 2, "rope: x must be [..., positions, head_dim], is ", x.sizes());
    const int64_t D = x.size(-1), T = x.size(-2);
    TORCH_CHECK_VALUE(cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(0) == T && cos.size(1) % 2 == 0 &&
                          cos.size(1) <= D,
                      "rope: cos / sin ", cos.sizes(), " / ", sin.sizes(), " do not fit x ", x.sizes());
    TORCH_CHECK_VALUE(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kFloat32,
                      "rope: x must be bfloat16 or float32, is ", x.scalar_type());
    const int64_t R = cos.size(1), half = R / 2;
    auto xc = x.contiguous();
    auto cf = cos.to(torch::kFloat32).contiguous(), sf = sin.to(torch::kFloat32).contiguous();
    auto out = torch::empty_like(xc);
    const bool bf = x.scalar_type() == torch::kBFloat16;
    const int64_t rows = xc.numel() / D;  // rows of head_dim; row r is position r % T
    const float* cp = cf.data_ptr<float>();
    const float* sp = sf.data_ptr<float>();
    auto ld = [&](const void* base, int64_t i) {
        return bf ? bf16_to_f32(((const uint16_t*)base)[i]) : ((const float*)base)[i];
    };
    auto st = [&](void* base, int64_t i, float v) {
        if (bf) ((uint16_t*)base)[i] = f32_to_bf16(v);
        else ((float*)base)[i] = v;
    };
    const void* xp = xc.data_ptr();
    void* op = out.data_ptr();
    for (int64_t r = 0; r < rows; r++) {
        const int64_t t = r % T, o = r * D;
        for (int64_t d = 0; d < R; d++) {
            const float c = round_as(bf, cp[t * R + d]), sn = round_as(bf, sp[t * R + d]);
            const float xv = ld(xp, o + d);
            const float rv = d < half ? -ld(xp, o + d + half) : ld(xp, o + d - half);
            st(op, o + d, round_as(bf, xv * c) + round_as(bf, rv * sn));
        }
        for (int64_t d = R; d < D; d++) st(op, o + d, ld(xp, o + d));
    }
    return out;
}

}  // namespace emo

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using namespace emo;
    m.doc() = "emo-serve's native CPU kernels (modeling/kernels/csrc)";
    // Bumped whenever the Python side needs a function or behaviour an older build lacks: a stale build
    // (sources updated, extension not rebuilt) is then refused instead of failing mid-forward.
    m.attr("ABI") = 7;
    m.attr("ATTN_DMAX") = (int)ATTN_DMAX;  // the largest head_dim decode attention takes
    m.def("supported_isas", &supported_isas, "ISAs this CPU runs, best first");
    m.def("set_isa", &set_isa, "use one ISA's kernels (must be in supported_isas())");
    m.def("current_isa", [] { return std::string(isa()->name); });
    m.def("set_spin_us", [](int us) { pool(); /* created */ pool().set_spin_us(us); });
    m.def("pool_threads", [] { return pool().size(); });
    m.def("set_threads", [](int n) { g_threads = n < 0 ? 0 : n; pool(); },
          "fix the pool's thread count (0: follow torch.get_num_threads())");
    m.def("set_decode_streams", [](int mode) { decode_row_streams = mode; },
          "one-row products: 1 streams each weight row alone (default), 2 quantized rows in pairs, 0 tiles of 4");
    m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
          py::call_guard<py::gil_scoped_release>());
    m.def("attend_decode", &attend_decode, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("sinks") = py::none(),
          py::arg("scale"), py::call_guard<py::gil_scoped_release>());
    py::class_<Matrix, MatrixPtr>(m, "Matrix")
        .def_property_readonly("rows", &Matrix::rows)
        .def_property_readonly("cols", &Matrix::cols)
        .def_property_readonly("format", [](const Matrix& x) {
            static const char* names[] = {"f32", "bf16", "int8", "int4", "mxfp4"};
            return std::string(names[x.m.fmt]);
        })
        .def_readonly("name", &Matrix::name)
        .def_property_readonly("interleaved", &Matrix::interleaved)
        .def("tensors", [](const Matrix& M) {
            // what the kernels read: the interleaved copy in place of the stored bytes (keep[0]), and the rest
            std::vector<torch::Tensor> out(M.keep.begin(), M.keep.end());
            if (M.interleaved()) out[0] = M.packed_bytes;
            return out;
        })
        .def("interleave", [](Matrix& M) { return interleave(M); },
             "make the row-interleaved copy the current ISA's quantized kernels read (False: not for this matrix)");
    m.def("dense", &dense, py::arg("weight"), py::arg("name"));
    m.def("int8", &int8, py::arg("weight"), py::arg("cols"), py::arg("scale"), py::arg("signed"), py::arg("name"));
    m.def("int4", &int4, py::arg("weight"), py::arg("cols"), py::arg("scale"), py::arg("zero_point"), py::arg("group"),
          py::arg("name"));
    m.def("mxfp4", &mxfp4, py::arg("blocks"), py::arg("scales"), py::arg("name"));
    m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(), py::arg("float_out") = false,
          py::call_guard<py::gil_scoped_release>(), "x @ W.T + bias in x's dtype (float_out: its values as float32)");
    m.def("linear_many", &linear_many, py::arg("x"), py::arg("weights"), py::arg("biases"), py::arg("float_out") = false,
          py::call_guard<py::gil_scoped_release>(), "[linear(x, W, b) for W, b in zip(weights, biases)] in one call");
    m.def("rope", &rope, py::arg("x"), py::arg("cos"), py::arg("sin"), py::call_guard<py::gil_scoped_release>());
    py::class_<ExpertSet>(m, "ExpertSet")
        .def(py::init<int64_t, int32_t, double, double>(), py::arg("slots"), py::arg("activation"), py::arg("alpha") = 1.0,
             py::arg("limit") = 0.0)
        .def("set", &ExpertSet::set, py::arg("slot"), py::arg("gate"), py::arg("up"), py::arg("down"),
             py::arg("gate_up_bias") = py::none(), py::arg("down_bias") = py::none())
        .def("has", &ExpertSet::has)
        .def("__len__", [](const ExpertSet& s) { return s.slots.size(); });
    m.def("moe", &moe, py::arg("x"), py::arg("experts"), py::arg("slots"), py::arg("weights"),
          py::call_guard<py::gil_scoped_release>());
    m.attr("ACT_SWIGLU") = (int)ACT_SWIGLU;
    m.attr("ACT_CLAMPED_SWIGLU") = (int)ACT_CLAMPED_SWIGLU;
}
