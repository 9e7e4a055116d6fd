#!/usr/bin/env bash
# Install nsdd-edge on a Jetson (JetPack 6: L4T R36, TensorRT 10.3, CUDA 12.6; JetPack 7: L4T R38/R39,
# TensorRT 11, CUDA 13), build the TensorRT engine of a bundle on this device and install the service.
#
#   sudo deploy/jetson/setup.sh [--bundle DIR] [--precision fp16|int8] [--cuda-binding cuda-python|pycuda]
#                               [--prefix /opt/nsdd-edge] [--no-service]
#   deploy/jetson/setup.sh --detect-only            # print the L4T/JetPack release and exit
#   deploy/jetson/setup.sh --build-engine DIR       # (re)build DIR's engine with trtexec, register it
#
# Engines are built here, on the device, with trtexec (an engine is tied to the GPU and TensorRT version);
# nsdd-export (which needs torch) is not installed on the device. JetPack 6 builds the FP32 ONNX with
# --fp16 (or the Q/DQ ONNX with --int8); TensorRT 11 (JetPack 7) has no precision flags, so the bundle's
# FP16/Q/DQ ONNX is built --stronglyTyped.
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PREFIX=/opt/nsdd-edge
STATE_DIR=/var/lib/nsdd-edge
CONF_DIR=/etc/nsdd-edge
SERVICE_USER=nsdd
BUNDLE=""
PRECISION=fp16
CUDA_BINDING=cuda-python
INSTALL_SERVICE=1
MODE=install
NV_TEGRA_RELEASE=${NV_TEGRA_RELEASE:-/etc/nv_tegra_release}
TRTEXEC=${TRTEXEC:-/usr/src/tensorrt/bin/trtexec}

die() { echo "setup.sh: error: $*" >&2; exit 1; }
log() { echo "setup.sh: $*" >&2; }

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# Sets L4T_MAJOR, L4T_REVISION and JETPACK from /etc/nv_tegra_release
# ("# R36 (release), REVISION: 4.0, GCID: ..., BOARD: generic, EABI: aarch64, DATE: ...").
detect_jetpack() {
  [ -r "$NV_TEGRA_RELEASE" ] || die "$NV_TEGRA_RELEASE not found: this is not a Jetson with JetPack (L4T)"
  local line
  line=$(head -n 1 "$NV_TEGRA_RELEASE")
  L4T_MAJOR=$(printf '%s\n' "$line" | sed -n 's/^# R\([0-9][0-9]*\) (release).*/\1/p')
  L4T_REVISION=$(printf '%s\n' "$line" | sed -n 's/.*REVISION: \([0-9][0-9.]*\).*/\1/p')
  [ -n "$L4T_MAJOR" ] || die "$NV_TEGRA_RELEASE: cannot read the L4T release from: $line"
  case "$L4T_MAJOR" in
    36) JETPACK=6 ;;
    38 | 39) JETPACK=7 ;;
    35 | 34 | 32) die "L4T R$L4T_MAJOR (JetPack 5 or older) is not supported: TensorRT 10 needs JetPack 6 (L4T R36)" ;;
    *) die "unknown L4T release R$L4T_MAJOR (supported: R36 = JetPack 6, R38/R39 = JetPack 7)" ;;
  esac
}

# Reads a model file name from DIR/bundle.json: bundle_model DIR KIND -> prints the file or nothing.
bundle_model() {
  python3 - "$1" "$2" <<'PY'
import json, sys
meta = json.load(open(sys.argv[1] + "/bundle.json"))
m = meta.get("models", {}).get(sys.argv[2])
print(m["file"] if m else "")
PY
}

build_engine() {
  local bundle=$1 onnx="" kind="" flags=()
  [ -f "$bundle/bundle.json" ] || die "$bundle is not an nsdd-edge bundle (no bundle.json)"
  [ -x "$TRTEXEC" ] || die "trtexec not found at $TRTEXEC (install TensorRT from JetPack: apt install tensorrt)"
  detect_jetpack
  if [ "$JETPACK" = 6 ]; then
    if [ "$PRECISION" = int8 ]; then kind=onnx_int8; flags=(--int8 --fp16); else kind=onnx_fp32; flags=(--fp16); fi
  else
    if [ "$PRECISION" = int8 ]; then kind=onnx_int8; else kind=onnx_fp16; fi
    flags=(--stronglyTyped)
  fi
  onnx=$(bundle_model "$bundle" "$kind")
  if [ -z "$onnx" ] && [ "$kind" != onnx_fp32 ]; then
    log "bundle has no $kind model; building from onnx_fp32"
    kind=onnx_fp32
    onnx=$(bundle_model "$bundle" "$kind")
    if [ "$JETPACK" = 6 ]; then flags=(--fp16); else flags=(); fi
  fi
  [ -n "$onnx" ] || die "$bundle has no ONNX model to build an engine from (export one with nsdd-export)"
  local plan="$bundle/engine.plan" tmp
  tmp=$(mktemp "$bundle/.engine.XXXXXX")
  log "building $plan from $onnx ($kind, ${flags[*]:-fp32}) with $TRTEXEC; this takes minutes"
  if ! "$TRTEXEC" --onnx="$bundle/$onnx" --saveEngine="$tmp" "${flags[@]}" --skipInference \
      >"$bundle/.trtexec.log" 2>&1; then
    rm -f "$tmp"
    die "trtexec failed; see $bundle/.trtexec.log"
  fi
  mv "$tmp" "$plan"
  local trt_version
  trt_version=$("$PYTHON" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || echo unknown)
  "$PYTHON" "$SRC_DIR/deploy/jetson/register_engine.py" "$bundle" "$plan" --precision "$PRECISION" \
    --source-model "$kind" --tensorrt "$trt_version" --jetpack "$JETPACK" --l4t "R$L4T_MAJOR.$L4T_REVISION"
}

install_python() {
  log "installing apt packages"
  apt-get update
  apt-get install -y --no-install-recommends python3-venv python3-pip python3-numpy
  python3 -c 'import tensorrt' 2>/dev/null || apt-get install -y --no-install-recommends python3-libnvinfer
  python3 -c 'import cv2' 2>/dev/null || apt-get install -y --no-install-recommends python3-opencv
  # System site packages: TensorRT's Python bindings and JetPack's OpenCV (built with GStreamer for csi://)
  # come from apt, not PyPI.
  python3 -m venv --system-site-packages "$PREFIX/venv"
  PYTHON="$PREFIX/venv/bin/python"
  "$PYTHON" -m pip install --upgrade pip
  # --no-deps keeps the system OpenCV (with GStreamer) instead of PyPI's opencv-python-headless.
  "$PYTHON" -m pip install --no-deps "$SRC_DIR"
  "$PYTHON" -m pip install "onnxruntime>=1.18"
  case "$CUDA_BINDING" in
    cuda-python)
      if [ "$JETPACK" = 6 ]; then "$PYTHON" -m pip install "cuda-python>=12.6,<13"; else "$PYTHON" -m pip install "cuda-python>=13"; fi ;;
    pycuda)
      # pycuda compiles against the CUDA toolkit and needs libcuda: build it here, on the device.
      PATH="/usr/local/cuda/bin:$PATH" CUDA_ROOT=/usr/local/cuda "$PYTHON" -m pip install "pycuda>=2022.2" ;;
    *) die "--cuda-binding must be cuda-python or pycuda" ;;
  esac
  "$PYTHON" -c 'import tensorrt, cv2; print("TensorRT", tensorrt.__version__, "OpenCV", cv2.__version__)'
}

install_user() {
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    useradd --system --home-dir "$STATE_DIR" --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  for group in video render; do
    if getent group "$group" >/dev/null; then usermod -aG "$group" "$SERVICE_USER"; fi
  done
  install -d -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR"
}

install_service() {
  install -d "$CONF_DIR"
  if [ ! -f "$CONF_DIR/nsdd-edge.env" ]; then
    install -m 0640 -g "$SERVICE_USER" "$SRC_DIR/deploy/jetson/nsdd-edge.env" "$CONF_DIR/nsdd-edge.env"
  fi
  install -m 0644 "$SRC_DIR/deploy/jetson/nsdd-edge.service" /etc/systemd/system/nsdd-edge.service
  if [ "$PREFIX" != /opt/nsdd-edge ]; then
    sed -i "s|/opt/nsdd-edge/venv|$PREFIX/venv|" /etc/systemd/system/nsdd-edge.service
  fi
  systemctl daemon-reload
  systemctl enable nsdd-edge.service
  log "installed nsdd-edge.service; edit $CONF_DIR/nsdd-edge.env, then: systemctl start nsdd-edge"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE=${2:?--bundle needs a directory}; shift 2 ;;
    --precision) PRECISION=${2:?--precision needs fp16 or int8}; shift 2 ;;
    --cuda-binding) CUDA_BINDING=${2:?--cuda-binding needs cuda-python or pycuda}; shift 2 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --no-service) INSTALL_SERVICE=0; shift ;;
    --detect-only) MODE=detect; shift ;;
    --build-engine) MODE=engine; BUNDLE=${2:?--build-engine needs a bundle directory}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$PRECISION" in fp16 | int8) ;; *) die "--precision must be fp16 or int8, got $PRECISION" ;; esac
PYTHON="$PREFIX/venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3

case "$MODE" in
  detect)
    detect_jetpack
    echo "l4t=R$L4T_MAJOR.$L4T_REVISION jetpack=$JETPACK"
    ;;
  engine)
    build_engine "$BUNDLE"
    ;;
  install)
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0 ...)"
    detect_jetpack
    log "L4T R$L4T_MAJOR.$L4T_REVISION: JetPack $JETPACK"
    install_python
    install_user
    if [ "$INSTALL_SERVICE" = 1 ]; then install_service; fi
    if [ -n "$BUNDLE" ]; then
      install -d -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE_DIR/bundle"
      cp -r "$BUNDLE"/. "$STATE_DIR/bundle/"
      build_engine "$STATE_DIR/bundle"
      chown -R "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR/bundle"
    fi
    log "done"
    ;;
esac
