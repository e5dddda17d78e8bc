package scenario

import (
	"strings"
	"testing"
	"time"
)

func TestParseStatCPUSumsUserAndSystemTime(t *testing.T) {
	tests := []struct {
		name, stat string
		want       time.Duration
		wantErr    string
	}{
		{"plain name", "4242 (mantlet) S 1 4242 4242 0 -1 4194560 1234 0 0 0 150 25 0 0 20 0 12 0", 1750 * time.Millisecond, ""},
		{"name with spaces and parentheses", "7 (a (b) c) R 1 7 7 0 -1 0 0 0 0 0 3 4 0 0 20 0 1 0", 70 * time.Millisecond, ""},
		{"no name", "7 R 1 7", 0, "malformed stat"},
		{"cut short", "7 (x) R 1 7 7 0 -1 0 0 0 0 0 3", 0, "want at least 13"},
		{"not a number", "7 (x) R 1 7 7 0 -1 0 0 0 0 0 3 x 0", 0, "invalid syntax"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStatCPU(tt.stat)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one saying %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("= %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}
