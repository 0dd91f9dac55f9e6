"""Where bytes live: fsspec stores with atomic commits, the output lease, scratch folders, digests."""
