#!/bin/bash
# Starts Moneta inside the Kubernetes pod (deploy/k8s/base/deployment.yaml):
#   bash moneta-start.sh moneta serve
#
# Moneta writes its JSON log lines to stdout and nothing else, which is what
# `kubectl logs` and the node's log collection read. The Fluent Bit sidecar
# of the pod cannot see another container's stdout, so this script also
# copies every line into a file on the pod's shared `moneta-logs` volume,
# where the sidecar's tail input reads it (deploy/k8s/base/fluent-bit-pod.yaml).
#
#   LOG_FILE            the copy (required)
#   LOG_FILE_MAX_BYTES  past this size the copy is emptied in place (64 MiB)
#   LOG_FILE_CHECK_S    how often the size is looked at (10 s)
#
# Signals: this script is PID 1. SIGTERM and SIGINT are passed on to Moneta,
# which drains and exits on its own (CONTRACT section 6); its exit status
# becomes the container's. The copy is written by `tee`, whose last lines
# are awaited before the script exits, so the final shutdown lines reach
# both stdout and the file.
set -uo pipefail

file=${LOG_FILE:?set LOG_FILE to the path of the log copy}
max_bytes=${LOG_FILE_MAX_BYTES:-67108864}
check_s=${LOG_FILE_CHECK_S:-10}
if (($# == 0)); then
    echo "usage: moneta-start.sh COMMAND [ARG...]" >&2
    exit 2
fi

# The copy stays bounded: past max_bytes it is truncated in place. tee opened
# it with O_APPEND, so its next line lands at offset 0, and Fluent Bit's tail
# input notices the shrink and reads from the start again.
trim() {
    trap 'exit 0' TERM
    while sleep "$check_s"; do
        local size
        size=$(stat -c %s "$file" 2> /dev/null || echo 0)
        if ((size > max_bytes)); then
            : > "$file"
        fi
    done
}
trim &
trimmer=$!

# tee runs as this shell's own child (a process substitution), so it can be
# waited for; it copies to stdout first, then to the file, and a failing
# file write never stops the stdout copy.
exec 3> >(exec tee -a "$file")
tee_pid=$!

"$@" >&3 2>&1 3>&- &
child=$!
exec 3>&-

# The trimmer stops first: emptying the copy between Moneta's last lines and
# the end of this script would lose the shutdown lines the file must keep.
stop_trimmer() {
    if [ -n "$trimmer" ]; then
        kill "$trimmer" 2> /dev/null
        wait "$trimmer" 2> /dev/null
        trimmer=
    fi
}

forward() {
    stop_trimmer
    kill -s "$1" "$child" 2> /dev/null
}
trap 'forward TERM' TERM
trap 'forward INT' INT

# `wait` returns early when a trapped signal arrives; keep waiting until the
# child is really gone, then ask once more for its own exit status.
while kill -0 "$child" 2> /dev/null; do
    wait "$child"
done
wait "$child"
status=$?

stop_trimmer
# Moneta's end of the pipe is closed: tee drains what is left and exits.
wait "$tee_pid"
exit "$status"
