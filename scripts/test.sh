#!/usr/bin/env bash
# Runs the test suite: bash scripts/test.sh [pytest args]
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/setup_env.sh"
cd "$REPO_ROOT"
python -m pytest tests --durations=15 "$@"
