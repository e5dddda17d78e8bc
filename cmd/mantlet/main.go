// Command mantlet is the sidecarless service mesh's one binary: the node
// agent, the CA tools, the demo and the operator commands.
package main

import "os"

func main() { os.Exit(run(newContext(), newEnv(), os.Args[1:])) }
