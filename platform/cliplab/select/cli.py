"""`cliplab select CONFIG`: the selection job's subcommand (registered by cliplab.cli in one line)."""

from __future__ import annotations

import argparse
import json

from cliplab.cli_args import add_overrides


def cmd_select(args: argparse.Namespace) -> int:
    from cliplab.errors import ConfigError
    from cliplab.select.config import SelectConfig, load_selection

    if args.schema:
        print(json.dumps(SelectConfig.model_json_schema(), indent=2))
        return 0
    if args.config is None:
        raise ConfigError("select: give a selection YAML (or --schema)")
    cfg = load_selection(args.config, args.overrides)
    if args.validate:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    from cliplab.runtime import ensure_ray
    from cliplab.select.run import run_selection

    ensure_ray()
    outcome = run_selection(cfg)
    steps = ", ".join(f"{s.label}: {k}" for s, k in zip(cfg.recipe.steps, outcome.kept, strict=True))
    print(f"pool {outcome.pool_size} samples; kept after each step: {steps}; selected {outcome.selected}")
    for key in sorted(k for k in outcome.metrics if k.startswith("noisy/")):
        print(f"{key}  {outcome.metrics[key]:.4f}")
    print(f"subset {outcome.subset}\nscores {outcome.scores}\nMLflow run {outcome.run_id}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `select` on cliplab's subcommands."""
    p = sub.add_parser("select", help="score a pool with a frozen teacher CLIP and write the selected uid subset")
    p.add_argument("config", nargs="?", help="selection YAML (see docs/data-selection.md)")
    add_overrides(p, "override a dotted field, e.g. --set scores.negclip.batch_size=4096 (repeatable)")
    p.add_argument("--validate", action="store_true", help="validate and print the resolved config, run nothing")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of the selection config")
    p.set_defaults(func=cmd_select)
