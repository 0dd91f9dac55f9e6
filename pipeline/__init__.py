"""The distributed dataflow (shard I/O, stages, routing, sinks). Lands with the pipeline issue."""
