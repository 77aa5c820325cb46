#!/usr/bin/env bash
# A lab of N "hosts" on this one machine, reached the way a real cluster is: by ssh, MPI over TCP.
#
#   scripts/netlab_hosts.sh up [N]     # N hosts pi-h1..pi-hN (default 3); needs root, ip, tc, sshd
#   . /tmp/pipeinfer-lab/env           # then: pipeinfer-cpu run --hostfile /tmp/pipeinfer-lab/hosts.txt ...
#   scripts/netlab_hosts.sh down       # removes all of it (idempotent)
#
# Each host is a network namespace pi-hK with its own address 10.77.0.(10+K) on interface lab0, a veth
# into the bridge pilab-br0 of the root namespace (10.77.0.1), its own hostname (a UTS namespace) and
# its own sshd listening only on that address. Keys are made for the lab and thrown away by `down`.
# Outside the lab directory it writes only /etc/netns/pi-hK/ (and /run/sshd): the host names resolve
# through the lab's ssh config (root namespace) and /etc/netns/pi-hK/hosts (inside the hosts, which
# `ip netns exec` bind-mounts over /etc/hosts).
#
# The last host, pi-hN, has a private mount namespace with an empty tmpfs over each directory of
# PIPEINFER_LAB_HIDE (colon-separated; default: $LAB/data): files put there are visible on every
# other host but not on that one, like a worker that does not share the user's disk.
#
# Environment:
#   PIPEINFER_LAB_DIR   the lab's files: keys, configs, pid files, hostfile, env (default /tmp/pipeinfer-lab)
#   PIPEINFER_LAB_HIDE  directories the last host cannot see (default $PIPEINFER_LAB_DIR/data)
#
# `up` writes, in the lab directory:
#   hosts.txt  a hostfile: pi-h1 .. pi-hN
#   ssh        an ssh client for the lab (ssh -F <lab>/ssh_config "$@")
#   env        the variables that point pipeinfer-cpu at the lab: PIPEINFER_SSH (ssh program for the
#              host check and for mpiexec) and PIPEINFER_MPIEXEC_ARGS (hydra's control address in the
#              lab; MPI over TCP on lab0 rather than shared memory, which MPICH would otherwise use
#              between processes of one machine, namespaces or not)
set -euo pipefail

LAB=${PIPEINFER_LAB_DIR:-/tmp/pipeinfer-lab}
HIDE=${PIPEINFER_LAB_HIDE:-$LAB/data}
NET=10.77.0           # the lab's /24
BRIDGE=pilab-br0      # root side of the lab network, $NET.1
IFACE=lab0            # each host's interface (the same name on every host, for FI_TCP_IFACE)
PREFIX=pi-h           # host K is namespace and hostname $PREFIX$K, address $NET.$((10 + K))
SSHD=$(command -v sshd || echo /usr/sbin/sshd)

die() { echo "netlab_hosts.sh: $*" >&2; exit 1; }

# The lab's namespaces that exist now (also after a crash, whatever the lab directory was).
lab_namespaces() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" || true; }

down() {
    local ns pids
    for ns in $(lab_namespaces); do
        # Every process inside the host: its sshd, and whatever was started through it (MPI ranks).
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] && kill $pids 2>/dev/null || true
    done
    sleep 0.3
    for ns in $(lab_namespaces); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
        ip netns delete "$ns" 2>/dev/null || true       # also removes its veth pair
        rm -rf "/etc/netns/$ns"
    done
    ip link delete "$BRIDGE" 2>/dev/null || true
    rmdir /etc/netns 2>/dev/null || true                  # only if empty (up may have made it)
    # Root-side veths left by an interrupted `up` (their namespace never made it).
    local leftovers
    leftovers=$(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E '^pilab-v[0-9]+$' || true)
    for link in $leftovers; do
        ip link delete "$link" 2>/dev/null || true
    done
    [ -e "$LAB/.pipeinfer-lab" ] && rm -rf "$LAB"         # only a directory that `up` filled
    return 0
}

up() {
    local n=$1 k ns addr hosts_lines=""
    [ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
    case "$LAB$HIDE" in *[[:space:]]*) die "PIPEINFER_LAB_DIR and PIPEINFER_LAB_HIDE must not contain spaces" ;; esac
    [ -x "$SSHD" ] || die "sshd is not installed (apt-get install openssh-server)"
    command -v ssh-keygen >/dev/null || die "ssh-keygen is not installed (apt-get install openssh-client)"
    command -v ip >/dev/null || die "ip is not installed (apt-get install iproute2)"
    [ -z "$(lab_namespaces)" ] || die "a lab is already up ($(lab_namespaces | tr '\n' ' ')); run '$0 down' first"
    trap down EXIT   # a failed or interrupted `up` leaves nothing behind

    mkdir -p "$LAB" "$HIDE" /run/sshd    # /run/sshd: sshd's privilege separation directory
    touch "$LAB/.pipeinfer-lab"
    chmod 700 "$LAB"
    ssh-keygen -q -t ed25519 -N '' -C pipeinfer-lab-host -f "$LAB/host_key"
    ssh-keygen -q -t ed25519 -N '' -C pipeinfer-lab-client -f "$LAB/id_ed25519"
    cp "$LAB/id_ed25519.pub" "$LAB/authorized_keys"

    # The network: a bridge in the root namespace, one veth per host.
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for k in $(seq 1 "$n"); do hosts_lines+="$NET.$((10 + k)) $PREFIX$k"$'\n'; done

    : > "$LAB/ssh_config"
    : > "$LAB/hosts.txt"
    for k in $(seq 1 "$n"); do
        ns=$PREFIX$k addr=$NET.$((10 + k))
        ip netns add "$ns"
        ip link add "pilab-v$k" type veth peer name "$IFACE" netns "$ns"
        ip link set "pilab-v$k" master "$BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "$addr/24" dev "$IFACE"
        ip -n "$ns" link set "$IFACE" up
        # Names inside the host (ip netns exec mounts this over /etc/hosts).
        mkdir -p "/etc/netns/$ns"
        printf '127.0.0.1 localhost\n%s pilab-root\n%s' "$NET.1" "$hosts_lines" > "/etc/netns/$ns/hosts"

        cat > "$LAB/sshd_config-$ns" <<EOF
ListenAddress $addr
HostKey $LAB/host_key
AuthorizedKeysFile $LAB/authorized_keys
PidFile $LAB/sshd-$ns.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
EOF
        # sshd in the host's namespaces: network (ip netns exec), hostname (unshare --uts), and for
        # the last host a mount namespace with the hidden directories covered by empty tmpfs.
        local hide_cmd=""
        if [ "$k" = "$n" ]; then
            local dir
            IFS=: read -r -a dirs <<< "$HIDE"
            for dir in "${dirs[@]}"; do
                mkdir -p "$dir"
                hide_cmd+="mount -t tmpfs -o size=1g,mode=755 pilab-hidden $(printf %q "$dir"); "
            done
        fi
        ip netns exec "$ns" unshare --uts --mount --propagation private \
            sh -c "hostname $ns; $hide_cmd exec $SSHD -f $(printf %q "$LAB/sshd_config-$ns")"

        cat >> "$LAB/ssh_config" <<EOF
Host $ns
    HostName $addr
EOF
        echo "$ns" >> "$LAB/hosts.txt"
    done
    cat >> "$LAB/ssh_config" <<EOF
Host *
    User root
    IdentityFile $LAB/id_ed25519
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
EOF
    printf '#!/bin/sh\nexec ssh -F %s/ssh_config "$@"\n' "$LAB" > "$LAB/ssh"
    chmod 755 "$LAB/ssh"

    # How pipeinfer-cpu (and any mpiexec) reaches the lab: ssh through the lab's config; hydra's
    # proxies call back to the bridge address; ranks talk TCP over lab0 (libfabric's tcp provider).
    cat > "$LAB/env" <<EOF
export PIPEINFER_SSH=$LAB/ssh
export PIPEINFER_MPIEXEC_ARGS="-localhost $NET.1 -genv MPIR_CVAR_CH4_NETMOD ofi -genv FI_PROVIDER tcp \
-genv FI_TCP_IFACE $IFACE"
EOF

    # Wait until every sshd answers.
    for k in $(seq 1 "$n"); do
        for _ in $(seq 1 50); do
            "$LAB/ssh" -o ConnectTimeout=2 "$PREFIX$k" true 2>/dev/null && continue 2
            sleep 0.1
        done
        die "sshd of $PREFIX$k does not answer"
    done
    trap - EXIT
    echo "lab up: $n hosts ($(tr '\n' ' ' < "$LAB/hosts.txt")); hostfile $LAB/hosts.txt; . $LAB/env to use it"
}

case "${1:-}" in
    up) up "${2:-3}" ;;
    down) down ;;
    *) echo "usage: $0 up [N] | down" >&2; exit 2 ;;
esac
