package clusterca

import (
	"encoding/json"
	"io"
	"sync"
	"time"
)

// AuditType is the type of every audit line.
const AuditType = "mantlet.ca.sign"

// auditEvent is one audit line: a JSON object per sign request, signed or
// refused, with the fields a SIEM filters on at the top level. The schema
// is documented in docs/identity.md (The cluster CA); fields are added, never renamed.
type auditEvent struct {
	Time time.Time `json:"time"`
	Type string    `json:"type"`
	// Verdict is "signed" or "refused"; Reason the Reason name ("signed"
	// for a signed request); Message why, in a sentence.
	Verdict string `json:"verdict"`
	Reason  string `json:"reason"`
	Message string `json:"message,omitempty"`
	// RequestedID is the SPIFFE ID asked for (empty when the body did not
	// parse).
	RequestedID string `json:"requested_id,omitempty"`
	// CallerNode, CallerPod (namespace/name) and CallerSA
	// (namespace/name) are what the caller's token proves, once the API
	// server authenticated it.
	CallerNode string `json:"caller_node,omitempty"`
	CallerPod  string `json:"caller_pod,omitempty"`
	CallerSA   string `json:"caller_sa,omitempty"`
	RemoteAddr string `json:"remote_addr"`
	// Serial, NotAfter and Root describe a signed SVID (hex serial,
	// expiry, fingerprint of its root).
	Serial   string    `json:"serial,omitempty"`
	NotAfter time.Time `json:"not_after,omitzero"`
	Root     string    `json:"root,omitempty"`
	// Replica names the service's replica that answered.
	Replica string `json:"replica,omitempty"`
}

// auditLog writes audit lines, one JSON object each, whole.
type auditLog struct {
	mu  sync.Mutex
	w   io.Writer
	now func() time.Time
}

func (a *auditLog) write(ev auditEvent) {
	if a.w == nil {
		return
	}
	ev.Time, ev.Type = a.now().UTC(), AuditType
	b, err := json.Marshal(ev)
	if err != nil {
		return
	}
	b = append(b, '\n')
	a.mu.Lock()
	defer a.mu.Unlock()
	_, _ = a.w.Write(b)
}
