#!/usr/bin/env bash
# The main job on the shipped tiny PaliGemma 2 checkpoint (bf16 npz, released layout):
# inspect it, convert it to Hugging Face safetensors and back, and prove the round trip bit-exact.
# Everything it makes is left in out/demo/ (replaced on each run) for you to open.
set -euo pipefail
PARITY=${1:-parity}
cd "$(dirname "$0")/.."
out=out/demo
rm -rf "$out"
mkdir -p "$out"
ckpt=golden/tiny-pg2-gqa.b16.npz

"$PARITY" inspect "$ckpt"
"$PARITY" convert "$ckpt" --to safetensors -o "$out/hf" --max-shard-size 100KB
"$PARITY" inspect "$out/hf" > /dev/null && echo "safetensors output conforms to the spec"
"$PARITY" convert "$out/hf" --to npz -o "$out/back.b16.npz"
python3 - "$ckpt" "$out/back.b16.npz" <<'PY'
import sys, zipfile
a, b = (zipfile.ZipFile(p) for p in sys.argv[1:])
same = {n: a.read(n) == b.read(n) for n in a.namelist()}
assert set(a.namelist()) == set(b.namelist()) and all(same.values()), [n for n, s in same.items() if not s]
print(f"round trip npz -> safetensors -> npz: {len(same)} members bit-exact")
PY

# Run the PyTorch implementation on the shipped inputs (2 rows, different prompt lengths, one right-padded):
# capture every named point, then decode greedily with the KV cache. The tiny weights are random, so the
# generated text is meaningless: the demo shows the pipeline, the tests prove the numbers.
"$PARITY" capture "$ckpt" --inputs golden/tiny-inputs.npz --convention big_vision -o "$out/capture.safetensors"
"$PARITY" generate "$ckpt" --inputs golden/tiny-inputs.npz --max-new-tokens 8 --tokenizer golden/tokenizer.model \
  -o "$out/generation.safetensors"

# Layer by layer: the PyTorch and the JAX implementation on the same checkpoint, each side in its own process;
# every capture point compared (profile fp32, chosen from the two manifests), each block also teacher-forced on side
# A's inputs. The table goes to the terminal, the self-contained HTML report (error curves per tower) to the folder.
"$PARITY" compare "$ckpt" --a torch --b jax --inputs golden/tiny-inputs.npz \
    --layer-by-layer --teacher-forced --html "$out/report.html"
echo "demo outputs in $out/: hf/ (safetensors), back.b16.npz, capture.safetensors, generation.safetensors, report.html"
