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

# Train the tiny built-in model end to end
demo *ARGS:
    {{venv}}/lorad demo {{ARGS}}

# Speed benchmarks: engine vs a bare training loop (ratios, measured in the same run)
bench *ARGS:
    {{venv}}/python -m bench.engine_vs_bare {{ARGS}}

# Lint
lint:
    {{venv}}/ruff check .

# Regenerate the gRPC stubs in proto/lorad_api from proto/lorad/v1/*.proto
proto:
    {{venv}}/python scripts/gen_proto.py
