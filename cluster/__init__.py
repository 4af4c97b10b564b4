"""Cluster topology: where each actor runs, placement groups, local multi-node clusters."""
