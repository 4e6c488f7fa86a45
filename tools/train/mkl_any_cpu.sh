#!/usr/bin/env bash
# Runs a command with Intel MKL's CPU check answered "Intel", so that MKL (linked into PyTorch's PyPI
# wheel) takes its AVX2 kernels on AMD CPUs as well. Numerics are unchanged: a 100-step train.py run gave
# the same losses to the last printed digit with and without it, and ran 1.07 instead of 1.24 s/step on
# a 2-core AMD EPYC (AVX2). Usage: mkl_any_cpu.sh COMMAND [ARGS...]
set -euo pipefail
lib="${TMPDIR:-/tmp}/ddit-mkl-any-cpu.so"
if [[ ! -f "$lib" ]]; then
    echo 'int mkl_serv_intel_cpu_true(void) { return 1; }' | gcc -shared -fPIC -x c -o "$lib" -
fi
LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" exec "$@"
