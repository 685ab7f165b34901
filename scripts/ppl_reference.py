#!/usr/bin/env python3
"""Perplexity of a GGUF model by llama.cpp's llama-perplexity method, computed with
the float64 numpy reference forward pass (scripts/reference_forward.py).

  ppl_reference.py MODEL --ids IDS_FILE --ctx N [--chunks K]

IDS_FILE holds the token ids of the whole text, as written by
`llama-tokenize -m MODEL -f TEXT --ids --no-parse-special` (a Python-style list;
with BOS first when the model adds BOS). The method (tools/perplexity/perplexity.cpp):
split into chunks of N tokens (n_chunk = min(K, len // N), tail dropped); if the model
adds BOS, the first token of every chunk is replaced by BOS; the logits at positions
N/2 .. N-2 score the tokens at N/2+1 .. N-1; PPL = exp(mean NLL) over all chunks.
Prints the running PPL after each chunk like llama-perplexity ("[1]x,[2]y,") and
`Final estimate: PPL = x`.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference_forward import Model, _field  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--ids", required=True, help="file with the token ids of the whole text")
    ap.add_argument("--ctx", type=int, required=True)
    ap.add_argument("--chunks", type=int, default=-1)
    args = ap.parse_args(argv)

    ids = [int(t) for t in ast.literal_eval(open(args.ids).read().strip())]
    model = Model(args.model)
    bos = _field(model.reader, "tokenizer.ggml.bos_token_id")
    # llama.cpp tokenized with add_special=true: BOS is first iff the model adds BOS
    add_bos = bos is not None and len(ids) > 0 and ids[0] == int(bos)
    n_ctx = args.ctx
    if len(ids) < 2 * n_ctx:
        print(f"need at least {2 * n_ctx} tokens, have {len(ids)}", file=sys.stderr)
        return 1
    n_chunk_max = len(ids) // n_ctx
    n_chunk = n_chunk_max if args.chunks < 0 else min(args.chunks, n_chunk_max)
    first = n_ctx // 2
    nll, count = 0.0, 0
    out = []
    for c in range(n_chunk):
        toks = list(ids[c * n_ctx:(c + 1) * n_ctx])
        if add_bos:
            toks[0] = int(bos)
        logits = model.forward(toks)[first:n_ctx - 1]                 # (n_ctx-1-first, V)
        target = np.asarray(ids[c * n_ctx + first + 1:(c + 1) * n_ctx])
        m = logits.max(axis=1, keepdims=True)
        lse = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=1)))
        nll += float(np.sum(lse - logits[np.arange(len(target)), target]))
        count += len(target)
        out.append(f"[{c + 1}]{np.exp(nll / count):.4f},")
        print(out[-1], end="", flush=True)
    print()
    print(f"add_bos={add_bos} n_ctx={n_ctx} n_chunk={n_chunk} scored={count}")
    print(f"Final estimate: PPL = {np.exp(nll / count):.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
