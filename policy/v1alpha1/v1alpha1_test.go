package v1alpha1_test

import (
	"reflect"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/mantlet/mantlet/policy/v1alpha1"
)

const doc = `apiVersion: mantlet.io/v1alpha1
kind: MeshPolicy
metadata:
  namespace: shop
  name: payments
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{principals: ["spiffe://cluster.local/ns/shop/sa/checkout"], notIpBlocks: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]}]
    to: {ports: [8443, "9000-9100"]}
  mtls: STRICT
  rateLimit: {connectionsPerSecond: 10, burst: 20, maxConnections: 30}
`

func TestSchemeDecodesMeshPolicy(t *testing.T) {
	s := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	obj, gvk, err := serializer.NewCodecFactory(s).UniversalDeserializer().Decode([]byte(doc), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if gvk.String() != "mantlet.io/v1alpha1, Kind=MeshPolicy" {
		t.Errorf("gvk = %s", gvk)
	}
	p, ok := obj.(*v1alpha1.MeshPolicy)
	if !ok {
		t.Fatalf("decoded %T", obj)
	}
	want := v1alpha1.MeshPolicySpec{
		Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "payments"}},
		Action:   v1alpha1.ActionAllow,
		Rules: []v1alpha1.Rule{{
			From: []v1alpha1.Source{{
				Principals:  []string{"spiffe://cluster.local/ns/shop/sa/checkout"},
				NotIPBlocks: []v1alpha1.IPBlock{{CIDR: "10.0.0.0/8", Except: []string{"10.1.0.0/16"}}},
			}},
			To: &v1alpha1.Destination{Ports: []intstr.IntOrString{intstr.FromInt32(8443), intstr.FromString("9000-9100")}},
		}},
		MTLS:      v1alpha1.MTLSStrict,
		RateLimit: &v1alpha1.RateLimit{ConnectionsPerSecond: 10, Burst: 20, MaxConnections: 30},
	}
	if !reflect.DeepEqual(p.Spec, want) {
		t.Errorf("spec =\n%+v\nwant\n%+v", p.Spec, want)
	}
	if p.Namespace != "shop" || p.Name != "payments" {
		t.Errorf("metadata = %s/%s", p.Namespace, p.Name)
	}
	if got := v1alpha1.Resource("meshpolicies").String(); got != "meshpolicies.mantlet.io" {
		t.Errorf("Resource = %s", got)
	}
}

func TestDeepCopySharesNothing(t *testing.T) {
	s := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	obj, _, err := serializer.NewCodecFactory(s).UniversalDeserializer().Decode([]byte(doc), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	orig := obj.(*v1alpha1.MeshPolicy)
	orig.Labels = map[string]string{"team": "pay"}
	orig.Status.Conditions = []metav1.Condition{{Type: "Accepted", Status: metav1.ConditionTrue}}
	cp := orig.DeepCopyObject().(*v1alpha1.MeshPolicy)
	if !reflect.DeepEqual(orig, cp) {
		t.Fatal("copy differs from the original")
	}
	// Change every reference-typed field of the copy; the original must
	// not see it.
	cp.Labels["team"] = "x"
	cp.Spec.Selector.MatchLabels["app"] = "x"
	cp.Spec.Rules[0].From[0].Principals[0] = "x"
	cp.Spec.Rules[0].From[0].NotIPBlocks[0].CIDR = "x"
	cp.Spec.Rules[0].From[0].NotIPBlocks[0].Except[0] = "x"
	cp.Spec.Rules[0].To.Ports[0] = intstr.FromInt32(1)
	cp.Spec.RateLimit.Burst = 1
	cp.Status.Conditions[0].Type = "x"
	fresh, _, _ := serializer.NewCodecFactory(s).UniversalDeserializer().Decode([]byte(doc), nil, nil)
	fp := fresh.(*v1alpha1.MeshPolicy)
	fp.Labels = map[string]string{"team": "pay"}
	fp.Status.Conditions = []metav1.Condition{{Type: "Accepted", Status: metav1.ConditionTrue}}
	if !reflect.DeepEqual(orig, fp) {
		t.Errorf("changing the copy changed the original:\n%+v", orig.Spec)
	}
	list := &v1alpha1.MeshPolicyList{Items: []v1alpha1.MeshPolicy{*orig}}
	lc := list.DeepCopyObject().(*v1alpha1.MeshPolicyList)
	lc.Items[0].Spec.Rules[0].From[0].Principals[0] = "y"
	if orig.Spec.Rules[0].From[0].Principals[0] == "y" {
		t.Error("list copy shares items with the original")
	}
	var nilp *v1alpha1.MeshPolicy
	if nilp.DeepCopy() != nil {
		t.Error("DeepCopy of nil is not nil")
	}
}
