"""eBPF code generation: instruction encoding, linking, disassembly, ELF objects."""
