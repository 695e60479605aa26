#!/usr/bin/env python3
"""Build the hostile qcow2 cases of issue 20 (docs/image-readers.md, "Hostile images").

Usage: scripts/make-hostile-images.py OUTDIR [CASE...]

Writes one image per case into OUTDIR (CASE.qcow2), made with qemu-img/qemu-io and then edited
in place from the qcow2 specification (docs/interop/qcow2.txt): header fields, snapshot table
entries, L2 entries. The cases follow the error paths that qemu-iotests 080 and 261 exercise
(and the two issue-20 snapshot-table measurements); the bytes are our own. `--list` prints the
case names, one a line, with a one-line description.

Each case that has a snapshot has it as "s1" over 1 MiB of 0xab data at offset 0.
"""
import os
import struct
import subprocess
import sys

MIB = 1 << 20


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, stdout=subprocess.DEVNULL)


def qemu_io(img, cmd):
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, img], check=True,
                   stdout=subprocess.DEVNULL)


def poke(img, off, data):
    with open(img, "r+b") as f:
        f.seek(off)
        f.write(data)


def peek(img, off, n):
    with open(img, "rb") as f:
        f.seek(off)
        return f.read(n)


def be64(img, off):
    return struct.unpack(">Q", peek(img, off, 8))[0]


def be32(img, off):
    return struct.unpack(">I", peek(img, off, 4))[0]


def fresh(img, size="64M", opts=None):
    if os.path.exists(img):
        os.remove(img)
    args = ["create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", opts]
    qemu_img(*args, img, size)


def with_snapshot(img, opts=None):
    """A 64 MiB image: 1 MiB of 0xab at 0, snapshot s1, then 64 KiB of 0xee at 0."""
    fresh(img, opts=opts)
    qemu_io(img, "write -P 0xab 0 1M")
    qemu_img("snapshot", "-c", "s1", img)
    qemu_io(img, "write -P 0xee 0 64k")


def first_snapshot_entry(img):
    return be64(img, 64)


def snapshot_table(img, fill):
    """qemu-iotests 261 "Snapshot table too big": entries of 40 + 1 KiB extra data + a 65535-byte
    id + a 65535-byte name (+2 padding) from 1 MiB until the table passes 64 MiB (508
    entries, 67,125,088 bytes); ids and names filled with `fill`."""
    fresh(img)
    poke(img, 64, struct.pack(">Q", MIB))
    sn_size = 40 + 1024 + 65535 + 65535 + 2
    fixed = bytearray(40)
    fixed[12:14] = b"\xff\xff"
    fixed[14:16] = b"\xff\xff"
    fixed[36:40] = struct.pack(">I", 1024)
    entry = bytes(fixed) + bytes(1024) + bytes([fill]) * (65535 * 2) + bytes(2)
    assert len(entry) == sn_size
    count = 0
    written = 0
    with open(img, "r+b") as f:
        f.seek(MIB)
        while written <= 64 * MIB:
            f.write(entry)
            written += sn_size
            count += 1
    poke(img, 60, struct.pack(">I", count))


def case_snaptable_ff(img):
    snapshot_table(img, 0xFF)


def case_snaptable_zero(img):
    snapshot_table(img, 0x00)


# --- header (080 "Huge header size", "Huge unknown header extension") ---

def case_ext_huge_backing_offset(img):
    with_snapshot(img)
    poke(img, 8, b"\xff" * 8)
    hl = be32(img, 100)
    poke(img, hl, b"\x12\x34\x56\x78\x7f\xff\xff\xff")


def case_ext_huge(img):
    with_snapshot(img)
    hl = be32(img, 100)
    poke(img, hl, b"\x12\x34\x56\x78\x7f\xff\xff\xff")


def case_ext_backing_format_long(img):
    """A backing-format extension of 16 bytes or more (QEMU keeps it in a 16-byte buffer)."""
    with_snapshot(img)
    hl = be32(img, 100)
    poke(img, hl, struct.pack(">II", 0xE2792ACA, 32) + b"q" * 32 + bytes(8))


def case_backing_name_past_cluster(img):
    """A 100-byte backing name that starts 50 bytes before the end of the header cluster."""
    with_snapshot(img)
    cs = 1 << be32(img, 20)
    poke(img, 8, struct.pack(">Q", cs - 50))
    poke(img, 16, struct.pack(">I", 100))


# --- refcount table (080 "Huge refcount table size", "Misaligned", "Huge offset") ---

# --- snapshot table (080 "Invalid snapshot table", 261) ---

def case_snapshots_zero_garbage_offset(img):
    """nb_snapshots = 0 with an unaligned snapshot table offset."""
    fresh(img)
    qemu_io(img, "write -P 0xab 0 1M")
    poke(img, 64, bytes.fromhex("1234567890abcdef"))
    poke(img, 60, bytes(4))


def case_snapshot_extra_huge(img):
    """261 "Reject too much unknown extra data": 64 KiB of extra data in entry 0."""
    with_snapshot(img)
    poke(img, first_snapshot_entry(img) + 36, struct.pack(">I", 65536))


def case_snapshot_l1_offset_unaligned(img):
    """080 "Invalid snapshot L1 table offset": 0x400200."""
    with_snapshot(img)
    poke(img, first_snapshot_entry(img), struct.pack(">Q", 0x400200))


def case_snapshot_l1_size_huge(img):
    """080 "Invalid snapshot L1 table size": 0x10000000 entries."""
    with_snapshot(img)
    poke(img, first_snapshot_entry(img) + 8, struct.pack(">I", 0x10000000))


def case_snapshots_max(img):
    """65536 snapshots (QEMU's limit, so QEMU opens it) with distinct 16-byte names, a v2 image:
    the biggest listing an image can ask for."""
    fresh(img, opts="compat=0.10")
    qemu_io(img, "write -P 0xab 0 1M")
    qemu_img("snapshot", "-c", "s1", img)
    first = first_snapshot_entry(img)
    l1_off, l1_size = be64(img, first), be32(img, first + 8)
    table = 2 * MIB
    out = bytearray()
    for i in range(65536):
        name = b"s1" if i == 0 else b"snap-%011d" % i
        ident = b"%d" % (i + 1)
        e = struct.pack(">QIHHIIQII", l1_off, l1_size, len(ident), len(name), 0, 0, 0, 0, 0)
        e += ident + name
        e += bytes(-len(e) % 8)
        out += e
    poke(img, table, bytes(out))
    poke(img, 60, struct.pack(">I", 65536))
    poke(img, 64, struct.pack(">Q", table))


# --- active L1 table (080 "Invalid L1 table") ---

# Cases that are an image with snapshot s1 (`with_snapshot`) whose header fields are then
# overwritten: name -> (description, [(offset, bytes)]). Header offsets: 8 backing_file_offset,
# 16 backing_file_size, 36 l1_size, 40 l1_table_offset, 48 refcount_table_offset,
# 56 refcount_table_clusters, 60 nb_snapshots, 64 snapshots_offset, 100 header_length.
HEADER_POKES = {
    "header-length-huge": ('', [(100, b"\xff\xff\xff\xff")]),
    "header-length-short": ('', [(100, struct.pack(">I", 96))]),
    "backing-name-long": ('080 "Invalid backing file size": name length 0xffffffff at 0x1000.', [(8, struct.pack(">Q", 0x1000)), (16, b"\xff\xff\xff\xff")]),
    "refcount-clusters-huge": ('', [(56, b"\xff\xff\xff\xff")]),
    "refcount-clusters-large": ('', [(56, b"\x00\x02\x00\x01")]),
    "refcount-offset-unaligned": ('', [(48, bytes.fromhex("1234567890abcdef"))]),
    "refcount-offset-huge": ('', [(48, b"\xff\xff\xff\xff\xff\xff\x00\x00"), (56, b"\x00\x00\x00\x7f")]),
    "refcount-none": ('refcount_table_clusters = 0: "Image does not contain a reference count table".', [(56, bytes(4))]),
    "snapshots-too-many": ('', [(60, b"\xff\xff\xff\xff")]),
    "snapshots-offset-huge": ('', [(64, b"\xff\xff\xff\xff\xff\xff\x00\x00"), (60, b"\x00\x00\xff\xff")]),
    "l1-size-huge": ('', [(36, b"\xff\xff\xff\xff")]),
    "l1-size-large": ('', [(36, b"\x7f\xff\xff\xff")]),
    "l1-offset-huge": ('', [(40, b"\x7f\xff\xff\xff\xff\xff\x00\x00"), (36, b"\x00\x00\xff\xff")]),
    "l1-offset-unaligned": ('', [(40, bytes.fromhex("1234567890abcdef")), (36, b"\x00\x00\x00\x01")]),
    "l1-too-small": ('080 "Invalid L1 table (with internal snapshot in the image)": l1_size 0.', [(36, bytes(4))]),
}


# --- data clusters where QEMU reads zeros ---

def l2_entry_of_cluster0(img):
    l1 = be64(img, 40)
    l2 = be64(img, l1) & 0x00FFFFFFFFFFFE00
    return l2


def case_l2_reserved_past_eof(img):
    """The active L2 entry of cluster 0 with reserved bits 1-8 set and a host offset past EOF."""
    fresh(img)
    qemu_io(img, "write -P 0xab 0 64k")
    qemu_img("snapshot", "-c", "s1", img)
    # The snapshot and the active L1 share this L2 table.
    l2 = l2_entry_of_cluster0(img)
    poke(img, l2, struct.pack(">Q", (0x40 << 30) | 0x1FE))


def case_data_at_32pib(img):
    """512-byte clusters; guest cluster 0 mapped to host offset 32 PiB."""
    fresh(img, opts="cluster_size=512")
    qemu_io(img, "write -P 0xab 0 512")
    qemu_img("snapshot", "-c", "s1", img)
    l2 = l2_entry_of_cluster0(img)
    poke(img, l2, struct.pack(">Q", 1 << 55))


def header_case(doc, pokes):
    def make(img):
        with_snapshot(img)
        for off, data in pokes:
            poke(img, off, data)
    make.__doc__ = doc
    return make


CASES = {name[len("case_"):].replace("_", "-"): fn
         for name, fn in globals().items() if name.startswith("case_")}
CASES.update({name: header_case(doc, pokes) for name, (doc, pokes) in HEADER_POKES.items()})
CASES = dict(sorted(CASES.items()))


def main():
    args = sys.argv[1:]
    if args == ["--list"]:
        for name, fn in CASES.items():
            doc = (fn.__doc__ or "").strip().split("\n")[0]
            print(f"{name}\t{doc}")
        return
    if not args or args[0] in ("-h", "--help"):
        sys.stderr.write(__doc__)
        sys.exit(2)
    out = args[0]
    os.makedirs(out, exist_ok=True)
    wanted = args[1:] or list(CASES)
    for name in wanted:
        if name not in CASES:
            sys.exit(f"make-hostile-images: no case {name} (see --list)")
        CASES[name](os.path.join(out, name + ".qcow2"))


if __name__ == "__main__":
    main()
