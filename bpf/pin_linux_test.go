package bpf

import (
	"strings"
	"testing"
)

func TestPinNames(t *testing.T) {
	tests := []struct {
		name       string
		wantKey    attachKey
		wantClsact bool
		wantOK     bool
	}{
		{"if7-pod-ingress", attachKey{7, rolePodIngress}, false, true},
		{"if12-pod-egress-tc", attachKey{12, rolePodEgress}, true, true},
		{"if3-uplink-ingress", attachKey{3, roleUplinkIngress}, false, true},
		{"sk_lookup", attachKey{}, false, false},
		{"if0-pod-ingress", attachKey{}, false, false},
		{"ifx-pod-ingress", attachKey{}, false, false},
		{"if7-pod-sideways", attachKey{}, false, false},
	}
	for _, tt := range tests {
		key, clsact, ok := parsePinName(tt.name)
		if key != tt.wantKey || clsact != tt.wantClsact || ok != tt.wantOK {
			t.Errorf("parsePinName(%q) = %v %v %v, want %v %v %v", tt.name, key, clsact, ok, tt.wantKey, tt.wantClsact, tt.wantOK)
		}
		if ok && !clsact && key.pinName() != tt.name {
			t.Errorf("pinName() = %q, want %q", key.pinName(), tt.name)
		}
	}
}

func TestPinDirMustBeOnBPFFS(t *testing.T) {
	dir := t.TempDir() + "/mantlet/node-1"
	err := ensureBPFFS(dir)
	if err == nil || !strings.Contains(err.Error(), "is not on a bpf filesystem") {
		t.Errorf("ensureBPFFS(%s) = %v, want 'is not on a bpf filesystem'", dir, err)
	}
}
