import subprocess, time, os
from blockmig import lab
from blockmig.array import lio
from blockmig.host import iscsi, multipath, udev
def sh(c):
    r = subprocess.run(c, shell=True, capture_output=True, text=True); print("$", c, "->", (r.stdout+r.stderr).strip()[:600])
def st(tag):
    print(f"[{tag}] suspended={multipath.is_suspended('mpatha')}", end=" "); sh("dmsetup info -c --noheadings -o name,attr mpatha; multipathd show paths raw format '%d %m %t %o %T'")
lab.lab_up(16<<20, "/tmp/labdata")
init = iscsi.read_initiator_name()
src = lio.find_volume("lab-source")
dst = lio.create_volume(lab.DESTINATION_IQN, "dst", 16<<20, "/tmp/labdata/dst.img", serial=lab.SOURCE_SERIAL)
lio.export_volume(dst, init, write_protect=True)
lio.set_mapping_write_protect(src, init, True)
st("before")
# Experiment A: add a path to a suspended map
multipath.suspend_map("mpatha"); st("suspended")
t=time.time(); s = iscsi.login(lab.DESTINATION_IQN, "127.0.0.2", 3260); d = iscsi.wait_for_session_disk(s, 0); print("dest disk", d, time.time()-t)
for i in range(30):
    if d in [p.dev for p in multipath.paths_of_map("mpatha")]: break
    time.sleep(0.2)
st("after login dest while suspended"); sh("multipath -ll mpatha")
if multipath.is_suspended("mpatha"): multipath.resume_map("mpatha")
st("resumed")
# Experiment B: suspend, del path source
multipath.suspend_map("mpatha"); st("suspended2")
multipath.del_path("sda"); st("after del path sda")
time.sleep(1); st("1s later")
# Experiment C: WP off on dest + rescan -> map rw?
lio.set_mapping_write_protect(dst, init, False)
sh(f"cat /sys/block/{d}/ro; echo 1 > /sys/block/{d}/device/rescan; sleep 0.5; cat /sys/block/{d}/ro")
time.sleep(3); st("after wp off + rescan"); sh("multipath -ll mpatha")
sh("multipathd reload map mpatha"); sh("multipath -ll mpatha"); st("after reload")
sh("dmsetup resume mpatha"); sh("multipath -ll mpatha"); sh("dd if=/dev/zero of=/dev/mapper/mpatha bs=4k count=1 oflag=direct")
