// m3v_types.h: types shared by every unit of the m3vit HLS library, the pragma macro and
// compile-time helpers. The contract constants and tables come from the generated m3v_tables.h.
#ifndef M3V_TYPES_H
#define M3V_TYPES_H

#include "ap_int.h"
#include "m3v_tables.h"

// HLS pragmas are written M3V_HLS(pipeline II=1). Vitis HLS defines __SYNTHESIS__ and receives
// them through _Pragma (the two-level macro lets the arguments expand first); the C-simulation
// build drops them, because g++ -Wall -Werror rejects unknown pragmas.
// Trip counts of run-time-bounded loops are written M3V_TRIPCOUNT(min, max) with compile-time
// constants; the C-simulation expansion still names them, so they are never unused there.
#ifdef __SYNTHESIS__
#define M3V_PRAGMA_STR(x) _Pragma(#x)
#define M3V_HLS(x) M3V_PRAGMA_STR(HLS x)
#define M3V_TRIPCOUNT(lo, hi) M3V_PRAGMA_STR(HLS loop_tripcount min=lo max=hi)
#else
#define M3V_HLS(x)
#define M3V_TRIPCOUNT(lo, hi) static_cast<void>(lo), static_cast<void>(hi);
#endif

namespace m3v {

// Run-time shift register: 7 bits signed hold the contract's [-62, 62].
typedef ap_int<7> shift_t;
// Per-tensor saturation counter (the hardware counterpart of the golden model's SatCounter).
typedef ap_uint<32> sat_cnt_t;
// Token index, expert index, queue position and offset.
typedef ap_uint<16> idx_t;
// Gate probability, u16 with 15 fraction bits (1.0 = 32768 is representable).
typedef ap_uint<contract::GATE_BITS> score_t;

// Run-time fixed-point format of a result: `bits` wide (1..63), value q * 2^-frac.
// Only `bits` and `is_signed` bound a saturation; `frac` matters where an op needs the
// absolute scale (GELU input and output).
struct fmt_t {
    ap_uint<6> bits;
    ap_int<8> frac;
    bool is_signed;
};

// ceil(log2(n)) for 1 <= n <= 2^30, at compile time.
constexpr int clog2(int n) {
    for (int b = 0; b < 31; b++)
        if ((1 << b) >= n)
            return b;
    return 31;
}

constexpr int cmax(int a, int b) { return a > b ? a : b; }

constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

} // namespace m3v

#endif // M3V_TYPES_H
