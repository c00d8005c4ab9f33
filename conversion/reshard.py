"""A checkpoint of this toolkit at another model-parallel size and pipeline layout, optimizer state included.

``reshard_states`` takes every rank's state of a checkpoint, joins each partitioned tensor into its
full form by the model's layout, re-pads the vocabulary if the new size does not split it, and cuts
the tensors again for the new size. The same happens to the Adam moments and the fp32 master weights
of the ``FP16_Optimizer``, matched to their parameters by the optimizer's parameter order, so a
resharded training checkpoint resumes where it stopped. ``full_model_state`` gives a checkpoint's full
weights (what the exporters start from) and ``release_states`` writes full weights from anywhere as a
weights-only ``release`` checkpoint, after checking every tensor's name and shape against the model.
``restage_states`` joins a pipelined checkpoint's stages into whole-model states (by parameter name,
optimizer included) and ``split_stages`` cuts whole-model states into another pipeline layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

import mpu
from checkpointing import merge_stage_models
from errors import ConversionError
from model import TransformerConfig

from .layout import (
    Layout,
    build_model,
    check_divisible,
    merge_parts,
    model_layout,
    model_parallel_of_one,
    model_type_of,
    padded_size,
    repad,
    resize_rows,
    split_full,
    stage_owns,
)


def _optimizer_full(states: list[dict[str, Any]], layout: Layout, model_dtypes: dict[str, torch.dtype],
                    rows: int) -> tuple[dict, dict[str, dict[str, Any]], dict[str, torch.Tensor]]:
    """The optimizer states of every rank merged: (rank 0's FP16_Optimizer dict, per-parameter state
    as full tensors keyed by name, fp32 masters as full tensors keyed by name)."""
    order = layout.optimizer_order
    opts = [s["optimizer"] for s in states]
    inner = [o["optimizer"] for o in opts]
    count = sum(len(g["params"]) for g in inner[0]["param_groups"])
    if count != len(order):
        raise ConversionError(f"the optimizer state numbers {count} parameters, the model has {len(order)}; "
                              "was it saved by this toolkit's training?")
    per_param: dict[str, dict[str, torch.Tensor]] = {}
    for index, name in enumerate(order):
        if index not in inner[0]["state"]:
            continue  # never stepped
        entry = {}
        for key, value in inner[0]["state"][index].items():
            parts = [o["state"][index][key] for o in inner]
            if name in layout.split and torch.is_tensor(value) and value.dim() > 0 and len(parts) > 1:
                dim, stride = layout.split[name]
                value = mpu.merge_partitions(parts, dim, stride)
            if name in layout.vocab and torch.is_tensor(value) and value.dim() > 0:
                value = resize_rows(value, rows)
            entry[key] = value
        per_param[name] = entry
    half = [name for name in order if model_dtypes[name] != torch.float32]
    masters_lists = [o.get("fp32_master_params", []) for o in opts]
    masters: dict[str, torch.Tensor] = {}
    if masters_lists[0]:
        if len(masters_lists[0]) != len(half):
            raise ConversionError(f"the optimizer holds {len(masters_lists[0])} fp32 master weights for "
                                  f"{len(half)} half-precision parameters")
        for i, name in enumerate(half):
            parts = [m[i] for m in masters_lists]
            value = parts[0]
            if name in layout.split and len(parts) > 1:
                value = mpu.merge_partitions(parts, *layout.split[name])
            masters[name] = resize_rows(value, rows) if name in layout.vocab else value
    return opts[0], per_param, masters


def _optimizer_at(rank: int, size: int, template: dict, per_param: dict, masters: dict, layout: Layout,
                  model_dtypes: dict[str, torch.dtype]) -> dict:
    def cut(name: str, value: Any) -> Any:
        if name in layout.split and torch.is_tensor(value) and value.dim() > 0:
            dim, stride = layout.split[name]
            return mpu.partition_tensor(value, size, rank, dim, stride).clone()
        return value

    order = layout.optimizer_order
    inner = template["optimizer"]
    state = {index: {key: cut(name, v) for key, v in per_param[name].items()}
             for index, name in enumerate(order) if name in per_param}
    half = [name for name in order if model_dtypes[name] != torch.float32]
    return {
        **template,
        "optimizer": {"state": state, "param_groups": inner["param_groups"]},
        "fp32_master_params": [cut(name, masters[name]) for name in half] if masters else [],
    }


def reshard_states(states: list[dict[str, Any]], target: int, keep_optimizer: bool = True,
                   divisible_by: int = 128, where: str = "checkpoint") -> list[dict[str, Any]]:
    """A checkpoint's per-rank states at model-parallel size ``target``.

    Weights, Adam moments and fp32 masters are merged and cut by the model's layout; the vocabulary
    is re-padded with zero rows when ``target`` does not split it (they get no probability when the
    config knows the real vocabulary size, as every checkpoint written since it does).
    Everything replicated comes from rank 0; the model-parallel dropout streams cannot follow the
    heads to another size and are left out (a resumed run seeds them afresh).
    """
    first = states[0]
    saved = first.get("config")
    if not saved:
        raise ConversionError(f"{where}: stores no model config; it was not written by this toolkit's training")
    config = TransformerConfig(**saved)
    model_type = model_type_of(first["model"])
    layout = model_layout(model_type, config)
    rows = padded_size(config, target, divisible_by)
    new_config = dataclasses.replace(config, vocab_size=rows)
    check_divisible(new_config, target, where)
    model_dtypes = {name: t.dtype for name, t in first["model"].items()}
    full = repad(merge_parts([s["model"] for s in states], layout), layout, rows)
    parts = split_full(full, layout, target)
    has_optimizer = keep_optimizer and "optimizer" in first
    if has_optimizer:
        template, per_param, masters = _optimizer_full(states, layout, model_dtypes, rows)
    out = []
    for rank in range(target):
        state = {k: v for k, v in first.items() if k not in ("model", "optimizer", "rng")}
        state.update(model_parallel_size=target, model=parts[rank], config=dataclasses.asdict(new_config))
        if "args" in state:
            state["args"] = {**state["args"], "model_parallel_size": target}
        if "rng" in first:
            state["rng"] = {k: v for k, v in first["rng"].items() if k != "tracker"}
        if has_optimizer:
            state["optimizer"] = _optimizer_at(rank, target, template, per_param, masters, layout, model_dtypes)
        elif not keep_optimizer:
            state.pop("lr_scheduler", None)  # as with --no-save-optim: the flags' schedule continues
        out.append(state)
    return out


def _stage_optimizer(template: dict, per_name: dict[str, dict], masters: dict[str, torch.Tensor], order: list[str],
                     num_decay: int, model: dict[str, torch.Tensor]) -> dict:
    """An optimizer dict (``FP16_Optimizer.state_dict``'s form) over the parameters ``order`` of a model,
    the first ``num_decay`` of them in the weight-decay group, from per-name state and masters."""
    inner = template["optimizer"]
    groups = [{**inner["param_groups"][0], "params": list(range(num_decay))},
              {**inner["param_groups"][1], "params": list(range(num_decay, len(order)))}]
    half = [name for name in order if model[name].dtype != torch.float32]
    return {
        **template,
        "optimizer": {"state": {i: per_name[n] for i, n in enumerate(order) if n in per_name}, "param_groups": groups},
        "fp32_master_params": [masters[name] for name in half] if masters else [],
    }


def restage_states(grid: list[list[dict[str, Any]]], where: str = "checkpoint") -> list[dict[str, Any]]:
    """Per model-parallel rank, the state of the whole model from its pipeline stages' states (``grid``
    by model-parallel rank, then stage): the models' union, and the optimizer's state and fp32 masters
    matched to the parameters by name (each stage's optimizer order is the whole model's, filtered to
    its parameters). A checkpoint without pipeline parallelism comes back as it is."""
    if all(len(stages) == 1 for stages in grid):
        return [stages[0] for stages in grid]
    first = grid[0][0]
    if not first.get("config"):
        raise ConversionError(f"{where}: stores no model config; it was not written by this toolkit's training")
    config = TransformerConfig(**first["config"])
    layout = model_layout(model_type_of(first["model"]), config)
    out = []
    for stages in grid:
        model = merge_stage_models([stage["model"] for stage in stages])
        state = {k: v for k, v in stages[0].items() if k not in ("model", "optimizer")}
        state.update(model=model, pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=1)
        if all("optimizer" in stage for stage in stages):
            per_name: dict[str, dict] = {}
            masters: dict[str, torch.Tensor] = {}
            for stage in stages:
                order = [name for name in layout.optimizer_order if name in stage["model"]]
                inner = stage["optimizer"]["optimizer"]
                if sum(len(g["params"]) for g in inner["param_groups"]) != len(order):
                    raise ConversionError(f"{where}: a stage's optimizer numbers another count of parameters than "
                                          "its model; was it saved by this toolkit's training?")
                for index, name in enumerate(order):
                    if index in inner["state"]:
                        per_name.setdefault(name, inner["state"][index])
                half = [name for name in order if stage["model"][name].dtype != torch.float32]
                for name, master in zip(half, stage["optimizer"].get("fp32_master_params", [])):
                    masters.setdefault(name, master)
            state["optimizer"] = _stage_optimizer(stages[0]["optimizer"], per_name, masters, layout.optimizer_order,
                                                  layout.num_decay, model)
        out.append(state)
    return out


def split_stages(states: list[dict[str, Any]], pipeline_size: int, virtual: int = 1,
                 where: str = "checkpoint") -> list[list[dict[str, Any]]]:
    """Whole-model states (per model-parallel rank) cut into ``pipeline_size`` stages of ``virtual`` chunks
    each (by model-parallel rank, then stage): each stage's parameters by ``stage_owns``, its optimizer
    state and masters re-indexed to its own parameter order."""
    config = TransformerConfig(**states[0]["config"])
    model_type = model_type_of(states[0]["model"])
    if config.num_layers % (pipeline_size * virtual):
        raise ConversionError(f"{where}: its {config.num_layers} layers do not split into {pipeline_size} pipeline "
                              f"stages" + (f" x {virtual} virtual stages" if virtual > 1 else ""))
    if pipeline_size == 1:
        return [[state] for state in states]
    layout = model_layout(model_type, config)
    grid = []
    for state in states:
        stages = []
        for rank in range(pipeline_size):
            owned = [name for name in state["model"]
                     if stage_owns(name, model_type, config.num_layers, pipeline_size, rank, virtual)]
            model = {name: state["model"][name] for name in owned}
            stage = {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            stage.update(model=model, pipeline_model_parallel_size=pipeline_size,
                         virtual_pipeline_model_parallel_size=virtual)
            if "args" in stage:
                stage["args"] = {**stage["args"], "pipeline_model_parallel_size": pipeline_size}
            if "optimizer" in state:
                full = state["optimizer"]
                inner = full["optimizer"]
                names = layout.optimizer_order
                per_name = {names[i]: value for i, value in inner["state"].items()}
                half = [name for name in names if state["model"][name].dtype != torch.float32]
                masters = dict(zip(half, full.get("fp32_master_params", [])))
                order = [name for name in names if name in model]
                decay_names = set(names[:layout.num_decay])
                decay = sum(1 for name in order if name in decay_names)
                stage["optimizer"] = _stage_optimizer(full, per_name, masters, order, decay, model)
            stages.append(stage)
        grid.append(stages)
    return grid


def full_model_state(states: list[dict[str, Any]] | list[list[dict[str, Any]]]
                     ) -> tuple[str, TransformerConfig, dict[str, torch.Tensor]]:
    """(model type, config, full tensors) of a checkpoint's per-rank states (or by rank and stage)."""
    if states and isinstance(states[0], list):
        states = [{**stages[0], "model": merge_stage_models([s["model"] for s in stages])} for stages in states]
    config = TransformerConfig(**states[0]["config"])
    model_type = model_type_of(states[0]["model"])
    return model_type, config, merge_parts([s["model"] for s in states], model_layout(model_type, config))


def release_states(model_type: str, config: TransformerConfig, full: dict[str, torch.Tensor], target: int,
                   args: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Per-rank states of a weights-only ``release`` checkpoint at model-parallel size ``target``."""
    check_divisible(config, target, where)
    layout = model_layout(model_type, config)
    with model_parallel_of_one():  # inside a run the model is built at the run's size: scale back up
        world = mpu.get_model_parallel_world_size()
        expected = {name: list(t.shape) for name, t in build_model(model_type, config).state_dict().items()}
    for name, (dim, _) in layout.split.items():
        expected[name][dim] *= world
    missing = sorted(set(expected) - set(full))
    extra = sorted(set(full) - set(expected))
    if missing or extra:
        raise ConversionError(f"{where}: the weights do not make a {model_type} model "
                              f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in full.items():
        if list(tensor.shape) != expected[name]:
            raise ConversionError(f"{where}: {name} has shape {tuple(tensor.shape)}, the config needs "
                                  f"{tuple(expected[name])}")
    parts = split_full({k: v.contiguous() for k, v in full.items()}, layout, target)
    return [{"iteration": "release", "model_parallel_size": target, "model": parts[rank],
             "config": dataclasses.asdict(config), "args": {**args, "model_parallel_size": target}}
            for rank in range(target)]
