package identity

import "time"

// Clock is the time source of a Manager. The system clock is the default;
// tests give a fake one so that renewals a day apart take no time.
type Clock interface {
	Now() time.Time
	// TimerAt returns a timer that fires once the clock reads at or later
	// (at once if it already does). Timers take a deadline, not a
	// duration, so that a fake clock moved between computing the deadline
	// and creating the timer cannot make the timer late.
	TimerAt(at time.Time) Timer
}

// Timer is a one-shot timer made by a Clock.
type Timer interface {
	// C receives the time when the timer fires.
	C() <-chan time.Time
	// Stop prevents the timer from firing; it reports whether it did.
	Stop() bool
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }
func (systemClock) TimerAt(at time.Time) Timer {
	return systemTimer{time.NewTimer(time.Until(at))}
}

type systemTimer struct{ t *time.Timer }

func (t systemTimer) C() <-chan time.Time { return t.t.C }
func (t systemTimer) Stop() bool          { return t.t.Stop() }
