"""Infra-service bundles: versioned sets of Kubernetes manifests rendered per cluster."""
