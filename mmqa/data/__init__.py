"""Datasets: readers, the built-in procedural worlds, tokenizers and the LightningDataModule."""
