"""The cluster-update adapter: one shared update vector per cluster of safety neurons (DESIGN.md 1.3, 1.4).

Every neuron i of cluster c in target m gets the same trainable vector delta[m][c] (length d_model) added
to its weight row: W_m[i, :] += delta[m][c]. Training never materialises W': a forward hook on the
projection adds (x @ delta^T), scattered to the selected output features, to the frozen projection's
output. Only the deltas are parameters, so no gradient or optimizer state exists for frozen weights.

Folding writes W_m[rows] += delta[clusters] into the weights; the folded model is an ordinary checkpoint.

`train.update_side=output` (our option; the paper changes the input rows above) puts the same shared vectors on
the other side of the neurons: column i of the layer's FFN output projection, so the change a neuron makes is its
own activation times delta[m][c] and stays as selective as the neuron itself. The hook then sits on the output
projection and adds (activations of the rows, summed per cluster) @ delta.

The adapter alone is saved PEFT-style: adapter_config.json + adapter_model.safetensors (no pickle).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .errors import NestuneError
from .io import save_tensors, write_json
from .models import FFNTarget, get_module, model_type, weights_fingerprint

ADAPTER_TYPE = "NEST"


@dataclass(frozen=True)
class TargetUpdate:
    """Where one target's updates go: the rows (neuron indices within the target) and their cluster ids."""

    name: str
    module_path: str
    offset: int
    transposed: bool
    d_model: int
    rows: tuple[int, ...]
    clusters: tuple[int, ...]  # cluster id per row, 0..k-1
    output_path: str = ""  # set for side "output": the layer's FFN output projection, whose columns change
    output_transposed: bool = False  # a Conv1D output projection: weight (d_ff, d_model)

    @property
    def side(self) -> str:
        """input: the update changes the rows of module_path; output: the columns of output_path."""
        return "output" if self.output_path else "input"

    @property
    def hooked_path(self) -> str:
        """The module whose weights the update changes and whose forward it hooks."""
        return self.output_path if self.side == "output" else self.module_path

    @property
    def k(self) -> int:
        return max(self.clusters) + 1 if self.clusters else 0

    @classmethod
    def from_target(cls, target: FFNTarget, rows, clusters, output: tuple[str, bool] | None = None) -> TargetUpdate:
        """`output`: (path, transposed) of the layer's FFN output projection (models.ffn_output) for side "output"."""
        rows, clusters = tuple(int(r) for r in rows), tuple(int(c) for c in clusters)
        if len(rows) != len(clusters):
            raise ValueError(f"{target.name}: {len(rows)} rows but {len(clusters)} cluster ids")
        if sorted(set(clusters)) != list(range(max(clusters) + 1 if clusters else 0)):
            raise ValueError(f"{target.name}: cluster ids must be 0..k-1 with none missing")
        return cls(target.name, target.module_path, target.offset, target.transposed, target.d_model, rows,
                   clusters, *(output or ()))


class ClusterUpdate(nn.Module):
    """The k shared update vectors of one target, applied to its projection's output by a forward hook."""

    def __init__(self, spec: TargetUpdate):
        super().__init__()
        self.spec = spec
        self.delta = nn.Parameter(torch.zeros(spec.k, spec.d_model))
        # Input side: the output features touched (offset places the rows inside a fused gate_up projection).
        # Output side: the input features of the output projection that hold the rows' activations.
        offset = spec.offset if spec.side == "input" else 0
        self.register_buffer("columns", torch.tensor(spec.rows, dtype=torch.long) + offset, persistent=False)
        self.register_buffer("cluster_of_row", torch.tensor(spec.clusters, dtype=torch.long), persistent=False)
        self.enabled = True

    def hook(self, module, args, output):
        if not self.enabled:
            return output
        x = args[0]
        if self.spec.side == "output":
            act = x.index_select(-1, self.columns.to(x.device))  # (..., n_rows): the neurons' activations
            per_cluster = act.new_zeros(*act.shape[:-1], self.spec.k).index_add(
                -1, self.cluster_of_row.to(act.device), act)  # shared vector: sum the activations first
            return output + (per_cluster @ self.delta.to(x.dtype)).to(output.dtype)
        extra = x @ self.delta.to(x.dtype).t()  # (..., k): one dot product per cluster, not per neuron
        extra = extra.index_select(-1, self.cluster_of_row.to(extra.device))  # (..., n_rows)
        return output.index_add(-1, self.columns.to(output.device), extra.to(output.dtype))

    def weight_delta(self) -> torch.Tensor:
        """The (n_rows, d_model) change this update makes to its rows, or output columns (folding, audits)."""
        return self.delta[self.cluster_of_row]


class NeSTAdapter(nn.Module):
    """All cluster updates of a model. `attach` hooks them in; `fold` writes them into the weights."""

    def __init__(self, specs: list[TargetUpdate]):
        super().__init__()
        if not specs:
            raise NestuneError("the adapter has no target rows", "detection selected no neuron; lower the threshold")
        self.specs = list(specs)
        self.updates = nn.ModuleDict({_key(s.name): ClusterUpdate(s) for s in specs})
        self._handles: list = []

    def update_for(self, target: str) -> ClusterUpdate:
        """The update of one target module (by its name, e.g. "layers.3.up")."""
        return self.updates[_key(target)]

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attach(self, model: nn.Module) -> NeSTAdapter:
        """Hook every update into the model, moved to its module's device."""
        self.detach()
        for spec in self.specs:
            module = get_module(model, spec.hooked_path)
            update = self.updates[_key(spec.name)]
            update.to(module.weight.device)
            self._handles.append(module.register_forward_hook(update.hook))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextmanager
    def disabled(self):
        """The original model for free: same weights, deltas switched off (used for KL to the original)."""
        flags = [u.enabled for u in self.updates.values()]
        for u in self.updates.values():
            u.enabled = False
        try:
            yield
        finally:
            for u, f in zip(self.updates.values(), flags):
                u.enabled = f

    @torch.no_grad()
    def row_scales(self, model: nn.Module) -> dict[str, float]:
        """RMS of each target's selected weight rows, keyed like `named_parameters()` ("updates.<key>.delta").

        Training scales each delta's learning rate by it, so one relative lr fits models whose weights differ
        in scale (smollm2-135m's FFN rows have RMS ~0.19, qwen2.5-0.5b's ~0.02).
        """
        scales = {}
        for spec in self.specs:
            w = get_module(model, spec.hooked_path).weight
            cols = self.updates[_key(spec.name)].columns.to(w.device)
            rows = w[:, cols] if _neurons_are_columns(spec) else w[cols]
            scales[f"updates.{_key(spec.name)}.delta"] = float(rows.float().pow(2).mean().sqrt())
        return scales

    @torch.no_grad()
    def scale(self, factor: float) -> NeSTAdapter:
        """Multiply every update by `factor` (fold.scale): 1 keeps the trained update, 0 gives the base model."""
        for update in self.updates.values():
            update.delta.mul_(factor)
        return self

    @torch.no_grad()
    def fold(self, model: nn.Module) -> None:
        """W[rows] += delta[cluster_of_row] (output side: the output projection's columns), in fp32, then removes
        the hooks. Other weights are untouched."""
        self.detach()
        for spec in self.specs:
            module = get_module(model, spec.hooked_path)
            update = self.updates[_key(spec.name)]
            w = module.weight
            change = update.weight_delta().to(w.device, torch.float32)
            cols = update.columns.to(w.device)
            if _neurons_are_columns(spec):
                w[:, cols] = (w[:, cols].float() + change.t()).to(w.dtype)
            else:
                w[cols] = (w[cols].float() + change).to(w.dtype)

    # ---- saving and loading (PEFT-shaped folder, no pickle) ------------------------------------------------

    def save(self, folder: str | Path, base: dict, extra: dict | None = None) -> None:
        """Write adapter_config.json and adapter_model.safetensors. `base` identifies the base model."""
        folder = Path(folder)
        tensors = {}
        for spec in self.specs:
            key = _key(spec.name)
            tensors[f"{key}.delta"] = self.updates[key].delta.detach().float()
            tensors[f"{key}.rows"] = torch.tensor(spec.rows, dtype=torch.long)
            tensors[f"{key}.clusters"] = torch.tensor(spec.clusters, dtype=torch.long)
        save_tensors(folder / "adapter_model.safetensors", tensors, metadata={"format": "pt"})
        config = {
            "peft_type": ADAPTER_TYPE,
            "nestune_version": __version__,
            "base_model_name_or_path": base.get("model"),
            "base_model_type": base.get("model_type"),
            "base_weights_hash": base.get("weights_hash"),
            "revision": base.get("revision"),
            "target_modules": sorted({s.hooked_path for s in self.specs}),
            "targets": [{k: v for k, v in asdict(s).items() if k not in ("rows", "clusters")} | {"side": s.side,
                        "k": s.k, "n_rows": len(s.rows)} for s in self.specs],
            "rows_and_clusters": "adapter_model.safetensors: <target>.rows and <target>.clusters",
            "d_model": self.specs[0].d_model,
            "dtype": "float32",
            "trainable_parameters": self.num_trainable(),
            **(extra or {}),
        }
        write_json(folder / "adapter_config.json", config)

    @classmethod
    def load(cls, folder: str | Path) -> tuple[NeSTAdapter, dict]:
        folder = Path(folder)
        cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not cfg_path.is_file() or not weights_path.is_file():
            raise NestuneError(f"'{folder}' is not a nestune adapter folder",
                               "it must hold adapter_config.json and adapter_model.safetensors")
        import json

        corrupt = "the adapter is damaged: copy it again from where it was trained, or retrain it"
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise NestuneError(f"'{cfg_path}' is not valid JSON ({e})", corrupt) from None
        if not isinstance(config, dict) or config.get("peft_type") != ADAPTER_TYPE:
            kind = config.get("peft_type") if isinstance(config, dict) else None
            raise NestuneError(f"'{folder}' holds a {kind} adapter, not a NeST one", "load it with peft instead")
        try:
            tensors = load_file(str(weights_path))
        except Exception as e:  # safetensors raises its own SafetensorError on a truncated or foreign file
            raise NestuneError(f"'{weights_path}' is not a readable safetensors file "
                               f"({str(e).splitlines()[0][:120]})", corrupt) from None
        try:
            specs = []
            for t in config["targets"]:
                key = _key(t["name"])
                specs.append(TargetUpdate(t["name"], t["module_path"], t["offset"], t["transposed"], t["d_model"],
                                          tuple(tensors[f"{key}.rows"].tolist()),
                                          tuple(tensors[f"{key}.clusters"].tolist()),
                                          # adapters saved before update_side existed change input rows
                                          t.get("output_path", ""), t.get("output_transposed", False)))
            adapter = cls(specs)
            with torch.no_grad():
                for spec in specs:
                    adapter.updates[_key(spec.name)].delta.copy_(tensors[f"{_key(spec.name)}.delta"])
        except (KeyError, TypeError, RuntimeError) as e:  # a missing entry, or a delta of the wrong shape
            raise NestuneError(f"'{folder}': adapter_config.json and adapter_model.safetensors do not match "
                               f"({type(e).__name__}: {str(e).splitlines()[0][:120]})", corrupt) from None
        return adapter, config


def base_identity(model: nn.Module, spec: str, revision: str | None = None) -> dict:
    return {"model": spec, "model_type": model_type(model), "weights_hash": weights_fingerprint(model),
            "revision": revision}


def check_same_base(config: dict, model: nn.Module) -> None:
    """Refuse to apply an adapter to a model other than the one it was trained on."""
    expected = config.get("base_weights_hash")
    found = weights_fingerprint(model)
    if expected and expected != found and expected != weights_fingerprint(model, legacy=True):
        raise NestuneError(
            f"this adapter was trained on '{config.get('base_model_name_or_path')}' "
            f"(weights {expected}), but the model given has weights {found}",
            "apply it to the base model it was trained on",
        )


def _neurons_are_columns(spec: TargetUpdate) -> bool:
    """Whether the weight the update changes holds one neuron per column: an input projection stored as a Conv1D
    (d_model, d_ff), or an output projection stored as a Linear (d_model, d_ff)."""
    return spec.transposed if spec.side == "input" else not spec.output_transposed


def _key(name: str) -> str:
    # ModuleDict keys cannot contain dots.
    return name.replace(".", "_")
