"""The state of one `explain()` call, and the passes its methods share.

`ExplainContext` resolves the target layer and targets once, and caches the forward pass with the layer's
activation captured and the gradients of every target with respect to it, so all CAMs reuse one pass; the
layers below the target layer run unrecorded (inference mode), only those above it in grad mode.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from medlens.errors import ModelError
from medlens.accel.fast_forward import FastForward, fast_forward
from medlens.tensor.autograd import call_model
from medlens.core.feature_layout import FeatureLayout, first_tensor, layout_of, with_first
from medlens.core.layers import LayerSpec, TargetLayer, is_linear, resolve_target_layer
from medlens.core.model_state import HookSet, module_tree
from medlens.core.targets import resolve_targets


@dataclass
class LayerPass:
    """One forward pass with the target layer's activation captured as a leaf of the graph above it.

    `activation` is the layer's output as the model uses it: when an in-place ReLU follows the layer (the
    functional `F.relu(features, inplace=True)` of DenseNet and TorchXRayVision's DenseNet) it is that
    ReLU's output, and `inplace_relu` says so. Gradients are taken with respect to `leaf`, the layer's own
    output, so the ReLU's mask is part of them.
    """

    activation: torch.Tensor  # (B, C, *s), detached
    logits: torch.Tensor  # (B, K), graph back to `leaf` when built for gradients
    head_input: Optional[torch.Tensor]  # input of the last Linear layer, (B, C'), for CAM
    head: Optional[nn.Module]  # that Linear layer
    with_graph: bool
    leaf: Optional[torch.Tensor] = None  # the layer's output as a graph leaf (requires grad) when with_graph
    inplace_relu: bool = False
    layout: Optional[FeatureLayout] = None  # where the map lies in the layer's output (channels first/last, tokens)
    layout_shape: tuple[int, ...] = ()  # the shape of the layer's output tensor
    _gradients: Optional[torch.Tensor] = None

    def gradients(self, targets: torch.Tensor) -> torch.Tensor:
        """d logit[b, targets[b, t]] / d activation for every slot t: (T, B, C, *s), from one partial backward."""
        if self._gradients is None:
            if not self.with_graph or self.leaf is None:
                raise RuntimeError("this layer pass was built without a graph")
            n_slots = targets.shape[1]
            picked = self.logits.gather(1, targets)  # (B, T)
            # One batched backward over the layers above the target layer only: the activation is a leaf, and
            # no parameter requires grad during the call, so nothing below it or on the weights is traced.
            # Measured on densenet121 (224 px, 14 targets): about 2x faster than a loop of backwards, same values.
            if n_slots == 1:
                # A scalar's backward: torch imports sympy (about a second) on the first backward given
                # `grad_outputs`, which the first result of a one-target run does not need to wait for.
                self._gradients = torch.autograd.grad(picked[:, 0].sum(), self.leaf, retain_graph=True)[0][None].detach()
                return self._gradients
            eye = torch.eye(n_slots, dtype=picked.dtype, device=picked.device)
            grad_outputs = eye[:, None, :].expand(n_slots, picked.shape[0], n_slots)
            try:
                (grads,) = torch.autograd.grad(
                    picked, self.leaf, grad_outputs=grad_outputs, is_grads_batched=True, retain_graph=True
                )
            except RuntimeError:
                # Some ops have no batching rule: the same gradients, one slot at a time.
                grads = torch.stack(
                    [
                        torch.autograd.grad(picked[:, t].sum(), self.leaf, retain_graph=True)[0]
                        for t in range(n_slots)
                    ]
                )
            self._gradients = grads.detach()
        return self._gradients


class ExplainContext:
    """Everything one call's methods share: the model, the input, the targets, the layer and cached passes."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        hooks: HookSet,
        *,
        layer: LayerSpec = None,
        targets: Any = None,
        labels: Optional[Sequence[str]] = None,
        multi_label: bool = False,
        seed: Optional[int] = None,
        need_layer_graph: bool = False,
    ) -> None:
        self.model = model
        self.x = x
        self.hooks = hooks
        self.labels = list(labels) if labels else None
        self.multi_label = multi_label
        self.seed = seed
        self._layer_spec = layer
        self._layer: Optional[TargetLayer] = None
        self._targets_spec = targets
        self._targets: Optional[torch.Tensor] = None
        self.target_note = ""
        self._need_layer_graph = need_layer_graph
        self._layer_pass: Optional[LayerPass] = None
        self._logits: Optional[torch.Tensor] = None
        self.cache: dict[Any, Any] = {}
        self.notes: list[str] = []
        self.method_notes: dict[str, Any] = {}  # provenance notes of the method running now (reset per method)

    # ----- shape helpers
    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    @property
    def is_3d(self) -> bool:
        return self.x.dim() == 5

    # ----- layer
    @property
    def layer(self) -> TargetLayer:
        if self._layer is None:
            self._layer = resolve_target_layer(self.model, self.x, self._layer_spec)
        return self._layer

    # ----- logits and targets
    @property
    def logits(self) -> torch.Tensor:
        if self._logits is None:
            if self._need_layer_graph:
                self._logits = self.layer_pass().logits.detach()
            else:
                with torch.inference_mode():
                    self._logits = call_model(self.model, self.x).clone()
        return self._logits

    @property
    def targets(self) -> torch.Tensor:
        if self._targets is None:
            self._targets, self.target_note = resolve_targets(
                self._targets_spec, self.logits, self.labels, self.multi_label
            )
        return self._targets

    # ----- shared passes
    def layer_pass(self) -> LayerPass:
        """The cached forward pass with the target layer captured (with a graph above it if any method needs one)."""
        if self._layer_pass is None:
            layer = self.layer
            self._layer_pass = run_layer_pass(self.model, self.x, layer.module, self.hooks, self._need_layer_graph,
                                              layer_name=layer.name)
            if self._layer_pass.inplace_relu:
                self.notes.append(
                    f"an in-place ReLU follows the target layer {self.layer.name} (as DenseNet's functional ReLU); "
                    f"the CAMs use its output, the feature map the model's head sees"
                )
            if self._logits is None:
                self._logits = self._layer_pass.logits.detach()
        return self._layer_pass

    def fast_forward(self) -> FastForward:
        """The module for forward-only passes on inputs like x (a BatchNorm-folded copy when it applies), built once
        per call; what it is goes into the asking method's provenance notes."""
        if "fast_forward" not in self.cache:
            self.cache["fast_forward"] = fast_forward(self.model, self.x, self.logits)
        forward = self.cache["fast_forward"]
        self.method_notes.update(forward.note)
        return forward

    def derive(self, x: torch.Tensor) -> "ExplainContext":
        """A context for a transformed input (augmentation): same model, layer and targets, fresh passes."""
        child = ExplainContext(
            self.model, x, self.hooks, layer=self.layer.module, targets=None, labels=self.labels,
            multi_label=self.multi_label, seed=self.seed, need_layer_graph=self._need_layer_graph,
        )
        child._layer = self.layer
        if "fast_forward" in self.cache:  # same model: the same folded copy
            child.cache["fast_forward"] = self.cache["fast_forward"]
        child._targets = self.targets
        child.target_note = self.target_note
        return child

    def generator(self, salt: str = "") -> torch.Generator:
        """A private random generator seeded from the call's seed (and a per-method salt); global RNG untouched."""
        seed = 0 if self.seed is None else int(self.seed)
        if salt:
            seed = (seed * 1_000_003 + int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16)) % (2**63)
        gen = torch.Generator(device=self.x.device)
        gen.manual_seed(seed)
        return gen


class _UnrecordedBelow:
    """Inference mode from the start of a forward pass until the target layer's hook ends it (`end()`), so the
    layers below the target layer run as in a plain inference-mode forward."""

    def __init__(self) -> None:
        self._mode: Optional[torch.inference_mode] = None
        self._thread = threading.get_ident()

    def start(self) -> None:
        self._thread = threading.get_ident()
        self._mode = torch.inference_mode()
        self._mode.__enter__()

    def end(self) -> None:
        # Grad modes are per thread: a hook that fires in a thread the model started (nn.DataParallel) leaves the
        # region open, the logits come out as inference tensors, and the pass runs again recorded.
        if self._mode is not None and threading.get_ident() == self._thread:
            mode, self._mode = self._mode, None
            mode.__exit__(None, None, None)


class _RecordBelow(Exception):
    """The pass with the layers below the target layer in inference mode cannot stand for the model's pass."""


def run_layer_pass(
    model: nn.Module, x: torch.Tensor, layer: nn.Module, hooks: Optional[HookSet], with_graph: bool,
    layer_name: Optional[str] = None,
) -> LayerPass:
    """The forward pass with `layer`'s output captured; with `with_graph`, its output is a leaf of the graph above it.

    Nothing below the layer needs a graph (the input and the parameters do not require grad, and the layer's output
    becomes a fresh leaf), so the layers below it first run in inference mode, like a plain forward, and the
    layer's hook switches back to the call's mode for the layers above it. Tensors made below the layer are then
    inference tensors; where the model uses one in a way autograd refuses above the layer (saved for the backward
    of a product with the layer's output, changed in place) or its own grad-mode blocks span the layer, the pass
    runs again in the call's mode throughout: the same values, at the cost of one more forward. The layer's dotted
    name (`layer_name`, found when not given) and the borrow's walk of the modules (`hooks`) are reused.
    """
    if layer_name is None:
        layer_name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__) or "<model>"
    modules = hooks.modules_of(model) if hooks is not None else module_tree(model)[0]
    try:
        return _layer_pass(model, x, layer, with_graph, unrecorded_below=True, layer_name=layer_name, modules=modules)
    except _RecordBelow:
        return _layer_pass(model, x, layer, with_graph, unrecorded_below=False, layer_name=layer_name, modules=modules)


def _layer_pass(model: nn.Module, x: torch.Tensor, layer: nn.Module, with_graph: bool, unrecorded_below: bool,
                layer_name: Optional[str] = None, modules: Optional[list[nn.Module]] = None) -> LayerPass:
    if layer_name is None:
        layer_name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__) or "<model>"
    captured: dict[str, Any] = {}
    linear_inputs: list[tuple[nn.Module, torch.Tensor]] = []
    below = _UnrecordedBelow()

    def capture(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        below.end()  # the layers above run in the call's mode (the first call of the layer ends the region)
        layout = layout_of(model, x, output, layer_name, layer)
        raw = first_tensor(output)
        if raw.is_inference():  # made below the layer in inference mode: a normal copy (prefix tokens included)
            raw = raw.clone()
            output = with_first(output, raw)
        # The model goes on with a copy, so an in-place op that follows (ReLU(inplace=True)) cannot change
        # the captured output behind our back; we look at that copy afterwards to see what the op did.
        # Copies made here are normal tensors (with a version counter) even when the output is an inference tensor.
        # A channels-last map or a token sequence is captured as (B, C, *grid) and handed on in the layer's own layout.
        feature_map = layout.to_map(raw.detach())
        own = feature_map if layout.kind == "channels_first" else feature_map.clone()
        if with_graph:
            leaf = own.detach().requires_grad_(True)
            captured["leaf"] = leaf
            passed = leaf.clone()
        else:
            passed = own.clone()
        captured.update(own=own, passed=passed, version=passed._version, layout=layout, shape=tuple(raw.shape))
        return layout.rebuild(output, passed)

    def capture_linear(module: nn.Module, inputs: Any) -> None:
        if inputs and isinstance(inputs[0], torch.Tensor):
            linear_inputs.append((module, inputs[0]))

    local = HookSet()
    try:
        local.forward(layer, capture)
        for m in modules if modules is not None else module_tree(model)[0]:
            if is_linear(m):
                local.forward_pre(m, capture_linear)
        # no_grad rather than inference mode above the layer without a graph: the copy handed on must keep a
        # version counter, to see whether an in-place op changed it.
        with torch.enable_grad() if with_graph else torch.no_grad():
            try:
                if unrecorded_below:
                    below.start()
                logits = call_model(model, x)
            except RuntimeError as error:
                if unrecorded_below and "nference tensor" in str(error):
                    raise _RecordBelow() from error
                raise
            finally:
                below.end()
                mode_kept = torch.is_grad_enabled() == with_graph and not torch.is_inference_mode_enabled()
    finally:
        local.remove()
    if unrecorded_below and "own" in captured:
        # The model's own grad-mode blocks can outlast the hook's switch: then the layers above did not run in the
        # call's mode, and the pass is run again in that mode throughout.
        if logits.is_inference() or (with_graph and not logits.requires_grad) or not mode_kept:
            raise _RecordBelow()
    if "own" not in captured:
        raise ModelError("the target layer was not used in the model's forward pass; choose a layer the model runs.")
    return _finished_pass(captured, linear_inputs, logits, with_graph)


def _finished_pass(captured: dict[str, Any], linear_inputs: list[tuple[nn.Module, torch.Tensor]], logits: torch.Tensor,
                   with_graph: bool) -> LayerPass:
    """The layer pass from what its hooks captured: the activation (with a ReLU applied in place right after the
    layer taken into it), the classifier head and its input."""
    activation, inplace_relu = captured["own"], False
    passed = captured["passed"].detach()
    if passed._version != captured["version"] and captured["layout"].kind == "channels_first":
        with torch.no_grad():
            relu = torch.relu(activation)
            if torch.equal(passed, relu):
                # A ReLU applied in place right after the layer (DenseNet's functional ReLU) is part of the
                # feature map the model uses; any other in-place change (a residual `+=`) is not.
                activation, inplace_relu = relu, True
    head, head_input = (linear_inputs[-1] if linear_inputs else (None, None))
    if head_input is not None and head_input.is_inference():
        head_input = head_input.clone()  # (a head below the target layer: an inference tensor, made a normal one)
    return LayerPass(
        activation=activation,
        logits=logits,
        head_input=None if head_input is None else head_input.detach(),
        head=head,
        with_graph=with_graph,
        leaf=captured.get("leaf"),
        inplace_relu=inplace_relu,
        layout=captured["layout"],
        layout_shape=captured["shape"],
    )
