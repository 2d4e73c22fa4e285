"""eBPF opcode fields as enums: the only place that spells the instruction bit layout.

An instruction is 8 bytes, little-endian (a 64-bit immediate load takes two)::

    byte   0        1                2..3          4..7
         +--------+--------+--------+-------------+----------------+
         | opcode | src:4  | dst:4  | offset s16  | immediate s32  |
         +--------+--------+--------+-------------+----------------+
                   (high)   (low nibble of byte 1)

The opcode byte is read one of two ways depending on its class (low three bits)::

    ALU, ALU64, JMP, JMP32:         LD, LDX, ST, STX:
      7  6  5  4 | 3   | 2  1  0      7  6  5 | 4  3 | 2  1  0
      operation  | src | class        mode    | size | class

``src`` is K (use the immediate) or X (use the source register). For ALU END it selects the
byte order (TO_LE / TO_BE) instead.
"""

from __future__ import annotations

import enum

INSN_SIZE = 8  # bytes per instruction slot

CLASS_MASK = 0x07
SIZE_MASK = 0x18
MODE_MASK = 0xE0
SRC_MASK = 0x08
OP_MASK = 0xF0


class Class(enum.IntEnum):
    """Bits 0-2: the instruction class."""

    LD = 0x00  # legacy packet loads and 64-bit immediates
    LDX = 0x01  # load from memory into a register
    ST = 0x02  # store an immediate
    STX = 0x03  # store a register, atomics
    ALU = 0x04  # 32-bit arithmetic (results zero-extended)
    JMP = 0x05  # 64-bit compares, call, exit
    JMP32 = 0x06  # 32-bit compares, gotol
    ALU64 = 0x07  # 64-bit arithmetic


class Size(enum.IntEnum):
    """Bits 3-4 of a load/store: the access width."""

    W = 0x00  # 4 bytes
    H = 0x08  # 2 bytes
    B = 0x10  # 1 byte
    DW = 0x18  # 8 bytes

    @property
    def nbytes(self) -> int:
        return _SIZE_BYTES[self]

    @classmethod
    def of_bytes(cls, nbytes: int) -> Size:
        """The Size for an access of 1, 2, 4 or 8 bytes."""
        for size, n in _SIZE_BYTES.items():
            if n == nbytes:
                return size
        raise ValueError(f"no load/store size of {nbytes} bytes")


_SIZE_BYTES = {Size.W: 4, Size.H: 2, Size.B: 1, Size.DW: 8}


class Mode(enum.IntEnum):
    """Bits 5-7 of a load/store: the addressing mode."""

    IMM = 0x00  # with LD | DW: 64-bit immediate over two slots
    ABS = 0x20  # legacy skb load at a constant offset
    IND = 0x40  # legacy skb load at src + constant
    MEM = 0x60  # regular memory access
    MEMSX = 0x80  # sign-extending load (LDX only)
    ATOMIC = 0xC0  # atomic read-modify-write (STX only); imm holds the AtomicOp


class Source(enum.IntEnum):
    """Bit 3 of ALU/JMP: operand source; for ALU END, the byte order."""

    K = 0x00  # 32-bit immediate
    X = 0x08  # source register
    TO_LE = 0x00
    TO_BE = 0x08


class AluOp(enum.IntEnum):
    """Bits 4-7 of ALU/ALU64. SDIV/SMOD are DIV/MOD with off=1; MOVSX is MOV|X with off=8/16/32."""

    ADD = 0x00
    SUB = 0x10
    MUL = 0x20
    DIV = 0x30
    OR = 0x40
    AND = 0x50
    LSH = 0x60
    RSH = 0x70
    NEG = 0x80
    MOD = 0x90
    XOR = 0xA0
    MOV = 0xB0
    ARSH = 0xC0
    END = 0xD0  # byte swap: ALU = to_le/to_be, ALU64|K = unconditional bswap; imm = 16/32/64


class JmpOp(enum.IntEnum):
    """Bits 4-7 of JMP/JMP32."""

    JA = 0x00  # JMP: off is the target; JMP32 (gotol): imm is the target
    JEQ = 0x10
    JGT = 0x20
    JGE = 0x30
    JSET = 0x40
    JNE = 0x50
    JSGT = 0x60
    JSGE = 0x70
    CALL = 0x80
    EXIT = 0x90
    JLT = 0xA0
    JLE = 0xB0
    JSLT = 0xC0
    JSLE = 0xD0
    JCOND = 0xE0  # may_goto (src = MAY_GOTO)


class AtomicOp(enum.IntEnum):
    """The immediate of a STX | ATOMIC instruction."""

    ADD = 0x00
    OR = 0x40
    AND = 0x50
    XOR = 0xA0
    FETCH_ADD = 0x01
    FETCH_OR = 0x41
    FETCH_AND = 0x51
    FETCH_XOR = 0xA1
    XCHG = 0xE1  # always fetches
    CMPXCHG = 0xF1  # compares with r0, old value into r0
    LOAD_ACQ = 0x11  # BPF_ATOMIC_LOAD | BPF_ACQUIRE: dst = load_acquire(src + off)
    STORE_REL = 0x22  # BPF_ATOMIC_STORE | BPF_RELEASE: store_release(dst + off, src)


FETCH = 0x01  # AtomicOp flag: return the old value in src


class PseudoSrc(enum.IntEnum):
    """src_reg values of a LD | IMM | DW instruction, telling the verifier what imm means."""

    NONE = 0  # plain 64-bit constant
    MAP_FD = 1  # imm = map fd
    MAP_VALUE = 2  # imm = map fd, second imm = offset into value 0
    BTF_ID = 3  # imm = BTF id of a kernel variable
    FUNC = 4  # imm = relative instruction offset of a subprogram (callbacks)
    MAP_IDX = 5  # imm = index into fd_array
    MAP_IDX_VALUE = 6  # imm = index into fd_array, second imm = value offset


class PseudoCall(enum.IntEnum):
    """src_reg values of a JMP | CALL instruction."""

    HELPER = 0  # imm = helper id (BpfFunc)
    CALL = 1  # imm = relative instruction offset of a BPF subprogram
    KFUNC_CALL = 2  # imm = BTF id of the kernel function, off = BTF fd index (0: vmlinux)


MAY_GOTO = 0  # src_reg of JMP | JCOND


def opcode(*fields: int) -> int:
    """Compose an opcode byte from its fields (class | size | mode or class | op | src)."""
    code = 0
    for f in fields:
        code |= f
    return code
