"""GrowCLIP data tools: crawled image-text pairs -> growing webdataset shards, and the loaders over them."""
