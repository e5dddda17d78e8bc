package bpf

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Watch keeps the data path's kernel state in place until ctx ends. It
// checks everything at once whenever a routing rule, a route or a link of
// the node's namespace changes (netlink notifications), and every interval
// (0: DefaultWatchInterval) what sends none (detached programs, removed
// pins); the rule, the route and lo it also checks every watchAllEvery in
// case a notification was missed, and at every interval once the
// notifications stopped or while a repair fails. What is missing it repairs, logging and counting
// each repair (Repairs). A repair that fails is logged and tried again at
// the next check; Status reports the problem meanwhile. Watch returns an
// error only when it cannot subscribe to the notifications.
func (d *Datapath) Watch(ctx context.Context, interval time.Duration) error {
	if interval <= 0 {
		interval = DefaultWatchInterval
	}
	sock, err := nl.SubscribeAt(d.ns, netns.None(), unix.NETLINK_ROUTE,
		unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_LINK)
	if err != nil {
		return fmt.Errorf("bpf: watch: subscribe to routing changes: %w", err)
	}
	changed := make(chan struct{}, 1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(changed) // notifications stopped
		for {
			if _, _, err := sock.Receive(); err != nil && !errors.Is(err, unix.ENOBUFS) {
				// ENOBUFS: notifications were lost; the check below
				// covers them. Anything else ends the notifications
				// (the socket closed); the periodic check goes on.
				if ctx.Err() == nil {
					d.log.Warn("bpf: watch: routing notifications stopped; checking periodically only", "error", err)
				}
				return
			}
			select {
			case changed <- struct{}{}:
			default:
			}
		}
	}()
	defer func() {
		sock.Close() // ends Receive
		<-done
	}()

	tick := time.NewTicker(interval)
	defer tick.Stop()
	var (
		lastErr  string
		lastAll  = time.Now()
		notified = true // the notifications still come
	)
	for {
		scope := checkSilent
		select {
		case <-ctx.Done():
			return nil
		case _, ok := <-changed:
			if !ok {
				notified, changed = false, nil
			}
			scope = checkAll
		case <-tick.C:
			// A repair that failed is tried in full again.
			if !notified || lastErr != "" || time.Since(lastAll) >= watchAllEvery {
				scope = checkAll
			}
		}
		if scope == checkAll {
			lastAll = time.Now()
		}
		if _, err := d.repair(scope); err != nil {
			if msg := err.Error(); msg != lastErr {
				d.log.Error("bpf: the data path is incomplete and could not be repaired; captured traffic fails closed until it is", "error", err)
				lastErr = msg
			}
			continue
		}
		lastErr = ""
	}
}

// watchAllEvery is how often Watch lists the routing rules, the routes and
// lo although no notification said that they changed.
const watchAllEvery = 5 * time.Second
