"""Decoding X_ortho into regions: K-Means per image and across a dataset, instance proposals, and CLIP
zero-shot labels."""
