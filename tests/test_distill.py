"""Distillation (mmqa/compress/distill.py, experiment=distill): the KL term against a hand computation,
a student that equals its teacher has nothing to learn from it, gradients reach the student only, a
tiny distillation run through `train` writes an ordinary bundle with the teacher's vocabularies, and a
teacher of other data or no teacher at all is refused by name."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil

import pytest
import torch
from conftest import compose_cfg
from test_demo import session_bundle

from mmqa.build import build_lit_module
from mmqa.bundle import Bundle
from mmqa.compress.distill import Distiller, binary_kl, soft_kl
from mmqa.errors import ConfigError
from mmqa.train import train


def test_the_kl_term_equals_a_hand_computation():
    teacher, student = torch.tensor([[2.0, 0.0, -2.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    T = 2.0
    p = [math.exp(x / T) for x in teacher[0].tolist()]
    p = [x / sum(p) for x in p]
    q = [math.exp(x / T) for x in student[0].tolist()]
    q = [x / sum(q) for x in q]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q)) * T * T
    assert soft_kl(teacher, student, T).item() == pytest.approx(expected, rel=1e-6)
    # rows are averaged: a second, identical row leaves the value; equal logits give 0
    assert soft_kl(teacher.repeat(2, 1), student.repeat(2, 1), T).item() == pytest.approx(expected, rel=1e-6)
    assert soft_kl(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)


def test_the_binary_kl_term_equals_a_hand_computation_per_answer():
    teacher, student = torch.tensor([[2.0, 0.0, -2.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    T = 2.0
    sig = [1 / (1 + math.exp(-x / T)) for x in teacher[0].tolist()]
    q = [1 / (1 + math.exp(-x / T)) for x in student[0].tolist()]
    expected = sum(a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b)) for a, b in zip(sig, q)) * T * T
    assert binary_kl(teacher, student, T).item() == pytest.approx(expected, rel=1e-6)
    assert binary_kl(teacher.repeat(2, 1), student.repeat(2, 1), T).item() == pytest.approx(expected, rel=1e-6)
    assert binary_kl(teacher, teacher, T).item() == pytest.approx(0.0, abs=1e-7)
    # unlike the softmax form, it sees a shift of every logit (each answer's probability is its own)
    assert soft_kl(teacher, teacher + 1.0, T).item() == pytest.approx(0.0, abs=1e-6)
    assert binary_kl(teacher, teacher + 1.0, T).item() > 0.01
    with pytest.raises(ValueError, match=r"distill.vqa_form='sigmoid': not an option; valid: softmax, binary"):
        Distiller(torch.nn.Linear(1, 1), 2.0, 1.0, 1.0, vqa_form="sigmoid")


def perturbed(model):
    """A copy of `model` with every weight moved a little: a teacher that differs from its student."""
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return other


def test_a_student_equal_to_its_teacher_learns_nothing_from_it_and_only_the_student_gets_gradients(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    same = build_lit_module(cfg, model, dm, distiller=Distiller(copy.deepcopy(model), 2.0, 1.0, 1.0)).train()
    losses, _ = same.compute_losses(batch)
    assert losses["distill_vqa"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["distill_caption"].item() == pytest.approx(0.0, abs=1e-6)
    binary = build_lit_module(cfg, model, dm, distiller=Distiller(copy.deepcopy(model), 2.0, 1.0, 1.0, "binary"))
    assert binary.train().compute_losses(batch)[0]["distill_vqa"].item() == pytest.approx(0.0, abs=1e-6)

    other = perturbed(model)
    before = [p.detach().clone() for p in other.parameters()]
    student = build_lit_module(cfg, model, dm, distiller=Distiller(other, 2.0, 1.0, 1.0)).train()
    losses, _ = student.compute_losses(batch)
    assert losses["distill_vqa"] > 1e-4 and losses["distill_caption"] > 1e-4
    student.total_loss(losses).backward()
    assert all(p.grad is None for p in other.parameters())  # the teacher is not trained
    assert all(torch.equal(a, b) for a, b in zip(before, other.parameters()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert not any(n.startswith("distiller") for n, _ in student.named_parameters())  # nor saved
    assert student.loss_weights["distill_vqa"] == student.loss_weights["distill_caption"] == 1.0
    # without a teacher, no distillation terms
    assert not {"distill_vqa", "distill_caption"} & set(lit.train().compute_losses(batch)[0])


def test_the_teacher_reads_its_questions_from_a_cache_and_its_terms_stay_the_same(tiny_parts):
    cfg, dm, model, lit, batch = tiny_parts()
    teacher = perturbed(model)
    plain = Distiller(copy.deepcopy(teacher), 2.0, 1.0, 1.0)
    cached = Distiller(copy.deepcopy(teacher), 2.0, 1.0, 1.0, text_cache=1000)
    assert plain.teacher.text_cache is None  # 0 rows: no cache
    terms = [build_lit_module(cfg, model, dm, distiller=d).train().compute_losses(batch)[0] for d in (plain, cached)]
    for key in ("distill_vqa", "distill_caption"):
        assert terms[1][key].item() == pytest.approx(terms[0][key].item(), rel=1e-5)
    cache = cached.teacher.text_cache
    n = batch.num_questions
    assert (cache.hits, cache.misses) == (0, n) and len(cache.rows) > 0
    build_lit_module(cfg, model, dm, distiller=cached).train().compute_losses(batch)
    assert (cache.hits, cache.misses) == (n, n)  # the same questions again: none encoded


def test_a_tiny_distillation_run_writes_an_ordinary_bundle_with_the_teachers_vocabularies(data_dir, tmp_path):
    teacher = session_bundle(data_dir)
    teacher_dir = data_dir.parent / "demo-cross" / "bundle"
    out = tmp_path / "student"
    metrics = train(compose_cfg(data_dir, out, ["experiment=distill", f"distill.teacher={teacher_dir}",
                                                "trainer.log_every_n_steps=1"]))
    assert 0 <= metrics["test/vqa_acc"] <= 1
    student = Bundle.load(out / "bundle")
    assert student.answers == teacher.answers
    assert student.text_tokenizer.get_vocab() == teacher.text_tokenizer.get_vocab()
    assert student.decoder_tokenizer.get_vocab() == teacher.decoder_tokenizer.get_vocab()
    with open(next((out / "csv").glob("version_*/metrics.csv"))) as f:
        columns = next(csv.reader(f))
    assert {"train/distill_vqa_loss", "train/distill_caption_loss"} <= set(columns)


def test_a_teacher_of_other_answers_or_no_teacher_is_refused_by_name(data_dir, tmp_path):
    session_bundle(data_dir)
    other = tmp_path / "other"
    shutil.copytree(data_dir.parent / "demo-cross" / "bundle", other)
    answers = json.loads((other / "answers.json").read_text())
    (other / "answers.json").write_text(json.dumps(answers[:-1] + ["purple"]))
    cfg = compose_cfg(data_dir, tmp_path / "run", ["experiment=distill", f"distill.teacher={other}"])
    with pytest.raises(ConfigError, match=rf"distill.teacher={other}: its answer vocabulary .* "
                                          rf"only in the data \['{answers[-1]}'\], only in the teacher \['purple'\]"):
        train(cfg)
    assert not (tmp_path / "run" / "bundle").exists()
    (other / "answers.json").write_text(json.dumps(list(reversed(answers))))
    with pytest.raises(ConfigError, match=r"same answers in another order"):
        train(compose_cfg(data_dir, tmp_path / "run", ["experiment=distill", f"distill.teacher={other}"]))
    with pytest.raises(ConfigError, match=r"distill.teacher is required by experiment=distill"):
        train(compose_cfg(data_dir, tmp_path / "run", ["experiment=distill"]))
