"""`cliplab` command line: train, sweep, evaluate, submit, demo, compare, shards, config, cluster render."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys

from cliplab.cli_args import add_overrides
from cliplab.errors import CliplabError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (shipped ones: cliplab config list)")
    add_overrides(p, "override a dotted field, e.g. --set optim.lr=1e-4 (repeatable)")


def _embedded_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embedded",
        action="store_true",
        help="start the embedded S3 endpoint and write SynthScenes first, as `cliplab demo` does",
    )
    p.add_argument("--workdir", default="cliplab-demo", help="with --embedded: MLflow store and checkpoints")


def _repo_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--repo",
        metavar="DIR",
        help="the cliplab checkout to use (default: the one holding the working directory)",
    )


def _overrides(args: argparse.Namespace) -> list[str]:
    """The --set overrides, after the local storage and MLflow store under --workdir with --embedded."""
    if not args.embedded:
        return list(args.overrides)
    from pathlib import Path

    from cliplab.demo import local_overrides

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    return local_overrides(workdir) + list(args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from cliplab.config import load_experiment
    from cliplab.demo import embedded_synthscenes
    from cliplab.preflight import check_before_ray
    from cliplab.runtime import check_fits, ensure_ray
    from cliplab.tracking.mlflow import ui_hint
    from cliplab.train.trainer import run_training, summary_table

    overrides = _overrides(args)
    exp = load_experiment(args.config, overrides)
    with embedded_synthscenes(exp) if args.embedded else contextlib.nullcontext():
        check_before_ray(exp)
        ensure_ray()
        check_fits(exp)
        outcome = run_training(exp, resume=args.resume)
    print(summary_table(outcome))
    print(f"\nrun {outcome.run_name}: MLflow run {outcome.mlflow_run_id} at {outcome.tracking_uri}")
    print(ui_hint(outcome.tracking_uri, outcome.mlflow_run_id))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cliplab.config import validate_tree
    from cliplab.demo import embedded_synthscenes
    from cliplab.preflight import check_before_ray
    from cliplab.runtime import ensure_ray
    from cliplab.sweep.config import load_sweep
    from cliplab.sweep.report import trial_table
    from cliplab.sweep.runner import run_sweep

    overrides = _overrides(args)
    sweep, base_tree = load_sweep(args.config, overrides)
    base = validate_tree(base_tree, args.config)
    with embedded_synthscenes(base) if args.embedded else contextlib.nullcontext():
        check_before_ray(base)
        ensure_ray()
        outcome = run_sweep(sweep, base_tree, Path(args.config), resume=args.resume)
    print(trial_table(outcome.rows, list(sweep.space), sweep.metric))
    if outcome.best is not None:
        print(
            f"\nbest trial {outcome.best.trial_id}: {sweep.metric} = {outcome.best.metric:.4f} at "
            f"{outcome.best.point}; its config is best_config.yaml on the parent run"
        )
    print(f"sweep {outcome.name}: MLflow parent run {outcome.parent_run_id} at {outcome.tracking_uri}")
    return 0 if outcome.best is not None else 1


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cliplab.config import load_experiment
    from cliplab.eval.offline import evaluate_export, model_location
    from cliplab.preflight import check_before_ray
    from cliplab.runtime import ensure_ray
    from cliplab.tracking.mlflow import resolve_tracking_uri

    exp = load_experiment(args.config, args.overrides)
    export = model_location(resolve_tracking_uri(exp), args.model, args.run)
    check_before_ray(exp, train=False)
    ensure_ray()
    metrics, run_id = evaluate_export(exp, export, args.run)
    width = max(len(k) for k in metrics)
    for key in sorted(metrics):
        if not key.startswith("branch"):
            print(f"{key.ljust(width)}  {metrics[key]:.4f}")
    print(f"\nevaluated {export}: MLflow run {run_id}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from cliplab.cluster.submit import submit

    extra = (["--model", args.model] if args.model else []) + (["--run", args.run] if args.run else [])
    extra += ["--resume", args.resume] if args.resume else []
    submit(
        args.kind,
        args.config,
        args.address,
        args.overrides,
        extra,
        args.env,
        wait=not args.no_wait,
        local_endpoints=not args.cluster_endpoints,
        repo=args.repo,
    )
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from cliplab.cluster.render import render, render_yaml

    extra = (["--model", args.model] if args.model else []) + (["--run", args.run] if args.run else [])
    manifest = render(args.kind, args.config, args.image, args.gpus_per_node, extra, repo=args.repo)
    command = " ".join(["cliplab cluster render", args.config, "--kind", args.kind, *extra])
    print(render_yaml(manifest, f"rendered by: {command}"), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.what == "select":
        from cliplab.select.demo import run_select_demo

        run_select_demo(
            workdir=args.workdir,
            train_samples=args.train_samples,
            steps=args.steps,
            pool_samples=args.pool_samples,
            target_count=args.target_samples,
            negclip_batch=args.negclip_batch,
            repeats=args.repeats,
            train_steps=args.train_steps,
        )
        return 0
    from cliplab.demo import run_demo

    run_demo(workdir=args.workdir, train_samples=args.train_samples, steps=args.steps)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cliplab.compare import compare, table
    from cliplab.config import load_experiment
    from cliplab.demo import embedded_synthscenes
    from cliplab.preflight import check_before_ray
    from cliplab.runtime import check_fits, ensure_ray

    overrides = _overrides(args)
    experiments = [load_experiment(c, overrides) for c in args.configs]
    with embedded_synthscenes(experiments[0]) if args.embedded else contextlib.nullcontext():
        for exp in experiments:
            check_before_ray(exp)
        ensure_ray()
        for exp in experiments:
            check_fits(exp)
        parent, outcomes = compare(experiments)
    print(table(experiments, outcomes))
    print(f"\nparent MLflow run {parent}; each run is a child of it")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from cliplab.data.synth import SynthSpec, write_synthscenes

    spec = SynthSpec(
        num_samples=args.num_samples,
        samples_per_shard=args.samples_per_shard,
        image_size=args.image_size,
        noisy_fraction=args.noisy_fraction,
        seed=args.seed,
    )
    urls = write_synthscenes(args.url, spec)
    print(f"wrote {spec.num_samples} samples in {len(urls)} shards: {urls[0]} ... {urls[-1]}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from cliplab.data.pipeline import inspect_shards

    print(json.dumps(inspect_shards(args.url, n_show=args.show), indent=2, default=str))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from cliplab.config import dump_yaml, load_experiment
    from cliplab.models.factory import check_model

    exp = load_experiment(args.config, args.overrides)
    check_model(exp.model)
    print(dump_yaml(exp), end="")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from cliplab.shipped import shipped_configs

    for path in shipped_configs():
        print(path)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from cliplab.config import Experiment

    print(json.dumps(Experiment.model_json_schema(), indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cliplab", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an experiment on Ray Train + DeepSpeed")
    _config_args(t)
    t.add_argument("--resume", metavar="RUN_NAME", help="resume this run from its latest checkpoint")
    _embedded_args(t)
    t.set_defaults(func=cmd_train)

    sw = sub.add_parser("sweep", help="Ray Tune sweep of experiment fields, each trial a full training job")
    sw.add_argument("config", help="sweep YAML (see configs/sweep_*.yaml)")
    add_overrides(sw, "override a field of the base experiment (not a swept one; repeatable)")
    sw.add_argument("--resume", metavar="SWEEP_NAME", help="resume this interrupted sweep")
    _embedded_args(sw)
    sw.set_defaults(func=cmd_sweep)

    ev = sub.add_parser("evaluate", help="evaluate an exported model on the experiment's held-out data")
    _config_args(ev)
    ev.add_argument("--model", help="export dir of a run (<storage>/<run>/export, local or s3://)")
    ev.add_argument("--run", help="MLflow run id of a training run (its cliplab.model_uri tag names the export)")
    ev.set_defaults(func=cmd_evaluate)

    sb = sub.add_parser("submit", help="submit train/sweep/evaluate/select as a Ray job and follow it")
    sb.add_argument("kind", choices=["train", "sweep", "evaluate", "select"])
    _config_args(sb)
    sb.add_argument("--address", required=True, help="Ray dashboard URL, e.g. http://127.0.0.1:8265")
    sb.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra job env var (credentials only this way, explicitly; repeatable)",
    )
    sb.add_argument("--model", help="evaluate: export dir")
    sb.add_argument("--run", help="evaluate: MLflow run id of the training run")
    sb.add_argument("--resume", help="train/sweep: resume this run or sweep")
    sb.add_argument("--no-wait", action="store_true", help="print the submission id and return")
    sb.add_argument(
        "--cluster-endpoints",
        action="store_true",
        help="send none of this shell's MLFLOW_TRACKING_URI / S3 endpoint / region: the cluster's own "
        "environment (its ConfigMap) applies",
    )
    _repo_arg(sb)
    sb.set_defaults(func=cmd_submit)

    cl = sub.add_parser("cluster", help="KubeRay manifests").add_subparsers(dest="cluster", required=True)
    r = cl.add_parser("render", help="a RayJob (with its RayCluster) sized from the experiment config")
    r.add_argument("config", help="experiment, sweep or selection YAML inside this repository")
    r.add_argument("--kind", choices=["train", "sweep", "evaluate", "select"], default="train")
    r.add_argument("--image", default="cliplab:2.60.0-py311-gpu", help="the image built from ./Dockerfile")
    r.add_argument("--gpus-per-node", type=int, default=8)
    r.add_argument("--model", help="evaluate: export dir")
    r.add_argument("--run", help="evaluate: MLflow run id")
    _repo_arg(r)
    r.set_defaults(func=cmd_render)

    d = sub.add_parser("demo", help="embedded S3 + local Ray + MLflow: synth data, train, evaluate (or select)")
    d.add_argument(
        "what",
        nargs="?",
        choices=["train", "select"],
        default="train",
        help="select: train a teacher, then select from a pool with 30%% noisy captions and grade the scores",
    )
    d.add_argument("--workdir", default="cliplab-demo", help="where the MLflow store and checkpoints go")
    d.add_argument("--train-samples", type=int, default=None, help="SynthScenes training samples (the teacher's)")
    d.add_argument("--steps", type=int, default=None, help="optimizer steps (default: configs/demo.yaml)")
    d.add_argument("--pool-samples", type=int, default=10000, help="select: candidate pool size")
    d.add_argument("--target-samples", type=int, default=1000, help="select: target images for NormSim")
    d.add_argument("--negclip-batch", type=int, default=1024, help="select: negCLIPLoss |B|")
    d.add_argument("--repeats", type=int, default=10, help="select: negCLIPLoss K")
    d.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help="select: close the loop: train the demo recipe this many steps on each of the negCLIPLoss, CLIPScore "
        "and random 50%% subsets (equal size) and compare them held out; 0 skips it (default: 120 steps a run, "
        "about 13 minutes for the three on 2 CPU cores)",
    )
    d.set_defaults(func=cmd_demo)

    cmp = sub.add_parser("compare", help="same-budget runs of several configs as sibling MLflow runs")
    cmp.add_argument("configs", nargs="+", help="experiment YAMLs reading the same training shards")
    add_overrides(cmp, "override applied to every config (repeatable)")
    _embedded_args(cmp)
    cmp.set_defaults(func=cmd_compare)

    shards = sub.add_parser("shards", help="write or inspect WebDataset shards")
    sh = shards.add_subparsers(dest="shards", required=True)
    s = sh.add_parser("synth", help="write a SynthScenes dataset (local dir or s3://bucket/prefix)")
    s.add_argument("url")
    s.add_argument("--num-samples", type=int, default=10000)
    s.add_argument("--samples-per-shard", type=int, default=1000)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--noisy-fraction", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)
    i = sh.add_parser("inspect", help="count samples and show one")
    i.add_argument("url")
    i.add_argument("--show", type=int, default=1, help="samples to show")
    i.set_defaults(func=cmd_inspect)

    c = sub.add_parser("config", help="validate a config or print the schema").add_subparsers(dest="cfg", required=True)
    v = c.add_parser("validate", help="validate and print the resolved config")
    _config_args(v)
    v.set_defaults(func=cmd_validate)
    c.add_parser("schema", help="JSON schema of the experiment config").set_defaults(func=cmd_schema)
    c.add_parser("list", help="paths of the shipped experiment and sweep configs").set_defaults(func=cmd_list)

    from cliplab.select.cli import add_parser as add_select  # data selection (issue 12)

    add_select(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except CliplabError as exc:
        print(f"cliplab: error: {exc}", file=sys.stderr)
        return 2


def job_main(kind: str, argv: list[str] | None = None) -> int:
    """What `jobs/<kind>.py` runs under `ray job submit`: `cliplab <kind>` with the config given as `--config FILE`;
    every other flag (`--set`, `--resume`, `--model`, `--run`, `--help`) passes through to that subcommand."""
    p = argparse.ArgumentParser(prog=f"jobs/{kind}.py", add_help=False)
    p.add_argument("--config", required=True)
    args, rest = p.parse_known_args(argv)
    return main([kind, args.config, *rest])


if __name__ == "__main__":
    sys.exit(main())
