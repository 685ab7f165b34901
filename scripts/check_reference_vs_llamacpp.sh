#!/usr/bin/env bash
# Developer tool (not CI): check the numpy reference forward pass against llama.cpp.
#
#   PEER_BIN=/path/to/llama.cpp/build/bin scripts/check_reference_vs_llamacpp.sh [MODEL] [TEXT]
#
# Computes perplexity by llama-perplexity's method with llama-perplexity itself and with
# scripts/ppl_reference.py (float64 numpy, on the token ids llama-tokenize gives for the
# same text), in two settings:
#
#   exact   : MODEL converted to F32 by llama-quantize (dequantization is exact, so it is the
#             same model), llama-perplexity with -fa off -ctk f32 -ctv f32: llama.cpp then
#             computes in plain f32, and the two must agree to TOL_EXACT (1e-4 relative).
#             This is the check of the reference's maths (rope mode, GQA, norms, ...).
#   shipped : MODEL as is with llama-perplexity's defaults (PEER_ARGS). llama.cpp quantizes
#             activations to Q8_0/Q8_1 for quantized matmuls, keeps the KV cache in f16 and
#             uses flash attention, so it differs from exact maths by noise that shrinks with
#             more scored tokens; TOL_SHIPPED (0.02 relative) only catches gross mismatches.
#
# Env: CTX (128), CHUNKS (2), TOL_EXACT (1e-4), TOL_SHIPPED (0.02), PEER_ARGS (""), PYTHON,
#      SKIP_EXACT=1 to skip the F32 conversion (needs ~4 bytes/param of temp disk).
# MODEL defaults to models/SmolLM2-135M-Instruct.Q4_1.gguf; TEXT to the first 3000 bytes of
# ../shared/data/wikitext-2-valid.tokens.txt.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
: "${PEER_BIN:?set PEER_BIN to llama.cpp build/bin (llama-perplexity, llama-tokenize, llama-quantize)}"
MODEL="${1:-$root/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
TEXT="${2:-}"
CTX="${CTX:-128}"
CHUNKS="${CHUNKS:-2}"
TOL_EXACT="${TOL_EXACT:-1e-4}"
TOL_SHIPPED="${TOL_SHIPPED:-0.02}"
PEER_ARGS="${PEER_ARGS:-}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
export LD_LIBRARY_PATH="$PEER_BIN${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
if [ -z "$TEXT" ]; then
  TEXT="$work/text.txt"
  head -c 3000 "$root/../shared/data/wikitext-2-valid.tokens.txt" > "$TEXT"
fi

"$PEER_BIN/llama-tokenize" -m "$MODEL" -f "$TEXT" --ids --no-parse-special --log-disable \
  2>/dev/null | grep '^\[' > "$work/ids.txt"
echo "model: $MODEL"
echo "text:  $TEXT ($(wc -c < "$TEXT") bytes, $(tr -cd ',' < "$work/ids.txt" | wc -c | awk '{print $1+1}') tokens), ctx $CTX, chunks $CHUNKS"

peer_ppl() { # model extra-args... ; prints the chunk line and final PPL into $work/peer.log
  local m="$1"; shift
  # llama.cpp's asynchronous logger sometimes loses the last lines at exit (seen about 1 run
  # in 6 with this build), so retry until the final estimate is printed.
  for _ in 1 2 3 4 5; do
    "$PEER_BIN/llama-perplexity" -m "$m" -f "$TEXT" -c "$CTX" --chunks "$CHUNKS" -b "$CTX" -t 2 \
      "$@" > "$work/peer.log" 2>&1 || { cat "$work/peer.log"; exit 1; }
    grep -q 'Final estimate: PPL' "$work/peer.log" && break
  done
  grep -q 'Final estimate: PPL' "$work/peer.log" || { cat "$work/peer.log"; echo "no PPL from llama-perplexity" >&2; exit 1; }
}

"$PYTHON" "$here/ppl_reference.py" "$MODEL" --ids "$work/ids.txt" --ctx "$CTX" --chunks "$CHUNKS" \
  > "$work/ref.log"
ref_chunks="$(grep '^\[1\]' "$work/ref.log")"
ref_ppl="$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$work/ref.log")"
echo "reference (float64):            $ref_chunks  PPL = $ref_ppl  ($(grep '^add_bos' "$work/ref.log"))"

status=0
compare() { # label tolerance
  local peer_chunks peer_ppl
  peer_chunks="$(grep -o '^\[1\].*' "$work/peer.log" | head -1)"
  peer_ppl="$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$work/peer.log")"
  printf '%-32s %s  PPL = %s\n' "llama.cpp $1:" "$peer_chunks" "$peer_ppl"
  "$PYTHON" - "$peer_ppl" "$ref_ppl" "$2" <<'EOF' || status=1
import sys
peer, ref, tol = map(float, sys.argv[1:])
rel = abs(ref - peer) / peer
print(f"  relative difference {rel:.3e} (tolerance {tol:g}) -> {'OK' if rel <= tol else 'MISMATCH'}")
sys.exit(0 if rel <= tol else 1)
EOF
}

if [ "${SKIP_EXACT:-0}" != 1 ]; then
  "$PEER_BIN/llama-quantize" --allow-requantize "$MODEL" "$work/f32.gguf" F32 > "$work/quantize.log" 2>&1 \
    || { cat "$work/quantize.log"; exit 1; }
  peer_ppl "$work/f32.gguf" -fa off -ctk f32 -ctv f32
  compare "exact (F32 copy, f32 KV, no FA)" "$TOL_EXACT"
  rm -f "$work/f32.gguf"
fi
# shellcheck disable=SC2086
peer_ppl "$MODEL" $PEER_ARGS
compare "shipped (defaults${PEER_ARGS:+ $PEER_ARGS})" "$TOL_SHIPPED"
exit $status
