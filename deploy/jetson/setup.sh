#!/usr/bin/env bash
# Install nsdd-edge on a Jetson (JetPack 6.1/6.2: L4T R36.4, TensorRT 10.3, CUDA 12.6; JetPack 7: L4T R38/R39,
# TensorRT 10.13+, CUDA 13), build the TensorRT engine of a bundle on this device and install the service.
# The release table is nsdd_edge/assets/device_versions.json (docs/DEVICES.md); JetPack 6.0 (L4T R36.2/R36.3,
# TensorRT 8.6) and older are refused.
#
#   sudo deploy/jetson/setup.sh [--bundle DIR] [--precision fp16|int8|fp32] [--cuda-binding cuda-python|pycuda]
#                               [--prefix /opt/nsdd-edge] [--no-service]
#   deploy/jetson/setup.sh --detect-only            # print the L4T/JetPack/TensorRT release and exit
#   deploy/jetson/setup.sh --build-engine DIR       # (re)build DIR's engine with trtexec, register it
#
# Engines are built here, on the device, with trtexec --stronglyTyped (an engine is tied to the GPU and the
# TensorRT version): the ONNX types decide every layer's precision, so the physics part (DFT, spectra,
# projector: FP32 in every ONNX we export) stays FP32 while the student runs in FP16 (--precision fp16: the
# bundle's onnx_fp16) or INT8 (onnx_int8, Q/DQ). A bundle without that model gets an FP32 engine.
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

usage() { sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# Sets L4T, JETPACK, TRT_VERSION and CUDA_VERSION from /etc/nv_tegra_release and the release table
# ("# R36 (release), REVISION: 4.0, GCID: ..." -> l4t=R36.4.0 jetpack=6.1 tensorrt=10.3 cuda=12.6 python=3.10).
detect_jetpack() {
  local facts kv
  facts=$(PYTHONPATH="$SRC_DIR" python3 -m nsdd_edge.devices jetson "$NV_TEGRA_RELEASE") || exit 1
  for kv in $facts; do
    case "$kv" in
      l4t=*) L4T=${kv#l4t=} ;;
      jetpack=*) JETPACK=${kv#jetpack=} ;;
      tensorrt=*) TRT_VERSION=${kv#tensorrt=} ;;
      cuda=*) CUDA_VERSION=${kv#cuda=} ;;
    esac
  done
  DETECTED=$facts
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
  local bundle=$1 onnx="" kind
  [ -f "$bundle/bundle.json" ] || die "$bundle is not an nsdd-edge bundle (no bundle.json)"
  [ -x "$TRTEXEC" ] || die "trtexec not found at $TRTEXEC (install TensorRT from JetPack: apt install tensorrt)"
  detect_jetpack
  case "$PRECISION" in int8) kind=onnx_int8 ;; fp16) kind=onnx_fp16 ;; *) kind=onnx_fp32 ;; esac
  onnx=$(bundle_model "$bundle" "$kind")
  if [ -z "$onnx" ] && [ "$kind" != onnx_fp32 ]; then
    log "bundle has no $kind model (nsdd-export quantize --precision $PRECISION makes one): building FP32"
    kind=onnx_fp32
    onnx=$(bundle_model "$bundle" "$kind")
  fi
  [ -n "$onnx" ] || die "$bundle has no ONNX model to build an engine from (export one with nsdd-export)"
  local tmp
  tmp=$(mktemp "$bundle/.engine.XXXXXX")
  log "building the engine of $bundle from $onnx ($kind, --stronglyTyped: precision from the ONNX types) with $TRTEXEC; this takes minutes"
  if ! "$TRTEXEC" --onnx="$bundle/$onnx" --saveEngine="$tmp" --stronglyTyped --skipInference \
      >"$bundle/.trtexec.log" 2>&1; then
    rm -f "$tmp"
    die "trtexec failed; see $bundle/.trtexec.log"
  fi
  local trt_version
  trt_version=$("$PYTHON" -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || echo unknown)
  # register_engine moves the built file to engine.plan and records it in bundle.json, in place
  if ! "$PYTHON" "$SRC_DIR/deploy/jetson/register_engine.py" "$bundle" "$tmp" --precision "${kind#onnx_}" \
      --source-model "$kind" --typing strongly-typed --tensorrt "$trt_version" --jetpack "$JETPACK" --l4t "$L4T"; then
    rm -f "$tmp"
    die "could not register the engine in $bundle"
  fi
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
  # -c constraints.txt (numpy<2): pip must not replace the system numpy 1.x that cv2 and TensorRT need.
  local pip=("$PYTHON" -m pip install -c "$SRC_DIR/deploy/jetson/constraints.txt")
  "${pip[@]}" --upgrade pip
  # --no-deps keeps the system OpenCV (with GStreamer) instead of PyPI's opencv-python-headless.
  "${pip[@]}" --no-deps "$SRC_DIR"
  "${pip[@]}" "onnxruntime>=1.18"
  local cuda_major=${CUDA_VERSION%%.*}
  case "$CUDA_BINDING" in
    cuda-python) "${pip[@]}" "cuda-python>=$cuda_major,<$((cuda_major + 1))" ;;
    pycuda)
      # pycuda compiles against the CUDA toolkit and needs libcuda: build it here, on the device.
      PATH="/usr/local/cuda/bin:$PATH" CUDA_ROOT=/usr/local/cuda "${pip[@]}" "pycuda>=2022.2" ;;
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
    --precision) PRECISION=${2:?--precision needs fp16, int8 or fp32}; shift 2 ;;
    --cuda-binding) CUDA_BINDING=${2:?--cuda-binding needs cuda-python or pycuda}; shift 2 ;;
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --no-service) INSTALL_SERVICE=0; shift ;;
    --detect-only) MODE=detect; shift ;;
    --build-engine) MODE=engine; BUNDLE=${2:?--build-engine needs a bundle directory}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
case "$PRECISION" in fp16 | int8 | fp32) ;; *) die "--precision must be fp16, int8 or fp32, got $PRECISION" ;; esac
PYTHON="$PREFIX/venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python3

case "$MODE" in
  detect)
    detect_jetpack
    echo "$DETECTED"
    ;;
  engine)
    build_engine "$BUNDLE"
    ;;
  install)
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0 ...)"
    detect_jetpack
    log "$L4T: JetPack $JETPACK, TensorRT $TRT_VERSION, CUDA $CUDA_VERSION"
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
