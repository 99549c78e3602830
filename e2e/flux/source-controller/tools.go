//go:build tools

// Package tools pins Flux's source-controller, which e2e/flux.sh builds for the GitOps e2e test
// (e2e/tests/flux.rs).
package tools

import (
	_ "github.com/fluxcd/source-controller"
)
