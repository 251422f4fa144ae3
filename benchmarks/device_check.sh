#!/usr/bin/env bash
# The one command to run on a lent GPU machine, from the repository root (carry: [".whl"]):
#
#     bash benchmarks/device_check.sh
#
# 1. installs the wheels carried in .whl/ (what the machine's Python lacks: open_clip_torch with
#    open_clip_train, duckdb, webdataset, ftfy, wcwidth, braceexpand, py3langid, pytest, pytest-timeout)
#    into /tmp/site, offline;
# 2. prints the machine: nvidia-smi, torch / torchvision / transformers / open_clip versions, cores,
#    /dev/shm, open-file limit;
# 3. runs python -m benchmarks.gpu (killed after $BENCH_BUDGET s, default 290, + 40 s)
#    on the row families in $BENCH_ONLY (default: all) -> $OUT/gpu.json;
#    ($BENCH_ARGS: more flags, e.g. --repeats 1); families: input,recaption,score,train,eval, and vlm;
# 4. runs the GPU tests (pytest -m gpu), limited to $TEST_LIMIT s (default 150).
# With DEMO_LIMIT=N (seconds, default 0 = skipped), before both: the GPU-scale demo,
#    QUICKSTART_SCALE=gpu QUICKSTART_FETCH=ingest bash pipelines/quickstart.sh (ingest, because the
#    machine has no img2dataset), its step times in $OUT/demo/timings.tsv and its table in $OUT/demo/.
#    BENCH_BUDGET=0 or TEST_LIMIT=0 skips those steps.
# The benchmark goes first: the numbers are what a lent machine is for; the tests get what is left.
#
# Everything is also written to $OUT/log.txt. Expected wall time: ~15 s install + the benchmark budget
# + the test limit; every step has a timeout.
# .whl/ is git-ignored: on a new machine rebuild it first (about 31 MB), from the repo root:
#   grep -q '^/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
#   for w in open_clip_torch==3.3.0 duckdb==2.0.1 webdataset==0.2.86 ftfy==6.3.1 wcwidth==0.9.4 \
#            braceexpand==0.1.7 py3langid==0.4.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0; do
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl "$w"; done
set -u
OUT=${OUT:-/tmp/capcurate-device-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    CAPCURATE_PROGRESS=0 NO_ALBUMENTATIONS_UPDATE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

main() {
    local t0 rc_tests rc_bench
    t0=$(date +%s)
    echo "== capcurate device check: $(date -u +%FT%TZ) in $PWD (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"

    echo "== 1. wheels -> /tmp/site"
    ls -la .whl/ 2>&1
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl; then
        echo "installed $(ls .whl/*.whl | wc -l) wheels"
    else
        echo "!! pip install of the carried wheels failed (continuing: imports will say what is missing)"
    fi
    export PYTHONPATH=/tmp/site:$PWD

    echo "== 2. machine"
    nvidia-smi 2>&1 | head -20
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    echo "cores: $(nproc); memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}')"
    df -h /dev/shm /tmp 2>&1
    # capcurate's decode=gpu input path (its default on CUDA) ships every JPEG of a batch as its own
    # shared-memory tensor: a DataLoader worker holds ~batch x prefetch file descriptors. At the common
    # default soft limit of 1024 that fails with "Too many open files"; raise the soft limit to the hard
    # limit so the benchmark measures throughput, and say so.
    echo "open files: soft $(ulimit -n), hard $(ulimit -Hn)"
    if [ "$(ulimit -n)" != "$(ulimit -Hn)" ] && ulimit -n "$(ulimit -Hn)" 2>/dev/null; then
        echo "!! raised the soft open-file limit to the hard limit, $(ulimit -n), for this run"
    fi
    python3 - <<'EOF' 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "torchvision", "transformers", "timm", "open_clip", "webdataset", "duckdb", "pyarrow",
             "PIL", "numpy", "pytest", "capcurate"):
    try:
        m = importlib.import_module(name)
        print(f"{name:13s} {getattr(m, '__version__', '?'):12s} {getattr(m, '__file__', '')}")
    except Exception as e:
        print(f"{name:13s} MISSING: {type(e).__name__}: {e}")
try:
    import torch
    print("cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
    import open_clip_train  # noqa: F401  (the baseline trainer ships inside open_clip_torch)
    print("open_clip_train importable")
except Exception as e:
    print("!!", type(e).__name__, e)
EOF

    local only=${BENCH_ONLY:-input,recaption,score,train,eval} budget=${BENCH_BUDGET:-290} tests=${TEST_LIMIT:-150}
    local demo=${DEMO_LIMIT:-0}
    if [ "$demo" -gt 0 ]; then
        echo "== 2b. the GPU-scale demo (QUICKSTART_SCALE=gpu QUICKSTART_FETCH=ingest, limit $demo s)"
        mkdir -p /tmp/site/bin  # quickstart.sh calls `capcurate`; here it is the carried tree's module
        printf '#!/bin/sh\nexec python3 -m capcurate "$@"\n' > /tmp/site/bin/capcurate
        chmod +x /tmp/site/bin/capcurate
        PATH=/tmp/site/bin:$PATH PYTHON=python3 QUICKSTART_SCALE=gpu QUICKSTART_FETCH=ingest \
            QUICKSTART_OUT=/tmp/capcurate-demo timeout -k 10 "$demo" bash pipelines/quickstart.sh
        echo "== demo exit code: $? (124 = timed out)"
        mkdir -p "$OUT/demo"
        cp /tmp/capcurate-demo/timings.tsv /tmp/capcurate-demo/results.* "$OUT/demo/" 2>/dev/null
        for f in /tmp/capcurate-demo/runs/*/summary.json; do  # each training run's samples/s
            [ -f "$f" ] && cp "$f" "$OUT/demo/$(basename "$(dirname "$f")").summary.json"
        done
    fi
    [ "$budget" -gt 0 ] || only=""
    if [ -n "$only" ]; then
    echo "== 3. python -m benchmarks.gpu --only $only (killed after $(( budget + 40 )) s)"
    # shellcheck disable=SC2086  # BENCH_ARGS: extra flags, e.g. --vlm-compile
    timeout -k 10 $(( budget + 40 )) python3 -m benchmarks.gpu --only "$only" \
        ${BENCH_ARGS:-} --json-out "$OUT/gpu.json"
    rc_bench=$?
    echo "== benchmarks.gpu exit code: $rc_bench (0 ok, 1 a row failed its gate or crashed, 124 timed out); $OUT/gpu.json"
    else
        rc_bench=0
    fi
    [ "$tests" -gt 0 ] || { echo "== total $(( $(date +%s) - t0 )) s"; return "$rc_bench"; }

    echo "== 4. GPU tests (pytest -m gpu, limit $tests s)"
    timeout -k 10 "$tests" python3 -m pytest -q -m gpu tests -p no:cacheprovider --continue-on-collection-errors \
        --junitxml="$OUT/pytest-gpu.xml"
    rc_tests=$?
    echo "== pytest exit code: $rc_tests (124 = timed out; 5 = no gpu tests collected)"
    echo "== total $(( $(date +%s) - t0 )) s"
    return "$rc_bench"
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
