#!/usr/bin/env bash
# End-to-end demo on this machine: sets up .venv, writes small real-format NVFP4 MoE checkpoints (a
# ModelOpt export with gate/up scale_2 unequal as in pre-0.43 exports, and DeepSeek-V4 as canada-quant
# publishes it, MXFP4 MTP layer included), converts them to the default mega-moe layout (and the
# first to vllm-fused), and verifies each (results with --report; verify writes nothing into what it
# checks). Output goes to ./demo-out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
OUT=${DEMO_OUT:-demo-out}
rm -rf "$OUT"
mkdir -p "$OUT"
export NVFP4_FUSE_PROGRESS=${NVFP4_FUSE_PROGRESS:-0}

echo "== 0. the defaults work together: sample, convert (mega-moe), verify"
nvfp4-fuse sample "$OUT/quick" --layers 2
nvfp4-fuse convert "$OUT/quick" "$OUT/quick-mega-moe"
nvfp4-fuse verify "$OUT/quick" "$OUT/quick-mega-moe" --json | python -c 'import json,sys; d=json.load(sys.stdin); print("verify --json:", d["schema"], "ok" if d["ok"] else "FAILED")'

echo "== 1. a sample ModelOpt NVFP4 checkpoint (3 layers, 8 experts, H=512, I=512, 3 shards)"
nvfp4-fuse sample "$OUT/src" --scheme deepseek --layers 3 --experts 8 --hidden 512 --intermediate 512 --shards 3 --unequal-scale-2

echo "== 2. the plan, from headers only"
nvfp4-fuse convert "$OUT/src" "$OUT/mega-moe" --dry-run

echo "== 3. convert to mega-moe (default target) and verify"
nvfp4-fuse convert "$OUT/src" "$OUT/mega-moe"
nvfp4-fuse verify "$OUT/src" "$OUT/mega-moe" --report "$OUT/mega-moe.verify.json"

echo "== 4. convert to vllm-fused (merged scale_2, 128x4 swizzle) and verify"
nvfp4-fuse convert "$OUT/src" "$OUT/vllm-fused" --target vllm-fused --max-shard-size 2MB
nvfp4-fuse verify "$OUT/src" "$OUT/vllm-fused" --report "$OUT/vllm-fused.verify.json"

echo "== 5. a rerun finds the finished conversion and does nothing; other options are refused, naming them"
nvfp4-fuse convert "$OUT/src" "$OUT/mega-moe"
nvfp4-fuse convert "$OUT/src" "$OUT/mega-moe" --max-shard-size 2MB || echo "(exit $?)"

echo "== 6. DeepSeek-V4 in canada-quant's recipe (.scale block scales, [1] scalars, MXFP4 MTP experts)"
nvfp4-fuse sample "$OUT/dsv4" --arch deepseek-v4 --recipe canada --layers 4 --experts 8
nvfp4-fuse convert "$OUT/dsv4" "$OUT/dsv4-mega-moe"
nvfp4-fuse verify "$OUT/dsv4" "$OUT/dsv4-mega-moe" --report "$OUT/dsv4-mega-moe.verify.json"

echo "== summary"
python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for t in ("mega-moe", "vllm-fused", "dsv4-mega-moe"):
    m = json.loads((out / t / "nvfp4-fuse-manifest.json").read_text())
    v = json.loads((out / f"{t}.verify.json").read_text())
    idx = json.loads((out / t / "model.safetensors.index.json").read_text())
    names = [n for n in idx["weight_map"] if n.startswith("layers.1.ffn.experts.")]
    print(f"{t:13s} layout {m['layout']}, {len(m['files'])} files, fused tensors: {', '.join(sorted(n.rsplit('.', 1)[1] for n in names))}")
    for l in v["layers"]:
        print(f"{'':13s} {l['prefix']}: {l['checked']}/{l['experts']} experts verified, rescaled {l['rescaled']}, rescale error {100 * l['max_rel']:.2f}% (bound: half an E4M3 step)")
    for g in v["copied_groups"]:
        print(f"{'':13s} {g['prefix']}: {g['experts']} experts, {g['format']}, copied byte for byte")
PY
echo "demo finished: see $OUT/"
