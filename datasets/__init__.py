"""Data: canonical schema, the Batch type, streaming parquet readers, converters and synthetic data."""
