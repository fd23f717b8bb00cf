"""Typed configuration: `params.yaml` -> one validated `Config`.

`params.yaml` holds the toy world's values as its top-level sections and a `profiles`
mapping of presets (`smoke`, `paper`) whose keys are deep-merged over those sections when
`profile` names them; `profile: toy` uses the sections as they are (a null in a preset removes that key of the
sections). Every section must be in the file and every profile but toy needs its preset: a section or
preset left out would otherwise run on built-in defaults. Every key is checked
once, here: an unknown key, a wrong type or an out-of-range value raises `ConfigError`
with one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from annotated_types import Ge, Gt, Le, MinLen
from pydantic import AllowInfNan, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

PROFILES = ("smoke", "toy", "paper")
DEFAULT_PROFILE = "toy"          # the profile of a params file that names none
# The stages' output folders under the project (the params file's folder). Fixed, not keys: dvc.yaml
# names them as the data, models and cache stages' outs.
DATA_DIR, MODELS_DIR, CACHE_DIR = "data", "models", "cache"
# The checkout this code runs from (the project may be another folder: `--params`).
CODE_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the key."""


# Every config dataclass refuses unknown keys. Strictness (no True or "3" for an integer, no "yes"
# for true, no inf or nan) is in the field types, so a swept value checked against its field's type
# alone gets it too; and a strict class would refuse a mapping for a nested section.
validated = dataclass(config=ConfigDict(extra="forbid"))
PosInt = Annotated[StrictInt, Gt(0)]
NonNegInt = Annotated[StrictInt, Ge(0)]
PosFloat = Annotated[StrictFloat, AllowInfNan(False), Gt(0)]
NonNegFloat = Annotated[StrictFloat, AllowInfNan(False), Ge(0)]

# Bounds that hold on any machine (a config does not depend on the one that reads it):
# - steps: 10^9 steps of even 1 ms (a forward and backward pass of the smallest model here takes
#   longer) are 11 days without a pause; the paper's run is 3,696 steps. A larger count is a typo.
# - threads and worker processes: 1024 is above the hardware threads of the largest single machines
#   (under a thousand); more only oversubscribes the cores, and a count like 10^9 makes torch try to
#   start that many threads.
# - loss weights: float32 keeps 24 significant bits, so past 2^24 (1.7e7) times the other term's
#   weight a term's gradient is rounded away in their sum, and Adam squares the weighted gradient in
#   float32, which overflows past 1.8e19. 10^6 keeps both clear; the weights in use are 1e-3 (the
#   paper's lambda) to tens (the same weight under the other reduction, x256 on the toy's latent).
MAX_STEPS = 10**9
MAX_THREADS = 1024
MAX_WEIGHT = 1e6
# - seeds: numpy's global seeding takes 32 bits and its generators no negative seed; a seed outside
#   [0, 2^32) failed deep in a library (2^70: an overflow after the teacher had trained).
MAX_SEED = 2**32 - 1
Seed = Annotated[StrictInt, Ge(0), Le(MAX_SEED)]
Steps = Annotated[NonNegInt, Le(MAX_STEPS)]
Threads = Annotated[NonNegInt, Le(MAX_THREADS)]
Weight = Annotated[NonNegFloat, Le(MAX_WEIGHT)]

# The last DDPM step of Stable Diffusion's 1000-step schedule (the toy teacher uses it too); a
# teacher with a shorter schedule is checked against its own when it is loaded.
LAST_STEP = 999
DDPMStep = Annotated[StrictInt, Ge(0), Le(LAST_STEP)]
ARO_SETS = ("vg_relation", "vg_attribution", "coco_order", "flickr_order")
ZEROSHOT_SETS = ("imagenet", "cifar10", "cifar100", "mnist", "stl10", "food101", "pets", "flowers102", "dtd",
                 "fgvc_aircraft")
# SugarCrepe's seven subsets (RAIVNLab/sugar-crepe, data/<subset>.json) and the seven CLEVR subtasks
# of GDBench (McGill-NLP/diffusion-itm, data/clevr/captions/<subtask>.json), in their releases' order.
SUGARCREPE_SUBSETS = ("add_obj", "add_att", "replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")
CLEVR_SUBTASKS = ("pair_binding_size", "pair_binding_color", "recognition_color", "recognition_shape", "spatial",
                  "binding_color_shape", "binding_shape_color")


@validated
class DataConfig:
    """Where the datasets come from and, for the toy world, how many of each to generate.

    `source: paper` reads the user's local copies of the paper's datasets; relative paths
    are under the folder holding params.yaml. README "Running the paper profile" says
    where to get each one and which layout each key expects:
      train_set        "coco" (MS-COCO 2017 captions) or "cc3m" (appendix H)
      coco_annotations captions_train2017.json of the COCO 2017 release
      coco_images      the train2017/ image folder
      caption_choice   which of an image's ~5 captions pairs with it: "first" (lowest
                       annotation id), "random" (one per image, drawn with `seed`), "all"
      cc3m             a TSV file (columns `filepath`, `title`; paths relative to it) or a
                       folder of webdataset shards (*.tar of <key>.jpg + <key>.txt)
      winoground       a local copy of the hub repo (data/examples.jsonl + data/images.zip, or its
                       Parquet version data/test-*.parquet)
                       or the hub id facebook/winoground (gated: `huggingface-cli login`)
      aro_root         folder of visual_genome_relation.json, visual_genome_attribution.json
                       and images/ (the ARO authors' release)
      coco_order_root  folder of coco_karpathy_test.json and val2014/ (COCO-Order)
      flickr_order_root folder of flickr30k_test.json and flickr30k-images/ (Flickr30k-Order)
      aro_sets         which of the four ARO sets to read
      order_tagger     part-of-speech tagger of the order shuffles: "spacy:<model>" (as ARO:
                       spaCy, e.g. spacy:en_core_web_sm) or a JSON lexicon file {word: UPOS tag}
      zeroshot_root    torchvision root holding each zero-shot set in torchvision's own layout
                       (ImageNet under <zeroshot_root>/imagenet)
      zeroshot_sets    which zero-shot sets (the paper's Fig. 2 has all ten)
      sugarcrepe_root  the release's data/ folder: add_att.json ... swap_obj.json ("" = not scored)
      sugarcrepe_images the COCO 2017 val2017/ image folder SugarCrepe's filenames name
      sugarcrepe_subsets which SugarCrepe subsets to score
      mmvp_root        folder of MMVP-VLM's Questions.csv and its image folder, spelled
                       "MLLM_VLM Images" (the release's script) or "MLLM_VLM_Images" (DIVA's)
                       ("" = not scored)
      clevr_root       folder of captions/<subtask>.json and images/ (GDBench's CLEVR; "" = not scored)
      clevr_subtasks   which CLEVR subtasks to score. The paper's appendix J reports one CLEVR
                       score (diffusion score 0.67; ViT-L/14 0.63 -> 0.65) without saying which
                       tasks it averages; it takes the diffusion score from Krojer et al. (2023),
                       whose GDBench CLEVR holds these seven binary caption choices. Default: all
                       seven, the accuracy over all their cases (GDBench's overall "Accuracy").
    The toy world generates its SugarCrepe-, MMVP- and CLEVR-style sets in the same formats;
    `sugarcrepe_subsets` and `clevr_subtasks` select among them as among the real ones.
    """

    source: Literal["toy", "paper"] = "toy"
    seed: Seed = 0
    image_size: Annotated[StrictInt, Ge(16), Le(1024)] = 32
    n_train: PosInt = 4000
    n_winoground: PosInt = 200
    n_aro: PosInt = 300                            # cases per ARO-style set
    n_zeroshot_per_class: PosInt = 20
    n_sugarcrepe: PosInt = 30                      # cases per SugarCrepe-style subset
    n_mmvp: PosInt = 15                            # pairs per MMVP-style pattern
    n_clevr: PosInt = 15                           # CLEVR-style images (2 cases per image and subtask)
    # --- source: paper (see the docstring and the README section "Running the paper profile")
    train_set: Literal["coco", "cc3m"] = "coco"
    coco_annotations: StrictStr = ""
    coco_images: StrictStr = ""
    caption_choice: Literal["first", "random", "all"] = "first"
    cc3m: StrictStr = ""
    winoground: StrictStr = "facebook/winoground"
    aro_root: StrictStr = ""
    coco_order_root: StrictStr = ""
    flickr_order_root: StrictStr = ""
    aro_sets: list[Literal[ARO_SETS]] = field(default_factory=lambda: list(ARO_SETS))
    order_tagger: StrictStr = "spacy:en_core_web_sm"
    zeroshot_root: StrictStr = ""
    zeroshot_sets: list[Literal[ZEROSHOT_SETS]] = field(default_factory=lambda: list(ZEROSHOT_SETS))
    sugarcrepe_root: StrictStr = ""
    sugarcrepe_images: StrictStr = ""
    sugarcrepe_subsets: list[Literal[SUGARCREPE_SUBSETS]] = field(default_factory=lambda: list(SUGARCREPE_SUBSETS))
    mmvp_root: StrictStr = ""
    clevr_root: StrictStr = ""
    clevr_subtasks: list[Literal[CLEVR_SUBTASKS]] = field(default_factory=lambda: list(CLEVR_SUBTASKS))

    def __post_init__(self) -> None:
        for key in ("aro_sets", "zeroshot_sets", "sugarcrepe_subsets", "clevr_subtasks"):
            values = getattr(self, key)
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ConfigError(f"data.{key}: {repeated[0]!r} is listed twice")
        for key in ("sugarcrepe_subsets", "clevr_subtasks"):
            if not getattr(self, key):
                raise ConfigError(f"data.{key}: empty; list at least one (an empty root leaves the benchmark out)")
        tagger = self.order_tagger
        if not (tagger.startswith("spacy:") and len(tagger) > 6) and not tagger.endswith(".json"):
            raise ConfigError(f"data.order_tagger: {tagger!r} is not allowed; expected 'spacy:<model>' "
                              "(e.g. spacy:en_core_web_sm) or a .json lexicon file")
        if not self.winoground:
            raise ConfigError("data.winoground: empty; expected a local folder or a hub id (facebook/winoground)")


@validated
class TeacherConfig:
    """The text-to-image latent diffusion teacher (diffusers components).

    `source: toy` trains a small one on the toy world; `pretrained` loads a diffusers
    repo id or local folder (Stable Diffusion for the paper).
    """

    source: Literal["toy", "pretrained"] = "toy"
    name: StrictStr = "toy-ldm"
    pretrained: StrictStr = ""
    latent_channels: PosInt = 4
    vae_channels: list[StrictInt] = field(default_factory=lambda: [32, 64, 64])
    unet_channels: list[StrictInt] = field(default_factory=lambda: [64, 128])
    # Attention heads of each UNet block (diffusers' `attention_head_dim`, which SD v1 configs use
    # as the head count). Few wide heads learn the toy world's colour-shape binding in fewer steps
    # than SD's 8 (4 channels each at this width), and each step runs faster on a CPU.
    unet_heads: PosInt = 2
    text_width: PosInt = 64
    text_layers: PosInt = 2
    text_heads: PosInt = 4
    max_length: Annotated[StrictInt, Ge(8), Le(77)] = 16    # text tokens
    vae_steps: Steps = 600
    unet_steps: Steps = 1500
    batch_size: PosInt = 64                                 # UNet training batch
    vae_batch_size: PosInt = 32
    lr: PosFloat = 1e-3
    # Min-SNR loss weighting (Hang et al., 2023): each step's loss times min(SNR(t), gamma) / SNR(t),
    # so the easy low-noise steps stop dominating the gradient; 0 = the plain mean over steps.
    min_snr_gamma: NonNegFloat = 0.0
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    seed: Seed = 0
    # Torch threads of the toy teacher's training. The trained weights depend on it (sums taken in
    # another order round differently, and 2000 steps amplify that), so it is set here, not taken
    # from the machine's core count: the same config trains the same teacher on any machine with
    # the same instruction set.
    threads: Annotated[Threads, Gt(0)] = 1
    # Pretrained teachers: the precision the models stage stores the weights in (the
    # prediction type then comes from the repo's scheduler config, not `prediction_type`).
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


@validated
class StudentConfig:
    """One CLIP student: an open_clip model name (+ pretrained tag) or a small toy config.

    `source: pretrained`: `model` is an open_clip model name and `pretrained` an open_clip
    pretrained tag (e.g. "openai", "laion2b_s34b_b88k"), a checkpoint file, or a folder in
    open_clip's hub layout (open_clip_config.json + weights). OpenAI weights need the
    QuickGELU model names (`ViT-B-16-quickgelu`); the other keys are the toy's.
    """

    source: Literal["toy", "pretrained"] = "toy"
    model: StrictStr = "toy-vit"                   # open_clip model name
    pretrained: StrictStr = ""
    embed_dim: PosInt = 64
    vision_width: PosInt = 128
    vision_layers: PosInt = 3
    vision_heads: PosInt = 4
    patch_size: PosInt = 4
    text_width: PosInt = 64
    text_layers: PosInt = 2
    text_heads: PosInt = 4
    context_length: Annotated[StrictInt, Ge(8), Le(77)] = 16
    pretrain_steps: Steps = 800
    batch_size: PosInt = 128
    lr: PosFloat = 1e-3
    seed: Seed = 0
    # Torch threads of the toy student's pre-training: fixed for the reason `TeacherConfig.threads` is.
    threads: Annotated[Threads, Gt(0)] = 1


@validated
class CacheConfig:
    """The latent/text-conditioning cache written once and read by every trial."""

    shard_size: PosInt = 1024                      # records per shard
    batch_size: PosInt = 128


METHODS = ("clip", "sds", "unet_feature", "negclip", "diffusion_feedback", "contrastive_feedback")
# The methods with a teacher term, and the name a trial logs that term under (`loss/<name>` each step).
TEACHER_LOSSES = {"sds": "sds", "unet_feature": "unet_feature", "diffusion_feedback": "feedback",
                  "contrastive_feedback": "contrastive"}
TEACHER_METHODS = tuple(TEACHER_LOSSES)
# The methods whose projector puts the student's image tokens into the teacher's conditioning.
FEEDBACK_METHODS = ("diffusion_feedback", "contrastive_feedback")
PROJECTORS = ("linear", "mlp")                 # objective.projector: the feedback projector's kinds
# The objective keys a trial's training reads (`train.teacher_loss`, `train.setup`): every objective's,
# negclip's, and, with a teacher loss, those of every teacher method and of its own.
OBJECTIVE_KEYS = ("method", "lambda_sds", "clip_weight")
METHOD_KEYS = {"negclip": ("negclip_neighbours",)}
TEACHER_KEYS = ("projector_steps", "projector_lr", "t_min", "t_max")
TEACHER_METHOD_KEYS = {
    "sds": ("reduction", "noising", "gradient", "latent_scale"),
    "unet_feature": ("reduction", "latent_scale"),
    "diffusion_feedback": ("reduction", "projector", "feedback_tokens", "feedback_timesteps"),
    "contrastive_feedback": ("projector", "feedback_tokens", "contrastive_negatives", "contrastive_temperature"),
}


@validated
class ObjectiveConfig:
    """What fine-tuning minimises: L = clip_weight L_CLIP (L_NegCLIP for negclip) + lambda_sds L_teacher.

    method (default "sds"):
      clip                L_CLIP alone (lambda_sds must be 0).
      sds                 the paper: L_SDS = ||unet(noised h_w(f(x)), t, c) - eps||^2, h_w a linear
                          map of the image embedding into the teacher's latent, c the caption's
                          conditioning; the gradient reaches h_w and the student through the frozen UNet.
      unet_feature        appendix A.2: h_w(f(x)) regressed onto the UNet's mid-block features of
                          the image's noised VAE latent under its caption.
      negclip             NegCLIP (Yuksekgonul et al.): L_CLIP with one hard-negative caption per
                          image added to the text side of the batch (image-to-text direction only),
                          drawn from the data stage's `negatives` of the training caption (toy: swaps
                          of the toy grammar; COCO: NegCLIP's swaps of noun phrases, verb phrases and
                          same-tag words), and with negclip_neighbours, a hard-negative image per
                          image. lambda_sds must be 0.
      diffusion_feedback  DIVA's and DCR's form: the student's image tokens, through a trainable
                          projector (`projector`), are added to the teacher's conditioning of the empty
                          caption (in place of a caption; the CLS alone at every position); the
                          frozen UNet denoises the image's cached VAE latent at a sampled step and
                          L_teacher is its epsilon error.
      contrastive_feedback  DCR's loss on the same conditioning: the frozen UNet's outputs for the
                          image's noised latent under its own conditioning (the anchor), under that
                          of an augmented view of the image and under other images' (negatives);
                          L_teacher is InfoNCE on their cosines: the anchor's to the teacher's
                          target (eps, or v for a v-prediction teacher) and to the augmented view's
                          output are the positives, its cosines to the negatives' outputs the rest
                          of the softmax (`objectives.contrastive_loss`).
    lambda_sds        weight of the teacher's loss (the paper's lambda); 0 trains no h_w/projector.
    clip_weight       weight of the contrastive loss (1). DIVA and DCR train the student with
                      the generative loss alone: clip_weight 0, which trains the scope's image-tower
                      parameters only (nothing else is reached) and logs L_CLIP without training on it.
    reduction         ||.||^2 of the teacher's loss: "mean" over the latent's elements (and the
                      batch), or "sum" over each sample's elements, then the batch mean (the
                      equation read literally). They differ by the element count: 16,384 for SD's
                      4 x 64 x 64 latent, 256 for the toy's 4 x 8 x 8, which rescales lambda_sds.
    projector_lr      learning rate of h_w / the projector (0: train.lr): a layer trained from
                      random weights may need a larger rate than a pretrained student's weights.
    projector         the feedback methods' projector: "linear", one Linear(d, D) (DIVA's), or
                      "mlp", DCR's LayerNorm(d), Linear(d, D), GELU, Linear(D, D). h_w stays the
                      paper's linear map, so sds and unet_feature allow only "linear".
    projector_steps   the first N of train.steps train only h_w (sds, unet_feature) or the
                      projector (diffusion_feedback, contrastive_feedback) on L_teacher, the
                      student frozen; then the scope joins with the full loss (an h_w warm-up;
                      like GenHancer's two stages, whose first trains its denoiser too).
    negclip_neighbours  negclip: the k training images nearest each image by the pretrained student's
                      image embedding (cosine; NegCLIP: 3, by CLIP's); each step one of them joins the
                      batch with its caption and a hard negative of that caption, so the contrastive
                      batch is twice train.batch_size images (NegCLIP's 256 + 256 against 1,024
                      captions). 0: hard-negative captions only.
    feedback_tokens   diffusion_feedback and contrastive_feedback: patch tokens given to the
                      teacher beside the CLS embedding, drawn at random for each timestep (DIVA:
                      76; DCR: 0, the CLS alone).
    feedback_timesteps  diffusion_feedback: timesteps per image and step, each with its own noise;
                      L_teacher is the mean of their errors (DIVA: 2). Each costs a UNet pass.
    contrastive_negatives  contrastive_feedback: other images of the batch whose conditionings give
                      each image's negatives, drawn at random each step; 0: every other image (DCR's,
                      train.batch_size^2 UNet rows a step). Each image costs k + 2 UNet rows.
    contrastive_temperature  contrastive_feedback: the softmax temperature of the cosines (DCR: 0.1).
    noising           sds: "noise" feeds the UNet h_w(f(x)) noised to step t and regresses the
                      noise (DreamFusion's SDS); "none" feeds h_w(f(x)) itself as the noisy latent.
    gradient          sds: "backprop" differentiates the literal loss through the frozen UNet;
                      "sds" uses DreamFusion's gradient w(t) (eps_hat - eps) with the UNet under
                      no-grad (no UNet backward at all).
    t_min, t_max      the DDPM steps the teacher losses sample from.
    latent_scale      a factor on h_w's output (sds, unet_feature).

    Like noising, gradient and the rest, the keys of one method are ignored by the others (so one
    sweep base serves them all), but for those a run would otherwise log with a value it did not
    run with: lambda_sds (0 for a method with no teacher loss), projector ("mlp" only where a
    feedback projector trains), projector_steps (0 without a teacher loss) and feedback_timesteps
    (1 but for diffusion_feedback with a teacher loss).

    For sds and diffusion_feedback, a v-prediction teacher's output is converted to its epsilon
    estimate before the error is taken (eps_hat = sqrt(abar_t) v_hat + sqrt(1 - abar_t) x_t), so
    their loss is the paper's epsilon error whatever the teacher predicts; contrastive_feedback takes
    its cosines on the teacher's own output and target (v for a v teacher, as DCR does), and
    unet_feature regresses features, not a prediction.
    """

    method: Literal[METHODS] = "sds"
    lambda_sds: Weight = 1e-3
    clip_weight: Weight = 1.0
    reduction: Literal["mean", "sum"] = "mean"
    projector_steps: NonNegInt = 0
    projector_lr: NonNegFloat = 0.0                # 0: train.lr
    projector: Literal[PROJECTORS] = "linear"
    negclip_neighbours: NonNegInt = 3
    feedback_tokens: NonNegInt = 0
    feedback_timesteps: PosInt = 1
    contrastive_negatives: NonNegInt = 0           # 0: every other image of the batch
    contrastive_temperature: PosFloat = 0.1
    noising: Literal["noise", "none"] = "noise"
    gradient: Literal["backprop", "sds"] = "backprop"
    t_min: DDPMStep = 20                           # smallest DDPM step sampled
    t_max: Annotated[DDPMStep, Ge(1)] = 980        # largest DDPM step sampled
    latent_scale: PosFloat = 1.0                   # factor on h_w's output

    @property
    def teacher_loss(self) -> bool:
        """Whether the objective has a teacher term (and so an h_w or projector to train)."""
        return self.method in TEACHER_METHODS and self.lambda_sds > 0

    @property
    def read_keys(self) -> tuple[str, ...]:
        """The keys this objective's training reads (`OBJECTIVE_KEYS` ...): what a checkpoint must have
        been trained under to be resumed. The others are another method's, unread here."""
        keys = OBJECTIVE_KEYS + METHOD_KEYS.get(self.method, ())
        return keys + (TEACHER_KEYS + TEACHER_METHOD_KEYS[self.method] if self.teacher_loss else ())

    @property
    def reported_losses(self) -> set[str]:
        """The losses every logged step of a trial reports (`train.loss_step`'s keys): the teacher
        term under its method's name, and L_CLIP except while stage one trains the projector alone."""
        names = {"total"} | ({"clip"} if self.projector_steps == 0 else set())
        if self.teacher_loss:
            names.add(TEACHER_LOSSES[self.method])
        return names

    def __post_init__(self) -> None:
        if self.method not in TEACHER_METHODS and self.lambda_sds != 0:
            raise ConfigError(f"objective.lambda_sds: {self.lambda_sds:g} with objective.method {self.method!r}, which "
                              "has no teacher loss; allowed: 0 (or a method with one: " + ", ".join(TEACHER_METHODS) + ")")
        if self.projector == "mlp" and not (self.method in FEEDBACK_METHODS and self.teacher_loss):
            raise ConfigError(f"objective.projector: 'mlp' with objective.method {self.method!r} and "
                              f"objective.lambda_sds {self.lambda_sds:g}, which train no feedback projector; allowed: "
                              "'linear', or 'mlp' with objective.lambda_sds > 0 and a method among "
                              + ", ".join(FEEDBACK_METHODS))
        if self.projector_steps and not self.teacher_loss:
            raise ConfigError(f"objective.projector_steps: {self.projector_steps} needs a teacher loss to train the "
                              "projector on; allowed: 0, or a method among " + ", ".join(TEACHER_METHODS)
                              + " with objective.lambda_sds > 0")
        if self.feedback_timesteps != 1 and not (self.method == "diffusion_feedback" and self.teacher_loss):
            raise ConfigError(f"objective.feedback_timesteps: {self.feedback_timesteps} with objective.method "
                              f"{self.method!r} and objective.lambda_sds {self.lambda_sds:g}, which run no diffusion "
                              "feedback; allowed: 1, or more with objective.lambda_sds > 0 and method "
                              "diffusion_feedback")
        if self.clip_weight == 0 and not self.teacher_loss:
            raise ConfigError("objective.clip_weight: 0 leaves no loss (no teacher loss either); allowed: > 0")


@validated
class TrainConfig:
    """One fine-tuning trial.

    scope: what the student trains (h_w / the projector always train with a teacher loss; with
    objective.clip_weight 0, only the scope's image-tower part, which alone that loss reaches):
      layernorm  every LayerNorm of both towers (the paper's setting)
      full       every student parameter, the temperature included
      lora       low-rank adapters (peft) on both towers' attention (q, k, v and output
                 projections) and MLP linears, rank `lora_rank`, scale lora_alpha / lora_rank
    """

    student: StrictStr = "toy-vit"
    scope: Literal["layernorm", "full", "lora"] = "layernorm"
    lora_rank: PosInt = 8
    lora_alpha: PosFloat = 8.0
    lr: PosFloat = 5e-5
    weight_decay: NonNegFloat = 0.0
    warmup_steps: NonNegInt = 0
    batch_size: PosInt = 32
    steps: Annotated[Steps, Gt(0)] = 300
    seed: Seed = 0
    log_every: PosInt = 10
    checkpoint_every: PosInt = 100
    threads: Threads = 0                           # torch threads, 0 = all cores
    # DataLoader worker processes decoding the training images (0: in the training process, enough
    # for the toy world; a GPU at the paper's sizes needs several to keep up).
    workers: Threads = 0

    def __post_init__(self) -> None:
        # The rate would still be rising when training stops: train.lr is never reached.
        if self.warmup_steps > self.steps:
            raise ConfigError(f"train.warmup_steps: {self.warmup_steps} is longer than train.steps ({self.steps}), "
                              f"so train.lr is never reached; allowed: <= {self.steps}")


@validated
class EvalConfig:
    """Scoring of the benchmarks."""

    diffusion_samples: PosInt = 16                 # (t, eps) pairs per caption
    diffusion_t_min: DDPMStep = 50
    diffusion_t_max: Annotated[DDPMStep, Ge(1)] = 950
    subtract_unconditional: StrictBool = False
    # The per-sample error averaged over the (t, eps) bank: "squared" (the paper's eq. 1, the mean
    # squared epsilon error) or "norm" (its L2 norm, as diffusion-itm averages it).
    error: Literal["squared", "norm"] = "squared"
    # Also score a trained h_w: the teacher's Winoground-style diffusion score with each image's
    # latent replaced by h_w(f(x)) (`projected/winoground/...`; `pipeline.evaluate.evaluate_projection`).
    # It tells whether L_SDS made the student's projected embedding carry what the teacher reads.
    projected_score: StrictBool = True
    # The diagnostics of a trial (the projected score, diffusion feedback's error ratio) read the first
    # N Winoground-style tasks (0: all): they explain a result, so a few hundred tasks are enough,
    # and each costs as many teacher calls as the diffusion score of its tasks.
    diagnostic_tasks: NonNegInt = 200              # 0 = every task
    batch_size: PosInt = 128
    bootstrap: NonNegInt = 1000                    # resamples of every interval; 0: none in the evaluation
    seed: Seed = 0
    # VG-Attribution's macro mean counts the attribute pairs with at least this many cases (ARO's
    # release: 25, over its 28,748 cases); a smaller set needs a smaller count to keep any pair.
    vg_attribution_min_cases: PosInt = 25

    def __post_init__(self) -> None:
        if self.bootstrap == 1:     # one draw has no spread: every interval would be a point
            raise ConfigError("eval.bootstrap: 1 is not allowed; expected 0 (no intervals) or at least 2 resamples")


@validated
class TrackingConfig:
    """MLflow: a local SQLite store by default (relative paths are under the repo root)."""

    uri: StrictStr = "sqlite:///mlruns/mlflow.db"
    experiment: StrictStr = "sds-clip"

    def __post_init__(self) -> None:
        # MLflow refuses an empty name only when the first run is created, after the work it records.
        if not self.experiment.strip():
            raise ConfigError(f"tracking.experiment: {self.experiment!r} is not allowed; expected an MLflow experiment name")


@validated
class ComputeConfig:
    """Where the cache, the scorers and the trials run, and the fast path's options.

    `auto` picks per device: on CUDA bf16 autocast (fp32 master weights), channels-last
    and torch.compile of the frozen UNet; on a CPU fp32, eager (bf16 is slower on CPUs
    without native bf16, and compiling does not pay back in a short trial). Every option
    keeps the numbers within the tolerances of tests/test_fastpath.py.
      device                 auto (cuda if available, else cpu), cpu, cuda, cuda:N
      precision              auto | bf16 | fp16 | fp32: autocast of the student's and UNet's forward
      compile                auto | off | a torch.compile mode: the teacher's UNet
      channels_last          auto | true | false: the UNet's convolutions in NHWC
      gradient_checkpointing recompute activations in the backward pass (small GPUs)
    """

    device: StrictStr = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: Literal["auto", "off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "auto"
    channels_last: Literal["auto", True, False] = "auto"
    gradient_checkpointing: StrictBool = False

    def __post_init__(self) -> None:
        # torch.device refuses a leading zero ("cuda:01") with a traceback, and keeps an index in 8 bits
        # (cuda:255 reads as the default GPU, cuda:9999 as cuda:15).
        if not re.fullmatch(r"auto|cpu|cuda(:(0|[1-9]\d?|1[01]\d|12[0-7]))?", self.device):
            raise ConfigError(f"compute.device: {self.device!r} is not allowed; expected auto, cpu, cuda or cuda:N")


@validated
class Config:
    profile: Literal[PROFILES] = DEFAULT_PROFILE
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    students: Annotated[dict[StrictStr, StudentConfig], MinLen(1)] = field(
        default_factory=lambda: {"toy-vit": StudentConfig()})
    cache: CacheConfig = field(default_factory=CacheConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    # Sweep files (paths relative to params.yaml) the `sweep` stage runs on this profile.
    sweeps: list[StrictStr] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, path in enumerate(self.sweeps):
            if not path.endswith((".yaml", ".yml")):
                raise ConfigError(f"sweeps[{i}]: {path!r} is not allowed; expected a sweep file path ending in .yaml")
        if self.train.student not in self.students:
            raise ConfigError(
                f"train.student: {self.train.student!r} is not a student; allowed: {sorted(self.students)}"
            )
        objective = self.objective
        if objective.projector_steps >= self.train.steps:
            raise ConfigError(f"objective.projector_steps: {objective.projector_steps} leaves none of "
                              f"train.steps ({self.train.steps}) to train the student; allowed: < {self.train.steps}")
        batch = self.train.batch_size
        if objective.method == "contrastive_feedback" and objective.teacher_loss:
            if batch < 2:
                raise ConfigError(f"train.batch_size: {batch} leaves objective.method 'contrastive_feedback' no "
                                  "negatives (an image's are the batch's other images); allowed: >= 2")
            if objective.contrastive_negatives >= batch:
                raise ConfigError(f"objective.contrastive_negatives: {objective.contrastive_negatives} is not allowed "
                                  f"with train.batch_size {batch} (an image's negatives are the batch's other images); "
                                  f"allowed: < {batch}")
        if objective.t_min >= objective.t_max:
            raise ConfigError(f"objective.t_min: {objective.t_min} must be below objective.t_max ({objective.t_max})")
        if self.eval.diffusion_t_min >= self.eval.diffusion_t_max:
            raise ConfigError(
                f"eval.diffusion_t_min: {self.eval.diffusion_t_min} must be below eval.diffusion_t_max"
            )
        if self.teacher.source == "toy":
            _check_toy_teacher(self.teacher, self.data.image_size)
        for name, student in self.students.items():
            _check_pretrained_student(name, student)
            if student.source == "toy":
                _check_toy_student(name, student, self.data.image_size)
        if self.data.source == "toy" and self.data.n_aro < 2:    # half of them are the order set's
            raise ConfigError(f"data.n_aro: {self.data.n_aro} is not allowed; the toy order set has n_aro // 2 cases, "
                              "and a set needs one; allowed: >= 2")
        if self.teacher.source == "pretrained" and not self.teacher.pretrained:
            raise ConfigError("teacher.pretrained: empty; expected a diffusers repo id "
                              "(e.g. CompVis/stable-diffusion-v1-4) or a local folder")

    @property
    def student(self) -> StudentConfig:
        """The student the train stage fine-tunes."""
        return self.students[self.train.student]


# The sections params.yaml's top level must hold: Config's mapping-valued fields. A section left out
# would run on the dataclass defaults instead of the file's values without a word; within a section a
# key left out takes its documented default (presets and the paper's students set only what differs).
SECTIONS = tuple(name for name, tp in typing.get_type_hints(Config).items()
                 if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict)
# What a profile's preset may set: the sections dvc.yaml reads from the active preset as well, and
# tracking (where runs are recorded, not what they compute). compute, sweeps and profile are read from
# the top level only: a preset's would change what the stages run unseen by DVC, or relabel the runs.
PRESET_SECTIONS = tuple(name for name in SECTIONS if name != "compute")


def norm_groups(channels: list[int]) -> int:
    """The GroupNorm groups of a toy teacher's VAE or UNet with these block widths."""
    return min(32, channels[0])


def _check_toy_teacher(teacher: TeacherConfig, image_size: int) -> None:
    """Shapes diffusers and transformers would only refuse after the data is loaded, or that would
    encode the images at another size than the teacher trained on."""
    for key, channels in (("vae_channels", teacher.vae_channels), ("unet_channels", teacher.unet_channels)):
        if not channels or any(c <= 0 for c in channels):
            raise ConfigError(f"teacher.{key}: {channels} is not allowed; expected a non-empty list of positive integers")
        groups = norm_groups(channels)
        if any(c % groups for c in channels):
            raise ConfigError(f"teacher.{key}: {channels} is not allowed; every entry must be a multiple of "
                              f"{groups} (the GroupNorm groups, min(32, first entry))")
    # The VAE halves the image once per entry but the first, the UNet the latent likewise: a size they do
    # not divide would be encoded at the smaller size the UNet's resolution comes to (Teacher.resolution).
    down = 2 ** (len(teacher.vae_channels) - 1 + len(teacher.unet_channels) - 1)
    if image_size % down:
        raise ConfigError(f"data.image_size: {image_size} is not allowed with the toy teacher's "
                          f"{len(teacher.vae_channels)} VAE and {len(teacher.unet_channels)} UNet levels; allowed: a "
                          f"multiple of {down}")
    bad = [c for c in teacher.unet_channels if c % teacher.unet_heads]
    if bad:
        raise ConfigError(f"teacher.unet_heads: {teacher.unet_heads} does not divide teacher.unet_channels {bad}")
    if teacher.text_width % teacher.text_heads:
        raise ConfigError(f"teacher.text_heads: {teacher.text_heads} does not divide teacher.text_width "
                          f"({teacher.text_width})")


def _check_toy_student(name: str, student: StudentConfig, image_size: int) -> None:
    """Shapes open_clip refuses only once the student is built, after the teacher has trained (heads
    that do not divide the width, a patch larger than the image), and patches that would drop pixels."""
    key = f"students.{name}"
    for tower in ("vision", "text"):
        width, heads = getattr(student, f"{tower}_width"), getattr(student, f"{tower}_heads")
        if width % heads:
            raise ConfigError(f"{key}.{tower}_heads: {heads} does not divide {key}.{tower}_width ({width})")
    if student.patch_size > image_size or image_size % student.patch_size:
        raise ConfigError(f"{key}.patch_size: {student.patch_size} is not allowed; it must divide data.image_size "
                          f"({image_size}), so that every pixel is in a patch")


def _check_pretrained_student(name: str, student: StudentConfig) -> None:
    if student.source != "pretrained":
        return
    key = f"students.{name}"
    if not student.model:
        raise ConfigError(f"{key}.model: empty; expected an open_clip model name (e.g. ViT-B-16-quickgelu)")
    if not student.pretrained:
        raise ConfigError(f"{key}.pretrained: empty; expected an open_clip pretrained tag (e.g. openai), "
                          "a checkpoint file or an open_clip hub folder")
    if student.pretrained == "openai" and not student.model.endswith("-quickgelu"):
        raise ConfigError(f"{key}.model: {student.model!r} with pretrained 'openai' must be the QuickGELU "
                          f"config {student.model + '-quickgelu'!r} (open_clip only warns, and the numbers drift)")


def type_name(tp: Any) -> str:
    """What a value of the (bare) type `tp` is, as an error message says it."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a non-empty mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[tp]


_adapter = functools.cache(TypeAdapter)
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")
_SIGNS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def validate(tp: Any, data: Any, key: str = "") -> Any:
    """`data` as `tp` (a config dataclass, or a field's type with its constraints), keys named from `key`.

    pydantic finds every problem; the one reported is the first in `data`'s own order, unknown keys
    of a mapping before its other keys, so the message does not depend on the order of the fields.
    """
    try:
        return _adapter(tp).validate_python(data)
    except ValidationError as err:
        first = min(err.errors(include_url=False), key=lambda error: _position(error, data))
        raise ConfigError(_message(first, tp, key)) from None


def _position(error: dict, data: Any) -> list:
    """A sort key: where `error` lies in `data`, an unknown key of a mapping before its other keys."""
    loc, rank = error["loc"], []
    for depth, part in enumerate(loc):
        if error["type"] in _UNKNOWN and depth == len(loc) - 1:
            return rank + [(0, str(part))]
        keys = list(data) if isinstance(data, dict) else range(len(data)) if isinstance(data, list) else ()
        if part not in keys:
            break
        rank.append((1, keys.index(part)))
        data = data[part]
    return rank


def _bare(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def _locate(tp: Any, loc: tuple, key: str) -> tuple[str, Any]:
    """The name of the value at `loc` in a `tp` (after `key`; list items as [i]) and its bare type."""
    for part in loc:
        tp = _bare(tp)
        if typing.get_origin(tp) is list:
            key, tp = f"{key}[{part}]", typing.get_args(tp)[0]
        else:
            key = f"{key}.{part}" if key else str(part)
            tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else typing.get_args(tp)[-1]
    return key, _bare(tp)


def _message(error: dict, tp: Any, key: str) -> str:
    kind, loc, value = error["type"], error["loc"], error["input"]
    if kind == "value_error":               # a ConfigError of a __post_init__ check, naming its own keys
        return str(error["ctx"]["error"])
    if loc[-1:] == ("[key]",):              # a student's name that YAML read as a number
        return f"{_locate(tp, loc[:-1], key)[0]}: {value!r} is not allowed as a name; expected a string"
    where, tp_there = _locate(tp, loc, key)
    if kind in _UNKNOWN:
        fields = dataclasses.fields(_locate(tp, loc[:-1], key)[1])
        return f"{where}: unknown key; allowed keys: {', '.join(sorted(f.name for f in fields))}"
    if kind in _SIGNS:
        (bound,) = error["ctx"].values()
        shown = float(value) if tp_there is float else value       # the number as the field holds it
        short = f"{bound:g}"                                         # 1e+09, but 2^32 - 1 in full
        return f"{where}: {shown!r} is out of range; allowed: {_SIGNS[kind]} {short if float(short) == bound else bound}"
    # An integer past the largest float is refused as not a float; it is an infinite number.
    if kind == "finite_number" or (tp_there is float and type(value) is int):
        return f"{where}: {value!r} is not allowed; expected a finite number"
    return f"{where}: {value!r} is not allowed; expected {type_name(tp_there)}"


def deep_merge(base: dict, override: dict, drop_null: bool = False) -> dict:
    """`override` over `base`, recursing into mappings; lists and scalars are replaced.

    With `drop_null`, a null in `override` removes the key (how a preset drops an entry of
    the base sections, e.g. the toy student under the paper profile).
    """
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if value is None and drop_null:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value, drop_null)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve(params: Any, overrides: dict | None = None, source: str = "params.yaml") -> dict:
    """The config mapping of a params file (as read; `source` names it): its sections, then the
    profile's preset, then overrides."""
    if params is None or params == {}:
        raise ConfigError(f"{source}: empty; a params file holds the sections {', '.join(SECTIONS)} "
                          "(and a preset under `profiles` for each profile but toy)")
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    overrides = overrides or {}
    presets = params.get("profiles") or {}
    if not isinstance(presets, dict):
        raise ConfigError(f"profiles: {presets!r} is not allowed; expected a mapping of profile name to preset")
    base = {key: value for key, value in params.items() if key != "profiles"}
    # The keys besides the sections first: a misspelt section is named as unknown, not as missing.
    from_dict({**{key: value for key, value in base.items() if key not in SECTIONS}, "profile": "toy"})
    missing = [name for name in SECTIONS if name not in base]
    if missing:
        raise ConfigError(f"{missing[0]}: missing; {source} must hold every section the stages read: "
                          f"{', '.join(SECTIONS)}")
    from_dict({**base, "profile": "toy"})  # the sections alone, so their errors carry their own names
    for name, preset in presets.items():
        if name not in PROFILES:
            raise ConfigError(f"profiles.{name}: unknown profile; allowed: {', '.join(PROFILES)}")
        if not isinstance(preset, dict):
            raise ConfigError(f"profiles.{name}: {preset!r} is not allowed; expected a mapping of sections")
        unset = [key for key in preset if key not in PRESET_SECTIONS]
        if unset:
            raise ConfigError(f"profiles.{name}.{unset[0]}: a preset cannot set it (dvc.yaml tracks it at the top "
                              f"level only); set it there; allowed in a preset: {', '.join(PRESET_SECTIONS)}")
        # A null drops a key of the sections; a whole section dropped would run on the defaults.
        dropped = [key for key in SECTIONS if key in preset and preset[key] is None]
        if dropped:
            raise ConfigError(f"profiles.{name}.{dropped[0]}: null would remove the whole section; "
                              "allowed: a mapping of the keys the preset changes ({} for none)")
        # Every preset is checked, not only the selected one: a typo waits for nobody.
        try:
            from_dict(deep_merge(base, {**preset, "profile": name}, drop_null=True))
        except ConfigError as err:
            raise ConfigError(f"profiles.{name}.{err}") from None
    profile = overrides.get("profile", params.get("profile", DEFAULT_PROFILE))
    if profile not in PROFILES:
        raise ConfigError(f"profile: {profile!r} is not allowed; expected one of {', '.join(PROFILES)}")
    # Without its preset a profile would silently run the toy world's sections.
    if profile != "toy" and profile not in presets:
        raise ConfigError(f"profiles.{profile}: missing; profile {profile!r} merges its preset over the sections "
                          f"(only toy runs them alone); add it under `profiles` in {source}")
    return deep_merge(deep_merge(base, presets.get(profile) or {}, drop_null=True), overrides)


def from_dict(data: dict) -> Config:
    """Validate a resolved mapping into a Config."""
    return validate(Config, data)


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """Safe YAML that refuses duplicate keys and reads scalars as YAML 1.2's core schema does, as DVC
    reads params.yaml: 1e-4 is a number, not a string; only true and false are booleans (`compile:
    off` is the word off, not false); integers are decimal (010 is ten, not octal eight) or 0o / 0x;
    1:30 is a string, not the sexagesimal 90."""


_BOOL, _INT, _FLOAT = (f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float"))
# YAML 1.1's resolvers for these three out; the core schema's in.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(_INT, re.compile(r"""^[-+]?(?:0b[01][01_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*
                                                   |[0-9][0-9_]*)$""", re.X), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    """SafeLoader's int constructor reads a leading 0 as octal and 1:30 as base 60; here a leading 0 is
    decimal and only 0b, 0o and 0x prefixes name another base (ruamel's YAML 1.2, DVC's reader)."""
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.removeprefix("+"))
    base = {"0b": 2, "0o": 8, "0x": 16}.get(digits[:2].lower(), 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


_Loader.add_constructor(_INT, _int)


def _no_duplicates(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}; each key may appear once")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def parse_yaml(text: str) -> Any:
    """YAML text as `read_yaml` reads it (raises yaml.YAMLError, or ConfigError for a repeated key)."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | Path) -> Any:
    """params.yaml or a sweep file, read the same way (one-line ConfigErrors naming the file)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot be read ({type(err).__name__})") from None
    try:
        return parse_yaml(text)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: {yaml_problem(err)}") from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """Where and why a text is not YAML, in one line: "line 3 is not valid YAML: expected ',' or ']', but got
    '<stream end>' (in a flow sequence from line 2)" (an unclosed bracket is found where the text ends)."""
    mark, context, start = (getattr(err, name, None) for name in ("problem_mark", "context", "context_mark"))
    text = f"line {mark.line + 1} is not valid YAML" if mark else "not valid YAML"
    if getattr(err, "problem", None):
        text += f": {err.problem}"
    if context and start and (not mark or start.line != mark.line):
        what = context.removeprefix("while parsing ").removeprefix("while scanning ")
        text += f" (in {what} from line {start.line + 1})"
    return text


def load(path: str | Path = "params.yaml", overrides: dict | None = None) -> Config:
    """Read, resolve and validate a params file (relative paths are under its folder)."""
    return from_dict(resolve(read_yaml(path), overrides, str(path)))


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted names for MLflow params: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat
