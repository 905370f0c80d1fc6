"""The MR <-> CT CycleGAN: networks, one training step, validation, state for checkpoints.

The step follows pytorch-CycleGAN-and-pix2pix (Zhu et al., ICCV 2017): :meth:`CycleGANTrainer.set_input`,
:meth:`~CycleGANTrainer.forward`, :meth:`~CycleGANTrainer.backward_G`, :meth:`~CycleGANTrainer.backward_D`
and :meth:`~CycleGANTrainer.optimize_parameters`, with

* LSGAN adversarial terms (weight ``loss.adversarial``), cycle L1 (``loss.cycle``), identity L1
  (``loss.identity * loss.cycle``), an :class:`~medcycle.losses.ImagePool` per discriminator, one Adam
  for both generators and one for both discriminators;
* an optional structure term: MIND (``loss.structure``, Yang et al. 2018) between each real image and
  its translation;
* with ``loss.pairing`` ``paired``/``hybrid``: L1 (``loss.paired``) between a translation and the
  registered partner of its input, on the samples that have one.

A weight of 0 switches a term off: it is neither computed nor logged.

Speed and scale-out:

* the generators run as :class:`GeneratorPair`, which batches the calls of one step (G_mr2ct on
  ``[mr, ct]`` gives the sCT and the identity output together, G_ct2mr on ``[ct, mr, sCT]`` gives
  the synthetic MR, its identity output and the reconstructed MR): three network calls instead of
  six, the same numbers (instance norm is per sample), and one forward per backward for DDP;
* the discriminators run as :class:`DiscriminatorPair` in their own step (real and pooled fake in one
  batch). In the generator step the plain (un-wrapped) discriminators are called with
  ``requires_grad`` off: gradients reach the generators through them, while their own DDP reducer is
  not involved (its parameters get no gradient in that backward);
* autocast (:func:`medcycle.engine.amp.autocast_dtype`: bf16 on CPUs with native bf16, bf16 or fp16 on
  CUDA, a GradScaler for fp16); every loss is computed in float32; channels-last when asked for;
  optional ``torch.compile`` of the four networks (falls back to eager with a warning).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import random
import sys
import traceback
import warnings
from typing import Any, Iterable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medcycle.config import Config
from medcycle.engine.amp import autocast_dtype
from medcycle.errors import UsageError
from medcycle.inferers.runtime import CPU_BATCH_PIXELS
from medcycle.losses import (
    ImagePool,
    MINDLoss,
    adversarial_loss,
    discriminator_adv_loss,
    generator_adv_loss,
)
from medcycle.networks import build_discriminator, build_generator, patchgan_output_size

NET_NAMES = ("G_mr2ct", "G_ct2mr", "D_ct", "D_mr")
#: every loss that can be logged, in log order (terms of the generator, its total, the discriminators)
GENERATOR_TERMS = ("G_adv_ct", "G_adv_mr", "cycle_mr", "cycle_ct", "idt_ct", "idt_mr", "structure", "paired")
LOSS_NAMES = (*GENERATOR_TERMS, "G", "D_ct", "D_mr")
VAL_KEYS = ("mae", "mae_bone", "psnr", "ssim")


def active_losses(config: Config) -> list[str]:
    """The losses that a config switches on (the columns of ``losses.csv``)."""
    w = config.loss
    paired = w.pairing != "unpaired"
    on = {
        "G_adv_ct": w.adversarial > 0, "G_adv_mr": w.adversarial > 0,
        "cycle_mr": w.cycle > 0, "cycle_ct": w.cycle > 0,
        "idt_ct": w.identity * w.cycle > 0, "idt_mr": w.identity * w.cycle > 0,
        "structure": w.structure > 0, "paired": paired and w.paired > 0, "G": True, "D_ct": w.adversarial > 0, "D_mr": w.adversarial > 0,
    }
    if not any(on[name] for name in GENERATOR_TERMS):
        raise UsageError("config: every generator loss is off (loss.adversarial, loss.cycle and, with "
                         "loss.pairing=paired/hybrid, loss.paired are 0); switch one on")
    return [name for name in LOSS_NAMES if on[name]]


class LinearDecay:
    """lr factor: 1 until ``decay_from`` of the run, then linear to 0 at its end; reads ``progress`` in [0, 1].

    A callable object (not a function) so that ``LambdaLR.state_dict`` stores its ``progress``.
    """

    def __init__(self, decay_from: float) -> None:
        self.decay_from = float(decay_from)
        self.progress = 0.0

    def __call__(self, _step: int) -> float:
        if self.progress <= self.decay_from or self.decay_from >= 1.0:
            return 1.0
        return max(0.0, (1.0 - self.progress) / (1.0 - self.decay_from))


class GeneratorPair(nn.Module):
    """Both generators; one call computes every generator output of a training step."""

    def __init__(self, mr2ct: nn.Module, ct2mr: nn.Module) -> None:
        super().__init__()
        self.mr2ct, self.ct2mr = mr2ct, ct2mr

    def forward(self, real_mr: torch.Tensor, real_ct: torch.Tensor, identity: bool = True,
                cycle: bool = True) -> dict[str, torch.Tensor]:
        """``fake_ct``, ``fake_mr`` and, when asked, ``idt_ct``/``idt_mr`` (identity) and ``rec_mr``/``rec_ct`` (cycle)."""
        out: dict[str, torch.Tensor] = {}
        b = real_mr.shape[0]
        ct_side = self.mr2ct(torch.cat([real_mr, real_ct]) if identity else real_mr)
        out["fake_ct"] = ct_side[:b]
        if identity:
            out["idt_ct"] = ct_side[b:]
        inputs = [real_ct] + ([real_mr] if identity else []) + ([out["fake_ct"]] if cycle else [])
        mr_side = self.ct2mr(torch.cat(inputs) if len(inputs) > 1 else real_ct)
        out["fake_mr"] = mr_side[:b]
        if identity:
            out["idt_mr"] = mr_side[b : 2 * b]
        if cycle:
            out["rec_mr"] = mr_side[-b:]
            out["rec_ct"] = self.mr2ct(out["fake_mr"])
        return out


class DiscriminatorPair(nn.Module):
    """Both discriminators for their own step: real and fake images in one batch per discriminator."""

    def __init__(self, d_ct: nn.Module, d_mr: nn.Module) -> None:
        super().__init__()
        self.d_ct, self.d_mr = d_ct, d_mr

    def forward(self, real_ct: torch.Tensor, fake_ct: torch.Tensor, real_mr: torch.Tensor,
                fake_mr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(D_ct(real_ct), D_ct(fake_ct), D_mr(real_mr), D_mr(fake_mr))`` prediction maps."""
        ct = self.d_ct(torch.cat([real_ct, fake_ct]))
        mr = self.d_mr(torch.cat([real_mr, fake_mr]))
        return ct[: real_ct.shape[0]], ct[real_ct.shape[0] :], mr[: real_mr.shape[0]], mr[real_mr.shape[0] :]


def _adam(params: Iterable[nn.Parameter], lr: float, betas: tuple[float, float]) -> torch.optim.Adam:
    params = list(params)
    try:  # the fused kernel is one pass over all parameters (CPU and CUDA)
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, betas=betas)


def _masked_l1(pred: torch.Tensor, target: torch.Tensor, has: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """L1 on the samples with a registered partner (all when `has` is None); None when there is none."""
    if has is not None:
        if not bool(has.any()):
            return None
        if not bool(has.all()):
            pred, target = pred[has], target[has]
    return F.l1_loss(pred.float(), target.float())


class CycleGANTrainer:
    """Networks, optimisers, schedules, image pools and the training step of the MR <-> CT CycleGAN.

    Args:
        config: the run's validated config.
        device: where the networks run.
    """

    def __init__(self, config: Config, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = torch.device(device)
        model, train, w = config.model, config.train, config.loss
        k = config.data.context_slices
        side = config.data.tile_size
        if patchgan_output_size(side, model.disc_layers) < 1:
            raise UsageError(f"config: tiles of {side} px are too small for model.disc_layers="
                             f"{model.disc_layers}; raise data.tile_size or lower model.disc_layers")
        self.loss_names = active_losses(config)
        self.dtype = autocast_dtype(train.amp, self.device)
        self.memory_format = torch.channels_last if train.channels_last else torch.contiguous_format

        nets = {
            "G_mr2ct": build_generator(k, model.gen_width, model.gen_blocks),
            "G_ct2mr": build_generator(k, model.gen_width, model.gen_blocks),
            "D_ct": build_discriminator(k, model.disc_width, model.disc_layers),
            "D_mr": build_discriminator(k, model.disc_width, model.disc_layers),
        }
        #: the plain networks (what checkpoints hold), on `device`
        self.nets = {name: net.to(self.device, memory_format=self.memory_format) for name, net in nets.items()}
        self.G = GeneratorPair(self.nets["G_mr2ct"], self.nets["G_ct2mr"])
        self.D = DiscriminatorPair(self.nets["D_ct"], self.nets["D_mr"])
        self.G_train: nn.Module = self.G  # what the steps call: DDP-wrapped and/or compiled later
        self.D_train: nn.Module = self.D
        self.D_for_G = {"ct": self.nets["D_ct"], "mr": self.nets["D_mr"]}  # never DDP-wrapped

        self.opt_G = _adam(self.G.parameters(), train.lr, train.betas)
        self.opt_D = _adam(self.D.parameters(), train.lr, train.betas)
        self.schedule = LinearDecay(train.decay_from)
        self.sched_G = torch.optim.lr_scheduler.LambdaLR(self.opt_G, self.schedule)
        self.sched_D = torch.optim.lr_scheduler.LambdaLR(self.opt_D, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.pool_ct, self.pool_mr = ImagePool(train.pool_size), ImagePool(train.pool_size)

        self.adv = adversarial_loss()
        self.mind = MINDLoss() if w.structure > 0 else None
        self.identity_weight = w.identity * w.cycle
        self.iteration = 0
        self.losses: dict[str, torch.Tensor] = {}

    # ----------------------------------------------------------------------------------------------
    # execution options

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to the run's dtype (no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def wrap_ddp(self) -> None:
        """Wrap the generator pair and the discriminator pair in DistributedDataParallel."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        # every parameter gets a gradient in each backward of its pair: no find_unused_parameters
        self.G_train = DDP(self.G_train, device_ids=ids, gradient_as_bucket_view=True)
        if self.config.loss.adversarial > 0:
            self.D_train = DDP(self.D_train, device_ids=ids, gradient_as_bucket_view=True)
        else:  # discriminators untrained: keep them identical by broadcasting once
            import torch.distributed as dist

            for p in self.D.parameters():
                dist.broadcast(p.data, 0)

    def release_ddp(self) -> None:
        """Unwrap what :meth:`wrap_ddp` wrapped and free the DDP reducers, while the process group exists.

        A reducer freed after ``destroy_process_group()`` holds the group's last reference and destroys it
        holding the GIL, while a gloo thread, freeing the tensor of the last collective, waits for the GIL:
        the process hangs. Freed here, the group is destroyed later from Python, which releases the GIL.
        """
        from torch.nn.parallel import DistributedDataParallel as DDP

        if not isinstance(self.G_train, DDP) and not isinstance(self.D_train, DDP):
            return
        failure = sys.exc_info()[1]
        if failure is not None:  # the frames of a step that failed inside DDP's forward still hold it
            traceback.clear_frames(failure.__traceback__)
        if isinstance(self.G_train, DDP):
            self.G_train = self.G_train.module
        if isinstance(self.D_train, DDP):
            self.D_train = self.D_train.module
        gc.collect()  # a DDP module sits in reference cycles

    def compile(self) -> bool:
        """``torch.compile`` the four networks in place (for the training step only); False when unavailable."""
        try:
            compiled = {name: torch.compile(net) for name, net in self.nets.items()}
        except Exception as exc:  # noqa: BLE001 - any failure means: stay eager
            warnings.warn(f"torch.compile unavailable ({type(exc).__name__}: {exc}); training runs eagerly")
            return False
        self.G = GeneratorPair(compiled["G_mr2ct"], compiled["G_ct2mr"])
        self.D = DiscriminatorPair(compiled["D_ct"], compiled["D_mr"])
        self.G_train, self.D_train = self.G, self.D
        self.D_for_G = {"ct": compiled["D_ct"], "mr": compiled["D_mr"]}
        return True

    def uncompile(self) -> None:
        """Back to the eager networks (after a failed compilation)."""
        self.G = GeneratorPair(self.nets["G_mr2ct"], self.nets["G_ct2mr"])
        self.D = DiscriminatorPair(self.nets["D_ct"], self.nets["D_mr"])
        self.G_train, self.D_train = self.G, self.D
        self.D_for_G = {"ct": self.nets["D_ct"], "mr": self.nets["D_mr"]}

    def warm_up(self, batch: Mapping[str, Any]) -> None:
        """Run forward and backward of both steps once without updating anything (compiles the graphs)."""
        self.set_input(batch)
        self.forward()
        self.backward_G()
        if self.config.loss.adversarial > 0:
            self._backward_D(self.fake_ct.detach().float(), self.fake_mr.detach().float())
        for opt in (self.opt_G, self.opt_D):
            opt.zero_grad(set_to_none=True)
        self.losses = {}

    # ----------------------------------------------------------------------------------------------
    # the training step

    def set_input(self, batch: Mapping[str, Any]) -> None:
        """Unpack a batch of :class:`~medcycle.data.dataset.TileDataset` items onto the device."""

        def put(x: torch.Tensor) -> torch.Tensor:
            return x.to(self.device, non_blocking=True).float().contiguous(memory_format=self.memory_format)

        self.real_mr, self.real_ct = put(batch["mr"]), put(batch["ct"])
        pairing = self.config.loss.pairing
        if pairing == "paired":  # the CT of each sample is the registered CT of its MR tile
            self.ct_reg, self.has_ct_reg, self.mr_reg, self.has_mr_reg = self.real_ct, None, self.real_mr, None
        elif pairing == "hybrid":
            self.ct_reg, self.mr_reg = put(batch["ct_reg"]), put(batch["mr_reg"])
            self.has_ct_reg = torch.as_tensor(batch["has_ct_reg"], dtype=torch.bool).to(self.device)
            self.has_mr_reg = torch.as_tensor(batch["has_mr_reg"], dtype=torch.bool).to(self.device)
        else:
            self.ct_reg = self.mr_reg = self.has_ct_reg = self.has_mr_reg = None

    def forward(self) -> None:
        """Translations, reconstructions and identity outputs of both generators."""
        with self.autocast():
            out = self.G_train(self.real_mr, self.real_ct, identity=self.identity_weight > 0,
                               cycle=self.config.loss.cycle > 0)
        self.fake_ct, self.fake_mr = out["fake_ct"], out["fake_mr"]
        self.idt_ct, self.idt_mr = out.get("idt_ct"), out.get("idt_mr")
        self.rec_mr, self.rec_ct = out.get("rec_mr"), out.get("rec_ct")

    def backward_G(self) -> None:
        """Every generator term (weighted, float32) and the backward pass of their sum."""
        w = self.config.loss
        terms: dict[str, torch.Tensor] = {}
        if w.adversarial > 0:
            with self.autocast():
                pred_ct, pred_mr = self.D_for_G["ct"](self.fake_ct), self.D_for_G["mr"](self.fake_mr)
            terms["G_adv_ct"] = w.adversarial * generator_adv_loss(self.adv, pred_ct)
            terms["G_adv_mr"] = w.adversarial * generator_adv_loss(self.adv, pred_mr)
        if w.cycle > 0:
            terms["cycle_mr"] = w.cycle * F.l1_loss(self.rec_mr.float(), self.real_mr)
            terms["cycle_ct"] = w.cycle * F.l1_loss(self.rec_ct.float(), self.real_ct)
        if self.identity_weight > 0:
            terms["idt_ct"] = self.identity_weight * F.l1_loss(self.idt_ct.float(), self.real_ct)
            terms["idt_mr"] = self.identity_weight * F.l1_loss(self.idt_mr.float(), self.real_mr)
        if self.mind is not None:
            terms["structure"] = w.structure * (self.mind(self.real_mr, self.fake_ct) + self.mind(self.real_ct, self.fake_mr))
        if "paired" in self.loss_names:
            terms["paired"] = w.paired * self._paired_l1()
        self.loss_G = sum(terms.values())
        self.scaler.scale(self.loss_G).backward()
        self.losses = {**terms, "G": self.loss_G}

    def _paired_l1(self) -> torch.Tensor:
        """L1 (float32) between each translation and the registered partner of its input, where there is one."""
        with torch.autocast(device_type=self.device.type, enabled=False):
            parts = [_masked_l1(self.fake_ct, self.ct_reg, self.has_ct_reg),
                     _masked_l1(self.fake_mr, self.mr_reg, self.has_mr_reg)]
        parts = [p for p in parts if p is not None]
        return sum(parts) if parts else torch.zeros((), device=self.device)

    def backward_D(self) -> None:
        """LSGAN terms of both discriminators on real images and on fakes from the image pools."""
        fake_ct = self.pool_ct.query(self.fake_ct.detach().float())
        fake_mr = self.pool_mr.query(self.fake_mr.detach().float())
        self._backward_D(fake_ct, fake_mr)

    def _backward_D(self, fake_ct: torch.Tensor, fake_mr: torch.Tensor) -> None:
        with self.autocast():
            real_ct_pred, fake_ct_pred, real_mr_pred, fake_mr_pred = self.D_train(self.real_ct, fake_ct, self.real_mr, fake_mr)
        self.losses["D_ct"] = discriminator_adv_loss(self.adv, real_ct_pred, fake_ct_pred)
        self.losses["D_mr"] = discriminator_adv_loss(self.adv, real_mr_pred, fake_mr_pred)
        self.scaler.scale(self.losses["D_ct"] + self.losses["D_mr"]).backward()

    def optimize_parameters(self) -> dict[str, torch.Tensor]:
        """One iteration: forward, generator update, discriminator update; returns the losses (detached)."""
        adversarial = self.config.loss.adversarial > 0
        self.forward()
        self.set_requires_grad(self.D.parameters(), False)  # D only passes gradients to G here
        self.opt_G.zero_grad(set_to_none=True)
        self.backward_G()
        self.scaler.step(self.opt_G)
        if adversarial:
            self.set_requires_grad(self.D.parameters(), True)
            self.opt_D.zero_grad(set_to_none=True)
            self.backward_D()
            self.scaler.step(self.opt_D)
        self.scaler.update()
        self.iteration += 1
        return {name: value.detach() for name, value in self.losses.items()}

    @staticmethod
    def set_requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
        for p in params:
            p.requires_grad_(flag)

    # ----------------------------------------------------------------------------------------------
    # schedule

    def set_progress(self, progress: float) -> None:
        """Set the run's progress in [0, 1] (iterations or wall clock); the lr of the next iteration follows."""
        self.schedule.progress = min(1.0, max(0.0, float(progress)))
        self.sched_G.step()
        if self.config.loss.adversarial > 0:  # else the discriminators are not trained
            self.sched_D.step()

    @property
    def lr(self) -> float:
        return float(self.opt_G.param_groups[0]["lr"])

    # ----------------------------------------------------------------------------------------------
    # evaluation (plain networks, eval mode, no autograd)

    def translate(self, images: np.ndarray | torch.Tensor, direction: str = "G_mr2ct") -> np.ndarray:
        """Run generator `direction` over ``(N, k, H, W)`` images in [-1, 1]; returns float32 numpy."""
        net = self.nets[direction]
        images = torch.as_tensor(np.asarray(images, dtype=np.float32))
        side = images.shape[-1] * images.shape[-2]
        chunk = max(1, CPU_BATCH_PIXELS // side) if self.device.type == "cpu" else 16
        was_training = net.training
        net.eval()
        out = []
        try:
            with torch.inference_mode(), self.autocast():
                for start in range(0, images.shape[0], chunk):
                    x = images[start : start + chunk].to(self.device).contiguous(memory_format=self.memory_format)
                    out.append(net(x).float().cpu())
        finally:
            net.train(was_training)
        return torch.cat(out).numpy() if out else np.zeros_like(images.numpy())

    def validate(self, tiles: Mapping[str, Any]) -> dict[str, float]:
        """Mean MAE, bone MAE, PSNR and SSIM (HU, inside each tile's body mask) of the sCT of `tiles`.

        `tiles` as :func:`medcycle.data.dataset.validation_tiles` returns them.
        """
        from medcycle.metrics import image_metrics
        from medcycle.transforms import HUCodec

        data = self.config.data
        centre = data.context_slices // 2
        sct = self.translate(tiles["mr"])[:, centre]
        codec = HUCodec.from_config(data)
        pred_hu, ref_hu = codec.decode(sct), codec.decode(np.asarray(tiles["ct"])[:, centre])
        lo, hi = (float(v) for v in data.ct_window)
        rows = []
        for i in range(pred_hu.shape[0]):
            if tiles["mask"][i].any():
                rows.append(image_metrics(pred_hu[i], ref_hu[i], tiles["mask"][i], window=(lo, hi)))
        result = {}
        for key in VAL_KEYS:
            values = np.array([r[key] for r in rows], dtype=np.float64)
            values = values[np.isfinite(values)]
            result[key] = float(values.mean()) if values.size else float("nan")
        result["tiles"] = len(rows)
        return result

    def sheet_columns(self, tiles: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """MR | sCT | reconstructed MR | CT (centre channels) of fixed preview tiles."""
        centre = self.config.data.context_slices // 2
        sct = self.translate(tiles["mr"], "G_mr2ct")
        rec = self.translate(sct, "G_ct2mr")
        ct_name = "CT (registered)" if tiles.get("registered") else "CT (unpaired)"
        return {"MR": tiles["mr"][:, centre], "sCT": sct[:, centre], "rec MR": rec[:, centre], ct_name: tiles["ct"][:, centre]}

    # ----------------------------------------------------------------------------------------------
    # state

    def weights_finite(self) -> bool:
        """True when every parameter and buffer of the four networks is finite (what a checkpoint may hold)."""
        return all(bool(torch.isfinite(v).all()) for net in self.nets.values() for v in net.state_dict().values()
                   if v.is_floating_point())

    def digest(self) -> str:
        """sha256 of every network parameter (to compare ranks or runs)."""
        h = hashlib.sha256()
        for name in NET_NAMES:
            for key, value in self.nets[name].state_dict().items():
                h.update(key.encode())
                h.update(value.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    def state_dict(self) -> dict[str, Any]:
        """Networks (plain), optimisers, schedules, scaler, pools and RNG states of this process."""
        return {
            "iteration": self.iteration,
            "nets": {name: {k: v.detach().clone().contiguous() for k, v in self.nets[name].state_dict().items()}
                     for name in NET_NAMES},
            "optimizers": {"G": self.opt_G.state_dict(), "D": self.opt_D.state_dict()},
            "schedulers": {"G": self.sched_G.state_dict(), "D": self.sched_D.state_dict()},
            "scaler": self.scaler.state_dict(),
            "pools": self.pool_state(),
            "rng": rng_state(),
        }

    def pool_state(self) -> dict[str, Any]:
        return {"ct": self.pool_ct.state_dict(), "mr": self.pool_mr.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], pools: Optional[Mapping[str, Any]] = None,
                        restore_rng: bool = True) -> None:
        """Restore a :meth:`state_dict` (from a checkpoint); `pools` replaces the checkpoint's pools (DDP ranks)."""
        for name in NET_NAMES:
            self.nets[name].load_state_dict(state["nets"][name])
        self.opt_G.load_state_dict(state["optimizers"]["G"])
        self.opt_D.load_state_dict(state["optimizers"]["D"])
        self.sched_G.load_state_dict(state["schedulers"]["G"])
        self.sched_D.load_state_dict(state["schedulers"]["D"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        pools = state["pools"] if pools is None else pools
        if pools:
            self.pool_ct.load_state_dict(pools["ct"])
            self.pool_mr.load_state_dict(pools["mr"])
        self.iteration = int(state["iteration"])
        if restore_rng and state.get("rng"):
            set_rng_state(state["rng"])


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state` (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed torch, numpy and python; in deterministic mode also ask for deterministic algorithms."""
    import os

    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


__all__ = [
    "CycleGANTrainer",
    "DiscriminatorPair",
    "GeneratorPair",
    "LOSS_NAMES",
    "LinearDecay",
    "NET_NAMES",
    "active_losses",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]
