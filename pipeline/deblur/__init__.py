"""The deblur job without Ray: what a run is asked, which shards it reads, one shard's stages, the
restorer, manifests, resume and the run record. Ray lives in `deblur/ray/`."""
