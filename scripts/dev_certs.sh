#!/usr/bin/env bash
# A development CA, a SuperLink certificate and SuperNode key pairs for trying a deployment
# locally (see docs/deployment.md). Not for production: use your PKI there, and let each
# institution make its own key pair.
#   scripts/dev_certs.sh DIR [--host NAME ...] [--node NAME ...] [--days N]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "${PYTHON:-$root/.venv/bin/python}" -m fedtune.deploy.certs "$@"
