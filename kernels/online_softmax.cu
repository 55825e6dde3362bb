// Online softmax and log_softmax, forward and backward, for CuPy (softmax_gpu.cupy).
//
// One thread block per row. Each thread walks packs p = threadIdx.x, threadIdx.x + blockDim.x, ...
// of VEC elements (128-bit packs when the row is aligned, else VEC = 1) keeping its own running
// (max, sum); a warp-shuffle then block reduction merges the threads' states. A row of up to
// blockDim.x * CACHED_VALUES elements is held in registers: read once, written once. Longer rows
// take a second read. Offsets are 64-bit.
#include "softmax_common.cuh"

template <typename T, int VEC>
__device__ void softmax_forward_row(const T* __restrict__ x, T* __restrict__ y, int n_cols, bool log_out) {
    typedef typename Acc<T>::type A;
    constexpr int ITEMS = CACHED_VALUES / VEC;
    const long long n_packs = n_cols / VEC;
    const bool cached = n_packs <= (long long)ITEMS * blockDim.x;
    A cache[ITEMS][VEC];
    MaxSum<A> s{neg_inf<A>(), A(0)};
    read_packs<T, VEC, ITEMS>(x, n_packs, cached, cache, [&](const A (&v)[VEC], long long) { s = add_pack<A, VEC>(s, v); });
    s = block_merge(s);  // an all -inf row leaves m = -inf: x - m is NaN, as in torch
    const A m = s.m, log_d = log_acc(s.d), inv_d = A(1) / s.d;
    write_packs<T, VEC, ITEMS>(x, y, n_packs, cached, cache, [&](A v, long long) {
        return log_out ? (v - m) - log_d : exp_acc(v - m) * inv_d;
    });
}

// softmax:      dx = y (dy - sum(dy y))      log_softmax:  dx = dy - e^y sum(dy)
template <typename T, int VEC>
__device__ void softmax_backward_row(const T* __restrict__ y, const T* __restrict__ dy, T* __restrict__ dx,
                                     int n_cols, bool log_out) {
    typedef typename Acc<T>::type A;
    constexpr int ITEMS = CACHED_VALUES / (2 * VEC);  // y and dy both cached
    const long long n_packs = n_cols / VEC;
    const bool cached = n_packs <= (long long)ITEMS * blockDim.x;
    A ys[ITEMS][VEC], dys[ITEMS][VEC];
    A acc = A(0);
    if (cached) {
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const long long p = (long long)it * blockDim.x + threadIdx.x;
            if (p < n_packs) {
                Pack<T, VEC> py = load_pack<T, VEC>(y, p), pdy = load_pack<T, VEC>(dy, p);
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    ys[it][k] = to_acc(py.v[k]);
                    dys[it][k] = to_acc(pdy.v[k]);
                    acc += log_out ? dys[it][k] : dys[it][k] * ys[it][k];
                }
            }
        }
    } else {
        for (long long p = threadIdx.x; p < n_packs; p += blockDim.x) {
            Pack<T, VEC> pdy = load_pack<T, VEC>(dy, p);
            if (log_out) {
#pragma unroll
                for (int k = 0; k < VEC; ++k) acc += to_acc(pdy.v[k]);
            } else {
                Pack<T, VEC> py = load_pack<T, VEC>(y, p);
#pragma unroll
                for (int k = 0; k < VEC; ++k) acc += to_acc(pdy.v[k]) * to_acc(py.v[k]);
            }
        }
    }
    const A total = block_sum(acc);
    if (cached) {
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const long long p = (long long)it * blockDim.x + threadIdx.x;
            if (p < n_packs) {
                Pack<T, VEC> out;
#pragma unroll
                for (int k = 0; k < VEC; ++k)
                    out.v[k] = from_acc<T>(log_out ? dys[it][k] - exp_acc(ys[it][k]) * total
                                                   : ys[it][k] * (dys[it][k] - total));
                store_pack<T, VEC>(dx, p, out);
            }
        }
    } else {
        for (long long p = threadIdx.x; p < n_packs; p += blockDim.x) {
            Pack<T, VEC> py = load_pack<T, VEC>(y, p), pdy = load_pack<T, VEC>(dy, p), out;
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                const A yv = to_acc(py.v[k]), dyv = to_acc(pdy.v[k]);
                out.v[k] = from_acc<T>(log_out ? dyv - exp_acc(yv) * total : yv * (dyv - total));
            }
            store_pack<T, VEC>(dx, p, out);
        }
    }
}

// extern "C" entry points, one per element type and pack width: softmax_{fwd,bwd}_<type>_v<VEC>.
// Row strides are in elements; a vectorised (VEC > 1) kernel needs n_cols % VEC == 0 and
// 16-byte aligned rows, which the host checks before choosing it.
#define SOFTMAX_KERNELS(NAME, T, VEC)                                                                        \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) softmax_fwd_##NAME##_v##VEC(const T* x, T* y, long long x_row_stride,          \
                                                          long long y_row_stride, int n_cols, int log_out) {  \
        const long long row = blockIdx.x;                                                                    \
        softmax_forward_row<T, VEC>(x + row * x_row_stride, y + row * y_row_stride, n_cols, log_out != 0);    \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) softmax_bwd_##NAME##_v##VEC(const T* y, const T* dy, T* dx,                    \
                                                          long long y_row_stride, long long dy_row_stride,    \
                                                          long long dx_row_stride, int n_cols, int log_out) { \
        const long long row = blockIdx.x;                                                                    \
        softmax_backward_row<T, VEC>(y + row * y_row_stride, dy + row * dy_row_stride,                        \
                                     dx + row * dx_row_stride, n_cols, log_out != 0);                         \
    }

SOFTMAX_KERNELS(f32, float, 1)
SOFTMAX_KERNELS(f32, float, 4)
SOFTMAX_KERNELS(f64, double, 1)
SOFTMAX_KERNELS(f64, double, 2)
SOFTMAX_KERNELS(f16, f16, 1)
SOFTMAX_KERNELS(f16, f16, 8)
SOFTMAX_KERNELS(bf16, bf16, 1)
SOFTMAX_KERNELS(bf16, bf16, 8)
