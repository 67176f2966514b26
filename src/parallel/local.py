"""Plain PyTorch engine for one process: no sharding. The reference that sharded runs are compared with,
and the simplest engine to debug the model with."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from src.parallel.engine import check_precision
from src.parallel.formats import CheckpointReader, TrainingState
from src.parallel.state import check_ema, init_moments, update_ema
from src.parallel.transforms import prepare_model
from src.rundir import latest_tag, refuse_unreadable
from src.safe_load import load_tensors

FILE = "local_engine.pt"  # a local checkpoint folder holds this one file (and the manifest)


class LocalCheckpoint(CheckpointReader):
    """A local engine's checkpoint folder: `local_engine.pt`, one torch.save of the module's state dict, the
    optimizer's (state by position in `param_names`, the groups' parameter names), the scheduler's, the EMA
    (name -> fp32 tensor, or None) and the loop state. Loaded `weights_only`, memory-mapped."""

    name = "local"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._blob: dict | None = None

    @classmethod
    def recognises(cls, folder: Path) -> bool:
        return (Path(folder) / FILE).is_file()

    @property
    def world_size(self) -> int:
        return 1

    @property
    def blob(self) -> dict:
        if self._blob is None:
            self._blob = load_tensors(self.folder / FILE, mmap=True)
        return self._blob

    def model_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.float() for k, v in self.blob["module"].items()}

    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        return self.blob.get("ema")

    def weight_reader(self) -> tuple[dict[str, torch.Size], Callable[[str], torch.Tensor]]:
        module = self.blob["module"]  # memory-mapped: a tensor is read when it is used
        return {k: v.shape for k, v in module.items()}, module.__getitem__

    def _optimizer_state(self) -> dict[str, dict]:
        """The AdamW state of each parameter that has one, by name (the optimizer keeps it by position)."""
        state = self.blob["optimizer"]["state"]
        order = [n for group in self.blob["param_names"] for n in group]  # optimizer index -> name
        return {n: state[i] for i, n in enumerate(order) if i in state}

    def moments(self) -> LocalMoments:
        return LocalMoments(self._optimizer_state())

    def training_state(self) -> TrainingState:
        blob = self.blob
        return TrainingState(
            engine=self.name,
            weights=self.model_weights(),
            ema=blob["ema"],
            groups=blob["param_names"],
            lrs=[g["lr"] for g in blob["optimizer"]["param_groups"]],
            moments={n: (s["exp_avg"], s["exp_avg_sq"], int(s["step"])) for n, s in self._optimizer_state().items()},
            scheduler=blob["scheduler"],
            loops=[blob["state"]],
        )


class LocalMoments:
    """AdamW moments of a local checkpoint by parameter name (`src.parallel.formats.MomentsReader`)."""

    def __init__(self, state: dict[str, dict]):
        self._state = state
        self.steps = {n: int(s["step"]) for n, s in state.items()}

    def select(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        for name in names:
            yield name, self._state[name]["exp_avg"], self._state[name]["exp_avg_sq"]


class LocalEngine:
    """Same contract as `DeepSpeedEngine`; fp32 or bf16 autocast (fp32 weights)."""

    checkpoint_format = LocalCheckpoint

    @staticmethod
    def planned_bytes(par, n_params: int, block: int, gpus: int, ema_bytes: float) -> tuple[float, float, float]:
        """src.parallel.plan: every state whole on the one rank; nothing gathered or bucketed."""
        from src.parallel.plan import state_bytes_per_param

        return n_params * (state_bytes_per_param(par.precision, 0, 1) + ema_bytes), 0.0, 0.0

    def __init__(
        self,
        model: nn.Module,
        optimizer: Callable,
        scheduler: Callable,
        device: torch.device,
        precision: str = "fp32",
        grad_clip: float = 1.0,
        checkpoint_double: int = 0,
        checkpoint_single: int = 0,
        param_groups: list[dict] | None = None,
        compile: bool = False,
    ):
        check_precision(precision)
        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"the local engine runs one process, but the world size is {dist.get_world_size()}: "
                "use parallel=zero3 for several ranks"
            )
        prepare_model(model, checkpoint_double, checkpoint_single, compile)  # one process: no sequence parallelism
        self.module = model.to(device)
        self.device = device
        self.precision = precision
        self.grad_clip = grad_clip
        self.optimizer = optimizer(param_groups or [p for p in model.parameters() if p.requires_grad])
        self.scheduler = scheduler(self.optimizer)
        self._names = {p: n for n, p in model.named_parameters()}
        self.ema: dict[str, torch.Tensor] | None = None  # name -> fp32 average of a trainable parameter

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return self.module(*args)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip, optimizer step, schedule step; returns the gradient norm before clipping. A non-finite norm
        applies nothing (no weight or moment update, the schedule does not advance), as DeepSpeed does."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        if torch.isfinite(norm):  # a host sync, once per step
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def count_nonfinite(self) -> int:
        """Non-finite elements in the weights (a checkpoint of such weights is never written)."""
        return sum(int((~torch.isfinite(p)).sum()) for p in self.module.parameters())

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, ckpt_dir: Path, tag: str, state: dict) -> None:
        out = Path(ckpt_dir) / tag
        out.mkdir(parents=True, exist_ok=True)
        blob = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "param_names": [[self._names[p] for p in g["params"]] for g in self.optimizer.param_groups],
            "ema": self.ema,
            "state": state,
        }
        torch.save(blob, out / f"{FILE}.tmp")
        (out / f"{FILE}.tmp").replace(out / FILE)  # src.integrity seals it, moves `latest`

    def load(self, ckpt_dir: Path) -> dict | None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        path = Path(ckpt_dir) / tag / FILE
        if not path.is_file():
            raise ValueError(f"checkpoint {tag!r} has no {path.name} (was it written by another engine?)")
        try:
            blob = load_tensors(path)  # on the host: the RNG states must stay CPU tensors; weights_only
            self.module.load_state_dict(blob["module"], strict=True)
            self.optimizer.load_state_dict(blob["optimizer"])
            self.scheduler.load_state_dict(blob["scheduler"])
            if self.ema is not None:
                ema = check_ema(blob.get("ema"), self.ema, path)
                self.ema = {name: tensor.to(self.device) for name, tensor in ema.items()}
        except Exception as err:
            raise refuse_unreadable(ckpt_dir, tag, err) from err
        return blob["state"]

    def _trainable(self) -> dict[str, torch.Tensor]:
        """The parameters the optimizer holds (ever trainable), by name."""
        return {self._names[p]: p for g in self.optimizer.param_groups for p in g["params"]}

    def init_ema(self) -> None:
        """Start the EMA at the current weights (fp32)."""
        self.ema = {n: p.detach().float().clone() for n, p in self._trainable().items()}

    def update_ema(self, decay: float) -> None:
        current = self._trainable()
        update_ema(list(self.ema.values()), [current[n] for n in self.ema], decay)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def reset_optimizer_state(self, groups: Sequence[int]) -> None:
        """Forget the moments of `groups`: AdamW starts them afresh (step 0) at their next update."""
        for g in groups:
            for p in self.optimizer.param_groups[g]["params"]:
                self.optimizer.state.pop(p, None)

    def load_moments(self, moments: Iterable[tuple[str, torch.Tensor, torch.Tensor]], steps: dict[int, int]) -> None:
        """Write carried-over AdamW moments (name, exp_avg, exp_avg_sq); `steps`: group -> its AdamW step."""
        for g, step in steps.items():
            init_moments(self.optimizer, self.optimizer.param_groups[g]["params"], step)
        params = dict(self.module.named_parameters())
        for name, exp_avg, exp_avg_sq in moments:
            state = self.optimizer.state[params[name]]
            state["exp_avg"].copy_(exp_avg.view_as(params[name]))
            state["exp_avg_sq"].copy_(exp_avg_sq.view_as(params[name]))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
