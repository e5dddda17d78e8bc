package bpf

import (
	"net/netip"
	"strings"
	"testing"
)

func TestConfigValidate(t *testing.T) {
	ok := DefaultConfig("node-1")
	tests := []struct {
		name    string
		edit    func(*Config)
		wantErr string // substring; "" means valid
	}{
		{"the defaults are valid", func(*Config) {}, ""},
		{"a relative pin dir is refused", func(c *Config) { c.PinDir = "mantlet/node-1" }, "clean absolute path"},
		{"a pin dir with a dot is refused (bpffs refuses it)", func(c *Config) { c.PinDir = "/sys/fs/bpf/mantlet/node.example" }, "must not contain '.'"},
		{"a pin dir named like a staging dir is refused", func(c *Config) { c.PinDir = "/sys/fs/bpf/mantlet/_x" }, "must not start with '_'"},
		{"a redirect mark outside its mask is refused", func(c *Config) { c.RedirectMark = 0x3000 }, "outside MarkMask"},
		{"a zero ztunnel mark is refused", func(c *Config) { c.ZtunnelMark = 0 }, "ZtunnelMark must be non-zero"},
		{"a ztunnel mark that matches the redirect rule is refused", func(c *Config) { c.ZtunnelMark = 0x3000 }, "would loop back"},
		{"a zero pass mark is refused", func(c *Config) { c.PassMark = 0 }, "PassMark must be non-zero"},
		{"a pass mark inside the redirect mask is refused", func(c *Config) { c.PassMark = 0x1000 }, "shares bits"},
		{"a pass mark sharing a bit with the ztunnel mark is refused", func(c *Config) { c.PassMark = 0x2080 }, "shares bits"},
		{"the main table is refused", func(c *Config) { c.RouteTable = 254 }, "RouteTable 254"},
		{"a rule priority after main is refused", func(c *Config) { c.RulePriority = 32766 }, "RulePriority 32766"},
		{"port 0 is refused", func(c *Config) { c.ExcludePorts = []uint16{22, 0} }, "port 0"},
		{"too many node addresses are refused", func(c *Config) { c.NodeIPs = make([]netip.Addr, 65) }, "at most 64"},
		{"an invalid node address is refused", func(c *Config) { c.NodeIPs = []netip.Addr{{}} }, "invalid address"},
		{"IPv6 node addresses are accepted (and ignored)", func(c *Config) { c.NodeIPs = []netip.Addr{netip.MustParseAddr("fd00::1")} }, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := ok
			tt.edit(&c)
			err := c.Validate()
			switch {
			case tt.wantErr == "" && err != nil:
				t.Errorf("Validate() = %v, want nil", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Errorf("Validate() = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestDefaultConfigPinDir(t *testing.T) {
	if got, want := DefaultConfig("worker.example.com").PinDir, "/sys/fs/bpf/mantlet/worker-example-com"; got != want {
		t.Errorf("PinDir = %q, want %q", got, want)
	}
}

func TestStatus(t *testing.T) {
	tests := []struct {
		name      string
		st        Status
		wantReady bool
		want      string
	}{
		{"all in place", Status{SkLookupAttached: true, Listeners: []Slot{Outbound, HBONE}, Pods: []int{4, 5}}, true, "ready: 2 pods, 0 uplinks"},
		{"nothing attached", Status{}, false, "not ready: sk_lookup program not attached; no outbound listener (:15001) in the SOCKMAP; no hbone listener (:15008) in the SOCKMAP"},
		{"HBONE listener missing", Status{SkLookupAttached: true, Listeners: []Slot{Outbound, InboundPlain}}, false, "not ready: no hbone listener (:15008) in the SOCKMAP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.st.Ready(); got != tt.wantReady {
				t.Errorf("Ready() = %v, want %v", got, tt.wantReady)
			}
			if got := tt.st.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestSlots(t *testing.T) {
	for _, tt := range []struct {
		slot Slot
		name string
		port uint16
	}{{Outbound, "outbound", 15001}, {InboundPlain, "inbound-plain", 15006}, {HBONE, "hbone", 15008}, {Slot(9), "slot(9)", 0}} {
		if tt.slot.String() != tt.name || tt.slot.Port() != tt.port {
			t.Errorf("slot %d: %q :%d, want %q :%d", uint32(tt.slot), tt.slot, tt.slot.Port(), tt.name, tt.port)
		}
	}
}
