"""The distributed dataflow, one folder per stage: store/ and formats/ (bytes and what they are), ingest/,
synth/, deblur/ (with deblur/ray/), cluster/, report/, train/, and assemble (frames back into videos)."""
