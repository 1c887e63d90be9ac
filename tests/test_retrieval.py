"""The image index (`mmqa.image_index`) and its command (`python -m mmqa index build`): building skips and
reports unreadable files, a saved index loads back identical, a stale one (another model, changed or
other files, a damaged save) is rebuilt rather than searched, and search ranks by cosine — by the
matrix product and by faiss alike: IndexFlatIP exactly, IVF exactly when every list is probed, its
nprobe tuned to the recall target, the kind chosen by size and kept through save and load. A real
open_clip model (a tiny randomly initialised one, saved to a file here) loads by path as the search
towers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from PIL import Image
from safetensors.torch import save_file

from mmqa import image_index
from mmqa.bundle import Bundle
from mmqa.cli.index import main as index_main
from mmqa.errors import MMQAError
from mmqa.image_index import (
    EMBEDDINGS,
    INDEX_DIR,
    INDEX_JSON,
    ImageIndex,
    build_faiss_search,
    bundle_model_id,
    choose_search,
    find_images,
    ivf_lists,
    load_or_build,
    open_clip_towers,
    recall_without_self,
    tune,
)

# An open_clip CLIP small enough to build in a blink (1.6M parameters, most in the token embedding of
# open_clip's own BPE vocabulary); a model config like those in open_clip's model_configs/.
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(folder: Path, seed: int = 0, suffix: str = ".safetensors") -> tuple[Path, Path, "open_clip.CLIP"]:
    """(config file, weights file, the model itself): a randomly initialised tiny CLIP saved as a user
    would have one on disk — `mmqa-tiny-clip.json` and its weights (safetensors or a .pt state dict)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    config, weights = folder / "mmqa-tiny-clip.json", folder / f"tiny-clip-{seed}{suffix}"
    config.write_text(json.dumps(TINY_CLIP))
    if suffix == ".safetensors":
        save_file(model.state_dict(), str(weights))
    else:
        torch.save(model.state_dict(), weights)
    return config, weights, model


class PixelEmbedder:
    """A stand-in image tower: an 8x8 grey thumbnail, centred and normalised, as a 64-d unit vector
    (different images give different directions); counts the images it embedded."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images: list) -> torch.Tensor:  # -> (B, 64)
        self.calls += len(images)
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("L").resize((8, 8)), dtype=np.float32).ravel())
                         for im in images])  # (B, 64)
        return F.normalize(x - x.mean(dim=1, keepdim=True), dim=1)


def write_images(folder, n: int, seed: int = 0) -> list:
    """n random 16x16 RGB PNGs named img_00.png, ..."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def gallery(tmp_path):
    return write_images(tmp_path / "gallery", 7)


def test_find_images_is_recursive_sorted_and_leaves_out_other_and_hidden_files(tmp_path):
    for name in ("b.PNG", "a.jpg", "sub/c.jpeg", "sub/d.webp", "sub/deeper/e.bmp", "notes.txt", ".hidden.png",
                 ".mmqa-index/x.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)] == [
        "a.jpg", "b.PNG", "sub/c.jpeg", "sub/d.webp", "sub/deeper/e.bmp"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MMQAError, match="no images"):
        find_images(tmp_path / "empty")
    with pytest.raises(MMQAError, match="not a folder"):
        find_images(tmp_path / "missing")


def test_save_and_load_give_back_the_same_index(gallery, tmp_path):
    index = ImageIndex.build(PixelEmbedder(), gallery, batch_size=3, progress=False, model_id="m1")
    assert len(index) == 7 and index.dim == 64
    assert index.paths == [str(p.resolve()) for p in gallery]
    index.save(tmp_path / "idx")
    assert sorted(f.name for f in (tmp_path / "idx").iterdir()) == [EMBEDDINGS, INDEX_JSON]  # no temp files left
    back = ImageIndex.load(tmp_path / "idx")
    assert torch.equal(back.embeddings, index.embeddings)
    assert back.paths == index.paths and back.model_id == "m1"
    assert back.sources == index.sources and back.skipped == index.skipped == []


def test_an_unreadable_file_is_skipped_and_reported(gallery, tmp_path):
    bad = gallery[0].parent / "broken.png"
    bad.write_bytes(b"not a png at all")
    missing = gallery[0].parent / "gone.png"
    index = ImageIndex.build(PixelEmbedder(), [bad, *gallery, missing], batch_size=4, progress=False, model_id="m")
    assert len(index) == 7 and str(bad.resolve()) not in index.paths
    assert [p for p, _ in index.skipped] == [str(bad.resolve()), str(missing.resolve())]
    assert all("not a readable image" in why for _, why in index.skipped)
    assert ImageIndex.load(index.save(tmp_path / "idx")).skipped == index.skipped
    with pytest.raises(MMQAError, match="no image to index: 1 of 1 files could not be read.*broken.png"):
        ImageIndex.build(PixelEmbedder(), [bad], progress=False, model_id="m")


def test_load_or_build_reuses_only_an_index_of_the_same_model_and_files(gallery, tmp_path):
    embed, where = PixelEmbedder(), tmp_path / "idx"
    first = load_or_build("m1", embed, gallery, where, progress=False)
    assert embed.calls == 7
    again = load_or_build("m1", embed, gallery, where, progress=False)
    assert embed.calls == 7 and torch.equal(again.embeddings, first.embeddings)  # reused, not re-embedded

    other_model = load_or_build("m2", embed, gallery, where, progress=False)
    assert embed.calls == 14 and other_model.model_id == "m2"
    assert ImageIndex.load(where).model_id == "m2"  # the stale index was replaced on disk

    load_or_build("m2", embed, gallery[:-1], where, progress=False)  # another file list
    assert embed.calls == 20
    write_images(tmp_path / "new", 1, seed=1)[0].replace(gallery[0])  # same name, new content
    rebuilt = load_or_build("m2", embed, gallery, where, progress=False)
    assert embed.calls == 27
    query = PixelEmbedder()([Image.open(gallery[0])])[0]  # (64,)
    assert rebuilt.search_image(query, 1)[0][0] == str(gallery[0].resolve())  # the new content is indexed

    # the files the saved index lists, when no list is given (an index written by `mmqa index build`)
    assert load_or_build("m2", embed, None, where, progress=False).paths == rebuilt.paths and embed.calls == 27
    with pytest.raises(MMQAError, match="not an image index: missing index.json"):
        load_or_build("m2", embed, None, tmp_path / "nowhere", progress=False)


def test_a_damaged_or_half_written_index_is_rebuilt(gallery, tmp_path):
    embed, where = PixelEmbedder(), tmp_path / "idx"
    load_or_build("m", embed, gallery, where, progress=False)
    meta = json.loads((where / INDEX_JSON).read_text())
    (where / INDEX_JSON).write_text(json.dumps({**meta, "build": "another"}))  # embeddings of another save
    with pytest.raises(MMQAError, match="come from different builds"):
        ImageIndex.load(where)
    with pytest.warns(UserWarning, match="different builds"):
        load_or_build("m", embed, gallery, where, progress=False)
    assert embed.calls == 14 and ImageIndex.load(where).model_id == "m"
    (where / INDEX_JSON).write_text("{")
    with pytest.raises(MMQAError, match=f"{INDEX_JSON}: not a valid index file"):
        ImageIndex.load(where)


def test_search_ranks_by_cosine_on_hand_made_vectors():
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 2.0]])  # (4, 3); last not unit
    index = ImageIndex(["x", "y", "xy", "z"], emb)
    hits = index.search_text(torch.tensor([0.8, 0.6, 0.0]), 3)
    assert [p for p, _ in hits] == ["xy", "x", "y"]
    assert [s for _, s in hits] == pytest.approx([0.96, 0.8, 0.6], abs=1e-6)
    hits = index.search_image(torch.tensor([[0.0, 3.0, 0.0]]), 2)  # (1, E) and unnormalised queries work too
    assert hits == [("y", pytest.approx(1.0)), ("xy", pytest.approx(0.8))]
    assert index.search_text(torch.tensor([0.0, 0.0, -1.0]), 10)[-1] == ("z", pytest.approx(-1.0))  # k > N: all
    assert len(index.search_text(torch.tensor([0.0, 0.0, 1.0]), 10)) == 4
    with pytest.raises(MMQAError, match="k must be at least 1"):
        index.search_text(torch.tensor([1.0, 0.0, 0.0]), 0)
    with pytest.raises(MMQAError, match="2 dimensions, the index 3"):
        index.search_text(torch.tensor([1.0, 0.0]), 1)


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) unit vectors around `clusters` random unit centres (noise of norm 0.7), seeded."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, dim, generator=gen), dim=1)  # (C, dim)
    noise = 0.7 * torch.randn(n, dim, generator=gen) / dim ** 0.5  # (n, dim)
    return F.normalize(centres[torch.randint(0, clusters, (n,), generator=gen)] + noise, dim=1)


def exact_top(emb: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top = torch.topk(queries @ emb.T, k)  # (Q, k)
    return top.values, top.indices


def test_the_search_kind_is_chosen_by_size_and_can_be_forced(monkeypatch):
    pytest.importorskip("faiss")
    assert [choose_search(n, "auto", approx_threshold=100) for n in (1, 100, 101, 10**6)] == [
        "exact", "exact", "ivf", "ivf"]
    assert choose_search(50, "auto") == "exact" and choose_search(image_index.APPROX_THRESHOLD + 1) == "ivf"
    assert [choose_search(10, kind) for kind in ("exact", "flat", "ivf", "hnsw")] == ["exact", "flat", "ivf", "hnsw"]
    emb = F.normalize(torch.randn(101, 8, generator=torch.Generator().manual_seed(0)), dim=1)  # (101, 8)
    paths = [f"img{i}" for i in range(101)]
    assert ImageIndex(paths[:100], emb[:100], approx_threshold=100).search_kind == "exact"
    assert ImageIndex(paths, emb, approx_threshold=100).search_kind == "ivf"
    assert ImageIndex(paths, emb, approx_threshold=100, search="exact").search_kind == "exact"
    with pytest.raises(MMQAError, match="search must be one of auto, exact, flat, ivf, hnsw, not 'annoy'"):
        ImageIndex(paths, emb, search="annoy")

    monkeypatch.setattr(image_index, "faiss_installed", lambda: False)  # as without the faiss extra
    assert choose_search(10**6, "auto", approx_threshold=100) == "exact"
    assert ImageIndex(paths, emb, approx_threshold=100).describe_search().endswith("faiss is not installed)")
    with pytest.raises(MMQAError, match="search='ivf' needs faiss"):
        choose_search(10, "ivf")


def test_faiss_flat_gives_the_same_ranking_as_exact_search():
    pytest.importorskip("faiss")
    emb = F.normalize(torch.randn(200, 16, generator=torch.Generator().manual_seed(0)), dim=1)  # (200, 16)
    paths = [f"img{i}" for i in range(200)]
    exact, flat = ImageIndex(paths, emb), ImageIndex(paths, emb, search="flat")
    assert exact.search_kind == "exact" and flat.search_kind == "flat"
    for q in emb[:5]:
        a, b = exact.search_image(q, 10), flat.search_image(q, 10)
        assert [p for p, _ in a] == [p for p, _ in b]
        assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=1e-5)
        assert b[0] == (paths[int(torch.argmax(emb @ q))], pytest.approx(1.0, abs=1e-5))
    assert flat.describe_search() == f"faiss flat (built in {flat.faiss_search().build_s:.1f} s)"


def test_ivf_probing_every_list_returns_exactly_what_exact_search_does():
    pytest.importorskip("faiss")
    emb = clustered(3000, 32, clusters=40)  # (3000, 32)
    built = build_faiss_search(emb, "ivf")
    nlist = built.params["nlist"]
    assert nlist == ivf_lists(3000) == round(3000 ** 0.5) == 55  # sqrt(N); 3000 // 39 = 76 is no cap here
    assert built.index.ntotal == 3000 and built.index.nlist == nlist
    built.index.nprobe = nlist  # every list: an exhaustive search
    queries = F.normalize(torch.randn(20, 32, generator=torch.Generator().manual_seed(1)), dim=1)  # (20, 32)
    scores, ids = built.index.search(queries.numpy(), 10)  # (20, 10) each
    exact_scores, exact_ids = exact_top(emb, queries, 10)
    assert torch.equal(torch.from_numpy(ids), exact_ids)
    assert torch.allclose(torch.from_numpy(scores), exact_scores, atol=1e-5)


def test_ivf_is_tuned_to_the_recall_target_and_searched_through_the_index():
    pytest.importorskip("faiss")
    emb = clustered(3000, 32, clusters=40)  # (3000, 32)
    paths = [f"img{i}" for i in range(3000)]
    index = ImageIndex(paths, emb, approx_threshold=1000)
    assert index.search_kind == "ivf" and "nlist=55, nprobe tuned; built on the first search" in index.describe_search()
    hits = index.search_image(emb[7], 10)
    built = index.faiss_search()
    nprobe = built.params["nprobe"]
    assert built.index.nprobe == nprobe < built.params["nlist"] and nprobe & (nprobe - 1) == 0  # a power of two
    assert built.recall >= image_index.TUNE_RECALL
    assert f"faiss ivf (nlist=55, nprobe={nprobe}, recall@10 {built.recall:.3f}" in index.describe_search()
    assert hits[0] == ("img7", pytest.approx(1.0, abs=1e-5))
    # the ranking it returns is faiss's at the tuned nprobe, and mostly exact search's (recall, not equality)
    scores, ids = built.index.search(emb[7:8].numpy(), 10)
    assert hits == [(paths[i], pytest.approx(s, abs=1e-6)) for s, i in zip(scores[0].tolist(), ids[0].tolist())]
    noise = torch.randn(100, 32, generator=torch.Generator().manual_seed(2)) / 32 ** 0.5  # (100, 32), norm ~1
    queries = F.normalize(emb[:100] + 0.3 * noise, dim=1)  # near gallery images, not in it
    _, exact_ids = exact_top(emb, queries, 10)
    found = torch.from_numpy(built.index.search(queries.numpy(), 10)[1])
    assert recall_without_self(found, exact_ids, torch.full((100,), -1), 10) >= 0.9


def test_tuning_picks_the_first_value_that_reaches_the_target():
    emb = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)  # (50, 8)
    exact = torch.topk(emb @ emb.T, 11).indices.numpy()  # (50, 11): row i's own row first

    class Fake:  # returns exact search's neighbours when value >= 4, the same minus one neighbour below
        value = 0

        def search(self, q, k):
            rows = [int(np.argmax(emb.numpy() @ v)) for v in q]
            ids = exact[rows][:, :k].copy()
            if self.value < 4:
                ids[:, -1] = -1
            return None, ids

    fake = Fake()
    assert tune(fake, lambda v: setattr(fake, "value", v), [1, 2, 4, 8], emb, 0.95) == (4, 1.0)
    assert tune(fake, lambda v: setattr(fake, "value", v), [1, 2], emb, 0.95) == (2, pytest.approx(0.9))
    assert tune(fake, lambda v: setattr(fake, "value", v), [1, 2], emb, 0.9) == (1, pytest.approx(0.9))
    # recall leaves each query's own row out: 1 of its 2 other nearest rows found
    assert recall_without_self(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 3]]), torch.tensor([0]), 2) == 0.5
    assert recall_without_self(torch.tensor([[5, 1]]), torch.tensor([[5, 0, 1]]), torch.tensor([0]), 2) == 1.0


def test_an_index_that_misses_the_recall_target_is_dropped_for_exact_search(monkeypatch):
    pytest.importorskip("faiss")
    monkeypatch.setattr(image_index, "TUNE_RECALL", 1.01)  # unreachable
    emb = clustered(2000, 16, clusters=20)  # (2000, 16)
    paths = [f"img{i}" for i in range(2000)]
    index, exact = ImageIndex(paths, emb, search="hnsw"), ImageIndex(paths, emb)
    with pytest.warns(UserWarning, match=r"2000 images: hnsw \(M=32, efSearch=1024.*searched exactly instead"):
        hits = index.search_text(emb[3], 10)
    assert index.faiss_search().index is None and index.faiss_search().params["efSearch"] == 1024
    assert hits == exact.search_text(emb[3], 10)


def test_a_saved_and_loaded_index_keeps_its_search_and_searches_the_same(tmp_path):
    pytest.importorskip("faiss")
    emb = clustered(3000, 32, clusters=40)  # (3000, 32)
    paths = [f"img{i}" for i in range(3000)]
    index = ImageIndex(paths, emb, "m", sources=[("a", 1, 1)], search="ivf")
    queries = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(3)), dim=1)  # (5, 32)
    before = [index.search_text(q, 10) for q in queries]
    index.save(tmp_path / "idx")
    assert json.loads((tmp_path / "idx" / INDEX_JSON).read_text())["search"] == "ivf"
    back = ImageIndex.load(tmp_path / "idx")
    assert back.search == "ivf" and back._faiss is None  # rebuilt (seeded) on its first search
    after = [back.search_text(q, 10) for q in queries]  # the same images; scores to float rounding (renormalised)
    assert [[p for p, _ in hits] for hits in after] == [[p for p, _ in hits] for hits in before]
    assert [s for hits in after for _, s in hits] == pytest.approx([s for hits in before for _, s in hits], abs=1e-6)
    assert back.faiss_search().params == index.faiss_search().params
    assert ImageIndex.load(tmp_path / "idx", search="exact").search_kind == "exact"  # a caller may override it


def test_load_or_build_keeps_the_search_the_saved_index_records(gallery, tmp_path):
    embed, where = PixelEmbedder(), tmp_path / "idx"
    assert load_or_build("m1", embed, gallery, where, progress=False).search == "auto"
    assert load_or_build("m1", embed, gallery, where, progress=False, search="exact").search == "exact"
    assert ImageIndex.load(where).search == "auto"  # reused as it is on disk: only searched otherwise
    load_or_build("m2", embed, gallery, where, progress=False, search="exact")  # rebuilt: recorded
    assert ImageIndex.load(where).search == "exact"
    rebuilt = load_or_build("m3", embed, gallery, where, progress=False)  # rebuilt again, kind kept
    assert rebuilt.search == "exact" and ImageIndex.load(where).search == "exact"


def test_an_image_query_finds_its_own_image_first(gallery):
    embed = PixelEmbedder()
    index = ImageIndex.build(embed, gallery, progress=False, model_id="m")
    for path in gallery:
        (best, score), (_, second) = index.search_image(embed([Image.open(path)])[0], 2)
        assert best == str(path.resolve()) and score == pytest.approx(1.0, abs=1e-5) and second < score


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory, data_dir):
    """A tiny bundle straight from its config (no training: only its embeddings' identity matters here)."""
    from mmqa.build import build_experiment

    out = tmp_path_factory.mktemp("untrained")
    cfg = compose_cfg(data_dir, out, ())
    dm, lit = build_experiment(cfg)
    return Bundle(cfg, lit.model, *dm.tokenizers, dm.answers, dm.ingredients).save(out / "bundle")


def test_the_index_command_embeds_a_folder_with_the_bundle(untrained_bundle, gallery, tmp_path, capsys):
    (gallery[0].parent / "sub").mkdir()
    (gallery[0].parent / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    folder = gallery[0].parent
    assert index_main(["build", "--bundle", str(untrained_bundle), "--images", str(folder), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "indexed 7 images" in out.out and "broken.jpg: not a readable image" in out.err
    bundle = Bundle.load(untrained_bundle)
    index = ImageIndex.load(folder / INDEX_DIR)
    assert index.paths == [str(p.resolve()) for p in gallery]
    assert index.model_id == bundle_model_id(bundle)
    assert torch.allclose(index.embeddings, bundle.embed_image(gallery), atol=1e-5)
    assert index.is_current(bundle_model_id(Bundle.load(untrained_bundle)), find_images(folder))  # id is stable

    assert index_main(["build", "--bundle", str(untrained_bundle), "--images", str(tmp_path / "none"),
                       "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "not a folder of images" in capsys.readouterr().err


def test_a_saved_open_clip_model_loads_by_path_and_embeds_like_itself(gallery, tmp_path):
    config, weights, model = save_tiny_clip(tmp_path / "clip")
    towers = open_clip_towers(str(config), str(weights))
    assert towers.name == f"open_clip mmqa-tiny-clip ({weights})"

    images = towers.embed_image(gallery[:3])  # paths
    assert images.shape == (3, 16) and torch.allclose(images.norm(dim=-1), torch.ones(3))
    assert torch.allclose(towers.embed_image([Image.open(gallery[0])]), images[:1], atol=1e-6)  # or PIL images
    preprocess = open_clip.image_transform(32, is_train=False)  # open_clip's default eval transform at 32 px
    with torch.no_grad():
        direct = F.normalize(model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB"))
                                                              for p in gallery[:3]])), dim=-1)  # (3, 16)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer("mmqa-tiny-clip")(["a red circle"])), dim=-1)
    assert torch.allclose(images, direct, atol=1e-5)  # the saved weights, not a fresh random model
    assert torch.allclose(towers.embed_text(["a red circle"]), text, atol=1e-5)

    # identity: the same weights again (here as a .pt state dict) give the same id; other weights another
    _, pt, _ = save_tiny_clip(tmp_path / "clip", suffix=".pt")
    assert open_clip_towers(str(config), str(pt)).model_id == towers.model_id
    _, other, _ = save_tiny_clip(tmp_path / "clip", seed=1)
    retrained = open_clip_towers(str(config), str(other))
    assert retrained.model_id != towers.model_id

    # an index records which towers built it: built with one CLIP, it is rebuilt for the other
    where = tmp_path / "idx"
    first = load_or_build(towers.model_id, towers.embed_image, gallery, where, progress=False)
    assert ImageIndex.load(where).model_id == towers.model_id
    rebuilt = load_or_build(retrained.model_id, retrained.embed_image, gallery, where, progress=False)
    assert ImageIndex.load(where).model_id == retrained.model_id
    assert not torch.allclose(rebuilt.embeddings, first.embeddings)
    hits = rebuilt.search_text(retrained.embed_text(["a red circle"])[0], 3)
    assert len(hits) == 3 and hits[0][1] >= hits[1][1] >= hits[2][1]


@pytest.mark.parametrize(("name", "pretrained", "message"), [
    ("missing.json", None, "missing.json: no such open_clip model config file"),
    ("mmqa-no-such-model", "weights.pt", "no such weights file"),
    ("mmqa-no-such-model", None, "could not load the open_clip model 'mmqa-no-such-model'.*list_models"),
    ("ViT-B-32", "openai", "could not load the open_clip model 'ViT-B-32' with weights 'openai'.*local"),  # offline
])
def test_an_open_clip_model_that_cannot_be_loaded_is_one_clear_error(tmp_path, name, pretrained, message):
    with pytest.raises(MMQAError, match=message):
        open_clip_towers(str(tmp_path / name) if name.endswith(".json") else name,
                         str(tmp_path / pretrained) if pretrained and "." in pretrained else pretrained)


def test_the_index_command_embeds_with_an_open_clip_model(gallery, tmp_path, capsys):
    config, weights, _ = save_tiny_clip(tmp_path / "clip")
    folder = gallery[0].parent
    assert index_main(["build", "--clip", str(config), "--clip-pretrained", str(weights), "--images", str(folder),
                       "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "indexed 7 images (16-d embeddings)" in out
    assert "search: exact (matrix product and top-k) (by size, exact up to 100,000 images)" in out
    towers = open_clip_towers(str(config), str(weights))
    index = ImageIndex.load(folder / INDEX_DIR)
    assert index.is_current(towers.model_id, find_images(folder))  # what demo.py --clip reuses
    assert torch.allclose(index.embeddings, towers.embed_image(gallery), atol=1e-5)

    pytest.importorskip("faiss")
    assert index_main(["build", "--clip", str(config), "--clip-pretrained", str(weights), "--images", str(folder),
                       "--no-progress", "--search", "hnsw"]) == 0
    assert ("search: faiss hnsw (HNSW-Flat, M=32, efSearch tuned; built on the first search) (as --search asks)"
            in capsys.readouterr().out)
    assert ImageIndex.load(folder / INDEX_DIR).search == "hnsw"
