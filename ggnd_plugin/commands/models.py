"""``ggnd upgrade``, ``ggnd finetune`` and ``ggnd evaluate``: the same three verbs for every host."""

from __future__ import annotations

import json
from pathlib import Path

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError

HOST_HELP = "host package of MODEL: auto (detect from the file) or an adapter name (see `ggnd adapters`)"


def register(subparsers) -> None:
    upgrade = subparsers.add_parser(
        "upgrade",
        help="attach a GGND block to a fitted model (predictions unchanged until trained)",
        description="Load a fitted model, attach a GGND block whose fusion readout starts at zero, and "
        "save it in the host's own format. OUTPUT must not exist (--overwrite replaces it) and is never "
        "MODEL itself.",
    )
    upgrade.add_argument("model", type=v.MODEL_FILE, help="fitted model file")
    upgrade.add_argument(
        "-o", "--output", type=v.OUTPUT_FILE, required=True, help="where to write the upgraded model"
    )
    upgrade.add_argument("--host", default="auto", type=v.HOST, help=HOST_HELP)
    upgrade.add_argument("--config", type=v.YAML_FILE, help="YAML file of GGND options (see docs/block.md)")
    upgrade.add_argument("--seed", type=v.SEED, default=0, help="seed for the block's initial weights")
    upgrade.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    upgrade.set_defaults(handler=run_upgrade)
    v.one_line_errors(upgrade)

    finetune = subparsers.add_parser(
        "finetune",
        help="train a model (with GGND) on energies and forces",
        description="Energy + force loss, the model's own E0s, a checkpoint every epoch (--resume continues "
        "a stopped run to the same result). A model without GGND gets a block attached first (options from "
        "--config), unless --no-ggnd: then the same training runs on the plain model (the control of an "
        "upgrade). OUTPUT must not exist unless --resume (its own run) or --overwrite, and is never one "
        "of the inputs.",
    )
    finetune.add_argument("model", type=v.MODEL_FILE)
    finetune.add_argument(
        "--train", type=v.STRUCTURE_FILE, required=True, help="extxyz with energy and forces"
    )
    finetune.add_argument("--valid", type=v.STRUCTURE_FILE, help="extxyz for validation (best model is kept)")
    finetune.add_argument("-o", "--output", type=v.OUTPUT_FILE, required=True)
    finetune.add_argument("--host", default="auto", type=v.HOST, help=HOST_HELP)
    finetune.add_argument(
        "--config", type=v.YAML_FILE, help="GGND options, used when MODEL has no GGND block yet"
    )
    finetune.add_argument("--epochs", type=v.POSITIVE_INT, default=10)
    finetune.add_argument("--lr", type=v.POSITIVE_FLOAT, default=1e-3)
    finetune.add_argument("--batch-size", type=v.POSITIVE_INT, default=4)
    finetune.add_argument("--energy-weight", type=v.NON_NEGATIVE_FLOAT, default=1.0)
    finetune.add_argument("--forces-weight", type=v.NON_NEGATIVE_FLOAT, default=10.0)
    finetune.add_argument("--freeze-host", action="store_true", help="train only the GGND block")
    finetune.add_argument(
        "--no-ggnd",
        action="store_true",
        help="train the plain model without attaching a block (the control arm of an upgrade)",
    )
    finetune.add_argument(
        "--patience",
        type=v.POSITIVE_INT,
        help="stop when the monitored validation error has not improved for this many epochs (at most "
        "--epochs); needs --valid",
    )
    finetune.add_argument(
        "--monitor",
        choices=("loss", "forces"),
        default="loss",
        help="what the kept model and --patience follow: the loss on --valid (default) or its force MAE",
    )
    finetune.add_argument("--seed", type=v.SEED, default=0)
    finetune.add_argument(
        "--resume",
        action="store_true",
        help="continue the run stopped at OUTPUT (from OUTPUT.checkpoint.pt; starts it when nothing was written)",
    )
    finetune.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT and its checkpoint, starting again"
    )
    finetune.set_defaults(handler=run_finetune)
    v.one_line_errors(finetune)

    evaluate = subparsers.add_parser("evaluate", help="energy and force errors of a model on labelled data")
    evaluate.add_argument("model", type=v.MODEL_FILE)
    evaluate.add_argument(
        "--data", type=v.STRUCTURE_FILE, required=True, help="extxyz with energy and forces"
    )
    evaluate.add_argument("--host", default="auto", type=v.HOST, help=HOST_HELP)
    evaluate.add_argument("--json", type=v.OUTPUT_FILE, help="also write the metrics here")
    evaluate.add_argument("--batch-size", type=v.POSITIVE_INT, default=8)
    evaluate.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    evaluate.set_defaults(handler=run_evaluate)
    v.one_line_errors(evaluate)


def _load(args):
    from ggnd_plugin.registry import resolve

    adapter = resolve(args.host, args.model)
    if not args.model.exists():
        raise GGNDError(f"{args.model}: no such file")
    try:
        model = adapter.load(args.model)
    except GGNDError:
        raise
    except Exception as error:
        raise GGNDError(
            f"{args.model}: cannot be loaded as a {adapter.name} model ({type(error).__name__}: {error})"
        ) from error
    return adapter, model


def _config(path: Path | None):
    from ggnd_plugin.block import GGNDConfig

    if path is None:
        return GGNDConfig()
    if not path.exists():
        raise GGNDError(f"{path}: no such file")
    try:
        return GGNDConfig.from_file(path)
    except ValueError as error:
        raise GGNDError(str(error)) from error


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def run_upgrade(args) -> int:
    import torch

    from ggnd_plugin.safe_io import check_output_file, output_lock, save_model

    inputs = [("MODEL", args.model), ("--config", args.config)]
    check_output_file(args.output, what="--output", overwrite=args.overwrite, inputs=inputs)
    adapter, model = _load(args)
    if adapter.ggnd_blocks(model):
        raise GGNDError(f"{args.model}: already has a GGND block; use `ggnd finetune` to train it")
    config = _config(args.config)
    torch.manual_seed(args.seed)
    upgraded = adapter.attach(model, config)
    with output_lock(args.output, folder=False):
        check_output_file(args.output, what="--output", overwrite=args.overwrite, inputs=inputs)
        path = save_model(adapter, upgraded, args.output)
    ggnd = _count(adapter.ggnd_parameters(upgraded))
    print(
        f"upgraded {args.model} ({adapter.name}, {_count(model.parameters()):,} parameters) with a GGND block "
        f"({ggnd:,} parameters, fusion readout at zero: predictions unchanged) -> {path}"
    )
    return 0


def _labelled(path: Path, adapter, model):
    from ggnd_plugin.data import read_labelled

    frames = read_labelled(path)
    adapter.check_structures(model, frames, str(path))
    return frames


def run_finetune(args) -> int:
    import torch

    from ggnd_plugin import distributed
    from ggnd_plugin.training import FinetuneSettings, check_finetune_output, finetune

    inputs = [
        ("MODEL", args.model),
        ("--train", args.train),
        ("--valid", args.valid),
        ("--config", args.config),
    ]
    if (args.patience is not None or args.monitor == "forces") and args.valid is None:
        raise GGNDError("--patience and --monitor forces follow the validation set: give --valid")
    # Under torchrun: data-parallel training (DDP, gloo on the CPU; docs/scale.md). Rank 0 owns OUTPUT.
    ranks = distributed.from_environment(torch.device("cpu"), stop_on_sigterm=False)
    try:

        def check():
            check_finetune_output(args.output, inputs, resume=args.resume, overwrite=args.overwrite)

        if ranks is None:
            check()
        else:
            ranks.agree(check)
        adapter, model = _load(args)
        train = _labelled(args.train, adapter, model)
        valid = _labelled(args.valid, adapter, model) if args.valid else None
        main = ranks is None or ranks.is_main
        if args.no_ggnd:
            if adapter.ggnd_blocks(model):
                raise GGNDError(f"--no-ggnd: {args.model} already has a GGND block; give the plain model")
            if args.config is not None:
                raise GGNDError("--no-ggnd attaches no block, so --config (GGND options) has nothing to set")
        elif not adapter.ggnd_blocks(model):
            if main:
                print(
                    f"{args.model} has no GGND block: attaching one (fusion readout at zero) before training"
                )
            torch.manual_seed(args.seed)  # the block's initial weights are part of the run's result
            model = adapter.attach(model, _config(args.config))
        settings = FinetuneSettings(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            energy_weight=args.energy_weight,
            forces_weight=args.forces_weight,
            freeze_host=args.freeze_host,
            seed=args.seed,
            patience=args.patience,
            monitor=args.monitor,
        )
        result = finetune(
            adapter,
            model,
            train,
            valid,
            args.output,
            settings,
            resume=args.resume,
            overwrite=args.overwrite,
            inputs=inputs,
            ranks=ranks,
        )
    finally:
        if ranks is not None:
            ranks.close()
    if not main:
        return 0
    last = result.history[-1] if result.history else None
    where = (
        f" on {ranks.world_size} DDP ranks (parameters identical on every rank)" if ranks is not None else ""
    )
    epochs = len(result.history)
    stop = (
        f", stopped: no improvement for {settings.patience} epochs"
        if result.stopped_early
        else (" (the --epochs cap)" if settings.patience is not None else "")
    )
    print(
        f"trained {result.trained_parameters:,} parameters ({result.frozen_parameters:,} frozen) on "
        f"{len(train)} frames for {epochs} epochs{stop}{where}; kept epoch {result.best_epoch} -> {args.output}"
    )
    if last is not None:
        print(
            f"last epoch: train loss {last.train_loss:.4g}"
            + (f", valid loss {last.valid_loss:.4g}" if last.valid_loss is not None else "")
        )
    return 0


def run_evaluate(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ggnd_plugin.safe_io import atomic_write_text, check_output_file
    from ggnd_plugin.training import evaluate

    inputs = [("MODEL", args.model), ("--data", args.data)]
    if args.json:
        check_output_file(args.json, what="--json", overwrite=args.overwrite, inputs=inputs)
    adapter, model = _load(args)
    frames = _labelled(args.data, adapter, model)
    model.eval()
    metrics = evaluate(adapter, model, frames, args.batch_size)
    table = Table(title=f"{args.model.name} on {args.data.name} ({metrics['n_frames']} frames)")
    table.add_column("quantity")
    table.add_column("MAE", justify="right")
    table.add_column("RMSE", justify="right")
    table.add_row("energy (meV)", f"{metrics['energy_mae'] * 1e3:.2f}", f"{metrics['energy_rmse'] * 1e3:.2f}")
    table.add_row(
        "energy per atom (meV/atom)",
        f"{metrics['energy_per_atom_mae'] * 1e3:.3f}",
        f"{metrics['energy_per_atom_rmse'] * 1e3:.3f}",
    )
    table.add_row(
        "forces (meV/Å)", f"{metrics['forces_mae'] * 1e3:.2f}", f"{metrics['forces_rmse'] * 1e3:.2f}"
    )
    Console().print(table)
    if args.json:
        atomic_write_text(
            args.json, json.dumps({"model": str(args.model), "data": str(args.data), **metrics}, indent=2)
        )
    return 0
