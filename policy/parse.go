package policy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// APIVersion is the apiVersion of MeshPolicy documents.
var APIVersion = v1alpha1.SchemeGroupVersion.String()

// Parse reads a stream of YAML (or JSON) documents separated by "---",
// keeps the MeshPolicy ones and skips documents of other kinds, so it
// accepts the same multi-object file the agent reads. Each MeshPolicy is
// decoded strictly (unknown or duplicate fields are errors) and validated.
// On any error Parse returns no policies and an error naming the document
// (1-based) and, for invalid policies, every field at fault; it wraps
// ErrInvalid.
func Parse(data []byte) ([]*v1alpha1.MeshPolicy, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []*v1alpha1.MeshPolicy
	var errs []error
	for doc := 1; ; doc++ {
		raw, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("policy: read document %d: %w: %w", doc, ErrInvalid, err)
		}
		if len(bytes.TrimSpace(raw)) == 0 {
			continue
		}
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(raw, &tm); err != nil {
			errs = append(errs, fmt.Errorf("document %d: %w: %w", doc, ErrInvalid, err))
			continue
		}
		if tm.Kind != v1alpha1.Kind {
			continue
		}
		p, err := ParseDocument(raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("document %d: %w", doc, err))
			continue
		}
		out = append(out, p)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("policy: parse: %w", errors.Join(errs...))
	}
	return out, nil
}

// ParseDocument decodes one YAML or JSON MeshPolicy document strictly and
// validates it. Errors wrap ErrInvalid; a policy that decodes but is
// invalid yields a *ValidationError.
func ParseDocument(raw []byte) (*v1alpha1.MeshPolicy, error) {
	js, err := yaml.YAMLToJSONStrict(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	var p v1alpha1.MeshPolicy
	// Case-sensitive, like the Kubernetes API server: "Action" is not
	// "action".
	strict, err := kjson.UnmarshalStrict(js, &p)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	if len(strict) > 0 {
		return nil, fmt.Errorf("%w: %w", ErrInvalid, errors.Join(strict...))
	}
	if p.APIVersion != APIVersion || p.Kind != v1alpha1.Kind {
		return nil, fmt.Errorf("%w: apiVersion %q kind %q: want apiVersion %s, kind %s", ErrInvalid, p.APIVersion, p.Kind, APIVersion, v1alpha1.Kind)
	}
	if err := Validate(&p); err != nil {
		return nil, err
	}
	return &p, nil
}
