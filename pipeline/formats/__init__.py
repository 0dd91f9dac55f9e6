"""What the bytes are: WebDataset shards and sinks, images, frames (samples in and out), video, Parquet rows."""
