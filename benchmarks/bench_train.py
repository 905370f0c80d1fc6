"""Benchmark the CycleGAN training step: medcycle's fast path against a plain-PyTorch fp32 step.

    python benchmarks/bench_train.py              # 128 px and 256 px (about 15 minutes on 2 CPU cores)
    python benchmarks/bench_train.py --quick      # 128 px only, short, no torch.compile: checks that the script works
    python benchmarks/bench_train.py --no-compile # skip the torch.compile variant (~1.5-2.5 min compiling per size)

For each size (batch 1 and one channel, as the reference trains: 128 px with generator and
discriminator width 32 and 6 residual blocks; 256 px with width 64 and 9 blocks):

* ``reference``: the pytorch-CycleGAN-and-pix2pix step in plain PyTorch and fp32: its networks
  (``tests/reference_cyclegan.py``), six generator calls (fake, reconstruction and identity of each
  direction), LSGAN through ``MSELoss`` against target tensors, L1 cycle and identity terms, an image
  pool per discriminator, each discriminator called once on real and once on pooled fake images, two
  default ``Adam`` optimisers;
* ``medcycle-fp32``: :meth:`medcycle.engine.trainer.CycleGANTrainer.optimize_parameters` with AMP off
  (the same arithmetic; generator calls batched three instead of six, fused Adam);
* ``medcycle-bf16``: the same with ``train.amp: auto`` (bf16 autocast on a CPU with native bf16),
  the default fast path on a CPU; ``medcycle-bf16-cl`` adds channels-last; ``medcycle-bf16-compile``
  adds ``torch.compile`` (its compile time is reported separately; not with ``--quick``/``--no-compile``).
  On a CPU without native bf16 (AVX2 only), where ``amp: auto`` trains in fp32, the bf16 variants are
  replaced by ``medcycle-fp32-cl`` (and ``medcycle-fp32-compile``).

Every variant runs in its own worker process (so that its peak resident memory is its own); the
parent asks the workers for their timings in turns, rotating the order each round, so that load on
this shared machine hits all variants alike. The speed-up is the median over rounds of the ratio
``reference time / variant time`` of the same round. FLOPs per step are counted on the reference step
with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, forward and
backward; every variant computes the same architecture) and set against the measured fp32 and bf16
matrix-multiply peak of this machine. Peak memory is each worker's peak RSS (``resource.getrusage``) and that minus its RSS after importing torch/MONAI.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {128: (32, 6), 256: (64, 9)}  # px -> (width, residual blocks); other sizes: the 128-px network


def variants_for(native_bf16: bool, compile: bool) -> list[str]:
    """The variants worth timing on this CPU: bf16 only where the CPU computes it natively (elsewhere
    ``train.amp: auto`` trains in fp32, and emulated bf16 would only measure the emulation)."""
    fast = "bf16" if native_bf16 else "fp32"
    variants = ["reference", "medcycle-fp32"] + (["medcycle-bf16"] if native_bf16 else []) + [f"medcycle-{fast}-cl"]
    return variants + ([f"medcycle-{fast}-compile"] if compile else [])


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# --------------------------------------------------------------------------------------------------
# the steps (run inside a worker)


def reference_step(size: int, width: int, blocks: int):
    """The plain fp32 pytorch-CycleGAN-and-pix2pix training step (batch 1, one channel)."""
    import torch
    from torch import nn

    sys.path.insert(0, str(ROOT / "tests"))
    from reference_cyclegan import NLayerDiscriminator, ResnetGenerator

    def init(net: nn.Module) -> nn.Module:  # init_type="normal", gain 0.02
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                nn.init.zeros_(m.bias)
        return net

    class Pool:  # the reference ImagePool
        def __init__(self, size: int) -> None:
            self.size, self.images = size, []

        def query(self, images):
            out = []
            for image in images:
                image = image.unsqueeze(0)
                if len(self.images) < self.size:
                    self.images.append(image)
                    out.append(image)
                elif torch.rand(1).item() > 0.5:
                    i = int(torch.randint(0, self.size, (1,)).item())
                    out.append(self.images[i].clone())
                    self.images[i] = image
                else:
                    out.append(image)
            return torch.cat(out, 0)

    G_A, G_B = init(ResnetGenerator(1, 1, width, blocks)), init(ResnetGenerator(1, 1, width, blocks))
    D_A, D_B = init(NLayerDiscriminator(1, width)), init(NLayerDiscriminator(1, width))
    opt_G = torch.optim.Adam(itertools.chain(G_A.parameters(), G_B.parameters()), lr=2e-4, betas=(0.5, 0.999))
    opt_D = torch.optim.Adam(itertools.chain(D_A.parameters(), D_B.parameters()), lr=2e-4, betas=(0.5, 0.999))
    pool_A, pool_B = Pool(50), Pool(50)
    mse, l1 = nn.MSELoss(), nn.L1Loss()
    real_A, real_B = torch.rand(1, 1, size, size) * 2 - 1, torch.rand(1, 1, size, size) * 2 - 1

    def gan(pred, real: bool):
        return mse(pred, torch.tensor(1.0 if real else 0.0).expand_as(pred))

    def set_requires_grad(nets, flag: bool) -> None:
        for net in nets:
            for p in net.parameters():
                p.requires_grad = flag

    def backward_D_basic(net, real, fake):
        loss = (gan(net(real), True) + gan(net(fake.detach()), False)) * 0.5
        loss.backward()

    def step() -> None:
        fake_B = G_A(real_A)
        rec_A = G_B(fake_B)
        fake_A = G_B(real_B)
        rec_B = G_A(fake_A)
        set_requires_grad([D_A, D_B], False)
        opt_G.zero_grad()
        loss_idt_A = l1(G_A(real_B), real_B) * 10 * 0.5
        loss_idt_B = l1(G_B(real_A), real_A) * 10 * 0.5
        loss_G = (gan(D_A(fake_B), True) + gan(D_B(fake_A), True) + l1(rec_A, real_A) * 10 + l1(rec_B, real_B) * 10
                  + loss_idt_A + loss_idt_B)
        loss_G.backward()
        opt_G.step()
        set_requires_grad([D_A, D_B], True)
        opt_D.zero_grad()
        backward_D_basic(D_A, real_B, pool_B.query(fake_B))
        backward_D_basic(D_B, real_A, pool_A.query(fake_A))
        opt_D.step()

    return step, {}


def medcycle_step(size: int, width: int, blocks: int, amp: str, channels_last: bool, compile: bool):
    """medcycle's training step at the same size (one channel, batch 1, whole tiles, pool 50)."""
    import torch

    from medcycle.config import load_config
    from medcycle.engine.trainer import CycleGANTrainer

    config = load_config(None, [f"data.tile_size={size}", "data.context_slices=1", f"model.gen_width={width}",
                                f"model.gen_blocks={blocks}", f"model.disc_width={width}", f"train.amp={amp}",
                                f"train.channels_last={str(channels_last).lower()}", "train.batch_size=1"])
    trainer = CycleGANTrainer(config)
    batch = {"mr": torch.rand(1, 1, size, size) * 2 - 1, "ct": torch.rand(1, 1, size, size) * 2 - 1}
    info = {"dtype": str(trainer.dtype).replace("torch.", "") if trainer.dtype else "float32"}
    if compile:
        started = time.perf_counter()
        if trainer.compile():
            trainer.warm_up(batch)
        info["compile_s"] = round(time.perf_counter() - started, 1)

    def step() -> None:
        trainer.set_input(batch)
        trainer.optimize_parameters()

    return step, info


def matmul_peaks(native_bf16: bool, sizes: tuple[int, ...], seconds: float = 0.5) -> dict[str, float]:
    """Measured GFLOP/s of square matrix products of `sizes` in fp32 (and bf16 where the CPU has it
    natively: emulated bf16 takes minutes at 4096): the best of them."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))[: 2 if native_bf16 else 1]:
        best = 0.0
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)
            for _ in range(2):
                count, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    torch.mm(a, b)
                    count += 1
                best = max(best, 2 * n**3 * count / (time.perf_counter() - start) / 1e9)
        out[name] = best
    return out


def worker(variant: str, size: int) -> None:
    """Serve JSON commands on stdin for one variant: time, flops, rss, peaks, quit."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import medcycle.engine.trainer  # noqa: F401  (its imports belong to the baseline)

    baseline = _rss_mb()
    width, blocks = SIZES.get(size, SIZES[128])
    torch.manual_seed(0)
    if variant == "reference":
        step, info = reference_step(size, width, blocks)
    elif variant == "peaks":
        step, info = None, {}
    else:
        amp = "none" if variant.startswith("medcycle-fp32") else "auto"
        step, info = medcycle_step(size, width, blocks, amp, variant.endswith("-cl"), variant.endswith("-compile"))
    if step is not None:
        step()
        step()  # warm-up: oneDNN primitives, pools filling
    print(json.dumps({"ready": True, **info}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "time":
            start = time.perf_counter()
            for _ in range(cmd["steps"]):
                step()
            reply = {"seconds": (time.perf_counter() - start) / cmd["steps"]}
        elif cmd["op"] == "flops":
            with FlopCounterMode(display=False) as counter:
                step()
            reply = {"flops": counter.get_total_flops()}
        elif cmd["op"] == "peaks":
            reply = matmul_peaks(cmd["native_bf16"], tuple(cmd["sizes"]))
        elif cmd["op"] == "rss":
            reply = {"peak_mb": _rss_mb(), "baseline_mb": baseline}
        else:
            break
        print(json.dumps(reply), flush=True)


# --------------------------------------------------------------------------------------------------
# the parent


class Worker:
    def __init__(self, variant: str, size: int, env: Optional[dict] = None) -> None:
        self.variant = variant
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", variant, "--size", str(size)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.variant} died (see its stderr above)")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=60)


def bench_size(size: int, variants: list[str], rounds: int, steps: int, peaks: dict[str, float],
               cache_dir: str) -> list[dict]:
    workers = []
    try:
        for variant in variants:  # started one after the other: each warms up alone
            print(f"  {size} px: starting {variant} ...", file=sys.stderr, flush=True)
            # torch.compile starts from an empty inductor cache: the compile time is what a first run pays
            env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(cache_dir, f"inductor-{size}")} if "compile" in variant else None
            workers.append(Worker(variant, size, env))
        times: dict[str, list[float]] = {w.variant: [] for w in workers}
        for r in range(rounds):
            order = workers[r % len(workers):] + workers[: r % len(workers)]
            for w in order:
                times[w.variant].append(w.ask(op="time", steps=steps)["seconds"])
            print(f"  {size} px round {r + 1}/{rounds}: " + ", ".join(f"{v} {t[-1]:.3f} s" for v, t in times.items()),
                  file=sys.stderr, flush=True)
        rows = []
        # The useful arithmetic is the architecture's, the same for every variant: count it on the reference
        # step (medcycle's last generator layer multiplies some zeros on purpose, a compiled step fuses kernels).
        flops = next(w for w in workers if w.variant == "reference").ask(op="flops")["flops"]
        for w in workers:
            rss = w.ask(op="rss")
            t = statistics.median(times[w.variant])
            ratio = statistics.median(a / b for a, b in zip(times["reference"], times[w.variant]))
            peak = peaks["bf16"] if "bf16" in w.variant else peaks["fp32"]
            rows.append({"size": size, "variant": w.variant, "s_per_step": t, "it_per_s": 1 / t, "speedup": ratio,
                         "gflop": flops / 1e9, "gflops": flops / 1e9 / t, "peak_pct": 100 * flops / 1e9 / t / peak,
                         "rss_mb": rss["peak_mb"], "rss_step_mb": rss["peak_mb"] - rss["baseline_mb"],
                         "compile_s": w.info.get("compile_s")})
        return rows
    finally:
        for w in workers:
            w.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 px only, fewer rounds")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--sizes", default=None, help="comma-separated tile sizes (default 128,256; --quick 128)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, --quick 2)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.size)
        return 0

    sizes = [int(s) for s in (args.sizes or ("128" if args.quick else "128,256")).split(",")]
    rounds = args.rounds or (2 if args.quick else 5)
    import torch

    from medcycle.engine.amp import cpu_supports_bf16

    native_bf16 = cpu_supports_bf16()
    variants = variants_for(native_bf16, compile=not (args.quick or args.no_compile))
    probe = Worker("peaks", 128)
    peaks = probe.ask(op="peaks", native_bf16=native_bf16, sizes=[1024, 2048] if args.quick else [1024, 2048, 4096])
    probe.close()
    bf16 = f"bf16 {peaks['bf16']:.0f} GFLOP/s" if native_bf16 else "bf16 not native (amp auto trains in fp32 here)"
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"matmul peak fp32 {peaks['fp32']:.0f} GFLOP/s, {bf16}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_train-") as cache_dir:
        for size in sizes:
            steps = 1 if size >= 256 else (2 if args.quick else 3)
            rows += bench_size(size, variants, rounds if size < 256 else max(2, rounds - 2), steps, peaks, cache_dir)
    print()
    print("| tile | variant | s/step | it/s | speed-up vs reference | GFLOP/step | GFLOP/s | % of matmul peak | peak RSS MB (step) | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        width, blocks = SIZES.get(r["size"], SIZES[128])
        print(f"| {r['size']} px (w{width}, {blocks} blocks) | {r['variant']} | {r['s_per_step']:.3f} | {r['it_per_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['gflop']:.1f} | {r['gflops']:.0f} | {r['peak_pct']:.0f} % | "
              f"{r['rss_mb']:.0f} ({r['rss_step_mb']:.0f}) | {r['compile_s'] if r['compile_s'] is not None else ''} |")
    print(f"\nrounds: {rounds} (256 px: {max(2, rounds - 2)}), interleaved; speed-up = median per-round ratio. "
          "% of peak: against the bf16 matmul peak for bf16 variants, fp32 otherwise (oneDNN convolutions can beat "
          "the matmul measurement). Compile s: from an empty inductor cache. Peak RSS: the worker's peak, in "
          "brackets above its RSS after importing torch and MONAI.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
