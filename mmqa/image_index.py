"""CLIP-style search over a gallery of images: `ImageIndex` holds one unit embedding per image and
ranks them by cosine similarity against a text or image query embedding.

An index is built once (every image embedded in batches by the bundle's image tower) and saved as a
folder, `embeddings.safetensors` + `index.json`, so a demo or script starts without re-embedding.
A saved index records which model made it (`model_id`, a hash of the bundle's weights and
preprocessing) and the size and modification time of every file it was built from;
`load_or_build` reuses it only when both still hold, and rebuilds it otherwise — a stale index is
never searched.

Search is exact: a matrix product and a top-k. Above `faiss_threshold` images it goes through
`faiss.IndexFlatIP` when faiss is installed (the `faiss` extra); it is never required.

The embeddings come from a pair of `Towers`: the bundle's contrastive towers (`bundle_towers`), or a
real open_clip model (`open_clip_towers`, loaded through `open_clip.create_model_and_transforms` from
a name or a config file plus weights, by name or from a local file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mmqa.atomic import atomic_file, write_atomic
from mmqa.data.images import load_image, to_rgb
from mmqa.errors import DataError, MMQAError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
INDEX_DIR = ".mmqa-index"  # where a gallery folder keeps its own index
EMBEDDINGS = "embeddings.safetensors"
INDEX_JSON = "index.json"
FORMAT = 1  # bumped when index.json changes shape: an older index is then rebuilt
FAISS_THRESHOLD = 50_000  # galleries larger than this are searched with faiss, when it is installed
BATCH_SIZE = 32  # images decoded and embedded at once while building (full-size photos held in memory)

EmbedFn = Callable[[list], torch.Tensor]  # list of PIL images -> (B, E) unit embeddings
Source = tuple[str, int, int]  # (absolute path, size in bytes, mtime in ns); -1, -1 for a missing file


def find_images(root: str | Path) -> list[Path]:
    """Every image file (png, jpg, jpeg, webp, bmp, any case) under `root`, recursively, sorted.
    Hidden files and folders (a leading dot, such as the index's own `.mmqa-index`) are left out."""
    root = Path(root)
    if not root.is_dir():
        raise MMQAError(f"{root}: not a folder of images")
    images = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not images:
        raise MMQAError(f"{root}: no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in it or below it")
    return images


def bundle_model_id(bundle) -> str:
    """A hash of everything that decides a bundle's image embeddings: the model config, the image
    preprocessing and every weight. Two bundles with the same id embed every image identically."""
    t = bundle.transform
    return weights_hash(bundle.model, OmegaConf.to_yaml(bundle.cfg.model), json.dumps([t.size, t.mean, t.std]))


def weights_hash(module: torch.nn.Module, *describe: str) -> str:
    """sha256 of the strings in `describe` (config, preprocessing) and of every tensor of `module`'s
    state dict: its name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for text in describe:
        h.update(text.encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # raw bytes, any dtype
    return h.hexdigest()


@dataclass(frozen=True)
class Towers:
    """The two encoders a search needs. embed_image: images (paths or PIL) -> (B, E) unit vectors;
    embed_text: texts -> (T, E) unit vectors in the same space; model_id: what an index built with
    them records (equal ids embed every image identically); name: shown in the Search tab."""

    name: str
    model_id: str
    embed_image: EmbedFn
    embed_text: Callable[[list[str]], torch.Tensor]


def bundle_towers(bundle) -> Towers:
    """The bundle's own contrastive towers (trained with its CLIP loss)."""
    return Towers("this model's contrastive towers", bundle_model_id(bundle), bundle.embed_image, bundle.embed_text)


def open_clip_towers(name: str, pretrained: str | None = None, device: str = "cpu") -> Towers:
    """A real CLIP from open_clip: `name` is one of `open_clip.list_models()` (`ViT-B-32`), a model
    config JSON file (registered with `open_clip.add_model_config`; its file name is the model's name)
    or `local-dir:FOLDER` (open_clip's own layout: config and weights in one folder); `pretrained` is
    an open_clip weights tag (downloaded on first use) or a weights file (.safetensors, or a state-dict
    .pt/.bin read with `weights_only=True`). Any failure is one MMQAError saying what to do."""
    import open_clip  # only a demo or index asked for a real CLIP imports it

    if name.endswith(".json"):
        if not Path(name).is_file():
            raise MMQAError(f"{name}: no such open_clip model config file")
        open_clip.add_model_config(name)
        name = Path(name).stem
    if pretrained and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise MMQAError(f"{pretrained}: no such weights file")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as e:  # open_clip raises RuntimeError, ValueError, OSError, hub errors
        raise MMQAError(
            f"could not load the open_clip model {name!r} with weights {pretrained!r} ({type(e).__name__}: {e}). "
            f"Names: open_clip.list_models(), or a model config .json; weights: a tag, or a local .safetensors/.pt "
            f"file (offline, a tag works only when it is already in the cache)") from e
    model.eval()

    @torch.no_grad()
    def embed_image(images: list) -> torch.Tensor:  # -> (B, E)
        pil = [to_rgb(im) if isinstance(im, Image.Image) else load_image(im) for im in images]
        x = torch.stack([preprocess(im) for im in pil]).to(device)  # (B, 3, S, S)
        return F.normalize(model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def embed_text(texts: list[str]) -> torch.Tensor:  # -> (T, E)
        return F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)

    preprocessing = json.dumps(getattr(model.visual, "preprocess_cfg", {}), sort_keys=True, default=str)
    model_id = weights_hash(model, f"open_clip {name}", preprocessing)
    return Towers(f"open_clip {name} ({pretrained or 'weights from its folder'})", model_id, embed_image, embed_text)


def file_sources(paths: Sequence[str | Path]) -> list[Source]:
    """What identifies each file's content cheaply: its absolute path, size and modification time."""
    sources = []
    for p in paths:
        path = str(Path(p).resolve())
        try:
            st = os.stat(path)
            sources.append((path, st.st_size, st.st_mtime_ns))
        except OSError:
            sources.append((path, -1, -1))  # unreadable: skipped when built, rebuilt once it appears
    return sources


class ImageIndex:
    """Unit embeddings of a gallery's images, searchable by cosine similarity.

    paths: the indexed images (row i of `embeddings` is `paths[i]`); embeddings: (N, E), normalised
    here; model_id: the model that embedded them; sources: (path, size, mtime_ns) of every file asked
    for at build time, indexed or skipped (empty: tied to no files, never reused by `load_or_build`);
    skipped: (path, why) for each file that could not be read.
    """

    def __init__(self, paths: Sequence[str], embeddings: torch.Tensor, model_id: str = "", *,
                 sources: Sequence[Source] = (), skipped: Sequence[tuple[str, str]] = (),
                 faiss_threshold: int = FAISS_THRESHOLD):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(paths):
            raise MMQAError(f"{len(paths)} paths but embeddings of shape {tuple(embeddings.shape)}: need (N, E)")
        self.paths = [str(p) for p in paths]
        self.embeddings = F.normalize(embeddings.detach().float().cpu(), dim=-1).contiguous()  # (N, E)
        self.model_id = model_id
        self.sources = [tuple(s) for s in sources]
        self.skipped = [tuple(s) for s in skipped]
        self.faiss_threshold = faiss_threshold
        self._faiss = None  # built on the first search that needs it

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    # ----------------------------------------------------------------------------- build
    @classmethod
    def build(cls, embed_fn: EmbedFn, paths: Sequence[str | Path], batch_size: int = BATCH_SIZE,
              progress: bool = True, *, model_id: str, faiss_threshold: int = FAISS_THRESHOLD) -> "ImageIndex":
        """Embed `paths` in batches of `batch_size` with `embed_fn` (e.g. `Bundle.embed_image`).
        A file that is not a readable image is skipped and recorded in `skipped`, not fatal: one
        corrupt photo should not stop a gallery from being searchable."""
        if batch_size < 1:
            raise MMQAError(f"batch_size must be at least 1, not {batch_size}")
        sources = file_sources(paths)  # stamped before reading: a file changed meanwhile reads as stale
        indexed, skipped, chunks = [], [], []
        batch: list = []  # (path, PIL image) pairs waiting to be embedded

        def flush():
            chunks.append(embed_fn([im for _, im in batch]).detach().float().cpu())  # (b, E)
            indexed.extend(p for p, _ in batch)
            batch.clear()

        with tqdm(total=len(sources), desc="indexing images", unit="img", disable=not progress) as bar:
            for path, _, _ in sources:
                try:
                    batch.append((path, load_image(path)))
                except DataError as e:
                    skipped.append((path, str(e)))
                if len(batch) == batch_size:
                    flush()
                bar.update()
            if batch:
                flush()
        if not sources:
            raise MMQAError("no image to index: the list of files is empty")
        if not chunks:
            raise MMQAError(f"no image to index: {len(skipped)} of {len(sources)} files could not be read; "
                            f"the first: {skipped[0][1]}")
        return cls(indexed, torch.cat(chunks), model_id, sources=sources, skipped=skipped,
                   faiss_threshold=faiss_threshold)

    def is_current(self, model_id: str, paths: Sequence[str | Path]) -> bool:
        """True when this index was made by `model_id` from exactly these files, unchanged since."""
        return bool(self.sources) and self.model_id == model_id and self.sources == file_sources(paths)

    # ----------------------------------------------------------------------------- save / load
    def save(self, path: str | Path) -> Path:
        """Write `path/embeddings.safetensors` and `path/index.json`, each atomically (temp file +
        rename). Both carry the same random build id, so a pair left mixed by an interrupted save is
        detected on load instead of pairing one build's embeddings with another's file list."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        build = uuid.uuid4().hex
        meta = {
            "format": FORMAT,
            "build": build,
            "model_id": self.model_id,
            "paths": self.paths,
            "sources": self.sources,
            "skipped": self.skipped,
        }
        with atomic_file(path / EMBEDDINGS) as tmp:
            save_file({"embeddings": self.embeddings}, str(tmp), metadata={"build": build})
        write_atomic(path / INDEX_JSON, json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, faiss_threshold: int = FAISS_THRESHOLD) -> "ImageIndex":
        path = Path(path)
        json_file, emb_file = path / INDEX_JSON, path / EMBEDDINGS
        for f in (json_file, emb_file):
            if not f.is_file():
                raise MMQAError(f"{path} is not an image index: missing {f.name}")
        try:
            meta = json.loads(json_file.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise MMQAError(f"{json_file}: format {meta.get('format')!r}, this mmqa reads format {FORMAT}")
            build, paths, mid = meta["build"], meta["paths"], meta["model_id"]
            sources, skipped = meta["sources"], meta["skipped"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise MMQAError(f"{json_file}: not a valid index file ({type(e).__name__}: {e})") from e
        try:
            with safe_open(str(emb_file), framework="pt") as f:
                emb_build = (f.metadata() or {}).get("build")
                embeddings = f.get_tensor("embeddings")  # (N, E)
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise MMQAError(f"{emb_file}: not a readable safetensors file ({type(e).__name__}: {e})") from e
        if emb_build != build:
            raise MMQAError(f"{path}: {EMBEDDINGS} and {INDEX_JSON} come from different builds (an interrupted save?)")
        return cls(paths, embeddings, mid, sources=sources, skipped=skipped, faiss_threshold=faiss_threshold)

    # ----------------------------------------------------------------------------- search
    def search_text(self, query_emb: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """Text -> image: the k images nearest to a text embedding (`Bundle.embed_text`), best first."""
        return self._search(query_emb, k)

    def search_image(self, query_emb: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """Image -> image: the k images nearest to an image embedding (`Bundle.embed_image`), best
        first; a gallery image used as the query comes back first with a score of 1."""
        return self._search(query_emb, k)

    def _search(self, query_emb: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """[(path, cosine similarity)] of the min(k, N) nearest images, highest score first."""
        if k < 1:
            raise MMQAError(f"k must be at least 1, not {k}")
        q = query_emb.detach().float().cpu().reshape(-1)  # (E,), from (E,) or (1, E)
        if q.numel() != self.dim:
            raise MMQAError(f"the query embedding has {q.numel()} dimensions, the index {self.dim}: "
                            "was it built by another model?")
        q = F.normalize(q, dim=0)
        k = min(k, len(self))
        if self._use_faiss():
            scores, idx = self._faiss_index().search(q[None].numpy(), k)  # (1, k) each
            scores, idx = scores[0].tolist(), idx[0].tolist()
        else:
            top = torch.topk(self.embeddings @ q, k)  # (N,) cosines -> k best
            scores, idx = top.values.tolist(), top.indices.tolist()
        return [(self.paths[i], float(s)) for s, i in zip(scores, idx)]

    def _use_faiss(self) -> bool:
        return len(self) > self.faiss_threshold and importlib.util.find_spec("faiss") is not None

    def _faiss_index(self):
        if self._faiss is None:
            import faiss  # optional: only large galleries get here, and only when it is installed

            self._faiss = faiss.IndexFlatIP(self.dim)  # inner product = cosine on unit vectors
            self._faiss.add(self.embeddings.numpy())
        return self._faiss


def load_or_build(model_id: str, embed_fn: EmbedFn, paths: Sequence[str | Path] | None, index_dir: str | Path, *,
                  batch_size: int = BATCH_SIZE, progress: bool = True,
                  faiss_threshold: int = FAISS_THRESHOLD) -> ImageIndex:
    """The index of `paths` by the model `model_id` (see `bundle_model_id`): the one saved in
    `index_dir` when it was built by that model from these same, unchanged files; otherwise built
    afresh and saved there. `paths=None` means the files the saved index lists (an index made by
    `python -m mmqa index build`), which must then exist."""
    index_dir = Path(index_dir)
    saved = None
    if paths is None or (index_dir / INDEX_JSON).exists():
        try:
            saved = ImageIndex.load(index_dir, faiss_threshold)
        except MMQAError as e:
            if paths is None:
                raise
            warnings.warn(f"{e}; rebuilding it", stacklevel=2)
    if paths is None:
        paths = [p for p, _, _ in saved.sources]
    if saved is not None and saved.is_current(model_id, paths):
        return saved
    index = ImageIndex.build(embed_fn, paths, batch_size, progress, model_id=model_id,
                             faiss_threshold=faiss_threshold)
    try:
        index.save(index_dir)
    except OSError as e:  # a read-only gallery: the index still works, it is only not kept
        warnings.warn(f"could not save the image index to {index_dir} ({e}); it is kept in memory only",
                      stacklevel=2)
    return index
