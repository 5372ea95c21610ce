# Developer tasks. `scripts/bootstrap --dev` installs `just` into .venv (rust-just).
set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv/bin"

# Install lorad and its dev tools into .venv
install:
    scripts/bootstrap --dev

# Lint and run the whole test suite (what CI runs)
test *ARGS:
    scripts/test {{ARGS}}

# Train the tiny built-in model end to end
demo *ARGS:
    {{venv}}/lorad demo {{ARGS}}

# Speed benchmarks: engine vs a bare training loop (ratios, same run)
bench *ARGS:
    HF_HUB_OFFLINE=1 {{venv}}/python -m bench.engine_vs_bare {{ARGS}}

# Lint
lint:
    {{venv}}/ruff check .
