package hbone_test

import (
	"errors"
	"testing"

	"github.com/mantlet/mantlet/ztunnel/hbone"
)

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // "" means an error
	}{
		{"10.0.0.1:8080", "10.0.0.1:8080"},
		{"[2001:db8::1]:443", "[2001:db8::1]:443"},
		{"[::ffff:10.0.0.1]:80", "10.0.0.1:80"},
		{"10.0.0.1", ""},
		{"10.0.0.1:0", ""},
		{"10.0.0.1:65536", ""},
		{"10.0.0.1:080", ""},
		{"checkout.shop.svc:80", ""},
		{"[fe80::1%eth0]:80", ""},
		{"0.0.0.0:80", ""},
		{"224.0.0.1:80", ""},
		{"", ""},
	} {
		got, err := hbone.ParseTarget(tc.in)
		if tc.want == "" {
			if !errors.Is(err, hbone.ErrBadTarget) {
				t.Errorf("ParseTarget(%q) = %v, %v; want ErrBadTarget", tc.in, got, err)
			}
			continue
		}
		if err != nil || got.String() != tc.want {
			t.Errorf("ParseTarget(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func TestParseForwarded(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want string // address; "none" for ok=false; "" for an error
	}{
		{`for="10.0.0.1:5000"`, "10.0.0.1:5000"},
		{`for=10.0.0.1`, "10.0.0.1:0"},
		{`for=10.0.0.1:5000`, "10.0.0.1:5000"},
		{`For="[2001:db8::1]:80"`, "[2001:db8::1]:80"},
		{`for="[2001:db8::1]"`, "[2001:db8::1]:0"},
		{`proto=https;for="10.0.0.1:1";by=10.0.0.2`, "10.0.0.1:1"},
		{`for="10.0.0.1:1", for="10.0.0.9:9"`, "10.0.0.1:1"},
		{`for=unknown`, "none"},
		{`for="_hidden"`, "none"},
		{`for="10.0.0.1:_p"`, "10.0.0.1:0"},
		{`proto=https`, "none"},
		{`for="10.0.0.1:1";for="10.0.0.2:2"`, ""},
		{`for=2001:db8::1`, ""},
		{`for="10.0.0.1:99999"`, ""},
		{`for="10.0.0.1`, ""},
		{`for`, ""},
		{`=10.0.0.1`, ""},
		{`for="[fe80::1%25eth0]:1"`, ""},
		{`for=host.example`, ""},
	} {
		got, ok, err := hbone.ParseForwarded(tc.in)
		switch {
		case tc.want == "":
			if !errors.Is(err, hbone.ErrBadForwarded) {
				t.Errorf("ParseForwarded(%q) = %v, %v, %v; want ErrBadForwarded", tc.in, got, ok, err)
			}
		case tc.want == "none":
			if err != nil || ok {
				t.Errorf("ParseForwarded(%q) = %v, %v, %v; want no address", tc.in, got, ok, err)
			}
		default:
			if err != nil || !ok || got.String() != tc.want {
				t.Errorf("ParseForwarded(%q) = %v, %v, %v; want %s", tc.in, got, ok, err, tc.want)
			}
		}
	}
}

func FuzzParseTarget(f *testing.F) {
	for _, s := range []string{"10.0.0.1:8080", "[2001:db8::1]:443", "[::ffff:1.2.3.4]:1", "a:1", "1.2.3.4:01"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, err := hbone.ParseTarget(s)
		if err != nil {
			if !errors.Is(err, hbone.ErrBadTarget) {
				t.Fatalf("error %v does not wrap ErrBadTarget", err)
			}
			return
		}
		// A target that parses has one canonical text that parses back.
		again, err := hbone.ParseTarget(ap.String())
		if err != nil || again != ap || ap.Port() == 0 || ap.Addr().Is4In6() {
			t.Fatalf("%q -> %v -> %v, %v", s, ap, again, err)
		}
	})
}

func FuzzParseForwarded(f *testing.F) {
	for _, s := range []string{`for="10.0.0.1:5000"`, `for=unknown;proto=http, for=1.2.3.4`, `For="[2001:db8::1]:80"`, `for="\"x"`, `by=a;for=_x`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ap, ok, err := hbone.ParseForwarded(s)
		if err != nil {
			if !errors.Is(err, hbone.ErrBadForwarded) || ok {
				t.Fatalf("bad error %v (ok %v)", err, ok)
			}
			return
		}
		if !ok {
			return
		}
		// What we would send for that client parses back to it.
		back, ok2, err := hbone.ParseForwarded(hbone.FormatForwarded(ap))
		if ap.Port() != 0 && (err != nil || !ok2 || back != ap) {
			t.Fatalf("%q -> %v; FormatForwarded -> %q -> %v %v %v", s, ap, hbone.FormatForwarded(ap), back, ok2, err)
		}
		if ap.Addr().Is4In6() || ap.Addr().Zone() != "" {
			t.Fatalf("%q -> %v: not canonical", s, ap)
		}
	})
}
