"""Storage and the output format: the only code that knows fsspec/s3fs (`storage`), the
output layout and records (`manifest`, `inputs`), and publishing one merge (`publish`)."""
