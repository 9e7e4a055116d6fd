#!/usr/bin/env bash
# Container entry point: build the bundle's TensorRT engine on this device unless the bundle already registers
# one built by this TensorRT version, then run nsdd-edge with the given arguments. The bundle is the directory
# after --model (default /bundle). The decision is register_engine.py --needs-build: a stray engine.plan
# (an interrupted build) is rebuilt, not trusted.
set -euo pipefail

prefix=${NSDD_EDGE_PREFIX:-/opt/nsdd-edge}
python=$prefix/venv/bin/python
bundle=/bundle
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[$i]}" = --model ] && [ $((i + 1)) -lt ${#args[@]} ]; then
    bundle=${args[$((i + 1))]}
  fi
done

if [ "${1:-}" = run ] && [ -f "$bundle/bundle.json" ]; then
  trt=$("$python" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || echo unknown)
  if "$python" "$prefix/src/deploy/jetson/register_engine.py" "$bundle" --needs-build --tensorrt "$trt"; then
    if [ -w "$bundle" ]; then
      "$prefix/src/deploy/jetson/setup.sh" --build-engine "$bundle" --prefix "$prefix" \
        || echo "entrypoint: engine build failed; nsdd-edge falls back to ONNX Runtime / numpy" >&2
    else
      echo "entrypoint: $bundle is read-only; mount it writable to build a TensorRT engine" >&2
    fi
  fi
fi
exec "$prefix/venv/bin/nsdd-edge" "$@"
