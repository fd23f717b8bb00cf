"""A tiny real trial: toy data on disk, tiny toy student and teacher, cache tables, setup + fit.

(a) an interrupted trial resumed from its checkpoint ends bit-identical to an uninterrupted one;
(b) save_trained writes only the scope's parameters, with the trainable count in the metadata;
(c) a non-finite loss stops the trial with NonFiniteLoss.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from safetensors import safe_open

from pipeline.cache import open_table, write_table
from pipeline.config import ConfigError, DataConfig, ObjectiveConfig, TrainConfig
from pipeline.data.build import build_toy
from pipeline.data.datasets import read_index, train_negatives, train_pairs
from pipeline.data.keys import image_key
from pipeline.latents import image_latents, text_conditioning
from pipeline.models.student import build_toy_student
from pipeline.models.teacher import build_toy_teacher
from pipeline.train import (CHECKPOINT, TRAINED, NonFiniteLoss, StaleCheckpoint, changed_settings, discard_checkpoint,
                            fit, load_checkpoint, load_trained, save_trained, setup, stream_seed, trained_metadata,
                            trainable_parameters, trained_state)

from tiny import SIZE, STUDENT, TEACHER

LAMBDA = 0.5
OBJECTIVE = ObjectiveConfig(lambda_sds=LAMBDA)


def train_cfg(**kw) -> TrainConfig:
    # warm-up 1 of 4 steps, so the learning rate changes every step and the schedule state matters.
    return TrainConfig(**{"steps": 4, "batch_size": 8, "checkpoint_every": 2, "log_every": 1, "lr": 1e-2,
                          "warmup_steps": 1, "seed": 3} | kw)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("trial")
    data = root / "data"
    build_toy(DataConfig(n_train=64, n_winoground=4, n_aro=4, n_zeroshot_per_class=1, image_size=SIZE), data)
    pairs = train_pairs(data, read_index(data))
    teacher = build_toy_teacher(TEACHER, SIZE)
    cache = root / "cache"
    write_table(cache, "train_text", list(dict.fromkeys(["", *(p.caption for p in pairs)])), text_conditioning(teacher),
                shard_size=32, batch_size=32, progress=False)
    write_table(cache, "train_images", list(dict.fromkeys(image_key(p.image) for p in pairs)),
                image_latents(teacher, teacher.resolution), shard_size=32, batch_size=32, progress=False)
    return {"root": root, "pairs": pairs, "teacher": teacher, "conditioning": open_table(cache, "train_text"),
            "latents": open_table(cache, "train_images"),
            "negatives": train_negatives(data, read_index(data), pairs)}


def new_trial(env, cfg: TrainConfig | None = None, objective: ObjectiveConfig = OBJECTIVE, inputs: dict | None = None):
    """What a (re)started process does: a freshly loaded student and setup from the config."""
    return setup(cfg or train_cfg(), objective, build_toy_student(STUDENT, SIZE), env["pairs"], env["teacher"],
                 env["conditioning"], env["latents"], inputs=inputs, negatives=env["negatives"])


class Interrupt(Exception):
    pass


def interrupt_at(step_to_stop: int):
    def on_log(step, _values):
        if step == step_to_stop:
            raise Interrupt(step)
    return on_log


@pytest.fixture(scope="module")
def uninterrupted(env):
    folder = env["root"] / "uninterrupted"
    trial = fit(new_trial(env), folder, progress=False)
    return trial, folder


# --------------------------------------------------------------------------- (a) resume


def test_resumed_trial_is_identical_to_an_uninterrupted_one(env, uninterrupted):
    reference, _ = uninterrupted
    assert reference.step == 4 and [h["step"] for h in reference.history] == [1, 2, 3, 4]

    folder = env["root"] / "interrupted"
    with pytest.raises(Interrupt):  # killed during step 3, after the step-2 checkpoint
        fit(new_trial(env), folder, on_log=interrupt_at(3), progress=False)
    saved = torch.load(folder / CHECKPOINT, weights_only=False)
    assert saved["step"] == 2

    logged = []
    resumed = fit(new_trial(env), folder, on_log=lambda step, _v: logged.append(step), progress=False)
    assert logged == [3, 4], "the resumed trial must run only the remaining steps"
    assert resumed.step == 4
    want, got = trained_state(reference), trained_state(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert resumed.history == reference.history
    # The trial really trained (so equality is not between two untouched initialisations).
    initial = trained_state(new_trial(env))
    assert not torch.equal(initial["visual.ln_post.weight"], want["visual.ln_post.weight"])
    assert not torch.equal(initial["h_w.linear.weight"], want["h_w.linear.weight"])


@pytest.mark.parametrize("objective", [
    ObjectiveConfig(method="negclip", lambda_sds=0.0),
    ObjectiveConfig(method="diffusion_feedback", lambda_sds=0.5, feedback_tokens=2, projector_steps=1),
    ObjectiveConfig(method="contrastive_feedback", lambda_sds=0.5, contrastive_negatives=2),
], ids=["negclip", "feedback-two-stage", "contrastive-feedback"])
def test_every_method_resumes_bit_for_bit(env, objective):
    """The hard negatives (drawn per pair and step), the feedback's patch tokens and the contrastive
    feedback's augmentations and partners (drawn from the trial's generator) come back the same after
    an interruption."""
    cfg = train_cfg(scope="full")
    reference = fit(new_trial(env, cfg, objective), env["root"] / f"ref-{objective.method}", progress=False)
    folder = env["root"] / f"int-{objective.method}"
    with pytest.raises(Interrupt):
        fit(new_trial(env, cfg, objective), folder, on_log=interrupt_at(3), progress=False)
    assert torch.load(folder / CHECKPOINT, weights_only=False)["step"] == 2
    logged = []
    resumed = fit(new_trial(env, cfg, objective), folder, on_log=lambda step, _v: logged.append(step), progress=False)
    assert logged == [3, 4], "the resumed trial must run only the remaining steps (a restart would match too)"
    assert resumed.history == reference.history
    want, got = trained_state(reference), trained_state(resumed)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_same_config_same_result(env, uninterrupted):
    """Determinism of the whole trial (the premise of the resume test)."""
    reference, _ = uninterrupted
    again = fit(new_trial(env, train_cfg(steps=2)), env["root"] / "two-steps", progress=False)
    # Same seed, data order, noise and first update (the schedules differ only from step 2 on).
    for key in ("clip", "sds", "total"):
        assert [h[key] for h in again.history] == [h[key] for h in reference.history[:2]], key


def test_checkpoint_from_other_settings_is_refused_in_one_line_and_kept(env):
    """Resuming another configuration's optimiser state would mix two trials; deleting the file
    would lose the interrupted trial's work: the error names each differing key and what to do."""
    folder = env["root"] / "changed"
    with pytest.raises(Interrupt):
        fit(new_trial(env, train_cfg(lr=1e-2)), folder, on_log=interrupt_at(3), progress=False)
    before = (folder / CHECKPOINT).read_bytes()
    with pytest.raises(StaleCheckpoint) as error:
        fit(new_trial(env, train_cfg(lr=1e-3)), folder, progress=False)
    assert isinstance(error.value, ConfigError)          # a one-line, exit-2 error in a stage
    message = str(error.value)
    assert "\n" not in message and str(folder / CHECKPOINT) in message
    assert "train.lr: 0.01 -> 0.001" in message and "remove it" in message
    assert message.count("->") == 1                      # only what differs
    assert (folder / CHECKPOINT).read_bytes() == before


def test_a_checkpoint_resumes_across_keys_its_objective_does_not_read_and_not_across_those_it_does(env):
    """Only what changes a step counts: L_CLIP alone reads no teacher key (`reduction`, another method's
    `contrastive_temperature`), so a trial interrupted under one value resumes under another, bit for
    bit as if it had run through; SDS-CLIP reads `reduction`, so there it is refused."""
    import dataclasses

    clip = ObjectiveConfig(method="clip", lambda_sds=0.0)
    reference = fit(new_trial(env, objective=clip), None, progress=False)
    folder = env["root"] / "unread"
    with pytest.raises(Interrupt):
        fit(new_trial(env, objective=clip), folder, on_log=interrupt_at(3), progress=False)
    other = dataclasses.replace(clip, reduction="sum", contrastive_temperature=0.5, noising="none")
    # As a checkpoint written before only the keys read were recorded: every key of its objective.
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    state["settings"]["objective"] = dataclasses.asdict(clip)
    torch.save(state, folder / CHECKPOINT)
    resumed = fit(new_trial(env, objective=other), folder, progress=False)
    assert resumed.history == reference.history
    want, got = trained_state(reference), trained_state(resumed)
    assert all(torch.equal(want[name], got[name]) for name in want)

    folder = env["root"] / "read"
    with pytest.raises(Interrupt):
        fit(new_trial(env), folder, on_log=interrupt_at(3), progress=False)
    with pytest.raises(StaleCheckpoint, match="objective.reduction: 'mean' -> 'sum'"):
        fit(new_trial(env, objective=dataclasses.replace(OBJECTIVE, reduction="sum", contrastive_temperature=0.5)),
            folder, progress=False)


def test_checkpoint_of_an_earlier_trainer_is_refused_in_one_line_and_kept(env):
    """Written before the loop changed what the same settings train (its settings lack `trainer`), a
    checkpoint would resume into other data orders and optimiser groups: refused, not mixed."""
    import io

    from pipeline.train import TRAINER_VERSION

    folder = env["root"] / "earlier"
    with pytest.raises(Interrupt):
        fit(new_trial(env), folder, on_log=interrupt_at(3), progress=False)
    state = torch.load(folder / CHECKPOINT, weights_only=True)
    del state["settings"]["trainer"]
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (folder / CHECKPOINT).write_bytes(buffer.getvalue())
    with pytest.raises(StaleCheckpoint, match=f"trainer: \\(absent\\) -> {TRAINER_VERSION}") as error:
        fit(new_trial(env), folder, progress=False)
    assert "\n" not in str(error.value) and (folder / CHECKPOINT).read_bytes() == buffer.getvalue()


def test_changed_settings_names_added_and_removed_keys_and_counts_long_lists():
    saved = {"train": {"lr": 0.1, "old": 1}, "trainable": [f"p{i}" for i in range(10)]}
    current = {"train": {"lr": 0.1, "new": 2}, "trainable": [f"p{i}" for i in range(12)]}
    assert changed_settings(saved, current) == ["train.new: (absent) -> 2", "train.old: 1 -> (absent)",
                                                "trainable: 10 names -> 12 names"]
    assert changed_settings(saved, saved) == []


def test_checkpoint_resumes_across_run_only_keys_but_not_from_other_inputs(env):
    """Logging, checkpoint spacing, threads and loader workers do not change what a trial computes;
    the data and model fingerprints in `inputs` do."""
    folder = env["root"] / "inputs"
    inputs = {"data": {"seed": 0}, "student": "aaaa", "teacher": "bbbb"}
    with pytest.raises(Interrupt):
        fit(new_trial(env, inputs=inputs), folder, on_log=interrupt_at(3), progress=False)
    assert (folder / CHECKPOINT).is_file()
    run_only = train_cfg(log_every=2, checkpoint_every=3, workers=1)
    assert load_checkpoint(new_trial(env, run_only, inputs=inputs), folder)
    assert load_checkpoint(new_trial(env, train_cfg(), inputs=inputs), folder)
    with pytest.raises(StaleCheckpoint, match="inputs.student: 'aaaa' -> 'cccc'"):
        load_checkpoint(new_trial(env, inputs={**inputs, "student": "cccc"}), folder)
    assert (folder / CHECKPOINT).exists()


def test_a_checkpoint_is_refused_under_another_cpu_thread_count_or_fast_path(env):
    """Sums over another number of threads round differently (tests/test_determinism.py), and another
    precision or attention kernel computes other numbers: resumed across either, a trial would end
    as neither uninterrupted run. The configured `threads` counts only as the count it comes to."""
    folder = env["root"] / "compute"
    threads = torch.get_num_threads()
    try:
        with pytest.raises(Interrupt):
            fit(new_trial(env, train_cfg(threads=1)), folder, on_log=interrupt_at(3), progress=False)
        assert load_checkpoint(new_trial(env, train_cfg(threads=1)), folder)
        torch.set_num_threads(1)
        assert load_checkpoint(new_trial(env, train_cfg(threads=0)), folder)      # 0: the process's count, 1 here
        with pytest.raises(StaleCheckpoint, match=r"compute\.threads: 1 -> 2"):
            load_checkpoint(new_trial(env, train_cfg(threads=2)), folder)
        other = new_trial(env, train_cfg(threads=1))
        other.fast = dataclasses.replace(other.fast, sdpa=not other.fast.sdpa)
        with pytest.raises(StaleCheckpoint, match=r"compute\.sdpa: "):
            load_checkpoint(other, folder)
        assert (folder / CHECKPOINT).exists()
    finally:
        torch.set_num_threads(threads)


def test_discarding_the_resume_point_removes_what_a_killed_write_left(env, tmp_path):
    """`write_bytes` writes a temp file beside the checkpoint and renames it: a kill before the rename
    leaves a file as large as the parameters and the optimiser state, which nothing else removes."""
    fit(new_trial(env, train_cfg(steps=2, checkpoint_every=2)), tmp_path, progress=False)
    stray = tmp_path / f".{CHECKPOINT}.abc123.tmp"
    stray.write_bytes(b"half a checkpoint")
    (tmp_path / "kept.txt").write_text("the trained file and the result stay")
    discard_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]


def test_a_seeds_teacher_draws_are_no_other_seeds_stream(env):
    """Seeded seed + 1, seed s's t and noise were the numbers seed s + 1's global stream (h_w's
    initialisation) starts with; each stream's seed is a hash of (seed, name), as epochs' are."""
    assert new_trial(env).generator.initial_seed() == stream_seed(3, "teacher")      # train_cfg's seed
    draws = {s: torch.rand(8, generator=torch.Generator().manual_seed(stream_seed(s, "teacher"))) for s in range(4)}
    starts = {s: torch.rand(8, generator=torch.Generator().manual_seed(s)) for s in range(5)}
    assert not any(torch.equal(d, t) for d in draws.values() for t in starts.values())
    assert len({stream_seed(s, name) for s in range(4) for name in ("teacher", "loader", 0, 1)}) == 16


def test_iterating_the_loader_leaves_the_global_stream_alone(env):
    """A DataLoader draws its workers' base seed from the global stream each time it is iterated,
    which a resumed trial does after restoring that stream: one draw the uninterrupted run took at
    step 0. The trial's loader has a generator of its own."""
    trial = new_trial(env)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    iter(trial.loader)
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------- (b) save_trained


@pytest.mark.parametrize("scope", ["layernorm", "full", "lora"])
def test_save_trained_writes_only_the_trained_parameters(env, scope):
    folder = env["root"] / f"save-{scope}"
    trial = fit(new_trial(env, train_cfg(scope=scope, steps=1)), folder, progress=False)
    path = save_trained(trial, folder)
    assert path == folder / TRAINED and path.is_file()
    expected = trainable_parameters(trial.student, trial.projector, trial.cfg) if scope != "lora" else trial.params
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        tensors = {n: f.get_tensor(n) for n in names}
    assert names == set(expected)
    assert "h_w.linear.weight" in names and "h_w.linear.bias" in names
    if scope == "layernorm":
        assert all("ln_" in n or n.startswith("h_w.") for n in names)
        assert "logit_scale" not in names and "token_embedding.weight" not in names
    elif scope == "lora":
        assert all(".lora_" in n or n.startswith("h_w.") for n in names)
    else:
        assert {n for n, _ in trial.student.model.named_parameters()} <= names
    count = sum(t.numel() for t in tensors.values())
    lora = {"lora_rank": 8, "lora_alpha": 8.0} if scope == "lora" else {}
    assert trained_metadata(path) == {"scope": scope, "trainable": count, **lora}
    # Same trial, same bytes: several metadata keys came out in a random order on every save.
    assert len({save_trained(trial, folder).read_bytes() for _ in range(8)}) == 1
    assert count == trial.trainable_count
    for name, tensor in tensors.items():
        assert torch.equal(tensor, expected[name].detach()), name

    # load_trained puts them back onto a freshly built student (h_w is skipped; adapters injected first).
    fresh = build_toy_student(STUDENT, SIZE)
    load_trained(fresh, path)
    loaded = {name for name, p in fresh.model.named_parameters() if name in names and torch.equal(p, tensors[name])}
    assert loaded == {n for n in names if not n.startswith("h_w.")}
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fresh.model.eval().encode_image(images),
                              trial.student.model.eval().encode_image(images), atol=1e-6)


# --------------------------------------------------------------------------- (c) non-finite loss


def test_nan_loss_raises_non_finite_loss(env):
    folder = env["root"] / "nan"
    trial = new_trial(env)
    with torch.no_grad():
        trial.projector.linear.weight.fill_(math.nan)
    before = trained_state(trial)
    with pytest.raises(NonFiniteLoss, match="step 0"):
        fit(trial, folder, progress=False)
    assert trial.step == 0 and not (folder / CHECKPOINT).exists()
    after = trained_state(trial)
    assert all(torch.equal(before[n], after[n]) for n in before if not n.startswith("h_w."))


def test_infinite_clip_loss_raises_non_finite_loss(env):
    trial = new_trial(env, train_cfg(scope="full"), ObjectiveConfig(method="clip", lambda_sds=0.0))
    with torch.no_grad():
        trial.student.model.logit_scale.fill_(math.inf)
    with pytest.raises(NonFiniteLoss):
        fit(trial, env["root"] / "inf", progress=False)


def test_loader_workers_give_the_same_trial(env, uninterrupted):
    """Images decoded in worker processes: the same batches, so the same trained parameters."""
    reference, _ = uninterrupted
    trial = fit(new_trial(env, train_cfg(workers=2)), env["root"] / "workers", progress=False)
    assert trial.history == reference.history
    want, got = trained_state(reference), trained_state(trial)
    assert all(torch.equal(want[name], got[name]) for name in want)


# --------------------------------------------------------------------------- (d) data order and optimiser


def test_seeds_draw_different_batches_in_every_epoch():
    """Epoch orders seeded by seed + epoch would give seed 0's second epoch the order of seed 1's
    first (at the toy's sizes, 75 of 200 steps repeated between neighbouring seeds)."""
    from pipeline.train import StepSampler

    def batches(seed: int) -> list[tuple[int, ...]]:
        sampler = iter(StepSampler(64, 8, seed))
        return [tuple(i for i, _ in next(sampler)) for _ in range(3 * 8)]   # 3 epochs of 8 batches

    drawn = {seed: batches(seed) for seed in (0, 1, 2)}
    for seed, mine in drawn.items():
        others = {b for other, theirs in drawn.items() if other != seed for b in theirs}
        assert not others & set(mine), seed
        assert sorted(i for b in mine[:8] for i in b) == list(range(64))      # an epoch is a permutation
    assert batches(1) == drawn[1]                                            # and a pure function of the seed


def test_a_reloaded_lora_student_is_bit_for_bit_the_one_that_trained(env):
    """peft's adapter on nn.MultiheadAttention merges into the frozen weight and back out at every
    forward, and W + BA - BA is not W in floating point: the trial puts W back after each step, so
    the student its trained file rebuilds (pretrained weights and adapters) is the one that trained."""
    trial = fit(new_trial(env, train_cfg(scope="lora", steps=4)), None, progress=False)
    trained = dict(trial.student.model.named_parameters())
    fresh = build_toy_student(STUDENT, SIZE)
    load_trained(fresh, save_trained(trial, env["root"] / "lora-reload"))
    differ = [name for name, p in fresh.model.named_parameters() if not torch.equal(p, trained[name])]
    assert not differ
    images = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh.model.eval().encode_image(images), trial.student.model.eval().encode_image(images))


def test_the_temperature_is_clamped_at_ln_100_as_open_clip_trains_it(env):
    """open_clip's trainer clamps logit_scale to [0, ln 100] after every step (CLIP's cap on the
    logits' scale); a full-scope trial starting above the cap ends on it."""
    student = build_toy_student(STUDENT, SIZE)
    with torch.no_grad():
        student.model.logit_scale.fill_(6.0)
    trial = setup(train_cfg(scope="full", steps=1), OBJECTIVE, student, env["pairs"], env["teacher"],
                  env["conditioning"], env["latents"])
    fit(trial, None, progress=False)
    assert float(student.model.logit_scale) == pytest.approx(math.log(100), abs=1e-6)


def test_weight_decay_spares_gains_biases_and_the_temperature(env):
    """open_clip's recipe: decay on matrices, none on LayerNorm gains, biases or logit_scale."""
    trial = new_trial(env, train_cfg(scope="full", weight_decay=0.1))
    decay = {id(p): group["weight_decay"] for group in trial.optimizer.param_groups for p in group["params"]}
    params = trial.params
    assert decay[id(params["logit_scale"])] == 0.0 and decay[id(params["visual.ln_post.weight"])] == 0.0
    assert decay[id(params["visual.transformer.resblocks.0.attn.out_proj.bias"])] == 0.0
    assert decay[id(params["visual.transformer.resblocks.0.attn.out_proj.weight"])] == 0.1
    assert decay[id(params["h_w.linear.weight"])] == 0.1 and decay[id(params["h_w.linear.bias"])] == 0.0
    assert len(decay) == len(params)


def test_the_teacher_loss_alone_trains_and_counts_the_image_tower_only(env):
    """With clip_weight 0 (DIVA's and DCR's form) nothing reaches the text tower or the temperature: they
    are neither counted as trained nor decayed, and L_CLIP is still logged."""
    objective = ObjectiveConfig(method="diffusion_feedback", lambda_sds=1.0, clip_weight=0.0)
    trial = new_trial(env, train_cfg(scope="full", weight_decay=0.5, steps=2), objective)
    assert trial.params and all(name.startswith(("visual.", "h_w.")) for name in trial.params)
    model = trial.student.model
    assert trial.trainable_count == sum(p.numel() for p in model.visual.parameters()) + \
        sum(p.numel() for p in trial.projector.parameters())
    text = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("visual.")}
    image = {name: p.detach().clone() for name, p in model.visual.named_parameters()}
    fit(trial, None, progress=False)
    assert all(torch.equal(p, text[name]) for name, p in model.named_parameters() if name in text)
    assert any(not torch.equal(p, image[name]) for name, p in model.visual.named_parameters())
    assert all(math.isfinite(entry["clip"]) for entry in trial.history), trial.history[0]


def test_each_logged_rate_is_the_one_its_step_used(env, uninterrupted):
    """Warm-up 1 of 4 steps at 1e-2, then cosine: steps 1-4 train at 1e-2 x (1, 1, 0.75, 0.25)."""
    trial, _ = uninterrupted
    assert [entry["lr"] for entry in trial.history] == pytest.approx([1e-2, 1e-2, 7.5e-3, 2.5e-3])


def test_a_batch_larger_than_the_training_pairs_is_refused_not_cut(env):
    """The batch was silently cut to the training set: a student pre-trained at batch 1000 on 96 pairs logged
    1000. The stages refuse it in one line first; the trainer never draws a cut batch."""
    n = len(env["pairs"])
    assert new_trial(env, train_cfg(batch_size=n)).loader.batch_sampler.batch_size == n
    with pytest.raises(ValueError, match=rf"^a batch of {n + 1} cannot be drawn from {n} pairs; allowed: batch_size <= {n}$"):
        new_trial(env, train_cfg(batch_size=n + 1))
