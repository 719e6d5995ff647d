"""cloud_provisioner: makes each requested cluster's cloud resources exist, and removes them on retirement."""
