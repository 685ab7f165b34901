#!/usr/bin/env python3
"""Writes the small, committed test fixtures for dequantization and the GGUF reader.

Run from the repository root with the pinned packages (requirements.txt):

    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
    .venv/bin/python scripts/gen_quant_fixtures.py

Outputs (deterministic: fixed seeds, fixed metadata order):

  tests/fixtures/quant/quant.gguf           one tensor per ggml type, named after the type
  tests/fixtures/quant/quant_expected.gguf  `<name>.expected`: the same tensors as F32, dequantized
                                            independently of pare: by gguf.quants.dequantize, and for
                                            Q1_0 (which gguf 0.17.1 does not know) by q1_0_dequantize
                                            below
  tests/fixtures/gguf/meta.gguf             every metadata value type, nested arrays, alignment 64,
                                            a few tensors with known contents (for tests/gguf_reader.rs)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

ROOT = Path(__file__).resolve().parent.parent
QUANT_DIR = ROOT / "tests" / "fixtures" / "quant"
GGUF_DIR = ROOT / "tests" / "fixtures" / "gguf"

Q1_0_ID = 41  # Bonsai's 1-bit format; not in gguf 0.17.1's GGMLQuantizationType
Q1_0_BLOCK = 128
Q1_0_BYTES = 18

F16_MAX = 65504.0
F16_MIN_SUBNORMAL = 2.0**-24


def f16_bytes(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float16).view(np.uint8)


# ---------------------------------------------------------------- inputs


def float_rows(rng: np.random.Generator, n_rows: int, n_cols: int, block: int) -> np.ndarray:
    """Rows of weights covering the edge cases a quantizer meets, block by block:
    block 0 all zero, block 1 all negative, block 2 huge (scale near f16's maximum), block 3 tiny
    (subnormal f16 scale), block 4 a single non-zero value, then ordinary Gaussian weights."""
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    flat = x.reshape(-1, block)
    flat[0] = 0.0
    flat[1] = -np.abs(flat[1]) - 0.1
    flat[2] *= 3000.0  # max |x| ~ 1e4: d = max/8 or max/16 or max/127 stays a finite f16
    flat[3] *= 1e-6
    flat[4] = 0.0
    flat[4, 3] = -2.5
    return x


def random_blocks(rng: np.random.Generator, n_blocks: int, type_size: int, scale_offsets) -> np.ndarray:
    """Random block bytes with sane f16 scales at `scale_offsets` (byte offsets in the block); the
    first block is all zero and the next two have extreme scales (f16 max and smallest subnormal,
    negative for the second), to cover what a quantizer would rarely produce."""
    b = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in scale_offsets:
        s = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        b[:, off : off + 2] = s.view(np.uint8).reshape(n_blocks, 2)
    b[0] = 0
    for off in scale_offsets:
        b[1, off : off + 2] = f16_bytes([F16_MAX])
        b[2, off : off + 2] = f16_bytes([-F16_MIN_SUBNORMAL])
    return b


# ---------------------------------------------------------------- Q1_0 (not in gguf 0.17.1)


def q1_0_quantize(x: np.ndarray) -> np.ndarray:
    """Sign bits (1 = non-negative, LSB first) with d = mean |x| per block of 128, as f16."""
    blocks = x.reshape(-1, Q1_0_BLOCK)
    d = np.abs(blocks).mean(axis=1).astype(np.float16)
    bits = np.packbits((blocks >= 0).astype(np.uint8), axis=1, bitorder="little")
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), bits], axis=1)


def q1_0_dequantize(blocks: np.ndarray) -> np.ndarray:
    """The reference: d * (+1 if bit else -1), bits LSB first within each byte."""
    blocks = blocks.reshape(-1, Q1_0_BYTES)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # (n, 1)
    bits = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little").astype(np.float32)
    return np.where(bits == 1, d, -d).astype(np.float32)


# ---------------------------------------------------------------- quant fixtures


def quant_tensors(rng: np.random.Generator):
    """Yields (name, ggml type id, numpy shape, block bytes as uint8 (n_blocks, type_size), expected f32)."""

    # Plain float types.
    special = np.array(
        [0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, F16_MAX, -F16_MAX, F16_MIN_SUBNORMAL, 1e-40, 3.0e38, -7.5],
        dtype=np.float32,
    )

    x = rng.standard_normal((3, 32)).astype(np.float32)
    x.reshape(-1)[: special.size] = special
    yield "F32", T.F32, x.shape, x.view(np.uint8).reshape(-1, 4), x.copy()

    x = rng.standard_normal(256).astype(np.float32)  # 1-D
    x[: special.size] = special
    with np.errstate(over="ignore"):  # 3e38 becomes inf in f16, on purpose
        h = x.astype(np.float16)
    h[special.size] = np.float16(np.nan)
    yield "F16", T.F16, h.shape, h.view(np.uint8).reshape(-1, 2), gguf.quants.dequantize(h.view(np.uint8), T.F16)

    x = rng.standard_normal((2, 64)).astype(np.float32)
    x.reshape(-1)[: special.size] = special
    q = gguf.quants.quantize(x, T.BF16)
    yield "BF16", T.BF16, x.shape, q.reshape(-1, 2), gguf.quants.dequantize(q, T.BF16)

    # Legacy block types: one tensor quantized from edge-case floats by gguf's own quantizer, one of
    # random block bytes. Q8_0 gets a 3-D shape to check that whole tensors come out in ggml order.
    legacy = [
        (T.Q4_0, [0]),
        (T.Q4_1, [0, 2]),
        (T.Q5_0, [0]),
        (T.Q5_1, [0, 2]),
        (T.Q8_0, [0]),
    ]
    for ty, scales in legacy:
        bs, ts = gguf.GGML_QUANT_SIZES[ty]
        shape = (2, 3, 64) if ty == T.Q8_0 else (4, 256)
        x = float_rows(rng, int(np.prod(shape[:-1])), shape[-1], bs).reshape(shape)
        q = gguf.quants.quantize(x, ty)
        yield ty.name, ty, shape, q.reshape(-1, ts), gguf.quants.dequantize(q, ty).reshape(shape)

        shape = (3, 128)
        b = random_blocks(rng, 3 * 128 // bs, ts, scales)
        q = b.reshape(3, -1)
        yield ty.name + ".random", ty, shape, b, gguf.quants.dequantize(q, ty).reshape(shape)

    # k-quants: gguf 0.17.1 cannot quantize them, so random block bytes with sane scales.
    k_scales = {
        T.Q2_K: [80, 82],  # scales[16] qs[64] d dmin
        T.Q3_K: [108],  # hmask[32] qs[64] scales[12] d
        T.Q4_K: [0, 2],  # d dmin scales[12] qs[128]
        T.Q5_K: [0, 2],  # d dmin scales[12] qh[32] qs[128]
        T.Q6_K: [208],  # ql[128] qh[64] scales[16] d
    }
    for ty, scales in k_scales.items():
        bs, ts = gguf.GGML_QUANT_SIZES[ty]
        shape = (4, 512)
        b = random_blocks(rng, 4 * 512 // bs, ts, scales)
        q = b.reshape(4, -1)
        yield ty.name, ty, shape, b, gguf.quants.dequantize(q, ty).reshape(shape)

    # Q1_0: quantized from edge-case floats by the numpy quantizer above, plus random bytes.
    shape = (4, 256)
    x = float_rows(rng, 4, 256, Q1_0_BLOCK)
    b = q1_0_quantize(x)
    b[1, :2] = f16_bytes([-3.25])  # a negative scale flips every sign
    b[2, :2] = f16_bytes([F16_MAX])
    yield "Q1_0", Q1_0_ID, shape, b, q1_0_dequantize(b).reshape(shape)

    shape = (2, 384)
    b = random_blocks(rng, 2 * 384 // Q1_0_BLOCK, Q1_0_BYTES, [0])
    yield "Q1_0.random", Q1_0_ID, shape, b, q1_0_dequantize(b).reshape(shape)


def add_raw(w: gguf.GGUFWriter, name: str, type_id: int, shape, blocks: np.ndarray) -> None:
    """Adds block bytes as a tensor of `shape` (numpy order: last dimension is the row).

    The bytes are passed as int8 so that GGUFWriter takes `shape` as given instead of converting a
    byte shape through its type table, which lacks Q1_0."""
    data = np.ascontiguousarray(blocks).reshape(-1).view(np.int8)
    w.add_tensor(name, data, raw_shape=list(shape), raw_dtype=type_id)


def write(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gen_quant() -> None:
    rng = np.random.default_rng(20240607)
    QUANT_DIR.mkdir(parents=True, exist_ok=True)
    wq = gguf.GGUFWriter(QUANT_DIR / "quant.gguf", "pare-test")
    we = gguf.GGUFWriter(QUANT_DIR / "quant_expected.gguf", "pare-test")
    for name, ty, shape, blocks, expected in quant_tensors(rng):
        bs, ts = (Q1_0_BLOCK, Q1_0_BYTES) if ty == Q1_0_ID else gguf.GGML_QUANT_SIZES[ty]
        n = int(np.prod(shape))
        assert blocks.shape == (n // bs, ts), (name, blocks.shape)
        expected = np.asarray(expected, dtype=np.float32).reshape(shape)
        add_raw(wq, name, int(ty), shape, blocks)
        we.add_tensor(name + ".expected", np.ascontiguousarray(expected))
    write(wq)
    write(we)


# ---------------------------------------------------------------- reader fixture


def gen_meta() -> None:
    """Every metadata value type, nested arrays, alignment 64, tensors with known contents.
    tests/gguf_reader.rs checks these exact values; change both together."""
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(GGUF_DIR / "meta.gguf", "pare-test")
    w.add_custom_alignment(64)
    w.add_key_value("t.u8", 200, V.UINT8)
    w.add_key_value("t.i8", -100, V.INT8)
    w.add_key_value("t.u16", 60000, V.UINT16)
    w.add_key_value("t.i16", -30000, V.INT16)
    w.add_key_value("t.u32", 4000000000, V.UINT32)
    w.add_key_value("t.i32", -2000000000, V.INT32)
    w.add_key_value("t.f32", 1.5, V.FLOAT32)
    w.add_key_value("t.bool_true", True, V.BOOL)
    w.add_key_value("t.bool_false", False, V.BOOL)
    w.add_key_value("t.string", "héllo, wörld", V.STRING)
    w.add_key_value("t.empty_string", "", V.STRING)
    w.add_key_value("t.u64", 18000000000000000000, V.UINT64)
    w.add_key_value("t.i64", -9000000000000000000, V.INT64)
    w.add_key_value("t.f64", -2.25e300, V.FLOAT64)
    w.add_key_value("t.arr_u8", [1, 2, 255], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("t.arr_i16", [-1, 2, -3], V.ARRAY, sub_type=V.INT16)
    w.add_key_value("t.arr_f32", [0.5, -1.0], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("t.arr_u64", [0, 2**64 - 1], V.ARRAY, sub_type=V.UINT64)
    w.add_key_value("t.arr_f64", [3.0, -0.125], V.ARRAY, sub_type=V.FLOAT64)
    w.add_key_value("t.arr_bool", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("t.arr_str", ["a", "", "ccc"], V.ARRAY, sub_type=V.STRING)
    # Nested: the inner arrays' element types are inferred by GGUFWriter (str -> STRING, int -> INT32).
    w.add_key_value("t.arr_arr_str", [["x", "yy"], ["zzz"]], V.ARRAY, sub_type=V.ARRAY)
    w.add_key_value("t.arr_arr_int", [[1, -2, 3], [4]], V.ARRAY, sub_type=V.ARRAY)
    w.add_key_value("t.arr_arr_mixed", [["s"], [7, 8]], V.ARRAY, sub_type=V.ARRAY)

    # Tensors: sizes that are not multiples of 64, so each offset is padded.
    a = np.arange(15, dtype=np.float32).reshape(3, 5)  # 60 bytes -> next at 64
    w.add_tensor("a", a)
    b = (np.arange(2 * 3 * 4, dtype=np.float32) - 10).astype(np.float16).reshape(2, 3, 4)  # 48 bytes -> 128
    w.add_tensor("b", b)
    c = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    q = gguf.quants.quantize(c, T.Q8_0)  # 2 blocks, 68 bytes -> 256
    w.add_tensor("c", q, raw_dtype=T.Q8_0)
    d = np.arange(4, dtype=np.float32).reshape(1, 1, 2, 2)  # 4-D, 16 bytes
    w.add_tensor("d", d)
    write(w)


def main() -> int:
    os.chdir(ROOT)
    gen_quant()
    gen_meta()
    for p in sorted(QUANT_DIR.glob("*.gguf")) + sorted(GGUF_DIR.glob("*.gguf")):
        print(f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
