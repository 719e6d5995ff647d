"""rotation: replaces clusters in batches (cluster rotation). Wired here; the lifecycle logic is issue 5."""
