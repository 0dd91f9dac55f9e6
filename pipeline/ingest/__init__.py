"""Videos, image folders and shards in: frame shards and their Parquet index out (`adarevd ingest`)."""
