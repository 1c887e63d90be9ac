"""Evaluation metrics: VQA accuracy, caption BLEU-4 / CIDEr, and image-text retrieval recall."""

from mmqa.metrics.captions import CaptionScores, caption_scores, tokenize_caption
from mmqa.metrics.retrieval import RetrievalRecall, retrieval_recall
from mmqa.metrics.vqa import VQAAccuracy, normalize_answer, soft_scores, vqa_score

__all__ = [
    "CaptionScores",
    "RetrievalRecall",
    "VQAAccuracy",
    "caption_scores",
    "normalize_answer",
    "retrieval_recall",
    "soft_scores",
    "tokenize_caption",
    "vqa_score",
]
