package clusterca

import (
	"context"
	"encoding/pem"
	"fmt"
	"maps"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/mantlet/mantlet/identity/ca"
)

// Defaults of where the service keeps the CA and publishes the bundle.
const (
	DefaultSecretName      = "mantlet-ca"
	DefaultBundleConfigMap = "mantlet-trust-bundle"
	// BundleKey is the ConfigMap's key holding the trust bundle (PEM, the
	// active root first); agents mount it and read it with --trust-bundle.
	BundleKey = "bundle.pem"
)

// secretStore keeps the CA in a Secret whose data are the files of a CA
// directory ('kubectl create secret generic NAME --from-file=DIR' makes
// one from 'mantlet ca init'), and publishes its bundle in a ConfigMap.
type secretStore struct {
	client           kubernetes.Interface
	ns, secret, cmap string
	td               spiffeid.TrustDomain
	create           ca.Options // for a CA made on first start
	labels           map[string]string
}

// read returns the CA in the Secret (nil, nil when there is none).
func (s *secretStore) read(ctx context.Context) (*ca.CA, ca.Files, error) {
	sec, err := s.client.CoreV1().Secrets(s.ns).Get(ctx, s.secret, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil, nil
	}
	if err != nil {
		return nil, nil, fmt.Errorf("clusterca: read Secret %s/%s: %w", s.ns, s.secret, err)
	}
	files := ca.Files(sec.Data)
	c, err := ca.Parse(files, s.create)
	if err != nil {
		return nil, nil, fmt.Errorf("clusterca: Secret %s/%s: %w", s.ns, s.secret, err)
	}
	if c.TrustDomain() != s.td {
		return nil, nil, fmt.Errorf("clusterca: Secret %s/%s holds a CA of trust domain %s, not %s", s.ns, s.secret, c.TrustDomain(), s.td)
	}
	return c, files, nil
}

// load returns the CA in the Secret, creating a CA and the Secret when
// there is none. Replicas starting together race to create it: the losers
// read the winner's.
func (s *secretStore) load(ctx context.Context) (c *ca.CA, files ca.Files, created bool, err error) {
	if c, files, err = s.read(ctx); err != nil || c != nil {
		return c, files, false, err
	}
	if c, err = ca.New(s.td, s.create); err != nil {
		return nil, nil, false, err
	}
	if files, err = c.Files(); err != nil {
		return nil, nil, false, err
	}
	sec := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: s.secret, Namespace: s.ns, Labels: s.labels},
		Type:       corev1.SecretTypeOpaque,
		Data:       files,
	}
	_, err = s.client.CoreV1().Secrets(s.ns).Create(ctx, sec, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		c, files, err = s.read(ctx)
		if err == nil && c == nil {
			err = fmt.Errorf("clusterca: Secret %s/%s exists but cannot be read", s.ns, s.secret)
		}
		return c, files, false, err
	}
	if err != nil {
		return nil, nil, false, fmt.Errorf("clusterca: create Secret %s/%s: %w", s.ns, s.secret, err)
	}
	return c, files, true, nil
}

// bundlePEM is the CA's trust bundle as PEM, the active root first.
func bundlePEM(c *ca.CA) []byte {
	var b []byte
	for _, r := range c.Roots() {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	return b
}

// publish makes the ConfigMap hold c's bundle; it writes only when the
// bundle differs, so replicas agree without a leader.
func (s *secretStore) publish(ctx context.Context, c *ca.CA) error {
	want := map[string]string{BundleKey: string(bundlePEM(c))}
	cms := s.client.CoreV1().ConfigMaps(s.ns)
	cm, err := cms.Get(ctx, s.cmap, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		cm = &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: s.cmap, Namespace: s.ns, Labels: s.labels}, Data: want}
		_, err = cms.Create(ctx, cm, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			return nil // another replica; the next round compares
		}
	case err != nil:
	case maps.Equal(cm.Data, want):
	default:
		cm.Data = want
		_, err = cms.Update(ctx, cm, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			return nil
		}
	}
	if err != nil {
		return fmt.Errorf("clusterca: publish the bundle in ConfigMap %s/%s: %w", s.ns, s.cmap, err)
	}
	return nil
}

// RotateSecret takes one rotation step (Prepare, Activate or Finish) on the
// CA held in the Secret ns/name and writes it back; the service's replicas
// follow within their reload interval. The update carries the Secret's
// resourceVersion, so a concurrent change makes it fail rather than be
// lost.
func RotateSecret(ctx context.Context, client kubernetes.Interface, ns, name string, step func(*ca.CA) (*ca.CA, error)) (*ca.CA, error) {
	secs := client.CoreV1().Secrets(ns)
	sec, err := secs.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("clusterca: read Secret %s/%s: %w", ns, name, err)
	}
	c, err := ca.Parse(ca.Files(sec.Data), ca.Options{})
	if err != nil {
		return nil, fmt.Errorf("clusterca: Secret %s/%s: %w", ns, name, err)
	}
	if step == nil {
		return c, nil
	}
	if c, err = step(c); err != nil {
		return nil, err
	}
	files, err := c.Files()
	if err != nil {
		return nil, err
	}
	sec.Data = files
	if _, err := secs.Update(ctx, sec, metav1.UpdateOptions{}); err != nil {
		return nil, fmt.Errorf("clusterca: update Secret %s/%s: %w", ns, name, err)
	}
	return c, nil
}
