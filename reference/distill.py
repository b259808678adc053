"""Distil a pretrained decoder into AllMem: forward KL from the model's own full attention.

One copy of the weights serves as teacher (``mixer="full"``, no grad) and student
(``mixer="allmem"``); only the memory branches and ``alpha`` train. Each step samples sinks S,
window W and chunk C from configured ranges, so one trained model serves many settings.

Run ``python -m allmem_ops.reference.distill --help``; single process, or under ``torchrun``
with ``--parallel ddp`` (DistributedDataParallel) or ``--parallel fsdp`` (FSDP2 ``fully_shard``).

Checkpoints (``<out>/step-XXXXXX/``): the model as ``save_pretrained`` writes it (safetensors +
config) and ``trainer_state.pt`` (optimizer, schedule, RNG, data position) for exact resumption.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .data import PackedJsonl, RecallTask, RecallTaskConfig, cu_seqlens_from_doc_lens, slice_batch
from .model import CONFIG_FILE, WEIGHTS_FILE, AllMemForCausalLM, is_memory_param
from .model_config import BACKENDS

PARALLEL = ("none", "ddp", "fsdp")
STATE_FILE = "trainer_state.pt"


@dataclass
class DistillConfig:
    """Everything one distillation run needs. Ranges are inclusive ``[lo, hi]``."""

    model: str = ""  # AllMem checkpoint folder (save_pretrained) or a HF Qwen3/Llama/Qwen2 folder
    out: str = ""
    data: str = "recall"  # "recall" (synthetic, see RecallTaskConfig) or a JSONL file
    tokenizer: str = ""  # local tokenizer folder / tokenizer.json (JSONL data only)
    recall: dict = field(default_factory=dict)  # RecallTaskConfig overrides
    seq_len: int = 2048  # JSONL packing length (the recall task has its own seq_len)
    batch_size: int = 8  # global batch, in rows, per optimizer step
    micro_batch_size: int = 0  # rows per forward on one process; 0 = the whole local share
    steps: int = 1000
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # the last fraction of steps decays linearly to min_lr
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    ce_weight: float = 0.0
    sinks: tuple = (0, 256)
    window: tuple = (512, 8192)
    chunk: tuple = (512, 4096)
    eta_init: float = 0.0  # > 0: re-initialise b_eta so that softplus(b_eta) = eta_init
    backend: str = "reference"
    parallel: str = "none"
    bf16: str = "auto"  # "auto" (on with CUDA), "on", "off"
    activation_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # 0: only the final checkpoint
    resume: str = ""  # a checkpoint folder written by this tool

    def validate(self) -> None:
        """Raise ValueError naming every bad field."""
        problems = []
        for name, lo_min in (("sinks", 0), ("window", 1), ("chunk", 1)):
            rng = getattr(self, name)
            if len(rng) != 2 or not all(isinstance(v, int) for v in rng):
                problems.append(f"{name} must be a pair of ints [lo, hi], got {rng!r}")
            elif rng[0] < lo_min or rng[1] < rng[0]:
                what = {"window": "window", "chunk": "chunk size", "sinks": "sinks"}[name]
                problems.append(f"{name} range must satisfy {lo_min} <= lo <= hi ({what} >= {lo_min}), got {list(rng)}")
        for name in ("batch_size", "steps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size < 0:
            problems.append(f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            problems.append(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.ce_weight < 0:
            problems.append(f"ce_weight must be >= 0, got {self.ce_weight}")
        if self.backend not in BACKENDS:
            problems.append(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.parallel not in PARALLEL:
            problems.append(f"parallel must be one of {PARALLEL}, got {self.parallel!r}")
        if self.bf16 not in ("auto", "on", "off"):
            problems.append(f"bf16 must be 'auto', 'on' or 'off', got {self.bf16!r}")
        if not self.model:
            problems.append("model (a checkpoint folder) is required")
        elif not os.path.isdir(self.model):
            problems.append(f"model folder {self.model!r} does not exist")
        if not self.out:
            problems.append("out (the output folder) is required")
        if self.data != "recall":
            if not os.path.isfile(self.data):
                problems.append(f"data file {self.data!r} does not exist (give a JSONL file or 'recall')")
            if not self.tokenizer:
                problems.append("tokenizer (a local folder) is required with JSONL data")
        if self.resume and not os.path.isfile(os.path.join(self.resume, STATE_FILE)):
            problems.append(f"resume folder {self.resume!r} holds no {STATE_FILE}")
        if problems:
            raise ValueError("invalid distillation config: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Loss and schedule
# ---------------------------------------------------------------------------------------------


def distill_loss_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    ce_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed forward KL(teacher || student) (plus ``ce_weight`` * next-token CE) over the scored
    positions, and the summed KL alone.

    student_logits / teacher_logits [..., V] (any float dtype; computed in float32),
    input_ids int64 [...] (targets for the CE term are the next tokens), loss_mask bool [...]
    (True where the prediction at t counts; must be False at the last position of each row).
    Returns (objective_sum, kl_sum), float32 scalars; divide by the scored count for a mean.
    """
    s = student_logits[loss_mask].float()
    t = teacher_logits[loss_mask].float()
    log_ps = F.log_softmax(s, -1)
    log_pt = F.log_softmax(t, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    obj = kl
    if ce_weight > 0:
        targets = input_ids.roll(-1, -1)[loss_mask]
        obj = obj + ce_weight * F.nll_loss(log_ps, targets, reduction="sum")
    return obj, kl.detach()


def wsd_lambda(step: int, total: int, warmup: int, decay_fraction: float, min_ratio: float) -> float:
    """Warmup-stable-decay multiplier for the learning rate at optimizer step ``step`` (0-based):
    linear warmup over ``warmup`` steps, constant, then linear decay to ``min_ratio`` over the last
    ``decay_fraction * total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_steps = int(round(decay_fraction * total))
    decay_start = total - decay_steps
    if decay_steps > 0 and step >= decay_start:
        frac = (step - decay_start + 1) / decay_steps
        return 1.0 - (1.0 - min_ratio) * min(frac, 1.0)
    return 1.0


def sample_settings(cfg: DistillConfig, step: int) -> tuple[int, int, int]:
    """(sinks, window, chunk) for ``step``: a pure function of seed and step, so every rank draws
    the same values and a resumed run continues the same sequence."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    return rng.randint(*cfg.sinks), rng.randint(*cfg.window), rng.randint(*cfg.chunk)


# ---------------------------------------------------------------------------------------------
# Model, data, distribution
# ---------------------------------------------------------------------------------------------


def load_student(cfg: DistillConfig) -> AllMemForCausalLM:
    """The model to distil: an AllMem checkpoint, or a HF folder converted on the fly with the
    middle of each sampling range as default settings. Everything but memory + alpha is frozen."""
    if os.path.isfile(os.path.join(cfg.model, CONFIG_FILE)):
        model = AllMemForCausalLM.from_pretrained(cfg.model)
    elif os.path.isfile(os.path.join(cfg.model, "config.json")):
        from .convert import convert_from_hf

        mid = [(lo + hi) // 2 for lo, hi in (cfg.window, cfg.sinks, cfg.chunk)]
        model = convert_from_hf(cfg.model, window=mid[0], sinks=mid[1], chunk_size=mid[2])
    else:
        raise ValueError(
            f"model folder {cfg.model!r} holds neither an AllMem checkpoint ({CONFIG_FILE}) nor a "
            "Hugging Face config.json")
    if cfg.eta_init > 0 and not cfg.resume:
        b = math.log(math.expm1(cfg.eta_init))
        with torch.no_grad():
            for layer in model.model.layers:
                layer.memory.eta_proj.bias.fill_(b)
    model.freeze_pretrained()
    return model


def make_data(cfg: DistillConfig, vocab_size: int):
    """The indexable global-batch source named by cfg.data."""
    if cfg.data == "recall":
        task_cfg = RecallTaskConfig(**cfg.recall)
        if task_cfg.vocab_size > vocab_size:
            raise ValueError(
                f"recall task needs a vocabulary of {task_cfg.vocab_size} tokens, the model has {vocab_size}")
        return RecallTask(task_cfg, cfg.batch_size, seed=cfg.seed)
    src = PackedJsonl(cfg.data, cfg.tokenizer, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    top = int(src.ids.max())
    if top >= vocab_size:
        raise ValueError(f"tokenizer produces id {top}, beyond the model's vocab_size {vocab_size}")
    return src


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(cfg: DistillConfig) -> bool:
    """Join the process group torchrun describes (nccl on CUDA, gloo otherwise). Returns whether
    this call created it (and so must destroy it)."""
    if cfg.parallel == "none" or (dist.is_available() and dist.is_initialized()):
        return False
    if "RANK" not in os.environ:
        raise ValueError(f"parallel={cfg.parallel!r} needs torchrun (RANK/WORLD_SIZE are not set)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(_device())
    dist.init_process_group(backend)
    return True


def _checkpointed(layer: nn.Module) -> None:
    """Recompute this layer's activations in backward (torch.utils.checkpoint) instead of storing
    them: the forward is wrapped on the instance so parameter names do not change."""
    inner = layer.forward

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    layer.forward = forward


def wrap_model(model: AllMemForCausalLM, cfg: DistillConfig) -> nn.Module:
    """Move to the device, add activation checkpointing, and wrap for DDP / FSDP2."""
    model.to(_device())
    if cfg.activation_checkpointing:
        for layer in model.model.layers:
            _checkpointed(layer)
    if cfg.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        dev = _device()
        return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    if cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def _unwrapped(model: nn.Module) -> AllMemForCausalLM:
    return model.module if hasattr(model, "module") and isinstance(model.module, AllMemForCausalLM) else model


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path: str, model: nn.Module, opt, sched, step: int, cfg: DistillConfig) -> None:
    """Write ``path/`` (collective under DDP/FSDP: every rank must call it; rank 0 writes)."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    rank, _ = _world()
    weights = _full_model_state(model)
    optim = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        _unwrapped(model).config.to_json(os.path.join(path, CONFIG_FILE))
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(path, WEIGHTS_FILE))
        state = {
            "step": step,
            "data_position": step,  # one global batch per optimizer step
            "optimizer": optim,
            "scheduler": sched.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": dataclasses.asdict(cfg),
        }
        tmp = os.path.join(path, STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(path, STATE_FILE))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: str, model: nn.Module, opt, sched) -> int:
    """Restore weights, optimizer, schedule and RNG from ``path``; returns the next step."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, set_model_state_dict, set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    weights = load_file(os.path.join(path, WEIGHTS_FILE))
    set_model_state_dict(model, weights, options=opts)
    state = torch.load(os.path.join(path, STATE_FILE), weights_only=False)
    set_optimizer_state_dict(model, opt, state["optimizer"], options=opts)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["data_position"])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _micro_batches(batch: dict, rank: int, world: int, micro: int) -> list[dict]:
    """This rank's rows of the global batch, cut into micro-batches of ``micro`` rows."""
    rows = batch["input_ids"].shape[0]
    if rows % world:
        raise ValueError(f"batch_size {rows} is not divisible by the {world} processes")
    share = rows // world
    local = slice_batch(batch, rank * share, (rank + 1) * share)
    micro = micro or share
    if share % micro:
        raise ValueError(f"each process's {share} rows are not divisible by micro_batch_size {micro}")
    return [slice_batch(local, i, i + micro) for i in range(0, share, micro)]


def _model_inputs(mb: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Dense [R,L] ids when every row is one document, else one packed [1,R*L] row + cu_seqlens."""
    ids = mb["input_ids"].to(device)
    mask = mb["loss_mask"].to(device)
    if all(len(d) == 1 for d in mb["doc_lens"]):
        return ids, None, mask
    cu = cu_seqlens_from_doc_lens(mb["doc_lens"]).to(device)
    return ids.reshape(1, -1), cu, mask.reshape(1, -1)


def train(cfg: DistillConfig, on_step=None) -> list[float]:
    """Run (or resume) a distillation; returns the mean KL of every step run.

    on_step(step, kl) is called on every rank after each optimizer step (tests use it)."""
    cfg.validate()
    created = init_distributed(cfg)
    try:
        return _train(cfg, on_step)
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg: DistillConfig, on_step) -> list[float]:
    rank, world = _world()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    base = load_student(cfg)
    data = make_data(cfg, base.config.vocab_size)
    device = _device()
    model = wrap_model(base, cfg)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable (memory / alpha) parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: wsd_lambda(s, cfg.steps, cfg.warmup_steps, cfg.decay_fraction, cfg.min_lr_ratio))
    start = load_checkpoint(cfg.resume, model, opt, sched) if cfg.resume else 0
    use_bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and device.type == "cuda")
    teacher = model.module if cfg.parallel == "ddp" else model
    losses: list[float] = []
    bar = _progress(rank, start, cfg.steps)
    t_last, tok_since = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        sinks, window, chunk = sample_settings(cfg, step)
        batch = data.batch(step)
        # Normalise by the scored positions of the whole global batch, so that DDP/FSDP's gradient
        # averaging over ranks gives exactly the single-process gradient.
        n_scored = int(batch["loss_mask"].sum())
        if n_scored == 0:
            raise ValueError(f"global batch {step} has no scored tokens")
        micro = _micro_batches(batch, rank, world, cfg.micro_batch_size)
        kl_sum = torch.zeros((), device=device)
        for i, mb in enumerate(micro):
            ids, cu, mask = _model_inputs(mb, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                with torch.no_grad():
                    t_logits = teacher(ids, cu_seqlens=cu, mixer="full")
                sync = i == len(micro) - 1
                with _no_sync(model, cfg.parallel, sync):
                    s_logits = model(ids, cu_seqlens=cu, mixer="allmem", window=window, sinks=sinks,
                                     chunk_size=chunk, backend=cfg.backend)
                    obj, kl = distill_loss_sums(s_logits, t_logits, ids, mask, cfg.ce_weight)
                    (obj * (world / n_scored)).backward()
            kl_sum += kl
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(kl_sum)
        kl_mean = float(kl_sum) / n_scored
        losses.append(kl_mean)
        tok_since += batch["input_ids"].numel()
        if on_step is not None:
            on_step(step, kl_mean)
        done = step + 1
        if rank == 0 and (done % max(cfg.log_every, 1) == 0 or done == cfg.steps):
            now = time.perf_counter()
            bar(done, f"kl {kl_mean:.4f} lr {sched.get_last_lr()[0]:.2e} grad {float(norm):.3f} "
                      f"S={sinks} W={window} C={chunk} {tok_since / (now - t_last):.0f} tok/s")
            t_last, tok_since = now, 0
        if cfg.save_every and done % cfg.save_every == 0 and done != cfg.steps:
            save_checkpoint(os.path.join(cfg.out, f"step-{done:06d}"), model, opt, sched, done, cfg)
    save_checkpoint(os.path.join(cfg.out, "final"), model, opt, sched, cfg.steps, cfg)
    return losses


def _no_sync(model: nn.Module, parallel: str, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if sync or parallel == "none":
        return contextlib.nullcontext()
    if parallel == "ddp":
        return model.no_sync()
    model.set_requires_gradient_sync(False)

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return restore()


def _progress(rank: int, start: int, total: int):
    """A progress reporter: a tqdm bar on a terminal, plain lines otherwise (logs, CI)."""
    if rank != 0:
        return lambda done, msg: None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start, dynamic_ncols=True)

        def report(done, msg):
            bar.n = done
            bar.set_postfix_str(msg)
            if done == total:
                bar.close()

        return report
    return lambda done, msg: print(f"step {done}/{total} {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _pair(text: str) -> tuple[int, int]:
    parts = text.split(",")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected LO,HI (or one value), got {text!r}")
    return int(parts[0]), int(parts[1])


def parse_args(argv: list[str] | None = None) -> DistillConfig:
    """DistillConfig from the command line (``--config file.json`` gives defaults)."""
    d = DistillConfig()
    p = argparse.ArgumentParser(
        prog="python -m allmem_ops.reference.distill",
        description="Distil a pretrained decoder into AllMem (forward KL from its own full attention).")
    p.add_argument("--config", help="JSON file of DistillConfig fields (command-line flags override it)")
    p.add_argument("--model", help="AllMem checkpoint folder, or a HF Qwen3/Llama/Qwen2 folder to convert")
    p.add_argument("--out", help="output folder for checkpoints")
    p.add_argument("--data", help="JSONL file ({'text': ...} or {'messages': [...]}) or 'recall' (synthetic)")
    p.add_argument("--tokenizer", help="local tokenizer folder or tokenizer.json (JSONL data)")
    p.add_argument("--recall", type=json.loads, help="JSON object of RecallTaskConfig fields")
    p.add_argument("--seq-len", type=int, help=f"JSONL packing length (default {d.seq_len})")
    p.add_argument("--batch-size", type=int, help=f"global rows per step (default {d.batch_size})")
    p.add_argument("--micro-batch-size", type=int, help="rows per forward per process; 0 = all (gradient accumulation)")
    p.add_argument("--steps", type=int, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--min-lr-ratio", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--decay-fraction", type=float, help="fraction of steps in the final linear decay")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--ce-weight", type=float, help="weight of the next-token CE term (default 0: KL only)")
    p.add_argument("--sinks", type=_pair, help=f"LO,HI sink tokens sampled per step (default {d.sinks})")
    p.add_argument("--window", type=_pair, help=f"LO,HI window sampled per step (default {d.window})")
    p.add_argument("--chunk", type=_pair, help=f"LO,HI memory chunk sampled per step (default {d.chunk})")
    p.add_argument("--eta-init", type=float, help="re-initialise the memory rates to this value (SPEC: 1e-3)")
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--parallel", choices=PARALLEL, help="ddp / fsdp need torchrun")
    p.add_argument("--bf16", choices=("auto", "on", "off"))
    p.add_argument("--activation-checkpointing", action="store_true", default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--log-every", type=int)
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (0: final only)")
    p.add_argument("--resume", help="checkpoint folder to resume from")
    args = vars(p.parse_args(argv))
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    values = {}
    if args.pop("config"):
        with open(p.parse_args(argv).config) as f:
            loaded = json.load(f)
        unknown = sorted(set(loaded) - fields)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(fields)}")
        values.update(loaded)
    values.update({k: v for k, v in args.items() if v is not None})
    for k in ("sinks", "window", "chunk", "betas"):
        if k in values:
            values[k] = tuple(values[k])
    return DistillConfig(**values)


def main(argv: list[str] | None = None) -> None:
    try:
        cfg = parse_args(argv)
        train(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"distill: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
