"""The stages the Snakemake rules run: each takes paths and settings, calls the library, writes its outputs."""
