package clusterca

import (
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Defaults of the per-caller rate limit. An agent asks for one SVID per
// local identity when it starts and then about one per identity per half
// lifetime, so the burst covers a node full of distinct identities and the
// rate a steady trickle; a caller above it is refused (rate_limited, 429)
// and its Manager retries with backoff.
const (
	DefaultCallerRate  = 20  // requests per second
	DefaultCallerBurst = 200 // requests
	// maxLimited bounds the callers tracked; beyond it, callers whose
	// bucket is full are forgotten first, then the overflow shares one
	// bucket.
	maxLimited = 10_000
)

// limiter is a token bucket per caller key, in a bounded map.
type limiter struct {
	rate  rate.Limit
	burst int

	mu       sync.Mutex
	buckets  map[string]*rate.Limiter
	overflow *rate.Limiter
}

func newLimiter(perSecond float64, burst int) *limiter {
	return &limiter{rate: rate.Limit(perSecond), burst: burst, buckets: map[string]*rate.Limiter{},
		overflow: rate.NewLimiter(rate.Limit(perSecond), burst)}
}

// allow takes one token from key's bucket at now.
func (l *limiter) allow(key string, now time.Time) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.buckets[key]
	if !ok {
		if len(l.buckets) >= maxLimited {
			for k, v := range l.buckets {
				if v.TokensAt(now) >= float64(l.burst) {
					delete(l.buckets, k)
				}
			}
		}
		if len(l.buckets) >= maxLimited {
			return l.overflow.AllowN(now, 1)
		}
		b = rate.NewLimiter(l.rate, l.burst)
		l.buckets[key] = b
	}
	return b.AllowN(now, 1)
}
