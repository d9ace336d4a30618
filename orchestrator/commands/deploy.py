"""`dinodist deploy torchrun|slurm|k8s TOPOLOGY`: write launch files for a cluster from the plan."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from dinodist.core.errors import DinodistError
from dinodist.orchestrator.allocate import make_plan
from dinodist.orchestrator.launchfiles import PLAN_MOUNT, TOPOLOGY_MOUNT, LaunchSpec, write_launch_files
from dinodist.orchestrator.planfile import PLAN_FILE
from dinodist.orchestrator.topology import check_runnable, load_topology


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="write torchrun / SLURM / Kubernetes launch files for a topology",
        description="Plan TOPOLOGY and write launch files, plus the plan (plan.json) every rank reads, that "
        "start `python -m dinodist.orchestrator.runtime.rank TOPOLOGY --plan PLAN` on every rank under "
        "torchrun (c10d rendezvous). See deploy/README.md.",
    )
    p.add_argument("target", choices=["torchrun", "slurm", "k8s"], help="launcher to generate for")
    p.add_argument("topology", metavar="TOPOLOGY", help="topology YAML file")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: deploy/generated/<topology name>)")
    p.add_argument("--k8s-kind", choices=["trainjob", "pytorchjob"], default="trainjob",
                   help="Kubeflow Trainer v2 TrainJob (default) or training-operator v1 PyTorchJob")
    p.add_argument("--image", default="dinodist:latest", help="container image for k8s")
    p.add_argument("--namespace", default=None, help="Kubernetes namespace for the manifests")
    p.add_argument("--max-restarts", type=int, default=3, help="torchrun --max-restarts (default 3)")
    p.add_argument("--topology-path", default=None, metavar="PATH",
                   help="path of the topology file on the nodes (default: TOPOLOGY as given)")
    p.add_argument("--plan-path", default=None, metavar="PATH",
                   help="path of the written plan.json on the nodes (default: OUT/plan.json as given)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.max_restarts < 0:
        raise DinodistError(f"--max-restarts: must be >= 0, got {args.max_restarts}")
    # the checkpoint lives on the cluster, not necessarily here
    topo = load_topology(args.topology, check_paths=False)
    check_runnable(topo)
    plan = make_plan(topo)
    on_nodes = TOPOLOGY_MOUNT if args.target == "k8s" else (args.topology_path or args.topology)
    spec = LaunchSpec(topo, plan, on_nodes, Path(args.topology).read_text(), max_restarts=args.max_restarts,
                      image=args.image, namespace=args.namespace)
    out = args.out or str(Path("deploy") / "generated" / spec.job)
    plan_on_nodes = PLAN_MOUNT if args.target == "k8s" else (args.plan_path or str(Path(out) / PLAN_FILE))
    spec = dataclasses.replace(spec, plan_path=plan_on_nodes)
    for path in write_launch_files(args.target, spec, out, args.k8s_kind):
        print(path)
    return 0
