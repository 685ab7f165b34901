#!/usr/bin/env python3
"""Independent reference forward pass for GGUF decoder models and Hugging Face checkpoint
directories, in plain numpy.

Reads a GGUF file with the `gguf` package, dequantizes every weight once with
`gguf.quants.dequantize` (which reproduces ggml's dequantization exactly in
float32), widens the weights to float64 and runs the whole forward pass in
float64 (activations, matmuls, softmax, norms). The result is the logits of the
*exact* dequantized model, free of the activation quantization (Q8_0/Q8_1) and
f16/f32 rounding that llama.cpp's kernels add; it is meant as a trustworthy
yardstick for pare's forward pass.

Supported architectures (configured from `general.architecture` and the
`{arch}.*` metadata keys, exactly as llama.cpp names them):

  llama  RMSNorm -> Q/K/V -> RoPE "normal" mode (LLAMA_ROPE_TYPE_NORM: rotate
         adjacent pairs (x[2i], x[2i+1]); llama.cpp's converter permutes the
         HF Q/K rows so this is correct for GGUF files) -> causal GQA softmax
         attention -> output proj -> residual -> RMSNorm -> SwiGLU FFN ->
         residual; final output_norm; lm head = output.weight or, when absent,
         token_embd.weight (tied).
  qwen3  same, plus per-head RMSNorm on Q and K (attn_q_norm / attn_k_norm,
         weight of length head_dim, same eps) applied before RoPE, and RoPE in
         NEOX mode (LLAMA_ROPE_TYPE_NEOX: rotate (x[i], x[i + n_rot/2])).

Both facts (rope type per arch, q/k norm before rope) were checked against
llama.cpp's `llama_model_rope_type` (src/llama-model.cpp) and
src/models/{llama,qwen3}.cpp in the llama.cpp vendored by llama-cpp-python 0.3.36.

A Hugging Face checkpoint directory (config.json + model.safetensors or shards named by
model.safetensors.index.json; dtypes F32/F16/BF16, parsed here from the raw safetensors layout,
not through pare's reader) is configured from config.json as transformers does. Its Llama q/k
rows are in split-halves order; this reference permutes them exactly as llama.cpp's converter
(convert_hf_to_gguf.py `LlamaModel.permute`) and then uses the adjacent-pair RoPE above, so it
checks pare's claim that NEOX RoPE on the unpermuted rows is the same model.

CLI:
  reference_forward.py MODEL --tokens 1,2,3 [--tokens 4,5 ...] [--out FILE.json] [--top K]

Output JSON: {"model": path, "arch": ..., "n_vocab": V, "precision": "float64",
              "cases": [{"tokens": [...], "logits": [[V floats] per position]}]}
Logits are written as the float32 rounding of the float64 result, in numpy's
shortest round-tripping float32 representation (parse as f32 to get the exact
value back).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import gguf
from gguf.quants import dequantize


SUPPORTED_ARCHS = ("llama", "qwen3")
ROPE_NORM = "norm"   # LLAMA_ROPE_TYPE_NORM: adjacent pairs
ROPE_NEOX = "neox"   # LLAMA_ROPE_TYPE_NEOX: halves
ROPE_TYPE = {"llama": ROPE_NORM, "qwen3": ROPE_NEOX}


def _field(reader: gguf.GGUFReader, key: str, default=None, required: bool = False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise KeyError(f"GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


class Model:
    """A GGUF model dequantized to float64, with its configuration."""

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path):
            self._init_hf(path)
            return
        r = gguf.GGUFReader(path)
        self.reader = r
        arch = _field(r, "general.architecture", required=True)
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"unsupported architecture {arch!r} (supported: {SUPPORTED_ARCHS})")
        self.arch = arch
        k = lambda name, default=None, required=True: _field(r, f"{arch}.{name}", default, required and default is None)
        self.n_layer = int(k("block_count"))
        self.n_embd = int(k("embedding_length"))
        self.n_ff = int(k("feed_forward_length"))
        self.n_head = int(k("attention.head_count"))
        self.n_head_kv = int(k("attention.head_count_kv", self.n_head))
        self.head_dim_k = int(k("attention.key_length", self.n_embd // self.n_head))
        self.head_dim_v = int(k("attention.value_length", self.head_dim_k))
        self.eps = float(k("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(k("rope.freq_base", 10000.0))
        self.n_rot = int(k("rope.dimension_count", self.head_dim_k))
        self.n_ctx_train = int(k("context_length", 0))
        attn_scale = float(k("attention.scale", 0.0))
        self.kq_scale = attn_scale if attn_scale != 0.0 else 1.0 / np.sqrt(self.head_dim_k)
        self.rope_type = ROPE_TYPE[arch]
        if self.n_head % self.n_head_kv != 0:
            raise ValueError(f"head_count {self.n_head} not a multiple of head_count_kv {self.n_head_kv}")
        # llama.cpp asserts these for both llama and qwen3
        if self.head_dim_k != self.head_dim_v or self.n_rot != self.head_dim_k:
            raise ValueError("only head_dim_k == head_dim_v == rope.dimension_count is supported "
                             f"(got {self.head_dim_k}, {self.head_dim_v}, {self.n_rot})")
        scaling = _field(r, f"{arch}.rope.scaling.type", "none")
        if scaling not in ("none", "linear") or float(_field(r, f"{arch}.rope.scaling.factor", 1.0) or 1.0) != 1.0:
            raise ValueError(f"rope scaling {scaling!r} is not supported by this reference")

        self.tokens = None
        if "tokenizer.ggml.tokens" in r.fields:
            self.tokens = r.fields["tokenizer.ggml.tokens"].contents()

        raw = {t.name: t for t in r.tensors}
        if "rope_freqs.weight" in raw:
            raise ValueError("rope_freqs.weight (llama3 rope factors) is not supported by this reference")

        def W(name: str, shape: tuple[int, ...]) -> np.ndarray:
            t = raw.get(name)
            if t is None:
                raise KeyError(f"tensor {name!r} is missing")
            a = dequantize(t.data, t.tensor_type)
            # GGUF lists dims fastest-first; numpy shape is the reverse.
            expect = tuple(int(d) for d in reversed(t.shape.tolist()))
            a = np.asarray(a, dtype=np.float32).reshape(expect)
            if a.shape != shape:
                raise ValueError(f"tensor {name}: shape {a.shape}, expected {shape}")
            return a.astype(np.float64)

        E, F, Hq, Hk = self.n_embd, self.n_ff, self.n_head, self.n_head_kv
        D = self.head_dim_k
        tok = raw["token_embd.weight"]
        self.n_vocab = int(tok.shape[1])
        self.tok_embd = W("token_embd.weight", (self.n_vocab, E))
        self.output_norm = W("output_norm.weight", (E,))
        self.tied = "output.weight" not in raw
        self.output = self.tok_embd if self.tied else W("output.weight", (self.n_vocab, E))
        self.layers = []
        for i in range(self.n_layer):
            p = f"blk.{i}."
            L = {
                "attn_norm": W(p + "attn_norm.weight", (E,)),
                "wq": W(p + "attn_q.weight", (Hq * D, E)),
                "wk": W(p + "attn_k.weight", (Hk * D, E)),
                "wv": W(p + "attn_v.weight", (Hk * D, E)),
                "wo": W(p + "attn_output.weight", (E, Hq * D)),
                "ffn_norm": W(p + "ffn_norm.weight", (E,)),
                "gate": W(p + "ffn_gate.weight", (F, E)),
                "up": W(p + "ffn_up.weight", (F, E)),
                "down": W(p + "ffn_down.weight", (E, F)),
            }
            for b in ("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"):
                if p + b in raw:
                    raise ValueError(f"tensor {p + b} (attention bias) is not supported by this reference")
            if self.arch == "qwen3":
                L["q_norm"] = W(p + "attn_q_norm.weight", (D,))
                L["k_norm"] = W(p + "attn_k_norm.weight", (D,))
            self.layers.append(L)

        # RoPE frequencies: theta_i = base^(-2i/n_rot), i in [0, n_rot/2)
        self.inv_freq = self.rope_base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)

    def _init_hf(self, path: str) -> None:
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        arch = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}[cfg["architectures"][0]]
        self.arch = arch
        self.n_layer = int(cfg["num_hidden_layers"])
        self.n_embd = int(cfg["hidden_size"])
        self.n_ff = int(cfg["intermediate_size"])
        self.n_head = int(cfg["num_attention_heads"])
        self.n_head_kv = int(cfg.get("num_key_value_heads") or self.n_head)
        self.head_dim_k = self.head_dim_v = self.n_rot = int(cfg.get("head_dim") or self.n_embd // self.n_head)
        self.eps = float(cfg["rms_norm_eps"])
        self.rope_base = float(cfg.get("rope_theta", 10000.0))
        self.n_ctx_train = int(cfg.get("max_position_embeddings", 0))
        self.kq_scale = 1.0 / np.sqrt(self.head_dim_k)
        self.rope_type = ROPE_TYPE[arch]
        self.tokens = None
        raw = _read_safetensors_dir(path)

        def W(name, shape):
            a = raw[name]
            if a.shape != shape:
                raise ValueError(f"tensor {name}: shape {a.shape}, expected {shape}")
            return a.astype(np.float64)

        def permute(w, n_head):
            # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
            return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                    .swapaxes(1, 2).reshape(w.shape))

        E, F, Hq, Hk, D = self.n_embd, self.n_ff, self.n_head, self.n_head_kv, self.head_dim_k
        self.n_vocab = int(cfg["vocab_size"])
        self.tok_embd = W("model.embed_tokens.weight", (self.n_vocab, E))
        self.output_norm = W("model.norm.weight", (E,))
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.output = self.tok_embd if self.tied else W("lm_head.weight", (self.n_vocab, E))
        self.layers = []
        for i in range(self.n_layer):
            p = f"model.layers.{i}."
            L = {
                "attn_norm": W(p + "input_layernorm.weight", (E,)),
                "wq": W(p + "self_attn.q_proj.weight", (Hq * D, E)),
                "wk": W(p + "self_attn.k_proj.weight", (Hk * D, E)),
                "wv": W(p + "self_attn.v_proj.weight", (Hk * D, E)),
                "wo": W(p + "self_attn.o_proj.weight", (E, Hq * D)),
                "ffn_norm": W(p + "post_attention_layernorm.weight", (E,)),
                "gate": W(p + "mlp.gate_proj.weight", (F, E)),
                "up": W(p + "mlp.up_proj.weight", (F, E)),
                "down": W(p + "mlp.down_proj.weight", (E, F)),
            }
            if arch == "llama":
                L["wq"] = permute(L["wq"], Hq)
                L["wk"] = permute(L["wk"], Hk)
            else:
                L["q_norm"] = W(p + "self_attn.q_norm.weight", (D,))
                L["k_norm"] = W(p + "self_attn.k_norm.weight", (D,))
            self.layers.append(L)
        self.inv_freq = self.rope_base ** (-np.arange(0, self.n_rot, 2, dtype=np.float64) / self.n_rot)

    # ---- ops -------------------------------------------------------------

    def rms_norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        """x * 1/sqrt(mean(x^2) + eps) * w over the last axis."""
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x: (T, H, D); rotate the first n_rot dims by position."""
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None, :]      # (T, n_rot/2)
        cos = np.cos(ang)[:, None, :]
        sin = np.sin(ang)[:, None, :]
        out = x.copy()
        if self.rope_type == ROPE_NORM:
            x0 = x[..., 0:self.n_rot:2]
            x1 = x[..., 1:self.n_rot:2]
            out[..., 0:self.n_rot:2] = x0 * cos - x1 * sin
            out[..., 1:self.n_rot:2] = x0 * sin + x1 * cos
        else:
            h = self.n_rot // 2
            x0 = x[..., :h]
            x1 = x[..., h:self.n_rot]
            out[..., :h] = x0 * cos - x1 * sin
            out[..., h:self.n_rot] = x0 * sin + x1 * cos
        return out

    # ---- forward ---------------------------------------------------------

    def forward(self, tokens) -> np.ndarray:
        """Logits (T, n_vocab) in float64 for a causal sequence starting at position 0."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("tokens must be a non-empty 1-D sequence")
        if tokens.min() < 0 or tokens.max() >= self.n_vocab:
            raise ValueError(f"token id out of range [0, {self.n_vocab})")
        T = len(tokens)
        Hq, Hk, D = self.n_head, self.n_head_kv, self.head_dim_k
        group = Hq // Hk
        pos = np.arange(T)
        mask = np.triu(np.full((T, T), -np.inf), k=1)                        # causal
        x = self.tok_embd[tokens]                                            # (T, E)
        for L in self.layers:
            h = self.rms_norm(x, L["attn_norm"])
            q = (h @ L["wq"].T).reshape(T, Hq, D)
            k = (h @ L["wk"].T).reshape(T, Hk, D)
            v = (h @ L["wv"].T).reshape(T, Hk, D)
            if self.arch == "qwen3":
                q = self.rms_norm(q, L["q_norm"])
                k = self.rms_norm(k, L["k_norm"])
            q = self.rope(q, pos)
            k = self.rope(k, pos)
            # GQA: query head j uses kv head j // group (ggml mul_mat broadcast)
            k = np.repeat(k, group, axis=1)                                  # (T, Hq, D)
            v = np.repeat(v, group, axis=1)
            s = np.einsum("thd,shd->hts", q, k) * self.kq_scale + mask       # (Hq, T, T)
            s = s - s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            a = np.einsum("hts,shd->thd", p, v).reshape(T, Hq * D)
            x = x + a @ L["wo"].T
            h = self.rms_norm(x, L["ffn_norm"])
            g = h @ L["gate"].T
            u = h @ L["up"].T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ L["down"].T
        x = self.rms_norm(x, self.output_norm)
        return x @ self.output.T


def _read_safetensors(path: str) -> dict:
    """Every tensor of one safetensors file as float32, from the raw layout (8-byte LE header
    length, JSON header, data)."""
    with open(path, "rb") as f:
        buf = f.read()
    n = int.from_bytes(buf[:8], "little")
    header = json.loads(buf[8:8 + n])
    data = buf[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        raw = data[s:e]
        dt = info["dtype"]
        if dt == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif dt == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif dt == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name}: dtype {dt} not supported by this reference")
        out[name] = a.reshape(info["shape"])
    return out


def _read_safetensors_dir(path: str) -> dict:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fn in files:
        out.update(_read_safetensors(os.path.join(path, fn)))
    return out


def _fmt_f32_row(row: np.ndarray) -> str:
    # str() of a numpy float32 is its shortest repr that round-trips the float32 value
    return "[" + ",".join(str(v) for v in row.astype(np.float32)) + "]"


def write_cases_json(path: str, model: Model, cases) -> None:
    import os
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("{")
        f.write(f'"model": {json.dumps(model.path)}, "arch": {json.dumps(model.arch)}, ')
        f.write(f'"n_vocab": {model.n_vocab}, "precision": "float64", "cases": [')
        for ci, (toks, logits) in enumerate(cases):
            if ci:
                f.write(", ")
            f.write('{"tokens": ' + json.dumps([int(t) for t in toks]) + ', "logits": [')
            f.write(", ".join(_fmt_f32_row(r) for r in logits))
            f.write("]}")
        f.write("]}\n")
    os.replace(tmp, path)


def _parse_tokens(s: str):
    try:
        return [int(t) for t in s.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad token list {s!r} (expected comma-separated ints)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="GGUF model file (llama or qwen3 architecture)")
    ap.add_argument("--tokens", type=_parse_tokens, action="append", required=True,
                    help="comma-separated token ids, one case per flag (repeatable)")
    ap.add_argument("--out", help="write logits JSON here")
    ap.add_argument("--top", type=int, default=0, help="print the top-K tokens per position")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model = Model(args.model)
    t1 = time.perf_counter()
    print(f"loaded {args.model}: arch={model.arch} layers={model.n_layer} embd={model.n_embd} "
          f"ff={model.n_ff} heads={model.n_head}/{model.n_head_kv} head_dim={model.head_dim_k} "
          f"vocab={model.n_vocab} eps={model.eps:g} rope_base={model.rope_base:g} rope={model.rope_type} "
          f"tied={model.tied} ({t1 - t0:.2f}s)", file=sys.stderr)
    cases = []
    for toks in args.tokens:
        logits = model.forward(toks)
        cases.append((toks, logits))
        if args.top > 0:
            print(f"tokens {toks}")
            for i, row in enumerate(logits):
                top = np.argsort(-row, kind="stable")[: args.top]
                desc = ", ".join(
                    f"{int(t)}{'' if model.tokens is None else ' ' + repr(model.tokens[t])}:{row[t]:.4f}"
                    for t in top)
                print(f"  pos {i} (tok {toks[i]}): {desc}")
    t2 = time.perf_counter()
    print(f"forward of {len(cases)} case(s): {t2 - t1:.2f}s", file=sys.stderr)
    if args.out:
        write_cases_json(args.out, model, cases)
        print(f"wrote {args.out} ({time.perf_counter() - t2:.2f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
