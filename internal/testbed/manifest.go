package testbed

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// Manifest returns the cluster as multi-document YAML of ordinary
// Kubernetes objects, the file that `mantlet agent --config` reads in
// standalone mode: a Namespace for every namespace in use (with the
// annotations of the spec), a Node per node (InternalIP, podCIDR), a Pod per
// pod (spec.nodeName, spec.serviceAccountName, status.podIP/podIPs,
// status.hostIP, phase Running) and a Service per service (ClusterIP).
func (tb *Testbed) Manifest() []byte {
	spec := tb.Spec()
	var objs []any

	nsNames := map[string]bool{}
	for _, p := range tb.pods {
		nsNames[p.Namespace] = true
	}
	for _, s := range tb.services {
		nsNames[s.Namespace] = true
	}
	for ns := range spec.Namespaces {
		nsNames[ns] = true
	}
	for _, ns := range slices.Sorted(maps.Keys(nsNames)) {
		objs = append(objs, &corev1.Namespace{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Namespace"},
			ObjectMeta: metav1.ObjectMeta{Name: ns, Annotations: spec.Namespaces[ns]},
		})
	}

	nodeAnnotations := map[string]map[string]string{}
	for _, ns := range spec.Nodes {
		nodeAnnotations[ns.Name] = ns.Annotations
	}
	for _, n := range tb.nodes {
		objs = append(objs, &corev1.Node{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Node"},
			ObjectMeta: metav1.ObjectMeta{Name: n.Name, UID: tb.uid("node", "", n.Name), Annotations: nodeAnnotations[n.Name]},
			Spec:       corev1.NodeSpec{PodCIDR: n.PodCIDR.String(), PodCIDRs: []string{n.PodCIDR.String()}},
			Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{
				{Type: corev1.NodeInternalIP, Address: n.IP.String()},
				{Type: corev1.NodeHostName, Address: n.Name},
			}},
		})
	}

	podSpecs := map[string]PodSpec{}
	for _, ns := range spec.Nodes {
		for _, ps := range ns.Pods {
			podSpecs[ps.Name] = ps
		}
	}
	for _, p := range tb.pods {
		ps := podSpecs[p.Name]
		hostIP := tb.Node(p.Node).IP.String()
		objs = append(objs, &corev1.Pod{
			TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
			ObjectMeta: metav1.ObjectMeta{
				Name: p.Name, Namespace: p.Namespace, UID: tb.uid("pod", p.Namespace, p.Name),
				Labels: ps.Labels, Annotations: ps.Annotations,
			},
			Spec: corev1.PodSpec{NodeName: p.Node, ServiceAccountName: p.ServiceAccount},
			Status: corev1.PodStatus{
				Phase:   corev1.PodRunning,
				HostIP:  hostIP,
				HostIPs: []corev1.HostIP{{IP: hostIP}},
				PodIP:   p.IP.String(),
				PodIPs:  []corev1.PodIP{{IP: p.IP.String()}},
			},
		})
	}

	for _, s := range tb.services {
		svc := &corev1.Service{
			TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Service"},
			ObjectMeta: metav1.ObjectMeta{Name: s.Name, Namespace: s.Namespace, UID: tb.uid("service", s.Namespace, s.Name)},
			Spec: corev1.ServiceSpec{
				Type: corev1.ServiceTypeClusterIP, Selector: s.Selector,
				ClusterIP: s.IP.String(), ClusterIPs: []string{s.IP.String()},
			},
		}
		for _, sp := range s.Ports {
			target := sp.TargetPort
			if target == 0 {
				target = sp.Port
			}
			svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{
				Name: sp.Name, Protocol: corev1.ProtocolTCP, Port: int32(sp.Port), TargetPort: intstr.FromInt32(int32(target)),
			})
		}
		objs = append(objs, svc)
	}

	var buf bytes.Buffer
	fmt.Fprintf(&buf, "# mantlet testbed %s: generated, edits are lost on the next write\n", tb.prefix)
	for _, o := range objs {
		b, err := yaml.Marshal(o)
		if err != nil {
			// The objects are built above from validated names; a failure
			// is a bug, not input.
			panic(fmt.Sprintf("testbed: marshal manifest: %v", err))
		}
		buf.WriteString("---\n")
		buf.Write(b)
	}
	return buf.Bytes()
}

// ManifestFile is where WriteManifest writes: <state dir>/<prefix>.yaml.
// Close removes it.
func (tb *Testbed) ManifestFile() string { return manifestFile(tb.stateDir, tb.prefix) }

func manifestFile(dir, prefix string) string { return filepath.Join(dir, prefix+".yaml") }

// WriteManifest writes Manifest to ManifestFile and returns its path. It
// replaces the file whole (write, then rename), so a watcher never reads
// half of it.
func (tb *Testbed) WriteManifest() (string, error) {
	path := tb.ManifestFile()
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+tb.prefix+"-*.yaml")
	if err != nil {
		return "", fmt.Errorf("testbed: write manifest: %w", err)
	}
	_, werr := tmp.Write(tb.Manifest())
	cerr := tmp.Close()
	if err := errors.Join(werr, cerr); err != nil {
		os.Remove(tmp.Name())
		return "", fmt.Errorf("testbed: write manifest: %w", err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		os.Remove(tmp.Name())
		return "", fmt.Errorf("testbed: write manifest: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		os.Remove(tmp.Name())
		return "", fmt.Errorf("testbed: write manifest: %w", err)
	}
	return path, nil
}

// uid makes a stable UID for an object of the testbed, shaped like a
// Kubernetes UID.
func (tb *Testbed) uid(kind, namespace, name string) types.UID {
	h := sha256.Sum256([]byte(tb.prefix + "/" + kind + "/" + namespace + "/" + name))
	return types.UID(fmt.Sprintf("%x-%x-%x-%x-%x", h[0:4], h[4:6], h[6:8], h[8:10], h[10:16]))
}
