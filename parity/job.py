"""A run of one backend, as data: what `parity.pipeline.record_run` executes, and what a compare side's worker process
receives on stdin (`Job.to_json` / `Job.from_json`).

A job names its checkpoint, inputs, backend and how it runs (dtype, device, precision, conventions), then what it
records: a capture file of forward points (`capture`), the teacher-forced units on another capture's unit inputs
(`teacher_from` -> `teacher_output`), a decoding (`generate`, written to `generate.output` when given), and a
fine-tuning step (`train`, parity.training.TrainOptions; its first gradients written to `grads`, the updated
checkpoint to `updated` in format `updated_format`: `parity.train_run.record_train`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from parity.config import PaliGemmaConfig
from parity.conventions import Conventions
from parity.training import TrainOptions


@dataclasses.dataclass(frozen=True)
class Generate:
    """A decoding: `steps` new tokens per row. `seed` None: greedy decoding with no sampling options at all (a
    comparison's decode), recorded as such; otherwise the sampling options are recorded in full."""

    steps: int
    greedy: bool = True
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    ignore_eos: bool = True
    compile: str | None = None
    caches: bool = True  # capture the llm/layerNN/{k,v}_cache points at the end
    logits: bool = True  # return (and write) the step logits
    forced_from: str | None = None  # a generation file whose tokens are fed (teacher-forced decoding)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra manifest fields of the file
    output: str | None = None  # the generation file (tokens, step logits, caches), or None

    def sampling(self) -> dict[str, Any]:
        """The manifest's "sampling" record."""
        if self.seed is None:
            return {"greedy": self.greedy, "max_new_tokens": self.steps, "ignore_eos": self.ignore_eos}
        return {
            "greedy": self.greedy,
            "temperature": None if self.greedy else (1.0 if self.temperature is None else self.temperature),
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
            "max_new_tokens": self.steps,
            "ignore_eos": self.ignore_eos,
        }


@dataclasses.dataclass(frozen=True)
class Job:
    checkpoint: str
    inputs: str
    impl: str = "torch"
    convention: str | dict[str, Any] = "big_vision"  # a preset name, or Conventions.to_dict()
    settings: tuple[str, ...] = ()  # NAME=VALUE overrides of the convention
    config: str | dict[str, Any] | None = None  # variant name, config.json path or PaliGemmaConfig.to_dict()
    dtype: str = "float32"  # the parameters' values
    compute_dtype: str | None = None  # default: dtype
    device: str = "cpu"
    precision: str = "highest"
    mesh: str | None = None  # jax: data=D,model=M
    capture: str | None = None  # capture file of the forward points; no forward pass when None
    points: str | tuple[str, ...] | None = None  # globs of the points to capture (None: all)
    teacher_from: str | None = None  # a capture whose block inputs this backend's blocks are run on
    teacher_output: str | None = None
    generate: Generate | None = None
    stream: bool | None = None  # block-streamed (parity.stream): True forces it; None: when resident would not fit
    role: str = "run"  # "run", or "side" for a compare's side (named so in messages, e.g. a memory refusal)
    train: TrainOptions | None = None  # a training step (record_train); None: no training
    grads: str | None = None  # the first step's gradients (npz), or None
    updated: str | None = None  # the updated checkpoint, or None
    updated_format: str | None = None  # its format: npz, safetensors or orbax

    def __post_init__(self):
        # Plain, hashable, JSON-shaped values, whatever the caller passed (lists, Conventions, PaliGemmaConfig).
        if isinstance(self.convention, Conventions):
            object.__setattr__(self, "convention", self.convention.to_dict())
        if isinstance(self.config, PaliGemmaConfig):
            object.__setattr__(self, "config", self.config.to_dict())
        object.__setattr__(self, "settings", tuple(self.settings))
        if isinstance(self.points, list):
            object.__setattr__(self, "points", tuple(self.points))
        if isinstance(self.generate, dict):
            object.__setattr__(self, "generate", Generate(**self.generate))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainOptions.from_dict(self.train))

    @property
    def conventions(self) -> str | Conventions:
        return Conventions.from_dict(self.convention) if isinstance(self.convention, dict) else self.convention

    @property
    def config_arg(self) -> PaliGemmaConfig | str | None:
        return PaliGemmaConfig.from_dict(self.config) if isinstance(self.config, dict) else self.config

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        if self.train is not None:
            d["train"] = self.train.to_dict()
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> Job:
        d = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"job: unknown fields {unknown}")
        return cls(**d)
