#!/usr/bin/env bash
# Regenerate manifests/catena.yaml and manifests/catena-crds.yaml from the chart
# (see render.py); pass --check to only verify they are up to date.
set -euo pipefail
exec python3 "$(dirname "$0")/render.py" "$@"
