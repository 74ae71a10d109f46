"""blockmig's own LIO backstore: a TCMU handler in Python that serves one volume.

Split as tcmu-runner is: `ring` speaks the kernel's mailbox and command ring
(linux/target_core_user.h), `scsi` answers the CDBs a Linux host sends from a
volume's identity and geometry, `storage` is the backing file or device,
`guard` is the claim's array-side write guard (journaled), `service` is the
process that ties them to rtslib-fb storage objects and a control socket, and
`client` is the small API the rest of blockmig calls (possibly from another
machine's point of view: a socket and a state file are the whole interface).
"""
