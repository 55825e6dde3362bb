// Shared device code for the CUDA C kernels (compiled at run time by NVRTC through CuPy, and
// by nvcc in CI): 16-bit types without CUDA headers, float accumulation, 128-bit packs, the
// (max, sum) merge of the online softmax with its warp-shuffle and block reductions, the teams
// (a block or a warp) that own a row, and the aligned head / packed body / tail walk of a row.
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
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* packs, long long pack) {
    return reinterpret_cast<const Pack<T, VEC>*>(packs)[pack];
}
template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* packs, long long pack, const Pack<T, VEC>& p) {
    reinterpret_cast<Pack<T, VEC>*>(packs)[pack] = p;
}

// The online softmax state of a stretch of the row.
template <typename A> struct MaxSum { A m; A d; };

template <typename A>
__device__ __forceinline__ MaxSum<A> merge(MaxSum<A> a, MaxSum<A> b) {
    A m = max_acc(a.m, b.m);
    if (m == neg_inf<A>()) return MaxSum<A>{m, A(0)};  // both saw only -inf: avoid -inf - -inf
    return MaxSum<A>{m, a.d * exp_acc(a.m - m) + b.d * exp_acc(b.m - m)};
}

// Adds N values at once: one rescale of the running sum per pack, one exp per value. Also
// keeps `rest`, the sum of e^(v_k - m) over the values other than v[skip], rescaled with the
// running maximum exactly as the sum is (skip outside [0, N) leaves out nothing; rest then
// follows d). The cross-entropy uses it for the target's q_t - 1 = -rest / d, which keeps its
// relative accuracy where 1 - q_t would cancel to 0.
template <typename A, int N>
__device__ __forceinline__ MaxSum<A> add_pack(MaxSum<A> s, A& rest, const A (&v)[N], int skip) {
    A m = s.m;
#pragma unroll
    for (int k = 0; k < N; ++k) m = max_acc(m, v[k]);
    if (m == neg_inf<A>()) return s;
    const A rescale = exp_acc(s.m - m);
    A d = s.d * rescale, r = rest * rescale;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        const A e = exp_acc(v[k] - m);
        d += e;
        r += k == skip ? A(0) : e;
    }
    rest = r;
    return MaxSum<A>{m, d};
}

template <typename A, int N>
__device__ __forceinline__ MaxSum<A> add_pack(MaxSum<A> s, const A (&v)[N]) {
    A unused = A(0);  // the compiler drops it
    return add_pack(s, unused, v, -1);
}

// Reductions over a warp (butterfly shuffles: every lane ends with the result) and over a
// block (a warp's result through shared memory, then once more across warps).
template <typename A>
__device__ __forceinline__ MaxSum<A> warp_merge(MaxSum<A> s) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
        s = merge(s, MaxSum<A>{__shfl_xor_sync(0xffffffffu, s.m, offset), __shfl_xor_sync(0xffffffffu, s.d, offset)});
    return s;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

template <typename A>
__device__ __forceinline__ MaxSum<A> block_merge(MaxSum<A> s) {
    __shared__ A shared_m[32], shared_d[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    s = warp_merge(s);
    if (lane == 0) { shared_m[warp] = s.m; shared_d[warp] = s.d; }
    __syncthreads();
    s = warp_merge(lane < n_warps ? MaxSum<A>{shared_m[lane], shared_d[lane]} : MaxSum<A>{neg_inf<A>(), A(0)});
    __syncthreads();  // the shared arrays may be reused by a later reduction
    return s;
}

template <typename A>
__device__ __forceinline__ A block_sum(A v) {
    __shared__ A shared[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = warp_sum(lane < n_warps ? shared[lane] : A(0));
    __syncthreads();
    return v;
}

// The threads that own one row: a whole block (long rows), or one warp (short rows, several
// to a block, reduced with shuffles only: no shared memory, no __syncthreads). rank and size
// number the team's threads; merge and sum reduce over the team and give every thread the
// result. A warp team's row is uniform across its lanes, so a warp past the last row leaves
// as a whole and the full-mask shuffles of the others stay valid.
struct BlockTeam {
    __device__ __forceinline__ long long row() const { return blockIdx.x; }
    __device__ __forceinline__ int rank() const { return threadIdx.x; }
    __device__ __forceinline__ int size() const { return blockDim.x; }
    template <typename A> __device__ __forceinline__ MaxSum<A> merge(MaxSum<A> s) const { return block_merge(s); }
    template <typename A> __device__ __forceinline__ A sum(A v) const { return block_sum(v); }
};

struct WarpTeam {
    __device__ __forceinline__ long long row() const {
        return (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    }
    __device__ __forceinline__ int rank() const { return threadIdx.x & 31; }
    __device__ __forceinline__ int size() const { return 32; }
    template <typename A> __device__ __forceinline__ MaxSum<A> merge(MaxSum<A> s) const { return warp_merge(s); }
    template <typename A> __device__ __forceinline__ A sum(A v) const { return warp_sum(v); }
};

// How a row of n_cols elements is walked so that every vector access is aligned whatever the
// row's start and length: a scalar head up to the first 16-byte boundary, n_packs aligned
// packs of VEC, a scalar tail. head + tail ("edges") is at most 2 (VEC - 1) <= 14 elements, so
// team threads rank < edges take one edge element each. A row shorter than its head is all
// head; VEC == 1 has no edges. Nothing outside [0, n_cols) is ever addressed. Every array the
// kernel reads or writes must sit at the same offset from a 16-byte boundary (the host checks
// it and otherwise launches the VEC == 1 kernel); `row` is any one of them.
// tests/test_cupy.py replays this arithmetic for many (offset, n_cols) pairs.
template <int VEC> struct RowSplit {
    int head;           // scalar elements before the first 16-byte boundary
    long long n_packs;  // aligned packs of VEC elements from column head on
    int edges;          // head + tail scalar elements
    __device__ __forceinline__ long long pack_col(long long p) const { return head + p * VEC; }
    // Packs rank, rank + size, ... below n_packs: how many a thread of a team of `size` owns.
    __device__ __forceinline__ int cached_packs(int rank, int size) const {
        return rank < n_packs ? int((n_packs - 1 - rank) / size) + 1 : 0;
    }
    __device__ __forceinline__ long long edge_col(int e) const {
        return e < head ? e : pack_col(n_packs) + (e - head);  // head first, then the tail
    }
};

template <typename T, int VEC>
__device__ __forceinline__ RowSplit<VEC> split_row(const T* row, int n_cols) {
    static_assert(VEC >= 1 && VEC <= 16 && (VEC & (VEC - 1)) == 0, "packs of 1 to 16 elements, a power of two");
    // Elements since the last 16-byte boundary (the host guarantees element alignment).
    const int offset = int((reinterpret_cast<unsigned long long>(row) / sizeof(T)) % VEC);
    const int to_boundary = (VEC - offset) % VEC;
    const int head = to_boundary < n_cols ? to_boundary : n_cols;
    const int n_packs = (n_cols - head) / VEC;
    return RowSplit<VEC>{head, n_packs, n_cols - n_packs * VEC};
}

// Loads in flight instead of a dependent chain: the cached path issues its loads LOAD_BATCH at
// a time (packs of every array together: all of a row's packs in every vectorised kernel but
// float64's, which take two batches) before the math on any of them, and the streaming loop
// loads STREAM_BYTES a thread a step (two 128-bit packs of one array, or one of each of two;
// at most 4 scalar loads in the VEC == 1 kernels) before their math. All 32 loads of the
// scalar float64 kernel at once spilled under MAX_THREADS' 128-register cap, and 64-byte
// streaming steps took 16-bit kernels to 112-127 registers.
#define LOAD_BATCH 8
#define STREAM_BYTES 32
template <typename T, int VEC, int NA> struct StreamStep {
    static constexpr int by_bytes = int(STREAM_BYTES / (NA * VEC * sizeof(T)));
    static constexpr int packs = by_bytes < 1 ? 1 : by_bytes > 4 ? 4 : by_bytes;  // scalar kernels: 4 loads
};

// The first pass of every row kernel over NA arrays read in step (rows[a] + column): for each
// of this thread's packs, and its edge element if it has one, visit(v, col) with v[a][k] the
// value of array a at column col + k (v is A[NA][VEC] for a pack, A[NA][1] for the edge).
// Loads are issued ahead of the math (LOAD_BATCH, STREAM_BYTES). With `cached` (the row fits)
// the packs stay in `cache` for the last pass, so the row is read once; otherwise they are
// streamed and only arrays a < n_stream are read (the others' values are 0). The edge values
// are loaded first and kept in `edge` either way.
template <typename T, int VEC, int ITEMS, int NA, typename Team, typename Visit>
__device__ __forceinline__ void read_row(const Team& team, const T* const (&rows)[NA], int n_stream,
                                         const RowSplit<VEC>& split, bool cached,
                                         typename Acc<T>::type (&cache)[ITEMS][NA][VEC],
                                         typename Acc<T>::type (&edge)[NA][1], Visit visit) {
    typedef typename Acc<T>::type A;
    const int rank = team.rank(), size = team.size();
    const bool has_edge = rank < split.edges;
    T edge_raw[NA];
    if (has_edge) {
        const long long col = split.edge_col(rank);
#pragma unroll
        for (int a = 0; a < NA; ++a) edge_raw[a] = rows[a][col];
    }
    if (cached) {
        const int mine = split.cached_packs(rank, size);
        constexpr int BATCH = ITEMS < LOAD_BATCH / NA ? ITEMS : LOAD_BATCH / NA;  // packs of every array
        static_assert(ITEMS % BATCH == 0, "whole batches");
#pragma unroll
        for (int first = 0; first < ITEMS; first += BATCH) {
            Pack<T, VEC> raw[BATCH][NA];
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
                const long long p = (long long)(first + b) * size + rank;
                if (first + b < mine) {
#pragma unroll
                    for (int a = 0; a < NA; ++a) raw[b][a] = load_pack<T, VEC>(rows[a] + split.head, p);
                }
            }
#pragma unroll
            for (int b = 0; b < BATCH; ++b) {
                const long long p = (long long)(first + b) * size + rank;
                if (first + b < mine) {
#pragma unroll
                    for (int a = 0; a < NA; ++a)
#pragma unroll
                        for (int k = 0; k < VEC; ++k) cache[first + b][a][k] = to_acc(raw[b][a].v[k]);
                    visit(cache[first + b], split.pack_col(p));
                }
            }
        }
    } else {
        constexpr int UNROLL = StreamStep<T, VEC, NA>::packs;
        for (long long first = rank; first < split.n_packs; first += (long long)UNROLL * size) {
            Pack<T, VEC> raw[UNROLL][NA];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long p = first + (long long)u * size;
                if (p < split.n_packs) {
#pragma unroll
                    for (int a = 0; a < NA; ++a)
                        if (a < n_stream) raw[u][a] = load_pack<T, VEC>(rows[a] + split.head, p);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long p = first + (long long)u * size;
                if (p < split.n_packs) {
                    A v[NA][VEC];
#pragma unroll
                    for (int a = 0; a < NA; ++a)
#pragma unroll
                        for (int k = 0; k < VEC; ++k) v[a][k] = a < n_stream ? A(to_acc(raw[u][a].v[k])) : A(0);
                    visit(v, split.pack_col(p));
                }
            }
        }
    }
    if (has_edge) {
#pragma unroll
        for (int a = 0; a < NA; ++a) edge[a][0] = to_acc(edge_raw[a]);
        visit(edge, split.edge_col(rank));
    }
}

// The last pass: out[col] = value(x, col) for each of this thread's columns, x[a] the value
// of array a there, from `cache` and `edge` or, for rows that did not fit, read again.
template <typename T, int VEC, int ITEMS, int NA, typename Team, typename Value>
__device__ __forceinline__ void write_row(const Team& team, const T* const (&rows)[NA], T* __restrict__ out,
                                          const RowSplit<VEC>& split, bool cached,
                                          const typename Acc<T>::type (&cache)[ITEMS][NA][VEC],
                                          const typename Acc<T>::type (&edge)[NA][1], Value value) {
    typedef typename Acc<T>::type A;
    const int rank = team.rank(), size = team.size();
    if (cached) {
        const int mine = split.cached_packs(rank, size);
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
            const long long p = (long long)it * size + rank;
            if (it < mine) {
                Pack<T, VEC> result;
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    A x[NA];
#pragma unroll
                    for (int a = 0; a < NA; ++a) x[a] = cache[it][a][k];
                    result.v[k] = from_acc<T>(value(x, split.pack_col(p) + k));
                }
                store_pack<T, VEC>(out + split.head, p, result);
            }
        }
    } else {
        constexpr int UNROLL = StreamStep<T, VEC, NA>::packs;
        for (long long first = rank; first < split.n_packs; first += (long long)UNROLL * size) {
            Pack<T, VEC> raw[UNROLL][NA];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long p = first + (long long)u * size;
                if (p < split.n_packs) {
#pragma unroll
                    for (int a = 0; a < NA; ++a) raw[u][a] = load_pack<T, VEC>(rows[a] + split.head, p);
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const long long p = first + (long long)u * size;
                if (p < split.n_packs) {
                    Pack<T, VEC> result;
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        A x[NA];
#pragma unroll
                        for (int a = 0; a < NA; ++a) x[a] = to_acc(raw[u][a].v[k]);
                        result.v[k] = from_acc<T>(value(x, split.pack_col(p) + k));
                    }
                    store_pack<T, VEC>(out + split.head, p, result);
                }
            }
        }
    }
    if (rank < split.edges) {
        A x[NA];
#pragma unroll
        for (int a = 0; a < NA; ++a) x[a] = edge[a][0];
        const long long col = split.edge_col(rank);
        out[col] = from_acc<T>(value(x, col));
    }
}

// Registers each thread devotes to caching its share of a row (single-read path), and the
// largest block: __launch_bounds__(MAX_THREADS) lets ptxas use up to 128 registers a thread,
// so a row of up to MAX_THREADS * CACHED_VALUES = 16384 elements is read once.
#define CACHED_VALUES 32
#define MAX_THREADS 512
// Short rows, one warp each, WARP_ROWS rows to a block: rows of up to WARP_ROW_COLS elements
// (half that in the backward, which caches y and dy), the most a warp's registers hold, so
// every short row is read once. These are exactly the rows the block kernels ran on a single
// warp, paying a shared-memory round trip and two __syncthreads per reduction, with at most
// 32 resident blocks (32 warps) an SM.
#define WARP_ROW_COLS 1024
#define WARP_ROWS 4
static_assert(WARP_ROW_COLS <= 32 * CACHED_VALUES, "a warp's registers hold each of its rows");
// __launch_bounds__' second argument, resident blocks an SM, from a register budget a thread:
// REGS (64 for the MAX_THREADS blocks: 2 an SM; 72 for the 32 * WARP_ROWS warp-row blocks: 7,
// 28 warps) for the vectorised 16- and 32-bit kernels, which fit it without spilling (at 64,
// two warp-row kernels spilled 8 bytes); 128 for float64, whose 32 cached doubles are 64
// registers alone (its warp-row backward took 157 uncapped). Uncapped, ptxas gave 16-bit
// cross-entropy blocks 94-106 registers: one 512-thread block an SM. The scalar VEC == 1
// fallbacks keep what THREADS alone allows.
#define MIN_BLOCKS(THREADS, T, VEC, REGS) ((VEC) == 1 ? 1 : 65536 / ((THREADS) * (sizeof(T) == 8 ? 128 : (REGS))))
