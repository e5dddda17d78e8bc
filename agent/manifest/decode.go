package manifest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"sigs.k8s.io/yaml"
)

// decoder decodes core/v1 objects. It is strict: unknown and duplicate
// fields come back as a strict-decoding error next to the decoded object,
// which Parse reports as warnings (a newer Kubernetes may add fields).
var decoder = func() runtime.Decoder {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		panic("manifest: core/v1 scheme: " + err.Error())
	}
	return serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
}()

// coreKinds are the core/v1 kinds mantlet reads, listed in messages.
const coreKinds = "Namespace, Pod, Node, Service or List"

// parser carries one Parse call's state.
type parser struct {
	file     string
	opts     Options
	errs     ErrorList
	warnings []*Error

	namespaces []located[corev1.Namespace]
	pods       []located[corev1.Pod]
	nodes      []located[corev1.Node]
	services   []located[corev1.Service]
	extra      []Extra
}

type located[T any] struct {
	loc Location
	obj *T
}

func (p *parser) errorf(loc Location, field, value, format string, args ...any) {
	p.errs = append(p.errs, &Error{Loc: loc, Field: field, Value: value, Msg: fmt.Sprintf(format, args...)})
}

func (p *parser) warnf(loc Location, field, value, format string, args ...any) {
	p.warnings = append(p.warnings, &Error{Loc: loc, Field: field, Value: value, Msg: fmt.Sprintf(format, args...)})
}

// Parse parses data, the contents of the file named file (used in
// messages). On any problem it returns an ErrorList naming each.
func Parse(file string, data []byte, opts Options) (*Manifest, error) {
	p := &parser{file: file, opts: opts}
	doc := 0
	for _, raw := range splitDocuments(data) {
		js, err := yaml.YAMLToJSON(raw)
		if err != nil {
			doc++
			p.errorf(Location{File: file, Doc: doc}, "", "", "not valid YAML: %v", trimYAMLError(err))
			continue
		}
		if t := bytes.TrimSpace(js); len(t) == 0 || string(t) == "null" {
			continue // only comments or blanks
		}
		doc++
		p.object(Location{File: file, Doc: doc}, js)
	}
	var m *Manifest
	if len(p.errs) == 0 {
		m = p.build()
	}
	if len(p.errs) > 0 {
		sort.SliceStable(p.errs, func(i, j int) bool {
			a, b := p.errs[i].Loc, p.errs[j].Loc
			if a.Doc != b.Doc {
				return a.Doc < b.Doc
			}
			return a.Item < b.Item
		})
		return nil, p.errs
	}
	return m, nil
}

// splitDocuments cuts a YAML stream at its "---" lines.
func splitDocuments(data []byte) [][]byte {
	var docs [][]byte
	start := 0
	for off := 0; off < len(data); {
		end := bytes.IndexByte(data[off:], '\n')
		next := len(data)
		if end >= 0 {
			next = off + end + 1
		}
		line := data[off:next]
		if isSeparator(line) {
			docs = append(docs, data[start:off])
			start = next
		}
		off = next
	}
	return append(docs, data[start:])
}

func isSeparator(line []byte) bool {
	if !bytes.HasPrefix(line, []byte("---")) {
		return false
	}
	rest := bytes.TrimSpace(line[3:])
	return len(rest) == 0 || rest[0] == '#'
}

// trimYAMLError drops the converter's generic prefix from YAML errors.
func trimYAMLError(err error) string {
	s := err.Error()
	s = strings.TrimPrefix(s, "error converting YAML to JSON: ")
	return strings.TrimPrefix(s, "yaml: ")
}

// header is what every object is read for before its kind is known.
type header struct {
	APIVersion string
	Kind       string
	Name       string
	Namespace  string
}

func readHeader(js []byte) (header, bool) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(js, &top); err != nil {
		return header{}, false
	}
	var h header
	_ = json.Unmarshal(top["apiVersion"], &h.APIVersion)
	_ = json.Unmarshal(top["kind"], &h.Kind)
	var meta map[string]json.RawMessage
	if json.Unmarshal(top["metadata"], &meta) == nil {
		_ = json.Unmarshal(meta["name"], &h.Name)
		_ = json.Unmarshal(meta["namespace"], &h.Namespace)
	}
	return h, true
}

// namespaced kinds get "default" when metadata.namespace is empty.
func namespaced(kind string) bool { return kind == "Pod" || kind == "Service" }

// object handles one object (a document, or an item of a List).
func (p *parser) object(loc Location, js []byte) {
	h, ok := readHeader(js)
	if !ok {
		p.errorf(loc, "", "", "not a Kubernetes object: want a mapping with apiVersion, kind and metadata")
		return
	}
	loc.Kind, loc.Name = h.Kind, h.Name
	if h.Kind == "" {
		p.errorf(loc, "kind", "", "missing (want one of %s, or another kind to be skipped)", coreKinds)
		return
	}
	loc.Namespace = h.Namespace
	if namespaced(h.Kind) && loc.Namespace == "" {
		loc.Namespace = "default"
	} else if h.Kind == "Namespace" || h.Kind == "Node" {
		loc.Namespace = "" // cluster-scoped: metadata.namespace means nothing
	}
	if h.APIVersion == "" {
		p.errorf(loc, "apiVersion", "", "missing (want \"v1\" for core kinds)")
		return
	}
	gv, err := schema.ParseGroupVersion(h.APIVersion)
	if err != nil {
		p.errorf(loc, "apiVersion", h.APIVersion, "not a group/version (want \"v1\" for core kinds)")
		return
	}
	gk := schema.GroupKind{Group: gv.Group, Kind: h.Kind}
	if dec, ok := p.opts.Kinds[gk]; ok {
		v, err := dec(&Object{Loc: loc, APIVersion: h.APIVersion, Kind: h.Kind, JSON: js})
		if err != nil {
			p.errorf(loc, "", "", "%v", err)
			return
		}
		p.extra = append(p.extra, Extra{Loc: loc, Kind: gk, Value: v})
		return
	}
	if gv.Group != "" || !isCoreKind(h.Kind) {
		p.warnf(loc, "", "", "skipped: mantlet reads %s objects of apiVersion v1, not %s %s", coreKinds, h.APIVersion, h.Kind)
		return
	}
	if gv.Version != "v1" {
		p.errorf(loc, "apiVersion", h.APIVersion, "want \"v1\" for %s", h.Kind)
		return
	}
	if h.Kind == "List" {
		p.list(loc, js)
		return
	}
	obj, _, err := decoder.Decode(js, nil, nil)
	if strict, ok := runtime.AsStrictDecodingError(err); ok {
		for _, e := range strict.Errors() {
			p.warnf(loc, "", "", "%v (ignored)", e)
		}
		err = nil
	}
	if err != nil {
		p.errorf(loc, "", "", "cannot decode: %v", trimDecodeError(err))
		return
	}
	p.typed(loc, obj)
}

func isCoreKind(kind string) bool {
	switch kind {
	case "Namespace", "Pod", "Node", "Service", "List",
		"NamespaceList", "PodList", "NodeList", "ServiceList":
		return true
	}
	return false
}

// trimDecodeError drops noise that Kubernetes' decoders put around errors
// and explains YAML's surprising scalars.
func trimDecodeError(err error) string {
	s := err.Error()
	if i := strings.Index(s, "json: "); i >= 0 {
		s = s[i+len("json: "):]
	}
	if strings.HasSuffix(s, "of type string") {
		switch {
		case strings.Contains(s, "unmarshal bool"):
			s += ` (YAML reads y, n, yes, no, on, off, true and false as booleans: quote the value, e.g. "no")`
		case strings.Contains(s, "unmarshal number"):
			s += " (quote the value to make it a string)"
		}
	}
	return s
}

// typed files a decoded core object.
func (p *parser) typed(loc Location, obj runtime.Object) {
	switch o := obj.(type) {
	case *corev1.Namespace:
		p.namespaces = append(p.namespaces, located[corev1.Namespace]{loc, o})
	case *corev1.Pod:
		p.pods = append(p.pods, located[corev1.Pod]{loc, o})
	case *corev1.Node:
		p.nodes = append(p.nodes, located[corev1.Node]{loc, o})
	case *corev1.Service:
		p.services = append(p.services, located[corev1.Service]{loc, o})
	case *corev1.NamespaceList:
		for i := range o.Items {
			p.typed(itemLoc(loc, i, "Namespace", &o.Items[i].ObjectMeta.Name, nil), &o.Items[i])
		}
	case *corev1.PodList:
		for i := range o.Items {
			p.typed(itemLoc(loc, i, "Pod", &o.Items[i].Name, &o.Items[i].Namespace), &o.Items[i])
		}
	case *corev1.NodeList:
		for i := range o.Items {
			p.typed(itemLoc(loc, i, "Node", &o.Items[i].Name, nil), &o.Items[i])
		}
	case *corev1.ServiceList:
		for i := range o.Items {
			p.typed(itemLoc(loc, i, "Service", &o.Items[i].Name, &o.Items[i].Namespace), &o.Items[i])
		}
	default:
		p.warnf(loc, "", "", "skipped: mantlet does not read %T objects", obj)
	}
}

func itemLoc(list Location, i int, kind string, name, ns *string) Location {
	loc := Location{File: list.File, Doc: list.Doc, Item: i + 1, Kind: kind, Name: *name}
	if ns != nil {
		loc.Namespace = *ns
		if loc.Namespace == "" {
			loc.Namespace = "default"
		}
	}
	return loc
}

// list expands a v1 List (what `kubectl get -o yaml` prints) into its items.
func (p *parser) list(loc Location, js []byte) {
	var l struct {
		Items []json.RawMessage `json:"items"`
	}
	if err := json.Unmarshal(js, &l); err != nil {
		p.errorf(loc, "items", "", "want a list of objects: %v", trimDecodeError(err))
		return
	}
	if loc.Item > 0 {
		p.errorf(loc, "", "", "a List inside a List is not supported")
		return
	}
	for i, item := range l.Items {
		p.object(Location{File: loc.File, Doc: loc.Doc, Item: i + 1}, item)
	}
}
