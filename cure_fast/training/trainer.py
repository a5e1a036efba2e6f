"""The trainer: natural, PGD, IBP and SABR training for one or both norms (CURE), with bound
alignment and gradient projection; checkpoints, exact resume, DDP.

    cure-fast train --preset mnist-demo-cure --set epochs=5
    torchrun --nproc_per_node=2 -m cure_fast.training.trainer --preset mnist-0.1-cure
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import signal
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from .. import checkpoints, data, faults, models
from ..certification.evaluate import Evaluation, evaluate, write_per_sample
from ..config import (TrainConfig, describe_keys, inert_settings, load_config, load_run_config, presets,
                      resolve_device, to_dict, validate)
from ..errors import CheckpointError, ConfigError, DiskFullError, SignalGuard, TrainingError, one_line_errors
from ..ops import registry
from ..storage import remove_temporaries, save_torch
from ..validation import OneLineParser
from . import objectives, rundir
from .batch import Objective, small_set, training_sets

__all__ = ["Trainer", "TrainingError", "Objective", "train", "training_sets", "small_set", "add_arguments",
           "run_from_args"]


class Trainer:
    """Runs a :class:`TrainConfig` end to end in ``run_dir`` (created, or resumed from its checkpoint)."""

    def __init__(self, config: TrainConfig, run_dir: Optional[str] = None, resume: bool = False):
        self.config = cfg = validate(config)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by the {self.world} processes")
        self.device = resolve_device(cfg.device)
        try:
            registry.check_runs(cfg.backend, self.device)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        torch.manual_seed(cfg.seed)
        self.run_dir = self._agree(run_dir or (rundir.new_path(cfg.out_dir, cfg.name) if self.rank == 0 else None))
        if resume and not os.path.isfile(self._checkpoint_path()):
            raise CheckpointError(f"cannot resume: no {rundir.CHECKPOINT} in {self.run_dir}; start a new run instead")
        self.train_set = data.load_dataset(cfg.dataset, cfg.train_split, cfg.data_root, limit=cfg.train_limit)
        self.test_set = data.load_dataset(cfg.dataset, "test", cfg.data_root, limit=cfg.eval_limit)
        self.architecture = f"{cfg.model} on {cfg.dataset}" + (f" with {cfg.model_args}" if cfg.model_args else "")
        self.model = models.build(cfg.model, cfg.dataset, cfg.normalization, **cfg.model_args).to(self.device)
        if cfg.init_from:
            state, _, what, _ = checkpoints.model_weights(cfg.init_from, self.device)
            checkpoints.load_weights(self.model, state, cfg.init_from, what, self.architecture)
        elif cfg.ibp_init and cfg.method in ("ibp", "sabr"):
            objectives.ibp_init(self.model)
        self.objective = Objective(self.model, cfg)
        self.step_fn = self.objective
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_fn = nn.parallel.DistributedDataParallel(self.objective, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.natural_optimizer = (torch.optim.Adam(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
                                  if cfg.gp_beta > 0 else None)
        self.epoch, self.step, self.history = 0, 0, []
        self.steps_per_epoch = data.num_batches(len(self.train_set), cfg.batch_size // self.world, cfg.drop_last,
                                                world_size=self.world)
        if self.steps_per_epoch == 0:
            why = (f"make no full batch of batch_size={cfg.batch_size} with drop_last=true; lower batch_size, raise "
                   f"train_limit or set drop_last=false" if cfg.drop_last else
                   f"are fewer than the {self.world} processes; raise train_limit")
            raise ConfigError(f"no training batch: {len(self.train_set)} training images {why}")
        self.guard, self.in_epoch = SignalGuard(self._stop_message), False
        if resume:
            self._load_checkpoint()
            return
        with self._disk_full_advice():
            if self.rank == 0:
                rundir.make_run_dir(self.run_dir, cfg.out_dir)
                rundir.write_config(self.run_dir, cfg)
                for note in inert_settings(cfg):
                    print(f"note: {note}", file=sys.stderr, flush=True)
                print(f"{cfg.name}: training {self.architecture} on {len(self.train_set)} images, testing on "
                      f"{len(self.test_set)}; writing to {self.run_dir}", flush=True)
            self._save_checkpoint()  # epoch 0: every interruption from here on can be resumed

    def _agree(self, value):
        """Rank 0's value, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- schedule -------------------------------------------------------------------------------
    def eps(self, norm: str, step: Optional[int] = None) -> float:
        """The training eps of ``norm`` at a step: ``eps_schedule`` from step ``eps_start_epoch`` × the
        steps per epoch to ``eps_end_epoch`` × the steps per epoch (:data:`objectives.EPS_SCHEDULES`)."""
        cfg, step = self.config, self.step if step is None else step
        start, end = cfg.eps_start_epoch * self.steps_per_epoch, cfg.eps_end_epoch * self.steps_per_epoch
        if cfg.method in ("natural", "pgd"):
            return cfg.train_eps(norm)
        return objectives.EPS_SCHEDULES[cfg.eps_schedule](step, start, end, cfg.train_eps(norm))

    def lr(self, epoch: int) -> float:
        cfg = self.config
        return cfg.lr * cfg.lr_gamma ** sum(epoch >= m for m in cfg.lr_milestones)

    # -- one step ---------------------------------------------------------------------------------
    def train_epoch(self, epoch: int, natural: bool = False) -> Dict[str, float]:
        """One pass over the training data; natural training (for gradient projection) when ``natural``."""
        cfg = self.config
        optimizer = self.natural_optimizer if natural else self.optimizer
        for group in optimizer.param_groups:
            group["lr"] = self.lr(epoch)
        self.model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
        local = cfg.batch_size // self.world
        stream = data.batches(self.train_set.images, self.train_set.labels, local, shuffle=True, generator=generator,
                              drop_last=cfg.drop_last, rank=self.rank, world_size=self.world, device=self.device)
        totals = {"loss": 0.0, "correct": 0.0, "seen": 0, **{f"certified_{n}": 0.0 for n in cfg.norms}}
        start = time.perf_counter()
        shown = None if cfg.progress and self.rank == 0 else True  # None: on terminals only
        bar = tqdm(stream, total=self.steps_per_epoch, disable=shown, leave=False,
                   desc=f"epoch {epoch + 1}/{cfg.epochs}{' (natural)' if natural else ''}")
        for x, y in bar:
            x = data.augment(cfg.dataset, x)
            eps = {n: self.eps(n) for n in cfg.norms}
            use_bounds = not natural and (cfg.method in ("pgd",) or any(v > 0 for v in eps.values()))
            specs = training_sets(cfg, self.model, x, y, eps) if use_bounds and cfg.method != "natural" else []
            assignment = self._assignment(len(y)) if cfg.combine == "random" else None
            ramp = self._regularizer_weight(eps)
            loss, logits, margins = self.step_fn(x, y, specs, natural, ramp, assignment)
            if not torch.isfinite(loss):
                raise TrainingError(f"the loss is {loss.item()} at epoch {epoch + 1}, step {self.step}; stopped: the "
                                    f"last good checkpoint is {self._checkpoint_path()} (epoch {self.epoch})")
            if not (natural and cfg.gp_natural == "reference"):  # the reference never clears them there
                optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None and not (natural and cfg.gp_natural == "reference"):
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            optimizer.step()
            if not natural:
                self.step += 1
            totals["loss"] += loss.item() * len(y)
            totals["correct"] += (logits.argmax(1) == y).sum().item()
            totals["seen"] += len(y)
            for norm, m in zip(cfg.norms, margins):
                totals[f"certified_{norm}"] += objectives.certified(m, y).sum().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{totals['seen'] * self.world / (time.perf_counter() - start):.0f}")
        seconds = time.perf_counter() - start
        seen = max(totals.pop("seen"), 1)
        out = {f"train_{k}": v / seen for k, v in totals.items()}
        out.update(seconds=seconds, images_per_second=seen * self.world / seconds, lr=self.lr(epoch),
                   **{f"eps_{n}": self.eps(n) for n in cfg.norms})
        return out

    def _assignment(self, batch: int) -> torch.Tensor:
        """combine=random: which norm each sample trains for, (B,) {0, 1} (a coin each), or with
        random_split=halves two independent random halves of the batch, masks (2, B) (they overlap)."""
        if self.config.random_split == "coin":
            return torch.randint(0, 2, (batch,), device=self.device)
        masks = torch.zeros(2, batch, dtype=torch.bool, device=self.device)
        masks[0, torch.randperm(batch, device=self.device)[: batch // 2]] = True
        masks[1, torch.randperm(batch, device=self.device)[batch // 2:]] = True
        return masks

    def _regularizer_weight(self, eps: Dict[str, float]) -> float:
        """The warm-up regularizer's weight ``reg_lambda (1 - eps / eps_max)`` during the ramp; while
        eps = 0 ``reg_lambda`` with ``reg_zero_eps_box`` set, else 0."""
        cfg = self.config
        if cfg.method not in ("ibp", "sabr") or cfg.reg_lambda == 0:
            return 0.0
        if cfg.reg_placement == "reference" and cfg.norms == ["2"]:
            return 0.0
        fractions = [eps[n] / cfg.train_eps(n) for n in cfg.norms if cfg.train_eps(n) > 0]
        fraction = min(fractions) if fractions else 1.0
        if fraction == 0:
            return cfg.reg_lambda if cfg.reg_zero_eps_box is not None else 0.0
        return cfg.reg_lambda * (1 - fraction) if fraction < 1 else 0.0

    def projected_epoch(self, epoch: int) -> Dict[str, float]:
        """Gradient projection: a certified and a natural epoch from the same start, merged per tensor."""
        start = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        metrics = self.train_epoch(epoch)
        certified_params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        buffers = copy.deepcopy(self.model.state_dict(keep_vars=False))
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(start[n])
        natural_metrics = self.train_epoch(epoch, natural=True)
        natural_params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        merged = objectives.gradient_projection(start, certified_params, natural_params, self.config.gp_beta)
        buffers.update(merged)
        self.model.load_state_dict(buffers)
        metrics["natural_train_loss"] = natural_metrics["train_loss"]
        return metrics

    # -- loop ---------------------------------------------------------------------------------------
    def evaluate(self, progress: bool = False, final: bool = False) -> Evaluation:
        """Evaluate on the test set (its random draws leave the training RNG streams untouched); the
        final evaluation certifies with the cascade up to ``final_certify``, the others with IBP."""
        cfg = self.config
        devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return evaluate(self.model, self.test_set.images, self.test_set.labels,
                            {n: cfg.eval_eps(n) for n in ("inf", "2")}, method=cfg.final_certify if final else "ibp",
                            pgd_steps=cfg.eval_pgd_steps,
                            pgd_restarts=cfg.eval_pgd_restarts, batch_size=cfg.eval_batch_size,
                            backend=cfg.backend, device=self.device, progress=progress)

    def run(self, stop_after: Optional[int] = None) -> Dict[str, float]:
        """Train the remaining epochs (or up to epoch ``stop_after``, to be resumed later), then write
        the report; returns the final evaluation summary. SIGINT / SIGTERM stop the run with a one-line
        :class:`~cure_fast.errors.Interrupted` saying what is saved and how to resume."""
        with self._disk_full_advice(), self.guard:
            return self._run(stop_after)

    @contextlib.contextmanager
    def _disk_full_advice(self):
        """A full disk: add to the one-line error what to do next."""
        try:
            yield
        except DiskFullError as error:
            advice = (f"free some space, then resume with: {rundir.resume_command(self.run_dir)}"
                      if os.path.isfile(self._checkpoint_path()) else "free some space and start the run again")
            full = DiskFullError(f"{error}; {advice}")
            full.errno, full.path = error.errno, getattr(error, "path", None)
            raise full from None

    def _run(self, stop_after: Optional[int]) -> Dict[str, float]:
        cfg, final = self.config, {}
        if self.epoch >= cfg.epochs:
            return self._finished() if self.rank == 0 else {}
        for epoch in range(self.epoch, min(cfg.epochs, stop_after or cfg.epochs)):
            self.in_epoch = True
            gp_start = cfg.eps_end_epoch if cfg.gp_start_epoch is None else cfg.gp_start_epoch
            projected = cfg.gp_beta > 0 and epoch >= gp_start
            metrics = self.projected_epoch(epoch) if projected else self.train_epoch(epoch)
            metrics["epoch"] = epoch + 1
            faults.point("trained")
            last = epoch + 1 == cfg.epochs
            due = (epoch + 1) % cfg.eval_every == 0 or last  # rank 0 evaluates; every rank saves (a collective)
            with self.guard.critical():  # the trained epoch is saved before an evaluation can be interrupted
                self.epoch = epoch + 1
                self.history.append(metrics)
                self.in_epoch = False
                if due:
                    self._save_checkpoint()
            evaluation = None
            if due and self.rank == 0:
                evaluation = self.evaluate(progress=cfg.progress, final=last)
                final = evaluation.summary()
                metrics.update({f"test_{k}": v for k, v in final.items()})
                faults.point("evaluated")
            with self.guard.critical():
                if evaluation is not None and last:
                    write_per_sample(evaluation, os.path.join(self.run_dir, rundir.PER_SAMPLE))
                if self.rank == 0:
                    rundir.write_metrics(self.run_dir, self.history)
                    self._print_epoch(metrics)
                self._save_checkpoint()
        if self.rank == 0 and self.epoch == cfg.epochs:
            with self.guard.critical():
                rundir.write_up(self.run_dir, cfg, self.model.state_dict(), self.history, final, len(self.test_set))
        return final

    def _restore_model_file(self) -> None:
        """A complete run's model.pt, missing or not loading, written again from its checkpoint (the same
        weights: the checkpoint is saved after the last epoch)."""
        path = os.path.join(self.run_dir, rundir.MODEL)
        try:
            checkpoints.model_weights(path, torch.device("cpu"))
            return
        except CheckpointError as error:
            problem = "is missing" if not os.path.exists(path) else f"does not load ({error})"
        with self.guard.critical():
            save_torch(self.model.state_dict(), path)
        print(f"{path} {problem}: written again from {rundir.CHECKPOINT}", flush=True)

    def _finished(self) -> Dict[str, float]:
        """A resumed run whose training is over: nothing to do when its report is complete, else the
        report is written again from the checkpoint (re-evaluating if the per-sample file is missing)."""
        summary = rundir.completed_summary(self.run_dir)
        if summary is not None:
            self._restore_model_file()
            print(f"run complete, nothing to resume: {self.run_dir} (results in its {rundir.SUMMARY})", flush=True)
            return {k: v for k, v in summary.items() if isinstance(v, float)}
        print(f"{self.run_dir}: training finished ({self.epoch} epochs); writing its report", flush=True)
        final = rundir.final_from_history(self.history)
        per_sample = os.path.join(self.run_dir, rundir.PER_SAMPLE)
        if not final or not os.path.isfile(per_sample):
            evaluation = self.evaluate(progress=self.config.progress, final=True)
            final = evaluation.summary()
            with self.guard.critical():
                write_per_sample(evaluation, per_sample)
                if self.history:  # the evaluation was interrupted after the last epoch's checkpoint
                    self.history[-1].update({f"test_{k}": v for k, v in final.items()})
                    rundir.write_metrics(self.run_dir, self.history)
                    self._save_checkpoint()
        with self.guard.critical():
            rundir.write_up(self.run_dir, self.config, self.model.state_dict(), self.history, final,
                            len(self.test_set))
        return final

    def _stop_message(self, signum: int) -> str:
        """What SIGINT / SIGTERM leaves behind, and the command that resumes."""
        cfg, name = self.config, signal.Signals(signum).name
        if self.rank == 0 and rundir.completed_summary(self.run_dir) is not None:
            return f"stopped by {name} as the run completed: results in {self.run_dir}, nothing to resume"
        if self.epoch >= cfg.epochs:
            saved = f"training is finished ({self._checkpoint_path()} holds all {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}), the report not"
        else:
            lost = f" (epoch {self.epoch + 1}, in progress, is lost)" if self.in_epoch else ""
            saved = f"saved {self._checkpoint_path()} at epoch {self.epoch} of {cfg.epochs}{lost}"
        return f"stopped by {name}: {saved}; resume with: {rundir.resume_command(self.run_dir)}"

    def _print_epoch(self, metrics: Dict[str, float]) -> None:
        shown = {k: v for k, v in metrics.items() if k.startswith("test_") or k in ("train_loss", "images_per_second")}
        print(f"epoch {metrics['epoch']}: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()), flush=True)

    # -- files ----------------------------------------------------------------------------------
    def _checkpoint_path(self) -> str:
        return os.path.join(self.run_dir, rundir.CHECKPOINT)

    def _gather(self, value) -> List:
        """``value`` of every rank, in rank order (on every rank)."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def _save_checkpoint(self) -> None:
        """checkpoint.pt with every rank's RNG states (called on every rank; rank 0 writes)."""
        rngs = self._gather(checkpoints.rng_state(self.device))
        if self.rank != 0:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                 "step": self.step, "history": self.history, "rng": rngs[0], "rng_ranks": rngs,
                 "config": to_dict(self.config)}
        if self.natural_optimizer is not None:
            state["natural_optimizer"] = self.natural_optimizer.state_dict()
        save_torch(state, self._checkpoint_path())

    def _load_checkpoint(self) -> None:
        path = self._checkpoint_path()
        state = checkpoints.training_state(path, self.device)
        rundir.check_same_run(self.config, state.get("config") or {}, path)
        checkpoints.load_weights(self.model, state["model"], path, checkpoints.describe(state), self.architecture)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.natural_optimizer is not None:
                self.natural_optimizer.load_state_dict(state["natural_optimizer"])
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{path}: its optimizer state does not fit this config ({error})") from None
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        rngs = state.get("rng_ranks")
        rng = rngs[self.rank] if rngs and len(rngs) == self.world else state.get("rng")
        if rng is not None:
            checkpoints.set_rng_state(rng, self.device)
        if self.rank == 0:
            remove_temporaries(self.run_dir)
            rundir.write_metrics(self.run_dir, self.history)  # exactly the checkpoint's epochs
            if self.epoch < self.config.epochs:
                print(f"resuming {self.run_dir} from epoch {self.epoch} of {self.config.epochs}", flush=True)


"""Config keys that a resumed run may change: where data and results live, how it runs and is
evaluated, and how many epochs it trains (a finished run continues for the added epochs)."""


def train(config: TrainConfig, run_dir: Optional[str] = None, resume: bool = False) -> Dict[str, float]:
    """Train ``config`` (in ``run_dir``, or a new folder under ``config.out_dir``); returns the final summary."""
    return Trainer(config, run_dir, resume).run()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="a preset shipped with cure_fast (see --list-presets)")
    parser.add_argument("--config", help="a YAML file of config keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    parser.add_argument("--data-root", help="folder holding the data sets")
    parser.add_argument("--list-presets", action="store_true", help="print the preset names and exit")
    parser.add_argument("--list-keys", action="store_true", help="print every config key (default, values, "
                        "what it does) and exit")


def run_from_args(args: argparse.Namespace) -> Dict[str, float]:
    if args.list_presets:
        print("\n".join(presets()))
        return {}
    if args.list_keys:
        print("\n".join(describe_keys()))
        return {}
    if args.resume:
        if args.preset or args.config or args.set:
            raise ConfigError("--resume continues a run with its own config.yaml; drop --preset, --config and --set")
        config_path = os.path.join(args.resume, rundir.CONFIG)
        if os.path.isfile(args.resume):
            raise ConfigError(f"--resume {args.resume} is a file; give the run folder (the one holding "
                              f"{rundir.CONFIG} and {rundir.CHECKPOINT})")
        if not os.path.isdir(args.resume):
            raise ConfigError(f"--resume {args.resume}: no such folder")
        if not os.path.exists(config_path):
            raise ConfigError(f"--resume {args.resume}: not a run folder (no {rundir.CONFIG}); nothing to resume")
        config = load_run_config(config_path, {"data_root": args.data_root} if args.data_root else None)
        return train(config, args.resume, resume=True)
    if not (args.preset or args.config):
        raise ConfigError("give --preset NAME or --config FILE (or --resume RUN_DIR); --list-presets lists the "
                          "presets, --list-keys the config keys")
    overrides = list(args.set) + ([f"data_root={args.data_root}"] if args.data_root else [])
    return train(load_config(args.preset, args.config, overrides))


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m cure_fast.training.trainer`` (also under torchrun: one process per device, DDP)."""
    parser = OneLineParser(prog="cure_fast.training.trainer", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        with one_line_errors("cure_fast.training.trainer"):
            run_from_args(args)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
