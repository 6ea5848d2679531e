"""Random `gemm` and `moe_combine` instructions with their operands, for the GEMM engine tests.

A case is one instruction over operands placed in the read-only spaces (x, weights, queue table,
residual in `wgt` / `in`) and results in `arena` / `out`, sized for the hardware configuration's
P_IN, P_OUT and SLOTS so that sizes are odd against all of them. ``Case.instrs`` is the
instruction list (without END); the expected bytes always come from program_exec.execute.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

from m3vit.compiler import isa

X_MODES = ("direct", "gather", "queue")
Y_MODES = ("direct", "queue", "scatter")


@dataclasses.dataclass
class Case:
    name: str
    instrs: list
    weights: bytes
    image: bytes
    arena_bytes: int
    output_bytes: int


class Space:
    """A growing byte space of 64-byte aligned tensors."""

    def __init__(self, name: str):
        self.name, self.data = name, bytearray()

    def put(self, blob: bytes) -> int:
        off = len(self.data)
        self.data += blob
        self.data += bytes(isa.align(len(self.data)) - len(self.data))
        return isa.ref(self.name, off)

    def reserve(self, n: int) -> int:
        return self.put(bytes(n))


def rand_bits(rng: random.Random, bits: int, n: int) -> np.ndarray:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.array([rng.randint(lo, hi) for _ in range(n)], np.int64)


def routing(rng: random.Random, t: int, n_exp: int, k: int) -> np.ndarray:
    """Top-k expert indices [t, k], distinct per token; expert n_exp - 1 is sometimes left idle."""
    pool = n_exp - 1 if n_exp > k and rng.random() < 0.5 else n_exp
    return np.array([rng.sample(range(pool), k) for _ in range(t)], np.int64)


def queue_table(idx: np.ndarray, n_exp: int) -> tuple[bytes, list[int]]:
    t, k = idx.shape
    flat = idx.reshape(-1)
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(n_exp + 1))
    tok, slot = np.divmod(order, k)
    q_off = bounds.astype(np.uint16)
    q_tok = tok.astype(np.uint16)
    q_dst = (tok * k + slot).astype(np.uint16)
    tok_off, dst_off, size = isa.queue_layout(n_exp, t, k)
    blob = bytearray(size)
    blob[0:2 * (n_exp + 1)] = q_off.tobytes()
    blob[tok_off:tok_off + 2 * t * k] = q_tok.tobytes()
    blob[dst_off:dst_off + 2 * t * k] = q_dst.tobytes()
    return bytes(blob), [int(b) for b in np.diff(bounds)]


def rand_fmt(rng: random.Random, lo_bits: int = 2) -> int:
    bits = rng.choice([16, 16, rng.randint(lo_bits, 16)])
    return isa.pack_fmt(bits, rng.randint(-4, 12))


def rand_res_fmt(rng: random.Random) -> int:
    """A residual format: signed up to 16 bits or unsigned up to 15 (the executor's bounds)."""
    if rng.random() < 0.25:
        return isa.pack_fmt(rng.randint(4, 15), rng.randint(-2, 10), signed=False)
    return rand_fmt(rng, 4)


def gemm_case(rng: random.Random, hw, name: str, xmode: str | None = None, ymode: str | None = None,
              residual: bool | None = None, big: bool = False, shape: tuple[int, int, int, int] | None = None,
              w16: bool | None = None) -> Case:
    """``shape``: (rows or tokens, in_dim, out_dim, y_ld) instead of random ones (x_ld = in_dim)."""
    p_in, p_out, slots = hw.p_in, hw.p_out, hw.token_block
    xmode = xmode or rng.choice(X_MODES)
    ymode = ymode or rng.choice(Y_MODES)
    queued = xmode != "direct" or ymode != "direct"
    if residual is None:
        residual = not queued and rng.random() < 0.4
    scale = 4 if big else 1
    if shape is None:
        k_in = rng.randint(1, scale * (3 * p_in + 3))
        n_out = rng.randint(1, scale * (2 * p_out + 3))
        x_ld = k_in + rng.choice([0, 0, rng.randint(1, 5)])
        y_ld = n_out + rng.choice([0, 0, rng.randint(1, 5)])
    else:
        _, k_in, n_out, y_ld = shape
        x_ld = k_in
    w16_draw = rng.random() < 0.5
    w16 = w16_draw if w16 is None else w16
    has_bias = rng.random() < 0.6
    gelu = rng.random() < 0.35
    a_bits = rng.randint(2, 16)
    w_bits = rng.randint(2, 16 if w16 else 8)
    wgt, inp = Space("wgt"), Space("in")
    arena_extra = rng.choice([0, 64])

    fields = {"in_dim": k_in, "out_dim": n_out, "x_ld": x_ld, "y_ld": y_ld}
    if queued:
        t = rng.randint(1, min(hw.limits.max_tokens, scale * (2 * slots + 3))) if shape is None else shape[0]
        n_exp = rng.randint(1, 6)
        k = rng.randint(1, min(3, n_exp))
        idx = routing(rng, t, n_exp, k)
        table, lengths = queue_table(idx, n_exp)
        expert = rng.randrange(n_exp)
        if rng.random() < 0.15 and 0 in lengths:
            expert = lengths.index(0)
        fields.update(queue_ref=wgt.put(table), expert=expert, queue_shape=n_exp | (t * k) << 16, rows=t)
        x_rows = {"direct": t, "gather": t, "queue": t * k}[xmode]
        y_rows = {"direct": t, "queue": t * k, "scatter": t * k}[ymode]
    else:
        rows = rng.randint(1, scale * (2 * slots + 3)) if shape is None else shape[0]
        fields["rows"] = rows
        x_rows = y_rows = rows
    x = rand_bits(rng, a_bits, x_rows * x_ld)
    if rng.random() < 0.5:
        fields["x_ref"] = inp.put(x.astype("<i2").tobytes())
    else:
        fields["x_ref"] = wgt.put(x.astype("<i2").tobytes())
    w = rand_bits(rng, w_bits, k_in * n_out)
    fields["w_ref"] = wgt.put(w.astype("<i2" if w16 else "i1").tobytes())
    if has_bias:
        fields["bias_ref"] = wgt.put(rand_bits(rng, a_bits + w_bits + 2, n_out).astype("<i8").tobytes())
    # shifts around the one that keeps the output width, some far off (saturation, left shifts)
    out_fmt = rand_fmt(rng)
    out_bits = out_fmt & 0x3F
    base = a_bits + w_bits + k_in.bit_length() // 2 - out_bits
    shifts = [rng.randint(base - 2, base + 2) if rng.random() < 0.8 else rng.randint(-6, 40) for _ in range(n_out)]
    shifts = [max(-8, min(62, s)) for s in shifts]
    fields["shift_ref"] = wgt.put(np.array(shifts, np.int8).tobytes())
    flags = isa.make_flags(gelu=gelu, w16=w16, bias=has_bias, xmode=xmode, ymode=ymode)
    if gelu:
        frac = rng.randint(-2, 12)
        fields["fmt"] = isa.pack_fmt(out_bits, frac)
        fields["gelu_fmt"] = isa.pack_fmt(rng.choice([16, rng.randint(2, 16)]), frac + rng.randint(-3, 3))
    else:
        fields["fmt"] = out_fmt
    y_bytes = 2 * y_rows * y_ld
    out_space = rng.choice(["arena", "out"])
    fields["y_ref"] = isa.ref(out_space, 64 if out_space == "arena" and arena_extra else 0)
    if residual:
        flags |= 1 << isa.FLAGS["residual"]
        r = rand_bits(rng, 16, y_rows * y_ld)
        fields.update(res_ref=inp.put(r.astype("<i2").tobytes()),
                      res_shifts=isa.pack_res_shifts(rng.randint(-3, 4), rng.randint(-3, 4)),
                      res_fmt=rand_res_fmt(rng))
    if not inp.data:
        inp.put(bytes(2))
    arena_bytes = isa.align(y_bytes + arena_extra) if out_space == "arena" else 64
    output_bytes = isa.align(y_bytes) if out_space == "out" else 64
    return Case(name, [isa.Instr("gemm", fields, flags)], bytes(wgt.data), bytes(inp.data), arena_bytes,
                output_bytes)


def combine_case(rng: random.Random, hw, name: str, k: int | None = None, residual: bool | None = None,
                 big: bool = False) -> Case:
    slots, p_out = hw.token_block, hw.p_out
    scale = 4 if big else 1
    t = rng.randint(1, scale * (2 * slots + 3))
    d = rng.randint(1, scale * (2 * p_out + 3))
    k = k or rng.randint(1, 3)
    n_exp = rng.randint(k, min(8, hw.limits.max_experts))
    if residual is None:
        residual = rng.random() < 0.4
    wgt, inp = Space("wgt"), Space("in")
    idx = routing(rng, t, n_exp, k)
    score = np.array([rng.randrange(1 << 15) if rng.random() < 0.9 else rng.choice([0, 65535])
                      for _ in range(t * k)], np.int64)
    y = rand_bits(rng, 16, t * k * d)
    shift = [rng.choice([15, 15, rng.randint(0, 30)]) for _ in range(n_exp)]
    fields = {"score_ref": wgt.put(score.astype("<u2").tobytes()), "idx_ref": wgt.put(idx.astype("<u2").tobytes()),
              "y_ref": inp.put(y.astype("<i2").tobytes()), "shift_ref": wgt.put(np.array(shift, np.int8).tobytes()),
              "tokens": t, "k": k, "dim": d, "fmt": rand_fmt(rng)}
    out_space = rng.choice(["arena", "out"])
    fields["out_ref"] = isa.ref(out_space, 0)
    flags = 0
    if residual:
        flags |= 1 << isa.FLAGS["residual"]
        r = rand_bits(rng, 16, t * d)
        fields.update(res_ref=inp.put(r.astype("<i2").tobytes()),
                      res_shifts=isa.pack_res_shifts(rng.randint(-3, 4), rng.randint(-3, 4)),
                      res_fmt=rand_res_fmt(rng))
    out_bytes = isa.align(2 * t * d)
    return Case(name, [isa.Instr("moe_combine", fields, flags)], bytes(wgt.data), bytes(inp.data),
                out_bytes if out_space == "arena" else 64, out_bytes if out_space == "out" else 64)
