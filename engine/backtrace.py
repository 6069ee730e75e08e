"""``DLBacktrace``: the public entry point, with the API of the dl-backtrace package.

``run_task`` keeps that package's keyword API and turns the keywords into parameter objects
(``engine.params``), validated once: classification runs here (``_classify``: one forward and
one sweep seeded on the decided logits), generation in ``engine.generation``. Task names come
from ``engine.tasks``."""

from __future__ import annotations

import gc
import logging
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor, fx

from . import arguments, validate
from .capture import (
    FAILED_ASSERTION,
    Captured,
    CaptureError,
    Inputs,
    bind_inputs,
    capture,
    placed,
)
from .contrast import class_index, contrast_seed
from .heads import (
    SEEDS,
    Position,
    answers_a_class,
    classification,
    mask_positions,
    padding_mask,
    qa_logits,
)
from .params import OutputParams, RelevanceParams
from .references import named_reference
from .seq2seq import with_decoder_start
from .sweep import Explanation, NodeIO, Seed, Sweeper
from .tasks import TASK_NAMES, TASKS, TaskName

log = logging.getLogger("engine")
_T = TypeVar("_T")
# Graphs kept per model: the first, and those captured since for inputs it does not serve
# (another static length, a batch or branch its assertions refuse). Bounded, so that inputs
# that each need their own graph do not grow the cache for good.
MAX_GRAPHS = 8


class _Forwards(NamedTuple):
    prepared: dict[str, Tensor]
    captured: Captured
    sweeper: Sweeper
    env: dict
    outputs: Any
    env_ref: dict | None


class DLBacktrace:
    """Layer-wise relevance for a PyTorch model, captured once with ``torch.export``.

    >>> dlb = DLBacktrace(model, (input_ids, attention_mask))
    >>> res = dlb.run_task(task="text-classification", inputs={"input_ids": ..., ...})
    >>> res["relevance"]["input_ids"]  # [B, T]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_for_graph: Inputs,
        device: str | torch.device | None = None,
        verbose: bool = False,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.device = placed(model, device)
        self.verbose = verbose
        self._graphs: list[tuple[Captured, Sweeper]] = []
        self._head_sweepers: dict[tuple[int, fx.Node], Sweeper] = {}
        prepared = self._prepare(input_for_graph, name="input_for_graph")
        self._graph_for(with_decoder_start(self.model, prepared))
        self.node_io: dict[str, Any] | None = None
        self.relevance: dict[str, Tensor] | None = None
        self._generates: bool | None = None

    # ------------------------------------------------------------ capture and sweep

    def _prepare(self, inputs: Inputs, tokenizer: Any = None, name: str = "inputs") -> dict:
        """Named tensors on the device, checked before any work (``engine.validate``): numpy
        arrays, lists and text (with ``tokenizer``) converted; against the captured signature
        once there is one; constant ids the graph does not take dropped."""
        bound = bind_inputs(self.model, validate.as_tensors(inputs, tokenizer, name))
        prepared = {k: v.to(self.device) for k, v in bound.items() if v is not None}
        validate.check_values(prepared)
        if self._graphs:
            first = self.captured
            prepared = validate.drop_constant_ids(prepared, first.input_names)
            prepared = validate.check_signature(prepared, first.nodes, first.input_names)
            validate.check_shared_sizes(prepared, first.nodes, first.input_names)
            validate.check_ids(prepared, first.nodes, first.constants)
        for value in prepared.values():
            if value.dim() == 2 and not value.is_floating_point():
                validate.check_length(self.model, value.shape[1], f"the {name} sequence")
        return prepared

    def _graph_for(
        self, inputs: dict[str, Tensor], as_given: bool = False
    ) -> tuple[Captured, Sweeper]:
        """The captured graph that serves these inputs; capture again only when the shapes
        fall outside every graph so far (a model that forced a static dimension), or, with
        ``as_given``, for these inputs' own batch size (``_with_graph``). The newest graph that
        takes the inputs serves them: a graph captured after the first takes fewer shapes
        (static, specialised, as given), and was captured for them. A capture that fails for
        inputs the first graph cannot take says which shapes it was given."""
        for entry in reversed(self._graphs if not as_given else []):
            if entry[0].accepts(inputs):
                return entry
        try:
            specialised = bool(self._graphs) and self.captured.example is not None
            captured = capture(self.model, inputs, self.verbose, specialised, not as_given)
        except CaptureError as exc:
            if not self._graphs:
                raise
            shapes = {k: tuple(v.shape) for k, v in inputs.items()}
            raise ValueError(
                f"inputs of shapes {shapes} do not fit the graph captured for "
                f"{self.captured.input_names}, and the model cannot be captured for them: {exc}"
            ) from exc
        if not self._graphs:
            validate.check_input_dtypes(captured)
            validate.check_bag_ids(captured)
        entry = (captured, Sweeper(captured, captured.explained_output()))
        _warn_unreached(captured, entry[1])
        if captured.example is not None:
            self._drop_specialised()
        self._graphs.append(entry)
        if len(self._graphs) > MAX_GRAPHS:  # the oldest but the first (the signature) goes
            self._forget(self._graphs[1][0])
        return entry

    def _with_graph(self, inputs: dict[str, Tensor], run: Callable[[Captured, Sweeper], _T]) -> _T:
        """``run(captured, sweeper)`` on the graph for ``inputs``. Where one of the graph's
        run-time assertions fails, the model is captured again for the inputs as given and
        ``run`` repeated there: a graph exported with a batch of two (``capture``) can tie a
        count of the data to that batch (BART's and T5's classifiers gather each sample's
        EOS rows: 'u1 >= 2'), which a batch of one then failed inside the forward."""
        first = self._graph_for(inputs)
        for entry in [first, *(e for e in reversed(self._graphs) if e is not first)]:
            if entry is not first and not entry[0].accepts(inputs):
                continue
            try:
                return run(*entry)
            except RuntimeError as exc:
                if FAILED_ASSERTION not in str(exc):
                    raise
                # every graph that takes these shapes is tried before capturing again: inputs
                # that alternate between a model's branches reuse the graph of each
                log.info("a graph asserts against these inputs: %s", exc)
        return run(*self._graph_for(inputs, as_given=True))

    def _drop_specialised(self) -> None:
        """Forget the graphs specialised to one input's values (``engine.specialise``) but the
        first (the signature others are checked against): each serves only its own input, and
        a model that needs them would otherwise keep one graph per input it was asked about."""
        for captured, _ in self._graphs[1:]:
            if captured.example is not None:
                self._forget(captured)

    def _forget(self, captured: Captured) -> None:
        """Drop one graph and the head sweepers built on it. A process that froze its heap
        (``gc.freeze``: a worker, ``service.heap``) may have frozen the graph, whose reference
        cycles the collector then never frees: its heap is unfrozen, to be walked again."""
        self._graphs = [e for e in self._graphs if e[0] is not captured]
        dropped = id(captured)
        self._head_sweepers = {k: v for k, v in self._head_sweepers.items() if k[0] != dropped}
        if gc.get_freeze_count():
            gc.unfreeze()

    def graph_for(self, inputs: Inputs) -> Captured:
        """The captured graph that runs ``inputs``, captured now if none fits them (other
        input names, or a length that a graph of static length does not take)."""
        return self._graph_for(self._prepare(inputs))[0]

    @property
    def captured(self) -> Captured:
        return self._graphs[0][0]

    @property
    def graph(self) -> fx.Graph:
        return self.captured.graph

    def explain(
        self,
        inputs: Inputs,
        seed: Seed,
        mode: str = "default",
        relevance_nodes: str | Sequence[str] = "all",
        reference: Inputs | str | None = None,
        tokenizer: Any = None,
        contrast_with: int | str = "runner-up",
        retain: Collection[fx.Node] | None = None,
    ) -> Explanation:
        """One forward over ``inputs`` and one sweep for all ``seed.K`` seeds (modes
        "reference" and "contrast": one more forward, over ``reference``: inputs, or a name
        from ``engine.references``, where "mask" needs the ``tokenizer``; mode "contrast":
        each seeded logit against ``contrast_with``, see ``engine.contrast``). ``retain``: a
        lean forward, freed by the sweep but ``retain`` (``Sweeper.run``), no ``node_io``."""
        params = RelevanceParams(
            mode=mode, relevance_nodes=relevance_nodes, reference=reference,
            contrast_with=contrast_with,
        )  # fmt: skip
        lean = None if retain is None else seed
        forwards = self._forwards(inputs, params, tokenizer, lean=lean)
        return self._sweep(forwards, seed, params, retain)

    def _sweep(
        self, f: _Forwards, seed: Seed, params: RelevanceParams, retain: Collection | None = None
    ) -> Explanation:
        if params.mode == "contrast":
            alternative = class_index(params.contrast_with, self.model)
            own = params.problem_type == "multi_label_classification"
            seed = contrast_seed(seed, f.env[f.sweeper.seed_node], alternative, own)
        with torch.no_grad():
            relevance, seed_total, at_inputs, sinks = f.sweeper.run(
                f.env, f.prepared, seed, params.mode, params.keep, f.env_ref, retain
            )
        fused, lean = f.sweeper.fused, retain is not None
        return Explanation(
            relevance, seed_total, at_inputs, sinks, f.outputs, f.env, fused, f.captured, lean
        )

    def _forwards(
        self, inputs: Inputs, params: RelevanceParams, tokenizer: Any, task: str | None = None,
        lean: Seed | None = None,
    ) -> _Forwards:  # fmt: skip
        """What a sweep starts from: the graph for these inputs (its rules checked before any
        work), the recorded forward, and the reference's (modes "reference", "contrast"); given
        ``lean``'s seed, lean forwards that compute a linear head at its rows only.
        Question answering sweeps from its [B, T, 2] start and end logits (``qa_logits``)."""
        prepared = self._prepare(inputs, tokenizer)
        arguments.check_task_inputs(task, prepared)
        rows = None if lean is None else lean.index[..., :-1]

        def run(captured: Captured, sweeper: Sweeper) -> _Forwards:
            arguments.check_relevance_nodes(params, captured)
            if task == TaskName.QUESTION_ANSWERING and not answers_a_class(captured):
                sweeper = self._head_sweeper(captured, qa_logits(captured))
            sweeper.check_rules()
            with torch.no_grad():
                env, outputs = sweeper.forward(prepared, lean is not None, rows)
                env_ref = self._reference_env(sweeper, prepared, env, params, tokenizer, rows)
            return _Forwards(prepared, captured, sweeper, env, outputs, env_ref)

        return self._with_graph(prepared, run)

    def _head_sweeper(self, captured: Captured, node: fx.Node) -> Sweeper:
        """A sweeper seeded on ``node`` instead of the first output, built once per graph."""
        key = (id(captured), node)
        if key not in self._head_sweepers:
            self._head_sweepers[key] = Sweeper(captured, node)
        return self._head_sweepers[key]

    def _reference_env(
        self, sweeper: Sweeper, prepared, env: dict, params: RelevanceParams, tokenizer: Any,
        rows: Tensor | None = None,
    ) -> dict | None:  # fmt: skip
        """The recorded forward of the reference input, for modes "reference" and "contrast"."""
        if params.mode == "default":
            return None
        reference = params.reference
        if isinstance(reference, str):
            ref = named_reference(reference, prepared, tokenizer)
        else:
            ref = None if reference is None else self._prepare(reference, name="reference")
        return sweeper.reference_forward(prepared, ref, env, rows)

    # ------------------------------------------------------------ public API

    def predict(self, inputs: Inputs, temperature: float = 1.0) -> dict[str, Any]:
        """Run the recorded forward; returns ``node_io`` and keeps it on ``self.node_io``, and
        the explained output (the logits, ``Captured.explained_output``) on ``predictions``."""
        prepared = self._prepare(inputs)
        node_io, _, logits = self._with_graph(prepared, partial(_recorded, prepared))
        self.node_io = node_io
        self.predictions = _to_numpy(logits) / temperature
        return self.node_io

    def record(self, inputs: Inputs) -> tuple[NodeIO, tuple]:
        """The recorded forward over ``inputs``, every op's value kept: its ``node_io`` and
        the graph's outputs."""
        prepared = self._prepare(inputs)
        node_io, outputs, _ = self._with_graph(prepared, partial(_recorded, prepared))
        return node_io, outputs

    def run_task(
        self,
        task: str = "auto",
        inputs: Inputs | None = None,
        tokenizer: Any = None,
        mode: str = "default",
        multiplier: float = 100.0,
        scaler: float = 1.0,
        thresholding: float = 0.5,
        temperature: float = 1.0,
        return_scores: bool = False,
        return_relevance: bool = False,
        return_layerwise_output: bool = False,
        debug: bool = False,
        relevance_nodes: str | Sequence[str] | None = None,
        target: int | Sequence[int] | None = None,
        reference: Inputs | str | None = None,
        position: Position = None,
        contrast_with: int | str = "runner-up",
        problem_type: str | None = None,
        **generation_kwargs: Any,
    ) -> dict[str, Any]:
        """Predict and explain in one call (see ``dlbacktrace-pipeline.md``).

        ``multiplier`` is the seed's size and ``scaler`` multiplies every reported relevance
        value (so inputs + sinks = multiplier * scaler). ``temperature`` divides the logits
        reported as ``predictions``. ``thresholding`` is the decision threshold on the sigmoid
        of a single-logit binary classifier. ``target`` explains a given class instead of the
        predicted one, and ``position`` the token explained (token-classification, and
        text-classification of [B, T, C] logits: unset, a masked LM's mask token where every
        input has the ``tokenizer``'s, else each input's last real token); ``engine.heads``
        says what each task explains by default. ``reference`` (modes "reference" and
        "contrast"): the input whose output the explanation starts from, shaped like
        ``inputs``, or one of the names of ``engine.references`` ("zeros", the default:
        zeros, or for token ids zero embeddings; "mean" and "blur" for images; "mask" for
        tokens, with ``tokenizer``).
        ``contrast_with`` (mode "contrast" only): what the target is explained against, its
        logit difference split into signed relevance (``engine.contrast``): "runner-up" (the
        default; in generation, each step's runner-up token), "rest", a class index or label.
        ``problem_type`` (text-, image- and tabular-classification): what the logits are,
        "single_label_classification", "multi_label_classification" or "regression"; unset,
        the model's ``config.problem_type`` (transformers saves it with a trained head).
        ``relevance_nodes``: "all" (every node), "inputs", or node names; unset, "all" for
        classification and "inputs" for generation (every node at every step is large).
        Generation takes the keywords of ``DecodingParams`` and ``StepPlan``, and ``on_step``;
        there ``temperature`` is the decode's (0: greedy), not a scale of the predictions.
        """
        if inputs is None:
            raise ValueError("run_task needs inputs")
        if task not in TASK_NAMES:
            raise ValueError(f"task must be one of {tuple(map(str, TASK_NAMES))}, got {task!r}")
        task = self.detect_task(inputs, tokenizer) if task == TaskName.AUTO else TaskName(task)
        generating = task == TaskName.GENERATION
        if generating:
            arguments.check_generation(reference, target, position, thresholding)
        if relevance_nodes is None:
            relevance_nodes = "inputs" if generating else "all"
        params = RelevanceParams(
            mode=mode,
            multiplier=multiplier,
            scaler=scaler,
            thresholding=thresholding,
            temperature=1.0 if generating else temperature,
            relevance_nodes=relevance_nodes,
            target=arguments.target_classes(target, self.model),
            reference=reference,
            contrast_with=contrast_with,
            problem_type=arguments.problem_type(problem_type, self.model, task),
        )
        arguments.check_ranges(params)
        output = OutputParams(return_scores, return_relevance, return_layerwise_output, debug)
        if task == TaskName.GENERATION:
            from .generation import run_generation
            from .params import DecodingParams, StepPlan, with_keywords

            on_step = generation_kwargs.pop("on_step", None)
            decoding, plan = with_keywords(
                generation_kwargs, DecodingParams(temperature=temperature), StepPlan(), task=task
            )
            result = run_generation(self, inputs, params, decoding, tokenizer, plan=plan,
                                    output=output, on_step=on_step)  # fmt: skip
        else:
            if generation_kwargs:
                raise TypeError(f"unexpected arguments for {task}: {sorted(generation_kwargs)}")
            result = self._classify(task, inputs, params, output, tokenizer, position)
        self.relevance = result.get("relevance")
        return result

    def _classify(
        self,
        task: TaskName,
        inputs: Inputs,
        params: RelevanceParams,
        output: OutputParams,
        tokenizer: Any,
        position: Position = None,
    ) -> dict[str, Any]:
        """One forward and one sweep seeded as ``engine.heads`` decides for the task: one seed
        per sample (its relevance without the seed axis), or the task's ``seeds`` (relevance
        [K, B, ...], conservation [K, B])."""
        started = time.perf_counter()
        f = self._forwards(inputs, params, tokenizer, task)
        # a question answered from a fixed set of answers is a classification of them
        answers = task == TaskName.QUESTION_ANSWERING and answers_a_class(f.captured)
        if task == TaskName.QUESTION_ANSWERING and not answers and params.mode == "contrast":
            # the QA seeds sit on the [B, T, 2] start/end logits: a runner-up along that last
            # axis would set a start against an end, which explains nothing
            raise ValueError(
                'mode "contrast" is not defined for question-answering (its start and end '
                'logits are not alternatives of one another); use "default" or "reference"'
            )
        logits = f.env[f.sweeper.seed_node]
        mask = padding_mask(f.prepared, logits)
        seeding = classification if answers else SEEDS[task]
        if position is None and task == TaskName.TEXT_CLASSIFICATION:
            position = mask_positions(f.prepared, tokenizer, logits)
        decision = seeding(logits, params, mask, position, task)
        exp = self._sweep(f, decision.seed, params)
        scaler = params.scaler
        per_seed = bool(TASKS[task].seeds) and position is None and not answers
        first = slice(None) if per_seed else 0
        relevance = {k: v[first] * scaler for k, v in exp.relevance.items()}
        node_io = exp.node_io()
        self.node_io = node_io
        predictions = _to_numpy(decision.scaled)
        result: dict[str, Any] = {
            "task": task,
            "node_io": node_io,
            "relevance": relevance,
            "relevance_computed": True,
            "predictions": predictions,
            "predicted_labels": decision.labels.cpu().numpy(),
            "target": decision.target.cpu().numpy(),
            "mode": params.mode,
            "conservation": {
                "seed": _to_numpy(exp.seed[first]) * scaler,
                "inputs": _to_numpy(exp.inputs[first]) * scaler,
                "sinks": _to_numpy(exp.sinks[first]) * scaler,
            },
            "timings": {"total_s": time.perf_counter() - started},
            **decision.extra,
        }
        if per_seed:
            result["seeds"] = TASKS[task].seeds
        if params.problem_type is not None:  # multi-label or regression (``engine.heads``)
            result["problem_type"] = params.problem_type
        if params.mode in ("contrast", "reference"):
            names = f.captured.input_names
            result["relevance_positive"] = {
                k: v.clamp(min=0) for k, v in relevance.items() if k in names
            }
            result["relevance_negative"] = {
                k: v.clamp(max=0) for k, v in relevance.items() if k in names
            }
        if output.return_scores:
            result["scores_trace"] = [predictions]
        if output.return_relevance:
            result["relevance_trace"] = [relevance]
        if output.return_layerwise_output:
            result["layerwise_output_trace"] = [{k: v["output_values"] for k, v in node_io.items()}]
        if output.debug:
            c = result["conservation"]
            log.warning("run_task %s: seed %s, inputs %s, sinks %s, %.3fs", task, c["seed"],
                        c["inputs"], c["sinks"], result["timings"]["total_s"])  # fmt: skip
        return result

    # ------------------------------------------------------------ visualisations

    def visualize(self, save_path: str | Path = "graph.png", label_limit: int = 1500) -> Path:
        """Draw the captured computation graph (PNG, SVG, PDF, or Graphviz .dot text)."""
        from .visualize import visualize_graph

        return visualize_graph(self.graph, save_path, inputs=self.captured.input_names,
                               label_limit=label_limit)  # fmt: skip

    def visualize_dlbacktrace(
        self,
        output_path: str | Path = "backtrace_graph",
        engine_auto_threshold: int = 1500,
        relevance: dict[str, Tensor] | None = None,
    ) -> Path:
        """The graph coloured by each node's total relevance, from the last ``run_task`` (or
        ``relevance``). Graphs above ``engine_auto_threshold`` nodes are drawn unlabelled.
        Generation keeps only the inputs' relevance unless ``relevance_nodes`` asked for more
        ("all" or node names), so after it only those are coloured."""
        from .visualize import visualize_graph

        relevance = relevance if relevance is not None else self.relevance
        if relevance is None:
            raise ValueError("no relevance yet: call run_task first or pass relevance=")
        return visualize_graph(self.graph, output_path, relevance=relevance,
                               inputs=self.captured.input_names,
                               label_limit=engine_auto_threshold)  # fmt: skip

    def visualize_tokenwise_relevance_map(self, *args: Any, **kwargs: Any) -> Any:
        """Heatmap of every generated token's relevance over its context: the arguments of
        ``engine.visualize.visualize_tokenwise_relevance_map`` (timewise_relevance_out,
        input_ids, tokenizer=None, generated_ids=None, figsize=(12, 6), ...)."""
        from .visualize import visualize_tokenwise_relevance_map

        return visualize_tokenwise_relevance_map(*args, **kwargs)

    def visualize_input_heatmap_for_token(self, *args: Any, **kwargs: Any) -> Any:
        """Relevance of every context token for the ``n``-th generated token: the arguments
        of ``engine.visualize.visualize_input_heatmap_for_token`` (timewise_relevance_out, n,
        input_ids, tokenizer=None, generated_ids=None, figsize=(10, 3), ...)."""
        from .visualize import visualize_input_heatmap_for_token

        return visualize_input_heatmap_for_token(*args, **kwargs)

    def detect_task(self, inputs: Inputs, tokenizer: Any = None) -> TaskName:
        """Causal or encoder-decoder LM (even behind a wrapper) -> generation; token ids ->
        text; images -> image; 2-D float rows -> tabular."""
        if self._generates is None:  # walking the modules costs a millisecond: once
            from .generation import generates_text

            self._generates = generates_text(self.model)
        if self._generates:
            return TaskName.GENERATION
        prepared = self._prepare(inputs, tokenizer)
        first = next(iter(prepared.values()))
        if first.dtype == torch.uint8 and first.dim() >= 3:
            raise TypeError(
                f"a uint8 tensor of shape {tuple(first.shape)} is an image, not token ids: "
                "convert it to float (e.g. x.float() / 255) and pass task='image-classification'"
            )
        if not first.is_floating_point() or "inputs_embeds" in prepared:  # embeddings: text
            return TaskName.TEXT_CLASSIFICATION
        if first.dim() >= 3:
            return TaskName.IMAGE_CLASSIFICATION
        if first.dim() == 2:
            return TaskName.TABULAR_CLASSIFICATION
        raise ValueError(
            f"cannot tell the task from an input of shape {tuple(first.shape)}: pass task="
        )

    def diagnose_model_compatibility(self) -> dict[str, Any]:
        """Ops on the relevance path and those without a rule, from the graph alone."""
        report = {"supported": True, "unsupported": [], "ops": {}}
        for _, sweeper in self._graphs:
            missing = sweeper.provenance.unsupported()
            report["unsupported"] += [{"node": n, "op": op} for n, op in missing]
            report["ops"].update(sweeper.provenance.op_counts())
        report["supported"] = not report["unsupported"]
        if self.verbose:
            for item in report["unsupported"]:
                print(f"[diagnose] no rule for {item['op']} at {item['node']}")
        return report

    def debug_execution_differences(self, *inputs: Any, **named: Tensor) -> dict[str, Any]:
        """Compare the recorded graph's outputs with the eager model on the same inputs."""
        given: Inputs = named if named else (inputs[0] if len(inputs) == 1 else tuple(inputs))
        prepared = self._prepare(given)
        _, graph_out, _ = self._with_graph(prepared, partial(_recorded, prepared))
        with torch.no_grad():
            eager = self.model(**prepared)
        eager_flat = [t for t in torch.utils._pytree.tree_leaves(eager) if isinstance(t, Tensor)]
        diffs = [
            float((g.float() - e.float()).abs().max()) if g.shape == e.shape else float("inf")
            for g, e in zip(graph_out, eager_flat, strict=False)
        ]
        return {"max_abs_diff": diffs, "match": all(d <= 1e-4 for d in diffs)}

    def evaluation(self, result: dict[str, Any], top_k: int = 5) -> dict[str, Any]:
        """Summary of a run_task result (classification or generation): conservation error
        and the strongest input features, as numpy arrays (indices as integers, into each
        sample's flattened input). A result of several seeds per sample (token
        classification, question answering: relevance [K, B, ...]) is summarised per seed
        and sample ([K, B, top_k]), the axes its conservation report has."""
        if result.get("conservation") is None:
            raise ValueError(
                "the result explains no step (generation with steps='none', or none reached): "
                "nothing to evaluate"
            )
        c = {k: _to_numpy(torch.as_tensor(v)) for k, v in result["conservation"].items()}
        error = np.abs(c["inputs"] + c["sinks"] - c["seed"]) / np.maximum(np.abs(c["seed"]), 1e-12)
        lead = c["seed"].shape  # [B], or [K, B]: one seed per output explained
        top = {}
        for name in self.captured.input_names:
            rel = result["relevance"].get(name)
            if rel is None:
                continue
            flat = torch.as_tensor(rel).reshape(*lead, -1)
            k = min(top_k, flat.shape[-1])
            values, index = flat.topk(k, dim=-1)
            top[name] = {"index": index.cpu().numpy(), "value": _to_numpy(values)}
        return {
            "conservation_error": error,
            "input_share": c["inputs"] / np.where(c["seed"] == 0, 1, c["seed"]),
            "top_features": top,
        }


def _recorded(prepared: dict[str, Tensor], captured: Captured, sweeper: Sweeper) -> tuple:
    """The recorded forward over ``prepared``: its ``node_io``, the graph's outputs and the
    explained output."""
    with torch.no_grad():
        env, outputs = sweeper.forward(prepared)
    return NodeIO(captured, env, sweeper.fused), outputs, env[sweeper.seed_node]


def _to_numpy(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _warn_unreached(captured: Captured, sweeper: Sweeper) -> None:
    """Warn, once per capture, when relevance from the explained output can reach none of
    the inputs: every share would end in a sink and each input's relevance be 0, which
    reads as "nothing mattered". Relevance flows along floating-point paths from a
    floating-point input or an embedding lookup of ids (``engine.provenance``, where one-hot
    codes of ids are one): ids cast to float, or complex values, carry none."""
    reached = {n.name for n in sweeper.provenance.visited if n.op == "placeholder"}
    if not reached & set(captured.data_inputs):
        warnings.warn(
            f"relevance from the output {sweeper.provenance.output.name} reaches none of the "
            f"inputs ({', '.join(captured.data_inputs)}): every input will get 0. Relevance "
            "flows along floating-point paths from a floating-point input or an embedding "
            "lookup of ids (or their one-hot codes); ids cast to float or complex values "
            "carry none",
            stacklevel=4,
        )
