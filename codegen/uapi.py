"""Kernel ABI numbers from linux/bpf.h and linux/netfilter.h, defined once for the whole project.

Names follow the kernel's spelling without the common prefix (``BPF_MAP_TYPE_HASH`` is
``MapType.HASH``). Pure data: the code generator and the system layer both import it.
"""

from __future__ import annotations

import enum


class Cmd(enum.IntEnum):
    """enum bpf_cmd."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    RAW_TRACEPOINT_OPEN = 17
    BTF_LOAD = 18
    BTF_GET_FD_BY_ID = 19
    TASK_FD_QUERY = 20
    MAP_LOOKUP_AND_DELETE_ELEM = 21
    MAP_FREEZE = 22
    BTF_GET_NEXT_ID = 23
    MAP_LOOKUP_BATCH = 24
    MAP_LOOKUP_AND_DELETE_BATCH = 25
    MAP_UPDATE_BATCH = 26
    MAP_DELETE_BATCH = 27
    LINK_CREATE = 28
    LINK_UPDATE = 29
    LINK_GET_FD_BY_ID = 30
    LINK_GET_NEXT_ID = 31
    ENABLE_STATS = 32
    ITER_CREATE = 33
    LINK_DETACH = 34
    PROG_BIND_MAP = 35


class MapType(enum.IntEnum):
    """enum bpf_map_type."""

    UNSPEC = 0
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    STACK_TRACE = 7
    CGROUP_ARRAY = 8
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    CGROUP_STORAGE = 19
    REUSEPORT_SOCKARRAY = 20
    PERCPU_CGROUP_STORAGE = 21
    QUEUE = 22
    STACK = 23
    SK_STORAGE = 24
    DEVMAP_HASH = 25
    STRUCT_OPS = 26
    RINGBUF = 27
    INODE_STORAGE = 28
    TASK_STORAGE = 29
    BLOOM_FILTER = 30
    USER_RINGBUF = 31
    CGRP_STORAGE = 32
    ARENA = 33


class ProgType(enum.IntEnum):
    """enum bpf_prog_type."""

    UNSPEC = 0
    SOCKET_FILTER = 1
    KPROBE = 2
    SCHED_CLS = 3
    SCHED_ACT = 4
    TRACEPOINT = 5
    XDP = 6
    PERF_EVENT = 7
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    LWT_IN = 10
    LWT_OUT = 11
    LWT_XMIT = 12
    SOCK_OPS = 13
    SK_SKB = 14
    CGROUP_DEVICE = 15
    SK_MSG = 16
    RAW_TRACEPOINT = 17
    CGROUP_SOCK_ADDR = 18
    LWT_SEG6LOCAL = 19
    LIRC_MODE2 = 20
    SK_REUSEPORT = 21
    FLOW_DISSECTOR = 22
    CGROUP_SYSCTL = 23
    RAW_TRACEPOINT_WRITABLE = 24
    CGROUP_SOCKOPT = 25
    TRACING = 26
    STRUCT_OPS = 27
    EXT = 28
    LSM = 29
    SK_LOOKUP = 30
    SYSCALL = 31
    NETFILTER = 32


class AttachType(enum.IntEnum):
    """enum bpf_attach_type."""

    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_SOCK_OPS = 3
    SK_SKB_STREAM_PARSER = 4
    SK_SKB_STREAM_VERDICT = 5
    CGROUP_DEVICE = 6
    SK_MSG_VERDICT = 7
    CGROUP_INET4_BIND = 8
    CGROUP_INET6_BIND = 9
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_INET4_POST_BIND = 12
    CGROUP_INET6_POST_BIND = 13
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    LIRC_MODE2 = 16
    FLOW_DISSECTOR = 17
    CGROUP_SYSCTL = 18
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_GETSOCKOPT = 21
    CGROUP_SETSOCKOPT = 22
    TRACE_RAW_TP = 23
    TRACE_FENTRY = 24
    TRACE_FEXIT = 25
    MODIFY_RETURN = 26
    LSM_MAC = 27
    TRACE_ITER = 28
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    CGROUP_INET4_GETSOCKNAME = 31
    CGROUP_INET6_GETSOCKNAME = 32
    XDP_DEVMAP = 33
    CGROUP_INET_SOCK_RELEASE = 34
    XDP_CPUMAP = 35
    SK_LOOKUP = 36
    XDP = 37
    SK_SKB_VERDICT = 38
    SK_REUSEPORT_SELECT = 39
    SK_REUSEPORT_SELECT_OR_MIGRATE = 40
    PERF_EVENT = 41
    TRACE_KPROBE_MULTI = 42
    LSM_CGROUP = 43
    STRUCT_OPS = 44
    NETFILTER = 45
    TCX_INGRESS = 46
    TCX_EGRESS = 47


class LinkType(enum.IntEnum):
    """enum bpf_link_type."""

    UNSPEC = 0
    RAW_TRACEPOINT = 1
    TRACING = 2
    CGROUP = 3
    ITER = 4
    NETNS = 5
    XDP = 6
    PERF_EVENT = 7
    KPROBE_MULTI = 8
    STRUCT_OPS = 9
    NETFILTER = 10
    TCX = 11
    UPROBE_MULTI = 12
    NETKIT = 13


class MapFlag(enum.IntFlag):
    """map_flags for BPF_MAP_CREATE."""

    NO_PREALLOC = 1 << 0
    NO_COMMON_LRU = 1 << 1
    NUMA_NODE = 1 << 2
    RDONLY = 1 << 3
    WRONLY = 1 << 4
    STACK_BUILD_ID = 1 << 5
    ZERO_SEED = 1 << 6
    RDONLY_PROG = 1 << 7
    WRONLY_PROG = 1 << 8
    CLONE = 1 << 9
    MMAPABLE = 1 << 10
    PRESERVE_ELEMS = 1 << 11
    INNER_MAP = 1 << 12


class UpdateFlag(enum.IntEnum):
    """flags for BPF_MAP_UPDATE_ELEM."""

    ANY = 0
    NOEXIST = 1
    EXIST = 2
    LOCK = 4


class ProgFlag(enum.IntFlag):
    """prog_flags for BPF_PROG_LOAD."""

    STRICT_ALIGNMENT = 1 << 0
    ANY_ALIGNMENT = 1 << 1
    TEST_RND_HI32 = 1 << 2
    TEST_STATE_FREQ = 1 << 3
    SLEEPABLE = 1 << 4
    XDP_HAS_FRAGS = 1 << 5


class XdpFlag(enum.IntFlag):
    """XDP_FLAGS_* for XDP attachment (netlink and BPF links)."""

    UPDATE_IF_NOEXIST = 1 << 0
    SKB_MODE = 1 << 1
    DRV_MODE = 1 << 2
    HW_MODE = 1 << 3
    REPLACE = 1 << 4


class XdpAction(enum.IntEnum):
    """enum xdp_action: an XDP program's return value."""

    ABORTED = 0
    DROP = 1
    PASS = 2
    TX = 3
    REDIRECT = 4


class TcAction(enum.IntEnum):
    """TC_ACT_* / TCX_*: a TC (sched_cls, direct-action) program's return value."""

    NEXT = -1  # TC_ACT_UNSPEC / TCX_NEXT: continue with the next program
    OK = 0  # TC_ACT_OK / TCX_PASS
    RECLASSIFY = 1
    SHOT = 2  # TC_ACT_SHOT / TCX_DROP
    PIPE = 3
    STOLEN = 4
    QUEUED = 5
    REPEAT = 6
    REDIRECT = 7


class NfVerdict(enum.IntEnum):
    """A netfilter BPF program's return value; the verifier allows only these two."""

    DROP = 0
    ACCEPT = 1


class NfProto(enum.IntEnum):
    """NFPROTO_* protocol families."""

    UNSPEC = 0
    INET = 1
    IPV4 = 2
    ARP = 3
    NETDEV = 5
    BRIDGE = 7
    IPV6 = 10


class NfHook(enum.IntEnum):
    """enum nf_inet_hooks."""

    PRE_ROUTING = 0
    LOCAL_IN = 1
    FORWARD = 2
    LOCAL_OUT = 3
    POST_ROUTING = 4


class NfPriority(enum.IntEnum):
    """enum nf_ip_hook_priorities (the same values for IPv6)."""

    FIRST = -(2**31)
    RAW_BEFORE_DEFRAG = -450
    CONNTRACK_DEFRAG = -400
    RAW = -300
    SELINUX_FIRST = -225
    CONNTRACK = -200
    MANGLE = -150
    NAT_DST = -100
    FILTER = 0
    SECURITY = 50
    NAT_SRC = 100
    SELINUX_LAST = 225
    CONNTRACK_HELPER = 300
    LAST = 2**31 - 1


NETFILTER_IP_DEFRAG = 1  # BPF_F_NETFILTER_IP_DEFRAG: link flag asking for defragmented packets

BPF_OBJ_NAME_LEN = 16  # prog_name / map_name include the terminating NUL
MAX_USED_MAPS = 64  # include/linux/bpf_verifier.h: distinct maps one program may reference


class AttachFlag(enum.IntFlag):
    """BPF_F_* flags of BPF_PROG_ATTACH, BPF_LINK_CREATE (tcx ordering) and BPF_LINK_UPDATE."""

    ALLOW_OVERRIDE = 1 << 0
    ALLOW_MULTI = 1 << 1
    REPLACE = 1 << 2
    BEFORE = 1 << 3
    AFTER = 1 << 4
    ID = 1 << 5
    PREORDER = 1 << 6
    LINK = 1 << 13


class TestRunFlag(enum.IntFlag):
    """flags for BPF_PROG_TEST_RUN."""

    __test__ = False  # not a pytest test class despite the name

    RUN_ON_CPU = 1 << 0
    XDP_LIVE_FRAMES = 1 << 1


class LogLevel(enum.IntFlag):
    """log_level for BPF_PROG_LOAD / BPF_BTF_LOAD."""

    LEVEL1 = 1
    LEVEL2 = 2
    STATS = 4
    FIXED = 8


RINGBUF_BUSY_BIT = 1 << 31  # record header: producer has not committed the record yet
RINGBUF_DISCARD_BIT = 1 << 30  # record header: producer discarded the record
RINGBUF_HDR_SZ = 8  # u32 len (with the two bits above) + u32 page offset
ENOTSUPP = 524  # kernel-internal errno some bpf commands leak to user space


class IpCtInfo(enum.IntEnum):
    """enum ip_conntrack_info: the low bits of ``sk_buff._nfct`` (NFCT_INFOMASK)."""

    ESTABLISHED = 0
    RELATED = 1
    NEW = 2
    ESTABLISHED_REPLY = 3  # IP_CT_IS_REPLY + ESTABLISHED
    RELATED_REPLY = 4
    NUMBER = 5
    UNTRACKED = 7  # with a NULL conntrack pointer: nf_ct_set(skb, NULL, IP_CT_UNTRACKED)


IP_CT_IS_REPLY = 3
NFCT_INFOMASK = 7  # _nfct = (struct nf_conn *) | ctinfo
IFNAMSIZ = 16  # net_device.name, NUL included
IPS_SRC_NAT = 1 << 4  # enum ip_conntrack_status: nf_conn.status bits xt_conntrack reports
IPS_DST_NAT = 1 << 5


class PacketType(enum.IntEnum):
    """``skb->pkt_type`` (linux/if_packet.h PACKET_*), a 3-bit field (PKT_TYPE_MAX)."""

    HOST = 0
    BROADCAST = 1
    MULTICAST = 2
    OTHERHOST = 3
    OUTGOING = 4
    LOOPBACK = 5


PKT_TYPE_MAX = 7  # little-endian bitfield: pkt_type is the low 3 bits of its byte


class IfHook(enum.IntEnum):
    """The interface hooks a ruleset compiles for besides netfilter's, numbered as their
    attach types (distinct from every NfHook value, so both can share one set)."""

    XDP = AttachType.XDP
    TC_INGRESS = AttachType.TCX_INGRESS
    TC_EGRESS = AttachType.TCX_EGRESS


Hook = NfHook | IfHook  # where a program runs: a netfilter hook or an interface hook

ETH_HLEN = 14  # struct ethhdr: destination, source, EtherType
ETH_ALEN = 6  # an Ethernet address; h_source follows h_dest
ARPHRD_ETHER = 1  # net_device.type of Ethernet devices (veth too; loopback is 772)
TCP_TIME_WAIT = 6  # sock_common.skc_state values sk_to_full_sk() looks at
TCP_NEW_SYN_RECV = 12
NS_GET_USERNS = 0xB701  # ioctl on a namespace fd: the owning user namespace (_IO(0xb7, 1))
ETH_TYPE_OFFSET = 12
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD


class SkBuffCtx(enum.IntEnum):
    """Offsets in ``struct __sk_buff``, a TC program's context (UAPI, rewritten by the
    verifier into the real sk_buff fields)."""

    LEN = 0
    PKT_TYPE = 4
    MARK = 8  # writable from TC programs
    VLAN_PRESENT = 20
    DATA = 76  # direct packet access: the linear data (the MAC header at TC)
    DATA_END = 80


class XdpMd(enum.IntEnum):
    """Offsets in ``struct xdp_md``, an XDP program's context."""

    DATA = 0
    DATA_END = 4


SIOCGIFHWADDR = 0x8927  # ioctl: an interface's hardware address; sa_family is its ARPHRD type
