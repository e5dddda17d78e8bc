package policy

import "github.com/mantlet/mantlet/policy/v1alpha1"

// GenPolicies is FuzzDecide's generator of valid policy sets, for the CRD
// test (package policy_test), which hands them to a real API server.
func GenPolicies(data []byte) []*v1alpha1.MeshPolicy { return (&gen{data: data}).policies() }
