"""Writes notebooks/quickstart.ipynb from the cells below (edit here, then run this file)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    ("md", """# orcinus quickstart

Build a tiny DeepSeek-V3 (MLA + DeepSeekMoE + MTP), train it for a few steps on the embedded corpus,
look at the loss and the expert load, generate text, check a Pallas kernel against its reference, and
see how parameters are laid out on a device mesh. Runs on a laptop CPU in a couple of minutes."""),
    ("code", """import os
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")   # 4 simulated devices
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from flax import nnx
import optax
import model, sharding
print(jax.devices())"""),
    ("md", "## 1. Build the model\nThe `tiny` preset, made smaller still so this notebook is quick."),
    ("code", """cfg = model.ModelConfig.preset("tiny", d_model=128, num_layers=3, moe_ffn_dim=64, dense_ffn_dim=256,
                                max_seq_len=256)
net = model.Transformer(cfg, rngs=nnx.Rngs(0))
print(f"{model.param_count(net):,} parameters; {cfg.num_routed_experts} routed experts, top-{cfg.num_experts_per_tok}")
abstract = nnx.eval_shape(lambda: model.Transformer(model.ModelConfig.preset("deepseek-v3"), rngs=nnx.Rngs(0)))
print(f"deepseek-v3, abstractly: {model.param_count(nnx.state(abstract, nnx.Param)) / 1e9:.1f}B parameters")"""),
    ("md", "## 2. Train briefly\nThe DeepSeek-V3 recipe from `train.py`: AdamW (0.9, 0.95), MTP loss, balance loss, bias update."),
    ("code", """import train
from storage.corpus import ByteTokenizer, embedded_corpus
corpus = embedded_corpus(max_bytes=1 << 20)
opt = nnx.Optimizer(net, optax.adamw(3e-3, b1=0.9, b2=0.95, weight_decay=0.1), wrt=nnx.Param)
rng = np.random.default_rng(0)
losses, loads = [], []
for step in range(30):
    starts = rng.integers(0, len(corpus) - 65, 8)
    batch = jnp.asarray(np.stack([corpus[s:s + 65] for s in starts]))
    metrics = train.train_step(net, opt, batch, 0.3, 1e-3)
    losses.append(float(metrics["main"]))
out = nnx.jit(lambda m, t: m.forward(t))(net, batch[:, :-1])
print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}")"""),
    ("code", """fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
ax1.plot(losses); ax1.set(xlabel="step", ylabel="loss", title="training loss")
im = ax2.imshow(np.asarray(out.expert_counts), aspect="auto", cmap="viridis")
ax2.set(xlabel="routed expert", ylabel="MoE layer (last row: MTP)", title="tokens per expert")
fig.colorbar(im, ax=ax2); plt.show()"""),
    ("md", "## 3. Generate\nPrefill writes the latent cache with the naive MLA form; decode reads it with the absorbed form."),
    ("code", """import serve
tok = ByteTokenizer()
prompts = ["def ", "import "]
completions = serve.generate(net, [tok.encode(p) for p in prompts], max_tokens=24, temperature=0.0, seed=0)
for p, c in zip(prompts, completions):
    print(repr(p + tok.decode(c)))"""),
    ("md", "## 4. A kernel against its reference\nDeepGEMM's 1x128 FP8 activation quantiser, a Mosaic GPU Pallas kernel, runs here in\nJAX's GPU interpreter and must match its jnp reference bit for bit."),
    ("code", """KERNEL_CELL"""),
    ("md", "## 5. The mesh and the parameter shardings\nOne rules table maps each parameter's logical axes to mesh axes."),
    ("code", """mesh = sharding.make_mesh(data=-1, expert=2)       # data takes the devices expert leaves
sharding.shard_model(net, mesh, sharding.FSDP_RULES)
print(mesh)
w = net.moe_layers.ffn.w_gate
print("logical axes:", w.get_metadata()["out_sharding"], "->", w[...].sharding.spec)
jax.debug.visualize_array_sharding(net.embed[...])"""),
]


def build(kernel_cell: str) -> nbformat.NotebookNode:
    cells = []
    for kind, text in CELLS:
        text = text.replace("KERNEL_CELL", kernel_cell)
        cells.append(new_markdown_cell(text) if kind == "md" else new_code_cell(text))
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


KERNEL = """from pallas_kernels import fp8_quant
x = jax.random.normal(jax.random.key(0), (128, 256)) * jnp.linspace(0.1, 10, 256)
q_kernel, s_kernel = fp8_quant.per_token_cast_to_fp8(x, interpret=True)      # the Hopper kernel, interpreted
q_ref, s_ref = fp8_quant.per_token_cast_to_fp8_reference(x)                   # its plain-jnp reference
same = bool(jnp.all(q_kernel.astype(jnp.float32) == q_ref.astype(jnp.float32)) & jnp.all(s_kernel == s_ref))
deq = (q_kernel.astype(jnp.float32).reshape(128, 2, 128) * s_kernel[..., None]).reshape(128, 256)
print(f"kernel == reference bitwise: {same}; e4m3 round-trip relative error "
      f"{float(jnp.linalg.norm(deq - x) / jnp.linalg.norm(x)):.3f}")"""

if __name__ == "__main__":
    path = Path(__file__).with_name("quickstart.ipynb")
    nbformat.write(build(KERNEL), path)
    print("wrote", path)
