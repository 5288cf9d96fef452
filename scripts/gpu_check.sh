#!/usr/bin/env bash
# One call on a GPU machine runs every GPU check in well under five minutes:
#   bash scripts/gpu_check.sh            (from the repository root; the device tool sets $OUT)
# It installs the project on top of the machine's CUDA torch, runs tests/gpu, and leaves the timelines
# (Chrome traces) and the log under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/offload-gpu}"; mkdir -p "$OUT"; export OUT
export CUBLAS_WORKSPACE_CONFIG=:4096:8   # deterministic cuBLAS, so parity checks can be exact
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# The machine's CUDA torch stays: the project installs with its real dependencies (pyproject.toml, test extra
# included), and a constraint pins torch to the version already there, so pip can neither replace it with a
# PyPI wheel nor upgrade it. Only where no torch is installed does the README's pinned version come in.
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0 \
  || { echo "gpu_check: no torch here, and pip could not install torch==2.13.0"; exit 1; }
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
python3 -c "import torch; print('torch==' + torch.__version__)" > "$OUT/constraints.txt"
# A machine with no network (the lent GPU machines) has most dependencies in its image; the ones it lacks (today
# crc32c) are carried as wheels in .wheels/ (carry: [".wheels"]), made here with:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 crc32c -d .wheels
# There the wheels and the project install without resolving (no index to resolve against), and an import check of
# every dependency says what is still missing. Elsewhere the ordinary install resolves them.
if [ -d .wheels ]; then
  python3 -m pip install --no-index --no-deps .wheels/*.whl > "$OUT/pip.log" 2>&1 \
    || { tail -20 "$OUT/pip.log"; echo "gpu_check: the carried wheels did not install (all of it in $OUT/pip.log)"; exit 1; }
  python3 -m pip install --no-index --no-deps --no-build-isolation -e . >> "$OUT/pip.log" 2>&1 \
    || { tail -5 "$OUT/pip.log"; echo "gpu_check: editable install failed; running from the checkout (PYTHONPATH)"; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
elif ! python3 -m pip install -q -c "$OUT/constraints.txt" -e '.[test]' > "$OUT/pip.log" 2>&1; then
  tail -20 "$OUT/pip.log"; echo "gpu_check: pip install -e '.[test]' failed (all of it in $OUT/pip.log)"; exit 1
fi
python3 -c "
import importlib.util
missing = [m for m in ('numpy', 'psutil', 'aiofiles', 'crc32c', 'xxhash', 'safetensors', 'pytest', 'pytest_timeout',
                       'offload', 'scheduler', 'storage') if importlib.util.find_spec(m) is None]
assert not missing, f'gpu_check: missing on this machine: {missing} (carry their wheels in .wheels/)'
" || exit 1
timeout 200 python3 -m pytest -q -s tests/gpu "tests/test_distributed.py::test_cuda_nccl_one_rank" 2>&1 \
  | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
# The main job on the GPU: params fetched to the device, grads and updates off it; the report and its trace.
timeout 120 python3 -m offload.cli demo --steps 60 --quiet --out "$OUT/demo" 2>&1 | tail -25 | tee "$OUT/demo.log"
demo_rc=${PIPESTATUS[0]}
exit $(( rc != 0 ? rc : demo_rc ))
