/*
 * entropy-kernels: the one params header shared by Rust (through bindgen: src/ffi/params.rs),
 * the CUDA kernels (cuda/) and the Ascend C kernels (ascend/). Fixed-width fields only; device
 * addresses are uint64_t. Each operation takes one struct by value.
 *
 * Regenerate the Rust side with `ENTROPY_KERNELS_BLESS=1 cargo test --test ffi_fresh`, which fails
 * when it is stale.
 */
#ifndef ENTROPY_PARAMS_H
#define ENTROPY_PARAMS_H

#if defined(__CUDACC_RTC__)
/* NVRTC compiles the kernels with no system headers. */
typedef unsigned char uint8_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <stdint.h>
#endif

/* Element type of activations and caches. */
#define EK_F32 0
#define EK_F16 1
#define EK_BF16 2

/* `counts` value of a unit that attends densely (causal over every earlier key). */
#define EK_DENSE_UNIT 0xFFFFFFFFu

/* A rank-4 tensor in device memory: element strides of dims 0..2; dim 3 is contiguous. */
typedef struct EkTensor {
    uint64_t ptr;
    int64_t stride[3];
    int32_t shape[4];
} EkTensor;

/*
 * Prefill attention (SPEC §3) for one layer: q [B, L, Hq, D], k and v [B, L, Hkv, D], out like q.
 * Unit u = (b·Hkv + h)·segments + s attends to the blocks indices[offsets[u] .. + counts[u]]
 * plus its own segment's keys causally, or causally to everything when counts[u] is
 * EK_DENSE_UNIT. With segments == 0 the whole layer is dense and the lists are not read.
 */
typedef struct EkPrefillParams {
    EkTensor q;
    EkTensor k;
    EkTensor v;
    EkTensor out;
    uint64_t lse;     /* float [B, Hq, L] (natural log), or 0 */
    uint64_t offsets; /* uint32 [units] */
    uint64_t counts;  /* uint32 [units] */
    uint64_t indices; /* uint32 block indices */
    uint64_t workspace; /* Ascend: GM scratch per cube core for the cube/vector exchange, or 0 */
    int32_t segment_size;
    int32_t block_size;
    int32_t segments;
    int32_t group;    /* Hq / Hkv */
    int32_t tile_tokens; /* query tokens per CTA tile (rows = tile_tokens · group) */
    int32_t tiles_per_segment;
    float scale_log2; /* softmax scale · log2(e) */
    int32_t dtype;
} EkPrefillParams;

/*
 * Planning (SPEC §2). Workspaces: qsum f64 [B, segments, Hq, D], krep f64 [B, blocks, Hkv, 2, D]
 * (Ascend computes only the representatives: qsum = f32 [B, segments, Hq, 2, D] max/min of the
 * queries, krep = f32 [B, blocks, Hkv, 2, D]; the host finishes the plan in f64),
 * key f64 [planned units, blocks] (ranking keys: logits, or fused scores). Outputs are per unit
 * u = (b·Hkv + h)·segments + s; `key` and `order` per planned unit (b·Hkv + h)·planned + s - seg_first.
 */
typedef struct EkPlanParams {
    EkTensor q;
    EkTensor k;
    uint64_t qsum;
    uint64_t krep;
    uint64_t key;
    uint64_t logits;  /* float [units, blocks], or 0 */
    uint64_t scores;  /* float [units, blocks], or 0 (required with fusion) */
    uint64_t prev;    /* float [units, blocks]: the previous layer's scores, or 0 */
    uint64_t entropy; /* float [units] */
    uint64_t budgets; /* float [units] */
    uint64_t keep;    /* uint32 [units] */
    uint64_t topk;    /* uint32 [segments], zeroed before the launch */
    uint64_t classes; /* uint8 [B·Hkv]: 0 rigid, 1 dynamic */
    uint64_t order;   /* uint32 [planned units, 2·width]: each one's ranking, then the kernel's scratch */
    int32_t batch;
    int32_t seq_len;
    int32_t q_heads;
    int32_t kv_heads;
    int32_t head_dim;
    int32_t segment_size;
    int32_t block_size;
    int32_t segments;
    int32_t blocks;
    int32_t keep_cap; /* N - ((L mod S) div Bk + 1) */
    int32_t width;    /* ranking width: min(3·base / Bk, keep_cap) */
    int32_t base_budget;
    int32_t fixed_budget; /* 1: CritiPrefill (every head keeps base) */
    int32_t logit_tile;   /* CUDA: K-representative blocks per CTA of the logits kernel */
    int32_t logit_segments; /* CUDA: segments' Q sums per pass of the logits kernel */
    int32_t logit_heads;  /* CUDA: group heads' Q sums per pass of the logits kernel */
    float e_t;
    float delta_t;
    float alpha;
    float entropy_floor;
    int32_t dtype;
    /* Chunked planning over a paged cache (SPEC §7.2; CUDA), one sequence (batch 1) at a time;
     * sized() fills the one-shot values. Only segments seg_first .. seg_end are planned (their
     * units' maps, entropies, decisions and rankings; the others are left as they are). Query
     * position t (seg_first·S <= t) is row q_token0 + t - q_pos0 of q ([1, T, Hq, D]). */
    int32_t seg_first;
    int32_t seg_end;
    int32_t q_token0;
    int32_t q_pos0;
    int32_t prompt_classes; /* 1: `prompt` head classes (over every segment); 0: `streaming` */
    int32_t page_size;
    uint64_t states;      /* EkPlanState [B·Hkv]: read before seg_first, left after seg_end - 1;
                             0: fresh states, not kept */
    uint64_t block_table; /* uint32 [blocks of the sequence's pages]: key t of kv head h at
                             k.ptr + page·page_stride + (t mod page_size)·slot_stride + h·head_stride,
                             page = block_table[t div page_size]; 0: k is a [B, L, Hkv, D] tensor */
    int64_t page_stride;
    int64_t slot_stride;
    int64_t head_stride;
} EkPlanParams;

/* What `streaming` planning carries from one chunk to the next, per kv head (PlanState). */
typedef struct EkPlanState {
    uint32_t rigid;         /* 1: entropy below e_t at every segment 1 .. next_segment - 1 */
    float budget;           /* budget of segment next_segment - 1, in tokens */
    float floored_entropy;  /* max(H, entropy_floor) of segment next_segment - 1 */
    uint32_t next_segment;
} EkPlanState;

/*
 * kv_compress (SPEC §4): caches [B, Hkv, N, D], window obs [B, Hq, W, D]. Scoring runs in two
 * passes over key chunks: stats (row max and sum, base 2) then window means a [B, Hq, N - W].
 */
typedef struct EkCompressParams {
    EkTensor k_cache;
    EkTensor v_cache;
    EkTensor obs;
    uint64_t stats;   /* float [B, Hkv, chunks, rows, 2] */
    uint64_t means;   /* float [B, Hq, N - W] */
    uint64_t pooled;  /* float [B, Hc, N - W] */
    uint64_t selected; /* uint32 [B, Hc, keep] ascending */
    uint64_t k_out;   /* [B, Hc, budget, D] */
    uint64_t v_out;
    int32_t entries;
    int32_t window;
    int32_t budget;
    int32_t group;
    int32_t out_heads; /* Hc: Hkv, or Hq for per_query_head */
    int32_t chunk;     /* keys per pass-1 chunk */
    int32_t chunks;
    int32_t pooling;   /* 0 none, 1 avg, 2 max */
    int32_t pooling_kernel;
    int32_t gqa_mode;  /* 0 mean, 1 max, 2 per_query_head */
    float scale_log2;
    int32_t dtype;
    uint64_t workspace; /* Ascend cube scoring: per AI core, 2 slots of 64 x 64 f32 score tiles */
    /* Variable per-head lengths (AdaKV's shared budget; CUDA): */
    uint64_t lengths;   /* uint32 [B, Hc]: entries each head keeps, window included; 0: `budget` each */
    uint64_t floor_sel; /* uint32 [B, Hc, floor_keep]: each head's own best positions, ascending */
    uint64_t extra_sel; /* uint32 [B, extra_keep]: the rest, as indices hc·(N - W) + n, ascending */
    int32_t capacity;   /* slots per head in k_out / v_out (budget, or the longest head) */
    int32_t list_stride; /* positions per (b, head) row of `selected` */
    int32_t floor_keep;
    int32_t extra_keep; /* per batch row, across its heads (with head_lens: the buffer's stride) */
    /* Selection over a paged cache in place (SPEC §7.5; CUDA): k_cache / v_cache then hold the
     * pools' addresses (shape [B, Hc, N, D], N the longest head; strides unused), entry `key` of
     * head h of sequence b at page·page_stride + (key mod page_size)·slot_stride + h·head_stride,
     * page = block_table[b·table_width + key div page_size]. */
    uint64_t head_lens;   /* uint32 [B, Hc]: entries each head holds, 0 where the sequence does not
                             compress; 0: `entries` each */
    uint64_t block_table; /* uint32 [B, table_width]; 0: contiguous caches */
    uint64_t cache_lens;  /* uint32 [B, Hc]: the cache's lengths, set to `lengths` by the compaction */
    int64_t page_stride;
    int64_t slot_stride;
    int64_t head_stride;
    int32_t table_width;
    int32_t page_size;
} EkCompressParams;

/*
 * Decode attention: q [B, nq, Hq, D], caches [B, Hc, capacity, D] holding lengths[b·Hc + h]
 * entries, out like q. Split-K: each (b, h, split) writes max, sum and output partials.
 */
typedef struct EkDecodeParams {
    EkTensor q;
    EkTensor k_cache;
    EkTensor v_cache;
    EkTensor out;
    uint64_t lengths;  /* uint32 [B, Hc] */
    uint64_t partial;  /* float [B, Hc, splits, rows, D + 2] */
    int32_t group;     /* Hq / Hc */
    int32_t splits;
    int32_t keys_per_split;
    float scale_log2;
    int32_t dtype;
} EkDecodeParams;

/*
 * Attention over a paged cache (SPEC §7.4). Queries: THD q [1, T, Hq, D] (or, with
 * `batched_rows` = Lq > 0, one sequence per batch row of [B, Lq, Hq, D]); out like q; lse float
 * [T, Hq] ([B, Hq, Lq] batched; natural log) or 0. K and V pools: entry `slot` of page `page`, cache
 * head h at element page·page_stride + slot·slot_stride + h·head_stride (dim contiguous);
 * block_table uint32 [sequences, table_width] of page ids. The host cuts the work into tiles
 * (EkAttendTile: query rows of one sequence and cache head, inside one segment of a planned
 * sequence, with their visible keys precomputed), each tile's keys into `splits` splits of
 * `keys_per_split`; partial float [tiles, splits, tile_rows, D + 2] holds each split's
 * unnormalised output, max and sum (base 2), merged per row in split order (CUDA). The Ascend
 * kernel runs a tile's keys on one core (splits 1) and ignores partial and keys_per_split.
 */
#define EK_ATTEND_NO_UNIT 0xFFFFFFFFu
typedef struct EkAttendTile {
    uint32_t seq;       /* sequence (row of the block table) */
    uint32_t head;      /* cache head */
    uint32_t token;     /* first query token, along T */
    uint32_t tokens;    /* query tokens */
    uint32_t q_head;    /* first query head of the group (0 .. group) */
    uint32_t q_heads;   /* query heads of the group (rows = tokens · q_heads) */
    uint32_t pos;       /* absolute position of the first query (bottom-right) */
    uint32_t causal;    /* 1: key t is visible to the query at position p iff t <= p */
    uint32_t own_from;  /* the tile's contiguous keys own_from .. own_end (dense: from 0) */
    uint32_t own_end;
    uint32_t unit;      /* its plan unit (listed blocks before own_from), or EK_ATTEND_NO_UNIT */
    uint32_t block_size;
} EkAttendTile;

typedef struct EkAttendParams {
    EkTensor q;
    EkTensor out;
    uint64_t lse;
    uint64_t k_pool;
    uint64_t v_pool;
    uint64_t block_table;
    uint64_t tiles;     /* EkAttendTile [tiles] */
    uint64_t offsets;   /* uint32 per unit: first of its blocks in `indices` */
    uint64_t counts;    /* uint32 per unit: its blocks (EK_DENSE_UNIT never reaches the kernel) */
    uint64_t indices;   /* uint32 block ids, ascending per unit */
    uint64_t partial;
    int64_t page_stride;
    int64_t slot_stride;
    int64_t head_stride;
    int32_t table_width;
    int32_t page_size;
    int32_t group;      /* Hq / Hc */
    int32_t tile_rows;  /* rows per tile (partial's stride) */
    int32_t splits;
    int32_t keys_per_split;
    int32_t batched_rows;
    float scale_log2;   /* softmax scale · log2(e) */
    int32_t tiles_count; /* tiles (Ascend: cores take them round-robin; CUDA: the grid) */
    int32_t dtype;      /* EK_F32 / EK_F16 / EK_BF16 (Ascend's dispatch) */
} EkAttendParams;

/*
 * Append (SPEC §7.4) into a paged cache in device memory: sequence i's new rows k_new/v_new
 * [1, T, Hkv, D] (tokens cu_q[i] .. cu_q[i+1]) land at entries lens[i, h] .. of every cache head h
 * (a cache of Hc = r·Hkv heads takes kv head h / r), through the block table, in the pools'
 * layout (see EkAttendParams); then `ek_append_lens` adds each sequence's token count to its
 * lengths. cu_q and lens live in device memory (a captured step replays them).
 */
typedef struct EkAppendParams {
    EkTensor k_new;
    EkTensor v_new;
    uint64_t k_pool;
    uint64_t v_pool;
    uint64_t block_table;
    uint64_t cu_q;      /* uint32 [sequences + 1] */
    uint64_t lens;      /* uint32 [sequences, Hc], read by ek_append, advanced by ek_append_lens */
    int64_t page_stride;
    int64_t slot_stride;
    int64_t head_stride;
    int32_t table_width;
    int32_t page_size;
    int32_t sequences;
    int32_t cache_heads;
    int32_t dtype;      /* EK_F32 / EK_F16 / EK_BF16 (Ascend's dispatch) */
} EkAppendParams;

/*
 * The device twin of src/numerics.rs evaluated on f64 arrays (ek_numerics_probe), so tests can
 * compare its bits with the host's. op 0: out[i] = exp(x[i]); 1: out[i] = ln(x[i]); 2: out[i] =
 * dot(x[i·dim ..], y[i·dim ..], dim); 3: out[0] = lane sum of x[0 .. n) (one block). i < n.
 */
#define EK_PROBE_EXP 0
#define EK_PROBE_LN 1
#define EK_PROBE_DOT 2
#define EK_PROBE_LANE_SUM 3
typedef struct EkProbeParams {
    uint64_t x;
    uint64_t y;
    uint64_t out;
    int32_t n;
    int32_t dim;
    int32_t op;
    int32_t pad;
} EkProbeParams;

#endif /* ENTROPY_PARAMS_H */
