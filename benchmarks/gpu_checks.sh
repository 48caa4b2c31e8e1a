#!/usr/bin/env bash
# The GPU checks behind benchmarks/RESULTS.md ("GPU"): run from the repository root on a machine with CUDA,
# with poslens importable (installed, or the repository root linked as `poslens` on PYTHONPATH).
# Every step prints its wall time; outputs go to $OUT (default gpu-checks/).
set -uo pipefail
OUT=${OUT:-gpu-checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() { echo "== $1"; local start=$SECONDS; shift; "$@"; echo "   rc=$? in $((SECONDS - start)) s"; }

$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

# 1. --device cuda end to end: a training run twice (same seed: same weights?) and the tiny study
step "train on cuda (1)" $PY -m poslens.cli train --variant nope-causal --device cuda --steps 400 --out "$OUT/a" --quiet
step "train on cuda (2)" $PY -m poslens.cli train --variant nope-causal --device cuda --steps 400 --out "$OUT/b" --quiet
$PY - "$OUT" <<'EOF'
import sys, pathlib
from safetensors.torch import load_file
out = pathlib.Path(sys.argv[1])
a, b = load_file(out / "a" / "model.safetensors"), load_file(out / "b" / "model.safetensors")
print("   same seed on cuda, bitwise-identical weights:", all((a[k] == b[k]).all().item() for k in a),
      "| max |diff|:", max((a[k] - b[k]).abs().max().item() for k in a))
EOF
step "reproduce --preset tiny on cuda" $PY -m poslens.cli reproduce --preset tiny --device cuda --executor serial \
    --out "$OUT/tiny" --quiet

# 2. what one seed of the paper preset costs on this GPU: one unit (train + every measure), timed in two parts
$PY - "$OUT" <<'EOF'
import sys, time, pathlib
from poslens.analyses.experiments.presets import PRESETS
from poslens.analyses.experiments.reproduce import measure_run
from poslens.tasks import Addition
from poslens.variants import preset, train
out, settings, task = pathlib.Path(sys.argv[1]), PRESETS["paper"], Addition()
started = time.perf_counter()
train(preset("nope-causal", task=task, seed=0, device="cuda", **settings.model), task, out_dir=out / "paper",
      quiet=True, seed=0, **settings.training)
trained = time.perf_counter()
tables = measure_run(str(out / "paper"), "nope-causal", 0, "paper", device="cuda")
print(f"== paper preset, nope-causal seed 0 on cuda: train {trained - started:.0f} s, measures "
      f"{time.perf_counter() - trained:.0f} s; exact match {tables['training']['exact_match'].iloc[0]:.3f}")
EOF

# 3. throughput and capture overhead on the GPU (ratios against the peers in the same run)
step "train throughput" $PY benchmarks/train_throughput.py --device cuda --repeats 5
step "capture overhead" $PY benchmarks/capture_overhead.py --device cuda --repeats 5
# 4. a probe sweep of a GPT-2-small-shaped random model with its activations captured on the GPU
step "real-model sweep" $PY benchmarks/real_model_sweep.py --device cuda --sequences 256 --max-len 128 --float16 \
    --sklearn-sites 0 --repeats 3
# 5. probes fitted, scored, saved and loaded on the GPU (issue 25; skipped on a CPU-only torch)
step "probes on cuda" $PY -m pytest -q -p no:cacheprovider tests/test_probe_travel.py -k cuda -rs
