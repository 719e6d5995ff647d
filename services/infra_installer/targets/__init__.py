"""Kubernetes targets: the port (base.py) and its adapters (sim.py; kubernetes.py, the real client)."""

from services.infra_installer.targets.base import ClusterRef, DrainReport, HealthTimeout, InstallError, KubernetesTarget

__all__ = ["ClusterRef", "DrainReport", "HealthTimeout", "InstallError", "KubernetesTarget"]
