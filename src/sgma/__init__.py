"""SGMA: Semantic-Guided Modality-Aware segmentation for multimodal remote sensing with missing modalities."""

__version__ = "0.1.0"
