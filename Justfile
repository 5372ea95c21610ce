# Developer tasks. `scripts/bootstrap --dev` installs `just` itself into .venv (rust-just).
set shell := ["bash", "-euo", "pipefail", "-c"]
export HF_HUB_OFFLINE := "1"
export TRANSFORMERS_OFFLINE := "1"

venv := ".venv/bin"

# Install lorad and its dev tools into .venv
install:
    scripts/bootstrap --dev

# Lint and run the whole test suite (what CI runs)
test *ARGS: lint
    {{venv}}/python -m pytest -q -n 2 {{ARGS}}

# The tests that train no model (the `slow` ones are left out): a quick check while editing
test-fast *ARGS:
    {{venv}}/python -m pytest -q -n 2 -m "not slow" {{ARGS}}

# Train the tiny built-in model end to end
demo *ARGS:
    {{venv}}/lorad demo {{ARGS}}

# Speed benchmarks (results in bench/results/): `just bench` runs every bench/*.py module; `just bench NAME [FLAGS]`
# runs one (e.g. `just bench caption_throughput --images 96`); flags alone go to engine_vs_bare, as before.
bench *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    args=({{ARGS}})
    if [ ${#args[@]} -eq 0 ]; then
        for path in bench/*.py; do
            name=$(basename "$path" .py)
            [ "$name" = __init__ ] && continue
            echo "== bench.$name"
            {{venv}}/python -m "bench.$name"
        done
    elif [[ "${args[0]}" == -* ]]; then
        {{venv}}/python -m bench.engine_vs_bare "${args[@]}"
    else
        {{venv}}/python -m "bench.${args[0]}" "${args[@]:1}"
    fi

# The GPU suite: engine vs bare loops on real-size models (SD1.5, SDXL, Flux, LLM) and a warm daemon job,
# one table (bench/results/gpu_suite-<mode>.md, or --out FILE). On a CPU it runs reduced sizes.
# On a borrowed GPU machine: `timeout 900 just bench-gpu --out gpu_suite.md` (about 3-5 minutes on an H100).
bench-gpu *ARGS:
    {{venv}}/python -m bench.gpu_suite {{ARGS}}

# Lint, and check the format (`{{venv}}/ruff format .` fixes it)
lint:
    {{venv}}/ruff check .
    {{venv}}/ruff format --check .

# Regenerate the gRPC stubs in proto/lorad_api from proto/lorad/v1/*.proto
proto:
    {{venv}}/python scripts/gen_proto.py
    {{venv}}/python scripts/gen_webui_api.py  # the WebUI extension's protobuf-3.20-compatible stubs
