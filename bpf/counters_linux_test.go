package bpf

import (
	"reflect"
	"strings"
	"testing"
)

// TestCountersMirrorTheCStruct: Counters lists the fields of struct
// counter_set in the same order (readCounters sums them by position), and
// every counter has an event name.
func TestCountersMirrorTheCStruct(t *testing.T) {
	c := reflect.TypeOf(Counters{})
	g := reflect.TypeOf(mantletCounterSet{})
	if c.NumField() != g.NumField()-1 {
		t.Fatalf("Counters has %d fields, struct counter_set %d", c.NumField(), g.NumField()-1)
	}
	names := map[string]bool{}
	for i := range c.NumField() {
		if got, want := strings.ToLower(c.Field(i).Name), strings.ToLower(g.Field(i+1).Name); got != want {
			t.Errorf("field %d of Counters is %s, struct counter_set has %s there", i, c.Field(i).Name, g.Field(i+1).Name)
		}
		name := c.Field(i).Tag.Get("event")
		if name == "" || names[name] {
			t.Errorf("Counters.%s: event name %q is empty or taken", c.Field(i).Name, name)
		}
		names[name] = true
	}
}
