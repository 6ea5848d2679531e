"""The accelerator's instruction set: the one definition of the Program's binary encoding.

The compiler writes Programs with it, the Python Program executor and the simulators read them,
and the C++ and SystemVerilog constants are rendered from it (``c_constants``), so no opcode,
flag or field position is typed twice. docs/program.md describes the encoding in prose.

A Program is a 64-byte header followed by 64-byte instructions, each sixteen little-endian
32-bit words. Word 0 holds the opcode (bits 7:0) and flags (bits 31:8); the other words are
the opcode's fields, in the order of ``FIELDS``. Memory operands are *refs*: the address space
in bits 31:30 (``SPACES``) and a byte offset in bits 29:0.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from m3vit.errors import UsageError

MAGIC = 0x5056334D          # b"M3VP" read as a little-endian word
VERSION = 2
WORDS = 16                  # per header and per instruction
RECORD_BYTES = 4 * WORDS
ALIGN = 64                  # every tensor, parameter and table starts on a 64-byte boundary
OFFSET_BITS = 30

# Address spaces of a ref; each has a base-address register (docs/program.md, register map).
SPACES = {"wgt": 0, "arena": 1, "in": 2, "out": 3}
SPACE_NAMES = {v: k for k, v in SPACES.items()}

OPCODES = {"end": 0, "patchify": 1, "gemm": 2, "embed": 3, "layernorm": 4, "attention": 5, "add": 6,
           "moe_gate": 7, "moe_combine": 8}
OPCODE_NAMES = {v: k for k, v in OPCODES.items()}

# Flag bits (word 0, bit 8 + position).
FLAGS = {"gelu": 0, "w16": 1, "bias": 2, "residual": 3}
# GEMM row modes (2-bit fields in the flags): how row r of an instruction maps to memory rows.
XMODE_SHIFT, YMODE_SHIFT = 4, 6
XMODES = {"direct": 0, "gather": 1, "queue": 2}     # src(r) = r | q_tok[off_e + r] | off_e + r
YMODES = {"direct": 0, "queue": 1, "scatter": 2}    # dst(r) = r | off_e + r | q_dst[off_e + r]

# Fields of words 1..15 per opcode. "*_ref" fields are refs, "*fmt" fields packed formats.
FIELDS: dict[str, tuple[str, ...]] = {
    "end": (),
    "patchify": ("src_ref", "dst_ref", "channels", "height", "width", "patch"),
    "gemm": ("x_ref", "y_ref", "w_ref", "bias_ref", "shift_ref", "rows", "in_dim", "out_dim", "x_ld", "y_ld",
             "fmt", "gelu_fmt", "queue_ref", "expert", "queue_shape"),
    "embed": ("x_ref", "y_ref", "cls_ref", "pos_ref", "patches", "dim", "a_shift", "b_shift", "fmt"),
    "layernorm": ("x_ref", "y_ref", "gamma_ref", "beta_ref", "shift_ref", "rows", "dim", "eps_lo", "eps_hi",
                  "beta_shift", "fmt"),
    "attention": ("qkv_ref", "y_ref", "tokens", "dim", "heads", "score_fmt", "score_shift", "out_shift", "fmt",
                  "q_tile"),
    "add": ("a_ref", "b_ref", "y_ref", "rows", "cols", "a_shift", "b_shift", "fmt"),
    "moe_gate": ("x_ref", "logits_ref", "idx_ref", "score_ref", "queue_ref", "w_ref", "bias_ref", "shift_ref",
                 "w_stride", "bias_stride", "shift_stride", "tokens", "dim", "experts_k", "fmt"),
    "moe_combine": ("score_ref", "idx_ref", "y_ref", "shift_ref", "out_ref", "tokens", "k", "dim", "fmt",
                    "res_ref", "res_shifts", "res_fmt"),
}
# Residual fusion (flag `residual`): a direct-mode GEMM has no queue, so its three queue words
# carry the residual operand under these names; moe_combine has them as fields of its own.
# res_shifts packs the add's two signed 16-bit shifts (pack_res_shifts).
ALIASES: dict[str, dict[str, str]] = {
    "gemm": {"res_ref": "queue_ref", "res_shifts": "expert", "res_fmt": "queue_shape"},
}
# gemm.queue_shape = experts | (tokens·k) << 16: the geometry of the queue table (queue_layout),
# which a queue-mode GEMM needs to find q_tok and q_dst. moe_gate.experts_k = experts | k << 16.
# Fields holding signed values (two's complement in the word).
SIGNED_FIELDS = frozenset({"a_shift", "b_shift", "beta_shift", "score_shift", "out_shift"})

# Status codes reported in the STATUS register (and by every executor on refusal).
STATUS = {"ok": 0, "bad_magic": 1, "bad_version": 2, "hw_mismatch": 3, "bad_task": 4, "bad_opcode": 5,
          "over_limit": 6}

for _op, _f in FIELDS.items():
    assert len(_f) <= WORDS - 1, _op


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def ref(space: str, offset: int) -> int:
    if offset % ALIGN or not 0 <= offset < (1 << OFFSET_BITS):
        raise ValueError(f"offset {offset} is not a {ALIGN}-byte aligned offset below 2^{OFFSET_BITS}")
    return (SPACES[space] << OFFSET_BITS) | offset


def split_ref(r: int) -> tuple[str, int]:
    return SPACE_NAMES[r >> OFFSET_BITS], r & ((1 << OFFSET_BITS) - 1)


def pack_fmt(bits: int, frac: int, signed: bool = True) -> int:
    """A format in one word: width in bits 5:0, fraction (int8) in bits 15:8, signed in bit 16."""
    if not 1 <= bits <= 63 or not -128 <= frac <= 127:
        raise ValueError(f"format ({bits}, {frac}) does not pack")
    return bits | ((frac & 0xFF) << 8) | (int(bool(signed)) << 16)


def unpack_fmt(w: int) -> tuple[int, int, bool]:
    frac = (w >> 8) & 0xFF
    return w & 0x3F, frac - 256 if frac >= 128 else frac, bool((w >> 16) & 1)


def pack_res_shifts(a_shift: int, b_shift: int) -> int:
    """The word of res_shifts: a_shift in bits 15:0, b_shift in bits 31:16, each signed 16-bit."""
    for s in (a_shift, b_shift):
        if not -(1 << 15) <= int(s) < 1 << 15:
            raise ValueError(f"residual shift {s} does not fit 16 signed bits")
    return (int(a_shift) & 0xFFFF) | ((int(b_shift) & 0xFFFF) << 16)


def unpack_res_shifts(w: int) -> tuple[int, int]:
    a, b = w & 0xFFFF, (w >> 16) & 0xFFFF
    return a - (1 << 16) if a >= 1 << 15 else a, b - (1 << 16) if b >= 1 << 15 else b


def queue_layout(experts: int, tokens: int, k: int) -> tuple[int, int, int]:
    """Byte offsets of q_off (u16 [N+1]), q_tok and q_dst (u16 [T·k] each) in a queue table,
    and (as the third value) the table's size. q_dst = token·k + slot."""
    off_bytes = align(2 * (experts + 1))
    tok_bytes = align(2 * tokens * k)
    return off_bytes, off_bytes + tok_bytes, off_bytes + 2 * tok_bytes


@dataclass
class Instr:
    op: str
    fields: dict[str, int] = field(default_factory=dict)
    flags: int = 0
    name: str = ""          # the canonical tensor (or op) it produces; not encoded
    origin: str = ""        # a fused instruction: the tensor it produced before fusion; not encoded

    def word0(self) -> int:
        return OPCODES[self.op] | (self.flags << 8)

    def canonical_fields(self) -> dict[str, int]:
        """The fields under their word names (an alias such as gemm.res_ref -> queue_ref);
        an alias and its word given different values is an error."""
        alias = ALIASES.get(self.op, {})
        out: dict[str, int] = {}
        for n, v in self.fields.items():
            word = alias.get(n, n)
            if word in out and int(out[word]) & 0xFFFFFFFF != int(v) & 0xFFFFFFFF:
                raise ValueError(f"{self.op}: {n} and {word} name the same word with different values")
            out[word] = v
        return out

    def encode(self) -> bytes:
        names = FIELDS[self.op]
        fields = self.canonical_fields()
        unknown = set(fields) - set(names)
        if unknown:
            raise ValueError(f"{self.op}: unknown fields {sorted(unknown)}")
        words = [self.word0()] + [int(fields.get(n, 0)) & 0xFFFFFFFF for n in names]
        words += [0] * (WORDS - len(words))
        return struct.pack(f"<{WORDS}I", *words)

    def has(self, flag: str) -> bool:
        return bool(self.flags >> FLAGS[flag] & 1)

    @property
    def xmode(self) -> int:
        return self.flags >> XMODE_SHIFT & 3

    @property
    def ymode(self) -> int:
        return self.flags >> YMODE_SHIFT & 3


def make_flags(*, gelu=False, w16=False, bias=False, residual=False, xmode="direct", ymode="direct") -> int:
    f = (int(gelu) << FLAGS["gelu"]) | (int(w16) << FLAGS["w16"]) | (int(bias) << FLAGS["bias"])
    f |= int(residual) << FLAGS["residual"]
    return f | (XMODES[xmode] << XMODE_SHIFT) | (YMODES[ymode] << YMODE_SHIFT)


def decode_instr(rec: bytes) -> Instr:
    words = struct.unpack(f"<{WORDS}I", rec)
    code = words[0] & 0xFF
    if code not in OPCODE_NAMES:
        raise UsageError(f"unknown opcode {code} in the Program")
    op = OPCODE_NAMES[code]
    fields = {}
    for i, n in enumerate(FIELDS[op]):
        v = words[1 + i]
        fields[n] = v - (1 << 32) if n in SIGNED_FIELDS and v >= 1 << 31 else v
    flags = words[0] >> 8
    if flags >> FLAGS["residual"] & 1:
        # the alias names too, so a fused GEMM reads as what it is
        fields.update({a: fields[w] for a, w in ALIASES.get(op, {}).items()})
    return Instr(op, fields, flags)


@dataclass
class Header:
    hw_digest: bytes        # the 32-byte sha256 of the hardware configuration (HwConfig.hash())
    n_instr: int
    weight_bytes: int
    arena_bytes: int
    n_tasks: int
    input_bytes: int
    output_bytes: int

    def encode(self) -> bytes:
        if len(self.hw_digest) != 32:
            raise ValueError("hw digest must be 32 bytes")
        return struct.pack("<2I32s6I", MAGIC, VERSION, self.hw_digest, self.n_instr, self.weight_bytes,
                           self.arena_bytes, self.n_tasks, self.input_bytes, self.output_bytes)


def decode_header(blob: bytes, where: str = "Program", hw_hash: str | None = None) -> Header:
    """Parse and check a Program header; ``hw_hash`` (hex) must match when given."""
    if len(blob) < RECORD_BYTES:
        raise UsageError(f"{where}: {len(blob)} bytes is too short for a Program header")
    magic, version, digest, *rest = struct.unpack("<2I32s6I", blob[:RECORD_BYTES])
    if magic != MAGIC:
        raise UsageError(f"{where} is not an m3vit Program (bad magic)")
    if version != VERSION:
        raise UsageError(f"{where} has Program format version {version}; this build reads version {VERSION}")
    h = Header(digest, *rest)
    if hw_hash is not None and digest.hex() != hw_hash:
        raise UsageError(f"{where} was compiled for another hardware configuration (hash {digest.hex()[:12]}, "
                         f"this one is {hw_hash[:12]}); recompile it with this hw.json")
    if len(blob) < RECORD_BYTES * (1 + h.n_instr):
        raise UsageError(f"{where} is truncated: the header announces {h.n_instr} instructions")
    return h


def decode_program(blob: bytes, where: str = "Program", hw_hash: str | None = None) -> tuple[Header, list[Instr]]:
    h = decode_header(blob, where, hw_hash)
    instrs = [decode_instr(blob[RECORD_BYTES * (1 + i):RECORD_BYTES * (2 + i)]) for i in range(h.n_instr)]
    return h, instrs


def c_constants() -> list[tuple[str, int, str]]:
    """(NAME, value, comment) of every encoding constant, for the generated C++ and SV headers."""
    out = [("MAGIC", MAGIC, "Program magic, b\"M3VP\""), ("VERSION", VERSION, "Program format version"),
           ("WORDS", WORDS, "32-bit words per header and per instruction"), ("ALIGN", ALIGN, "byte alignment"),
           ("OFFSET_BITS", OFFSET_BITS, "byte-offset bits of a ref")]
    out += [(f"SPACE_{k.upper()}", v, "address space") for k, v in SPACES.items()]
    out += [(f"OP_{k.upper()}", v, "opcode") for k, v in OPCODES.items()]
    out += [(f"FLAG_{k.upper()}", v, "flag bit (after the 8-bit opcode)") for k, v in FLAGS.items()]
    out += [("XMODE_SHIFT", XMODE_SHIFT, "flag position of the 2-bit x row mode"),
            ("YMODE_SHIFT", YMODE_SHIFT, "flag position of the 2-bit y row mode")]
    out += [(f"XMODE_{k.upper()}", v, "x row mode") for k, v in XMODES.items()]
    out += [(f"YMODE_{k.upper()}", v, "y row mode") for k, v in YMODES.items()]
    out += [(f"STATUS_{k.upper()}", v, "status code") for k, v in STATUS.items()]
    for op, names in FIELDS.items():
        out += [(f"F_{op.upper()}_{n.upper()}", 1 + i, f"word of {op}.{n}") for i, n in enumerate(names)]
        out += [(f"F_{op.upper()}_{a.upper()}", 1 + names.index(w), f"word of {op}.{a} (alias of {w}, flag residual)")
                for a, w in ALIASES.get(op, {}).items()]
    return out


def encoding_digest() -> str:
    """A digest of the encoding, carried in generated headers so a stale one is recognisable."""
    return hashlib.sha256(repr(c_constants()).encode()).hexdigest()[:16]
