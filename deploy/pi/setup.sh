#!/usr/bin/env bash
# Raspberry Pi capture host: install nsdd-edge with picamera2 and the nsdd-camera service, which serves
# raw Bayer frames to one `nsdd-edge run --source tcp://PI:5000` client (e.g. a Jetson).
#
#   sudo deploy/pi/setup.sh [--prefix /opt/nsdd-edge] [--bind 0.0.0.0:5000] [--no-service]
#
# picamera2 and libcamera come from Raspberry Pi OS (apt python3-picamera2); they are not on PyPI in a
# usable form, so the venv uses the system site packages and nsdd-edge is installed without dependencies
# (numpy and OpenCV from apt, matching picamera2's numpy).
set -euo pipefail

SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PREFIX=/opt/nsdd-edge
CONF_DIR=/etc/nsdd-edge
SERVICE_USER=nsdd-cam
BIND=0.0.0.0:5000
INSTALL_SERVICE=1

die() { echo "setup.sh: error: $*" >&2; exit 1; }
log() { echo "setup.sh: $*" >&2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
    --bind) BIND=${2:?--bind needs HOST:PORT}; shift 2 ;;
    --no-service) INSTALL_SERVICE=0; shift ;;
    -h | --help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root (sudo $0 ...)"
if ! grep -qi 'raspberry pi' /proc/device-tree/model 2>/dev/null; then
  log "warning: this does not look like a Raspberry Pi; picamera2 only works there"
fi

log "installing apt packages"
apt-get update
apt-get install -y --no-install-recommends python3-picamera2 python3-venv python3-pip python3-numpy python3-opencv

python3 -m venv --system-site-packages "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --no-deps "$SRC_DIR"
"$PREFIX/venv/bin/python" -c 'import picamera2, nsdd_edge.sources as s; print(s.available_sources()["picamera2"])'

if ! id "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin "$SERVICE_USER"
fi
usermod -aG video "$SERVICE_USER"

if [ "$INSTALL_SERVICE" = 1 ]; then
  install -d "$CONF_DIR"
  env_file="$CONF_DIR/nsdd-camera.env"
  if [ ! -f "$env_file" ]; then
    token=$(python3 -c 'import secrets; print(secrets.token_hex(16))')
    sed -e "s|^NSDD_CAMERA_BIND=.*|NSDD_CAMERA_BIND=$BIND|" -e "s|^NSDD_CAMERA_TOKEN=.*|NSDD_CAMERA_TOKEN=$token|" \
      "$SRC_DIR/deploy/pi/nsdd-camera.env" >"$env_file"
    chown "root:$SERVICE_USER" "$env_file"
    chmod 0640 "$env_file"
    # the token is never printed (logs keep it): the client reads it from this file
    log "client token written to $env_file (NSDD_CAMERA_TOKEN, readable by root and $SERVICE_USER); give it to the" \
      "client as NSDD_CAMERA_TOKEN (or tcp://$(hostname).local:${BIND##*:}?token=...)"
  fi
  install -m 0644 "$SRC_DIR/deploy/pi/nsdd-camera.service" /etc/systemd/system/nsdd-camera.service
  if [ "$PREFIX" != /opt/nsdd-edge ]; then
    sed -i "s|/opt/nsdd-edge/venv|$PREFIX/venv|" /etc/systemd/system/nsdd-camera.service
  fi
  systemctl daemon-reload
  systemctl enable --now nsdd-camera.service
  log "nsdd-camera.service is running; logs: journalctl -u nsdd-camera -f"
fi
log "done"
