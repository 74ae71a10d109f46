set -x
export BLOCKMIG_STATE_DIR=/tmp/state
python3 -m blockmig lab up --size 16M --backing-dir /tmp/labdata
multipath -ll
python3 -m blockmig migrate /dev/mapper/mpatha --to-target iqn.2026-11.lab.blockmig:destination --to-portal 127.0.0.2:3260 --backing-dir /tmp/labdata --chunk-size 1M --id x1
echo rc=$?
python3 -m blockmig status
multipath -ll
python3 -m blockmig lab status
cmp /tmp/labdata/lab-source.img /tmp/labdata/blockmig-x1.img && echo SAME
