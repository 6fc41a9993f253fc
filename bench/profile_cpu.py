"""Where the CPU time goes: the LDM's convolution and GroupNorm side by side with torch, and
a profile of each network's work by operation kind.

1. Operations at the reference networks' largest shapes, ours and torch's in the same run
   (interleaved medians, torch in its own process with as many threads as JAX):
   - the autoencoder's full-resolution 3x3 convolution (batch 16, 136 x 112, 64 -> 64) and
     the UNet's at its three levels (batch 8; 36 x 28, 256 -> 256; 18 x 14, 512; 9 x 7,
     768): forward, input gradient and kernel
     gradient, the last as XLA's own (lax.conv_general_dilated's transpose) and as ours
     (ldm_jax.kernels.kernel_grad), against aten's convolution_backward with one output;
   - GroupNorm (32 groups) at those shapes, forward and forward + backward: flax's
     nn.GroupNorm, ours (ldm_jax.kernels.group_norm_apply) and torch's F.group_norm.
2. A trace of one autoencoder + discriminator step, one UNet train step and one UNet forward
   (a DDIM step) at bench_ldm.py's sizes, and one ConvNeXt-B DeepSSIM forward at
   bench_embedder.py's (batch 32, 136 x 112) (jax.profiler, perfetto trace), with the XLA:CPU
   thread time summed by operation kind: "matmul/conv" (ops XLA:CPU hands to its YNNPACK
   library, and its own convolutions and dots), "data movement" (copies, slices,
   concatenations, transposes, pads), "elementwise + reductions" (its other fusions).

Usage: python bench/profile_cpu.py [--quick] [--json=PATH]
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # noqa: E402

# (name, batch, H, W, C) for the convolution and GroupNorm rows; --quick shrinks them.
SHAPES = [("autoencoder level 1", 16, 136, 112, 64), ("UNet level 1", 8, 36, 28, 256),
          ("UNet level 2", 8, 18, 14, 512), ("UNet level 3", 8, 9, 7, 768)]
QUICK_SHAPES = [("autoencoder level 1", 2, 34, 28, 16), ("UNet level 1", 2, 18, 14, 32)]
GROUPS = 32
QUICK_GROUPS = 8


def _shapes(quick):
  return (QUICK_SHAPES, QUICK_GROUPS) if quick else (SHAPES, GROUPS)


def torch_side(spec: dict):
  """The worker's works: aten's convolution forward / backward pieces and GroupNorm."""
  import torch
  import torch.nn.functional as F
  torch.set_num_threads(spec["threads"])
  g = torch.Generator().manual_seed(0)
  works = {}
  for name, b, h, w, c in spec["shapes"]:
    x = torch.randn(b, c, h, w, generator=g)
    k = torch.randn(c, c, 3, 3, generator=g) / (3 * c ** 0.5)
    dy = torch.randn(b, c, h, w, generator=g)

    def back(mask, x=x, k=k, dy=dy):
      torch.ops.aten.convolution_backward(dy, x, k, None, [1, 1], [1, 1], [1, 1], False,
                                          [0, 0], 1, mask)
    works[f"{name} conv fwd"] = lambda x=x, k=k: F.conv2d(x, k, padding=1)
    works[f"{name} conv dx"] = lambda back=back: back([True, False, False])
    works[f"{name} conv dk"] = lambda back=back: back([False, True, False])
    scale, bias = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
    xg = x.clone().requires_grad_(True)
    groups = spec["groups"]

    def gn_fwd(x=x, scale=scale, bias=bias):
      with torch.no_grad():
        F.group_norm(x, groups, scale, bias, 1e-6)

    def gn_grad(xg=xg, dy=dy, scale=scale, bias=bias):
      torch.autograd.grad(F.group_norm(xg, groups, scale, bias, 1e-6), (xg, scale, bias), dy)
    works[f"{name} GroupNorm fwd"] = gn_fwd
    works[f"{name} GroupNorm fwd+bwd"] = gn_grad
  info = {"impl": f"torch {torch.__version__} eager, {torch.get_num_threads()} threads",
          "threads": torch.get_num_threads(), "torch": torch.__version__}
  return works, info


def our_ops(shapes, groups):
  """op name -> {variant ("XLA", "ours", "flax"): zero-argument callable that blocks}, for
  the same works as torch_side."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from jax import lax
  from ldm_jax import kernels
  dn = ("NHWC", "HWIO", "NHWC")
  pad = ((1, 1), (1, 1))
  rng = np.random.default_rng(0)
  ops = {}
  for name, b, h, w, c in shapes:
    x = jnp.asarray(rng.standard_normal((b, h, w, c), np.float32))
    k = jnp.asarray(rng.standard_normal((3, 3, c, c), np.float32) / (3 * c ** 0.5))
    dy = jnp.asarray(rng.standard_normal((b, h, w, c), np.float32))
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), pad, dimension_numbers=dn)
    fwd = jax.jit(conv)
    dx = jax.jit(lambda x, k, dy: jax.vjp(lambda x_: conv(x_, k), x)[1](dy)[0])
    dk_xla = jax.jit(lambda x, k, dy: jax.vjp(lambda k_: conv(x, k_), k)[1](dy)[0])
    dk_ours = jax.jit(lambda x, dy, c=c: kernels.kernel_grad(x, dy, (3, 3, c, c), (1, 1), pad))
    run = lambda f, *a: (lambda: jax.block_until_ready(f(*a)))
    ops[f"{name} conv fwd"] = {"XLA": run(fwd, x, k)}
    ops[f"{name} conv dx"] = {"XLA": run(dx, x, k, dy)}
    ops[f"{name} conv dk"] = {"XLA": run(dk_xla, x, k, dy), "ours": run(dk_ours, x, dy)}
    flax_gn = nn.GroupNorm(groups, epsilon=1e-6)
    v = flax_gn.init(jax.random.key(0), x)
    scale, bias = v["params"]["scale"], v["params"]["bias"]
    f_flax = lambda x, s, b_, gn=flax_gn: gn.apply({"params": {"scale": s, "bias": b_}}, x)
    f_ours = lambda x, s, b_: kernels.group_norm_apply(x, s, b_, groups, 1e-6)
    grad = lambda f: jax.jit(lambda x, s, b_, dy: jax.vjp(f, x, s, b_)[1](dy))
    ops[f"{name} GroupNorm fwd"] = {"flax": run(jax.jit(f_flax), x, scale, bias),
                                    "ours": run(jax.jit(f_ours), x, scale, bias)}
    ops[f"{name} GroupNorm fwd+bwd"] = {"flax": run(grad(f_flax), x, scale, bias, dy),
                                        "ours": run(grad(f_ours), x, scale, bias, dy)}
  return ops


# ----------------------------------------------------------------------------- the trace

# Container ops (a scan's while loop) hold other ops' time: not counted themselves.
CONTAINERS = ("while", "conditional", "call")
KINDS = (("matmul/conv", r"^(ynn_fusion|xnn_fusion|onednn|convolution|conv_general_dilated|dot|"
                         r"custom-call)"),
         ("data movement", r"(copy|slice|concatenate|stack|transpose|pad|bitcast_fusion$|"
                           r"dynamic-update-slice|gather|scatter)"),
         ("elementwise + reductions", r"."))


def kind_of(op: str) -> str:
  base = re.sub(r"[._]\d+$", "", op)
  for kind, pattern in KINDS:
    if re.search(pattern, base):
      return kind
  return KINDS[-1][0]


def profile(fn, workdir: str) -> dict:
  """Runs fn() once under jax.profiler; returns {kind: thread seconds, "ops": {op: s}}."""
  import jax
  jax.profiler.start_trace(workdir, create_perfetto_trace=True)
  fn()
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(workdir, "**", "perfetto_trace.json.gz"),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "thread_name"}
  per_op = collections.Counter()
  for e in events:
    thread = names.get((e.get("pid"), e.get("tid")), "")
    if (e.get("ph") == "X" and ("Eigen" in thread or "PjRt" in thread)
        and not e["name"].startswith("end:")
        and not e["name"].startswith(("ThunkExecutor", "SlinkyThreadPool", "Threadpool"))):
      op = re.sub(r"[._]\d+$", "", e["name"])
      if op not in CONTAINERS:
        per_op[op] += e["dur"] / 1e6
  by_kind = collections.Counter()
  for op, s in per_op.items():
    by_kind[kind_of(op)] += s
  return {"kinds": dict(by_kind), "ops": dict(per_op.most_common(8))}


def ldm_works(quick: bool):
  """name -> zero-argument callable: one AE + discriminator step, one UNet step, one UNet
  forward, at bench_ldm.py's sizes (compiled and warmed up here)."""
  import jax
  import jax.numpy as jnp
  import bench_ldm
  from ldm_jax import train_autoencoder, train_diffusion
  su = bench_ldm.setup(quick)
  acfg, dcfg, unet_model = su["acfg"], su["dcfg"], su["unet_model"]
  ih, iw = acfg.data.image_size
  works = {}
  state = {"ae": train_autoencoder.create_state(acfg, jax.random.key(0))}
  ae_step = train_autoencoder.make_train_step(acfg)
  images = {"image": jax.random.uniform(jax.random.key(1), (acfg.train.batch_size, ih, iw, 1))}

  def ae():
    state["ae"], m = ae_step(state["ae"], images, jax.random.key(2))
    jax.block_until_ready(m)
  works["autoencoder + discriminator step"] = ae
  lh, lw, lc = su["latent_shape"]
  bsz, ctx_dim = dcfg.train.batch_size, su["context_dim"]
  schedule = train_diffusion.make_schedule(dcfg)
  state["unet"] = train_diffusion.create_state(dcfg, unet_model, (lh, lw, lc), jax.random.key(0),
                                               cross_attention_dim=ctx_dim or None)
  shape = (bsz, lh, lw, lc)
  batch = {"mu": jax.random.normal(jax.random.key(2), shape), "sigma": jnp.zeros(shape)}
  context = jax.random.normal(jax.random.key(5), (bsz, 1, ctx_dim)) if ctx_dim else None
  if ctx_dim:
    batch["context"] = context
  unet_step = train_diffusion.make_train_step(dcfg, schedule)

  def unet():
    state["unet"], m = unet_step(state["unet"], batch, jax.random.key(3))
    jax.block_until_ready(m)
  works["UNet train step"] = unet
  apply = jax.jit(train_diffusion.make_apply(unet_model))
  x_t = jax.random.normal(jax.random.key(4), shape)
  works["UNet forward (one DDIM step)"] = lambda: jax.block_until_ready(
      apply(state["unet"].params, x_t, jnp.zeros((bsz,), jnp.int32), context))
  import bench_embedder
  from deepssim_jax import models
  name, b = ("convnext_atto", 4) if quick else ("convnext_base", 32)
  net = models.make_model(name, hidden_dim=bench_embedder.HIDDEN, embed_dim=bench_embedder.EMBED,
                          dropout=bench_embedder.DROPOUT)
  x = jax.random.normal(jax.random.key(6), (b,) + tuple(acfg.data.image_size))
  variables = jax.jit(lambda x: net.init(jax.random.key(0), x, train=False))(x[:1])
  embed = jax.jit(lambda v, x: net.apply(v, x, train=False))
  works[f"{name} DeepSSIM forward, batch {b}"] = lambda: jax.block_until_ready(
      embed(variables, x))
  for fn in works.values():
    fn()
  return works


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reps", type=int, default=None, help="default 5, --quick 2")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  benchlib.add_args(p)
  args = p.parse_args(argv)
  if args.worker:
    return benchlib.serve(lambda: torch_side(json.loads(args.worker)))
  import jax
  shapes, groups = _shapes(args.quick)
  reps = args.reps or (2 if args.quick else 5)
  theirs = benchlib.Worker(__file__, {"threads": benchlib.cores(), "shapes": shapes,
                                      "groups": groups})
  print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}; threads: jax (XLA:CPU "
        f"pool) {benchlib.cores()}, torch {theirs.info['threads']}", flush=True)
  rows = []
  for name, variants in our_ops(shapes, groups).items():
    t = benchlib.interleave({**variants, "torch": theirs.timer(name)}, reps)
    shape = next(list(s[1:]) for s in shapes if name.startswith(s[0]))
    rows.append({"op": name, "shape": shape,
                 "ms": {v: 1e3 * benchlib.median(s) for v, s in t.items()}})
    print(op_line(rows[-1]), flush=True)
  theirs.close()
  traces = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, fn) in enumerate(ldm_works(args.quick).items()):
      traces[name] = profile(fn, os.path.join(tmp, str(i)))
      print(trace_line(name, traces[name]), flush=True)
  result = {"script": "profile_cpu", "ops": rows, "traces": traces,
            "facts": benchlib.facts(torch=theirs.info["torch"])}
  print("\n" + markdown(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)


OPS_HEADER = ("| operation | shape (NHWC) | ours: form and ms | torch ms | ratio (torch time / "
              "ours) |\n|---|---|---|---|---|")
TRACE_HEADER = ("| work (ours, one call) | matmul/conv | data movement | elementwise + "
                "reductions | largest operations (thread s) |\n|---|---|---|---|---|")


def op_line(r: dict) -> str:
  ms = r["ms"]
  ours = "; ".join(f"{v} {m:.1f}" for v, m in ms.items() if v != "torch")
  ratios = "; ".join(f"{v} **{ms['torch'] / m:.2f}**" for v, m in ms.items() if v != "torch")
  return f"| {r['op']} | {tuple(r['shape'])} | {ours} | {ms['torch']:.1f} | {ratios} |"


def trace_line(name: str, prof: dict) -> str:
  total = sum(prof["kinds"].values())
  share = lambda k: f"{100 * prof['kinds'].get(k, 0.0) / max(total, 1e-9):.0f}%"
  top = ", ".join(f"{op} {s:.2f}" for op, s in list(prof["ops"].items())[:5])
  return (f"| {name} ({total:.2f} thread s) | {share('matmul/conv')} | "
          f"{share('data movement')} | {share('elementwise + reductions')} | {top} |")


def markdown(result: dict) -> str:
  """The two tables of a result (what main prints and bench/run_all.py puts on its page)."""
  return "\n".join([OPS_HEADER] + [op_line(r) for r in result["ops"]] + ["", TRACE_HEADER]
                   + [trace_line(n, p) for n, p in result["traces"].items()])


if __name__ == "__main__":
  main()
