package kubecluster

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/mantlet/mantlet/internal/kubetest"
	"github.com/mantlet/mantlet/internal/kubetest/kubebin"
	"github.com/mantlet/mantlet/internal/privtest"
)

// The tests share one cluster, brought up by the first test that needs it
// and removed by TestMain; the chart is installed once, by the first test
// that needs mantlet. Tests run in file order and leave the cluster as
// they found it (mantlet installed or not, the DaemonSet as the chart
// makes it).
var shared struct {
	once    sync.Once
	cluster *Cluster
	err     error

	meshOnce sync.Once
	meshErr  error

	artOnce sync.Once
	artErr  error
	image   string
	helm    string
	// artifacts holds the image and helm; TestMain removes it.
	artifacts string
}

// testStateDir keeps the tests' clusters apart from a user's.
var testStateDir = filepath.Join(os.TempDir(), "kubecluster-test-state")

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.artifacts != "" {
		if err := os.RemoveAll(shared.artifacts); err != nil {
			fmt.Fprintln(os.Stderr, "kubecluster: removing the test artifacts:", err)
			code = 1
		}
	}
	if shared.cluster != nil {
		if err := shared.cluster.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "kubecluster: removing the test cluster:", err)
			code = 1
		}
	}
	if shared.cluster != nil {
		if err := leftovers(shared.cluster); err != nil {
			fmt.Fprintln(os.Stderr, "kubecluster: left behind:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// leftovers says what the removed test cluster c left: its state file,
// cgroups, folder. Only its own: another test binary's cluster may be
// recorded in the same folder meanwhile.
func leftovers(c *Cluster) error {
	names, _ := List(testStateDir)
	if pid, ok := names[c.Name]; ok {
		return fmt.Errorf("cluster %s (pid %d) still recorded in %s", c.Name, pid, testStateDir)
	}
	if m, _ := filepath.Glob(filepath.Join(cgroupFS, "*", "kubecluster", "*-"+c.Name)); len(m) > 0 {
		return fmt.Errorf("cgroups: %v", m)
	}
	if _, err := os.Stat(c.Dir); err == nil {
		return fmt.Errorf("folder %s", c.Dir)
	}
	return nil
}

// cluster returns the shared cluster, bringing it up the first time. It
// needs root and the Kubernetes programs; under CI=true their absence
// fails the test.
func cluster(t *testing.T) *Cluster {
	t.Helper()
	privtest.Require(t)
	bins := kubetest.RequireBinaries(t)
	shared.once.Do(func() {
		shared.err = bringUp(t, bins)
	})
	if shared.err != nil {
		t.Fatalf("the test cluster: %v", shared.err)
	}
	return shared.cluster
}

func bringUp(t *testing.T, bins kubebin.Binaries) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	repo, err := kubebin.RepoRoot(".")
	if err != nil {
		return err
	}
	if err := artifacts(t, repo); err != nil {
		return err
	}
	start := time.Now()
	shared.cluster, err = Up(ctx, Options{
		Repo:     repo,
		Binaries: &bins,
		Images:   []string{shared.image},
		Log:      slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo})),
		StateDir: testStateDir,
	})
	if err != nil {
		return err
	}
	t.Logf("cluster %s up in %s", shared.cluster.Name, time.Since(start).Round(time.Millisecond))
	return nil
}

// artifacts builds the mantlet image and helm once for every cluster of
// the tests; TestMain removes them.
func artifacts(t *testing.T, repo string) error {
	shared.artOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		defer cancel()
		start := time.Now()
		art := filepath.Join(os.TempDir(), fmt.Sprintf("kubecluster-artifacts-%d", os.Getpid()))
		shared.artifacts = art
		shared.image, shared.helm, shared.artErr = BuildArtifacts(ctx, repo, art)
		if shared.artErr == nil {
			t.Logf("mantlet image and helm built in %s", time.Since(start).Round(time.Millisecond))
		}
	})
	return shared.artErr
}

// meshed returns the shared cluster with mantlet installed.
func meshed(t *testing.T) *Cluster {
	t.Helper()
	c := cluster(t)
	shared.meshOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		repo, err := kubebin.RepoRoot(".")
		if err != nil {
			shared.meshErr = err
			return
		}
		start := time.Now()
		shared.meshErr = c.InstallMantlet(ctx, MeshOptions{Helm: shared.helm, Repo: repo})
		t.Logf("helm install and agents Ready in %s", time.Since(start).Round(time.Millisecond))
	})
	if shared.meshErr != nil {
		t.Fatalf("installing mantlet: %v", shared.meshErr)
	}
	return c
}

// ownClusterWithMantlet brings up a cluster of the test's own with opts
// (its Repo, Binaries, Images, Log and StateDir filled in here), removes it
// when the test ends (and fails the test if anything of it is left), and
// installs mantlet on it. what names the cluster in messages. The returned
// context ends 6 minutes after the call, or with the test.
func ownClusterWithMantlet(t *testing.T, what string, opts Options) (context.Context, *Cluster) {
	t.Helper()
	privtest.Require(t)
	bins := kubetest.RequireBinaries(t)
	repo, err := kubebin.RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	if err := artifacts(t, repo); err != nil {
		t.Fatalf("the mantlet image and helm: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 6*time.Minute)
	t.Cleanup(cancel)
	start := time.Now()
	opts.Repo, opts.Binaries, opts.Images, opts.StateDir = repo, &bins, []string{shared.image}, testStateDir
	opts.Log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	c, err := Up(ctx, opts)
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("removing the %s: %v", what, err)
		}
		if err := leftovers(c); err != nil {
			t.Errorf("the %s left behind: %v", what, err)
		}
	})
	t.Logf("%s %s up in %s", what, c.Name, time.Since(start).Round(time.Millisecond))
	start = time.Now()
	if err := c.InstallMantlet(ctx, MeshOptions{Helm: shared.helm, Repo: repo}); err != nil {
		t.Fatalf("installing mantlet: %v", err)
	}
	t.Logf("helm install and agents Ready in %s", time.Since(start).Round(time.Millisecond))
	return ctx, c
}
