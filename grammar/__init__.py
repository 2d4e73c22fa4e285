"""Front ends: iptables-save/restore and nftables text parsed into the IR."""
