// Fused softmax cross-entropy for CuPy: loss, lse and the gradient of the reduced loss in one
// pass over the logits. One thread block per row, the same online (max, sum) as the softmax.
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

template <typename T, int VEC>
__device__ void cross_entropy_row(const T* __restrict__ logits, long long target, float* loss, float* lse_out,
                                  T* __restrict__ grad, int n_cols, long long ignore_index, float smoothing,
                                  const float* grad_scale) {
    typedef float A;
    constexpr int ITEMS = CACHED_VALUES / VEC;
    const long long n_packs = n_cols / VEC;
    const bool cached = n_packs <= (long long)ITEMS * blockDim.x;
    const bool valid = target != ignore_index;
    const bool bad = valid && (target < 0 || target >= n_cols);
    MaxSum<A> s{neg_inf<A>(), A(0)};
    A sum_z = A(0);
    A rest = A(0);  // sum over j != target of e^(z_j - s.m), rescaled with s.m as s.d is
    A cache[ITEMS][VEC];
    // 1. One read of the row: the online (max, sum) and the sum without the target, and for
    //    smoothing sum_j z_j.
    read_packs<T, VEC, ITEMS>(logits, n_packs, cached, cache, [&](const A (&v)[VEC], long long p) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum_z += v[k];
        const long long first = p * VEC;  // the target's place in this pack, or -1
        const int skip = target >= first && target < first + VEC ? int(target - first) : -1;
        s = add_pack<A, VEC>(s, rest, v, skip);
    });
    const A own_m = s.m;
    s = block_merge(s);
    if (smoothing > 0.f) sum_z = block_sum(sum_z);
    const A log_d = log_acc(s.d), inv_d = A(1) / s.d, lse = s.m + log_d;
    const A uniform = smoothing / n_cols;

    // 2. The loss, from one scalar read of the target logit.
    if (threadIdx.x == 0) {
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
    //    row maximum before the block sums it (a thread that saw only -inf adds nothing).
    const A m = s.m;
    rest = own_m == neg_inf<A>() ? A(0) : rest * exp_acc(own_m - m);
    if (valid) rest = block_sum(rest);  // valid is the same for the whole block
    const A scale = *grad_scale, keep = 1.f - smoothing, other_q = rest * inv_d;
    const A nan = __int_as_float(0x7fc00000);
    write_packs<T, VEC, ITEMS>(logits, grad, n_packs, cached, cache, [&](A z, long long j) {
        const A q = exp_acc(z - m) * inv_d;
        const A g = (j == target ? smoothing * q - keep * other_q : q) - uniform;
        return bad ? nan : valid ? g * scale : (g == g ? A(0) : g);  // NaN logits: NaN, as torch
    });
}

// cross_entropy_<type>_v<VEC>(logits, target, loss, lse, grad or NULL, strides in elements, ...)
#define CROSS_ENTROPY_KERNEL(NAME, T, VEC)                                                                     \
    extern "C" __global__ void __launch_bounds__(MAX_THREADS) cross_entropy_##NAME##_v##VEC(                   \
        const T* logits, const long long* target, float* loss, float* lse, T* grad, long long logits_row_stride, \
        long long grad_row_stride, int n_cols, long long ignore_index, float smoothing, const float* grad_scale) { \
        const long long row = blockIdx.x;                                                                       \
        cross_entropy_row<T, VEC>(logits + row * logits_row_stride, target[row], loss + row, lse + row,          \
                                  grad == nullptr ? nullptr : grad + row * grad_row_stride, n_cols,              \
                                  ignore_index, smoothing, grad_scale);                                          \
    }

CROSS_ENTROPY_KERNEL(f32, float, 1)
CROSS_ENTROPY_KERNEL(f32, float, 4)
CROSS_ENTROPY_KERNEL(f16, f16, 1)
CROSS_ENTROPY_KERNEL(f16, f16, 8)
CROSS_ENTROPY_KERNEL(bf16, bf16, 1)
CROSS_ENTROPY_KERNEL(bf16, bf16, 8)
