"""Image-text retrieval recall (R@k in both directions) from embeddings, and a torchmetrics
accumulator that gathers embeddings across ranks and removes the images a DistributedSampler repeats.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics.utilities import dim_zero_cat


def retrieval_recall(
    img_emb: torch.Tensor, txt_emb: torch.Tensor, txt_img: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@k for text->image and image->text retrieval by cosine similarity.

    img_emb (I, D) and txt_emb (T, D) are embeddings (normalised here); txt_img (T,) holds the row of
    img_emb that each text describes. Keys: "r{k}_t2i" (fraction of texts whose image ranks in the top k
    images) and "r{k}_i2t" (fraction of images with at least one of their texts in the top k texts;
    images without texts are skipped). A k beyond the gallery size gives 1.0.

    Ties are broken against the query: a wrong candidate that scores exactly as high as the right one
    ranks ahead of it, so collapsed embeddings (all alike) score 0 for any k below the gallery size
    rather than a perfect 1. Builds the full (I, T) similarity matrix.
    """
    if img_emb.ndim != 2 or txt_emb.ndim != 2 or img_emb.shape[1] != txt_emb.shape[1]:
        raise ValueError(
            f"retrieval_recall needs img_emb (I, D) and txt_emb (T, D) of one width, got "
            f"{tuple(img_emb.shape)} and {tuple(txt_emb.shape)}"
        )
    if txt_img.shape != (txt_emb.shape[0],):
        raise ValueError(f"txt_img must be (T,) = ({txt_emb.shape[0]},), got {tuple(txt_img.shape)}")
    num_img, num_txt = img_emb.shape[0], txt_emb.shape[0]
    if num_img == 0 or num_txt == 0:
        raise ValueError(f"retrieval_recall needs images and texts, got {num_img} images and {num_txt} texts")
    if int(txt_img.min()) < 0 or int(txt_img.max()) >= num_img:
        raise ValueError(f"txt_img must index rows of img_emb in [0, {num_img}), got values outside it")
    if any(k < 1 for k in ks):
        raise ValueError(f"retrieval_recall needs ks >= 1, got {tuple(ks)}")

    # float32 whatever the embeddings' dtype: bf16 similarities would tie often and skew ranks.
    img = F.normalize(img_emb.float(), dim=-1)  # (I, D)
    txt = F.normalize(txt_emb.float(), dim=-1)  # (T, D)
    txt_img = txt_img.to(img.device)
    sim = img @ txt.T  # (I, T)

    # Text -> image: the number of wrong images scoring at least the right one is the right one's rank.
    pos_t2i = sim[txt_img, torch.arange(num_txt, device=sim.device)]  # (T,)
    # Subtracting 1 removes the right image itself, which always ties with itself.
    rank_t2i = (sim >= pos_t2i[None, :]).sum(0) - 1  # (T,)

    # Image -> text: an image succeeds through its best-scoring text; other texts of the same image
    # ranking above it cannot hurt, so only wrong texts scoring at least that high count as ahead.
    is_pos = txt_img[None, :] == torch.arange(num_img, device=sim.device)[:, None]  # (I, T)
    best_pos = sim.masked_fill(~is_pos, float("-inf")).amax(1)  # (I,)
    rank_i2t = ((sim >= best_pos[:, None]) & ~is_pos).sum(1)  # (I,)
    rank_i2t = rank_i2t[is_pos.any(1)]  # (I',) images with at least one text

    out = {}
    for k in ks:
        out[f"r{k}_t2i"] = (rank_t2i < k).float().mean().item()
    for k in ks:
        out[f"r{k}_i2t"] = (rank_i2t < k).float().mean().item()
    return out


class RetrievalRecall(torchmetrics.Metric):
    """Collects image and text embeddings with their global image ids and computes `retrieval_recall`
    over everything seen, on every rank.

    Images are de-duplicated by id, since a DistributedSampler pads the last batch by repeating samples
    and a repeated image would be a second, identical candidate that pushes the right answer down.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5, 10), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(ks)
        self.add_state("img_ids", [], dist_reduce_fx="cat")
        self.add_state("img_emb", [], dist_reduce_fx="cat")
        self.add_state("txt_img_ids", [], dist_reduce_fx="cat")
        self.add_state("txt_emb", [], dist_reduce_fx="cat")

    def update(
        self, img_ids: torch.Tensor, img_emb: torch.Tensor, txt_img_ids: torch.Tensor, txt_emb: torch.Tensor
    ) -> None:
        """img_ids (B,) and txt_img_ids (T,) are global dataset image indices; embeddings (B, D), (T, D)."""
        if img_ids.shape != img_emb.shape[:1] or txt_img_ids.shape != txt_emb.shape[:1]:
            raise ValueError(
                f"RetrievalRecall.update needs one id per embedding row, got img_ids {tuple(img_ids.shape)} "
                f"for img_emb {tuple(img_emb.shape)} and txt_img_ids {tuple(txt_img_ids.shape)} "
                f"for txt_emb {tuple(txt_emb.shape)}"
            )
        # Detached: these are evaluation records, and keeping the graph would hold every batch's
        # activations alive until compute.
        self.img_ids.append(img_ids.detach().long())
        self.img_emb.append(img_emb.detach())
        self.txt_img_ids.append(txt_img_ids.detach().long())
        self.txt_emb.append(txt_emb.detach())

    def compute(self) -> dict[str, torch.Tensor]:
        """{"r{k}_t2i", "r{k}_i2t"} as float tensors, over the unique images seen."""
        img_ids = dim_zero_cat(self.img_ids)  # (N,) with repeats
        img_emb = dim_zero_cat(self.img_emb)  # (N, D)
        txt_img_ids = dim_zero_cat(self.txt_img_ids)  # (T,)
        txt_emb = dim_zero_cat(self.txt_emb)  # (T, D)

        uniq, inverse = torch.unique(img_ids, return_inverse=True)  # (I,), (N,)
        # The first occurrence of each id represents it; scatter_reduce keeps this deterministic on GPU,
        # where a plain scatter with repeated indices is not.
        rows = torch.arange(img_ids.shape[0], device=img_ids.device)  # (N,)
        first = torch.full_like(uniq, img_ids.shape[0])  # (I,)
        first = first.scatter_reduce(0, inverse, rows, reduce="amin")  # (I,) first row of each id
        img_emb = img_emb[first]  # (I, D)

        # uniq is sorted, so searchsorted finds each text's image row.
        txt_img = torch.searchsorted(uniq, txt_img_ids).clamp(max=uniq.shape[0] - 1)  # (T,)
        unknown = uniq[txt_img] != txt_img_ids  # (T,)
        if unknown.any():
            missing = sorted(set(txt_img_ids[unknown].tolist()))
            raise ValueError(
                f"RetrievalRecall: texts describe image ids never passed as images: {missing[:10]}"
            )

        recall = retrieval_recall(img_emb, txt_emb, txt_img, self.ks)
        return {k: torch.tensor(v, device=self.device) for k, v in recall.items()}
