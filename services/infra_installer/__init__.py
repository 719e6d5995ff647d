"""infra_installer: installs a cluster's infra services in dependency order, then declares it READY."""
