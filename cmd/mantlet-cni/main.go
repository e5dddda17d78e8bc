// Command mantlet-cni is mantlet's chained CNI plugin (CNI spec 1.0). The
// container runtime runs it last when it wires a pod's sandbox; on ADD it
// asks the node agent, over its unix socket, to enroll the pod (its
// addresses and host veth come from the previous plugins' result) and
// waits for the answer, so that the pod's containers only start once its
// traffic is captured. It passes the previous result through. If the
// agent cannot be reached, ADD fails and the runtime retries the sandbox
// later (fail closed), except for the namespaces its configuration
// excludes. DEL tells the agent and never fails.
package main

import (
	"os"
)

func main() {
	os.Exit(run(os.Stdin, os.Stdout, os.Stderr, os.Getenv))
}
