#!/usr/bin/env bash
# One short GPU run on an offline GPU node (docs/gpu.md):
#
#     make gpu-wheelhouse                  (where there is network: .gpu-wheelhouse/, <= 64 MiB, CPython 3.12)
#     # bring the repository and .gpu-wheelhouse/ to the node, then there:
#     bash bench/gpu_run.sh                (writes bench/results/gpu.json; arguments go to bench/bench_gpu.py)
#
# The node needs Python (3.12 for the default wheelhouse) with a CUDA build of torch and transformers
# installed; everything else comes from the wheelhouse, installed with no index into a venv that sees
# the system's packages. Then bench/bench_gpu.py runs preflight -> small-model GPU tier -> the
# mistral7b-shape step with the planner check -> the A10G-capped export of a random-weight 7B.
# PYTHON, WHEELHOUSE and GPU_VENV override the interpreter, the wheel folder and the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.gpu-wheelhouse}
VENV=${GPU_VENV:-.gpu-venv}

if [ ! -f "$WHEELHOUSE/requirements.txt" ]; then
    echo "gpu_run: $WHEELHOUSE/requirements.txt not found: run 'make gpu-wheelhouse' where there is network and bring $WHEELHOUSE/ here" >&2
    exit 2
fi
"$PYTHON" -m venv --system-site-packages "$VENV"
if ! "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELHOUSE" -r "$WHEELHOUSE/requirements.txt"; then
    echo "gpu_run: installing $WHEELHOUSE/ offline failed (above: the package pip could not find). The wheelhouse is for" \
         "CPython $(cat "$WHEELHOUSE/python-version" 2>/dev/null || echo '?'); this is $("$PYTHON" -V 2>&1)" >&2
    exit 2
fi
# bitsandbytes loads libbitsandbytes_cuda<torch's CUDA>.so; the wheelhouse keeps a few (BNB_CUDA): when
# the exact one was trimmed, use the newest kept one of the same CUDA major (minor-version compatible).
if [ -z "${BNB_CUDA_VERSION:-}" ]; then
    BNB_CUDA_VERSION=$("$VENV/bin/python" - <<'EOF'
import importlib.util, pathlib, re
import torch
cuda = torch.version.cuda
spec = importlib.util.find_spec("bitsandbytes")
if cuda and spec:
    want = cuda.replace(".", "")
    kept = sorted(int(m.group(1)) for p in pathlib.Path(spec.origin).parent.glob("libbitsandbytes_cuda*.so")
                  if (m := re.search(r"cuda(\d+)\.so$", p.name)))
    same_major = [v for v in kept if str(v).startswith(cuda.split(".")[0]) and v <= int(want)]
    if int(want) not in kept and same_major:
        print(same_major[-1])
EOF
)
    [ -n "$BNB_CUDA_VERSION" ] && export BNB_CUDA_VERSION && echo "gpu_run: BNB_CUDA_VERSION=$BNB_CUDA_VERSION"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$VENV/bin/python" bench/bench_gpu.py "$@"
