// Package clusterca is the cluster CA service ('mantlet ca serve') and its
// client in the node agent. The service holds the CA's keys (a Kubernetes
// Secret, made on first start), and signs a node agent's certificate
// requests only for identities of pods that run on the agent's node: the
// agent proves who it is with its projected, audience-bound service-account
// token, which the service checks with the TokenReview API and ties to the
// agent's pod and node; the pods come from an informer. Every answer is
// counted and written as one JSON audit line. The service also publishes
// the trust bundle (all roots, during a rotation) in a ConfigMap and over
// its API, and follows a rotation made in the Secret.
//
// The API is HTTPS (TLS 1.3, the server's own SVID, verified by clients
// against the trust bundle and its SPIFFE ID) with JSON bodies:
//
//	POST /v1/sign    Authorization: Bearer <token>; SignRequest → SignResponse, or an ErrorResponse
//	GET  /v1/bundle  BundleResponse (no authentication: roots are public)
package clusterca

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Paths of the API.
const (
	SignPath   = "/v1/sign"
	BundlePath = "/v1/bundle"
)

// DefaultPort is the API's port (as istiod's CA).
const DefaultPort = 15012

// DefaultAudience is the audience of the agents' tokens the service
// accepts: a token minted for the API server (or anything else) is
// refused.
const DefaultAudience = "mantlet-ca"

// MaxRequestBytes bounds a request body; larger ones are refused unread.
const MaxRequestBytes = 64 << 10

// SignRequest asks for one SVID.
type SignRequest struct {
	// SPIFFEID is the identity asked for.
	SPIFFEID string `json:"spiffe_id"`
	// CSR is the PKCS#10 request, DER (base64 in JSON). Its key is the
	// node's; the service never sees private keys.
	CSR []byte `json:"csr"`
	// TTLSeconds is the lifetime asked for; the service caps it at its
	// configured lifetime. Zero asks for that lifetime.
	TTLSeconds int64 `json:"ttl_seconds,omitempty"`
}

// SignResponse is a signed SVID and the bundle it chains to.
type SignResponse struct {
	// Chain is the SVID's chain, leaf first, without the root; DER.
	Chain [][]byte `json:"chain"`
	// Bundle is BundlePath's answer at signing time.
	Bundle BundleResponse `json:"bundle"`
}

// BundleResponse is the trust bundle.
type BundleResponse struct {
	TrustDomain string `json:"trust_domain"`
	// Roots are the bundle's root certificates (DER): the active root
	// first, then the others trusted during a rotation.
	Roots [][]byte `json:"roots"`
	// SigningRoot is the SHA-256 fingerprint (hex) of the root new SVIDs
	// chain to.
	SigningRoot string `json:"signing_root"`
	// Phase is the rotation phase: idle, prepared or activated.
	Phase string `json:"phase"`
}

// ErrorResponse is the body of every refusal.
type ErrorResponse struct {
	// Reason is one of the Reason names.
	Reason string `json:"reason"`
	// Message says it in a sentence.
	Message string `json:"message"`
}

// Reason is why a sign request was refused. The set is closed: each is a
// label value of the refusal metric and the reason of the audit line.
type Reason int

// Reasons of a refusal. ReasonNone is a signed request.
const (
	ReasonNone Reason = iota
	// ReasonBadRequest: the body is no SignRequest (malformed JSON, too
	// large, a SPIFFE ID that does not parse).
	ReasonBadRequest
	// ReasonNoToken: no bearer token.
	ReasonNoToken
	// ReasonUnauthenticated: the API server did not authenticate the
	// token for the service's audience (invalid, expired, another
	// audience, or bound to a pod that no longer exists).
	ReasonUnauthenticated
	// ReasonNotAgent: the token is valid but not a node agent's service
	// account's.
	ReasonNotAgent
	// ReasonNotBound: the token is not bound to a pod and a node.
	ReasonNotBound
	// ReasonAgentPodGone: the pod the token is bound to is not (or no
	// longer) a running pod on the token's node.
	ReasonAgentPodGone
	// ReasonForeignTrustDomain: the ID is not in the CA's trust domain.
	ReasonForeignTrustDomain
	// ReasonNotWorkloadID: the ID is not spiffe://<td>/ns/<ns>/sa/<sa>.
	ReasonNotWorkloadID
	// ReasonNoPodOnNode: no running pod of that namespace and service
	// account is scheduled on the caller's node.
	ReasonNoPodOnNode
	// ReasonBadCSR: the CSR does not parse, its signature or key is
	// wrong, or it names something besides the ID (a second URI SAN, DNS
	// names).
	ReasonBadCSR
	// ReasonUnavailable: the service cannot decide now (the TokenReview
	// failed, the pods are not synced yet, the CA expired).
	ReasonUnavailable
	// ReasonRateLimited: the caller (its address before its token is
	// reviewed, its node after) sent more requests than its rate allows.
	ReasonRateLimited
	numReasons
)

var reasonNames = [numReasons]string{
	ReasonNone:               "signed",
	ReasonBadRequest:         "bad_request",
	ReasonNoToken:            "no_token",
	ReasonUnauthenticated:    "unauthenticated",
	ReasonNotAgent:           "not_an_agent",
	ReasonNotBound:           "token_not_bound",
	ReasonAgentPodGone:       "agent_pod_gone",
	ReasonForeignTrustDomain: "foreign_trust_domain",
	ReasonNotWorkloadID:      "not_a_workload_id",
	ReasonNoPodOnNode:        "no_pod_on_node",
	ReasonBadCSR:             "bad_csr",
	ReasonUnavailable:        "unavailable",
	ReasonRateLimited:        "rate_limited",
}

func (r Reason) String() string {
	if r >= 0 && r < numReasons {
		return reasonNames[r]
	}
	return fmt.Sprintf("Reason(%d)", int(r))
}

// ParseReason returns the Reason of a name, ok false for an unknown one.
func ParseReason(s string) (Reason, bool) {
	for i, n := range reasonNames {
		if n == s {
			return Reason(i), true
		}
	}
	return 0, false
}

// status is the HTTP status of a refusal.
func (r Reason) status() int {
	switch r {
	case ReasonBadRequest, ReasonBadCSR:
		return 400
	case ReasonNoToken, ReasonUnauthenticated:
		return 401
	case ReasonUnavailable:
		return 503
	case ReasonRateLimited:
		return 429
	}
	return 403
}

// RefusedError is a refusal, as the client returns it.
type RefusedError struct {
	Reason  Reason
	Message string
}

func (e *RefusedError) Error() string {
	return fmt.Sprintf("refused (%s): %s", e.Reason, e.Message)
}

// ParseSignRequest reads a SignRequest from a body: JSON, at most
// MaxRequestBytes, no unknown fields, one object; the ID must be a SPIFFE
// ID and the TTL not negative. It reads untrusted input (it has a fuzz
// target).
func ParseSignRequest(body io.Reader) (SignRequest, spiffeid.ID, time.Duration, error) {
	b, err := io.ReadAll(io.LimitReader(body, MaxRequestBytes+1))
	if err != nil {
		return SignRequest{}, spiffeid.ID{}, 0, fmt.Errorf("read the request: %w", err)
	}
	if len(b) > MaxRequestBytes {
		return SignRequest{}, spiffeid.ID{}, 0, fmt.Errorf("request larger than %d bytes", MaxRequestBytes)
	}
	var req SignRequest
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return SignRequest{}, spiffeid.ID{}, 0, fmt.Errorf("request is not a sign request: %w", err)
	}
	if dec.More() {
		return SignRequest{}, spiffeid.ID{}, 0, errors.New("request has data after the JSON object")
	}
	id, err := spiffeid.FromString(req.SPIFFEID)
	if err != nil {
		return SignRequest{}, spiffeid.ID{}, 0, fmt.Errorf("spiffe_id %q: %w", req.SPIFFEID, err)
	}
	if len(req.CSR) == 0 {
		return SignRequest{}, spiffeid.ID{}, 0, errors.New("csr is missing")
	}
	const maxTTL = int64(10 * 365 * 24 * time.Hour / time.Second)
	if req.TTLSeconds < 0 || req.TTLSeconds > maxTTL {
		return SignRequest{}, spiffeid.ID{}, 0, fmt.Errorf("ttl_seconds %d: want 0 to %d", req.TTLSeconds, maxTTL)
	}
	return req, id, time.Duration(req.TTLSeconds) * time.Second, nil
}
