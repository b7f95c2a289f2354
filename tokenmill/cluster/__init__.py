"""Cluster tier: the router in front of engine replicas, its routing policies, health and supervision,
the autoscaler, and the Ray Serve deployment."""
