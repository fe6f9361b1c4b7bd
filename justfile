# shopkpi recipes. Run through ./dev (which makes the virtual environment) or, inside it, with `just`.
set positional-arguments

# list the recipes
help:
    @just --list

# the main job: the whole pipeline on the embedded AWS stack (moto): up, generate, ingest, wait, show KPIs
demo *args:
    shopkpi demo "$@"

# the same sample processed in one process with no AWS at all (shopkpi process)
demo-offline dir="data/sample":
    python -m loadgen.generate {{dir}} --orders 20000 --days 14 --parts 4 --bad-rows 20 --bad-file --seed 7
    # exit status 3 means "done, some file was rejected": the sample has a bad file on purpose
    shopkpi process {{dir}} || [ $? -eq 3 ]

# start the embedded stack in the foreground (another shell then uses shopkpi ingest / kpis / runs ...)
up port="4566":
    shopkpi local up --port {{port}}

# build and push the image, then create or update the AWS stack through a change set (--dry-run: plan only)
deploy *args:
    shopkpi deploy "$@"

# the test suite (what CI runs): lint, types, then pytest
test *args:
    ruff check .
    mypy processor shopkpi loadgen orchestration perf
    python -m pytest "$@"

# install the static checkers tests/infra/test_static_checks.py runs, pinned, under .venv/tools: checkov (in a venv
# of its own: it pins boto3 and packaging far below ours) and asl-validator (npm; needs node and npm)
[doc("install the pinned static checkers the infra tests run (checkov, asl-validator) under .venv/tools")]
static-tools checkov="3.3.30" asl_validator="4.0.0":
    #!/usr/bin/env bash
    set -euo pipefail
    case "{{checkov}}" in -*)
        echo "usage: ./dev static-tools [CHECKOV_VERSION [ASL_VALIDATOR_VERSION]]  (default 3.3.30 4.0.0)"
        echo "installs checkov and asl-validator, pinned, under .venv/tools (what tests/infra/test_static_checks.py runs)"
        exit 0;;
    esac
    tools=.venv/tools
    if [ "$("$tools/checkov/bin/checkov" --version 2>/dev/null)" != "{{checkov}}" ]; then
        python -m venv "$tools/checkov"
        "$tools/checkov/bin/python" -m pip install --quiet "checkov=={{checkov}}"
    fi
    if [ "$(cd "$tools/node" 2>/dev/null && npm ls asl-validator --depth=0 --parseable --long 2>/dev/null | cut -d: -f2)" != "asl-validator@{{asl_validator}}" ]; then
        npm install --silent --no-audit --no-fund --prefix "$tools/node" "asl-validator@{{asl_validator}}"
    fi

# validate and transform local files, print the KPIs
process *args:
    shopkpi process "$@"

# generate a data set of about SIZE_GB of CSV into DIR
generate dir size_gb="0.5":
    python -m loadgen.generate {{dir}} --size-gb {{size_gb}} --days 30 --seed 1

# load test of the pipeline: a generated multi-GB shop lands on the embedded stack as producers would; throughput,
# latency, memory, every KPI checked against DuckDB; JSON + HTML report (see docs/loadtest.md). `--compare`: the
# single-process comparison (shopkpi process vs bare polars parse vs DuckDB, docs/performance.md)
[doc("load test of the pipeline on the embedded stack (docs/loadtest.md); --compare: vs a bare parse and DuckDB")]
loadtest *args:
    python -m shopkpi.loadtest "$@"

# soak test of the pipeline: N files land at once on the embedded stack (repeats and bad files among them); checks
# that every file ended archived or rejected, the ledger agrees and the KPIs are exact (see docs/operations.md)
[doc("soak test: N files land at once on the embedded stack; every outcome and KPI checked (docs/operations.md)")]
soak *args:
    python -m loadgen.soak "$@"

# merge cost of one late delivery against the size of the staged history (see docs/performance.md)
bench-incremental *sizes:
    python -m perf.incremental {{ if sizes == "" { "--sizes 0 0.5 2" } else if sizes =~ '^-' { sizes } else { "--sizes " + sizes } }}

# benchmark gate (not part of `test`): run perf/test_benchmarks.py, save it under .benchmarks/gate/, print medians
# and ratios to the calibration; --check fails (exit 1) on a regression against perf/baseline.json (--threshold PCT),
# --update-baseline rewrites it (see docs/performance.md#benchmark-gate)
[doc("benchmark gate: medians and ratios to the calibration; --check fails on a regression (docs/performance.md)")]
bench *args:
    python -m perf.gate "$@"
