"""mmqa: multimodal transformers for VQA, captioning and CLIP-style retrieval."""

__version__ = "0.1.0"
