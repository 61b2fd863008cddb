"""Encoder, fusion, head and the segmentor that assembles them."""
