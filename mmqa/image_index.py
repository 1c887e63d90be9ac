"""CLIP-style search over a gallery of images: `ImageIndex` holds one unit embedding per image and
ranks them by cosine similarity against a text or image query embedding.

An index is built once (every image embedded in batches by the bundle's image tower) and saved as a
folder, `embeddings.safetensors` + `index.json`, so a demo or script starts without re-embedding.
A saved index records which model made it (`model_id`, a hash of the bundle's weights and
preprocessing) and the size and modification time of every file it was built from;
`load_or_build` reuses it only when both still hold, and rebuilds it otherwise — a stale index is
never searched.

How it is searched (`choose_search`; `search=` on every constructor, recorded in index.json):
galleries up to `APPROX_THRESHOLD` images exactly, by a matrix product and a top-k (nothing to build;
at 100k 512-d embeddings a query takes about as long as with faiss's exact `IndexFlatIP`, a batch
much less); larger ones approximately, by a faiss IVF-Flat index when faiss is installed (the
`faiss` extra; without it, exactly). The IVF index is built on the first search that needs it
(k-means on a seeded sample of the gallery, every embedding assigned to its list, nprobe tuned:
about 15 s at 100k on one CPU core, an estimated 2-4 min at 1M) and kept in memory beside the
embeddings (a second copy of them), not saved. Its `nprobe` is the smallest power of two whose
recall@10 against exact search, over a seeded sample of gallery rows as queries, reaches
`TUNE_RECALL`; when none below a full scan does (a gallery with no cluster structure), the index is
dropped and the gallery searched exactly. `search="exact" | "flat" | "ivf" | "hnsw"` forces a kind
(`hnsw`: faiss HNSW-Flat, `efSearch` tuned the same way: faster queries at the same recall, a build
about 6x slower). Figures and the command: benchmarks/retrieval.py.

The embeddings come from a pair of `Towers`: the bundle's contrastive towers (`bundle_towers`), or a
real open_clip model (`open_clip_towers`, loaded through `open_clip.create_model_and_transforms` from
a name or a config file plus weights, by name or from a local file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import threading
import time
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
BATCH_SIZE = 32  # images decoded and embedded at once while building (full-size photos held in memory)


# How a gallery is searched (benchmarks/retrieval.py measures each; see docs/benchmarks.md)
SEARCH_KINDS = ("auto", "exact", "flat", "ivf", "hnsw")  # auto: by size, through `choose_search`
APPROX_THRESHOLD = 100_000  # auto: larger galleries are searched by IVF (exact at 100k, 512-d: 25-45 ms/query)
IVF_LISTS_PER_ROOT = 1  # nlist = sqrt(N); faiss's 4-16·sqrt(N) probe less but build slower (4·: 3x at 100k)
IVF_MIN_PER_LIST = 39  # ...but no fewer gallery vectors per list than faiss's k-means asks for (its minimum)
IVF_TRAIN_PER_LIST = 64  # k-means trains on a seeded sample of 64·nlist vectors (faiss's default 256: 4x the build)
HNSW_M = 32  # neighbours per HNSW node (faiss's default)
HNSW_EF_CONSTRUCTION = 40  # HNSW build-time beam width (faiss's default)
HNSW_MAX_EF = 1024  # the largest efSearch tried while tuning
TUNE_RECALL = 0.95  # nprobe / efSearch: the smallest power of two reaching this recall@TUNE_K against exact search
TUNE_K = 10  # ...for the top 10
TUNE_QUERIES = 200  # ...over this many gallery rows as queries (each one's own row left out)
SEED = 0  # the k-means sample and the tuning queries

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


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def check_search_kind(search: str) -> None:
    if search not in SEARCH_KINDS:
        raise MMQAError(f"search must be one of {', '.join(SEARCH_KINDS)}, not {search!r}")


def choose_search(n: int, search: str = "auto", approx_threshold: int = APPROX_THRESHOLD) -> str:
    """The kind of search a gallery of `n` images gets: `search` itself unless "auto"; for "auto",
    "exact" up to `approx_threshold` images and "ivf" above it (still "exact" without faiss)."""
    check_search_kind(search)
    if search == "auto":
        return "ivf" if n > approx_threshold and faiss_installed() else "exact"
    if search != "exact" and not faiss_installed():
        raise MMQAError(f"search={search!r} needs faiss: pip install -e '.[faiss]' (or search='exact')")
    return search


def ivf_lists(n: int) -> int:
    """IVF_LISTS_PER_ROOT·sqrt(n) lists, but at least IVF_MIN_PER_LIST vectors per list (and one list)."""
    return max(1, min(round(IVF_LISTS_PER_ROOT * math.sqrt(n)), n // IVF_MIN_PER_LIST))


@dataclass
class FaissSearch:
    """A built faiss index over a gallery and what it is: kind ("flat", "ivf", "hnsw"), its
    parameters (nlist, nprobe; M, efSearch), the recall@TUNE_K it reached on the tuning queries
    (None for the exact "flat") and the seconds its build and tuning took. `index` is None once
    dropped for missing its recall target (the gallery is then searched exactly)."""

    kind: str
    index: object
    params: dict
    recall: float | None
    build_s: float

    def describe(self) -> str:
        parts = [f"{k}={v}" for k, v in self.params.items()]
        parts += [] if self.recall is None else [f"recall@{TUNE_K} {self.recall:.3f} on gallery queries"]
        dropped = "" if self.index is not None else ": below the target, searched exactly instead"
        return f"{self.kind} ({', '.join(parts + [f'built in {self.build_s:.1f} s'])}){dropped}"


def build_faiss_search(embeddings: torch.Tensor, kind: str, target_recall: float = TUNE_RECALL,
                       seed: int = SEED) -> FaissSearch:
    """faiss index of `kind` over (N, E) unit `embeddings` (inner product = cosine), its search-time
    parameter tuned to `target_recall` (`tune`; the last value tried when none reaches it). IVF
    trains its k-means on a `seed`ed sample of the gallery itself; its nprobe stays below nlist,
    where it would scan every list."""
    import faiss  # optional: only forced or large galleries get here, and only when it is installed

    start = time.perf_counter()
    x = embeddings.numpy()  # (N, E) float32, shared with the tensor, not copied
    n, dim = x.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return FaissSearch(kind, index, {}, None, time.perf_counter() - start)
    if kind == "ivf":
        nlist = ivf_lists(n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.max_points_per_centroid = seed, IVF_TRAIN_PER_LIST
        index.train(x)
        index.add(x)
        values = [2 ** i for i in range(max(1, math.ceil(math.log2(nlist))))]  # below nlist (a full scan)
        name, setter, params = "nprobe", lambda v: setattr(index, "nprobe", v), {"nlist": nlist}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(x)
        values = [2 ** i for i in range(4, int(math.log2(HNSW_MAX_EF)) + 1)]  # 16 ... HNSW_MAX_EF
        name, setter, params = "efSearch", lambda v: setattr(index.hnsw, "efSearch", v), {"M": HNSW_M}
    else:
        raise MMQAError(f"no faiss index of kind {kind!r}: flat, ivf or hnsw")
    value, recall = tune(index, setter, values, embeddings, target_recall, seed)
    return FaissSearch(kind, index, {**params, name: value}, recall, time.perf_counter() - start)


def tune(index, set_value: Callable[[int], None], values: Sequence[int], embeddings: torch.Tensor,
         target_recall: float, seed: int = SEED) -> tuple[int, float]:
    """(the first of `values` whose recall@TUNE_K reaches `target_recall`, or the last; its recall).
    The queries are TUNE_QUERIES gallery rows drawn with `seed`; each one's own row is left out of
    its nearest neighbours, so they are the gallery's other images, as for an image query."""
    n = embeddings.shape[0]
    k = min(TUNE_K, n - 1)
    if k < 1:
        set_value(values[-1])
        return values[-1], 1.0
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:TUNE_QUERIES]  # (Q,)
    queries = embeddings[rows]  # (Q, E)
    exact = torch.topk(queries @ embeddings.T, k + 1).indices  # (Q, k + 1)
    for value in values:
        set_value(value)
        recall = recall_without_self(torch.from_numpy(index.search(queries.numpy(), k + 1)[1]), exact, rows, k)
        if recall >= target_recall:
            break
    return value, recall


def recall_without_self(found: torch.Tensor, exact: torch.Tensor, rows: torch.Tensor, k: int) -> float:
    """Mean share of each query's k exact nearest rows, its own row `rows[i]` left out, that are
    among `found[i]` — recall@k of an approximate search. found, exact: (Q, >= k) row ids."""
    hits = 0
    for f, e, own in zip(found.tolist(), exact.tolist(), rows.tolist()):
        hits += len(set([i for i in e if i != own][:k]) & set(f))
    return hits / (k * len(rows))


class ImageIndex:
    """Unit embeddings of a gallery's images, searchable by cosine similarity.

    paths: the indexed images (row i of `embeddings` is `paths[i]`); embeddings: (N, E), normalised
    here; model_id: the model that embedded them; sources: (path, size, mtime_ns) of every file asked
    for at build time, indexed or skipped (empty: tied to no files, never reused by `load_or_build`);
    skipped: (path, why) for each file that could not be read; search: how it is searched, one of
    SEARCH_KINDS ("auto": by size, see `choose_search` with `approx_threshold`).
    """

    def __init__(self, paths: Sequence[str], embeddings: torch.Tensor, model_id: str = "", *,
                 sources: Sequence[Source] = (), skipped: Sequence[tuple[str, str]] = (),
                 search: str = "auto", approx_threshold: int = APPROX_THRESHOLD):
        if embeddings.ndim != 2 or embeddings.shape[0] != len(paths):
            raise MMQAError(f"{len(paths)} paths but embeddings of shape {tuple(embeddings.shape)}: need (N, E)")
        self.paths = [str(p) for p in paths]
        self.embeddings = F.normalize(embeddings.detach().float().cpu(), dim=-1).contiguous()  # (N, E)
        self.model_id = model_id
        self.sources = [tuple(s) for s in sources]
        self.skipped = [tuple(s) for s in skipped]
        check_search_kind(search)
        self.search, self.approx_threshold = search, approx_threshold
        self._faiss: FaissSearch | None = None  # built on the first search that needs it
        self._faiss_lock = threading.Lock()  # concurrent first searches (the demo's queue) build it once

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    @property
    def search_kind(self) -> str:
        """The kind of search this gallery gets: "exact", "flat", "ivf" or "hnsw"."""
        return choose_search(len(self), self.search, self.approx_threshold)

    def describe_search(self) -> str:
        """How this gallery is searched, in words: the kind and, once built, its parameters."""
        kind = self.search_kind
        if kind == "exact":
            missing = self.search == "auto" and len(self) > self.approx_threshold  # only without faiss
            return "exact (matrix product and top-k" + ("; faiss is not installed)" if missing else ")")
        if self._faiss is not None:
            return f"faiss {self._faiss.describe()}"
        planned = {"flat": "IndexFlatIP, exact", "ivf": f"IVF-Flat, nlist={ivf_lists(len(self))}, nprobe tuned",
                   "hnsw": f"HNSW-Flat, M={HNSW_M}, efSearch tuned"}[kind]
        return f"faiss {kind} ({planned}; built on the first search)"

    # ----------------------------------------------------------------------------- build
    @classmethod
    def build(cls, embed_fn: EmbedFn, paths: Sequence[str | Path], batch_size: int = BATCH_SIZE,
              progress: bool = True, *, model_id: str, search: str = "auto",
              approx_threshold: int = APPROX_THRESHOLD) -> "ImageIndex":
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
        return cls(indexed, torch.cat(chunks), model_id, sources=sources, skipped=skipped, search=search,
                   approx_threshold=approx_threshold)

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
            "search": self.search,  # absent from older indexes: "auto"
        }
        with atomic_file(path / EMBEDDINGS) as tmp:
            save_file({"embeddings": self.embeddings}, str(tmp), metadata={"build": build})
        write_atomic(path / INDEX_JSON, json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, search: str | None = None,
             approx_threshold: int = APPROX_THRESHOLD) -> "ImageIndex":
        """The index saved in `path`, searched as it records (or as `search` says)."""
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
            search = search or meta.get("search", "auto")
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
        return cls(paths, embeddings, mid, sources=sources, skipped=skipped, search=search,
                   approx_threshold=approx_threshold)

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
        faiss_index = self.faiss_search().index if self.search_kind != "exact" else None
        if faiss_index is not None:
            scores, idx = faiss_index.search(q[None].numpy(), k)  # (1, k) each
            if (idx >= 0).all():  # else the probed IVF lists held fewer than k images: exact search
                return [(self.paths[i], float(s)) for s, i in zip(scores[0].tolist(), idx[0].tolist())]
        top = torch.topk(self.embeddings @ q, k)  # (N,) cosines -> k best
        return [(self.paths[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def faiss_search(self) -> FaissSearch:
        """The faiss index this gallery's search kind uses, built (and tuned) on the first call."""
        with self._faiss_lock:
            if self._faiss is None:  # an index's kind is fixed: its size and `search` never change
                self._faiss = build_faiss_search(self.embeddings, self.search_kind, TUNE_RECALL)
                if self._faiss.recall is not None and self._faiss.recall < TUNE_RECALL:
                    self._faiss.index = None  # no faster than exact search at that recall: freed
                    warnings.warn(f"{len(self)} images: {self._faiss.describe()} (its nearest neighbours are "
                                  f"not clustered enough for an approximate index)", stacklevel=3)
        return self._faiss


def load_or_build(model_id: str, embed_fn: EmbedFn, paths: Sequence[str | Path] | None, index_dir: str | Path, *,
                  batch_size: int = BATCH_SIZE, progress: bool = True,
                  search: str | None = None, approx_threshold: int = APPROX_THRESHOLD) -> ImageIndex:
    """The index of `paths` by the model `model_id` (see `bundle_model_id`): the one saved in
    `index_dir` when it was built by that model from these same, unchanged files; otherwise built
    afresh and saved there. `paths=None` means the files the saved index lists (an index made by
    `python -m mmqa index build`), which must then exist. `search=None` keeps the kind of search the
    saved index records (a rebuilt one too), or "auto"."""
    index_dir = Path(index_dir)
    saved = None
    if paths is None or (index_dir / INDEX_JSON).exists():
        try:
            saved = ImageIndex.load(index_dir, search, approx_threshold)
        except MMQAError as e:
            if paths is None:
                raise
            warnings.warn(f"{e}; rebuilding it", stacklevel=2)
    if paths is None:
        paths = [p for p, _, _ in saved.sources]
    if saved is not None and saved.is_current(model_id, paths):
        return saved
    search = search or (saved.search if saved is not None else "auto")
    index = ImageIndex.build(embed_fn, paths, batch_size, progress, model_id=model_id, search=search,
                             approx_threshold=approx_threshold)
    try:
        index.save(index_dir)
    except OSError as e:  # a read-only gallery: the index still works, it is only not kept
        warnings.warn(f"could not save the image index to {index_dir} ({e}); it is kept in memory only",
                      stacklevel=2)
    return index
