"""Datasets: folder scans into Parquet manifests, seeded stratified splits, decoded pixel caches."""
