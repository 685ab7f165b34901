#!/usr/bin/env python3
"""Write a small random GGUF model (llama or qwen3 architecture) for tests.

  make_synthetic_model.py OUT.gguf --arch qwen3|llama [--seed S] [--type f32|f16|q8_0]
                          [--layers N]

Shape (defaults): 2 layers, hidden 64, 4 heads, 2 KV heads, head_dim 16, FFN 128,
vocab 256, context 256. Tensor names, metadata keys and dims follow llama.cpp, so
llama.cpp loads the file (checked with llama-perplexity / llama-completion).

  llama: tied embeddings (no output.weight), rope freq base 10000, rope NORM mode.
  qwen3: separate output.weight, blk.N.attn_q_norm / attn_k_norm (length head_dim),
         attention.key_length / value_length written explicitly, rope freq base 1e6.

Tokenizer: tokenizer.ggml.model = "gpt2", pre = "default", 256 tokens that are the
GPT-2 byte-level alphabet in GPT-2's own id order (the order of bytes_to_unicode():
'!'..'~', '¡'..'¬', '®'..'ÿ', then the remaining bytes mapped to U+0100..), an empty
merges list (so text tokenizes to one token per byte), token_type all 1 (normal).
There is no room for special tokens, so BOS = EOS = the token of byte 0x00 ('Ā',
id 188), which never occurs in ordinary text; add_bos_token = true.

Weights: numpy default_rng(seed); norms 1 + N(0, 0.1); projections N(0, 1/sqrt(in));
embeddings / output N(0, 0.35) (logits of a few units). --type sets the format of
every 2-D weight (f32, f16 or q8_0, quantized with gguf.quants); 1-D norm weights are
always f32, as llama.cpp's converters write them. Same arguments -> same bytes.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT


def bytes_to_unicode() -> list[tuple[int, str]]:
    """GPT-2's byte -> printable unicode map, in GPT-2 vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [(b, chr(c)) for b, c in zip(bs, cs)]


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty typed array (gguf 0.17.1 refuses to),
    needed for the empty `tokenizer.ggml.merges` that llama.cpp requires to exist."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == VT.ARRAY and isinstance(val, (list, tuple)) and len(val) == 0 and sub_type is not None:
            out = bytearray()
            if add_vtype:
                out += self._pack("I", vtype)
            out += self._pack("I", sub_type)
            out += self._pack("Q", 0)
            return out
        return super()._pack_val(val, vtype, add_vtype, sub_type)


TYPES = {"f32": QT.F32, "f16": QT.F16, "q8_0": QT.Q8_0}
FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0


def build(out: str, arch: str, seed: int, wtype: str, n_layer: int) -> None:
    n_embd, n_head, n_head_kv, head_dim, n_ff, n_vocab, n_ctx = 64, 4, 2, 16, 128, 256, 256
    rope_base = 1e6 if arch == "qwen3" else 10000.0
    eps = 1e-6 if arch == "qwen3" else 1e-5
    rng = np.random.default_rng(seed)
    qt = TYPES[wtype]

    tmp = out + ".tmp"
    w = _Writer(tmp, arch)
    w.add_name(f"pare-synthetic-{arch}")
    w.add_type("model")
    w.add_file_type(FILE_TYPE[wtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(eps)
    w.add_rope_freq_base(rope_base)
    w.add_vocab_size(n_vocab)
    if arch == "qwen3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    else:
        w.add_rope_dimension_count(head_dim)

    alphabet = bytes_to_unicode()
    tokens = [c for _, c in alphabet]
    bos = next(i for i, (b, _) in enumerate(alphabet) if b == 0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * n_vocab)
    w.add_key_value(gguf.Keys.Tokenizer.MERGES, [], VT.ARRAY, sub_type=VT.STRING)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(bos)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)

    def mat(name: str, rows: int, cols: int, std: float) -> None:
        a = rng.normal(0.0, std, size=(rows, cols)).astype(np.float32)
        if qt == QT.F32:
            w.add_tensor(name, a)
        elif qt == QT.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            q = gguf.quants.quantize(a, qt)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qt)

    def vec(name: str, n: int) -> None:
        w.add_tensor(name, (1.0 + rng.normal(0.0, 0.1, size=n)).astype(np.float32))

    mat("token_embd.weight", n_vocab, n_embd, 0.35)
    vec("output_norm.weight", n_embd)
    if arch == "qwen3":
        mat("output.weight", n_vocab, n_embd, 0.35)
    for i in range(n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", n_embd)
        mat(p + "attn_q.weight", n_head * head_dim, n_embd, n_embd ** -0.5)
        mat(p + "attn_k.weight", n_head_kv * head_dim, n_embd, n_embd ** -0.5)
        mat(p + "attn_v.weight", n_head_kv * head_dim, n_embd, n_embd ** -0.5)
        if arch == "qwen3":
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
        mat(p + "attn_output.weight", n_embd, n_head * head_dim, (n_head * head_dim) ** -0.5)
        vec(p + "ffn_norm.weight", n_embd)
        mat(p + "ffn_gate.weight", n_ff, n_embd, n_embd ** -0.5)
        mat(p + "ffn_up.weight", n_ff, n_embd, n_embd ** -0.5)
        mat(p + "ffn_down.weight", n_embd, n_ff, n_ff ** -0.5)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--arch", choices=("qwen3", "llama"), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--type", choices=sorted(TYPES), default="f32", help="format of 2-D weights")
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.layers < 1:
        ap.error("--layers must be >= 1")
    build(args.out, args.arch, args.seed, args.type, args.layers)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
