"""The FSDP2 backend: `torch.distributed.fsdp.fully_shard` per unit (the stage's blocks) and per network,
torch optimizers on the sharded (DTensor) parameters, and `torch.distributed.checkpoint` (DCP) files.

Another number of processes on resume needs nothing special: DCP records each tensor's global shape and
shard offsets and reads the overlapping pieces into the new shards.

Precision: parameters, gradients and optimizer state stay fp32 (sharded); bf16 computes in bf16 through
FSDP2's MixedPrecisionPolicy and reduces gradients in fp32. fp16 is refused (it needs a sharded loss
scaler; use bf16). Gradient accumulation skips the reduce-scatter on all but the last micro-batch.

Loading is weights-only: DCP unpickles its `.metadata` file with plain `pickle` and its non-tensor entries
with `torch.load(weights_only=False)`, so reading goes through a reader whose unpickler knows only DCP's
metadata classes and a planner that loads non-tensor entries weights-only.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from asset_dist.config import Config, ConfigError
from asset_dist.train.backends.base import Backend, make_optimizer, make_scheduler
from asset_dist.train.checkpoint import CheckpointError, UnsafeCheckpoint

# What a DCP .metadata pickle may name: DCP's own records, torch sizes / dtypes / layouts, and paths.
_META_MODULES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "ChunkStorageMetadata",
                                              "BytesStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _META_MODULES.get(module, ()) or (module == "torch" and (
                name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format)))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not a DCP metadata class")


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata unpickler accepts only DCP's own classes. `check()` reads and checks
    the metadata before DCP does (DCP would catch a refusal and fall back to other files)."""

    _checked = None

    def check(self) -> None:
        path = self._get_metadata_path(None)
        try:
            with self.fs.create_stream(path, "rb") as f:
                self._checked = _MetadataUnpickler(f).load()
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing (not a complete DCP checkpoint)") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise UnsafeCheckpoint(f"{path}: refused to load: {e}. Checkpoints are read weights-only; do not "
                                   "resume from files you did not write") from None

    def read_metadata(self, *args: Any, **kwargs: Any):
        if self._checked is None or kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: DCP metadata read without SafeReader.check()")
        metadata = self._checked
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that unpickles non-tensor entries (optimizer hyperparameters) weights-only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpoint(f"checkpoint entry {fqn!r}: refused to load: {str(e).splitlines()[0]}") from None
        if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with the safe load
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class FSDP2Backend(Backend):
    name = "fsdp2"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.train.precision == "fp16":
            raise ConfigError("'train.precision' fp16 is not supported by train.backend=fsdp2 (it needs a sharded "
                              "loss scaler); use bf16 or fp32")

    def __init__(self, cfg, device, env):
        super().__init__(cfg, device, env)
        self.modules: dict[str, nn.Module] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.scheds: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.micro: dict[str, int] = {}
        self.norms: dict[str, Optional[torch.Tensor]] = {}

    def setup(self, stage, nets: dict[str, nn.Module]) -> None:
        mesh = init_device_mesh(self.device.type, (self.env.world_size,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if self.cfg.train.precision == "bf16" else MixedPrecisionPolicy())
        for name, module in nets.items():
            module.to(self.device)
            for unit in stage.shard_units(name, module):
                fully_shard(unit, mesh=mesh, mp_policy=mp)
            fully_shard(module, mesh=mesh, mp_policy=mp)
            # after fully_shard: the optimizer must hold the sharded (DTensor) parameters
            opt = make_optimizer(stage.param_groups(name, module), stage.optimizer_args(name))
            self.modules[name], self.opts[name] = module, opt
            self.scheds[name] = make_scheduler(opt, self.cfg)
            self.micro[name], self.norms[name] = 0, None

    def __getitem__(self, name: str):
        return self.modules[name]

    def unwrap(self, name: str) -> nn.Module:
        return self.modules[name]

    def train(self) -> None:
        for m in self.modules.values():
            m.train()

    def _boundary(self, name: str) -> bool:
        return (self.micro[name] + 1) % self.cfg.train.grad_accum == 0

    def backward(self, name: str, loss: torch.Tensor) -> None:
        self.modules[name].set_requires_gradient_sync(self._boundary(name))
        (loss / self.cfg.train.grad_accum).backward()

    def step(self, name: str, log: bool) -> None:
        boundary = self._boundary(name)
        self.micro[name] += 1
        if not boundary:
            return
        clip = self.cfg.train.grad_clip
        params = [p for p in self.modules[name].parameters() if p.grad is not None]
        if clip > 0 or log:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
            self.norms[name] = norm
        self.opts[name].step()
        self.opts[name].zero_grad(set_to_none=True)
        self.scheds[name].step()

    def lr(self, name: str) -> float:
        return self.scheds[name].get_last_lr()[0]

    def grad_norm(self, name: str):
        norm = self.norms[name]
        if norm is None:
            return None
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # ---- checkpoints ----------------------------------------------------------------------------------
    def _state(self, name: str) -> dict[str, Any]:
        return {"model": get_model_state_dict(self.modules[name]),
                "optim": get_optimizer_state_dict(self.modules[name], self.opts[name])}

    def save(self, folder: Path) -> None:
        for name in self.modules:
            dcp.save(self._state(name), storage_writer=FileSystemWriter(str(folder / name)))

    def load(self, folder: Path, meta: dict[str, Any], scratch: Path) -> None:
        # DCP reshards by itself: each rank reads the pieces of every saved shard that overlap its own
        for name, module in self.modules.items():
            state = self._state(name)
            reader = SafeReader(str(folder / name))
            reader.check()
            try:
                dcp.load(state, storage_reader=reader, planner=SafePlanner())
            except CheckpointException as e:  # DCP wraps every rank's error (a BaseException): unwrap ours
                errors = [exc for exc, _tb in e.failures.values()]
                ours = next((x for x in errors if isinstance(x, CheckpointError)), None)
                if ours is not None:
                    raise ours from None
                raise CheckpointError(f"{folder / name}: cannot load this checkpoint ({errors[0] if errors else e})") from None
            set_model_state_dict(module, state["model"])
            set_optimizer_state_dict(module, self.opts[name], state["optim"])

    def rank_state(self) -> dict[str, Any]:
        return {"schedulers": {name: s.state_dict() for name, s in self.scheds.items()},
                "micro": dict(self.micro)}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        for name, s in self.scheds.items():
            s.load_state_dict(state["schedulers"][name])
        self.micro.update(state.get("micro", {}))

    def full_state_dict(self, folder: Path, name: str) -> Optional[dict[str, torch.Tensor]]:
        sd = get_model_state_dict(self.modules[name], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.rank != 0:
            return None
        return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}
