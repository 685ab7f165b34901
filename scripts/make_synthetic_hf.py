#!/usr/bin/env python3
"""Write a small random Hugging Face checkpoint directory (Qwen3 or Llama) for tests.

  make_synthetic_hf.py OUT_DIR --arch qwen3|llama [--seed S] [--dtype f32|f16|bf16]
                       [--shards N] [--layers N]

Files, as transformers writes them:
  config.json            Qwen3ForCausalLM / LlamaForCausalLM, GQA (4 heads, 2 KV heads)
  model.safetensors      or, with --shards N > 1, model-0000i-of-0000N.safetensors plus
  model.safetensors.index.json (weight_map), tensors split across the shards in order
  tokenizer.json         byte-level BPE: the 256 GPT-2 byte tokens (GPT-2 order), no merges,
                         then 3 special tokens <|endoftext|> <|im_start|> <|im_end|> (256..258)
  tokenizer_config.json  eos <|im_end|>, no BOS added, a ChatML chat template

Shapes: hidden 64, FFN 128, vocab 259, context 256, and
  qwen3: head_dim 24 (so heads * head_dim = 96 != hidden), q_norm/k_norm, rope_theta 1e6,
         separate lm_head (tie_word_embeddings false)
  llama: head_dim 16, rope_theta 10000, tied embeddings (no lm_head)
Weights come from numpy's default_rng(seed): norms 1 + N(0, 0.1), projections N(0, 1/sqrt(in)),
embeddings / lm_head N(0, 0.35). They are stored as Hugging Face stores them: Llama's q/k rows in
split-halves order (unpermuted), [out, in] per Linear. bf16 is rounded to nearest even from f32.

The safetensors files are written with the `safetensors` package's serialize_file (numpy holds no
bf16, so data goes in as raw little-endian bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
from safetensors import serialize_file


def bytes_to_unicode():
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


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] "
                 "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def to_bytes(a: np.ndarray, dtype: str) -> bytes:
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    # bf16: the top 16 bits of the f32, rounded to nearest even.
    u = a.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    return r.tobytes()


def build(out: str, arch: str, seed: int, dtype: str, n_shards: int, n_layer: int) -> None:
    n_embd, n_head, n_head_kv, n_ff, n_ctx = 64, 4, 2, 128, 256
    head_dim = 24 if arch == "qwen3" else 16
    n_vocab = 256 + len(SPECIALS)
    tied = arch == "llama"
    rng = np.random.default_rng(seed)

    tensors: list[tuple[str, np.ndarray]] = []

    def mat(name, rows, cols, std):
        tensors.append((name, rng.normal(0.0, std, size=(rows, cols)).astype(np.float32)))

    def vec(name, n):
        tensors.append((name, (1.0 + rng.normal(0.0, 0.1, size=n)).astype(np.float32)))

    mat("model.embed_tokens.weight", n_vocab, n_embd, 0.35)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        vec(p + "input_layernorm.weight", n_embd)
        mat(p + "self_attn.q_proj.weight", n_head * head_dim, n_embd, n_embd ** -0.5)
        mat(p + "self_attn.k_proj.weight", n_head_kv * head_dim, n_embd, n_embd ** -0.5)
        mat(p + "self_attn.v_proj.weight", n_head_kv * head_dim, n_embd, n_embd ** -0.5)
        if arch == "qwen3":
            vec(p + "self_attn.q_norm.weight", head_dim)
            vec(p + "self_attn.k_norm.weight", head_dim)
        mat(p + "self_attn.o_proj.weight", n_embd, n_head * head_dim, (n_head * head_dim) ** -0.5)
        vec(p + "post_attention_layernorm.weight", n_embd)
        mat(p + "mlp.gate_proj.weight", n_ff, n_embd, n_embd ** -0.5)
        mat(p + "mlp.up_proj.weight", n_ff, n_embd, n_embd ** -0.5)
        mat(p + "mlp.down_proj.weight", n_embd, n_ff, n_ff ** -0.5)
    vec("model.norm.weight", n_embd)
    if not tied:
        mat("lm_head.weight", n_vocab, n_embd, 0.35)

    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    st_dtype = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
    per = -(-len(tensors) // n_shards)
    weight_map = {}
    total = 0
    for s in range(n_shards):
        part = tensors[s * per:(s + 1) * per]
        fname = "model.safetensors" if n_shards == 1 else \
            f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        d = {}
        for name, a in part:
            data = to_bytes(a, st_dtype)
            total += len(data)
            d[name] = {"dtype": {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[st_dtype], "shape": list(a.shape), "data": data}
            weight_map[name] = fname
        serialize_file(d, os.path.join(tmp, fname), metadata={"format": "pt"})
    if n_shards > 1:
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)

    config = {
        "architectures": ["Qwen3ForCausalLM" if arch == "qwen3" else "LlamaForCausalLM"],
        "model_type": arch,
        "hidden_size": n_embd,
        "intermediate_size": n_ff,
        "num_hidden_layers": n_layer,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_head_kv,
        "head_dim": head_dim,
        "vocab_size": n_vocab,
        "max_position_embeddings": n_ctx,
        "rms_norm_eps": 1e-6 if arch == "qwen3" else 1e-5,
        "rope_theta": 1e6 if arch == "qwen3" else 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
        "bos_token_id": 256,
        "eos_token_id": 258,
    }
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    alphabet = bytes_to_unicode()
    vocab = {c: i for i, (_, c) in enumerate(alphabet)}
    for i, t in enumerate(SPECIALS):
        vocab[t] = 256 + i
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                  "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": 256 + i, "content": t, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for i, t in enumerate(SPECIALS)
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }
    with open(os.path.join(tmp, "tokenizer.json"), "w") as f:
        json.dump(tokenizer, f, ensure_ascii=False, indent=1)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": n_ctx,
    }
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)

    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output directory")
    ap.add_argument("--arch", choices=("qwen3", "llama"), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="f32")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args(argv)
    if args.layers < 1 or args.shards < 1:
        ap.error("--layers and --shards must be >= 1")
    build(args.out, args.arch, args.seed, args.dtype, args.shards, args.layers)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
