"""Benchmark: the DeepSSIM embedder (ConvNeXt) forward and Siamese train step, side by side
with the PyTorch reference's network in the same run.

Theirs: torchvision's `convnext_base(weights=None)` features (the backbone the reference,
brAIn-science/DeepSSIM (arXiv 2509.16582), trains from ImageNet weights; weights do not
change the timing) followed by the reference's head, as its ImageEmbedder builds it and
deepssim_jax/convnext_keys.py maps it: AdaptiveAvgPool2d -> Flatten -> BatchNorm1d(C) ->
Linear(C, 512) -> GELU -> Dropout(0.33) -> Linear(512, 256). torch eager, float32, run in its
own process with torch.set_num_threads(cores), the number of cores XLA:CPU's pool uses here
(both are printed). Same batch, same input size, grey images repeated to 3 channels as the
reference feeds them.

Works (one row each):
  forward     eval mode, a batch of B images 3 x 136 x 112 (torch under inference_mode).
  train step  B pairs through both branches (ours: one 2B batch, as deepssim_jax.train does;
              theirs: two calls, as the reference's SimilarityNet), BatchNorm in train mode,
              dropout 0.33, stochastic depth 0.5 (torchvision convnext_base's default, which
              the reference trains with), MSE(cosine, SSIM target), global-norm clipping at 1,
              AdamW(1e-3, weight decay 1e-3) (the reference's deepssim_train.py), with a
              freezing: "ref" is the reference's rule (every backbone parameter whose
              torchvision name holds a 0 or a 1 is frozen: convnext_keys.reference_freeze_mask;
              torch: requires_grad False on the same names), N freezes the stem and the
              first N stages (torchvision features[0:2N]). Ours: optax.multi_transform with
              clip_by_global_norm + adamw on the trainable leaves, set_to_zero on the frozen
              ones; theirs: torch.optim.AdamW and clip_grad_norm_.

FLOPs (for the share of the same-run matmul rate): every side is credited with the FLOPs XLA
counts for the plain formulation (`depthwise_impl="conv"`: one grouped convolution per
depthwise layer) before its own optimisation passes, i.e. the model's arithmetic. Train-step
FLOPs depend on the freezing (frozen weights get no gradient).

Usage:
  python bench/bench_embedder.py                      # convnext_base, batch 32, 5 reps
  python bench/bench_embedder.py --quick              # convnext_atto, batch 4, 2 reps
  python bench/bench_embedder.py --model convnext_tiny --passes forward --reps 7
  python bench/bench_embedder.py --impls auto,shift --freeze 2,ref --json=/tmp/e.json
"""

import argparse
import collections
import functools
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import benchlib  # noqa: E402

# The reference's head (ImageEmbedder.fc) and training settings (deepssim_train.py).
HIDDEN, EMBED, DROPOUT = 512, 256, 0.33
LR, WEIGHT_DECAY, CLIP = 1e-3, 1e-3, 1.0


def tune_malloc(mmap_threshold: int = 2**31 - 1, trim_threshold: int = 2**31 - 1) -> bool:
  """Keeps freed memory in glibc's heap instead of returning it to the OS.

  XLA:CPU allocates every large intermediate with malloc; with glibc's defaults, blocks
  above 32 MB are mmap-ed and unmapped again each step, so every step pays page faults on
  fresh pages. Same effect as GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:
  trim_threshold=... Returns whether both settings were accepted.
  """
  import ctypes
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  ok = libc.mallopt(m_mmap_threshold, ctypes.c_int(mmap_threshold))
  ok &= libc.mallopt(m_trim_threshold, ctypes.c_int(trim_threshold))
  return bool(ok)


# ----------------------------------------------------------------------------- theirs


def torch_side(spec: dict):
  """The worker's works: the reference's embedder in torch (module docstring)."""
  import torch
  import torch.nn.functional as F
  import torchvision
  from torch import nn
  torch.set_num_threads(spec["threads"])
  torch.manual_seed(0)
  name, dims, depths = spec["model"], spec["dims"], spec["depths"]
  if name in ("convnext_tiny", "convnext_small", "convnext_base", "convnext_large"):
    backbone = getattr(torchvision.models, name)(weights=None,
                                                 stochastic_depth_prob=spec["drop_path"])
    source = f"torchvision {name}(weights=None)"
  else:  # our test widths: the same torchvision ConvNeXt class with our stage settings
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    setting = [CNBlockConfig(d, dims[i + 1] if i + 1 < len(dims) else None, n)
               for i, (d, n) in enumerate(zip(dims, depths))]
    backbone = ConvNeXt(setting, stochastic_depth_prob=spec["drop_path"])
    source = f"torchvision ConvNeXt{tuple(depths)}x{tuple(dims)}"
  c = dims[-1]
  net = nn.Sequential(collections.OrderedDict(
      feature_extractor=backbone.features,
      fc=nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.BatchNorm1d(c),
                       nn.Linear(c, HIDDEN), nn.GELU(), nn.Dropout(DROPOUT),
                       nn.Linear(HIDDEN, EMBED))))
  b, (h, w) = spec["batch"], spec["size"]
  dev = spec.get("device", "cpu")  # bench_accelerator's worker runs it on a GPU too
  g = torch.Generator(device=dev).manual_seed(0)
  x = torch.randn((b, 1, h, w), generator=g, device=dev).repeat(1, 3, 1, 1)
  xb = torch.randn((b, 1, h, w), generator=g, device=dev).repeat(1, 3, 1, 1)
  ssim = torch.rand((b, 1), generator=g, device=dev)
  features = net.feature_extractor

  def set_freeze(fz):
    for p in net.parameters():
      p.requires_grad_(True)
    if fz == "ref":  # the reference's rule, on the names of base_model.features
      frozen = [p for n, p in features.named_parameters() if "0" in n or "1" in n]
    else:
      frozen = list(features[:2 * int(fz)].parameters())
    for p in frozen:
      p.requires_grad_(False)

  def forward():
    net.eval()
    with torch.inference_mode():
      net(x)

  def train_step(opt):
    net.train()
    opt.zero_grad(set_to_none=True)
    e1 = F.normalize(net(x), p=2.0, dim=1)
    e2 = F.normalize(net(xb), p=2.0, dim=1)
    pred = F.cosine_similarity(e1, e2, dim=1, eps=1e-8).unsqueeze(1)
    F.mse_loss(pred, ssim).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), CLIP)
    opt.step()

  works, trainable = {}, {}
  if "forward" in spec["passes"]:
    works["forward"] = forward
  for fz in spec["freezes"]:
    set_freeze(fz)
    trainable[fz] = sum(p.numel() for p in net.parameters() if p.requires_grad)
    opt = torch.optim.AdamW(net.parameters(), LR, weight_decay=WEIGHT_DECAY)

    def work(fz=fz, opt=opt):
      set_freeze(fz)
      train_step(opt)
    works["train/" + fz] = work
  info = {"impl": f"torch {torch.__version__} eager, {torch.get_num_threads()} threads "
                  f"({source} + the reference's head)",
          "threads": torch.get_num_threads(), "torch": torch.__version__,
          "torchvision": torchvision.__version__,
          "params": sum(p.numel() for p in net.parameters()), "trainable": trainable}
  return works, info


# ----------------------------------------------------------------------------- ours


def labels_for(params, freeze):
  from deepssim_jax import convnext_keys, models
  import jax
  if freeze == "ref":
    return jax.tree.map(lambda t: "train" if t else "frozen",
                        convnext_keys.reference_freeze_mask(params))
  return models.trainable_labels(params, int(freeze))


def make_train_step(model, labels):
  import jax
  import jax.numpy as jnp
  import optax
  from deepssim_jax import models
  tx = optax.multi_transform(
      {"train": optax.chain(optax.clip_by_global_norm(CLIP),
                            optax.adamw(LR, weight_decay=WEIGHT_DECAY)),
       "frozen": optax.set_to_zero()}, labels)

  def step(params, batch_stats, opt_state, a, b, ssim, rng):
    def loss_fn(p):
      emb, upd = model.apply({"params": p, "batch_stats": batch_stats},
                             jnp.concatenate([a, b]), train=True, mutable=["batch_stats"],
                             rngs={"dropout": rng})
      ea, eb = jnp.split(emb, 2)
      return jnp.mean((models.cosine(ea, eb) - ssim) ** 2), upd["batch_stats"]
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return tx, step


def flops_of(fn, *args):
  """FLOPs XLA counts for fn's HLO before its own optimisation passes.

  Not the compiled module's count: XLA:CPU rewrites the grouped-conv weight gradient as a
  dense convolution (C times the work), which doubles a ConvNeXt-B train step's count. For
  the forward pass both counts agree.
  """
  return float(fn.lower(*args).cost_analysis()["flops"])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default=None, help="a key of deepssim_jax.models.MODELS "
                  "(default convnext_base; --quick: convnext_atto)")
  ap.add_argument("--batch", type=int, default=None,
                  help="images (forward) / pairs (train); default 32, --quick 4")
  ap.add_argument("--reps", type=int, default=None, help="default 5, --quick 2")
  ap.add_argument("--size", default="136,112")
  ap.add_argument("--impls", default="auto", help="comma list of depthwise_impl values")
  ap.add_argument("--passes", default="forward,train")
  ap.add_argument("--freeze", default="ref",
                  help="train-step freezings: N stages frozen, or 'ref' (reference's rule)")
  ap.add_argument("--drop_path", type=float, default=0.5)
  ap.add_argument("--matmul_n", type=int, default=2048)
  ap.add_argument("--malloc_tuning", action=argparse.BooleanOptionalAction, default=True,
                  help="keep freed memory in the heap (see tune_malloc), both sides")
  ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  benchlib.add_args(ap)
  args = ap.parse_args(argv)
  if args.worker:
    spec = json.loads(args.worker)
    if spec["malloc_tuning"]:
      tune_malloc()
    return benchlib.serve(lambda: torch_side(spec))
  tuned = args.malloc_tuning and tune_malloc()

  import jax
  import jax.numpy as jnp
  from deepssim_jax import models

  model_name = args.model or ("convnext_atto" if args.quick else "convnext_base")
  bsz = args.batch or (4 if args.quick else 32)
  reps = args.reps or (2 if args.quick else 5)
  h, w = (int(v) for v in args.size.split(","))
  passes = args.passes.split(",")
  freezes = args.freeze.split(",") if "train" in passes else []
  arch = models.MODELS[model_name].keywords

  theirs = benchlib.Worker(__file__, {
      "model": model_name, "dims": list(arch["dims"]), "depths": list(arch["depths"]),
      "batch": bsz, "size": [h, w], "passes": passes, "freezes": freezes,
      "threads": benchlib.cores(), "drop_path": args.drop_path,
      "malloc_tuning": args.malloc_tuning})
  print(f"devices: {jax.devices()}  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}  "
        f"malloc tuned: {tuned}")
  print(f"threads: jax (XLA:CPU pool) {benchlib.cores()}, torch {theirs.info['threads']}")
  anchor = benchlib.MatmulAnchor(args.matmul_n)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((bsz, h, w), np.float32))
  xb = jnp.asarray(rng.standard_normal((bsz, h, w), np.float32))
  ssim = jnp.asarray(rng.uniform(0, 1, bsz).astype(np.float32))
  key = jax.random.key(0)

  def build(impl):
    model = models.make_model(model_name, depthwise_impl=impl, drop_path_rate=args.drop_path,
                              hidden_dim=HIDDEN, embed_dim=EMBED, dropout=DROPOUT)
    variables = jax.jit(functools.partial(model.init, train=False))(key, x[:1])
    return model, variables

  # The model's FLOPs from the plain grouped-conv formulation (lowered, never run).
  conv_model, variables = build("conv")
  params, stats = variables["params"], variables["batch_stats"]
  n_params = models.param_count(params)
  print(f"{model_name}: {models.param_count(params['backbone']):,} backbone / {n_params:,} "
        f"total parameters (torch: {theirs.info['params']:,}); input {bsz} x {h} x {w}")
  true_flops, trainable = {}, {}
  if "forward" in passes:
    fwd = jax.jit(lambda v, x: conv_model.apply(v, x, train=False))
    true_flops["forward"] = flops_of(fwd, variables, x)
  for fz in freezes:
    labels = labels_for(params, fz)
    trainable[fz] = sum(int(np.prod(p.shape)) for p, lab in zip(
        jax.tree.leaves(params), jax.tree.leaves(labels)) if lab == "train")
    print(f"freeze {fz}: {trainable[fz]:,} trainable (torch: {theirs.info['trainable'][fz]:,})")
    tx, step = make_train_step(conv_model, labels)
    opt_state = jax.eval_shape(tx.init, params)
    true_flops["train/" + fz] = flops_of(jax.jit(step), params, stats, opt_state, x, xb, ssim,
                                         key)

  rows = []
  impls = args.impls.split(",")
  for impl in impls:
    model, variables = build(impl)
    params, stats = variables["params"], variables["batch_stats"]
    tag = f" [{impl}]" if len(impls) > 1 else ""
    if "forward" in passes:
      fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
      t = benchlib.interleave({"ours": lambda: jax.block_until_ready(fwd(variables, x)),
                               "theirs": theirs.timer("forward")}, reps, anchor)
      rows.append(benchlib.row(
          f"{model_name} embedder forward, eval, batch {bsz}, 3x{h}x{w}{tag}",
          benchlib.median(t["ours"]), benchlib.median(t["theirs"]), theirs.info["impl"],
          "img", bsz, flops_per_item=true_flops["forward"] / bsz,
          matmul_gflops=anchor.gflops()))
    for fz in freezes:
      tx, step = make_train_step(model, labels_for(params, fz))
      opt_state = tx.init(params)
      stepj = jax.jit(step)  # no donation: every repetition starts from the same state
      t = benchlib.interleave(
          {"ours": lambda: jax.block_until_ready(
              stepj(params, stats, opt_state, x, xb, ssim, key)),
           "theirs": theirs.timer("train/" + fz)}, reps, anchor)
      rows.append(benchlib.row(
          f"{model_name} Siamese train step, {bsz} pairs, freeze {fz} "
          f"({trainable[fz] / 1e6:.1f}M trainable){tag}",
          benchlib.median(t["ours"]), benchlib.median(t["theirs"]), theirs.info["impl"],
          "pairs", bsz, flops_per_item=true_flops["train/" + fz] / bsz,
          matmul_gflops=anchor.gflops()))
  theirs.close()
  print(f"medians of {reps} interleaved repetitions (matmul {args.matmul_n}^2 float32, ours, "
        "theirs) after one warm-up each")
  benchlib.report("bench_embedder", rows, benchlib.facts(
      torch=theirs.info["torch"], torchvision=theirs.info["torchvision"],
      torch_threads=theirs.info["threads"], model=model_name, malloc_tuned=tuned),
      args.json)


if __name__ == "__main__":
  main()
