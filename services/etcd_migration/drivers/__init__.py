"""Control-plane drivers: `local` (real etcd processes on loopback) and `sim` (fleet-scale runs)."""
