"""SCSI command emulation of a direct-access LU, answered exactly as LIO's own backstores answer.

Layouts follow the kernel's target_core_spc.c / target_core_sbc.c (so that a
host, multipathd and udev see the same identity whether a volume is served by
fileio, iblock or this handler) and tcmu-runner's tcmur_cmd_handler.c for what
reaches a TCMU handler: the kernel answers REPORT LUNS, persistent reservations
and ALUA's REPORT/SET TARGET PORT GROUPS itself (alua_support/pgr_support 1).
Anything else unknown gets CHECK CONDITION, ILLEGAL REQUEST, INVALID COMMAND
OPERATION CODE: a command never hangs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

GOOD, CHECK_CONDITION = 0x00, 0x02
NO_SENSE, MEDIUM_ERROR, ILLEGAL_REQUEST, DATA_PROTECT, MISCOMPARE = 0x0, 0x3, 0x5, 0x7, 0xE
INVALID_OPCODE = (0x20, 0x00)
INVALID_FIELD_IN_CDB = (0x24, 0x00)
LBA_OUT_OF_RANGE = (0x21, 0x00)
PARAMETER_LIST_LENGTH_ERROR = (0x1A, 0x00)
INVALID_FIELD_IN_PARAMETER_LIST = (0x26, 0x00)
SAVING_PARAMETERS_NOT_SUPPORTED = (0x39, 0x00)
WRITE_ERROR = (0x0C, 0x00)
UNRECOVERED_READ_ERROR = (0x11, 0x00)
MISCOMPARE_DURING_VERIFY = (0x1D, 0x00)
# The array's guard: the address is not the reserved write address (or the view is not
# the migrator's). DATA PROTECT makes the Linux host fail the IO at once (EIO, no retry).
WRITE_PROTECTED = (0x27, 0x00)
SOFTWARE_WRITE_PROTECTED = (0x27, 0x02)

INQUIRY, TEST_UNIT_READY, REQUEST_SENSE = 0x12, 0x00, 0x03
READ_6, READ_10, READ_12, READ_16 = 0x08, 0x28, 0xA8, 0x88
WRITE_6, WRITE_10, WRITE_12, WRITE_16 = 0x0A, 0x2A, 0xAA, 0x8A
READ_CAPACITY_10, SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16 = 0x25, 0x9E, 0x10
MODE_SENSE_6, MODE_SENSE_10, MODE_SELECT_6, MODE_SELECT_10 = 0x1A, 0x5A, 0x15, 0x55
SYNCHRONIZE_CACHE_10, SYNCHRONIZE_CACHE_16 = 0x35, 0x91
WRITE_SAME_10, WRITE_SAME_16, UNMAP = 0x41, 0x93, 0x42
VERIFY_10, VERIFY_16, START_STOP_UNIT = 0x2F, 0x8F, 0x1B
COMPARE_AND_WRITE = 0x89
MAINTENANCE_IN, MI_REPORT_SUPPORTED_OPCODES = 0xA3, 0x0C
READS = frozenset({READ_6, READ_10, READ_12, READ_16})
WRITES = frozenset({WRITE_6, WRITE_10, WRITE_12, WRITE_16})
MODIFYING = WRITES | {WRITE_SAME_10, WRITE_SAME_16, UNMAP, COMPARE_AND_WRITE}
VPD_PAGES = (0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2, 0xB3)  # LIO's list, in its order
PROTOCOL_ISCSI = 0x5


def fixed_sense(key: int, asc_ascq: tuple[int, int], information: int | None = None) -> bytes:
    """Fixed-format sense data (SPC-4 4.5.3), as LIO sends unless D_SENSE is set."""
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = key
    sense[7] = 10
    sense[12], sense[13] = asc_ascq
    if information is not None:
        sense[0] |= 0x80
        struct.pack_into(">I", sense, 3, information & 0xFFFFFFFF)
    return bytes(sense)


@dataclass(frozen=True)
class Reply:
    """What the handler answers: SCSI status, sense when CHECK CONDITION, data-in when any."""

    status: int = GOOD
    sense: bytes = b""
    data: bytes | None = None

    @classmethod
    def check(cls, key: int, asc_ascq: tuple[int, int], information: int | None = None) -> "Reply":
        return cls(CHECK_CONDITION, fixed_sense(key, asc_ascq, information))


@dataclass(frozen=True)
class Identity:
    """Identity and geometry the LU presents: the storage object's configfs values (`lio.volume_geometry`)."""

    size: int
    serial: str
    block_size: int = 512
    vendor: str = "LIO-ORG"
    product: str = "TCMU device"
    revision: str = "0002"
    company_id: int = 0x001405
    max_transfer_blocks: int = 2048
    optimal_sectors: int = 2048
    write_cache: bool = False
    fua_write: bool = True
    is_nonrot: bool = False
    emulate_tpu: bool = False
    emulate_tpws: bool = False
    unmap_zeroes_data: bool = False
    max_unmap_lba_count: int = 0
    max_unmap_block_desc_count: int = 0
    unmap_granularity: int = 0
    unmap_granularity_alignment: int = 0
    max_write_same_len: int = 0
    emulate_caw: bool = False
    emulate_3pc: bool = False
    emulate_tas: bool = True
    emulate_rest_reord: bool = False
    ua_intlck_ctrl: int = 0

    @property
    def blocks(self) -> int:
        return self.size // self.block_size

    @property
    def thin(self) -> bool:
        return self.emulate_tpu or self.emulate_tpws

    @classmethod
    def from_geometry(cls, size: int, serial: str, geometry: dict) -> "Identity":
        """From configfs strings (attrib/ and wwn/ of the storage object)."""

        def number(name, default):
            value = geometry.get(name)
            return default if value in (None, "") else int(str(value), 0)

        block_size = number("block_size", 512)
        return cls(
            size=size,
            serial=serial,
            block_size=block_size,
            vendor=geometry.get("vendor_id", cls.vendor),
            product=geometry.get("product_id", cls.product),
            revision=geometry.get("revision", cls.revision),
            company_id=number("company_id", 0x001405),
            # LIO 6.1 reports hw_max_sectors as the Block Limits' MAXIMUM TRANSFER LENGTH unscaled
            # (measured: fileio with 4096-byte blocks says 2048 blocks, as its hw_max_sectors).
            max_transfer_blocks=number("hw_max_sectors", 2048),
            optimal_sectors=number("optimal_sectors", 2048),
            write_cache=bool(number("emulate_write_cache", 0)),
            fua_write=bool(number("emulate_fua_write", 1)),
            is_nonrot=bool(number("is_nonrot", 0)),
            emulate_tpu=bool(number("emulate_tpu", 0)),
            emulate_tpws=bool(number("emulate_tpws", 0)),
            unmap_zeroes_data=bool(number("unmap_zeroes_data", 0)),
            max_unmap_lba_count=number("max_unmap_lba_count", 0),
            max_unmap_block_desc_count=number("max_unmap_block_desc_count", 0),
            unmap_granularity=number("unmap_granularity", 0),
            unmap_granularity_alignment=number("unmap_granularity_alignment", 0),
            max_write_same_len=number("max_write_same_len", 0),
            emulate_caw=bool(number("emulate_caw", 0)),
            emulate_3pc=bool(number("emulate_3pc", 0)),
            emulate_tas=bool(number("emulate_tas", 1)),
            emulate_rest_reord=bool(number("emulate_rest_reord", 0)),
            ua_intlck_ctrl=number("emulate_ua_intlck_ctrl", 0),
        )


@dataclass(frozen=True)
class PortIdentity:
    """The target port a LUN of this LU is exported through (VPD 0x83 and INQUIRY's TPGS)."""

    target_wwn: str
    tpgt: int
    rtpi: int
    tg_pt_gp_id: int | None = 0
    alua_access_type: int = 0x30  # implicit and explicit, LIO's default_tg_pt_gp
    lu_gp_id: int | None = 0


@dataclass
class Transfer:
    """A read or write the emulation decided on: `offset` and `length` in bytes."""

    opcode: int
    offset: int
    length: int
    fua: bool = False


@dataclass
class Decoded:
    """Either a reply now, or a transfer for the storage to execute."""

    reply: Reply | None = None
    transfer: Transfer | None = None
    extra: dict = field(default_factory=dict)


def _pad(text: str, width: int) -> bytes:
    return text.encode("ascii", "replace")[:width].ljust(width, b" ")


def naa_6_designator(serial: str, company_id: int) -> bytes:
    """LIO's NAA IEEE Registered Extended designator: 6 + OUI + the serial's first hex digits (25 nibbles)."""
    buf = bytearray(16)
    buf[0] = 0x60 | ((company_id >> 20) & 0xF)
    buf[1] = (company_id >> 12) & 0xFF
    buf[2] = (company_id >> 4) & 0xFF
    buf[3] = (company_id & 0xF) << 4
    off, high_nibble_next = 3, False
    for ch in serial:
        if off >= 16:
            break
        if ch.lower() not in "0123456789abcdef":
            continue
        value = int(ch, 16)
        if not high_nibble_next:
            buf[off] |= value
            off += 1
            high_nibble_next = True
        else:
            buf[off] = value << 4
            high_nibble_next = False
    return bytes(buf)


def _scsi_name(text: str, assoc: int) -> bytes:
    """A SCSI name string designator, NUL-terminated and padded to 4 bytes (at most 256)."""
    name = text.encode() + b"\0"
    name = name.ljust(min((len(name) + 3) // 4 * 4, 256), b"\0")[:256]
    return bytes([(PROTOCOL_ISCSI << 4) | 0x3, 0x80 | assoc | 0x8, 0, len(name)]) + name


class Emulation:
    """Decodes CDBs of one LU: answers the non-data commands, turns reads/writes into Transfers."""

    def __init__(self, identity: Identity, port_lookup=lambda: None):
        self.identity = identity
        self.port_lookup = port_lookup  # () -> PortIdentity | None; read per INQUIRY: the LUN comes later

    # --- dispatch -------------------------------------------------------------------------------
    def decode(self, cdb: bytes, data_length: int) -> Decoded:
        op = cdb[0]
        try:
            if op in READS or op in WRITES:
                return self._read_write(cdb, data_length)
            handler = self._HANDLERS.get(op)
            if handler is None:
                return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_OPCODE))
            return handler(self, cdb, data_length)
        except (IndexError, struct.error):
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))

    # --- reads and writes ----------------------------------------------------------------------
    def lba_range(self, lba: int, blocks: int) -> Reply | None:
        if lba + blocks > self.identity.blocks:
            return Reply.check(ILLEGAL_REQUEST, LBA_OUT_OF_RANGE)
        return None

    def _read_write(self, cdb: bytes, data_length: int) -> Decoded:
        op = cdb[0]
        if op in (READ_6, WRITE_6):
            lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
            blocks = cdb[4] or 256
            fua = False
        elif op in (READ_10, WRITE_10):
            lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
            fua = bool(cdb[1] & 0x08)
        elif op in (READ_12, WRITE_12):
            lba, blocks = struct.unpack_from(">II", cdb, 2)
            fua = bool(cdb[1] & 0x08)
        else:
            lba, blocks = struct.unpack_from(">QI", cdb, 2)
            fua = bool(cdb[1] & 0x08)
        refused = self.lba_range(lba, blocks)
        if refused:
            return Decoded(refused)
        if blocks > self.identity.max_transfer_blocks:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        length = blocks * self.identity.block_size
        if data_length < length:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        if blocks == 0:
            return Decoded(Reply())
        return Decoded(transfer=Transfer(op, lba * self.identity.block_size, length, fua))

    def _write_same(self, cdb: bytes, data_length: int) -> Decoded:
        ident = self.identity
        if cdb[0] == WRITE_SAME_10:
            lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        else:
            lba, blocks = struct.unpack_from(">QI", cdb, 2)
        unmap = bool(cdb[1] & 0x08)
        if ident.max_write_same_len == 0 and not (unmap and ident.emulate_tpws):
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_OPCODE))
        if blocks == 0 or cdb[1] & 0x06 or (unmap and not ident.emulate_tpws):
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        if ident.max_write_same_len and blocks > ident.max_write_same_len and not unmap:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        refused = self.lba_range(lba, blocks)
        if refused:
            return Decoded(refused)
        if data_length < ident.block_size:
            return Decoded(Reply.check(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR))
        return Decoded(
            transfer=Transfer(cdb[0], lba * ident.block_size, blocks * ident.block_size),
            extra={"unmap": unmap},
        )

    def decode_unmap(self, parameters: bytes) -> list[tuple[int, int]] | Reply:
        """UNMAP's block descriptors as (offset, length) byte ranges, or the refusal."""
        ident = self.identity
        if len(parameters) < 8:
            return Reply() if not parameters else Reply.check(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        descriptors_length = struct.unpack_from(">H", parameters, 2)[0]
        count = min(descriptors_length, len(parameters) - 8) // 16
        if count > ident.max_unmap_block_desc_count:
            return Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST)
        ranges = []
        for i in range(count):
            lba, blocks = struct.unpack_from(">QI", parameters, 8 + 16 * i)
            if blocks > ident.max_unmap_lba_count:
                return Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST)
            refused = self.lba_range(lba, blocks)
            if refused:
                return refused
            if blocks:
                ranges.append((lba * ident.block_size, blocks * ident.block_size))
        return ranges

    def _unmap(self, cdb: bytes, data_length: int) -> Decoded:
        if not self.identity.emulate_tpu:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_OPCODE))
        if cdb[1] & 0x01:  # ANCHOR
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        return Decoded(transfer=Transfer(UNMAP, 0, 0))

    def _compare_and_write(self, cdb: bytes, data_length: int) -> Decoded:
        if not self.identity.emulate_caw:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_OPCODE))
        lba, blocks = struct.unpack_from(">Q", cdb, 2)[0], cdb[13]
        refused = self.lba_range(lba, blocks)
        if refused:
            return Decoded(refused)
        if blocks == 0:
            return Decoded(Reply())
        length = blocks * self.identity.block_size
        if data_length < 2 * length:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        return Decoded(transfer=Transfer(COMPARE_AND_WRITE, lba * self.identity.block_size, length))

    def _verify(self, cdb: bytes, data_length: int) -> Decoded:
        if cdb[1] & 0x06:  # BYTCHK: we would have to compare; LIO refuses it too
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        if cdb[0] == VERIFY_10:
            lba, blocks = struct.unpack_from(">I", cdb, 2)[0], struct.unpack_from(">H", cdb, 7)[0]
        else:
            lba, blocks = struct.unpack_from(">QI", cdb, 2)
        return Decoded(self.lba_range(lba, blocks) or Reply())

    def _synchronize_cache(self, cdb: bytes, data_length: int) -> Decoded:
        return Decoded(transfer=Transfer(cdb[0], 0, 0))

    # --- non-data commands ----------------------------------------------------------------------
    def _test_unit_ready(self, cdb: bytes, data_length: int) -> Decoded:
        return Decoded(Reply())

    def _start_stop(self, cdb: bytes, data_length: int) -> Decoded:
        return Decoded(Reply())

    def _request_sense(self, cdb: bytes, data_length: int) -> Decoded:
        if cdb[1] & 0x01:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        return Decoded(Reply(data=fixed_sense(NO_SENSE, (0, 0))))

    def _read_capacity_10(self, cdb: bytes, data_length: int) -> Decoded:
        last = min(self.identity.blocks - 1, 0xFFFFFFFF)
        return Decoded(Reply(data=struct.pack(">II", last, self.identity.block_size)))

    def _service_action_in(self, cdb: bytes, data_length: int) -> Decoded:
        if cdb[1] & 0x1F != SAI_READ_CAPACITY_16:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        ident = self.identity
        buf = bytearray(32)
        struct.pack_into(">QI", buf, 0, ident.blocks - 1, ident.block_size)
        if ident.thin:
            buf[14] = 0x80 | (0x40 if ident.unmap_zeroes_data else 0)  # LBPME, LBPRZ
        return Decoded(Reply(data=bytes(buf)))

    def _inquiry(self, cdb: bytes, data_length: int) -> Decoded:
        if not cdb[1] & 0x01:
            if cdb[2]:
                return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
            return Decoded(Reply(data=self.standard_inquiry()))
        page = self._VPD.get(cdb[2])
        if page is None:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        body = page(self)
        return Decoded(Reply(data=bytes([0, cdb[2]]) + struct.pack(">H", len(body)) + body))

    def standard_inquiry(self) -> bytes:
        ident, port = self.identity, self.port_lookup()
        buf = bytearray(96)
        buf[2], buf[3], buf[4] = 0x06, 0x02, 91  # SPC-4, response format 2
        buf[5] = 0x80 | (port.alua_access_type if port and port.tg_pt_gp_id is not None else 0)
        if ident.emulate_3pc:
            buf[5] |= 0x08
        buf[7] = 0x02  # CMDQUE
        buf[8:16] = _pad(ident.vendor, 8)
        buf[16:32] = _pad(ident.product, 16)
        buf[32:36] = _pad(ident.revision, 4)
        struct.pack_into(">HHHH", buf, 58, 0x00A0, 0x0960, 0x0460, 0x04C0)  # SAM-5, iSCSI, SPC-4, SBC-3
        return bytes(buf)

    def vpd_supported_pages(self) -> bytes:
        return bytes(VPD_PAGES)

    def vpd_unit_serial(self) -> bytes:
        return self.identity.serial.encode() + b"\0"

    def vpd_device_identification(self) -> bytes:
        ident = self.identity
        out = bytearray(bytes([0x01, 0x03, 0x00, 0x10]) + naa_6_designator(ident.serial, ident.company_id))
        t10 = _pad(ident.vendor, 8) + f"{ident.product}:{ident.serial}".encode() + b"\0"
        out += bytes([0x02, 0x01, 0x00, len(t10)]) + t10
        port = self.port_lookup()
        if port is not None:
            piv_port = 0x80 | 0x10
            out += bytes([(PROTOCOL_ISCSI << 4) | 0x1, piv_port | 0x4, 0, 4])
            out += struct.pack(">HH", 0, port.rtpi)
            if port.tg_pt_gp_id is not None:
                out += bytes([(PROTOCOL_ISCSI << 4) | 0x1, piv_port | 0x5, 0, 4])
                out += struct.pack(">HH", 0, port.tg_pt_gp_id)
            if port.lu_gp_id is not None:
                out += bytes([0x01, 0x06, 0, 4]) + struct.pack(">HH", 0, port.lu_gp_id)
            out += _scsi_name(f"{port.target_wwn},t,0x{port.tpgt:04x}", 0x10)
            out += _scsi_name(port.target_wwn, 0x20)
        return bytes(out)

    def vpd_extended_inquiry(self) -> bytes:
        body = bytearray(0x3C)
        body[1] = 0x07  # HEADSUP, ORDSUP, SIMPSUP
        body[2] = 0x01 if self.identity.write_cache else 0x00  # V_SUP
        return bytes(body)

    def vpd_block_limits(self) -> bytes:
        ident = self.identity
        body = bytearray(0x3C if ident.thin else 0x10)
        body[0] = 0x01  # WSNZ
        body[1] = 0x01 if ident.emulate_caw else 0x00
        struct.pack_into(">HII", body, 2, 1, ident.max_transfer_blocks, ident.optimal_sectors)
        if ident.thin:
            struct.pack_into(
                ">IIII", body, 16, ident.max_unmap_lba_count, ident.max_unmap_block_desc_count,
                ident.unmap_granularity, ident.unmap_granularity_alignment,
            )
            if ident.unmap_granularity_alignment:
                body[28] |= 0x80  # UGAVALID
            struct.pack_into(">Q", body, 32, ident.max_write_same_len)
        return bytes(body)

    def vpd_block_characteristics(self) -> bytes:
        body = bytearray(0x3C)
        body[1] = 0x01 if self.identity.is_nonrot else 0x00
        return bytes(body)

    def vpd_logical_block_provisioning(self) -> bytes:
        ident = self.identity
        body = bytearray(4)
        if ident.emulate_tpu:
            body[1] |= 0x80
        if ident.emulate_tpws:
            body[1] |= 0x60
        if ident.thin and ident.unmap_zeroes_data:
            body[1] |= 0x04
        return bytes(body)

    def vpd_referrals(self) -> bytes:
        return bytes(0x0C)

    _VPD = {
        0x00: vpd_supported_pages,
        0x80: vpd_unit_serial,
        0x83: vpd_device_identification,
        0x86: vpd_extended_inquiry,
        0xB0: vpd_block_limits,
        0xB1: vpd_block_characteristics,
        0xB2: vpd_logical_block_provisioning,
        0xB3: vpd_referrals,
    }

    # --- mode pages -----------------------------------------------------------------------------
    def _mode_page(self, page: int, changeable: bool) -> bytes | None:
        ident = self.identity
        if page == 0x01:
            return bytes([0x01, 0x0A]) + bytes(10)
        if page == 0x08:
            body = bytearray(20)
            body[0], body[1] = 0x08, 0x12
            if not changeable:
                body[2] = 0x04 if ident.write_cache else 0x00
                body[12] = 0x20
            return bytes(body)
        if page == 0x0A:
            body = bytearray(12)
            body[0], body[1] = 0x0A, 0x0A
            if not changeable:
                body[2] = 0x02
                body[3] = 0x00 if ident.emulate_rest_reord else 0x10
                body[4] = {2: 0x30, 1: 0x20}.get(ident.ua_intlck_ctrl, 0x00)
                body[5] = 0x40 if ident.emulate_tas else 0x00
                body[8], body[9], body[11] = 0xFF, 0xFF, 30
            return bytes(body)
        if page == 0x1C:
            return bytes([0x1C, 0x0A]) + bytes(10)
        return None

    def _mode_sense(self, cdb: bytes, data_length: int) -> Decoded:
        ident = self.identity
        ten = cdb[0] == MODE_SENSE_10
        dbd, llba = bool(cdb[1] & 0x08), ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        if pc == 3:
            return Decoded(Reply.check(ILLEGAL_REQUEST, SAVING_PARAMETERS_NOT_SUPPORTED))
        header = bytearray(8 if ten else 4)
        if ident.fua_write and ident.write_cache:
            header[3 if ten else 2] |= 0x10  # DPOFUA
        blocks = ident.blocks
        descriptor = b""
        if not dbd:
            if llba and blocks > 0xFFFFFFFF:
                header[4] = 0x01
                descriptor = struct.pack(">QII", blocks, 0, ident.block_size)
            else:
                descriptor = struct.pack(">II", min(blocks, 0xFFFFFFFF), ident.block_size)
        if ten:
            struct.pack_into(">H", header, 6, len(descriptor))
        else:
            header[3] = len(descriptor)
        if page == 0x3F:
            if subpage not in (0x00, 0xFF):
                return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
            pages = b"".join(self._mode_page(p, pc == 1) for p in (0x01, 0x08, 0x0A, 0x1C))
        else:
            found = self._mode_page(page, pc == 1) if subpage == 0 else None
            if found is None:
                return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
            pages = found
        data = bytearray(header + descriptor + pages)
        if ten:
            struct.pack_into(">H", data, 0, len(data) - 2)
        else:
            data = data[:255]
            data[0] = len(data) - 1
        return Decoded(Reply(data=bytes(data)))

    def _mode_select(self, cdb: bytes, data_length: int) -> Decoded:
        return Decoded(transfer=Transfer(cdb[0], 0, data_length))

    def mode_select(self, cdb: bytes, parameters: bytes) -> Reply:
        """Accept a MODE SELECT that changes nothing (as LIO does): compare with the current page."""
        ten = cdb[0] == MODE_SELECT_10
        off = 8 if ten else 4
        if not parameters:
            return Reply()
        if len(parameters) < off + 2:
            return Reply.check(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        if not cdb[1] & 0x10:
            return Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB)
        off += struct.unpack_from(">H", parameters, 6)[0] if ten else parameters[3]
        if len(parameters) < off + 2 or parameters[off] & 0x40:
            return Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST)
        current = self._mode_page(parameters[off] & 0x3F, False)
        if current is None:
            return Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST)
        if len(parameters) < off + len(current):
            return Reply.check(ILLEGAL_REQUEST, PARAMETER_LIST_LENGTH_ERROR)
        wanted = bytes([parameters[off] & 0x3F]) + parameters[off + 1:off + len(current)]
        if wanted != current:
            return Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_PARAMETER_LIST)
        return Reply()

    # --- REPORT SUPPORTED OPERATION CODES -------------------------------------------------------
    def supported_operations(self) -> list[tuple[int, int | None, int]]:
        """(opcode, service action or None, CDB length) of every command this LU executes."""
        ident = self.identity
        ops = [
            (TEST_UNIT_READY, None, 6), (REQUEST_SENSE, None, 6), (READ_6, None, 6), (WRITE_6, None, 6),
            (INQUIRY, None, 6), (MODE_SELECT_6, None, 6), (MODE_SENSE_6, None, 6), (START_STOP_UNIT, None, 6),
            (READ_CAPACITY_10, None, 10), (READ_10, None, 10), (WRITE_10, None, 10), (VERIFY_10, None, 10),
            (SYNCHRONIZE_CACHE_10, None, 10), (MODE_SELECT_10, None, 10), (MODE_SENSE_10, None, 10),
            (READ_16, None, 16), (WRITE_16, None, 16), (VERIFY_16, None, 16),
            (SYNCHRONIZE_CACHE_16, None, 16), (SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 16),
            (MAINTENANCE_IN, MI_REPORT_SUPPORTED_OPCODES, 12),
            (READ_12, None, 12), (WRITE_12, None, 12),
        ]
        if ident.max_write_same_len or ident.emulate_tpws:
            ops += [(WRITE_SAME_10, None, 10), (WRITE_SAME_16, None, 16)]
        if ident.emulate_tpu:
            ops.append((UNMAP, None, 10))
        if ident.emulate_caw:
            ops.append((COMPARE_AND_WRITE, None, 16))
        return sorted(ops, key=lambda o: (o[0], o[1] or 0))

    def _maintenance_in(self, cdb: bytes, data_length: int) -> Decoded:
        if cdb[1] & 0x1F != MI_REPORT_SUPPORTED_OPCODES:
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        options, opcode, action = cdb[2] & 0x07, cdb[3], struct.unpack_from(">H", cdb, 4)[0]
        ops = self.supported_operations()
        if options == 0:
            body = b"".join(
                struct.pack(">BBHBBH", op, 0, sa or 0, 0, 0x01 if sa is not None else 0, length)
                for op, sa, length in ops
            )
            return Decoded(Reply(data=struct.pack(">I", len(body)) + body))
        if options not in (1, 2):
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        matches = [o for o in ops if o[0] == opcode]
        if options == 1 and any(sa is not None for _, sa, _ in matches):
            return Decoded(Reply.check(ILLEGAL_REQUEST, INVALID_FIELD_IN_CDB))
        found = [o for o in matches if options == 1 or o[1] == action]
        if not found:
            return Decoded(Reply(data=bytes([0, 0x01, 0, 0])))  # not supported
        length = found[0][2]
        usage = bytearray([opcode] + [0xFF] * (length - 2) + [0x07])
        if found[0][1] is not None:
            usage[1] = action
        return Decoded(Reply(data=bytes([0, 0x03]) + struct.pack(">H", length) + bytes(usage)))

    _HANDLERS = {
        TEST_UNIT_READY: _test_unit_ready,
        REQUEST_SENSE: _request_sense,
        INQUIRY: _inquiry,
        READ_CAPACITY_10: _read_capacity_10,
        SERVICE_ACTION_IN_16: _service_action_in,
        MODE_SENSE_6: _mode_sense,
        MODE_SENSE_10: _mode_sense,
        MODE_SELECT_6: _mode_select,
        MODE_SELECT_10: _mode_select,
        SYNCHRONIZE_CACHE_10: _synchronize_cache,
        SYNCHRONIZE_CACHE_16: _synchronize_cache,
        WRITE_SAME_10: _write_same,
        WRITE_SAME_16: _write_same,
        UNMAP: _unmap,
        COMPARE_AND_WRITE: _compare_and_write,
        VERIFY_10: _verify,
        VERIFY_16: _verify,
        START_STOP_UNIT: _start_stop,
        MAINTENANCE_IN: _maintenance_in,
    }
