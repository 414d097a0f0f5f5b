# The local stack as processes on this machine, for scripts/dev and
# scripts/test-browser (sourced, not run): Redis, PostgreSQL with the seeded
# internal API, Moneta (also the licence proxy, issuing the demo media's
# ClearKey licences from web/media/clearkey.json), and nginx running the
# production edge unchanged behind the local front (nginx/dev/), which serves
# the demo player and the generated media. Everything listens on loopback;
# every secret is random per run.
#
# Before stack_up (all optional):
#   STACK_FRONT_ADDR     address:port browsers open; port 0 picks a free one   (127.0.0.1:0)
#   STACK_PUBLIC_HOST    host Moneta puts in CDN and licence URLs              (localhost)
#   STACK_CORS_ORIGINS   MONETA_CORS_ALLOWED_ORIGINS                           (unset)
#   STACK_HEARTBEAT_S    MONETA_HEARTBEAT_INTERVAL_S                           (10)
#   STACK_SESSION_TTL_S  MONETA_SESSION_TTL_S                                  (30)
#   STACK_LIMIT_POLICY   MONETA_STREAM_LIMIT_POLICY                            (block)
#   STACK_BIN            directory of moneta and internal-api   ($CARGO_TARGET_DIR or target, /release)
#   STACK_WEB_ROOT       web/build output                                      (web/dist)
# After it: STACK_FRONT_PORT, STACK_REDIS_PORT, STACK_DATABASE_URL,
# STACK_ADMIN_PORT, STACK_DIR (logs in $STACK_DIR/logs), and stack_token.
# stack_down stops everything stack_up started; call it from an EXIT trap.

STACK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK_BIN=${STACK_BIN:-${CARGO_TARGET_DIR:-$STACK_ROOT/target}/release}
STACK_PIDS=()
STACK_PG_CTL=
STACK_PG_DATA=

stack_log() { printf '[stack] %s\n' "$*" >&2; }

stack_random_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

# Prints N free loopback ports, held open together so that none repeats.
stack_free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# stack_wait WHAT SECONDS COMMAND...: polls COMMAND until it succeeds.
stack_wait() {
    local what=$1 seconds=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            stack_log "$what did not come up within ${seconds}s"
            stack_dump_logs
            return 1
        fi
        sleep 0.2
    done
}

stack_dump_logs() {
    local f
    for f in "$STACK_DIR"/logs/*.log; do
        [[ -s "$f" ]] || continue
        printf '\n--- %s (last 30 lines)\n' "${f##*/}" >&2
        tail -n 30 "$f" >&2
    done
}

# stack_spawn NAME COMMAND...: runs COMMAND in the background, logging to
# $STACK_DIR/logs/NAME.log, and remembers its pid for stack_down.
stack_spawn() {
    local name=$1
    shift
    # Its own session: Ctrl-C reaches only the script, which stops the
    # stack in order.
    setsid "$@" >"$STACK_DIR/logs/$name.log" 2>&1 </dev/null &
    STACK_PIDS+=("$!")
}

stack_as_postgres() {
    # PostgreSQL refuses to run as root.
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

stack_pg_bin() {
    local dir
    for dir in "${PG_BIN_DIR:-}" $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [[ -n "$dir" && -x "$dir/pg_ctl" && -x "$dir/initdb" ]]; then
            echo "$dir"
            return
        fi
    done
    dirname "$(command -v pg_ctl)"
}

stack_http_ok() { curl -fsS -o /dev/null --max-time 2 "$1"; }
stack_ready() { curl -fsS --max-time 2 "$1" | grep -q '"status":"ready"'; }

stack_up() {
    local front_addr=${STACK_FRONT_ADDR:-127.0.0.1:0}
    local public_host=${STACK_PUBLIC_HOST:-localhost}
    local bin=$STACK_BIN
    local web_root=${STACK_WEB_ROOT:-$STACK_ROOT/web/dist}
    local front_host=${front_addr%:*} front_port=${front_addr##*:}

    STACK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/moneta-stack.XXXXXX")
    # Workers and postgres run as other users and must reach their files.
    chmod 755 "$STACK_DIR"
    mkdir -p "$STACK_DIR/logs"

    local redis_port pg_port api_port moneta_port admin_port edge_port free_front ports
    # One spare, in case the caller's chosen front port comes round again.
    ports=$(stack_free_ports 8 | tr ' ' '\n' | grep -vx "$front_port" | head -n 7 | tr '\n' ' ')
    read -r redis_port pg_port api_port moneta_port admin_port edge_port free_front <<<"$ports"
    if [[ "$front_port" == 0 ]]; then front_port=$free_front; fi
    STACK_FRONT_PORT=$front_port
    STACK_REDIS_PORT=$redis_port
    STACK_ADMIN_PORT=$admin_port
    local public="http://$public_host:$front_port"

    local jwt_secret internal_token drm_secret
    jwt_secret=$(stack_random_hex)
    internal_token=$(stack_random_hex)
    drm_secret=$(stack_random_hex)
    STACK_JWT_SECRET=$jwt_secret

    stack_log "redis on :$redis_port"
    stack_spawn redis redis-server --bind 127.0.0.1 --port "$redis_port" --save '' --appendonly no
    stack_wait redis 20 redis-cli -p "$redis_port" ping || return 1

    stack_log "postgresql on :$pg_port"
    local pg_bin
    pg_bin=$(stack_pg_bin)
    STACK_PG_CTL=$pg_bin/pg_ctl
    STACK_PG_DATA=$STACK_DIR/pg/data
    mkdir -p "$STACK_DIR/pg"
    if [[ $(id -u) -eq 0 ]]; then chown postgres:postgres "$STACK_DIR/pg" "$STACK_DIR/logs"; fi
    stack_as_postgres "$pg_bin/initdb" -D "$STACK_PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C \
        --no-sync >"$STACK_DIR/logs/initdb.log" 2>&1 || { stack_dump_logs; return 1; }
    stack_as_postgres "$STACK_PG_CTL" -D "$STACK_PG_DATA" -l "$STACK_DIR/logs/postgres.log" -w -t 60 \
        -o "-F -k $STACK_DIR/pg -c listen_addresses=127.0.0.1 -p $pg_port" start >/dev/null \
        || { stack_dump_logs; return 1; }
    psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -c 'CREATE DATABASE moneta' >/dev/null
    STACK_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/moneta"

    stack_log "internal API on :$api_port (seeded)"
    DATABASE_URL=$STACK_DATABASE_URL "$bin/internal-api" seed >"$STACK_DIR/logs/seed.log" 2>&1 \
        || { stack_dump_logs; return 1; }
    DATABASE_URL=$STACK_DATABASE_URL INTERNAL_API_LISTEN_ADDR=127.0.0.1:$api_port \
        INTERNAL_API_TOKEN=$internal_token stack_spawn internal-api "$bin/internal-api"
    stack_wait "internal API" 60 stack_http_ok "http://127.0.0.1:$api_port/health" || return 1

    stack_log "moneta on :$moneta_port (metrics :$admin_port)"
    # The demo clip is a minute long while the catalog says m-0001 runs over
    # two hours: with the default 5 % threshold no position in the clip would
    # ever be offered as a resume position.
    MONETA_LISTEN_ADDR=127.0.0.1:$moneta_port \
    MONETA_ADMIN_ADDR=127.0.0.1:$admin_port \
    MONETA_REDIS_URL=redis://127.0.0.1:$redis_port \
    MONETA_INTERNAL_API_URL=http://127.0.0.1:$api_port \
    MONETA_INTERNAL_API_TOKEN=$internal_token \
    MONETA_JWT_HS256_SECRET=$jwt_secret \
    MONETA_SESSION_SECRET=$(stack_random_hex) \
    MONETA_CDN_BASE_URL=$public/cdn \
    MONETA_DRM_TOKEN_SECRET=$drm_secret \
    MONETA_DRM_PROXY=true \
    MONETA_PUBLIC_BASE_URL=$public \
    MONETA_DRM_CLEARKEY_KEYS_FILE=$STACK_ROOT/web/media/clearkey.json \
    MONETA_STREAM_LIMIT_POLICY=${STACK_LIMIT_POLICY:-block} \
    MONETA_CORS_ALLOWED_ORIGINS=${STACK_CORS_ORIGINS:-} \
    MONETA_HEARTBEAT_INTERVAL_S=${STACK_HEARTBEAT_S:-10} \
    MONETA_SESSION_TTL_S=${STACK_SESSION_TTL_S:-30} \
    MONETA_RESUME_MIN_PCT=0 \
    MONETA_SHUTDOWN_DRAIN_MS=0 \
    RUST_LOG=${RUST_LOG:-info} \
        stack_spawn moneta "$bin/moneta" serve
    stack_wait moneta 60 stack_ready "http://127.0.0.1:$moneta_port/health/ready" || return 1

    stack_log "nginx on $front_host:$front_port (edge on :$edge_port)"
    local prefix=$STACK_DIR/nginx
    mkdir -p "$prefix/conf.d"
    chmod 755 "$prefix"
    cp "$STACK_ROOT/nginx/nginx.conf" "$prefix/nginx.conf"
    MONETA_UPSTREAM=127.0.0.1:$moneta_port NGINX_LISTEN=127.0.0.1:$edge_port \
        NGINX_RATE_LIMIT=50r/s NGINX_RATE_BURST=100 NGINX_REAL_IP_FROM=127.0.0.1 \
        NGINX_ACCESS_LOG=$STACK_DIR/logs/edge-access.log \
        envsubst '${MONETA_UPSTREAM} ${NGINX_LISTEN} ${NGINX_RATE_LIMIT} ${NGINX_RATE_BURST} ${NGINX_REAL_IP_FROM} ${NGINX_ACCESS_LOG}' \
        <"$STACK_ROOT/nginx/templates/default.conf.template" >"$prefix/conf.d/default.conf"
    NGINX_DEV_LISTEN=$front_host:$front_port NGINX_DEV_WEB_ROOT=$web_root \
        NGINX_DEV_EDGE=127.0.0.1:$edge_port \
        envsubst '${NGINX_DEV_LISTEN} ${NGINX_DEV_WEB_ROOT} ${NGINX_DEV_EDGE}' \
        <"$STACK_ROOT/nginx/dev/player.conf.template" >"$prefix/conf.d/player.conf"
    local nginx_bin
    nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
    # Started as root, nginx's workers would run as `nobody`, who cannot read
    # a checkout under a private directory (a `mktemp -d` clone is 0700): the
    # player's files would answer 403. This throwaway local stack keeps root.
    local globals='daemon off;'
    if [ "$(id -u)" -eq 0 ]; then
        globals='daemon off; user root;'
    fi
    "$nginx_bin" -t -q -p "$prefix/" -c "$prefix/nginx.conf" -g "$globals" 2>"$STACK_DIR/logs/nginx.log" \
        || { stack_dump_logs; return 1; }
    stack_spawn nginx "$nginx_bin" -p "$prefix/" -c "$prefix/nginx.conf" -g "$globals"
    stack_wait nginx 20 stack_http_ok "http://127.0.0.1:$front_port/health/live" || return 1
}

# stack_token SUB PLAN MAX_STREAMS COUNTRY [TTL]: a JWT Moneta accepts.
stack_token() {
    MONETA_JWT_HS256_SECRET=$STACK_JWT_SECRET "$STACK_BIN/moneta" token \
        --sub "$1" --plan "$2" --max-streams "$3" --country "$4" --ttl "${5:-1h}"
}

stack_down() {
    local i pid
    # Newest first: nginx stops taking requests before Moneta goes.
    for ((i = ${#STACK_PIDS[@]} - 1; i >= 0; i--)); do
        kill -TERM "${STACK_PIDS[i]}" 2>/dev/null || true
    done
    for pid in "${STACK_PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    STACK_PIDS=()
    if [[ -n "$STACK_PG_CTL" && -d "$STACK_PG_DATA" ]]; then
        stack_as_postgres "$STACK_PG_CTL" -D "$STACK_PG_DATA" -w -t 20 stop -m fast >/dev/null 2>&1 || true
    fi
    if [[ -n "${STACK_DIR:-}" && -d "$STACK_DIR" && -z "${STACK_KEEP:-}" ]]; then
        rm -rf "$STACK_DIR"
    fi
}
