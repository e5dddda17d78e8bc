package bpf

// The eBPF objects are built with a pinned compiler so that `make generate`
// reproduces the committed *_bpfel.o byte for byte (CI checks it). The -I
// directories hold <asm/types.h> on Debian (multiarch).
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -target bpfel -tags linux -cflags "-O2 -g -Wall -Werror" -type settings -type iface_info -type pod_ip_key -type lpm_v4_key -type counter_set -type iface_kind mantlet mantlet.c -- -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu
