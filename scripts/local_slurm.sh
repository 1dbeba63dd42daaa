#!/usr/bin/env bash
# A real SLURM cluster on this machine, for tests and for trying the slurm/ scripts: one node, or several
# nodes each with its own hostname and network address.
#
#   scripts/local_slurm.sh start          install if missing (root + apt only), start munge, slurmctld and one
#                                         slurmd per node, wait until every node is idle, print
#                                         `export SLURM_CONF=...`
#   scripts/local_slurm.sh stop           stop everything `start` made: daemons, job processes left on the
#                                         nodes, network namespaces, veth pairs and the bridge
#   scripts/local_slurm.sh status         exit 0 and print the export line if the cluster answers, else exit 1
#   scripts/local_slurm.sh env            print the export line only
#   scripts/local_slurm.sh nodes          the node names, one a line
#   scripts/local_slurm.sh kill-node N    node loss: cut N's link (its peers hear nothing more, as with a
#                                         power cut), then SIGKILL every process on it (slurmd, its jobs' tasks)
#   scripts/local_slurm.sh revive-node N  bring N back: link up, slurmd started again (ReturnToService=2)
#   scripts/local_slurm.sh exec N CMD...  run CMD on node N (its hostname, network and hosts file)
#
#   eval "$(scripts/local_slurm.sh start)"   # then sbatch / squeue / scontrol work in this shell
#
# Nodes: ASSET_SLURM_NODES (default 1). One node: slurmd runs beside slurmctld under this machine's
# hostname. Two or more: node i is `asset-n<i>`: its slurmd runs in its own network namespace (a veth
# pair to the bridge `asset-br`, address 10.211.77.<10+i>) and its own UTS and mount namespaces (its own
# hostname; a hosts file naming every node is bind-mounted on /etc/hosts there, so node names resolve on
# the nodes and gloo binds to the node's address, while the machine's /etc/hosts stays untouched). Jobs
# inherit all three from slurmd, so srun tasks on two nodes talk over the bridge like two machines.
# slurmctld and the client commands stay in this machine's namespaces; they reach the nodes through the
# bridge's address 10.211.77.1, the only address added outside the nodes (removed again by `stop`).
# munge serves every namespace through its path socket. Process tracking is proctrack/linuxproc and
# task/none: all slurmd share one cgroup tree, so cgroup plugins cannot work here.
# (`ip netns exec` is not used: it remounts /sys, and slurmd 22.05 then finds no /sys/fs/cgroup and exits.)
#
# Everything else (slurm.conf, hosts file, munge key and socket, state, logs, pid files) lives in one
# folder: ASSET_SLURM_DIR (default /tmp/asset_slurm). Nothing under /etc is changed, so the system's own
# munge/slurm (if any) are untouched. `start` is idempotent: a running cluster with the same node count
# is left as it is (another count: restarted). Exit codes: 0 ok, 1 failed to start (see the logs named
# in the message), 2 usage, 3 SLURM cannot run here (not installed and not installable - no root or no
# apt-get - or not root, or no network namespaces for several nodes): callers may skip on 3.
#
# Environment: ASSET_SLURM_DIR, ASSET_SLURM_NODES, ASSET_SLURM_CPUS (CPUs each node advertises; default
# max(nproc, 8) for one node, 4 per node for several, so a few small test jobs run side by side on a
# 2-core machine), ASSET_SLURM_CRED_EXPIRE (seconds; also how long a requeued job waits before it may
# start again; default 10), ASSET_SLURM_SLURMD_TIMEOUT (seconds without an answer before a node is DOWN
# and its jobs are requeued or cancelled; default 30), ASSET_SLURM_SUBNET (first three octets of the
# nodes' /24; default 10.211.77).
set -euo pipefail

DIR=${ASSET_SLURM_DIR:-/tmp/asset_slurm}
CONF=$DIR/slurm.conf
MUNGE=$DIR/munge
SOCK=$MUNGE/munge.socket.2
HOSTS=$DIR/hosts
HOST=$(hostname -s)
NODES=${ASSET_SLURM_NODES:-1}
SUBNET=${ASSET_SLURM_SUBNET:-10.211.77}
BRIDGE=asset-br
PREFIX=asset-n  # node i: hostname, network namespace and node name asset-n<i>; host-side veth asset-v<i>

log() { echo "local_slurm: $*" >&2; }

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

[[ $NODES =~ ^[1-9][0-9]?$ ]] || { log "ASSET_SLURM_NODES=$NODES: expected 1 to 99"; exit 2; }
[[ $SUBNET =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { log "ASSET_SLURM_SUBNET=$SUBNET: expected three octets, e.g. 10.211.77"; exit 2; }

multi() { [[ $NODES -gt 1 ]]; }

node_names() {  # the nodes of this configuration
    if multi; then
        local i
        for ((i = 1; i <= NODES; i++)); do echo "$PREFIX$i"; done
    else
        echo "$HOST"
    fi
}

node_index() {  # asset-n3 -> 3
    [[ $1 =~ ^$PREFIX([0-9]+)$ ]] || { log "not a node of this cluster: $1 (nodes: $(node_names | tr '\n' ' '))"; exit 2; }
    echo "${BASH_REMATCH[1]}"
}

pid_alive() {  # pid_alive FILE: the pid in FILE is a live process
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

slurmd_pidfile() { echo "$DIR/slurmd.$1.pid"; }

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null &&
              command -v sbatch >/dev/null && command -v munged >/dev/null &&
              { ! multi || { command -v ip >/dev/null && command -v nsenter >/dev/null; }; }; }

ensure_installed() {
    installed && return 0
    local pkgs=(slurmctld slurmd slurm-client munge)
    multi && pkgs+=(iproute2 util-linux)
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        log "SLURM is not installed and cannot be installed here (need root and apt-get):"
        log "  apt-get install ${pkgs[*]}"
        exit 3
    fi
    log "installing ${pkgs[*]} (apt-get)"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${pkgs[@]}"; } \
            >"${TMPDIR:-/tmp}/asset_slurm_apt.log" 2>&1; then
        log "apt-get failed; see ${TMPDIR:-/tmp}/asset_slurm_apt.log"
        tail -n 20 "${TMPDIR:-/tmp}/asset_slurm_apt.log" >&2
        exit 3
    fi
    installed || { log "packages installed but the binaries are still missing"; exit 3; }
}

free_port() {  # a TCP port nobody listens on right now
    python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

cluster_answers() {  # slurmctld answers and every node is usable (idle, or busy with jobs)
    local states want
    want=$(node_names | wc -l)
    states=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null | sort -u) || return 1
    [[ $(echo "$states" | grep -cE ' (idle|mix|mixed|alloc|allocated|comp|completing)$') -eq $want ]] || return 1
    [[ $(echo "$states" | awk '{print $1}' | sort | tr '\n' ' ') == "$(node_names | sort | tr '\n' ' ')" ]]
}

daemons_alive() {
    pid_alive "$MUNGE/munged.pid" && pid_alive "$DIR/slurmctld.pid" || return 1
    local n
    for n in $(node_names); do pid_alive "$(slurmd_pidfile "$n")" || return 1; done
}

running() { [[ -f $CONF ]] && daemons_alive && cluster_answers; }

# ---- network namespaces (several nodes) ------------------------------------------------------------------

check_netns() {
    if ! command -v ip >/dev/null || ! command -v nsenter >/dev/null || ! command -v unshare >/dev/null; then
        log "several nodes need ip (iproute2), nsenter and unshare (util-linux)"
        exit 3
    fi
    if ! ip netns list >/dev/null 2>&1 || ! ip link show >/dev/null 2>&1; then
        log "network namespaces are not available here: use ASSET_SLURM_NODES=1"
        exit 3
    fi
    # the subnet must be ours alone: no address or route of this machine inside it except our bridge's
    if ip -4 -o addr show | grep -v " $BRIDGE " | grep -q " inet $SUBNET\."; then
        log "$SUBNET.0/24 is already used on this machine: set ASSET_SLURM_SUBNET to a free /24"
        exit 1
    fi
}

write_hosts() {
    local i
    {
        echo "# generated by scripts/local_slurm.sh: bind-mounted on /etc/hosts inside the nodes only"
        echo "127.0.0.1 localhost"
        echo "::1 localhost ip6-localhost ip6-loopback"
        echo "$SUBNET.1 $HOST"
        for ((i = 1; i <= NODES; i++)); do echo "$SUBNET.$((10 + i)) $PREFIX$i"; done
        # the IPv4-mapped forms too: torch's TCP store listens on IPv6 and looks its clients up by them
        for ((i = 1; i <= NODES; i++)); do echo "::ffff:$SUBNET.$((10 + i)) $PREFIX$i"; done
    } >"$HOSTS.tmp"
    mv "$HOSTS.tmp" "$HOSTS"
}

ensure_bridge() {
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
    fi
    ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
}

ensure_node_net() {  # ensure_node_net NAME INDEX: namespace, veth pair, addresses, links up
    local n=$1 i=$2 veth=asset-v$2
    ip netns list | awk '{print $1}' | grep -qx "$n" || ip netns add "$n"
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip link add "$veth" type veth peer name eth0 netns "$n"
    fi
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$n" addr replace "$SUBNET.$((10 + i))/24" dev eth0
    ip -n "$n" link set lo up
    ip -n "$n" link set eth0 up
}

start_slurmd() {  # start_slurmd NAME: slurmd of one node (in its namespaces when there are several)
    local n=$1 i
    if ! multi; then
        slurmd -f "$CONF" || { log "slurmd failed; see $DIR/slurmd.$n.log"; tail -n 20 "$DIR/slurmd.$n.log" >&2; exit 1; }
        return 0
    fi
    i=$(node_index "$n")
    ensure_node_net "$n" "$i"
    # Only the network namespace is entered (not `ip netns exec`, which remounts /sys); new UTS and mount
    # namespaces give the node its hostname and hosts file. slurmd daemonizes and keeps all three.
    nsenter --net="/run/netns/$n" unshare --uts --mount --propagation private -- \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && exec slurmd -f "$3"' node "$n" "$HOSTS" "$CONF" || {
        log "slurmd of $n failed; see $DIR/slurmd.$n.log"; tail -n 20 "$DIR/slurmd.$n.log" >&2; exit 1; }
}

node_pids() {  # every process in node NAME's network namespace (slurmd, slurmstepd, job tasks)
    ip netns pids "$1" 2>/dev/null || true
}

kill_node_procs() {  # kill_node_procs NAME SIGNAL
    local pids
    pids=$(node_pids "$1")
    [[ -n $pids ]] && kill "-$2" $pids 2>/dev/null || true
}

remove_node() {  # stop node NAME and remove its namespace (the veth pair goes with it)
    local n=$1 pids
    stop_pidfile "$(slurmd_pidfile "$n")" "slurmd $n"
    if ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$n"; then
        kill_node_procs "$n" TERM
        for _ in $(seq 30); do
            pids=$(node_pids "$n")
            [[ -z $pids ]] && break
            sleep 0.1
        done
        kill_node_procs "$n" KILL
        ip netns del "$n" 2>/dev/null || true
    fi
    ip link del "asset-v$(node_index "$n")" 2>/dev/null || true
}

# ---- configuration and daemons ---------------------------------------------------------------------------

write_conf() {
    local cpus mem ctld_host nodes_line n
    if multi; then
        cpus=${ASSET_SLURM_CPUS:-4}
        ctld_host="$HOST($SUBNET.1)"
    else
        cpus=${ASSET_SLURM_CPUS:-$(( $(nproc) > 8 ? $(nproc) : 8 ))}
        ctld_host=$HOST
    fi
    # 90% of what slurmd sees, so slurmd never reports less memory than configured (node would drain).
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( mem * 9 / 10 ))
    cat >"$CONF.tmp" <<EOF
# generated by scripts/local_slurm.sh - a $NODES-node test cluster; everything lives in $DIR
ClusterName=asset
SlurmctldHost=$ctld_host
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also the pause before a requeued job may start again (default 120 s).
AuthInfo=socket=$SOCK,cred_expire=${ASSET_SLURM_CRED_EXPIRE:-10}
# no cgroups in containers (and one shared cgroup tree for all nodes): track processes by /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# the node may advertise more CPUs than it has (small test jobs side by side)
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
# a node that does not answer for this long is DOWN; its jobs are requeued (--requeue) or cancelled
SlurmdTimeout=${ASSET_SLURM_SLURMD_TIMEOUT:-30}
# finished jobs stay visible to 'scontrol show job' for an hour (there is no sacct without slurmdbd)
MinJobAge=3600
# quick scheduling, so tests do not wait on the default 60 s main loop
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,batch_sched_delay=0,preempt_send_user_signal
KillWait=30
InactiveLimit=0
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
EOF
    if multi; then
        local i
        for ((i = 1; i <= NODES; i++)); do
            echo "NodeName=$PREFIX$i NodeAddr=$SUBNET.$((10 + i)) NodeHostname=$PREFIX$i CPUs=$cpus RealMemory=$mem State=UNKNOWN"
        done >>"$CONF.tmp"
    else
        echo "NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN" >>"$CONF.tmp"
    fi
    nodes_line=$(node_names | paste -sd, -)
    # Preemption, as on shared clusters: a job in `urgent` preempts jobs in `debug` (requeued: PreemptMode
    # REQUEUE) and in `scavenger` (cancelled: PreemptMode CANCEL); the preempted job's tasks get TERM, its
    # batch shell the --signal warning (preempt_send_user_signal), and GraceTime seconds to save.
    cat >>"$CONF.tmp" <<EOF
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=$nodes_line Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=scavenger Nodes=$nodes_line MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30 PreemptMode=CANCEL
PartitionName=urgent Nodes=$nodes_line MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
    mv "$CONF.tmp" "$CONF"
}

conf_nodes() {  # node names in the current slurm.conf (empty if none)
    [[ -f $CONF ]] && sed -n 's/^NodeName=\([^ ]*\).*/\1/p' "$CONF" | sort | tr '\n' ' ' || true
}

start_munge() {
    if pid_alive "$MUNGE/munged.pid" && munge -S "$SOCK" -n </dev/null | unmunge -S "$SOCK" >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p "$MUNGE"
    chmod 711 "$MUNGE"  # munged wants the socket folder not writable by others, but reachable
    if [[ ! -s $MUNGE/munge.key ]]; then
        (umask 077; head -c 1024 /dev/urandom >"$MUNGE/munge.key")
        chmod 400 "$MUNGE/munge.key"
    fi
    rm -f "$SOCK" "$SOCK.lock"
    munged --force -S "$SOCK" --key-file="$MUNGE/munge.key" --log-file="$MUNGE/munged.log" \
        --pid-file="$MUNGE/munged.pid" --seed-file="$MUNGE/munged.seed"
    for _ in $(seq 50); do
        munge -S "$SOCK" -n </dev/null | unmunge -S "$SOCK" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "munged does not answer on $SOCK; see $MUNGE/munged.log"
    exit 1
}

stop_pidfile() {  # stop_pidfile FILE NAME: TERM, wait, then KILL the process named in FILE
    local f=$1 pid
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            log "$2 (pid $pid) ignored TERM; killing it"
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$f"
}

stop_nodes() {  # the nodes this folder's slurm.conf names, whatever ASSET_SLURM_NODES says now
    local f n namespaced=0
    for f in "$DIR"/slurmd.*.pid; do
        [[ -e $f ]] || continue
        n=${f#"$DIR/slurmd."}
        n=${n%.pid}
        stop_pidfile "$f" "slurmd $n"
    done
    stop_pidfile "$DIR/slurmd.pid" slurmd  # the one-node layout of earlier versions
    for n in $(conf_nodes); do
        [[ $n =~ ^$PREFIX[0-9]+$ ]] || continue
        namespaced=1
        remove_node "$n"
    done
    # the bridge serves the namespaced nodes only: a one-node cluster in another folder leaves it alone
    [[ $namespaced == 1 ]] && { ip link del "$BRIDGE" 2>/dev/null || true; }
    return 0
}

do_stop() {
    stop_nodes
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    stop_pidfile "$MUNGE/munged.pid" munged
}

wait_idle() {
    for _ in $(seq 120); do
        cluster_answers && return 0
        sleep 0.5
    done
    log "the nodes did not become idle within 60 s:"
    SLURM_CONF=$CONF sinfo -N -l >&2 || true
    tail -n 20 "$DIR/slurmctld.log" >&2 || true
    tail -n 5 "$DIR"/slurmd.*.log >&2 || true
    exit 1
}

do_start() {
    ensure_installed
    if [[ $(id -u) -ne 0 ]]; then
        log "slurmd launches jobs as their users, so this cluster needs root"
        exit 3
    fi
    if running && [[ $(conf_nodes) == "$(node_names | sort | tr '\n' ' ')" ]]; then
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    multi && check_netns
    # a partial cluster (one daemon died) or another node count: restart the slurm daemons afresh
    local clear=()
    [[ $(conf_nodes) == "$(node_names | sort | tr '\n' ' ')" ]] || clear=(-c)  # other nodes: old jobs go
    stop_nodes
    stop_pidfile "$DIR/slurmctld.pid" slurmctld
    mkdir -p "$DIR/state" "$DIR/spool"
    start_munge
    write_conf
    if multi; then
        write_hosts
        ensure_bridge
    fi
    slurmctld "${clear[@]}" -f "$CONF" || {
        log "slurmctld failed; see $DIR/slurmctld.log"; tail -n 20 "$DIR/slurmctld.log" >&2; exit 1; }
    local n
    for n in $(node_names); do start_slurmd "$n"; done
    wait_idle
    echo "export SLURM_CONF=$CONF"
}

node_of_arg() {  # check a node argument against the running configuration
    local n=${1:-}
    [[ -n $n ]] || { log "which node? ($(conf_nodes))"; exit 2; }
    [[ " $(conf_nodes)" == *" $n "* ]] || { log "no node $n in $CONF (nodes: $(conf_nodes))"; exit 2; }
    [[ $n =~ ^$PREFIX[0-9]+$ ]] || { log "$n is not a namespaced node (start with ASSET_SLURM_NODES>=2)"; exit 2; }
    echo "$n"
}

do_kill_node() {
    local n i
    n=$(node_of_arg "${1:-}")
    i=$(node_index "$n")
    # cut the link first: the FIN/RST of the killed processes never reaches the other nodes, which now hear
    # nothing more from this one (a power cut, not a clean exit)
    ip link set "asset-v$i" down 2>/dev/null || true
    kill_node_procs "$n" KILL
    rm -f "$(slurmd_pidfile "$n")"
    log "node $n: link cut, every process on it killed"
}

do_revive_node() {
    local n pid
    n=$(node_of_arg "${1:-}")
    pid_alive "$(slurmd_pidfile "$n")" && { log "node $n: slurmd already runs"; return 0; }
    kill_node_procs "$n" KILL
    NODES=$(conf_nodes | wc -w)
    start_slurmd "$n"
    for _ in $(seq 120); do
        [[ $(SLURM_CONF=$CONF sinfo -h -n "$n" -o %t 2>/dev/null) =~ ^(idle|mix|alloc)$ ]] && break
        sleep 0.5
    done
    log "node $n: back ($(SLURM_CONF=$CONF sinfo -h -n "$n" -o %t 2>/dev/null))"
}

do_exec() {
    local n pid
    n=$(node_of_arg "${1:-}")
    shift
    pid=$(cat "$(slurmd_pidfile "$n")" 2>/dev/null) || { log "node $n has no slurmd running"; exit 1; }
    exec nsenter -t "$pid" --net --uts --mount -- env SLURM_CONF="$CONF" "$@"
}

case ${1:-} in
    start) do_start ;;
    stop) do_stop ;;
    status)
        if installed && [[ -f $CONF ]] && NODES=$(conf_nodes | wc -w) && [[ $NODES -ge 1 ]] && running; then
            echo "export SLURM_CONF=$CONF"
        else
            log "not running ($DIR)"; exit 1
        fi ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    nodes) conf_nodes | tr ' ' '\n' | sed '/^$/d' ;;
    kill-node) do_kill_node "${2:-}" ;;
    revive-node) do_revive_node "${2:-}" ;;
    exec) shift; do_exec "$@" ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
esac
