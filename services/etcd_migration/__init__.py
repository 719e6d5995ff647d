"""etcd_migration: control-plane migration and upgrades. Wired here; the procedure is issue 6."""
