"""Datasets, modality dropout and the LightningDataModule."""
