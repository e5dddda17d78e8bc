package main

import (
	"context"
	"strings"
	"testing"
)

func TestScenarioCommandsSayTheyNeedRoot(t *testing.T) {
	orig := geteuid
	geteuid = func() int { return 1000 }
	t.Cleanup(func() { geteuid = orig })
	for _, name := range []string{"demo", "bench"} {
		if _, ok := commands[name]; !ok {
			continue // bench may not be registered in this build
		}
		t.Run(name, func(t *testing.T) {
			e, out, errb := testEnv()
			if code := run(context.Background(), e, []string{name}); code != 1 {
				t.Fatalf("mantlet %s as a normal user exited %d, want 1; stderr:\n%s", name, code, errb)
			}
			want := "mantlet " + name + ": needs root: it builds network namespaces and loads eBPF programs; run it as root (for example: sudo make " + name + ")\n"
			if errb.String() != want {
				t.Errorf("stderr = %q, want %q", errb, want)
			}
			if out.Len() > 0 {
				t.Errorf("printed a report without running:\n%s", out)
			}
		})
	}
}

func TestDemoRejectsArguments(t *testing.T) {
	e, _, errb := testEnv()
	if code := run(context.Background(), e, []string{"demo", "now"}); code != 2 {
		t.Fatalf("exit code %d, want 2", code)
	}
	if !strings.Contains(errb.String(), `unexpected argument "now"`) {
		t.Errorf("stderr = %q", errb)
	}
}
