#!/usr/bin/env bash
# Install (or upgrade, or remove) a Microgrid household node on Debian 12 "bookworm" or
# Raspberry Pi OS (bookworm), arm64 or amd64. Idempotent: running it again with a new wheel or
# source tree upgrades the node and re-applies ownership and modes. docs/raspberry-pi.md has the
# whole procedure.
#
#   sudo packaging/install.sh [OPTIONS] SOURCE     SOURCE: a microgrid wheel (.whl) or a
#                                                  source directory (with pyproject.toml)
#   sudo packaging/install.sh --uninstall [--purge]
#
# Options:
#   --no-apt        do not install Debian packages (they must be there already)
#   --no-journald   do not install the journald size caps (journald.conf.d/microgrid.conf)
#   --no-start      do not (re)start the service, even where it was running before
#   --uninstall     stop and remove the service, the venv and the command; keep the key,
#                   config and data (/etc/microgrid, /var/lib/microgrid) and the user
#   --purge         with --uninstall: also delete /etc/microgrid (THE HOUSEHOLD'S KEY),
#                   /var/lib/microgrid and the user
#
# What it creates:
#   user/group microgrid  system user, no login, home /var/lib/microgrid, also in dialout
#   /opt/microgrid        virtual environment (root, 0755); the command /opt/microgrid/bin/microgrid,
#                         linked as /usr/local/bin/microgrid
#   /etc/microgrid        config, key, genesis (microgrid:microgrid, directory 0700, files 0600)
#   /var/lib/microgrid    ledger.db and raft.db (microgrid:microgrid, 0700)
#   /etc/systemd/system/microgrid-node.service          the hardened unit (enabled)
#   /etc/systemd/journald.conf.d/microgrid.conf         journal size caps for the SD card
#
# pip reads its usual environment (PIP_INDEX_URL, PIP_CERT, ...). Exit status: 0 done,
# 1 a step failed (the message names it), 2 bad usage or an unsupported system.
set -euo pipefail
umask 022

PREFIX=/opt/microgrid
CONF_DIR=/etc/microgrid
DATA_DIR=/var/lib/microgrid
SERVICE_USER=microgrid
UNIT_NAME=microgrid-node.service
UNIT_PATH=/etc/systemd/system/$UNIT_NAME
JOURNALD_PATH=/etc/systemd/journald.conf.d/microgrid.conf
COMMAND_LINK=/usr/local/bin/microgrid
DOC_DIR=$PREFIX/share/doc/microgrid
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# gcc, libc6-dev, libgmp-dev and python3-dev: libp2p pins fastecdsa, which pip compiles.
APT_PACKAGES=(python3 python3-venv python3-dev gcc libc6-dev libgmp-dev ca-certificates)

log() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit "${2:-1}"; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }

have_systemd() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

check_system() {
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0 ...)" 2
    [ -r /etc/os-release ] || die "/etc/os-release missing: not a Debian system" 2
    # shellcheck disable=SC1091
    . /etc/os-release
    case "${ID:-}:${VERSION_CODENAME:-}" in
        debian:bookworm | raspbian:bookworm) ;;
        *) die "supported: Debian or Raspberry Pi OS bookworm, found ${PRETTY_NAME:-unknown}" 2 ;;
    esac
    command -v dpkg >/dev/null || die "dpkg missing" 2
    local arch
    arch=$(dpkg --print-architecture)
    case "$arch" in
        arm64 | amd64) ;;
        *) die "supported architectures: arm64, amd64 (found $arch; on a Pi use the 64-bit OS)" 2 ;;
    esac
    log "system: ${PRETTY_NAME:-?}, $arch"
}

install_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        log "Debian packages: all present"
        return
    fi
    log "Debian packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
}

create_user() {
    if ! getent group "$SERVICE_USER" >/dev/null; then
        groupadd --system "$SERVICE_USER"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --gid "$SERVICE_USER" --home-dir "$DATA_DIR" --no-create-home \
            --shell /usr/sbin/nologin --comment "Microgrid household node" "$SERVICE_USER"
        log "created system user $SERVICE_USER"
    fi
    # serial (RS-485) adapters belong to group dialout
    if getent group dialout >/dev/null && ! id -nG "$SERVICE_USER" | grep -qw dialout; then
        usermod -a -G dialout "$SERVICE_USER"
    fi
}

create_dirs() {
    install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0700 "$CONF_DIR" "$DATA_DIR"
    # Re-applied on every run: a key or config written by root (or copied in with the wrong
    # mode) becomes the service user's, readable by it alone. The node refuses a key that
    # group or others can read.
    chown -R "$SERVICE_USER:$SERVICE_USER" "$CONF_DIR" "$DATA_DIR"
    chmod 0700 "$CONF_DIR" "$DATA_DIR"
    find "$CONF_DIR" -mindepth 1 -type f -exec chmod 0600 {} +
    find "$CONF_DIR" -mindepth 1 -type d -exec chmod 0700 {} +
}

# A wheel to install: SOURCE itself, or one built from a source directory into $1.
wheel_of() {
    local source=$1 workdir=$2
    if [ -f "$source" ]; then
        case "$source" in
            *.whl) printf '%s\n' "$source" ;;
            *) die "$source is not a wheel (.whl)" 2 ;;
        esac
        return
    fi
    [ -f "$source/pyproject.toml" ] || die "$source: neither a wheel nor a source directory" 2
    log "building a wheel from $source"
    "$PREFIX/bin/pip" wheel -q --no-deps --wheel-dir "$workdir" "$source" >&2 \
        || die "building a wheel from $source failed"
    local built=("$workdir"/microgrid-*.whl)
    [ -f "${built[0]}" ] || die "no microgrid wheel built from $source"
    printf '%s\n' "${built[0]}"
}

install_venv() {
    local source=$1 workdir wheel
    if [ -x "$PREFIX/bin/python" ] && ! "$PREFIX/bin/python" -c '' 2>/dev/null; then
        log "the venv's Python no longer runs (system Python upgraded?): recreating $PREFIX"
        rm -rf "$PREFIX"
    fi
    if [ ! -x "$PREFIX/bin/python" ]; then
        log "creating the virtual environment $PREFIX"
        python3 -m venv "$PREFIX" || die "python3 -m venv $PREFIX failed"
    fi
    workdir=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$workdir'" EXIT
    wheel=$(wheel_of "$source" "$workdir")
    log "installing $(basename "$wheel") and its dependencies (pip compiles fastecdsa)"
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    "$PREFIX/bin/pip" install -q "$wheel" || die "pip install $wheel failed"
    # Same version number, new code (an upgrade from a source tree): replace the project's
    # own files; the dependencies stay as they are.
    "$PREFIX/bin/pip" install -q --no-deps --force-reinstall "$wheel" \
        || die "pip install --force-reinstall $wheel failed"
    rm -rf "$workdir"
    trap - EXIT
    # The unit runs Python with PYTHONOPTIMIZE=2 (no docstrings: less memory) and cannot
    # write to /opt: compile every module for it now, or each start would compile them again.
    log "compiling the modules for the node's optimised Python"
    "$PREFIX/bin/python" -OO -m compileall -q -j 0 "$PREFIX/lib" >/dev/null 2>&1 \
        || log "some files under $PREFIX/lib did not compile (test data of dependencies; harmless)"
    "$PREFIX/bin/microgrid" --help >/dev/null || die "$PREFIX/bin/microgrid does not run"
    ln -sfn "$PREFIX/bin/microgrid" "$COMMAND_LINK"
    install -d -m 0755 "$DOC_DIR"
    local doc
    for doc in raspberry-pi.md node.md meters.md; do
        if [ -f "$HERE/../docs/$doc" ]; then install -m 0644 "$HERE/../docs/$doc" "$DOC_DIR/"; fi
    done
    log "installed $("$PREFIX/bin/pip" show microgrid 2>/dev/null | sed -n 's/^Version: /microgrid /p') in $PREFIX"
}

install_units() {
    install -d -m 0755 /etc/systemd/system
    install -m 0644 "$HERE/microgrid-node.service" "$UNIT_PATH"
    log "unit: $UNIT_PATH"
    JOURNALD_CHANGED=0
    if [ "$NO_JOURNALD" = 0 ]; then
        install -d -m 0755 "$(dirname "$JOURNALD_PATH")"
        if ! cmp -s "$HERE/journald-microgrid.conf" "$JOURNALD_PATH"; then
            install -m 0644 "$HERE/journald-microgrid.conf" "$JOURNALD_PATH"
            JOURNALD_CHANGED=1
        fi
        log "journald caps: $JOURNALD_PATH"
    fi
}

node_configured() {
    [ -f "$CONF_DIR/microgrid.toml" ] && [ -f "$CONF_DIR/node.key" ] \
        && [ -f "$CONF_DIR/genesis.json" ]
}

do_install() {
    local source=$1
    check_system
    if [ "$NO_APT" = 0 ]; then install_packages; fi
    command -v python3 >/dev/null || die "python3 missing (run without --no-apt)"
    local was_active=0
    if have_systemd && systemctl is-active --quiet "$UNIT_NAME"; then
        was_active=1
        log "stopping $UNIT_NAME for the upgrade"
        systemctl stop "$UNIT_NAME"
    fi
    create_user
    create_dirs
    install_venv "$source"
    install_units
    if have_systemd; then
        systemctl daemon-reload
        systemctl enable --quiet "$UNIT_NAME"
        if [ "$JOURNALD_CHANGED" = 1 ]; then systemctl restart systemd-journald; fi
        if [ "$NO_START" = 0 ] && { [ "$was_active" = 1 ] || node_configured; }; then
            systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
            systemctl start "$UNIT_NAME"
            log "started $UNIT_NAME (journalctl -u microgrid-node -f)"
        fi
    else
        # a chroot or a container without systemd: the unit is in place, enabled by link
        install -d -m 0755 /etc/systemd/system/multi-user.target.wants
        ln -sfn "$UNIT_PATH" "/etc/systemd/system/multi-user.target.wants/$UNIT_NAME"
        log "systemd is not running here: $UNIT_NAME installed and enabled, not started"
    fi
    if ! node_configured; then
        cat <<EOF
install.sh: next steps (docs/raspberry-pi.md):
  sudo -u $SERVICE_USER microgrid init --dir $CONF_DIR --listen /ip4/0.0.0.0/tcp/4001
  sudo -u $SERVICE_USER microgrid meter test --profile sdm630 --host METER_HOST --port 502
  (the operator sends genesis.json) sudo install -o $SERVICE_USER -g $SERVICE_USER -m 0600 genesis.json $CONF_DIR/
  sudo systemctl start microgrid-node && microgrid status --api http://127.0.0.1:8400
EOF
    fi
    log "done"
}

do_uninstall() {
    [ "$(id -u)" = 0 ] || die "run as root (sudo $0 --uninstall)" 2
    if have_systemd; then
        systemctl disable --now --quiet "$UNIT_NAME" 2>/dev/null || true
    fi
    rm -f "/etc/systemd/system/multi-user.target.wants/$UNIT_NAME" "$UNIT_PATH"
    local had_journald=0
    if [ -f "$JOURNALD_PATH" ]; then had_journald=1; fi
    rm -f "$JOURNALD_PATH"
    if have_systemd; then
        systemctl daemon-reload
        systemctl reset-failed "$UNIT_NAME" 2>/dev/null || true
        if [ "$had_journald" = 1 ]; then systemctl restart systemd-journald; fi
    fi
    if [ "$(readlink "$COMMAND_LINK" 2>/dev/null)" = "$PREFIX/bin/microgrid" ]; then
        rm -f "$COMMAND_LINK"
    fi
    rm -rf "$PREFIX"
    log "removed the service, $PREFIX and $COMMAND_LINK"
    if [ "$PURGE" = 1 ]; then
        rm -rf "$CONF_DIR" "$DATA_DIR"
        if getent passwd "$SERVICE_USER" >/dev/null; then userdel "$SERVICE_USER"; fi
        if getent group "$SERVICE_USER" >/dev/null; then groupdel "$SERVICE_USER"; fi
        log "purged $CONF_DIR (the key), $DATA_DIR and the user $SERVICE_USER"
    else
        log "kept $CONF_DIR (key, config, genesis), $DATA_DIR (ledger) and the user" \
            "$SERVICE_USER; --uninstall --purge deletes them"
    fi
}

NO_APT=0 NO_JOURNALD=0 NO_START=0 UNINSTALL=0 PURGE=0 SOURCE=""
while [ $# -gt 0 ]; do
    case "$1" in
        --no-apt) NO_APT=1 ;;
        --no-journald) NO_JOURNALD=1 ;;
        --no-start) NO_START=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        -h | --help) usage; exit 0 ;;
        -*) usage >&2; die "unknown option $1" 2 ;;
        *)
            [ -z "$SOURCE" ] || die "one SOURCE only (got $SOURCE and $1)" 2
            SOURCE=$1 ;;
    esac
    shift
done

if [ "$UNINSTALL" = 1 ]; then
    [ -z "$SOURCE" ] || die "--uninstall takes no SOURCE" 2
    do_uninstall
    exit 0
fi
[ "$PURGE" = 0 ] || die "--purge goes with --uninstall" 2
[ -n "$SOURCE" ] || { usage >&2; die "give a wheel or a source directory to install" 2; }
[ -e "$SOURCE" ] || die "$SOURCE does not exist" 2
SOURCE=$(realpath "$SOURCE")
do_install "$SOURCE"
