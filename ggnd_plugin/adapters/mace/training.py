"""``ggnd-mace-train``: MACE's own ``mace_run_train`` with a GGND block in the model.

Every ``mace_run_train`` option works as before (including ``--config run.yaml``, whose YAML may also
hold the ``ggnd_*`` keys). Added options:

``--ggnd``                    wrap the model MACE builds (from scratch or from ``--foundation_model``)
                              with a GGND block
``--ggnd_config FILE.yaml``   GGND options from a file (implies ``--ggnd``)
``--ggnd_<option> VALUE``     any :class:`~ggnd_plugin.block.GGNDConfig` option, e.g. ``--ggnd_channels 16
                              --ggnd_lmax 1 --ggnd_heads 4 --ggnd_steps 3 --ggnd_horizon 1.0
                              --ggnd_variant diffusion --ggnd_r_g 10.0`` (``none`` for no value)
``--ggnd_lr_factor F``        learning rate of the GGND parameters relative to ``--lr`` (default 1)
``--overwrite``               replace an existing ``<name>.model`` (without it, and without
                              ``--restart_latest``, an existing model is refused, and a model path
                              equal to an input always is)

MACE's own files (checkpoints, ``.model``) are written atomically during the run (a temporary file
renamed into place), so a killed run never leaves a truncated checkpoint for ``--restart_latest``.

The result is MACE's usual ``<name>.model`` (a pickled :class:`~ggnd_plugin.adapters.mace.wrapper.GGNDMACE`),
which ``MACECalculator``, TorchSim's ``MaceModel`` and ``ggnd`` load. MACE's TorchScript export
(``<name>_compiled.model``) is skipped by MACE itself for such a model: the GGND block is not scriptable.

The patch (:func:`ggnd_training_patch`): ``mace_run_train`` has no extension point. Its model types and
``_build_model`` are hard-coded, and ``get_params_options`` builds the optimizer groups from MACE's named
submodules only, so any added module would silently stay at its initial weights. For the duration of one
run this module replaces exactly two names in ``mace.cli.run_train``:

* ``configure_model``: calls MACE's own, then wraps the model with GGND (fusion readout at zero);
* ``get_params_options``: calls MACE's own, then adds a ``ggnd`` group and checks that every GGND
  parameter is in exactly one group.

:func:`check_patch_targets` fails loudly when a MACE release moves or renames either; the tests call it.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any

from ggnd_plugin.adapters.host_trainer import FitRequest, HostTrainer
from ggnd_plugin.adapters.mace.wrapper import GGNDMACE, attach_ggnd
from ggnd_plugin.block import CURRENT_VERSION, GGNDConfig
from ggnd_plugin.errors import GGNDError

PREFIX = "ggnd_"
SUPPORTED_MODELS = ("MACE", "ScaleShiftMACE")
# (function name in mace.cli.run_train, parameters it must still take): what the patch relies on.
PATCH_TARGETS = {
    "configure_model": (
        "args",
        "train_loader",
        "atomic_energies",
        "model_foundation",
        "heads",
        "z_table",
        "head_configs",
    ),
    "get_params_options": ("args", "model"),
}

HELP = {
    "channels": "channels per degree of the diffusion state",
    "lmax": "highest degree of the diffusion state (0-3)",
    "heads": "attention heads (must divide channels)",
    "steps": "solver steps K from t=0 to the horizon",
    "horizon": "diffusion stopping time T",
    "solver": "euler or rk4",
    "variant": "diffusion (GGND), local (diffusion within the MACE cutoff) or mp (one all-pairs MP layer)",
    "r_g": "global pair radius in Å; none: every pair (molecules only)",
    "chunk_size": "evaluate pairs in blocks of this many atoms (linear memory); none: all at once",
}


# --------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------
def _optional(kind):
    def parse(text: str):
        return None if str(text).lower() in ("none", "null", "") else kind(text)

    parse.__name__ = f"{kind.__name__} or none"
    return parse


def _boolean(text: str) -> bool:
    value = str(text).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parser_type(annotation) -> Any:
    """The argparse type for a GGNDConfig field: int, float, str, bool, or one of them or None."""
    arguments = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    kind = arguments[0] if optional and arguments else annotation
    kind = {bool: _boolean}.get(kind, kind)
    if kind not in (int, float, str, _boolean):
        kind = str
    return _optional(kind) if optional else kind


def add_ggnd_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("GGND (ggnd-plugin)")
    group.add_argument("--ggnd", action="store_true", help="add a GGND block to the model")
    group.add_argument(
        "--ggnd_config", type=str, default=None, help="YAML file of GGND options (implies --ggnd)"
    )
    group.add_argument(
        "--ggnd_lr_factor",
        type=float,
        default=1.0,
        help="learning rate of the GGND parameters relative to --lr",
    )
    hints = typing.get_type_hints(GGNDConfig)
    for field in fields(GGNDConfig):
        group.add_argument(
            f"--{PREFIX}{field.name}",
            type=_parser_type(hints[field.name]),
            default=None,
            help=f"{HELP.get(field.name, 'GGNDConfig.' + field.name)} (default: {field.default})",
        )


def split_ggnd_arguments(args: argparse.Namespace) -> tuple[argparse.Namespace, GGNDConfig | None, float]:
    """MACE's namespace without the GGND options, the GGND config (None: no GGND), the lr factor."""
    values = vars(args)
    enabled = bool(values.pop("ggnd", False))
    config_file = values.pop(f"{PREFIX}config", None)
    lr_factor = values.pop(f"{PREFIX}lr_factor", 1.0)
    explicit = {}
    for field in fields(GGNDConfig):
        value = values.pop(f"{PREFIX}{field.name}", None)
        if value is not None:
            explicit[field.name] = value
    if config_file is None and not enabled:
        if explicit:
            raise GGNDError(
                f"GGND options {sorted('--' + PREFIX + name for name in explicit)} were given without --ggnd"
            )
        return args, None, lr_factor
    base: dict[str, Any] = {}
    if config_file is not None:
        if not Path(config_file).exists():
            raise GGNDError(f"--ggnd_config {config_file}: no such file")
        try:
            base = GGNDConfig.from_file(config_file).to_dict()
        except ValueError as error:
            raise GGNDError(str(error)) from error
    try:
        # Options from the command line describe a new model: the current numerics unless --ggnd_version
        # says otherwise (a --ggnd_config file without a version is version 1, see GGNDConfig).
        config = GGNDConfig.from_dict({"version": CURRENT_VERSION, **base, **explicit})
    except ValueError as error:
        raise GGNDError(str(error)) from error
    return args, config, lr_factor


# --------------------------------------------------------------------------------------------------
# The patch of mace_run_train
# --------------------------------------------------------------------------------------------------
def check_patch_targets() -> None:
    """Raise GGNDError unless ``mace.cli.run_train`` still has what :func:`ggnd_training_patch` replaces."""
    from mace import __version__ as version
    from mace.cli import run_train

    for name, expected in PATCH_TARGETS.items():
        function = getattr(run_train, name, None)
        if not callable(function):
            raise GGNDError(
                f"mace-torch {version}: mace.cli.run_train no longer uses '{name}'; ggnd-mace-train was "
                "written for mace-torch 0.3.16 and cannot add the GGND block to this version"
            )
        parameters = tuple(inspect.signature(function).parameters)
        if parameters[: len(expected)] != expected:
            raise GGNDError(
                f"mace-torch {version}: mace.cli.run_train.{name} now takes {parameters}, expected "
                f"{expected}; ggnd-mace-train was written for mace-torch 0.3.16"
            )
    source = inspect.getsource(run_train.run)
    for name in PATCH_TARGETS:
        if f"{name}(" not in source:
            raise GGNDError(f"mace-torch {version}: mace.cli.run_train.run no longer calls {name}()")


def ggnd_param_group(args, model, lr_factor: float) -> dict[str, Any]:
    if not isinstance(model, GGNDMACE):
        raise GGNDError(f"expected a MACE model with GGND, got {type(model).__name__}")
    return {
        "name": "ggnd",
        "params": [p for p in model.ggnd.parameters() if p.requires_grad],
        "weight_decay": 0.0,
        "lr": lr_factor * args.lr,
    }


def with_ggnd_group(options: dict[str, Any], args, model, lr_factor: float) -> dict[str, Any]:
    """MACE's optimizer options plus the GGND group, checked: every GGND parameter in exactly one group."""
    groups = [dict(group, params=list(group["params"])) for group in options["params"]]
    groups.append(ggnd_param_group(args, model, lr_factor))
    counts: dict[int, int] = {}
    for group in groups:
        for parameter in group["params"]:
            counts[id(parameter)] = counts.get(id(parameter), 0) + 1
    missing = [name for name, p in model.ggnd.named_parameters() if counts.get(id(p), 0) != 1]
    if missing:
        raise GGNDError(f"GGND parameters {missing} are not in exactly one optimizer group")
    return dict(options, params=groups)


@contextmanager
def ggnd_training_patch(config: GGNDConfig, lr_factor: float = 1.0) -> Iterator[None]:
    """Within this context, ``mace.cli.run_train.run`` builds and trains a model with GGND.

    See the module docstring for what is replaced and why; both names are restored on exit.
    """
    from mace.cli import run_train

    check_patch_targets()
    original_configure = run_train.configure_model
    original_params = run_train.get_params_options

    def configure_model(args, *rest, **kwargs):
        model, output_args = original_configure(args, *rest, **kwargs)
        if type(model).__name__ not in SUPPORTED_MODELS:
            raise GGNDError(
                f"--ggnd adds an energy term: it needs an energy model (--model MACE), got {type(model).__name__}"
            )
        upgraded = attach_ggnd(model, config)
        logging.info("GGND block added: %s", upgraded.ggnd.extra_repr())
        logging.info(
            "GGND parameters: %d (MACE: %d)",
            sum(p.numel() for p in upgraded.ggnd.parameters()),
            sum(p.numel() for p in model.parameters()),
        )
        return upgraded, output_args

    def get_params_options(args, model):
        return with_ggnd_group(original_params(args, model), args, model, lr_factor)

    run_train.configure_model = configure_model
    run_train.get_params_options = get_params_options
    try:
        yield
    finally:
        run_train.configure_model = original_configure
        run_train.get_params_options = original_params


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from mace import tools

    parser = tools.build_default_arg_parser()
    parser.prog = "ggnd-mace-train"
    parser.description = "mace_run_train with an optional GGND block (--ggnd, --ggnd_* options)."
    add_ggnd_arguments(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing <name>.model (ggnd-plugin; otherwise refused unless --restart_latest)",
    )
    return parser


def check_model_output(
    args: argparse.Namespace, overwrite: bool, parser: argparse.ArgumentParser | None = None
) -> Path:
    """The ``.model`` file this run writes: refused when it is an input, or exists (unless resuming or
    ``--overwrite``)."""
    from ggnd_plugin.errors import OutputExistsError
    from ggnd_plugin.safe_io import refuse_input_as_output

    values = dict(vars(args))
    if values.get("config"):
        import yaml

        try:
            from_file = yaml.safe_load(Path(values["config"]).read_text()) or {}
        except (OSError, yaml.YAMLError) as error:
            raise GGNDError(f"--config {values['config']}: cannot be read ({error})") from error
        if isinstance(from_file, dict):  # the file fills what the command line left at its default
            for key in ("name", "work_dir", "model_dir"):
                default = parser.get_default(key) if parser is not None else None
                if key in from_file and values.get(key) in (None, default):
                    values[key] = from_file[key]
    folder = Path(values.get("model_dir") or values.get("work_dir") or ".")
    model = folder / f"{values.get('name')}.model"
    inputs = [
        (f"--{key}", values.get(key))
        for key in ("train_file", "valid_file", "test_file", "foundation_model", "config", "ggnd_config")
        if isinstance(values.get(key), str)
    ]
    refuse_input_as_output(model, inputs, "the model file")
    if model.exists() and not overwrite and not values.get("restart_latest"):
        raise OutputExistsError(
            f"{model} already exists; pass --overwrite to replace it (or --restart_latest to continue "
            "the run that wrote it)"
        )
    return model


def main(argv: Sequence[str] | None = None) -> int:
    from mace.cli import run_train

    from ggnd_plugin.safe_io import atomic_torch_saves

    parser = build_parser()
    args = parser.parse_args(argv)
    overwrite = bool(vars(args).pop("overwrite", False))
    try:
        check_model_output(args, overwrite, parser)
        args, config, lr_factor = split_ggnd_arguments(args)
        if config is None:
            with atomic_torch_saves():
                run_train.run(args)
            return 0
        if args.model not in SUPPORTED_MODELS:
            raise GGNDError(f"--ggnd needs an energy model: --model {' or '.join(SUPPORTED_MODELS)}")
        with ggnd_training_patch(config, lr_factor), atomic_torch_saves():
            run_train.run(args)
    except GGNDError as error:
        print(f"ggnd-mace-train: error: {error}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------------
# MACEAdapter.fit: the same command in a subprocess (MACE's run sets process-wide dtype and logging)
# --------------------------------------------------------------------------------------------------
SIZES = {
    "tiny": {
        "hidden_irreps": "8x0e+8x1o",
        "r_max": 4.0,
        "num_interactions": 2,
        "max_L": 1,
        "correlation": 2,
        "MLP_irreps": "8x0e",
        "batch_size": 4,
    },
    "small": {
        "hidden_irreps": "16x0e+16x1o",
        "r_max": 5.0,
        "num_interactions": 2,
        "max_L": 1,
        "correlation": 2,
        "MLP_irreps": "16x0e",
        "batch_size": 5,
    },
    "medium": {
        "hidden_irreps": "32x0e+32x1o",
        "r_max": 5.0,
        "num_interactions": 2,
        "max_L": 1,
        "correlation": 3,
        "MLP_irreps": "16x0e",
        "batch_size": 5,
    },
}


def check_size(size: str) -> None:
    if size not in SIZES:
        raise GGNDError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")


def model_name(config: GGNDConfig | None) -> str:
    """The ``--name`` of a fit: the model file is ``<name>.model``."""
    return "mace-ggnd" if config is not None else "mace"


def fit_command(request: FitRequest) -> tuple[list[str], Path]:
    """The ggnd-mace-train command line that :meth:`MACEAdapter.fit` runs, and the model it writes.

    ``request.patience``: MACE's early stopping (``--patience``) on the validation loss, with its plateau
    scheduler halving the learning rate after ``max(2, patience // 3)`` epochs without improvement.
    """
    check_size(request.size)
    work_dir, config, patience = Path(request.work_dir), request.config, request.patience
    name = model_name(config)
    options = {
        "name": name,
        "seed": request.seed,
        "train_file": str(request.train),
        "valid_file": str(request.valid),
        "work_dir": str(work_dir),
        "model": "MACE",
        "max_num_epochs": request.epochs,
        "energy_key": "energy",
        "forces_key": "forces",
        "E0s": "average",
        "default_dtype": "float64",
        "device": request.device,
        "lr": 0.01,
        # MACE's defaults weigh forces 100 : energy 1, meant for long fits ending in its stage two
        # (energy weight 1000). Stage two (SWA) crashed for the "small" size here (torch 2.13: a
        # buffer-size mismatch in AveragedModel.update_parameters; "medium" ran), so short fits weigh
        # energy 10 instead: without it a 25-epoch fit left a 130 meV/atom energy offset.
        "energy_weight": 10.0,
        "forces_weight": 100.0,
        "scaling": "rms_forces_scaling",
        "error_table": "PerAtomRMSE",
        **SIZES[request.size],
    }
    if patience is not None:
        options.update(patience=patience, scheduler_patience=max(2, patience // 3), lr_factor=0.5)
    command = [sys.executable, "-m", "ggnd_plugin.adapters.mace.training"]
    for key, value in options.items():
        command += [f"--{key}", str(value)]
    model_path = work_dir / f"{name}.model"
    if config is not None:
        command.append("--ggnd")
        for key, value in config.to_dict().items():
            command += [f"--{PREFIX}{key}", "none" if value is None else str(value)]
    return command, model_path


FIT_LOG = "ggnd-mace-train.log"
# MACE logs one "Epoch N: ... loss=..." line per validation; those lines drive fit()'s progress bar, so a
# long fit shows where it is without flooding the terminal with MACE's own log.
TRAINER = HostTrainer(
    name="ggnd-mace-train", log_name=FIT_LOG, epoch_line=r"Epoch (\d+):.*?loss=\s*(?P<loss>[0-9.eE+-]+)"
)


def fit_outputs(name: str) -> list[str]:
    """What a ``ggnd-mace-train`` run named ``name`` writes in its work folder (patterns)."""
    return [
        f"{name}.model",
        f"{name}_compiled.model",
        f"{name}_stagetwo*.model",
        f"checkpoints/{name}_run-*",
        f"logs/{name}_run-*",
        f"results/{name}_run-*",
        FIT_LOG,
    ]


def run_fit(command: list[str], work_dir: Path, epochs: int | None = None, label: str = "mace") -> None:
    """Run the training command, its output going to ``work_dir/ggnd-mace-train.log`` and its epochs
    to a progress bar (:data:`TRAINER`)."""
    TRAINER.run(command, Path(work_dir), epochs, label=label)


if __name__ == "__main__":
    sys.exit(main())
