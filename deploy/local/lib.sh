# Shared helpers for deploy/local/{up,down,tool}. Sourced, not executed.
# Needs only bash, coreutils and a JDK 17+ (java) plus Maven (mvn) for the
# first fetch of the server jars.

LOCAL_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

REFOLD_LOCAL_HOME="${REFOLD_LOCAL_HOME:-/tmp/refold-local}"
KAFKA_PORT="${REFOLD_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${REFOLD_KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_HEAP="${REFOLD_KAFKA_HEAP:-512m}"
KAFKA_VERSION="${REFOLD_KAFKA_VERSION:-}"          # empty: the pom's default
CASSANDRA_PORT="${REFOLD_CASSANDRA_PORT:-9042}"
CASSANDRA_STORAGE_PORT="${REFOLD_CASSANDRA_STORAGE_PORT:-7000}"
CASSANDRA_JMX_PORT="${REFOLD_CASSANDRA_JMX_PORT:-7199}"
CASSANDRA_HEAP="${REFOLD_CASSANDRA_HEAP:-768m}"
CASSANDRA_VERSION="${REFOLD_CASSANDRA_VERSION:-}"  # empty: the pom's default
START_TIMEOUT="${REFOLD_LOCAL_TIMEOUT:-240}"

LIB_HOME="$REFOLD_LOCAL_HOME/lib"
KAFKA_HOME="$REFOLD_LOCAL_HOME/kafka"
CASSANDRA_HOME="$REFOLD_LOCAL_HOME/cassandra"
HOST=127.0.0.1

JAVA="${JAVA_HOME:+$JAVA_HOME/bin/}java"

log() { printf '[local] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

now_ms() { date +%s%3N; }
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%01d' $((d / 1000)) $(((d % 1000) / 100)); }

KAFKA_MAIN=kafka.Kafka
CASSANDRA_MAIN=org.apache.cassandra.service.CassandraDaemon

# pid_alive FILE [MAIN_CLASS]: true when FILE names a live process (whose
# command line mentions MAIN_CLASS, so that a recycled pid is not mistaken
# for the server).
pid_alive() {
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(<"$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  [[ -z "${2:-}" || ! -r "/proc/$pid/cmdline" ]] && return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- " $2 "
}

# port_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# fetch_jars NAME VERSION_PROPERTY VERSION: copy the dependencies of
# deploy/local/NAME/pom.xml into $LIB_HOME/NAME unless already there.
fetch_jars() {
  local name="$1" prop="$2" version="$3" dir="$LIB_HOME/$1" want
  # the marker names the pom's content and the version: editing either refetches
  want="$(sha256sum <"$LOCAL_DIR/$name/pom.xml" | cut -c1-16) ${version:-default}"
  if [[ -f "$dir/.complete" && "$(<"$dir/.complete")" == "$want" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found: Maven is needed to fetch the $name jars"
  log "fetching $name jars into $dir (Maven)"
  rm -rf "$dir" "$dir.tmp"
  mkdir -p "$dir.tmp"
  local args=(-B -q -f "$LOCAL_DIR/$name/pom.xml" dependency:copy-dependencies
              -DoutputDirectory="$dir.tmp" -DincludeScope=runtime)
  [[ -n "$version" ]] && args+=("-D$prop=$version")
  if ! mvn "${args[@]}" >"$LIB_HOME/mvn-$name.log" 2>&1; then
    tail -n 30 "$LIB_HOME/mvn-$name.log" >&2
    die "Maven could not fetch the $name jars (full log: $LIB_HOME/mvn-$name.log)"
  fi
  echo "$want" >"$dir.tmp/.complete"
  mv "$dir.tmp" "$dir"
}

kafka_java() {  # kafka_java MAIN_CLASS ARGS...: run a Kafka class (tools, storage)
  "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$LOCAL_DIR/kafka/log4j2-tools.properties" \
    -cp "$LIB_HOME/kafka/*" "$@"
}

# cassandra_jvm_opts [FILTER]: fill the array CASSANDRA_JVM_OPTS from
# cassandra/jvm17-server.options ("--add-opens X" lines split in two words);
# with FILTER=jpms only the module-access flags (for tools).
cassandra_jvm_opts() {
  local line parts
  CASSANDRA_JVM_OPTS=()
  while read -r line; do
    [[ "$line" == -* ]] || continue
    [[ "${1:-}" == jpms && "$line" != --add-* && "$line" != -Djdk.attach* ]] && continue
    read -r -a parts <<<"$line"
    CASSANDRA_JVM_OPTS+=("${parts[@]}")
  done <"$LOCAL_DIR/cassandra/jvm17-server.options"
}

cassandra_java() {  # cassandra_java MAIN_CLASS ARGS...: run a Cassandra tool class
  cassandra_jvm_opts jpms
  "$JAVA" -Xmx256m -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
    "${CASSANDRA_JVM_OPTS[@]}" \
    -Dlogback.configurationFile="$LOCAL_DIR/cassandra/logback-tools.xml" \
    -Duser.home="$REFOLD_LOCAL_HOME" \
    -cp "$LIB_HOME/cassandra/*" "$@"
}

# --- wire-level probes (no client tools needed) ------------------------------

# bytes_of FD COUNT: read exactly COUNT bytes from fd FD, print them as
# space-separated unsigned decimals. Fails on timeout/short read.
bytes_of() {
  local out
  out="$(timeout "${PROBE_TIMEOUT:-2}" dd bs="$2" count=1 iflag=fullblock status=none <&"$1" | od -An -v -tu1)" || return 1
  out="$(echo $out)"
  local n; n="$(wc -w <<<"$out")"
  (( n == $2 )) || return 1
  echo "$out"
}

be32() { echo $(( ($1 << 24) | ($2 << 16) | ($3 << 8) | $4 )); }

# kafka_ready PORT: the broker answers a Metadata (v4) request and lists
# at least one broker. Prints a one-line summary.
kafka_ready() {
  local port="$1" hdr len body
  { exec 3<>"/dev/tcp/$HOST/$port"; } 2>/dev/null || return 1
  # size=21 | api_key=3 (Metadata) | api_version=4 | correlation_id=7 |
  # client_id="refold" | topics=null (-1: all) | allow_auto_topic_creation=false
  printf '\x00\x00\x00\x15\x00\x03\x00\x04\x00\x00\x00\x07\x00\x06refold\xff\xff\xff\xff\x00' >&3
  hdr=($(bytes_of 3 4)) || { exec 3<&-; return 1; }
  len="$(be32 "${hdr[@]}")"
  (( len >= 16 && len < 1048576 )) || { exec 3<&-; return 1; }
  body=($(bytes_of 3 "$len")) || { exec 3<&-; return 1; }
  exec 3<&-
  # correlation_id(4) throttle_time_ms(4) brokers.count(4)
  (( $(be32 "${body[@]:0:4}") == 7 )) || return 1
  local brokers; brokers="$(be32 "${body[@]:8:4}")"
  (( brokers >= 1 && brokers < 1000 )) || return 1
  echo "Metadata v4 lists $brokers broker(s)"
}

# cql_ready PORT: a CQL native protocol v4 session works: STARTUP -> READY,
# then QUERY "SELECT release_version FROM system.local" -> RESULT Rows.
# Prints a one-line summary with the server's release_version.
cql_ready() {
  local port="$1" hdr len body q
  { exec 4<>"/dev/tcp/$HOST/$port"; } 2>/dev/null || return 1
  # v4 request header: version=0x04 flags=0 stream=1 opcode=0x01 (STARTUP)
  # body: string map {"CQL_VERSION": "3.0.0"} = 22 bytes
  printf '\x04\x00\x00\x01\x01\x00\x00\x00\x16\x00\x01\x00\x0bCQL_VERSION\x00\x053.0.0' >&4
  hdr=($(bytes_of 4 9)) || { exec 4<&-; return 1; }
  len="$(be32 "${hdr[@]:5:4}")"
  (( len > 0 )) && { bytes_of 4 "$len" >/dev/null || { exec 4<&-; return 1; }; }
  # response must be v4 (0x84) and READY (0x02)
  (( hdr[0] == 0x84 && hdr[4] == 0x02 )) || { exec 4<&-; return 1; }
  q='SELECT release_version FROM system.local'
  # QUERY body: long string query | consistency ONE (0x0001) | flags 0
  local qlen=${#q} blen=$(( 4 + ${#q} + 3 ))
  printf "\\x04\\x00\\x00\\x02\\x07$(printf '\\x%02x' 0 0 $((blen >> 8)) $((blen & 255)))" >&4
  printf "$(printf '\\x%02x' 0 0 $((qlen >> 8)) $((qlen & 255)))%s\\x00\\x01\\x00" "$q" >&4
  hdr=($(bytes_of 4 9)) || { exec 4<&-; return 1; }
  len="$(be32 "${hdr[@]:5:4}")"
  (( len > 4 && len < 1048576 )) || { exec 4<&-; return 1; }
  body=($(bytes_of 4 "$len")) || { exec 4<&-; return 1; }
  exec 4<&-
  # RESULT (0x08) of kind Rows (0x0002)
  (( hdr[0] == 0x84 && hdr[4] == 0x08 && $(be32 "${body[@]:0:4}") == 2 )) || return 1
  # the value is the last [bytes] of the body: int32 length then UTF-8
  local i n=${#body[@]} v=""
  for (( i = n - 1; i >= 4; i-- )); do
    if (( $(be32 "${body[@]:i-4:4}") == n - i )); then
      for b in "${body[@]:i}"; do v+="$(printf "\\x$(printf %02x "$b")")"; done
      break
    fi
  done
  echo "CQL v4 session OK, release_version ${v:-?}"
}
