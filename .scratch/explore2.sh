export BLOCKMIG_STATE_DIR=/tmp/state
python3 -m blockmig lab up --size 16M --backing-dir /tmp/labdata >/dev/null 2>&1
for sw in multipath relogin; do
python3 -m blockmig migrate /dev/mapper/mpatha --to-target iqn.2026-11.lab.blockmig:destination --to-portal 127.0.0.2:3260 --backing-dir /tmp/labdata --chunk-size 1M --id x-$sw --switch $sw --json | grep -E "switch_phase|io_resumed"
python3 -m blockmig lab down --backing-dir /tmp/labdata >/dev/null 2>&1
python3 -m blockmig lab up --size 16M --backing-dir /tmp/labdata >/dev/null 2>&1
done
