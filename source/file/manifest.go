// Package file is the standalone source of the cluster's desired state
// (see package source): a multi-document YAML file of ordinary Kubernetes
// objects (Namespace, Pod, Node, Service, MeshPolicy, and v1 List of them)
// decoded with the Kubernetes API types, watched for changes. Parse turns
// it into a workload.Snapshot; errors name the file, the document, the
// object and the field, and say what would be valid. Kinds mantlet does not
// use are skipped with a warning, misspelt ones are errors; Options.Kinds
// claims kinds beyond the core ones (Source registers MeshPolicy).
package file

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/mantlet/mantlet/internal/workload"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// Annotations users write in the file.
const (
	// AnnotationMesh on a Namespace set to "enabled" puts the namespace's
	// pods in the mesh; on a Pod set to "disabled" takes that pod out.
	AnnotationMesh = "mantlet.io/mesh"
	// AnnotationMTLS on a Namespace, "STRICT" or "PERMISSIVE", overrides the
	// agent's default mTLS mode for the namespace's pods.
	AnnotationMTLS = "mantlet.io/mtls"
	// AnnotationTrustDomain on a Node (for all its pods) or a Pod names
	// the trust domain of the pods' identities when it is not the
	// agents' own: a federated domain whose bundle the agents are given
	// (mantlet agent --federate). The pods' own agent must be of that
	// domain.
	AnnotationTrustDomain = "mantlet.io/trust-domain"

	meshEnabled  = "enabled"
	meshDisabled = "disabled"
)

// MaxFileSize is the largest file ReadFile accepts.
const MaxFileSize = 64 << 20

// KindDecoder decodes one object of a kind that another package owns (for
// example mantlet.io MeshPolicy). Its error is reported with the object's
// location, so it should name only the field and the problem.
type KindDecoder func(obj *Object) (any, error)

// Options tune Parse. The zero value is ready to use.
type Options struct {
	// Kinds adds object kinds beyond the core ones, keyed by API group and
	// kind; their decoded values land in Manifest.Extra in file order.
	// Objects of kinds neither core nor listed here are skipped with a
	// warning, except in the groups listed here and core v1, whose every
	// kind is known: an unknown kind there (MeshPolicies) is an error that
	// suggests the kind meant.
	Kinds map[schema.GroupKind]KindDecoder
}

// Object is one Kubernetes object of the file, as handed to a KindDecoder.
type Object struct {
	// Loc says where the object is, for messages.
	Loc Location
	// APIVersion and Kind are the object's type.
	APIVersion string
	Kind       string
	// JSON is the object converted to JSON.
	JSON []byte
}

// Extra is an object of a kind registered in Options.Kinds.
type Extra struct {
	Loc   Location
	Kind  schema.GroupKind
	Value any
}

// Manifest is the parsed file.
type Manifest struct {
	// File is the name used in messages (the path's base name).
	File string
	// Snapshot holds the nodes, the pods with an IP and the services.
	Snapshot *workload.Snapshot
	// MTLS holds the mode of every namespace annotated with
	// mantlet.io/mtls.
	MTLS map[string]v1alpha1.MTLSMode
	// Extra holds the objects of kinds registered in Options.Kinds.
	Extra []Extra
	// Warnings are problems that did not stop the parse: skipped kinds,
	// unknown fields, annotations without effect. Callers log them.
	Warnings []*Error
}

// Location names an object of the file: its document (1-based, counting
// non-empty documents), its item inside a v1 List (1-based, 0 when not in
// a list), and its kind, namespace and name once known.
type Location struct {
	File      string
	Doc       int
	Item      int
	Kind      string
	Namespace string
	Name      string
}

// String renders the location as `cluster.yaml: document 3 (Pod
// shop/frontend-0)`.
func (l Location) String() string {
	var b strings.Builder
	b.WriteString(l.File)
	if l.Doc > 0 {
		b.WriteString(": document ")
		b.WriteString(strconv.Itoa(l.Doc))
	}
	if l.Item > 0 {
		b.WriteString(" item ")
		b.WriteString(strconv.Itoa(l.Item))
	}
	if l.Kind != "" {
		b.WriteString(" (")
		b.WriteString(l.Kind)
		if n := l.object(); n != "" {
			b.WriteByte(' ')
			b.WriteString(n)
		}
		b.WriteByte(')')
	}
	return b.String()
}

// object returns namespace/name, or name for cluster-scoped objects.
func (l Location) object() string {
	if l.Namespace != "" && l.Name != "" {
		return l.Namespace + "/" + l.Name
	}
	return l.Name
}

// Error is one problem of the file.
type Error struct {
	Loc Location
	// Field is the JSON path of the offending field ("status.podIP"), or
	// empty when the problem is the whole object.
	Field string
	// Value is the offending value as written, when there is one.
	Value string
	// Msg says what is wrong and, where it helps, what would be valid.
	Msg string
	// Notes are other facts about the object that may explain the problem:
	// the unknown fields it has, which are otherwise only warnings.
	Notes []string
}

// Error renders the problem as one line, e.g.
// `cluster.yaml: document 3 (Pod shop/frontend-0): status.podIP "10.0.0.300": not an IP address`.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.Loc.String())
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		if e.Value != "" {
			b.WriteByte(' ')
			b.WriteString(strconv.Quote(e.Value))
		}
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	for _, n := range e.Notes {
		b.WriteString("; note: ")
		b.WriteString(n)
	}
	return b.String()
}

// maxErrors bounds the problems one parse reports.
const maxErrors = 20

// ErrorList is every problem a parse found, in file order. Parse returns it
// as its error when there is at least one.
type ErrorList []*Error

// Error renders one problem per line.
func (l ErrorList) Error() string {
	var b strings.Builder
	for i, e := range l {
		if i > 0 {
			b.WriteByte('\n')
		}
		if i == maxErrors {
			fmt.Fprintf(&b, "%s: %d more problems not shown", e.Loc.File, len(l)-maxErrors)
			break
		}
		b.WriteString(e.Error())
	}
	return b.String()
}

// Unwrap returns the problems, so errors.As finds an *Error.
func (l ErrorList) Unwrap() []error {
	out := make([]error, len(l))
	for i, e := range l {
		out[i] = e
	}
	return out
}

// ReadFile reads and parses the file at path. Messages name the file by its
// base name.
func ReadFile(path string, opts Options) (*Manifest, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("manifest: read %s: %w", path, err)
	}
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("manifest: %s: larger than %d MiB", path, MaxFileSize>>20)
	}
	return Parse(filepath.Base(path), data, opts)
}
