"""Ray programs: distributed training (Ray Train) and the streaming graph (Ray Serve)."""
