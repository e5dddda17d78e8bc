package file

import (
	"bytes"
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"sigs.k8s.io/yaml"
)

// coreScheme knows every kind of core/v1, read by mantlet or not.
var coreScheme = func() *runtime.Scheme {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		panic("manifest: core/v1 scheme: " + err.Error())
	}
	return scheme
}()

// decoder decodes core/v1 objects. It is strict: unknown and duplicate
// fields come back as a strict-decoding error next to the decoded object,
// which Parse reports as warnings (a newer Kubernetes may add fields).
var decoder = serializer.NewCodecFactory(coreScheme, serializer.EnableStrict).UniversalDeserializer()

// coreKinds are the core/v1 kinds mantlet reads, listed in messages.
const coreKinds = "v1 Namespace, Pod, Node, Service and List"

// parser carries one Parse call's state.
type parser struct {
	file     string
	opts     Options
	errs     ErrorList
	warnings []*Error
	// unknown holds the unknown fields: when the file has errors they
	// are noted on the errors of their object, since a misspelt field is
	// often why another one is reported missing.
	unknown []*Error

	namespaces []located[corev1.Namespace]
	pods       []located[Pod]
	nodes      []located[corev1.Node]
	services   []located[corev1.Service]
	extra      []Extra

	// lenient turns problems into warnings that drop the object they are
	// about (BuildObjects); endpoints replaces services' selectors with
	// ready endpoints (pod UIDs by "namespace/name").
	lenient   bool
	endpoints map[string][]string
	// podByUID holds the snapshot's pods by UID, with endpoints.
	podByUID map[string]indexedPod
	// cache, if not nil, keeps pods' workloads from build to build.
	cache *PodCache
}

// indexedPod is a pod of the snapshot and its place in it.
type indexedPod struct {
	pod *Pod
	i   int
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

// NoObjects is the message of the problem Parse reports for a file
// without a single object: empty, or only blanks, comments and
// separators. Such a file is never valid: it is what a file being
// rewritten in place looks like (a shell's `>` truncates it before the
// writer starts), and applying it would take every pod out of the mesh. A
// cluster without objects is written as an empty List.
const NoObjects = "no objects: the file is empty or holds only comments; it is never applied, since a file being rewritten looks like that " +
	"(to run without any object on purpose, write an empty List: {apiVersion: v1, kind: List, items: []})"

// Parse parses data, the contents of the file named file (used in
// messages). On any problem it returns an ErrorList naming each. A file
// must hold at least one object (a document that is not blank or only
// comments; an empty List counts): see NoObjects.
func Parse(file string, data []byte, opts Options) (*Manifest, error) {
	p := &parser{file: file, opts: opts}
	doc := 0
	for _, raw := range splitDocuments(data) {
		js, err := yaml.YAMLToJSON(raw.data)
		if err != nil {
			doc++
			p.errorf(Location{File: file, Doc: doc}, "", "", "not valid YAML: %s", fileLines(trimYAMLError(err), raw.line-1))
			continue
		}
		if t := bytes.TrimSpace(js); len(t) == 0 || string(t) == "null" {
			continue // only comments or blanks
		}
		doc++
		p.object(Location{File: file, Doc: doc}, js)
	}
	if doc == 0 {
		p.errorf(Location{File: file}, "", "", "%s", NoObjects)
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
		p.foldUnknownFields()
		return nil, p.errs
	}
	return m, nil
}

// foldUnknownFields notes each unknown field on the first error of its
// object: the warnings are not shown otherwise when the file is rejected.
func (p *parser) foldUnknownFields() {
	for _, u := range p.unknown {
		for _, e := range p.errs {
			if e.Loc.Doc == u.Loc.Doc && e.Loc.Item == u.Loc.Item {
				e.Notes = append(e.Notes, u.Msg)
				break
			}
		}
	}
}

// document is one YAML document of the file and the file's line it
// starts on (1-based).
type document struct {
	data []byte
	line int
}

// splitDocuments cuts a YAML stream at its "---" lines.
func splitDocuments(data []byte) []document {
	var docs []document
	start, startLine, line := 0, 1, 1
	for off := 0; off < len(data); line++ {
		end := bytes.IndexByte(data[off:], '\n')
		next := len(data)
		if end >= 0 {
			next = off + end + 1
		}
		if isSeparator(data[off:next]) {
			docs = append(docs, document{data[start:off], startLine})
			start, startLine = next, line+1
		}
		off = next
	}
	return append(docs, document{data[start:], startLine})
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

var yamlLine = regexp.MustCompile(`\bline ([0-9]+)\b`)

// fileLines turns the line numbers of a YAML error, which count from the
// start of its document, into lines of the file.
func fileLines(msg string, offset int) string {
	if offset == 0 {
		return msg
	}
	return yamlLine.ReplaceAllStringFunc(msg, func(s string) string {
		n, err := strconv.Atoi(strings.TrimPrefix(s, "line "))
		if err != nil {
			return s
		}
		return "line " + strconv.Itoa(n+offset)
	})
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
		p.errorf(loc, "kind", "", "missing (mantlet reads %s; objects of other kinds are skipped)", p.readKinds())
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
		p.otherKind(loc, h.APIVersion, gk)
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
			p.unknown = append(p.unknown, &Error{Loc: loc, Msg: fmt.Sprintf("%v was ignored", e)})
		}
		err = nil
	}
	if err != nil {
		p.errorf(loc, "", "", "cannot decode: %v", trimDecodeError(err))
		return
	}
	p.typed(loc, obj)
}

// otherKind handles an object of a kind mantlet does not read. Most are
// skipped with a warning (a ConfigMap, an apps/v1 Deployment). It is an
// error when the object is probably one mantlet would read, misspelt:
// a kind that does not exist in a group mantlet reads (core v1, and the
// groups of Options.Kinds: mantlet.io MeshPolicies), or a kind mantlet
// reads from core v1 under a Kubernetes API group (apps/v1 Pod).
// Skipping those would silently drop a policy or leave a pod unmeshed.
func (p *parser) otherKind(loc Location, apiVersion string, gk schema.GroupKind) {
	if isCoreKind(gk.Kind) && (p.ownsGroup(gk.Group) || kubernetesGroup(gk.Group)) {
		p.errorf(loc, "apiVersion", apiVersion, "want \"v1\" for %s", gk.Kind)
		return
	}
	if !p.ownsGroup(gk.Group) || (gk.Group == "" && coreScheme.Recognizes(corev1.SchemeGroupVersion.WithKind(gk.Kind))) {
		p.warnf(loc, "", "", "skipped: mantlet does not read %s %s (it reads %s)", apiVersion, gk.Kind, p.readKinds())
		return
	}
	group := "core v1"
	if gk.Group != "" {
		group = "group " + gk.Group
	}
	// The kinds mantlet reads come first: a near miss of one of them is
	// the likely intent.
	var same []string
	if gk.Group == "" {
		same = []string{"Namespace", "Pod", "Node", "Service", "List", "NamespaceList", "PodList", "NodeList", "ServiceList"}
	}
	same = append(same, p.registered(gk.Group)...)
	if s := suggestKind(gk.Kind, same); s != "" {
		p.errorf(loc, "kind", gk.Kind, "%s has no such kind; did you mean %s?", group, s)
		return
	}
	if gk.Group == "" {
		var all []string
		for k := range coreScheme.KnownTypes(corev1.SchemeGroupVersion) {
			all = append(all, k)
		}
		sort.Strings(all)
		if s := suggestKind(gk.Kind, all); s != "" {
			p.errorf(loc, "kind", gk.Kind, "%s has no such kind; did you mean %s?", group, s)
			return
		}
	}
	for k := range p.opts.Kinds {
		if k.Group != gk.Group && strings.EqualFold(k.Kind, gk.Kind) {
			p.errorf(loc, "kind", gk.Kind, "%s has no such kind; %s is a kind of group %s (apiVersion %s/<version>)", group, k.Kind, k.Group, k.Group)
			return
		}
	}
	p.errorf(loc, "kind", gk.Kind, "%s has no such kind (mantlet reads %s)", group, p.readKinds())
}

// registered returns the kinds of group in Options.Kinds, sorted.
func (p *parser) registered(group string) []string {
	var kinds []string
	for k := range p.opts.Kinds {
		if k.Group == group {
			kinds = append(kinds, k.Kind)
		}
	}
	sort.Strings(kinds)
	return kinds
}

// ownsGroup says whether every kind of group is known: core v1, whose
// kinds the Kubernetes API types list, and the groups of Options.Kinds.
func (p *parser) ownsGroup(group string) bool {
	if group == "" {
		return true
	}
	for k := range p.opts.Kinds {
		if k.Group == group {
			return true
		}
	}
	return false
}

// kubernetesGroup says whether group is one of Kubernetes' own API groups
// (apps, batch, networking.k8s.io, ...), none of which has a kind named
// like a core kind. Other groups may (Knative's serving.knative.dev has a
// Service): their objects are skipped.
func kubernetesGroup(group string) bool {
	return !strings.Contains(group, ".") || group == "k8s.io" || strings.HasSuffix(group, ".k8s.io")
}

// readKinds lists the kinds mantlet reads, for messages: "v1 Namespace,
// Pod, Node, Service and List, and mantlet.io MeshPolicy".
func (p *parser) readKinds() string {
	groups := map[string]bool{}
	for k := range p.opts.Kinds {
		groups[k.Group] = true
	}
	names := make([]string, 0, len(groups))
	for g := range groups {
		names = append(names, g)
	}
	sort.Strings(names)
	var b strings.Builder
	b.WriteString(coreKinds)
	for _, g := range names {
		b.WriteString(", and ")
		if g != "" {
			b.WriteString(g)
			b.WriteByte(' ')
		}
		b.WriteString(strings.Join(p.registered(g), ", "))
	}
	return b.String()
}

// suggestKind returns the candidate that kind is probably a misspelling
// of: the same ignoring case or a plural ending, or within an edit or two
// of it; "" when none is that close. Earlier candidates win ties.
func suggestKind(kind string, candidates []string) string {
	k := strings.ToLower(kind)
	forms := []string{k}
	for _, suffix := range []string{"s", "es"} {
		if t, ok := strings.CutSuffix(k, suffix); ok {
			forms = append(forms, t)
		}
	}
	if t, ok := strings.CutSuffix(k, "ies"); ok {
		forms = append(forms, t+"y")
	}
	best, bestDist := "", 3
	for _, c := range candidates {
		lc := strings.ToLower(c)
		limit := 2
		if len(lc) <= 4 {
			limit = 1
		}
		for _, f := range forms {
			if d := editDistance(f, lc); d <= limit && d < bestDist {
				best, bestDist = c, d
			}
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b (bytes).
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
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
		p.pods = append(p.pods, located[Pod]{loc, PodOf(o)})
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
