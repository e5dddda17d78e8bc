package testbed

import "testing"

func TestLayoutPlacesTheControlPlaneOnTheUnderlayOnlyWhenAsked(t *testing.T) {
	spec := SimpleSpec(2, 1, "")
	tb, err := layout(spec, "tbx1")
	if err != nil {
		t.Fatal(err)
	}
	if tb.ControlPlane() != nil {
		t.Errorf("a spec without controlPlane got a control plane: %+v", tb.ControlPlane())
	}
	spec.ControlPlane = true
	if tb, err = layout(spec, "tbx1"); err != nil {
		t.Fatal(err)
	}
	cp := tb.ControlPlane()
	if cp == nil {
		t.Fatal("a spec with controlPlane got no control plane")
	}
	if cp.IP.String() != "198.18.0.254" || cp.NS != "/run/netns/tbx1-control-plane" || cp.Uplink != "eth0" {
		t.Errorf("control plane %+v, want 198.18.0.254 in /run/netns/tbx1-control-plane on eth0", cp)
	}
	if !NodeCIDR.Contains(cp.IP) {
		t.Errorf("control plane %s is outside the node network %s", cp.IP, NodeCIDR)
	}
	for _, n := range tb.Nodes() {
		if n.IP == cp.IP {
			t.Errorf("node %s has the control plane's address %s", n.Name, cp.IP)
		}
	}
	if !tb.Spec().ControlPlane {
		t.Error("Spec() lost controlPlane")
	}
	if !ownsNamespace("tbx1", "tbx1-control-plane") || ownsNamespace("tbx1", "tbx2-control-plane") {
		t.Error("ownsNamespace does not claim exactly the testbed's own control plane")
	}
}

func TestTheLargestTestbedLeavesTheControlPlaneAddressFree(t *testing.T) {
	spec := SimpleSpec(maxNodes, 0, "")
	spec.ControlPlane = true
	tb, err := layout(spec, "tbx1")
	if err != nil {
		t.Fatal(err)
	}
	last := tb.Nodes()[maxNodes-1].IP
	if !last.Less(ControlPlaneIP) {
		t.Errorf("node %d has %s, not below the control plane's %s", maxNodes, last, ControlPlaneIP)
	}
}
