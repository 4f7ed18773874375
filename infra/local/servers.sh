#!/usr/bin/env bash
# Local RabbitMQ and PostgreSQL for Nudge, without Docker.
#
# Both servers run from a data directory inside the checkout (default
# <checkout>/.local), listen on 127.0.0.1 only and use non-default ports, so
# they never collide with system services. See infra/local/README.md.
#
# Usage: servers.sh up|down|status|delayed-plugin|logs [-f]|env|restart-rabbitmq|crash-rabbitmq|restart-postgres|crash-postgres|ctl TOOL ARGS
#        servers.sh cluster-up|cluster-down|cluster-status|cluster-env|cluster-kill N|cluster-ctl N TOOL ARGS
#        servers.sh pg-standby-up|pg-standby-down|pg-standby-env|pg-promote|kill-postgres
#
# Progress goes to stderr; `up` and `env` print only KEY=value lines on stdout.
set -euo pipefail

SCRIPT_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
CHECKOUT=$(cd -- "$SCRIPT_DIR/../.." && pwd -P)
RMQ_SHIPPED_DIR=$CHECKOUT/infra/rabbitmq

LOCAL_DIR=${NUDGE_LOCAL_DIR:-$CHECKOUT/.local}
[[ $LOCAL_DIR == /* ]] || LOCAL_DIR=$PWD/$LOCAL_DIR
LOCAL_DIR=${LOCAL_DIR%/}

HOST=127.0.0.1
RMQ_PORT=${NUDGE_RABBITMQ_PORT:-35672}
RMQ_MGMT_PORT=${NUDGE_RABBITMQ_MGMT_PORT:-35673}
RMQ_PROM_PORT=${NUDGE_RABBITMQ_PROM_PORT:-35692}
RMQ_DIST_PORT=${NUDGE_RABBITMQ_DIST_PORT:-35679}
PG_PORT=${NUDGE_POSTGRES_PORT:-35432}
# The node name follows the AMQP port so that two checkouts running side by
# side (on different ports) do not fight over the same name in the shared epmd.
RMQ_NODE=${NUDGE_RABBITMQ_NODENAME:-nudge-$RMQ_PORT@localhost}
# The cluster's node N (1..3) listens on these offsets from CLUSTER_BASE_PORT, 19000 below
# the single node's AMQP port: out of Linux's ephemeral range (32768-60999), or a client
# retrying a killed node's port could be given that very port as its own, connect to itself
# and keep the node from listening there again.
CLUSTER_SIZE=3
CLUSTER_AMQP_OFFSET=0 CLUSTER_MGMT_OFFSET=10 CLUSTER_PROM_OFFSET=20 CLUSTER_DIST_OFFSET=30
CLUSTER_BASE_PORT=$((RMQ_PORT - 19000))
START_TIMEOUT=${NUDGE_SERVER_START_TIMEOUT:-90}
STOP_TIMEOUT=${NUDGE_SERVER_STOP_TIMEOUT:-60}
LOG_LINES=${NUDGE_LOG_LINES:-50}

PG_DB=nudge
PG_SUPERUSER=nudge
# The streaming standby (pg-standby-up) listens one port above the primary and replicates
# synchronously under this application name, as this replication user.
PG_STANDBY_PORT=$((PG_PORT + 1))
PG_STANDBY_NAME=nudge_standby
PG_REPL_USER=nudge_replication
# Lines pg_write_config adds to a server's nudge_local.conf (the standby's recovery settings).
PG_EXTRA_CONF=()

RMQ_BIN=/usr/lib/rabbitmq/bin
RMQ_DIR=$LOCAL_DIR/rabbitmq
RMQ_LOG=$RMQ_DIR/log/rabbitmq.log
RMQ_STARTUP_LOG=$RMQ_DIR/log/startup.log
RMQ_PID_FILE=$RMQ_DIR/rabbitmq.pid

PG_DIR=$LOCAL_DIR/postgres
PG_DATA=$PG_DIR/data
PG_LOG=$PG_DIR/log/postgres.log
PG_SOCKET_DIR=$PG_DIR/run
PG_BIN=

# initdb refuses to run as root, and the Debian RabbitMQ tooling expects its
# own user, so as root each server runs as its package's system user.
if [[ $EUID -eq 0 ]]; then
  RMQ_USER=rabbitmq
  PG_USER=postgres
else
  RMQ_USER=$(id -un)
  PG_USER=$RMQ_USER
fi

# ---------------------------------------------------------------- helpers

log() { printf '[servers] %s\n' "$*" >&2; }
die() {
  printf '[servers] error: %s\n' "$*" >&2
  exit 1
}

usage() {
  cat <<EOF
usage: $(basename "$0") COMMAND

  up                 start RabbitMQ and PostgreSQL (no-op for a server already up)
  down               stop both, and the cluster's nodes and the standby if any run
                     (no-op if already stopped)
  status             show both servers, the standby if any, and the delayed-message
                     plugin; exit 0 if both servers are up, 3 otherwise (the standby and
                     the plugin are optional)
  delayed-plugin     whether the broker has the delayed-message plugin loaded: exit 0
                     loaded, 4 none available, 5 available but not loaded, 3 broker down
  logs [-f]          last $LOG_LINES lines of both logs (-f: follow)
  env                print the NUDGE_* variables clients need (NUDGE_SERVICE_AMQP_URL:
                     the user services publish with; NUDGE_WORKER_AMQP_URL: the workers')
  restart-rabbitmq   stop and start RabbitMQ, keeping its data
  crash-rabbitmq     kill RabbitMQ as a crash would (SIGKILL of the Erlang VM: nothing is
                     flushed or closed cleanly), then start it (it recovers from its data)
  restart-postgres   stop and start PostgreSQL, keeping its data
  crash-postgres     kill PostgreSQL as a crash would (immediate shutdown: no checkpoint, WAL
                     still in memory is lost), then start it (it recovers from its WAL)
  ctl TOOL ARGS...   run rabbitmqctl, rabbitmq-diagnostics, rabbitmq-plugins or
                     rabbitmq-queues against the local node (same cookie and node name)

  cluster-up         start a three-node RabbitMQ cluster beside the single node (AMQP on
                     NUDGE_RABBITMQ_PORT-19000..-18998), join the nodes, create the users;
                     starts again any node that is down (it rejoins by itself)
  cluster-down       stop the cluster's nodes (no-op for those already stopped)
  cluster-status     one line per node and its cluster membership; exit 0 if all three are
                     up and clustered, 3 otherwise
  cluster-env        the NUDGE_* variables for the cluster (NUDGE_AMQP_URL: all three
                     addresses, comma-separated)
  cluster-kill N     SIGKILL node N's Erlang VM (1, 2 or 3), as a crash would
  cluster-ctl N TOOL ARGS...   like ctl, against cluster node N

  pg-standby-up      start a streaming standby of PostgreSQL on NUDGE_POSTGRES_PORT+1 (data
                     in postgres-standby/, made with pg_basebackup; the primary is started if
                     down) and make the primary's commits wait for it (synchronous_commit on,
                     synchronous_standby_names)
  pg-standby-down    stop the standby (no-op if stopped)
  pg-standby-env     NUDGE_DATABASE_URL naming the primary and the standby, read-write only
  pg-promote         promote the standby to a primary (pg_ctl promote); its data has then left
                     the old primary's timeline: remove postgres-standby/ to make a new standby
  kill-postgres      stop the primary hard (immediate shutdown) and leave it down

data dir: $LOCAL_DIR
EOF
}

check_settings() {
  local pair name value
  for pair in NUDGE_RABBITMQ_PORT="$RMQ_PORT" NUDGE_RABBITMQ_MGMT_PORT="$RMQ_MGMT_PORT" \
    NUDGE_RABBITMQ_PROM_PORT="$RMQ_PROM_PORT" NUDGE_RABBITMQ_DIST_PORT="$RMQ_DIST_PORT" \
    NUDGE_POSTGRES_PORT="$PG_PORT"; do
    name=${pair%%=*} value=${pair#*=}
    if [[ ! $value =~ ^[0-9]+$ ]] || ((value < 1 || value > 65535)); then
      die "$name is not a valid port: '$value'"
    fi
  done
  for pair in NUDGE_SERVER_START_TIMEOUT="$START_TIMEOUT" NUDGE_SERVER_STOP_TIMEOUT="$STOP_TIMEOUT" \
    NUDGE_LOG_LINES="$LOG_LINES"; do
    name=${pair%%=*} value=${pair#*=}
    [[ $value =~ ^[0-9]+$ ]] || die "$name must be a whole number, got '$value'"
  done
  ((PG_STANDBY_PORT <= 65535)) || die "NUDGE_POSTGRES_PORT=$PG_PORT leaves no port above it for the standby"
  local ports
  ports=$(printf '%s\n' "$RMQ_PORT" "$RMQ_MGMT_PORT" "$RMQ_PROM_PORT" "$RMQ_DIST_PORT" "$PG_PORT" \
    "$PG_STANDBY_PORT" | sort | uniq -d)
  [[ -z $ports ]] || die "the same port is configured twice: $ports"
  if ((CLUSTER_BASE_PORT < 1024 || CLUSTER_BASE_PORT + CLUSTER_DIST_OFFSET + CLUSTER_SIZE + 10000 > 65535)); then
    die "NUDGE_RABBITMQ_PORT=$RMQ_PORT puts the cluster's ports (19000 below it) out of range: pick one from 20024 to 36532"
  fi
}

# Sets AS_USER to the command prefix that runs a command as USER (empty
# unless we are root).
as_user() {
  AS_USER=()
  if [[ $EUID -eq 0 && $1 != root ]]; then
    AS_USER=(setpriv --reuid="$1" --regid="$(id -g "$1")" --init-groups --)
  fi
}

# Runs a command as USER. fd 9 holds this script's lock: nothing started from
# here may inherit it, or the lock would live as long as the server.
run_as() {
  as_user "$1"
  shift
  "${AS_USER[@]}" "$@" 9>&-
}

tcp_open() {
  # shellcheck disable=SC2016 # expanded by the inner bash
  timeout 3 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# Succeeds if URL answers 2xx; optional second argument is user:password.
http_ok() {
  local url=$1 auth=${2:-}
  if command -v curl >/dev/null; then
    curl -fsS -o /dev/null --max-time 5 ${auth:+-u "$auth"} "$url" 2>/dev/null
  else
    python3 - "$url" "$auth" <<'PY' 2>/dev/null
import base64, sys, urllib.request
url, auth = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url)
if auth:
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
with urllib.request.urlopen(req, timeout=5) as resp:
    sys.exit(0 if 200 <= resp.status < 300 else 1)
PY
  fi
}

# A zombie counts as gone: a killed server may wait a moment to be reaped.
pid_alive() {
  local stat
  [[ -n $1 ]] && kill -0 "$1" 2>/dev/null || return 1
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# wait_for READY ALIVE: polls until the command READY succeeds (returns 0)
# or the command ALIVE fails (returns 1), for at most START_TIMEOUT seconds
# (returns 2). Both are word-split into a command and its arguments.
wait_for() {
  local deadline=$((SECONDS + START_TIMEOUT))
  until $1; do
    $2 || return 1
    ((SECONDS < deadline)) || return 2
    sleep 1
  done
}

# Waits up to TIMEOUT seconds for PID to exit.
wait_gone() {
  local pid=$1 deadline=$((SECONDS + $2))
  while pid_alive "$pid"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.5
  done
}

# Prints the last lines of each existing log file to stderr.
show_logs() {
  local f
  for f in "$@"; do
    [[ -s $f ]] || continue
    printf '%s\n' "----- last 40 lines of $f" >&2
    tail -n 40 "$f" >&2
  done
}

apt_install() {
  local pkg=$1
  [[ $EUID -eq 0 ]] ||
    die "$pkg is not installed and only root can install it (sudo apt-get install -y $pkg)"
  command -v apt-get >/dev/null || die "$pkg is not installed and there is no apt-get: install it by hand"
  log "installing $pkg with apt-get"
  # Package output goes to stderr: stdout is reserved for the env lines.
  {
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg"
  } >&2
}

take_lock() {
  prepare_local_dir
  exec 9>>"$LOCAL_DIR/.servers.lock"
  flock -w $((START_TIMEOUT + STOP_TIMEOUT)) 9 ||
    die "another servers.sh is still working on $LOCAL_DIR"
}

prepare_local_dir() {
  mkdir -p "$LOCAL_DIR"
  # The service users only need to pass through this directory.
  if [[ $EUID -eq 0 ]]; then chmod o+x "$LOCAL_DIR"; fi
}

# make_owned_dir USER MODE DIR...: creates DIRs owned by USER.
make_owned_dir() {
  local user=$1 mode=$2 dir
  shift 2
  for dir in "$@"; do
    mkdir -p "$dir"
    if [[ $EUID -eq 0 ]]; then chown "$user:$(id -g "$user")" "$dir"; fi
    chmod "$mode" "$dir"
  done
}

# Installs FILE (written by us) as DEST, owned by USER.
install_file() {
  local user=$1 mode=$2 src=$3 dest=$4
  chmod "$mode" "$src"
  if [[ $EUID -eq 0 ]]; then chown "$user:$(id -g "$user")" "$src"; fi
  mv -f "$src" "$dest"
}

# As root the servers run as other users, who must be able to reach DIR
# through every parent directory. A checkout under a private directory (such
# as one made by mktemp -d, or /root) is not reachable: fail with the fix, or
# apply it when NUDGE_LOCAL_FIX_PERMS=1.
ensure_reachable() {
  local user=$1 dir=$2 path='' part mode
  [[ $EUID -eq 0 && $user != root ]] || return 0
  if run_as "$user" test -w "$dir" -a -x "$dir"; then return 0; fi
  local -a parts
  IFS=/ read -ra parts <<<"${dir#/}"
  for part in "${parts[@]}"; do
    path+=/$part
    run_as "$user" test -x "$path" && continue
    mode=$(stat -c '%A %U' "$path")
    if [[ ${NUDGE_LOCAL_FIX_PERMS:-0} == 1 ]]; then
      log "chmod o+x $path ($mode) so that $user can reach $dir"
      chmod o+x "$path"
      continue
    fi
    die "user '$user' cannot reach $dir: $path ($mode) is not traversable by others. Fix it with one of:
  - chmod o+x '$path'   (others may then pass through it, not list it)
  - NUDGE_LOCAL_FIX_PERMS=1 $0 ...   (does that chmod for every such parent)
  - NUDGE_LOCAL_DIR=/var/tmp/nudge-local $0 ...   (keeps the data outside $path)"
  done
  run_as "$user" test -w "$dir" -a -x "$dir" || die "user '$user' cannot write to $dir"
}

# --------------------------------------------------------------- RabbitMQ

ensure_rabbitmq_installed() {
  [[ -x /usr/sbin/rabbitmq-server ]] || apt_install rabbitmq-server
  [[ -x $RMQ_BIN/rabbitmq-server ]] || die "$RMQ_BIN/rabbitmq-server is missing after installing rabbitmq-server"
  id -u "$RMQ_USER" >/dev/null 2>&1 || die "user '$RMQ_USER' does not exist (it comes with the rabbitmq-server package)"
}

# Environment shared by the server and every CLI call, so that nothing is read
# from or written to /etc/rabbitmq or /var/lib/rabbitmq, and so that the CLI
# finds the same Erlang cookie (in $HOME) as the server.
rmq_env() {
  local ctl_min=$((RMQ_DIST_PORT + 10000))
  ((ctl_min + 10 < 65536)) || ctl_min=$((RMQ_DIST_PORT - 1010))
  RMQ_ENV=(
    HOME="$RMQ_DIR/home"
    RABBITMQ_NODENAME="$RMQ_NODE"
    RABBITMQ_USE_LONGNAME=false
    RABBITMQ_DIST_PORT="$RMQ_DIST_PORT"
    RABBITMQ_CONF_ENV_FILE="$RMQ_DIR/rabbitmq-env.conf"
    RABBITMQ_CONFIG_FILE="$RMQ_DIR/rabbitmq.conf"
    RABBITMQ_CONFIG_FILES="$RMQ_DIR/conf.d"
    RABBITMQ_ADVANCED_CONFIG_FILE="$RMQ_DIR/advanced.config"
    RABBITMQ_ENABLED_PLUGINS_FILE="$RMQ_DIR/enabled_plugins"
    RABBITMQ_MNESIA_BASE="$RMQ_DIR/mnesia"
    RABBITMQ_LOG_BASE="$RMQ_DIR/log"
    RABBITMQ_LOGS="$RMQ_LOG"
    RABBITMQ_PID_FILE="$RMQ_PID_FILE"
    ERL_CRASH_DUMP="$RMQ_DIR/log/erl_crash.dump"
    # Erlang distribution on loopback only, for the node and the CLI.
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    # The CLI's own distribution ports default to 35672-35682, which would
    # collide with the AMQP and management ports used here.
    RABBITMQ_CTL_DIST_PORT_MIN="$ctl_min"
    RABBITMQ_CTL_DIST_PORT_MAX="$((ctl_min + 10))"
  )
  delayed_env
}

# rmq_tool TOOL ARGS...: runs a RabbitMQ CLI tool against our node.
rmq_tool() {
  local tool=$1
  shift
  rmq_env
  run_as "$RMQ_USER" env -C "$RMQ_DIR" "${RMQ_ENV[@]}" "$RMQ_BIN/$tool" -n "$RMQ_NODE" "$@"
}

# Succeeds if PID is a RabbitMQ VM started for this data directory.
rmq_is_ours() {
  local pid=$1 comm environ
  read -r comm 2>/dev/null <"/proc/$pid/comm" && [[ $comm == beam.smp ]] || return 1
  environ=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ") || return 1
  grep -qxF "RABBITMQ_MNESIA_BASE=$RMQ_DIR/mnesia" <<<"$environ"
}

# Prints the pid of the RabbitMQ VM serving this data directory, if any. The
# pid file is written a little into the boot, so fall back to a process scan.
rmq_find_pid() {
  local pid proc
  if [[ -r $RMQ_PID_FILE ]]; then
    pid=$(tr -dc '0-9' <"$RMQ_PID_FILE")
    if [[ -n $pid ]] && rmq_is_ours "$pid"; then
      echo "$pid"
      return 0
    fi
  fi
  for proc in /proc/[0-9]*; do
    pid=${proc#/proc/}
    if rmq_is_ours "$pid"; then
      echo "$pid"
      return 0
    fi
  done
  return 1
}

rmq_answering() {
  tcp_open "$HOST" "$RMQ_PORT" &&
    http_ok "http://$HOST:$RMQ_MGMT_PORT/api/overview" guest:guest &&
    http_ok "http://$HOST:$RMQ_PROM_PORT/metrics"
}

rmq_render_config() {
  local shipped=$RMQ_SHIPPED_DIR/rabbitmq.conf plugins=$RMQ_SHIPPED_DIR/enabled_plugins key
  [[ -f $shipped ]] || die "missing $shipped"
  [[ -f $plugins ]] || die "missing $plugins"
  # RabbitMQ does not reject duplicate keys, so a listener set in the shipped
  # file would silently fight with the local one: refuse instead.
  for key in listeners.tcp management.tcp prometheus.tcp; do
    if grep -Eq "^[[:space:]]*${key//./\\.}\." "$shipped"; then
      die "$shipped must not set $key.*: servers.sh adds the local listeners itself"
    fi
  done
  {
    printf '# Generated by infra/local/servers.sh from infra/rabbitmq/rabbitmq.conf.\n'
    printf '# Edit that file instead; this copy is rewritten on every "up".\n\n'
    cat "$shipped"
    printf '\n## Local overrides added by servers.sh: loopback only, non-default ports.\n'
    printf 'listeners.tcp.default = %s:%s\n' "$HOST" "$RMQ_PORT"
    printf 'management.tcp.ip = %s\n' "$HOST"
    printf 'management.tcp.port = %s\n' "$RMQ_MGMT_PORT"
    printf 'prometheus.tcp.ip = %s\n' "$HOST"
    printf 'prometheus.tcp.port = %s\n' "$RMQ_PROM_PORT"
    # Not config, but part of what the node was started with (see rmq_apply_config).
    printf '# node=%s dist_port=%s\n' "$RMQ_NODE" "$RMQ_DIST_PORT"
    delayed_conf_note
  } >"$RMQ_DIR/rabbitmq.conf.new"
  cp "$plugins" "$RMQ_DIR/enabled_plugins.new"
  delayed_enable "$RMQ_DIR/enabled_plugins.new"
}

# Moves the freshly rendered files into place. While the node runs they must
# not change: it would keep its old ports and `up` would wait for nothing.
rmq_apply_config() {
  local running=$1
  if [[ $running == yes ]] && ! cmp -s "$RMQ_DIR/rabbitmq.conf.new" "$RMQ_DIR/rabbitmq.conf"; then
    rm -f "$RMQ_DIR/rabbitmq.conf.new" "$RMQ_DIR/enabled_plugins.new"
    die "rabbitmq from $RMQ_DIR is running with other settings (ports, node name or config): run '$0 restart-rabbitmq'"
  fi
  install_file "$RMQ_USER" 640 "$RMQ_DIR/rabbitmq.conf.new" "$RMQ_DIR/rabbitmq.conf"
  install_file "$RMQ_USER" 640 "$RMQ_DIR/enabled_plugins.new" "$RMQ_DIR/enabled_plugins"
}

rmq_prepare() {
  make_owned_dir "$RMQ_USER" 750 "$RMQ_DIR" "$RMQ_DIR/mnesia" "$RMQ_DIR/log" "$RMQ_DIR/conf.d"
  make_owned_dir "$RMQ_USER" 700 "$RMQ_DIR/home"
  ensure_reachable "$RMQ_USER" "$RMQ_DIR"
  if [[ ! -f $RMQ_DIR/rabbitmq-env.conf ]]; then
    printf '# Intentionally empty: stops /etc/rabbitmq/rabbitmq-env.conf from being read.\n' \
      >"$RMQ_DIR/rabbitmq-env.conf.new"
    install_file "$RMQ_USER" 640 "$RMQ_DIR/rabbitmq-env.conf.new" "$RMQ_DIR/rabbitmq-env.conf"
  fi
  # A cookie of our own: the system node's cookie in /var/lib/rabbitmq is
  # neither needed nor readable by a non-root user.
  if [[ ! -s $RMQ_DIR/home/.erlang.cookie ]]; then
    od -An -N20 -tx1 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F' >"$RMQ_DIR/home/.erlang.cookie.new"
    install_file "$RMQ_USER" 400 "$RMQ_DIR/home/.erlang.cookie.new" "$RMQ_DIR/home/.erlang.cookie"
  fi
  rmq_render_config
}

rmq_check_ports_free() {
  local port
  for port in "$RMQ_PORT" "$RMQ_MGMT_PORT" "$RMQ_PROM_PORT" "$RMQ_DIST_PORT"; do
    if tcp_open "$HOST" "$port"; then
      die "rabbitmq: port $HOST:$port is already used by another process (pick other NUDGE_RABBITMQ_*_PORT values)"
    fi
  done
}

rmq_fail() {
  log "rabbitmq: $1"
  show_logs "$RMQ_LOG"
  # Boot failures (a bad config key, say) only reach the console output, and
  # the root cause is at the start of a long crash report.
  printf '%s\n' "----- first errors of this start in $RMQ_STARTUP_LOG" >&2
  awk '/^===== /{ buf = "" } { buf = buf $0 "\n" } END { printf "%s", buf }' "$RMQ_STARTUP_LOG" |
    grep -m 20 -F '[error]' >&2 || true
  exit 1
}

rmq_fail_timeout() {
  rmq_fail "not ready after ${START_TIMEOUT}s (it is still running: '$0 down' stops it)"
}

rmq_up() {
  local pid rc=0
  ensure_rabbitmq_installed
  delayed_prepare
  rmq_prepare
  if pid=$(rmq_find_pid); then
    rmq_apply_config yes
    if rmq_answering; then
      log "rabbitmq: already up (pid $pid, amqp $HOST:$RMQ_PORT)"
      return 0
    fi
    log "rabbitmq: running (pid $pid) but not answering yet, waiting"
    wait_for rmq_answering "pid_alive $pid" || rc=$?
    case $rc in
      0) return 0 ;;
      2) rmq_fail_timeout ;;
    esac
    log "rabbitmq: pid $pid exited, starting a new node"
  fi
  rmq_apply_config no
  rmq_check_ports_free
  rm -f "$RMQ_PID_FILE"
  printf '\n===== %s starting %s\n' "$(date '+%F %T')" "$RMQ_NODE" >>"$RMQ_STARTUP_LOG"
  log "rabbitmq: starting $RMQ_NODE (amqp $HOST:$RMQ_PORT, management $RMQ_MGMT_PORT, prometheus $RMQ_PROM_PORT)"
  rmq_env
  # Not the Debian wrapper /usr/sbin/rabbitmq-server: it forces the working
  # directory and logs into /var and resets HOME (and with it the cookie).
  # setsid detaches the node from this terminal's Ctrl-C and hangups.
  # A plain command, not a shell function: a backgrounded function would leave
  # a copy of this shell (holding the lock) around for the node's lifetime.
  as_user "$RMQ_USER"
  "${AS_USER[@]}" setsid -w env -C "$RMQ_DIR" "${RMQ_ENV[@]}" "$RMQ_BIN/rabbitmq-server" \
    9>&- >>"$RMQ_STARTUP_LOG" 2>&1 </dev/null &
  wait_for rmq_answering "pid_alive $!" || rc=$?
  case $rc in
    1) rmq_fail "the server exited during startup" ;;
    2) rmq_fail_timeout ;;
  esac
  log "rabbitmq: up (pid $(rmq_find_pid || echo '?'))"
}

rmq_down() {
  local pid out
  if ! pid=$(rmq_find_pid); then
    log "rabbitmq: already down"
    rm -f "$RMQ_PID_FILE"
    return 0
  fi
  log "rabbitmq: stopping (pid $pid)"
  # `stop <pidfile>` returns once the VM process has exited.
  if ! out=$(rmq_tool rabbitmqctl stop "$RMQ_PID_FILE" 2>&1 </dev/null); then
    log "rabbitmq: rabbitmqctl stop failed, sending SIGTERM: ${out//$'\n'/ }"
    kill -TERM "$pid" 2>/dev/null || true
  fi
  if ! wait_gone "$pid" "$STOP_TIMEOUT"; then
    log "rabbitmq: still running after ${STOP_TIMEOUT}s, killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || die "rabbitmq: could not kill pid $pid"
  fi
  rm -f "$RMQ_PID_FILE"
  log "rabbitmq: down"
}

rmq_crash() {
  local pid
  if ! pid=$(rmq_find_pid); then
    log "rabbitmq: not running"
    rm -f "$RMQ_PID_FILE"
    return 0
  fi
  log "rabbitmq: crashing (SIGKILL to the Erlang VM, pid $pid)"
  kill -KILL "$pid" 2>/dev/null || true
  wait_gone "$pid" 10 || die "rabbitmq: could not kill pid $pid"
  rm -f "$RMQ_PID_FILE"
  log "rabbitmq: down (crashed)"
}

rmq_status() {
  local pid
  if pid=$(rmq_find_pid); then
    if rmq_answering; then
      printf 'rabbitmq  up        amqp=%s:%s management=%s prometheus=%s node=%s pid=%s\n' \
        "$HOST" "$RMQ_PORT" "$RMQ_MGMT_PORT" "$RMQ_PROM_PORT" "$RMQ_NODE" "$pid"
      return 0
    fi
    printf 'rabbitmq  starting  amqp=%s:%s pid=%s (running, not answering yet)\n' "$HOST" "$RMQ_PORT" "$pid"
    return 1
  fi
  printf 'rabbitmq  down      amqp=%s:%s\n' "$HOST" "$RMQ_PORT"
  return 1
}

# ----------------------------------------------------------- broker users

# Nudge's broker users (nudge-service, nudge-worker) with the permissions of
# infra/rabbitmq/definitions.json on vhost /, each with a password generated on
# the first `up` and kept in $RMQ_USERS_FILE. guest stays the local administrator
# (loopback only).
RMQ_USERS_FILE=$RMQ_DIR/users.env

rmq_user_passwords() {
  if [[ ! -s $RMQ_USERS_FILE ]]; then
    (
      umask 077
      printf 'nudge-service=%s\nnudge-worker=%s\n' \
        "$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')" \
        "$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')" >"$RMQ_USERS_FILE.new"
    )
    mv -f "$RMQ_USERS_FILE.new" "$RMQ_USERS_FILE"
  fi
}

# Creates or updates the users through the management API (idempotent, and
# cheap: no rabbitmqctl VM to boot on every `up`).
rmq_ensure_users() {
  local definitions=$RMQ_SHIPPED_DIR/definitions.json
  [[ -f $definitions ]] || die "missing $definitions"
  rmq_user_passwords
  python3 - "$definitions" "$RMQ_USERS_FILE" "http://$HOST:$RMQ_MGMT_PORT/api" <<'PY' ||
import base64, json, sys, urllib.parse, urllib.request
definitions, passwords_file, api = sys.argv[1:]
passwords = dict(line.split("=", 1) for line in open(passwords_file).read().split())
auth = "Basic " + base64.b64encode(b"guest:guest").decode()

def put(path, body):
    req = urllib.request.Request(api + path, json.dumps(body).encode(), method="PUT")
    req.add_header("Authorization", auth)
    req.add_header("Content-Type", "application/json")
    urllib.request.urlopen(req, timeout=10).close()

doc = json.load(open(definitions))
for user in doc["users"]:
    name = user["name"]
    put("/users/" + urllib.parse.quote(name, safe=""),
        {"password": passwords[name], "tags": user["tags"]})
for p in doc["permissions"]:
    put("/permissions/%s/%s" % tuple(urllib.parse.quote(p[k], safe="") for k in ("vhost", "user")),
        {k: p[k] for k in ("configure", "write", "read")})
PY
    die "rabbitmq: could not create the users of $definitions"
  log "rabbitmq: users nudge-service and nudge-worker ready (passwords in $RMQ_USERS_FILE)"
}

# The AMQP URL of each Nudge user, once `up` has created them.
print_users_env() {
  [[ -s $RMQ_USERS_FILE ]] || return 0
  local service worker
  service=$(sed -n 's/^nudge-service=//p' "$RMQ_USERS_FILE")
  worker=$(sed -n 's/^nudge-worker=//p' "$RMQ_USERS_FILE")
  printf 'NUDGE_SERVICE_AMQP_URL=amqp://nudge-service:%s@%s:%s/\n' "$service" "$HOST" "$RMQ_PORT"
  printf 'NUDGE_WORKER_AMQP_URL=amqp://nudge-worker:%s@%s:%s/\n' "$worker" "$HOST" "$RMQ_PORT"
}

# ------------------------------------------------ delayed-message plugin
#
# The rabbitmq_delayed_message_exchange plugin (the `plugin` delay backend) is
# not shipped by Debian's rabbitmq-server. `up` makes it available, in order:
#   - NUDGE_DELAYED_PLUGIN=off: not at all;
#   - NUDGE_RABBITMQ_PLUGINS_DIR: a folder holding a prebuilt plugin (the
#     release .ez, or its unpacked folder), used as is;
#   - NUDGE_DELAYED_PLUGIN_SRC: the plugin's source (upstream tag matching the
#     broker's series), compiled with erlc against the broker's own headers
#     into $LOCAL_DIR/plugins, once (again when the source or broker changes);
#   - else <checkout>/../shared/vendor/rabbitmq-delayed-message-exchange-*, if
#     it exists, built the same way.
# An explicit setting that does not work stops `up`; a found source that does
# not build only warns (the ladder backend needs no plugin). The outcome is
# kept in $LOCAL_DIR/plugins/delayed.state for `status` and `delayed-plugin`.

DELAYED_APP=rabbitmq_delayed_message_exchange
DELAYED_DIR=$LOCAL_DIR/plugins
DELAYED_STATE=$DELAYED_DIR/delayed.state

# Prints the broker's installation folder (rabbitmq_server-X.Y.Z).
broker_home() { dirname "$(dirname "$(readlink -f "$RMQ_BIN/rabbitmq-server")")"; }

broker_version() { local h; h=$(broker_home) && echo "${h##*rabbitmq_server-}"; }

# delayed_state RESULT DETAIL [PATH [PROBLEM]]: records the outcome for status and tests.
delayed_state() {
  mkdir -p "$DELAYED_DIR"
  printf 'result=%s\ndetail=%s\npath=%s\nproblem=%s\n' "$1" "$2" "${3:-}" "${4:-}" >"$DELAYED_STATE.new"
  mv -f "$DELAYED_STATE.new" "$DELAYED_STATE"
}

# delayed_state_get KEY: a value from the recorded outcome (empty if none).
delayed_state_get() {
  [[ -r $DELAYED_STATE ]] || return 0
  sed -n "s/^$1=//p" "$DELAYED_STATE" | head -n 1
}

# Prints the plugin source folder to build, or nothing.
delayed_find_src() {
  local series candidate best=''
  if [[ -n ${NUDGE_DELAYED_PLUGIN_SRC:-} ]]; then
    echo "$NUDGE_DELAYED_PLUGIN_SRC"
    return 0
  fi
  series=$(broker_version) && series=${series%.*}
  for candidate in "$CHECKOUT"/../shared/vendor/rabbitmq-delayed-message-exchange-*; do
    [[ -d $candidate/src ]] || continue
    # Prefer the release of the broker's series (3.10.x for RabbitMQ 3.10).
    if [[ ${candidate##*-} == "$series".* ]]; then best=$candidate; fi
    [[ -n $best ]] || best=$candidate
  done
  [[ -z $best ]] || readlink -f "$best"
}

# delayed_fail EXPLICIT MESSAGE: dies for an explicit setting, else warns.
delayed_fail() {
  if [[ $1 == yes ]]; then
    delayed_state failed "$2"
    die "delayed-message plugin: $2"
  fi
  log "delayed-message plugin: WARNING: $2 (the broker starts without it; only the tiers backend works)"
  delayed_state failed "$2"
}

# Compiles SRC into $DELAYED_DIR unless the same source was built for the same broker.
delayed_build() {
  local src=$1 explicit=$2 vsn bversion home p stamp out tmp mods
  vsn=${src##*-}
  if [[ ! $vsn =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
    delayed_fail "$explicit" "cannot tell the plugin version of $src: name the folder rabbitmq-delayed-message-exchange-X.Y.Z (its upstream tag)"
    return 0
  fi
  if ! compgen -G "$src/src/*.erl" >/dev/null; then
    delayed_fail "$explicit" "$src has no src/*.erl: expected the plugin's upstream source tree"
    return 0
  fi
  bversion=$(broker_version)
  if [[ ${vsn%.*} != "${bversion%.*}" ]]; then
    delayed_fail "$explicit" "plugin $vsn is for RabbitMQ ${vsn%.*}.x, the broker is $bversion: use the plugin tag of the broker's series"
    return 0
  fi
  command -v erlc >/dev/null || apt_install erlang-base # Debian's erlc is in erlang-base
  home=$(broker_home)
  p=$home/plugins
  stamp=$( {
    echo "broker=$bversion vsn=$vsn erlc=$(readlink -f "$(command -v erlc)")"
    cat "$src"/src/*.erl
  } | sha256sum | cut -c1-16)
  out=$DELAYED_DIR/$DELAYED_APP-$vsn
  if [[ -f $DELAYED_DIR/.built-$stamp && -f $out/ebin/$DELAYED_APP.app ]]; then
    delayed_state built "$DELAYED_APP $vsn (cached build of $src)" "$DELAYED_DIR"
    return 0
  fi
  log "delayed-message plugin: building $vsn from $src"
  rm -rf "$DELAYED_DIR"/"$DELAYED_APP"-* "$DELAYED_DIR"/.built-*
  tmp=$DELAYED_DIR/.build
  rm -rf "$tmp"
  mkdir -p "$tmp/ebin"
  if ! erlc -o "$tmp/ebin" -I "$p/rabbit_common-$bversion/include" -I "$p/rabbit-$bversion/include" \
    -pa "$p/rabbit_common-$bversion/ebin" -pa "$p/rabbit-$bversion/ebin" \
    "$src"/src/*.erl >"$DELAYED_DIR/build.log" 2>&1; then
    rm -rf "$tmp"
    delayed_fail "$explicit" "erlc failed on $src (see $DELAYED_DIR/build.log)"
    return 0
  fi
  # erlang.mk writes the application resource file upstream; the same content by hand.
  mods=$(cd "$tmp/ebin" && for f in *.beam; do printf '%s,' "${f%.beam}"; done)
  cat >"$tmp/ebin/$DELAYED_APP.app" <<APP
{application, '$DELAYED_APP', [
  {description, "RabbitMQ Delayed Message Exchange"},
  {vsn, "$vsn"},
  {modules, [${mods%,}]},
  {registered, []},
  {applications, [kernel, stdlib, rabbit_common, rabbit]},
  {mod, {rabbit_delayed_message_app, []}},
  {env, []},
  {broker_version_requirements, ["${vsn%.*}.0"]}
]}.
APP
  mv "$tmp" "$out"
  chmod -R a+rX "$DELAYED_DIR"
  touch "$DELAYED_DIR/.built-$stamp"
  delayed_state built "$DELAYED_APP $vsn (built from $src)" "$DELAYED_DIR"
}

# Decides where the plugin comes from (see the top of this section); before the config is rendered.
delayed_prepare() {
  local src extra=${NUDGE_RABBITMQ_PLUGINS_DIR:-}
  mkdir -p "$DELAYED_DIR"
  chmod a+rx "$DELAYED_DIR"
  case ${NUDGE_DELAYED_PLUGIN:-on} in
    on) ;;
    off)
      delayed_state off "NUDGE_DELAYED_PLUGIN=off"
      return 0
      ;;
    *) die "NUDGE_DELAYED_PLUGIN must be 'on' or 'off', got '$NUDGE_DELAYED_PLUGIN'" ;;
  esac
  if [[ -n $extra ]]; then
    extra=$(readlink -f "$extra") || die "NUDGE_RABBITMQ_PLUGINS_DIR: no such folder"
    compgen -G "$extra/$DELAYED_APP-*" >/dev/null ||
      die "NUDGE_RABBITMQ_PLUGINS_DIR=$extra holds no $DELAYED_APP-*.ez (download the release matching RabbitMQ $(broker_version))"
    delayed_state built "prebuilt $(basename "$(compgen -G "$extra/$DELAYED_APP-*" | head -n 1)") from $extra" "$extra"
    return 0
  fi
  src=$(delayed_find_src)
  if [[ -z $src ]]; then
    delayed_state absent "no plugin source: set NUDGE_DELAYED_PLUGIN_SRC to its upstream source, or NUDGE_RABBITMQ_PLUGINS_DIR to a folder with its release .ez"
    log "delayed-message plugin: not available ($(delayed_state_get detail))"
    return 0
  fi
  if [[ ! -d $src ]]; then
    delayed_fail yes "NUDGE_DELAYED_PLUGIN_SRC=$src is not a folder"
  fi
  delayed_build "$src" "$([[ -n ${NUDGE_DELAYED_PLUGIN_SRC:-} ]] && echo yes || echo no)"
}

# Appends the plugin's folder to RMQ_ENV's plugins path (server and CLI alike).
delayed_env() {
  local path
  path=$(delayed_state_get path)
  [[ -n $path && $(delayed_state_get result) != off ]] || return 0
  RMQ_ENV+=(RABBITMQ_PLUGINS_DIR="$(broker_home)/plugins:$path")
}

# delayed_enable FILE: adds the plugin to an enabled_plugins file being rendered.
delayed_enable() {
  [[ -n $(delayed_state_get path) ]] || return 0
  case $(delayed_state_get result) in built | loaded) ;; *) return 0 ;; esac
  sed -i "s/\][[:space:]]*\.[[:space:]]*\$/,$DELAYED_APP]./" "$1"
}

# A line for the rendered rabbitmq.conf: a node started with another plugin build differs.
delayed_conf_note() {
  printf '# delayed-message plugin: %s %s\n' "$(delayed_state_get path)" \
    "$(cd "$DELAYED_DIR" 2>/dev/null && compgen -G '.built-*' || true)"
}

# Succeeds if the running broker knows the x-delayed-message exchange type.
delayed_loaded() {
  local body
  body=$(curl -fsS --max-time 5 -u guest:guest "http://$HOST:$RMQ_MGMT_PORT/api/overview" 2>/dev/null) || return 1
  grep -qF '"name":"x-delayed-message"' <<<"$body"
}

# After the broker is up: records whether the plugin it was given is loaded.
delayed_check_loaded() {
  case $(delayed_state_get result) in built | loaded) ;; *) return 0 ;; esac
  local detail
  detail=$(delayed_state_get detail)
  if delayed_loaded; then
    delayed_state loaded "$detail" "$(delayed_state_get path)"
    log "delayed-message plugin: loaded ($detail)"
  else
    # Keep the path: the plugin may only be disabled on the running node (rabbitmq-plugins),
    # and enabling it again needs the folder in the CLI's plugins path.
    local problem="not loaded by the running node (disabled with rabbitmq-plugins? else see $RMQ_LOG)"
    delayed_state failed "$detail" "$(delayed_state_get path)" "$problem"
    if [[ -n ${NUDGE_DELAYED_PLUGIN_SRC:-}${NUDGE_RABBITMQ_PLUGINS_DIR:-} ]]; then
      die "delayed-message plugin: $detail: $problem"
    fi
    log "delayed-message plugin: WARNING: $detail: $problem"
  fi
}

# `status` line; returns 0 loaded, 4 no plugin available, 5 available but not loaded, 3 broker down.
delayed_status() {
  local result detail
  result=$(delayed_state_get result)
  detail=$(delayed_state_get detail)
  if ! rmq_find_pid >/dev/null; then
    printf 'delayed   unknown   rabbitmq is down%s\n' "${detail:+ (last up: $result, $detail)}"
    return 3
  fi
  if delayed_loaded; then
    printf 'delayed   loaded    x-delayed-message: %s\n' "${detail:-shipped with the broker}"
    return 0
  fi
  case $result in
    absent | off | '')
      printf 'delayed   absent    %s\n' "${detail:-the broker was started before servers.sh handled the plugin: restart-rabbitmq}"
      return 4
      ;;
    failed)
      printf 'delayed   failed    %s%s\n' "$detail" "$(p=$(delayed_state_get problem) && [[ -n $p ]] && echo ": $p")"
      return 5
      ;;
    *)
      printf 'delayed   failed    not loaded by the running node (disabled with rabbitmq-plugins?): %s\n' "$detail"
      return 5
      ;;
  esac
}

# -------------------------------------------------------- RabbitMQ cluster
#
# Three nodes of the same broker, each a copy of the single node above (same
# config, plugin and users) with its own ports, node name and data directory
# under $LOCAL_DIR/cluster/nodeN, one Erlang cookie for all. The functions of
# the single node run unchanged against node N after cluster_node N has pointed
# the RMQ_* settings at it.

CLUSTER_DIR=$LOCAL_DIR/cluster

# cluster_node N: makes the RMQ_* settings those of cluster node N.
cluster_node() {
  local n=$1
  RMQ_PORT=$((CLUSTER_BASE_PORT + CLUSTER_AMQP_OFFSET + n - 1))
  RMQ_MGMT_PORT=$((CLUSTER_BASE_PORT + CLUSTER_MGMT_OFFSET + n - 1))
  RMQ_PROM_PORT=$((CLUSTER_BASE_PORT + CLUSTER_PROM_OFFSET + n - 1))
  RMQ_DIST_PORT=$((CLUSTER_BASE_PORT + CLUSTER_DIST_OFFSET + n - 1))
  RMQ_NODE=nudge-$RMQ_PORT@localhost
  RMQ_DIR=$CLUSTER_DIR/node$n
  RMQ_LOG=$RMQ_DIR/log/rabbitmq.log
  RMQ_STARTUP_LOG=$RMQ_DIR/log/startup.log
  RMQ_PID_FILE=$RMQ_DIR/rabbitmq.pid
  RMQ_USERS_FILE=$CLUSTER_DIR/users.env
}

cluster_check_n() {
  [[ ${1:-} =~ ^[1-9]$ ]] && (($1 <= CLUSTER_SIZE)) || die "expected a cluster node number 1..$CLUSTER_SIZE, got '${1:-}'"
}

# Every node gets the cluster's cookie before its first start.
cluster_seed_cookie() {
  local cookie=$CLUSTER_DIR/.erlang.cookie
  if [[ ! -s $cookie ]]; then
    (
      umask 077
      od -An -N20 -tx1 /dev/urandom | tr -d ' \n' | tr 'a-f' 'A-F' >"$cookie.new"
    )
    mv -f "$cookie.new" "$cookie"
  fi
  make_owned_dir "$RMQ_USER" 750 "$RMQ_DIR"
  make_owned_dir "$RMQ_USER" 700 "$RMQ_DIR/home"
  if ! cmp -s "$cookie" "$RMQ_DIR/home/.erlang.cookie" 2>/dev/null; then
    [[ ! -e $RMQ_DIR/home/.erlang.cookie ]] || chmod u+w "$RMQ_DIR/home/.erlang.cookie"
    cp "$cookie" "$RMQ_DIR/home/.erlang.cookie.new"
    install_file "$RMQ_USER" 400 "$RMQ_DIR/home/.erlang.cookie.new" "$RMQ_DIR/home/.erlang.cookie"
  fi
}

# Succeeds if node N (the current RMQ_* settings) counts node 1 among its running peers.
cluster_joined() {
  local first=nudge-$((CLUSTER_BASE_PORT + CLUSTER_AMQP_OFFSET))@localhost out
  out=$(rmq_tool rabbitmqctl -q cluster_status --formatter json 2>/dev/null </dev/null) || return 1
  python3 -c 'import json, sys; sys.exit(sys.argv[1] not in json.loads(sys.stdin.read())["running_nodes"])' \
    "$first" <<<"$out"
}

cluster_up() {
  local n pids=() rc=0 first
  prepare_local_dir
  make_owned_dir "$(id -un)" 755 "$CLUSTER_DIR"
  ensure_rabbitmq_installed
  # The nodes start together: a node that was stopped before the others waits at boot for
  # the last one stopped, so starting them one after the other could wait for ever.
  for ((n = 1; n <= CLUSTER_SIZE; n++)); do
    cluster_node "$n"
    cluster_seed_cookie
    (rmq_up) &
    pids+=($!)
  done
  for n in "${pids[@]}"; do wait "$n" || rc=1; done
  ((rc == 0)) || die "cluster: a node did not start (logs under $CLUSTER_DIR/node*/log)"
  cluster_node 1
  first=$RMQ_NODE
  for ((n = 2; n <= CLUSTER_SIZE; n++)); do
    cluster_node "$n"
    cluster_joined && continue
    log "cluster: joining $RMQ_NODE to $first"
    {
      rmq_tool rabbitmqctl -q stop_app &&
        rmq_tool rabbitmqctl -q join_cluster "$first" &&
        rmq_tool rabbitmqctl -q start_app
    } </dev/null >&2 || die "cluster: $RMQ_NODE could not join $first (see $RMQ_LOG)"
  done
  cluster_node 1
  rmq_ensure_users
  delayed_check_loaded
  log "cluster: up ($CLUSTER_SIZE nodes)"
}

# In a subshell: `down` stops the single node after it, with the settings cluster_node changed.
cluster_down() (
  local n pids=() rc=0
  for ((n = 1; n <= CLUSTER_SIZE; n++)); do
    cluster_node "$n"
    [[ -d $RMQ_DIR ]] || continue
    (rmq_down) &
    pids+=($!)
  done
  for n in "${pids[@]}"; do wait "$n" || rc=1; done
  ((rc == 0)) || die "cluster: a node did not stop"
)

cluster_status() {
  local n rc=0 line
  for ((n = 1; n <= CLUSTER_SIZE; n++)); do
    cluster_node "$n"
    if line=$(rmq_status); then
      if ((n == 1)) || cluster_joined; then
        line+=" clustered"
      else
        line+=" not-clustered"
        rc=3
      fi
    else
      rc=3
    fi
    printf 'node%s %s\n' "$n" "$line"
  done
  return "$rc"
}

cluster_kill() {
  local pid
  cluster_node "$1"
  pid=$(rmq_find_pid) || {
    log "cluster: $RMQ_NODE is not running"
    return 0
  }
  log "cluster: SIGKILL $RMQ_NODE (pid $pid)"
  kill -KILL "$pid"
  wait_gone "$pid" 10 || die "cluster: could not kill pid $pid"
}

cluster_env() {
  local n urls=() service worker
  for ((n = 1; n <= CLUSTER_SIZE; n++)); do
    urls+=("amqp://guest:guest@$HOST:$((CLUSTER_BASE_PORT + CLUSTER_AMQP_OFFSET + n - 1))/")
  done
  cluster_node 1
  (
    IFS=,
    printf 'NUDGE_AMQP_URL=%s\n' "${urls[*]}"
  )
  printf 'NUDGE_RABBITMQ_MGMT_URL=http://guest:guest@%s:%s\n' "$HOST" "$RMQ_MGMT_PORT"
  [[ -s $RMQ_USERS_FILE ]] || return 0
  service=$(sed -n 's/^nudge-service=//p' "$RMQ_USERS_FILE")
  worker=$(sed -n 's/^nudge-worker=//p' "$RMQ_USERS_FILE")
  (
    IFS=,
    printf 'NUDGE_SERVICE_AMQP_URL=%s\n' "${urls[*]//guest:guest/nudge-service:$service}"
    printf 'NUDGE_WORKER_AMQP_URL=%s\n' "${urls[*]//guest:guest/nudge-worker:$worker}"
  )
}

# ------------------------------------------------------------- PostgreSQL

# Prints the bin directory of the newest PostgreSQL found (NUDGE_PG_BINDIR wins).
find_pg_bin() {
  local candidate best=''
  if [[ -n ${NUDGE_PG_BINDIR:-} ]]; then
    [[ -x $NUDGE_PG_BINDIR/pg_ctl ]] || return 1
    echo "$NUDGE_PG_BINDIR"
    return 0
  fi
  best=$(printf '%s\n' /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)
  if [[ -x $best ]]; then
    dirname "$best"
    return 0
  fi
  candidate=$(command -v pg_ctl) || return 1
  dirname "$(readlink -f "$candidate")"
}

ensure_postgres_installed() {
  if ! PG_BIN=$(find_pg_bin); then
    apt_install postgresql
    PG_BIN=$(find_pg_bin) || die "no pg_ctl found after installing postgresql"
  fi
  local tool
  for tool in initdb pg_ctl pg_isready psql; do
    [[ -x $PG_BIN/$tool ]] || die "$PG_BIN/$tool is missing"
  done
  id -u "$PG_USER" >/dev/null 2>&1 || die "user '$PG_USER' does not exist (it comes with the postgresql package)"
}

# pg_ctl runs from / because the caller's directory may be unreadable to postgres.
pg_ctl_as() { run_as "$PG_USER" env -C / "$PG_BIN/pg_ctl" -D "$PG_DATA" "$@"; }

pg_postmaster_pid() { head -n 1 "$PG_DATA/postmaster.pid" 2>/dev/null; }

# Like `pg_ctl status`, but a zombie or a recycled pid does not count.
pg_running() {
  local pid comm
  pid=$(pg_postmaster_pid) || return 1
  pid_alive "$pid" && read -r comm 2>/dev/null <"/proc/$pid/comm" && [[ $comm == postgres ]]
}

# As the superuser: the default (the OS user) would log "role does not exist".
pg_answering() { "$PG_BIN/pg_isready" -q -h "$HOST" -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres -t 3; }

pg_psql() { "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$PG_PORT" -U "$PG_SUPERUSER" "$@"; }

pg_fail() {
  log "postgres: $1"
  show_logs "$PG_DIR/log/initdb.log" "$PG_LOG"
  exit 1
}

pg_write_config() {
  local socket_dir=$PG_SOCKET_DIR conf=$PG_DATA/nudge_local.conf
  # Unix socket paths are limited to 107 bytes; in a deeply nested checkout
  # use TCP only rather than fail.
  if ((${#socket_dir} + 15 > 107)); then
    log "postgres: $socket_dir is too long for a unix socket, TCP only"
    socket_dir=''
  fi
  {
    printf '# Written by infra/local/servers.sh on every "up"; do not edit.\n'
    printf "listen_addresses = '%s'\n" "$HOST"
    printf 'port = %s\n' "$PG_PORT"
    printf "unix_socket_directories = '%s'\n" "${socket_dir//\'/\'\'}"
    printf 'max_connections = 200\n'
    if ((${#PG_EXTRA_CONF[@]})); then printf '%s\n' "${PG_EXTRA_CONF[@]}"; fi
  } >"$conf.new"
  install_file "$PG_USER" 600 "$conf.new" "$conf"
  if ! grep -qxF "include 'nudge_local.conf'" "$PG_DATA/postgresql.conf"; then
    printf "\n# Local settings from infra/local/servers.sh\ninclude 'nudge_local.conf'\n" >>"$PG_DATA/postgresql.conf"
  fi
}

pg_prepare() {
  make_owned_dir "$PG_USER" 750 "$PG_DIR" "$PG_DIR/log" "$PG_SOCKET_DIR"
  make_owned_dir "$PG_USER" 700 "$PG_DATA"
  ensure_reachable "$PG_USER" "$PG_DATA"
  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    log "postgres: initdb $PG_DATA"
    # C locale: identical sorting on every machine, and no dependency on
    # which locales happen to be generated.
    run_as "$PG_USER" env -C / "$PG_BIN/initdb" -D "$PG_DATA" --username="$PG_SUPERUSER" \
      --auth=trust --encoding=UTF8 --no-locale --no-instructions \
      >"$PG_DIR/log/initdb.log" 2>&1 || pg_fail "initdb failed"
  fi
}

pg_ensure_database() {
  local exists
  exists=$(pg_psql -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'") ||
    pg_fail "cannot query the server"
  if [[ $exists != 1 ]]; then
    log "postgres: creating database $PG_DB"
    pg_psql -d postgres -c "CREATE DATABASE $PG_DB" || pg_fail "cannot create database $PG_DB"
  fi
}

pg_up() {
  local port pid rc=0
  ensure_postgres_installed
  pg_prepare
  if pg_running; then
    port=$(sed -n 4p "$PG_DATA/postmaster.pid")
    [[ $port == "$PG_PORT" ]] ||
      die "postgres from $PG_DATA is running on port $port, not $PG_PORT: run '$0 restart-postgres'"
    wait_for pg_answering pg_running || rc=$?
    case $rc in
      0)
        log "postgres: already up (pid $(pg_postmaster_pid), $HOST:$PG_PORT)"
        pg_ensure_database
        return 0
        ;;
      2) pg_fail "running but not accepting connections after ${START_TIMEOUT}s" ;;
    esac
    log "postgres: the running server exited, starting a new one"
  fi
  pg_write_config
  # A killed postmaster can stay a zombie for a moment, and postgres refuses
  # to start while the pid in its lock file still exists.
  if pid=$(pg_postmaster_pid) && [[ -n $pid ]]; then
    for _ in {1..20}; do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
  fi
  if tcp_open "$HOST" "$PG_PORT"; then
    die "postgres: port $HOST:$PG_PORT is already used by another process (set NUDGE_POSTGRES_PORT)"
  fi
  log "postgres: starting on $HOST:$PG_PORT"
  run_as "$PG_USER" setsid -w env -C / "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" \
    -w -t "$START_TIMEOUT" start >&2 </dev/null || pg_fail "failed to start"
  wait_for pg_answering pg_running || rc=$?
  case $rc in
    1) pg_fail "the server exited during startup" ;;
    2) pg_fail "not accepting connections after ${START_TIMEOUT}s" ;;
  esac
  pg_ensure_database
  log "postgres: up"
}

pg_down() {
  local pid
  PG_BIN=$(find_pg_bin) || PG_BIN=''
  if ! pg_running; then
    log "postgres: already down"
    return 0
  fi
  pid=$(pg_postmaster_pid)
  log "postgres: stopping (pid $pid)"
  # Fast shutdown is SIGINT, immediate shutdown SIGQUIT.
  if [[ -n $PG_BIN ]]; then
    pg_ctl_as stop -m fast -w -t "$STOP_TIMEOUT" >&2 || true
  else
    kill -INT "$pid" 2>/dev/null || true
    wait_gone "$pid" "$STOP_TIMEOUT" || true
  fi
  if pid_alive "$pid"; then
    log "postgres: still running after ${STOP_TIMEOUT}s, immediate shutdown"
    kill -QUIT "$pid" 2>/dev/null || true
  fi
  if ! wait_gone "$pid" 10; then
    log "postgres: killing pid $pid"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || die "postgres: could not kill pid $pid"
  fi
  log "postgres: down"
}

pg_crash() {
  local pid
  if ! pg_running; then
    log "postgres: not running"
    return 0
  fi
  pid=$(pg_postmaster_pid)
  log "postgres: crashing (SIGQUIT to pid $pid: immediate shutdown)"
  kill -QUIT "$pid" 2>/dev/null || true
  if ! wait_gone "$pid" 10; then
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || die "postgres: could not kill pid $pid"
  fi
  log "postgres: down (crashed)"
}

pg_status() {
  PG_BIN=$(find_pg_bin) || PG_BIN=''
  if pg_running; then
    if pg_answering; then
      printf 'postgres  up        %s:%s database=%s pid=%s\n' "$HOST" "$PG_PORT" "$PG_DB" "$(pg_postmaster_pid)"
      return 0
    fi
    printf 'postgres  starting  %s:%s pid=%s (running, not answering on this port)\n' \
      "$HOST" "$PG_PORT" "$(pg_postmaster_pid)"
    return 1
  fi
  printf 'postgres  down      %s:%s\n' "$HOST" "$PG_PORT"
  return 1
}

# ------------------------------------------------------ PostgreSQL standby

# Points the PG_* settings at the standby (in a subshell, as cluster_node does for RabbitMQ).
pg_standby_node() {
  local primary=$PG_PORT
  PG_DIR=$LOCAL_DIR/postgres-standby
  PG_DATA=$PG_DIR/data
  PG_LOG=$PG_DIR/log/postgres.log
  PG_SOCKET_DIR=$PG_DIR/run
  PG_PORT=$PG_STANDBY_PORT
  # No synchronous standby of its own: once promoted, its commits wait for nobody.
  PG_EXTRA_CONF=(
    "primary_conninfo = 'host=$HOST port=$primary user=$PG_REPL_USER application_name=$PG_STANDBY_NAME'"
    "synchronous_standby_names = ''"
    "hot_standby = on"
  )
}

# The standby's replication state as the primary sees it ("streaming sync"), if connected.
pg_standby_state() {
  pg_psql -d postgres -tAc "SELECT state || ' ' || sync_state FROM pg_stat_replication
    WHERE application_name = '$PG_STANDBY_NAME'" 2>/dev/null
}

pg_standby_synchronous() { [[ $(pg_standby_state) == "streaming sync" ]]; }
pg_standby_streaming() { [[ $(pg_standby_state) == streaming* ]]; }

pg_standby_up() {
  ensure_postgres_installed
  pg_up
  pg_psql -d postgres -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_REPL_USER') THEN
        CREATE ROLE $PG_REPL_USER WITH REPLICATION LOGIN;
      END IF;
    END \$\$" || pg_fail "cannot create the replication user $PG_REPL_USER"
  (
    pg_standby_node
    make_owned_dir "$PG_USER" 750 "$PG_DIR" "$PG_DIR/log" "$PG_SOCKET_DIR"
    make_owned_dir "$PG_USER" 700 "$PG_DATA"
    ensure_reachable "$PG_USER" "$PG_DATA"
    if [[ ! -f $PG_DATA/PG_VERSION ]]; then
      log "postgres-standby: pg_basebackup from $HOST:$((PG_STANDBY_PORT - 1))"
      run_as "$PG_USER" env -C / "$PG_BIN/pg_basebackup" -h "$HOST" -p "$((PG_STANDBY_PORT - 1))" \
        -U "$PG_REPL_USER" -D "$PG_DATA" -X stream -c fast >"$PG_DIR/log/basebackup.log" 2>&1 ||
        pg_fail "pg_basebackup failed (see $PG_DIR/log/basebackup.log)"
      # The primary's ALTER SYSTEM settings (its synchronous standby) are not the standby's.
      : >"$PG_DATA/postgresql.auto.conf"
      run_as "$PG_USER" touch "$PG_DATA/standby.signal"
    fi
    [[ -f $PG_DATA/standby.signal ]] ||
      die "postgres-standby: $PG_DATA was promoted; remove $PG_DIR to make a new standby"
    pg_up
  )
  wait_for pg_standby_streaming pg_running ||
    pg_fail "the standby on port $PG_STANDBY_PORT does not stream from the primary"
  # Only now: with no standby connected, every commit would wait.
  pg_psql -d postgres -c "ALTER SYSTEM SET synchronous_standby_names = '$PG_STANDBY_NAME'" \
    -c "ALTER SYSTEM SET synchronous_commit = on" -c "SELECT pg_reload_conf()" >/dev/null ||
    pg_fail "cannot turn on synchronous replication"
  wait_for pg_standby_synchronous pg_running ||
    pg_fail "the standby on port $PG_STANDBY_PORT is not synchronous"
  log "postgres-standby: up on $HOST:$PG_STANDBY_PORT, synchronous"
}

# In subshells: they change the PG_* settings.
pg_standby_down() (
  pg_standby_node
  [[ -d $PG_DATA ]] || return 0
  pg_down
)

pg_promote() (
  ensure_postgres_installed
  pg_standby_node
  pg_running || die "postgres-standby: not running on port $PG_PORT"
  log "postgres-standby: promoting"
  pg_ctl_as promote -w -t "$START_TIMEOUT" >&2 || pg_fail "promote failed"
  log "postgres-standby: promoted, now a primary on $HOST:$PG_PORT"
)

print_standby_env() {
  printf 'NUDGE_DATABASE_URL=postgresql+psycopg://%s@%s:%s,%s:%s/%s?target_session_attrs=read-write\n' \
    "$PG_SUPERUSER" "$HOST" "$PG_PORT" "$HOST" "$PG_STANDBY_PORT" "$PG_DB"
}

# --------------------------------------------------------------- commands

print_env() {
  printf 'NUDGE_AMQP_URL=amqp://guest:guest@%s:%s/\n' "$HOST" "$RMQ_PORT"
  printf 'NUDGE_DATABASE_URL=postgresql+psycopg://%s@%s:%s/%s\n' "$PG_SUPERUSER" "$HOST" "$PG_PORT" "$PG_DB"
  printf 'NUDGE_RABBITMQ_MGMT_URL=http://guest:guest@%s:%s\n' "$HOST" "$RMQ_MGMT_PORT"
}

cmd_status() {
  local rc=0
  rmq_status || rc=3
  pg_status || rc=3
  if [[ -d $LOCAL_DIR/postgres-standby/data ]]; then # optional too: pg-standby-up
    (
      pg_standby_node
      pg_status | sed 's/^postgres /standby  /'
    ) || true
  fi
  delayed_status || true # optional: the tiers backend needs no plugin
  return "$rc"
}

cmd_ctl() {
  local tool=${1:-}
  case $tool in
    rabbitmqctl | rabbitmq-diagnostics | rabbitmq-plugins | rabbitmq-queues) ;;
    *) die "usage: $0 ctl rabbitmqctl|rabbitmq-diagnostics|rabbitmq-plugins|rabbitmq-queues ARGS..." ;;
  esac
  shift
  [[ -d $RMQ_DIR/home ]] || die "rabbitmq was never started from $LOCAL_DIR"
  rmq_tool "$tool" "$@"
}

cmd_logs() {
  local -a follow=() files=()
  local f
  case ${1:-} in
    '') ;;
    -f | --follow) follow=(-F) ;;
    *) die "usage: $0 logs [-f]" ;;
  esac
  for f in "$RMQ_LOG" "$PG_LOG"; do
    if [[ -e $f || ${#follow[@]} -gt 0 ]]; then files+=("$f"); fi
  done
  ((${#files[@]})) || die "no logs yet in $LOCAL_DIR"
  exec tail -n "$LOG_LINES" "${follow[@]}" "${files[@]}"
}

main() {
  local cmd=${1:-help}
  (($# == 0)) || shift
  check_settings
  case $cmd in
    up)
      take_lock
      pg_up
      rmq_up
      rmq_ensure_users
      delayed_check_loaded
      print_env
      print_users_env
      ;;
    down)
      take_lock
      cluster_down
      rmq_down
      pg_standby_down
      pg_down
      ;;
    status) cmd_status ;;
    delayed-plugin) delayed_status ;;
    logs) cmd_logs "$@" ;;
    env)
      print_env
      print_users_env
      ;;
    ctl) cmd_ctl "$@" ;;
    restart-rabbitmq)
      take_lock
      rmq_down
      rmq_up
      delayed_check_loaded
      ;;
    crash-rabbitmq)
      take_lock
      rmq_crash
      rmq_up
      delayed_check_loaded
      ;;
    restart-postgres)
      take_lock
      pg_down
      pg_up
      ;;
    crash-postgres)
      take_lock
      pg_crash
      pg_up
      ;;
    cluster-up)
      take_lock
      cluster_up
      cluster_env
      ;;
    cluster-down)
      take_lock
      cluster_down
      ;;
    cluster-status) cluster_status ;;
    cluster-env) cluster_env ;;
    cluster-kill)
      cluster_check_n "${1:-}"
      cluster_kill "$1"
      ;;
    cluster-ctl)
      cluster_check_n "${1:-}"
      cluster_node "$1"
      shift
      cmd_ctl "$@"
      ;;
    pg-standby-up)
      take_lock
      pg_standby_up
      print_standby_env
      ;;
    pg-standby-down)
      take_lock
      pg_standby_down
      ;;
    pg-standby-env) print_standby_env ;;
    pg-promote)
      take_lock
      pg_promote
      ;;
    kill-postgres)
      take_lock
      pg_crash
      ;;
    help | -h | --help) usage ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
}

main "$@"
