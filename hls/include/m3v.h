// m3v.h: the m3vit HLS header library. Include this, plus the generated m3v_config.h for the
// build's CFG struct; m3v_tables.h (generated) must be on the include path as well.
#ifndef M3V_H
#define M3V_H

#include "m3v_types.h"
#include "m3v_prim.h"
#include "m3v_nonlinear.h"
#include "m3v_gemm.h"
#include "m3v_layernorm.h"
#include "m3v_attention.h"
#include "m3v_moe.h"
#include "m3v_elementwise.h"

#endif // M3V_H
