"""The backstore's SCSI emulation fed CDBs without a kernel (the lab compares it with LIO's own answers)."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockmig.array.lio import wwid_for_serial
from blockmig.array.tcmu import scsi
from blockmig.array.tcmu.guard import ArrayGuard, load_state

SERIAL = "b10c0123456789abcdef0123456789ab"
PORT = scsi.PortIdentity(target_wwn="iqn.2026-12.lab:t", tpgt=1, rtpi=3, tg_pt_gp_id=7, lu_gp_id=0)


def emulation(size=16 << 20, port=PORT, **identity):
    return scsi.Emulation(scsi.Identity(size=size, serial=SERIAL, **identity), port_lookup=lambda: port)


def reply(emu, cdb, data_length=4096):
    decoded = emu.decode(bytes(cdb), data_length)
    assert decoded.reply is not None, decoded
    return decoded.reply


def sense_of(answer):
    assert answer.status == scsi.CHECK_CONDITION
    return answer.sense[2] & 0xF, (answer.sense[12], answer.sense[13])


def test_unknown_opcode_is_refused_with_invalid_command_operation_code():
    assert sense_of(reply(emulation(), [0xC1] + [0] * 9)) == (scsi.ILLEGAL_REQUEST, (0x20, 0x00))


def test_standard_inquiry_carries_the_identity_and_alua_support():
    data = reply(emulation(vendor="ACME", product="BIGDISK", revision="9.9"), [0x12, 0, 0, 0, 96, 0]).data
    assert (data[2], data[3], data[4] + 5) == (6, 2, 96)
    assert data[5] & 0x30 == 0x30  # TPGS: implicit and explicit, as LIO's default_tg_pt_gp
    assert data[8:16] == b"ACME    " and data[16:32] == b"BIGDISK".ljust(16) and data[32:36] == b"9.9 "


def test_inquiry_without_a_target_port_group_says_no_tpgs():
    data = reply(emulation(port=None), [0x12, 0, 0, 0, 96, 0]).data
    assert data[5] & 0x30 == 0


def test_vpd_83_naa_is_lio_s_from_the_serial():
    data = reply(emulation(), [0x12, 1, 0x83, 0, 255, 0]).data
    assert data[1] == 0x83 and struct.unpack_from(">H", data, 2)[0] == len(data) - 4
    assert data[4:8] == bytes([0x01, 0x03, 0x00, 0x10])
    assert "3" + data[8:24].hex() == wwid_for_serial(SERIAL)
    body = data[4:]
    assert bytes([0x51, 0x94, 0, 4, 0, 0, 0, 3]) in body  # relative target port 3
    assert bytes([0x51, 0x95, 0, 4, 0, 0, 0, 7]) in body  # target port group 7
    assert b"iqn.2026-12.lab:t,t,0x0001\0" in body


@given(st.text(alphabet="0123456789abcdef", min_size=25, max_size=40))
def test_naa_takes_the_first_25_hex_digits_after_lio_s_oui(serial):
    assert scsi.naa_6_designator(serial, 0x001405).hex() == "6001405" + serial[:25]


def test_vpd_80_is_the_serial():
    data = reply(emulation(), [0x12, 1, 0x80, 0, 255, 0]).data
    assert data[4:] == SERIAL.encode() + b"\0"


def test_vpd_00_lists_lio_s_pages():
    data = reply(emulation(), [0x12, 1, 0, 0, 255, 0]).data
    assert list(data[4:]) == [0x00, 0x80, 0x83, 0x86, 0xB0, 0xB1, 0xB2, 0xB3]


def test_unknown_vpd_page_is_invalid_field():
    assert sense_of(reply(emulation(), [0x12, 1, 0x99, 0, 255, 0])) == (scsi.ILLEGAL_REQUEST, (0x24, 0x00))


def test_block_limits_short_without_thin_provisioning_long_with():
    short = reply(emulation(max_transfer_blocks=2048), [0x12, 1, 0xB0, 0, 255, 0]).data
    assert len(short) == 4 + 0x10 and struct.unpack_from(">I", short, 8)[0] == 2048
    thin = emulation(emulate_tpu=True, max_unmap_lba_count=8192, max_unmap_block_desc_count=1)
    long = reply(thin, [0x12, 1, 0xB0, 0, 255, 0]).data
    assert len(long) == 4 + 0x3C and struct.unpack_from(">II", long, 20) == (8192, 1)
    lbp = reply(thin, [0x12, 1, 0xB2, 0, 255, 0]).data
    assert lbp[5] & 0x80


@pytest.mark.parametrize("block_size,size", [(512, 16 << 20), (4096, 16 << 20), (512, (16 << 20) + 7 * 512)])
def test_read_capacity_10_and_16(block_size, size):
    emu = emulation(size=size, block_size=block_size)
    assert struct.unpack(">II", reply(emu, [0x25] + [0] * 9).data) == (size // block_size - 1, block_size)
    data = reply(emu, [0x9E, 0x10] + [0] * 8 + [0, 0, 0, 32, 0, 0]).data
    assert struct.unpack_from(">QI", data) == (size // block_size - 1, block_size) and len(data) == 32


def test_reads_and_writes_become_transfers_inside_the_volume():
    emu = emulation()
    decoded = emu.decode(bytes([0x28, 0, 0, 0, 0, 8, 0, 0, 16, 0]), 16 * 512)
    assert (decoded.transfer.offset, decoded.transfer.length) == (8 * 512, 16 * 512)
    decoded = emu.decode(bytes([0x8A, 0x08]) + struct.pack(">QI", 100, 1) + bytes(2), 512)
    assert (decoded.transfer.opcode, decoded.transfer.offset, decoded.transfer.fua) == (0x8A, 51200, True)
    last = emu.identity.blocks
    beyond = emu.decode(bytes([0x88, 0]) + struct.pack(">QI", last - 1, 2) + bytes(2), 1024).reply
    assert sense_of(beyond) == (scsi.ILLEGAL_REQUEST, (0x21, 0x00))


def test_read_6_length_zero_means_256_blocks():
    decoded = emulation().decode(bytes([0x08, 0, 0, 0, 0, 0]), 256 * 512)
    assert decoded.transfer.length == 256 * 512


def test_mode_sense_caching_page_shows_the_write_cache():
    for cache, wce in ((True, 0x04), (False, 0x00)):
        data = reply(emulation(write_cache=cache), [0x1A, 0x08, 0x08, 0, 255, 0]).data
        assert data[0] == len(data) - 1 and data[3] == 0  # no block descriptor with DBD
        assert data[4:6] == bytes([0x08, 0x12]) and data[6] == wce


def test_mode_sense_all_pages_10_with_block_descriptor():
    data = reply(emulation(), [0x5A, 0, 0x3F, 0, 0, 0, 0, 0x10, 0, 0]).data
    assert struct.unpack_from(">H", data, 0)[0] == len(data) - 2 and struct.unpack_from(">H", data, 6)[0] == 8
    assert struct.unpack_from(">II", data, 8) == ((16 << 20) // 512, 512)
    pages = data[16:]
    assert [pages[0], pages[12], pages[32], pages[44]] == [0x01, 0x08, 0x0A, 0x1C]


def test_mode_select_of_the_current_caching_page_is_accepted_a_change_refused():
    emu = emulation()
    page = emu._mode_page(0x08, False)
    params = bytes(4) + page
    assert emu.mode_select(bytes([0x15, 0x10, 0, 0, len(params), 0]), params).status == scsi.GOOD
    changed = bytes(4) + page[:2] + bytes([0x04]) + page[3:]
    refused = emu.mode_select(bytes([0x15, 0x10, 0, 0, len(changed), 0]), changed)
    assert sense_of(refused)[0] == scsi.ILLEGAL_REQUEST


def test_report_supported_operation_codes_lists_what_is_executed():
    emu = emulation(emulate_tpu=True)
    data = reply(emu, [0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]).data
    listed = {(data[i], struct.unpack_from(">H", data, i + 2)[0]) for i in range(4, len(data), 8)}
    assert {(0x88, 0), (0x8A, 0), (0x42, 0), (0x9E, 0x10)} <= listed
    one = reply(emu, [0xA3, 0x0C, 1, 0x2A, 0, 0, 0, 0, 0, 64, 0, 0]).data
    assert one[1] & 0x07 == 3 and struct.unpack_from(">H", one, 2)[0] == 10
    absent = reply(emu, [0xA3, 0x0C, 1, 0xC1, 0, 0, 0, 0, 0, 64, 0, 0]).data
    assert absent[1] & 0x07 == 1


def test_unmap_and_write_same_only_where_the_geometry_says_so():
    plain = emulation()
    assert sense_of(reply(plain, [0x42] + [0] * 9)) == (scsi.ILLEGAL_REQUEST, (0x20, 0x00))
    assert sense_of(reply(plain, [0x41, 0, 0, 0, 0, 0, 0, 0, 1, 0])) == (scsi.ILLEGAL_REQUEST, (0x20, 0x00))
    thin = emulation(emulate_tpu=True, max_unmap_lba_count=100, max_unmap_block_desc_count=2)
    params = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 8, 4)
    assert thin.decode_unmap(params) == [(8 * 512, 4 * 512)]
    too_long = struct.pack(">HH4x", 22, 16) + struct.pack(">QI4x", 0, 101)
    assert sense_of(thin.decode_unmap(too_long)) == (scsi.ILLEGAL_REQUEST, (0x26, 0x00))


def test_request_sense_and_test_unit_ready():
    emu = emulation()
    assert reply(emu, [0] * 6).status == scsi.GOOD
    assert reply(emu, [0x03, 0, 0, 0, 18, 0]).data[:3] == bytes([0x70, 0, 0])


# --- the guard's rule and journal ------------------------------------------------------------------


def test_sequential_guard_admits_only_the_reserved_address_and_journals_it(tmp_path):
    path = str(tmp_path / "v.json")
    guard = ArrayGuard(path, "v")
    guard.arm_sequential(0)
    assert guard.admits(0, 4096) and not guard.admits(4096, 4096)
    guard.executed(0, 4096)
    assert not guard.admits(8192, 4096) and guard.admits(4096, 4096)
    assert guard.admits(0, 4096)  # the replay of the last executed write (its completion may be lost)
    assert load_state(path).reserved == 4096
    again = ArrayGuard(path, "v")  # a restarted handler
    assert again.admits(4096, 4096) and not again.admits(0, 8192)


def test_delta_guard_takes_the_next_chunk_whole_in_order(tmp_path):
    guard = ArrayGuard(str(tmp_path / "v.json"), "v")
    guard.arm_delta([(1 << 20, 2 << 20), (8 << 20, 1 << 20)])
    assert not guard.admits(8 << 20, 1 << 20)
    assert guard.admits(1 << 20, 1 << 20)
    guard.executed(1 << 20, 1 << 20)
    assert not guard.admits(8 << 20, 1 << 20) and not guard.admits(2 << 20, 2 << 20)
    guard.executed(2 << 20, 1 << 20)
    assert guard.admits(8 << 20, 1 << 20)
    guard.executed(8 << 20, 1 << 20)
    assert guard.state.reserved_address() is None and not guard.admits(9 << 20, 4096)


def test_delta_chunks_must_ascend(tmp_path):
    from blockmig.errors import ArrayError

    guard = ArrayGuard(str(tmp_path / "v.json"), "v")
    with pytest.raises(ArrayError):
        guard.arm_delta([(8 << 20, 4096), (0, 4096)])


def test_state_file_of_another_volume_is_refused(tmp_path):
    from blockmig.errors import ArrayError

    ArrayGuard(str(tmp_path / "v.json"), "v").arm_sequential(0)
    with pytest.raises(ArrayError):
        ArrayGuard(str(tmp_path / "v.json"), "w")
