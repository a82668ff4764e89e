#!/usr/bin/env bash
# Start a local PostgreSQL (Debian package) for the PostgreSQL tests and print its URL.
# Idempotent: safe to run when the cluster is already up or the role already exists.
set -euo pipefail
if [ "$(id -u)" = "0" ]; then
    as_root() { "$@"; }
    as_pg() { runuser -u postgres -- "$@"; }
else
    as_root() { sudo "$@"; }
    as_pg() { sudo -u postgres "$@"; }
fi
if ! command -v pg_lsclusters >/dev/null 2>&1; then
    as_root apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi
read -r ver name _ < <(pg_lsclusters --no-header | head -n 1)
as_root pg_ctlcluster "$ver" "$name" start >/dev/null 2>&1 || true
for _ in $(seq 1 30); do
    if as_pg psql -qtAc "SELECT 1" >/dev/null 2>&1; then break; fi
    sleep 1
done
as_pg psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname='microgrid'" | grep -q 1 ||
    as_pg psql -qc "CREATE ROLE microgrid LOGIN SUPERUSER PASSWORD 'microgrid'" >/dev/null
port=$(as_pg psql -qtAc "SHOW port")
echo "postgresql+psycopg://microgrid:microgrid@127.0.0.1:${port}/postgres"
