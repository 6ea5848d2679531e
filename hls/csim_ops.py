"""C-simulation of single HLS library ops: build the op driver once, feed it arrays through files.

    drv = OpDriver(cfg)                      # cfg: a dict of emit_tables.CONFIG_KEYS
    out = drv.run("gemm", dict(rows=3, ...), x=..., w=..., bias=..., shift=...)
    out["y"], out["sat"]

`hls/tb/op_driver.cpp` dispatches on the op name. The build compiles it with g++ against the
header library (`hls/include`), the generated `m3v_tables.h` / `m3v_config.h` and the Xilinx
ap_types headers that ship inside the hls4ml wheel (used in place, never copied), and is cached
per source hash (driver, headers, generated headers, flags, compiler version) under
`build/hls_ops/`. Requests and responses are binary files of little-endian int64 (the layout is
documented at the top of op_driver.cpp).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from m3vit.errors import M3ViTError
from m3vit.hls import emit_tables

__all__ = ["CXX_FLAGS", "DEFAULT_BUILD_ROOT", "ap_types_dir", "build_driver", "OpDriver", "OpError"]

HLS_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = HLS_DIR / "include"
DRIVER_SRC = HLS_DIR / "tb" / "op_driver.cpp"
DEFAULT_BUILD_ROOT = Path("build/hls_ops")
CXX = os.environ.get("CXX", "g++")
CXX_FLAGS = ("-std=c++17", "-O2", "-Wall", "-Werror", "-Wno-uninitialized", "-Wno-maybe-uninitialized")


class OpError(M3ViTError):
    """The driver failed to build, or rejected or failed a request."""


def ap_types_dir() -> Path:
    """The Xilinx ap_types headers inside the installed hls4ml wheel (found without importing it)."""
    spec = importlib.util.find_spec("hls4ml")
    if spec is None or not spec.submodule_search_locations:
        raise OpError("hls4ml is not installed: its wheel provides the ap_types headers (pip install hls4ml)")
    d = Path(next(iter(spec.submodule_search_locations))) / "templates" / "vivado" / "ap_types"
    if not (d / "ap_int.h").is_file():
        raise OpError(f"no ap_int.h in {d}")
    return d


def _compiler_version() -> str:
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError) as exc:
        raise OpError(f"C++ compiler '{CXX}' is not usable: {exc}") from None


def build_driver(cfg: Mapping, build_root: str | Path | None = None, force: bool = False) -> Path:
    """Emit the generated headers for cfg and compile the op driver (cached); return the binary."""
    root = Path(build_root) if build_root is not None else DEFAULT_BUILD_ROOT
    tables = emit_tables.render_tables()
    config = emit_tables.render_config(cfg)
    h = hashlib.sha256()
    for part in (tables, config, DRIVER_SRC.read_text(), _compiler_version(), " ".join(CXX_FLAGS)):
        h.update(part.encode())
        h.update(b"\0")
    for p in sorted(INCLUDE_DIR.glob("*.h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    digest = h.hexdigest()[:16]
    bdir = (root / f"op_driver-{digest}").resolve()
    exe = bdir / "op_driver"
    if exe.is_file() and not force:
        return exe
    gen = bdir / "include"
    emit_tables.emit(gen, cfg)
    bdir.mkdir(parents=True, exist_ok=True)
    tmp = bdir / f"op_driver.tmp{os.getpid()}"
    cmd = [CXX, *CXX_FLAGS, "-isystem", str(ap_types_dir()), "-I", str(INCLUDE_DIR), "-I", str(gen),
           str(DRIVER_SRC), "-o", str(tmp)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    (bdir / "build.log").write_text(" ".join(cmd) + "\n" + res.stdout + res.stderr +
                                    f"\nreturn code {res.returncode}, {time.monotonic() - t0:.1f} s\n")
    if res.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-40:])
        raise OpError(f"op driver build failed (log: {bdir / 'build.log'}):\n{tail}")
    tmp.replace(exe)  # atomic: concurrent builders of the same hash end with one good binary
    return exe


# ---------------------------------------------------------------------------- wire format


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<q", len(b)) + b


def _arr(a) -> bytes:
    a = np.ascontiguousarray(np.asarray(a).reshape(-1))
    if a.dtype.kind not in "iub":
        raise TypeError(f"integer array expected, got {a.dtype}")
    if a.dtype == np.uint64 and a.size and int(a.max()) >= 1 << 63:
        raise ValueError("uint64 values beyond int64")
    return struct.pack("<q", a.size) + a.astype("<i8").tobytes()


def _pack(calls: Sequence[tuple[str, Mapping, Mapping]]) -> bytes:
    out = [struct.pack("<q", len(calls))]
    for op, params, arrays in calls:
        out.append(_str(op))
        out.append(struct.pack("<q", len(params)))
        for k, v in params.items():
            out.append(_str(k) + struct.pack("<q", int(v)))
        out.append(struct.pack("<q", len(arrays)))
        for k, v in arrays.items():
            out.append(_str(k) + _arr(v))
    return b"".join(out)


def _unpack(data: bytes, n: int) -> list[dict[str, np.ndarray]]:
    pos = 0

    def i64():
        nonlocal pos
        (v,) = struct.unpack_from("<q", data, pos)
        pos += 8
        return v

    res = []
    for _ in range(n):
        d = {}
        for _ in range(i64()):
            ln = i64()
            name = data[pos:pos + ln].decode()
            pos += ln
            ln = i64()
            d[name] = np.frombuffer(data, "<i8", ln, pos).astype(np.int64)
            pos += 8 * ln
        res.append(d)
    if pos != len(data):
        raise OpError(f"response has {len(data) - pos} trailing bytes")
    return res


class OpDriver:
    """A built op driver for one hardware config; `run` executes one op, `run_many` a batch."""

    def __init__(self, cfg: Mapping, build_root: str | Path | None = None):
        self.cfg = emit_tables.normalise_config(cfg)
        t0 = time.monotonic()
        self.exe = build_driver(self.cfg, build_root)
        self.build_seconds = time.monotonic() - t0
        self.calls = 0

    def run_many(self, calls: Sequence[tuple[str, Mapping, Mapping]]) -> list[dict[str, np.ndarray]]:
        with tempfile.TemporaryDirectory(prefix="m3v_ops_") as td:
            req, rsp = Path(td) / "req.bin", Path(td) / "rsp.bin"
            req.write_bytes(_pack(calls))
            res = subprocess.run([str(self.exe), str(req), str(rsp)], capture_output=True, text=True)
            if res.returncode != 0:
                raise OpError(f"op driver failed ({res.returncode}): {res.stderr.strip()}")
            self.calls += len(calls)
            return _unpack(rsp.read_bytes(), len(calls))

    def run(self, op: str, params: Mapping | None = None, **arrays) -> dict[str, np.ndarray]:
        return self.run_many([(op, dict(params or {}), arrays)])[0]

