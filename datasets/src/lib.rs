//! Parquet datasets, record formats, Mistral prompt encoders, loss masks and packing.
