"""The GPU pass's short markdown table (benchmarks/gpu_pass.py writes it beside its JSON).

It reads only the JSON record, so it can be made again from a committed ``gpu_pass.json``:

    python benchmarks/gpu_pass_report.py benchmarks/results/gpu_pass.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _status(section: dict[str, Any]) -> str:
    text = section["status"]
    if section.get("reason"):
        text += f" ({section['reason'][:80]})"
    if section.get("passed") is False:
        text += ", FAILED"
    return text


def markdown(record: dict[str, Any]) -> str:
    machine = record.get("machine", {})
    versions = machine.get("versions", {})
    lines = [
        f"# GPU pass: {machine.get('device_name', record['device_requested'])}",
        "",
        f"torch {machine.get('torch', '?')} (CUDA {machine.get('torch_cuda')}), "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; budget {record['budget_s']:.0f} s, elapsed {record.get('elapsed_s', '?')} s"
        + (" (dry run: --tiny)" if record.get("tiny") else ""),
        "",
        "| section | status | seconds |",
        "|---|---|---|",
    ]
    sections = record["sections"]
    for name, section in sections.items():
        lines.append(f"| {name} | {_status(section)} | {_fmt(section.get('seconds'))} |")
    if record.get("hard_stop"):
        lines += ["", f"Stopped: {record['hard_stop']}."]

    results = sections.get("correctness", {}).get("results", {})
    if results.get("tests"):
        lines += ["", "## Correctness (device against CPU, float64)", "", "| test | outcome | max rel |"]
        lines.append("|---|---|---|")
        for test, entry in results["tests"].items():
            lines.append(f"| {test.split('::')[-1]} | {entry['outcome']} | {_fmt(entry.get('max_rel'))} |")

    results = sections.get("batched_stability", {}).get("results", {})
    runs = [k for k in ("one_batch", "autobatch", "one_replica_at_a_time", "cpu_same_model", "cpu_committed")]
    if any(k in results for k in runs):
        lines += ["", "## Batched stability (3BPA, MACE+GGND)", ""]
        lines += ["| run | replicas | replica-steps/s | failed | peak MiB |", "|---|---|---|---|---|"]
        for key in runs:
            entry = results.get(key)
            if not entry:
                continue
            if "skipped" in entry:
                lines.append(f"| {key} | – | skipped: {entry['skipped']} | – | – |")
                continue
            failed = entry.get("failed_by_temperature_K")
            lines.append(
                f"| {key} | {entry.get('replicas')} | {_fmt(entry.get('replica_steps_per_s'))} | "
                f"{_fmt(failed)} | {_fmt(entry.get('peak_mib'))} |"
            )
        if results.get("ratios"):
            lines += ["", ", ".join(f"{k}: {v}" for k, v in results["ratios"].items())]

    rows = sections.get("table5", {}).get("results", {}).get("rows", [])
    if rows:
        lines += ["", "## Table 5 on the device (float64)", ""]
        lines += [
            "| host | replicas | compiled | host ms | GGND ms | ratio time | host MiB | GGND MiB | ratio mem |"
        ]
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "skipped" in r:
                lines.append(
                    f"| {r['host']} | {r['replicas']} | {r['compiled']} | skipped: {r['skipped']} |||||"
                )
                continue
            ggnd_ms = r.get("ggnd_compiled_md_step_ms") if r["compiled"] else r.get("ggnd_md_step_ms")
            ggnd_mib = r.get("ggnd_compiled_peak_mib") if r["compiled"] else r.get("ggnd_peak_mib")
            lines.append(
                f"| {r['host']} | {r['replicas']} | {r['compiled']} | {_fmt(r.get('host_md_step_ms'))} | "
                f"{_fmt(ggnd_ms)} | {_fmt(r.get('ratio_md_time'))} | {_fmt(r.get('host_peak_mib'))} | "
                f"{_fmt(ggnd_mib)} | {_fmt(r.get('ratio_memory'))} |"
            )

    rows = sections.get("block", {}).get("results", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "## The block alone (float32)",
            "",
            "| mode | systems x atoms | pairs | median s | peak MiB |",
        ]
        lines.append("|---|---|---|---|---|")
        for r in rows:
            shape = f"{r['systems']} x {r['atoms_per_system']}"
            if "skipped" in r:
                lines.append(f"| {r['mode']} | {shape} | {r['pairs']} | skipped: {r['skipped']} | |")
            else:
                lines.append(
                    f"| {r['mode']} | {shape} | {r['pairs']} | {_fmt(r.get('median_s'))} | {_fmt(r.get('peak_mib'))} |"
                )

    results = sections.get("nccl", {}).get("results", {})
    worlds = [k for k in sorted(results) if k.startswith("world_size_")]
    if worlds:
        lines += ["", "## torchrun against one process", "", "| ranks | result |", "|---|---|"]
        for key in worlds:
            entry = results[key]
            if isinstance(entry, dict) and "against_one_process" in entry:
                same = entry["against_one_process"]
                text = f"same outcomes: {same['same_outcomes']}, identical rows: {same['identical']}"
                backends = {c["backend"] for c in entry.get("collectives", [])}
                text += f", collectives ({', '.join(sorted(backends))}) ok: {all(c['ok'] for c in entry['collectives'])}"
            else:
                text = json.dumps(entry)[:160]
            lines.append(f"| {key.removeprefix('world_size_')} | {text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    path = Path(sys.argv[1])
    print(markdown(json.loads(path.read_text())), end="")
