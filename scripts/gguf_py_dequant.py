#!/usr/bin/env python3
"""Reads a GGUF file with the `gguf` Python package (independent of pare) and dumps what it sees:

    gguf_py_dequant.py FILE OUTDIR [TENSOR ...]

prints one JSON object: {"metadata": {key: value for scalar and string values},
"tensors": {name: {"type": ggml type name, "shape": ggml-order dims}}}, and writes, for each named
tensor (all when none are named), OUTDIR/NAME.f32: its values dequantized by gguf.quants.dequantize,
little-endian f32, row after row. tests/gguf_writer.rs and tests/convert.rs compare them with pare's.
"""
import json
import os
import sys

import numpy as np

import gguf
from gguf import GGUFValueType as V


def scalar(field):
    t = field.types[0] if field.types else None
    if t is None or t == V.ARRAY:
        return None
    part = field.parts[field.data[0]]
    if t == V.STRING:
        return bytes(part).decode("utf-8")
    v = part[0].item()
    return v


def main():
    path, outdir, names = sys.argv[1], sys.argv[2], set(sys.argv[3:])
    r = gguf.GGUFReader(path)
    meta = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        v = scalar(field)
        if v is not None:
            meta[name] = v
    tensors = {}
    os.makedirs(outdir, exist_ok=True)
    for t in r.tensors:
        shape = [int(d) for d in t.shape]
        tensors[t.name] = {"type": t.tensor_type.name, "shape": shape}
        if names and t.name not in names:
            continue
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype("<f4")
        x.tofile(os.path.join(outdir, t.name + ".f32"))
    print(json.dumps({"metadata": meta, "tensors": tensors}))


if __name__ == "__main__":
    main()
