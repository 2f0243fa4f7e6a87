"""Training data for fusionnet: foregrounds, composites, crops, Parquet shards and the Dataset.

Submodules are imported explicitly (e.g. `from fusionnet.data.dataset import ShardDataset`);
this package imports nothing eagerly so that light users do not pay for torch or pyarrow.
"""
