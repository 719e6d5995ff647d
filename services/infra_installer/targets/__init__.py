"""Kubernetes targets: the port (base.py) and its adapters (sim.py; the real client next)."""

from services.infra_installer.targets.base import ClusterRef, HealthTimeout, InstallError, KubernetesTarget

__all__ = ["ClusterRef", "HealthTimeout", "InstallError", "KubernetesTarget"]
