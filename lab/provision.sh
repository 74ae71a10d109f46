#!/bin/sh
# Configure a Debian 12 system as a blockmig lab host: LIO targets, open-iscsi, dm-multipath.
#
#   provision.sh                  inside the lab image chroot at build time (scripts/labvm build);
#                                 the packages are already there and nothing runs as a service
#   provision.sh --vagrant PKG... on a Vagrant box: install PKG... (lab/guest-packages.txt),
#                                 configure, then enable and start iscsid and multipathd
#
# One source of truth: what CI tests in the lab VM is what a user's Vagrant lab host gets.
set -eu

vagrant=false
if [ "${1:-}" = "--vagrant" ]; then
    vagrant=true
    shift
fi

if [ "$#" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "$@"
fi

# A fixed initiator name, so tests and ACLs can name the host.
mkdir -p /etc/iscsi
echo "InitiatorName=iqn.2026-11.lab.blockmig:host" >/etc/iscsi/initiatorname.iscsi

# Sessions only when asked for; notice a lost path in seconds, not the default two minutes.
conf=/etc/iscsi/iscsid.conf
set_iscsid() {  # set_iscsid KEY VALUE: drop the key's lines (commented or not), append the setting
    key=$(printf '%s' "$1" | sed -e 's/\./\\./g' -e 's/\[/\\[/g' -e 's/\]/\\]/g')
    sed -i -E "/^#? *$key *=/d" "$conf"
    echo "$1 = $2" >>"$conf"
}
set_iscsid node.startup manual
set_iscsid node.session.timeo.replacement_timeout 5
set_iscsid "node.conn[0].timeo.noop_out_interval" 2
set_iscsid "node.conn[0].timeo.noop_out_timeout" 2
if ! $vagrant; then
    # No systemd in the lab guest: iscsiadm may start iscsid itself if it is not running.
    set_iscsid iscsid.startup /usr/sbin/iscsid
fi

# Every LIO LUN is a multipath map, also with a single path; nothing else is.
cat >/etc/multipath.conf <<'EOF'
# blockmig lab host (lab/provision.sh)
defaults {
    find_multipaths no
    user_friendly_names yes
    polling_interval 2
}
blacklist {
    devnode "^(loop|dm-|vd|ubd|ram|sr|fd|nbd)[0-9]*"
    device {
        vendor ".*"
        product ".*"
    }
}
blacklist_exceptions {
    device {
        vendor "LIO-ORG"
        product ".*"
    }
}
EOF

# LVM sees the multipath maps only: never a path disk (the migrator's destination disk and, in a
# pass-through, the array's own disk of the source carry the source's PV label).
# No autoactivation on udev events: no pvscan activates a VG on a disk blockmig is working on.
cat >/etc/lvm/lvmlocal.conf <<'EOF'
# blockmig lab host (lab/provision.sh)
devices {
    global_filter = [ "a|^/dev/mapper/mpath[a-z]+$|", "r|.*|" ]
    use_devicesfile = 0
    multipath_component_detection = 1
}
global {
    event_activation = 0
}
local {
}
EOF

# rtslib-fb keeps its saved configuration here.
mkdir -p /etc/target

# D-Bus (targetcli) needs a machine id.
if [ ! -s /etc/machine-id ]; then
    dbus-uuidgen >/etc/machine-id
fi

# Modules of the lab stack; the guest's /init loads this same list.
mkdir -p /etc/modules-load.d
cat >/etc/modules-load.d/blockmig-lab.conf <<'EOF'
configfs
loop
sd_mod
sg
dm_mod
dm_multipath
dm_round_robin
dm_service_time
scsi_dh_alua
target_core_mod
target_core_file
target_core_iblock
iscsi_target_mod
scsi_transport_iscsi
libiscsi
libiscsi_tcp
iscsi_tcp
ext4
xfs
EOF

if $vagrant; then
    # Lab tests ask where they run (the lab VM sets uml or qemu); sudo reads this via pam_env.
    sed -i '/^BLOCKMIG_LAB_RUNNER=/d' /etc/environment
    echo BLOCKMIG_LAB_RUNNER=vagrant >>/etc/environment
    systemctl restart systemd-modules-load.service
    systemctl enable --now iscsid.socket iscsid.service multipathd.socket multipathd.service
    systemctl restart iscsid.service multipathd.service
else
    echo blockmig-lab >/etc/hostname
    : >/etc/fstab
    # The image lives in RAM: drop what nobody reads there. Debian's python3-fonttools (a dependency of
    # python3-matplotlib) drags in scipy, sympy and pythran, and with them a C/C++ toolchain and Boost's
    # headers: 550 MiB that nothing in the lab imports or runs (matplotlib draws without them).
    unused="python3-scipy python3-sympy python3-mpmath python3-pythran python3-beniget python3-gast
        g++ g++-12 gcc gcc-12 cpp cpp-12 libboost1.74-dev libboost-dev libopenblas-dev libopenblas-pthread-dev
        libpython3.11-dev libpython3-dev python3-dev python3.11-dev python3-all-dev libpython3-all-dev
        libstdc++-12-dev libgcc-12-dev binutils binutils-x86-64-linux-gnu binutils-common libbinutils
        libgprofng0 libctf0 libctf-nobfd0 libasan8 libtsan2 liblsan0 libubsan1 libhwasan0 libitm1 libcc1-0
        libisl23 libmpc3 libc6-dev linux-libc-dev libcrypt-dev libnsl-dev libtirpc-dev rpcsvc-proto
        libexpat1-dev zlib1g-dev unicode-data python3-ufolib2 python3-fs python3-lxml libjs-jquery-ui"
    # shellcheck disable=SC2086
    installed=$(dpkg-query -W -f='${Package}\n' $unused 2>/dev/null || true)
    [ -z "$installed" ] || dpkg --purge --force-depends $installed >/dev/null 2>&1 || {
        echo "provision.sh: could not remove the unused packages" >&2; exit 1; }
    python3 -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot"  # still draws
    rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/* \
        /var/cache/apt/archives/*.deb /var/lib/apt/lists/*
fi
