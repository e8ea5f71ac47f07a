// Append into a paged cache (SPEC §7.4): one CTA per (new token, cache head) copies its K and V
// rows to the entry at the head's length through the block table; `ek_append_lens` then advances
// the lengths (stream order puts it after every copy that read them). Everything it reads —
// offsets, lengths, table — is in device memory, so a decode step can be captured and replayed.

#define APPEND_THREADS 128

// The sequence of token t: the last i with cu_q[i] <= t (cu_q non-decreasing, validated).
__device__ __forceinline__ int append_sequence(const uint32_t* cu_q, int sequences, uint32_t t) {
    int lo = 0, hi = sequences - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (cu_q[mid] <= t) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

template <typename T> __device__ void append_rows(const EkAppendParams& p) {
    const uint32_t t = blockIdx.x;
    const int hc = blockIdx.y, d = p.k_new.shape[3], rep = p.cache_heads / p.k_new.shape[2];
    const uint32_t* cu = reinterpret_cast<const uint32_t*>(p.cu_q);
    const int i = append_sequence(cu, p.sequences, t);
    const uint32_t pos = reinterpret_cast<const uint32_t*>(p.lens)[i * p.cache_heads + hc] + (t - cu[i]);
    const uint32_t page = reinterpret_cast<const uint32_t*>(p.block_table)[(long long)i * p.table_width + pos / p.page_size];
    const long long dst = (long long)page * p.page_stride + (long long)(pos % p.page_size) * p.slot_stride +
                          (long long)hc * p.head_stride;
    const T* kn = tensor_ptr<T>(p.k_new);
    const T* vn = tensor_ptr<T>(p.v_new);
    const long long ks = row_offset(p.k_new, 0, t, hc / rep), vs = row_offset(p.v_new, 0, t, hc / rep);
    T* kp = reinterpret_cast<T*>(p.k_pool);
    T* vp = reinterpret_cast<T*>(p.v_pool);
    for (int x = threadIdx.x; x < d; x += blockDim.x) {
        kp[dst + x] = kn[ks + x];
        vp[dst + x] = vn[vs + x];
    }
}

extern "C" __global__ void __launch_bounds__(APPEND_THREADS) ek_append_lens(EkAppendParams p) {
    const int i = blockIdx.x;
    const uint32_t* cu = reinterpret_cast<const uint32_t*>(p.cu_q);
    uint32_t* lens = reinterpret_cast<uint32_t*>(p.lens);
    for (int h = threadIdx.x; h < p.cache_heads; h += blockDim.x) lens[i * p.cache_heads + h] += cu[i + 1] - cu[i];
}

#define EK_APPEND(T, name)                                                                              \
    extern "C" __global__ void __launch_bounds__(APPEND_THREADS) ek_append_##name(EkAppendParams p) { \
        append_rows<T>(p);                                                                              \
    }
EK_APPEND(float, f32)
EK_APPEND(f16_t, f16)
EK_APPEND(bf16_t, bf16)
