"""The scorers against their definitions: raw cosine similarity, and eq. 1-2's diffusion score."""
import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache import open_table, write_table
from pipeline.config import DataConfig, EvalConfig, StudentConfig
from pipeline.data.build import build_toy
from pipeline.data.datasets import Benchmarks, benchmarks, read_index
from pipeline.data.records import load_image
from pipeline.data.keys import image_key, parse_image_key, winoground_pairs
from pipeline.evaluate import (ClipScorer, DiffusionScorer, ProjectedLatents, evaluate_projection, evaluate_student,
                               evaluate_teacher)
from pipeline.latents import image_latents, text_conditioning
from pipeline.comparison import metric_value, outcome_parts
from pipeline.models.student import build_toy_student
from pipeline.models.teacher import build_toy_teacher
from pipeline.objectives import LatentProjection

from tiny import SIZE, TEACHER


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    build_toy(DataConfig(n_train=8, n_winoground=4, n_aro=4, n_zeroshot_per_class=2), root / "data")
    bench = benchmarks(root / "data", read_index(root / "data"))
    student = build_toy_student(StudentConfig(embed_dim=16, vision_width=32, vision_layers=1, vision_heads=2,
                                              text_width=32, text_layers=1, text_heads=2), 32)
    teacher = build_toy_teacher(TEACHER, SIZE)
    images, texts = winoground_pairs(bench.winoground)
    write_table(root / "cache", "images", list(dict.fromkeys(images)), image_latents(teacher, 32), 16, 8, progress=False)
    write_table(root / "cache", "text", list(dict.fromkeys(["", *texts])), text_conditioning(teacher), 16, 8,
                progress=False)
    return bench, student, teacher, root


def test_embedding_a_paper_sized_set_shows_its_progress_and_a_toy_sized_one_none(world, capsys):
    """ImageNet's 50,000 validation images take minutes per student: a bar says how far it got."""
    _, student, _, _ = world
    scorer = ClipScorer(student, batch_size=2000)
    scorer._embed_texts([f"caption {i}" for i in range(100)])
    assert "embedding" not in capsys.readouterr().err
    scorer._embed_texts([f"caption {i}" for i in range(100, 10_100)])      # 10,000 not embedded yet
    assert "embedding captions" in capsys.readouterr().err


def test_clip_scores_are_raw_cosine_similarities(world):
    bench, student, _, _ = world
    task = bench.winoground[0]
    scores = ClipScorer(student, batch_size=3)([image_key(task.image_1)], [task.caption_0])
    with torch.no_grad():
        img = student.model.encode_image(student.preprocess(load_image(task.image_1))[None])
        txt = student.model.encode_text(student.tokenizer([task.caption_0]))
    assert scores[0] == pytest.approx(F.cosine_similarity(img, txt).item(), abs=1e-5)


def test_zeroshot_uses_the_mean_template_embedding(world):
    bench, student, _, _ = world
    shot = bench.zeroshot[0]
    accuracy = float(np.mean(ClipScorer(student, batch_size=4).zeroshot(shot)))
    with torch.no_grad():
        rows = [F.normalize(student.model.encode_text(student.tokenizer([t.format(c) for t in shot.templates])), dim=-1)
                .mean(0) for c in shot.classnames]
        classifier = F.normalize(torch.stack(rows), dim=-1)
        feats = F.normalize(student.model.encode_image(torch.stack([student.preprocess(load_image(p))
                                                                   for p in shot.images])), dim=-1)
    expected = float(((feats @ classifier.T).argmax(1).numpy() == np.asarray(shot.labels)).mean())
    assert accuracy == pytest.approx(expected)


def test_diffusion_score_is_minus_the_mean_error_over_a_shared_bank(world):
    bench, _, teacher, root = world
    cfg = EvalConfig(diffusion_samples=3, diffusion_t_min=100, diffusion_t_max=900, batch_size=4)
    latents, text = open_table(root / "cache", "images"), open_table(root / "cache", "text")
    scorer = DiffusionScorer(teacher, latents, text, cfg)
    assert scorer.timesteps.tolist() == [100, 500, 900]
    task = bench.winoground[0]
    keys, captions = [image_key(task.image_0)] * 2, [task.caption_0, task.caption_1]
    scores = scorer(keys, captions)
    for score, caption in zip(scores, captions):
        errors = []
        for t, eps in zip(scorer.timesteps, scorer.noise):
            x0 = latents.get([keys[0]])
            noisy = teacher.scheduler.add_noise(x0, eps[None], t[None])
            with torch.no_grad():
                pred = teacher.unet(noisy, t[None], encoder_hidden_states=text.get([caption])).sample
            errors.append(F.mse_loss(pred, eps[None]).item())
        assert score == pytest.approx(-np.mean(errors), rel=1e-4)
    unconditional = DiffusionScorer(teacher, latents, text, EvalConfig(**{**cfg.__dict__, "subtract_unconditional": True}))
    assert unconditional(keys, captions) == pytest.approx(scores - scorer([keys[0]], [""])[0], rel=1e-4)


def test_diffusion_score_error_option_averages_the_norm_of_the_epsilon_error(world):
    """eval.error "norm" (diffusion-itm's): minus the mean over the bank of ||eps_hat - eps||_2; the
    batched and the one-call-per-pair paths agree."""
    from pipeline.fastpath import FastPath

    bench, _, teacher, root = world
    cfg = EvalConfig(diffusion_samples=3, diffusion_t_min=100, diffusion_t_max=900, batch_size=4, error="norm")
    latents, text = open_table(root / "cache", "images"), open_table(root / "cache", "text")
    task = bench.winoground[0]
    keys, captions = [image_key(task.image_0), image_key(task.image_1)], [task.caption_0, task.caption_1]
    scorer = DiffusionScorer(teacher, latents, text, cfg)
    scores = scorer(keys, captions)
    for score, key, caption in zip(scores, keys, captions):
        norms = []
        for t, eps in zip(scorer.timesteps, scorer.noise):
            noisy = teacher.scheduler.add_noise(latents.get([key]), eps[None], t[None])
            with torch.no_grad():
                pred = teacher.unet(noisy, t[None], encoder_hidden_states=text.get([caption])).sample
            norms.append((pred - eps[None]).norm().item())
        assert score == pytest.approx(-np.mean(norms), rel=1e-4)
    plain = DiffusionScorer(teacher, latents, text, cfg, opts=FastPath.plain())(keys, captions)
    assert plain == pytest.approx(scores, rel=1e-4)
    squared = DiffusionScorer(teacher, latents, text, EvalConfig(**{**cfg.__dict__, "error": "squared"}))(keys, captions)
    assert not np.allclose(squared, scores)


def test_evaluate_student_names_every_metric(world):
    bench, student, _, _ = world
    metrics = evaluate_student(student, bench, EvalConfig(bootstrap=20, vg_attribution_min_cases=1)).metrics
    for key in ("winoground/text", "winoground/image", "winoground/group", "winoground/text/ci_low",
                "aro/vg_relation", "aro/vg_attribution", "aro/overall", "aro/coco_order",
                "zeroshot/shape", "zeroshot/colour", "zeroshot/mean"):
        assert key in metrics, key
    assert metrics["aro/overall"] == pytest.approx((metrics["aro/vg_relation"] + metrics["aro/vg_attribution"]) / 2)
    assert metrics["winoground/text/ci_low"] <= metrics["winoground/text"] <= metrics["winoground/text/ci_high"]


def test_outcomes_give_back_every_metric_they_stand_for(world):
    """Each case's correctness, kept for paired comparisons, recomputes the metric it came from:
    micro means directly, ARO's macro means through the stored groups, the composites through
    `comparison.outcome_parts`."""
    bench, student, _, _ = world
    result = evaluate_student(student, bench, EvalConfig(bootstrap=0, vg_attribution_min_cases=1))
    parts = outcome_parts([result.outcomes])
    names = ["winoground/text", "winoground/image", "winoground/group", "aro/vg_relation", "aro/vg_attribution",
             "aro/coco_order", "aro/overall", "zeroshot/shape", "zeroshot/colour", "zeroshot/mean"]
    for name in names:
        assert metric_value(parts[name]) == pytest.approx(result.metrics[name]), name
    assert len(result.outcomes["winoground/text"]["correct"]) == len(bench.winoground)
    assert result.outcomes["aro/vg_attribution"]["groups"] is not None
    assert result.outcomes["winoground/text"]["groups"] is None


def _projection_onto(student, keys: list[str], targets: torch.Tensor, scale: float) -> LatentProjection:
    """An h_w with h_w(f(x_k)) * scale = targets[k]: an exact least-squares solution, since there
    are fewer images than embedding widths + 1."""
    embeddings = ClipScorer(student, batch_size=8).image_embeddings(keys).double()
    design = torch.cat([embeddings, torch.ones(len(keys), 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, targets.flatten(1).double() / scale, driver="gelsd").solution
    projection = LatentProjection(embeddings.shape[1], tuple(targets.shape[1:]))
    with torch.no_grad():
        projection.linear.weight.copy_(solution[:-1].T.float())
        projection.linear.bias.copy_(solution[-1].float())
    return projection


def test_projected_score_is_the_diffusion_score_when_h_w_reproduces_the_vae_latents(world):
    bench, student, teacher, root = world
    cfg = EvalConfig(diffusion_samples=3, batch_size=4, bootstrap=0, vg_attribution_min_cases=1)
    latents, text = open_table(root / "cache", "images"), open_table(root / "cache", "text")
    images, captions = winoground_pairs(bench.winoground)
    keys = list(dict.fromkeys(images))
    assert len(keys) < student.model.visual.output_dim + 1
    projection = _projection_onto(student, keys, latents.get(keys), scale=2.0)
    projected = ProjectedLatents(ClipScorer(student, batch_size=8), projection, 2.0)
    assert torch.allclose(projected.get(keys), latents.get(keys), atol=1e-4)
    scores = DiffusionScorer(teacher, projected, text, cfg)(images, captions)
    assert scores == pytest.approx(DiffusionScorer(teacher, latents, text, cfg)(images, captions), abs=1e-4)
    result = evaluate_projection(student, projection, 2.0, teacher, text, bench, cfg)
    expected = evaluate_teacher(teacher, latents, text, Benchmarks(bench.winoground), cfg)
    # Every score agrees; the wall times of the two scorings (`time/...`) are measurements, not scores.
    scores_of = lambda metrics: {name: value for name, value in metrics.items() if "time/" not in name}
    expected_scores = scores_of(expected.metrics)
    assert scores_of(result.metrics) == {f"projected/{name}": value for name, value in expected_scores.items()}
    assert set(result.metrics) == {f"projected/{name}" for name in expected.metrics}
    assert result.outcomes == {f"projected/{name}": value for name, value in expected.outcomes.items()}
    assert set(expected.metrics) >= {"winoground/text", "winoground/image", "winoground/group"}


def test_projected_score_is_zero_when_h_w_ignores_the_image(world):
    """The same latent for every image: whichever caption the teacher prefers, it prefers it for
    both images of a task, so no task's text score is right (a tie is wrong too)."""
    bench, student, teacher, root = world
    cfg = EvalConfig(diffusion_samples=3, batch_size=4, bootstrap=0, vg_attribution_min_cases=1)
    text = open_table(root / "cache", "text")
    projection = LatentProjection(student.model.visual.output_dim, teacher.latent_shape)
    with torch.no_grad():
        projection.linear.weight.zero_()
    metrics = evaluate_projection(student, projection, 1.0, teacher, text, bench, cfg).metrics
    assert metrics["projected/winoground/text"] == 0.0
    assert metrics["projected/winoground/group"] == 0.0


def test_image_keys_carry_the_crop_box_exactly():
    """The cache key is where the crop is read back from: a box must survive it bit for bit."""
    box = (1234.5049, 0.1, 7, 2.0000001)
    key = image_key("/aro/images/1.jpg", box)
    for read in (key, str(key)):  # as made, and as a table stores it
        assert parse_image_key(read) == (Path("/aro/images/1.jpg"), tuple(float(v) for v in box))
    assert parse_image_key(image_key("/aro/images/1.jpg")) == (Path("/aro/images/1.jpg"), None)


def test_feedback_diagnostic_is_one_when_the_projector_adds_nothing(world):
    """A projector with zero weights leaves the empty caption's conditioning as it is: the error with
    the student's tokens equals the error without them, and the ratio is exactly 1; the error is the
    teacher's mean epsilon error over the score's bank on the diagnostic tasks' images."""
    from pipeline.evaluate import evaluate_feedback, noise_bank
    from pipeline.models.teacher import encode_text
    from pipeline.objectives import FeedbackProjector

    bench, student, teacher, root = world
    cfg = EvalConfig(diffusion_samples=2, batch_size=4, diagnostic_tasks=1)
    latents = open_table(root / "cache", "images")
    projector = FeedbackProjector(student.model.visual.output_dim, teacher.unet.config.cross_attention_dim)
    with torch.no_grad():
        projector.linear.weight.zero_()
        projector.linear.bias.zero_()
    empty = encode_text(teacher, [""])[0]
    metrics = evaluate_feedback(student, projector, teacher, latents, empty, bench, cfg).metrics
    assert metrics["feedback/error_ratio"] == 1.0
    task = bench.winoground[0]
    timesteps, noise = noise_bank(cfg, teacher.latent_shape)
    errors = []
    for key in (image_key(task.image_0), image_key(task.image_1)):
        for t, eps in zip(timesteps, noise):
            noisy = teacher.scheduler.add_noise(latents.get([key]), eps[None], t[None])
            with torch.no_grad():
                pred = teacher.unet(noisy, t[None], encoder_hidden_states=empty[None]).sample
            errors.append(F.mse_loss(pred, eps[None]).item())
    assert metrics["feedback/error_empty"] == pytest.approx(np.mean(errors), rel=1e-4)



def test_vg_attribution_averages_the_pairs_its_configured_minimum_keeps(world):
    """`eval.vg_attribution_min_cases` (ARO's 25 on the paper profile): the count was 25 on sets of
    1,000 cases or more and silently 1 below; now it is the setting's, and a count no pair reaches
    is refused rather than averaged over nothing."""
    bench, student, _, _ = world
    cases = bench.aro["vg_attribution"]
    bench = dataclasses.replace(bench, aro={**bench.aro, "vg_attribution": cases + cases[:1]})   # a pair of 2 cases
    counts = Counter(case.group for case in bench.aro["vg_attribution"])
    cut = max(counts.values())
    assert cut == 2 and min(counts.values()) == 1, counts
    result = evaluate_student(student, bench, EvalConfig(bootstrap=0, vg_attribution_min_cases=cut))
    assert set(result.outcomes["aro/vg_attribution"]["groups"]) == {g for g, n in counts.items() if n >= cut}
    with pytest.raises(ValueError, match="no group left to average"):
        evaluate_student(student, bench, EvalConfig(bootstrap=0, vg_attribution_min_cases=cut + 1))


def test_a_scorer_that_ties_everything_scores_as_each_release_breaks_ties(world):
    """Winoground, ARO's VG sets and SugarCrepe count a tie as wrong (strict comparisons); ARO's order
    sets and CLEVR take the first option, the true caption, on a tie (argmax), as their releases do."""
    from pipeline.evaluate import score_benchmarks

    bench = world[0]
    scores = score_benchmarks(lambda images, captions: np.zeros(len(images)), bench, attribution_min_cases=1).metrics
    assert scores["winoground/text"] == scores["winoground/image"] == scores["winoground/group"] == 0
    assert scores["aro/vg_relation"] == scores["aro/vg_attribution"] == 0
    assert scores["aro/coco_order"] == 1
    assert scores["sugarcrepe/mean"] == 0 and scores["clevr/mean"] == 1
