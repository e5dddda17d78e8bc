package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func testEnv() (*env, *bytes.Buffer, *bytes.Buffer) {
	var out, errb bytes.Buffer
	return &env{stdout: &out, stderr: &errb, getenv: func(string) string { return "" }}, &out, &errb
}

func TestEverySubcommandAnswersHelp(t *testing.T) {
	for name := range commands {
		t.Run(name, func(t *testing.T) {
			e, _, errb := testEnv()
			if code := run(context.Background(), e, []string{name, "-h"}); code != 0 {
				t.Fatalf("mantlet %s -h exited %d; stderr:\n%s", name, code, errb)
			}
			if !strings.Contains(errb.String(), "Usage: mantlet "+name) {
				t.Fatalf("mantlet %s -h printed no usage line; stderr:\n%s", name, errb)
			}
		})
	}
}

func TestUnknownCommandExits2(t *testing.T) {
	e, _, errb := testEnv()
	if code := run(context.Background(), e, []string{"frobnicate"}); code != 2 {
		t.Fatalf("exit code = %d, want 2", code)
	}
	if !strings.Contains(errb.String(), `unknown command "frobnicate"`) {
		t.Fatalf("stderr = %q", errb)
	}
}

func TestHelpListsCommands(t *testing.T) {
	e, out, _ := testEnv()
	if code := run(context.Background(), e, []string{"help"}); code != 0 {
		t.Fatalf("exit code = %d", code)
	}
	for name := range commands {
		if !strings.Contains(out.String(), "  "+name) {
			t.Errorf("help does not list %q:\n%s", name, out)
		}
	}
}
