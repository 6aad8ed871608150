r"""``agr-train`` across processes and machines: ``torchrun ... -m agr_optim.train``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs the command; :func:`join` makes it a
member of the process group (gloo for CPU tensors, nccl for CUDA ones) and returns its
:class:`ProcessWorld`; alone, a process has :data:`ONE`, whose methods cost nothing. The
:class:`~agr_optim.training.engine.Trainer` asks its world at a few points, and the run is one
training on the global batch (``docs/distributed.rst`` says it for users):

- **Data.** ``--batch-size`` is the global batch. Every process draws the same global order and
  augments the whole global batch from the streams all processes share; process ``r`` trains on
  its rows (:meth:`ProcessWorld.rows`: ``torch.tensor_split``'s, sizes differing by at most one).
  Its random draws per example (PGD's start, AVmixup's :math:`\lambda`) are its rows of the whole
  batch's draws (:mod:`agr_optim.recipes._sharding`), so every random stream, and each image's
  draws, are those of one process on the global batch, whatever the number of processes.
- **Gradients.** The model is wrapped in ``DistributedDataParallel``: both backward passes of an
  AGR step are all-reduced, each rank's bucket weighted by its share of the batch (rows / global
  rows, :func:`_weighted_all_reduce`; ``1/N`` for equal shards, as DDP's own mean), so both sums
  are the global batch's mean gradients and AGR reconstructs from them: the single-process rule on
  the global batch. Every process then takes the same step.
- **BatchNorm.** Per process: the statistics of its shard normalise it in training; the running
  statistics every process updated are averaged after every step (:meth:`ProcessWorld.after_step`,
  one all-reduce of the BatchNorm buffers), so all processes attack and evaluate one model (the
  update is affine in the buffers, so one average per step is the average of every forward pass's
  update). ``--sync-bn`` (CUDA): ``SyncBatchNorm``, the global batch's statistics.
- **Sums.** Loss x images, correct predictions and images are summed over processes
  (:meth:`ProcessWorld.epoch_sums`); the first step with a non-finite loss is the smallest over
  processes. Every read of them is taken by all processes at the same step: rank 0's clock decides
  (:meth:`ProcessWorld.agree`), so a divergence stops every process at the same step.
- **Evaluation.** The test set in blocks of 256 as in one process; process ``r`` attacks blocks
  ``r, r + N, ...`` and draws (and drops) the random starts of the others, so each block's start,
  and the counts, summed exactly, are one process's.
- **The run folder.** Rank 0 alone reads and writes it and prints; the others meet it at a few
  points (:meth:`ProcessWorld._meet`: the settings, the data loaded (before rank 0 writes a file),
  the state to start from, each epoch's files written), where a refusal or a failure on any process
  stops every process with one line from rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import signal
import socket
import sys
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import ConfigError, TrainConfig

if TYPE_CHECKING:  # the engine imports this module
    from .engine import Trainer

__all__ = ["ONE", "ProcessWorld", "Stopped", "World", "join", "share_state"]


class Stopped(Exception):
    """A process other than rank 0 stops because the run stops (a refusal or a failure here or on
    another process; rank 0 prints why): ``code`` is the exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(f"the run stopped (exit status {code})")
        self.code = code


class World:
    """One process alone (:data:`ONE`): every batch whole, nothing to share. :class:`ProcessWorld`
    is a process of a ``torchrun`` job; the engine and the command call the same methods."""

    size = 1
    rank = 0
    main = True

    def rows(self, n: int) -> tuple[int, int]:
        """This process's rows ``lo:hi`` of the next global batch of ``n`` rows."""
        return 0, n

    def agree(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every process (a decision taken at the same step everywhere)."""
        return flag

    def epoch_sums(self, sums: Tensor) -> Tensor:
        """``[loss x images, correct, images, 1 + first bad step (0: none)]`` of every process."""
        return sums

    def last_loss(self, last: Tensor) -> float:
        """The last global batch's mean loss from each process's ``[loss, images]``."""
        return float(last[0])

    def owns(self, block: int) -> bool:
        """Whether this process attacks evaluation block ``block``."""
        return True

    def total(self, counts: Tensor) -> Tensor:
        """``counts`` summed over processes."""
        return counts

    def after_step(self) -> None:
        """After each training step (the BatchNorm buffers of every process made one)."""

    def check_data(self, cfg: TrainConfig, n_train: int) -> None:
        """Refuse (:class:`ConfigError`) data that would leave a process without images."""

    def check_replicas(self, trainer: Trainer) -> None:
        """After an epoch: every process holds the same model, optimizer and learning rate."""

    def ready(self) -> None:
        """Every process has loaded its data (rank 0: before it writes its first file), or the run
        stops on every process here."""

    def start(self, trainer: Trainer) -> None:
        """Before the first epoch: make ``trainer`` one replica of rank 0's."""

    def send_config(self, cfg: TrainConfig, resume: bool) -> None:
        """(Rank 0) the settings of the run, to every process."""

    def epoch_trained(self) -> None:
        """(Rank 0) an epoch was trained: the other processes now wait for its files."""

    def epoch_saved(self) -> None:
        """(Rank 0) the epoch's files are written: the other processes go on."""

    def stopping(self) -> None:
        """This process stops with the run's status, decided (a refusal, a divergence, a failure):
        nothing may turn it into an interrupt now."""

    def leave(self, code: int | str | None) -> None:
        """(Every process, at its end) leave the run; rank 0's ``code`` stops processes still waiting."""

    def describe(self, cfg: TrainConfig) -> str | None:
        """A line about the processes, or ``None`` alone."""
        return None

    def traffic(self) -> str | None:
        """A line about what the gradients' all-reduces moved, or ``None`` alone."""
        return None


#: The world of a process alone.
ONE = World()


def join() -> World:
    """This process's world: :data:`ONE`, or under ``torchrun`` (``WORLD_SIZE`` > 1) a member of
    the process group, ``SIGTERM`` then ending it as Ctrl-C does (``torchrun`` forwards both)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return ONE
    return ProcessWorld()


#: The methods whose authors' step (``--authors-step``) runs both AGR backward passes after all its
#: forward passes (the recipes' ``_authors_update``); PGD-AT and TRADES take theirs as the recipes do.
_BACKWARD_AFTER_FORWARDS = ("mart", "awp", "avmixup")


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # the command's own way to stop: rank 0 says what is saved


def _ddp_options() -> dict[str, Any]:
    """No buffer broadcast in forward passes (the buffers are averaged after each step); the
    newer name where torch has it."""
    from torch.nn.parallel import DistributedDataParallel

    names = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


class _Traffic:
    """What the gradient hook all-reduced: passes (one per backward pass) and bytes."""

    def __init__(self) -> None:
        self.passes = 0
        self.bytes = 0
        self.weight = 1.0


def _weighted_all_reduce(state: _Traffic, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP's all-reduce of one gradient bucket, each rank's weighted by its share of the global
    batch (DDP's own hook divides by the number of ranks: the same for equal shards)."""
    tensor = bucket.buffer()
    tensor.mul_(state.weight)
    state.bytes += tensor.numel() * tensor.element_size()
    state.passes += int(bucket.is_last())
    work = dist.all_reduce(tensor, async_op=True)
    assert work is not None  # async_op=True
    return work.get_future().then(lambda fut: fut.value()[0])


# DDP checks a hook's annotations as objects; this module's are strings (the __future__ import).
_weighted_all_reduce.__annotations__.update(bucket=dist.GradBucket, state=_Traffic)
_weighted_all_reduce.__annotations__["return"] = torch.futures.Future[Tensor]


def _host() -> str:
    return socket.gethostname()


class ProcessWorld(World):
    """A process of a ``torchrun`` job (see the module docstring for what each method does)."""

    def __init__(self) -> None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend)
        self.backend = backend
        self.size, self.rank = dist.get_world_size(), dist.get_rank()
        self.main = self.rank == 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        self.local_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.size)) or self.size)
        self.waiting = True  # (rank 0) the other processes wait at a meeting (_meet)
        self.started = False
        self.sync_bn = False
        self.traffic_state = _Traffic()
        self._buffers: list[Tensor] = []
        with contextlib.suppress(ValueError):  # not the main thread (a test harness): no handler
            signal.signal(signal.SIGTERM, _sigterm)
        # A first convolution over one channel (digits, MNIST): its gradient's stride on the size-1
        # dimension differs from the bucket's, which DDP reports on every rank; harmless.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")

    # ------------------------------------------------------------------ meetings (the run's life)
    def _meet(self, failure: tuple[int, str] | None = None) -> list[tuple[int, str, str] | None]:
        """Every process says whether it can go on (``failure``: an exit status and a line); returns
        what each said (with its host). Only between epochs, never inside one."""
        said: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(said, None if failure is None else (*failure, _host()))
        except RuntimeError as error:  # gloo or nccl: a process of the run is gone
            self.waiting = False
            if self.main:
                raise
            self.stopping()
            print(f"agr-train: process {self.rank}: the run's other processes are gone "
                  f"({str(error).splitlines()[0][:200]})", file=sys.stderr, flush=True)
            raise Stopped(1) from None
        self.waiting = False
        return said

    def _go_on(self, said: list[tuple[int, str, str] | None]) -> None:
        """Raise unless every process can go on: on rank 0 the first failure of another process as
        a refusal naming it, elsewhere :class:`Stopped` with rank 0's status (or the refusal's)."""
        failed = [(rank, s) for rank, s in enumerate(said) if s is not None]
        if not failed:
            return
        self.stopping()
        rank, (code, line, host) = failed[0]
        if self.main:
            raise ConfigError(f"process {rank} of {self.size} (host {host}): {line}")
        raise Stopped(code)

    def _broadcast(self, payload: Any = None) -> Any:
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def send_config(self, cfg: TrainConfig, resume: bool) -> None:
        self._check(cfg)
        self._go_on(self._meet())
        self._broadcast((cfg.to_json(), resume))
        self._use_device(cfg)
        self.waiting = True  # the others load the data, then wait in ready()

    def receive_config(self) -> tuple[TrainConfig, bool]:
        """(Not rank 0) the run's settings from rank 0."""
        self._go_on(self._meet())
        settings, resume = self._broadcast()
        cfg = TrainConfig.from_json(settings)
        self._use_device(cfg)
        return cfg, resume

    def ready(self) -> None:
        self._go_on(self._meet())  # a process that could not load its data refuses the run here
        self.waiting = True  # the others build their trainer, then wait in start()

    def fail(self, code: int, error: BaseException) -> NoReturn:
        """(Not rank 0) this process cannot go on: tell the others at the next meeting, then stop."""
        self.stopping()
        line = str(error).splitlines()[0] if str(error) else type(error).__name__
        self._meet((code, line))
        raise Stopped(code)

    def start(self, trainer: Trainer) -> None:
        """Every process meets; then ``trainer``'s model is wrapped in DDP (its construction is
        itself collective, hence here) and rank 0's trainer state (weights, optimizer, schedule,
        streams, history: a resumed or ``--init-from`` run's) is loaded on every other process."""
        self._go_on(self._meet())
        self._wrap(trainer)
        state = share_state(trainer.state_dict() if self.main else None, trainer.device)
        if not self.main:
            trainer.load_state_dict(state)
        self.started = True
        self._compare(trainer, f"before epoch {trainer.epoch}")  # before training's collectives: a mismatch hangs them

    def epoch_trained(self) -> None:
        self.waiting = True

    def epoch_saved(self) -> None:
        self._go_on(self._meet())

    def wait_for_epoch(self) -> None:
        """(Not rank 0) wait until rank 0 has written the epoch's files (or stop with its status)."""
        self._go_on(self._meet())

    def stopping(self) -> None:
        # torchrun sends SIGTERM to the processes still running as soon as one has exited with a
        # failure (its poll, every 0.1 s): a process that stops a moment after another (a loaded
        # machine) took it for Ctrl-C and ended with a traceback and an interrupt's status instead
        # of the run's. It is ending by itself now (torchrun sends SIGKILL 30 s later if not).
        with contextlib.suppress(ValueError):  # not the main thread (a test harness): no handler
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def leave(self, code: int | str | None) -> None:
        try:
            if self.main and self.waiting:
                status = code if isinstance(code, int) else 1 if code else 0
                self._meet((status, "rank 0 stopped"))
        finally:
            dist.destroy_process_group()

    def exit(self, code: int | str | None) -> NoReturn:
        """Leave the group and end the process with ``code`` (the streams flushed). ``os._exit``:
        gloo's threads have been seen to abort an exiting interpreter ("terminate called without
        an active exception", SIGABRT), after the run, turning its status into -6."""
        self.stopping()
        status = code if isinstance(code, int) else 0 if code is None else 1
        if isinstance(code, str):
            print(code, file=sys.stderr)
        try:
            self.leave(status)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    # ------------------------------------------------------------------ checks
    def _check(self, cfg: TrainConfig) -> None:
        if cfg.authors_step and cfg.agr and cfg.method in _BACKWARD_AFTER_FORWARDS:
            # Their AGR arm runs every forward pass, then both backward passes; DDP all-reduces
            # only the first backward after a forward, so each process kept its own adversarial
            # gradient and the replicas drifted apart (found by the replica check after epoch 0).
            raise ConfigError(
                f"--authors-step with --method {cfg.method} and --agr under torchrun: the authors' step takes "
                "the clean and the adversarial backward pass after all its forward passes, and "
                "DistributedDataParallel all-reduces only the first; run it in one process, or drop --authors-step"
            )
        device = torch.device(cfg.device)
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {cfg.device} under torchrun: use cuda (nccl) or cpu (gloo)")
        if device.type == "cuda":
            if device.index is not None:
                raise ConfigError(
                    f"--device {cfg.device} under torchrun: each process takes cuda:LOCAL_RANK; pass --device cuda"
                )
            if self.backend == "gloo":
                raise ConfigError("--device cuda under torchrun needs torch with nccl; use --device cpu (gloo)")
            if torch.cuda.device_count() < self.local_size:
                raise ConfigError(
                    f"--device cuda: this host has {torch.cuda.device_count()} CUDA device(s) for "
                    f"{self.local_size} processes (torchrun --nproc_per_node): one GPU per process"
                )

    def check_data(self, cfg: TrainConfig, n_train: int) -> None:
        last = n_train % cfg.batch_size or cfg.batch_size
        fewest = min(cfg.batch_size, last, n_train)
        if fewest < self.size:
            which = "a batch" if fewest == cfg.batch_size else f"the last batch ({n_train} images mod {cfg.batch_size})"
            raise ConfigError(
                f"--batch-size {cfg.batch_size} (the global batch) with {self.size} processes: {which} has "
                f"{fewest} images, fewer than the processes; every process needs an image of every batch: "
                f"choose a larger --batch-size or fewer processes"
            )

    def check_replicas(self, trainer: Trainer) -> None:
        self._compare(trainer, f"after epoch {trainer.epoch}")

    def _compare(self, trainer: Trainer, when: str) -> None:
        """One all-gather of a float64 fingerprint: the sum and the sum of squares of every weight,
        buffer and momentum, every random stream's state whole, the learning rate and AGR's step
        count. Processes that drifted apart would each train their own model under one name, or
        draw other data, so a difference stops the run."""
        named = [(f"the model's {k}", t) for k, t in trainer.module.state_dict().items()]
        for i, state in enumerate(trainer.sgd.state.values()):
            named += [(f"the optimizer's {k} of parameter {i}", t) for k, t in state.items() if torch.is_tensor(t)]
        parts = [torch.stack([t.double().sum(), t.double().square().sum()]).cpu() for _, t in named]
        streams = {"global": trainer.rng_cpu, "CUDA": trainer.rng_cuda, "order": trainer.order.get_state(),
                   "augmentation": trainer.augment_rng.get_state()}
        for name, state in streams.items():
            if state is not None:
                named.append((f"the {name} random stream", state))
                parts.append(state.double())
        agr_steps = trainer.agr.step_count if trainer.agr is not None else 0
        named.append(("the learning rate or AGR's step count", torch.zeros(2)))
        parts.append(torch.tensor([trainer.sgd.param_groups[0]["lr"], agr_steps], dtype=torch.float64))
        mine = torch.cat(parts)
        every: list[Any] = [None] * self.size
        dist.all_gather_object(every, mine)  # as objects: a process with other tensors has another length
        for other in every:
            if other.shape != mine.shape or not torch.equal(other, mine):
                if other.shape != mine.shape:
                    what = "the optimizer's state (other tensors)"
                else:
                    where = int((other != mine).nonzero()[0, 0])
                    what = named[int((torch.tensor([p.numel() for p in parts]).cumsum(0) <= where).sum())][0]
                raise RuntimeError(f"the processes hold different values of {what} {when}: a bug")

    def _use_device(self, cfg: TrainConfig) -> None:
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.set_device(self.local_rank)

    # ------------------------------------------------------------------ the model
    def _wrap(self, trainer: Trainer) -> None:
        from torch.nn.modules.batchnorm import _BatchNorm
        from torch.nn.parallel import DistributedDataParallel

        module = trainer.module
        if trainer.cfg.sync_bn:
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            assert converted is module  # the models' roots are not BatchNorm layers
        self.sync_bn = trainer.cfg.sync_bn
        self._buffers = [
            b
            for m in module.modules()
            if isinstance(m, _BatchNorm)
            for b in (m.running_mean, m.running_var)
            if b is not None
        ]
        cuda = trainer.device.type == "cuda"
        devices = [torch.cuda.current_device()] if cuda else None
        ddp = DistributedDataParallel(module, device_ids=devices, **_ddp_options())
        ddp.register_comm_hook(self.traffic_state, _weighted_all_reduce)  # type: ignore[arg-type]
        compiled = trainer.cfg.compile
        trainer.model = torch.compile(ddp) if compiled else ddp
        # Evaluation: each process attacks its own blocks, with no DDP bookkeeping in between.
        trainer.eval_model = torch.compile(module) if compiled else module

    # ------------------------------------------------------------------ an epoch
    def rows(self, n: int) -> tuple[int, int]:
        if not self.started:
            raise RuntimeError("ProcessWorld.start(trainer) must run before the first epoch")
        q, extra = divmod(n, self.size)  # torch.tensor_split's sizes: the first `extra` get q + 1
        lo = self.rank * q + min(self.rank, extra)
        hi = lo + q + (self.rank < extra)
        self.traffic_state.weight = (hi - lo) / n
        return lo, hi

    def agree(self, flag: bool) -> bool:
        decision = torch.tensor([int(flag)])
        dist.broadcast(decision, src=0)
        return bool(decision.item())

    def _gathered(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous())
        return torch.stack(parts)

    def epoch_sums(self, sums: Tensor) -> Tensor:
        every = self._gathered(sums)
        first = every[:, 3]
        first = torch.where(first > 0, first, torch.full_like(first, torch.inf)).min()
        first = torch.where(torch.isinf(first), torch.zeros_like(first), first)
        return torch.cat([every[:, :3].sum(dim=0), first.reshape(1)])

    def last_loss(self, last: Tensor) -> float:
        every = self._gathered(last)
        return float((every[:, 0] * every[:, 1]).sum() / every[:, 1].sum())

    def owns(self, block: int) -> bool:
        return block % self.size == self.rank

    def total(self, counts: Tensor) -> Tensor:
        counts = counts.clone()
        dist.all_reduce(counts)
        return counts

    def after_step(self) -> None:
        if self.sync_bn or not self._buffers:
            return
        flat = torch.cat([b.reshape(-1) for b in self._buffers])
        dist.all_reduce(flat)
        flat.div_(self.size)
        with torch.no_grad():
            for b, mean in zip(self._buffers, flat.split([b.numel() for b in self._buffers]), strict=True):
                b.copy_(mean.view_as(b))

    # ------------------------------------------------------------------ lines (rank 0)
    def describe(self, cfg: TrainConfig) -> str:
        hosts = max(1, self.size // max(1, self.local_size))
        shard = cfg.batch_size // self.size
        norm = "SyncBatchNorm (the global batch's statistics)" if cfg.sync_bn else (
            "BatchNorm per process (running statistics averaged after every step)"
        )
        backend = "nccl" if torch.device(cfg.device).type == "cuda" else "gloo"
        return (
            f"agr-train: {self.size} processes on {hosts} host(s), DDP over {backend}; --batch-size "
            f"{cfg.batch_size} is the global batch ({shard}{'+' if cfg.batch_size % self.size else ''} per "
            f"process); {norm}; rank 0 writes {cfg.out}"
        )

    def traffic(self) -> str:
        t = self.traffic_state
        per_pass = t.bytes // t.passes if t.passes else 0
        return (
            f"agr-train: gradients all-reduced in {t.passes} backward passes, {per_pass:,} bytes each "
            f"({t.bytes:,} bytes in all, this process's part of this session)"
        )


# ---------------------------------------------------------------------- rank 0's state to every process
class _Slot:
    """Where a tensor was in a shared state: filled by a broadcast of its own."""

    def __init__(self, t: Tensor) -> None:
        self.shape, self.dtype, self.cuda = tuple(t.shape), t.dtype, t.device.type == "cuda"


def _rebuilt(obj: Any, leaf: Callable[[Any], Any]) -> Any:
    """``obj`` with every leaf replaced by ``leaf(leaf_value)``: dicts keep their type and
    attributes (a ``Counter`` of milestones, a state dict's ``_metadata``), tuples their type."""
    if isinstance(obj, dict):
        out = copy.copy(obj)  # the same class, the same attributes
        for key, value in obj.items():
            out[key] = _rebuilt(value, leaf)
        return out
    if isinstance(obj, list):
        return [_rebuilt(v, leaf) for v in obj]
    if isinstance(obj, tuple):
        items = [_rebuilt(v, leaf) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return leaf(obj)


def share_state(state: Any, device: torch.device) -> Any:
    """Rank 0's ``state`` (nested dicts, lists and tuples of tensors and plain values) on every
    process: the structure as one object, each tensor by a broadcast of its own (over nccl for
    CUDA tensors: a model's weights are not pickled through rank 0). Rank 0 gets its own back."""
    main = dist.get_rank() == 0
    tensors: list[Tensor] = []

    def slot(value: Any) -> Any:
        if isinstance(value, Tensor):
            tensors.append(value)
            return _Slot(value)
        return value

    box = [_rebuilt(state, slot) if main else None]
    dist.broadcast_object_list(box, src=0)
    if main:
        for t in tensors:
            dist.broadcast(t.detach().contiguous(), src=0)
        return state

    def fill(value: Any) -> Any:
        if not isinstance(value, _Slot):
            return value
        t = torch.empty(value.shape, dtype=value.dtype, device=device if value.cuda else "cpu")
        dist.broadcast(t, src=0)
        return t

    return _rebuilt(box[0], fill)
