package policy_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/mantlet/mantlet/internal/kubetest"
	"github.com/mantlet/mantlet/policy"
	"github.com/mantlet/mantlet/policy/v1alpha1"
)

// crdFile is the MeshPolicy CustomResourceDefinition that `make generate`
// writes from the markers of package v1alpha1.
const crdFile = "../deploy/charts/mantlet/crds/mantlet.io_meshpolicies.yaml"

var (
	crdResource  = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}
	meshPolicies = v1alpha1.SchemeGroupVersion.WithResource("meshpolicies")
)

func readCRD(t testing.TB) *apiextensionsv1.CustomResourceDefinition {
	t.Helper()
	raw, err := os.ReadFile(crdFile)
	if err != nil {
		t.Fatalf("the MeshPolicy CRD (make generate): %v", err)
	}
	var crd apiextensionsv1.CustomResourceDefinition
	if err := yaml.UnmarshalStrict(raw, &crd); err != nil {
		t.Fatalf("%s: %v", crdFile, err)
	}
	return &crd
}

// schemaAt walks a CRD schema down a path such as "spec.rules[].from";
// "[]" steps into the items of a list.
func schemaAt(t testing.TB, s *apiextensionsv1.JSONSchemaProps, path string) *apiextensionsv1.JSONSchemaProps {
	t.Helper()
	for _, part := range strings.Split(path, ".") {
		name, items := strings.CutSuffix(part, "[]")
		p, ok := s.Properties[name]
		if !ok {
			t.Fatalf("the CRD schema has no %s (at %q)", path, name)
		}
		s = &p
		if items {
			if s.Items == nil || s.Items.Schema == nil {
				t.Fatalf("the CRD schema's %s is not a list", path)
			}
			s = s.Items.Schema
		}
	}
	return s
}

// TestCRDDeclaresTheAPI checks, without an API server, what the generated
// CRD says about the resource: names, scope, the status subresource, the
// printer columns, and the limits that package policy enforces too.
func TestCRDDeclaresTheAPI(t *testing.T) {
	crd := readCRD(t)
	if crd.Name != "meshpolicies.mantlet.io" || crd.Spec.Group != v1alpha1.GroupName || crd.Spec.Scope != apiextensionsv1.NamespaceScoped {
		t.Errorf("name %s, group %s, scope %s; want meshpolicies.mantlet.io, %s, Namespaced", crd.Name, crd.Spec.Group, crd.Spec.Scope, v1alpha1.GroupName)
	}
	n := crd.Spec.Names
	if n.Kind != v1alpha1.Kind || n.ListKind != v1alpha1.ListKind || n.Plural != "meshpolicies" || n.Singular != "meshpolicy" ||
		!slices.Equal(n.ShortNames, []string{"mp"}) || !slices.Equal(n.Categories, []string{"mantlet"}) {
		t.Errorf("names = %+v", n)
	}
	if len(crd.Spec.Versions) != 1 {
		t.Fatalf("%d versions, want 1", len(crd.Spec.Versions))
	}
	v := crd.Spec.Versions[0]
	if v.Name != "v1alpha1" || !v.Served || !v.Storage {
		t.Errorf("version %s served %v storage %v; want v1alpha1, served, storage", v.Name, v.Served, v.Storage)
	}
	if v.Subresources == nil || v.Subresources.Status == nil || v.Subresources.Scale != nil {
		t.Errorf("subresources = %+v; want status only", v.Subresources)
	}
	var cols []string
	for _, c := range v.AdditionalPrinterColumns {
		cols = append(cols, fmt.Sprintf("%s=%s(%d)", c.Name, c.JSONPath, c.Priority))
	}
	want := []string{
		"Action=.spec.action(0)",
		"mTLS=.spec.mtls(0)",
		`Accepted=.status.conditions[?(@.type=="Accepted")].status(0)`,
		`Reason=.status.conditions[?(@.type=="Accepted")].reason(1)`,
		"Age=.metadata.creationTimestamp(0)",
	}
	if !slices.Equal(cols, want) {
		t.Errorf("printer columns:\n got %q\nwant %q", cols, want)
	}

	root := v.Schema.OpenAPIV3Schema
	for _, l := range []struct {
		path  string
		limit int
	}{
		{"spec.rules", v1alpha1.MaxRules},
		{"spec.rules[].from", v1alpha1.MaxSources},
		{"spec.rules[].from[].ipBlocks", v1alpha1.MaxIPBlocks},
		{"spec.rules[].from[].notIpBlocks", v1alpha1.MaxIPBlocks},
		{"spec.rules[].from[].ipBlocks[].except", v1alpha1.MaxExcepts},
		{"spec.rules[].from[].notIpBlocks[].except", v1alpha1.MaxExcepts},
		{"spec.rules[].to.ports", v1alpha1.MaxPorts},
		{"spec.rules[].to.notPorts", v1alpha1.MaxPorts},
	} {
		if s := schemaAt(t, root, l.path); s.MaxItems == nil || *s.MaxItems != int64(l.limit) {
			t.Errorf("%s: maxItems %v, want %d as package v1alpha1 says", l.path, s.MaxItems, l.limit)
		}
	}
	for _, path := range []string{"spec.rules[].to.ports[]", "spec.rules[].to.notPorts[]"} {
		s := schemaAt(t, root, strings.TrimSuffix(path, "[]"))
		if s = s.Items.Schema; s.MaxLength == nil || *s.MaxLength != v1alpha1.MaxPortLength {
			t.Errorf("%s: maxLength %v, want %d as package v1alpha1 says", path, s.MaxLength, v1alpha1.MaxPortLength)
		}
	}
}

// crdServer is a real API server with the MeshPolicy CRD installed.
type crdServer struct {
	s     *kubetest.Server
	dyn   dynamic.Interface
	admin kubernetes.Interface
	nss   map[string]bool
}

func startWithCRD(t *testing.T) *crdServer {
	t.Helper()
	ctx := t.Context()
	s := kubetest.Start(ctx, t, kubetest.Options{})
	dyn, err := dynamic.NewForConfig(s.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(crdFile)
	if err != nil {
		t.Fatalf("the MeshPolicy CRD (make generate): %v", err)
	}
	var obj map[string]any
	if err := yaml.Unmarshal(raw, &obj); err != nil {
		t.Fatalf("%s: %v", crdFile, err)
	}
	if _, err := dyn.Resource(crdResource).Create(ctx, &unstructured.Unstructured{Object: obj}, metav1.CreateOptions{}); err != nil {
		t.Fatalf("the API server refused the CRD: %v", err)
	}
	// Established, and then served: the first requests after Established
	// can still find no handler.
	start := time.Now()
	for {
		_, err := dyn.Resource(meshPolicies).Namespace("default").List(ctx, metav1.ListOptions{})
		if err == nil {
			break
		}
		if time.Since(start) > time.Minute {
			t.Fatalf("MeshPolicies not served a minute after the CRD was created: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("MeshPolicy CRD served after %v", time.Since(start).Round(time.Millisecond))
	return &crdServer{s: s, dyn: dyn, admin: s.Admin(), nss: map[string]bool{"default": true}}
}

// create creates a MeshPolicy from a YAML or JSON document, decoded
// strictly (an unknown field is an error, as for policy.ParseDocument);
// dryRun runs admission (schema, CEL rules) without storing anything.
func (c *crdServer) create(ctx context.Context, doc []byte, dryRun bool) (*unstructured.Unstructured, error) {
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		return nil, err
	}
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON(js); err != nil {
		return nil, err
	}
	if ns := u.GetNamespace(); ns != "" && !c.nss[ns] {
		_, err := c.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			return nil, fmt.Errorf("namespace %s: %w", ns, err)
		}
		c.nss[ns] = true
	}
	opts := metav1.CreateOptions{FieldValidation: metav1.FieldValidationStrict}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	return c.dyn.Resource(meshPolicies).Namespace(u.GetNamespace()).Create(ctx, u, opts)
}

// specDoc is a MeshPolicy document shop/<name> with the given spec (YAML).
func specDoc(name, spec string) []byte {
	return fmt.Appendf(nil, "apiVersion: mantlet.io/v1alpha1\nkind: MeshPolicy\nmetadata: {namespace: shop, name: %s}\nspec: %s\n", name, spec)
}

// TestMeshPolicyCRD installs the generated CRD into a real kube-apiserver
// (internal/kubetest) and checks admission against the Go validation, the
// printer columns and the status subresource.
func TestMeshPolicyCRD(t *testing.T) {
	c := startWithCRD(t)
	t.Run("admits every policy the tests of package policy accept", c.admitsWhatGoAccepts)
	t.Run("admits the edge cases Go accepts", c.admitsEdgeCases)
	t.Run("refuses bad values naming the field", c.refusesBadValues)
	t.Run("leaves deeper checks to the agent", c.leavesToTheAgent)
	t.Run("printer columns and the status subresource", c.columnsAndStatus)
}

// sample is one MeshPolicy document and where it comes from.
type sample struct {
	from string
	doc  []byte
}

// admitsWhatGoAccepts hands the API server every MeshPolicy document of
// the tests of package policy (and policy sets of FuzzDecide's generator):
// every one policy.ParseDocument accepts must be admitted.
func (c *crdServer) admitsWhatGoAccepts(t *testing.T) {
	ctx := t.Context()
	samples := testTableDocuments(t)
	rng := rand.New(rand.NewPCG(10, 10))
	for i := range 48 {
		data := make([]byte, 96)
		for j := range data {
			data[j] = byte(rng.Uint32())
		}
		for _, p := range policy.GenPolicies(data) {
			p.APIVersion, p.Kind = policy.APIVersion, v1alpha1.Kind
			js, err := json.Marshal(p)
			if err != nil {
				t.Fatal(err)
			}
			samples = append(samples, sample{fmt.Sprintf("FuzzDecide's generator, set %d", i), js})
		}
	}
	var accepted, admitted, rejected, refusedToo int
	for _, s := range samples {
		_, goErr := policy.ParseDocument(s.doc)
		_, apiErr := c.create(ctx, s.doc, true)
		switch {
		case goErr == nil && apiErr != nil:
			accepted++
			t.Errorf("%s: Go accepts, the API server refuses: %v\n%s", s.from, apiErr, s.doc)
		case goErr == nil:
			accepted++
			admitted++
		default:
			rejected++
			if apiErr != nil {
				refusedToo++
			}
		}
	}
	t.Logf("%d documents: Go accepts %d, admitted %d; Go rejects %d, admission refuses %d of those", len(samples), accepted, admitted, rejected, refusedToo)
	// The extraction must keep finding the tables.
	if accepted < 150 || rejected < 10 {
		t.Errorf("found only %d documents Go accepts and %d it rejects; has the extraction from the tests broken?", accepted, rejected)
	}
}

// testTableDocuments collects the MeshPolicy documents of the tests of
// package policy: the string literals (and constant expressions) of its
// _test.go files in the three shapes they use — "ns/name {spec}" (pol,
// testEngine), "{spec}" (TestValidateErrors) and whole documents
// (TestParseErrors) — the YAML files of testdata/ and the FuzzParse seed
// corpus.
func testTableDocuments(t *testing.T) []sample {
	t.Helper()
	var out []sample
	seen := map[string]bool{}
	add := func(from string, doc []byte) {
		if !seen[string(doc)] {
			seen[string(doc)] = true
			out = append(out, sample{from, doc})
		}
	}
	files, err := filepath.Glob("*_test.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		if f == "crd_test.go" || f == "export_test.go" {
			continue
		}
		for _, lit := range stringConstants(t, f) {
			key, spec, _ := strings.Cut(lit.s, " ")
			ns, name, isKey := strings.Cut(key, "/")
			switch {
			case isKey && isName(ns) && isName(name) && strings.HasPrefix(spec, "{"):
				add(lit.pos, fmt.Appendf(nil, "apiVersion: mantlet.io/v1alpha1\nkind: MeshPolicy\nmetadata: {namespace: %s, name: %s}\nspec: %s\n", ns, name, spec))
			case strings.HasPrefix(lit.s, "{") && strings.HasSuffix(lit.s, "}"):
				add(lit.pos, specDoc("p", lit.s))
			case strings.Contains(lit.s, "kind: MeshPolicy"):
				for i, doc := range meshPolicyDocuments(lit.s) {
					add(fmt.Sprintf("%s document %d", lit.pos, i+1), doc)
				}
			}
		}
	}
	yamls, err := filepath.Glob("testdata/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	seeds, err := filepath.Glob("testdata/fuzz/FuzzParse/*")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range append(yamls, seeds...) {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		text := string(raw)
		if strings.HasPrefix(text, "go test fuzz v1\n") {
			lit := strings.TrimSpace(strings.TrimPrefix(text, "go test fuzz v1\n"))
			lit, ok := strings.CutPrefix(lit, "[]byte(")
			if text, err = strconv.Unquote(strings.TrimSuffix(lit, ")")); !ok || err != nil {
				t.Fatalf("%s: not a seed of []byte: %v", f, err)
			}
		}
		for i, doc := range meshPolicyDocuments(text) {
			add(fmt.Sprintf("%s document %d", f, i+1), doc)
		}
	}
	return out
}

func isName(s string) bool {
	return s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyz0123456789-.") == ""
}

// meshPolicyDocuments splits a YAML stream and keeps the documents of
// kind MeshPolicy, as policy.Parse does.
func meshPolicyDocuments(s string) [][]byte {
	var out [][]byte
	r := utilyaml.NewYAMLReader(bufio.NewReader(strings.NewReader(s)))
	for {
		doc, err := r.Read()
		if err != nil {
			return out
		}
		var tm metav1.TypeMeta
		if yaml.Unmarshal(doc, &tm) == nil && tm.Kind == v1alpha1.Kind {
			out = append(out, doc)
		}
	}
}

type literal struct{ pos, s string }

// stringConstants returns the values of the string literals and of the
// constant string expressions (literals and constants joined by +) in a Go
// file.
func stringConstants(t *testing.T, file string) []literal {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, file, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	consts := map[string]ast.Expr{}
	ast.Inspect(f, func(n ast.Node) bool {
		if d, ok := n.(*ast.GenDecl); ok && d.Tok == token.CONST {
			for _, spec := range d.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, name := range vs.Names {
					if i < len(vs.Values) {
						consts[name.Name] = vs.Values[i] // a name used twice keeps one value: good enough here
					}
				}
			}
		}
		return true
	})
	var eval func(e ast.Expr, depth int) (string, bool)
	eval = func(e ast.Expr, depth int) (string, bool) {
		if depth > 10 {
			return "", false
		}
		switch e := e.(type) {
		case *ast.BasicLit:
			if e.Kind != token.STRING {
				return "", false
			}
			s, err := strconv.Unquote(e.Value)
			return s, err == nil
		case *ast.Ident:
			if v, ok := consts[e.Name]; ok {
				return eval(v, depth+1)
			}
		case *ast.ParenExpr:
			return eval(e.X, depth+1)
		case *ast.BinaryExpr:
			if e.Op == token.ADD {
				x, ok1 := eval(e.X, depth+1)
				y, ok2 := eval(e.Y, depth+1)
				return x + y, ok1 && ok2
			}
		}
		return "", false
	}
	var out []literal
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.BinaryExpr:
			if s, ok := eval(n, 0); ok {
				out = append(out, literal{fset.Position(n.Pos()).String(), s})
				return false
			}
		case *ast.BasicLit:
			if s, ok := eval(n, 0); ok {
				out = append(out, literal{fset.Position(n.Pos()).String(), s})
			}
		}
		return true
	})
	return out
}

// admitsEdgeCases: values at the edges of what Go accepts, and lists at
// their limits.
func (c *crdServer) admitsEdgeCases(t *testing.T) {
	ctx := t.Context()
	many := func(n int, f func(i int) string) string {
		var parts []string
		for i := range n {
			parts = append(parts, f(i))
		}
		return "[" + strings.Join(parts, ", ") + "]"
	}
	tests := []struct{ name, spec string }{
		{"ALLOW without rules", `{action: ALLOW}`},
		{"action and mtls given empty", `{action: "", mtls: "", defaultDeny: true}`},
		{"fields given null", `{selector: null, action: null, rules: null, rateLimit: null, mtls: STRICT}`},
		{"empty selector", `{selector: {}, mtls: PERMISSIVE}`},
		{"empty matchLabels and matchExpressions", `{selector: {matchLabels: {}, matchExpressions: []}, mtls: STRICT}`},
		{"every operator", `{selector: {matchLabels: {app: "", "example.com/tier": web}, matchExpressions: [{key: a, operator: In, values: [x, ""]}, {key: b, operator: NotIn, values: [z]}, {key: c, operator: Exists}, {key: d, operator: DoesNotExist, values: []}]}, mtls: STRICT}`},
		{"rules: [{}]", `{action: DENY, rules: [{}]}`},
		{"ports at the edges", `{action: ALLOW, rules: [{to: {ports: [1, 65535, "1", "65535", "080", "00000000080", "1-65535", "65535-65535", "80-80", "0001-00002"], notPorts: [22, "1-1"]}}]}`},
		{"CIDRs at the edges", `{action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 0.0.0.0/0}, {cidr: "::/0"}, {cidr: 1.2.3.4/32}, {cidr: "fd00:0::/8"}, {cidr: "2001:db8::/32", except: ["2001:db8::/32", "2001:db8:1::/48"]}, {cidr: "0000:0000:0000:0000:0000:0000:255.255.255.255/128"}, {cidr: 10.0.0.0/8, except: [10.0.0.0/8, 10.255.255.255/32]}]}]}]}`},
		{"notIpBlocks", `{action: DENY, rules: [{from: [{notIpBlocks: [{cidr: 192.168.0.0/16, except: [192.168.1.0/24]}]}]}]}`},
		{"principals of every form", `{action: ALLOW, rules: [{from: [{principals: ["*", "*x", "* anything: goes", "spiffe://*", "spiffe://anything goes/x*", "spiffe://td", "spiffe://td/a/b", "spiffe://td/.../..a/.b/a.", "spiffe://a-b_c.d.0/A-Z_a.z", "spiffe://cluster.local/ns/shop/sa/checkout", "spiffe://cluster.local/ns/shop/*", "*/sa/checkout"], notPrincipals: ["*"]}]}]}`},
		{"namespaces at the edges", `{action: ALLOW, rules: [{from: [{namespaces: [a, "0", ` + strings.Repeat("a", 63) + `], notNamespaces: [a-b]}]}]}`},
		{"service accounts at the edges", `{action: ALLOW, rules: [{from: [{serviceAccounts: [a, ns/a, a.b.c, "` + strings.Repeat("n", 63) + "/" + strings.Repeat("s", 253) + `"], notServiceAccounts: [x-y/z]}]}]}`},
		{"rate limits", `{rateLimit: {maxConnections: 1}}`},
		{"rate only, burst zero", `{rateLimit: {connectionsPerSecond: 1, burst: 0}}`},
		{"largest rate limits", `{rateLimit: {connectionsPerSecond: 2147483647, burst: 2147483647, maxConnections: 2147483647}}`},
		{"every list at its limit", `{action: ALLOW, rules: ` + many(v1alpha1.MaxRules, func(r int) string {
			if r > 0 {
				return "{}"
			}
			block := `{cidr: 10.0.0.0/8, except: ` + many(v1alpha1.MaxExcepts, func(i int) string { return fmt.Sprintf("10.%d.0.0/16", i) }) + `}`
			src := `{ipBlocks: ` + many(v1alpha1.MaxIPBlocks, func(int) string { return block }) + `, notIpBlocks: ` + many(v1alpha1.MaxIPBlocks, func(int) string { return block }) + `}`
			ports := many(v1alpha1.MaxPorts, func(i int) string { return strconv.Itoa(1000 + i) })
			return `{from: ` + many(v1alpha1.MaxSources, func(int) string { return src }) + `, to: {ports: ` + ports + `, notPorts: ` + ports + `}}`
		}) + `}`},
	}
	for _, tt := range tests {
		doc := specDoc("edge", tt.spec)
		if _, err := policy.ParseDocument(doc); err != nil {
			t.Errorf("%s: Go rejects the case: %v", tt.name, err)
			continue
		}
		if _, err := c.create(ctx, doc, true); err != nil {
			t.Errorf("%s: Go accepts, the API server refuses: %v", tt.name, err)
		}
	}
}

// refusesBadValues: admission refuses the obvious mistakes, and its
// message names the field, as Go's does.
func (c *crdServer) refusesBadValues(t *testing.T) {
	over := func(n int, item string) string {
		return "[" + strings.TrimSuffix(strings.Repeat(item+", ", n+1), ", ") + "]"
	}
	tests := []struct {
		name, spec string
		field      string // in both errors
		msg        string // in the API server's
	}{
		{"unknown action", `{action: PERMIT, rules: [{}]}`, "spec.action", `Unsupported value: "PERMIT"`},
		{"mtls in lower case", `{mtls: strict}`, "spec.mtls", `Unsupported value: "strict"`},
		{"unknown field", `{mtls: STRICT, mTLS: STRICT}`, "spec.mTLS", `unknown field "spec.mTLS"`},
		{"rules without action", `{rules: [{}]}`, "spec.action", "required when spec.rules is set"},
		{"DENY without rules", `{action: DENY}`, "spec.rules", "without rules matches nothing"},
		{"empty spec", `{}`, "spec", "sets nothing"},
		{"port 0", `{action: ALLOW, rules: [{to: {ports: [0]}}]}`, "spec.rules[0].to.ports[0]", "out of range"},
		{"port 65536", `{action: ALLOW, rules: [{to: {ports: [80, 65536]}}]}`, "spec.rules[0].to.ports[1]", "out of range"},
		{`port "65536"`, `{action: ALLOW, rules: [{to: {ports: ["65536"]}}]}`, "spec.rules[0].to.ports[0]", "not a port or range"},
		{`port "abc"`, `{action: ALLOW, rules: [{to: {ports: ["abc"]}}]}`, "spec.rules[0].to.ports[0]", "not a port or range"},
		{`port "0-5"`, `{action: ALLOW, rules: [{to: {notPorts: ["0-5"]}}]}`, "spec.rules[0].to.notPorts[0]", "not a port or range"},
		{`port "1-"`, `{action: ALLOW, rules: [{to: {notPorts: ["1-"]}}]}`, "spec.rules[0].to.notPorts[0]", "not a port or range"},
		{"empty port range", `{action: ALLOW, rules: [{to: {ports: ["9100-9000"]}}]}`, "spec.rules[0].to.ports[0]", "empty range"},
		{"port string too long", `{action: ALLOW, rules: [{to: {ports: ["000000000080"]}}]}`, "spec.rules[0].to.ports[0]", "Too long"},
		{"not a CIDR", `{action: ALLOW, rules: [{}, {from: [{ipBlocks: [{cidr: 10.0.0.1/33}]}]}]}`, "spec.rules[1].from[0].ipBlocks[0].cidr", "not a CIDR"},
		{"CIDR with host bits", `{action: ALLOW, rules: [{from: [{notIpBlocks: [{cidr: 10.1.2.3/8}]}]}]}`, "spec.rules[0].from[0].notIpBlocks[0].cidr", "host bits"},
		{"IPv4-mapped CIDR", `{action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: "::ffff:10.0.0.0/104"}]}]}]}`, "spec.rules[0].from[0].ipBlocks[0].cidr", "not a CIDR"},
		{"CIDR missing", `{action: ALLOW, rules: [{from: [{ipBlocks: [{except: [10.0.0.0/16]}]}]}]}`, "spec.rules[0].from[0].ipBlocks[0].cidr", "Required value"},
		{"except not a CIDR", `{action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 10.0.0.0/8, except: [10.0.0.0]}]}]}]}`, "spec.rules[0].from[0].ipBlocks[0].except[0]", "not a CIDR"},
		{"except with host bits", `{action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 10.0.0.0/8, except: [10.0.0.0/16, 10.1.0.1/16]}]}]}]}`, "spec.rules[0].from[0].ipBlocks[0].except[1]", "host bits"},
		{"except outside the block", `{action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]}]}]}`, "spec.rules[0].from[0].ipBlocks[0].except", "not inside cidr"},
		{"except of another family", `{action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 10.0.0.0/8, except: ["fd00::/16"]}]}]}]}`, "spec.rules[0].from[0].ipBlocks[0].except", "not inside cidr"},
		{"except wider than the block", `{action: ALLOW, rules: [{from: [{ipBlocks: [{cidr: 10.0.0.0/16, except: [10.0.0.0/8]}]}]}]}`, "spec.rules[0].from[0].ipBlocks[0].except", "not inside cidr"},
		{"unknown selector operator", `{selector: {matchExpressions: [{key: app, operator: Near}]}, mtls: STRICT}`, "spec.selector.matchExpressions", "not In, NotIn, Exists or DoesNotExist"},
		{"In without values", `{selector: {matchExpressions: [{key: app, operator: In}]}, mtls: STRICT}`, "spec.selector.matchExpressions", "need values"},
		{"Exists with values", `{selector: {matchExpressions: [{key: app, operator: Exists, values: [x]}]}, mtls: STRICT}`, "spec.selector.matchExpressions", "take none"},
		{"principal with two stars", `{action: ALLOW, rules: [{from: [{principals: ["**"]}]}]}`, "spec.rules[0].from[0].principals[0]", "should match"},
		{"principal with a star inside", `{action: ALLOW, rules: [{from: [{notPrincipals: ["spiffe://td/a*b"]}]}]}`, "spec.rules[0].from[0].notPrincipals[0]", "should match"},
		{"principal prefix without scheme", `{action: ALLOW, rules: [{from: [{principals: ["cluster.local/ns/x*"]}]}]}`, "spec.rules[0].from[0].principals[0]", "should match"},
		{"principal in upper case", `{action: ALLOW, rules: [{from: [{principals: ["spiffe://TD/x"]}]}]}`, "spec.rules[0].from[0].principals[0]", "should match"},
		{"principal with a dot segment", `{action: ALLOW, rules: [{from: [{principals: ["spiffe://td/./x"]}]}]}`, "spec.rules[0].from[0].principals[0]", "should match"},
		{"principal with a trailing slash", `{action: ALLOW, rules: [{from: [{principals: ["spiffe://td/"]}]}]}`, "spec.rules[0].from[0].principals[0]", "should match"},
		{"empty principal", `{action: ALLOW, rules: [{from: [{principals: [""]}]}]}`, "spec.rules[0].from[0].principals[0]", "should match"},
		{"namespace in upper case", `{action: DENY, rules: [{from: [{notNamespaces: [Shop]}]}]}`, "spec.rules[0].from[0].notNamespaces[0]", "should match"},
		{"namespace too long", `{action: DENY, rules: [{from: [{namespaces: [` + strings.Repeat("a", 64) + `]}]}]}`, "spec.rules[0].from[0].namespaces[0]", "Too long"},
		{"service account with two slashes", `{action: DENY, rules: [{from: [{serviceAccounts: ["a/b/c"]}]}]}`, "spec.rules[0].from[0].serviceAccounts[0]", "should match"},
		{"service account without namespace", `{action: DENY, rules: [{from: [{notServiceAccounts: ["/x"]}]}]}`, "spec.rules[0].from[0].notServiceAccounts[0]", "should match"},
		{"empty source", `{action: ALLOW, rules: [{from: [{}]}]}`, "spec.rules[0].from[0]", "at least 1 properties"},
		{"empty to", `{action: ALLOW, rules: [{to: {}}]}`, "spec.rules[0].to", "at least 1 properties"},
		{"negative rate", `{rateLimit: {connectionsPerSecond: -1, maxConnections: 5}}`, "spec.rateLimit.connectionsPerSecond", "greater than or equal to 0"},
		{"negative connections", `{rateLimit: {maxConnections: -5}}`, "spec.rateLimit.maxConnections", "greater than or equal to 0"},
		{"burst alone", `{rateLimit: {burst: 5}}`, "spec.rateLimit.burst", "set without connectionsPerSecond"},
		{"empty rate limit", `{rateLimit: {}}`, "spec.rateLimit", "sets nothing"},
		{"too many rules", `{action: ALLOW, rules: ` + over(v1alpha1.MaxRules, "{}") + `}`, "spec.rules", "must have at most 32 items"},
		{"too many sources", `{action: ALLOW, rules: [{from: ` + over(v1alpha1.MaxSources, "{namespaces: [a]}") + `}]}`, "spec.rules[0].from", "must have at most 8 items"},
		{"too many ipBlocks", `{action: ALLOW, rules: [{from: [{ipBlocks: ` + over(v1alpha1.MaxIPBlocks, "{cidr: 10.0.0.0/8}") + `}]}]}`, "spec.rules[0].from[0].ipBlocks", "must have at most 32 items"},
		{"too many excepts", `{action: ALLOW, rules: [{from: [{notIpBlocks: [{cidr: 10.0.0.0/8, except: ` + over(v1alpha1.MaxExcepts, "10.0.0.0/16") + `}]}]}]}`, "spec.rules[0].from[0].notIpBlocks[0].except", "must have at most 8 items"},
		{"too many ports", `{action: ALLOW, rules: [{to: {notPorts: ` + over(v1alpha1.MaxPorts, "80") + `}}]}`, "spec.rules[0].to.notPorts", "must have at most 64 items"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := specDoc("bad", tt.spec)
			_, goErr := policy.ParseDocument(doc)
			if goErr == nil {
				t.Fatal("Go accepts it: the API server must not refuse it")
			}
			if !strings.Contains(goErr.Error(), tt.field) {
				t.Errorf("Go's error does not name %s: %v", tt.field, goErr)
			}
			_, err := c.create(t.Context(), doc, true)
			if err == nil {
				t.Fatalf("admitted; Go says: %v", goErr)
			}
			if !strings.Contains(err.Error(), tt.field) || !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("the API server's error does not name %s with %q:\n%v", tt.field, tt.msg, err)
			}
		})
	}
}

// leavesToTheAgent: what admission lets through and only the agent
// refuses (status condition Accepted False, reason Invalid); docs/policy.md
// lists these.
func (c *crdServer) leavesToTheAgent(t *testing.T) {
	tests := []struct{ name, spec, goField string }{
		{"a label value Kubernetes forbids", `{selector: {matchLabels: {app: "no spaces allowed"}}, mtls: STRICT}`, `spec.selector.matchLabels["app"]`},
		{"a label key Kubernetes forbids", `{selector: {matchLabels: {"-x": ok}}, mtls: STRICT}`, `spec.selector.matchLabels["-x"]`},
		{"a matchExpressions key Kubernetes forbids", `{selector: {matchExpressions: [{key: "a b", operator: Exists}]}, mtls: STRICT}`, "spec.selector.matchExpressions[0].key"},
		{"a service account name over 253 characters", `{action: ALLOW, rules: [{from: [{serviceAccounts: [shop/` + strings.Repeat("s", 254) + `]}]}]}`, "spec.rules[0].from[0].serviceAccounts[0]"},
		{"a source of empty lists", `{action: ALLOW, rules: [{from: [{principals: []}]}]}`, "spec.rules[0].from[0]"},
		{"a to of empty lists", `{action: ALLOW, rules: [{to: {ports: []}}]}`, "spec.rules[0].to"},
	}
	for _, tt := range tests {
		doc := specDoc("agent", tt.spec)
		_, goErr := policy.ParseDocument(doc)
		if goErr == nil || !strings.Contains(goErr.Error(), tt.goField) {
			t.Errorf("%s: Go's error %v does not name %s", tt.name, goErr, tt.goField)
		}
		if _, err := c.create(t.Context(), doc, true); err != nil {
			t.Errorf("%s: admission refuses it now (%v): update the list in docs/policy.md", tt.name, err)
		}
	}
}

// columnsAndStatus: kubectl's columns come from the API server (a Table),
// and status is written through its own subresource only.
func (c *crdServer) columnsAndStatus(t *testing.T) {
	ctx := t.Context()
	res := c.dyn.Resource(meshPolicies).Namespace("shop")
	if _, err := c.create(ctx, specDoc("columns", `{action: ALLOW, mtls: STRICT, rules: [{}]}`), false); err != nil {
		t.Fatal(err)
	}
	if _, err := c.create(ctx, specDoc("defaults", `{defaultDeny: true}`), false); err != nil {
		t.Fatal(err)
	}
	want := []string{"Name", "Action", "mTLS", "Accepted", "Reason", "Age"}
	cols, rows := c.table(t, "shop")
	if !slices.Equal(cols, want) {
		t.Fatalf("columns %q, want %q", cols, want)
	}
	if r := rows["columns"]; !slices.Equal(r[:5], []any{"columns", "ALLOW", "STRICT", nil, nil}) || r[5] == nil {
		t.Errorf("row of shop/columns before any status: %q", r)
	}
	if r := rows["defaults"]; !slices.Equal(r[:5], []any{"defaults", nil, nil, nil, nil}) {
		t.Errorf("row of shop/defaults: %q", r)
	}

	// A status update changes the status only: not the spec, nor the
	// generation.
	u, err := res.Get(ctx, "columns", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	gen := u.GetGeneration()
	accepted := map[string]any{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "in force on the mesh",
		"observedGeneration": gen, "lastTransitionTime": time.Now().UTC().Format(time.RFC3339)}
	must(t, unstructured.SetNestedSlice(u.Object, []any{accepted}, "status", "conditions"))
	must(t, unstructured.SetNestedField(u.Object, "PERMISSIVE", "spec", "mtls"))
	u, err = res.UpdateStatus(ctx, u, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("status update: %v", err)
	}
	if mtls, _, _ := unstructured.NestedString(u.Object, "spec", "mtls"); mtls != "STRICT" || u.GetGeneration() != gen {
		t.Errorf("after a status update: spec.mtls %q generation %d; want STRICT, %d", mtls, u.GetGeneration(), gen)
	}
	if _, rows := c.table(t, "shop"); !slices.Equal(rows["columns"][:5], []any{"columns", "ALLOW", "STRICT", "True", "Accepted"}) {
		t.Errorf("row of shop/columns after status Accepted: %q", rows["columns"])
	}

	// An update of the object changes the spec (and the generation), not
	// the status.
	must(t, unstructured.SetNestedField(u.Object, "PERMISSIVE", "spec", "mtls"))
	must(t, unstructured.SetNestedSlice(u.Object, nil, "status", "conditions"))
	u, err = res.Update(ctx, u, metav1.UpdateOptions{})
	if err != nil {
		t.Fatalf("update: %v", err)
	}
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	if mtls, _, _ := unstructured.NestedString(u.Object, "spec", "mtls"); mtls != "PERMISSIVE" || u.GetGeneration() != gen+1 || len(conds) != 1 {
		t.Errorf("after an update: spec.mtls %q generation %d conditions %v; want PERMISSIVE, %d, the Accepted condition", mtls, u.GetGeneration(), conds, gen+1)
	}

	// The agent's write of an invalid policy's status: a merge patch of
	// the status subresource (source/kubernetes).
	invalid := map[string]any{"status": map[string]any{"conditions": []any{map[string]any{
		"type": "Accepted", "status": "False", "reason": "Invalid", "observedGeneration": gen + 1,
		"message":            `MeshPolicy shop/columns: spec.selector.matchLabels["app"]: "no spaces allowed" is not a valid label value`,
		"lastTransitionTime": time.Now().UTC().Format(time.RFC3339),
	}}}}
	body, err := json.Marshal(invalid)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := res.Patch(ctx, "columns", "application/merge-patch+json", body, metav1.PatchOptions{}, "status"); err != nil {
		t.Fatalf("status patch: %v", err)
	}
	if _, rows := c.table(t, "shop"); !slices.Equal(rows["columns"][:5], []any{"columns", "ALLOW", "PERMISSIVE", "False", "Invalid"}) {
		t.Errorf("row of shop/columns after status Invalid: %q", rows["columns"])
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// table lists the MeshPolicies of a namespace as kubectl get does (a
// Table from the API server) and returns the column names and each row's
// cells by object name.
func (c *crdServer) table(t *testing.T, ns string) ([]string, map[string][]any) {
	t.Helper()
	hc, err := rest.HTTPClientFor(c.s.AdminConfig())
	if err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("%s/apis/%s/namespaces/%s/%s", c.s.URL, meshPolicies.GroupVersion(), ns, meshPolicies.Resource)
	req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s as a Table: %s %v\n%s", url, resp.Status, err, body)
	}
	var tab metav1.Table
	if err := json.NewDecoder(bytes.NewReader(body)).Decode(&tab); err != nil {
		t.Fatalf("not a Table: %v\n%s", err, body)
	}
	if tab.Kind != "Table" {
		t.Fatalf("got a %s, not a Table", tab.Kind)
	}
	var cols []string
	for _, cd := range tab.ColumnDefinitions {
		cols = append(cols, cd.Name)
	}
	rows := map[string][]any{}
	for _, r := range tab.Rows {
		if len(r.Cells) != len(cols) || len(cols) < 6 {
			t.Fatalf("a row of %d cells for %d columns: %v", len(r.Cells), len(cols), r.Cells)
		}
		name, _ := r.Cells[0].(string)
		rows[name] = r.Cells
	}
	for _, name := range []string{"columns", "defaults"} {
		if rows[name] == nil {
			t.Fatalf("no row for %s/%s in %+v", ns, name, tab.Rows)
		}
	}
	return cols, rows
}
