"""`ggnd config HOST` prints a training config that the host's own tools read, with a version-2 block;
`ggnd env overrides` prints the override that puts all hosts into one environment."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement

from ggnd_plugin.cli import main
from ggnd_plugin.registry import starter_config_names

needs = {
    name: pytest.mark.skipif(importlib.util.find_spec(name) is None, reason=f"{name} not installed")
    for name in ("mace", "nequip", "schnetpack")
}


def printed(capsys, *argv: str) -> str:
    assert main(list(argv)) == 0
    return capsys.readouterr().out


def ggnd_options(name: str, config: dict) -> dict:
    """The GGND options block of each starter config."""
    if name == "mace":
        return {
            k.removeprefix("ggnd_"): v
            for k, v in config.items()
            if k.startswith("ggnd_") and k != "ggnd_lr_factor"
        }
    if name == "schnetpack":
        return config["globals"]["ggnd"]
    return config["training_module"]["model"]["ggnd"]


@pytest.mark.parametrize("name", starter_config_names())
def test_each_config_is_yaml_with_a_version_2_block(name, capsys):
    from ggnd_plugin.block import GGNDConfig

    config = yaml.safe_load(printed(capsys, "config", name))
    options = ggnd_options(name, config)
    assert options["version"] == 2
    if name == "mace":
        options = {k: (None if v == "none" else v) for k, v in options.items()}
    block_config = GGNDConfig.from_dict(options)
    assert block_config.version == 2


def test_env_overrides_admits_what_nequip_needs_and_excludes_maces_pin(capsys):
    lines = [
        line for line in printed(capsys, "env", "overrides").splitlines() if line and not line.startswith("#")
    ]
    overrides = {Requirement(line).name: Requirement(line) for line in lines}
    assert set(overrides) == {"e3nn"}
    e3nn = overrides["e3nn"].specifier
    assert not e3nn.contains("0.4.4")  # mace-torch's pin, overridden
    assert e3nn.contains(importlib.metadata.version("e3nn"))  # what this environment runs all hosts with


def compose(config_dir: Path, config_name: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return hydra_compose(config_name=config_name, overrides=overrides)


@needs["nequip"]
def test_nequip_config_builds_a_ggnd_model(tmp_path, capsys):
    from omegaconf import OmegaConf

    from ggnd_plugin.adapters.nequip import NequIPAdapter

    (tmp_path / "ggnd_nequip.yaml").write_text(printed(capsys, "config", "nequip"))
    config = compose(tmp_path, "ggnd_nequip", [])
    missing = {
        key for key in ("train_file", "val_file", "model_type_names") if OmegaConf.is_missing(config, key)
    }
    assert missing == {"train_file", "val_file", "model_type_names"}  # the placeholders to fill in

    config = compose(
        tmp_path,
        "ggnd_nequip",
        [
            "train_file=train.xyz",
            "val_file=valid.xyz",
            "model_type_names=[C,H,N,O]",
            # what nequip-train computes from the training data
            "training_module.model.avg_num_neighbors=8.0",
            "training_module.model.per_type_energy_shifts=-500.0",
            "training_module.model.per_type_energy_scales=0.5",
            # a small model for the test; the structure is the config's
            "training_module.model.num_layers=2",
            "training_module.model.num_features=8",
        ],
    )
    model_config = OmegaConf.to_container(config.training_module.model, resolve=True)
    builder = model_config.pop("_target_")
    assert builder == "ggnd_plugin.adapters.nequip.GGNDNequIPModel"
    from nequip.utils.global_state import set_global_state

    from ggnd_plugin.adapters.nequip import GGNDNequIPModel

    set_global_state()
    model = GGNDNequIPModel(**model_config)
    blocks = NequIPAdapter().ggnd_blocks(model)
    assert len(blocks) == 1 and blocks[0].config.version == 2 and blocks[0].config.channels == 16


@needs["nequip"]
def test_nequip_finetune_config_names_a_fitted_model(tmp_path, capsys):
    from omegaconf import OmegaConf

    (tmp_path / "ggnd_finetune.yaml").write_text(printed(capsys, "config", "nequip-finetune"))
    config = compose(tmp_path, "ggnd_finetune", ["checkpoint=/runs/best.ckpt"])
    model = OmegaConf.to_container(config.training_module.model, resolve=True)
    assert model["_target_"] == "ggnd_plugin.adapters.nequip.GGNDUpgrade"
    assert model["model"] == {
        "_target_": "nequip.model.ModelFromCheckpoint",
        "checkpoint_path": "/runs/best.ckpt",
    }


@needs["schnetpack"]
def test_schnetpack_experiment_builds_painn_with_ggnd(tmp_path, capsys):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.utils import instantiate

    from ggnd_plugin.adapters.schnetpack.output_module import GGNDEnergy

    experiments = tmp_path / "configs" / "experiment"
    experiments.mkdir(parents=True)
    (experiments / "ggnd_painn.yaml").write_text(printed(capsys, "config", "schnetpack"))
    # spktrain's own primary config, with the printed file where the header says to put it
    with initialize_config_module(config_module="schnetpack.configs", version_base="1.2"):
        config = hydra_compose(
            config_name="train",
            overrides=[
                f"hydra.searchpath=[file://{tmp_path / 'configs'}]",
                "experiment=ggnd_painn",
                "data.datapath=/data/train.db",
                "globals.ggnd_atomic_numbers=[1,6,7,8]",
                "model.representation.n_atom_basis=8",
                "model.representation.n_interactions=1",
            ],
        )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as spktrain runs; SchNetPack's GaussianRBF builds FloatTensors
    try:
        model = instantiate(config.model)
    finally:
        torch.set_default_dtype(previous)
    ggnd = [module for module in model.output_modules if isinstance(module, GGNDEnergy)]
    assert len(ggnd) == 1
    assert ggnd[0].block.config.version == 2
    kinds = [type(module).__name__ for module in model.output_modules]
    assert kinds == ["Atomwise", "GGNDEnergy", "Forces"]


@needs["mace"]
def test_mace_config_parses_with_ggnd_mace_train(tmp_path, capsys):
    from ggnd_plugin.adapters.mace.training import build_parser, split_ggnd_arguments

    path = tmp_path / "ggnd_mace.yaml"
    path.write_text(printed(capsys, "config", "mace"))
    args = build_parser().parse_args(["--config", str(path), "--train_file", "mine.xyz"])
    assert args.train_file == "mine.xyz" and args.model == "MACE" and args.name == "mace_ggnd"
    mace_args, config, lr_factor = split_ggnd_arguments(args)
    assert config is not None and config.version == 2 and config.channels == 16 and config.r_g is None
    assert lr_factor == 1.0
    assert not any(key.startswith("ggnd") for key in vars(mace_args))
