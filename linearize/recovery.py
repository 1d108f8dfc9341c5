"""`linearize recover`: win back a converted model's quality with a short training run on the same rewrite.

    student = linearize.recover(model, rules="liger", data="my_corpus/", tokens=2_000_000, out="smollm2-liger/")

Stages (run in the order given):
- ``transfer``: per rewritten layer, the attention module's output is pulled towards the original softmax output
  (MSE normalised by the teacher's mean square, averaged over layers, so every layer counts alike). Trainable: LoRA on
  the projections that feed the scores (q, k by default): the Liger-style recipes add no parameters of their own.
- ``lora``: next-token loss, plus ``kl`` x KL(teacher || student) on the logits if asked. Trainable: all LoRA
  adapters (q, k, v by default, as in Liger).

The teacher is the same model, not a copy (docs/recovery.md): peft's ``disable_adapter()`` restores the original
projections, and calling the transformers model's ``forward`` directly bypasses the compiled ``__call__`` that
``convert`` installs, so it runs the original softmax attention eagerly. Attention outputs of both passes are read
by forward hooks on the rewritten attention modules (Dynamo traces the hooks into the compiled graph).

Under ``torchrun`` the same call trains data-parallel with DDP over gloo/NCCL: every rank takes its share of each
global batch, so loss and adapter equal a one-process run on the same data. Checkpoints (``out/recover_state/``)
let an interrupted run continue exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .data import pack, read_corpus
from .options import DEFAULT_RULES
from .passes.bind_learned import PARAMETERS_ATTR

STAGES = ("transfer", "lora")
STATE_DIR = "recover_state"
# what must match for a checkpoint to continue this run (the rest may change: progress, checkpoint_every)
RUN_IDENTITY = ("rules", "stages", "tokens", "transfer_share", "seq_len", "batch_size", "lr", "learned_lr", "lora_r",
                "lora_alpha", "lora_targets", "transfer_targets", "kl", "seed", "corpus")


class RecoverError(ValueError):
    """A recovery run that cannot start or continue; the message says what to change. Nothing was overwritten."""


@dataclass
class RecoverConfig:
    rules: str = DEFAULT_RULES
    stages: tuple = STAGES
    tokens: int = 2_000_000  # training tokens over all stages
    # the transfer stage's share of `tokens` when both stages run (None: half). Transfer saturates early (LoLCATs'
    # ablation; docs/recovery.md measures it flat after ~75k tokens here), so long runs give most tokens to the LoRA
    transfer_share: Optional[float] = None
    seq_len: int = 512
    batch_size: int = 1  # sequences per optimizer step, over all ranks
    lr: float = 1e-3
    # learned recipe parameters (mix weights): O(1) scalars that Adam moves by ~lr per step, so at the LoRA's lr a
    # few hundred steps could not take a weight from 0.5 to near 0; they get 10x unless set
    learned_lr: Optional[float] = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple = ("q_proj", "k_proj", "v_proj")
    transfer_targets: tuple = ("q_proj", "k_proj")
    kl: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50  # optimizer steps
    evals_per_stage: int = 4  # held-out perplexity points per stage (the recovery curve)
    eval_tokens: int = 512  # context of the curve's perplexity (CPython's LICENSE, held out)
    final_lengths: tuple = (512, 2048)  # the final table's contexts (LICENSE at 512, the long document beyond)
    held_out_tokens: Optional[int] = None  # score only the first N held-out tokens (None: all; a quick run's knob)
    corpus: str = ""  # filled in: which text, for the record and for resuming

    def __post_init__(self):
        self.stages = tuple(self.stages)
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages or len(set(self.stages)) != len(self.stages):
            raise RecoverError(f"stages={self.stages}: give one or more of {', '.join(STAGES)}, each once")
        optional = ("held_out_tokens",) if self.held_out_tokens is not None else ()  # None: all of the text
        for name in ("tokens", "seq_len", "batch_size", "lora_r") + optional:
            if int(getattr(self, name)) < 1:
                raise RecoverError(f"{name} must be positive, got {getattr(self, name)}")
        self.rules = str(self.rules)
        self.lora_targets, self.transfer_targets = tuple(self.lora_targets), tuple(self.transfer_targets)
        self.final_lengths = tuple(self.final_lengths)
        self.learned_lr = float(self.learned_lr) if self.learned_lr is not None else 10 * float(self.lr)
        self.held_out_tokens = int(self.held_out_tokens) if self.held_out_tokens is not None else None
        if self.transfer_share is not None:
            self.transfer_share = float(self.transfer_share)
            if set(self.stages) != set(STAGES) or not 0 < self.transfer_share < 1:
                raise RecoverError(f"transfer_share={self.transfer_share}: it splits the tokens between the transfer "
                                   "and lora stages, so give both stages and a fraction strictly between 0 and 1 "
                                   f"(stages now: {', '.join(self.stages)})")

    def stage_steps(self, si: int) -> int:
        """Optimizer steps of stage `si`: its share of the token budget (even unless `transfer_share` is set)."""
        share = 1 / len(self.stages)
        if self.transfer_share is not None:
            share = self.transfer_share if self.stages[si] == "transfer" else 1 - self.transfer_share
        return max(1, math.ceil(self.tokens * share / (self.batch_size * self.seq_len)))


# ------------------------------------------------------------------------------------------------ the run
def recover(model, rules=None, data=None, tokens: int = 2_000_000, stages=STAGES, out=None, *, tokenizer=None,
            progress: bool = True, resume: bool = True, model_spec: Optional[str] = None, **config):
    """Train `model` (a transformers causal LM, or a peft model around one) under `rules` and return the peft model,
    converted in place (`linearize.convert`). `out`: a folder for the checkpoint, state, table and plots.
    `model_spec`: the `models.load` name `model` came from; given, `out/adapter/` also gets `recovered.json`, which
    makes the adapter folder loadable (and shippable) on its own (`load_recovered`)."""
    cfg = RecoverConfig(rules=rules or DEFAULT_RULES, stages=tuple(stages), tokens=int(tokens), **config)
    texts, cfg.corpus = read_corpus(data)
    rank, world = _distributed()
    if cfg.batch_size % world:
        raise RecoverError(f"batch_size={cfg.batch_size} does not split over {world} processes; make it a multiple")
    vocab = model.config.vocab_size
    rows = pack(texts, tokenizer, cfg.seq_len, vocab_size=vocab, min_sequences=cfg.batch_size, source=cfg.corpus)
    out = pathlib.Path(out) if out is not None else None
    state = _load_state(out, cfg) if (out is not None and resume) else None
    if out is not None and state is None and out.exists() and any(out.iterdir()):
        raise RecoverError(f"{out}: the folder is not empty and holds no recovery state of this run; choose an empty "
                           "folder (nothing was overwritten)")
    run = Run(model, cfg, tokenizer, rank, world)
    history = state["history"] if state else {"loss": [], "curve": []}
    if state:
        run.load(out / STATE_DIR)
    else:
        run.begin_table()
        history["curve"].append({"stage": "start", "tokens": 0, "ppl": run.table["before"]["ppl"][str(cfg.eval_tokens)]})
    done_stage, done_step = (state["stage"], state["step"]) if state else (-1, 0)
    for si, stage in enumerate(cfg.stages):
        if si < done_stage:
            continue
        run.train_stage(si, stage, rows, history, start_step=done_step if si == done_stage else 0,
                        out=out, progress=progress)
    run.end_table()
    result = {"config": dataclasses.asdict(cfg), "history": history, "table": run.table,
              "seconds": run.seconds + (state["seconds"] if state else 0.0), "world_size": world}
    if out is not None and rank == 0:
        _write_outputs(run, result, out, model_spec)
    return run.model


@contextlib.contextmanager
def _quiet():
    """The transformers deprecation of `is_gradient_checkpointing` fires on every compiled call; silence it here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


class Run:
    """One recovery run: the peft-wrapped, converted model, its teacher, the hooks, the optimizer and the table."""

    def __init__(self, model, cfg: RecoverConfig, tokenizer, rank: int, world: int):
        from .generation import convert
        from .generation.convert import peft_base
        from .generation.plan import decide_sites

        self.cfg, self.tokenizer, self.rank, self.world = cfg, tokenizer, rank, world
        self.seconds, self.table = 0.0, {}
        self._held_out: dict = {}  # short (LICENSE) or long document -> token ids
        base = peft_base(model) or model
        report = decide_sites(base, cfg.rules)
        self.sites = [s for s in report.sites if s.rewrite not in ("keep", "exact") and s.module_path]
        if "transfer" in cfg.stages and not self.sites:
            raise RecoverError(f"rules {cfg.rules!r} rewrite no attention site of this {type(base).__name__}: the "
                               "transfer stage has nothing to train (use stages=('lora',) or other rules)")
        self.model = _with_lora(model, cfg)
        self.base = peft_base(self.model)
        self.captured: dict = {}
        self._hooks = [self._hook(self.base.get_submodule(s.module_path), i) for i, s in enumerate(self.sites)]
        convert(self.model, rules=cfg.rules)  # registers the parameters the rules learn (`learn: [mix]`)
        for name, p in self.model.named_parameters():
            p.requires_grad_(_trained(name))

    # -- the two passes ------------------------------------------------------------------------------
    def _hook(self, module, i: int):
        def record(mod, args, out):
            self.captured[i] = out[0] if isinstance(out, tuple) else out
        return module.register_forward_hook(record)

    def student(self, ids, labels=None, model=None):
        """The converted model (compiled); returns (outputs, attention outputs by site)."""
        self.captured = {}
        out = self.student_call(ids, model=model, labels=labels, use_cache=False)
        return out, self.captured

    @torch.no_grad()
    def teacher(self, ids):
        """The original model on the same weights: adapters off, the eager (uncompiled) forward."""
        self.captured = {}
        with self.model.disable_adapter():
            out = self.base.forward(input_ids=ids, use_cache=False)
        return out, self.captured

    # -- training ------------------------------------------------------------------------------------
    def trainable(self, stage: str) -> list:
        """LoRA on the stage's targets, and in every stage the recipe's learned parameters (rule files'
        `learn: [mix]`): the transfer loss is where they matter most, and they keep adapting to the LoRA."""
        targets = self.cfg.transfer_targets if stage == "transfer" else self.cfg.lora_targets
        names = [n for n, p in self.model.named_parameters()
                 if ("lora_" in n and _target_of(n) in targets) or PARAMETERS_ATTR in n]
        if not names:
            raise RecoverError(f"stage {stage!r}: no LoRA adapter on {', '.join(targets)} and no learned recipe "
                               "parameter in this model; trainable targets here: "
                               f"{sorted({_target_of(n) for n, _ in self.model.named_parameters() if 'lora_' in n})}")
        params = dict(self.model.named_parameters())
        return [params[n] for n in names]

    def loss(self, stage: str, ids, model):
        if stage == "transfer":
            _, teach = self.teacher(ids)
            _, stud = self.student(ids, model=model)
            return transfer_loss(stud, teach)
        out, _ = self.student(ids, labels=ids, model=model)
        loss = out.loss
        if self.cfg.kl:
            t_out, _ = self.teacher(ids)
            loss = loss + self.cfg.kl * logit_kl(out.logits, t_out.logits)
        return loss

    def train_stage(self, si: int, stage: str, rows, history: dict, start_step: int, out, progress: bool):
        from tqdm.auto import tqdm

        cfg = self.cfg
        params = self.trainable(stage)
        wanted = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in wanted)
        model = self._ddp()
        learned = {id(p) for n, p in self.model.named_parameters() if PARAMETERS_ATTR in n}
        groups = [{"params": [p for p in params if id(p) not in learned], "lr": cfg.lr},
                  {"params": [p for p in params if id(p) in learned], "lr": cfg.learned_lr}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
        steps = cfg.stage_steps(si)
        warmup = max(1, steps // 20)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        if start_step and self._pending is not None:
            self.optimizer.load_state_dict(self._pending["optimizer"])
            self.scheduler.load_state_dict(self._pending["scheduler"])
        self._pending = None
        local = cfg.batch_size // self.world
        evals = {round(steps * (k + 1) / cfg.evals_per_stage) for k in range(cfg.evals_per_stage)}
        bar = tqdm(total=steps, initial=start_step, desc=f"{stage} ({si + 1}/{len(cfg.stages)})", unit="step",
                   disable=not progress or self.rank != 0, mininterval=1.0 if sys.stderr.isatty() else 30.0,
                   file=sys.stderr, dynamic_ncols=True)
        t0 = time.perf_counter()
        for step in range(start_step, steps):
            batch = batch_rows(rows, cfg.seed + 1000 * si, step, cfg.batch_size)
            ids = batch[self.rank * local:(self.rank + 1) * local]
            loss = self.loss(stage, ids, model)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            value = _global_mean(loss.detach(), self.world)
            tokens = (step + 1) * cfg.batch_size * cfg.seq_len
            history["loss"].append({"stage": stage, "step": step + 1, "tokens": tokens, "loss": value})
            rate = (step + 1 - start_step) * cfg.batch_size * cfg.seq_len / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"loss {value:.4g}, {rate:.0f} tok/s", refresh=False)
            bar.update(1)
            if step + 1 in evals:
                ppl = self.held_out_ppl(cfg.eval_tokens)
                history["curve"].append({"stage": stage, "tokens": _stage_offset(cfg, si) + tokens, "ppl": ppl})
                if not sys.stderr.isatty() and progress and self.rank == 0:
                    print(f"[recover] {stage} step {step + 1}/{steps}: loss {value:.4g}, held-out ppl@{cfg.eval_tokens} "
                          f"{ppl:.2f}, {rate:.0f} tok/s", file=sys.stderr, flush=True)
            if out is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps):
                self.save(out / STATE_DIR, si, step + 1, history)
        bar.close()
        self.seconds += time.perf_counter() - t0

    def _ddp(self):
        if self.world == 1:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        # one graph per model: Dynamo's DDP optimiser would split it at bucket edges, cutting attention sites apart
        torch._dynamo.config.optimize_ddp = False
        return DistributedDataParallel(self.model)

    # -- measurements --------------------------------------------------------------------------------
    def held_out_ppl(self, length: int) -> float:
        return self._ppl(self.student_call, length)

    def student_call(self, ids, model=None, **kw):
        """The converted model (or its DDP wrapper, `model`) on `ids`."""
        with _quiet():
            return (model or self.model)(input_ids=ids, **kw)

    def teacher_call(self, ids, **kw):
        with self.model.disable_adapter():
            return self.base.forward(input_ids=ids, **kw)

    def _ppl(self, call, length: int) -> float:
        from .data import perplexity

        ids = self._held_out_ids(length)
        stride = None if length <= 512 else length // 2
        return perplexity(call, ids, window=length, stride=stride, use_cache=False)

    def _held_out_ids(self, length: int):
        """CPython's LICENSE at short context; the Language Reference chapters (one long document) beyond it: both
        disjoint from the default training corpus."""
        from .data import encode, english_text, long_document

        short = length <= 512
        if short not in self._held_out:  # tokenizing the long document takes seconds; it is asked for often
            text = english_text() if short else long_document()
            self._held_out[short] = torch.tensor([encode(text, self.tokenizer, self.model.config.vocab_size)])
        ids = self._held_out[short]
        ids = ids if short else ids[:, : 3 * length]
        return ids if self.cfg.held_out_tokens is None else ids[:, : max(self.cfg.held_out_tokens, length)]

    @torch.no_grad()
    def layer_errors(self) -> list:
        """Relative attention-output error per rewritten site, on the first held-out window."""
        ids = self._held_out_ids(512)[:, : min(512, self.cfg.seq_len)]
        _, teach = self.teacher(ids)
        _, stud = self.student(ids)
        return [round(float(_rel_mse(stud[i], teach[i])), 6) for i in range(len(self.sites))]

    def begin_table(self):
        lengths = self.cfg.final_lengths
        self.table = {
            "lengths": list(lengths), "sites": [s.module_path for s in self.sites],
            "original": {"ppl": {str(L): self._ppl(self.teacher_call, L) for L in _with(lengths, self.cfg.eval_tokens)}},
            "before": {"ppl": {str(L): self._ppl(self.student_call, L) for L in _with(lengths, self.cfg.eval_tokens)},
                       "layer_error": self.layer_errors()},
        }

    def end_table(self):
        self.table["after"] = {"ppl": {str(L): self._ppl(self.student_call, L)
                                       for L in _with(self.cfg.final_lengths, self.cfg.eval_tokens)},
                               "layer_error": self.layer_errors()}

    # -- checkpoints ---------------------------------------------------------------------------------
    def save(self, folder: pathlib.Path, stage: int, step: int, history: dict):
        if self.rank != 0:
            return
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        tmp = folder.with_name(folder.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(self.model).items()},
                  str(tmp / "adapter.safetensors"))
        save_learned(self.model, tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(
            {"config": dataclasses.asdict(self.cfg), "stage": stage, "step": step, "history": history,
             "table": self.table, "seconds": self.seconds}, indent=1))
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        tmp.rename(folder)

    _pending = None

    def load(self, folder: pathlib.Path):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.model, load_file(str(folder / "adapter.safetensors")))
        load_learned_file(self.model, self.cfg.rules, folder)
        self._pending = torch.load(folder / "optimizer.pt", weights_only=True)
        state = json.loads((folder / "state.json").read_text())
        self.table = state["table"]


# ------------------------------------------------------------------------------------------------ shipped adapters
SHIPPED = pathlib.Path(__file__).with_name("recovered")


def shipped_adapter(rules: str, model: str = "smollm2") -> tuple:
    """(peft adapter folder, its record) of a recovery that ships with linearize (`linearize/recovered/`), so the
    demo shows a recovered model without training. The record must name the same rules: an adapter trained under
    other rules would run, and be wrong, under these."""
    folder = SHIPPED / f"{model}-{rules}"
    if not (folder / "recovered.json").is_file():
        have = sorted(p.name for p in SHIPPED.iterdir() if p.is_dir()) if SHIPPED.is_dir() else []
        raise RecoverError(f"no recovered adapter ships for {model} under rules {rules!r} (shipped: {have}); train "
                           f"one with: linearize recover --model {model} --rules {rules} --out DIR")
    meta = json.loads((folder / "recovered.json").read_text())
    if meta.get("rules") != rules or meta.get("model") != model:
        raise RecoverError(f"{folder}: records model {meta.get('model')!r}, rules {meta.get('rules')!r}, not "
                           f"{model!r}, {rules!r}")
    return folder, meta


def load_recovered(folder, dtype: torch.dtype = torch.float32) -> tuple:
    """(converted model, tokenizer) from a recovery's adapter folder (`recovered.json` beside a peft adapter, as
    `linearize/recovered/` ships them): the base model it records, the LoRA merged into a copy of its weights, the
    learned recipe parameters loaded, converted under the recorded rules. `models.load` routes such folders here,
    so `linearize eval --model FOLDER` scores exactly what the demo shows."""
    import copy

    from peft import PeftModel

    from .generation import convert
    from .models import load

    folder = pathlib.Path(folder)
    meta = json.loads((folder / "recovered.json").read_text())
    if not meta.get("model") or not meta.get("rules"):
        raise RecoverError(f"{folder / 'recovered.json'}: names no base model and rules ('model', 'rules'); it "
                           "cannot be applied")
    base, tokenizer = load(meta["model"], dtype)
    base = copy.deepcopy(base)  # shared loads (SmolLM2's cache) are not to be mutated
    model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    load_learned_file(model, meta["rules"], folder)
    return convert(model, rules=meta["rules"]), tokenizer


LEARNED_FILE = "learned.safetensors"  # beside a peft adapter: the recipe parameters the rules learn


def save_learned(model, folder: pathlib.Path) -> None:
    """Write the learned recipe parameters of `model` (if any) to `folder/learned.safetensors`."""
    from safetensors.torch import save_file

    from .generation.convert import learned_parameters

    params = learned_parameters(model)
    if params:
        save_file({k: v.detach().contiguous() for k, v in params.items()}, str(folder / LEARNED_FILE))


def load_learned_file(model, rules, folder: pathlib.Path) -> None:
    """Give `model` the learned recipe parameters saved in `folder` (strict: they must be exactly what `rules`
    learn). Rules that learn something need the file: their constants would silently stand in for trained values."""
    from safetensors.torch import load_file

    from .generation.convert import install_learned, load_learned

    file = folder / LEARNED_FILE
    if file.is_file():
        load_learned(model, rules, load_file(str(file)), file)
    elif install_learned(model, rules):
        raise RecoverError(f"{folder}: rules {rules!r} learn recipe parameters but {LEARNED_FILE} is missing; it "
                           "was trained under other rules, or copied without that file")


# ------------------------------------------------------------------------------------------------ losses
def transfer_loss(student: dict, teacher: dict) -> torch.Tensor:
    """Mean over sites and sequences of ||student - teacher||^2 / ||teacher||^2: per-layer output scales differ by
    orders of magnitude in real models, and an unnormalised sum would train the loudest layers only. Normalised per
    sequence, so the mean over a batch is the mean of the means over its shards (data parallel = one process)."""
    if not student or set(student) != set(teacher):
        raise RecoverError("transfer: the attention outputs of the student and the teacher differ in sites; the "
                           "rewrite did not run where the rule set said (linearize.explain shows the sites)")
    return torch.stack([_rel_mse(student[i], teacher[i]) for i in sorted(teacher)]).mean()


def _rel_mse(a, b) -> torch.Tensor:
    """Per sequence (dim 0), then averaged."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    return ((a - b).pow(2).mean(1) / b.pow(2).mean(1).clamp_min(1e-12)).mean()


def logit_kl(student_logits, teacher_logits) -> torch.Tensor:
    """KL(teacher || student) per token, averaged."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    return torch.nn.functional.kl_div(s.flatten(0, -2), t.flatten(0, -2), log_target=True, reduction="batchmean")


# ------------------------------------------------------------------------------------------------ helpers
def batch_rows(rows: torch.Tensor, seed: int, step: int, batch: int) -> torch.Tensor:
    """The rows of global step `step`: epochs walk a permutation drawn from (seed, epoch), so any step can be
    recomputed after a restart and every rank agrees on the batch without talking."""
    n = rows.shape[0]
    idx = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(j, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        idx.append(int(perm[pos]))
    return rows[idx]


def _with_lora(model, cfg: RecoverConfig):
    from peft import LoraConfig, get_peft_model

    from .generation.convert import peft_base

    if peft_base(model) is not None:
        return model
    targets = sorted(set(cfg.lora_targets) | set(cfg.transfer_targets))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise RecoverError(f"LoRA targets {missing} are not Linear modules of this {type(model).__name__}; its "
                           f"Linear names: {sorted(names)}")
    with torch.random.fork_rng(devices=[]):  # lora_A's random init is part of the run: seeded, so runs repeat
        torch.manual_seed(cfg.seed)
        return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                target_modules=targets))


def _trained(param_name: str) -> bool:
    return "lora_" in param_name or PARAMETERS_ATTR in param_name


def _target_of(param_name: str) -> str:
    parts = param_name.split(".")
    return next((parts[i - 1] for i, p in enumerate(parts) if p.startswith("lora_")), "")


def _distributed() -> tuple:
    """(rank, world size): a process group is started from torchrun's environment when there is none yet."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _global_mean(x: torch.Tensor, world: int) -> float:
    if world > 1:
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return float(x)


def _stage_offset(cfg: RecoverConfig, si: int) -> int:
    """Tokens trained before stage `si` starts (the curve's x axis runs on across stages)."""
    return sum(cfg.stage_steps(k) for k in range(si)) * cfg.batch_size * cfg.seq_len


def _with(lengths, extra) -> list:
    return sorted(set(lengths) | {extra})


def _load_state(out: Optional[pathlib.Path], cfg: RecoverConfig) -> Optional[dict]:
    path = out / STATE_DIR / "state.json" if out is not None else None
    if path is None or not path.is_file():
        return None
    state = json.loads(path.read_text())
    saved = state["config"]
    now = dataclasses.asdict(cfg)
    differ = [k for k in RUN_IDENTITY if _norm(saved.get(k)) != _norm(now.get(k))]
    if differ:
        raise RecoverError(f"{out}: holds a recovery run with other settings ("
                           + ", ".join(f"{k}: saved {saved.get(k)!r}, now {now.get(k)!r}" for k in differ)
                           + "); use the same settings to resume, or another folder (nothing was overwritten)")
    return state


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


# ------------------------------------------------------------------------------------------------ outputs
def _write_outputs(run: Run, result: dict, out: pathlib.Path, model_spec: Optional[str]) -> None:
    from .checkpoint import ADAPTER_DIR, save_pretrained

    save_pretrained(run.model, out, tokenizer=run.tokenizer, lora="adapter", overwrite=True)
    save_learned(run.model, out / ADAPTER_DIR)  # the adapter folder alone (shipped, `load_recovered`) is complete
    if model_spec is not None:
        cfg = result["config"]
        record = {"model": model_spec, **{k: cfg[k] for k in ("rules", "stages", "tokens", "lora_r", "lora_alpha",
                                                               "lora_targets", "seq_len", "lr", "corpus",
                                                               "held_out_tokens")},
                  "train_minutes": round(result["seconds"] / 60, 1), "table": result["table"]}
        (out / ADAPTER_DIR / "recovered.json").write_text(json.dumps(record, indent=1))
        # peft records the base's local path (a machine's venv); the folder names the portable `models.load` spec
        peft_config = out / ADAPTER_DIR / "adapter_config.json"
        peft_record = json.loads(peft_config.read_text())
        peft_record["base_model_name_or_path"] = model_spec
        peft_config.write_text(json.dumps(peft_record, indent=1))
    (out / "recover.json").write_text(json.dumps(result, indent=1))
    (out / "recover.md").write_text(markdown(result) + "\n")
    plot(result, out / "recover.png")


def markdown(result: dict) -> str:
    t = result["table"]
    lengths = [str(L) for L in t["lengths"]]
    lines = ["| model | " + " | ".join(f"ppl @ {L}" for L in lengths) + " | attention-output error (mean over layers) |",
             "|---" * (len(lengths) + 2) + "|"]
    for key, label in (("original", "original"), ("before", "converted, before"), ("after", "converted, after")):
        row = t.get(key)
        if row is None:
            continue
        errs = row.get("layer_error")
        err = f"{sum(errs) / len(errs):.4f}" if errs else "0 (softmax)"
        lines.append(f"| {label} | " + " | ".join(f"{row['ppl'][L]:.2f}" for L in lengths) + f" | {err} |")
    cap = result["config"].get("held_out_tokens")
    if cap:  # a quick run's numbers are not comparable with full ones: say so beside them
        lines.append(f"\nPerplexity on the first {cap} tokens of each held-out text only (held_out_tokens; at least "
                     "one window at each context).")
    return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> Optional[pathlib.Path]:
    """Training loss per stage and the held-out perplexity curve, vs tokens trained."""
    from .report.plots import pyplot

    plt = pyplot("recover.png")
    if plt is None:
        return None
    hist, cfg = result["history"], result["config"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0
    for stage in cfg["stages"]:
        pts = [h for h in hist["loss"] if h["stage"] == stage]
        if pts:
            ax1.plot([offset + p["tokens"] for p in pts], [p["loss"] for p in pts], label=stage, lw=0.8)
            offset += pts[-1]["tokens"]
    ax1.set_xlabel("tokens trained")
    ax1.set_ylabel("training loss")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.grid(alpha=0.3)
    curve = hist["curve"]
    ax2.plot([c["tokens"] for c in curve], [c["ppl"] for c in curve], marker="o")
    ax2.axhline(result["table"]["original"]["ppl"][str(cfg["eval_tokens"])], color="grey", ls="--", label="original")
    ax2.set_yscale("log")
    ax2.set_xlabel("tokens trained")
    ax2.set_ylabel(f"held-out perplexity @ {cfg['eval_tokens']}")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(f"linearize recover: {cfg['rules']}, stages {' + '.join(cfg['stages'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
