#!/usr/bin/env bash
# A PostgreSQL server for the MLflow tracking store, in a data folder of its own (Debian's
# `postgresql` package; no system service needed). Creates the cluster and the `mlflow` database on
# first use, then runs the server in the foreground (its PID is this script's PID: stop it with
# SIGTERM or Ctrl-C).
#   tracking/postgres.sh /srv/sparselab-pg                  # 127.0.0.1:5432, local trust auth
#   PGPORT=5433 tracking/postgres.sh /tmp/pg                # another port
#   LISTEN=0.0.0.0 PGPASSWORD_MLFLOW=secret tracking/postgres.sh /srv/sparselab-pg   # a team server
# Then: BACKEND=postgresql://mlflow@127.0.0.1:5432/mlflow tracking/server.sh
# (with a password: postgresql://mlflow:secret@db-host:5432/mlflow).
set -euo pipefail
DATA="${1:?usage: tracking/postgres.sh DATA_DIR}"
PORT="${PGPORT:-5432}"
LISTEN="${LISTEN:-127.0.0.1}"
initdb_path="$(command -v initdb || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)"
[ -n "$initdb_path" ] || { echo "PostgreSQL is not installed: apt-get install postgresql" >&2; exit 2; }
BIN="$(dirname "$(readlink -f "$initdb_path")")"

# PostgreSQL refuses to run as root: run it as the 'postgres' user then.
as_owner=()
if [ "$(id -u)" = 0 ]; then as_owner=(setpriv --reuid=postgres --regid=postgres --init-groups); fi

if [ ! -f "$DATA/PG_VERSION" ]; then
  mkdir -p "$DATA"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$DATA"
  auth=trust
  [ -n "${PGPASSWORD_MLFLOW:-}" ] && auth=scram-sha-256
  "${as_owner[@]}" "$BIN/initdb" -D "$DATA" -U postgres --auth-local=trust --auth-host="$auth" \
    --no-sync >/dev/null
  if [ "$LISTEN" != 127.0.0.1 ]; then  # other machines may connect, with the password
    echo "host mlflow mlflow 0.0.0.0/0 scram-sha-256" >> "$DATA/pg_hba.conf"
  fi
  # one start to create the role and database, on a private socket only
  "${as_owner[@]}" "$BIN/pg_ctl" -D "$DATA" -w -s -o "-p $PORT -k $DATA -c listen_addresses=''" start
  password=""
  [ -n "${PGPASSWORD_MLFLOW:-}" ] && password=" PASSWORD '${PGPASSWORD_MLFLOW}'"
  "${as_owner[@]}" "$BIN/psql" -h "$DATA" -p "$PORT" -U postgres -q \
    -c "CREATE ROLE mlflow LOGIN${password}" -c "CREATE DATABASE mlflow OWNER mlflow"
  "${as_owner[@]}" "$BIN/pg_ctl" -D "$DATA" -w -s stop
fi
exec "${as_owner[@]}" "$BIN/postgres" -D "$DATA" -p "$PORT" -k "$DATA" -c "listen_addresses=$LISTEN"
