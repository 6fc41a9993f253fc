"""The base DeepSSIM config: every number of a run, with the paper's settings as defaults.

Config files in configs/ call `base_config()` and override a few fields (STYLE: variants
import a base and change little). Sections: data, pairs, model, optim, train, aug, eval.
"""

import ml_collections

from deepssim_jax import calibrate, evaluate, explain, report


def source_config(kind: str = "", root: str = "", **kw) -> ml_collections.ConfigDict:
  """An image set: kind 'volumes' (NIfTI; layout ixi/corr/folder/auto), 'reference'
  (<uid>/training.png + <uid>/gen-<i>.png; part 'training' or 'generated'), 'manifest'
  (CSV key,path), 'pngs' (a folder of PNGs), 'demo' (the embedded data; part real /
  synthetic / heldout) or '' (none)."""
  c = ml_collections.ConfigDict({
      "kind": kind, "root": root, "layout": "auto", "part": "", "band": (0.35, 0.65),
      "num_slices": 16, "sequences": ("T1", "T2", "PD"), "max_volumes": 0})
  c.update(kw)
  return c


IXI_HINT = """Download the IXI T1, T2 and PD images (IXI-T1.tar, IXI-T2.tar, IXI-PD.tar) and,
optionally, the demographics IXI.xls from https://brain-development.org/ixi-dataset/ ,
extract all .nii.gz files into one folder (names like IXI002-Guys-0828-T1.nii.gz, with
IXI.xls beside them) and pass it as --config.data.real.root=/path/to/IXI.
Synthetic images (optional): run ldm_jax's generation job (configs/ldm_ixi_diffusion.py)
and pass its output folder as --config.data.synth.root=/path/to/generated."""

IMAGENET_HINT = """The paper starts from torchvision's ImageNet-1k ConvNeXt weights; download
them on a machine with internet access and pass the file as --config.model.init_from=FILE:
  convnext_base (DeepSSIM): https://download.pytorch.org/models/convnext_base-6075fbad.pth
  convnext_tiny (DeepSSIM++): https://download.pytorch.org/models/convnext_tiny-983f1562.pth
(torchvision's ConvNeXt_{Base,Tiny}_Weights.IMAGENET1K_V1). timm .safetensors ConvNeXt
files and converted checkpoint folders (python -m deepssim_jax.convert) work too."""


def paper_semantics(c: ml_collections.ConfigDict, stochastic_depth: float = 0.5
                    ) -> ml_collections.ConfigDict:
  """The reference's training semantics: torchvision's stochastic depth (0.5 for
  convnext_base, linear per block), no z-scoring after augmentation, augmented validation
  pairs, one forward pass per Siamese branch."""
  c.model.overrides.drop_path_rate = stochastic_depth
  c.aug.renormalize = False
  c.train.augment_valid = True
  c.train.branches = "separate"
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 42
  c.workdir = "workdirs/run"  # default for --workdir

  c.data = ml_collections.ConfigDict()
  c.data.image_size = (136, 112)  # (H, W) after resampling
  c.data.real = source_config()   # training images of the generative model
  c.data.synth = source_config()  # synthetic images; none: pairs within the real set
  c.data.heldout = source_config()  # held-out real images (audit: Dar et al.'s threshold)
  c.data.pairs_csv = ""           # a ready pair table; empty: build workdir/pairs.csv
  c.data.test_pairs_csv = ""      # labelled pairs (real_key, synth_key, label) to evaluate
  c.data.download_hint = ""       # what to download when the data path is missing
  c.data.num_threads = 4          # image reading threads when building banks
  c.data.test_fraction = 0.0      # demo: share of synthetic images held out for evaluation
  c.data.demo = ml_collections.ConfigDict()  # demo_sets() arguments (kind 'demo' only)

  c.pairs = ml_collections.ConfigDict()
  c.pairs.num_pairs = 100_000     # the released table has roughly 10^5 pairs
  c.pairs.matched_fraction = 0.25  # share of (source, synthetic) pairs where sources are known
  # Pairs within one set (no synthetic set): this share pairs an image with itself, a copy
  # with target 1 once augmentation flips/rotates/gamma-changes each branch (ours).
  c.pairs.self_fraction = 0.0
  c.pairs.valid_fraction = 0.1    # share of synthetic images whose pairs validate
  c.pairs.batch_size = 1024       # SSIM pairs per device batch
  c.pairs.align = False           # the paper's phi: identity (reference code) or rigid alignment
  c.pairs.align_angles = tuple(round(-0.17 + 0.017 * i, 3) for i in range(21))
  c.pairs.align_flips = True
  c.pairs.balance_bins = 0        # >0: even targets over that many bins of [0, 1] (ours)
  c.pairs.pool_factor = 4.0       # balanced: targets computed for this many x num_pairs
  c.pairs.balance_repeat = False  # balanced: scarce bins repeat pairs to an even share (ours)

  c.model = ml_collections.ConfigDict()
  c.model.name = "convnext_base"
  c.model.head = "wacv"           # wacv (the paper's) or gem (DeepSSIM++: GeM on every stage)
  c.model.num_frozen_stages = 2   # freeze "stages": stem + first N stages frozen
  c.model.freeze = "stages"       # stages | reference (names holding 0 or 1) | none
  # The backbone's starting weights: a torchvision convnext .pth, a timm .safetensors or a
  # converted/trained checkpoint folder. Freezing needs it (frozen random layers are refused).
  c.model.init_from = ""
  c.model.overrides = ml_collections.ConfigDict()  # e.g. dims/depths for tiny test models
  # Compute dtype of the backbone: float32 | bfloat16 (models.COMPUTE_DTYPES). Parameters,
  # optimizer state, BatchNorm statistics, the loss and the embeddings stay float32.
  c.model.dtype = "float32"
  # K > 1: a models.Ensemble of K networks (mean cosine). Set by deepssim_jax.pretrained when
  # it joins separately trained runs into one model file; a run trains one network (1).
  c.model.ensemble = 1
  # Whether this model's scores are meant to be taken after rigid registration
  # (deepssim_jax.align): a network trained without flips and with small rotations leaves
  # its rigid invariance to the alignment. The API's and the score command's default
  # (align=None) follows it; the paper's recipe learns the invariance (False), the
  # built-in model (configs/builtin.py) does not (True).
  c.model.align = False

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-3
  c.optim.weight_decay = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip_norm = 1.0
  c.optim.schedule = "constant"   # constant (paper) or cosine
  c.optim.warmup_steps = 0
  c.optim.layer_decay = 0.0       # >0: backbone stage i of n at lr * decay**(n - i) (DeepSSIM++)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32         # global batch of pairs
  c.train.eval_batch_size = 64
  c.train.num_epochs = 40
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 0    # 0: once per epoch
  c.train.checkpoint_every_steps = 0  # 0: at every evaluation
  c.train.keep_latest = 1
  c.train.num_workers = 0         # grain worker processes (0: threads in this process)
  c.train.augment_valid = False   # validation pairs augmented like training pairs (reference)
  # joint: both branches in one batch (one BatchNorm batch); separate: one forward per
  # branch, BatchNorm statistics per branch and two running-average updates (reference).
  c.train.branches = "joint"
  # Loss weight of the pairs whose target lies in train.band (ours; 1: plain MSE, the paper).
  c.train.band = (0.5, 0.95)
  c.train.band_weight = 1.0
  # Loss weight of the pairs scored above their target (ours; 1: plain MSE, the paper).
  c.train.over_weight = 1.0

  c.aug = ml_collections.ConfigDict()
  c.aug.p_flip0 = 0.33
  c.aug.p_flip1 = 0.33
  c.aug.p_rotate = 0.33
  c.aug.max_angle = 0.17
  c.aug.p_gamma = 0.33
  c.aug.gamma_min = 0.5
  c.aug.gamma_max = 1.5
  c.aug.renormalize = True        # z-score again after augmenting (ours; reference: False)
  # Contrast randomization (ours): with p_contrast a pair's two images pass through one
  # random piecewise-linear intensity map with contrast_knots knots, and the target is
  # recomputed as their SSIM after it (augment.contrast_pairs; needs pairs.align False).
  c.aug.p_contrast = 0.0
  c.aug.contrast_knots = 6
  # A map's tissue knots spread over uniform [contrast_min_range, 1] of the range: below 1,
  # some maps are flat (weak tissue contrast over dark air, proton-density-like); 1: none.
  c.aug.contrast_min_range = 1.0
  # Shape randomization (ours): with p_shape a pair's two images go through one random
  # affine warp (per-axis log-scale +-shape_max_scale, shear +-shape_max_shear, shift
  # +-shape_max_shift of the size), target recomputed (augment.shape_pairs; pairs.align False).
  c.aug.p_shape = 0.0
  c.aug.shape_max_scale = 0.15
  c.aug.shape_max_shear = 0.1
  c.aug.shape_max_shift = 0.05
  # Resolution randomization (ours): with p_blur a pair's two images are smoothed by one
  # Gaussian of sigma uniform in [blur_min_sigma, blur_max_sigma] pixels, target recomputed
  # (augment.blur_pairs; pairs.align False).
  c.aug.p_blur = 0.0
  c.aug.blur_min_sigma = 0.5
  c.aug.blur_max_sigma = 1.5
  # Anatomy randomization (ours): with p_elastic a pair's two images go through one smooth
  # random displacement field (an elastic_grid x elastic_grid grid of control points, each
  # moved uniformly +-elastic_max_disp pixels per axis, bilinear between them), target
  # recomputed (augment.elastic_pairs; pairs.align False).
  c.aug.p_elastic = 0.0
  c.aug.elastic_grid = 5
  c.aug.elastic_max_disp = 6.0
  # Synthetic neighbours (ours): with p_neighbour a pair becomes an image and the image
  # warped by a smooth random field (neighbour_grid control points, each within +-m px, m
  # uniform in [neighbour_min_disp, neighbour_max_disp]), target their SSIM
  # (augment.neighbour_pairs; pairs.align False).
  c.aug.p_neighbour = 0.0
  c.aug.neighbour_grid = 5
  c.aug.neighbour_min_disp = 0.5
  c.aug.neighbour_max_disp = 4.0
  # Noise randomization (ours): with p_noise each image of a pair gets its own Gaussian noise
  # of one sigma uniform in [noise_min_sigma, noise_max_sigma] (z-scored units), target
  # recomputed (augment.noise_pairs; pairs.align False): scans noisier than the training heads.
  c.aug.p_noise = 0.0
  c.aug.noise_min_sigma = 0.0
  c.aug.noise_max_sigma = 0.1
  c.aug.noise_first = False  # True: noise before the contrast map, which shapes it per tissue
  c.aug.noise_keep_copies = False  # True: a noisy copy (self pair) keeps its target 1

  c.eval = ml_collections.ConfigDict()
  c.eval.checkpoint = "best"      # [workdir:]best|latest[:step] for a bare "deepssim"
  c.eval.thresholds = evaluate.PAPER_THRESHOLDS
  # A baseline the reference classifies with its own thresholds (metrics.BASELINES: SSCD
  # 0.4 / 0.6, UMS-SSCD 0.84 / 0.89, Dar 0.8030425) uses them; False: eval.thresholds for all.
  c.eval.reference_thresholds = True
  # Names of deepssim_jax.metrics.METRICS; "deepssim@<checkpoint>" compares checkpoints,
  # e.g. ("deepssim@best", "deepssim@latest", "deepssim@runs/b:best", "ssim", "pearson").
  c.eval.metrics = ("deepssim", "ssim")
  c.eval.batch_size = 64
  c.eval.chunk = 4096             # pairs scored per chunk (bounds memory)
  # Weights files of the embedding baselines (metrics.BASELINES says what to download), or
  # "random" (seeded random weights: a smoke run, never a result); unset, evaluate reports
  # the metric as missing. A TorchScript file is read only with weights_torchscript True
  # (loading one runs code).
  c.eval.weights = ml_collections.ConfigDict({"sscd": "", "ums_sscd": "", "dar": "",
                                               "semdedup": ""})
  c.eval.weights_torchscript = False
  # SemDeDup's open_clip image tower (clip.PRESETS) and activation: "gelu" (LAION, DataComp
  # weights) or "quick_gelu" (OpenAI's); a weights file of another size is refused, naming it.
  c.eval.clip = ml_collections.ConfigDict({"model": "ViT-B-32", "act": "gelu"})
  c.eval.fit_fraction = 0.5       # synthetic images whose pairs fit thresholds (0: none)
  c.eval.carlini_alpha = 0.5      # Carlini et al.'s relative L2: alpha and n nearest
  c.eval.carlini_n = 50
  c.eval.misaligned = ml_collections.ConfigDict()
  c.eval.misaligned.enabled = False  # also score after flips/rotation/gamma at p (the paper's)
  c.eval.misaligned.p = 0.8
  c.eval.misaligned.max_angle = 0.1745
  c.eval.misaligned.gamma_min = 0.5
  c.eval.misaligned.gamma_max = 1.5
  c.eval.misaligned.seed = 1234

  c.embed = ml_collections.ConfigDict()
  c.embed.sets = ("real", "synth")  # config.data entries to embed
  c.embed.checkpoint = "best"     # [workdir:]best|latest[:step]
  c.embed.batch_size = 64         # global batch (rounded up to the device count)
  c.embed.shard_rows = 4096       # images per store shard (fixes the store layout)
  c.embed.dtype = "float32"       # or float16
  c.embed.num_threads = 4         # grain threads reading images
  c.embed.dir = ""                # stores go to <dir>/<set> (default <workdir>/stores)

  c.match = ml_collections.ConfigDict()
  c.match.query = "synth"         # store matched (one row of results per image)
  c.match.reference = "real"      # store searched
  c.match.k = 5
  c.match.q_block = 256
  c.match.r_block = 8192
  c.match.full_matrix = False     # also the reference's float16 npz matrix (small sets)
  c.match.full_matrix_max_entries = 200_000_000

  c.update(audit_sections())
  return c


def audit_sections() -> ml_collections.ConfigDict:
  """The sections of the memorization audit (deepssim_jax.audit): audit, calibrate, report, explain,
  compare.

  base_config() holds them; an audit sets c.data.real / c.data.synth (and c.data.heldout
  for Dar et al.).
  """
  c = ml_collections.ConfigDict()
  c.audit = ml_collections.ConfigDict()
  c.audit.k = 5                    # training neighbours listed per synthetic image
  c.audit.thresholds = evaluate.PAPER_THRESHOLDS  # the paper's (t_low, t_high)
  c.audit.training = "real"        # config.data entries of the three sets
  c.audit.synthetic = "synth"
  c.audit.heldout = "heldout"      # '' or an unconfigured entry: no held-out set
  c.audit.out_dir = ""             # default <workdir>/audit
  c.audit.name = ""                # run name in summaries and comparisons
  # Known answers (planted copies): a CSV synth_id, memorized (0/1)[, source_id] covering
  # every synthetic image; 'auto': the demo's own labels (meta label 1 = copy) when the
  # synthetic set is a demo set, else none; '': none. Each decision rule then gets its
  # precision and recall in summary.json and the report.
  c.audit.truth = "auto"
  # Which subject (patient, volume) a training id belongs to: the regex's first group, or
  # the whole id when it does not match. The default takes the volume of '<volume>/z080'
  # slice ids; for IXI patients across sequences use r"^(IXI\d+)".
  c.audit.subject_regex = r"^(.*)/[^/]*$"
  # Registration before scoring (deepssim_jax.align): each synthetic image's align_rerank * k
  # nearest training images by plain cosine (best over the synthetic image's four flip
  # states, align.flip_candidates) are scored again after the training image is
  # rigidly aligned onto it (flips x rotations up to 9 degrees) and the best k kept; the
  # paper's classes and Dar et al.'s threshold (its held-out neighbours aligned the same way)
  # then use the aligned scores. MI and Carlini stay on the embedding's plain cosines. On
  # whenever the run's model is meant to be scored aligned (model.align).
  c.audit.align = False
  c.audit.align_rerank = 4         # candidates searched: align_rerank * k per image
  c.audit.align_chunk = 512        # synthetic images aligned per step (memory)
  c.calibrate = calibrate.default_config()
  c.report = report.default_config()
  c.explain = explain.default_config()  # explanation maps of the report's gallery pairs
  c.compare = ml_collections.ConfigDict()
  c.compare.synthetic = ()         # config.data entries, one audit each (e.g. dup_none, ...)
  c.compare.out_dir = ""           # default <workdir>/compare
  c.compare.dpi = 100
  return c


def config_changes(old, new, prefix: str) -> list[str]:
  """'a.b: old -> new' for every leaf that differs between two JSON-like dicts."""
  out = []
  for k in sorted(set(old) | set(new), key=str):
    a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_changes(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {a!r} -> {b!r}")
  return out
