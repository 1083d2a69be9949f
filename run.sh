#!/usr/bin/env bash
# Set up the virtual environment (once, or again when pyproject.toml/constraints.txt change)
# and run one of the project's jobs. Needs only python3 with venv and pip.
#
#   bash run.sh main [args]   the main job (python -m gradcomp demo, for now)
#   bash run.sh test [args]   the whole test suite (pytest)
#
# Environment: GRADCOMP_VENV (default .venv), GRADCOMP_EXTRAS (default dev,bench),
# GRADCOMP_PIP_ARGS (extra pip arguments, e.g. an index with CPU torch wheels).
set -euo pipefail
cd "$(dirname "$0")"
venv="${GRADCOMP_VENV:-.venv}"
extras="${GRADCOMP_EXTRAS:-dev,bench}"
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

case "${1:-}" in
    main) shift; setup_env; exec "$venv/bin/python" -m gradcomp demo "$@" ;;
    test) shift; setup_env; exec "$venv/bin/python" -m pytest "$@" ;;
    setup) setup_env ;;
    *) echo "usage: bash run.sh {main|test|setup} [args...]" >&2; exit 2 ;;
esac
