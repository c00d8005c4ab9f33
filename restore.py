"""What a run takes from ``--load`` and gives to ``--save``.

* ``check_run_paths``: before any work, every directory flag usable and no ``--save`` that would
  write over another run's checkpoints.
* ``lock_save``: one run at a time writes a ``--save`` directory (rank 0 holds ``atomic.FolderLock``).
* ``read_load_state``: this rank's state from ``--load`` (a checkpoint directory, or a Hugging Face
  GPT-2 folder converted in memory with ``--load-openai`` / ``--eval-hf``); ``read_start_state``
  adds ``--pretrained-bert``'s Hugging Face BERT folder when ``--load`` holds no checkpoint.
* ``decide_model_config``: the one place the model's config is decided, from the flags, the
  tokenizer and the checkpoint's stored config: a shape flag left out takes the checkpoint's value
  (or ``arguments.MODEL_SHAPE_DEFAULTS`` without one), a given one that contradicts it is refused,
  the vocabulary is padded by the one rule (or keeps the checkpoint's padding for the same
  tokenizer), and ``--seq-length`` is checked against the positions.
* ``load_gpt2_for_inference``: a GPT2 checkpoint ready for generation and evaluation.
* ``save`` / ``load``: the training state (model, optimizer, schedule, rng, data position).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn

import mpu
from arguments import MODEL_SHAPE_DEFAULTS, SHAPE_FLAGS, check_model_shape, flag_name, writable_directory
from atomic import FolderLock
from checkpointing import (
    START_OVER,
    TRACKER_FILENAME,
    check_config,
    check_virtual_stages,
    checkpoint_root_of,
    get_checkpoint_tracker_filename,
    load_checkpoint_state,
    remove_old_checkpoints,
    remove_orphaned_temporaries,
    save_checkpoint,
    set_rng_state,
    untracked_checkpoints,
)
from conversion import hf_model_type, import_hf, read_hf_config, stage_owns
from errors import ArgumentError, CheckpointError
from initialize import print_rank_0
from learning_rates import AnnealingLR
from model import SHAPE_FIELDS, GPT2Model, TransformerConfig, pad_vocab_size
from model.distributed import unwrap_model
from parallel_layout import check_pipeline_layers, virtual_pipeline_size

# ---------------------------------------------------------------------------------------------
# Before any work
# ---------------------------------------------------------------------------------------------


def _creatable_directory(path: str, flag: str) -> None:
    """``path`` is a writable directory, or one this process could create (nothing is created)."""
    if os.path.exists(path):
        writable_directory(path, flag)
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        raise ArgumentError(f"{flag} {path}: cannot create the directory ({parent} is not a writable directory)")


def check_run_paths(args) -> None:
    """Before any work: every directory flag usable, ``--load`` naming a checkpoint directory, and no
    ``--save`` that would write over another run's checkpoints."""
    for flag, path in (("--save", args.save), ("--log-dir", args.log_dir)):
        if path:
            writable_directory(path, flag)
    if args.cache_dir:  # made only when the run writes there
        _creatable_directory(args.cache_dir, "--cache-dir")
    same = bool(args.load and args.save) and os.path.realpath(args.load) == os.path.realpath(args.save)
    if args.load and not (args.load_openai or args.eval_hf):
        root = None if os.path.isfile(get_checkpoint_tracker_filename(args.load)) else checkpoint_root_of(args.load)
        if root is not None:
            kind = "a checkpoint file" if os.path.isfile(args.load) else "a folder inside a checkpoint"
            raise ArgumentError(f"--load {args.load} is {kind}; pass the directory holding {TRACKER_FILENAME}: "
                                f"--load {root}")
        if os.path.exists(args.load) and not os.path.isdir(args.load):
            raise ArgumentError(f"--load {args.load}: is a file, not a checkpoint directory")
        if not os.path.exists(args.load) and not same:
            raise ArgumentError(f"--load {args.load}: no such directory")
    if args.save and os.path.isfile(get_checkpoint_tracker_filename(args.save)) and not same \
            and not args.overwrite_checkpoints:
        raise ArgumentError(f"--save {args.save} already holds another run's checkpoints; pass --load {args.save} "
                            "to continue that run, or choose a new --save directory (--overwrite-checkpoints starts "
                            "over in it)")
    untracked = untracked_checkpoints(args.save, START_OVER) if args.save else None
    if untracked is not None and (not args.overwrite_checkpoints or "not a file" in untracked):
        raise ArgumentError(f"--save {untracked}")
    if args.save:
        for path in remove_orphaned_temporaries(args.save):
            print_rank_0(f"removed {path}, left by a save that was killed")


def lock_save(args) -> FolderLock | None:
    """On global rank 0, hold the lock of ``--save`` for the run (``None`` elsewhere and without ``--save``):
    a second run into the same directory is refused with a line naming the holder; a lock whose holder is
    gone is taken over with a warning. Call it through ``all_ranks_agree`` so a refusal stops every rank."""
    if not args.save or not mpu.is_rank_0():
        return None
    writable_directory(args.save, "--save")
    lock = FolderLock(args.save)
    warning = lock.acquire(f"--save {args.save}")
    if warning:
        print(warning, flush=True)
    return lock


def read_load_state(args, restage: bool = False) -> dict[str, Any] | None:
    """This model-parallel rank's state from ``--load``: a checkpoint directory, or with
    ``--load-openai`` / ``--eval-hf`` a Hugging Face GPT-2 folder converted in memory (weights only,
    like a ``release`` checkpoint). ``None`` when the directory holds no checkpoint yet. ``restage``
    joins a pipelined checkpoint's stages (generation and evaluation run the whole model)."""
    if args.load_openai or args.eval_hf:
        states, _ = import_hf(args.load, mpu.get_model_parallel_world_size(), args.make_vocab_size_divisible_by,
                              args.seed)
        return _stage_share(states[mpu.get_model_parallel_rank()], "gpt2", args)
    same = bool(args.save) and os.path.realpath(args.load) == os.path.realpath(args.save)
    remedy = None if args.overwrite_checkpoints and same else START_OVER if same else ""
    return load_checkpoint_state(args.load, restage, remedy)


def read_pretrained_bert(args) -> dict[str, Any]:
    """``--pretrained-bert``: this model-parallel rank's weights from the Hugging Face BERT folder that
    ``--tokenizer-model-type`` names (2019 named a model to download there), converted in memory at the
    run's model-parallel size like a ``release`` checkpoint; heads the folder lacks are newly
    initialised from ``--seed``, the same full tensors at every size."""
    folder = args.tokenizer_model_type
    if not folder or not os.path.isdir(folder):
        given = f"--tokenizer-model-type {folder}" if folder else "no --tokenizer-model-type"
        raise ArgumentError(f"--pretrained-bert starts from the local Hugging Face BERT folder --tokenizer-model-type "
                            f"names, and {given} is not one: model hubs are not reached; download the model "
                            "folder (config.json, model.safetensors, vocab.txt) and pass --tokenizer-model-type DIR")
    where = os.path.join(folder, "config.json")
    if hf_model_type(read_hf_config(folder), where) != "bert":
        raise ArgumentError(f"--pretrained-bert: {where} is not a BERT model; give a Hugging Face BERT folder")
    states, fresh = import_hf(folder, mpu.get_model_parallel_world_size(), args.make_vocab_size_divisible_by,
                              args.seed)
    if fresh:
        print_rank_0(f"note: {folder} has no {', '.join(fresh)}; newly initialised")
    return _stage_share(states[mpu.get_model_parallel_rank()], "bert", args)


def _stage_share(state: dict[str, Any], model_type: str, args) -> dict[str, Any]:
    """A whole model's state (an import) cut to this pipeline stage's parameters."""
    pp = mpu.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return state
    layers = state["config"]["num_layers"]
    virtual = virtual_pipeline_size(layers, pp, args.num_layers_per_virtual_pipeline_stage)
    rank = mpu.get_pipeline_model_parallel_rank()
    return {**state, "model": {name: tensor for name, tensor in state["model"].items()
                               if stage_owns(name, model_type, layers, pp, rank, virtual)}}


def read_start_state(args) -> tuple[dict[str, Any] | None, str]:
    """The state a training run starts from, and the path it came from: ``--load``'s checkpoint, else
    with ``--pretrained-bert`` the pretrained BERT (2019 loaded ``--load`` over it too); ``None`` for neither."""
    ckpt = read_load_state(args) if args.load else None
    if ckpt is not None or not args.pretrained_bert:
        if ckpt is not None and args.pretrained_bert:
            print_rank_0(f"note: --load {args.load} holds a checkpoint; it continues, --pretrained-bert is not used")
        return ckpt, args.load or ""
    return read_pretrained_bert(args), args.tokenizer_model_type


# ---------------------------------------------------------------------------------------------
# The model's config
# ---------------------------------------------------------------------------------------------


def decide_shape(args, stored: dict[str, Any] | None, where: str = "", training: bool = True) -> dict[str, Any]:
    """The shape fields of the model (``TransformerConfig`` names): each flag that is given, else the
    checkpoint's ``stored`` config, else the default; with the LayerNorm epsilon when known. A given
    flag that contradicts the checkpoint is a ``CheckpointError``; the result is checked against the
    model-parallel size and, for ``training`` (generation and evaluation cap their window at the
    positions instead), ``--seq-length`` (``where`` names the checkpoint in the messages)."""
    stored = stored or {}
    shape: dict[str, Any] = {}
    for field, dest in SHAPE_FLAGS.items():
        given = getattr(args, dest)
        saved = stored.get(field)
        if field == "intermediate_size" and saved is None and "hidden_size" in stored:
            saved = 4 * stored["hidden_size"]
        if given is not None and saved is not None and given != saved:
            raise CheckpointError(f"{flag_name(dest)} {given} contradicts the checkpoint in {where}, which has "
                                  f"{flag_name(dest)} {saved}; omit the flag to take the checkpoint's value")
        value = given if given is not None else stored.get(field, MODEL_SHAPE_DEFAULTS.get(dest))
        if value is not None:
            shape[field] = value
    epsilon = args.layernorm_epsilon if args.layernorm_epsilon is not None else stored.get("layernorm_epsilon")
    if epsilon is not None:
        shape["layernorm_epsilon"] = epsilon
    check_model_shape({dest: shape.get(field) for field, dest in SHAPE_FLAGS.items()}, args.model_parallel_size,
                      args.seq_length if training else None, where if stored else "",
                      args.eval_seq_length if training else None)
    if training and getattr(args, "pipeline_model_parallel_size", 1) > 1:
        check_pipeline_layers(shape["num_layers"], args.pipeline_model_parallel_size,
                              args.num_layers_per_virtual_pipeline_stage, where if stored else "")
    return shape


def padded_vocab_size(args, vocab_size: int, stored: dict[str, Any] | None) -> int:
    """The tokenizer's ``vocab_size`` padded by the one rule, or the checkpoint's padding (an import's or a
    reshard's) when it was trained with the same tokenizer."""
    if stored and stored.get("unpadded_vocab_size") == vocab_size:
        return stored["vocab_size"]
    return pad_vocab_size(vocab_size, args.make_vocab_size_divisible_by, args.model_parallel_size)


def decide_model_config(args, vocab_size: int, stored: dict[str, Any] | None = None, where: str = "",
                        model_defaults: dict[str, Any] | None = None) -> TransformerConfig:
    """The config of the model a training run builds: ``model_defaults`` (the model family's, e.g.
    ``model.BERT_DEFAULTS``) under the decided shape, the padded vocabulary (entries above the
    tokenizer's ``vocab_size`` get no probability) and the regularisation flags."""
    return TransformerConfig(**{
        **(model_defaults or {}),
        **decide_shape(args, stored, where),
        "vocab_size": padded_vocab_size(args, vocab_size, stored),
        "unpadded_vocab_size": vocab_size,
        "hidden_dropout": args.hidden_dropout,
        "attention_dropout": args.attention_dropout,
        "init_method_std": args.init_method_std,
        "checkpoint_activations": args.checkpoint_activations,
        "checkpoint_num_layers": args.checkpoint_num_layers,
        "sequence_parallel": args.sequence_parallel,
    })


# ---------------------------------------------------------------------------------------------
# Generation and evaluation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedCheckpoint:
    """Where a model came from: the directory, its iteration and the config and flags stored in it."""

    path: str
    iteration: int | str
    config: TransformerConfig
    args: dict[str, Any]


def _stored_config(load_dir: str, saved: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    missing = [name for name in SHAPE_FLAGS if name not in saved and name != "intermediate_size"]
    if missing or "vocab_size" not in saved:
        absent = ", ".join(missing or ["vocab_size"])
        raise CheckpointError(f"{load_dir}: the checkpoint stores no model config ({absent} missing); it was not "
                              "written by this toolkit's training")
    return {k: v for k, v in saved.items() if k in fields}


def check_vocabulary(load_dir: str, saved: dict[str, Any], tokenizer_vocab_size: int, divisible_by: int) -> None:
    """Refuse a tokenizer whose vocabulary is not the model's, or a model-parallel size its padding doesn't split."""
    mp_size = mpu.get_model_parallel_world_size()
    real = saved.get("unpadded_vocab_size")
    if real is not None:  # the checkpoint knows its tokenizer's size: compare that, whatever the padding
        if real != tokenizer_vocab_size:
            raise CheckpointError(f"{load_dir}: the model was trained with a vocabulary of {real} tokens, this "
                                  f"tokenizer has {tokenizer_vocab_size}; use the model's vocabulary files")
        if saved["vocab_size"] % mp_size:
            raise CheckpointError(f"{load_dir}: its padded vocabulary of {saved['vocab_size']} does not split over "
                                  f"model-parallel size {mp_size}; reshard it with tools/reshard_checkpoint.py")
        return
    padded = pad_vocab_size(tokenizer_vocab_size, divisible_by, mp_size)
    if padded != saved["vocab_size"]:
        raise CheckpointError(
            f"{load_dir}: the model has a vocabulary of {saved['vocab_size']} (padded) but this tokenizer pads "
            f"{tokenizer_vocab_size} tokens to {padded}; use the vocabulary and --make-vocab-size-divisible-by "
            "the model was trained with"
        )


def load_gpt2_for_inference(args, tokenizer, device: torch.device,
                            parallel_output: bool = True) -> tuple[GPT2Model, LoadedCheckpoint]:
    """The GPT2 model in ``args.load``, on ``device``, in eval mode without dropout, its shape taken
    from the checkpoint's stored config (a shape flag that contradicts it is a ``CheckpointError``).
    Call it after ``initialize.initialize_distributed``."""
    if not args.load:
        raise CheckpointError("no checkpoint to load: give --load DIR (a directory written by --save)")
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        raise ArgumentError("generation and evaluation run the whole model on each model-parallel group (a "
                            "pipelined checkpoint's stages are joined at load): drop --pipeline-model-parallel-size")
    root = checkpoint_root_of(args.load)
    if root is not None and os.path.abspath(args.load) != root:
        raise CheckpointError(f"--load {args.load} lies inside a checkpoint; pass the directory holding "
                              f"{TRACKER_FILENAME}: --load {root}")
    ckpt = read_load_state(args, restage=True)
    if ckpt is None:
        raise CheckpointError(f"{args.load}: no checkpoint there (no {TRACKER_FILENAME}); "
                              "point --load at a directory written by --save")
    saved = _stored_config(args.load, ckpt.get("config", {}))
    if saved.get("post_layernorm") or saved.get("num_tokentypes"):
        raise CheckpointError(f"{args.load}: this is a BERT checkpoint; generation and evaluation take GPT2 ones")
    decide_shape(args, saved, args.load, training=False)
    check_vocabulary(args.load, saved, tokenizer.vocab_size, args.make_vocab_size_divisible_by)
    config = TransformerConfig(**{**saved, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                                  "checkpoint_activations": False, "sequence_parallel": False})
    model = GPT2Model(config, parallel_output=parallel_output)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{args.load}: the weights do not fit the stored config ({str(err).splitlines()[0]})") \
            from None
    model = model.to(device=device, dtype=args.params_dtype).eval()
    if not mpu.get_cuda_rng_tracker().get_states():  # attention forks the model-parallel stream
        mpu.model_parallel_cuda_manual_seed(args.seed)
    return model, LoadedCheckpoint(args.load, ckpt["iteration"], config, ckpt.get("args", {}))


# ---------------------------------------------------------------------------------------------
# Training state
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """Progress that a checkpoint carries forward: iterations, the samples trained on (which set the
    global batch of a ramp-up), where the training data continues (``data_samples``: the samples
    drawn since the data last started from its beginning; restored with ``--resume-dataloader``) and
    the steps skipped."""

    iteration: int = 0
    consumed_samples: int = 0
    data_samples: int = 0
    skipped_iters: int = 0


def _model_config(model: nn.Module) -> dict[str, Any]:
    config = getattr(unwrap_model(model), "config", None)
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}


def _plain_args(args) -> dict[str, Any]:
    plain = (str, int, float, bool, type(None))
    return {k: v for k, v in vars(args).items()
            if isinstance(v, plain) or (isinstance(v, list) and all(isinstance(x, plain) for x in v))}


def save(args, state: TrainState, model: nn.Module, optimizer, scheduler: AnnealingLR) -> str:
    """Write the training state at ``state.iteration`` to ``--save`` (and drop old ones with
    ``--keep-last-checkpoints``); returns this rank's file."""
    extra = {
        "config": _model_config(model),
        "data": {"consumed_samples": state.data_samples},
        "consumed_samples": state.consumed_samples,
        "skipped_iters": state.skipped_iters,
        "args": _plain_args(args),
    }
    if not args.no_save_optim:  # as in Megatron, --no-save-optim leaves out the lr schedule too
        extra["lr_scheduler"] = scheduler.state_dict()
    path = save_checkpoint(
        args.save, state.iteration, unwrap_model(model).state_dict(), extra,
        optimizer_state=None if args.no_save_optim else optimizer.state_dict(),
        rng=not args.no_save_rng,
    )
    print_rank_0(f"saved checkpoint at iteration {state.iteration} to {args.save}")
    if args.keep_last_checkpoints and mpu.is_rank_0():
        removed = remove_old_checkpoints(args.save, args.keep_last_checkpoints)
        if removed:
            print(f"removed {len(removed)} older checkpoint(s) (--keep-last-checkpoints "
                  f"{args.keep_last_checkpoints}): {', '.join(os.path.basename(p) for p in removed)}", flush=True)
    return path


def _load_schedule(args, saved: dict[str, Any] | None, scheduler: AnnealingLR, iteration: int) -> None:
    """Continue the lr schedule at ``iteration``. Its shape always comes from the flags (a user who
    changes them on resume means it); one line says when they differ from the checkpoint's, or when
    the checkpoint's state is not used (``--no-load-optim``, or saved with ``--no-save-optim``)."""
    if saved is None or args.no_load_optim:
        why = "--no-load-optim" if args.no_load_optim else "the checkpoint holds no lr-scheduler state"
        print_rank_0(f"note: {why}; the lr schedule follows the flags from iteration {iteration}")
        scheduler.load_state_dict({"num_iters": iteration})
        return
    current = scheduler.state_dict()
    shape = ("start_lr", "min_lr", "warmup_iter", "end_iter", "decay_style")
    changed = [f"{key} {saved[key]} -> {current[key]}" for key in shape if key in saved and saved[key] != current[key]]
    if changed:
        print_rank_0(f"note: the lr schedule differs from the checkpoint's ({', '.join(changed)}); using the flags'")
    scheduler.load_state_dict(saved)


def load(args, ckpt: dict[str, Any] | None, model: nn.Module, optimizer, scheduler: AnnealingLR,
         where: str | None = None) -> TrainState:
    """Restore the state read from ``where`` (default ``--load``; ``read_start_state`` says which); a
    fresh ``TrainState`` when it holds no checkpoint yet."""
    where = where or args.load
    if ckpt is None:
        print_rank_0(f"no checkpoint found in {where}; starting from scratch")
        return TrainState()
    check_config(where, ckpt.get("config", {}), _model_config(model), SHAPE_FIELDS)
    check_virtual_stages(where, ckpt)
    unwrap_model(model).load_state_dict(ckpt["model"])
    optimizer.reload_model_params()  # fp32 masters follow the loaded weights unless the optimizer state replaces them
    saved_seed = ckpt.get("args", {}).get("seed")
    if saved_seed is not None and saved_seed != args.seed:
        print_rank_0(f"warning: {where} was trained with --seed {saved_seed}, this run uses --seed {args.seed}; "
                     "the train/valid/test split of --train-data changes with the seed")
    release = ckpt["iteration"] == "release"
    if args.finetune or release:
        print_rank_0(f"loaded model weights from {where} (iteration reset to 0)")
        return TrainState()
    if not args.no_load_optim and "optimizer" in ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
    iteration = int(ckpt["iteration"])
    _load_schedule(args, ckpt.get("lr_scheduler"), scheduler, iteration)
    if not args.no_load_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    position = ckpt.get("data", {}).get("consumed_samples")
    if args.resume_dataloader and position is None:
        print_rank_0(f"note: {args.load} holds no data-loader position; data starts from the first sample")
    # Checkpoints from before the global batch was stored trained iteration x one constant batch.
    trained = ckpt.get("consumed_samples", iteration * ckpt.get("args", {}).get("global_batch_size", 0)
                       if position is None else position)
    state = TrainState(
        iteration=iteration,
        consumed_samples=int(trained),
        data_samples=int(position) if args.resume_dataloader and position is not None else 0,
        skipped_iters=int(ckpt.get("skipped_iters", 0)),
    )
    print_rank_0(f"loaded checkpoint from {args.load} at iteration {state.iteration}")
    return state
