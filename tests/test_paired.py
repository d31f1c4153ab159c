"""The paired, model-level comparison (ggnd_plugin.md.paired, ``ggnd compare``) and the control arm of
an upgrade (``ggnd finetune --no-ggnd``, ``--patience``), against hand-worked values, scipy and
brute-force enumeration."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ggnd_plugin.cli import main
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md.paired import (
    cochran_mantel_haenszel,
    paired_comparison,
    sign_flip_test,
    wilcoxon_signed_rank,
)
from ggnd_plugin.md.survival import restricted_mean

DATA = Path(__file__).resolve().parents[1] / "ggnd_plugin" / "default_data" / "3bpa" / "3bpa_300K_train.xyz"
THIRDPARTY = Path(__file__).parent / "thirdparty"


def brute_force_sign_flip(d):
    observed = abs(sum(d))
    count = sum(
        abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= observed - 1e-12
        for signs in itertools.product((1, -1), repeat=len(d))
    )
    return count / 2 ** len(d)


def test_sign_flip_hand_worked_values():
    # Three agreeing differences: only "all +" and "all -" reach |0.6|: 2 of 8.
    assert sign_flip_test([0.1, 0.2, 0.3])["p_value"] == pytest.approx(0.25)
    # Six agreeing differences: 2 of 64 = 0.03125, the only way six base models reach p < 0.05.
    six = sign_flip_test([0.05, 0.1, 0.2, 0.3, 0.4, 0.5])
    assert six["p_value"] == pytest.approx(2 / 64) and six["smallest_attainable_p"] == pytest.approx(2 / 64)
    # Five of six agreeing: flipping the small one gives 1.55 >= 1.45 too, so 4 of 64 = 0.0625.
    assert sign_flip_test([-0.05, 0.1, 0.2, 0.3, 0.4, 0.5])["p_value"] == pytest.approx(4 / 64)
    assert sign_flip_test([0.0, 0.0])["p_value"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_sign_flip_equals_brute_force_enumeration(seed):
    rng = np.random.default_rng(seed)
    d = list(np.round(rng.normal(0.1, 0.3, size=7), 2))
    result = sign_flip_test(d)
    assert result["p_value"] == pytest.approx(brute_force_sign_flip(d))
    assert result["positive"] + result["negative"] + result["zero"] == 7


def test_sign_flip_refuses_too_many_pairs():
    with pytest.raises(GGNDError, match="at most 20"):
        sign_flip_test([0.1] * 21)


def test_wilcoxon_hand_worked_and_against_scipy():
    # Six positive, distinct differences: W- = 0, exact two-sided p = 2 / 64.
    assert wilcoxon_signed_rank([0.05, 0.1, 0.2, 0.3, 0.4, 0.5])["p_value"] == pytest.approx(2 / 64)
    d = [0.3, -0.1, 0.25, 0.0, 0.4, -0.05, 0.15]
    ours = wilcoxon_signed_rank(d)
    reference = stats.wilcoxon([x for x in d if x != 0], method="exact")
    assert ours["pairs_used"] == 6 and ours["method"] == "exact"
    assert ours["p_value"] == pytest.approx(reference.pvalue)
    assert wilcoxon_signed_rank([0.0, 0.0])["p_value"] == 1.0


def test_cochran_mantel_haenszel_hand_worked():
    # Two strata [[2, 1], [1, 2]]: O = 4, E = 3, Var = 2 * 81 / 180 = 0.9, OR_MH = (4/6 * 2) / (1/6 * 2) = 4.
    result = cochran_mantel_haenszel([[[2, 1], [1, 2]], [[2, 1], [1, 2]]])
    assert result["chi2_uncorrected"] == pytest.approx(1 / 0.9)
    assert result["chi2"] == pytest.approx(0.25 / 0.9)
    assert result["p_value"] == pytest.approx(stats.chi2.sf(0.25 / 0.9, 1))
    assert result["odds_ratio"] == pytest.approx(4.0)


def test_cochran_mantel_haenszel_one_stratum_is_scaled_pearson():
    """For one table, MH's uncorrected statistic is (n - 1) / n times Pearson's chi-square."""
    table = [[9, 11], [3, 17]]
    n = 40
    pearson = stats.chi2_contingency(np.array(table), correction=False)[0]
    result = cochran_mantel_haenszel([table])
    assert result["chi2_uncorrected"] == pytest.approx(pearson * (n - 1) / n)
    assert result["odds_ratio"] == pytest.approx((9 * 17) / (11 * 3))


def _rows(model, failed_flags, times=None, frames=None):
    times = times or [0.5 + k if f else 10.0 for k, f in enumerate(failed_flags)]
    frames = frames or list(range(len(failed_flags)))
    return [
        {
            "model": model,
            "temperature_K": 1200.0,
            "replica": k,
            "start_frame": frames[k],
            "seed": 100 + k,
            "stability_ps": times[k],
            "failed": bool(f),
        }
        for k, f in enumerate(failed_flags)
    ]


def test_paired_comparison_per_pair_and_over_pairs():
    rows = (
        _rows("up-0", [1, 0, 0, 0])
        + _rows("ctl-0", [1, 1, 1, 0])
        + _rows("up-1", [0, 0, 0, 0])
        + _rows("ctl-1", [1, 0, 0, 0])
        + _rows("up-2", [1, 1, 0, 0])
        + _rows("ctl-2", [1, 1, 0, 0])
    )
    pairs = [("up-0", "ctl-0"), ("up-1", "ctl-1"), ("up-2", "ctl-2")]
    result = paired_comparison(rows, pairs, 1200.0, horizon=10.0)
    differences = [e["difference"] for e in result["pairs"]]
    assert differences == pytest.approx([0.25 - 0.75, 0.0 - 0.25, 0.0])
    assert result["sign_flip"]["p_value"] == pytest.approx(brute_force_sign_flip(differences))
    tables = [[[1, 3], [3, 1]], [[0, 4], [1, 3]], [[2, 2], [2, 2]]]
    assert result["cochran_mantel_haenszel"] == pytest.approx(cochran_mantel_haenszel(tables))
    first = result["pairs"][0]
    up = _rows("up-0", [1, 0, 0, 0])
    assert first["treatment_rmst_ps"] == pytest.approx(
        restricted_mean([r["stability_ps"] for r in up], [r["failed"] for r in up], 10.0)["rmst_ps"]
    )
    assert result["failed_fraction"]["mean_difference"] == pytest.approx(np.mean(differences))


def test_paired_comparison_refuses_what_is_not_paired():
    rows = _rows("a", [1, 0]) + _rows("b", [0, 0], frames=[0, 5]) + _rows("c", [0, 1])
    with pytest.raises(GGNDError, match="did not run the same replicas"):
        paired_comparison(rows, [("a", "b")], 1200.0, 10.0)
    with pytest.raises(GGNDError, match="one pair only: a"):
        paired_comparison(rows, [("a", "c"), ("a", "b")], 1200.0, 10.0)
    with pytest.raises(GGNDError, match="no replicas of model 'x' at 1200 K"):
        paired_comparison(rows, [("x", "a")], 1200.0, 10.0)


def test_compare_command_reads_several_runs(tmp_path, capsys):
    for name, models in (("run1", ["up-0", "ctl-0"]), ("run2", ["up-1", "ctl-1"])):
        replicas = []
        for model in models:
            replicas += _rows(model, [1, 1, 0] if model.startswith("ctl") else [0, 0, 1])
        (tmp_path / f"{name}.json").write_text(
            json.dumps({"protocol": {"time_ps": 10.0}, "replicas": replicas})
        )
    out = tmp_path / "compare.json"
    code = main(
        [
            "compare",
            str(tmp_path / "run1.json"),
            str(tmp_path / "run2.json"),
            "--pair",
            "up-0=ctl-0",
            "--pair",
            "up-1=ctl-1",
            "--temperature",
            "1200",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "exact sign-flip test p = 0.5" in printed  # two agreeing pairs: 2 of 4
    written = json.loads(out.read_text())
    assert [p["difference"] for p in written["pairs"]] == pytest.approx([-1 / 3, -1 / 3])
    # the same model in two files is refused
    (tmp_path / "run3.json").write_text((tmp_path / "run1.json").read_text())
    assert main(["compare", str(tmp_path / "run1.json"), str(tmp_path / "run3.json"), "--pair", "up-0=ctl-0",
                 "--temperature", "1200"]) == 2  # fmt: skip
    assert "names must be unique" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The control arm: the same fine-tuning without a block, and a patience rule
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(THIRDPARTY))
    import torch
    import toyhost_ggnd
    from ase.io import read, write

    torch.manual_seed(0)
    model = toyhost_ggnd.ToyAdapter().save(toyhost_ggnd.ToyPotential(), tmp_path / "fitted.toy")
    frames = read(DATA, ":12")
    write(tmp_path / "train.xyz", frames[:8])
    write(tmp_path / "valid.xyz", frames[8:])
    return toyhost_ggnd, model, tmp_path


def test_finetune_without_ggnd_is_the_same_training_on_the_plain_model(toy, capsys):
    toyhost, model, folder = toy
    common = ["--train", str(folder / "train.xyz"), "--valid", str(folder / "valid.xyz"), "--epochs", "3"]
    assert main(["finetune", str(model), "-o", str(folder / "control.toy"), "--no-ggnd", *common]) == 0
    assert main(["finetune", str(model), "-o", str(folder / "upgrade.toy"), *common]) == 0
    adapter = toyhost.ToyAdapter()
    control, upgrade = adapter.load(folder / "control.toy"), adapter.load(folder / "upgrade.toy")
    assert not adapter.ggnd_blocks(control) and adapter.ggnd_blocks(upgrade)
    # The control's host moved from the fitted weights; the block's zero readout means the first step of
    # the upgrade arm sees the same loss, so both arms trained the same host parameters.
    fitted = adapter.load(model)
    moved = max(
        float((a - b).detach().abs().max())
        for a, b in zip(control.parameters(), fitted.parameters(), strict=True)
    )
    assert moved > 0
    assert (
        main(["finetune", str(folder / "upgrade.toy"), "-o", str(folder / "x.toy"), "--no-ggnd", *common])
        == 2
    )
    assert "already has a GGND block" in capsys.readouterr().err


def test_finetune_patience_stops_and_keeps_the_best_epoch(toy):
    toyhost, model_path, folder = toy
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.training import FinetuneSettings, evaluate, finetune

    adapter = toyhost.ToyAdapter()
    model = adapter.load(model_path)
    train, valid = read_labelled(folder / "train.xyz"), read_labelled(folder / "valid.xyz")
    # A large learning rate makes the validation force error stop improving soon.
    settings = FinetuneSettings(epochs=40, lr=0.05, batch_size=4, patience=2, monitor="forces")
    result = finetune(adapter, model, train, valid, folder / "stopped.toy", settings, progress=False)
    scores = [r.valid_forces_mae for r in result.history]
    best = int(np.argmin(scores)) + 1
    assert result.best_epoch == best
    assert result.stopped_early and len(result.history) == best + 2 < 40
    kept = evaluate(adapter, adapter.load(folder / "stopped.toy"), valid, 4)
    assert kept["forces_mae"] == pytest.approx(scores[best - 1], rel=1e-9)
    # Resuming a run that stopped early trains nothing more.
    again = finetune(
        adapter,
        adapter.load(model_path),
        train,
        valid,
        folder / "stopped.toy",
        settings,
        resume=True,
        progress=False,
    )
    assert len(again.history) == len(result.history) and again.stopped_early
    assert math.isfinite(again.history[-1].train_loss)
