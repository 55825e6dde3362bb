// Shared device code for the CUDA C kernels (compiled at run time by NVRTC through CuPy, and
// by nvcc in CI): 16-bit types without CUDA headers, float accumulation, 128-bit packs, and the
// (max, sum) merge of the online softmax with its warp-shuffle and block reductions.
//
// The online normaliser (Milakov & Gimelshein, 2018) keeps a running maximum m and sum d;
// two partial states merge as  m = max(m1, m2),  d = d1 e^(m1 - m) + d2 e^(m2 - m).
#pragma once

// 16-bit storage types as plain bits, so NVRTC needs no cuda_fp16.h / cuda_bf16.h.
struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };

// Accumulation type: float for float and 16-bit inputs, double for double.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(bf16 v) { return __uint_as_float(((unsigned)v.bits) << 16); }
__device__ __forceinline__ float to_acc(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ bf16 from_acc<bf16>(float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{(unsigned short)((u >> 16) | 0x40u)};  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return bf16{(unsigned short)(u >> 16)};
}
template <> __device__ __forceinline__ f16 from_acc<f16>(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return f16{h};
}

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }

// e^x: exp2 with a log2(e) scale in float, exp in double.
__device__ __forceinline__ float exp_acc(float x) { return exp2f(x * 1.4426950408889634f); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
// A maximum that keeps NaN (fmaxf/fmax drop it): max(-inf, NaN) must be NaN, or a running
// state that has seen only -inf would skip the NaN and the row would come out finite.
__device__ __forceinline__ float max_acc(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ double max_acc(double a, double b) { return (a > b || a != a) ? a : b; }

// VEC elements loaded or stored as one aligned access (128 bits when VEC * sizeof(T) == 16).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* row, long long pack) {
    return reinterpret_cast<const Pack<T, VEC>*>(row)[pack];
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* row, long long pack, const Pack<T, VEC>& p) {
    reinterpret_cast<Pack<T, VEC>*>(row)[pack] = p;
}

// The online softmax state of a stretch of the row.
template <typename A> struct MaxSum { A m; A d; };

template <typename A>
__device__ __forceinline__ MaxSum<A> merge(MaxSum<A> a, MaxSum<A> b) {
    A m = max_acc(a.m, b.m);
    if (m == neg_inf<A>()) return MaxSum<A>{m, A(0)};  // both saw only -inf: avoid -inf - -inf
    return MaxSum<A>{m, a.d * exp_acc(a.m - m) + b.d * exp_acc(b.m - m)};
}

// Adds VEC values at once: one rescale of the running sum per pack, one exp per value. Also
// keeps `rest`, the sum of e^(v_k - m) over the values other than v[skip], rescaled with the
// running maximum exactly as the sum is (skip outside [0, VEC) leaves out nothing; rest then
// follows d). The cross-entropy uses it for the target's q_t - 1 = -rest / d, which keeps its
// relative accuracy where 1 - q_t would cancel to 0.
template <typename A, int VEC>
__device__ __forceinline__ MaxSum<A> add_pack(MaxSum<A> s, A& rest, const A (&v)[VEC], int skip) {
    A m = s.m;
#pragma unroll
    for (int k = 0; k < VEC; ++k) m = max_acc(m, v[k]);
    if (m == neg_inf<A>()) return s;
    const A rescale = exp_acc(s.m - m);
    A d = s.d * rescale, r = rest * rescale;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        const A e = exp_acc(v[k] - m);
        d += e;
        r += k == skip ? A(0) : e;
    }
    rest = r;
    return MaxSum<A>{m, d};
}

template <typename A, int VEC>
__device__ __forceinline__ MaxSum<A> add_pack(MaxSum<A> s, const A (&v)[VEC]) {
    A unused = A(0);  // the compiler drops it
    return add_pack<A, VEC>(s, unused, v, -1);
}

// Warp shuffle, then shared memory across warps; every thread gets the row's state.
template <typename A>
__device__ __forceinline__ MaxSum<A> block_merge(MaxSum<A> s) {
    __shared__ A shared_m[32], shared_d[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        s = merge(s, MaxSum<A>{__shfl_xor_sync(0xffffffffu, s.m, offset), __shfl_xor_sync(0xffffffffu, s.d, offset)});
    if (lane == 0) { shared_m[warp] = s.m; shared_d[warp] = s.d; }
    __syncthreads();
    s = lane < n_warps ? MaxSum<A>{shared_m[lane], shared_d[lane]} : MaxSum<A>{neg_inf<A>(), A(0)};
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        s = merge(s, MaxSum<A>{__shfl_xor_sync(0xffffffffu, s.m, offset), __shfl_xor_sync(0xffffffffu, s.d, offset)});
    __syncthreads();  // the shared arrays may be reused by a later reduction
    return s;
}

template <typename A>
__device__ __forceinline__ A block_sum(A v) {
    __shared__ A shared[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < n_warps ? shared[lane] : A(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    __syncthreads();
    return v;
}

// The first pass of every row kernel: visit(values, pack) for each of this thread's packs,
// either keeping the values in `cache` (the row fits: it is read once) or streaming them.
template <typename T, int VEC, int ITEMS, typename Visit>
__device__ __forceinline__ void read_packs(const T* __restrict__ row, long long n_packs, bool cached,
                                           typename Acc<T>::type (&cache)[ITEMS][VEC], Visit visit) {
    typedef typename Acc<T>::type A;
    if (cached) {
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const long long p = (long long)it * blockDim.x + threadIdx.x;
            if (p < n_packs) {
                Pack<T, VEC> pack = load_pack<T, VEC>(row, p);
#pragma unroll
                for (int k = 0; k < VEC; ++k) cache[it][k] = to_acc(pack.v[k]);
                visit(cache[it], p);
            }
        }
    } else {
        for (long long p = threadIdx.x; p < n_packs; p += blockDim.x) {
            Pack<T, VEC> pack = load_pack<T, VEC>(row, p);
            A v[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[k] = to_acc(pack.v[k]);
            visit(v, p);
        }
    }
}

// The last pass: out[j] = value(x_j, j) for each of this thread's elements, x_j taken from
// `cache` or, for rows that did not fit, read again from `row`.
template <typename T, int VEC, int ITEMS, typename Value>
__device__ __forceinline__ void write_packs(const T* __restrict__ row, T* __restrict__ out, long long n_packs,
                                            bool cached, const typename Acc<T>::type (&cache)[ITEMS][VEC],
                                            Value value) {
    typedef typename Acc<T>::type A;
    if (cached) {
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const long long p = (long long)it * blockDim.x + threadIdx.x;
            if (p < n_packs) {
                Pack<T, VEC> result;
#pragma unroll
                for (int k = 0; k < VEC; ++k) result.v[k] = from_acc<T>(value(cache[it][k], p * VEC + k));
                store_pack<T, VEC>(out, p, result);
            }
        }
    } else {
        for (long long p = threadIdx.x; p < n_packs; p += blockDim.x) {
            Pack<T, VEC> pack = load_pack<T, VEC>(row, p), result;
#pragma unroll
            for (int k = 0; k < VEC; ++k) result.v[k] = from_acc<T>(value(A(to_acc(pack.v[k])), p * VEC + k));
            store_pack<T, VEC>(out, p, result);
        }
    }
}

// Registers each thread devotes to caching its share of a row (single-read path), and the
// largest block: __launch_bounds__(MAX_THREADS) lets ptxas use up to 128 registers a thread,
// so a row of up to MAX_THREADS * CACHED_VALUES = 16384 elements is read once.
#define CACHED_VALUES 32
#define MAX_THREADS 512
