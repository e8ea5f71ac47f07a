// Helpers shared by the Ascend C kernels (no STL: the device compiler has none).
#pragma once

template <typename A, typename B> struct SameType {
    static constexpr bool value = false;
};
template <typename A> struct SameType<A, A> {
    static constexpr bool value = true;
};

// -inf as a float, from its bit pattern.
__aicore__ inline float NegInf() {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = 0xff800000u;
    return v.f;
}
