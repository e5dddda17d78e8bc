package bpf

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"golang.org/x/sys/unix"
)

// checkKernel names the first kernel feature the data path needs and the
// kernel lacks.
func checkKernel() error {
	checks := []struct {
		feature string
		probe   func() error
	}{
		{"sk_lookup programs (Linux 5.9)", func() error { return features.HaveProgramType(ebpf.SkLookup) }},
		{"SOCKMAP maps", func() error { return features.HaveMapType(ebpf.SockMap) }},
		{"LPM trie maps", func() error { return features.HaveMapType(ebpf.LPMTrie) }},
		{"bpf_skc_lookup_tcp in tc programs (Linux 5.2)", func() error { return features.HaveProgramHelper(ebpf.SchedCLS, asm.FnSkcLookupTcp) }},
		{"bpf_sk_assign in tc programs (Linux 5.7)", func() error { return features.HaveProgramHelper(ebpf.SchedCLS, asm.FnSkAssign) }},
		{"bpf_sk_assign in sk_lookup programs (Linux 5.9)", func() error { return features.HaveProgramHelper(ebpf.SkLookup, asm.FnSkAssign) }},
	}
	for _, c := range checks {
		if err := c.probe(); err != nil {
			if errors.Is(err, ebpf.ErrNotSupported) {
				return fmt.Errorf("bpf: the kernel lacks %s: %w", c.feature, err)
			}
			return fmt.Errorf("bpf: probe the kernel for %s: %w", c.feature, err)
		}
	}
	return nil
}

// fibLookupTakesMark reports whether bpf_fib_lookup honours
// BPF_FIB_LOOKUP_MARK (Linux 6.10), which lets the tc programs confirm
// that policy routing will deliver a captured SYN locally. The probe calls
// the helper with that flag and an address family of 0: a kernel that
// knows the flag answers EAFNOSUPPORT, one that does not answers EINVAL.
func fibLookupTakesMark() (bool, error) {
	const (
		paramsSize       = 64 // sizeof(struct bpf_fib_lookup)
		fibLookupMark    = 1 << 5
		fibLookupNoNeigh = 1 << 2
	)
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1), asm.Mov.Imm(asm.R0, 0)}
	for off := -paramsSize; off < 0; off += 8 {
		insns = append(insns, asm.StoreMem(asm.RFP, int16(off), asm.R0, asm.DWord))
	}
	insns = append(insns,
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -paramsSize),
		asm.Mov.Imm(asm.R3, paramsSize),
		asm.Mov.Imm(asm.R4, fibLookupMark|fibLookupNoNeigh),
		asm.FnFibLookup.Call(),
		asm.Return(),
	)
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{Type: ebpf.SchedCLS, Instructions: insns, License: "Dual BSD/GPL"})
	if err != nil {
		return false, fmt.Errorf("bpf: probe bpf_fib_lookup: %w", err)
	}
	defer prog.Close()
	ret, err := prog.Run(&ebpf.RunOptions{Data: make([]byte, 64)})
	if err != nil {
		return false, fmt.Errorf("bpf: probe bpf_fib_lookup: %w", err)
	}
	return int32(ret) != -int32(unix.EINVAL), nil
}

// localPlainPossible prepares the namespace for CaptureLocalPlain and
// reports whether it can work. Packets turned around into lo must pass
// the reverse path filter there, and TCP early demux must be off: it
// would attach the ztunnel's socket to the client's later packets as
// they arrive from the client's veth, and forwarding drops a packet that
// carries a socket before pod_egress can turn it around.
func localPlainPossible(log *slog.Logger) bool {
	if strictRPFilter() {
		log.Warn("bpf: plaintext from unmeshed pods of this node is not captured: strict rp_filter on lo would drop it (set net.ipv4.conf.all.rp_filter and net.ipv4.conf.lo.rp_filter to 0 or 2)")
		return false
	}
	const demux = "/proc/sys/net/ipv4/tcp_early_demux"
	if b, err := os.ReadFile(demux); err == nil && strings.TrimSpace(string(b)) == "0" {
		return true
	}
	if err := os.WriteFile(demux, []byte("0\n"), 0o644); err != nil {
		log.Warn("bpf: plaintext from unmeshed pods of this node is not captured: cannot turn TCP early demux off", "error", err)
		return false
	}
	log.Info("bpf: net.ipv4.tcp_early_demux set to 0 for the capture of plaintext from unmeshed pods of this node")
	return true
}

// strictRPFilter reports whether strict reverse path filtering applies to
// packets arriving on lo in the current network namespace: the kernel
// uses the larger of the "all" and the device's rp_filter.
func strictRPFilter() bool {
	v := 0
	for _, dev := range []string{"all", "lo"} {
		b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + dev + "/rp_filter")
		if err != nil {
			continue
		}
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			v = max(v, n)
		}
	}
	return v == 1
}
