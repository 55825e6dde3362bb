// Fused softmax cross-entropy for CuPy: loss, lse and the gradient of the reduced loss in one
// pass over the logits. A team (a block, or a warp for short rows) per row, the same online
// (max, sum) and the same head / 128-bit body / tail walk of the row as the softmax.
//
// Per row with class t, smoothing eps and C classes:
//   loss    = (1 - eps) (lse - z_t) + (eps / C) sum_j (lse - z_j)
//   grad_j  = scale * (softmax(z)_j - (1 - eps) [j == t] - eps / C)
// where scale (1 / number of counted rows for a mean, else 1) is read on the device. Rows whose
// target is ignore_index get loss 0 and gradient 0 (NaN where the row holds a NaN logit, as in
// torch); a target outside [0, C) is never used as an address and gives NaN loss and gradient
// for its row. Any NaN logit makes its row's lse, loss and gradient NaN.
//
// The target's term q_t - (1 - eps) is computed as eps q_t - (1 - eps) sum_{j != t} q_j: in a
// confident row q_t - 1 rounds to 0 in float32 once q_t > 1 - 6e-8, while the sum of the other
// classes' probabilities, accumulated beside the online sum, keeps its relative accuracy (a true
// class 30 above the rest gets about -C e^-30, not 0).
#include "softmax_common.cuh"

template <typename T, int VEC, typename Team>
__device__ __forceinline__ void cross_entropy_row(const Team& team, const T* __restrict__ logits, long long target,
                                                  float* loss, float* lse_out, T* __restrict__ grad, int n_cols,
                                                  long long ignore_index, float smoothing, const float* grad_scale) {
    typedef float A;
    constexpr int ITEMS = CACHED_VALUES / VEC;
    const RowSplit<VEC> split = split_row<T, VEC>(logits, n_cols);
    const bool cached = split.n_packs <= (long long)ITEMS * team.size();
    const bool valid = target != ignore_index;
    const bool bad = valid && (target < 0 || target >= n_cols);
    MaxSum<A> s{neg_inf<A>(), A(0)};
    A sum_z = A(0);
    A rest = A(0);  // sum over j != target of e^(z_j - s.m), rescaled with s.m as s.d is
    const T* const rows[1] = {logits};
    A cache[ITEMS][1][VEC], edge[1][1];
    // 1. One read of the row: the online (max, sum) and the sum without the target, and for
    //    smoothing sum_j z_j.
    read_row<T, VEC, ITEMS>(team, rows, 1, split, cached, cache, edge, [&](const auto& v, long long first) {
        constexpr int N = int(sizeof(v[0]) / sizeof(A));  // VEC for a pack, 1 for an edge element
#pragma unroll
        for (int k = 0; k < N; ++k) sum_z += v[0][k];
        const int skip = target >= first && target < first + N ? int(target - first) : -1;  // or none
        s = add_pack(s, rest, v[0], skip);
    });
    const A own_m = s.m;
    s = team.merge(s);
    if (smoothing > 0.f) sum_z = team.sum(sum_z);
    const A log_d = log_acc(s.d), inv_d = A(1) / s.d, lse = s.m + log_d;
    const A uniform = smoothing / n_cols;

    // 2. The loss, from one scalar read of the target logit.
    if (team.rank() == 0) {
        A row_loss = A(0);
        if (bad) {
            row_loss = __int_as_float(0x7fc00000);  // NaN
        } else if (valid) {
            const A z_t = to_acc(logits[target]);
            row_loss = (1.f - smoothing) * ((s.m - z_t) + log_d);
            if (smoothing > 0.f) row_loss += uniform * (n_cols * lse - sum_z);
        }
        *loss = row_loss;
        *lse_out = lse;
    }
    if (grad == nullptr) return;

    // 3. The gradient, from registers or a second read. Each thread's rest is brought to the
    //    row maximum before the team sums it (a thread that saw only -inf adds nothing).
    const A m = s.m;
    rest = own_m == neg_inf<A>() ? A(0) : rest * exp_acc(own_m - m);
    if (valid) rest = team.sum(rest);  // valid is the same for the whole team
    const A scale = *grad_scale, keep = 1.f - smoothing, other_q = rest * inv_d;
    const A nan = __int_as_float(0x7fc00000);
    write_row<T, VEC, ITEMS>(team, rows, grad, split, cached, cache, edge, [&](const A (&z)[1], long long j) {
        const A q = exp_acc(z[0] - m) * inv_d;
        const A g = (j == target ? smoothing * q - keep * other_q : q) - uniform;
        return bad ? nan : valid ? g * scale : (g == g ? A(0) : g);  // NaN logits: NaN, as torch
    });
}

// cross_entropy[_warp]_<type>_v<VEC>(logits, target, loss, lse, grad or NULL, strides in
// elements, ..., n_rows): one row per block, or (_warp) one per warp, WARP_ROWS to a block.
#define CROSS_ENTROPY_KERNEL(TEAM_NAME, TEAM, THREADS, REGS, NAME, T, VEC)                                          \
    extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS(THREADS, T, VEC, REGS))                        \
        cross_entropy_##TEAM_NAME##NAME##_v##VEC(                                                                   \
        const T* logits, const long long* target, float* loss, float* lse, T* grad, long long logits_row_stride,    \
        long long grad_row_stride, int n_cols, long long ignore_index, float smoothing, const float* grad_scale,    \
        long long n_rows) {                                                                                         \
        const TEAM team;                                                                                            \
        const long long row = team.row();                                                                           \
        if (row >= n_rows) return;                                                                                  \
        cross_entropy_row<T, VEC>(team, logits + row * logits_row_stride, target[row], loss + row, lse + row,       \
                                  grad == nullptr ? nullptr : grad + row * grad_row_stride, n_cols, ignore_index,   \
                                  smoothing, grad_scale);                                                           \
    }

#define CROSS_ENTROPY_KERNELS_BOTH_TEAMS(NAME, T, VEC)                                                              \
    CROSS_ENTROPY_KERNEL(, BlockTeam, MAX_THREADS, 64, NAME, T, VEC)                                                \
    CROSS_ENTROPY_KERNEL(warp_, WarpTeam, 32 * WARP_ROWS, 72, NAME, T, VEC)

CROSS_ENTROPY_KERNELS_BOTH_TEAMS(f32, float, 1)
CROSS_ENTROPY_KERNELS_BOTH_TEAMS(f32, float, 4)
CROSS_ENTROPY_KERNELS_BOTH_TEAMS(f16, f16, 1)
CROSS_ENTROPY_KERNELS_BOTH_TEAMS(f16, f16, 8)
CROSS_ENTROPY_KERNELS_BOTH_TEAMS(bf16, bf16, 1)
CROSS_ENTROPY_KERNELS_BOTH_TEAMS(bf16, bf16, 8)
