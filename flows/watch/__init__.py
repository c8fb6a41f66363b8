"""The checkpoint watcher: finds new checkpoints, analyses each once, keeps their trend."""
