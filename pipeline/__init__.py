"""MimIC pipeline: distil many-shot in-context learning into per-head attention shifts.

Paper: Jiang et al., "Mimic In-Context Learning for Multimodal Tasks", CVPR 2025 (arXiv 2504.08851).
"""

__version__ = "0.1.0"
