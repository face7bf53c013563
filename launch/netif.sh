# shellcheck shell=bash
# Sourced by the launchers: which network interface gloo should bind to on this node.
#
# gloo (CPU collectives, and torch's CPU-side groups on GPUs) binds to the address its hostname
# resolves to. Where /etc/hosts maps the hostname to 127.0.1.1 (Debian's installer does) or the name
# does not resolve, that is loopback and the other nodes cannot connect. NCCL has no such trap: it
# skips lo and docker* interfaces by itself, so NCCL_SOCKET_IFNAME is only passed through.

# gloo_ifname MASTER: the interface this node reaches MASTER through; when MASTER is this node (or
# resolves to loopback here), its first non-loopback IPv4 interface that is up. Prints nothing when
# `ip` is missing or MASTER does not resolve.
gloo_ifname() {
    local addr dev=
    command -v ip >/dev/null || return 0
    addr=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    [[ -n $addr ]] || return 0
    if [[ $addr != 127.* ]]; then
        dev=$(ip -o -4 addr show to "$addr" 2>/dev/null | awk 'NR == 1 {print $2}')
        [[ -n $dev ]] || dev=$(ip -o route get "$addr" 2>/dev/null | sed -n 's/.* dev \([^ ]*\).*/\1/p')
    fi
    if [[ -z $dev || $dev == lo ]]; then
        dev=$(ip -o -4 addr show up 2>/dev/null | awk '$2 != "lo" && $2 !~ /^docker/ {print $2; exit}')
    fi
    echo "${dev%%@*}"
}
