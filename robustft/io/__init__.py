"""Readers and writers at the edges: atomic files, Parquet tables, HDF5 arrays."""
