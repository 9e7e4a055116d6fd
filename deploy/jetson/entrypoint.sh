#!/usr/bin/env bash
# Container entry point: build the bundle's TensorRT engine on this device if it has none, then run
# nsdd-edge with the given arguments. The bundle is the directory after --model (default /bundle).
set -euo pipefail

bundle=/bundle
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[$i]}" = --model ] && [ $((i + 1)) -lt ${#args[@]} ]; then
    bundle=${args[$((i + 1))]}
  fi
done

if [ "${1:-}" = run ] && [ -f "$bundle/bundle.json" ] && [ ! -f "$bundle/engine.plan" ]; then
  if [ -w "$bundle" ]; then
    /opt/nsdd-edge/src/deploy/jetson/setup.sh --build-engine "$bundle" --prefix /opt/nsdd-edge \
      || echo "entrypoint: engine build failed; nsdd-edge falls back to ONNX Runtime / numpy" >&2
  else
    echo "entrypoint: $bundle is read-only; mount it writable to build a TensorRT engine" >&2
  fi
fi
exec /opt/nsdd-edge/venv/bin/nsdd-edge "$@"
