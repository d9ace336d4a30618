"""Launch files generated from a topology's plan: per-node torchrun scripts, an sbatch script, and
Kubernetes manifests (Kubeflow Trainer v2 TrainJob, or the older PyTorchJob).

Every launcher starts the same program on every rank, `python -m dinodist.orchestrator.runtime.rank
TOPOLOGY --plan PLAN`, under torchrun (c10d rendezvous, env:// variables). `deploy` writes the plan
(`plan.json`) beside the launch files; the rank reads the topology and that plan, and finds its
group from its global rank: teacher ranks first, then the students in listed order. Node 0 is the
rendezvous host and runs the supervisor, `dinodist supervise` (orchestrator/supervise.py): the control
plane every rank dials (`DINODIST_CONTROL`: zmq at `control.port`), `/metrics` at `metrics.port`, the
failure policy and `summary.json`. On Kubernetes the supervisor is its own Job behind the control
Service.

With `control.on_failure: stop` the launchers do not restart ranks (torchrun `--max-restarts=0`): a
failure ends the job, both node scripts exit non-zero, node 0's output naming the lost rank.

Failures and preemption (docs/fault-tolerance.md): every launcher passes `--resume`, so each restart it
makes (torchrun `--max-restarts`, a requeued SLURM job, a restarted pod) continues from the newest
checkpoint every group holds instead of starting over. A preemption notice reaches the ranks as a
signal (SLURM: USR1 `PREEMPT_NOTICE_S` before the end, forwarded to every rank; Kubernetes: the pod's
SIGTERM, which torchrun forwards): they checkpoint at the next common iteration and exit with 75.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from dinodist.core.control.client import CONTROL_ENV
from dinodist.core.errors import DinodistError
from dinodist.orchestrator.allocate import Plan
from dinodist.orchestrator.launch import RANK_MODULE
from dinodist.orchestrator.planfile import PLAN_FILE, write_plan
from dinodist.orchestrator.topology import Topology

PREEMPT_NOTICE_S = 180  # SLURM --signal: the ranks' notice before the job is killed
REQUEUE_AFTER_S = 150  # SLURM: requeue this long after the notice, once the ranks have checkpointed
TERMINATION_GRACE_S = 300  # Kubernetes: SIGTERM to SIGKILL, time for one iteration and a checkpoint
DEFAULT_CONTROL_PORT = 29600  # used when the topology leaves control.port at 0 (ephemeral)
RDZV_PORT = 29400
CONFIG_MOUNT = "/etc/dinodist"  # Kubernetes: the ConfigMap with topology.yaml and plan.json
TOPOLOGY_MOUNT = f"{CONFIG_MOUNT}/topology.yaml"
PLAN_MOUNT = f"{CONFIG_MOUNT}/{PLAN_FILE}"


@dataclass(frozen=True)
class LaunchSpec:
    topology: Topology
    plan: Plan
    topology_path: str  # where the topology file is on the cluster's nodes
    topology_text: str  # the file as the user wrote it: relative paths resolve on the cluster
    plan_path: str = PLAN_FILE  # where `deploy` put plan.json, as the nodes see it
    max_restarts: int = 3
    image: str = "dinodist:latest"
    namespace: str | None = None

    @property
    def job(self) -> str:
        # DNS-1123 label: Kubernetes object names and the rendezvous id
        name = "".join(c if c.isalnum() else "-" for c in self.topology.name.lower()).strip("-")
        return name[:50] or "dinodist"

    @property
    def launcher_restarts(self) -> int:
        """torchrun --max-restarts: none under the stop policy (a failure ends the job, no restart loop)."""
        return 0 if self.topology.control.on_failure == "stop" else self.max_restarts

    @property
    def bind(self) -> str:
        """Where the supervisor listens: every interface across nodes (the secret is then required)."""
        return "0.0.0.0" if self.nodes > 1 else self.topology.control.bind

    @property
    def control_port(self) -> int:
        return self.topology.control.port or DEFAULT_CONTROL_PORT

    @property
    def nodes(self) -> int:
        return self.plan.nodes

    def nproc(self, node: int) -> int:
        return self.plan.ranks_on_node(node)

    @property
    def uniform(self) -> bool:
        return all(self.nproc(n) == self.nproc(0) for n in range(self.nodes))

    @property
    def gpu(self) -> bool:
        return self.plan.device != "cpu"


def _ranges(ranks: list[int]) -> str:
    """`0..3, 8..9`: a group placed in pieces (to keep small groups inside nodes) is not one range."""
    parts, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur != prev + 1:
            parts.append(f"{start}..{prev}" if prev != start else str(start))
            start = cur
    return ", ".join(parts)


def rank_map_lines(spec: LaunchSpec, prefix: str = "# ") -> list[str]:
    out = [f"{prefix}plan: {spec.plan.used_devices} ranks on {spec.nodes} nodes "
           f"({spec.plan.device}), {spec.plan.seconds_per_iteration:.3f} s/iter predicted"]
    for g in spec.plan.groups:
        where = ", ".join(f"node {n}: {c}" for n, _, c in g.placement)
        out.append(f"{prefix}  {g.name:<14} ranks {_ranges(g.ranks)}  ({where})")
    return out


def torchrun_argv(spec: LaunchSpec, nproc: str, head: str) -> list[str]:
    return [
        "torchrun",
        f"--nnodes={spec.nodes}",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={head}:{RDZV_PORT}",
        f"--rdzv-id={spec.job}",
        f"--max-restarts={spec.launcher_restarts}",
        "-m", RANK_MODULE, spec.topology_path, "--plan", spec.plan_path, "--resume",
    ]


def _secret_check(spec: LaunchSpec) -> list[str]:
    # fail before anything starts: ranks would otherwise be refused by the control plane one by one
    secret = spec.topology.control.secret_env
    if not secret:
        return []
    return [f': "${{{secret}:?export {secret} (control-plane shared secret) on every node}}"']


def _env_lines(spec: LaunchSpec, head: str) -> list[str]:
    lines = [f'export {CONTROL_ENV}="tcp://{head}:{spec.control_port}"']
    if spec.gpu:
        lines.append("export CUDA_DEVICE_ORDER=PCI_BUS_ID")
    return lines


def supervise_argv(spec: LaunchSpec, topology_path: str, plan_path: str) -> list[str]:
    return ["dinodist", "supervise", topology_path, "--plan", plan_path, "--bind", spec.bind,
            "--port", str(spec.control_port)]


def _supervised(spec: LaunchSpec, run_ranks: str) -> list[str]:
    """Node 0: the supervisor in the background, the node's ranks in the foreground; the script's exit
    code is the supervisor's when it failed (its last line names the lost rank), else the ranks'."""
    sup = " ".join(shlex.quote(a) for a in supervise_argv(spec, spec.topology_path, spec.plan_path))
    return [
        f"{sup} &",
        "supervisor=$!",
        "trap 'kill -TERM \"$supervisor\" 2>/dev/null || true' EXIT",
        "set +e",
        run_ranks,
        "ranks=$?",
        'wait "$supervisor"',
        "supervised=$?",
        "trap - EXIT",
        'if [ "$supervised" -ne 0 ]; then exit "$supervised"; fi',
        'exit "$ranks"',
    ]


def torchrun_scripts(spec: LaunchSpec) -> dict[str, str]:
    """One script per node; run each on its node with HEAD_ADDR set to node 0's address. Node 0's also
    runs the supervisor (`dinodist supervise`)."""
    files = {}
    for node in range(spec.nodes):
        argv = torchrun_argv(spec, str(spec.nproc(node)), "${HEAD_ADDR}")
        cmd = " ".join(a if "${" in a else shlex.quote(a) for a in argv)
        lines = [
            "#!/usr/bin/env bash",
            f"# dinodist deploy torchrun: node {node} of {spec.nodes} for topology {spec.topology.name}",
            *rank_map_lines(spec),
            "set -euo pipefail",
            *_secret_check(spec),
            ': "${HEAD_ADDR:?set HEAD_ADDR to the address of node 0 (rendezvous and control plane)}"',
            *_env_lines(spec, "${HEAD_ADDR}"),
            *(_supervised(spec, cmd) if node == 0 else [f"exec {cmd}"]),
            "",
        ]
        files[f"node-{node}.sh"] = "\n".join(lines)
    return files


def sbatch_script(spec: LaunchSpec) -> str:
    nprocs = " ".join(str(spec.nproc(n)) for n in range(spec.nodes))
    per_node = spec.topology.cluster.devices_per_node
    flag = "gpus-per-node" if spec.gpu else "cpus-per-task"
    argv = torchrun_argv(spec, "${nproc}", "${HEAD_ADDR}")
    inner = " ".join(a if "${" in a else shlex.quote(a) for a in argv)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={spec.job}",
        f"#SBATCH --nodes={spec.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --{flag}={per_node}",
        "#SBATCH --output=slurm-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{PREEMPT_NOTICE_S}",
        f"# dinodist deploy slurm for topology {spec.topology.name}",
        *rank_map_lines(spec),
        "set -euo pipefail",
        *_secret_check(spec),
        'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'export HEAD_ADDR="${NODES[0]}"',
        *_env_lines(spec, "${HEAD_ADDR}"),
        f'export DINODIST_NPROC="{nprocs}"  # ranks per node, in node order',
        "# one task per node; each runs torchrun with its node's rank count. A USR1 reaching a task is",
        "# passed to its ranks (not to torchrun, whose default for USR1 is to die): they checkpoint at the",
        "# next iteration common to every group and exit 75; a restart torchrun makes then resumes there",
        "run_node() {",
        '  local counts nproc pid',
        '  read -r -a counts <<< "$DINODIST_NPROC"',
        '  nproc="${counts[$SLURM_NODEID]}"',
        f"  {inner} &",
        '  pid=$!',
        "  trap 'pkill -USR1 -P \"$pid\" || true' USR1",
        '  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done',
        '  wait "$pid"',
        "}",
        "export -f run_node",
        "# the notice (--signal B:USR1) reaches this shell: pass it to every node's task, give the ranks",
        "# time to checkpoint, then requeue; the requeued job resumes (--resume) from that checkpoint",
        "preempt() {",
        '  echo "dinodist: preemption notice; asking every rank to checkpoint" >&2',
        '  scancel --signal=USR1 "$SLURM_JOB_ID" || true',
        f'  sleep "${{DINODIST_REQUEUE_AFTER_S:-{REQUEUE_AFTER_S}}}"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "}",
        "trap preempt USR1",
        "# this shell runs on node 0: the supervisor (control plane, /metrics, failure policy, summary)",
        " ".join(shlex.quote(a) for a in supervise_argv(spec, spec.topology_path, spec.plan_path)) + " &",
        "supervisor=$!",
        "srun --kill-on-bad-exit=1 bash -c run_node &",
        "step=$!",
        "set +e",
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; done',
        'wait "$step"',
        "ranks=$?",
        'wait "$supervisor"',
        "supervised=$?",
        'if [ "$supervised" -ne 0 ]; then exit "$supervised"; fi',
        'exit "$ranks"',
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _meta(spec: LaunchSpec, name: str, **extra) -> dict:
    meta = {"name": name, "labels": {"app.kubernetes.io/name": "dinodist", "dinodist/topology": spec.job}}
    if spec.namespace:
        meta["namespace"] = spec.namespace
    meta.update(extra)
    return meta


def _container_env(spec: LaunchSpec) -> list[dict]:
    env = [{"name": CONTROL_ENV, "value": f"tcp://{spec.job}-control:{spec.control_port}"}]
    if spec.gpu:
        env.append({"name": "CUDA_DEVICE_ORDER", "value": "PCI_BUS_ID"})
    secret = spec.topology.control.secret_env
    if secret:
        ref = {"secretKeyRef": {"name": f"{spec.job}-control", "key": "secret"}}
        env.append({"name": secret, "valueFrom": ref})
    return env


def _resources(spec: LaunchSpec) -> dict:
    n = spec.nproc(0)
    if spec.gpu:
        return {"limits": {"nvidia.com/gpu": n}}
    return {"requests": {"cpu": n}, "limits": {"cpu": n}}


def k8s_manifests(spec: LaunchSpec, kind: str = "trainjob") -> str:
    if kind not in ("trainjob", "pytorchjob"):
        raise DinodistError(f"--k8s-kind: {kind!r} is not trainjob or pytorchjob")
    if not spec.uniform:
        raise DinodistError(
            f"deploy k8s: the plan uses {spec.plan.used_devices} devices, not whole nodes of "
            f"{spec.topology.cluster.devices_per_node} (Kubernetes runs the same rank count per pod); "
            "pin group devices or change cluster.devices_per_node"
        )
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, f"{spec.job}-topology"),
              "data": {"topology.yaml": spec.topology_text,
                       PLAN_FILE: json.dumps(spec.plan.to_dict(), indent=1)}}
    ports = [{"name": "control", "port": spec.control_port},
             {"name": "metrics", "port": spec.topology.metrics.port}]
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.topology.metrics.port),
              "prometheus.io/path": "/metrics"}
    # the control Service is the supervisor's: ranks dial it, Prometheus scrapes it
    supervisor_labels = {"app.kubernetes.io/name": "dinodist", "dinodist/topology": spec.job,
                         "dinodist/role": "supervisor"}
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _meta(spec, f"{spec.job}-control", annotations=scrape),
        "spec": {"clusterIP": "None", "selector": supervisor_labels, "ports": ports,
                 "publishNotReadyAddresses": True},
    }
    volume = {"name": "topology", "configMap": {"name": f"{spec.job}-topology"}}
    mount = {"name": "topology", "mountPath": CONFIG_MOUNT, "readOnly": True}
    sup_env = [e for e in _container_env(spec) if e["name"] != CONTROL_ENV]
    supervisor = {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": _meta(spec, f"{spec.job}-supervisor"),
        "spec": {
            # a supervisor that exits 1 after a failure is started again; the ranks' restarts re-register
            "backoffLimit": spec.launcher_restarts,
            "template": {
                "metadata": {"labels": supervisor_labels, "annotations": scrape},
                "spec": {"restartPolicy": "Never", "volumes": [volume], "containers": [{
                    "name": "supervisor", "image": spec.image,
                    "command": supervise_argv(spec, TOPOLOGY_MOUNT, PLAN_MOUNT),
                    "ports": [{"name": p["name"], "containerPort": p["port"]} for p in ports],
                    "env": sup_env, "volumeMounts": [mount],
                    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}]},
            },
        },
    }
    command = ["torchrun", f"--max-restarts={spec.launcher_restarts}", "-m", RANK_MODULE, TOPOLOGY_MOUNT,
               "--plan", PLAN_MOUNT, "--resume"]
    if kind == "trainjob":
        job = {
            "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": _meta(spec, spec.job),
            "spec": {
                "runtimeRef": {"name": "torch-distributed"},
                "trainer": {
                    "image": spec.image, "command": command, "numNodes": spec.nodes,
                    "numProcPerNode": spec.nproc(0), "resourcesPerNode": _resources(spec),
                    "env": _container_env(spec),
                },
                "podTemplateOverrides": [{
                    "targetJobs": [{"name": "node"}],
                    "spec": {"volumes": [volume], "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                             "containers": [{"name": "node", "volumeMounts": [mount]}]},
                }],
            },
        }
    else:
        def replica(n: int) -> dict:
            return {"replicas": n, "restartPolicy": "OnFailure", "template": {
                "spec": {"volumes": [volume], "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
                         "containers": [{
                    "name": "pytorch", "image": spec.image, "command": command,
                    "env": _container_env(spec), "resources": _resources(spec), "volumeMounts": [mount]}]}}}
        specs = {"Master": replica(1)}
        if spec.nodes > 1:
            specs["Worker"] = replica(spec.nodes - 1)
        job = {
            "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": _meta(spec, spec.job),
            # pod restarts (restartPolicy OnFailure) resume; after backoffLimit the job fails
            "spec": {"nprocPerNode": str(spec.nproc(0)), "pytorchReplicaSpecs": specs,
                     "runPolicy": {"backoffLimit": spec.launcher_restarts}},
        }
    header = "\n".join(rank_map_lines(spec)) + "\n"
    return header + yaml.safe_dump_all([config, service, supervisor, job], sort_keys=False)


def write_launch_files(
    target: str, spec: LaunchSpec, out_dir: str | Path, k8s_kind: str = "trainjob"
) -> list[Path]:
    out = Path(out_dir)
    if target == "torchrun":
        files = torchrun_scripts(spec)
    elif target == "slurm":
        files = {f"{spec.job}.sbatch": sbatch_script(spec)}
    elif target == "k8s":
        files = {f"{spec.job}-{k8s_kind}.yaml": k8s_manifests(spec, k8s_kind)}
    else:
        raise DinodistError(f"deploy: unknown target {target!r}; use torchrun, slurm or k8s")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DinodistError(f"--out: cannot create {out}: {exc.strerror}") from None
    paths = [write_plan(out, spec.plan.to_dict())]
    for name, text in files.items():
        p = out / name
        p.write_text(text)
        if name.endswith((".sh", ".sbatch")):
            p.chmod(0o755)
        paths.append(p)
    return paths
