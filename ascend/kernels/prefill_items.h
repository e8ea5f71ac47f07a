// Work items of the prefill kernels (the cube/vector one in prefill.cpp, the vector-only f32
// one in prefill_vector.cpp): item = (b, kv head, segment, query tile), and its virtual key list
// — the unit's selected blocks (ascending, all before the segment), then the segment's own keys
// up to the tile's last token; a dense unit's list is 0..last token. Row r (token t0 + r / G,
// head h·G + r % G) sees a prefix of that list.

#pragma once

#include "kernel_operator.h"
#include "entropy_params.h"

namespace ekprefill {
using namespace AscendC;

__aicore__ inline uint32_t Min(uint32_t a, uint32_t b) { return a < b ? a : b; }

// One work item and its virtual key list, shared by the cube and vector sides.
struct Item {
    int32_t b = 0, h = 0, s = 0;
    uint32_t t0 = 0, tokens = 0, rows = 0;
    bool dense = true;
    uint32_t own0 = 0;          // first own key (segment start) of a sparse unit
    uint32_t blocks = 0;        // selected blocks of a sparse unit
    uint64_t list = 0;          // offset of its block list in `indices`
    uint32_t keys = 0;          // length of the virtual key list

    // Virtual keys row r may see (a prefix of the list).
    __aicore__ inline uint32_t Visible(uint32_t r, uint32_t group, uint32_t block_size) const {
        const uint32_t t = t0 + r / group;
        return dense ? t + 1 : blocks * block_size + (t - own0 + 1);
    }
};

// Work items of a launch; every core (and both sides of a mixed launch) walks the same list.
__aicore__ inline uint32_t ItemCount(const EkPrefillParams& p) {
    return p.q.shape[0] * p.k.shape[2] * p.segments * p.tiles_per_segment;
}

__aicore__ inline bool MakeItem(const EkPrefillParams& p, uint32_t it, Item& x, const GlobalTensor<uint32_t>& offsets,
                                const GlobalTensor<uint32_t>& counts) {
    const uint32_t seq = p.q.shape[1], hkv = p.k.shape[2];
    const uint32_t tile = it % p.tiles_per_segment, u = it / p.tiles_per_segment;
    x.s = u % p.segments;
    x.h = (u / p.segments) % hkv;
    x.b = u / (p.segments * hkv);
    const uint32_t seg0 = x.s * p.segment_size, seg1 = Min(seq, seg0 + p.segment_size);
    x.t0 = seg0 + tile * p.tile_tokens;
    if (x.t0 >= seg1) return false;
    x.tokens = Min(p.tile_tokens, seg1 - x.t0);
    x.rows = x.tokens * p.group;
    const uint32_t count = p.counts ? counts.GetValue(u) : EK_DENSE_UNIT;
    x.dense = count == EK_DENSE_UNIT;
    x.own0 = seg0;
    x.blocks = x.dense ? 0 : count;
    x.list = x.dense ? 0 : offsets.GetValue(u);
    x.keys = x.dense ? x.t0 + x.tokens : x.blocks * p.block_size + (x.t0 + x.tokens - seg0);
    return true;
}

// Virtual key v of item x as a position in the sequence (the blocks first, then the own keys).
__aicore__ inline uint32_t KeyPosition(const Item& x, uint32_t v, uint32_t block_size,
                                       const AscendC::GlobalTensor<uint32_t>& indices) {
    const uint32_t in_blocks = x.blocks * block_size;
    if (v >= in_blocks) return (x.dense ? 0 : x.own0) + (v - in_blocks);
    return indices.GetValue(x.list + v / block_size) * block_size + v % block_size;
}

}  // namespace ekprefill
