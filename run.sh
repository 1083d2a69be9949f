#!/usr/bin/env bash
# Set up the virtual environment (once, or again when pyproject.toml/constraints.txt change)
# and run one of the project's jobs. Needs only python3 with venv and pip.
#
#   bash run.sh main [args]   the main job: a 2-worker Ray-launched training (embedded local Ray)
#                             of an ST 2-bit-activation ResNet on MNIST-1D with the prune-fp hook;
#                             extra args go to gradcomp-launch (e.g. --epochs 2, --codec fp)
#   bash run.sh test [args]   the whole test suite (pytest)
#   bash run.sh lint          ruff (lint) and mypy (types) on the gradcomp package
#   bash run.sh demo [args]   the numerics demo (python -m gradcomp demo)
#   bash run.sh setup         only set up (venv, package, Horovod build)
#
# Environment: GRADCOMP_VENV (default .venv), GRADCOMP_EXTRAS (default
# train,dev,bench,ray,lightning,accelerate: the training app, tests, lint, benchmarks, the Ray
# launcher; the trainer extras let tests/integrations run),
# GRADCOMP_HOROVOD (default 1: build Horovod 0.28.1 with launch/build_horovod.sh, ~4 min once),
# GRADCOMP_PIP_ARGS (extra pip arguments, e.g. an index with CPU torch wheels).
set -euo pipefail
cd "$(dirname "$0")"
venv="${GRADCOMP_VENV:-.venv}"
extras="${GRADCOMP_EXTRAS:-train,dev,bench,ray,lightning,accelerate}"
read -r -a pip_args <<< "${GRADCOMP_PIP_ARGS:-}"

setup_env() {
    local want stamp="$venv/.gradcomp-installed"
    want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) $extras"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    echo "run.sh: setting up $venv (torch pinned by constraints.txt) ..." >&2
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    # torch first, from the pin, so that nothing resolves it to a CUDA build.
    "$venv/bin/python" -m pip install -q "${pip_args[@]}" -c constraints.txt "torch==2.13.0"
    "$venv/bin/python" -m pip install -q "${pip_args[@]}" -c constraints.txt -e ".[$extras]"
    echo "$want" > "$stamp"
}

setup_horovod() {
    # Idempotent: returns at once when horovod.torch already imports against this torch.
    if [[ "${GRADCOMP_HOROVOD:-1}" == "1" ]]; then
        bash launch/build_horovod.sh "$venv"
    fi
}

case "${1:-}" in
    main) shift; setup_env
          # Re-running starts over in runs/main, unless the caller asks to --resume it.
          fresh=--overwrite
          for a in "$@"; do [ "$a" = --resume ] && fresh=; done
          exec "$venv/bin/gradcomp-launch" --workers 2 --codec prune-fp --sparsity 0.85 --bits 6 \
              --model resnet1d --act-bits 2 --dataset mnist1d --epochs 12 --lr 0.2 --output runs/main $fresh "$@" ;;
    test) shift; setup_env; setup_horovod; exec "$venv/bin/python" -m pytest "$@" ;;
    lint) shift; setup_env
          "$venv/bin/ruff" check gradcomp
          exec "$venv/bin/mypy" ;;  # the package and settings: [tool.mypy] in pyproject.toml
    demo) shift; setup_env; exec "$venv/bin/python" -m gradcomp demo "$@" ;;
    setup) setup_env; setup_horovod ;;
    *) echo "usage: bash run.sh {main|test|lint|demo|setup} [args...]" >&2; exit 2 ;;
esac
