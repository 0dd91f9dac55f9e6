"""Reaching a Ray cluster and checking its nodes: addresses, what a node sees, waits that say what they wait on."""
