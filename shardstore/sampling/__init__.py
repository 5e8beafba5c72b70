"""Which shards an epoch uses, in what order, split across ranks, and where a resumed run continues."""
