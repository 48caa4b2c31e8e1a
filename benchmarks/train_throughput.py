"""Training-step throughput: the step as it was (eager float32), as it is, in bfloat16, compiled,
and a hook-free plain-PyTorch twin, side by side in one run.

    python benchmarks/train_throughput.py [--variant nope-causal] [--steps N] [--batch-size 256]
        [--layers 4] [--d-model 64] [--device cpu|cuda] [--repeats R] [--warmup W] [--threads T]
        [--no-compile]

The rows, each a full training step as `variants.training.train` runs it (set lr, forward on
`tokens[:, :-1]`, answer-token cross-entropy, zero_grad, backward, grad-norm clip, AdamW with
the same two parameter groups, `loss.item()`), on the same batches:
- `before`: the step of poslens before the speed work, AdamW looping over tensors (`foreach=False`);
- `float32`: today's step (fused AdamW);
- `bfloat16`: today's step under `TrainSettings(precision="bfloat16")` (autocast);
- `compiled float32` / `compiled bfloat16`: `torch.compile` of the model (compile time reported
  apart, not in the rate; `--no-compile` skips them);
- `plain twin`: the hook-free model below, float32.
Each row's tokens per second is the median over `--repeats` interleaved blocks; its share of the
float32 and of the bfloat16 square-matmul peak (both measured in the same run) is the step's
analytic matmul FLOP rate over that peak.

The twin:
1. builds `build(variant_config(variant, ...))` and `PlainTransformer` below: the same pre-LN decoder
   (embedding, optional learned/sinusoidal/rotary positions, per-head Q/K/V/O, GELU MLP, final LN,
   unembedding, causal or bidirectional mask, residual cuts) written as idiomatic PyTorch with no
   hook points (nn.Linear, nn.LayerNorm, matmul attention with an explicit mask and softmax). Our
   weights are copied into it and both must give the same logits before anything is timed;
2. times full training steps as `variants.training.train` runs them (set lr, forward on
   `tokens[:, :-1]`, answer-token cross-entropy, zero_grad, backward, grad-norm clip, AdamW with
   the same two parameter groups, `loss.item()`), interleaving the models A B A B ... over
   `--repeats` timed blocks of `--steps` steps after warm-up; batches come from
   `tasks.Addition().train_batch` and are generated before timing (data generation is not timed);
3. counts the step's matmul FLOPs analytically and compares the achieved rate with an fp32
   square-matmul peak measured on the same device.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poslens.tasks import Addition
from poslens.variants import build, variant_config
from poslens.variants.config import VariantConfig
from poslens.variants.model import HookedTransformer
from poslens.variants.training import TrainSettings, answer_loss, make_optimizer

# --------------------------------------------------------------------------------------------
# The plain model: same architecture and parameter count, no HookPoints, no einops.
# --------------------------------------------------------------------------------------------


class PlainAttention(nn.Module):
    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        inner = cfg.n_heads * cfg.d_head
        self.q = nn.Linear(cfg.d_model, inner, dtype=cfg.dtype)
        self.k = nn.Linear(cfg.d_model, inner, dtype=cfg.dtype)
        self.v = nn.Linear(cfg.d_model, inner, dtype=cfg.dtype)
        self.o = nn.Linear(inner, cfg.d_model, dtype=cfg.dtype)
        visible = torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool)
        self.register_buffer("mask", visible.tril() if cfg.attention_dir == "causal" else visible, persistent=False)
        self.rotary = cfg.positional_embedding_type == "rotary"
        if self.rotary:
            # The same tables as ours: GPT-NeoX layout, the two halves of d_head pair up.
            from poslens.variants.model import rotary_tables

            cos, sin = rotary_tables(cfg)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)

    def _rotate(self, x: Tensor) -> Tensor:  # x: [batch, head, pos, d_head]
        n_pos = x.shape[2]
        first, second = x.chunk(2, dim=-1)
        return x * self.rotary_cos[:n_pos] + torch.cat([-second, first], dim=-1) * self.rotary_sin[:n_pos]

    def forward(self, x: Tensor) -> Tensor:
        batch, n_pos, _ = x.shape
        split = lambda t: t.view(batch, n_pos, self.n_heads, self.d_head).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))  # [batch, head, pos, d_head]
        if self.rotary:
            q, k = self._rotate(q), self._rotate(k)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.d_head)
        scores = scores.masked_fill(~self.mask[:n_pos, :n_pos], float("-inf"))
        z = scores.softmax(dim=-1) @ v  # [batch, head, pos, d_head]
        return self.o(z.transpose(1, 2).reshape(batch, n_pos, -1))


class PlainBlock(nn.Module):
    def __init__(self, cfg: VariantConfig, block: int):
        super().__init__()
        self.cut_attn, self.cut_mlp = cfg.cuts(block)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.eps, dtype=cfg.dtype)
        self.attn = PlainAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.eps, dtype=cfg.dtype)
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_mlp, dtype=cfg.dtype)
        self.fc_out = nn.Linear(cfg.d_mlp, cfg.d_model, dtype=cfg.dtype)
        self.act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[cfg.act_fn]

    def forward(self, x: Tensor) -> Tensor:
        attn_out = self.attn(self.ln1(x))
        x = attn_out if self.cut_attn else x + attn_out
        mlp_out = self.fc_out(self.act(self.fc_in(self.ln2(x))))
        return mlp_out if self.cut_mlp else x + mlp_out


class PlainTransformer(nn.Module):
    def __init__(self, cfg: VariantConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.d_vocab, cfg.d_model, dtype=cfg.dtype)
        self.pos_type = cfg.positional_embedding_type
        if self.pos_type == "standard":
            self.pos = nn.Parameter(torch.zeros(cfg.n_ctx, cfg.d_model, dtype=cfg.dtype))
        elif self.pos_type == "sinusoidal":
            from poslens.variants.model import sinusoidal_table

            self.register_buffer("pos", sinusoidal_table(cfg), persistent=False)
        self.blocks = nn.ModuleList(PlainBlock(cfg, block) for block in range(cfg.n_layers))
        self.ln_final = nn.LayerNorm(cfg.d_model, eps=cfg.eps, dtype=cfg.dtype)
        self.unembed = nn.Linear(cfg.d_model, cfg.d_vocab, dtype=cfg.dtype)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        if self.pos_type in ("standard", "sinusoidal"):
            x = x + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_final(x))


@torch.no_grad()
def copy_weights(ours: HookedTransformer, plain: PlainTransformer) -> None:
    """Load our parameters into the plain model (nn.Linear stores weight as [out, in])."""
    h, dh, d = ours.cfg.n_heads, ours.cfg.d_head, ours.cfg.d_model
    plain.embed.weight.copy_(ours.embed.W_E)
    if ours.cfg.positional_embedding_type == "standard":
        plain.pos.copy_(ours.pos_embed.W_pos)
    for src, dst in zip(ours.blocks, plain.blocks):
        for ln_src, ln_dst in ((src.ln1, dst.ln1), (src.ln2, dst.ln2)):
            ln_dst.weight.copy_(ln_src.w)
            ln_dst.bias.copy_(ln_src.b)
        for name in ("Q", "K", "V"):
            linear = getattr(dst.attn, name.lower())
            # ours: [head, d_model, d_head]; out feature index = head * d_head + e
            linear.weight.copy_(getattr(src.attn, f"W_{name}").permute(0, 2, 1).reshape(h * dh, d))
            linear.bias.copy_(getattr(src.attn, f"b_{name}").reshape(h * dh))
        dst.attn.o.weight.copy_(src.attn.W_O.reshape(h * dh, d).T)  # ours: [head, d_head, d_model]
        dst.attn.o.bias.copy_(src.attn.b_O)
        dst.fc_in.weight.copy_(src.mlp.W_in.T)
        dst.fc_in.bias.copy_(src.mlp.b_in)
        dst.fc_out.weight.copy_(src.mlp.W_out.T)
        dst.fc_out.bias.copy_(src.mlp.b_out)
    plain.ln_final.weight.copy_(ours.ln_final.w)
    plain.ln_final.bias.copy_(ours.ln_final.b)
    plain.unembed.weight.copy_(ours.W_U.T)
    plain.unembed.bias.copy_(ours.b_U)


# --------------------------------------------------------------------------------------------
# FLOPs and peak.
# --------------------------------------------------------------------------------------------


def train_step_flops(cfg: VariantConfig, batch: int, n_pos: int) -> int:
    """Matmul FLOPs of one training step (multiply-add = 2 FLOPs).

    tokens T = batch · n_pos, with d = d_model, inner = n_heads · d_head, L = n_layers.
    params-in-matmuls  P = L · (3·d·inner + inner·d + 2·d·d_mlp) + d·d_vocab
                            (Q, K, V, O projections, MLP in/out, unembedding; embedding lookups,
                            biases, LayerNorms, softmax and the optimiser are not counted)
    attention          A = L · 2 · (2 · n_pos · inner) per token
                            (q·kᵀ scores and pattern·v, over all n_pos keys: both models compute
                            the full n_pos × n_pos square and mask it, causal or not)
    forward            F = 2·P·T + A·T
    training step      ≈ 3·F (backward ≈ 2× forward: gradients w.r.t. inputs and weights)
    """
    inner = cfg.n_heads * cfg.d_head
    params = cfg.n_layers * (4 * cfg.d_model * inner + 2 * cfg.d_model * cfg.d_mlp) + cfg.d_model * cfg.d_vocab
    tokens = batch * n_pos
    attention = cfg.n_layers * 2 * (2 * n_pos * inner)
    return 3 * (2 * params * tokens + attention * tokens)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(device: str, n: int, repeats: int, dtype: torch.dtype = torch.float32) -> float:
    """Median GFLOP/s of an n × n × n matmul (2·n³ FLOPs) in `dtype` on `device`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b, out=out)
    sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates)


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


class Trainer:
    """One model's training step, exactly as `variants.training.train` does it (or, with `before`,
    as it did before the speed work)."""

    def __init__(self, model: nn.Module, settings: TrainSettings, prompt_len: int, device: str,
                 before: bool = False):
        self.model = model.train()
        self.optimizer = make_optimizer(model, settings)
        if before:  # the per-tensor AdamW loop poslens used
            groups = [{"params": group["params"], "weight_decay": group["weight_decay"]}  # not the fused flag
                      for group in self.optimizer.param_groups]
            self.optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, foreach=False)
        self.forward = model
        self.settings, self.prompt_len, self.device = settings, prompt_len, device
        self.step_index = 0

    def step(self, tokens: Tensor) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr_at(self.step_index)
        with self.settings.autocast(self.device):
            loss = answer_loss(self.forward(tokens[:, :-1]), tokens, self.prompt_len)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        self.step_index += 1
        return loss.item()

    def run(self, batches: list[Tensor]) -> float:
        """Wall seconds for one step on each batch, synchronised at both ends."""
        sync(self.device)
        start = time.perf_counter()
        for tokens in batches:
            self.step(tokens)
        sync(self.device)
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="nope-causal")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=9, help="timed blocks per row, interleaved")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per row first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="matmul size for the peaks (default 2048 cpu, 8192 cuda)")
    args = parser.parse_args(argv)
    device = args.device
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("need --steps >= 1, --repeats >= 1, --warmup >= 0, --threads >= 1")
    torch.set_num_threads(args.threads)

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, python {platform.python_version()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda")
             else f" ({platform.processor() or platform.machine()})")
          + f", intra-op threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")

    torch.manual_seed(0)
    task = Addition()
    cfg = variant_config(args.variant, task=task, n_layers=args.layers, d_model=args.d_model, device=device)
    float32 = TrainSettings(batch_size=args.batch_size, steps=10**9, warmup_steps=0)
    bfloat16 = dataclasses.replace(float32, precision="bfloat16")
    n_batches = max(args.steps, args.warmup, 1)
    batches = [task.train_batch(args.batch_size, float32.batch_seed(s)).to(device) for s in range(n_batches)]

    plain = PlainTransformer(cfg).to(device)
    copy_weights(build(cfg), plain)
    with torch.no_grad():
        check = batches[0][:, :-1]
        diff = (build(cfg)(check) - plain(check)).abs().max().item()
    assert diff <= 1e-5, f"logits differ by {diff:.3g} (> 1e-5): the plain model is not a twin"

    rows: dict[str, Trainer] = {
        "before (eager float32)": Trainer(build(cfg), float32, task.prompt_len, device, before=True),
        "float32": Trainer(build(cfg), float32, task.prompt_len, device),
        "bfloat16": Trainer(build(cfg), bfloat16, task.prompt_len, device),
    }
    compile_seconds = {}
    if not args.no_compile:
        for name, settings in (("compiled float32", float32), ("compiled bfloat16", bfloat16)):
            trainer = Trainer(build(cfg), settings, task.prompt_len, device)
            trainer.forward = torch.compile(trainer.model)
            started = time.perf_counter()
            trainer.run(batches[:2])  # compiles forward and backward
            compile_seconds[name] = time.perf_counter() - started
            rows[name] = trainer
    rows["plain twin (float32)"] = Trainer(plain, float32, task.prompt_len, device)

    n_pos = task.seq_len - 1
    tokens_per_step = args.batch_size * n_pos
    print(f"model: {cfg.name}, n_layers {cfg.n_layers}, d_model {cfg.d_model}, n_heads {cfg.n_heads} x d_head "
          f"{cfg.d_head}, d_mlp {cfg.d_mlp}; step: batch {args.batch_size} x {n_pos} positions = {tokens_per_step} "
          f"tokens; {args.warmup} warm-up steps, then {args.repeats} x {args.steps} timed steps per row, interleaved; "
          f"plain twin logits max |diff| {diff:.1e}"
          + "".join(f"; {name}: {seconds:.0f} s to compile" for name, seconds in compile_seconds.items()))

    for trainer in rows.values():
        trainer.run(batches[: args.warmup])
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for repeat in range(args.repeats):
        order = list(rows) if repeat % 2 == 0 else list(reversed(rows))  # no fixed position bias
        for name in order:
            rates[name].append(args.steps * tokens_per_step / rows[name].run(batches[: args.steps]))

    peak_size = args.peak_size or (8192 if device.startswith("cuda") else 2048)
    peaks = {dtype: matmul_peak(device, peak_size, repeats=10, dtype=dtype)
             for dtype in (torch.float32, torch.bfloat16)}
    flops = train_step_flops(cfg, args.batch_size, n_pos)
    median = {name: statistics.median(values) for name, values in rates.items()}
    base = median["before (eager float32)"]
    print()
    print("| step | tokens/s (median) | min | max | ms/step | × before | % fp32 peak | % bf16 peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in rows:
        achieved = median[name] / tokens_per_step * flops / 1e9
        print(f"| {name} | {median[name]:,.0f} | {min(rates[name]):,.0f} | {max(rates[name]):,.0f} | "
              f"{1e3 * tokens_per_step / median[name]:.1f} | {median[name] / base:.2f} | "
              f"{100 * achieved / peaks[torch.float32]:.1f}% | {100 * achieved / peaks[torch.bfloat16]:.1f}% |")
    print()
    print(f"analytic training matmul FLOPs/step {flops / 1e9:.3f} GFLOP; peaks ({peak_size}^3 matmul, median of 10): "
          f"float32 {peaks[torch.float32]:.0f} GFLOP/s, bfloat16 {peaks[torch.bfloat16]:.0f} GFLOP/s; "
          f"load average now {os.getloadavg()[0]:.2f} (other jobs make every figure noisier)")


if __name__ == "__main__":
    main()
