package main

import (
	"context"
	"strings"
	"testing"
)

func TestBenchRejectsBadFlags(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"bench", "--duration", "0s"}, "must be positive"},
		{[]string{"bench", "--round-trips", "0"}, "must be positive"},
		{[]string{"bench", "extra"}, `unexpected argument "extra"`},
	}
	for _, tt := range tests {
		e, _, errb := testEnv()
		if code := run(context.Background(), e, tt.args); code != 2 {
			t.Errorf("%v: exit code %d, want 2", tt.args, code)
		}
		if !strings.Contains(errb.String(), tt.want) {
			t.Errorf("%v: stderr %q does not say %q", tt.args, errb, tt.want)
		}
	}
}
