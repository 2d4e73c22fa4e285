"""bpfilter: compile iptables and nftables rulesets into eBPF programs."""

__version__ = "0.1.0"
