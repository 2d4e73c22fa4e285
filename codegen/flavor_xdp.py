"""The XDP flavor: a ruleset's chain on every frame an interface receives, before the stack.

XDP runs before an sk_buff exists: no mark, no packet type, no conntrack; DROP is XDP_DROP
and ACCEPT XDP_PASS. See flavor_packet for what the prologue does and what it refuses.
A VLAN tag the NIC strips in hardware is invisible to XDP (only the tag left in the frame
is seen), so on such NICs tagged frames are filtered as untagged ones.
"""

from __future__ import annotations

from bpfilter.codegen.flavor_packet import PacketFlavor
from bpfilter.codegen.uapi import AttachType, IfHook, ProgType, XdpAction, XdpMd

XDP = PacketFlavor(IfHook.XDP, ProgType.XDP, AttachType.XDP, "bpf_dynptr_from_xdp",
                   accept=XdpAction.PASS, drop=XdpAction.DROP, ctx_data=XdpMd.DATA,
                   ctx_data_end=XdpMd.DATA_END)
