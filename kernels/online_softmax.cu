// Online softmax and log_softmax, forward and backward, for CuPy (softmax_gpu.cupy).
//
// A team owns each row: a thread block for long rows, one warp for short ones (several rows to
// a block; softmax_common.cuh). Each thread walks packs p = rank, rank + size, ... of VEC
// elements, 128-bit packs from the row's first 16-byte boundary on with at most one scalar edge
// element a thread for the unaligned head and the tail, keeping its own running (max, sum);
// the team's reduction merges the threads' states. A row of up to size * CACHED_VALUES
// elements is held in registers: read once, written once. Longer rows take a second read.
// Offsets are 64-bit.
#include "softmax_common.cuh"

template <typename T, int VEC, typename Team>
__device__ __forceinline__ void softmax_forward_row(const Team& team, const T* __restrict__ x, T* __restrict__ y,
                                                    int n_cols, bool log_out) {
    typedef typename Acc<T>::type A;
    constexpr int ITEMS = CACHED_VALUES / VEC;
    const RowSplit<VEC> split = split_row<T, VEC>(x, n_cols);
    const bool cached = split.n_packs <= (long long)ITEMS * team.size();
    const T* const rows[1] = {x};
    A cache[ITEMS][1][VEC], edge[1][1];
    MaxSum<A> s{neg_inf<A>(), A(0)};
    read_row<T, VEC, ITEMS>(team, rows, 1, split, cached, cache, edge,
                            [&](const auto& v, long long) { s = add_pack(s, v[0]); });
    s = team.merge(s);  // an all -inf row leaves m = -inf: x - m is NaN, as in torch
    const A m = s.m, log_d = log_acc(s.d), inv_d = A(1) / s.d;
    write_row<T, VEC, ITEMS>(team, rows, y, split, cached, cache, edge, [&](const A (&v)[1], long long) {
        return log_out ? (v[0] - m) - log_d : exp_acc(v[0] - m) * inv_d;
    });
}

// softmax:      dx = y (dy - sum(dy y))      log_softmax:  dx = dy - e^y sum(dy)
// The arrays are read as {dy, y}; a streamed log_softmax first pass reads dy only.
template <typename T, int VEC, typename Team>
__device__ __forceinline__ void softmax_backward_row(const Team& team, const T* __restrict__ y,
                                                     const T* __restrict__ dy, T* __restrict__ dx, int n_cols,
                                                     bool log_out) {
    typedef typename Acc<T>::type A;
    constexpr int ITEMS = CACHED_VALUES / (2 * VEC);  // y and dy both cached
    const RowSplit<VEC> split = split_row<T, VEC>(y, n_cols);
    const bool cached = split.n_packs <= (long long)ITEMS * team.size();
    const T* const rows[2] = {dy, y};
    A cache[ITEMS][2][VEC], edge[2][1];
    A acc = A(0);
    read_row<T, VEC, ITEMS>(team, rows, log_out ? 1 : 2, split, cached, cache, edge, [&](const auto& v, long long) {
#pragma unroll
        for (int k = 0; k < int(sizeof(v[0]) / sizeof(A)); ++k) acc += log_out ? v[0][k] : v[0][k] * v[1][k];
    });
    const A total = team.sum(acc);
    write_row<T, VEC, ITEMS>(team, rows, dx, split, cached, cache, edge, [&](const A (&v)[2], long long) {
        return log_out ? v[0] - exp_acc(v[1]) * total : v[1] * (v[0] - total);
    });
}

// extern "C" entry points, one per team, element type and pack width:
// softmax_{fwd,bwd}[_warp]_<type>_v<VEC>. The block kernels take one row per block (grid =
// n_rows); the _warp kernels WARP_ROWS rows per block of 32 * WARP_ROWS threads. Row strides
// are in elements. A vectorised (VEC > 1) kernel needs every array's rows at the same offset
// from a 16-byte boundary, which the host checks before choosing it; any width works.
#define SOFTMAX_KERNELS(TEAM_NAME, TEAM, THREADS, REGS, NAME, T, VEC)                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS(THREADS, T, VEC, REGS))                        \
        softmax_fwd_##TEAM_NAME##NAME##_v##VEC(const T* x, T* y, long long x_row_stride, long long y_row_stride,    \
                                               int n_cols, int log_out, long long n_rows) {                         \
        const TEAM team;                                                                                            \
        const long long row = team.row();                                                                           \
        if (row >= n_rows) return;                                                                                  \
        softmax_forward_row<T, VEC>(team, x + row * x_row_stride, y + row * y_row_stride, n_cols, log_out != 0);    \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS(THREADS, T, VEC, REGS))                        \
        softmax_bwd_##TEAM_NAME##NAME##_v##VEC(                                                                     \
        const T* y, const T* dy, T* dx, long long y_row_stride, long long dy_row_stride, long long dx_row_stride,   \
        int n_cols, int log_out, long long n_rows) {                                                                \
        const TEAM team;                                                                                            \
        const long long row = team.row();                                                                           \
        if (row >= n_rows) return;                                                                                  \
        softmax_backward_row<T, VEC>(team, y + row * y_row_stride, dy + row * dy_row_stride,                        \
                                     dx + row * dx_row_stride, n_cols, log_out != 0);                               \
    }

#define SOFTMAX_KERNELS_BOTH_TEAMS(NAME, T, VEC)                                                                    \
    SOFTMAX_KERNELS(, BlockTeam, MAX_THREADS, 64, NAME, T, VEC)                                                     \
    SOFTMAX_KERNELS(warp_, WarpTeam, 32 * WARP_ROWS, 72, NAME, T, VEC)

SOFTMAX_KERNELS_BOTH_TEAMS(f32, float, 1)
SOFTMAX_KERNELS_BOTH_TEAMS(f32, float, 4)
SOFTMAX_KERNELS_BOTH_TEAMS(f64, double, 1)
SOFTMAX_KERNELS_BOTH_TEAMS(f64, double, 2)
SOFTMAX_KERNELS_BOTH_TEAMS(f16, f16, 1)
SOFTMAX_KERNELS_BOTH_TEAMS(f16, f16, 8)
SOFTMAX_KERNELS_BOTH_TEAMS(bf16, bf16, 1)
SOFTMAX_KERNELS_BOTH_TEAMS(bf16, bf16, 8)
