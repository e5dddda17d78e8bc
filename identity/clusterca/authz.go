package clusterca

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Keys of a service-account token's user "extra" that bind it to a pod
// and the pod's node: kube-apiserver sets them for tokens bound to a pod
// (as the kubelet's projected tokens are), the node ones when the pod was
// scheduled (ServiceAccountTokenPodNodeInfo, on by default since v1.32).
const (
	ExtraPodName  = "authentication.kubernetes.io/pod-name"
	ExtraPodUID   = "authentication.kubernetes.io/pod-uid"
	ExtraNodeName = "authentication.kubernetes.io/node-name"
)

// caller is who sent a request, as its token says.
type caller struct {
	// Namespace and ServiceAccount of the token.
	Namespace, ServiceAccount string
	// Pod, PodUID and Node the token is bound to (empty when it is not).
	Pod, PodUID, Node string
}

// reviewer authenticates bearer tokens with the TokenReview API for one
// audience. Authenticated answers are kept for cacheTTL (never beyond the
// token's expiry), so an agent's burst of requests costs the API server
// one review; refusals are never kept.
type reviewer struct {
	client   kubernetes.Interface
	audience string
	cacheTTL time.Duration
	now      func() time.Time

	mu    sync.Mutex
	cache map[[sha256.Size]byte]cachedReview
}

type cachedReview struct {
	c       caller
	expires time.Time
}

// maxCachedReviews bounds the cache; beyond it, expired entries are
// dropped first, then everything.
const maxCachedReviews = 100_000

// review authenticates token. It returns ReasonNone and the caller, or the
// reason of a refusal and a message; an API failure is ReasonUnavailable.
// cached says whether the answer came from the cache.
func (r *reviewer) review(ctx context.Context, token string) (c caller, reason Reason, msg string, cached bool) {
	key := sha256.Sum256([]byte(token))
	now := r.now()
	r.mu.Lock()
	if e, ok := r.cache[key]; ok && now.Before(e.expires) {
		r.mu.Unlock()
		return e.c, ReasonNone, "", true
	}
	r.mu.Unlock()

	tr := &authnv1.TokenReview{Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{r.audience}}}
	tr, err := r.client.AuthenticationV1().TokenReviews().Create(ctx, tr, metav1.CreateOptions{})
	if err != nil {
		return caller{}, ReasonUnavailable, fmt.Sprintf("TokenReview failed: %v", err), false
	}
	st := tr.Status
	if !st.Authenticated {
		why := st.Error
		if why == "" {
			why = "the API server did not authenticate it"
		}
		return caller{}, ReasonUnauthenticated, fmt.Sprintf("token for audience %s refused: %s", r.audience, why), false
	}
	if len(st.Audiences) > 0 && !slices.Contains(st.Audiences, r.audience) {
		return caller{}, ReasonUnauthenticated, fmt.Sprintf("token is for audiences %v, not %s", st.Audiences, r.audience), false
	}
	ns, sa, ok := splitServiceAccount(st.User.Username)
	if !ok {
		return caller{}, ReasonNotAgent, fmt.Sprintf("%s is not a service account", st.User.Username), false
	}
	c = caller{Namespace: ns, ServiceAccount: sa,
		Pod: extra(st.User.Extra, ExtraPodName), PodUID: extra(st.User.Extra, ExtraPodUID), Node: extra(st.User.Extra, ExtraNodeName)}

	expires := now.Add(r.cacheTTL)
	if exp, ok := tokenExpiry(token); ok && exp.Before(expires) {
		expires = exp
	}
	r.mu.Lock()
	if len(r.cache) >= maxCachedReviews {
		for k, e := range r.cache {
			if !now.Before(e.expires) {
				delete(r.cache, k)
			}
		}
		if len(r.cache) >= maxCachedReviews {
			clear(r.cache)
		}
	}
	r.cache[key] = cachedReview{c: c, expires: expires}
	r.mu.Unlock()
	return c, ReasonNone, "", false
}

func extra(e map[string]authnv1.ExtraValue, key string) string {
	if v := e[key]; len(v) == 1 {
		return v[0]
	}
	return ""
}

// splitServiceAccount parses system:serviceaccount:<ns>:<name>.
func splitServiceAccount(user string) (ns, name string, ok bool) {
	rest, ok := strings.CutPrefix(user, "system:serviceaccount:")
	if !ok {
		return "", "", false
	}
	ns, name, ok = strings.Cut(rest, ":")
	return ns, name, ok && ns != "" && name != "" && !strings.Contains(name, ":")
}

// tokenExpiry reads the exp claim of a JWT without verifying it: only to
// bound how long an answer the API server gave about it is kept.
func tokenExpiry(token string) (time.Time, bool) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp int64 `json:"exp"`
	}
	if json.Unmarshal(b, &claims) != nil || claims.Exp == 0 {
		return time.Time{}, false
	}
	return time.Unix(claims.Exp, 0), true
}

// podIndex is the informer's index of pods by node, namespace and service
// account.
const podIndex = "node/ns/sa"

// pods knows the cluster's pods through an informer, stripped to what the
// service decides on.
type pods struct {
	factory informers.SharedInformerFactory
	inf     cache.SharedIndexInformer
}

func newPods(client kubernetes.Interface) (*pods, error) {
	f := informers.NewSharedInformerFactory(client, 0)
	inf := f.Core().V1().Pods().Informer()
	if err := inf.SetTransform(stripPod); err != nil {
		return nil, err
	}
	if err := inf.AddIndexers(cache.Indexers{podIndex: indexPod}); err != nil {
		return nil, err
	}
	return &pods{factory: f, inf: inf}, nil
}

func (p *pods) start(ctx context.Context) { p.factory.Start(ctx.Done()) }

func (p *pods) synced() bool { return p.inf.HasSynced() }

// running says whether a pod of namespace ns and service account sa runs
// (or is about to) on node.
func (p *pods) running(node, ns, sa string) bool {
	objs, err := p.inf.GetIndexer().ByIndex(podIndex, node+"/"+ns+"/"+sa)
	return err == nil && len(objs) > 0
}

// agent says whether the pod ns/name with uid runs on node: the pod a
// caller's token is bound to.
func (p *pods) agent(ns, name, uid, node string) bool {
	obj, ok, err := p.inf.GetIndexer().GetByKey(ns + "/" + name)
	if err != nil || !ok {
		return false
	}
	pod := obj.(*corev1.Pod)
	return string(pod.UID) == uid && pod.Spec.NodeName == node && !finished(pod)
}

func finished(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// indexPod indexes a scheduled pod that has not finished. A terminating
// pod still runs (and drains its connections), so it counts until it is
// gone.
func indexPod(obj any) ([]string, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok || p.Spec.NodeName == "" || finished(p) {
		return nil, nil
	}
	return []string{p.Spec.NodeName + "/" + p.Namespace + "/" + serviceAccount(p)}, nil
}

// serviceAccount is the pod's service account, as the agent names it.
func serviceAccount(p *corev1.Pod) string {
	switch {
	case p.Spec.ServiceAccountName != "":
		return p.Spec.ServiceAccountName
	case p.Spec.DeprecatedServiceAccount != "":
		return p.Spec.DeprecatedServiceAccount
	}
	return "default"
}

// stripPod keeps of a pod what the service decides on.
func stripPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: p.Namespace, UID: p.UID, ResourceVersion: p.ResourceVersion,
			DeletionTimestamp: p.DeletionTimestamp},
		Spec:   corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: serviceAccount(p)},
		Status: corev1.PodStatus{Phase: p.Status.Phase},
	}, nil
}
