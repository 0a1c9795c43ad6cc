"""Extraction: attention (Q, K, V per head and layer) from timm/Hugging Face ViTs and Stable Diffusion, and
which of those arrays each later stage reads."""
