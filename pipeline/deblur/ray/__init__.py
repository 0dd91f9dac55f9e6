"""The deblur job on Ray: the driver, the shard workers and the depth-pools router."""
