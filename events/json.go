package events

import (
	"encoding/json"
	"strconv"
	"time"
)

// Append appends f's JSON form (one object, no newline) to b, without
// allocating unless a string needs escaping:
//
//	{"v":1,"time":"2026-11-25T21:52:12.514Z","kind":"flow","event":"close","node":"node1","id":7,
//	 "direction":"outbound","path":"hbone","mtls":true,
//	 "src":{"addr":"198.19.1.2:40312","workload":"client","namespace":"shop","identity":"spiffe://cluster.local/ns/shop/sa/client"},
//	 "dst":{"addr":"198.19.2.2:8080","workload":"server","namespace":"shop","identity":"spiffe://cluster.local/ns/shop/sa/server",
//	   "service":"server.shop.svc.cluster.local"},
//	 "bytes_sent":1048579,"bytes_received":1048579,"duration_ms":41.2,"response_flag":"-",
//	 "verdict":"allowed","reason":"allowed-by-policy","policy":"shop/server-allow-client","rule":0}
//
// Always present: v, time, kind, event, direction, mtls, src, dst, the
// bytes, duration_ms and response_flag; the others when not empty, rule
// with policy and audit_rule with audit_policy.
func (f *Flow) Append(b []byte) []byte {
	b = append(b, `{"v":`...)
	b = strconv.AppendInt(b, Schema, 10)
	b = append(b, `,"time":"`...)
	b = f.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","kind":`...)
	b = appendString(b, f.Kind)
	b = append(b, `,"event":`...)
	b = appendString(b, f.Event)
	b = appendField(b, "stage", f.Stage)
	b = appendField(b, "node", f.Node)
	if f.ID != 0 {
		b = append(b, `,"id":`...)
		b = strconv.AppendUint(b, f.ID, 10)
	}
	b = append(b, `,"direction":`...)
	b = appendString(b, f.Direction)
	b = appendField(b, "path", f.Path)
	b = append(b, `,"mtls":`...)
	b = strconv.AppendBool(b, f.MTLS)
	b = append(b, `,"src":`...)
	b = f.Src.append(b)
	b = append(b, `,"dst":`...)
	b = f.Dst.append(b)
	b = append(b, `,"bytes_sent":`...)
	b = strconv.AppendInt(b, f.BytesSent, 10)
	b = append(b, `,"bytes_received":`...)
	b = strconv.AppendInt(b, f.BytesReceived, 10)
	b = append(b, `,"duration_ms":`...)
	b = strconv.AppendFloat(b, f.DurationMS, 'f', -1, 64)
	b = append(b, `,"response_flag":`...)
	b = appendString(b, f.ResponseFlag)
	b = appendField(b, "verdict", f.Verdict)
	b = appendField(b, "reason", f.Reason)
	if f.Policy != "" {
		b = appendField(b, "policy", f.Policy)
		b = append(b, `,"rule":`...)
		b = strconv.AppendInt(b, int64(f.Rule), 10)
	}
	if f.AuditPolicy != "" {
		b = appendField(b, "audit_policy", f.AuditPolicy)
		b = append(b, `,"audit_rule":`...)
		b = strconv.AppendInt(b, int64(f.AuditRule), 10)
	}
	b = appendField(b, "error", f.Error)
	return append(b, '}')
}

// MarshalJSON returns Append's form. (A value receiver: encoding/json
// uses it for values as well as pointers.)
func (f Flow) MarshalJSON() ([]byte, error) { return f.Append(nil), nil }

func (e *Endpoint) append(b []byte) []byte {
	start := len(b)
	b = append(b, '{')
	if e.Addr.IsValid() {
		b = append(b, `,"addr":"`...)
		b = e.Addr.AppendTo(b)
		b = append(b, '"')
	}
	b = appendField(b, "workload", e.Workload)
	b = appendField(b, "namespace", e.Namespace)
	b = appendField(b, "identity", e.Identity)
	b = appendField(b, "service", e.Service)
	if len(b) > start+1 { // drop the first field's comma
		b = append(b[:start+1], b[start+2:]...)
	}
	return append(b, '}')
}

// appendSummary appends a Writer's summary line (no newline).
func appendSummary(b []byte, now, since time.Time, node, stream string, rateLimited, queueFull uint64) []byte {
	b = append(b, `{"v":`...)
	b = strconv.AppendInt(b, Schema, 10)
	b = append(b, `,"time":"`...)
	b = now.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, `","kind":"`+KindSuppressed+`"`...)
	b = appendField(b, "node", node)
	b = appendField(b, "stream", stream)
	b = append(b, `,"suppressed":`...)
	b = strconv.AppendUint(b, rateLimited+queueFull, 10)
	b = append(b, `,"rate_limited":`...)
	b = strconv.AppendUint(b, rateLimited, 10)
	b = append(b, `,"queue_full":`...)
	b = strconv.AppendUint(b, queueFull, 10)
	b = append(b, `,"since":"`...)
	b = since.UTC().AppendFormat(b, time.RFC3339Nano)
	return append(b, `"}`...)
}

// appendField appends ,"k":"v" unless v is empty.
func appendField(b []byte, k, v string) []byte {
	if v == "" {
		return b
	}
	b = append(b, `,"`...)
	b = append(b, k...)
	b = append(b, `":`...)
	return appendString(b, v)
}

// appendString appends s as a JSON string.
func appendString(b []byte, s string) []byte {
	// The common case (nothing to escape) is appended directly;
	// json.Marshal of a string never fails.
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c == '"' || c == '\\' || c >= 0x7f {
			q, _ := json.Marshal(s)
			return append(b, q...)
		}
	}
	b = append(b, '"')
	b = append(b, s...)
	return append(b, '"')
}
