"""The LRP engine: an :class:`Explainer` per model, one forward and one batched backward per call.

Construction (once per served model, method.md §3):

1. :func:`~models.xai.canonizers.canonize` makes a canonized deep copy (the original model is
   never modified);
2. :func:`~medaudit.models.xai.composite.build_lrp_model` swaps every layer of that copy for its
   rule module from :mod:`medaudit.models.xai.rules` — zennit 0.5.1's ``EpsilonPlusFlat``
   (method.md §3.1) — and, in transformers, :mod:`medaudit.models.xai.attention_rules` (AttnLRP
   or CP-LRP through attention).

A call (:meth:`Explainer.explain`) runs the rule model forward once, recording the outputs of the
requested hook points, and then runs **one** backward for all relevance seeds of all images:

* class seeds start at the logits: the logit of the target class (zennit-crp's default) or
  ``init_rel`` (one-hot) — method.md §3.1 "CRP conventions";
* concept seeds start at the output ``A`` of hook point ℓ with ``R = ReLU(A) ⊙ v`` (the CAV
  broadcast over space) — method.md §2.1, as CRP's ``start_layer``/``init_rel``.

The seeds differ only in the gradient fed to the graph, so they run as a batched vector-Jacobian
product (``is_grads_batched``, i.e. vmap over the backward) and cost one forward plus S
backwards. ``batch_mode="repeat"`` instead repeats the input S times (S forwards).

On CUDA, :meth:`Explainer.capture` returns a :class:`CapturedExplain` that replays a call as a
CUDA graph (batch-1 latency is otherwise dominated by kernel launches).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch
from torch import nn

from medaudit.models.errors import ConfigError, UnknownModelError
from medaudit.models.features import max_pool_spatial
from medaudit.models.registry import ModelCfg
from medaudit.models.xai import rules
from medaudit.models.xai.canonizers import canonize
from medaudit.models.xai.composite import (
    DEFAULT_ATTENTION,
    build_lrp_model,
    check_attention,
    check_composite,
    family_composite,
)

# --------------------------------------------------------------------------- seeds and results


@dataclass(frozen=True)
class ClassTarget:
    """Relevance seeded at the logits.

    Attributes:
        index: class index for every image, one index per image, or ``None`` for each image's
            predicted class.
    """

    index: int | tuple[int, ...] | None = None


@dataclass(frozen=True, eq=False)
class ConceptTarget:
    """Relevance seeded at hook point ``layer``: ``R = ReLU(A) ⊙ v`` (method.md §2.1).

    Attributes:
        layer: a hook-point name from ``ModelCfg.hook_points``.
        vector: the concept direction ``v``, shape ``(C,)`` for the layer's C channels, or
            ``(B, C)``: one direction per image of the batch (e.g. each image's present concept,
            so that a batch of (image, concept) pairs costs one backward, not one per concept).
            Or a function of the layer's ``(B, C)`` max-pooled activation that returns either
            shape: a seed chosen from the forward pass itself, between the forward and the backward
            (e.g. the concept each image turned out to show), so it costs no second forward.
            A seed that comes out zero for every image is not propagated at all (its heatmaps
            are zeros).
    """

    layer: str
    vector: torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


Target = int | Literal["pred"] | ClassTarget | ConceptTarget


@dataclass(frozen=True, eq=False)
class Explanation:
    """What one :meth:`Explainer.explain` call returns. S = number of targets, B = batch size.

    Attributes:
        logits: ``(B, K)`` model outputs.
        heatmaps: ``(S, B, H, W)`` input relevance summed over channels (CRP ``heatmap_modifier``).
        targets: the targets, normalised (``ClassTarget`` / ``ConceptTarget``), in seed order.
        class_indices: ``(S, B)`` class index each class seed used; ``-1`` for concept seeds.
        activations: hook point -> ``(B, C)`` spatially max-pooled activation (method.md §11.4).
        relevance: hook point -> ``(S, B, *layer output shape)`` relevance at the layer output.
        input_relevance: ``(S, B, C, H, W)`` relevance at the input, if asked for.
    """

    logits: torch.Tensor
    heatmaps: torch.Tensor
    targets: tuple[ClassTarget | ConceptTarget, ...]
    class_indices: torch.Tensor
    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    relevance: dict[str, torch.Tensor] = field(default_factory=dict)
    input_relevance: torch.Tensor | None = None


# --------------------------------------------------------------------------- recording

#: The store of the recording active in this thread/task; ``None`` outside :func:`recording`.
_RECORDING: ContextVar[dict[str, torch.Tensor] | None] = ContextVar("medaudit_lrp_recording", default=None)
#: Hook points after whose outputs the forward may stop (see ``Explainer.explain(logits=False)``).
_STOP_AFTER: ContextVar[frozenset[str] | None] = ContextVar("medaudit_lrp_stop_after", default=None)
#: Hook points where the backward may stop (see ``Explainer.explain(heatmaps=False)``).
_LEAVES: ContextVar[frozenset[str] | None] = ContextVar("medaudit_lrp_leaves", default=None)


class _ForwardDone(Exception):
    """Raised by a :class:`Tap` once every hook point the call needs has been recorded."""


class Tap(nn.Module):
    """Wraps the module of a hook point and records its output while a :func:`recording` is active.

    Taps replace forward hooks: they are part of the private rule model, so nothing is
    registered per call, and the store is a context variable, so concurrent calls in different
    threads do not see each other's activations.
    """

    def __init__(self, inner: nn.Module, name: str) -> None:
        super().__init__()
        self.inner = inner
        self.name = name

    def forward(self, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        store = _RECORDING.get()
        if store is not None:
            leaves = _LEAVES.get()
            if leaves is not None and self.name in leaves and not out.requires_grad:
                # Nothing below needs gradient: the graph starts here, the backward ends here.
                out = out.detach().requires_grad_(True)
            store[self.name] = out
            stop = _STOP_AFTER.get()
            if stop is not None and stop <= store.keys():
                raise _ForwardDone  # the rest of the network cannot change this call's results
        return out


@contextlib.contextmanager
def recording() -> Iterator[dict[str, torch.Tensor]]:
    """Collect the outputs of every :class:`Tap` run inside the block; reset also on error."""
    store: dict[str, torch.Tensor] = {}
    token = _RECORDING.set(store)
    try:
        yield store
    finally:
        _RECORDING.reset(token)


def add_taps(model: nn.Module, hook_points: dict[str, str]) -> None:
    """Wrap the module of every hook point (``name -> dotted path``) of ``model`` in a :class:`Tap`.

    A hook point whose module is an ``nn.Sequential`` ending in a module that declares
    ``tap_before = True`` (a ClArC projection, which P-ClArC appends at ℓ) is tapped at that
    module's **input**: the layer's own output, where the version's concept bank was fitted
    (method.md §11.7). Tapped after it, every score along the projected CAV read the constant
    ⟨μ0, v⟩ and the concept heatmaps started from the shifted activation.
    """
    for name, path in sorted(hook_points.items(), key=lambda kv: -kv[1].count(".")):  # deepest first
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        inner = getattr(parent, attr)
        if isinstance(inner, nn.Sequential) and len(inner) and getattr(inner[-1], "tap_before", False):
            *body, last = list(inner)
            setattr(parent, attr, nn.Sequential(Tap(nn.Sequential(*body), name), last))
        else:
            setattr(parent, attr, Tap(inner, name))


# --------------------------------------------------------------------------- explainer


class Explainer:
    """Fast LRP (zennit 0.5.1 ``EpsilonPlusFlat`` + canonizers) for one model. Build once, call often.

    Args:
        model: the served network; it is deep-copied and never modified.
        cfg: its registry config (hook points, canonizer id).
        batch_mode: how several seeds share a call: ``"vmap"`` (one forward, a batched backward)
            or ``"repeat"`` (input repeated per seed).
        attention: the rule of transformer attention, ``"cp-lrp"`` or ``"attnlrp"``
            (:data:`~medaudit.models.xai.composite.DEFAULT_ATTENTION` says which is the default
            and why); no effect on models without attention.
        composite: the rules of the convs, a name of
            :data:`~medaudit.models.xai.composite.COMPOSITES`; ``None``: the family's default
            (:func:`~medaudit.models.xai.composite.family_composite`).
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: ModelCfg,
        *,
        batch_mode: Literal["vmap", "repeat"] = "vmap",
        attention: str = DEFAULT_ATTENTION,
        composite: str | None = None,
    ):
        if batch_mode not in ("vmap", "repeat"):
            raise ConfigError(f"batch_mode={batch_mode!r}; valid: 'vmap', 'repeat'")
        check_attention(attention)
        self.composite = family_composite(cfg.canonizer) if composite is None else composite
        check_composite(self.composite)
        self.cfg = cfg
        self.batch_mode = batch_mode
        self.attention = attention
        self.model = build_lrp_model(canonize(model, cfg.canonizer), attention, self.composite)
        add_taps(self.model, cfg.hook_points)
        #: hook point -> whether it is a cut between input and logits (see ``_split_layer``)
        self._cuts: dict[str, bool] = {}

    def to(self, *args: object, **kwargs: object) -> Explainer:
        """Move/cast the rule model, like ``nn.Module.to``; returns ``self``."""
        self.model.to(*args, **kwargs)  # type: ignore[call-overload]
        return self

    def capture(
        self, example: torch.Tensor, targets: Sequence[Target] = ("pred",), **kwargs: Any
    ) -> CapturedExplain:
        """A CUDA-graph replay of :meth:`explain` for inputs shaped like ``example``.

        See :class:`CapturedExplain`.
        """
        return CapturedExplain(self, example, targets, **kwargs)

    def _path(self, layer: str) -> str:
        if layer not in self.cfg.hook_points:
            raise UnknownModelError(
                f"{self.cfg.arch} has no hook point {layer!r}; valid: {', '.join(self.cfg.hook_points)}"
            )
        return self.cfg.hook_points[layer]

    def explain(
        self,
        x: torch.Tensor,
        targets: Sequence[Target] = ("pred",),
        *,
        cav_layers: Sequence[str] = (),
        relevance_layers: Sequence[str] = (),
        init_rel: Literal["logit"] | float = "logit",
        return_input_relevance: bool = False,
        logits: bool = True,
        heatmaps: bool = True,
    ) -> Explanation:
        """Logits, one heatmap per target and image, and activations/relevance at hook points.

        Args:
            x: ``(B, C, H, W)`` normalised images.
            targets: relevance seeds, each applied to every image: a class index, ``"pred"``
                (each image's predicted class), a :class:`ClassTarget` or a :class:`ConceptTarget`.
            cav_layers: hook points whose max-pooled activations to return (for concept scores).
            relevance_layers: hook points whose relevance to return (per target).
            init_rel: class-seed value: ``"logit"`` (the target logit, zennit-crp's default) or a
                number for a one-hot seed (``1`` as CRP's ``init_rel=1``).
            return_input_relevance: also return the ``(S, B, C, H, W)`` input relevance.
            logits: ``False`` lets a call whose seeds are all :class:`ConceptTarget` stop the
                forward at the last hook point it needs (seed, CAV and relevance layers): the
                layers above cannot change its heatmaps. ``Explanation.logits`` is then empty,
                ``(B, 0)``. Ignored when a seed is a class.
            heatmaps: ``False`` stops the backward at the relevance layers (class seeds only; at
                least one relevance layer): no relevance below them is computed, and the forward
                up to them builds no autograd graph (a relevance layer whose output needs no
                gradient becomes a leaf of the graph, so only the layers above it are recorded).
                The relevance at those layers is the same as with ``True``: it depends only on the
                layers above. A screen needs no more (the class relevance at the CAV layer of
                method.md §1.4's relevance share). ``Explanation.heatmaps`` is then empty,
                ``(S, B, 0, 0)``.

        Raises:
            ConfigError: bad input shape, target, class index or ``init_rel``.
            UnknownModelError: a layer name that is not a hook point of this model.
        """
        seeds = self._normalise_targets(targets)
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise ConfigError(
                f"x must be a float tensor (B, C, H, W); got {getattr(x, 'shape', type(x).__name__)}"
            )
        if not (
            init_rel == "logit" or (isinstance(init_rel, int | float) and not isinstance(init_rel, bool))
        ):
            raise ConfigError(f"init_rel={init_rel!r}; valid: 'logit' or a number (1 = one-hot)")
        seed_layers = [t.layer for t in seeds if isinstance(t, ConceptTarget)]
        for name in [*cav_layers, *relevance_layers]:
            self._path(name)
        if not heatmaps and (seed_layers or return_input_relevance or not relevance_layers):
            raise ConfigError(
                "heatmaps=False stops the backward at relevance_layers: it needs at least one, "
                "class seeds only and no input relevance (concept seeds and input relevance need "
                "the backward to the input)"
            )
        n_seeds, batch = len(seeds), x.shape[0]
        stop_after = (
            None
            if logits or any(isinstance(t, ClassTarget) for t in seeds)
            else frozenset([*seed_layers, *cav_layers, *relevance_layers])
        )
        repeat = self.batch_mode == "repeat" and n_seeds > 1
        ref = next(t for t in (*self.model.parameters(), *self.model.buffers()) if t.is_floating_point())
        x_in = x.detach().to(ref.device, ref.dtype)
        x_in = (x_in.repeat(n_seeds, 1, 1, 1) if repeat else x_in).requires_grad_(heatmaps)
        leaves = None if heatmaps else frozenset(relevance_layers)

        if not _DEFER_SIGN_CHECK.get():
            for _attempt in range(2):  # a second run only if a z⁺ layer's sign assumption failed
                with rules.sign_audit() as signs_held:
                    out, out0, class_idx, got = self._propagate(
                        x_in,
                        seeds,
                        batch,
                        repeat,
                        init_rel,
                        seed_layers,
                        relevance_layers,
                        stop_after,
                        leaves,
                    )
                if signs_held():
                    break
        else:  # inside CapturedExplain: the caller's audit verifies after the graph replays
            out, out0, class_idx, got = self._propagate(
                x_in, seeds, batch, repeat, init_rel, seed_layers, relevance_layers, stop_after, leaves
            )
        x_out = x_in
        if not heatmaps:  # the backward did not reach the input: an empty heatmap in its place
            x_out = x_in.new_empty(batch, 1, 0, 0)
            got = (x_out.new_empty(n_seeds, batch, 1, 0, 0), *got)
        inputs = [x_out, *(out0[ln] for ln in relevance_layers)]
        rel = [
            (i.new_zeros(n_seeds, *i.shape) if g is None else g)
            .reshape(n_seeds, batch, *i.shape[1:])
            .detach()
            for g, i in zip(got, [i[:batch] for i in inputs], strict=True)
        ]
        return Explanation(
            logits=out[:batch].detach(),
            heatmaps=rel[0].sum(2),
            targets=seeds,
            class_indices=class_idx,
            activations={ln: max_pool_spatial(out0[ln].detach()) for ln in cav_layers},
            relevance=dict(zip(relevance_layers, rel[1:], strict=True)),
            input_relevance=rel[0] if return_input_relevance else None,
        )

    def _propagate(
        self,
        x_in: torch.Tensor,
        seeds: tuple[ClassTarget | ConceptTarget, ...],
        batch: int,
        repeat: bool,
        init_rel: str | float,
        seed_layers: Sequence[str],
        relevance_layers: Sequence[str],
        stop_after: frozenset[str] | None = None,
        leaves: frozenset[str] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """One forward of the rule model and one (batched) backward for all seeds.

        With ``stop_after`` (concept seeds only) the forward ends once those hook points are
        recorded, and the returned logits are an empty ``(B, 0)`` tensor. With ``leaves``
        (``heatmaps=False``) the backward ends at those hook points, not at ``x_in``.
        """
        with torch.enable_grad(), recording() as acts:
            token, leaf_token = _STOP_AFTER.set(stop_after), _LEAVES.set(leaves)
            try:
                logits = self.model(x_in)
            except _ForwardDone:
                logits = x_in.new_zeros(x_in.shape[0], 0)
            finally:
                _STOP_AFTER.reset(token)
                _LEAVES.reset(leaf_token)
            out0 = {k: v[:batch] for k, v in acts.items()}
            class_idx, grad_logits = self._class_seeds(seeds, logits[:batch].detach(), init_rel)
            grad_layers = {ln: self._concept_seeds(seeds, ln, out0[ln]) for ln in dict.fromkeys(seed_layers)}
            outputs = [logits, *(acts[ln] for ln in grad_layers)]
            grads = [grad_logits, *grad_layers.values()]
            if not any(isinstance(t, ClassTarget) for t in seeds):
                # Only concept seeds: the logits' seed is all zeros, and propagating zeros back
                # through every layer above the concept layer would change nothing but the time.
                outputs, grads = outputs[1:], grads[1:]
            inputs = [*([x_in] if leaves is None else []), *(acts[ln] for ln in relevance_layers)]
            if repeat:  # (S, B, ...) -> (S·B, ...)
                got = torch.autograd.grad(
                    outputs, inputs, [g.flatten(0, 1) for g in grads], allow_unused=True
                )
                return logits, out0, class_idx, got
            split = self._split_layer(seeds, seed_layers, relevance_layers, acts, x_in, logits)
            if split is not None:
                return logits, out0, class_idx, self._two_stage(split, seeds, outputs, grads, inputs, acts)
            return logits, out0, class_idx, _seeds_backward(outputs, inputs, grads, seeds)

    # -- two-stage backward: class seeds above the concept layer, all seeds below it

    def _split_layer(
        self,
        seeds: Sequence[ClassTarget | ConceptTarget],
        seed_layers: Sequence[str],
        relevance_layers: Sequence[str],
        acts: dict[str, torch.Tensor],
        x_in: torch.Tensor,
        logits: torch.Tensor,
    ) -> str | None:
        """The concept layer ℓ if this call may run as two backwards (see :meth:`_two_stage`).

        That needs class seeds and concept seeds, every concept seed at one layer ℓ, no relevance
        asked for above ℓ, and ℓ a cut of the network: every path from the input to the logits
        runs through ℓ's output (true of every ResNet stage and VGG feature, not of a layer a
        skip connection bypasses). The cut is read off the autograd graph once per layer.
        """
        layers = set(seed_layers)
        if len(layers) != 1 or not any(isinstance(t, ClassTarget) for t in seeds):
            return None
        (layer,) = layers
        order = list(acts)  # recording order is forward order
        if any(order.index(r) > order.index(layer) for r in relevance_layers):
            return None
        cut = self._cuts.get(layer)
        if cut is None:
            cut = self._cuts[layer] = _separates(logits, acts[layer], x_in)
        return layer if cut else None

    def _two_stage(
        self,
        layer: str,
        seeds: Sequence[ClassTarget | ConceptTarget],
        outputs: list[torch.Tensor],
        grads: list[torch.Tensor],
        inputs: list[torch.Tensor],
        acts: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor | None, ...]:
        """The backward of a call that mixes class seeds with concept seeds at one cut layer ℓ.

        One batched backward of all S seeds from the logits (what :meth:`_propagate` does
        otherwise) carries the concept seeds' zero rows through every layer above ℓ. Here the
        class seeds alone go from the logits to ℓ, and there every seed (the class relevance
        that arrived, the concept seeds' ``ReLU(A) ⊙ v``) goes on to the input in one batched
        backward. Same relevance, same rules; the layers above ℓ run once per class seed
        instead of once per seed (/audit: one class seed and one concept seed).
        """
        act = acts[layer]
        # Rows are picked by Python ints, never a list: indexing with a list copies an index tensor
        # from the host, which CUDA-graph capture (Explainer.capture) refuses for unpinned memory.
        class_rows = [s for s, t in enumerate(seeds) if isinstance(t, ClassTarget)]
        many = len(class_rows) > 1
        g_logits = torch.stack([grads[0][s] for s in class_rows]) if many else grads[0][class_rows[0]]
        (upper,) = torch.autograd.grad(
            [outputs[0]], [act], [g_logits], is_grads_batched=many, allow_unused=True
        )
        at_layer = grads[1].clone()  # (S, B, ...): the concept seeds, zero rows for class seeds
        if upper is not None:
            for i, s in enumerate(class_rows):
                at_layer[s] += upper[i] if many else upper
        below = [i for i in inputs if i is not act]
        it = iter(_seeds_backward([act], below, [at_layer], seeds) if below else ())
        return tuple(at_layer if i is act else next(it) for i in inputs)

    # -- seeds

    def _normalise_targets(self, targets: Sequence[Target]) -> tuple[ClassTarget | ConceptTarget, ...]:
        if isinstance(targets, str | int | ClassTarget | ConceptTarget):
            targets = [targets]  # type: ignore[list-item]  # a bare target; validated below
        if len(targets) == 0:
            raise ConfigError("targets is empty; give at least one class index, 'pred' or ConceptTarget")
        out: list[ClassTarget | ConceptTarget] = []
        for t in targets:
            if isinstance(t, ClassTarget | ConceptTarget):
                out.append(t)
            elif t == "pred":
                out.append(ClassTarget(None))
            elif isinstance(t, int) and not isinstance(t, bool):
                out.append(ClassTarget(t))
            else:
                raise ConfigError(
                    f"target {t!r} is not valid; use a class index, 'pred', ClassTarget or ConceptTarget"
                )
        for t in out:
            if isinstance(t, ConceptTarget):
                self._path(t.layer)
        return tuple(out)

    def _class_seeds(
        self, seeds: Sequence[ClassTarget | ConceptTarget], logits: torch.Tensor, init_rel: str | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, n_classes = logits.shape
        idx = torch.full((len(seeds), batch), -1, dtype=torch.long, device=logits.device)
        grad = torch.zeros(len(seeds), *logits.shape, dtype=logits.dtype, device=logits.device)
        for s, t in enumerate(seeds):
            if not isinstance(t, ClassTarget):
                continue
            if t.index is None:
                idx[s] = logits.argmax(1)
            else:
                wanted = torch.as_tensor(t.index, dtype=torch.long).reshape(-1)
                if wanted.numel() not in (1, batch):
                    raise ConfigError(f"ClassTarget has {wanted.numel()} indices for a batch of {batch}")
                bad = wanted[(wanted < 0) | (wanted >= n_classes)]
                if bad.numel():
                    labels = ", ".join(f"{k}={name}" for k, name in enumerate(self.cfg.labels))
                    raise ConfigError(f"class index {int(bad[0])} out of range; valid: {labels}")
                if wanted.numel() == 1:  # a fill, not a host-to-device copy: CUDA-graph capturable
                    idx[s].fill_(int(wanted))
                else:
                    idx[s] = wanted.to(logits.device)
            rows = idx[s, :, None]
            if init_rel == "logit":
                grad[s].scatter_(1, rows, logits.gather(1, rows))
            else:
                grad[s].scatter_(1, rows, float(init_rel))
        return idx, grad

    @staticmethod
    def _concept_seeds(
        seeds: Sequence[ClassTarget | ConceptTarget], layer: str, activation: torch.Tensor
    ) -> torch.Tensor:
        grad = torch.zeros(len(seeds), *activation.shape, dtype=activation.dtype, device=activation.device)
        for s, t in enumerate(seeds):
            if isinstance(t, ConceptTarget) and t.layer == layer:
                vec = t.vector(max_pool_spatial(activation.detach())) if callable(t.vector) else t.vector
                v = torch.as_tensor(vec).to(activation.device, activation.dtype)
                batch, channels = activation.shape[:2]
                if v.ndim == 2 and v.shape[0] == batch:  # one direction per image
                    per_image = v.shape[1]
                else:
                    per_image, v = v.numel(), v.reshape(1, -1)
                if per_image != channels:
                    raise ConfigError(
                        f"concept vector for {layer!r} has {per_image} entries; the layer has "
                        f"{channels} channels (give (C,), or (batch, C) for one per image)"
                    )
                v = v.reshape(v.shape[0], channels, *([1] * (activation.ndim - 2)))
                grad[s] = activation.detach().clamp(min=0) * v  # method.md §2.1: ReLU(A) ⊙ v
        return grad


def _seeds_backward(
    outputs: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    seeds: Sequence[ClassTarget | ConceptTarget],
) -> tuple[torch.Tensor | None, ...]:
    """One batched backward of ``(S, ...)`` seed gradients at ``outputs``: ``(S, B, ...)`` per input.

    A seed chosen from the forward may be zero for every image (e.g. no concept is present): it
    is left out of the backward and its rows come back as zeros. One host sync, only when such
    seeds exist. ``None`` for an input no live seed reaches.
    """
    n_seeds = len(seeds)
    live = list(range(n_seeds))
    if any(isinstance(t, ConceptTarget) and callable(t.vector) for t in seeds):
        live = [s for s in live if any(bool(g[s].any()) for g in grads)]
    if not live:
        return tuple(None for _ in inputs)
    # Rows by Python ints (see _two_stage: a list index is a host copy, refused in graph capture);
    # with every seed live the gradients go in as they are.
    if len(live) == n_seeds:
        sub = list(grads) if n_seeds > 1 else [g[0] for g in grads]
    else:
        sub = [torch.stack([g[s] for s in live]) if len(live) > 1 else g[live[0]] for g in grads]
    got = torch.autograd.grad(outputs, inputs, sub, is_grads_batched=len(live) > 1, allow_unused=True)
    if len(live) < n_seeds:  # back to one row per seed, zeros for the skipped ones
        got = tuple(None if g is None else _expand_seeds(g, live, n_seeds) for g in got)
    return got


def _separates(logits: torch.Tensor, act: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether every autograd path from ``logits`` back to the leaf ``x`` passes through ``act``.

    A walk of the graph from the logits that does not enter ``act``'s node: if it still reaches
    ``x``'s gradient accumulator, some relevance bypasses ``act``.
    """
    stop, seen = act.grad_fn, set()
    stack = [logits.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node is stop or node in seen:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is x:
            return False
        stack.extend(f for f, _ in node.next_functions)
    return True


def _expand_seeds(got: torch.Tensor, live: Sequence[int], n_seeds: int) -> torch.Tensor:
    """``(len(live), B, ...)`` (``(B, ...)`` if one seed is live) -> ``(n_seeds, B, ...)``, zeros else."""
    rows = got if len(live) > 1 else got[None]
    full = rows.new_zeros(n_seeds, *rows.shape[1:])
    for i, s in enumerate(live):
        full[s] = rows[i]
    return full


# --------------------------------------------------------------------------- CUDA graphs

#: True while :class:`CapturedExplain` records: ``explain`` leaves the sign check to the graph's caller.
_DEFER_SIGN_CHECK: ContextVar[bool] = ContextVar("medaudit_lrp_defer_sign_check", default=False)


class CapturedExplain:
    """:meth:`Explainer.explain` for one input shape and fixed arguments, replayed as a CUDA graph.

    For batch-1 latency, where launching ~500 kernels from Python costs more than running them.
    Exactness is kept: z⁺ layers assume the input signs seen while warming up, the graph records
    each layer's ``min(x)``, and a call whose assumptions fail (one host sync to check) is
    recomputed eagerly. Results are copies, safe to keep across calls. Not thread-safe: one
    graph has one set of static buffers.

    Args:
        explainer: a CUDA :class:`Explainer`.
        example: an input of the shape every call will have.
        targets, **kwargs: as for :meth:`Explainer.explain`, fixed for every call.
    """

    def __init__(self, explainer: Explainer, example: torch.Tensor, targets: Sequence[Target], **kwargs: Any):
        if any(isinstance(t, ConceptTarget) and callable(t.vector) for t in targets):
            raise ConfigError(
                "a ConceptTarget chosen from the forward (a callable vector) reads the activations "
                "on the host between forward and backward; it cannot be replayed as a CUDA graph"
            )
        if example.device.type != "cuda":
            raise ConfigError(f"CUDA graphs need a CUDA input; got device {example.device}")
        self.explainer, self.targets, self.kwargs = explainer, targets, kwargs
        self.static_x = example.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: allocator, cuDNN plans, z⁺ input signs
            for _ in range(3):
                explainer.explain(self.static_x, targets, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        token = _DEFER_SIGN_CHECK.set(True)
        try:
            with rules.sign_audit() as signs_held, torch.cuda.graph(self.graph):
                self.static_out = explainer.explain(self.static_x, targets, **kwargs)
        finally:
            _DEFER_SIGN_CHECK.reset(token)
        self.signs_held = signs_held

    def __call__(self, x: torch.Tensor) -> Explanation:
        if x.shape != self.static_x.shape:
            raise ConfigError(f"captured for input shape {tuple(self.static_x.shape)}, got {tuple(x.shape)}")
        self.static_x.copy_(x)
        self.graph.replay()
        if not self.signs_held():  # an input sign differed from the warm-up's: recompute exactly
            return self.explainer.explain(x, self.targets, **self.kwargs)
        return _cloned(self.static_out)


def _cloned(e: Explanation) -> Explanation:
    def copy(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.clone()
        return {k: t.clone() for k, t in v.items()} if isinstance(v, dict) else v

    return replace(e, **{f.name: copy(getattr(e, f.name)) for f in fields(e)})
