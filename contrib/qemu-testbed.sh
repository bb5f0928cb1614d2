#!/usr/bin/env bash
# qemu-testbed.sh - install, start and stop a real libvirtd + QEMU (TCG, no KVM)
# on this machine for libvirtfs' integration tests.  See docs/testbed.md.
#
#   contrib/qemu-testbed.sh install        packages, libvirt-qemu user, qemu.conf
#   contrib/qemu-testbed.sh start          virtlogd + libvirtd; prints qemu:///system
#                                          (the same daemon serves lxc:///system)
#   contrib/qemu-testbed.sh start-second   2nd libvirtd (migration target); prints its URI
#   contrib/qemu-testbed.sh stop           stop everything this script started, put
#                                          qemu.conf back as it was before install
#   contrib/qemu-testbed.sh status         print what runs
#   contrib/qemu-testbed.sh changes        say what start and start-second change
#
# Every subcommand is idempotent.  Needs root.  Loopback only: the second daemon
# listens on 127.0.0.1:16510 without authentication, nothing else listens.
set -euo pipefail

PRIMARY_URI="qemu:///system"
LXC_URI="lxc:///system"
SECOND_PORT=16510
SECOND_URI="qemu+tcp://127.0.0.1:${SECOND_PORT}/system"
SECOND_HOSTNAME="libvirtfs-second"

STATE_DIR="${LIBVIRTFS_TESTBED_STATE:-/var/lib/libvirtfs-testbed}"
# Both can be moved, and qemu.conf too, to try install and stop on files of one's own
# (tests/test_testbed.py) without touching the daemons that run.
RUN_DIR="${LIBVIRTFS_TESTBED_RUN:-/run/libvirtfs-testbed}"   # which daemons *we* started
QEMU_CONF="${LIBVIRTFS_TESTBED_QEMU_CONF:-/etc/libvirt/qemu.conf}"
QEMU_CONF_ORIGINAL="$STATE_DIR/qemu.conf.original"   # as it was before the first install
QEMU_CONF_ABSENT="$STATE_DIR/qemu.conf.absent"       # (or: there was none)
QEMU_CONF_SET="$STATE_DIR/qemu.conf.set"             # as install left it
SECOND_DIR="$STATE_DIR/second"          # private state of the second daemon
SECOND_PIDFILE="$RUN_DIR/libvirtd-second.pid"
SECOND_LOG="$SECOND_DIR/log/libvirtd.log"   # its /var/log/libvirt/libvirtd.log
PRIMARY_LOG="$STATE_DIR/libvirtd.log"
VIRTLOGD_PIDFILE="$RUN_DIR/virtlogd.pid"
LIBVIRTD_PIDFILE="$RUN_DIR/libvirtd.pid"
WAIT_SECS="${LIBVIRTFS_TESTBED_WAIT:-30}"

PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils
          libvirt-daemon-driver-lxc libvirt-clients util-linux
          # the far ends of remote transports, which tests start on loopback themselves
          # (tests/remote_daemons.py): sshd for qemu+ssh, certtool for qemu+tls, SASL
          openssh-server openssh-client gnutls-bin sasl2-bin libsasl2-modules)
# libvirtd loads its drivers when it starts: one already running when
# libvirt-daemon-driver-lxc arrives serves no lxc:///system until it restarts.
LXC_DRIVER=/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_lxc.so

die() { echo "qemu-testbed: $*" >&2; exit 1; }
log() { echo "qemu-testbed: $*" >&2; }

[[ $(id -u) -eq 0 ]] || die "must run as root"

# ---------------------------------------------------------------- helpers

# pid_alive PIDFILE NAME: true if PIDFILE names a live process whose comm is NAME.
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    live_proc "$pid" "$name"
}

# live_proc PID NAME: PID is a running (not zombie) process whose comm is NAME.
# (Daemons are reparented to this machine's pid 1, which may reap them late.)
live_proc() {
    local pid=$1 name=$2 comm stat
    { read -r comm </proc/"$pid"/comm && read -r stat </proc/"$pid"/stat; } 2>/dev/null || return 1
    [[ $comm == "$name" ]] || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# any_live NAME: some non-zombie process has comm NAME.
any_live() {
    local pid
    for pid in $(pgrep -x "$1"); do live_proc "$pid" "$1" && return 0; done
    return 1
}

# answers URI: the daemon behind URI answers a trivial call.
answers() {
    timeout 10 virsh -q -c "$1" version >/dev/null 2>&1
}

# wait_answer URI PIDFILE NAME LOGFILE: bounded wait for URI to answer.
wait_answer() {
    local uri=$1 pidfile=$2 name=$3 logfile=$4 i
    for ((i = 0; i < WAIT_SECS * 4; i++)); do
        answers "$uri" && return 0
        if [[ -n $pidfile ]] && (( i > 8 )) && ! pid_alive "$pidfile" "$name"; then
            die "$name died before $uri answered; last error: $(grep -E ' error : ' "$logfile" 2>/dev/null | grep -v daemonRunStateInit | tail -n 1 | sed 's/^.* error : //')"
        fi
        sleep 0.25
    done
    die "$uri did not answer within ${WAIT_SECS}s; see $logfile"
}

# set_conf FILE KEY VALUE: make FILE contain exactly one active "KEY = VALUE" line.
# Replaces an active single-line setting in place, else appends; comments and
# unrelated settings are left alone.
set_conf() {
    local file=$1 key=$2 value=$3 line
    line="$key = $value"
    touch "$file"
    if grep -qE "^[[:space:]]*${key}[[:space:]]*=" "$file"; then
        grep -qxF "$line" "$file" && \
            [[ $(grep -cE "^[[:space:]]*${key}[[:space:]]*=" "$file") -eq 1 ]] && return 0
        # keep the first active occurrence (replaced), drop the others
        local tmp
        tmp=$(mktemp "$file.XXXXXX")
        awk -v key="$key" -v line="$line" '
            $0 ~ "^[[:space:]]*" key "[[:space:]]*=" { if (!done) { print line; done = 1 } ; next }
            { print }' "$file" >"$tmp"
        chmod --reference="$file" "$tmp"
        mv "$tmp" "$file"
    else
        printf '%s\n' "$line" >>"$file"
    fi
}

# unset_conf FILE KEY: comment out active "KEY = ..." lines.
unset_conf() {
    local file=$1 key=$2
    [[ -f $file ]] || return 0
    grep -qE "^[[:space:]]*${key}[[:space:]]*=" "$file" || return 0
    sed -i -E "s/^([[:space:]]*${key}[[:space:]]*=)/#\\1/" "$file"
}

packages_missing() {
    local p missing=()
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    echo "${missing[@]}"
}

# qemu.conf settings common to both daemons
configure_qemu_conf() {
    local f=$1
    set_conf "$f" user '"root"'
    set_conf "$f" group '"root"'
    set_conf "$f" security_driver '"none"'
    set_conf "$f" cgroup_controllers '[ ]'
    set_conf "$f" remember_owner 0
    # Neither migration_host nor migration_address may be 127.0.0.1: libvirtd
    # then refuses to start ("migration_address must not be the address of the
    # local machine").  Tests pass --migrateuri tcp://127.0.0.1 and
    # --listen-address 127.0.0.1 to virsh migrate instead.
    unset_conf "$f" migration_host
    unset_conf "$f" migration_address
}

# Keep qemu.conf as it was before the test bed's first change, once: a later install
# (every start runs one) must not take the test bed's settings for the original.
keep_qemu_conf() {
    [[ -e $QEMU_CONF_ORIGINAL || -e $QEMU_CONF_ABSENT ]] && return 0
    if [[ -e $QEMU_CONF ]]; then
        cp -p "$QEMU_CONF" "$QEMU_CONF_ORIGINAL"
    else
        : >"$QEMU_CONF_ABSENT"
    fi
}

# Put qemu.conf back, unless someone changed it since install set it (their change
# stays, and so does the copy of the original, which the message names).
restore_qemu_conf() {
    [[ -e $QEMU_CONF_ORIGINAL || -e $QEMU_CONF_ABSENT ]] || return 0
    if [[ -e $QEMU_CONF_SET ]] && ! cmp -s "$QEMU_CONF" "$QEMU_CONF_SET"; then
        log "$QEMU_CONF changed since install set it; left as it is (the original: $QEMU_CONF_ORIGINAL)"
        return 0
    fi
    if [[ -e $QEMU_CONF_ABSENT ]]; then
        rm -f "$QEMU_CONF" "$QEMU_CONF_ABSENT"
    else
        cp -p "$QEMU_CONF_ORIGINAL" "$QEMU_CONF"
        rm -f "$QEMU_CONF_ORIGINAL"
    fi
    rm -f "$QEMU_CONF_SET"
    log "put $QEMU_CONF back as it was before install"
}

cmd_changes() {
    cat <<CHANGES_EOF
What the QEMU test bed changes on this machine (contrib/qemu-testbed.sh, docs/testbed.md):
  - installs packages if missing (${PACKAGES[*]}) and the libvirt-qemu user and group; they stay
  - $QEMU_CONF: user and group "root", security_driver "none", cgroup_controllers [ ],
    remember_owner 0, migration_host and migration_address commented out; 'stop' puts the
    file back as it was (a copy is kept in $STATE_DIR)
  - starts virtlogd and libvirtd (qemu:///system, lxc:///system) unless one runs already;
    'stop' stops them and their guests
  - start-second: a second libvirtd for migration tests that accepts UNAUTHENTICATED
    connections on 127.0.0.1:$SECOND_PORT (loopback only, but any local user reaches it as
    root) while it runs; 'stop' stops it
  - tests/test_transports.py starts its own sshd (key authentication) and libvirtd (TLS, SASL)
    on loopback ports while it runs, and stops them
CHANGES_EOF
}

# ---------------------------------------------------------------- install

cmd_install() {
    local missing
    missing=$(packages_missing)
    if [[ -n $missing ]]; then
        log "installing: $missing"
        export DEBIAN_FRONTEND=noninteractive
        local aptlog=$RUN_DIR/apt.log
        apt-get update -q >"$aptlog" 2>&1 || die "apt-get update failed; see $aptlog"
        # No package may start its service (openssh-server's sshd would listen on every
        # address): where no policy-rc.d says so already, one does while apt runs.
        local policy=/usr/sbin/policy-rc.d ours=""
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\n# qemu-testbed.sh: no service starts while it installs\nexit 101\n' >"$policy"
            chmod 755 "$policy"
            ours=1
        fi
        local status=0
        # shellcheck disable=SC2086
        apt-get install -y -q --no-install-recommends $missing >>"$aptlog" 2>&1 || status=$?
        [[ -z $ours ]] || rm -f "$policy"
        (( status == 0 )) || die "apt-get install failed; see $aptlog"
    fi
    for p in libvirtd virtlogd virsh qemu-system-x86_64 qemu-img unshare \
             /usr/sbin/sshd ssh ssh-keygen certtool saslpasswd2; do
        command -v "$p" >/dev/null || die "$p not found after install"
    done
    [[ -f $LXC_DRIVER ]] || die "$LXC_DRIVER not found after install"

    getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
    id libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu

    mkdir -p /var/log/libvirt /run/libvirt /var/lib/libvirt/images "$STATE_DIR" "$RUN_DIR"
    keep_qemu_conf
    configure_qemu_conf "$QEMU_CONF"
    cp -p "$QEMU_CONF" "$QEMU_CONF_SET"
}

# ---------------------------------------------------------------- primary

cmd_start() {
    mkdir -p "$RUN_DIR" "$STATE_DIR"
    cmd_install    # idempotent, fast when everything is in place
    mkdir -p /var/log/libvirt /run/libvirt /var/lib/libvirt/images

    # Our virtlogd without its socket (e.g. another virtlogd removed it on
    # exit) is useless: guests then fail with "Failed to connect socket to
    # '/run/libvirt/virtlogd-sock'".  Restart it.
    if pid_alive "$VIRTLOGD_PIDFILE" virtlogd && [[ ! -S /run/libvirt/virtlogd-sock ]]; then
        stop_pid "$VIRTLOGD_PIDFILE" virtlogd
    fi
    if ! any_live virtlogd; then
        rm -f "$VIRTLOGD_PIDFILE"
        virtlogd -d -p "$VIRTLOGD_PIDFILE" || die "virtlogd failed to start"
        for _ in $(seq 40); do
            pid_alive "$VIRTLOGD_PIDFILE" virtlogd && [[ -S /run/libvirt/virtlogd-sock ]] && break
            sleep 0.25
        done
        pid_alive "$VIRTLOGD_PIDFILE" virtlogd && [[ -S /run/libvirt/virtlogd-sock ]] \
            || die "virtlogd did not come up (no /run/libvirt/virtlogd-sock)"
    fi

    if answers "$PRIMARY_URI"; then
        check_lxc
        echo "$PRIMARY_URI"
        return 0
    fi

    if pid_alive "$LIBVIRTD_PIDFILE" libvirtd; then
        : # ours, still starting up: just wait below
    elif pid_alive /run/libvirtd.pid libvirtd; then
        log "a libvirtd not started by this script runs (pid $(</run/libvirtd.pid)); waiting for it"
        wait_answer "$PRIMARY_URI" "" libvirtd /dev/null
        echo "$PRIMARY_URI"; return 0
    else
        rm -f "$LIBVIRTD_PIDFILE"
        # -p: our own pid file, so that stop only stops the daemon we started
        LIBVIRT_LOG_OUTPUTS="3:file:$PRIMARY_LOG" \
            libvirtd -d -p "$LIBVIRTD_PIDFILE" || die "libvirtd failed to start; see $PRIMARY_LOG"
    fi
    wait_answer "$PRIMARY_URI" "$LIBVIRTD_PIDFILE" libvirtd "$PRIMARY_LOG"
    check_lxc
    echo "$PRIMARY_URI"
}

# check_lxc: say so when the running libvirtd predates the LXC driver (it is not
# restarted here: other users of the daemon may be in the middle of something).
check_lxc() {
    answers "$LXC_URI" && return 0
    log "libvirtd does not serve $LXC_URI (started before libvirt-daemon-driver-lxc was" \
        "installed?); restart it when nobody uses it: $0 stop; $0 start"
}

# ---------------------------------------------------------------- second

prepare_second() {
    local d=$SECOND_DIR
    mkdir -p "$d/run" "$d/lib/images" "$d/log" "$d/etc" "$d/cache"
    # Fresh copy of the configuration, without the primary's guests/networks/pools.
    rm -rf "${d:?}/etc"
    cp -a /etc/libvirt "$d/etc"
    rm -rf "$d/etc/qemu" "$d/etc/lxc" "$d/etc/storage" "$d/etc/nwfilter" "$d/etc/secrets"
    find "$d/etc" -maxdepth 1 -name '*.xml' -delete
    mkdir -p "$d/etc/qemu"
    configure_qemu_conf "$d/etc/qemu.conf"
    set_conf "$d/etc/qemu.conf" stdio_handler '"file"'    # no virtlogd in there

    [[ -s $d/host_uuid ]] || cat /proc/sys/kernel/random/uuid >"$d/host_uuid"
    local conf=$d/etc/libvirtd.conf
    set_conf "$conf" listen_tcp 1
    set_conf "$conf" listen_tls 0
    set_conf "$conf" tcp_port "\"$SECOND_PORT\""
    set_conf "$conf" listen_addr '"127.0.0.1"'
    set_conf "$conf" auth_tcp '"none"'
    set_conf "$conf" host_uuid "\"$(<"$d/host_uuid")\""
    set_conf "$conf" log_outputs '"3:file:/var/log/libvirt/libvirtd.log"'
}

cmd_start_second() {
    cmd_start >/dev/null
    if answers "$SECOND_URI"; then
        echo "$SECOND_URI"; return 0
    fi
    if ! pid_alive "$SECOND_PIDFILE" libvirtd; then
        rm -f "$SECOND_PIDFILE"
        prepare_second
        local d=$SECOND_DIR
        # A private mount + UTS namespace: own hostname and own /run/libvirt,
        # /var/lib/libvirt, /etc/libvirt, /var/log/libvirt, /var/cache/libvirt.
        # libvirtd -d daemonises; the namespace lives on with it.
        # shellcheck disable=SC2016  # $1..$3 expand inside the namespace
        unshare --mount --uts --propagation private --fork -- /bin/sh -ec '
            hostname "$1"
            # The namespace starts as a copy of ours, FUSE mounts included; holding
            # them would keep them alive after fusermount3 -u out here.
            awk '"'"'$3 ~ /^fuse/ {print $2}'"'"' /proc/mounts | while read -r m; do
                umount -l "$m" || true; done
            mkdir -p /var/cache/libvirt
            mount --bind "$2/run"   /run/libvirt
            mount --bind "$2/lib"   /var/lib/libvirt
            mount --bind "$2/etc"   /etc/libvirt
            mount --bind "$2/log"   /var/log/libvirt
            mount --bind "$2/cache" /var/cache/libvirt
            exec libvirtd -d -l -f /etc/libvirt/libvirtd.conf -p "$3"
        ' second "$SECOND_HOSTNAME" "$d" "$SECOND_PIDFILE" </dev/null \
            || die "second libvirtd failed to start; see $SECOND_LOG"
    fi
    wait_answer "$SECOND_URI" "$SECOND_PIDFILE" libvirtd "$SECOND_LOG"
    echo "$SECOND_URI"
}

# ---------------------------------------------------------------- stop/status

# stop_pid PIDFILE NAME: SIGTERM the process, wait up to 15 s, then SIGKILL.
stop_pid() {
    local pidfile=$1 name=$2 pid
    if pid_alive "$pidfile" "$name"; then
        pid=$(<"$pidfile")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 60); do pid_alive "$pidfile" "$name" || break; sleep 0.25; done
        if pid_alive "$pidfile" "$name"; then
            log "$name ($pid) ignored SIGTERM; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
    fi
    rm -f "$pidfile"
}

# Guests outlive their libvirtd; SIGTERM the ones whose pid files live under
# DIR (the daemon's /run/libvirt): qemu processes under qemu/, the libvirt_lxc
# controllers of containers (which take their container with them) under lxc/.
# Persistent guests show up as "shut off" on the next start.
stop_guests_under() {
    local dir=$1 f pid
    for f in "$dir"/qemu/*.pid "$dir"/lxc/*.pid; do
        [[ -s $f ]] || continue
        pid=$(<"$f")
        if [[ $pid =~ ^[0-9]+$ ]] && { live_proc "$pid" qemu-system-x86 ||
                                       live_proc "$pid" libvirt_lxc; }; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
}

cmd_stop_second() {
    mkdir -p "$RUN_DIR"
    stop_pid "$SECOND_PIDFILE" libvirtd
    stop_guests_under "$SECOND_DIR/run"
    echo "stopped"
}

cmd_stop() {
    mkdir -p "$RUN_DIR"
    stop_pid "$SECOND_PIDFILE" libvirtd
    stop_guests_under "$SECOND_DIR/run"
    if pid_alive "$LIBVIRTD_PIDFILE" libvirtd; then
        stop_pid "$LIBVIRTD_PIDFILE" libvirtd
        stop_guests_under /run/libvirt          # only the guests of our daemon
    fi
    rm -f "$LIBVIRTD_PIDFILE"
    stop_pid "$VIRTLOGD_PIDFILE" virtlogd
    restore_qemu_conf
    echo "stopped"
}

cmd_status() {
    local s
    if pid_alive "$VIRTLOGD_PIDFILE" virtlogd; then s="running (pid $(<"$VIRTLOGD_PIDFILE"))"
    elif any_live virtlogd; then s="running (not started by this script)"
    else s="stopped"; fi
    echo "virtlogd:          $s"
    if pid_alive "$LIBVIRTD_PIDFILE" libvirtd; then s="running (pid $(<"$LIBVIRTD_PIDFILE"))"
    elif pid_alive /run/libvirtd.pid libvirtd; then s="running (pid $(</run/libvirtd.pid), not started by this script)"
    else s="stopped"; fi
    answers "$PRIMARY_URI" && s="$s, $PRIMARY_URI answers"
    answers "$LXC_URI" && s="$s, $LXC_URI answers"
    echo "libvirtd:          $s"
    if pid_alive "$SECOND_PIDFILE" libvirtd; then s="running (pid $(<"$SECOND_PIDFILE"))"
    else s="stopped"; fi
    answers "$SECOND_URI" && s="$s, $SECOND_URI answers"
    echo "libvirtd (second): $s"
    local n pid
    n=0
    for pid in $(pgrep -x qemu-system-x86); do live_proc "$pid" qemu-system-x86 && n=$((n + 1)); done
    echo "qemu processes:    $n"
}

case "${1:-}" in
    install)      mkdir -p "$RUN_DIR"; cmd_install; echo "installed" ;;
    start)        cmd_start ;;
    start-second) cmd_start_second ;;
    stop)         cmd_stop ;;
    stop-second)  cmd_stop_second ;;
    status)       cmd_status ;;
    changes)      cmd_changes ;;
    *)            die "usage: $0 install|start|start-second|stop-second|stop|status|changes" ;;
esac
